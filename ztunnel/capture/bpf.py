"""The one module that imports bcc: compile bpf/capture.c, load its programs, pin everything.

Only the short-lived loader process (`ztunnel.capture.loader`) imports this module: bcc
loads libbcc and LLVM, which would add well over 100 MB to a long-running process. The
programs are compiled with `-D` flags only; maps declared BPF_TABLE_PINNED are reused when
already pinned (a restart) and pinned by bcc when created; the programs are pinned here.
"""

from __future__ import annotations

import os
import sys

import bcc  # the only import of bcc in the project (see shared/STYLE.md)

from ztunnel.capture import syscalls
from ztunnel.capture.config import CaptureConfig
from ztunnel.capture.errors import CaptureError
from ztunnel.capture.headers import find_kernel_headers
from ztunnel.capture.objects import (
    MAP_NAMES,
    PROGRAM_NAMES,
    LoadReport,
    pin_replacing,
    prepare_pin_dir,
    remove_stale_temporaries,
)


def compile_and_pin(config: CaptureConfig) -> LoadReport:
    """Compiles and loads the programs, pins them (replacing older ones) next to the maps."""
    source, pin_dir = config.bpf_source, config.pin_dir
    if pin_dir is None:
        raise CaptureError("the loader needs a pin directory to hand the programs over")
    if not source.is_file():
        raise CaptureError(f"BPF source {source} not found")
    headers = find_kernel_headers()  # or a CaptureError saying what to install or mount
    os.environ.update(headers.env)  # read by libbcc when it compiles
    print(f"kernel headers: {headers.describe()}", file=sys.stderr)
    prepare_pin_dir(pin_dir)
    remove_stale_temporaries(pin_dir)
    reused = tuple(name for name in MAP_NAMES if (pin_dir / name).exists())
    try:
        module = bcc.BPF(src_file=os.fsencode(source), cflags=list(config.cflags()))
    except Exception as exc:  # bcc raises bare Exception; the compiler log went to stderr
        raise CaptureError(f"compiling {source} failed: {exc}") from exc
    try:
        program_ids: dict[str, int] = {}
        for name in PROGRAM_NAMES:
            try:
                fd = int(module.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd)
            except Exception as exc:  # the verifier log went to stderr
                raise CaptureError(f"loading program {name} of {source} failed: {exc}") from exc
            pin_replacing(fd, pin_dir / name)
            program_ids[name] = syscalls.prog_info(fd).id
        missing = [name for name in MAP_NAMES if not (pin_dir / name).exists()]
        if missing:
            raise CaptureError(
                f"maps {', '.join(missing)} were not pinned in {pin_dir}"
                " (is every map of the source declared with CAPTURE_TABLE?)"
            )
    finally:
        module.cleanup()
    return LoadReport(
        pin_dir=pin_dir,
        program_ids=program_ids,
        maps_reused=reused,
        maps_created=tuple(name for name in MAP_NAMES if name not in reused),
    )
