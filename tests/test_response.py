"""Reading ACKs: the fast path for plain ACKs agrees with the general reader."""

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.response import _read_any_ack, _read_plain_ack, read_ack

SAFE = st.text(alphabet="ABCXYZ0123456789-_.", min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR", "ZZ", "aa", ""]), control_id=SAFE,
       text=st.sampled_from(["", "bad"]), err=st.booleans(), lf=st.booleans(),
       delimiters=st.sampled_from(["|^~\\&", "|^~\\&#", "!^~\\&", "|^_\\&"]))
def test_the_fast_path_reads_what_the_general_reader_reads_or_steps_aside(code, control_id, text, err, lf,
                                                                          delimiters):
    sep = delimiters[0]
    msa = sep.join(["MSA", code, control_id] + ([text] if text else []))
    segments = [f"MSH{delimiters}{sep}A{sep}B{sep}C{sep}D{sep}20260101{sep}{sep}ACK{sep}1{sep}P{sep}2.5", msa]
    if err:
        segments.append(f"ERR{sep}{sep}MSH^1^9{sep}207^x^HL70357{sep}E")
    payload = ("\n" if lf else "\r").join(segments).encode("ascii")
    fast = _read_plain_ack(payload)
    general = _read_any_ack(payload)
    if fast is not None:
        assert fast == general
    assert read_ack(payload) == general


def test_an_ack_for_a_plain_message_takes_the_fast_path():
    payload = b"MSH|^~\\&|A|B|C|D|20260101||ACK^S12^ACK|1|P|2.5\rMSA|AA|CTL123"
    assert _read_plain_ack(payload) is not None
    assert read_ack(payload).answers("CTL123")
