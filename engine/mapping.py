"""Mappings: one HL7 message in, one AgendaEvent (or clean mapping errors) out; and the
outbound messages built from templates.

Files (all checked at load, every problem reported as ``file:line:col: dotted.path: cause``
with engine.config's ConfigProblem/ConfigError):

- ``mappings/*.yaml`` (except ``agendas.yaml``): one mapping each, ``name``, ``types``,
  ``event`` (value specs per event field) and optional ``outbound`` (destination, filter,
  template). Value spec keys: ``from`` (a field path) | ``value`` (a constant) | ``first``
  (a list of specs: the first that gives a value); ``convert`` (engine.core.convert name),
  ``table`` (inline mapping or CSV name), ``default``, ``required``, ``group`` (evaluate
  in the first segment group that matches: ``{anchor, members, where}``). A list value is
  ``{for_each: {anchor, members}, where: {PATH: value|[values]}, item: spec | {name: spec}}``.
- ``mappings/tables/*.csv``: lookup tables, header ``code,value``.
- ``mappings/templates/*.yaml``: outbound messages, ``message``, ``version``, ``charset``,
  ``segments`` (``- SEG: {n: value}`` or ``- for_each: FIELD`` + ``segments``); a value is
  a string, a list (components; a nested list in it: subcomponents) or a list of lists
  (repetitions). ``{dotted.event.field}`` placeholders (``{patient.name.surname}``,
  ``{attachments.1.data}``, ``{entry.id}``, ``{timestamp}``; ``{item...}``/``{index}`` in a
  for_each block) are escaped with the template's delimiters; literal text is not.
  ``{entry.<attribute>}`` reads the agenda entry, ``{entry.<field>}`` a field of its data;
  ``{a or b}`` the first of them that has a value.
- ``outbound: [{to, template, when}]`` (``template: received``: the message as received, queued
  itself): ``when: {field: value | [values] | "*"}`` ("*": the
  field has any value; ``TEXT*``: a value starting with TEXT), or a list of such maps (any one
  that holds). ``entry.last_sent`` is
  the type of the message this outbound's destination last had for the entry.

``first:`` takes the first option that gives a value; an option whose value does not
convert is passed over (those reasons are reported only when the field is required and
nothing fits).

Evaluating a mapping never raises on message content and never puts a field value into
an error text: errors name the mapping file and line, the event field and the path.
The order of a value spec is: source -> table -> convert -> default -> required.
"""

from __future__ import annotations

import csv
import datetime as _dt
import difflib
import io
import operator
import re
from collections.abc import Callable, Mapping as _Mapping, Sequence
from dataclasses import dataclass, field, replace as _replace_fields
from dataclasses import fields as dataclass_fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import yaml

from engine.config import (
    _NAME_RE,
    _TYPE_RE,
    _VERSION_RE,
    ConfigError,
    ConfigProblem,
    _bool,
    _entries,
    _is_null,
    _join,
    _kind,
    _text,
    _Walker,
    compose_file,
)
from engine.core import charsets
from engine.core import convert as _convert
from engine.core.agenda import ACTIONS, KINDS, SENT, STATES, AgendaEntry, AgendaEvent
from engine.core.escaping import _unchanged as _unchanged_escape
from engine.core.escaping import escaper, special_search
from engine.core.header import DEFAULT_DELIMITERS, Delimiters
from engine.core.hl7message import Message, escape, segment_groups
from engine.core.paths import ALL, FieldPath, PathError, first_subcomponents, parse_path, select
from engine.core.routing import ValuePatterns

__all__ = [
    "CONVERTS",
    "Mapping",
    "MappingError",
    "MappingResult",
    "MappingSet",
    "Outbound",
    "Template",
    "build",
    "build_outbound",
    "load_mappings",
]

TEMPLATES_DIR = "templates"
TABLES_DIR = "tables"
NOT_MAPPINGS = frozenset({"agendas.yaml"})  # other YAML files that live in mappings/
TOP_LEVEL = ("kind", "action", "zd_number", "placer_id", "filler_id")  # AgendaEvent attributes

_SEG_RE = re.compile(r"[A-Z][A-Z0-9]{2}")
_FIELD_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")
_MESSAGE_RE = re.compile(r"[A-Z][A-Z0-9]{2}\^[A-Z0-9]{3}(\^[A-Z0-9_]{3,7})?")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*")
_MSH_FILLED = {1: "MSH-1", 2: "MSH-2", 7: "MSH-7", 9: "MSH-9", 10: "MSH-10", 12: "MSH-12", 18: "MSH-18"}

# convert name -> (function, shape): "text" takes one string, "components" a list of
# components, "name" (components, subcomponents of the first).
CONVERTS: dict[str, tuple[Callable[..., Any], str]] = {
    "dtm": (_convert.dtm, "text"),
    "date": (_convert.date, "text"),
    "bsn": (_convert.bsn, "text"),
    "agb": (_convert.agb, "text"),
    "phone": (_convert.phone, "text"),
    "zd_number": (_convert.zd_number, "text"),
    "base64": (_convert.base64_data, "text"),
    "dutch_name": (_convert.dutch_name, "name"),
    "code": (_convert.code, "components"),
}


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingError:
    """Why a message did not map: where in the mapping, which event field, which path.

    Never carries a field value (patient data); ``reason`` says what was wrong with it.
    """

    file: str
    line: int
    field: str  # dotted event field, e.g. "patient.bsn" or "attachments[2].data"
    path: str  # the HL7 path(s) read, e.g. "PID-3[4=NLMINBIZA].1"; "" for constants
    reason: str
    located: bool = False  # path already names the segment occurrences in the message (_in_item)

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.file}:{self.line}: {self.field}{where}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingResult:
    """Either an event (errors empty) or the errors (event None)."""

    event: AgendaEvent | None
    errors: tuple[MappingError, ...] = ()

    @property
    def ok(self) -> bool:
        return self.event is not None


class _Failed:
    """A value spec reported an error: the caller must not also report it missing."""


_FAILED: Any = _Failed()
# The reason of a value whose reading raised: the exception's class follows it in brackets, for
# the stored error and the log; an on-map NAK says only this (engine.shell.processor).
UNREADABLE = "could not be read"
_Target = Any  # a Message or a segment group (list[Segment])


# ---------------------------------------------------------------------------------------
# Compiled value specs


@dataclass(frozen=True, slots=True, kw_only=True)
class _Group:
    """Segment groups: each starts at `anchor` and takes the following `members`."""

    anchor: str
    members: tuple[str, ...]
    where: tuple[tuple[FieldPath, frozenset[str]], ...] = ()
    _wanted: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_wanted", frozenset(self.members))  # (made once, not per message)

    def matching(self, message: _Target) -> list[Any]:
        if isinstance(message, Message):
            groups = message.groups(self.anchor, self._wanted)
        else:  # inside a for_each item: the groups within that item's segments
            groups = segment_groups(message, self.anchor, self._wanted) if isinstance(message, list) else []
        if not self.where:
            return groups
        out = []
        for g in groups:  # a loop, not all() over a generator per group: mapped per message
            for p, allowed in self.where:
                if p.repetition == ALL:  # PRD-1[*].1: RP holds for a PRD-1 of PP~RP (any repetition)
                    if not any(value in allowed for value in select(g, p) or ("",)):
                        break
                elif (p._first(g) or "") not in allowed:
                    break
            else:
                out.append(g)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Value:
    """One value spec, compiled: read, look up, convert, default, require."""

    file: str
    line: int
    label: str  # dotted event field, for errors
    path_text: str  # for errors
    path: FieldPath | None = None
    constant: Any = None  # final value of a `value:` spec (already looked up and converted)
    options: tuple[_Value, ...] = ()  # `first:`
    group: _Group | None = None
    table: _Mapping[str, str] | None = None
    table_name: str = ""
    convert: str = ""
    default: Any = None
    required: bool = False
    prefer: tuple[str, ...] = ()  # of all the values the path selects, the first listed here wins
    # A plain text read (a path, no group, no first:, a text convert or none): the path's
    # compiled ``first``, so evaluate can go straight to it.
    _reader: Any = field(init=False, repr=False, compare=False, default=None)
    # Any other spec: the method that reads it (within its group: ``_inner``), chosen once
    # rather than by a chain of tests per message.
    _source: Any = field(init=False, repr=False, compare=False, default=None)
    _inner: Any = field(init=False, repr=False, compare=False, default=None)
    _shape: str = field(init=False, repr=False, compare=False, default="text")
    # ``_reader`` when nothing follows the read (no table, convert, default or required): the
    # value is what it gives, so the loops over many specs call it without ``evaluate``
    # (Mapping.apply, _List.evaluate).
    _plain_reader: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        shape = CONVERTS[self.convert][1] if self.convert else "text"
        object.__setattr__(self, "_shape", shape)
        constant = self.path is None and not self.options
        plain = False
        if constant:
            inner = self._constant
        elif self.options:
            inner = self._first_option
        elif shape != "text":
            inner = self._structured
        elif self.prefer:
            inner = self._preferred
        else:
            inner, plain = self._plain, True
        grouped = self.group is not None and not constant
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_source", self._grouped if grouped else inner)
        if plain and not grouped:
            object.__setattr__(self, "_reader", self.path._first)  # type: ignore[union-attr]
            if self.table is None and not self.convert and self.default is None and not self.required:
                object.__setattr__(self, "_plain_reader", self.path._first)  # type: ignore[union-attr]

    def error(self, errors: list[MappingError], reason: str, label: str | None = None) -> Any:
        errors.append(
            MappingError(
                file=self.file, line=self.line, field=label or self.label, path=self.path_text, reason=reason
            )
        )
        return _FAILED

    def evaluate(self, target: _Target, errors: list[MappingError], label: str | None = None,
                 defaulted: list[bool] | None = None) -> Any:
        """The value, None when absent, or _FAILED after appending errors. Never raises.
        When the value is the `default` (nothing usable was sent), True is appended to
        ``defaulted``."""
        reader = self._reader
        try:
            if reader is not None:  # the straight line of _plain, without its call
                value = reader(target)
                if not value or value == '""':  # "" is HL7's explicit null
                    value = None
                elif self.table is None and not self.convert:
                    return value
                else:
                    value = self._finish(value, errors, label, defaulted)
            else:
                value = self._source(target, errors, label, defaulted)
        except Exception as unexpected:  # a broken message must not escape as an exception
            return self.unreadable(errors, unexpected, label)
        if value is _FAILED:
            return value
        if value is None:
            if self.default is not None:
                if defaulted is not None:
                    defaulted.append(True)
                return self.default
            if self.required:
                return self.error(errors, "missing (required)", label)
        return value

    def unreadable(self, errors: list[MappingError], unexpected: Exception, label: str | None = None) -> Any:
        """The error for an exception while reading (never its text: it may hold a value)."""
        return self.error(errors, f"{UNREADABLE} ({type(unexpected).__name__})", label)

    def _constant(self, target: _Target, errors: list[MappingError], label: str | None,
                  defaulted: list[bool] | None) -> Any:
        return self.constant

    def _grouped(self, target: _Target, errors: list[MappingError], label: str | None,
                 defaulted: list[bool] | None) -> Any:
        """The value read within the first segment group that matches."""
        groups = self.group.matching(target)  # type: ignore[union-attr]
        if not groups:
            return None
        group = groups[0]
        reported = len(errors)
        value = self._inner(group, errors, label, defaulted)
        if len(errors) > reported:  # paths read within the group: name its segments
            errors[reported:] = [_in_item(error, group) for error in errors[reported:]]
        return value

    def _first_option(self, target: _Target, errors: list[MappingError], label: str | None,
                      defaulted: list[bool] | None) -> Any:
        tried: list[MappingError] = []
        for option in self.options:
            value = option.evaluate(target, tried, label)
            if value is not None and value is not _FAILED:
                return self._finish(value, errors, label, defaulted) if (self.table or self.convert) else value
        # An option that does not convert is passed over ("the first that is a ZD-number");
        # when nothing fits a required field, why each option failed is the better error.
        if tried and self.required and self.default is None:
            errors.extend(tried)
            return _FAILED
        return None

    def _plain(self, target: _Target, errors: list[MappingError], label: str | None,
               defaulted: list[bool] | None) -> Any:
        raw = self.path._first(target)  # type: ignore[union-attr]
        if not raw or raw == '""':  # "" is HL7's explicit null
            return None
        if self.table is None and not self.convert:  # (as read: no call of _finish)
            return raw
        return self._finish(raw, errors, label, defaulted)

    def _finish(self, raw: Any, errors: list[MappingError], label: str | None,
                defaulted: list[bool] | None = None) -> Any:
        if self.table is not None:
            looked_up = self.table.get(raw) if isinstance(raw, str) else None
            if looked_up is None:
                if self.default is not None:
                    if defaulted is not None:
                        defaulted.append(True)
                    return self.default
                return self.error(errors, f"value not in table {self.table_name}", label)
            raw = looked_up
        if not self.convert:
            return raw
        try:
            return CONVERTS[self.convert][0](raw)
        except _convert.ConversionError as problem:
            return self.error(errors, f"cannot convert with {self.convert}: {problem}", label)

    def _preferred(self, target: _Target, errors: list[MappingError], label: str | None,
                   defaulted: list[bool] | None) -> Any:
        """Every value the path selects, finished; the one earliest in ``prefer`` (those not in
        it after, in message order): ORC[*]-1 of CA and XO is an update, of CA alone a cancel."""
        best, best_rank, best_defaulted = None, len(self.prefer) + 1, False
        path = self.path
        one_per_segment = path.repetition == 1 and path.match is None  # type: ignore[union-attr]
        for number, raw in enumerate(select(target, path), 1):  # type: ignore[arg-type]
            if not raw or raw == '""':
                continue
            reported = len(errors)
            by_default: list[bool] = []
            value = self._finish(raw, errors, label, by_default)
            if value is _FAILED:
                if one_per_segment and path.occurrence == ALL:  # name the segment: ORC[2]-1, not ORC[*]-1
                    errors[reported:] = [_replace_fields(e, path=e.path.replace("[*]", f"[{number}]", 1))
                                         for e in errors[reported:]]
                return value
            rank = self.prefer.index(value) if value in self.prefer else len(self.prefer)
            if rank < best_rank:
                best, best_rank, best_defaulted = value, rank, bool(by_default)
        if best_defaulted and defaulted is not None:  # only when the default is what it gives
            defaulted.append(True)
        return best

    def _structured(self, target: _Target, errors: list[MappingError], label: str | None,
                    defaulted: list[bool] | None) -> Any:
        # The first selected value with any content, split before unescaping; each component's
        # first subcomponent (and, for a name, every subcomponent of the first: FN.1-5).
        for firsts, content, first_subs in first_subcomponents(target, self.path):  # type: ignore[arg-type]
            if content:
                break
        else:
            return None
        function = CONVERTS[self.convert][0]
        # HL7's explicit null "" reads as empty (in the comprehension: no call per component)
        firsts = ["" if c is None or c == '""' else c for c in firsts]
        try:
            if self._shape == "name":
                return function(firsts, ["" if s is None or s == '""' else s for s in first_subs])
            return function(firsts)
        except _convert.ConversionError as problem:
            return self.error(errors, f"cannot convert with {self.convert}: {problem}", label)


