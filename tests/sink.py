"""A scriptable MLLP destination for end-to-end tests, plus the harness around ``koppel run``.

The sink plays the hospital system Koppel delivers to. It runs on plain threads and
blocking sockets (never the Twisted reactor), so a bug in Koppel's shell cannot also
hide in the thing that judges it. It listens on 127.0.0.1 only, records every message it
receives (MSH-10, raw bytes, the answer it gave, when) and answers AA with MSA-2 = MSH-10,
unless scripted to:

* answer AE/AR/CE/CR for the next N messages      ``sink.nak_next("AE", 3)``
* answer only after S seconds                      ``sink.delay = 1.5``
* drop the connection on the next message(s)       ``sink.drop_next(1)``
* read slowly, N bytes a second (a slow link)      ``sink.read_rate = 2_000_000``
* close after each ACK, with bytes after it        ``sink.close_after_ack = True``, ``sink.trailer = b"\\r\\n"``
* end each ACK with FS alone (no CR)               ``sink.ack_end = b"\\x1c"``
* go down (stop listening, cut connections) and come back on the same port
                                                   ``sink.down()`` / ``sink.up()``

The second half of the module is what the e2e tests and the soak/bench scripts share:
writing a channel directory, running ``koppel run`` as a subprocess (port learned from the
``listener.started`` log line), a blocking MLLP client (one frame, one ACK), a load
generator that sends over several connections until the engine goes away, and a blocking
MLLP source that resends until ACKed, like a real sender does when the engine is killed under it.

As a script: ``python tests/sink.py [--port N] [--delay S] [--no-raw]`` prints ``port N`` and
then reads commands on stdin: ``down``, ``up``, ``nak CODE N``, ``delay S``, ``drop N``,
``stats`` (one JSON line), ``ids`` (delivered MSH-10s as JSON), ``quit``.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
KOPPEL = ROOT / ".venv" / "bin" / "koppel"
SUCCESS = ("AA", "CA")


def control_id_of(message: bytes) -> str:
    """MSH-10 of a message, found by splitting the first segment on its field separator."""
    if not message.startswith(b"MSH") or len(message) < 4:
        return ""
    sep = message[3:4]
    fields = message.split(CR, 1)[0].split(sep, 10)
    return fields[9].decode("ascii", "replace") if len(fields) > 9 else ""


def ack_for(control_id: str, code: str, number: int, end: bytes = EB + CR) -> bytes:
    text = "" if code in SUCCESS else "|scripted " + code
    return (
        SB
        + f"MSH|^~\\&|SINK|TEST|KOPPEL|ZIEKENHUIS|20260101000000||ACK|SINK{number}|P|2.4\r"
        f"MSA|{code}|{control_id}{text}\r".encode("ascii")
        + end
    )


@dataclass(slots=True)
class Received:
    control_id: str
    raw: bytes | None
    answer: str  # AA/AE/AR/CE/CR, or DROP when the connection was cut instead
    at: float  # time.monotonic()
    connection: int


@dataclass(slots=True)
class _Script:
    naks: deque = field(default_factory=deque)  # ack codes for the next messages
    drops: int = 0


class Sink:
    """A destination on 127.0.0.1. ``start()`` binds (port 0 picks one); the port stays across down/up."""

    def __init__(self, port: int = 0, *, keep_raw: bool = True, name: str = "sink", tls=None) -> None:
        self.port = port
        self.tls = tls  # an ssl.SSLContext: the destination speaks MLLP over TLS
        self.keep_raw = keep_raw
        self.name = name
        self.delay = 0.0
        self.close_after_ack = False  # one message per connection, as some hospital systems do
        self.read_rate: float | None = None  # bytes per second: a destination that reads slowly (a slow link)
        self.trailer = b""  # written a moment after each ACK, on its own (a line end some systems send)
        self.ack_end = EB + CR  # how each ACK frame ends: EB alone for systems that omit the CR
        self.close_notify = False  # TLS: close with a close_notify (and wait for the peer's), not a bare FIN
        self.records: list[Received] = []
        self._first_order: list[str] = []  # MSH-10s in order of their first AA
        self._first_set: set[str] = set()
        self._duplicates = 0
        self._script = _Script()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._connections: dict[int, socket.socket] = {}
        self._next_connection = 0
        self._acks = 0
        self._answers: dict[str, int] = {}  # kept as they happen: status reads are O(1) in long runs
        self._first_ok_at: float | None = None
        self._last_ok_at: float | None = None
        self._running = False

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> "Sink":
        self.up()
        return self

    def up(self) -> None:
        """Listen (again) on the same port."""
        if self._running:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._running = True
        self._accepting = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True,
                                           name=f"{self.name}-accept")
        self._accepting.start()

    def down(self) -> None:
        """Stop listening and cut every open connection (the system went away)."""
        if not self._running:
            return
        self._running = False
        if self._accepting is not None:
            self._accepting.join(2)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            connections = list(self._connections.values())
            self._connections.clear()
        for conn in connections:
            _cut(conn)

    stop = down

    def __enter__(self) -> "Sink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- scripting ------------------------------------------------------------------
    def nak_next(self, code: str, count: int = 1) -> None:
        """Answer the next ``count`` messages with ``code`` (AE, AR, CE, CR) instead of AA."""
        with self._lock:
            self._script.naks.extend([code] * count)

    def drop_next(self, count: int = 1) -> None:
        """Close the connection on receiving each of the next ``count`` messages, without answering."""
        with self._lock:
            self._script.drops += count

    # -- what happened --------------------------------------------------------------
    def received_ids(self) -> list[str]:
        with self._lock:
            return [r.control_id for r in self.records]

    def delivered_ids(self) -> list[str]:
        """MSH-10s in the order they were first answered AA (resends left out)."""
        with self._lock:
            return list(self._first_order)

    def duplicates(self) -> int:
        """AA answers beyond the first for the same MSH-10 (at-least-once resends)."""
        with self._lock:
            return self._duplicates

    def delivered_count(self) -> int:
        with self._lock:
            return len(self._first_order)

    def first_last_delivery(self) -> tuple[float, float] | None:
        """When the first and the last AA/CA were given (time.monotonic())."""
        with self._lock:
            return None if self._first_ok_at is None else (self._first_ok_at, self._last_ok_at)  # type: ignore[return-value]

    def wait_until(self, predicate, timeout: float, every: float = 0.01) -> bool:
        """Poll ``predicate(self)`` every ``every`` seconds until it holds or ``timeout`` passes.

        Polling, not a wake-up per message: a waiter must not slow down the sink it watches.
        """
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(every)
        return True

    def wait_for_delivered(self, control_ids, timeout: float) -> bool:
        wanted = set(control_ids)

        def arrived(sink: "Sink") -> bool:
            with sink._lock:
                return len(sink._first_set) >= len(wanted) and wanted <= sink._first_set

        return self.wait_until(arrived, timeout)

    def stats(self) -> dict:
        with self._lock:
            return {"port": self.port, "received": len(self.records), "delivered": len(self._first_order),
                    "duplicates": self._duplicates, "answers": dict(self._answers),
                    "first": self._first_ok_at, "last": self._last_ok_at}

    # -- the server -----------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running:
            ready, _, _ = select.select([listener], [], [], 0.05)
            if not ready or not self._running:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.read_rate:  # a small window, so the sender feels the pace at once
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            with self._lock:
                number = self._next_connection
                self._next_connection += 1
                self._connections[number] = conn
            threading.Thread(target=self._serve, args=(conn, number), daemon=True,
                             name=f"{self.name}-conn{number}").start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        try:
            if self.tls is not None:  # the handshake here, so one slow client never holds accept()
                conn = self.tls.wrap_socket(conn, server_side=True)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                if self.read_rate:
                    time.sleep(len(data) / self.read_rate)
                buffer += data
                while True:
                    end = buffer.find(EB + CR)
                    if end < 0:
                        break
                    start = buffer.find(SB)
                    frame = buffer[start + 1 : end] if 0 <= start < end else buffer[:end]
                    buffer = buffer[end + 2 :]
                    if not self._answer(conn, number, frame):
                        if self.close_notify and isinstance(conn, ssl.SSLSocket):
                            conn = conn.unwrap()  # TLS's own goodbye first, and wait for Koppel's
                        return
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._connections.pop(number, None)
            _cut(conn)

    def _answer(self, conn: socket.socket, number: int, frame: bytes) -> bool:
        control_id = control_id_of(frame)
        with self._lock:
            if self._script.drops:
                self._script.drops -= 1
                code = "DROP"
            elif self._script.naks:
                code = self._script.naks.popleft()
            else:
                code = "AA"
            delay = self.delay
        if delay and code != "DROP":
            time.sleep(delay)
        at = time.monotonic()
        with self._lock:
            self.records.append(Received(control_id, frame if self.keep_raw else None, code, at, number))
            self._answers[code] = self._answers.get(code, 0) + 1
            if code in SUCCESS:
                if self._first_ok_at is None:
                    self._first_ok_at = at
                self._last_ok_at = at
                if control_id in self._first_set:
                    self._duplicates += 1
                else:
                    self._first_set.add(control_id)
                    self._first_order.append(control_id)
            self._acks += 1
            ack_number = self._acks
        if code == "DROP":
            return False
        conn.sendall(ack_for(control_id, code, ack_number, self.ack_end))
        if self.trailer:
            time.sleep(0.005)  # its own segment, after the reader took the ACK
            conn.sendall(self.trailer)
        return not self.close_after_ack


def _cut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


# =============================================================================== harness
# Shared by the tests that run ``koppel run`` (tests/test_e2e_*.py and others) and tests/benchmarks/*.py.

# Synthetic referral; the BSN is the test number 123456782.
MESSAGE_TEMPLATE = (
    "MSH|^~\\&|ZorgDomein|ZD|KOPPEL|ZIEKENHUIS|20261123120000+0100||SRM^S01^SRM_S01|{cid}|P|2.4|||||NLD|8859/1\r"
    "ARQ|{cid}||||||CARHAR^Cardiologie / Hartfalen^99zda|CARREG001^consult cardioloog^99zda\r"
    "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^T^^^^^L\r"
)


@contextlib.contextmanager
def unanswered_port():
    """A port on 127.0.0.1 whose SYNs go unanswered, as a host behind a dead VPN tunnel: a
    listener whose accept queue is full and that never accepts (Linux then drops every SYN)."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((HOST, port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def make_message(control_id: str) -> bytes:
    return MESSAGE_TEMPLATE.format(cid=control_id).encode("ascii")


