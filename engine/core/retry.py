"""Retry schedules as a pure function (cf. Twisted's ``backoffPolicy``).

The shell passes in the random draw, so tests get exact delays; only the shell
calls ``clock.callLater``.
"""

from __future__ import annotations


def backoff_delay(
    attempt: int,
    *,
    initial: float,
    factor: float,
    maximum: float,
    jitter: float,
    draw: float,
) -> float:
    """Delay before retry number ``attempt`` (1 = the first retry).

    ``initial * factor**(attempt-1)``, capped at ``maximum``, then spread by
    ``+/- jitter`` of itself using ``draw`` in [0, 1) (0.5 = no spread), and never
    above ``maximum`` or below zero.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    try:
        base = initial * factor ** (attempt - 1)
    except OverflowError:
        base = maximum
    base = min(base, maximum)
    spread = base * jitter * (2.0 * draw - 1.0)
    return max(0.0, min(maximum, base + spread))
