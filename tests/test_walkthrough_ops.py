"""Found by following the README and the runbook as an on-call engineer (store backup, restore,
admin API): each test failed on the code as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.store import Append, open_store, write_one
from tests.factories import HIX, T0, received

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/koppel.db")
    for n in range(50):
        write_one(s, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    yield s
    s.close()


@pytest.fixture
def sigterm_kept():
    """The test's own SIGTERM handler, so a SIGTERM the command lets through does not kill pytest."""
    came: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda number, _frame: came.append(number))
    yield came
    signal.signal(signal.SIGTERM, before)


def _left(tmp_path) -> list[str]:
    return [p for p in os.listdir(tmp_path) if p.startswith(("copy", ".copy"))]


def test_sigterm_while_the_copy_is_synced_leaves_no_backup(store, tmp_path, capsys, monkeypatch, sigterm_kept):
    """SIGTERM after VACUUM INTO finished but while the copy is synced (seconds, for a big
    store) was ignored: the copy was linked into place and the command exited 0."""
    from engine.store import sqlite as sqlite_store

    real_fsync = sqlite_store._fsync
    sent: list[bool] = []

    def fsync_then_terminated(path):
        real_fsync(path)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sqlite_store, "_fsync", fsync_then_terminated)
    assert main(["store", "backup", str(tmp_path / "copy.db"), "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 1
    assert "stopped by a signal" in capsys.readouterr().err
    assert _left(tmp_path) == []


def test_sigterm_while_the_copy_is_checked_leaves_no_unchecked_backup(store, tmp_path, capsys, monkeypatch, sigterm_kept):
    """SIGTERM while the copy was opened and quick-checked (after the copy, before the command
    says it is sound) got the default action: killed, an unchecked backup left at FILE."""
    from engine.store.sqlite import SQLiteStore

    real_check = SQLiteStore.check_integrity

    def terminated_meanwhile(self, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_check(self, **kwargs)

    monkeypatch.setattr(SQLiteStore, "check_integrity", terminated_meanwhile)
    assert main(["store", "backup", str(tmp_path / "copy.db"), "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 1
    assert "stopped by a signal" in capsys.readouterr().err
    assert _left(tmp_path) == []
    assert sigterm_kept == []  # the command's handler had it, not the default action


def test_koppel_messages_into_head_ends_quietly(store, tmp_path):
    """`koppel messages | head` (a pipe closed early) ended in a BrokenPipeError traceback."""
    for n in range(50, 3000):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n)))
    result = subprocess.run(
        f"{sys.executable} -c 'from engine.cli import main; raise SystemExit(main())' messages --limit 3000 "
        f"--store sqlite:///{tmp_path}/koppel.db | head -1",
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("ID")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
