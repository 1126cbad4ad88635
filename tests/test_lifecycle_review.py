"""The engine process under failure and lifecycle events, as on-call meets them.

Deterministic where it can be (``MemoryReactorClock``, ``StringTransport``, the store
wrapped to fail); ``koppel run`` as a child process only where the process itself (its pid
file, its exit code) is what is tested. Synthetic data only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from engine.bundle import load_bundle
from engine.core.response import read_ack
from engine.shell.engine import Engine
from engine.store import StoreError, open_store
from tests.test_listener import Harness, acks, frame, message
from tests.test_resume_mapping import ROOT, SRM, stored_pending

# --------------------------------------------------------------------------- store file removed


def test_a_store_file_removed_while_the_engine_runs_is_answered_ae_never_aa(tmp_path):
    """`rm -rf var/` (or a cleanup job) under a running engine: SQLite keeps writing into the
    unlinked file, which is gone at the next start. Every message answered AA after the removal
    would be lost, so it must be answered AE (the sender keeps it) and the store reported failing."""
    store = open_store(f"sqlite:///{tmp_path}/var/koppel.db")
    try:
        h = Harness(store=store)
        receiver, transport = h.connect()
        receiver.dataReceived(frame(message("MSG1")))
        h.clock.advance(0)
        h.clock.advance(0)
        assert [read_ack(a).code for a in acks(transport)] == ["AA"]
        for name in os.listdir(tmp_path / "var"):
            os.unlink(tmp_path / "var" / name)
        os.rmdir(tmp_path / "var")
        receiver.dataReceived(frame(message("MSG2")))
        h.clock.advance(0)
        h.clock.advance(0)
        assert [read_ack(a).code for a in acks(transport)] == ["AA", "AE"]
        assert h.committer.healthy is False
    finally:
        store.close()


def test_a_store_file_replaced_while_the_engine_runs_is_answered_ae(tmp_path):
    """The same when the file at the path is another one now (restored from a backup, moved)."""
    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    try:
        h = Harness(store=store)
        receiver, transport = h.connect()
        os.rename(tmp_path / "koppel.db", tmp_path / "moved.db")
        (tmp_path / "koppel.db").write_bytes(b"")
        receiver.dataReceived(frame(message("MSG1")))
        h.clock.advance(0)
        h.clock.advance(0)
        assert [read_ack(a).code for a in acks(transport)] == ["AE"]
    finally:
        store.close()


# --------------------------------------------------------------------------- SIGTERM, store down


def test_a_stop_while_the_store_refuses_the_mapping_commits_does_not_hang(tmp_path):
    """SIGTERM while the disk is full: the processor waits the store out (it never maps a
    request after its own cancellation), but a stop must not wait for that forever: the message
    is stored 'pending' and is mapped at the next start. systemd would otherwise SIGKILL."""
    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    message_id = stored_pending(store, SRM)
    bundle = load_bundle(ROOT / "channels", ROOT / "mappings")
    reactor = MemoryReactorClock()
    engine = Engine(reactor, bundle.config, store, retention=None, mappings=bundle.mappings, book=bundle.book,
                    drain_timeout=5.0, role="receive")
    original = store.write

    def disk_full(ops, wait=True):
        raise StoreError(f"store write of {len(ops)} operations failed: database or disk is full")

    store.write = disk_full
    try:
        engine.startService()  # the pending message goes to the processor, whose commit fails
        for _ in range(10):
            reactor.advance(0)
        assert engine.processor.handling(message_id)
        stopped = engine.stopService()
        for _ in range(60):
            reactor.advance(1.0)
        assert stopped.called, "the stop waited for the store to come back"
    finally:
        store.write = original
        store.close()
    with open_store(f"sqlite:///{tmp_path}/koppel.db") as again:
        (row,) = again._query("SELECT processing FROM messages WHERE id = ?", (message_id,))
        assert row[0] == "pending"  # mapped at the next start, not lost


# --------------------------------------------------------------------------- a second engine


KOPPEL = Path(sys.executable).parent / "koppel"
CHANNEL = "name: a\nsource:\n  listen: tcp:0:interface=127.0.0.1\n"


def _run(tmp_path: Path, pid_file: Path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KOPPEL), "run", "--channels", str(tmp_path / "channels"), "--mappings", str(tmp_path / "mappings"),
         "--store", f"sqlite:///{tmp_path}/k.db", "--metrics", "off", "--admin", "off",
         "--pid-file", str(pid_file)],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )


@pytest.fixture
def config_dirs(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "channels" / "a.yaml").write_text(CHANNEL)
    return tmp_path


def test_a_second_engine_on_the_same_store_leaves_the_running_engines_pid_file_alone(config_dirs):
    """A second `koppel run` on the store (systemd's and a manual one) is refused, exit 1; it must
    not overwrite and then delete the running engine's pid file, or `koppel reload` (and
    `systemctl reload`) no longer reaches the engine that runs, and that engine's clean stop
    then fails with exit 1 on the missing file."""
    from sink import KoppelProcess

    tmp_path = config_dirs
    pid_file = tmp_path / "koppel.pid"
    first = KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/k.db", args=("--pid-file", str(pid_file)))
    first.start(until="engine.started")
    try:
        first_pid = pid_file.read_text().strip()
        second = _run(tmp_path, pid_file)
        assert second.returncode == 1
        assert "already receives for this store" in second.stdout + second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        assert pid_file.read_text().strip() == first_pid
    finally:
        first.proc.terminate()
        code = first.proc.wait(timeout=30)
    assert code == 0, first.output()[-2000:]


def test_an_engine_whose_pid_file_was_removed_still_stops_cleanly(config_dirs):
    """A pid file removed under the engine (a tmpfs cleanup of /run) must not turn a clean
    SIGTERM stop into exit 1 ("error: ...koppel.pid: No such file or directory")."""
    from sink import KoppelProcess

    tmp_path = config_dirs
    pid_file = tmp_path / "koppel.pid"
    engine = KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/k.db", args=("--pid-file", str(pid_file)))
    engine.start(until="engine.started")
    pid_file.unlink()
    engine.proc.terminate()
    assert engine.proc.wait(timeout=30) == 0, engine.output()[-2000:]


# --------------------------------------------------------------------------- delivery bookkeeping


def test_a_delivery_mark_the_store_refused_is_committed_once_the_store_is_back(tmp_path):
    """The destination answered AA while the store refused commits for a moment (disk full, a lock
    held too long). The sender goes on with the next message, so the entry must not stay
    'pending' in the store: it would count in the depth forever, hold koppel_queue_oldest_age
    growing (the queue alert fires for a queue that delivers), never be pruned, and be sent again
    after the next restart, out of order."""
    from tests.test_sender import Harness as SenderHarness

    h = SenderHarness(tmp_path)
    try:
        h.enqueue("C1", "C2")
        h.start()
        original = h.store.write
        refused = []

        def full(ops, wait=True):
            refused.append(ops)
            raise StoreError(f"store write of {len(ops)} operations failed: database or disk is full")

        h.store.write = full
        h.destination.answer("AA")  # C1 delivered; its mark fails to commit
        h.run(1.0)
        assert refused
        h.store.write = original  # the disk has room again
        h.destination.answer("AA")  # C2
        h.run(60.0)
        assert h.states() == ["delivered", "delivered"]
        assert h.stats().depth == 0
    finally:
        h.sender.stop()
        h.store.close()


# --------------------------------------------------------------------------- reload, same port


def test_a_reload_that_changes_a_channels_listen_options_on_the_same_port_keeps_it_listening(tmp_path):
    """Adding an option to a channel's listen string (here `backlog`; or tcp: to ssl: for TLS)
    on the same port: the new listener must not try to bind while the old one still holds the
    port, or the channel is down (address in use) until the next restart."""
    import socket

    from sink import KoppelProcess

    from tests.test_metrics_flow import free_port
    from tests.test_reload import PID_FILE, reload

    port = free_port()
    (tmp_path / "channels").mkdir()
    listen = f"name: a\nsource:\n  listen: tcp:{port}:interface=127.0.0.1{{extra}}\n"
    (tmp_path / "channels" / "a.yaml").write_text(listen.format(extra=""))
    engine = KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/k.db",
                           args=("--pid-file", str(tmp_path / PID_FILE)))
    engine.start(until="engine.started")
    try:
        (tmp_path / "channels" / "a.yaml").write_text(listen.format(extra=":backlog=60"))
        mark = reload(engine)
        engine.wait_for(lambda e: e.get("event") == "config.reloaded", after=mark)
        failed = [e for e in engine.logged() if e.get("event") == "listener.start_failed"]
        assert failed == []
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        engine.terminate()
