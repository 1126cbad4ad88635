"""The MLLP client: answers matched to requests in order, unsolicited frames never matched,
a timeout closes the connection."""

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
