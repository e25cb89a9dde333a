"""HBONE against independent HTTP/2 implementations: Node.js `http2` (nghttp2) as a client of
our agent and as a server for our client, with certificates from `ztunnel ca issue`; and, when
installed, the `nghttp` and `curl` command-line clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ztunnel.errors import HboneError
from ztunnel.hbone.headers import ConnectRequest
from ztunnel.hbone.pool import HbonePool, PoolKey, TlsFailure
from ztunnel.hbone.tls import ContextCache
from ztunnel.identity import SpiffeId

pytestmark = pytest.mark.integration

INTEROP = Path(__file__).resolve().parent.parent / "interop"
MiB = 1024 * 1024
NODE_CLIENT = SpiffeId("cluster.local", "interop", "node-client")
NODE_SERVER = SpiffeId("cluster.local", "interop", "node-server")
WEB = SpiffeId("cluster.local", "frontend", "web")


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail(
            "node (Node.js) is required for the interoperability tests; "
            "scripts/setup.sh installs Debian's nodejs package"
        )
    return path


def issue_files(mesh: Any, identity: SpiffeId) -> Path:
    """Certificate files for `identity` written by the `ztunnel ca issue` command."""
    out = mesh.tmp / f"certs-{identity.namespace}-{identity.service_account}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZTUNNEL_")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ztunnel",
            "ca",
            "issue",
            "--dir",
            str(mesh.tmp / "ca"),
            "--identity",
            identity.uri,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    return out


async def node_client(
    mesh: Any,
    *,
    method: str = "CONNECT",
    authority: str = "",
    size: int = 0,
    cert: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    files = issue_files(mesh, NODE_CLIENT)
    cfg: dict[str, Any] = {
        "host": mesh.echo_b,
        "port": mesh.hbone_port,
        "ca": str(files / "root-cert.pem"),
        "method": method,
        "authority": authority or f"{mesh.echo_b}:8080",
        "size": size,
        **extra,
    }
    if cert:
        cfg["cert"] = str(files / "cert-chain.pem")
        cfg["key"] = str(files / "key.pem")
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(INTEROP / "hbone_client.mjs"),
        json.dumps(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 40)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = stdout.decode().strip().splitlines()
    assert lines, f"node client printed nothing; stderr: {stderr.decode()}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---- Node.js as the HBONE client, our agent as the server ------------------------------------


async def test_node_client_tunnels_through_our_server(mesh: Any) -> None:
    out = await node_client(mesh, size=4 * MiB + 123)
    assert out.get("error") is None, out
    assert out["status"] == 200
    assert out["protocol"] == "TLSv1.3"
    assert out["alpn"] == "h2"
    assert out["peerSan"] == f"URI:{'spiffe://cluster.local/ns/shop/sa/echo'}"
    assert out["sent"] == out["received"] == 4 * MiB + 123
    assert out["receivedSha256"] == out["sentSha256"]
    assert mesh.echo["echo-b"].accepted == 1


@pytest.mark.parametrize(
    ("method", "authority", "status"),
    [("GET", "", 400), ("CONNECT", "not-an-ip:8080", 400), ("CONNECT", "UNKNOWN", 503)],
    ids=["GET", "bad-authority", "unknown-workload"],
)
async def test_node_client_gets_the_refusal_status(
    mesh: Any, method: str, authority: str, status: int
) -> None:
    if authority == "UNKNOWN":
        authority = f"{mesh.ip(250)}:8080"
    out = await node_client(mesh, method=method, authority=authority)
    assert out.get("status") == status, out
    assert mesh.echo["echo-b"].accepted == 0


async def test_our_server_refuses_tls_1_2(mesh: Any) -> None:
    out = await node_client(mesh, maxVersion="TLSv1.2")
    assert out.get("status") is None, out
    assert "protocol" not in out, out  # the handshake never completed
    assert out.get("error"), out
    assert mesh.echo["echo-b"].accepted == 0


async def test_our_server_requires_a_client_certificate(mesh: Any) -> None:
    out = await node_client(mesh, cert=False, timeoutMs=8000)
    assert out.get("status") != 200, out
    assert mesh.echo["echo-b"].accepted == 0


# ---- Node.js as the HBONE server, our client -------------------------------------------------


@contextlib.asynccontextmanager
async def node_server(mesh: Any) -> Any:
    files = issue_files(mesh, NODE_SERVER)
    cfg = {
        "host": mesh.ip(30),
        "ca": str(files / "root-cert.pem"),
        "cert": str(files / "cert-chain.pem"),
        "key": str(files / "key.pem"),
    }
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(INTEROP / "hbone_server.mjs"),
        json.dumps(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    events: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line, (await proc.stderr.read()).decode() if proc.stderr else "no output"
        port = int(json.loads(line)["listening"])

        async def collect() -> None:
            assert proc.stdout is not None
            while raw := await proc.stdout.readline():
                events.append(json.loads(raw))

        reader = asyncio.create_task(collect())
        yield (mesh.ip(30), port), events
        reader.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def our_client(mesh: Any) -> HbonePool:
    from ztunnel.certs import CertificateManager, LocalCaSource

    pool = HbonePool(
        CertificateManager(LocalCaSource(mesh.ca)), ContextCache(), connect_timeout=5.0
    )
    mesh.pools.append(pool)
    return pool


async def test_our_client_tunnels_through_a_node_server(mesh: Any) -> None:
    import ipaddress

    async with node_server(mesh) as (addr, events):
        pool = our_client(mesh)
        key = PoolKey(WEB, frozenset({NODE_SERVER}), (ipaddress.ip_address(addr[0]), addr[1]), None)
        stream = await pool.open_stream(key, ConnectRequest(f"{mesh.echo_b}:8080"))
        assert stream.peer_identity == NODE_SERVER
        payload = os.urandom(3 * MiB + 5)

        async def send() -> None:
            await stream.write(payload)
            stream.end()

        async def receive() -> bytes:
            got = bytearray()
            while chunk := await stream.read():
                stream.ack(len(chunk))
                got += chunk
            return bytes(got)

        _, got = await asyncio.wait_for(asyncio.gather(send(), receive()), 30)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert mesh.echo["echo-b"].accepted == 1
        sessions = [e for e in events if e.get("event") == "session"]
        assert sessions, events
        assert sessions[0]["protocol"] == "TLSv1.3"
        assert sessions[0]["alpn"] == "h2"
        assert sessions[0]["peerSan"] == f"URI:{WEB.uri}"
        assert {"event": "connect", "authority": f"{mesh.echo_b}:8080"} in events


async def test_our_client_rejects_a_node_server_with_another_identity(mesh: Any) -> None:
    import ipaddress

    async with node_server(mesh) as (addr, events):
        pool = our_client(mesh)
        key = PoolKey(
            WEB,
            frozenset({SpiffeId("cluster.local", "interop", "someone-else")}),
            (ipaddress.ip_address(addr[0]), addr[1]),
            None,
        )
        with pytest.raises(TlsFailure):
            await pool.open_stream(key, ConnectRequest(f"{mesh.echo_b}:8080"))
        assert not [e for e in events if e.get("event") == "connect"]
        assert mesh.echo["echo-b"].accepted == 0


async def test_node_server_refusal_reaches_our_client(mesh: Any) -> None:
    import ipaddress

    async with node_server(mesh) as (addr, _events):
        pool = our_client(mesh)
        key = PoolKey(WEB, frozenset({NODE_SERVER}), (ipaddress.ip_address(addr[0]), addr[1]), None)
        with pytest.raises(HboneError) as exc:
            await pool.open_stream(key, ConnectRequest(f"{mesh.ip(31)}:9"))
        assert exc.value.status == 503


# ---- command-line HTTP/2 clients, if installed -------------------------------------------------


async def test_nghttp_get_gets_400(mesh: Any) -> None:
    nghttp = shutil.which("nghttp")
    if nghttp is None:
        pytest.skip("nghttp (Debian nghttp2-client) is not installed")
    files = issue_files(mesh, NODE_CLIENT)
    proc = await asyncio.create_subprocess_exec(
        nghttp,
        "-v",
        "-n",
        f"--cert={files / 'cert-chain.pem'}",
        f"--key={files / 'key.pem'}",
        f"https://{mesh.echo_b}:{mesh.hbone_port}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode(errors="replace")
    assert ":status: 400" in text, text
    assert "h2" in text


async def test_curl_get_gets_400_over_http2(mesh: Any) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    files = issue_files(mesh, NODE_CLIENT)
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "--http2",
        "--tlsv1.3",
        "-k",
        "--cert",
        str(files / "cert-chain.pem"),
        "--key",
        str(files / "key.pem"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        f"https://{mesh.echo_b}:{mesh.hbone_port}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert out.decode().strip() == "400 2", (out, err)
