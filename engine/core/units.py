"""Sizes and durations as operators write them in config ("64MiB", "1h30m") and back.

Pure: no I/O, no twisted. Exact arithmetic (Fraction) so "1.5GiB" is exactly 1610612736
bytes and a value formatted by `format_size` / `format_duration` parses back unchanged.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["parse_size", "format_size", "parse_duration", "format_duration"]

# Lower-cased unit -> bytes. Decimal (kB = 1000) and binary (KiB = 1024) units are both
# common in operators' hands; which one is meant is spelled out by the unit, never guessed.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_HELP = (
    "expected a whole number of bytes, optionally with a unit "
    "(B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 64MiB or 1000"
)
_SIZE_RE = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*")

# Largest first: the order `parse_duration` requires parts in and `format_duration` writes them.
_DURATION_UNITS: tuple[tuple[str, Fraction], ...] = (
    ("d", Fraction(86400)),
    ("h", Fraction(3600)),
    ("m", Fraction(60)),
    ("s", Fraction(1)),
    ("ms", Fraction(1, 1000)),
)
_DURATION_SCALE = dict(_DURATION_UNITS)
_DURATION_RANK = {unit: rank for rank, (unit, _) in enumerate(_DURATION_UNITS)}
_DURATION_HELP = (
    "expected a number of seconds or parts with units d, h, m, s, ms "
    "from largest to smallest, e.g. 30s, 10m, 1h30m, 500ms"
)
# "ms" must be tried before "m".
_DURATION_PART_RE = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>ms|d|h|m|s)?\s*")


def parse_size(text: str | int) -> int:
    """Return the number of bytes `text` means ("64MiB" -> 67108864, "10MB" -> 10000000).

    A plain number is bytes. Units are case-insensitive. Raises ValueError saying what is
    accepted for negatives, fractions of a byte and anything else.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"invalid size {text!r}: {_SIZE_HELP}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative; {_SIZE_HELP}")
        return text
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        if text.strip().startswith("-"):
            raise ValueError(f"invalid size {text!r}: must not be negative; {_SIZE_HELP}")
        raise ValueError(f"invalid size {text!r}: {_SIZE_HELP}")
    scale = _SIZE_UNITS.get(match["unit"].lower())
    if scale is None:
        raise ValueError(f"invalid size {text!r}: unknown unit {match['unit']!r}; {_SIZE_HELP}")
    value = Fraction(match["number"]) * scale
    if value.denominator != 1:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes; {_SIZE_HELP}")
    return int(value)


def format_size(size: int) -> str:
    """Write a byte count the way an operator would ("64MiB"); `parse_size` reads it back."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    if size == 0:
        return "0"
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_duration(text: str | int | float, *, allow_never: bool = False) -> float | None:
    """Return the seconds `text` means ("10m" -> 600.0, "1h30m" -> 5400.0, "500ms" -> 0.5).

    A plain number is seconds. "never" gives None, but only where the caller allows it
    (`allow_never`), so a timeout cannot be switched off by accident. Parts must come largest
    unit first and each unit at most once ("1h30m", not "30m1h"). Raises ValueError.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"invalid duration {text!r}: {_DURATION_HELP}")
    if isinstance(text, (int, float)):
        if not (text >= 0 and text != float("inf")):
            raise ValueError(f"invalid duration {text!r}: must be a finite, non-negative number")
        return float(text)
    if text.strip().lower() == "never":
        if allow_never:
            return None
        raise ValueError(f"invalid duration {text!r}: 'never' is not allowed here; {_DURATION_HELP}")
    help_text = _DURATION_HELP + (" (or never)" if allow_never else "")
    if text.strip().startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative; {help_text}")
    total = Fraction(0)
    position = 0
    parts = 0
    last_rank = -1
    unitless = False
    while position < len(text) or parts == 0:
        match = _DURATION_PART_RE.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"invalid duration {text!r}: {help_text}")
        unit = match["unit"]
        if unit is None:
            unitless = True
            unit = "s"
        rank = _DURATION_RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {text!r}: units must go from largest to smallest, "
                f"each at most once; {help_text}"
            )
        total += Fraction(match["number"]) * _DURATION_SCALE[unit]
        last_rank = rank
        position = match.end()
        parts += 1
    if unitless and parts > 1:
        raise ValueError(f"invalid duration {text!r}: every part needs a unit; {help_text}")
    try:
        return float(total)
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: too large") from None


def format_duration(seconds: float | None) -> str:
    """Write seconds the way an operator would ("1h30m", "500ms"; None -> "never").

    Rounds to whole milliseconds: this is for display and config round trips, not timing.
    """
    if seconds is None:
        return "never"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
        0 <= seconds < float("inf")
    ):
        raise ValueError(f"duration must be a finite, non-negative number, got {seconds!r}")
    remaining = round(Fraction(seconds) * 1000)  # whole milliseconds
    if remaining == 0:
        return "0s"
    out = []
    for unit, scale in _DURATION_UNITS:
        step = int(scale * 1000)
        count, remaining = divmod(remaining, step)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
