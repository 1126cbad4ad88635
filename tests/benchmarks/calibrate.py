"""A fixed piece of pure-Python work, timed, printed beside every benchmark result.

This VM's speed drifts by up to 40% within an hour, so a throughput number means little
without knowing how fast the machine was at that moment. The reference is the receive
path's header reading and accept check of the 2.6 KB referral (``assess``): lower is faster.
"""

from __future__ import annotations

import time
from pathlib import Path

REFERRAL = Path(__file__).resolve().parent / "referral_2k6.hl7"


def cpu_reference(rounds: int = 20000) -> float:
    """Best of three: microseconds per ``assess()`` of the referral."""
    from engine.core.intake import ACCEPT_ALL, assess

    raw = REFERRAL.read_bytes()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(rounds):
            assess(raw, rules=ACCEPT_ALL, default_charset="8859/1")
        best = min(best, (time.perf_counter() - started) / rounds)
    return best * 1e6


def describe() -> str:
    return f"machine speed now: assess() of the 2.6 KB referral takes {cpu_reference():.1f} us (lower is faster)"


if __name__ == "__main__":
    print(describe())
