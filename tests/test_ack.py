"""Acknowledgements as exact bytes: original and enhanced mode, the ERR layout of
each HL7 version, mirrored delimiters and header fields, and no patient data.

Clock and control ids are injected, so every ACK here is compared byte for byte.
"""

from __future__ import annotations

import re
import string
from datetime import datetime, timedelta, timezone

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.ack import ControlIds, build_ack, decide, format_timestamp, is_enhanced, version_tuple
from engine.core.errors import ErrorCode, ErrorLocation, Rejection
from engine.core.header import read_header
from engine.core.intake import ACCEPT_ALL, STORE_FAILED, TOO_LARGE, AcceptRules, assess, assess_oversize
from tests.conftest import load_sample, sample_names

TS = "20260102161545+0100"
PID = "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatiënt&&Testpatiënt^Jan^^^^^L||19800101|M".encode("latin-1")


def msh(version="2.4", msh15="", msh16="", charset="8859/1", delims=b"|^~\\&", mtype=b"SRM^S01^SRM_S01") -> bytes:
    f = delims[:1]
    c = delims[1:2]
    mtype = mtype.replace(b"^", c)
    fields = [
        b"MSH", delims[1:], b"ZorgDomein", b"ZD", b"Koppel", b"HOSP", b"20260102161545+0100", b"",
        mtype, b"CTRL1", b"P", version.encode(), b"", b"", msh15.encode(), msh16.encode(), b"NLD", charset.encode(),
    ]
    return f.join(fields) + b"\r" + PID


def ack(raw: bytes, code: str, rejection: Rejection | None = None, control_id: str = "K1") -> bytes:
    header = read_header(raw, default_charset="8859/1")
    return build_ack(header, code=code, timestamp=TS, control_id=control_id, rejection=rejection)


TYPE_REJECTED = Rejection(
    ack_code="AR", error_code=ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
    text="message type not accepted on this channel", location=ErrorLocation(field=9),
)
STORE_TEXT = b"message could not be stored; send it again"


# --- exact bytes -------------------------------------------------------------------------------


def test_original_mode_aa_is_exact():
    assert ack(msh(), "AA") == (
        b"MSH|^~\\&|Koppel|HOSP|ZorgDomein|ZD|20260102161545+0100||ACK^S01^ACK|K1|P|2.4||||||8859/1\r"
        b"MSA|AA|CTRL1\r"
    )


def test_original_mode_ae_for_v24_carries_msa_3_and_an_err_1_only():
    assert ack(msh(), "AE", STORE_FAILED) == (
        b"MSH|^~\\&|Koppel|HOSP|ZorgDomein|ZD|20260102161545+0100||ACK^S01^ACK|K1|P|2.4||||||8859/1\r"
        b"MSA|AE|CTRL1|" + STORE_TEXT + b"\r"
        b"ERR|MSH^1^^207&Application internal error&HL70357\r"
    )


def test_original_mode_ar_for_v24_locates_the_field_in_err_1():
    assert ack(msh(), "AR", TYPE_REJECTED).split(b"\r")[2] == (
        b"ERR|MSH^1^9^200&Unsupported message type&HL70357"
    )


def test_original_mode_ar_for_v25_uses_err_2_3_4_7_8():
    assert ack(msh(version="2.5"), "AR", TYPE_REJECTED) == (
        b"MSH|^~\\&|Koppel|HOSP|ZorgDomein|ZD|20260102161545+0100||ACK^S01^ACK|K1|P|2.5||||||8859/1\r"
        b"MSA|AR|CTRL1|message type not accepted on this channel\r"
        b"ERR||MSH^1^9|200^Unsupported message type^HL70357|E|||"
        b"message type not accepted on this channel|message type not accepted on this channel\r"
    )


def test_from_v27_msa_3_is_left_out_and_the_text_is_only_in_err():
    out = ack(msh(version="2.7"), "AR", TYPE_REJECTED).split(b"\r")
    assert out[1] == b"MSA|AR|CTRL1"
    assert out[2].startswith(b"ERR||MSH^1^9|200^Unsupported message type^HL70357|E|||")


def test_enhanced_mode_ca_is_exact():
    assert ack(msh(version="2.5.1", msh15="AL", msh16="NE"), "CA") == (
        b"MSH|^~\\&|Koppel|HOSP|ZorgDomein|ZD|20260102161545+0100||ACK^S01^ACK|K1|P|2.5.1||||||8859/1\r"
        b"MSA|CA|CTRL1\r"
    )


