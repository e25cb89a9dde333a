"""The waypoint's settings: flags over environment variables, values converted and checked
with the agent's rules (ztunnel.config.convert_value)."""

from __future__ import annotations

import argparse

import pytest

from waypoint import config
from ztunnel.errors import ConfigError

pytestmark = pytest.mark.unit

REQUIRED = ["--local-xds", "mesh.yaml", "--ca-dir", "ca"]


def settings(argv: list[str], env: dict[str, str]) -> config.WaypointSettings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.settings_from(parser.parse_args(REQUIRED + argv), env)


def test_flags_win_over_environment_and_values_take_the_defaults_type() -> None:
    s = settings(["--hbone-port", "15010"], {"WAYPOINT_HBONE_PORT": "1", "SNIFF_TIMEOUT": "0.25"})
    assert s.hbone_port == 15010
    assert s.sniff_timeout == 0.25
    assert settings(["--dr-inheritance"], {}).dr_inheritance is True


@pytest.mark.parametrize(("raw", "expected"), [("on", True), ("1", True), ("off", False)])
def test_boolean_environment_values(raw: str, expected: bool) -> None:
    env = {name: raw for _, flag, name, _ in config._SPEC if flag == "--dr-inheritance"}
    assert settings([], env).dr_inheritance is expected


@pytest.mark.parametrize(
    ("argv", "env", "where"),
    [
        (["--hbone-port", "x"], {}, "--hbone-port"),
        ([], {"WAYPOINT_HBONE_PORT": "15008x"}, "WAYPOINT_HBONE_PORT"),
        ([], {"SNIFF_TIMEOUT": "soon"}, "SNIFF_TIMEOUT"),
    ],
)
def test_a_bad_value_names_where_it_came_from(
    argv: list[str], env: dict[str, str], where: str
) -> None:
    with pytest.raises(ConfigError) as e:
        settings(argv, env)
    assert where in str(e.value)


def test_a_misspelt_boolean_is_an_error_not_false() -> None:
    env = {name: "ture" for _, flag, name, _ in config._SPEC if flag == "--dr-inheritance"}
    with pytest.raises(ConfigError, match="expected true or false"):
        settings([], env)