@dataclass(frozen=True, slots=True, kw_only=True)
class _List:
    """A list value: one item per matching segment group."""

    file: str
    line: int
    label: str
    group: _Group
    item: _Value | tuple[tuple[str, _Value], ...]
    required: bool = False

    def evaluate(self, message: _Target, errors: list[MappingError]) -> Any:
        try:
            groups = self.group.matching(message)
        except Exception as unexpected:
            errors.append(self._error(f"{UNREADABLE} ({type(unexpected).__name__})"))
            return _FAILED
        items: list[Any] = []
        failed = False
        for number, group in enumerate(groups, 1):
            reported = len(errors)
            if isinstance(self.item, _Value):
                value = self.item.evaluate(group, errors, f"{self.label}[{number}]")
                failed |= value is _FAILED
                if value is not None and value is not _FAILED:
                    items.append(value)
            else:
                record: dict[str, Any] = {}
                for name, spec in self.item:
                    before = len(errors)
                    read = spec._plain_reader
                    if read is None:
                        value = spec.evaluate(group, errors, name)  # labelled below, only if it fails
                    else:  # evaluate's straight line, without the call (see Mapping.apply)
                        try:
                            value = read(group)
                        except Exception as unexpected:
                            value = spec.unreadable(errors, unexpected, name)
                        else:
                            if value == '""':
                                value = None
                    if len(errors) > before:
                        label = f"{self.label}[{number}].{name}"
                        errors[before:] = [_replace_fields(e, field=label) for e in errors[before:]]
                    failed |= value is _FAILED
                    if value is not None and value is not _FAILED:
                        record[name] = value
                if record:
                    items.append(record)
            if len(errors) > reported:
                errors[reported:] = [_in_item(error, group) for error in errors[reported:]]
        if failed:
            return _FAILED
        if not items:
            if self.required:
                errors.append(self._error("missing (required): no matching segment group"))
                return _FAILED
            return None
        return tuple(items)

    def _error(self, reason: str) -> MappingError:
        path = f"{self.group.anchor} groups"
        return MappingError(file=self.file, line=self.line, field=self.label, path=path, reason=reason)


def _in_item(error: MappingError, group: Any) -> MappingError:
    """The error with its paths naming the item's own segments in the message (``OBR[2]-4``
    for the second order's OBR), so an on-map NAK's ERR points at the item that failed, not
    at the first. A path's occurrence counts within the item, as the item read it."""
    if not error.path or error.located or not isinstance(group, list):
        return error
    parts = []
    for part in error.path.split(", "):
        name, rest = part[:3], part[3:]
        within = 1
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0 or not rest[1:close].isdigit():
                parts.append(part)  # [*] or a filter: no one occurrence to name
                continue
            within, rest = int(rest[1:close]), rest[close + 1:]
        if not rest.startswith("-"):
            parts.append(part)
            continue
        own = [segment.index for segment in group if segment.name == name]
        parts.append(f"{name}[{own[within - 1]}]{rest}" if within <= len(own) else part)
    return MappingError(file=error.file, line=error.line, field=error.field, path=", ".join(parts),
                        reason=error.reason, located=True)


# ---------------------------------------------------------------------------------------
# Templates


_Leaf = tuple[tuple[str, str | None], ...]  # (literal, placeholder name or None) pieces
# A field: repetitions -> components -> subcomponents -> leaf
_Field = tuple[tuple[tuple[_Leaf, ...], ...], ...]


@dataclass(frozen=True, slots=True)
class _NameUse:
    """A placeholder, or a `when` condition's key, where it is written: checked once every
    mapping is read (a template is shared; entry data holds what any mapping set)."""

    name: str
    line: int
    col: int
    path: str
    for_each: str | None = None  # the block it is in (its {item...} read that list's items)
    allowed: frozenset[str] = frozenset()  # a `when` condition's values


@dataclass(frozen=True, slots=True, kw_only=True)
class _SegmentTemplate:
    name: str
    fields: tuple[tuple[int, _Field], ...]  # sorted by field number


@dataclass(frozen=True, slots=True, kw_only=True)
class _Block:
    for_each: str  # event field holding a list; {item...} and {index} inside
    segments: tuple[_SegmentTemplate, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    """One outbound message shape, checked at load."""

    name: str  # file name under mappings/templates/
    file: str
    message: str  # MSH-9, e.g. SIU^S12^SIU_S12
    version: str  # MSH-12
    charset: str  # MSH-18 (HL7 name)
    codec: str
    processing_id: str = "P"
    msh: tuple[tuple[int, _Field], ...] = ()
    segments: tuple[_SegmentTemplate | _Block, ...] = ()
    delimiters: Delimiters = DEFAULT_DELIMITERS
    # where each placeholder is written, for the check against the mappings that use it
    uses: tuple[_NameUse, ...] = field(default=(), repr=False, compare=False)
    _plan: Any = field(default=None, init=False, repr=False, compare=False)  # _TemplatePlan

    def __post_init__(self) -> None:
        # Placeholders resolved into accessors and static fields rendered once, at load.
        object.__setattr__(self, "_plan", _TemplatePlan(self))


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbound:
    """Send the event to `to` built from `template`, if `when` matches the event."""

    to: str
    template: Template
    when: tuple[tuple[str, frozenset[str]], ...] = ()
    # `when` as a list of condition maps: any one that holds (``when`` above is then empty)
    when_any: tuple[tuple[tuple[str, frozenset[str]], ...], ...] = ()
    to_at: tuple[int, int, str] = (0, 0, "outbound.to")  # where `to` is written: line, column, path
    # the alternatives worked out once (build_outbound checks them per message): per condition
    # the accessor (None: entry.last_sent) and the texts its value may be
    _checks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_checks", tuple(
            tuple((None if name == LAST_SENT else _accessor(name), ValuePatterns.of(allowed))
                  for name, allowed in conditions)
            for conditions in (self.when_any or (self.when,))))


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, _dt.datetime):
        return _format_datetime(value)
    if isinstance(value, _dt.date):
        return "%04d%02d%02d" % (value.year, value.month, value.day)
    if isinstance(value, _convert.PartialDate):
        return value.hl7()
    if isinstance(value, _convert.Code):
        return value.code
    if isinstance(value, _convert.DutchName):
        return value.surname
    if isinstance(value, (tuple, list, dict)):
        return ""  # a list or record has no single text; name one of its parts
    return str(value)


