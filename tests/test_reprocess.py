"""`koppel reprocess`: a message whose mapping failed (the mapping fixed and reloaded since), or
that no route mapped (a route added since), is handed to mapping again, by id or all of one
channel. The store op marks it PENDING with an audit record; the engine's resume maps it, at
start or within RESUME_INTERVAL while it runs. Real SQLite store, bundled channels and
mappings, the engine on a ``MemoryReactorClock``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from twisted.web.test.requesthelper import DummyRequest

from engine import operator
from engine.cli import main
from engine.shell.engine import RESUME_INTERVAL
from engine.store import PENDING, Reprocess, SetProcessing, open_store, write_one
from tests.conftest import load_sample
from tests.test_resume_mapping import World, stored_pending

ROOT = Path(__file__).resolve().parent.parent
SRM = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
CANCEL = SRM.replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S01")
NOW = 1_700_000_500.0


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setattr(operator, "_now", lambda: NOW)
    w = World(tmp_path)
    yield w
    w.close()


_serial = iter(range(1, 1_000_000))


def errored(world, raw: bytes = SRM, *, outcome: str = "error", detail: str = "ARQ-1: required value missing",
            **fields) -> int:
    """A stored message (its own MSH-10 and ZD-number: no duplicate of another) whose mapping
    ended in ``outcome``."""
    n = next(_serial)
    raw = raw.replace(b"g20ce6a9f8ca4f551275", b"RP%06d" % n).replace(b"ZD200046139", b"ZD%09d" % (300000000 + n))
    message_id = stored_pending(world.store, raw, **fields)
    write_one(world.store, SetProcessing(message_id=message_id, outcome=outcome, detail=detail))
    return message_id


def koppel(world, *args: str) -> int:
    return main(["reprocess", *args, "--store", world.url, "--channels", str(ROOT / "channels")])


def test_an_errored_message_reprocessed_is_mapped_when_the_engine_starts(world, capsys):
    message_id = errored(world)
    assert koppel(world, str(message_id), "--reason", "ARQ-1 mapping fixed") == 0
    out = capsys.readouterr().out
    assert f"1 message handed to mapping again ({message_id})" in out
    assert world.processing(message_id) == PENDING
    world.start()
    assert world.processing(message_id) == "mapped"
    assert [(e.agenda_id, e.state) for e in world.store.list_agenda_entries()] == [("cardiology", "requested")]
    assert world.store.queue_depths() == {"127.0.0.1:6661": 1}  # its SIU^S12 for the HIS
    (record,) = [a for a in world.store.list_audit() if a.action == "reprocess"]
    assert record.message_id == message_id
    assert record.reason == "was error (ARQ-1: required value missing): ARQ-1 mapping fixed"


def test_a_running_engine_maps_a_reprocessed_message_within_its_resume_interval(world, capsys):
    engine = world.start()
    engine.reactor.advance(1_700_000_001)  # the clock just after the stored message arrived (it starts at 0)
    message_id = errored(world)
    assert koppel(world, str(message_id)) == 0
    for _ in range(10):
        engine.reactor.advance(0)
    assert world.processing(message_id) == PENDING  # not yet: the engine looks once per interval
    engine.reactor.advance(RESUME_INTERVAL)
    for _ in range(10):
        engine.reactor.advance(0)
    assert world.processing(message_id) == "mapped"
    assert len(world.store.list_agenda_entries()) == 1


def test_only_errors_by_default_and_filtered_when_asked(world, capsys):
    failed = errored(world)
    filtered = errored(world, CANCEL, outcome="filtered", detail="no route maps SRM^S04")
    assert koppel(world, str(filtered)) == 1
    err = capsys.readouterr().err
    assert f"message {filtered} is filtered, not error" in err and "nothing changed" in err
    assert world.processing(failed) == "error" and world.processing(filtered) == "filtered"
    assert koppel(world, str(filtered), "--outcome", "filtered") == 0
    assert world.processing(filtered) == PENDING and world.processing(failed) == "error"


@pytest.mark.parametrize("outcome", ["mapped", "held", PENDING])
def test_a_message_mapped_held_or_pending_is_never_taken(world, capsys, outcome):
    message_id = errored(world, outcome=outcome, detail=None)
    assert koppel(world, str(message_id), "--outcome", "error", "--outcome", "filtered") == 1
    assert f"message {message_id} is {outcome}, not error or filtered" in capsys.readouterr().err
    assert world.processing(message_id) == outcome


def test_a_nakd_message_and_a_built_one_are_refused_with_the_reason(world, capsys):
    nakd = errored(world, status="rejected")
    world.store._conn().execute("UPDATE messages SET ack_code = 'AE' WHERE id = ?", (nakd,))
    built = errored(world)
    world.store._conn().execute("UPDATE messages SET origin_id = ? WHERE id = ?", (nakd, built))
    assert koppel(world, str(nakd), str(built), "999") == 1
    err = capsys.readouterr().err
    assert f"message {nakd} was answered AE: its sender resends it, corrected" in err
    assert f"message {built} was built by mapping message {nakd}" in err
    assert "no message 999 (never stored, or pruned)" in err
    assert world.processing(nakd) == "error" and world.processing(built) == "error"


def test_a_whole_channel_oldest_first_in_steps(world, capsys, monkeypatch):
    monkeypatch.setattr(operator, "STEP", 2)
    ids = [errored(world) for _ in range(5)]
    other = errored(world, channel="another-channel")
    mapped = errored(world, outcome="mapped", detail=None)
    assert koppel(world, "--channel", "zorgdomein-in") == 0
    assert f"5 messages handed to mapping again ({', '.join(map(str, ids))})" in capsys.readouterr().out
    assert [world.processing(i) for i in ids] == [PENDING] * 5
    assert world.processing(other) == "error" and world.processing(mapped) == "mapped"
    assert koppel(world, "--channel", "zorgdomein-in") == 1  # nothing left: says so
    assert "no accepted message is error, nothing changed" in capsys.readouterr().out


def test_an_unknown_channel_is_refused_before_anything_changes(world, capsys):
    message_id = errored(world, channel="retired-channel")
    assert koppel(world, "--channel", "retired-channel") == 1
    assert "no channel 'retired-channel'" in capsys.readouterr().err
    assert koppel(world, str(message_id)) == 1
    assert "channel retired-channel is not in" in capsys.readouterr().err
    assert world.processing(message_id) == "error"


def test_ids_and_channel_are_one_or_the_other(world, capsys):
    assert koppel(world) == 2
    assert koppel(world, "1", "--channel", "zorgdomein-in") == 2
    assert "give message ids or --channel NAME (not both)" in capsys.readouterr().err


def test_the_store_op_takes_only_what_is_still_reprocessable(world):
    message_id = errored(world)
    assert world.store.write([Reprocess(message_ids=(message_id,), at=NOW)]) == [(message_id,)]
    # a second operator (or a second run) finds it pending already: nothing happens twice
    assert world.store.write([Reprocess(message_ids=(message_id,), at=NOW)]) == [()]
    assert len([a for a in world.store.list_audit() if a.action == "reprocess"]) == 1
    with pytest.raises(ValueError):
        Reprocess(at=NOW, message_ids=(1,), outcomes=("mapped",))
    with pytest.raises(ValueError):
        Reprocess(at=NOW)


def test_a_reopened_store_sees_the_reprocess_as_committed(world, tmp_path):
    message_id = errored(world)
    koppel(world, str(message_id))
    other = open_store(world.url)
    try:
        assert [m.id for m in other.pending_processing()] == [message_id]
    finally:
        other.close()


# --------------------------------------------------------------------------- the admin API

def admin_call(world, path: str, body: bytes = b""):
    """POST to the admin API of the started engine (reads inline, commits on advance(0))."""
    from twisted.internet import task

    from engine.shell.admin import AdminAPI
    from tests.test_admin import Answer, Recorder, inline_read

    clock = task.Clock()
    clock.advance(NOW)
    log = Recorder()
    api = AdminAPI(world.engine, token="t0ken", read=inline_read, clock=clock, log=log)
    request = DummyRequest([s.encode() for s in path[1:].split("/")])
    request.method = b"POST"
    request.requestHeaders.addRawHeader(b"authorization", b"Bearer t0ken")
    request.content = io.BytesIO(body)
    request.render(api)
    for _ in range(10):  # the reprocess commit, then the mapping's turn and commit
        world.engine.reactor.advance(0)
    assert request.finished
    return Answer(request), log


def test_the_admin_api_reprocesses_one_message_and_maps_it_at_once(world):
    world.start()
    filtered = errored(world, outcome="filtered", detail="no route maps it")
    answer, log = admin_call(world, f"/api/messages/{filtered}/reprocess", b'{"reason": "route added"}')
    assert answer.code == 200, answer.json
    assert answer.json == {"message": filtered, "was": "filtered", "processing": "pending", "mapping": "started"}
    assert world.processing(filtered) == "mapped"  # no resume interval to wait for
    assert len(world.store.list_agenda_entries()) == 1
    (fields,) = log.named("admin.message_reprocessed")
    assert fields["message_id"] == filtered and fields["was"] == "filtered"
    (record,) = [a for a in world.store.list_audit() if a.action == "reprocess"]
    assert record.reason == "was filtered (no route maps it): route added"


def test_the_admin_api_refuses_what_cannot_be_reprocessed(world):
    world.start()
    mapped = errored(world, outcome="mapped", detail=None)
    retired = errored(world, channel="retired-channel")
    answer, _ = admin_call(world, f"/api/messages/{mapped}/reprocess")
    assert answer.code == 409 and answer.json["error"] == "not_reprocessable"
    assert f"message {mapped} is mapped" in answer.json["message"]
    answer, _ = admin_call(world, f"/api/messages/{retired}/reprocess")
    assert answer.code == 409 and "retired-channel is not configured" in answer.json["message"]
    assert admin_call(world, "/api/messages/424242/reprocess")[0].code == 404
    assert (world.processing(mapped), world.processing(retired)) == ("mapped", "error")
    assert [a for a in world.store.list_audit() if a.action == "reprocess"] == []


def test_koppel_messages_lists_the_errors_to_reprocess(world, capsys):
    failed = errored(world)
    mapped = errored(world, outcome="mapped", detail=None)
    assert main(["messages", "--store", world.url, "--processing", "error"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(int(r[0]), r[8], r[9]) for r in rows] == [(failed, "error", "ARQ-1: required value missing")]
    assert main(["messages", "--store", world.url, "--processing", "mapped"]) == 0
    assert [int(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()[1:]] == [mapped]


def test_the_admin_api_lists_messages_by_processing(world):
    from twisted.internet import task

    from engine.shell.admin import AdminAPI
    from tests.test_admin import Answer, inline_read

    world.start()
    failed = errored(world)
    errored(world, outcome="mapped", detail=None)
    api = AdminAPI(world.engine, token="t0ken", read=inline_read, clock=task.Clock())

    def get(query: str) -> Answer:
        request = DummyRequest([b"api", b"messages"])
        request.method = b"GET"
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            request.args[name.encode()] = [value.encode()]
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer t0ken")
        request.render(api)
        return Answer(request)

    answer = get("processing=error")
    assert [m["id"] for m in answer.json["messages"]] == [failed]
    assert get("processing=bogus").code == 400
