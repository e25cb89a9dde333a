"""The image under test: built once per run from this tree by scripts/build-image.sh (offline:
mmdebstrap base, wheelhouse, podman), removed at the end; and a kernel-headers archive in the
layout of the kernel's /sys/kernel/kheaders.tar.xz, made from this machine's Debian headers
(these kernels have no CONFIG_IKHEADERS), for the loader's fallback path."""

from __future__ import annotations

import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import podman


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    kheaders: Path  # a kheaders.tar.xz for this machine's kernel


def make_kheaders_archive(out: Path) -> None:
    """What the kernel's gen_kheaders.sh packs: include/ and arch/<arch>/include/ of the source
    and build trees merged, as ./include/..., ./arch/x86/include/..."""
    kdir = Path("/lib/modules") / os.uname().release
    trees = [(kdir / d).resolve() for d in ("source", "build") if (kdir / d).is_dir()]
    if not trees:
        pytest.fail(f"no kernel headers under {kdir} (scripts/setup.sh links them)")
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=0) as tar:
        for tree in trees:
            for sub in ("include", "arch/x86/include"):
                if (tree / sub).is_dir():
                    tar.add(tree / sub, arcname=f"./{sub}")
    tmp.replace(out)


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    podman.require()
    archive = tmp_path_factory.mktemp("kheaders") / "kheaders.tar.xz"
    failure: list[BaseException] = []

    def pack() -> None:
        t0 = time.monotonic()
        try:
            make_kheaders_archive(archive)
        except BaseException as exc:  # reported below, in the test's thread
            failure.append(exc)
        podman.TIMINGS["kheaders archive (during the build)"] = time.monotonic() - t0

    packer = threading.Thread(target=pack, name="kheaders-archive", daemon=True)
    packer.start()  # compresses while podman builds
    tag = podman.built_image()
    packer.join(300)
    if failure:
        raise failure[0]
    assert archive.is_file(), "the kheaders archive was not made in time"
    try:
        yield BuiltImage(tag, archive)
    finally:
        podman.remove_image(tag)
        print(
            "\nimage test timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in podman.TIMINGS.items())
        )
