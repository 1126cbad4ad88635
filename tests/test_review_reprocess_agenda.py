"""Found in a live review of `koppel reprocess` and the agenda's arrival orders. The overtaken
S13, the interrupted `--channel` message and the page-at-a-time resume failed before their
fixes; the others pin what those fixes must leave working (a later message of another kind, or
the booking a change follows, does not stop a reprocess; a processor that never answers does
not stop the resume). Real SQLite store, bundled channels and mappings, the engine on a
``MemoryReactorClock``.

Synthetic data only: BSN 900073962 (the ZorgDomein samples', passes the 11-proof), made-up ids.
"""

from __future__ import annotations

import json

from engine import operator
from engine.shell.engine import RESUME_INTERVAL
from engine.store import SetProcessing, write_one
from tests.test_agenda_orderings import siu, srm
from tests.test_reprocess import koppel, world  # noqa: F401 - world: the fixture
from tests.test_resume_mapping import stored_pending

S13_SLOT, S14_SLOT = "20261217140000+0100", "20261224080000+0100"


def turns(engine, n: int = 20, step: float = 0.0) -> None:
    for _ in range(n):
        engine.reactor.advance(step)


def booked_start(world) -> str:
    (entry,) = world.store.list_agenda_entries()
    return json.loads(entry.data)["booked_start"]


def test_a_reprocessed_change_a_later_one_of_its_kind_overtook_is_refused_not_applied_over_it(world):
    """The scheduler's S13 (17 Dec) failed to map; its S14 (24 Dec), sent after it, was mapped.
    Reprocessed, the older S13 was applied last, and "among equals, the latest" put the stale
    slot back over the S14's (the entry said 17 Dec, the scheduler 24 Dec)."""
    stored_pending(world.store, srm())
    stored_pending(world.store, siu("S12"), channel="scheduler-in")
    older = stored_pending(world.store, siu("S13", start=S13_SLOT), channel="scheduler-in")
    write_one(world.store, SetProcessing(message_id=older, outcome="error", detail="AIL-3: table value missing"))
    newer = stored_pending(world.store, siu("S14", start=S14_SLOT), channel="scheduler-in")
    engine = world.start()
    assert world.processing(newer) == "mapped" and booked_start(world) == "2026-12-24T08:00:00+01:00"

    turns(engine, 1, 1_700_000_100)  # the clock past the messages' arrival
    assert koppel(world, str(older)) == 0
    turns(engine, 4, RESUME_INTERVAL / 2)
    assert booked_start(world) == "2026-12-24T08:00:00+01:00"  # the S14's, which came after it
    (detail,) = world.store._query("SELECT processing_detail FROM messages WHERE id = ?", (older,))[0]
    assert world.processing(older) == "error" and f"message {newer} of the same kind" in detail


def test_a_reprocessed_request_still_applies_after_the_schedulers_later_booking(world):
    """Not every later message overtakes it: the SRM that failed, mapped after the scheduler's
    S12 (another kind), becomes the request as a late SRM does (the kinds' ranks decide)."""
    request = stored_pending(world.store, srm())
    write_one(world.store, SetProcessing(message_id=request, outcome="error", detail="ARQ-7: table value missing"))
    stored_pending(world.store, siu("S12"), channel="scheduler-in")
    engine = world.start()
    turns(engine, 1, 1_700_000_100)
    assert koppel(world, str(request)) == 0
    turns(engine, 4, RESUME_INTERVAL / 2)
    assert world.processing(request) == "mapped"
    (entry,) = world.store.list_agenda_entries()
    assert (entry.kind, entry.state) == ("appointment-request", "booked")


def test_a_reprocessed_reschedule_still_applies_after_the_booking_that_came_after_it(world):
    """The S13 carrying only the scheduler's id, before its S12: refused ("no entry for this
    filler id"). Reprocessed after the S12, it is the change of that booking, as it would have
    been in the scheduler's order: a later booking does not overtake it."""
    stored_pending(world.store, srm())
    alone = siu("S13", start=S13_SLOT).replace(b"SCH|ZD200046119|", b"SCH||")
    early = stored_pending(world.store, alone, channel="scheduler-in")
    stored_pending(world.store, siu("S12"), channel="scheduler-in")
    engine = world.start()
    assert world.processing(early) == "error"
    turns(engine, 1, 1_700_000_100)
    assert koppel(world, str(early)) == 0
    turns(engine, 4, RESUME_INTERVAL / 2)
    assert world.processing(early) == "mapped"
    assert booked_start(world) == "2026-12-17T14:00:00+01:00"


