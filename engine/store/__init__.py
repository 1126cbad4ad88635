"""The message store: what Koppel received, what it answered, and what it still owes.

This module is the backend-neutral boundary. It holds the record values, the write
operations, the `MessageStore` protocol and `open_store(url)`. Backends (SQLite now,
PostgreSQL later) live in sibling modules and never leak their own types through here.

Everything is synchronous: the Twisted shell calls the store from threads (one writer
thread that group-commits, plus readers), and CLI processes call it directly. Times are
float epoch seconds (UTC); durations are float seconds.

Writes are a unit of work: `store.write(ops)` runs every op in ONE transaction and
commits once, so the shell can batch the appends of many connections together with
delivery bookkeeping and pay for one fsync. Results align with ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence, Union

__all__ = [
    "PENDING",
    "UNANSWERED",
    "StoreBusy",
    "Heartbeat",
    "MarkSending",
    "SetProcessing",
    "ReleaseHeld",
    "HoldEvent",
    "PutAttachment",
    "SaveAgendaEntry",
    "AttachmentInfo",
    "AttachmentRecord",
    "HeldGone",
    "HeldRecord",
    "AgendaHistoryRecord",
    "AgendaRecord",
    "Append",
    "AppendResult",
    "AuditRecord",
    "DeadLetter",
    "DropDeadLetters",
    "DropHeld",
    "Enqueue",
    "EntryState",
    "MarkDelivered",
    "MessageStatus",
    "MessageStore",
    "MessageSummary",
    "Prune",
    "PruneResult",
    "QueueEntry",
    "QueueStats",
    "QueueTarget",
    "ReceivedMessage",
    "RecordFailure",
    "ReplayDeadLetters",
    "MoveQueue",
    "RecordAudit",
    "RetryNow",
    "SetPaused",
    "StoreError",
    "StoredMessage",
    "WriteOp",
    "WriteResult",
    "open_store",
    "write_one",
]

_value = dataclass(frozen=True, slots=True, kw_only=True)

MessageStatus = Literal["accepted", "rejected"]

# A stored message's `processing` while its hand-off (mapping, or an on-map channel's raw
# forward) has not committed: PENDING when it was already acknowledged (ack: on-store),
# UNANSWERED when its answer waits for that hand-off (ack: on-map). The engine finishes
# both kinds at start and now and then while it runs; pruning keeps them.
PENDING = "pending"
UNANSWERED = "unanswered"
EntryState = Literal["pending", "delivered", "dead", "dropped", "replayed"]


class StoreError(Exception):
    """The store could not do what was asked; nothing of the failed write was kept.

    Messages name ids, counts and the kind of failure only, never message content.
    """


class StoreBusy(StoreError):
    """`write(ops, wait=False)` found another process writing; nothing was done, try again."""


class HeldGone(StoreError):
    """A `ReleaseHeld` named an event no longer held: another process (`koppel held drop`)
    released it after the caller read it. Nothing of the write was kept; plan again from the
    store, so a drop the operator was told of is never overwritten."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = tuple(sorted(ids))
        super().__init__(f"held events {', '.join(map(str, self.ids))} are no longer held")


# --------------------------------------------------------------------------- records


@_value
class QueueTarget:
    """Where an accepted message must go: the queue key ("host:port") and the destination name."""

    queue: str
    destination: str


@_value
class ReceivedMessage:
    """One message as the listener received and judged it, ready to append."""

    channel: str
    peer: str
    received_at: float
    control_id: str | None
    sender: str | None
    message_type: str | None
    structure: str | None
    version: str | None
    processing_id: str | None
    charset: str | None
    raw: bytes
    payload_hash: bytes
    status: MessageStatus
    ack_code: str
    ack: bytes
    error: str | None
    duplicate_window: float
    targets: tuple[QueueTarget, ...] = ()
    origin_id: int | None = None  # set on messages Koppel built from another (outbound mapping)
    processing: str | None = None  # known at receive time: "filtered" when no route takes it
    processing_detail: str | None = None

    def __post_init__(self) -> None:
        if self.status not in ("accepted", "rejected"):
            raise ValueError(f"status must be 'accepted' or 'rejected', not {self.status!r}")
        if self.duplicate_window < 0:
            raise ValueError("duplicate_window must be >= 0")
        if self.status == "rejected" and self.targets:
            raise ValueError("a rejected message has no queue targets")


