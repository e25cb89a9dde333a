"""Workload certificates from Istio's CA (`/istio.v1.auth.IstioCertificateService/
CreateCertificate`), as a `CertificateSource`: the `CertificateManager` keeps its caching,
single-flight, half-life renewal and back-off, the proxy does not change.

Per request (WIRE.md, istio/ztunnel src/identity/caclient.rs): a fresh ECDSA P-256 key and a
CSR carrying only the SPIFFE URI SAN, `ImpersonatedIdentity` metadata (a node agent asks for the
workloads on its node), `authorization: Bearer <token>` and `clusterid`. The answer is checked
before use: a PEM chain whose leaf holds our key and the requested identity and chains to the
last element, the trust root(s). Roots seen from the CA stay trusted for one certificate
lifetime after the CA stops sending them, so that peers signed by the old and the new root
both verify while a root rotates (`TrustBundle`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from ztunnel.ca import IssuedCertificate, cert_pem, key_pem, new_key
from ztunnel.errors import CertificateError, ZtunnelError
from ztunnel.identity import SpiffeId
from ztunnel.xds.client import reraise_cancellation, secure_channel
from ztunnel.xds.config import Endpoint, IstiodConfig
from ztunnel.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
MAX_ROOTS = 16  # a trust bundle never grows beyond this, whatever the CA sends
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def csr_for(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR with an empty subject and one critical SPIFFE URI SAN (WIRE.md)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _load_pems(text: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as e:
        raise CertificateError(f"{what} is not a PEM certificate: {e}") from None
    if not certs:
        raise CertificateError(f"{what} holds no certificate")
    return certs


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_chain(
    identity: SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    chain: list[str],
    now: dt.datetime,
) -> tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
    """(leaf, intermediates, roots) of a CA answer, or CertificateError saying what is wrong."""
    if not chain:
        raise CertificateError("the CA answered with an empty certificate chain")
    leaf_certs = _load_pems(chain[0], "cert_chain[0] (the leaf)")
    leaf, extra = leaf_certs[0], leaf_certs[1:]
    middle = extra + [
        c for i, p in enumerate(chain[1:-1], 1) for c in _load_pems(p, f"cert_chain[{i}]")
    ]
    roots = (
        _load_pems(chain[-1], f"cert_chain[{len(chain) - 1}] (the root)") if len(chain) > 1 else []
    )
    if not roots:
        raise CertificateError("the CA's chain has no root (its last element is the trust root)")
    want = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    got = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if got != want:
        raise CertificateError("the leaf certificate is not for the key we sent")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if identity.uri not in uris:
        raise CertificateError(
            f"the leaf certificate is for {', '.join(uris) or 'no SPIFFE identity'}, "
            f"not {identity.uri}"
        )
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(f"the leaf certificate expired at {leaf.not_valid_after_utc}")
    # Walk leaf -> intermediates -> one of the roots by signatures.
    current, pool = leaf, list(middle)
    for _ in range(len(middle) + 1):
        if any(_issued_by(current, r) for r in roots):
            return leaf, middle, roots
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            break
        pool.remove(parent)
        current = parent
    raise CertificateError("the leaf certificate does not chain to the root the CA sent")


@dataclass
class _Root:
    pem: bytes
    not_after: dt.datetime
    last_seen: dt.datetime


class TrustBundle:
    """The roots peers may chain to: every root the CA returned, kept until it expires or until
    `retention` after the CA last returned it (a leaf signed under it has expired by then)."""

    def __init__(self, retention: dt.timedelta) -> None:
        self.retention = retention
        self._roots: dict[bytes, _Root] = {}  # by SHA-256 fingerprint

    def add(self, roots: list[x509.Certificate], now: dt.datetime) -> bool:
        """Record the roots of one answer; True when the trusted set changed."""
        before = set(self._roots)
        for r in roots:
            fp = r.fingerprint(hashes.SHA256())
            if fp in self._roots:
                self._roots[fp].last_seen = now
            else:
                self._roots[fp] = _Root(cert_pem(r), r.not_valid_after_utc, now)
        self._expire(now)
        return set(self._roots) != before

    def _expire(self, now: dt.datetime) -> None:
        for fp, r in list(self._roots.items()):
            if r.not_after <= now or now - r.last_seen > self.retention:
                del self._roots[fp]
        while len(self._roots) > MAX_ROOTS:  # drop the least recently seen
            oldest = min(self._roots, key=lambda k: self._roots[k].last_seen)
            del self._roots[oldest]

    def pems(self, now: dt.datetime) -> tuple[bytes, ...]:
        self._expire(now)
        # Most recently seen first: the root the CA uses now leads.
        return tuple(
            r.pem for r in sorted(self._roots.values(), key=lambda r: r.last_seen, reverse=True)
        )


class IstioCaSource:
    """A `CertificateSource` backed by the Istio CA; also a `TrustBundleSource`."""

    def __init__(
        self,
        cfg: IstiodConfig,
        now: Callable[[], dt.datetime] = utcnow,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if cfg.ca is None:
            raise ZtunnelError("no CA address configured")
        self.cfg = cfg
        self.endpoint: Endpoint = cfg.ca
        self._now = now
        self.timeout = timeout
        self.bundle = TrustBundle(dt.timedelta(seconds=cfg.secret_ttl))
        self._channel: grpc.aio.Channel | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._root_fp: object = None
        self._roots_listeners: list[Callable[[tuple[bytes, ...]], None]] = []
        self.requests = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_success: dt.datetime | None = None

    def watch_roots(self, callback: Callable[[tuple[bytes, ...]], None]) -> None:
        self._roots_listeners.append(callback)

    def _stub(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        fp = self.cfg.ca_root.fingerprint()
        if self._channel is None or fp != self._root_fp:
            # New channel when the CA's root file changed (rotation); the old one is closed
            # in the background: an in-flight call on it may still finish.
            old, self._channel = (
                self._channel,
                secure_channel(self.endpoint, self.cfg.ca_root, self.cfg.alt_ca_hostname),
            )
            self._root_fp = fp
            if old is not None:
                task = asyncio.ensure_future(old.close(grace=self.timeout))
                task.set_name("ca-channel-close")
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        return ca_pb2_grpc.IstioCertificateServiceStub(self._channel)

    async def fetch(self, identity: SpiffeId) -> IssuedCertificate:
        self.requests += 1
        try:
            cert = await self._fetch(identity)
        except ZtunnelError as e:
            self.failures += 1
            self.last_error = f"{identity}: {e}"
            raise
        self.last_success = self._now()
        self.last_error = None
        return cert

    async def _fetch(self, identity: SpiffeId) -> IssuedCertificate:
        key = new_key()
        meta = struct_pb2.Struct()
        meta.update({IMPERSONATED_IDENTITY: identity.uri})
        req = ca_pb2.IstioCertificateRequest(
            csr=csr_for(identity, key).decode(),
            validity_duration=int(self.cfg.secret_ttl),
            metadata=meta,
        )
        metadata = self.cfg.auth_metadata(self.cfg.ca_headers)
        try:
            resp = await self._stub().CreateCertificate(
                req, metadata=metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as e:
            reraise_cancellation()
            raise CertificateError(
                f"Istio CA at {self.endpoint}: {e.code().name}: {e.details()}"
            ) from None
        now = self._now()
        try:
            leaf, middle, roots = check_chain(identity, key, list(resp.cert_chain), now)
        except CertificateError as e:
            raise CertificateError(f"Istio CA at {self.endpoint} answered badly: {e}") from None
        changed = self.bundle.add(roots, now)
        bundle = self.bundle.pems(now)
        if changed:
            log.info("trust bundle from the Istio CA now holds %d root(s)", len(bundle))
            for cb in list(self._roots_listeners):
                cb(bundle)
        return IssuedCertificate(
            identity=identity,
            key_pem=key_pem(key),
            chain_pem=(cert_pem(leaf), *(cert_pem(c) for c in middle)),
            roots_pem=bundle,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def status(self) -> dict[str, Any]:
        now = self._now()
        roots = []
        for pem in self.bundle.pems(now):
            c = x509.load_pem_x509_certificate(pem)
            roots.append(
                {
                    "subject": c.subject.rfc4514_string(),
                    "not_after": c.not_valid_after_utc.isoformat(),
                    "sha256": c.fingerprint(hashes.SHA256()).hex(),
                }
            )
        return {
            "address": str(self.endpoint),
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_success": self.last_success.isoformat() if self.last_success else None,
            "trust_roots": roots,
        }

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
