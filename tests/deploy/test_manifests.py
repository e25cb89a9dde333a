"""The manifests under deploy/: every kustomization renders with the real `kubectl kustomize`,
every rendered document passes kubernetes-validate's strict schemas for each Kubernetes version
we claim (1.30 to the newest the package knows), a typo in a field name fails, and the rendered
YAML has the properties a cluster depends on (host network, probe and scrape ports, token
audience, opt-out label, priority, tolerations, drain, least-privilege RBAC, capabilities that
the image lab proves), with settings that `ztunnel run` itself accepts."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.utils.quantity import parse_quantity
from kubernetes_validate.utils import all_versions

from cni import main as cni_main
from cni import plugin as cni_plugin
from cni import selection
from tests.deploy.conftest import (
    DEPLOY,
    KUSTOMIZATIONS,
    ROOT,
    Docs,
    container,
    kustomize,
    one,
    parse,
)
from waypoint import cli as waypoint_cli
from waypoint import config as waypoint_config
from waypoint.config import WaypointSettings
from ztunnel import cli, config
from ztunnel.lab.image import AGENT_CAPABILITIES
from ztunnel.localconfig import load_mesh_state

pytestmark = pytest.mark.unit

OLDEST = (1, 30)
# Custom resources: no schema in kubernetes-validate (checked field by field below instead).
CRD_KINDS = {"Gateway"}
# A downward-API variable Istio's pods carry; informational for the agent.
INFORMATIONAL_ENV = {"SERVICE_ACCOUNT"}


def claimed_versions() -> list[str]:
    """Every Kubernetes minor version from 1.30 to the newest kubernetes-validate has."""
    by_minor: dict[tuple[int, int], str] = {}
    for v in all_versions():
        m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", v)
        if m and (int(m[1]), int(m[2])) >= OLDEST:
            by_minor[(int(m[1]), int(m[2]))] = v
    versions = [by_minor[k] for k in sorted(by_minor)]
    assert versions[0].startswith("1.30.") and versions[-1] == kubernetes_validate.latest_version()
    return versions


def validate_strict(docs: Docs, version: str) -> None:
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def daemonset_pod(docs: Docs) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "DaemonSet", "ztunnel")["spec"]["template"]["spec"]
    return spec


# --- rendering and schema validation --------------------------------------------------------


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_passes_strict_validation(
    rendered: Callable[[str], Docs], rel: str
) -> None:
    docs = rendered(rel)
    assert docs, f"{rel} rendered nothing"
    for version in claimed_versions():
        validate_strict(docs, version)


def test_deploy_root_is_the_istiod_overlay(rendered: Callable[[str], Docs]) -> None:
    assert rendered("deploy") == rendered("deploy/overlays/istiod")


TYPOS = [
    # (kustomization rendered, source file, field as written, with a typo)
    (
        "overlays/standalone",
        "base/daemonset.yaml",
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    ),
    (
        "overlays/standalone",
        "base/daemonset.yaml",
        "      hostNetwork: true",
        "      hostNetworking: true",
    ),
    (
        "overlays/istiod",
        "base/daemonset.yaml",
        "mountPropagation: HostToContainer",
        "mountPropagaton: HostToContainer",
    ),
    ("overlays/istiod", "base/rbac.yaml", '  verbs: ["patch"]', '  verb: ["patch"]'),
    (
        "overlays/istiod",
        "overlays/istiod/daemonset.yaml",
        "          name: istio-ca-root-cert",
        "          nam: istio-ca-root-cert",
    ),
    (
        "waypoint",
        "waypoint/base/deployment.yaml",
        "        readinessProbe:",
        "        readynessProbe:",
    ),
]


@pytest.mark.parametrize(
    ("kustomization", "source", "field", "typo"),
    TYPOS,
    ids=["pod-spec", "host-network", "volume-mount", "rbac-rule", "overlay-patch", "waypoint"],
)
def test_a_typo_in_a_field_name_fails_validation(
    tmp_path: Path, kustomization: str, source: str, field: str, typo: str
) -> None:
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree)
    path = tree / source
    text = path.read_text()
    assert field in text, f"{field!r} not in {source}"
    path.write_text(text.replace(field, typo, 1))
    docs = parse(kustomize(tree / kustomization))  # kustomize itself accepts the typo
    bad_key = typo.split(":")[0].strip()
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(repr(bad_key))):
        validate_strict(docs, claimed_versions()[0])


# --- the DaemonSet --------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["deploy/overlays/istiod", "deploy/overlays/standalone"])
def test_daemonset_properties_a_cluster_depends_on(
    rendered: Callable[[str], Docs], rel: str
) -> None:
    docs = rendered(rel)
    ds = one(docs, "DaemonSet", "ztunnel")
    tmpl = ds["spec"]["template"]
    pod = tmpl["spec"]
    agent = container(pod, "ztunnel")
    # The node's network namespace, and DNS that still resolves cluster Services from it.
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # Never captured by itself or by anyone's ambient label.
    assert tmpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert ds["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    assert pod["priorityClassName"] == "system-node-critical"
    # Every taint is tolerated: an operator-Exists toleration without key or effect.
    assert {"operator": "Exists"} in pod["tolerations"]
    # Readiness on 15021 where the kubelet reaches it; metrics on 15020 scraped by Prometheus.
    probe = agent["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (15021, "/healthz/ready")
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "15020"
    assert ann["prometheus.io/path"] in ("/stats/prometheus", "/metrics")
    ports = {p["containerPort"]: p for p in agent["ports"]}
    assert {15008, 15020, 15021} <= ports.keys()
    env = {e["name"]: e for e in agent["env"]}
    assert env["ZTUNNEL_STATUS_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # Rolling update: drains before the node's next agent starts (same host ports).
    rolling = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] == 1
    assert pod["terminationGracePeriodSeconds"] > drain_timeout(agent)
    # The projected token istiod accepts.
    token = next(v for v in pod["volumes"] if v["name"] == "istio-token")
    source = token["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "istio-ca" and source["path"] == "istio-token"
    assert mount(agent, "istio-token")["mountPath"] == "/var/run/secrets/tokens"
    # Every container asks for resources (the scheduler's view of the node).
    for c in pod["containers"] + pod["initContainers"]:
        assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, c["name"]
        assert c.get("imagePullPolicy") == "IfNotPresent", c["name"]


def mount(c: dict[str, Any], volume: str) -> dict[str, Any]:
    found = [m for m in c.get("volumeMounts", []) if m["name"] == volume]
    assert len(found) == 1, f"{c['name']} does not mount {volume}"
    return found[0]


NODE_FIELDS = {
    "spec.nodeName": "node-a",
    "status.hostIP": "192.0.2.10",
    "status.podIP": "192.0.2.10",
}


def container_env(c: dict[str, Any], workload: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would give it, for a pod of `workload` (a
    rendered DaemonSet or Deployment) on node-a at 192.0.2.10."""
    pod = {
        "metadata.name": f"{workload['metadata']['name']}-x1",
        "metadata.namespace": workload["metadata"]["namespace"],
        "spec.serviceAccountName": workload["spec"]["template"]["spec"]["serviceAccountName"],
    }
    environ: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            environ[e["name"]] = str(e["value"])
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            environ[e["name"]] = pod.get(path) or NODE_FIELDS[path]
    return environ


