"""Reading the MSH header without parsing the message.

Only the first segment is split, so the cost does not grow with the message (a
base64 PDF letter costs what a two-line ACK costs). Field values stay raw bytes in
the message's own encoding, so an ACK can mirror them exactly; text views decode a
copy. A header that cannot be read still yields a ``Header`` (with what could be
read and the default delimiters) plus the ``rejection`` to answer with, so an AR
can always be built. A batch (FHS/BHS first) is refused that way too, its header read
in MSH's place so that the AR mirrors it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from dataclasses import field as computed

from engine.core import charsets, slots
from engine.core.errors import ErrorCode, ErrorLocation, Rejection

UTF8_BOM = b"\xef\xbb\xbf"
BATCH_HEADERS = (b"FHS", b"BHS")


@dataclass(frozen=True, slots=True)
class Delimiters:
    """MSH-1 and MSH-2, as bytes; ``encoding`` is MSH-2 exactly as received."""

    field: bytes
    encoding: bytes

    @property
    def component(self) -> bytes:
        return self.encoding[0:1]

    @property
    def repetition(self) -> bytes:
        return self.encoding[1:2]

    @property
    def escape(self) -> bytes:
        return self.encoding[2:3]

    @property
    def subcomponent(self) -> bytes:
        return self.encoding[3:4]

    @property
    def truncation(self) -> bytes:
        return self.encoding[4:5]


DEFAULT_DELIMITERS = Delimiters(field=b"|", encoding=b"^~\\&")


@functools.lru_cache(maxsize=64)
def delimiters_of(field: bytes, encoding: bytes) -> Delimiters:
    """One Delimiters per MSH-1/MSH-2 pair, not one per message (read per message)."""
    return Delimiters(field=field, encoding=encoding)


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class Header:
    """What the engine needs from MSH to store, route and acknowledge a message."""

    delimiters: Delimiters
    fields: tuple[bytes, ...]  # fields[n] is MSH-n for n >= 2 (fields[0] is b"MSH")
    hl7_charset: str | None  # canonical HL7 name actually used to decode, None if unknown
    codec: str  # Python codec for decoding a copy ("latin-1" if the charset is unknown)
    rejection: Rejection | None = None
    bom: bool = False

    def field(self, number: int) -> bytes:
        """Raw MSH-n (n >= 2); b"" when absent."""
        if number < 2:
            return self.delimiters.field
        fields = self.fields
        return fields[number - 1] if number - 1 < len(fields) else b""

    def component(self, number: int, index: int) -> bytes:
        """Raw MSH-n.index (1-based component of the first repetition)."""
        value = self.field(number)
        if not value:
            return b""
        value = value.split(self.delimiters.repetition, 1)[0] if self.delimiters.repetition else value
        parts = value.split(self.delimiters.component) if self.delimiters.component else [value]
        return parts[index - 1] if index - 1 < len(parts) else b""

    def text(self, raw: bytes) -> str:
        return raw.decode(self.codec, "replace")

    # Decoded once, when built: every message needs most of them (store, route, ACK).
    message_type: str = computed(init=False)
    trigger: str = computed(init=False)
    structure: str = computed(init=False)
    control_id: str = computed(init=False)
    processing_id: str = computed(init=False)
    version: str = computed(init=False)
    accept_ack_type: str = computed(init=False)  # MSH-15, upper-cased
    application_ack_type: str = computed(init=False)  # MSH-16, upper-cased
    sender: str = computed(init=False)  # "MSH-3|MSH-4": who sent it (part of the duplicate key)

    def __init__(self, *, delimiters: Delimiters, fields: tuple[bytes, ...], hl7_charset: str | None, codec: str,
                 rejection: Rejection | None = None, bom: bool = False) -> None:
        # Hot path (every message): each slot set with its own setter (see engine.core.slots);
        # each needed field split once and decoded once, the fields padded to MSH-16 so that
        # each is read by index, without a call per field.
        (set_delimiters, set_fields, set_charset, set_codec, set_rejection, set_bom, set_type, set_trigger,
         set_structure, set_control_id, set_processing_id, set_version, set_accept, set_application,
         set_sender) = _HEADER
        set_delimiters(self, delimiters)
        set_fields(self, fields)
        set_charset(self, hl7_charset)
        set_codec(self, codec)
        set_rejection(self, rejection)
        set_bom(self, bom)
        if len(fields) < 16:
            fields = fields + (b"",) * (16 - len(fields))
        encoding = delimiters.encoding
        rep, comp = encoding[1:2], encoding[0:1]
        msh9, msh11, msh12 = fields[8], fields[10], fields[11]
        if rep:
            msh9, msh11, msh12 = msh9.split(rep, 1)[0], msh11.split(rep, 1)[0], msh12.split(rep, 1)[0]
        if comp:
            msh9, msh11, msh12 = msh9.split(comp) + [b"", b""], msh11.split(comp, 1)[0], msh12.split(comp, 1)[0]
        else:
            msh9 = [msh9, b"", b""]
        set_type(self, msh9[0].decode(codec, "replace"))
        set_trigger(self, msh9[1].decode(codec, "replace"))
        set_structure(self, msh9[2].decode(codec, "replace"))
        set_control_id(self, fields[9].decode(codec, "replace"))
        set_processing_id(self, msh11.decode(codec, "replace"))
        set_version(self, msh12.decode(codec, "replace"))
        set_accept(self, fields[14].decode(codec, "replace").strip().upper())
        set_application(self, fields[15].decode(codec, "replace").strip().upper())
        set_sender(self, f"{fields[2].decode(codec, 'replace')}|{fields[3].decode(codec, 'replace')}")

    @property
    def type_and_trigger(self) -> str:
        """``SRM^S01`` (or ``ACK`` when there is no trigger): the routing key."""
        trigger = self.trigger
        return f"{self.message_type}^{trigger}" if trigger else self.message_type


_HEADER = slots.setters(Header)


def read_header(raw: bytes, *, default_charset: str) -> Header:
    """Read MSH from one frame's payload; never raises on peer input."""
    start = 0
    bom = raw.startswith(UTF8_BOM)
    if bom:
        start = 3
    while raw[start : start + 1] in (b"\r", b"\n"):
        start += 1
    if raw[start : start + 3] != b"MSH":
        if raw[start : start + 3] in BATCH_HEADERS:
            return _batch(raw, start, bom)
        return _unreadable(
            ErrorCode.SEGMENT_SEQUENCE, "message does not start with an MSH segment", None, bom
        )
    sep = raw[start + 3 : start + 4]
    if not _valid_separator(sep):
        return _unreadable(ErrorCode.DATA_TYPE, "MSH-1 field separator is missing or invalid", 1, bom)
    fields = _first_segment(raw, start, sep)
    encoding = fields[1] if len(fields) > 1 else b""
    if not _valid_encoding(encoding, sep):
        return _unreadable(
            ErrorCode.DATA_TYPE,
            "MSH-2 encoding characters are missing or invalid",
            2,
            bom,
            Delimiters(field=sep, encoding=DEFAULT_DELIMITERS.encoding),
            fields,
        )
    delimiters = delimiters_of(sep, encoding)
    charset_field = fields[17] if len(fields) > 17 else b""
    charset_name = charset_field.split(encoding[1:2], 1)[0].decode("latin-1").strip()
    rejection = None
    try:
        # A UTF-8 BOM is the sender saying UTF-8, stronger than the channel default.
        fallback = "UNICODE UTF-8" if bom else default_charset
        hl7_charset = charsets.canonical(charset_name or fallback)
        codec = charsets.HL7_CHARSETS[hl7_charset]
    except charsets.UnknownCharset:
        hl7_charset, codec = None, "latin-1"
        rejection = Rejection(
            ack_code="AE",
            error_code=ErrorCode.TABLE_VALUE_NOT_FOUND,
            text="unsupported character set in MSH-18",
            location=ErrorLocation(field=18),
        )
    header = Header(
        delimiters=delimiters, fields=fields, hl7_charset=hl7_charset, codec=codec, bom=bom
    )
    for value, number, what in (
        (header.message_type, 9, "MSH-9 message type"),
        (header.control_id, 10, "MSH-10 message control id"),
        (header.version, 12, "MSH-12 version id"),
    ):
        if not value.strip():
            rejection = Rejection(
                ack_code="AR",
                error_code=ErrorCode.REQUIRED_FIELD_MISSING,
                text=f"{what} is missing",
                location=ErrorLocation(field=number),
            )
            break
    if rejection is not None:
        return Header(
            delimiters=delimiters,
            fields=fields,
            hl7_charset=hl7_charset,
            codec=codec,
            rejection=rejection,
            bom=bom,
        )
    return header


