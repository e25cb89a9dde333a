"""The delta ADS state machine with paired in-memory messages: initial requests, ACK/NACK with
nonces, partial application, removals, and what a reconnect claims to hold."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import any_pb2

from ztunnel.errors import ZtunnelError
from ztunnel.xds.ads import DeltaAdsClient
from ztunnel.xds.gen.envoy.config.core.v3 import base_pb2
from ztunnel.xds.gen.envoy.service.discovery.v3 import discovery_pb2 as dpb

pytestmark = pytest.mark.unit

A, B = "type.googleapis.com/a.A", "type.googleapis.com/b.B"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def conv(res: any_pb2.Any) -> str:
    if res.value.startswith(b"bad"):
        raise ZtunnelError(f"cannot use {res.value.decode()}")
    return res.value.decode()


def client() -> DeltaAdsClient:
    return DeltaAdsClient(
        base_pb2.Node(id="ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local"), {A: conv, B: conv}
    )


def response(
    type_url: str, nonce: str, add: dict[str, tuple[str, bytes]], remove: list[str] = ()
) -> dpb.DeltaDiscoveryResponse:  # type: ignore[assignment]
    r = dpb.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce, removed_resources=list(remove))
    for name, (version, value) in add.items():
        r.resources.add(
            name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=value)
        )
    return r


def test_initial_requests_subscribe_to_everything_with_the_node() -> None:
    reqs = client().initial_requests()
    assert [r.type_url for r in reqs] == [A, B]
    for r in reqs:
        assert r.node.id.startswith("ztunnel~")
        assert (
            not r.resource_names_subscribe
            and not r.initial_resource_versions
            and not r.response_nonce
        )


def test_ack_nack_partial_apply_and_removal() -> None:
    c = client()
    r = c.receive(response(A, "1", {"x": ("v1", b"X"), "y": ("v1", b"bad-y")}), NOW)
    assert not r.acked and r.changed
    assert r.reply.response_nonce == "1" and r.reply.type_url == A
    assert r.reply.error_detail.message == "y: cannot use bad-y"
    assert [str(x) for x in r.rejected] == ["y: cannot use bad-y"]
    assert c.resources(A) == ["X"]
    assert not c.synced  # B has not answered yet
    r = c.receive(response(B, "2", {}), NOW)
    assert r.acked and not r.changed and c.synced
    # An update of x and a fix of y: ACK.
    r = c.receive(response(A, "3", {"x": ("v2", b"X2"), "y": ("v2", b"Y")}), NOW)
    assert r.acked and r.changed and c.resources(A) == ["X2", "Y"]
    # Same content again: ACK, nothing changed.
    r = c.receive(response(A, "4", {"x": ("v3", b"X2")}), NOW)
    assert r.acked and not r.changed
    r = c.receive(response(A, "5", {}, ["x", "unknown"]), NOW)
    assert r.acked and r.changed and c.resources(A) == ["Y"]
    st = {s["type_url"]: s for s in c.status()}[A]
    assert st["acks"] == 3 and st["nacks"] == 1 and st["last_ack"]["nonce"] == "5"
    assert st["last_nack"]["error"] == "y: cannot use bad-y" and st["rejected"] == {}


def test_rejected_resources_are_not_claimed_on_reconnect_but_the_old_value_stays() -> None:
    c = client()
    c.receive(response(A, "1", {"x": ("v1", b"X"), "z": ("v1", b"Z")}), NOW)
    r = c.receive(response(A, "2", {"x": ("v2", b"bad-x")}), NOW)
    assert not r.acked and c.resources(A) == ["X", "Z"]
    init = {q.type_url: dict(q.initial_resource_versions) for q in c.initial_requests()}
    assert init[A] == {"z": "v1"}  # istiod re-sends x
    assert init[B] == {}


def test_unknown_types_and_nameless_resources_are_nacked() -> None:
    c = client()
    r = c.receive(response("type.googleapis.com/other", "1", {}), NOW)
    assert not r.acked and "not subscribed" in r.reply.error_detail.message
    resp = response(A, "2", {"": ("v", b"X")})
    resp.resources.add(name="nobody", version="v")
    r = c.receive(resp, NOW)
    assert not r.acked
    assert (
        r.reply.error_detail.message
        == "<unnamed>: resource has no name; nobody: resource has no body"
    )


def test_nack_text_is_bounded() -> None:
    c = client()
    many = {f"n{i}": ("v", b"bad" + b"x" * 200) for i in range(500)}
    r = c.receive(response(A, "1", many), NOW)
    assert len(r.reply.error_detail.message.encode()) <= 16 * 1024
    assert r.reply.error_detail.message.endswith("(truncated)")
    assert len(r.rejected) == 500


def test_a_converter_bug_is_a_rejection_not_a_crash() -> None:
    def broken(res: any_pb2.Any) -> str:
        raise KeyError("boom")

    c = DeltaAdsClient(base_pb2.Node(id="n"), {A: broken})
    r = c.receive(response(A, "1", {"x": ("v", b"X")}), NOW)
    assert not r.acked and "cannot convert (KeyError" in r.reply.error_detail.message
