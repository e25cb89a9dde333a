"""A cluster for `ztunnel analyze --kube`: the Kubernetes API server stand-in on loopback,
loaded with the real `kubectl apply -f` (CRDs first, as on a real cluster), and runs of the
command as a user types it (in-process, or as the real `ztunnel` CLI in a subprocess)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ztunnel.analyze import command
from ztunnel.lab.kubeapi import KubeApiServer, ObjectStore

TESTDATA = Path(__file__).parent / "testdata"
CRDS = TESTDATA / "crds"
CLUSTER = TESTDATA / "cluster"
FILES = TESTDATA / "files"
TOKEN = "analyze-test-token"
REFERENCE = "https://istio.io/latest/docs/reference/config/analysis"


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


class Cluster:
    def __init__(self, server: KubeApiServer, url: str, home: Path) -> None:
        self.server = server
        self.url = url
        self.home = home
        self.kubeconfig = home / "kubeconfig"
        self.kubeconfig.write_text(json.dumps(server.kubeconfig(url)))

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if shutil.which("kubectl") is None:
            pytest.fail("kubectl is not installed (the machines have 1.32)")
        r = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(self.kubeconfig),
                "--cache-dir",
                str(self.home / "kube-cache"),
                *args,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return r

    def apply(self, *paths: Path | str, stdin: str | None = None) -> str:
        """`kubectl apply -f` each path (or stdin with "-"); fails the test if kubectl does."""
        args = [a for p in paths for a in ("-f", str(p))]
        r = self.kubectl("apply", *args, stdin=stdin)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def kubeconfig_with(self, name: str, **changes: Any) -> Path:
        """A copy of the kubeconfig with the user's token or the context's namespace
        changed (`token=`, `namespace=`), or the server (`server=`)."""
        doc = json.loads(self.kubeconfig.read_text())
        if "token" in changes:
            doc["users"][0]["user"]["token"] = changes["token"]
        if "namespace" in changes:
            doc["contexts"][0]["context"]["namespace"] = changes["namespace"]
        if "server" in changes:
            doc["clusters"][0]["cluster"]["server"] = changes["server"]
        if "ca" in changes:
            import base64

            doc["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(
                changes["ca"]
            ).decode()
        path = self.home / name
        path.write_text(json.dumps(doc))
        return path


def start_cluster(home: Path) -> tuple[KubeApiServer, Cluster]:
    home.mkdir(parents=True, exist_ok=True)
    server = KubeApiServer(TOKEN, ["127.0.0.1"], ObjectStore())
    url = server.start()
    return server, Cluster(server, url, home)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """An empty cluster (no CRDs, no namespaces) for one test."""
    server, c = start_cluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Istio's and the Gateway API's CRDs and the namespaces default (the helloworld
    example), shop (an ambient namespace with a finding) and clean (nothing to report),
    applied with kubectl; shared by a module's tests, which must not change it."""
    server, c = start_cluster(tmp_path_factory.mktemp("mesh"))
    try:
        c.apply(CRDS)
        c.apply(CLUSTER / "namespaces.yaml")
        c.apply(CLUSTER)
        yield c
    finally:
        server.stop()


Analyze = Callable[..., Run]


@pytest.fixture
def analyze(monkeypatch: pytest.MonkeyPatch) -> Analyze:
    """`analyze(cluster, *args, kubeconfig=None)`: `ztunnel analyze --kube` in-process with
    the cluster's kubeconfig (the real client, over HTTPS to the stand-in), run in the
    files directory so that file references read as a user who typed the name would see."""
    monkeypatch.chdir(FILES)
    monkeypatch.delenv("KUBECONFIG", raising=False)

    def run(c: Cluster, *args: str, kubeconfig: Path | None = None) -> Run:
        out, err = io.StringIO(), io.StringIO()
        argv = ["--kube", "--kubeconfig", str(kubeconfig or c.kubeconfig), *args]
        rc = command.main(argv, io.StringIO(), out, err)
        return Run(rc, out.getvalue(), err.getvalue())

    return run


def ztunnel_cli(home: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    """The real command line: `python -m ztunnel analyze ...` in a subprocess, in the files
    directory, with `home` as $HOME (no ~/.kube/config of the machine's) and `env` added."""
    r = subprocess.run(
        [sys.executable, "-m", "ztunnel", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=FILES,
        env={"PATH": "/usr/bin:/bin", "TERM": "dumb", "HOME": str(home), **(env or {})},
    )
    return Run(r.returncode, r.stdout, r.stderr)
