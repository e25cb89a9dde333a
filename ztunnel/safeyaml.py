"""YAML from files an operator (or something impersonating one) wrote, loaded within bounds:
the file size, the nesting depth, and how far aliases may multiply a document (a "billion
laughs" file of a few hundred bytes otherwise expands to gigabytes when walked), with no
recursive aliases. Errors are ConfigErrors that name the file and the line."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ztunnel.errors import ConfigError

MAX_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
# Aliases may make a document at most this many times larger than it is written, and at
# least this many nodes are always allowed (YAML anchors are legitimately used for sharing).
MAX_ALIAS_GROWTH = 10
MIN_NODES_ALLOWED = 100_000


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a depth limit on the (recursive) composer."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self._source = source
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise ConfigError(
                    self._source,
                    _where(event.start_mark),
                    f"nested more than {MAX_DEPTH} levels deep",
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Node, source: str) -> None:
    """Count the nodes the document has once aliases are expanded (each shared node counted
    once per use), without expanding anything: post-order over the node graph, memoised."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, ScalarNode):
            sizes[key] = 1
            continue
        kids = _children(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(k)] for k in kids)
            continue
        on_path.add(key)
        stack.append((node, True))
        for k in kids:
            if id(k) in on_path:
                raise ConfigError(source, _where(k.start_mark), "recursive YAML alias")
            if id(k) not in sizes:
                stack.append((k, False))
    expanded = sizes[id(root)]
    allowed = max(MIN_NODES_ALLOWED, MAX_ALIAS_GROWTH * len(sizes))
    if expanded > allowed:
        raise ConfigError(
            source,
            _where(root.start_mark),
            f"aliases expand this document to {expanded} nodes from {len(sizes)} written "
            f"(more than {allowed}: a YAML alias bomb?)",
        )


def load_all(text: str, source: str) -> list[Any]:
    """Every document of `text`; ConfigError(source, where, why) on bad or abusive YAML."""
    if len(text) > MAX_BYTES:
        raise ConfigError(source, "", f"larger than {MAX_BYTES} bytes")
    docs: list[Any] = []
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text, source)
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                _check_expansion(node, source)
            docs.append(loader.construct_document(node) if node is not None else None)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(
            source, _where(mark), f"invalid YAML: {getattr(e, 'problem', e)}"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs
