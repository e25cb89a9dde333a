"""The pieces under the command: Go's formatting of message arguments, istioctl's ordering,
deduplication and resource references, suppression globs, document lines, the cluster
snapshot (pages, kinds not served, files laid over it), and that no input makes analysis
raise."""

from __future__ import annotations

import io
import string
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.analyze import command, engine, kube, sources
from ztunnel.analyze import messages as msg
from ztunnel.analyze.messages import Level, Message, ResourceRef
from ztunnel.meshconfig.source import parse_yaml

pytestmark = pytest.mark.unit


def test_go_verbs() -> None:
    assert msg.go_sprintf("%s %v %q %d %%", ("a", [1, 2], 'x"y\n\u00e9', 7)) == (
        'a [1 2] "x\\"y\\n\u00e9" 7 %'
    )
    assert msg.go_sprintf("%v", (["a=b", "c=d"],)) == "[a=b c=d]"
    assert msg.go_quote("\x01\t") == '"\\x01\\t"'


def test_levels_parse_and_compare() -> None:
    assert Level.parse("warning") is Level.WARNING
    assert Level.ERROR.at_least(Level.WARNING) and not Level.INFO.at_least(Level.WARNING)
    with pytest.raises(ValueError):
        Level.parse("fatal")


def _m(t: msg.MessageType, kind: str, ns: str, name: str, text: str = "x") -> Message:
    return Message(t, text, ResourceRef(kind, ns, name, "f.yaml", 3))


def test_sorted_by_level_code_resource_then_text_and_deduplicated() -> None:
    a = _m(msg.NoMatchingWorkloadsFound, "AuthorizationPolicy", "b", "z")
    b = _m(msg.ReferencedResourceNotFound, "VirtualService", "a", "y")
    c = _m(msg.ReferencedResourceNotFound, "Service", "z", "a")
    d = _m(msg.VirtualServiceIneffectiveMatch, "VirtualService", "a", "a")
    e = Message(msg.ReferencedResourceNotFound, "no resource")
    out = msg.sorted_deduped([d, a, b, c, b, e])
    # Error before Warning before Info; no-resource first; then Kind/name/namespace.
    assert out == [e, c, b, a, d]


def test_references() -> None:
    r = ResourceRef("Service", "ns", "a", "dir/f.yaml", 5)
    assert r.reference() == "dir/f.yaml:5" and r.reference(9) == "dir/f.yaml:9"
    assert ResourceRef("Service", "ns", "a", "f.json", 5).reference(9) == "f.json"
    assert ResourceRef("Service", "ns", "a", kube.CLUSTER, 0).reference() is None
    assert ResourceRef("Namespace", "", "shop").friendly_name == "Namespace shop"
    assert ResourceRef("Namespace", "", "shop").origin_namespace == "shop"
    m = Message(msg.SchemaWarning, "t", ResourceRef("Service", "ns", "a", kube.CLUSTER))
    assert str(m) == "Warning [IST0133] (Service ns/a) t"
    assert "reference" not in m.unstructured()


