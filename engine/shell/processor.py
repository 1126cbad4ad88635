"""After a message is stored and acknowledged (``ack: on-store``): map it into the
agendas and queue what the mapping builds for the hospital's systems.

Messages are processed one at a time per engine, in commit order, each decision
committed before the next is read, so two messages about the same referral can never
race. The logic is pure (``Mapping.apply``, ``decide``, ``release``, ``build_outbound``);
this class reads the current entry from the store, turns a decision into write
operations and commits them in one transaction with the message's processing outcome.
A mapping error never loses the message: it stays stored with outcome ``error`` and a
reason naming the mapping file:line and path (never a value).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections import deque
from typing import Any, Callable

from twisted.internet import defer

from engine.core import agenda as ag
from engine.core.errors import ErrorCode, ErrorLocation, Rejection
from engine.core.paths import PathError, parse_path
from engine.core.header import read_header
from engine.core.hl7message import Message
from engine.log import get_logger, safe_error
from engine.store import (
    Append,
    Enqueue,
    HoldEvent,
    PutAttachment,
    QueueTarget,
    ReceivedMessage,
    ReleaseHeld,
    SaveAgendaEntry,
    SetProcessing,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    message_id: int
    channel: str
    mapping: str  # mapping name (the route's `map`)
    raw: bytes
    codec: str
    # ack: on-map: raw forwards to queue only if mapping succeeds, and how to answer a failure
    forward: tuple[QueueTarget, ...] = ()
    nak: Callable[[Rejection], tuple[str, bytes]] | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one message: mapped, held (waiting for its entry) or error."""

    status: str
    detail: str
    rejection: Rejection | None = None  # what an on-map channel answers (None: AA)
    ack_code: str | None = None  # the NAK built for an on-map channel, stored with the message
    ack: bytes | None = None


def _mapping_rejection(errors) -> Rejection:
    """AE naming the first failing field: 101 when it was missing, else 102."""
    first = errors[0]
    location = None
    try:
        path = parse_path(first.path.split(",")[0].strip()) if first.path else None
    except PathError:
        path = None
    if path is not None:
        sequence = path.occurrence if isinstance(path.occurrence, int) else 1
        location = ErrorLocation(segment=path.segment, sequence=sequence, field=path.field)
    missing = "missing" in first.reason
    return Rejection(
        ack_code="AE",
        error_code=ErrorCode.REQUIRED_FIELD_MISSING if missing else ErrorCode.DATA_TYPE,
        text=f"{first.field}: {first.reason}"[:200],
        location=location,
    )


def _agenda_rejection(reject) -> Rejection:
    code = ErrorCode.UNKNOWN_KEY if reject.code == "unknown-entry" else ErrorCode.APPLICATION_INTERNAL_ERROR
    return Rejection(ack_code="AE", error_code=code, text=reject.reason[:200])