def frame(message: bytes) -> bytes:
    return SB + message + EB + CR


BUNDLE_DESTINATIONS = ("his-scheduling", "ris-orders", "lis-orders", "document-archive")


def write_bundle(workdir: Path, sinks: dict[str, int]) -> Path:
    """The bundled channels with listeners on tcp:0 (127.0.0.1) and each destination at a sink
    (name -> port), in ``workdir/channels``; the bundled mappings, untouched, in
    ``workdir/mappings``. Returns the channels directory."""
    import shutil

    import yaml

    channels = workdir / "channels"
    channels.mkdir(parents=True)
    for path in sorted((ROOT / "channels").glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        config["source"]["listen"] = "tcp:0:interface=127.0.0.1"
        for name, destination in (config.get("destinations") or {}).items():
            destination["endpoint"] = f"tcp:host=127.0.0.1:port={sinks[name]}"
            destination["retry"] = {"initial": "100ms", "factor": 2, "max": "500ms", "jitter": 0.1}
        (channels / path.name).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    shutil.copytree(ROOT / "mappings", workdir / "mappings")
    return channels


def write_channel(directory: Path, sinks: dict[str, int], *, listen: str = "tcp:0:interface=127.0.0.1",
                  ack_timeout: str = "5s", retry: str = "{initial: 100ms, factor: 2, max: 500ms, jitter: 0.1}",
                  give_up_after: str = "never", max_queue: int | None = None,
                  name: str = "e2e-in", connection: str = "keep", keepalive: str | None = None) -> Path:
    """One channel listening on ``listen`` and routing everything to every sink (name -> port)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        f"name: {name}",
        "source:",
        f"  listen: {listen}",
        "  allow: [127.0.0.1/32]",
        *([f"  keepalive: {keepalive}"] if keepalive else []),
        "destinations:",
    ]
    for dest, port in sinks.items():
        lines += [
            f"  {dest}:",
            f"    endpoint: tcp:host=127.0.0.1:port={port}",
            f"    ack_timeout: {ack_timeout}",
            "    connect_timeout: 2s",
            f"    retry: {retry}",
            f"    give_up_after: {give_up_after}",
            "    on_nak: {AE: retry, CE: retry, AR: dead-letter, CR: dead-letter}",
            f"    connection: {connection}",
        ]
        if max_queue is not None:
            lines.append(f"    max_queue: {max_queue}")
        if keepalive:
            lines.append(f"    keepalive: {keepalive}")
    lines += ["routes:", f"  - to: [{', '.join(sinks)}]", ""]
    path = directory / f"{name}.yaml"
    path.write_text("\n".join(lines))
    return path


class KoppelProcess:
    """``koppel run`` as a child process, read through its JSON log.

    One harness for every test and script that runs the engine, so each does not grow its own.
    ``port`` is the first channel's bound port and ``ports`` every channel's (from the
    ``listener.started`` lines of the current run); ``events`` counts log events over all runs.
    ``args`` go on the command line after the defaults; ``env`` replaces the environment.
    The log is kept in memory, the last ``history`` lines (None: all of it, for tests that
    search the whole output), so a test waits on a log line instead of sleeping.
    """

    def __init__(self, channels: Path, store_url: str, *, log_level: str = "info", workdir: Path | None = None,
                 metrics: str = "off", admin: str = "off", args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, history: int | None = 5000):
        self.channels = channels
        self.store_url = store_url
        self.log_level = log_level
        self.workdir = workdir or channels.parent
        self.metrics = metrics
        self.admin = admin
        self.args = tuple(args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.ports: dict[str, int] = {}
        self.lines: deque[str] = deque(maxlen=history)
        self.events: dict[str, int] = {}
        self._logged: deque[tuple[int, dict]] = deque(maxlen=history)  # (line number, event)
        self._count = 0  # lines read, all runs
        self._run_start = 0  # line number where the current run's output begins
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._bound = threading.Event()

    def launch(self) -> subprocess.Popen:
        """Start the process without waiting for it (for a test that expects it to refuse)."""
        mappings = self.workdir / "mappings"
        mappings.mkdir(exist_ok=True)
        self._drained()
        self._bound.clear()
        self.port = None
        self.ports = {}
        with self._lock:
            self._run_start = self._count
        self.proc = subprocess.Popen(
            [str(KOPPEL), "run", "--channels", str(self.channels), "--mappings", str(mappings),
             "--store", self.store_url, "--metrics", self.metrics, "--admin", self.admin,
             "--log-level", self.log_level, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self.proc

    def start(self, timeout: float = 20.0, *, until: str = "listener.started") -> int | None:
        """Launch and wait for the log event ``until``; ``engine.started`` waits for every listener."""
        self.launch()
        self.wait_for(until, timeout=timeout)
        return self.port

    def _read(self, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                event = None
            name = event.get("event", "") if event else None
            with self._lock:  # port and ports first: whoever sees the event sees them set
                if name == "listener.started" and proc is self.proc:
                    port = int(event["port"])
                    self.ports[event.get("channel")] = port
                    if self.port is None:
                        self.port = port
                if name is not None:
                    self.events[name] = self.events.get(name, 0) + 1
                    self._logged.append((self._count, event))
                self.lines.append(line)
                self._count += 1
            if name == "listener.started" and proc is self.proc:
                self._bound.set()

    # -- reading the log ----------------------------------------------------------------
    def mark(self) -> int:
        """A place in the log; ``logged(after=mark)`` and ``wait_for(after=mark)`` look past it."""
        with self._lock:
            return self._count

    def logged(self, after: int | None = None) -> list[dict]:
        """The JSON log events after ``after`` (default: since the current run started)."""
        after = self._run_start if after is None else after
        with self._lock:
            return [event for number, event in self._logged if number >= after]

    def wait_for(self, match, *, after: int | None = None, timeout: float = 20.0) -> dict:
        """The first log event (after ``after``) named ``match`` or for which ``match(event)`` holds.

        Gives up at once if the process exits, so a refused start fails with its output, not a timeout.
        """
        test = (lambda event: event.get("event") == match) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        while True:
            alive = self.alive()
            if not alive:
                self._drained()  # its last lines may still be in the pipe
            for event in self.logged(after):
                if test(event):
                    return event
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"koppel run did not log {match!r} within {timeout}s "
                           f"(exit code {self.proc.returncode}):\n{self.tail(30)}")

    def output(self) -> str:
        """Every line kept, every run, stdout and stderr together."""
        with self._lock:
            return "\n".join(self.lines)

    def tail(self, n: int = 30) -> str:
        with self._lock:
            return "\n".join(list(self.lines)[-n:])

    def query(self, sql: str, params=()) -> list[tuple]:
        """Rows from the SQLite store, opened read-only beside the running engine."""
        import sqlite3

        from engine.store.sqlite import parse_sqlite_url

        path = (self.workdir / parse_sqlite_url(self.store_url).path).resolve()
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    # -- the process ----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 15.0) -> int:
        """The exit code, once the process ended and everything it wrote has been read."""
        code = self.proc.wait(timeout)
        self._drained()
        return code

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._drained()

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait for the graceful stop; SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._drained()
        return self.proc.returncode

    def _drained(self) -> None:
        """Let the reader finish the dead process's output, so no line of it lands in the next run."""
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)

    def rss_kib(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, TypeError):
            return None
        return None


