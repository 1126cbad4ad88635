"""MLLP over TLS end to end: an ``ssl:`` listener acknowledges over TLS, and a ``tls:``
destination gets its messages over TLS, with a throwaway certificate made here."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.sink import (
    KoppelProcess,
    MLLPClient,
    Sink,
    control_id_of,
    frame,
    make_message,
    read_ack_code,
    write_channel,
)


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for localhost and 127.0.0.1: (cert path, key path, trust dir)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    trust = tmp_path / "trust"
    trust.mkdir()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (trust / "ca.pem").write_bytes(cert_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem", trust


def test_an_ssl_listener_acks_over_tls_and_a_tls_destination_receives_over_tls(tmp_path, certificate):
    cert, key, trust = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    sink = Sink(name="tls-sink", tls=server_side).start()
    channels = tmp_path / "channels"
    path = write_channel(channels, {"archive": sink.port},
                         listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    # the destination's endpoint: TLS with the certificate checked against our throwaway root
    path.write_text(path.read_text().replace(
        f"endpoint: tcp:host=127.0.0.1:port={sink.port}", f"endpoint: tls:localhost:{sink.port}:trustRoots={trust}"))
    engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/k.db", workdir=tmp_path)
    try:
        port = engine.start()
        client_side = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_side.wrap_socket(raw, server_hostname="localhost") as conn:
            codes = []
            for n in range(3):
                conn.sendall(frame(make_message(f"TLS{n}")))
                answer = b""
                while not answer.endswith(b"\x1c\r"):
                    chunk = conn.recv(4096)
                    assert chunk, "the engine closed the TLS connection before answering"
                    answer += chunk
                codes.append(read_ack_code(answer))
            tls_version = conn.version()
        assert codes == [("AA", "TLS0"), ("AA", "TLS1"), ("AA", "TLS2")]
        assert tls_version in ("TLSv1.2", "TLSv1.3")
        assert sink.wait_for_delivered(["TLS0", "TLS1", "TLS2"], timeout=20), engine.tail()
        assert [control_id_of(r.raw) for r in sink.records] == ["TLS0", "TLS1", "TLS2"]
    finally:
        engine.terminate()
        sink.stop()


def test_a_peer_refused_by_an_ssl_listener_is_closed_at_once(certificate):
    """An ssl: listener's factory is wrapped for TLS; a refusal must still close the socket
    (a bare None from buildProtocol was wrapped, the socket kept and never timed out)."""
    from ipaddress import ip_network

    from twisted.internet.address import IPv4Address
    from twisted.internet.ssl import DefaultOpenSSLContextFactory
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tests.test_listener import Harness

    cert, key, _ = certificate
    h = Harness(allow=(ip_network("10.0.0.0/8"),))
    wrapped = TLSMemoryBIOFactory(DefaultOpenSSLContextFactory(str(key), str(cert)), False, h.factory)
    tls = wrapped.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    tls.makeConnection(transport)
    assert transport.disconnecting
    assert h.sample("koppel_connections_refused_total", reason="not-allowed") == 1


def test_a_tls_destination_whose_certificate_is_not_trusted_is_reported_as_a_tls_failure(tmp_path, certificate):
    """A destination's certificate expired or signed by a CA Koppel does not trust: every
    attempt fails in the handshake. The queue's last error and the log must say so; it read
    "connection closed before the acknowledgement", as if the destination dropped the message."""
    cert, key, _ = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    sink = Sink(name="tls-sink", tls=server_side).start()
    other = tmp_path / "other-trust"  # a CA directory that does not hold the sink's issuer
    other.mkdir()
    (other / "ca.pem").write_bytes(_another_ca())
    channels = tmp_path / "channels"
    path = write_channel(channels, {"archive": sink.port})
    path.write_text(path.read_text().replace(
        f"endpoint: tcp:host=127.0.0.1:port={sink.port}", f"endpoint: tls:localhost:{sink.port}:trustRoots={other}"))
    engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/k.db", workdir=tmp_path)
    try:
        port = engine.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(frame(make_message("TLSBAD0")))
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = conn.recv(4096)
                assert chunk
                answer += chunk
        assert read_ack_code(answer) == ("AA", "TLSBAD0")
        failed = engine.wait_for("delivery.retry", timeout=20)
        assert failed["reason"].startswith("TLS failed"), failed
        assert "certificate verify failed" in failed["reason"], failed
        assert sink.records == []
    finally:
        engine.terminate()
        sink.stop()


def _another_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Another CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("close_notify", [False, True], ids=["bare-fin", "close-notify"])
def test_a_tls_destination_that_closes_after_each_ack_gets_every_message_without_a_retry(
        tmp_path, certificate, close_notify):
    """One message per connection over TLS. Under TLS the socket peek sees a close_notify as
    data, not as the close, so the next message meets the closing connection and must be sent
    again at once on a new one, never backed off."""
    cert, key, trust = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    sink = Sink(name="tls-sink", tls=server_side).start()
    sink.close_after_ack = True
    sink.close_notify = close_notify
    channels = tmp_path / "channels"
    path = write_channel(channels, {"archive": sink.port})
    path.write_text(path.read_text().replace(
        f"endpoint: tcp:host=127.0.0.1:port={sink.port}", f"endpoint: tls:localhost:{sink.port}:trustRoots={trust}"))
    engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/k.db", workdir=tmp_path)
    sent = [f"TLC{n:03d}" for n in range(30)]
    try:
        sink.down()  # the messages queue up first, then go out back to back
        port = engine.start()
        with MLLPClient(port) as source:
            for cid in sent:
                assert read_ack_code(source.request(make_message(cid))) == ("AA", cid)
        sink.up()
        assert sink.wait_for_delivered(sent, timeout=20), (sink.stats(), engine.tail())
        assert sink.delivered_ids() == sent
        assert sink.stats()["answers"] == {"AA": 30}  # each sent once: no failed attempt resent it
        retried = [e for e in engine.logged() if e.get("event") == "delivery.retry"]
        assert [e["reason"] for e in retried] == ["connection refused"] * len(retried)  # only while down
    finally:
        engine.terminate()
        sink.stop()
