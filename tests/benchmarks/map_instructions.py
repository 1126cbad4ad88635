"""Instructions per mapped message, counted by callgrind (deterministic, unlike the VM's clock).

The per-message path of mapping_bench (a): read_header, Message.parse, Mapping.apply, agenda
decide and build_outbound, for N SRM^S01 and N ORM^O01, with the build time in the hospital's
zone as the engine's clock gives it. Usage:

    .venv/bin/python tests/benchmarks/map_instructions.py            # runs callgrind twice, prints
    .venv/bin/python tests/benchmarks/map_instructions.py --run N     # the loop alone (what is counted)

It runs the loop for 100 and for 600 messages of each type under valgrind and prints the
difference divided by 1,000: start-up and loading cancel out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def run(count: int) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import mapping_bench as bench

    from engine.bundle import load_bundle
    from engine.core import agenda as ag
    from engine.core.convert import hospital_zone
    from engine.core.header import read_header
    from engine.core.hl7message import Message
    from engine.mapping import build_outbound

    bundle = load_bundle(ROOT / "channels", ROOT / "mappings")
    now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=hospital_zone())
    for make, name in ((bench.srm, "zorgdomein-srm"), (bench.orm, "zorgdomein-orm")):
        mapping = bundle.mappings.mapping(name)
        for i, raw in enumerate([make(n) for n in range(count)]):
            header = read_header(raw, default_charset="8859/1")
            result = mapping.apply(Message.parse(raw, codec=header.codec))
            decision = ag.decide(result.event, None, now=now, message_id=str(i), book=bundle.book)
            build_outbound(mapping, result.event, decision.entry, control_id=f"K{i}", timestamp=now)


def collected(count: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--run", str(count)], capture_output=True, text=True, check=True,
    )
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=int, metavar="N", help="only run the loop for N messages of each type")
    args = parser.parse_args()
    if args.run is not None:
        run(args.run)
        return
    small, large = collected(100), collected(600)
    print(f"{(large - small) / 1000:,.0f} instructions per mapped message (mean of SRM^S01 and ORM^O01)")


if __name__ == "__main__":
    main()
