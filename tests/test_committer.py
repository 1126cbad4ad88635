"""The group committer: one store transaction per two reactor turns, results to the right callers.

The clock is a ``twisted.internet.task.Clock``; ``advance(0)`` runs every call that is due,
including those scheduled meanwhile, so it ends both turns and runs the commit. ``turn``
runs only what was due when it started, as a real reactor does between two polls. Stores are small fakes that record each ``write`` call, plus the real
SQLite store where durability is the point.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from engine.metrics import Metrics
from engine.shell.committer import BUSY_RETRY, GroupCommitter
from engine.store import Append, AppendResult, HeldGone, StoreBusy, StoreError, open_store
from tests.factories import received

POISON = "poison"


class RecordingStore:
    """Commits every batch without a poisoned op; a batch with one fails as a whole."""

    def __init__(self) -> None:
        self.writes: list[list] = []  # every write attempt, committed or not
        self.committed: list = []

    def write(self, ops, wait=True):
        self.writes.append(list(ops))
        if POISON in ops:
            raise StoreError(f"store write of {len(ops)} operations failed")
        self.committed.extend(ops)
        return [f"result-of-{op}" for op in ops]


def results_of(deferreds):
    """(ok, value) per Deferred, without leaving unhandled failures behind."""
    out = []
    for d in deferreds:
        box = []
        d.addCallbacks(lambda v, box=box: box.append((True, v)), lambda f, box=box: box.append((False, f.value)))
        assert box, "the deferred has not fired"
        out.append(box[0])
    return out


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store():
    return RecordingStore()


@pytest.fixture
def metrics():
    return Metrics()


@pytest.fixture
def committer(store, clock, metrics):
    c = GroupCommitter(store, clock=clock, metrics=metrics)
    c.start()
    return c


def turn(clock: Clock) -> None:
    """One reactor turn: the calls due when it starts; calls they schedule wait for the next."""
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in sorted(due, key=lambda c: c.getTime()):
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def test_frames_read_in_the_next_turn_join_the_commit(committer, store, clock):
    first = committer.submit("op-a")
    turn(clock)  # the turn after the submit: nothing committed yet, the reactor polls again
    assert store.writes == [] and not first.called
    second = committer.submit("op-b")  # a frame that was readable by then
    turn(clock)
    assert store.writes == [["op-a", "op-b"]]
    assert results_of([first, second]) == [(True, "result-of-op-a"), (True, "result-of-op-b")]


def test_an_idle_reactor_commits_after_two_turns_without_waiting(committer, store, clock):
    d = committer.submit("op")
    turn(clock)
    turn(clock)
    assert store.writes == [["op"]] and d.called
    assert clock.seconds() == 0  # no time passed: the extra turn only polls


def test_n_submits_in_one_turn_become_one_store_write(committer, store, clock):
    ds = [committer.submit(f"op{n}") for n in range(10)]
    assert store.writes == []
    assert not any(d.called for d in ds)
    clock.advance(0)
    assert store.writes == [[f"op{n}" for n in range(10)]]
    assert all(d.called for d in ds)


def test_each_submit_gets_its_own_result(committer, clock):
    ds = [committer.submit(f"op{n}") for n in range(5)]
    clock.advance(0)
    assert results_of(ds) == [(True, f"result-of-op{n}") for n in range(5)]


def test_submits_in_different_turns_are_different_transactions(committer, store, clock):
    first = committer.submit("a")
    clock.advance(0)
    second = committer.submit("b")
    clock.advance(0)
    assert store.writes == [["a"], ["b"]]
    assert results_of([first, second]) == [(True, "result-of-a"), (True, "result-of-b")]


def test_a_submit_from_a_commit_callback_gets_its_own_later_transaction(committer, store, clock):
    later = []
    committer.submit("a").addCallback(lambda _: later.append(committer.submit("b")))
    clock.advance(0)  # (the test clock also runs the zero-delay call scheduled meanwhile)
    assert store.writes == [["a"], ["b"]]
    assert results_of(later) == [(True, "result-of-b")]


def test_submit_many_fires_once_with_its_results_in_order(committer, store, clock):
    before = committer.submit("x")
    many = committer.submit_many(["a", "b", "c"])
    after = committer.submit("y")
    clock.advance(0)
    assert store.writes == [["x", "a", "b", "c", "y"]]
    assert results_of([before, many, after]) == [
        (True, "result-of-x"),
        (True, ["result-of-a", "result-of-b", "result-of-c"]),
        (True, "result-of-y"),
    ]


def test_submit_many_is_all_or_nothing(committer, store, clock):
    many = committer.submit_many(["a", POISON, "c"])
    alone = committer.submit("b")
    clock.advance(0)
    [(ok, error), (ok_alone, value)] = results_of([many, alone])
    assert not ok and isinstance(error, StoreError)
    assert (ok_alone, value) == (True, "result-of-b")
    assert "a" not in store.committed and "c" not in store.committed
    assert store.committed == ["b"]


def test_a_poisoned_op_fails_alone_and_the_rest_of_its_batch_still_commits(committer, store, clock):
    ds = [committer.submit(op) for op in ("a", POISON, "c", "d")]
    clock.advance(0)
    outcomes = results_of(ds)
    assert [ok for ok, _ in outcomes] == [True, False, True, True]
    assert isinstance(outcomes[1][1], StoreError)
    assert [value for ok, value in outcomes if ok] == ["result-of-a", "result-of-c", "result-of-d"]
    assert sorted(store.committed) == ["a", "c", "d"]


def test_store_errors_counts_every_failed_transaction(committer, clock, metrics):
    committer.submit("a")
    committer.submit(POISON)
    clock.advance(0)
    # The shared batch failed, then the poisoned op failed again on its own.
    assert metrics.registry.get_sample_value("koppel_store_errors_total") == 2
    committer.submit("b")
    clock.advance(0)
    assert metrics.registry.get_sample_value("koppel_store_errors_total") == 2


class StaleReleaseStore(RecordingStore):
    """A write holding the stale op fails with HeldGone: `koppel held drop` got there first."""

    def write(self, ops, wait=True):
        if "stale" in ops:
            self.writes.append(list(ops))
            raise HeldGone((7,))
        return super().write(ops, wait)


def test_a_plan_made_stale_by_an_operator_is_not_a_store_failure(clock, metrics):
    """The processor plans again at once; before, each such race counted a store error, logged
    store.commit_failed and made the engine unready until the next commit."""
    store = StaleReleaseStore()
    committer = GroupCommitter(store, clock=clock, metrics=metrics)
    committer.start()
    ds = [committer.submit(op) for op in ("a", "stale", "c")]
    clock.advance(0)
    outcomes = results_of(ds)
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert isinstance(outcomes[1][1], HeldGone)
    assert committer.healthy
    assert metrics.registry.get_sample_value("koppel_store_errors_total") == 0


def test_commit_time_and_batch_size_are_observed(committer, clock, metrics):
    for n in range(3):
        committer.submit(f"op{n}")
    clock.advance(0)
    get = metrics.registry.get_sample_value
    assert get("koppel_store_commit_batch_size_count") == 1
    assert get("koppel_store_commit_batch_size_sum") == 3
    assert get("koppel_store_commit_seconds_count") == 1


def test_stop_commits_what_was_already_submitted_without_waiting_for_the_turn(committer, store, clock):
    d = committer.submit("a")
    committer.stop()
    assert store.writes == [["a"]]
    assert results_of([d]) == [(True, "result-of-a")]
    clock.advance(0)
    assert store.writes == [["a"]]  # the cancelled turn does not commit twice


def test_a_submit_after_stop_still_commits_on_its_turn(committer, store, clock):
    committer.stop()
    d = committer.submit("late")
    clock.advance(0)
    assert results_of([d]) == [(True, "result-of-late")]


def test_with_sqlite_a_batch_is_durable_when_its_deferreds_fire(tmp_path, clock):
    url = f"sqlite:///{tmp_path}/koppel.db"
    store = open_store(url)
    committer = GroupCommitter(store, clock=clock)
    ds = [committer.submit(Append(message=received(f"MSG{n}"))) for n in range(3)]
    clock.advance(0)
    results = [value for ok, value in results_of(ds)]
    assert all(isinstance(r, AppendResult) and r.duplicate_of is None for r in results)
    assert len({r.message_id for r in results}) == 3
    store.close()
    # Another connection (as after a crash) sees every message whose deferred fired.
    reopened = open_store(url)
    try:
        assert sorted(m.control_id for m in reopened.list_messages()) == ["MSG0", "MSG1", "MSG2"]
    finally:
        reopened.close()


def test_with_sqlite_a_duplicate_in_the_same_batch_resolves_to_the_first_copy(tmp_path, clock):
    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    committer = GroupCommitter(store, clock=clock)
    first = committer.submit(Append(message=received("MSG1")))
    again = committer.submit(Append(message=received("MSG1")))
    clock.advance(0)
    [(_, a), (_, b)] = results_of([first, again])
    assert b.duplicate_of == a.message_id
    assert b.ack == a.ack
    assert len(store.list_messages()) == 1
    store.close()


# --------------------------------------------------------------------------- another process writing


class BusyStore(RecordingStore):
    """Busy (another process holds the write lock) for the next ``busy`` no-wait writes."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy
        self.waits: list[bool] = []

    def write(self, ops, wait=True):
        self.waits.append(wait)
        if not wait and self.busy:
            self.busy -= 1
            raise StoreBusy("the store is being written by another process")
        return super().write(ops, wait)