def read_ack_code(answer: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK frame; ("", "") if there is no MSA."""
    for segment in answer.strip(SB + EB + CR).split(CR):
        if segment.startswith(b"MSA"):
            fields = segment.split(segment[3:4]) if len(segment) > 3 else []
            code = fields[1].decode("ascii", "replace") if len(fields) > 1 else ""
            cid = fields[2].decode("ascii", "replace") if len(fields) > 2 else ""
            return code, cid
    return "", ""


class NoAck(ConnectionError):
    """The engine closed the connection before it answered."""


class MLLPClient:
    """A blocking MLLP source: one connection, one message in flight (as MLLP senders work).

    Plain sockets, like the sink, so the client that judges Koppel shares no code with it.
    ``source`` binds the local address: 127.0.0.2 is loopback too, but outside an allow-list
    of 127.0.0.1/32.
    """

    def __init__(self, port: int, *, timeout: float = 10.0, source: str | None = None) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def request(self, payload: bytes) -> bytes:
        """Send one frame; the answer without its framing. ``NoAck`` if the connection closes first."""
        self.sock.sendall(frame(payload))
        while EB + CR not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise NoAck("closed before the ACK")
            self.buffer += chunk
        answer, _, self.buffer = self.buffer.partition(EB + CR)
        return answer[answer.find(SB) + 1 :]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "MLLPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Load:
    """N connections, each sending unique messages one at a time until stopped or cut off.

    For the tests that stop the engine under load (kill -9, SIGTERM, SIGINT) and then look in
    the store. Control ids are ``{tag}C{connection}N{seq}`` (so ``tag`` holds no "N").
    ``acked``: answered AA with MSA-2 = MSH-10; ``wrong``: any other answer
    (control id, MSA-1, MSA-2); ``in_flight``: per connection, the (control id, payload)
    sent but not answered when the connection ended, which a real sender would resend.
    ``message`` builds the payload from a control id.
    """

    def __init__(self, port: int, *, connections: int, tag: str, message=make_message,
                 timeout: float = 10.0) -> None:
        self.port = port
        self.tag = tag
        self.message = message
        self.timeout = timeout
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[str] = []
        self.in_flight: dict[int, tuple[str, bytes]] = {}
        self.wrong: list[tuple[str, str, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(connections)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        try:
            client = MLLPClient(self.port, timeout=self.timeout)
        except OSError:
            return
        seq = 0
        try:
            while not self.stop.is_set():
                control_id = f"{self.tag}C{n}N{seq:06d}"
                payload = self.message(control_id)
                with self.lock:
                    self.in_flight[n] = (control_id, payload)
                try:
                    answer = client.request(payload)
                except OSError:  # reset, EOF or timeout: the engine is gone, the message stays in flight
                    return
                code, answered = read_ack_code(answer)
                with self.lock:
                    del self.in_flight[n]
                    if (code, answered) == ("AA", control_id):
                        self.acked.append(control_id)
                    else:
                        self.wrong.append((control_id, code, answered))
                seq += 1
        finally:
            client.close()

    def wait_for_acks(self, count: int, timeout: float) -> None:
        """Poll until ``count`` messages are ACKed or ``timeout`` passes (a huge count: load for that long)."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def join(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a load connection hung"


@dataclass(slots=True)
class SentRecord:
    control_id: str
    connection: int
    first_sent: float  # time.monotonic() of the first attempt
    acked_at: float | None = None
    attempts: int = 0


class ResendingSource:
    """One blocking MLLP connection that sends its messages in order and resends until AA.

    Like a real sender when the engine dies: on a lost connection or a timeout it reconnects
    (to whatever port ``port_of()`` says now) and sends the same message again.
    """

    def __init__(self, number: int, control_ids: list[str], port_of, *, timeout: float = 10.0,
                 stop: threading.Event | None = None, interval: float | None = None) -> None:
        self.number = number
        self.interval = interval  # seconds between first sends (pacing); None: as fast as ACKs come
        self.control_ids = control_ids
        self.port_of = port_of
        self.timeout = timeout
        self.stop = stop or threading.Event()
        self.records: list[SentRecord] = []
        self.reconnects = 0
        self.naks = 0
        self.error: BaseException | None = None
        self._sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"source{number}")

    def start(self) -> "ResendingSource":
        self.thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _connect(self) -> socket.socket:
        while not self.stop.is_set():
            port = self.port_of()
            if port:
                try:
                    sock = socket.create_connection((HOST, port), timeout=2)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.settimeout(self.timeout)
                    return sock
                except OSError:
                    pass
            time.sleep(0.05)
        raise InterruptedError("stopped")

    def _exchange(self, payload: bytes) -> bytes:
        if self._sock is None:
            self._sock = self._connect()
        self._sock.sendall(payload)
        buffer = b""
        while True:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the ACK")
            buffer += data
            end = buffer.find(EB + CR)
            if end >= 0:
                return buffer[: end + 2]

    def _drop(self) -> None:
        if self._sock is not None:
            _cut(self._sock)
            self._sock = None
            self.reconnects += 1

    def _run(self) -> None:
        next_at = time.monotonic()
        try:
            for cid in self.control_ids:
                if self.interval:
                    pause = next_at - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    next_at += self.interval
                record = SentRecord(cid, self.number, time.monotonic())
                payload = frame(make_message(cid))
                while True:
                    if self.stop.is_set():
                        return
                    record.attempts += 1
                    try:
                        answer = self._exchange(payload)
                    except OSError:
                        self._drop()
                        continue
                    code, echoed = read_ack_code(answer)
                    if code in SUCCESS and echoed == cid:
                        record.acked_at = time.monotonic()
                        self.records.append(record)
                        break
                    self.naks += 1  # AE (store busy, queue full) or mismatch: try again shortly
                    if echoed != cid:
                        self._drop()
                    time.sleep(0.05)
        except InterruptedError:
            return
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            self.error = error
        finally:
            if self._sock is not None:
                _cut(self._sock)


