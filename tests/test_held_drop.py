"""`koppel held list` and `koppel held drop`: a message held for an agenda entry that will not
come (a letter whose request was never sent) can be seen, oldest first, and given up with a
reason, so KoppelAgendaHeldLong can be cleared; given up, it is recorded `error`, which
`koppel reprocess` takes again should the request come after all. Real SQLite store, the
bundled mappings, the processor on a MemoryReactorClock."""

from __future__ import annotations

import json

from engine import operator
from engine.cli import main
from engine.core.header import read_header
from engine.shell.processor import Work
from engine.store import DropHeld
from tests.test_agenda_orderings import Harness, oru, srm, world  # noqa: F401 - the fixture
from tests.test_held_gauge import gauges


def koppel(harness: Harness, *args: str) -> int:
    return main([*args, "--store", f"sqlite:///{harness.path}/k.db"])


def test_a_held_letter_is_listed_given_up_and_taken_again_when_its_request_comes(world, capsys, monkeypatch):  # noqa: F811
    harness = world("held")
    letter = harness.receive(oru())
    harness.reactor.advance(5 * 3600)
    monkeypatch.setattr(operator, "_now", harness.reactor.seconds)
    capsys.readouterr()  # (the processor's log lines)
    assert koppel(harness, "held", "list", "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["type"], listed["waiting"]) == (letter, "ORU^R01", "5h00m")
    assert "waiting for the entry with this ZD-number" in listed["for"]

    assert koppel(harness, "held", "drop", str(letter), "--reason", "request never sent (phoned the GP)") == 0
    assert f"1 held message given up ({letter})" in capsys.readouterr().out
    assert harness.outcome(letter)[0] == "error"
    assert gauges(harness) == (0, 0)  # the alert clears
    (record,) = [a for a in harness.store.list_audit() if a.action == "drop-held"]
    assert (record.message_id, record.reason) == (letter, "request never sent (phoned the GP)")

    # the request comes after all: the letter is not applied by itself (it no longer waits) ...
    harness.receive(srm())
    assert harness.outcome(letter)[0] == "error"
    assert harness.entry().attachments == ()
    # ... but reprocessing it attaches it (the engine's resume hands it on: done here by hand)
    assert koppel(harness, "reprocess", str(letter), "--channels", str(harness.path / "none")) == 0
    assert harness.outcome(letter)[0] == "pending"
    raw = oru()
    harness.processor.submit(Work(message_id=letter, channel="zorgdomein-in", mapping="zorgdomein-oru", raw=raw,
                                  codec=read_header(raw, default_charset="8859/1").codec, late=True))
    for _ in range(20):
        harness.reactor.advance(0)
    assert harness.outcome(letter)[0] == "mapped"
    assert len(harness.entry().attachments) == 1


def test_only_held_messages_are_given_up_and_a_reason_is_required(world, capsys):  # noqa: F811
    harness = world("refuse")
    request = harness.receive(srm())
    assert koppel(harness, "held", "drop", str(request), "999", "--reason", "x") == 1
    err = capsys.readouterr().err
    assert f"message {request} is mapped, not held" in err and "no message 999" in err
    assert harness.outcome(request)[0] == "mapped"
    assert koppel(harness, "held", "drop", str(request), "--reason", "   ") == 2
    capsys.readouterr()
    assert koppel(harness, "held", "list") == 0
    assert "no message is held" in capsys.readouterr().out


def test_the_store_op_gives_up_only_what_is_still_held(world):  # noqa: F811
    harness = world("op")
    letter = harness.receive(oru())
    assert harness.store.write([DropHeld(message_ids=(letter,), reason="r", at=1.0)]) == [(letter,)]
    assert harness.store.write([DropHeld(message_ids=(letter,), reason="r", at=2.0)]) == [()]  # once
    assert harness.store.held_backlog() == (0, None)
    assert len([a for a in harness.store.list_audit() if a.action == "drop-held"]) == 1
