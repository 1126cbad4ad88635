"""The MLLP listener: a thin Twisted shell around the pure framer and intake.

``dataReceived`` feeds the framer, and for every complete frame reads the header,
submits the message to the group committer and writes the ACK only after the
commit. ACKs on one connection go out in arrival order whatever order commits
finish in. Nothing a peer sends can raise out of ``dataReceived``.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, NamedTuple

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from zope.interface import implementer

from engine.config import peer_allowed
from engine.core import mllp
from engine.core.ack import ControlIds, format_timestamp
from engine.core.convert import hospital_zone
from engine.core.errors import Rejection
from engine.core.intake import (
    ACCEPT_ALL,
    IN_PROGRESS,
    INTERNAL_ERROR,
    QUEUE_FULL,
    STORE_FAILED,
    AcceptRules,
    Assessment,
    assess,
    assess_oversize,
)
from engine.log import Repeats, get_logger, safe_error
from engine.shell.wire import keep_alive, send_now
from engine.store import UNANSWERED, Append, QueueTarget, ReceivedMessage

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Metric label values for message types: a channel without an accept list takes any MSH-9 a
# sender makes up, so the label is "other" past this many, or for anything not shaped TYP^TRG.
MAX_TYPE_LABELS = 50
_TYPE_LABEL = re.compile(r"[A-Z0-9]{3}\^[A-Z0-9]{2,3}", re.ASCII)


class Routing(NamedTuple):
    """Where one message goes: the destinations of its raw forwards, the route that maps it."""

    targets: tuple[QueueTarget, ...]
    route: Any  # a RouteConfig with a `map`, or None


NO_ROUTING = Routing((), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveSettings:
    """What the listener needs from a channel's config, already validated."""

    channel: str
    rules: AcceptRules = ACCEPT_ALL
    default_charset: str = "8859/1"
    max_message_bytes: int = 64 * 1024 * 1024
    lenient_framing: bool = False
    keepalive: float | None = 60.0  # seconds idle before TCP keepalive probes; None: off
    idle_timeout: float | None = 600.0
    frame_timeout: float | None = 30.0
    allow: tuple[Network, ...] | None = None
    max_connections: int = 64
    duplicate_window: float = 24 * 3600.0
    store_failure: Rejection = STORE_FAILED
    # Where an accepted message goes (its raw forwards, the route that maps it): decided once,
    # at receive, and handed to on_stored with it.
    routing: Callable[[Assessment, bytes], "Routing"] = field(default=lambda a, raw: NO_ROUTING)
    # Delivery hooks: is any of these queues full (answer AE, store nothing queued),
    # and tell the senders that entries were committed.
    queue_full: Callable[[tuple[QueueTarget, ...]], bool] = field(default=lambda targets: False)
    on_queued: Callable[[tuple[QueueTarget, ...]], None] = field(default=lambda targets: None)
    # After an accepted message is committed (and before its ACK is written): hand it on
    # to mapping. Must not raise.
    on_stored: Callable[..., object] = field(default=lambda *a: None)
    ack_mode: str = "on-store"  # on-map: the ACK waits for the mapping outcome
    always_answer: bool = False  # answer even where MSH-15 (NE, ER, SU) says not to
    # Fields known at receive time for the stored row (e.g. processing="filtered"), so an
    # on-store channel records what no route takes in the same insert, not a later update.
    receive_marks: Callable[..., dict] = field(default=lambda assessment, targets, routed: {})
    # At start-up, for a message stored 'pending' whose mapping never committed: map it now.
    resume: Callable[..., object] = field(default=lambda *a: None)

    def allows(self, host: str) -> bool:
        return peer_allowed(self.allow, host)


class _Refused(protocol.Protocol):
    """A refused peer's connection: closed at once. (Returning None from buildProtocol does
    that for TCP, but an ssl: listener's TLS wrapper would wrap None and keep the socket.)"""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class _Answer:
    """One frame's place in the connection's ACK order."""

    __slots__ = ("ack", "code", "done", "started")

    def __init__(self, started: float) -> None:
        self.ack = b""
        self.code = ""
        self.done = False
        self.started = started


