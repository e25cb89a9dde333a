"""Image mode of the namespace lab: each node's agent runs from the OCI image, with podman.

`ztunnel lab up --image IMAGE` (and `lab demo --image IMAGE`) start a node's agent as
`podman run --network ns:/run/netns/<node> IMAGE ztunnel run ...` instead of
`ip netns exec <node> python -m ztunnel run ...`; the topology, pods, enrolment and what the
demo observes are the same code. The container gets what the DaemonSet gives the agent
(deploy/base): the capabilities in `AGENT_CAPABILITIES` (not --privileged) under the default
seccomp profile, a read-only root file system with a /tmp, bpffs, the host's kernel headers
read-only, and the lab's state directory (mesh file, CA, enrolment socket) at the same path as
on the host.

The choice is kept per lab in `<lab dir>/image.json`, so a restarted agent (tests, `lab up`
then `lab down`) runs the same way. podman uses deploy/image/containers.conf.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ztunnel.lab import topology as topo
from ztunnel.lab.topology import LabError, NodeSpec

# What the agent container is granted, in the DaemonSet (deploy/base/daemonset.yaml; tests/deploy
# checks they agree) and here, so the lab proves the set suffices (restarts included), under the
# runtime's default seccomp profile. NET_ADMIN: tc filters, rules, routes, IP_TRANSPARENT,
# sockmap. SYS_ADMIN: bcc reuses pinned maps after a restart through BPF_MAP_GET_FD_BY_ID,
# which the kernel allows only with CAP_SYS_ADMIN (BPF + PERFMON, enough for a first start, fail
# there with EPERM); it also covers bpf_capable()/perfmon_capable() (program loading, the
# verifier's pointer rules) and is what the default seccomp profiles require for bpf().
AGENT_CAPABILITIES = ("NET_ADMIN", "SYS_ADMIN")
LABEL = "ztunnel-lab"
HOST_HEADER_DIRS = ("/lib/modules", "/usr/src")
PODMAN_TIMEOUT = 60.0
CONTAINERS_CONF = Path(__file__).resolve().parents[2] / "deploy" / "image" / "containers.conf"


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """How a lab runs its agents from an image.

    `kheaders_nodes` get no host headers but `kheaders_archive` mounted and named in
    ZTUNNEL_KHEADERS_ARCHIVE (the loader's fallback for kernels without a headers package).
    `privileged` replaces the capability list with --privileged (for comparison runs).
    """

    image: str
    kheaders_nodes: tuple[str, ...] = ()
    kheaders_archive: str = ""
    privileged: bool = False

    def __post_init__(self) -> None:
        if not self.image or self.image.startswith("-"):
            raise LabError(f"not an image name: {self.image!r}")
        if self.kheaders_nodes and not self.kheaders_archive:
            raise LabError("kheaders_nodes needs kheaders_archive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageOptions:
        try:
            return cls(
                image=str(data["image"]),
                kheaders_nodes=tuple(str(n) for n in data.get("kheaders_nodes", ())),
                kheaders_archive=str(data.get("kheaders_archive", "")),
                privileged=bool(data.get("privileged", False)),
            )
        except (KeyError, TypeError) as exc:
            raise LabError(f"malformed image options: {exc!r}") from exc


def _options_file(lab_id: str) -> Path:
    return topo.STATE_DIR / lab_id / "image.json"


def save(lab_id: str, options: ImageOptions) -> None:
    path = _options_file(lab_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(options.to_json(), indent=2) + "\n")


def load(lab_id: str) -> ImageOptions | None:
    """The lab's image options, or None for a lab whose agents run from the venv."""
    try:
        data = json.loads(_options_file(lab_id).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"reading {_options_file(lab_id)}: {exc}") from exc
    return ImageOptions.from_json(data)


def podman_env() -> dict[str, str]:
    """The environment for podman: the project's containers.conf unless one is set already."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        if not CONTAINERS_CONF.is_file():
            raise LabError(
                f"{CONTAINERS_CONF} is missing: set CONTAINERS_CONF to a containers.conf with "
                "runtime runc and ulimits within the host's"
            )
        env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


def podman(
    args: Sequence[str], timeout: float = PODMAN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Runs one podman command to completion; raises LabError when it fails."""
    return topo._run(["podman", *args], timeout, podman_env())


def container_name(lab_id: str, node: str) -> str:
    return f"{lab_id}-{node}-agent"


def agent_command(
    lab_id: str, node: NodeSpec, options: ImageOptions, agent_args: Sequence[str]
) -> list[str]:
    """`podman run ...` for one node's agent; `agent_args` are those after `ztunnel`."""
    state = topo.STATE_DIR / lab_id
    argv = [
        "podman",
        "run",
        "--rm",
        "--name",
        container_name(lab_id, node.name),
        "--label",
        f"{LABEL}={lab_id}",
        "--network",
        f"ns:{topo.NETNS_DIR / node.netns}",
        "--read-only",  # with a tmpfs on /tmp, /var/tmp and /run (podman's --read-only-tmpfs)
        # As in the DaemonSet, the metrics and readiness listeners are reachable at the node's
        # address (by the kubelet, by Prometheus), not only on loopback.
        "--env",
        "ZTUNNEL_STATUS_ADDRESS=0.0.0.0",
        "--volume",
        f"{state}:{state}",
        "--volume",
        f"{topo.BPFFS_DIR}:{topo.BPFFS_DIR}",
    ]
    if options.privileged:
        argv.append("--privileged")
    else:
        # podman's default seccomp profile stands for the DaemonSet's RuntimeDefault.
        argv += ["--cap-drop", "all", "--cap-add", ",".join(AGENT_CAPABILITIES)]
    # The pods' network namespaces, as the DaemonSet mounts the host's /var/run/netns: the
    # agent resolves a pod's veth inside CNI_NETNS when the CNI result is ambiguous.
    argv += ["--volume", f"{topo.NETNS_DIR}:{topo.NETNS_DIR}:ro,rslave"]
    if node.name in options.kheaders_nodes:
        archive = "/run/ztunnel-kheaders.tar.xz"
        argv += [
            "--volume",
            f"{options.kheaders_archive}:{archive}:ro",
            "--env",
            f"ZTUNNEL_KHEADERS_ARCHIVE={archive}",
        ]
    else:
        for d in HOST_HEADER_DIRS:
            argv += ["--volume", f"{d}:{d}:ro"]
    return [*argv, options.image, "ztunnel", *agent_args]


def start_agent(
    lab_id: str, node: NodeSpec, options: ImageOptions, agent_args: Sequence[str], **popen: Any
) -> subprocess.Popen[Any]:
    """Starts the agent's container in the foreground; the returned podman process stands for
    the agent (SIGTERM reaches the agent, the container is removed when it exits)."""
    # A container of the same name left by a killed run would make `podman run` fail.
    remove_agent(lab_id, node.name)
    return subprocess.Popen(
        agent_command(lab_id, node, options, agent_args), env=podman_env(), **popen
    )


def process_command(
    lab_id: str, netns: str, name: str, options: ImageOptions, argv: Sequence[str]
) -> list[str]:
    """`podman run` for another of the DaemonSet's processes on a node (the CNI installer, the
    enrolment controller), started as `python -m MODULE ...`: the image's Python runs it in the
    node's namespace with what the manifests give those containers (every capability dropped,
    a read-only root) and the lab's state directory."""
    if len(argv) < 3 or argv[1] != "-m":
        raise LabError(f"not a `python -m MODULE` command: {list(argv)[:3]}")
    state = topo.STATE_DIR / lab_id
    return [
        "podman", "run", "--rm",
        "--name", f"{lab_id}-{name}",
        "--label", f"{LABEL}={lab_id}",
        "--network", f"ns:{topo.NETNS_DIR / netns}",
        "--read-only",
        "--cap-drop", "all",
        "--volume", f"{state}:{state}",
        options.image, "python", *argv[1:],
    ]  # fmt: skip


def start_process(
    lab_id: str, netns: str, name: str, options: ImageOptions, argv: Sequence[str], **popen: Any
) -> subprocess.Popen[Any]:
    """Starts `process_command` in the foreground (the podman process stands for it)."""
    with contextlib.suppress(LabError):
        podman(["rm", "--force", "--ignore", "--time", "2", f"{lab_id}-{name}"])
    argv = process_command(lab_id, netns, name, options, argv)
    return subprocess.Popen(argv, env=podman_env(), **popen)


def remove_agent(lab_id: str, node: str) -> None:
    """Removes a node's agent container if it is still there (after a kill); idempotent."""
    with contextlib.suppress(LabError):
        podman(["rm", "--force", "--ignore", "--time", "2", container_name(lab_id, node)])


def remove_lab_containers(lab_id: str | None) -> list[str]:
    """Removes every agent container of one lab, or of every lab (None); returns their names.

    Containers are found by their label, so leftovers of a killed run are found too.
    """
    if shutil.which("podman") is None:
        return []  # no podman: nothing of ours can be running
    selector = f"label={LABEL}" if lab_id is None else f"label={LABEL}={lab_id}"
    try:
        out = podman(["ps", "--all", "--filter", selector, "--format", "{{.Names}}"]).stdout
    except LabError:
        return []
    names = [n for n in out.split() if topo.LAB_NETNS_RE.match(n)]
    for name in names:
        with contextlib.suppress(LabError):
            podman(["rm", "--force", "--ignore", "--time", "2", name])
    return names


def agent_pid(lab_id: str, node: str) -> int:
    """The host pid of a node's agent process (the container's first process), 0 if none."""
    try:
        out = podman(["inspect", "--format", "{{.State.Pid}}", container_name(lab_id, node)])
    except LabError:
        return 0
    return int(out.stdout.strip() or 0)
