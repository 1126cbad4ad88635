"""Mapping-language edge cases found in review: each failed before its fix.

The bundled mappings run on the ZorgDomein SRM^S01 sample with one field changed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import ConfigError
from engine.core import convert
from engine.core.header import Delimiters, read_header
from engine.core.hl7message import Message, unescape
from engine.mapping import _format, build_outbound, load_mappings
from tests.conftest import load_sample

ROOT = Path(__file__).resolve().parent.parent
SRM = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))


# The entry a create made, as the processor passes it: the SRM's SIU^S12 goes to the HIS only
# for an entry still `requested` (not for one already booked or closed).
NEW_ENTRY = SimpleNamespace(id=1, state="requested")


@pytest.fixture(scope="module")
def mappings():
    return load_mappings(ROOT / "mappings")


def mapped(mappings, raw: bytes):
    header = read_header(raw, default_charset="8859/1")
    mapping = mappings.for_type(header.type_and_trigger)
    result = mapping.apply(Message.parse(raw, codec=header.codec))
    assert result.errors == ()
    return result.event, [data for _, data in build_outbound(mapping, result.event, NEW_ENTRY, control_id="K1",
                                                              timestamp=NOW)]


def segment(data: bytes, name: bytes) -> bytes:
    return next(line for line in data.split(b"\r") if line.startswith(name))


def test_a_control_character_decoded_from_an_escape_is_escaped_again_on_the_way_out(mappings):
    """\\X1C\\ (MLLP's FS) in a remark must not end the destination's frame."""
    raw = SRM.replace(b"^Pati\xebnt spreekt", b"^Pati\xebnt \\X1C\\ \\X0B\\ spreekt")
    _, (data,) = mapped(mappings, raw)
    assert b"\x1c" not in data and b"\x0b" not in data
    assert b"\\X1C\\" in data


def test_a_referrer_sent_as_fn_subcomponents_reads_as_the_surname(mappings):
    """ZorgDomein sends the referrer's name as ^&&van Houten^ (FN.3, the own surname)."""
    raw = SRM.replace(b"01004567^van Houten^Z.Z.", b"01004567^&&van Houten^Z.Z.")
    event, (data,) = mapped(mappings, raw)
    assert event.fields["referrer.name"] == "van Houten"
    assert b"\\T\\" not in segment(data, b"SCH")


def test_a_repetition_filter_matches_an_assigning_authority_with_its_oid(mappings):
    raw = SRM.replace(b"PID|1||^^^NLMINBIZA^NNNLD",
                      b"PID|1||123456782^^^NLMINBIZA&2.16.840.1.113883.2.4.6.3&ISO^NNNLD")
    event, _ = mapped(mappings, raw)
    assert event.fields.get("patient.bsn") == "123456782"


@pytest.mark.parametrize("text", ["0001", "00010101000000+0100", "99991231235959-1400"])
def test_a_date_at_the_edge_of_the_calendar_is_a_conversion_error(text):
    with pytest.raises(convert.ConversionError, match="out of range"):
        convert.dtm(text)


def test_a_default_that_does_not_convert_is_a_config_error_with_its_place(tmp_path):
    (tmp_path / "x.yaml").write_text(
        "name: x\ntypes: [SRM^S01]\nevent:\n  kind: {value: appointment-request}\n  action: {value: create}\n"
        "  t: {from: ARQ-11.1, convert: dtm, default: '0001'}\n")
    with pytest.raises(ConfigError):
        load_mappings(tmp_path)


def test_an_old_amsterdam_time_goes_out_with_a_whole_minute_offset():
    """Before 1940 Amsterdam was +00:19:32 (summer +01:19:32); HL7 has no seconds in an offset."""
    assert _format(convert.dtm("19300601120000")) == "19300601120000+0120"
    assert _format(dt.date(950, 1, 2)) == "09500102"


def test_a_dutch_number_written_with_its_trunk_zero_after_the_country_code():
    assert convert.phone("+31 (0)20 555 1234") == "+31205551234"
    assert convert.phone("(020) 555 1234") == "0205551234"  # without a country code: kept


def test_a_hex_escape_with_spaces_is_malformed_and_kept_as_sent():
    assert unescape("\\X 41 42\\", Delimiters(field=b"|", encoding=b"^~\\&")) == "\\X 41 42\\"


@pytest.mark.parametrize("sent", [b"198006", b"1980"])
def test_a_birth_date_sent_without_a_day_goes_out_at_the_precision_it_came_in(mappings, sent):
    """A month (or year) of birth must not reach the HIS as the first of it: a date nobody gave."""
    event, (data,) = mapped(mappings, SRM.replace(b"||20000101|U|", b"||" + sent + b"|U|"))
    assert segment(data, b"PID").split(b"|")[7] == sent
    from engine.core.agenda import plain

    assert plain(event.fields["patient.birth_date"]) == ("1980-06" if len(sent) == 6 else "1980")


def test_a_partial_date_with_an_impossible_month_is_a_conversion_error():
    with pytest.raises(convert.ConversionError, match="out of range"):
        convert.date("198013")
