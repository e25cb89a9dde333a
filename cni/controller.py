"""The node enrolment controller: watches Kubernetes and keeps the node agent's enrolment in step.

Two informers (Namespaces; this node's Pods by the `spec.nodeName` field selector) use the
official `kubernetes` client: list, then watch from the list's resourceVersion with bookmarks,
resume from the last seen version, re-list on 410 Gone, bounded exponential back-off while the
API server is away (the last known state keeps being applied). A reconciler thread applies
`cni.reconcile.plan` through the agent's enrolment socket and patches the pods' redirection
annotation; it re-runs on every event and every `resync_interval` (the agent's view changes
too: CNI ADDs, capture health). On start it lists, compares with what the agent has enrolled
(kept in pinned maps across restarts) and converges; enrolled pods are never touched on the
way, so established connections stay as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni import plugin, reconcile, selection
from ztunnel.enrolment import EnrolmentError, request

log = logging.getLogger("ztunnel-cni.controller")

HTTP_GONE = 410


@dataclass(frozen=True)
class ControllerSettings:
    node_name: str
    enrolment_socket: str
    kubeconfig: str = ""  # empty: in-cluster service account
    pod_record_dir: str = plugin.DEFAULTS["pod_record_dir"]  # type: ignore[assignment]
    exclude_namespaces: tuple[str, ...] = selection.DEFAULT_EXCLUDED_NAMESPACES
    resync_interval: float = 2.0
    watch_timeout: float = 300.0
    request_timeout: float = 10.0
    orphan_grace: float = 30.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if not self.node_name:
            raise ValueError("node_name: required (the node whose pods this controller enrols)")
        for name in (
            "resync_interval",
            "watch_timeout",
            "request_timeout",
            "backoff_initial",
            "backoff_max",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")


class Backoff:
    """Exponential back-off with full jitter, bounded (AWS architecture blog's 'full jitter')."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.attempt = initial, maximum, 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class Informer:
    """List+watch of one resource into a dict keyed by `key(obj)`; calls `changed()` after
    each update. Runs on its own thread until `stop`."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        kwargs: Mapping[str, Any],
        key: Callable[[Mapping[str, Any]], str],
        changed: Callable[[str, str, Mapping[str, Any]], None],
        settings: ControllerSettings,
        stop: threading.Event,
    ) -> None:
        self.name = name
        self._list = list_fn
        self._kwargs = dict(kwargs)
        self._key = key
        self._changed = changed
        self._settings = settings
        self._stop = stop
        self.items: dict[str, Mapping[str, Any]] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.resource_version = ""
        self.relists = 0
        self.errors = 0
        self._watch: Any = None

    def run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                # return_type "object": events carry the JSON as sent, never the client's
                # models (whose validation would reject fields the API may leave empty),
                # and ERROR events (410 Gone) still become ApiException.
                w = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
                self._watch = w
                for event in w.stream(  # type: ignore[no-untyped-call]
                    self._list,
                    resource_version=self.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=int(self._settings.watch_timeout),
                    _request_timeout=(
                        self._settings.request_timeout,
                        self._settings.watch_timeout + 30,
                    ),
                    **self._kwargs,
                ):
                    if self._stop.is_set():
                        break
                    self._apply(event)
                    backoff.reset()
            except ApiException as e:
                if e.status == HTTP_GONE:
                    log.info(
                        "%s: resourceVersion %s expired (410 Gone): re-listing",
                        self.name,
                        self.resource_version,
                    )
                    need_list = True
                    continue
                self._failed(f"API error {e.status} {e.reason}", backoff)
            except Exception as e:  # urllib3/SSL/socket errors: the API server is away
                self._failed(f"{type(e).__name__}: {e}", backoff)
                need_list = need_list or not self.resource_version
            finally:
                self._watch = None

    def _failed(self, what: str, backoff: Backoff) -> None:
        self.errors += 1
        delay = backoff.next()
        if not self._stop.is_set():
            log.warning(
                "%s: %s; retrying in %.1fs (last known state stays applied)", self.name, what, delay
            )
        self._stop.wait(delay)

    def _relist(self) -> None:
        resp = self._list(
            _preload_content=False, _request_timeout=self._settings.request_timeout, **self._kwargs
        )
        body = json.loads(resp.data)
        items = {self._key(o): o for o in body.get("items") or []}
        with self.lock:
            old = self.items
            self.items = items
            self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.relists += 1
        self.synced.set()
        for k in set(old) - set(items):
            self._changed("DELETED", k, old[k])
        self._changed("SYNC", "", {})

    def _apply(self, event: Mapping[str, Any]) -> None:
        type_ = event.get("type")
        obj = event.get("raw_object") or {}
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if type_ == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return
        k = self._key(obj)
        with self.lock:
            if type_ == "DELETED":
                self.items.pop(k, None)
            else:
                self.items[k] = obj
            self.resource_version = rv or self.resource_version
        self._changed(str(type_), k, obj)

    def stop(self) -> None:
        w = self._watch
        if w is not None:
            w.stop()


def _meta_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def read_cni_records(directory: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for n in names:
        if n.endswith(".json") and not n.startswith("."):
            rec = plugin.read_record(os.path.join(directory, n))
            if rec is not None:
                out.append(rec)
    return out


class NodeController:
    def __init__(self, settings: ControllerSettings, api_client: Any = None) -> None:
        from kubernetes import client, config

        self.settings = settings
        if api_client is None:
            if settings.kubeconfig:
                api_client = config.new_client_from_config(config_file=settings.kubeconfig)  # type: ignore[no-untyped-call]
            else:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                api_client = client.ApiClient()
        self.api = client.CoreV1Api(api_client)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._deleted: dict[str, float] = {}
        self._missing: dict[str, float] = {}
        self.namespaces = Informer(
            "namespaces",
            self.api.list_namespace,
            {},
            _meta_key,
            self._changed,
            settings,
            self._stop,
        )
        self.pods = Informer(
            f"pods on {settings.node_name}",
            self.api.list_pod_for_all_namespaces,
            {"field_selector": f"spec.nodeName={settings.node_name}"},
            _meta_key,
            self._changed,
            settings,
            self._stop,
        )
        self._threads: list[threading.Thread] = []
        self.status: dict[str, reconcile.PodStatus] = {}
        self.agent_available = False
        self.passes = 0
        self.converged = threading.Event()

    def _changed(self, type_: str, key: str, obj: Mapping[str, Any]) -> None:
        if type_ == "DELETED" and obj.get("kind", "Pod") == "Pod" and "/" in key:
            self._deleted[key] = time.monotonic()
        self._wake.set()

    def start(self) -> None:
        for target, name in (
            (self.namespaces.run, "informer-namespaces"),
            (self.pods.run, "informer-pods"),
            (self._reconcile_loop, "reconciler"),
        ):
            t = threading.Thread(target=target, name=f"ztunnel-cni {name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self.namespaces.stop()
        self.pods.stop()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _reconcile_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while not self._stop.is_set():
            self._wake.wait(self.settings.resync_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not (self.namespaces.synced.is_set() and self.pods.synced.is_set()):
                continue
            try:
                acted = self.reconcile_once()
                backoff.reset()
            except EnrolmentError as e:
                self.agent_available = False
                self.converged.clear()
                delay = backoff.next()
                log.warning("node agent unavailable (%s); retrying in %.1fs", e, delay)
                self._stop.wait(delay)
                continue
            if acted:
                self._wake.set()  # look again: the agent's answers changed its view

    def reconcile_once(self) -> bool:
        """One pass; True when it sent requests or patches (another pass should follow)."""
        s = self.settings
        agent = request(s.enrolment_socket, {"op": "list"}, timeout=s.request_timeout)["pods"]
        self.agent_available = True
        with self.pods.lock:
            pods = {k: reconcile.PodView.from_object(o) for k, o in self.pods.items.items()}
        with self.namespaces.lock:
            namespaces = {
                k: dict((o.get("metadata") or {}).get("labels") or {})
                for k, o in self.namespaces.items.items()
            }
        now = time.monotonic()
        for k in list(self._missing):
            if k in pods or k not in agent:
                del self._missing[k]
        for k in list(self._deleted):
            if k not in agent:  # nothing left to remove: forget it (bounded memory)
                self._deleted.pop(k, None)
        gone = set()
        for k in set(agent) - set(pods):
            first = self._missing.setdefault(k, now)
            if k in self._deleted or now - first >= s.orphan_grace:
                gone.add(k)
        p = reconcile.plan(
            pods,
            namespaces,
            agent,
            read_cni_records(s.pod_record_dir),
            s.exclude_namespaces,
            frozenset(gone),
        )
        acted = False
        for req in p.requests:
            try:
                request(s.enrolment_socket, req.body, timeout=max(s.request_timeout, 30.0))
                log.info("%s %s (%s)", req.body["op"], req.key, req.why)
                acted = True
                self._deleted.pop(req.key, None)
            except EnrolmentError as e:
                if "not reachable" in str(e):
                    raise
                log.warning("%s %s failed: %s", req.body["op"], req.key, e)
        for a in p.annotations:
            if self._annotate(a):
                acted = True
        for note in p.notes:
            log.debug("%s", note)
        self.status = p.status
        self.passes += 1
        if not p.requests and not p.annotations:
            self.converged.set()
        else:
            self.converged.clear()
        return acted

    def _annotate(self, a: reconcile.Annotate) -> bool:
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"annotations": {selection.REDIRECTION_ANNOTATION: a.value}}}
        try:
            # Through pods/status, as istio-cni does: RBAC can grant patching the status
            # subresource (which may change labels and annotations) without the pod itself.
            self.api.patch_namespaced_pod_status(
                a.name,
                a.namespace,
                body,
                _content_type="application/merge-patch+json",
                _request_timeout=self.settings.request_timeout,
                _preload_content=False,
            )
            log.info(
                "pod %s/%s: %s %s",
                a.namespace,
                a.name,
                selection.REDIRECTION_ANNOTATION,
                a.value or "removed",
            )
            return True
        except ApiException as e:
            if e.status != 404:
                log.warning(
                    "annotating %s/%s failed: %s %s", a.namespace, a.name, e.status, e.reason
                )
        except Exception as e:
            log.warning("annotating %s/%s failed: %s", a.namespace, a.name, e)
        return False


def main(args: Any) -> int:
    import signal

    settings = ControllerSettings(
        node_name=args.node_name,
        enrolment_socket=args.enrolment_socket,
        kubeconfig=args.kubeconfig,
        pod_record_dir=args.pod_record_dir,
        exclude_namespaces=tuple(x for x in args.exclude_namespaces.split(",") if x),
        resync_interval=args.resync_interval,
    )
    ctl = NodeController(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctl.start()
    log.info("enrolment controller for node %s started", settings.node_name)
    status_file = Path(args.status_file) if args.status_file else None
    while not stop.wait(0.5):
        if status_file is not None:
            _write_status(status_file, ctl)
    ctl.stop()
    return 0


def _write_status(path: Path, ctl: NodeController) -> None:
    data = {
        "agent_available": ctl.agent_available,
        "converged": ctl.converged.is_set(),
        "pods": {k: dataclasses.asdict(v) for k, v in ctl.status.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)
