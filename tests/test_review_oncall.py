"""On-call drill review: `koppel trace` and `GET /api/messages/{id}` must tell the truth."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.store import Append
from tests.factories import received
from tests.test_processor import ZD, Harness, oru, srm


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    harness.url = f"sqlite:///{tmp_path}/k.db"
    yield harness
    harness.store.close()


def _trace(h, capsys, *args):
    capsys.readouterr()
    assert main(["trace", *args, "--store", h.url, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trace_of_a_letter_released_two_days_later_shows_the_mdm_built_from_it(h, capsys):
    """A letter held for its request (which came two days later, after a weekend) was
    released and its MDM^T02 queued for the archive; trace must list that MDM and its delivery."""
    letter = h.receive(oru())
    h.reactor.advance(2 * 86_400)
    h.receive(srm())
    (mdm,) = [m for m in h.store.list_messages(limit=100) if m.origin_id == letter]
    found = _trace(h, capsys, str(letter))
    assert [b["id"] for b in found["built"]] == [mdm.id], found["built_search_complete"]
    assert [d["message"] for d in found["deliveries"]] == [mdm.id]


def test_trace_of_a_request_on_a_busy_day_still_finds_the_siu_built_from_it(h, capsys):
    """About 10,000 messages a day on zorgdomein-in (a busy hospital) follow the request
    within 24 h. The SIU^S12 was built from it 0 s later, yet trace pages through the window
    newest first, gives up after 10,000 rows and never reaches it: "did the HIS get it?"
    stays unanswered for every message older than a few hours."""
    request = h.receive(srm())
    (siu,) = [m for m in h.store.list_messages(limit=10) if m.origin_id == request]
    start = h.reactor.seconds()
    for chunk in range(0, 10_100, 1_000):
        h.store.write([Append(message=received(f"FILL{i}", received_at=start + 1 + i * 8, duplicate_window=0,
                                               targets=()))
                       for i in range(chunk, min(chunk + 1_000, 10_100))])
    found = _trace(h, capsys, str(request))
    assert [b["id"] for b in found["built"]] == [siu.id]
    assert found["built_search_complete"] is True
    assert [d["message"] for d in found["deliveries"]] == [siu.id]


def test_admin_message_detail_of_a_built_message_claims_no_unreadable_ack(tmp_path):
    """An SIU^S12 Koppel built (stored as the processor stores it: ack b"") never had an
    ACK; the API must not tell on-call it holds an "unreadable acknowledgement"."""
    from tests.test_admin import World

    world = World(tmp_path)
    try:
        siu_raw = b"MSH|^~\\&|KOPPEL|ZIEKENHUIS|HIS|ZIEKENHUIS|20261201090000||SIU^S12^SIU_S12|K1-1|P|2.5\rSCH|ZD001\r"
        (built,) = world.store.write([Append(message=received(
            "K1-1", raw=siu_raw, peer="koppel", sender="KOPPEL|ZIEKENHUIS", message_type="SIU^S12",
            structure="SIU_S12", version="2.5", ack=b"", ack_code="AA", duplicate_window=0.0,
            origin_id=world.ids["m1"], targets=()))])
        answer = world.call("GET", f"/api/messages/{built.message_id}")
        assert answer.code == 200 and answer.json["origin_id"] == world.ids["m1"]
        assert answer.json["ack"] is None, answer.json["ack"]
    finally:
        world.close()


ACK_AA = b"MSH|^~\\&|HIX||KOPPEL||20261123120000||ACK^S12^ACK|A1|P|2.5\rMSA|AA|K1\r"


def test_trace_row_of_a_delivered_siu_does_not_show_the_error_of_an_earlier_attempt(h, capsys):
    """The HIS was down (connection refused), came back and acknowledged AA. The row reads
    "delivered ... AA connection refused": the RUNBOOK promises "the ACK code or the error",
    and on-call reads a current failure into a delivered message."""
    from engine.store import MarkDelivered, RecordFailure

    request = h.receive(srm())
    (siu,) = [m for m in h.store.list_messages(limit=10) if m.origin_id == request]
    (entry,) = h.store.entries_of_messages([siu.id])
    now = h.reactor.seconds()
    h.store.write([RecordFailure(entry_id=entry.id, error="connection refused", ack=None,
                                 next_attempt_at=now + 1, at=now)])
    h.store.write([MarkDelivered(entry_id=entry.id, ack=ACK_AA, at=now + 5)])
    capsys.readouterr()
    assert main(["trace", str(request), "--store", h.url]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{siu.id} ")]
    assert "delivered" in row and "AA" in row
    assert "connection refused" not in row, row


ACK_AR = b"MSH|^~\\&|ARCHIVE||KOPPEL||20261123120000||ACK^T02^ACK|A2|P|2.5\rMSA|AR|K2|unknown patient\r"


def test_trace_row_of_a_replayed_dead_letter_dates_the_ar_when_it_came_not_when_it_was_replayed(h, capsys):
    """The archive refused the MDM^T02 (AR) at 09:00; on-call replayed it an hour later. The
    old entry's row reads "replayed  <replay time>  AR destination answered AR": as if the
    archive refused it again at the moment of the replay."""
    import time as _time

    from engine.store import DeadLetter, ReplayDeadLetters

    h.receive(srm())
    letter = h.receive(oru())
    (mdm,) = [m for m in h.store.list_messages(limit=10) if m.origin_id == letter]
    (entry,) = h.store.entries_of_messages([mdm.id])
    refused_at = h.reactor.seconds() + 2
    h.store.write([DeadLetter(entry_id=entry.id, reason="destination answered AR", ack=ACK_AR, at=refused_at)])
    h.store.write([ReplayDeadLetters(entry_ids=(entry.id,), at=refused_at + 3_600)])
    capsys.readouterr()
    assert main(["trace", str(letter), "--store", h.url]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{mdm.id} ")]
    (replayed,) = [row for row in rows if " replayed " in row]
    assert "AR" in replayed
    assert _time.strftime("%Y-%m-%d %H:%M:%SZ", _time.gmtime(refused_at)) in replayed, replayed