def _format_datetime(value: _dt.datetime) -> str:
    """HL7 DTM: YYYYMMDDHHMMSS and, when aware, the offset as +HHMM (a DTM that was sent
    without a time of day goes out as it was sent). An offset that is not whole minutes
    (Amsterdam before 1940: +00:19:32) is rounded to the minute, since HL7 has no seconds
    in an offset."""
    if value.__class__ is _convert.DayTime and value.hl7:  # sent without a time of day: as sent
        return value.hl7
    text = "%04d%02d%02d%02d%02d%02d" % (value.year, value.month, value.day, value.hour, value.minute, value.second)
    tzinfo = value.tzinfo
    if tzinfo is None:
        return text
    if tzinfo.__class__ is _dt.timezone:  # a fixed offset (what convert.dtm gives)
        suffix = _FIXED_OFFSETS.get(tzinfo)
        if suffix is None:
            suffix = _FIXED_OFFSETS[tzinfo] = _offset_text(value)
        return text + suffix
    return text + _offset_text(value)


_FIXED_OFFSETS: dict[_dt.tzinfo, str] = {}


def _offset_text(value: _dt.datetime) -> str:
    offset = value.utcoffset()
    if offset is None:
        return ""
    minutes = round(offset.total_seconds() / 60)
    hours, minutes = divmod(abs(minutes), 60)
    return "%s%02d%02d" % ("+" if offset >= _dt.timedelta(0) else "-", hours, minutes)


def _resolve(
    name: str, event: AgendaEvent, entry: Any, item: Any, index: int | None, now: Any = None
) -> Any:
    """The value a placeholder (or `when`/`for_each` name) stands for; None when absent."""
    return _accessor(name)(event, entry, item, index, now)


_Accessor = Callable[[AgendaEvent, Any, Any, "int | None", Any], Any]
_ACCESSORS: dict[str, _Accessor] = {}


def _accessor(name: str) -> _Accessor:
    """``name`` worked out once into a function of (event, entry, item, index, now).

    Heads: ``index``, ``timestamp``, ``item...``, ``entry...``, the top-level event
    attributes, else the longest dotted prefix that is an event field, then each further
    part a key (mappings), a 1-based number (lists) or a public attribute.
    """
    found = _ACCESSORS.get(name)
    if found is None:
        found = _ACCESSORS[name] = _compile_accessor(name)
    return found


def _reads_item(name: str) -> bool:
    """Whether a placeholder (each of its ``or`` alternatives) reads a for_each block's
    ``{item...}`` or ``{index}``."""
    return any(option.split(".", 1)[0] in ("item", "index") for option in name.split(" or "))


def _compile_accessor(name: str) -> _Accessor:
    if " or " in name:  # {care_product.text or entry.care_product.text}: the first that is there
        options = tuple(_accessor(option) for option in name.split(" or "))

        def first_of(event: AgendaEvent, entry: Any, item: Any, index: int | None, now: Any) -> Any:
            # Present, even if empty: a code sent without a text keeps its empty text rather
            # than take another record's, so the parts of one code are never mixed.
            for get in options:
                value = get(event, entry, item, index, now)
                if value is not None:
                    return value
            return None

        return first_of
    parts = name.split(".")
    head = parts[0]
    if head == "index":
        return lambda event, entry, item, index, now: index
    if name == "timestamp":  # build time (a _Built while building, else the time given)
        return lambda event, entry, item, index, now: now.timestamp if now.__class__ is _Built else now
    if name == "control_id":  # the MSH-10 of the message being built: a unique document number
        return lambda event, entry, item, index, now: now.control_id if now.__class__ is _Built else None
    if head == "agenda":  # {agenda.location_agb}: the agenda the entry is in, from agendas.yaml
        agenda_steps = _steps(parts[1:])
        return lambda event, entry, item, index, now: (
            _walk(now.agenda, agenda_steps) if now.__class__ is _Built else None)
    if head == "item":
        steps = _steps(parts[1:])
        if not steps:
            return lambda event, entry, item, index, now: item
        if len(steps) == 1:  # {item.placer}: a key of a record (a dict), read without _walk
            key = parts[1]
            return lambda event, entry, item, index, now: (
                item.get(key) if item.__class__ is dict else _walk(item, steps))
        if len(steps) == 2 and not steps[1][2]:  # {item.test.code}: likewise, then an attribute
            key, attribute = parts[1], parts[2]

            def record_attribute(event: AgendaEvent, entry: Any, item: Any, index: int | None, now: Any) -> Any:
                if item.__class__ is dict:
                    value = item.get(key)
                    if _KINDS.get(value.__class__) == _OBJECT:
                        return getattr(value, attribute, None)
                return _walk(item, steps)

            return record_attribute
        return lambda event, entry, item, index, now: _walk(item, steps)
    if head == "entry":
        if len(parts) == 1:
            return lambda event, entry, item, index, now: entry
        if parts[1] in _ENTRY_ATTRIBUTES and not (parts[1] == "data" and len(parts) > 2):
            steps = _steps(parts[1:])
            return lambda event, entry, item, index, now: _walk(entry, steps)
        return _entry_data_accessor(parts[2:] if parts[1] == "data" else parts[1:])
    if name in TOP_LEVEL:
        return lambda event, entry, item, index, now: getattr(event, name)
    if len(parts) == 1:
        return lambda event, entry, item, index, now: event.fields.get(name)
    # (key, steps, and the attribute when that is the one step: patient.name.surname reads
    # a record's attribute without a call of _walk)
    candidates = tuple(
        (".".join(parts[:cut]), steps, steps[0][0] if len(steps) == 1 and not steps[0][2] else None)
        for cut in range(len(parts), 0, -1)
        for steps in (_steps(parts[cut:]),)
    )

    def dotted(event: AgendaEvent, entry: Any, item: Any, index: int | None, now: Any) -> Any:
        fields = event.fields
        for key, steps, attribute in candidates:
            if key in fields:
                value = fields[key]
                if attribute is not None and _KINDS.get(value.__class__) == _OBJECT:
                    return getattr(value, attribute, None)
                return _walk(value, steps) if steps else value
        return None

    return dotted


_ENTRY_ATTRIBUTES = frozenset(f.name for f in dataclass_fields(AgendaEntry)) | {"is_open", "previous_state"}


def _entry_data_accessor(parts: Sequence[str]) -> _Accessor:
    """``{entry.patient.name.surname}``: a field of the entry's data (what every message of
    the referral said so far, not only this one), by the longest dotted prefix that is a
    field, like an event field. Data read back from the store holds dates as ISO text; they
    come out as HL7 (``_from_stored``)."""
    candidates = tuple((".".join(parts[:cut]), _steps(parts[cut:])) for cut in range(len(parts), 0, -1))

    def from_data(event: AgendaEvent, entry: Any, item: Any, index: int | None, now: Any) -> Any:
        data = getattr(entry, "data", None)
        if not data:
            return None
        for key, steps in candidates:
            if key in data:
                value = _walk(data[key], steps) if steps else data[key]
                if value.__class__ is str:
                    return _from_stored(value)
                return _revived(value) if value.__class__ is dict else value
        return None

    return from_data


# Records stored as plain dicts (ag.plain), told apart by their fields: read back as the type
# the event had, so ``{entry.care_product}`` is the code and ``{entry.patient.name}`` the
# surname whether the entry came from this batch or from the store.
_RECORDS = {frozenset(f.name for f in dataclass_fields(cls)): cls for cls in (_convert.Code, _convert.DutchName)}


def _revived(value: dict) -> Any:
    cls = _RECORDS.get(frozenset(value))
    if cls is None:
        return value
    try:
        return cls(**value)
    except TypeError:
        return value


_STORED_DATE_RE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_STORED_DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([+-]\d{2}:\d{2}|Z)?")


def _from_stored(text: str) -> Any:
    """A value of stored entry data as the event had it: ISO dates and times (``ag.plain``'s
    form) as HL7 DT/DTM (``1980-06-01`` -> ``19800601``, a birth month ``1980-06`` ->
    ``198006``); any other text as it is."""
    if len(text) < 7 or text[4] != "-" or not text[:4].isdigit():
        return text
    if "T" in text:
        if _STORED_DATETIME_RE.fullmatch(text):
            try:
                return _dt.datetime.fromisoformat(text)
            except ValueError:
                return text
        return text
    m = _STORED_DATE_RE.fullmatch(text)
    if m is None:
        return text
    year, month, day = m.groups()
    return year + month + (day or "")


def _steps(parts: Sequence[str]) -> tuple[tuple[str, int, bool], ...]:
    """(part, its number for lists or 0, private) per remaining part of a dotted name."""
    return tuple((part, int(part) if part.isdigit() else 0, part.startswith("_")) for part in parts)


_MAPPING, _SEQUENCE, _OBJECT = 0, 1, 2
_KINDS: dict[type, int] = {}  # how _walk goes into a value of each type


def _kind_of(cls: type) -> int:
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = (
            _MAPPING if issubclass(cls, _Mapping) else _SEQUENCE if issubclass(cls, (tuple, list)) else _OBJECT
        )
    return kind


def _walk(base: Any, steps: tuple[tuple[str, int, bool], ...]) -> Any:
    for part, number, private in steps:
        if base is None:
            return None
        kind = _KINDS.get(base.__class__)
        if kind is None:
            kind = _kind_of(base.__class__)
        if kind == _MAPPING:
            base = base.get(part)
        elif kind == _SEQUENCE:
            base = base[number - 1] if 1 <= number <= len(base) else None
        else:
            base = getattr(base, part, None) if not private else None
    return base


def _render_field(value: _Field, d: Delimiters, lookup: Callable[[str], str]) -> str:
    """Reference rendering of one field (the compiled plan gives the same text)."""
    rep, comp, sub = (d.repetition.decode(), d.component.decode(), d.subcomponent.decode())
    out_reps = []
    for repetition in value:
        out_comps = []
        for component in repetition:
            out_subs = []
            for leaf in component:
                out_subs.append("".join(lit if name is None else escape(lookup(name), d) for lit, name in leaf))
            out_comps.append(sub.join(out_subs).rstrip(sub))
        out_reps.append(comp.join(out_comps).rstrip(comp))
    return rep.join(out_reps).rstrip(rep)


