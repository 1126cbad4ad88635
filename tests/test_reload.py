"""SIGHUP / koppel reload: new config applied, open connections kept, a bad config refused."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.core import mllp
from engine.core.response import read_ack
from tests.conftest import load_sample

CHANNEL = """name: {name}
source:
  listen: tcp:0:interface=127.0.0.1
accept:
  types: [{types}]
"""


class Engine:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.channels = tmp_path / "channels"
        self.channels.mkdir()
        (tmp_path / "mappings").mkdir()
        self.pid_file = tmp_path / "koppel.pid"
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "--channels", str(self.channels),
             "--mappings", str(self.tmp / "mappings"), "--store", f"sqlite:///{self.tmp}/k.db",
             "--metrics", "tcp:0:interface=127.0.0.1", "--admin", "off", "--pid-file", str(self.pid_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(lambda e: e.get("event") == "engine.started")

    def _read(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "line": line}
            with self.lock:
                self.events.append(event)

    def wait_for(self, match, *, after: int = 0, timeout: float = 15.0) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                for event in self.events[after:]:
                    if match(event):
                        return event
            time.sleep(0.02)
        raise AssertionError(f"no matching log event; got {self.events[-5:]}")

    def port(self, channel: str, after: int = 0) -> int:
        return self.wait_for(lambda e: e.get("event") == "listener.started" and e.get("channel") == channel,
                             after=after)["port"]

    def reload(self) -> int:
        mark = len(self.events)
        result = subprocess.run([sys.executable, "-m", "engine.cli", "reload", "--pid-file", str(self.pid_file)],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        return mark

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
    e = Engine(tmp_path)
    yield e
    e.stop()


def write(engine, name, types):
    (engine.channels / f"{name}.yaml").write_text(CHANNEL.format(name=name, types=types))


def test_reload_applies_new_rules_to_open_connections_adds_and_removes_listeners_and_keeps_a_good_config(engine):
    srm = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    oru = load_sample("zorgdomein/zd_oru_pdf_official_head.hl7")
    write(engine, "a", "SRM^S01")
    engine.start()
    assert int(engine.pid_file.read_text()) == engine.proc.pid
    port_a = engine.port("a")
    conn = socket.create_connection(("127.0.0.1", port_a))
    assert read_ack(exchange(conn, srm)).code == "AA"
    assert read_ack(exchange(conn, oru)).code == "AR"

    write(engine, "a", "SRM^S01, ORU^R01")
    write(engine, "b", "ORU^R01")
    mark = engine.reload()
    engine.wait_for(lambda e: e.get("event") == "config.reloaded", after=mark)
    port_b = engine.port("b", after=mark)
    assert read_ack(exchange(conn, oru)).code == "AA"  # the same connection, the new rules
    with socket.create_connection(("127.0.0.1", port_b)) as other:
        assert read_ack(exchange(other, oru)).code == "AA"

    (engine.channels / "a.yaml").write_text(CHANNEL.format(name="a", types="SRM^S01") + "surprise: 1\n")
    mark = engine.reload()
    failed = engine.wait_for(lambda e: e.get("event") == "config.reload_failed", after=mark)
    assert "a.yaml:" in failed["problem"] and "surprise" in failed["problem"]
    assert read_ack(exchange(conn, oru)).code == "AA"  # still the config that loaded
    assert engine.proc.poll() is None

    write(engine, "a", "SRM^S01, ORU^R01")
    (engine.channels / "b.yaml").unlink()
    mark = engine.reload()
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
