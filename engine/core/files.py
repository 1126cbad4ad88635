"""Reading HL7 message files written by people and tools (for ``koppel send``/``bench``).

Files come with LF or CRLF line ends from editors; HL7 wants CR. A file may hold
several messages, each starting at an ``MSH`` segment, separated by blank lines or
not. A batch file (FHS/BHS first) is sent whole, as one frame.
"""

from __future__ import annotations


def normalise_segments(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def split_messages(data: bytes, *, raw: bool = False) -> list[bytes]:
    """Messages in a file; ``raw`` keeps bytes untouched and sends the file as one message."""
    if raw:
        return [data] if data.strip() else []
    text = normalise_segments(data)
    body = text[3:] if text.startswith(b"\xef\xbb\xbf") else text
    if body.lstrip(b"\r").startswith((b"FHS", b"BHS")):
        return [text.strip(b"\r") + b"\r"]
    messages: list[list[bytes]] = []
    for segment in text.split(b"\r"):
        stripped = segment.strip()
        if not stripped:
            continue
        if stripped.startswith(b"MSH") or stripped.startswith(b"\xef\xbb\xbfMSH") or not messages:
            messages.append([])
        messages[-1].append(segment)
    return [b"\r".join(segments) + b"\r" for segments in messages]


def with_control_id(message: bytes, control_id: bytes) -> bytes:
    """The same message with MSH-10 replaced (the bench needs unique ids)."""
    start = 3 if message.startswith(b"\xef\xbb\xbf") else 0
    sep = message[start + 3 : start + 4]
    end = message.find(b"\r", start)
    end = len(message) if end < 0 else end
    fields = message[start:end].split(sep)
    while len(fields) < 10:
        fields.append(b"")
    fields[9] = control_id
    return message[:start] + sep.join(fields) + message[end:]
