"""Security and privacy review: each test here failed on the code before its fix.

The admin API tests drive the real twisted.web HTTP channel (``site_for``) over a
``StringTransport``, on the synthetic world of ``tests/test_admin.py`` (a real SQLite store,
an unstarted Engine on a MemoryReactorClock). Synthetic patients only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import clientFromString
from twisted.internet.testing import MemoryReactor, StringTransport

from engine.config import ConfigError, load_config
from engine.shell import admin
from engine.shell.admin import MAX_BODY, load_token
from tests.factories import TEST_BSN
from tests.test_admin import TOKEN, World, inline_read


# --------------------------------------------------------------------------- HTTP harness


class Http:
    """One HTTP connection to the admin site, bytes in, bytes out."""

    def __init__(self, world: World, token: str | None) -> None:
        self.world = world
        site = admin.site_for(world.engine, token=token, read=inline_read, clock=world.clock, log=world.log)
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8465),
                                         peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        self.world.reactor.advance(0)  # the group committer's turn
        return self.transport.value()

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1:8465", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        raw = self.send(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status = int(raw.split(b" ", 2)[1]) if raw else 0
        return status, raw.partition(b"\r\n\r\n")[2]


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


@pytest.fixture
def open_world(tmp_path):
    """The admin API as the bundled deploy files run it: loopback, no token."""
    w = World(tmp_path, token=None)
    yield w
    w.close()


# --------------------------------------------------------------------------- request bodies


def test_an_unauthenticated_huge_request_body_is_refused_before_it_is_stored(world):
    """Twisted spools any body over 100 kB to a temporary file, with no limit, before render()
    checks the token: one request without a token could fill the disk the store is on."""
    http = Http(world, TOKEN)
    http.send(b"POST /api/dead-letters/1/drop HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Length: 10000000000\r\n\r\n")
    for _ in range(4):
        http.send(b"x" * (64 * 1024))
    requests = http.protocol._channel.requests
    held = requests[-1].content.tell() if requests else 0  # bytes written to the body's file
    assert held <= MAX_BODY, f"{held} bytes of an unauthenticated body spooled to {requests[-1].content!r}"
    assert http.transport.value().startswith(b"HTTP/1.1 413"), http.transport.value()[:80]
    assert http.transport.disconnecting


def test_a_chunked_body_over_the_limit_is_refused_too(world):
    http = Http(world, TOKEN)
    http.send(b"POST /api/dead-letters/1/drop HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 32768
    for _ in range(4):
        http.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert http.transport.value().startswith(b"HTTP/1.1 413")
    assert http.transport.disconnecting


def test_a_small_authorized_body_still_works_over_http(world):
    dead = world.ids["ris_dead"]
    status, body = Http(world, TOKEN).request(
        "POST", f"/api/dead-letters/{dead}/drop",
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        json.dumps({"reason": "sent by phone"}).encode())
    assert status == 200, body
    assert world.store.get_entry(dead).state == "dropped"


# --------------------------------------------------------------------------- browsers


def test_a_cross_site_browser_request_cannot_drop_a_dead_letter(open_world):
    """Without a token (the default on loopback), any web page opened in a browser on the host
    could POST a text/plain 'simple request' (no CORS preflight) and drop or replay dead
    letters or pause the HIS queue."""
    dead = open_world.ids["ris_dead"]
    status, _ = Http(open_world, None).request(
        "POST", f"/api/dead-letters/{dead}/drop",
        {"Origin": "https://evil.example", "Content-Type": "text/plain"}, b'{"reason": "x"}')
    assert status == 403
    assert open_world.store.get_entry(dead).state == "dead"


def test_a_dns_rebinding_page_cannot_read_a_message_body(open_world):
    """A page whose name rebinds to 127.0.0.1 is same-origin with the API (no Origin header on a
    GET): the Host header is the only thing that gives it away."""
    http = Http(open_world, None)
    raw = http.send(b"GET /api/messages/%d?include=body HTTP/1.1\r\nHost: rebind.evil.example:8465\r\n\r\n"
                    % open_world.ids["m1"])
    assert raw.startswith(b"HTTP/1.1 403"), raw[:80]
    assert b'"body"' not in raw and TEST_BSN.encode() not in raw
    assert [r.action for r in open_world.store.list_audit()] == []


@pytest.mark.parametrize("host", ["127.0.0.1:8465", "localhost:8465", "[::1]:8465", "127.0.0.1"])
def test_local_tools_still_reach_the_open_api(open_world, host):
    http = Http(open_world, None)
    raw = http.send(f"GET /api/queues HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 200"), raw[:80]


# --------------------------------------------------------------------------- the token file


def test_a_token_file_other_users_can_read_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="other users"):
        load_token(str(path), {})
    os.chmod(path, 0o640)
    assert load_token(str(path), {}) == TOKEN


# --------------------------------------------------------------------------- TLS to destinations


def test_an_ssl_destination_that_would_not_check_the_certificate_is_a_config_error(tmp_path):
    """Twisted's ssl: client endpoint verifies nothing without caCertsDir and never checks
    the host name: referrals would go to whoever answers on the path."""
    endpoint = "ssl:host=127.0.0.1:port=6661"
    assert clientFromString(MemoryReactor(), endpoint)._sslContextFactory.verify is False  # what it would do
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "a.yaml").write_text(
        "name: a\nsource:\n  listen: tcp:0\n"
        f"destinations:\n  his:\n    endpoint: {endpoint}\n"
        "routes:\n  - to: [his]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(channels, channels)
    assert "tls:" in str(caught.value.problems[0])


# --------------------------------------------------------------------------- core dumps


def test_koppel_run_switches_core_dumps_off(tmp_path):
    """A crash of `koppel run` (a C extension, SIGABRT) would otherwise leave its memory, the
    referrals and PDF letters in flight, in a core file (systemd-coredump, apport) that the
    store's retention never prunes."""
    from sink import KoppelProcess

    from tests.test_admin import live_engine

    engine: KoppelProcess = live_engine(tmp_path, env_token=TOKEN)
    engine.launch()
    try:
        engine.wait_for("engine.started")
        limits = (Path("/proc") / str(engine.proc.pid) / "limits").read_text()
    finally:
        engine.terminate()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max core file size")]
    assert line.split()[4:6] == ["0", "0"], line
