"""The API server stand-in against real clients: kubectl 1.32 and the official Python client
(watch semantics: resourceVersion resume, bookmarks, 410 Gone, selectors), plus abuse."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.integration.cni.conftest import NS, PODS, Api
from ztunnel.lab.kubeapi import Fault

pytestmark = pytest.mark.integration


def kubectl(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("kubectl") is None:
        pytest.fail(
            "kubectl is not installed (the machines have 1.32; Debian's kubernetes-client elsewhere)"
        )
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(api.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def core(api: Api) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(config_file=str(api.kubeconfig)))


def test_kubectl_labels_annotates_gets_and_deletes(kubeapi: Api) -> None:
    kubeapi.namespace("shop")
    kubeapi.pod("shop", "echo-1", labels={"app": "echo"})
    r = kubectl(kubeapi, "label", "namespace", "shop", "istio.io/dataplane-mode=ambient")
    assert r.returncode == 0, r.stderr
    assert kubeapi.store.get(NS, "", "shop")["metadata"]["labels"] == {
        "istio.io/dataplane-mode": "ambient"
    }
    r = kubectl(kubeapi, "annotate", "pod", "-n", "shop", "echo-1", "team=payments")
    assert r.returncode == 0, r.stderr
    r = kubectl(kubeapi, "get", "pods", "-n", "shop", "-l", "app=echo", "-o", "json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert [i["metadata"]["annotations"] for i in items] == [{"team": "payments"}]
    assert (
        kubectl(kubeapi, "label", "namespace", "shop", "istio.io/dataplane-mode-").returncode == 0
    )
    assert kubeapi.store.get(NS, "", "shop")["metadata"].get("labels") == {}
    r = kubectl(kubeapi, "label", "namespace", "nope", "a=b")
    assert r.returncode != 0 and "not found" in r.stderr
    assert kubectl(kubeapi, "delete", "pod", "-n", "shop", "echo-1", "--wait=false").returncode == 0
    assert kubeapi.store.list(PODS)[0] == []


def test_watch_resumes_from_a_resource_version_with_bookmarks(kubeapi: Api) -> None:
    kubeapi.namespace("a")
    v1 = core(kubeapi)
    listing = json.loads(v1.list_namespace(_preload_content=False).data)
    rv = listing["metadata"]["resourceVersion"]
    kubeapi.namespace("b")
    kubeapi.store.patch(
        NS, "", "a", {"metadata": {"labels": {"x": "1"}}}, "application/merge-patch+json"
    )
    seen: list[tuple[str, str]] = []
    for ev in watch.Watch().stream(
        v1.list_namespace, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=2
    ):
        seen.append((ev["type"], ev["raw_object"]["metadata"].get("name", "")))
        if ev["type"] == "BOOKMARK":
            assert int(ev["raw_object"]["metadata"]["resourceVersion"]) >= int(rv) + 2
            break
    assert seen[:2] == [("ADDED", "b"), ("MODIFIED", "a")] and seen[-1][0] == "BOOKMARK"


def test_too_old_resource_version_is_410_gone(kubeapi: Api) -> None:
    kubeapi.namespace("first")
    v1 = core(kubeapi)
    old = json.loads(v1.list_namespace(_preload_content=False).data)["metadata"]["resourceVersion"]
    for i in range(60):  # the stand-in keeps 50 events in this fixture
        kubeapi.namespace(f"n{i}")
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(v1.list_namespace, resource_version=old, timeout_seconds=2):
            pass
    assert e.value.status == 410


def test_field_and_label_selectors_filter_lists_and_watches(kubeapi: Api) -> None:
    kubeapi.namespace("shop")
    kubeapi.pod("shop", "on-n0", node="n0", labels={"app": "x"})
    kubeapi.pod("shop", "on-n1", node="n1", labels={"app": "x"})
    v1 = core(kubeapi)
    got = json.loads(
        v1.list_pod_for_all_namespaces(
            field_selector="spec.nodeName=n0", _preload_content=False
        ).data
    )
    assert [p["metadata"]["name"] for p in got["items"]] == ["on-n0"]
    rv = got["metadata"]["resourceVersion"]
    # A label change moves a pod out of a label-selected watch: DELETED, as the real API.
    kubeapi.store.patch(
        PODS,
        "shop",
        "on-n0",
        {"metadata": {"labels": {"app": "y"}}},
        "application/merge-patch+json",
    )
    kubeapi.store.patch(
        PODS,
        "shop",
        "on-n1",
        {"metadata": {"labels": {"tier": "1"}}},
        "application/merge-patch+json",
    )
    events = [
        (e["type"], e["raw_object"]["metadata"]["name"])
        for e in watch.Watch().stream(
            v1.list_pod_for_all_namespaces,
            label_selector="app in (x),app!=z",
            resource_version=rv,
            timeout_seconds=1,
        )
    ]
    assert events == [("DELETED", "on-n0"), ("MODIFIED", "on-n1")]
    with pytest.raises(ApiException) as e:
        v1.list_pod_for_all_namespaces(field_selector="spec.schedulerName=x")
    assert e.value.status == 400 and "field label not supported" in str(e.value.body)


def raw(api: Api, request: bytes, token: bool = True) -> tuple[int, dict[str, Any]]:
    host, port = api.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cadata=api.server.ca_pem.decode())
    with (
        socket.create_connection((host, int(port)), timeout=10) as s,
        ctx.wrap_socket(s, server_hostname=host) as t,
    ):
        auth = b"Authorization: Bearer test-token\r\n" if token else b""
        head, _, body = request.partition(b"\r\n\r\n")
        t.sendall(head + b"\r\n" + auth + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := t.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2] or b"{}")


def req(
    line: str,
    body: bytes = b"",
    ctype: str = "application/merge-patch+json",
    length: int | None = None,
) -> bytes:
    n = len(body) if length is None else length
    return (
        f"{line} HTTP/1.1\r\nContent-Type: {ctype}\r\nContent-Length: {n}\r\n\r\n".encode() + body
    )


POD = json.dumps({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c"}]}}).encode()


@pytest.mark.parametrize(
    ("request_bytes", "code", "reason"),
    [
        (req("PATCH /api/v1/namespaces/shop", b"{nope"), 400, "BadRequest"),
        (req("PATCH /api/v1/namespaces/shop", b"[1]"), 400, "BadRequest"),
        (
            req("PATCH /api/v1/namespaces/shop", b"{}", "application/json-patch+json"),
            415,
            "UnsupportedMediaType",
        ),
        (req("PATCH /api/v1/namespaces/shop", b'{"metadata":{"labels":{"a":7}}}'), 422, "Invalid"),
        (
            req(
                "PATCH /api/v1/namespaces/shop",
                b'{"metadata":{"$patch":"frobnicate"}}',
                "application/strategic-merge-patch+json",
            ),
            415,
            "UnsupportedMediaType",
        ),
        (req("PUT /api/v1/namespaces/shop", b'{"metadata":{"name":"other"}}'), 400, "BadRequest"),
        (req("GET /api/v1/frobs"), 404, "NotFound"),
        (req("GET /api/v1/namespaces/shop/pods?labelSelector=a%3D%3D%3Db%21"), 400, "BadRequest"),
        (req("GET /api/v1/pods?watch=true&resourceVersion=banana"), 400, "BadRequest"),
        (req("POST /api/v1/namespaces/shop/pods", b'{"metadata":{"name":"x"}}'), 422, "Invalid"),
        (
            req(
                "POST /api/v1/namespaces/shop/pods",
                b'{"metadata":{"name":"Not_A_Name"},"spec":{"containers":[{"name":"c"}]}}',
            ),
            422,
            "Invalid",
        ),
        (req("POST /api/v1/namespaces/ghost/pods", POD), 404, "NotFound"),
        (req("POST /api/v1/namespaces", length=99_999_999), 413, "RequestEntityTooLarge"),
        (req("DELETE /api/v1/namespaces/shop/pods/ghost"), 404, "NotFound"),
    ],
)
def test_bad_requests_get_a_status_and_the_server_keeps_serving(
    kubeapi: Api, request_bytes: bytes, code: int, reason: str
) -> None:
    kubeapi.namespace("shop")
    status, body = raw(kubeapi, request_bytes)
    assert status == code and body["kind"] == "Status" and body["reason"] == reason, body
    assert raw(kubeapi, b"GET /api/v1/namespaces/shop HTTP/1.1\r\n\r\n")[0] == 200
    assert raw(kubeapi, req("POST /api/v1/namespaces/shop/pods", POD))[0] == 201


def test_conflicting_update_is_409(kubeapi: Api) -> None:
    kubeapi.namespace("shop")
    kubeapi.store.patch(
        NS, "", "shop", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json"
    )
    body = json.dumps({"metadata": {"name": "shop", "resourceVersion": "1"}}).encode()
    status, out = raw(
        kubeapi,
        b"PUT /api/v1/namespaces/shop HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert status == 409 and out["reason"] == "Conflict"


def test_requests_without_the_token_are_401(kubeapi: Api) -> None:
    status, body = raw(kubeapi, b"GET /api/v1/namespaces HTTP/1.1\r\n\r\n", token=False)
    assert status == 401 and body["reason"] == "Unauthorized"


def test_a_silent_client_does_not_block_others_and_faults_can_be_injected(kubeapi: Api) -> None:
    host, port = kubeapi.url.removeprefix("https://").rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]  # never handshake
    try:
        kubeapi.server.inject(Fault("GET", "^/api/v1/namespaces$", status=503, count=1))
        assert raw(kubeapi, b"GET /api/v1/namespaces HTTP/1.1\r\n\r\n")[0] == 503
        assert raw(kubeapi, b"GET /api/v1/namespaces HTTP/1.1\r\n\r\n")[0] == 200
        kubeapi.server.inject(Fault("GET", "^/version$", status=0, delay=0.5, count=1))
        t0 = time.monotonic()
        assert raw(kubeapi, b"GET /version HTTP/1.1\r\n\r\n")[0] == 200
        assert time.monotonic() - t0 >= 0.5
    finally:
        for s in idle:
            s.close()


def test_many_concurrent_watches_end_when_the_server_stops(kubeapi: Api) -> None:
    v1 = core(kubeapi)
    done: list[str] = []

    def watcher() -> None:
        try:
            for _ in watch.Watch().stream(v1.list_namespace, timeout_seconds=30):
                pass
            done.append("ended")
        except Exception as e:
            done.append(type(e).__name__)

    threads = [threading.Thread(target=watcher, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    kubeapi.server.stop()
    for t in threads:
        t.join(10)
    assert len(done) == 10


def test_pod_status_patch_changes_status_labels_and_annotations_but_not_the_spec(
    kubeapi: Api,
) -> None:
    """As the real API's pod status strategy: istio-cni (and our controller) annotate pods
    through pods/status, which RBAC can grant without the pod itself."""
    kubeapi.namespace("shop")
    kubeapi.pod("shop", "echo-1", labels={"app": "echo"})
    api = core(kubeapi)
    before = api.read_namespaced_pod("echo-1", "shop").spec.node_name
    api.patch_namespaced_pod_status(
        "echo-1",
        "shop",
        {
            "metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}},
            "spec": {"nodeName": "elsewhere"},
            "status": {"phase": "Running"},
        },
        _content_type="application/merge-patch+json",
    )
    pod = kubeapi.store.get(PODS, "shop", "echo-1")
    assert pod["metadata"]["annotations"] == {"ambient.istio.io/redirection": "enabled"}
    assert pod["metadata"]["labels"] == {"app": "echo"}
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"].get("nodeName") == before
