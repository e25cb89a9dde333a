"""The node agent's enrolment API: which pods' traffic is captured.

A Unix socket speaking one JSON object per line each way. The lab drives it now; the CNI
plugin calls it when pods come and go. Requests (all idempotent):

  {"op": "add_pod", "namespace": N, "name": P, "ifname": VETH, "ips": [...], "enrol": bool}
      attach the capture program to the pod's host-side veth; enrol it if asked.
      Optional: "uid" (the pod's uid, kept in the record), "netns" + "pod_ifname" (the pod's
      network namespace path and interface): with them "ifname" may be empty and the agent
      finds the host side from the pod interface's veth peer. A record holding any of the
      same IPs under another name belongs to a pod that is gone (IPs are reused): removed.
      A failed add_pod leaves nothing behind (no half-enrolled pod).
  {"op": "enrol", ...same fields}        enrol (and attach) a pod
  {"op": "unenrol", "namespace": N, "name": P}   stop capturing it (program stays attached)
  {"op": "remove_pod", "namespace": N, "name": P}  unenrol and detach (pod deleted)
  {"op": "list"}                         the enrolled pods

Answers: {"ok": true, ...} or {"ok": false, "error": "...what and why"}. Parsing is pure
(`parse_request`); a bad request gets an error answer and never affects other pods.
Every pod record in an answer (`list`, and `pod` of the others) carries
`"capture": {"ok": bool, "detail": str}`: whether the pod's traffic is safely captured
(nothing runs ahead of ztunnel's programs on its hooks, or the operator accepted it) and,
if not, what was found and how to fix it (`pod_status`, set by the kernel capture). A
controller marks a pod `ambient.istio.io/redirection: enabled` only when `ok` is true.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.model import IPAddress

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
# The capture member of a pod record when the backend does not report capture safety.
CAPTURE_UNKNOWN = {"ok": False, "detail": "capture safety is not reported by this backend"}
REQUEST_TIMEOUT = 30.0
OPS = ("add_pod", "enrol", "unenrol", "remove_pod", "list")


class EnrolmentError(ZtunnelError):
    """A request could not be carried out; the message says why."""


@dataclass(frozen=True, slots=True)
class PodRequest:
    op: str
    namespace: str = ""
    name: str = ""
    ifname: str = ""
    ips: tuple[IPAddress, ...] = ()
    enrol: bool = False
    uid: str = ""
    netns: str = ""
    pod_ifname: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_request(line: bytes) -> PodRequest:
    """One request line -> PodRequest; ConfigError names the bad field."""
    src = "enrolment request"
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # RecursionError: a line of nested brackets (json's C decoder stops at the
        # interpreter's recursion limit).
        raise ConfigError(src, "", f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(src, "", "expected a JSON object")
    op = obj.get("op")
    if op not in OPS:
        raise ConfigError(src, "op", f"must be one of {', '.join(OPS)}, got {op!r}")
    if op == "list":
        return PodRequest("list")
    fields: dict[str, str] = {}
    for f in ("namespace", "name"):
        v = obj.get(f)
        if not isinstance(v, str) or not v:
            raise ConfigError(src, f, "a non-empty string is required")
        fields[f] = v
    ifname = obj.get("ifname", "")
    extra: dict[str, str] = {}
    for f in ("uid", "netns", "pod_ifname"):
        v = obj.get(f, "")
        if not isinstance(v, str) or len(v) > 4096:
            raise ConfigError(src, f, "must be a string")
        extra[f] = v
    if extra["netns"] and not extra["netns"].startswith("/"):
        raise ConfigError(src, "netns", "must be an absolute path (CNI_NETNS)")
    if extra["pod_ifname"] and len(extra["pod_ifname"]) > 15:
        raise ConfigError(src, "pod_ifname", "an interface name of 1-15 characters is required")
    ips: list[IPAddress] = []
    if op in ("add_pod", "enrol"):
        can_resolve = bool(extra["netns"] and extra["pod_ifname"])
        if not isinstance(ifname, str) or len(ifname) > 15 or (not ifname and not can_resolve):
            raise ConfigError(
                src,
                "ifname",
                "an interface name of 1-15 characters is required (or netns and pod_ifname)",
            )
        raw_ips = obj.get("ips")
        if not isinstance(raw_ips, list) or not raw_ips:
            raise ConfigError(src, "ips", "a non-empty list of IP addresses is required")
        for i, v in enumerate(raw_ips):
            try:
                ips.append(ipaddress.ip_address(v))
            except (ValueError, TypeError):
                raise ConfigError(src, f"ips[{i}]", f"not an IP address: {v!r}") from None
    enrol = obj.get("enrol", op == "enrol")
    if not isinstance(enrol, bool):
        raise ConfigError(src, "enrol", "must be true or false")
    return PodRequest(
        op, fields["namespace"], fields["name"], str(ifname), tuple(ips), enrol, **extra
    )


class CaptureBackend(Protocol):
    """What the service needs from the capture layer (blocking calls, run in one thread)."""

    def attach_pod(self, req: PodRequest) -> None: ...

    def enrol(self, req: PodRequest) -> None: ...

    def unenrol(self, req: PodRequest) -> None: ...

    def detach_pod(self, req: PodRequest) -> None: ...

    def resolve_host_ifname(self, req: PodRequest) -> str:
        """The host side of the pod's veth, from `req.netns` and `req.pod_ifname`."""
        ...


