"""Operator CLI, after review: resend of a message its destination gets only as mapped, replay
onto a queue nothing delivers, a trail for queue pause/resume/retry-now, ids and limits that
argparse checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.store import Append, DeadLetter, QueueTarget, open_store, write_one
from tests.factories import T0, received
from tests.test_operator import HIX_Q, NOW, RIS_Q, World, rows

ROOT = Path(__file__).resolve().parent.parent
CHANNELS, MAPPINGS = ROOT / "channels", ROOT / "mappings"  # the bundled config
SRM = (ROOT / "tests/samples/zorgdomein/zd_srm_s01_appointment_request.hl7").read_bytes()
HIS_Q = "127.0.0.1:6661"  # his-scheduling in the bundled channels/zorgdomein-in.yaml
HIS = QueueTarget(queue=HIS_Q, destination="his-scheduling")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """tests/test_operator.py's store: a failing head on hix-agenda's queue, a dead letter for ris."""
    w = World(tmp_path, monkeypatch)
    yield w
    w.store.close()


# --------------------------------------------------------------------------- resend of a mapped type


@pytest.fixture
def mapped(tmp_path):
    """A ZorgDomein SRM^S01 (routed `map: zorgdomein-srm`, no `to:`) and the SIU^S12 built from it."""
    url = f"sqlite://{tmp_path}/k.db"
    store = open_store(url)
    srm = write_one(store, Append(message=received("g20ce6a9f8ca4f551275", raw=SRM, received_at=T0,
                                                   payload_hash=hashlib.sha256(SRM).digest(),
                                                   targets=()))).message_id
    siu = write_one(store, Append(message=received("KOP1", peer="koppel", message_type="SIU^S12",
                                                   received_at=T0 + 0.5, duplicate_window=0.0,
                                                   origin_id=srm, targets=(HIS,)))).message_id
    other = write_one(store, Append(message=received("ZD777", received_at=T0 + 1, targets=()))).message_id
    (siu_entry,) = store.queue_head(HIS_Q)
    store.close()

    class Mapped:
        pass

    m = Mapped()
    m.url, m.srm, m.siu, m.other, m.siu_entry = url, srm, siu, other, siu_entry.id

    def run(capsys, *argv, mappings=MAPPINGS):
        code = main([*argv, "--store", url, "--channels", str(CHANNELS), "--mappings", str(mappings)])
        out, err = capsys.readouterr()
        return code, out, err

    def queued():
        with open_store(url) as s:
            return [(e.message_id, e.destination) for e in s.queue_head(HIS_Q)]

    m.run, m.queued = run, queued
    return m


def test_resend_refuses_a_destination_that_gets_the_type_only_as_mapped(mapped, capsys):
    code, out, err = mapped.run(capsys, "resend", str(mapped.srm), "--to", "his-scheduling")
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert "his-scheduling receives the messages mapping zorgdomein-srm builds from SRM^S01" in err
    assert f"resend one of those instead: {mapped.siu} (SIU^S12);" in err
    assert "--as-received" in err
    assert mapped.queued() == [(mapped.siu, "his-scheduling")]  # nothing new


def test_resend_as_received_queues_the_raw_message_anyway(mapped, capsys):
    code, out, _ = mapped.run(capsys, "resend", str(mapped.srm), "--to", "his-scheduling", "--as-received")
    assert code == 0 and f"queued message {mapped.srm} (SRM^S01" in out
    assert mapped.queued() == [(mapped.siu, "his-scheduling"), (mapped.srm, "his-scheduling")]


def test_resend_of_the_built_message_to_its_destination_is_allowed(mapped, capsys):
    code, out, _ = mapped.run(capsys, "resend", str(mapped.siu), "--to", "his-scheduling")
    assert code == 0 and f"queued message {mapped.siu} (SIU^S12" in out
    assert mapped.queued()[-1] == (mapped.siu, "his-scheduling")


def test_resend_without_the_mappings_still_refuses_and_names_the_built_messages(mapped, capsys, tmp_path):
    code, _, err = mapped.run(capsys, "resend", str(mapped.srm), "--to", "his-scheduling",
                              mappings=tmp_path / "absent")
    assert code == 1 and len(err.splitlines()) == 1
    assert "no route sends SRM^S01 on channel zorgdomein-in to his-scheduling as received" in err
    assert f"those built from it: {mapped.siu} (SIU^S12)" in err
    code, _, err = mapped.run(capsys, "resend", str(mapped.other), "--to", "his-scheduling",
                              mappings=tmp_path / "absent")
    assert code == 1 and "no message built from it was found" in err
    assert mapped.queued() == [(mapped.siu, "his-scheduling")]


def test_resend_to_a_destination_the_mapping_does_not_feed_is_refused(mapped, capsys):
    code, _, err = mapped.run(capsys, "resend", str(mapped.srm), "--to", "ris-orders")
    assert code == 1 and len(err.splitlines()) == 1
    assert "ris-orders receives nothing for SRM^S01 on channel zorgdomein-in" in err
    assert "goes to his-scheduling" in err


def test_resend_on_a_plain_route_beside_a_mapping_is_unchanged(mapped, capsys):
    """OML^O21: `map: zorgdomein-oml` and `to: [lis-orders]`: lis-orders gets it as received."""
    with open_store(mapped.url) as store:
        oml = write_one(store, Append(message=received("ZD880", message_type="OML^O21", targets=()))).message_id
    code, out, _ = mapped.run(capsys, "resend", str(oml), "--to", "lis-orders")
    assert code == 0 and f"queued message {oml} (OML^O21" in out


def test_resend_with_a_channel_without_mappings_is_unchanged(world, capsys):
    """tests/test_operator.py's channel routes everything `to:` hix-agenda and ris, no map."""
    code, out, _ = world.run(capsys, "resend", str(world.m2), "--to", "ris")
    assert code == 0 and "for ris on queue" in out


