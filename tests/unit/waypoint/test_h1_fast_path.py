"""The HTTP/1.1 fast path of the waypoint, over in-memory byte streams (no sockets): a small
upstream answer is complete when its head is, the connection goes back to the pool for the next
request, an answer split across reads still streams, and the server writes a complete response
(head, body, end) in one piece."""

from __future__ import annotations

import asyncio
import ipaddress
import random

import h11
import pytest

from waypoint.balancer import Cluster, Endpoint
from waypoint.http.h1 import Response, serve_h1
from waypoint.http.messages import BodyChannel, RequestHead
from waypoint.upstream import Upstreams
from ztunnel.meshconfig.destinations import EffectivePolicy
from ztunnel.model import Workload

pytestmark = pytest.mark.unit

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


class MemoryStream:
    """One side of an in-memory connection: reads what the test queues, records writes."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.writes: list[bytes] = []
        self.wrote = asyncio.Event()

    async def read(self) -> bytes:
        return await asyncio.wait_for(self.inbox.get(), 5)

    async def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.wrote.set()

    def end(self) -> None:
        pass

    def abort(self) -> None:
        self.inbox.put_nowait(b"")

    def peer(self) -> str:
        return "10.0.0.9:1234"


def _cluster() -> tuple[Cluster, Endpoint]:
    ip = ipaddress.ip_address("10.0.0.1")
    ep = Endpoint(Workload("uid", "p", "shop", (ip,)), ip, 8080)
    c = Cluster("c", EffectivePolicy(), random.Random(1))
    c.endpoints = [ep]
    return c, ep


async def _get(up: Upstreams, c: Cluster, ep: Endpoint, backend: MemoryStream, answer: list[bytes]):  # type: ignore[no-untyped-def]
    async def nothing():  # type: ignore[no-untyped-def]
        return
        yield b""

    async def respond() -> None:
        await asyncio.wait_for(backend.wrote.wait(), 5)
        backend.wrote.clear()
        for part in answer:
            backend.inbox.put_nowait(part)
            await asyncio.sleep(0)

    responder = asyncio.ensure_future(respond())
    ex = await up.exchange(c, ep, "h1", RequestHead("GET", "/x", "reviews"), nothing(), 0, list)
    await responder
    return ex


def test_small_answers_are_complete_at_once_and_reuse_the_connection() -> None:
    async def main() -> None:
        backend = MemoryStream()

        async def connect(_ep: Endpoint) -> MemoryStream:
            return backend

        up = Upstreams(connect)  # type: ignore[arg-type]
        c, ep = _cluster()
        for _ in range(3):
            ex = await _get(up, c, ep, backend, [OK])
            assert ex.head.status == 200
            assert ex.body.complete and ex.body.queued == 5  # no reader needed
            assert await ex.body.read_all(100) == b"hello"
        assert up.connections_opened == 1
        assert c.breaker.active == 0
        # Each request (head and its end) went upstream in one write.
        assert len(backend.writes) == 3
        assert all(w.startswith(b"GET /x HTTP/1.1\r\n") for w in backend.writes)

    asyncio.run(main())


def test_an_answer_split_across_reads_streams_and_the_connection_is_reused() -> None:
    async def main() -> None:
        backend = MemoryStream()

        async def connect(_ep: Endpoint) -> MemoryStream:
            return backend

        up = Upstreams(connect)  # type: ignore[arg-type]
        c, ep = _cluster()
        head, body = OK.split(b"\r\n\r\n")
        ex = await _get(up, c, ep, backend, [head + b"\r\n\r\n", body[:2], body[2:]])
        assert await ex.body.read_all(100) == b"hello"
        await asyncio.wait_for(ex.body.done.wait(), 5)
        ex = await _get(up, c, ep, backend, [OK])
        assert await ex.body.read_all(100) == b"hello"
        assert up.connections_opened == 1 and c.breaker.active == 0

    asyncio.run(main())


def test_the_server_writes_a_complete_response_in_one_piece() -> None:
    async def main() -> None:
        client = MemoryStream()

        async def handler(head: RequestHead, body: BodyChannel) -> Response:
            return Response.simple(200, "hi")

        task = asyncio.ensure_future(serve_h1(client, handler))  # type: ignore[arg-type]
        for _ in range(2):
            client.inbox.put_nowait(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            await asyncio.wait_for(client.wrote.wait(), 5)
            client.wrote.clear()
        client.inbox.put_nowait(b"")
        await asyncio.wait_for(task, 5)
        assert len(client.writes) == 2
        conn = h11.Connection(h11.CLIENT)
        conn.receive_data(client.writes[0])
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        conn.send(h11.EndOfMessage())
        events = [conn.next_event() for _ in range(3)]
        assert isinstance(events[0], h11.Response) and events[0].status_code == 200
        assert isinstance(events[1], h11.Data) and events[1].data == b"hi"
        assert isinstance(events[2], h11.EndOfMessage)

    asyncio.run(main())