def test_enhanced_mode_ce_is_exact():
    assert ack(msh(version="2.5.1", msh15="AL", msh16="NE"), "CE", STORE_FAILED) == (
        b"MSH|^~\\&|Koppel|HOSP|ZorgDomein|ZD|20260102161545+0100||ACK^S01^ACK|K1|P|2.5.1||||||8859/1\r"
        b"MSA|CE|CTRL1|" + STORE_TEXT + b"\r"
        b"ERR||MSH^1|207^Application internal error^HL70357|E|||" + STORE_TEXT + b"|" + STORE_TEXT + b"\r"
    )


def test_enhanced_mode_cr_is_exact():
    assert ack(msh(version="2.5.1", msh15="AL"), "CR", TYPE_REJECTED) == (
        b"MSH|^~\\&|Koppel|HOSP|ZorgDomein|ZD|20260102161545+0100||ACK^S01^ACK|K1|P|2.5.1||||||8859/1\r"
        b"MSA|CR|CTRL1|message type not accepted on this channel\r"
        b"ERR||MSH^1^9|200^Unsupported message type^HL70357|E|||"
        b"message type not accepted on this channel|message type not accepted on this channel\r"
    )


def test_an_unreadable_header_gets_a_minimal_msh_and_both_err_layouts():
    header = read_header(b"PID|1||123456782", default_charset="8859/1")
    out = build_ack(header, code="AR", timestamp=TS, control_id="K1", rejection=header.rejection)
    assert out == (
        b"MSH|^~\\&|||||20260102161545+0100||ACK^^ACK|K1|P|2.5\r"
        b"MSA|AR||message does not start with an MSH segment\r"
        b"ERR|MSH^1^^100&Segment sequence error&HL70357|MSH^1|100^Segment sequence error^HL70357|E|||"
        b"message does not start with an MSH segment|message does not start with an MSH segment\r"
    )


def test_an_unknown_charset_gets_ae_103_located_at_msh_18():
    raw = msh(version="2.5", charset="KLINGON")
    header = read_header(raw, default_charset="8859/1")
    out = build_ack(header, code="AE", timestamp=TS, control_id="K1", rejection=header.rejection)
    assert out.split(b"\r")[1:] == [
        b"MSA|AE|CTRL1|unsupported character set in MSH-18",
        b"ERR||MSH^1^18|103^Table value not found^HL70357|E|||"
        b"unsupported character set in MSH-18|unsupported character set in MSH-18",
        b"",  # the last segment ends with CR too
    ]


@pytest.mark.parametrize(
    ("version", "msh9"),
    [("2.1", b"ACK^S01"), ("2.3", b"ACK^S01"), ("2.3.1", b"ACK^S01^ACK"), ("2.4", b"ACK^S01^ACK"), ("2.8", b"ACK^S01^ACK")],
)
def test_msh_9_is_ack_trigger_with_the_structure_from_v231(version, msh9):
    assert ack(msh(version=version), "AA").split(b"|")[8] == msh9


def test_an_incoming_message_without_a_trigger_gets_a_plain_ack_type():
    out = ack(load_sample("public/hapi_ack_v21_brace.hl7"), "AA")
    assert out.split(b"|")[8] == b"ACK"


# --- MSH-15 / MSH-16: which code, sent or withheld ---------------------------------------------


@pytest.mark.parametrize(
    ("msh15", "msh16", "original", "code", "send"),
    [
        ("", "", "AA", "AA", True),
        ("", "", "AE", "AE", True),
        ("", "", "AR", "AR", True),
        ("AL", "", "AA", "CA", True),
        ("AL", "", "AE", "CE", True),
        ("AL", "AL", "AR", "CR", True),
        ("NE", "", "AA", "CA", False),
        ("NE", "AL", "AE", "CE", False),
        ("NE", "", "AR", "CR", False),
        ("ER", "", "AA", "CA", False),
        ("ER", "", "AE", "CE", True),
        ("ER", "", "AR", "CR", True),
        ("SU", "", "AA", "CA", True),
        ("SU", "", "AE", "CE", False),
        ("SU", "", "AR", "CR", False),
        ("", "AL", "AA", "CA", True),
        ("", "NE", "AR", "CR", True),
        ("al", "", "AA", "CA", True),
        ("EVN", "A01", "AA", "AA", True),  # damaged header: not table 0155, original mode
    ],
)
def test_msh_15_decides_the_code_and_whether_the_accept_ack_is_sent(msh15, msh16, original, code, send):
    header = read_header(msh(msh15=msh15, msh16=msh16), default_charset="8859/1")
    decision = decide(header, original)
    assert (decision.code, decision.send) == (code, send)
    assert is_enhanced(header) == (code != original)


