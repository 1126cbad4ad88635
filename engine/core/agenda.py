"""Agendas: where an event lands, and how an agenda entry moves (pure, no I/O).

Layer 3 of the mapping design. Values in, decisions out; no clock, no store, no twisted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

KINDS = ("appointment-request", "referral", "diagnostic-order", "appointment")
ACTIONS = ("create", "update", "cancel", "complete", "attach", "book", "reschedule")


def _frozen_mapping(value: Mapping[str, object]) -> Mapping[str, object]:
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class AgendaEvent:
    """What one mapped message says about one agenda entry.

    ``fields`` holds everything else under dotted names ("patient.bsn", "care_product",
    "attachments", "booked_start", ...); it is frozen when the event is built.
    """

    kind: str  # appointment-request | referral | diagnostic-order | appointment
    action: str  # create | update | cancel | complete | attach | book | reschedule
    zd_number: str | None = None
    placer_id: str | None = None
    filler_id: str | None = None
    fields: Mapping[str, object]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AgendaEvent.kind must be one of {', '.join(KINDS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"AgendaEvent.action must be one of {', '.join(ACTIONS)}")
        object.__setattr__(self, "fields", _frozen_mapping(self.fields))
