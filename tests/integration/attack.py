"""Attack tooling for the hardening tests: a victim `ztunnel run` process on loopback (so its
RSS and CPU are its own), raw HTTP/2 attackers over TLS with a valid mesh certificate (an
authenticated but misbehaving peer), idle-socket floods, and a legitimate HBONE call that is
timed. Attackers run in a process of their own (`python -m tests.integration.attack SPEC`),
so they never slow the legitimate caller; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpack
import yaml

from bench.procstat import cpu_seconds, rss_bytes
from tests.h2wire import frame
from ztunnel.ca import CertificateAuthority, IssuedCertificate
from ztunnel.hbone.headers import ConnectRequest
from ztunnel.hbone.pool import HbonePool, PoolKey
from ztunnel.hbone.tls import ContextCache
from ztunnel.identity import SpiffeId
from ztunnel.testing import EchoServer, free_ports, random_loopback_net

WEB = SpiffeId("cluster.local", "frontend", "web")
ECHO = SpiffeId("cluster.local", "shop", "echo")
EVIL = SpiffeId("cluster.local", "evil", "attacker")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113 section 6 frame types, section 7 error codes
HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB
MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]


def connect_block(authority: str) -> bytes:
    """One HPACK block for CONNECT `authority`; valid to repeat (each copy re-adds the same
    dynamic-table entries, RFC 7541 section 6.2.1)."""
    return hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])


# ---- the victim --------------------------------------------------------------------------


@dataclass
class Victim:
    """A `ztunnel run` serving one local workload (shop/echo at <net>.11) over HBONE, with an
    echo application on port 8080 run by the test."""

    proc: subprocess.Popen[bytes]
    net: str
    hbone_port: int
    inbound_port: int
    stats_port: int
    readiness_port: int
    ca: CertificateAuthority
    log: Path
    echo: EchoServer | None = None
    # The legitimate caller's TLS contexts, built once (each call still does a handshake).
    contexts: ContextCache = field(default_factory=ContextCache)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def echo_ip(self) -> str:
        return f"{self.net}.11"

    @property
    def hbone(self) -> tuple[str, int]:
        return (self.echo_ip, self.hbone_port)

    def ip(self, host: int) -> str:
        return f"{self.net}.{host}"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as `name{labels}` -> value."""
        url = f"http://127.0.0.1:{self.stats_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
        out: dict[str, float] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        key = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        )
        return self.metrics().get(key, 0.0)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_victim(workdir: Path, *flags: str) -> Victim:
    net = random_loopback_net()
    ca = CertificateAuthority.create("cluster.local")
    ca.save(workdir / "ca")
    mesh = workdir / "mesh.yaml"
    mesh.write_text(
        yaml.safe_dump(
            {
                "workloads": [
                    {
                        "uid": "Kubernetes//Pod/shop/echo-b",
                        "name": "echo-b",
                        "namespace": "shop",
                        "serviceAccount": "echo",
                        "workloadIps": [f"{net}.11"],
                        "node": "node-b",
                    }
                ]
            }
        )
    )
    hbone, inbound, outbound, stats, ready = free_ports(5)
    log = workdir / "victim.log"
    cmd = [
        sys.executable,
        "-m",
        "ztunnel",
        "run",
        "--node-name",
        "node-b",
        "--local-xds",
        str(mesh),
        "--ca-dir",
        str(workdir / "ca"),
        "--hbone-port",
        str(hbone),
        "--inbound-plaintext-port",
        str(inbound),
        "--outbound-port",
        str(outbound),
        "--socks5-port",
        "0",
        "--admin-port",
        "0",
        "--stats-port",
        str(stats),
        "--readiness-port",
        str(ready),
        "--drain-timeout",
        "1",
        *flags,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    v = Victim(proc, net, hbone, inbound, stats, ready, ca, log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"victim exited with {proc.returncode}:\n{v.log_text()}")
        try:
            url = f"http://127.0.0.1:{ready}/healthz/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return v
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"victim not ready:\n{v.log_text()}")
        time.sleep(0.05)


def stop_victim(v: Victim) -> None:
    if v.proc.poll() is None:
        v.proc.send_signal(signal.SIGTERM)
        try:
            v.proc.wait(10)
        except subprocess.TimeoutExpired:
            v.proc.kill()
            v.proc.wait(5)


# ---- the legitimate caller ---------------------------------------------------------------


class _FixedCert:
    def __init__(self, cert: IssuedCertificate) -> None:
        self.cert = cert

    async def get(self, identity: SpiffeId) -> IssuedCertificate:
        return self.cert


