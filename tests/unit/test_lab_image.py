"""The image lab's podman command and options (ztunnel.lab.image), without running podman: what
the agent's container gets (the DaemonSet's privileges, mounts, the node's namespace), and
bad options refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ztunnel.lab import image as lab_image
from ztunnel.lab import topology as topo
from ztunnel.lab.image import ImageOptions
from ztunnel.lab.topology import LabError

LAB = "zt0a1b2c"


def node() -> topo.NodeSpec:
    return topo.plan(LAB, 2, 1).nodes[1]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_agent_container_gets_the_daemonsets_privileges_and_the_node_namespace() -> None:
    argv = lab_image.agent_command(LAB, node(), ImageOptions("localhost/zt:1"), ["run", "-x"])
    assert argv[:2] == ["podman", "run"]
    # The image, then the command: `ztunnel` and the agent's own arguments, untouched.
    i = argv.index("localhost/zt:1")
    assert argv[i + 1 :] == ["ztunnel", "run", "-x"]
    options = argv[:i]
    assert flag_values(options, "--network") == [f"ns:/run/netns/{LAB}-n1"]
    assert flag_values(options, "--cap-drop") == ["all"]
    assert flag_values(options, "--cap-add") == [",".join(lab_image.AGENT_CAPABILITIES)]
    assert "--privileged" not in options and "--read-only" in options
    assert "seccomp=unconfined" not in options  # the runtime's default profile
    volumes = flag_values(options, "--volume")
    state = f"{topo.STATE_DIR / LAB}"
    assert f"{state}:{state}" in volumes
    assert f"{topo.BPFFS_DIR}:{topo.BPFFS_DIR}" in volumes
    assert {"/lib/modules:/lib/modules:ro", "/usr/src:/usr/src:ro"} <= set(volumes)
    assert flag_values(options, "--name") == [f"{LAB}-n1-agent"]
    assert flag_values(options, "--label") == [f"{lab_image.LABEL}={LAB}"]
    assert "ZTUNNEL_STATUS_ADDRESS=0.0.0.0" in flag_values(options, "--env")


def test_kheaders_node_gets_the_archive_instead_of_host_headers() -> None:
    opts = ImageOptions("img", kheaders_nodes=("n1",), kheaders_archive="/tmp/k.tar.xz")
    options = lab_image.agent_command(LAB, node(), opts, ["run"])
    volumes = flag_values(options, "--volume")
    assert not [v for v in volumes if v.startswith(("/lib/modules", "/usr/src"))]
    assert "/tmp/k.tar.xz:/run/ztunnel-kheaders.tar.xz:ro" in volumes
    assert "ZTUNNEL_KHEADERS_ARCHIVE=/run/ztunnel-kheaders.tar.xz" in flag_values(options, "--env")


def test_privileged_variant_for_comparison_runs() -> None:
    options = lab_image.agent_command(LAB, node(), ImageOptions("img", privileged=True), ["run"])
    assert "--privileged" in options and "--cap-add" not in options


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": ""}, "not an image name"),
        ({"image": "--rm"}, "not an image name"),
        ({"image": "img", "kheaders_nodes": ("n0",)}, "needs kheaders_archive"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LabError, match=message):
        ImageOptions(**kwargs)  # type: ignore[arg-type]


def test_options_survive_the_lab_state_and_bad_state_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topo, "STATE_DIR", tmp_path)
    assert lab_image.load(LAB) is None  # a lab whose agents run from the venv
    opts = ImageOptions("img", kheaders_nodes=("n1",), kheaders_archive="/k")
    lab_image.save(LAB, opts)
    assert lab_image.load(LAB) == opts
    for bad in ("{not json", json.dumps({"kheaders_nodes": []}), json.dumps([1])):
        (tmp_path / LAB / "image.json").write_text(bad)
        with pytest.raises(LabError, match="image"):
            lab_image.load(LAB)


def test_other_node_processes_run_with_every_capability_dropped() -> None:
    argv = lab_image.process_command(
        LAB, f"{LAB}-n0", "n0-controller", ImageOptions("img"),
        ["/venv/bin/python", "-m", "cni", "controller", "--node-name", "n0"],
    )  # fmt: skip
    i = argv.index("img")
    assert argv[i + 1 :] == ["python", "-m", "cni", "controller", "--node-name", "n0"]
    assert flag_values(argv[:i], "--cap-drop") == ["all"] and "--cap-add" not in argv
    assert flag_values(argv[:i], "--network") == [f"ns:/run/netns/{LAB}-n0"]
    assert flag_values(argv[:i], "--name") == [f"{LAB}-n0-controller"]
    with pytest.raises(LabError, match="python -m MODULE"):
        lab_image.process_command(LAB, "x", "y", ImageOptions("img"), ["ztunnel-cni"])
