"""SOCKS5 message parsing (RFC 1928), pure: greetings, requests, replies."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.proxy.socks5 import (
    ATYP_NOT_SUPPORTED,
    CMD_NOT_SUPPORTED,
    GENERAL_FAILURE,
    REFUSED,
    SUCCEEDED,
    SocksError,
    SocksRequest,
    parse_greeting,
    parse_request,
    reply,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("data", "no_auth"),
    [
        (b"\x05\x01\x00", True),
        (b"\x05\x02\x02\x00", True),
        (b"\x05\x01\x02", False),
        (b"\x05\x00", False),
    ],
)
def test_greeting(data: bytes, no_auth: bool) -> None:
    assert parse_greeting(data) is no_auth


@pytest.mark.parametrize(
    "data", [b"", b"\x05", b"\x04\x01\x00", b"\x05\x02\x00", b"\x05\x01\x00\x00"]
)
def test_malformed_greeting(data: bytes) -> None:
    with pytest.raises(SocksError) as exc:
        parse_greeting(data)
    assert exc.value.reply == GENERAL_FAILURE


def test_request_ipv4() -> None:
    assert parse_request(b"\x05\x01\x00\x01", b"\x0a\x00\x00\x01\x1f\x90") == SocksRequest(
        "10.0.0.1", 8080
    )


def test_request_ipv6() -> None:
    addr = ipaddress.IPv6Address("fd00::1")
    assert parse_request(b"\x05\x01\x00\x04", addr.packed + b"\x00\x50") == SocksRequest(
        "fd00::1", 80
    )


def test_request_domain() -> None:
    name = b"echo.shop.svc.cluster.local"
    got = parse_request(b"\x05\x01\x00\x03", bytes([len(name)]) + name + b"\x01\xbb")
    assert got == SocksRequest("echo.shop.svc.cluster.local", 443)


@pytest.mark.parametrize(
    ("head", "rest", "code"),
    [
        (b"\x05\x02\x00\x01", b"\x0a\x00\x00\x01\x00\x50", CMD_NOT_SUPPORTED),  # BIND
        (b"\x05\x03\x00\x01", b"\x0a\x00\x00\x01\x00\x50", CMD_NOT_SUPPORTED),  # UDP ASSOCIATE
        (b"\x05\x01\x00\x05", b"\x0a\x00\x00\x01\x00\x50", ATYP_NOT_SUPPORTED),
        (b"\x05\x01\x00\x01", b"\x0a\x00\x00\x01\x00", ATYP_NOT_SUPPORTED),  # short
        (b"\x05\x01\x00\x04", b"\x00" * 17, ATYP_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03", b"\x05abc\x00\x50", ATYP_NOT_SUPPORTED),  # length mismatch
        (b"\x04\x01\x00\x01", b"\x0a\x00\x00\x01\x00\x50", GENERAL_FAILURE),
    ],
)
def test_bad_request(head: bytes, rest: bytes, code: int) -> None:
    with pytest.raises(SocksError) as exc:
        parse_request(head, rest)
    assert exc.value.reply == code


@pytest.mark.parametrize("name", [b"\xff\xfe", b"a..b", b"-" * 64 + b".x", b"caf\xc3\xa9"])
def test_undecodable_domain_is_a_socks_error(name: bytes) -> None:
    """Whatever bytes the client sends as a name, the answer is a SOCKS error reply."""
    with contextlib.suppress(SocksError):
        parse_request(b"\x05\x01\x00\x03", bytes([len(name)]) + name + b"\x00\x50")


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_parse_request_only_raises_socks_errors(head: bytes, rest: bytes) -> None:
    try:
        req = parse_request(head, rest)
    except SocksError:
        return
    assert 0 <= req.port <= 65535


def test_reply_encoding() -> None:
    assert reply(SUCCEEDED, (ipaddress.IPv4Address("10.1.2.3"), 8080)) == (
        b"\x05\x00\x00\x01\x0a\x01\x02\x03\x1f\x90"
    )
    v6 = ipaddress.IPv6Address("fd00::1")
    assert reply(REFUSED, (v6, 1)) == b"\x05\x05\x00\x04" + v6.packed + b"\x00\x01"
    assert reply(GENERAL_FAILURE) == b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
