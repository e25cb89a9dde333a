"""The Istio CA source's pure parts and the certificate manager's new duties: checking CA
answers, the trust bundle across a root rotation, forgetting identities, re-rooting held
certificates."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography import x509

from ztunnel.ca import (
    CertificateAuthority,
    IssuedCertificate,
    cert_pem,
    new_key,
    workload_certificate,
)
from ztunnel.certs import CertificateManager, LocalCaSource
from ztunnel.errors import CertificateError
from ztunnel.identity import SpiffeId
from ztunnel.istioca import TrustBundle, check_chain, csr_for

pytestmark = pytest.mark.unit

ECHO = SpiffeId("cluster.local", "shop", "echo")
WEB = SpiffeId("cluster.local", "frontend", "web")
NOW = dt.datetime.now(dt.UTC)


def answer(ca: CertificateAuthority, identity: SpiffeId, key: object) -> list[str]:
    leaf = workload_certificate(identity, key.public_key(), ca.key, ca.cert)  # type: ignore[attr-defined]
    return [cert_pem(leaf).decode(), cert_pem(ca.cert).decode()]


def test_csr_carries_only_the_spiffe_san() -> None:
    csr = x509.load_pem_x509_csr(csr_for(ECHO, new_key()))
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        ECHO.uri
    ]


def test_check_chain_accepts_a_good_answer_and_explains_bad_ones() -> None:
    ca, other = CertificateAuthority.create(), CertificateAuthority.create()
    key = new_key()
    _, middle, roots = check_chain(ECHO, key, answer(ca, ECHO, key), NOW)
    assert roots == [ca.cert] and middle == []
    cases = [
        ([], "empty certificate chain"),
        (["garbage", "more"], "cert_chain[0] (the leaf) is not a PEM certificate"),
        (answer(ca, ECHO, key)[:1], "has no root"),
        (answer(ca, ECHO, new_key()), "not for the key we sent"),
        (answer(ca, WEB, key), "is for spiffe://cluster.local/ns/frontend/sa/web, not"),
        ([answer(ca, ECHO, key)[0], cert_pem(other.cert).decode()], "does not chain to the root"),
    ]
    for chain, message in cases:
        with pytest.raises(CertificateError) as e:
            check_chain(ECHO, key, chain, NOW)
        assert message in str(e.value)


def test_check_chain_walks_intermediates_and_multi_root_bundles() -> None:
    root = CertificateAuthority.create()
    inter_key = new_key()
    # An intermediate CA signed by the root.
    inter = CertificateAuthority(inter_key, _intermediate(root, inter_key), roots=(root.cert,))
    key = new_key()
    leaf = workload_certificate(ECHO, key.public_key(), inter.key, inter.cert)
    other = CertificateAuthority.create()
    bundle = cert_pem(other.cert) + cert_pem(root.cert)
    _, middle, roots = check_chain(
        ECHO, key, [cert_pem(leaf).decode(), cert_pem(inter.cert).decode(), bundle.decode()], NOW
    )
    assert middle == [inter.cert] and len(roots) == 2


def _intermediate(root: CertificateAuthority, key: object) -> x509.Certificate:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)  # type: ignore[attr-defined]
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(root.key, hashes.SHA256())
    )


def test_trust_bundle_keeps_a_retired_root_for_one_certificate_lifetime() -> None:
    old, new = CertificateAuthority.create().cert, CertificateAuthority.create().cert
    b = TrustBundle(dt.timedelta(hours=24))
    assert b.add([old], NOW)
    assert not b.add([old], NOW + dt.timedelta(minutes=1))
    assert b.add([new], NOW + dt.timedelta(hours=1))  # the CA switched roots
    assert b.pems(NOW + dt.timedelta(hours=2)) == (cert_pem(new), cert_pem(old))
    # A day after the CA last sent it, no valid leaf can chain to the old root any more.
    assert b.pems(NOW + dt.timedelta(hours=25)) == (cert_pem(new),)


def test_trust_bundle_is_bounded() -> None:
    b = TrustBundle(dt.timedelta(days=1))
    for i in range(20):
        b.add([CertificateAuthority.create().cert], NOW + dt.timedelta(seconds=i))
    assert len(b.pems(NOW + dt.timedelta(seconds=30))) == 16


class RootedSource(LocalCaSource):
    """The local CA as a TrustBundleSource, to drive CertificateManager.update_roots."""

    def __init__(self, ca: CertificateAuthority) -> None:
        super().__init__(ca)
        self.callbacks: list[object] = []

    def watch_roots(self, callback: object) -> None:
        self.callbacks.append(callback)


def test_manager_re_roots_held_certificates_and_forgets_departed_identities() -> None:
    async def go() -> None:
        source = RootedSource(CertificateAuthority.create())
        certs = CertificateManager(source)
        assert source.callbacks == [certs.update_roots]
        seen: list[IssuedCertificate] = []
        echo = await certs.get(ECHO)
        certs.on_renewed(ECHO, seen.append)
        web = await certs.get(WEB)
        certs.update_roots((b"root-a", b"root-b"))
        for ident, before in ((ECHO, echo), (WEB, web)):
            now = certs.cached(ident)
            assert now is not None and now.roots_pem == (b"root-a", b"root-b")
            assert now.chain_pem == before.chain_pem and now.key_pem == before.key_pem
        assert seen and seen[-1].roots_pem == (b"root-a", b"root-b")
        assert certs.retain({WEB}) == [ECHO]
        assert certs.cached(ECHO) is None and certs.cached(WEB) is not None
        assert [s["identity"] for s in certs.snapshot()] == [WEB.uri]
        await certs.close()

    asyncio.run(go())
