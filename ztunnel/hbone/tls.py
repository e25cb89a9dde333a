"""TLS for HBONE: contexts built from workload certificates, and the SPIFFE peer checks.

shared/WIRE.md: TLS 1.3 only (1.2 when explicitly enabled), ALPN `h2`, no SNI, certificates on
both sides. The client accepts the server only if its SPIFFE URI SAN is one of the expected
identities; the server accepts any client of its own trust domain (authorization decides later).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterable

from cryptography import x509

from ztunnel.ca import IssuedCertificate
from ztunnel.errors import IdentityError
from ztunnel.identity import SpiffeId

ALPN_H2 = "h2"
# TLS 1.2 fallback suites: ECDHE with AES-GCM only. (TLS 1.3 suites are OpenSSL's defaults,
# which list the AES-GCM suites first; Python's ssl cannot restrict them further.)
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"


class PeerRejected(IdentityError):
    """The peer's certificate verified but its identity is not acceptable here."""


def _load_chain(ctx: ssl.SSLContext, cert: IssuedCertificate) -> None:
    # ssl only loads keys from files: write them to a private temp file and drop it at once.
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="zt-", suffix=".pem", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem + cert.cert_chain_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def _base_context(purpose: int, cert: IssuedCertificate, allow_tls12: bool) -> ssl.SSLContext:
    proto = ssl.PROTOCOL_TLS_CLIENT if purpose == 0 else ssl.PROTOCOL_TLS_SERVER
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if allow_tls12:
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.root_pem.decode())
    _load_chain(ctx, cert)
    ctx.set_alpn_protocols([ALPN_H2])
    # No session resumption is needed (WIRE.md); tickets would only cost memory.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(cert: IssuedCertificate, allow_tls12: bool = False) -> ssl.SSLContext:
    return _base_context(0, cert, allow_tls12)


def server_context(cert: IssuedCertificate, allow_tls12: bool = False) -> ssl.SSLContext:
    return _base_context(1, cert, allow_tls12)


def spiffe_ids_of(der: bytes) -> list[SpiffeId]:
    """Every parsable SPIFFE URI SAN of a DER certificate, in order (DNS SANs are ignored)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    out = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            out.append(SpiffeId.parse(uri))
        except IdentityError:
            continue
    return out


def peer_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes:
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PeerRejected("peer presented no certificate")
    return der


def check_server_identity(der: bytes, expected: Iterable[SpiffeId]) -> SpiffeId:
    """Client side: the server's SPIFFE SAN must be one of the expected identities."""
    want = set(expected)
    ids = spiffe_ids_of(der)
    for ident in ids:
        if ident in want:
            return ident
    got = ", ".join(i.uri for i in ids) or "no SPIFFE identity"
    exp = ", ".join(sorted(i.uri for i in want))
    raise PeerRejected(f"server identity {got} is not one of the expected [{exp}]")


def check_client_identity(der: bytes, trust_domain: str) -> SpiffeId:
    """Server side: the client's first SPIFFE SAN must be in our trust domain."""
    ids = spiffe_ids_of(der)
    if not ids:
        raise PeerRejected("client certificate carries no SPIFFE identity")
    if ids[0].trust_domain != trust_domain:
        raise PeerRejected(
            f"client trust domain {ids[0].trust_domain!r} is not ours ({trust_domain!r})"
        )
    return ids[0]


class ContextCache:
    """SSL contexts per certificate, rebuilt when the certificate is renewed."""

    def __init__(self, allow_tls12: bool = False) -> None:
        self.allow_tls12 = allow_tls12
        self._client: dict[SpiffeId, tuple[IssuedCertificate, ssl.SSLContext]] = {}
        self._server: dict[SpiffeId, tuple[IssuedCertificate, ssl.SSLContext]] = {}

    def client(self, cert: IssuedCertificate) -> ssl.SSLContext:
        hit = self._client.get(cert.identity)
        if hit is None or hit[0] is not cert:
            hit = (cert, client_context(cert, self.allow_tls12))
            self._client[cert.identity] = hit
        return hit[1]

    def server(self, cert: IssuedCertificate) -> ssl.SSLContext:
        hit = self._server.get(cert.identity)
        if hit is None or hit[0] is not cert:
            hit = (cert, server_context(cert, self.allow_tls12))
            self._server[cert.identity] = hit
        return hit[1]
