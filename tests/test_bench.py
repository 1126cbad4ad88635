"""koppel bench: its pacing schedule (pure), and a real run against the bare echo server."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.shell.bench import percentile, send_times

ROOT = Path(__file__).resolve().parent.parent


def test_paced_connections_together_send_evenly_spaced():
    rate, connections = 1000.0, 8
    merged = sorted(t for i in range(connections) for t in itertools.islice(send_times(i, connections, rate), 50))
    gaps = {round(b - a, 9) for a, b in zip(merged, merged[1:])}
    assert gaps == {0.001}  # one message every 1/rate, never eight at once
    assert merged[0] == 0.0 and len(merged) == 400


def test_one_paced_connection_sends_at_the_whole_rate():
    assert list(itertools.islice(send_times(0, 1, 200.0), 3)) == [0.0, 0.005, 0.01]


@pytest.mark.parametrize(("fraction", "expected"), [(0.5, 50), (0.99, 99), (1.0, 100), (0.0, 1)])
def test_percentile_is_nearest_rank(fraction, expected):
    assert percentile(list(range(1, 101)), fraction) == expected


def test_bench_against_the_echo_server_checks_every_ack(tmp_path):
    echo = subprocess.Popen([sys.executable, str(ROOT / "tests" / "benchmarks" / "echo_server.py"), "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo.stdout.readline())
        out = subprocess.run(
            [sys.executable, "-m", "engine.cli", "bench", "--to", f"127.0.0.1:{port}", "--connections", "3",
             "--messages", "60", "--rate", "2000", "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
    finally:
        echo.terminate()
        echo.wait(timeout=10)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["messages"], result["connections"]) == (60, 3)
    assert (result["nak"], result["mismatch"], result["error"]) == (0, 0, 0)
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


def test_bench_against_nothing_says_it_cannot_connect_in_one_line():
    import socket

    with socket.socket() as placeholder:  # a port that was free a moment ago: nothing listens there
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "--to", f"127.0.0.1:{port}", "--messages", "5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"cannot connect to 127.0.0.1:{port}: connection refused"
