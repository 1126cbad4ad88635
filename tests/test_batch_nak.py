"""A batch (FHS/BHS first) is refused AR, and the AR mirrors the batch header the way an
ACK mirrors MSH: its delimiters, sender and receiver swapped, and FHS-11/BHS-11 (the file
or batch control id) in MSA-2, so that the sender can correlate it and strict parsers read it.
"""

from __future__ import annotations

import pytest

from engine.core.ack import build_ack
from engine.core.header import read_header
from engine.core.intake import ACCEPT_ALL, assess

TS = "20260102161545+0100"
TEXT = b"batch messages (FHS/BHS) are not accepted; send one message per frame"
BOM = b"\xef\xbb\xbf"


def batch_header(name: bytes, delims: bytes, control_id: bytes, sender=(b"LabNet", b"Lab^Oost")) -> bytes:
    """FHS/BHS with the given MSH-1+MSH-2 style delimiters; "^" in values means a component."""
    sep, comp = delims[:1], delims[1:2]
    app, facility = (value.replace(b"^", comp) for value in sender)
    fields = [
        name, delims[1:], app, facility, b"Koppel", b"HOSP", b"20260102161545", b"",
        b"NAME-1", b"a comment", control_id, b"REF-0",
    ]
    return sep.join(fields)


def batch(name: bytes, delims: bytes = b"|^~\\&", control_id: bytes = b"CTRL-77") -> bytes:
    sep = delims[:1]
    msh = sep.join([b"MSH", delims[1:], b"A", b"B", b"C", b"D", b"20260102", b"", b"ADT^A01", b"M1", b"P", b"2.5"])
    segments = [batch_header(name, delims, control_id), msh, b"PID" + sep + b"1"]
    if name == b"FHS":
        segments.insert(1, batch_header(b"BHS", delims, b"INNER-1", sender=(b"Other", b"Place")))
    return b"\r".join(segments) + b"\r"


def ar(payload: bytes) -> bytes:
    """The ACK the listener sends for this frame."""
    code, ack = assess(payload, rules=ACCEPT_ALL, default_charset="8859/1").ack(timestamp=TS, control_id="K1")
    assert code == "AR"
    return ack


DELIMS = [b"|^~\\&", b"#^~\\&", b"!$r?@"]
CASES = [(name, delims) for name in (b"FHS", b"BHS") for delims in DELIMS]
IDS = [f"{name.decode()}-{delims.decode()}" for name, delims in CASES]


@pytest.mark.parametrize(("name", "delims"), CASES, ids=IDS)
def test_the_ar_for_a_batch_mirrors_its_header(name, delims):
    sep, comp = delims[:1], delims[1:2]
    segments = ar(batch(name, delims)).split(b"\r")
    msh = segments[0].split(sep)
    assert msh[0:2] == [b"MSH", delims[1:]]
    assert msh[2:6] == [b"Koppel", b"HOSP", b"LabNet", b"Lab" + comp + b"Oost"]
    msa = segments[1].split(sep)
    assert msa[:3] == [b"MSA", b"AR", b"CTRL-77"]
    err = segments[2].split(sep)
    assert err[0] == b"ERR" and err[3].split(comp)[0] == b"200"
    assert segments[3:] == [b""]


@pytest.mark.parametrize(("name", "delims"), CASES, ids=IDS)
def test_the_header_of_a_batch_carries_its_sender_receiver_and_control_id(name, delims):
    h = read_header(batch(name, delims), default_charset="8859/1")
    assert (h.rejection.ack_code, int(h.rejection.error_code)) == ("AR", 200)
    assert h.rejection.text == TEXT.decode()
    assert h.delimiters.field == delims[:1] and h.delimiters.encoding == delims[1:]
    assert h.sender == "LabNet|Lab" + delims[1:2].decode() + "Oost"
    assert (h.field(5), h.field(6), h.control_id) == (b"Koppel", b"HOSP", "CTRL-77")
    assert (h.message_type, h.version, h.hl7_charset) == ("", "", None)


@pytest.mark.parametrize(("name", "delims"), CASES, ids=IDS)
def test_hl7apy_reads_and_strictly_validates_the_ar_for_a_batch(name, delims):
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    ack = ar(batch(name, delims))
    for level in (VALIDATION_LEVEL.TOLERANT, VALIDATION_LEVEL.STRICT):
        parsed = parse_message(ack.decode("latin-1"), validation_level=level, find_groups=True)
        parsed.validate()
        assert parsed.msa.msa_1.value == "AR"
        assert parsed.msa.msa_2.value == "CTRL-77"
        assert parsed.msh.msh_3.to_er7() == "Koppel"
        assert parsed.msh.msh_5.to_er7() == "LabNet"
        assert len(parsed.err.to_er7()) > 3


@pytest.mark.parametrize("lead", [BOM, b"\r\n", BOM + b"\n\r\n"])
def test_a_bom_and_line_ends_before_the_batch_header_are_skipped(lead):
    segments = ar(lead + batch(b"BHS", b"#^~\\&")).split(b"\r")
    assert segments[0].split(b"#")[2:6] == [b"Koppel", b"HOSP", b"LabNet", b"Lab^Oost"]
    assert segments[1].split(b"#")[:3] == [b"MSA", b"AR", b"CTRL-77"]


def test_an_fhs_is_the_outer_envelope_its_fields_win_over_the_bhs_that_follows():
    ack = ar(batch(b"FHS"))
    assert ack.split(b"\r")[0].split(b"|")[4:6] == [b"LabNet", b"Lab^Oost"]
    assert ack.split(b"\r")[1].split(b"|")[:3] == [b"MSA", b"AR", b"CTRL-77"]
    assert b"INNER-1" not in ack and b"Other" not in ack


def test_an_empty_control_id_leaves_msa_2_empty_as_before():
    ack = ar(batch(b"BHS", control_id=b""))
    assert ack.split(b"\r")[1].split(b"|")[:3] == [b"MSA", b"AR", b""]
    assert ack.split(b"\r")[0].split(b"|")[4:6] == [b"LabNet", b"Lab^Oost"]


TODAY = (
    b"MSH|^~\\&|||||20260102161545+0100||ACK^^ACK|K1|P|2.5\r"
    b"MSA|AR||" + TEXT + b"\r"
    b"ERR|MSH^1^^200&Unsupported message type&HL70357|MSH^1|200^Unsupported message type^HL70357|E|||"
    + TEXT + b"|" + TEXT + b"\r"
)


@pytest.mark.parametrize(
    "raw",
    [
        b"FHS1^~\\&|LabNet|Lab|Koppel|HOSP|||||x|CTRL-77\r",  # FHS-1 alphanumeric
        b"BHS-^~\\&-LabNet-Lab-Koppel-HOSP-----CTRL-77\r",  # FHS-1 a character of our own values
        b"FHS",  # no FHS-1 at all
        b"FHS|^^\\&|LabNet|Lab|Koppel|HOSP|||||x|CTRL-77\r",  # FHS-2 repeats a character
        b"BHS|^~|LabNet|Lab|Koppel|HOSP|||||x|CTRL-77\r",  # BHS-2 too short
        b"BHS||LabNet\r",  # BHS-2 empty
    ],
)
def test_invalid_batch_delimiters_keep_the_minimal_ar(raw):
    header = read_header(raw, default_charset="8859/1")
    assert build_ack(header, code="AR", timestamp=TS, control_id="K1", rejection=header.rejection) == TODAY
    assert ar(raw) == TODAY
