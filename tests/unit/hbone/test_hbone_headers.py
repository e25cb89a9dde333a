"""HBONE request header helpers: `:authority`, `baggage`, `forwarded`, `traceparent`."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.errors import HboneError
from ztunnel.hbone.headers import (
    ConnectRequest,
    baggage_for,
    format_authority,
    forwarded_for,
    new_traceparent,
    parse_authority,
    parse_baggage,
)
from ztunnel.model import Workload

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address


def test_format_authority_v4_and_bracketed_v6() -> None:
    assert format_authority(ip("10.1.2.3"), 8080) == "10.1.2.3:8080"
    assert format_authority(ip("fd00::1"), 443) == "[fd00::1]:443"
    assert format_authority(ip("::ffff:10.0.0.1"), 1) == "[::ffff:a00:1]:1"


def test_parse_authority() -> None:
    assert parse_authority("10.1.2.3:8080") == (ip("10.1.2.3"), 8080)
    assert parse_authority("[fd00::1]:443") == (ip("fd00::1"), 443)
    assert parse_authority("0.0.0.0:1") == (ip("0.0.0.0"), 1)


@pytest.mark.parametrize(
    "bad",
    [
        "example.com:80",
        "10.0.0.1",
        "10.0.0.1:",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:70000",
        "::1:80",
        "[::1]",
        "[::1]x:80",
        "10.0.0.1:+80",
        "10.0.0.1: 80",
        "",
        ":80",
        "10.0.0.1:\u00b2",
        "10.0.0.1:\u0663",
        "[10.0.0.1]:80",
    ],
)
def test_parse_authority_rejects_with_400(bad: str) -> None:
    with pytest.raises(HboneError) as exc:
        parse_authority(bad)
    assert exc.value.status == 400


@given(st.ip_addresses(v=4) | st.ip_addresses(v=6), st.integers(1, 65535))
def test_authority_round_trips(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    assert parse_authority(format_authority(addr, port)) == (addr, port)


@given(st.text(max_size=60))
def test_parse_authority_only_ever_raises_hbone_error(text: str) -> None:
    try:
        parse_authority(text)
    except HboneError as e:
        assert e.status == 400


def _workload(**kw: object) -> Workload:
    base: dict[str, object] = dict(
        uid="Kubernetes//Pod/shop/echo-1",
        name="echo-1",
        namespace="shop",
        addresses=(ip("10.0.0.1"),),
    )
    base.update(kw)
    return Workload(**base)  # type: ignore[arg-type]


def test_baggage_carries_the_kubernetes_facts() -> None:
    w = _workload(
        cluster_id="east",
        workload_type="deployment",
        workload_name="echo",
        canonical_name="echo-svc",
        canonical_revision="v2",
    )
    value = baggage_for(w)
    assert parse_baggage(value) == {
        "k8s.cluster.name": "east",
        "k8s.namespace.name": "shop",
        "k8s.deployment.name": "echo",
        "service.name": "echo-svc",
        "service.version": "v2",
    }
    assert " " not in value


def test_baggage_omits_empty_values() -> None:
    w = _workload(cluster_id="", canonical_name="", canonical_revision="")
    got = parse_baggage(baggage_for(w))
    assert "service.name" not in got and "service.version" not in got
    assert "k8s.cluster.name" not in got
    assert got["k8s.pod.name"] == "echo-1"
    assert not any(v == "" for v in got.values())
    assert baggage_for(_workload(cluster_id=""), cluster="west").startswith("k8s.cluster.name=west")


def test_baggage_for_no_workload_is_empty() -> None:
    assert baggage_for(None) == ""


def test_forwarded_for() -> None:
    assert forwarded_for(ip("10.0.0.9"), 41000) == 'for="10.0.0.9:41000"'
    assert forwarded_for(ip("fd00::9"), 5) == 'for="[fd00::9]:5"'
    assert (
        forwarded_for(ip("10.0.0.9"), 1, "echo.shop.svc.cluster.local")
        == 'for="10.0.0.9:1";host=echo.shop.svc.cluster.local'
    )


def test_traceparent_format_and_randomness() -> None:
    pattern = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-00$")
    values = {new_traceparent() for _ in range(50)}
    assert len(values) == 50
    for v in values:
        assert pattern.match(v), v
        trace_id, parent_id = v.split("-")[1:3]
        # W3C trace-context: all-zero ids are invalid.
        assert trace_id != "0" * 32 and parent_id != "0" * 16


def test_connect_request_header_list() -> None:
    req = ConnectRequest("10.0.0.1:80", baggage="a=b", forwarded="", traceparent="t")
    assert req.header_list() == [
        (b":method", b"CONNECT"),
        (b":authority", b"10.0.0.1:80"),
        (b"baggage", b"a=b"),
        (b"traceparent", b"t"),
    ]
