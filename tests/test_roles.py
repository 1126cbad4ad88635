"""Split roles: a receive-only and a deliver-only process on one store.

The pure parts (RemoteQueue, StoreWatcher's timing) run on a ``task.Clock``; the watcher
and the delivery claim use real SQLite stores, two objects on one file standing in for
two processes (each has its own connection, as two processes would).
"""

from __future__ import annotations

import pytest
from sink import write_channel
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock

from engine.config import load_config
from engine.shell.engine import Engine
from engine.shell.roles import ELSEWHERE, RemoteQueue, StoreWatcher
from engine.shell.sender import QueueSender
from engine.store import Append, Heartbeat, QueueTarget, StoreError, open_store
from tests.factories import received


def queued(control_id: str, queue: str = "127.0.0.1:6661", destination: str = "his"):
    return Append(message=received(control_id, targets=(QueueTarget(queue=queue, destination=destination),)))


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/koppel.db"


# --------------------------------------------------------------------------- RemoteQueue


class _Destination:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue


def test_a_remote_queue_counts_what_this_process_queued_until_the_store_says_otherwise():
    remote = RemoteQueue("10.1.2.3:6661", {"a": _Destination(5), "b": _Destination(3)})
    assert (remote.depth, remote.max_queue, remote.state) == (0, 3, ELSEWHERE)
    remote.enqueued()
    remote.enqueued(2)
    assert remote.depth == 3
    remote.refresh({"10.1.2.3:6661": 1, "other:1": 99})  # the deliverer sent two meanwhile
    assert remote.depth == 1
    remote.refresh({})  # drained
    assert remote.depth == 0
    remote.update({"a": _Destination(10)})
    assert remote.max_queue == 10


# --------------------------------------------------------------------------- StoreWatcher


def test_the_watcher_wakes_on_another_process_commit_and_not_on_its_own(url):
    deliverer, receiver = open_store(url), open_store(url)
    clock = task.Clock()
    woken = []
    watcher = StoreWatcher(deliverer, clock=clock, on_change=lambda: woken.append(clock.seconds()))
    try:
        watcher.start()
        clock.advance(0.01)
        assert woken == []  # nothing changed since it started
        deliverer.write([Heartbeat(at=1.0)])  # the deliverer's own bookkeeping
        clock.advance(0.1)
        assert woken == []
        receiver.write([queued("C1")])
        clock.advance(0.05)  # at most the slowest interval
        assert len(woken) == 1
    finally:
        watcher.stop()
        deliverer.close()
        receiver.close()


def test_the_watcher_polls_fast_while_things_change_and_backs_off_when_idle(url):
    deliverer, receiver = open_store(url), open_store(url)
    clock = task.Clock()
    woken = []
    watcher = StoreWatcher(deliverer, clock=clock, on_change=lambda: woken.append(clock.seconds()),
                           fastest=0.002, slowest=0.05)
    looks = []
    real = deliverer.data_version
    deliverer.data_version = lambda: looks.append(clock.seconds()) or real()
    try:
        watcher.start()
        for _ in range(100):  # one idle second: 2, 4, 8, ... ms, then every 50 ms
            clock.advance(0.01)
        assert 20 <= len(looks) <= 27  # not 500 (every 2 ms), not fewer than one per 50 ms
        receiver.write([queued("C1")])
        clock.advance(0.05)
        assert len(woken) == 1
        # right after a change it looks again within the fastest interval
        receiver.write([queued("C2")])
        clock.advance(0.002)
        assert len(woken) == 2
        watcher.stop()
        receiver.write([queued("C3")])
        clock.advance(1)
        assert len(woken) == 2 and clock.getDelayedCalls() == []
    finally:
        deliverer.close()
        receiver.close()


def test_a_store_error_while_watching_is_logged_and_watching_goes_on(url):
    store = open_store(url)
    clock = task.Clock()
    warnings = []

    class Log:
        def warning(self, event, **fields):
            warnings.append(event)

    calls = {"n": 0}
    real = store.data_version

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreError("store read failed: disk I/O error")
        return real()

    store.data_version = flaky
    watcher = StoreWatcher(store, clock=clock, on_change=lambda: None, log=Log())
    try:
        watcher.start()
        for _ in range(10):
            clock.advance(0.01)
        assert warnings == ["store.watch_failed"] and calls["n"] > 4
    finally:
        watcher.stop()
        store.close()


