"""Store maintenance: `koppel store backup` (a consistent online copy) and `koppel store check`."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest

from engine import operator
from engine.cli import main
from engine.store import Append, StoreError, open_store, write_one
from tests.factories import HIX, T0, TEST_BSN, TEST_NAME, corrupt_messages_table, received


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/koppel.db")
    yield s
    s.close()


def _pending_matches_counts(path) -> tuple[int, int, int]:
    """(messages, pending entries, the queues table's pending count) read from a store file."""
    conn = sqlite3.connect(path)
    try:
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        entries = conn.execute("SELECT count(*) FROM queue_entries WHERE state = 'pending'").fetchone()[0]
        counted = conn.execute("SELECT coalesce(sum(pending), 0) FROM queues").fetchone()[0]
        return messages, entries, counted
    finally:
        conn.close()


def test_a_backup_taken_while_the_engine_commits_is_one_committed_state(store, tmp_path):
    for n in range(50):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    writer = open_store(f"sqlite:///{tmp_path}/koppel.db")  # the running engine, another connection
    stop, committed = threading.Event(), []

    def commit_forever():
        n = 1000
        while not stop.is_set():
            n += 1
            write_one(writer, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
            committed.append(n)

    thread = threading.Thread(target=commit_forever)
    thread.start()
    try:
        while len(committed) < 20:  # the engine is busy when the backup starts
            pass
        before = 50 + len(committed)
        size = store.backup(str(tmp_path / "copy.db"))
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert size == (tmp_path / "copy.db").stat().st_size > 0
    messages, pending, counted = _pending_matches_counts(tmp_path / "copy.db")
    assert messages >= before  # everything committed before it started is in it
    assert pending == counted == messages  # each message with its queue entry and count: no torn commit
    copy = open_store(f"sqlite:///{tmp_path}/copy.db", migrate_schema=False)  # same schema version
    try:
        assert copy.check_integrity(full=True) == []
        assert [e.message_id for e in copy.queue_head(HIX.queue, limit=3)] == [1, 2, 3]
    finally:
        copy.close()
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_a_backup_never_overwrites_a_file(store, tmp_path):
    target = tmp_path / "copy.db"
    target.write_bytes(b"yesterday's backup")
    with pytest.raises(StoreError, match="already exists"):
        store.backup(str(target))
    assert target.read_bytes() == b"yesterday's backup"
    with pytest.raises(StoreError, match="no directory"):
        store.backup(str(tmp_path / "missing" / "copy.db"))
    assert sorted(os.listdir(tmp_path)) == ["copy.db", "koppel.db", "koppel.db-shm", "koppel.db-wal"]


def test_a_backup_is_no_more_readable_than_the_store(store, tmp_path):
    os.chmod(tmp_path / "koppel.db", 0o600)
    old = os.umask(0o022)  # a umask that would make a new file world-readable
    try:
        store.backup(str(tmp_path / "copy.db"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "copy.db").stat().st_mode) == 0o600


def test_check_integrity_finds_a_damaged_file(store, tmp_path):
    for n in range(200):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    store.backup(str(tmp_path / "copy.db"))
    assert store.check_integrity() == [] and store.check_integrity(full=True) == []
    corrupt_messages_table(tmp_path / "copy.db")
    damaged = open_store(f"sqlite:///{tmp_path}/copy.db", migrate_schema=False)
    try:
        assert damaged.check_integrity() != []
    finally:
        damaged.close()


# --------------------------------------------------------------------------- the CLI


def test_koppel_store_backup_audits_first_then_copies_and_checks_the_copy(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(operator, "_now", lambda: T0 + 500)
    write_one(store, Append(message=received("ZD1", received_at=T0, targets=(HIX,))))
    url = f"sqlite:///{tmp_path}/koppel.db"
    target = tmp_path / "nightly.db"
    assert main(["store", "backup", str(target), "--store", url, "--reason", "before the upgrade"]) == 0
    out, err = capsys.readouterr()
    assert f"backup written to {target}" in out and "passes SQLite's quick_check" in out
    assert TEST_BSN not in out + err and TEST_NAME not in out + err
    (record,) = store.list_audit()
    assert record.action == "store-backup" and str(target) in record.reason
    assert "before the upgrade" in record.reason and "user" in record.reason
    copy = open_store(f"sqlite:///{target}", migrate_schema=False)
    try:
        assert [r.action for r in copy.list_audit()] == ["store-backup"]  # the copy holds its own record
        assert copy.list_messages()[0].control_id == "ZD1"
    finally:
        copy.close()
    assert main(["store", "backup", str(target), "--store", url]) == 1
    assert "already exists" in capsys.readouterr().err
    assert len(store.list_audit()) == 1  # refused before anything was recorded


def test_koppel_store_check_exits_1_on_a_damaged_store(store, tmp_path, capsys):
    for n in range(200):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n)))
    assert main(["store", "check", "--full", "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 0
    assert "passes SQLite's integrity_check" in capsys.readouterr().out
    store.backup(str(tmp_path / "copy.db"))
    corrupt_messages_table(tmp_path / "copy.db")
    assert main(["store", "check", "--store", f"sqlite:///{tmp_path}/copy.db"]) == 1
    out = capsys.readouterr().out
    assert "FAILS SQLite's quick_check" in out


def test_koppel_store_backup_of_a_missing_store_creates_nothing(tmp_path, capsys):
    assert main(["store", "backup", str(tmp_path / "copy.db"), "--store", f"sqlite:///{tmp_path}/none.db"]) == 1
    assert "no store at" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_cancelled_backup_stops_and_leaves_no_partial_copy(store, tmp_path):
    for n in range(300):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    with pytest.raises(StoreError):
        store.backup(str(tmp_path / "copy.db"), cancelled=lambda: True)
    assert sorted(os.listdir(tmp_path)) == ["koppel.db", "koppel.db-shm", "koppel.db-wal"]
    assert store.backup(str(tmp_path / "copy.db")) > 0  # the connection is fine afterwards


def test_koppel_store_backup_stopped_by_sigterm_exits_1_and_leaves_nothing(store, tmp_path, capsys, monkeypatch):
    """A timeout or a stopped systemd timer sends SIGTERM: the copy of every referral must not
    stay behind as a hidden partial file."""
    import signal

    from engine.store.sqlite import SQLiteStore

    for n in range(300):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    real_backup = SQLiteStore.backup

    def terminated_meanwhile(self, target, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the copy runs
        return real_backup(self, target, **kwargs)

    monkeypatch.setattr(SQLiteStore, "backup", terminated_meanwhile)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["store", "backup", str(tmp_path / "copy.db"), "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 1
    assert "stopped by a signal" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("copy", ".copy"))]
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone again
