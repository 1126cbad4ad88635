"""The JSON admin API: auth, every endpoint, audit-logged body reads, start-up refusal, and the
live API against deploy/openapi/koppel-admin.yaml with schemathesis.

Most tests render the resource with ``DummyRequest`` against a real SQLite store and an
unstarted ``Engine`` on a ``MemoryReactorClock`` (reads run inline, commits on ``advance(0)``).
The last group runs ``koppel run`` as a subprocess on 127.0.0.1 port 0.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlsplit

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from engine.config import load_config
from engine.shell import admin
from engine.shell.admin import AdminAPI, check_exposure, fingerprint, is_loopback, load_token
from engine.shell.engine import Engine
from engine.store import (
    Append,
    DeadLetter,
    PutAttachment,
    RecordFailure,
    SaveAgendaEntry,
    open_store,
    write_one,
)

from sink import KoppelProcess
from tests.factories import T0, TEST_BSN, TEST_NAME, received, referral
from tests.test_operator import AR_ACK, HIX, HIX_Q, NOW, RIS, RIS_Q  # the operator tests' synthetic world

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "deploy" / "openapi" / "koppel-admin.yaml"

TOKEN = "s3cret-admin-token"
ZD = "ZD900000017"

CHANNEL = """
name: zorgdomein-in
source:
  listen: tcp:0:interface=127.0.0.1
destinations:
  hix-agenda:
    endpoint: tcp:host=127.0.0.1:port=6661
  ris:
    endpoint: tcp:host=127.0.0.1:port=7000
routes:
  - to: [hix-agenda, ris]
