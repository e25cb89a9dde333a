"""pyroute2's `IPRoute`, `setns` and `NetlinkError` without the package's `__init__`.

`pyroute2/__init__.py` imports every netlink family it supports (NDB with sqlite3, IPDB,
nl80211, IPVS, WireGuard, plan9, ...): 10.6 MB of the agent's resident memory, measured, where
the three names the capture needs cost 3.6 MB. `load()` registers the package module with its
`__init__` not yet run and imports those submodules directly; the first lookup of any other
package-level name (`from pyroute2 import NDB` elsewhere in the process) runs the real
`__init__` then, so other users of pyroute2 see the whole package as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


def _install() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed")
    pkg = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def full_package(name: str) -> Any:
        # A submodule is imported by the import system itself (`from pyroute2 import netns`
        # asks for the attribute first, then imports `pyroute2.netns` when it is missing).
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)
        del pkg.__dict__["__getattr__"]
        loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__dict__["__getattr__"] = full_package
    sys.modules["pyroute2"] = pkg


def load() -> tuple[type[Any], Any, type[Exception]]:
    """(IPRoute, netns module, NetlinkError), importing no more of pyroute2 than they need."""
    _install()
    linux: ModuleType = importlib.import_module("pyroute2.iproute.linux")
    netns: ModuleType = importlib.import_module("pyroute2.netns")
    exceptions: ModuleType = importlib.import_module("pyroute2.netlink.exceptions")
    return linux.IPRoute, netns, exceptions.NetlinkError
