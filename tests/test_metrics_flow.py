"""Every metric's VALUE after a scripted flow through ``koppel run`` (subprocess, real sockets).

One channel with the bundled mappings, four ``tests/sink.py`` destinations, and a flow whose
every step has a known effect on the counters:

* N + 1 appointment requests (SRM^S01, each a new ZD-number): accepted, mapped ``ok``, each an
  SIU^S12 to ``his-scheduling``, whose sink answers the first AE and then AA;
* the first request sent again byte for byte: a duplicate (answered from the first copy);
* a referral letter (ORU^R01) for the first ZD-number: mapped ``ok``, an MDM^T02 queued for
  ``document-archive``, whose sink is down (so it stays queued: depth 1);
* a letter for a ZD-number nobody sent: ``held``;
* a request without ZD-number (ARQ-1 empty): mapping ``error`` (still AA: ack on-store);
* a lab order (OML^O21) forwarded raw to ``lis-orders``, whose sink answers AR: a dead letter;
* an ADT^A01 (not accepted on the channel): AR;
* a frame over ``max_message_bytes``: AR, discarded as ``oversize``;
* a connection from 127.0.0.2, outside the allow-list: refused.

Then ``/metrics`` is scraped and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import shutil
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import __version__
from sink import ROOT, KoppelProcess, MLLPClient, Sink, read_ack_code

CHANNEL = "metrics-in"
EXTRA = 3  # N: appointment requests beyond the first
MAX_BYTES = 16 * 1024
HEADER = "MSH|^~\\&|ZorgDomein|ZD|KOPPEL|ZIEKENHUIS|20261123120000+0100||{type}|{cid}|P|{version}|||||NLD|8859/1\r"
PATIENT = "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^T^^^^^L||19800101|M\r"  # test BSN


def srm(cid: str, zd: str, version: str = "2.4") -> bytes:
    return (
        HEADER.format(type="SRM^S01^SRM_S01", cid=cid, version=version)
        + f"ARQ|{zd}|||||CARHAR^Cardiologie / Hartfalen^99zda|CARREG001^consult cardioloog^99zda|"
        "REG^regulier^99zda|||20260329^20260428|R\r"
        + PATIENT
        + "AIG|1|U|CAR^Cardiologie^99zda\r"
    ).encode("latin-1")


def oru(zd: str) -> bytes:
    return (
        HEADER.format(type="ORU^R01", cid=zd, version="2.4")
        + PATIENT
        + f"ORC|RE|{zd}\rOBR|1|{zd}||BRIEF^Verwijsbrief^99zda\r"
        "OBX|1|ED|BRIEF^Verwijsbrief||^AP^PDF^Base64^JVBERi0xLjQKJcfs\r"
    ).encode("latin-1")


def oml(cid: str) -> bytes:
    return (HEADER.format(type="OML^O21^OML_O21", cid=cid, version="2.5.1") + PATIENT).encode("latin-1")


def adt(cid: str) -> bytes:
    return (HEADER.format(type="ADT^A01", cid=cid, version="2.4") + PATIENT).encode("latin-1")


def channel_yaml(sinks: dict[str, Sink]) -> str:
    destinations = "".join(
        f"  {name}:\n"
        f"    endpoint: tcp:host=127.0.0.1:port={sink.port}\n"
        "    ack_timeout: 5s\n"
        "    connect_timeout: 1s\n"
        "    retry: {initial: 100ms, factor: 1, max: 100ms, jitter: 0}\n"
        "    on_nak: {AE: retry, CE: retry, AR: dead-letter, CR: dead-letter}\n"
        for name, sink in sinks.items()
    )
    return f"""\
name: {CHANNEL}
source:
  listen: tcp:0:interface=127.0.0.1
  allow: [127.0.0.1/32]
  max_message_bytes: {MAX_BYTES}
accept:
  types: [SRM^S01, ORU^R01, OML^O21]
  versions: ["2.4", "2.5.1"]
