"""kill -9 soak: nothing ACKed is lost, and every queue keeps its order, however the engine dies.

10,000 messages over 4 source connections into ``koppel run``, routed to 2 destinations
(two tests/sink.py sinks), while the engine is SIGKILLed at random moments and restarted on
the same store (at least 10 kills). Sources behave like real senders: a message whose ACK
never came is sent again after reconnecting. At the end:

* every ACKed message reached each sink at least once;
* each sink's first-delivery order equals the store's commit order, and agrees with what the
  sources saw (per connection send order; ACKed-before-sent implies delivered-before);
* printed: kills, ACKed, delivered and duplicates (resends) at each sink, wall time.

With ``--split`` the engine is two processes on the store (``--role receive`` and
``--role deliver``) and each kill picks the receiver, the deliverer or both at random.

With ``--map`` the engine runs the bundled channels and mappings instead, and every message is
a ZorgDomein SRM^S01 with its own ZD-number: at the end every ACKed message must be mapped
(none left pending), have its own agenda entry, and have reached the HIS sink as an SIU^S12
(at least once; placer id = its ZD-number).

Not run by pytest (minutes, not seconds). Exit status 0 when every check passed.
Usage: .venv/bin/python tests/benchmarks/soak_kill9.py [--messages 10000] [--connections 4]
       [--kills 10] [--rate 1500] [--seed N] [--keep DIR] [--split] [--map]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from sink import (  # noqa: E402
    BUNDLE_DESTINATIONS,
    KoppelProcess,
    ResendingSource,
    Sink,
    check_order,
    write_bundle,
    write_channel,
)

from engine.store import open_store  # noqa: E402


def stored_order(store_url: str, channel: str) -> list[str]:
    store = open_store(store_url)
    try:
        rows = store.list_messages(channel=channel, status="accepted", limit=10**8)
    finally:
        store.close()
    # inbound only: what the mappings built for the hospital's systems is stored too (origin_id set)
    return [r.control_id for r in sorted(rows, key=lambda r: r.id) if r.origin_id is None]


def queue_depths(store_url: str) -> dict[str, int]:
    store = open_store(store_url)
    try:
        return store.queue_depths()
    finally:
        store.close()


def check_mapped(store_url: str, his: Sink, sent: dict) -> bool:
    """--map: every ACKed SRM^S01 mapped once into its own agenda entry, its SIU^S12 at the HIS."""
    store = open_store(store_url)
    try:
        counts = store.processing_counts()
        entries = store.list_agenda_entries(limit=10**8)
    finally:
        store.close()
    zd_numbers = [e.zd_number for e in entries]
    with his._lock:
        placers = [raw.split(b"\rSCH|", 1)[1].split(b"|", 1)[0].split(b"^", 1)[0].decode()
                   for raw in (r.raw for r in his.records if r.answer == "AA") if b"\rSCH|" in raw]
    print(f"mapping: processing {counts}; agenda entries {len(entries)} ({len(set(zd_numbers))} ZD-numbers); "
          f"HIS: {len(placers)} SIU^S12 answered AA, {len(set(placers))} distinct placer ids, "
          f"{len(placers) - len(set(placers))} resent")
    ok = True
    if counts != {"mapped": len(sent)}:
        ok = False
        print("FAIL: not every ACKed message is mapped exactly once (pending or error left)")
    if sorted(zd_numbers) != sorted(sent):
        ok = False
        print("FAIL: the agenda entries are not exactly one per ACKed ZD-number")
    if set(placers) != set(sent):
        ok = False
        print(f"FAIL: SIU^S12 missing at the HIS for {len(set(sent) - set(placers))} ZD-numbers")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--kills", type=int, default=10, help="at least this many SIGKILLs")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="total send rate msg/s, so kills land during traffic (0: unpaced); at 1,000 "
                             "the default 10,000 messages take 10 s, time for about 15 kills (at 1,500 "
                             "a fast machine drained before the tenth)")
    parser.add_argument("--min-uptime", type=float, default=0.15)
    parser.add_argument("--max-uptime", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", default=None, help="work in DIR and keep it (store, channel)")
    parser.add_argument("--split", action="store_true", help="receive and deliver in two processes")
    parser.add_argument("--map", action="store_true", help="bundled mappings: SRM^S01 -> agenda -> SIU^S12")
    args = parser.parse_args()

    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="koppel-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store_url = f"sqlite:///{workdir / 'koppel.db'}"
    if args.map:
        sinks = {name: Sink(name=name, keep_raw=name == "his-scheduling").start() for name in BUNDLE_DESTINATIONS}
        write_bundle(workdir, {name: s.port for name, s in sinks.items()})
    else:
        sinks = {"dest-a": Sink(name="a", keep_raw=False).start(), "dest-b": Sink(name="b", keep_raw=False).start()}
        write_channel(workdir / "channels", {name: s.port for name, s in sinks.items()},
                      retry="{initial: 50ms, factor: 2, max: 500ms, jitter: 0.1}", name="soak-in")
    engine = KoppelProcess(workdir / "channels", store_url, args=("--role", "receive") if args.split else ())
    deliverer = KoppelProcess(workdir / "channels", store_url, args=("--role", "deliver")) if args.split else None
    print(f"soak: {args.messages} messages, {args.connections} connections, "
          + ("bundled mappings (SRM^S01 -> SIU^S12 to the HIS), " if args.map else "2 destinations, ") +
          f">= {args.kills} kills, seed {seed}, work dir {workdir}"
          + (", split: --role receive + --role deliver" if args.split else ""), flush=True)

    started = time.monotonic()
    if deliverer is not None:
        deliverer.start(until="engine.started")
    engine.start(until="engine.started")
    per_connection = [[] for _ in range(args.connections)]
    for n in range(args.messages):
        # --map: a ZD-number, which the SRM^S01 also carries in ARQ-1 (sink.make_message)
        per_connection[n % args.connections].append(f"ZD{n:09d}" if args.map else f"S{n % args.connections}-{n:06d}")
    interval = args.connections / args.rate if args.rate else None
    stop = threading.Event()
    sources = [ResendingSource(c, per_connection[c], lambda: engine.ports.get("zorgdomein-in" if args.map else "soak-in"),
                               timeout=10, stop=stop,
                               interval=interval) for c in range(args.connections)]
    kills = {"sending": 0, "draining": 0}
    victims = {"receiver": 0, "deliverer": 0, "both": 0}
    ok = True
    try:
        for source in sources:
            source.start()

        def sending() -> bool:
            return any(s.thread.is_alive() for s in sources)

        # --map: only the HIS gets a message per SRM^S01; the other bundled sinks get none
        awaited = [sinks["his-scheduling"]] if args.map else list(sinks.values())

        def draining() -> bool:
            return any(depth for depth in queue_depths(store_url).values()) or any(
                s.delivered_count() < args.messages for s in awaited)

        while sending() or (sum(kills.values()) < args.kills and draining()):
            time.sleep(rng.uniform(args.min_uptime, args.max_uptime))
            phase = "sending" if sending() else "draining"
            if phase == "draining" and not draining():
                break
            victim = rng.choice(list(victims)) if deliverer is not None else "receiver"
            victims[victim] += 1
            if victim in ("receiver", "both"):
                engine.kill()
            if victim in ("deliverer", "both"):
                deliverer.kill()
            kills[phase] += 1
            if victim in ("deliverer", "both"):
                deliverer.start(until="engine.started")
            if victim in ("receiver", "both"):
                engine.start(until="engine.started")
        for source in sources:
            source.join(120)
        sent = {r.control_id: r for s in sources for r in s.records}
        acked_at_end = time.monotonic()
        deadline = time.monotonic() + 300
        if args.map:
            sinks["his-scheduling"].wait_until(lambda s: s.delivered_count() >= len(sent), 300)
        else:
            for s in sinks.values():
                s.wait_for_delivered(sent, max(1.0, deadline - time.monotonic()))
        delivered_at = time.monotonic()
    finally:
        stop.set()
        engine.terminate()
        if deliverer is not None:
            deliverer.terminate()
    wall = time.monotonic() - started

    errors = [f"source {s.number}: {s.error!r}" for s in sources if s.error is not None]
    order = stored_order(store_url, "zorgdomein-in" if args.map else "soak-in")
    total_kills = sum(kills.values())
    print(f"kills: {total_kills} ({kills['sending']} while sending, {kills['draining']} while draining)"
          + (f"; killed: receiver {victims['receiver']}, deliverer {victims['deliverer']}, "
             f"both {victims['both']}" if deliverer is not None else ""))
    print(f"ACKed: {len(sent)} of {args.messages}; source resends (sent again after a kill): "
          f"{sum(r.attempts - 1 for r in sent.values())}; stored (accepted): {len(order)}")
    if errors or len(sent) != args.messages:
        ok = False
        print("FAIL: sources:", errors or "not everything ACKed")
    if sorted(order) != sorted(sent):
        ok = False
        print("FAIL: the stored messages are not exactly the ACKed ones")
    if args.map:
        ok = check_mapped(store_url, sinks["his-scheduling"], sent) and ok
    for name, s in ({} if args.map else sinks).items():
        first = s.delivered_ids()
        missing = len(set(sent) - set(first))
        unknown = len(set(first) - set(sent))
        problems = check_order(first, sent)
        same_as_store = first == order
        print(f"{name}: delivered {len(first)} distinct, received {len(s.received_ids())}, "
              f"duplicates {s.duplicates()}, missing {missing}, unknown {unknown}, "
              f"order = commit order: {same_as_store}" + (f", problems: {problems}" if problems else ""))
        if missing or unknown or problems or not same_as_store:
            ok = False
    print(f"wall time: {wall:.1f}s (all ACKed after {acked_at_end - started:.1f}s, "
          f"all delivered after {delivered_at - started:.1f}s)")
    events = engine.events if deliverer is None else deliverer.events
    print(f"engine events: {events.get('delivery.retry', 0)} delivery.retry, "
          f"{events.get('queue.sender_crashed', 0)} queue.sender_crashed, "
          f"{events.get('queue.bookkeeping_failed', 0)} queue.bookkeeping_failed, over all runs")
    print("RESULT:", "PASS" if ok and total_kills >= args.kills else "FAIL")
    for s in sinks.values():
        s.down()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and total_kills >= args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
