"""The MLLP listener shell, driven byte by byte without sockets or sleeps.

A ``StringTransport`` stands in for the TCP connection and a ``MemoryReactorClock``
for the reactor: ``clock.advance(0)`` runs the group commit, ``clock.advance(n)``
fires the timeouts. Where "ACK only after commit" matters a real SQLite store sits
behind the real ``GroupCommitter``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from ipaddress import ip_network

import pytest
from conftest import load_sample
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from engine.core import mllp
from engine.core.ack import ControlIds
from engine.core.intake import AcceptRules
from engine.core.response import read_ack
from engine.metrics import Metrics
from engine.shell import listener as listener_module
from engine.shell.committer import GroupCommitter
from engine.shell.listener import MLLPListenerFactory, MLLPReceiver, ReceiveSettings
from engine.store import AppendResult, StoreError, open_store

CHANNEL = "zorgdomein-in"
NOW = datetime(2026, 1, 2, 16, 15, 45, tzinfo=timezone.utc)
PID = b"PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^T^^^^^L||19800623|M"


def message(
    control_id: str = "MSG00001",
    *,
    type_: str = "ORU^R01",
    version: str = "2.4",
    accept_ack: str = "",
    app_ack: str = "",
    charset: str = "8859/1",
    body: bytes = PID,
) -> bytes:
    """A synthetic HL7 message (test BSN 123456782) with the MSH fields a test varies."""
    msh = (
        f"MSH|^~\\&|ZorgDomein|ZD|Koppel|ZH|20260102161545+0100||{type_}|{control_id}|P|{version}"
        f"|||{accept_ack}|{app_ack}|NLD|{charset}"
    ).encode("ascii")
    return msh + b"\r" + body + b"\r"


def frame(payload: bytes) -> bytes:
    return mllp.encode_frame(payload)


def acks(transport: StringTransport) -> list[bytes]:
    """Every ACK payload written so far, in order (and nothing but whole frames)."""
    reader = mllp.FrameReader(max_frame_bytes=1 << 20)
    events = reader.feed(transport.value())
    assert all(type(e) is mllp.FrameReceived for e in events), events
    assert not reader.in_frame
    return [e.payload for e in events]


def err_segment(ack: bytes) -> bytes:
    return next(s for s in ack.split(b"\r") if s.startswith(b"ERR|"))


class RecordingCommitter:
    """A committer whose commits the test completes by hand, in any order."""

    def __init__(self) -> None:
        self.submitted: list[tuple[object, defer.Deferred]] = []

    def submit(self, op) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.submitted.append((op, d))
        return d

    def commit(self, index: int) -> None:
        op, d = self.submitted[index]
        d.callback(AppendResult(message_id=index + 1, duplicate_of=None, ack=op.message.ack))


class FailingStore:
    """A store whose disk is full: every write fails, nothing is kept."""

    def __init__(self) -> None:
        self.attempts = 0

    def write(self, ops, wait=True):
        self.attempts += 1
        raise StoreError(f"store write of {len(ops)} operations failed: database or disk is full")


class Harness:
    """One listener factory with its clock, metrics and (optionally) a real store."""

    def __init__(self, *, store=None, committer=None, **settings) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.store = store
        self.committer = committer or GroupCommitter(store, clock=self.clock, metrics=self.metrics)
        self.settings = ReceiveSettings(channel=CHANNEL, **settings)
        self.factory = MLLPListenerFactory(
            self.settings,
            committer=self.committer,
            metrics=self.metrics,
            clock=self.clock,
            control_ids=ControlIds("KTEST-"),
            now=lambda: NOW,
        )
        self._port = 40000

    def connect(self, host: str = "127.0.0.1"):
        self._port += 1
        address = IPv4Address("TCP", host, self._port)
        receiver = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        receiver.makeConnection(transport)
        if not isinstance(receiver, MLLPReceiver):  # refused: closed the moment it connects
            assert transport.disconnecting and transport.value() == b""
            return None, None
        return receiver, transport

    def sample(self, name: str, **labels) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"channel": CHANNEL, **labels})

    def stored(self):
        return self.store.list_messages(channel=CHANNEL, limit=1000)


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/koppel.db")
    yield s
    s.close()


@pytest.fixture
def harness(store):
    return Harness(store=store)


# --------------------------------------------------------------------------- commit, then ACK


def test_no_ack_is_written_before_the_commit_turn_and_the_message_is_stored_when_it_is(harness):
    receiver, transport = harness.connect()
    payload = message("MSG00001")
    receiver.dataReceived(frame(payload))
    assert transport.value() == b""
    assert harness.stored() == []

    harness.clock.advance(0)

    [ack] = acks(transport)
    reply = read_ack(ack)
    assert (reply.code, reply.control_id) == ("AA", "MSG00001")
    [row] = harness.stored()
    assert harness.store.get_message(row.id).raw == payload
    assert harness.store.get_message(row.id).ack == ack


def test_the_ack_mirrors_the_sender_and_carries_an_injected_control_id_and_clock(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG00001")))
    harness.clock.advance(0)
    [ack] = acks(transport)
    assert ack.split(b"\r")[0] == b"MSH|^~\\&|Koppel|ZH|ZorgDomein|ZD|20260102161545+0000||ACK^R01^ACK|KTEST-1|P|2.4||||||8859/1"


def test_messages_from_several_connections_in_one_turn_share_one_commit(store):
    calls = []

    class CountingStore:
        def write(self, ops, wait=True):
            calls.append(len(ops))
            return store.write(ops)

    h = Harness(store=CountingStore())
    connections = [h.connect() for _ in range(3)]
    for n, (receiver, _) in enumerate(connections):
        receiver.dataReceived(frame(message(f"MSG{n}")))
    h.clock.advance(0)
    assert calls == [3]
    assert [read_ack(acks(t)[0]).code for _, t in connections] == ["AA", "AA", "AA"]


def test_a_store_error_is_answered_ae_with_err_207_and_never_aa():
    h = Harness(store=FailingStore())
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG00001", version="2.5.1")))
    assert transport.value() == b""
    h.clock.advance(0)

    [ack] = acks(transport)
    reply = read_ack(ack)
    assert (reply.code, reply.control_id) == ("AE", "MSG00001")
    err = err_segment(ack)
    assert b"207^Application internal error^HL70357" in err
    assert b"could not be stored" in err
    assert b"AA" not in ack.split(b"\r")[1]
    assert h.sample("koppel_received_messages_total", type="other", outcome="failed") == 1
    assert h.metrics.registry.get_sample_value("koppel_store_errors_total") == 1


def test_a_store_error_in_enhanced_mode_is_answered_ce():
    h = Harness(store=FailingStore())
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG00001", accept_ack="AL", app_ack="NE")))
    h.clock.advance(0)
    [ack] = acks(transport)
    assert read_ack(ack).code == "CE"
    assert b"could not be stored" in ack


def test_a_store_error_does_not_stop_the_connection_from_acking_later_messages(store):
    class FlakyStore:
        def __init__(self):
            self.fail = True

        def write(self, ops, wait=True):
            if self.fail:
                raise StoreError("disk I/O error")
            return store.write(ops)

    flaky = FlakyStore()
    h = Harness(store=flaky)
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG00001")))
    h.clock.advance(0)
    flaky.fail = False
    receiver.dataReceived(frame(message("MSG00001")))
    h.clock.advance(0)
    assert [read_ack(a).code for a in acks(transport)] == ["AE", "AA"]
    assert len(store.list_messages()) == 1


# --------------------------------------------------------------------------- framing and order


def test_pipelined_frames_in_one_read_are_acked_in_arrival_order(harness):
    receiver, transport = harness.connect()
    ids = [f"MSG{n:05d}" for n in range(5)]
    receiver.dataReceived(b"".join(frame(message(i)) for i in ids))
    harness.clock.advance(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ids
    assert sorted(m.control_id for m in harness.stored()) == ids


def test_acks_go_out_in_arrival_order_even_when_commits_finish_in_reverse():
    committer = RecordingCommitter()
    h = Harness(committer=committer)
    receiver, transport = h.connect()
    ids = ["MSG1", "MSG2", "MSG3"]
    receiver.dataReceived(b"".join(frame(message(i)) for i in ids))
    assert len(committer.submitted) == 3

    committer.commit(2)
    committer.commit(1)
    assert transport.value() == b""  # the first is not committed yet: nothing may overtake it
    committer.commit(0)

    assert [read_ack(a).control_id for a in acks(transport)] == ids


def test_a_later_failure_waits_behind_an_earlier_uncommitted_message():
    committer = RecordingCommitter()
    h = Harness(committer=committer)
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1")) + frame(message("MSG2")))
    committer.submitted[1][1].errback(StoreError("disk full"))
    assert transport.value() == b""
    committer.commit(0)
    assert [(read_ack(a).code, read_ack(a).control_id) for a in acks(transport)] == [
        ("AA", "MSG1"),
        ("AE", "MSG2"),
    ]


def test_a_frame_split_over_many_reads_is_stored_exactly_as_sent(harness):
    receiver, transport = harness.connect()
    payload = load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7")
    data = frame(payload)
    for i in range(len(data)):
        receiver.dataReceived(data[i : i + 1])
    harness.clock.advance(0)
    assert read_ack(acks(transport)[0]).code == "AA"
    [row] = harness.stored()
    assert harness.store.get_message(row.id).raw == payload


def test_junk_before_vt_is_counted_and_never_glued_to_the_message(harness):
    receiver, transport = harness.connect()
    payload = message("MSG00001")
    receiver.dataReceived(b"junk\r\n" + frame(payload) + b"\n\n" + frame(message("MSG00002")))
    harness.clock.advance(0)
    assert [read_ack(a).code for a in acks(transport)] == ["AA", "AA"]
    assert harness.sample("koppel_junk_bytes_total") == 8
    first = min(harness.stored(), key=lambda m: m.id)
    assert harness.store.get_message(first.id).raw == payload


def test_a_malformed_frame_gets_ar_and_the_frames_after_it_are_still_acked(harness):
    """txHL7 raises out of dataReceived here and loses every frame behind the bad one."""
    receiver, transport = harness.connect()
    receiver.dataReceived(
        frame(message("MSG1")) + frame(b"this is not an HL7 message\r") + frame(message("MSG3"))
    )
    harness.clock.advance(0)
    replies = [read_ack(a) for a in acks(transport)]
    assert [r.code for r in replies] == ["AA", "AR", "AA"]
    assert [replies[0].control_id, replies[2].control_id] == ["MSG1", "MSG3"]
    bad = acks(transport)[1]
    assert b"|100^Segment sequence error^HL70357|" in err_segment(bad)
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "sample",
    [
        "public/trusted-intermediary_MALFORMED_missing_msh2.hl7",
        "public/trusted-intermediary_MALFORMED_msh_only_pipe.hl7",
        "public/python-hl7_malformed_batch_no_msh.hl7",
        "public/node-hl7-complete_mdm_t04_wrapped_MALFORMED.hl7",
    ],
)
def test_a_malformed_sample_never_raises_and_never_gets_aa(harness, sample):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(load_sample(sample)) + frame(message("MSG2")))
    harness.clock.advance(0)
    replies = [read_ack(a) for a in acks(transport)]
    assert len(replies) == 2
    assert replies[0].code in ("AR", "AE")
    assert (replies[1].code, replies[1].control_id) == ("AA", "MSG2")


def test_an_oversize_frame_gets_ar_message_too_large_and_the_connection_keeps_working(store):
    h = Harness(store=store, max_message_bytes=2000)
    receiver, transport = h.connect()
    big = message("BIG00001", body=PID + b"\rOBX|1|ED|PDF||" + b"A" * 5000)
    receiver.dataReceived(frame(big)[:3000])
    receiver.dataReceived(frame(big)[3000:] + frame(message("MSG00002")))
    h.clock.advance(0)
    first, second = (read_ack(a) for a in acks(transport))
    assert (first.code, first.control_id) == ("AR", "BIG00001")
    assert "message too large" in first.text
    assert (second.code, second.control_id) == ("AA", "MSG00002")
    assert [m.control_id for m in store.list_messages()] == ["MSG00002"]
    assert h.sample("koppel_frames_discarded_total", reason="oversize") == 1
    assert not transport.disconnecting


def test_fs_without_cr_is_discarded_unless_the_channel_is_lenient(store):
    strict = Harness(store=store)
    receiver, transport = strict.connect()
    receiver.dataReceived(b"\x0b" + message("MSG1") + b"\x1c" + frame(message("MSG2")))
    strict.clock.advance(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ["MSG2"]
    assert strict.sample("koppel_frames_discarded_total", reason="fs-without-cr") == 1

    lenient = Harness(store=store, lenient_framing=True)
    receiver, transport = lenient.connect()
    receiver.dataReceived(b"\x0b" + message("MSG3") + b"\x1c" + frame(message("MSG4")))
    lenient.clock.advance(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ["MSG3", "MSG4"]


def test_eof_mid_frame_stores_nothing_and_is_counted(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1"))[:40])
    receiver.connectionLost()
    harness.clock.advance(0)
    assert harness.stored() == []
    assert harness.sample("koppel_frames_discarded_total", reason="eof") == 1
    assert harness.sample("koppel_connections_open") == 0


# --------------------------------------------------------------------------- timeouts and limits


def test_a_frame_that_never_ends_is_closed_at_the_frame_timeout_and_nothing_is_stored(store):
    h = Harness(store=store, frame_timeout=30.0, idle_timeout=600.0)
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1"))[:50])
    h.clock.advance(20)
    receiver.dataReceived(b"more bytes of the same frame")  # still arriving: the 30 s count again
    h.clock.advance(29.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)  # 30 s without a byte in an open frame: it stalled
    assert transport.disconnecting
    receiver.connectionLost()
    h.clock.advance(0)
    assert store.list_messages() == []
    assert transport.value() == b""
    assert h.sample("koppel_frames_discarded_total", reason="timeout") == 1
    assert h.sample("koppel_frames_discarded_total", reason="eof") is None
    assert h.sample("koppel_connections_closed_total", reason="frame-timeout") == 1


def test_a_large_frame_arriving_slowly_for_longer_than_the_frame_timeout_is_stored(store):
    """A 2 MB letter over a slow VPN link takes minutes; frame_timeout is a stall timeout, not
    a deadline from the frame's first byte (which cut off every such message, on every resend)."""
    h = Harness(store=store, frame_timeout=30.0, idle_timeout=600.0)
    receiver, transport = h.connect()
    data = frame(message("BIG1") + b"OBX|1|ED|PDF^brief||^AP^^Base64^" + b"QUJD" * 500_000 + b"\r")
    step = len(data) // 120
    for start in range(0, len(data), step):  # 2 MB in 120 pieces, 5 s apart: 10 minutes in all
        receiver.dataReceived(data[start:start + step])
        h.clock.advance(5)
    assert not transport.disconnecting
    assert [read_ack(a).code for a in acks(transport)] == ["AA"]
    assert [m.control_id for m in store.list_messages()] == ["BIG1"]