def agent_settings(agent: dict[str, Any], ds: dict[str, Any]) -> config.Settings:
    """What `ztunnel run` makes of the container's command, args and environment."""
    environ = container_env(agent, ds)
    argv = [*agent.get("command", [])[1:], *agent.get("args", [])]
    args = cli.build_parser().parse_args(argv)
    assert args.command == "run"
    return config.settings_from(args, environ)


def drain_timeout(agent: dict[str, Any]) -> float:
    """The agent's drain timeout as `ztunnel run` reads it: flag, else environment, else
    default (without validating the other settings)."""
    args = cli.build_parser().parse_args([*agent["command"][1:], *agent.get("args", [])])
    env = {e["name"]: e.get("value") for e in agent["env"]}
    return float(
        args.drain_timeout
        or env.get("TERMINATION_GRACE_PERIOD_SECONDS")
        or config.Settings().drain_timeout
    )


def test_agent_environment_names_only_settings_the_agent_knows(
    rendered: Callable[[str], Docs],
) -> None:
    known = {env for _, env, _ in config.describe()} | INFORMATIONAL_ENV
    for rel in ("deploy/overlays/istiod", "deploy/overlays/standalone"):
        agent = container(daemonset_pod(rendered(rel)), "ztunnel")
        unknown = {e["name"] for e in agent["env"]} - known
        assert not unknown, f"{rel}: the agent has no setting for {sorted(unknown)}"


