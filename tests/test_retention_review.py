"""Data lifecycle over months and upgrades (review): what retention pruning removes and keeps,
what a reload may change under it, and stores written by older schema versions.

Synthetic data only: the bundled ZorgDomein example messages (made-up names, no BSN) and the
factory's made-up referral.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from engine.shell.committer import GroupCommitter, Pruner
from engine.shell.engine import Engine
from engine.store import (
    Append,
    HoldEvent,
    MarkDelivered,
    Prune,
    ReleaseHeld,
    open_store,
)
from engine.store.migrations import MIGRATIONS, migrate
from tests.factories import HIX, T0, one_channel_bundle, received
from tests.test_processor import ZD, h, oru, srm  # noqa: F401 - h is a fixture

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400.0


def count(store, table: str) -> int:
    return store._query(f"SELECT count(*) FROM {table}")[0][0]


# --------------------------------------------------------------------------- released held events


def test_a_released_held_event_with_its_letter_and_keys_goes_once_older_than_the_retention(h):
    """A letter (ORU with a base64 PDF) before its request is held: the held event stores the
    mapped fields, the patient's and the whole PDF, as JSON. Once the request arrives it is
    released (the entry has the data, the attachment is stored by sha256), and nothing reads it
    again; yet it, and its correlation keys, stayed for ever, a copy of the patient's data and
    letter that outlived the message body retention prunes."""
    letter = h.receive(oru())
    assert h.outcome(letter)[0] == "held"
    (event,) = h.store._query("SELECT event FROM held_events")
    assert "JVBERi0" in event[0]  # the PDF itself, base64, inside the held event
    h.receive(srm())
    assert h.outcome(letter)[0] == "mapped" and h.store.held_events([f"zd:{ZD}"]) == []
    (entry,) = h.entries()
    still_held = h.store.write([HoldEvent(keys=("zd:ZD-NOT-YET",), message_id=letter, event="{}",
                                          at=h.reactor.seconds())])[0]

    (result,) = h.store.write([Prune(before=h.reactor.seconds() + 31 * DAY)])
    assert h.store._query("SELECT id FROM held_events") == [(still_held,)]  # an unreleased one stays
    assert h.store._query("SELECT key FROM held_keys") == [("zd:ZD-NOT-YET",)]
    assert result.held == 1
    assert [e.id for e in h.store.held_events(["zd:ZD-NOT-YET"])] == [still_held]
    # the entry keeps what the release gave it
    assert h.store.get_attachment(h.store.get_agenda_entry(entry.id).attachments[0]).data.startswith(b"%PDF")


def test_a_released_held_event_younger_than_the_retention_stays(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    try:
        held = store.write([HoldEvent(keys=("zd:ZD1",), message_id=1, event="{}", at=T0)])[0]
        store.write([ReleaseHeld(ids=(held,), at=T0 + 10 * DAY)])
        (result,) = store.write([Prune(before=T0 + 5 * DAY)])
        assert count(store, "held_events") == 1 and count(store, "held_keys") == 1
        assert result.held == 0
    finally:
        store.close()


def test_the_pruner_goes_on_while_released_held_events_fill_a_slice(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    try:
        ids = [store.write([HoldEvent(keys=(f"zd:ZD{i}",), message_id=i, event="{}", at=T0)])[0] for i in range(5)]
        store.write([ReleaseHeld(ids=tuple(ids), at=T0)])
        clock = MemoryReactorClock()
        clock.advance(T0 + 40 * DAY)
        pruner = Pruner(GroupCommitter(store, clock=clock), reactor=clock, retention=30 * DAY)
        pruner._prune_op = lambda before: Prune(before=before, limit=2)
        done = pruner.prune()
        for _ in range(20):
            clock.advance(0)
        assert done.called
        assert count(store, "held_events") == 0 and count(store, "held_keys") == 0
    finally:
        store.close()


# --------------------------------------------------------------------------- duplicate window vs retention


CHANNEL = """
name: zorgdomein-in
source:
  listen: tcp:0:interface=127.0.0.1
duplicates:
  window: {window}
destinations:
  hix-agenda:
    endpoint: tcp:host=127.0.0.1:port=6661
routes:
  - to: [hix-agenda]
