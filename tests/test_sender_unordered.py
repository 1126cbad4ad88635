"""``order: none`` with ``parallel: N``: N lanes (connections) to one destination, each with
one message in flight; a failing message is set aside until due while the others go on.

The same deterministic harness as test_sender.py: ``MemoryReactorClock``, a real SQLite
store behind the real ``GroupCommitter``, and a scripted destination whose connections are
real ``MLLPClient``s on string transports. Here the test answers each connection itself.
"""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet.error import ConnectionRefusedError

from engine.config import RetryConfig
from engine.core import mllp
from engine.shell import sender as sender_module
from engine.store import RetryNow, SetPaused, StoreError
from tests.test_sender import NAME, QUEUE, T0, Harness, ack, control_id_of, hl7


class Lanes:
    """Which message each connection has in flight, and answering it."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.answered: Counter = Counter()  # connection -> frames answered

    def in_flight(self) -> dict[str, object]:
        """control id -> connection, for every open connection waiting for an answer."""
        out = {}
        for client in self.h.destination.connections:
            frames = self.h.destination.frames(client)
            if client.transport.connected and len(frames) > self.answered[client]:
                out[control_id_of(frames[-1])] = client
        return out

    def answer(self, control_id: str, code: str = "AA") -> None:
        client = self.in_flight()[control_id]
        self.answered[client] += 1
        self.h.destination.send(mllp.encode_frame(ack(code, control_id)), client=client)

    def answer_all(self, code: str = "AA", limit: int = 10_000) -> None:
        """Answer whatever is in flight, again and again, until nothing is."""
        for _ in range(limit):
            waiting = self.in_flight()
            if not waiting:
                return
            for control_id in waiting:
                self.answer(control_id, code)
        raise AssertionError("still sending")


def building(tmp_path, *, parallel: int = 3):
    """For a fixture to yield from: build(parallel=..., **settings) -> (Harness, Lanes), each
    harness in a directory of its own under tmp_path; all stopped and closed afterwards."""
    harnesses: list[Harness] = []

    def build(parallel: int = parallel, **settings) -> tuple[Harness, Lanes]:
        where = tmp_path / str(len(harnesses))
        where.mkdir()
        harness = Harness(where, order="none", parallel=parallel, **settings)
        harnesses.append(harness)
        return harness, Lanes(harness)

    yield build
    for harness in harnesses:
        harness.sender.stop()
        harness.store.close()


@pytest.fixture
def make(tmp_path):
    yield from building(tmp_path)


def test_three_lanes_put_three_messages_in_flight_at_once_on_three_connections(make):
    h, lanes = make(parallel=3)
    h.enqueue("C1", "C2", "C3", "C4", "C5")
    h.start()
    assert len(h.destination.connections) == 3
    assert [h.destination.frames(c) for c in h.destination.connections] == [[hl7("C1")], [hl7("C2")], [hl7("C3")]]
    assert h.sender.state == sender_module.SENDING
    lanes.answer("C2")  # that lane takes the next entry on its own connection
    assert sorted(lanes.in_flight()) == ["C1", "C3", "C4"]
    assert lanes.in_flight()["C4"] is h.destination.connections[1]
    lanes.answer_all()
    assert sorted(h.destination.received()) == ["C1", "C2", "C3", "C4", "C5"]
    assert len(h.destination.connections) == 3
    assert h.states() == ["delivered"] * 5
    assert h.stats().depth == 0
    assert h.sender.state == sender_module.IDLE


def test_a_nakd_message_is_retried_later_while_the_others_are_delivered(make):
    h, lanes = make(parallel=2)
    h.enqueue("C1", "C2", "C3", "C4")
    h.start()
    lanes.answer("C1", "AE")
    entry = h.entry(1)
    assert (entry.state, entry.attempts, entry.last_error) == ("pending", 1, "destination answered AE")
    assert entry.next_attempt_at == T0 + 1
    assert sorted(lanes.in_flight()) == ["C2", "C3"]  # C1 set aside, its lane went on
    lanes.answer("C2")
    lanes.answer("C3")
    lanes.answer("C4")
    assert h.states() == ["pending", "delivered", "delivered", "delivered"]
    assert h.sender.state == sender_module.BACKOFF
    h.run(0.9)
    assert lanes.in_flight() == {}
    h.run(0.1)
    assert list(lanes.in_flight()) == ["C1"]
    lanes.answer("C1")
    assert h.states() == ["delivered"] * 4
    assert Counter(h.destination.received()) == {"C1": 2, "C2": 1, "C3": 1, "C4": 1}
    assert h.destination.received() != sorted(h.destination.received())  # order not kept
    assert len(h.destination.connections) == 3  # the AE's lane went on on a new connection


def test_ar_dead_letters_and_the_lanes_go_on(make):
    h, lanes = make(parallel=2)
    h.enqueue("C1", "C2", "C3")
    h.start()
    lanes.answer("C2", "AR")
    lanes.answer_all()
    h.run(600)
    assert h.states() == ["delivered", "dead", "delivered"]
    assert h.entry(2).last_ack == ack("AR", "C2")
    assert Counter(h.destination.received()) == {"C1": 1, "C2": 1, "C3": 1}
    assert h.sample("koppel_dead_letters_total", destination=NAME) == 1


def test_a_destination_down_is_retried_with_backoff_per_lane_and_gets_everything_when_back(make):
    h, lanes = make(parallel=2)
    h.destination.refuse = ConnectionRefusedError
    h.enqueue(*[f"C{n}" for n in range(1, 7)])
    h.start()
    h.run(14.9)
    # each lane connects again only after its backoff: not once per queued message
    assert [t - T0 for t in h.destination.connect_times] == [0, 0, 1, 1, 3, 3, 7, 7]
    assert [h.entry(i).attempts for i in range(1, 7)] == [4, 4, 0, 0, 0, 0]
    assert h.entry(1).next_attempt_at == T0 + 15
    assert h.entry(1).last_error == "connection refused"
    assert h.sender.state == sender_module.BACKOFF
    assert h.sample("koppel_destination_connected", queue=QUEUE) == 0
    h.destination.refuse = None
    h.run_until_connected()
    assert h.reactor.seconds() == T0 + 15
    lanes.answer_all()
    assert h.states() == ["delivered"] * 6
    assert Counter(h.destination.received()) == {f"C{n}": 1 for n in range(1, 7)}


def test_pause_stops_every_lane_after_its_message_in_flight_and_resume_continues(make):
    h, lanes = make(parallel=3)
    h.enqueue(*[f"C{n}" for n in range(1, 7)])
    h.start()
    h.store.write([SetPaused(queue=QUEUE, paused=True)])
    h.sender.poll()
    lanes.answer_all()  # the three in flight are still taken
    assert h.states()[:3] == ["delivered"] * 3
    h.run(30)
    assert sorted(h.destination.received()) == ["C1", "C2", "C3"]
    assert h.sender.state == sender_module.PAUSED
    h.store.write([SetPaused(queue=QUEUE, paused=False)])
    h.sender.poll()
    h.reactor.advance(0)
    assert sorted(lanes.in_flight()) == ["C4", "C5", "C6"]
    lanes.answer_all()
    assert h.states() == ["delivered"] * 6


def test_a_queue_longer_than_one_page_is_delivered_completely_each_message_once(make):
    h, lanes = make(parallel=3)
    ids = [f"C{n:04d}" for n in range(sender_module.PAGE * 2 + 37)]
    h.enqueue(*ids)
    h.start()
    lanes.answer_all()
    assert Counter(h.destination.received()) == {c: 1 for c in ids}
    assert h.stats().depth == 0
    assert h.stats().delivered_count == len(ids)
    assert len(h.destination.connections) == 3


def test_thousands_in_backoff_are_not_all_kept_in_memory_and_all_are_delivered(make, monkeypatch):
    monkeypatch.setattr(sender_module, "PAGE", 10)
    monkeypatch.setattr(sender_module, "SET_ASIDE", 5)
    h, lanes = make(parallel=2, retry=RetryConfig(initial=60.0, factor=2.0, max=300.0, jitter=0.0))
    ids = [f"C{n:03d}" for n in range(57)]
    h.enqueue(*ids)
    h.start()
    held = []
    for _ in range(len(ids)):  # every message NAKed once
        for control_id in list(lanes.in_flight()):
            lanes.answer(control_id, "AE")
        held.append(len(h.sender._aside) + len(h.sender._page))
    assert lanes.in_flight() == {}
    assert all(h.entry(i).attempts == 1 for i in range(1, len(ids) + 1))
    assert max(held) <= 5 + 10  # set aside + one page, never the whole queue
    assert h.sender._dropped_due == T0 + 60  # the others are read from the store again then
    h.run(60)  # all due again: read back from the store as they come due
    lanes.answer_all()
    assert h.states() == ["delivered"] * len(ids)
    assert Counter(h.destination.received()) == {c: 2 for c in ids}
    assert h.sample("koppel_delivery_redeliveries_total", destination=NAME) == len(ids)


def test_retry_now_cuts_the_backoff_short_for_every_set_aside_message(make, monkeypatch):
    monkeypatch.setattr(sender_module, "SET_ASIDE", 2)
    h, lanes = make(parallel=2, retry=RetryConfig(initial=600.0, factor=2.0, max=3600.0, jitter=0.0))
    h.enqueue("C1", "C2", "C3", "C4", "C5")
    h.start()
    for _ in range(3):
        for control_id in list(lanes.in_flight()):
            lanes.answer(control_id, "AE")
    assert lanes.in_flight() == {}
    h.run(5)
    assert len(h.destination.received()) == 5
    h.store.write([RetryNow(queue=QUEUE)])
    h.sender.poll()
    h.reactor.advance(0)
    lanes.answer_all()
    assert h.states() == ["delivered"] * 5
    assert Counter(h.destination.received()) == {f"C{n}": 2 for n in range(1, 6)}
    assert h.reactor.seconds() < T0 + 10


def test_a_message_nakd_for_longer_than_give_up_after_is_dead_lettered(make):
    h, lanes = make(parallel=2, give_up_after=10.0)
    h.enqueue("C1", "C2")
    h.start()
    lanes.answer("C2")
    for _ in range(20):
        if "C1" in lanes.in_flight():
            lanes.answer("C1", "AE")
        h.run(1)
    assert h.states() == ["dead", "delivered"]
    assert "give_up_after" in h.entry(1).last_error


def test_an_ack_timeout_closes_only_that_lanes_connection(make):
    h, lanes = make(parallel=2, ack_timeout=30.0)
    h.enqueue("C1", "C2", "C3")
    h.start()
    first, second = h.destination.connections
    h.run(20)
    lanes.answer("C2")  # C3 goes out on the second connection
    h.run(10)  # C1's ACK timeout
    assert first.transport.disconnected and second.transport.connected
    assert h.entry(1).last_error == "no acknowledgement in time"
    h.run(1)
    assert sorted(lanes.in_flight()) == ["C1", "C3"]
    assert lanes.in_flight()["C3"] is second
    lanes.answer_all()
    assert h.states() == ["delivered"] * 3


def test_metrics_count_sends_acks_retries_dead_letters_and_depth(make):
    h, lanes = make(parallel=2)
    h.enqueue("C1", "C2", "C3")
    h.start()
    lanes.answer("C1", "AE")
    lanes.answer("C2", "AA")
    lanes.answer("C3", "AR")
    h.run(1)
    lanes.answer("C1", "AA")
    assert h.sample("koppel_delivery_sent_total", destination=NAME) == 4
    assert h.sample("koppel_delivery_redeliveries_total", destination=NAME) == 1
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="AE") == 1
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="AA") == 2
    assert h.sample("koppel_delivery_acks_total", destination=NAME, code="AR") == 1
    assert h.sample("koppel_delivery_retries_total", destination=NAME) == 1
    assert h.sample("koppel_dead_letters_total", destination=NAME) == 1
    assert h.sample("koppel_delivery_latency_seconds_count", destination=NAME) == 2
    assert h.sample("koppel_queue_depth", queue=QUEUE) == 0
    assert h.sample("koppel_destination_connected", queue=QUEUE) == 1
    h.settled()
    h.sender.poll()
    assert h.sample("koppel_queue_depth", queue=QUEUE) == 0


def test_a_restart_resends_the_message_marked_in_flight_and_counts_it(make):
    h, lanes = make(parallel=2, ack_timeout=3600.0)
    h.enqueue("C1", "C2")
    h.start()
    h.run(sender_module.BOOKKEEPING_WINDOW)  # "killed" with both on the wire, after the marks
    h.sender = h.new_sender()
    h.start()
    assert Counter(h.destination.received()) == {"C1": 2, "C2": 2}
    lanes.answer("C1")
    lanes.answer("C2")
    # The store remembers one entry in flight per queue: the last one sent is counted.
    assert h.sample("koppel_delivery_redeliveries_total", destination=NAME) == 1


def test_a_reload_changes_the_number_of_lanes_and_the_order(make):
    h, lanes = make(parallel=2)
    h.enqueue(*[f"C{n}" for n in range(1, 9)])
    h.start()
    assert len(lanes.in_flight()) == 2
    h.config = h.config.__class__(**{**_fields(h.config), "parallel": 3})
    h.sender.update({NAME: h.config})
    assert len(lanes.in_flight()) == 3
    h.config = h.config.__class__(**{**_fields(h.config), "parallel": 1, "order": "fifo"})
    h.sender.update({NAME: h.config})
    assert len(lanes.in_flight()) == 3  # the messages in flight are still answered
    for control_id in list(lanes.in_flight()):
        lanes.answer(control_id)
    assert len(lanes.in_flight()) == 1  # then one lane, in order, from the head
    assert sum(c.transport.connected for c in h.destination.connections) == 1
    lanes.answer_all()
    assert h.states() == ["delivered"] * 8
    assert Counter(h.destination.received()) == {f"C{n}": 1 for n in range(1, 9)}
    assert h.sender.mode == "fifo"
    assert len(h.sender._lanes) == 1


def _fields(config) -> dict:
    return {
        name: getattr(config, name)
        for name in config.__dataclass_fields__
        if config.__dataclass_fields__[name].init
    }


def test_stop_waits_for_every_message_in_flight_and_sends_nothing_after(make):
    h, lanes = make(parallel=2)
    h.enqueue("C1", "C2", "C3")
    h.start()
    stopped = h.sender.stop()
    lanes.answer("C1")
    assert not stopped.called
    lanes.answer("C2")
    assert stopped.called
    assert h.sender.state == sender_module.STOPPED
    assert sorted(h.destination.received()) == ["C1", "C2"]
    assert h.states() == ["delivered", "delivered", "pending"]
    assert all(c.transport.disconnected for c in h.destination.connections)


def test_a_store_error_while_reading_the_queue_is_survived_and_nothing_is_sent_twice(make, monkeypatch):
    h, lanes = make(parallel=2)
    h.enqueue("C1", "C2")
    h.start()
    lanes.answer("C1", "AE")
    lanes.answer_all()
    real = h.store.queue_head
    failures = []

    def queue_head(queue, limit=100, *, after_id=None, bodies=True, max_bytes=None):
        if limit == sender_module.PAGE and len(failures) < 2:
            failures.append(after_id)
            raise StoreError("store read failed: database is locked")
        return real(queue, limit, after_id=after_id, bodies=bodies, max_bytes=max_bytes)

    monkeypatch.setattr(h.store, "queue_head", queue_head)
    h.enqueue("C3")
    h.reactor.advance(0)
    assert failures
    h.run(2)
    lanes.answer_all()
    assert h.states() == ["delivered"] * 3
    assert Counter(h.destination.received()) == {"C1": 2, "C2": 1, "C3": 1}


def test_pages_bounded_by_bytes_deliver_everything_once_and_the_set_aside_sweep_finds_its_entry(make, monkeypatch):
    """Lanes read pages of at most PAGE_BYTES; an entry set aside by an AE and dropped from
    memory is found again by the sweep over byte-bounded pages."""
    monkeypatch.setattr(sender_module, "PAGE_BYTES", 2 * len(hl7("C01")))
    monkeypatch.setattr(sender_module, "PAGE", 3)
    h, lanes = make(parallel=2)
    names = [f"C{n:02d}" for n in range(1, 13)]
    h.enqueue(*names)
    h.start()
    lanes.answer("C01", "AE")
    lanes.answer_all()
    h.run(2)
    lanes.answer_all()
    assert h.states() == ["delivered"] * 12
    assert Counter(h.destination.received()) == {**{n: 1 for n in names}, "C01": 2}
