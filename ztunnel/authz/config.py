"""Parsing of authorization policies from the local mesh-state file (to be completed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ztunnel.errors import ConfigError


def parse_local_policies(raw: list[Any], source: str, path: str) -> list[Any]:
    if raw:
        raise ConfigError(source, path, "authorization policies are not supported yet")
    return []


def parse_istio_resources(docs: list[tuple[str, Mapping[str, Any]]], source: str) -> list[Any]:
    if docs:
        raise ConfigError(source, docs[0][0], "Istio resources are not supported yet")
    return []
