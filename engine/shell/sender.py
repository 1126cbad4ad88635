"""Delivery: one sender per queue (a destination's host:port).

A queue is sent over lanes: a lane is one connection with at most one message in
flight, the next only after its ACK. ``order: fifo`` (the default) is one lane that
holds on its head until it is delivered or dead-lettered. ``order: none`` with
``parallel: N`` is N lanes that each take the next due entry: a message that fails
is recorded (its next attempt time in the store) and set aside until due while the
lanes go on with the others.

Entries are streamed from the store a page at a time, so memory stays flat however
long the queue: FIFO holds one page; unordered holds one page, the entries in flight
and at most ``SET_ASIDE`` entries waiting out a backoff; the rest of those are read
from the store again when the earliest of them is due. The verdict on each answer is
the pure ``judge``; the backoff is the pure ``backoff_delay``; this class only
connects, waits and records.

Bookkeeping (delivered, failed, dead) goes through the group committer without
waiting for it before the next send: a crash before that commit resends the
message after restart (at-least-once, counted as a redelivery), it never loses it.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections import deque
from typing import Callable

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString

from engine.config import DestinationConfig
from engine.core.delivery import judge
from engine.core.outbound import OutboundError, prepare
from engine.core.retry import backoff_delay
from engine.log import Repeats, get_logger, safe_error
from engine.shell.client import MLLPClientFactory, describe_failure
from engine.store import DeadLetter, MarkDelivered, MarkSending, QueueEntry, RecordFailure

PAGE = 100
# ...and bodies of about this many bytes per page: a queue of 20 MB letters held behind a
# down archive is read a letter at a time, not 2 GB at once (a page of 100 referrals of
# 2.6 KB is 260 KB, so the drain of small messages pages as before).
PAGE_BYTES = 2 * 1024 * 1024
# Unordered: at most this many entries waiting out a backoff are kept in memory (the
# earliest due); the others are read from the store again when the earliest of them is due.
SET_ASIDE = 1000
# Delivery marks ride along with a commit at most this much later (receive commits are
# immediate). A crash in between resends those messages after restart (at-least-once).
BOOKKEEPING_WINDOW = 0.02
# A delivered or dead-letter mark the store refused is submitted again this much later.
BOOKKEEPING_RETRY = 1.0

# The sender's states, in one place: what it is doing now.
IDLE = "idle"  # nothing to send
CONNECTING = "connecting"
SENDING = "sending"  # a message is on the wire, waiting for its ACK
BACKOFF = "backoff"  # the head failed (unordered: everything left failed); waiting before the next attempt
PAUSED = "paused"  # an operator paused the queue
STOPPED = "stopped"
STATES = (IDLE, CONNECTING, SENDING, BACKOFF, PAUSED, STOPPED)
# A sender with several lanes shows the busiest lane's state.
_PRECEDENCE = (SENDING, CONNECTING, BACKOFF, PAUSED, IDLE, STOPPED)

FIFO = "fifo"
UNORDERED = "none"

# The last error of a message on the wire when a stop gave up waiting for its ACK
STOPPED_BEFORE_ACK = "engine stopped before the acknowledgement (sent again at the next start)"
# A lane's connect_error when the stop cut its connect short
STOPPED_WHILE_CONNECTING = "engine stopped while connecting"


class Lane:
    """One connection to the destination with at most one message in flight."""

    def __init__(self, sender: QueueSender, index: int) -> None:
        self.sender = sender
        self.index = index
        self.state = IDLE
        self.client = None
        self.up = False  # counted in the destination_connected gauge
        self.connect_error = ""
        self.connect_failures = 0  # in a row (unordered: the lane backs off, not only the entry)
        self.hold_until = 0.0  # unordered: no new connect attempt before this
        self.stale = False  # the endpoint changed while sending or connecting: reconnect first
        # The destination has closed a connection on us: look for its FIN before each send
        # (a peek, one syscall: 6% of the drain's time, so only for destinations that close).
        self.peer_closes = False
        self.running: defer.Deferred | None = None
        self._wake: defer.Deferred | None = None

    @defer.inlineCallbacks
    def connected(self):
        """The lane's client, connecting first if needed; None if that failed (``connect_error``)."""
        sender = self.sender
        if self.client is not None and self.client.transport is not None and self.client.transport.connected:
            return self.client
        self.state = CONNECTING
        try:
            d = sender._connect()
            d.addTimeout(sender.settings.connect_timeout, sender.reactor)
            client = yield d
        except Exception as error:  # noqa: BLE001 - refused, unresolvable, timed out: retried
            if sender._stopping and isinstance(error, defer.CancelledError):
                # The stop cut the connect short (--drain-timeout; a connect that runs out of
                # connect_timeout fails as a TimeoutError): no failure of the destination.
                self.connect_error = STOPPED_WHILE_CONNECTING
                return None
            self.connect_error = describe_failure(error)
            self.connect_failures += 1
            self._set_up(False)
            return None
        self.client = client
        self.connect_failures = 0
        client.lost_d.addCallback(self._lost, client)
        self._set_up(True)
        sender.log.info("destination.connected", **({"lane": self.index} if sender.mode == UNORDERED else {}))
        return client

    def _lost(self, _, client) -> None:
        if self.client is client:  # not closed by us (close and disconnect let go of it first)
            self.peer_closes = True
            self.client = None
            self._set_up(False)

    def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None and client.transport is not None:
            client.transport.abortConnection()
        self._set_up(False)

    def close(self) -> None:
        """Close in good order (the destination answered, or closed its side after its
        answer); the next message connects anew. The destination still counts as connected:
        with ``connection: per-message`` this happens after every message, and the
        connected gauge must not flicker (nor page) for it."""
        client, self.client = self.client, None
        if client is not None and client.transport is not None:
            client.transport.loseConnection()

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.sender._connected_changed()

    def sleep(self, seconds: float | None) -> defer.Deferred:
        """Wait ``seconds`` (None: until woken); ``wake()`` ends any wait early."""
        wake = self._wake = defer.Deferred()
        if seconds is not None:
            call = self.sender.reactor.callLater(seconds, self.wake)

            def cancel_timer(result):
                if call.active():
                    call.cancel()
                return result

            wake.addBoth(cancel_timer)
        return wake

    def wake(self) -> None:
        if self._wake is not None and not self._wake.called:
            wake, self._wake = self._wake, None
            wake.callback(None)