class _Slots:
    """The placeholder leaves of one context (the top level, or one for_each block), each
    worked out once per message (per item in a block), escaped, in a list; static leaves
    follow them in the same list, so a leaf is an index into it."""

    def __init__(self, escape_fn: Callable[[str], str], special: Callable[[str], Any] | None) -> None:
        self.escape = escape_fn
        self.special = special  # escape_fn's first scan (see special_search); None: escapes nothing
        self.dynamic: list[tuple[str, Any]] = []  # ("one", accessor) | ("mixed", pieces)
        self.dynamic_index: dict[_Leaf, int] = {}
        self.static: list[str] = []
        self.static_index: dict[str, int] = {}
        self.offset = 0  # set by finish(): where the static values start
        self.single: tuple[_Accessor, ...] | None = None  # set by finish(): every leaf one placeholder
        self.per_item: list[int] = []  # the dynamic leaves that read {item...} or {index}

    def leaf(self, leaf: _Leaf) -> tuple[bool, int]:
        """(dynamic?, index among the dynamic or static values)."""
        if all(name is None for _, name in leaf):
            text = "".join(lit for lit, _ in leaf)
            number = self.static_index.get(text)
            if number is None:
                number = self.static_index[text] = len(self.static)
                self.static.append(text)
            return False, number
        number = self.dynamic_index.get(leaf)
        if number is None:
            number = self.dynamic_index[leaf] = len(self.dynamic)
            if any(_reads_item(name) for _, name in leaf if name is not None):
                self.per_item.append(number)
            if len(leaf) == 1:
                self.dynamic.append(("one", _accessor(leaf[0][1])))  # type: ignore[arg-type]
            else:
                pieces = tuple((lit, None if name is None else _accessor(name)) for lit, name in leaf)
                self.dynamic.append(("mixed", pieces))
        return True, number

    def finish(self) -> None:
        self.offset = len(self.dynamic)
        if all(kind == "one" for kind, _ in self.dynamic):
            self.single = tuple(get for _, get in self.dynamic)

    def _leaf_value(self, number: int, event: AgendaEvent, entry: Any, item: Any, index: int | None,
                    now: Any) -> str:
        """One dynamic leaf's text, escaped."""
        kind, what = self.dynamic[number]
        esc = self.escape
        if kind == "one":
            value = what(event, entry, item, index, now)
            return esc(value if value.__class__ is str else _format(value))
        return "".join(lit if get is None else esc(_format(get(event, entry, item, index, now))) for lit, get in what)

    def next_item(self, values: list[str], event: AgendaEvent, entry: Any, item: Any, index: int, now: Any) -> None:
        """``values`` (a block's, for its previous item) for the next item: only the leaves
        that read the item change (a block's {zd_number} or {referrer.agb} is the same for
        every test of an order)."""
        single = self.single
        if single is None:
            for number in self.per_item:
                values[number] = self._leaf_value(number, event, entry, item, index, now)
            return
        texts = []
        for number in self.per_item:
            value = single[number](event, entry, item, index, now)
            texts.append(value if value.__class__ is str else "" if value is None else _format(value))
        for number, text in zip(self.per_item, self._escaped(texts)):
            values[number] = text

    def _escaped(self, texts: list[str]) -> list[str]:
        """``texts``, each escaped: one scan of them all, as nearly always none needs it."""
        special = self.special
        if special is None or special("".join(texts)) is None:
            return texts
        esc = self.escape
        return [esc(text) for text in texts]

    def values(self, event: AgendaEvent, entry: Any, item: Any, index: int | None, now: Any) -> list[str]:
        fmt = _format
        if self.single is not None:
            out = []
            for get in self.single:  # (an absent value, None, is "" without a call of _format)
                value = get(event, entry, item, index, now)
                out.append(value if value.__class__ is str else "" if value is None else fmt(value))
            out = self._escaped(out)
        else:  # (a leaf mixes literal text and placeholders)
            out = [self._leaf_value(number, event, entry, item, index, now) for number in range(len(self.dynamic))]
        out += self.static
        return out


class _SegmentPlan:
    """One template segment: the parts list with static fields filled in, and for each
    field with placeholders how to put it together from the context's values."""

    __slots__ = ("parts", "dynamic", "plain", "sub", "comp", "rep")

    def __init__(self, name: str, fields: Sequence[tuple[int, _Field]], d: Delimiters, slots: _Slots) -> None:
        self.rep, self.comp, self.sub = d.repetition.decode(), d.component.decode(), d.subcomponent.decode()
        top = max((n for n, _ in fields), default=0)
        self.parts: list[str] = [name] + [""] * top
        dynamic = []
        for n, value in fields:
            leaves = [[[slots.leaf(leaf) for leaf in component] for component in repetition] for repetition in value]
            if not any(is_dynamic for repetition in leaves for component in repetition for is_dynamic, _ in component):
                self.parts[n] = _render_field(value, d, _no_lookup)
                continue
            dynamic.append((n, leaves))
        self.dynamic = dynamic  # resolved to value-list indexes by bind()
        self.plain: tuple[tuple[int, int], ...] = ()  # (field, value index) needing no trim: bind()

    def bind(self, slots: _Slots) -> None:
        """Turn (dynamic?, number) leaves into indexes of the context's value list."""
        offset = slots.offset
        bound = []
        plain = []
        escapes = slots.escape is not _unchanged_escape
        for n, leaves in self.dynamic:
            reps = tuple(
                tuple(tuple(number if is_dynamic else offset + number for is_dynamic, number in component) for component in repetition)
                for repetition in leaves
            )
            if len(reps) == 1 and len(reps[0]) == 1 and len(reps[0][0]) == 1:
                number = reps[0][0][0]
                if escapes and number < offset and slots.dynamic[number][0] == "one":
                    plain.append((n, number))  # one escaped value: no delimiter to trim
                else:
                    bound.append((n, number, None))
            else:
                bound.append((n, -1, tuple((repetition, _qualified(repetition, offset, slots.static),
                                            _flat(repetition, offset, slots, escapes, self.sub))
                                           for repetition in reps)))
        self.dynamic = bound
        self.plain = tuple(plain)

    def render(self, values: list[str]) -> list[str]:
        parts = self.parts.copy()
        for n, number in self.plain:
            parts[n] = values[number]
        sub, comp, rep = self.sub, self.comp, self.rep
        for n, single, reps in self.dynamic:
            if reps is None:
                parts[n] = values[single].rstrip(sub).rstrip(comp).rstrip(rep)
                continue
            out_reps = []
            for repetition, placeholders, flat in reps:
                if placeholders:
                    for i in placeholders:
                        if values[i]:
                            break
                    else:
                        continue  # its literals only qualify values that are not there (see _qualified)
                if flat is not None:
                    out_reps.append(comp.join(flat(values)).rstrip(comp))
                    continue
                out_comps = []
                for component in repetition:
                    if len(component) == 1:
                        out_comps.append(values[component[0]].rstrip(sub))
                    else:
                        out_comps.append(sub.join([values[i] for i in component]).rstrip(sub))
                out_reps.append(comp.join(out_comps).rstrip(comp))
            parts[n] = rep.join(out_reps).rstrip(rep)
        return parts


def _qualified(repetition: tuple[tuple[int, ...], ...], offset: int, static: list[str]) -> tuple[int, ...]:
    """The value indexes of a repetition's placeholders when its first component holds no
    literal text: empty all, the repetition is left out, as its literals only qualify a value
    that is not there (``["{patient.mobile}", ORN, CP]`` without a mobile number is no
    ``~^ORN^CP``). () keeps it always: all literal, or a literal first component
    (``[Pending, "{text}", HL70278]`` still says Pending)."""
    if not repetition or any(i >= offset and static[i - offset] for i in repetition[0]):
        return ()
    return tuple(i for component in repetition for i in component if i < offset)


def _flat(repetition: tuple[tuple[int, ...], ...], offset: int, slots: _Slots, escapes: bool,
          sub: str) -> Callable[[list[str]], Sequence[str]] | None:
    """For a repetition of two or more components that are each one leaf with nothing to
    trim (an escaped value holds no delimiter; a literal that does not end in the
    subcomponent separator), its components' values in one C call; else None (rendered
    component by component)."""
    if len(repetition) < 2 or any(len(component) != 1 for component in repetition):
        return None
    for (i,) in repetition:
        if i < offset:
            if not escapes or slots.dynamic[i][0] != "one":
                return None
        elif slots.static[i - offset].endswith(sub):
            return None
    return operator.itemgetter(*(i for (i,) in repetition))


def _no_lookup(name: str) -> str:
    raise AssertionError(f"static field looked up {name!r}")


class _TemplatePlan:
    """A template worked out once: segment plans and the value slots of each context."""

    def __init__(self, template: Template) -> None:
        d = template.delimiters
        escape_fn, special = escaper(d), special_search(d)
        self.escape = escape_fn
        self.field_sep = d.field.decode()
        self.encoding = d.encoding.decode()
        top = _Slots(escape_fn, special)
        self.top = top
        self.msh = _SegmentPlan("MSH", template.msh, d, top)
        parts: list[tuple[_SegmentPlan | None, _Accessor | None, _Slots | None, tuple[_SegmentPlan, ...]]] = []
        blocks: list[tuple[_Slots, tuple[_SegmentPlan, ...]]] = []
        for part in template.segments:
            if isinstance(part, _SegmentTemplate):
                parts.append((_SegmentPlan(part.name, part.fields, d, top), None, None, ()))
                continue
            slots = _Slots(escape_fn, special)
            segments = tuple(_SegmentPlan(s.name, s.fields, d, slots) for s in part.segments)
            blocks.append((slots, segments))
            parts.append((None, _accessor(part.for_each), slots, segments))
        top.finish()
        self.msh.bind(top)
        for plan, _, _, _ in parts:
            if plan is not None:
                plan.bind(top)
        for slots, segments in blocks:
            slots.finish()
            for plan in segments:
                plan.bind(slots)
        self.parts = tuple(parts)


class _Built(NamedTuple):
    """What a template's {timestamp}, {control_id} and {agenda...} read while it is built."""

    timestamp: _dt.datetime
    control_id: str
    agenda: Any = None  # the agenda the entry is in (an agenda.Agenda), if known


def build(
    template: Template,
    event: AgendaEvent,
    *,
    control_id: str,
    timestamp: _dt.datetime,
    entry: Any = None,
    agenda: Any = None,
) -> bytes:
    """The outbound message for `event`, encoded in the template's charset.

    Placeholders take event values (escaped); MSH-1/2/7/9/10/12/18 are filled here.
    Characters the charset cannot hold become '?'. MSH-7 and ``{timestamp}`` are
    ``timestamp`` in Amsterdam time, as every other time that goes out, whatever the host's zone.
    """
    if timestamp.tzinfo is not None:
        zone = _convert.hospital_zone()
        if timestamp.tzinfo is not zone:  # (the engine's clock is in it already)
            timestamp = timestamp.astimezone(zone)
        timestamp = _convert.with_fixed_offset(timestamp)  # formatted at most a few times below
    plan: _TemplatePlan = template._plan
    field_sep = plan.field_sep
    built = _Built(timestamp, control_id, agenda)
    top = plan.top.values(event, entry, None, None, built)
    msh = plan.msh.render(top)  # msh[n] is MSH-n
    msh += [""] * (19 - len(msh))
    msh[2] = plan.encoding
    msh[7] = _format(timestamp)
    msh[9] = template.message
    msh[10] = plan.escape(control_id)
    msh[11] = msh[11] or template.processing_id
    msh[12] = template.version
    msh[18] = template.charset
    lines = ["MSH" + field_sep + field_sep.join(msh[2:]).rstrip(field_sep)]
    for segment, for_each, slots, segments in plan.parts:
        if segment is not None:
            lines.append(field_sep.join(segment.render(top)))
            continue
        items = for_each(event, entry, None, None, None)  # type: ignore[misc]
        if not isinstance(items, (tuple, list)):
            continue
        values = None
        for index, item in enumerate(items, 1):
            if values is None:
                values = slots.values(event, entry, item, index, built)  # type: ignore[union-attr]
            else:  # (rendering copies what it reads: the list is the block's own)
                slots.next_item(values, event, entry, item, index, built)  # type: ignore[union-attr]
            for block_segment in segments:
                lines.append(field_sep.join(block_segment.render(values)))
    return ("\r".join([line.rstrip(field_sep) if line[3:] else line for line in lines]) + "\r").encode(
        template.codec, "replace"
    )