async def legit_call(v: Victim, cert: IssuedCertificate, source_ip: str, budget: float) -> float:
    """A new HBONE connection (TLS, CONNECT, 5 bytes echoed) from `source_ip`; returns the
    seconds it took; AssertionError if it failed or took longer than `budget`."""
    pool = HbonePool(_FixedCert(cert), v.contexts, connect_timeout=budget)  # type: ignore[arg-type]
    key = PoolKey(
        cert.identity,
        frozenset({ECHO}),
        (ipaddress.ip_address(v.echo_ip), v.hbone_port),
        ipaddress.ip_address(source_ip),
    )
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(budget):
            stream = await pool.open_stream(key, ConnectRequest(f"{v.echo_ip}:8080"))
            await stream.write(b"hello")
            stream.end()
            got = b""
            while chunk := await stream.read():
                stream.ack(len(chunk))
                got += chunk
            assert got == b"hello", got
            took = time.monotonic() - t0
    except TimeoutError:
        raise AssertionError(f"the legitimate call took longer than {budget}s") from None
    finally:
        await pool.close(0.5)
    return took


# ---- raw HTTP/2 attackers ----------------------------------------------------------------


@dataclass
class Cutoff:
    """What one attacking connection saw."""

    started: float = 0.0
    goaway_code: int | None = None
    goaway_last_stream: int = 0
    goaway_after: float | None = None  # seconds from the first attack byte
    closed_after: float | None = None
    acks: int = 0  # SETTINGS/PING ACKs received
    resets: int = 0  # RST_STREAM frames received
    sent_bytes: int = 0


def _scan(buf: bytearray, cut: Cutoff) -> None:
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            return
        ftype, flags = buf[3], buf[4]
        payload = bytes(buf[9 : 9 + length])
        del buf[: 9 + length]
        if ftype == GOAWAY and cut.goaway_code is None:
            last, code = struct.unpack("!II", payload[:8])
            cut.goaway_code, cut.goaway_last_stream = code, last & 0x7FFFFFFF
            cut.goaway_after = time.monotonic() - cut.started
        elif ftype in (SETTINGS, PING) and flags & ACK:
            cut.acks += 1
        elif ftype == RST_STREAM:
            cut.resets += 1


async def _attack_once(
    addr: tuple[str, int],
    ctx: ssl.SSLContext,
    source_ip: str,
    payload: Iterator[bytes],
    within: float,
) -> Cutoff:
    cut = Cutoff()
    r, w = await asyncio.wait_for(
        asyncio.open_connection(
            addr[0], addr[1], ssl=ctx, server_hostname="", local_addr=(source_ip, 0)
        ),
        10,
    )
    cut.started = time.monotonic()

    async def read() -> None:
        buf = bytearray()
        while True:
            try:
                data = await r.read(65536)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                cut.closed_after = time.monotonic() - cut.started
                return
            buf += data
            _scan(buf, cut)

    reader = asyncio.ensure_future(read())
    try:
        async with asyncio.timeout(within):
            for chunk in payload:
                if reader.done():
                    break
                w.write(chunk)
                cut.sent_bytes += len(chunk)
                await w.drain()
            await reader
    except (TimeoutError, ConnectionError, OSError):
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        w.transport.abort()
    return cut


def pair_bytes(authority: str) -> int:
    """Bytes of one HEADERS + RST_STREAM pair of `reset_flood`."""
    return 9 + len(connect_block(authority)) + 9 + 4


def reset_flood(authority: str, pairs: int, batch: int = 500) -> Iterator[bytes]:
    """Preface, then `pairs` x (HEADERS CONNECT, RST_STREAM CANCEL), `batch` pairs a write."""
    block = connect_block(authority)
    yield PREFACE + frame(SETTINGS, 0, 0)
    sid = 1
    for start in range(0, pairs, batch):
        parts = []
        for _ in range(min(batch, pairs - start)):
            parts.append(frame(HEADERS, END_HEADERS, sid, block))
            parts.append(frame(RST_STREAM, 0, sid, struct.pack("!I", CANCEL)))
            sid += 2
        yield b"".join(parts)


def raced_resets(authority: str, pairs: int) -> Iterator[bytes]:
    """Like `reset_flood`, but HEADERS and its RST_STREAM in separate writes, so that the
    reset tends to land after the stream's handler has started."""
    flood = reset_flood(authority, pairs, batch=1)
    yield next(flood)
    for pair in flood:
        headers_len = 9 + int.from_bytes(pair[:3], "big")
        yield pair[:headers_len]
        yield pair[headers_len:]