"""


def populate(url: str) -> dict[str, int]:
    """Three accepted messages (one with a ZD number as control id), one rejected, a failing
    head on HIX, a dead letter on RIS, and two agenda entries with history and an attachment."""
    store = open_store(url)
    try:
        ids = {
            "m1": write_one(store, Append(message=received("ZD001", received_at=T0, targets=(HIX, RIS)))).message_id,
            "m2": write_one(store, Append(message=received("ZD002", received_at=T0 + 60, targets=(HIX,)))).message_id,
            "zd": write_one(store, Append(message=received(ZD, received_at=T0 + 120, targets=(HIX,),
                                                           message_type="ORU^R01"))).message_id,
            "rejected": write_one(store, Append(message=received("ZD004", received_at=T0,
                                                                 status="rejected"))).message_id,
        }
        hix = [e.id for e in store.queue_head(HIX_Q)]
        (ris_dead,) = [e.id for e in store.queue_head(RIS_Q)]
        ids["hix_head"], ids["ris_dead"] = hix[0], ris_dead
        write_one(store, RecordFailure(entry_id=hix[0], error="connection refused", ack=None,
                                       next_attempt_at=NOW + 42, at=T0 + 150))
        write_one(store, DeadLetter(entry_id=ris_dead, reason="AR from destination: dead-lettered",
                                    ack=AR_ACK, at=T0 + 100))
        pdf = b"%PDF-1.4 synthetic letter"
        digest = hashlib.sha256(pdf).hexdigest()
        store.write([PutAttachment(sha256=digest, media_type="application/pdf", filename="verwijsbrief.pdf",
                                   data=pdf)])
        first = store.write([SaveAgendaEntry(
            entry_id=None, agenda_id="cardio-poli", kind="appointment-request", state="requested",
            zd_number=ZD, placer_id=ZD, filler_id=None,
            data=json.dumps({"patient.bsn": TEST_BSN, "care_product": {"code": "CARREG001"}}),
            attachments=(digest,), keys=(f"zd:{ZD}",), at=T0 + 130, message_id=ids["zd"], action="create",
            from_state=None, changed=("patient.bsn", "care_product"))])[0]
        store.write([SaveAgendaEntry(
            entry_id=first, agenda_id="cardio-poli", kind="appointment-request", state="booked",
            zd_number=ZD, placer_id=ZD, filler_id="F1", data=json.dumps({"patient.bsn": TEST_BSN}),
            attachments=(digest,), keys=("filler:F1",), at=T0 + 140, message_id=ids["m2"], action="book",
            from_state="requested", changed=("booked_start",))])
        ids["lab"] = store.write([SaveAgendaEntry(
            entry_id=None, agenda_id="lab", kind="diagnostic-order", state="ordered", zd_number="ZD900000025",
            placer_id=None, filler_id=None, data="{}", attachments=(), keys=("zd:ZD900000025",), at=T0 + 150,
            message_id=None, action="create", from_state=None)])[0]
        ids["cardio"] = first
    finally:
        store.close()
    return ids


# --------------------------------------------------------------------------- in-process harness


class Recorder:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def _record(self, level):
        return lambda event, **fields: self.events.append((level, event, fields))

    def __getattr__(self, level):
        return self._record(level)

    def named(self, event: str) -> list[dict]:
        return [fields for _, name, fields in self.events if name == event]


class _Port:
    def __init__(self, port: int) -> None:
        self._port = port

    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", self._port)


class Answer:
    def __init__(self, request: DummyRequest) -> None:
        self.code = request.responseCode or 200
        self.headers = request.responseHeaders
        self.raw = b"".join(request.written)
        self.json = json.loads(self.raw) if self.raw else None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def inline_read(fn, *args, **kwargs):
    return defer.maybeDeferred(fn, *args, **kwargs)


class World:
    def __init__(self, tmp_path, token: str | None = TOKEN) -> None:
        self.url = f"sqlite://{tmp_path}/koppel.db"
        self.ids = populate(self.url)
        channels = tmp_path / "channels"
        channels.mkdir()
        (channels / "zorgdomein-in.yaml").write_text(CHANNEL)
        self.config = load_config(channels, channels)
        self.store = open_store(self.url)
        self.reactor = MemoryReactorClock()
        self.engine = Engine(self.reactor, self.config, self.store, retention=None)
        self.engine.listeners[0].port = _Port(25750)
        self.engine.listeners[0].factory.receivers.add(object())
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.log = Recorder()
        self.token = token
        self.api = AdminAPI(self.engine, token=token, read=inline_read, clock=self.clock, log=self.log)
        self.polls: list[str] = []
        for queue, sender in self.engine.senders.items():
            sender.poll = lambda queue=queue: self.polls.append(queue)

    def call(self, method: str, url: str, *, token: str | None = "default", body: bytes | None = None,
             authorization: str | None = None) -> Answer:
        parts = urlsplit(url)
        # What twisted.web's Request.process does: split the raw path at '/', unquote each segment.
        request = DummyRequest([unquote_to_bytes(s) for s in parts.path[1:].split("/")])
        request.method = method.encode()
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            request.args.setdefault(name.encode(), []).append(value.encode())
        if authorization is not None:
            request.requestHeaders.addRawHeader(b"authorization", authorization.encode())
        elif token is not None:
            request.requestHeaders.addRawHeader(b"authorization", f"Bearer {self.token if token == 'default' else token}".encode())
        request.content = io.BytesIO(body or b"")
        request.render(self.api)
        self.reactor.advance(0)  # the group committer's turn
        assert request.finished, f"{method} {url} did not finish"
        return Answer(request)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def assert_no_patient_data(answer: Answer) -> None:
    text = answer.raw.decode("utf-8")
    assert TEST_BSN not in text and TEST_NAME not in text, "patient data in an admin answer"


# --------------------------------------------------------------------------- start-up checks


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp:8465:interface=127.0.0.1", True),
    ("tcp:8465:interface=127.20.0.9", True),
    (r"tcp6:8465:interface=\:\:1", True),
    ("unix:/run/koppel/admin.sock", True),
    ("tcp:8465", False),
    ("tcp:8465:interface=0.0.0.0", False),
    ("tcp:8465:interface=10.20.0.5", False),
    (r"tcp6:8465:interface=\:\:", False),
    ("tcp:8465:interface=localhost", False),
    ("ssl:8465:interface=10.20.0.5:privateKey=k.pem", False),
])
def test_an_endpoint_counts_as_loopback_only_on_127_8_or_1(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_without_a_token_the_api_refuses_a_non_loopback_interface_and_allows_loopback():
    with pytest.raises(ValueError, match="not on a loopback interface and no admin token"):
        check_exposure("tcp:8465:interface=0.0.0.0", None)
    check_exposure("tcp:8465:interface=0.0.0.0", TOKEN)
    check_exposure("tcp:8465:interface=127.0.0.1", None)


def test_the_engine_refuses_to_be_built_with_an_exposed_admin_endpoint_and_no_token(tmp_path):
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "zorgdomein-in.yaml").write_text(CHANNEL)
    store = open_store(f"sqlite://{tmp_path}/k.db")
    try:
        with pytest.raises(ValueError, match="KOPPEL_ADMIN_TOKEN"):
            Engine(MemoryReactorClock(), load_config(channels, channels), store, retention=None,
                   admin_endpoint="tcp:8465", admin_token=None)
    finally:
        store.close()


def test_the_token_comes_from_the_file_first_then_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}  \nsecond line ignored\n")
    path.chmod(0o600)  # a token file other users can read is refused (tests/test_security_review.py)
    assert load_token(str(path), {"KOPPEL_ADMIN_TOKEN": "other"}) == TOKEN
    assert load_token(None, {"KOPPEL_ADMIN_TOKEN": " env-token "}) == "env-token"
    assert load_token(None, {"KOPPEL_ADMIN_TOKEN": ""}) is None
    assert load_token(None, {}) is None


def test_an_unreadable_or_empty_token_file_is_an_error_not_no_auth(tmp_path):
    with pytest.raises(ValueError, match="cannot read the admin token"):
        load_token(str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="holds no admin token"):
        load_token(str(tmp_path / "empty"), {})


def test_on_loopback_without_a_token_the_api_starts_with_a_warning(tmp_path):
    from structlog.testing import capture_logs

    w = World(tmp_path, token=None)
    try:
        with capture_logs() as logs:
            d = admin.start_admin(w.reactor, "tcp:0:interface=127.0.0.1", w.engine, token=None)
        ports = []
        d.addCallback(ports.append)
        assert ports, "the admin site did not listen"
        assert [e for e in logs if e["event"] == "admin.no_token" and e["log_level"] == "warning"]
        started = [e for e in logs if e["event"] == "admin.started"]
        assert started and started[0]["auth"] == "none"
        with pytest.raises(ValueError):
            admin.start_admin(w.reactor, "tcp:0:interface=0.0.0.0", w.engine, token=None)
        # With no token configured, requests need none.
        assert w.call("GET", "/api/queues", token=None).code == 200
    finally:
        w.close()


# --------------------------------------------------------------------------- auth


def test_a_request_without_a_token_is_401_with_a_bearer_challenge(world):
    answer = world.call("GET", "/api/queues", token=None)
    assert answer.code == 401
    assert answer.header("WWW-Authenticate").startswith("Bearer")
    assert answer.json["error"] == "unauthorized"
    assert answer.header("content-type").startswith("application/json")


@pytest.mark.parametrize("authorization", [
    "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer ", f"Bearer {TOKEN[:-1]}",
])
def test_a_wrong_token_or_scheme_is_401(world, authorization):
    answer = world.call("GET", "/api/channels", authorization=authorization)
    assert answer.code == 401 and answer.json["error"] == "unauthorized"


def test_the_right_token_is_accepted_and_the_scheme_is_case_insensitive(world):
    assert world.call("GET", "/api/channels").code == 200
    assert world.call("GET", "/api/channels", authorization=f"bearer {TOKEN}").code == 200


def test_unknown_paths_are_401_before_they_are_404(world):
    assert world.call("GET", "/api/nothing", token=None).code == 401
    answer = world.call("GET", "/api/nothing")
    assert answer.code == 404 and answer.json["error"] == "not_found"
    assert world.call("GET", "/metrics").code == 404


def test_a_wrong_method_is_405_with_allow(world):
    answer = world.call("POST", "/api/queues")
    assert answer.code == 405 and answer.header("Allow") == "GET"
    assert world.call("GET", f"/api/queues/{HIX_Q}/pause").header("Allow") == "POST"


# --------------------------------------------------------------------------- channels and queues


def test_channels_show_the_listen_endpoint_bound_port_and_open_connections(world):
    answer = world.call("GET", "/api/channels")
    assert answer.code == 200
    assert answer.json["channels"] == [{
        "name": "zorgdomein-in", "listen": "tcp:0:interface=127.0.0.1", "bound": True, "host": "127.0.0.1",
        "port": 25750, "connections": 1, "max_connections": 64,
    }]


def test_queues_show_depth_oldest_age_state_last_error_and_dead_count(world):
    answer = world.call("GET", "/api/queues")
    assert answer.code == 200
    by_queue = {q["queue"]: q for q in answer.json["queues"]}
    hix, ris = by_queue[HIX_Q], by_queue[RIS_Q]
    assert hix["destinations"] == ["hix-agenda"] and hix["depth"] == 3 and hix["dead"] == 0
    assert hix["oldest_enqueued_at"] == T0 and hix["oldest_age_seconds"] == pytest.approx(192.0)
    assert hix["state"] == "idle" and hix["paused"] is False and hix["last_error"] == "connection refused"
    assert ris["depth"] == 0 and ris["dead"] == 1 and ris["oldest_age_seconds"] is None


def test_one_queue_shows_its_head_by_url_encoded_key_or_destination_name(world):
    for name in (quote(HIX_Q, safe=""), HIX_Q, "hix-agenda"):
        answer = world.call("GET", f"/api/queues/{name}?limit=2")
        assert answer.code == 200, name
        assert answer.json["queue"] == HIX_Q
        assert [e["entry"] for e in answer.json["head"]][:1] == [world.ids["hix_head"]]
        assert len(answer.json["head"]) == 2
        assert_no_patient_data(answer)


def test_an_unknown_queue_or_a_malformed_key_is_404_and_a_bad_limit_400(world):
    assert world.call("GET", "/api/queues/10.9.9.9%3A1").code == 404
    assert world.call("GET", "/api/queues/nobody").code == 404
    assert world.call("POST", "/api/queues/nobody/pause").code == 404
    answer = world.call("GET", "/api/queues/not%3Aa-port")
    assert answer.code == 404 and "neither a destination name nor a queue key" in answer.json["message"]
    assert world.call("GET", f"/api/queues/{HIX_Q}?limit=0").code == 400
    assert world.call("GET", f"/api/queues/{HIX_Q}?limit=x").code == 400


def test_pause_and_resume_are_committed_through_the_group_committer_and_wake_the_sender(world):
    submitted = []
    real_submit = world.engine.committer.submit
    world.engine.committer.submit = lambda op, **kw: submitted.append(op) or real_submit(op, **kw)
    key = quote(HIX_Q, safe="")
    answer = world.call("POST", f"/api/queues/{key}/pause")
    assert answer.code == 200 and answer.json == {"queue": HIX_Q, "paused": True, "changed": True}
    assert world.store.is_paused(HIX_Q)
    assert type(submitted[0]).__name__ == "SetPaused"
    assert world.polls == [HIX_Q]
    assert world.call("POST", f"/api/queues/{key}/pause").json["changed"] is False
    assert world.call("GET", "/api/queues").json["queues"][0]["paused"] is True
    answer = world.call("POST", "/api/queues/hix-agenda/resume")
    assert answer.json == {"queue": HIX_Q, "paused": False, "changed": True}
    assert not world.store.is_paused(HIX_Q)
    paused_events = world.log.named("admin.queue_paused")
    assert paused_events and paused_events[0]["token"] == fingerprint(TOKEN) and TOKEN not in str(world.log.events)
    by = f"admin API, token {fingerprint(TOKEN)}"  # in the audit log too, as the CLI's actions are
    assert [(r.action, r.queue, r.reason) for r in world.store.list_audit()] == [("resume", HIX_Q, by),
                                                                                 ("pause", HIX_Q, by)]


def test_retry_now_makes_the_waiting_head_due_now(world):
    answer = world.call("POST", f"/api/queues/{quote(HIX_Q, safe='')}/retry-now")
    assert answer.code == 200 and answer.json == {"queue": HIX_Q, "due_now": 1, "paused": False}
    assert world.store.get_entry(world.ids["hix_head"]).next_attempt_at == 0
    assert world.polls == [HIX_Q]
    assert world.call("POST", f"/api/queues/{HIX_Q}/retry-now").json["due_now"] == 0
    assert [r.action for r in world.store.list_audit()] == ["retry-now"]  # the one that freed something


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_list_all_or_one_queue(world):
    answer = world.call("GET", "/api/dead-letters")
    assert answer.code == 200
    (entry,) = answer.json["dead_letters"]
    assert entry["entry"] == world.ids["ris_dead"] and entry["queue"] == RIS_Q and entry["state"] == "dead"
    assert entry["ack"] == {"readable": True, "code": "AR", "control_id": "ZD001", "text": "unknown appointment type"}
    assert world.call("GET", f"/api/dead-letters?queue={quote(RIS_Q)}").json["dead_letters"][0]["entry"] == entry["entry"]
    assert world.call("GET", "/api/dead-letters?queue=hix-agenda").json["dead_letters"] == []
    assert world.call("GET", "/api/dead-letters?queue=nobody").code == 404
    assert_no_patient_data(answer)


def test_a_dead_letter_shows_its_message_origin_without_the_body(world):
    answer = world.call("GET", f"/api/dead-letters/{world.ids['ris_dead']}")
    assert answer.code == 200
    assert answer.json["reason"] == "AR from destination: dead-lettered"
    assert answer.json["message"] == world.ids["m1"] and answer.json["message_channel"] == "zorgdomein-in"
    assert answer.json["dead_at"] == T0 + 100
    assert_no_patient_data(answer)
    assert world.call("GET", "/api/dead-letters/99999").code == 404
    assert world.call("GET", "/api/dead-letters/abc").code == 404


def test_replay_puts_a_dead_letter_back_as_a_new_entry_once(world):
    dead = world.ids["ris_dead"]
    answer = world.call("POST", f"/api/dead-letters/{dead}/replay")
    assert answer.code == 200
    new = answer.json["replayed_as"]
    assert answer.json == {"entry": dead, "queue": RIS_Q, "replayed_as": new}
    assert world.store.get_entry(dead).state == "replayed"
    assert world.store.get_entry(new).state == "pending"
    assert world.polls == [RIS_Q]
    again = world.call("POST", f"/api/dead-letters/{dead}/replay")
    assert again.code == 409 and again.json["error"] == "not_dead"
    assert world.call("POST", "/api/dead-letters/99999/replay").code == 404
    assert [r.action for r in world.store.list_audit()] == ["replay"]


def test_replay_onto_a_queue_no_destination_delivers_is_refused(world):
    dead = world.ids["ris_dead"]
    world.engine.senders.pop(RIS_Q)  # ris moved to another host:port by a reload
    answer = world.call("POST", f"/api/dead-letters/{dead}/replay")
    assert answer.code == 409 and answer.json["error"] == "not_delivered"
    assert world.store.get_entry(dead).state == "dead"


def test_drop_needs_a_json_reason_and_records_it_in_the_audit_log(world):
    dead = world.ids["ris_dead"]
    for body in (b"", b"{}", b'{"reason": "   "}', b'{"reason": "\\u001c -"}', b'{"reason": 3}', b"not json",
                 b'["x"]'):
        answer = world.call("POST", f"/api/dead-letters/{dead}/drop", body=body)
        assert answer.code == 400 and answer.json["error"] == "bad_request", body
    assert world.store.get_entry(dead).state == "dead"
    assert world.call("POST", f"/api/dead-letters/{dead}/drop", body=b"x" * (70 * 1024)).code == 413
    answer = world.call("POST", f"/api/dead-letters/{dead}/drop",
                        body=json.dumps({"reason": "  RIS  retired this\nappointment type "}).encode())
    assert answer.code == 200
    assert answer.json == {"entry": dead, "queue": RIS_Q, "dropped": True,
                           "reason": "RIS retired this appointment type"}
    assert world.store.get_entry(dead).state == "dropped"
    (record,) = world.store.list_audit()
    assert (record.action, record.entry_id, record.reason) == ("drop", dead, "RIS retired this appointment type")
    assert world.call("POST", f"/api/dead-letters/{dead}/drop", body=b'{"reason": "again"}').code == 409
    assert world.call("POST", f"/api/dead-letters/{world.ids['hix_head']}/drop",
                      body=b'{"reason": "x"}').json["error"] == "not_dead"


# --------------------------------------------------------------------------- messages


def test_message_search_filters_by_channel_type_control_id_and_time(world):
    answer = world.call("GET", "/api/messages")
    assert answer.code == 200
    assert [m["control_id"] for m in answer.json["messages"]] == ["ZD004", ZD, "ZD002", "ZD001"]
    assert "agenda_entries" not in answer.json
    assert_no_patient_data(answer)
    search = lambda q: [m["id"] for m in world.call("GET", "/api/messages?" + q).json["messages"]]  # noqa: E731
    assert search("type=ORU%5ER01") == [world.ids["zd"]]
    assert search("control_id=ZD002") == [world.ids["m2"]]
    assert search("channel=other") == []
    assert search("status=rejected") == [world.ids["rejected"]]
    assert search(f"since={T0 + 60}&until={T0 + 121}") == [world.ids["zd"], world.ids["m2"]]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 60))
    assert search(f"since={iso}&until={T0 + 61}") == [world.ids["m2"]]
    assert search("limit=1") == [world.ids["rejected"]]
    first = world.call("GET", "/api/messages?limit=1").json["messages"][0]
    assert first == {
        "id": world.ids["rejected"], "channel": "zorgdomein-in", "peer": "127.0.0.1:40000", "received_at": T0,
        "control_id": "ZD004", "sender": "ZorgDomein|ZD", "type": "SRM^S01", "version": "2.4",
        "size": len(referral("ZD004")), "status": "rejected", "ack_code": "AR", "error": "message type not accepted",
        "duplicates": 0, "processing": None, "processing_detail": None, "origin_id": None,
    }


def test_message_search_by_zd_number_finds_the_messages_and_the_agenda_entry(world):
    answer = world.call("GET", f"/api/messages?zd={ZD}")
    # MSH-10 = the ZD-number (an ORU), and every message in its entry's history: the booking m2,
    # and an SRM, whose ZD-number is in ARQ-1 with a random MSH-10
    assert [m["id"] for m in answer.json["messages"]] == [world.ids["zd"], world.ids["m2"]]
    (entry,) = answer.json["agenda_entries"]
    assert entry["id"] == world.ids["cardio"] and entry["zd_number"] == ZD and "data" not in entry
    assert_no_patient_data(answer)
    assert world.call("GET", "/api/messages?zd=ZD000").json == {"messages": [], "agenda_entries": []}
    both = world.call("GET", f"/api/messages?zd={ZD}&control_id=ZD001").json
    assert both["messages"] == [] and len(both["agenda_entries"]) == 1


@pytest.mark.parametrize("query", [
    "since=yesterday", "until=nan", "until=", "limit=1001", "limit=", "status=maybe",
    "contol_id=ZD001",
])
def test_bad_search_parameters_are_400(world, query):
    answer = world.call("GET", "/api/messages?" + query)
    assert answer.code == 400 and answer.json["error"] == "bad_request"


def test_message_detail_gives_headers_without_the_body_by_default(world):
    answer = world.call("GET", f"/api/messages/{world.ids['m1']}")
    assert answer.code == 200
    assert answer.json["control_id"] == "ZD001" and answer.json["structure"] == "SRM_S01"
    assert "body" not in answer.json
    assert_no_patient_data(answer)
    assert world.log.named("admin.body_read") == []
    assert world.call("GET", "/api/messages/99999").code == 404
    assert world.call("GET", "/api/messages/x").code == 404
    assert world.call("GET", f"/api/messages/{world.ids['m1']}?include=everything").code == 400


def test_message_detail_says_where_it_went_as_koppel_trace_does(world):
    """Each destination's entry with its state and answer, and the agenda entry it made."""
    answer = world.call("GET", f"/api/messages/{world.ids['m1']}")
    deliveries = {d["queue"]: d for d in answer.json["deliveries"]}
    assert deliveries[HIX_Q]["state"] == "pending" and deliveries[HIX_Q]["last_error"] == "connection refused"
    assert deliveries[RIS_Q]["state"] == "dead" and deliveries[RIS_Q]["ack"]["code"] == "AR"
    assert answer.json["agenda_entries"] == [] and answer.json["built"] == []
    letter = world.call("GET", f"/api/messages/{world.ids['zd']}").json
    assert [e["id"] for e in letter["agenda_entries"]] == [world.ids["cardio"]]
    assert "data" not in letter["agenda_entries"][0]
    assert_no_patient_data(answer)


