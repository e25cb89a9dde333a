"""xDS <-> model conversion without I/O: round trips of real mesh files, errors per field, and
a hypothesis fuzz showing that whatever istiod sends either converts or is rejected with a
`ConversionError` (a NACK), never an exception of another kind."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel import demo
from ztunnel.authz import Authorizer
from ztunnel.lab import runner
from ztunnel.lab.istiod import resources_of
from ztunnel.lab.topology import plan
from ztunnel.localconfig import parse_documents
from ztunnel.model import Service, Workload
from ztunnel.state import MeshState
from ztunnel.xds import convert
from ztunnel.xds.gen.istio.security import authorization_pb2 as apb
from ztunnel.xds.gen.istio.workload import workload_pb2 as wpb

pytestmark = pytest.mark.unit

ISTIO_POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/frontend/sa/web"], ipBlocks: ["10.0.0.0/8"]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""


def round_trip(state: MeshState) -> MeshState:
    res = resources_of(state)
    items = [convert.address_from_any(a) for a in res[convert.ADDRESS_TYPE].values()]
    return MeshState.build(
        [i for i in items if isinstance(i, Workload)],
        [i for i in items if isinstance(i, Service)],
        [convert.policy_from_any(p) for p in res[convert.AUTHORIZATION_TYPE].values()],
    )


def comparable(state: MeshState) -> tuple[object, ...]:
    from dataclasses import replace

    return (
        sorted((replace(w, labels={}) for w in state.workloads), key=lambda w: w.uid),
        sorted(state.services, key=lambda s: s.key),
        sorted((replace(p, selectors=()) for p in state.policies), key=lambda p: p.key),
    )


@pytest.mark.parametrize("source", ["demo", "lab", "istio-resources"])
def test_mesh_files_round_trip_through_the_wire_format(source: str) -> None:
    import yaml

    if source == "demo":
        docs = [demo.mesh_config("127.9.9")]
    elif source == "lab":
        docs = [runner.mesh_state(plan("zt000000", 2, 3))]
    else:
        docs = [demo.mesh_config("127.9.9", with_policy=False), *yaml.safe_load_all(ISTIO_POLICIES)]
    state = parse_documents(docs, source)
    assert state.workloads and (source != "istio-resources" or state.policies)
    assert comparable(round_trip(state)) == comparable(state)


def addr(**kw: object) -> any_pb2.Any:
    w = wpb.Workload(uid="u1", name="p", namespace="ns", addresses=[bytes([10, 0, 0, 1])])
    for k, v in kw.items():
        if k == "waypoint":
            w.waypoint.CopyFrom(v)  # type: ignore[arg-type]
        elif k == "services":
            for key, ports in v.items():  # type: ignore[attr-defined]
                w.services[key].ports.extend(ports)
        elif k == "addresses":
            del w.addresses[:]
            w.addresses.extend(v)  # type: ignore[call-overload]
        else:
            setattr(w, k, v)
    return convert.to_any(wpb.Address(workload=w), convert.ADDRESS_TYPE)


def test_workload_defaults_as_ztunnel() -> None:
    wl = convert.address_from_any(addr())
    assert isinstance(wl, Workload)
    assert wl.trust_domain == "cluster.local" and wl.service_account == "default"
    assert wl.cluster_id == "Kubernetes" and wl.workload_type == "deployment"
    assert wl.protocol.value == "TCP"  # tunnel_protocol NONE
    assert wl.addresses == (ipaddress.ip_address("10.0.0.1"),)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"addresses": [b"\x01\x02\x03"]},
            "workload.addresses[0]: an address must be 4 or 16 bytes",
        ),
        ({"addresses": []}, "workload without addresses"),
        ({"tunnel_protocol": 2}, "LEGACY_ISTIO_MTLS"),
        ({"tunnel_protocol": 9}, "tunnel_protocol: unsupported value 9"),
        ({"status": 7}, "status: unsupported value 7"),
        ({"namespace": ""}, "identity: invalid namespace"),
        ({"waypoint": wpb.GatewayAddress(hbone_mtls_port=15008)}, "needs a hostname or an address"),
        (
            {
                "waypoint": wpb.GatewayAddress(
                    hbone_mtls_port=70000,
                    hostname=wpb.NamespacedHostname(namespace="a", hostname="b"),
                )
            },
            "port out of range: 70000",
        ),
        ({"services": {"no-slash": []}}, "key must be 'namespace/hostname'"),
        (
            {"services": {"ns/h": [wpb.Port(service_port=0, target_port=1)]}},
            "service_port: port out of range",
        ),
    ],
)
def test_bad_workloads_name_the_field(kw: dict[str, object], message: str) -> None:
    with pytest.raises(convert.ConversionError) as e:
        convert.address_from_any(addr(**kw))
    assert message in str(e.value)


def test_services_policies_and_wrappers_reject_what_they_cannot_use() -> None:
    svc = wpb.Service(name="s", namespace="ns", hostname="s.ns")
    svc.addresses.add(address=bytes(4), length=24)
    with pytest.raises(convert.ConversionError, match="CIDR service addresses"):
        convert.address_from_any(convert.to_any(wpb.Address(service=svc), convert.ADDRESS_TYPE))
    svc = wpb.Service(name="s", namespace="ns", hostname="s.ns", subject_alt_names=["x"])
    with pytest.raises(convert.ConversionError, match="subject_alt_names"):
        convert.service_from_proto(svc)
    pol = apb.Authorization(name="p", namespace="ns", action=5)
    with pytest.raises(convert.ConversionError, match="action: unsupported value 5"):
        convert.policy_from_proto(pol)
    pol = apb.Authorization(name="p", namespace="ns")
    pol.rules.add().clauses.add().matches.add().source_ips.add(address=bytes(4), length=33)
    with pytest.raises(convert.ConversionError, match=r"source_ips\[0\].length: 33"):
        convert.policy_from_proto(pol)
    with pytest.raises(convert.ConversionError, match=r"expected 'type\.googleapis\.com/istio"):
        convert.address_from_any(any_pb2.Any(type_url="type.googleapis.com/x.Y"))
    with pytest.raises(convert.ConversionError, match="cannot decode"):
        convert.policy_from_any(any_pb2.Any(type_url=convert.AUTHORIZATION_TYPE, value=b"\x0a\xff"))
    with pytest.raises(convert.ConversionError, match="neither a workload nor a service"):
        convert.address_from_any(convert.to_any(wpb.Address(), convert.ADDRESS_TYPE))


def test_string_match_without_kind_is_skipped_and_presence_kept() -> None:
    pol = apb.Authorization(name="p", namespace="ns", action=apb.DENY)
    m = pol.rules.add().clauses.add().matches.add()
    m.not_principals.add().presence.SetInParent()
    m.principals.add()  # nothing set: skipped, as istio/ztunnel does
    p = convert.policy_from_proto(pol)
    match = p.rules[0][0][0]
    assert [str(s) for s in match.not_principals] == ["*"] and match.principals == ()


# ---- fuzz ---------------------------------------------------------------------------------

_bytes_addr = st.one_of(
    st.binary(max_size=17), st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)
)
_text = st.text(max_size=12)
_port = st.integers(min_value=0, max_value=2**32 - 1)
_enum = st.integers(min_value=0, max_value=5)


@st.composite
def workloads(draw: st.DrawFn) -> wpb.Address:
    w = wpb.Workload(
        uid=draw(_text),
        name=draw(_text),
        namespace=draw(st.one_of(_text, st.just("shop"))),
        addresses=draw(st.lists(_bytes_addr, max_size=3)),
        service_account=draw(_text),
        trust_domain=draw(st.one_of(_text, st.just(""))),
        tunnel_protocol=draw(_enum),
        status=draw(_enum),
        workload_type=draw(_enum),
        node=draw(_text),
    )
    for key in draw(st.lists(st.one_of(_text, st.just("ns/h")), max_size=2)):
        w.services[key].ports.add(service_port=draw(_port), target_port=draw(_port))
    if draw(st.booleans()):
        gw = w.waypoint
        gw.hbone_mtls_port = draw(_port)
        if draw(st.booleans()):
            gw.address.address = draw(_bytes_addr)
        elif draw(st.booleans()):
            gw.hostname.namespace = draw(_text)
            gw.hostname.hostname = draw(_text)
    return wpb.Address(workload=w)


@st.composite
def services(draw: st.DrawFn) -> wpb.Address:
    s = wpb.Service(name=draw(_text), namespace=draw(_text), hostname=draw(_text))
    for _ in range(draw(st.integers(0, 2))):
        a = s.addresses.add(address=draw(_bytes_addr))
        if draw(st.booleans()):
            a.length = draw(st.integers(0, 200))
    for _ in range(draw(st.integers(0, 2))):
        s.ports.add(service_port=draw(_port), target_port=draw(_port), app_protocol=draw(_enum))
    s.subject_alt_names.extend(
        draw(st.lists(st.one_of(_text, st.just("spiffe://td/ns/a/sa/b")), max_size=2))
    )
    return wpb.Address(service=s)


@st.composite
def policies(draw: st.DrawFn) -> apb.Authorization:
    p = apb.Authorization(
        name=draw(_text),
        namespace=draw(_text),
        scope=draw(_enum),
        action=draw(_enum),
        dry_run=draw(st.booleans()),
    )
    for _ in range(draw(st.integers(0, 2))):
        clause = p.rules.add().clauses.add()
        for _ in range(draw(st.integers(0, 2))):
            m = clause.matches.add()
            m.destination_ports.extend(draw(st.lists(_port, max_size=2)))
            for _ in range(draw(st.integers(0, 2))):
                m.source_ips.add(address=draw(_bytes_addr), length=draw(st.integers(0, 200)))
            sm = m.principals.add()
            kind = draw(st.sampled_from(["exact", "prefix", "suffix", "presence", None]))
            if kind == "presence":
                sm.presence.SetInParent()
            elif kind:
                setattr(sm, kind, draw(_text))
            m.service_accounts.add(namespace=draw(_text), serviceAccount=draw(_text))
    return p


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(workloads(), services()), st.binary(max_size=64), st.booleans())
def test_fuzz_addresses_convert_or_nack(msg: wpb.Address, noise: bytes, corrupt: bool) -> None:
    raw = msg.SerializeToString() + (noise if corrupt else b"")
    try:
        item = convert.address_from_any(any_pb2.Any(type_url=convert.ADDRESS_TYPE, value=raw))
    except convert.ConversionError:
        return
    # What converts is usable: indexing and the identity work.
    if isinstance(item, Workload):
        MeshState.build([item])
        assert item.identity.uri.startswith("spiffe://")
    else:
        MeshState.build([], [item])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(policies(), st.binary(max_size=64), st.booleans())
def test_fuzz_policies_convert_or_nack(msg: apb.Authorization, noise: bytes, corrupt: bool) -> None:
    raw = msg.SerializeToString() + (noise if corrupt else b"")
    try:
        pol = convert.policy_from_any(any_pb2.Any(type_url=convert.AUTHORIZATION_TYPE, value=raw))
    except convert.ConversionError:
        return
    Authorizer([pol])  # compiles in the engine
