"""Review of the held gauge, `koppel held drop` and the SRM mapping's SIU^S15: the held drop
against the processor, several events held for one entry, pruning after a drop, the gauge in
a split engine, and the S15 for every arrival order of request, letter, booking and cancel.
Real SQLite store, the bundled channels and mappings, MemoryReactorClock. Synthetic data only
(test BSN 900073962, which passes the 11-proof)."""

from __future__ import annotations

import itertools
import json

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from twisted.internet.testing import MemoryReactorClock

from engine import operator
from engine.bundle import load_bundle
from engine.cli import main
from engine.core.header import read_header
from engine.core.hl7message import Message
from engine.core.paths import first, parse_path
from engine.metrics import Metrics
from engine.shell.engine import Engine
from engine.store import DropHeld, Prune
from tests.test_agenda_orderings import REPO, Harness, oru, siu, srm, world  # noqa: F401 - the fixture
from tests.test_held_gauge import gauges

DAY = 86_400.0


def koppel(harness: Harness, *args: str) -> int:
    return main([*args, "--store", f"sqlite:///{harness.path}/k.db"])


def built(harness: Harness, message_type: str) -> list[tuple[int, bytes]]:
    """(origin, bytes) of what Koppel built of this type, in id order."""
    return [(m.origin_id, harness.store.get_message(m.id).raw)
            for m in sorted(harness.store.list_messages(limit=1000), key=lambda m: m.id)
            if m.origin_id is not None and m.message_type == message_type]


def field(raw: bytes, path: str) -> str | None:
    header = read_header(raw, default_charset="8859/1")
    return first(Message.parse(raw, codec=header.codec), parse_path(path))


# --------------------------------------------------------------------------------------------
# held drop


def test_dropping_one_of_several_events_held_for_an_entry_releases_the_others_in_arrival_order(world):
    """The booking, the letter and the reschedule wait for the request; the letter is given up:
    the request releases the booking and then its reschedule, the letter stays given up."""
    h = world("several")
    booking, letter, reschedule = (h.receive(siu("S12")), h.receive(oru()),
                                   h.receive(siu("S13", start="20261217140000+0100")))
    assert [h.outcome(i)[0] for i in (booking, letter, reschedule)] == ["held"] * 3
    assert h.store.write([DropHeld(message_ids=(letter,), reason="sent twice", at=h.reactor.seconds())]) == [(letter,)]
    assert gauges(h)[0] == 2
    h.receive(srm())
    entry = h.entry()
    assert (entry.state, entry.attachments) == ("rescheduled", ())
    assert json.loads(entry.data)["booked_start"] == "2026-12-17T14:00:00+01:00"
    assert [h.outcome(i)[0] for i in (booking, letter, reschedule)] == ["mapped", "error", "mapped"]
    assert gauges(h) == (0, 0)


def test_a_dropped_message_held_longer_than_the_retention_goes_at_the_next_prune(world):
    """README/RUNBOOK said `koppel reprocess` takes a dropped message again should its request
    come after all; pruning counts from when it was received, so one held longer than the
    retention is deleted by the next prune after the drop (the README now says so)."""
    h = world("prune")
    letter = h.receive(oru())
    h.reactor.advance(31 * DAY)
    assert h.store.write([Prune(before=h.reactor.seconds() - 30 * DAY, limit=100)])[0].messages == 0  # held: kept
    h.store.write([DropHeld(message_ids=(letter,), reason="withdrawn by phone", at=h.reactor.seconds())])
    (result,) = h.store.write([Prune(before=h.reactor.seconds() - 30 * DAY, limit=100)])
    assert (result.messages, result.held) == (1, 0)  # the letter's body is gone; its released event not yet
    assert h.store.get_message(letter) is None


def test_held_drop_says_that_pruning_can_take_the_dropped_messages(world, capsys, monkeypatch):  # noqa: F811
    h = world("cli")
    letter = h.receive(oru())
    monkeypatch.setattr(operator, "_now", h.reactor.seconds)
    capsys.readouterr()
    assert koppel(h, "held", "drop", str(letter), "--reason", "withdrawn by phone") == 0
    out = capsys.readouterr().out
    assert "koppel reprocess" in out and "--retention" in out  # failed before: no word of pruning


def test_a_drop_committed_while_the_processor_releases_the_same_event_is_honoured(world):  # noqa: F811
    """The processor planned to release the letter; the drop commits before that plan does:
    its ReleaseHeld fails (HeldGone), nothing of the plan commits, the request is planned
    again without the letter."""
    h = world("race")
    letter = h.receive(oru())
    submit_many, dropped = h.committer.submit_many, []

    def operator_between_plan_and_commit(ops, **kw):  # `koppel held drop` from another process
        if not dropped:
            dropped.extend(h.store.write([DropHeld(message_ids=(letter,), reason="r", at=h.reactor.seconds())]))
        return submit_many(ops, **kw)

    h.committer.submit_many = operator_between_plan_and_commit
    h.receive(srm())
    assert dropped == [(letter,)]  # the operator was told it was given up ...
    assert h.outcome(letter)[0] == "error"  # ... failed before: the engine's commit applied it, recorded it mapped
    request = letter + 1
    assert h.outcome(request) == ("mapped", "agenda cardiology: requested")
    entry = h.entry()
    assert (entry.state, entry.attachments) == ("requested", ())
    assert h.sent("SIU^S12") == [request] and h.sent("MDM^T02") == []
    assert gauges(h) == (0, 0)


