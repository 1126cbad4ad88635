"""`koppel held drop` racing the processor's release of the same held event: the store refuses
a ReleaseHeld of an event no longer held (HeldGone), so nothing of the plan commits, and the
processor plans the batch again from the store; bounded, and nothing acknowledged is lost.
Real SQLite store, the bundled mappings, MemoryReactorClock. Synthetic data only."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from engine.shell import processor as processor_module
from engine.store import (
    DropHeld,
    HeldGone,
    HoldEvent,
    ReleaseHeld,
    SaveAgendaEntry,
    SetProcessing,
    StoreError,
)
from engine.store import Append
from tests.factories import received
from tests.test_agenda_orderings import Harness, oru, siu, srm, world  # noqa: F401 - the fixture
from tests.test_store_agenda import save, store  # noqa: F401 - the fixture


def held_messages(store, n):
    ids = [r.message_id for r in store.write([Append(message=received(f"H{i}")) for i in range(n)])]
    store.write([SetProcessing(message_id=i, outcome="held") for i in ids])
    held = [store.write([HoldEvent(keys=("zd:ZD900000017",), message_id=i, event="{}", at=1.0)])[0] for i in ids]
    return ids, held


# --------------------------------------------------------------------------------------------
# the store


def test_a_release_naming_a_dropped_event_fails_and_commits_nothing_of_its_write(store):
    (kept_msg, dropped_msg), (kept, dropped) = held_messages(store, 2)
    assert store.write([DropHeld(message_ids=(dropped_msg,), reason="r", at=2.0)]) == [(dropped_msg,)]
    with pytest.raises(HeldGone) as raised:
        store.write([
            SetProcessing(message_id=kept_msg, outcome="mapped"),
            SetProcessing(message_id=dropped_msg, outcome="mapped"),
            ReleaseHeld(ids=(kept, dropped), at=3.0),
        ])
    assert isinstance(raised.value, StoreError) and raised.value.ids == (dropped,)
    assert [h.id for h in store.held_events(["zd:ZD900000017"])] == [kept]  # still held
    outcomes = {m.id: (m.processing, m.processing_detail) for m in store.list_messages()}
    assert outcomes[kept_msg] == ("held", None)
    assert outcomes[dropped_msg][0] == "error"  # the drop stands
    assert store.write([ReleaseHeld(ids=(kept,), at=4.0)]) == [1]


def test_a_release_of_an_event_already_released_or_pruned_fails_too(store):
    _, (a, b) = held_messages(store, 2)
    assert store.write([ReleaseHeld(ids=(a,), at=2.0)]) == [1]
    with pytest.raises(HeldGone):
        store.write([ReleaseHeld(ids=(a, b), at=3.0)])
    with pytest.raises(HeldGone) as raised:  # gone altogether (pruned after its drop)
        store.write([ReleaseHeld(ids=(b, 10_000), at=3.0)])
    assert raised.value.ids == (10_000,)
    entry_id = save(store)
    with pytest.raises(HeldGone):  # an entry change in the same write is not kept either
        store.write([entry_op(entry_id, "booked"), ReleaseHeld(ids=(a,), at=4.0)])
    assert store.get_agenda_entry(entry_id).state == "requested"
    assert [x.action for x in store.agenda_history(entry_id)] == ["create"]
    assert store.write([ReleaseHeld(ids=(b,), at=5.0)]) == [1]


def entry_op(entry_id, state):
    return SaveAgendaEntry(
        entry_id=entry_id, agenda_id="cardio", kind="appointment-request", state=state, zd_number="ZD900000017",
        placer_id=None, filler_id=None, data="{}", attachments=(), keys=("zd:ZD900000017",), at=4.0,
        message_id=None, action="book", from_state="requested", changed=("state",))


# --------------------------------------------------------------------------------------------
# the processor


def drop_before_commit(h: Harness, message_ids):
    """Drop ``message_ids`` from "another process" between the processor's next plan and its commit."""
    submit_many, dropped = h.committer.submit_many, []

    def between(ops, **kw):
        if not dropped:
            dropped.extend(h.store.write([DropHeld(message_ids=tuple(message_ids), reason="r",
                                                   at=h.reactor.seconds())]))
        return submit_many(ops, **kw)

    h.committer.submit_many = between
    return dropped


def test_a_drop_racing_a_batch_fails_only_that_plan_and_the_whole_batch_is_planned_again(world):
    """The request and a booking in one batch, the letter held for the request dropped
    meanwhile: both are mapped on the second plan, the letter stays given up."""
    h = world("batch")
    booking_first = h.receive(siu("S12"))  # held too: released with the request, not dropped
    letter = h.receive(oru())
    dropped = drop_before_commit(h, [letter])
    request, reschedule = h.append(srm()), h.append(siu("S13", start="20261217140000+0100"))
    outcomes = [h.processor.submit(request), h.processor.submit(reschedule)]
    h.settle()
    assert dropped == [(letter,)]
    assert [d.result.status for d in outcomes] == ["mapped", "mapped"]
    assert [h.outcome(i)[0] for i in (booking_first, letter, request.message_id, reschedule.message_id)] == [
        "mapped", "error", "mapped", "mapped"]
    entry = h.entry()
    assert (entry.state, entry.attachments) == ("rescheduled", ())
    assert h.sent("MDM^T02") == [] and h.store.held_backlog()[0] == 0
    assert h.count("ok", "zorgdomein-srm") == 1  # counted once, though planned twice
    assert not h.processor.handling(request.message_id)


def test_a_release_the_store_keeps_refusing_ends_after_bounded_tries_with_the_message_in_error(world):
    """A bug that made every release fail must not loop: HELD_REPLANS plans at once, then the
    store retries; then the request is recorded 'error' (`koppel reprocess` can take it)."""
    h = world("bound")
    h.receive(oru())
    submit_many, calls = h.committer.submit_many, []

    def refusing(ops, **kw):
        calls.append(len(ops))
        if any(isinstance(op, ReleaseHeld) for op in ops):
            return defer.fail(HeldGone((1,)))
        return submit_many(ops, **kw)

    h.committer.submit_many = refusing
    request = h.receive(srm())
    for _ in range(processor_module.STORE_ATTEMPTS):
        h.reactor.advance(processor_module.STORE_RETRY_MAX)
        h.settle()
    assert len(calls) == 1 + processor_module.HELD_REPLANS + processor_module.STORE_ATTEMPTS
    assert h.outcome(request) == ("error", "internal error while mapping")
    assert not h.processor.handling(request)
