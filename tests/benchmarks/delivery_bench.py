"""Delivery benchmark: end-to-end throughput and backlog drain (issue 3 targets: >= 5,000 msg/s each,
RSS < 150 MB and flat during the drain).

(a) end to end: ``koppel bench`` (8 inbound connections) -> ``koppel run`` -> one ordered
    destination (tests/sink.py, in a process of its own: ``SinkProcess``). Prints the inbound msg/s (ACKs to the bench client) and the
    delivered msg/s measured at the sink (first to last message received).
(b) backlog drain: 100,000 messages queued for a destination, then the engine started with the
    sink up. Fast path (default): the messages are written straight into the store with
    ``Append`` ops in batches of 1,000 before the engine starts (what the listener would have
    committed with the sink down). ``--backlog-via-engine`` queues them through the engine
    instead, with the sink down, then brings the sink up. Prints drain msg/s and the engine's
    RSS (VmRSS sampled every 0.5 s): start, max, end.

``--split`` runs (a) as two processes on the store: ``koppel run --role receive`` (the listener)
and ``koppel run --role deliver`` (the queue).

Usage: .venv/bin/python tests/benchmarks/delivery_bench.py [--only e2e|drain]
       [--e2e-messages 50000] [--backlog 100000] [--backlog-via-engine] [--synchronous FULL|NORMAL]
       [--split]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from calibrate import describe  # noqa: E402
from sink import KOPPEL, KoppelProcess, SinkProcess, make_message, write_channel  # noqa: E402

from engine.store import Append, QueueTarget, ReceivedMessage, open_store  # noqa: E402

DEST = "bench-sink"


def store_url(workdir: Path, synchronous: str | None) -> str:
    url = f"sqlite:///{workdir / 'koppel.db'}"
    return url + (f"?synchronous={synchronous}" if synchronous else "")


class RssSampler:
    """VmRSS of one pid every ``interval`` seconds, in a thread."""

    def __init__(self, engine: KoppelProcess, interval: float = 0.5) -> None:
        self.engine = engine
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            kib = self.engine.rss_kib()
            if kib is not None:
                self.samples.append((time.monotonic() - started, kib))
            self._stop.wait(self.interval)

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        values = [kib for _, kib in self.samples]
        return (f"start {values[0] / 1024:.1f} MiB, max {max(values) / 1024:.1f} MiB, "
                f"end {values[-1] / 1024:.1f} MiB ({len(values)} samples every {self.interval}s)")


def wait_count(sink: SinkProcess, count: int, timeout: float) -> bool:
    return sink.wait_until(lambda s: s.delivered_count() >= count, timeout)


def run_e2e(args, workdir: Path) -> None:
    sink = SinkProcess()
    url = store_url(workdir, args.synchronous)
    write_channel(workdir / "channels", {DEST: sink.port}, name="bench-in")
    deliverer = None
    if args.split:
        deliverer = KoppelProcess(workdir / "channels", url, args=("--role", "deliver"))
        deliverer.start(until="engine.started")
    engine = KoppelProcess(workdir / "channels", url, args=("--role", "receive") if args.split else ())
    port = engine.start()
    try:
        command = [str(KOPPEL), "bench", "--to", f"127.0.0.1:{port}", "--connections", str(args.connections),
                   "--messages", str(args.e2e_messages), "--json"]
        how = "koppel run --role receive + koppel run --role deliver" if args.split else "koppel run"
        print("(a) end to end:", " ".join(command[1:]), f"-> {how} -> 1 sink (store {url})", flush=True)
        done = subprocess.run(command, capture_output=True, timeout=900)
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        complete = wait_count(sink, result["messages"], 600)
        first, last = sink.first_last_delivery()
        delivered = sink.delivered_count()
        rate = (delivered - 1) / (last - first) if last > first else float("nan")
        print(f"    inbound: {result['messages']} msgs in {result['seconds']}s = {result['msg_per_s']} msg/s "
              f"(ACK p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; nak {result['nak']}, "
              f"mismatch {result['mismatch']}, errors {result['error']})")
        print(f"    delivered at the sink: {delivered} msgs in {last - first:.2f}s = {rate:.0f} msg/s "
              f"(first to last received; all delivered: {complete}; duplicates {sink.duplicates()})", flush=True)
    finally:
        engine.terminate()
        if deliverer is not None:
            deliverer.terminate()
        sink.close()


def fill_store(url: str, queue: str, count: int, batch: int = 1000) -> float:
    """Append ``count`` accepted messages queued for DEST, ``batch`` per transaction; returns seconds."""
    store = open_store(url)
    started = time.monotonic()
    try:
        now = time.time()
        for base in range(0, count, batch):
            ops = []
            for n in range(base, min(count, base + batch)):
                cid = f"D{n:07d}"
                raw = make_message(cid)
                ops.append(Append(message=ReceivedMessage(
                    channel="bench-in", peer="127.0.0.1:0", received_at=now, control_id=cid,
                    sender="ZorgDomein", message_type="SRM^S01", structure="SRM_S01", version="2.4",
                    processing_id="P", charset="8859/1", raw=raw, payload_hash=hashlib.sha256(raw).digest(),
                    status="accepted", ack_code="AA", ack=b"MSA|AA|" + cid.encode(), error=None,
                    duplicate_window=0.0, targets=(QueueTarget(queue=queue, destination=DEST),),
                )))
            store.write(ops)
    finally:
        store.close()
    return time.monotonic() - started


def run_drain(args, workdir: Path) -> None:
    sink = SinkProcess()
    queue = f"127.0.0.1:{sink.port}"
    url = store_url(workdir, args.synchronous)
    write_channel(workdir / "channels", {DEST: sink.port}, name="bench-in",
                  retry="{initial: 100ms, factor: 2, max: 1s, jitter: 0.1}")
    engine = KoppelProcess(workdir / "channels", url)
    print(f"(b) backlog drain of {args.backlog} messages, 1 ordered destination (store {url})", flush=True)
    if args.backlog_via_engine:
        sink.down()
        port = engine.start()
        command = [str(KOPPEL), "bench", "--to", f"127.0.0.1:{port}", "--connections", str(args.connections),
                   "--messages", str(args.backlog), "--json"]
        done = subprocess.run(command, capture_output=True, timeout=1800)
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        print(f"    queued through the engine with the sink down: {result['messages']} msgs at "
              f"{result['msg_per_s']} msg/s ({' '.join(command[1:])})", flush=True)
        sampler = RssSampler(engine).start()
        started = time.monotonic()
        sink.up()
    else:
        seconds = fill_store(url, queue, args.backlog)
        print(f"    fast path: wrote {args.backlog} messages straight into the store with Append ops, "
              f"1000 per transaction, in {seconds:.1f}s (engine not running)", flush=True)
        started = time.monotonic()
        engine.start()
        sampler = RssSampler(engine).start()
    try:
        complete = wait_count(sink, args.backlog, 1800)
        drained = time.monotonic() - started
        sampler.stop()
        first, last = sink.first_last_delivery()
        delivered = sink.delivered_count()
        print(f"    drained {delivered} msgs in {drained:.2f}s from "
              f"{'sink up' if args.backlog_via_engine else 'engine start'} = {delivered / drained:.0f} msg/s; "
              f"at the sink first to last {last - first:.2f}s = {(delivered - 1) / (last - first):.0f} msg/s "
              f"(complete: {complete}, duplicates {sink.duplicates()}, in order: "
              f"{sink.delivered_ids() == sorted(sink.delivered_ids())})")
        print(f"    engine RSS: {sampler.summary()}")
        if args.rss_trace:
            print("    RSS trace (s, MiB): " + " ".join(f"{t:.1f}:{k / 1024:.0f}" for t, k in sampler.samples))
    finally:
        sampler.stop()
        engine.terminate()
        sink.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["e2e", "drain"], default=None)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--e2e-messages", type=int, default=50_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--backlog-via-engine", action="store_true")
    parser.add_argument("--synchronous", default=None, help="store synchronous= (default: the store's default)")
    parser.add_argument("--split", action="store_true", help="(a) receive and deliver in two processes")
    parser.add_argument("--rss-trace", action="store_true", help="print every RSS sample")
    args = parser.parse_args()
    print(describe(), flush=True)
    for name, run in (("e2e", run_e2e), ("drain", run_drain)):
        if args.only in (None, name):
            workdir = Path(tempfile.mkdtemp(prefix=f"koppel-bench-{name}-"))
            try:
                run(args, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
