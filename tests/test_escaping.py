"""escape_text: pinned outputs (the fast path for plain text must give what the replacements give)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.escaping import escape_text
from engine.core.header import DEFAULT_DELIMITERS, Delimiters
from engine.core.hl7message import unescape

CUSTOM = Delimiters(field=b"#", encoding=b"$%!*")  # component $, repetition %, escape !, subcomponent *


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("plain text 123", "plain text 123"),
        ("Testpatiënt €", "Testpatiënt €"),
        ("a|b", "a\\F\\b"),
        ("a^b", "a\\S\\b"),
        ("a&b", "a\\T\\b"),
        ("a~b", "a\\R\\b"),
        ("a\\b", "a\\E\\b"),
        ("\\F\\", "\\E\\F\\E\\"),
        ("line\rnext\nlast", "line\\X0D\\next\\X0A\\last"),
        ("|^~\\&\r\n", "\\F\\\\S\\\\R\\\\E\\\\T\\\\X0D\\\\X0A\\"),
    ],
)
def test_escape_text_default_delimiters(text: str, expected: str) -> None:
    assert escape_text(text, DEFAULT_DELIMITERS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain|^~\\&", "plain|^~\\&"),
        ("a#b$c%d!e*f", "a!F!b!S!c!R!d!E!e!T!f"),
        ("x\ry", "x!X0D!y"),
    ],
)
def test_escape_text_custom_delimiters(text: str, expected: str) -> None:
    assert escape_text(text, CUSTOM) == expected


def test_escape_text_without_an_escape_character_leaves_text_alone() -> None:
    no_escape = Delimiters(field=b"|", encoding=b"^~")
    assert escape_text("a|b^c\r", no_escape) == "a|b^c\r"


@given(st.text(alphabet=st.sampled_from(list("ab|^~\\&#$%!*\r\né")), max_size=30))
def test_escape_text_reads_back(text: str) -> None:
    for d in (DEFAULT_DELIMITERS, CUSTOM):
        escaped = escape_text(text, d)
        for char in (d.field, d.component, d.repetition, d.subcomponent, b"\r", b"\n"):
            assert char.decode() not in escaped
        assert unescape(escaped, d, codec="utf-8") == text