# --------------------------------------------------------------------------- replay onto a dead queue


def _dead_on(world, target: QueueTarget, control_id: str) -> int:
    m = write_one(world.store, Append(message=received(control_id, received_at=T0, targets=(target,)))).message_id
    (entry,) = [e for e in world.store.queue_head(target.queue) if e.message_id == m]
    write_one(world.store, DeadLetter(entry_id=entry.id, reason="destination answered AR", ack=None, at=T0))
    return entry.id


def test_replay_onto_a_queue_no_destination_delivers_is_refused(world, capsys):
    gone = _dead_on(world, QueueTarget(queue="10.1.2.3:6661", destination="old-his"), "ZD009")
    code, out, err = world.run(capsys, "dead-letters", "replay", str(gone), str(world.ris_dead))
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert f"entry {gone} is on queue 10.1.2.3:6661, which no destination in the channels config delivers" in err
    assert "would never be sent (nothing changed)" in err
    assert world.store.get_entry(gone).state == "dead"
    assert world.store.get_entry(world.ris_dead).state == "dead"  # all or nothing
    code, _, err = world.run(capsys, "dead-letters", "replay", "--all", "10.1.2.3:6661")
    assert code == 1 and "queue 10.1.2.3:6661, which no destination" in err
    assert world.store.get_entry(gone).state == "dead"


def test_replay_of_a_destination_that_moved_points_at_resend(world, capsys):
    moved = _dead_on(world, QueueTarget(queue="10.9.9.9:6661", destination="ris"), "ZD010")
    code, _, err = world.run(capsys, "dead-letters", "replay", str(moved))
    assert code == 1 and f"(ris now delivers to {RIS_Q}: koppel resend" in err


def test_replay_without_a_channels_config_is_unchanged(world, capsys, tmp_path):
    gone = _dead_on(world, QueueTarget(queue="10.1.2.3:6661", destination="old-his"), "ZD011")
    code, out, _ = world.run(capsys, "dead-letters", "replay", str(gone), "--channels", str(tmp_path / "absent"),
                             config=False)
    assert code == 0 and f"replayed entry {gone}" in out


# --------------------------------------------------------------------------- pause / resume / retry-now


def _log_lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_pause_and_resume_take_a_reason_and_write_a_log_line_without_it(world, capsys):
    code, out, err = world.run(capsys, "queue", "pause", "hix-agenda", "--reason", "HIS  maintenance\ntonight")
    assert code == 0 and out.splitlines()[-1].endswith("-> paused (3 pending); reason: HIS maintenance tonight")
    (line,) = _log_lines(err)
    assert line["event"] == "operator.queue_paused" and line["queue"] == HIX_Q
    assert line["destinations"] == ["hix-agenda", "hix-copy"] and line["reason_given"] is True
    assert "user" in line and "timestamp" in line
    assert "maintenance" not in err  # free text may name a patient: kept out of logs
    code, _, err = world.run(capsys, "queue", "pause", "hix-agenda")
    assert code == 0 and _log_lines(err) == []  # nothing changed, nothing logged
    code, _, err = world.run(capsys, "queue", "resume", "hix-agenda")
    assert code == 0 and [(x["event"], x["reason_given"]) for x in _log_lines(err)] == [
        ("operator.queue_resumed", False)]


