"""On-call drill of the operator tools, done from the README alone: what did not do what it says.

Each test fails on the code as it was reviewed and passes once its defect is fixed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sink import KOPPEL, KoppelProcess, MLLPClient, Sink, make_message, write_channel  # noqa: E402

from engine.cli import main  # noqa: E402
from engine.store import DeadLetter, MarkDelivered, write_one  # noqa: E402
from tests.test_operator import NOW, World  # noqa: E402

# ------------------------------------------------------------------------------ stop with a message on the wire


class _Silent:
    """A destination that takes one message and never answers (a hung HIS): the message is on
    the wire, the connection up, when the engine is asked to stop."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.got_message = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(conn)
        buffer = b""
        while b"\x1c\r" not in buffer:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk
        self.got_message.set()  # and never answer

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.listener.close()


@pytest.fixture(scope="module")
def stopped_mid_send(tmp_path_factory):
    """SIGTERM while the only queued message waits for its ACK longer than --drain-timeout.
    Returns (exit code, log events, the entry's attempts and last error after the stop)."""
    tmp_path = tmp_path_factory.mktemp("stop")
    silent = _Silent()
    engine = None
    try:
        channels = tmp_path / "channels"
        write_channel(channels, {"his": silent.port}, ack_timeout="30s",
                      retry="{initial: 1m, factor: 2, max: 5m, jitter: 0}")
        engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/var/koppel.db",
                               args=("--drain-timeout", "0.5", "--pid-file", ""))
        port = engine.start(until="engine.started")
        with MLLPClient(port) as client:
            client.request(make_message("STOP1"))
        assert silent.got_message.wait(10), engine.tail()
        engine.proc.send_signal(signal.SIGTERM)
        code = engine.wait(15)
        events = engine.logged()
        (row,) = engine.query("SELECT attempts, last_error, state FROM queue_entries")
        return code, events, row
    finally:
        if engine is not None:
            engine.kill()
        silent.close()


def test_a_message_on_the_wire_at_a_stop_is_not_recorded_as_connect_timed_out(stopped_mid_send):
    """The HIS had the connection and the whole message; the stop's --drain-timeout cut the
    wait for its ACK. README (Delivery) keeps `connect timed out` for a connect that runs out
    of `connect_timeout`; `koppel queue show` / `queue list` / the `delivery.retry` log line
    said "connect timed out" here, sending on-call to look at the network/VPN. (The cancel's
    CancelledError goes through describe_failure's "CancelledError" -> "connect timed out".)"""
    code, events, (attempts, last_error, state) = stopped_mid_send
    assert code == 0
    assert state == "pending"  # at-least-once: sent again after the restart
    assert last_error is None or "connect" not in last_error, (attempts, last_error)
    retries = [e for e in events if e.get("event") == "delivery.retry"]
    assert all("connect" not in str(e.get("reason")) for e in retries), retries


def test_a_stop_that_gives_up_on_a_message_in_flight_says_so_in_the_log(stopped_mid_send):
    """Engine.stopService bounds the senders' stop with _at_most_drain_timeout, which logs
    `engine.sender_stop_timeout` only on a CancelledError; a cancelled DeferredList fires its
    callback with the failures instead, so the warning never comes (the same for the
    listeners' `engine.drain_timeout`). The log reads as a clean stop that finished every
    message in flight, though one was abandoned and will be sent again."""
    _, events, _ = stopped_mid_send
    names = [e.get("event") for e in events]
    assert names[-1] == "engine.stopped"
    assert "engine.sender_stop_timeout" in names, names[-6:]


# ------------------------------------------------------------------------------ dead-letters show


@pytest.fixture
def world(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    yield w
    w.store.close()


ACK_AA = b"MSH|^~\\&|HIX||KOPPEL||20231114221500||ACK^S01^ACK|A1|P|2.4\rMSA|AA|ZD001\r"


def test_dead_letters_show_of_a_delivered_entry_gives_no_failure_as_its_reason(world, capsys):
    """`koppel dead-letters show ID` of an entry that was refused once and then delivered AA
    printed `reason  connection refused` under `delivered at` and `MSA-1 AA`: on-call reads a
    failure into a delivered message (the same stale error `koppel trace` was fixed not to show
    for a delivered row; `GET /api/dead-letters/{id}` has the same "reason")."""
    entry = world.hix[0]  # refused once (connection refused), in World
    write_one(world.store, MarkDelivered(entry_id=entry, ack=ACK_AA, at=NOW - 1))
    capsys.readouterr()
    assert main(["dead-letters", "show", str(entry), "--store", world.url]) == 0
    out = capsys.readouterr().out
    assert "delivered (not a dead letter)" in out and "MSA-1 AA" in out
    assert "connection refused" not in out, out


# ------------------------------------------------------------------------------ koppel send


def test_koppel_send_names_every_file_when_one_gets_no_ack(tmp_path):
    """`koppel send a b c` where the system drops the connection on `a` printed one line,
    `a  <MSH-10>  NO ACK  ...`, and stopped: b and c were neither sent nor mentioned, so the
    operator cannot tell from the output which files still have to go (README: "sends each
    message ... and prints `file  MSA-1  MSA-2  text`")."""
    paths = []
    for n in range(3):
        path = tmp_path / f"DRILL{n}.hl7"
        path.write_bytes(make_message(f"DRILL{n}"))
        paths.append(path)
    with Sink() as sink:
        sink.drop_next(1)
        done = subprocess.run([str(KOPPEL), "send", "--timeout", "5", "--to", f"127.0.0.1:{sink.port}",
                               *map(str, paths)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    shown = done.stdout + done.stderr
    assert [str(p) for p in paths if str(p) not in shown] == [], shown
    # in the layout `file  MSA-1  MSA-2  text`: what stands in MSA-1, and the MSH-10 sent
    assert [line.split("\t")[:3] for line in done.stdout.splitlines()] == [
        [str(paths[0]), "NO ACK", "DRILL0"], [str(paths[1]), "NOT SENT", "DRILL1"], [str(paths[2]), "NOT SENT", "DRILL2"]]
    assert sink.received_ids() == ["DRILL0"]  # (sending stops: the next would overtake it)


def test_dead_letters_list_says_there_are_more_only_when_there_are(world, capsys):
    """The drill's one dead letter with --limit 1 printed "(first 1; use --limit for more)"."""
    assert main(["dead-letters", "list", "--limit", "1", "--store", world.url]) == 0
    out = capsys.readouterr().out
    assert str(world.ris_dead) in out and "use --limit for more" not in out, out
    entry = world.hix[1]
    write_one(world.store, DeadLetter(entry_id=entry, reason="AR from destination: dead-lettered", ack=None, at=NOW))
    assert main(["dead-letters", "list", "--limit", "1", "--store", world.url]) == 0
    assert "(first 1; use --limit for more)" in capsys.readouterr().out


def test_koppel_send_names_an_empty_file_and_sends_nothing(tmp_path):
    """The drill: an empty file gave "no messages found" without saying which file."""
    empty = tmp_path / "EMPTY.hl7"
    empty.write_bytes(b"\n")
    full = tmp_path / "FULL.hl7"
    full.write_bytes(make_message("FULL0"))
    with Sink() as sink:
        done = subprocess.run([str(KOPPEL), "send", "--timeout", "5", "--to", f"127.0.0.1:{sink.port}",
                               str(full), str(empty)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert done.stdout.strip() == f"{empty}\tno messages found"
        assert sink.received_ids() == []
