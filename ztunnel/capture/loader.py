"""The BPF loader: a short-lived process that compiles and pins, so the agent never loads bcc.

`python -m ztunnel.capture load` reads `{"config": <CaptureConfig.to_json()>}` on stdin,
compiles bpf/capture.c with bcc (`capture.bpf`), pins programs and maps in the config's pin
directory, writes one JSON line to stdout (`{"ok": true, "report": ...}` or `{"ok": false,
"error": ..., "errno": ...}`) and exits; compiler and verifier messages go to stderr.
`run_loader()` is the caller's side: it runs that process and returns its `LoadReport` or
raises a `CaptureError` with the loader's message, errno and the tail of its stderr.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from typing import IO, Any

from ztunnel.capture.config import CaptureConfig
from ztunnel.capture.errors import CaptureError
from ztunnel.capture.objects import LoadReport
from ztunnel.errors import ConfigError

log = logging.getLogger(__name__)

# Compiling takes one to a few seconds; a loaded CI machine may need much longer.
LOADER_TIMEOUT = 120.0
LOG_TAIL_LINES = 40


def loader_argv() -> list[str]:
    return [sys.executable, "-m", "ztunnel.capture", "load"]


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in kept)


def _answer(stdout: str) -> dict[str, Any] | None:
    """The loader's JSON answer: its last stdout line (anything before it is stray output)."""
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    try:
        answer = json.loads(lines[-1])
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def run_loader(config: CaptureConfig, timeout: float = LOADER_TIMEOUT) -> LoadReport:
    """Compiles and pins the programs in a child process; blocks until it has exited."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            loader_argv(),
            input=json.dumps({"config": config.to_json()}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        partial = exc.stderr or b""  # what it wrote before; bytes even in text mode
        stderr = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        raise CaptureError(
            f"BPF loader did not finish within {timeout:g}s", errno.ETIMEDOUT, _tail(stderr)
        ) from None
    except OSError as exc:
        raise CaptureError("starting the BPF loader failed", exc.errno or 0) from exc
    answer = _answer(proc.stdout)
    if proc.returncode == 0 and answer is not None and answer.get("ok") is True:
        report = LoadReport.from_json(answer.get("report"))
        log.info(
            "BPF loader pinned programs %s in %s in %.1fs (maps reused: %s, created: %s)",
            dict(report.program_ids),
            report.pin_dir,
            time.monotonic() - started,
            ", ".join(report.maps_reused) or "-",
            ", ".join(report.maps_created) or "-",
        )
        if proc.stderr.strip():
            log.debug("BPF loader diagnostics:\n%s", _tail(proc.stderr))
        return report
    if answer is not None and answer.get("ok") is False:
        detail = str(answer.get("error", "unknown error"))
        code = answer.get("errno", 0)
        code = code if isinstance(code, int) else 0
    elif proc.returncode < 0:
        detail, code = f"killed by signal {-proc.returncode}", 0
    else:
        detail, code = f"exited with status {proc.returncode} without an answer", 0
    raise CaptureError(f"BPF loader: {detail}", code, _tail(proc.stderr))


def _emit(out: IO[str], answer: dict[str, Any]) -> None:
    out.write(json.dumps(answer) + "\n")
    out.flush()


def main() -> int:
    """The loader process: one request on stdin, one answer on stdout; 0 on success."""
    # Keep stdout for the answer alone: libbcc prints some diagnostics (e.g. about missing
    # kernel headers) to stdout, so fd 1 becomes a copy of stderr and the answer goes to
    # a private copy of the original stdout.
    sys.stdout.flush()
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    with os.fdopen(answer_fd, "w") as out:
        return _serve(sys.stdin, out)


def _serve(stdin: IO[str], stdout: IO[str]) -> int:
    try:
        request = json.loads(stdin.read())
        if not isinstance(request, dict) or "config" not in request:
            raise CaptureError('the request must be a JSON object {"config": {...}}')
        config = CaptureConfig.from_json(request["config"])
        # Imported here, not at the top: the agent imports this module to run the loader
        # and must not load bcc itself.
        from ztunnel.capture.bpf import compile_and_pin

        report = compile_and_pin(config)
    except CaptureError as exc:
        _emit(stdout, {"ok": False, "error": exc.detail, "errno": exc.errno})
        return 1
    except (ConfigError, ValueError) as exc:  # ValueError: not JSON
        _emit(stdout, {"ok": False, "error": f"bad request: {exc}", "errno": errno.EINVAL})
        return 1
    _emit(stdout, {"ok": True, "report": report.to_json()})
    return 0
