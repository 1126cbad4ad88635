"""HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) for text we put into messages."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from engine.core.header import Delimiters


def escape_text(text: str, delimiters: Delimiters) -> str:
    """Escape every delimiter in ``text`` so it reads back as one field value."""
    return escaper(delimiters)(text)


def escaper(delimiters: Delimiters) -> Callable[[str], str]:
    """A function escaping text for ``delimiters``, worked out once per delimiter set.

    Text without any delimiter, escape character or control character (nearly every value)
    is returned as it is after one regex scan; anything else is rewritten in the same single
    pass, each special character once (so an escape sequence written is never escaped again).
    """
    return _escaping(delimiters)[0]


def special_search(delimiters: Delimiters) -> Callable[[str], re.Match[str] | None] | None:
    """The scan ``escaper(delimiters)`` starts with: text in which it finds nothing is not
    changed by escaping, so many values joined can be checked in one scan. None: nothing is
    ever escaped (no escape character)."""
    return _escaping(delimiters)[1]


@functools.lru_cache(maxsize=64)
def _escaping(delimiters: Delimiters) -> tuple[Callable[[str], str], Callable[[str], re.Match[str] | None] | None]:
    esc = delimiters.escape.decode("latin-1")
    if not esc:
        return _unchanged, None
    table = {esc: f"{esc}E{esc}"}
    for char, code in (
        (delimiters.field, "F"),
        (delimiters.component, "S"),
        (delimiters.subcomponent, "T"),
        (delimiters.repetition, "R"),
    ):
        if char:
            table[char.decode("latin-1")] = f"{esc}{code}{esc}"
    # CR and LF, and every other C0 control character: VT (0x0B) and FS (0x1C) are MLLP's
    # frame bytes, and a value decoded from \X1C\ must not end the destination's frame
    for code in (*range(0x20), 0x7F):
        table[chr(code)] = f"{esc}X{code:02X}{esc}"
    pattern = re.compile("[" + "".join(re.escape(char) for char in table) + "]")
    special, substitute, replace = pattern.search, pattern.sub, table.__getitem__

    def escape(text: str) -> str:
        if special(text) is None:
            return text
        return substitute(lambda m: replace(m.group()), text)

    return escape, special


def _unchanged(text: str) -> str:
    return text
