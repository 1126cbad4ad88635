"""The queue sender, with the test playing the destination. No sockets, no sleeps.

A ``MemoryReactorClock`` is the reactor and the clock; a real SQLite store sits behind
the real ``GroupCommitter``; ``connect`` hands out real ``MLLPClient``s on string
transports, so the test reads what went out on the wire and answers with ACK frames,
or refuses the connection. Time moves only when a test moves it, one scheduled call
at a time (``Harness.run``), so every retry happens at the second it is due.
"""

from __future__ import annotations

import errno
import os

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from engine.config import DestinationConfig, OnNakConfig, RetryConfig
from engine.core import mllp
from engine.metrics import Metrics
from engine.shell import sender as sender_module
from engine.shell.client import MLLPClient
from engine.shell.committer import GroupCommitter
from engine.store import Append, QueueTarget, ReceivedMessage, RetryNow, SetPaused, StoreError, open_store
from tests.factories import received

T0 = 1_767_370_545.0  # 2026-01-02 16:15:45 UTC
NAME = "hix-agenda"
ENDPOINT = "tcp:host=10.1.2.3:port=6661"
QUEUE = "10.1.2.3:6661"
PID = "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatiënt&&Testpatiënt^José^^^^^L||19800623|M"


def hl7(control_id: str, *, pid: str = PID, charset: str = "8859/1", encoding: str = "latin-1") -> bytes:
    """A synthetic ORU (test BSN 123456782) with the control id a test follows."""
    msh = f"MSH|^~\\&|ZorgDomein|ZD|Koppel|ZH|20260102161545+0100||ORU^R01|{control_id}|P|2.4|||||NLD|{charset}"
    return (msh + "\r" + pid + "\rOBX|1|ST|DOSE||5 µg\r").encode(encoding)


def ack(code: str, control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|HIX|ZH|ZorgDomein|ZD|20260102161546||ACK^R01|A-{control_id}|P|2.4\r"
        f"MSA|{code}|{control_id}\r"
    ).encode("ascii")


def control_id_of(payload: bytes) -> str:
    return payload.split(b"\r", 1)[0].split(b"|")[9].decode("ascii")


class PeerSocket:
    """The socket under a PeerTransport, for the sender's peek: has the peer's FIN arrived?"""

    def __init__(self) -> None:
        self.fin = False
        self.peeks = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.peeks += 1
        if self.fin:
            return b""
        raise BlockingIOError


class PeerTransport(StringTransport):
    """A TCP connection as Twisted's: closing it reaches the protocol on a later turn."""

    def __init__(self, reactor) -> None:
        super().__init__()
        self.reactor = reactor
        self.protocol = None
        self.socket = PeerSocket()

    def loseConnection(self) -> None:
        super().loseConnection()
        self._lose(ConnectionLost("closed by Koppel"), later=True)

    def abortConnection(self) -> None:
        self.disconnected = True
        self.loseConnection()

    def reset(self) -> None:
        """The destination resets the connection."""
        self._lose(ConnectionLost("connection reset by peer"), later=False)

    def _lose(self, error: Exception, *, later: bool) -> None:
        if not self.connected:
            return
        self.connected = False
        if later:
            self.reactor.callLater(0, self.protocol.connectionLost, Failure(error))
        else:
            self.protocol.connectionLost(Failure(error))


class Destination:
    """The receiving system: takes (or refuses) connections, reads frames, answers them."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.connections: list[MLLPClient] = []
        self.connect_times: list[float] = []
        self.refuse: type[Exception] | None = None  # fail every connect with this error
        self.hang = False  # a connect that never completes

    def connect(self) -> defer.Deferred:
        self.connect_times.append(self.reactor.seconds())
        if self.refuse is not None:
            return defer.fail(self.refuse())
        if self.hang:
            return defer.Deferred()
        client = MLLPClient(clock=self.reactor)
        transport = PeerTransport(self.reactor)
        transport.protocol = client
        client.makeConnection(transport)
        self.connections.append(client)
        return defer.succeed(client)

    @property
    def current(self) -> MLLPClient:
        return self.connections[-1]

    def frames(self, client: MLLPClient | None = None) -> list[bytes]:
        """Every payload written on one connection (default: the latest), whole frames only."""
        client = client or self.current
        reader = mllp.FrameReader(max_frame_bytes=1 << 24)
        events = reader.feed(client.transport.value())
        assert all(type(e) is mllp.FrameReceived for e in events), events
        assert not reader.in_frame
        return [e.payload for e in events]

    def received(self) -> list[str]:
        """Control ids of everything written, over all connections, in order."""
        return [control_id_of(p) for c in self.connections for p in self.frames(c)]

    def last(self) -> str:
        return control_id_of(self.frames()[-1])

    def send(self, data: bytes, client: MLLPClient | None = None) -> None:
        (client or self.current).dataReceived(data)
        self.reactor.advance(0)  # the group commit and anything else due this turn

    def answer(self, code: str = "AA", control_id: str | None = None) -> None:
        """Answer the latest message on the latest connection (or another control id)."""
        self.send(mllp.encode_frame(ack(code, control_id or self.last())))


class Harness:
    def __init__(self, tmp_path, *, poll_interval: float = 1.0, **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        self.store = open_store(f"sqlite:///{tmp_path}/k.db")
        self.committer = GroupCommitter(self.store, clock=self.reactor)
        self.metrics = Metrics()
        settings.setdefault("retry", RetryConfig(initial=1.0, factor=2.0, max=300.0, jitter=0.2))
        self.config = DestinationConfig(name=NAME, endpoint=ENDPOINT, **settings)
        assert self.config.queue_key == QUEUE
        self.destination = Destination(self.reactor)
        self.sender = self.new_sender(poll_interval=poll_interval)

    def new_sender(self, *, poll_interval: float = 1.0) -> sender_module.QueueSender:
        return sender_module.QueueSender(
            QUEUE,
            {NAME: self.config},
            store=self.store,
            committer=self.committer,
            reactor=self.reactor,
            metrics=self.metrics,
            connect=self.destination.connect,
            draw=lambda: 0.5,  # no jitter: exact delays
            poll_interval=poll_interval,
        )

    def enqueue(self, *control_ids: str, raw: bytes | None = None) -> list[int]:
        """Store received messages queued for the destination, as the listener does."""
        results = self.store.write([Append(message=self.message(c, raw=raw)) for c in control_ids])
        self.sender.enqueued(len(control_ids))
        return [r.message_id for r in results]

    def message(self, control_id: str, *, raw: bytes | None = None, **fields) -> ReceivedMessage:
        """A received ORU queued for the destination, received now; ``fields`` as in tests.factories."""
        fields.setdefault("received_at", self.reactor.seconds())
        fields.setdefault("targets", (QueueTarget(queue=QUEUE, destination=NAME),))
        return received(control_id, raw=raw or hl7(control_id), message_type="ORU^R01", structure=None,
                        duplicate_window=0, **fields)

    def start(self) -> None:
        self.sender.start()
        self.reactor.advance(0)

    def run(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, stopping at every scheduled call on the way."""
        end = self.reactor.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.reactor.advance(max(0.0, min(due) - self.reactor.seconds()))
        self.reactor.advance(end - self.reactor.seconds())

    def run_until_connected(self, limit: float = 3600.0) -> None:
        """Move the clock on, call by call, until the destination gets a new connection."""
        end = self.reactor.seconds() + limit
        before = len(self.destination.connections)
        while len(self.destination.connections) == before:
            due = [c.getTime() for c in self.reactor.getDelayedCalls()]
            assert due and min(due) <= end, "no new connection in time"
            self.reactor.advance(max(0.0, min(due) - self.reactor.seconds()))

    def settled(self):
        """The store once delivery bookkeeping (committed within a short window) is in."""
        self.committer.flush()
        return self.store

    def entry(self, entry_id: int):
        return self.settled().get_entry(entry_id)

    def states(self) -> list[str]:
        return [self.settled().get_entry(i).state for i in range(1, self.last_entry_id() + 1)]

    def last_entry_id(self) -> int:
        return self.store._query("SELECT max(id) FROM queue_entries")[0][0] or 0

    def stats(self):
        (stats,) = [s for s in self.settled().queue_stats(self.reactor.seconds()) if s.queue == QUEUE]
        return stats

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def make(tmp_path):
    harnesses: list[Harness] = []

    def build(**settings) -> Harness:
        harness = Harness(tmp_path, **settings)
        harnesses.append(harness)
        return harness

    yield build
    for harness in harnesses:
        harness.sender.stop()
        harness.store.close()


