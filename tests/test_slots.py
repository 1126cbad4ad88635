"""The frozen dataclasses with a written-out ``__init__`` (engine.core.slots): each takes
exactly its fields, keyword-only, in order, with the same defaults, sets every one, and stays
frozen. A field added to the class but not to its ``__init__`` fails here."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect

import pytest

from engine.core.agenda import AgendaEntry, AgendaEvent, HistoryItem
from engine.core.convert import Code, DutchName
from engine.core.header import DEFAULT_DELIMITERS, Header

CLASSES = [Code, DutchName, AgendaEvent, HistoryItem, AgendaEntry, Header]
# one value per required field, so each class can be made
REQUIRED = {"code": "C", "surname": "S", "kind": "appointment-request", "action": "create", "fields": {},
            "at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), "message_id": "1", "from_state": None,
            "to_state": "requested", "id": None, "agenda_id": "a", "state": "requested",
            "delimiters": DEFAULT_DELIMITERS, "hl7_charset": None, "codec": "latin-1"}
# a class whose field of a shared name takes another kind of value
OWN = {Header: {"fields": (b"MSH", b"^~\\&", b"A", b"F", b"R", b"H", b"", b"", b"ADT^A01", b"1", b"P", b"2.5")}}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_written_out_init_takes_exactly_the_fields_with_their_defaults(cls):
    fields = [f for f in dataclasses.fields(cls) if f.init]  # (Header's computed ones are set from them)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    for p, f in zip(params, fields):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert p.default == f.default_factory(), f.name
        else:
            assert p.default is inspect.Parameter.empty, f.name


def params_of(cls):
    return set(inspect.signature(cls.__init__).parameters)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_set_and_assignment_still_raises(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    required = {**REQUIRED, **OWN.get(cls, {})}
    value = cls(**{name: required[name] for name in names if name in required and name in params_of(cls)})
    for name in names:
        getattr(value, name)  # an unset slot raises AttributeError
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, names[0], "x")
    assert dataclasses.replace(value) == value
    if cls not in (AgendaEvent, AgendaEntry):  # (their mappings are not hashable)
        assert hash(dataclasses.replace(value)) == hash(value)
