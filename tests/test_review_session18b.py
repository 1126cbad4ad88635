"""Review of 024b4cd..HEAD (session 18b).

The first test fails on the reviewed code (a defect); the others are cheap checks of
properties the review confirmed, kept so they stay true.
"""

from __future__ import annotations

import json

from engine.core.ack import MSA_TEXT_MAX, build_ack
from engine.core.errors import ErrorCode
from engine.core.header import read_header
from engine.core.intake import Rejection
from engine.store import Append, MarkDelivered, QueueTarget, SetPaused, write_one
from tests.factories import T0, received
from tests.test_operator import NOW, World, rows

OLD_Q = "127.0.0.1:6999"  # a queue no destination in the test config delivers to


def _paused_old_queue(tmp_path, monkeypatch) -> World:
    """The state `koppel queue move` leaves with a running engine: the old queue had to be
    paused before the move, its entries are gone, no destination delivers there."""
    world = World(tmp_path, monkeypatch)
    old = QueueTarget(queue=OLD_Q, destination="hix-agenda")
    write_one(world.store, Append(message=received("ZD0OLD", received_at=T0, targets=(old,))))
    (entry,) = world.store.queue_head(OLD_Q)
    write_one(world.store, SetPaused(queue=OLD_Q, paused=True, at=T0 + 10, reason="moving"))
    write_one(world.store, MarkDelivered(entry_id=entry.id, ack=b"MSA|AA|ZD0OLD\r", at=NOW))
    return world


# --- defect ---------------------------------------------------------------------------------


def test_queue_list_does_not_hide_a_paused_queue(tmp_path, monkeypatch, capsys):
    """engine/operator.py queue_list: "retired" ignores the pause, so a paused queue with no
    destination and nothing waiting is left out of `koppel queue list` (and `--all` shows it as
    'retired', not 'paused'). A pause is an operator's standing decision that bites as soon as
    a destination delivers to that host:port again (an endpoint moved back after a failover,
    the move's "pause it first, move, then resume it" with the resume forgotten): the list is
    where it should stay visible. Fix: `not (s and (s.depth or s.dead_count or s.paused))`."""
    world = _paused_old_queue(tmp_path, monkeypatch)
    try:
        code, out, _ = world.run(capsys, "queue", "list")
        assert code == 0
        assert OLD_Q in rows(out), out
        assert rows(out)[OLD_Q][4] == "paused", out
    finally:
        world.store.close()


# --- properties checked and found right --------------------------------------------------------


def test_queue_list_json_still_lists_every_queue_with_the_old_keys(tmp_path, monkeypatch, capsys):
    """JSON output: the retired flag is added, no row is left out and no key removed."""
    world = _paused_old_queue(tmp_path, monkeypatch)
    try:
        code, out, _ = world.run(capsys, "queue", "list", "--json")
        assert code == 0
        by_queue = {r["queue"]: r for r in json.loads(out)}
        assert OLD_Q in by_queue and by_queue[OLD_Q]["state"] == "paused"
        assert {"queue", "destinations", "depth", "oldest_enqueued_at", "oldest_age", "state", "dead",
                "delivered", "last_error", "retired"} == set(by_queue[OLD_Q])
    finally:
        world.store.close()


def test_msa_3_cut_never_splits_an_escape_sequence_for_unusual_escape_characters():
    """MSA-3's cut to 80 characters with a 3-character MSH-2 ('}' as escape), a 5-character
    one, and lower-case letters as delimiters (the escape is then 'e': its codes are upper
    case, so every escape character written still comes in pairs)."""
    texts = ["x" * n + "|^~&}e\\#\r" * 12 for n in range(0, 12)]
    for enc, sep in ((b"^~}", b"|"), (b"^~\\&#", b"|"), (b"^re&", b"|"), (b"$r?@", b"!")):
        raw = b"MSH" + sep + enc + sep + sep.join(
            [b"A", b"B", b"C", b"D", b"20240101", b"", b"ADT^A01", b"1", b"P", b"2.4"]) + b"\r"
        header = read_header(raw, default_charset="8859/1")
        assert header.rejection is None, enc
        esc = enc[2:3]
        for text in texts:
            rejection = Rejection(ack_code="AE", error_code=ErrorCode.DATA_TYPE, text=text)
            ack = build_ack(header, code="AE", rejection=rejection, control_id="K1", timestamp="20240101120000")
            msa = ack.split(b"\r")[1].split(sep)
            assert len(msa) == 4, (enc, msa)
            assert 0 < len(msa[3]) <= MSA_TEXT_MAX and msa[3].count(esc) % 2 == 0, (enc, msa[3])


def test_new_entry_data_and_event_fields_are_read_only_and_not_shared_with_the_next_apply():
    """The copies dropped in mapping.apply and agenda._decide_new: each call's dict is its own."""
    import pytest

    from engine.core.agenda import AgendaEvent

    event = AgendaEvent(kind="referral", action="create", zd_number="ZD1", fields={"a": 1})
    with pytest.raises(TypeError):
        event.fields["a"] = 2  # type: ignore[index]