# --------------------------------------------------------------------------- the happy path


def test_a_queued_message_goes_out_byte_exact_and_is_marked_delivered_on_aa(make):
    h = make()
    h.enqueue("C1")
    h.start()
    assert h.destination.frames() == [hl7("C1")]
    assert h.sender.state == sender_module.SENDING
    h.destination.answer("AA")
    entry = h.entry(1)
    assert entry.state == "delivered"
    assert entry.last_ack == ack("AA", "C1")
    assert entry.attempts == 1
    assert h.stats().depth == 0
    assert h.sender.state == sender_module.IDLE


def test_messages_go_one_at_a_time_over_one_persistent_connection(make):
    h = make()
    h.enqueue("C1", "C2", "C3")
    h.start()
    assert h.destination.received() == ["C1"]  # the next only after its ACK
    h.run(10)
    assert h.destination.received() == ["C1"]
    h.destination.answer()
    assert h.destination.received() == ["C1", "C2"]
    h.destination.answer()
    h.destination.answer()
    assert h.destination.received() == ["C1", "C2", "C3"]
    assert len(h.destination.connections) == 1
    assert h.states() == ["delivered"] * 3


def test_a_message_queued_while_idle_is_sent_at_once(make):
    h = make()
    h.start()
    assert h.destination.connections == []
    h.run(30)
    h.enqueue("C1")
    h.reactor.advance(0)
    assert h.destination.received() == ["C1"]


def test_header_rewrites_are_applied_on_the_wire_and_the_stored_message_is_kept(make):
    h = make(rewrite=(("MSH-5", "HIX"), ("MSH-6", "ZIEKENHUIS")))
    h.enqueue("C1")
    h.start()
    (wire,) = h.destination.frames()
    assert wire.startswith(b"MSH|^~\\&|ZorgDomein|ZD|HIX|ZIEKENHUIS|20260102161545+0100||ORU^R01|C1|")
    assert wire.split(b"\r", 1)[1] == hl7("C1").split(b"\r", 1)[1]
    h.destination.answer()
    assert h.entry(1).state == "delivered"
    assert h.store.get_message(1).raw == hl7("C1")


def test_two_destinations_on_one_host_port_share_one_ordered_queue_with_their_own_rewrites(make):
    h = make(rewrite=(("MSH-5", "HIX"),))
    ris = DestinationConfig(name="ris", endpoint="tcp:host=10.1.2.3:port=6661", rewrite=(("MSH-5", "RIS"),))
    h.sender = sender_module.QueueSender(
        QUEUE, {NAME: h.config, "ris": ris}, store=h.store, committer=h.committer, reactor=h.reactor,
        metrics=h.metrics, connect=h.destination.connect, draw=lambda: 0.5,
    )
    h.enqueue("C1")
    h.store.write([Append(message=h.message("C2", received_at=T0,
                                            targets=(QueueTarget(queue=QUEUE, destination="ris"),)))])
    h.enqueue("C3")
    h.start()
    started = h.reactor.seconds()
    for _ in range(3):
        h.destination.answer()
    assert h.destination.received() == ["C1", "C2", "C3"]
    assert [p.split(b"|")[4] for p in h.destination.frames()] == [b"HIX", b"RIS", b"HIX"]
    assert len(h.destination.connections) == 1
    assert h.sample("koppel_delivery_sent_total", destination="ris") == 1


def test_a_destination_charset_reencodes_the_outbound_bytes(make):
    h = make(charset="UNICODE UTF-8")
    h.enqueue("C1")
    h.start()
    (wire,) = h.destination.frames()
    assert wire == hl7("C1", charset="UNICODE UTF-8", encoding="utf-8")