"""


def bundle(tmp_path, window: str):
    return one_channel_bundle(tmp_path / window, CHANNEL.format(window=window))


def test_a_reload_cannot_raise_a_duplicate_window_above_the_retention(tmp_path):
    """The engine refuses at start a retention shorter than a duplicate window (a retried
    message would be stored and sent again once its first copy is pruned). A reload (SIGHUP)
    with `window: 60d` under `--retention 30d` was applied all the same: first copies went
    after 30 days while the channel still counted on them for 60."""
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    reactor = MemoryReactorClock()
    reactor.advance(T0)
    engine = Engine(reactor, bundle(tmp_path, "1d").config, store, retention=30 * DAY)
    engine.startService()
    try:
        failures = []
        engine.reload(bundle(tmp_path, "60d")).addErrback(failures.append)
        reactor.advance(0)
        assert len(failures) == 1 and "retention" in failures[0].getErrorMessage()
        assert [c.duplicate_window for c in engine.config.channels] == [DAY]  # the running config stays
        done = []
        engine.reload(bundle(tmp_path, "30d")).addBoth(done.append)  # as long as the retention: fine
        reactor.advance(0)
        assert [c.duplicate_window for c in engine.config.channels] == [30 * DAY]
    finally:
        engine.stopService()
        store.close()


# --------------------------------------------------------------------------- older schema versions


def old_store(path: Path, version: int) -> None:
    """A store as a Koppel of schema `version` left it, with a pending delivery, an agenda
    entry with its history and a held letter (where that version had them)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn, MIGRATIONS[:version], now=T0)
    for message_id in (1, 2):
        conn.execute(
            "INSERT INTO messages (channel, peer, received_at, control_id, size, payload_hash, status, ack_code, "
            "ack, raw) VALUES ('zorgdomein-in', '127.0.0.1:40000', ?, ?, 3, x'00', 'accepted', 'AA', x'00', x'414243')",
            (T0, f"C{message_id}"))
    conn.execute("INSERT INTO queues (queue, pending) VALUES (?, 1)", (HIX.queue,))
    conn.execute("INSERT INTO queue_entries (queue, destination, message_id, state, enqueued_at) "
                 "VALUES (?, ?, 1, 'pending', ?)", (HIX.queue, HIX.destination, T0))
    if version >= 3:
        conn.execute("UPDATE messages SET processing = 'held' WHERE id = 2")
        conn.execute("INSERT INTO held_events (message_id, event, held_at) VALUES (2, '{}', ?)", (T0,))
        conn.execute("INSERT INTO held_keys (key, held_id) VALUES ('zd:ZD9', 1)")
        conn.execute("INSERT INTO agenda_entries (agenda_id, kind, state, zd_number, data, created_at, updated_at) "
                     "VALUES ('cardiology', 'appointment-request', 'requested', 'ZD8', '{}', ?, ?)", (T0, T0))
        conn.execute("INSERT INTO agenda_keys (key, entry_id) VALUES ('zd:ZD8', 1)")
        conn.execute("INSERT INTO agenda_history (entry_id, at, message_id, action, to_state) "
                     "VALUES (1, ?, 1, 'create', 'requested')", (T0,))
    conn.close()


@pytest.mark.parametrize("version", range(2, MIGRATIONS[-1].version))
def test_a_store_of_an_older_schema_migrates_with_its_data_usable(tmp_path, version):
    path = tmp_path / "old.db"
    old_store(path, version)
    store = open_store(f"sqlite:///{path}")
    try:
        assert store.schema_version() == MIGRATIONS[-1].version
        (head,) = store.queue_head(HIX.queue)
        assert head.message_id == 1 and store.queue_depths() == {HIX.queue: 1}
        store.write([MarkDelivered(entry_id=head.id, ack=b"AA", at=T0 + 1)])  # the queue resumes
        assert store.queue_depths() == {HIX.queue: 0}
        if version >= 3:
            assert store.find_agenda_entry(["zd:ZD8"]).state == "requested"
            assert [x.action for x in store.agenda_history(1)] == ["create"]
            (held,) = store.held_events(["zd:ZD9"])
            assert store.write([ReleaseHeld(ids=(held.id,), at=T0 + 1)]) == [1]
        store.write([Append(message=received("NEW", received_at=T0 + 2))])
        (result,) = store.write([Prune(before=T0 + 40 * DAY)])
        assert store.get_message(1) is None  # delivered long ago: pruned like any other
    finally:
        store.close()
