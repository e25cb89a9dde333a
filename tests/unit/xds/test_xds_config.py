"""How istiod settings are read: addresses, durations, root certificate and token sources, the
node id and metadata, extra headers, and the env names Istio's ztunnel uses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ztunnel.config import Settings, add_arguments, settings_from
from ztunnel.errors import ConfigError
from ztunnel.xds.config import (
    CredentialError,
    Endpoint,
    RootCertSource,
    TokenSource,
    istiod_config,
    parse_duration,
    parse_endpoint,
    token_source,
)

pytestmark = pytest.mark.unit


def settings(argv: list[str], env: dict[str, str]) -> Settings:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return settings_from(p.parse_args(argv), env)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("https://istiod.istio-system.svc:15012", Endpoint("istiod.istio-system.svc", 15012)),
        ("istiod:1234", Endpoint("istiod", 1234)),
        ("istiod", Endpoint("istiod", 15012)),
        ("https://[fd00::1]:15012/", Endpoint("fd00::1", 15012)),
    ],
)
def test_endpoints(value: str, want: Endpoint) -> None:
    assert parse_endpoint(value, "xds_address") == want


@pytest.mark.parametrize("bad", ["http://istiod:15012", "istiod:0", "istiod:x", "[::1", "a/b:1"])
def test_bad_endpoints_name_the_setting(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_endpoint(bad, "xds_address")
    assert e.value.path == "xds_address"


def test_durations() -> None:
    assert parse_duration("24h", "secret_ttl") == 86400
    assert parse_duration("1h30m", "secret_ttl") == 5400
    assert parse_duration("90", "secret_ttl") == 90
    assert parse_duration("250ms", "secret_ttl") == 0.25
    for bad in ("", "1d", "h", "0s", "-5"):
        with pytest.raises(ConfigError):
            parse_duration(bad, "secret_ttl")


def test_env_names_as_ztunnel(tmp_path: Path) -> None:
    env = {
        "XDS_ADDRESS": "https://istiod.istio-system.svc:15012",
        "CA_ADDRESS": "https://istiod.istio-system.svc:15012",
        "ISTIO_META_CLUSTER_ID": "c1",
        "CLUSTER_ID": "ignored",
        "POD_NAME": "ztunnel-x",
        "POD_NAMESPACE": "istio-system",
        "INSTANCE_IP": "10.1.2.3",
        "NODE_NAME": "node-7",
        "XDS_ROOT_CA": "SYSTEM",
        "SECRET_TTL": "12h",
        "ISTIO_META_FOO": "bar",
        "ISTIO_METAJSON_LABELS": '{"app": "ztunnel"}',
        "XDS_HEADER_X_TENANT": "t1",
        "CA_HEADER_X_CA": "c",
    }
    s = settings([], env)
    assert s.cluster_id == "c1" and s.node_name == "node-7"
    cfg = istiod_config(s, env)
    assert cfg.node_id == "ztunnel~10.1.2.3~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    meta = dict(cfg.node_metadata)
    assert meta["NAME"] == "ztunnel-x" and meta["NAMESPACE"] == "istio-system"
    assert meta["INSTANCE_IPS"] == "10.1.2.3" and meta["NODE_NAME"] == "node-7"
    assert (
        meta["CLUSTER_ID"] == "c1" and meta["FOO"] == "bar" and meta["LABELS"] == {"app": "ztunnel"}
    )
    assert cfg.xds_headers == (("x_tenant", "t1"),) and cfg.ca_headers == (("x_ca", "c"),)
    assert cfg.secret_ttl == 43200
    assert cfg.xds_root.load() is None  # SYSTEM: the platform's roots


def test_mesh_and_certificate_sources_are_one_of_each() -> None:
    with pytest.raises(ConfigError, match="not both"):
        settings(["--xds-address", "istiod", "--local-xds", "m.yaml", "--ca-dir", "d"], {})
    with pytest.raises(ConfigError, match="not both"):
        settings(["--xds-address", "istiod", "--ca-address", "istiod", "--ca-dir", "d"], {})
    with pytest.raises(ConfigError, match="no certificate source"):
        settings(["--xds-address", "istiod"], {})
    with pytest.raises(ConfigError) as e:
        settings(["--xds-address", "istiod", "--ca-address", "istiod"], {"SECRET_TTL": "soon"})
    assert "SECRET_TTL" in str(e.value)
    ok = settings(["--xds-address", "istiod", "--ca-address", "istiod"], {})
    assert ok.xds_address == "istiod"


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert token_source("") == TokenSource()  # no default file: no token
    default = tmp_path / "var/run/secrets/tokens/istio-token"
    default.parent.mkdir(parents=True)
    default.write_text("jwt-1\n")
    src = token_source("")
    assert src.path == "./var/run/secrets/tokens/istio-token" and src.read() == "jwt-1"
    default.write_text("jwt-2")  # the projected token rotated
    assert src.read() == "jwt-2"
    assert token_source("literal-token").read() == "literal-token"
    default.write_text("")
    with pytest.raises(CredentialError, match="empty"):
        src.read()


def test_root_cert_sources(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="No such file"):
        RootCertSource(str(tmp_path / "missing.pem")).load()
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(CredentialError, match="no PEM certificate"):
        RootCertSource(str(tmp_path / "bad.pem")).load()
    inline = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert RootCertSource(inline).load() == inline.encode()
