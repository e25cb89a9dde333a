"""The waypoint end to end on loopback: curl -> agent A (SOCKS5) -> HBONE -> waypoint -> HBONE
-> agent B/A -> HTTP backend."""

from __future__ import annotations

import json

import pytest

from tests.integration.waypoint.conftest import WaypointMesh

pytestmark = pytest.mark.integration


async def test_default_route_reaches_a_backend_through_the_waypoint(wmesh: WaypointMesh) -> None:
    status, headers, body = await wmesh.curl(path="/hello")
    assert status == 200, body
    got = json.loads(body)
    assert got["path"] == "/hello"
    assert got["pod"].startswith("reviews-")
    assert "traceparent" in got["headers"] and "x-request-id" in got["headers"]
