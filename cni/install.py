"""`ztunnel-cni install`: puts the plugin on the node and keeps it in the primary CNI's chain.

Run by the DaemonSet with the host's CNI directories mounted. It checks the host's Python,
writes the plugin (a zipapp of `cni.plugin` + `cni.selection`) into the CNI bin directory,
writes the kubeconfig the plugin uses (from the service account; rewritten when the projected
token rotates), and appends our entry to the chain of the primary CNI: the first config file
by name in the CNI config directory (a `.conf` becomes a `.conflist`). Edits are textual:
every byte of the other plugins' configuration is kept. It polls the directory and
re-inserts the entry when the primary CNI rewrites its file; restarting it changes nothing.
On SIGTERM it removes itself only when its DaemonSet is being deleted (during an upgrade the
chain stays, so new ambient pods keep failing closed until the new agent is up).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni import plugin, selection

log = logging.getLogger("ztunnel-cni.install")

CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
MIN_HOST_PYTHON = (3, 9)
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class InstallError(Exception):
    """The node cannot get the plugin; the message says what to fix."""


# ---- pure pieces ---------------------------------------------------------------------------


def kubeconfig_document(server: str, ca_pem: bytes, token: str) -> dict[str, Any]:
    """A kubeconfig (JSON, which kubectl also reads) with one cluster, user and context."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "ztunnel-cni", "user": {"token": token}}],
        "contexts": [
            {"name": "ztunnel-cni", "context": {"cluster": "local", "user": "ztunnel-cni"}}
        ],
        "current-context": "ztunnel-cni",
    }


def plugin_entry(settings: InstallSettings) -> dict[str, Any]:
    return {
        "type": plugin.PLUGIN_TYPE,
        "kubeconfig": str(settings.kubeconfig_path),
        "enrolment_socket": settings.enrolment_socket,
        "pod_record_dir": settings.pod_record_dir,
        "exclude_namespaces": list(settings.exclude_namespaces),
    }


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    value: Any


def _object_members(text: str, i: int) -> tuple[dict[str, Span], int]:
    """Members of the JSON object starting at text[i] ('{'): key -> value span; and its end."""
    dec = json.JSONDecoder()
    if text[i] != "{":
        raise ValueError("expected an object")
    members: dict[str, Span] = {}
    i = _skip_ws(text, i + 1)
    if text[i] == "}":
        return members, i + 1
    while True:
        key, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] != ":":
            raise ValueError(f"expected ':' at {i}")
        start = _skip_ws(text, i + 1)
        value, end = dec.raw_decode(text, start)
        members[key] = Span(start, end, value)
        i = _skip_ws(text, end)
        if text[i] == "}":
            return members, i + 1
        if text[i] != ",":
            raise ValueError(f"expected ',' or '}}' at {i}")
        i = _skip_ws(text, i + 1)


def _array_elements(text: str, span: Span) -> list[Span]:
    dec = json.JSONDecoder()
    i = _skip_ws(text, span.start + 1)
    out: list[Span] = []
    if text[i] == "]":
        return out
    while True:
        value, end = dec.raw_decode(text, i)
        out.append(Span(i, end, value))
        i = _skip_ws(text, end)
        if text[i] == "]":
            return out
        i = _skip_ws(text, i + 1)


def _plugins_span(text: str) -> Span:
    json.loads(text)  # ValueError for anything malformed, before scanning positions
    start = _skip_ws(text, 0)
    if not text[start:].startswith("{"):
        raise ValueError("a .conflist must be a JSON object")
    members, _ = _object_members(text, start)
    span = members.get("plugins")
    if span is None or not isinstance(span.value, list):
        raise ValueError("a .conflist needs a 'plugins' list")
    return span


