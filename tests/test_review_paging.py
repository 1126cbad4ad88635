"""Review of today's paging by bytes (sender pages, start-up resume, mapping batches) and of
emptied held events. Synthetic data only (test BSN 123456782)."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.shell import sender as sender_module
from engine.store import Append, HoldEvent, ReleaseHeld
from tests.factories import received
from tests.test_sender import QUEUE, Harness, hl7
from tests.test_sender import make  # noqa: F401 - the FIFO harness fixture
from tests.test_sender_unordered import building


def letter(control_id: str, size: int) -> bytes:
    """A synthetic ORU of about ``size`` bytes (an OBX of padding), MSH-10 ``control_id``."""
    base = hl7(control_id)
    return base + b"OBX|2|ED|PDF||" + b"A" * max(0, size - len(base) - 15) + b"\r"


def enqueue_letters(h: Harness, sizes: dict[str, int]) -> None:
    for control_id, size in sizes.items():
        h.store.write([Append(message=h.message(control_id, raw=letter(control_id, size)))])
        h.sender.enqueued(1)


@pytest.fixture
def unordered(tmp_path):
    yield from building(tmp_path, parallel=2)


# --------------------------------------------------------------------------- the store's page


def test_a_byte_bounded_page_ends_with_the_entry_that_reaches_the_bound(make):
    """queue_head(max_bytes): in id order, each entry taken while its predecessors come to less."""
    h = make()
    enqueue_letters(h, {"C1": 1000, "C2": 1000, "C3": 1000, "C4": 1000})
    size = len(letter("C1", 1000))
    page = h.store.queue_head(QUEUE, 100, max_bytes=2 * size)
    assert [e.control_id for e in page] == ["C1", "C2"]
    page = h.store.queue_head(QUEUE, 100, max_bytes=2 * size + 1)
    assert [e.control_id for e in page] == ["C1", "C2", "C3"]
    assert [e.control_id for e in h.store.queue_head(QUEUE, 100, after_id=page[-1].id, max_bytes=1)] == ["C4"]
    assert [e.control_id for e in h.store.queue_head(QUEUE, 2, max_bytes=10**9)] == ["C1", "C2"]


def test_a_byte_bounded_page_never_comes_back_empty_while_entries_wait(make):
    """The docstring's 'never fewer than one entry': a bound of 0 bytes still gives the head."""
    h = make()
    enqueue_letters(h, {"C1": 500, "C2": 500})
    assert [e.control_id for e in h.store.queue_head(QUEUE, 100, max_bytes=0)] == ["C1"]


# --------------------------------------------------------------------------- FIFO


def test_fifo_a_letter_larger_than_page_bytes_goes_alone_and_order_is_kept(make, monkeypatch):
    """A page of one letter larger than PAGE_BYTES, then small ones: all once, in order."""
    monkeypatch.setattr(sender_module, "PAGE_BYTES", 4000)
    h = make()
    sizes = {"C1": 300, "C2": 9000, "C3": 300, "C4": 3800, "C5": 300, "C6": 300}
    enqueue_letters(h, sizes)
    h.start()
    for _ in sizes:
        h.destination.answer("AA")
        h.run(0.001)
    h.run(1)
    assert h.destination.received() == list(sizes)
    assert h.states() == ["delivered"] * len(sizes)


def test_fifo_after_a_reset_a_cut_page_of_unsettled_entries_is_read_past(make, monkeypatch):
    """Delivered entries whose marks wait fill a page cut by bytes: the head is the next one."""
    monkeypatch.setattr(sender_module, "PAGE_BYTES", 4000)
    h = make()
    enqueue_letters(h, {"C1": 5000, "C2": 5000, "C3": 300})
    s = h.sender
    ids = [e.id for e in h.store.queue_head(QUEUE, 100, bodies=False)]
    s._unsettled = {ids[0]: (object(), None), ids[1]: (object(), None)}
    s._reset()
    assert s._head().control_id == "C3"


def test_fifo_pause_and_resume_on_a_cut_page_sends_nothing_twice(make, monkeypatch):
    """Paused mid-queue with pages cut by bytes, resumed: everything once, in order."""
    from engine.store import SetPaused

    monkeypatch.setattr(sender_module, "PAGE_BYTES", 2500)
    h = make()
    sizes = {f"C{n}": 1200 for n in range(1, 9)}
    enqueue_letters(h, sizes)
    h.start()
    h.destination.answer("AA")
    h.destination.answer("AA")
    h.store.write([SetPaused(queue=QUEUE, paused=True, at=h.reactor.seconds())])
    h.destination.answer("AA")
    h.run(2)
    h.store.write([SetPaused(queue=QUEUE, paused=False, at=h.reactor.seconds())])
    h.run(2)
    for _ in range(10):
        if h.destination.received()[-1:] == ["C8"] and h.states()[-1] == "delivered":
            break
        h.destination.answer("AA")
        h.run(0.01)
    assert h.destination.received() == list(sizes)
    assert h.states() == ["delivered"] * 8


# --------------------------------------------------------------------------- unordered


def test_unordered_sweep_finds_an_entry_set_aside_behind_pages_cut_by_bytes(unordered, monkeypatch):
    """SET_ASIDE full: a NAKed entry dropped from memory is read again by a sweep over cut pages."""
    monkeypatch.setattr(sender_module, "PAGE_BYTES", 2500)
    monkeypatch.setattr(sender_module, "SET_ASIDE", 1)
    h, lanes = unordered(parallel=2)
    sizes = {f"C{n:02d}": 1200 for n in range(1, 13)}
    enqueue_letters(h, sizes)
    h.start()
    lanes.answer("C01", "AE")
    lanes.answer("C02", "AE")
    lanes.answer("C03", "AE")
    lanes.answer_all()
    for _ in range(5):
        h.run(2)
        lanes.answer_all()
    assert h.states() == ["delivered"] * 12
    assert Counter(h.destination.received()) == {**{n: 1 for n in sizes}, "C01": 2, "C02": 2, "C03": 2}


