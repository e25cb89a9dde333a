"""Where the configuration to analyze comes from: files and directories (recursively, `.yaml`,
`.yml` and `.json` as istioctl takes them; `-` for stdin) read into the config model's
documents, the cluster's resources (`kube`) laid under them, and the namespaces istioctl never
analyzes left out.

Document lines follow istioctl: a document starts at its first line that is neither empty nor
`---` (a leading comment counts; istio/istio pilot/pkg/config/file/util/kubeyaml `YAMLReader`),
and fields keep their line in the file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ztunnel.errors import ConfigError
from ztunnel.meshconfig.source import SourceDocument, parse_yaml

FILE_EXTENSIONS = (".json", ".yaml", ".yml")
STDIN = "-"
# inject.IgnoredNamespaces: istioctl drops resources in these from every source.
IGNORED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
IGNORED_NAMESPACES |= {"local-path-storage"}


class SourceError(Exception):
    """An input that cannot be read at all (missing file, unreadable directory)."""


@dataclass(frozen=True, slots=True)
class Input:
    name: str
    text: str


def gather(
    args: Iterable[str], read_stdin: Callable[[], str], warn: Callable[[str], None]
) -> list[Input]:
    """The inputs named on the command line, in order; directories walked in lexical order
    (as Go's filepath.Walk), files with other extensions skipped with a warning."""
    out: list[Input] = []
    for arg in args:
        if arg == STDIN:
            out.append(Input(STDIN, read_stdin()))
            continue
        path = Path(arg)
        if not path.exists():
            raise SourceError(f"stat {arg}: no such file or directory")
        if path.is_dir():
            for root, dirs, files in os.walk(path, onerror=_raise):
                dirs.sort()
                for f in sorted(files):
                    out.extend(_file(os.path.join(root, f), warn))
        else:
            out.extend(_file(arg, warn))
    return out


def _raise(e: OSError) -> None:
    raise SourceError(f"{e.filename}: {e.strerror}")


def _file(name: str, warn: Callable[[str], None]) -> list[Input]:
    if os.path.splitext(name)[1] not in FILE_EXTENSIONS:
        exts = " ".join(FILE_EXTENSIONS)
        warn(f"Skipping file {name}, recognized file extensions are: [{exts}]")
        return []
    try:
        return [Input(name, Path(name).read_text(encoding="utf-8", errors="replace"))]
    except OSError as e:
        raise SourceError(f"open {name}: {e.strerror}") from None


def chunk_starts(text: str) -> list[int]:
    """The 1-based line where istioctl's YAML reader starts each document."""
    starts: list[int] = []
    want = True
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("---") and not line[3:].strip():
            want = True
            continue
        if want and line != "":
            starts.append(n)
            want = False
    return starts


def read_documents(inputs: Iterable[Input]) -> tuple[list[SourceDocument], list[str]]:
    """Every document of the inputs, with istioctl's document lines; and a line per input
    that is not valid YAML (`file: line L, column C: invalid YAML: ...`): such a file is left
    out and the others are still analyzed."""
    docs: list[SourceDocument] = []
    errors: list[str] = []
    for inp in inputs:
        try:
            parsed = parse_yaml(inp.text, inp.name)
        except ConfigError as e:
            errors.append(str(e))
            continue
        starts = chunk_starts(inp.text)
        for d in parsed:
            line = max((s for s in starts if s <= d.line), default=d.line)
            docs.append(replace(d, line=line))
    return docs, errors


def resource_key(obj: Any, default_namespace: str) -> tuple[str, str, str, str] | None:
    """(API group, kind, namespace, name) of a document, None when it is not a resource."""
    if not isinstance(obj, Mapping):
        return None
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    kind, api = obj.get("kind"), obj.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api, str):
        return None
    namespace = "" if kind == "Namespace" else str(meta.get("namespace") or default_namespace)
    return api.rpartition("/")[0], kind, namespace, str(meta.get("name", ""))


def without_ignored(docs: Iterable[SourceDocument], default_namespace: str) -> list[SourceDocument]:
    out = []
    for d in docs:
        key = resource_key(d.obj, default_namespace)
        if key is not None:
            ns = key[3] if key[1] == "Namespace" else key[2]
            if ns in IGNORED_NAMESPACES:
                continue
        out.append(d)
    return out


def overlay(
    cluster: Iterable[SourceDocument], files: Iterable[SourceDocument], default_namespace: str
) -> list[SourceDocument]:
    """The cluster's resources with the files' on top: a resource in a file replaces the
    cluster's resource of the same kind, namespace and name (istioctl: files take
    precedence, "to simulate the effect of applying" them)."""
    files = list(files)
    keys = {resource_key(d.obj, default_namespace) for d in files} - {None}
    kept = [d for d in cluster if resource_key(d.obj, default_namespace) not in keys]
    return kept + files
