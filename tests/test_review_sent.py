"""Review of 3bd241a and 5712bbe: Koppel keeps, per entry, what each destination last had
(`_sent`), and the S15 `when` reads it as `entry.last_sent`. The failing tests name a bug; the
rest pin behaviour verified correct (batches, re-plans, releases, reprocess, legacy entries,
the stored form). Real SQLite store, the bundled mappings. Synthetic data only (test BSN
900073962, made-up names)."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer

from engine.core import agenda as ag
from engine.core.header import read_header
from engine.shell.processor import Work, entry_from_record, to_json
from engine.store import StoreError
from tests.test_agenda_orderings import Harness, oru, siu, srm, world  # noqa: F401 - the fixture
from tests.test_s15_when_the_his_knows import MAKE, forget_sent, oml, orm, ref, stored_data, to_his

STEPS = {**MAKE, "HIS-S15": lambda: siu("S15"), "OML": oml, "OML-CA": lambda: oml("CA")}


def batch(h: Harness, *names: str) -> list[int]:
    """The messages ``names`` planned in ONE batch (one _BatchView), then committed."""
    works = [h.append(STEPS[name]()) for name in names]
    for work in works:
        h.processor.submit(work)
    h.settle()
    return [work.message_id for work in works]


# --------------------------------------------------------------------------------------------
# Bug: the HIS's own cancellation is taken for one the HIS was not told of


@pytest.mark.parametrize("order", [
    ("NW", "SRM", "BOOK", "HIS-S15", "CA"),   # the order's CA after the HIS cancelled its booking
    ("NW", "SRM", "HIS-S15", "CA"),           # ... the HIS cancelled the request before booking it
    ("SRM", "BOOK", "HIS-S15", "I14"),        # another sender's REF^I14 after the HIS's cancel
    ("SRM", "HIS-S15", "I14"),
    ("OML", "SRM", "BOOK", "HIS-S15", "OML-CA"),
], ids="-".join)
def test_the_his_gets_no_s15_for_a_cancellation_it_made_itself(world, order):  # noqa: F811
    """The HIS had Koppel's SIU^S12, then cancelled the appointment itself (its own SIU^S15
    from the scheduler closes the entry). A later cancel from another sender (the order's
    ORC-1 CA, a REF^I14) is a second cancel (agenda._cancel_again, previous_state
    'cancelled') that adds values, so it is a change and its mapping's outbound is built; the
    first alternative of the S15 `when` in zorgdomein-srm/-orm/-oml.yaml and ref.yaml,
    ``{action: cancel, entry.state: cancelled, entry.last_sent: SIU^S12}``, has no
    previous_state and reads `_sent`, which only records what Koppel sent: the scheduler's own
    SIU^S15 leaves `his-scheduling: SIU^S12` there. So the HIS is sent an SIU^S15 for an
    appointment it cancelled itself. Before 3bd241a (previous_state rule) it got none: a
    regression. README: "a booking or cancel the scheduler made is known to the HIS already";
    "the HIS an SIU^S15 when a cancel ... closes a referral the HIS knows of and was not told
    of yet". Expected: the HIS gets only the request's SIU^S12."""
    h = world("-".join(order))
    for name in order:
        h.receive(STEPS[name]())
    assert h.entry().state == "cancelled"
    assert to_his(h) == ["SIU^S12"]


# --------------------------------------------------------------------------------------------
# Pins: `_sent` through batches, re-plans, releases, reprocess and the store


@pytest.mark.parametrize("names", [
    ("SRM", "S04"), ("NW", "SRM", "S04"), ("I12", "SRM", "I14"), ("ORU", "S04", "SRM"),
    ("SRM", "S04", "S04"), ("NW", "CA", "SRM"), ("I12", "S04", "SRM"),
], ids="-".join)
def test_a_batch_carries_what_was_sent_from_one_message_to_the_next_as_one_by_one(world, names):  # noqa: F811
    """Several messages of one entry planned against one _BatchView end as they do one by
    one: the second message's `when` sees the first's `_sent` (the view's entry, not the
    store's), and the stored `_sent` is the last plan's."""
    alone = world("alone")
    for name in names:
        alone.receive(STEPS[name]())
    together = world("together")
    ids = batch(together, *names)
    assert to_his(together) == to_his(alone)
    assert stored_data(together)[ag.SENT] == stored_data(alone)[ag.SENT]
    assert [together.outcome(i)[0] for i in ids] == ["mapped"] * len(names)


def test_a_batch_request_then_cancel_tells_the_his_once_in_order(world):  # noqa: F811
    h = world("srm-s04")
    batch(h, "SRM", "S04", "S04")  # the S04 twice: a re-delivery in the same batch is a no-op
    assert to_his(h) == ["SIU^S12", "SIU^S15"]
    assert stored_data(h)[ag.SENT] == {"his-scheduling": "SIU^S15"}