def test_a_message_that_cannot_be_converted_is_dead_lettered_and_the_queue_moves_on(make):
    h = make(charset="8859/1")
    raw = hl7("C1", pid="PID|1||123456782||Ωmega^Test", charset="UNICODE UTF-8", encoding="utf-8")
    h.store.write([Append(message=h.message("C1", raw=raw, received_at=T0, charset="UNICODE UTF-8"))])
    h.enqueue("C2")
    h.start()
    assert h.destination.received() == ["C2"]
    assert h.entry(1).state == "dead"
    assert "cannot be converted" in h.entry(1).last_error
    assert "123456782" not in h.entry(1).last_error


# --------------------------------------------------------------------------- connecting


def test_a_refused_connection_is_retried_with_the_backoff_and_recorded_in_the_store(make):
    h = make()
    h.destination.refuse = ConnectionRefusedError
    h.enqueue("C1")
    h.start()
    entry = h.entry(1)
    assert (entry.state, entry.attempts, entry.last_error) == ("pending", 1, "connection refused")
    assert entry.next_attempt_at == T0 + 1
    assert h.sender.state == sender_module.BACKOFF
    h.run(14.9)
    assert [t - T0 for t in h.destination.connect_times] == [0, 1, 3, 7]
    assert h.entry(1).attempts == 4
    assert h.entry(1).next_attempt_at == T0 + 15
    assert h.stats().last_error == "connection refused"
    h.destination.refuse = None
    h.run(0.1)
    assert h.destination.received() == ["C1"]
    h.destination.answer()
    assert h.entry(1).state == "delivered"
    assert h.entry(1).attempts == 5


def test_an_unresolvable_host_name_is_retried_like_a_refusal(make):
    h = make()
    h.destination.refuse = DNSLookupError
    h.enqueue("C1")
    h.start()
    assert h.entry(1).last_error == "host name could not be resolved"
    h.destination.refuse = None
    h.run(1)
    h.destination.answer()
    assert h.entry(1).state == "delivered"


@pytest.mark.parametrize(
    "os_error, recorded",
    [
        (errno.EHOSTUNREACH, "connection failed (no route to host)"),
        (errno.ENETUNREACH, "connection failed (network is unreachable)"),
        (errno.EACCES, "connection failed (permission denied)"),
        (errno.ETIMEDOUT, "connect timed out (TCP)"),
    ],
)
def test_a_connect_failing_in_the_os_is_recorded_with_the_os_reason(make, os_error, recorded):
    """A VPN tunnel that is down answers "no route to host": the operator must read that,
    not the name of Twisted's exception class."""
    from twisted.internet.error import getConnectError

    h = make()
    h.destination.refuse = lambda: getConnectError(OSError(os_error, os.strerror(os_error)))
    h.enqueue("C1")
    h.start()
    assert h.entry(1).last_error == recorded
    assert h.stats().last_error == recorded


def test_a_connect_that_never_completes_times_out_and_is_retried(make):
    h = make(connect_timeout=10.0)
    h.destination.hang = True
    h.enqueue("C1")
    h.start()
    assert h.sender.state == sender_module.CONNECTING
    h.run(9.9)
    assert h.entry(1).attempts == 0
    h.run(0.1)
    assert h.entry(1).attempts == 1
    assert h.entry(1).last_error == "connect timed out"
    h.destination.hang = False
    h.run(1)
    h.destination.answer()
    assert h.entry(1).state == "delivered"


