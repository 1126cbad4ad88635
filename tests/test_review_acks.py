"""HL7 conformance review of the acknowledgements Koppel writes (AA/AE/AR, CA/CE/CR).

Each test here fails on the code as reviewed and names the rule it checks. The ACKs are
built with the pure core (and, for `ack: on-map` NAKs, the processor's own rejection
builder on the bundled mappings), with a fixed timestamp and control id; no sockets.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.core import paths as core_paths
from engine.core.ack import build_ack
from engine.core.hl7message import Message
from engine.core.header import read_header
from engine.core.intake import ACCEPT_ALL, assess
from engine.mapping import load_mappings
from engine.shell.processor import _mapping_rejection
from tests.conftest import load_sample

REPO = Path(__file__).resolve().parent.parent
TS = "20260102161545+0100"


@pytest.fixture(scope="module")
def mappings():
    return load_mappings(REPO / "mappings")


def _segments(raw: bytes) -> list[bytes]:
    return [s for s in re.split(rb"\r\n|\r|\n", raw) if s]


def _with_field(raw: bytes, segment: bytes, number: int, value: bytes) -> bytes:
    """``raw`` with field ``number`` of the first ``segment`` set to ``value``."""
    out, done = [], False
    for seg in _segments(raw):
        if not done and seg[:3] == segment:
            fields = seg.split(b"|")
            fields += [b""] * (number + 1 - len(fields))
            fields[number] = value
            seg, done = b"|".join(fields), True
        out.append(seg)
    return b"\r".join(out) + b"\r"


def _on_map_nak(mappings, raw: bytes, mapping: str) -> bytes:
    """The AE an `ack: on-map` channel answers for ``raw`` (as processor._failure builds it)."""
    header = read_header(raw, default_charset="8859/1")
    result = mappings.mapping(mapping).apply(Message.parse(raw, codec=header.codec))
    assert not result.ok
    rejection = _mapping_rejection(result.errors)
    return build_ack(header, code="AE", timestamp=TS, control_id="K1", rejection=rejection)


def _unescape_len(value: bytes) -> int:
    return len(re.sub(rb"\\[FSTRE]\\", b"x", value))


# --- 1. MSA-3 longer than HL7 allows (ST, 80 characters, v2.3 - v2.6) ---------------------------


def test_an_on_map_nak_keeps_msa_3_within_its_80_characters(mappings):
    """HL7 v2.3-v2.6, MSA-3 Text Message: ST, maximum length 80. A bundled mapping's error text
    (a ZorgDomein ORM whose ORC-4 is not a ZD-number) is put there whole: 103 characters."""
    raw = _with_field(load_sample("zorgdomein/zd_orm_o01_lab_v24.hl7"), b"ORC", 4, b"zd12")
    out = _on_map_nak(mappings, raw, "zorgdomein-orm")
    msa = out.split(b"\r")[1].split(b"|")
    assert msa[1] == b"AE"
    assert _unescape_len(msa[3]) <= 80, msa[3]


# --- 2. a value not in its table is 0357 code 103, not 102 -----------------------------------------


def test_an_on_map_nak_for_a_value_not_in_its_table_says_0357_code_103(mappings):
    """HL7 table 0357: 103 "Table value not found" (an ID/IS value not in its table), 102 "Data
    type error" (the wrong data type). ORC-1 (ID, table 0119) = QQ is not in the mapping's
    table, yet the NAK says 102."""
    raw = _with_field(load_sample("zorgdomein/zd_orm_o01_lab_v24.hl7"), b"ORC", 1, b"QQ")
    out = _on_map_nak(mappings, raw, "zorgdomein-orm")
    err = out.split(b"\r")[2]
    assert err.startswith(b"ERR|ORC^1^1^")  # located right
    assert err == b"ERR|ORC^1^1^103&Table value not found&HL70357", err


# --- 3. a '.' delimiter splits the ACK's own MSH-12 "2.5" ------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        # MSH-1 '.' with a valid MSH-2 and MSH-12 missing: AR 101, MSH-12 defaults to "2.5"
        b"MSH.^~\\&.ZD.ZDF.KOPPEL.HOSP.20260102..ADT^A01.M1.P.\rPID.1\r",
        # MSH-1 '.' with an unreadable MSH-2: AR 102, MSH-12 defaults to "2.5"
        b"MSH.^^.ZD.ZDF.KOPPEL.HOSP.20260102..ADT^A01.M1.P.\rPID.1\r",
    ],
    ids=["msh12-missing", "msh2-unreadable"],
)
def test_a_dot_delimiter_does_not_split_the_acks_own_version(raw):
    """README (Receiving): a delimiter that the ACK's own values contain is refused (AR 102) so
    that it cannot split them. The ACK writes its own MSH-12 "2.5" when the version is
    missing or unreadable; with '.' as field separator that becomes MSH-12 "2", MSH-13 "5"."""
    assessment = assess(raw, rules=ACCEPT_ALL, default_charset="8859/1")
    code, out = assessment.ack(timestamp=TS, control_id="K1")
    assert code == "AR"
    msh = out.split(b"\r")[0]
    fields = msh.split(msh[3:4])
    assert fields[11] == b"2.5", msh
    assert len(fields) <= 12 or not any(fields[12:]), msh


# --- 4. an exception class name reaches the wire --------------------------------------------------


def test_an_on_map_nak_never_names_a_python_exception(mappings, monkeypatch):
    """README (Receiving): "Error texts never contain message content or Python exception
    names". A field the mapping cannot read (its safety net, `unreadable`) is reported as
    "could not be read (<ExceptionClass>)", and an on-map channel puts that text in MSA-3,
    ERR-7 and ERR-8. Simulated here by making the unescaping of a value fail."""

    def broken(*args, **kwargs):
        raise LookupError("simulated reader failure")

    monkeypatch.setattr(core_paths, "_unescape", broken)
    raw = _with_field(load_sample("zorgdomein/zd_orm_o01_lab_v24.hl7"), b"ORC", 4, b"ZD\\E\\123456")
    out = _on_map_nak(mappings, raw, "zorgdomein-orm")
    assert b"could not be read" in out  # the safety net was taken
    assert b"LookupError" not in out, out
