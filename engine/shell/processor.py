"""After a message is stored and acknowledged (``ack: on-store``): map it into the
agendas and queue what the mapping builds for the hospital's systems.

Messages are planned in commit order, a batch at a time (what one reactor turn
committed), against a view of the store plus what earlier messages of the batch
changed, so two messages about the same referral can never race; each batch commits in
one transaction with every message's processing outcome. The logic is pure
(``Mapping.apply``, ``decide``, ``release``, ``build_outbound``); this class reads the
current entries, turns decisions into write operations and commits them.
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

from twisted.internet import defer, task

from engine.core import agenda as ag
from engine.core.convert import STORED_DAY_TIMES, DayTime, PartialDate, hospital_zone, revive_day_times
from engine.core.errors import ErrorCode, ErrorLocation, Rejection
from engine.core.header import read_header
from engine.core.hl7message import Message
from engine.core.paths import PathError, parse_path
from engine.log import get_logger, safe_error
from engine.store import (
    Append,
    Enqueue,
    HeldGone,
    HoldEvent,
    PutAttachment,
    QueueTarget,
    ReceivedMessage,
    ReleaseHeld,
    SaveAgendaEntry,
    SetProcessing,
    StoreError,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    message_id: int
    channel: str
    mapping: str  # mapping name (the route's `map`)
    raw: bytes | None  # None: read from the store when mapped (a resumed message; see _body)
    codec: str
    size: int = 0  # of raw, also when it is not held
    # ack: on-map: raw forwards to queue only if mapping succeeds, and how to answer a failure
    forward: tuple[QueueTarget, ...] = ()
    nak: Callable[[Rejection], tuple[str, bytes]] | None = None
    # handed on by the engine's resume (an operator's reprocess, a hand-off that failed): messages
    # that arrived after it may have changed its entry already (see Processor._overtaken_by)
    late: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one message: mapped, held (waiting for its entry) or error."""

    status: str
    detail: str
    rejection: Rejection | None = None  # what an on-map channel answers (None: AA)
    ack_code: str | None = None  # the NAK built for an on-map channel, stored with the message
    ack: bytes | None = None


INTERNAL_MAPPING_ERROR = Rejection(
    ack_code="AE", error_code=ErrorCode.APPLICATION_INTERNAL_ERROR, text="internal error while mapping"
)


def _mapping_rejection(errors) -> Rejection:
    """AE naming the first failing field: 101 when it was missing, 103 when its value is not in
    its table, 207 when it could not be read at all, else 102."""
    first = errors[0]
    location = None
    try:
        path = parse_path(first.path.split(",")[0].strip()) if first.path else None
    except PathError:
        path = None
    if path is not None:
        sequence = path.occurrence if isinstance(path.occurrence, int) else 1
        location = ErrorLocation(segment=path.segment, sequence=sequence, field=path.field)
    from engine.mapping import UNREADABLE

    reason = first.reason
    if reason.startswith(UNREADABLE):  # (the exception's class is for the log, never the wire)
        reason, code = UNREADABLE, ErrorCode.APPLICATION_INTERNAL_ERROR
    elif "missing" in reason:
        code = ErrorCode.REQUIRED_FIELD_MISSING
    elif reason.startswith("value not in table"):
        code = ErrorCode.TABLE_VALUE_NOT_FOUND
    else:
        code = ErrorCode.DATA_TYPE
    return Rejection(ack_code="AE", error_code=code, text=f"{first.field}: {reason}"[:200], location=location)


def _agenda_rejection(reject) -> Rejection:
    code = ErrorCode.UNKNOWN_KEY if reject.code == "unknown-entry" else ErrorCode.APPLICATION_INTERNAL_ERROR
    return Rejection(ack_code="AE", error_code=code, text=reject.reason[:200])


def _json_default(value: Any) -> Any:
    """What json cannot encode itself, without first copying the whole document (hot path)."""
    if isinstance(value, (dt.datetime, dt.date, PartialDate)):
        return value.isoformat()
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return {name: getattr(value, name) for name in fields}
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, bytes):
        return value.decode("latin-1")
    raise TypeError(f"cannot store a {type(value).__name__} in an agenda entry")


def to_json(value: Any) -> str:
    """Entry data and held events as stored (same JSON as ``ag.plain`` then ``json.dumps``),
    but a dtm sent without a time of day (``convert.DayTime``) at the precision sent
    (``2016-04``, not ``2016-04-01T00:00:00+02:00``), its name listed under ``_day_times`` so
    ``entry_from_record`` reads it back as a DayTime (the instant it compares as)."""
    data = value if isinstance(value, dict) else dict(value.items())
    stored = _stored_day_times(data)
    if stored:
        data = {**data, **stored, STORED_DAY_TIMES: sorted(stored)}
    return json.dumps(data, default=_json_default)


