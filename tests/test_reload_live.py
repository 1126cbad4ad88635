"""Reloading the configuration of a running engine under load: several source connections
sending, destinations up, slow, moved. Each test here failed before its fix."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from twisted.python.failure import Failure

sys.path.insert(0, str(Path(__file__).parent))

from sink import KoppelProcess, Load, MLLPClient, Sink, make_message, read_ack_code, write_channel  # noqa: E402

PID_FILE = "koppel.pid"


def _engine(tmp_path: Path, **kwargs) -> KoppelProcess:
    return KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/k.db",
                         args=("--pid-file", str(tmp_path / PID_FILE), "--drain-timeout", "5"), **kwargs)


def _reload(engine: KoppelProcess) -> int:
    """SIGHUP (what `koppel reload` sends); the log mark to look for its outcome after."""
    mark = engine.mark()
    os.kill(engine.pid, signal.SIGHUP)
    return mark


def _reloaded(engine: KoppelProcess, mark: int) -> dict:
    return engine.wait_for(lambda e: e.get("event") in ("config.reloaded", "config.reload_failed"), after=mark)


# ------------------------------------------------------------- a queue dropped and taken back
def test_a_destination_moved_away_and_back_while_a_slow_message_is_in_flight_is_not_sent_twice(tmp_path):
    """An endpoint edited by mistake and put back (two reloads) while the destination takes its
    time to answer: the queue's old sender still waits for that answer when the second reload
    starts a new sender on the same queue. The new one read the entry in flight from the store
    and sent it again on a second connection, next to the first (and the message after it,
    while the first copy was still unanswered)."""
    with Sink() as sink, Sink() as elsewhere:
        sink.delay = 1.5
        channels = tmp_path / "channels"
        write_channel(channels, {"his": sink.port})
        engine = _engine(tmp_path)
        try:
            engine.start(until="engine.started")
            with MLLPClient(engine.port) as client:
                for i in range(3):
                    assert read_ack_code(client.request(make_message(f"MOVE{i}")))[0] == "AA"
            assert sink.wait_until(lambda s: bool(s._connections), 5)  # the engine is connected
            time.sleep(0.3)  # MOVE0 is on the wire, the sink sleeps on it
            write_channel(channels, {"his": elsewhere.port})
            _reloaded(engine, _reload(engine))
            write_channel(channels, {"his": sink.port})
            assert _reloaded(engine, _reload(engine))["event"] == "config.reloaded"
            assert sink.wait_for_delivered([f"MOVE{i}" for i in range(3)], 15)
            time.sleep(0.5)
            assert sink.received_ids() == ["MOVE0", "MOVE1", "MOVE2"], sink.received_ids()
            assert elsewhere.received_ids() == []
        finally:
            engine.terminate()


# ------------------------------------------------------------------- a reload during the stop
TWO_DESTINATIONS = """
name: zorgdomein-in
source:
  listen: tcp:0:interface=127.0.0.1
destinations:
  his:
    endpoint: tcp:host=10.1.2.3:port=6661
{lab}
routes:
  - to: [his]
"""
LAB = """  lab:
    endpoint: tcp:host=10.1.2.9:port=6669
"""


def test_a_reload_that_arrives_while_the_engine_stops_is_not_applied(tmp_path):
    """SIGHUP while SIGTERM's stop waits for a message in flight: the reload started a sender for
    a destination it added after the stop had collected the senders to stop. That sender was
    never stopped: it connected and sent while the committer and the store closed under it (the
    entries it sent stay pending and go out again after the restart)."""
    from structlog.testing import capture_logs
    from twisted.internet.testing import MemoryReactorClock

    from engine.shell.engine import Engine
    from engine.store import Append, QueueTarget, open_store, write_one
    from tests.factories import T0, one_channel_bundle, received

    store = open_store(f"sqlite:///{tmp_path}/k.db")
    write_one(store, Append(message=received("HIS1", received_at=T0, targets=(
        QueueTarget(queue="10.1.2.3:6661", destination="his"),))))
    write_one(store, Append(message=received("LAB1", received_at=T0 + 1, targets=(
        QueueTarget(queue="10.1.2.9:6669", destination="lab"),))))
    reactor = MemoryReactorClock()
    reactor.advance(T0 + 10)
    before = one_channel_bundle(tmp_path / "a", TWO_DESTINATIONS.format(lab=""))
    engine = Engine(reactor, before.config, store, retention=None, drain_timeout=30)
    engine.startService()
    reactor.advance(0.1)
    assert [c[0] for c in reactor.tcpClients] == ["10.1.2.3"]  # HIS1's connect is under way
    stopped = []
    engine.stopService().addBoth(stopped.append)
    assert not stopped  # it waits for the connect (connect_timeout) of the message in flight
    after = one_channel_bundle(tmp_path / "b", TWO_DESTINATIONS.format(lab=LAB))
    outcome = []
    with capture_logs() as logs:
        engine.reload(after).addBoth(outcome.append)
        reactor.advance(0.1)
        reactor.advance(15)
    assert stopped == [None]
    assert [c[0] for c in reactor.tcpClients] == ["10.1.2.3"], "a sender started during the stop"
    assert "10.1.2.9:6669" not in engine.senders
    assert not [e for e in logs if e["event"] == "config.reloaded"]
    assert outcome and isinstance(outcome[0], Failure) and "stopping" in outcome[0].getErrorMessage()
    outcome.clear()  # (handled)


# ----------------------------------------------------------- new rules on open connections
SOURCE_CHANNEL = """name: lab-in
source:
  listen: tcp:0:interface=127.0.0.1
  allow: [{allow}]
  max_message_bytes: {limit}
