"""Reading the ACK a peer sends back (for ``koppel send``, the bench and delivery).

Only what deciding needs: MSA-1 (code), MSA-2 (the control id it answers) and the
error text. An unparseable answer is reported as such, never taken for success.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.header import read_header

SUCCESS_CODES = frozenset({"AA", "CA"})
KNOWN_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


@dataclass(frozen=True, slots=True, kw_only=True)
class AckReply:
    code: str  # "" when the answer has no readable MSA
    control_id: str  # MSA-2
    text: str  # MSA-3, or ERR-8/ERR-7 (2.5+), or "" ; for display only
    readable: bool

    def answers(self, control_id: str) -> bool:
        return self.readable and self.control_id == control_id

    @property
    def success(self) -> bool:
        return self.readable and self.code in SUCCESS_CODES


UNREADABLE = AckReply(code="", control_id="", text="unreadable acknowledgement", readable=False)


def read_ack(payload: bytes) -> AckReply:
    fast = _read_plain_ack(payload)
    return fast if fast is not None else _read_any_ack(payload)


def _read_any_ack(payload: bytes) -> AckReply:
    header = read_header(payload, default_charset="8859/1")
    if header.rejection is not None and header.rejection.ack_code == "AR" and len(header.fields) < 3:
        return UNREADABLE
    d = header.delimiters
    fs, cs = d.field, d.component or b"^"
    codec = header.codec
    msa = err = None
    for segment in payload.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA" + fs) and msa is None:
            msa = segment.split(fs)
        elif segment.startswith(b"ERR" + fs) and err is None:
            err = segment.split(fs)
    if msa is None or len(msa) < 3:
        return UNREADABLE
    code = msa[1].split(cs, 1)[0].decode("ascii", "replace").strip().upper()
    if code not in KNOWN_CODES:
        return UNREADABLE
    text = msa[3] if len(msa) > 3 else b""
    if not text and err is not None:
        for index in (8, 7):
            if len(err) > index and err[index]:
                text = err[index]
                break
    return AckReply(
        code=code,
        control_id=msa[2].decode(codec, "replace"),
        text=text.decode(codec, "replace"),
        readable=True,
    )


def _read_plain_ack(payload: bytes) -> AckReply | None:
    """The common case, read without a full header parse (every delivered message has one):
    ``MSH|^~\\&|...`` with CR segments, an MSA with a known code and plain ASCII MSA-2, no ERR.
    Anything else returns None and takes the general path."""
    if not payload.startswith(b"MSH|^~\\&|") or b"\n" in payload or b"ERR|" in payload:
        return None
    start = payload.find(b"\rMSA|")
    if start < 0:
        return None
    end = payload.find(b"\r", start + 1)
    fields = payload[start + 1 : end if end >= 0 else len(payload)].split(b"|")
    if len(fields) < 3:
        return None
    code = fields[1].split(b"^", 1)[0].strip().upper()
    control_id = fields[2]
    if len(fields) > 3 and fields[3] or not control_id.isascii():
        return None
    try:
        code_text = code.decode("ascii")
    except UnicodeDecodeError:
        return None
    if code_text not in KNOWN_CODES:
        return None
    return AckReply(code=code_text, control_id=control_id.decode("ascii"), text="", readable=True)