# ---------------------------------------------------------------------------------------
# Mappings


_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Mapping:
    """One mapping file: which messages, how each event field is read, where it goes."""

    name: str
    file: Path
    types: tuple[str, ...]
    values: tuple[tuple[str, _Value | _List], ...]
    outbound: tuple[Outbound, ...] = ()
    # (name, spec, whether it has a default, its plain reader or None), worked out once:
    # apply runs per message.
    _plan: tuple[tuple[str, Any, bool, Any], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_plan", tuple(
            (name, spec, spec.__class__ is _Value and spec.default is not None,
             spec._plain_reader if spec.__class__ is _Value else None)
            for name, spec in self.values))

    def apply(self, message: Message) -> MappingResult:
        """Map one message. Never raises on message content; errors never hold values."""
        errors: list[MappingError] = []
        got: dict[str, Any] = {}
        defaulted: list[bool] = []
        by_default: set[str] = set()
        for name, spec, with_default, read in self._plan:
            if read is not None:  # a plain text read: evaluate's straight line, without the call
                try:
                    value = read(message)
                except Exception as unexpected:
                    value = spec.unreadable(errors, unexpected)
                else:
                    if value == '""':
                        value = None
            elif with_default:
                value = spec.evaluate(message, errors, None, defaulted)
                if defaulted:
                    by_default.add(name)
                    defaulted.clear()
            else:
                value = spec.evaluate(message, errors)
            if value is not None and value is not _FAILED:
                got[name] = value
        if errors:
            return MappingResult(event=None, errors=tuple(errors))
        top = {name: got.pop(name, None) for name in TOP_LEVEL}
        try:
            # (got is this call's own dict: read-only without the copy AgendaEvent makes of others)
            event = AgendaEvent(**top, fields=MappingProxyType(got),
                                defaulted=frozenset(by_default - top.keys()) if by_default else _NONE)
        except (TypeError, ValueError) as problem:
            line = dict(self.values)["action"].line if "action" in dict(self.values) else 1
            error = MappingError(file=str(self.file), line=line, field="kind/action", path="", reason=str(problem))
            return MappingResult(event=None, errors=(error,))
        return MappingResult(event=event)


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingSet:
    """Every mapping, by the message types it maps; templates and tables by name."""

    mappings: tuple[Mapping, ...]
    templates: _Mapping[str, Template] = field(default_factory=dict)
    tables: _Mapping[str, _Mapping[str, str]] = field(default_factory=dict)
    _by_type: dict[str, Mapping] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_type = {t: m for m in self.mappings for t in m.types}
        object.__setattr__(self, "_by_type", by_type)

    def for_type(self, type_and_trigger: str) -> Mapping | None:
        """The mapping for "SRM^S01" (exact first, then one that names just "SRM")."""
        found = self._by_type.get(type_and_trigger)
        if found is None:
            found = self._by_type.get(type_and_trigger.split("^", 1)[0])
        return found

    def mapping(self, name: str) -> Mapping:
        for mapping in self.mappings:
            if mapping.name == name:
                return mapping
        raise KeyError(name)


LAST_SENT = "entry.last_sent"
# `entry.last_sent` of an entry stored before Koppel kept what it sent (no SENT in its data)
UNKNOWN_SENT = "unknown"


def sent_so_far(data: _Mapping[str, Any], *, new: bool = False) -> dict[str, str]:
    """What each destination last had for an entry: its data's ``agenda.SENT``, as
    build_outbound takes it; for an entry stored before Koppel kept that, ``unknown`` for
    every destination (``"*"``); for a ``new`` one not yet given the key, nothing."""
    stored = data.get(SENT)
    if isinstance(stored, _Mapping):
        return dict(stored)
    return {} if new else {"*": UNKNOWN_SENT}


def _when_matches(outbound: Outbound, event: AgendaEvent, entry: Any, sent: _Mapping[str, str] | None) -> bool:
    """One of the outbound's condition maps holds (a single `when` map is the one)."""
    for checks in outbound._checks:
        for get, patterns in checks:
            if get is None:  # entry.last_sent: what this outbound's destination last had for the entry
                value = UNKNOWN_SENT if sent is None else sent.get(outbound.to) or sent.get("*")
            else:
                value = get(event, entry, None, None, None)
            if value.__class__ is str:
                if not patterns.match(value):
                    break
            elif not patterns.match(_format(value), empty=value is None or value == () or value == []):
                break
        else:
            return True
    return False


# `template: received`: the destination gets the message as it was received (queued itself,
# as a route's `to` does, but decided by the mapping: its agenda entry, `entry.last_sent`).
RECEIVED_NAME = "received"
RECEIVED: Any = type("Received", (), {"__repr__": lambda self: "RECEIVED"})()


def build_outbound(
    mapping: Mapping, event: AgendaEvent, entry: Any, *, control_id: str, timestamp: _dt.datetime,
    sent: _Mapping[str, str] | None = None, agenda: Any = None,
) -> list[tuple[str, Any]]:
    """(destination, bytes) for each outbound entry whose `when` matches; (destination,
    RECEIVED) for a `template: received` one (the caller queues the received message).
    ``agenda``: the agenda the entry is in, which `{agenda.name}` and the like read.

    ``sent``: the type of the message each destination last had for this entry (the entry's
    ``agenda.SENT``; ``"*"`` for any other destination), which `when` reads as
    ``entry.last_sent``; None: not known.
    With more than one outbound entry, each message's MSH-10 is ``control_id-N`` (N its
    1-based position in the mapping's outbound list), so ids stay unique and stable.
    """
    many = len(mapping.outbound) > 1
    out = []
    for number, outbound in enumerate(mapping.outbound, 1):
        if not _when_matches(outbound, event, entry, sent):
            continue
        if outbound.template is RECEIVED:
            out.append((outbound.to, RECEIVED))
            continue
        message_id = f"{control_id}-{number}" if many else control_id
        data = build(outbound.template, event, control_id=message_id, timestamp=timestamp, entry=entry, agenda=agenda)
        out.append((outbound.to, data))
    return out


def _compose(file: Path, display: str) -> tuple[yaml.Node | None, list[ConfigProblem]]:
    return compose_file(file, display, empty="expected a mapping or template")


# ---------------------------------------------------------------------------------------
# Reading tables


