"""Tests for kongtx.tls: default certificate, server TLS options, upstream verification."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from typing import List, Optional

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from zope.interface import implementer

from kongtx import tls

# --- helpers ---------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Greeter(protocol.Protocol):
    """Server side: says hello and records the SNI name it was sent."""

    def connectionMade(self) -> None:
        self.transport.write(b"hello")

    def handshakeCompleted(self) -> None:
        name = self.transport.getHandle().get_servername()
        self.factory.server_names.append(name)


class _GreeterFactory(protocol.Factory):
    protocol = _Greeter

    def __init__(self) -> None:
        self.server_names: List[Optional[bytes]] = []


class _Reader(protocol.Protocol):
    """Client side: fires ``received`` with the first bytes, or fails with the reason."""

    def __init__(self) -> None:
        self.received: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.version: Optional[str] = None

    def dataReceived(self, data: bytes) -> None:
        if not self.received.called:
            self.version = self.transport.getHandle().get_protocol_version_name()
            self.received.callback(data)
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.received.called:
            self.received.errback(reason)
        self.lost.callback(None)


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedVersionClient:
    """A client that offers exactly one TLS version and verifies nothing."""

    def __init__(self, version: int) -> None:
        self._version = version

    def clientConnectionForTLS(self, tlsProtocol):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(self._version)
        ctx.set_max_proto_version(self._version)
        # Let the client really offer old versions; the server must be the one refusing.
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return SSL.Connection(ctx)


async def _listen(server_options):
    from twisted.internet import reactor

    factory = _GreeterFactory()
    endpoint = SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    return port, factory


#: Seconds a TLS exchange with the local test server may take.
_EXCHANGE_TIMEOUT = 10.0


async def _exchange(port_number: int, creator) -> _Reader:
    """Connect over TLS; return the client protocol once the connection has closed."""
    from twisted.internet import reactor

    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port_number))
    reader = _Reader()
    # Bounded: a creator that raises while the connection is set up leaves both
    # Deferreds unfired, and the test must fail rather than hang the whole run.
    connecting = endpoint.connect(protocol.Factory.forProtocol(lambda: reader))
    await connecting.addTimeout(_EXCHANGE_TIMEOUT, reactor)
    try:
        await reader.received.addTimeout(_EXCHANGE_TIMEOUT, reactor)
    finally:
        reader.transport.loseConnection()
        await reader.lost
    return reader


def _make_ca_and_leaf(directory: str, hostname: str = "localhost"):
    """Write ca.pem, leaf.pem, leaf.key: a CA and a certificate for ``hostname`` it signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kongtx test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {}
    for name, data in (
        ("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        ("leaf.pem", leaf.public_bytes(serialization.Encoding.PEM)),
        (
            "leaf.key",
            leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    ):
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    return paths


# --- default certificate ----------------------------------------------------------


def test_default_certificate_is_generated_once_and_reused(tmp_path):
    """The first call writes a cert and a 0600 key; later calls return the same files."""
    directory = str(tmp_path / "ssl")
    cert_path, key_path = tls.ensure_default_certificate(directory)
    assert cert_path == os.path.join(directory, "kong-default.crt")
    assert key_path == os.path.join(directory, "kong-default.key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    first = open(cert_path, "rb").read(), open(key_path, "rb").read()
    assert tls.ensure_default_certificate(directory) == (cert_path, key_path)
    assert (open(cert_path, "rb").read(), open(key_path, "rb").read()) == first
    assert [p for p in os.listdir(directory) if p.startswith(".tmp-")] == []


def test_default_certificate_names_localhost_and_lasts_ten_years(tmp_path):
    """CN and SAN cover localhost, 127.0.0.1 and ::1; validity is about ten years."""
    cert_path, key_path = tls.ensure_default_certificate(str(tmp_path), basename="admin")
    assert cert_path.endswith("admin.crt")
    cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    if hasattr(cert, "not_valid_after_utc"):
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    else:  # cryptography < 42
        lifetime = cert.not_valid_after - cert.not_valid_before
    assert datetime.timedelta(days=3600) < lifetime < datetime.timedelta(days=3700)
    tls.load_pem_pair(cert_path, key_path)


def test_default_certificate_regenerated_when_key_missing(tmp_path):
    """A certificate without its key is replaced by a fresh, matching pair."""
    cert_path, key_path = tls.ensure_default_certificate(str(tmp_path))
    old = open(cert_path, "rb").read()
    os.unlink(key_path)
    tls.ensure_default_certificate(str(tmp_path))
    assert open(cert_path, "rb").read() != old
    tls.load_pem_pair(cert_path, key_path)


def test_server_context_factory_rejects_mismatched_pair(tmp_path):
    """A key that does not belong to the certificate is refused."""
    cert_a, _ = tls.ensure_default_certificate(str(tmp_path / "a"))
    _, key_b = tls.ensure_default_certificate(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="does not match"):
        tls.server_context_factory([cert_a], [key_b], "intermediate", "", ["TLSv1.2"])


# --- server side over real sockets ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls12_client_is_served_with_intermediate_suite(tmp_path):
    """Default settings accept a TLS 1.2 client on a real listener."""
    cert, key = tls.ensure_default_certificate(str(tmp_path))
    options = tls.server_context_factory(
        [cert], [key], "intermediate", tls.INTERMEDIATE_CIPHERS, ["TLSv1.2", "TLSv1.3"]
    )
    port, _ = await _listen(options)
    try:
        reader = await _exchange(port.getHost().port, _PinnedVersionClient(SSL.TLS1_2_VERSION))
        assert reader.version == "TLSv1.2"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls11_only_client_is_refused(tmp_path):
    """With ssl_protocols = TLSv1.2 TLSv1.3 a client offering only TLS 1.1 fails the handshake."""
    cert, key = tls.ensure_default_certificate(str(tmp_path))
    options = tls.server_context_factory(
        [cert], [key], "intermediate", "", ["TLSv1.2", "TLSv1.3"]
    )
    port, _ = await _listen(options)
    try:
        with pytest.raises(SSL.Error):
            await _exchange(port.getHost().port, _PinnedVersionClient(SSL.TLS1_1_VERSION))
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_modern_suite_is_tls13_only(tmp_path):
    """ssl_cipher_suite = modern refuses TLS 1.2 and serves TLS 1.3."""
    cert, key = tls.ensure_default_certificate(str(tmp_path))
    options = tls.server_context_factory([cert], [key], "modern", "", ["TLSv1.2", "TLSv1.3"])
    port, _ = await _listen(options)
    try:
        with pytest.raises(SSL.Error):
            await _exchange(port.getHost().port, _PinnedVersionClient(SSL.TLS1_2_VERSION))
        reader = await _exchange(port.getHost().port, _PinnedVersionClient(SSL.TLS1_3_VERSION))
        assert reader.version == "TLSv1.3"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls12_max_protocol_is_honoured(tmp_path):
    """ssl_protocols = TLSv1.2 caps the server at TLS 1.2 even for TLS 1.3 clients."""
    cert, key = tls.ensure_default_certificate(str(tmp_path))
    options = tls.server_context_factory([cert], [key], "intermediate", "", ["TLSv1.2"])
    port, _ = await _listen(options)
    try:
        with pytest.raises(SSL.Error):
            await _exchange(port.getHost().port, _PinnedVersionClient(SSL.TLS1_3_VERSION))
    finally:
        await port.stopListening()


# --- upstream verification ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_verification_against_custom_ca(tmp_path):
    """A custom CA bundle verifies 'localhost'; a wrong host name fails; SNI is sent."""
    paths = _make_ca_and_leaf(str(tmp_path))
    options = tls.server_context_factory(
        [paths["leaf.pem"]], [paths["leaf.key"]], "intermediate", "", ["TLSv1.2", "TLSv1.3"]
    )
    port, factory = await _listen(options)
    creator = tls.upstream_tls_creator([paths["ca.pem"]], verify_depth=1)
    try:
        reader = await _exchange(port.getHost().port, creator("localhost", True))
        assert reader.version == "TLSv1.3"
        assert factory.server_names[-1] == b"localhost"
        with pytest.raises((SSL.Error, VerificationError)):
            await _exchange(port.getHost().port, creator("wrong.example", True))
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_upstream_system_trust_rejects_private_ca(tmp_path):
    """With only 'system' trust, a certificate from a private CA is rejected."""
    paths = _make_ca_and_leaf(str(tmp_path))
    options = tls.server_context_factory(
        [paths["leaf.pem"]], [paths["leaf.key"]], "intermediate", "", ["TLSv1.2", "TLSv1.3"]
    )
    port, _ = await _listen(options)
    try:
        with pytest.raises(SSL.Error):
            await _exchange(port.getHost().port, tls.upstream_tls_creator()("localhost", True))
        both = tls.upstream_tls_creator(["system", paths["ca.pem"]])
        await _exchange(port.getHost().port, both("localhost", True))
        nothing = tls.upstream_tls_creator([])
        with pytest.raises(SSL.Error):
            await _exchange(port.getHost().port, nothing("localhost", True))
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_upstream_without_verification_sends_sni_but_checks_nothing(tmp_path):
    """verify=False accepts any certificate and still sends SNI, except for IP addresses."""
    cert, key = tls.ensure_default_certificate(str(tmp_path))
    options = tls.server_context_factory([cert], [key], "intermediate", "", ["TLSv1.2", "TLSv1.3"])
    port, factory = await _listen(options)
    creator = tls.upstream_tls_creator()
    try:
        await _exchange(port.getHost().port, creator("upstream.example", False))
        assert factory.server_names[-1] == b"upstream.example"
        await _exchange(port.getHost().port, creator("127.0.0.1", False))
        assert factory.server_names[-1] is None
    finally:
        await port.stopListening()


def test_upstream_creators_are_cached():
    """The same (hostname, verify) gives the same creator object; different keys do not."""
    creator = tls.upstream_tls_creator()
    assert creator("a.example", True) is creator("a.example", True)
    assert creator("a.example", False) is creator("a.example", False)
    assert creator("a.example", True) is not creator("a.example", False)
    assert creator("a.example", True) is not creator("b.example", True)


def test_upstream_creator_rejects_unreadable_bundle(tmp_path):
    """A CA path that cannot be read is reported at construction, not per request."""
    with pytest.raises(ValueError, match="failed loading certificate"):
        tls.upstream_tls_creator([str(tmp_path / "missing.pem")])
