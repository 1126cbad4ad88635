"""MLLP framing, sans-IO: ``VT payload FS CR``.

``FrameReader.feed(bytes)`` returns the events the bytes complete; it never blocks,
never raises on peer input, and checks the size limit while a frame is still
incomplete. Bytes outside frames are reported and dropped, never glued onto the
next message; the CR after FS is consumed so it cannot leak into the next frame.
"""

from __future__ import annotations

from dataclasses import dataclass

VT = 0x0B
FS = 0x1C
CR = 0x0D
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"


def encode_frame(payload: bytes) -> bytes:
    """Wrap one HL7 message in an MLLP block."""
    return b"\x0b" + payload + b"\x1c\r"


@dataclass(frozen=True, slots=True)
class FrameReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class JunkDiscarded:
    """Bytes outside any frame (before VT, between frames) that were dropped."""

    size: int


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame went past the limit; its rest was discarded up to FS.

    ``head`` keeps the first bytes so the shell can still read MSH and answer AR.
    """

    size: int
    head: bytes


@dataclass(frozen=True, slots=True)
class FrameAborted:
    """A frame that was started but not properly ended (discarded, nothing stored)."""

    size: int
    reason: str  # "vt-inside-frame" | "fs-without-cr" | "eof"


Event = FrameReceived | JunkDiscarded | FrameTooLarge | FrameAborted

_IDLE = 0  # between frames: looking for VT
_IN_FRAME = 1  # after VT: collecting payload until FS
_AFTER_FS = 2  # saw FS as the last byte of a read: the next byte decides
_DISCARDING = 3  # over the limit: dropping bytes until FS


class FrameReader:
    """Turns a byte stream into MLLP frame events (h11-style: data in, events out)."""

    __slots__ = (
        "max_frame_bytes",
        "lenient",
        "head_bytes",
        "_state",
        "_buf",
        "_size",
        "_skip_cr",
        "_head",
    )

    def __init__(
        self, *, max_frame_bytes: int, lenient: bool = False, head_bytes: int = 16384
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self.lenient = lenient
        self.head_bytes = head_bytes
        self._state = _IDLE
        self._buf = bytearray()
        self._size = 0  # bytes of the current oversized frame
        self._skip_cr = False
        self._head = b""

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not yet ended (for the frame timeout)."""
        return self._state != _IDLE

    @property
    def awaiting_cr(self) -> bool:
        """A frame ended with FS as the last byte of a read (lenient): a CR that starts the
        next read is that frame's end, consumed without an event."""
        return self._skip_cr

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        end = len(data)
        junk = 0
        buf = self._buf
        while pos < end:
            state = self._state
            if state == _IDLE:
                if self._skip_cr:
                    self._skip_cr = False
                    if data[pos] == CR:
                        pos += 1
                        continue
                vt = data.find(b"\x0b", pos)
                if vt < 0:
                    junk += end - pos
                    break
                junk += vt - pos
                pos = vt + 1
                self._state = _IN_FRAME
            elif state == _IN_FRAME:
                fs = data.find(b"\x1c", pos)
                stop = end if fs < 0 else fs
                # A VT counts only up to the byte that breaks the limit (as if fed one
                # byte at a time); past it the frame is already being discarded.
                room = self.max_frame_bytes - len(buf) + 1
                vt = data.find(b"\x0b", pos, min(stop, pos + room))
                if vt >= 0:
                    events.append(FrameAborted(len(buf) + vt - pos, "vt-inside-frame"))
                    buf.clear()
                    pos = vt + 1
                    continue
                if len(buf) + stop - pos > self.max_frame_bytes:
                    self._start_discarding(data, pos, stop)
                    pos = stop
                    continue
                if fs < 0:
                    buf += data[pos:]
                    break
                if fs + 1 < end:
                    nxt = data[fs + 1]
                    if nxt == CR or self.lenient:
                        events.append(FrameReceived(self._take(data, pos, fs)))
                        pos = fs + 2 if nxt == CR else fs + 1
                    else:
                        events.append(FrameAborted(len(buf) + fs - pos, "fs-without-cr"))
                        buf.clear()
                        pos = fs + 1
                    self._state = _IDLE
                elif self.lenient:
                    # FS ends the read: a lenient peer may never send the CR, so the
                    # frame is complete now; a CR in the next read is still consumed.
                    events.append(FrameReceived(self._take(data, pos, fs)))
                    self._skip_cr = True
                    self._state = _IDLE
                    break
                else:
                    buf += data[pos:fs]
                    self._state = _AFTER_FS
                    break
            elif state == _AFTER_FS:
                if data[pos] == CR or self.lenient:
                    events.append(FrameReceived(bytes(buf)))
                    if data[pos] == CR:
                        pos += 1
                else:
                    events.append(FrameAborted(len(buf), "fs-without-cr"))
                buf.clear()
                self._state = _IDLE
            else:  # _DISCARDING
                fs = data.find(b"\x1c", pos)
                if fs < 0:
                    self._size += end - pos
                    break
                self._size += fs - pos
                events.append(FrameTooLarge(self._size, self._head))
                self._head = b""
                self._size = 0
                self._skip_cr = True
                self._state = _IDLE
                pos = fs + 1
        if junk:
            # Reported once per read, ahead of the frames, so counting stays cheap.
            events.insert(0, JunkDiscarded(junk))
        return events

    def eof(self) -> list[Event]:
        """The peer closed: a frame still open is reported as aborted (nothing stored)."""
        if self._state == _IDLE:
            return []
        size = self._size if self._state == _DISCARDING else len(self._buf)
        self._buf.clear()
        self._head = b""
        self._size = 0
        self._state = _IDLE
        return [FrameAborted(size, "eof")]

    def _take(self, data: bytes, start: int, stop: int) -> bytes:
        buf = self._buf
        if not buf:
            return bytes(data[start:stop])
        buf += data[start:stop]
        payload = bytes(buf)
        buf.clear()
        return payload

    def _start_discarding(self, data: bytes, start: int, stop: int) -> None:
        buf = self._buf
        room = self.head_bytes - len(buf)
        head = bytes(buf[: self.head_bytes])
        if room > 0:
            head += bytes(data[start : min(stop, start + room)])
        self._head = head
        self._size = len(buf) + stop - start
        buf.clear()
        self._state = _DISCARDING