def test_a_tcp_connect_cancelled_by_the_connect_timeout_is_recorded_as_a_connect_timeout(make):
    """Twisted's TCP connect, cancelled, fails with ConnectingCancelledError, not CancelledError."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectingCancelledError

    h = make(connect_timeout=10.0)

    def connect():
        return defer.Deferred(lambda d: d.errback(ConnectingCancelledError(IPv4Address("TCP", "10.1.2.3", 6661))))

    h.sender._connect = connect
    h.enqueue("C1")
    h.start()
    h.run(10)
    assert h.entry(1).attempts == 1
    assert h.entry(1).last_error == "connect timed out"


def test_a_connection_reset_while_waiting_for_the_ack_resends_the_same_message(make):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    h.destination.current.transport.reset()
    h.reactor.advance(0)
    assert h.entry(1).attempts == 1
    assert h.entry(1).last_error == "connection closed before the acknowledgement"
    h.run(1)
    assert len(h.destination.connections) == 2
    assert h.destination.frames() == [hl7("C1")]
    h.destination.answer()
    assert h.destination.received() == ["C1", "C1", "C2"]


def test_a_destination_that_closes_after_each_ack_gets_each_message_on_a_new_connection(make):
    """Its FIN arrives with the ACK, unread when the next message is due. The first time, the
    next message meets the close and goes again at once; from then on the sender looks for the
    FIN before each send and connects again, rather than write into the closed connection."""
    h = make()
    h.enqueue("C1", "C2", "C3", "C4")
    h.start()
    started = h.reactor.seconds()
    h.destination.current.dataReceived(mllp.encode_frame(ack("AA", "C1")))
    h.destination.current.transport.reset()  # C2 met the close: learned, and sent again at once
    for _ in range(3):
        h.destination.current.transport.socket.fin = True  # ACK and FIN in one go
        h.destination.current.dataReceived(mllp.encode_frame(ack("AA", h.destination.last())))
    h.reactor.advance(0)
    assert [len(h.destination.frames(c)) for c in h.destination.connections] == [2, 1, 1, 1]
    assert h.destination.received() == ["C1", "C2", "C2", "C3", "C4"]
    assert h.states() == ["delivered"] * 4
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 0
    assert h.reactor.seconds() == started  # no backoff


def test_a_destination_that_never_closed_a_connection_is_not_peeked_at_before_each_send(make):
    """The peek is a syscall per message (6% of a drain's time): only for destinations that close."""
    h = make()
    h.enqueue("C1", "C2", "C3")
    h.start()
    for _ in range(3):
        h.destination.answer("AA")
    assert h.states() == ["delivered"] * 3
    assert len(h.destination.connections) == 1
    assert h.destination.current.transport.socket.peeks == 0


@pytest.mark.parametrize("trailer", [b"", b"\r\n"], ids=["ack", "ack-and-line-end"])
def test_a_message_that_meets_the_close_after_the_previous_ack_is_sent_again_at_once(make, trailer):
    """The FIN came just after the check: the message went into a connection the destination
    was closing. Not a refusal: sent again at once on a new connection, no retry counted.
    Some systems write a line end after the ACK frame, on its own, then close: bytes outside
    any frame answer nothing, so the same holds."""
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    started = h.reactor.seconds()
    seen = connected_values(h)
    h.destination.current.dataReceived(mllp.encode_frame(ack("AA", "C1")))
    first = h.destination.current
    assert h.destination.frames(first)[-1].split(b"|")[9] == b"C2"  # C2 went out on the old one
    if trailer:
        first.dataReceived(trailer)  # read after C2 went out on the old connection
    first.transport.reset()
    assert len(h.destination.connections) == 2
    assert seen and set(seen) == {1.0}  # no flicker to 0: the destination is there
    h.destination.answer()
    assert h.destination.received() == ["C1", "C2", "C2"]
    assert h.states() == ["delivered", "delivered"]
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 0
    assert h.reactor.seconds() == started


def test_a_connection_closed_in_the_middle_of_an_answer_is_a_failed_attempt(make):
    """The destination began to answer (a frame begun) and then closed: not a stale connection."""
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    h.destination.current.dataReceived(mllp.encode_frame(ack("AA", "C1")))
    first = h.destination.current
    first.dataReceived(b"\x0bMSH|^~\\&|HIX")
    first.transport.reset()
    assert h.destination.received() == ["C1", "C2"]
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 1
    assert h.entry(2).attempts == 1


def test_a_new_connection_closed_without_an_answer_is_a_failed_attempt_as_before(make):
    """Sent again at once only on a connection that had answered before: a destination that
    takes the message on a fresh connection and closes without answering is backed off."""
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    h.destination.current.dataReceived(mllp.encode_frame(ack("AA", "C1")))
    h.destination.current.transport.reset()  # C2 on the old connection: sent again at once
    h.destination.current.transport.reset()  # and on the new one: a failure
    assert h.destination.received() == ["C1", "C2", "C2"]
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 1
    assert h.entry(2).attempts == 1


def test_stop_waits_for_the_message_in_flight_and_sends_nothing_after_it(make):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    stopped = h.sender.stop()
    assert not stopped.called
    h.destination.answer()
    assert stopped.called
    assert h.sender.state == sender_module.STOPPED
    assert h.destination.received() == ["C1"]
    assert h.states() == ["delivered", "pending"]
    assert h.destination.current.transport.disconnected


# --------------------------------------------------------------------------- answers


def test_no_answer_within_ack_timeout_closes_the_socket_and_resends_on_a_new_connection(make):
    h = make(ack_timeout=30.0)
    h.enqueue("C1", "C2")
    h.start()
    first = h.destination.current
    h.run(29.9)
    assert not first.transport.disconnecting
    assert h.entry(1).attempts == 0
    h.run(0.1)
    assert first.transport.disconnected  # aborted, so a late ACK has nowhere to land
    assert h.entry(1).last_error == "no acknowledgement in time"
    h.run(1)
    second = h.destination.current
    assert second is not first
    assert h.destination.frames(second) == [hl7("C1")]
    h.destination.send(mllp.encode_frame(ack("AA", "C1")), client=first)  # the late ACK
    assert h.entry(1).state == "pending"
    h.destination.answer()
    assert h.entry(1).state == "delivered"
    assert h.destination.received() == ["C1", "C1", "C2"]


def test_a_slow_ack_within_ack_timeout_is_delivered_without_a_retry(make):
    h = make(ack_timeout=30.0)
    h.enqueue("C1")
    h.start()
    h.run(25)
    h.destination.answer()
    assert h.entry(1).state == "delivered"
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 0
    assert len(h.destination.connections) == 1


@pytest.mark.parametrize(("code", "state"), [("AE", "pending"), ("CE", "pending"), ("AR", "dead"), ("CR", "dead")])
def test_a_negative_ack_is_retried_or_dead_lettered_per_on_nak(make, code, state):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    h.destination.answer(code)
    entry = h.entry(1)
    assert entry.state == state
    assert entry.last_error == f"destination answered {code}"
    assert entry.last_ack == ack(code, "C1")
    if state == "pending":  # retried after the backoff, on a new connection, before C2
        assert h.destination.received() == ["C1"]
        first = h.destination.current
        assert first.transport.disconnecting  # closed in good order: it answered
        h.run(1)
        assert h.destination.received() == ["C1", "C1"]
        h.destination.answer("AA")
        assert h.destination.received() == ["C1", "C1", "C2"]
        assert h.entry(1).state == "delivered"
        assert len(h.destination.connections) == 2
    else:  # the queue moves on at once, on the same connection
        assert h.destination.received() == ["C1", "C2"]
        assert len(h.destination.connections) == 1


def test_a_late_second_answer_to_a_nakd_attempt_is_not_taken_for_the_retrys(make):
    """Every attempt carries the same MSH-10, so MSA-2 cannot tell the answers apart: a
    destination that answered AE and then, late, AA (found in an interop run) had that AA
    taken for the retry's answer while the retry itself got AE. The retry goes on a new
    connection, and the old one is closed."""
    h = make()
    h.enqueue("C1")
    h.start()
    first = h.destination.current
    h.destination.answer("AE")
    h.run(1)
    assert len(h.destination.connections) == 2
    h.destination.send(mllp.encode_frame(ack("AA", "C1")), first)  # too late, on the old one
    assert h.entry(1).state == "pending"
    h.destination.answer("AE")  # the retry's own answer
    assert h.entry(1).state == "pending" and h.entry(1).attempts == 2


def connected_values(h) -> list[float]:
    """Every value the destination_connected gauge takes from now on."""
    seen: list[float] = []
    original = h.sender._connected_changed

    def spy() -> None:
        original()
        seen.append(h.sample("koppel_destination_connected", queue=QUEUE))

    h.sender._connected_changed = spy
    return seen


def test_connection_per_message_closes_after_each_answer_without_counting_a_disconnect(make):
    h = make(connection="per-message")
    h.enqueue("C1", "C2", "C3")
    h.start()
    seen = connected_values(h)
    for n in range(3):
        h.destination.answer("AA")
        assert h.destination.connections[n].transport.disconnecting  # closed in good order
        assert not h.destination.connections[n].transport.disconnected  # not aborted
        h.reactor.advance(0)
    assert h.destination.received() == ["C1", "C2", "C3"]
    assert [len(h.destination.frames(c)) for c in h.destination.connections] == [1, 1, 1]
    assert h.states() == ["delivered"] * 3
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 0
    assert seen and set(seen) == {1.0}  # no flicker to 0 (nor a KoppelDestinationDisconnected)


def test_a_destination_that_closes_after_its_ack_stays_counted_as_connected(make):
    h = make()
    h.enqueue("C1", "C2", "C3")
    h.start()
    seen = connected_values(h)
    h.destination.answer("AA")
    h.destination.current.transport.reset()  # the first close: C2 goes again on a new connection
    h.destination.current.transport.socket.fin = True  # from now on seen before the send
    h.destination.answer("AA")
    assert len(h.destination.connections) == 3
    assert h.destination.received() == ["C1", "C2", "C2", "C3"]
    assert seen and set(seen) == {1.0}


def test_on_nak_can_dead_letter_an_ae_and_retry_an_ar(make):
    h = make(on_nak=OnNakConfig(AE="dead-letter", AR="retry"))
    h.enqueue("C1", "C2")
    h.start()
    h.destination.answer("AE")
    assert h.entry(1).state == "dead"
    h.destination.answer("AR")
    assert h.entry(2).state == "pending"
    h.run(1)
    assert h.destination.received() == ["C1", "C2", "C2"]


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_an_ack_with_the_wrong_msa2_never_counts_and_the_message_is_resent_on_a_new_connection(make, code):
    h = make()
    h.enqueue("C1")
    h.start()
    first = h.destination.current
    h.destination.answer(code, control_id="C0")
    assert h.entry(1).state == "pending"
    assert "MSA-2" in h.entry(1).last_error
    assert first.transport.disconnected
    h.run(1)
    assert h.destination.current is not first
    assert h.destination.frames() == [hl7("C1")]
    h.destination.answer(code)
    assert h.entry(1).state == "delivered"
    # the dashboard's ACK codes: one real AA/CA, and the other message's one as "mismatch"
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code=code) == 1
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="mismatch") == 1