def _read_table(file: Path, display: str) -> tuple[dict[str, str] | None, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []

    def report(line: int, message: str, path: str = "(table)") -> None:
        problems.append(ConfigProblem(file=display, line=line, col=1, path=path, message=message))

    try:
        text = file.read_bytes().decode("utf-8-sig")
    except OSError as error:
        return None, [ConfigProblem(file=display, line=None, col=None, path="(file)", message=f"cannot read: {error.strerror}")]
    except UnicodeDecodeError:
        return None, [ConfigProblem(file=display, line=None, col=None, path="(file)", message="not valid UTF-8")]
    reader = csv.reader(io.StringIO(text, newline=""))
    table: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["code", "value"]:
            report(1, "the first row must be the header code,value")
            return None, problems
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                report(line, f"expected 2 columns (code,value), got {len(row)}")
                continue
            code, value = row[0].strip(), row[1].strip()
            if not code:
                report(line, "empty code")
            elif code in table:
                report(line, f"code listed twice (first at line {first_line[code]})", f"(table).{code}")
            else:
                table[code] = value
                first_line[code] = line
    except csv.Error as error:
        report(reader.line_num or 1, f"CSV syntax: {error}")
    return (table if not problems else None), problems


# ---------------------------------------------------------------------------------------
# Reading templates


class _TemplateReader(_Walker):
    def __init__(self, file: str) -> None:
        super().__init__(file)
        self.uses: list[_NameUse] = []
        self.for_each: str | None = None  # while reading a block's segments

    def template(self, root: yaml.Node, name: str) -> Template | None:
        m = self.mapping(root, "", ("message", "version", "charset", "processing_id", "segments"))
        if m is None:
            return None
        start = len(self.problems)
        values: dict[str, str] = {}
        for key, required in (("message", True), ("version", True), ("charset", True), ("processing_id", False)):
            if key not in m:
                if required:
                    self.report(root, key, "missing (required)")
                continue
            value = self.read(m[key], key, _text)
            if value is None:
                continue
            if key == "message" and not _MESSAGE_RE.fullmatch(value):
                self.report(m[key], key, f"{value!r} is not a message type like SIU^S12^SIU_S12")
            elif key == "version" and not _VERSION_RE.fullmatch(value):
                self.report(m[key], key, f'{value!r} is not an HL7 v2 version like "2.5" (quote it)')
            elif key == "charset" and value not in charsets.HL7_CHARSETS:
                self.report(m[key], key, f"unknown HL7 charset {value!r}")
            elif key == "processing_id" and value not in ("P", "T", "D"):
                self.report(m[key], key, "must be P, T or D")
            values[key] = value
        msh: tuple[tuple[int, _Field], ...] = ()
        parts: list[_SegmentTemplate | _Block] = []
        if "segments" not in m:
            self.report(root, "segments", "missing (required)")
        else:
            items = self.nodes(m["segments"], "segments", example="[{MSH: {3: KOPPEL}}, {PID: {3: ...}}]")
            for index, item in enumerate(items):
                path = _join("segments", index)
                if "for_each" in _entries(item):
                    block = self.block(item, path)
                    if block is not None:
                        parts.append(block)
                    continue
                segment = self.segment(item, path, allow_msh=index == 0)
                if segment is None:
                    continue
                if segment.name == "MSH":
                    msh = segment.fields
                else:
                    parts.append(segment)
            if not parts:
                self.report(m["segments"], "segments", "needs at least one segment after MSH")
        if len(self.problems) > start:
            return None
        return Template(
            name=name,
            file=self.file,
            message=values["message"],
            version=values["version"],
            charset=values["charset"],
            codec=charsets.codec_for(values["charset"]),
            processing_id=values.get("processing_id", "P"),
            msh=msh,
            segments=tuple(parts),
            uses=tuple(self.uses),
        )

    def block(self, node: yaml.MappingNode, path: str) -> _Block | None:
        m = self.mapping(node, path, ("for_each", "segments"))
        if m is None:
            return None
        start = len(self.problems)
        name = self.read(m["for_each"], _join(path, "for_each"), _text)
        if name is not None and not _FIELD_NAME_RE.fullmatch(name):
            self.report(m["for_each"], _join(path, "for_each"), f"{name!r} is not a dotted event field name")
        segments: list[_SegmentTemplate] = []
        if "segments" not in m:
            self.report(node, _join(path, "segments"), "missing (required)")
        else:
            self.for_each = name
            for index, item in enumerate(self.nodes(m["segments"], _join(path, "segments"), example="[{OBR: {...}}]")):
                segment = self.segment(item, _join(_join(path, "segments"), index), allow_msh=False, in_block=True)
                if segment is not None:
                    segments.append(segment)
            self.for_each = None
        if len(self.problems) > start or name is None:
            return None
        return _Block(for_each=name, segments=tuple(segments))

    def segment(
        self, node: yaml.Node, path: str, *, allow_msh: bool, in_block: bool = False
    ) -> _SegmentTemplate | None:
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            self.report(node, path, "expected one segment like {PID: {3: value}}")
            return None
        key_node, value_node = node.value[0]
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else ""
        seg_path = _join(path, name)
        if not _SEG_RE.fullmatch(name):
            self.report(key_node, path, f"{name!r} is not a segment name (3 capitals/digits)")
            return None
        if name == "MSH" and not allow_msh:
            self.report(key_node, seg_path, "MSH can only be the first segment")
            return None
        if _is_null(value_node):
            return _SegmentTemplate(name=name, fields=())
        m = self.mapping(value_node, seg_path, None)
        if m is None:
            return None
        fields: list[tuple[int, _Field]] = []
        for key, k_node, v_node in m.items():
            f_path = _join(seg_path, key)
            if not key.isdigit() or not 1 <= int(key) <= 999:
                self.report(k_node, f_path, "expected a field number from 1 to 999")
                continue
            number = int(key)
            if name == "MSH" and number in _MSH_FILLED:
                self.report(k_node, f_path, f"{_MSH_FILLED[number]} is filled by the builder")
                continue
            value = self.field_value(v_node, f_path, in_block)
            if value is not None:
                fields.append((number, value))
        return _SegmentTemplate(name=name, fields=tuple(sorted(fields)))

    def field_value(self, node: yaml.Node, path: str, in_block: bool) -> _Field | None:
        def leaf(n: yaml.Node, p: str) -> _Leaf | None:
            if _is_null(n):
                return (("", None),)
            if not isinstance(n, yaml.ScalarNode):
                self.report(n, p, f"expected a value, got {_kind(n)} (lists nest at most 3 deep)")
                return None
            return self.leaf(n, p, in_block)

        def component(n: yaml.Node, p: str) -> tuple[_Leaf, ...] | None:
            if isinstance(n, yaml.SequenceNode):
                subs = [leaf(s, _join(p, i)) for i, s in enumerate(n.value)]
                return None if any(s is None for s in subs) else tuple(subs)  # type: ignore[arg-type]
            one = leaf(n, p)
            return None if one is None else (one,)

        def components(n: yaml.SequenceNode, p: str) -> tuple[tuple[_Leaf, ...], ...] | None:
            comps = [component(c, _join(p, i)) for i, c in enumerate(n.value)]
            return None if any(c is None for c in comps) else tuple(comps)  # type: ignore[arg-type]

        if not isinstance(node, yaml.SequenceNode):
            one = leaf(node, path)
            return None if one is None else (((one,),),)
        nested = [isinstance(item, yaml.SequenceNode) for item in node.value]
        if nested and all(nested):
            reps = [components(r, _join(path, i)) for i, r in enumerate(node.value)]
            return None if any(r is None for r in reps) else tuple(reps)  # type: ignore[arg-type]
        # Values (and some lists, the subcomponents of those components): one repetition.
        comps = components(node, path)
        return None if comps is None else (comps,)

    def leaf(self, node: yaml.ScalarNode, path: str, in_block: bool) -> _Leaf | None:
        text = node.value
        if any(c in text for c in "|\r\n"):
            self.report(node, path, "literal text must not contain '|' or line breaks")
            return None
        pieces: list[tuple[str, str | None]] = []
        position = 0
        for match in _PLACEHOLDER_RE.finditer(text):
            literal = text[position : match.start()]
            if "{" in literal or "}" in literal:
                break
            if literal:
                pieces.append((literal, None))
            name = match[1]
            options = name.split(" or ")  # {entry.zd_number or entry.placer_id}: the first with a value
            for option in options:
                if not _PLACEHOLDER_NAME_RE.fullmatch(option):
                    self.report(node, path, f"placeholder {{{name}}} is not a dotted event field name "
                                            "(or several, each after ' or ')")
                    return None
                if _reads_item(option) and not in_block:
                    self.report(node, path, f"{{{name}}} is only known inside a for_each block")
                    return None
                mark = node.start_mark
                self.uses.append(_NameUse(option, mark.line + 1, mark.column + 1, path, self.for_each))
            pieces.append(("", " or ".join(options)))
            position = match.end()
        rest = text[position:]
        if "{" in rest or "}" in rest:
            self.report(node, path, "unmatched { or } (placeholders look like {patient.bsn})")
            return None
        if rest:
            pieces.append((rest, None))
        return tuple(pieces) or (("", None),)


# ---------------------------------------------------------------------------------------
# Reading mapping files


_SPEC_KEYS = ("from", "value", "first", "convert", "table", "default", "required", "group", "prefer")
_LIST_KEYS = ("for_each", "where", "item", "required")


class _MappingReader(_Walker):
    def __init__(self, file: str, tables: _Mapping[str, _Mapping[str, str]], templates: _Mapping[str, Template | None]):
        super().__init__(file)
        self.tables = tables
        self.templates = templates
        self.when_uses: list[_NameUse] = []  # checked against the mapping's names once all are read

    def read_mapping(self, root: yaml.Node, file: Path) -> tuple[Mapping | None, list[tuple[str, yaml.Node]]]:
        """The mapping (None if anything is wrong) and its types with their nodes."""
        m = self.mapping(root, "", ("name", "description", "types", "event", "outbound"))
        if m is None:
            return None, []
        start = len(self.problems)
        name = None
        if "name" not in m:
            self.report(root, "name", "missing (required)")
        else:
            name = self.read(m["name"], "name", _text)
            if name is not None and not _NAME_RE.fullmatch(name):
                self.report(m["name"], "name", f"{name!r} is not a valid name: letters, digits, '-', '_', '.'")
        if "description" in m:
            self.read(m["description"], "description", _text)
        types: list[tuple[str, yaml.Node]] = []
        if "types" not in m:
            self.report(root, "types", "missing (required)")
        else:
            for index, node in enumerate(self.nodes(m["types"], "types", example="[SRM^S01, SRM^S04]")):
                value = self.read(node, _join("types", index), _text)
                if value is None:
                    continue
                if not _TYPE_RE.fullmatch(value):
                    self.report(node, _join("types", index), f"{value!r} is not a message type like SRM^S01 or SRM")
                elif value in (t for t, _ in types):
                    self.report(node, _join("types", index), "listed twice")
                else:
                    types.append((value, node))
            if not types and len(self.problems) == start:
                self.report(m["types"], "types", "needs at least one message type")
        values: list[tuple[str, _Value | _List]] = []
        if "event" not in m:
            self.report(root, "event", "missing (required)")
        else:
            values = self.event(m["event"])
        outbound: list[Outbound] = []
        if "outbound" in m and not _is_null(m["outbound"]):
            example = "[{to: his-scheduling, template: his_siu_s12.yaml}]"
            for index, node in enumerate(self.nodes(m["outbound"], "outbound", example=example)):
                entry = self.outbound(node, _join("outbound", index))
                if entry is not None:
                    outbound.append(entry)
        if len(self.problems) > start or name is None:
            return None, types
        mapping = Mapping(
            name=name,
            file=file,
            types=tuple(t for t, _ in types),
            values=tuple(values),
            outbound=tuple(outbound),
        )
        return mapping, types

    def event(self, node: yaml.Node) -> list[tuple[str, _Value | _List]]:
        m = self.mapping(node, "event", None)
        if m is None:
            return []
        out: list[tuple[str, _Value | _List]] = []
        for key, key_node, value_node in m.items():
            path = _join("event", key)
            if not _FIELD_NAME_RE.fullmatch(key):
                self.report(key_node, path, "an event field is a dotted lower-case name like patient.bsn")
                continue
            head = key.split(".", 1)[0]
            if key.startswith("_"):
                self.report(key_node, path, "a name starting with '_' is the entry's own bookkeeping (_agenda, "
                                            "_sources, ...), not an event field: name it otherwise")
                continue
            if head in _TEMPLATE_NAMES:
                self.report(key_node, path, f"{head!r} is what a template's {{{head}...}} reads, not an event "
                                            "field: name it otherwise")
                continue
            if "for_each" in _entries(value_node):
                spec: _Value | _List | None = self.list_spec(value_node, path, key)
            else:
                spec = self.spec(value_node, path, key)
            if spec is not None:
                out.append((key, spec))
        for needed in ("kind", "action"):
            if needed not in m:
                self.report(node, _join("event", needed), "missing (required: every event has a kind and an action)")
        if "kind" in m:
            self.check_choices(m["kind"], "event.kind", KINDS)
        if "action" in m:
            self.check_choices(m["action"], "event.action", ACTIONS)
        return out

    def check_choices(self, node: yaml.Node, path: str, choices: Sequence[str]) -> None:
        """A constant or table that can only give one of `choices` is checked here, not per message."""
        entries = _entries(node)
        if "value" in entries and isinstance(entries["value"][1], yaml.ScalarNode):
            value_node = entries["value"][1]
            if value_node.value not in choices:
                self.report(value_node, _join(path, "value"), f"{value_node.value!r} is not one of: {', '.join(choices)}")
        if "table" in entries:
            table_node = entries["table"][1]
            if isinstance(table_node, yaml.MappingNode):
                for key, (_, v) in _entries(table_node).items():
                    if isinstance(v, yaml.ScalarNode) and v.value not in choices:
                        self.report(v, _join(_join(path, "table"), key), f"{v.value!r} is not one of: {', '.join(choices)}")
            elif isinstance(table_node, yaml.ScalarNode) and self.tables.get(table_node.value) is not None:
                # (a table that failed to load is None: its own problems are reported already)
                wrong = sorted(set(self.tables[table_node.value].values()) - set(choices))
                if wrong:
                    self.report(table_node, _join(path, "table"), f"table gives values that are not one of: {', '.join(choices)}")
        if "default" in entries and isinstance(entries["default"][1], yaml.ScalarNode):
            d = entries["default"][1]
            if d.value not in choices:
                self.report(d, _join(path, "default"), f"{d.value!r} is not one of: {', '.join(choices)}")

    def path(self, node: yaml.Node, path: str) -> FieldPath | None:
        text = self.read(node, path, _text)
        if text is None:
            return None
        try:
            return parse_path(text)
        except PathError as error:
            # The problem's own column in the file: a plain scalar starts at its mark, a
            # quoted one a character later (exact unless the path holds escapes).
            offset = error.column - 1 + (1 if node.style in ("'", '"') else 0)
            self.report(node, path, f"bad field path at column {error.column}: {error.reason}", col_offset=offset)
            return None

    def group(
        self, node: yaml.Node, path: str, where_node: yaml.Node | None = None, where_path: str = ""
    ) -> _Group | None:
        m = self.mapping(node, path, ("anchor", "members", "where"))
        if m is None:
            return None
        start = len(self.problems)
        anchor = None
        if "anchor" not in m:
            self.report(node, _join(path, "anchor"), "missing (required)")
        else:
            anchor = self.read(m["anchor"], _join(path, "anchor"), _text)
            if anchor is not None and not _SEG_RE.fullmatch(anchor):
                self.report(m["anchor"], _join(path, "anchor"), f"{anchor!r} is not a segment name")
        members: list[str] = []
        if "members" in m:
            for index, item in enumerate(self.nodes(m["members"], _join(path, "members"), example="[OBR, OBX, NTE]")):
                member = self.read(item, _join(_join(path, "members"), index), _text)
                if member is not None and not _SEG_RE.fullmatch(member):
                    self.report(item, _join(_join(path, "members"), index), f"{member!r} is not a segment name")
                elif member is not None:
                    members.append(member)
        where: list[tuple[FieldPath, frozenset[str]]] = []
        sources = [(m["where"], _join(path, "where"))] if "where" in m else []
        if where_node is not None:
            sources.append((where_node, where_path))
        for w_node, w_path in sources:
            wm = self.mapping(w_node, w_path, None)
            for key, k_node, v_node in (wm.items() if wm else ()):
                fp = self.path(k_node, _join(w_path, key))
                allowed: list[str] = []
                if isinstance(v_node, yaml.SequenceNode):
                    for index, item in enumerate(v_node.value):
                        value = self.read(item, _join(_join(w_path, key), index), _text)
                        if value is not None:
                            allowed.append(value)
                else:
                    value = self.read(v_node, _join(w_path, key), _text)
                    if value is not None:
                        allowed.append(value)
                if fp is not None:
                    where.append((fp, frozenset(allowed)))
        if len(self.problems) > start or anchor is None:
            return None
        return _Group(anchor=anchor, members=tuple(members), where=tuple(where))

    def list_spec(self, node: yaml.MappingNode, path: str, label: str) -> _List | None:
        m = self.mapping(node, path, _LIST_KEYS)
        if m is None:
            return None
        start = len(self.problems)
        where = m["where"] if "where" in m else None
        group = self.group(m["for_each"], _join(path, "for_each"), where, _join(path, "where"))
        required = self.read(m["required"], _join(path, "required"), _bool, False) if "required" in m else False
        item: _Value | tuple[tuple[str, _Value], ...] | None = None
        if "item" not in m:
            self.report(node, _join(path, "item"), "missing (required): a value spec or {name: spec}")
        else:
            item_node = m["item"]
            item_path = _join(path, "item")
            if _entries(item_node).keys() & {"from", "value", "first"}:
                item = self.spec(item_node, item_path, label)
            else:
                im = self.mapping(item_node, item_path, None)
                parts: list[tuple[str, _Value]] = []
                for key, k_node, v_node in (im.items() if im else ()):
                    if not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
                        self.report(k_node, _join(item_path, key), "an item field is a lower-case name like data")
                        continue
                    spec = self.spec(v_node, _join(item_path, key), f"{label}.{key}")
                    if spec is not None:
                        parts.append((key, spec))
                item = tuple(parts)
        if len(self.problems) > start or group is None or item is None:
            return None
        line = node.start_mark.line + 1
        return _List(file=self.file, line=line, label=label, group=group, item=item, required=required)

    def spec(self, node: yaml.Node, path: str, label: str, *, nested: bool = False) -> _Value | None:
        m = self.mapping(node, path, _SPEC_KEYS)
        if m is None:
            return None
        start = len(self.problems)
        sources = [k for k in ("from", "value", "first") if k in m]
        if len(sources) != 1:
            what = "none" if not sources else " and ".join(sources)
            self.report(node, path, f"needs exactly one of from, value, first (got {what})")
            return None
        line = node.start_mark.line + 1
        values: dict[str, Any] = dict(file=self.file, line=line, label=label, path_text="")
        if "required" in m:
            values["required"] = self.read(m["required"], _join(path, "required"), _bool, False)
        convert = ""
        if "convert" in m:
            c_node = m["convert"]
            convert = self.read(c_node, _join(path, "convert"), _text) or ""
            if convert and convert not in CONVERTS:
                close = difflib.get_close_matches(convert, CONVERTS, n=1)
                hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(CONVERTS)}"
                self.report(c_node, _join(path, "convert"), f"unknown convert {convert!r}; {hint}")
                convert = ""
        shape = CONVERTS[convert][1] if convert else "text"
        if "table" in m:
            table = self.table(m["table"], _join(path, "table"))
            if table is not None:
                values["table"], values["table_name"] = table
            if shape != "text":
                self.report(m["table"], _join(path, "table"), f"cannot combine a table with convert {convert}")
        values["convert"] = convert
        if "group" in m:
            values["group"] = self.group(m["group"], _join(path, "group"))
        source = sources[0]
        if "prefer" in m:
            p_path = _join(path, "prefer")
            p_nodes = self.nodes(m["prefer"], p_path, example="[create, update, cancel]")
            prefer = [self.read(n, _join(p_path, i), _text) for i, n in enumerate(p_nodes)]
            table = values.get("table")
            if source != "from" or shape != "text":
                self.report(m["prefer"], p_path, "prefer goes with from (a path that selects several values, "
                                                 "e.g. ORC[*]-1) and no structured convert")
            elif None not in prefer:
                for index, (p_node, value) in enumerate(zip(p_nodes, prefer)):
                    if table is not None and value not in table.values():
                        self.report(p_node, _join(p_path, index), f"{value!r} is not a value of its table")
                values["prefer"] = tuple(prefer)
        s_node = m[source]
        s_path = _join(path, source)
        if source == "from":
            fp = self.path(s_node, s_path)
            values["path"] = fp
            values["path_text"] = s_node.value if isinstance(s_node, yaml.ScalarNode) else ""
            if fp is not None and shape != "text" and fp.component is not None:
                self.report(
                    s_node,
                    s_path,
                    f"convert {convert} reads the components itself: name a whole field or "
                    "repetition, e.g. PID-5 or ARQ-7",
                )
        elif source == "first":
            options: list[_Value] = []
            for index, item in enumerate(self.nodes(s_node, s_path, example="[{from: MSH-10}, {from: OBR-2}]")):
                option = self.spec(item, _join(s_path, index), label, nested=True)
                if option is not None:
                    options.append(option)
            if not options and len(self.problems) == start:
                self.report(s_node, s_path, "needs at least one value spec")
            values["options"] = tuple(options)
            # "MSH-10, OBR-2.1": an on-map NAK names the first path's segment and field in ERR
            values["path_text"] = ", ".join(o.path_text or "value" for o in options)
        if "group" in m and source == "value":
            self.report(m["group"], _join(path, "group"), "a constant is not read from a group")
        if len(self.problems) > start:
            return None
        provisional = _Value(**values)
        if "default" in m:
            default = self.constant(m["default"], _join(path, "default"), provisional, lookup=False)
            if default is _FAILED:
                return None
            values["default"] = default
        if source == "value":
            constant = self.constant(s_node, s_path, provisional, lookup=True)
            if constant is _FAILED:
                return None
            values["constant"] = constant
        return _Value(**values)

    def constant(self, node: yaml.Node, path: str, spec: _Value, *, lookup: bool) -> Any:
        """A `value:` or `default:` worked out at load (table for values; convert for both)."""
        raw = self.read(node, path, _text)
        if raw is None:
            return _FAILED
        if spec.convert and CONVERTS[spec.convert][1] != "text":
            self.report(node, path, f"a constant cannot be converted with {spec.convert}")
            return _FAILED
        errors: list[MappingError] = []
        finishing = spec if lookup else _Value(file=spec.file, line=spec.line, label=spec.label, path_text="", convert=spec.convert)
        value = finishing._finish(raw, errors, None)
        if value is _FAILED or value is None:
            reason = errors[0].reason if errors else f"{spec.convert} gives no value for it"
            self.report(node, path, reason)
            return _FAILED
        return value

    def table(self, node: yaml.Node, path: str) -> tuple[_Mapping[str, str], str] | None:
        if isinstance(node, yaml.MappingNode):
            m = self.mapping(node, path, None)
            table: dict[str, str] = {}
            for key, _, v_node in (m.items() if m else ()):
                value = self.read(v_node, _join(path, key), _text)
                if value is not None:
                    table[key] = value
            return table, "(inline)"
        name = self.read(node, path, _text)
        if name is None:
            return None
        if name not in self.tables:
            known = ", ".join(sorted(self.tables)) or f"none in {TABLES_DIR}/"
            self.report(node, path, f"unknown table {name!r} (tables: {known})")
            return None
        table_value = self.tables[name]
        if table_value is None:  # its own problems are reported in the CSV file
            return None
        return table_value, name

    def outbound(self, node: yaml.Node, path: str) -> Outbound | None:
        m = self.mapping(node, path, ("to", "when", "template"))
        if m is None:
            return None
        start = len(self.problems)
        to = None
        if "to" not in m:
            self.report(node, _join(path, "to"), "missing (required)")
        else:
            to = self.read(m["to"], _join(path, "to"), _text)
            if to is not None and not _NAME_RE.fullmatch(to):
                self.report(m["to"], _join(path, "to"), f"{to!r} is not a destination name")
        template = None
        if "template" not in m:
            self.report(node, _join(path, "template"), "missing (required)")
        else:
            t_node = m["template"]
            t_name = self.read(t_node, _join(path, "template"), _text)
            if t_name == RECEIVED_NAME:
                template = RECEIVED
            elif t_name is not None:
                if t_name not in self.templates:
                    known = ", ".join(sorted(self.templates)) or f"none in {TEMPLATES_DIR}/"
                    self.report(t_node, _join(path, "template"), f"unknown template {t_name!r} (templates: {known})")
                else:
                    template = self.templates[t_name]  # None: its problems are reported in its file
        when: tuple[tuple[str, frozenset[str]], ...] = ()
        when_any: list[tuple[tuple[str, frozenset[str]], ...]] = []
        if "when" in m:
            w_node = m["when"]
            if isinstance(w_node, yaml.SequenceNode):  # alternatives: any one that holds
                if not w_node.value:
                    self.report(w_node, _join(path, "when"), "expected at least one condition map")
                for number, item in enumerate(w_node.value):
                    when_any.append(self.conditions(item, _join(_join(path, "when"), number)))
            else:
                when = self.conditions(w_node, _join(path, "when"))
        if len(self.problems) > start or to is None or template is None:
            return None
        mark = m["to"].start_mark
        return Outbound(to=to, template=template, when=when, when_any=tuple(when_any),
                        to_at=(mark.line + 1, mark.column + 1, _join(path, "to")))

    def conditions(self, node: yaml.Node, path: str) -> tuple[tuple[str, frozenset[str]], ...]:
        out = []
        wm = self.mapping(node, path, None)
        for key, k_node, v_node in (wm.items() if wm else ()):
            w_path = _join(path, key)
            if not _PLACEHOLDER_NAME_RE.fullmatch(key):
                self.report(k_node, w_path, "expected a dotted event field name like action")
                continue
            nodes = v_node.value if isinstance(v_node, yaml.SequenceNode) else [v_node]
            allowed = frozenset(a for a in (self.read(n, w_path, _text) for n in nodes) if a is not None)
            out.append((key, allowed))
            mark = k_node.start_mark
            self.when_uses.append(_NameUse(key, mark.line + 1, mark.column + 1, w_path, allowed=allowed))
        return tuple(out)


