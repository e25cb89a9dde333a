"""Access-log fields and their text and JSON renderings."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
from collections.abc import Iterator

import pytest

from ztunnel.logs import JsonFormatter, TextFormatter
from ztunnel.model import Service, Workload
from ztunnel.proxy.records import ConnectionRecord, ConnectionTracker
from ztunnel.telemetry import AccessLog, access_fields

pytestmark = pytest.mark.unit

CLIENT = Workload("uid-c", "client-1", "frontend", (ipaddress.ip_address("10.0.0.1"),), "web")
SERVER = Workload("uid-s", "echo-1", "shop", (ipaddress.ip_address("10.0.0.2"),), "echo")
SVC = Service("echo", "shop", "echo.shop.svc.cluster.local")


def outbound() -> ConnectionRecord:
    return ConnectionRecord(
        "outbound",
        ("10.0.0.1", 40000),
        ("10.96.0.10", 80),
        src_workload=CLIENT,
        src_identity=CLIENT.identity,
        dst_workload=SERVER,
        dst_identity=SERVER.identity,
        dst_service=SVC,
        hbone_target="10.0.0.2:15008",
        path="hbone",
        mtls=True,
        bytes_sent=11,
        bytes_recv=22,
    )


def inbound() -> ConnectionRecord:
    return ConnectionRecord(
        "inbound",
        ("10.0.0.1", 40000),
        ("10.0.0.2", 8080),
        src_workload=CLIENT,
        src_identity=CLIENT.identity,
        dst_workload=SERVER,
        dst_identity=SERVER.identity,
        path="hbone",
        mtls=True,
        bytes_sent=11,
        bytes_recv=22,
    )


def test_outbound_fields() -> None:
    f = access_fields(outbound())
    duration = f.pop("duration")
    assert isinstance(duration, str) and duration.endswith("ms")
    assert f == {
        "src.addr": "10.0.0.1:40000",
        "src.workload": "client-1",
        "src.namespace": "frontend",
        "src.identity": "spiffe://cluster.local/ns/frontend/sa/web",
        "dst.addr": "10.0.0.2:15008",
        "dst.hbone_addr": "10.96.0.10:80",
        "dst.service": "echo.shop.svc.cluster.local",
        "dst.workload": "echo-1",
        "dst.namespace": "shop",
        "dst.identity": "spiffe://cluster.local/ns/shop/sa/echo",
        "direction": "outbound",
        "bytes_sent": 11,
        "bytes_recv": 22,
    }


def test_inbound_bytes_are_from_the_agents_side_of_the_mesh_hop() -> None:
    f = access_fields(inbound())
    # The inbound agent sends the response back (22) and receives the request (11).
    assert (f["bytes_sent"], f["bytes_recv"]) == (22, 11)
    assert f["dst.addr"] == f["dst.hbone_addr"] == "10.0.0.2:8080"
    assert f["direction"] == "inbound"


def test_plaintext_has_no_identities_and_no_hbone_addr() -> None:
    rec = ConnectionRecord(
        "inbound",
        ("192.0.2.1", 1),
        ("10.0.0.2", 8080),
        dst_workload=SERVER,
        dst_identity=SERVER.identity,
        path="plaintext",
    )
    f = access_fields(rec)
    for key in ("src.identity", "dst.identity", "dst.hbone_addr", "src.workload", "error"):
        assert key not in f


def test_ipv6_addresses_are_bracketed() -> None:
    rec = ConnectionRecord("outbound", ("fd00::1", 1234), ("fd00::2", 80))
    f = access_fields(rec)
    assert f["src.addr"] == "[fd00::1]:1234"
    assert f["dst.addr"] == "[fd00::2]:80"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    logger = logging.getLogger("test.access")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buf, handler
    logger.removeHandler(handler)


def test_json_lines_carry_each_field_as_a_key(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, buf, handler = captured
    handler.setFormatter(JsonFormatter())
    tracker = ConnectionTracker(AccessLog(logger))
    rec = outbound()
    tracker.open(rec)
    tracker.close(rec)
    opened, complete = (json.loads(line) for line in buf.getvalue().splitlines())
    assert opened["message"] == "connection opened" and opened["level"] == "debug"
    assert complete["message"] == "connection complete"
    assert complete["level"] == "info"
    assert complete["src.identity"] == "spiffe://cluster.local/ns/frontend/sa/web"
    assert complete["dst.identity"] == "spiffe://cluster.local/ns/shop/sa/echo"
    assert complete["bytes_sent"] == 11 and complete["bytes_recv"] == 22
    assert "error" not in complete


def test_failed_connection_is_one_warning_line_with_the_error(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, buf, handler = captured
    handler.setFormatter(JsonFormatter())
    tracker = ConnectionTracker(AccessLog(logger))
    rec = ConnectionRecord(
        "outbound",
        ("10.0.0.1", 1),
        ("10.0.0.2", 9),
        src_workload=CLIENT,
        error='connect to 10.0.0.2:9 failed: "refused"',
        response_flag="CONNECT",
    )
    tracker.open(rec)
    tracker.close(rec)
    (line,) = buf.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["error"] == 'connect to 10.0.0.2:9 failed: "refused"'
    assert entry["response_flags"] == "CONNECT"


def test_text_line_quotes_values_with_spaces(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, buf, handler = captured
    handler.setFormatter(TextFormatter())
    rec = inbound()
    rec.error = "connection reset"
    AccessLog(logger).closed(rec)
    line = buf.getvalue().strip()
    assert "WARNING" in line and "connection complete" in line
    assert " src.addr=10.0.0.1:40000 " in line
    assert " src.identity=spiffe://cluster.local/ns/frontend/sa/web " in line
    assert ' error="connection reset"' in line
    assert " direction=inbound " in line


def test_nothing_is_formatted_when_the_level_is_off(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, buf, _ = captured
    logger.setLevel(logging.ERROR)
    tracker = ConnectionTracker(AccessLog(logger))
    rec = outbound()
    tracker.open(rec)
    tracker.close(rec)
    assert buf.getvalue() == ""
