"""`mappings/agendas.yaml`: the hospital's agendas, loaded into an ``AgendaBook``.

Same approach as engine/config.py (whose walker and problem classes it reuses): the YAML is
composed into nodes with line/column marks, walked against the expected shape, and every
problem is collected and raised at once as ``ConfigError`` with ``file:line:col: path: cause``.
The values it builds live in the pure core (engine/core/agenda.py).

Shape::

    agendas:
      - id: cardiology                 # unique name
        name: Polikliniek Cardiologie
        department: Cardiologie        # optional
        location_agb: "01999901"       # optional, 8 digits
        select:                        # rules, any may match; a rule's criteria must all match
          - specialism: [CAR]
          - care_product: ["CARREG*"]  # trailing * = prefix
      - id: unassigned
        name: Nog niet ingedeeld
        fallback: true                 # exactly one; takes what no rule selects; no select
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from engine.config import ConfigError, ConfigProblem, _bool, _Invalid, _name, _text, _Walker, compose_file
from engine.core.agenda import KINDS, SELECT_FIELDS, Agenda, AgendaBook, SelectRule

__all__ = ["load_agendas"]

_TOP_KEYS = ("agendas",)
_AGENDA_KEYS = ("id", "name", "department", "location_agb", "select", "fallback")
_RULE_KEYS = tuple(SELECT_FIELDS)
_AGB_RE = re.compile(r"[0-9]{8}")
_CODE_RE = re.compile(r"[^\s*][^*]*\*?")


def _agb(node: yaml.Node, path: str) -> str:
    value = _text(node)
    if not _AGB_RE.fullmatch(value):
        if not (value.isascii() and value.isdigit()):
            raise _Invalid("an AGB code is 8 digits, and this holds other characters")
        quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
        hint = " (quote it to keep leading zeros)" if len(value) < 8 and not quoted else ""
        raise _Invalid(f"an AGB code is 8 digits, not {len(value)}{hint}")
    return value


def _code(node: yaml.Node, path: str) -> str:
    value = _text(node).strip()
    if not _CODE_RE.fullmatch(value):
        raise _Invalid("expected a code or name; '*' is allowed only at the end, as a prefix match")
    return value


def _kind(node: yaml.Node, path: str) -> str:
    value = _text(node)
    if value not in KINDS:
        raise _Invalid(f"{value!r} is not one of: {', '.join(KINDS)}")
    return value


class _AgendasReader(_Walker):
    def book(self, root: yaml.Node) -> AgendaBook | None:
        top = self.mapping(root, "", _TOP_KEYS)
        if top is None:
            return None
        agendas = top.get("agendas", self._agendas)
        if self.problems or not agendas:
            return None
        return AgendaBook(agendas=agendas)

    def _agendas(self, node: yaml.Node, path: str) -> tuple[Agenda, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise _Invalid("expected a non-empty list of agendas, each with id and name")
        agendas: list[Agenda] = []
        first_line: dict[str, int] = {}
        fallbacks: list[str] = []
        for index, item in enumerate(node.value):
            item_path = f"{path}[{index}]"
            agenda = self._agenda(item, item_path)
            if agenda is None:
                continue
            if agenda.id in first_line:
                first = first_line[agenda.id]
                self.report(item, f"{item_path}.id", f"agenda id {agenda.id!r} is used twice (first at line {first})")
                continue
            first_line[agenda.id] = item.start_mark.line + 1
            if agenda.fallback:
                if fallbacks:
                    self.report(item, f"{item_path}.fallback", f"a second fallback agenda (first: {fallbacks[0]!r})")
                    continue
                fallbacks.append(agenda.id)
            agendas.append(agenda)
        if not fallbacks and not self.problems:
            raise _Invalid("no agenda has fallback: true; one must take what no rule selects")
        return tuple(agendas)

    def _agenda(self, node: yaml.Node, path: str) -> Agenda | None:
        count = len(self.problems)
        fields = self.mapping(node, path, _AGENDA_KEYS)
        if fields is None:
            return None
        agenda_id = fields.get("id", _name)
        name = fields.get("name", _text)
        department = fields.get("department", _text, None)
        location_agb = fields.get("location_agb", _agb, None)
        before = len(self.problems)
        fallback = fields.get("fallback", _bool, False)
        fallback_known = len(self.problems) == before
        rules = fields.get("select", self._rules, ())
        if fallback and "select" in fields.entries:
            self.report(fields.entries["select"][0], f"{path}.select",
                        "the fallback agenda takes what no rule selects; remove select or fallback")  # fmt: skip
        elif not fallback and fallback_known and "select" not in fields.entries and "id" in fields.entries:
            self.report(node, f"{path}.select", "missing: an agenda without select rules is never chosen")
        if len(self.problems) > count:
            return None
        return Agenda(id=agenda_id, name=name, department=department, location_agb=location_agb, rules=rules,
                      fallback=fallback)  # fmt: skip

    def _rules(self, node: yaml.Node, path: str) -> tuple[SelectRule, ...]:
        rules = self.seq(node, path, self._rule, example="[{specialism: [CAR]}]",
                         empty="an empty select list would never choose this agenda", unique=False)  # fmt: skip
        return tuple(rule for rule in rules if rule is not _SKIP)

    def _rule(self, node: yaml.Node, path: str) -> SelectRule:
        count = len(self.problems)
        fields = self.mapping(node, path, _RULE_KEYS)
        if fields is None:  # already reported
            return _SKIP
        criteria = {}
        for key in _RULE_KEYS:
            read = _kind if key == "kind" else _agb if key == "location_agb" else _code
            criteria[key] = fields.get(key, self._set(read), None)
        if len(self.problems) > count:
            return _SKIP
        if all(value is None for value in criteria.values()):
            raise _Invalid(f"a rule needs at least one of: {', '.join(_RULE_KEYS)}")
        return SelectRule(**criteria)

    def _set(self, read):
        def read_set(node: yaml.Node, path: str) -> frozenset[str]:
            return self.filter_set(node, path, read, example="[CAR]", meaning="match nothing")

        return read_set


_SKIP: SelectRule = None  # type: ignore[assignment]  # a rule with reported problems


def _read(file: Path, display: str) -> tuple[AgendaBook | None, list[ConfigProblem]]:
    reader = _AgendasReader(display)
    root, problems = compose_file(file, display, empty="expected agendas: [...]")
    if root is None:
        return None, problems
    book = reader.book(root)
    return book, reader.problems


def load_agendas(path: Path) -> AgendaBook:
    """Read agendas.yaml; raises ConfigError listing every problem with file:line:col."""
    book, problems = _read(path, str(path))
    if problems or book is None:
        raise ConfigError(problems)
    return book
