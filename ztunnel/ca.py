"""A built-in certificate authority in Istio's plug-in "cacerts" layout.

`ca-cert.pem`/`ca-key.pem` sign workload certificates, `root-cert.pem` is the mesh trust root
and `cert-chain.pem` is the chain from the signing cert up to the root. Workload certificates
follow shared/WIRE.md: ECDSA P-256, empty subject, one critical SPIFFE URI SAN, SKI/AKI.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.errors import CertificateError
from ztunnel.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

WORKLOAD_CERT_TTL = dt.timedelta(hours=24)
CA_TTL = dt.timedelta(days=3650)
# Clock skew between nodes: certificates are valid from slightly in the past.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A workload's key and chain: `chain[0]` is the leaf, `roots` the trust anchors."""

    identity: SpiffeId
    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    roots_pem: tuple[bytes, ...]
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def cert_chain_pem(self) -> bytes:
        return b"".join(self.chain_pem)

    @property
    def root_pem(self) -> bytes:
        return b"".join(self.roots_pem)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def self_signed_ca(
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    now: dt.datetime | None = None,
    ttl: dt.timedelta = CA_TTL,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new root CA key and certificate for a trust domain."""
    now = now or _now()
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ztunnel-py root CA ({trust_domain})"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def workload_certificate(
    identity: SpiffeId,
    public_key: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime | None = None,
    ttl: dt.timedelta = WORKLOAD_CERT_TTL,
) -> x509.Certificate:
    """A leaf for `identity`: empty subject, so the SAN extension must be critical
    (RFC 5280 section 4.2.1.6)."""
    now = now or _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + ttl, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


class CertificateAuthority:
    """Signs workload certificates with a CA key; the chain ends at the mesh root."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        chain: tuple[x509.Certificate, ...] = (),
        roots: tuple[x509.Certificate, ...] = (),
    ) -> None:
        self.key = key
        self.cert = cert
        # certificates above `cert` up to (excluding) the root
        self.chain = chain
        self.roots = roots or (cert,)

    @property
    def trust_domain(self) -> str:
        orgs = self.roots[0].subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(orgs[0].value) if orgs else DEFAULT_TRUST_DOMAIN

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        key, cert = self_signed_ca(trust_domain)
        return cls(key, cert)

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        """Load Istio's cacerts layout; errors name the file."""
        d = Path(directory)
        try:
            key_data = (d / "ca-key.pem").read_bytes()
            cert_data = (d / "ca-cert.pem").read_bytes()
            root_data = (d / "root-cert.pem").read_bytes()
            chain_path = d / "cert-chain.pem"
            chain_data = chain_path.read_bytes() if chain_path.exists() else cert_data
        except OSError as e:
            raise CertificateError(f"{e.filename}: cannot read CA file: {e.strerror}") from None
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError) as e:
            raise CertificateError(f"{d / 'ca-key.pem'}: not a PEM private key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{d / 'ca-key.pem'}: only ECDSA CA keys are supported")
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
            roots = tuple(x509.load_pem_x509_certificates(root_data))
            full_chain = x509.load_pem_x509_certificates(chain_data)
        except ValueError as e:
            raise CertificateError(f"{d}: bad certificate PEM: {e}") from None
        # cert-chain.pem = ca-cert, intermediates..., root; keep only the intermediates.
        root_der = {r.fingerprint(hashes.SHA256()) for r in roots}
        middle = tuple(c for c in full_chain[1:] if c.fingerprint(hashes.SHA256()) not in root_der)
        return cls(key, cert, middle, roots)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "ca-key.pem", key_pem(self.key), private=True)
        _write(d / "ca-cert.pem", cert_pem(self.cert))
        _write(d / "root-cert.pem", b"".join(cert_pem(r) for r in self.roots))
        chain = (self.cert, *self.chain)
        if self.roots[0] != self.cert:
            chain = (*chain, self.roots[0])
        _write(d / "cert-chain.pem", b"".join(cert_pem(c) for c in chain))

    def issue(
        self,
        identity: SpiffeId,
        ttl: dt.timedelta = WORKLOAD_CERT_TTL,
        now: dt.datetime | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> IssuedCertificate:
        key = key or new_key()
        leaf = workload_certificate(identity, key.public_key(), self.key, self.cert, now, ttl)
        chain = [leaf]
        if self.cert not in self.roots:
            chain.append(self.cert)
        chain.extend(self.chain)
        return IssuedCertificate(
            identity=identity,
            key_pem=key_pem(key),
            chain_pem=tuple(cert_pem(c) for c in chain),
            roots_pem=tuple(cert_pem(r) for r in self.roots),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_workload_files(cert: IssuedCertificate, out: str | Path) -> None:
    """`ztunnel ca issue` output: cert-chain.pem, key.pem, root-cert.pem."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    _write(d / "cert-chain.pem", cert.cert_chain_pem)
    _write(d / "key.pem", cert.key_pem, private=True)
    _write(d / "root-cert.pem", cert.root_pem)
