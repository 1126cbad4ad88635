"""engine.log: configuration, safe errors, and summarising repeated events."""

import io
import json

import structlog

from engine.log import Repeats, configure, get_logger, safe_error


def test_repeats_logs_the_first_three_then_powers_of_two():
    repeats = Repeats()
    logged = [n for n in range(1, 70) if repeats.count("down") is not None]
    assert logged == [1, 2, 3, 4, 8, 16, 32, 64]


def test_repeats_counts_keys_apart_and_stays_bounded():
    repeats = Repeats(limit=2)
    assert repeats.count("a") == 1 and repeats.count("b") == 1
    assert repeats.count("c") == 1  # a third key starts the table afresh
    assert repeats.count("a") == 1


def test_safe_error_keeps_the_class_and_errno_never_the_message():
    error = OSError(28, "No space left on device: /var/lib/koppel/Testpatient.db")
    assert safe_error(error) == "OSError(28)"
    assert safe_error(ValueError("BSN 123456782")) == "ValueError"


def test_json_lines_carry_the_event_level_and_bound_context():
    out = io.StringIO()
    configure("info", stream=out, json=True)
    try:
        get_logger(channel="zd").info("message.rejected", code="AR")
        get_logger(channel="zd").debug("message.acked")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["event"], line["level"], line["channel"], line["code"]) for line in lines] == [
        ("message.rejected", "info", "zd", "AR")]
    assert lines[0]["timestamp"].endswith("Z")
