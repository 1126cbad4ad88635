"""A message stored (and, on-store, acknowledged) whose mapping never committed, because the
engine stopped in between, is mapped when the engine starts again.

The listener stores every message that a route maps as processing 'pending' in the same
insert; the processor replaces that with its outcome. These tests write the 'pending' row
an engine killed after its ACK would have left, start an unstarted-until-now ``Engine``
(bundled channels and mappings, a real SQLite store, a ``MemoryReactorClock``), and check
what became of it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from engine.bundle import load_bundle
from engine.core.header import read_header
from engine.shell.engine import PENDING, Engine, receive_settings
from engine.store import Append, ReceivedMessage, open_store
from tests.conftest import load_sample

ROOT = Path(__file__).resolve().parent.parent
SRM = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")


def stored_pending(store, raw: bytes, *, channel: str = "zorgdomein-in", status: str = "accepted") -> int:
    header = read_header(raw, default_charset="8859/1")
    message = ReceivedMessage(
        channel=channel, peer="127.0.0.1:40000", received_at=1_700_000_000.0, control_id=header.control_id,
        sender=header.sender, message_type=f"{header.message_type}^{header.trigger}", structure=header.structure,
        version=header.version, processing_id=header.processing_id, charset="8859/1", raw=raw,
        payload_hash=hashlib.sha256(raw).digest(), status=status, ack_code="AA", ack=b"MSA|AA|x", error=None,
        duplicate_window=86400.0, processing=PENDING,
    )
    (result,) = store.write([Append(message=message)])
    return result.message_id


class World:
    def __init__(self, tmp_path: Path, channels: Path | None = None) -> None:
        self.url = f"sqlite:///{tmp_path}/koppel.db"
        self.store = open_store(self.url)
        self.channels = channels or ROOT / "channels"
        self.engine: Engine | None = None

    def start(self) -> Engine:
        bundle = load_bundle(self.channels, ROOT / "mappings")
        self.engine = Engine(MemoryReactorClock(), bundle.config, self.store, retention=None,
                             mappings=bundle.mappings, book=bundle.book)
        self.engine.startService()
        for _ in range(10):  # the processor's turn, the commit's two turns
            self.engine.reactor.advance(0)
        return self.engine

    def processing(self, message_id: int) -> str | None:
        (row,) = self.store._query("SELECT processing FROM messages WHERE id = ?", (message_id,))
        return row[0]

    def close(self) -> None:
        if self.engine is not None and self.engine.running:
            self.engine.stopService()
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def test_a_message_acknowledged_but_never_mapped_is_mapped_when_the_engine_starts(world):
    message_id = stored_pending(world.store, SRM)
    world.start()
    assert world.processing(message_id) == "mapped"
    assert world.store.pending_processing() == []
    assert [(e.agenda_id, e.state) for e in world.store.list_agenda_entries()] == [("cardiology", "requested")]
    assert world.store.queue_depths() == {"127.0.0.1:6661": 1}  # the SIU^S12 for the HIS is queued


def test_resumed_messages_are_mapped_in_arrival_order_before_new_ones(world):
    cancel = SRM.replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S01")
    first = stored_pending(world.store, SRM)
    second = stored_pending(world.store, cancel)  # the cancellation, stored after its request
    world.start()
    assert (world.processing(first), world.processing(second)) == ("mapped", "mapped")
    (entry,) = world.store.list_agenda_entries()
    assert entry.state == "cancelled"  # had the order been lost, the S04 would find no entry


def test_a_resumed_message_no_route_maps_any_more_is_recorded_as_filtered(world, tmp_path):
    channels = tmp_path / "channels"
    shutil.copytree(ROOT / "channels", channels)
    text = (channels / "zorgdomein-in.yaml").read_text()
    (channels / "zorgdomein-in.yaml").write_text(text.replace("types: [SRM^S01, SRM^S04]}", "types: [SRM^S04]}"))
    world.channels = channels
    message_id = stored_pending(world.store, SRM)
    world.start()
    assert world.processing(message_id) == "filtered"


def test_a_resumed_message_of_a_channel_no_longer_configured_is_an_error_not_forgotten(world):
    message_id = stored_pending(world.store, SRM, channel="retired-channel")
    world.start()
    assert world.processing(message_id) == "error"
    assert world.store.pending_processing() == []


def test_the_listener_marks_a_mapped_route_pending_in_the_insert_and_filtered_otherwise(world):
    bundle = load_bundle(ROOT / "channels", ROOT / "mappings")
    engine = Engine(MemoryReactorClock(), bundle.config, world.store, retention=None,
                    mappings=bundle.mappings, book=bundle.book)
    (channel,) = [c for c in bundle.config.channels if c.name == "zorgdomein-in"]
    settings = receive_settings(channel, bundle.config, engine.senders, engine.processor,
                                committer=engine.committer)
    from engine.core.intake import AcceptRules, assess

    def marks(raw):
        return settings.receive_marks(assess(raw, rules=AcceptRules(), default_charset="8859/1"), ())

    assert marks(SRM) == {"processing": PENDING}
    siu = load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7")
    assert marks(siu) == {"processing": PENDING}
    adt = SRM.replace(b"SRM^S01^SRM_S01", b"ADT^A01^ADT_A01")  # no route takes it
    assert marks(adt)["processing"] == "filtered"


@pytest.fixture
def on_map_channels(tmp_path):
    """The bundled channels with zorgdomein-in answering on-map, and OML^O21 forwarded raw only."""
    channels = tmp_path / "channels"
    shutil.copytree(ROOT / "channels", channels)
    path = channels / "zorgdomein-in.yaml"
    text = path.read_text().replace("mode: on-store", "mode: on-map")
    text = text.replace("    map: zorgdomein-oml\n    to: [lis-orders]", "    to: [lis-orders]")
    path.write_text(text)
    return channels


def row(store, message_id: int) -> tuple:
    (r,) = store._query("SELECT processing, status, ack_code FROM messages WHERE id = ?", (message_id,))
    return r


def test_on_map_messages_never_answered_are_handed_on_at_start_and_their_answer_stored(world, on_map_channels):
    """on-map: the engine stopped before answering. A mapped one stays accepted (a resend gets
    its AA from the stored copy); one no route takes is stored AR, so a resend is judged afresh;
    a raw forward is queued."""
    world.channels = on_map_channels
    mapped = stored_pending(world.store, SRM)
    siu = SRM.replace(b"SRM^S01^SRM_S01", b"SIU^S12^SIU_S12")  # accepted here, but no route takes it
    unrouted = stored_pending(world.store, siu)
    oml = stored_pending(world.store, load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7"))
    world.start()
    assert row(world.store, mapped) == ("mapped", "accepted", "AA")
    assert row(world.store, unrouted) == ("filtered", "rejected", "AR")
    assert row(world.store, oml)[0] == "forwarded"
    assert world.store.queue_depths().get("127.0.0.1:6663") == 1  # the OML^O21 for the LIS, as received


def test_the_listener_marks_every_accepted_on_map_message_pending(world, on_map_channels):
    bundle = load_bundle(on_map_channels, ROOT / "mappings")
    engine = Engine(MemoryReactorClock(), bundle.config, world.store, retention=None,
                    mappings=bundle.mappings, book=bundle.book)
    (channel,) = [c for c in bundle.config.channels if c.name == "zorgdomein-in"]
    settings = receive_settings(channel, bundle.config, engine.senders, engine.processor,
                                committer=engine.committer)
    from engine.core.intake import AcceptRules, assess

    siu = SRM.replace(b"SRM^S01^SRM_S01", b"SIU^S12^SIU_S12")
    for raw in (SRM, siu):  # mapped, and filtered only once answered
        assert settings.receive_marks(assess(raw, rules=AcceptRules(), default_charset="8859/1"), ()) == {
            "processing": PENDING}
