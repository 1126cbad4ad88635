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
from typing import Literal, Protocol, Sequence, Union

__all__ = [
    "Append",
    "AppendResult",
    "AuditRecord",
    "DeadLetter",
    "DropDeadLetters",
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
EntryState = Literal["pending", "delivered", "dead", "dropped", "replayed"]


class StoreError(Exception):
    """The store could not do what was asked; nothing of the failed write was kept.

    Messages name ids, counts and the kind of failure only, never message content.
    """


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


@_value
class QueueEntry:
    """One message owed to one destination, with the raw bytes the sender needs."""

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
    raw: bytes


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
    """An operator action kept for accountability (drop, replay, resend)."""

    id: int
    at: float
    action: str
    queue: str | None
    entry_id: int | None
    message_id: int | None
    reason: str | None


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
    """Queue a stored message again (operator resend). Result: tuple of new entry ids."""

    message_id: int
    targets: tuple[QueueTarget, ...]
    at: float


@_value
class SetPaused:
    """Pause or resume a queue's sender. Result: None."""

    queue: str
    paused: bool


@_value
class RetryNow:
    """Make the queue's head due immediately. Result: True if there was a head."""

    queue: str


@_value
class ReplayDeadLetters:
    """Put dead entries back at the queue tail, by id or all of one queue.

    Result: tuple of new entry ids, in the order they were queued.
    """

    at: float
    entry_ids: tuple[int, ...] = ()
    queue: str | None = None

    def __post_init__(self) -> None:
        if bool(self.entry_ids) == (self.queue is not None):
            raise ValueError("give either entry_ids or queue")


@_value
class DropDeadLetters:
    """Drop dead entries for good, with a reason kept in the audit log. Result: count dropped."""

    entry_ids: tuple[int, ...]
    reason: str
    at: float


@_value
class Prune:
    """Delete finished entries and unreferenced messages older than `before`. Result: PruneResult.

    At most `limit` entries and `limit` messages go per op, so one prune never holds the
    write lock for long; repeat until both counts are below `limit`.
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


WriteOp = Union[
    Append,
    MarkDelivered,
    RecordFailure,
    DeadLetter,
    Enqueue,
    SetPaused,
    RetryNow,
    ReplayDeadLetters,
    DropDeadLetters,
    Prune,
]
WriteResult = Union[AppendResult, bool, int, tuple[int, ...], PruneResult, None]


# --------------------------------------------------------------------------- protocol


class MessageStore(Protocol):
    """What every backend offers. Safe to call from several threads at once."""

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]: ...

    def get_message(self, message_id: int) -> StoredMessage | None: ...

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
    ) -> list[MessageSummary]: ...

    def queue_head(
        self, queue: str, limit: int = 100, *, after_id: int | None = None
    ) -> list[QueueEntry]: ...

    def queue_depths(self) -> dict[str, int]: ...

    def queue_stats(self, now: float) -> list[QueueStats]: ...

    def is_paused(self, queue: str) -> bool: ...

    def list_dead_letters(self, queue: str | None = None, limit: int = 100) -> list[QueueEntry]: ...

    def get_entry(self, entry_id: int) -> QueueEntry | None: ...

    def list_audit(self, limit: int = 100) -> list[AuditRecord]: ...

    def checkpoint(self) -> None:
        """Housekeeping to call now and then from a non-writer thread (no-op if not needed)."""
        ...

    def close(self) -> None: ...


def write_one(store: MessageStore, op: WriteOp) -> WriteResult:
    """Run a single op in its own transaction (CLI convenience)."""
    return store.write([op])[0]


def open_store(url: str) -> MessageStore:
    """Open (creating and migrating if needed) the store named by `url`.

    `sqlite:var/koppel.db` (relative), `sqlite:///abs/koppel.db` (absolute), optional
    `?synchronous=NORMAL`. Raises ValueError for a URL it cannot serve.
    """
    scheme, sep, _rest = url.partition(":")
    if not sep or not scheme:
        raise ValueError(f"store URL {url!r} has no scheme; expected e.g. 'sqlite:var/koppel.db'")
    if scheme == "sqlite":
        from engine.store.sqlite import SQLiteStore, parse_sqlite_url

        return SQLiteStore(parse_sqlite_url(url))
    raise ValueError(
        f"unknown store scheme {scheme!r} in {url!r}; supported: 'sqlite:PATH' "
        "(e.g. sqlite:var/koppel.db or sqlite:///var/lib/koppel/koppel.db)"
    )
