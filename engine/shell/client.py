"""An MLLP client connection: one message in flight, its ACK matched by MSA-2.

Used by ``koppel send``, ``koppel bench`` and delivery. On an ACK timeout the
connection is closed, so a late ACK can never be read as the next message's.

The ACK timeout counts from when the destination has taken the whole message: a large one
over a slow link may take longer to write than the timeout (a letter with its PDF), and it
must not time out while the destination is still reading it. While bytes are still on
their way the connection is given up only when the destination takes none of them for a
whole timeout (it stopped reading, or the connection is silently dead).
"""

from __future__ import annotations

import socket
from collections import deque

from twisted.internet import defer, protocol
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionClosed, TimeoutError

from engine.core import mllp
from engine.shell.wire import keep_alive, send_now, unsent

# While a message is still being written, how often its progress is looked at.
WRITE_CHECK = 0.25
# A frame up to this size almost always goes to the kernel whole: not looked at after the write.
LARGE = 64 * 1024
# What an ACK timeout fails a request with (a twisted.internet.error.TimeoutError, the class an
# endpoint's connect timeout also raises: describe_failure tells them apart by it).
ACK_TIMEOUT = "no acknowledgement in time"


class MLLPClient(protocol.Protocol):
    """Sends frames and hands back each answer frame's payload, in order."""

    def __init__(self, *, clock, max_frame_bytes: int = 64 * 1024 * 1024, keepalive: float | None = None) -> None:
        self.clock = clock
        self.keepalive = keepalive  # seconds idle before TCP keepalive probes; None: the OS default (off)
        # Lenient: an ACK that ends with FS alone is the ACK (systems that omit the CR exist;
        # strict reading would time every message out). The CR, when it comes, is consumed.
        self.reader = mllp.FrameReader(max_frame_bytes=max_frame_bytes, lenient=True)
        self._waiting: deque[tuple[defer.Deferred, object]] = deque()
        self.connected_d: defer.Deferred = defer.Deferred()
        self.lost_d: defer.Deferred = defer.Deferred()
        self.junk = 0
        self.answered = 0  # answers matched to requests on this connection
        self.bytes_in = 0
        self.junk_bytes_in = 0  # of bytes_in, those outside any frame (a line end after an ACK)

    def connectionMade(self) -> None:
        if self.keepalive is not None:
            keep_alive(self.transport, self.keepalive)
        self.connected_d.callback(self)

    def request(self, payload: bytes, timeout: float | None = None) -> defer.Deferred:
        """Write one message; fires with the next answer frame's payload."""
        d: defer.Deferred = defer.Deferred()
        waiter = [d, None]  # [deferred, its timeout call]
        self._waiting.append(waiter)
        frame = mllp.encode_frame(payload)
        send_now(self.transport, frame)
        if timeout is not None:
            left = unsent(self.transport) if len(frame) > LARGE else 0
            if left:  # still being written: watched from now on
                waiter[1] = self.clock.callLater(
                    min(timeout, WRITE_CHECK), self._deadline, waiter, timeout, left, self.clock.seconds()
                )
            else:
                waiter[1] = self.clock.callLater(timeout, self._deadline, waiter, timeout, len(frame), None)
        return d

    def dataReceived(self, data: bytes) -> None:
        # Only requests written before these bytes arrived can be answered by them: a request
        # made while this read is dispatched (the sender's next message) must not take a
        # second, unsolicited frame of the same read for its answer.
        answerable = len(self._waiting)
        self.bytes_in += len(data)
        if data[:1] == b"\r" and self.reader.awaiting_cr:
            self.junk_bytes_in += 1  # the end of the last answer, not the start of one
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
                self.junk_bytes_in += event.size

    @property
    def frame_bytes_in(self) -> int:
        """Bytes read that belong to frames (whole or begun): an answer, or the start of one."""
        return self.bytes_in - self.junk_bytes_in

    def mark(self) -> tuple[int, int]:
        """Where this connection stands before a request, for ``met_close``."""
        return self.answered, self.frame_bytes_in

    def met_close(self, error: BaseException, mark: tuple[int, int]) -> bool:
        """Did a request fail only because the peer closed after its previous answer? The
        connection had answered before and nothing of an answer came for this request (bytes
        outside frames, a line end after the last ACK, do not count): the message met the
        close, it was not refused, and may go again at once on a new connection (as HTTP
        clients do with a stale keep-alive)."""
        answered, frame_bytes = mark
        return answered > 0 and isinstance(error, ConnectionClosed) and self.frame_bytes_in == frame_bytes

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

    def _deadline(self, waiter: list, timeout: float, before: int, progress_at: float | None) -> None:
        """The ACK timeout is up, unless the message is still on its way and the destination is
        taking it: then the timeout starts again once it has the last byte. ``before``: bytes
        not taken at the last look; ``progress_at``: when the destination last took some (None:
        not seen taking any since the timeout started)."""
        d = waiter[0]
        if d.called:
            return
        left = unsent(self.transport)
        now = self.clock.seconds()
        if left == 0:
            if progress_at is not None:  # it took the last bytes since the last look: now the ACK's turn
                waiter[1] = self.clock.callLater(timeout, self._deadline, waiter, timeout, 0, None)
                return
            self._timed_out(d)
            return
        if left < before:
            before, progress_at = left, now
        elif progress_at is None or now - progress_at >= timeout:
            self._timed_out(d)  # nothing taken for a whole timeout: not reading, or gone
            return
        waiter[1] = self.clock.callLater(
            min(timeout, WRITE_CHECK), self._deadline, waiter, timeout, before, progress_at
        )

    def _timed_out(self, d: defer.Deferred) -> None:
        self.transport.abortConnection()
        self._fail_all(TimeoutError(ACK_TIMEOUT))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._fail_all(_lost(reason))
        if not self.lost_d.called:
            self.lost_d.callback(None)

    def _fail_all(self, error: Exception) -> None:
        while self._waiting:
            d, call = self._waiting.popleft()
            if call is not None and call.active():
                call.cancel()
            if not d.called:
                d.errback(error)


