"""SQLite backend of the message store: one file, WAL, one connection per thread.

Why this shape:
- WAL lets reader threads (and `koppel` CLI processes) read while the engine's single
  writer thread commits, and a commit is one fsync of the log (synchronous=FULL by
  default, NORMAL on request for speed at the cost of the last commits on power loss).
- Every write is `BEGIN IMMEDIATE ... COMMIT`: the write lock is taken up front, so two
  writers (engine + CLI) wait for each other under busy_timeout instead of failing
  half-way with a lock upgrade error.
- Queue depth, dead and delivered counts live in a `queues` row maintained in the same
  transaction as the entries, so `queue_depths()` costs one tiny read however long the
  queues are.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.store import (
    PENDING,
    UNANSWERED,
    AgendaHistoryRecord,
    AgendaRecord,
    Append,
    AppendResult,
    AttachmentInfo,
    AttachmentRecord,
    AuditRecord,
    DeadLetter,
    DropDeadLetters,
    DropHeld,
    Enqueue,
    Heartbeat,
    HeldGone,
    HeldRecord,
    HoldEvent,
    MarkDelivered,
    MarkSending,
    MessageStatus,
    MessageSummary,
    Prune,
    PruneResult,
    PutAttachment,
    QueueEntry,
    QueueStats,
    RecordFailure,
    ReleaseHeld,
    ReplayDeadLetters,
    RetryNow,
    SaveAgendaEntry,
    SetPaused,
    MoveQueue,
    RecordAudit,
    Reprocess,
    SetProcessing,
    StoreBusy,
    StoredMessage,
    StoreError,
    WriteOp,
    WriteResult,
)
from engine.store.migrations import MIGRATIONS, check_version, migrate

__all__ = ["SQLiteConfig", "SQLiteStore", "parse_sqlite_url"]

_SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit
# What `koppel messages` shows for a message an operator handed to mapping again, until it is.
REPROCESS_DETAIL = "to be mapped again (koppel reprocess)"
# ... and for a held message an operator gave up on (the reason is in the audit record).
DROPPED_HELD_DETAIL = "held, given up by an operator (koppel held drop; the reason is in koppel audit)"


@dataclass(frozen=True, slots=True, kw_only=True)
class SQLiteConfig:
    path: Path
    synchronous: str = "FULL"
    busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {self.synchronous!r}"
            )
        if self.busy_timeout < 0:
            raise ValueError("busy_timeout must be >= 0")


def parse_sqlite_url(url: str) -> SQLiteConfig:
    """`sqlite:rel/path.db`, `sqlite:///abs/path.db`, optional `?synchronous=NORMAL&busy_timeout=5`."""
    scheme, _, rest = url.partition(":")
    if scheme != "sqlite":
        raise ValueError(f"not a sqlite store URL: {url!r}")
    location, _, query = rest.partition("?")
    if location.startswith("//"):
        if not location.startswith("///"):
            raise ValueError(
                f"sqlite store URL {url!r} names a host; use sqlite:relative/path.db "
                "or sqlite:///absolute/path.db"
            )
        location = location[2:]
    if not location or location == ":memory:":
        raise ValueError(f"sqlite store URL {url!r} needs a file path (in-memory is not supported)")
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == "synchronous":
            options["synchronous"] = value.upper()
        elif key == "busy_timeout":
            try:
                options["busy_timeout"] = float(value)
            except ValueError:
                raise ValueError(f"busy_timeout in {url!r} must be a number of seconds") from None
        else:
            raise ValueError(
                f"unknown option {key!r} in store URL {url!r}; known: synchronous, busy_timeout"
            )
    return SQLiteConfig(path=Path(location), **options)


# --------------------------------------------------------------------------- SQL

_MESSAGE_COLUMNS = (
    "id, channel, peer, received_at, control_id, sender, message_type, structure, version, "
    "processing_id, charset, size, raw, payload_hash, status, ack_code, ack, error, "
    "duplicate_count, last_duplicate_at, processing"
)
_SUMMARY_COLUMNS = (
    "id, channel, peer, received_at, control_id, sender, message_type, version, size, "
    "status, ack_code, error, duplicate_count, processing, processing_detail, origin_id"
)
_ENTRY_COLUMNS = (
    "SELECT e.id, e.queue, e.destination, e.message_id, e.state, e.attempts, e.enqueued_at, "
    "e.next_attempt_at, e.last_attempt_at, e.last_error, e.last_ack, e.done_at, e.replay_of, "
    "m.control_id, m.message_type, m.charset, {raw} "
    "FROM queue_entries e JOIN messages m ON m.id = e.message_id "
)
# Only the sender's pages read bodies: a listing of 1,000 entries must not read 1,000 PDF
# letters of up to 64 MiB each into memory to show their headers.
_ENTRY_SELECT = _ENTRY_COLUMNS.format(raw="m.raw")
_ENTRY_SELECT_NO_BODY = _ENTRY_COLUMNS.format(raw="NULL")
_ENTRY_RAW = 16  # the body's place in those columns
_FIND_DUPLICATE = (
    "SELECT id, ack, processing FROM messages "
    "WHERE control_id = ? AND channel = ? AND sender IS ? AND payload_hash = ? "
    "AND status = 'accepted' AND received_at >= ? "
    "ORDER BY id LIMIT 1"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (channel, peer, received_at, control_id, sender, message_type, "
    "structure, version, processing_id, charset, size, payload_hash, status, ack_code, ack, "
    "error, raw, origin_id, processing, processing_detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ENTRY = (
    "INSERT INTO queue_entries (queue, destination, message_id, state, enqueued_at, "
    "next_attempt_at, replay_of) VALUES (?, ?, ?, 'pending', ?, 0, ?)"
)
_INSERT_AUDIT = (
    "INSERT INTO audit (at, action, queue, entry_id, message_id, reason) VALUES (?, ?, ?, ?, ?, ?)"
)


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _stored(r: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(
        id=r[0], channel=r[1], peer=r[2], received_at=r[3], control_id=r[4], sender=r[5],
        message_type=r[6], structure=r[7], version=r[8], processing_id=r[9], charset=r[10],
        size=r[11], raw=r[12], payload_hash=r[13], status=r[14], ack_code=r[15], ack=r[16],
        error=r[17], duplicate_count=r[18], last_duplicate_at=r[19], processing=r[20],
    )


def _entry(row: tuple[Any, ...]) -> QueueEntry:
    return QueueEntry(
        id=row[0],
        queue=row[1],
        destination=row[2],
        message_id=row[3],
        state=row[4],
        attempts=row[5],
        enqueued_at=row[6],
        next_attempt_at=row[7],
        last_attempt_at=row[8],
        last_error=row[9],
        last_ack=row[10],
        done_at=row[11],
        replay_of=row[12],
        control_id=row[13],
        message_type=row[14],
        charset=row[15],
        raw=row[16],
    )


# --------------------------------------------------------------------------- unit of work


# Ops that never read or change queue entries, so deliveries may wait for the end beside them.
_BESIDE_DELIVERIES = frozenset({MarkSending, Heartbeat, SetProcessing})


class _Transaction:
    """Applies ops inside one open transaction; batches entry inserts and counter updates."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._new_entries: list[tuple[str, str, int, float, None]] = []
        # queue -> [pending, dead, delivered] deltas, applied once at the end
        self._counts: dict[str, list[int]] = {}
        self._last_error: dict[str, str | None] = {}
        self._inflight: dict[str, int] = {}
        self._deliveries: list[tuple[MarkDelivered, int]] = []

    def apply_all(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Results in op order. Deliveries are written together at the end (one statement per
        few hundred, not one each), or earlier if another op could see them."""
        results: list[WriteResult] = []
        for op in ops:
            if type(op) is MarkDelivered:
                self._deliveries.append((op, len(results)))
                results.append(None)  # filled in by _flush_deliveries
            else:
                if self._deliveries and type(op) not in _BESIDE_DELIVERIES:
                    self._flush_deliveries(results)
                results.append(self.apply(op))
        self._flush_deliveries(results)
        return results

    def _flush_deliveries(self, results: list[WriteResult]) -> None:
        marks, self._deliveries = self._deliveries, []
        deliveries: list[tuple[MarkDelivered, int]] = []
        seen: set[int] = set()
        for op, index in marks:
            if op.entry_id in seen:  # marked twice in one transaction: the first mark counts
                results[index] = False
            else:
                seen.add(op.entry_id)
                deliveries.append((op, index))
        for start in range(0, len(deliveries), 300):
            chunk = deliveries[start : start + 300]
            values = ", ".join("(?, ?, ?)" for _ in chunk)
            params = [value for op, _ in chunk for value in (op.entry_id, op.ack, op.at)]
            rows = self._conn.execute(
                f"WITH done(id, ack, at) AS (VALUES {values}) "
                "UPDATE queue_entries SET state = 'delivered', attempts = attempts + 1, last_ack = done.ack, "
                "last_attempt_at = done.at, done_at = done.at FROM done "
                "WHERE queue_entries.id = done.id AND queue_entries.state = 'pending' "
                "RETURNING queue_entries.id, queue_entries.queue",
                params,
            ).fetchall()
            delivered = dict(rows)
            for op, index in chunk:
                queue = delivered.get(op.entry_id)
                results[index] = queue is not None
                if queue is not None:
                    self._count(queue, pending=-1, delivered=1)
                    self._last_error[queue] = None

    def apply(self, op: WriteOp) -> WriteResult:
        if type(op) is Append:
            return self._append(op)
        # Entries queued by earlier appends must get lower ids than anything this op queues.
        self._flush_entries()
        handler = self._handlers.get(type(op))
        if handler is None:
            raise StoreError(f"unsupported store operation {type(op).__name__}")
        return handler(self, op)

    def finish(self) -> None:
        self._flush_entries()
        if self._inflight:
            self._conn.executemany(
                "INSERT INTO queues (queue, inflight) VALUES (?, ?) ON CONFLICT (queue) DO UPDATE SET inflight = ?",
                [(queue, entry_id, entry_id) for queue, entry_id in self._inflight.items()],
            )
        if not self._counts and not self._last_error:
            return
        execmany = self._conn.executemany
        queues = set(self._counts) | set(self._last_error)
        execmany(
            "INSERT INTO queues (queue) VALUES (?) ON CONFLICT (queue) DO NOTHING",
            [(q,) for q in queues],
        )
        if self._counts:
            execmany(
                "UPDATE queues SET pending = pending + ?, dead = dead + ?, "
                "delivered = delivered + ? WHERE queue = ?",
                [(p, d, v, q) for q, (p, d, v) in self._counts.items()],
            )
        if self._last_error:
            execmany(
                "UPDATE queues SET last_error = ? WHERE queue = ?",
                [(e, q) for q, e in self._last_error.items()],
            )

    # -- helpers

    def _count(self, queue: str, pending: int = 0, dead: int = 0, delivered: int = 0) -> None:
        c = self._counts.get(queue)
        if c is None:
            c = self._counts[queue] = [0, 0, 0]
        c[0] += pending
        c[1] += dead
        c[2] += delivered

    def _flush_entries(self) -> None:
        if self._new_entries:
            self._conn.executemany(_INSERT_ENTRY, self._new_entries)
            for queue, *_ in self._new_entries:
                self._count(queue, pending=1)
            self._new_entries = []

    def _insert_entry(
        self, target_queue: str, destination: str, message_id: int, at: float, replay_of: int | None
    ) -> int:
        cur = self._conn.execute(_INSERT_ENTRY, (target_queue, destination, message_id, at, replay_of))
        self._count(target_queue, pending=1)
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def _finish_entry(self, sql: str, params: tuple[Any, ...]) -> str | None:
        """Run an UPDATE ... WHERE id = ? AND state = 'pending' RETURNING queue."""
        rows = self._conn.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    # -- ops

    def _append(self, op: Append) -> AppendResult:
        m = op.message
        execute = self._conn.execute
        if m.status == "accepted" and m.duplicate_window > 0 and m.control_id is not None:
            row = execute(
                _FIND_DUPLICATE,
                (m.control_id, m.channel, m.sender, m.payload_hash, m.received_at - m.duplicate_window),
            ).fetchone()
            if row is not None:
                first_id, first_ack, first_processing = row
                execute(
                    "UPDATE messages SET duplicate_count = duplicate_count + 1, "
                    "last_duplicate_at = ? WHERE id = ?",
                    (m.received_at, first_id),
                )
                return AppendResult(message_id=first_id, duplicate_of=first_id, ack=first_ack,
                                    in_progress=first_processing == UNANSWERED)
        cur = execute(
            _INSERT_MESSAGE,
            (
                m.channel,
                m.peer,
                m.received_at,
                m.control_id,
                m.sender,
                m.message_type,
                m.structure,
                m.version,
                m.processing_id,
                m.charset,
                len(m.raw),
                m.payload_hash,
                m.status,
                m.ack_code,
                m.ack,
                m.error,
                m.raw,
                m.origin_id,
                m.processing,
                m.processing_detail,
            ),
        )
        message_id = int(cur.lastrowid)  # type: ignore[arg-type]
        if m.status == "accepted":
            for t in m.targets:
                self._new_entries.append((t.queue, t.destination, message_id, m.received_at, None))
        return AppendResult(message_id=message_id, duplicate_of=None, ack=m.ack)

    def _mark_delivered(self, op: MarkDelivered) -> bool:
        queue = self._finish_entry(
            "UPDATE queue_entries SET state = 'delivered', attempts = attempts + 1, "
            "last_ack = ?, last_attempt_at = ?, done_at = ? "
            "WHERE id = ? AND state = 'pending' RETURNING queue",
            (op.ack, op.at, op.at, op.entry_id),
        )
        if queue is None:
            return False
        self._count(queue, pending=-1, delivered=1)
        self._last_error[queue] = None
        return True

    def _record_failure(self, op: RecordFailure) -> bool:
        queue = self._finish_entry(
            "UPDATE queue_entries SET attempts = attempts + 1, last_error = ?, last_ack = ?, "
            "next_attempt_at = ?, last_attempt_at = ? "
            "WHERE id = ? AND state = 'pending' RETURNING queue",
            (op.error, op.ack, op.next_attempt_at, op.at, op.entry_id),
        )
        if queue is None:
            return False
        self._last_error[queue] = op.error
        self._settled_on_the_wire(queue, op.entry_id)
        return True

    def _settled_on_the_wire(self, queue: str, entry_id: int) -> None:
        """The entry recorded as on the wire has its answer (a failure, a dead letter): no longer
        on the wire, so a move may take it (the head of a queue whose host changed)."""
        if self._inflight.get(queue) == entry_id:
            del self._inflight[queue]
        self._conn.execute("UPDATE queues SET inflight = NULL WHERE queue = ? AND inflight = ?", (queue, entry_id))

    def _dead_letter(self, op: DeadLetter) -> bool:
        queue = self._finish_entry(
            "UPDATE queue_entries SET state = 'dead', attempts = attempts + 1, last_error = ?, "
            "last_ack = ?, last_attempt_at = ?, done_at = ? "
            "WHERE id = ? AND state = 'pending' RETURNING queue",
            (op.reason, op.ack, op.at, op.at, op.entry_id),
        )
        if queue is None:
            return False
        self._count(queue, pending=-1, dead=1)
        self._last_error[queue] = op.reason
        self._settled_on_the_wire(queue, op.entry_id)
        return True

    def _enqueue(self, op: Enqueue) -> tuple[int, ...]:
        row = self._conn.execute(
            "SELECT status FROM messages WHERE id = ?", (op.message_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"message {op.message_id} does not exist")
        if row[0] != "accepted":
            raise StoreError(f"message {op.message_id} was rejected; only accepted messages are queued")
        new_ids = []
        for t in op.targets:
            entry_id = self._insert_entry(t.queue, t.destination, op.message_id, op.at, None)
            if op.audit:
                self._audit(op.at, "resend", t.queue, entry_id, op.message_id, f"to {t.destination}")
            new_ids.append(entry_id)
        return tuple(new_ids)

    def _set_paused(self, op: SetPaused) -> None:
        self._conn.execute(
            "INSERT INTO queues (queue, paused) VALUES (?, ?) "
            "ON CONFLICT (queue) DO UPDATE SET paused = excluded.paused",
            (op.queue, int(op.paused)),
        )
        if op.at is not None:
            self._audit(op.at, "pause" if op.paused else "resume", op.queue, None, None, op.reason)

    def _retry_now(self, op: RetryNow) -> int:
        # In FIFO order only the head ever waits; with order:none several may, so all are freed.
        cur = self._conn.execute(
            "UPDATE queue_entries SET next_attempt_at = 0 "
            "WHERE queue = ? AND state = 'pending' AND next_attempt_at > 0",
            (op.queue,),
        )
        if op.at is not None and cur.rowcount:  # an operator's retry that freed something
            self._audit(op.at, "retry-now", op.queue, None, None, op.reason)
        return cur.rowcount

    def _record_audit(self, op: RecordAudit) -> None:
        self._audit(op.at, op.action, None, None, op.message_id, op.reason)

    def _move_queue(self, op: MoveQueue) -> tuple[int, ...]:
        where = {name: (queue, new_name) for name, queue, new_name in op.moves}
        rows = self._conn.execute(
            "UPDATE queue_entries SET state = 'replayed', done_at = ? WHERE id IN ("
            "SELECT id FROM queue_entries WHERE queue = ? AND state = 'pending' "
            f"AND destination IN ({_placeholders(len(where))}) "
            # not the one a sender recorded as on the wire: it may be delivered where it is
            "AND id IS NOT (SELECT inflight FROM queues WHERE queue = ?) ORDER BY id LIMIT ?) "
            "RETURNING id, message_id, destination",
            (op.at, op.from_queue, *where, op.from_queue, op.limit),
        ).fetchall()
        new_ids = []
        for old_id, message_id, destination in sorted(rows):
            to_queue, new_name = where[destination]
            self._count(op.from_queue, pending=-1)
            new_id = self._insert_entry(to_queue, new_name, message_id, op.at, old_id)
            why = f"to {to_queue} ({new_name}) as entry {new_id}" + (f": {op.reason}" if op.reason else "")
            self._audit(op.at, "move", op.from_queue, old_id, message_id, why)
            new_ids.append(new_id)
        return tuple(new_ids)

    def _replay(self, op: ReplayDeadLetters) -> tuple[int, ...]:
        dead: list[tuple[int, str, str, int]] = []
        select = "SELECT id, queue, destination, message_id FROM queue_entries "
        if op.queue is not None:
            dead = self._conn.execute(
                select + "WHERE queue = ? AND state = 'dead' AND id < ? ORDER BY id LIMIT ?",
                (op.queue, 2**63 - 1 if op.below_id is None else op.below_id, -1 if op.limit is None else op.limit),
            ).fetchall()
        else:
            for chunk in _chunks(sorted(set(op.entry_ids))):
                dead += self._conn.execute(
                    select + f"WHERE id IN ({_placeholders(len(chunk))}) AND state = 'dead'",
                    tuple(chunk),
                ).fetchall()
            dead.sort()
        new_ids = []
        for old_id, queue, destination, message_id in dead:
            self._conn.execute(
                "UPDATE queue_entries SET state = 'replayed', done_at = ? WHERE id = ?",
                (op.at, old_id),
            )
            self._count(queue, dead=-1)
            new_id = self._insert_entry(queue, destination, message_id, op.at, old_id)
            self._audit(op.at, "replay", queue, old_id, message_id, f"as entry {new_id}")
            new_ids.append(new_id)
        return tuple(new_ids)

    def _drop(self, op: DropDeadLetters) -> tuple[int, ...]:
        dropped: list[int] = []
        for chunk in _chunks(sorted(set(op.entry_ids))):
            rows = self._conn.execute(
                "UPDATE queue_entries SET state = 'dropped', done_at = ? "
                f"WHERE id IN ({_placeholders(len(chunk))}) AND state = 'dead' "
                "RETURNING id, queue, message_id",
                (op.at, *chunk),
            ).fetchall()
            for entry_id, queue, message_id in sorted(rows):
                self._count(queue, dead=-1)
                self._audit(op.at, "drop", queue, entry_id, message_id, op.reason)
                dropped.append(entry_id)
        return tuple(dropped)

    def _prune(self, op: Prune) -> PruneResult:
        entries = self._conn.execute(
            "DELETE FROM queue_entries WHERE id IN (SELECT id FROM queue_entries "
            "WHERE state IN ('delivered', 'dropped', 'replayed') AND done_at < ? LIMIT ?)",
            (op.before, op.limit),
        ).rowcount
        # A message goes only once nothing refers to it any more; pending and dead
        # entries (and finished ones not yet old enough) keep their body alive, and so does
        # a hand-off not done yet (PENDING, UNANSWERED) or an event held for its entry.
        messages = self._conn.execute(
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m "
            "WHERE m.received_at < ? AND (m.processing IS NULL OR m.processing NOT IN (?, ?, 'held')) "
            "AND NOT EXISTS (SELECT 1 FROM queue_entries e WHERE e.message_id = m.id) LIMIT ?)",
            (op.before, PENDING, UNANSWERED, op.limit),
        ).rowcount
        # A released (or dropped) held event is never read again (its entry has the data, the
        # letter is stored by sha256; its message keeps the rest): its event was emptied when it
        # was released, and the row goes with its keys once released longer ago than the retention.
        released = [row[0] for row in self._conn.execute(
            "SELECT id FROM held_events WHERE released_at < ? ORDER BY released_at LIMIT ?",
            (op.before, op.limit),
        )]
        for chunk in _chunks(released):
            marks = _placeholders(len(chunk))
            self._conn.execute(f"DELETE FROM held_keys WHERE held_id IN ({marks})", tuple(chunk))
            self._conn.execute(f"DELETE FROM held_events WHERE id IN ({marks})", tuple(chunk))
        return PruneResult(entries=entries, messages=messages, held=len(released))

    def _audit(
        self, at: float, action: str, queue: str | None, entry_id: int | None,
        message_id: int | None, reason: str | None,
    ) -> None:
        self._conn.execute(_INSERT_AUDIT, (at, action, queue, entry_id, message_id, reason))

    # -- agendas

    def _save_agenda_entry(self, op: SaveAgendaEntry) -> int:
        execute = self._conn.execute
        attachments = " ".join(op.attachments)
        if op.entry_id is None or op.new:
            cur = execute(
                "INSERT INTO agenda_entries (id, agenda_id, kind, state, zd_number, placer_id, filler_id, "
                "data, attachments, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (op.entry_id, op.agenda_id, op.kind, op.state, op.zd_number, op.placer_id, op.filler_id, op.data,
                 attachments, op.at, op.at),
            )
            entry_id = int(cur.lastrowid)  # type: ignore[arg-type]
        elif not op.history:
            if execute("UPDATE agenda_entries SET data = ? WHERE id = ?", (op.data, op.entry_id)).rowcount != 1:
                raise StoreError(f"agenda entry {op.entry_id} does not exist")
            return op.entry_id
        else:
            entry_id = op.entry_id
            cur = execute(
                "UPDATE agenda_entries SET agenda_id = ?, kind = ?, state = ?, zd_number = ?, "
                "placer_id = ?, filler_id = ?, data = ?, attachments = ?, updated_at = ? WHERE id = ?",
                (op.agenda_id, op.kind, op.state, op.zd_number, op.placer_id, op.filler_id, op.data,
                 attachments, op.at, entry_id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"agenda entry {entry_id} does not exist")
        self._conn.executemany(
            "INSERT INTO agenda_keys (key, entry_id) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            [(key, entry_id) for key in op.keys],
        )
        execute(
            "INSERT INTO agenda_history (entry_id, at, message_id, action, from_state, to_state, changed, "
            "event_kind, event_action) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry_id, op.at, op.message_id, op.action, op.from_state, op.state, " ".join(op.changed),
             op.event_kind, op.event_action),
        )
        return entry_id

    def _put_attachment(self, op: PutAttachment) -> bool:
        cur = self._conn.execute(
            "INSERT INTO attachments (sha256, media_type, filename, size, data) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (sha256) DO NOTHING",
            (op.sha256, op.media_type, op.filename, len(op.data), op.data),
        )
        return cur.rowcount == 1

    def _hold_event(self, op: HoldEvent) -> int:
        cur = self._conn.execute(
            "INSERT INTO held_events (message_id, event, held_at) VALUES (?, ?, ?)",
            (op.message_id, op.event, op.at),
        )
        held_id = int(cur.lastrowid)  # type: ignore[arg-type]
        self._conn.executemany(
            "INSERT INTO held_keys (key, held_id) VALUES (?, ?)", [(key, held_id) for key in op.keys]
        )
        return held_id

    def _release_held(self, op: ReleaseHeld) -> int:
        """Checked in the write's own transaction: an event dropped (or pruned after a drop)
        since the caller read it fails the write, so the caller's plan is not committed."""
        wanted = set(op.ids)
        released: set[int] = set()
        for chunk in _chunks(sorted(wanted)):
            released.update(row[0] for row in self._conn.execute(
                f"UPDATE held_events SET released_at = ?, event = '{{}}' WHERE released_at IS NULL "
                f"AND id IN ({_placeholders(len(chunk))}) RETURNING id",
                (op.at, *chunk),
            ))
        if released != wanted:
            raise HeldGone(wanted - released)
        return len(released)

    def _set_processing(self, op: SetProcessing) -> None:
        if op.ack is None:
            self._conn.execute(
                "UPDATE messages SET processing = ?, processing_detail = ? WHERE id = ?",
                (op.outcome, op.detail, op.message_id),
            )
            return
        self._conn.execute(
            "UPDATE messages SET processing = ?, processing_detail = ?, status = 'rejected', ack_code = ?, "
            "ack = ?, error = ? WHERE id = ?",
            (op.outcome, op.detail, op.ack_code, op.ack, op.detail, op.message_id),
        )

    def _reprocess(self, op: Reprocess) -> tuple[int, ...]:
        outcomes = _placeholders(len(op.outcomes))
        taken = ("status = 'accepted' AND origin_id IS NULL "
                 f"AND processing IN ({outcomes})")
        if op.channel is not None:
            rows = self._conn.execute(
                f"SELECT id, processing, processing_detail FROM messages WHERE channel = ? AND id > ? AND {taken} "
                "ORDER BY id LIMIT ?",
                (op.channel, op.after_id, *op.outcomes, op.limit),
            ).fetchall()
        else:
            rows = []
            for chunk in _chunks(sorted(set(op.message_ids))):
                rows += self._conn.execute(
                    f"SELECT id, processing, processing_detail FROM messages "
                    f"WHERE id IN ({_placeholders(len(chunk))}) AND {taken}",
                    (*chunk, *op.outcomes),
                ).fetchall()
        rows.sort()
        for chunk in _chunks([row[0] for row in rows]):
            self._conn.execute(
                f"UPDATE messages SET processing = ?, processing_detail = ? WHERE id IN ({_placeholders(len(chunk))})",
                (PENDING, REPROCESS_DETAIL, *chunk),
            )
        for message_id, outcome, detail in rows:
            why = f"was {outcome}" + (f" ({detail})" if detail else "") + (f": {op.reason}" if op.reason else "")
            self._audit(op.at, "reprocess", None, None, message_id, why)
        return tuple(row[0] for row in rows)

    def _drop_held(self, op: DropHeld) -> tuple[int, ...]:
        ids: list[int] = []
        for chunk in _chunks(sorted(set(op.message_ids))):
            marks = _placeholders(len(chunk))
            taken = [row[0] for row in self._conn.execute(
                f"UPDATE messages SET processing = 'error', processing_detail = ? "
                f"WHERE id IN ({marks}) AND processing = 'held' RETURNING id", (DROPPED_HELD_DETAIL, *chunk))]
            if taken:
                self._conn.execute(
                    f"UPDATE held_events SET released_at = ?, event = '{{}}' WHERE released_at IS NULL "
                    f"AND message_id IN ({_placeholders(len(taken))})", (op.at, *taken))
            ids += taken
        for message_id in sorted(ids):
            self._audit(op.at, "drop-held", None, None, message_id, op.reason)
        return tuple(sorted(ids))

    def _heartbeat(self, op: Heartbeat) -> None:
        self._conn.execute(
            "INSERT INTO heartbeat (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = ?", (op.at, op.at)
        )

    def _mark_sending(self, op: MarkSending) -> None:
        # Only the last mark per queue in a transaction matters: written once, in finish().
        self._inflight[op.queue] = op.entry_id

    _handlers: dict[type, Any] = {
        MarkSending: _mark_sending,
        Heartbeat: _heartbeat,
        SaveAgendaEntry: _save_agenda_entry,
        PutAttachment: _put_attachment,
        HoldEvent: _hold_event,
        ReleaseHeld: _release_held,
        SetProcessing: _set_processing,
        Reprocess: _reprocess,
        DropHeld: _drop_held,
        MarkDelivered: _mark_delivered,
        RecordFailure: _record_failure,
        DeadLetter: _dead_letter,
        Enqueue: _enqueue,
        SetPaused: _set_paused,
        RetryNow: _retry_now,
        MoveQueue: _move_queue,
        RecordAudit: _record_audit,
        ReplayDeadLetters: _replay,
        DropDeadLetters: _drop,
        Prune: _prune,
    }


# --------------------------------------------------------------------------- the store


# A commit copies the log into the database itself (a stall of milliseconds) only once the
# log holds this many pages (16 MB), i.e. when checkpoint() from a background thread has
# fallen behind. SQLite's default, 1000 pages, is reached between two background
# checkpoints under load, so commits paid for them: measured NORMAL commit 141 -> 86 us.
WRITER_CHECKPOINT_PAGES = 4000


class SQLiteStore:
    """A `MessageStore` in one SQLite file. Thread-safe: each thread gets its own connection."""

    def __init__(self, config: SQLiteConfig, *, migrate_schema: bool = True) -> None:
        self.config = config
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._closed = False
        self._claims: dict[str, int] = {}  # duty -> fd holding its lock (claim)
        try:
            _create_private(config.path, create_file=migrate_schema)
        except OSError as exc:
            raise StoreError(f"cannot create the store: {exc.strerror}") from exc
        conn = self._conn()
        try:
            if migrate_schema:
                conn.execute("PRAGMA journal_mode = WAL")
                migrate(conn, MIGRATIONS, now=time.time())
            else:  # an operator command beside a running engine: never changes the schema under it
                check_version(conn, MIGRATIONS)
            self._identity = self._file_identity()
        except StoreError:
            self.close()
            raise
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open the store: {exc}") from exc
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot open the store: {exc.strerror}") from exc

    def _file_identity(self) -> tuple[int, int]:
        st = os.stat(self.config.path)
        return st.st_dev, st.st_ino

    def _check_file(self) -> None:
        """The file at the store's path is still the one opened. SQLite goes on committing into
        a file that was removed (`rm -rf var/`) or moved away, and that is gone or elsewhere
        at the next start: a message acknowledged meanwhile would be lost. One stat a commit."""
        try:
            same = self._file_identity() == self._identity
        except OSError:
            same = False
        if not same:
            raise StoreError(f"the store file {self.config.path} was removed or replaced while in use; "
                             "nothing more is committed to it (restart the engine)")

    # -- connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.config.path,
            timeout=self.config.busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # only so close() may close it; used by one thread
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout * 1000)}")
        conn.execute(f"PRAGMA synchronous = {self.config.synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the store: {exc}") from exc
            self._local.conn = conn
            self._local.waits = True  # as _connect set it
            with self._lock:
                if self._closed:
                    conn.close()
                    raise StoreError("the store is closed")
                # Close connections of threads that have ended, so a churning pool cannot leak.
                alive = []
                for ref, other in self._connections:
                    thread = ref()
                    if thread is not None and thread.is_alive():
                        alive.append((ref, other))
                    else:
                        other.close()
                alive.append((weakref.ref(threading.current_thread()), conn))
                self._connections = alive
        return conn

    def checkpoint(self) -> None:
        """Copy committed WAL pages into the database file, from the calling thread.

        SQLite otherwise does this inside whichever commit crosses WRITER_CHECKPOINT_PAGES,
        a stall of milliseconds on the writer thread. The shell calls this every 50 ms from
        a non-writer thread so the writer rarely finds work left to do.
        PASSIVE: it never blocks readers or the writer.
        """
        try:
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store checkpoint failed: {exc}") from exc

    def data_version(self) -> int:
        """A number that changes when another process commits (SQLite's data_version).

        Cheap (no table is read): a delivering process that does not receive polls it to
        learn that a receiving process queued something."""
        try:
            return self._conn().execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def claimed_elsewhere(self, duty: str) -> bool:
        import fcntl

        if duty in self._claims:
            return False
        path = Path(f"{self.config.path.resolve()}.{duty}.lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # never claimed
        except OSError as exc:
            raise StoreError(f"cannot open the lock {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while a claimant holds it
        except OSError:
            return True
        finally:
            os.close(fd)  # (closing drops the probe's shared lock)
        return False

    def claim(self, duty: str) -> None:
        """Become the one process that does ``duty`` ("receive" or "deliver") for this store,
        until close().

        Two deliverers would send the same queues twice and out of order; two receivers would
        both resume the same unmapped messages at start and map them twice. The claim is an
        exclusive lock on `<store>.<duty>.lock` (holding the claimant's pid), so the kernel
        releases it when the process dies, `kill -9` included."""
        import fcntl

        if duty in self._claims:
            return
        path = Path(f"{self.config.path.resolve()}.{duty}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the lock {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            what = "delivers from" if duty == "deliver" else "receives for"
            raise StoreError(
                f"another Koppel process (pid {holder}) already {what} this store; "
                "run one process per role (--role receive, --role deliver, or one --role all)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._claims[duty] = fd

    def close(self) -> None:
        """Close every thread's connection and give up its claims. Idempotent."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
            claims, self._claims = self._claims, {}
        for _, conn in connections:
            conn.close()
        for fd in claims.values():
            os.close(fd)

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes

    def write(self, ops: Sequence[WriteOp], *, wait: bool = True) -> list[WriteResult]:
        """Run all `ops` in one transaction, commit once; results align with ops.

        On any failure everything is rolled back and StoreError is raised. With
        ``wait=False`` a write lock held by another process raises StoreBusy at once:
        SQLite's own wait sleeps 1, 2, 5, 10... ms inside the call, which would hold
        the caller's reactor, where a retry a fraction of a millisecond later would not.
        """
        if not ops:
            return []
        conn = self._conn()
        try:
            self._wait_for_locks(conn, wait)
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if not wait and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                raise StoreBusy("the store is being written by another process") from None
            raise StoreError(f"store write could not start: {exc}") from exc
        try:
            tx = _Transaction(conn)
            results = tx.apply_all(ops)
            tx.finish()
            self._check_file()
            conn.execute("COMMIT")
            return results
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"store write of {len(ops)} operations failed: {exc}") from exc
            if isinstance(exc, Exception):
                raise StoreError(
                    f"store write of {len(ops)} operations failed ({type(exc).__name__})"
                ) from exc
            raise

    def _wait_for_locks(self, conn: sqlite3.Connection, wait: bool) -> None:
        """Give the connection the busy timeout this statement needs, only when it changes.

        The engine's committer writes with ``wait=False`` turn after turn; setting the timeout
        to 0 and back around each of those commits cost two PRAGMAs per commit (measured: a
        tenth of the receive path's Python time outside SQLite)."""
        if getattr(self._local, "waits", True) != wait:
            timeout = int(self.config.busy_timeout * 1000) if wait else 0
            conn.execute(f"PRAGMA busy_timeout = {timeout}")
            self._local.waits = wait

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL); nothing was kept

    # -- reads

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            conn = self._conn()
            self._wait_for_locks(conn, True)
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def get_message(self, message_id: int) -> StoredMessage | None:
        rows = self._query(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        return _stored(rows[0]) if rows else None

    def pending_processing(
        self, *, after_id: int = 0, limit: int = 500, received_before: float | None = None,
        reprocessed: bool = True, max_bytes: int | None = None,
    ) -> list[StoredMessage]:
        skip = () if reprocessed else (REPROCESS_DETAIL,)
        where = (f"processing IN (?, ?) AND id > ? AND received_at < ? "
                 f"{'AND processing_detail IS NOT ? ' if skip else ''}")
        args = (PENDING, UNANSWERED, after_id, float("inf") if received_before is None else received_before, *skip)
        if max_bytes is None:
            rows = self._query(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where}ORDER BY id LIMIT ?",
                               (*args, limit))
        else:  # ids and sizes first, then the bodies of those whose predecessors come to less
            rows = self._query(
                f"WITH head AS (SELECT id, size FROM messages WHERE {where}ORDER BY id LIMIT ?), "
                "page AS (SELECT id, SUM(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - size AS before FROM head) "
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN (SELECT id FROM page WHERE before < MAX(?, 1)) ORDER BY id",
                (*args, limit, max_bytes))
        return [_stored(r) for r in rows]

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
    ) -> list[MessageSummary]:
        """Newest first (oldest first with `oldest_first`), without bodies. `since` inclusive,
        `until` exclusive; `message_ids` (at most a few hundred: an entry's history) narrows to
        those; `origin_id`: the messages a mapping built from that one."""
        where: list[str] = []
        params: list[Any] = []
        if message_ids is not None:
            ids = sorted(set(message_ids))[:_CHUNK]
            where.append(f"id IN ({_placeholders(len(ids))})" if ids else "0")
            params.extend(ids)
        for clause, value in (
            ("channel = ?", channel),
            ("control_id = ?", control_id),
            ("message_type = ?", message_type),
            ("received_at >= ?", since),
            ("received_at < ?", until),
            ("status = ?", status),
            ("processing = ?", processing),
            ("origin_id = ?", origin_id),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + f" ORDER BY id {'ASC' if oldest_first else 'DESC'} LIMIT ?", (*params, limit))
        return [
            MessageSummary(
                id=r[0], channel=r[1], peer=r[2], received_at=r[3], control_id=r[4], sender=r[5],
                message_type=r[6], version=r[7], size=r[8], status=r[9], ack_code=r[10],
                error=r[11], duplicate_count=r[12], processing=r[13], processing_detail=r[14],
                origin_id=r[15],
            )
            for r in rows
        ]

    def pending_destinations(self, queue: str) -> dict[str, int]:
        """How many entries wait on ``queue`` for each destination name."""
        rows = self._query(
            "SELECT destination, count(*) FROM queue_entries WHERE queue = ? AND state = 'pending' "
            "GROUP BY destination", (queue,))
        return {name: int(count) for name, count in rows}

    def queue_head(
        self, queue: str, limit: int = 100, *, after_id: int | None = None, bodies: bool = True,
        max_bytes: int | None = None,
    ) -> list[QueueEntry]:
        """Pending entries in FIFO (id) order, one page; pass the last id as `after_id` for the next.
        ``bodies=False`` leaves ``raw`` None (listings, the age gauge). ``max_bytes``: the page
        ends with the entry whose body reaches that many bytes (never fewer than one entry)."""
        sql = ((_ENTRY_SELECT if bodies else _ENTRY_SELECT_NO_BODY)
               + "WHERE e.queue = ? AND e.state = 'pending' AND e.id > ? ORDER BY e.id LIMIT ?")
        params = (queue, after_id or 0, limit)
        if not bodies or max_bytes is None:
            return [_entry(r) for r in self._query(sql, params)]
        # The index gives the rows in id order, one at a time (no sort): stop reading at the
        # bound, so the bodies after it are never read (a queue of 20 MB letters).
        rows, total = [], 0
        try:
            conn = self._conn()
            self._wait_for_locks(conn, True)
            cursor = conn.execute(sql, params)
            try:
                for row in cursor:
                    rows.append(row)
                    total += len(row[_ENTRY_RAW])
                    if total >= max_bytes:
                        break
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc
        return [_entry(r) for r in rows]

    # -- agendas

    _AGENDA_COLUMNS = (
        "id, agenda_id, kind, state, zd_number, placer_id, filler_id, data, attachments, "
        "created_at, updated_at"
    )

    @staticmethod
    def _agenda(r: tuple[Any, ...]) -> AgendaRecord:
        return AgendaRecord(
            id=r[0], agenda_id=r[1], kind=r[2], state=r[3], zd_number=r[4], placer_id=r[5],
            filler_id=r[6], data=r[7], attachments=tuple(r[8].split()) if r[8] else (),
            created_at=r[9], updated_at=r[10],
        )

    def find_agenda_entry(self, keys: Sequence[str]) -> AgendaRecord | None:
        """The entry any of `keys` belongs to (the first key that is known wins)."""
        for key in keys:
            rows = self._query(
                f"SELECT {self._AGENDA_COLUMNS} FROM agenda_entries WHERE id = "
                "(SELECT entry_id FROM agenda_keys WHERE key = ?)",
                (key,),
            )
            if rows:
                return self._agenda(rows[0])
        return None

    def get_agenda_entry(self, entry_id: int) -> AgendaRecord | None:
        rows = self._query(f"SELECT {self._AGENDA_COLUMNS} FROM agenda_entries WHERE id = ?", (entry_id,))
        return self._agenda(rows[0]) if rows else None

    def list_agenda_entries(
        self,
        *,
        agenda_id: str | None = None,
        state: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AgendaRecord]:
        """Most recently changed first; `since`/`until` filter on the last change."""
        where, params = [], []
        for clause, value in (
            ("agenda_id = ?", agenda_id),
            ("state = ?", state),
            ("updated_at >= ?", since),
            ("updated_at < ?", until),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {self._AGENDA_COLUMNS} FROM agenda_entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY updated_at DESC, id DESC LIMIT ?", (*params, limit))
        return [self._agenda(r) for r in rows]

    def next_agenda_entry_id(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(id), 0) + 1 FROM agenda_entries")
        return int(rows[0][0])

    def agenda_history(self, entry_id: int) -> list[AgendaHistoryRecord]:
        rows = self._query(
            "SELECT entry_id, at, message_id, action, from_state, to_state, changed, event_kind, event_action "
            "FROM agenda_history WHERE entry_id = ? ORDER BY id",
            (entry_id,),
        )
        return [
            AgendaHistoryRecord(
                entry_id=r[0], at=r[1], message_id=r[2], action=r[3], from_state=r[4], to_state=r[5],
                changed=tuple(r[6].split()) if r[6] else (), event_kind=r[7], event_action=r[8],
            )
            for r in rows
        ]

    def agenda_entries_changed_by(self, message_id: int) -> list[int]:
        # No index on message_id (it would cost every mapped message a write for an operator's
        # lookup): the history's rows are small, so a scan of a year's is a fraction of a second.
        rows = self._query("SELECT entry_id FROM agenda_history WHERE message_id = ? GROUP BY entry_id "
                           "ORDER BY MIN(id)", (message_id,))
        return [r[0] for r in rows]

    def held_backlog(self) -> tuple[int, float | None]:
        (count, oldest), = self._query("SELECT COUNT(*), MIN(held_at) FROM held_events WHERE released_at IS NULL")
        return count, oldest

    def has_held_events(self) -> bool:
        return bool(self._query("SELECT 1 FROM held_events WHERE released_at IS NULL LIMIT 1"))

    def held_events(self, keys: Sequence[str]) -> list[HeldRecord]:
        """Unreleased events held for any of `keys`, in arrival order."""
        if not keys:
            return []
        rows = self._query(
            "SELECT h.id, h.message_id, h.event, h.held_at FROM held_events h WHERE h.released_at IS NULL "
            f"AND h.id IN (SELECT held_id FROM held_keys WHERE key IN ({_placeholders(len(keys))})) "
            "ORDER BY h.id",
            tuple(keys),
        )
        out = []
        for r in rows:
            held_keys = tuple(k for (k,) in self._query("SELECT key FROM held_keys WHERE held_id = ?", (r[0],)))
            out.append(HeldRecord(id=r[0], keys=held_keys, message_id=r[1], event=r[2], held_at=r[3]))
        return out

    def get_attachment(self, sha256: str) -> AttachmentRecord | None:
        rows = self._query(
            "SELECT sha256, media_type, filename, size, data FROM attachments WHERE sha256 = ?", (sha256,)
        )
        if not rows:
            return None
        r = rows[0]
        return AttachmentRecord(sha256=r[0], media_type=r[1], filename=r[2], size=r[3], data=r[4])

    def attachment_infos(self, sha256s: Sequence[str]) -> list[AttachmentInfo]:
        """Without the data column: the stored size answers how big it is."""
        wanted = tuple(dict.fromkeys(sha256s))
        found = {}
        for chunk in _chunks(wanted):
            rows = self._query(
                "SELECT sha256, media_type, filename, size FROM attachments "
                f"WHERE sha256 IN ({_placeholders(len(chunk))})",
                chunk,
            )
            for r in rows:
                found[r[0]] = AttachmentInfo(sha256=r[0], media_type=r[1], filename=r[2], size=r[3])
        return [found[h] for h in sha256s if h in found]

    def agenda_counts(self) -> dict[tuple[str, str], int]:
        """Entries per (agenda, state), for the agenda gauge."""
        rows = self._query("SELECT agenda_id, state, COUNT(*) FROM agenda_entries GROUP BY agenda_id, state")
        return {(agenda, state): count for agenda, state, count in rows}

    def handoff_backlog(self) -> tuple[int, float | None]:
        (count, oldest), = self._query(
            "SELECT COUNT(*), MIN(received_at) FROM messages WHERE processing IN (?, ?)", (PENDING, UNANSWERED))
        return count, oldest

    def processing_counts(self) -> dict[str, int]:
        return dict(
            self._query("SELECT processing, COUNT(*) FROM messages WHERE processing IS NOT NULL GROUP BY processing")
        )

    def inflight_entry(self, queue: str) -> int | None:
        rows = self._query("SELECT inflight FROM queues WHERE queue = ?", (queue,))
        return rows[0][0] if rows else None

    def queue_depths(self) -> dict[str, int]:
        return dict(self._query("SELECT queue, pending FROM queues ORDER BY queue"))

    def queue_stats(self, now: float) -> list[QueueStats]:
        rows = self._query(
            "SELECT q.queue, q.pending, q.paused, q.last_error, q.dead, q.delivered, "
            "(SELECT e.enqueued_at FROM queue_entries e WHERE e.queue = q.queue "
            " AND e.state = 'pending' ORDER BY e.id LIMIT 1) "
            "FROM queues q ORDER BY q.queue"
        )
        return [
            QueueStats(
                queue=r[0], depth=r[1], paused=bool(r[2]), last_error=r[3], dead_count=r[4],
                delivered_count=r[5], oldest_enqueued_at=r[6],
                oldest_age=None if r[6] is None else max(0.0, now - r[6]),
            )
            for r in rows
        ]

    def is_paused(self, queue: str) -> bool:
        rows = self._query("SELECT paused FROM queues WHERE queue = ?", (queue,))
        return bool(rows and rows[0][0])

    def list_dead_letters(self, queue: str | None = None, limit: int = 100) -> list[QueueEntry]:
        """Dead entries, oldest first, without their bodies (``raw`` None)."""
        if queue is None:
            rows = self._query(_ENTRY_SELECT_NO_BODY + "WHERE e.state = 'dead' ORDER BY e.id LIMIT ?", (limit,))
        else:
            rows = self._query(
                _ENTRY_SELECT_NO_BODY + "WHERE e.queue = ? AND e.state = 'dead' ORDER BY e.id LIMIT ?",
                (queue, limit),
            )
        return [_entry(r) for r in rows]

    def get_entry(self, entry_id: int) -> QueueEntry | None:
        """One entry without its body (``raw`` None): the message itself is ``get_message``."""
        rows = self._query(_ENTRY_SELECT_NO_BODY + "WHERE e.id = ?", (entry_id,))
        return _entry(rows[0]) if rows else None

    def entries_of_messages(self, message_ids: Sequence[int]) -> list[QueueEntry]:
        out: list[QueueEntry] = []
        for chunk in _chunks(list(dict.fromkeys(message_ids))):
            rows = self._query(
                _ENTRY_SELECT_NO_BODY + f"WHERE e.message_id IN ({_placeholders(len(chunk))}) ORDER BY e.id",
                tuple(chunk))
            out.extend(_entry(r) for r in rows)
        return sorted(out, key=lambda e: e.id)

    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        """Newest first."""
        rows = self._query(
            "SELECT id, at, action, queue, entry_id, message_id, reason FROM audit "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            AuditRecord(id=r[0], at=r[1], action=r[2], queue=r[3], entry_id=r[4],
                        message_id=r[5], reason=r[6])
            for r in rows
        ]

    def schema_version(self) -> int:
        rows = self._query("SELECT max(version) FROM schema_version")
        return int(rows[0][0] or 0)

    # -- maintenance (operator commands)

    def backup(self, target: str, *, cancelled: Callable[[], bool] | None = None) -> int:
        """Write a consistent copy of the whole store to the new file ``target``; its size.

        VACUUM INTO reads in one read transaction: the copy is one committed state, and in WAL
        mode the engine's commits go on meanwhile. It is written under a temporary name, synced,
        then linked to ``target``, so a file at ``target`` is always a whole backup and an
        existing file is never overwritten. ``cancelled`` is asked now and then while it copies
        (a SIGTERM): then it stops, removes the partial copy and raises StoreError."""
        path = Path(target)
        if path.exists() or path.is_symlink():
            raise StoreError(f"{path} already exists; a backup never overwrites a file")
        if not path.parent.is_dir():
            raise StoreError(f"no directory {path.parent} for the backup")
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            # Made empty first, as readable as the store itself and no more: it holds patient data.
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             stat.S_IMODE(os.stat(self.config.path).st_mode) & 0o666))
            conn = self._conn()
            self._wait_for_locks(conn, True)
            if cancelled is not None:  # (a Python callback, so a signal handler runs meanwhile too)
                conn.set_progress_handler(lambda: 1 if cancelled() else 0, 1000)
            try:
                conn.execute("VACUUM INTO ?", (str(partial),))
            finally:
                if cancelled is not None:
                    conn.set_progress_handler(None, 0)
            _fsync(partial)  # VACUUM INTO does not sync what it writes
            if cancelled is not None and cancelled():  # (a SIGTERM while it synced)
                raise StoreError("store backup stopped")
            os.link(partial, path)  # fails, rather than overwrites, if target appeared meanwhile
            _fsync(path.parent)
            return path.stat().st_size
        except sqlite3.Error as exc:
            raise StoreError(f"store backup failed: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"store backup failed: {exc.strerror or exc}") from exc
        finally:
            partial.unlink(missing_ok=True)

    def check_integrity(self, *, full: bool = False) -> list[str]:
        """What is wrong with the store's file, [] when it is sound: SQLite's quick_check, or
        with ``full`` its integrity_check (also compares every index with its table) and the
        foreign-key check. Reads every page in one read transaction; blocks no commit."""
        pragma = "integrity_check" if full else "quick_check"
        try:
            problems = [row[0] for row in self._query(f"PRAGMA {pragma}") if row[0] != "ok"]
            if full:
                problems += [f"row {row[1]} of {row[0]} refers to a missing row of {row[2]}"
                             for row in self._query("PRAGMA foreign_key_check")]
        except StoreError as error:
            cause = error.__cause__
            if getattr(cause, "sqlite_errorcode", None) not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise
            return [str(cause)]  # so damaged that the check itself stops: that is its finding
        return problems


def _create_private(path: Path, *, create_file: bool) -> None:
    """A new store is readable by its owner only, whatever the umask: it holds patient data.
    A new directory gets 0700 and a new file 0600 (SQLite gives its -wal and -shm files the
    database file's mode). What exists already keeps the mode the operator gave it."""
    if not path.parent.is_dir():  # (the other role's process may make it meanwhile: exist_ok)
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    if create_file:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
