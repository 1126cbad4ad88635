"""Agendas: where an event lands, and how an agenda entry moves (pure, no I/O).

Layer 3 of the mapping design. A mapping turns one message into one ``AgendaEvent``; this
module decides what that event does to the hospital's agendas:

- ``AgendaBook.select(event)`` picks the agenda (first rule match in file order, else the
  fallback agenda, flagged so the caller can count it);
- ``decide(event, existing, ...)`` returns ``Create``, ``Update``, ``Hold`` or ``Reject``;
- ``release(held, entry, ...)`` replays held events (e.g. a letter that came before its
  request) in arrival order once their entry exists, each when it no longer ``waits`` (a
  scheduler's S13 held before its S12 applies after the S12).

The store does the I/O: it finds ``existing`` by ``correlation_keys(event)`` (an entry
answers to ``entry_keys(entry)``), gives a created entry its id (``entry.with_id(...)``;
``decide`` returns new entries with ``id=None``), keeps attachment bytes by sha256, keeps
held events, and persists what ``decide`` returns. No clock here: ``now`` is passed in.

Texts in decisions and errors name states, actions and key kinds, never field values, so
they are safe for logs and ACKs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from types import MappingProxyType
from typing import Union

from engine.core import slots
from engine.core.convert import PartialDate

__all__ = [
    "ACTIONS",
    "CLOSED_STATES",
    "STATES",
    "FAMILY",
    "INITIAL_STATE",
    "KINDS",
    "TRANSITIONS",
    "Agenda",
    "AgendaBook",
    "AgendaEntry",
    "AgendaEvent",
    "Attachment",
    "Create",
    "Decision",
    "HistoryItem",
    "Hold",
    "IllegalMove",
    "Reject",
    "Release",
    "SelectRule",
    "Update",
    "attachments_of",
    "correlation_keys",
    "decide",
    "entry_keys",
    "release",
    "states_of",
    "transition",
    "waits",
]

KINDS = ("appointment-request", "referral", "diagnostic-order", "appointment")
ACTIONS = ("create", "update", "cancel", "complete", "attach", "book", "reschedule")

# ---------------------------------------------------------------------------------------
# The state table: one place for both families. (family, state) -> {action: next state}.
# An action missing from a state's row is an illegal move there.

FAMILY: Mapping[str, str] = MappingProxyType(
    {
        "appointment-request": "appointment",
        "referral": "appointment",
        "appointment": "appointment",
        "diagnostic-order": "order",
    }
)
INITIAL_STATE: Mapping[str, str] = MappingProxyType(
    {
        "appointment-request": "requested",
        "referral": "requested",
        "appointment": "booked",  # a scheduler's own appointment exists once it is booked
        "diagnostic-order": "ordered",
    }
)

_OPEN_APPOINTMENT = {"create": None, "attach": None, "cancel": "cancelled"}  # None: stays
TRANSITIONS: Mapping[str, Mapping[str, Mapping[str, str | None]]] = MappingProxyType(
    {
        "appointment": MappingProxyType(
            {
                "requested": MappingProxyType({**_OPEN_APPOINTMENT, "update": None, "book": "booked"}),
                "booked": MappingProxyType(
                    {**_OPEN_APPOINTMENT, "update": "modified", "reschedule": "rescheduled", "complete": "completed"}
                ),
                "rescheduled": MappingProxyType(
                    {**_OPEN_APPOINTMENT, "update": "modified", "reschedule": "rescheduled", "complete": "completed"}
                ),
                "modified": MappingProxyType(
                    {**_OPEN_APPOINTMENT, "update": "modified", "reschedule": "rescheduled", "complete": "completed"}
                ),
                "cancelled": MappingProxyType({"attach": None}),  # letters are kept, never lost
                "completed": MappingProxyType({"attach": None}),
            }
        ),
        "order": MappingProxyType(
            {
                "ordered": MappingProxyType(
                    {"create": None, "update": None, "attach": None, "book": "scheduled", "cancel": "cancelled",
                     "complete": "completed"}  # fmt: skip
                ),
                "scheduled": MappingProxyType(
                    {"create": None, "update": None, "attach": None, "reschedule": None, "cancel": "cancelled",
                     "complete": "completed"}  # fmt: skip
                ),
                "cancelled": MappingProxyType({"attach": None}),
                "completed": MappingProxyType({"attach": None}),
            }
        ),
    }
)
CLOSED_STATES = frozenset({"cancelled", "completed"})
STATES = tuple(dict.fromkeys(state for family in TRANSITIONS.values() for state in family))  # every state

# Re-deliveries: the action that led to the state, repeated. Changing nothing, it is a no-op;
# a repeated cancel is always a no-op (an S04 and an S15 may both cancel one entry).
_REPEATS = {"booked": "book", "scheduled": "book", "cancelled": "cancel", "completed": "complete"}

# When one key gets creates of several kinds (ZorgDomein SRM + ORM of one referral), the entry
# takes the first kind of this list, whatever the arrival order; state moves across families
# by _CROSS_FAMILY so the final state does not depend on the order either.
KIND_PRECEDENCE = ("appointment-request", "referral", "appointment", "diagnostic-order")
_CLOSED = {"cancelled": "cancelled", "completed": "completed"}
_CROSS_FAMILY = {
    ("order", "appointment"): {"ordered": "requested", "scheduled": "booked", **_CLOSED},
    ("appointment", "order"): {"requested": "ordered", "booked": "scheduled", "rescheduled": "scheduled",
                               "modified": "scheduled", **_CLOSED},  # fmt: skip
}


def states_of(kind: str) -> tuple[str, ...]:
    """Every state an entry of this kind can be in."""
    return tuple(TRANSITIONS[FAMILY[kind]])


class IllegalMove(Exception):
    """An action that the state table does not allow (our misuse if it escapes ``decide``)."""

    def __init__(self, *, family: str, state: str, action: str) -> None:
        self.family, self.state, self.action = family, state, action
        super().__init__(f"{family} entry in state {state!r} cannot take action {action!r}")


def transition(kind: str, state: str, action: str) -> str:
    """The state after ``action``; raises IllegalMove naming family, state and action."""
    family = FAMILY[kind]
    row = TRANSITIONS[family].get(state)
    if row is None or action not in row:
        raise IllegalMove(family=family, state=state, action=action)
    target = row[action]
    return state if target is None else target


# ---------------------------------------------------------------------------------------
# Values


_NO_DATA: Mapping[str, object] = MappingProxyType({})  # an entry's data when none is given (read-only)


def _frozen_mapping(value: Mapping[str, object]) -> Mapping[str, object]:
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
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
    # Names in ``fields`` whose value is the mapping's `default` (nothing usable was sent):
    # such a value fills a gap but never replaces what a message said.
    defaulted: frozenset[str] = frozenset()

    def __init__(self, *, kind: str, action: str, zd_number: str | None = None, placer_id: str | None = None,
                 filler_id: str | None = None, fields: Mapping[str, object],
                 defaulted: frozenset[str] = frozenset()) -> None:
        if kind not in KINDS:
            raise ValueError(f"AgendaEvent.kind must be one of {', '.join(KINDS)}")
        if action not in ACTIONS:
            raise ValueError(f"AgendaEvent.action must be one of {', '.join(ACTIONS)}")
        a, b, c, d, e, f, g = _EVENT  # (see engine.core.slots)
        a(self, kind)
        b(self, action)
        c(self, zd_number)
        d(self, placer_id)
        e(self, filler_id)
        f(self, _frozen_mapping(fields))
        g(self, defaulted)


_EVENT = slots.setters(AgendaEvent)


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class HistoryItem:
    """One change of an entry and the message that caused it (field names, never values)."""

    at: datetime
    message_id: str
    action: str
    from_state: str | None  # None: the entry was created by this item
    to_state: str
    changed: tuple[str, ...] = ()
    kind: str | None = None  # the event's kind ("appointment": the scheduler); None if not recorded

    def __init__(self, *, at: datetime, message_id: str, action: str, from_state: str | None, to_state: str,
                 changed: tuple[str, ...] = (), kind: str | None = None) -> None:
        a, b, c, d, e, f, g = _HISTORY_ITEM  # (see engine.core.slots)
        a(self, at)
        b(self, message_id)
        c(self, action)
        d(self, from_state)
        e(self, to_state)
        f(self, changed)
        g(self, kind)


_HISTORY_ITEM = slots.setters(HistoryItem)


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class AgendaEntry:
    """One thing in an agenda: a request, referral, order or appointment, and its history."""

    id: str | None  # None until the store has given it one (entry.with_id)
    agenda_id: str
    kind: str
    state: str
    zd_number: str | None = None
    placer_id: str | None = None
    filler_id: str | None = None
    data: Mapping[str, object] = field(default_factory=lambda: _NO_DATA)
    attachments: tuple[str, ...] = ()  # sha256 hex digests, in arrival order, each once
    history: tuple[HistoryItem, ...] = ()

    def __init__(self, *, id: str | None, agenda_id: str, kind: str, state: str,  # noqa: A002 (the field's name)
                 zd_number: str | None = None, placer_id: str | None = None, filler_id: str | None = None,
                 data: Mapping[str, object] = _NO_DATA, attachments: tuple[str, ...] = (),
                 history: tuple[HistoryItem, ...] = ()) -> None:
        if kind not in KINDS:
            raise ValueError(f"AgendaEntry.kind must be one of {', '.join(KINDS)}")
        if state not in TRANSITIONS[FAMILY[kind]]:
            raise ValueError(f"AgendaEntry.state is not a state of a {FAMILY[kind]} entry")
        a, b, c, d, e, f, g, h, i, j = _ENTRY  # (see engine.core.slots)
        a(self, id)
        b(self, agenda_id)
        c(self, kind)
        d(self, state)
        e(self, zd_number)
        f(self, placer_id)
        g(self, filler_id)
        h(self, _frozen_mapping(data))
        i(self, attachments if attachments.__class__ is tuple else tuple(attachments))
        j(self, history if history.__class__ is tuple else tuple(history))

    @property
    def is_open(self) -> bool:
        return self.state not in CLOSED_STATES

    @property
    def previous_state(self) -> str | None:
        """The state before the change that made this entry (None: that change created it).
        An outbound `when` reads it to tell a system of a cancel once, and only when the
        entry was in a state that system knows of (see mappings/zorgdomein-srm.yaml)."""
        return self.history[-1].from_state if self.history else None

    def with_id(self, entry_id: str) -> AgendaEntry:
        return replace(self, id=entry_id)


_ENTRY = slots.setters(AgendaEntry)


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A document that came with an event: the store keeps ``payload`` once per sha256."""

    sha256: str
    payload: bytes
    filename: str | None = None
    media_type: str | None = None