def test_the_body_is_returned_only_on_request_and_the_read_is_audit_logged_without_content(world):
    answer = world.call("GET", f"/api/messages/{world.ids['m1']}?include=body")
    assert answer.code == 200 and answer.json["body_encoding"] == "base64"
    assert base64.b64decode(answer.json["body"]) == referral("ZD001")
    (event,) = world.log.named("admin.body_read")
    assert event["message_id"] == world.ids["m1"] and event["token"] == fingerprint(TOKEN)
    # an audit line at warning: --log-level warning must not drop it
    assert [level for level, name, _ in world.log.events if name == "admin.body_read"] == ["warning"]
    logged = json.dumps(world.log.events, default=str)
    assert TEST_BSN not in logged and answer.json["body"] not in logged and TOKEN not in logged
    # and in the store's audit trail, whatever the log level (koppel audit; NEN 7513-style access log)
    (record,) = world.store.list_audit()
    assert (record.action, record.message_id) == ("read-body", world.ids["m1"])
    assert record.reason.startswith(f"admin API, token {fingerprint(TOKEN)}, peer ")


def test_no_audit_record_no_body(world):
    def refused(op, **kwargs):
        from twisted.internet import defer

        from engine.store import StoreError

        return defer.fail(StoreError("store write failed: disk full"))

    world.engine.committer.submit = refused
    answer = world.call("GET", f"/api/messages/{world.ids['m1']}?include=body")
    assert answer.code == 503 and "body" not in answer.json


