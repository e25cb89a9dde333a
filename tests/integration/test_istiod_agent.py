"""Two whole agents (`Agent`, as `ztunnel run --xds-address --ca-address` builds it) on
loopback, taking their mesh state and certificates from a test istiod: readiness waits for the
first sync, traffic flows over HBONE with CA-issued certificates, a policy pushed over xDS closes
a live connection it now denies, `/config_dump` shows the xDS state, metrics count messages."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.integration.conftest import Mesh, mesh_config
from tests.integration.test_istiod import deny_policy
from ztunnel.admin import config_dump, readiness_pending
from ztunnel.authz import Action, AuthorizationPolicy, Match, Scope, StringMatch
from ztunnel.ca import CertificateAuthority
from ztunnel.config import Settings
from ztunnel.lab.istiod import TestIstiod
from ztunnel.localconfig import parse_documents
from ztunnel.state import MeshState
from ztunnel.testing import async_wait_for

pytestmark = pytest.mark.integration


@dataclass
class IstiodMesh(Mesh):
    istiod: TestIstiod | None = None

    def settings(self, node: str) -> Settings:
        assert self.istiod is not None
        root = self.tmp / "root-cert.pem"
        root.write_bytes(self.istiod.root_pem)
        token = self.tmp / "token"
        token.write_text("t")
        return replace(
            super().settings(node),
            local_xds_path="",
            ca_dir="",
            xds_address=self.istiod.address,
            ca_address=self.istiod.address,
            xds_root_ca=str(root),
            ca_root_ca=str(root),
            auth_token=str(token),
            alt_xds_hostname="istiod.istio-system.svc",
            alt_ca_hostname="istiod.istio-system.svc",
            readiness_port=0,
        )

    def state(self, policies: list[AuthorizationPolicy] | None = None) -> MeshState:
        base = parse_documents([mesh_config(self.net)], "test")
        return MeshState.build(base.workloads, base.services, policies or [])

    async def start(self) -> None:
        self.ca = CertificateAuthority.create("cluster.local")
        self.istiod = TestIstiod(self.ca, tokens={"t"})
        self.istiod.set_state(self.state())
        await self.istiod.start()
        await super_start_without_files(self)

    async def close(self) -> None:
        await super().close()
        if self.istiod is not None:
            await self.istiod.stop()


async def super_start_without_files(m: IstiodMesh) -> None:
    """Mesh.start minus the CA directory and mesh file: agents wait for istiod instead."""
    from ztunnel.app import Agent
    from ztunnel.testing import EchoServer

    for name, host in (("echo-a", 2), ("echo-b", 11), ("legacy-b", 12)):
        m.echo[name] = await EchoServer(m.ip(host), 8080).start()
    m.a = Agent(m.settings("node-a"))
    m.b = Agent(m.settings("node-b"))
    for agent in (m.a, m.b):
        assert "mesh state: not loaded yet" in readiness_pending(agent)
        await agent.start()
    for agent in (m.a, m.b):
        await async_wait_for(lambda ag=agent: not readiness_pending(ag), 20)  # type: ignore[misc]


@pytest.fixture
def imesh(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Iterator[IstiodMesh]:
    m = IstiodMesh(tmp_path)
    try:
        loop.run_until_complete(asyncio.wait_for(m.start(), 30))
        yield m
    finally:
        loop.run_until_complete(asyncio.wait_for(m.close(), 30))


async def test_agents_run_from_istiod_and_a_pushed_policy_closes_a_live_connection(
    imesh: IstiodMesh,
) -> None:
    m = imesh
    assert m.istiod is not None
    # Traffic flows with certificates from the Istio CA.
    r, w = await m.socks(m.echo_b, 8080)
    w.write(b"first")
    assert await asyncio.wait_for(r.readexactly(5), 5) == b"first"
    issued = {c.identity for c in m.istiod.ca_calls if c.answered == "ok"}
    assert "spiffe://cluster.local/ns/frontend/sa/web" in issued
    assert "spiffe://cluster.local/ns/shop/sa/echo" in issued
    # A policy pushed over xDS that denies the live connection closes it.
    allow_other = AuthorizationPolicy(
        "allow-only-admin",
        "shop",
        Scope.NAMESPACE,
        Action.ALLOW,
        rules=(((Match(principals=(StringMatch.exact("cluster.local/ns/admin/sa/ops"),)),),),),
    )
    m.istiod.set_state(m.state([allow_other]))
    try:
        data = await asyncio.wait_for(r.read(), 10)
    except ConnectionResetError:
        data = b""
    assert data == b""
    w.close()
    await async_wait_for(
        lambda: not [rec for rec in m.b.tracker.live.values() if rec.direction == "inbound"], 5
    )
    dump = config_dump(m.b)
    xds = dump["istiod"]["xds"]
    assert xds["connected"] and xds["synced"]
    assert dump["mesh_state"]["source"].startswith("istiod https://127.0.0.1:")
    assert {t["type_url"].rsplit(".", 1)[-1]: t["resources"] for t in xds["types"]} == {
        "Address": 5,
        "Authorization": 1,
    }
    assert dump["istiod"]["ca"]["trust_roots"]
    assert [p["name"] for p in dump["policies"]] == ["allow-only-admin"]
    # Metrics as Istio's ztunnel names them.
    from prometheus_client import generate_latest

    text = generate_latest(m.b.registry).decode()
    assert 'istio_xds_message_total{url="type.googleapis.com/istio.security.Authorization"}' in text
    assert "istio_xds_message_bytes_total" in text


async def test_agent_keeps_serving_while_istiod_is_down(imesh: IstiodMesh) -> None:
    m = imesh
    assert m.istiod is not None
    m.istiod.set_state(m.state([deny_policy("deny-9999", 9999)]))
    await async_wait_for(lambda: len(m.b.store.current.policies) == 1, 10)
    await m.istiod.stop()
    assert m.b.istiod is not None and m.b.istiod.xds is not None
    await async_wait_for(lambda: not m.b.istiod.xds.status()["connected"], 10)  # type: ignore[union-attr]
    # Still ready and still forwarding with the last good state and certificates.
    assert readiness_pending(m.b) == []
    r, w = await m.socks(m.echo_b, 8080)
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
    w.close()
    assert len(m.b.store.current.policies) == 1


async def test_ztunnel_run_with_istiod_env_becomes_ready_only_after_the_sync(
    tmp_path: Path,
) -> None:
    """`ztunnel run` as a DaemonSet would start it: only Istio's environment variables, the
    root certificate and token as mounted files; readiness 500 until istiod answers."""
    import sys
    import urllib.error
    import urllib.request
    from typing import Any

    from tests.integration.test_agent_cli import clean_env, port_args
    from ztunnel.testing import free_ports

    ca = CertificateAuthority.create("cluster.local")
    istiod = TestIstiod(ca, tokens={"projected-jwt"})
    net = "127.66.5"
    istiod.set_state(parse_documents([mesh_config(net)], "test"))
    istiod.ca_mode = "unavailable"
    await istiod.start()
    root = tmp_path / "var/run/secrets/istio/root-cert.pem"
    token = tmp_path / "var/run/secrets/tokens/istio-token"
    root.parent.mkdir(parents=True)
    token.parent.mkdir(parents=True)
    root.write_bytes(istiod.root_pem)
    token.write_text("projected-jwt")
    admin, ready = free_ports(2)
    env = clean_env() | {
        "XDS_ADDRESS": istiod.address,
        "CA_ADDRESS": istiod.address,
        "ALT_XDS_HOSTNAME": "istiod.istio-system.svc",
        "ALT_CA_HOSTNAME": "istiod.istio-system.svc",
        "ISTIO_META_CLUSTER_ID": "lab-cluster",
        "POD_NAME": "ztunnel-x1",
        "POD_NAMESPACE": "istio-system",
        "INSTANCE_IP": "127.0.0.1",
        "NODE_NAME": "node-b",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ztunnel",
        "run",
        *port_args(),
        "--admin-port",
        str(admin),
        "--readiness-port",
        str(ready),
        "--stats-port",
        "0",
        cwd=tmp_path,  # the default paths are relative: ./var/run/secrets/...
        env=env,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )

    def readiness() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ready}/healthz/ready", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    async def poll(pred: Any, timeout: float = 30) -> tuple[int, str]:
        """Readiness from a thread (the test istiod runs on this loop), until `pred`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            code, body = await asyncio.to_thread(readiness)
            if pred(code, body):
                return code, body
            assert asyncio.get_running_loop().time() < deadline, (code, body)
            await asyncio.sleep(0.05)

    try:
        # Synced, but the CA is down: not ready, and readiness says why.
        await istiod.wait_for(lambda: any(s.acks for s in istiod.streams), 20)
        code, body = await poll(lambda c, b: "UNAVAILABLE" in b)
        assert code == 500 and "certificate: spiffe://cluster.local/ns/shop/sa/echo" in body
        s = istiod.streams[0]
        assert s.metadata["clusterid"] == "lab-cluster"
        assert s.metadata["authorization"] == "Bearer projected-jwt"
        assert s.requests[0].node.id == (
            "ztunnel~127.0.0.1~ztunnel-x1.istio-system~istio-system.svc.cluster.local"
        )
        istiod.ca_mode = "ok"
        await poll(lambda c, b: c == 200)
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        await istiod.stop()
    assert proc.returncode == 0, err.decode()[-2000:]


async def test_certificates_follow_the_local_workloads_pushed_by_istiod(imesh: IstiodMesh) -> None:
    m = imesh
    assert m.istiod is not None
    echo_uri = "spiffe://cluster.local/ns/shop/sa/echo"
    assert echo_uri in {c["identity"] for c in m.b.certs.snapshot()}
    base = m.state()
    # echo-b leaves node-b: its identity is forgotten there (no renewals, no cached key).
    m.istiod.set_state(
        MeshState.build([w for w in base.workloads if w.name != "echo-b"], base.services, [])
    )
    await async_wait_for(lambda: echo_uri not in {c["identity"] for c in m.b.certs.snapshot()}, 10)
    assert echo_uri in {c["identity"] for c in m.a.certs.snapshot()}  # still local on node-a
    # It comes back: prefetched again before any connection needs it, and ready again.
    m.istiod.set_state(base)
    await async_wait_for(lambda: echo_uri in {c["identity"] for c in m.b.certs.snapshot()}, 10)
    try:
        await async_wait_for(lambda: not readiness_pending(m.b), 10)
    except TimeoutError:
        raise AssertionError(readiness_pending(m.b)) from None