# ---------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True, slots=True, kw_only=True)
class Create:
    """A new entry (``entry.id`` is None: the store assigns it). ``fallback``: no agenda rule
    selected it; count it."""

    entry: AgendaEntry
    attachments: tuple[Attachment, ...] = ()  # new documents to store by sha256
    fallback: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Update:
    """The existing entry, changed (or, if ``noop``, exactly as it was: a re-delivery)."""

    entry: AgendaEntry
    attachments: tuple[Attachment, ...] = ()
    changed: tuple[str, ...] = ()
    noop: bool = False
    # A noop from a greater kind than the one that set some of its fields: no value changed,
    # but the entry now records that kind for them (to save quietly: no history, nothing sent).
    ranks: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """The event's entry does not exist yet, or is not yet in the state the event changes (a
    scheduler's S13 before its S12: see ``waits``): keep the event under ``keys`` and replay it
    with ``release`` when an entry answering to one of them is created or changed."""

    key: str  # the main key ("zd:...", else "placer:...", else "filler:...")
    keys: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """The event cannot be applied; ``reason`` is safe to log and to put in an ACK.

    ``code``: no-key | unknown-entry | closed-entry | illegal-move | patient-mismatch; the
    processor's overtaken (a message mapped late, after a later one of its kind).
    """

    reason: str
    code: str