@_value
class StoredMessage:
    """A stored message with everything it was appended with, plus what happened since."""

    id: int
    channel: str
    peer: str
    received_at: float
    control_id: str | None
    sender: str | None
    message_type: str | None
    structure: str | None
    version: str | None
    processing_id: str | None
    charset: str | None
    size: int
    raw: bytes
    payload_hash: bytes
    status: MessageStatus
    ack_code: str
    ack: bytes
    error: str | None
    duplicate_count: int
    last_duplicate_at: float | None
    processing: str | None = None  # mapped, filtered, held, error, ... or PENDING / UNANSWERED


@_value
class MessageSummary:
    """A row for listings: the header facts without the body."""

    id: int
    channel: str
    peer: str
    received_at: float
    control_id: str | None
    sender: str | None
    message_type: str | None
    version: str | None
    size: int
    status: MessageStatus
    ack_code: str
    error: str | None
    duplicate_count: int
    processing: str | None = None  # mapped | filtered | held | error (None: not processed)
    processing_detail: str | None = None
    origin_id: int | None = None


@_value
class QueueEntry:
    """One message owed to one destination, with the raw bytes the sender needs (None when
    read for a listing: ``queue_head(bodies=False)``, ``list_dead_letters``, ``get_entry``)."""

    id: int
    queue: str
    destination: str
    message_id: int
    state: EntryState
    attempts: int
    enqueued_at: float
    next_attempt_at: float
    last_attempt_at: float | None
    last_error: str | None
    last_ack: bytes | None
    done_at: float | None
    replay_of: int | None
    control_id: str | None
    message_type: str | None
    charset: str | None
    raw: bytes | None


@_value
class QueueStats:
    """What `koppel queue list` shows for one queue."""

    queue: str
    depth: int
    oldest_enqueued_at: float | None
    oldest_age: float | None
    paused: bool
    last_error: str | None
    dead_count: int
    delivered_count: int  # total ever delivered on this queue (not reduced by pruning)


@_value
class AuditRecord:
    """An operator action kept for accountability (drop, replay, resend, move, pause, resume,
    retry-now), or a read of patient data (read-body, read-agenda-data)."""

    id: int
    at: float
    action: str
    queue: str | None
    entry_id: int | None
    message_id: int | None
    reason: str | None


@_value
class AgendaRecord:
    """One agenda entry as stored: the engine owns the meaning of `data` (a JSON document)."""

    id: int
    agenda_id: str
    kind: str
    state: str
    zd_number: str | None
    placer_id: str | None
    filler_id: str | None
    data: str
    attachments: tuple[str, ...]  # sha256 hex digests; the bytes are stored once each
    created_at: float
    updated_at: float


@_value
class AgendaHistoryRecord:
    """One change of an agenda entry and the message that caused it (field names, not values)."""

    entry_id: int
    at: float
    message_id: int | None
    action: str
    from_state: str | None
    to_state: str
    changed: tuple[str, ...]
    event_kind: str | None = None  # None in history written before schema version 7
    event_action: str | None = None


@_value
class HeldRecord:
    """An event that arrived before the entry it belongs to (e.g. a letter before its request)."""

    id: int
    keys: tuple[str, ...]
    message_id: int | None
    event: str  # JSON document, the engine's
    held_at: float


@_value
class AttachmentInfo:
    """What a listing shows of an attachment: its bytes stay in the store (letters are MBs)."""

    sha256: str
    media_type: str | None
    filename: str | None
    size: int


@_value
class AttachmentRecord:
    sha256: str
    media_type: str | None
    filename: str | None
    size: int
    data: bytes


# --------------------------------------------------------------------------- write ops


@_value
class Append:
    """Store a received message (or recognise it as a duplicate) and queue it for its targets.

    Result: `AppendResult`.
    """

    message: ReceivedMessage


@_value
class AppendResult:
    """`message_id` is the stored id, or the first copy's id for a duplicate.

    `ack` is what to answer: this message's ACK, or the first copy's stored ACK.
    """

    message_id: int
    duplicate_of: int | None
    ack: bytes
    # a duplicate whose first copy is UNANSWERED: its answer is not decided yet, so `ack`
    # (the first copy's provisional AA) must not be sent
    in_progress: bool = False


@_value
class MarkDelivered:
    """The destination acknowledged a pending entry. Result: True if it was pending."""

    entry_id: int
    ack: bytes
    at: float


@_value
class RecordFailure:
    """An attempt failed; the entry stays at the head. Result: True if it was pending."""

    entry_id: int
    error: str
    ack: bytes | None
    next_attempt_at: float
    at: float


@_value
class DeadLetter:
    """Give up on a pending entry so the queue can move on. Result: True if it was pending."""

    entry_id: int
    reason: str
    ack: bytes | None
    at: float


