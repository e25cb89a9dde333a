"""Settings of `ztunnel run` (`ztunnel.config.settings_from`): Istio's environment variable
names, flags over environment over defaults, and errors that name the flag or variable."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from ztunnel import config
from ztunnel.config import Settings, settings_from
from ztunnel.errors import ConfigError

pytestmark = pytest.mark.unit

BASE_ENV = {"LOCAL_XDS_PATH": "/etc/mesh.yaml", "ZTUNNEL_CA_DIR": "/etc/cacerts"}


def parse(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return settings_from(parser.parse_args(argv), BASE_ENV if env is None else env)


def test_istio_environment_names() -> None:
    s = parse(
        [],
        {
            **BASE_ENV,
            "TRUST_DOMAIN": "example.org",
            "CLUSTER_ID": "east",
            "NODE_NAME": "node-7",
            "LOG_FORMAT": "json",
        },
    )
    assert s.local_xds_path == "/etc/mesh.yaml"
    assert s.ca_dir == "/etc/cacerts"
    assert s.trust_domain == "example.org"
    assert s.cluster_id == "east"
    assert s.node_name == "node-7"
    assert s.log_format == "json"


def test_defaults() -> None:
    s = parse([])
    assert (s.outbound_port, s.inbound_plaintext_port, s.hbone_port) == (15001, 15006, 15008)
    assert (s.socks5_port, s.admin_port, s.stats_port, s.readiness_port) == (
        15080,
        15000,
        15020,
        15021,
    )
    assert s.trust_domain == "cluster.local"
    assert s.own_ports == {15001, 15006, 15008}
    assert s.allow_tls12 is False


def test_flags_override_environment() -> None:
    env = {
        **BASE_ENV,
        "NODE_NAME": "from-env",
        "TRUST_DOMAIN": "env.org",
        "ZTUNNEL_HBONE_PORT": "16008",
    }
    s = parse(["--node-name", "from-flag", "--hbone-port", "17008", "--local-xds", "/x.yaml"], env)
    assert s.node_name == "from-flag"
    assert s.hbone_port == 17008
    assert s.local_xds_path == "/x.yaml"
    assert s.trust_domain == "env.org"  # no flag: the environment still counts
    assert s.own_ports == {15001, 15006, 17008}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("ON", True),
        ("false", False),
        ("0", False),
        ("no", False),
    ],
)
def test_booleans_from_environment(value: str, expected: bool) -> None:
    assert parse([], {**BASE_ENV, "ZTUNNEL_ALLOW_TLS12": value}).allow_tls12 is expected


def test_boolean_flag_without_value_is_true() -> None:
    assert parse(["--allow-tls12"]).allow_tls12 is True
    assert (
        parse(["--allow-tls12", "false"], {**BASE_ENV, "ZTUNNEL_ALLOW_TLS12": "1"}).allow_tls12
        is False
    )


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["--hbone-port", "abc"], {}, ["--hbone-port", "abc"]),
        ([], {"ZTUNNEL_HBONE_PORT": "abc"}, ["ZTUNNEL_HBONE_PORT", "abc"]),
        ([], {"ZTUNNEL_ALLOW_TLS12": "maybe"}, ["ZTUNNEL_ALLOW_TLS12", "maybe"]),
        (["--connect-timeout", "soon"], {}, ["--connect-timeout", "soon"]),
        # Values of the right type but not acceptable: the message still names what the user
        # set, the flag or the environment variable (validate() checks these).
        (["--hbone-port", "70000"], {}, ["--hbone-port", "70000"]),
        ([], {"LOG_FORMAT": "xml"}, ["LOG_FORMAT", "xml"]),
        (["--capture", "iptables"], {}, ["--capture", "iptables"]),
        ([], {"TERMINATION_GRACE_PERIOD_SECONDS": "-5"}, ["TERMINATION_GRACE_PERIOD_SECONDS"]),
    ],
    ids=[
        "int-flag",
        "int-env",
        "bool-env",
        "float-flag",
        "port-range-flag",
        "log-format-env",
        "capture-flag",
        "grace-env",
    ],
)
def test_bad_values_name_the_flag_or_variable(
    argv: list[str], env: dict[str, str], names: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(argv, {**BASE_ENV, **env})
    for name in names:
        assert name in str(exc.value), str(exc.value)


def test_missing_mesh_state_names_the_flag_and_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        parse([], {"ZTUNNEL_CA_DIR": "/ca"})
    assert "--local-xds" in str(exc.value) and "LOCAL_XDS_PATH" in str(exc.value)


def test_missing_ca_dir_names_the_flag() -> None:
    with pytest.raises(ConfigError) as exc:
        parse([], {"LOCAL_XDS_PATH": "/m.yaml"})
    assert "--ca-dir" in str(exc.value)


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    described = config.describe()
    assert len(described) == len(fields(Settings))
    flags = [f for f, _, _ in described]
    envs = [e for _, e, _ in described]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    assert all(f.startswith("--") for f in flags)
    assert all(e and e.upper() == e for e in envs)
    assert all(h for _, _, h in described)


def test_capture_ordering_settings() -> None:
    s = parse(
        ["--capture-attach", "cls_bpf", "--capture-tc-priority", "10"],
        {
            **BASE_ENV,
            "ZTUNNEL_CAPTURE_ALLOW_AHEAD": "cil_from_netdev, xdp_lb",
            "ZTUNNEL_CAPTURE_CHECK_INTERVAL": "0.5",
        },
    )
    assert (s.capture_attach, s.capture_tc_priority) == ("cls_bpf", 10)
    assert s.capture_allow_ahead == "cil_from_netdev, xdp_lb"
    assert s.capture_check_interval == 0.5
    defaults = parse([], BASE_ENV)
    assert defaults.capture_attach == "auto" and defaults.capture_allow_ahead == ""
    for argv, name in (
        (["--capture-attach", "xdp"], "--capture-attach"),
        (["--capture-tc-priority", "0"], "--capture-tc-priority"),
        (["--capture-check-interval", "0"], "--capture-check-interval"),
        (["--capture-check-interval", "nan"], "--capture-check-interval"),
        (["--capture-allow-ahead", "a b"], "--capture-allow-ahead"),
    ):
        with pytest.raises(ConfigError) as exc:
            parse(argv, BASE_ENV)
        assert name in str(exc.value), (argv, str(exc.value))
