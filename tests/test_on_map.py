"""ack: on-map channels answer after mapping; on-store channels count what no route takes."""

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from engine.bundle import load_bundle
from engine.core import mllp
from engine.core.ack import ControlIds
from engine.core.response import read_ack
from engine.metrics import Metrics
from engine.shell.committer import GroupCommitter
from engine.shell.engine import receive_settings
from engine.shell.listener import MLLPListenerFactory
from engine.store import open_store
from tests.conftest import load_sample
from tests.factories import processor_for

REPO = Path(__file__).resolve().parent.parent

def channel_with(routes: str) -> str:
    """A channel (YAML, a format string for Harness: {accept}, {mode}, {ack_extra}) with the
    bundled destinations and ``routes`` (YAML lines, braces doubled)."""
    return """
name: zd
source:
  listen: tcp:0
{accept}ack:
  mode: {mode}{ack_extra}
destinations:
  his-scheduling: {{endpoint: "tcp:host=127.0.0.1:port=6661"}}
  ris-orders: {{endpoint: "tcp:host=127.0.0.1:port=6662"}}
  lis-orders: {{endpoint: "tcp:host=127.0.0.1:port=6663"}}
  document-archive: {{endpoint: "tcp:host=127.0.0.1:port=6664"}}
routes:
""" + routes


CHANNEL = channel_with("""  - when: {{types: [SRM^S01, SRM^S04]}}
    map: zorgdomein-srm
  - when: {{types: [OML^O21]}}
    to: [lis-orders]
""")


class Harness:
    def __init__(self, tmp_path, mode, *, rejected=None, accept=None, channel=CHANNEL):
        channels = tmp_path / "channels"
        channels.mkdir()
        (channels / "zd.yaml").write_text(channel.format(
            mode=mode,
            ack_extra=f"\n  rejected: {rejected}" if rejected else "",
            accept=f"accept:\n  types: [{accept}]\n" if accept else "",
        ))
        self.bundle = load_bundle(channels, REPO / "mappings")
        config = self.bundle.config
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_795_000_000)
        self.store = open_store(f"sqlite:///{tmp_path}/k.db")
        self.metrics = Metrics()
        self.committer = GroupCommitter(self.store, clock=self.reactor)
        processor = processor_for(self, config=config, prefix="KO-")
        settings = receive_settings(config.channels[0], config, {}, processor, committer=self.committer,
                                    metrics=self.metrics)
        factory = MLLPListenerFactory(settings, committer=self.committer, metrics=self.metrics,
                                      clock=self.reactor, control_ids=ControlIds("KA-"))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, raw: bytes):
        self.transport.clear()
        self.protocol.dataReceived(mllp.encode_frame(raw))
        for _ in range(20):
            self.reactor.advance(0)
        frames = [e.payload for e in mllp.FrameReader(max_frame_bytes=1 << 20).feed(self.transport.value())
                  if isinstance(e, mllp.FrameReceived)]
        assert len(frames) == 1
        return frames[0]

    def row(self, control_id):
        (row,) = [m for m in self.store.list_messages(limit=100) if m.control_id == control_id and m.peer != "koppel"]
        return row


@pytest.fixture
def onmap(tmp_path):
    h = Harness(tmp_path, "on-map")
    yield h
    h.store.close()


@pytest.fixture
def onstore(tmp_path):
    h = Harness(tmp_path, "on-store")
    yield h
    h.store.close()


def srm() -> bytes:
    return load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")


def test_on_map_answers_aa_only_after_the_message_mapped_into_an_agenda(onmap):
    ack = onmap.send(srm())
    reply = read_ack(ack)
    assert (reply.code, reply.control_id) == ("AA", "g20ce6a9f8ca4f551275")
    assert onmap.store.list_agenda_entries()[0].state == "requested"
    assert onmap.row("g20ce6a9f8ca4f551275").processing == "mapped"