destinations:
{destinations}routes:
  - when: {{types: [SRM^S01]}}
    map: zorgdomein-srm
  - when: {{types: [ORU^R01]}}
    map: zorgdomein-oru
  - when: {{types: [OML^O21]}}
    to: [lis-orders]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ack(client: MLLPClient, payload: bytes) -> str:
    """Send one frame; the ACK's MSA-1."""
    return read_ack_code(client.request(payload))[0]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    """The sample's value; 0 when the labelled series does not exist (a counter never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name: str, **labels) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, l), v in samples.items() if n == name and wanted <= l)


@pytest.fixture
def flow(tmp_path):
    names = ("his-scheduling", "lis-orders", "document-archive", "ris-orders")
    sinks = {name: Sink(name=name).start() for name in names}
    sinks["his-scheduling"].nak_next("AE", 1)
    sinks["lis-orders"].nak_next("AR", 1)
    sinks["document-archive"].down()  # the archive is away: its message stays queued
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / f"{CHANNEL}.yaml").write_text(channel_yaml(sinks))
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    metrics_port = free_port()
    engine = KoppelProcess(tmp_path / "channels", f"sqlite:///{tmp_path}/var/koppel.db",
                           metrics=f"tcp:{metrics_port}:interface=127.0.0.1")
    try:
        port = engine.start()
        yield port, metrics_port, sinks
        assert engine.terminate() == 0, engine.tail()
    finally:
        engine.kill()
        for sink in sinks.values():
            sink.down()


def test_every_metric_has_the_value_the_flow_implies(flow):
    port, metrics_port, sinks = flow
    client = MLLPClient(port, timeout=5)
    codes = [ack(client, srm("S0", "ZD100000000"))]
    codes += [ack(client, srm(f"S{n}", f"ZD10000000{n}")) for n in range(1, EXTRA + 1)]
    codes.append(ack(client, srm("S0", "ZD100000000")))  # exact re-send
    codes.append(ack(client, oru("ZD100000000")))  # letter for the first request: ok
    codes.append(ack(client, oru("ZD100000099")))  # letter without its request: held
    codes.append(ack(client, srm("S-NOZD", "")))  # no ZD-number: mapping error
    codes.append(ack(client, oml("O1")))  # forwarded to lis-orders: AR -> dead letter
    codes.append(ack(client, adt("A1")))  # not accepted: AR
    big = srm("S-BIG", "ZD100000999") + b"NTE|1||" + b"x" * (MAX_BYTES + 1000) + b"\r"
    codes.append(ack(client, big))  # oversize: AR
    client.close()
    assert codes == ["AA"] * (EXTRA + 1) + ["AA", "AA", "AA", "AA", "AA", "AR", "AR"]

    # 127.0.0.2 is loopback too, but not in the allow-list: refused on connect
    try:
        refused = MLLPClient(port, timeout=5, source="127.0.0.2")
        with pytest.raises(OSError):
            refused.request(adt("R1"))
        refused.close()
    except OSError:
        pass

    accepted_srm = EXTRA + 2  # N + 1 requests and the one without ZD-number (duplicate not counted)
    deadline = time.monotonic() + 15
    while True:
        m = scrape(metrics_port)
        done = (
            value(m, "koppel_delivery_acks_total", destination="his-scheduling", code="AA") == EXTRA + 1
            and value(m, "koppel_dead_letters_total", destination="lis-orders") == 1
            and total(m, "koppel_mapping_outcomes_total") == EXTRA + 4
            and value(m, "koppel_connections_refused_total", channel=CHANNEL, reason="not-allowed") == 1
            and value(m, "koppel_queue_depth", queue=f"127.0.0.1:{sinks['document-archive'].port}") == 1
            # the age gauge is refreshed by the once-a-second poll
            and value(m, "koppel_queue_oldest_age_seconds", queue=f"127.0.0.1:{sinks['document-archive'].port}") > 0
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    # receive
    assert value(m, "koppel_received_messages_total", channel=CHANNEL, type="SRM^S01", outcome="accepted") == accepted_srm
    assert value(m, "koppel_received_messages_total", channel=CHANNEL, type="ORU^R01", outcome="accepted") == 2
    assert value(m, "koppel_received_messages_total", channel=CHANNEL, type="OML^O21", outcome="accepted") == 1
    assert value(m, "koppel_received_messages_total", channel=CHANNEL, type="other", outcome="rejected") == 1
    assert total(m, "koppel_received_messages_total") == accepted_srm + 2 + 1 + 1
    assert value(m, "koppel_acks_sent_total", channel=CHANNEL, code="AA") == accepted_srm + 2 + 1 + 1  # + duplicate
    assert value(m, "koppel_acks_sent_total", channel=CHANNEL, code="AR") == 2  # ADT and oversize
    assert total(m, "koppel_acks_sent_total") == accepted_srm + 4 + 2
    assert value(m, "koppel_duplicates_total", channel=CHANNEL) == 1
    assert value(m, "koppel_frames_discarded_total", channel=CHANNEL, reason="oversize") == 1
    assert total(m, "koppel_frames_discarded_total") == 1
    assert value(m, "koppel_connections_refused_total", channel=CHANNEL, reason="not-allowed") == 1
    assert value(m, "koppel_connections_total", channel=CHANNEL) == 1
    assert value(m, "koppel_listener_up", channel=CHANNEL) == 1
    assert value(m, "koppel_ack_latency_seconds_count", channel=CHANNEL) == accepted_srm + 4 + 2

    # delivery
    assert value(m, "koppel_delivery_acks_total", destination="his-scheduling", code="AE") == 1
    assert value(m, "koppel_delivery_acks_total", destination="his-scheduling", code="AA") == EXTRA + 1
    assert value(m, "koppel_delivery_sent_total", destination="his-scheduling") == EXTRA + 2
    assert value(m, "koppel_delivery_retries_total", destination="his-scheduling") == 1
    assert value(m, "koppel_delivery_latency_seconds_count", destination="his-scheduling") == EXTRA + 1
    assert value(m, "koppel_delivery_acks_total", destination="lis-orders", code="AR") == 1
    assert value(m, "koppel_dead_letters_total", destination="lis-orders") == 1
    assert total(m, "koppel_dead_letters_total") == 1
    assert total(m, "koppel_delivery_acks_total", destination="document-archive") == 0
    assert value(m, "koppel_delivery_retries_total", destination="document-archive") >= 1  # connection refused
    his, lis, archive = (f"127.0.0.1:{sinks[n].port}" for n in ("his-scheduling", "lis-orders", "document-archive"))
    assert value(m, "koppel_queue_depth", queue=his) == 0
    assert value(m, "koppel_queue_depth", queue=lis) == 0
    assert value(m, "koppel_queue_depth", queue=archive) == 1
    assert value(m, "koppel_queue_oldest_age_seconds", queue=archive) > 0
    assert value(m, "koppel_destination_connected", queue=his) == 1
    assert value(m, "koppel_destination_connected", queue=archive) == 0
    assert sinks["his-scheduling"].delivered_count() == EXTRA + 1
    assert sinks["lis-orders"].stats()["answers"] == {"AR": 1}

    # mapping
    assert value(m, "koppel_mapping_outcomes_total", channel=CHANNEL, mapping="zorgdomein-srm", outcome="ok") == EXTRA + 1
    assert value(m, "koppel_mapping_outcomes_total", channel=CHANNEL, mapping="zorgdomein-srm", outcome="error") == 1
    assert value(m, "koppel_mapping_outcomes_total", channel=CHANNEL, mapping="zorgdomein-oru", outcome="ok") == 1
    assert value(m, "koppel_mapping_outcomes_total", channel=CHANNEL, mapping="zorgdomein-oru", outcome="held") == 1
    assert total(m, "koppel_mapping_outcomes_total") == EXTRA + 4

    # store and build
    assert value(m, "koppel_store_commit_seconds_count") > 0
    assert value(m, "koppel_store_commit_batch_size_sum") >= accepted_srm + 4
    assert total(m, "koppel_store_errors_total") == 0
    assert value(m, "koppel_build_info", version=__version__) == 1


def test_a_rejected_message_is_neither_mapped_nor_counted_as_filtered(flow):
    port, metrics_port, sinks = flow
    client = MLLPClient(port, timeout=5)
    # SRM^S01 in a version the channel does not accept, and a type it does not accept
    codes = [ack(client, srm("V26", "ZD100000777", version="2.6")), ack(client, adt("A2"))]
    client.close()
    assert codes == ["AR", "AR"]
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        m = scrape(metrics_port)
        if total(m, "koppel_mapping_outcomes_total") or total(m, "koppel_filtered_total"):
            break
        time.sleep(0.05)
    assert value(m, "koppel_received_messages_total", channel=CHANNEL, type="other", outcome="rejected") == 2
    assert total(m, "koppel_mapping_outcomes_total") == 0
    assert total(m, "koppel_filtered_total") == 0
    assert sinks["his-scheduling"].received_ids() == []
