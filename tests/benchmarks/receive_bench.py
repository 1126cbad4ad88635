"""Receive-path benchmark: prints the README table (a script, not a test).

For each server (Koppel with the store at synchronous=FULL and NORMAL, a bare
Twisted MLLP echo as the ceiling, python-hl7's asyncio MLLP server as the peer
baseline) it runs ``koppel bench`` with the 2.6 KB referral over 1 and 8
connections, then a paced run at 1,000 msg/s for the p99, and samples the
server's RSS. For Koppel it also reads the store's commit count and time from /metrics
during the 8-connection run, and times one fdatasync on the store's disk, to show where the
time goes. Usage:
python tests/benchmarks/receive_bench.py [--messages N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from calibrate import describe

HERE = Path(__file__).resolve().parent
REFERRAL = HERE / "referral_2k6.hl7"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float = 15.0) -> None:
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not come up")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], False

    def run(self) -> None:
        while not self.stop:
            self.samples.append(rss_mb(self.pid))
            time.sleep(0.2)


def commit_stats(metrics_port: int | None) -> tuple[float, float, float]:
    """(commits, seconds inside them, messages in them) so far, from the engine's /metrics."""
    if metrics_port is None:
        return (0.0, 0.0, 0.0)
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("koppel_store_commit_seconds_count", "koppel_store_commit_seconds_sum", "koppel_store_commit_batch_size_sum"):
            values[name] = float(value)
    return (values["koppel_store_commit_seconds_count"], values["koppel_store_commit_seconds_sum"],
            values["koppel_store_commit_batch_size_sum"])


def fsync_cost(directory: Path, rounds: int = 300) -> tuple[float, float]:
    """(wall us, CPU us) of one fdatasync after overwriting 40 KB, about a FULL commit's log
    write: the floor under every commit at synchronous=FULL on this disk."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        block = b"x" * 40_000
        os.pwrite(fd, block * 10, 0)
        os.fsync(fd)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(rounds):
            os.pwrite(fd, block, (i % 10) * 40_000)
            os.fdatasync(fd)
        return (1e6 * (time.perf_counter() - wall) / rounds, 1e6 * (time.process_time() - cpu) / rounds)
    finally:
        os.close(fd)
        path.unlink()


def start_koppel(tmp: Path, port: int, synchronous: str, metrics_port: int) -> subprocess.Popen:
    channels = tmp / f"channels-{synchronous}"
    channels.mkdir()
    (channels / "bench.yaml").write_text(f"name: bench\nsource:\n  listen: tcp:{port}:interface=127.0.0.1\n")
    store = f"sqlite:///{tmp}/koppel-{synchronous}.db?synchronous={synchronous}"
    (tmp / "mappings").mkdir(exist_ok=True)
    return subprocess.Popen(
        [PY, "-m", "engine.cli", "run", "--channels", str(channels), "--mappings", str(tmp / "mappings"),
         "--store", store, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1", "--admin", "off", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def bench(port: int, connections: int, messages: int, rate: float | None = None) -> dict:
    command = [PY, "-m", "engine.cli", "bench", "--to", f"127.0.0.1:{port}", "--connections", str(connections),
               "--messages", str(messages), "--json", str(REFERRAL)]
    if rate:
        command += ["--rate", str(rate)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    speed_before = describe()
    servers = {
        "Koppel (store FULL)": lambda tmp, port, mport: start_koppel(tmp, port, "FULL", mport),
        "Koppel (store NORMAL)": lambda tmp, port, mport: start_koppel(tmp, port, "NORMAL", mport),
        "bare Twisted MLLP echo (ceiling)": lambda tmp, port, mport: subprocess.Popen(
            [PY, str(HERE / "echo_server.py"), str(port)], stdout=subprocess.DEVNULL),
        "python-hl7 asyncio MLLP server": lambda tmp, port, mport: subprocess.Popen(
            [PY, str(HERE / "pyhl7_server.py"), str(port)], stdout=subprocess.DEVNULL),
    }
    rows = []
    commit_notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fsync = fsync_cost(tmp)
        for name, start in servers.items():
            port = free_port()
            metrics_port = free_port() if name.startswith("Koppel") else None
            proc = start(tmp, port, metrics_port)
            try:
                wait_port(port)
                bench(port, 8, 500)  # warm up
                sampler = RssSampler(proc.pid)
                sampler.start()
                one = bench(port, 1, max(1000, args.messages // 4))
                before = commit_stats(metrics_port)
                eight = bench(port, 8, args.messages)
                after = commit_stats(metrics_port)
                if metrics_port is not None:
                    commits, inside, messages = (a - b for a, b in zip(after, before))
                    seconds = args.messages / eight["msg_per_s"]
                    commit_notes.append(
                        f"{name}, 8 connections: {commits:,.0f} commits, {messages / commits:.1f} messages each, "
                        f"{1e6 * inside / commits:,.0f} us each; {100 * inside / seconds:.0f}% of the run inside a commit"
                    )
                paced = bench(port, 8, 5000, rate=1000)
                sampler.stop = True
                sampler.join()
                rows.append((name, one, eight, paced, max(sampler.samples or [0.0])))
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    print(f"referral {REFERRAL.stat().st_size} bytes, {args.messages} messages on 8 connections, "
          f"{os.cpu_count()} cores, client and server on the same machine\n")
    print("| server | 1 conn msg/s | 8 conn msg/s | 8 conn p50 / p99 ms | p99 ms at 1,000 msg/s | max RSS MB | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, one, eight, paced, rss in rows:
        errors = sum(r["nak"] + r["mismatch"] + r["error"] for r in (one, eight, paced))
        print(f"| {name} | {one['msg_per_s']:,.0f} | {eight['msg_per_s']:,.0f} | {eight['p50_ms']} / {eight['p99_ms']} "
              f"| {paced['p99_ms']} | {rss:.0f} | {errors} |")
    print()
    for note in commit_notes:
        print(note)
    print(f"fdatasync of 40 KB in the store's directory: {fsync[0]:.0f} us wall, {fsync[1]:.0f} us CPU")
    print(f"before: {speed_before}\nafter:  {describe()}")


if __name__ == "__main__":
    main()