def test_a_failed_batch_commit_planned_again_one_by_one_keeps_what_was_sent(world):  # noqa: F811
    """_commit_batch fails once (the store refused the commit): _commit_one plans each message
    again from the store, with a new view; nothing of the failed plan's `_sent` leaks."""
    h = world("replan")
    submit_many, calls = h.committer.submit_many, []

    def failing_once(ops, **kw):
        calls.append(len(ops))
        return defer.fail(StoreError("disk full")) if len(calls) == 1 else submit_many(ops, **kw)

    h.committer.submit_many = failing_once
    ids = batch(h, "ORU", "S04", "SRM")
    for _ in range(5):
        h.reactor.advance(1)
        h.settle()
    assert len(calls) > 1
    assert [h.outcome(i)[0] for i in ids] == ["mapped"] * 3
    assert to_his(h) == ["SIU^S12", "SIU^S15"]
    assert stored_data(h)[ag.SENT] == {"his-scheduling": "SIU^S15", "document-archive": "MDM^T02"}


def test_held_events_released_in_a_later_batch_leave_the_final_sent_in_the_last_save(world):  # noqa: F811
    """The letter and the S04 wait; the SRM (next batch) releases them: S12, then the MDM,
    then the S15, and the stored `_sent` (the last released save, patched by _resave) names
    both destinations' last message."""
    h = world("later")
    batch(h, "ORU", "S04")
    batch(h, "SRM")
    assert to_his(h) == ["SIU^S12", "SIU^S15"]
    assert stored_data(h)[ag.SENT] == {"his-scheduling": "SIU^S15", "document-archive": "MDM^T02"}
    h.receive(STEPS["CA"]())  # a later cancel of another kind: nothing more to the HIS
    assert to_his(h) == ["SIU^S12", "SIU^S15"]


def test_an_order_entry_taken_over_by_its_request_keeps_what_the_ris_had(world):  # noqa: F811
    """Cross-family create (ORM entry, then the SRM: _with_history replayed in decide): the
    entry's `_sent` survives, in one batch as one by one."""
    for name, run in (("apart", lambda h: [h.receive(STEPS[n]()) for n in ("NW", "BOOK", "SRM", "S04")]),
                      ("batch", lambda h: batch(h, "NW", "BOOK", "SRM", "S04"))):
        h = world(name)
        run(h)
        assert h.entry().state == "cancelled"
        assert to_his(h) == ["SIU^S15"]  # the HIS booked it (no S12): told of the cancel once
        assert stored_data(h)[ag.SENT] == {"ris-orders": "ORM^O01", "his-scheduling": "SIU^S15"}


def test_a_reprocessed_cancel_reaches_the_his_once(world):  # noqa: F811
    """README: a cancel refused before its request came is mapped by `koppel reprocess` once
    the request has come, and the HIS then gets the SIU^S15 (last_sent SIU^S12); mapping it
    once more changes nothing and sends nothing."""
    h = world("reprocess")
    cancel = h.receive(srm("S04", control_id="cancel"))
    assert h.outcome(cancel)[0] == "error"
    h.receive(srm())
    raw = srm("S04", control_id="cancel")
    for _ in range(2):
        h.processor.submit(Work(message_id=cancel, channel="zorgdomein-in", mapping="zorgdomein-srm", raw=raw,
                                codec=read_header(raw, default_charset="8859/1").codec, late=True))
        h.settle()
        assert h.outcome(cancel)[0] == "mapped"
        assert to_his(h) == ["SIU^S12", "SIU^S15"]


def test_an_entry_stored_before_sent_was_kept_gets_the_legacy_rule_in_a_batch_too(world):  # noqa: F811
    """A legacy (no `_sent`) requested entry: the ORM's message to the RIS is recorded next to
    `"*": "unknown"`, and the S04 in the same batch still reads the HIS's as unknown."""
    h = world("legacy-batch")
    h.receive(srm())
    forget_sent(h)
    batch(h, "NW", "S04")
    assert to_his(h) == ["SIU^S12", "SIU^S15"]
    assert stored_data(h)[ag.SENT] == {"*": "unknown", "ris-orders": "ORM^O01", "his-scheduling": "SIU^S15"}


def test_sent_round_trips_through_the_store_as_stored(world):  # noqa: F811
    h = world("round-trip")
    h.receive(orm())
    h.receive(srm())
    record = h.entry()
    entry = entry_from_record(record)
    assert dict(entry.data[ag.SENT]) == {"ris-orders": "ORM^O01", "his-scheduling": "SIU^S12"}
    assert json.loads(to_json(entry.data)) == json.loads(record.data)


def test_a_request_is_still_one_save_and_a_released_letter_no_extra_one(world):  # noqa: F811
    """5712bbe: `_sent` rides in saves the plan makes anyway (one per change), also when
    held events were released (the last released save is patched, not a second write)."""
    from tests.test_s15_when_the_his_knows import saves_while

    h = world("saves")
    h.receive(oru())
    saves = saves_while(h, srm())
    assert [s.action for s in saves] == ["create", "release"]
    assert json.loads(saves[-1].data)[ag.SENT] == {"his-scheduling": "SIU^S12", "document-archive": "MDM^T02"}
