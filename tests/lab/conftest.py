"""Fixtures for kernel-lab tests: a fresh namespace topology per test, stand-in agents, pod apps.

The stand-in agent is this file run as a script inside a node namespace (`ip netns exec`, as
the real agent is started): three IP_TRANSPARENT listeners plus `ztunnel.capture.Capture`,
driven by JSON lines on stdin. Every server here answers each line it receives with one JSON
line saying who answered and what getsockname()/getpeername() were, so a test can see where
a connection really landed.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

IP_TRANSPARENT = 19  # SOL_IP option, include/uapi/linux/in.h
LISTENER_PORTS = {"outbound": 15001, "inbound": 15006, "hbone": 15008}
APP_PORT = 8080
# Waits (never expectations) stretch by ZTUNNEL_LAB_TIME_SCALE, which scripts/kernel-vm.sh
# sets when the kernel under test runs emulated (TCG), where a bcc compile takes minutes.
TIME_SCALE = max(1.0, float(os.environ.get("ZTUNNEL_LAB_TIME_SCALE") or 1))
READY_TIMEOUT = 60.0 * TIME_SCALE  # compiling with bcc takes about a second; room for slow CI
REQUEST_TIMEOUT = 20.0 * TIME_SCALE
IO_TIMEOUT = 3.0 * TIME_SCALE
LINE_MARK = "@@ "  # stdout lines of the agent protocol; anything else (warnings) is ignored


# --- the line protocol shared by the stand-in agent and the pod apps -----------------------


def _answer_lines(conn: socket.socket, describe: Callable[[], dict[str, Any]]) -> None:
    """Answers every received line with one JSON line: `describe()` plus the line itself."""
    with conn, conn.makefile("rwb") as stream:
        for raw in stream:
            reply = describe() | {"data": raw.decode().rstrip("\n")}
            stream.write(json.dumps(reply).encode() + b"\n")
            stream.flush()


def _serve(listener: socket.socket, describe: Callable[[socket.socket], dict[str, Any]]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # listener closed
        conn.settimeout(30)
        threading.Thread(
            target=_answer_lines,
            args=(conn, lambda c=conn: describe(c)),
            name="answer",
            daemon=True,
        ).start()


def _endpoints(conn: socket.socket) -> dict[str, Any]:
    local = conn.getsockname()
    peer = conn.getpeername()
    return {"local": [local[0], local[1]], "peer": [peer[0], peer[1]]}


def exchange(sock: socket.socket, text: str) -> dict[str, Any]:
    """Sends one line and returns the server's JSON answer."""
    sock.sendall(text.encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed by peer after {buf!r}")
        buf += chunk
    answer: dict[str, Any] = json.loads(buf)
    return answer


# --- the stand-in agent (runs as a script in a node namespace) -----------------------------


def _transparent_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(64)
    return sock


def _spoofed_dial(src: str, dst: str, port: int, text: str) -> dict[str, Any]:
    """What the agent does on the inbound path: connect to a pod from the client's address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((src, 0))
        sock.settimeout(IO_TIMEOUT)
        sock.connect((dst, port))
        return exchange(sock, text)


def agent_main(config: dict[str, Any]) -> None:
    from ztunnel.capture import Capture, CaptureConfig, FailMode, PodEnrolment

    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(LINE_MARK + json.dumps(obj) + "\n")
        out.flush()

    node = config["node"]
    listeners = {key: _transparent_listener(port) for key, port in LISTENER_PORTS.items()}
    capture = Capture(
        CaptureConfig(
            node_addresses=tuple(ipaddress.IPv4Address(a) for a in config["node_addresses"]),
            uplink_ifname=config["uplink"],
            pin_dir=Path(config["pin_dir"]),
            fail_mode=FailMode(config["fail_mode"]),
            attach=config["attach"],
            tc_priority=config["tc_priority"],
            allow_ahead=tuple(config["allow_ahead"]),
        )
    )
    capture.start({key: sock.fileno() for key, sock in listeners.items()})
    for ifname in config["pod_ifnames"]:
        capture.attach_pod_interface(ifname)
    for key, sock in listeners.items():

        def describe(conn: socket.socket, key: str = key) -> dict[str, Any]:
            return {"who": "agent", "node": node, "pid": os.getpid(), "listener": key} | (
                _endpoints(conn)
            )

        threading.Thread(target=_serve, args=(sock, describe), daemon=True).start()
    report = capture.load_report
    assert report is not None
    emit(
        {
            "event": "ready",
            "pid": os.getpid(),
            "enrolled": _enrolled(capture),
            "program_ids": dict(report.program_ids),
            "maps_reused": list(report.maps_reused),
            "mode": capture.mode.value if capture.mode else None,
            "hooks": _hooks(capture),
        }
    )

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            if op == "enrol" or op == "unenrol":
                pod = PodEnrolment(
                    namespace="lab",
                    name=cmd["name"],
                    host_ifname=cmd["host_ifname"],
                    ips=tuple(ipaddress.ip_address(ip) for ip in cmd["ips"]),
                )
                (capture.enrol if op == "enrol" else capture.unenrol)(pod)
                emit({"ok": True, "enrolled": _enrolled(capture)})
            elif op == "enrolled":
                emit({"ok": True, "enrolled": _enrolled(capture)})
            elif op == "check":  # one pass over the hooks, optionally at a given clock
                capture.check(cmd.get("now"))
                emit({"ok": True, "hooks": _hooks(capture), "unsafe": _unsafe(capture)})
            elif op == "pod_capture":
                answer = capture.pod_capture(cmd["host_ifname"], cmd.get("enrolled", True))
                emit({"ok": True, "capture": answer.to_json()})
            elif op == "loaded":
                emit({"ok": True, "bcc_imported": "bcc" in sys.modules})
            elif op == "dial":
                emit(
                    {"ok": True, "answer": _spoofed_dial(cmd["src"], cmd["dst"], cmd["port"], "x")}
                )
            elif op == "close":
                capture.close(keep_pins=cmd["keep_pins"])
                emit({"ok": True})
                return
            else:
                emit({"ok": False, "error": f"unknown op {op}"})
        except Exception as exc:
            emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    capture.close()


def _enrolled(capture: Any) -> list[str]:
    return sorted(str(ip) for ip in capture.enrolled())


def _hooks(capture: Any) -> dict[str, Any]:
    return {name: st.to_json() for name, st in capture.statuses().items()}


def _unsafe(capture: Any) -> dict[str, Any]:
    maps = capture._maps()
    return {
        "addresses": sorted(str(ip) for ip in maps.unsafe()),
        "guard_flags": maps.guard_flags(),
    }


# --- test-side handles ---------------------------------------------------------------------


class Agent:
    """A running stand-in agent process in a node namespace, talked to over stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[str], stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()
        self.ready = self._next(READY_TIMEOUT)
        self.pid: int = self.ready["pid"]

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            if line.startswith(LINE_MARK):
                self._lines.put(json.loads(line[len(LINE_MARK) :]))
        self._lines.put(None)  # EOF: the process is gone

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            item = self._lines.get(timeout=timeout)
        except queue.Empty:
            item = None
        if item is None:
            raise AssertionError(f"agent {self.proc.pid} did not answer:\n{self.stderr()}")
        return item

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-4000:]
        except OSError:
            return ""

    def request(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self._next(REQUEST_TIMEOUT)
        assert answer.get("ok"), f"{cmd} failed: {answer}\n{self.stderr()}"
        return answer

    def kill(self) -> None:
        """SIGKILL, like a crash: the kernel closes the listeners, emptying the sockmap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


class PodApp:
    """A line-answering server inside a pod namespace (the 'application' of a pod)."""

    def __init__(self, topology: Any, pod_name: str, port: int = APP_PORT) -> None:
        from ztunnel.lab.topology import call_in_netns

        pod = topology.pod(pod_name)
        self.pod = pod
        self.port = port
        self.listener = call_in_netns(
            pod.netns, lambda: socket.create_server((str(pod.ip), port), reuse_port=False)
        )

        def describe(conn: socket.socket) -> dict[str, Any]:
            return {"who": "pod", "pod": pod.name} | _endpoints(conn)

        threading.Thread(target=_serve, args=(self.listener, describe), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class Lab:
    """One test's topology with helpers to start agents and apps and to make connections."""

    exchange = staticmethod(exchange)

    def __init__(self, topology: Any, tmp_path: Path) -> None:
        self.topology = topology
        self.tmp_path = tmp_path
        self.agents: list[Agent] = []
        self.apps: list[PodApp] = []
        self.sockets: list[socket.socket] = []

    def start_agent(
        self,
        node_name: str,
        fail_mode: str = "closed",
        attach: str = "auto",
        tc_priority: int = 1,
        allow_ahead: tuple[str, ...] = (),
    ) -> Agent:
        from ztunnel.lab.topology import popen_in_netns

        node = self.topology.node(node_name)
        config = {
            "node": node.name,
            "node_addresses": [str(node.ip)],
            "uplink": node.uplink_ifname,
            "pin_dir": str(node.pin_dir),
            "fail_mode": fail_mode,
            "pod_ifnames": [pod.host_ifname for pod in node.pods],
            "attach": attach,
            "tc_priority": tc_priority,
            "allow_ahead": list(allow_ahead),
        }
        stderr_path = self.tmp_path / f"agent-{node.name}-{len(self.agents)}.stderr"
        with open(stderr_path, "w") as stderr:
            proc = popen_in_netns(
                node.netns,
                [sys.executable, str(Path(__file__).resolve()), "agent", json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        agent = Agent(proc, stderr_path)
        self.agents.append(agent)
        return agent

    def app(self, pod_name: str, port: int = APP_PORT) -> PodApp:
        app = PodApp(self.topology, pod_name, port)
        self.apps.append(app)
        return app

    def connect(self, netns: str, ip: Any, port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
        """A TCP connection made from inside `netns` (a pod's or a node's)."""
        from ztunnel.lab.topology import call_in_netns

        sock = call_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.sockets.append(sock)
        sock.settimeout(timeout)
        sock.connect((str(ip), port))
        return sock

    def ask(self, from_pod: str, ip: Any, port: int = APP_PORT) -> dict[str, Any]:
        """Connects from a pod, exchanges one line, and returns who answered."""
        sock = self.connect(self.topology.pod(from_pod).netns, ip, port)
        try:
            return exchange(sock, "hello")
        finally:
            sock.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for app in self.apps:
            app.close()
        for agent in self.agents:
            agent.kill()


ATTACH_MODES = ("tcx", "cls_bpf")


@functools.cache
def kernel_has_tcx() -> bool:
    """Whether this kernel has tcx (6.6+): a read-only BPF_PROG_QUERY on the loopback."""
    from ztunnel.capture import syscalls

    return syscalls.has_tcx(socket.if_nametoindex("lo"))


def require_attach_mode(mode: str) -> str:
    """Skips a tcx test only where the kernel has no tcx; cls_bpf always runs."""
    if mode == "tcx" and not kernel_has_tcx():
        pytest.skip(
            f"kernel {os.uname().release} has no tcx (Linux 6.6+): the tcx path cannot run"
            " here; the cls_bpf variant of this test covers this kernel"
        )
    return mode


@pytest.fixture(params=ATTACH_MODES)
def attach_mode(request: pytest.FixtureRequest) -> str:
    """Each attach mode explicitly: tcx (skipped without tcx) and cls_bpf (always, also on
    a tcx kernel, where it is forced with CaptureConfig.attach)."""
    return require_attach_mode(str(request.param))


def hook_prog_ids(netns: str, ifname: str, direction: str = "ingress") -> list[int]:
    """Program ids on a hook in run order: the tcx chain (if any), then the tc filters."""
    from ztunnel.capture import syscalls
    from ztunnel.lab.topology import call_in_netns

    ids: list[int] = []
    if kernel_has_tcx():
        kind = syscalls.BPF_TCX_INGRESS if direction == "ingress" else syscalls.BPF_TCX_EGRESS
        chain = call_in_netns(
            netns, lambda: syscalls.tcx_query(socket.if_nametoindex(ifname), kind)
        )
        ids += chain.prog_ids
    out = subprocess.run(
        ["tc", "-n", netns, "filter", "show", "dev", ifname, direction],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    words = out.split()
    ids += [int(words[i + 1]) for i, word in enumerate(words[:-1]) if word == "id"]
    return ids


@pytest.fixture
def make_cni() -> Iterator[Callable[[Any], Any]]:
    """Compiles the stand-in primary-CNI programs for a topology (tests/lab/primary_cni.py);
    closed (their tcx links detached) after the test."""
    from tests.lab.primary_cni import PrimaryCni

    made: list[PrimaryCni] = []

    def make(topology: Any) -> PrimaryCni:
        made.append(PrimaryCni(topology))
        return made[-1]

    try:
        yield make
    finally:
        for cni in made:
            cni.close()


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[[int, int], Lab]]:
    """Creates fresh labs on demand; each is always torn down (teardown is idempotent)."""
    if os.geteuid() != 0:
        pytest.fail("kernel lab tests need root (see shared/PLATFORM.md)")
    from ztunnel.lab import topology

    labs: list[Lab] = []

    def make(nodes: int = 2, pods_per_node: int = 2) -> Lab:
        topo = topology.create(nodes=nodes, pods_per_node=pods_per_node)
        labs.append(Lab(topo, tmp_path / topo.lab_id))
        labs[-1].tmp_path.mkdir()
        return labs[-1]

    try:
        yield make
    finally:
        for handle in labs:
            try:
                handle.close()
            finally:
                topology.teardown(handle.topology.prefix)


@pytest.fixture
def lab(make_lab: Callable[[int, int], Lab]) -> Lab:
    """A fresh 2-node, 2-pods-per-node topology, always torn down."""
    return make_lab(2, 2)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "agent":
        sys.exit("usage: conftest.py agent <json config>")
    agent_main(json.loads(sys.argv[2]))
