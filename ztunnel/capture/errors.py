"""The capture layer's error: bcc, bpf() and netlink failures translated at the boundary.

`errno` carries the kernel's errno when there is one (0 otherwise), so callers can tell
"interface is gone" (ENODEV) from "not permitted" (EPERM) without parsing messages; `log`
carries what the BPF loader process printed (compiler and verifier messages).
"""

from __future__ import annotations

import errno as errno_codes
import os

from ztunnel.errors import ZtunnelError


class CaptureError(ZtunnelError):
    """A BPF program, map, pin, tc filter or routing rule could not be set up or removed."""

    def __init__(self, message: str, errno: int = 0, log: str = "") -> None:
        self.errno = errno
        self.detail = message  # without the errno suffix, to carry across a process boundary
        self.log = log  # diagnostics of another process (compiler, verifier), if any
        if errno:
            name = errno_codes.errorcode.get(errno, str(errno))
            message = f"{message}: {name} ({os.strerror(errno)})"
        if log:
            message = f"{message}\n{log}"
        super().__init__(message)
