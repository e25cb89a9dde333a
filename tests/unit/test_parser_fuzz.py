"""Every parser that reads outside input, under bounded fuzzing: each input either parses or is
rejected with the parser's own clear error (ConfigError, SocksError, HboneError), never
another exception, in bounded time and memory. Hypothesis budgets are fixed (no deadline
drift in CI); the hand-made vectors are the known abuse shapes (alias bombs, deep nesting,
huge numbers, oversized lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_enrolment import FakeBackend
from ztunnel.enrolment import EnrolmentService, PodRequest, parse_request
from ztunnel.errors import ConfigError, HboneError
from ztunnel.hbone.headers import parse_authority, parse_baggage
from ztunnel.localconfig import load_mesh_state, parse_documents
from ztunnel.model import TunnelProtocol, Workload
from ztunnel.proxy.inbound import forwarded_client, guess_service
from ztunnel.proxy.socks5 import SocksError, SocksRequest, parse_greeting
from ztunnel.proxy.socks5 import parse_request as socks_request
from ztunnel.state import MeshState

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Structured documents cost hypothesis far more to generate than the parser to read.
FUZZ_DOCS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- YAML: the local config file ----------------------------------------------------------


def alias_bomb(levels: int, where: str) -> str:
    """A mesh file whose aliases expand 9^levels-fold, placed where the parser walks the
    value: a list it turns into strings, or a port it names in an error message."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    bomb = f"[{', '.join(items)}]"
    head = "workloads:\n- name: w\n  workloadIps: ['10.0.0.1']\n"
    if where == "authorizationPolicies":
        return head + f"  authorizationPolicies: {bomb}\n"
    return head + f"  services: {{shop/echo.shop.svc.cluster.local: {{80: {bomb}}}}}\n"


def mesh_file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "mesh.yaml"
    f.write_text(text)
    return f


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["authorizationPolicies", "port"])
def test_a_yaml_alias_bomb_is_rejected_at_once(tmp_path: Path, where: str) -> None:
    # 9^9 = 387 million nodes once expanded, from 0.4 KB written.
    f = mesh_file(tmp_path, alias_bomb(9, where))
    rss0, t0 = max_rss_mb(), time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_mesh_state(f)
    assert time.monotonic() - t0 < 2
    assert max_rss_mb() - rss0 < 50
    assert "alias bomb" in str(e.value) and str(f) in str(e.value)


def test_moderate_anchor_sharing_is_allowed() -> None:
    from ztunnel.safeyaml import load_all

    text = """
labels: &labels {app: echo, version: v1}
copies: [*labels, *labels, *labels, *labels]
"""
    [doc] = load_all(text, "f.yaml")
    assert doc["copies"][3] == {"app": "echo", "version": "v1"}


def test_a_recursive_alias_is_rejected(tmp_path: Path) -> None:
    f = mesh_file(tmp_path, "workloads: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive"):
        load_mesh_state(f)


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deep_nesting_is_rejected_with_the_line(tmp_path: Path, opener: str) -> None:
    if opener == "- ":
        text = "workloads:\n" + "".join("  " * i + "-\n" for i in range(5000))
    else:
        closer = "]" if opener == "[" else "}"
        text = "workloads: " + opener * 5000 + "1" + closer * 5000 + "\n"
    with pytest.raises(ConfigError) as e:
        load_mesh_state(mesh_file(tmp_path, text))
    assert "levels deep" in str(e.value)
    assert "line " in str(e.value)


def test_nesting_up_to_the_limit_loads() -> None:
    from ztunnel.safeyaml import MAX_DEPTH, load_all

    depth = MAX_DEPTH - 2
    [doc] = load_all("[" * depth + "1" + "]" * depth, "f.yaml")
    for _ in range(depth):
        doc = doc[0]
    assert doc == 1


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_yaml_text_loads_or_fails_clearly(text: str) -> None:
    from ztunnel.safeyaml import load_all

    try:
        load_all(text, "f.yaml")
    except ConfigError as e:
        assert e.source == "f.yaml"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.1", "fd00::1", "shop/echo.shop", "HBONE", "TCP", "Allow", "Deny"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.integers(0, 70000), children, max_size=4)
    ),
    max_leaves=12,
)
WORKLOAD_KEYS = [
    "uid",
    "name",
    "namespace",
    "serviceAccount",
    "workloadIps",
    "workloadIp",
    "protocol",
    "status",
    "node",
    "services",
    "waypoint",
    "labels",
    "authorizationPolicies",
    "trustDomain",
    "workloadType",
]
SERVICE_KEYS = ["name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint"]
POLICY_KEYS = ["name", "namespace", "scope", "action", "rules", "dryRun"]


def shaped(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))


local_docs = st.fixed_dictionaries(
    {},
    optional={
        "workloads": st.lists(shaped(WORKLOAD_KEYS) | json_values, max_size=3),
        "services": st.lists(shaped(SERVICE_KEYS) | json_values, max_size=3),
        "policies": st.lists(shaped(POLICY_KEYS) | json_values, max_size=3),
    },
)
istio_docs = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["security.istio.io/v1", "security.istio.io/v1beta1", "x"]),
        "kind": st.sampled_from(["AuthorizationPolicy", "PeerAuthentication"]),
        "metadata": json_values | shaped(["name", "namespace"]),
        "spec": json_values
        | shaped(["selector", "action", "rules", "mtls", "portLevelMtls", "provider"]),
    }
)


@FUZZ_DOCS
@given(st.lists(local_docs | istio_docs | json_values, min_size=1, max_size=3))
def test_arbitrary_mesh_documents_parse_or_fail_clearly(docs: list[Any]) -> None:
    try:
        state = parse_documents(docs, "mesh.yaml")
    except ConfigError as e:
        assert e.source == "mesh.yaml"
    else:
        assert isinstance(state, MeshState)