Decision = Union[Create, Update, Hold, Reject]


# ---------------------------------------------------------------------------------------
# Correlation

_ZD_RE = re.compile(r"Z[DP][0-9]{6,12}")
_KEY_NAMES = {"zd": "ZD-number", "placer": "placer id", "filler": "filler id"}


def _zd_of(zd_number: str | None, placer_id: str | None) -> str | None:
    """The ZD-number of an event or entry: its own, or a placer id that is one (SCH-1 of a
    booking made for a ZorgDomein referral carries the ZD-number).

    ZorgDomein numbers are upper case (``ZD``/``ZP`` and digits): as the mapping's
    ``zd_number`` conversion refuses ``zd123...`` in ARQ-1, ORC-4 or MSH-10, a lower-case
    ZD-shaped placer id is not taken for one either (it stays a plain placer id), so the
    same text never correlates through one message type and fails in another."""
    if zd_number and zd_number.strip():
        return zd_number.strip()
    if placer_id and _ZD_RE.fullmatch(placer_id.strip()):
        return placer_id.strip()
    return None


def _own_placer(placer_id: str | None, zd: str | None) -> str | None:
    """The placer id worth keeping: not when it is just the ZD-number again (SRM ARQ-1)."""
    if not placer_id or not placer_id.strip() or placer_id.strip() == zd:
        return None
    return placer_id.strip()


def _keys(zd_number: str | None, placer_id: str | None, filler_id: str | None) -> tuple[str, ...]:
    keys: list[str] = []
    zd = _zd_of(zd_number, placer_id)
    if zd:
        keys.append(f"zd:{zd}")
    if placer_id and placer_id.strip() and placer_id.strip() != zd:
        keys.append(f"placer:{placer_id.strip()}")
    if filler_id and filler_id.strip():
        keys.append(f"filler:{filler_id.strip()}")
    return tuple(keys)


def correlation_keys(event: AgendaEvent) -> tuple[str, ...]:
    """Keys that tie an event to an entry, strongest first: "zd:ZD123", "placer:X", "filler:Y".

    A placer id that is a ZD-number counts as the ZD-number (an SIU booking of a referral)."""
    return _keys(event.zd_number, event.placer_id, event.filler_id)


def entry_keys(entry: AgendaEntry) -> tuple[str, ...]:
    """Keys an entry answers to (same form as correlation_keys)."""
    return _keys(entry.zd_number, entry.placer_id, entry.filler_id)


def _key_kind(key: str) -> str:
    return _KEY_NAMES[key.split(":", 1)[0]]


# ---------------------------------------------------------------------------------------
# Agenda selection


