"""Kernel headers for bcc: where the BPF loader finds them, or an error saying what to install.

bcc compiles `bpf/capture.c` against the running kernel's headers, looked up as bcc itself does
(bcc's `ClangLoader::parse`): `BCC_KERNEL_SOURCE` when set, else `/lib/modules/<release>/build`
(with `source` next to it for split trees, as Debian and Ubuntu install them). In a container
those are the host's `/lib/modules` and `/usr/src`, mounted read-only. When neither has headers,
the kernel's own archive (`/sys/kernel/kheaders.tar.xz`, CONFIG_IKHEADERS) is unpacked once
into a cache directory and handed to bcc as `BCC_KERNEL_SOURCE`. Nothing found: a
`CaptureError` that names what was looked at and what the operator can install or mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ztunnel.capture.errors import CaptureError

MODULES_DIR = Path("/lib/modules")
KHEADERS_ARCHIVE = Path("/sys/kernel/kheaders.tar.xz")
KHEADERS_CACHE = Path("/tmp/ztunnel-kheaders")
# Overrides (tests, unusual hosts); the loader process inherits them from the agent.
ARCHIVE_ENV = "ZTUNNEL_KHEADERS_ARCHIVE"
CACHE_ENV = "ZTUNNEL_KHEADERS_DIR"
# The marker bcc checks (a build dir without it is a leftover, not headers).
KCONFIG_H = PurePosixPath("include/linux/kconfig.h")
# Bounds for unpacking: a kernel's archive is ~4 MiB holding ~100 MiB in ~20k files.
MAX_UNPACKED_BYTES = 1 << 30
MAX_MEMBERS = 200_000


@dataclass(frozen=True, slots=True)
class KernelHeaders:
    """Where bcc will find headers, and the environment the loader sets for it."""

    origin: str  # "BCC_KERNEL_SOURCE" | "/lib/modules" | "kheaders"
    path: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def _has_headers(tree: Path) -> bool:
    return (tree / KCONFIG_H).is_file()


def _modules_tree(kdir: Path, environ: Mapping[str, str]) -> Path:
    """The directory bcc compiles in for /lib/modules/<release> (bcc's get_kernel_path_info)."""
    if (kdir / "build").is_dir() and (kdir / "source").is_dir():
        return kdir / "source"
    return kdir / environ.get("BCC_KERNEL_MODULES_SUFFIX", "build")


def _dangling(link: Path) -> str | None:
    """The target of `link` if it is a symbolic link to nothing (e.g. /usr/src not mounted)."""
    if link.is_symlink() and not link.exists():
        return os.readlink(link)
    return None


def find_kernel_headers(
    release: str | None = None,
    environ: Mapping[str, str] | None = None,
    modules_dir: Path = MODULES_DIR,
) -> KernelHeaders:
    """Finds (or unpacks) headers for `release` (default: the running kernel)."""
    environ = os.environ if environ is None else environ
    release = release or os.uname().release
    looked: list[str] = []
    explicit = environ.get("BCC_KERNEL_SOURCE")
    if explicit:
        if _has_headers(Path(explicit)):
            return KernelHeaders("BCC_KERNEL_SOURCE", Path(explicit))
        looked.append(f"BCC_KERNEL_SOURCE={explicit} (no {KCONFIG_H})")
    else:
        kdir = modules_dir / release
        tree = _modules_tree(kdir, environ)
        if _has_headers(tree):
            return KernelHeaders("/lib/modules", tree)
        broken = [(link, t) for link in (kdir / "build", kdir / "source") if (t := _dangling(link))]
        if broken:
            looked.append(
                "; ".join(
                    f"{link} -> {target} (missing: mount the host's /usr/src)"
                    for link, target in broken
                )
            )
        else:
            looked.append(f"{tree} (no {KCONFIG_H})")
    archive = Path(environ.get(ARCHIVE_ENV) or KHEADERS_ARCHIVE)
    if archive.is_file():
        cache = Path(environ.get(CACHE_ENV) or KHEADERS_CACHE)
        tree = unpack_kheaders(archive, cache / release)
        return KernelHeaders("kheaders", tree, {"BCC_KERNEL_SOURCE": str(tree)})
    looked.append(f"{archive} (absent)")
    raise CaptureError(missing_headers_message(release, looked), errno.ENOENT)


def missing_headers_message(release: str, looked: list[str]) -> str:
    return (
        f"no kernel headers for the running kernel {release}; looked at: {'; '.join(looked)}. "
        "bcc compiles the capture programs against them. On the node, either install the "
        f"headers package (Debian/Ubuntu: apt install linux-headers-{release}; Fedora/RHEL: "
        "dnf install kernel-devel-$(uname -r)) and mount the host's /lib/modules and /usr/src "
        "into the agent read-only (the DaemonSet in deploy/ does), or use a kernel built with "
        "CONFIG_IKHEADERS (modprobe kheaders creates /sys/kernel/kheaders.tar.xz), or point "
        "BCC_KERNEL_SOURCE at a header tree"
    )


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Refuses what could write outside `dest` or is not a plain file, directory or link."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise CaptureError(f"kernel headers archive: unsafe member name {member.name!r}")
    if member.issym():
        target = PurePosixPath(member.linkname)
        resolved = os.path.normpath(dest / name.parent / target)
        if target.is_absolute() or not resolved.startswith(str(dest) + os.sep):
            raise CaptureError(
                f"kernel headers archive: link {member.name!r} points outside ({member.linkname})"
            )
    elif not (member.isfile() or member.isdir()):
        raise CaptureError(f"kernel headers archive: unexpected member type {member.name!r}")
    # Plain permissions and ownership, whatever the archive says (no set-id bits).
    member.mode = 0o755 if member.isdir() else 0o644
    member.uid = member.gid = 0
    member.uname = member.gname = ""


def unpack_kheaders(archive: Path, dest: Path) -> Path:
    """Unpacks the kernel's header archive into `dest` once; returns `dest`.

    Reused when `dest` holds a complete unpacking of an archive of the same size; unpacked into
    a temporary sibling and renamed, so a crash or a parallel loader never sees half a tree.
    """
    try:
        size = archive.stat().st_size
    except OSError as exc:
        raise CaptureError(f"reading {archive}", exc.errno or 0) from exc
    stamp = dest / ".ztunnel-unpacked"
    if stamp.is_file() and stamp.read_text().strip() == str(size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        total = 0
        with tarfile.open(archive, "r:*") as tar:
            members = []
            for member in tar:
                _check_member(member, tmp)
                total += max(member.size, 0)
                members.append(member)
                if total > MAX_UNPACKED_BYTES or len(members) > MAX_MEMBERS:
                    raise CaptureError(
                        f"kernel headers archive {archive} is larger than expected "
                        f"(over {MAX_UNPACKED_BYTES >> 20} MiB or {MAX_MEMBERS} files)"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # Debian 12's Python 3.11.2 predates extraction filters: checked above
                tar.extractall(tmp, members=members)
        if not _has_headers(tmp):
            raise CaptureError(f"kernel headers archive {archive} has no {KCONFIG_H}")
        (tmp / stamp.name).write_text(f"{size}\n")
        shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:
            if not (stamp.is_file() and stamp.read_text().strip() == str(size)):
                raise  # not a parallel loader that won the race
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CaptureError(f"unpacking kernel headers from {archive} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
