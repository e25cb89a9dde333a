"""The same resources give the same messages from files and from the cluster: every golden
fixture of the analyzers (tests/unit/analyze/testdata) applied with the real kubectl to the
API server stand-in (status written through the status subresource, as controllers do), then
`ztunnel analyze --kube -A` against the fixture given as a file to `ztunnel analyze --kube
-A fixture.yaml` over a cluster with only its namespaces (so the kinds available are the
same), file references aside. This covers every kind `--kube` lists (Istio's, the Gateway
API's, Services, Pods, Namespaces)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.analyze.conftest import CRDS, Cluster, start_cluster
from tests.integration.analyze.conftest import TESTDATA as HERE
from tests.unit.analyze.conftest import TESTDATA
from ztunnel.analyze import command
from ztunnel.lab.kubeapi import BY_PATH, ApiError

pytestmark = pytest.mark.integration

SAME = HERE / "same"  # the kinds the golden fixtures lack
# The positive fixtures (each also holds resources nothing is said about), but those with
# kinds the stand-in does not serve (Deployments, ConfigMaps).
UNSERVED = re.compile(r"^kind: (Deployment|ConfigMap)\b", re.M)
FIXTURES = sorted(
    p for p in TESTDATA.glob("*-positive.yaml") if not UNSERVED.search(p.read_text())
) + sorted(SAME.glob("*.yaml"))
NAMESPACES = BY_PATH[("", "v1", "namespaces")]
# `(Kind ns/name file:line)` -> `(Kind ns/name)`: the cluster's resources have no file.
FILE_REF = re.compile(r"^(\w+ \[[A-Z]+\d+\] \(\S+ \S+) [^ )]+\)", re.M)


@pytest.fixture(scope="module")
def istio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster with the CRDs for the module; each test removes what it applied."""
    server, c = start_cluster(tmp_path_factory.mktemp("same"))
    try:
        c.apply(CRDS)
        yield c
    finally:
        server.stop()


def _namespaces(docs: list[Any]) -> list[dict[str, Any]]:
    """The Namespaces the fixture's resources live in and does not declare itself."""
    declared = {d["metadata"]["name"] for d in docs if d.get("kind") == "Namespace"}
    used = {str(d["metadata"].get("namespace") or "default") for d in docs}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
        for n in sorted(used - declared)
    ]


def _run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = command.main(list(args), io.StringIO(), out, err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_the_cluster_gives_the_messages_the_files_give(
    istio: Cluster, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    items = [i for d in docs for i in (d["items"] if d.get("kind") == "List" else [d])]
    store = istio.server.store
    created = _namespaces(items)
    for ns in created:  # set-up, not under test: straight into the store
        store.create(NAMESPACES, "", ns)
    kube = ("--kube", "--kubeconfig", str(istio.kubeconfig), "-A")
    try:
        files = _run(*kube, str(path))
        istio.apply(path)
        for item in items:
            if item.get("status") and item.get("kind") != "Pod":
                _write_status(istio, item)
        cluster = _run(*kube)
    finally:
        declared = [i["metadata"]["name"] for i in items if i.get("kind") == "Namespace"]
        for name in declared + [n["metadata"]["name"] for n in created]:
            with contextlib.suppress(ApiError):
                store.delete(NAMESPACES, "", name)
    # One message per resource, code and text: from files, messages about two fields of one
    # resource differ by their line; without lines they are one (istioctl dedupes them so
    # too), and sorted among the others by text rather than line.
    from_files = FILE_REF.sub(r"\1)", files[1])
    assert sorted(set(cluster[1].splitlines())) == sorted(set(from_files.splitlines()))
    assert cluster[0] == files[0]
    assert from_files.strip()


def _write_status(c: Cluster, item: dict[str, Any]) -> None:
    """`kubectl patch --subresource=status`: kubectl apply leaves the status of kinds with
    a status subresource to their controllers, as the API server does."""
    group, _, version = str(item["apiVersion"]).rpartition("/")
    kind = str(item["kind"]).lower()
    if group:  # kind.version.group: Istio's Gateway is not the Gateway API's
        kind = f"{kind}.{version}.{group}"
    meta = item["metadata"]
    r = c.kubectl(
        "patch",
        kind,
        meta["name"],
        "-n",
        str(meta.get("namespace") or "default"),
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": item["status"]}),
    )
    assert r.returncode == 0, r.stderr