@implementer(IHalfCloseableProtocol, IPushProducer)
class MLLPReceiver(protocol.Protocol):
    """One connection. It is also the producer of its own transport's ACKs: the transport pauses
    it (stop reading) while too many of them wait for a peer that does not read, and resumes
    it once they are written."""

    def __init__(self, factory: "MLLPListenerFactory", peer: str) -> None:
        self.factory = factory
        self.peer = peer
        settings = factory.settings
        self.reader = mllp.FrameReader(
            max_frame_bytes=settings.max_message_bytes, lenient=settings.lenient_framing
        )
        self._answers: deque[_Answer] = deque()
        self._idle_call = None
        self._frame_call = None
        self._abort_call = None  # cuts a timed-out connection whose peer does not read
        self._closing = False
        self._lost = False
        self._producing = False  # registered as the transport's producer
        self._paused = False  # not reading: the peer has not read its ACKs
        self.lost = defer.Deferred()  # fires when the connection is gone (for draining)
        self.log = factory.log.bind(peer=peer)

    # -- connection lifecycle -------------------------------------------------
    def connectionMade(self) -> None:
        keep_alive(self.transport, self.factory.settings.keepalive)
        # The transport pauses us (stop reading) once more than its bufferSize (64 KiB, about
        # 550 ACKs) waits beyond the kernel's send buffer (up to 4 MB) for a peer that does not
        # read. Not a larger bufferSize: Twisted also reads with it, and a 1 MiB recv() per
        # read cost 15% of the end-to-end rate.
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self, True)
            self._producing = True
        self.factory.opened(self)
        self._reset_idle()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        for event in self.reader.eof():
            self._discarded(event)
        self._cancel(self._idle_call)
        self._cancel(self._frame_call)
        self._cancel(self._abort_call)
        self._idle_call = self._frame_call = self._abort_call = None
        self._answers.clear()
        self._lost = True
        self.factory.closed(self)
        self.lost.callback(None)

    def readConnectionLost(self) -> None:
        """The peer half-closed (shutdown(SHUT_WR), `nc -N`, Java's shutdownOutput()) after its
        last message and still reads: its ACKs go out, then the connection closes. Without this
        Twisted took the EOF for the end of the connection and the ACKs were never written."""
        for event in self.reader.eof():
            self._discarded(event)
        self._close("peer-half-closed")

    def writeConnectionLost(self) -> None:
        self._lose()

    # -- backpressure (IPushProducer, called by the transport) ---------------------
    def pauseProducing(self) -> None:
        """Too many ACKs wait for the peer to read them: stop reading its messages. A frame it
        is in the middle of is not timed out meanwhile: the stall is ours."""
        if self._closing or self._lost:
            return
        self._paused = True
        self.transport.pauseProducing()
        self._cancel(self._frame_call)
        self._frame_call = None

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._closing or self._lost:
            return  # not reading any more anyway (a half-closed read side must not be read again)
        self.transport.resumeProducing()
        self._watch_frame()

    def stopProducing(self) -> None:
        """The connection is gone; connectionLost does the cleaning up."""

    # -- bytes in -------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._reset_idle()
        try:
            events = self.reader.feed(data)
        except Exception as error:  # noqa: BLE001 - a framer bug must not kill the listener
            self.log.error("mllp.framer_failed", error=safe_error(error))
            self._close("internal-error")
            return
        for event in events:
            if type(event) is mllp.FrameReceived:
                self._frame(event.payload)
            elif type(event) is mllp.JunkDiscarded:
                self.factory.metrics.junk_bytes.labels(self.factory.settings.channel).inc(event.size)
                self.log.debug("mllp.junk_discarded", size=event.size)
            elif type(event) is mllp.FrameTooLarge:
                self._oversize(event)
            else:
                self._discarded(event)
        self._watch_frame()

    def _frame(self, payload: bytes) -> None:
        factory = self.factory
        settings = factory.settings
        answer = _Answer(time.perf_counter())
        self._answers.append(answer)
        assessment = None
        try:
            assessment = assess(payload, rules=settings.rules, default_charset=settings.default_charset)
            routed = settings.routing(assessment, payload) if assessment.accepted else NO_ROUTING
            message = factory.message_for(assessment, payload, self.peer, routed)
            d = factory.committer.submit(Append(message=message))
        except Exception as error:  # noqa: BLE001 - answered with AE, never raised
            self.log.error("message.intake_failed", error=safe_error(error))
            try:  # answer the message's own MSH-10 when its header could be read,
                self._settle(answer, assessment, INTERNAL_ERROR, None)
            except Exception:  # noqa: BLE001 - else a bare AE, still never raised
                self._settle(answer, None, INTERNAL_ERROR, None)
            return
        d.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(answer, assessment, message, routed),
            errbackArgs=(answer, assessment, message),
        )

    def _stored(self, result, answer: _Answer, assessment: Assessment, message: ReceivedMessage,
                routed: Routing = NO_ROUTING) -> None:
        factory = self.factory
        if result.duplicate_of is not None:
            factory.count(factory.metrics.duplicates).inc()
            self.log.info(
                "message.duplicate",
                message_id=result.duplicate_of,
                control_id=message.control_id,
                type=message.message_type,
            )
            if result.in_progress:  # on-map, its first copy not answered yet: neither is this one
                self._settle(answer, assessment, IN_PROGRESS, message, message_id=result.duplicate_of)
                return
            answer.ack, answer.code = result.ack, message.ack_code
            answer.done = True
            self._flush()
            return
        if message.targets:
            factory.settings.on_queued(message.targets)
        outcome = None
        if message.status != "accepted":  # a rejected message is kept for the record, never mapped
            self._settle(answer, assessment, None, message, message_id=result.message_id)
            return
        try:
            outcome = factory.settings.on_stored(
                result.message_id, assessment, message, lambda rejection: factory.acknowledge(assessment, rejection),
                routed,
            )
        except Exception as error:  # noqa: BLE001 - mapping trouble never costs the sender its ACK
            self.log.error("message.handoff_failed", message_id=result.message_id, error=safe_error(error))
        # answered as it was stored (a reload may have changed the ack mode since): an on-map
        # message is stored 'unanswered', and its answer is the mapping's outcome
        if outcome is not None and message.processing == UNANSWERED:
            outcome.addCallback(self._mapped, answer, assessment, message, result.message_id)
            outcome.addErrback(self._not_mapped, answer, assessment, message, result.message_id)
            return
        self._settle(answer, assessment, None, message, message_id=result.message_id)

    def _mapped(self, outcome, answer, assessment, message, message_id) -> None:
        """ack: on-map: AA once mapped (or held for its entry), else the NAK the processor stored
        (b"" when MSH-15 withholds it: then nothing is sent, never the provisional AA/CA)."""
        if getattr(outcome, "ack", None) is not None:
            factory = self.factory
            answer.ack, answer.code, answer.done = outcome.ack, outcome.ack_code, True
            factory.count(factory.metrics.received, "other", "rejected").inc()
            self.log.warning("message.rejected", message_id=message_id, control_id=message.control_id,
                             type=message.message_type, code=outcome.ack_code, reason=outcome.rejection.text)
            self._flush()
            return
        self._settle(answer, assessment, None, message, message_id=message_id)

    def _not_mapped(self, failure, answer, assessment, message, message_id) -> None:
        self.log.error("message.mapping_failed", message_id=message_id, error=safe_error(failure.value))
        self._settle(answer, assessment, INTERNAL_ERROR, message, message_id=message_id)

    def _not_stored(self, failure, answer: _Answer, assessment: Assessment, message: ReceivedMessage) -> None:
        self.log.error(
            "message.store_failed",
            control_id=message.control_id,
            type=message.message_type,
            error=safe_error(failure.value),
        )
        # A rejection stands even if it could not be recorded; an accept becomes AE/CE.
        failure = None if assessment.rejection else self.factory.settings.store_failure
        self._settle(answer, assessment, failure, message, stored=False)

    def _settle(self, answer, assessment, failure, message, *, message_id=None, stored=True) -> None:
        factory = self.factory
        if assessment is None or not stored or failure is not None:
            code, ack = factory.acknowledge(assessment, failure)
        else:
            code, ack = message.ack_code, message.ack
        answer.ack, answer.code, answer.done = ack, code, True
        outcome = "accepted" if assessment is not None and assessment.accepted and stored else "rejected"
        if failure is not None:
            outcome = "failed"
        label = factory.type_label(message.message_type) if (outcome == "accepted" and message) else "other"
        factory.count(factory.metrics.received, label, outcome).inc()
        if message is not None:
            factory.count(factory.metrics.received_bytes).inc(len(message.raw))
        if outcome != "accepted":
            self.log.warning(
                "message.rejected",
                message_id=message_id,
                control_id=message.control_id if message else None,
                type=message.message_type if message else None,
                code=code,
                reason=(failure or assessment.rejection).text if (failure or assessment) else None,
            )
        else:
            self.log.debug(
                "message.acked", message_id=message_id, control_id=message.control_id, type=label, code=code
            )
        self._flush()

    def _oversize(self, event: mllp.FrameTooLarge) -> None:
        factory = self.factory
        settings = factory.settings
        factory.metrics.frames_discarded.labels(settings.channel, "oversize").inc()
        assessment = assess_oversize(event.head, default_charset=settings.default_charset,
                                     rejected_code=settings.rules.rejected_code)
        code, ack = factory.acknowledge(assessment, None)
        self.log.warning("message.too_large", size=event.size, limit=settings.max_message_bytes, code=code)
        answer = _Answer(time.perf_counter())
        answer.ack, answer.code, answer.done = ack, code, True
        self._answers.append(answer)
        self._flush()

    def _discarded(self, event) -> None:
        reason = getattr(event, "reason", "aborted")
        self.factory.metrics.frames_discarded.labels(self.factory.settings.channel, reason).inc()
        self.log.warning("mllp.frame_discarded", reason=reason, size=event.size)

    # -- bytes out, in arrival order -------------------------------------------
    def _flush(self) -> None:
        answers = self._answers
        factory = self.factory
        metrics = factory.metrics
        while answers and answers[0].done:
            answer = answers.popleft()
            if answer.ack:
                send_now(self.transport, mllp.encode_frame(answer.ack))
                factory.count(metrics.acks_sent, answer.code).inc()
            else:
                factory.count(metrics.acks_withheld, answer.code).inc()
            factory.count(metrics.ack_latency).observe(time.perf_counter() - answer.started)
        if self._closing and not answers and not self._lost:
            self._lose()

    # -- timers -----------------------------------------------------------------
    def _reset_idle(self) -> None:
        timeout = self.factory.settings.idle_timeout
        if timeout is None:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.factory.clock.callLater(timeout, self._timed_out, "idle-timeout")

    def _watch_frame(self) -> None:
        """frame_timeout is how long a frame that is open may go without a byte: a frame that
        stalled is dropped, but a 20 MB letter trickling over a slow VPN is not cut off at 30 s
        (as a deadline from its first byte did), nor is a frame begun in the read that
        finished the one before it."""
        timeout = self.factory.settings.frame_timeout
        if timeout is None or self._paused:
            return
        if self.reader.in_frame:
            if self._frame_call is not None and self._frame_call.active():
                self._frame_call.reset(timeout)
            else:
                self._frame_call = self.factory.clock.callLater(timeout, self._timed_out, "frame-timeout")
        elif self._frame_call is not None:
            self._cancel(self._frame_call)
            self._frame_call = None

    def _timed_out(self, reason: str) -> None:
        settings = self.factory.settings
        if reason == "frame-timeout":
            # The peer stopped mid-frame: what it sent of it is dropped, nothing stored.
            self.reader.eof()
            self.factory.metrics.frames_discarded.labels(settings.channel, "timeout").inc()
        self._close(reason)
        # A close waits until the ACKs are written, and a peer that reads nothing never takes
        # them: its connection would stay open for ever, holding a max_connections slot.
        # Cut after one more period of the same timeout.
        grace = settings.idle_timeout if reason == "idle-timeout" else settings.frame_timeout
        if not self._lost and grace is not None:
            self._abort_call = self.factory.clock.callLater(
                grace, self.abort_unread, "peer not reading its acknowledgements", seconds=grace)

    def abort_unread(self, reason: str, **fields) -> None:
        """Cut a closing connection that is still open: its peer does not read its last ACKs,
        so they never leave and the close never completes."""
        self._cancel(self._abort_call)
        self._abort_call = None
        if not self._lost:
            self.log.warning("connection.aborted", reason=reason, **fields)
            self.transport.abortConnection()

    def _close(self, reason: str) -> None:
        """Stop reading; close once ACKs for frames already received are written."""
        if self._closing:
            return
        self._closing = True
        self.factory.metrics.connections_closed.labels(self.factory.settings.channel, reason).inc()
        self.log.info("connection.closing", reason=reason)
        self._cancel(self._frame_call)
        if not self._answers:
            self._lose()

    def _lose(self) -> None:
        """Close once what is written has gone out. The producer goes first: a transport with a
        paused producer resumes it when its buffer empties, instead of closing."""
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    @staticmethod
    def _cancel(call) -> None:
        if call is not None and call.active():
            call.cancel()