def check_order(first_delivery: list[str], sent: dict[str, SentRecord]) -> list[str]:
    """Problems with ``first_delivery`` against what the sources saw; empty when all is well.

    Two rules, both implied by "ACK after commit" + FIFO queues:
    * per source connection, first deliveries follow send order;
    * if A's ACK reached its source before B was first sent (on any connection), A is
      delivered before B.
    """
    problems = []
    position = {cid: i for i, cid in enumerate(first_delivery)}
    by_connection: dict[int, list[SentRecord]] = {}
    for record in sent.values():
        by_connection.setdefault(record.connection, []).append(record)
    for connection, records in by_connection.items():
        records.sort(key=lambda r: r.first_sent)
        positions = [position[r.control_id] for r in records if r.control_id in position]
        inversions = sum(1 for a, b in zip(positions, positions[1:]) if b < a)
        if inversions:
            problems.append(f"connection {connection}: {inversions} out-of-order first deliveries")
    # Walk the delivery order backwards keeping the earliest ACK time among later deliveries.
    earliest_later_ack = float("inf")
    later_id = None
    violations = 0
    example = None
    for cid in reversed(first_delivery):
        record = sent.get(cid)
        if record is None:
            continue
        if earliest_later_ack < record.first_sent:
            violations += 1
            example = example or (later_id, cid)
        if record.acked_at is not None and record.acked_at < earliest_later_ack:
            earliest_later_ack, later_id = record.acked_at, cid
    if violations:
        problems.append(f"{violations} deliveries precede a message ACKed before they were sent, e.g. {example}")
    return problems


