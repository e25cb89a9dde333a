"""The API server stand-in's custom resources, `kubectl apply` and pagination, against the
real kubectl 1.32 and the official Python client: CRDs define what is served (any group and
versions), kubectl applies, re-applies (three-way merge and strategic merge patches), gets
and deletes; lists page with limit/continue over a consistent snapshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.integration.cni.conftest import NS, PODS, Api

pytestmark = pytest.mark.integration

CRDS = Path(__file__).parents[1] / "analyze" / "testdata" / "crds"
VS = "virtualservices.networking.istio.io"


def kubectl(
    api: Api, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """kubectl with a discovery cache of this test's own (the server's port may be reused
    by a later test serving other kinds)."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (the machines have 1.32)")
    cache = api.kubeconfig.parent / "kube-cache"
    r = subprocess.run(
        ["kubectl", "--kubeconfig", str(api.kubeconfig), "--cache-dir", str(cache), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def apply(api: Api, *docs: dict[str, Any]) -> str:
    # As JSON (a v1 List): kubectl's YAML is 1.1, where an unquoted `Y` is a boolean.
    items = {"apiVersion": "v1", "kind": "List", "items": list(docs)}
    return kubectl(api, "apply", "-f", "-", stdin=json.dumps(items)).stdout


def get_json(api: Api, *args: str) -> Any:
    return json.loads(kubectl(api, "get", *args, "-o", "json").stdout)


def vs(name: str, hosts: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "shop", **extra},
        "spec": {"hosts": hosts, "http": [{"route": [{"destination": {"host": hosts[0]}}]}]},
    }


@pytest.fixture
def istio(kubeapi: Api) -> Api:
    kubectl(kubeapi, "apply", "-f", str(CRDS))
    kubectl(kubeapi, "wait", "--for", "condition=established", f"crd/{VS}", "--timeout=10s")
    kubeapi.namespace("shop")
    return kubeapi


def test_crds_define_what_is_served(istio: Api) -> None:
    r = kubectl(istio, "api-resources", "--api-group=networking.istio.io", "-o", "name")
    assert r.stdout.split() == [
        "destinationrules.networking.istio.io",
        "gateways.networking.istio.io",
        "serviceentries.networking.istio.io",
        VS,
    ]
    versions = kubectl(istio, "api-versions").stdout.split()
    assert {"networking.istio.io/v1", "networking.istio.io/v1beta1"} <= set(versions)
    assert "gateway.networking.k8s.io/v1beta1" in versions
    # Discovery prefers GA over beta over alpha, as the API server orders versions.
    group = client.ApisApi(_client(istio)).get_api_versions()
    istio_group = next(g for g in group.groups if g.name == "networking.istio.io")
    assert [v.version for v in istio_group.versions] == ["v1", "v1beta1", "v1alpha3"]
    assert istio_group.preferred_version.version == "v1"
    # The two Gateways (Istio's and the Gateway API's) are distinct kinds with one plural.
    assert kubectl(istio, "get", "gw,gtw", "-A").returncode == 0


def test_kubectl_applies_and_reapplies_custom_resources(istio: Api) -> None:
    out = apply(istio, vs("reviews", ["reviews"]), vs("ratings", ["ratings"]))
    assert out.split("\n")[:2] == [
        "virtualservice.networking.istio.io/reviews created",
        "virtualservice.networking.istio.io/ratings created",
    ]
    kubectl(istio, "label", "vs", "-n", "shop", "reviews", "team=books")  # out of band
    # Re-applied with changes: kubectl computes a JSON merge patch (no Go types for CRs).
    changed = vs("reviews", ["reviews", "reviews.example.com"])
    changed["spec"]["http"][0]["timeout"] = "5s"
    out = apply(istio, changed, vs("ratings", ["ratings"]))
    assert out.split("\n")[:2] == [
        "virtualservice.networking.istio.io/reviews configured",
        "virtualservice.networking.istio.io/ratings unchanged",
    ]
    got = get_json(istio, "vs", "-n", "shop", "reviews")
    assert got["spec"] == changed["spec"]
    assert got["metadata"]["labels"] == {"team": "books"}  # kept: not the manifest's field
    assert got["metadata"]["generation"] == 2
    applied = json.loads(
        got["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    )
    assert applied["spec"] == changed["spec"]
    assert any(
        s.startswith("PATCH /apis/networking.istio.io/v1/namespaces/shop/virtualservices/reviews")
        for s in istio.server.seen
    )
    # Served at every version of the CRD, stored once.
    beta = get_json(istio, "virtualservices.v1beta1.networking.istio.io", "-n", "shop", "reviews")
    assert beta["apiVersion"] == "networking.istio.io/v1beta1"
    assert beta["spec"] == got["spec"]
    # Strategic merge patches are refused for custom resources, as by the API server.
    r = kubectl(istio, "patch", "vs", "-n", "shop", "reviews", "-p", "{}", check=False)
    assert r.returncode != 0 and "the body of the request was in an unknown format" in r.stderr
    kubectl(istio, "patch", "vs", "-n", "shop", "reviews", "--type=merge", "-p", '{"spec":{"x":1}}')
    kubectl(istio, "delete", "vs", "-n", "shop", "ratings")
    assert [i["metadata"]["name"] for i in get_json(istio, "vs", "-A")["items"]] == ["reviews"]


def test_deleting_a_crd_or_namespace_deletes_its_resources(istio: Api) -> None:
    apply(istio, vs("reviews", ["reviews"]))
    kubeapi_store = istio.store
    kubectl(istio, "delete", "crd", VS)
    # Discovery no longer lists the kind (read afresh, not from kubectl's cache).
    shutil.rmtree(istio.kubeconfig.parent / "kube-cache")
    r = kubectl(istio, "get", "vs", "-A", check=False)
    assert r.returncode != 0 and "doesn't have a resource type" in r.stderr
    assert not [k for k in kubeapi_store._objects if k[0] == VS]
    # Installed again: empty, as on a real cluster.
    kubectl(istio, "apply", "-f", str(CRDS / "istio.yaml"))
    assert get_json(istio, "vs", "-A")["items"] == []
    apply(istio, vs("reviews", ["reviews"]))
    kubectl(istio, "delete", "namespace", "shop")
    assert get_json(istio, "vs", "-A")["items"] == []


def test_invalid_crds_are_refused_naming_the_field(kubeapi: Api) -> None:
    good = yaml.safe_load((CRDS / "istio.yaml").read_text().split("---")[0])

    def variant(path: str, value: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        *parents, last = path.split(".")
        at = doc
        for p in parents:
            at = at[int(p)] if isinstance(at, list) else at[p]
        at[last] = value
        return doc

    for doc, field in (
        (variant("metadata.name", "vs.networking.istio.io"), "metadata.name"),
        (variant("spec.group", "nodots"), "spec.group"),
        (variant("spec.scope", "Galaxy"), "spec.scope"),
        (variant("spec.versions.0.storage", False), "spec.versions"),
        (variant("spec.names.plural", "Virtual_Services"), "spec.names.plural"),
        (variant("spec.versions.0.schema", None), "spec.versions[0].schema"),
    ):
        r = kubectl(kubeapi, "apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
        assert r.returncode != 0 and "is invalid" in r.stderr and field in r.stderr, r.stderr
    assert kubectl(kubeapi, "get", "crd", "-o", "name").stdout == ""


def test_kubectl_apply_merges_builtin_kinds_strategically(kubeapi: Api) -> None:
    """Services and DaemonSets re-applied: kubectl sends strategic merge patches with
    `$setElementOrder` and `$patch: delete` for keyed lists; labels someone else set stay."""
    kubeapi.namespace("shop")
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9090}],
        },
    }
    apply(kubeapi, svc)
    kubectl(kubeapi, "label", "svc", "-n", "shop", "web", "owner=ops")
    svc["spec"]["ports"] = [{"name": "https", "port": 443}, {"name": "http", "port": 80}]
    svc["metadata"]["labels"] = {"tier": "front"}
    assert apply(kubeapi, svc).startswith("service/web configured")
    got = get_json(kubeapi, "svc", "-n", "shop", "web")
    assert got["spec"]["ports"] == [{"name": "https", "port": 443}, {"name": "http", "port": 80}]
    assert got["metadata"]["labels"] == {"owner": "ops", "tier": "front"}
    ds: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {
                    "containers": [
                        {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
                        {"name": "b", "image": "b:1"},
                    ]
                },
            },
        },
    }
    apply(kubeapi, ds)
    containers = ds["spec"]["template"]["spec"]["containers"]
    containers[0]["env"] = [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}]
    del containers[1]
    apply(kubeapi, ds)
    got = get_json(kubeapi, "ds", "-n", "shop", "agent")
    assert got["spec"]["template"]["spec"]["containers"] == containers


