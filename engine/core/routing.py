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
class FieldCondition:
    """Holds when any value ``path`` selects (unescaped; an absent field reads as "") is one
    of ``patterns``: a text compared exactly, ``TEXT*`` for any value starting with TEXT,
    ``*`` for any non-empty value, ``""`` for an empty or absent field."""

    path: FieldPath
    patterns: tuple[str, ...]
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    any_value: bool
    empty: bool

    @classmethod
    def of(cls, path: str, patterns: Iterable[str]) -> FieldCondition:
        """Raises PathError for a bad path, ValueError for no patterns."""
        parsed = parse_path(path)
        patterns = tuple(patterns)
        if not patterns:
            raise ValueError("needs at least one value")
        wild = tuple(p for p in patterns if p.endswith("*") and p != ANY_VALUE)
        return cls(
            path=parsed,
            patterns=patterns,
            exact=frozenset(p for p in patterns if not p.endswith("*") and p != EMPTY),
            prefixes=tuple(sorted(p[:-1] for p in wild)),
            any_value=ANY_VALUE in patterns,
            empty=EMPTY in patterns,
        )

    def holds(self, message: Message) -> bool:
        for value in select(message, self.path) or (EMPTY,):
            if not value:
                if self.empty:
                    return True
            elif self.any_value or value in self.exact or (self.prefixes and value.startswith(self.prefixes)):
                return True
        return False

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