def test_a_framed_garbage_answer_never_counts_and_the_message_is_resent_on_a_new_connection(make):
    h = make()
    h.enqueue("C1")
    h.start()
    first = h.destination.current
    h.destination.send(mllp.encode_frame(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    assert h.entry(1).state == "pending"
    assert h.entry(1).last_error == "unreadable acknowledgement"
    assert first.transport.disconnected
    h.run(1)
    assert h.destination.current is not first
    h.destination.answer()
    assert h.entry(1).state == "delivered"


def test_unframed_garbage_is_ignored_and_the_ack_timeout_still_applies(make):
    h = make(ack_timeout=30.0)
    h.enqueue("C1")
    h.start()
    h.destination.send(b"+OK ready\r\n")
    assert h.entry(1).attempts == 0
    h.run(30)
    assert h.entry(1).last_error == "no acknowledgement in time"


def test_an_ack_split_over_many_reads_is_delivered_once_complete(make):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    data = mllp.encode_frame(ack("AA", "C1"))
    for index in range(len(data) - 2):
        h.destination.send(data[index : index + 1])
        assert h.entry(1).state == "pending"
    h.destination.send(data[-2:-1])  # the FS ends the ACK (systems that omit the CR exist)
    assert h.entry(1).state == "delivered"
    assert h.destination.received() == ["C1", "C2"]
    h.destination.send(data[-1:])  # the CR, a read later: the end of C1's ACK, not C2's
    assert h.entry(2).state == "pending" and h.destination.current.junk == 0
    h.destination.answer("AA", "C2")
    assert h.entry(2).state == "delivered"


def test_a_second_unsolicited_ack_in_the_same_read_is_not_taken_for_the_next_message(make):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    twice = mllp.encode_frame(ack("AA", "C1")) * 2  # e.g. a destination that ACKs a resend again
    h.destination.send(twice)
    assert h.entry(1).state == "delivered"
    assert h.destination.received() == ["C1", "C2"]
    assert h.entry(2).attempts == 0 and h.entry(2).last_error is None
    assert h.destination.current.transport.connected
    assert h.destination.current.junk == 1  # counted as an answer nobody asked for
    h.destination.answer("AA")
    assert h.entry(2).state == "delivered"
    assert len(h.destination.connections) == 1
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 0


# --------------------------------------------------------------------------- long outages and order


def test_a_destination_back_after_hours_gets_everything_in_order_with_retries_capped(make):
    h = make(poll_interval=60.0)
    h.destination.refuse = ConnectionRefusedError
    h.enqueue("C1", "C2", "C3")
    h.start()
    for _ in range(5 * 60):  # five hours, a minute at a time
        h.run(60)
    gaps = [b - a for a, b in zip(h.destination.connect_times, h.destination.connect_times[1:])]
    assert gaps[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert max(gaps) == 300
    assert h.entry(1).attempts == len(h.destination.connect_times)
    assert h.entry(2).attempts == 0  # nothing behind the head was tried
    h.destination.refuse = None
    h.run_until_connected()
    for _ in range(3):
        h.destination.answer()
    assert h.destination.received() == ["C1", "C2", "C3"]
    assert h.states() == ["delivered"] * 3


def test_an_entry_older_than_give_up_after_is_dead_lettered_and_the_next_one_goes(make):
    h = make(give_up_after=3600.0)
    h.destination.refuse = ConnectionRefusedError
    h.enqueue("C1")
    h.start()
    h.run(3000)
    h.enqueue("C2")
    h.run(900)
    assert h.entry(1).state == "dead"
    assert "give_up_after" in h.entry(1).last_error
    assert h.entry(2).state == "pending" and h.entry(2).attempts >= 1
    assert h.sample("koppel_dead_letters_total", destination=NAME) == 1
    h.destination.refuse = None
    h.run_until_connected()
    h.destination.answer()
    assert h.entry(2).state == "delivered"
    assert h.destination.received() == ["C2"]


def test_fifo_holds_across_failures_and_dead_letters(make):
    h = make()
    h.enqueue("C1", "C2", "C3", "C4")
    h.start()
    h.destination.answer("AE")  # C1 retried
    h.run(1)
    h.destination.current.transport.reset()  # C1 again, connection lost
    h.reactor.advance(0)
    h.run(2)
    h.destination.answer("AA")  # C1 delivered
    h.destination.answer("AR")  # C2 dead
    h.destination.answer("AA", control_id="C0")  # C3: wrong MSA-2
    h.run(1)
    h.destination.answer("AA")  # C3 delivered
    h.destination.answer("AA")  # C4 delivered
    assert h.destination.received() == ["C1", "C1", "C1", "C2", "C3", "C3", "C4"]
    assert h.states() == ["delivered", "dead", "delivered", "delivered"]


def test_a_queue_longer_than_one_page_is_delivered_completely_and_in_order(make):
    h = make()
    ids = [f"C{n:04d}" for n in range(sender_module.PAGE * 2 + 37)]
    h.enqueue(*ids)
    h.start()
    for _ in ids:
        h.destination.answer()
    assert h.destination.received() == ids
    assert h.stats().depth == 0
    assert h.stats().delivered_count == len(ids)


def test_a_restarted_sender_resends_the_unacknowledged_head_then_continues_in_order(make):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    h.destination.answer()  # C1 delivered
    assert h.destination.received() == ["C1", "C2"]
    h.sender.stop()  # "killed" with C2 on the wire, unanswered
    h.destination.current.transport.reset()
    h.reactor.advance(0)
    h.sender = h.new_sender()
    h.start()
    h.run(1)
    assert h.destination.received()[-1] == "C2"
    h.destination.answer()
    assert h.states() == ["delivered", "delivered"]
    assert h.destination.received().count("C1") == 1


def test_a_resend_after_a_kill_between_send_and_ack_is_counted_as_a_redelivery(make):
    h = make(ack_timeout=3600.0)
    h.enqueue("C1")
    h.start()  # C1 on the wire; then the engine is "killed": this sender never hears back
    h.run(sender_module.BOOKKEEPING_WINDOW)  # the kill comes after the send was recorded
    h.sender = h.new_sender()
    h.start()
    assert h.destination.received() == ["C1", "C1"]
    h.destination.answer()
    assert h.sample("koppel_delivery_redeliveries_total", destination=NAME) == 1


# --------------------------------------------------------------------------- operators and the store


def test_pause_stops_sending_after_the_message_in_flight_and_resume_continues(make):
    h = make()
    h.enqueue("C1", "C2")
    h.start()
    h.store.write([SetPaused(queue=QUEUE, paused=True)])
    h.sender.poll()
    h.destination.answer()  # the message in flight is still taken
    assert h.entry(1).state == "delivered"
    h.run(30)
    assert h.destination.received() == ["C1"]
    assert h.sender.state == sender_module.PAUSED
    assert h.sample("koppel_queue_paused", queue=QUEUE) == 1
    h.store.write([SetPaused(queue=QUEUE, paused=False)])
    h.sender.poll()
    h.reactor.advance(0)
    assert h.destination.received() == ["C1", "C2"]
    assert h.sample("koppel_queue_paused", queue=QUEUE) == 0


def test_a_message_queued_while_paused_waits_for_resume(make):
    h = make()
    h.store.write([SetPaused(queue=QUEUE, paused=True)])
    h.start()
    h.enqueue("C1")
    h.run(5)
    assert h.destination.connect_times == []
    h.store.write([SetPaused(queue=QUEUE, paused=False)])
    h.run(1)  # the poller notices
    assert h.destination.received() == ["C1"]


def test_retry_now_cuts_a_backoff_short(make):
    h = make(retry=RetryConfig(initial=600.0, factor=2.0, max=3600.0, jitter=0.0))
    h.enqueue("C1")
    h.start()
    h.destination.answer("AE")
    assert h.entry(1).next_attempt_at == T0 + 600
    h.run(5)
    assert h.destination.received() == ["C1"]
    h.store.write([RetryNow(queue=QUEUE)])
    h.sender.poll()
    h.reactor.advance(0)
    assert h.destination.received() == ["C1", "C1"]
    h.destination.answer()
    assert h.entry(1).state == "delivered"


def test_a_poll_before_the_failure_is_committed_does_not_cut_the_backoff_short(make):
    h = make(retry=RetryConfig(initial=600.0, factor=2.0, max=3600.0, jitter=0.0))
    h.enqueue("C1")
    h.start()
    h.destination.current.dataReceived(mllp.encode_frame(ack("AE", "C1")))
    h.sender.poll()  # the store still says "due now": the RecordFailure is not committed yet
    h.reactor.advance(0)
    h.sender.poll()
    h.reactor.advance(0)
    assert h.destination.received() == ["C1"]
    assert h.entry(1).next_attempt_at == T0 + 600


def test_a_store_error_while_reading_the_queue_is_survived_and_nothing_is_resent(make, monkeypatch):
    h = make()
    h.enqueue("C1")
    h.start()
    h.destination.answer()
    real = h.store.queue_head
    failures = []

    def queue_head(queue, limit=100, *, after_id=None, bodies=True, max_bytes=None):
        if limit == sender_module.PAGE and not failures:
            failures.append(after_id)
            raise StoreError("store read failed: database is locked")
        return real(queue, limit, after_id=after_id, bodies=bodies, max_bytes=max_bytes)

    monkeypatch.setattr(h.store, "queue_head", queue_head)
    h.enqueue("C2")
    h.reactor.advance(0)
    assert failures  # the dequeue did fail
    assert h.destination.received() == ["C1"]
    h.run(1)
    assert h.destination.received() == ["C1", "C2"]
    h.destination.answer()
    assert h.states() == ["delivered", "delivered"]


def test_a_store_error_on_the_very_first_read_is_survived(make, monkeypatch):
    h = make()
    h.enqueue("C1")
    real = h.store.queue_head
    calls = {"n": 0}

    def queue_head(queue, limit=100, *, after_id=None, bodies=True, max_bytes=None):
        calls["n"] += 1
        if calls["n"] <= 2:  # the poll's read and the loop's first page
            raise StoreError("store read failed: disk I/O error")
        return real(queue, limit, after_id=after_id, bodies=bodies, max_bytes=max_bytes)

    monkeypatch.setattr(h.store, "queue_head", queue_head)
    h.start()
    assert h.destination.received() == []
    h.run(1)
    assert h.destination.received() == ["C1"]


# --------------------------------------------------------------------------- metrics


def test_metrics_count_sends_acks_retries_dead_letters_and_queue_depth(make):
    h = make()
    h.enqueue("C1", "C2", "C3")
    assert h.sample("koppel_queue_depth", queue=QUEUE) == 3
    h.start()
    h.destination.answer("AE")
    h.run(1)
    h.destination.answer("AA")
    h.destination.answer("AR")
    assert h.destination.received() == ["C1", "C1", "C2", "C3"]
    assert h.sample("koppel_delivery_sent_total", destination=NAME) == 4
    assert h.sample("koppel_delivery_redeliveries_total", destination=NAME) == 1
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="AE") == 1
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="AA") == 1
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="AR") == 1
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 1
    assert h.sample("koppel_dead_letters_total", destination=NAME) == 1
    assert h.sample("koppel_queue_depth", queue=QUEUE) == 1
    assert h.sample("koppel_destination_connected", queue=QUEUE) == 1
    assert h.sample("koppel_delivery_latency_seconds_count", destination=NAME) == 1
    h.settled()
    h.sender.poll()  # the gauges from the store agree once the delivery marks are committed
    assert h.sample("koppel_queue_depth", queue=QUEUE) == 1
    assert h.sample("koppel_queue_oldest_age_seconds", queue=QUEUE) == pytest.approx(1.0)


