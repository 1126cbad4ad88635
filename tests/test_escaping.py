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


# ----------------------------------------------------------------------------- the paired fast path

_PIECES = st.sampled_from(["\\", "X", "0D", "0A", "C3", "A9", "F", "S", "T", "R", "E", ".br", "H", "N", "P",
                           "Q", "ab", " ", "x", "Z", "41"])


@given(pieces=st.lists(_PIECES, max_size=30), codec=st.sampled_from(["latin-1", "utf-8"]))
def test_the_paired_fast_path_agrees_with_the_scan_or_leaves_it_to_the_scan(pieces, codec):
    from engine.core.hl7message import _table, _unescape_paired, _unescape_scanning

    text = "".join(pieces)
    table = _table(DEFAULT_DELIMITERS)
    fast = _unescape_paired(text, "\\", table, codec)
    assert fast is None or fast == _unescape_scanning(text, "\\", table, codec)


@given(runs=st.lists(st.tuples(st.text(alphabet="ABCxyz+/=", max_size=8),
                               st.sampled_from(["\\X0D\\\\X0A\\", "\\.br\\", "\\F\\", "\\XC3\\\\XA9\\", "\\T\\"])),
                     max_size=20))
def test_well_formed_escapes_take_the_fast_path_and_decode_as_the_scan_does(runs):
    from engine.core.hl7message import _table, _unescape_paired, _unescape_scanning

    text = "".join(chunk + escape for chunk, escape in runs)
    table = _table(DEFAULT_DELIMITERS)
    fast = _unescape_paired(text, "\\", table, "utf-8")
    assert fast is not None and fast == _unescape_scanning(text, "\\", table, "utf-8")


def test_a_wrapped_base64_letter_decodes_its_line_breaks():
    text = "\\X0D\\\\X0A\\".join(["QUJD", "REVG", "R0hJ"])
    assert unescape(text, DEFAULT_DELIMITERS, codec="latin-1") == "QUJD\r\nREVG\r\nR0hJ"
    # an escaped escape character around hex-looking text stays text
    assert unescape("\\E\\X0D\\E\\", DEFAULT_DELIMITERS, codec="latin-1") == "\\X0D\\"
