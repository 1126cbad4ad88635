"""A decoded HL7 v2 message as an immutable, lazily split view (Layer 1 of the mapping design).

``Message.parse`` decodes the bytes once and splits them into segment lines once; a
segment's fields are split only when a path asks for that segment, and then cached on
the segment. Nothing here raises on peer input: a message without a readable MSH is
read with the default delimiters, and unreadable bytes decode as U+FFFD.

Values returned by ``Segment.field`` are raw (still escaped); ``unescape`` turns them
into text once they have been split into their smallest part (see engine.core.paths).
"""

from __future__ import annotations

import codecs
import functools
from typing import Any

from engine.core.escaping import escape_text
from engine.core.header import DEFAULT_DELIMITERS, UTF8_BOM, Delimiters, _valid_encoding, delimiters_of

__all__ = ["Delimiters", "Message", "Segment", "escape", "segment_groups", "unescape"]


class _Separators:
    """The delimiters as text, plus the codec for ``\\Xhh\\``; shared by all segments."""

    __slots__ = ("field", "component", "repetition", "escape", "subcomponent", "codec", "table")

    def __init__(self, d: Delimiters, codec: str) -> None:
        self.field = d.field.decode("latin-1")
        self.component = d.component.decode("latin-1")
        self.repetition = d.repetition.decode("latin-1")
        self.escape = d.escape.decode("latin-1")
        self.subcomponent = d.subcomponent.decode("latin-1")
        self.codec = codec
        self.table = _table(d)


@functools.lru_cache(maxsize=64)
def _separators(d: Delimiters, codec: str) -> _Separators:
    """One (read-only) _Separators per delimiters and codec, not one per message."""
    return _Separators(d, codec)


class Segment:
    """One segment line. ``index`` is its 1-based occurrence among segments of its name.

    Immutable: the field split is computed on first use and cached.
    """

    __slots__ = ("name", "index", "_line", "_seps", "_fields")

    name: str
    index: int

    def __init__(self, name: str, index: int, line: str, seps: _Separators) -> None:
        # (each slot's own setter: __setattr__ refuses, and object.__setattr__ by name cost
        # a microsecond per segment, a dozen segments per mapped message)
        _set_name(self, name)
        _set_index(self, index)
        _set_line(self, line)
        _set_seps(self, seps)
        _set_fields(self, None)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Segment is immutable")

    def _split(self) -> list[str]:
        fields = self._fields
        if fields is None:
            fields = self._line.split(self._seps.field)
            if self.name == "MSH":
                # MSH-1 is the field separator itself: shift so that parts[n] is MSH-n.
                fields.insert(1, self._seps.field)
            _set_fields(self, fields)
        return fields

    def field(self, n: int) -> str:
        """Raw (still escaped) text of field ``n`` (1-based); "" when absent.

        MSH-1 is the field separator and MSH-2 the encoding characters, as HL7 numbers them.
        """
        fields = self._fields if self._fields is not None else self._split()
        return fields[n] if 0 < n < len(fields) else ""

    def fields(self) -> list[str]:
        """Raw text of fields 1..N (so ``fields()[n - 1] == field(n)``); a new list."""
        fields = self._fields if self._fields is not None else self._split()
        return fields[1:]

    @property
    def text(self) -> str:
        """The raw segment line."""
        return self._line

    def __repr__(self) -> str:  # never the contents: they may be patient data
        return f"<Segment {self.name}#{self.index}>"


_set_name, _set_index, _set_line, _set_seps, _set_fields = (Segment.__dict__[slot].__set__ for slot in Segment.__slots__)