def test_a_refused_connection_counts_a_retry_but_no_send(make):
    h = make()
    h.destination.refuse = ConnectionRefusedError
    h.enqueue("C1")
    h.start()
    h.run(3)
    assert h.sample("koppel_delivery_sent_total", destination=NAME) == 0
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 3
    assert h.sample("koppel_destination_connected", queue=QUEUE) == 0


# --------------------------------------------------------------------------- found in review
PID = "PID|1||123456782^^^NLMINBIZA^NNNLD||Test^Jose"


def test_a_rewrite_the_messages_charset_cannot_hold_dead_letters_it_and_the_queue_goes_on(make):
    h = make(rewrite=(("MSH-6", "Zé"),))  # "é" is not ASCII
    raw = ("MSH|^~\\&|ZorgDomein|ZD|Koppel|ZH|20260102161545+0100||ORU^R01|C1|P|2.4|||||NLD|ASCII\r"
           + PID + "\r").encode("ascii")
    h.store.write([Append(message=h.message("C1", raw=raw, received_at=T0, charset="ASCII"))])
    h.enqueue("C2")
    h.start()
    h.run(1)
    assert h.entry(1).state == "dead"  # not a crash loop holding the queue
    assert h.destination.received()[:1] == ["C2"]


def test_a_message_stored_with_a_leading_cr_goes_out_as_an_msh_with_its_rewrite(make):
    h = make(rewrite=(("MSH-5", "HIX"),))
    h.store.write([Append(message=h.message("C1", raw=b"\r" + hl7("C1"), received_at=T0))])
    h.sender.enqueued(1)
    h.start()
    (wire,) = [e.payload for e in mllp.FrameReader(max_frame_bytes=1 << 24).feed(h.destination.current.transport.value())
               if type(e) is mllp.FrameReceived]
    assert wire.startswith(b"MSH|^~\\&|ZorgDomein|ZD|HIX|")


