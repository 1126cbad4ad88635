"""Shared test helpers: the sample messages copied from ../shared/samples.

Samples are read in binary mode, always: text mode would turn CR into LF and
destroy the segment boundaries the engine must see exactly as a sender sends them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: a loaded 2-core CI machine must not turn a slow example into a
# failure. Under CI the examples are derandomized, so a run there is reproducible; locally
# they stay random and keep looking for new counterexamples.
settings.register_profile("koppel", deadline=None, derandomize=bool(os.environ.get("CI")))
settings.load_profile("koppel")

SAMPLES_DIR = Path(__file__).parent / "samples"


def sample_names() -> list[str]:
    """Every sample as "folder/file.hl7", sorted (stable test ids)."""
    return sorted(p.relative_to(SAMPLES_DIR).as_posix() for p in SAMPLES_DIR.glob("*/*.hl7"))


def load_sample(name: str) -> bytes:
    """The exact bytes of one sample, e.g. ``load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")``."""
    return (SAMPLES_DIR / name).read_bytes()


@pytest.fixture
def sample():
    """Fixture form of :func:`load_sample` for tests that prefer injection."""
    return load_sample
