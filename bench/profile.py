"""Where an agent spends its time under load: py-spy samples of the agent processes while a
measurement runs, summarised as the top functions by own time and by inclusive time.

py-spy is not a dependency of the project; `--profile` needs it in the virtual environment
(`.venv/bin/pip install py-spy`) or on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, native: bool = False) -> subprocess.Popen[bytes]:
    """Samples `pid` for `seconds` into a collapsed-stack file (py-spy's raw format)."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (.venv/bin/pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    # Native frames (inside uvloop, OpenSSL, the interpreter) need the process paused per
    # sample; Python-only sampling does not pause it.
    argv.append("--native" if native else "--nonblocking")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ztunnel"


def _ztunnel_file(name: str) -> str | None:
    """py-spy names some files by their bare name (`connection.py`): find ours, if unique."""
    found = list(_PACKAGE_DIR.rglob(name))
    if len(found) == 1:
        return "ztunnel/" + found[0].relative_to(_PACKAGE_DIR).as_posix()
    return None


def _function(frame: str) -> str:
    """`handle (ztunnel/proxy/relay.py:71)` -> `handle (ztunnel/proxy/relay.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if "/ztunnel/" in path:
        path = "ztunnel/" + path.split("/ztunnel/", 1)[1]
    elif path.endswith(".py") and "/" not in path:
        path = _ztunnel_file(path) or path
    return f"{name} ({path})" if path else name


# Frames every sample has (the interpreter's entry, `ztunnel run`, the loop's run call): left
# out of the inclusive ranking, where they would only say "100%".
_ENTRY_FRAMES = (
    "<frozen runpy>",
    "ztunnel/__main__.py",
    "ztunnel/cli.py",
    "uvloop/__init__.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
)
# A sample whose innermost Python frame is the loop's run call is in the event loop's native
# code: uvloop (libuv, socket syscalls, epoll) or asyncio's selector.
_LOOP_NATIVE = "event loop (native: uvloop/libuv, syscalls)"


def _package(function: str) -> str:
    """`f (ztunnel/hbone/connection.py)` -> `ztunnel/hbone/connection`; `f (asyncio/x.py)` ->
    `asyncio`; `f (ssl.py)` -> `ssl`."""
    if function == _LOOP_NATIVE:
        return function
    _, _, where = function.partition(" (")
    where = where.rstrip(")")
    if where.startswith("ztunnel/"):
        return where.removesuffix(".py")
    return where.split("/", 1)[0].removesuffix(".py") or "?"


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Own and inclusive sample shares of the busiest functions in a collapsed-stack file, and
    own shares per package (h2, asyncio, ssl, ztunnel modules, ...)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    names: dict[str, str] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [names.get(f) or names.setdefault(f, _function(f)) for f in stack.split(";")]
        # py-spy may put the process/thread first; keep only real frames.
        frames = [f for f in frames if "(" in f] or frames
        leaf = frames[-1]
        if "asyncio/runners.py" in leaf or "uvloop/__init__.py" in leaf:
            leaf = _LOOP_NATIVE
        total += n
        own[leaf] += n
        for f in set(frames):
            if not any(e in f for e in _ENTRY_FRAMES):
                incl[f] += n
    if not total:
        return {"samples": 0, "own": [], "inclusive": [], "own_by_package": []}
    packages: Counter[str] = Counter()
    for f, c in own.items():
        packages[_package(f)] += c

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(c / total, 4)} for f, c in counter.most_common(top)]

    return {
        "samples": total,
        "own": shares(own),
        "inclusive": shares(incl),
        "own_by_package": shares(packages),
    }