# --------------------------------------------------------------------------------------------
# the gauge in a split engine


def test_the_receiving_process_exports_the_held_gauge_and_the_deliverer_does_not(tmp_path):
    store_url = f"sqlite:///{tmp_path}/k.db"
    bundle = load_bundle(REPO / "channels", REPO / "mappings")
    h = Harness(tmp_path / "seed")
    h.store.close()
    from engine.store import open_store

    engines = {}
    for role in ("receive", "deliver"):
        store = open_store(store_url)
        engines[role] = Engine(MemoryReactorClock(), bundle.config, store, metrics=Metrics(), retention=None,
                               mappings=bundle.mappings, book=bundle.book, role=role)
    receiver = engines["receive"]
    receiver.startService()
    engines["deliver"].startService()
    try:
        for _ in range(10):
            receiver.reactor.advance(0)
        raw = oru()
        header = read_header(raw, default_charset="8859/1")
        from engine.shell.processor import Work
        from engine.store import Append
        from tests.factories import received

        (result,) = receiver.store.write([Append(message=received(
            header.control_id, raw=raw, received_at=receiver.reactor.seconds(), sender=header.sender,
            message_type=header.type_and_trigger, structure=None, version=header.version,
            charset=header.hl7_charset, duplicate_window=0, targets=()))])
        receiver.processor.submit(Work(message_id=result.message_id, channel="zorgdomein-in",
                                       mapping="zorgdomein-oru", raw=raw, codec=header.codec))
        for _ in range(10):
            receiver.reactor.advance(0)
        receiver.reactor.advance(15.0)  # the gauges' next refresh
        engines["deliver"].reactor.advance(15.0)
        sample = {role: e.metrics.registry.get_sample_value("koppel_agenda_held") for role, e in engines.items()}
        assert sample == {"receive": 1.0, "deliver": 0.0}
        assert engines["deliver"].processor is None  # it never maps: its gauge stays 0 (README)
    finally:
        for e in engines.values():
            e.stopService()
            e.store.close()


# --------------------------------------------------------------------------------------------
# SIU^S15


def test_a_cancel_held_behind_the_his_booking_reaches_the_his_as_a_valid_s15_naming_that_booking(world):  # noqa: F811
    h = world("booked-first")
    booking, cancel = h.receive(siu("S12")), h.receive(srm("S04", control_id="cancel"))
    assert h.outcome(cancel)[0] == "held"
    h.receive(srm())
    assert h.entry().state == "cancelled"
    ((origin, data),) = built(h, "SIU^S15")
    assert origin == cancel
    assert field(data, "SCH-2.1") == "F778" and field(data, "SCH-25.1") == "Cancelled"
    assert field(data, "MSH-10").endswith("-2")
    parse_message(data.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    assert built(h, "SIU^S12") == []  # the scheduler booked it: no request to plan


ORDERS = list(itertools.permutations(["SRM", "ORU", "BOOK", "S04"]))


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_every_order_of_request_letter_booking_and_cancel_sends_valid_numbered_siu(world, order):  # noqa: F811
    """Whatever the order, what goes to the HIS is strictly valid 2.5 with MSH-10 `K...-1` (S12)
    or `K...-2` (S15); an S15 goes out exactly when the S04 cancelled the entry, and names the
    HIS's booking when the entry has one. The HIS never gets an S15 for a referral it neither
    had as an S12 before it nor booked itself: before, a cancel that waited behind the letter
    was applied with its request, and the HIS got the S15 alone (an AE that held its queue)."""
    make = {"SRM": srm, "ORU": oru, "BOOK": lambda: siu("S12"), "S04": lambda: srm("S04", control_id="cx")}
    h = world("-".join(order))
    ids = {name: h.receive(make[name]()) for name in order}
    entry = h.entry()
    s12, s15 = built(h, "SIU^S12"), built(h, "SIU^S15")
    for _, data in s12 + s15:
        parse_message(data.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    assert all(field(d, "MSH-10").endswith("-1") for _, d in s12)
    assert all(field(d, "MSH-10").endswith("-2") for _, d in s15)
    cancelled = h.outcome(ids["S04"])[0] == "mapped"
    assert entry.state == ("cancelled" if cancelled else "booked")
    assert [origin for origin, _ in s15] == ([ids["S04"]] if cancelled else [])
    assert all(field(d, "SCH-2.1") == entry.filler_id for _, d in s15)
    if s15 and entry.filler_id is None:  # the HIS knows the referral only from Koppel's S12: sent first
        ((s12_id, _),) = [(m.id, m) for m in sorted(h.store.list_messages(limit=1000), key=lambda m: m.id)
                          if m.message_type == "SIU^S12" and m.origin_id is not None]
        ((s15_id, _),) = [(m.id, m) for m in h.store.list_messages(limit=1000)
                          if m.message_type == "SIU^S15" and m.origin_id is not None]
        assert s12_id < s15_id, order
    his_knew = bool(s12) or entry.filler_id is not None
    assert his_knew or not cancelled, order