def rendered_agent(
    rendered: Callable[[str], Docs], rel: str
) -> tuple[Docs, dict[str, Any], dict[str, Any], config.Settings]:
    """(documents, DaemonSet pod spec, agent container, its settings) of an overlay."""
    docs = rendered(rel)
    pod = daemonset_pod(docs)
    agent = container(pod, "ztunnel")
    return docs, pod, agent, agent_settings(agent, one(docs, "DaemonSet", "ztunnel"))


def test_standalone_agent_settings_are_accepted_by_ztunnel_run(
    rendered: Callable[[str], Docs],
) -> None:
    docs, pod, agent, s = rendered_agent(rendered, "deploy/overlays/standalone")
    assert s.capture == "ebpf"
    assert (s.status_address, s.node_ip) == ("192.0.2.10", "192.0.2.10")
    assert s.admin_address == "127.0.0.1" and s.socks5_port == 0
    assert (s.stats_port, s.readiness_port) == (15020, 15021)
    # The mesh file and the CA come from the mounted ConfigMap and Secret...
    mesh_mount = mount(agent, "mesh")["mountPath"]
    assert Path(s.local_xds_path).parent == Path(mesh_mount)
    cm_name = next(v for v in pod["volumes"] if v["name"] == "mesh")["configMap"]["name"]
    cm = one(docs, "ConfigMap", cm_name)
    assert Path(s.local_xds_path).name in cm["data"]
    assert s.ca_dir == mount(agent, "cacerts")["mountPath"]
    secret = next(v for v in pod["volumes"] if v["name"] == "cacerts")["secret"]
    assert secret["secretName"] == "ztunnel-cacerts"
    # ...and the example mesh file is one the agent loads.
    example = DEPLOY / "overlays" / "standalone" / Path(s.local_xds_path).name
    assert cm["data"][example.name] == example.read_text()
    load_mesh_state(example)
    # State shared with the CNI plugin and controller lives on the host.
    assert Path(s.enrolment_socket).parent == Path(s.state_dir)
    assert mount(agent, "ztunnel-run")["mountPath"] == s.state_dir


def test_istiod_agent_settings_are_accepted_by_ztunnel_run(
    rendered: Callable[[str], Docs],
) -> None:
    _, pod, agent, s = rendered_agent(rendered, "deploy/overlays/istiod")
    assert s.xds_address == s.ca_address == "https://istiod.istio-system.svc:15012"
    assert not s.local_xds_path and not s.ca_dir
    assert (
        Path(s.xds_root_ca).parent
        == Path(s.ca_root_ca).parent
        == Path(mount(agent, "istiod-ca-cert")["mountPath"])
    )
    token = next(v for v in pod["volumes"] if v["name"] == "istio-token")
    path = token["projected"]["sources"][0]["serviceAccountToken"]["path"]
    assert s.auth_token == f"{mount(agent, 'istio-token')['mountPath']}/{path}"
    # Node id and metadata for istiod come from the downward API.
    assert (s.pod_name, s.pod_namespace, s.instance_ip) == (
        "ztunnel-x1",
        "istio-system",
        "192.0.2.10",
    )
    assert s.node_name == "node-a"