@_value
class Enqueue:
    """Queue a stored message (operator resend, audited; or a forward decided after
    mapping, not audited). Result: tuple of new entry ids."""

    message_id: int
    targets: tuple[QueueTarget, ...]
    at: float
    audit: bool = True


@_value
class SetPaused:
    """Pause or resume a queue's sender. Result: None. With ``at`` an operator did it: an
    audit record ('pause' or 'resume', with the reason) says who-knows-why and when."""

    queue: str
    paused: bool
    at: float | None = None
    reason: str | None = None


@_value
class RetryNow:
    """Make the queue's waiting entries due immediately. Result: how many were waiting (0: none).
    With ``at``, an audit record ('retry-now', with the reason) when it freed any."""

    queue: str
    at: float | None = None
    reason: str | None = None


@_value
class RecordAudit:
    """An audit record by itself: who read patient data (a message body, an agenda entry's
    fields) through the admin API or the CLI. Result: None."""

    at: float
    action: str
    reason: str
    message_id: int | None = None


@_value
class MoveQueue:
    """Re-queue up to ``limit`` pending entries of one queue, oldest first, each at the tail of
    the queue its destination now delivers to: a destination's host or port changed while they
    waited (a queue is its host:port). ``moves`` maps an entry's destination name to (queue,
    destination name); entries of other destinations stay. Each old entry ends 'replayed' and
    its new one's replay_of points back; one audit record per entry ('move'). Result: tuple of
    new entry ids (empty: none left). Bounded, so a big backlog moves in short transactions
    that never hold up the engine."""

    from_queue: str
    moves: tuple[tuple[str, str, str], ...]  # (entry's destination, to queue, new destination)
    at: float
    reason: str | None = None
    limit: int = 500

    def __post_init__(self) -> None:
        if not self.moves:
            raise ValueError("nothing to move: no destinations given")
        if any(queue == self.from_queue for _, queue, _ in self.moves):
            raise ValueError("a queue cannot be moved onto itself")


@_value
class ReplayDeadLetters:
    """Put dead entries back at the queue tail, by id or all of one queue.

    Result: tuple of new entry ids, in the order they were queued.
    """

    at: float
    entry_ids: tuple[int, ...] = ()
    queue: str | None = None
    limit: int | None = None  # with queue: at most this many (the oldest) per transaction
    below_id: int | None = None  # with queue: only entries with a smaller id (not our own replays)

    def __post_init__(self) -> None:
        if bool(self.entry_ids) == (self.queue is not None):
            raise ValueError("give either entry_ids or queue")


@_value
class DropDeadLetters:
    """Drop dead entries for good, with a reason kept in the audit log. Result: the ids
    dropped (those still dead), in id order."""

    entry_ids: tuple[int, ...]
    reason: str
    at: float


@_value
class Prune:
    """Delete finished entries, unreferenced messages and held events released before
    `before`. Result: PruneResult.

    At most `limit` of each go per op, so one prune never holds the write lock for long;
    repeat until every count is below `limit`.
    """

    before: float
    limit: int = 2000

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")


@_value
class PruneResult:
    entries: int
    messages: int
    held: int = 0  # released held events


@_value
class Heartbeat:
    """A tiny write that proves the store still commits (readiness). Result: None."""

    at: float


@_value
class MarkSending:
    """The sender is putting this entry on the wire (so a restart knows it may be a resend)."""

    queue: str
    entry_id: int


@_value
class SaveAgendaEntry:
    """Create (entry_id None) or replace an agenda entry, add its correlation keys and one
    history item (unless ``history`` is False), in the caller's transaction. Result: the entry id."""

    entry_id: int | None
    agenda_id: str
    kind: str
    state: str
    zd_number: str | None
    placer_id: str | None
    filler_id: str | None
    data: str
    attachments: tuple[str, ...]
    keys: tuple[str, ...]
    at: float
    message_id: int | None
    action: str
    from_state: str | None
    changed: tuple[str, ...] = ()
    new: bool = False  # create with this entry_id (the engine assigns ids so a batch can refer to them)
    event_kind: str | None = None  # the kind of event that made this change (appointment: the scheduler)
    event_action: str | None = None  # its action (for action "release": the released event's)
    # False: only the data changes (which kind set some fields), no history item, and the
    # entry keeps its updated_at: nothing a person would call a change happened.
    history: bool = True


@_value
class PutAttachment:
    """Keep an attachment's bytes once, by sha256. Result: True if it was new."""

    sha256: str
    media_type: str | None
    filename: str | None
    data: bytes


@_value
class HoldEvent:
    """Keep an event until an entry with one of `keys` exists. Result: the held id."""

    keys: tuple[str, ...]
    message_id: int | None
    event: str
    at: float