def control_flood(kind: int, count: int, batch: int = 1000) -> Iterator[bytes]:
    """Preface, then `count` SETTINGS (empty) or PING frames, `batch` a write."""
    yield PREFACE + frame(SETTINGS, 0, 0)
    one = frame(SETTINGS, 0, 0) if kind == SETTINGS else frame(PING, 0, 0, bytes(8))
    for start in range(0, count, batch):
        yield one * min(batch, count - start)


def hold_open() -> Iterator[bytes]:
    """A well-behaved idle HBONE client: preface and SETTINGS, then nothing."""
    yield PREFACE + frame(SETTINGS, 0, 0)


@dataclass(frozen=True)
class Attack:
    """What an attacker process does: `kind` (reset_flood, raced_resets, settings, ping,
    hold) with `count` frames or pairs, on `connections` parallel connections, and with
    `persist` reconnects whenever cut off until `count` are accepted or `seconds` pass."""

    kind: str
    addr: tuple[str, int]
    source_ip: str
    authority: str = ""
    count: int = 0
    connections: int = 1
    persist: bool = False
    seconds: float = 10.0

    def payload(self, count: int) -> Iterator[bytes]:
        if self.kind == "reset_flood":
            return reset_flood(self.authority, count)
        if self.kind == "raced_resets":
            return raced_resets(self.authority, count)
        if self.kind in ("settings", "ping"):
            return control_flood(SETTINGS if self.kind == "settings" else PING, count)
        return hold_open()


async def _run(a: Attack, ctx: ssl.SSLContext) -> list[Cutoff]:
    deadline = time.monotonic() + a.seconds
    if not a.persist:
        return list(
            await asyncio.gather(
                *(
                    _attack_once(a.addr, ctx, a.source_ip, a.payload(a.count), a.seconds)
                    for _ in range(a.connections)
                )
            )
        )
    cuts: list[Cutoff] = []
    left = a.count
    while left > 0 and time.monotonic() < deadline - 0.5:
        cut = await _attack_once(
            a.addr, ctx, a.source_ip, a.payload(left), deadline - time.monotonic()
        )
        cuts.append(cut)
        done = (cut.goaway_last_stream + 1) // 2 if cut.goaway_code is not None else left
        left -= max(done, 1)
    return cuts


async def run_attacker(a: Attack, cert: IssuedCertificate, workdir: Path) -> list[Cutoff]:
    """Runs the attack in a process of its own (no GIL shared with the test's legitimate
    caller) and returns what each of its connections saw."""
    key = workdir / f"attacker-{time.monotonic_ns()}.pem"
    key.write_bytes(cert.key_pem + cert.cert_chain_pem)
    roots = key.with_suffix(".roots")
    roots.write_bytes(cert.root_pem)
    spec = json.dumps({"attack": dataclasses.asdict(a), "cert": str(key), "roots": str(roots)})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.attack",
        spec,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO_ROOT),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), a.seconds + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the attacker process did not finish") from None
    if proc.returncode != 0:
        raise AssertionError(f"attacker failed ({proc.returncode}): {err.decode()[-2000:]}")
    return [Cutoff(**c) for c in json.loads(out.decode().strip().splitlines()[-1])]


def _attacker_main(spec: dict[str, Any]) -> None:
    a = spec["attack"]
    attack = Attack(**{**a, "addr": tuple(a["addr"])})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(spec["roots"])
    ctx.load_cert_chain(spec["cert"])
    ctx.set_alpn_protocols(["h2"])
    cuts = asyncio.run(_run(attack, ctx))
    print(json.dumps([dataclasses.asdict(c) for c in cuts]))


# ---- idle sockets ------------------------------------------------------------------------


@dataclass
class IdleFlood:
    """Plain TCP connections to a port that never send a byte."""

    socks: list[socket.socket] = field(default_factory=list)

    def open(self, addr: tuple[str, int], source_ip: str, n: int) -> None:
        for _ in range(n):
            s = socket.socket()
            s.bind((source_ip, 0))
            s.settimeout(5)
            try:
                s.connect(addr)
            except OSError:
                s.close()
                continue
            s.setblocking(False)
            self.socks.append(s)

    def still_open(self) -> int:
        """Connections the server has not closed or reset yet."""
        n = 0
        for s in self.socks:
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    continue
            except BlockingIOError:
                n += 1
                continue
            except OSError:
                continue
            n += 1
        return n

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


if __name__ == "__main__":
    _attacker_main(json.loads(sys.argv[1]))
