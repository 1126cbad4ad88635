"""An MLLP client connection: one message in flight, its ACK matched by MSA-2.

Used by ``koppel send``, ``koppel bench`` and delivery. On an ACK timeout the
connection is closed, so a late ACK can never be read as the next message's.
"""

from __future__ import annotations

import socket
from collections import deque

from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionClosed, TimeoutError

from engine.core import mllp
from engine.shell.wire import send_now


class MLLPClient(protocol.Protocol):
    """Sends frames and hands back each answer frame's payload, in order."""

    def __init__(self, *, clock, max_frame_bytes: int = 64 * 1024 * 1024) -> None:
        self.clock = clock
        self.reader = mllp.FrameReader(max_frame_bytes=max_frame_bytes)
        self._waiting: deque[tuple[defer.Deferred, object]] = deque()
        self.connected_d: defer.Deferred = defer.Deferred()
        self.lost_d: defer.Deferred = defer.Deferred()
        self.junk = 0
        self.answered = 0  # answers matched to requests on this connection
        self.bytes_in = 0

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def request(self, payload: bytes, timeout: float | None = None) -> defer.Deferred:
        """Write one message; fires with the next answer frame's payload."""
        d: defer.Deferred = defer.Deferred()
        call = None
        if timeout is not None:
            call = self.clock.callLater(timeout, self._timed_out, d)
        self._waiting.append((d, call))
        send_now(self.transport, mllp.encode_frame(payload))
        return d

    def dataReceived(self, data: bytes) -> None:
        # Only requests written before these bytes arrived can be answered by them: a request
        # made while this read is dispatched (the sender's next message) must not take a
        # second, unsolicited frame of the same read for its answer.
        answerable = len(self._waiting)
        self.bytes_in += len(data)
        for event in self.reader.feed(data):
            if type(event) is mllp.FrameReceived:
                if answerable == 0 or not self._waiting:
                    self.junk += 1  # an answer nobody asked for: never matched later
                    continue
                answerable -= 1
                self.answered += 1
                d, call = self._waiting.popleft()
                if call is not None and call.active():
                    call.cancel()
                d.callback(event.payload)
            elif type(event) is mllp.JunkDiscarded:
                self.junk += event.size

    def peer_closed(self) -> bool:
        """Has the peer closed its side, its FIN not yet read? Many systems close the connection
        after each ACK; the FIN arrives with the ACK or just after it, and the reactor reads it
        only on a later turn. A message written meanwhile meets the close and would fail.
        One non-blocking peek at the socket; False when it cannot tell (TLS, no socket)."""
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # open, nothing unread
        except OSError:
            return True  # reset: as closed

    def _timed_out(self, d: defer.Deferred) -> None:
        self.transport.abortConnection()
        self._fail_all(TimeoutError("no acknowledgement in time"))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._fail_all(ConnectionClosed("connection closed before the acknowledgement"))
        if not self.lost_d.called:
            self.lost_d.callback(None)

    def _fail_all(self, error: Exception) -> None:
        while self._waiting:
            d, call = self._waiting.popleft()
            if call is not None and call.active():
                call.cancel()
            if not d.called:
                d.errback(error)


class MLLPClientFactory(protocol.ClientFactory):
    def __init__(self, *, clock, max_frame_bytes: int = 64 * 1024 * 1024) -> None:
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes

    def buildProtocol(self, addr):
        client = MLLPClient(clock=self.clock, max_frame_bytes=self.max_frame_bytes)
        client.factory = self
        return client


def connect(reactor, endpoint_description: str, *, timeout: float = 10.0) -> defer.Deferred:
    """Connect to a client endpoint string (``tcp:host=...:port=...``); fires with MLLPClient."""
    from twisted.internet.endpoints import clientFromString

    endpoint = clientFromString(reactor, endpoint_description)
    d = endpoint.connect(MLLPClientFactory(clock=reactor))
    return d


def host_port_endpoint(target: str, timeout: float = 10.0) -> str:
    """``HOST:PORT`` (or an endpoint string) -> a Twisted client endpoint string."""
    if target.startswith(("tcp:", "ssl:", "tls:", "unix:")):
        return target
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {target!r}")
    host = host.strip("[]").replace(":", "\\:")
    return f"tcp:host={host}:port={port}:timeout={int(timeout)}"
