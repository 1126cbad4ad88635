"""Mapping benchmark (issue 4 targets: mapping >= 5,000 msg/s on one core for SRM^S01 and
ORM^O01; full path with mapping >= 3,000 msg/s on 8 connections).

(a) mapping on one core (this process pinned to one CPU): per message read_header +
    Message.parse + Mapping.apply + agenda decide (a new entry) + build_outbound, with the
    bundled mappings and agendas. N messages per type, each with its own ZD-number and
    MSH-10, best of 3 runs; also the time per step.
(b) full path: ``koppel run`` with one channel that maps SRM^S01 (bundled zorgdomein-srm) into
    the agendas and delivers the SIU^S12 it builds to a sink (tests/sink.py, in its own
    process). 8 connections (threads with blocking sockets, one message in flight each, every
    ACK checked: AA and MSA-2 = MSH-10), every message with its own ZD-number (ARQ-1, PID-3)
    and MSH-10. Prints, from the first send:
      inbound   N / time until the last ACK,
      mapped    N / time until the store's processing_counts() shows every message processed,
      delivered N / time until the sink has AA'd N SIU^S12 (its own clock: CLOCK_MONOTONIC).

Usage: .venv/bin/python tests/benchmarks/mapping_bench.py [--only map|full] [--messages 5000]
       [--full-messages 10000] [--connections 8] [--synchronous FULL|NORMAL] [--profile FILE] [--split]
``--profile FILE`` records the engine with py-spy (``-f raw``) during the measured full run.
``--split`` runs (b) as two processes on the store: ``--role receive`` (listener, mapping) and
``--role deliver`` (the SIU^S12 queue); RSS and the profile are the receiving process's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from calibrate import describe  # noqa: E402
from sink import KOPPEL, ROOT, KoppelProcess, SinkProcess  # noqa: E402

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
BSN = "123456782"  # the test BSN


# ------------------------------------------------------------------------------- messages
def srm(number: int) -> bytes:
    """A synthetic ZorgDomein SRM^S01 (cardiology) with its own ZD-number and MSH-10."""
    zd = f"ZD{800000000 + number:09d}"
    return (
        f"MSH|^~\\&|ZorgDomein||KOPPEL|ZIEKENHUIS|20261123120000+0100||SRM^S01^SRM_S01|S{number:09d}|P|2.4"
        "|||||NLD|8859/1\r"
        f"ARQ|{zd}|||||CARHAR^Cardiologie / Hartfalen^99zda|CARREG001^consult cardioloog^99zda|REG^regulier^99zda"
        "|||20261201^20261231|R|||01000001^Testarts^T.^^^^^^VEKTIS|010-5550000^^PH\r"
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{zd}^^^ZorgDomein^VN||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F"
        "|||Teststraat 1&Teststraat&1^^Koppelstad^^1234AB^NL^M||010-5550001^PRN^PH~06-55500002^ORN^CP\r"
        "RGS|1|U\r"
        "AIS|1|U|^consult cardioloog||0|m|||No||^synthetische opmerking\r"
        "AIG|1|U|CAR^Cardiologie^99zda\r"
        "AIL|1|U|^^^06990001&Ziekenhuis Koppelstad\r"
        "AIP|1|U|^Testdokter^T.\r"
    ).encode("latin-1")


def orm(number: int) -> bytes:
    """A synthetic ZorgDomein ORM^O01 (radiology echo, 2.4) with its own ZD-number and MSH-10."""
    zd = f"ZD{700000000 + number:09d}"
    return (
        f"MSH|^~\\&|ZorgDomein||OrderModule||20261123121000+0100||ORM^O01^ORM_O01|O{number:09d}|P|2.4"
        "|||||NLD|8859/1\r"
        "NTE|1||Radiologie|ZD_CLUSTER_NAME\r"
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{zd}^^^ZorgDomein^VN||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F"
        "|||Teststraat 1&Teststraat&1^^Koppelstad^^1234AB^NL^M||010-5550001^PRN^PH\r"
        "PV1|1|O\r"
        "PV2|||BEEEDG008^Echo test^99zda\r"
        "IN1|1|^null|0^^^LOCAL|Testverzekeraar||||||||||||||||||||||||||||||||7000000000\r"
        f"ORC|NW|{zd}||{zd}|||^^^^^R||20261123121000+0100|01000001^Testarts, T.^T.^^^^^^vektis\r"
        f"OBR|1|{zd}||ECHOXU^Echo test^99zdl|||||||O|||||01000002^Testspecialist^M.^^^^^^VEKTIS\r"
        "OBX|1|ST|REDE^Reden van aanvraag^99zda||synthetische vraag\\.br\\tweede regel||||||F\r"
        "OBX|2|ST|ANAM^Anamnese^99zda||synthetische anamnese||||||F\r"
        f"ORC|NW|{zd}||{zd}|||^^^^^R||20261123121000+0100|01000001^Testarts, T.^T.^^^^^^vektis\r"
        f"OBR|2|{zd}||TIJD^TIJD^99zdl|||||||O\r"
    ).encode("latin-1")


# ------------------------------------------------------------------------------- (a) mapping
def bench_mapping(count: int, runs: int = 3) -> None:
    from engine.bundle import load_bundle
    from engine.core import agenda as ag
    from engine.core.header import read_header
    from engine.core.hl7message import Message
    from engine.mapping import build_outbound

    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        pinned = f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        pinned = "not pinned"
    bundle = load_bundle(ROOT / "channels", ROOT / "mappings")
    book = bundle.book
    from engine.core.convert import hospital_zone

    now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=hospital_zone())  # as the engine's clock gives it
    print(f"(a) mapping on one core ({pinned}), N={count} per type, best of {runs}")
    for label, make, name in (("SRM^S01", srm, "zorgdomein-srm"), ("ORM^O01", orm, "zorgdomein-orm")):
        mapping = bundle.mappings.mapping(name)
        messages = [make(i) for i in range(count)]
        # correctness once, outside the timing: every message maps to a Create and one outbound
        for i, raw in enumerate(messages[:50]):
            header = read_header(raw, default_charset="8859/1")
            result = mapping.apply(Message.parse(raw, codec=header.codec))
            assert result.ok, result.errors
            decision = ag.decide(result.event, None, now=now, message_id=str(i), book=book)
            assert isinstance(decision, ag.Create), decision
            assert len(build_outbound(mapping, result.event, decision.entry, control_id="K1", timestamp=now)) == 1
        best = None
        steps_best = None
        for _ in range(runs):
            steps = [0.0] * 5
            clock = time.perf_counter
            started = clock()
            for i, raw in enumerate(messages):
                t0 = clock()
                header = read_header(raw, default_charset="8859/1")
                t1 = clock()
                message = Message.parse(raw, codec=header.codec)
                t2 = clock()
                result = mapping.apply(message)
                t3 = clock()
                decision = ag.decide(result.event, None, now=now, message_id=str(i), book=book)
                t4 = clock()
                build_outbound(mapping, result.event, decision.entry, control_id=f"K{i}", timestamp=now)
                t5 = clock()
                steps[0] += t1 - t0
                steps[1] += t2 - t1
                steps[2] += t3 - t2
                steps[3] += t4 - t3
                steps[4] += t5 - t4
            elapsed = clock() - started
            if best is None or elapsed < best:
                best, steps_best = elapsed, steps
        per = [s / count * 1e6 for s in steps_best]
        print(f"  {label}: {count / best:,.0f} msg/s ({best / count * 1e6:.1f} us/msg; "
              f"read_header {per[0]:.1f}, parse {per[1]:.1f}, apply {per[2]:.1f}, decide {per[3]:.1f}, "
              f"build_outbound {per[4]:.1f} us)")


# ------------------------------------------------------------------------------- (b) full path
CHANNEL = """\
name: bench-in
source:
  listen: tcp:0:interface=127.0.0.1
  allow: [127.0.0.1/32]
  max_connections: 64
