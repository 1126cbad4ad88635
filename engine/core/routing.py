"""Routes that look inside a message: a field path and the texts it may hold.

A channel's route may say, besides the message types it takes, which values fields must
(``fields``) or must not (``unless``) hold, so that ZorgDomein's ORM^O01 lab orders go to the
LIS and its imaging orders do not. Pure: checked against a parsed ``Message``, which the
caller parses only for a route that has such conditions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engine.core.hl7message import Message
from engine.core.paths import FieldPath, parse_path, select

ANY_VALUE = "*"
EMPTY = ""


@dataclass(frozen=True, slots=True)
class ValuePatterns:
    """The texts a value may be: a text compared exactly, ``TEXT*`` for any value starting
    with TEXT, ``*`` for any non-empty value, ``""`` for an empty one. Route conditions and
    mapping outbounds' ``when`` read their values the same way."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    any_value: bool
    empty: bool

    @classmethod
    def of(cls, patterns: Iterable[str]) -> ValuePatterns:
        patterns = tuple(patterns)
        return cls(
            exact=frozenset(p for p in patterns if not p.endswith("*") and p != EMPTY),
            prefixes=tuple(sorted(p[:-1] for p in patterns if p.endswith("*") and p != ANY_VALUE)),
            any_value=ANY_VALUE in patterns,
            empty=EMPTY in patterns,
        )

    def match(self, value: str, empty: bool | None = None) -> bool:
        """``empty``: whether the value counts as empty, when its text alone cannot tell (a
        list of records reads as ""); by default, when its text is ""."""
        if not value if empty is None else empty:
            return self.empty
        return self.any_value or value in self.exact or bool(self.prefixes and value.startswith(self.prefixes))


@dataclass(frozen=True, slots=True)
class FieldCondition:
    """Holds when any value ``path`` selects (unescaped; an absent field reads as "") is one
    of ``patterns`` (see ValuePatterns)."""

    path: FieldPath
    patterns: tuple[str, ...]
    values: ValuePatterns

    @classmethod
    def of(cls, path: str, patterns: Iterable[str]) -> FieldCondition:
        """Raises PathError for a bad path, ValueError for no patterns."""
        parsed = parse_path(path)
        patterns = tuple(patterns)
        if not patterns:
            raise ValueError("needs at least one value")
        return cls(path=parsed, patterns=patterns, values=ValuePatterns.of(patterns))

    def holds(self, message: Message) -> bool:
        match = self.values.match
        return any(match(value) for value in select(message, self.path) or (EMPTY,))

    def __str__(self) -> str:
        return f"{self.path.text} in [{', '.join(repr(p) for p in self.patterns)}]"


def conditions_hold(fields: tuple[FieldCondition, ...], unless: tuple[FieldCondition, ...],
                    message: Message) -> bool:
    """Every condition of ``fields`` holds and none of ``unless`` does."""
    return all(c.holds(message) for c in fields) and not any(c.holds(message) for c in unless)


def parsed_once(raw: bytes, codec: str):
    """A function giving ``raw`` parsed, parsing it on the first call only: routes without
    field conditions never pay for the parse."""
    parsed: list[Message] = []

    def message() -> Message:
        if not parsed:
            parsed.append(Message.parse(raw, codec=codec))
        return parsed[0]

    return message


def routes_taking(routes, msg_type: str, trigger: str, message) -> list:
    """The routes (RouteConfig) that take a message, in config order; ``message`` gives it
    parsed (``parsed_once``), asked only by a route of its type with field conditions. The
    one test of the listener, the resume, ``koppel map`` and ``koppel resend``'s check."""
    return [route for route in routes if route.takes(msg_type, trigger, message)]
