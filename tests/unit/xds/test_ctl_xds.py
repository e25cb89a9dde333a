"""`ztunnel ctl xds`: the xDS part of a config dump as a table."""

from __future__ import annotations

import pytest

from ztunnel.ctl import VIEWS, render_table

pytestmark = pytest.mark.unit


def test_xds_view_shows_connection_and_types() -> None:
    view = {v.name: v for v in VIEWS}["xds"]
    dump = {
        "istiod": {
            "xds": {
                "address": "https://istiod.istio-system.svc:15012",
                "connected_since": "2026-01-01T00:00:00+00:00",
                "last_error": None,
                "types": [
                    {
                        "type_url": "type.googleapis.com/istio.workload.Address",
                        "resources": 12,
                        "synced": True,
                        "acks": 3,
                        "nacks": 1,
                        "last_ack": {"nonce": "7", "at": "2026-01-01T00:00:01+00:00"},
                        "last_nack": {"nonce": "5", "at": "x", "error": "uid-1: bad address"},
                    },
                    {
                        "type_url": "type.googleapis.com/istio.security.Authorization",
                        "resources": 0,
                        "synced": False,
                        "acks": 0,
                        "nacks": 0,
                    },
                ],
            }
        }
    }
    lines = render_table(view.select(dump), view.columns).splitlines()
    assert lines[0].split()[:3] == ["ISTIOD", "CONNECTED", "SINCE"]
    assert "istio.workload.Address" in lines[1] and "uid-1: bad address" in lines[1]
    assert " 12 " in lines[1] and " yes " in lines[1]
    assert "istio.security.Authorization" in lines[2] and " no " in lines[2]
    assert view.select({"istiod": None}) == []
