"""The pure delivery core: retry schedule, the verdict on an answer, the outbound bytes.

No reactor, no store: values in, values out. The sender's shell tests
(``test_sender.py``) rely on exactly these rules.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import load_sample
from engine.core.delivery import judge
from engine.core.header import UTF8_BOM, read_header
from engine.core.outbound import OutboundError, prepare
from engine.core.retry import backoff_delay

ON_NAK = {"AE": "retry", "CE": "retry", "AR": "dead-letter", "CR": "dead-letter"}
PID = "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatiënt&&Testpatiënt^José^^^^^L||19800623|M"


def delay(attempt: int, *, initial=1.0, factor=2.0, maximum=300.0, jitter=0.2, draw=0.5) -> float:
    return backoff_delay(attempt, initial=initial, factor=factor, maximum=maximum, jitter=jitter, draw=draw)


def ack(code: str, control_id: str = "C1", text: str = "") -> bytes:
    msh = f"MSH|^~\\&|HIX|ZH|Koppel|ZH|20260102161546||ACK^R01|A{control_id}|P|2.4"
    return f"{msh}\rMSA|{code}|{control_id}|{text}\r".encode("ascii")


def message(charset: str = "8859/1", *, pid: str = PID, encoding: str = "latin-1", msh2: str = "^~\\&") -> bytes:
    msh = f"MSH|{msh2}|ZorgDomein|ZD|Koppel|ZH|20260102161545+0100||ORU^R01|C1|P|2.4|||||NLD|{charset}"
    return (msh + "\r" + pid + "\rOBX|1|ST|DOSE||5 µg\r").encode(encoding)


def msh_fields(raw: bytes) -> list[bytes]:
    return raw.split(b"\r", 1)[0].split(b"|")


# --------------------------------------------------------------------------- backoff_delay


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 256.0), (10, 300.0), (11, 300.0), (60, 300.0)],
)
def test_backoff_doubles_from_initial_and_stops_at_the_maximum(attempt, expected):
    assert delay(attempt) == expected


def test_backoff_with_a_factor_of_one_stays_at_initial():
    assert [delay(n, initial=5.0, factor=1.0) for n in (1, 2, 50)] == [5.0, 5.0, 5.0]


def test_backoff_survives_an_attempt_count_that_would_overflow_a_float():
    assert delay(100_000, factor=10.0) == 300.0


def test_backoff_jitter_spreads_by_the_fraction_either_way():
    assert delay(3, draw=0.0) == pytest.approx(4.0 * 0.8)
    assert delay(3, draw=0.75) == pytest.approx(4.0 * 1.1)


def test_backoff_jitter_never_goes_past_the_maximum():
    assert delay(20, draw=0.999) == 300.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_refuses_attempt_numbers_below_one(attempt):
    with pytest.raises(ValueError):
        delay(attempt)


@given(
    attempt=st.integers(min_value=1, max_value=2000),
    initial=st.floats(min_value=0.001, max_value=60),
    factor=st.floats(min_value=1, max_value=10),
    extra=st.floats(min_value=0, max_value=3600),
    jitter=st.floats(min_value=0, max_value=1),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_with_jitter_stays_within_its_bounds(attempt, initial, factor, extra, jitter, draw):
    maximum = initial + extra
    base = delay(attempt, initial=initial, factor=factor, maximum=maximum, jitter=0.0)
    spread = delay(attempt, initial=initial, factor=factor, maximum=maximum, jitter=jitter, draw=draw)
    assert 0.0 <= spread <= maximum
    assert base * (1 - jitter) - 1e-9 <= spread <= base * (1 + jitter) + 1e-9


@given(attempt=st.integers(min_value=1, max_value=200))
def test_backoff_never_shrinks_from_one_attempt_to_the_next(attempt):
    assert delay(attempt + 1) >= delay(attempt)


# --------------------------------------------------------------------------- judge


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_an_accept_with_the_sent_control_id_is_delivered(code):
    outcome = judge(ack(code), sent_control_id="C1", on_nak=ON_NAK)
    assert (outcome.verdict, outcome.code, outcome.resync) == ("delivered", code, False)


@pytest.mark.parametrize(
    ("code", "verdict"), [("AE", "retry"), ("CE", "retry"), ("AR", "dead-letter"), ("CR", "dead-letter")]
)
def test_a_negative_ack_follows_the_on_nak_map(code, verdict):
    outcome = judge(ack(code, text="appointment slot unknown"), sent_control_id="C1", on_nak=ON_NAK)
    assert (outcome.verdict, outcome.code) == (verdict, code)
    assert code in outcome.reason
    assert not outcome.resync  # the stream is in step: the same connection can carry the retry


@pytest.mark.parametrize("code", ["AE", "CE", "AR", "CR"])
def test_the_on_nak_map_can_turn_each_negative_ack_around(code):
    flipped = {k: ("retry" if v == "dead-letter" else "dead-letter") for k, v in ON_NAK.items()}
    assert judge(ack(code), sent_control_id="C1", on_nak=flipped).verdict == flipped[code]


def test_a_negative_ack_missing_from_the_map_is_retried_rather_than_dropped():
    assert judge(ack("AR"), sent_control_id="C1", on_nak={}).verdict == "retry"


@pytest.mark.parametrize("code", ["AA", "CA", "AR"])
def test_an_ack_for_another_message_never_counts_and_asks_for_a_clean_connection(code):
    outcome = judge(ack(code, control_id="C0"), sent_control_id="C1", on_nak=ON_NAK)
    assert outcome.verdict == "retry"
    assert outcome.resync
    assert "MSA-2" in outcome.reason


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"garbage \x00\xff from the destination",
        b"MSH|^~\\&|HIX|ZH|Koppel|ZH|20260102||ACK|A1|P|2.4\r",  # no MSA at all
        b"MSH|^~\\&|HIX|ZH|Koppel|ZH|20260102||ACK|A1|P|2.4\rMSA|ZZ|C1\r",  # no such code
        b"MSA|AA|C1\r",  # no MSH
    ],
)
def test_an_unreadable_answer_is_retried_on_a_clean_connection(answer):
    outcome = judge(answer, sent_control_id="C1", on_nak=ON_NAK)
    assert (outcome.verdict, outcome.code, outcome.resync) == ("retry", "", True)


def test_no_answer_is_retried_with_what_went_wrong_as_the_reason():
    outcome = judge(None, sent_control_id="C1", on_nak=ON_NAK, failure="no acknowledgement in time")
    assert outcome == type(outcome)(verdict="retry", code="", reason="no acknowledgement in time", resync=True)


def test_no_answer_without_a_named_failure_still_has_a_reason():
    assert judge(None, sent_control_id="C1", on_nak=ON_NAK).reason


def test_the_verdict_reason_never_carries_the_ack_text():
    outcome = judge(ack("AE", text="patient 123456782 unknown"), sent_control_id="C1", on_nak=ON_NAK)
    assert "123456782" not in outcome.reason


# --------------------------------------------------------------------------- outbound.prepare


def test_with_nothing_to_change_the_stored_bytes_go_out_untouched():
    raw = message()
    assert prepare(raw, source_charset="8859/1") is raw
    assert prepare(raw, source_charset="8859/1", target_charset="8859/1") == raw
    assert prepare(raw, source_charset="ISO-8859-1", target_charset="8859/1") == raw  # alias, same charset


@pytest.mark.parametrize(
    "name", ["zorgdomein/zd_srm_s01_appointment_request.hl7", "zorgdomein/zd_oru_r01_attachments.hl7"]
)
def test_a_real_sample_without_changes_is_byte_identical(name):
    raw = load_sample(name)
    assert prepare(raw, source_charset="8859/1") == raw


def test_rewrite_sets_msh5_and_msh6_and_nothing_else():
    raw = message()
    out = prepare(raw, rewrite=(("MSH-5", "HIX"), ("MSH-6", "ZIEKENHUIS")), source_charset="8859/1")
    before, after = msh_fields(raw), msh_fields(out)
    assert after[4:6] == [b"HIX", b"ZIEKENHUIS"]
    assert after[:4] == before[:4] and after[6:] == before[6:]
    assert out.split(b"\r", 1)[1] == raw.split(b"\r", 1)[1]  # the body is the stored body
    assert msh_fields(out)[9] == b"C1"  # MSH-10 kept


def test_rewrite_of_a_field_past_the_end_of_msh_pads_with_empty_fields():
    raw = b"MSH|^~\\&|ZD||Koppel|ZH|20260102||ORU^R01|C1|P|2.4\rPID|1||123456782\r"
    out = prepare(raw, rewrite=(("MSH-15", "AL"),))
    assert out.startswith(b"MSH|^~\\&|ZD||Koppel|ZH|20260102||ORU^R01|C1|P|2.4|||AL\r")


def test_rewrite_keeps_the_zorgdomein_delimiters():
    raw = load_sample("zorgdomein/zd_oru_pdf_official_head.hl7")
    assert raw.startswith(b"MSH|^_\\&|")
    out = prepare(raw, rewrite=(("MSH-5", "HIX"),))
    assert out.startswith(b"MSH|^_\\&|ZorgDomein||HIX|")
    assert out[out.index(b"\r") :] == raw[raw.index(b"\r") :]


def test_reencoding_latin1_to_utf8_sets_msh18_and_converts_every_segment():
    raw = message("8859/1")
    out = prepare(raw, source_charset="8859/1", target_charset="UNICODE UTF-8")
    assert msh_fields(out)[17] == b"UNICODE UTF-8"
    assert out == message("UNICODE UTF-8", encoding="utf-8")
    assert "José".encode() in out and "5 µg".encode() in out
    assert "José".encode("latin-1") not in out
    header = read_header(out, default_charset="8859/1")
    assert header.hl7_charset == "UNICODE UTF-8"


def test_reencoding_utf8_to_latin1_converts_back():
    raw = message("UNICODE UTF-8", encoding="utf-8")
    out = prepare(raw, source_charset="UNICODE UTF-8", target_charset="8859/1")
    assert out == message("8859/1")


def test_reencoding_applies_rewrites_in_the_target_charset():
    out = prepare(
        message("8859/1"),
        rewrite=(("MSH-6", "Zorgcentrum Eé"),),
        source_charset="8859/1",
        target_charset="UNICODE UTF-8",
    )
    assert msh_fields(out)[5] == "Zorgcentrum Eé".encode()


def test_a_character_the_target_charset_lacks_is_an_outbound_error_without_patient_data():
    raw = message("UNICODE UTF-8", pid="PID|1||123456782||Ωmega^Testpatiënt", encoding="utf-8")
    with pytest.raises(OutboundError) as caught:
        prepare(raw, source_charset="UNICODE UTF-8", target_charset="8859/1")
    assert "123456782" not in str(caught.value) and "mega" not in str(caught.value)


def test_bytes_that_are_not_the_declared_source_charset_are_an_outbound_error():
    raw = message("UNICODE UTF-8", encoding="latin-1")  # says UTF-8, is Latin-1
    with pytest.raises(OutboundError):
        prepare(raw, source_charset="UNICODE UTF-8", target_charset="8859/1")


def test_a_utf8_bom_goes_out_untouched_when_nothing_changes():
    raw = UTF8_BOM + message("UNICODE UTF-8", encoding="utf-8")
    assert prepare(raw, source_charset="UNICODE UTF-8") == raw


def test_a_utf8_bom_is_dropped_when_the_message_is_reencoded():
    raw = UTF8_BOM + message("UNICODE UTF-8", encoding="utf-8")
    out = prepare(raw, source_charset="UNICODE UTF-8", target_charset="8859/1")
    assert out == message("8859/1")


def test_a_utf8_bom_does_not_shift_the_rewritten_fields():
    raw = UTF8_BOM + message("UNICODE UTF-8", encoding="utf-8")
    out = prepare(raw, rewrite=(("MSH-5", "HIX"),), source_charset="UNICODE UTF-8")
    assert out.startswith(b"MSH|^~\\&|ZorgDomein|ZD|HIX|ZH|")
    assert out.split(b"\r", 1)[1] == raw.split(b"\r", 1)[1]


def test_a_message_with_lf_segment_ends_gets_its_header_rewritten_only():
    raw = message().replace(b"\r", b"\n")
    out = prepare(raw, rewrite=(("MSH-5", "HIX"),), source_charset="8859/1")
    assert out.split(b"\n", 1)[0].split(b"|")[4] == b"HIX"
    assert out.split(b"\n", 1)[1] == raw.split(b"\n", 1)[1]