class Message:
    """Immutable view over one decoded message."""

    __slots__ = ("delimiters", "codec", "_seps", "_lines", "_segments", "_by_name")

    delimiters: Delimiters
    codec: str

    def __init__(self, delimiters: Delimiters, codec: str, lines: list[str]) -> None:
        set_ = object.__setattr__
        set_(self, "delimiters", delimiters)
        set_(self, "codec", codec)
        set_(self, "_seps", _separators(delimiters, codec))
        set_(self, "_lines", lines)
        set_(self, "_segments", None)
        set_(self, "_by_name", None)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Message is immutable")

    @classmethod
    def parse(cls, raw: bytes, *, codec: str) -> Message:
        """Decode ``raw`` with ``codec`` and split it into segments (never raises on content).

        A UTF-8 BOM is skipped; segments may end in \\r, \\n or \\r\\n; empty lines are
        dropped; the delimiters come from MSH-1/MSH-2 (defaults if MSH is missing or bad).
        """
        codecs.lookup(codec)  # a bad codec name is our error, not the peer's
        if raw.startswith(UTF8_BOM):
            raw = raw[3:]
        text = raw.decode(codec, "replace")
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
        lines = [line for line in text.split("\r") if line]
        delimiters = _delimiters(lines[0]) if lines else DEFAULT_DELIMITERS
        return cls(delimiters, codec, lines)

    def _index(self) -> tuple[list[Segment], dict[str, list[Segment]]]:
        segments = self._segments
        if segments is None:
            seps = self._seps
            fs = seps.field
            segments = []
            by_name: dict[str, list[Segment]] = {}
            for line in self._lines:
                name = line[:3] if line[3:4] == fs or len(line) == 3 else line.split(fs, 1)[0]
                same = by_name.get(name)
                if same is None:
                    same = by_name[name] = []
                segment = Segment(name, len(same) + 1, line, seps)
                same.append(segment)
                segments.append(segment)
            object.__setattr__(self, "_segments", segments)
            object.__setattr__(self, "_by_name", by_name)
        return segments, self._by_name  # type: ignore[return-value]

    def segments(self, name: str | None = None) -> list[Segment]:
        """Segments in message order; only those named ``name`` if given. A new list."""
        segments, by_name = self._index()
        if name is None:
            return list(segments)
        return list(by_name.get(name, ()))

    def groups(self, anchor: str, members: "tuple[str, ...] | frozenset[str]") -> list[list[Segment]]:
        """Segment groups: each starts at an ``anchor`` segment and collects the segments
        directly following it whose names are in ``members``. Any other segment ends the
        group (so the NTE after an AIG is not taken into the AIS group before it)."""
        by_name = self._by_name
        if by_name is None:
            by_name = self._index()[1]
        if anchor not in by_name:
            return []
        return segment_groups(self._segments, anchor, members)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._lines)

    def __repr__(self) -> str:
        return f"<Message {len(self._lines)} segments>"


def segment_groups(segments: "list[Segment]", anchor: str, members: "tuple[str, ...] | frozenset[str]") -> list[list[Segment]]:
    """``Message.groups`` over a list of segments (a whole message's, or one group's: a group
    inside a group, such as the OBX of one ORC's order). ``members`` may be a frozenset
    already (a mapping's groups make theirs once)."""
    wanted = members if members.__class__ is frozenset else frozenset(members)
    groups: list[list[Segment]] = []
    current: list[Segment] | None = None
    for segment in segments:
        name = segment.name
        if name == anchor:
            current = [segment]
            groups.append(current)
        elif current is not None:
            if name in wanted:
                current.append(segment)
            else:
                current = None
    return groups


def _delimiters(first: str) -> Delimiters:
    if not first.startswith("MSH") or len(first) < 4:
        return DEFAULT_DELIMITERS
    sep = first[3]
    if sep.isalnum() or not 0x21 <= ord(sep) <= 0x7E:
        return DEFAULT_DELIMITERS
    end = first.find(sep, 4)
    encoding = first[4:] if end < 0 else first[4:end]
    sep_b = sep.encode("latin-1")
    try:
        encoding_b = encoding.encode("latin-1")
    except UnicodeEncodeError:
        return Delimiters(field=sep_b, encoding=DEFAULT_DELIMITERS.encoding)
    if not _valid_encoding(encoding_b, sep_b):
        return Delimiters(field=sep_b, encoding=DEFAULT_DELIMITERS.encoding)
    return delimiters_of(sep_b, encoding_b)


# Escape sequences --------------------------------------------------------------------------

_FORMATTING_DROPPED = frozenset({"H", "N"})


def unescape(text: str, d: Delimiters, *, codec: str = "latin-1") -> str:
    """Decode HL7 escape sequences in one (already split) value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` become the delimiters, ``\\.br\\`` a newline,
    ``\\Xhh..\\`` the hex bytes decoded with ``codec`` (the message's codec), ``\\H\\`` and
    ``\\N\\`` (highlighting) are dropped, ``\\P\\`` is the truncation character (2.7, MSH-2's
    fifth). Anything else (unknown or unterminated sequences)
    is kept as it is, so no text is lost.
    """
    esc = d.escape
    if not esc:
        return text
    e = esc.decode("latin-1")
    if e not in text:
        return text
    return _unescape(text, e, _table(d), codec)


