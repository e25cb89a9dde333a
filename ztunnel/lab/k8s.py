"""The Kubernetes mode of the namespace lab: a cluster made of the lab's nodes.

What runs (everything in the lab's own namespaces, or on loopback):
- the API server stand-in (`kubeapi`, in this process) listening on node n0's address
  (10.77.0.1:6443, like a control-plane node) and on 127.0.0.1 for kubectl on the host;
- per node: the agent (`ztunnel run --capture ebpf`), `ztunnel-cni install` (puts the
  plugin into the node's CNI bin dir and chains it after the primary CNI), the enrolment
  controller (`ztunnel-cni controller`), and a kubelet stand-in (a thread here) that starts
  pods bound to the node: a network namespace, the CNI chain run exactly as a runtime does
  (CNI_* env, config on stdin, prevResult passed along, DEL in reverse; real `ptp` or
  `bridge` + `host-local` from /usr/lib/cni, then `ztunnel-cni`), the app, the pod status;
- an istiod stand-in (a thread here): rewrites the agents' mesh file from the API's objects
  (`meshgen`) whenever they change; the agents reload it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from ztunnel.ca import CertificateAuthority
from ztunnel.lab import image as lab_image
from ztunnel.lab import meshgen, runner
from ztunnel.lab import topology as topo
from ztunnel.lab.kubeapi import BY_PATH, ApiError, KubeApiServer, ObjectStore, Selector
from ztunnel.lab.topology import LabError, NodeSpec, PodSpec, Topology

log = logging.getLogger(__name__)

API_PORT = 6443
CNI_BIN_DIR = Path("/usr/lib/cni")
NETWORK_NAME = "lab-pods"
POD_IFNAME = "eth0"
ADD_TIMEOUT = 60.0
SYSTEM_NAMESPACE = "istio-system"
NS = BY_PATH[("", "v1", "namespaces")]
PODS = BY_PATH[("", "v1", "pods")]
SERVICES = BY_PATH[("", "v1", "services")]
NODES = BY_PATH[("", "v1", "nodes")]
DAEMONSETS = BY_PATH[("apps", "v1", "daemonsets")]


def primary_conflist(cni: str, node: NodeSpec, ipam_dir: Path) -> dict[str, Any]:
    """The node's primary CNI configuration (what a cluster's network add-on would write)."""
    ipam = {
        "type": "host-local",
        "dataDir": str(ipam_dir),
        "ranges": [
            [{"subnet": str(node.pod_cidr), "gateway": str(node.pod_cidr.network_address + 1)}]
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    if cni == "ptp":
        first: dict[str, Any] = {"type": "ptp", "ipMasq": False, "mtu": 1500, "ipam": ipam}
    elif cni == "bridge":
        first = {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": ipam,
        }
    else:
        raise LabError(f"unknown primary CNI {cni!r} (ptp or bridge)")
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": [first]}


@dataclass
class PluginRun:
    """One plugin invocation by the runtime stand-in."""

    pod: str
    plugin: str
    command: str
    seconds: float
    ok: bool
    output: str
    stderr: str = ""


class CniRuntime:
    """The CNI side of a container runtime on one node (libcni's behaviour, CNI spec 1.1)."""

    def __init__(self, node: NodeSpec, conf_dir: Path, bin_dirs: list[Path]) -> None:
        self.node = node
        self.conf_dir = conf_dir
        self.bin_dirs = bin_dirs
        self.runs: list[PluginRun] = []
        self._lock = threading.Lock()

    def chain(self) -> dict[str, Any]:
        """The first config file by name, as libcni picks it."""
        names = sorted(
            p for p in os.listdir(self.conf_dir) if p.endswith((".conf", ".conflist", ".json"))
        )
        if not names:
            raise LabError(f"no CNI configuration in {self.conf_dir}")
        obj: dict[str, Any] = json.loads((self.conf_dir / names[0]).read_text())
        if "plugins" not in obj:
            obj = {"cniVersion": obj["cniVersion"], "name": obj["name"], "plugins": [obj]}
        return obj

    def _binary(self, type_: str) -> Path:
        for d in self.bin_dirs:
            if (d / type_).exists():
                return d / type_
        raise LabError(f"CNI plugin {type_} not found in {', '.join(map(str, self.bin_dirs))}")

    def _exec(
        self, pod: str, conf: dict[str, Any], env: dict[str, str]
    ) -> tuple[bool, dict[str, Any] | None, str]:
        argv = ["nsenter", f"--net=/run/netns/{self.node.netns}", str(self._binary(conf["type"]))]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(
                argv,
                input=json.dumps(conf).encode(),
                capture_output=True,
                env=env,
                timeout=ADD_TIMEOUT,
                check=False,
            )
            out, ok = res.stdout.decode(errors="replace"), res.returncode == 0
            err = res.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            out, ok, err = '{"msg": "plugin timed out"}', False, ""
        seconds = time.perf_counter() - t0
        with self._lock:
            self.runs.append(
                PluginRun(pod, conf["type"], env["CNI_COMMAND"], seconds, ok, out[:500], err[-500:])
            )
        parsed: dict[str, Any] | None = None
        with contextlib.suppress(ValueError):
            parsed = json.loads(out) if out.strip() else None
        return ok, parsed, out

    def _env(self, command: str, container_id: str, netns: str, pod_args: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": POD_IFNAME,
            "CNI_ARGS": pod_args,
            "CNI_PATH": ":".join(map(str, self.bin_dirs)),
        }

    def add(self, pod: str, container_id: str, netns: str, pod_args: str) -> dict[str, Any]:
        """ADD through the chain; on failure DEL what was added (reverse order) and raise."""
        chain = self.chain()
        env = self._env("ADD", container_id, netns, pod_args)
        prev: dict[str, Any] | None = None
        for conf in chain["plugins"]:
            full = {**conf, "cniVersion": chain["cniVersion"], "name": chain["name"]}
            if prev is not None:
                full["prevResult"] = prev
            ok, result, out = self._exec(pod, full, env)
            if not ok or result is None:
                self.delete(pod, container_id, netns, pod_args, prev)
                msg = (
                    (result or {}).get("msg", out.strip()[:300])
                    if isinstance(result, dict)
                    else out[:300]
                )
                raise LabError(f"CNI ADD {conf['type']}: {msg}")
            prev = result
        assert prev is not None
        return prev

    def delete(
        self,
        pod: str,
        container_id: str,
        netns: str,
        pod_args: str,
        prev: dict[str, Any] | None = None,
    ) -> None:
        chain = self.chain()
        env = self._env("DEL", container_id, netns, pod_args)
        for conf in reversed(chain["plugins"]):
            full = {**conf, "cniVersion": chain["cniVersion"], "name": chain["name"]}
            if prev is not None:
                full["prevResult"] = prev
            self._exec(pod, full, env)


@dataclass
class Sandbox:
    pod: str  # namespace/name
    uid: str
    netns: str
    container_id: str
    cni_args: str
    ip: str = ""
    host_ifname: str = ""
    app: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] | None = None