def _codes(value: object) -> list[str]:
    """Codes in a field value: a string, a code-like object (``.code``), a mapping with
    "code", or a list of those."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, Mapping):
        return _codes(value.get("code"))
    if isinstance(value, (list, tuple, frozenset, set)):
        return [code for item in value for code in _codes(item)]
    code = getattr(value, "code", None)
    return _codes(code) if isinstance(code, str) else []


def _matches(pattern: str, value: str, *, fold: bool) -> bool:
    if fold:
        pattern, value = pattern.casefold(), value.casefold()
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


# rule criterion -> event field it reads (None: the event's kind)
SELECT_FIELDS: Mapping[str, str | None] = MappingProxyType(
    {
        "specialism": "specialism",  # AIG-3 / AIS: "CAR"
        "care_product": "care_product",  # ARQ-7 / PV2-3: "CARREG001" (Code or text)
        "cluster": "cluster",  # ZorgDomein cluster name (NTE after MSH in ORM/OML)
        "prd_specialty": "prd_specialty",  # REF: PRD with role RT, its specialty
        "location_agb": "location_agb",  # AIL location AGB
        "kind": None,
    }
)
_FOLDED = frozenset({"cluster"})  # names compare case-insensitively; codes exactly


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectRule:
    """All given criteria must match (a criterion: any of its codes; "CAR*" is a prefix)."""

    specialism: frozenset[str] | None = None
    care_product: frozenset[str] | None = None
    cluster: frozenset[str] | None = None
    prd_specialty: frozenset[str] | None = None
    location_agb: frozenset[str] | None = None
    kind: frozenset[str] | None = None
    # Per given criterion, in SELECT_FIELDS order: (event field or None, fold, the exact
    # patterns, the prefixes of the "X*" patterns), casefolded where fold; see _matches.
    _criteria: tuple[tuple[str | None, bool, frozenset[str], tuple[str, ...]], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        if all(getattr(self, name) is None for name in SELECT_FIELDS):
            raise ValueError("a select rule needs at least one criterion")
        criteria = []
        for name, field_name in SELECT_FIELDS.items():
            codes = getattr(self, name)
            if codes is not None:
                if not codes:
                    raise ValueError(f"select rule criterion {name} is an empty list")
                codes = frozenset(codes)
                object.__setattr__(self, name, codes)
                fold = name in _FOLDED
                patterns = [p.casefold() if fold else p for p in codes]
                exact = frozenset(p for p in patterns if not p.endswith("*"))
                prefixes = tuple(sorted(p[:-1] for p in patterns if p.endswith("*")))
                criteria.append((field_name, fold, exact, prefixes))
        object.__setattr__(self, "_criteria", tuple(criteria))

    def matches(self, event: AgendaEvent) -> bool:
        return self._matches(event, {})

    def _matches(self, event: AgendaEvent, seen: dict[tuple[str | None, bool], list[str]]) -> bool:
        """``matches``, with the event's codes per field read once per ``seen`` (one select)."""
        for field_name, fold, exact, prefixes in self._criteria:
            values = seen.get((field_name, fold))
            if values is None:
                values = [event.kind] if field_name is None else _codes(event.fields.get(field_name))
                if fold:
                    values = [v.casefold() for v in values]
                seen[(field_name, fold)] = values
            for value in values:
                if value in exact or (prefixes and value.startswith(prefixes)):
                    break
            else:
                return False
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Agenda:
    """An appointment book or worklist of the hospital."""

    id: str
    name: str
    department: str | None = None
    location_agb: str | None = None
    rules: tuple[SelectRule, ...] = ()
    fallback: bool = False

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("an agenda needs an id")
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.fallback and self.rules:
            raise ValueError("the fallback agenda takes what no rule selects; it has no rules")

    def matches(self, event: AgendaEvent) -> bool:
        return self._matches(event, {})

    def _matches(self, event: AgendaEvent, seen: dict[tuple[str | None, bool], list[str]]) -> bool:
        for rule in self.rules:
            if rule._matches(event, seen):
                return True
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class AgendaBook:
    """The hospital's agendas in file order; exactly one is the fallback."""

    agendas: tuple[Agenda, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "agendas", tuple(self.agendas))
        ids = [agenda.id for agenda in self.agendas]
        if len(set(ids)) != len(ids):
            raise ValueError("agenda ids must be unique")
        if sum(agenda.fallback for agenda in self.agendas) != 1:
            raise ValueError("exactly one agenda must be the fallback")

    @property
    def fallback(self) -> Agenda:
        return next(agenda for agenda in self.agendas if agenda.fallback)

    def agenda(self, agenda_id: str) -> Agenda:
        found = self.find(agenda_id)
        if found is None:
            raise KeyError(agenda_id)
        return found

    def find(self, agenda_id: str | None) -> Agenda | None:
        """The agenda, or None (an entry stored under an agenda since taken out of the file)."""
        for agenda in self.agendas:
            if agenda.id == agenda_id:
                return agenda
        return None

    def select(self, event: AgendaEvent) -> tuple[Agenda, bool]:
        """(agenda, is_fallback): the first agenda in file order with a matching rule, else
        the fallback agenda with True (never silent: the caller counts it)."""
        seen: dict[tuple[str | None, bool], list[str]] = {}  # the event's codes, read once
        for agenda in self.agendas:
            if not agenda.fallback and agenda._matches(event, seen):
                return agenda, False
        return self.fallback, True


# ---------------------------------------------------------------------------------------
# Attachments and data


# ED-2 "type of data" (HL7 table 0191) -> the MIME top-level type, for ``application/pdf``
_MEDIA_KINDS = {"ap": "application", "application": "application", "im": "image", "image": "image",
                "tx": "text", "text": "text", "audio": "audio", "au": "audio", "video": "video",
                "multipart": "multipart", "message": "message", "model": "model", "font": "font"}


def media_type_of(kind: object, subtype: object) -> str | None:
    """An ED's ED-2 and ED-3 as one MIME type: ``^application^pdf^`` and ``^AP^PDF^`` are
    ``application/pdf``; a subtype that is a whole MIME type already stays; an ED-2 that
    names no MIME type leaves the subtype as sent."""
    if not subtype:
        return None
    subtype = str(subtype).strip()
    if "/" in subtype:
        return subtype.lower()
    top = _MEDIA_KINDS.get(str(kind or "").strip().lower())
    return f"{top}/{subtype.lower()}" if top else subtype


def _attachment(item: object) -> Attachment | None:
    """One attachment from an event's "attachments" list: a mapping with "data" (base64
    text if "encoding" says Base64), "filename", "media_type" (and "media_kind", ED-2); or
    bytes / text."""
    filename = media_type = None
    if isinstance(item, Mapping):
        data = item.get("data")
        encoding = item.get("encoding")
        filename = item.get("filename") or None
        media_type = media_type_of(item.get("media_kind"), item.get("media_type"))
    else:
        data, encoding = item, None
    if isinstance(data, bytes):
        payload = data
    elif isinstance(data, str) and data:
        payload = data.encode("utf-8", errors="surrogateescape")
        if isinstance(encoding, str) and encoding.strip().lower() == "base64":
            compact = "".join(data.split())
            try:  # padding restored: the same letter sent with or without it is one attachment
                payload = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
            except (binascii.Error, ValueError):
                pass  # not base64 after all (`convert: base64` refuses it): kept as text, stored once
    else:
        return None
    return Attachment(
        sha256=hashlib.sha256(payload).hexdigest(),
        payload=payload,
        filename=str(filename) if filename is not None else None,
        media_type=str(media_type) if media_type is not None else None,
    )


