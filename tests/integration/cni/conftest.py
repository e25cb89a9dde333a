"""Fixtures for the Kubernetes side: the API server stand-in on loopback, and a node agent's
enrolment service (the real `EnrolmentService`) over a recording capture backend."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ztunnel.enrolment import EnrolmentService, PodRequest
from ztunnel.errors import ZtunnelError
from ztunnel.lab.kubeapi import BY_PATH, KubeApiServer, ObjectStore

NS = BY_PATH[("", "v1", "namespaces")]
PODS = BY_PATH[("", "v1", "pods")]


class RecordingCapture:
    """What the kernel would hold: attached interfaces and enrolled IPs."""

    def __init__(self) -> None:
        self.attached: set[str] = set()
        self.enrolled: set[str] = set()
        self.fail_on: str | None = None
        self.delay = 0.0
        # Per-pod capture health, as the kernel capture reports it (`capture` in answers).
        self.health: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def _check(self, what: str, req: PodRequest) -> None:
        self.calls.append((what, req.key))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on and self.fail_on in (req.name, what):
            raise ZtunnelError(f"{what} {req.key}: interface vanished")

    def attach_pod(self, req: PodRequest) -> None:
        self._check("attach", req)
        self.attached.add(req.ifname)

    def enrol(self, req: PodRequest) -> None:
        self._check("enrol", req)
        self.enrolled.update(str(i) for i in req.ips)

    def unenrol(self, req: PodRequest) -> None:
        self.calls.append(("unenrol", req.key))
        self.enrolled.difference_update(str(i) for i in req.ips)

    def detach_pod(self, req: PodRequest) -> None:
        self.calls.append(("detach", req.key))
        self.attached.discard(req.ifname)

    def resolve_host_ifname(self, req: PodRequest) -> str:
        self._check("resolve", req)
        return f"host-{Path(req.netns).name}"[:15]


class AgentHandle:
    def __init__(self, socket_path: str, state: str) -> None:
        self.socket_path = socket_path
        self.state = state
        self.capture = RecordingCapture()
        self.service: EnrolmentService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self.service = EnrolmentService(self.capture, self.socket_path, self.state)
            self.service.pod_status = lambda key, rec: self.capture.health.get(
                key, {"ok": True, "detail": ""}
            )
            loop.run_until_complete(self.service.start())
            started.set()
            loop.run_forever()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.close()

        self._thread = threading.Thread(target=run, name="fake agent", daemon=True)
        self._thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            assert self.service is not None
            asyncio.run_coroutine_threadsafe(self.service.close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def pods(self) -> dict[str, Any]:
        """The stored records (what `list` answers, without the capture member)."""
        assert self.service is not None
        return json.loads(json.dumps(self.service.pods))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentHandle]:
    a = AgentHandle(str(tmp_path / "agent" / "ztunnel.sock"), str(tmp_path / "agent" / "pods.json"))
    a.start()
    try:
        yield a
    finally:
        a.stop()


class Api:
    def __init__(self, server: KubeApiServer, url: str, kubeconfig: Path) -> None:
        self.server = server
        self.url = url
        self.kubeconfig = kubeconfig
        self.store = server.store

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return self.store.create(NS, "", {"metadata": {"name": name, "labels": labels or {}}})

    def pod(
        self,
        ns: str,
        name: str,
        node: str = "n0",
        labels: dict[str, str] | None = None,
        ip: str = "",
    ) -> dict[str, Any]:
        p = self.store.create(
            PODS,
            ns,
            {
                "metadata": {"name": name, "labels": labels or {}},
                "spec": {"nodeName": node, "containers": [{"name": "app"}]},
            },
        )
        if ip:
            p = self.store.patch(
                PODS,
                ns,
                name,
                {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
                "application/merge-patch+json",
                status_only=True,
            )
        return p


@pytest.fixture
def kubeapi(tmp_path: Path) -> Iterator[Api]:
    server = KubeApiServer(
        "test-token", ["127.0.0.1"], ObjectStore(event_log=50), bookmark_interval=0.2
    )
    url = server.start()
    kc = tmp_path / "kubeconfig"
    kc.write_text(json.dumps(server.kubeconfig(url)))
    try:
        yield Api(server, url, kc)
    finally:
        server.stop()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
