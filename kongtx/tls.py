"""TLS for kongtx: cipher suites, the default certificate, server and upstream contexts.

Everything here runs at start-up or once per upstream host name, never per request:
``server_context_factory`` builds the object handed to the SSL listeners, and
``upstream_tls_creator`` returns a cached per-host connection creator for the proxy's
upstream client.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from zope.interface import implementer

# Mozilla server-side TLS recommendations, in OpenSSL syntax (as Kong ships them).
#: TLS 1.3 only. OpenSSL configures TLS 1.3 suites separately from the cipher string, so
#: this list is informative: selecting ``modern`` restricts the protocol to TLS 1.3.
MODERN_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: Kong's default (``ssl_cipher_suite = intermediate``).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
#: For very old clients only.
OLD_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:"
    "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"
    "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:DHE-RSA-AES128-SHA256:"
    "DHE-RSA-AES256-SHA256:AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:"
    "AES256-SHA256:AES128-SHA:AES256-SHA:DES-CBC3-SHA"
)

#: ``ssl_cipher_suite`` name -> cipher string (``custom`` uses ``ssl_ciphers``).
CIPHER_SUITES: Dict[str, str] = {
    "modern": MODERN_CIPHERS,
    "intermediate": INTERMEDIATE_CIPHERS,
    "old": OLD_CIPHERS,
}

#: ``ssl_protocols`` token -> Twisted constant.
TLS_VERSIONS: Dict[str, object] = {
    "TLSv1.1": TLSVersion.TLSv1_1,
    "TLSv1.2": TLSVersion.TLSv1_2,
    "TLSv1.3": TLSVersion.TLSv1_3,
}

_VERSION_ORDER = ("TLSv1.1", "TLSv1.2", "TLSv1.3")

DEFAULT_CERT_DAYS = 3650


def load_pem_pair(cert_path: str, key_path: str) -> Tuple[bytes, bytes]:
    """
    Read a PEM certificate and its private key and check that they belong together.

    Returns the two PEM blobs. Raises ``ValueError`` with a one-line reason (without
    the property name, which the caller knows) when a file is unreadable, is not PEM,
    or the key does not match the certificate.
    """
    cert_pem = _read_file(cert_path, "certificate")
    key_pem = _read_file(key_path, "key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"failed loading certificate from {cert_path}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"failed loading key from {key_path}") from None
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise ValueError(
            f"key in {key_path} does not match the certificate in {cert_path}"
        )
    return cert_pem, key_pem


def load_ca_file(path: str) -> List[x509.Certificate]:
    """
    Read every PEM certificate in ``path`` (a CA bundle).

    Raises ``ValueError`` with a one-line reason when the file is unreadable or holds
    no certificate.
    """
    pem = _read_file(path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"failed loading certificate from {path}")
    return certs


def check_cipher_string(ciphers: str) -> None:
    """Raise ``ValueError`` if the OpenSSL cipher string selects no usable cipher."""
    try:
        CertificateOptions(
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(ciphers)
        )
    except (ValueError, SSL.Error):
        raise ValueError(f"no usable cipher in '{ciphers}'") from None


def ensure_default_certificate(
    directory: str, basename: str = "kong-default"
) -> Tuple[str, str]:
    """
    Return ``(cert_path, key_path)`` of the self-signed default certificate.

    The pair lives at ``<directory>/<basename>.crt`` and ``.key``. It is generated
    once (EC P-256, CN and SAN ``localhost``, SAN IPs ``127.0.0.1`` and ``::1``,
    valid ten years) and reused afterwards. Both files are written atomically; the
    key is created with mode 0600.
    """
    cert_path = os.path.join(directory, basename + ".crt")
    key_path = os.path.join(directory, basename + ".key")
    if os.path.isfile(cert_path) and os.path.isfile(key_path):
        return cert_path, key_path
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=DEFAULT_CERT_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key goes first: a reader only trusts the pair once the certificate exists.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def server_context_factory(
    cert_paths: Sequence[str],
    key_paths: Sequence[str],
    cipher_suite: str,
    ciphers: str,
    protocols: Sequence[str],
) -> IOpenSSLServerConnectionCreator:
    """
    Build the TLS options for an SSL listener (``SSL4ServerEndpoint``, ``listenSSL``).

    Only the first certificate/key pair is used. ``ciphers`` is the OpenSSL cipher
    string (used when non-empty, else the suite's list); ``protocols`` holds
    ``ssl_protocols`` tokens and sets the lowest and highest TLS version offered.
    ``modern`` always means TLS 1.3 only.
    """
    if not cert_paths or not key_paths:
        raise ValueError("a certificate and a key are required")
    cert_pem, key_pem = load_pem_pair(cert_paths[0], key_paths[0])
    certificate, private_key = _context_objects(cert_pem, key_pem)
    if cipher_suite == "modern":
        # TLS 1.3 suites are not set through the cipher string; pyOpenSSL refuses a
        # string that selects no TLS 1.2 cipher, so keep the intermediate list and
        # raise the floor to TLS 1.3 instead.
        cipher_string = INTERMEDIATE_CIPHERS
        versions = ["TLSv1.3"]
    else:
        cipher_string = ciphers or CIPHER_SUITES.get(cipher_suite, "")
        versions = sorted(
            (p for p in protocols if p in TLS_VERSIONS), key=_VERSION_ORDER.index
        )
    if not cipher_string:
        raise ValueError(f"no cipher string for suite '{cipher_suite}'")
    if not versions:
        raise ValueError("no TLS protocol enabled")
    lowest = TLS_VERSIONS[versions[0]]
    highest = TLS_VERSIONS[versions[-1]]
    version_options: Dict[str, object] = {}
    if versions[0] == "TLSv1.1":
        version_options["insecurelyLowerMinimumTo"] = lowest
    else:
        version_options["raiseMinimumTo"] = lowest
    if versions[-1] != "TLSv1.3":
        version_options["lowerMaximumSecurityTo"] = highest
    return CertificateOptions(
        privateKey=private_key,
        certificate=certificate,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(cipher_string),
        **version_options,  # type: ignore[arg-type]
    )


UpstreamCreator = Callable[[str, bool], IOpenSSLClientConnectionCreator]


def upstream_tls_creator(
    trusted: Sequence[str] = ("system",), verify_depth: int = 1
) -> UpstreamCreator:
    """
    Return ``creator(hostname, verify)`` giving a client TLS connection creator.

    ``trusted`` holds ``lua_ssl_trusted_certificate`` entries: ``system`` for the
    platform's CA store and/or paths of PEM CA bundles. With ``verify`` the server's
    chain is checked against those roots (at most ``verify_depth`` intermediates) and
    its certificate must name ``hostname``; without it nothing is checked. SNI is
    sent in both cases unless ``hostname`` is an IP address. Creators are cached per
    ``(hostname, verify)``.
    """
    use_system = "system" in trusted
    ca_certs: List[ssl.Certificate] = []
    for path in trusted:
        if path != "system":
            for cert in load_ca_file(path):
                ca_certs.append(
                    ssl.Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))
                )
    trust_root: object
    if use_system and ca_certs:
        trust_root = _SystemPlusCertificates(ca_certs)
    elif use_system:
        trust_root = platformTrust()
    else:
        # Only the given bundles; none at all means verification always fails.
        trust_root = trustRootFromCertificates(ca_certs)
    unverified_options = CertificateOptions()
    cache: Dict[Tuple[str, bool], IOpenSSLClientConnectionCreator] = {}

    def creator(hostname: str, verify: bool) -> IOpenSSLClientConnectionCreator:
        key = (hostname, verify)
        found = cache.get(key)
        if found is None:
            if verify:
                found = optionsForClientTLS(
                    hostname,
                    trustRoot=trust_root,  # type: ignore[arg-type]
                    extraCertificateOptions={"verifyDepth": verify_depth},
                )
            else:
                found = _UnverifiedClientTLS(unverified_options, hostname)
            cache[key] = found
        return found

    return creator


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """A client connection creator that sends SNI but checks nothing."""

    def __init__(self, options: CertificateOptions, hostname: str) -> None:
        self._options = options
        self._server_name: Optional[bytes] = None
        if not (isIPAddress(hostname) or isIPv6Address(hostname)) and hostname:
            self._server_name = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        # Built from the options' context: CertificateOptions itself only has
        # clientConnectionForTLS from Twisted 26 on, and Twisted 25.5 is the last for
        # Python 3.9 (PyPy).
        connection = SSL.Connection(self._options.getContext(), None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IOpenSSLTrustRoot)
class _SystemPlusCertificates:
    """Trust the platform's CA store and some extra CA certificates."""

    def __init__(self, certificates: Sequence[ssl.Certificate]) -> None:
        self._certificates = list(certificates)

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for certificate in self._certificates:
            store.add_cert(certificate.original)


def _context_objects(cert_pem: bytes, key_pem: bytes) -> Tuple[Any, Any]:
    """
    The certificate and key in the form this pyOpenSSL wants for ``SSL.Context``.

    Recent pyOpenSSL takes ``cryptography`` objects (and deprecates its own); older
    releases (the supported floor is 22.0) only take ``crypto.X509``/``crypto.PKey``.
    """
    certificate = x509.load_pem_x509_certificate(cert_pem)
    private_key = serialization.load_pem_private_key(key_pem, password=None)
    try:
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(certificate)  # type: ignore[arg-type]
        context.use_privatekey(private_key)  # type: ignore[arg-type]
    except TypeError:
        return (
            crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem),
            crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
        )
    return certificate, private_key


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"failed loading {what} from {path}: {reason}") from None


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pem")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