def test_istiod_overlay_points_at_istiod_and_its_root(rendered: Callable[[str], Docs]) -> None:
    docs = rendered("deploy/overlays/istiod")
    assert not [d for d in docs if d["kind"] == "Namespace"], "must not own istio-system"
    namespaced = [d for d in docs if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"istio-system"}
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "ztunnel"  # CA-trusted node agent
    pod = daemonset_pod(docs)
    agent = container(pod, "ztunnel")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == "https://istiod.istio-system.svc:15012"
    root = next(v for v in pod["volumes"] if v["name"] == "istiod-ca-cert")
    assert root["configMap"]["name"] == "istio-ca-root-cert"
    assert mount(agent, "istiod-ca-cert")["mountPath"] == "/var/run/secrets/istio"
    for binding in (one(docs, "ClusterRoleBinding"), one(docs, "RoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "ztunnel", "namespace": "istio-system"}
        ]


def test_least_privilege_rbac(rendered: Callable[[str], Docs]) -> None:
    docs = rendered("deploy/overlays/istiod")
    cluster_rules = one(docs, "ClusterRole", "ztunnel")["rules"]
    granted = {
        (group, resource, verb)
        for rule in cluster_rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "namespaces", "get"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        ("", "pods/status", "patch"),
    }
    assert not any("resourceNames" in r or "nonResourceURLs" in r for r in cluster_rules)
    role = one(docs, "Role", "ztunnel")
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["ztunnel"],
            "verbs": ["get"],
        }
    ]
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = one(docs, kind)
        assert binding["roleRef"]["name"] == "ztunnel"
        assert [s["name"] for s in binding["subjects"]] == ["ztunnel"]
    assert daemonset_pod(docs)["serviceAccountName"] == "ztunnel"