def test_an_endpoint_change_while_sending_takes_effect_after_the_message_in_flight(make):
    from dataclasses import replace

    h = make()
    h.enqueue("C1", "C2", "C3")
    h.start()
    assert h.destination.received() == ["C1"]
    h.sender.update({NAME: replace(h.config, endpoint="tls:host=10.1.2.3:port=6661")})  # same queue
    h.destination.answer()
    h.destination.answer()
    assert len(h.destination.connections) == 2  # C2 went out on a connection with the new endpoint


def test_an_endpoint_change_while_connecting_connects_again_with_the_new_one(make):
    from dataclasses import replace

    h = make()
    pending = []
    real = h.destination.connect

    def slow():
        d = defer.Deferred()
        pending.append(d)
        return d

    h.sender._connect = slow
    h.enqueue("C1", "C2")
    h.start()
    assert h.sender.state == sender_module.CONNECTING
    h.sender.update({NAME: replace(h.config, endpoint="tls:host=10.1.2.3:port=6661")})
    pending[0].callback(real().result)  # the old endpoint's connect completes
    h.reactor.advance(0)
    assert len(pending) == 2 and h.destination.received() == []  # not sent on the old one


def test_a_reload_back_and_forth_while_a_message_is_in_flight_ends_in_the_latest_order(make):
    from dataclasses import replace

    h = make()
    h.enqueue("C1", "C2", "C3")
    h.start()
    h.sender.update({NAME: replace(h.config, order="none")})
    h.sender.update({NAME: h.config})  # reverted before C1's ACK
    h.destination.answer()
    h.reactor.advance(0)
    h.destination.answer("AE")  # C2 refused: in FIFO, C3 waits behind it
    h.reactor.advance(0)
    assert h.sender.mode == "fifo" and h.destination.received()[-1] != "C3"


def test_a_reload_back_and_forth_never_runs_ordered_and_unordered_lanes_together(make):
    from dataclasses import replace

    h = make(order="none", parallel=2)
    h.enqueue("C1", "C2", "C3", "C4")
    h.start()
    assert len(h.destination.connections) == 2
    h.sender.update({NAME: replace(h.config, order="fifo", parallel=1)})
    h.sender.update({NAME: replace(h.config, order="none", parallel=3)})
    h.reactor.advance(0)
    for connection in list(h.destination.connections[:2]):
        h.destination.send(mllp.encode_frame(ack("AA", control_id_of(h.destination.frames(connection)[-1]))),
                           connection)
    h.reactor.advance(0)
    in_flight = [control_id_of(h.destination.frames(c)[-1]) for c in h.destination.connections[2:]
                 if h.destination.frames(c)]
    assert len(in_flight) == len(set(in_flight))  # no entry on two lanes at once
    assert h.sender.mode == "none"


def test_stop_while_a_message_is_in_flight_ends_when_it_is_answered_not_after_the_backoff(make):
    h = make(retry=RetryConfig(initial=300.0, factor=2.0, max=300.0, jitter=0.0))
    h.enqueue("C1")
    h.start()
    assert h.sender.state == sender_module.SENDING
    stopped = []
    h.sender.stop().addCallback(stopped.append)
    h.destination.answer("AE")
    h.run(10)
    assert stopped


