"""Tiny applications that run inside lab pods: `serve` (echo servers that first say who they
are and whom they see) and `call` (one connection, prints what it observed as JSON).

Run as `python -m ztunnel.lab.apps serve --name P --ports 8080,9090` or
`python -m ztunnel.lab.apps call IP PORT --marker M`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Sequence


async def _serve(name: str, ports: list[int]) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peername")
        local = w.get_extra_info("sockname")
        try:
            w.write(f"hello from {name}:{local[1]} you are {peer[0]}:{peer[1]}\n".encode())
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    servers = [await asyncio.start_server(handle, "0.0.0.0", p, reuse_address=True) for p in ports]
    print(json.dumps({"serving": name, "ports": ports}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def call(ip: str, port: int, marker: str, timeout: float = 5.0) -> dict[str, object]:
    """Connect, read the greeting, send the marker, half-close, read the echo."""
    t0 = time.perf_counter()
    out: dict[str, object] = {"dest": f"{ip}:{port}"}
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            host, lport = s.getsockname()[:2]
            out["local"] = f"{host}:{lport}"
            f = s.makefile("rb")
            hello = f.readline().decode().strip()
            s.sendall(marker.encode())
            s.shutdown(socket.SHUT_WR)
            echoed = f.read().decode(errors="replace")
        out.update(ok=echoed == marker, hello=hello, echoed=echoed)
        if hello.startswith("hello from "):
            parts = hello.split()
            out["server"] = parts[2]
            out["server_saw"] = parts[-1]
        if echoed != marker:
            out["error"] = "no echo" if not echoed else "echo differs"
    except TimeoutError:
        out.update(ok=False, error="timed out")
    except OSError as e:
        out.update(ok=False, error=e.strerror or str(e))
    out["ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ztunnel.lab.apps")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--ports", default="8080")
    c = sub.add_parser("call")
    c.add_argument("ip")
    c.add_argument("port", type=int)
    c.add_argument("--marker", default="ping")
    c.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(_serve(args.name, [int(x) for x in args.ports.split(",")]))
        return 0
    result = call(args.ip, args.port, args.marker, args.timeout)
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
