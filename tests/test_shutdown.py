"""Graceful shutdown under load loses nothing: SIGTERM and SIGINT.

``koppel run`` (subprocess, 127.0.0.1) receives from 4 connections sending continuously and
delivers to a ``tests/sink.py`` sink that is slower than the senders, so a backlog is queued
when the signal comes. Then:

* the engine exits 0 within the drain deadline;
* every message that got AA is in the store exactly once (and nothing else was stored twice);
* after a restart on the same store every stored message reaches the sink, in order per
  connection, and every queue is empty: nothing ACKed or queued was lost.
"""

from __future__ import annotations

import collections
import signal
import time

import pytest

from sink import KoppelProcess, Load, Sink, write_channel

DRAIN = 3.0  # --drain-timeout
CONNECTIONS = 4
LOAD_SECONDS = 1.0


def stored(engine: KoppelProcess) -> collections.Counter:
    rows = engine.query("SELECT control_id FROM messages WHERE channel = 'e2e-in' AND status = 'accepted'")
    return collections.Counter(r[0] for r in rows)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_under_load_exits_0_in_time_and_loses_nothing(tmp_path, signum):
    sink = Sink(keep_raw=False).start()
    sink.delay = 0.002  # slower than 4 senders: a backlog is queued when the signal comes
    engine = None
    try:
        channels = tmp_path / "channels"
        write_channel(channels, {"sink": sink.port})
        engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/var/koppel.db", metrics="tcp:0:interface=127.0.0.1",
                               args=("--drain-timeout", str(DRAIN)))
        port = engine.start(until="engine.started")
        load = Load(port, connections=CONNECTIONS, tag=signum.name[3]).start()  # "T" or "I": no "N" in it
        time.sleep(LOAD_SECONDS)
        assert len(load.acked) > 50, engine.tail()

        sink.delay = 0.3  # the send in flight at the signal is answered late: the engine must wait for it
        time.sleep(0.05)
        signalled = time.monotonic()
        engine.proc.send_signal(signum)
        code = engine.wait(DRAIN + 10)
        took = time.monotonic() - signalled
        load.stop.set()
        load.join()
        assert code == 0, engine.tail()
        assert took < DRAIN, f"stopped after {took:.2f}s; drain deadline {DRAIN}s"
        events = [e.get("event") for e in engine.logged()]
        assert events[-1] == "engine.stopped", events[-5:]
        assert "engine.drain_timeout" not in events and "engine.sender_stop_timeout" not in events

        # every ACK was an AA for its own message; each ACKed message is stored exactly once
        assert load.wrong == []
        counts = stored(engine)
        assert [c for c in load.acked if counts[c] != 1] == []
        assert [c for c, n in counts.items() if n > 1] == []
        # what was stored without an ACK can only be a message in flight at the signal
        assert set(counts) - set(load.acked) <= {cid for cid, _ in load.in_flight.values()}
        backlog = engine.query("SELECT COALESCE(SUM(pending), 0) FROM queues")[0][0]
        delivered_before = sink.delivered_count()
        print(f"{signum.name}: {len(load.acked)} ACKed, {delivered_before} delivered, {backlog} queued at exit, "
              f"stopped in {took:.2f}s")
        assert backlog > 0, "no backlog at the signal: the test proves nothing about the restart"

        # restart on the same store: the queue resumes and everything stored reaches the sink
        sink.delay = 0.0
        engine.start(until="engine.started")
        assert sink.wait_for_delivered(counts, timeout=15), (
            f"{len(set(counts) - set(sink.delivered_ids()))} stored messages never reached the sink")
        deadline = time.monotonic() + 5
        while engine.query("SELECT COALESCE(SUM(pending), 0) FROM queues")[0][0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.query("SELECT COALESCE(SUM(pending), 0) FROM queues")[0][0] == 0
        assert set(sink.delivered_ids()) == set(counts)
        # the send in flight at the signal was finished and booked, not resent after the restart
        assert sink.duplicates() == 0
        # FIFO: each connection's messages reached the sink in the order they were sent
        by_connection = collections.defaultdict(list)
        for cid in sink.delivered_ids():
            by_connection[cid.rsplit("N", 1)[0]].append(cid)
        assert all(ids == sorted(ids) for ids in by_connection.values())
        assert engine.terminate() == 0
    finally:
        if engine is not None:
            engine.kill()
        sink.down()


def test_sigint_stops_an_engine_started_with_sigint_ignored(tmp_path, monkeypatch):
    """A shell script's `koppel run &` (or a supervisor) starts it with SIGINT ignored; Twisted
    then leaves SIGINT alone and the engine did not stop on it at all."""
    import subprocess

    channels = tmp_path / "channels"
    write_channel(channels, {"sink": 9})
    engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/var/koppel.db")
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: real_popen(
        *args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), **kwargs))
    engine.start(until="engine.started")
    monkeypatch.undo()
    try:
        engine.proc.send_signal(signal.SIGINT)
        assert engine.wait(15) == 0, engine.tail()
        assert [e.get("event") for e in engine.logged()][-1] == "engine.stopped"
    finally:
        if engine.proc.poll() is None:
            engine.kill()
