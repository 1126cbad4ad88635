"""Sizes and durations in config: what operators write, what the engine gets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("1000", 1000),
        ("10MB", 10_000_000),
        ("2kB", 2000),
        ("2KB", 2000),
        ("7B", 7),
        ("0", 0),
        ("64 MiB", 64 * 1024 * 1024),
        ("64mib", 64 * 1024 * 1024),
        ("1.5GiB", 1610612736),
        ("1TiB", 1024**4),
        (4096, 4096),
    ],
)
def test_parse_size_reads_what_operators_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["-1", "-64MiB", "", "MiB", "64 MiBs", "64Mi", "1.5B", "0.0001kB", "1e6", "64MiB 1KiB", "ten",
     -5, True, 1.5],  # fmt: skip
)
def test_parse_size_rejects_negatives_fractions_of_a_byte_and_garbage(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_parse_size_error_lists_the_units():
    with pytest.raises(ValueError) as caught:
        parse_size("64 furlongs")
    assert "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("72h", 259200.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("0", 0.0),
        ("0s", 0.0),
        ("45", 45.0),
        ("1.5", 1.5),
        ("0.2s", 0.2),
        (30, 30.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_reads_what_operators_write(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "-1s", "-5", "10x", "30m1h", "1h1h", "1h30", "s", "10 minutes", "1e3", "nan", "inf", -1, True,
     float("inf")],  # fmt: skip
)
def test_parse_duration_rejects_garbage(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_error_says_what_is_accepted():
    with pytest.raises(ValueError) as caught:
        parse_duration("soon")
    assert "d, h, m, s, ms" in str(caught.value)


def test_never_means_none_only_where_allowed():
    assert parse_duration("never", allow_never=True) is None
    assert parse_duration("Never", allow_never=True) is None
    with pytest.raises(ValueError, match="'never' is not allowed here"):
        parse_duration("never")


def test_an_absurdly_long_duration_is_an_error_not_a_crash():
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "d")


def test_format_duration_writes_compact_parts():
    assert format_duration(5400.0) == "1h30m"
    assert format_duration(0.5) == "500ms"
    assert format_duration(0) == "0s"
    assert format_duration(None) == "never"
    assert format_duration(86400 + 1.25) == "1d1s250ms"


def test_format_size_prefers_the_exact_binary_unit():
    assert format_size(64 * 1024 * 1024) == "64MiB"
    assert format_size(10_000_000) == "10MB"
    assert format_size(1234) == "1234"
    assert format_size(0) == "0"


_SIZE_UNITS = {
    "": 1, "B": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
}  # fmt: skip


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(_SIZE_UNITS)), st.booleans())
def test_any_whole_number_with_any_unit_parses_to_number_times_unit(number, unit, spaced):
    text = f"{number}{' ' if spaced else ''}{unit}"
    assert parse_size(text) == number * _SIZE_UNITS[unit]


@given(st.integers(min_value=0, max_value=2**50))
def test_format_size_round_trips(size):
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=400 * 86400 * 1000))
def test_format_duration_round_trips_whole_milliseconds(milliseconds):
    seconds = milliseconds / 1000
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    st.lists(st.integers(min_value=0, max_value=999), min_size=5, max_size=5),
    st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_any_descending_combination_of_parts_adds_up(counts, present):
    units = [("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000), ("ms", 1)]
    chosen = [(c, u, ms) for c, (u, ms), p in zip(counts, units, present) if p]
    if not chosen:
        return
    text = "".join(f"{c}{u}" for c, u, _ in chosen)
    assert parse_duration(text) == sum(c * ms for c, _, ms in chosen) / 1000


def test_units_is_pure_core_and_does_not_import_twisted():
    code = "import sys, engine.core.units; sys.exit('twisted' in sys.modules)"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, check=False).returncode == 0
