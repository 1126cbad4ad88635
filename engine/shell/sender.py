"""Delivery: one ordered sender per queue (a destination's host:port).

One persistent connection, one message in flight, the next only after its ACK.
Entries are streamed from the store a page at a time, so memory stays flat
however long the queue. The verdict on each answer is the pure ``judge``; the
backoff is the pure ``backoff_delay``; this class only connects, waits and records.

Bookkeeping (delivered, failed, dead) goes through the group committer without
waiting for it before the next send: a crash before that commit resends the
message after restart (at-least-once, counted as a redelivery), it never loses it.
"""

from __future__ import annotations

import random
from typing import Callable

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import TimeoutError as EndpointTimeoutError

from engine.config import DestinationConfig
from engine.core.delivery import judge
from engine.core.outbound import OutboundError, prepare
from engine.core.retry import backoff_delay
from engine.log import get_logger, safe_error
from engine.shell.client import MLLPClientFactory
from engine.store import DeadLetter, MarkDelivered, MarkSending, QueueEntry, RecordFailure

PAGE = 100
# Delivery marks ride along with a commit at most this much later (receive commits are
# immediate). A crash in between resends those messages after restart (at-least-once).
BOOKKEEPING_WINDOW = 0.02

# The sender's states, in one place: what it is doing now.
IDLE = "idle"  # nothing to send
CONNECTING = "connecting"
SENDING = "sending"  # a message is on the wire, waiting for its ACK
BACKOFF = "backoff"  # the head failed; waiting before the next attempt
PAUSED = "paused"  # an operator paused the queue
STOPPED = "stopped"
STATES = (IDLE, CONNECTING, SENDING, BACKOFF, PAUSED, STOPPED)


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
        self.draw = draw
        self.poll_interval = poll_interval
        self.log = log or get_logger(queue=queue)
        self._connect = connect or self._connect_endpoint
        self.state = IDLE
        self.depth = 0
        self.max_queue = min(d.max_queue for d in destinations.values())
        self._buffer: list[QueueEntry] = []
        self._last_id = 0  # entries up to here are handled (or in flight)
        self._client = None
        self._wake: defer.Deferred | None = None
        self._running: defer.Deferred | None = None
        self._stopping = False
        self._paused = False
        self._poller = task.LoopingCall(self.poll)
        self._poller.clock = reactor
        self._failures_logged: dict[str, int] = {}
        self._connect_error = ""
        self._resend_candidate: int | None = None  # on the wire when the engine last stopped

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        try:
            self._resend_candidate = self.store.inflight_entry(self.queue)
        except Exception as error:  # noqa: BLE001 - only the resend count depends on it
            self.log.warning("queue.inflight_unknown", error=safe_error(error))
        self.poll()
        self._poller.start(self.poll_interval, now=False)
        self._running = self._run()
        self._running.addErrback(self._crashed)

    def stop(self) -> defer.Deferred:
        """Stop after the message in flight (if any) is answered or times out."""
        self._stopping = True
        if self._poller.running:
            self._poller.stop()
        self.wake()
        d = self._running or defer.succeed(None)
        return d.addBoth(lambda _: self._disconnect())

    def update(self, destinations: dict[str, DestinationConfig]) -> None:
        """New settings from a config reload; a changed endpoint reconnects on the next send."""
        endpoint_changed = next(iter(destinations.values())).endpoint != self.settings.endpoint
        self.destinations = destinations
        self.settings = next(iter(destinations.values()))
        self.max_queue = min(d.max_queue for d in destinations.values())
        if endpoint_changed and self.state != SENDING:
            self._disconnect()
        self.wake()

    def wake(self) -> None:
        """New entries were committed (or an operator acted): look again now."""
        if self._wake is not None and not self._wake.called:
            wake, self._wake = self._wake, None
            wake.callback(None)

    def enqueued(self, count: int = 1) -> None:
        self.depth += count
        self._gauge("queue_depth").set(self.depth)
        self.wake()

    def poll(self) -> None:
        """Once a second: operator flags (pause, retry-now) and the depth/age gauges."""
        try:
            paused = self.store.is_paused(self.queue)
            self.depth = self.store.queue_depths().get(self.queue, 0)
            head = self.store.queue_head(self.queue, 1)
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
            self.wake()
        elif self.state == BACKOFF and head and head[0].next_attempt_at <= self.reactor.seconds():
            buffered = self._buffer[-1] if self._buffer else None
            if buffered is not None and buffered.id == head[0].id and head[0].attempts >= buffered.attempts:
                # The loop re-reads the head from the buffer, not the store: carry the
                # operator's new due time over (once our own failure record is committed).
                self._buffer[-1] = _with(buffered, next_attempt_at=head[0].next_attempt_at)
            self.wake()  # an operator said retry-now
        elif self.state == IDLE and head:
            self.wake()  # entries queued by another process (resend, replay)

    # -- the loop -------------------------------------------------------------------
    @defer.inlineCallbacks
    def _run(self):
        while not self._stopping:
            if self._paused:
                self.state = PAUSED
                yield self._sleep(None)
                continue
            entry = self._head()
            if entry is None:
                self.state = IDLE
                yield self._sleep(None)
                continue
            now = self.reactor.seconds()
            destination = self.destinations.get(entry.destination, self.settings)
            # Given up only after at least one attempt: a message that waited behind a blocked
            # head gets its own try before it can become a dead letter.
            if (
                destination.give_up_after is not None
                and entry.attempts
                and now - entry.enqueued_at > destination.give_up_after
            ):
                self._dead_letter(entry, "gave up: undelivered for longer than give_up_after", None)
                continue
            if entry.next_attempt_at > now:
                self.state = BACKOFF
                yield self._sleep(entry.next_attempt_at - now)
                continue
            try:
                outbound = prepare(
                    entry.raw,
                    rewrite=destination.rewrite,
                    source_charset=entry.charset,
                    target_charset=destination.charset,
                )
            except OutboundError as error:
                self._dead_letter(entry, str(error), None)
                continue
            client = yield self._connected()
            if client is None:
                yield self._failed(entry, self._connect_error, None)
                continue
            self.state = SENDING
            self._count("delivery_sent_total", entry.destination).inc()
            if entry.attempts or entry.id == self._resend_candidate:
                self._count("delivery_redeliveries_total", entry.destination).inc()
                if entry.id == self._resend_candidate and not entry.attempts:
                    self.log.info("delivery.resend_after_restart", entry_id=entry.id, control_id=entry.control_id)
            self._resend_candidate = None
            # Best effort, not waited for: recorded in this reactor turn's group commit.
            self.committer.submit(
                MarkSending(queue=self.queue, entry_id=entry.id), within=BOOKKEEPING_WINDOW
            ).addErrback(self._bookkeeping_failed)
            try:
                answer = yield client.request(outbound, timeout=destination.ack_timeout)
                failure = None
            except Exception as error:  # noqa: BLE001 - timeout or connection loss: retried
                answer, failure = None, _describe(error)
                self._disconnect()
            outcome = judge(
                answer,
                sent_control_id=entry.control_id or "",
                on_nak=_on_nak(destination),
                failure=failure,
            )
            if outcome.code:
                self._count("delivery_acks_total", entry.destination, outcome.code).inc()
            if outcome.verdict == "delivered":
                self._delivered(entry, answer)
            elif outcome.verdict == "dead-letter":
                self._dead_letter(entry, outcome.reason, answer)
            else:
                if outcome.resync:
                    self._disconnect()  # the stream cannot be trusted: start clean next time
                yield self._failed(entry, outcome.reason, answer)
            if outcome.verdict != "retry":
                # Send the next message on a later turn: the answer fired inside the client's
                # dataReceived, and a second (unsolicited) frame in the same read must find
                # no request waiting, or it would be taken for the next message's answer.
                yield self._sleep(0)
        self.state = STOPPED

    def _head(self) -> QueueEntry | None:
        if not self._buffer:
            self._buffer = self.store.queue_head(self.queue, PAGE, after_id=self._last_id)
            self._buffer.reverse()  # pop() from the end is O(1)
        return self._buffer[-1] if self._buffer else None

    def _done(self, entry: QueueEntry) -> None:
        self._buffer.pop()
        self._last_id = entry.id
        self.depth = max(0, self.depth - 1)
        self._gauge("queue_depth").set(self.depth)

    def _delivered(self, entry: QueueEntry, answer: bytes) -> None:
        now = self.reactor.seconds()
        self.committer.submit(
            MarkDelivered(entry_id=entry.id, ack=answer, at=now), within=BOOKKEEPING_WINDOW
        ).addErrback(self._bookkeeping_failed)
        self._done(entry)
        self._histogram("delivery_latency_seconds", entry.destination).observe(max(0.0, now - entry.enqueued_at))
        self._failures_logged.clear()
        self.log.debug("delivery.acked", entry_id=entry.id, message_id=entry.message_id, control_id=entry.control_id)

    def _dead_letter(self, entry: QueueEntry, reason: str, answer: bytes | None) -> None:
        now = self.reactor.seconds()
        self.committer.submit(
            DeadLetter(entry_id=entry.id, reason=reason, ack=answer, at=now), within=BOOKKEEPING_WINDOW
        ).addErrback(
            self._bookkeeping_failed
        )
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

    def _failed(self, entry: QueueEntry, reason: str, answer: bytes | None) -> defer.Deferred:
        """Record the failed attempt and wait out the backoff (an operator may cut it short)."""
        destination = self.destinations.get(entry.destination, self.settings)
        attempt = entry.attempts + 1
        retry = destination.retry
        delay = backoff_delay(
            attempt, initial=retry.initial, factor=retry.factor, maximum=retry.max, jitter=retry.jitter,
            draw=self.draw(),
        )
        now = self.reactor.seconds()
        next_at = now + delay
        self._buffer[-1] = _with(entry, attempts=attempt, next_attempt_at=next_at, last_error=reason)
        self.committer.submit(
            RecordFailure(entry_id=entry.id, error=reason, ack=answer, next_attempt_at=next_at, at=now)
        ).addErrback(self._bookkeeping_failed)
        self._count("delivery_retries_total", entry.destination).inc()
        self._log_failure(entry, reason, attempt, delay)
        self.state = BACKOFF
        return self._sleep(delay)

    def _log_failure(self, entry: QueueEntry, reason: str, attempt: int, delay: float) -> None:
        """The first failures are logged each; after that one line per power of two."""
        seen = self._failures_logged.get(reason, 0) + 1
        self._failures_logged[reason] = seen
        if seen <= 3 or seen & (seen - 1) == 0:
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
    @defer.inlineCallbacks
    def _connected(self):
        if self._client is not None and self._client.transport is not None and self._client.transport.connected:
            return self._client
        self.state = CONNECTING
        self._gauge("destination_connected").set(0)
        try:
            d = self._connect()
            d.addTimeout(self.settings.connect_timeout, self.reactor)
            client = yield d
        except Exception as error:  # noqa: BLE001 - refused, unresolvable, timed out: retried
            timed_out = isinstance(error, (defer.TimeoutError, EndpointTimeoutError))  # not an ACK timeout
            self._connect_error = "connect timed out" if timed_out else _describe(error)
            return None
        self._client = client
        client.lost_d.addCallback(self._lost, client)
        self._gauge("destination_connected").set(1)
        self.log.info("destination.connected")
        return client

    def _lost(self, _, client) -> None:
        if self._client is client:
            self._client = None
            self._gauge("destination_connected").set(0)

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.transport is not None:
            client.transport.abortConnection()
        self._gauge("destination_connected").set(0)

    def _connect_endpoint(self) -> defer.Deferred:
        endpoint = clientFromString(self.reactor, self.settings.endpoint)
        return endpoint.connect(MLLPClientFactory(clock=self.reactor))

    # -- helpers ----------------------------------------------------------------------
    def _sleep(self, seconds: float | None) -> defer.Deferred:
        """Wait ``seconds`` (None: until woken); ``wake()`` ends any wait early."""
        wake = self._wake = defer.Deferred()
        if seconds is not None:
            call = self.reactor.callLater(seconds, self.wake)

            def cancel_timer(result):
                if call.active():
                    call.cancel()
                return result

            wake.addBoth(cancel_timer)
        return wake

    def _bookkeeping_failed(self, failure) -> None:
        self.log.error("queue.bookkeeping_failed", error=safe_error(failure.value))

    def _crashed(self, failure) -> None:
        self.log.error("queue.sender_crashed", error=safe_error(failure.value))
        self.state = STOPPED
        if not self._stopping:  # start again after a pause rather than stop delivering
            self.reactor.callLater(self.poll_interval, self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self._buffer = []
            self._running = self._run()
            self._running.addErrback(self._crashed)

    def _gauge(self, name: str):
        return getattr(self.metrics, name).labels(self.queue)

    def _count(self, name: str, *labels: str):
        return getattr(self.metrics, name).labels(*labels)

    def _histogram(self, name: str, destination: str):
        return getattr(self.metrics, name).labels(destination)


def _on_nak(destination: DestinationConfig) -> dict[str, str]:
    nak = destination.on_nak
    return {"AE": nak.AE, "CE": nak.CE, "AR": nak.AR, "CR": nak.CR}


def _describe(error: BaseException) -> str:
    name = type(error).__name__
    return {
        "TimeoutError": "no acknowledgement in time",
        "ConnectionClosed": "connection closed before the acknowledgement",
        "ConnectionRefusedError": "connection refused",
        "ConnectionLost": "connection lost",
        "DNSLookupError": "host name could not be resolved",
        "CancelledError": "connect timed out",
    }.get(name, f"connection failed ({name})")


def _with(entry: QueueEntry, **changes) -> QueueEntry:
    from dataclasses import replace

    return replace(entry, **changes)

