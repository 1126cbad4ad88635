"""The MLLP client: answers matched to requests in order, unsolicited frames never matched,
a timeout closes the connection."""

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from engine.core import mllp
from engine.shell.client import MLLPClient


def connected():
    clock = MemoryReactorClock()
    client = MLLPClient(clock=clock)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock


def test_answers_go_to_requests_in_the_order_they_were_written():
    client, transport, _ = connected()
    got = []
    client.request(b"MSH|1").addCallback(got.append)
    client.request(b"MSH|2").addCallback(got.append)
    client.dataReceived(mllp.encode_frame(b"A1") + mllp.encode_frame(b"A2"))
    assert got == [b"A1", b"A2"]
    assert transport.value() == mllp.encode_frame(b"MSH|1") + mllp.encode_frame(b"MSH|2")


def test_a_second_frame_in_the_same_read_never_answers_a_request_made_while_reading():
    client, _, _ = connected()
    got = []

    def answered(payload):
        got.append(payload)
        client.request(b"MSH|next").addCallback(lambda p: got.append(("next", p)))

    client.request(b"MSH|first").addCallback(answered)
    client.dataReceived(mllp.encode_frame(b"ACK-first") + mllp.encode_frame(b"ACK-again"))
    assert got == [b"ACK-first"]
    assert client.junk == 1
    client.dataReceived(mllp.encode_frame(b"ACK-next"))
    assert got == [b"ACK-first", ("next", b"ACK-next")]


def test_a_frame_with_no_request_waiting_is_junk():
    client, _, _ = connected()
    client.dataReceived(mllp.encode_frame(b"ACK-nobody-asked"))
    got = []
    client.request(b"MSH|1").addCallback(got.append)
    assert got == [] and client.junk == 1


def test_a_timeout_closes_the_connection_and_fails_the_request():
    client, transport, clock = connected()
    failures = []
    client.request(b"MSH|1", timeout=5).addErrback(failures.append)
    clock.advance(5)
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    assert failures and failures[0].type.__name__ == "TimeoutError"


def test_peer_closed_sees_the_peers_fin_before_the_reactor_reads_it():
    """Systems that close after each ACK: the FIN waits unread behind the ACK (a real socket pair)."""
    import socket

    ours, theirs = socket.socketpair()
    try:
        client, transport, _ = connected()
        transport.socket = ours
        assert not client.peer_closed()  # open, nothing unread
        theirs.sendall(b"\x0bA1\x1c\r")
        assert not client.peer_closed()  # an answer waits: not closed as far as we know
        ours.recv(100)
        theirs.close()
        assert client.peer_closed()
        assert ours.recv(100) == b""  # only peeked: the reactor still reads the FIN itself
    finally:
        ours.close()


def test_peer_closed_cannot_tell_without_a_socket():
    client, _, _ = connected()  # StringTransport; TLS transports have none either
    assert not client.peer_closed()


def test_answers_and_bytes_are_counted_per_connection():
    client, _, _ = connected()
    client.request(b"MSH|1")
    client.dataReceived(b"junk" + mllp.encode_frame(b"A1") + mllp.encode_frame(b"A2"))
    assert (client.answered, client.bytes_in) == (1, 4 + 2 * 5)


