"""The agent's side of multi-process serving: its own process is worker 0 and everything
node-wide (mesh state from the file or istiod, the certificate manager, the eBPF capture and
enrolment socket, admin/metrics/readiness); it starts workers 1..N-1 with their listener
sockets, pushes every mesh snapshot to them, issues their certificates, merges their metrics
and connections into its endpoints, restarts a crashed worker with backoff, and drains them
with itself.

Listener sockets are created here, N per transparent port in one SO_REUSEPORT group (or one
socket shared by all, `plan.sharing == "shared"`), and stay open in this process for the
agent's lifetime: a worker that crashes leaves its socket, and the connections queued on it,
to its replacement instead of emptying the capture's sockmap slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ztunnel.config import Settings
from ztunnel.errors import ZtunnelError
from ztunnel.identity import SpiffeId
from ztunnel.proxy.sockets import listen
from ztunnel.state import MeshState
from ztunnel.workers.channel import Channel, ChannelError, Message, encode
from ztunnel.workers.metrics import merge_families, monotonic_part
from ztunnel.workers.plan import (
    SHARED_KINDS,
    RestartBackoff,
    WorkerPlan,
    available_cpus,
    plan_workers,
    primary_settings,
    worker_settings,
)

if TYPE_CHECKING:
    from ztunnel.app import Agent

log = logging.getLogger("ztunnel.workers")

# Tests only: run the pre-6.5 fallback (one shared accept queue) on a newer kernel.
SHARING_OVERRIDE = "ZTUNNEL_TEST_WORKERS_SHARING"
LIVE_WINDOW = 30.0  # workers include live connections this long after a /config_dump
EXIT_GRACE = 5.0  # beyond the drain timeout, before a worker that has not exited is killed


def state_message(state: MeshState) -> Message:
    """A mesh snapshot as sent to workers (the indexes are rebuilt there)."""
    return ("state", state.workloads, state.services, state.policies)


def _probe_free(ip: str, port: int, transparent: bool) -> None:
    """Fail like a plain listener would if someone already listens on (ip, port): a group of
    SO_REUSEPORT sockets would otherwise silently join a leftover agent's listeners."""
    probe = listen(ip, port, transparent)
    probe.close()