# --------------------------------------------------------------------------- agenda


def test_agenda_list_filters_by_agenda_state_and_limit_without_data(world):
    answer = world.call("GET", "/api/agenda")
    assert [e["id"] for e in answer.json["agenda_entries"]] == [world.ids["lab"], world.ids["cardio"]]
    assert_no_patient_data(answer)
    assert [e["state"] for e in world.call("GET", "/api/agenda?agenda=cardio-poli").json["agenda_entries"]] == ["booked"]
    assert [e["agenda"] for e in world.call("GET", "/api/agenda?state=ordered").json["agenda_entries"]] == ["lab"]
    assert len(world.call("GET", "/api/agenda?limit=1").json["agenda_entries"]) == 1
    assert world.call("GET", f"/api/agenda?since={T0 + 145}").json["agenda_entries"][0]["id"] == world.ids["lab"]


def test_an_agenda_entry_by_id_or_key_gives_history_and_attachments_and_data_only_on_request(world):
    for key in (str(world.ids["cardio"]), ZD, "F1"):
        answer = world.call("GET", f"/api/agenda/{key}")
        assert answer.code == 200, key
        assert answer.json["state"] == "booked" and "data" not in answer.json
        assert [(h["action"], h["from"], h["to"]) for h in answer.json["history"]] == [
            ("create", None, "requested"), ("book", "requested", "booked")]
        assert answer.json["attachments"][0]["filename"] == "verwijsbrief.pdf"
        assert_no_patient_data(answer)
    assert world.log.named("admin.agenda_data_read") == []
    answer = world.call("GET", f"/api/agenda/{ZD}?include=data")
    assert answer.json["data"] == {"patient.bsn": TEST_BSN}
    (event,) = world.log.named("admin.agenda_data_read")
    assert event["entry"] == world.ids["cardio"] and TEST_BSN not in json.dumps(world.log.events, default=str)
    assert [level for level, name, _ in world.log.events if name == "admin.agenda_data_read"] == ["warning"]
    (record,) = world.store.list_audit()
    assert record.action == "read-agenda-data" and record.reason.startswith(f"agenda entry {world.ids['cardio']}; ")
    assert world.call("GET", "/api/agenda/ZD000000000").code == 404


