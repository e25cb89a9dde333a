"""The enrolment API: request parsing (pure) and the Unix-socket service with a fake capture
backend. Bad requests get an error answer naming the field; nothing else is affected."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from ztunnel.enrolment import (
    EnrolmentError,
    EnrolmentService,
    PodRequest,
    parse_request,
    request,
)
from ztunnel.errors import ConfigError, ZtunnelError

pytestmark = pytest.mark.unit

GOOD = {
    "op": "add_pod",
    "namespace": "shop",
    "name": "echo-1",
    "ifname": "veth1",
    "ips": ["10.1.2.3", "fd00::3"],
    "enrol": True,
}


def test_parse_good_request() -> None:
    req = parse_request(json.dumps(GOOD).encode())
    assert req == PodRequest(
        "add_pod",
        "shop",
        "echo-1",
        "veth1",
        (ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::3")),
        True,
    )
    assert parse_request(b'{"op": "list"}').op == "list"
    assert parse_request(b'{"op":"unenrol","namespace":"a","name":"b"}').key == "a/b"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"op": "explode"}', "op"),
        (json.dumps({**GOOD, "namespace": ""}).encode(), "namespace"),
        (json.dumps({**GOOD, "name": 7}).encode(), "name"),
        (json.dumps({**GOOD, "ifname": "x" * 16}).encode(), "ifname"),
        (json.dumps({**GOOD, "ips": []}).encode(), "ips"),
        (json.dumps({**GOOD, "ips": ["10.1.2.3", "nope"]}).encode(), "ips[1]"),
        (json.dumps({**GOOD, "enrol": "yes"}).encode(), "enrol"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_requests_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_request(raw)
    assert field in str(e.value)


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on: str | None = None

    def _call(self, what: str, req: PodRequest) -> None:
        if self.fail_on == req.name:
            raise ZtunnelError(f"kernel said no for {req.name}")
        self.calls.append((what, req.key))

    def attach_pod(self, req: PodRequest) -> None:
        self._call("attach", req)

    def enrol(self, req: PodRequest) -> None:
        self._call("enrol", req)

    def unenrol(self, req: PodRequest) -> None:
        self._call("unenrol", req)

    def detach_pod(self, req: PodRequest) -> None:
        self._call("detach", req)


async def _ask(path: str, obj: Any) -> dict[str, Any]:
    return await asyncio.to_thread(request, path, obj, 5.0)


async def test_service_answers_errors_and_keeps_serving(tmp_path: Path) -> None:
    backend = FakeBackend()
    sock = str(tmp_path / "z.sock")
    svc = EnrolmentService(backend, sock, str(tmp_path / "state" / "pods.json"))
    await svc.start()
    try:
        assert (await _ask(sock, GOOD))["pod"]["enrolled"] is True
        # Idempotent.
        await _ask(sock, GOOD)
        # Bad input: a clear error, nothing recorded.
        with pytest.raises(EnrolmentError, match="ips"):
            await _ask(sock, {**GOOD, "name": "other", "ips": ["x"]})
        # A backend failure for one pod is reported and does not disturb the others.
        backend.fail_on = "broken"
        with pytest.raises(EnrolmentError, match="kernel said no"):
            await _ask(sock, {**GOOD, "name": "broken"})
        # A raw garbage line, then a good request on the same connection still works.
        reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(b"garbage\n" + json.dumps({"op": "list"}).encode() + b"\n")
        first = json.loads(await reader.readline())
        second = json.loads(await reader.readline())
        writer.close()
        assert first["ok"] is False and "not JSON" in first["error"]
        assert second["ok"] is True and set(second["pods"]) == {"shop/echo-1"}
        # Unenrol and remove are idempotent and tolerate unknown pods (like CNI DEL).
        await _ask(sock, {"op": "unenrol", "namespace": "shop", "name": "echo-1"})
        await _ask(sock, {"op": "remove_pod", "namespace": "shop", "name": "never-added"})
        await _ask(sock, {"op": "remove_pod", "namespace": "shop", "name": "echo-1"})
        assert (await _ask(sock, {"op": "list"}))["pods"] == {}
    finally:
        await svc.close()
    assert ("detach", "shop/echo-1") in backend.calls


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "pods.json")
    sock = str(tmp_path / "z.sock")
    svc = EnrolmentService(FakeBackend(), sock, state)
    await svc.start()
    await _ask(sock, GOOD)
    await svc.close()
    again = EnrolmentService(FakeBackend(), sock, state)
    assert again.pods["shop/echo-1"]["enrolled"] is True
    # A corrupt state file is reported and ignored, not fatal.
    Path(state).write_text("{broken")
    assert EnrolmentService(FakeBackend(), sock, state).pods == {}


def test_client_reports_an_unreachable_agent(tmp_path: Path) -> None:
    with pytest.raises(EnrolmentError, match="not reachable"):
        request(str(tmp_path / "missing.sock"), {"op": "list"}, timeout=1)


class ResolvingBackend(FakeBackend):
    """Also resolves a pod's host interface (from CNI_NETNS), like the kernel backend."""

    def resolve_host_ifname(self, req: PodRequest) -> str:
        self._call("resolve", req)
        return "veth-" + req.netns.rsplit("/", 1)[-1]


