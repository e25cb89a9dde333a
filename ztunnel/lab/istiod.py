"""A test istiod: the server side of delta ADS (`istio.workload.Address`,
`istio.security.Authorization`) and of the Istio CA (`CreateCertificate`) over grpcio, built from
the same protos as the agent. It is a stand-in for tests and the lab, not istiod: it serves
whatever `MeshState` it is given (the local YAML file, the lab's Kubernetes-derived state)
through the model -> proto conversion, signs CSRs with a `CertificateAuthority`, and can
inject faults: a restart mid-stream, bad resources, a CA outage, garbage CA answers, a serving
certificate nobody trusts.

`python -m ztunnel.lab.istiod --listen IP:PORT --ca-dir DIR --mesh FILE` serves a mesh file
(reloaded when it changes) until SIGTERM; the lab runs it inside its network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import ipaddress
import itertools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import any_pb2

from ztunnel.authz.policy import AuthorizationPolicy
from ztunnel.ca import (
    BACKDATE,
    WORKLOAD_CERT_TTL,
    CertificateAuthority,
    cert_pem,
    key_pem,
    workload_certificate,
)
from ztunnel.ca import new_key as new_ec_key
from ztunnel.errors import ZtunnelError
from ztunnel.identity import SpiffeId
from ztunnel.model import Service, Workload
from ztunnel.state import MeshState
from ztunnel.xds import convert
from ztunnel.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as dpb
from ztunnel.xds.gen.envoy.service.discovery.v3 import discovery_pb2_grpc as dgrpc
from ztunnel.xds.gen.istio.v1.auth import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

ISTIOD_HOST = "istiod.istio-system.svc"
TYPES = (convert.ADDRESS_TYPE, convert.AUTHORIZATION_TYPE)
MAX_TTL = dt.timedelta(days=7)

Resources = dict[str, dict[str, any_pb2.Any]]  # type url -> name -> resource


def resources_of(state: MeshState) -> Resources:
    """The xDS resources istiod would send for a mesh state (model -> proto)."""
    out: Resources = {t: {} for t in TYPES}
    items: list[Workload | Service] = [*state.workloads, *state.services]
    for item in items:
        out[convert.ADDRESS_TYPE][convert.resource_name(item)] = convert.to_any(
            convert.address_to_proto(item), convert.ADDRESS_TYPE
        )
    for p in state.policies:
        if isinstance(p, AuthorizationPolicy):
            out[convert.AUTHORIZATION_TYPE][p.key] = convert.to_any(
                convert.policy_to_proto(p), convert.AUTHORIZATION_TYPE
            )
    return out


def version_of(resource: any_pb2.Any) -> str:
    return hashlib.sha256(resource.type_url.encode() + resource.value).hexdigest()[:16]


def serving_certificate(
    ca: CertificateAuthority, hosts: Iterable[str], ttl: dt.timedelta = dt.timedelta(days=365)
) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) of a TLS server certificate for istiod's names and addresses."""
    key = new_ec_key()
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + ttl, ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    chain = cert_pem(cert) + b"".join(cert_pem(c) for c in (ca.cert, *ca.chain))
    return key_pem(key), chain


@dataclass
class Stream:
    """One agent's delta ADS stream, as the test istiod saw it."""

    id: int
    metadata: dict[str, str]
    requests: list[dpb.DeltaDiscoveryRequest] = field(default_factory=list)
    known: dict[str, dict[str, str]] = field(default_factory=dict)  # type -> name -> version
    acks: list[tuple[str, str]] = field(default_factory=list)  # (type, nonce)
    nacks: list[tuple[str, str, str]] = field(default_factory=list)  # (type, nonce, message)
    sent: list[dpb.DeltaDiscoveryResponse] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    open: bool = True

    def initial(self, type_url: str) -> dpb.DeltaDiscoveryRequest | None:
        return next((r for r in self.requests if r.type_url == type_url), None)


@dataclass
class CaCall:
    identity: str
    metadata: dict[str, str]
    answered: str  # "ok" or the fault