def _client(api: Api) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(api.kubeconfig))


def test_lists_page_over_a_consistent_snapshot(kubeapi: Api) -> None:
    for ns in ("a", "a-b", "b", "c", "d"):
        kubeapi.namespace(ns)
    v1 = client.CoreV1Api(_client(kubeapi))
    first = json.loads(v1.list_namespace(limit=2, _preload_content=False).data)
    assert [n["metadata"]["name"] for n in first["items"]] == ["a", "a-b"]
    meta = first["metadata"]
    assert meta["remainingItemCount"] == 3 and meta["continue"]
    # Changes between pages do not show: every page is from the first page's version.
    kubeapi.store.delete(NS, "", "c")
    kubeapi.namespace("bb")
    names = []
    token = meta["continue"]
    while token:
        page = json.loads(v1.list_namespace(limit=2, _continue=token, _preload_content=False).data)
        assert page["metadata"]["resourceVersion"] == meta["resourceVersion"]
        names += [n["metadata"]["name"] for n in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["b", "c", "d"]
    with pytest.raises(ApiException) as e:
        v1.list_namespace(limit=2, _continue="not-a-token")
    assert e.value.status == 400
    for i in range(60):  # past the fixture's 50-event log: the snapshot is gone
        kubeapi.store.patch(
            NS, "", "d", {"metadata": {"labels": {"i": str(i)}}}, "application/merge-patch+json"
        )
    with pytest.raises(ApiException) as e:
        v1.list_namespace(limit=2, _continue=meta["continue"])
    assert e.value.status == 410


def test_kubectl_get_pages_through_custom_resources(istio: Api) -> None:
    apply(istio, *(vs(f"r{i}", [f"r{i}"]) for i in range(5)))
    r = kubectl(istio, "get", "vs", "-n", "shop", "--chunk-size=2", "-o", "name")
    assert r.stdout.split() == [f"virtualservice.networking.istio.io/r{i}" for i in range(5)]
    asked = [s for s in istio.server.seen if "/virtualservices?" in s]
    assert sum("continue=" in s for s in asked) == 2, asked


def test_custom_resources_are_watched_at_the_version_asked(istio: Api) -> None:
    custom = client.CustomObjectsApi(_client(istio))
    listing = custom.list_cluster_custom_object("networking.istio.io", "v1beta1", "virtualservices")
    rv = listing["metadata"]["resourceVersion"]
    apply(istio, vs("reviews", ["reviews"]))
    istio.store.create(
        PODS, "shop", {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
    )
    events = [
        (e["type"], e["raw_object"]["apiVersion"], e["raw_object"]["metadata"]["name"])
        for e in watch.Watch().stream(
            custom.list_cluster_custom_object,
            "networking.istio.io",
            "v1beta1",
            "virtualservices",
            resource_version=rv,
            timeout_seconds=1,
        )
    ]
    assert events == [("ADDED", "networking.istio.io/v1beta1", "reviews")]


def test_kubectl_reports_the_api_errors_as_for_a_real_server(istio: Api) -> None:
    """404, 409 and 422 answers carry the group-qualified resource and the Status details
    kubectl builds its messages from (the texts a real API server makes kubectl print)."""
    apply(istio, vs("reviews", ["reviews"]))
    doc = json.dumps(vs("reviews", ["reviews"]))
    r = kubectl(istio, "create", "-f", "-", stdin=doc, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        'Error from server (AlreadyExists): error when creating "STDIN": '
        'virtualservices.networking.istio.io "reviews" already exists'
    )
    for verb in ("get", "delete"):
        r = kubectl(istio, verb, "vs", "-n", "shop", "nope", check=False)
        assert (r.returncode, r.stderr.strip()) == (
            1,
            'Error from server (NotFound): virtualservices.networking.istio.io "nope" not found',
        )
    r = kubectl(istio, "get", "ds", "-n", "shop", "nope", check=False)
    assert r.stderr.strip() == 'Error from server (NotFound): daemonsets.apps "nope" not found'
    r = kubectl(istio, "create", "-f", "-", stdin=json.dumps(vs("Bad_Name", ["x"])), check=False)
    assert r.returncode == 1
    assert r.stderr.startswith(
        'The VirtualService "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name": '
        "a lowercase RFC 1123 subdomain must consist of"
    ), r.stderr
    # A built-in kind kubectl sends as protobuf: refused with 415, not misread.
    r = kubectl(istio, "create", "namespace", "other", check=False)
    assert r.returncode == 1 and "(UnsupportedMediaType)" in r.stderr, r.stderr


CLUSTER_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "meshpolicies.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Cluster",
        "names": {"plural": "meshpolicies", "kind": "MeshPolicy", "shortNames": ["mp"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object"}},
            }
        ],
    },
}