def attachments_of(event: AgendaEvent) -> tuple[Attachment, ...]:
    """The event's attachments, each once (by sha256), in order."""
    items = event.fields.get("attachments")
    if items is None or isinstance(items, (str, bytes, Mapping)):
        items = [] if items is None else [items]
    seen: set[str] = set()
    out: list[Attachment] = []
    for item in items if isinstance(items, Iterable) else []:
        attachment = _attachment(item)
        if attachment is not None and attachment.sha256 not in seen:
            seen.add(attachment.sha256)
            out.append(attachment)
    return tuple(out)


def plain(value: object) -> object:
    """A value as the store keeps it (JSON): dataclasses as dicts, dates as ISO text, tuples
    as lists. Entry data read back from the store is in this form, event fields are typed, so
    the two are compared in it: a re-delivery is then a no-op in any batch."""
    if isinstance(value, (datetime, date, PartialDate)):
        return value.isoformat()
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None and not isinstance(value, type):
        return {name: plain(getattr(value, name)) for name in fields}
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}  # type: ignore[union-attr]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def _is_empty(value: object) -> bool:
    # (isinstance before ==: a code or a name would compare itself to "" in Python, per field)
    return value is None or (isinstance(value, (str, list, tuple)) and not value)


# Entry data keeps, under this key, the rank (KIND_PRECEDENCE index) of the kind of message
# that set each field: a field is replaced only by a message of the same or a greater kind, so
# the value that ends up there does not depend on arrival order (an order's XO update cannot
# overwrite the request's care product, whether it comes before or after the request; the
# order's own CA still updates the order's order_control).
SOURCES = "_sources"
# Entry data keeps, under this key, the type of the message each destination last had for the
# entry ({"his-scheduling": "SIU^S12"}), written by the processor as it builds them: an
# outbound `when` reads it as `entry.last_sent` (tell the HIS of a cancel only if it had the
# request). Entries stored before it was kept lack the key.
SENT = "_sent"
# Entry data keeps, under this key, the agenda the entry's messages selected, merged like any
# field (by rank, in SOURCES): the request's choice stands over an order's, an order's change
# over its create, and a message that selects nothing (only the fallback) leaves it, so where
# an entry ends up does not depend on the order its messages came in.
AGENDA = "_agenda"
# The rank of a mapping default (sex U when PID-8 is empty): below every kind of message, so
# any message that sends the field replaces it, and a default never replaces a sent value.
DEFAULT_RANK = len(KIND_PRECEDENCE)
# Within one kind, a create ranks below the kind's other messages: it says what was first
# sent, so an update of the same kind (ORM XO after NW, REF^I13 after I12, the scheduler's
# S13/S14 after its S12) keeps its values whichever of the two arrives first (a late ORM NW
# left order_control NW over the XO). A value set by one of these is recorded half a step
# above its kind (rank - 0.5): a create of the kind does not reach it, any other message of
# the kind does (among those, the latest). A create, cancel or complete records the kind's own
# rank (a cancel or complete closes the entry; after it a create of that kind is refused).
_RESTATING = frozenset({"update", "book", "reschedule", "attach"})
# Event fields that are not entry data: attachments are stored once and referenced; the sources
# are the entry's own bookkeeping.
_NOT_DATA = frozenset({"attachments", SOURCES})


def _merge(
    data: Mapping[str, object], fields: Mapping[str, object], *, overwrite: bool = True, rank: int | None = None,
    defaulted: frozenset[str] = frozenset(), action: str = "update",
) -> tuple[dict[str, object], list[str]]:
    """Event fields over entry data; empty values never erase what another message said.
    ``rank`` is the event's kind's (KIND_PRECEDENCE index). A field set by a message of a
    greater kind (lower rank) than this one's is kept, and so is one that an update of this
    kind set when this is a create (see _RESTATING); one whose source is not recorded (older
    entries) follows ``overwrite``. A ``defaulted`` field only fills a field the entry lacks."""
    record = None if rank is None else rank - 0.5 if action in _RESTATING else rank  # what it leaves
    if not data:
        return _new_data(fields, record, defaulted)
    merged = dict(data)
    sources = dict(merged.get(SOURCES) or {})
    changed: list[str] = []
    reach = None if rank is None else rank if action == "create" else rank - 0.5  # what it may replace
    for name, value in fields.items():
        # (_is_empty, written out: this runs for every field of every message)
        if value is None or name in _NOT_DATA or (isinstance(value, (str, list, tuple)) and not value):
            continue
        field_rank = DEFAULT_RANK if name in defaulted else record
        if name in merged:
            if name in defaulted:
                continue
            source = sources.get(name)
            allowed = overwrite if source is None or reach is None else reach <= source
            if not allowed:
                continue
        if isinstance(value, list):
            value = tuple(value)
        if name not in merged or (merged[name] != value and plain(merged[name]) != plain(value)):
            merged[name] = value
            changed.append(name)
        if field_rank is not None and (sources.get(name) is None or field_rank < sources[name] or name in changed):
            sources[name] = field_rank
    if sources:
        merged[SOURCES] = sources
    return merged, sorted([name for name in changed if name != AGENDA])  # (a move shows as agenda_id)