# --------------------------------------------------------------------------- store failures


def test_a_store_failure_is_503_with_a_json_body_and_no_detail(world):
    from engine.store import StoreError

    def broken(*args, **kwargs):
        raise StoreError("store read failed: disk I/O error at /secret/path")

    world.engine.store.list_messages = broken
    answer = world.call("GET", "/api/messages")
    assert answer.code == 503 and answer.json["error"] == "store_unavailable"
    assert "secret" not in answer.raw.decode()


# --------------------------------------------------------------------------- the live engine


def live_engine(workdir: Path, env_token: str | None, admin: str = "tcp:0:interface=127.0.0.1") -> KoppelProcess:
    """``koppel run`` (not started yet) with the admin API on 127.0.0.1 port 0, on the store in ``workdir``."""
    (workdir / "channels").mkdir(exist_ok=True)
    # Destinations that refuse connections: entries stay queued, the sender backs off.
    (workdir / "channels" / "zorgdomein-in.yaml").write_text(
        CHANNEL.replace("port=6661", "port=9").replace("port=7000", "port=13"))
    env = {k: v for k, v in os.environ.items() if k != "KOPPEL_ADMIN_TOKEN"}
    if env_token is not None:
        env["KOPPEL_ADMIN_TOKEN"] = env_token
    # The whole log is kept: a test searches all of it for patient data.
    return KoppelProcess(workdir / "channels", f"sqlite://{workdir}/koppel.db", admin=admin, env=env, history=None)


