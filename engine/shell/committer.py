"""Group commit: every write submitted during two reactor turns shares one transaction.

Callers submit store write operations and get a Deferred that fires after the
transaction holding their operation has committed (so an ACK written from its
callback is an ACK for a durable message). The commit runs in the reactor thread
(see below for when): measured on the receive benchmark, handing batches to a
writer thread cost more in GIL hand-offs and wake-ups than the fsync it overlapped
(4.6k vs 6.2k msg/s with synchronous=FULL, 6.2k vs 8.8k with NORMAL, 8
connections). The price is that a slow disk stalls the reactor for that fsync;
WAL checkpoints, the slow part, run in a background thread (``Checkpointer``).

The commit waits one more reactor turn, which polls with no timeout: it waits for
nothing, it only takes frames that are already readable. Senders with one message in
flight otherwise fall into two cohorts that commit alternately (one sends while the
other waits for its fsync); the extra turn merges them. Measured with 8 connections at
FULL: 4.3 -> 6.5 messages per commit, 4.6k -> 5.5-5.8k msg/s, the paced p99 unchanged.
Waiting a fixed time instead was slower (the path is latency-bound).

A failing batch is retried operation by operation, so one poisoned operation
fails alone and everything else still commits.

The commit never waits inside the store for another process's write lock (a second
Koppel process with --role, or a `koppel queue` command): SQLite's own wait sleeps 1 ms
and more inside the call, with the reactor held. The committer asks with
``wait=False`` and, when the store is busy, keeps the batch and tries again
``BUSY_RETRY`` later, while the reactor goes on; after ``busy_limit`` seconds of that
the batch fails as a store error. Measured with receive and deliver in two processes:
the deliverer spent 13% of its reactor time asleep in BEGIN IMMEDIATE before this.
"""

from __future__ import annotations

import time

from twisted.internet import defer, task

from engine.store import HeldGone, StoreBusy, StoreError

BUSY_RETRY = 0.0005  # seconds between attempts while another process writes


