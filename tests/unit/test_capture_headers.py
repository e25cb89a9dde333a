"""Where the BPF loader finds kernel headers (ztunnel.capture.headers), on made-up trees: the
/lib/modules layouts distributions install, BCC_KERNEL_SOURCE, the kheaders archive fallback
(unpacked once, atomically, safely), and the error an operator gets when there is nothing."""

from __future__ import annotations

import errno
import io
import os
import tarfile
from pathlib import Path

import pytest

from ztunnel.capture import headers
from ztunnel.capture.errors import CaptureError
from ztunnel.capture.headers import find_kernel_headers, unpack_kheaders

RELEASE = "6.9.0-test"


def header_tree(root: Path) -> Path:
    (root / "include" / "linux").mkdir(parents=True)
    (root / "include" / "linux" / "kconfig.h").write_text("/* kconfig */\n")
    (root / "arch" / "x86" / "include").mkdir(parents=True)
    return root


def kheaders_archive(path: Path, extra: list[tarfile.TarInfo] | None = None) -> Path:
    """An archive shaped like the kernel's (members ./include/..., ./arch/x86/include/...)."""
    with tarfile.open(path, "w:xz") as tar:
        for name, data in (
            ("./include/linux/kconfig.h", b"/* kconfig */\n"),
            ("./include/generated/autoconf.h", b"#define CONFIG_NET 1\n"),
            ("./arch/x86/include/asm/types.h", b"\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def env(tmp_path: Path, archive: Path | None = None, **more: str) -> dict[str, str]:
    return {
        headers.ARCHIVE_ENV: str(archive or tmp_path / "no-kheaders.tar.xz"),
        headers.CACHE_ENV: str(tmp_path / "cache"),
        **more,
    }


def test_split_tree_of_a_distribution_package_is_used_as_bcc_does(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    kdir = modules / RELEASE
    kdir.mkdir(parents=True)
    build = header_tree(tmp_path / "usr-src" / "linux-headers-amd64")
    source = header_tree(tmp_path / "usr-src" / "linux-headers-common")
    (kdir / "build").symlink_to(build)
    (kdir / "source").symlink_to(source)
    found = find_kernel_headers(RELEASE, env(tmp_path), modules)
    assert found.origin == "/lib/modules"
    assert found.path == kdir / "source"  # bcc compiles in source/ when both exist
    assert found.env == {}  # bcc's default lookup finds it: nothing to set


def test_build_directory_alone_is_used(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    header_tree(modules / RELEASE / "build")
    found = find_kernel_headers(RELEASE, env(tmp_path), modules)
    assert found.path == modules / RELEASE / "build"


def test_explicit_bcc_kernel_source_wins(tmp_path: Path) -> None:
    tree = header_tree(tmp_path / "elsewhere")
    header_tree(tmp_path / "modules" / RELEASE / "build")
    found = find_kernel_headers(
        RELEASE, env(tmp_path, BCC_KERNEL_SOURCE=str(tree)), tmp_path / "modules"
    )
    assert (found.origin, found.path) == ("BCC_KERNEL_SOURCE", tree)


def test_kheaders_archive_is_unpacked_and_given_to_bcc(tmp_path: Path) -> None:
    archive = kheaders_archive(tmp_path / "kheaders.tar.xz")
    found = find_kernel_headers(RELEASE, env(tmp_path, archive), tmp_path / "modules")
    assert found.origin == "kheaders"
    assert found.path == tmp_path / "cache" / RELEASE
    assert found.env == {"BCC_KERNEL_SOURCE": str(found.path)}
    assert (found.path / "include" / "generated" / "autoconf.h").read_text().startswith("#def")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_unpacked_headers_are_reused_until_the_archive_changes(tmp_path: Path) -> None:
    archive = kheaders_archive(tmp_path / "kheaders.tar.xz")
    dest = tmp_path / "cache" / RELEASE
    unpack_kheaders(archive, dest)
    marker = dest / "include" / "linux" / "kconfig.h"
    marker.write_text("/* touched */\n")
    unpack_kheaders(archive, dest)
    assert marker.read_text() == "/* touched */\n", "unpacked again although nothing changed"
    big = tarfile.TarInfo("./include/linux/new.h")
    big.size = 10_000
    kheaders_archive(archive, [big])  # a new kernel's archive: a different size
    unpack_kheaders(archive, dest)
    assert marker.read_text() == "/* kconfig */\n"
    assert (dest / "include" / "linux" / "new.h").stat().st_size == 10_000


def test_dangling_links_say_that_usr_src_is_not_mounted(tmp_path: Path) -> None:
    kdir = tmp_path / "modules" / RELEASE
    kdir.mkdir(parents=True)
    (kdir / "build").symlink_to("/usr/src/linux-headers-absent-amd64")
    with pytest.raises(CaptureError) as info:
        find_kernel_headers(RELEASE, env(tmp_path), tmp_path / "modules")
    msg = str(info.value)
    assert "/usr/src/linux-headers-absent-amd64" in msg and "mount the host's /usr/src" in msg


def test_nothing_found_tells_the_operator_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(CaptureError) as info:
        find_kernel_headers(RELEASE, env(tmp_path), tmp_path / "modules")
    err = info.value
    assert err.errno == errno.ENOENT
    msg = str(err)
    assert f"apt install linux-headers-{RELEASE}" in msg
    assert "kernel-devel" in msg and "CONFIG_IKHEADERS" in msg and "modprobe kheaders" in msg
    assert "/lib/modules and /usr/src" in msg
    assert str(tmp_path / "modules" / RELEASE / "build") in msg  # what was looked at


def test_bad_bcc_kernel_source_falls_back_to_kheaders(tmp_path: Path) -> None:
    archive = kheaders_archive(tmp_path / "kheaders.tar.xz")
    found = find_kernel_headers(
        RELEASE, env(tmp_path, archive, BCC_KERNEL_SOURCE=str(tmp_path / "empty")), tmp_path
    )
    assert found.origin == "kheaders"


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escaped.h"),
        _member("./include/../../escaped.h"),
        _member("/etc/escaped.h"),
        _member("./include/evil", tarfile.SYMTYPE, "/etc/shadow"),
        _member("./include/evil", tarfile.SYMTYPE, "../../../escaped"),
        _member("./include/dev", tarfile.CHRTYPE),
        _member("./include/hard", tarfile.LNKTYPE, "./include/linux/kconfig.h"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "abs-link", "escaping-link", "device", "hardlink"],
)
def test_unsafe_archives_are_refused_and_leave_nothing(
    tmp_path: Path, member: tarfile.TarInfo
) -> None:
    archive = kheaders_archive(tmp_path / "k.tar.xz", [member])
    dest = tmp_path / "cache" / "r"
    with pytest.raises(CaptureError, match="kernel headers archive"):
        unpack_kheaders(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "escaped.h").exists() and not (tmp_path / "cache" / "escaped").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


@pytest.mark.parametrize("filters", [True, False], ids=["with-filters", "python-3.11.2"])
def test_set_id_bits_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filters: bool
) -> None:
    if not filters:  # Debian 12's Python (the image's) has no extraction filters
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    suid = _member("./include/linux/suid.h")
    suid.mode = 0o4777
    dest = unpack_kheaders(kheaders_archive(tmp_path / "k.tar.xz", [suid]), tmp_path / "d")
    assert (dest / "include" / "linux" / "suid.h").stat().st_mode & 0o7777 == 0o644


def test_corrupt_and_oversized_archives_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.tar.xz"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CaptureError, match="unpacking kernel headers"):
        unpack_kheaders(garbage, tmp_path / "d1")
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(kheaders_archive(tmp_path / "full.tar.xz").read_bytes()[:100])
    with pytest.raises(CaptureError, match="unpacking kernel headers"):
        unpack_kheaders(truncated, tmp_path / "d2")
    monkeypatch.setattr(headers, "MAX_UNPACKED_BYTES", 16)
    with pytest.raises(CaptureError, match="larger than expected"):
        unpack_kheaders(kheaders_archive(tmp_path / "k.tar.xz"), tmp_path / "d3")
    no_kconfig = tmp_path / "no-kconfig.tar.xz"
    with tarfile.open(no_kconfig, "w:xz") as tar:
        tar.addfile(_member("./include/x.h"), io.BytesIO(b"abcd"))
    monkeypatch.setattr(headers, "MAX_UNPACKED_BYTES", 1 << 30)
    with pytest.raises(CaptureError, match=r"has no include/linux/kconfig\.h"):
        unpack_kheaders(no_kconfig, tmp_path / "d4")
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3", "d4"))