def test_a_peer_that_half_closes_after_sending_still_gets_its_acks(store):
    """`shutdown(SHUT_WR)` after the last message (nc -N, Java's shutdownOutput()): the ACKs
    are written, then the connection closes; Twisted used to take the EOF for the end."""
    from twisted.internet.interfaces import IHalfCloseableProtocol

    h = Harness(store=store)
    receiver, transport = h.connect()
    assert IHalfCloseableProtocol.providedBy(receiver)
    receiver.dataReceived(frame(message("HC1")) + frame(message("HC2")))
    receiver.readConnectionLost()  # the peer's FIN, before the commit
    assert not transport.disconnecting  # the ACKs are still owed
    h.clock.advance(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ["HC1", "HC2"]
    assert transport.disconnecting
    assert h.sample("koppel_connections_closed_total", reason="peer-half-closed") == 1


def test_the_frame_timeout_does_not_fire_once_the_frame_is_complete(harness):
    receiver, transport = harness.connect()
    data = frame(message("MSG1"))
    receiver.dataReceived(data[:50])
    harness.clock.advance(29)
    receiver.dataReceived(data[50:])
    harness.clock.advance(31)
    assert not transport.disconnecting
    assert read_ack(acks(transport)[0]).code == "AA"


def test_an_idle_connection_is_closed_at_the_idle_timeout(store):
    h = Harness(store=store, idle_timeout=600.0)
    receiver, transport = h.connect()
    h.clock.advance(500)
    receiver.dataReceived(frame(message("MSG1")))
    h.clock.advance(0)
    h.clock.advance(599)
    assert not transport.disconnecting
    h.clock.advance(2)
    assert transport.disconnecting
    assert h.sample("koppel_connections_closed_total", reason="idle-timeout") == 1
    assert read_ack(acks(transport)[0]).code == "AA"


@pytest.mark.parametrize(("settings", "reason"), [
    (dict(idle_timeout=600.0), "idle-timeout"),
    (dict(frame_timeout=30.0), "frame-timeout"),
])
def test_a_timed_out_connection_whose_peer_reads_nothing_is_cut_one_period_later(store, settings, reason):
    """The close waits for the ACKs to be written, which a peer that never reads never allows:
    found with real sockets, where the connection stayed open (and counted) for ever."""
    h = Harness(store=store, **settings)
    receiver, transport = h.connect()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    receiver.dataReceived(frame(message("MSG1")))
    h.clock.advance(0)
    if reason == "frame-timeout":
        receiver.dataReceived(b"\x0bMSH|")  # a frame begun and never finished
    period = settings.get("idle_timeout") or settings["frame_timeout"]
    h.clock.advance(period + 1)
    assert transport.disconnecting and not aborted  # closing: the ACK may still leave
    h.clock.advance(period - 2)
    assert not aborted
    h.clock.advance(2)
    assert aborted == [True]
    assert h.sample("koppel_connections_closed_total", reason=reason) == 1


def test_a_timed_out_connection_that_closes_in_time_is_not_cut(store):
    h = Harness(store=store, idle_timeout=600.0)
    receiver, transport = h.connect()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    h.clock.advance(601)
    assert transport.disconnecting
    receiver.connectionLost()
    h.clock.advance(601)
    assert not aborted
    assert not h.clock.getDelayedCalls()


def test_closing_waits_for_the_acks_of_frames_already_received():
    committer = RecordingCommitter()
    h = Harness(committer=committer, idle_timeout=1.0)
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1")))
    h.clock.advance(1.5)  # idle timer fires while MSG1 is still being committed
    assert not transport.disconnecting
    committer.commit(0)
    assert read_ack(acks(transport)[0]).code == "AA"
    assert transport.disconnecting


def test_a_peer_outside_the_allow_list_is_refused_and_counted(store):
    h = Harness(store=store, allow=(ip_network("10.20.0.0/16"), ip_network("127.0.0.1/32")))
    assert h.connect("192.168.1.5") == (None, None)
    assert h.sample("koppel_connections_refused_total", reason="not-allowed") == 1
    receiver, _ = h.connect("10.20.3.4")
    assert receiver is not None
    assert h.sample("koppel_connections_total") == 1


def test_the_connection_after_max_connections_is_refused_and_counted_until_one_closes(store):
    h = Harness(store=store, max_connections=2)
    first, _ = h.connect()
    second, _ = h.connect()
    assert h.connect() == (None, None)
    assert h.sample("koppel_connections_refused_total", reason="too-many") == 1
    assert h.sample("koppel_connections_open") == 2
    first.connectionLost()
    third, transport = h.connect()
    assert third is not None
    third.dataReceived(frame(message("MSG1")))
    h.clock.advance(0)
    assert read_ack(acks(transport)[0]).code == "AA"


# --------------------------------------------------------------------------- duplicates


def test_a_resent_message_gets_the_byte_identical_first_ack_and_is_stored_once(harness):
    payload = message("MSG00001")
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(payload))
    harness.clock.advance(0)
    # The sender lost our ACK, reconnects and sends the same message again.
    receiver.connectionLost()
    again, transport2 = harness.connect()
    again.dataReceived(frame(payload))
    harness.clock.advance(0)

    [first] = acks(transport)
    [second] = acks(transport2)
    assert second == first
    [row] = harness.stored()
    assert row.duplicate_count == 1
    assert harness.sample("koppel_duplicates_total") == 1