@pytest.mark.parametrize("msh15", ["NE", "ER", "SU", "AL"])
@pytest.mark.parametrize("original", ["AA", "AE", "AR"])
def test_always_answers_whatever_msh_15_asks_with_the_enhanced_code(msh15, original):
    header = read_header(msh(msh15=msh15), default_charset="8859/1")
    decision = decide(header, original, always=True)
    assert decision.send and decision.code == {"AA": "CA", "AE": "CE", "AR": "CR"}[original]


@pytest.mark.parametrize("msh15", ["", "AL"])
@pytest.mark.parametrize("original", ["AA", "AR"])
def test_an_acknowledgement_is_never_acknowledged(msh15, original):
    """HL7 v2: an ACK message gets no ACK (a peer sending its ACKs here must not start a loop)."""
    header = read_header(msh(msh15=msh15, mtype=b"ACK^S01^ACK"), default_charset="8859/1")
    assert header.message_type == "ACK"
    assert not decide(header, original).send and not decide(header, original, always=True).send


@pytest.mark.parametrize("bad", ["CA", "XX", "", "aa"])
def test_decide_refuses_a_code_that_is_not_original_mode(bad):
    header = read_header(msh(), default_charset="8859/1")
    with pytest.raises(ValueError):
        decide(header, bad)


# --- mirroring ----------------------------------------------------------------------------------


def test_the_ack_mirrors_zorgdomein_oru_delimiters():
    raw = load_sample("zorgdomein/zd_oru_r01_attachments.hl7")
    out = ack(raw, "AR", TYPE_REJECTED)
    assert out.startswith(b"MSH|^_\\&|||ZorgDomein||")
    assert b"\rMSA|AR|ZD200046119|" in out
    assert out.split(b"\r")[2] == b"ERR|MSH^1^9^200&Unsupported message type&HL70357"


def test_the_ack_mirrors_custom_delimiters_and_escapes_its_own_text():
    raw = load_sample("public/hl7apy_msh_only_custom_delimiters.hl7")
    out = ack(raw, "AR", TYPE_REJECTED)
    segments = out.split(b"\r")
    assert segments[0] == b"MSH!$r?@!LB!LB!LIP!LIP!20260102161545+0100!!ACK$$ACK!K1!D!2.5"
    err = segments[2].split(b"!")
    # "r" is the repetition separator here: no unescaped "r" may reach a field
    assert b"r" not in err[3]
    assert err[3] == b"200$Unsuppo?R?ted message type$HL70357"
    assert err[8] == b"message type not accepted on this channel".replace(b"r", b"?R?")


def test_the_ack_mirrors_the_three_encoding_character_msh_2():
    out = ack(load_sample("public/hapi_bar_p01_three_enc_chars.hl7"), "AR", TYPE_REJECTED)
    assert out.startswith(b"MSH|^~}|")
    assert out.split(b"\r")[2] == b"ERR|MSH^1^9^200"


def test_the_ack_mirrors_the_five_encoding_characters():
    assert ack(load_sample("public/hl7apy_rsp_k22_v27_truncation_char.hl7"), "AA").startswith(b"MSH|^~\\&#|")


def test_the_ack_mirrors_version_processing_id_and_charset():
    out = ack(load_sample("public/msfc_oul_r22_utf8_ed.hl7"), "AA")
    fields = out.split(b"\r")[0].split(b"|")
    assert fields[10:12] == [b"P", b"2.8"]
    assert fields[17] == b"UNICODE UTF-8"


def test_the_ack_swaps_sending_and_receiving_application_and_facility():
    fields = ack(msh(), "AA").split(b"\r")[0].split(b"|")
    assert fields[2:6] == [b"Koppel", b"HOSP", b"ZorgDomein", b"ZD"]


def test_the_ack_carries_the_injected_timestamp_and_control_id():
    fields = ack(msh(), "AA", control_id="KOPPEL-7").split(b"\r")[0].split(b"|")
    assert fields[6] == TS.encode()
    assert fields[9] == b"KOPPEL-7"


def test_msa_2_is_the_incoming_control_id_even_when_it_is_empty():
    out = ack(load_sample("public/trusted-intermediary_MALFORMED_missing_msh10.hl7"), "AR", TYPE_REJECTED)
    assert out.split(b"\r")[1].startswith(b"MSA|AR||")


