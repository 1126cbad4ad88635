"""Housekeeping next to the commit path: WAL checkpoints off the reactor thread, retention
pruning in bounded slices, and the guard that retention outlives the duplicate window."""

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from engine.config import ChannelConfig, EngineConfig, SourceConfig
from engine.shell.committer import Checkpointer, GroupCommitter, Pruner
from engine.shell.engine import Engine
from engine.store import Append, DeadLetter, MarkDelivered, open_store
from tests.factories import HIX, T0, received

DAY = 86_400.0


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/k.db")
    yield s
    s.close()


def test_the_checkpointer_runs_the_store_checkpoint_each_interval_and_survives_a_failure():
    calls = []

    class Store:
        def checkpoint(self):
            calls.append("checkpoint")
            if len(calls) == 2:
                raise OSError(5, "I/O error")

    clock = MemoryReactorClock()
    checkpointer = Checkpointer(Store(), reactor=clock, interval=0.25, in_thread=lambda f: defer.succeed(f()))
    checkpointer.start()
    clock.advance(0.25)
    clock.advance(0.25)  # this one fails: logged, the loop goes on
    clock.advance(0.25)
    assert calls == ["checkpoint"] * 3
    assert checkpointer.stop().called


def test_the_checkpointer_skips_ticks_with_nothing_committed_since_the_last_checkpoint(store):
    calls = []

    class Counting:
        def checkpoint(self):
            calls.append(committer.commits)

    clock = MemoryReactorClock()
    committer = GroupCommitter(store, clock=clock)
    checkpointer = Checkpointer(Counting(), reactor=clock, interval=0.05, in_thread=lambda f: defer.succeed(f()),
                                commits=lambda: committer.commits)
    checkpointer.start()
    for _ in range(5):
        clock.advance(0.05)
    assert calls == [0]  # the first tick checkpoints (an earlier run may have left a log), then idle
    committer.submit(Append(message=received("C1")))
    clock.advance(0)
    for _ in range(5):
        clock.advance(0.05)
    assert calls == [0, 1]  # one checkpoint for the one commit, however many ticks
    assert checkpointer.stop().called


def test_the_checkpointer_never_runs_two_checkpoints_at_once():
    pending = []
    clock = MemoryReactorClock()

    class Store:
        def checkpoint(self):
            pass

    def later(function):
        d = defer.Deferred()
        pending.append((d, function))
        return d

    checkpointer = Checkpointer(Store(), reactor=clock, interval=0.25, in_thread=later)
    checkpointer.start()
    clock.advance(0.25)
    clock.advance(0.25)
    assert len(pending) == 1  # the second tick found the first still running
    pending[0][0].callback(None)
    clock.advance(0.25)
    assert len(pending) == 2


def test_pruning_removes_old_delivered_messages_in_slices_and_keeps_pending_and_dead_ones(store):
    clock = MemoryReactorClock()
    clock.advance(T0 + 40 * DAY)
    appended = store.write([Append(message=received(f"P{i}", duplicate_window=0)) for i in range(2503)])
    entries = {e.message_id: e.id for e in store.queue_head(HIX.queue, 3000)}
    ids = [r.message_id for r in appended]
    store.write([MarkDelivered(entry_id=entries[m], ack=b"AA", at=T0) for m in ids[:2500]])
    store.write([DeadLetter(entry_id=entries[ids[2500]], reason="AR", ack=None, at=T0)])
    committer = GroupCommitter(store, clock=clock)
    pruner = Pruner(committer, reactor=clock, retention=30 * DAY, interval=60)
    done = pruner.prune()
    for _ in range(10):
        clock.advance(0)  # each slice commits on its own turn
    assert done.called
    remaining = {m.id for m in store.list_messages(limit=5000)}
    assert remaining == set(ids[2500:])  # the dead letter and the two pending messages stay
    assert store.get_entry(entries[ids[2500]]).state == "dead"


def test_an_engine_refuses_a_retention_shorter_than_a_duplicate_window(tmp_path):
    config = EngineConfig(channels=(ChannelConfig(name="zd", source=SourceConfig(listen="tcp:0"),
                                                  duplicate_window=7 * DAY),))
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    try:
        with pytest.raises(ValueError, match="retention must be at least the longest duplicate window"):
            Engine(MemoryReactorClock(), config, store, retention=DAY)
        Engine(MemoryReactorClock(), config, store, retention=8 * DAY)  # long enough: fine
    finally:
        store.close()
