"""The store's agenda tables: entries by correlation key, history, attachments, held events."""

import hashlib

import pytest

from engine.store import (
    HoldEvent,
    PutAttachment,
    ReleaseHeld,
    SaveAgendaEntry,
    SetProcessing,
    StoreError,
    open_store,
)
from engine.store import Append
from tests.factories import received


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/k.db")
    yield s
    s.close()


def save(store, entry_id=None, state="requested", keys=("zd:ZD900000017",), action="create", from_state=None, **kw):
    op = SaveAgendaEntry(
        entry_id=entry_id, agenda_id=kw.get("agenda_id", "cardio"), kind="appointment-request", state=state,
        zd_number="ZD900000017", placer_id=None, filler_id=None, data=kw.get("data", "{}"),
        attachments=kw.get("attachments", ()), keys=keys, at=kw.get("at", 100.0), message_id=kw.get("message_id"),
        action=action, from_state=from_state, changed=kw.get("changed", ()),
    )
    return store.write([op])[0]


def test_an_entry_is_found_by_any_of_its_correlation_keys(store):
    entry_id = save(store, keys=("zd:ZD900000017", "placer:P1"))
    assert store.find_agenda_entry(["filler:F9", "placer:P1"]).id == entry_id
    assert store.find_agenda_entry(["zd:ZD900000017"]).state == "requested"
    assert store.find_agenda_entry(["zd:ZD000000000"]) is None


def test_updating_an_entry_keeps_one_row_and_adds_history(store):
    entry_id = save(store)
    again = save(store, entry_id=entry_id, state="booked", action="book", from_state="requested",
                 keys=("filler:F1",), changed=("booked_start",), at=200.0)
    assert again == entry_id
    assert store.find_agenda_entry(["filler:F1"]).state == "booked"
    history = store.agenda_history(entry_id)
    assert [(h.action, h.from_state, h.to_state) for h in history] == [
        ("create", None, "requested"), ("book", "requested", "booked")]
    assert history[1].changed == ("booked_start",)
    assert [e.id for e in store.list_agenda_entries(state="booked")] == [entry_id]
    assert store.list_agenda_entries(state="requested") == []


def test_updating_an_unknown_entry_fails_the_whole_transaction(store):
    with pytest.raises(StoreError):
        save(store, entry_id=999)
    assert store.list_agenda_entries() == []


def test_an_attachment_is_stored_once_by_hash(store):
    data = b"%PDF-1.4 synthetic"
    digest = hashlib.sha256(data).hexdigest()
    first, second = store.write([
        PutAttachment(sha256=digest, media_type="application/pdf", filename="brief.pdf", data=data),
        PutAttachment(sha256=digest, media_type="application/pdf", filename="brief.pdf", data=data),
    ])
    assert (first, second) == (True, False)
    assert store.get_attachment(digest).data == data
    entry_id = save(store, attachments=(digest,))
    assert store.get_agenda_entry(entry_id).attachments == (digest,)


def test_held_events_come_back_in_arrival_order_until_released(store):
    a = store.write([HoldEvent(keys=("zd:ZD1",), message_id=1, event='{"n": 1}', at=1.0)])[0]
    b = store.write([HoldEvent(keys=("zd:ZD1", "placer:X"), message_id=2, event='{"n": 2}', at=2.0)])[0]
    store.write([HoldEvent(keys=("zd:ZD2",), message_id=3, event='{"n": 3}', at=3.0)])
    held = store.held_events(["zd:ZD1"])
    assert [h.id for h in held] == [a, b]
    assert held[1].keys == ("zd:ZD1", "placer:X")
    assert store.write([ReleaseHeld(ids=(a, b), at=4.0)]) == [2]
    assert store.held_events(["zd:ZD1", "placer:X"]) == []
    assert [h.message_id for h in store.held_events(["zd:ZD2"])] == [3]


def test_processing_outcomes_are_counted_and_listed(store):
    ids = [r.message_id for r in store.write([Append(message=received(f"C{i}")) for i in range(3)])]
    store.write([SetProcessing(message_id=ids[0], outcome="mapped"),
                 SetProcessing(message_id=ids[1], outcome="error", detail="mappings/x.yaml:3: PID-3: required")])
    assert store.processing_counts() == {"mapped": 1, "error": 1}
    rows = {r.id: r for r in store.list_messages()}
    assert rows[ids[1]].processing == "error"
    assert rows[ids[1]].processing_detail.startswith("mappings/x.yaml:3")
    assert rows[ids[2]].processing is None


def test_a_released_held_event_keeps_no_copy_of_the_letter_or_the_patient(store):
    """Held, the event is kept whole (its letter's base64 with it); released, the entry and the
    attachment have it, so the row keeps nothing of it until the retention removes it."""
    letter = '{"fields": {"attachments": [{"data": "' + "QUJD" * 1000 + '"}], "patient.bsn": "123456782"}}'
    (held,) = store.write([HoldEvent(keys=("zd:ZD1",), message_id=1, event=letter, at=1.0)])
    assert store.held_events(["zd:ZD1"])[0].event == letter
    store.write([ReleaseHeld(ids=(held,), at=2.0)])
    assert store._query("SELECT event, released_at FROM held_events WHERE id = ?", (held,)) == [("{}", 2.0)]
