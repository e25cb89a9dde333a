"""podman for the image and Vagrant tests: the project's containers.conf, the image built once
per test run by scripts/build-image.sh (and its Debian base, which the Vagrant provisioning
check reuses), removal of what a run created."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = ROOT / "deploy" / "image" / "containers.conf"
BASE_IMAGE = "localhost/ztunnel-py-base:bookworm"  # made by scripts/build-image.sh
BUILD_TIMEOUT = 1200.0
# What each expensive step took in this run, for the durations report (tests print it).
TIMINGS: dict[str, float] = {}


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def require() -> None:
    if os.geteuid() != 0:
        pytest.fail("image tests need root (rootful podman, network namespaces)")
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs it")


def podman(
    args: Sequence[str], timeout: float = 120.0, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env(),
        **kw,  # type: ignore[arg-type]
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


@functools.lru_cache(maxsize=1)
def built_image() -> str:
    """Builds the image from this tree once per test run (offline build, scripts/build-image.sh)
    under a unique tag; the Debian base is made too unless this machine has it already."""
    require()
    tag = f"localhost/ztunnel-py:test-{secrets.token_hex(4)}"
    t0 = time.monotonic()
    had_base = podman(["image", "exists", BASE_IMAGE], check=False).returncode == 0
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), "--tag", tag],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"scripts/build-image.sh failed:\n{done.stdout}\n{done.stderr}"
    TIMINGS["image build" + (" (base reused)" if had_base else " (with mmdebstrap base)")] = (
        time.monotonic() - t0
    )
    return tag


@functools.lru_cache(maxsize=1)
def base_image() -> str:
    """The Debian 12 base (mmdebstrap) the image is built on: the image build's, or made now."""
    require()
    if podman(["image", "exists", BASE_IMAGE], check=False).returncode != 0:
        t0 = time.monotonic()
        done = subprocess.run(
            [str(ROOT / "scripts" / "build-image.sh"), "--base-only"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"build-image.sh --base-only failed:\n{done.stderr}"
        TIMINGS["mmdebstrap base"] = time.monotonic() - t0
    return BASE_IMAGE


def remove_image(tag: str) -> None:
    podman(["rmi", "--force", "--ignore", tag], check=False)
