"""Found by working a running engine as the on-call engineer does (pause, replay, drop, backup,
listings, a busy or damaged store): each test failed on the code as it was."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from engine import operator
from engine.cli import main
from engine.store import Append, DeadLetter, QueueTarget, open_store, write_one
from tests.factories import HIX, T0, corrupt_messages_table, received
from tests.test_operator import RIS_Q, World

sys.path.insert(0, str(Path(__file__).parent))

from sink import KOPPEL, KoppelProcess, MLLPClient, Sink, make_message, write_channel  # noqa: E402


@pytest.fixture
def world(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    yield w
    w.store.close()


# --------------------------------------------------------------------------- koppel messages


def test_koppel_messages_on_a_damaged_store_says_so_in_one_line(tmp_path, capsys):
    """`koppel messages` on a store whose messages table is damaged (the runbook's "damaged
    store" incident) ended in a Python traceback; every other operator command says
    `error: store read failed: ...` and exits 1."""
    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    for n in range(200):
        write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    store.close()
    corrupt_messages_table(tmp_path / "koppel.db")
    assert main(["messages", "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: store read failed") and "Traceback" not in err


# --------------------------------------------------------------------------- store backup


def test_a_backup_into_a_missing_directory_leaves_no_audit_record(tmp_path, capsys):
    """The 'store-backup to FILE' audit record was written before the directory was looked at:
    a mistyped backup directory left the audit trail saying a copy of every patient's data
    had been written where none was."""
    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    write_one(store, Append(message=received("ZD1", received_at=T0, targets=(HIX,))))
    try:
        target = tmp_path / "no-such-dir" / "koppel-nightly.db"
        assert main(["store", "backup", str(target), "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 1
        assert "no directory" in capsys.readouterr().err
        assert not target.exists()
        assert store.list_audit() == []
    finally:
        store.close()


# --------------------------------------------------------------------------- dead-letters list


def test_dead_letters_list_of_a_mistyped_queue_key_is_not_found(world, capsys):
    """A mistyped name exits 1 ("unknown destination"), but a mistyped HOST:PORT said "no dead
    letters on queue ..." and exited 0: the operator was told all was well with a queue that
    does not exist."""
    code, out, _ = world.run(capsys, "dead-letters", "list", RIS_Q)
    assert code == 0 and str(world.ris_dead) in out
    code, out, err = world.run(capsys, "dead-letters", "list", "127.0.0.1:7001")
    assert code == 1 and "no queue 127.0.0.1:7001" in err and "no dead letters" not in out
    code, out, err = world.run(capsys, "dead-letters", "list", "127.0.0.1:7001", config=False)
    assert code == 1 and "no queue 127.0.0.1:7001" in err


def test_the_live_admin_api_and_cli_refuse_a_mistyped_queue_for_dead_letters(tmp_path):
    """The same against a running engine: a destination refuses a message (AR, a dead letter);
    the admin API answered 200 with an empty list for a queue key one digit off, and the
    CLI exit 0 'no dead letters'."""
    import requests

    sink = Sink(name="his").start()
    url = f"sqlite:///{tmp_path / 'koppel.db'}"
    channels = tmp_path / "channels"
    write_channel(channels, {"his": sink.port})
    env = {k: v for k, v in os.environ.items() if k != "KOPPEL_ADMIN_TOKEN"}
    env["KOPPEL_ADMIN_TOKEN"] = "review-token"
    engine = KoppelProcess(channels, url, admin="tcp:0:interface=127.0.0.1", env=env)
    try:
        engine.start()
        admin_port = engine.wait_for("admin.started")["port"]
        sink.nak_next("AR")
        with MLLPClient(engine.port) as client:
            client.request(make_message("DEAD1"))
        engine.wait_for("delivery.dead_letter")
        base, auth = f"http://127.0.0.1:{admin_port}/api", {"Authorization": "Bearer review-token"}
        queue = f"127.0.0.1:{sink.port}"
        wrong = f"127.0.0.1:{sink.port + 1 if sink.port < 65535 else sink.port - 1}"
        deadline = time.monotonic() + 5
        while True:  # (the dead letter's mark is group-committed within a few ms)
            right = requests.get(f"{base}/dead-letters", params={"queue": queue}, headers=auth, timeout=10)
            if right.json()["dead_letters"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert right.status_code == 200 and [d["control_id"] for d in right.json()["dead_letters"]] == ["DEAD1"]
        answer = requests.get(f"{base}/dead-letters", params={"queue": wrong}, headers=auth, timeout=10)
        assert answer.status_code == 404 and answer.json()["error"] == "not_found"

        import subprocess

        def cli(*argv):
            return subprocess.run([str(KOPPEL), *argv, "--store", url, "--channels", str(channels)],
                                  capture_output=True, text=True, timeout=30, cwd=tmp_path)

        done = cli("dead-letters", "list", queue)
        assert done.returncode == 0 and "DEAD1" in done.stdout
        done = cli("dead-letters", "list", wrong)
        assert done.returncode == 1 and f"no queue {wrong}" in done.stderr
    finally:
        engine.terminate()
        sink.down()


# --------------------------------------------------------------------------- replay --all, busy store


def test_replay_all_stopped_by_a_busy_store_half_way_says_what_it_had_replayed(tmp_path, capsys, monkeypatch):
    """`dead-letters replay --all` commits 500 entries per step. When a later step found the
    store locked by another process past its busy timeout, the command said only
    `error: store write could not start: database is locked` (exit 1), though the first 500
    were re-queued already (the engine sends them at once): the operator was told nothing
    happened. It must say what was done, and a second run must do the rest, once."""
    monkeypatch.setattr(operator, "_now", lambda: T0 + 1000)
    url = f"sqlite:///{tmp_path}/koppel.db"
    store = open_store(url)
    target = QueueTarget(queue="127.0.0.1:6661", destination="hix")
    for start in range(0, 600, 100):
        store.write([Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(target,)))
                     for n in range(start, start + 100)])
    dead = [e.id for e in store.queue_head("127.0.0.1:6661", 1000, bodies=False)]
    store.write([DeadLetter(entry_id=entry_id, reason="AR", ack=None, at=T0 + 700) for entry_id in dead])

    holder: list[sqlite3.Connection] = []
    real_write = operator._write

    def write_then_another_process_locks(store_, op):
        result = real_write(store_, op)
        if not holder:  # after the first step: another writer holds the lock past our timeout
            other = sqlite3.connect(tmp_path / "koppel.db", isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            holder.append(other)
        return result

    monkeypatch.setattr(operator, "_write", write_then_another_process_locks)
    code = main(["dead-letters", "replay", "--all", "127.0.0.1:6661", "--store", url + "?busy_timeout=0.2",
                 "--channels", str(tmp_path / "absent")])
    out, err = capsys.readouterr()
    holder[0].execute("ROLLBACK")
    holder[0].close()
    assert code == 1
    assert "database is locked" in err
    assert "500 entries were replayed" in err and "run the command again" in err
    assert len(store.list_dead_letters("127.0.0.1:6661", 1000)) == 100

    monkeypatch.setattr(operator, "_write", real_write)
    assert main(["dead-letters", "replay", "--all", "127.0.0.1:6661", "--store", url,
                 "--channels", str(tmp_path / "absent")]) == 0
    assert "replayed 100 dead letters" in capsys.readouterr().out
    pending = store.queue_head("127.0.0.1:6661", 1000, bodies=False)
    assert sorted(e.replay_of for e in pending) == sorted(dead)  # each once, none twice, none lost
    assert [e.replay_of for e in pending] == sorted(dead)  # and in their original order
    store.close()


def test_a_backup_whose_file_name_holds_a_question_mark_is_checked_not_refused(tmp_path, capsys):
    """The copy was opened for its check through a store URL, which reads everything after a
    "?" as options: a backup to `koppel?1.db` was written, then reported as "does not open"
    (exit 1), and left there unchecked."""
    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    write_one(store, Append(message=received("ZD1", received_at=T0, targets=(HIX,))))
    store.close()
    target = tmp_path / "koppel-2026-12-07?run=1.db"
    assert main(["store", "backup", str(target), "--store", f"sqlite:///{tmp_path}/koppel.db"]) == 0
    assert "passes SQLite's quick_check" in capsys.readouterr().out
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    finally:
        copy.close()


def test_replay_and_drop_of_many_ids_hold_the_store_in_short_steps(tmp_path, capsys, monkeypatch):
    """`--all` replays 500 per transaction "so the engine's commits never wait long behind it",
    but ids given one by one (piped from `dead-letters list --json`) went into ONE transaction:
    50,000 ids held the write lock about 2 s here, and past the engine's 5 s its commits fail
    and its senders are answered AE. Ids go in steps of 500 too, in id order, each once."""
    monkeypatch.setattr(operator, "_now", lambda: T0 + 1000)
    url = f"sqlite:///{tmp_path}/koppel.db"
    store = open_store(url)
    target = QueueTarget(queue="127.0.0.1:6661", destination="hix")
    store.write([Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(target,))) for n in range(1200)])
    dead = [e.id for e in store.queue_head("127.0.0.1:6661", 2000, bodies=False)]
    store.write([DeadLetter(entry_id=entry_id, reason="AR", ack=None, at=T0 + 700) for entry_id in dead])
    sizes: list[int] = []
    real_write = operator._write

    def counting(store_, op):
        sizes.append(len(op.entry_ids))
        return real_write(store_, op)

    monkeypatch.setattr(operator, "_write", counting)
    replay, drop = dead[:600], dead[600:]
    argv = ["--store", url, "--channels", str(tmp_path / "absent")]
    assert main(["dead-letters", "replay", *map(str, reversed(replay)), *argv]) == 0
    assert sizes == [500, 100]
    pending = store.queue_head("127.0.0.1:6661", 2000, bodies=False)
    assert [e.replay_of for e in pending] == replay  # in their original order, each once
    sizes.clear()
    assert main(["dead-letters", "drop", *map(str, drop), "--reason", "sent by phone", "--store", url]) == 0
    assert sizes == [500, 100]
    assert "600 dead letters dropped" in capsys.readouterr().out
    assert store.list_dead_letters("127.0.0.1:6661", 2000) == []
    assert len([r for r in store.list_audit(5000) if r.action == "drop"]) == 600
    store.close()