def _new_data(fields: Mapping[str, object], record: float | None, defaulted: frozenset[str],
              agenda: str | None = None) -> tuple[dict[str, object], list[str]]:
    """``_merge`` into no data (a new entry: every message's create): each field with a value
    is set, changed, and recorded at the event's rank (a default's below every kind); and the
    ``agenda`` chosen, as ``_with_agenda`` adds it."""
    merged: dict[str, object] = {}
    sources: dict[str, float] = {}
    for name, value in fields.items():
        if value is None or name in _NOT_DATA or (isinstance(value, (str, list, tuple)) and not value):
            continue
        merged[name] = tuple(value) if isinstance(value, list) else value
        if record is not None:
            sources[name] = DEFAULT_RANK if name in defaulted else record
    if agenda is not None:
        merged[AGENDA] = agenda
        if record is not None:
            sources[AGENDA] = DEFAULT_RANK if AGENDA in defaulted else record
    changed = sorted([name for name in merged if name != AGENDA])
    if sources:
        merged[SOURCES] = sources
    return merged, changed


# ---------------------------------------------------------------------------------------
# Deciding


def decide(
    event: AgendaEvent,
    existing: AgendaEntry | None,
    *,
    now: datetime,
    message_id: str,
    book: AgendaBook,
    waiting: bool = False,
) -> Decision:
    """What ``event`` does, given the entry its correlation keys found (or None). Never raises
    on event content. ``waiting``: messages for these keys are already held for their entry.

    - no entry: create -> Create (agenda from ``book.select``); attach -> Hold (a letter may
      come before its request); book, and the scheduler's reschedule or update (S13, S14), with
      a ZD-number -> Hold (the scheduler may answer a referral before its messages got here);
      a change (cancel, reschedule, update, complete) while others wait for the same entry ->
      Hold behind them (the scheduler's S12 then S15 before the SRM: booked, then cancelled);
      anything else -> Reject naming the key kind.
    - an entry: the state table decides the move; fields merge into data by rank (see
      _RESTATING: a create does not replace what an update of its kind set; changed names in
      history); attachments are added once by sha256. A create merges (ZorgDomein re-sends and
      supplements). The scheduler's S13/S14 for an entry not yet booked -> Hold (``waits``).
      A closed entry takes only letters, and the create of a greater kind (the SRM of a
      cancelled order: it becomes the request it would have been, still cancelled); a cancel of
      a cancelled entry adds what it says that the entry lacks (see _cancel_again); other
      actions -> Reject "entry is <state>". A repeat of the action that led to the state
      (re-delivery) that changes nothing is a no-op Update.
    """
    keys = correlation_keys(event)
    if existing is None:
        return _decide_new(event, keys, now=now, message_id=message_id, book=book, waiting=waiting)
    return _apply(event, existing, now=now, message_id=message_id, book=book)


def _decide_new(
    event: AgendaEvent, keys: tuple[str, ...], *, now: datetime, message_id: str, book: AgendaBook,
    waiting: bool = False,
) -> Decision:
    if not keys:
        return Reject(reason="the event carries no ZD-number, placer id or filler id", code="no-key")
    if event.action == "create":
        agenda, fallback = book.select(event)
        # (_merge({}, _with_agenda(...)) without the copy of the event's fields)
        data, changed = _new_data(event.fields, KIND_PRECEDENCE.index(event.kind), event.defaulted,
                                  agenda=None if fallback else agenda.id)
        attachments = attachments_of(event)
        if attachments:
            changed = sorted([*changed, "attachments"])
        state = INITIAL_STATE[event.kind]
        entry = AgendaEntry(
            id=None,
            agenda_id=agenda.id,
            kind=event.kind,
            state=state,
            zd_number=_zd_of(event.zd_number, event.placer_id),
            placer_id=_own_placer(event.placer_id, _zd_of(event.zd_number, event.placer_id)),
            filler_id=(event.filler_id or "").strip() or None,
            data=MappingProxyType(data),  # (this decision's own dict: read-only without a copy)
            attachments=tuple(a.sha256 for a in attachments),
            history=(
                HistoryItem(
                    at=now, message_id=message_id, action="create", from_state=None, to_state=state,
                    changed=tuple(changed), kind=event.kind,
                ),
            ),
        )  # fmt: skip
        return Create(entry=entry, attachments=attachments, fallback=fallback)
    key = keys[0]
    if event.action == "attach":
        return Hold(key=key, keys=keys, reason=f"waiting for the entry with this {_key_kind(key)}")
    if event.action == "book" and key.startswith("zd:"):
        return Hold(key=key, keys=keys, reason=f"booking waits for the entry with this {_key_kind(key)}")
    if _changes_a_booking(event) and key.startswith("zd:"):
        return Hold(key=key, keys=keys, reason=f"change of a booking waits for the entry with this {_key_kind(key)}")
    if waiting:
        return Hold(key=key, keys=keys, reason=f"waits behind earlier messages for the entry with this {_key_kind(key)}")
    return Reject(reason=f"cannot {event.action}: no entry for this {_key_kind(key)}", code="unknown-entry")


def _replayed(kind: str, history: tuple[HistoryItem, ...]) -> str | None:
    """The state an entry of ``kind`` would be in after the changes in ``history``, in order
    (an order's S12 then S13 replayed as a request's: rescheduled, where the order family,
    which has no such state, kept 'scheduled'). None without a complete history (entries
    recorded before the event kinds were, or a caller that did not load it)."""
    if not history or history[0].from_state is not None or any(item.kind is None for item in history):
        return None
    state = INITIAL_STATE[kind]
    for item in history[1:]:
        if item.action in ("create", "attach") or (item.action == "update" and item.kind != "appointment"):
            continue  # data only (see _apply: only the scheduler's update moves the state)
        try:
            state = transition(kind, state, item.action)
        except IllegalMove:
            continue
    return state


