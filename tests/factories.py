"""One factory for what many tests need and few care about: a plausible received message.

A test names only the fields it is about (``received("ZD42", status="rejected")``); the rest
is filled in here, once, so a new field on ``ReceivedMessage`` is one edit, not six. A test
that deliberately builds an odd message builds it itself.

All data is synthetic: a made-up patient with the test BSN 123456782 (passes the 11-proof,
belongs to nobody).
"""

from __future__ import annotations

import hashlib

from engine.store import QueueTarget, ReceivedMessage

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY = 86_400.0
TEST_BSN = "123456782"
TEST_NAME = "Testpatiënt"  # non-ASCII on purpose: raw bytes stay latin-1
HIX = QueueTarget(queue="10.1.2.3:6661", destination="hix-agenda")


def referral(control_id: str = "ZD123", note: str = "verwijzing", *, sender: str = "ZorgDomein|ZD") -> bytes:
    """A synthetic SRM^S01 for the test patient, latin-1 encoded (so it has a non-ASCII byte)."""
    return (
        f"MSH|^~\\&|{sender}|HIX|ZIEKENHUIS|20240101120000||SRM^S01^SRM_S01|{control_id}|P|2.4"
        "|||||NLD|8859/1\r"
        f"PID|1||{TEST_BSN}^^^NLMINBIZA^NNNLD||{TEST_NAME}^Jan||19800101|M\r"
        f"NTE|1||{note}\r"
    ).encode("latin-1")


def received(control_id: str | None = "ZD123", **fields) -> ReceivedMessage:
    """A received message as the listener stores it; any ``ReceivedMessage`` field can be given.

    Unless given, ``raw`` is a referral with this MSH-10 and ``payload_hash`` its hash, and the
    status decides the ACK code, the error and the targets (a rejected message has none).
    """
    status = fields.get("status", "accepted")
    accepted = status == "accepted"
    raw = fields["raw"] if "raw" in fields else referral(control_id or "")
    defaults = dict(
        channel="zorgdomein-in",
        peer="127.0.0.1:40000",
        received_at=T0,
        control_id=control_id,
        sender="ZorgDomein|ZD",
        message_type="SRM^S01",
        structure="SRM_S01",
        version="2.4",
        processing_id="P",
        charset="8859/1",
        raw=raw,
        payload_hash=hashlib.sha256(raw).digest(),
        status=status,
        ack_code="AA" if accepted else "AR",
        ack=b"MSH|^~\\&|ACK for " + (control_id or "?").encode(),
        error=None if accepted else "message type not accepted",
        duplicate_window=DAY,
        targets=(HIX,) if accepted else (),
    )
    return ReceivedMessage(**{**defaults, **fields})


def store_with_messages(tmp_path, count: int = 5) -> str:
    """The URL of a store at ``tmp_path/koppel.db`` holding ``count`` accepted messages for HIX."""
    from engine.store import Append, open_store, write_one

    store = open_store(f"sqlite:///{tmp_path}/koppel.db")
    try:
        for n in range(count):
            write_one(store, Append(message=received(f"ZD{n}", received_at=T0 + n, targets=(HIX,))))
    finally:
        store.close()
    return f"sqlite:///{tmp_path}/koppel.db"


def one_channel_bundle(directory, channel_yaml: str):
    """The bundle of a single channel file (``channel_yaml``) and no mappings, in ``directory``:
    what tests of start and reload checks need, without the bundled configuration."""
    from engine.bundle import load_bundle

    (directory / "mappings").mkdir(parents=True, exist_ok=True)
    (directory / "c.yaml").write_text(channel_yaml)
    return load_bundle(directory, directory / "mappings")


def corrupt_messages_table(path) -> None:
    """Overwrite the cell pointers of the messages table's root page, as a failing disk might
    (the schema and its version stay readable, so the store still opens)."""
    import sqlite3

    conn = sqlite3.connect(path)
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()
    (page,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page + 12)
        f.write(b"\xff" * 64)


def processor_for(harness, *, config=None, prefix: str = "KT-", **extra):
    """The mapping processor of an in-process harness (anything with ``bundle``, ``store``,
    ``committer``, ``reactor`` and ``metrics``), delivering to ``config``'s destinations (the
    harness's bundle's by default), its control ids starting with ``prefix``."""
    from engine.core.ack import ControlIds
    from engine.shell.processor import Processor

    config = config or harness.bundle.config
    return Processor(
        mappings=harness.bundle.mappings, book=harness.bundle.book, store=harness.store,
        committer=harness.committer, clock=harness.reactor, metrics=harness.metrics,
        destinations={d.name: d for d in config.destinations}, control_ids=ControlIds(prefix), **extra,
    )