def test_a_channel_reprocess_interrupted_half_way_names_the_messages_it_handed_on_not_new_entries(
        world, capsys, monkeypatch):
    """`--channel` in steps, interrupted after the first: the failure said "(new entries 1..2)",
    as a replay names the queue entries it made; these are the ids of messages set pending."""
    from tests.test_reprocess import errored

    monkeypatch.setattr(operator, "STEP", 2)
    ids = [errored(world) for _ in range(5)]
    real, calls = operator._write, []

    def write(store, op):
        calls.append(op)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(store, op)

    monkeypatch.setattr(operator, "_write", write)
    assert koppel(world, "--channel", "zorgdomein-in") == 1
    err = capsys.readouterr().err
    assert f"were handed to mapping again ({ids[0]}, {ids[1]})" in err and "new entr" not in err
    assert "run the command again for the rest" in err
    monkeypatch.setattr(operator, "_write", real)
    assert koppel(world, "--channel", "zorgdomein-in") == 0  # the rest
    assert [world.processing(i) for i in ids] == ["pending"] * 5


def test_a_running_engine_maps_a_big_reprocess_a_page_at_a_time_not_all_bodies_at_once(world, capsys, monkeypatch):
    """`koppel reprocess --channel` of thousands (a day of letters, MBs each): the periodic
    resume read every pending body into memory and queued it all in one reactor turn (the
    listeners' ACKs waited behind the read). It hands on a page, the next when that is mapped."""
    from engine.shell import engine as engine_module
    from tests.test_reprocess import errored

    monkeypatch.setattr(engine_module, "RESUME_PAGE", 50)
    ids = [errored(world) for _ in range(180)]
    engine = world.start()
    turns(engine, 1, 1_700_000_100)
    assert koppel(world, "--channel", "zorgdomein-in") == 0
    in_flight: list[int] = []
    submit = engine.processor.submit

    def counting(work):
        d = submit(work)
        in_flight.append(len(engine.processor._handling))
        return d

    monkeypatch.setattr(engine.processor, "submit", counting)
    turns(engine, 1, RESUME_INTERVAL)
    turns(engine, 200)
    assert max(in_flight) <= 50
    assert [world.processing(i) for i in ids] == ["mapped"] * len(ids)


def test_a_page_the_processor_never_answers_ends_the_round_and_the_next_one_hands_it_on_again(
        world, capsys, monkeypatch):
    """The paged resume waits for each page; a processor that crashed never answers (its
    batch stays PENDING), so the wait ends after an interval and the next round resumes it."""
    from twisted.internet import defer

    from tests.test_reprocess import errored

    message_id = errored(world)
    engine = world.start()
    turns(engine, 1, 1_700_000_100)
    assert koppel(world, str(message_id)) == 0
    submitted = []

    def crashed(work):  # taken, never answered, and forgotten (as _crashed does)
        submitted.append(work.message_id)
        return defer.Deferred()

    monkeypatch.setattr(engine.processor, "submit", crashed)
    turns(engine, 2, RESUME_INTERVAL)
    assert submitted == [message_id]
    turns(engine, 3, RESUME_INTERVAL)
    assert submitted[:2] == [message_id, message_id]  # handed on again: the resume did not stop


def test_a_big_reprocess_made_while_the_engine_was_stopped_is_mapped_a_page_at_a_time_after_start(
        world, capsys, monkeypatch):
    """`koppel reprocess --channel` while the engine is stopped (the README allows it: "a stopped
    one at its next start"): the start's resume handed every pending message on at once, so a
    month of errored letters (MBs each) was read and held in memory together, an out-of-memory
    kill at every start. The paged resume takes them, from the start on, as it does while running."""
    from twisted.internet.testing import MemoryReactorClock

    from engine.bundle import load_bundle
    from engine.shell import engine as engine_module
    from engine.shell.engine import Engine
    from engine.shell.processor import Processor
    from tests.test_reprocess import errored
    from tests.test_resume_mapping import ROOT

    monkeypatch.setattr(engine_module, "RESUME_PAGE", 50)
    ids = [errored(world) for _ in range(180)]
    crashed = stored_pending(world.store, srm().replace(b"g20ce6a9f8ca4f551275", b"CRASHLEFT1"))  # an ACK, then kill -9
    assert koppel(world, "--channel", "zorgdomein-in") == 0  # nothing runs
    in_flight: list[int] = []
    order: list[int] = []
    submit = Processor.submit

    def counting(self, work):
        d = submit(self, work)
        in_flight.append(len(self._handling))
        order.append(work.message_id)
        return d

    monkeypatch.setattr(Processor, "submit", counting)
    bundle = load_bundle(world.channels, ROOT / "mappings")
    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_100)  # started after the messages arrived
    engine = world.engine = Engine(reactor, bundle.config, world.store, retention=None,
                                   mappings=bundle.mappings, book=bundle.book)
    engine.startService()
    turns(engine, 200)
    assert max(in_flight) <= 1 + 50  # it, and one page of the reprocessed
    assert order[0] == crashed  # a hand-off a kill -9 interrupted: still first, before anything new
    assert [world.processing(i) for i in [*ids, crashed]] == ["mapped"] * (len(ids) + 1)