@functools.lru_cache(maxsize=64)
def _table(d: Delimiters) -> dict[str, str]:
    return {
        "F": d.field.decode("latin-1"),
        "S": d.component.decode("latin-1"),
        "T": d.subcomponent.decode("latin-1"),
        "R": d.repetition.decode("latin-1"),
        "E": d.escape.decode("latin-1"),
        ".br": "\n",
        "H": "",
        "N": "",
        # 2.7's truncation character (MSH-2's fifth); without one, \P\ is unknown, kept as text
        **({"P": d.encoding[4:5].decode("latin-1")} if len(d.encoding) > 4 else {}),
    }


def _unescape(text: str, e: str, table: dict[str, str], codec: str) -> str:
    fast = _unescape_paired(text, e, table, codec)
    return fast if fast is not None else _unescape_scanning(text, e, table, codec)


def _unescape_paired(text: str, e: str, table: dict[str, str], codec: str) -> str | None:
    r"""``_unescape`` for a value whose escapes are all complete and known (a letter's base64
    wrapped with ``\X0D\\X0A\`` every 76 characters: 100,000 escapes in 8 MB): split at
    the escape character, every other piece is an escape's body. None when one is not (an
    unknown or unterminated escape shifts the pairs): then the scan decides."""
    parts = text.split(e)
    count = len(parts)
    if not count % 2:
        return None  # an escape character left unpaired
    out = [parts[0]]
    i = 1
    while i < count:
        body = parts[i]
        value = table.get(body)
        if value is None:
            if body[:1] != "X":
                return None
            data = _hex_bytes(body)
            if data is None:
                return None
            # a run of hex escapes with nothing between them is one byte run (see the scan)
            while i + 2 < count and not parts[i + 1] and parts[i + 2][:1] == "X":
                more = _hex_bytes(parts[i + 2])
                if more is None:
                    return None
                data += more
                i += 2
            value = data.decode(codec, "replace")
        out.append(value)
        out.append(parts[i + 1])
        i += 2
    return "".join(out)


def _unescape_scanning(text: str, e: str, table: dict[str, str], codec: str) -> str:
    out: list[str] = []
    pos = 0
    n = len(text)
    while pos < n:
        start = text.find(e, pos)
        if start < 0:
            break
        end = text.find(e, start + 1)
        if end < 0:
            break
        out.append(text[pos:start])
        body = text[start + 1 : end]
        value = table.get(body)
        if value is None and body[:1] == "X":
            data = _hex_bytes(body)
            if data is not None:
                # Consecutive hex escapes are one run of bytes: UTF-8 sent byte by byte
                # (\XC3\\XA9\) is one character, not two replacement characters.
                while text.startswith(e + "X", end + 1):
                    following = text.find(e, end + 2)
                    more = _hex_bytes(text[end + 2 : following]) if following > 0 else None
                    if more is None:
                        break
                    data += more
                    end = following
                value = data.decode(codec, "replace")
        if value is None:
            # Unknown: keep the opening escape character as text and look again right
            # after it, so "\\x\\F\\" still finds the "\\F\\".
            out.append(e)
            pos = start + 1
            continue
        out.append(value)
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


_HEX_SEEN: dict[str, bytes] = {}  # short hex escape bodies already read ("X0D": b"\r")


def _hex_bytes(body: str) -> bytes | None:
    """The bytes of an ``Xhh..`` escape body; None when it is not one."""
    seen = _HEX_SEEN.get(body)
    if seen is not None:
        return seen
    data = _read_hex(body)
    if data is not None and len(body) <= 9 and len(_HEX_SEEN) < 4096:
        _HEX_SEEN[body] = data
    return data


def _read_hex(body: str) -> bytes | None:
    digits = body[1:]
    if not digits or len(digits) % 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        return None  # bytes.fromhex would skip spaces: "\X 41\" is malformed, kept as it is
    try:
        return bytes.fromhex(digits)
    except ValueError:
        return None


def escape(text: str, d: Delimiters) -> str:
    """Escape ``text`` so it reads back as one value (inverse of ``unescape``).

    Delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``; control characters ``\\Xhh\\`` (CR
    and LF would end the segment, VT and FS the MLLP frame).
    """
    return escape_text(text, d)