@_value
class ReleaseHeld:
    """Mark held events as applied. All of them must still be held, or the whole write fails
    with HeldGone (the caller planned on a stale read). Result: how many were released."""

    ids: tuple[int, ...]
    at: float


@_value
class SetProcessing:
    """Record what mapping did with a stored message: mapped, filtered, held or error.

    With ``ack`` (``ack: on-map`` channels) the message was answered with a NAK after
    all: it becomes ``rejected`` with that ACK, so a resend is processed afresh.
    """

    message_id: int
    outcome: str
    detail: str | None = None
    ack_code: str | None = None
    ack: bytes | None = None


# What an operator may hand to mapping again: a mapping that failed (fixed since, and
# reloaded), or a message no route mapped (a route added since). Not 'mapped' (its entry
# and outbound messages exist: a second run would send them twice) nor 'held' (it waits).
REPROCESSABLE = ("error", "filtered")
# Every value of a message's processing column (None: nothing to map, sent on as received).
PROCESSING_OUTCOMES = (PENDING, UNANSWERED, "mapped", "held", "error", "filtered", "forwarded")


@_value
class Reprocess:
    """Hand accepted messages whose mapping ended in one of ``outcomes`` to mapping again, by
    id or the oldest of one channel: each becomes PENDING, which the engine's resume maps
    (while it runs, within its resume interval; else at its next start), with one audit
    record ('reprocess') saying what it was. Messages Koppel built, and ones answered with a
    NAK (their sender resends), are never taken. Result: tuple of the ids set pending, in
    id order; with ``channel`` at most ``limit`` with ids above ``after_id``."""

    at: float
    message_ids: tuple[int, ...] = ()
    channel: str | None = None
    outcomes: tuple[str, ...] = ("error",)
    after_id: int = 0
    limit: int = 500
    reason: str | None = None

    def __post_init__(self) -> None:
        if bool(self.message_ids) == (self.channel is not None):
            raise ValueError("give either message_ids or channel")
        if not self.outcomes or any(o not in REPROCESSABLE for o in self.outcomes):
            raise ValueError(f"outcomes must be among {', '.join(REPROCESSABLE)}")


@_value
class DropHeld:
    """Give up on held messages whose entry will not come (a letter whose request was never
    sent): their held events are released unapplied and each message is recorded 'error', so
    `koppel reprocess` can take it again should the request come after all; one audit record
    ('drop-held') each keeps the reason. Result: the ids dropped (those still held), in id order."""

    message_ids: tuple[int, ...]
    reason: str
    at: float


WriteOp = Union[
    Append,
    MarkDelivered,
    RecordFailure,
    DeadLetter,
    Enqueue,
    SetPaused,
    RetryNow,
    MoveQueue,
    RecordAudit,
    ReplayDeadLetters,
    DropDeadLetters,
    Prune,
    Heartbeat,
    MarkSending,
    SaveAgendaEntry,
    PutAttachment,
    HoldEvent,
    ReleaseHeld,
    SetProcessing,
    Reprocess,
    DropHeld,
]
WriteResult = Union[AppendResult, bool, int, tuple[int, ...], PruneResult, None]


# --------------------------------------------------------------------------- protocol