# --------------------------------------------------------------------------- delivery claim


def test_only_one_process_can_deliver_from_or_receive_for_a_store(url, tmp_path):
    first, second = open_store(url), open_store(url)
    try:
        first.claim("deliver")
        first.claim("deliver")  # again from the same holder: fine
        with pytest.raises(StoreError, match=r"another Koppel process \(pid \d+\) already delivers from"):
            second.claim("deliver")
        second.claim("receive")  # the other duty is free
        with pytest.raises(StoreError, match=r"already receives for this store"):
            first.claim("receive")
        first.close()  # a stopped (or killed) holder frees it
        second.claim("deliver")
        assert (tmp_path / "koppel.db.deliver.lock").read_text().strip().isdigit()
    finally:
        first.close()
        second.close()


# --------------------------------------------------------------------------- engine wiring


@pytest.fixture
def config(tmp_path):
    channels = tmp_path / "channels"
    write_channel(channels, {"his": 6661})
    return load_config(channels, channels)


def test_a_receive_only_engine_listens_and_keeps_remote_queues_but_does_not_deliver_or_prune(config, url):
    store = open_store(url)
    try:
        engine = Engine(MemoryReactorClock(), config, store, role="receive")
        assert [l.factory.settings.channel for l in engine.listeners] == ["e2e-in"]
        assert all(isinstance(q, RemoteQueue) for q in engine.senders.values()) and engine.senders
        assert engine.pruner is None
    finally:
        store.close()


def test_a_deliver_only_engine_sends_queues_and_prunes_but_does_not_listen(config, url):
    store = open_store(url)
    try:
        engine = Engine(MemoryReactorClock(), config, store, role="deliver")
        assert engine.listeners == [] and engine.processor is None
        assert all(isinstance(q, QueueSender) for q in engine.senders.values()) and engine.senders
        assert engine.pruner is not None
    finally:
        store.close()


def test_a_receive_only_engine_refreshes_queue_depths_from_the_store(config, url):
    store, other = open_store(url), open_store(url)
    reactor = MemoryReactorClock()
    engine = Engine(reactor, config, store, retention=None, role="receive")
    try:
        engine.startService()
        (remote,) = engine.senders.values()
        other.write([queued("C1", queue=remote.queue), queued("C2", queue=remote.queue)])
        reactor.advance(1.0)
        assert remote.depth == 2
    finally:
        engine.stopService()
        store.close()
        other.close()


@pytest.mark.parametrize("running, refusal", [
    ("deliver", "already delivers from this store"),
    ("receive", "already receives for this store"),
])
def test_a_second_engine_for_a_role_already_running_fails_to_start(config, url, running, refusal):
    first_store, second_store = open_store(url), open_store(url)
    first = Engine(MemoryReactorClock(), config, first_store, retention=None, role=running)
    second = Engine(MemoryReactorClock(), config, second_store, retention=None, role="all")
    try:
        first.startService()
        with pytest.raises(StoreError, match=refusal):
            second.startService()
        assert not second.running
    finally:
        first.stopService()
        first_store.close()
        second_store.close()


def test_an_unknown_role_is_refused(config, url):
    store = open_store(url)
    try:
        with pytest.raises(ValueError, match="role must be one of all, receive, deliver"):
            Engine(MemoryReactorClock(), config, store, role="both")
    finally:
        store.close()


def test_a_pause_committed_by_the_other_process_stops_the_deliverer_within_the_watch(config, url):
    from engine.store import SetPaused

    store, other = open_store(url), open_store(url)
    reactor = MemoryReactorClock()
    engine = Engine(reactor, config, store, retention=None, role="deliver")
    try:
        engine.startService()
        (sender,) = engine.senders.values()
        reactor.advance(0.06)
        other.write([SetPaused(queue=sender.queue, paused=True)])  # the receiver's admin API, say
        for _ in range(30):
            reactor.advance(0.002)  # well inside the senders' one-second poll
        assert sender._paused
    finally:
        engine.stopService()
        store.close()
        other.close()
