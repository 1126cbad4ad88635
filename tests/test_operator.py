"""Operator tools: koppel queue / dead-letters / audit / resend against a real SQLite store."""

from __future__ import annotations

import json

import pytest

from engine import operator
from engine.cli import main
from engine.store import (
    Append,
    DeadLetter,
    QueueTarget,
    RecordFailure,
    open_store,
    write_one,
)
from tests.factories import T0, TEST_BSN, TEST_NAME, received

NOW = T0 + 192.0  # 3m12s after the first message
HIX_Q = "127.0.0.1:6661"
RIS_Q = "127.0.0.1:7000"
HIX = QueueTarget(queue=HIX_Q, destination="hix-agenda")
RIS = QueueTarget(queue=RIS_Q, destination="ris")

CHANNEL = """
name: zorgdomein-in
source:
  listen: tcp:0:interface=127.0.0.1
destinations:
  hix-agenda:
    endpoint: tcp:host=127.0.0.1:port=6661
  hix-copy:
    endpoint: tcp:host=127.0.0.1:port=6661
  ris:
    endpoint: tcp:host=127.0.0.1:port=7000
routes:
  - to: [hix-agenda, ris]
"""

AR_ACK = (
    b"MSH|^~\\&|RIS|ZIEKENHUIS|ZorgDomein|ZD|20231114221500||ACK^S01^ACK|RIS42|P|2.4\r"
    b"MSA|AR|ZD001|unknown appointment type\r"
)


class World:
    """A store with three accepted messages, one rejected, a failing head and a dead letter."""

    def __init__(self, tmp_path, monkeypatch):
        self.url = f"sqlite://{tmp_path}/koppel.db"
        self.channels = tmp_path / "channels"
        self.channels.mkdir()
        (self.channels / "zorgdomein-in.yaml").write_text(CHANNEL)
        monkeypatch.setattr(operator, "_now", lambda: NOW)
        self.store = open_store(self.url)
        s = self.store
        self.m1 = write_one(s, Append(message=received("ZD001", received_at=T0, targets=(HIX, RIS)))).message_id
        self.m2 = write_one(s, Append(message=received("ZD002", received_at=T0 + 60, targets=(HIX,)))).message_id
        self.m3 = write_one(s, Append(message=received("ZD003", received_at=T0 + 120, targets=(HIX,)))).message_id
        self.rejected = write_one(s, Append(message=received("ZD004", received_at=T0, status="rejected"))).message_id
        self.hix = [e.id for e in s.queue_head(HIX_Q)]  # m1, m2, m3
        (self.ris_dead,) = [e.id for e in s.queue_head(RIS_Q)]
        write_one(s, RecordFailure(entry_id=self.hix[0], error="connection refused", ack=None,
                                   next_attempt_at=NOW + 42, at=T0 + 150))
        write_one(s, DeadLetter(entry_id=self.ris_dead, reason="AR from destination: dead-lettered",
                                ack=AR_ACK, at=T0 + 100))

    def run(self, capsys, *argv: str, config: bool = True) -> tuple[int, str, str]:
        args = [*argv, "--store", self.url]
        if config and argv[0] not in ("audit",) and argv[:2] not in (
            ("dead-letters", "show"), ("dead-letters", "drop")
        ):
            args += ["--channels", str(self.channels)]
        code = main(args)
        out, err = capsys.readouterr()
        assert TEST_BSN not in out + err and TEST_NAME not in out + err, "patient data printed"
        return code, out, err