def _is_ours(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == plugin.PLUGIN_TYPE


def remove_entry(text: str) -> str:
    """The conflist text without our entries (others' bytes unchanged)."""
    while True:
        elems = _array_elements(text, _plugins_span(text))
        idx = next((k for k, e in enumerate(elems) if _is_ours(e.value)), None)
        if idx is None:
            return text
        e = elems[idx]
        if idx > 0:
            text = text[: elems[idx - 1].end] + text[e.end :]
        elif len(elems) > 1:
            text = text[: e.start] + text[elems[1].start :]
        else:
            text = text[: e.start] + text[e.end :]


def insert_entry(text: str, entry: dict[str, Any]) -> str:
    """The conflist text with our entry last in `plugins` (replacing an older one of ours)."""
    text = remove_entry(text)
    span = _plugins_span(text)
    elems = _array_elements(text, span)
    if elems:
        last = elems[-1]
        # Indent like the element before ours.
        line_start = text.rfind("\n", 0, last.start) + 1
        indent = text[line_start : last.start] if text[line_start : last.start].isspace() else ""
        body = (
            json.dumps(entry, indent=2).replace("\n", "\n" + indent)
            if indent
            else json.dumps(entry)
        )
        sep = ",\n" + indent if indent else ", "
        return text[: last.end] + sep + body + text[last.end :]
    return text[: span.start + 1] + json.dumps(entry) + text[span.start + 1 :]


def conf_to_conflist(text: str) -> str:
    """A single-plugin `.conf` wrapped as a `.conflist`, its text kept byte for byte."""
    obj = json.loads(text)
    if not isinstance(obj, dict) or "type" not in obj:
        raise ValueError("a .conf must be an object with a type")
    head = {
        "cniVersion": obj.get("cniVersion", plugin.LATEST_VERSION),
        "name": obj.get("name", "k8s-pod-network"),
    }
    return (
        "{\n"
        f'  "cniVersion": {json.dumps(head["cniVersion"])},\n'
        f'  "name": {json.dumps(head["name"])},\n'
        '  "plugins": [\n'
        f"{text.strip()}\n"
        "  ]\n"
        "}\n"
    )


def primary_config(conf_dir: Path) -> Path | None:
    """The config file the runtime uses: the first by name (libcni's ConfFiles order)."""
    try:
        names = sorted(
            p for p in os.listdir(conf_dir) if p.endswith(CONFIG_SUFFIXES) and not p.startswith(".")
        )
    except FileNotFoundError:
        return None
    return conf_dir / names[0] if names else None


def python_version_of(path: Path, host_root: Path) -> tuple[int, int] | None:
    """The version of a Python interpreter on the host, from its name (python3.N) following
    symlinks inside `host_root`, or by running it when the host root is our own root."""
    seen = 0
    p = path
    while p.is_symlink() and seen < 10:
        target = os.readlink(p)
        p = (host_root / target.lstrip("/")) if target.startswith("/") else (p.parent / target)
        seen += 1
    m = re.search(r"python(\d+)\.(\d+)$", p.name)
    if m:
        return int(m.group(1)), int(m.group(2))
    if host_root == Path("/") and p.exists():
        try:
            out = subprocess.run(
                [str(p), "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            return int(out[0]), int(out[1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
    libs = sorted((host_root / "usr/lib").glob("python3.*"))
    for lib in reversed(libs):
        m = re.search(r"python3\.(\d+)$", lib.name)
        if m:
            return 3, int(m.group(1))
    return None


def find_host_python(host_root: Path) -> tuple[str, tuple[int, int]]:
    """(path on the host, version) of a python3 >= 3.9; InstallError says what is missing."""
    found = []
    for cand in ("usr/bin/python3", "usr/local/bin/python3", "bin/python3"):
        p = host_root / cand
        if p.exists() or p.is_symlink():
            v = python_version_of(p, host_root)
            found.append(f"/{cand} ({'.'.join(map(str, v)) if v else 'unknown version'})")
            if v is not None and v >= MIN_HOST_PYTHON:
                return f"/{cand}", v
    have = ", ".join(found) or "none"
    raise InstallError(
        f"the ztunnel-cni plugin runs on the node with the node's python3 >= 3.9 (standard "
        f"library only); found: {have}. Install python3 on the node (e.g. apt-get install "
        f"python3-minimal) and restart this pod."
    )


def build_plugin(target: Path, interpreter: str) -> None:
    """Writes the plugin as one executable zipapp (stdlib-only modules), atomically."""
    src = Path(__file__).resolve().parent
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".ztunnel-cni-")
    try:
        with os.fdopen(fd, "wb") as f:
            # -I: the runtime's environment (PYTHONPATH, user site) cannot inject code into a
            # plugin that runs as root; -S: no site-packages, the plugin needs only the stdlib.
            f.write(f"#!{interpreter} -IS\n".encode())
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for name in ("__init__.py", "selection.py", "plugin.py"):
                    z.write(src / name, f"cni/{name}")
                z.writestr(
                    "__main__.py", "import sys\nfrom cni import plugin\nsys.exit(plugin.main())\n"
                )
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str, mode: int = 0o644) -> bool:
    """Writes if different; True when it wrote."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


# ---- the installer -------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallSettings:
    cni_bin_dir: Path = Path("/host/opt/cni/bin")
    cni_conf_dir: Path = Path("/host/etc/cni/net.d")
    host_root: Path = Path("/host")
    # Paths as the plugin sees them ON THE HOST (written into the chain entry).
    kubeconfig_host_path: str = "/etc/cni/net.d/ztunnel-cni-kubeconfig"
    enrolment_socket: str = "/var/run/ztunnel/ztunnel.sock"
    pod_record_dir: str = "/var/run/ztunnel/cni-pods"
    exclude_namespaces: tuple[str, ...] = selection.DEFAULT_EXCLUDED_NAMESPACES
    api_server: str = ""  # https://host:port; default from KUBERNETES_SERVICE_HOST/PORT
    token_file: Path = SA_DIR / "token"
    ca_file: Path = SA_DIR / "ca.crt"
    daemonset: str = "ztunnel"  # namespace/name is pod namespace + this
    namespace: str = "istio-system"
    poll_interval: float = 1.0
    host_python: str = ""  # skip discovery (tests, or a non-standard host layout)

    @property
    def kubeconfig_path(self) -> str:
        return self.kubeconfig_host_path

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise InstallError("poll_interval: must be positive")


@dataclass
class Installer:
    settings: InstallSettings
    daemonset_deleted: Callable[[], bool] = field(default=lambda: False)
    _kubeconfig_local: Path = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        # The kubeconfig lives in the conf dir; its host path and our path differ by mount.
        self._kubeconfig_local = s.cni_conf_dir / Path(s.kubeconfig_host_path).name

    def server_url(self) -> str:
        s = self.settings
        if s.api_server:
            return s.api_server
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            raise InstallError(
                "no API server: give --api-server or run in a pod (KUBERNETES_SERVICE_HOST)"
            )
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    def install_plugin(self) -> None:
        s = self.settings
        interpreter = s.host_python
        if not interpreter:
            interpreter, version = find_host_python(s.host_root)
            log.info("host python: %s (%d.%d)", interpreter, *version)
        build_plugin(s.cni_bin_dir / plugin.PLUGIN_TYPE, interpreter)

    def write_kubeconfig(self) -> bool:
        s = self.settings
        try:
            token = s.token_file.read_text().strip()
            ca = s.ca_file.read_bytes()
        except OSError as e:
            raise InstallError(f"service account credentials unreadable: {e}") from None
        doc = kubeconfig_document(self.server_url(), ca, token)
        return write_atomic(self._kubeconfig_local, json.dumps(doc, indent=2) + "\n", 0o600)

    def ensure_chain(self) -> Path | None:
        """Our entry last in the primary config; returns the file (None: no primary yet)."""
        s = self.settings
        primary = primary_config(s.cni_conf_dir)
        if primary is None:
            return None
        text = primary.read_text()
        if primary.suffix == ".conflist" or _looks_like_conflist(text):
            new = insert_entry(text, plugin_entry(s))
            if write_atomic(primary, new):
                log.info("ztunnel-cni appended to the chain in %s", primary)
            return primary
        target = primary.with_suffix(".conflist")
        new = insert_entry(conf_to_conflist(text), plugin_entry(s))
        write_atomic(target, new)
        primary.unlink()
        log.info("converted %s to %s with ztunnel-cni chained", primary.name, target.name)
        return target

    def uninstall(self) -> None:
        s = self.settings
        try:
            names = os.listdir(s.cni_conf_dir)
        except FileNotFoundError:
            names = []
        for n in names:
            p = s.cni_conf_dir / n
            if n.endswith(CONFIG_SUFFIXES) and p.is_file():
                try:
                    text = p.read_text()
                    if _looks_like_conflist(text):
                        new = remove_entry(text)
                        if new != text:
                            write_atomic(p, new)
                except (OSError, ValueError) as e:
                    log.warning("leaving %s as it is: %s", p, e)
        for p in (self._kubeconfig_local, s.cni_bin_dir / plugin.PLUGIN_TYPE):
            p.unlink(missing_ok=True)
        log.info("ztunnel-cni removed from the node")

    def run(self, stop: threading.Event) -> int:
        """Install, then keep it installed until `stop`; returns the exit status."""
        self.install_plugin()
        self.write_kubeconfig()
        last_token = _mtime(self.settings.token_file)
        while not stop.is_set():
            try:
                self.ensure_chain()
                token = _mtime(self.settings.token_file)
                if token != last_token:
                    last_token = token
                    if self.write_kubeconfig():
                        log.info("kubeconfig refreshed (service account token rotated)")
            except (OSError, ValueError, InstallError) as e:
                log.error("keeping the chain: %s", e)
            stop.wait(self.settings.poll_interval)
        if self.daemonset_deleted():
            self.uninstall()
        else:
            log.info("leaving the chain in place (not a DaemonSet deletion: upgrade or restart)")
        return 0


def _looks_like_conflist(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("plugins"), list)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def daemonset_deleted_check(
    kubeconfig: str | None, namespace: str, name: str
) -> Callable[[], bool]:
    """True when our DaemonSet is gone or being deleted; unknown (API away) counts as not."""

    def check() -> bool:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        try:
            if kubeconfig:
                api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
            else:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                api_client = client.ApiClient()
            resp: Any = client.AppsV1Api(api_client).read_namespaced_daemon_set(
                name, namespace, _request_timeout=5, _preload_content=False
            )
            # Raw JSON: the client's models would reject objects it does not fully expect.
            meta = json.loads(resp.data).get("metadata") or {}
            return bool(meta.get("deletionTimestamp"))
        except ApiException as e:
            return bool(e.status == 404)
        except Exception as e:  # the API is away: keep the chain (fail closed)
            log.warning(
                "cannot tell whether the DaemonSet is being deleted (%s); keeping the chain", e
            )
            return False

    return check


def main(args: Any) -> int:
    settings = InstallSettings(
        cni_bin_dir=Path(args.cni_bin_dir),
        cni_conf_dir=Path(args.cni_conf_dir),
        host_root=Path(args.host_root),
        kubeconfig_host_path=args.kubeconfig_host_path,
        enrolment_socket=args.enrolment_socket,
        pod_record_dir=args.pod_record_dir,
        exclude_namespaces=tuple(args.exclude_namespaces.split(","))
        if args.exclude_namespaces
        else (),
        api_server=args.api_server,
        token_file=Path(args.token_file),
        ca_file=Path(args.ca_file),
        daemonset=args.daemonset,
        namespace=args.namespace,
        poll_interval=args.poll_interval,
        host_python=args.host_python,
    )
    inst = Installer(
        settings,
        daemonset_deleted_check(args.kubeconfig or None, settings.namespace, settings.daemonset),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        return inst.run(stop)
    except InstallError as e:
        log.error("%s", e)
        return 2


__all__ = ["InstallError", "InstallSettings", "Installer", "kubeconfig_document"]