class MLLPListenerFactory(protocol.Factory):
    """One per channel: builds receivers, enforces allow-list and connection limit."""

    def __init__(
        self,
        settings: ReceiveSettings,
        *,
        committer,
        metrics,
        clock: IReactorTime,
        control_ids: Callable[[], str],
        now: Callable[[], datetime] = lambda: datetime.now(hospital_zone()),
        log=None,
    ) -> None:
        self.settings = settings
        self.committer = committer
        self.metrics = metrics
        self.clock = clock
        self.control_ids = control_ids
        self.now = now
        self.log = log or get_logger(channel=settings.channel)
        self.receivers: set[MLLPReceiver] = set()
        # A reload moved the channel to a new listener: this one's connections drain, and its
        # count no longer speaks for the channel's koppel_connections_open.
        self.retired = False
        self._stamp_second = -1.0
        self._stamp = ""
        self._children: dict = {}
        self._type_labels: set[str] = set()
        self._refusals = Repeats()

    def update(self, settings: ReceiveSettings) -> None:
        """A reload's new rules, for the connections already open as well: the framer's size
        limit and framing mode, and the allow list (a peer no longer allowed is closed once the
        ACKs of what it sent before are written). Keepalive and max_connections apply to the
        connections opened from now on."""
        self.settings = settings
        for receiver in list(self.receivers):
            receiver.reader.max_frame_bytes = settings.max_message_bytes
            receiver.reader.lenient = settings.lenient_framing
            host = receiver.peer.rsplit(":", 1)[0]
            if not settings.allows(host):
                receiver._close("not-allowed")

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        port = getattr(addr, "port", 0)
        if not self.settings.allows(host):
            self._refused("not-allowed", host, port)
            return _Refused()
        if len(self.receivers) >= self.settings.max_connections:
            self._refused("too-many", host, port)
            return _Refused()
        return MLLPReceiver(self, f"{host}:{port}")

    def _refused(self, reason: str, host: str, port: int) -> None:
        self.metrics.connections_refused.labels(self.settings.channel, reason).inc()
        seen = self._refusals.count((reason, host))
        if seen is not None:  # a scanner or a retry loop is logged, not logged thousands of times
            self.log.warning("connection.refused", reason=reason, peer=f"{host}:{port}", repeated=seen)

    def opened(self, receiver: MLLPReceiver) -> None:
        self.receivers.add(receiver)
        channel = self.settings.channel
        self.metrics.connections.labels(channel).inc()
        self.metrics.connections_open.labels(channel).set(len(self.receivers))
        receiver.log.info("connection.opened")

    def closed(self, receiver: MLLPReceiver) -> None:
        self.receivers.discard(receiver)
        if not self.retired:
            self.metrics.connections_open.labels(self.settings.channel).set(len(self.receivers))
        receiver.log.info("connection.closed")

    def timestamp(self) -> str:
        """HL7 timestamp for ACKs, formatted once per second (hot path)."""
        second = self.clock.seconds() // 1
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = format_timestamp(self.now())
        return self._stamp

    def type_label(self, message_type: str | None) -> str:
        """The `type` label: the message type while a channel has seen at most MAX_TYPE_LABELS
        (an accept list bounds them; without one a sender could make a series per made-up
        type), else "other"."""
        if message_type in self._type_labels:
            return message_type  # type: ignore[return-value]
        if not message_type or len(self._type_labels) >= MAX_TYPE_LABELS or not _TYPE_LABEL.fullmatch(message_type):
            return "other"
        self._type_labels.add(message_type)
        return message_type

    def count(self, metric, *labels):
        """A metric child for these labels, looked up once (labels() is costly per message)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.settings.channel, *labels)
        return child

    def acknowledge(self, assessment: Assessment | None, failure) -> tuple[str, bytes]:
        if assessment is None:  # we could not even read the frame: a bare AE
            from engine.core.header import read_header

            assessment = Assessment(
                header=read_header(b"", default_charset="8859/1"), rejection=failure, payload_hash=b""
            )
        return assessment.ack(timestamp=self.timestamp(), control_id=self.control_ids(), failure=failure,
                              always=self.settings.always_answer)

    def message_for(self, assessment: Assessment, payload: bytes, peer: str,
                    routed: Routing = NO_ROUTING) -> ReceivedMessage:
        """The store record, with the ACK we will send once it is committed."""
        header = assessment.header
        # on-map: raw forwards are queued only once the message has mapped (see on_stored).
        on_map = self.settings.ack_mode == "on-map"
        targets = routed.targets if assessment.accepted and not on_map else ()
        if targets and self.settings.queue_full(targets):
            assessment = replace(assessment, rejection=QUEUE_FULL)
            targets = ()
        code, ack = self.acknowledge(assessment, None)
        accepted = assessment.accepted
        return ReceivedMessage(
            channel=self.settings.channel,
            peer=peer,
            received_at=self.clock.seconds(),
            control_id=header.control_id or None,
            sender=header.sender,
            message_type=header.type_and_trigger or None,
            structure=header.structure or None,
            version=header.version or None,
            processing_id=header.processing_id or None,
            charset=header.hl7_charset,
            raw=payload,
            payload_hash=assessment.payload_hash,
            status="accepted" if accepted else "rejected",
            ack_code=code,
            ack=ack,
            error=None if accepted else assessment.rejection.text,
            duplicate_window=self.settings.duplicate_window if accepted else 0.0,
            targets=targets,
            **self.settings.receive_marks(assessment, targets, routed),
        )

    def drain(self, grace: float | None = None) -> defer.Deferred:
        """Stop reading on every connection; fires when their pending ACKs are out, or, with
        ``grace``, at the latest that many seconds later: a peer that stopped reading keeps
        a closing connection open for ever (its ACKs never leave our buffer), and a reload
        that removes its channel would wait for it for ever. Such connections are aborted."""
        receivers = list(self.receivers)
        for receiver in receivers:
            receiver._close("shutdown")
        drained = defer.DeferredList([receiver.lost for receiver in receivers])
        if grace is None or not receivers:
            return drained

        def abort() -> None:
            for receiver in receivers:
                receiver.abort_unread("peer not reading after shutdown", seconds=grace)

        call = self.clock.callLater(grace, abort)
        return drained.addBoth(lambda result: (call.active() and call.cancel(), result)[1])


def default_control_ids(clock_seconds: float, nonce: int) -> ControlIds:
    """ACK control ids unique across restarts: the start time in tenths of a second and a
    random nonce (fixed widths, base 36), then a base-36 counter. Not the pid: in a container
    the engine is pid 1 every time, and a restart within a second repeated every id. MSH-10 is
    at most 20 characters up to HL7 2.5.1: 12 here, so a counter of 8 digits (2.8 trillion
    messages; 6, 2.2 billion, for an outbound id's "-N" suffix) fits."""
    prefix = f"K{_base36(int(clock_seconds * 10)).rjust(7, '0')[-7:]}{_base36(nonce % 36**4).rjust(4, '0')}"
    return ControlIds(prefix=prefix, encode=_base36)


def _base36(number: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out
