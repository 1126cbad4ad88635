"""``koppel send`` against real destinations (tests/sink.py on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sink import KOPPEL, Sink, make_message  # noqa: E402


def send(port: int, paths) -> subprocess.CompletedProcess:
    return subprocess.run([str(KOPPEL), "send", "--to", f"127.0.0.1:{port}", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def test_a_system_that_closes_after_each_ack_gets_every_file_on_a_new_connection(tmp_path):
    """Before, the second message met the closed connection: NO ACK, exit 1, the rest unsent."""
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"m{n}.hl7")
        paths[-1].write_bytes(make_message(f"SND{n}"))
    with Sink() as sink:
        sink.close_after_ack = True
        done = send(sink.port, paths)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [line.split("\t")[1:3] for line in done.stdout.splitlines()] == [
            ["AA", "SND0"], ["AA", "SND1"], ["AA", "SND2"]]
        assert sink.received_ids() == ["SND0", "SND1", "SND2"]
        assert len({r.connection for r in sink.records}) == 3


def test_a_system_that_keeps_the_connection_gets_every_file_on_one(tmp_path):
    paths = []
    for n in range(3):
        paths.append(tmp_path / f"m{n}.hl7")
        paths[-1].write_bytes(make_message(f"ONE{n}"))
    with Sink() as sink:
        done = send(sink.port, paths)
        assert done.returncode == 0, done.stdout + done.stderr
        assert sink.received_ids() == ["ONE0", "ONE1", "ONE2"]
        assert {r.connection for r in sink.records} == {0}


def test_a_system_that_closes_without_answering_is_reported_no_ack(tmp_path):
    path = tmp_path / "m.hl7"
    path.write_bytes(make_message("DRP0"))
    with Sink() as sink:
        sink.drop_next(1)
        done = send(sink.port, [path])
        assert done.returncode == 1
        assert "NO ACK" in done.stdout