@FUZZ_DOCS
@given(local_docs)
def test_mesh_documents_survive_a_yaml_round_trip(doc: dict[str, Any]) -> None:
    """The same structures written as YAML text and read back through the bounded loader."""
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    from ztunnel.safeyaml import load_all

    with contextlib.suppress(ConfigError):
        parse_documents(load_all(text, "m.yaml"), "m.yaml")


# ---- the enrolment socket's JSON lines -------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000,
        b'{"op": "add_pod", "namespace": "a", "name": "b", "ifname": "x", "ips": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}",
        b'{"op": "enrol", "namespace": "a", "name": "b", "ifname": "x", "ips": [1'
        + b"0" * 5000
        + b"]}",
        b"\xff\xfe\x00",
        b'{"op": "list"}{"op": "list"}',
        b"",
    ],
    ids=["deep-array", "deep-ips", "huge-number", "not-utf8", "two-objects", "empty"],
)
def test_abusive_enrolment_lines_get_a_clear_error(line: bytes) -> None:
    with pytest.raises(ConfigError) as e:
        parse_request(line)
    assert e.value.source == "enrolment request"


async def test_the_enrolment_service_answers_an_abusive_line_and_keeps_serving(
    tmp_path: Path,
) -> None:
    sock = str(tmp_path / "z.sock")
    svc = EnrolmentService(FakeBackend(), sock, str(tmp_path / "pods.json"))
    await svc.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(b"[" * 60_000 + b"\n" + b'{"op": "list"}\n')
        first = json.loads(await asyncio.wait_for(reader.readline(), 5))
        second = json.loads(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
        assert first["ok"] is False and "not JSON" in first["error"]
        assert second == {"ok": True, "pods": {}}
    finally:
        await svc.close()


enrolment_objects = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["add_pod", "enrol", "unenrol", "remove_pod", "list", "x"])
        | json_values
    },
    optional={
        "namespace": json_values,
        "name": json_values,
        "ifname": json_values | st.text(max_size=20),
        "ips": json_values | st.lists(st.sampled_from(["10.0.0.1", "::1", "x", ""]), max_size=3),
        "enrol": json_values,
    },
)


@FUZZ
@given(enrolment_objects | json_values)
def test_arbitrary_enrolment_requests_parse_or_fail_clearly(obj: Any) -> None:
    line = json.dumps(obj).encode()
    try:
        req = parse_request(line)
    except ConfigError as e:
        assert e.source == "enrolment request"
    else:
        assert isinstance(req, PodRequest)
        if req.op in ("add_pod", "enrol"):
            assert req.ips and 1 <= len(req.ifname) <= 15


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_enrolment_bytes_parse_or_fail_clearly(line: bytes) -> None:
    with contextlib.suppress(ConfigError):
        parse_request(line)


# ---- SOCKS5 ----------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_socks5_greetings(data: bytes) -> None:
    with contextlib.suppress(SocksError):
        assert isinstance(parse_greeting(data), bool)


@FUZZ
@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_arbitrary_socks5_requests(head: bytes, rest: bytes) -> None:
    try:
        req = socks_request(head, rest)
    except SocksError as e:
        assert 1 <= e.reply <= 8
    else:
        assert isinstance(req, SocksRequest) and 0 <= req.port <= 65535


@FUZZ
@given(st.text(max_size=255))
def test_arbitrary_socks5_host_names(host: str) -> None:
    raw = host.encode("utf-8", "surrogatepass")[:255]
    with contextlib.suppress(SocksError):
        socks_request(b"\x05\x01\x00\x03", bytes([len(raw)]) + raw + b"\x00\x50")


# ---- HBONE request headers ---------------------------------------------------------------------


WL = Workload(
    uid="u",
    name="echo",
    namespace="shop",
    addresses=(ipaddress.ip_address("10.0.0.1"),),
    protocol=TunnelProtocol.HBONE,
    services={"shop/echo.shop.svc.cluster.local": {80: 8080}},
)


@FUZZ
@given(st.text(max_size=2000))
def test_arbitrary_baggage_and_forwarded_values(value: str) -> None:
    bag = parse_baggage(value)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in bag.items())
    client = forwarded_client(value)
    if client is not None:
        ipaddress.ip_address(client[0])
        assert 0 < client[1] < 65536
    guess_service(MeshState.build([WL], [], []), WL, 8080, value)


@FUZZ
@given(
    st.lists(
        st.sampled_from(["for=", "host=", "proto=", '"', "[", "]", ":", ";", ",", "=", " "])
        | st.sampled_from(["10.0.0.1", "fd00::1", "8080", "99999", "echo.shop"]),
        max_size=12,
    )
)
def test_forwarded_shaped_values(parts: list[str]) -> None:
    value = "".join(parts)
    forwarded_client(value)
    guess_service(MeshState.build([WL], [], []), WL, 8080, value)


@FUZZ
@given(st.text(max_size=100))
def test_arbitrary_authorities(value: str) -> None:
    try:
        ip, port = parse_authority(value)
    except HboneError as e:
        assert e.status == 400
    else:
        assert 0 < port < 65536 and str(ip)


def test_huge_header_values_parse_in_bounded_time() -> None:
    """The largest value an HBONE peer can send (the header-list limit) parses quickly."""
    big = ",".join(f"k{i}=v{i};p=1" for i in range(3000))[: 16 * 1024]
    t0 = time.monotonic()
    for _ in range(20):
        parse_baggage(big)
        forwarded_client(big)
        guess_service(MeshState.build([WL], [], []), WL, 8080, big)
    assert time.monotonic() - t0 < 2