def _plain(value: Any) -> Any:
    """Event/entry values as JSON-able data (dataclasses -> dicts, datetimes -> ISO text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def event_to_json(event: ag.AgendaEvent) -> str:
    return json.dumps(
        {"kind": event.kind, "action": event.action, "zd_number": event.zd_number, "placer_id": event.placer_id,
         "filler_id": event.filler_id, "fields": _plain(event.fields)},
        sort_keys=True,
    )


def event_from_json(text: str) -> ag.AgendaEvent:
    data = json.loads(text)
    return ag.AgendaEvent(kind=data["kind"], action=data["action"], zd_number=data.get("zd_number"),
                          placer_id=data.get("placer_id"), filler_id=data.get("filler_id"), fields=data["fields"])


def entry_from_record(record) -> ag.AgendaEntry:
    return ag.AgendaEntry(
        id=str(record.id), agenda_id=record.agenda_id, kind=record.kind, state=record.state,
        zd_number=record.zd_number, placer_id=record.placer_id, filler_id=record.filler_id,
        data=json.loads(record.data) if record.data else {}, attachments=record.attachments,
    )


class Processor:
    def __init__(
        self,
        *,
        mappings,
        book: ag.AgendaBook,
        store,
        committer,
        clock,
        metrics,
        destinations: dict[str, Any],
        control_ids: Callable[[], str],
        on_queued: Callable[[tuple[QueueTarget, ...]], None] = lambda targets: None,
        log=None,
    ) -> None:
        self.mappings = mappings
        self.book = book
        self.store = store
        self.committer = committer
        self.clock = clock
        self.metrics = metrics
        self.destinations = destinations
        self.control_ids = control_ids
        self.on_queued = on_queued
        self.log = log or get_logger()
        self._queue: deque[Work] = deque()
        self._running = False
        self.idle: defer.Deferred | None = None

    def refresh_gauges(self) -> None:
        """koppel_agenda_entries from the store (called now and then, not per message)."""
        try:
            counts = self.store.agenda_counts()
        except Exception as error:  # noqa: BLE001 - a gauge must never stop processing
            self.log.warning("agenda.gauge_failed", error=safe_error(error))
            return
        gauge = self.metrics.agenda_entries
        gauge.clear()
        for (agenda_id, state), count in counts.items():
            gauge.labels(agenda_id, state).set(count)

    def submit(self, work: Work) -> defer.Deferred:
        """Queue one stored message; fires with its Outcome once that is committed."""
        done: defer.Deferred = defer.Deferred()
        self._queue.append((work, done))
        if not self._running:
            self._running = True
            self._drain().addErrback(self._crashed)
        return done

    def wait_idle(self) -> defer.Deferred:
        """Fires when everything submitted so far is processed (for shutdown and tests)."""
        if not self._running:
            return defer.succeed(None)
        if self.idle is None:
            self.idle = defer.Deferred()
        return self.idle

    @defer.inlineCallbacks
    def _drain(self):
        while self._queue:
            work, done = self._queue.popleft()
            try:
                outcome = yield self._process(work)
            except Exception as error:  # noqa: BLE001 - one message's failure never stops the rest
                self.log.error("mapping.failed", message_id=work.message_id, error=safe_error(error))
                self._outcome(work, "error")
                rejection = Rejection(ack_code="AE", error_code=ErrorCode.APPLICATION_INTERNAL_ERROR,
                                      text="internal error while mapping")
                outcome = Outcome(status="error", detail="internal error while mapping", rejection=rejection)
                try:
                    outcome = yield self._fail(work, outcome)
                except Exception as store_error:  # noqa: BLE001
                    self.log.error("mapping.outcome_not_stored", message_id=work.message_id,
                                   error=safe_error(store_error))
            done.callback(outcome)
        self._running = False
        idle, self.idle = self.idle, None
        if idle is not None:
            idle.callback(None)

    def _crashed(self, failure) -> None:
        self._running = False
        self.log.error("mapping.processor_crashed", error=safe_error(failure.value))

    def _outcome(self, work: Work, outcome: str) -> None:
        self.metrics.mapping_outcomes_total.labels(work.channel, work.mapping, outcome).inc()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.seconds(), dt.timezone.utc).astimezone()

    @defer.inlineCallbacks
    def _process(self, work: Work):
        mapping = self.mappings.mapping(work.mapping)
        message = Message.parse(work.raw, codec=work.codec)
        result = mapping.apply(message)
        if not result.ok:
            detail = "; ".join(str(e) for e in result.errors[:3])
            self._outcome(work, "error")
            self.log.warning("mapping.error", message_id=work.message_id, mapping=mapping.name, reason=detail)
            outcome = Outcome(status="error", detail=detail, rejection=_mapping_rejection(result.errors))
            return (yield self._fail(work, outcome))
        event = result.event
        existing_record = self.store.find_agenda_entry(ag.correlation_keys(event))
        existing = entry_from_record(existing_record) if existing_record else None
        now = self._now()
        decision = ag.decide(event, existing, now=now, message_id=str(work.message_id), book=self.book)
        at = self.clock.seconds()
        if isinstance(decision, ag.Reject):
            self._outcome(work, "rejected")
            self.log.warning("agenda.rejected", message_id=work.message_id, reason=decision.reason, code=decision.code)
            outcome = Outcome(status="error", detail=decision.reason, rejection=_agenda_rejection(decision))
            return (yield self._fail(work, outcome))
        if isinstance(decision, ag.Hold):
            self._outcome(work, "held")
            self.log.info("agenda.held", message_id=work.message_id, key_kind=decision.key.split(":", 1)[0])
            ops = [
                HoldEvent(keys=decision.keys, message_id=work.message_id, event=event_to_json(event), at=at),
                SetProcessing(message_id=work.message_id, outcome="held", detail=decision.reason),
            ]
            yield self.committer.submit_many(ops + self._forward_ops(work, at))
            self._queued(ops)
            return Outcome(status="held", detail=decision.reason)
        entry = decision.entry
        ops: list = [self._attachment_op(a) for a in decision.attachments]
        if isinstance(decision, ag.Create):
            if decision.fallback:
                self.metrics.agenda_fallback_total.labels(work.channel).inc()
                self.log.warning("agenda.fallback", message_id=work.message_id, agenda=entry.agenda_id)
            ops.append(self._save_op(entry, None, work.message_id, event.action, None, (), at))
        elif not decision.noop:
            ops.append(self._save_op(entry, int(existing_record.id), work.message_id, event.action,
                                     existing.state, decision.changed, at))
        ops.extend(self._outbound_ops(mapping, event, entry, work, at))
        ops.extend(self._forward_ops(work, at))
        detail = f"agenda {entry.agenda_id}: {entry.state}"
        ops.append(SetProcessing(message_id=work.message_id, outcome="mapped", detail=detail))
        results = yield self.committer.submit_many(ops)
        self._outcome(work, "ok")
        entry_id = int(existing_record.id) if existing_record else next(
            (r for op, r in zip(ops, results) if isinstance(op, SaveAgendaEntry)), None)
        self._queued(ops)
        if entry_id is not None:
            yield self._release_held(entry.with_id(str(entry_id)), entry_id, work)
        return Outcome(status="mapped", detail=detail)

    @defer.inlineCallbacks
    def _fail(self, work: Work, outcome: Outcome):
        """Record a failed outcome; on an on-map channel also the NAK the sender gets."""
        if work.nak is None or outcome.rejection is None:
            yield self.committer.submit(
                SetProcessing(message_id=work.message_id, outcome=outcome.status, detail=outcome.detail))
            return outcome
        code, ack = work.nak(outcome.rejection)
        yield self.committer.submit(SetProcessing(message_id=work.message_id, outcome=outcome.status,
                                                  detail=outcome.detail, ack_code=code, ack=ack))
        return dataclasses.replace(outcome, ack_code=code, ack=ack)

    @staticmethod
    def _forward_ops(work: Work, at: float) -> list:
        if not work.forward:
            return []
        return [Enqueue(message_id=work.message_id, targets=work.forward, at=at, audit=False)]

    @defer.inlineCallbacks
    def _release_held(self, entry: ag.AgendaEntry, entry_id: int, work: Work):
        """Replay events that waited for this entry (a letter before its request), in arrival order."""
        while True:
            held = self.store.held_events(ag.entry_keys(entry))
            if not held:
                return
            pairs = [(str(h.message_id), event_from_json(h.event)) for h in held]
            released = ag.release(pairs, entry, now=self._now(), book=self.book)
            at = self.clock.seconds()
            ops: list = [self._attachment_op(a) for a in released.attachments]
            state = entry.state
            for message_id, decision in released.results:
                if isinstance(decision, ag.Update):
                    if not decision.noop:
                        ops.append(self._save_op(decision.entry, entry_id, int(message_id), "release",
                                                 state, decision.changed, at))
                        state = decision.entry.state
                    ops.append(SetProcessing(message_id=int(message_id), outcome="mapped",
                                             detail=f"agenda {decision.entry.agenda_id}: released"))
                else:
                    ops.append(SetProcessing(message_id=int(message_id), outcome="error", detail=decision.reason))
            ops.append(ReleaseHeld(ids=tuple(h.id for h in held), at=at))
            yield self.committer.submit_many(ops)
            self.log.info("agenda.released", entry_id=entry_id, count=len(held))
            entry = released.entry

    def _save_op(self, entry, entry_id, message_id, action, from_state, changed, at) -> SaveAgendaEntry:
        return SaveAgendaEntry(
            entry_id=entry_id, agenda_id=entry.agenda_id, kind=entry.kind, state=entry.state,
            zd_number=entry.zd_number, placer_id=entry.placer_id, filler_id=entry.filler_id,
            data=json.dumps(_plain(entry.data), sort_keys=True), attachments=entry.attachments,
            keys=ag.entry_keys(entry), at=at, message_id=message_id, action=action, from_state=from_state,
            changed=tuple(changed),
        )

    @staticmethod
    def _attachment_op(attachment: ag.Attachment) -> PutAttachment:
        return PutAttachment(sha256=attachment.sha256, media_type=attachment.media_type,
                             filename=attachment.filename, data=attachment.payload)

    def _outbound_ops(self, mapping, event, entry, work: Work, at: float) -> list:
        from engine.mapping import build_outbound

        ops = []
        built = build_outbound(mapping, event, entry, control_id=self.control_ids(), timestamp=self._now())
        for destination_name, data in built:
            destination = self.destinations.get(destination_name)
            if destination is None:  # koppel check reports this; never silently dropped
                raise LookupError("mapping names an unknown destination")
            header = read_header(data, default_charset="8859/1")  # what the sender matches MSA-2 against
            ops.append(Append(message=ReceivedMessage(
                channel=work.channel, peer="koppel", received_at=at, control_id=header.control_id,
                sender=header.sender, message_type=header.type_and_trigger, structure=header.structure or None,
                version=header.version, processing_id=header.processing_id or None,
                charset=header.hl7_charset, raw=data, payload_hash=hashlib.sha256(data).digest(),
                status="accepted", ack_code="AA", ack=b"", error=None, duplicate_window=0.0,
                targets=(QueueTarget(queue=destination.queue_key, destination=destination_name),),
                origin_id=work.message_id,
            )))
        return ops

    def _queued(self, ops) -> None:
        for op in ops:
            if isinstance(op, Append) and op.message.targets:
                self.on_queued(op.message.targets)
            elif isinstance(op, Enqueue):
                self.on_queued(op.targets)
