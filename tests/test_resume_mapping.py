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
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from engine.bundle import load_bundle
from engine.core import mllp
from engine.core.header import read_header
from engine.core.response import read_ack
from engine.shell.engine import RESUME_INTERVAL, Engine, receive_settings
from engine.store import PENDING, UNANSWERED, Append, ReceivedMessage, open_store
from tests.conftest import load_sample

ROOT = Path(__file__).resolve().parent.parent
SRM = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")


def stored_pending(store, raw: bytes, *, channel: str = "zorgdomein-in", status: str = "accepted",
                   processing: str = PENDING) -> int:
    """The row an engine killed before the hand-off committed leaves: PENDING (on-store, the AA
    already sent) or UNANSWERED (on-map, nothing sent yet)."""
    header = read_header(raw, default_charset="8859/1")
    message = ReceivedMessage(
        channel=channel, peer="127.0.0.1:40000", received_at=1_700_000_000.0, control_id=header.control_id,
        sender=header.sender, message_type=f"{header.message_type}^{header.trigger}", structure=header.structure,
        version=header.version, processing_id=header.processing_id, charset="8859/1", raw=raw,
        payload_hash=hashlib.sha256(raw).digest(), status=status, ack_code="AA", ack=b"MSA|AA|x", error=None,
        duplicate_window=86400.0, processing=processing,
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
        assessment = assess(raw, rules=AcceptRules(), default_charset="8859/1")
        return settings.receive_marks(assessment, (), settings.routing(assessment, raw))

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
    mapped = stored_pending(world.store, SRM, processing=UNANSWERED)
    siu = SRM.replace(b"SRM^S01^SRM_S01", b"SIU^S12^SIU_S12")  # accepted here, but no route takes it
    unrouted = stored_pending(world.store, siu, processing=UNANSWERED)
    oml = stored_pending(world.store, load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7"),
                         processing=UNANSWERED)
    world.start()
    assert row(world.store, mapped) == ("mapped", "accepted", "AA")
    assert row(world.store, unrouted) == ("filtered", "rejected", "AR")
    assert row(world.store, oml)[0] == "forwarded"
    assert world.store.queue_depths().get("127.0.0.1:6663") == 1  # the OML^O21 for the LIS, as received


def test_the_listener_marks_every_accepted_on_map_message_unanswered(world, on_map_channels):
    bundle = load_bundle(on_map_channels, ROOT / "mappings")
    engine = Engine(MemoryReactorClock(), bundle.config, world.store, retention=None,
                    mappings=bundle.mappings, book=bundle.book)
    (channel,) = [c for c in bundle.config.channels if c.name == "zorgdomein-in"]
    settings = receive_settings(channel, bundle.config, engine.senders, engine.processor,
                                committer=engine.committer)
    from engine.core.intake import AcceptRules, assess

    siu = SRM.replace(b"SRM^S01^SRM_S01", b"SIU^S12^SIU_S12")
    for raw in (SRM, siu):  # mapped, and filtered only once answered
        assessment = assess(raw, rules=AcceptRules(), default_charset="8859/1")
        assert settings.receive_marks(assessment, (), settings.routing(assessment, raw)) == {
            "processing": UNANSWERED}


# --------------------------------------------------------------------------- found in review


def frames(transport) -> list[bytes]:
    return [e.payload for e in mllp.FrameReader(max_frame_bytes=1 << 20).feed(transport.value())
            if isinstance(e, mllp.FrameReceived)]


def test_a_resend_of_an_unanswered_on_map_message_is_told_to_wait_not_given_its_provisional_aa(
        world, on_map_channels):
    """The sender resends as soon as the restarted engine listens, before the resumed mapping
    commits; that mapping then refuses the message. The resend must not get the AA stored with
    the first copy before its answer was decided."""
    world.channels = on_map_channels
    broken = SRM.replace(b"ARQ|ZD200046139|", b"ARQ||")  # no ZD-number: the mapping refuses it
    first = stored_pending(world.store, broken, processing=UNANSWERED)
    bundle = load_bundle(on_map_channels, ROOT / "mappings")
    engine = world.engine = Engine(MemoryReactorClock(), bundle.config, world.store, retention=None,
                                   mappings=bundle.mappings, book=bundle.book)
    engine.startService()
    (listener,) = [l for l in engine.listeners if l.factory.settings.channel == "zorgdomein-in"]
    receiver = listener.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    receiver.makeConnection(transport)
    receiver.dataReceived(mllp.encode_frame(broken))
    for _ in range(20):
        engine.reactor.advance(0)
    (answer,) = [read_ack(frame) for frame in frames(transport)]
    assert (answer.code, answer.control_id) == ("AE", read_header(broken, default_charset="8859/1").control_id)
    assert "still being processed" in answer.text
    assert row(world.store, first) == ("error", "rejected", "AE")  # its own outcome, stored
    receiver.dataReceived(mllp.encode_frame(broken))  # the resend after that: judged afresh
    for _ in range(20):
        engine.reactor.advance(0)
    assert [read_ack(frame).code for frame in frames(transport)] == ["AE", "AE"]


class RefusingDisk:
    """store.write that refuses every transaction holding an agenda save while ``full``."""

    def __init__(self, store, monkeypatch) -> None:
        from engine.store import SaveAgendaEntry, StoreError

        self.full, self.refused = True, 0
        real_write = store.write

        def write(ops, **kwargs):
            if self.full and any(isinstance(op, SaveAgendaEntry) for op in ops):
                self.refused += 1
                raise StoreError("disk full (injected)")
            return real_write(ops, **kwargs)

        monkeypatch.setattr(store, "write", write)


def connect(engine):
    (listener,) = [l for l in engine.listeners if l.factory.settings.channel == "zorgdomein-in"]
    receiver = listener.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    receiver.makeConnection(transport)
    return receiver, transport


def turns(engine, n: int = 20, step: float = 0.0) -> None:
    for _ in range(n):
        engine.reactor.advance(step)


def test_a_mapping_commit_the_store_refuses_is_waited_out_and_a_later_cancellation_waits_behind_it(
        world, monkeypatch):
    engine = world.start()
    disk = RefusingDisk(world.store, monkeypatch)
    receiver, transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(SRM))
    turns(engine)
    receiver.dataReceived(mllp.encode_frame(SRM.replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S01")
                                            .replace(b"g20ce6a9f8ca4f551275", b"g20ce6a9f8ca4f551276")))
    turns(engine, 20, 0.1)  # two seconds of a full disk
    assert [read_ack(frame).code for frame in frames(transport)] == ["AA", "AA"]  # both stored
    request, cancel = sorted(m.id for m in world.store.list_messages())
    assert disk.refused >= 3 and world.processing(request) == world.processing(cancel) == PENDING
    disk.full = False
    turns(engine, 40, 0.5)  # the next attempt (at most 30 s after the last) finds room
    assert (world.processing(request), world.processing(cancel)) == ("mapped", "mapped")
    (entry,) = world.store.list_agenda_entries()
    assert entry.state == "cancelled"  # the request first, then its cancellation


