"""The chained CNI plugin `ztunnel-cni`: enrols ambient pods with the node agent at ADD.

It runs on the host, started by the container runtime for every pod, so it uses only the
standard library of the host's Python (3.9 or newer). CNI spec 1.1.0 (also configs of
0.3.x/0.4.0/1.0.0): ADD prints `prevResult` unchanged, DEL is idempotent, errors are the
spec's JSON on stdout with a non-zero exit (spec section "Error"). At ADD the pod's labels and
its namespace's labels are read from the API server with the kubeconfig the installer wrote
(as istio-cni does); an ambient pod gets success only once the agent has it enrolled, and an
error when the agent or the API server is unavailable (the runtime retries: the pod never
starts uncaptured). Non-ambient pods are never failed by us: the agent is told about them
only on a short, best-effort budget (so that labelling their namespace later can enrol them
without a restart).
"""

import base64
import contextlib
import json
import os
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Mapping
from typing import IO, Any, NamedTuple, Optional

from cni import selection

PLUGIN_TYPE = "ztunnel-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
MAX_STDIN = 1 << 20

# Error codes: CNI spec "Error" section (1-7, 11 well known; 100+ plugin specific).
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_POD_GONE = 100

DEFAULTS = {
    "kubeconfig": "/etc/cni/net.d/ztunnel-cni-kubeconfig",
    "enrolment_socket": "/var/run/ztunnel/ztunnel.sock",
    "pod_record_dir": "/var/run/ztunnel/cni-pods",
    "exclude_namespaces": list(selection.DEFAULT_EXCLUDED_NAMESPACES),
    "api_timeout_seconds": 5.0,
    "enrol_timeout_seconds": 30.0,
    "attach_timeout_seconds": 0.5,
}


class CniError(Exception):
    """An error result: CNI code, a message a person can act on, details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class Env(NamedTuple):
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str


class Config(NamedTuple):
    cni_version: str
    name: str
    kubeconfig: str
    enrolment_socket: str
    pod_record_dir: str
    exclude_namespaces: tuple[str, ...]
    api_timeout: float
    enrol_timeout: float
    attach_timeout: float
    prev_result: Optional[dict[str, Any]]
    raw: dict[str, Any]


class Attachment(NamedTuple):
    """What prevResult says about the pod's interface: host side (if unambiguous) and IPs."""

    host_ifname: str
    pod_ifname: str
    ips: tuple[str, ...]


# ---- parsing (pure) ------------------------------------------------------------------------