def test_a_duplicate_pipelined_in_the_same_commit_is_stored_once(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG00001")) * 2)
    harness.clock.advance(0)
    first, second = acks(transport)
    assert first == second
    assert len(harness.stored()) == 1


def test_zorgdomein_documents_sharing_one_zd_number_are_all_stored(harness):
    """ZorgDomein reuses MSH-10 (the ZD-number) for every document of one referral."""
    names = ["zd_oru_r01_attachments.hl7", "zd_oru_r01_request_form_pdf.hl7", "zd_oru_pdf_official_head.hl7"]
    payloads = [load_sample(f"zorgdomein/{name}") for name in names]
    receiver, transport = harness.connect()
    receiver.dataReceived(b"".join(frame(p) for p in payloads))
    harness.clock.advance(0)
    replies = [read_ack(a) for a in acks(transport)]
    assert [(r.code, r.control_id) for r in replies] == [("AA", "ZD200046119")] * 3
    stored = harness.stored()
    assert len(stored) == 3
    assert sorted(harness.store.get_message(m.id).raw for m in stored) == sorted(payloads)
    assert harness.sample("koppel_duplicates_total") is None


def test_the_same_control_id_with_another_payload_is_not_a_duplicate(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1")))
    receiver.dataReceived(frame(message("MSG1", body=PID + b"\rOBX|1|TX|||second document")))
    harness.clock.advance(0)
    first, second = acks(transport)
    assert first != second
    assert len(harness.stored()) == 2


# --------------------------------------------------------------------------- enhanced mode


def test_enhanced_mode_ne_stores_the_message_and_writes_nothing(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1", accept_ack="NE", app_ack="NE")))
    harness.clock.advance(0)
    assert transport.value() == b""
    assert [m.control_id for m in harness.stored()] == ["MSG1"]
    assert harness.sample("koppel_acks_withheld_total", code="CA") == 1


def test_a_channel_that_always_answers_acks_an_ne_message_with_ca(store):
    """`ack: {accept_ack: always}` for senders whose header template says NE but that wait
    for an answer anyway (they hung: nothing came back, and a resend is a duplicate)."""
    h = Harness(store=store, always_answer=True)
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1", accept_ack="NE", app_ack="NE")))
    h.clock.advance(0)
    receiver.dataReceived(frame(message("MSG1", accept_ack="NE", app_ack="NE")))  # its resend
    h.clock.advance(0)
    assert [(read_ack(a).code, read_ack(a).control_id) for a in acks(transport)] == [("CA", "MSG1")] * 2
    assert h.sample("koppel_acks_withheld_total", code="CA") is None


def test_an_ack_sent_to_the_listener_is_stored_and_not_answered_and_the_next_message_is(harness):
    """An acknowledgement is not acknowledged: a peer that sends its ACKs here gets none back
    (no ACK loop), and the connection goes on."""
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("A1", type_="ACK^R01^ACK", body=b"MSA|AA|X1")) + frame(message("MSG2")))
    harness.clock.advance(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ["MSG2"]
    assert sorted(m.control_id for m in harness.stored()) == ["A1", "MSG2"]
    assert harness.sample("koppel_acks_withheld_total", code="AA") == 1


def test_enhanced_mode_er_writes_only_errors(store):
    h = Harness(store=store, rules=AcceptRules(types=frozenset({"ORU^R01"})))
    receiver, transport = h.connect()
    receiver.dataReceived(
        frame(message("MSG1", accept_ack="ER"))
        + frame(message("MSG2", type_="ADT^A01", accept_ack="ER"))
        + frame(message("MSG3", accept_ack="ER"))
    )
    h.clock.advance(0)
    [only] = [read_ack(a) for a in acks(transport)]
    assert (only.code, only.control_id) == ("CR", "MSG2")
    assert h.sample("koppel_acks_withheld_total", code="CA") == 2


def test_enhanced_mode_al_answers_ca(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1", accept_ack="AL", app_ack="NE")))
    harness.clock.advance(0)
    assert read_ack(acks(transport)[0]).code == "CA"


# --------------------------------------------------------------------------- what each bad input gets


def test_a_type_the_channel_does_not_accept_gets_ar_200_and_is_kept_as_rejected(store):
    h = Harness(store=store, rules=AcceptRules(types=frozenset({"SRM^S01", "ORU^R01"})))
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1", type_="ADT^A01", version="2.5.1")))
    h.clock.advance(0)
    [ack] = acks(transport)
    assert read_ack(ack).code == "AR"
    assert b"|200^Unsupported message type^HL70357|" in err_segment(ack)
    [row] = store.list_messages()
    assert row.status == "rejected"


def test_a_known_type_with_another_trigger_gets_ar_201(store):
    h = Harness(store=store, rules=AcceptRules(types=frozenset({"SRM^S01"})))
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1", type_="SRM^S02", version="2.5.1")))
    h.clock.advance(0)
    [ack] = acks(transport)
    assert read_ack(ack).code == "AR"
    assert b"|201^" in err_segment(ack)


def test_a_version_the_channel_does_not_accept_gets_ar_203(store):
    h = Harness(store=store, rules=AcceptRules(versions=frozenset({"2.4", "2.5.1"})))
    receiver, transport = h.connect()
    receiver.dataReceived(frame(message("MSG1", version="2.3")))
    h.clock.advance(0)
    [ack] = acks(transport)
    assert read_ack(ack).code == "AR"
    assert b"203&Unsupported version id&HL70357" in err_segment(ack)  # ERR-1 layout up to 2.4


def test_an_unknown_msh18_charset_gets_ae_not_a_guess(harness):
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1", charset="KLINGON-1")))
    harness.clock.advance(0)
    [ack] = acks(transport)
    reply = read_ack(ack)
    assert (reply.code, reply.control_id) == ("AE", "MSG1")
    assert [m.status for m in harness.stored()] == ["rejected"]


def test_an_exception_inside_intake_gives_ae_and_the_listener_keeps_serving(harness, monkeypatch):
    real_assess = listener_module.assess
    calls = []

    def exploding_assess(payload, **kwargs):
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("bug in intake")
        return real_assess(payload, **kwargs)

    monkeypatch.setattr(listener_module, "assess", exploding_assess)
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1")) + frame(message("MSG2")))
    harness.clock.advance(0)
    first, second = (read_ack(a) for a in acks(transport))
    assert first.code == "AE"
    assert "RuntimeError" not in first.text and "bug" not in first.text
    assert (second.code, second.control_id) == ("AA", "MSG2")
    assert [m.control_id for m in harness.stored()] == ["MSG2"]
    # And a new connection is served too.
    receiver2, transport2 = harness.connect()
    receiver2.dataReceived(frame(message("MSG3")))
    harness.clock.advance(0)
    assert read_ack(acks(transport2)[0]).code == "AA"


def test_a_failing_submit_gives_ae_that_still_answers_the_message_control_id(harness, monkeypatch):
    def broken_submit(op):
        raise RuntimeError("committer bug")

    monkeypatch.setattr(harness.committer, "submit", broken_submit)
    receiver, transport = harness.connect()
    receiver.dataReceived(frame(message("MSG1")))
    [ack] = acks(transport)
    reply = read_ack(ack)
    assert (reply.code, reply.control_id) == ("AE", "MSG1")


def test_data_received_never_raises_on_any_sample_or_garbage(harness):
    from conftest import sample_names

    receiver, transport = harness.connect()
    chunks = [frame(load_sample(name)) for name in sample_names()]
    chunks += [b"\x0b\x0b\x1c\x1c\r\r", b"\x1c\r", b"\x0b\xff\xfe\x00MSH|", b"\x1c\x0b\r", b"\x00" * 100]
    for chunk in chunks:
        receiver.dataReceived(chunk)
    harness.clock.advance(0)
    assert not transport.disconnecting
    receiver.dataReceived(frame(message("LAST")))
    harness.clock.advance(0)
    assert read_ack(acks(transport)[-1]).control_id == "LAST"


# --------------------------------------------------------------------------- metrics


def test_metrics_count_a_scripted_flow(store):
    h = Harness(
        store=store,
        rules=AcceptRules(types=frozenset({"ORU^R01", "SRM^S01"})),
        max_connections=1,
        allow=(ip_network("127.0.0.0/8"),),
    )
    receiver, transport = h.connect()
    ok1, ok2 = message("MSG1"), message("MSG2", type_="SRM^S01")
    receiver.dataReceived(b"xx" + frame(ok1) + frame(ok2) + frame(message("MSG3", type_="ADT^A01")))
    h.clock.advance(0)
    receiver.dataReceived(frame(ok1))  # a duplicate
    h.clock.advance(0)
    assert h.connect() == (None, None)  # too many
    assert h.connect("10.0.0.1") == (None, None)  # not allowed

    assert [read_ack(a).code for a in acks(transport)] == ["AA", "AA", "AR", "AA"]
    assert h.sample("koppel_received_messages_total", type="ORU^R01", outcome="accepted") == 1
    assert h.sample("koppel_received_messages_total", type="SRM^S01", outcome="accepted") == 1
    assert h.sample("koppel_received_messages_total", type="other", outcome="rejected") == 1
    assert h.sample("koppel_received_bytes_total") == len(ok1) + len(ok2) + len(message("MSG3", type_="ADT^A01"))
    assert h.sample("koppel_acks_sent_total", code="AA") == 3
    assert h.sample("koppel_acks_sent_total", code="AR") == 1
    assert h.sample("koppel_duplicates_total") == 1
    assert h.sample("koppel_junk_bytes_total") == 2
    assert h.sample("koppel_connections_total") == 1
    assert h.sample("koppel_connections_open") == 1
    assert h.sample("koppel_connections_refused_total", reason="too-many") == 1
    assert h.sample("koppel_connections_refused_total", reason="not-allowed") == 1
    assert h.sample("koppel_ack_latency_seconds_count") == 4
    assert h.metrics.registry.get_sample_value("koppel_store_commit_batch_size_count") == 2
    assert h.metrics.registry.get_sample_value("koppel_store_commit_batch_size_sum") == 4
    assert len(store.list_messages()) == 3


def test_drain_closes_every_connection_after_its_pending_ack():
    committer = RecordingCommitter()
    h = Harness(committer=committer)
    receiver, transport = h.connect()
    idle, idle_transport = h.connect()
    receiver.dataReceived(frame(message("MSG1")))
    done = h.factory.drain()
    assert idle_transport.disconnecting
    assert not transport.disconnecting
    receiver.dataReceived(frame(message("MSG2")))  # arrives after the drain began: not read
    assert len(committer.submitted) == 1
    committer.commit(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ["MSG1"]
    assert transport.disconnecting
    receiver.connectionLost()
    idle.connectionLost()
    assert done.called


# --------------------------------------------------------------------------- found in review


def test_the_frame_timeout_counts_from_the_start_of_each_frame(harness):
    """A frame that ended and the next one that began in the same read: the next gets its own
    30 s, not what was left of the first's."""
    receiver, transport = harness.connect()
    a, b = frame(message("MSG1")), frame(message("MSG2"))
    receiver.dataReceived(a[:50])  # t=0: A begins
    harness.clock.advance(29)
    receiver.dataReceived(a[50:] + b[:50])  # t=29: A ends, B begins (pipelined)
    harness.clock.advance(2)  # t=31: B has been open 2 s
    assert not transport.disconnecting
    harness.clock.advance(29)  # t=60: B open 31 s
    assert transport.disconnecting


def test_a_streaming_sender_whose_reads_end_mid_frame_is_not_cut_off(harness):
    receiver, transport = harness.connect()
    frames = [frame(message(f"MSG{i}")) for i in range(6)]
    receiver.dataReceived(frames[0][:50])
    for i in range(5):  # every frame open 10 s, well under the 30 s frame timeout
        harness.clock.advance(10)
        receiver.dataReceived(frames[i][50:] + frames[i + 1][:50])
    assert not transport.disconnecting


def test_a_channel_without_an_accept_list_keeps_the_type_label_bounded(store, monkeypatch):
    """Without `accept:` any MSH-9 is accepted; the metric's type label stays a bounded set
    (made-up or malformed types, and those past the cap, count as "other")."""
    from engine.shell import listener as listener_module

    monkeypatch.setattr(listener_module, "MAX_TYPE_LABELS", 3)
    h = Harness(store=store, rules=AcceptRules())
    receiver, _ = h.connect()
    types = ["ORU^R01", "SRM^S01", "ORU^R01", "ZZZ^Z01", "ADT^A01", "x<script>^1"]
    receiver.dataReceived(b"".join(frame(message(f"T{i}", type_=t)) for i, t in enumerate(types)))
    h.clock.advance(0)
    assert h.sample("koppel_received_messages_total", type="ORU^R01", outcome="accepted") == 2
    assert h.sample("koppel_received_messages_total", type="ZZZ^Z01", outcome="accepted") == 1
    assert h.sample("koppel_received_messages_total", type="ADT^A01", outcome="accepted") is None
    assert h.sample("koppel_received_messages_total", type="other", outcome="accepted") == 2


def test_ack_control_ids_stay_within_msh10s_20_characters_for_years_of_messages():
    """MSH-10 is ST(20) up to 2.5.1: the start time, a pid up to Linux's 4,194,304 and a
    counter past 10^12 fit (a decimal counter after a ms timestamp passed 20 at 10^5)."""
    from engine.shell.listener import default_control_ids

    ids = default_control_ids(1_795_000_000.0, 2**32 - 1)
    first = ids()
    ids._next = 36**6 - 1  # 2.2 billion: an outbound id (the processor's) still has room for "-N"
    outbound = ids()
    ids._next = 10**12
    late = ids()
    assert len(first) <= 20 and len(late) <= 20 and len(outbound + "-9") <= 20
    assert len({first, outbound, late}) == 3
    others = {default_control_ids(1_795_000_000.0 + dt, nonce)() for dt in (0, 0.1) for nonce in (1, 36, 2**32 - 1)}
    assert len(others) == 6  # unique across restarts (a tenth of a second later) and processes (another nonce)
    # the engine draws the nonce at random: pid 1 in a container restarted in the same tenth of
    # a second gets other ids, unlike with the pid


def test_the_acks_msh7_is_amsterdam_time_whatever_the_hosts_zone(store, monkeypatch):
    """Every other time Koppel writes is Amsterdam time; a host on UTC (most servers and
    containers) gave the ACK +0000 beside them."""
    import time as time_module
    from datetime import datetime as real_datetime
    from zoneinfo import ZoneInfo

    monkeypatch.setenv("TZ", "UTC")
    time_module.tzset()
    try:
        clock = MemoryReactorClock()
        factory = MLLPListenerFactory(ReceiveSettings(channel=CHANNEL), committer=GroupCommitter(store, clock=clock),
                                      metrics=Metrics(), clock=clock, control_ids=ControlIds("KTEST-"))
        address = IPv4Address("TCP", "127.0.0.1", 40001)
        receiver, transport = factory.buildProtocol(address), StringTransport(peerAddress=address)
        receiver.makeConnection(transport)
        receiver.dataReceived(frame(message("MSG00001")))
        clock.advance(0)
        [ack] = acks(transport)
        stamp = ack.split(b"\r")[0].split(b"|")[6].decode()
        offset = real_datetime.now(ZoneInfo("Europe/Amsterdam")).strftime("%z")
        assert stamp.endswith(offset) and offset in ("+0100", "+0200"), stamp
    finally:
        monkeypatch.undo()  # the TZ this run had, then re-read
        time_module.tzset()


def test_a_stopped_listener_aborts_a_connection_whose_peer_stopped_reading_after_its_grace(store):
    """A reload that removes a channel stops its listener: a peer that no longer reads keeps a
    closing connection (and the reload) waiting for ever, unless it is aborted after the grace."""
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionAborted

    from engine.shell.engine import ListenerService

    h = Harness(store=store)
    receiver, transport = h.connect()
    listener = ListenerService(h.clock, "tcp:0", h.factory, h.metrics, grace=10.0)
    stopped = listener.stopService()  # (never bound: no port to close, only connections to drain)
    h.clock.advance(9.9)
    assert transport.disconnecting and not transport.disconnected and not stopped.called
    h.clock.advance(0.1)
    assert transport.disconnected  # aborted: the kernel would now drop it, and connectionLost follows
    receiver.connectionLost(Failure(ConnectionAborted()))
    assert stopped.called


def test_a_peer_that_does_not_read_its_acks_pauses_reading_without_timing_out_its_frame(store):
    """The transport pauses the receiver (stop reading) while too many ACKs wait for a peer that
    does not read them, and resumes it once they are written. A frame open meanwhile is not
    timed out (the stall is ours), and closing lets go of the producer first: a transport with a
    paused producer resumes it when its buffer empties, instead of closing."""
    h = Harness(store=store, frame_timeout=30.0)
    receiver, transport = h.connect()
    assert transport.producer is receiver and transport.streaming
    data = frame(message("BP1"))
    receiver.dataReceived(data[:40])
    receiver.pauseProducing()
    assert transport.producerState == "paused"
    h.clock.advance(31)
    assert not transport.disconnecting
    receiver.resumeProducing()
    assert transport.producerState == "producing"
    receiver.dataReceived(data[40:])
    h.clock.advance(0)
    h.clock.advance(0)
    assert [read_ack(a).control_id for a in acks(transport)] == ["BP1"]
    receiver.pauseProducing()
    receiver.readConnectionLost()  # (as after the peer's FIN) closing: the producer goes first
    assert transport.producer is None and transport.disconnecting
    receiver.resumeProducing()  # a late resume must not start reading a closing connection
    assert transport.producerState == "paused"


def test_a_retired_listeners_draining_connections_leave_the_open_connections_gauge_to_the_new_one():
    """A reload moved the channel to another port: the old listener's connections drain while
    the new one takes connections, and each close on the old one set the channel's gauge to
    the old listener's count."""
    old = Harness()
    receivers = [old.connect()[0] for _ in range(3)]
    new = MLLPListenerFactory(old.settings, committer=old.committer, metrics=old.metrics, clock=old.clock,
                              control_ids=ControlIds("KNEW-"), now=lambda: NOW)
    old.factory.retired = True
    address = IPv4Address("TCP", "127.0.0.1", 50001)
    new.buildProtocol(address).makeConnection(StringTransport(peerAddress=address))
    assert old.sample("koppel_connections_open") == 1
    receivers[0].transport.loseConnection()
    receivers[0].connectionLost(None)
    assert old.sample("koppel_connections_open") == 1  # the new listener's one, not the old one's 2