class ListenerGroups:
    """The agent's listen hook: the transparent listeners as groups, one socket per worker."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.groups: dict[str, list[socket.socket]] = {}

    def listen(self, kind: str, ip: str, port: int, transparent: bool) -> socket.socket:
        if kind not in SHARED_KINDS or not transparent:
            return listen(ip, port, transparent)
        if self.plan.sharing == "shared":
            sock = listen(ip, port, transparent)
            self.groups[kind] = [sock] * self.plan.count
            return sock
        _probe_free(ip, port, transparent)
        socks: list[socket.socket] = []
        try:
            for _ in range(self.plan.count):
                socks.append(listen(ip, port, transparent, reuseport=True))
        except OSError:
            for s in socks:
                s.close()
            raise
        self.groups[kind] = socks
        return socks[0]

    def fds(self, index: int) -> dict[str, int]:
        return {kind: socks[index].fileno() for kind, socks in self.groups.items()}

    def close(self) -> None:
        """Close the workers' sockets (index 0 is the agent's own: closed by its drain)."""
        for socks in self.groups.values():
            for s in {id(s): s for s in socks[1:] if s is not socks[0]}.values():
                with contextlib.suppress(OSError):
                    s.close()


@dataclass
class Worker:
    index: int
    pid: int = 0
    channel: Channel | None = None
    ready: bool = False
    ever_ready: bool = False
    started: float = 0.0
    restarts: int = 0
    families: list[Metric] = field(default_factory=list)
    connections: dict[str, Any] = field(default_factory=dict)


class WorkerPool:
    """Workers 1..N-1 of one agent (worker 0 is the agent's own process)."""

    def __init__(self, agent: Agent, plan: WorkerPlan, groups: ListenerGroups, child: Settings):
        self.agent = agent
        self.plan = plan
        self.groups = groups
        self.child_settings = child
        self.workers = {i: Worker(i) for i in range(1, plan.count)}
        self.retired: list[Metric] = []
        self.restarts = 0
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._state_dirty = False
        self._watched: set[SpiffeId] = set()
        self._live_until = 0.0
        agent.registry.register(_PoolCollector(self))

    # ---- lifecycle ----

    def start(self) -> None:
        self.agent.store.subscribe(lambda old, new: self._state_changed())
        for index in self.workers:
            self._spawn(self._supervise(index), f"worker-{index}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, index: int) -> None:
        """Run worker `index`; restart it with backoff whenever it exits before the drain."""
        w = self.workers[index]
        backoff = RestartBackoff()
        loop = asyncio.get_running_loop()
        while not self.draining:
            w.started = loop.time()
            try:
                rc = await self._life(w)
            except (OSError, ChannelError) as e:
                rc = None
                log.error("worker %d failed: %s", index, e)
            if self.draining:
                return
            delay = backoff.next_delay(loop.time() - w.started)
            self.restarts += 1
            w.restarts += 1
            self.retired = merge_families([self.retired, monotonic_part(w.families)])
            w.families, w.connections, w.ready = [], {}, False
            log.error(
                "worker %d (pid %d) exited with %s after %.1fs; restart %d in %.1fs",
                index,
                w.pid,
                _describe_rc(rc),
                loop.time() - w.started,
                w.restarts,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _life(self, w: Worker) -> int | None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = self.groups.fds(w.index)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ztunnel.workers.child",
                str(child.fileno()),
                pass_fds=(child.fileno(), *fds.values()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        w.pid = proc.pid
        ch = w.channel = await Channel.open(parent)
        ctx = self.agent.ctx
        node_ip = str(ctx.node_ip) if ctx.node_ip is not None else ""
        ch.send(("hello", w.index, self.child_settings, fds, node_ip, ctx.local_dial_mark))
        ch.send(state_message(self.agent.store.current))
        if self.draining:  # the drain began while this one was starting
            ch.send(("drain", self.child_settings.drain_timeout))
        if time.monotonic() < self._live_until:
            ch.send(("live", True))
        try:
            while (msg := await ch.receive()) is not None:
                self._handle(w, msg)
        except ChannelError as e:
            log.error("worker %d (pid %d): control channel: %s; stopping it", w.index, w.pid, e)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            ch.close()
            w.channel = None
        try:
            return await asyncio.wait_for(proc.wait(), EXIT_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await proc.wait()

    def _handle(self, w: Worker, msg: Message) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = w.ever_ready = True
            log.info("worker %d (pid %d) serving", w.index, w.pid)
        elif kind == "stats" and len(msg) == 3:
            w.families = list(msg[1])
            w.connections = dict(msg[2])
        elif kind == "cert" and len(msg) == 3:
            self._spawn(self._issue(w, int(msg[1]), str(msg[2])), f"worker-{w.index}-cert")
        else:
            log.warning("worker %d sent an unknown message %r; ignored", w.index, kind)

    async def _issue(self, w: Worker, request: int, uri: str) -> None:
        """A worker's certificate: from the agent's one certificate manager (cached, renewed
        and counted once for the node), so istiod's CA sees one client per node."""
        try:
            ident = SpiffeId.parse(uri)
            cert = await self.agent.certs.get(ident)
        except ZtunnelError as e:
            reply: Message = ("cert", request, None, str(e))
        else:
            reply = ("cert", request, cert, None)
            if ident not in self._watched:
                self._watched.add(ident)
                self.agent.certs.on_renewed(ident, lambda c: self.broadcast(("roots", c.roots_pem)))
        if w.channel is not None:
            w.channel.send(reply)

    def _state_changed(self) -> None:
        """Coalesce bursts of updates (xDS deltas) into one snapshot per loop iteration."""
        if not self._state_dirty:
            self._state_dirty = True
            asyncio.get_running_loop().call_soon(self._push_state)

    def _push_state(self) -> None:
        self._state_dirty = False
        self.broadcast(state_message(self.agent.store.current))

    def broadcast(self, message: Message) -> None:
        frame = encode(message)
        for w in self.workers.values():
            if w.channel is not None:
                w.channel.send_encoded(frame)

    async def drain(self, grace: float) -> None:
        """The agent's drain: every worker drains with the same grace; then they exit."""
        self.draining = True
        self._stop.set()
        self.broadcast(("drain", grace))
        tasks = list(self._tasks)
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace + 2 * EXIT_GRACE)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.groups.close()

    # ---- what the endpoints show ----

    def snapshots(self) -> list[list[Metric]]:
        return [self.retired, *(w.families for w in self.workers.values())]

    def pending(self) -> list[str]:
        """Readiness: every worker has served once (a later restart does not flip readiness:
        the others serve, and the restarting one's socket keeps its queue)."""
        return [f"worker {w.index}: starting" for w in self.workers.values() if not w.ever_ready]

    def set_log_level(self, level: str) -> None:
        self.broadcast(("log-level", level))

    def extend_dump(self, dump: dict[str, Any]) -> None:
        """/config_dump: the workers, and their connections added to the agent's own."""
        self._live_until = time.monotonic() + LIVE_WINDOW
        self.broadcast(("live", True))
        conns = dump.get("connections")
        for w in self.workers.values():
            if isinstance(conns, dict) and w.connections:
                for key, n in w.connections.get("counts", {}).items():
                    conns["counts"][key] = conns["counts"].get(key, 0) + n
                conns["total_opened"] += w.connections.get("total_opened", 0)
                conns["live"] += [c | {"worker": w.index} for c in w.connections.get("live", [])]
        dump["workers"] = {
            "count": self.plan.count,
            "sharing": self.plan.sharing,
            "restarts": self.restarts,
            "processes": [
                {
                    "index": 0,
                    "pid": os.getpid(),
                    "ready": True,
                    "restarts": 0,
                    "total_opened": self.agent.tracker.total_opened,
                }
            ]
            + [
                {
                    "index": w.index,
                    "pid": w.pid,
                    "ready": w.ready,
                    "restarts": w.restarts,
                    "total_opened": w.connections.get("total_opened", 0),
                }
                for w in self.workers.values()
            ],
        }


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        ready = 1 + sum(1 for w in self.pool.workers.values() if w.ready)
        yield GaugeMetricFamily(
            "ztunnel_workers",
            "Worker processes configured (the agent's own included)",
            value=self.pool.plan.count,
        )
        yield GaugeMetricFamily(
            "ztunnel_workers_ready", "Worker processes serving now", value=ready
        )
        yield CounterMetricFamily(
            "ztunnel_worker_restarts",
            "Crashed worker processes restarted",
            value=self.pool.restarts,
        )


def _describe_rc(rc: int | None) -> str:
    if rc is None:
        return "unknown status"
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


async def run_workers(settings: Settings) -> int | None:
    """`ztunnel run` with workers: None when one process it is (the caller runs the agent as
    before), else run the agent and its workers until SIGTERM/SIGINT; the exit code."""
    plan = plan_workers(settings, available_cpus(), os.uname().release)
    if plan.multi and os.environ.get(SHARING_OVERRIDE) == "shared":
        plan = replace(plan, sharing="shared", reason=plan.reason + f" ({SHARING_OVERRIDE})")
    log.info("workers: %s", plan.reason)
    if not plan.multi:
        return None
    from ztunnel.admin import HttpEndpoints
    from ztunnel.app import Agent, AgentParts
    from ztunnel.workers.metrics import AggregatingRegistry

    groups = ListenerGroups(plan)
    parts = AgentParts(listen=groups.listen)
    agent = Agent(primary_settings(settings, plan.count), parts)
    pool = WorkerPool(agent, plan, groups, worker_settings(settings, plan.count))
    parts.on_drain.append(pool.drain)
    agent.workers = pool
    agent.http = HttpEndpoints(agent, AggregatingRegistry(agent.registry, pool.snapshots))
    try:
        agent.load_state()
        await agent.start()
    except BaseException:
        groups.close()
        raise
    pool.start()
    await agent.run_until_signalled()
    return 0
