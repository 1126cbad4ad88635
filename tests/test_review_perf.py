"""Review of 7c8e1c4 (phone's fast path): the trunk ``(0)`` after a country code is no
longer dropped when the field starts with punctuation before the ``+``/``00``.

Before 7c8e1c4, phone() first took the number out of the text (``_number_in``), then
looked for the ``+``/``00`` prefix on that number: ``(+31) (0)20 555 7890`` gave
``+31205557890``. The fast path now skips ``_number_in`` for text that is only digits and
punctuation and checks ``text.startswith(("+", "00"))`` on the raw text, which starts with
``(``; the ``(0)`` stays and the result is ``+310205557890``, a number that does not exist
(a trunk 0 after the country code). Expected: the same as before, ``+31205557890``.
"""

import pytest

from engine.core import convert


@pytest.mark.parametrize("text", [
    "(+31) (0)20 555 7890",
    "(+31)(0)20 5557890",
    "(+31 (0)20 5557890)",
])
def test_trunk_zero_dropped_when_the_country_code_is_in_brackets(text: str) -> None:
    assert convert.phone(text) == "+31205557890"