class Kubelet:
    """Starts and stops the pods bound to one node (a stand-in for kubelet + runtime)."""

    def __init__(self, lab: KubeLab, node: NodeSpec, runtime: CniRuntime) -> None:
        self.lab = lab
        self.node = node
        self.runtime = runtime
        self.sandboxes: dict[str, Sandbox] = {}
        self.errors: dict[str, str] = {}
        self._starting: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._seq = 0

    def start(self) -> None:
        t = threading.Thread(target=self._watch, name=f"kubelet {self.node.name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _watch(self) -> None:
        store = self.lab.api.store
        sel = Selector.parse(field_selector=f"spec.nodeName={self.node.name}")
        while not self.lab.stopping.is_set():
            items, rv = store.list(PODS, "", sel)
            for obj in items:
                self._sync(obj, deleted=False)
            try:
                for ev in store.events(PODS, "", sel, rv, self.lab.stopping.is_set, 3600.0):
                    if ev is not None:
                        self._sync(ev[1], deleted=ev[0] == "DELETED")
            except ApiError:
                continue  # fell behind the event log: list again

    def _sync(self, obj: dict[str, Any], deleted: bool) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        uid = str(meta["uid"])
        with self._lock:
            known = self.sandboxes.get(uid)
            starting = uid in self._starting
        if deleted or meta.get("deletionTimestamp"):
            if known is not None or starting:
                self._spawn(self._stop_pod, obj, f"stop {key}")
            elif not deleted:
                self._finalize(obj)
            return
        if (
            known is None
            and not starting
            and obj.get("status", {}).get("phase", "Pending") == "Pending"
        ):
            with self._lock:
                self._starting.add(uid)
            self._spawn(self._start_pod, obj, f"start {key}")

    def _spawn(self, fn: Callable[[dict[str, Any]], None], obj: dict[str, Any], name: str) -> None:
        t = threading.Thread(
            target=fn, args=(obj,), name=f"kubelet {self.node.name}: {name}", daemon=True
        )
        t.start()
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _start_pod(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        with self._lock:
            self._seq += 1
            netns = f"{self.lab.topology.lab_id}-{self.node.name}-{self._seq}"
        cid = uuid.uuid4().hex
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid}"
        sb = Sandbox(f"{ns}/{name}", uid, netns, cid, args)
        topo._add_netns(netns, topo._BASE_SYSCTLS)
        delay = 0.5
        try:
            while not self.lab.stopping.is_set():
                try:
                    sb.result = self.runtime.add(f"{ns}/{name}", cid, netns, args)
                    break
                except LabError as e:
                    # As kubelet: the sandbox fails, the pod stays Pending, and it is retried.
                    self.errors[sb.pod] = str(e)
                    with contextlib.suppress(ApiError):
                        self.lab.api.store.patch(
                            PODS,
                            ns,
                            name,
                            {
                                "status": {
                                    "phase": "Pending",
                                    "reason": "FailedCreatePodSandBox",
                                    "message": str(e)[:500],
                                }
                            },
                            "application/merge-patch+json",
                            status_only=True,
                        )
                    if self._gone(uid):
                        raise
                    self.lab.stopping.wait(delay)
                    delay = min(delay * 2, 8.0)
            else:
                return
            self.errors.pop(sb.pod, None)
            ips = [ip["address"].split("/")[0] for ip in sb.result.get("ips", [])]
            sb.ip = ips[0] if ips else ""
            sb.host_ifname = next(
                (
                    i["name"]
                    for i in sb.result.get("interfaces", [])
                    if not i.get("sandbox") and i["name"] != "cni0"
                ),
                "",
            )
            log_dir = self.lab.dir / "apps"
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / f"{ns}-{name}.log", "ab") as out:
                sb.app = topo.popen_in_netns(
                    netns,
                    [
                        sys.executable,
                        "-m",
                        "ztunnel.lab.apps",
                        "serve",
                        "--name",
                        name,
                        "--ports",
                        ",".join(str(p) for p in runner.APP_PORTS),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            with self._lock:
                self.sandboxes[uid] = sb
            # Readiness probe from the node (as kubelet): Ready once the app accepts.
            if not topo.wait_until(lambda: self._probe(sb.ip), 20.0, 0.05):
                log.warning("pod %s: app not accepting on %s:8080", sb.pod, sb.ip)
            status = {
                "phase": "Running",
                "hostIP": str(self.node.ip),
                "podIP": sb.ip,
                "podIPs": [{"ip": ip} for ip in ips],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "app", "ready": True, "started": True, "restartCount": 0}
                ],
            }
            try:
                self.lab.api.store.patch(
                    PODS,
                    ns,
                    name,
                    {"status": status},
                    "application/merge-patch+json",
                    status_only=True,
                )
            except ApiError:
                self._stop_pod(obj)  # deleted while starting
        except (LabError, OSError) as e:
            log.warning("pod %s/%s did not start: %s", ns, name, e)
            with contextlib.suppress(LabError):
                topo._run(["ip", "netns", "del", netns])
        finally:
            with self._lock:
                self._starting.discard(uid)

    def _probe(self, ip: str) -> bool:
        def connect() -> bool:
            try:
                socket.create_connection((ip, runner.APP_PORTS[0]), timeout=1).close()
                return True
            except OSError:
                return False

        return topo.call_in_netns(self.node.netns, connect)

    def _gone(self, uid: str) -> bool:
        return not any(
            o["metadata"]["uid"] == uid and not o["metadata"].get("deletionTimestamp")
            for o in self.lab.api.store.list(PODS)[0]
        )

    def _stop_pod(self, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        deadline = time.monotonic() + ADD_TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                if uid not in self._starting:
                    break
            time.sleep(0.05)
        with self._lock:
            sb = self.sandboxes.pop(uid, None)
        if sb is not None:
            if sb.app is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sb.app.pid, 15)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sb.app.wait(timeout=5)
            self.runtime.delete(sb.pod, sb.container_id, sb.netns, sb.cni_args, sb.result)
            with contextlib.suppress(LabError):
                topo._run(["ip", "netns", "del", sb.netns])
        self._finalize(obj)

    def _finalize(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with contextlib.suppress(ApiError):
            current = self.lab.api.store.get(PODS, meta["namespace"], meta["name"])
            if current["metadata"]["uid"] == meta["uid"]:
                self.lab.api.store.delete(PODS, meta["namespace"], meta["name"], 0)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(timeout=max(0.0, deadline - time.monotonic()))


@dataclass
class KubeLab:
    topology: Topology
    api: KubeApiServer
    dir: Path
    url_nodes: str
    url_host: str
    cni: str
    kubelets: dict[str, Kubelet] = field(default_factory=dict)
    runtimes: dict[str, CniRuntime] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    policies: list[dict[str, Any]] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    mesh_writes: int = 0

    @property
    def kubeconfig_host(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def kubeconfig_nodes(self) -> Path:
        return self.dir / "kubeconfig-nodes"

    def node_dir(self, node: NodeSpec) -> Path:
        return self.dir / node.name

    def kubectl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """The real kubectl against the stand-in (from the host, over loopback)."""
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig_host), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- objects
    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.api.store.create(NS, "", {"metadata": {"name": name, "labels": labels or {}}})

    def create_pod(
        self,
        namespace: str,
        name: str,
        node: str,
        service_account: str = "default",
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return self.api.store.create(
            PODS,
            namespace,
            {
                "metadata": {"name": name, "labels": labels or {}},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": service_account,
                    "containers": [
                        {
                            "name": "app",
                            "image": "ztunnel-lab-echo",
                            "ports": [
                                {"name": "http", "containerPort": 8080},
                                {"name": "admin", "containerPort": 9090},
                            ],
                        }
                    ],
                },
            },
        )

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.api.store.get(PODS, namespace, name)

    def pods(self) -> list[dict[str, Any]]:
        return self.api.store.list(PODS)[0]

    def wait_running(self, namespace: str, name: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ApiError):
                p = self.pod(namespace, name)
                if p.get("status", {}).get("phase") == "Running":
                    return p
            time.sleep(0.05)
        err = next(
            (
                e
                for k in self.kubelets.values()
                for pod, e in k.errors.items()
                if pod == f"{namespace}/{name}"
            ),
            "",
        )
        raise LabError(f"pod {namespace}/{name} not running after {timeout:.0f}s {err}")

    def sandbox(self, namespace: str, name: str) -> Sandbox:
        for k in self.kubelets.values():
            for sb in list(k.sandboxes.values()):
                if sb.pod == f"{namespace}/{name}":
                    return sb
        raise LabError(f"no sandbox for {namespace}/{name}")

    def as_topology(self) -> Topology:
        """The running pods as a lab Topology (for the flow table and the lab helpers)."""
        nodes = []
        for node in self.topology.nodes:
            specs = []
            for sb in sorted(self.kubelets[node.name].sandboxes.values(), key=lambda s: s.pod):
                name = sb.pod.split("/", 1)[1]
                specs.append(
                    PodSpec(name, sb.netns, node.name, ipaddress.IPv4Address(sb.ip), sb.host_ifname)
                )
            nodes.append(
                NodeSpec(
                    node.name,
                    node.netns,
                    node.ip,
                    node.pod_cidr,
                    node.pin_dir,
                    node.bridge_port,
                    tuple(specs),
                    node.uplink_ifname,
                )
            )
        return Topology(
            self.topology.lab_id, self.topology.network_netns, tuple(nodes), self.topology.bridge
        )

    def agent_pods(self, node: NodeSpec) -> dict[str, Any]:
        from ztunnel.enrolment import request

        pods: dict[str, Any] = request(
            runner.enrolment_socket(self.topology, node), {"op": "list"}, timeout=5
        )["pods"]
        return pods

    # -- the istiod stand-in: mesh file from the API objects
    def _write_mesh(self) -> None:
        last_rv, last_text = -1, ""
        path = runner.lab_dir(self.topology.lab_id) / "mesh.yaml"
        while not self.stopping.is_set():
            rv = self.api.store.resource_version
            if rv != last_rv:
                last_rv = rv
                doc = meshgen.mesh_document(
                    self.pods(), self.api.store.list(SERVICES)[0], policies=self.policies
                )
                text = yaml.safe_dump(doc, sort_keys=False)
                if text != last_text:
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(text)
                    os.replace(tmp, path)
                    last_text = text
                    self.mesh_writes += 1
            self.stopping.wait(0.05)

    def mesh_has(
        self, node: NodeSpec, ip: str, protocol: str | None = None, timeout: float = 10.0
    ) -> bool:
        """Waits until the node's agent serves a workload with this IP (and protocol)."""

        def check() -> bool:
            code, body = runner._http_in(node.netns, runner.ADMIN_PORT, "/config_dump")
            if code != 200:
                return False
            for w in json.loads(body).get("workloads", []):
                addrs = [str(a) for a in w.get("addresses", w.get("workloadIps", []))]
                if ip in addrs and (
                    protocol is None
                    or str(w.get("protocol", w.get("tunnel_protocol", "")))
                    .upper()
                    .endswith(protocol)
                ):
                    return True
            return False

        return topo.wait_until(check, timeout, 0.05)


def _answers(sock: str) -> bool:
    from ztunnel.enrolment import EnrolmentError, request

    try:
        request(sock, {"op": "list"}, timeout=2)
        return True
    except EnrolmentError:
        return False


def _start_process(t: Topology, node: NodeSpec, name: str, argv: list[str], log_path: Path) -> int:
    """Starts one of the DaemonSet's processes on a node: from the venv in the node's namespace,
    or, in an image lab, from the image with podman (`ztunnel.lab.image`)."""
    image = lab_image.load(t.lab_id)
    with open(log_path, "ab") as out:
        io: dict[str, Any] = {
            "stdout": out,
            "stderr": subprocess.STDOUT,
            "stdin": subprocess.DEVNULL,
            "start_new_session": True,
        }
        if image is None:
            proc = topo.popen_in_netns(node.netns, argv, **io)
        else:
            name = f"{node.name}-{name}"
            proc = lab_image.start_process(t.lab_id, node.netns, name, image, argv, **io)
    return proc.pid


def up(
    nodes: int = 2,
    cni: str = "ptp",
    progress: runner.Progress = runner._quiet,
    image: lab_image.ImageOptions | None = None,
) -> KubeLab:
    """Builds the cluster (no pods yet); `down(lab)` removes everything. Given `image`, the
    agents, installers and controllers run from the OCI image with podman."""
    if shutil.which("nsenter") is None or not (CNI_BIN_DIR / "host-local").exists():
        raise LabError(
            "the Kubernetes lab needs nsenter and containernetworking-plugins in /usr/lib/cni (scripts/setup.sh installs them)"
        )
    progress(f"creating {nodes} nodes (network namespaces on a bridge)")
    t = topo.create(nodes, 0)
    d = runner.lab_dir(t.lab_id)
    kd = d / "k8s"
    try:
        kd.mkdir(parents=True, exist_ok=True)
        CertificateAuthority.create("cluster.local").save(d / "ca")
        if image is not None:
            lab_image.save(t.lab_id, image)
        n0 = t.nodes[0]
        token = secrets.token_urlsafe(24)
        api = KubeApiServer(
            token,
            [str(n0.ip), "127.0.0.1"],
            ObjectStore(event_log=5000, graceful_pod_deletion=True),
            bookmark_interval=5.0,
        )
        url_nodes = api.serve(
            topo.call_in_netns(n0.netns, lambda: KubeApiServer.listen(str(n0.ip), API_PORT))
        )
        url_host = api.start("127.0.0.1", 0)
        lab = KubeLab(t, api, kd, url_nodes, url_host, cni)
        lab.kubeconfig_host.write_text(json.dumps(api.kubeconfig(url_host), indent=2))
        lab.kubeconfig_nodes.write_text(json.dumps(api.kubeconfig(url_nodes), indent=2))
        # The service account the DaemonSet's pods would mount (token + cluster CA).
        sa = kd / "serviceaccount"
        sa.mkdir(exist_ok=True)
        (sa / "token").write_text(token)
        (sa / "ca.crt").write_bytes(api.ca_pem)
        progress(
            f"API server stand-in at {url_nodes} (nodes) and {url_host} (kubectl on this host)"
        )
        api.store.create(NS, "", {"metadata": {"name": SYSTEM_NAMESPACE}})
        api.store.create(
            DAEMONSETS, SYSTEM_NAMESPACE, {"metadata": {"name": "ztunnel"}, "spec": {}}
        )
        for node in t.nodes:
            api.store.create(
                NODES,
                "",
                {
                    "metadata": {"name": node.name},
                    "status": {"addresses": [{"type": "InternalIP", "address": str(node.ip)}]},
                },
            )
        (d / "mesh.yaml").write_text(
            yaml.safe_dump(meshgen.mesh_document([], [], policies=lab.policies), sort_keys=False)
        )
        writer = threading.Thread(target=lab._write_mesh, name="istiod stand-in", daemon=True)
        writer.start()
        lab._threads.append(writer)
        progress(
            "starting per node: agent (eBPF capture), ztunnel-cni install, enrolment controller"
        )
        for node in t.nodes:
            nd = lab.node_dir(node)
            for sub in ("net.d", "bin", "pods", "ipam"):
                (nd / sub).mkdir(parents=True, exist_ok=True)
            (nd / "net.d" / "10-lab-pods.conflist").write_text(
                json.dumps(primary_conflist(cni, node, nd / "ipam"), indent=2) + "\n"
            )
            runner.start_agent(t, node, ["--reload-interval", "0.1"])
        for node in t.nodes:
            runner.wait_agent(t, node)
            # Readiness can come before the capture (BPF loader) is up: wait for enrolment.
            sock = runner.enrolment_socket(t, node)
            if not topo.wait_until(partial(_answers, sock), runner.AGENT_START_TIMEOUT, 0.1):
                raise LabError(f"agent of {node.name} never served its enrolment socket")
        for node in t.nodes:
            nd = lab.node_dir(node)
            sock = runner.enrolment_socket(t, node)
            _start_process(
                t,
                node,
                "install-cni",
                [
                    sys.executable,
                    "-m",
                    "cni",
                    "install",
                    "--cni-bin-dir",
                    str(nd / "bin"),
                    "--cni-conf-dir",
                    str(nd / "net.d"),
                    "--host-root",
                    "/",
                    "--kubeconfig-host-path",
                    str(nd / "net.d" / "ztunnel-cni-kubeconfig"),
                    "--api-server",
                    url_nodes,
                    "--token-file",
                    str(sa / "token"),
                    "--ca-file",
                    str(sa / "ca.crt"),
                    "--kubeconfig",
                    str(lab.kubeconfig_nodes),
                    "--namespace",
                    SYSTEM_NAMESPACE,
                    "--enrolment-socket",
                    sock,
                    "--pod-record-dir",
                    str(nd / "pods"),
                    "--poll-interval",
                    "0.5",
                ],
                nd / "install.log",
            )
            _start_process(
                t,
                node,
                "enrolment-controller",
                [
                    sys.executable,
                    "-m",
                    "cni",
                    "controller",
                    "--node-name",
                    node.name,
                    "--kubeconfig",
                    str(lab.kubeconfig_nodes),
                    "--enrolment-socket",
                    sock,
                    "--pod-record-dir",
                    str(nd / "pods"),
                    "--resync-interval",
                    "0.5",
                    "--status-file",
                    str(nd / "controller-status.json"),
                ],
                nd / "controller.log",
            )
            lab.runtimes[node.name] = CniRuntime(node, nd / "net.d", [CNI_BIN_DIR, nd / "bin"])
        for node in t.nodes:
            nd = lab.node_dir(node)

            def chained(nd: Path = nd) -> bool:
                with contextlib.suppress(OSError, ValueError):
                    return (nd / "bin" / "ztunnel-cni").exists() and "ztunnel-cni" in (
                        nd / "net.d" / "10-lab-pods.conflist"
                    ).read_text()
                return False

            if not topo.wait_until(chained, 30.0, 0.1):
                raise LabError(
                    f"ztunnel-cni install did not chain itself on {node.name}: {runner._tail(nd / 'install.log')}"
                )
            status = nd / "controller-status.json"

            def controller_up(status: Path = status) -> bool:
                with contextlib.suppress(OSError, ValueError):
                    return bool(json.loads(status.read_text()).get("agent_available"))
                return False

            if not topo.wait_until(controller_up, 60.0, 0.1):
                raise LabError(
                    f"enrolment controller of {node.name} not up: {runner._tail(nd / 'controller.log')}"
                )
            lab.kubelets[node.name] = Kubelet(lab, node, lab.runtimes[node.name])
            lab.kubelets[node.name].start()
        return lab
    except BaseException:
        runner.down(t.lab_id)
        raise


def down(lab: KubeLab) -> None:
    lab.stopping.set()
    for k in lab.kubelets.values():
        for sb in list(k.sandboxes.values()):
            if sb.app is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sb.app.pid, 9)
        k.join(5.0)
    lab.api.stop()
    for t in lab._threads:
        t.join(timeout=5)
    # Agents, controllers and installers run in the node namespaces; pods' namespaces carry
    # the lab prefix; a bridge CNI's bridge lives in the node namespace: all go with the lab.
    runner.down(lab.topology.lab_id)