class GroupCommitter:
    def __init__(self, store, *, clock, metrics=None, log=None, busy_limit: float = 5.0) -> None:
        self._store = store
        self._busy_limit = busy_limit
        self._busy_since: float | None = None
        self._drained: list[defer.Deferred] = []  # stop() waiting for a busy store's retry
        self._clock = clock
        self._metrics = metrics
        self._log = log
        self._pending: list[tuple[object, defer.Deferred]] = []
        self._call = None
        self._due = 0.0
        self._stopped = False
        self.healthy = True  # did the last transaction commit? (readiness)
        self.commits = 0  # transactions committed so far (the checkpointer skips idle ticks)

    def start(self) -> None:
        self._stopped = False

    def submit(self, op, *, within: float = 0.0) -> defer.Deferred:
        """One operation; fires with its result after commit, or fails with the store's error.

        ``within`` lets bookkeeping that nobody waits on (delivery marks) ride along with
        a later commit, at most that many seconds later, instead of paying for its own:
        the next message can leave without waiting for an fsync.
        """
        return self._enqueue(op, within)

    def submit_many(self, ops, *, within: float = 0.0) -> defer.Deferred:
        """Several operations that commit together or not at all; fires with their results."""
        return self._enqueue(tuple(ops), within)

    def _enqueue(self, op, within: float) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._pending.append((op, d))
        due = self._clock.seconds() + within
        if self._call is None:
            self._call = self._clock.callLater(within, self._last_turn if within == 0 else self.flush)
            self._due = due
        elif due < self._due:
            self._call.reset(within)
            self._due = due
        return d

    def _last_turn(self) -> None:
        """Commit one reactor turn later: that turn polls without waiting, so frames that arrived
        while this turn's were read and judged join the batch instead of paying their own fsync."""
        self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Commit everything pending now (also called at shutdown)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        work, self._pending = self._pending, []
        if not work:
            return
        try:
            outcomes = self._commit(work)
        except StoreBusy:
            now = self._clock.seconds()
            if self._busy_since is None:
                self._busy_since = now
            if now - self._busy_since < self._busy_limit:
                self._pending[:0] = work  # first in line for the next attempt
                if self._metrics is not None and now == self._busy_since:
                    self._metrics.store_busy.inc()
                self._call = self._clock.callLater(BUSY_RETRY, self.flush)
                self._due = now + BUSY_RETRY
                return
            error = StoreError(f"the store stayed locked by another process for {self._busy_limit:g} s")
            outcomes = [(d, False, error) for _, d in work]
            self.healthy = False
            self._count_error(error)
        self._busy_since = None
        for d, ok, value in outcomes:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        if not self._pending:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def stop(self) -> defer.Deferred:
        """Commit what was already submitted, waiting out another process's write lock (so
        the store is not closed under a retry); later submits still work (on their turn)."""
        self.flush()
        if not self._pending:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        return d

    def _commit(self, work, wait: bool = False):
        ops: list = []
        for op, _ in work:
            if isinstance(op, tuple):
                ops.extend(op)
            else:
                ops.append(op)
        started = time.perf_counter()
        try:
            results = self._store.write(ops, wait=wait)
        except StoreBusy:
            raise
        except Exception as error:  # noqa: BLE001 - the store's failure is answered, not raised
            if not isinstance(error, HeldGone):  # a plan made stale by an operator: not the store failing
                self.healthy = False
                self._count_error(error)
            if len(work) == 1:
                return [(work[0][1], False, error)]
            # one by one, each waiting for the lock: a StoreBusy half-way would retry the
            # whole batch and commit the items already committed a second time
            return [outcome for item in work for outcome in self._commit([item], wait=True)]
        self.healthy = True
        self.commits += 1
        if self._metrics is not None:
            self._metrics.store_commit.observe(time.perf_counter() - started)
            self._metrics.store_batch.observe(len(ops))
        outcomes = []
        index = 0
        for op, d in work:
            if isinstance(op, tuple):
                outcomes.append((d, True, results[index : index + len(op)]))
                index += len(op)
            else:
                outcomes.append((d, True, results[index]))
                index += 1
        return outcomes

    def _count_error(self, error: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.store_errors.inc()
        if self._log is not None:
            from engine.log import safe_error

            self._log.error("store.commit_failed", error=safe_error(error))


class Checkpointer:
    """Runs the store's WAL checkpoint in a thread now and then, off the commit path.

    ``commits`` (the group committer's count) lets an idle engine skip the tick: nothing
    committed since the last checkpoint means nothing to copy, so no thread wakes 20 times
    a second all night."""

    def __init__(self, store, *, reactor, interval: float = 0.05, log=None, in_thread=None,
                 commits=None) -> None:
        self._store = store
        self._reactor = reactor
        self._log = log
        self._commits = commits
        self._checkpointed_at = None  # the commit count the last checkpoint covered
        # How to run a blocking call off the reactor thread (injected; tests run it inline).
        self._in_thread = in_thread or self._reactor_thread_pool
        self._loop = task.LoopingCall(self._once)
        self._loop.clock = reactor
        self._interval = interval
        self._running: defer.Deferred | None = None

    def start(self) -> None:
        if hasattr(self._store, "checkpoint"):
            self._loop.start(self._interval, now=False)

    def _reactor_thread_pool(self, function) -> defer.Deferred:
        from twisted.internet import threads

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), function)

    def _once(self):
        if self._running is not None:
            return None
        if self._commits is not None:
            count = self._commits()
            if count == self._checkpointed_at:
                return None
            self._checkpointed_at = count
        self._running = defer.maybeDeferred(self._in_thread, self._store.checkpoint)
        self._running.addErrback(self._failed)
        self._running.addBoth(self._done)
        return None

    def _failed(self, failure) -> None:
        if self._log is not None:
            from engine.log import safe_error

            self._log.warning("store.checkpoint_failed", error=safe_error(failure.value))

    def _done(self, _):
        self._running = None

    def stop(self) -> defer.Deferred:
        if self._loop.running:
            self._loop.stop()
        return self._running if self._running is not None else defer.succeed(None)


class Pruner:
    """Deletes delivered entries, message bodies and released held events older than the
    retention, in slices.

    Each slice is a bounded ``Prune`` through the group committer, so pruning a large
    backlog never holds the store for long; it repeats while slices come back full.
    """

    def __init__(self, committer, *, reactor, retention: float, interval: float = 60.0, log=None) -> None:
        from engine.store import Prune

        self._prune_op = Prune
        self._committer = committer
        self._reactor = reactor
        self._retention = retention
        self._log = log
        self._loop = task.LoopingCall(self.prune)
        self._loop.clock = reactor
        self._interval = interval
        self._busy = False

    def start(self) -> None:
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    @defer.inlineCallbacks
    def prune(self):
        if self._busy:
            return
        self._busy = True
        try:
            before = self._reactor.seconds() - self._retention
            total_entries = total_messages = total_held = 0
            while True:
                op = self._prune_op(before=before)
                result = yield self._committer.submit(op)
                total_entries += result.entries
                total_messages += result.messages
                total_held += result.held
                if max(result.entries, result.messages, result.held) < op.limit:
                    break
            if (total_entries or total_messages or total_held) and self._log is not None:
                self._log.info("store.pruned", entries=total_entries, messages=total_messages, held=total_held)
        except Exception as error:  # noqa: BLE001 - retried on the next interval
            if self._log is not None:
                from engine.log import safe_error

                self._log.warning("store.prune_failed", error=safe_error(error))
        finally:
            self._busy = False