def test_retry_now_writes_a_log_line(world, capsys):
    code, out, err = world.run(capsys, "queue", "retry-now", "hix-agenda", "--reason", "HIS back up")
    assert code == 0 and "1 entry due now; reason: HIS back up" in out
    (line,) = _log_lines(err)
    assert (line["event"], line["queue"], line["entries"]) == ("operator.queue_retry_now", HIX_Q, 1)


def test_a_blank_reason_is_a_usage_error_and_changes_nothing(world, capsys):
    code, _, err = world.run(capsys, "queue", "pause", "hix-agenda", "--reason", "  ")
    assert code == 2 and "--reason" in err and not world.store.is_paused(HIX_Q)


def test_pause_resume_and_retry_now_leave_an_audit_record(world, capsys):
    world.run(capsys, "queue", "retry-now", "hix-agenda", "--reason", "HIS back up")
    world.run(capsys, "queue", "pause", "hix-agenda", "--reason", "HIS maintenance")
    world.run(capsys, "queue", "resume", "hix-agenda")
    records = world.store.list_audit()
    assert [(r.action, r.queue, r.reason) for r in records] == [
        ("resume", HIX_Q, None), ("pause", HIX_Q, "HIS maintenance"), ("retry-now", HIX_Q, "HIS back up")]
    _, out, _ = world.run(capsys, "audit")
    assert "pause" in out and "HIS maintenance" in out


# --------------------------------------------------------------------------- ids and limits


BIG = "99999999999999999999"  # > 2**63-1: overflowed SQLite's driver (OverflowError traceback)


