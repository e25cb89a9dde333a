"""Admission control without sockets: every yes is paired with a release, caps shed with a
counted reason, the automatic connection cap follows the open-file limit, the settings are
validated naming the flag, and shedding logs are throttled."""

from __future__ import annotations

import argparse
import logging

import pytest

from ztunnel.admission import (
    RESERVED_FDS,
    Admission,
    AdmissionLimits,
    Protection,
    auto_max_connections,
)
from ztunnel.config import Settings, add_arguments, settings_from
from ztunnel.errors import ConfigError
from ztunnel.logthrottle import ThrottledLog

pytestmark = pytest.mark.unit


def admission(**kw: int | float) -> Admission:
    return Admission(AdmissionLimits(**{"max_connections": 4, **kw}))  # type: ignore[arg-type]


def test_the_global_cap_sheds_and_releases() -> None:
    a = admission()
    assert all(a.admit("x", "1.2.3.4") for _ in range(4))
    assert not a.admit("x", "1.2.3.4")
    assert a.shed["max_connections"] == 1
    a.release()
    assert a.admit("x", "1.2.3.4")
    assert a.active == 4


def test_pending_handshakes_are_capped_globally_and_per_source() -> None:
    a = admission(max_pending_handshakes=3, max_pending_handshakes_per_source=2)
    assert a.begin_handshake("10.0.0.1") and a.begin_handshake("10.0.0.1")
    assert not a.begin_handshake("10.0.0.1")
    assert a.shed["pending_handshakes_per_source"] == 1
    assert a.begin_handshake("10.0.0.2")
    assert not a.begin_handshake("10.0.0.3")
    assert a.shed["pending_handshakes"] == 1
    a.end_handshake("10.0.0.1")
    assert a.begin_handshake("10.0.0.3")
    for src in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        a.end_handshake(src)
    assert a.pending == 0 and not a._pending_by_source


def test_connections_per_identity() -> None:
    a = admission(max_connections_per_identity=2)
    ident = "spiffe://cluster.local/ns/a/sa/b"
    assert a.admit_identity(ident, "p") and a.admit_identity(ident, "p")
    assert not a.admit_identity(ident, "p")
    assert a.admit_identity("spiffe://cluster.local/ns/c/sa/d", "p")
    a.release_identity(ident)
    assert a.identity_connections(ident) == 1
    assert a.shed["connections_per_identity"] == 1


def test_automatic_cap_follows_the_open_file_limit() -> None:
    assert auto_max_connections(20_000) == (20_000 - RESERVED_FDS) // 2
    assert auto_max_connections(1024) == 256  # never below a floor
    assert auto_max_connections(-1) > 1_000_000  # RLIM_INFINITY


def test_protection_from_settings_resolves_the_automatic_cap() -> None:
    prot = Protection.from_settings(Settings(max_connections=0, h2_max_resets=7))
    assert prot.admission.limits.max_connections >= 256
    assert prot.h2.limits.max_resets == 7
    assert (
        Protection.from_settings(Settings(max_connections=5)).admission.limits.max_connections == 5
    )


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["--max-connections", "-1"], {}, "--max-connections"),
        (["--h2-max-resets", "0"], {}, "--h2-max-resets"),
        ([], {"ZTUNNEL_HBONE_HANDSHAKE_TIMEOUT": "0"}, "ZTUNNEL_HBONE_HANDSHAKE_TIMEOUT"),
        ([], {"ZTUNNEL_H2_LIMIT_WINDOW": "nan"}, "ZTUNNEL_H2_LIMIT_WINDOW"),
        (["--h2-max-header-list-size", "100"], {}, "--h2-max-header-list-size"),
        (
            ["--max-pending-handshakes", "10", "--max-pending-handshakes-per-source", "11"],
            {},
            "--max-pending-handshakes-per-source",
        ),
        (["--max-connections-per-identity", "lots"], {}, "--max-connections-per-identity"),
    ],
)
def test_bad_limits_name_the_flag_or_variable(
    argv: list[str], env: dict[str, str], names: str
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--local-xds", "m.yaml", "--ca-dir", "ca", *argv])
    with pytest.raises(ConfigError) as e:
        settings_from(args, env)
    assert names in str(e.value)


def test_default_limits_are_valid() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from(parser.parse_args(["--local-xds", "m.yaml", "--ca-dir", "ca"]), {})
    assert s.max_pending_handshakes_per_source <= s.max_pending_handshakes
    assert s.h2_max_resets == 200 and s.h2_max_control_frames == 1000


def test_throttled_log_summarises_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    tl = ThrottledLog(logging.getLogger("t"), window=10, per_window=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(50):
            tl.warn("flood", "line %d", i)
        now[0] = 11.0
        tl.warn("flood", "line %d", 99)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "line 0",
        "line 1",
        "flood: 48 more like this in the last 11s were not logged",
        "line 99",
    ]
