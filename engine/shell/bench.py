"""``koppel bench``: an MLLP load generator that behaves like real senders.

N connections, one message in flight on each (the next only after its ACK), every
message with its own MSH-10, every ACK checked (code and MSA-2). Prints throughput
and ACK latency percentiles. ``rate`` paces the total send rate for latency runs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator

from twisted.internet import defer, task

from engine.core.files import split_messages
from engine.core.response import read_ack
from engine.shell.client import connect, host_port_endpoint

DEFAULT_MESSAGE = (
    b"MSH|^~\\&|ZorgDomein||KOPPEL|ZIEKENHUIS|20261123120000+0100||SRM^S01^SRM_S01|X|P|2.4|||||NLD|8859/1\r"
    b"ARQ|ZD123456789||||||CARHAR^Cardiologie / Hartfalen^99zda|CARREG001^consult cardioloog^99zda\r"
    b"PID|1||123456782^^^NLMINBIZA^NNNLD~ZD123456789^^^ZorgDomein^VN||Testpatient&&Testpatient^T^^^^^L\r"
)


def template_parts(message: bytes) -> tuple[bytes, bytes]:
    """(bytes before MSH-10, bytes after MSH-10) so each send only concatenates."""
    sep = message[3:4]
    end = message.find(b"\r")
    fields = message[:end].split(sep)
    while len(fields) < 10:
        fields.append(b"")
    head = sep.join(fields[:9]) + sep
    tail = sep + sep.join(fields[10:]) + message[end:] if len(fields) > 10 else message[end:]
    return head, tail


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least ``fraction`` of the values at or below it."""
    if not sorted_values:
        return float("nan")
    # (round() rounds halves to even, which picked the next value for every other exact rank)
    index = min(len(sorted_values) - 1, max(0, math.ceil(round(fraction * len(sorted_values), 9)) - 1))
    return sorted_values[index]


def send_times(index: int, connections: int, rate: float) -> Iterator[float]:
    """When connection ``index`` sends its next message, in seconds from the start of a paced run.

    Connections are staggered (connection i starts i/rate later), so the total rate arrives
    evenly spread, not as a burst of one message per connection every interval."""
    interval = connections / rate
    at = index / rate
    while True:
        yield at
        at += interval


@defer.inlineCallbacks
def run_bench(reactor, target: str, *, connections: int, messages: int, message: bytes,
              rate: float | None = None, timeout: float = 30.0):
    head, tail = template_parts(message)
    latencies: list[float] = []
    failures = {"nak": 0, "mismatch": 0, "error": 0}
    counter = iter(range(messages))
    run_id = f"B{int(time.time() * 1000) % 10**9}-"

    @defer.inlineCallbacks
    def worker(index: int):
        client = yield connect(reactor, host_port_endpoint(target, timeout))
        times = send_times(index, connections, rate) if rate else None
        for number in counter:
            if times is not None:
                delay = paced_from + next(times) - time.perf_counter()
                if delay > 0:
                    yield task.deferLater(reactor, delay, lambda: None)
            control_id = f"{run_id}{number}"
            started = time.perf_counter()
            try:
                answer = yield client.request(head + control_id.encode() + tail, timeout=timeout)
            except Exception:  # noqa: BLE001 - counted, the run goes on with a new connection
                failures["error"] += 1
                client = yield connect(reactor, host_port_endpoint(target, timeout))
                continue
            latencies.append(time.perf_counter() - started)
            reply = read_ack(answer)
            if not reply.answers(control_id):
                failures["mismatch"] += 1
            elif not reply.success:
                failures["nak"] += 1
        client.transport.loseConnection()

    paced_from = time.perf_counter() + 0.05  # after the connections are up
    started = time.perf_counter()
    yield defer.gatherResults([worker(i) for i in range(connections)], consumeErrors=True)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "connections": connections,
        "messages": len(latencies),
        "message_bytes": len(head) + len(tail) + len(run_id) + 6,
        "seconds": round(elapsed, 3),
        "msg_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p95_ms": round(percentile(latencies, 0.95) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else float("nan"),
        **failures,
    }


def load_message(path: str | None) -> bytes:
    if path is None:
        return DEFAULT_MESSAGE
    with open(path, "rb") as handle:
        found = split_messages(handle.read())
    if not found:
        raise ValueError(f"{path}: no HL7 message found")
    return found[0]


def report(result: dict, *, as_json: bool, out=sys.stdout) -> int:
    if as_json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write(
            "{messages} messages over {connections} connections in {seconds}s: {msg_per_s} msg/s\n"
            "ACK latency ms: p50 {p50_ms}  p95 {p95_ms}  p99 {p99_ms}  max {max_ms}\n"
            "failures: nak {nak}  mismatched MSA-2 {mismatch}  errors {error}\n".format(**result)
        )
    return 0 if not (result["nak"] or result["mismatch"] or result["error"]) else 1