def _stored_day_times(fields) -> dict[str, str]:
    """The fields holding a dtm sent without a time of day, in their stored form (to_json)."""
    return {name: item.stored() for name, item in fields.items() if item.__class__ is DayTime and item.hl7}


def event_to_json(event: ag.AgendaEvent, mapping: str | None = None) -> str:
    """A held event, with the mapping that made it (its outbound messages are built on release)."""
    stored = _stored_day_times(event.fields)  # at the precision sent, read back as DayTimes (see to_json)
    fields = {**ag.plain(event.fields), **stored}
    days = sorted(stored)
    return json.dumps(
        {"kind": event.kind, "action": event.action, "zd_number": event.zd_number, "placer_id": event.placer_id,
         "filler_id": event.filler_id, "fields": fields, "mapping": mapping,
         "defaulted": sorted(event.defaulted), **({STORED_DAY_TIMES: days} if days else {})},
        sort_keys=True,
    )


def event_from_json(text: str) -> tuple[ag.AgendaEvent, str | None]:
    data = json.loads(text)
    fields = revive_day_times(data["fields"], data.get(STORED_DAY_TIMES))
    event = ag.AgendaEvent(kind=data["kind"], action=data["action"], zd_number=data.get("zd_number"),
                           placer_id=data.get("placer_id"), filler_id=data.get("filler_id"), fields=fields,
                           defaulted=frozenset(data.get("defaulted") or ()))
    return event, data.get("mapping")