def test_on_resume_the_sender_reads_the_store_again_so_entries_moved_away_meanwhile_are_not_sent(make):
    """pause, `koppel queue move`, resume: the page read before the pause still held the moved
    entries, which were then sent to the old host as well as queued for the new one."""
    from engine.store import MoveQueue, SetPaused, write_one

    h = make()
    h.enqueue("C1", "C2", "C3")
    h.start()
    write_one(h.store, SetPaused(queue=QUEUE, paused=True, at=T0, reason="moving"))
    h.sender.poll()
    h.destination.answer("AA")  # C1, on the wire at the pause, completes
    h.run(5)
    moved = write_one(h.store, MoveQueue(from_queue=QUEUE, moves=((NAME, "10.9.9.9:6661", NAME),), at=T0 + 5))
    assert len(moved) == 2
    write_one(h.store, SetPaused(queue=QUEUE, paused=False, at=T0 + 6))
    h.run(5)
    assert h.destination.received() == ["C1"]
    assert h.sender.state == sender_module.IDLE


# --------------------------------------------------------------------------- resume after a queue move

NEW_QUEUE = "10.9.9.9:6661"  # where the moved entries' destination delivers now
OTHER = "ris"  # a second destination on the same host:port, whose entries stay


def _enqueue_for(h, control_id, destination):
    h.store.write([Append(message=h.message(control_id, targets=(QueueTarget(queue=QUEUE, destination=destination),)))])
    h.sender.enqueued(1)


def _pause_move_resume(h, *, before_move=lambda: None):
    from engine.store import MoveQueue, SetPaused, write_one

    write_one(h.store, SetPaused(queue=QUEUE, paused=True, at=T0, reason="moving"))
    h.sender.poll()  # the pause is seen while an entry is on the wire
    before_move()
    moved = write_one(h.store, MoveQueue(from_queue=QUEUE, moves=((NAME, NEW_QUEUE, NAME),), at=T0 + 1))
    write_one(h.store, SetPaused(queue=QUEUE, paused=False, at=T0 + 2))
    h.run(2)  # the resume is seen while that entry still waits for its ACK
    return moved


def test_fifo_a_resume_seen_while_sending_still_reads_the_queue_again_before_the_next_entry(make):
    h = make()
    _enqueue_for(h, "C1", OTHER)
    _enqueue_for(h, "C2", NAME)
    _enqueue_for(h, "C3", NAME)
    h.start()  # C1 on the wire, C2 and C3 in the page
    assert len(_pause_move_resume(h)) == 2
    h.destination.answer("AA")
    h.run(5)
    assert h.destination.received() == ["C1"]


def test_unordered_a_resume_seen_while_one_lane_sends_keeps_every_lane_off_the_old_page(make):
    h = make(order="none", parallel=2)
    for cid, destination in (("C1", OTHER), ("C2", OTHER), ("C3", NAME), ("C4", NAME), ("C5", NAME)):
        _enqueue_for(h, cid, destination)
    h.start()  # C1 and C2 on the two lanes
    lane0 = h.destination.connections[0]

    def first_lane_done():
        h.destination.send(mllp.encode_frame(ack("AA", "C1")), lane0)

    assert len(_pause_move_resume(h, before_move=first_lane_done)) == 3
    h.destination.answer("AA")  # C2
    h.run(5)
    assert sorted(h.destination.received()) == ["C1", "C2"]


def test_the_entry_on_the_wire_is_not_moved_away_from_its_queue(make):
    """A pause waits for the entry on the wire: the move leaves it (recorded as in flight by
    the sender) where it may be delivered, instead of queueing it a second time elsewhere."""
    h = make()
    _enqueue_for(h, "C1", NAME)
    _enqueue_for(h, "C2", NAME)
    h.start()
    moved = _pause_move_resume(h, before_move=lambda: h.run(0.1))  # the sender's bookkeeping commits
    assert len(moved) == 1  # C2 only
    h.destination.answer("AA")
    h.run(5)
    assert h.destination.received() == ["C1"]
    assert [e.control_id for e in h.store.queue_head(NEW_QUEUE, 10)] == ["C2"]


def test_marks_the_store_refused_are_retried_together_once_a_second(tmp_path):
    """During a disk-full outage the sender goes on delivering and its marks pile up: retrying
    each alone made one failing transaction (and one error line) per mark per second."""
    h = Harness(tmp_path)
    try:
        h.enqueue("C1", "C2", "C3", "C4", "C5")
        h.start()
        original = h.store.write
        writes: list[int] = []

        def full(ops, wait=True):
            writes.append(len(ops))
            raise StoreError(f"store write of {len(ops)} operations failed: database or disk is full")

        h.store.write = full
        for _ in range(5):
            h.destination.answer("AA")
            h.run(0.1)
        h.run(1.0)  # every mark refused at least once by now
        writes.clear()
        h.run(3.0)  # three retry rounds
        assert writes == [5, 5, 5]
        h.store.write = original  # room again
        h.run(1.0)
        assert h.states() == ["delivered"] * 5
    finally:
        h.sender.stop()
        h.store.close()


def test_a_queue_read_in_pages_bounded_by_bytes_delivers_everything_in_order(make, monkeypatch):
    """Large letters are read a few at a time (PAGE_BYTES), and paging on by bytes loses,
    repeats or reorders nothing."""
    monkeypatch.setattr(sender_module, "PAGE_BYTES", 3 * len(hl7("C01")))
    h = make()
    pages = []
    real = h.store.queue_head

    def queue_head(*args, **kwargs):
        page = real(*args, **kwargs)
        if kwargs.get("bodies", True):
            pages.append(len(page))
        return page

    monkeypatch.setattr(h.store, "queue_head", queue_head)
    names = [f"C{n:02d}" for n in range(1, 11)]
    h.enqueue(*names)
    h.start()
    for _ in names:
        h.destination.answer("AA")
        h.run(0.001)  # (delivery marks are committed within 20 ms: some pages find them unsettled)
    h.run(1)
    assert h.destination.received() == names
    assert h.stats().depth == 0
    assert max(pages) == 3 and len(pages) >= 4
