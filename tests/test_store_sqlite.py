"""The SQLite message store: durable appends, duplicates, queues, operator actions, migrations."""

from __future__ import annotations

import dataclasses
import os
import hashlib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.store import (
    Append,
    AppendResult,
    DeadLetter,
    DropDeadLetters,
    Enqueue,
    MarkDelivered,
    Prune,
    PruneResult,
    QueueTarget,
    ReceivedMessage,
    RecordFailure,
    ReplayDeadLetters,
    RetryNow,
    SetPaused,
    StoreBusy,
    StoreError,
    migrations,
    open_store,
    write_one,
)
from engine.store.sqlite import WRITER_CHECKPOINT_PAGES, SQLiteStore, parse_sqlite_url
from tests.factories import DAY, HIX, T0, received, referral

RIS = QueueTarget(queue="10.1.2.4:7000", destination="ris")


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(f"sqlite:{tmp_path}/var/koppel.db")
    yield s
    s.close()


def append(store, message: ReceivedMessage) -> AppendResult:
    result = write_one(store, Append(message=message))
    assert isinstance(result, AppendResult)
    return result


# --------------------------------------------------------------------------- opening


def test_open_store_creates_parent_directories_and_uses_wal(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/a/b/koppel.db")
    try:
        assert (tmp_path / "a" / "b" / "koppel.db").exists()
        conn = sqlite3.connect(tmp_path / "a" / "b" / "koppel.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        store.close()


def test_relative_sqlite_url_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_store("sqlite:var/koppel.db").close()
    assert (tmp_path / "var" / "koppel.db").exists()


def test_commits_leave_the_log_to_the_background_checkpoint(tmp_path):
    """A commit copies the log into the database itself only past WRITER_CHECKPOINT_PAGES, not
    at SQLite's default of 1000 pages, which load reaches between two background checkpoints."""
    store = open_store(f"sqlite:{tmp_path}/k.db?synchronous=normal")
    try:
        filler = b"NTE|1||" + b"x" * 5000 + b"\r"
        for batch in range(300):  # 1,200 messages of ~5 KB: well past 1000 pages of log
            store.write([Append(message=received(f"C{batch}-{i}", raw=referral(f"C{batch}-{i}") + filler))
                         for i in range(4)])
        _, log_frames, copied = store._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert 1000 < log_frames < WRITER_CHECKPOINT_PAGES
        assert copied == log_frames  # all still in the log until this checkpoint copied them
    finally:
        store.close()


def test_synchronous_defaults_to_full_and_normal_can_be_asked_for(tmp_path):
    assert parse_sqlite_url("sqlite:x.db").synchronous == "FULL"
    store = open_store(f"sqlite:{tmp_path}/k.db?synchronous=normal")
    try:
        assert isinstance(store, SQLiteStore)
        assert store.config.synchronous == "NORMAL"
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        store.close()


@pytest.mark.parametrize(
    "url, words",
    [
        ("postgresql://db/koppel", "unknown store scheme"),
        ("var/koppel.db", "no scheme"),
        ("sqlite::memory:", "file path"),
        ("sqlite://host/koppel.db", "names a host"),
        ("sqlite:k.db?synchronous=OFF", "synchronous"),
        ("sqlite:k.db?journal=delete", "unknown option"),
    ],
)
def test_a_store_url_it_cannot_serve_is_refused_with_a_clear_message(url, words):
    with pytest.raises(ValueError, match=words):
        open_store(url)


# --------------------------------------------------------------------------- append and read


def test_an_appended_message_reads_back_with_its_exact_raw_bytes_and_fields(store):
    message = received(raw=referral() + b"\x1c\r\xff\x00 trailing")
    result = append(store, message)
    assert result.duplicate_of is None
    assert result.ack == message.ack
    stored = store.get_message(result.message_id)
    assert stored is not None
    assert stored.raw == message.raw
    assert stored.size == len(message.raw)
    assert stored.payload_hash == message.payload_hash
    assert stored.ack == message.ack
    for field in ("channel", "peer", "received_at", "control_id", "sender", "message_type",
                  "structure", "version", "processing_id", "charset", "status", "ack_code", "error"):
        assert getattr(stored, field) == getattr(message, field), field
    assert stored.duplicate_count == 0


def test_get_message_of_an_unknown_id_is_none(store):
    assert store.get_message(12345) is None


def test_list_messages_filters_and_lists_newest_first_without_bodies(store):
    a = append(store, received("A1", received_at=T0)).message_id
    b = append(store, received("B1", received_at=T0 + 10, channel="other")).message_id
    c = append(store, received("C1", received_at=T0 + 20, status="rejected")).message_id
    assert [m.id for m in store.list_messages()] == [c, b, a]
    assert [m.id for m in store.list_messages(channel="other")] == [b]
    assert [m.id for m in store.list_messages(control_id="A1")] == [a]
    assert [m.id for m in store.list_messages(status="rejected")] == [c]
    assert [m.id for m in store.list_messages(since=T0 + 10)] == [c, b]
    assert [m.id for m in store.list_messages(until=T0 + 10)] == [a]
    assert [m.id for m in store.list_messages(message_type="ORU^R01")] == []
    assert [m.id for m in store.list_messages(limit=1)] == [c]
    assert not hasattr(store.list_messages()[0], "raw")


# --------------------------------------------------------------------------- duplicates


def test_a_resent_message_within_the_window_gets_the_first_ack_and_id_and_is_counted(store):
    first = append(store, received(ack=b"first ack"))
    again = append(store, received(received_at=T0 + 60, ack=b"a different ack"))
    assert again == AppendResult(message_id=first.message_id, duplicate_of=first.message_id, ack=b"first ack")
    assert len(store.list_messages()) == 1
    stored = store.get_message(first.message_id)
    assert stored.duplicate_count == 1
    assert stored.last_duplicate_at == T0 + 60
    assert store.queue_depths() == {HIX.queue: 1}  # the duplicate queued nothing


def test_the_same_control_id_with_a_different_payload_is_not_a_duplicate(store):
    # ZorgDomein reuses MSH-10 (the ZD number) for every document of one referral.
    first = append(store, received("ZD42", raw=referral("ZD42", "brief 1")))
    second = append(store, received("ZD42", raw=referral("ZD42", "brief 2")))
    assert second.duplicate_of is None
    assert second.message_id != first.message_id
    assert store.queue_depths() == {HIX.queue: 2}


def test_the_same_payload_from_another_sender_or_channel_is_not_a_duplicate(store):
    append(store, received())
    assert append(store, received(sender="Other|APP")).duplicate_of is None
    assert append(store, received(channel="other-in")).duplicate_of is None


def test_a_resend_after_the_window_is_stored_again(store):
    append(store, received(received_at=T0, duplicate_window=3600))
    late = append(store, received(received_at=T0 + 3601, duplicate_window=3600))
    assert late.duplicate_of is None
    assert len(store.list_messages()) == 2


def test_a_zero_window_turns_duplicate_detection_off(store):
    append(store, received(duplicate_window=0))
    assert append(store, received(received_at=T0 + 1, duplicate_window=0)).duplicate_of is None


def test_duplicates_inside_one_batch_are_found(store):
    results = store.write([Append(message=received(ack=b"ack 1")), Append(message=received(received_at=T0 + 1))])
    assert results[1].duplicate_of == results[0].message_id
    assert results[1].ack == b"ack 1"
    assert store.get_message(results[0].message_id).duplicate_count == 1
    assert store.queue_depths() == {HIX.queue: 1}


def test_rejected_messages_are_stored_but_never_deduplicated_or_queued(store):
    one = append(store, received(status="rejected"))
    two = append(store, received(status="rejected"))
    assert one.duplicate_of is None and two.duplicate_of is None
    assert one.message_id != two.message_id
    assert store.get_message(one.message_id).status == "rejected"
    # ...nor do they count as the first copy of a later accepted message
    accepted = append(store, received())
    assert accepted.duplicate_of is None
    assert store.queue_depths() == {HIX.queue: 1}


def test_a_rejected_message_cannot_carry_queue_targets():
    with pytest.raises(ValueError):
        dataclasses.replace(received(status="rejected"), targets=(HIX,))


# --------------------------------------------------------------------------- transactions


def test_a_failing_op_rolls_back_the_whole_batch_and_raises_store_error(store):
    before = append(store, received("KEEP"))
    with pytest.raises(StoreError) as caught:
        store.write([
            Append(message=received("LOST1")),
            MarkDelivered(entry_id=1, ack=b"AA", at=T0),
            Enqueue(message_id=999_999, targets=(RIS,), at=T0),  # no such message
        ])
    assert "123456782" not in str(caught.value)
    assert [m.id for m in store.list_messages()] == [before.message_id]
    assert store.queue_depths() == {HIX.queue: 1}
    assert store.get_entry(1).state == "pending"
    # and the store is still usable afterwards
    assert append(store, received("NEXT")).duplicate_of is None


def test_an_unexpected_exception_inside_a_batch_also_rolls_back_as_store_error(store):
    class Boom:  # not an op at all: a programming error must still not half-commit
        pass

    with pytest.raises(StoreError, match="unsupported"):
        store.write([Append(message=received("LOST")), Boom()])  # type: ignore[list-item]
    assert store.list_messages() == []


def test_results_align_with_ops(store):
    results = store.write([
        Append(message=received("A")),
        SetPaused(queue=HIX.queue, paused=True),
        Append(message=received("B", status="rejected")),
        RetryNow(queue=HIX.queue),
    ])
    assert isinstance(results[0], AppendResult)
    assert results[1] is None
    assert isinstance(results[2], AppendResult)
    assert results[3] == 0
    assert store.write([]) == []


# --------------------------------------------------------------------------- queues


def fill(store, n: int, targets=(HIX,)) -> list[int]:
    results = store.write([Append(message=received(f"M{i}", received_at=T0 + i, targets=targets)) for i in range(n)])
    return [r.message_id for r in results]


def test_every_target_of_an_accepted_message_gets_a_queue_entry_in_the_same_transaction(store):
    [mid] = fill(store, 1, targets=(HIX, RIS))
    assert store.queue_depths() == {HIX.queue: 1, RIS.queue: 1}
    [entry] = store.queue_head(RIS.queue, 10)
    assert entry.message_id == mid
    assert entry.destination == "ris"
    assert entry.raw == store.get_message(mid).raw
    assert entry.attempts == 0 and entry.next_attempt_at == 0 and entry.enqueued_at == T0


def test_the_queue_head_is_pending_entries_in_fifo_order_in_pages(store):
    ids = fill(store, 7)
    page1 = store.queue_head(HIX.queue, 3)
    assert [e.message_id for e in page1] == ids[:3]
    page2 = store.queue_head(HIX.queue, 3, after_id=page1[-1].id)
    assert [e.message_id for e in page2] == ids[3:6]
    assert store.queue_head("nowhere:1", 3) == []


def test_a_delivered_entry_leaves_the_head_and_is_counted(store):
    fill(store, 2)
    head = store.queue_head(HIX.queue, 10)
    assert write_one(store, MarkDelivered(entry_id=head[0].id, ack=b"MSA|AA", at=T0 + 5)) is True
    assert [e.id for e in store.queue_head(HIX.queue, 10)] == [head[1].id]
    done = store.get_entry(head[0].id)
    assert done.state == "delivered" and done.last_ack == b"MSA|AA" and done.done_at == T0 + 5
    [stats] = store.queue_stats(now=T0 + 100)
    assert stats.depth == 1 and stats.delivered_count == 1
    # delivering it twice changes nothing
    assert write_one(store, MarkDelivered(entry_id=head[0].id, ack=b"again", at=T0 + 6)) is False
    assert store.queue_stats(now=T0)[0].delivered_count == 1


def test_a_failure_keeps_the_entry_at_the_head_with_its_attempt_and_error(store):
    fill(store, 2)
    head = store.queue_head(HIX.queue, 1)[0]
    write_one(store, RecordFailure(entry_id=head.id, error="ACK timeout", ack=None, next_attempt_at=T0 + 1, at=T0))
    write_one(store, RecordFailure(entry_id=head.id, error="AE from peer", ack=b"MSA|AE", next_attempt_at=T0 + 3, at=T0 + 1))
    again = store.queue_head(HIX.queue, 1)[0]
    assert again.id == head.id
    assert again.attempts == 2
    assert again.last_error == "AE from peer" and again.last_ack == b"MSA|AE"
    assert again.next_attempt_at == T0 + 3 and again.last_attempt_at == T0 + 1
    [stats] = store.queue_stats(now=T0 + 10)
    assert stats.last_error == "AE from peer"
    assert stats.oldest_enqueued_at == T0 and stats.oldest_age == 10


def test_retry_now_makes_a_waiting_head_due_immediately(store):
    fill(store, 2)
    head = store.queue_head(HIX.queue, 1)[0]
    write_one(store, RecordFailure(entry_id=head.id, error="refused", ack=None, next_attempt_at=T0 + 300, at=T0))
    assert write_one(store, RetryNow(queue=HIX.queue)) == 1
    assert store.queue_head(HIX.queue, 1)[0].next_attempt_at == 0


def test_a_queue_can_be_paused_and_resumed_even_before_it_has_entries(store):
    assert store.is_paused(HIX.queue) is False
    write_one(store, SetPaused(queue=HIX.queue, paused=True))
    assert store.is_paused(HIX.queue) is True
    fill(store, 1)
    assert store.queue_stats(now=T0)[0].paused is True
    assert len(store.queue_head(HIX.queue, 10)) == 1  # pausing holds the sender, not the data
    write_one(store, SetPaused(queue=HIX.queue, paused=False))
    assert store.is_paused(HIX.queue) is False


def test_a_dead_letter_leaves_the_queue_and_can_be_listed_and_shown(store):
    fill(store, 2)
    head = store.queue_head(HIX.queue, 1)[0]
    assert write_one(store, DeadLetter(entry_id=head.id, reason="AR: unknown patient", ack=b"MSA|AR", at=T0 + 9)) is True
    assert store.queue_depths() == {HIX.queue: 1}
    [dead] = store.list_dead_letters()
    assert dead.id == head.id and dead.state == "dead"
    assert dead.last_error == "AR: unknown patient" and dead.last_ack == b"MSA|AR"
    assert store.list_dead_letters(RIS.queue) == []
    assert store.get_entry(head.id).raw is None  # a listing read: the body is get_message(message_id)
    [stats] = store.queue_stats(now=T0)
    assert stats.dead_count == 1 and stats.last_error == "AR: unknown patient"


def test_replaying_dead_letters_puts_them_at_the_tail_in_their_order(store):
    fill(store, 4)
    first, second, *rest = store.queue_head(HIX.queue, 10)
    store.write([
        DeadLetter(entry_id=first.id, reason="AR", ack=None, at=T0),
        DeadLetter(entry_id=second.id, reason="AR", ack=None, at=T0),
    ])
    new_ids = write_one(store, ReplayDeadLetters(queue=HIX.queue, at=T0 + 50))
    assert len(new_ids) == 2
    head = store.queue_head(HIX.queue, 10)
    assert [e.message_id for e in head] == [e.message_id for e in rest] + [first.message_id, second.message_id]
    assert head[-2].replay_of == first.id and head[-2].enqueued_at == T0 + 50
    assert store.get_entry(first.id).state == "replayed"
    assert store.list_dead_letters() == []
    assert store.queue_stats(now=T0)[0].dead_count == 0
    assert [a.action for a in store.list_audit()] == ["replay", "replay"]


def test_replaying_by_id_touches_only_those_dead_entries(store):
    fill(store, 3)
    a, b, c = store.queue_head(HIX.queue, 10)
    store.write([DeadLetter(entry_id=e.id, reason="AR", ack=None, at=T0) for e in (a, b)])
    (new,) = write_one(store, ReplayDeadLetters(entry_ids=(b.id, c.id), at=T0))  # c is not dead
    assert store.get_entry(new).replay_of == b.id
    assert [e.id for e in store.list_dead_letters()] == [a.id]


def test_dropping_dead_letters_keeps_the_reason_in_the_audit_log(store):
    fill(store, 2)
    a, b = store.queue_head(HIX.queue, 10)
    write_one(store, DeadLetter(entry_id=a.id, reason="AR", ack=None, at=T0))
    assert write_one(store, DropDeadLetters(entry_ids=(a.id, b.id), reason="patient merged, ticket 7", at=T0 + 1)) == (a.id,)
    assert store.get_entry(a.id).state == "dropped"
    assert store.get_entry(b.id).state == "pending"  # only dead entries can be dropped
    [record] = store.list_audit()
    assert (record.action, record.entry_id, record.message_id, record.queue, record.reason, record.at) == (
        "drop", a.id, a.message_id, HIX.queue, "patient merged, ticket 7", T0 + 1)
    assert store.queue_stats(now=T0)[0].dead_count == 0


def test_resending_a_stored_message_queues_it_again_and_is_audited(store):
    [mid] = fill(store, 1)
    new_ids = write_one(store, Enqueue(message_id=mid, targets=(RIS,), at=T0 + 5))
    [entry] = store.queue_head(RIS.queue, 10)
    assert new_ids == (entry.id,) and entry.message_id == mid and entry.enqueued_at == T0 + 5
    assert store.list_audit()[0].action == "resend"


def test_a_rejected_message_cannot_be_resent(store):
    mid = append(store, received(status="rejected")).message_id
    with pytest.raises(StoreError, match="rejected"):
        write_one(store, Enqueue(message_id=mid, targets=(RIS,), at=T0))


def test_queue_depth_counters_match_the_entries_after_a_mixed_history(store):
    fill(store, 10, targets=(HIX, RIS))
    head = store.queue_head(HIX.queue, 10)
    store.write([MarkDelivered(entry_id=e.id, ack=b"", at=T0) for e in head[:3]]
                + [DeadLetter(entry_id=e.id, reason="x", ack=None, at=T0) for e in head[3:5]])
    write_one(store, ReplayDeadLetters(entry_ids=(head[3].id,), at=T0))
    write_one(store, DropDeadLetters(entry_ids=(head[4].id,), reason="r", at=T0))
    counted = dict(store._conn().execute(
        "SELECT queue, count(*) FROM queue_entries WHERE state = 'pending' GROUP BY queue").fetchall())
    assert store.queue_depths() == counted == {HIX.queue: 6, RIS.queue: 10}


# --------------------------------------------------------------------------- prune


def test_prune_removes_finished_entries_and_unreferenced_old_messages_only(store):
    ids = fill(store, 4)
    rejected = append(store, received("R", status="rejected", received_at=T0)).message_id
    e = store.queue_head(HIX.queue, 10)
    store.write([
        MarkDelivered(entry_id=e[0].id, ack=b"", at=T0 + 10),
        MarkDelivered(entry_id=e[1].id, ack=b"", at=T0 + 1000),  # finished, but too recently
        DeadLetter(entry_id=e[2].id, reason="AR", ack=None, at=T0 + 10),
    ])
    result = write_one(store, Prune(before=T0 + 500))
    assert result == PruneResult(entries=1, messages=2)
    assert store.get_entry(e[0].id) is None and store.get_message(ids[0]) is None
    assert store.get_message(rejected) is None
    assert store.get_message(ids[1]) is not None  # its delivered entry is still kept
    assert store.get_message(ids[2]) is not None  # dead letter keeps its body
    assert store.get_message(ids[3]) is not None  # still pending
    assert store.queue_stats(now=T0)[0].delivered_count == 2  # a running total


def test_prune_works_in_bounded_steps(store):
    fill(store, 5)
    store.write([MarkDelivered(entry_id=e.id, ack=b"", at=T0) for e in store.queue_head(HIX.queue, 10)])
    steps = []
    while True:
        result = write_one(store, Prune(before=T0 + DAY, limit=2))
        steps.append((result.entries, result.messages))
        if result.entries < 2 and result.messages < 2:
            break
    assert steps == [(2, 2), (2, 2), (1, 1)]
    assert store.list_messages() == []


# --------------------------------------------------------------------------- durability and threads


def test_data_survives_close_and_reopen(tmp_path):
    url = f"sqlite:{tmp_path}/koppel.db"
    store = open_store(url)
    mid = append(store, received()).message_id
    write_one(store, SetPaused(queue=HIX.queue, paused=True))
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.get_message(mid)
    again = open_store(url)
    try:
        assert again.get_message(mid).raw == referral()
        assert again.queue_depths() == {HIX.queue: 1}
        assert again.is_paused(HIX.queue)
        assert append(again, received(received_at=T0 + 1)).duplicate_of == mid
    finally:
        again.close()


def test_a_reader_thread_reads_committed_data_while_the_writer_writes(store):
    """WAL: readers never wait for the writer and never see a half-written batch."""
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                depth = store.queue_depths().get(HIX.queue, 0)
                assert depth % 10 == 0  # batches of 10 commit all or nothing
                seen.append(depth)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for batch in range(30):
            store.write([Append(message=received(f"B{batch}-{i}", received_at=T0 + batch)) for i in range(10)])
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert seen and seen == sorted(seen)
    assert store.queue_depths() == {HIX.queue: 300}


def test_each_thread_gets_its_own_connection(store):
    conns = []
    t = threading.Thread(target=lambda: conns.append(store._conn()))
    t.start()
    t.join()
    assert conns[0] is not store._conn()


def test_another_process_can_read_and_write_while_the_store_is_open(store, tmp_path):
    mid = append(store, received()).message_id
    code = (
        "import sys; from engine.store import open_store, SetPaused\n"
        f"s = open_store('sqlite:{tmp_path}/var/koppel.db')\n"
        f"assert s.get_message({mid}) is not None\n"
        f"s.write([SetPaused(queue='{HIX.queue}', paused=True)]); s.close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert store.is_paused(HIX.queue)


# --------------------------------------------------------------------------- migrations


def test_a_new_store_is_at_the_latest_schema_version(store):
    assert store.schema_version() == migrations.LATEST == len(migrations.MIGRATIONS)


def test_an_old_version_store_is_migrated_on_open_and_keeps_its_data(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrations.migrate(conn, migrations.MIGRATIONS[:1]) == 1
    raw = referral()
    conn.execute(
        "INSERT INTO messages (channel, peer, received_at, control_id, sender, size, payload_hash,"
        " status, ack_code, ack, raw) VALUES ('zorgdomein-in', '127.0.0.1:1', ?, 'ZD123',"
        " 'ZorgDomein|ZD', ?, ?, 'accepted', 'AA', x'00', ?)",
        (T0, len(raw), hashlib.sha256(raw).digest(), raw),
    )
    conn.close()
    store = open_store(f"sqlite:{path}")
    try:
        assert store.schema_version() == migrations.LATEST
        assert store.get_message(1).raw == raw
        assert append(store, received(received_at=T0 + 1)).duplicate_of == 1
        fill(store, 1)
        assert store.queue_depths() == {HIX.queue: 1}
    finally:
        store.close()


def test_migrating_twice_is_harmless(tmp_path):
    conn = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    assert migrations.migrate(conn) == migrations.LATEST
    assert migrations.migrate(conn) == migrations.LATEST
    assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == migrations.LATEST
    conn.close()


def test_a_store_from_a_newer_koppel_refuses_to_open(tmp_path):
    path = tmp_path / "new.db"
    open_store(f"sqlite:{path}").close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO schema_version (version, applied_at, why) VALUES (99, 0, 'future')")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        open_store(f"sqlite:{path}")


def test_the_store_package_does_not_import_twisted():
    code = "import sys, engine.store, engine.store.sqlite; assert 'twisted' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_many_deliveries_in_one_transaction_are_each_recorded_and_counted_once(store):
    results = store.write([Append(message=received(f"D{i}")) for i in range(650)])
    entries = store.queue_head(HIX.queue, 1000)
    assert len(entries) == 650
    first = entries[0].id
    ops = [MarkDelivered(entry_id=e.id, ack=b"ACK" + str(e.id).encode(), at=T0 + 1) for e in entries]
    ops.insert(10, MarkDelivered(entry_id=first, ack=b"again", at=T0 + 2))  # the same entry twice
    out = store.write(ops)
    assert out.count(True) == 650 and out.count(False) == 1
    assert out[10] is False
    assert store.queue_depths()[HIX.queue] == 0
    (stats,) = store.queue_stats(T0 + 3)
    assert stats.delivered_count == 650
    assert store.get_entry(entries[500].id).last_ack == b"ACK" + str(entries[500].id).encode()
    assert store.get_entry(first).last_ack.startswith(b"ACK")
    assert len(results) == 650


def test_a_delivery_is_applied_before_a_later_op_in_the_same_transaction_reads_it(store):
    store.write([Append(message=received("E1"))])
    (entry,) = store.queue_head(HIX.queue, 10)
    delivered, failed = store.write([
        MarkDelivered(entry_id=entry.id, ack=b"AA", at=T0 + 1),
        RecordFailure(entry_id=entry.id, error="late", ack=None, next_attempt_at=T0 + 9, at=T0 + 2),
    ])
    assert (delivered, failed) == (True, False)  # the failure finds it delivered, as if applied in order
    assert store.get_entry(entry.id).state == "delivered"


def test_a_write_that_must_not_wait_is_told_busy_at_once_while_another_process_writes(tmp_path):
    url = f"sqlite:///{tmp_path}/k.db?busy_timeout=0.3"
    store, other = open_store(url), open_store(url)
    try:
        other._conn().execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(StoreBusy):
            store.write([Append(message=received("C1"))], wait=False)
        assert time.monotonic() - started < 0.1  # not after busy_timeout
        store.list_messages()  # a read gets the configured timeout back
        assert store._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 300
        with pytest.raises(StoreError) as waited:  # a waiting write waits busy_timeout, then fails
            store.write([Append(message=received("C1"))])
        assert not isinstance(waited.value, StoreBusy)
        assert time.monotonic() - started >= 0.3
        other._conn().execute("COMMIT")
        (result,) = store.write([Append(message=received("C1"))], wait=False)
        assert store.list_messages() and result.message_id == store.list_messages()[0].id
    finally:
        store.close()
        other.close()


def test_a_run_of_writes_that_must_not_wait_sets_the_busy_timeout_once(tmp_path):
    """The engine's committer writes with wait=False every turn: no PRAGMA pair per commit."""
    store = open_store(f"sqlite:///{tmp_path}/k.db?busy_timeout=0.3")
    try:
        statements: list[str] = []
        store._conn().set_trace_callback(statements.append)
        for n in range(3):
            store.write([Append(message=received(f"C{n}"))], wait=False)
        assert [s for s in statements if "busy_timeout" in s] == ["PRAGMA busy_timeout = 0"]
        store.write([Append(message=received("C9"))])  # a waiting write waits again
        assert [s for s in statements if "busy_timeout" in s][-1] == "PRAGMA busy_timeout = 300"
    finally:
        store.close()


def test_a_new_store_is_readable_by_its_owner_only_whatever_the_umask(tmp_path):
    """`koppel run` on a bare machine (umask 022) made var/ 0755 and koppel.db 0644: every
    local user could read the referrals. An existing file keeps the mode the operator gave it."""
    import stat as stat_module

    old = os.umask(0o022)
    try:
        store = open_store(f"sqlite:///{tmp_path}/var/koppel.db")
        store.write([Append(message=received("C1"))])
        wal_modes = [stat_module.S_IMODE((tmp_path / "var" / f"koppel.db-{n}").stat().st_mode) for n in ("wal", "shm")]
        store.close()
        existing = tmp_path / "shared.db"
        existing.touch(mode=0o640)
        open_store(f"sqlite:///{existing}").close()
    finally:
        os.umask(old)
    mode = lambda p: stat_module.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "var") == 0o700
    assert mode(tmp_path / "var" / "koppel.db") == 0o600
    assert wal_modes == [0o600, 0o600]  # SQLite gives them the database file's mode
    assert mode(existing) == 0o640