def test_a_busy_store_is_retried_soon_with_the_batch_kept_in_order_and_the_reactor_free(clock, metrics):
    store = BusyStore(busy=2)
    committer = GroupCommitter(store, clock=clock, metrics=metrics)
    first = committer.submit("a")
    clock.advance(0)  # busy: nothing committed, nothing fired, a retry scheduled
    assert store.committed == [] and not first.called
    later = committer.submit("b")  # arrives while waiting: joins behind "a"
    clock.advance(BUSY_RETRY)  # busy again
    assert store.committed == []
    clock.advance(BUSY_RETRY)
    assert store.committed == ["a", "b"] and store.writes[-1] == ["a", "b"]
    assert results_of([first, later]) == [(True, "result-of-a"), (True, "result-of-b")]
    assert store.waits == [False, False, False]  # never blocked inside the store
    assert metrics.registry.get_sample_value("koppel_store_busy_total") == 1  # one batch put off
    assert clock.seconds() == pytest.approx(2 * BUSY_RETRY)


def test_a_store_locked_for_longer_than_the_limit_fails_the_batch(clock, metrics):
    store = BusyStore(busy=10**6)
    committer = GroupCommitter(store, clock=clock, metrics=metrics, busy_limit=0.01)
    d = committer.submit("a")
    for _ in range(40):
        clock.advance(BUSY_RETRY)
    [(ok, error)] = results_of([d])
    assert not ok and isinstance(error, StoreError) and "locked by another process" in str(error)
    assert not committer.healthy and store.committed == []
    store.busy = 0
    again = committer.submit("b")  # the lock is free again: commits as usual
    clock.advance(0)
    assert results_of([again]) == [(True, "result-of-b")] and committer.healthy


