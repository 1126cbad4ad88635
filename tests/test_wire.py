"""send_now: a frame goes straight to an idle socket, and nothing is reordered or lost
when the socket is busy, full or broken."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from engine.shell.wire import KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, keep_alive, send_now


class _Connection(tcp.Connection):
    """A Twisted TCP transport over one end of a socketpair, on a reactor that never runs."""

    def __init__(self, skt) -> None:
        skt.setblocking(False)
        super().__init__(skt, protocol.Protocol(), MemoryReactor())
        self.connected = True
        self.writing = 0

    def startWriting(self) -> None:  # what Twisted does on a buffered write: wait for POLLOUT
        self.writing += 1


class _Socket:
    """Stands in for a socket whose send takes ``take`` bytes or raises ``error``."""

    def __init__(self, take: int = 0, error: Exception | None = None) -> None:
        self.take, self.error, self.sent = take, error, b""

    def send(self, data) -> int:
        if self.error is not None:
            raise self.error
        self.sent += bytes(data[: self.take])
        return min(self.take, len(data))

    def fileno(self) -> int:
        return -1


@pytest.fixture
def pair():
    ours, peer = socket.socketpair()
    yield _Connection(ours), peer
    ours.close()
    peer.close()


def test_an_idle_socket_gets_the_bytes_at_once_without_buffering(pair):
    conn, peer = pair
    send_now(conn, b"\x0bMSH|ACK\x1c\r")
    assert peer.recv(100) == b"\x0bMSH|ACK\x1c\r"
    assert conn.writing == 0
    assert conn.dataBuffer == b"" and conn._tempDataBuffer == []


def test_bytes_already_buffered_go_first(pair):
    conn, peer = pair
    conn.write(b"first")  # buffered by Twisted, waiting for the reactor
    send_now(conn, b"second")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)  # nothing jumped the queue
    conn.doWrite()
    assert peer.recv(100) == b"firstsecond"


def test_what_the_kernel_does_not_take_is_buffered_in_order(pair):
    conn, _ = pair
    conn.socket = _Socket(take=3)
    send_now(conn, b"abcdefgh")
    assert conn.socket.sent == b"abc"
    assert conn.writing == 1
    assert b"".join(conn._tempDataBuffer) + conn.dataBuffer == b"defgh"


def test_a_full_socket_buffers_everything(pair):
    conn, _ = pair
    conn.socket = _Socket(error=BlockingIOError())
    send_now(conn, b"abc")
    assert b"".join(conn._tempDataBuffer) == b"abc"
    assert conn.writing == 1


def test_a_broken_socket_is_left_to_twisted(pair):
    conn, _ = pair
    conn.socket = _Socket(error=ConnectionResetError())
    send_now(conn, b"abc")  # never raises: Twisted meets the error on its write and closes
    assert b"".join(conn._tempDataBuffer) == b"abc"


def test_a_closing_connection_is_left_to_twisted(pair):
    conn, peer = pair
    conn.disconnecting = True
    send_now(conn, b"abc")
    assert b"".join(conn._tempDataBuffer) == b"abc"  # Twisted's write decides what a closing socket gets
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_other_transports_use_their_own_write():
    transport = StringTransport()
    send_now(transport, b"abc")
    assert transport.value() == b"abc"


# --------------------------------------------------------------------------- keep_alive


@pytest.fixture
def tcp_connection():
    """A Twisted TCP transport over a real loopback TCP connection (keepalive is a TCP option)."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    connection = _Connection(accepted)
    yield connection, accepted
    client.close()
    accepted.close()


def _options(sock) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keepalive options")
def test_keep_alive_sets_the_idle_time_interval_and_probes(tcp_connection):
    connection, sock = tcp_connection
    assert keep_alive(connection, 45.0) is True
    assert _options(sock) == (1, 45, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES)


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keepalive options")
def test_a_keepalive_longer_than_the_kernel_takes_still_gets_probes_at_the_longest_idle(tcp_connection):
    """Linux refuses a TCP_KEEPIDLE over 32767 s, and the interval and probe count were then
    never set: the kernel's 2 h, 75 s and 9 probes. (The config refuses such a value too.)"""
    connection, sock = tcp_connection
    assert keep_alive(connection, 36000.0) is True
    assert _options(sock) == (1, 32767, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES)


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keepalive options")
def test_keep_alive_reaches_the_tcp_connection_under_a_tls_wrapper(tcp_connection):
    connection, sock = tcp_connection

    class Wrapper:  # as TLSMemoryBIOProtocol: the TCP transport is its .transport
        transport = connection

    assert keep_alive(Wrapper(), 20.0) is True
    assert _options(sock)[:2] == (1, 20)


def test_keep_alive_none_switches_it_off(tcp_connection):
    connection, sock = tcp_connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    assert keep_alive(connection, None) is True
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_keep_alive_on_a_transport_without_a_socket_does_nothing():
    assert keep_alive(StringTransport(), 60.0) is False


def test_keep_alive_on_a_closed_socket_does_not_raise(tcp_connection):
    connection, sock = tcp_connection
    sock.close()
    assert keep_alive(connection, 60.0) is False
