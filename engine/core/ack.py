"""Building acknowledgements, as exact bytes, from a header and a decision.

Original mode (MSH-15 and MSH-16 empty) answers AA/AE/AR. Enhanced mode answers an
accept ACK CA/CE/CR, sent or withheld as MSH-15 (AL/NE/ER/SU) says. The ACK mirrors
the incoming delimiters, version, processing id and charset, swaps sender and
receiver, and carries a control id and timestamp passed in by the caller, so the
same inputs always give the same bytes.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from datetime import datetime

from engine.core.errors import ErrorCode, ErrorLocation, Rejection
from engine.core.escaping import escape_text
from engine.core.header import Header

ORIGINAL_CODES = ("AA", "AE", "AR")
ENHANCED_OF = {"AA": "CA", "AE": "CE", "AR": "CR"}


@dataclass(frozen=True, slots=True, kw_only=True)
class AckDecision:
    """The code to put on the wire and whether to send an ACK at all."""

    code: str
    send: bool


ACK_CONDITIONS = frozenset({"AL", "NE", "ER", "SU"})  # HL7 table 0155


def is_enhanced(header: Header) -> bool:
    """Enhanced mode when MSH-15 or MSH-16 holds a table 0155 value.

    Values outside the table (damaged headers, e.g. segments run together) are
    treated as empty, so such a sender gets the original-mode answer it most
    likely expects.
    """
    return (
        header.accept_ack_type in ACK_CONDITIONS
        or header.application_ack_type in ACK_CONDITIONS
    )


def decide(header: Header, original_code: str, *, always: bool = False) -> AckDecision:
    """Map an original-mode outcome onto the mode the sender asked for. ``always``: answer
    even where MSH-15 (NE, ER, SU) says not to, for senders whose header template says NE but
    that wait for an answer anyway (a channel's `ack: {accept_ack: always}`)."""
    if original_code not in ORIGINAL_CODES:
        raise ValueError(f"not an original-mode ACK code: {original_code!r}")
    if header.message_type == "ACK":
        # An acknowledgement is not acknowledged (HL7 v2, 2.9.2): answering a peer that sends
        # its ACKs here could start an ACK loop. Stored (or refused) as any message, unanswered.
        return AckDecision(code=ENHANCED_OF[original_code] if is_enhanced(header) else original_code, send=False)
    if not is_enhanced(header):
        return AckDecision(code=original_code, send=True)
    code = ENHANCED_OF[original_code]
    condition = header.accept_ack_type
    if always:
        send = True
    elif condition == "NE":
        send = False
    elif condition == "ER":
        send = code != "CA"
    elif condition == "SU":
        send = code == "CA"
    else:  # AL, or empty while MSH-16 asks for enhanced mode: always answer
        send = True
    return AckDecision(code=code, send=send)


def format_timestamp(moment: datetime) -> str:
    """HL7 DTM with seconds and UTC offset, e.g. ``20260102161545+0100``."""
    if moment.tzinfo is None:
        raise ValueError("ACK timestamps must be timezone-aware")
    return moment.strftime("%Y%m%d%H%M%S%z")


class ControlIds:
    """Unique ACK control ids: a per-process prefix plus a counter.

    The shell picks the prefix (start time and process id), so ids never collide
    under load or across restarts the way timestamp ids do; tests pass a fixed one.
    """

    __slots__ = ("prefix", "_next", "_encode")

    def __init__(self, prefix: str, start: int = 1, encode=str) -> None:
        self.prefix = prefix
        self._next = start
        self._encode = encode  # the counter's digits (the shell uses base 36, to stay short)

    def __call__(self) -> str:
        value = self._next
        self._next = value + 1
        return f"{self.prefix}{self._encode(value)}"


@functools.lru_cache(maxsize=64)  # a handful of versions on the wire; bounded against odd ones
def version_tuple(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.strip().split("."))
    except ValueError:
        return None


def build_ack(
    header: Header,
    *,
    code: str,
    timestamp: str,
    control_id: str,
    rejection: Rejection | None = None,
) -> bytes:
    """The ACK payload (unframed) answering ``header`` with ``code``."""
    d = header.delimiters
    fs = d.field
    cs = d.component or b"^"
    version = version_tuple(header.version)
    # MSH-9.3, the message structure, is required from 2.3.1 on (and the ACK says 2.5 when
    # the version is unreadable): without it strict parsers (hl7apy) cannot read the answer,
    # even when there is no trigger to mirror (an unreadable header, a batch).
    msg_type = b"ACK" + cs + header.component(9, 2)
    if version is None or version >= (2, 3, 1):
        msg_type += cs + b"ACK"
    elif msg_type == b"ACK" + cs:
        msg_type = b"ACK"
    msh = [
        b"MSH",
        d.encoding,
        header.field(5),
        header.field(6),
        header.field(3),
        header.field(4),
        timestamp.encode("ascii"),
        b"",
        msg_type,
        control_id.encode("ascii"),
        header.field(11) or b"P",
        header.field(12) or b"2.5",
        b"",
        b"",
        b"",
        b"",
        b"",
        header.field(18),
    ]
    segments = [fs.join(_trim(msh))]
    text = b""
    if rejection is not None and (version is None or version < (2, 7)):
        # MSA-3 is an ST of at most 80 characters (ERR-7/8 carry the whole text from 2.5 on)
        text = _at_most(escape_text(_ascii(rejection.text), d), MSA_TEXT_MAX, d).encode("ascii")
    segments.append(fs.join(_trim([b"MSA", code.encode("ascii"), header.field(10), text])))
    if rejection is not None:
        segments.append(_err_segment(header, rejection, version))
    return b"\r".join(segments) + b"\r"  # every segment ends with CR, the last one too (HL7 v2 2.6)


def _err_segment(header: Header, rejection: Rejection, version: tuple[int, ...] | None) -> bytes:
    d = header.delimiters
    fs, cs, ss = d.field, d.component or b"^", d.subcomponent
    location = rejection.location or ErrorLocation()
    code = rejection.error_code
    seg = location.segment.encode("ascii")
    seq = str(location.sequence).encode("ascii")
    fld = str(location.field).encode("ascii") if location.field else b""
    # Labels are constant text, but a sender may pick letters as delimiters (hl7apy
    # uses "r" for repetition), so they are escaped like any other text.
    label = escape_text(code.label, d).encode("ascii")
    number = str(int(code)).encode("ascii")
    text = escape_text(_ascii(rejection.text), d).encode("ascii")
    # ERR-1 (ELD) up to 2.4: segment^sequence^field^code, the code a CE in subcomponents.
    code_ce = ss.join([number, label, b"HL70357"]) if ss else number
    eld = cs.join([seg, seq, fld, code_ce])
    if version is not None and version < (2, 5):
        return fs.join([b"ERR", eld])
    erl = cs.join([seg, seq, fld]).rstrip(cs)
    cwe = cs.join([number, label, b"HL70357"])
    severity = b"E" if code is not ErrorCode.OK else b"I"
    fields = [b"ERR", eld if version is None else b"", erl, cwe, severity, b"", b"", text, text]
    return fs.join(fields)


MSA_TEXT_MAX = 80


def _ascii(text: str) -> str:
    """Non-ASCII characters as '?', before escaping: a '?' put in after would stand unescaped
    where '?' is a delimiter (hl7apy's sample uses MSH|!$r?@)."""
    return text.encode("ascii", "replace").decode("ascii")


def _at_most(escaped: str, limit: int, d) -> str:
    """``escaped`` cut to ``limit`` characters, never inside an escape sequence (\\F\\ ...)."""
    if len(escaped) <= limit:
        return escaped
    cut = escaped[:limit]
    esc = d.escape.decode("latin-1")
    if esc and cut.count(esc) % 2:  # an escape sequence opened and not closed: leave it out
        cut = cut[: cut.rfind(esc)]
    return cut


def _trim(fields: list[bytes]) -> list[bytes]:
    while fields and not fields[-1]:
        fields.pop()
    return fields
