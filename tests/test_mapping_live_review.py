"""Live review of the mapping language (issue #4) and the precision of a dtm without a time of day.

Each test failed before its fix (the docstring says how). Synthetic patients only.
"""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

from engine.agendas_config import load_agendas
from engine.core import agenda as ag
from engine.core import convert
from engine.core.hl7message import Message
from engine.core.paths import first, parse_path
from engine.mapping import build_outbound
from engine.shell.processor import entry_from_record, event_from_json, event_to_json, to_json
from tests.conftest import load_sample
from tests.test_mapping import MAPPINGS, bundled, mapped  # noqa: F401 - bundled is a fixture

SRM = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
SUMMER = dt.timezone(dt.timedelta(hours=2))
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
NEW_ENTRY = SimpleNamespace(id=1, state="requested")
BOOK = load_agendas(MAPPINGS / "agendas.yaml")


def window(start: str, end: str) -> bytes:
    return SRM.replace(b"|20160329^20160428|", f"|{start}^{end}|".encode())


def out(data: bytes, path: str) -> str | None:
    return first(Message.parse(data, codec="latin-1"), parse_path(path))


def record(data: str):
    """An agenda entry row as the store gives it back."""
    return SimpleNamespace(id=1, agenda_id="cardiology", kind="appointment-request", state="requested",
                           zd_number="ZD200046139", placer_id=None, filler_id=None, data=data, attachments=())


def created_entry(bundled, raw: bytes):
    mapping, event = mapped(bundled, raw)
    decision = ag.decide(event, None, now=NOW, message_id="1", book=BOOK)
    return mapping, event, decision.entry


# ---------------------------------------------------------------------------------------
# A. a dtm without a time of day keeps its precision in the store, on show and on the way out


def test_a_requested_window_sent_as_months_is_stored_as_months_not_as_an_invented_midnight(bundled):
    """Before: `"requested_start": "2016-04-01T00:00:00+02:00"` in the stored JSON."""
    _, _, entry = created_entry(bundled, window("201604", "20160528"))
    stored = json.loads(to_json(entry.data))
    assert stored["requested_start"] == "2016-04"
    assert stored["requested_end"] == "2016-05-28"


def test_a_stored_window_loads_back_as_the_instants_it_compares_as_and_goes_out_as_sent(bundled):
    """Before: the loaded value was the text `2016-04-01T00:00:00+02:00`; a held event loaded
    back (as the processor does when it cannot map its message again) put that ISO text into
    SCH-11.4 of the SIU^S12."""
    mapping, event, entry = created_entry(bundled, window("201604", "20160528"))
    loaded = entry_from_record(record(to_json(entry.data))).data
    assert loaded["requested_start"] == dt.datetime(2016, 4, 1, tzinfo=SUMMER)
    assert loaded["requested_end"] < dt.datetime(2016, 5, 28, 0, 1, tzinfo=SUMMER)
    assert "_day_times" not in loaded
    held, name = event_from_json(event_to_json(event, mapping.name))
    assert held.fields["requested_start"] == event.fields["requested_start"]
    ((_, data),) = build_outbound(mapping, held, NEW_ENTRY, control_id="K1", timestamp=NOW)
    assert (out(data, "SCH-11.4"), out(data, "SCH-11.5")) == ("201604", "20160528")


def test_a_redelivered_request_is_a_noop_against_a_new_and_an_old_stored_window(bundled):
    """Guards the fix: the stored form changed, the comparison must not (a re-delivery sends nothing)."""
    mapping, event, entry = created_entry(bundled, window("201604", "20160528"))
    new_row = entry_from_record(record(to_json(entry.data)))
    old_data = json.loads(to_json(entry.data))
    old_data.pop("_day_times", None)
    old_data["requested_start"] = "2016-04-01T00:00:00+02:00"  # the form stored before the fix
    old_data["requested_end"] = "2016-05-28T00:00:00+02:00"
    old_row = entry_from_record(record(json.dumps(old_data)))
    assert old_row.data["requested_start"] == "2016-04-01T00:00:00+02:00"  # old rows load as they were
    for existing in (new_row, old_row):
        decision = ag.decide(event, existing, now=NOW, message_id="2", book=BOOK)
        assert isinstance(decision, ag.Update) and decision.changed == ()


def test_a_date_only_dtm_with_an_offset_round_trips_with_its_offset():
    value = convert.dtm("20160428+0000")
    stored = json.loads(to_json({"requested_end": value}))
    assert stored["requested_end"] == "2016-04-28+00:00"
    loaded = entry_from_record(record(to_json({"requested_end": value}))).data["requested_end"]
    assert loaded == value and loaded.hl7 == "20160428+0000"