def test_koppel_run_refuses_a_non_loopback_admin_endpoint_without_a_token(tmp_path):
    engine = live_engine(tmp_path, env_token=None, admin="tcp:0:interface=0.0.0.0")
    engine.launch()
    try:
        assert engine.wait(20) == 2
    finally:
        engine.terminate()
    output = engine.output()
    assert "not on a loopback interface and no admin token is configured" in output
    assert "--admin-token-file" in output and "KOPPEL_ADMIN_TOKEN" in output


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("admin-live")
    ids = populate(f"sqlite://{workdir}/koppel.db")
    engine = live_engine(workdir, env_token=TOKEN)
    try:
        engine.launch()
        port = engine.wait_for("admin.started")["port"]
        yield f"http://127.0.0.1:{port}", ids, engine
    finally:
        engine.terminate()


def test_the_live_api_authenticates_and_serves_url_encoded_queue_keys(live):
    import requests

    base, ids, engine = live
    answer = requests.get(f"{base}/api/queues", timeout=10)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.get(f"{base}/api/queues", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    channels = requests.get(f"{base}/api/channels", headers=auth, timeout=10).json()["channels"]
    assert channels[0]["bound"] is True and channels[0]["port"] > 0
    queue = requests.get(f"{base}/api/queues/127.0.0.1%3A9", headers=auth, timeout=10)
    assert queue.status_code == 200 and queue.json()["queue"] == "127.0.0.1:9"
    body = requests.get(f"{base}/api/messages/{ids['m1']}?include=body", headers=auth, timeout=10).json()
    assert base64.b64decode(body["body"]) == referral("ZD001")
    deadline = time.monotonic() + 5
    while not [e for e in engine.logged() if e.get("event") == "admin.body_read"] and time.monotonic() < deadline:
        time.sleep(0.02)
    (event,) = [e for e in engine.logged() if e.get("event") == "admin.body_read"]
    assert event["message_id"] == ids["m1"] and event["token"] == fingerprint(TOKEN)
    assert TEST_BSN not in engine.output()


try:
    import schemathesis
except ImportError:  # pragma: no cover - the test extra installs it
    schemathesis = None

if schemathesis is not None:
    from hypothesis import HealthCheck, Phase, settings

    SCHEMA = schemathesis.openapi.from_path(OPENAPI)

    @SCHEMA.parametrize()
    @settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def test_the_live_api_conforms_to_its_openapi_file(case, live):
        base, _, _ = live
        case.call_and_validate(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
else:  # pragma: no cover
    @pytest.mark.skip(reason="schemathesis is not installed: pip install -e '.[test]'")
    def test_the_live_api_conforms_to_its_openapi_file():
        pass


def test_the_openapi_file_describes_exactly_the_routes_the_api_serves():
    import yaml

    spec = yaml.safe_load(OPENAPI.read_text())
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops
                  if method in ("get", "post", "put", "delete", "patch")}
    served = set()
    for method, pattern, _, _ in admin._ROUTES:
        names = iter(["queue"] if pattern[0] == "queues" else ["id"])
        served.add((method, "/api/" + "/".join(p if p is not None else "{%s}" % next(names) for p in pattern)))
    assert documented == served
    refs = spec["components"]["parameters"]
    for method, pattern, _, known in admin._ROUTES:
        path = next(p for m, p in served if m == method and p.count("/") == len(pattern) + 1
                    and all(a == b or b is None for a, b in zip(p.split("/")[2:], pattern)))
        params = spec["paths"][path].get("parameters", []) + spec["paths"][path][method.lower()].get("parameters", [])
        params = [refs[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p for p in params]
        assert {p["name"] for p in params if p["in"] == "query"} == known, (method, path)
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"]["description"]}