def _batch(raw: bytes, start: int, bom: bool) -> Header:
    """A batch is refused, but answered like a message: with FHS-1/FHS-2 as delimiters,
    FHS-3..6 (where MSH has them) to swap and FHS-11, the file control id, in MSH-10's place
    for MSA-2 (BHS alike). The first segment is the outer envelope: FHS when it is there.
    Delimiters that MSH could not have leave the minimal answer."""
    code = ErrorCode.UNSUPPORTED_MESSAGE_TYPE
    text = "batch messages (FHS/BHS) are not accepted; send one message per frame"
    sep = raw[start + 3 : start + 4]
    if not _valid_separator(sep):
        return _unreadable(code, text, None, bom)
    fields = _first_segment(raw, start, sep)
    encoding = fields[1] if len(fields) > 1 else b""
    if not _valid_encoding(encoding, sep):
        return _unreadable(code, text, None, bom)
    fields += (b"",) * (11 - len(fields))
    return _unreadable(
        code,
        text,
        None,
        bom,
        Delimiters(field=sep, encoding=encoding),
        (b"MSH", encoding, *fields[2:6], b"", b"", b"", fields[10]),
    )


def _valid_separator(sep: bytes) -> bool:
    return bool(sep) and not sep.isalnum() and 0x21 <= sep[0] <= 0x7E and sep not in _IN_OUR_VALUES


