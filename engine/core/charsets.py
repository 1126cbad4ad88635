"""HL7 character set names (MSH-18, table 0211) to Python codecs.

The table follows HAPI and Camel's ``Hl7Charset``. Only byte-compatible encodings
(where the delimiters and segment names are single ASCII bytes) can be framed and
read; UTF-16/32 are known names but are refused rather than misread.
"""

from __future__ import annotations

import codecs
import functools

# HL7 name (upper-cased) -> Python codec name.
HL7_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso8859-1",
    "ISO IR100": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "BIG-5": "big5",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "ISO IR87": "euc_jp",
    "ISO IR159": "euc_jp",
    "ISO IR14": "shift_jis",
}
# CNS 11643-1992 is in HL7's table too, but Python has no codec for it (HAPI reads it as
# x-EUC-TW, Camel as ISO-2022-CN): a message that names it is answered AE like any unknown
# charset, rather than decoded with a codec for another script.

# Unambiguous IANA spellings that real senders put in MSH-18 instead of the HL7 names.
ALIASES: dict[str, str] = {
    "UTF-8": "UNICODE UTF-8",
    "UTF8": "UNICODE UTF-8",
    "ISO-8859-1": "8859/1",
    "ISO-8859-15": "8859/15",
    "US-ASCII": "ASCII",
}

# Known to HL7, but not ASCII-compatible: a message in them cannot be framed or read.
UNREADABLE = frozenset({"UNICODE UTF-16", "UNICODE UTF-32"})


class UnknownCharset(ValueError):
    """MSH-18 names no character set we can read (answered with AE, never guessed)."""


@functools.lru_cache(maxsize=128)
def canonical(name: str) -> str:
    """The HL7 spelling of a charset name, or UnknownCharset."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key in HL7_CHARSETS:
        return key
    raise UnknownCharset(f"unsupported character set in MSH-18: {name.strip()[:40]!r}")


def codec_for(name: str) -> str:
    """Python codec for an HL7 charset name (e.g. ``8859/1`` -> ``iso8859-1``)."""
    return HL7_CHARSETS[canonical(name)]


def _check_table() -> None:
    for codec in HL7_CHARSETS.values():
        codecs.lookup(codec)


_check_table()