def test_a_full_time_and_a_date_are_stored_as_before():
    """Guards the fix: only a dtm sent without a time of day is stored differently."""
    data = {"booked_start": convert.dtm("20261025023000+0100"), "patient.birth_date": convert.date("198006"),
            "document_date": convert.dtm("20160428") + dt.timedelta(hours=1)}
    stored = json.loads(to_json(data))
    assert stored == {"booked_start": "2026-10-25T02:30:00+01:00", "patient.birth_date": "1980-06",
                      "document_date": "2016-04-28T01:00:00+02:00"}
    assert entry_from_record(record(to_json(data))).data == stored


# ---------------------------------------------------------------------------------------
# B. live review of the mapping language


ORU = load_sample("zorgdomein/zd_oru_r01_attachments.hl7")


def test_a_required_first_field_that_is_missing_is_answered_with_the_first_paths_location(tmp_path):
    """A required `first:` field with nothing in any option (here a BSN read from PID-3, else
    PID-2): the error's path listed the options as `PID-3[4=NLMINBIZA].1 | PID-2`, which the
    on-map NAK could not read, so its ERR named no segment or field. Before: `location` None."""
    from engine.mapping import load_mappings
    from engine.shell.processor import _mapping_rejection

    (tmp_path / "srm.yaml").write_text(
        "name: srm\ntypes: [SRM^S01]\nevent:\n  kind: {value: appointment-request}\n  action: {value: create}\n"
        "  patient.bsn:\n    first:\n      - {from: 'PID-3[4=NLMINBIZA].1', convert: bsn}\n"
        "      - {from: PID-2, convert: bsn}\n    required: true\n")
    mapping = load_mappings(tmp_path).for_type("SRM^S01")
    result = mapping.apply(Message.parse(SRM, codec="latin-1"))  # the sample's PID-3 BSN is empty
    (error,) = result.errors
    assert (error.field, error.reason, error.line) == ("patient.bsn", "missing (required)", 7)
    assert error.path == "PID-3[4=NLMINBIZA].1, PID-2"
    rejection = _mapping_rejection(result.errors)
    assert rejection.location is not None
    assert (rejection.location.segment, rejection.location.field) == ("PID", 3)


ORM_ECHO = load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7")


def order_mapping(tmp_path, item: str):
    """A mapping of ORM^O01 with one list field, `tests`: per ORC group, the ``item`` specs
    (YAML at the item's indentation)."""
    from engine.mapping import load_mappings

    (tmp_path / "orm.yaml").write_text("""
name: orm
types: [ORM^O01]
event:
  kind: {value: diagnostic-order}
  action: {value: create}
  tests:
    for_each: {anchor: ORC, members: [OBR, NTE, OBX]}
    item:
""" + item)
    return load_mappings(tmp_path).for_type("ORM^O01")


def test_a_group_inside_a_for_each_item_reads_from_that_items_segments(tmp_path):
    """Per order (ORC group), the OBX whose code is REDE: a `group:` spec inside a `for_each`
    item found no group at all (groups were looked for only in a whole message), so the value
    was silently absent. Before: the first test had no `reason`."""
    mapping = order_mapping(tmp_path, """\
      code: {from: OBR-4.1}
      reason:
        group: {anchor: OBX, members: [NTE], where: {"OBX-3.1": REDE}}
        from: OBX-5
""")
    result = mapping.apply(Message.parse(ORM_ECHO, codec="latin-1"))
    assert result.errors == ()
    first_test, tijd = result.event.fields["tests"]
    assert first_test["code"] == "ECHOXU"
    assert first_test["reason"].startswith("perimenopauzaal frequent vaginaal BV\naanw voor myomen?")
    assert tijd == {"code": "TIJD"}  # the TIJD order has no OBX: nothing, and no other order's


def test_an_error_in_the_second_for_each_item_names_that_items_segment_in_the_nak(tmp_path):
    """The second order's OBR-7 is not a time: the on-map NAK's ERR named OBR occurrence 1 (the
    first order, which is fine) because the item's path read `OBR-7`. Before: sequence 1 and
    path `OBR-7`."""
    from engine.shell.processor import _mapping_rejection

    mapping = order_mapping(tmp_path, """\
      code: {from: OBR-4.1, required: true}
      observed: {from: OBR-7, convert: dtm}
      reason:
        group: {anchor: OBX, members: [NTE], where: {"OBX-3.1": REDE}}
        from: OBX-5
        convert: dtm
""")
    raw = ORM_ECHO.replace(b"OBR|2|ZP100120391||TIJD^TIJD^99zdl||||", b"OBR|2|ZP100120391||TIJD^TIJD^99zdl|||gisteren|")
    result = mapping.apply(Message.parse(raw, codec="latin-1"))
    by_field = {error.field: error.path for error in result.errors}
    assert by_field["tests[2].observed"] == "OBR[2]-7"
    assert by_field["tests[1].reason"] == "OBX[1]-5"  # the first order's REDE: not a time either
    second = _mapping_rejection([e for e in result.errors if e.field == "tests[2].observed"])
    assert (second.location.segment, second.location.sequence, second.location.field) == ("OBR", 2, 7)
