"""End to end over real sockets: a source -> ``koppel run`` -> two scripted sinks.

The unit tests drive the sender with a fake clock; these prove the same promises with
the real reactor, the real store and real TCP on 127.0.0.1: every message the engine
ACKed reaches every destination, in the order it was ACKed, through a destination that is
down, NAKs, is slow, and through ``kill -9`` of the engine itself. The source is
python-hl7's ``mllp_send`` (a sender Koppel did not write), the sinks are tests/sink.py.
Waiting is by polling with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sink import (  # noqa: E402
    KOPPEL,
    ROOT,
    KoppelProcess,
    MLLPClient,
    ResendingSource,
    Sink,
    check_order,
    frame,
    make_message,
    read_ack_code,
    unanswered_port,
    write_channel,
)

from engine.store import open_store  # noqa: E402

MLLP_SEND = ROOT / ".venv" / "bin" / "mllp_send"
DELIVERY_TIMEOUT = 20.0
ACK_RE = re.compile(rb"MSA\|([A-Z]{2})\|([^|\r\x1c]*)")


class Harness:
    """Two sinks (``a``, ``b``), one channel routing to both, and the engine process."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.a = Sink(name="a").start()
        self.b = Sink(name="b").start()
        self.store_url = f"sqlite:///{tmp_path / 'koppel.db'}"
        self.channels = tmp_path / "channels"
        self.engine: KoppelProcess | None = None

    def start(self, **channel) -> int:
        write_channel(self.channels, {"dest-a": self.a.port, "dest-b": self.b.port}, **channel)
        self.engine = KoppelProcess(self.channels, self.store_url)
        return self.engine.start()

    def send(self, control_ids: list[str]) -> list[tuple[str, str]]:
        """Send with python-hl7's mllp_send, one connection; (ACK code, MSA-2) per message."""
        path = self.dir / f"batch-{control_ids[0]}.hl7"
        path.write_bytes(b"".join(frame(make_message(cid)) for cid in control_ids))
        done = subprocess.run(
            [str(MLLP_SEND), "--port", str(self.engine.port), "--file", str(path), "127.0.0.1"],
            capture_output=True, timeout=30,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        return [(code.decode(), cid.decode()) for code, cid in ACK_RE.findall(done.stdout)]

    def send_all_accepted(self, control_ids: list[str]) -> None:
        answers = self.send(control_ids)
        assert answers == [("AA", cid) for cid in control_ids], answers

    def store(self):
        return open_store(self.store_url)

    def depths(self) -> dict[str, int]:
        store = self.store()
        try:
            return store.queue_depths()
        finally:
            store.close()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.terminate()
        self.a.down()
        self.b.down()


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{n:05d}" for n in range(count)]


def wait(predicate, timeout: float = DELIVERY_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def test_every_message_reaches_both_destinations_in_send_order(harness):
    harness.start()
    sent = ids("ORD", 200)
    harness.send_all_accepted(sent)
    for sink in (harness.a, harness.b):
        assert sink.wait_for_delivered(sent, DELIVERY_TIMEOUT), sink.stats()
        assert sink.delivered_ids() == sent
        assert sink.received_ids() == sent  # nothing resent on a healthy path


def test_messages_are_delivered_byte_for_byte_with_msh10_kept(harness):
    harness.start()
    sent = ids("RAW", 3)
    harness.send_all_accepted(sent)
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT)
    store = harness.store()
    try:
        stored = {}
        for row in store.list_messages(channel="e2e-in"):
            stored[row.control_id] = store.get_message(row.id).raw
    finally:
        store.close()
    # mllp_send strips the final CR, so compare with what the engine received, not what we wrote.
    assert [stored[cid] for cid in sent] == [make_message(cid).rstrip(b"\r") for cid in sent]
    assert [r.raw for r in harness.a.records] == [stored[cid] for cid in sent]


def test_a_destination_down_at_first_gets_everything_in_order_once_it_is_up(harness):
    harness.a.down()
    harness.start()
    sent = ids("DWN", 50)
    harness.send_all_accepted(sent)
    assert harness.b.wait_for_delivered(sent, DELIVERY_TIMEOUT)
    assert harness.a.received_ids() == []
    assert harness.depths()[f"127.0.0.1:{harness.a.port}"] == 50  # held, not lost
    harness.a.up()
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.delivered_ids() == sent
    assert harness.b.delivered_ids() == sent


def test_a_destination_that_goes_down_mid_stream_loses_nothing(harness):
    harness.start()
    first, second = ids("MID", 20), ids("MIE", 20)
    harness.send_all_accepted(first)
    assert harness.a.wait_for_delivered(first, DELIVERY_TIMEOUT)
    harness.a.down()
    harness.send_all_accepted(second)
    assert harness.b.wait_for_delivered(first + second, DELIVERY_TIMEOUT)
    harness.a.up()
    assert harness.a.wait_for_delivered(second, DELIVERY_TIMEOUT)
    assert harness.a.delivered_ids() == first + second


def test_ae_answers_are_retried_and_the_queue_keeps_its_order(harness):
    harness.a.nak_next("AE", 3)
    harness.start()
    sent = ids("AEN", 10)
    harness.send_all_accepted(sent)
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.delivered_ids() == sent
    # The head was tried four times (3 x AE, then AA) before anything behind it went out.
    assert harness.a.received_ids() == [sent[0]] * 4 + sent[1:]
    assert harness.b.delivered_ids() == sent  # the other queue never waited for a's trouble


def test_an_ar_answer_dead_letters_the_message_and_the_queue_moves_on(harness):
    harness.a.nak_next("AR", 1)
    harness.start()
    sent = ids("ARN", 5)
    harness.send_all_accepted(sent)
    assert harness.a.wait_for_delivered(sent[1:], DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.delivered_ids() == sent[1:]
    assert harness.a.received_ids() == sent  # the refused one was sent once, not retried
    assert harness.b.wait_for_delivered(sent, DELIVERY_TIMEOUT)
    assert harness.b.delivered_ids() == sent

    def dead():
        store = harness.store()
        try:
            return store.list_dead_letters()
        finally:
            store.close()

    wait(lambda: dead(), what="the dead letter to be committed")
    [entry] = dead()
    assert (entry.control_id, entry.destination, entry.state) == (sent[0], "dest-a", "dead")
    listed = subprocess.run(
        [str(KOPPEL), "dead-letters", "list", "--store", harness.store_url, "--channels",
         str(harness.channels), "--json"],
        capture_output=True, timeout=30, cwd=harness.dir,
    )
    assert listed.returncode == 0, listed.stderr.decode(errors="replace")
    assert [(d["control_id"], d["destination"]) for d in json.loads(listed.stdout)] == [(sent[0], "dest-a")]


def test_a_slow_destination_within_ack_timeout_gets_each_message_exactly_once(harness):
    harness.a.delay = 1.2
    harness.start(ack_timeout="5s")
    sent = ids("SLO", 3)
    harness.send_all_accepted(sent)
    assert harness.b.wait_for_delivered(sent, DELIVERY_TIMEOUT)
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.received_ids() == sent  # no timeout, so no resend


def test_a_large_message_to_a_slow_reader_is_not_timed_out_while_it_is_still_being_written(harness):
    """A letter (MDM with a PDF) over a slow link takes longer to write than the ACK timeout.
    The ACK timeout counts from when the destination has the whole message; before the fix it
    ran from the first byte, so the message timed out on every attempt and held its queue
    for ever."""
    harness.a.read_rate = 3_000_000  # bytes a second: ~1.3 s for the message, ack_timeout 1 s
    port = harness.start(ack_timeout="1s")
    body = b"OBX|1|ED|PDF^Brief^L||^AP^^Base64^" + b"QUJD" * 1_000_000 + b"\r"
    big = make_message("BIG00000") + body
    with MLLPClient(port) as source:
        assert read_ack_code(source.request(big)) == ("AA", "BIG00000")
        assert read_ack_code(source.request(make_message("BIG00001"))) == ("AA", "BIG00001")
    assert harness.a.wait_for_delivered(["BIG00000", "BIG00001"], DELIVERY_TIMEOUT), (
        harness.a.stats(), [line for line in harness.engine.output().splitlines() if "delivery.retry" in line][:3])
    assert harness.a.received_ids() == ["BIG00000", "BIG00001"]  # no timeout, so no resend
    assert harness.a.records[0].raw == big  # every byte, in order


def test_a_destination_that_never_answers_the_connect_is_recorded_as_a_connect_timeout(harness):
    """A host that drops the SYNs (down behind a firewall): here a listener whose accept queue
    is full. Twisted's TCP connect, cancelled by connect_timeout, fails with its own
    ConnectingCancelledError, which was recorded as "connection failed
    (ConnectingCancelledError)"; the operator must read "connect timed out"."""
    with unanswered_port() as blackhole:
        harness.a.down()
        harness.a.port = blackhole
        port = harness.start()  # connect_timeout: 2s
        with MLLPClient(port) as source:
            assert read_ack_code(source.request(make_message("HOL00000"))) == ("AA", "HOL00000")
        failed = harness.engine.wait_for("delivery.retry", timeout=DELIVERY_TIMEOUT)
        assert failed["reason"] == "connect timed out", failed

        def last_error():
            store = harness.store()
            try:
                entries = [store.get_entry(n) for n in (1, 2)]
            finally:
                store.close()
            return [e.last_error for e in entries if e is not None and e.destination == "dest-a"]

        wait(lambda: last_error() == ["connect timed out"], what="the failure recorded in the store")


def test_a_connection_dropped_before_the_ack_resends_the_same_message(harness):
    harness.a.drop_next(1)
    harness.start()
    sent = ids("DRP", 5)
    harness.send_all_accepted(sent)
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.received_ids() == [sent[0]] + sent
    assert harness.a.delivered_ids() == sent


@pytest.mark.parametrize("trailer", [b"", b"\r\n"], ids=["ack", "ack-and-line-end"])
def test_a_destination_that_closes_after_each_ack_gets_every_message_without_a_retry(harness, trailer):
    """Many hospital systems take one message per connection: ACK, then close. Each next
    message must go on a new connection, not into the closing one (a failed attempt, backed
    off: before the fix, one message per retry interval). Some write a line end after the ACK
    frame, on its own, then close: bytes outside any frame are no answer to the next message,
    which met a closed connection and is sent again at once (before that fix any byte read
    after the request disqualified it)."""
    harness.a.close_after_ack = True
    harness.a.trailer = trailer
    harness.start()
    sent = ids("CLS", 30)
    harness.send_all_accepted(sent)
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.delivered_ids() == sent
    assert harness.a.stats()["answers"] == {"AA": 30}

    def entries_a():
        store = harness.store()
        try:
            entries = [store.get_entry(n) for n in range(1, 61)]
        finally:
            store.close()
        return [e for e in entries if e is not None and e.destination == "dest-a"]

    wait(lambda: all(e.state == "delivered" for e in entries_a()), what="the delivered marks committed")
    assert [e.attempts for e in entries_a()] == [1] * 30  # no attempt failed


@pytest.mark.parametrize("close_after_ack", [False, True], ids=["keeps-connection", "closes-after-ack"])
def test_a_destination_whose_acks_end_with_fs_alone_gets_every_message_without_a_retry(harness, close_after_ack):
    """Its ACK frames end with FS and no CR. Read strictly, each ACK waited for a CR that never
    came: every message timed out (ack_timeout), was sent again, and the queue never moved."""
    harness.a.ack_end = b"\x1c"
    harness.a.close_after_ack = close_after_ack
    harness.start()
    sent = ids("FSA", 20)
    harness.send_all_accepted(sent)
    assert harness.a.wait_for_delivered(sent, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.a.received_ids() == sent  # in order, none sent twice


def test_connection_per_message_delivers_each_message_on_its_own_connection(harness):
    harness.start(connection="per-message")
    sent = ids("PER", 30)
    harness.send_all_accepted(sent)
    for sink in (harness.a, harness.b):
        assert sink.wait_for_delivered(sent, DELIVERY_TIMEOUT), sink.stats()
        assert sink.received_ids() == sent  # in order, none resent
        assert len({r.connection for r in sink.records}) == 30


def test_a_full_queue_naks_the_source_and_loses_nothing_it_accepted(harness):
    harness.a.down()
    harness.start(max_queue=5)
    sent = ids("FUL", 8)
    answers = harness.send(sent)
    assert [cid for _, cid in answers] == sent
    accepted = [cid for code, cid in answers if code == "AA"]
    refused = [code for code, _ in answers if code != "AA"]
    assert accepted == sent[:5]
    assert refused and set(refused) <= {"AE", "AR", "CE", "CR"}
    harness.a.up()
    assert harness.a.wait_for_delivered(accepted, DELIVERY_TIMEOUT), harness.a.stats()
    assert harness.b.wait_for_delivered(accepted, DELIVERY_TIMEOUT)
    assert harness.a.delivered_ids() == accepted
    assert harness.b.delivered_ids() == accepted  # refused means refused for every destination


def stored_order(store_url: str, channel: str = "e2e-in") -> list[str]:
    """Control ids of accepted messages in commit (id) order: the order every queue must keep."""
    store = open_store(store_url)
    try:
        rows = store.list_messages(channel=channel, status="accepted", limit=10**7)
    finally:
        store.close()
    return [r.control_id for r in sorted(rows, key=lambda r: r.id)]


def test_kill_9_during_traffic_loses_no_acked_message_and_keeps_order(harness, capsys):
    """600 messages over 2 connections, the engine SIGKILLed 3 times at random points."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    harness.start()
    engine = harness.engine
    sent_ids = [ids(f"K{c}-", 300) for c in range(2)]
    stop = threading.Event()
    sources = [ResendingSource(c, sent_ids[c], lambda: engine.port, timeout=5, stop=stop) for c in range(2)]
    kill_points = sorted(rng.sample(range(40, 560), 3))
    kills = 0
    try:
        for source in sources:
            source.start()
        for point in kill_points:
            wait(lambda: sum(len(s.records) for s in sources) >= point or not any(s.thread.is_alive() for s in sources),
                 timeout=30, what=f"{point} ACKs")
            time.sleep(rng.uniform(0, 0.03))
            engine.kill()
            kills += 1
            engine.start()
        for source in sources:
            source.join(60)
    finally:
        stop.set()
    for source in sources:
        assert source.error is None, repr(source.error)
        assert not source.thread.is_alive()
    sent = {r.control_id: r for s in sources for r in s.records}
    assert len(sent) == 600
    for sink in (harness.a, harness.b):
        assert sink.wait_for_delivered(sent, 30), (seed, sink.stats())
    order = stored_order(harness.store_url)
    assert sorted(order) == sorted(sent), f"seed {seed}: stored set differs from ACKed set"
    report = []
    for name, sink in (("a", harness.a), ("b", harness.b)):
        first = sink.delivered_ids()
        assert first == order, f"seed {seed}: sink {name} first-delivery order differs from commit order"
        assert check_order(first, sent) == [], f"seed {seed}"
        report.append(f"{name}: received {len(sink.received_ids())}, duplicates {sink.duplicates()}")
    resent = sum(r.attempts - 1 for r in sent.values())
    with capsys.disabled():
        print(f"\nkill-9 soak seed={seed} kills={kills} acked={len(sent)} source resends={resent} "
              + "; ".join(report))


def _keepalive_timers(local_port: int | None = None, remote_port: int | None = None) -> list[float]:
    """Seconds left on the keepalive timer of each established 127.0.0.1 TCP socket with that
    local or remote port, from /proc/net/tcp (timer kind 2 is keepalive; ``when`` in clock ticks).
    A socket without keepalive shows no timer (kind 0) while idle."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, timer = fields[1], fields[2], fields[3], fields[5]
        if state != "01":  # ESTABLISHED
            continue
        if local_port is not None and int(local.split(":")[1], 16) != local_port:
            continue
        if remote_port is not None and int(remote.split(":")[1], 16) != remote_port:
            continue
        kind, when = timer.split(":")
        found.append(int(when, 16) / ticks if int(kind, 16) == 2 else 0.0)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_inbound_and_delivery_connections_carry_tcp_keepalive_with_the_configured_idle_time(harness):
    """Over the VPN a firewall drops an idle connection without telling either end: keepalive
    probes keep its state, and find a dead peer without waiting for a message to time out."""
    port = harness.start(keepalive="7s")
    with MLLPClient(port) as source:
        assert read_ack_code(source.request(make_message("KA1")))[0] == "AA"
        assert harness.a.wait_for_delivered(["KA1"], DELIVERY_TIMEOUT)
        assert harness.b.wait_for_delivered(["KA1"], DELIVERY_TIMEOUT)
        wait(lambda: len(_keepalive_timers(local_port=port)) == 1 and _keepalive_timers(local_port=port)[0] > 0,
             what="the inbound connection's keepalive timer")
        inbound = _keepalive_timers(local_port=port)
        to_a = _keepalive_timers(remote_port=harness.a.port)
        assert len(to_a) == 1 and 0 < to_a[0] <= 7, to_a
        assert 0 < inbound[0] <= 7, inbound
        # the source's own socket has no keepalive: the check can tell the difference
        assert _keepalive_timers(remote_port=port) == [0.0]