def test_the_one_by_one_retry_of_a_failed_batch_waits_for_the_lock(clock):
    """A busy answer half-way through the one-by-one retry would put the whole batch back,
    and commit its first items twice; so that retry waits inside the store instead."""
    store = BusyStore(busy=0)
    committer = GroupCommitter(store, clock=clock)
    ds = [committer.submit(op) for op in ("a", POISON, "c")]
    store.busy = 0
    clock.advance(0)
    assert store.waits == [False, True, True, True]
    assert [ok for ok, _ in results_of(ds)] == [True, False, True]
    assert store.committed == ["a", "c"]


def test_with_sqlite_another_writer_holding_the_lock_makes_the_commit_wait_its_turn(tmp_path, clock):
    url = f"sqlite:///{tmp_path}/k.db?busy_timeout=30"
    store, other = open_store(url), open_store(url)
    committer = GroupCommitter(store, clock=clock)
    try:
        other._conn().execute("BEGIN IMMEDIATE")  # another process is writing
        d = committer.submit(Append(message=received("C1")))
        clock.advance(0)  # returns at once (not after 30 s): the batch waits for a retry
        assert not d.called
        other._conn().execute("COMMIT")
        clock.advance(BUSY_RETRY)
        [(ok, result)] = results_of([d])
        assert ok and isinstance(result, AppendResult)
    finally:
        store.close()
        other.close()


def test_stop_waits_for_a_batch_put_off_by_another_writer_before_the_store_closes(tmp_path, clock):
    url = f"sqlite:///{tmp_path}/k.db?busy_timeout=30"
    store, other = open_store(url), open_store(url)
    committer = GroupCommitter(store, clock=clock)
    try:
        other._conn().execute("BEGIN IMMEDIATE")  # the other process is committing
        d = committer.submit(Append(message=received("C1")), within=0.02)  # a delivery mark, say
        stopped = committer.stop()
        assert not stopped.called and not d.called  # not done: the store must stay open
        other._conn().execute("COMMIT")
        clock.advance(BUSY_RETRY)
        assert stopped.called
        [(ok, result)] = results_of([d])
        assert ok and store.get_message(result.message_id) is not None
    finally:
        store.close()
        other.close()
