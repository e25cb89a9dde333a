"""`ztunnel analyze --kube` against a cluster: the API server stand-in, loaded with the real
`kubectl apply -f`, read through the official client over HTTPS with a bearer token. Exact
output lines and istioctl's exit codes; API failures end with a clear message, exit 1."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.analyze.conftest import (
    CLUSTER,
    CRDS,
    REFERENCE,
    Analyze,
    Cluster,
    ztunnel_cli,
)
from ztunnel.analyze import command, kube
from ztunnel.lab.kubeapi import Fault, make_certificates

pytestmark = pytest.mark.integration

CONFLICT = (
    "The VirtualServices {a},{b} associated with mesh gateway define the same host */{host} "
    "which can lead to undefined behavior. This can be fixed by merging the conflicting "
    "VirtualServices into a single resource."
)
HELLOWORLD = CONFLICT.format(
    a="default/helloworld-v1",
    b="default/helloworld-v2",
    host="helloworld.default.svc.cluster.local",
)
HELLOWORLD_LINES = [
    f"Error [IST0109] (VirtualService default/helloworld-v1) {HELLOWORLD}",
    f"Error [IST0109] (VirtualService default/helloworld-v2) {HELLOWORLD}",
]
SHOP_LINES = [
    "Error [IST0173] (DestinationRule shop/reviews) The Subset v3 defined in the "
    "DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
]


def issues(target: str) -> str:
    return (
        f"Error: Analyzers found issues when analyzing {target}.\n"
        f"See {REFERENCE} for more information about causes and resolutions.\n"
    )


# ---- what people run first --------------------------------------------------------------------


def test_the_helloworld_example_through_the_real_command_line(
    mesh: Cluster, tmp_path: Path
) -> None:
    """istioctl's first example, as a user runs it: `ztunnel analyze --kube` with the
    kubeconfig of a cluster loaded by kubectl; the two IST0109 errors name both
    VirtualServices, without file references (the resources came from the cluster)."""
    r = ztunnel_cli(tmp_path, "--kube", "--kubeconfig", str(mesh.kubeconfig))
    assert r.lines == HELLOWORLD_LINES, r.err
    assert r.err == issues("namespace: default")
    assert r.rc == 79


def test_the_kubeconfig_from_the_environment(
    mesh: Cluster, analyze: Analyze, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --kubeconfig: $KUBECONFIG, as kubectl finds it."""
    monkeypatch.setenv("KUBECONFIG", str(mesh.kubeconfig))
    out, err = io.StringIO(), io.StringIO()
    rc = command.main(["--kube"], io.StringIO(), out, err)
    assert (rc, out.getvalue().splitlines()) == (79, HELLOWORLD_LINES)


def test_a_clean_namespace(mesh: Cluster, analyze: Analyze) -> None:
    r = analyze(mesh, "-n", "clean")
    assert (r.rc, r.out) == (0, "\n")
    assert r.err == "\u2714 No validation issues found when analyzing namespace: clean.\n"


def test_a_clean_cluster(cluster: Cluster, analyze: Analyze) -> None:
    cluster.apply(CRDS)
    cluster.apply(CLUSTER / "namespaces.yaml")
    cluster.apply(CLUSTER / "clean.yaml")
    r = analyze(cluster, "-A")
    assert (r.rc, r.out) == (0, "\n")
    assert r.err == "\u2714 No validation issues found when analyzing all namespaces.\n"


# ---- scope: -n, -A, the kubeconfig context's namespace -------------------------------------


def test_namespace_selection(mesh: Cluster, analyze: Analyze) -> None:
    r = analyze(mesh, "-n", "shop")
    assert (r.rc, r.lines, r.err) == (79, SHOP_LINES, issues("namespace: shop"))
    r = analyze(mesh, "-A")
    assert r.lines == HELLOWORLD_LINES + SHOP_LINES
    assert (r.rc, r.err) == (79, issues("all namespaces"))
    # Without -n, the kubeconfig context's namespace (as kubectl), else default.
    in_shop = mesh.kubeconfig_with("shop.kubeconfig", namespace="shop")
    r = analyze(mesh, kubeconfig=in_shop)
    assert (r.rc, r.lines) == (79, SHOP_LINES)
    r = analyze(mesh, "-n", "default", kubeconfig=in_shop)
    assert (r.rc, r.lines) == (79, HELLOWORLD_LINES)
    # A namespace the cluster does not have: istioctl's note, nothing analyzed.
    r = analyze(mesh, "-n", "nope")
    assert (r.rc, r.out, r.err) == (0, "", 'namespace "nope" not found\n')


