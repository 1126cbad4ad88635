"""The whole receive path over real sockets on 127.0.0.1: ``koppel run`` as a subprocess.

Fed by python-hl7's ``mllp_send`` (a peer's client, not ours), by ``koppel send``,
and by a small blocking-socket load generator; then killed with SIGKILL in the middle
of a multi-connection load and restarted, to prove that every ACKed message is in
the store exactly once. Nothing sleeps longer than it must: every wait polls with a
deadline, and every process started here is killed by a finalizer.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import load_sample
from engine.core.response import read_ack
from engine.store import open_store
from sink import KoppelProcess, Load, MLLPClient

CHANNEL = "zorgdomein-in"
CHANNEL_YAML = f"""\
name: {CHANNEL}
source:
  listen: tcp:0:interface=127.0.0.1
  allow: [127.0.0.1/32]
  frame_timeout: 10s
accept:
  types: [SRM^S01, SRM^S04, ORU^R01, ORM^O01, OML^O21, REF^I12, REF^I13, REF^I14, SIU^S12]
  versions: ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"]
duplicates:
  window: 24h
"""
ZORGDOMEIN = [
    "zorgdomein/zd_oml_o21_lab_v251_latin1.hl7",
    "zorgdomein/zd_orm_o01_echo_v24_latin1.hl7",
    "zorgdomein/zd_orm_o01_lab_v24.hl7",
    "zorgdomein/zd_oru_pdf_official_head.hl7",
    "zorgdomein/zd_oru_r01_attachments.hl7",
    "zorgdomein/zd_oru_r01_request_form_pdf.hl7",
    "zorgdomein/zd_srm_s01_appointment_request.hl7",
]
ACK_TIMEOUT = 10.0


def message(control_id: str) -> bytes:
    """A unique synthetic referral result (test BSN 123456782)."""
    return (
        f"MSH|^~\\&|ZorgDomein|ZD|Koppel|ZH|20260102161545+0100||ORU^R01|{control_id}|P|2.4|||||NLD|8859/1\r"
        "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^T^^^^^L||19800623|M\r"
        f"OBX|1|TX|||load test document {control_id}\r"
    ).encode("ascii")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "channels" / "zorgdomein-in.yaml").write_text(CHANNEL_YAML)
    return tmp_path


@pytest.fixture
def store_url(workdir):
    return f"sqlite:///{workdir}/var/koppel.db"


@pytest.fixture
def engine(workdir, store_url):
    """A (not yet started) engine; killed at teardown whatever the test did."""
    (workdir / "var").mkdir(exist_ok=True)
    process = KoppelProcess(workdir / "channels", store_url, workdir=workdir, metrics="tcp:0:interface=127.0.0.1")
    yield process
    process.kill()


def stored_control_ids(store_url: str) -> Counter:
    store = open_store(store_url)
    try:
        rows = store.list_messages(channel=CHANNEL, limit=10_000_000)
        return Counter(m.control_id for m in rows)
    finally:
        store.close()


# --------------------------------------------------------------------------- tests


def mllp_send_script() -> str:
    for candidate in (
        shutil.which("mllp_send"),
        str(Path(sysconfig.get_path("scripts")) / "mllp_send"),
        str(Path(sys.executable).parent / "mllp_send"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("python-hl7's mllp_send script is not installed (pip install hl7)")


def test_python_hl7_mllp_send_gets_aa_for_every_zorgdomein_sample(engine, workdir, store_url):
    port = engine.start()
    stream = workdir / "zorgdomein.mllp"
    stream.write_bytes(b"".join(b"\x0b" + load_sample(name) + b"\x1c\r" for name in ZORGDOMEIN))
    done = subprocess.run(
        [mllp_send_script(), "--port", str(port), "--file", str(stream), "127.0.0.1"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    answers = re.findall(rb"\x0b(.*?)\x1c\r", done.stdout, re.S)
    replies = [read_ack(a) for a in answers]
    assert len(replies) == len(ZORGDOMEIN)
    for name, reply in zip(ZORGDOMEIN, replies):
        sent_id = re.split(rb"[|]", load_sample(name).split(b"\r", 1)[0])[9].decode()
        assert (reply.code, reply.control_id) == ("AA", sent_id), name

    # mllp_send strips the trailing CR; everything else is stored exactly as sent.
    store = open_store(store_url)
    try:
        raws = sorted(store.get_message(m.id).raw for m in store.list_messages(channel=CHANNEL))
    finally:
        store.close()
    assert raws == sorted(load_sample(name).strip(b"\r") for name in ZORGDOMEIN)


def test_koppel_send_prints_aa_lines_and_exits_0_and_exits_1_on_ar(engine, workdir):
    port = engine.start()
    files = [str(Path(__file__).parent / "samples" / name) for name in ZORGDOMEIN[:3]]
    send = [sys.executable, "-m", "engine.cli", "send", "--to", f"127.0.0.1:{port}", "--timeout", "10"]

    ok = subprocess.run(send + files, capture_output=True, text=True, timeout=30, cwd=workdir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(line.split("\t")[1] == "AA" for line in lines), lines

    not_accepted = str(Path(__file__).parent / "samples" / "public" / "hapi_adt_a03.hl7")
    ar = subprocess.run(send + [not_accepted], capture_output=True, text=True, timeout=30, cwd=workdir)
    assert ar.returncode == 1, ar.stdout + ar.stderr
    assert ar.stdout.split("\t")[1] == "AR"


def test_every_acked_message_survives_kill_9_under_load_exactly_once(engine, store_url):
    acked: list[str] = []
    in_flight: list[tuple[str, bytes]] = []
    for run in range(3):
        port = engine.start()
        resend_in_flight(port, in_flight, acked)
        load = Load(port, connections=4, tag=f"K{run}", message=message).start()
        load.wait_for_acks(10**9, timeout=1.5)  # ~1.5 s of load, then the kill
        engine.proc.send_signal(signal.SIGKILL)
        engine.wait()
        load.stop.set()
        load.join()
        assert load.wrong == []
        assert len(load.acked) > 0, engine.tail()
        acked.extend(load.acked)
        in_flight = list(load.in_flight.values())
        print(f"run {run}: {len(load.acked)} ACKed, {len(in_flight)} in flight at the kill")

        # Restart on the same store, as an operator would, and look.
        port = engine.start()
        resend_in_flight(port, in_flight, acked)
        in_flight = []
        counts = stored_control_ids(store_url)
        missing = [c for c in acked if counts[c] == 0]
        assert missing == [], f"{len(missing)} ACKed messages lost after kill -9"
        assert [c for c, n in counts.items() if n > 1] == [], "a message was stored twice"
        engine.proc.send_signal(signal.SIGTERM)
        assert engine.wait() == 0, engine.tail()


def resend_in_flight(port: int, in_flight: list[tuple[str, bytes]], acked: list[str]) -> None:
    """What a sender does after losing a connection: send the un-ACKed message again.

    If the killed engine had committed it but not answered, this is a duplicate and
    must get AA without a second copy in the store.
    """
    if not in_flight:
        return
    with MLLPClient(port, timeout=ACK_TIMEOUT) as client:
        for control_id, payload in in_flight:
            reply = read_ack(client.request(payload))
            assert (reply.code, reply.control_id) == ("AA", control_id)
            acked.append(control_id)


def test_sigterm_under_load_exits_0_and_every_acked_message_is_stored(engine, store_url):
    port = engine.start()
    load = Load(port, connections=4, tag="T", message=message).start()
    load.wait_for_acks(1000, timeout=1.5)
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.wait() == 0, engine.tail()
    load.stop.set()
    load.join()
    assert load.wrong == []
    assert len(load.acked) > 0
    counts = stored_control_ids(store_url)
    assert [c for c in load.acked if counts[c] != 1] == []
    events = [e.get("event") for e in engine.logged()]
    assert events[-1] == "engine.stopped"


def test_a_sender_that_does_not_read_its_acks_is_held_back_by_tcp_not_buffered_in_memory(engine):
    """A sender that writes and never reads (fire and forget, a batch sender that reads only at
    the end, a sender whose reading thread died): its ACKs pile up. Koppel used to go on
    reading and storing, and kept every unsent ACK in its own memory, without limit (about
    160 bytes a message: a day of such a sender's traffic, hundreds of MB). Now it stops
    reading that connection once a bounded backlog of ACKs waits, so TCP holds the sender
    back, as a blocking engine (HAPI, Mirth) does; once the sender reads, everything flows."""
    port = engine.start()
    # Past what the kernel holds for the engine (its send buffer grows up to tcp_wmem's maximum)
    # and the engine's own backlog, at about 115 bytes an ACK, with room to spare.
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    total = (wmem_max + (1 << 20)) // 100 + 15_000
    stream = b"".join(b"\x0b" + message(f"NR{i:07d}") + b"\x1c\r" for i in range(total))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the sender's side holds few ACKs
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1.0)
    offset = 0
    try:
        while offset < len(stream):
            offset += sock.send(stream[offset:offset + 65536])
    except socket.timeout:
        pass

    def stored() -> int:
        return engine.query("SELECT count(*) FROM messages")[0][0]

    # Wait until the engine stores no more (or has stored everything).
    count, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline:
        before, count = count, stored()
        if count == total or count == before:
            break
        time.sleep(0.5)
    assert count < total, (f"the engine read and stored all {total} messages while the sender read none "
                           f"of their ACKs: ~{total * 160 // 2**20} MB of ACKs waited in its memory")
    print(f"held back: {count} of {total} stored, {offset} bytes sent")

    # The sender now reads: every message gets its AA, in order, and is stored once.
    answers = bytearray()

    def reader() -> None:
        sock.settimeout(ACK_TIMEOUT)
        ends = 0
        while ends < total:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            ends += chunk.count(b"\x1c")  # (an ACK holds no other FS)
            answers.extend(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sock.settimeout(ACK_TIMEOUT)
    sock.sendall(stream[offset:])
    thread.join(60)
    sock.close()
    replies = [read_ack(a) for a in re.findall(rb"\x0b(.*?)\x1c\r", bytes(answers), re.S)]
    assert [(r.code, r.control_id) for r in replies] == [("AA", f"NR{i:07d}") for i in range(total)]
    assert engine.query("SELECT count(*), count(DISTINCT control_id) FROM messages") == [(total, total)]