def split_segments(payload: bytes) -> dict[bytes, list[bytes]]:
    sep = payload[3:4]
    return {seg.split(sep, 1)[0]: seg.split(sep) for seg in payload.split(b"\r")}


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_gets_an_ack_that_reads_back_right(name):
    raw = load_sample(name)
    assessment = assess(raw, rules=ACCEPT_ALL, default_charset="8859/1")
    code, out = assessment.ack(timestamp=TS, control_id="K1")
    if not out:
        assert not assessment.decision().send
        return
    h = assessment.header
    segs = split_segments(out)
    assert segs[b"MSH"][1] == h.delimiters.encoding
    assert segs[b"MSH"][2:6] == [h.field(5), h.field(6), h.field(3), h.field(4)]
    assert segs[b"MSH"][9] == b"K1"
    assert segs[b"MSA"][1] == code.encode()
    assert segs[b"MSA"][2] == h.field(10)
    assert (b"ERR" in segs) == (code not in ("AA", "CA"))
    assert b"\n" not in out and b"\x0b" not in out and b"\x1c" not in out


# --- build then parse (hypothesis) ----------------------------------------------------------------

# Not "/" (charset names like 8859/1 contain it) nor "+" (the timestamp's UTC offset).
DELIMS = "|^~\\&#!$%*:;=?@_{}"
SAFE = string.ascii_letters + string.digits + " .-"