# ---------------------------------------------------------------------------------------
# Loading


def load_mappings(mappings_dir: Path) -> MappingSet:
    """Read tables, templates and every mapping file; raise ConfigError listing all problems."""
    mappings_dir = Path(mappings_dir)
    problems: list[ConfigProblem] = []
    if not mappings_dir.is_dir():
        raise ConfigError([ConfigProblem(file=str(mappings_dir), line=None, col=None, path="(mappings)", message="not a directory")])

    tables: dict[str, Any] = {}
    tables_dir = mappings_dir / TABLES_DIR
    if tables_dir.is_dir():
        for file in sorted(tables_dir.glob("*.csv")):
            table, table_problems = _read_table(file, str(file))
            tables[file.stem] = table
            problems.extend(table_problems)

    templates: dict[str, Template | None] = {}
    templates_dir = mappings_dir / TEMPLATES_DIR
    if templates_dir.is_dir():
        for file in sorted(templates_dir.glob("*.yaml")):
            root, file_problems = _compose(file, str(file))
            problems.extend(file_problems)
            template = None
            if root is not None:
                reader = _TemplateReader(str(file))
                template = reader.template(root, file.name)
                problems.extend(reader.problems)
            templates[file.name] = template

    mappings: list[Mapping] = []
    when_uses: list[tuple[Mapping, list[_NameUse]]] = []
    seen_types: dict[str, tuple[str, int]] = {}
    seen_names: dict[str, str] = {}
    files = sorted(
        p for p in mappings_dir.glob("*.yaml") if p.is_file() and p.name not in NOT_MAPPINGS and not p.name.startswith(".")
    )
    for file in sorted(mappings_dir.glob("*.yml")):
        problems.append(ConfigProblem(file=str(file), line=None, col=None, path="(file)", message="mapping files must end in .yaml; this one would be ignored"))
    for file in files:
        root, file_problems = _compose(file, str(file))
        problems.extend(file_problems)
        if root is None:
            continue
        reader = _MappingReader(str(file), tables, templates)
        mapping, types = reader.read_mapping(root, file)
        problems.extend(reader.problems)
        if mapping is not None:
            when_uses.append((mapping, reader.when_uses))
        for message_type, node in types:
            line = node.start_mark.line + 1
            if message_type in seen_types:
                other_file, other_line = seen_types[message_type]
                problems.append(ConfigProblem(
                    file=str(file), line=line, col=node.start_mark.column + 1, path="types",
                    message=f"{message_type} is already mapped by {other_file}:{other_line}",
                ))
            else:
                seen_types[message_type] = (str(file), line)
        if mapping is not None:
            if mapping.name in seen_names:
                problems.append(ConfigProblem(file=str(file), line=1, col=1, path="name", message=f"mapping name {mapping.name!r} is already used by {seen_names[mapping.name]}"))
            seen_names[mapping.name] = str(file)
            mappings.append(mapping)
    if not problems:  # (names are checked against every mapping: only once all of them load)
        problems.extend(_names_problems(mappings, when_uses))
    if problems:
        raise ConfigError(problems)
    return MappingSet(
        mappings=tuple(mappings),
        templates={k: v for k, v in templates.items() if v is not None},
        tables={k: v for k, v in tables.items() if v is not None},
    )