def test_cluster_scoped_custom_resources(kubeapi: Api) -> None:
    kubeapi.namespace("shop")
    apply(kubeapi, CLUSTER_CRD)
    policy = {
        "apiVersion": "example.com/v1",
        "kind": "MeshPolicy",
        "metadata": {"name": "global"},
        "spec": {"mode": "strict"},
    }
    assert apply(kubeapi, policy).startswith("meshpolicy.example.com/global created")
    got = get_json(kubeapi, "mp", "global")
    assert (got["spec"], got["metadata"].get("namespace")) == ({"mode": "strict"}, None)
    # Cluster-scoped: the same object whatever namespace kubectl is pointed at.
    names = [i["metadata"]["name"] for i in get_json(kubeapi, "mp", "-n", "shop")["items"]]
    assert names == ["global"]
    r = kubectl(kubeapi, "api-resources", "--api-group=example.com", "--namespaced=false")
    assert "meshpolicies" in r.stdout
    # Asked for below a namespace (not where a cluster-scoped kind lives): 404.
    custom = client.CustomObjectsApi(_client(kubeapi))
    with pytest.raises(ApiException) as e:
        custom.get_namespaced_custom_object("example.com", "v1", "shop", "meshpolicies", "global")
    assert e.value.status == 404
    kubectl(kubeapi, "delete", "mp", "global")
    assert get_json(kubeapi, "mp")["items"] == []