@pytest.fixture
def world(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    yield w
    w.store.close()


def rows(out: str) -> dict[str, list[str]]:
    """Table lines keyed by their first column (header skipped)."""
    lines = [line.split() for line in out.splitlines() if line.strip()]
    return {cols[0]: cols for cols in lines[1:]}


# --------------------------------------------------------------------------- queue


def test_queue_list_shows_depth_oldest_age_state_dead_letters_and_last_error(world, capsys):
    code, out, _ = world.run(capsys, "queue", "list")
    assert code == 0
    table = rows(out)
    hix, ris = table[HIX_Q], table[RIS_Q]
    assert hix[1:6] == ["hix-agenda,hix-copy", "3", "3m12s", "active", "0"]
    assert " ".join(hix[6:]) == "connection refused"
    assert ris[1:6] == ["ris", "0", "-", "active", "1"]
    assert out.splitlines()[0].split()[:3] == ["QUEUE", "DESTINATIONS", "DEPTH"]


def test_queue_list_json_carries_the_same_numbers(world, capsys):
    code, out, _ = world.run(capsys, "queue", "list", "--json")
    assert code == 0
    by_queue = {r["queue"]: r for r in json.loads(out)}
    assert by_queue[HIX_Q]["depth"] == 3
    assert by_queue[HIX_Q]["oldest_age"] == pytest.approx(192.0)
    assert by_queue[HIX_Q]["destinations"] == ["hix-agenda", "hix-copy"]
    assert by_queue[RIS_Q]["dead"] == 1 and by_queue[RIS_Q]["state"] == "active"


def test_queue_list_without_config_names_destinations_from_the_queued_entries(world, capsys, tmp_path):
    code, out, err = world.run(capsys, "queue", "list", "--channels", str(tmp_path / "absent"), config=False)
    assert code == 0 and err == ""
    assert rows(out)[HIX_Q][1] == "hix-agenda"


def test_queue_show_lists_the_head_in_order_without_bodies(world, capsys):
    code, out, _ = world.run(capsys, "queue", "show", "hix-agenda", "--limit", "2")
    assert code == 0
    assert out.splitlines()[0] == f"queue {HIX_Q} (hix-agenda, hix-copy): active, 3 pending, 0 dead letters"
    table = rows(out.split("\n\n", 1)[1])
    first, second = table[str(world.hix[0])], table[str(world.hix[1])]
    assert first[1:6] == [str(world.m1), "ZD001", "SRM^S01", "hix-agenda", "1"]
    assert first[6:9] == ["3m12s", "ago", "in"] and first[9] == "42s"
    assert " ".join(first[10:]) == "connection refused"
    assert second[1:3] == [str(world.m2), "ZD002"] and "due" in second
    assert str(world.hix[2]) not in table
    assert out.rstrip().endswith("... and 1 more")


def test_queue_pause_and_resume_set_the_flag_the_engine_polls(world, capsys):
    code, out, _ = world.run(capsys, "queue", "pause", "hix-agenda")
    assert code == 0 and world.store.is_paused(HIX_Q)
    assert "active -> paused (3 pending)" in out
    assert "shared with hix-copy" in out
    code, out, _ = world.run(capsys, "queue", "pause", HIX_Q)
    assert code == 0 and "already paused, nothing changed" in out
    code, out, _ = world.run(capsys, "queue", "resume", "hix-copy")
    assert code == 0 and not world.store.is_paused(HIX_Q)
    assert "paused -> active" in out
    assert not world.store.is_paused(RIS_Q)


def test_queue_retry_now_makes_the_waiting_head_due(world, capsys):
    assert world.store.get_entry(world.hix[0]).next_attempt_at == NOW + 42
    code, out, _ = world.run(capsys, "queue", "retry-now", "hix-agenda")
    assert code == 0 and "due now" in out
    assert out.strip().endswith(f"queue {HIX_Q} (hix-agenda, hix-copy): 1 entry due now")
    assert world.store.get_entry(world.hix[0]).next_attempt_at <= NOW
    code, out, _ = world.run(capsys, "queue", "retry-now", "hix-agenda")
    assert code == 1 and "3 pending, none waiting on a backoff; nothing changed" in out


def test_queue_retry_now_on_an_empty_queue_does_nothing_and_says_so(world, capsys):
    code, out, _ = world.run(capsys, "queue", "retry-now", "ris")
    assert code == 1 and "nothing pending" in out


def test_a_queue_key_works_without_any_config(world, capsys, tmp_path):
    code, out, _ = world.run(capsys, "queue", "pause", HIX_Q, "--channels", str(tmp_path / "absent"),
                             config=False)
    assert code == 0 and world.store.is_paused(HIX_Q)
    assert f"queue {HIX_Q}: active -> paused" in out


def test_an_unknown_destination_name_exits_1_naming_the_known_ones(world, capsys):
    code, out, err = world.run(capsys, "queue", "pause", "lab")
    assert code == 1 and out == ""
    assert "unknown destination 'lab'" in err and "hix-agenda, hix-copy, ris" in err


def test_an_unknown_queue_key_exits_1_and_creates_no_queue(world, capsys):
    code, _, err = world.run(capsys, "queue", "pause", "127.0.0.1:9999")
    assert code == 1 and "no queue 127.0.0.1:9999" in err
    assert "127.0.0.1:9999" not in {s.queue for s in world.store.queue_stats(NOW)}


def test_a_missing_store_exits_1_and_is_not_created(tmp_path, capsys):
    path = tmp_path / "nowhere" / "koppel.db"
    assert main(["queue", "list", "--store", f"sqlite://{path}"]) == 1
    assert "no store at" in capsys.readouterr().err
    assert not path.exists()


def test_a_subcommand_is_required(world, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["queue"])
    assert exit.value.code == 2


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_list_shows_each_with_its_reason(world, capsys):
    code, out, _ = world.run(capsys, "dead-letters", "list")
    assert code == 0
    line = rows(out)[str(world.ris_dead)]
    assert line[1:8] == [RIS_Q, "ris", str(world.m1), "ZD001", "SRM^S01", "1", "1m32s"]
    assert "AR from destination" in out
    code, out, _ = world.run(capsys, "dead-letters", "list", "hix-agenda")
    assert code == 0 and out.strip() == f"no dead letters on queue {HIX_Q}"


def test_dead_letters_list_json(world, capsys):
    code, out, _ = world.run(capsys, "dead-letters", "list", "ris", "--json")
    assert code == 0
    (entry,) = json.loads(out)
    assert entry["entry"] == world.ris_dead and entry["dead_at"] == T0 + 100
    assert entry["ack"] == {"readable": True, "code": "AR", "control_id": "ZD001",
                            "text": "unknown appointment type"}


def test_dead_letters_show_gives_headers_the_ack_received_and_the_reason(world, capsys):
    code, out, _ = world.run(capsys, "dead-letters", "show", str(world.ris_dead))
    assert code == 0
    fields = {line[:12].strip(): line[14:] for line in out.splitlines()}
    assert fields["state"] == "dead"
    assert fields["queue"] == RIS_Q and fields["destination"] == "ris"
    assert fields["message"].startswith(f"{world.m1} (channel zorgdomein-in, received 2023-11-14 22:13:20Z")
    assert fields["control id"] == "ZD001" and fields["type"] == "SRM^S01"
    assert fields["attempts"] == "1"
    assert fields["dead since"] == "2023-11-14 22:15:00Z (1m32s ago)"
    assert fields["ack received"] == "MSA-1 AR  MSA-2 ZD001  text 'unknown appointment type'"
    assert fields["reason"] == "AR from destination: dead-lettered"


def test_dead_letters_show_of_an_unknown_id_exits_1(world, capsys):
    code, out, err = world.run(capsys, "dead-letters", "show", "999")
    assert code == 1 and out == "" and "no queue entry 999" in err


def test_replay_puts_the_dead_letter_back_at_the_tail_of_its_queue(world, capsys):
    write_one(world.store, Append(message=received("ZD005", received_at=T0 + 130, targets=(RIS,))))
    code, out, _ = world.run(capsys, "dead-letters", "replay", str(world.ris_dead))
    assert code == 0
    head = world.store.queue_head(RIS_Q)
    assert [e.control_id for e in head] == ["ZD005", "ZD001"]
    assert head[-1].replay_of == world.ris_dead and head[-1].attempts == 0
    assert world.store.get_entry(world.ris_dead).state == "replayed"
    assert f"replayed entry {world.ris_dead} as entry {head[-1].id}" in out
    assert world.store.list_dead_letters() == []


def test_replay_all_of_a_destination_replays_its_queue(world, capsys):
    code, out, _ = world.run(capsys, "dead-letters", "replay", "--all", "ris")
    assert code == 0 and "replayed 1 dead letter onto the tail of queue" in out
    assert [e.replay_of for e in world.store.queue_head(RIS_Q)] == [world.ris_dead]
    code, out, _ = world.run(capsys, "dead-letters", "replay", "--all", "ris")
    assert code == 1 and "no dead letters, nothing changed" in out


def test_replay_of_an_id_that_is_not_dead_changes_nothing_and_exits_1(world, capsys):
    code, out, err = world.run(capsys, "dead-letters", "replay", str(world.ris_dead), str(world.hix[0]), "999")
    assert code == 1 and out == ""
    assert f"entry {world.hix[0]} is pending, not a dead letter" in err and "no queue entry 999" in err
    assert world.store.get_entry(world.ris_dead).state == "dead"


def test_replay_needs_ids_or_all(world, capsys):
    code, _, err = world.run(capsys, "dead-letters", "replay")
    assert code == 2 and "give entry ids or --all DEST" in err


def test_drop_keeps_the_reason_in_the_audit_log(world, capsys):
    code, out, _ = world.run(capsys, "dead-letters", "drop", str(world.ris_dead), "--reason",
                             "RIS confirmed by phone")
    assert code == 0 and "1 dead letter dropped" in out
    assert world.store.get_entry(world.ris_dead).state == "dropped"
    (record,) = world.store.list_audit()
    assert (record.action, record.entry_id, record.queue, record.reason) == (
        "drop", world.ris_dead, RIS_Q, "RIS confirmed by phone")
    assert record.at == NOW
    code, out, _ = world.run(capsys, "audit")
    assert code == 0
    line = rows(out)[str(record.id)]
    assert line[1:5] == ["2023-11-14", "22:16:32Z", "(0s", "ago)"]
    assert line[5:9] == ["drop", RIS_Q, str(world.ris_dead), str(world.m1)]
    assert out.rstrip().endswith("RIS confirmed by phone")


def test_drop_requires_a_reason(world, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["dead-letters", "drop", str(world.ris_dead), "--store", world.url])
    assert exit.value.code == 2
    for said_nothing in ("  ", ".", "- ?"):  # (as the admin API: a reason has a letter or digit)
        code, _, err = world.run(capsys, "dead-letters", "drop", str(world.ris_dead), "--reason", said_nothing)
        assert code == 2 and "--reason" in err, said_nothing
    assert world.store.get_entry(world.ris_dead).state == "dead"


def test_drop_of_an_unknown_id_exits_1(world, capsys):
    code, _, err = world.run(capsys, "dead-letters", "drop", "999", "--reason", "typo")
    assert code == 1 and "no queue entry 999" in err
    assert world.store.list_audit() == []


# --------------------------------------------------------------------------- resend


def test_resend_queues_the_message_again_for_the_destination(world, capsys):
    code, out, _ = world.run(capsys, "resend", str(world.m2), "--to", "ris")
    assert code == 0
    (entry,) = world.store.queue_head(RIS_Q)
    assert (entry.message_id, entry.destination, entry.enqueued_at) == (world.m2, "ris", NOW)
    assert f"queued message {world.m2} (SRM^S01, control id ZD002) for ris on queue {RIS_Q} as entry {entry.id}" in out
    (record,) = world.store.list_audit()
    assert record.action == "resend" and record.message_id == world.m2


def test_resend_to_a_shared_queue_key_needs_a_name(world, capsys):
    code, _, err = world.run(capsys, "resend", str(world.m2), "--to", HIX_Q)
    assert code == 2 and "shared by hix-agenda, hix-copy" in err
    code, out, _ = world.run(capsys, "resend", str(world.m2), "--to", RIS_Q)
    assert code == 0 and "for ris on queue" in out


def test_resend_of_a_rejected_or_unknown_message_exits_1(world, capsys):
    code, _, err = world.run(capsys, "resend", str(world.rejected), "--to", "ris")
    assert code == 1 and "was rejected" in err
    code, _, err = world.run(capsys, "resend", "999", "--to", "ris")
    assert code == 1 and "no message 999" in err
    assert world.store.queue_head(RIS_Q) == []


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (59.9, "59s"), (192, "3m12s"), (3600, "1h00m"), (7500, "2h05m"), (273600, "3d04h"),
     (-5, "0s"), (None, "-")],
)
def test_ages_read_the_way_operators_say_them(seconds, text):
    assert operator.human_age(seconds) == text
