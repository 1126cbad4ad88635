"""Group commit: one writer thread, many waiting connections, one fsync per batch.

Callers submit store write operations and get a Deferred that fires, in the
reactor thread, after the transaction holding their operation has committed. Under
load many operations share a transaction, so durability does not cost one fsync per
message. A failing batch is retried operation by operation, so one poisoned
operation fails alone.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from twisted.internet import defer

_STOP = object()


class GroupCommitter:
    def __init__(
        self,
        store,
        *,
        call_from_thread: Callable[..., Any],
        max_batch: int = 1024,
        metrics=None,
        log=None,
    ) -> None:
        self._store = store
        self._call_from_thread = call_from_thread
        self._max_batch = max_batch
        self._metrics = metrics
        self._log = log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="koppel-store-writer", daemon=True)
        self._thread.start()

    def submit(self, op) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._queue.put((op, d))
        return d

    def submit_many(self, ops) -> defer.Deferred:
        """Several operations in the same transaction (all commit or none)."""
        d: defer.Deferred = defer.Deferred()
        self._queue.put((tuple(ops), d))
        return d

    def stop(self) -> defer.Deferred:
        """Commit everything already submitted, then end the thread."""
        if self._stopped is None:
            self._stopped = defer.Deferred()
            self._queue.put((_STOP, None))
        return self._stopped

    def _run(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        while True:
            items = [get()]
            while len(items) < self._max_batch:
                try:
                    items.append(get_nowait())
                except queue.Empty:
                    break
            stop = any(op is _STOP for op, _ in items)
            work = [(op, d) for op, d in items if op is not _STOP]
            if work:
                outcomes = self._commit(work)
                self._call_from_thread(_fire, outcomes)
            if stop:
                self._call_from_thread(self._stopped.callback, None)
                return

    def _commit(self, work):
        ops = []
        for op, _ in work:
            ops.extend(op if isinstance(op, tuple) else (op,))
        started = time.perf_counter()
        try:
            results = self._store.write(ops)
        except Exception as error:  # noqa: BLE001 - the store's failure is answered, not raised
            self._count_error(error)
            if len(work) == 1:
                return [(work[0][1], False, error)]
            return [outcome for item in work for outcome in self._commit([item])]
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

            self._call_from_thread(self._log.error, "store.commit_failed", error=safe_error(error))


def _fire(outcomes) -> None:
    for d, ok, value in outcomes:
        if ok:
            d.callback(value)
        else:
            d.errback(value)