def _first_segment(raw: bytes, start: int, sep: bytes) -> tuple[bytes, ...]:
    """The fields of the segment at ``start``, which ends at CR, LF or CRLF."""
    cr = raw.find(b"\r", start)
    lf = raw.find(b"\n", start, cr if cr >= 0 else len(raw))
    end = lf if lf >= 0 else (cr if cr >= 0 else len(raw))
    return tuple(raw[start:end].split(sep))


@functools.lru_cache(maxsize=64)
def _valid_encoding(encoding: bytes, sep: bytes) -> bool:
    # 4 characters is the standard, 5 adds the 2.7 truncation character; 3 (no
    # subcomponent separator) is what some old senders emit and HAPI tolerates.
    # HL7 only recommends ^~\& so any distinct printable characters are taken.
    if not 3 <= len(encoding) <= 5:
        return False
    if len(set(encoding)) != len(encoding) or sep[0] in encoding:
        return False
    return all(0x21 <= c <= 0x7E and bytes((c,)) not in _IN_OUR_VALUES for c in encoding)


# What the ACK's own values are made of (the timestamp's digits and UTC offset, the control
# id's upper-case base 36 and dash, the version 2.5 it writes when MSH-12 is missing): as a
# delimiter they would split those values, so such a header is refused (AR 102). Lower-case
# letters stay allowed (hl7apy's sample uses "r").
_IN_OUR_VALUES = frozenset(bytes((c,)) for c in b"+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _unreadable(
    code: ErrorCode,
    text: str,
    field: int | None,
    bom: bool,
    delimiters: Delimiters = DEFAULT_DELIMITERS,
    fields: tuple[bytes, ...] = (b"MSH",),
) -> Header:
    """A header we cannot trust beyond MSH-1: fields are kept only to mirror them."""
    return Header(
        delimiters=delimiters,
        fields=fields,
        hl7_charset=None,
        codec="latin-1",
        rejection=Rejection(
            ack_code="AR",
            error_code=code,
            text=text,
            location=ErrorLocation(field=field) if field else ErrorLocation(),
        ),
        bom=bom,
    )
