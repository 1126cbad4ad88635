"""HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) for text we put into messages."""

from __future__ import annotations

from engine.core.header import Delimiters


def escape_text(text: str, delimiters: Delimiters) -> str:
    """Escape every delimiter in ``text`` so it reads back as one field value."""
    esc = delimiters.escape.decode("latin-1")
    if not esc:
        return text
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in (
        (delimiters.field, "F"),
        (delimiters.component, "S"),
        (delimiters.subcomponent, "T"),
        (delimiters.repetition, "R"),
    ):
        if char:
            out = out.replace(char.decode("latin-1"), f"{esc}{code}{esc}")
    return out.replace("\r", f"{esc}X0D{esc}").replace("\n", f"{esc}X0A{esc}")
