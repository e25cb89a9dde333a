"""The lean pyroute2 import: the capture's three names without the package's every netlink
family, and the whole package still there for anyone who asks for more. Each case runs in a
fresh interpreter (this one may have imported pyroute2 already)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_capture_imports_no_other_netlink_family() -> None:
    out = _run(
        "import sys\n"
        "import ztunnel.capture.netlink as n\n"
        "print(n.IPRoute.__module__, n.NetlinkError.__name__, n.pyroute2_netns.__name__,"
        " 'pyroute2.ndb.main' in sys.modules, 'sqlite3' in sys.modules,"
        " 'pyroute2.ipdb' in sys.modules)"
    )
    assert out == "pyroute2.iproute.linux NetlinkError pyroute2.netns False False False"


def test_the_rest_of_the_package_loads_on_first_use() -> None:
    out = _run(
        "from ztunnel.capture import pyroute2_lean\n"
        "IPRoute, netns, NetlinkError = pyroute2_lean.load()\n"
        "import pyroute2\n"
        "from pyroute2 import NDB, IPRoute as Full, netns as ns\n"
        "print(Full is IPRoute, ns is netns, NDB.__name__, pyroute2.NetlinkError is NetlinkError)\n"
        "try:\n"
        "    from pyroute2 import NoSuchThing\n"
        "except ImportError:\n"
        "    print('ImportError')\n"
    )
    assert out.split("\n") == ["True True NDB True", "ImportError"]
