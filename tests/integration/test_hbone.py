"""HBONE between two in-process agents on loopback: exact bytes, pooling, half-close,
backpressure, identity checks with hand-made certificates, refusals, reload and drain."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import resource
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.ca import CertificateAuthority, IssuedCertificate, cert_pem, key_pem
from ztunnel.errors import ConnectRejected, HboneError
from ztunnel.hbone.pool import TlsFailure
from ztunnel.identity import SpiffeId
from ztunnel.testing import SocksRefused, async_wait_for, free_port

pytestmark = pytest.mark.integration

WEB = SpiffeId("cluster.local", "frontend", "web")
ECHO = SpiffeId("cluster.local", "shop", "echo")
MiB = 1024 * 1024


async def pump_and_hash(r: asyncio.StreamReader) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while data := await r.read(1 << 20):
        h.update(data)
        n += len(data)
    return h.hexdigest(), n


async def send_pattern(w: asyncio.StreamWriter, chunks: Any, eof: bool = True) -> None:
    for c in chunks:
        w.write(c)
        await w.drain()
    if eof:
        w.write_eof()


async def echo_through(mesh: Any, pattern: Any, size: int, dest: str, port: int) -> None:
    r, w = await mesh.socks(dest, port)
    p = pattern(size % 1000 + 1, size)
    try:
        _, (digest, n) = await asyncio.gather(send_pattern(w, p.chunks()), pump_and_hash(r))
    finally:
        w.close()
    assert n == size
    assert digest == p.digest()


# ---- bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"], indirect=True)
async def test_1mib_both_ways_byte_exact(mesh: Any, random_payload: Any) -> None:
    payload = random_payload(MiB)
    r, w = await mesh.socks(mesh.echo_b, 8080)
    w.write(payload)
    w.write_eof()
    got = await asyncio.wait_for(r.read(-1), 20)
    w.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert len(got) == MiB
    # The application saw the real client address (WIRE.md: connect from the original IP).
    assert mesh.echo["echo-b"].peers[-1][0] == mesh.client_ip
    rec_stats = mesh.a.pool.stats()
    assert rec_stats["created"] == 1


async def test_service_vip_and_hostname_reach_an_endpoint(mesh: Any) -> None:
    for dest in (mesh.ip(100), "echo.shop.svc.cluster.local"):
        before = mesh.echo["echo-a"].accepted + mesh.echo["echo-b"].accepted
        r, w = await mesh.socks(dest, 80)
        w.write(b"via the service")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b"via the service"
        w.close()
        assert mesh.echo["echo-a"].accepted + mesh.echo["echo-b"].accepted == before + 1


async def test_tcp_workload_is_passed_through(mesh: Any) -> None:
    r, w = await mesh.socks(mesh.ip(12), 8080)
    w.write(b"plain")
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 10) == b"plain"
    w.close()
    assert mesh.echo["legacy-b"].accepted == 1
    assert mesh.a.pool.stats()["created"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_1gib_both_ways_byte_exact(mesh: Any, pattern: Any) -> None:
    await echo_through(mesh, pattern, 1024 * MiB, mesh.echo_b, 8080)


# ---- many connections, one pool --------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_1000_concurrent_tunnels_share_about_10_connections(mesh: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    n = 1000
    connecting = asyncio.Semaphore(100)  # bounds simultaneous handshakes, not open tunnels
    all_open = asyncio.Event()
    opened = 0
    peak: dict[str, int] = {}

    async def one(i: int) -> None:
        nonlocal opened
        async with connecting:
            r, w = await mesh.socks(mesh.echo_b, 8080)
            msg = f"tunnel {i:04d};".encode() * 8
            w.write(msg)
            assert await asyncio.wait_for(r.readexactly(len(msg)), 30) == msg
        opened += 1
        if opened == n:
            peak.update(mesh.a.pool.stats())
            all_open.set()
        await all_open.wait()
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 30) == b""
        w.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    assert peak["streams"] == n, peak
    # At most 100 streams per connection: at least 10 connections; pooled: not many more.
    assert 10 <= peak["connections"] <= 15, peak
    assert mesh.a.pool.connections_created <= 15, mesh.a.pool.stats()


# ---- half-close ----------------------------------------------------------------------------


async def test_half_close_client_still_gets_the_whole_response(mesh: Any, pattern: Any) -> None:
    reply = pattern(2, 8 * MiB)
    seen: dict[str, Any] = {}

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen["request"] = await pump_and_hash(r)  # to EOF: the client's half-close
        await send_pattern(w, reply.chunks(), eof=False)
        w.close()

    port = await mesh.serve(mesh.echo_b, app)
    request = pattern(3, 3 * MiB + 17)
    r, w = await mesh.socks(mesh.echo_b, port)
    await send_pattern(w, request.chunks(), eof=True)
    digest, n = await asyncio.wait_for(pump_and_hash(r), 30)
    w.close()
    assert seen["request"] == (request.digest(), 3 * MiB + 17)
    assert (digest, n) == (reply.digest(), 8 * MiB)


async def test_server_half_close_lets_the_client_keep_sending(mesh: Any) -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"greeting")
        w.write_eof()  # the server is done talking, still listening
        got.set_result(await r.read(-1))
        w.close()

    port = await mesh.serve(mesh.echo_b, app)
    r, w = await mesh.socks(mesh.echo_b, port)
    assert await asyncio.wait_for(r.read(-1), 10) == b"greeting"
    w.write(b"the client goes on" * 1000)
    w.write_eof()
    assert await asyncio.wait_for(got, 10) == b"the client goes on" * 1000
    w.close()


# ---- aborts ----------------------------------------------------------------------------------


async def test_client_abort_reaches_the_server_application(mesh: Any) -> None:
    ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while chunk := await r.read(65536):
                data += chunk
        except ConnectionError:
            pass
        ended.set_result(data)
        w.close()

    port = await mesh.serve(mesh.echo_b, app)
    _r, w = await mesh.socks(mesh.echo_b, port)
    w.write(b"partial request")
    await w.drain()
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()  # RST from the client application
    assert await asyncio.wait_for(ended, 10) == b"partial request"
    await async_wait_for(lambda: not mesh.a.tracker.live and not mesh.b.tracker.live, 10)


async def test_server_abort_reaches_the_client_application(mesh: Any) -> None:
    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(5)
        w.write(b"bye")
        await w.drain()
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    port = await mesh.serve(mesh.echo_b, app)
    r, w = await mesh.socks(mesh.echo_b, port)
    w.write(b"hello")
    got = b""
    try:
        while chunk := await asyncio.wait_for(r.read(65536), 10):
            got += chunk
    except ConnectionError:
        pass
    assert got in (b"", b"bye")
    w.close()
    await async_wait_for(lambda: not mesh.a.tracker.live and not mesh.b.tracker.live, 10)


# ---- backpressure ----------------------------------------------------------------------------


async def wait_until_stalled(
    value: Callable[[], int], quiet: float = 1.0, within: float = 30.0
) -> int:
    """Poll `value` until it has not changed for `quiet` seconds (a deadline, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, since = value(), loop.time()
    while loop.time() - since < quiet:
        if loop.time() > deadline:
            raise AssertionError(f"never stalled: still moving at {value()} bytes")
        await asyncio.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, loop.time()
    return last


@pytest.mark.timeout(120)
async def test_slow_reader_stalls_the_writer_then_everything_arrives(
    mesh: Any, pattern: Any
) -> None:
    size = 64 * MiB
    data = pattern(4, size)
    release = asyncio.Event()
    result: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()  # does not read while the client writes
        result.set_result(await pump_and_hash(r))
        w.close()

    port = await mesh.serve(mesh.echo_b, app, rcvbuf=64 * 1024)
    _r, w = await mesh.socks(mesh.echo_b, port)
    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    accepted = 0

    async def writer() -> None:
        nonlocal accepted
        for c in data.chunks():
            w.write(c)
            await w.drain()
            accepted += len(c)
        w.write_eof()

    task = asyncio.create_task(writer())
    try:
        stalled_at = await wait_until_stalled(lambda: accepted)
        assert not task.done()
        # Bounded: windows (4 MiB stream) and socket buffers, nowhere near the 64 MiB.
        assert stalled_at < 40 * MiB, f"{stalled_at / MiB:.1f} MiB accepted before the stall"
        live = list(mesh.a.tracker.live.values())
        assert len(live) == 1
        # What agent A forwarded into the tunnel is bounded by the HTTP/2 windows too.
        assert live[0].bytes_sent <= 16 * MiB, live[0].bytes_sent
        release.set()
        await asyncio.wait_for(task, 60)
        assert await asyncio.wait_for(result, 60) == (data.digest(), size)
    finally:
        release.set()
        task.cancel()
        w.close()


# ---- identity ------------------------------------------------------------------------------


async def test_raw_hbone_client_reaches_the_echo(mesh: Any) -> None:
    stream = await mesh.hbone(mesh.issue(WEB), f"{mesh.echo_b}:8080")
    assert stream.peer_identity == ECHO
    await stream.write(b"raw hbone")
    stream.end()
    got = b""
    while chunk := await asyncio.wait_for(stream.read(), 10):
        stream.ack(len(chunk))
        got += chunk
    assert got == b"raw hbone"


async def test_client_rejects_a_server_with_the_wrong_identity(mesh: Any) -> None:
    before = mesh.echo["echo-b"].accepted
    with pytest.raises(TlsFailure):
        await mesh.hbone(
            mesh.issue(WEB),
            f"{mesh.echo_b}:8080",
            expect=frozenset({SpiffeId("cluster.local", "shop", "not-echo")}),
        )
    assert mesh.echo["echo-b"].accepted == before


def _leaf(ca: CertificateAuthority, san: list[x509.GeneralName]) -> IssuedCertificate:
    """A leaf signed by `ca` with exactly the SANs given (the CA code always adds a URI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCertificate(
        ECHO,
        key_pem(key),
        (cert_pem(cert),),
        (cert_pem(ca.cert),),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


SERVER_CERTS: dict[str, Callable[[Any], IssuedCertificate]] = {
    "another SPIFFE identity": lambda m: m.issue(SpiffeId("cluster.local", "shop", "impostor")),
    "only a DNS SAN": lambda m: _leaf(m.ca, [x509.DNSName("echo.shop.svc.cluster.local")]),
    "right identity, other CA": lambda m: _leaf(
        CertificateAuthority.create("cluster.local"), [x509.UniformResourceIdentifier(ECHO.uri)]
    ),
    "right identity (control)": lambda m: m.issue(ECHO),
}


@pytest.mark.parametrize("kind", list(SERVER_CERTS))
async def test_client_checks_a_hand_made_server_certificate(mesh: Any, kind: str) -> None:
    """Our HboneServer presenting a hand-made certificate; the client expects shop/echo."""
    from ztunnel.hbone.server import HboneServer
    from ztunnel.hbone.tls import ContextCache
    from ztunnel.proxy.sockets import listen

    cert = SERVER_CERTS[kind](mesh)

    async def handler(stream: Any, req: Any) -> None:
        stream.respond(200)
        while chunk := await stream.read():
            stream.ack(len(chunk))
            await stream.write(chunk)
        stream.end()

    server = HboneServer(
        _FixedCerts(cert),  # type: ignore[arg-type]
        ContextCache(),
        "cluster.local",
        lambda ip: ECHO,
        handler,
    )
    sock = listen(mesh.ip(40), 0)
    server.serve(sock)
    try:
        port = sock.getsockname()[1]
        if kind.endswith("(control)"):
            stream = await mesh.hbone(
                mesh.issue(WEB), "10.0.0.1:80", next_hop=mesh.ip(40), port=port
            )
            await stream.write(b"hi")
            assert await asyncio.wait_for(stream.read(), 5) == b"hi"
        else:
            with pytest.raises(TlsFailure):
                await mesh.hbone(mesh.issue(WEB), "10.0.0.1:80", next_hop=mesh.ip(40), port=port)
    finally:
        await server.drain(1.0)


class _FixedCerts:
    """Stands in for the server's CertificateManager: always this certificate."""

    def __init__(self, cert: IssuedCertificate) -> None:
        self.cert = cert

    async def get(self, identity: SpiffeId) -> IssuedCertificate:
        return self.cert


def _self_signed(identity: SpiffeId, roots: tuple[bytes, ...]) -> IssuedCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return IssuedCertificate(
        identity,
        key_pem(key),
        (cert_pem(cert),),
        roots,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def _foreign_ca_cert(mesh: Any) -> IssuedCertificate:
    """A client of another mesh (its own CA, trust domain other.local); it trusts our root so
    that only the server's decision is tested."""
    other = CertificateAuthority.create("other.local")
    c = other.issue(SpiffeId("other.local", "shop", "web"))
    return IssuedCertificate(
        c.identity, c.key_pem, c.chain_pem, (cert_pem(mesh.ca.cert),), c.not_before, c.not_after
    )


BAD_CLIENTS: dict[str, Callable[[Any], IssuedCertificate]] = {
    "foreign CA and trust domain": _foreign_ca_cert,
    "our CA, foreign trust-domain SAN": lambda m: m.issue(SpiffeId("other.local", "shop", "web")),
    "expired": lambda m: m.issue(
        WEB, ttl=dt.timedelta(hours=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    ),
    "self-signed": lambda m: _self_signed(WEB, (cert_pem(m.ca.cert),)),
}


@pytest.mark.parametrize("kind", list(BAD_CLIENTS))
async def test_server_rejects_bad_client_certificates(mesh: Any, kind: str) -> None:
    cert = BAD_CLIENTS[kind](mesh)
    before = mesh.echo["echo-b"].accepted
    t0 = time.monotonic()
    with pytest.raises(HboneError) as exc:
        stream = await mesh.hbone(cert, f"{mesh.echo_b}:8080")
        # A TLS 1.3 client finishes its handshake before the server has judged its
        # certificate: the refusal may only show when the stream is used.
        await stream.write(b"x")
        await asyncio.wait_for(stream.read(), 5)
    # Refused at the TLS/identity layer, promptly: never an HTTP answer, never a timeout.
    assert not isinstance(exc.value, ConnectRejected), exc.value
    assert exc.value.status != 504, exc.value
    assert time.monotonic() - t0 < 4.0
    assert mesh.echo["echo-b"].accepted == before


async def test_good_client_certificate_is_accepted_as_control(mesh: Any) -> None:
    stream = await mesh.hbone(
        mesh.issue(SpiffeId("cluster.local", "any", "one")), f"{mesh.echo_b}:8080"
    )
    await stream.write(b"ok")
    assert await asyncio.wait_for(stream.read(), 5) == b"ok"


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_non_connect_gets_400(mesh: Any, h2_client: Any, method: str) -> None:
    answer = await h2_client(
        (mesh.echo_b, mesh.hbone_port),
        mesh.issue(WEB),
        [
            (":method", method),
            (":scheme", "https"),
            (":path", "/"),
            (":authority", f"{mesh.echo_b}:8080"),
        ],
    )
    assert answer.status == 400, answer
    assert mesh.echo["echo-b"].accepted == 0


async def _status(mesh: Any, authority: str) -> int:
    with pytest.raises(ConnectRejected) as exc:
        await mesh.hbone(mesh.issue(WEB), authority)
    return exc.value.status


async def test_bad_authority_gets_400(mesh: Any) -> None:
    assert await _status(mesh, "echo.shop.svc.cluster.local:8080") == 400
    assert await _status(mesh, f"{mesh.echo_b}") == 400


async def test_authority_of_another_workload_gets_400(mesh: Any) -> None:
    """Addressed to echo-b's listener but naming legacy-b (same node): WIRE.md says 400."""
    assert await _status(mesh, f"{mesh.ip(12)}:8080") == 400


async def test_unknown_destination_gets_503(mesh: Any) -> None:
    assert await _status(mesh, f"{mesh.ip(250)}:8080") == 503


async def test_refused_upstream_gets_503(mesh: Any) -> None:
    assert await _status(mesh, f"{mesh.echo_b}:{free_port(mesh.echo_b)}") == 503


async def test_refused_upstream_through_socks_closes_the_app_promptly(mesh: Any) -> None:
    port = free_port(mesh.echo_b)
    r, w = await asyncio.open_connection(
        "127.0.0.1", mesh.a.settings.socks5_port, local_addr=(mesh.client_ip, 0)
    )
    t0 = time.monotonic()
    w.write(
        b"\x05\x01\x00"
        + b"\x05\x01\x00\x01"
        + socket.inet_aton(mesh.echo_b)
        + struct.pack("!H", port)
    )
    assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\x00"
    head = await asyncio.wait_for(r.readexactly(4), 5)
    assert head[1] != 0, "the SOCKS5 CONNECT should have failed"
    # Then the agent closes the application's connection: EOF, not a hang.
    rest = await asyncio.wait_for(r.read(), 5)
    assert len(rest) <= 18
    assert time.monotonic() - t0 < 5
    w.close()


async def test_undecodable_socks_hostname_gets_a_reply_and_a_close(mesh: Any) -> None:
    r, w = await asyncio.open_connection(
        "127.0.0.1", mesh.a.settings.socks5_port, local_addr=(mesh.client_ip, 0)
    )
    name = b"\xff\xfe.example"
    w.write(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")
    assert await asyncio.wait_for(r.readexactly(2), 5) == b"\x05\x00"
    rest = await asyncio.wait_for(r.read(), 5)
    assert rest[:1] == b"\x05" and rest[1:2] != b"\x00", rest
    w.close()


@pytest.mark.parametrize("which", ["outbound_port", "inbound_plaintext_port", "hbone_port"])
async def test_connect_to_the_agents_own_ports_is_refused(mesh: Any, which: str) -> None:
    port = getattr(mesh.b.settings, which)
    # Over HBONE, at echo-b where agent B itself listens on that port.
    assert await _status(mesh, f"{mesh.echo_b}:{port}") == 503
    # Through SOCKS5 to a workload of the client's own node, at agent A's port.
    a_port = getattr(mesh.a.settings, which)
    with pytest.raises(SocksRefused):
        await mesh.socks(mesh.ip(2), a_port)


# ---- configuration reload --------------------------------------------------------------------


async def test_malformed_reload_keeps_the_old_state_and_traffic_flows(mesh: Any) -> None:
    good = mesh.mesh_file.read_text()
    mesh.mesh_file.write_text(good + "\n  - this: [is not valid\n")
    await async_wait_for(
        lambda: mesh.a.store.last_error is not None and mesh.b.store.last_error is not None, 10
    )
    assert str(mesh.mesh_file) in mesh.a.store.last_error
    assert mesh.a.store.current.workload_by_ip(mesh.echo_b) is not None
    r, w = await mesh.socks(mesh.echo_b, 8080)
    w.write(b"still flowing")
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 10) == b"still flowing"
    w.close()
    # A good file again is picked up and clears the error.
    cfg = yaml.safe_load(good)
    cfg["workloads"].append(
        {"name": "new-b", "namespace": "shop", "workloadIps": [mesh.ip(13)], "node": "node-b"}
    )
    mesh.mesh_file.write_text(yaml.safe_dump(cfg))
    await async_wait_for(
        lambda: (
            mesh.a.store.last_error is None
            and mesh.a.store.current.workload_by_ip(mesh.ip(13)) is not None
        ),
        10,
    )


# ---- drain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"], indirect=True)
@pytest.mark.parametrize("side", ["server", "client"])
async def test_drain_lets_an_open_tunnel_finish_within_the_grace(mesh: Any, side: str) -> None:
    r, w = await mesh.socks(mesh.echo_b, 8080)
    w.write(b"before drain;")
    assert await asyncio.wait_for(r.readexactly(13), 5) == b"before drain;"
    agent = mesh.b if side == "server" else mesh.a
    grace = 8.0
    t0 = time.monotonic()
    drain = asyncio.create_task(agent.drain(grace))
    await async_wait_for(lambda: agent.draining, 5)
    # The open tunnel keeps working both ways during the drain...
    for i in range(5):
        msg = f"during drain {i};".encode()
        w.write(msg)
        assert await asyncio.wait_for(r.readexactly(len(msg)), 5) == msg
    assert not drain.done()
    # New connections are not accepted any more.
    with pytest.raises((SocksRefused, OSError)):
        await mesh.socks(mesh.echo_b, 8080)
    # ...and when the client finishes, the drain completes well before the grace period.
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
    await asyncio.wait_for(drain, grace + 2)
    assert time.monotonic() - t0 < grace - 1
    # The drained side closed its HBONE connections once their streams had ended.
    await async_wait_for(lambda: mesh.a.pool.stats()["connections"] == 0, 5)


async def test_an_empty_data_frame_is_not_the_end_of_the_stream(mesh: Any) -> None:
    """RFC 9113 section 6.1 allows DATA frames without payload; queued behind other data they
    used to read as b"" (end of stream): the application got only what came before."""
    import h2.config
    import h2.connection
    import h2.events

    from tests.integration.conftest import ECHO as ECHO_ID
    from tests.integration.conftest import WEB as WEB_ID
    from tests.integration.conftest import tls_context

    cert = mesh.issue(WEB_ID)
    assert ECHO_ID
    r, w = await asyncio.open_connection(
        mesh.echo_b, mesh.hbone_port, ssl=tls_context(cert), server_hostname=""
    )
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.send_headers(
        1, [(b":method", b"CONNECT"), (b":authority", f"{mesh.echo_b}:8080".encode())]
    )
    # Everything in one write: it is all queued before the stream's handler runs.
    conn.send_data(1, b"abc")
    conn.send_data(1, b"")
    conn.send_data(1, b"def", end_stream=True)
    w.write(conn.data_to_send())
    echoed = b""
    ended = False
    try:
        async with asyncio.timeout(10):
            while not ended:
                data = await r.read(65536)
                assert data, "connection closed"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        echoed += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended = True
                    elif isinstance(ev, h2.events.StreamReset):
                        raise AssertionError(f"reset {ev.error_code}")
                w.write(conn.data_to_send())
    finally:
        w.close()
    assert echoed == b"abcdef"