class _Ads(dgrpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, istiod: TestIstiod) -> None:
        self.istiod = istiod

    async def DeltaAggregatedResources(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dpb.DeltaDiscoveryResponse]:
        ist = self.istiod
        md = {k: str(v) for k, v in context.invocation_metadata()}
        if not ist.authorized(md):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        stream = Stream(next(ist._ids), md)
        ist.streams.append(stream)
        reader = asyncio.ensure_future(self._read(stream, request_iterator))
        reader.set_name(f"test-istiod-read-{stream.id}")
        try:
            while stream.open:
                await stream.wake.wait()
                stream.wake.clear()
                for type_url in list(stream.known):
                    resp = ist._delta(stream, type_url)
                    if resp is not None:
                        yield resp
        finally:
            stream.open = False
            reader.cancel()

    async def _read(self, stream: Stream, requests: Any) -> None:
        try:
            async for req in requests:
                stream.requests.append(req)
                if req.response_nonce:
                    if req.HasField("error_detail"):
                        stream.nacks.append(
                            (req.type_url, req.response_nonce, req.error_detail.message)
                        )
                    else:
                        stream.acks.append((req.type_url, req.response_nonce))
                elif req.type_url not in stream.known:
                    # A new subscription: the client tells what it holds already.
                    stream.known[req.type_url] = dict(req.initial_resource_versions)
                    stream.wake.set()
                self.istiod._changed.set()
        finally:
            stream.open = False
            stream.wake.set()


class _Ca(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, istiod: TestIstiod) -> None:
        self.istiod = istiod

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        ist = self.istiod
        md = {k: str(v) for k, v in context.invocation_metadata()}
        identity = ""
        if "ImpersonatedIdentity" in request.metadata.fields:
            identity = request.metadata.fields["ImpersonatedIdentity"].string_value
        call = CaCall(identity, md, ist.ca_mode)
        ist.ca_calls.append(call)
        ist._changed.set()
        if not ist.authorized(md):
            call.answered = "unauthenticated"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        if ist.ca_mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "CA is down (test fault)")
        if ist.ca_mode == "garbage":
            return ca_pb2.IstioCertificateResponse(cert_chain=["garbage", "more garbage"])
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
            ident = SpiffeId.parse(identity)
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if ident.uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
                raise ZtunnelError("the CSR's SAN is not the impersonated identity")
            public_key = csr.public_key()
        except (ValueError, ZtunnelError, x509.ExtensionNotFound) as e:
            call.answered = f"invalid: {e}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {e}")
        ttl = dt.timedelta(seconds=request.validity_duration) or WORKLOAD_CERT_TTL
        ca = ist.ca
        leaf = workload_certificate(ident, public_key, ca.key, ca.cert, ttl=min(ttl, MAX_TTL))  # type: ignore[arg-type]
        chain = [cert_pem(leaf)] + [cert_pem(c) for c in ca.chain]
        if ca.cert not in ca.roots:
            chain.insert(1, cert_pem(ca.cert))
        roots = b"".join(cert_pem(r) for r in (*ca.roots, *ist.extra_roots))
        return ca_pb2.IstioCertificateResponse(
            cert_chain=[c.decode() for c in chain] + [roots.decode()]
        )