accept:
  types: [SRM^S01, SRM^S04]
destinations:
  his-scheduling:
    endpoint: tcp:host=127.0.0.1:port={port}
    ack_timeout: 10s
    retry: {{initial: 100ms, factor: 2, max: 500ms, jitter: 0.1}}
routes:
  - when: {{types: [SRM^S01, SRM^S04]}}
    map: zorgdomein-srm
"""


class Engine(KoppelProcess):
    """``koppel run`` with --mappings, metrics and admin off."""

    def start(self, timeout: float = 20.0) -> int:
        self.proc = subprocess.Popen(
            [str(KOPPEL), "run", "--channels", str(self.channels), "--mappings", str(self.workdir / "mappings"),
             "--store", self.store_url, "--metrics", "off", "--admin", "off", "--log-level", self.log_level],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._bound.wait(timeout):
            tail = self.tail(20)
            self.kill()
            raise RuntimeError(f"koppel run did not start:\n{tail}")
        return self.port


class Client(threading.Thread):
    """One connection, one message in flight; checks AA and MSA-2 for every message."""

    def __init__(self, port: int, messages: list[tuple[str, bytes]], start_gate: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = messages
        self.gate = start_gate
        self.errors: list[str] = []
        self.done_at: float | None = None

    def run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.gate.wait()
        buffer = b""
        try:
            for cid, payload in self.messages:
                sock.sendall(payload)
                while (end := buffer.find(EB + CR)) < 0:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed before the ACK")
                    buffer += data
                answer, buffer = buffer[: end + 2], buffer[end + 2:]
                msa = answer[answer.find(b"MSA|"):].split(CR, 1)[0].split(b"|")
                code = msa[1].decode() if len(msa) > 1 else "?"
                echoed = msa[2].split(EB, 1)[0].decode() if len(msa) > 2 else ""
                if code != "AA" or echoed != cid:
                    self.errors.append(f"{cid}: {code} {echoed}")
        except OSError as error:
            self.errors.append(f"{error.__class__.__name__}")
        finally:
            self.done_at = time.monotonic()
            sock.close()


def drive(port: int, first: int, count: int, connections: int) -> tuple[float, float, list[str]]:
    """Send srm(first..first+count) over ``connections``; (start, last ACK, errors)."""
    per: list[list[tuple[str, bytes]]] = [[] for _ in range(connections)]
    for n in range(first, first + count):
        raw = srm(n)
        per[n % connections].append((f"S{n:09d}", SB + raw + EB + CR))
    gate = threading.Event()
    clients = [Client(port, messages, gate) for messages in per]
    for c in clients:
        c.start()
    time.sleep(0.2)  # let every connection be accepted
    started = time.monotonic()
    gate.set()
    for c in clients:
        c.join()
    return started, max(c.done_at for c in clients), [e for c in clients for e in c.errors]


def wait_processed(store, total: int, timeout: float) -> tuple[float, dict]:
    deadline = time.monotonic() + timeout
    while True:
        counts = store.processing_counts()
        if sum(n for outcome, n in counts.items() if outcome != "pending") >= total or time.monotonic() > deadline:
            return time.monotonic(), counts
        time.sleep(0.005)


def wait_delivered(sink: SinkProcess, total: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = sink.stats()
        if status["delivered"] >= total or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def bench_full(count: int, connections: int, synchronous: str | None, profile: str | None,
               warmup: int = 500, split: bool = False) -> None:
    from engine.store import open_store

    workdir = Path(tempfile.mkdtemp(prefix="koppel-mapbench-"))
    sink = SinkProcess()
    engine = None
    deliverer = None
    spy = None
    try:
        (workdir / "channels").mkdir()
        (workdir / "channels" / "bench-in.yaml").write_text(CHANNEL.format(port=sink.port))
        shutil.copytree(ROOT / "mappings", workdir / "mappings")
        url = f"sqlite:///{workdir / 'koppel.db'}" + (f"?synchronous={synchronous}" if synchronous else "")
        if split:
            deliverer = KoppelProcess(workdir / "channels", url, workdir=workdir, args=("--role", "deliver"))
            deliverer.start(until="engine.started")
            engine = KoppelProcess(workdir / "channels", url, workdir=workdir, args=("--role", "receive"))
        else:
            engine = Engine(workdir / "channels", url, workdir=workdir, log_level="info")
        port = engine.start()
        store = open_store(url)
        # warm-up (imports, caches, the first connection to the sink)
        _, _, errors = drive(port, 0, warmup, connections)
        assert not errors, errors[:5]
        wait_processed(store, warmup, 60)
        wait_delivered(sink, warmup, 60)
        if profile:
            spy = subprocess.Popen([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-f", "raw", "-o", profile,
                                    "-r", "200", "-p", str(engine.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
        started, last_ack, errors = drive(port, warmup, count, connections)
        mapped_at, counts = wait_processed(store, warmup + count, 120)
        status = wait_delivered(sink, warmup + count, 120)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        delivered = status["delivered"] - warmup
        inbound = count / (last_ack - started)
        mapped = count / (mapped_at - started)
        sent = count / (status["last"] - started)
        mode = (synchronous or "FULL") + (", split: --role receive + --role deliver" if split else "")
        print(f"(b) full path: koppel run (store {mode}), SRM^S01 -> zorgdomein-srm -> agenda + SIU^S12 -> sink, "
              f"{connections} connections, N={count} (after {warmup} warm-up)")
        print(f"  inbound   {inbound:,.0f} msg/s  (last ACK after {last_ack - started:.2f} s; ACK errors: "
              f"{len(errors)}{' e.g. ' + errors[0] if errors else ''})")
        print(f"  mapped    {mapped:,.0f} msg/s  (all processed after {mapped_at - started:.2f} s; "
              f"processing counts {counts})")
        print(f"  delivered {sent:,.0f} msg/s  (last SIU^S12 AA'd after {status['last'] - started:.2f} s; "
              f"{delivered} delivered, {status['duplicates']} duplicates)")
        print(f"  engine max RSS {engine_rss(engine)}")
        entries = store.agenda_counts()
        print(f"  agenda entries {dict((f'{a}/{s}', n) for (a, s), n in entries.items())}")
        store.close()
        if profile:
            print(f"  py-spy raw profile: {profile}" + ("" if spy is None or spy.returncode == 0 else
                                                       f" (py-spy exit {spy.returncode}: "
                                                       f"{spy.stderr.read().decode()[-300:]})"))
    finally:
        for process in (engine, deliverer):
            if process is not None:
                process.terminate()
        sink.close()
        shutil.rmtree(workdir, ignore_errors=True)


def engine_rss(engine: KoppelProcess) -> str:
    try:
        with open(f"/proc/{engine.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return f"{int(line.split()[1]) / 1024:.0f} MiB"
    except OSError:
        pass
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["map", "full"])
    parser.add_argument("--messages", type=int, default=5000, help="(a) messages per type (default 5000)")
    parser.add_argument("--full-messages", type=int, default=10000, help="(b) messages (default 10000)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default=None)
    parser.add_argument("--profile", metavar="FILE", help="(b) py-spy raw profile of the engine")
    parser.add_argument("--split", action="store_true", help="(b) receive and deliver in two processes")
    args = parser.parse_args()
    print(describe(), flush=True)
    if args.only in (None, "map"):
        # in a child pinned to one core, so the full run below is not pinned
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import mapping_bench; "
                f"mapping_bench.bench_mapping({args.messages})")
        done = subprocess.run([sys.executable, "-c", code])
        if done.returncode:
            return done.returncode
    if args.only in (None, "full"):
        bench_full(args.full_messages, args.connections, args.synchronous, args.profile, split=args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