def test_privileges_are_the_ones_the_image_lab_proves(rendered: Callable[[str], Docs]) -> None:
    pod = daemonset_pod(rendered("deploy/overlays/istiod"))
    agent = container(pod, "ztunnel")
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    # Kubernetes treats CAP_SYS_ADMIN as privilege escalation; the manifest says so.
    assert sc["allowPrivilegeEscalation"] is ("SYS_ADMIN" in sc["capabilities"]["add"])
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The same set ztunnel/lab/image.py grants the agent's container in the image lab, under
    # podman's default seccomp profile (the RuntimeDefault here).
    assert tuple(sc["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # Only the bpffs mounter is privileged (Bidirectional propagation requires it).
    init = container(pod, "mount-bpffs", init=True)
    assert init["securityContext"] == {"privileged": True}
    assert mount(init, "bpffs")["mountPropagation"] == "Bidirectional"
    assert mount(agent, "bpffs")["mountPropagation"] == "HostToContainer"
    assert mount(agent, "bpffs")["mountPath"] == "/sys/fs/bpf"
    assert agent_settings_pin_dir(agent).startswith("/sys/fs/bpf/")
    others = [c for c in pod["containers"] if c["name"] != "ztunnel"]
    for c in others:
        csc = c["securityContext"]
        assert csc["privileged"] is False and csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert csc["readOnlyRootFilesystem"] is True
    # Kernel headers for bcc: the node's, read-only.
    for volume, path in (("lib-modules", "/lib/modules"), ("usr-src", "/usr/src")):
        m = mount(agent, volume)
        assert (m["mountPath"], m.get("readOnly")) == (path, True)
        host = next(v for v in pod["volumes"] if v["name"] == volume)["hostPath"]["path"]
        assert host == path
    assert mount(agent, "tmp")["mountPath"] == "/tmp"  # kheaders fallback unpacks here


# Figures the README states next to the benchmark's: the loader process's RSS (README, "How
# capture works") and one TLS handshake in progress (README, "Limits and protections").
LOADER_RSS = 150e6
HANDSHAKE_BYTES = 70e3
# Of the memory limit, what held connections and handshakes may take at worst; the rest is for
# data in flight (socket buffers are charged to the container's memory cgroup too).
CONNECTIONS_SHARE = 0.75


@dataclass(frozen=True)
class BenchFigures:
    vcpu_per_1k_rps: float  # worst agent, at the fixed 1,000 req/s
    idle_rss: float  # bytes, worst eBPF agent
    bytes_per_connection: float  # worst agent, idle tunneled connections


def bench_figures() -> BenchFigures:
    """The latest full benchmark's figures, from the block `ztunnel bench` writes into the
    README (the measured figures the DaemonSet's resources are sized from)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- bench:begin") : text.index("<!-- bench:end")]
    vcpu = re.search(r"vCPU per 1,000 req/s .*?: fixed ([\d.]+)", block)
    rss = re.search(r"^- idle RSS \(ebpf\): (.*)$", block, re.M)
    conns = re.search(r"^- \d+ idle connections through mesh: (.*)$", block, re.M)
    assert vcpu and rss and conns, "the README's benchmark block changed its format"
    return BenchFigures(
        vcpu_per_1k_rps=float(vcpu[1]),
        idle_rss=max(float(mb) for mb in re.findall(r"([\d.]+) MB", rss[1])) * 1e6,
        bytes_per_connection=max(
            float(b.replace(",", "")) for b in re.findall(r"\(([\d,]+) B/conn\)", conns[1])
        ),
    )


def test_agent_resources_follow_the_benchmark(rendered: Callable[[str], Docs]) -> None:
    """Requests cover the measured cost of a node's ordinary load; the connection cap keeps
    the worst case of held connections inside the memory limit, so that a flood is shed by
    the agent (counted, logged) instead of ending in the OOM killer."""
    f = bench_figures()
    for rel in ("deploy/overlays/istiod", "deploy/overlays/standalone"):
        _, _, agent, s = rendered_agent(rendered, rel)
        requests, limits = agent["resources"]["requests"], agent["resources"]["limits"]
        assert "cpu" not in limits  # throttling a data path adds latency
        assert parse_quantity(requests["cpu"]) >= Decimal(str(f.vcpu_per_1k_rps))
        start_peak = f.idle_rss + LOADER_RSS
        assert parse_quantity(requests["memory"]) >= Decimal(start_peak)
        assert s.max_connections > 0, "the cap must follow the memory limit, not open files"
        worst = (
            start_peak
            + s.max_pending_handshakes * HANDSHAKE_BYTES
            + s.max_connections * f.bytes_per_connection
        )
        assert worst <= CONNECTIONS_SHARE * float(parse_quantity(limits["memory"])), (rel, worst)


def agent_settings_pin_dir(agent: dict[str, Any]) -> str:
    return next(e["value"] for e in agent["env"] if e["name"] == "ZTUNNEL_BPF_PIN_DIR")


def test_cni_containers_as_ztunnel_cni_takes_them(
    rendered: Callable[[str], Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered("deploy/overlays/istiod")
    ds = one(docs, "DaemonSet", "ztunnel")
    pod = daemonset_pod(docs)
    agent = container(pod, "ztunnel")
    for name, command in (("install-cni", "install"), ("enrolment-controller", "controller")):
        c = container(pod, name)
        assert c["command"] == ["ztunnel-cni"] and c["args"][0] == command
        # `ztunnel-cni` reads its defaults from the environment when it builds its parser.
        for var, value in container_env(c, ds).items():
            monkeypatch.setenv(var, value)
        args = cni_main.build_parser().parse_args(c["args"])
        # The socket and pod records are where the agent (and the host's plugin) has them.
        assert Path(args.enrolment_socket).parent == Path(mount(c, "ztunnel-run")["mountPath"])
        assert args.enrolment_socket == agent_settings(agent, ds).enrolment_socket
        assert Path(args.pod_record_dir).parent == Path(mount(c, "ztunnel-run")["mountPath"])
        if command == "install":
            assert args.cni_bin_dir == mount(c, "cni-bin-dir")["mountPath"]
            assert args.cni_conf_dir == mount(c, "cni-net-dir")["mountPath"]
            assert mount(c, "host-usr")["mountPath"] == f"{args.host_root}/usr"
            assert mount(c, "host-usr")["readOnly"] is True
            # It removes itself from the chain only when this DaemonSet goes: it must find it.
            assert (args.daemonset, args.namespace) == (ds["metadata"]["name"], "istio-system")
        else:
            assert args.node_name == "node-a"
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert (volumes["cni-bin-dir"], volumes["cni-net-dir"]) == ("/opt/cni/bin", "/etc/cni/net.d")
    assert (
        volumes["ztunnel-run"]
        == "/var/run/ztunnel"
        == cni_plugin.DEFAULTS["pod_record_dir"].rsplit("/", 1)[0]
    )
    # The agent sees the pods' network namespaces (CNI_NETNS) as they come and go.
    assert volumes["netns"] == "/var/run/netns"
    assert mount(agent, "netns")["mountPropagation"] == "HostToContainer"


def test_the_mesh_never_captures_its_own_pods(rendered: Callable[[str], Docs]) -> None:
    """Even in a namespace labelled ambient, by the selection the plugin and controller use."""
    workloads = [one(rendered("deploy/overlays/istiod"), "DaemonSet", "ztunnel")]
    workloads += [one(rendered("deploy/waypoint"), "Deployment", "waypoint")]
    for w in workloads:
        tmpl = w["spec"]["template"]
        facts = selection.pod_facts(
            {
                "metadata": {**tmpl["metadata"], "namespace": "shop", "name": "x"},
                "spec": tmpl["spec"],
            }
        )
        decision = selection.decide(facts, {"istio.io/dataplane-mode": "ambient"})
        assert not decision.ambient, (w["metadata"]["name"], decision)
        assert facts.labels["istio.io/dataplane-mode"] == "none"
        assert facts.labels["app.kubernetes.io/part-of"] == "ztunnel-py"


# --- the waypoint ---------------------------------------------------------------------------


def waypoint_settings(c: dict[str, Any], deploy: dict[str, Any]) -> WaypointSettings:
    """What `ztunnel-waypoint` makes of the container's command, args and environment."""
    assert c["command"] == ["ztunnel-waypoint"]
    args = waypoint_cli.build_parser().parse_args(c.get("args", []))
    return waypoint_config.settings_from(args, container_env(c, deploy))


def test_waypoint_template_and_gateway(tmp_path: Path) -> None:
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree)
    k = tree / "waypoint" / "kustomization.yaml"
    text = k.read_text()
    assert "namespace: default" in text and "components: []" in text
    k.write_text(
        text.replace("namespace: default", "namespace: shop").replace(
            "components: []", "components: [gateway]"
        )
    )
    docs = parse(kustomize(tree / "waypoint"))
    assert {d["metadata"]["namespace"] for d in docs} == {"shop"}
    gw = one(docs, "Gateway", "waypoint")
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    assert gw["metadata"]["labels"]["istio.io/waypoint-for"] in ("service", "workload", "all")
    # Our Service as the Gateway's address: istiod links to it instead of deploying Envoy.
    svc = one(docs, "Service", "waypoint")
    assert gw["spec"]["addresses"] == [
        {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}
    ]
    deploy = one(docs, "Deployment", "waypoint")
    tmpl = deploy["spec"]["template"]
    labels = tmpl["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["istio.io/dataplane-mode"] == "none"
    assert labels["gateway.networking.k8s.io/gateway-name"] == gw["metadata"]["name"]
    pod = tmpl["spec"]
    wp = container(pod, "waypoint")
    # The settings `ztunnel-waypoint` makes of the container: the Gateway's name, the pod's
    # namespace and account, files from the mounted ConfigMaps and Secret.
    s = waypoint_settings(wp, deploy)
    assert (s.name, s.namespace, s.account) == ("waypoint", "shop", "waypoint")
    assert s.service_hostname == gw["spec"]["addresses"][0]["value"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {s.hbone_port}
    assert wp["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": s.stats_port}
    assert tmpl["metadata"]["annotations"]["prometheus.io/port"] == str(s.stats_port)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mesh_cm = one(docs, "ConfigMap", volumes["mesh"]["configMap"]["name"])
    assert Path(s.local_xds_path).parent == Path(mount(wp, "mesh")["mountPath"])
    load_mesh_state(DEPLOY / "waypoint" / "mesh.yaml")  # the example loads
    assert Path(s.local_xds_path).name in mesh_cm["data"]
    assert s.config_paths == (mount(wp, "config")["mountPath"],)
    one(docs, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert s.ca_dir == mount(wp, "cacerts")["mountPath"]
    assert volumes["cacerts"]["secret"]["secretName"] == "ztunnel-cacerts"
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > s.drain_timeout
    sc = wp["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False and not pod.get("hostNetwork")
    for version in claimed_versions():
        validate_strict(docs, version)
