"""Faults on loopback: the destination application dying mid-stream (the client sees a reset,
not a clean end, and the pooled HBONE connection goes on serving), and the CA unavailable at
start and later (readiness says what is pending and why; the agent recovers by itself)."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from tests.integration.conftest import WEB, Mesh
from ztunnel.admin import readiness_pending
from ztunnel.app import Agent, AgentParts
from ztunnel.ca import IssuedCertificate
from ztunnel.certs import LocalCaSource
from ztunnel.errors import CertificateError
from ztunnel.hbone.pool import TlsFailure
from ztunnel.identity import SpiffeId
from ztunnel.testing import async_wait_for, free_port

pytestmark = pytest.mark.integration


async def echo_once(mesh: Mesh, port: int = 8080, budget: float = 5.0) -> bytes:
    r, w = await mesh.socks(mesh.echo_b, port)
    try:
        w.write(b"ping")
        w.write_eof()
        return await asyncio.wait_for(r.read(), budget)
    finally:
        w.close()


async def read_until_failure(r: asyncio.StreamReader, within: float) -> str:
    """'reset' if the connection was reset, 'eof' if it ended cleanly."""
    try:
        async with asyncio.timeout(within):
            while await r.read(65536):
                pass
    except ConnectionResetError:
        return "reset"
    return "eof"


# ---- the destination application dies ---------------------------------------------------------


async def test_app_reset_mid_stream_reaches_the_client_as_a_reset(mesh: Mesh) -> None:
    started = asyncio.Event()

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(5)
        w.write(b"partial answer")
        await w.drain()
        started.set()
        await asyncio.sleep(0.2)
        w.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        w.transport.abort()  # RST mid-stream

    port = await mesh.serve(mesh.echo_b, app)
    r, w = await mesh.socks(mesh.echo_b, port)
    w.write(b"hello")
    assert await asyncio.wait_for(r.readexactly(14), 5) == b"partial answer"
    assert await read_until_failure(r, 5) == "reset"
    w.close()
    await async_wait_for(lambda: not mesh.a.tracker.live and not mesh.b.tracker.live, 5)
    # The pooled HBONE connection carried the failed stream and serves the next one.
    assert await echo_once(mesh) == b"ping"
    assert mesh.a.pool.stats()["created"] == 1


APP = textwrap.dedent(
    """
    import socket, sys
    ls = socket.create_server((sys.argv[1], 0))
    print(ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    conn.recv(5)
    conn.sendall(b"ready")
    print("serving", flush=True)
    sys.stdin.read()  # until killed
    """
)


async def test_app_process_killed_mid_stream_resets_the_client(mesh: Mesh) -> None:
    """SIGKILL of the application with bytes it never read: the kernel resets the
    connection, and the reset travels through both agents to the client."""
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child we talk to over pipes
        [sys.executable, "-c", APP, mesh.echo_b],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.to_thread(proc.stdout.readline))
        r, w = await mesh.socks(mesh.echo_b, port)
        w.write(b"hello")
        assert await asyncio.wait_for(r.readexactly(5), 5) == b"ready"
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "serving"
        w.write(b"never read by the app")
        await w.drain()
        # Only kill once those bytes wait, unread, in the application's socket.
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        assert await read_until_failure(r, 5) == "reset"
        w.close()
    finally:
        proc.kill()
        proc.wait(5)
    await async_wait_for(lambda: not mesh.a.tracker.live and not mesh.b.tracker.live, 5)
    assert await echo_once(mesh) == b"ping"
    assert mesh.a.pool.stats()["created"] == 1


# ---- the CA goes away -------------------------------------------------------------------------


class FlakyCa:
    """A certificate source that can be switched off, as an unreachable Istio CA would be."""

    def __init__(self, inner: LocalCaSource) -> None:
        self.inner = inner
        self.up = True
        self.calls = 0

    async def fetch(self, identity: SpiffeId) -> IssuedCertificate:
        self.calls += 1
        if not self.up:
            raise CertificateError("CA at istiod:15012 unavailable: connection refused")
        return await self.inner.fetch(identity)


async def replace_b(mesh: Mesh, ca: FlakyCa) -> Agent:
    """node-b again, with the flaky CA and a readiness port."""
    await mesh.b.drain(1.0)
    from dataclasses import replace

    settings = replace(mesh.settings("node-b"), readiness_port=free_port())
    mesh.b = Agent(settings, AgentParts(certificate_source=ca))
    await mesh.b.start()
    return mesh.b


async def readiness(agent: Agent) -> tuple[int, str]:
    addr = agent.http.address("readiness")
    assert addr is not None
    r, w = await asyncio.open_connection(*addr)
    w.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def new_connection_fails_fast(mesh: Mesh) -> None:
    """A new HBONE connection to node-b (pooled ones outlive certificates, as TLS sessions
    do) is refused promptly."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TlsFailure):
        await mesh.hbone(mesh.issue(WEB), f"{mesh.echo_b}:8080")
    assert loop.time() - t0 < 3.0


async def test_ca_unavailable_at_start_then_recovery_without_restart(mesh: Mesh) -> None:
    ca = FlakyCa(LocalCaSource(mesh.ca))
    ca.up = False
    b = await replace_b(mesh, ca)
    status, body = await readiness(b)
    assert status == 500
    assert "certificate: spiffe://cluster.local/ns/shop/sa/echo not issued yet" in body
    await async_wait_for(lambda: "unavailable" in (b.certs.snapshot()[0]["last_error"] or ""), 5)
    status, body = await readiness(b)
    assert "last error: " in body and "unavailable: connection refused" in body
    # Traffic to the workload fails promptly and clearly meanwhile (no certificate to serve).
    await new_connection_fails_fast(mesh)
    ca.up = True
    await async_wait_for(lambda: not readiness_pending(b), 10)
    assert (await readiness(b))[0] == 200
    assert await echo_once(mesh) == b"ping"


@pytest.mark.timeout(90)
async def test_ca_unavailable_later_keeps_serving_until_expiry_then_recovers(
    mesh: Mesh,
) -> None:
    """Certificates of 4 s: while the CA is away, renewals fail and the valid certificate
    keeps serving (ready); once it expires readiness says so and new tunnels fail; when the
    CA is back, renewal recovers without a restart."""
    ca = FlakyCa(LocalCaSource(mesh.ca, ttl=dt.timedelta(seconds=4)))
    b = await replace_b(mesh, ca)
    echo = SpiffeId("cluster.local", "shop", "echo")
    await async_wait_for(lambda: not readiness_pending(b), 10)
    assert (await readiness(b))[0] == 200
    ca.up = False
    calls = ca.calls
    await async_wait_for(lambda: ca.calls > calls, 10)  # a renewal was attempted and failed
    cert = b.certs.cached(echo)
    if cert is not None:  # still valid: still serving, still ready
        assert (await readiness(b))[0] == 200
        assert await echo_once(mesh) == b"ping"
    await async_wait_for(lambda: b.certs.cached(echo) is None, 10)
    status, body = await readiness(b)
    assert status == 500 and "not issued yet (last error:" in body, body
    await new_connection_fails_fast(mesh)
    ca.up = True
    await async_wait_for(lambda: not readiness_pending(b), 20)
    assert (await readiness(b))[0] == 200
    assert await echo_once(mesh) == b"ping"


# ---- the mesh source goes away ----------------------------------------------------------------


async def test_mesh_file_unavailable_later_keeps_the_last_state_then_recovers(
    mesh: Mesh,
) -> None:
    """The mesh-state file disappears (a ConfigMap being replaced, a bad deploy): the agents
    keep serving the last state they loaded (as Istio's ztunnel does when istiod goes away),
    say why in the config dump, and pick the file up again when it is back."""
    good = mesh.mesh_file.read_text()
    mesh.mesh_file.unlink()
    await async_wait_for(
        lambda: all(
            ag.store.last_error and "no such file" in ag.store.last_error for ag in (mesh.a, mesh.b)
        ),
        10,
    )
    assert await echo_once(mesh) == b"ping"
    assert not readiness_pending(mesh.a) and not readiness_pending(mesh.b)
    mesh.mesh_file.write_text(good)
    await async_wait_for(lambda: mesh.a.store.last_error is None, 10)
    assert await echo_once(mesh) == b"ping"
