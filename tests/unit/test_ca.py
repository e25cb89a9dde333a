"""The built-in CA: workload certificate shape (shared/WIRE.md), chain verification with two
independent verifiers, the cacerts layout, and the `ztunnel ca` commands."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ztunnel.ca import CertificateAuthority, IssuedCertificate, cert_pem, key_pem
from ztunnel.errors import CertificateError
from ztunnel.identity import SpiffeId

pytestmark = pytest.mark.unit

ID = SpiffeId("cluster.local", "shop", "echo")
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


@pytest.fixture(scope="module")
def issued(ca: CertificateAuthority) -> IssuedCertificate:
    return ca.issue(ID)


def leaf_of(cert: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.chain_pem[0])


def verify_with_cryptography(cert: IssuedCertificate, at: dt.datetime | None = None) -> None:
    """RFC 5280 path validation by cryptography's (Rust) verifier, as a TLS client would."""
    roots = [x509.load_pem_x509_certificate(r) for r in cert.roots_pem]
    chain = [x509.load_pem_x509_certificate(c) for c in cert.chain_pem]
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(at or dt.datetime.now(dt.UTC))
        .build_client_verifier()
    )
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.subjects is not None


def verify_with_openssl(cert: IssuedCertificate, tmp: Path) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl CLI is needed for this test (Debian package openssl)"
    (tmp / "root.pem").write_bytes(cert.root_pem)
    (tmp / "leaf.pem").write_bytes(cert.chain_pem[0])
    (tmp / "untrusted.pem").write_bytes(b"".join(cert.chain_pem[1:]) or cert.root_pem)
    return subprocess.run(
        [
            openssl,
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp / "root.pem"),
            "-untrusted",
            str(tmp / "untrusted.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


# ---- the workload certificate ----------------------------------------------------------------


def test_workload_key_is_p256(issued: IssuedCertificate) -> None:
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    pub = leaf_of(issued).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    assert pub.public_numbers() == key.public_key().public_numbers()


def test_workload_subject_is_empty_and_san_is_one_critical_uri(issued: IssuedCertificate) -> None:
    leaf = leaf_of(issued)
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # RFC 5280 section 4.2.1.6: with an empty subject the SAN extension MUST be critical.
    assert san.critical is True
    assert list(san.value) == [x509.UniformResourceIdentifier(ID.uri)]


def test_workload_has_ski_and_aki_matching_the_ca(
    ca: CertificateAuthority, issued: IssuedCertificate
) -> None:
    leaf = leaf_of(issued)
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest


def test_workload_is_not_a_ca_and_may_do_tls_both_ways(issued: IssuedCertificate) -> None:
    leaf = leaf_of(issued)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign


def test_workload_lives_about_24_hours(issued: IssuedCertificate) -> None:
    leaf = leaf_of(issued)
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc <= now
    assert dt.timedelta(hours=23, minutes=55) <= leaf.not_valid_after_utc - now
    assert leaf.not_valid_after_utc - now <= dt.timedelta(hours=24, minutes=1)
    # Backdated a little for clock skew, but not by hours.
    assert now - leaf.not_valid_before_utc <= dt.timedelta(minutes=15)
    assert issued.not_after == leaf.not_valid_after_utc
    assert issued.not_before == leaf.not_valid_before_utc


def test_custom_ttl_and_clock(ca: CertificateAuthority) -> None:
    at = NOW - dt.timedelta(days=3)
    cert = ca.issue(ID, ttl=dt.timedelta(hours=1), now=at)
    assert cert.not_after == (at + dt.timedelta(hours=1)).replace(microsecond=0)


def test_chain_verifies_with_cryptography(issued: IssuedCertificate) -> None:
    verify_with_cryptography(issued)


def test_chain_verifies_with_openssl(issued: IssuedCertificate, tmp_path: Path) -> None:
    res = verify_with_openssl(issued, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ": OK" in res.stdout


def test_verification_fails_against_another_root(issued: IssuedCertificate) -> None:
    other = CertificateAuthority.create("cluster.local")
    forged = IssuedCertificate(
        issued.identity,
        issued.key_pem,
        issued.chain_pem,
        (cert_pem(other.cert),),
        issued.not_before,
        issued.not_after,
    )
    with pytest.raises(VerificationError):
        verify_with_cryptography(forged)


def test_expired_certificate_does_not_verify(ca: CertificateAuthority) -> None:
    old = ca.issue(ID, ttl=dt.timedelta(hours=1), now=NOW - dt.timedelta(days=2))
    with pytest.raises(VerificationError):
        verify_with_cryptography(old)


def test_every_certificate_is_new(ca: CertificateAuthority) -> None:
    a, b = ca.issue(ID), ca.issue(ID)
    assert leaf_of(a).serial_number != leaf_of(b).serial_number
    assert a.key_pem != b.key_pem


def test_trust_domain_of_the_ca() -> None:
    assert CertificateAuthority.create("example.org").trust_domain == "example.org"


# ---- cacerts layout --------------------------------------------------------------------------


def test_save_load_round_trip(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path)
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
        assert (tmp_path / name).is_file(), name
    # The CA key is private to its owner.
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) & 0o077 == 0
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.cert == ca.cert
    assert loaded.roots == ca.roots
    assert loaded.trust_domain == "cluster.local"
    assert loaded.key.public_key().public_numbers() == ca.key.public_key().public_numbers()
    # A certificate from the reloaded CA verifies against the original root.
    cert = loaded.issue(ID)
    cert = IssuedCertificate(
        cert.identity,
        cert.key_pem,
        cert.chain_pem,
        (cert_pem(ca.cert),),
        cert.not_before,
        cert.not_after,
    )
    verify_with_cryptography(cert)


def _intermediate(
    root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, td: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
            x509.NameAttribute(NameOID.COMMON_NAME, "intermediate"),
        ]
    )
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    return key, cert


def test_istio_plugin_cacerts_with_an_intermediate(tmp_path: Path) -> None:
    """Istio's plug-in layout: ca-cert = intermediate, cert-chain = intermediate + root."""
    root_ca = CertificateAuthority.create("cluster.local")
    key, inter = _intermediate(root_ca.key, root_ca.cert, "cluster.local")
    (tmp_path / "ca-cert.pem").write_bytes(cert_pem(inter))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(key))
    (tmp_path / "root-cert.pem").write_bytes(cert_pem(root_ca.cert))
    (tmp_path / "cert-chain.pem").write_bytes(cert_pem(inter) + cert_pem(root_ca.cert))
    ca = CertificateAuthority.load(tmp_path)
    cert = ca.issue(ID)
    chain = [x509.load_pem_x509_certificate(c) for c in cert.chain_pem]
    assert chain[1] == inter
    assert root_ca.cert not in chain  # the root is the trust anchor, not part of the chain
    assert [x509.load_pem_x509_certificate(r) for r in cert.roots_pem] == [root_ca.cert]
    aki = chain[0].extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    inter_ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == inter_ski.digest
    verify_with_cryptography(cert)
    res = verify_with_openssl(cert, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # Saving writes the same layout back.
    out = tmp_path / "copy"
    ca.save(out)
    again = CertificateAuthority.load(out)
    assert again.cert == inter and again.chain == () and again.roots == (root_ca.cert,)


def test_load_errors_name_the_file(tmp_path: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match=r"ca-key\.pem"):
        CertificateAuthority.load(tmp_path / "missing")
    ca.save(tmp_path)
    (tmp_path / "ca-key.pem").write_text("not a key")
    with pytest.raises(CertificateError, match=r"ca-key\.pem"):
        CertificateAuthority.load(tmp_path)
    ca.save(tmp_path)
    (tmp_path / "root-cert.pem").write_text("garbage")
    with pytest.raises(CertificateError, match=str(tmp_path)):
        CertificateAuthority.load(tmp_path)


# ---- the `ztunnel ca` commands ---------------------------------------------------------------


def ztunnel(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZTUNNEL_")}
    return subprocess.run(
        [sys.executable, "-m", "ztunnel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_ca_init_and_issue(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "wl"
    res = ztunnel("ca", "init", "--dir", str(ca_dir), "--trust-domain", "example.org")
    assert res.returncode == 0, res.stderr
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
        assert (ca_dir / name).is_file(), name
    assert CertificateAuthority.load(ca_dir).trust_domain == "example.org"
    uri = "spiffe://example.org/ns/shop/sa/echo"
    res = ztunnel("ca", "issue", "--dir", str(ca_dir), "--identity", uri, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert uri in res.stdout
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        assert (out / name).is_file(), name
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) & 0o077 == 0
    chain = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    issued = IssuedCertificate(
        SpiffeId.parse(uri),
        (out / "key.pem").read_bytes(),
        tuple(cert_pem(c) for c in chain),
        ((out / "root-cert.pem").read_bytes(),),
        chain[0].not_valid_before_utc,
        chain[0].not_valid_after_utc,
    )
    verify_with_cryptography(issued)


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        ("not-a-spiffe-id", "not a SPIFFE URI"),
        ("spiffe://cluster.local/ns/shop", "spiffe://TD/ns/N/sa/S"),
        ("spiffe://cluster.local/ns/shop/sa/", "service account"),
        ("spiffe://other.local/ns/shop/sa/echo", "other.local"),
    ],
)
def test_cli_ca_issue_bad_identity_exits_2(tmp_path: Path, identity: str, message: str) -> None:
    assert ztunnel("ca", "init", "--dir", str(tmp_path / "ca")).returncode == 0
    res = ztunnel(
        "ca",
        "issue",
        "--dir",
        str(tmp_path / "ca"),
        "--identity",
        identity,
        "--out",
        str(tmp_path / "out"),
    )
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_ca_issue_without_ca_exits_2(tmp_path: Path) -> None:
    res = ztunnel(
        "ca",
        "issue",
        "--dir",
        str(tmp_path / "nope"),
        "--identity",
        ID.uri,
        "--out",
        str(tmp_path / "out"),
    )
    assert res.returncode == 2
    assert "ca-key.pem" in res.stderr and "Traceback" not in res.stderr
