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
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "200", "--format", "raw", "--output", str(out)]
    # Native frames (inside uvloop, OpenSSL, the interpreter) need the process paused per
    # sample; Python-only sampling does not pause it.
    argv.append("--native" if native else "--nonblocking")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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
    return f"{name} ({path})" if path else name


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Own and inclusive sample shares of the busiest functions in a collapsed-stack file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        # py-spy puts the thread name first (`process ...;thread ...`); skip non-frames.
        frames = [f for f in frames if "(" in f] or frames
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"samples": 0, "own": [], "inclusive": []}
    return {
        "samples": total,
        "own": [{"function": f, "share": round(c / total, 4)} for f, c in own.most_common(top)],
        "inclusive": [{"function": f, "share": round(c / total, 4)}
                      for f, c in incl.most_common(top)],
    }