def _apply(
    event: AgendaEvent, entry: AgendaEntry, *, now: datetime, message_id: str, book: AgendaBook
) -> Decision:
    action = event.action
    kind, agenda_id, state = entry.kind, entry.agenda_id, entry.state
    # The create of a greater kind (the SRM of an order already cancelled or completed) still
    # makes the entry what it would have been had it come first: kind, agenda and its fields,
    # the state kept, as for a letter.
    takes_over = action == "create" and KIND_PRECEDENCE.index(event.kind) < KIND_PRECEDENCE.index(kind)
    closed = not entry.is_open
    if closed and action == "cancel" and state == "cancelled" and _other_patient(entry, event):
        # A cancel about another patient (colliding ids) is refused as it is while the entry is
        # open, not taken as a repeat of this entry's cancel: the outcome must not depend on
        # whether it came before or after the entry's own cancel.
        return Reject(reason=f"cannot {action}: the message's patient (BSN) is not the entry's",
                      code="patient-mismatch")
    if closed and action != "attach" and not takes_over:
        if action == "cancel" and state == "cancelled":
            return _cancel_again(event, entry, now=now, message_id=message_id)
        return Reject(reason=f"cannot {action}: entry is {state}", code="closed-entry")
    if _other_patient(entry, event):
        return Reject(reason=f"cannot {action}: the message's patient (BSN) is not the entry's",
                      code="patient-mismatch")
    if waits(event, entry):
        keys = correlation_keys(event) or entry_keys(entry)
        return Hold(key=keys[0], keys=keys, reason="the scheduler's change waits for the booking it changes")

    # A create of a lesser kind (an ORM for a referral that has its SRM) only adds missing
    # fields; one of a greater kind takes over kind, agenda and the fields it has.
    overwrite = action != "create" or KIND_PRECEDENCE.index(event.kind) <= KIND_PRECEDENCE.index(kind)
    if takes_over:
        family_move = (FAMILY[kind], FAMILY[event.kind])
        if family_move[0] != family_move[1]:
            replayed = None if closed else _replayed(event.kind, entry.history)
            state = replayed or _CROSS_FAMILY[family_move][state]  # closed stays closed
        kind = event.kind
    fields = event.fields
    if action in ("create", "update"):
        # Its agenda choice merges like its fields (AGENDA): a request's over an order's, the
        # sender's redirect (REF^I13 to another specialty, an order's XO to another modality)
        # over its create, booked or not; one that selects nothing leaves the agenda.
        fields = _with_agenda(fields, *book.select(event))

    repeat = _REPEATS.get(entry.state) == action
    try:
        to_state = transition(kind, state, "attach" if closed else action)  # closed: the state stays
    except IllegalMove:
        to_state = None
        if not repeat:
            return Reject(reason=f"cannot {action}: entry is {entry.state}", code="illegal-move")
    if action == "update" and event.kind != "appointment" and to_state is not None:
        # `modified` says the scheduler changed a booked appointment (SIU^S14); a referral's or
        # an order's update (REF^I13, ORC-1 XO) only changes data, so it ends the same whether
        # it arrives before or after the booking.
        to_state = state

    data, changed = _merge(_agenda_seeded(entry, book), fields, overwrite=overwrite,
                           rank=KIND_PRECEDENCE.index(event.kind), defaulted=event.defaulted, action=action)
    agenda_id = data.get(AGENDA, agenda_id)  # type: ignore[assignment]
    known = set(entry.attachments)
    new_attachments = tuple(a for a in attachments_of(event) if a.sha256 not in known)
    if new_attachments:
        changed.append("attachments")
    zd = entry.zd_number or _zd_of(event.zd_number, event.placer_id)
    placer = entry.placer_id or _own_placer(event.placer_id, zd)
    filler = entry.filler_id or (event.filler_id or "").strip() or None
    for name, old, new in (("zd_number", entry.zd_number, zd), ("placer_id", entry.placer_id, placer),
                           ("filler_id", entry.filler_id, filler), ("kind", entry.kind, kind),
                           ("agenda_id", entry.agenda_id, agenda_id)):  # fmt: skip
        if old != new:
            changed.append(name)
    changed = sorted(set(changed))
    if to_state is None:  # a repeated book/complete: fine if it changes nothing
        if changed:
            return Reject(reason=f"cannot {action}: entry is {entry.state}", code="illegal-move")
        return _noop(entry, data)
    scheduler_change = FAMILY[kind] == "order" and event.kind == "appointment" and action in ("reschedule", "update")
    if not changed and to_state == entry.state and not scheduler_change:
        # (an order keeps `scheduled` through the scheduler's changes; they are still recorded,
        # as a request's create replays them: see _replayed)
        return _noop(entry, data)
    item = HistoryItem(
        at=now, message_id=message_id, action=action, from_state=entry.state, to_state=to_state,
        changed=tuple(changed), kind=event.kind,
    )  # fmt: skip
    updated = replace(
        entry,
        agenda_id=agenda_id,
        kind=kind,
        state=to_state,
        zd_number=zd,
        placer_id=placer,
        filler_id=filler,
        data=data,
        attachments=entry.attachments + tuple(a.sha256 for a in new_attachments),
        history=entry.history + (item,),
    )
    return Update(entry=updated, attachments=new_attachments, changed=tuple(changed))


def _with_agenda(fields: Mapping[str, object], agenda: Agenda, fallback: bool) -> Mapping[str, object]:
    """The event's fields with its agenda choice (AGENDA), when it selects one."""
    return fields if fallback else {**fields, AGENDA: agenda.id}


