"""`ztunnel ctl` without an agent: address parsing, tables, argument handling."""

from __future__ import annotations

import pytest

from ztunnel.cli import build_parser
from ztunnel.ctl import VIEWS, CtlError, parse_admin_address, render, render_table

pytestmark = pytest.mark.unit


def test_admin_addresses() -> None:
    assert parse_admin_address("127.0.0.1:15000") == ("127.0.0.1", 15000)
    assert parse_admin_address("http://localhost:9/") == ("localhost", 9)
    assert parse_admin_address("[::1]:15000") == ("::1", 15000)
    assert parse_admin_address("::1") == ("::1", 15000)
    assert parse_admin_address("localhost") == ("localhost", 15000)
    for bad in ("127.0.0.1:x", "127.0.0.1:0", "[::1", "[::1]x", "fe80::zz", ":80"):
        with pytest.raises(CtlError):
            parse_admin_address(bad)


def test_tables_align_and_fill_missing_values() -> None:
    view = {v.name: v for v in VIEWS}["workloads"]
    dump = {
        "workloads": [
            {"namespace": "b", "name": "x", "addresses": ["10.0.0.2"], "local": False},
            {
                "namespace": "a",
                "name": "long-name",
                "addresses": ["10.0.0.1", "fd00::1"],
                "local": True,
                "identity": "spiffe://td/ns/a/sa/s",
                "waypoint": {
                    "destination": {"namespace": "a", "hostname": "wp"},
                    "hbone_mtls_port": 15008,
                },
            },
        ]
    }
    lines = render_table(view.select(dump), view.columns).splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "NAME",
        "ADDRESSES",
        "NODE",
        "LOCAL",
        "PROTOCOL",
        "STATUS",
        "IDENTITY",
        "WAYPOINT",
    ]
    assert lines[1].split()[:3] == ["a", "long-name", "10.0.0.1,fd00::1"]  # local first
    assert lines[1].split()[-1] == "a/wp"
    assert lines[2].split()[:5] == ["b", "x", "10.0.0.2", "-", "no"]
    assert lines[0].index(" NAME ") + 1 == lines[1].index("long-name")


def test_services_count_endpoints_and_policies_accept_strings() -> None:
    views = {v.name: v for v in VIEWS}
    dump = {
        "workloads": [{"services": {"ns/h": {}}}, {"services": {"ns/h": {}}}, {}],
        "services": [
            {
                "namespace": "ns",
                "name": "s",
                "hostname": "h",
                "vips": [{"network": "", "address": "10.96.0.1"}],
                "ports": [{"service_port": 80, "target_port": 8080}],
            }
        ],
        "policies": [
            "opaque-policy",
            {
                "name": "p",
                "namespace": "ns",
                "scope": "NAMESPACE",
                "action": "DENY",
                "rules": [{}, {}],
                "dry_run": True,
            },
        ],
    }
    (svc,) = views["services"].select(dump)
    assert svc["endpoints"] == 2
    table = render_table(views["services"].select(dump), views["services"].columns)
    assert "80->8080" in table and "10.96.0.1" in table
    pol = render_table(views["policies"].select(dump), views["policies"].columns)
    assert "opaque-policy" in pol and "DENY" in pol


def test_render_json_and_yaml() -> None:
    assert render([{"a": 1}], "json").startswith("[")
    assert render([{"a": 1}], "yaml") == "- a: 1"


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl", "workloads", "-o", "json", "--admin", "127.0.0.1:1"],
        ["ctl", "--admin", "127.0.0.1:1", "-o", "json", "workloads"],
    ],
)
def test_flags_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.admin, args.output, args.ctl_command) == ("127.0.0.1:1", "json", "workloads")


def test_defaults_when_no_flags() -> None:
    args = build_parser().parse_args(["ctl", "connections"])
    assert not hasattr(args, "admin") and not hasattr(args, "output")