class EnrolmentService:
    """Serves the enrolment socket; remembers pods in a JSON file so restarts keep names."""

    def __init__(self, backend: CaptureBackend, socket_path: str, state_file: str) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self.state_file = Path(state_file)
        self.pods: dict[str, dict[str, Any]] = {}
        # (key, stored record) -> the record's "capture" member; see the module docstring.
        self.pod_status: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
        # One thread: the capture layer's netlink and bpf calls must not run concurrently.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture")
        self._server: asyncio.AbstractServer | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
            if isinstance(data, dict):
                self.pods = {k: v for k, v in data.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("enrolment state %s unreadable, starting empty: %s", self.state_file, e)

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pods, indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

    async def start(self) -> None:
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(path), limit=MAX_LINE)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket_path).unlink()
        self._executor.shutdown(wait=True)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(r.readline(), REQUEST_TIMEOUT)
                except (ValueError, asyncio.LimitOverrunError):
                    w.write(b'{"ok": false, "error": "request line too long"}\n')
                    return
                if not line:
                    return
                answer = await self.execute_line(line)
                w.write(json.dumps(answer).encode() + b"\n")
                await w.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def execute_line(self, line: bytes) -> dict[str, Any]:
        try:
            req = parse_request(line)
        except ConfigError as e:
            return {"ok": False, "error": str(e)}
        try:
            return await self.execute(req)
        except ZtunnelError as e:
            log.warning("enrolment %s %s failed: %s", req.op, req.key, e)
            return {"ok": False, "error": str(e)}

    async def execute(self, req: PodRequest) -> dict[str, Any]:
        loop = asyncio.get_running_loop()

        async def call(fn: Any, arg: PodRequest) -> None:
            await loop.run_in_executor(self._executor, fn, arg)

        if req.op == "list":
            return {"ok": True, "pods": {k: self._view(k, v) for k, v in self.pods.items()}}
        known = self.pods.get(req.key)
        if req.op in ("add_pod", "enrol"):
            if not req.ifname:
                ifname = await loop.run_in_executor(
                    self._executor, self.backend.resolve_host_ifname, req
                )
                req = dataclasses.replace(req, ifname=ifname)
            enrolled = req.enrol or req.op == "enrol"
            try:
                await call(self.backend.attach_pod, req)
                if enrolled:
                    await call(self.backend.enrol, req)
                elif known and known.get("enrolled"):
                    await call(self.backend.unenrol, self._stored(req.key, known))
            except BaseException:
                # Nothing half-enrolled: undo what this request may have done.
                await self._undo(req, known)
                raise
            for other in self._holders_of(req):
                # Same IP under another name: that pod is gone and its IP was reused.
                log.info("enrolment: %s replaces %s (same IP)", req.key, other)
                stale = self._stored(other, self.pods.pop(other))
                keep = set(req.ips) if enrolled else set()
                await call(
                    self.backend.unenrol,
                    dataclasses.replace(stale, ips=tuple(i for i in stale.ips if i not in keep)),
                )
                if stale.ifname != req.ifname:
                    await call(self.backend.detach_pod, stale)
            self.pods[req.key] = {
                "ifname": req.ifname,
                "ips": [str(i) for i in req.ips],
                "enrolled": enrolled,
            }
            if req.uid:
                self.pods[req.key]["uid"] = req.uid
        elif req.op == "unenrol":
            if known is not None:
                await call(self.backend.unenrol, self._stored(req.key, known))
                known["enrolled"] = False
        elif req.op == "remove_pod" and known is not None:
            stored = self._stored(req.key, known)
            await call(self.backend.unenrol, stored)
            await call(self.backend.detach_pod, stored)
            del self.pods[req.key]
        self._save()
        log.info("enrolment: %s %s", req.op, req.key)
        return {"ok": True, "pod": self._view(req.key, self.pods.get(req.key))}

    def _view(self, key: str, rec: dict[str, Any] | None) -> dict[str, Any] | None:
        """A stored pod record as answered: with its (never stored) capture status."""
        if rec is None:
            return None
        status = self.pod_status(key, rec) if self.pod_status else dict(CAPTURE_UNKNOWN)
        return {**rec, "capture": status}

    def _holders_of(self, req: PodRequest) -> list[str]:
        ips = {str(i) for i in req.ips}
        return [k for k, rec in self.pods.items() if k != req.key and ips & set(rec.get("ips", []))]

    async def _undo(self, req: PodRequest, known: dict[str, Any] | None) -> None:
        loop = asyncio.get_running_loop()
        # Addresses another record holds enrolled stay enrolled (that pod is not ours to undo).
        held = {
            ip
            for k, rec in self.pods.items()
            if k != req.key and rec.get("enrolled")
            for ip in rec.get("ips", [])
        }
        mine = dataclasses.replace(req, ips=tuple(i for i in req.ips if str(i) not in held))
        try:
            await loop.run_in_executor(self._executor, self.backend.unenrol, mine)
            if known is None:
                await loop.run_in_executor(self._executor, self.backend.detach_pod, req)
                self.pods.pop(req.key, None)
            else:
                known["enrolled"] = False
            self._save()
        except (ZtunnelError, OSError) as e:
            log.warning("enrolment: undoing %s %s failed: %s", req.op, req.key, e)

    @staticmethod
    def _stored(key: str, rec: dict[str, Any]) -> PodRequest:
        ns, _, name = key.partition("/")
        return PodRequest(
            "stored",
            ns,
            name,
            str(rec.get("ifname", "")),
            tuple(ipaddress.ip_address(i) for i in rec.get("ips", [])),
        )


def request(socket_path: str, obj: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Client side (lab, CNI plugin): one request, one answer; EnrolmentError on failure."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(json.dumps(obj).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise EnrolmentError(f"node agent at {socket_path} is not reachable: {e}") from None
    try:
        answer = json.loads(buf)
    except ValueError:
        raise EnrolmentError(
            f"node agent at {socket_path} sent a bad answer: {buf[:200]!r}"
        ) from None
    if not isinstance(answer, dict):
        raise EnrolmentError("bad answer from the node agent")
    if not answer.get("ok"):
        raise EnrolmentError(str(answer.get("error", "request failed")))
    return answer