class _SocketTransport:
    """A Twisted TCP transport over one end of a socket pair, on the test's clock; its buffer
    is written only when the test says so (``flush``), as the reactor would on POLLOUT."""

    def __init__(self):
        import socket

        from twisted.internet import tcp

        class Connection(tcp.Connection):
            def startWriting(self):
                pass

            def stopWriting(self):
                pass

        self.clock = MemoryReactorClock()
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.client = MLLPClient(clock=self.clock)
        self.transport = Connection(self.ours, self.client, self.clock)
        self.transport.connected = True
        self.client.makeConnection(self.transport)

    def flush(self):
        while self.transport.dataBuffer or self.transport._tempDataBuffer:
            before = len(self.transport.dataBuffer) - self.transport.offset + self.transport._tempDataLen
            self.transport.doWrite()
            if len(self.transport.dataBuffer) - self.transport.offset + self.transport._tempDataLen == before:
                return  # the socket is full

    def peer_reads(self, size):
        self.peer.setblocking(False)
        got = 0
        while got < size:
            try:
                chunk = self.peer.recv(min(65536, size - got))
            except BlockingIOError:
                break
            got += len(chunk)
        self.flush()
        return got

    def run_for(self, seconds, step=0.05):
        """Time passes as on a real reactor: every call runs when it is due, not after a jump."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def close(self):
        self.ours.close()
        self.peer.close()


def test_the_ack_timeout_waits_while_a_slow_destination_is_still_taking_a_large_message():
    """A letter with its PDF over a slow link takes longer to write than the ACK timeout: the
    timeout counts from when the destination has the last byte, not from the first."""
    pair = _SocketTransport()
    try:
        failures = []
        pair.client.request(b"MSH|" + b"A" * 4_000_000, timeout=5).addErrback(failures.append)
        taken = 0
        for _ in range(40):  # 10 s of reading, a step at a time: twice the timeout
            taken += pair.peer_reads(100_000)
            pair.clock.advance(0.25)
            assert not failures, f"timed out while the destination was still reading ({taken} bytes taken)"
        while pair.peer_reads(1_000_000):  # the rest; now the ACK timeout runs
            pass
        assert_times_out_after(pair, failures, 5)
    finally:
        pair.close()


def test_a_destination_that_stops_reading_a_large_message_times_out_after_the_ack_timeout():
    pair = _SocketTransport()
    try:
        failures = []
        pair.client.request(b"MSH|" + b"A" * 4_000_000, timeout=5).addErrback(failures.append)
        pair.peer_reads(100_000)  # then it stops reading
        assert_times_out_after(pair, failures, 5)
    finally:
        pair.close()


def assert_times_out_after(pair, failures: list, timeout: float) -> None:
    """Not failed half a second before ``timeout`` from now, failed with TimeoutError after it."""
    pair.run_for(timeout - 0.5)
    assert not failures
    pair.run_for(1)
    assert failures and failures[0].type.__name__ == "TimeoutError"


def test_a_tls_failure_is_reported_as_such_not_as_a_closed_connection():
    from OpenSSL import SSL
    from twisted.internet.error import ConnectionClosed
    from twisted.python.failure import Failure

    from engine.shell.client import TLSFailed

    client, _, _ = connected()
    failures = []
    client.request(b"MSH|1", timeout=5).addErrback(failures.append)
    client.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    assert failures[0].type is TLSFailed and str(failures[0].value) == "certificate verify failed"
    client, _, _ = connected()
    client.request(b"MSH|1", timeout=5).addErrback(failures.append)
    client.connectionLost(Failure(ConnectionClosed()))
    assert failures[1].type is ConnectionClosed


def test_an_ack_that_ends_with_fs_alone_answers_at_once():
    """Some systems end their ACK frame with FS and no CR. Read strictly, every message would
    wait for a CR that never comes and time out, and the queue would never move."""
    client, transport, clock = connected()
    got, failures = [], []
    client.request(b"MSH|1", timeout=5).addCallbacks(got.append, failures.append)
    client.dataReceived(b"\x0bACK-1\x1c")
    assert got == [b"ACK-1"]
    clock.advance(5)
    assert failures == [] and not transport.disconnecting


def test_the_cr_after_an_fs_that_ended_a_read_is_the_end_of_that_ack_not_junk_or_an_answer():
    client, _, _ = connected()
    got = []
    client.request(b"MSH|1").addCallback(got.append)
    client.dataReceived(b"\x0bACK-1\x1c")
    client.request(b"MSH|2").addCallback(got.append)
    client.dataReceived(b"\r")
    client.dataReceived(b"\x0bACK-2\x1c\r\x0bACK-3\x1c")
    assert got == [b"ACK-1", b"ACK-2"]
    assert client.junk == 1  # ACK-3: nobody asked


@pytest.mark.parametrize(
    "first_ack, after_request, met",
    [
        # the FS ended the previous ACK; the CR came after the next message went out, then the
        # FIN: the CR is no part of an answer to the new message, which met the close
        (b"\x0bACK-1\x1c", b"\r", True),
        # an answer to the new message had begun when the connection closed: not a stale one
        (b"\x0bACK-1\x1c\r", b"\x0bMSH|partial", False),
    ],
    ids=["late-cr", "answer-begun"],
)
def test_whether_a_request_met_the_close_after_the_previous_ack(first_ack, after_request, met):
    from twisted.internet.error import ConnectionClosed
    from twisted.python.failure import Failure

    client, _, _ = connected()
    client.request(b"MSH|1")
    client.dataReceived(first_ack)
    mark = client.mark()
    failures = []
    client.request(b"MSH|2").addErrback(failures.append)
    client.dataReceived(after_request)
    client.connectionLost(Failure(ConnectionClosed()))
    assert client.met_close(failures[0].value, mark) is met


def test_describe_failure_tells_an_ack_timeout_from_a_connect_timeout():
    """Both are Twisted's TimeoutError: the endpoint's connect timeout raises it too."""
    from twisted.internet import error

    from engine.shell.client import describe_failure

    client, _, clock = connected()
    failures = []
    client.request(b"MSH|1", timeout=5).addErrback(failures.append)
    clock.advance(5)
    assert describe_failure(failures[0].value) == "no acknowledgement in time"
    assert describe_failure(error.TimeoutError()) == "connect timed out"