async def test_host_interface_is_resolved_from_the_pod_netns(tmp_path: Path) -> None:
    backend = ResolvingBackend()
    sock = str(tmp_path / "z.sock")
    svc = EnrolmentService(backend, sock, str(tmp_path / "pods.json"))
    await svc.start()
    try:
        req = {**GOOD, "ifname": "", "netns": "/run/netns/pod7", "pod_ifname": "eth0", "uid": "u-7"}
        pod = (await _ask(sock, req))["pod"]
        pod.pop("capture")
        assert pod == {
            "ifname": "veth-pod7",
            "ips": ["10.1.2.3", "fd00::3"],
            "enrolled": True,
            "uid": "u-7",
        }
        assert backend.calls[:2] == [("resolve", "shop/echo-1"), ("attach", "shop/echo-1")]
        for bad, field in (
            ({"netns": "relative"}, "netns"),
            ({"netns": ""}, "ifname"),
            ({"pod_ifname": "x" * 16}, "pod_ifname"),
            ({"uid": 5}, "uid"),
        ):
            with pytest.raises(EnrolmentError, match=field):
                await _ask(sock, {**req, "name": "other", **bad})
    finally:
        await svc.close()


async def test_failed_enrolment_leaves_nothing_half_enrolled(tmp_path: Path) -> None:
    backend = FakeBackend()
    sock = str(tmp_path / "z.sock")
    svc = EnrolmentService(backend, sock, str(tmp_path / "pods.json"))
    await svc.start()
    try:
        await _ask(sock, GOOD)
        # attach succeeds, enrol fails: the attach is undone, no record stays.
        original = backend.enrol

        def enrol(req: PodRequest) -> None:
            if req.name == "late":
                raise ZtunnelError("interface vanished during enrolment")
            original(req)

        backend.enrol = enrol  # type: ignore[method-assign]
        with pytest.raises(EnrolmentError, match="vanished"):
            await _ask(sock, {**GOOD, "name": "late", "ips": ["10.1.2.9"]})
        pods = (await _ask(sock, {"op": "list"}))["pods"]
        assert set(pods) == {"shop/echo-1"}
        assert ("unenrol", "shop/late") in backend.calls and (
            "detach",
            "shop/late",
        ) in backend.calls
    finally:
        await svc.close()


async def test_a_reused_ip_replaces_the_stale_record(tmp_path: Path) -> None:
    backend = FakeBackend()
    sock = str(tmp_path / "z.sock")
    svc = EnrolmentService(backend, sock, str(tmp_path / "pods.json"))
    await svc.start()
    try:
        await _ask(sock, GOOD)
        await _ask(
            sock,
            {
                **GOOD,
                "namespace": "legacy",
                "name": "new",
                "ifname": "veth9",
                "ips": ["10.1.2.3"],
                "enrol": False,
            },
        )
        pods = (await _ask(sock, {"op": "list"}))["pods"]
        assert set(pods) == {"legacy/new"}
        assert ("unenrol", "shop/echo-1") in backend.calls and (
            "detach",
            "shop/echo-1",
        ) in backend.calls
    finally:
        await svc.close()


async def test_every_pod_record_answered_carries_its_capture_status(tmp_path: Path) -> None:
    sock = str(tmp_path / "z.sock")
    state = tmp_path / "pods.json"
    svc = EnrolmentService(FakeBackend(), sock, str(state))
    await svc.start()
    try:
        # Without a provider (a backend that does not report safety): never "ok".
        unknown = (await _ask(sock, GOOD))["pod"]["capture"]
        assert unknown["ok"] is False and "not reported" in unknown["detail"]
        seen: list[tuple[str, bool]] = []

        def status(key: str, rec: dict[str, Any]) -> dict[str, Any]:
            seen.append((key, rec["enrolled"]))
            bad = rec["ifname"] == "veth-bad"
            return {"ok": not bad, "detail": "cni_pass runs ahead" if bad else "captured"}

        svc.pod_status = status
        good = (await _ask(sock, GOOD))["pod"]
        assert good["capture"] == {"ok": True, "detail": "captured"} and good["enrolled"]
        other = {**GOOD, "name": "echo-2", "ifname": "veth-bad", "ips": ["10.1.2.4"]}
        assert (await _ask(sock, other))["pod"]["capture"]["ok"] is False
        listed = (await _ask(sock, {"op": "list"}))["pods"]
        assert {k: v["capture"]["ok"] for k, v in listed.items()} == {
            "shop/echo-1": True,
            "shop/echo-2": False,
        }
        answer = await _ask(sock, {"op": "unenrol", "namespace": "shop", "name": "echo-2"})
        assert answer["pod"]["enrolled"] is False and "capture" in answer["pod"]
        assert ("shop/echo-2", False) in seen
        removed = await _ask(sock, {"op": "remove_pod", "namespace": "shop", "name": "echo-2"})
        assert removed["pod"] is None
    finally:
        await svc.close()
    # The status is computed for each answer, never stored.
    assert all("capture" not in rec for rec in json.loads(state.read_text()).values())