def _agenda_seeded(entry: AgendaEntry, book: AgendaBook) -> Mapping[str, object]:
    """The entry's data with its agenda as a choice of its kind, for an entry stored before
    the choice was kept (AGENDA): its agenda then stands as its kind's create chose it. The
    fallback agenda is no one's choice: an entry there takes the first real one."""
    if AGENDA in entry.data or entry.agenda_id == book.fallback.id:
        return entry.data
    sources = dict(entry.data.get(SOURCES) or {})
    sources[AGENDA] = KIND_PRECEDENCE.index(entry.kind)
    return {**entry.data, AGENDA: entry.agenda_id, SOURCES: sources}


def _cancel_again(event: AgendaEvent, entry: AgendaEntry, *, now: datetime, message_id: str) -> Update:
    """A cancel of an entry already cancelled (the request's S04 after the order's CA, or the
    other way) ends the entry as if it had cancelled first, as far as that does not depend on
    replacing another kind's value: it fills the fields the entry lacks (the second cancel kept
    only the values it repeated, so what it alone said was lost in one order), replaces values
    its own kind set (the order's CA still sets order_control after the request's S04), and
    becomes the source of the values it repeats. It never erases a value, and one another kind
    set that it sends differently is kept (left: had it cancelled first, a greater kind would
    have replaced it). Adding or replacing values is a change (history, outbound messages);
    otherwise it is a no-op."""
    rank = KIND_PRECEDENCE.index(event.kind)
    sources = entry.data.get(SOURCES) or {}

    def own_kind(name: str) -> bool:
        source = sources.get(name)
        return isinstance(source, (int, float)) and math.ceil(source) == rank and name not in event.defaulted

    fields = {name: value for name, value in event.fields.items()
              if name not in entry.data or plain(entry.data[name]) == plain(value) or own_kind(name)}
    data, changed = _merge(entry.data, fields, rank=rank, defaulted=event.defaulted, action="cancel")
    if not changed:
        return _noop(entry, data)
    item = HistoryItem(at=now, message_id=message_id, action="cancel", from_state=entry.state,
                       to_state=entry.state, changed=tuple(changed), kind=event.kind)
    updated = replace(entry, data=data, history=entry.history + (item,))
    return Update(entry=updated, changed=tuple(changed))


def _changes_a_booking(event: AgendaEvent) -> bool:
    """The scheduler's change of its booking: SIU^S13 (reschedule) or S14 (update)."""
    return event.kind == "appointment" and event.action in ("reschedule", "update")


def waits(event: AgendaEvent, entry: AgendaEntry) -> bool:
    """Whether ``event`` must wait before it can apply to ``entry``: the scheduler's change of a
    booking (SIU^S13, S14) while the entry can still be booked (``requested``, ``ordered``)
    waits for the booking (S12) it changes, as a letter waits for its request; applied at once
    it was refused ("entry is requested") or changed the request before the older S12 wrote
    over it. A closed entry does not wait (the change is refused: "entry is cancelled"), nor
    does one about another patient (refused at once)."""
    return (_changes_a_booking(event) and "book" in TRANSITIONS[FAMILY[entry.kind]].get(entry.state, {})
            and not _other_patient(entry, event))


def _other_patient(entry: AgendaEntry, event: AgendaEvent) -> bool:
    """Whether both name a BSN and they differ. Ids from different senders can collide (a REF's
    RF1-11 and a scheduler's SCH-2): a message about another patient must never change an entry."""
    known_bsn, event_bsn = entry.data.get("patient.bsn"), event.fields.get("patient.bsn")
    return not _is_empty(known_bsn) and not _is_empty(event_bsn) and plain(known_bsn) != plain(event_bsn)


def _noop(entry: AgendaEntry, data: dict[str, object]) -> Update:
    """Nothing changes: a re-delivery, or a message that repeats what the entry holds. If it
    is of a greater kind than the one that set some of those fields, the entry keeps that
    (``ranks``), so a later message of the lesser kind cannot change them, as in the other order."""
    if (data.get(SOURCES) or {}) == (entry.data.get(SOURCES) or {}):
        return Update(entry=entry, noop=True)
    return Update(entry=replace(entry, data=data), noop=True, ranks=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """The entry after replaying held events, and what each held message came to."""

    entry: AgendaEntry
    attachments: tuple[Attachment, ...]  # new documents to store, all held events together
    results: tuple[tuple[str, Decision], ...]  # (message_id, Update | Reject), in the order applied
    waiting: tuple[str, ...] = ()  # message ids that still wait (``waits``): keep them held


def release(
    held: Sequence[tuple[str, AgendaEvent]],
    entry: AgendaEntry,
    *,
    now: datetime,
    book: AgendaBook,
) -> Release:
    """Apply held ``(message_id, event)`` pairs, in the order given (arrival order), to
    ``entry`` (just created or found): each time the earliest that does not ``wait`` (an S13
    held before its S12 applies after it). Each gets its own history item; one that cannot
    apply is Rejected without stopping the others; those that still wait are in ``waiting``."""
    results: list[tuple[str, Decision]] = []
    attachments: list[Attachment] = []
    pending = list(held)
    while True:
        ready = next((index for index, (_, event) in enumerate(pending) if not waits(event, entry)), None)
        if ready is None:
            break
        message_id, event = pending.pop(ready)
        decision = _apply(event, entry, now=now, message_id=message_id, book=book)
        if isinstance(decision, Update):
            entry = decision.entry
            attachments.extend(decision.attachments)
        results.append((message_id, decision))
    return Release(entry=entry, attachments=tuple(attachments), results=tuple(results),
                   waiting=tuple(message_id for message_id, _ in pending))