@pytest.mark.parametrize("argv", [
    ["dead-letters", "show", BIG],
    ["dead-letters", "replay", BIG],
    ["dead-letters", "drop", BIG, "--reason", "typo"],
    ["resend", BIG, "--to", "ris"],
    ["dead-letters", "show", "0"],
    ["dead-letters", "replay", "-3"],
    ["resend", "12abc", "--to", "ris"],
])
def test_an_id_out_of_range_is_a_usage_error_not_a_traceback(world, capsys, argv):
    with pytest.raises(SystemExit) as exit:
        world.run(capsys, *argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    given = argv[1] if argv[0] == "resend" else argv[2]
    assert err.splitlines()[-1].endswith(f"must be an id from 1 to {2**63 - 1}, not {given!r}")


def test_the_largest_id_is_looked_up_and_not_found(world, capsys):
    code, _, err = world.run(capsys, "dead-letters", "show", str(2**63 - 1))
    assert code == 1 and f"no queue entry {2**63 - 1}" in err


@pytest.mark.parametrize("argv", [
    ["dead-letters", "list"], ["queue", "show", "hix-agenda"], ["audit"], ["agenda", "list"], ["messages"],
])
@pytest.mark.parametrize("limit", ["0", "-1", "ten"])
def test_a_limit_must_be_a_positive_whole_number(world, capsys, argv, limit):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--limit", limit, "--store", world.url])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"must be a whole number from 1 up, not {limit!r}")


def test_a_limit_past_sqlites_range_means_all(world, capsys):
    code, out, _ = world.run(capsys, "dead-letters", "list", "--limit", BIG)
    assert code == 0 and str(world.ris_dead) in out


def test_agenda_show_of_a_huge_number_looks_for_a_zd_number(world, capsys):
    code, _, err = world.run(capsys, "agenda", "show", BIG, config=False)
    assert code == 1 and f"no agenda entry {BIG}" in err


# --------------------------------------------------------------------------- queue move (orphaned queues)


def test_queue_move_requeues_an_orphaned_queue_onto_a_destination_in_order_with_an_audit_trail(world, capsys):
    """hix-agenda moved from 127.0.0.1:6661 to :6662 while m1..m3 waited on the old queue."""
    text = (world.channels / "zorgdomein-in.yaml").read_text()
    (world.channels / "zorgdomein-in.yaml").write_text(text.replace("port=6661", "port=6662"))
    code, out, _ = world.run(capsys, "queue", "move", HIX_Q, "hix-agenda", "--reason", "HIS moved to :6662")
    assert code == 0 and "moved 3 pending entries from 127.0.0.1:6661" in out
    new_q = "127.0.0.1:6662"
    moved = world.store.queue_head(new_q, 10)
    assert [e.message_id for e in moved] == [world.m1, world.m2, world.m3]
    assert {e.destination for e in moved} == {"hix-agenda"}
    assert world.store.queue_head(HIX_Q, 10) == []
    assert [r.action for r in world.store.list_audit()].count("move") == 3
    code, out, _ = world.run(capsys, "queue", "move", HIX_Q, "hix-agenda")
    assert code == 1 and "nothing pending" in out


def test_queue_move_sends_each_entry_where_its_own_destination_delivers_now(world, capsys):
    """hix-agenda and hix-copy shared 127.0.0.1:6661; hix-agenda moved to :6662, hix-copy to
    :6663: each entry follows its own destination (one DEST for all re-labelled hix-copy's
    messages as hix-agenda's, with its rewrite), and one of a destination that no longer
    exists needs DEST."""
    text = (world.channels / "zorgdomein-in.yaml").read_text()
    copy = write_one(world.store, Append(message=received(
        "ZD010", received_at=T0 + 130, targets=(QueueTarget(queue=HIX_Q, destination="hix-copy"),)))).message_id
    gone = write_one(world.store, Append(message=received(
        "ZD011", received_at=T0 + 131, targets=(QueueTarget(queue=HIX_Q, destination="hix-old"),)))).message_id
    moved_text = text.replace("port=6661", "port=6662", 1).replace("port=6661", "port=6663", 1)
    (world.channels / "zorgdomein-in.yaml").write_text(moved_text)
    code, _, err = world.run(capsys, "queue", "move", HIX_Q)
    assert code == 1 and "hix-old" in err and "give DEST" in err
    assert len(world.store.queue_head(HIX_Q, 10)) == 5  # nothing moved
    code, out, err = world.run(capsys, "queue", "move", HIX_Q, "ris", "--reason", "HIS moved")
    assert code == 0, err
    assert {e.message_id: e.destination for e in world.store.queue_head("127.0.0.1:6662", 10)} == {
        world.m1: "hix-agenda", world.m2: "hix-agenda", world.m3: "hix-agenda"}
    assert [(e.message_id, e.destination) for e in world.store.queue_head("127.0.0.1:6663", 10)] == [(copy, "hix-copy")]
    assert (gone, "ris") in [(e.message_id, e.destination) for e in world.store.queue_head(RIS_Q, 10)]


def test_queue_move_beside_a_running_engine_needs_the_queue_paused_first(world, capsys, tmp_path, monkeypatch):
    import subprocess
    import sys

    from engine import operator

    waited = []
    monkeypatch.setattr(operator.time, "sleep", waited.append)

    text = (world.channels / "zorgdomein-in.yaml").read_text()
    (world.channels / "zorgdomein-in.yaml").write_text(text.replace("port=6661", "port=6662"))
    holder = subprocess.Popen([sys.executable, "-c", (  # a running engine's deliver claim
        "import sys; sys.path.insert(0, %r)\n"
        "from engine.store import open_store\n"
        "s = open_store(%r); s.claim('deliver'); print('held', flush=True); sys.stdin.read()") % (
        str(ROOT), world.url)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = world.run(capsys, "queue", "move", HIX_Q)
        assert code == 1 and "pause it first" in err
        assert world.run(capsys, "queue", "pause", HIX_Q)[0] == 0
        code, out, err = world.run(capsys, "queue", "move", HIX_Q)
        assert code == 0 and "moved 3 pending entries" in out, err
        assert waited == [operator.PAUSE_SEEN]  # for the sender to see the pause and record its entry on the wire
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_queue_move_forced_leaves_the_entries_of_a_destination_that_still_delivers_there(world, capsys):
    """--force with DEST moved a still-configured destination's entries to DEST, re-labelled."""
    text = (world.channels / "zorgdomein-in.yaml").read_text()
    copy = write_one(world.store, Append(message=received(
        "ZD010", received_at=T0 + 130, targets=(QueueTarget(queue=HIX_Q, destination="hix-copy"),)))).message_id
    (world.channels / "zorgdomein-in.yaml").write_text(text.replace("port=6661", "port=6662", 1))  # hix-agenda only
    assert world.run(capsys, "queue", "pause", HIX_Q)[0] == 0
    code, out, err = world.run(capsys, "queue", "move", HIX_Q, "ris", "--force")
    assert code == 0, err
    assert [(e.message_id, e.destination) for e in world.store.queue_head(HIX_Q, 20)] == [(copy, "hix-copy")]
    assert {e.message_id for e in world.store.queue_head("127.0.0.1:6662", 20)} == {world.m1, world.m2, world.m3}


def test_queue_move_refuses_a_queue_a_destination_still_delivers_unless_forced(world, capsys):
    code, _, err = world.run(capsys, "queue", "move", HIX_Q, "ris")
    assert code == 1 and "hix-agenda" in err and "--force" in err
    assert len(world.store.queue_head(HIX_Q, 10)) == 3
    code, _, err = world.run(capsys, "queue", "move", "hix-agenda", "ris")
    assert code == 2 and "HOST:PORT" in err


def test_replay_all_goes_in_steps_and_replays_everything(world, capsys, monkeypatch):
    from engine import operator

    for entry_id in world.hix:
        write_one(world.store, DeadLetter(entry_id=entry_id, reason="AR", ack=None, at=T0 + 200))
    steps = []
    real = operator._write
    monkeypatch.setattr(operator, "STEP", 2)
    monkeypatch.setattr(operator, "_write", lambda store, op: steps.append(op) or real(store, op))
    code, out, _ = world.run(capsys, "dead-letters", "replay", "--all", "hix-agenda")
    assert code == 0 and "replayed 3 dead letters" in out
    assert [op.limit for op in steps] == [2, 2]  # 2 then 1: the short step ends it
    assert [e.message_id for e in world.store.queue_head(HIX_Q, 10)] == [world.m1, world.m2, world.m3]


# --------------------------------------------------------------------------- schema versions


def test_operator_commands_never_migrate_a_store_and_say_which_side_to_upgrade(tmp_path, capsys):
    """A newer CLI beside an older engine must not change the schema under it; an older CLI
    must not read a newer store."""
    import sqlite3

    from engine.store.migrations import MIGRATIONS, current_version, migrate

    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        migrate(conn, MIGRATIONS[:-1])  # as an engine one schema version behind left it
    assert main(["queue", "list", "--store", f"sqlite:///{path}", "--channels", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "older than this Koppel's" in err and "koppel run" in err and len(err.splitlines()) == 1
    with sqlite3.connect(path) as conn:
        assert current_version(conn) == MIGRATIONS[-2].version  # untouched

    with sqlite3.connect(path, isolation_level=None) as conn:
        migrate(conn, MIGRATIONS)
        conn.execute("INSERT INTO schema_version (version, applied_at, why) VALUES (?, 0, 'future')",
                     (MIGRATIONS[-1].version + 1,))
    assert main(["audit", "--store", f"sqlite:///{path}"]) == 1
    assert "newer than this Koppel understands" in capsys.readouterr().err


# --------------------------------------------------------------------------- races with another operator


def _race(world, monkeypatch, first_id):
    """Another operator replays `first_id` between our read of the entries and our write."""
    from engine import operator
    from engine.store import ReplayDeadLetters

    real = operator._write

    def write(store, op):
        if not getattr(write, "done", False):
            write.done = True
            real(store, ReplayDeadLetters(entry_ids=(first_id,), at=T0 + 300))
        return real(store, op)

    monkeypatch.setattr(operator, "_write", write)


def test_drop_and_replay_report_only_what_they_did_when_another_operator_got_there_first(world, capsys, monkeypatch):
    second = world.hix[1]
    write_one(world.store, DeadLetter(entry_id=second, reason="AR", ack=None, at=T0 + 200))
    _race(world, monkeypatch, world.ris_dead)
    code, out, _ = world.run(capsys, "dead-letters", "drop", str(world.ris_dead), str(second), "--reason", "by phone")
    assert code == 1
    assert f"dropped entry {second} " in out and f"dropped entry {world.ris_dead} " not in out

    third = world.hix[2]
    write_one(world.store, DeadLetter(entry_id=third, reason="AR", ack=None, at=T0 + 200))
    fourth = world.hix[0]
    write_one(world.store, DeadLetter(entry_id=fourth, reason="AR", ack=None, at=T0 + 200))
    _race(world, monkeypatch, fourth)  # the lower id goes first: zip() paired the rest wrongly
    code, out, _ = world.run(capsys, "dead-letters", "replay", str(fourth), str(third))
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("replayed entry")]
    assert line.startswith(f"replayed entry {third} as entry ")


def test_queue_move_takes_the_head_whose_last_attempt_failed(world, capsys):
    """The typical orphan: the head kept failing at the old address. The queue's record of the
    entry on the wire was never cleared, so every move left the oldest message behind."""
    from engine.store import MarkSending, RecordFailure

    head = world.hix[0]
    write_one(world.store, MarkSending(queue=HIX_Q, entry_id=head))
    write_one(world.store, RecordFailure(entry_id=head, error="connection refused", ack=None,
                                         next_attempt_at=T0 + 400, at=T0 + 160))
    assert world.store.inflight_entry(HIX_Q) is None  # answered (a failure): no longer on the wire
    text = (world.channels / "zorgdomein-in.yaml").read_text()
    (world.channels / "zorgdomein-in.yaml").write_text(text.replace("port=6661", "port=6662"))
    code, _, err = world.run(capsys, "queue", "move", HIX_Q)
    assert code == 0, err
    assert world.store.queue_head(HIX_Q, 10) == []
    assert [e.message_id for e in world.store.queue_head("127.0.0.1:6662", 10)] == [world.m1, world.m2, world.m3]


def test_koppel_messages_lists_a_built_message_as_built_not_as_received_and_acknowledged(mapped, capsys):
    """The SIU^S12 a mapping built was never received nor answered: STATUS built, ACK -."""
    assert main(["messages", "--store", mapped.url]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[str(mapped.siu)][5:7] == ["built", "-"]
    assert rows[str(mapped.siu)][9].endswith(f"(built from {mapped.srm})")
    assert rows[str(mapped.srm)][5:7] == ["accepted", "AA"]


def test_replay_drop_and_resend_write_a_log_line_as_pause_does(world, capsys):
    """The operator drill: replay, drop and resend left their audit record but no log line,
    where pause, resume, retry-now and move write one (ids and counts only, never the reason)."""
    code, _, err = world.run(capsys, "dead-letters", "replay", str(world.ris_dead))
    assert code == 0
    assert [(x["event"], x["entries"]) for x in _log_lines(err)] == [("operator.dead_letters_replayed", 1)]
    (replayed,) = [e for e in world.store.queue_head(RIS_Q) if e.replay_of == world.ris_dead]
    write_one(world.store, DeadLetter(entry_id=replayed.id, reason="AR again", ack=None, at=NOW))
    code, _, err = world.run(capsys, "dead-letters", "drop", str(replayed.id), "--reason", "by phone, ticket 7")
    assert code == 0
    (line,) = _log_lines(err)
    assert line["event"] == "operator.dead_letters_dropped" and line["entries"] == 1 and "ticket" not in err
    code, _, err = world.run(capsys, "resend", str(world.m1), "--to", "hix-agenda", "--as-received")
    assert code == 0
    (line,) = _log_lines(err)
    assert (line["event"], line["message_id"], line["destination"]) == ("operator.resend", world.m1, "hix-agenda")


def test_queue_list_leaves_out_a_retired_queue_unless_asked(world, capsys):
    """The drill: after `koppel queue move`, the old queue stayed in `queue list` for good,
    no destinations and its last error. A queue no destination delivers to with nothing
    waiting and no dead letters is history: left out (and said so), shown with --all."""
    from engine.store import MarkDelivered, QueueTarget

    old = QueueTarget(queue="127.0.0.1:6999", destination="hix-agenda")
    moved = write_one(world.store, Append(message=received("ZD0OLD", received_at=T0, targets=(old,)))).message_id
    (entry,) = world.store.queue_head("127.0.0.1:6999")
    assert entry.message_id == moved
    code, out, _ = world.run(capsys, "queue", "list")
    assert code == 0 and "127.0.0.1:6999" in out  # something waits there: shown
    write_one(world.store, MarkDelivered(entry_id=entry.id, ack=b"MSA|AA|ZD0OLD\r", at=NOW))
    code, out, _ = world.run(capsys, "queue", "list")
    assert code == 0 and "127.0.0.1:6999" not in out and HIX_Q in out and RIS_Q in out
    assert out.splitlines()[-1] == ("(1 retired queue not shown: no destination delivers to it and nothing "
                                    "waits; --all shows it)")
    code, out, _ = world.run(capsys, "queue", "list", "--all")
    assert code == 0 and rows(out)["127.0.0.1:6999"][2:5] == ["0", "-", "retired"]
    code, out, _ = world.run(capsys, "queue", "list", "--json")
    by_queue = {r["queue"]: r for r in json.loads(out)}
    assert by_queue["127.0.0.1:6999"]["retired"] is True and by_queue[HIX_Q]["retired"] is False