@st.composite
def messages(draw):
    chars = draw(st.permutations(DELIMS))
    n_enc = draw(st.integers(min_value=3, max_value=5))
    sep, enc = chars[0], "".join(chars[1 : 1 + n_enc])
    value = st.text(alphabet=SAFE, max_size=12)
    fields = {n: draw(value) for n in (3, 4, 5, 6)}
    fields[10] = draw(st.text(alphabet=SAFE, min_size=1, max_size=20).filter(lambda s: s and s == s.strip()))  # python-hl7 strips trailing blanks
    fields[11] = draw(st.sampled_from(["P", "T", "D", ""]))
    fields[12] = draw(st.sampled_from(["2.1", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.7", "2.8"]))
    fields[15] = draw(st.sampled_from(["", "AL", "NE", "ER", "SU"]))
    fields[16] = draw(st.sampled_from(["", "AL", "NE", "ER", "SU"]))
    fields[18] = draw(st.sampled_from(["", "8859/1", "UNICODE UTF-8", "ASCII"]))
    trigger = draw(st.sampled_from(["", "A01", "S01", "R01", "O21"]))
    fields[9] = "ORU" + (enc[0] + trigger if trigger else "")
    line = ["MSH", enc] + [fields.get(n, "") for n in range(3, 19)]
    return sep, enc, fields, trigger, (sep.join(line) + "\r").encode() + PID


def unescape(text: bytes, sep: bytes, enc: bytes) -> bytes:
    esc = enc[2:3]
    table = {b"F": sep, b"S": enc[0:1], b"R": enc[1:2], b"E": esc, b"T": enc[3:4]}

    def one(m):  # \Xhh\: control characters (CR, LF, TAB, ...) are escaped as hex
        code = m.group(1)
        return bytes.fromhex(code[1:].decode()) if code.startswith(b"X") else table[code]

    return re.sub(re.escape(esc) + rb"(F|S|R|E|T|X[0-9A-F]{2})" + re.escape(esc), one, text)


@given(
    message=messages(),
    outcome=st.sampled_from(["AA", "AE", "AR"]),
    text=st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", ""), min_size=1, max_size=40),
    control_id=st.text(alphabet=string.ascii_uppercase + string.digits, min_size=1, max_size=12),
)
@settings(max_examples=400, deadline=None)
def test_an_ack_built_for_random_msh_values_and_delimiters_parses_back_to_the_right_fields(message, outcome, text, control_id):
    sep, enc, fields, trigger, raw = message
    header = read_header(raw, default_charset="8859/1")
    assert header.rejection is None
    decision = decide(header, outcome)
    rejection = None
    if outcome != "AA":
        rejection = Rejection(ack_code=outcome, error_code=ErrorCode.APPLICATION_INTERNAL_ERROR, text=text)
    out = build_ack(header, code=decision.code, timestamp=TS, control_id=control_id, rejection=rejection)

    s, e = sep.encode(), enc.encode()
    assert out.endswith(b"\r")  # every segment ends with CR, the last one too
    segments = out[:-1].split(b"\r")
    assert [seg[:3] for seg in segments] == [b"MSH", b"MSA"] + ([b"ERR"] if rejection else [])
    m = segments[0].split(s)
    assert m[1] == e
    assert [m[2], m[3], m[4], m[5]] == [fields[5].encode(), fields[6].encode(), fields[3].encode(), fields[4].encode()]
    structured = version_tuple(fields[12]) >= (2, 3, 1)  # MSH-9.3 required from 2.3.1
    if structured:
        assert m[8].split(e[0:1]) == [b"ACK", trigger.encode(), b"ACK"]
    else:
        assert m[8].split(e[0:1]) == ([b"ACK", trigger.encode()] if trigger else [b"ACK"])
    assert m[9] == control_id.encode()
    assert m[10] == (fields[11] or "P").encode()
    assert m[11] == fields[12].encode()
    assert (m[17] if len(m) > 17 else b"") == fields[18].encode()

    msa = segments[1].split(s)
    assert msa[1] == decision.code.encode()
    assert msa[2] == fields[10].encode()

    if rejection is not None:
        expected_text = text.encode()
        err = segments[2].split(s)
        if version_tuple(fields[12]) < (2, 5):
            assert len(err) == 2
            code_field = err[1].split(e[0:1])
            assert code_field[:3] == [b"MSH", b"1", b""]
        else:
            assert unescape(err[8], s, e) == expected_text
            assert unescape(err[7], s, e) == expected_text
            assert err[3].split(e[0:1])[0] == b"207"
            assert err[4] == b"E"
        if version_tuple(fields[12]) < (2, 7):
            assert unescape(msa[3], s, e) == expected_text
        else:
            assert len(msa) == 3

    if sep == "|" and len(enc) >= 4:
        parsed = hl7.parse(out.decode("ascii"))
        assert str(parsed.segment("MSA")[1]) == decision.code
        assert str(parsed.segment("MSA")[2]) == fields[10]
        assert str(parsed.segment("MSH")[10]) == control_id


# --- no patient data, no exception names ---------------------------------------------------------


def all_rejections_for_a_message_with_a_patient():
    base = msh(version="2.5")
    yield read_header(base.replace(b"|8859/1\r", b"|KLINGON\r"), default_charset="8859/1").rejection
    yield read_header(base.replace(b"|2.5|", b"||"), default_charset="8859/1").rejection
    yield read_header(base.replace(b"|CTRL1|", b"||"), default_charset="8859/1").rejection
    yield read_header(b"MSH||" + base[9:], default_charset="8859/1").rejection
    yield read_header(PID + b"\r" + base, default_charset="8859/1").rejection
    for rules in (
        AcceptRules(types=frozenset({"ADT^A01"})),
        AcceptRules(types=frozenset({"SRM^S04"})),
        AcceptRules(versions=frozenset({"2.3"})),
        AcceptRules(processing_ids=frozenset({"T"})),
    ):
        yield assess(base, rules=rules, default_charset="8859/1").rejection
    yield STORE_FAILED
    yield TOO_LARGE


@pytest.mark.parametrize("rejection", list(all_rejections_for_a_message_with_a_patient()), ids=lambda r: r.text[:30])
def test_no_ack_contains_patient_data_or_python_exception_names(rejection):
    assert rejection is not None
    for version in ("2.3", "2.5", "2.7"):
        raw = msh(version=version).replace(b"|8859/1\r", b"|KLINGON\r") if rejection.location and rejection.location.field == 18 else msh(version=version)
        out = ack(raw, rejection.ack_code, rejection)
        assert b"123456782" not in out
        assert "Testpatiënt".encode("latin-1") not in out and b"Testpati" not in out
        assert b"KLINGON" not in out.split(b"\r", 1)[1]  # only mirrored in MSH-18, never in text
        for word in (b"Error:", b"Exception", b"Traceback", b"UnknownCharset", b"KeyError", b"ValueError"):
            assert word not in out


def test_an_oversize_frame_gets_ar_too_large_addressed_from_its_head():
    raw = msh(version="2.5")
    a = assess_oversize(raw[:80], default_charset="8859/1")
    code, out = a.ack(timestamp=TS, control_id="K1")
    assert code == "AR"
    assert b"MSA|AR|CTRL1|message too large" in out
    assert b"123456782" not in out


# --- control ids and timestamps -------------------------------------------------------------------


def test_control_ids_are_unique_and_carry_the_prefix():
    ids = ControlIds("KOPPEL-20260102-4711-")
    seen = [ids() for _ in range(20_000)]
    assert len(set(seen)) == len(seen)
    assert seen[0] == "KOPPEL-20260102-4711-1"
    assert all(i.startswith("KOPPEL-20260102-4711-") for i in seen)


def test_control_ids_from_two_processes_with_different_prefixes_never_collide():
    a, b = ControlIds("A1-"), ControlIds("A11-")
    assert not {a() for _ in range(5000)} & {b() for _ in range(5000)}


def test_control_ids_can_start_from_a_given_counter():
    assert ControlIds("X", start=41)() == "X41"


def test_format_timestamp_gives_seconds_and_the_utc_offset():
    moment = datetime(2026, 1, 2, 16, 15, 45, 999_999, tzinfo=timezone(timedelta(hours=1)))
    assert format_timestamp(moment) == "20260102161545+0100"
    assert format_timestamp(moment.astimezone(timezone.utc)) == "20260102151545+0000"


def test_format_timestamp_refuses_a_naive_datetime():
    with pytest.raises(ValueError):
        format_timestamp(datetime(2026, 1, 2, 16, 15, 45))


@pytest.mark.parametrize(("text", "expected"), [("2.5.1", (2, 5, 1)), (" 2.4 ", (2, 4)), ("", None), ("2.x", None), ("V2", None)])
def test_version_tuple_reads_dotted_versions_and_nothing_else(text, expected):
    assert version_tuple(text) == expected


def test_hl7apy_strictly_reads_a_nak_that_has_no_trigger_to_mirror():
    """MSH-9.3 (the structure) is required from 2.3.1 on: a bare `ACK` is refused by strict
    parsers, so the sender could not read why its message was refused. (The NAK for an
    unreadable header has MSH-9 `ACK^^ACK` too, but no MSA-2 to give: there is no MSH-10.)"""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    raw = b"MSH|^~\\&|GP|PRAKTIJK|Koppel|HOSP|20260102||ADT|M7|P|2.5\r"  # a type without a trigger
    header = read_header(raw, default_charset="8859/1")
    rejection = TYPE_REJECTED
    out = build_ack(header, code="AR", timestamp=TS, control_id="K1", rejection=rejection)
    parsed = parse_message(out.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    parsed.validate()
    assert parsed.msh.msh_9.to_er7() == "ACK^^ACK"
    assert parsed.msa.msa_1.value == "AR"


@given(st.text(alphabet="ab|^~\\&\r" + string.ascii_letters, max_size=300))
def test_msa_3_holds_at_most_80_characters_and_no_cut_escape_sequence(text):
    """MSA-3 is an ST of at most 80 characters: a longer reason is cut, never inside an escape
    sequence, and what python-hl7 reads back is the start of the reason."""
    header = read_header(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|1|P|2.4\r", default_charset="8859/1")
    rejection = Rejection(ack_code="AE", error_code=ErrorCode.DATA_TYPE, text=text)
    ack = build_ack(header, code="AE", rejection=rejection, control_id="K1", timestamp="20240101120000")
    parsed = hl7.parse(ack.decode("ascii"))
    msa_3 = str(parsed.segment("MSA")[3]) if len(parsed.segment("MSA")) > 3 else ""
    assert len(msa_3) <= 80
    assert msa_3.count("\\") % 2 == 0
    assert text.startswith(parsed.unescape(msa_3))


def test_a_non_ascii_reason_never_puts_a_lone_delimiter_in_the_answer():
    """The text's non-ASCII characters become '?' before it is escaped: with '?' as the
    subcomponent separator (hl7apy's sample MSH|!$r?@), a '?' put in after would split MSA-3."""
    header = read_header(b"MSH|!$r?@|A|B|C|D|20240101||ADT!A01!ADT_A01|1|P|2.5\r", default_charset="8859/1")
    rejection = Rejection(ack_code="AE", error_code=ErrorCode.DATA_TYPE, text="veld \u00e9\u20ac ontbreekt")
    ack = build_ack(header, code="AE", rejection=rejection, control_id="K1", timestamp="20240101120000")
    msa = [line for line in ack.split(b"\r") if line.startswith(b"MSA")][0].split(b"|")
    assert msa[3] == b"veld rTrrTr ontbrEreekt"  # each '?' escaped (rTr), as the letter r is (rEr)
    err = [line for line in ack.split(b"\r") if line.startswith(b"ERR")][0].split(b"|")
    assert err[7] == err[8] == msa[3]