def test_the_context_flag(mesh: Cluster, analyze: Analyze, tmp_path: Path) -> None:
    """--context picks a kubeconfig context (and its namespace), as kubectl's flag does; a
    context the kubeconfig does not have is an error, not the current one silently."""
    doc = json.loads(mesh.kubeconfig.read_text())
    shop = copy.deepcopy(doc["contexts"][0])
    shop["name"] = "shop-admin"
    shop["context"]["namespace"] = "shop"
    doc["contexts"].append(shop)
    two = tmp_path / "two-contexts"
    two.write_text(json.dumps(doc))
    r = analyze(mesh, kubeconfig=two)
    assert (r.rc, r.lines) == (79, HELLOWORLD_LINES)
    r = analyze(mesh, "--context", "shop-admin", kubeconfig=two)
    assert (r.rc, r.lines, r.err) == (79, SHOP_LINES, issues("namespace: shop"))
    r = analyze(mesh, "--context", "nope", kubeconfig=two)
    assert (r.rc, r.out) == (1, "")
    assert r.err.startswith("Error: no usable Kubernetes configuration: "), r.err
    assert "nope" in r.err and r.err.count("\n") == 1, r.err


def test_the_default_kubeconfig_is_found_at_run_time(
    mesh: Cluster, analyze: Analyze, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~/.kube/config and $KUBECONFIG as they are when the command runs (the client
    library resolves its default once, when first imported in the process)."""
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text(mesh.kubeconfig.read_text())
    monkeypatch.setenv("HOME", str(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    assert command.main(["--kube"], io.StringIO(), out, err) == 79
    assert out.getvalue().splitlines() == HELLOWORLD_LINES
    # $KUBECONFIG wins over ~/.kube/config; it may list several files (merged as kubectl
    # does: the first file that sets current-context decides).
    in_shop = mesh.kubeconfig_with("shop.kubeconfig", namespace="shop")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent'}:{in_shop}")
    out, err = io.StringIO(), io.StringIO()
    assert command.main(["--kube"], io.StringIO(), out, err) == 79
    assert out.getvalue().splitlines() == SHOP_LINES
    # Through the real command line, with a HOME of its own.
    cli = ztunnel_cli(tmp_path, "--kube", "-n", "shop")
    assert (cli.rc, cli.lines) == (79, SHOP_LINES), cli.err


# ---- files laid over the cluster ------------------------------------------------------------


def test_a_file_overrides_the_cluster_resource(mesh: Cluster, analyze: Analyze) -> None:
    """The fix for helloworld in a file: the cluster's helloworld-v2 is replaced by the
    file's, so the conflict is gone (istioctl: "to simulate the effect of applying" it)."""
    r = analyze(mesh, "helloworld-v2-canary.yaml")
    assert (r.rc, r.out) == (0, "\n")
    assert r.err == "\u2714 No validation issues found when analyzing helloworld-v2-canary.yaml.\n"


def test_a_change_in_files_checked_against_the_cluster(mesh: Cluster, analyze: Analyze) -> None:
    """A change to the clean namespace: the file's DestinationRule replaces the cluster's
    (the cluster's VirtualService now routes to a subset that is gone), and a new
    VirtualService conflicts with the cluster's. Messages about resources from the file
    carry its name and line, those about the cluster's none."""
    web = CONFLICT.format(a="clean/web", b="clean/web-canary", host="web.clean.svc.cluster.local")
    r = analyze(mesh, "-n", "clean", "web-change.yaml")
    assert r.lines == [
        "Error [IST0101] (VirtualService clean/web) Referenced host+subset in destinationrule "
        'not found: "web+v1"',
        f"Error [IST0109] (VirtualService clean/web-canary web-change.yaml:14) {web}",
        f"Error [IST0109] (VirtualService clean/web) {web}",
        "Error [IST0173] (DestinationRule clean/web web-change.yaml:1) The Subset canary "
        "defined in the DestinationRule does not select any pods. Which may lead to 503 UH "
        "(NoHealthyUpstream).",
    ]
    assert (r.rc, r.err) == (79, issues("namespace: clean"))


# ---- what the cluster serves ----------------------------------------------------------------


def test_without_the_gateway_api_crds(cluster: Cluster, analyze: Analyze) -> None:
    """The Gateway API is not installed (its lists are 404): the rest is analyzed, and a
    Service bound to a waypoint is reported, as no waypoint can exist."""
    cluster.apply(CRDS / "istio.yaml")
    cluster.apply(CLUSTER / "namespaces.yaml")
    cluster.apply(CLUSTER / "helloworld.yaml")
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "reviews",
            "namespace": "default",
            "labels": {"istio.io/use-waypoint": "waypoint"},
        },
        "spec": {"ports": [{"port": 9080, "name": "http"}], "selector": {"app": "reviews"}},
    }
    cluster.apply("-", stdin=yaml.safe_dump(svc))
    r = cluster.kubectl("get", "gateways.gateway.networking.k8s.io", "-A")
    assert r.returncode != 0 and "the server doesn't have a resource type" in r.stderr
    r = analyze(cluster)
    assert r.lines == [
        "Error [IST0101] (Service default/reviews) Referenced waypoint not found: "
        '"default/waypoint"',
        *HELLOWORLD_LINES,
    ]
    assert (r.rc, r.err) == (79, issues("namespace: default"))


