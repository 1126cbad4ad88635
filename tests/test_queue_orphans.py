"""A queue is a destination's host:port. When an endpoint is edited while entries wait (the HIS
moved to a new address), the waiting entries stay on the old host:port, which no sender reads:
the engine must say so (log queue.orphaned) and export their depth and age, so the queue-age
alerts fire, instead of leaving them silent forever."""

from __future__ import annotations

from structlog.testing import capture_logs
from twisted.internet.testing import MemoryReactorClock

from engine.shell.engine import ORPHAN_INTERVAL, Engine
from engine.store import Append, QueueTarget, open_store, write_one
from tests.factories import T0, one_channel_bundle, received

OLD = QueueTarget(queue="10.1.2.3:6661", destination="hix-agenda")
CHANNEL = """
name: zorgdomein-in
source:
  listen: tcp:0:interface=127.0.0.1
destinations:
  hix-agenda:
    endpoint: tcp:host={host}:port=6661
routes:
  - to: [hix-agenda]
"""


def bundle(tmp_path, host: str):
    return one_channel_bundle(tmp_path / host, CHANNEL.format(host=host))


def gauges(engine, queue: str) -> tuple:
    registry = engine.metrics.registry
    return (registry.get_sample_value("koppel_queue_depth", {"queue": queue}),
            registry.get_sample_value("koppel_queue_oldest_age_seconds", {"queue": queue}))


def test_entries_left_on_an_old_host_port_are_logged_and_exported_until_a_destination_uses_it(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    for i in range(3):  # queued while the HIS was still at 10.1.2.3
        write_one(store, Append(message=received(f"ZD{i}", received_at=T0 + i, targets=(OLD,))))
    reactor = MemoryReactorClock()
    reactor.advance(T0 + 3600)
    moved = bundle(tmp_path, "10.1.2.4")
    engine = Engine(reactor, moved.config, store, retention=None)
    with capture_logs() as logs:
        engine.startService()
        reactor.advance(ORPHAN_INTERVAL)  # checked again: logged once, not every half minute
    orphaned = [e for e in logs if e["event"] == "queue.orphaned"]
    assert [(e["queue"], e["depth"]) for e in orphaned] == [(OLD.queue, 3)]
    assert orphaned[0]["oldest_age"] >= 3600
    assert gauges(engine, OLD.queue) == (3.0, 3600.0 + ORPHAN_INTERVAL)
    assert engine.orphaned_queues() == {OLD.queue}

    with capture_logs() as logs:  # pointed back at the old address: its sender takes over
        engine.reload(bundle(tmp_path, "10.1.2.3"))
    assert engine.orphaned_queues() == frozenset()
    assert [e["queue"] for e in logs if e["event"] == "queue.orphan_cleared"] == [OLD.queue]
    engine.stopService()


def test_a_destination_moved_by_a_reload_leaves_its_waiting_entries_visible_and_an_empty_queue_no_series(tmp_path):
    reactor = MemoryReactorClock()
    reactor.advance(T0)
    empty = Engine(reactor, bundle(tmp_path, "10.1.2.3").config, open_store(f"sqlite:///{tmp_path}/a.db"),
                   retention=None)
    empty.startService()
    empty.senders[OLD.queue].poll()
    assert gauges(empty, OLD.queue) == (0.0, 0.0)
    empty.reload(bundle(tmp_path, "10.1.2.4"))  # nothing waits on 10.1.2.3: its series go
    reactor.advance(0)
    assert gauges(empty, OLD.queue) == (None, None)
    empty.stopService()

    store = open_store(f"sqlite:///{tmp_path}/b.db")
    write_one(store, Append(message=received("ZD9", received_at=T0, targets=(OLD,))))
    waiting = Engine(reactor, bundle(tmp_path, "10.1.2.3").config, store, retention=None)
    waiting.startService()
    with capture_logs() as logs:
        waiting.reload(bundle(tmp_path, "10.1.2.4"))  # moved while ZD9 waits: seen once its sender stopped
        reactor.advance(11)  # (its attempt to connect gives up after connect_timeout)
    assert [(e["queue"], e["depth"]) for e in logs if e["event"] == "queue.orphaned"] == [(OLD.queue, 1)]
    assert gauges(waiting, OLD.queue)[0] == 1.0
    waiting.stopService()


# ------------------------------------------------------------------ moving them (koppel queue move)
NEW = QueueTarget(queue="10.1.2.4:6661", destination="hix-agenda")


def test_moving_a_queue_requeues_its_pending_entries_in_order_at_the_new_tail_in_bounded_steps(tmp_path):
    from engine.store import DeadLetter, MoveQueue

    store = open_store(f"sqlite:///{tmp_path}/k.db")
    try:
        for i in range(5):
            write_one(store, Append(message=received(f"OLD{i}", received_at=T0 + i, targets=(OLD,))))
        write_one(store, Append(message=received("NEW0", received_at=T0 + 10, targets=(NEW,))))
        (first, *_rest) = store.queue_head(OLD.queue, 10)
        write_one(store, DeadLetter(entry_id=first.id, reason="AR", ack=None, at=T0 + 11))  # stays dead, stays put
        moves = ((OLD.destination, NEW.queue, NEW.destination),)
        moved = [write_one(store, MoveQueue(from_queue=OLD.queue, moves=moves, at=T0 + 20, reason="HIS moved",
                                            limit=3)) for _ in range(3)]
        assert [len(ids) for ids in moved] == [3, 1, 0]
        assert [e.control_id for e in store.queue_head(NEW.queue, 10)] == ["NEW0", "OLD1", "OLD2", "OLD3", "OLD4"]
        assert (store.queue_depths()[NEW.queue], store.queue_depths().get(OLD.queue, 0)) == (5, 0)
        assert [e.id for e in store.list_dead_letters(OLD.queue)] == [first.id]
        audit = [a for a in store.list_audit() if a.action == "move"]
        assert len(audit) == 4 and all(a.queue == OLD.queue and a.reason.endswith(": HIS moved") for a in audit)
        new_entry = store.get_entry(moved[0][0])
        assert new_entry.queue == NEW.queue and new_entry.replay_of is not None
        assert store.get_entry(new_entry.replay_of).state == "replayed"
    finally:
        store.close()


def test_pause_resume_and_retry_now_by_an_operator_leave_an_audit_record(tmp_path):
    from engine.store import RecordFailure, RetryNow, SetPaused

    store = open_store(f"sqlite:///{tmp_path}/k.db")
    try:
        write_one(store, SetPaused(queue=OLD.queue, paused=True, at=T0, reason="HIS upgrade"))
        write_one(store, SetPaused(queue=OLD.queue, paused=False, at=T0 + 1))
        write_one(store, RetryNow(queue=OLD.queue, at=T0 + 2, reason="nothing waits"))  # freed none: no record
        write_one(store, Append(message=received("ZD1", received_at=T0, targets=(OLD,))))
        (entry,) = store.queue_head(OLD.queue, 1)
        write_one(store, RecordFailure(entry_id=entry.id, error="refused", ack=None, next_attempt_at=T0 + 300, at=T0))
        write_one(store, RetryNow(queue=OLD.queue, at=T0 + 3, reason="HIS back"))
        write_one(store, SetPaused(queue=OLD.queue, paused=True))  # without at (not an operator): no record
        assert [(a.action, a.queue, a.reason) for a in reversed(store.list_audit())] == [
            ("pause", OLD.queue, "HIS upgrade"), ("resume", OLD.queue, None), ("retry-now", OLD.queue, "HIS back")]
    finally:
        store.close()
