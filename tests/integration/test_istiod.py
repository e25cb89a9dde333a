"""The agent against a test istiod on loopback (`ztunnel.lab.istiod`, built on grpcio from the
same protos): delta xDS sync, updates, NACKs, restarts, tokens, TLS trust, and the Istio CA
(outage, garbage answers, root rotation). Assertions are what the agent exposes: its store,
readiness, `/config_dump` status, metrics, certificates, and what istiod received."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from prometheus_client.registry import CollectorRegistry

from tests.integration.conftest import mesh_config, tls_context
from ztunnel.authz import Action, AuthorizationPolicy, Match, Scope
from ztunnel.ca import CertificateAuthority, cert_pem
from ztunnel.certs import CertificateManager
from ztunnel.config import Settings
from ztunnel.errors import CertificateError
from ztunnel.identity import SpiffeId
from ztunnel.istioca import IstioCaSource
from ztunnel.lab.istiod import TestIstiod
from ztunnel.localconfig import parse_documents
from ztunnel.state import MeshState, WorkloadStore
from ztunnel.testing import async_wait_for
from ztunnel.xds import convert
from ztunnel.xds.client import XdsClient
from ztunnel.xds.config import istiod_config

pytestmark = pytest.mark.integration

NET = "127.77.1"
ECHO = SpiffeId("cluster.local", "shop", "echo")
WEB = SpiffeId("cluster.local", "frontend", "web")


def demo_state() -> MeshState:
    return parse_documents([mesh_config(NET)], "test")


def deny_policy(name: str = "deny-9090", port: int = 9090) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        name, "shop", Scope.NAMESPACE, Action.DENY, rules=(((Match(destination_ports=(port,)),),),)
    )


class Env:
    def __init__(self, tmp: Path, istiod: TestIstiod) -> None:
        self.tmp = tmp
        self.istiod = istiod
        self.root = tmp / "root-cert.pem"
        self.root.write_bytes(istiod.root_pem)
        self.token = tmp / "istio-token"
        self.token.write_text("token-1\n")
        self.clients: list[XdsClient] = []
        self.tasks: list[asyncio.Task[None]] = []

    def settings(self, **kw: Any) -> Settings:
        base = Settings(
            node_name="node-a",
            xds_address=self.istiod.address,
            ca_address=self.istiod.address,
            xds_root_ca=str(self.root),
            ca_root_ca=str(self.root),
            auth_token=str(self.token),
            alt_xds_hostname="istiod.istio-system.svc",
            alt_ca_hostname="istiod.istio-system.svc",
            pod_name="ztunnel-abc",
            pod_namespace="istio-system",
            instance_ip="10.0.0.5",
            cluster_id="cluster-1",
        )
        return replace(base, **kw)

    def client(self, store: WorkloadStore | None = None, **kw: Any) -> XdsClient:
        cfg = istiod_config(self.settings(**kw), environ={"ISTIO_META_FOO": "bar"})
        c = XdsClient(cfg, store or WorkloadStore(), CollectorRegistry())
        self.clients.append(c)
        task = asyncio.ensure_future(c.run())
        task.set_name("xds-under-test")
        self.tasks.append(task)
        return c

    def ca_source(self, **kw: Any) -> IstioCaSource:
        return IstioCaSource(istiod_config(self.settings(**kw), environ={}), timeout=3.0)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.istiod.stop()


async def _env(tmp_path: Path, **kw: Any) -> Env:
    istiod = TestIstiod(
        CertificateAuthority.create("cluster.local"), tokens={"token-1", "token-2"}, **kw
    )
    istiod.set_state(demo_state())
    await istiod.start()
    return Env(tmp_path, istiod)


async def test_initial_sync_builds_the_mesh_state_and_identifies_the_node(tmp_path: Path) -> None:
    e = await _env(tmp_path)
    try:
        store = WorkloadStore()
        c = e.client(store)
        assert c.pending()  # readiness: waiting for the first sync
        await asyncio.wait_for(c.synced.wait(), 10)
        want = demo_state()
        got = store.current
        assert {w.uid for w in got.workloads} == {w.uid for w in want.workloads}
        assert {s.key for s in got.services} == {s.key for s in want.services}
        assert c.pending() == []
        s = e.istiod.streams[0]
        assert s.metadata["authorization"] == "Bearer token-1"
        assert s.metadata["clusterid"] == "cluster-1"
        first = s.initial(convert.ADDRESS_TYPE)
        assert first is not None
        assert (
            first.node.id
            == "ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        )
        meta = dict(first.node.metadata.fields)
        assert meta["NAME"].string_value == "ztunnel-abc"
        assert meta["NODE_NAME"].string_value == "node-a"
        assert meta["FOO"].string_value == "bar"
        assert not first.resource_names_subscribe  # wildcard
        await e.istiod.wait_for(lambda: len(s.acks) >= 2)
        status = c.status()
        assert status["connected"] and status["synced"]
        assert {t["type_url"]: t["resources"] for t in status["types"]}[convert.ADDRESS_TYPE] == 5
    finally:
        await e.close()


def terminations(c: XdsClient, reason: str | None = None) -> float:
    """istio_xds_connection_terminations_total, for one reason or all, as scraped."""
    total = 0.0
    for metric in c.metrics.terminations.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and reason in (None, sample.labels["reason"]):
                total += sample.value
    return total


def _held(store: WorkloadStore) -> tuple[set[str], set[str], set[str]]:
    st = store.current
    return (
        {w.uid for w in st.workloads},
        {s.key for s in st.services},
        {p.key for p in st.policies},
    )


async def test_incremental_add_update_remove(tmp_path: Path) -> None:
    e = await _env(tmp_path)
    try:
        store = WorkloadStore()
        c = e.client(store)
        await asyncio.wait_for(c.synced.wait(), 10)
        base = demo_state()
        # Add a policy and change a workload.
        echo_b = next(w for w in base.workloads if w.name == "echo-b")
        changed = replace(echo_b, canonical_revision="v2")
        e.istiod.set_state(
            MeshState.build(
                [changed if w is echo_b else w for w in base.workloads],
                base.services,
                [deny_policy()],
            )
        )
        await async_wait_for(lambda: len(store.current.policies) == 1, 10)
        await async_wait_for(
            lambda: store.current.by_uid[echo_b.uid].canonical_revision == "v2", 10
        )
        s = e.istiod.streams[0]
        # Only what changed was sent: one workload and one policy.
        pushed = [r for r in s.sent if r.resources]
        assert [len(r.resources) for r in pushed[-2:]] in ([1, 1],)
        # Remove a workload and the policy.
        e.istiod.set_state(
            MeshState.build([w for w in base.workloads if w is not echo_b], base.services, [])
        )
        await async_wait_for(lambda: echo_b.uid not in store.current.by_uid, 10)
        await async_wait_for(lambda: not store.current.policies, 10)
        assert any(echo_b.uid in r.removed_resources for r in s.sent)
        assert not s.nacks
    finally:
        await e.close()


async def test_bad_resource_is_nacked_by_name_and_the_rest_applied(tmp_path: Path) -> None:
    e = await _env(tmp_path)
    try:
        store = WorkloadStore()
        c = e.client(store)
        await asyncio.wait_for(c.synced.wait(), 10)
        e.istiod.inject_bad(
            convert.ADDRESS_TYPE,
            "Kubernetes//Pod/shop/broken",
            any_pb2.Any(type_url=convert.ADDRESS_TYPE, value=b"\xff\xff\xff garbage"),
        )
        base = demo_state()
        e.istiod.set_state(MeshState.build(base.workloads, base.services, [deny_policy()]))
        s = e.istiod.streams[0]
        await e.istiod.wait_for(lambda: any(t == convert.ADDRESS_TYPE for t, _, _ in s.nacks))
        nack = next(m for t, _, m in s.nacks if t == convert.ADDRESS_TYPE)
        assert "Kubernetes//Pod/shop/broken" in nack and "decode" in nack
        await async_wait_for(lambda: len(store.current.policies) == 1, 10)
        assert len(store.current.workloads) == len(base.workloads)  # good ones kept
        st = {t["type_url"]: t for t in c.status()["types"]}[convert.ADDRESS_TYPE]
        assert st["last_nack"]["error"].startswith("Kubernetes//Pod/shop/broken")
        assert "Kubernetes//Pod/shop/broken" in st["rejected"]
        # Fixed by istiod: the next push replaces it and is ACKed.
        e.istiod.clear_bad()
        await e.istiod.wait_for(lambda: s.acks[-1][0] == convert.ADDRESS_TYPE)
    finally:
        await e.close()


async def test_restart_keeps_state_and_resumes_with_initial_resource_versions(
    tmp_path: Path,
) -> None:
    e = await _env(tmp_path)
    try:
        store = WorkloadStore()
        c = e.client(store)
        await asyncio.wait_for(c.synced.wait(), 10)
        held = _held(store)
        await e.istiod.stop()
        await async_wait_for(lambda: not c.status()["connected"], 10)
        assert _held(store) == held  # still serving the last good state
        base = demo_state()
        e.istiod.set_state(MeshState.build(base.workloads, base.services, [deny_policy()]))
        await e.istiod.start()
        await e.istiod.wait_for(lambda: len(e.istiod.streams) == 2 and e.istiod.streams[1].acks)
        second = e.istiod.streams[1]
        init = second.initial(convert.ADDRESS_TYPE)
        assert init is not None
        assert set(init.initial_resource_versions) == held[0] | held[1]
        await async_wait_for(lambda: len(store.current.policies) == 1, 10)
        # Unchanged addresses were not sent again.
        await e.istiod.wait_for(lambda: len(second.acks) >= 2)
        addr = [r for r in second.sent if r.type_url == convert.ADDRESS_TYPE]
        assert all(not r.resources for r in addr)
        assert terminations(c) >= 1
    finally:
        await e.close()


async def test_token_rotation_is_picked_up_by_xds_and_ca(tmp_path: Path) -> None:
    e = await _env(tmp_path)
    try:
        c = e.client()
        await asyncio.wait_for(c.synced.wait(), 10)
        e.token.write_text("token-2")
        e.istiod.tokens = {"token-2"}
        await e.istiod.restart()
        await e.istiod.wait_for(lambda: len(e.istiod.streams) >= 2 and e.istiod.streams[-1].acks)
        assert e.istiod.streams[-1].metadata["authorization"] == "Bearer token-2"
        ca = e.ca_source()
        cert = await ca.fetch(ECHO)
        assert cert.identity == ECHO
        assert e.istiod.ca_calls[-1].metadata["authorization"] == "Bearer token-2"
        await ca.close()
    finally:
        await e.close()


async def test_untrusted_istiod_is_refused(tmp_path: Path) -> None:
    other = CertificateAuthority.create("cluster.local")
    e = await _env(tmp_path, serving_ca=other)
    try:
        c = e.client()
        await async_wait_for(lambda: terminations(c, "ConnectionError") >= 2, 10)
        assert not c.synced.is_set()
        assert not e.istiod.streams  # no stream ever reached the handler
        assert "UNAVAILABLE" in (c.last_error or "")
        assert c.pending() and "istiod" in c.pending()[0]
        with pytest.raises(CertificateError):
            await e.ca_source().fetch(ECHO)
    finally:
        await e.close()


async def test_ca_issues_checks_and_survives_outage_and_garbage(tmp_path: Path) -> None:
    e = await _env(tmp_path)
    try:
        ca = e.ca_source(secret_ttl="2s")
        certs = CertificateManager(ca)
        first = await certs.get(ECHO)
        call = e.istiod.ca_calls[-1]
        assert call.identity == ECHO.uri
        assert call.metadata["clusterid"] == "cluster-1"
        assert (first.not_after - first.not_before) <= dt.timedelta(minutes=5, seconds=3)
        e.istiod.ca_mode = "garbage"
        with pytest.raises(CertificateError) as bad:
            await ca.fetch(ECHO)
        assert "answered badly" in str(bad.value) and "PEM" in str(bad.value)
        e.istiod.ca_mode = "unavailable"
        with pytest.raises(CertificateError) as down:
            await ca.fetch(WEB)
        assert "UNAVAILABLE" in str(down.value)

        # The renewal (half-life of 2 s) fails meanwhile; the still-valid cert stays in use.
        def renewal_error() -> str:
            return str({s["identity"]: s for s in certs.snapshot()}[ECHO.uri]["last_error"])

        await async_wait_for(lambda: "UNAVAILABLE" in renewal_error(), 10)
        assert certs.cached(ECHO) is first
        # Recovery: renewed on the next try.
        e.istiod.ca_mode = "ok"
        await async_wait_for(lambda: certs.cached(ECHO) not in (None, first), 10)
        await certs.close()
        await ca.close()
    finally:
        await e.close()


async def test_root_rotation_trusts_old_and_new_roots(tmp_path: Path) -> None:
    e = await _env(tmp_path)
    try:
        ca = e.ca_source()
        certs = CertificateManager(ca)
        web = await certs.get(WEB)
        old_root = e.istiod.ca.roots[0]
        new_ca = CertificateAuthority.create("cluster.local")
        e.istiod.ca = new_ca
        e.istiod.extra_roots = [old_root]
        echo = await certs.get(ECHO)  # signed by the new root, bundle holds both
        assert len(echo.roots_pem) == 2
        # The certificate issued before the rotation now trusts the new root too.
        assert set(certs.cached(WEB).roots_pem) == set(echo.roots_pem)  # type: ignore[union-attr]
        assert certs.cached(WEB).chain_pem == web.chain_pem  # type: ignore[union-attr]
        # Peers signed by either root verify with either certificate's trust store.
        web_now = certs.cached(WEB)
        assert web_now is not None
        for client, server in ((web_now, echo), (echo, web_now)):
            assert await _handshake(tls_context(client), tls_context(server, server=True))
        # Without the update, the old certificate's store would refuse the new root's peer.
        assert not await _handshake(tls_context(echo), tls_context(web, server=True))
        await certs.close()
        await ca.close()
    finally:
        await e.close()


async def _handshake(client: Any, server: Any) -> bool:
    """A TLS handshake over loopback between two contexts; True when both sides verified."""

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"x")
        await w.drain()
        w.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="")
        ok = await r.read(1) == b"x"
        w.close()
        return ok
    finally:
        srv.close()


async def test_rotated_serving_root_is_trusted_once_the_mounted_file_changes(
    tmp_path: Path,
) -> None:
    e = await _env(tmp_path)
    try:
        store = WorkloadStore()
        c = e.client(store)
        ca = e.ca_source()
        await asyncio.wait_for(c.synced.wait(), 10)
        await ca.fetch(ECHO)
        # istiod comes back with a serving certificate under a new root ...
        new_root = CertificateAuthority.create("cluster.local")
        e.istiod.serving_ca = new_root
        await e.istiod.restart()
        with pytest.raises(CertificateError):
            await ca.fetch(ECHO)  # ... that the old mounted root does not trust
        # ... until the mounted root file is updated (as the ConfigMap would be).
        e.root.write_bytes(e.istiod.root_pem + b"".join(cert_pem(r) for r in new_root.roots))
        await ca.fetch(ECHO)
        await e.istiod.wait_for(
            lambda: len(e.istiod.streams) >= 2 and bool(e.istiod.streams[-1].acks), 20
        )
        await ca.close()
    finally:
        await e.close()


async def test_cancelling_the_clients_ends_them_at_any_moment(tmp_path: Path) -> None:
    """Agent shutdown cancels the xDS task and renewals: whatever grpc is doing then (a TLS
    handshake that fails, a stream, a CA call), the cancellation must not become a retry."""
    import random

    other = CertificateAuthority.create("cluster.local")
    e = await _env(tmp_path, serving_ca=other)
    (tmp_path / "good").mkdir()
    good = await _env(tmp_path / "good")
    try:
        rng = random.Random(7)
        for env in (e, good):
            for _ in range(15):
                c = env.client()
                task = env.tasks.pop()
                await asyncio.sleep(rng.uniform(0, 0.08))
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=5)
                assert done and task.cancelled(), c.status()
                ca = env.ca_source()
                fetch = asyncio.ensure_future(ca.fetch(ECHO))
                await asyncio.sleep(rng.uniform(0, 0.03))
                fetch.cancel()
                done, _ = await asyncio.wait({fetch}, timeout=5)
                # Ended: cancelled, or finished just before (a certificate or a clear error).
                assert done
                if not fetch.cancelled() and fetch.exception() is not None:
                    assert isinstance(fetch.exception(), CertificateError)
                await ca.close()
    finally:
        await e.close()
        await good.close()