def test_a_cluster_without_istio(cluster: Cluster, analyze: Analyze) -> None:
    """No Istio or Gateway API CRDs at all: the Services and pods are still analyzed."""
    cluster.apply(CLUSTER / "namespaces.yaml")
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"ports": [{"port": 80, "name": "web"}], "selector": {"app": "web"}},
    }
    cluster.apply("-", stdin=yaml.safe_dump(svc))
    r = analyze(cluster)
    assert r.lines == [
        "Info [IST0118] (Service default/web) Port name web (port: 80, targetPort: 80) doesn't "
        "follow the naming convention of Istio port."
    ]
    assert (r.rc, r.err) == (0, "")


def test_an_istio_that_serves_only_v1beta1(cluster: Cluster, analyze: Analyze) -> None:
    """Istio before 1.22 has no v1 API: the lists fall back to v1beta1."""
    old = []
    for crd in yaml.safe_load_all((CRDS / "istio.yaml").read_text()):
        crd["spec"]["versions"] = [v for v in crd["spec"]["versions"] if v["name"] != "v1"]
        crd["spec"]["versions"][0]["storage"] = True
        old.append(crd)
    cluster.apply("-", stdin=yaml.safe_dump_all(old))
    cluster.apply(CLUSTER / "namespaces.yaml")
    beta = (
        (CLUSTER / "helloworld.yaml")
        .read_text()
        .replace("networking.istio.io/v1\n", "networking.istio.io/v1beta1\n")
    )
    cluster.apply("-", stdin=beta)
    r = cluster.kubectl("get", "virtualservices.v1.networking.istio.io")
    assert r.returncode != 0
    r = analyze(cluster)
    assert (r.rc, r.lines) == (79, HELLOWORLD_LINES)


def test_lists_are_read_page_by_page(
    mesh: Cluster, analyze: Analyze, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = analyze(mesh, "-A")
    monkeypatch.setattr(kube, "PAGE_SIZE", 1)
    before = len(mesh.server.seen)
    paged = analyze(mesh, "-A")
    assert (paged.rc, paged.out, paged.err) == (whole.rc, whole.out, whole.err)
    asked = list(mesh.server.seen)[before:]
    assert any("/api/v1/pods?" in p and "continue=" in p for p in asked), asked


# ---- the API failing ------------------------------------------------------------------------


def test_wrong_token_is_401(mesh: Cluster, analyze: Analyze) -> None:
    r = analyze(mesh, kubeconfig=mesh.kubeconfig_with("bad.kubeconfig", token="not-the-token"))
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        "Error: listing /api/v1/namespaces: 401 Unauthorized: you must be logged in to the "
        "server (check the kubeconfig's credentials)\n"
    )


