"""/healthz and /readyz: alive while the process runs; ready only when every listener is
bound, the store commits and the engine runs."""

import json

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from engine.config import ChannelConfig, EngineConfig, SourceConfig
from engine.shell.engine import HEARTBEAT_INTERVAL, Engine
from engine.shell.http import site_for
from engine.store import open_store


def get(engine, path: bytes):
    site = site_for(engine)
    request = DummyRequest([path])
    resource = site.resource.getChildWithDefault(path, request)
    body = resource.render(request)
    return (request.responseCode or 200), json.loads(body)


@pytest.fixture
def engine(tmp_path):
    config = EngineConfig(channels=(
        ChannelConfig(name="zd", source=SourceConfig(listen="tcp:0")),
        ChannelConfig(name="siu", source=SourceConfig(listen="tcp:0")),
    ))
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    e = Engine(MemoryReactorClock(), config, store, retention=None)
    yield e
    if e.running:
        e.stopService()
    store.close()


def test_healthz_is_alive_even_before_the_engine_started(engine):
    assert get(engine, b"healthz") == (200, {"status": "alive"})


def test_readyz_is_503_until_every_listener_is_bound_then_200(engine):
    code, body = get(engine, b"readyz")
    assert code == 503 and body["status"] == "not-ready"
    engine.startService()
    code, body = get(engine, b"readyz")
    assert (code, body["status"], body["listeners"], body["store"]) == (
        200, "ready", {"zd": True, "siu": True}, "ok")


def test_readyz_turns_503_when_the_store_stops_committing_and_back_when_it_recovers(engine, monkeypatch):
    engine.startService()
    reactor = engine.reactor
    reactor.advance(0)
    original = engine.store.write

    def broken(ops, wait=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.store, "write", broken)
    reactor.advance(HEARTBEAT_INTERVAL)  # the heartbeat write fails
    reactor.advance(0)
    code, body = get(engine, b"readyz")
    assert (code, body["store"]) == (503, "failing")
    monkeypatch.setattr(engine.store, "write", original)
    reactor.advance(HEARTBEAT_INTERVAL)
    reactor.advance(0)
    assert get(engine, b"readyz")[0] == 200


def test_readyz_is_503_once_the_engine_is_stopping(engine):
    engine.startService()
    assert get(engine, b"readyz")[0] == 200
    engine.stopService()
    assert get(engine, b"readyz")[0] == 503
