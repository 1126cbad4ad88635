"""HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) for text we put into messages."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from engine.core.header import Delimiters


def escape_text(text: str, delimiters: Delimiters) -> str:
    """Escape every delimiter in ``text`` so it reads back as one field value."""
    return escaper(delimiters)(text)


@functools.lru_cache(maxsize=64)
def escaper(delimiters: Delimiters) -> Callable[[str], str]:
    """A function escaping text for ``delimiters``, worked out once per delimiter set.

    Text without any delimiter, escape character, CR or LF (nearly every value) is returned
    as it is after one regex scan; anything else goes through the replacements in order.
    """
    esc = delimiters.escape.decode("latin-1")
    if not esc:
        return _unchanged
    replacements = [(esc, f"{esc}E{esc}")]
    for char, code in (
        (delimiters.field, "F"),
        (delimiters.component, "S"),
        (delimiters.subcomponent, "T"),
        (delimiters.repetition, "R"),
    ):
        if char:
            replacements.append((char.decode("latin-1"), f"{esc}{code}{esc}"))
    # CR and LF, and every other C0 control character: VT (0x0B) and FS (0x1C) are MLLP's
    # frame bytes, and a value decoded from \X1C\ must not end the destination's frame
    for code in (*range(0x20), 0x7F):
        replacements.append((chr(code), f"{esc}X{code:02X}{esc}"))
    special = re.compile("[" + "".join(re.escape(old) for old, _ in replacements) + "]").search
    steps = tuple(replacements)

    def escape(text: str) -> str:
        if special(text) is None:
            return text
        for old, new in steps:
            text = text.replace(old, new)
        return text

    return escape


def _unchanged(text: str) -> str:
    return text
