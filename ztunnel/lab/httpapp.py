"""The HTTP application of the waypoint lab: `serve` answers every request with JSON naming
its pod and version (and counts requests, and mirrored copies whose Host ends in `-shadow`);
its mode is switched at run time (`ok`, `flaky`: every other request fails 500, `fail`:
all fail) through `/control?mode=...`. `load` sends N requests over one keep-alive
connection and prints what it observed as JSON (statuses, versions, pods, cookies).

Run as `python -m ztunnel.lab.httpapp serve --name P --version v1 --port 9080` or
`python -m ztunnel.lab.httpapp load http://10.96.0.20/canary --n 300`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from waypoint.http.h1 import Response, ServerLimits, serve_h1
from waypoint.http.messages import BodyChannel, RequestHead
from waypoint.http.streams import AsyncioByteStream


class App:
    def __init__(self, name: str, version: str, mode: str = "ok") -> None:
        self.name = name
        self.version = version
        self.mode = mode
        self.requests = 0
        self.shadow = 0
        self.failed = 0

    async def handle(self, head: RequestHead, body: BodyChannel) -> Response:
        await body.read_all(1 << 20)
        if head.path_only == "/control":
            q = dict(urllib.parse.parse_qsl(head.query))
            self.mode = q.get("mode", self.mode)
            return self._json(200, {"mode": self.mode})
        if head.path_only == "/stats":
            return self._json(
                200,
                {
                    "requests": self.requests,
                    "shadow": self.shadow,
                    "failed": self.failed,
                    "mode": self.mode,
                },
            )
        self.requests += 1
        host = head.authority.rsplit(":", 1)[0]
        if host.endswith("-shadow"):
            self.shadow += 1
        fail = self.mode == "fail" or (self.mode == "flaky" and self.requests % 2 == 1)
        if fail:
            self.failed += 1
        return self._json(
            500 if fail else 200,
            {"pod": self.name, "version": self.version, "path": head.path, "host": head.authority},
        )

    @staticmethod
    def _json(status: int, obj: dict[str, Any]) -> Response:
        data = json.dumps(obj).encode()
        return Response.simple(status, data.decode(), [("content-type", "application/json")])


async def _serve(name: str, version: str, port: int, mode: str) -> None:
    app = App(name, version, mode)

    async def on(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        io = AsyncioByteStream(r, w)
        try:
            await serve_h1(io, app.handle, ServerLimits(header_timeout=10, idle_timeout=60))
        finally:
            io.close()

    server = await asyncio.start_server(on, "0.0.0.0", port, reuse_address=True)
    print(json.dumps({"serving": name, "version": version, "port": port}), flush=True)
    await server.serve_forever()


def load(
    url: str, n: int, headers: dict[str, str], keep_cookie: bool, timeout: float = 5.0
) -> dict[str, Any]:
    """N requests over keep-alive connections (a new one after an error)."""
    u = urllib.parse.urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    statuses: collections.Counter[str] = collections.Counter()
    versions: collections.Counter[str] = collections.Counter()
    pods: collections.Counter[str] = collections.Counter()
    cookies: list[str] = []
    seq: list[int] = []
    cookie = ""
    conn: http.client.HTTPConnection | None = None
    t0 = time.perf_counter()
    for _ in range(n):
        hdrs = dict(headers)
        if cookie:
            hdrs["cookie"] = cookie
        try:
            if conn is None:
                conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
            conn.request("GET", path, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            statuses[f"error: {type(e).__name__}"] += 1
            seq.append(0)
            if conn is not None:
                conn.close()
            conn = None
            continue
        statuses[str(resp.status)] += 1
        seq.append(resp.status)
        set_cookie = resp.getheader("set-cookie")
        if set_cookie:
            cookies.append(set_cookie)
            if keep_cookie and not cookie:
                cookie = set_cookie.split(";", 1)[0]
        try:
            got = json.loads(data)
            versions[got.get("version", "?")] += 1
            pods[got.get("pod", "?")] += 1
        except ValueError:
            versions[data.decode(errors="replace")[:40]] += 1
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return {
        "n": n,
        "statuses": dict(statuses),
        "versions": dict(versions),
        "pods": dict(pods),
        "cookies": cookies[:3],
        "sequence": seq,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ztunnel.lab.httpapp")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--version", default="v1")
    s.add_argument("--port", type=int, default=9080)
    s.add_argument("--mode", default="ok", choices=("ok", "flaky", "fail"))
    c = sub.add_parser("load")
    c.add_argument("url")
    c.add_argument("--n", type=int, default=1)
    c.add_argument("--header", action="append", default=[], help="name:value")
    c.add_argument("--keep-cookie", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(_serve(args.name, args.version, args.port, args.mode))
        return 0
    headers = dict(h.split(":", 1) for h in args.header)
    print(
        json.dumps(
            load(
                args.url,
                max(1, min(args.n, 10_000)),
                {k.strip(): v.strip() for k, v in headers.items()},
                args.keep_cookie,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