def test_a_message_the_store_keeps_refusing_while_it_takes_other_writes_is_recorded_error(world, monkeypatch):
    from engine.shell.processor import STORE_ATTEMPTS

    engine = world.start()
    disk = RefusingDisk(world.store, monkeypatch)  # refuses agenda saves only: this message is the culprit
    receiver, _transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(SRM))
    turns(engine, 200, 0.5)
    (message,) = world.store.list_messages()
    assert disk.refused >= STORE_ATTEMPTS and world.processing(message.id) == "error"


def test_resume_follows_how_the_message_was_stored_not_todays_ack_mode(world):
    """Stored by an on-map engine (its raw forward not queued yet), resumed by an on-store one:
    the forward is still queued, and the mapping done."""
    oml = stored_pending(world.store, load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7"),
                         processing=UNANSWERED)
    world.start()  # the bundled config: on-store, OML^O21 mapped and forwarded to the LIS
    assert world.processing(oml) == "mapped"
    assert world.store.queue_depths().get("127.0.0.1:6663") == 1


def test_pruning_keeps_a_message_whose_hand_off_is_not_done(world):
    from engine.store import Prune

    pending = stored_pending(world.store, SRM)
    (result,) = world.store.write([Prune(before=2_000_000_000.0)])
    assert result.messages == 0 and world.processing(pending) == PENDING