def test_unordered_entries_waiting_out_a_backoff_do_not_keep_their_bodies_in_memory(unordered, monkeypatch):
    """Memory stays flat however large the letters: set-aside entries hold at most ~PAGE_BYTES of bodies."""
    monkeypatch.setattr(sender_module, "PAGE_BYTES", 20_000)
    h, lanes = unordered(parallel=2)
    sizes = {f"C{n:02d}": 10_000 for n in range(1, 31)}  # 300 KB behind a destination that NAKs
    enqueue_letters(h, sizes)
    h.start()
    lanes.answer_all("AE")
    kept = sum(len(entry.raw or b"") for _, _, entry in h.sender._aside)
    assert len(h.sender._aside) + (h.sender._dropped_probe is not None) > 0
    assert kept <= 20_000 + 10_100, f"{kept} bytes of bodies kept by {len(h.sender._aside)} set-aside entries"


def test_pending_processing_page_never_comes_back_empty_while_messages_wait(tmp_path):
    """Same bound in the resume's read: max_bytes=0 must still give the first pending message."""
    from engine.store import PENDING, open_store

    store = open_store(f"sqlite:///{tmp_path}/p.db")
    try:
        store.write([Append(message=received("ZD1", processing=PENDING))])
        assert [m.control_id for m in store.pending_processing(max_bytes=0)] == ["ZD1"]
    finally:
        store.close()


# --------------------------------------------------------------------------- mapping side


def test_mapping_batches_are_bounded_by_bytes_counting_resumed_works_by_their_size():
    """_next_batch: 64 MiB of raw (or of size, for a resumed work without raw), one larger alone."""
    from collections import deque

    from engine.shell import processor as processor_module
    from engine.shell.processor import Processor, Work

    p = Processor.__new__(Processor)
    mib = 1 << 20
    works = [Work(message_id=1, channel="c", mapping="m", raw=None, codec="latin-1", size=100 * mib),
             Work(message_id=2, channel="c", mapping="m", raw=None, codec="latin-1", size=40 * mib),
             Work(message_id=3, channel="c", mapping="m", raw=b"x" * 10, codec="latin-1", size=10),
             Work(message_id=4, channel="c", mapping="m", raw=None, codec="latin-1", size=30 * mib)]
    p._queue = deque((w, None) for w in works)
    batches = []
    while p._queue:
        batches.append([w.message_id for w, _ in p._next_batch()])
    assert processor_module.BATCH_BYTES == 64 * mib
    assert batches == [[1], [2, 3], [4]]


def test_a_resumed_message_whose_body_is_gone_fails_alone_and_the_others_map(tmp_path, monkeypatch):
    """Resumed works carry no raw: a body the store no longer has makes that one 'error', not the batch."""
    from tests.test_resume_mapping import SRM, World, stored_pending

    world = World(tmp_path)
    try:
        ids = [stored_pending(world.store, SRM.replace(b"ZD200046139", f"ZD2000461{n:02d}".encode()))
               for n in range(40, 43)]
        real = world.store.get_message
        monkeypatch.setattr(world.store, "get_message", lambda i: None if i == ids[1] else real(i))
        world.start()
        assert [world.processing(i) for i in ids] == ["mapped", "error", "mapped"]
    finally:
        world.close()


def test_a_pending_message_waiting_for_its_mapping_is_never_pruned(tmp_path):
    """Resumed works read their body when mapped: retention must leave PENDING/UNANSWERED rows."""
    from engine.store import PENDING, UNANSWERED, Prune, open_store

    store = open_store(f"sqlite:///{tmp_path}/p.db")
    try:
        results = store.write([Append(message=received("ZD1", processing=PENDING, targets=())),
                               Append(message=received("ZD2", processing=UNANSWERED, targets=()))])
        store.write([Prune(before=10**12, limit=100)])
        assert [m.control_id for m in store.pending_processing()] == ["ZD1", "ZD2"]
        assert all(store.get_message(r.message_id) is not None for r in results)
    finally:
        store.close()


# --------------------------------------------------------------------------- held events


def test_released_and_dropped_held_events_are_emptied_and_never_read_again(tmp_path):
    """'{}' events: not offered to the processor, not in the backlog, pruned by release time."""
    from engine.store import DropHeld, Prune, open_store

    store = open_store(f"sqlite:///{tmp_path}/h.db")
    try:
        (m1,) = store.write([Append(message=received("ZD1", processing="held", targets=()))])
        (m2,) = store.write([Append(message=received("ZD2", processing="held", targets=()))])
        event = '{"fields": {"patient.bsn": "123456782"}}'
        held1, held2 = store.write([HoldEvent(keys=("zd:ZD9",), message_id=m1.message_id, event=event, at=1.0),
                                    HoldEvent(keys=("zd:ZD9",), message_id=m2.message_id, event=event, at=1.0)])
        store.write([ReleaseHeld(ids=(held1,), at=2.0)])
        store.write([DropHeld(message_ids=(m2.message_id,), reason="never sent", at=3.0)])
        assert store._query("SELECT event FROM held_events ORDER BY id") == [("{}",), ("{}",)]
        assert store.held_events(["zd:ZD9"]) == []
        assert not store.has_held_events()
        assert store.held_backlog() == (0, None)
        (result,) = store.write([Prune(before=10.0, limit=100)])
        assert result.held == 2
    finally:
        store.close()
