"""The bytes a destination gets: the stored message with MSH fields rewritten and,
if the destination wants another character set, re-encoded (MSH-18 follows).

Pure and byte-exact: with no rewrite and no charset change the stored bytes go out
untouched (MSH-10 is kept, so the destination can recognise a resend).
"""

from __future__ import annotations

from engine.core import charsets
from engine.core.header import UTF8_BOM


class OutboundError(ValueError):
    """The message cannot be made into what the destination needs (a dead letter, not a retry)."""


def prepare(
    raw: bytes,
    *,
    rewrite: tuple[tuple[str, str], ...] = (),
    source_charset: str | None = None,
    target_charset: str | None = None,
) -> bytes:
    """Apply ``rewrite`` (("MSH-5", "HIX"), ...) and re-encode to ``target_charset``.

    Anything that makes that impossible (a rewrite value the charset cannot hold, a charset
    without a codec) is an OutboundError, so the message becomes a dead letter with a reason
    instead of stopping its queue."""
    try:
        return _prepare(raw, rewrite, source_charset, target_charset)
    except (UnicodeError, charsets.UnknownCharset) as error:
        where = f" (byte position {error.start})" if isinstance(error, UnicodeError) and hasattr(error, "start") else ""
        raise OutboundError(
            f"message cannot be made into {target_charset or source_charset or '8859/1'} "
            f"with the destination's rewrite{where}"
        ) from None


def _prepare(raw: bytes, rewrite, source_charset: str | None, target_charset: str | None) -> bytes:
    body = raw[3:] if raw.startswith(UTF8_BOM) else raw
    body = body.lstrip(b"\r\n")  # as read_header: blank lines before MSH are no part of it
    reencode = target_charset is not None and (
        source_charset is None or charsets.canonical(target_charset) != charsets.canonical(source_charset)
    )
    if not rewrite and not reencode:
        return raw
    end = _segment_end(body)
    sep = body[3:4]
    fields = body[:end].split(sep)
    values: dict[int, bytes] = {}
    for name, value in rewrite:
        number = int(name.split("-", 1)[1])
        values[number] = value.encode(charsets.codec_for(target_charset or source_charset or "8859/1"))
    if reencode:
        values[18] = charsets.canonical(target_charset).encode("ascii")
    rest = body[end:]
    if reencode:
        source_codec = charsets.codec_for(source_charset or "8859/1")
        target_codec = charsets.codec_for(target_charset)
        try:
            text_fields = [f.decode(source_codec) for f in fields]
            rest = rest.decode(source_codec).encode(target_codec)
            fields = [f.encode(target_codec) for f in text_fields]
        except UnicodeError as error:
            raise OutboundError(
                f"message cannot be converted from {source_charset} to {target_charset} "
                f"(byte position {getattr(error, 'start', '?')})"
            ) from None
    for number, value in values.items():
        index = number - 1
        while len(fields) <= index:
            fields.append(b"")
        fields[index] = value
    return sep.join(fields) + rest


def _segment_end(body: bytes) -> int:
    cr = body.find(b"\r")
    lf = body.find(b"\n", 0, cr if cr >= 0 else len(body))
    if lf >= 0:
        return lf
    return cr if cr >= 0 else len(body)