# --------------------------------------------------------------------------- hand-off edge cases (review)
OML = load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7")


def entries_of(store, message_id):
    return store._query("SELECT count(*) FROM queue_entries WHERE message_id = ?", (message_id,))[0][0]


def channels_copy(tmp_path, name, edit):
    channels = tmp_path / name
    shutil.copytree(ROOT / "channels", channels)
    path = channels / "zorgdomein-in.yaml"
    path.write_text(edit(path.read_text()))
    return channels


# on-map, raw forwards only, no mappings loaded (no processor): still finished
def test_on_map_without_mappings_unanswered_message_is_finished(tmp_path, world):
    channels = channels_copy(tmp_path, "ch", lambda t: t.replace("mode: on-store", "mode: on-map")
                             .split("routes:")[0] + "routes:\n  - when: {types: [OML^O21]}\n    to: [lis-orders]\n")
    empty = tmp_path / "nomaps"
    empty.mkdir()
    (tmp_path / "ch" / "scheduler-in.yaml").unlink()
    bundle = load_bundle(channels, empty)
    assert bundle.mappings is None
    oml = stored_pending(world.store, OML, processing=UNANSWERED)  # kill -9 before forward_raw committed
    engine = world.engine = Engine(MemoryReactorClock(), bundle.config, world.store, retention=None,
                                   mappings=None, book=None)
    engine.startService()
    turns(engine)
    engine.reactor.advance(3 * RESUME_INTERVAL)
    turns(engine)
    receiver, _transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(OML))  # the sender's resend
    turns(engine)
    assert row(world.store, oml)[0] == "forwarded"



# a reload between the insert and the hand-off: handed on as it was stored
def test_reload_on_store_to_on_map_between_insert_and_handoff_forwards_once(tmp_path, world):
    engine = world.start()  # bundled: on-store, OML^O21 mapped + forwarded raw to lis-orders
    receiver, _transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(OML))  # Append submitted, not committed yet
    on_map = load_bundle(channels_copy(tmp_path, "onmap", lambda t: t.replace("mode: on-store", "mode: on-map")),
                         ROOT / "mappings")
    engine.reload(on_map)  # SIGHUP
    turns(engine)
    (m,) = [m for m in world.store.list_messages() if m.peer != "koppel"]
    assert entries_of(world.store, m.id) == 1


def test_reload_on_map_to_on_store_between_insert_and_handoff_still_forwards(tmp_path, world):
    world.channels = channels_copy(tmp_path, "onmap", lambda t: t.replace("mode: on-store", "mode: on-map"))
    engine = world.start()
    receiver, _transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(OML))
    engine.reload(load_bundle(ROOT / "channels", ROOT / "mappings"))
    turns(engine)
    engine.reactor.advance(3 * RESUME_INTERVAL)
    turns(engine)
    (m,) = [m for m in world.store.list_messages() if m.peer != "koppel"]
    assert entries_of(world.store, m.id) == 1



# an error after the mapping commit (waking the senders) does not map the batch again
def test_an_error_after_the_mapping_commit_does_not_map_twice(world):
    engine = world.start()
    real = engine.processor.on_queued
    calls = {"n": 0}

    def on_queued(targets):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("wake failed (injected)")
        real(targets)

    engine.processor.on_queued = on_queued
    receiver, _transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(SRM))
    turns(engine)
    msgs = world.store.list_messages()
    assert len(world.store.list_agenda_entries()) == 1
    assert len([m for m in msgs if m.peer == "koppel"]) == 1


# ACK order on one connection: an on-map message waiting, a duplicate answered at once
def test_ack_order_on_map(tmp_path, world):
    world.channels = channels_copy(tmp_path, "onmap", lambda t: t.replace("mode: on-store", "mode: on-map"))
    engine = world.start()
    receiver, transport = connect(engine)
    receiver.dataReceived(mllp.encode_frame(OML))
    turns(engine)
    srm2 = SRM.replace(b"|g20ce6a9f8ca4f551275|", b"|g20ce6a9f8ca4f551277|")
    receiver.dataReceived(mllp.encode_frame(srm2) + mllp.encode_frame(OML) + mllp.encode_frame(srm2))
    turns(engine)
    got = [(read_ack(f).code, read_ack(f).control_id, read_ack(f).text) for f in frames(transport)]
    assert [g[0] for g in got] == ["AA", "AA", "AA", "AE"]



