"""``koppel send`` against real destinations (tests/sink.py on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sink import KOPPEL, Sink, make_message, unanswered_port  # noqa: E402


def send(port: int, paths) -> subprocess.CompletedProcess:
    return subprocess.run([str(KOPPEL), "send", "--to", f"127.0.0.1:{port}", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def files(tmp_path: Path, prefix: str, count: int) -> list[Path]:
    """``count`` message files, MSH-10 ``<prefix><n>``."""
    paths = [tmp_path / f"{prefix}{n}.hl7" for n in range(count)]
    for n, path in enumerate(paths):
        path.write_bytes(make_message(f"{prefix}{n}"))
    return paths


def test_a_system_that_closes_after_each_ack_gets_every_file_on_a_new_connection(tmp_path):
    """Before, the second message met the closed connection: NO ACK, exit 1, the rest unsent."""
    paths = files(tmp_path, "SND", 3)
    with Sink() as sink:
        sink.close_after_ack = True
        done = send(sink.port, paths)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [line.split("\t")[1:3] for line in done.stdout.splitlines()] == [
            ["AA", "SND0"], ["AA", "SND1"], ["AA", "SND2"]]
        assert sink.received_ids() == ["SND0", "SND1", "SND2"]
        assert len({r.connection for r in sink.records}) == 3


def test_a_system_that_keeps_the_connection_gets_every_file_on_one(tmp_path):
    paths = files(tmp_path, "ONE", 3)
    with Sink() as sink:
        done = send(sink.port, paths)
        assert done.returncode == 0, done.stdout + done.stderr
        assert sink.received_ids() == ["ONE0", "ONE1", "ONE2"]
        assert {r.connection for r in sink.records} == {0}


def test_a_system_that_closes_without_answering_is_reported_no_ack(tmp_path):
    with Sink() as sink:
        sink.drop_next(1)
        done = send(sink.port, files(tmp_path, "DRP", 1))
        assert done.returncode == 1
        assert done.stdout.splitlines()[-1].split("\t")[1:] == [
            "NO ACK", "DRP0", "connection closed before the acknowledgement"]


def test_a_system_whose_acks_end_with_fs_alone_is_answered_for_every_file(tmp_path):
    """Before, the first ACK was never complete without its CR: NO ACK after the timeout."""
    paths = files(tmp_path, "FSO", 3)
    with Sink() as sink:
        sink.ack_end = b"\x1c"
        done = send(sink.port, paths)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [line.split("\t")[1:3] for line in done.stdout.splitlines()] == [
            ["AA", "FSO0"], ["AA", "FSO1"], ["AA", "FSO2"]]


def test_a_port_nobody_listens_on_is_reported_as_refused(tmp_path):
    with Sink() as sink:
        port = sink.port
    done = send(port, files(tmp_path, "REF", 1))
    assert done.returncode == 1
    assert done.stdout.strip() == f"cannot connect to 127.0.0.1:{port}: connection refused"


def test_a_connect_that_times_out_is_reported_as_a_connect_timeout(tmp_path):
    """The endpoint's connect timeout fails with Twisted's TimeoutError, the class the client
    also uses for an ACK timeout: this printed "no acknowledgement in time" for a destination
    that never took the connection."""
    with unanswered_port() as port:
        done = subprocess.run([str(KOPPEL), "send", "--timeout", "1", "--to", f"127.0.0.1:{port}",
                               *map(str, files(tmp_path, "CTO", 1))], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.strip() == f"cannot connect to 127.0.0.1:{port}: connect timed out"
