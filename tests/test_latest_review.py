"""Review of the latest commits (refused delivery marks, store backup stopped by a signal, the CLI's
broken pipe, the agenda's second cancel). Each test failed on the code as it was. Synthetic data only."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from engine.cli import main
from engine.core import agenda as ag
from engine.store import StoreError
from tests.factories import store_with_messages
from tests.test_sender import NAME, Harness, make  # noqa: F401 - make: the fixture

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- refused delivery marks


def _store_full(h: Harness):
    original = h.store.write

    def full(ops, wait=True):
        raise StoreError("store write failed: database or disk is full")

    h.store.write = full
    return original


def test_a_stopped_sender_gives_its_refused_marks_a_last_try(make):
    """A reload removes the queue (the sender stops, the engine runs on) right after the disk got
    room again: the marks waiting for their retry were given up without being tried, so messages
    the destination had acknowledged stayed 'pending' and went out again later. Before the marks
    were retried together, each one's pending retry still reached the store."""
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    original = _store_full(h)
    h.destination.answer("AA")
    h.run(0.1)
    h.destination.answer("AA")
    h.run(0.1)  # both marks refused, waiting for their retry
    h.store.write = original  # room again
    h.sender.stop()
    h.run(2.0)
    assert h.states() == ["delivered", "delivered"]
    assert h.destination.received() == ["C1", "C2"]


def test_a_switch_to_fifo_does_not_resend_an_entry_whose_delivered_mark_waits(make):
    """Unordered, C1 is acknowledged while the disk is full: its mark waits. A reload switches the
    queue to fifo, which reads the queue from its head again and found C1 still 'pending' in the
    store: it sent C1 a second time (unordered skips entries whose bookkeeping is unsettled)."""
    h = make(order="none")
    h.enqueue("C1", "C2")
    h.start()
    original = _store_full(h)
    h.destination.answer("AA")  # C1 delivered, its mark refused
    h.run(0.1)
    h.sender.update({NAME: replace(h.config, order="fifo")})  # C2 in flight: after its answer
    h.destination.answer("AA")
    h.run(0.5)
    assert h.destination.received() == ["C1", "C2"]
    h.store.write = original
    h.run(2.0)
    assert h.states() == ["delivered", "delivered"]
    assert h.destination.received() == ["C1", "C2"]


# --------------------------------------------------------------------------- koppel store backup


def test_store_backup_run_from_a_thread_still_makes_the_backup(tmp_path, capsys):
    """Signal handlers can only be installed in the main thread: `koppel store backup` run from
    another thread (a wrapper, a scheduler in Python) wrote its audit record, then failed with a
    ValueError traceback and made no backup. It worked before the signal handling."""
    url = store_with_messages(tmp_path)
    outcome: list[object] = []

    def run():
        try:
            outcome.append(main(["store", "backup", str(tmp_path / "copy.db"), "--store", url]))
        except BaseException as error:  # noqa: BLE001 - the test reports it
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert outcome == [0]
    assert (tmp_path / "copy.db").is_file()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".copy")] == []


# --------------------------------------------------------------------------- the CLI and a closed pipe


def test_output_into_a_closed_pipe_ends_quietly_without_pythonunbuffered(tmp_path):
    """`koppel queue list | head -0` (or any reader gone before the output is flushed): stdout is
    block-buffered in an operator's shell, so the pipe error came at exit, outside main's
    handler: 'Exception ignored ... BrokenPipeError' and exit status 120. (The suite's own
    environment sets PYTHONUNBUFFERED, which hid it.)"""
    url = store_with_messages(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        result = subprocess.run(
            [sys.executable, "-c", "from engine.cli import main; raise SystemExit(main())",
             "messages", "--store", url],
            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=60)
    finally:
        os.close(write_end)
    assert "BrokenPipe" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.returncode == 1


# --------------------------------------------------------------------------- the agenda's second cancel

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
ZD = "ZD123456789"  # synthetic
BSN = "999911120"  # synthetic, passes the 11-proof
OTHER_BSN = "999911132"  # synthetic, another patient
BOOK = ag.AgendaBook(agendas=(ag.Agenda(id="fallback", name="Onbekend", fallback=True),))


def test_a_second_cancel_about_another_patient_changes_nothing_in_the_entry():
    """A message about another patient (colliding ids) must never change an entry. A cancel of a
    greater kind for an entry already cancelled raised the ranks of the fields it repeats before
    the patient was compared: another patient's S04 made the entry's city its own, and the
    patient's own later letter could no longer correct it."""
    order = ag.AgendaEvent(kind="diagnostic-order", action="create", zd_number=ZD, placer_id="ORD1",
                           fields={"patient.bsn": BSN, "patient.city": "Utrecht"})
    entry = ag.decide(order, None, now=NOW, message_id="M1", book=BOOK).entry.with_id("1")
    order_cancel = ag.AgendaEvent(kind="diagnostic-order", action="cancel", zd_number=ZD, placer_id="ORD1",
                                  fields={"patient.bsn": BSN})
    entry = ag.decide(order_cancel, entry, now=NOW, message_id="M2", book=BOOK).entry
    assert entry.state == "cancelled"
    others = ag.AgendaEvent(kind="appointment-request", action="cancel", zd_number=ZD, placer_id=ZD,
                            fields={"patient.bsn": OTHER_BSN, "patient.city": "Utrecht"})
    decision = ag.decide(others, entry, now=NOW, message_id="M3", book=BOOK)
    assert not (isinstance(decision, ag.Update) and decision.ranks)
    if isinstance(decision, ag.Update):
        assert decision.entry.data == entry.data


def test_ctrl_c_while_the_copy_is_checked_leaves_no_unchecked_backup(tmp_path, capsys, monkeypatch):
    """An operator's Ctrl-C (SIGINT) while the copy was opened and checked raised KeyboardInterrupt
    out of the command: a whole but unchecked backup stayed at FILE (what a SIGTERM there no longer
    leaves), and a later run refuses to overwrite it."""
    import signal

    from engine.store.sqlite import SQLiteStore

    url = store_with_messages(tmp_path)
    real_check = SQLiteStore.check_integrity

    def interrupted_meanwhile(self, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_check(self, **kwargs)

    monkeypatch.setattr(SQLiteStore, "check_integrity", interrupted_meanwhile)
    before = signal.getsignal(signal.SIGINT)
    try:
        status = main(["store", "backup", str(tmp_path / "copy.db"), "--store", url])
    except KeyboardInterrupt:
        status = "KeyboardInterrupt"
    assert status == 1
    assert "stopped by a signal" in capsys.readouterr().err
    assert [p for p in os.listdir(tmp_path) if p.startswith(("copy", ".copy"))] == []
    assert signal.getsignal(signal.SIGINT) is before