def test_server_errors_name_the_list_and_the_reason(cluster: Cluster, analyze: Analyze) -> None:
    cluster.apply(CRDS)
    cluster.apply(CLUSTER / "namespaces.yaml")
    cluster.server.inject(
        Fault("GET", r"^/apis/networking\.istio\.io/v1/virtualservices\?", 500, count=-1)
    )
    r = analyze(cluster)
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        "Error: listing /apis/networking.istio.io/v1/virtualservices: 500 Internal Server "
        "Error: injected fault\n"
    )
    cluster.server.clear_faults()
    forbidden = (
        'destinationrules.networking.istio.io is forbidden: User "system:serviceaccount:'
        'default:analyzer" cannot list resource "destinationrules" in API group '
        '"networking.istio.io" at the cluster scope'
    )
    cluster.server.inject(Fault("GET", r"/destinationrules\?", 403, count=-1, message=forbidden))
    r = analyze(cluster)
    assert r.err == (
        f"Error: listing /apis/networking.istio.io/v1/destinationrules: 403 Forbidden: "
        f"{forbidden}\n"
    )
    assert r.rc == 1


def test_an_unreachable_server(cluster: Cluster, analyze: Analyze, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        gone = cluster.kubeconfig_with("gone.kubeconfig", server=f"https://127.0.0.1:{port}")
        r = analyze(cluster, kubeconfig=gone)
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        f"Error: listing /api/v1/namespaces: The connection to the server 127.0.0.1:{port} "
        "was refused - did you specify the right host or port?\n"
    )
    # Through the real command line too: a message, never a traceback.
    cli = ztunnel_cli(tmp_path, "--kube", "--kubeconfig", str(gone))
    assert (cli.rc, cli.err) == (r.rc, r.err)


def test_a_server_that_does_not_answer(cluster: Cluster, analyze: Analyze) -> None:
    cluster.apply(CLUSTER / "namespaces.yaml")
    cluster.server.inject(Fault("GET", r"^/api/v1/services\?", status=0, delay=30, count=-1))
    r = analyze(cluster, "--timeout", "0.5")
    assert (r.rc, r.out) == (1, "")
    host = cluster.url.removeprefix("https://")
    assert r.err == (
        f"Error: listing /api/v1/services: the server {host} did not answer within 0.5 s "
        "(--timeout)\n"
    )


def test_a_server_whose_certificate_is_not_trusted(cluster: Cluster, analyze: Analyze) -> None:
    other_ca = make_certificates(["127.0.0.1"])[0]
    r = analyze(cluster, kubeconfig=cluster.kubeconfig_with("ca.kubeconfig", ca=other_ca))
    host = cluster.url.removeprefix("https://")
    assert (r.rc, r.out) == (1, "")
    assert r.err.startswith(
        f"Error: listing /api/v1/namespaces: Unable to connect to the server {host}: TLS: "
    ), r.err
    assert "CERTIFICATE_VERIFY_FAILED" in r.err and r.err.count("\n") == 1


