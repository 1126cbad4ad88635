"""Running receive and delivery in two processes, so Koppel can use two cores.

`koppel run --role all` (the default) does everything in one process. One Python
process runs on one core, and at synchronous=FULL every group commit holds its reactor
for an fsync, delivery included. With `--role receive` and `--role deliver` against the
same store, one process receives (listeners, duplicate checks, mapping, ACKs) and the
other delivers (queue senders, pruning). They share nothing but the store: the receiver
commits messages and their queue entries as always; the deliverer learns of them by
polling the store's `data_version` (`StoreWatcher`) and writes its own bookkeeping.

One process per role and store (`store.claim()`): two deliverers would send twice, two
receivers would both resume the same unmapped messages. The receiving side keeps a
`RemoteQueue` per queue instead of a sender, for the queue-full check.
"""

from __future__ import annotations

from twisted.internet import defer

ALL, RECEIVE, DELIVER = "all", "receive", "deliver"
ROLES = (ALL, RECEIVE, DELIVER)

ELSEWHERE = "elsewhere"  # the state a receive-only process shows for a queue


def receives(role: str) -> bool:
    return role in (ALL, RECEIVE)


def delivers(role: str) -> bool:
    return role in (ALL, DELIVER)


class RemoteQueue:
    """Stands in for a queue's sender in a process that does not deliver.

    It answers what receiving needs: is the queue full? Its depth counts what this
    process queued and is set from the store every ``refresh`` (the deliverer's
    progress); it never exports queue metrics, which are the deliverer's."""

    state = ELSEWHERE

    def __init__(self, queue: str, destinations: dict) -> None:
        self.queue = queue
        self.depth = 0
        self.update(destinations)

    def update(self, destinations: dict) -> None:
        self.destinations = destinations
        self.max_queue = min(d.max_queue for d in destinations.values())

    def enqueued(self, count: int = 1) -> None:
        self.depth += count

    def refresh(self, depths: dict[str, int]) -> None:
        self.depth = depths.get(self.queue, 0)

    def start(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def poll(self) -> None:
        pass

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)


class StoreWatcher:
    """Calls ``on_change`` soon after another process commits to the store.

    Polls ``store.data_version()`` (one PRAGMA, no table read) every ``fastest``
    seconds while things change, backing off to ``slowest`` when idle, so a quiet
    night costs a few wake-ups a second and a busy feed waits at most ``fastest``."""

    def __init__(self, store, *, clock, on_change, fastest: float = 0.002, slowest: float = 0.05,
                 log=None) -> None:
        self._store = store
        self._clock = clock
        self._on_change = on_change
        self._fastest = fastest
        self._slowest = slowest
        self._log = log
        self._interval = fastest
        self._seen: int | None = None
        self._call = None

    def start(self) -> None:
        if self._call is None:
            self._check()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        try:
            version = self._store.data_version()
        except Exception as error:  # noqa: BLE001 - a store hiccup must not stop the watching
            version = self._seen
            if self._log is not None:
                from engine.log import safe_error

                self._log.warning("store.watch_failed", error=safe_error(error))
        if version != self._seen:
            first = self._seen is None
            self._seen = version
            self._interval = self._fastest
            if not first:
                self._on_change()
        else:
            self._interval = min(self._slowest, self._interval * 2)
        self._call = self._clock.callLater(self._interval, self._check)