def entry_from_record(record) -> ag.AgendaEntry:
    """An entry as stored; its dtms sent without a time of day (``_day_times``, see to_json)
    as DayTimes again. Rows stored before that keep their text (``2016-04-01T00:00:00+02:00``),
    which compares equal to the same DayTime (``ag.plain``), so a re-delivery is still a no-op."""
    data = json.loads(record.data) if record.data else {}
    if STORED_DAY_TIMES in data:
        data = revive_day_times(data, data.pop(STORED_DAY_TIMES))
    return ag.AgendaEntry(
        id=str(record.id), agenda_id=record.agenda_id, kind=record.kind, state=record.state,
        zd_number=record.zd_number, placer_id=record.placer_id, filler_id=record.filler_id,
        data=data, attachments=record.attachments,
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
        self._queue: deque = deque()
        self._handling: set[int] = set()  # message ids submitted and not yet done
        self._uncommitted: list | None = None  # counters of the batch being planned
        self._running = False
        self._next_entry_id: int | None = None  # assigned here: entries are created only by this processor
        self.idle: defer.Deferred | None = None

    def refresh_gauges(self) -> None:
        """koppel_agenda_entries, the hand-off backlog and the held events from the store (now
        and then, not per message): messages acknowledged but not mapped for long mean the store
        refuses the mapping's commits, or the processor is stuck; a message held for hours waits
        for a request (or booking) that did not come, and would otherwise wait unseen."""
        try:
            counts = self.store.agenda_counts()
            backlog, oldest = self.store.handoff_backlog()
            held, held_since = self.store.held_backlog()
        except Exception as error:  # noqa: BLE001 - a gauge must never stop processing
            self.log.warning("agenda.gauge_failed", error=safe_error(error))
            return
        self.metrics.mapping_pending.set(backlog)
        self.metrics.mapping_pending_oldest_age_seconds.set(
            0 if oldest is None else max(0.0, self.clock.seconds() - oldest))
        self.metrics.agenda_held.set(held)
        self.metrics.agenda_held_oldest_age_seconds.set(
            0 if held_since is None else max(0.0, self.clock.seconds() - held_since))
        gauge = self.metrics.agenda_entries
        gauge.clear()
        for (agenda_id, state), count in counts.items():
            gauge.labels(agenda_id, state).set(count)

    def submit(self, work: Work) -> defer.Deferred:
        """Queue one stored message; fires with its Outcome once that is committed."""
        done: defer.Deferred = defer.Deferred()
        self._queue.append((work, done))
        self._handling.add(work.message_id)
        if not self._running:
            self._running = True
            # Start on the next turn, so everything committed in this one is planned as one batch.
            self.clock.callLater(0, self._start)
        return done

    def _start(self) -> None:
        self._drain().addErrback(self._crashed)

    def handling(self, message_id: int) -> bool:
        """Is this message submitted and not yet done? (The engine's resume skips it.)"""
        return message_id in self._handling

    def wait_idle(self) -> defer.Deferred:
        """Fires when everything submitted so far is processed (for shutdown and tests). Each
        caller gets a Deferred of its own, so one that gives up waiting (cancels) leaves the
        processor's own untouched."""
        if not self._running:
            return defer.succeed(None)
        if self.idle is None:
            self.idle = defer.Deferred()
        mine: defer.Deferred = defer.Deferred()
        self.idle.addBoth(lambda result: (None if mine.called else mine.callback(None), result)[1])
        return mine

    @defer.inlineCallbacks
    def _drain(self):
        while self._queue:
            batch = self._next_batch()
            try:
                outcomes = yield self._commit_batch([work for work, _ in batch])
            except Exception as error:  # noqa: BLE001 - retried one by one so one bad message fails alone
                if isinstance(error, HeldGone):  # an operator dropped a held event: planned again
                    self.log.info("mapping.held_gone", size=len(batch), held=list(error.ids))
                elif len(batch) > 1:
                    self.log.warning("mapping.batch_failed", size=len(batch), error=safe_error(error))
                outcomes = []
                for work, _ in batch:
                    outcome = yield self._commit_one(work)
                    outcomes.append(outcome)
            for (work, done), outcome in zip(batch, outcomes):
                self._handling.discard(work.message_id)
                done.callback(outcome)
        self._running = False
        idle, self.idle = self.idle, None
        if idle is not None:
            idle.callback(None)

    def _next_batch(self) -> list:
        """Up to BATCH submitted works and BATCH_BYTES of their raw messages, at least one: each
        planned letter also holds its decoded documents and outbound messages until the commit."""
        batch, size = [], 0
        while self._queue and len(batch) < BATCH:
            work = self._queue[0][0]
            size += len(work.raw) if work.raw is not None else work.size
            if batch and size > BATCH_BYTES:
                break
            batch.append(self._queue.popleft())
        return batch

    def _internal_failure(self, work: Work, error: BaseException) -> tuple[Outcome, SetProcessing]:
        """A bug or a store read failing while mapping: the message fails alone, logged by class."""
        self.log.error("mapping.failed", message_id=work.message_id, error=safe_error(error))
        self._outcome(work, "error")
        return self._failure(work, Outcome(status="error", detail="internal error while mapping",
                                           rejection=INTERNAL_MAPPING_ERROR))

    @defer.inlineCallbacks
    def _commit_one(self, work: Work):
        """One message whose batch failed. A store that refuses the commit (disk full, I/O
        error) is waited out, the queue held behind it, so a request is never mapped after
        its own cancellation; after STORE_ATTEMPTS the message is taken for the culprit and
        recorded 'error' if the store accepts that, else the wait goes on. A release of a held
        event dropped since it was read (HeldGone) is planned again at once from the store, not
        counted against the store: each such failure means one held event fewer (only this
        processor holds events), and past HELD_REPLANS in a row it is taken for a store error."""
        delay, attempts, replans = STORE_RETRY, 0, 0
        while True:
            try:
                (outcome,) = yield self._commit_batch([work])
                return outcome
            except StoreError as error:
                if isinstance(error, HeldGone) and replans < HELD_REPLANS:
                    replans += 1
                    self.log.info("mapping.held_gone", message_id=work.message_id, held=list(error.ids))
                    continue
                attempts += 1
                if attempts >= STORE_ATTEMPTS:
                    outcome, op = self._internal_failure(work, error)
                    try:
                        yield self.committer.submit(op)
                        return outcome
                    except Exception:  # noqa: BLE001 - the store is down: keep the order, wait
                        pass
                self.log.warning("mapping.store_retry", message_id=work.message_id, attempt=attempts,
                                 error=safe_error(error))
                yield task.deferLater(self.clock, delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
            except Exception as error:  # noqa: BLE001 - a bug: this message fails alone
                outcome = yield self._internal_error(work, error)
                return outcome

    @defer.inlineCallbacks
    def _internal_error(self, work: Work, error: BaseException):
        outcome, op = self._internal_failure(work, error)
        try:
            yield self.committer.submit(op)
        except Exception as store_error:  # noqa: BLE001
            self.log.error("mapping.outcome_not_stored", message_id=work.message_id, error=safe_error(store_error))
        return outcome

    def _crashed(self, failure) -> None:
        self._running = False
        # the batch that crashed is still PENDING in the store (resumed later); the rest waits here
        self._handling = {work.message_id for work, _ in self._queue}
        self.log.error("mapping.processor_crashed", error=safe_error(failure.value))

    def _outcome(self, work: Work, outcome: str) -> None:
        self._count(self.metrics.mapping_outcomes_total.labels(work.channel, work.mapping, outcome))

    def _released_outcome(self, channel: str, item: "_Held", outcome: str) -> None:
        """A held message's second outcome (it was counted 'held' when it waited)."""
        self._count(self.metrics.mapping_outcomes_total.labels(channel, item.mapping or "", outcome))

    def _count(self, counter) -> None:
        """While a batch is planned, counted only once it commits (a failed batch is planned
        again message by message, and must not count twice)."""
        if self._uncommitted is not None:
            self._uncommitted.append(counter)
        else:
            counter.inc()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.seconds(), hospital_zone())

    @defer.inlineCallbacks
    def _commit_batch(self, works: list[Work]):
        """Plan every message of the batch against an in-memory view (so later messages see
        earlier ones), then commit all of it in one transaction."""
        view = _BatchView(self)
        self._uncommitted = counted = []
        try:
            plans = []
            for work in works:
                try:
                    plans.append(self._plan(work, view))
                except Exception as error:  # noqa: BLE001 - this message fails alone
                    outcome, op = self._internal_failure(work, error)
                    plans.append((outcome, [op]))
            ops = [op for _, plan_ops in plans for op in plan_ops if op is not None]
            view.finish(ops)
            ops = [op for op in ops if op is not None]
        finally:
            self._uncommitted = None
        if ops:
            yield self.committer.submit_many(ops)
        for counter in counted:
            counter.inc()
        try:  # committed: whatever fails from here on must not map the batch again
            self._queued(ops)
        except Exception as error:  # noqa: BLE001 - the senders' one-second poll finds the entries
            self.log.error("mapping.wake_failed", error=safe_error(error))
        return [outcome for outcome, _ in plans]

    def _plan(self, work: Work, view: "_BatchView") -> tuple[Outcome, list]:
        mapping = self.mappings.mapping(work.mapping)
        message = Message.parse(self._body(work), codec=work.codec)
        result = mapping.apply(message)
        if not result.ok:
            detail = "; ".join(str(e) for e in result.errors[:3])
            self._outcome(work, "error")
            self.log.warning("mapping.error", message_id=work.message_id, mapping=mapping.name, reason=detail)
            outcome, op = self._failure(work, Outcome(status="error", detail=detail,
                                                      rejection=_mapping_rejection(result.errors)))
            return outcome, [op]
        event = result.event
        keys = ag.correlation_keys(event)
        existing = view.find(keys)
        if existing is not None and event.action == "create" and ag.FAMILY[existing.kind] != ag.FAMILY[event.kind]:
            existing = self._with_history(existing)  # its changes are replayed in the new family
        now = self._now()
        waiting = existing is None and event.action not in ("create", "attach", "book") and bool(view.held_for(keys))
        decision = ag.decide(event, existing, now=now, message_id=str(work.message_id), book=self.book,
                             waiting=waiting)
        if work.late and isinstance(decision, ag.Update) and not decision.noop:
            later = self._overtaken_by(existing, event, work.message_id)
            if later is not None:
                decision = ag.Reject(reason=f"message {later} of the same kind changed the entry after this one "
                                            "arrived: mapped now, its older values would replace the newer ones",
                                     code="overtaken")
        at = self.clock.seconds()
        if isinstance(decision, ag.Reject):
            self._outcome(work, "rejected")
            self.log.warning("agenda.rejected", message_id=work.message_id, reason=decision.reason, code=decision.code)
            outcome, op = self._failure(work, Outcome(status="error", detail=decision.reason,
                                                      rejection=_agenda_rejection(decision)))
            return outcome, [op]
        if isinstance(decision, ag.Hold):
            self._outcome(work, "held")
            self.log.info("agenda.held", message_id=work.message_id, key_kind=decision.key.split(":", 1)[0])
            ops = view.hold(decision, work, event, at)
            return Outcome(status="held", detail=decision.reason), ops + self._forward_ops(work, at)
        entry = decision.entry
        ops: list = [self._attachment_op(a) for a in decision.attachments]
        save = None  # this message's save of the entry: made once its outbound messages are known
        if isinstance(decision, ag.Create):
            if decision.fallback:
                self._count(self.metrics.agenda_fallback_total.labels(work.channel))
                self.log.warning("agenda.fallback", message_id=work.message_id, agenda=entry.agenda_id)
            entry = dataclasses.replace(entry, id=str(view.new_id()), data={**entry.data, ag.SENT: {}})
            save = dict(entry_id=int(entry.id), message_id=work.message_id, action=event.action, from_state=None,
                        changed=(), at=at, new=True)
        elif not decision.noop:
            save = dict(entry_id=int(existing.id), message_id=work.message_id, action=event.action,
                        from_state=existing.state, changed=decision.changed, at=at)
        elif decision.ranks:  # nothing changed but which kind set some fields: kept quietly
            save = dict(entry_id=int(existing.id), message_id=work.message_id, action=event.action,
                        from_state=existing.state, changed=(), at=at, history=False)
        save_at = len(ops)
        view.put(entry)
        # The events held for this entry arrived before this message. What the hospital's own
        # scheduler did (a booking, a cancellation) already happened at the HIS, so this
        # message's outbound `when` sees the state after it (the HIS gets no request for an
        # appointment it had already booked or cancelled); what other senders did (ZorgDomein's
        # cancel) the HIS has not heard of, so it gets this message and then theirs (an S12,
        # then the S15: never a cancel of a request it never had). The message itself is
        # built from this event.
        released, later, by_scheduler = self._release(entry, view, work.channel, at)
        final = view.find(ag.entry_keys(entry)) if by_scheduler else None
        seen = entry if final is None or final.state == entry.state else dataclasses.replace(entry, state=final.state)
        builds = later
        if not (isinstance(decision, ag.Update) and decision.noop):  # a re-delivery: sent already
            builds = [(mapping, event, seen, work), *later]
        saved = entry
        if builds:
            from engine.mapping import sent_so_far

            current = view.find(ag.entry_keys(entry)) or entry  # after the released events
            built, sent = self._outbound_ops(builds, sent_so_far(current.data), at)
            ops.extend(built)
            if sent is not None:  # kept with the entry, in the plan's last save of it
                current = dataclasses.replace(current, data={**current.data, ag.SENT: sent})
                view.put(current)
                if any(isinstance(op, SaveAgendaEntry) for op in released):
                    self._resave(current, released)
                else:
                    saved = dataclasses.replace(entry, data={**entry.data, ag.SENT: sent})
        if save is not None:
            ops.insert(save_at, self._save_op(saved, **save))
        ops.extend(self._forward_ops(work, at))
        detail = f"agenda {entry.agenda_id}: {entry.state}"
        ops.append(SetProcessing(message_id=work.message_id, outcome="mapped", detail=detail))
        ops.extend(released)
        self._outcome(work, "ok")
        return Outcome(status="mapped", detail=detail), ops

    def _release(self, entry: ag.AgendaEntry, view: "_BatchView", channel: str,
                 at: float) -> tuple[list, list, bool]:
        """Apply events that waited for this entry (a letter before its request), one at a
        time in arrival order. Returns their ops; what their mappings' outbound messages are
        built from, in that order (built after this message's own, see _outbound_ops); and
        whether the hospital's scheduler changed the entry among them (see _plan)."""
        ops: list = []
        later: list = []
        by_scheduler = False
        waiting = self._waiting(view, entry)  # read once: applying one changes no other's event
        while True:
            held = self._next_ready(waiting, entry)
            if not held:
                return ops, later, by_scheduler
            released = ag.release([(str(h.message_id), h.event) for h in held], entry, now=self._now(),
                                  book=self.book)
            ops.extend(self._attachment_op(a) for a in released.attachments)
            state = entry.state
            for item, (message_id, decision) in zip(held, released.results):
                if isinstance(decision, ag.Update):
                    if decision.noop and decision.ranks:  # nothing changed but which kind set some fields
                        ops.append(self._save_op(decision.entry, int(entry.id), int(message_id), "release", state,
                                                 (), at, history=False))
                    if not decision.noop:
                        ops.append(self._save_op(decision.entry, int(entry.id), int(message_id), "release", state,
                                                 decision.changed, at))
                        state = decision.entry.state
                        by_scheduler |= item.event.kind == "appointment"
                        mapping = self._mapping_named(item.mapping)
                        if mapping is not None:
                            work = Work(message_id=int(message_id), channel=channel, mapping=item.mapping,
                                        raw=None, codec="latin-1")  # (its body from the store, if needed)
                            later.append((mapping, self._original_event(item, mapping), decision.entry, work))
                    ops.append(SetProcessing(message_id=int(message_id), outcome="mapped",
                                             detail=f"agenda {decision.entry.agenda_id}: released"))
                    self._released_outcome(channel, item, "ok")
                else:  # counted as a refusal in _plan would be: the held message is now refused
                    ops.append(SetProcessing(message_id=int(message_id), outcome="error", detail=decision.reason))
                    self._released_outcome(channel, item, "rejected")
                    self.log.warning("agenda.rejected", message_id=int(message_id), reason=decision.reason,
                                     code=decision.code)
            view.released(held, ops, at)
            entry = released.entry.with_id(entry.id)
            view.put(entry)
            self.log.info("agenda.released", entry_id=entry.id, count=len(held))

    @staticmethod
    def _waiting(view: "_BatchView", entry: ag.AgendaEntry) -> list["_Held"]:
        """The events waiting for this entry, in arrival order: those held under its keys, and
        those held under an id another of them brings (an S13 sent with only the scheduler's
        id, behind the S12 that carries it), so that a later event (an S14 under the
        ZD-number) cannot overtake them."""
        keys = set(ag.entry_keys(entry))
        found: dict[int, _Held] = {}
        frontier = set(keys)
        while frontier:
            brought: set[str] = set()
            for item in view.held_for(tuple(frontier)):
                if item.message_id not in found:
                    found[item.message_id] = item
                    brought.update(ag.correlation_keys(item.event))
            frontier = brought - keys
            keys |= frontier
        return sorted(found.values(), key=lambda h: h.message_id)  # ids are in arrival order

    @staticmethod
    def _next_ready(waiting: list["_Held"], entry: ag.AgendaEntry) -> list["_Held"]:
        """The earliest waiting event the entry (as it is now) answers to and that no longer
        waits for a change of it (``ag.waits``: a scheduler's S13 held before its S12 stays
        until the S12 has booked the entry), taken off the list; [] when none can apply."""
        answers_to = set(ag.entry_keys(entry))
        for index, item in enumerate(waiting):
            if answers_to.intersection(item.keys) and not ag.waits(item.event, entry):
                return [waiting.pop(index)]
        return []

    def _original_event(self, item: "_Held", mapping) -> ag.AgendaEvent:
        """The held event as its mapping made it (typed values for the templates): a stored
        one is mapped again from its message; one held in this batch is still at hand."""
        if item.id is None:
            return item.event
        stored = self.store.get_message(item.message_id)
        if stored is None:
            return item.event
        codec = read_header(stored.raw, default_charset=stored.charset or "8859/1").codec
        result = mapping.apply(Message.parse(stored.raw, codec=codec))
        return result.event if result.ok else item.event

    def _received_type(self, work: Work) -> str:
        """The received message's type (``entry.last_sent`` of a `template: received` outbound)."""
        return read_header(self._body(work), default_charset="8859/1").type_and_trigger

    def _body(self, work: Work) -> bytes:
        """The message's bytes: at hand, or read from the store (a resumed message, a released
        held one)."""
        if work.raw is not None:
            return work.raw
        stored = self.store.get_message(work.message_id)
        if stored is None:  # pruned meanwhile: mapped as nothing, an error for this message alone
            raise LookupError("the message is no longer in the store")
        return stored.raw

    def _mapping_named(self, name: str | None):
        if not name:
            return None
        try:
            return self.mappings.mapping(name)
        except KeyError:  # the mapping was removed by a reload since the event was held
            return None

    def _failure(self, work: Work, outcome: Outcome) -> tuple[Outcome, SetProcessing]:
        """The op recording a failed outcome; on an on-map channel also the NAK the sender gets."""
        if work.nak is None or outcome.rejection is None:
            return outcome, SetProcessing(message_id=work.message_id, outcome=outcome.status, detail=outcome.detail)
        code, ack = work.nak(outcome.rejection)
        op = SetProcessing(message_id=work.message_id, outcome=outcome.status, detail=outcome.detail,
                           ack_code=code, ack=ack)
        return dataclasses.replace(outcome, ack_code=code, ack=ack), op

    @staticmethod
    def _forward_ops(work: Work, at: float) -> list:
        if not work.forward:
            return []
        return [Enqueue(message_id=work.message_id, targets=work.forward, at=at, audit=False)]

    def _save_op(self, entry, entry_id, message_id, action, from_state, changed, at, *, new=False,
                 history=True) -> SaveAgendaEntry:
        return SaveAgendaEntry(
            new=new, entry_id=entry_id, agenda_id=entry.agenda_id, kind=entry.kind, state=entry.state,
            zd_number=entry.zd_number, placer_id=entry.placer_id, filler_id=entry.filler_id,
            data=to_json(entry.data), attachments=entry.attachments,
            keys=ag.entry_keys(entry), at=at, message_id=message_id, action=action, from_state=from_state,
            changed=tuple(changed), event_kind=entry.history[-1].kind if entry.history else None,
            event_action=entry.history[-1].action if entry.history else None, history=history,
        )

    def _overtaken_by(self, entry: ag.AgendaEntry, event: ag.AgendaEvent, message_id: int) -> int | None:
        """A message that arrived after ``message_id`` (mapped late: a reprocess) and already set
        the entry's values as this event would: of its kind, a create after a create, or a change
        (update, reschedule) after a change; among those the latest wins (ag._merge), so the
        older one, mapped now, would undo it. (A create does not reach a change's values, a
        change follows its booking or create whenever that came, a cancel or a letter replaces
        no such value.) Its id, or None."""
        overtaking = _OVERTAKING.get(event.action)
        if not overtaking:
            return None
        for item in reversed(self._with_history(entry).history):
            if (item.kind == event.kind and item.action in overtaking
                    and item.message_id.isdigit() and int(item.message_id) > message_id):
                return int(item.message_id)
        return None

    def _with_history(self, entry: ag.AgendaEntry) -> ag.AgendaEntry:
        """The entry with every change so far: the committed ones from the store, then this
        batch's (an entry read from the store carries only the latter)."""
        if entry.history and entry.history[0].from_state is None:
            return entry  # created in this batch: all of it is at hand
        stored = tuple(
            ag.HistoryItem(at=dt.datetime.fromtimestamp(h.at, dt.timezone.utc), message_id=str(h.message_id),
                           action=h.event_action or h.action, from_state=h.from_state, to_state=h.to_state,
                           changed=h.changed, kind=h.event_kind if h.event_action else None)
            for h in self.store.agenda_history(int(entry.id))
        )
        return dataclasses.replace(entry, history=stored + entry.history)

    @staticmethod
    def _attachment_op(attachment: ag.Attachment) -> PutAttachment:
        return PutAttachment(sha256=attachment.sha256, media_type=attachment.media_type,
                             filename=attachment.filename, data=attachment.payload)

    def _outbound_ops(self, builds, sent: dict[str, str], at: float) -> tuple[list, dict[str, str] | None]:
        """The outbound messages of this message and of the events it released, in that order
        (so the HIS has the request's S12 before a released cancel's S15), each `when` seeing
        ``sent``, what the destinations had for the entry so far (``entry.last_sent``); and
        what they have now, to keep in the entry's data (ag.SENT), None when that did not
        change."""
        from engine.mapping import RECEIVED, build_outbound

        before = dict(sent)
        ops = []
        for mapping, event, seen, work in builds:
            built = build_outbound(mapping, event, seen, control_id=self.control_ids(), timestamp=self._now(),
                                   sent=sent, agenda=self.book.find(getattr(seen, "agenda_id", None)))
            for destination_name, data in built:
                destination = self.destinations.get(destination_name)
                if destination is None:  # koppel check reports this; never silently dropped
                    raise LookupError("mapping names an unknown destination")
                if data is RECEIVED:  # the message itself, as received (queued, not copied)
                    sent[destination_name] = self._received_type(work)
                    ops.append(Enqueue(message_id=work.message_id, at=at, audit=False, targets=(
                        QueueTarget(queue=destination.queue_key, destination=destination_name),)))
                    continue
                header = read_header(data, default_charset="8859/1")  # what the sender matches MSA-2 against
                sent[destination_name] = header.type_and_trigger
                ops.append(Append(message=ReceivedMessage(
                    channel=work.channel, peer="koppel", received_at=at, control_id=header.control_id,
                    sender=header.sender, message_type=header.type_and_trigger, structure=header.structure or None,
                    version=header.version, processing_id=header.processing_id or None,
                    charset=header.hl7_charset, raw=data, payload_hash=hashlib.sha256(data).digest(),
                    status="accepted", ack_code="AA", ack=b"", error=None, duplicate_window=0.0,
                    targets=(QueueTarget(queue=destination.queue_key, destination=destination_name),),
                    origin_id=work.message_id,
                )))
        return ops, (sent if sent != before else None)

    def _resave(self, final: ag.AgendaEntry, ops: list) -> None:
        """Put ``final``'s data in the last save of it among ``ops`` (a release's: the entry as
        this plan leaves it), rather than a second write of the entry."""
        for index in range(len(ops) - 1, -1, -1):
            op = ops[index]
            if isinstance(op, SaveAgendaEntry) and op.entry_id == int(final.id):
                ops[index] = dataclasses.replace(op, data=to_json(final.data))
                return
        raise AssertionError("a release saved no entry")  # checked by the caller

    def _queued(self, ops) -> None:
        for op in ops:
            if isinstance(op, Append) and op.message.targets:
                self.on_queued(op.message.targets)
            elif isinstance(op, Enqueue):
                self.on_queued(op.targets)


BATCH = 256  # messages planned against one in-memory view and committed together
BATCH_BYTES = 64 << 20  # and at most this many bytes of them (one larger message goes alone)
# A mapping commit the store refuses is tried again after 0.5, 1, 2, ... s (at most 30 s apart),
# the queue held behind it; after STORE_ATTEMPTS the message is recorded 'error' if the store
# takes that (it was the culprit), else the waiting goes on (the store is down).
STORE_RETRY, STORE_RETRY_MAX, STORE_ATTEMPTS = 0.5, 30.0, 5
# A message whose plan released a held event that `koppel held drop` gave up meanwhile is
# planned again at once, this many times in a row before the store retries above take over.
HELD_REPLANS = 16


@dataclasses.dataclass(slots=True)
class _Held:
    """A held event as the view knows it: from the store (id) or held in this batch (id None)."""

    id: int | None
    message_id: int
    event: ag.AgendaEvent
    mapping: str | None
    keys: tuple[str, ...]


# A late message's action -> the later actions of its kind whose values it would replace (see
# Processor._overtaken_by).
_OVERTAKING = {"create": frozenset({"create"}), "update": frozenset({"update", "reschedule"}),
               "reschedule": frozenset({"update", "reschedule"})}


class _BatchView:
    """What one batch sees: the store, plus the entries and held events the batch changed.

    Entries created in the batch get ids here (the engine is the only writer of entries),
    so later messages of the same batch can update them before anything is committed.
    """

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.store = processor.store
        self.entries: dict[str, ag.AgendaEntry] = {}  # key -> latest entry
        self.batch_held: list[_Held] = []
        self.released_ids: set[int] = set()
        self.dropped_ops: set[int] = set()
        self.pending_ops: list = []
        self.store_has_held: bool | None = None

    def new_id(self) -> int:
        processor = self.processor
        if processor._next_entry_id is None:
            processor._next_entry_id = self.store.next_agenda_entry_id()
        entry_id = processor._next_entry_id
        processor._next_entry_id += 1
        return entry_id

    def find(self, keys) -> ag.AgendaEntry | None:
        for key in keys:
            if key in self.entries:
                return self.entries[key]
        record = self.store.find_agenda_entry(keys)
        if record is None:
            return None
        entry = entry_from_record(record)
        self.put(entry)
        return entry

    def put(self, entry: ag.AgendaEntry) -> None:
        for key in ag.entry_keys(entry):
            self.entries[key] = entry

    def hold(self, decision, work: Work, event, at: float) -> list:
        ops = [
            HoldEvent(keys=decision.keys, message_id=work.message_id, event=event_to_json(event, work.mapping), at=at),
            SetProcessing(message_id=work.message_id, outcome="held", detail=decision.reason),
        ]
        self.batch_held.append(_Held(id=None, message_id=work.message_id, event=event, mapping=work.mapping,
                                     keys=tuple(decision.keys)))
        self.pending_ops.append((self.batch_held[-1], ops))
        return ops

    def held_for(self, keys) -> list[_Held]:
        keys = tuple(keys)
        found: list[_Held] = []
        if self.store_has_held is None:  # asked once per batch: usually nothing waits at all
            self.store_has_held = self.store.has_held_events()
        for record in self.store.held_events(keys) if self.store_has_held else ():
            if record.id in self.released_ids:
                continue
            event, mapping = event_from_json(record.event)
            found.append(_Held(id=record.id, message_id=record.message_id, event=event, mapping=mapping,
                               keys=record.keys))
        wanted = set(keys)
        found.extend(h for h in self.batch_held if wanted & set(h.keys))
        return found

    def released(self, held: list[_Held], ops: list, at: float) -> None:
        stored = tuple(h.id for h in held if h.id is not None)
        if stored:
            self.released_ids.update(stored)
            ops.append(ReleaseHeld(ids=stored, at=at))
        for item in held:
            if item.id is None:  # held and released in the same batch: never stored as held
                self.batch_held.remove(item)
                for owner, hold_ops in self.pending_ops:
                    if owner is item:
                        self.dropped_ops.update(id(op) for op in hold_ops)

    def finish(self, ops: list) -> None:
        """Drop the hold ops of events this batch held and released again."""
        for index, op in enumerate(ops):
            if op is not None and id(op) in self.dropped_ops:
                ops[index] = None
