"""SQLite schema, as an ordered list of migration steps applied when a store opens.

A database records the highest step applied in `schema_version`. Opening applies the
missing steps in one write transaction (so two processes opening at once cannot both
migrate), and refuses a database written by a newer Koppel rather than guessing.
Steps are append-only: never edit a released step, add a new one.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from engine.store import StoreError


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    version: int
    why: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        why="received messages, with the duplicate lookup on (control_id, channel)",
        statements=(
            # raw is the last column: listings that skip it never touch its overflow pages.
            """
            CREATE TABLE messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                channel TEXT NOT NULL,
                peer TEXT NOT NULL,
                received_at REAL NOT NULL,
                control_id TEXT,
                sender TEXT,
                message_type TEXT,
                structure TEXT,
                version TEXT,
                processing_id TEXT,
                charset TEXT,
                size INTEGER NOT NULL,
                payload_hash BLOB NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
                ack_code TEXT NOT NULL,
                ack BLOB NOT NULL,
                error TEXT,
                duplicate_count INTEGER NOT NULL DEFAULT 0,
                last_duplicate_at REAL,
                raw BLOB NOT NULL
            )
            """,
            # control_id first: serves the duplicate lookup (both equal) and
            # `list_messages(control_id=...)` without a channel.
            "CREATE INDEX messages_control_id ON messages (control_id, channel)",
            "CREATE INDEX messages_received_at ON messages (received_at)",
        ),
    ),
    Migration(
        version=2,
        why="durable delivery queues, per-queue counters and the operator audit log",
        statements=(
            # One row per queue keeps depth/dead/delivered counts so that
            # queue_depths() is O(queues), not O(entries).
            """
            CREATE TABLE queues (
                queue TEXT PRIMARY KEY,
                paused INTEGER NOT NULL DEFAULT 0,
                pending INTEGER NOT NULL DEFAULT 0,
                dead INTEGER NOT NULL DEFAULT 0,
                delivered INTEGER NOT NULL DEFAULT 0,
                last_error TEXT
            )
            """,
            """
            CREATE TABLE queue_entries (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                queue TEXT NOT NULL,
                destination TEXT NOT NULL,
                message_id INTEGER NOT NULL REFERENCES messages (id),
                state TEXT NOT NULL
                    CHECK (state IN ('pending', 'delivered', 'dead', 'dropped', 'replayed')),
                attempts INTEGER NOT NULL DEFAULT 0,
                enqueued_at REAL NOT NULL,
                next_attempt_at REAL NOT NULL DEFAULT 0,
                last_attempt_at REAL,
                last_error TEXT,
                last_ack BLOB,
                done_at REAL,
                replay_of INTEGER
            )
            """,
            # FIFO head and dead-letter listing per queue walk this index in id order.
            "CREATE INDEX queue_entries_queue ON queue_entries (queue, state, id)",
            "CREATE INDEX queue_entries_message ON queue_entries (message_id)",
            "CREATE INDEX queue_entries_done ON queue_entries (state, done_at)",
            """
            CREATE TABLE audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                at REAL NOT NULL,
                action TEXT NOT NULL,
                queue TEXT,
                entry_id INTEGER,
                message_id INTEGER,
                reason TEXT
            )
            """,
        ),
    ),
    Migration(
        version=3,
        why="agendas: entries, correlation keys, history, attachments, held events; message processing",
        statements=(
            "ALTER TABLE messages ADD COLUMN origin_id INTEGER",
            "ALTER TABLE messages ADD COLUMN processing TEXT",
            "ALTER TABLE messages ADD COLUMN processing_detail TEXT",
            "CREATE INDEX messages_processing ON messages (processing) WHERE processing IS NOT NULL",
            """
            CREATE TABLE agenda_entries (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                agenda_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                state TEXT NOT NULL,
                zd_number TEXT,
                placer_id TEXT,
                filler_id TEXT,
                data TEXT NOT NULL,
                attachments TEXT NOT NULL DEFAULT '',
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL
            )
            """,
            "CREATE INDEX agenda_entries_agenda ON agenda_entries (agenda_id, state, updated_at)",
            "CREATE INDEX agenda_entries_updated ON agenda_entries (updated_at)",
            # One entry per correlation key ("zd:ZD123", "placer:...", "filler:...").
            "CREATE TABLE agenda_keys (key TEXT PRIMARY KEY, entry_id INTEGER NOT NULL)",
            """
            CREATE TABLE agenda_history (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                entry_id INTEGER NOT NULL,
                at REAL NOT NULL,
                message_id INTEGER,
                action TEXT NOT NULL,
                from_state TEXT,
                to_state TEXT NOT NULL,
                changed TEXT NOT NULL DEFAULT ''
            )
            """,
            "CREATE INDEX agenda_history_entry ON agenda_history (entry_id, id)",
            """
            CREATE TABLE attachments (
                sha256 TEXT PRIMARY KEY,
                media_type TEXT,
                filename TEXT,
                size INTEGER NOT NULL,
                data BLOB NOT NULL
            )
            """,
            """
            CREATE TABLE held_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id INTEGER,
                event TEXT NOT NULL,
                held_at REAL NOT NULL,
                released_at REAL
            )
            """,
            "CREATE TABLE held_keys (key TEXT NOT NULL, held_id INTEGER NOT NULL)",
            "CREATE INDEX held_keys_key ON held_keys (key, held_id)",
        ),
    ),
    Migration(
        version=4,
        why="the entry each queue last put on the wire, so a resend after a crash is counted",
        statements=("ALTER TABLE queues ADD COLUMN inflight INTEGER",),
    ),
    Migration(
        version=5,
        why="a one-row heartbeat the engine rewrites to prove the store still commits",
        statements=("CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL)",),
    ),
    Migration(
        version=6,
        why="find whether any event is still held without scanning released ones",
        statements=("CREATE INDEX held_events_open ON held_events (id) WHERE released_at IS NULL",),
    ),
    Migration(
        version=7,
        why="the kind and action of the event behind each agenda change (a release records the "
            "released event's), so an order's scheduling can be replayed when its request comes later",
        statements=("ALTER TABLE agenda_history ADD COLUMN event_kind TEXT",
                    "ALTER TABLE agenda_history ADD COLUMN event_action TEXT"),
    ),
    Migration(
        version=8,
        why="prune released held events (and their keys) by release time without reading the events",
        statements=(
            "CREATE INDEX held_events_released ON held_events (released_at) WHERE released_at IS NOT NULL",
            "CREATE INDEX held_keys_held ON held_keys (held_id)",
        ),
    ),
    Migration(
        version=9,
        why="find the messages a mapping built from a message (koppel trace, resend) by origin, "
            "however long after it they were built; only built messages are in the index",
        statements=("CREATE INDEX messages_origin ON messages (origin_id) WHERE origin_id IS NOT NULL",),
    ),
)

LATEST = MIGRATIONS[-1].version


def current_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database; 0 for a fresh file."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def check_version(conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """The store's schema version if it is exactly this Koppel's; else StoreError saying which
    side to upgrade. For commands that must not migrate a store an engine may be using."""
    known = migrations[-1].version if migrations else 0
    version = current_version(conn)
    if version > known:
        raise StoreError(f"store schema version {version} is newer than this Koppel understands "
                         f"(up to {known}); use the Koppel that runs on this store")
    if version < known:
        raise StoreError(f"store schema version {version} is older than this Koppel's ({known}); "
                         "start `koppel run` of this version on it first (it migrates the store)")
    return version


def migrate(
    conn: sqlite3.Connection,
    migrations: tuple[Migration, ...] = MIGRATIONS,
    *,
    now: float = 0.0,
) -> int:
    """Bring the database up to the last of `migrations`; return the resulting version.

    `conn` must be in autocommit mode (isolation_level=None). Idempotent.
    """
    known = migrations[-1].version if migrations else 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = current_version(conn)
        if version > known:
            raise StoreError(
                f"store schema version {version} is newer than this Koppel understands "
                f"(up to {known}); upgrade Koppel or use a matching store"
            )
        if version == 0:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL, why TEXT NOT NULL)"
            )
        for step in migrations:
            if step.version <= version:
                continue
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at, why) VALUES (?, ?, ?)",
                (step.version, now, step.why),
            )
            version = step.version
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version
