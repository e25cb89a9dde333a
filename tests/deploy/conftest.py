"""Rendering the kustomize trees under deploy/ with the real `kubectl kustomize`, once per run."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Every kustomization a user can apply, and the bases they are made of.
KUSTOMIZATIONS = (
    "deploy",
    "deploy/base",
    "deploy/overlays/istiod",
    "deploy/overlays/standalone",
    "deploy/waypoint",
    "deploy/waypoint/base",
)

Docs = list[dict[str, Any]]


@pytest.fixture(scope="session", autouse=True)
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate re-reads and re-parses its schema files (the definitions are
    megabytes) on every call; read each once per run. Validation itself is unchanged."""
    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        utils.schema_contents = original


def kustomize(path: Path) -> str:
    """`kubectl kustomize PATH`; a failure shows kubectl's message."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (scripts/setup.sh expects it on these machines)")
    done = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return done.stdout


def parse(text: str) -> Docs:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def rendered() -> Iterator[Callable[[str], Docs]]:
    """rendered("deploy/overlays/istiod") -> its documents (rendered once per session)."""
    cache: dict[str, Docs] = {}

    def get(rel: str) -> Docs:
        if rel not in cache:
            cache[rel] = parse(kustomize(ROOT / rel))
        return cache[rel]

    yield get


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(found) == 1, f"no {key[:-1]} {name}"
    return found[0]