@pytest.mark.parametrize(
    ("pattern", "subject", "hit"),
    [
        ("Pod *.testing", "Pod mypod.testing", True),
        ("Pod *", "Pod a/b", True),
        ("*", "", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXcYb", False),
        ("ab*ba", "aba", False),
        ("exact", "exact", True),
        ("exact", "exactly", False),
    ],
)
def test_glob(pattern: str, subject: str, hit: bool) -> None:
    assert engine.glob(pattern, subject) is hit


def test_chunk_starts_follow_istioctls_reader() -> None:
    text = "# header\napiVersion: v1\n---\n\n---\n\nkind: A\n---   \nkind: B\n"
    assert sources.chunk_starts(text) == [1, 7, 9]
    docs, errors = sources.read_documents([sources.Input("f.yaml", text)])
    assert errors == [] and [d.line for d in docs] == [1, 7, 9]


def _doc(kind: str, name: str, ns: str | None = None, group: str = "") -> Any:
    meta: dict[str, str] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    return {"apiVersion": f"{group}/v1" if group else "v1", "kind": kind, "metadata": meta}


def test_files_replace_cluster_resources_and_ignored_namespaces_go() -> None:
    cluster = [
        parse_yaml(
            textwrap.dedent(
                """
                apiVersion: v1
                kind: Service
                metadata: {name: a, namespace: default}
                ---
                apiVersion: v1
                kind: Service
                metadata: {name: b, namespace: default}
                ---
                apiVersion: v1
                kind: Service
                metadata: {name: dns, namespace: kube-system}
                """
            ),
            kube.CLUSTER,
        )
    ][0]
    files = parse_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n", "f.yaml")
    merged = sources.without_ignored(sources.overlay(cluster, files, "default"), "default")
    assert [(d.file, d.obj["metadata"]["name"]) for d in merged] == [
        (kube.CLUSTER, "b"),
        ("f.yaml", "a"),
    ]


def test_snapshot_pages_fills_kinds_and_skips_unserved_apis() -> None:
    calls: list[tuple[str, str]] = []

    def fetch(spec: kube.KubeList, token: str) -> dict[str, Any]:
        calls.append((spec.path, token))
        if spec.group == "networking.istio.io":
            raise kube.NotServed(spec.path)
        if spec.group == "security.istio.io" and spec.version == "v1":
            raise kube.NotServed(spec.path)  # an Istio older than 1.22: v1beta1 only
        if spec.kind == "AuthorizationPolicy":
            return {"items": [{"metadata": {"name": "ap"}}]}
        if spec.plural == "pods" and not token:
            return {"items": [{"metadata": {"name": "p1"}}], "metadata": {"continue": "t1"}}
        if spec.plural == "pods":
            return {"items": [{"metadata": {"name": "p2"}}], "metadata": {}}
        return {"items": []}

    snap = kube.snapshot(fetch)
    assert [
        (d.obj["kind"], d.obj["apiVersion"], d.obj["metadata"]["name"]) for d in snap.documents
    ] == [
        ("Pod", "v1", "p1"),
        ("Pod", "v1", "p2"),
        ("AuthorizationPolicy", "security.istio.io/v1beta1", "ap"),
    ]
    assert [d.index for d in snap.documents] == [0, 1, 2]
    assert ("/api/v1/pods", "t1") in calls
    assert "VirtualService" not in snap.available and "IstioGateway" not in snap.available
    assert {"Pod", "Service", "Namespace", "AuthorizationPolicy", "Gateway"} <= snap.available
    with pytest.raises(kube.KubeError, match="no items"):
        kube.snapshot(lambda spec, token: {"kind": "Status"})


def test_kube_mode_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A namespace that does not exist ends the run as istioctl does (a note, exit 0); a
    cluster that cannot be read is an error (exit 1)."""

    def fetch(spec: kube.KubeList, token: str) -> dict[str, Any]:
        return {"items": [{"metadata": {"name": "default"}}] if spec.kind == "Namespace" else []}

    out, err = io.StringIO(), io.StringIO()
    rc = command.main(["--kube", "-n", "nope"], io.StringIO(), out, err, fetch)
    assert (rc, err.getvalue()) == (0, 'namespace "nope" not found\n')

    def broken(spec: kube.KubeList, token: str) -> dict[str, Any]:
        raise kube.KubeError("listing /api/v1/namespaces: 403 Forbidden")

    out, err = io.StringIO(), io.StringIO()
    rc = command.main(["--kube"], io.StringIO(), out, err, broken)
    assert (rc, err.getvalue()) == (1, "Error: listing /api/v1/namespaces: 403 Forbidden\n")


# ---- abuse: no document makes analysis raise --------------------------------------------------

_text = st.text(alphabet=string.ascii_lowercase + "-./*:", max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), _text)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=12,
)
_KINDS = [
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.istio.io/v1", "ServiceEntry"),
    ("networking.istio.io/v1", "Gateway"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("v1", "Namespace"),
    ("apps/v1", "Deployment"),
]
_SPEC_KEYS = st.sampled_from(
    [
        "hosts",
        "http",
        "tcp",
        "gateways",
        "host",
        "subsets",
        "ports",
        "selector",
        "rules",
        "targetRefs",
        "action",
        "listeners",
        "gatewayClassName",
        "template",
        "exportTo",
    ]
)
_docs = st.lists(
    st.builds(
        lambda kind, name, ns, labels, spec, status: {
            "apiVersion": kind[0],
            "kind": kind[1],
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec,
            "status": status,
        },
        st.sampled_from(_KINDS),
        st.sampled_from(["a", "b", "waypoint"]),
        st.sampled_from(["default", "shop"]),
        st.dictionaries(
            st.sampled_from(["istio.io/use-waypoint", "app", "istio.io/dataplane-mode"]),
            st.sampled_from(["a", "waypoint", "ambient", "none"]),
            max_size=2,
        ),
        st.dictionaries(_SPEC_KEYS, _value, max_size=4),
        _value,
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_docs)
def test_any_documents_give_messages_or_parse_errors_never_a_traceback(docs: list[Any]) -> None:
    import yaml

    text = yaml.safe_dump_all(docs)
    out, err = io.StringIO(), io.StringIO()
    rc = command.main(["-A", "-"], io.StringIO(text), out, err)
    assert rc in (0, 65, 79)
    assert "Traceback" not in err.getvalue()
