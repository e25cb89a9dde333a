"""`ztunnel run` as a user starts it (a subprocess): configuration errors, `--help`, and a
clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ztunnel import config
from ztunnel.ca import CertificateAuthority
from ztunnel.testing import port_open, random_loopback_net, wait_for

pytestmark = pytest.mark.integration

# Settings come from the environment too: run with none of the agent's variables set.
_AGENT_ENV = {env for _, env, _ in config.describe()}


def clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in _AGENT_ENV and not k.startswith("ZTUNNEL_")
    }


def ztunnel_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztunnel", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


def port_args() -> list[str]:
    ports = []
    held = []
    try:
        for _ in range(4):  # distinct: each held open until all are chosen
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    outbound, inbound, hbone, socks = (str(p) for p in ports)
    return [
        "--outbound-port",
        outbound,
        "--inbound-plaintext-port",
        inbound,
        "--hbone-port",
        hbone,
        "--socks5-port",
        socks,
        "--admin-port",
        "0",
        "--stats-port",
        "0",
        "--readiness-port",
        "0",
    ]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    CertificateAuthority.create("cluster.local").save(d)
    return d


def test_bad_mesh_file_exits_2_naming_file_field_and_reason(tmp_path: Path, ca_dir: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        yaml.safe_dump(
            {
                "workloads": [
                    {"name": "a", "workloadIps": ["10.0.0.1"]},
                    {"name": "b", "workloadIps": ["10.0.0.999"]},
                ]
            }
        )
    )
    res = ztunnel_run("--local-xds", str(mesh), "--ca-dir", str(ca_dir), *port_args())
    assert res.returncode == 2, res.stderr
    assert str(mesh) in res.stderr
    assert "workloads[1].workloadIps[0]" in res.stderr
    assert "not an IP address" in res.stderr and "10.0.0.999" in res.stderr
    assert "Traceback" not in res.stderr


def test_invalid_yaml_exits_2_with_the_line(tmp_path: Path, ca_dir: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("workloads:\n  - name: a\n    workloadIps: [10.0.0.1, ]]\n")
    res = ztunnel_run("--local-xds", str(mesh), "--ca-dir", str(ca_dir), *port_args())
    assert res.returncode == 2
    assert str(mesh) in res.stderr and "line 3" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_mesh_file_exits_2(tmp_path: Path, ca_dir: Path) -> None:
    missing = tmp_path / "nope.yaml"
    res = ztunnel_run("--local-xds", str(missing), "--ca-dir", str(ca_dir), *port_args())
    assert res.returncode == 2
    assert str(missing) in res.stderr and "Traceback" not in res.stderr


def test_missing_ca_dir_is_a_clear_error(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("workloads: []\n")
    res = ztunnel_run("--local-xds", str(mesh), *port_args())
    assert res.returncode == 2
    assert "--ca-dir" in res.stderr
    assert "Traceback" not in res.stderr


def test_unreadable_ca_dir_names_it(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("workloads: []\n")
    res = ztunnel_run("--local-xds", str(mesh), "--ca-dir", str(tmp_path / "no-ca"), *port_args())
    assert res.returncode == 2
    assert str(tmp_path / "no-ca") in res.stderr and "--ca-dir" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_flag_value_exits_2(tmp_path: Path, ca_dir: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("workloads: []\n")
    res = ztunnel_run("--local-xds", str(mesh), "--ca-dir", str(ca_dir), "--hbone-port", "x")
    assert res.returncode == 2
    assert "--hbone-port" in res.stderr and "Traceback" not in res.stderr


def test_help_lists_every_setting_with_its_environment_variable() -> None:
    res = ztunnel_run("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())  # argparse wraps lines: compare on words
    options = text[text.index("options:") :]
    described = config.describe()
    assert len(described) == len(config.Settings.__dataclass_fields__)
    for flag, env, _ in described:
        m = re.search(re.escape(flag) + r"\b(?:(?! --).)*?\[env ([A-Z0-9_]+);", options)
        assert m is not None, f"{flag} is not in --help"
        assert m.group(1) == env, f"{flag} shows env {m.group(1)}, expected {env}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_agent_exits_0_on_signal(tmp_path: Path, ca_dir: Path, sig: signal.Signals) -> None:
    net = random_loopback_net()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        yaml.safe_dump(
            {
                "workloads": [
                    {
                        "name": "echo",
                        "namespace": "shop",
                        "workloadIps": [f"{net}.5"],
                        "node": "node-x",
                    }
                ]
            }
        )
    )
    ports = port_args()
    hbone = int(ports[ports.index("--hbone-port") + 1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ztunnel",
            "run",
            "--node-name",
            "node-x",
            "--local-xds",
            str(mesh),
            "--ca-dir",
            str(ca_dir),
            "--drain-timeout",
            "3",
            *ports,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        wait_for(lambda: proc.poll() is not None or port_open(f"{net}.5", hbone), timeout=20)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