class TLSFailed(ConnectionError):
    """The TLS layer ended the connection: the destination's certificate not trusted, expired or
    for another host name, no common protocol version. Not a closed connection: an operator
    must see it for what it is."""


def _lost(reason) -> Exception:
    """What the requests still waiting are failed with when the connection is gone."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - Twisted's TLS needs it; without it there is no TLS
        SSL = None
    if SSL is not None and reason is not None and reason.check(SSL.Error):
        errors = reason.value.args[0] if reason.value.args else None
        if isinstance(errors, list) and errors and all(isinstance(e, tuple) and e for e in errors):
            text = "; ".join(str(e[-1]) for e in errors)
        else:
            text = str(reason.value) or type(reason.value).__name__
        return TLSFailed(text)
    return ConnectionClosed("connection closed before the acknowledgement")


def describe_failure(error: BaseException) -> str:
    """What an operator reads for a failed connect or request: no message content, no class
    names where a phrase says it better (logs, `koppel queue list`, `koppel send`)."""
    if isinstance(error, TLSFailed):  # OpenSSL's reasons: no message content in them
        return f"TLS failed ({error})"
    if isinstance(error, TimeoutError):  # Twisted's: ours for the ACK, the endpoint's for a connect
        return ACK_TIMEOUT if getattr(error, "osError", None) == ACK_TIMEOUT else "connect timed out"
    if isinstance(error, (defer.TimeoutError, ConnectingCancelledError)):
        return "connect timed out"  # a connect cut by addTimeout (a TCP one fails as cancelled)
    name = type(error).__name__
    known = _KNOWN_ERRORS.get(name)
    if known is not None:
        return known
    # Twisted names few of the OS's connect errors; the rest (no route to host, permission
    # denied by a local firewall) carry the OS's reason, which an operator needs to see.
    reason = error.args[0] if isinstance(error, ConnectError) and error.args else None
    if isinstance(reason, str) and reason:
        return f"connection failed ({reason[0].lower()}{reason[1:]})"
    return f"connection failed ({name})"


_KNOWN_ERRORS = {
    "TimeoutError": "no acknowledgement in time",
    "ConnectionClosed": "connection closed before the acknowledgement",
    "ConnectionRefusedError": "connection refused",
    "ConnectionLost": "connection lost",
    "DNSLookupError": "host name could not be resolved",
    "CancelledError": "connect timed out",
    "TCPTimedOutError": "connect timed out (TCP)",
}


class MLLPClientFactory(protocol.ClientFactory):
    def __init__(self, *, clock, max_frame_bytes: int = 64 * 1024 * 1024, keepalive: float | None = None) -> None:
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes
        self.keepalive = keepalive

    def buildProtocol(self, addr):
        client = MLLPClient(clock=self.clock, max_frame_bytes=self.max_frame_bytes, keepalive=self.keepalive)
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