def test_on_map_answers_ae_with_an_err_naming_the_missing_field(onmap):
    broken = srm().replace(b"ARQ|ZD200046139|", b"ARQ||")
    ack = onmap.send(broken)
    reply = read_ack(ack)
    assert reply.code == "AE"
    err = [seg for seg in ack.split(b"\r") if seg.startswith(b"ERR")][0]
    assert err.split(b"|")[1].startswith(b"ARQ^1^1^101")  # v2.4: ERR-1 segment^sequence^field^code
    row = onmap.row("g20ce6a9f8ca4f551275")
    assert (row.status, row.processing, row.ack_code) == ("rejected", "error", "AE")
    assert onmap.store.list_agenda_entries() == []


def test_on_map_resend_after_a_fix_is_processed_again_not_answered_from_the_nak(onmap):
    broken = srm().replace(b"ARQ|ZD200046139|", b"ARQ||")
    assert read_ack(onmap.send(broken)).code == "AE"
    assert read_ack(onmap.send(broken)).code == "AE"  # the same bad message: still AE, not a stale answer
    assert read_ack(onmap.send(srm())).code == "AA"


def test_on_map_answers_ar_for_a_message_no_route_takes(onmap):
    orm = load_sample("zorgdomein/zd_orm_o01_lab_v24.hl7")
    reply = read_ack(onmap.send(orm))
    assert reply.code == "AR"
    assert onmap.row("e49ce31d").processing == "filtered"
    assert onmap.metrics.registry.get_sample_value("koppel_filtered_total", {"channel": "zd"}) == 1


@pytest.fixture
def harness(tmp_path):
    """Harness(mode, **channel settings), closed after the test."""
    made = []

    def make(mode, **settings):
        made.append(Harness(tmp_path, mode, **settings))
        return made[-1]

    yield make
    for h in made:
        h.store.close()


ORM = "zorgdomein/zd_orm_o01_lab_v24.hl7"


@pytest.mark.parametrize("mode", ["on-map", "on-store"])
def test_ack_rejected_ae_answers_ae_for_a_type_the_channel_does_not_accept(harness, mode):
    """HL7's AR also means "receiver problem, try again": a sender that retries AR for ever
    stops on AE. The refusal is the same (ERR 200, kept as rejected); only the code differs."""
    h = harness(mode, rejected="AE", accept="SRM^S01")
    reply = read_ack(h.send(load_sample(ORM)))
    assert (reply.code, h.row("e49ce31d").status) == ("AE", "rejected")
    assert "not accepted" in reply.text


def test_ack_rejected_ae_answers_ae_on_map_for_a_message_no_route_takes(harness):
    h = harness("on-map", rejected="AE")
    assert read_ack(h.send(load_sample(ORM))).code == "AE"
    assert h.row("e49ce31d").processing == "filtered"


def test_a_refused_message_still_gets_ar_by_default(harness):
    assert read_ack(harness("on-store", accept="SRM^S01").send(load_sample(ORM))).code == "AR"


def test_on_map_queues_raw_forwards_without_mapping(onmap):
    oml = load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7")
    assert read_ack(onmap.send(oml)).code == "AA"
    assert onmap.store.queue_depths() == {"127.0.0.1:6663": 1}


def test_on_store_acks_first_and_marks_what_no_route_takes_as_filtered(onstore):
    orm = load_sample("zorgdomein/zd_orm_o01_lab_v24.hl7")
    assert read_ack(onstore.send(orm)).code == "AA"
    onstore.reactor.advance(0.05)  # the filtered mark rides along with a later commit
    row = onstore.row("e49ce31d")
    assert (row.status, row.processing) == ("accepted", "filtered")
    assert "ORM^O01" in row.processing_detail
    assert onstore.metrics.registry.get_sample_value("koppel_filtered_total", {"channel": "zd"}) == 1


def test_on_store_acks_a_message_that_does_not_map_and_keeps_the_error(onstore):
    broken = srm().replace(b"ARQ|ZD200046139|", b"ARQ||")
    assert read_ack(onstore.send(broken)).code == "AA"
    row = onstore.row("g20ce6a9f8ca4f551275")
    assert (row.status, row.processing) == ("accepted", "error")
    assert "ARQ-1" in row.processing_detail


def test_a_mapping_channels_fallback_counter_is_exported_as_zero_from_the_start(onstore):
    """A dashboard's rate() needs the series before the first fallback, not after it."""
    assert onstore.metrics.registry.get_sample_value("koppel_agenda_fallback_total", {"channel": "zd"}) == 0
