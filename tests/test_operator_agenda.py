"""koppel agenda list / show read agenda entries from the store."""

import hashlib
import json

import pytest

from engine.cli import main
from engine.store import PutAttachment, SaveAgendaEntry, open_store


@pytest.fixture
def store_url(tmp_path):
    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    pdf = b"%PDF-1.4 synthetic letter"
    digest = hashlib.sha256(pdf).hexdigest()
    store.write([PutAttachment(sha256=digest, media_type="application/pdf", filename="verwijsbrief.pdf", data=pdf)])
    first = store.write([SaveAgendaEntry(
        entry_id=None, agenda_id="cardio-poli", kind="appointment-request", state="requested",
        zd_number="ZD900000017", placer_id="ZD900000017", filler_id=None,
        data=json.dumps({"patient.bsn": "123456782", "care_product": {"code": "CARREG001"}}),
        attachments=(digest,), keys=("zd:ZD900000017",), at=1795430000.0, message_id=7, action="create",
        from_state=None, changed=("patient.bsn", "care_product"))])[0]
    store.write([SaveAgendaEntry(
        entry_id=first, agenda_id="cardio-poli", kind="appointment-request", state="booked",
        zd_number="ZD900000017", placer_id="ZD900000017", filler_id="F1",
        data=json.dumps({"patient.bsn": "123456782", "_sources": {"patient.bsn": 0}}), attachments=(digest,),
        keys=("filler:F1",),
        at=1795430100.0, message_id=9, action="book", from_state="requested", changed=("booked_start",))])
    store.write([SaveAgendaEntry(
        entry_id=None, agenda_id="lab", kind="diagnostic-order", state="ordered", zd_number="ZD900000025",
        placer_id=None, filler_id=None, data="{}", attachments=(), keys=("zd:ZD900000025",), at=1795430200.0,
        message_id=11, action="create", from_state=None)])
    store.close()
    return url


def test_agenda_list_filters_by_agenda_and_state_without_patient_fields(store_url, capsys):
    assert main(["agenda", "list", "--store", store_url, "--agenda", "cardio-poli"]) == 0
    out = capsys.readouterr().out
    assert "ZD900000017" in out and "booked" in out
    assert "ZD900000025" not in out
    assert "123456782" not in out
    assert main(["agenda", "list", "--store", store_url, "--state", "ordered", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["agenda"], r["zd_number"]) for r in rows] == [("lab", "ZD900000025")]


def test_agenda_show_by_zd_number_gives_history_and_attachments(store_url, capsys):
    assert main(["agenda", "show", "ZD900000017", "--store", store_url, "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["state"] == "booked"
    assert [(h["action"], h["from"], h["to"], h["message_id"]) for h in entry["history"]] == [
        ("create", None, "requested", 7), ("book", "requested", "booked", 9)]
    assert entry["attachments"][0]["filename"] == "verwijsbrief.pdf"
    assert main(["agenda", "show", "F1", "--store", store_url]) == 0
    assert "history:" in capsys.readouterr().out


def test_agenda_show_of_an_unknown_entry_exits_1(store_url, capsys):
    assert main(["agenda", "show", "ZD000000000", "--store", store_url]) == 1
    assert "no agenda entry" in capsys.readouterr().err


def test_agenda_show_prints_the_patients_fields_only_with_data(store_url, capsys):
    for extra in ([], ["--json"]):
        assert main(["agenda", "show", "ZD900000017", "--store", store_url, *extra]) == 0
        out = capsys.readouterr().out
        assert "123456782" not in out and "patient.bsn" in out and "--data shows it" in out
    from engine.store import open_store

    with open_store(store_url) as store:
        assert store.list_audit() == []  # without --data nothing patient-identifying was shown
    assert main(["agenda", "show", "ZD900000017", "--store", store_url, "--json", "--data"]) == 0
    shown = json.loads(capsys.readouterr().out)["data"]
    assert shown["patient.bsn"] == "123456782"
    assert "_sources" not in shown  # the engine's bookkeeping of who set each field is not shown
    with open_store(store_url) as store:
        (record,) = store.list_audit()  # who read a patient's fields, whatever the log level
    assert record.action == "read-agenda-data" and "koppel CLI, user " in record.reason


def test_agenda_show_gives_a_window_sent_without_a_time_of_day_at_the_precision_sent(tmp_path, capsys):
    """Before: `requested_start: 2016-04-01T00:00:00+02:00`, a time nobody sent."""
    from engine.core.convert import dtm
    from engine.shell.processor import to_json

    url = f"sqlite:///{tmp_path}/k.db"
    with open_store(url) as store:
        store.write([SaveAgendaEntry(
            entry_id=None, agenda_id="cardio-poli", kind="appointment-request", state="requested",
            zd_number="ZD900000033", placer_id=None, filler_id=None,
            data=to_json({"requested_start": dtm("201604"), "requested_end": dtm("20160528"),
                          "booked_start": dtm("20261025023000+0100")}),
            attachments=(), keys=("zd:ZD900000033",), at=1795430000.0, message_id=7, action="create",
            from_state=None)])
    assert main(["agenda", "show", "ZD900000033", "--store", url]) == 0
    text = capsys.readouterr().out
    assert "requested_start: 2016-04\n" in text and "requested_end: 2016-05-28\n" in text
    assert "booked_start: 2026-10-25T02:30:00+01:00" in text
    assert "_day_times" not in text
    assert main(["agenda", "show", "ZD900000033", "--store", url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert (data["requested_start"], data["requested_end"]) == ("2016-04", "2016-05-28")
    assert "_day_times" not in data


MAPPINGS = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "mappings")


def test_agenda_list_of_a_mistyped_agenda_says_so_rather_than_no_entries(store_url, capsys):
    """From the operator drill: `--agenda cardiolgy` answered "no agenda entries", exit 0."""
    assert main(["agenda", "list", "--store", store_url, "--agenda", "cardiolgy", "--mappings", MAPPINGS]) == 1
    captured = capsys.readouterr()
    assert "no agenda 'cardiolgy'" in captured.err and "cardiology" in captured.err, captured
    assert "no agenda entries" not in captured.out
    # an agenda of the file that has no entries yet: none, and that is all
    assert main(["agenda", "list", "--store", store_url, "--agenda", "gynaecology", "--mappings", MAPPINGS]) == 0
    assert capsys.readouterr().out.strip() == "no agenda entries"
    # an agenda since taken out of the file still lists what is stored under it
    assert main(["agenda", "list", "--store", store_url, "--agenda", "cardio-poli", "--mappings", MAPPINGS]) == 0
    assert "ZD900000017" in capsys.readouterr().out