class MessageStore(Protocol):
    """What every backend offers. Safe to call from several threads at once."""

    def write(self, ops: Sequence[WriteOp], *, wait: bool = True) -> list[WriteResult]:
        """All ops in one transaction. ``wait=False``: raise StoreBusy at once, doing nothing,
        while another process holds the write lock, instead of blocking the caller."""
        ...

    def get_message(self, message_id: int) -> StoredMessage | None: ...

    def pending_processing(
        self, *, after_id: int = 0, limit: int = 500, received_before: float | None = None,
        reprocessed: bool = True, max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        """Messages whose hand-off has not committed (processing PENDING or UNANSWERED), by id;
        ``reprocessed=False`` leaves out those an operator handed to mapping again (Reprocess);
        ``max_bytes``: the page ends with the message whose body reaches that many bytes."""
        ...

    def list_messages(
        self,
        *,
        channel: str | None = None,
        control_id: str | None = None,
        message_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        status: MessageStatus | None = None,
        limit: int = 100,
        message_ids: Sequence[int] | None = None,
        processing: str | None = None,
        oldest_first: bool = False,
        origin_id: int | None = None,
    ) -> list[MessageSummary]: ...

    def queue_head(
        self, queue: str, limit: int = 100, *, after_id: int | None = None, bodies: bool = True,
        max_bytes: int | None = None,
    ) -> list[QueueEntry]: ...

    def queue_depths(self) -> dict[str, int]: ...

    def pending_destinations(self, queue: str) -> dict[str, int]: ...

    def queue_stats(self, now: float) -> list[QueueStats]: ...

    def is_paused(self, queue: str) -> bool: ...

    def inflight_entry(self, queue: str) -> int | None: ...

    def list_dead_letters(self, queue: str | None = None, limit: int = 100) -> list[QueueEntry]: ...

    def get_entry(self, entry_id: int) -> QueueEntry | None: ...

    def entries_of_messages(self, message_ids: Sequence[int]) -> list[QueueEntry]:
        """Every queue entry (any state, replays too) of these messages, by id, without bodies:
        where a message went, for `koppel trace`."""
        ...

    def list_audit(self, limit: int = 100) -> list[AuditRecord]: ...

    def find_agenda_entry(self, keys: Sequence[str]) -> AgendaRecord | None: ...

    def get_agenda_entry(self, entry_id: int) -> AgendaRecord | None: ...

    def list_agenda_entries(
        self,
        *,
        agenda_id: str | None = None,
        state: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AgendaRecord]: ...

    def agenda_history(self, entry_id: int) -> list[AgendaHistoryRecord]: ...

    def agenda_entries_changed_by(self, message_id: int) -> list[int]:
        """The ids of the agenda entries whose history names this message, oldest first."""
        ...

    def next_agenda_entry_id(self) -> int: ...

    def held_events(self, keys: Sequence[str]) -> list[HeldRecord]: ...

    def has_held_events(self) -> bool: ...

    def get_attachment(self, sha256: str) -> AttachmentRecord | None: ...

    def attachment_infos(self, sha256s: Sequence[str]) -> list[AttachmentInfo]:
        """Hash, media type, file name and size of the attachments ``sha256s``, in that order
        (unknown ones left out), without reading their bytes: listings must not load letters."""
        ...

    def processing_counts(self) -> dict[str, int]: ...

    def handoff_backlog(self) -> tuple[int, float | None]:
        """(how many messages are PENDING or UNANSWERED, the oldest one's received_at): cheap."""
        ...

    def held_backlog(self) -> tuple[int, float | None]:
        """(how many events wait for their agenda entry, the oldest one's held_at): cheap."""
        ...

    def agenda_counts(self) -> dict[tuple[str, str], int]: ...

    def checkpoint(self) -> None:
        """Housekeeping to call now and then from a non-writer thread (no-op if not needed)."""
        ...

    def data_version(self) -> int:
        """Changes when another process commits; cheap enough to poll every few ms."""
        ...

    def claim(self, duty: str) -> None:
        """Become the only process doing ``duty`` ("receive", "deliver") for this store
        (StoreError if another process does)."""
        ...

    def claimed_elsewhere(self, duty: str) -> bool:
        """Whether another process does ``duty`` for this store now (a running engine)."""
        ...

    def backup(self, target: str, *, cancelled: Callable[[], bool] | None = None) -> int:
        """A consistent copy of the whole store at ``target`` (for SQLite a new file), taken
        while the engine runs; its size in bytes. StoreError if ``target`` exists, or when
        ``cancelled()`` turns true while it copies (nothing is left behind)."""
        ...

    def check_integrity(self, *, full: bool = False) -> list[str]:
        """Problems found in the store's storage, [] when it is sound."""
        ...

    def close(self) -> None: ...


def write_one(store: MessageStore, op: WriteOp) -> WriteResult:
    """Run a single op in its own transaction (CLI convenience)."""
    return store.write([op])[0]


def open_store(url: str, *, migrate_schema: bool = True) -> MessageStore:
    """Open (creating and migrating if needed) the store named by `url`; with
    ``migrate_schema=False`` (operator commands) a store at another schema version is refused.

    `sqlite:var/koppel.db` (relative), `sqlite:///abs/koppel.db` (absolute), optional
    `?synchronous=NORMAL`. Raises ValueError for a URL it cannot serve.
    """
    scheme, sep, _rest = url.partition(":")
    if not sep or not scheme:
        raise ValueError(f"store URL {url!r} has no scheme; expected e.g. 'sqlite:var/koppel.db'")
    if scheme == "sqlite":
        from engine.store.sqlite import SQLiteStore, parse_sqlite_url

        return SQLiteStore(parse_sqlite_url(url), migrate_schema=migrate_schema)
    raise ValueError(
        f"unknown store scheme {scheme!r} in {url!r}; supported: 'sqlite:PATH' "
        "(e.g. sqlite:var/koppel.db or sqlite:///var/lib/koppel/koppel.db)"
    )
