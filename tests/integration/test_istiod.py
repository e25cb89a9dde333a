"""The agent against a test istiod on loopback (`ztunnel.lab.istiod`, built on grpcio from the
same protos): delta xDS sync, updates, NACKs, restarts, tokens, TLS trust, and the Istio CA
(outage, garbage answers, root rotation). Assertions are what the agent exposes: its store,
readiness, `/config_dump` status, metrics, certificates, and what istiod received."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from prometheus_client.registry import CollectorRegistry

from ztunnel.authz import Action, AuthorizationPolicy, Match, Scope
from ztunnel.ca import CertificateAuthority
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
from tests.integration.conftest import mesh_config

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
    istiod = TestIstiod(CertificateAuthority.create("cluster.local"), tokens={"token-1", "token-2"}, **kw)
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
        assert first.node.id == "ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
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