# ---------------------------------------------------------------------------------------
# Names: every placeholder and `when` key must name something a mapping sets. A typo
# ({zd_numbr}, `acton:`) would otherwise leave a field empty, or an outbound never built,
# without a word.

_BUILT_NAMES = ("index", "timestamp", "control_id")
# Heads a placeholder reads as something other than an event field: no event field may take them.
_TEMPLATE_NAMES = frozenset({*_BUILT_NAMES, "agenda", "entry", "item"})
_AGENDA_PARTS = ("id", "name", "department", "location_agb")  # what {agenda.X} may read
_CHOICES = {"kind": KINDS, "action": ACTIONS, "entry.kind": KINDS, "entry.state": STATES,
            "entry.previous_state": STATES}
# Records a convert gives: the parts a placeholder may read after the field's name.
_CONVERT_PARTS = {"dutch_name": frozenset(f.name for f in dataclass_fields(_convert.DutchName)),
                  "code": frozenset(f.name for f in dataclass_fields(_convert.Code))}


def _names_problems(mappings: Sequence[Mapping], when_uses: Sequence[tuple[Mapping, list[_NameUse]]]) -> list[ConfigProblem]:
    specs_of = {id(m): dict(m.values) for m in mappings}  # each mapping's event specs by name
    everything = list(specs_of.values())  # what entry data may hold
    problems = []
    for mapping, uses in when_uses:
        own = [specs_of[id(mapping)]]
        for use in uses:
            reason = _name_problem(use, own, everything, in_when=True)
            if reason is None:
                reason = _choice_problem(use)
            if reason is not None:
                problems.append(ConfigProblem(file=str(mapping.file), line=use.line, col=use.col, path=use.path,
                                              message=reason))
    users: dict[str, tuple[Template, list[dict[str, Any]]]] = {}
    for mapping in mappings:
        for outbound in mapping.outbound:
            if isinstance(outbound.template, Template):
                users.setdefault(outbound.template.name, (outbound.template, []))[1].append(specs_of[id(mapping)])
    for template, specs in users.values():
        for use in template.uses:
            reason = _name_problem(use, specs, everything, in_when=False)
            if reason is not None:
                problems.append(ConfigProblem(file=template.file, line=use.line, col=use.col, path=use.path,
                                              message=f"{{{use.name}}}: {reason}"))
    return problems


def _name_problem(use: _NameUse, specs: list[dict[str, Any]], everything: list[dict[str, Any]], *,
                  in_when: bool) -> str | None:
    """Why ``use`` can never have a value, or None. ``specs``: the event specs of the mappings
    it is read with; ``everything``: every mapping's (entry data)."""
    name = use.name
    parts = name.split(".")
    head = parts[0]
    if name in TOP_LEVEL or name in _BUILT_NAMES or head == "index":  # ({index.x} is the index)
        return None
    if head == "entry":
        if len(parts) == 1 or (in_when and name == LAST_SENT):
            return None
        if parts[1] in _ENTRY_ATTRIBUTES and not (parts[1] == "data" and len(parts) > 2):
            return None
        rest = parts[2:] if parts[1] == "data" else parts[1:]
        if rest[0].startswith("_") or any(_reaches(s, rest) for s in everything):
            return None
        return f"no mapping sets {'.'.join(rest)!r}, so entry data never holds it{_hint('.'.join(rest), everything)}"
    if head == "agenda":
        if in_when:
            return "a when reads the agenda as entry.agenda_id"
        if len(parts) == 2 and parts[1] in _AGENDA_PARTS:
            return None
        return f"an agenda has {', '.join(_AGENDA_PARTS)}"
    if head == "item" and use.for_each is not None:
        lists = [s[use.for_each] for s in specs if isinstance(s.get(use.for_each), _List)]
        if not lists or len(parts) == 1:
            return None  # (a block over a field that is not a list is simply empty)
        for spec in lists:
            if isinstance(spec.item, _Value):
                if _deeper(spec.item, parts[1:]):
                    return None
            elif _reaches(dict(spec.item), parts[1:]):
                return None
        return f"no item of {use.for_each!r} has {'.'.join(parts[1:])!r}"
    if any(_reaches(s, parts) for s in specs):
        return None
    sets = "this mapping never sets" if in_when else "no mapping that uses this template sets"
    return f"{sets} {name!r}{_hint(name, specs)}"


def _reaches(specs: dict[str, Any], parts: list[str]) -> bool:
    """Whether a field named by ``parts`` (its longest dotted prefix that is a field, then
    parts of that value) can have a value."""
    for cut in range(len(parts), 0, -1):
        spec = specs.get(".".join(parts[:cut]))
        if spec is not None:
            return _deeper(spec, parts[cut:])
    return False


def _deeper(spec: Any, rest: list[str]) -> bool:
    if not rest:
        return True
    if isinstance(spec, _List):  # {tests.1.test.code}
        if not rest[0].isdigit():
            return False
        if isinstance(spec.item, _Value):
            return _deeper(spec.item, rest[1:])
        return len(rest) == 1 or _reaches(dict(spec.item), rest[1:])
    if spec.path is None and not spec.options:
        return True  # a `value:` constant: whatever it is
    if not spec.convert and spec.table is None and spec.options:  # `first:`: what any option gives
        return any(_deeper(option, rest) for option in spec.options)
    if spec.convert in ("dtm", "date"):
        return True  # (a date's own attributes: year, month, ...)
    parts = _CONVERT_PARTS.get(spec.convert)
    return parts is not None and len(rest) == 1 and rest[0] in parts


def _hint(name: str, specs: list[dict[str, Any]]) -> str:
    known = sorted({n for s in specs for n in s} | set(TOP_LEVEL))
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice_problem(use: _NameUse) -> str | None:
    """A `when` value for kind, action or a state that no event or entry can have."""
    choices = _CHOICES.get(use.name)
    if choices is None:
        return None
    for value in sorted(use.allowed):
        if value in choices or value.endswith("*") or not value:
            continue
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{value!r} is never the {use.name}: {hint}({', '.join(choices)})"
    return None
