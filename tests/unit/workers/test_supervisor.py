"""The agent's view of its workers without processes (`ztunnel.workers.supervisor`):
readiness until each worker served once, and /config_dump merging their connections."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ztunnel.workers.plan import WorkerPlan
from ztunnel.workers.supervisor import Worker, WorkerPool

pytestmark = pytest.mark.unit


def pool(count: int) -> WorkerPool:
    p = WorkerPool.__new__(WorkerPool)  # no agent, no event loop: the bookkeeping only
    p.plan = WorkerPlan(count, "reuseport", "test")
    p.workers = {i: Worker(i) for i in range(1, count)}
    p.restarts = 0
    p.agent = SimpleNamespace(tracker=SimpleNamespace(total_opened=5))  # type: ignore[assignment]
    p._live_until = 0.0
    p.broadcast = lambda message: None  # type: ignore[method-assign]
    return p


def test_ready_once_every_worker_has_served_and_a_restart_does_not_unready() -> None:
    p = pool(3)
    assert p.pending() == ["worker 1: starting", "worker 2: starting"]
    for w in p.workers.values():
        w.ready = w.ever_ready = True
    assert p.pending() == []
    p.workers[2].ready = False  # crashed, restarting
    assert p.pending() == []


def test_config_dump_adds_the_workers_connections_and_processes() -> None:
    p = pool(2)
    p.workers[1].pid = 4242
    p.workers[1].connections = {
        "counts": {"inbound": 2, "outbound": 1},
        "total_opened": 7,
        "live": [{"id": 1, "dst.port": 8080}],
    }
    dump: dict[str, Any] = {
        "connections": {"counts": {"inbound": 1}, "total_opened": 5, "live": [{"id": 9}]}
    }
    p.extend_dump(dump)
    conns = dump["connections"]
    assert conns["counts"] == {"inbound": 3, "outbound": 1}
    assert conns["total_opened"] == 12
    assert conns["live"] == [{"id": 9}, {"id": 1, "dst.port": 8080, "worker": 1}]
    procs = dump["workers"]["processes"]
    assert [(q["index"], q["total_opened"]) for q in procs] == [(0, 5), (1, 7)]
    assert procs[1]["pid"] == 4242 and dump["workers"]["count"] == 2
