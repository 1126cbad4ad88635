"""Field paths: ``SEG[occ]-FIELD[rep].COMP.SUB``, parsed once, applied to many messages.

Grammar (1-based numbers):

- ``SEG``: three characters A-Z/0-9. ``[occ]``: omitted = first occurrence, ``*`` = all,
  ``N`` = the Nth.
- ``FIELD``: a number. ``[rep]``: omitted = first repetition, ``*`` = all, ``N`` = the Nth,
  ``C=VALUE`` = the repetitions whose component C (unescaped) equals VALUE.
- ``.COMP`` and ``.SUB``: optional. Without COMP the whole (unescaped) repetition.

``select`` gives one value per selected segment and repetition (a missing field or
component reads as ""); ``first`` the first non-empty one. Both work on a ``Message``
or on one group (``list[Segment]`` from ``Message.groups``), and never raise on message
content. MSH-1 and MSH-2 read as the delimiters themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Callable
from dataclasses import dataclass, field as _field

from engine.core.hl7message import Message, Segment, _Separators, _unescape

__all__ = ["ALL", "FieldPath", "PathError", "components", "first", "parse_path", "select"]

ALL = "*"


class PathError(ValueError):
    """A field path that does not follow the grammar; ``column`` is 1-based."""

    def __init__(self, text: str, column: int, reason: str) -> None:
        self.text = text
        self.column = column
        self.reason = reason
        super().__init__(f"field path {text!r}, column {column}: {reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldPath:
    """A parsed path. ``occurrence``/``repetition``: an int (1-based) or ``"*"``;
    ``match``: ``(component, value)`` for ``[C=VALUE]`` (then repetition is ``"*"``)."""

    text: str
    segment: str
    occurrence: int | str = 1
    field: int
    repetition: int | str = 1
    match: tuple[int, str] | None = None
    component: int | None = None
    subcomponent: int | None = None
    # ``first`` for this path, worked out once (see _compile_first); not part of equality.
    _first: Callable[[Source], str | None] = _field(init=False, repr=False, compare=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_first", _compile_first(self))

    def __str__(self) -> str:
        return self.text


def parse_path(text: str) -> FieldPath:
    """Parse ``text``; raises PathError naming the (1-based) column of the problem."""
    p = _Parser(text)
    return p.parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str, pos: int | None = None) -> PathError:
        return PathError(self.text, (self.pos if pos is None else pos) + 1, reason)

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def number(self, what: str) -> int:
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.pos += 1
        if start == self.pos:
            raise self.fail(f"expected {what} (a number)")
        value = int(self.text[start : self.pos])
        if value < 1:
            raise self.fail(f"{what} must be 1 or more", start)
        if value > 100_000:
            raise self.fail(f"{what} is too large", start)
        return value

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected {what}, found {found}")
        self.pos += 1

    def selector(self, what: str, allow_match: bool) -> tuple[int | str, tuple[int, str] | None]:
        self.expect("[", "'['")
        if self.peek() == "*":
            self.pos += 1
            result: tuple[int | str, tuple[int, str] | None] = (ALL, None)
        else:
            value = self.number(what)
            if self.peek() == "=":
                if not allow_match:
                    raise self.fail(f"a {what} cannot be selected by value")
                self.pos += 1
                start = self.pos
                end = self.text.find("]", start)
                if end < 0:
                    self.pos = len(self.text)
                    raise self.fail("expected ']' to close the selector")
                wanted = self.text[start:end]
                if not wanted:  # (a component that is empty is not what anyone means by PID-3[4=])
                    raise self.fail("expected the value to match after '=', like [4=NLMINBIZA]", start)
                if "[" in wanted:
                    raise self.fail("'[' inside a selector value", start + wanted.index("["))
                self.pos = end
                result = (ALL, (value, wanted))
            else:
                result = (value, None)
        self.expect("]", "']'")
        return result

    def parse(self) -> FieldPath:
        text = self.text
        if not isinstance(text, str) or not text:
            raise PathError(str(text), 1, "empty field path")
        segment = text[:3]
        for i, char in enumerate(segment):
            if not ("A" <= char <= "Z" or "0" <= char <= "9"):
                raise self.fail("segment name must be 3 characters A-Z or 0-9", i)
        if len(segment) < 3:
            self.pos = len(segment)
            raise self.fail("segment name must be 3 characters A-Z or 0-9")
        self.pos = 3
        occurrence: int | str = 1
        if self.peek() == "[":
            occurrence, _ = self.selector("segment occurrence", allow_match=False)
        self.expect("-", "'-' before the field number")
        field = self.number("field number")
        repetition: int | str = 1
        match = None
        if self.peek() == "[":
            repetition, match = self.selector("repetition", allow_match=True)
        component = subcomponent = None
        if self.peek() == ".":
            self.pos += 1
            component = self.number("component number")
            if self.peek() == ".":
                self.pos += 1
                subcomponent = self.number("subcomponent number")
        if self.pos != len(text):
            raise self.fail(f"unexpected {self.peek()!r}")
        if segment == "MSH" and field <= 2 and (component or match or repetition != 1):
            raise self.fail("MSH-1 and MSH-2 have no repetitions or components", 4)
        return FieldPath(
            text=text,
            segment=segment,
            occurrence=occurrence,
            field=field,
            repetition=repetition,
            match=match,
            component=component,
            subcomponent=subcomponent,
        )


# Selection -------------------------------------------------------------------------------

Source = Message | Sequence[Segment]


def _segments(source: Source, path: FieldPath) -> list[Segment]:
    name = path.segment
    if isinstance(source, Message):
        by_name = source._by_name
        if by_name is None:
            by_name = source._index()[1]
        found = by_name.get(name)
        if not found:
            return []
    else:
        found = [s for s in source if s.name == name]
    occ = path.occurrence
    if occ == ALL:
        return list(found)
    return [found[occ - 1]] if occ <= len(found) else []  # type: ignore[operator]


def _parts(segment: Segment, path: FieldPath) -> list[tuple[str, _Separators]]:
    """Raw (escaped) strings the path selects in one segment."""
    seps = segment._seps
    fields = segment._fields if segment._fields is not None else segment._split()
    n = path.field
    if segment.name == "MSH" and n <= 2:
        return [(fields[n], seps)] if n < len(fields) else []
    value = fields[n] if n < len(fields) else ""
    rs = seps.repetition
    rep = path.repetition
    if rep == 1 and path.match is None:
        reps = [value.split(rs, 1)[0] if rs else value]
    else:
        reps = value.split(rs) if rs else [value]
        if path.match is not None:
            c, wanted = path.match
            cs, ss = seps.component, seps.subcomponent
            e, table = seps.escape, seps.table
            chosen = []
            for r in reps:
                comps = r.split(cs) if cs else [r]
                got = comps[c - 1] if c <= len(comps) else ""
                if ss and ss in got:  # an HD with its OID (NLMINBIZA&2.16...&ISO): its first part
                    got = got.split(ss, 1)[0]
                if e and e in got:
                    got = _unescape(got, e, table, seps.codec)
                if got == wanted:
                    chosen.append(r)
            reps = chosen
        elif rep != ALL:
            reps = [reps[rep - 1]] if rep <= len(reps) else []  # type: ignore[operator]
    comp = path.component
    if comp is None:
        return [(r, seps) for r in reps]
    cs, ss, sub = seps.component, seps.subcomponent, path.subcomponent
    out = []
    for r in reps:
        comps = r.split(cs) if cs else [r]
        c = comps[comp - 1] if comp <= len(comps) else ""
        if sub is not None:
            subs = c.split(ss) if ss else [c]
            c = subs[sub - 1] if sub <= len(subs) else ""
        out.append((c, seps))
    return out


def _text(raw: str, seps: _Separators, path: FieldPath) -> str:
    e = seps.escape
    if not e or e not in raw or (path.segment == "MSH" and path.field <= 2):
        return raw
    return _unescape(raw, e, seps.table, seps.codec)


def select(message_or_group: Source, path: FieldPath) -> list[str]:
    """All values ``path`` selects, unescaped; [] when the segment is absent."""
    out = []
    for segment in _segments(message_or_group, path):
        for raw, seps in _parts(segment, path):
            out.append(_text(raw, seps, path))
    return out


def first(message_or_group: Source, path: FieldPath) -> str | None:
    """The first non-empty value ``path`` selects, or None."""
    return path._first(message_or_group)


def _first(message_or_group: Source, path: FieldPath) -> str | None:
    for segment in _segments(message_or_group, path):
        for raw, seps in _parts(segment, path):
            if raw:
                value = _text(raw, seps, path)
                if value:
                    return value
    return None


def _compile_first(path: FieldPath) -> Callable[[Source], str | None]:
    """``first`` for one path: the general walk, with a straight line for the common case
    (a Message or a group, one occurrence, the first repetition, not MSH-1/MSH-2) that gives the same
    value without building the lists of segments and parts."""
    name, occ, n = path.segment, path.occurrence, path.field
    comp, sub = path.component, path.subcomponent

    def general(source: Source) -> str | None:
        return _first(source, path)

    if occ == ALL or path.repetition != 1 or path.match is not None or (name == "MSH" and n <= 2):
        return general
    occ_index = occ - 1  # type: ignore[operator]

    def straight(source: Source) -> str | None:
        if source.__class__ is Message:
            by_name = source._by_name  # type: ignore[union-attr]
            if by_name is None:
                by_name = source._index()[1]  # type: ignore[union-attr]
            found = by_name.get(name)
            if not found or occ_index >= len(found):
                return None
            segment = found[occ_index]
        elif source.__class__ is list:  # a group
            seen = 0
            for segment in source:  # type: ignore[union-attr]
                if segment.name == name:
                    if seen == occ_index:
                        break
                    seen += 1
            else:
                return None
        else:
            return _first(source, path)
        fields = segment._fields
        if fields is None:
            fields = segment._split()
        if n >= len(fields):
            return None
        value = fields[n]
        if not value:
            return None
        seps = segment._seps
        rs = seps.repetition
        if rs:
            value = value.split(rs, 1)[0]
        if comp is not None:
            cs = seps.component
            if cs:
                comps = value.split(cs)
                value = comps[comp - 1] if comp <= len(comps) else ""
            elif comp != 1:
                value = ""
            if sub is not None:
                ss = seps.subcomponent
                if ss:
                    subs = value.split(ss)
                    value = subs[sub - 1] if sub <= len(subs) else ""
                elif sub != 1:
                    value = ""
        if not value:
            return None
        e = seps.escape
        if e and e in value:
            value = _unescape(value, e, seps.table, seps.codec)
        return value or None

    return straight


def first_subcomponents(message_or_group: Source, path: FieldPath) -> list[tuple[list[str], bool, list[str]]]:
    """Each selected value's components, each as its first subcomponent, unescaped; whether any
    part of it (any subcomponent) has content other than HL7's null ``""``; and every
    subcomponent of its first component: what the ``code`` and ``dutch_name`` converts read
    (CE/CWE, XPN), without splitting what they do not look at."""
    if path.segment == "MSH" and path.field <= 2:
        return [([c[0] for c in value], any(s not in ("", '""') for c in value for s in c), value[0])
                for value in components(message_or_group, path)]
    out = []
    if path.occurrence != ALL and path.repetition == 1 and path.match is None:
        one = _one(message_or_group, path)  # (the common case: at most one value)
        pairs: Sequence[tuple[str, _Separators]] = () if one is None else (one,)
    else:
        pairs = [pair for segment in _segments(message_or_group, path) for pair in _parts(segment, path)]
    for raw, seps in pairs:
        comps = [raw] if path.component is not None else (raw.split(seps.component) if seps.component else [raw])
        ss = seps.subcomponent if path.subcomponent is None else None
        e = seps.escape
        firsts = []
        content = False
        first_subs: list[str] = []
        for n, c in enumerate(comps):
            if ss and ss in c:  # (content is judged unescaped: \H\ alone is nothing)
                subs = [_unescape(s, e, seps.table, seps.codec) if e and e in s else s for s in c.split(ss)]
                content = content or any(s not in ("", '""') for s in subs)
                if n == 0:
                    first_subs = subs
                c = subs[0]
            else:
                if e and e in c:
                    c = _unescape(c, e, seps.table, seps.codec)
                content = content or c not in ("", '""')
                if n == 0:
                    first_subs = [c]
            firsts.append(c)
        out.append((firsts, content, first_subs))
    return out


def _one(source: Source, path: FieldPath) -> tuple[str, _Separators] | None:
    """What ``_segments`` and ``_parts`` give for a path of one occurrence and the first
    repetition (not MSH-1/MSH-2): its one raw value, or None when the segment is absent."""
    if source.__class__ is Message:
        by_name = source._by_name  # type: ignore[union-attr]
        if by_name is None:
            by_name = source._index()[1]  # type: ignore[union-attr]
        found = by_name.get(path.segment)
        occ = path.occurrence
        if not found or occ > len(found):  # type: ignore[operator]
            return None
        segment = found[occ - 1]  # type: ignore[operator]
    else:
        segments = _segments(source, path)
        if not segments:
            return None
        segment = segments[0]
    return _parts(segment, path)[0]


def components(message_or_group: Source, path: FieldPath) -> list[list[list[str]]]:
    """Each selected value split into components, each into subcomponents, unescaped.

    For converters that need the structure (``dutch_name``, ``code``): select the whole
    field or repetition (``PID-5``, ``ARQ-7``), then ``value[i][j]`` is component i+1,
    subcomponent j+1. Splitting happens before unescaping, so an escaped ``\\S\\`` stays
    inside its component.
    """
    out = []
    for segment in _segments(message_or_group, path):
        for raw, seps in _parts(segment, path):
            if path.segment == "MSH" and path.field <= 2:
                out.append([[raw]])
                continue
            comps = [raw] if path.component is not None else (raw.split(seps.component) if seps.component else [raw])
            value = []
            for c in comps:
                subs = [c] if path.subcomponent is not None else (c.split(seps.subcomponent) if seps.subcomponent else [c])
                value.append([_text(s, seps, path) for s in subs])
            out.append(value)
    return out
