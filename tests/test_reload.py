"""SIGHUP / koppel reload: new config applied, open connections kept, a bad config refused."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sink import KoppelProcess

from engine.core import mllp
from engine.core.response import read_ack
from tests.conftest import load_sample

CHANNEL = """name: {name}
source:
  listen: tcp:0:interface=127.0.0.1
accept:
  types: [{types}]
"""
PID_FILE = "koppel.pid"


def reload(engine: KoppelProcess) -> int:
    """``koppel reload`` by the pid file; the log mark to look for its outcome after."""
    mark = engine.mark()
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "reload", "--pid-file", str(engine.workdir / PID_FILE)],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr
    return mark


def port(engine: KoppelProcess, channel: str, after: int | None = None) -> int:
    return engine.wait_for(lambda e: e.get("event") == "listener.started" and e.get("channel") == channel,
                           after=after)["port"]


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(mllp.encode_frame(payload))
    reader = mllp.FrameReader(max_frame_bytes=1 << 20)
    sock.settimeout(10)
    while True:
        data = sock.recv(65536)
        assert data, "connection closed"
        for event in reader.feed(data):
            if isinstance(event, mllp.FrameReceived):
                return event.payload


@pytest.fixture
def engine(tmp_path):
    (tmp_path / "channels").mkdir()
    e = KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/k.db", metrics="tcp:0:interface=127.0.0.1",
                      args=("--pid-file", str(tmp_path / PID_FILE)))
    yield e
    e.terminate()


def write(engine, name, types):
    (engine.channels / f"{name}.yaml").write_text(CHANNEL.format(name=name, types=types))


def test_reload_applies_new_rules_to_open_connections_adds_and_removes_listeners_and_keeps_a_good_config(engine):
    srm = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    oru = load_sample("zorgdomein/zd_oru_pdf_official_head.hl7")
    write(engine, "a", "SRM^S01")
    engine.start(until="engine.started")
    assert int((engine.workdir / PID_FILE).read_text()) == engine.proc.pid
    port_a = port(engine, "a")
    conn = socket.create_connection(("127.0.0.1", port_a))
    assert read_ack(exchange(conn, srm)).code == "AA"
    assert read_ack(exchange(conn, oru)).code == "AR"

    write(engine, "a", "SRM^S01, ORU^R01")
    write(engine, "b", "ORU^R01")
    mark = reload(engine)
    engine.wait_for(lambda e: e.get("event") == "config.reloaded", after=mark)
    port_b = port(engine, "b", after=mark)
    assert read_ack(exchange(conn, oru)).code == "AA"  # the same connection, the new rules
    with socket.create_connection(("127.0.0.1", port_b)) as other:
        assert read_ack(exchange(other, oru)).code == "AA"

    (engine.channels / "a.yaml").write_text(CHANNEL.format(name="a", types="SRM^S01") + "surprise: 1\n")
    mark = reload(engine)
    failed = engine.wait_for(lambda e: e.get("event") == "config.reload_failed", after=mark)
    assert "a.yaml:" in failed["problem"] and "surprise" in failed["problem"]
    assert read_ack(exchange(conn, oru)).code == "AA"  # still the config that loaded
    assert engine.proc.poll() is None

    write(engine, "a", "SRM^S01, ORU^R01")
    (engine.channels / "b.yaml").unlink()
    mark = reload(engine)
    engine.wait_for(lambda e: e.get("event") == "config.reloaded", after=mark)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port_b), timeout=0.5).close()
        except OSError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the removed channel still accepts connections")
    assert read_ack(exchange(conn, srm)).code == "AA"
    conn.close()


def test_koppel_reload_without_a_running_engine_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.cli", "reload", "--pid-file", str(tmp_path / "none.pid")],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1 and "no running engine" in result.stderr


HUP_CATCHER = """
import signal, sys, time
def hup(signum, frame):
    open(sys.argv[1], "w").write("reloaded")
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
print("ready", flush=True)
time.sleep(30)
"""


def test_koppel_reload_without_a_pid_file_asks_both_processes_of_a_split_engine(tmp_path):
    (tmp_path / "var").mkdir()
    children = {}
    for role in ("receive", "deliver"):
        # "koppel run" on its command line: reload signals only a process that runs koppel
        child = subprocess.Popen([sys.executable, "-c", HUP_CATCHER, str(tmp_path / f"{role}.done"), "koppel", "run"],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        (tmp_path / "var" / f"koppel-{role}.pid").write_text(f"{child.pid}\n")
        children[role] = child
    try:
        result = subprocess.run([sys.executable, "-m", "engine.cli", "reload"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=20,
                                env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        assert result.returncode == 0, result.stderr
        for role, child in children.items():
            assert child.wait(10) == 0
            assert (tmp_path / f"{role}.done").read_text() == "reloaded"
        assert result.stdout.count("reload requested") == 2
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()


def test_koppel_reload_does_not_signal_a_process_that_is_not_koppel(tmp_path):
    """A pid file left by a kill -9 whose number now belongs to another program: SIGHUP would
    kill that program, so reload refuses."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "stale.pid").write_text(f"{other.pid}\n")
        result = subprocess.run([sys.executable, "-m", "engine.cli", "reload", "--pid-file", str(tmp_path / "stale.pid")],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 1 and "is not a running koppel" in result.stderr
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()


@pytest.fixture
def taken_port():
    """A port some other program already listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def test_a_channel_that_cannot_listen_stops_the_engine_from_starting(engine, taken_port):
    (engine.channels / "a.yaml").write_text(
        CHANNEL.format(name="a", types="SRM^S01").replace("tcp:0:", f"tcp:{taken_port}:"))
    engine.launch()
    assert engine.wait(timeout=20) == 1  # systemd sees a failed start, not an engine without its port
    failed = engine.wait_for(lambda e: e.get("event") == "listener.start_failed")
    assert failed["channel"] == "a" and "in use" in failed["error"]
    assert any(e.get("event") == "engine.start_failed" for e in engine.logged())
    assert "Unhandled error" not in engine.output()


def _engine_with_metrics(tmp_path) -> tuple[KoppelProcess, int]:
    """An engine (not started) whose /metrics port is known before it starts."""
    from tests.test_metrics_flow import free_port

    (tmp_path / "channels").mkdir()
    metrics_port = free_port()
    engine = KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/k.db",
                           metrics=f"tcp:{metrics_port}:interface=127.0.0.1",
                           args=("--pid-file", str(tmp_path / PID_FILE)))
    return engine, metrics_port


def test_a_reloaded_channel_that_cannot_listen_is_logged_and_the_rest_keeps_running(tmp_path, taken_port):
    engine, metrics_port = _engine_with_metrics(tmp_path)
    try:
        write(engine, "a", "SRM^S01")
        engine.start(until="engine.started")
        port_a = port(engine, "a")
        (engine.channels / "b.yaml").write_text(
            CHANNEL.format(name="b", types="ORU^R01").replace("tcp:0:", f"tcp:{taken_port}:"))
        mark = reload(engine)
        failed = engine.wait_for(lambda e: e.get("event") == "listener.start_failed", after=mark)
        assert failed["channel"] == "b"
        engine.wait_for(lambda e: e.get("event") == "config.reloaded", after=mark)
        with socket.create_connection(("127.0.0.1", port_a), timeout=10) as conn:
            srm = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
            assert read_ack(exchange(conn, srm)).code == "AA"
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5)
        assert not_ready.value.code == 503
        assert engine.proc.poll() is None
        assert "Unhandled error" not in engine.output()
    finally:
        engine.terminate()


def _listener_up(metrics_port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return {s.labels["channel"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "koppel_listener_up"}


def test_listener_up_after_a_reload_that_moves_one_channel_and_removes_another(tmp_path):
    """KoppelListenerDown pages on koppel_listener_up == 0: a channel moved to a new port is up,
    and one removed on purpose leaves no series behind (the old listener's stop set 0 after the
    new one set 1, and nothing removed a removed channel's series)."""
    from tests.test_metrics_flow import free_port

    engine, metrics_port = _engine_with_metrics(tmp_path)
    try:
        write(engine, "moved", "SRM^S01")
        write(engine, "old", "ORU^R01")
        engine.start(until="engine.started")
        assert _listener_up(metrics_port) == {"moved": 1.0, "old": 1.0}
        new_port = free_port()
        (engine.channels / "moved.yaml").write_text(
            CHANNEL.format(name="moved", types="SRM^S01").replace("tcp:0:", f"tcp:{new_port}:"))
        (engine.channels / "old.yaml").unlink()
        mark = reload(engine)
        engine.wait_for(lambda e: e.get("event") == "config.reloaded", after=mark)
        socket.create_connection(("127.0.0.1", new_port), timeout=5).close()  # it does listen
        time.sleep(0.3)  # the old listeners' stops have settled (config.reloaded waits for them)
        assert _listener_up(metrics_port) == {"moved": 1.0}
    finally:
        engine.terminate()