@contextlib.contextmanager
def _not_kubernetes(status: int, body: bytes) -> Iterator[tuple[str, bytes]]:
    """An HTTPS server that is not a Kubernetes API server (a web server, a proxy's error
    page): every GET answers `status` with an HTML `body`. Yields its URL and CA."""
    ca, cert, key = make_certificates(["127.0.0.1"])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "cert.pem").write_bytes(cert + ca)
        (Path(d) / "key.pem").write_bytes(key)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(Path(d) / "cert.pem", Path(d) / "key.pem")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="not-kubernetes", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_server_that_is_not_kubernetes(cluster: Cluster, analyze: Analyze) -> None:
    """A URL that reaches some other web server: a clear error, not "no issues" from lists
    that all came back 404, and not a JSON decoder's traceback."""
    page = b"<html><body>Not Found</body></html>"
    with _not_kubernetes(404, page) as (url, ca):
        kc = cluster.kubeconfig_with("web404.kubeconfig", server=url, ca=ca)
        r = analyze(cluster, kubeconfig=kc)
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        "Error: listing /api/v1/namespaces: 404 Not Found: not a Kubernetes API server?\n"
    )
    with _not_kubernetes(200, page) as (url, ca):
        kc = cluster.kubeconfig_with("web200.kubeconfig", server=url, ca=ca)
        r = analyze(cluster, kubeconfig=kc)
    host = url.removeprefix("https://")
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        f"Error: listing /api/v1/namespaces: the answer is not JSON: is {host} a Kubernetes "
        "API server?\n"
    )
    # Plain HTTP to the (TLS) API server: the server hangs up; said in words, not reprs.
    plain = cluster.kubeconfig_with("http.kubeconfig", server=cluster.url.replace("https", "http"))
    r = analyze(cluster, kubeconfig=plain)
    host = cluster.url.removeprefix("https://")
    assert (r.rc, r.out) == (1, "")
    assert r.err.startswith(
        f"Error: listing /api/v1/namespaces: Unable to connect to the server {host}: "
    ), r.err
    assert "(" not in r.err and r.err.count("\n") == 1, r.err


def test_no_kubeconfig(cluster: Cluster, analyze: Analyze, tmp_path: Path) -> None:
    r = analyze(cluster, kubeconfig=tmp_path / "missing")
    assert (r.rc, r.out) == (1, "")
    assert (
        r.err
        == f"Error: no usable Kubernetes configuration: {tmp_path / 'missing'}: no such file\n"
    )
    for n, text in enumerate(("clusters: [1, 2\n", "clusters: [1, 2]\ncontexts: 7\n", "- 1\n")):
        garbage = tmp_path / f"garbage{n}"
        garbage.write_text(text)
        r = analyze(cluster, kubeconfig=garbage)
        assert (r.rc, r.out) == (1, ""), r.err
        assert r.err.startswith("Error: no usable Kubernetes configuration: "), r.err
        assert r.err.count("\n") == 1, r.err


# ---- abuse: what a broken API server lists ----------------------------------------------------


def test_malformed_objects_from_the_cluster_are_reported_not_fatal(
    cluster: Cluster, analyze: Analyze
) -> None:
    """The stand-in (like an API server without the CRDs' schemas) takes a VirtualService
    whose hosts is a string: IST0106 names it. An object that is not a resource at all
    (stored behind the API's back, as a broken conversion webhook could serve it) is
    reported with where it was listed; everything else is still analyzed."""
    cluster.apply(CRDS)
    cluster.apply(CLUSTER / "namespaces.yaml")
    cluster.apply(CLUSTER / "helloworld.yaml")
    bad = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "stringly", "namespace": "default"},
        "spec": {"hosts": "reviews", "http": [{"route": [{"destination": {"host": "r"}}]}]},
    }
    cluster.apply("-", stdin=yaml.safe_dump(bad))
    store = cluster.server.store
    res = store.find("networking.istio.io", "v1", "destinationrules")
    assert res is not None
    with store._lock:
        store._objects[(res.key, "default", "zz")] = {
            "metadata": {"name": ["zz"], "namespace": "default"}
        }
    r = analyze(cluster)
    assert r.lines == [
        "Error [IST0106] (VirtualService default/stringly) Schema validation error: "
        "spec.hosts: expected a list, got str",
        *HELLOWORLD_LINES,
    ]
    assert r.err == (
        "Error(s) reading the cluster: 1 error occurred:\n"
        "\t* DestinationRule #1 listed from /apis/networking.istio.io/v1/destinationrules: "
        "metadata.name: expected a string, got list\n\n" + issues("namespace: default")
    )
    assert r.rc == 79
    # Nothing else to report: the unreadable object makes the run fail as input errors do.
    r = analyze(cluster, "-n", "clean")
    assert r.err.endswith(
        "No validation issues found when analyzing namespace: clean (but 1 resource from "
        "the cluster could not be parsed).\n"
        "Error: Some resources from the cluster couldn't be parsed.\n"
    )
    assert r.rc == 65