class QueueSender:
    def __init__(
        self,
        queue: str,
        destinations: dict[str, DestinationConfig],
        *,
        store,
        committer,
        reactor,
        metrics,
        connect: Callable[[], defer.Deferred] | None = None,
        draw: Callable[[], float] = random.random,
        poll_interval: float = 1.0,
        log=None,
    ) -> None:
        self.queue = queue
        self.destinations = destinations
        self.settings = next(iter(destinations.values()))  # connection settings agree (config checks)
        self.store = store
        self.committer = committer
        self.reactor = reactor
        self.metrics = metrics
        self._children: dict = {}
        self.draw = draw
        self.poll_interval = poll_interval
        self.log = log or get_logger(queue=queue)
        self._connect = connect or self._connect_endpoint
        self.depth = 0
        self.max_queue = min(d.max_queue for d in destinations.values())
        self.mode = FIFO if self.settings.order == FIFO else UNORDERED
        self._lanes: list[Lane] = [Lane(self, 0)]
        self._generation = 0  # bumped when a reload changes the order: the old loops end
        self._switching: defer.Deferred | None = None
        self._wanted_mode = self.mode  # what the latest config asks for (a switch may be under way)
        # FIFO: the current page, head last
        self._buffer: list[QueueEntry] = []
        self._last_id = 0  # entries up to here are handled (or in flight)
        # unordered: see _take
        self._page: deque[QueueEntry] = deque()
        self._cursor = 0  # entries up to here have been read once
        self._sweep: tuple[int, int] | None = None  # (after_id, last id) while re-reading set-aside entries
        self._aside: list[tuple[float, int, QueueEntry]] = []  # (due, id, entry), earliest first
        self._aside_ids: set[int] = set()
        self._dropped_due = math.inf  # earliest due time of set-aside entries not kept in memory
        self._dropped_probe: QueueEntry | None = None  # the entry with that due time
        self._inflight: set[int] = set()
        self._unsettled: dict[int, tuple[object, float | None]] = {}  # id -> (token, due if still pending)
        self._running: defer.Deferred | None = None
        self._started = False
        self._stopping = False
        self._paused = False
        self._poller = task.LoopingCall(self.poll)
        self._poller.clock = reactor
        self._failures_logged = Repeats()
        self._resend_candidate: int | None = None  # on the wire when the engine last stopped
        self._reread = False  # a resume asked to read the queue again (see _forget_pages)
        self._refused_marks: list[tuple[object, defer.Deferred]] = []  # marks the store refused, to retry

    @property
    def state(self) -> str:
        states = {lane.state for lane in self._lanes}
        return next((s for s in _PRECEDENCE if s in states), STOPPED)

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        try:
            self._resend_candidate = self.store.inflight_entry(self.queue)
        except Exception as error:  # noqa: BLE001 - only the resend count depends on it
            self.log.warning("queue.inflight_unknown", error=safe_error(error))
        self.poll()
        self._poller.start(self.poll_interval, now=False)
        self._started = True
        self._start_loops()

    def stop(self) -> defer.Deferred:
        """Stop after the messages in flight (if any) are answered or time out."""
        self._stopping = True
        if self._poller.running:
            self._poller.stop()
        if self._refused_marks:  # their last try now, in a commit the engine's stop flushes
            self._resubmit_marks()
        self.wake()
        d = self._switching or self._all_running()
        return d.addBoth(lambda _: self._disconnect())

    def update(self, destinations: dict[str, DestinationConfig]) -> None:
        """New settings from a config reload; a changed endpoint reconnects on the next send."""
        endpoint_changed = next(iter(destinations.values())).endpoint != self.settings.endpoint
        self.destinations = destinations
        self.settings = next(iter(destinations.values()))
        self.max_queue = min(d.max_queue for d in destinations.values())
        if endpoint_changed:
            for lane in self._lanes:
                if lane.state in (SENDING, CONNECTING):
                    lane.stale = True  # after its message in flight, or once connected
                else:
                    lane.disconnect()
        mode = FIFO if self.settings.order == FIFO else UNORDERED
        if self._started and not self._stopping:
            if self._switching is not None:
                self._wanted_mode = mode  # the pending switch starts the lanes the latest config wants
            elif mode != self.mode:
                self._wanted_mode = mode
                self._switch(mode)
            elif mode == UNORDERED:
                self._add_lanes()  # fewer: the extra lanes end after their message in flight
        else:
            self.mode = mode
        self.wake()

    def wake(self) -> None:
        """New entries were committed (or an operator acted): look again now."""
        for lane in list(self._lanes):
            lane.wake()

    def enqueued(self, count: int = 1) -> None:
        self.depth += count
        self._gauge("queue_depth").set(self.depth)
        self.wake()

    def poll(self) -> None:
        """Once a second: operator flags (pause, retry-now) and the depth/age gauges."""
        try:
            paused = self.store.is_paused(self.queue)
            self.depth = self.store.queue_depths().get(self.queue, 0)
            head = self.store.queue_head(self.queue, 1, bodies=False)  # its age, not its bytes
        except Exception as error:  # noqa: BLE001 - a store hiccup must not stop delivery
            self.log.warning("queue.poll_failed", error=safe_error(error))
            return
        self._gauge("queue_depth").set(self.depth)
        self._gauge("queue_oldest_age_seconds").set(
            max(0.0, self.reactor.seconds() - head[0].enqueued_at) if head else 0
        )
        self._gauge("queue_paused").set(1 if paused else 0)
        if paused != self._paused:
            self._paused = paused
            self.log.info("queue.paused" if paused else "queue.resumed")
            if not paused:
                self._forget_pages()
            self.wake()
        elif self.mode == UNORDERED:
            self._poll_unordered(head)
        elif self.state == BACKOFF and head and head[0].next_attempt_at <= self.reactor.seconds():
            buffered = self._buffer[-1] if self._buffer else None
            if buffered is not None and buffered.id == head[0].id and head[0].attempts >= buffered.attempts:
                # The loop re-reads the head from the buffer, not the store: carry the
                # operator's new due time over (once our own failure record is committed).
                self._buffer[-1] = _with(buffered, next_attempt_at=head[0].next_attempt_at)
            self.wake()  # an operator said retry-now
        elif self.state == IDLE and head:
            self.wake()  # entries queued by another process (resend, replay)

    def _poll_unordered(self, head: list[QueueEntry]) -> None:
        probe = self._aside[0][2] if self._aside else self._dropped_probe
        if probe is not None:
            try:
                stored = self.store.get_entry(probe.id)
            except Exception as error:  # noqa: BLE001 - a store hiccup must not stop delivery
                self.log.warning("queue.poll_failed", error=safe_error(error))
                return
            if (
                stored is not None
                and stored.state == "pending"
                and stored.attempts >= probe.attempts  # our own failure record is committed
                and stored.next_attempt_at < probe.next_attempt_at
            ):
                self._retry_now(stored.next_attempt_at)
                return
        if head and any(lane.state in (IDLE, BACKOFF) for lane in self._lanes):
            self.wake()  # entries queued by another process (resend, replay)

    # -- FIFO: one lane that holds on its head ----------------------------------------
    @defer.inlineCallbacks
    def _run(self, lane: Lane, generation: int):
        while not self._stopping and generation == self._generation:
            if self._reread:  # a resume came while this lane was sending: its entry is done now
                self._forget_pages(now=True)
            if self._paused:
                lane.state = PAUSED
                yield lane.sleep(None)
                continue
            entry = self._head()
            if entry is None:
                lane.state = IDLE
                yield lane.sleep(None)
                continue
            now = self.reactor.seconds()
            destination = self.destinations.get(entry.destination, self.settings)
            # Given up only after at least one attempt: a message that waited behind a blocked
            # head gets its own try before it can become a dead letter.
            if self._gave_up(entry, destination, now):
                self._dead_letter(entry, "gave up: undelivered for longer than give_up_after", None)
                continue
            if entry.next_attempt_at > now:
                lane.state = BACKOFF
                yield lane.sleep(entry.next_attempt_at - now)
                continue
            attempt = self._attempt(lane, entry, destination)
            waited = not attempt.called
            failed = yield attempt
            if failed is not None:
                entry, delay = failed
                self._buffer[-1] = entry
                if self._stopping or generation != self._generation:
                    break  # stopping (or switching): not after waiting out the backoff
                lane.state = BACKOFF
                yield lane.sleep(delay)
            elif not waited:
                yield lane.sleep(0)  # dead-lettered without sending: let the reactor turn
            # Otherwise the next message goes out now, in the turn that read this one's ACK
            # (the client never takes a second frame of that read for the next one's answer):
            # a reactor turn between them cost 10% of the drain rate.
        lane.state = STOPPED

    def _head(self) -> QueueEntry | None:
        if not self._buffer:
            after = self._last_id
            while True:  # (after a switch: not an entry delivered or dead-lettered whose mark waits)
                page = self.store.queue_head(self.queue, PAGE, after_id=after, max_bytes=PAGE_BYTES)
                self._buffer = [e for e in page if self._unsettled.get(e.id, (None, 0))[1] is not None]
                if self._buffer or not _full(page):
                    break
                after = page[-1].id
            self._buffer.reverse()  # pop() from the end is O(1)
        return self._buffer[-1] if self._buffer else None

    # -- unordered: lanes that take the next due entry ---------------------------------
    @defer.inlineCallbacks
    def _run_lane(self, lane: Lane, generation: int):
        while not self._stopping and generation == self._generation and lane.index < self.settings.parallel:
            now = self.reactor.seconds()
            if self._reread:  # see _run; unordered: once no lane has an entry on the wire
                if self._inflight:
                    lane.state = IDLE
                    yield lane.sleep(None)  # the lane whose entry is done last wakes the others
                    continue
                self._forget_pages(now=True)
                self.wake()
            if self._paused:
                lane.state = PAUSED
                yield lane.sleep(None)
                continue
            if lane.hold_until > now:  # the destination refused this lane: back off, then connect again
                lane.state = BACKOFF
                yield lane.sleep(lane.hold_until - now)
                continue
            entry = self._take(now)
            if entry is None:
                due = self._next_due()
                lane.state = IDLE if due is None else BACKOFF
                yield lane.sleep(None if due is None else max(0.0, due - now))
                continue
            destination = self.destinations.get(entry.destination, self.settings)
            if self._gave_up(entry, destination, now):
                self._dead_letter(entry, "gave up: undelivered for longer than give_up_after", None)
                continue
            if entry.next_attempt_at > now:  # taken for give_up_after, not yet past it after all
                self._inflight.discard(entry.id)
                self._set_aside(entry, due=entry.next_attempt_at)
                continue
            try:
                attempt = self._attempt(lane, entry, destination)
                waited = not attempt.called
                failed = yield attempt
            except BaseException:
                self._inflight.discard(entry.id)
                raise
            if failed is not None:
                entry, _ = failed
                self._inflight.discard(entry.id)
                self._set_aside(entry)
                if lane.connect_failures:  # not connected: this lane waits before it tries again
                    retry = self.settings.retry
                    lane.hold_until = now + backoff_delay(
                        lane.connect_failures, initial=retry.initial, factor=retry.factor, maximum=retry.max,
                        jitter=retry.jitter, draw=self.draw(),
                    )
                    continue
            if not waited:  # see _run: the next request at once, unless nothing went on the wire
                yield lane.sleep(0)
        lane.state = STOPPED
        if lane.index >= self.settings.parallel and not self._stopping and generation == self._generation:
            lane.disconnect()  # parallel lowered by a reload
            if lane in self._lanes:
                self._lanes.remove(lane)

    def _take(self, now: float) -> QueueEntry | None:
        """The next due entry, now in flight: set-aside ones first, then the store in id order."""
        while self._aside and self._aside[0][0] <= now:
            due, _, entry = self._aside.pop(0)
            self._aside_ids.discard(entry.id)
            try:  # kept without its body (see _set_aside): read it again
                message = self.store.get_message(entry.message_id)
            except Exception:
                self._set_aside(entry, due=due)  # still waiting; the store error goes to the lane
                raise
            if message is None:
                continue  # pruned meanwhile: nothing left to send
            self._inflight.add(entry.id)
            return _with(entry, raw=message.raw)
        while True:
            while self._page:
                entry = self._page.popleft()
                if self._due(entry) > now:
                    self._set_aside(entry)
                    continue
                self._inflight.add(entry.id)
                return entry
            if not self._refill(now):
                return None

    def _refill(self, now: float) -> bool:
        """Read the next page: re-read set-aside entries no longer in memory once the earliest
        is due (a sweep up to the cursor), else the entries after the cursor."""
        if self._sweep is None and self._dropped_due <= now:
            self._sweep = (0, self._cursor)
            self._dropped_due, self._dropped_probe = math.inf, None
        if self._sweep is not None:
            after, last = self._sweep
            page = self.store.queue_head(self.queue, PAGE, after_id=after, max_bytes=PAGE_BYTES)
            mine = [e for e in page if e.id <= last]
            self._sweep = (mine[-1].id, last) if mine and len(mine) == len(page) and _full(page) else None
            self._page.extend(e for e in mine if not self._known(e))
            return True
        page = self.store.queue_head(self.queue, PAGE, after_id=self._cursor, max_bytes=PAGE_BYTES)
        if not page:
            return False
        self._cursor = page[-1].id
        self._page.extend(e for e in page if not self._known(e))
        return True

    def _known(self, entry: QueueEntry) -> bool:
        """Already in memory, in flight, or handled with its bookkeeping not yet committed."""
        if entry.id in self._inflight or entry.id in self._aside_ids:
            return True
        unsettled = self._unsettled.get(entry.id)
        if unsettled is None:
            return False
        due = unsettled[1]
        if due is not None:  # failed, its record not committed yet, and not kept: read it again later
            self._note_dropped(due, entry)
        return True

    def _due(self, entry: QueueEntry) -> float:
        """When something must happen to an entry: its next attempt, or giving up on it."""
        due = entry.next_attempt_at
        destination = self.destinations.get(entry.destination, self.settings)
        if destination.give_up_after is not None and entry.attempts:
            due = min(due, math.nextafter(entry.enqueued_at + destination.give_up_after, math.inf))
        return due

    def _set_aside(self, entry: QueueEntry, due: float | None = None) -> None:
        """Keep an entry until it is due, or (too many kept) note it to be read again then."""
        due = self._due(entry) if due is None else due
        if len(self._aside) >= SET_ASIDE:
            if due >= self._aside[-1][0]:
                self._note_dropped(due, entry)
                return
            last_due, last_id, last = self._aside.pop()
            self._aside_ids.discard(last_id)
            self._note_dropped(last_due, last)
        # Kept without its body: up to SET_ASIDE entries wait out a backoff behind a
        # destination that refuses them, and those may be 15 MB letters (read again in _take).
        bisect.insort(self._aside, (due, entry.id, entry if entry.raw is None else _with(entry, raw=None)))
        self._aside_ids.add(entry.id)

    def _note_dropped(self, due: float, entry: QueueEntry) -> None:
        if due < self._dropped_due:
            self._dropped_due, self._dropped_probe = due, (entry if entry.raw is None else _with(entry, raw=None))

    def _next_due(self) -> float | None:
        due = min(self._aside[0][0] if self._aside else math.inf, self._dropped_due)
        return None if due == math.inf else due

    def _retry_now(self, at: float) -> None:
        """An operator moved the set-aside entries' next attempt to ``at`` (retry-now)."""
        aside, self._aside = self._aside, []
        self._aside_ids.clear()
        for _, _, entry in aside:
            self._set_aside(_with(entry, next_attempt_at=min(entry.next_attempt_at, at)))
        if self._dropped_due != math.inf:
            self._dropped_due = min(self._dropped_due, at)
        for lane in self._lanes:
            lane.hold_until = 0.0
        self.log.info("queue.retry_now")
        self.wake()

    # -- lanes and modes --------------------------------------------------------------
    def _start_loops(self) -> None:
        generation = self._generation
        if self.mode == FIFO:
            self._lanes = self._lanes[:1]
            self._start_lane(self._lanes[0], generation)
        else:
            for lane in self._lanes:
                self._start_lane(lane, generation)
            self._add_lanes()

    def _add_lanes(self) -> None:
        while len(self._lanes) < self.settings.parallel:
            free = set(range(self.settings.parallel)) - {lane.index for lane in self._lanes}
            lane = Lane(self, min(free))
            self._lanes.append(lane)
            self._start_lane(lane, self._generation)

    def _start_lane(self, lane: Lane, generation: int) -> None:
        run = self._run if self.mode == FIFO else self._run_lane
        lane.running = run(lane, generation)
        lane.running.addErrback(self._crashed, lane, generation)
        self._running = lane.running if self.mode == FIFO else None

    def _all_running(self) -> defer.Deferred:
        if self._running is not None:
            return self._running
        running = [lane.running for lane in self._lanes if lane.running is not None]
        return defer.DeferredList(running).addCallback(lambda _: None)

    def _switch(self, mode: str) -> None:
        """A reload changed the order: let the lanes finish what is in flight, then start over."""
        self._generation += 1
        old = self._all_running()
        self.wake()

        def restart(_):
            self._switching = None
            if self._stopping:
                return
            self.committer.flush()  # the new mode reads the queue from its head: marks first
            for lane in self._lanes:
                lane.disconnect()
            self.mode = self._wanted_mode
            self._lanes = [Lane(self, 0)]
            self._reset()
            self._start_loops()
            return self._all_running()

        self._switching = old.addCallback(restart)

    def _forget_pages(self, *, now: bool = False) -> None:
        """On resume: read what waits from the store again, not from the page read before the
        pause. An operator may have moved entries off this queue meanwhile (koppel queue move),
        and they must not be sent here as well. While a lane still has an entry on the wire
        (a pause waits for its answer) the loops do it before their next entry (_reread)."""
        if not now and any(lane.state not in (PAUSED, IDLE, STOPPED) for lane in self._lanes):
            self._reread = True
            return
        self._reread = False
        if self.mode == FIFO:
            self._buffer = []  # re-read after _last_id: nothing handled is read again
        else:
            self._reset()

    def _reset(self) -> None:
        """Forget what was read; it is read from the store again (after a crash or a switch)."""
        self._buffer = []
        self._last_id = 0
        self._page.clear()
        self._cursor = 0
        self._sweep = None
        self._aside, self._aside_ids = [], set()
        self._dropped_due, self._dropped_probe = math.inf, None

    # -- one attempt, both modes ---------------------------------------------------------
    @defer.inlineCallbacks
    def _attempt(self, lane: Lane, entry: QueueEntry, destination: DestinationConfig):
        """Send ``entry`` on ``lane`` and record the verdict; (failed entry, delay) if it is retried."""
        try:
            outbound = prepare(
                entry.raw,
                rewrite=destination.rewrite,
                source_charset=entry.charset,
                target_charset=destination.charset,
            )
        except OutboundError as error:
            self._dead_letter(entry, str(error), None)
            return None
        if lane.stale:  # the endpoint changed while this lane was busy: not the old connection
            lane.stale = False
            lane.disconnect()
        client = lane.client
        if client is not None and lane.peer_closes and client.peer_closed():
            lane.close()  # closed after its last ACK (one message per connection): a new one
            client = None
        if client is None or client.transport is None or not client.transport.connected:
            client = yield lane.connected()  # only when (re)connecting: a Deferred less per message
            if client is not None and lane.stale:  # changed while connecting: connect again
                lane.stale = False
                lane.disconnect()
                client = yield lane.connected()
            if client is None:
                return self._not_connected(entry, lane)
        lane.state = SENDING
        self._count("delivery_sent_total", entry.destination).inc()
        if entry.attempts or entry.id == self._resend_candidate:
            self._count("delivery_redeliveries_total", entry.destination).inc()
            if entry.id == self._resend_candidate and not entry.attempts:
                self.log.info("delivery.resend_after_restart", entry_id=entry.id, control_id=entry.control_id)
        if self.mode == FIFO or entry.id == self._resend_candidate:
            self._resend_candidate = None
        # Best effort, not waited for: recorded in this reactor turn's group commit.
        self.committer.submit(
            MarkSending(queue=self.queue, entry_id=entry.id), within=BOOKKEEPING_WINDOW
        ).addErrback(self._bookkeeping_failed)
        for last_try in (False, True):
            mark = client.mark()
            try:
                answer = yield client.request(outbound, timeout=destination.ack_timeout)
                failure = None
                break
            except Exception as error:  # noqa: BLE001 - timeout or connection loss: retried
                answer, failure = None, describe_failure(error)
                if self._stopping and isinstance(error, defer.CancelledError):
                    # The stop gave up waiting (--drain-timeout): not a failure of the destination,
                    # so no backoff; sent again first thing at the next start.
                    lane.disconnect()
                    return self._failed(entry, STOPPED_BEFORE_ACK, None, delay=0.0)
                if last_try or self._stopping or not client.met_close(error, mark):
                    lane.disconnect()
                    break
            # The message met the close that followed the previous ACK, its FIN unseen at our
            # check: sent again at once on a new connection, not a failed attempt, no backoff,
            # and the destination still counts as connected (as when the peek sees the FIN).
            lane.peer_closes = True
            lane.close()
            self.log.debug("delivery.stale_connection", entry_id=entry.id, control_id=entry.control_id)
            client = yield lane.connected()
            if client is None:
                return self._not_connected(entry, lane)
            lane.state = SENDING
        outcome = judge(
            answer,
            sent_control_id=entry.control_id or "",
            on_nak=_on_nak(destination),  # cached per destination config
            failure=failure,
        )
        if outcome.code:  # an AA for another message is no AA for ours: counted as "mismatch"
            self._count("delivery_acks_total", entry.destination, "mismatch" if outcome.mismatch else outcome.code).inc()
        if outcome.resync:
            lane.disconnect()  # the stream cannot be trusted: start clean next time
        elif answer is not None and (outcome.verdict == "retry" or destination.connection == "per-message"):
            # per-message: as configured. A NAK: its retry goes on a new connection, since every
            # attempt carries the same MSH-10, and a late second answer to this attempt (AE,
            # then AA) would otherwise be taken for the retry's answer.
            lane.close()
        if outcome.verdict == "delivered":
            self._delivered(entry, answer)
        elif outcome.verdict == "dead-letter":
            self._dead_letter(entry, outcome.reason, answer)
        else:
            return self._failed(entry, outcome.reason, answer)
        return None

    def _not_connected(self, entry: QueueEntry, lane: Lane) -> tuple[QueueEntry, float] | None:
        """A failed connect is a failed attempt; one the stop cut short is none (nothing was
        sent: the entry stays as stored, due as it was, and goes first at the next start)."""
        if lane.connect_error is STOPPED_WHILE_CONNECTING:
            return None
        return self._failed(entry, lane.connect_error, None)

    def _gave_up(self, entry: QueueEntry, destination: DestinationConfig, now: float) -> bool:
        return (
            destination.give_up_after is not None
            and bool(entry.attempts)
            and now - entry.enqueued_at > destination.give_up_after
        )

    def _done(self, entry: QueueEntry) -> None:
        if self.mode == FIFO:
            self._buffer.pop()
            self._last_id = entry.id
        else:
            self._inflight.discard(entry.id)
        self.depth = max(0, self.depth - 1)
        self._gauge("queue_depth").set(self.depth)

    def _delivered(self, entry: QueueEntry, answer: bytes) -> None:
        now = self.reactor.seconds()
        self._settling(entry.id, None, self._commit_mark(MarkDelivered(entry_id=entry.id, ack=answer, at=now)))
        self._done(entry)
        self._histogram("delivery_latency_seconds", entry.destination).observe(max(0.0, now - entry.enqueued_at))
        self._failures_logged.reset()
        self.log.debug("delivery.acked", entry_id=entry.id, message_id=entry.message_id, control_id=entry.control_id)

    def _dead_letter(self, entry: QueueEntry, reason: str, answer: bytes | None) -> None:
        now = self.reactor.seconds()
        mark = DeadLetter(entry_id=entry.id, reason=reason, ack=answer, at=now)
        self._settling(entry.id, None, self._commit_mark(mark))
        self._done(entry)
        self._count("dead_letters_total", entry.destination).inc()
        self.log.warning(
            "delivery.dead_letter",
            entry_id=entry.id,
            message_id=entry.message_id,
            control_id=entry.control_id,
            type=entry.message_type,
            reason=reason,
        )

    def _failed(self, entry: QueueEntry, reason: str, answer: bytes | None,
                delay: float | None = None) -> tuple[QueueEntry, float]:
        """Record the failed attempt (committed at once); the entry as it now is, and its
        backoff (``delay``, when given, instead of the retry policy's)."""
        destination = self.destinations.get(entry.destination, self.settings)
        attempt = entry.attempts + 1
        retry = destination.retry
        if delay is None:
            delay = backoff_delay(
                attempt, initial=retry.initial, factor=retry.factor, maximum=retry.max, jitter=retry.jitter,
                draw=self.draw(),
            )
        now = self.reactor.seconds()
        next_at = now + delay
        self._settling(
            entry.id,
            next_at,
            self.committer.submit(
                RecordFailure(entry_id=entry.id, error=reason, ack=answer, next_attempt_at=next_at, at=now)
            ),
        )
        self._count("delivery_retries_total", entry.destination).inc()
        self._log_failure(entry, reason, attempt, delay)
        return _with(entry, attempts=attempt, next_attempt_at=next_at, last_error=reason), delay

    def _commit_mark(self, op) -> defer.Deferred:
        """A delivered or dead-letter mark, submitted again until the store takes it (disk full, a
        lock held too long): the sender has moved on, and an entry left 'pending' would count in
        the depth and the oldest age for ever and be sent again after a restart, out of order.
        Given up only when the sender stops (then it is resent after the restart, at least once)."""
        return self.committer.submit(op, within=BOOKKEEPING_WINDOW).addErrback(self._mark_refused, op)

    def _mark_refused(self, failure, op) -> defer.Deferred:
        if self._stopping:
            return failure
        waiting: defer.Deferred = defer.Deferred()
        if not self._refused_marks:  # logged once per outage, retried once a second for all marks
            self._bookkeeping_failed(failure)
            self.reactor.callLater(BOOKKEEPING_RETRY, self._resubmit_marks)
        self._refused_marks.append((op, waiting))
        return waiting

    def _resubmit_marks(self) -> None:
        """Every refused mark again in one transaction: during an outage thousands of marks
        may wait, and one failing commit a second is enough (each alone would be a failing
        transaction and an error line apiece, on a disk that is already full)."""
        refused, self._refused_marks = self._refused_marks, []
        if not refused:  # (stop() gave them their last try already)
            return

        def committed(_):
            for _, waiting in refused:
                waiting.callback(None)

        def again(_failure):
            if self._stopping:
                for _, waiting in refused:
                    waiting.errback(defer.CancelledError())
                return
            if not self._refused_marks:
                self.reactor.callLater(BOOKKEEPING_RETRY, self._resubmit_marks)
            self._refused_marks[:0] = refused

        self.committer.submit_many(tuple(op for op, _ in refused)).addCallbacks(committed, again)

    def _settling(self, entry_id: int, due: float | None, d: defer.Deferred) -> None:
        """Bookkeeping submitted for an entry: until it commits, the store still shows the entry
        as it was, so a re-read must not take it for a new one."""
        token = object()
        self._unsettled[entry_id] = (token, due)

        def settled(_):
            if self._unsettled.get(entry_id, (None,))[0] is token:
                del self._unsettled[entry_id]

        d.addErrback(self._bookkeeping_failed).addBoth(settled)

    def _log_failure(self, entry: QueueEntry, reason: str, attempt: int, delay: float) -> None:
        """The first failures are logged each; after that one line per power of two."""
        seen = self._failures_logged.count(reason)
        if seen is not None:
            self.log.warning(
                "delivery.retry",
                entry_id=entry.id,
                control_id=entry.control_id,
                reason=reason,
                attempt=attempt,
                retry_in=round(delay, 3),
                repeated=seen,
            )

    # -- connection -----------------------------------------------------------------
    def _connected_changed(self) -> None:
        self._gauge("destination_connected").set(1 if any(lane.up for lane in self._lanes) else 0)

    def _disconnect(self) -> None:
        for lane in self._lanes:
            lane.disconnect()

    def _connect_endpoint(self) -> defer.Deferred:
        endpoint = clientFromString(self.reactor, self.settings.endpoint)
        return endpoint.connect(MLLPClientFactory(clock=self.reactor, keepalive=self.settings.keepalive))

    # -- helpers ----------------------------------------------------------------------
    def _bookkeeping_failed(self, failure) -> None:
        self.log.error("queue.bookkeeping_failed", error=safe_error(failure.value))

    def _crashed(self, failure, lane: Lane, generation: int) -> None:
        self.log.error("queue.sender_crashed", error=safe_error(failure.value))
        lane.state = STOPPED
        if not self._stopping:  # start again after a pause rather than stop delivering
            self.reactor.callLater(self.poll_interval, self._restart, lane, generation)

    def _restart(self, lane: Lane, generation: int) -> None:
        if not self._stopping and generation == self._generation and lane in self._lanes:
            if self.mode == FIFO:
                self._buffer = []
            else:  # what was read may be out of step: read it again (in flight and unsettled are kept)
                self._reset()
            self._start_lane(lane, generation)

    def _gauge(self, name: str):
        return self._child(name, self.queue)

    def _count(self, name: str, *labels: str):
        return self._child(name, *labels)

    def _histogram(self, name: str, destination: str):
        return self._child(name, destination)

    def _child(self, name: str, *labels: str):
        """A metric child, looked up once: labels() costs more than the increment (profiled)."""
        key = (name, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self.metrics, name).labels(*labels)
        return child


@functools.lru_cache(maxsize=256)
def _on_nak(destination: DestinationConfig) -> dict[str, str]:
    nak = destination.on_nak
    return {"AE": nak.AE, "CE": nak.CE, "AR": nak.AR, "CR": nak.CR}


def _with(entry: QueueEntry, **changes) -> QueueEntry:
    from dataclasses import replace

    return replace(entry, **changes)


def _full(page: list[QueueEntry]) -> bool:
    """The page may not be the queue's last: it has PAGE entries, or its bodies reached
    PAGE_BYTES (the store stopped there)."""
    return len(page) == PAGE or sum(len(e.raw or b"") for e in page) >= PAGE_BYTES