"""


def _source_engine(tmp_path, allow: str, limit: str) -> KoppelProcess:
    (tmp_path / "channels").mkdir(exist_ok=True)
    (tmp_path / "channels" / "lab-in.yaml").write_text(SOURCE_CHANNEL.format(allow=allow, limit=limit))
    engine = _engine(tmp_path)
    engine.start(until="engine.started")
    return engine


def _big(control_id: str) -> bytes:
    return make_message(control_id) + b"NTE|1||" + b"x" * 4000 + b"\r"


def test_a_raised_max_message_bytes_applies_to_the_open_connection_that_was_refused(tmp_path):
    """README: unchanged listeners keep their open connections and apply the new rules. The
    framer's limit was fixed when the connection opened: an operator who raises the limit for a
    sender whose letters are refused as too large reloads, and that sender, resending on the
    connection it keeps open, was still refused with AR for ever."""
    engine = _source_engine(tmp_path, "127.0.0.1/32", "2KiB")
    try:
        with MLLPClient(engine.port) as client, MLLPClient(engine.port) as small:
            assert read_ack_code(client.request(_big("BIG1"))) == ("AR", "BIG1")
            (engine.channels / "lab-in.yaml").write_text(SOURCE_CHANNEL.format(allow="127.0.0.1/32", limit="1MiB"))
            assert _reloaded(engine, _reload(engine))["event"] == "config.reloaded"
            assert read_ack_code(client.request(_big("BIG1"))) == ("AA", "BIG1")
            (engine.channels / "lab-in.yaml").write_text(SOURCE_CHANNEL.format(allow="127.0.0.1/32", limit="1KiB"))
            assert _reloaded(engine, _reload(engine))["event"] == "config.reloaded"
            assert read_ack_code(small.request(_big("BIG2"))) == ("AR", "BIG2")  # and lowered
        assert engine.query("SELECT control_id FROM messages WHERE status = 'accepted'") == [("BIG1",)]
    finally:
        engine.terminate()


def test_a_peer_taken_off_the_allow_list_is_cut_off_on_its_open_connection(tmp_path):
    """A peer removed from `allow` (a decommissioned or compromised system) went on sending on
    the connection it had open, and every message was stored and ACKed; under steady traffic
    the idle timeout never cut it. Its connection is closed (after the ACKs of what it sent
    before the reload); allowed peers keep theirs."""
    engine = _source_engine(tmp_path, "127.0.0.1/32, 127.0.0.2/32", "1MiB")
    try:
        with MLLPClient(engine.port, source="127.0.0.2") as revoked, MLLPClient(engine.port) as kept:
            assert read_ack_code(revoked.request(make_message("OLD1")))[0] == "AA"
            assert read_ack_code(kept.request(make_message("KEPT1")))[0] == "AA"
            (engine.channels / "lab-in.yaml").write_text(SOURCE_CHANNEL.format(allow="127.0.0.1/32", limit="1MiB"))
            mark = _reload(engine)
            assert _reloaded(engine, mark)["event"] == "config.reloaded"
            with pytest.raises(OSError):
                revoked.request(make_message("OLD2"))
            assert read_ack_code(kept.request(make_message("KEPT2")))[0] == "AA"
        closing = engine.wait_for(lambda e: e.get("event") == "connection.closing", after=mark)
        assert closing["peer"].startswith("127.0.0.2:") and closing["reason"] == "not-allowed"
        stored = {cid for (cid,) in engine.query("SELECT control_id FROM messages")}
        assert stored == {"OLD1", "KEPT1", "KEPT2"}
    finally:
        engine.terminate()


# ------------------------------------------- on-map to on-store between insert and commit
def test_an_on_map_message_whose_commit_a_reload_to_on_store_overtakes_is_still_answered_after_mapping(tmp_path):
    """A message read while the channel was on-map is stored 'unanswered': its answer is the
    mapping's outcome, and that outcome (a NAK when it does not map) is what the store keeps
    for its resend. A reload to on-store between its insert and the commit sent the provisional
    AA at once, and the sender was told AA for a message the store records as refused (AE)."""
    from engine.core import mllp
    from engine.core.response import read_ack
    from engine.shell.engine import receive_settings
    from tests.factories import processor_for
    from tests.test_on_map import Harness, srm

    (tmp_path / "map").mkdir()
    h = Harness(tmp_path / "map", "on-map")
    try:
        (tmp_path / "store").mkdir()
        on_store = Harness(tmp_path / "store", "on-store")
        on_store.store.close()
        config = on_store.bundle.config
        processor = h.protocol.factory.settings  # (the on-map harness's processor stays)
        broken = srm().replace(b"ARQ|ZD200046139|", b"ARQ||")  # does not map: AE on-map
        h.transport.clear()
        h.protocol.dataReceived(mllp.encode_frame(broken))  # read and submitted; not committed yet
        mapper = processor_for(h, config=config, prefix="KO-")
        settings = receive_settings(config.channels[0], config, {}, mapper, committer=h.committer,
                                    metrics=h.metrics)
        assert processor.ack_mode == "on-map" and settings.ack_mode == "on-store"
        h.protocol.factory.update(settings)  # the reload
        for _ in range(20):
            h.reactor.advance(0)
        frames = [e.payload for e in mllp.FrameReader(max_frame_bytes=1 << 20).feed(h.transport.value())
                  if isinstance(e, mllp.FrameReceived)]
        row = h.row("g20ce6a9f8ca4f551275")
        assert (row.status, row.ack_code) == ("rejected", "AE")
        assert [read_ack(f).code for f in frames] == ["AE"]
    finally:
        h.store.close()


# ------------------------------------------------------------------ what the log says changed
def test_the_reload_log_line_names_what_changed(tmp_path):
    """config.reloaded said only how many channels and queues there were: an operator could not
    tell from the log whether the edit took (a changed accept list, retry or ack mode logs
    nothing else). It names the channels and destinations added, removed and changed."""
    with Sink() as his, Sink() as lab:
        channels = tmp_path / "channels"
        write_channel(channels, {"his": his.port}, name="a-in")
        write_channel(channels, {"his": his.port}, name="b-in")
        engine = _engine(tmp_path)
        try:
            engine.start(until="engine.started")
            load = Load(engine.ports["a-in"], connections=3, tag="LOG").start()
            load.wait_for_acks(30, 10)
            write_channel(channels, {"his": his.port, "lab": lab.port}, name="a-in", ack_timeout="7s")
            (channels / "b-in.yaml").unlink()
            write_channel(channels, {"his": his.port}, name="c-in", ack_timeout="7s")
            event = _reloaded(engine, _reload(engine))
            load.stop.set()
            load.join()
            assert event["event"] == "config.reloaded"
            assert event["channels_added"] == ["c-in"]
            assert event["channels_removed"] == ["b-in"]
            assert event["channels_changed"] == ["a-in"]
            assert event["destinations_added"] == ["lab"]
            assert event["destinations_removed"] == []
            assert event["destinations_changed"] == ["his"]
            assert not load.wrong
            assert his.wait_for_delivered(load.acked, 15)
        finally:
            engine.terminate()


# ------------------------------------------------------------ many reloads under steady load
def _in_connection_order(delivered: list[str], tag: str) -> list[str]:
    """Connections whose messages reached the sink out of the order they were ACKed in."""
    by_connection: dict[str, list[str]] = {}
    for control_id in delivered:
        if control_id.startswith(tag):
            by_connection.setdefault(control_id.split("N")[0], []).append(control_id)
    return [c for c, ids in by_connection.items() if ids != sorted(ids)]


def test_reloads_under_load_lose_nothing_acked_and_keep_each_destinations_order(tmp_path):
    """Four connections sending without pause while reload after reload changes the ack codes,
    keepalive, retry, rewrite, ack_timeout, a destination's order and its connection mode, with
    the destination slow and NAKing: every ACKed message arrives, once a connection's, in the
    order it was ACKed."""
    with Sink() as his:
        his.delay = 0.002
        channels = tmp_path / "channels"
        write_channel(channels, {"his": his.port})
        engine = _engine(tmp_path)
        try:
            engine.start(until="engine.started")
            load = Load(engine.port, connections=4, tag="UL").start()
            load.wait_for_acks(50, 10)
            path = channels / "e2e-in.yaml"
            base = path.read_text()
            variants = [
                base.replace("  allow:", "  keepalive: 5s\n  allow:"),
                base.replace("routes:", "ack:\n  rejected: AE\n  store_failure: AR\nroutes:"),
                base.replace("    connection: keep", "    connection: per-message\n    keepalive: off"),
                base.replace("    ack_timeout: 5s", "    ack_timeout: 3s\n    rewrite: {MSH-5: HIX}"),
                base.replace("initial: 100ms", "initial: 50ms"),
                base,
            ]
            for i, text in enumerate(variants * 2):
                if i % 3 == 1:
                    his.nak_next("AE", 3)
                path.write_text(text)
                assert _reloaded(engine, _reload(engine))["event"] == "config.reloaded"
                load.wait_for_acks(len(load.acked) + 20, 5)
            load.stop.set()
            load.join()
            assert not load.wrong
            assert his.wait_for_delivered(load.acked, 30), (len(load.acked), his.stats())
            assert _in_connection_order(his.delivered_ids(), "UL") == []
            assert "Unhandled error" not in engine.output()
        finally:
            engine.terminate()


# ------------------------------------------------------- a port given back by the next reload
BACK_AND_FORTH = r'''
import json, socket, sys
from pathlib import Path
from twisted.internet import reactor
from engine.bundle import load_bundle
from engine.shell.engine import Engine
from engine.store import open_store

work, port = Path(sys.argv[1]), int(sys.argv[2])
def bundle(name, channels):
    d = work / name
    (d / "mappings").mkdir(parents=True)
    for channel, listen in channels.items():
        (d / f"{channel}.yaml").write_text(f"name: {channel}\nsource:\n  listen: {listen}\n")
    return load_bundle(d, d / "mappings")
first = bundle("first", {"a": f"tcp:{port}:interface=127.0.0.1", "b": "tcp:0:interface=127.0.0.1"})
without = bundle("without", {"b": "tcp:0:interface=127.0.0.1"})
moved = bundle("moved", {"a": "tcp:0:interface=127.0.0.1", "b": "tcp:0:interface=127.0.0.1"})
engine = Engine(reactor, first.config, open_store(f"sqlite:///{work}/k.db"), retention=None, drain_timeout=2)
result = {}
def check(_=None):
    result["ports"] = engine.listener_ports()
    result["ready"] = engine.readiness()[0]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        result["listening"] = True
    except OSError:
        result["listening"] = False
    print(json.dumps(result)); sys.stdout.flush()
    engine.stopService().addBoth(lambda _: reactor.stop())
def twice():
    # removed (or moved away) and given back by the next reload, in one turn of the reactor:
    # the old port is still open when the second reload binds the channel again
    engine.reload(without if sys.argv[3] == "remove" else moved)
    engine.reload(first)
    reactor.callLater(1.0, check)
def started(_):
    reactor.callLater(0.2, twice)
reactor.callWhenRunning(lambda: engine.startService().addCallback(started))
reactor.run()
'''


@pytest.mark.parametrize("how", ["remove", "move"])
def test_a_channel_given_its_port_back_by_the_next_reload_listens_again(tmp_path, how):
    """Two reloads back to back: the first removes channel `a` (or moves it to another port),
    the second puts it back on its port before the first's listener has closed it. The second
    did not wait for that port (the retired listener was no longer in the engine's list), so
    its bind failed (address in use) and the channel stayed down until a third reload."""
    import json
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "twice.py"
    script.write_text(BACK_AND_FORTH)
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(port), how], capture_output=True,
                         text=True, timeout=30, cwd=Path(__file__).parent.parent)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(lines[-1])
    assert result["listening"] and result["ports"].get("a") == port, run.stdout[-2000:]
    assert result["ready"]
