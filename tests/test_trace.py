"""koppel trace: where a stored message went (mapping, agenda entry, built messages, deliveries),
read from the store as the bundled configuration left it; and the admin API's message view."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.store import DeadLetter, MarkDelivered, RecordFailure
from tests.test_processor import ZD, Harness, oru, srm

ACK_AA = b"MSH|^~\\&|HIX||KOPPEL||20261123120000||ACK^S12^ACK|A1|P|2.5\rMSA|AA|K1\r"
ACK_AR = b"MSH|^~\\&|ARCHIVE||KOPPEL||20261123120000||ACK^T02^ACK|A2|P|2.5\rMSA|AR|K2|unknown patient\r"


@pytest.fixture
def world(tmp_path):
    """An SRM^S01 (its SIU^S12 delivered to the HIS) and its letter (the MDM^T02 dead at the archive)."""
    h = Harness(tmp_path)
    request = h.receive(srm())
    letter = h.receive(oru())
    built = {m.origin_id: m for m in h.store.list_messages(limit=100) if m.origin_id is not None}
    (siu_entry,) = h.store.entries_of_messages([built[request].id])
    (mdm_entry,) = h.store.entries_of_messages([built[letter].id])
    now = h.reactor.seconds()
    h.store.write([MarkDelivered(entry_id=siu_entry.id, ack=ACK_AA, at=now)])
    h.store.write([RecordFailure(entry_id=mdm_entry.id, error="connection refused", ack=None,
                                 next_attempt_at=now + 1, at=now)])
    h.store.write([DeadLetter(entry_id=mdm_entry.id, reason="AR: refused by the destination", ack=ACK_AR,
                              at=now + 2)])
    h.ids = {"request": request, "letter": letter, "siu": built[request].id, "mdm": built[letter].id}
    h.url = f"sqlite:///{tmp_path}/k.db"
    yield h
    h.store.close()


def trace_json(world, capsys, *args) -> dict | list:
    assert main(["trace", *args, "--store", world.url, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trace_of_a_request_shows_its_entry_its_siu_and_that_the_his_acknowledged_it(world, capsys):
    found = trace_json(world, capsys, str(world.ids["request"]))
    assert (found["message"]["type"], found["message"]["processing"]) == ("SRM^S01", "mapped")
    (entry,) = found["agenda_entries"]
    assert (entry["agenda"], entry["zd_number"]) == ("cardiology", ZD)
    assert [(b["id"], b["type"]) for b in found["built"]] == [(world.ids["siu"], "SIU^S12")]
    (delivery,) = found["deliveries"]
    assert (delivery["message"], delivery["destination"], delivery["state"], delivery["ack"]["code"]) == (
        world.ids["siu"], "his-scheduling", "delivered", "AA")
    assert "data" not in entry  # headers only: no patient fields without --data


def test_trace_shows_a_dead_letter_with_its_nak_and_reason(world, capsys):
    assert main(["trace", str(world.ids["letter"]), "--store", world.url]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith(str(world.ids["mdm"]) + " ")]
    assert "document-archive" in line and "dead" in line and "AR" in line and "refused" in line
    assert f"agenda entry {world.store.list_agenda_entries(limit=1)[0].id}" in out
    assert "ZD200046119" not in out.replace("MSH-10 ZD200046119", "")  # (the ORU's MSH-10 is its ZD-number)


def test_trace_of_a_built_message_names_what_it_was_built_from(world, capsys):
    found = trace_json(world, capsys, str(world.ids["siu"]))
    assert found["message"]["origin_id"] == world.ids["request"]
    assert found["built"] == [] and found["agenda_entries"] == []
    assert [d["state"] for d in found["deliveries"]] == ["delivered"]
    assert main(["trace", str(world.ids["siu"]), "--store", world.url]) == 0
    assert f"built by a mapping from message {world.ids['request']}" in capsys.readouterr().out


def test_trace_by_control_id_finds_the_letter_by_its_zd_number(world, capsys):
    found = trace_json(world, capsys, "--control-id", ZD)
    assert [t["message"]["id"] for t in found] == [world.ids["letter"]]
    assert main(["trace", "--control-id", "NOPE", "--store", world.url]) == 1
    assert "no stored message with MSH-10 'NOPE'" in capsys.readouterr().err


def test_trace_prints_bodies_only_with_data_and_audits_each(world, capsys):
    assert main(["trace", str(world.ids["request"]), "--store", world.url]) == 0
    out = capsys.readouterr().out
    assert "PID|" not in out and "999999990" not in out
    assert world.store.list_audit() == []
    assert main(["trace", str(world.ids["request"]), "--store", world.url, "--data"]) == 0
    out = capsys.readouterr().out
    assert "ARQ|" in out and "SCH|" in out  # the request and the SIU^S12 built from it
    audited = world.store.list_audit()
    assert sorted((r.action, r.message_id) for r in audited) == sorted(
        [("read-body", world.ids["request"]), ("read-body", world.ids["siu"])])


def test_trace_by_zd_number_follows_the_whole_referral(world, capsys):
    """The request (ARQ-1, not its MSH-10), the letter and what was built from each."""
    found = trace_json(world, capsys, "--zd", ZD)
    assert found["agenda_entry"]["zd_number"] == ZD
    assert [t["message"]["id"] for t in found["messages"]] == [world.ids["request"], world.ids["letter"]]
    assert {d["message"]: d["state"] for t in found["messages"] for d in t["deliveries"]} == {
        world.ids["siu"]: "delivered", world.ids["mdm"]: "dead"}
    assert main(["trace", "--zd", ZD, "--store", world.url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ZD-number {ZD}: agenda entry ") and "2 messages, oldest first" in out


def test_trace_by_zd_number_finds_a_letter_still_held_for_its_request(tmp_path, capsys):
    h = Harness(tmp_path)
    try:
        letter = h.receive(oru())
        assert h.outcome(letter)[0] == "held"
        capsys.readouterr()  # (what the engine logged)
        assert main(["trace", "--zd", ZD, "--store", f"sqlite:///{tmp_path}/k.db", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["agenda_entry"] is None
        assert [t["message"]["processing"] for t in found["messages"]] == ["held"]
        assert main(["trace", "--zd", "ZD000000000", "--store", f"sqlite:///{tmp_path}/k.db"]) == 1
        assert "nothing stored for ZD-number 'ZD000000000'" in capsys.readouterr().err
    finally:
        h.store.close()


@pytest.mark.parametrize("args, code, error", [
    ([], 2, "give one of MESSAGE-ID, --control-id or --zd"),
    (["1", "--control-id", "X"], 2, "not MESSAGE-ID and --control-id"),
    (["--zd", "ZD1", "--control-id", "X"], 2, "not --control-id and --zd"),
    (["1", "--channel", "zorgdomein-in"], 2, "--channel goes with --control-id"),
    (["987654"], 1, "no message 987654"),
])
def test_trace_refuses_what_it_cannot_answer(world, capsys, args, code, error):
    assert main(["trace", *args, "--store", world.url]) == code
    assert error in capsys.readouterr().err


def test_trace_by_zd_number_shows_a_message_refused_for_it(tmp_path, capsys):
    """An ORC-1 XO for an order already cancelled changed nothing and waits for nothing: it
    is refused ("entry is cancelled"), and on-call still sees that ZorgDomein sent it."""
    from tests.test_processor import orm

    h = Harness(tmp_path)
    try:
        h.receive(orm())
        h.receive(orm().replace(b"ORC|NW|", b"ORC|CA|").replace(b"|e49ce31d|", b"|e49ce31e|"))
        late = h.receive(orm().replace(b"ORC|NW|", b"ORC|XO|").replace(b"|e49ce31d|", b"|e49ce31f|"))
        assert h.outcome(late)[0] == "error"
        zd = h.entries()[0].zd_number
        capsys.readouterr()
        assert main(["trace", "--zd", zd, "--store", f"sqlite:///{tmp_path}/k.db", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        refused = [t["message"] for t in found["messages"] if t["message"]["id"] == late]
        assert [m["processing"] for m in refused] == ["error"]
        assert "cancelled" in refused[0]["processing_detail"]
    finally:
        h.store.close()
