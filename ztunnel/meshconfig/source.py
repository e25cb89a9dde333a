"""YAML documents with the line of every field, so that errors and analysis findings can say
`file:line` as well as the resource and the field path (`spec.http[0].route[1].weight`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztunnel.errors import ConfigError

PathKey = tuple[str | int, ...]
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_path(path: str) -> PathKey:
    """`spec.http[0].route` -> ("spec", "http", 0, "route")."""
    out: list[str | int] = []
    for name, index in _TOKEN.findall(path):
        out.append(int(index) if index else name)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One YAML document: the parsed object, where it came from, and the line of each field."""

    obj: Any
    file: str
    index: int  # position of the document in its file
    line: int  # 1-based line where the document starts
    lines: dict[PathKey, int] = field(default_factory=dict, compare=False, repr=False)

    def line_of(self, path: str | PathKey) -> int:
        """The line of the field at `path`, or of its closest present parent."""
        key = split_path(path) if isinstance(path, str) else path
        while key:
            hit = self.lines.get(key)
            if hit is not None:
                return hit
            key = key[:-1]
        return self.line


def _index(node: yaml.Node, prefix: PathKey, out: dict[PathKey, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                key = (*prefix, str(k.value))
                out[key] = k.start_mark.line + 1
                _index(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*prefix, i)
            out[key] = item.start_mark.line + 1
            _index(item, key, out)


def parse_yaml(text: str, file: str) -> list[SourceDocument]:
    """Every document of `text` (empty ones skipped); ConfigError with the line on bad YAML."""
    loader = yaml.SafeLoader(text)
    docs: list[SourceDocument] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            obj = loader.construct_document(node)
            lines: dict[PathKey, int] = {}
            _index(node, (), lines)
            if obj is not None:
                docs.append(SourceDocument(obj, file, index, node.start_mark.line + 1, lines))
            index += 1
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, where, f"invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    return docs


def config_files(path: Path) -> list[Path]:
    """A file, or the `*.yaml`/`*.yml`/`*.json` files of a directory (sorted, not recursive)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    return [path]


def read_documents(paths: list[str | Path]) -> list[SourceDocument]:
    """All documents of the given files and directories, in order."""
    docs: list[SourceDocument] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(str(p), "", "no such file or directory")
        for f in config_files(p):
            try:
                text = f.read_text()
            except OSError as e:
                raise ConfigError(str(f), "", f"cannot read: {e.strerror}") from None
            docs.extend(parse_yaml(text, str(f)))
    return docs