class SinkProcess:
    """A Sink in a process of its own (``python tests/sink.py --no-raw``), for benchmarks: its
    threads then never compete for the GIL with the load generator or the harness, which made
    an in-process sink the slow half of every engine-sink round trip. The read side mirrors
    Sink's (stats on request over a pipe)."""

    def __init__(self, port: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--no-raw", "--port", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline().split()[1])

    def _ask(self, command: str) -> dict | list:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stats(self) -> dict:
        return self._ask("stats")  # type: ignore[return-value]

    def delivered_count(self) -> int:
        return self.stats()["delivered"]

    def duplicates(self) -> int:
        return self.stats()["duplicates"]

    def delivered_ids(self) -> list[str]:
        return self._ask("ids")  # type: ignore[return-value]

    def first_last_delivery(self) -> tuple[float, float] | None:
        stats = self.stats()
        return None if stats["first"] is None else (stats["first"], stats["last"])

    def wait_until(self, predicate, timeout: float, every: float = 0.02) -> bool:
        return Sink.wait_until(self, predicate, timeout, every)  # type: ignore[arg-type]

    def up(self) -> None:
        self._ask("up")

    def down(self) -> None:
        """Stop listening and cut connections; the process stays (``close()`` ends it)."""
        self._ask("down")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
            self.proc.wait(10)


def _command_loop(sink: Sink) -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        if command == "down":
            sink.down()
        elif command == "up":
            sink.up()
        elif command == "nak":
            sink.nak_next(args[0], int(args[1]) if len(args) > 1 else 1)
        elif command == "delay":
            sink.delay = float(args[0])
        elif command == "drop":
            sink.drop_next(int(args[0]) if args else 1)
        elif command == "stats":
            pass
        elif command == "ids":
            print(json.dumps(sink.delivered_ids()), flush=True)
            continue
        elif command == "quit":
            break
        else:
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
            continue
        print(json.dumps({"ok": command, **sink.stats()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--no-raw", action="store_true", help="do not keep message bytes (long runs)")
    args = parser.parse_args(argv)
    sink = Sink(args.port, keep_raw=not args.no_raw).start()
    sink.delay = args.delay
    print(f"port {sink.port}", flush=True)
    try:
        _command_loop(sink)
    except KeyboardInterrupt:
        pass
    finally:
        sink.down()
        print(json.dumps(sink.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