# enhanced mode MSH-15=SU, on-map, the mapping refuses: the CE is withheld, no CA goes out
def test_on_map_su_refused_message_is_not_answered_ca(tmp_path, world):
    world.channels = channels_copy(tmp_path, "onmap", lambda t: t.replace("mode: on-store", "mode: on-map"))
    engine = world.start()
    receiver, transport = connect(engine)
    broken = SRM.replace(b"ARQ|ZD200046139|", b"ARQ||").replace(b"|2.4|||||NLD|", b"|2.4|||SU||NLD|")
    receiver.dataReceived(mllp.encode_frame(broken))
    turns(engine)
    got = [read_ack(f).code for f in frames(transport)]
    assert got == []  # CE withheld (SU: successes only), and no provisional CA either


# a reactor stall (slow fsync, clock step) past RESUME_INTERVAL while an on-map raw forward
# is in the committer: the periodic resume leaves it be
def test_on_map_raw_forward_in_the_committer_is_not_queued_twice_by_the_periodic_resume(tmp_path, world):
    world.channels = channels_copy(tmp_path, "onmap", lambda t: t.replace("mode: on-store", "mode: on-map")
                                   .replace("    map: zorgdomein-oml\n    to: [lis-orders]", "    to: [lis-orders]"))
    engine = world.start()
    receiver, _transport = connect(engine)
    real = world.store.write
    engine.reactor.advance(RESUME_INTERVAL - 1)  # the periodic resume is due in 1 s

    def write(ops, **kw):  # the commit of the insert stalls the reactor 61 s (slow fsync; or an NTP step)
        result = real(ops, **kw)
        if any(type(op).__name__ == "Append" for op in ops):
            engine.reactor.rightNow += RESUME_INTERVAL + 1
        return result

    world.store.write = write
    receiver.dataReceived(mllp.encode_frame(OML))
    turns(engine)
    (m,) = [m for m in world.store.list_messages() if m.peer != "koppel"]
    assert entries_of(world.store, m.id) == 1


def test_messages_resumed_at_start_wait_for_mapping_without_their_bodies(world, monkeypatch):
    """After a crash with a backlog of letters, the start's resume reads the store in pages
    bounded by bytes and queues works without bodies; each is read again when it is mapped."""
    import engine.shell.engine as engine_module

    monkeypatch.setattr(engine_module, "RESUME_PAGE_BYTES", 2 * len(SRM))
    ids = [stored_pending(world.store, SRM.replace(b"ZD200046139", f"ZD2000461{n:02d}".encode()))
           for n in range(40, 46)]
    pages, queued = [], []
    real_pending = world.store.pending_processing

    def pending_processing(**kwargs):
        page = real_pending(**kwargs)
        pages.append(len(page))
        return page

    monkeypatch.setattr(world.store, "pending_processing", pending_processing)
    from engine.shell.processor import Processor

    real_submit = Processor.submit

    def submit(self, work):
        queued.append((work.raw, work.size))
        return real_submit(self, work)

    monkeypatch.setattr(Processor, "submit", submit)
    world.start()
    assert [world.processing(i) for i in ids] == ["mapped"] * 6
    assert len(world.store.list_agenda_entries()) == 6
    assert queued == [(None, len(SRM))] * 6
    assert max(pages) == 2


def test_a_page_of_pending_messages_ends_with_the_one_reaching_max_bytes(world):
    ids = [stored_pending(world.store, SRM + b"X" * n) for n in (0, 100, 200, 300)]
    page = world.store.pending_processing(max_bytes=len(SRM) + 50)
    assert [m.id for m in page] == ids[:2]  # the first, then the second that passes the bound
    assert [m.id for m in world.store.pending_processing(max_bytes=1, after_id=ids[1])] == ids[2:3]
    assert [m.id for m in world.store.pending_processing()] == ids