def parse_env(environ: Mapping[str, str]) -> Env:
    """The CNI_* variables; CniError(4) names the bad one (spec: "Parameters")."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            E_INVALID_ENV,
            f"CNI_COMMAND must be one of {', '.join(COMMANDS)}, got {command!r}",
        )
    container_id = environ.get("CNI_CONTAINERID", "")
    netns = environ.get("CNI_NETNS", "")
    ifname = environ.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        if not container_id or not all(c.isalnum() or c in "_.-" for c in container_id):
            raise CniError(
                E_INVALID_ENV,
                f"CNI_CONTAINERID must be non-empty alphanumerics, '_', '.', '-', got {container_id!r}",
            )
        if not ifname or len(ifname) > 15 or "/" in ifname or " " in ifname:
            raise CniError(E_INVALID_ENV, f"CNI_IFNAME is not an interface name: {ifname!r}")
        if command in ("ADD", "CHECK") and not netns:
            raise CniError(E_INVALID_ENV, f"CNI_NETNS is required for {command}")
    return Env(
        command,
        container_id,
        netns,
        ifname,
        parse_args(environ.get("CNI_ARGS", "")),
        environ.get("CNI_PATH", ""),
    )


def parse_args(raw: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K2=V2` (spec: "Parameters"); CniError(4) when malformed."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(
                E_INVALID_ENV, f"CNI_ARGS is malformed at {part!r} (expected KEY=VALUE;...)"
            )
        out[key] = value
    return out


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def parse_config(data: bytes, command: str) -> Config:
    """The network configuration on stdin; CniError names the bad field."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(E_DECODE, f"network configuration on stdin is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CniError(E_DECODE, "network configuration on stdin must be a JSON object")
    version = obj.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(E_INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            E_INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported by {PLUGIN_TYPE}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command == "CHECK" and _version_tuple(version) < (0, 4, 0):
        raise CniError(
            E_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or newer, got {version}"
        )
    if command in ("STATUS", "GC") and _version_tuple(version) < (1, 1, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, got {version}")

    def field(key: str, kind: type) -> Any:
        value = obj.get(key, DEFAULTS[key])
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise CniError(
                    E_INVALID_CONFIG,
                    f"network configuration field {key}: must be a positive number, got {value!r}",
                )
            return float(value)
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise CniError(
                    E_INVALID_CONFIG,
                    f"network configuration field {key}: must be a list of strings",
                )
            return tuple(value)
        if not isinstance(value, str) or not value:
            raise CniError(
                E_INVALID_CONFIG, f"network configuration field {key}: must be a non-empty string"
            )
        return value

    prev = obj.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(
            E_INVALID_CONFIG, "network configuration field prevResult: must be an object"
        )
    return Config(
        cni_version=version,
        name=str(obj.get("name", "")),
        kubeconfig=field("kubeconfig", str),
        enrolment_socket=field("enrolment_socket", str),
        pod_record_dir=field("pod_record_dir", str),
        exclude_namespaces=field("exclude_namespaces", list),
        api_timeout=field("api_timeout_seconds", float),
        enrol_timeout=field("enrol_timeout_seconds", float),
        attach_timeout=field("attach_timeout_seconds", float),
        prev_result=prev,
        raw=obj,
    )


def attachment(prev: Mapping[str, Any], pod_ifname: str) -> Attachment:
    """Host interface and pod IPs from a prevResult (spec "Success" result, 0.3.0 and later).

    The host side is the one interface without `sandbox` when there is exactly one (ptp,
    calico-like results); with several (a bridge result lists the bridge too) it is left
    empty and the node agent resolves it from the pod interface's veth peer.
    """
    interfaces = prev.get("interfaces", [])
    ips = prev.get("ips", [])
    if not isinstance(interfaces, list) or not isinstance(ips, list):
        raise CniError(E_INVALID_CONFIG, "prevResult: interfaces and ips must be lists")
    host: list[str] = []
    sandbox_index: dict[int, str] = {}
    for i, itf in enumerate(interfaces):
        if not isinstance(itf, dict) or not isinstance(itf.get("name"), str):
            raise CniError(E_INVALID_CONFIG, f"prevResult: interfaces[{i}] has no name")
        if itf.get("sandbox"):
            sandbox_index[i] = itf["name"]
        else:
            host.append(itf["name"])
    addrs: list[str] = []
    for i, ip in enumerate(ips):
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            raise CniError(E_INVALID_CONFIG, f"prevResult: ips[{i}] has no address")
        idx = ip.get("interface")
        # Only the pod's own addresses (those on a sandbox interface, when the result says).
        if isinstance(idx, int) and sandbox_index and idx not in sandbox_index:
            continue
        addr = ip["address"].split("/", 1)[0]
        if not _is_ip(addr):
            raise CniError(
                E_INVALID_CONFIG,
                f"prevResult: ips[{i}].address is not an IP prefix: {ip['address']!r}",
            )
        addrs.append(addr)
    if not addrs:
        raise CniError(
            E_INVALID_CONFIG,
            "prevResult has no IP address for the pod: is the primary CNI's IPAM configured?",
        )
    if pod_ifname in sandbox_index.values() or not sandbox_index:
        pod_if = pod_ifname
    else:
        pod_if = next(iter(sandbox_index.values()))
    return Attachment(host[0] if len(host) == 1 else "", pod_if, tuple(addrs))


def _is_ip(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            continue
    return False


# ---- the API server (kubeconfig as JSON, as the installer writes it) ------------------------


class ApiNotFound(CniError):
    pass


class KubeClient:
    """Two GETs over one HTTPS connection, bearer token; every error is a CniError."""

    def __init__(self, kubeconfig_path: str, timeout: float) -> None:
        self.timeout = timeout
        try:
            with open(kubeconfig_path, "rb") as f:
                cfg = json.loads(f.read().decode("utf-8"))
            cluster, user = _kubeconfig_entries(cfg)
            url = urllib.parse.urlsplit(str(cluster["server"]))
            if url.scheme != "https" or not url.hostname:
                raise ValueError(f"server must be an https:// URL, got {cluster['server']!r}")
            self.host = url.hostname
            self.port = url.port or 443
            # Only the cluster's CA: loading the system store would cost ~100 ms per pod.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if cluster.get("insecure-skip-tls-verify") is True:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif cluster.get("certificate-authority-data"):
                ctx.load_verify_locations(
                    cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
                )
            elif cluster.get("certificate-authority"):
                ctx.load_verify_locations(cafile=str(cluster["certificate-authority"]))
            else:
                ctx.load_default_certs()
            self.ctx = ctx
            token = user.get("token")
            if not token and user.get("tokenFile"):
                with open(str(user["tokenFile"])) as tf:
                    token = tf.read().strip()
            if not isinstance(token, str) or not token:
                raise ValueError("the user has no token")
            self.token = token
        except FileNotFoundError:
            raise CniError(
                E_INVALID_CONFIG,
                f"kubeconfig {kubeconfig_path} does not exist: is `ztunnel-cni install` running on this node?",
            ) from None
        except (OSError, ValueError, KeyError, TypeError, ssl.SSLError) as e:
            raise CniError(
                E_INVALID_CONFIG,
                f"kubeconfig {kubeconfig_path} is unusable: {e}",
                "the installer rewrites it; check its logs",
            ) from None
        self._sock: Any = None
        self._rfile: Any = None

    def _request(self, path: str) -> tuple[int, bytes]:
        """One GET on the kept-alive connection. A minimal HTTP/1.1 client (RFC 9112):
        importing http.client pulls in the email package, which measured at ~60% of the
        plugin's run time per pod; our answers are small JSON with Content-Length or chunked."""
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = self.ctx.wrap_socket(raw, server_hostname=self.host)
            self._rfile = self._sock.makefile("rb")
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nAccept: application/json\r\n"
            "User-Agent: ztunnel-cni\r\n\r\n"
        )
        self._sock.sendall(req.encode())
        status_line = self._rfile.readline(65537)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while True:
            line = self._rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
            if len(headers) > 100:
                raise ValueError("too many response headers")
        limit = 4 << 20
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self._rfile.readline(1024)
                    break
                if len(body) + size > limit:
                    raise ValueError("response too large")
                body += self._rfile.read(size)
                self._rfile.readline(1024)
        else:
            length = int(headers.get("content-length", "0"))
            if length > limit:
                raise ValueError("response too large")
            body = self._rfile.read(length)
            if len(body) != length:
                raise ValueError("connection closed mid-body")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(parts[1]), body

    def get(self, path: str) -> dict[str, Any]:
        where = f"API server {self.host}:{self.port}"
        for attempt in (1, 2):
            try:
                status, body = self._request(path)
            except (OSError, ValueError) as e:
                self.close()
                if attempt == 2 or isinstance(e, (socket.timeout, ssl.SSLCertVerificationError)):
                    raise CniError(
                        E_TRY_AGAIN, f"{where} unavailable for GET {path}: {e}"
                    ) from None
                continue
            if status == 404:
                raise ApiNotFound(E_POD_GONE, f"GET {path}: not found")
            if status in (401, 403):
                raise CniError(
                    E_TRY_AGAIN,
                    f"{where} refused our credentials ({status}) for GET {path}: the installer refreshes the token; check it runs",
                )
            if status >= 500 and attempt == 1:
                continue
            if status != 200:
                raise CniError(
                    E_TRY_AGAIN, f"{where} answered {status} for GET {path}: {body[:200]!r}"
                )
            try:
                obj = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise CniError(
                    E_TRY_AGAIN, f"{where} sent a body that is not JSON for GET {path}"
                ) from None
            if not isinstance(obj, dict):
                raise CniError(E_TRY_AGAIN, f"{where} sent a non-object for GET {path}")
            return obj
        raise CniError(E_TRY_AGAIN, f"{where} failed GET {path}")

    def close(self) -> None:
        for f in (self._rfile, self._sock):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._sock = self._rfile = None


def _kubeconfig_entries(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(cfg, dict):
        raise ValueError("not a kubeconfig object")
    contexts = {
        c["name"]: c.get("context", {})
        for c in cfg.get("contexts") or []
        if isinstance(c, dict) and "name" in c
    }
    clusters = {
        c["name"]: c.get("cluster", {})
        for c in cfg.get("clusters") or []
        if isinstance(c, dict) and "name" in c
    }
    users = {
        u["name"]: u.get("user", {})
        for u in cfg.get("users") or []
        if isinstance(u, dict) and "name" in u
    }
    ctx = contexts.get(cfg.get("current-context", "")) or (
        next(iter(contexts.values())) if contexts else {}
    )
    cluster = clusters.get(ctx.get("cluster", "")) or (
        next(iter(clusters.values())) if clusters else None
    )
    user = users.get(ctx.get("user", "")) or (next(iter(users.values())) if users else None)
    if not isinstance(cluster, dict) or "server" not in cluster:
        raise ValueError("no cluster with a server")
    if not isinstance(user, dict):
        raise ValueError("no user")
    return cluster, user


# ---- the node agent's enrolment socket (ztunnel/enrolment.py: one JSON line each way) -------


def agent_request(socket_path: str, obj: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the node agent; CniError(11) when it is unavailable or refuses."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(json.dumps(obj).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < (1 << 20):
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise CniError(E_TRY_AGAIN, f"node agent at {socket_path} is unavailable: {e}") from None
    try:
        answer = json.loads(buf)
    except ValueError:
        raise CniError(
            E_TRY_AGAIN, f"node agent at {socket_path} sent a bad answer: {buf[:200]!r}"
        ) from None
    if not isinstance(answer, dict):
        raise CniError(E_TRY_AGAIN, f"node agent at {socket_path} sent a bad answer")
    if not answer.get("ok"):
        raise CniError(E_TRY_AGAIN, f"node agent refused: {answer.get('error', 'no reason given')}")
    return answer


# ---- pod records (read by the node controller to enrol pods that were not ambient at ADD) --


def record_path(cfg: Config, env: Env) -> str:
    return os.path.join(cfg.pod_record_dir, f"{env.container_id}-{env.ifname}.json")


def write_record(cfg: Config, env: Env, rec: Mapping[str, Any]) -> None:
    os.makedirs(cfg.pod_record_dir, mode=0o700, exist_ok=True)
    tmp = os.path.join(cfg.pod_record_dir, f".rec-{os.getpid()}-{env.container_id}")
    try:
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, record_path(cfg, env))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


# ---- commands ------------------------------------------------------------------------------


def pod_identity(env: Env) -> tuple[str, str, str]:
    return (
        env.args.get("K8S_POD_NAMESPACE", ""),
        env.args.get("K8S_POD_NAME", ""),
        env.args.get("K8S_POD_UID", ""),
    )


def decide_pod(cfg: Config, env: Env) -> tuple[bool, str]:
    """(ambient?, why) for the pod of this ADD, reading the API server when needed."""
    namespace, name, uid = pod_identity(env)
    if not namespace or not name:
        return False, "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS)"
    if selection.is_excluded_namespace(namespace, cfg.exclude_namespaces):
        return False, f"namespace {namespace} is excluded"
    kube = KubeClient(cfg.kubeconfig, cfg.api_timeout)
    try:
        q = urllib.parse.quote
        try:
            pod = kube.get(f"/api/v1/namespaces/{q(namespace, safe='')}/pods/{q(name, safe='')}")
        except ApiNotFound:
            raise CniError(
                E_POD_GONE,
                f"pod {namespace}/{name} does not exist in the API server (deleted while starting?)",
            ) from None
        meta: dict[str, Any] = pod["metadata"] if isinstance(pod.get("metadata"), dict) else {}
        if uid and meta.get("uid") and meta.get("uid") != uid:
            raise CniError(
                E_POD_GONE,
                f"pod {namespace}/{name} in the API server has uid {meta.get('uid')}, not {uid}: it was deleted and re-created",
            )
        try:
            ns = kube.get(f"/api/v1/namespaces/{q(namespace, safe='')}")
            ns_labels: Optional[Mapping[str, str]] = selection.labels_of(ns)
        except ApiNotFound:
            ns_labels = None
    finally:
        kube.close()
    decision = selection.decide(selection.pod_facts(pod), ns_labels, cfg.exclude_namespaces)
    return decision.ambient, decision.reason


def cmd_add(cfg: Config, env: Env) -> dict[str, Any]:
    if cfg.prev_result is None:
        raise CniError(
            E_INVALID_CONFIG,
            f"{PLUGIN_TYPE} is a chained plugin: the configuration has no prevResult (put it after the primary CNI in the plugin list)",
        )
    att = attachment(cfg.prev_result, env.ifname)
    namespace, name, uid = pod_identity(env)
    ambient, why = decide_pod(cfg, env)
    if namespace and name:
        rec = {
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "container_id": env.container_id,
            "netns": env.netns,
            "pod_ifname": att.pod_ifname,
            "host_ifname": att.host_ifname,
            "ips": list(att.ips),
            "ambient_at_add": ambient,
        }
        try:
            write_record(cfg, env, rec)
        except OSError as e:
            if ambient:
                raise CniError(
                    E_IO, f"cannot write pod record in {cfg.pod_record_dir}: {e}"
                ) from None
        req = {
            "op": "add_pod",
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "ifname": att.host_ifname,
            "netns": env.netns,
            "pod_ifname": att.pod_ifname,
            "ips": list(att.ips),
            "enrol": ambient,
        }
        if ambient:
            try:
                agent_request(cfg.enrolment_socket, req, cfg.enrol_timeout)
            except CniError as e:
                raise CniError(
                    E_TRY_AGAIN,
                    f"ambient pod {namespace}/{name} ({why}) cannot be enrolled: {e.msg}",
                    "the pod must not start uncaptured; the runtime retries ADD",
                ) from None
        else:
            try:
                agent_request(cfg.enrolment_socket, req, cfg.attach_timeout)
            except CniError as e:
                _log(f"pod {namespace}/{name} is not ambient ({why}); agent not told: {e.msg}")
    return cfg.prev_result


def cmd_del(cfg: Config, env: Env) -> None:
    namespace, name, _uid = pod_identity(env)
    path = record_path(cfg, env)
    rec = read_record(path)
    if rec is not None:
        namespace, name = str(rec.get("namespace", namespace)), str(rec.get("name", name))
    if namespace and name:
        try:
            agent_request(
                cfg.enrolment_socket,
                {"op": "remove_pod", "namespace": namespace, "name": name},
                cfg.attach_timeout * 4,
            )
        except CniError as e:
            # DEL must succeed (spec: idempotent, tolerate missing state); the node controller
            # removes pods that no longer exist once the agent is back.
            _log(f"DEL {namespace}/{name}: agent not told: {e.msg}")
    with contextlib.suppress(OSError):
        os.unlink(path)


def cmd_check(cfg: Config, env: Env) -> None:
    if cfg.prev_result is None:
        raise CniError(E_INVALID_CONFIG, f"CHECK: {PLUGIN_TYPE} needs prevResult")
    attachment(cfg.prev_result, env.ifname)
    rec = read_record(record_path(cfg, env))
    if rec is None or not rec.get("ambient_at_add"):
        return
    pods = (
        agent_request(cfg.enrolment_socket, {"op": "list"}, cfg.attach_timeout * 4).get("pods")
        or {}
    )
    key = f"{rec.get('namespace')}/{rec.get('name')}"
    if not (
        isinstance(pods, dict) and isinstance(pods.get(key), dict) and pods[key].get("enrolled")
    ):
        raise CniError(E_TRY_AGAIN, f"CHECK: ambient pod {key} is not enrolled with the node agent")


def cmd_gc(cfg: Config) -> None:
    """CNI 1.1 GC: forget records of attachments the runtime no longer has."""
    valid = cfg.raw.get("cni.dev/valid-attachments") or []
    keep = {f"{a.get('containerID')}-{a.get('ifname')}.json" for a in valid if isinstance(a, dict)}
    try:
        names = os.listdir(cfg.pod_record_dir)
    except OSError:
        return
    for entry in names:
        if entry.endswith(".json") and entry not in keep:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(cfg.pod_record_dir, entry))


def _log(msg: str) -> None:
    # Runtimes keep a plugin's stderr in their logs; stdout carries only the result.
    sys.stderr.write(f"{PLUGIN_TYPE}: {msg}\n")


def error_json(code: int, msg: str, details: str, version: str) -> str:
    out = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        out["details"] = details
    return json.dumps(out)


def main(
    environ: Optional[Mapping[str, str]] = None,
    stdin: Optional[IO[bytes]] = None,
    stdout: Optional[IO[str]] = None,
) -> int:
    environ = os.environ if environ is None else environ
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    version = LATEST_VERSION
    try:
        env = parse_env(environ)
        data = stdin.read(MAX_STDIN + 1)
        if env.command == "VERSION":
            try:
                obj = json.loads(data or b"{}")
                if isinstance(obj, dict) and isinstance(obj.get("cniVersion"), str):
                    version = obj["cniVersion"]
            except ValueError:
                pass
            stdout.write(
                json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
                + "\n"
            )
            return 0
        if len(data) > MAX_STDIN:
            raise CniError(
                E_DECODE, f"network configuration on stdin is larger than {MAX_STDIN} bytes"
            )
        try:
            peek = json.loads(data)
            if isinstance(peek, dict) and peek.get("cniVersion") in SUPPORTED_VERSIONS:
                version = peek["cniVersion"]
        except (ValueError, UnicodeDecodeError):
            pass
        cfg = parse_config(data, env.command)
        if env.command == "ADD":
            stdout.write(json.dumps(cmd_add(cfg, env)) + "\n")
        elif env.command == "DEL":
            cmd_del(cfg, env)
        elif env.command == "CHECK":
            cmd_check(cfg, env)
        elif env.command == "GC":
            cmd_gc(cfg)
        # STATUS: always ready. Failing it would stop the runtime from creating ANY pod while
        # the agent is away; ambient pods already fail (and are retried) one by one at ADD.
        return 0
    except CniError as e:
        stdout.write(error_json(e.code, e.msg, e.details, version) + "\n")
        _log(e.msg)
        return 1
    except Exception as e:  # a bug must still answer in the spec's format
        stdout.write(
            error_json(E_IO, f"{PLUGIN_TYPE} internal error: {type(e).__name__}: {e}", "", version)
            + "\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
