"""Listing dead letters / a queue head (admin API and CLI) reads every listed message's raw body
into memory, although only headers are returned. ZorgDomein ORU/MDM messages carry base64 PDF
letters (max_message_bytes 64MiB in the bundled channel); GET /api/dead-letters?limit=1000 in the
engine process can then allocate gigabytes."""
import hashlib
import tracemalloc

import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock

from engine.config import load_config
from engine.shell.admin import AdminAPI
from engine.shell.engine import Engine
from engine.store import Append, DeadLetter, open_store, write_one
from tests.factories import T0, received
from tests.test_admin import CHANNEL, Recorder, inline_read
from tests.test_operator import RIS
from twisted.web.test.requesthelper import DummyRequest

BODY_MB = 2
N = 10


@pytest.fixture
def api(tmp_path):
    url = f"sqlite://{tmp_path}/k.db"
    store = open_store(url)
    pad = b"OBX|1|ED|PDF^Verwijsbrief||^AP^^Base64^" + b"A" * (BODY_MB << 20) + b"\r"
    for i in range(N):
        raw = (f"MSH|^~\\&|ZorgDomein|ZD|RIS|ZH|20240101||ORU^R01|ZD{i:03d}|P|2.4\r").encode() + pad
        m = write_one(store, Append(message=received(f"ZD{i:03d}", raw=raw, payload_hash=hashlib.sha256(raw).digest(),
                                                     targets=(RIS,), message_type="ORU^R01")))
        (entry,) = [e.id for e in store.queue_head(RIS.queue, 1, after_id=0) if e.message_id == m.message_id] or [None]
        write_one(store, DeadLetter(entry_id=entry, reason="destination answered AR", ack=None, at=T0 + i))
    (tmp_path / "ch").mkdir()
    (tmp_path / "ch" / "c.yaml").write_text(CHANNEL)
    engine = Engine(MemoryReactorClock(), load_config(tmp_path / "ch", tmp_path / "ch"), store, retention=None)
    clock = task.Clock()
    clock.advance(T0 + 100)
    yield AdminAPI(engine, token=None, read=inline_read, clock=clock, log=Recorder())
    store.close()


def get(api, path, **args):
    request = DummyRequest([s.encode() for s in path.strip("/").split("/")])
    request.method = b"GET"
    for k, v in args.items():
        request.args[k.encode()] = [v.encode()]
    request.render(api)
    assert request.finished
    return request


def test_listing_dead_letters_does_not_load_message_bodies(api):
    tracemalloc.start()
    try:
        answer = get(api, "/api/dead-letters", limit="1000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(b"".join(answer.written))
    assert answer.responseCode in (None, 200), (b"".join(answer.written), api.log.events)
    assert size < 50_000
    # The answer is a few KB of headers; the bodies (N x 4 MiB = 40 MiB) should never be read.
    assert peak < 8 << 20, f"peak {peak / 2**20:.0f} MiB allocated to list {N} dead letters ({size} bytes answered)"


def test_the_senders_once_a_second_poll_does_not_read_the_head_body(tmp_path):
    """QueueSender.poll() (every second, in the reactor thread) computes the oldest age from
    queue_head(queue, 1), which reads the whole raw body of the head entry."""
    from twisted.internet.testing import MemoryReactorClock

    url = f"sqlite://{tmp_path}/k.db"
    store = open_store(url)
    raw = b"MSH|^~\\&|ZorgDomein|ZD|RIS|ZH|20240101||ORU^R01|ZD1|P|2.4\rOBX|1|ED|" + b"A" * (16 << 20) + b"\r"
    write_one(store, Append(message=received("ZD1", raw=raw, payload_hash=hashlib.sha256(raw).digest(),
                                             targets=(RIS,), message_type="ORU^R01")))
    (tmp_path / "ch").mkdir()
    (tmp_path / "ch" / "c.yaml").write_text(CHANNEL)
    engine = Engine(MemoryReactorClock(), load_config(tmp_path / "ch", tmp_path / "ch"), store, retention=None)
    sender = engine.senders[RIS.queue]
    try:
        sender.poll()
        tracemalloc.start()
        sender.poll()  # what runs every second while the head waits (a destination down for hours)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        store.close()
    assert peak < 1 << 20, f"one poll allocated {peak / 2**20:.0f} MiB (the head's body)"


def test_the_senders_pages_still_carry_the_bodies_and_listings_do_not(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/k.db")
    try:
        raw = b"MSH|^~\\&|ZorgDomein|ZD|RIS|ZH|20240101||ORU^R01|ZD1|P|2.4\r"
        write_one(store, Append(message=received("ZD1", raw=raw, payload_hash=hashlib.sha256(raw).digest(),
                                                 targets=(RIS,), message_type="ORU^R01")))
        (page,) = store.queue_head(RIS.queue, 10)
        assert page.raw == raw
        (listed,) = store.queue_head(RIS.queue, 10, bodies=False)
        assert listed.raw is None and listed.control_id == "ZD1" and listed.id == page.id
        assert store.get_entry(page.id).raw is None
    finally:
        store.close()