class TestIstiod:
    """An in-process istiod stand-in on one TLS port (xDS and CA together, as istiod does)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        ca: CertificateAuthority,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Iterable[str] | None = None,
        serving_ca: CertificateAuthority | None = None,
        names: Iterable[str] = (ISTIOD_HOST,),
    ) -> None:
        self.ca = ca
        self.host = host
        self.port = port
        # None: any request passes; otherwise `authorization: Bearer <one of these>` is needed.
        self.tokens: set[str] | None = set(tokens) if tokens is not None else None
        self.serving_ca = serving_ca or ca
        self.names = (*names, host)
        self.resources: Resources = {t: {} for t in TYPES}
        self.bad: Resources = {t: {} for t in TYPES}
        self.ca_mode = "ok"  # ok | unavailable | garbage
        self.extra_roots: list[x509.Certificate] = []
        self.streams: list[Stream] = []
        self.ca_calls: list[CaCall] = []
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Event()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def root_pem(self) -> bytes:
        return b"".join(cert_pem(r) for r in self.ca.roots)

    def authorized(self, md: dict[str, str]) -> bool:
        if self.tokens is None:
            return True
        auth = md.get("authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.tokens

    # ---- lifecycle ----

    async def start(self) -> TestIstiod:
        key, chain = serving_certificate(self.serving_ca, self.names)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        dgrpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), server)
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(_Ca(self), server)
        creds = grpc.ssl_server_credentials([(key, chain)])
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.port = server.add_secure_port(target, creds)
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        """Stop at once: open streams end with an error, as when istiod's pod goes away."""
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        for s in self.streams:
            s.open = False
            s.wake.set()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    # ---- what is served ----

    def set_state(self, state: MeshState) -> None:
        self.set_resources(resources_of(state))

    def set_resources(self, resources: Resources) -> None:
        self.resources = {t: dict(resources.get(t, {})) for t in TYPES}
        self._push()

    def inject_bad(self, type_url: str, name: str, resource: any_pb2.Any) -> None:
        """Serve an extra resource (e.g. undecodable bytes) next to the good ones."""
        self.bad[type_url][name] = resource
        self._push()

    def clear_bad(self) -> None:
        self.bad = {t: {} for t in TYPES}
        self._push()

    def _push(self) -> None:
        for s in self.streams:
            s.wake.set()

    def _served(self, type_url: str) -> dict[str, any_pb2.Any]:
        return {**self.resources[type_url], **self.bad[type_url]}

    def _delta(self, stream: Stream, type_url: str) -> dpb.DeltaDiscoveryResponse | None:
        served = self._served(type_url)
        known = stream.known[type_url]
        resp = dpb.DeltaDiscoveryResponse(type_url=type_url)
        for name in sorted(served):
            version = version_of(served[name])
            if known.get(name) != version:
                resp.resources.add(name=name, version=version, resource=served[name])
                known[name] = version
        for name in sorted(set(known) - set(served)):
            resp.removed_resources.append(name)
            del known[name]
        # The first answer to a subscription goes out even when empty: it completes the sync.
        first = not any(r.type_url == type_url for r in stream.sent)
        if not resp.resources and not resp.removed_resources and not first:
            return None
        resp.nonce = str(next(self._nonces))
        stream.sent.append(resp)
        return resp

    # ---- waiting (tests) ----

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds, re-checking whenever a request arrives."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                try:
                    async with asyncio.timeout(0.05):
                        await self._changed.wait()
                except TimeoutError:
                    pass


# ---- python -m ztunnel.lab.istiod ---------------------------------------------------------------


async def serve_file(
    listen: str, ca_dir: str, mesh: str, tokens: list[str], interval: float = 0.2
) -> None:
    from ztunnel.localconfig import fingerprint, load_mesh_state

    host, _, port = listen.rpartition(":")
    istiod = TestIstiod(
        CertificateAuthority.load(ca_dir),
        host.strip("[]"),
        int(port),
        tokens=tokens or None,
    )
    istiod.set_state(load_mesh_state(mesh))
    await istiod.start()
    print(f"test istiod serving {mesh} on {istiod.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last = fingerprint(mesh)
    while not stop.is_set():
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            pass
        now = fingerprint(mesh)
        if now != last:
            last = now
            try:
                istiod.set_state(load_mesh_state(mesh))
                log.info("mesh file changed: pushed to %d streams", len(istiod.streams))
            except ZtunnelError as e:
                log.error("mesh file reload failed, still serving the previous state: %s", e)
    await istiod.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ztunnel.lab.istiod", description="A test istiod (stand-in) for the lab."
    )
    parser.add_argument("--listen", required=True, help="IP:PORT of the xDS + CA port")
    parser.add_argument("--ca-dir", required=True, help="mesh CA in cacerts layout")
    parser.add_argument("--mesh", required=True, help="mesh state file to serve")
    parser.add_argument("--token", action="append", default=[], help="accepted bearer token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve_file(args.listen, args.ca_dir, args.mesh, args.token))
    except ZtunnelError as e:
        print(f"test istiod: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
