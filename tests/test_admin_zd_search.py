"""GET /api/messages?zd=... finds the referral that carries the ZD-number: an SRM has it in
ARQ-1 and a random MSH-10, so a search on MSH-10 alone found its agenda entry but not the
message itself (found by a review)."""
import hashlib
import json

from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from engine.config import load_config
from engine.shell.admin import AdminAPI
from engine.shell.engine import Engine
from engine.store import Append, SaveAgendaEntry, open_store, write_one
from tests.conftest import load_sample
from tests.factories import T0, received
from tests.test_admin import CHANNEL, Recorder, inline_read

ZD = "ZD200046139"  # ARQ-1 of the sample; its MSH-10 is g20ce6a9f8ca4f551275


def test_search_by_zd_number_finds_the_srm_referral_that_carries_it(tmp_path):
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    assert b"ARQ|" + ZD.encode() in raw and b"|g20ce6a9f8ca4f551275|" in raw
    store = open_store(f"sqlite://{tmp_path}/k.db")
    mid = write_one(store, Append(message=received("g20ce6a9f8ca4f551275", raw=raw,
                                                   payload_hash=hashlib.sha256(raw).digest(), targets=()))).message_id
    # what the processor writes for it: the entry keyed zd:<number>, history citing the message
    store.write([SaveAgendaEntry(entry_id=None, agenda_id="cardio-poli", kind="appointment-request",
                                 state="requested", zd_number=ZD, placer_id=ZD, filler_id=None, data="{}",
                                 attachments=(), keys=(f"zd:{ZD}",), at=T0, message_id=mid, action="create",
                                 from_state=None, changed=())])
    (tmp_path / "ch").mkdir()
    (tmp_path / "ch" / "c.yaml").write_text(CHANNEL)
    engine = Engine(MemoryReactorClock(), load_config(tmp_path / "ch", tmp_path / "ch"), store, retention=None)
    clock = task.Clock()
    api = AdminAPI(engine, token=None, read=inline_read, clock=clock, log=Recorder())
    request = DummyRequest([b"api", b"messages"])
    request.method = b"GET"
    request.args[b"zd"] = [ZD.encode()]
    request.render(api)
    body = json.loads(b"".join(request.written))
    store.close()
    assert [e["zd_number"] for e in body["agenda_entries"]] == [ZD]  # the entry is found...
    assert [m["id"] for m in body["messages"]] == [mid]  # ...and the message that made it
