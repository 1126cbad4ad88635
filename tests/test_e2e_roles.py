"""End to end with the engine split over two processes on one store (``--role``).

A receive-only ``koppel run`` ACKs and queues but sends nothing; a deliver-only one, started
beside it, delivers everything in commit order; a second deliverer is refused; and the
deliverer keeps up with messages the receiver commits while both run. Real sockets on
127.0.0.1, waiting by polling with a deadline.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sink import KoppelProcess, MLLPClient, Sink, make_message, write_channel  # noqa: E402

from engine.store import open_store  # noqa: E402

TIMEOUT = 20.0


def send(port: int, control_ids: list[str]) -> None:
    with MLLPClient(port) as client:
        for cid in control_ids:
            assert b"MSA|AA|" + cid.encode() in client.request(make_message(cid))


def stored_order(store_url: str) -> list[str]:
    store = open_store(store_url)
    try:
        return [m.control_id for m in sorted(store.list_messages(limit=10_000), key=lambda m: m.id)]
    finally:
        store.close()


def test_a_receive_process_and_a_deliver_process_share_one_store(tmp_path):
    sink = Sink(name="his").start()
    url = f"sqlite:///{tmp_path / 'koppel.db'}"
    channels = tmp_path / "channels"
    write_channel(channels, {"his": sink.port})
    receiver = KoppelProcess(channels, url, args=("--role", "receive"))
    deliverer = KoppelProcess(channels, url, args=("--role", "deliver"))
    extra = KoppelProcess(channels, url, args=("--role", "deliver", "--pid-file", ""))
    try:
        port = receiver.start()
        assert receiver.wait_for("engine.started")["role"] == "receive"
        send(port, [f"R{n:03d}" for n in range(20)])
        assert sink.delivered_count() == 0  # nobody delivers yet: the receiver only queues
        store = open_store(url)
        try:
            assert sum(store.queue_depths().values()) == 20
        finally:
            store.close()

        deliverer.start(until="engine.started")
        assert sink.wait_for_delivered([f"R{n:03d}" for n in range(20)], TIMEOUT)

        # the deliverer picks up what the receiver commits while both run, from two connections
        ids = [[f"A{n:03d}" for n in range(40)], [f"B{n:03d}" for n in range(40)]]
        senders = [threading.Thread(target=send, args=(port, batch)) for batch in ids]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(TIMEOUT)
        assert sink.wait_for_delivered(ids[0] + ids[1], TIMEOUT)
        assert sink.delivered_ids() == stored_order(url)  # FIFO: commit order, across processes
        assert sink.duplicates() == 0

        # a second delivering process is refused and says why
        proc = extra.launch()
        assert proc.wait(TIMEOUT) == 1
        failed = extra.wait_for("engine.start_failed")
        assert "already delivers from this store" in failed["error"]
    finally:
        for process in (extra, deliverer, receiver):
            process.terminate()
        sink.down()
