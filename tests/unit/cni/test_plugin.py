"""The CNI plugin's parsing and error format (pure; no sockets): CNI spec 1.1 sections
"Parameters", "Network configuration", "Success" (prevResult) and "Error"."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from cni import plugin
from cni.plugin import CniError, attachment, parse_config, parse_env

pytestmark = pytest.mark.unit

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c0ffee",
    "CNI_NETNS": "/run/netns/p",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p",
    "CNI_PATH": "/opt/cni/bin",
}
PTP_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"},
        {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/run/netns/p"},
    ],
    "ips": [{"interface": 1, "address": "10.77.1.5/24", "gateway": "10.77.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
BRIDGE_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"},
        {"name": "veth99", "mac": "bb:bb:bb:bb:bb:bb"},
        {"name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/run/netns/p"},
    ],
    "ips": [{"interface": 2, "address": "10.77.1.6/24"}, {"interface": 2, "address": "fd00::6/64"}],
}
V031_RESULT = {
    "cniVersion": "0.3.1",
    "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/proc/1/ns/net"}],
    "ips": [{"version": "4", "interface": 1, "address": "10.77.1.7/24"}],
}


def conf(**extra: Any) -> bytes:
    return json.dumps(
        {"cniVersion": "1.1.0", "name": "pods", "type": "ztunnel-cni", **extra}
    ).encode()


def run(env: dict[str, str], stdin: bytes) -> tuple[int, Any]:
    out = io.StringIO()
    rc = plugin.main(env, io.BytesIO(stdin), out)
    text = out.getvalue()
    return rc, json.loads(text) if text.strip() else None


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
        ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
        ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "a b"}, "CNI_CONTAINERID"),
        ({"CNI_IFNAME": "x" * 16}, "CNI_IFNAME"),
        ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
        ({"CNI_NETNS": ""}, "CNI_NETNS"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS"),
        ({"CNI_ARGS": "=x"}, "CNI_ARGS"),
    ],
)
def test_bad_environment_is_error_4_naming_the_variable(change: dict[str, str], text: str) -> None:
    with pytest.raises(CniError) as e:
        parse_env({**ENV, **change})
    assert e.value.code == plugin.E_INVALID_ENV and text in e.value.msg
    rc, out = run({**ENV, **change}, conf(prevResult=PTP_RESULT))
    assert rc == 1 and out["code"] == 4 and text in out["msg"] and out["cniVersion"] == "1.1.0"


def test_del_does_not_need_a_netns() -> None:
    assert parse_env({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""


@pytest.mark.parametrize(
    ("raw", "code", "text"),
    [
        (b"not json", 6, "not JSON"),
        (b"\xff\xfe", 6, "not JSON"),
        (b"[]", 6, "JSON object"),
        (b"{}", 7, "cniVersion"),
        (json.dumps({"cniVersion": "9.9.9"}).encode(), 1, "9.9.9"),
        (json.dumps({"cniVersion": "0.2.0"}).encode(), 1, "not supported"),
        (conf(kubeconfig=""), 7, "kubeconfig"),
        (conf(enrol_timeout_seconds=-1), 7, "enrol_timeout_seconds"),
        (conf(enrol_timeout_seconds=True), 7, "enrol_timeout_seconds"),
        (conf(exclude_namespaces="kube-system"), 7, "exclude_namespaces"),
        (conf(prevResult=[1]), 7, "prevResult"),
    ],
)
def test_bad_config_gets_the_specs_error(raw: bytes, code: int, text: str) -> None:
    with pytest.raises(CniError) as e:
        parse_config(raw, "ADD")
    assert e.value.code == code and text in e.value.msg


def test_check_needs_040_and_status_gc_need_110() -> None:
    with pytest.raises(CniError, match="CHECK"):
        parse_config(json.dumps({"cniVersion": "0.3.1"}).encode(), "CHECK")
    with pytest.raises(CniError, match="GC"):
        parse_config(json.dumps({"cniVersion": "1.0.0"}).encode(), "GC")


def test_add_without_prev_result_is_refused_with_a_hint() -> None:
    rc, out = run(ENV, conf())
    assert rc == 1 and out["code"] == 7 and "chained" in out["msg"] and "prevResult" in out["msg"]


def test_oversized_stdin_is_refused() -> None:
    rc, out = run(ENV, b" " * (plugin.MAX_STDIN + 10))
    assert rc == 1 and out["code"] == 6


@pytest.mark.parametrize(
    ("result", "host", "ips"),
    [
        (PTP_RESULT, "veth1234", ("10.77.1.5",)),
        (
            BRIDGE_RESULT,
            "",
            ("10.77.1.6", "fd00::6"),
        ),  # two host-side interfaces: resolved by the agent
        (V031_RESULT, "veth1", ("10.77.1.7",)),
        ({"ips": [{"address": "10.0.0.9/32"}]}, "", ("10.0.0.9",)),
    ],
)
def test_attachment_from_prev_result(
    result: dict[str, Any], host: str, ips: tuple[str, ...]
) -> None:
    a = attachment(result, "eth0")
    assert a.host_ifname == host and a.ips == ips and a.pod_ifname == "eth0"


@pytest.mark.parametrize(
    ("result", "text"),
    [
        ({"interfaces": {}, "ips": []}, "lists"),
        ({"interfaces": [{"mac": "x"}], "ips": []}, "interfaces[0]"),
        ({"ips": [{"address": 5}]}, "ips[0]"),
        ({"ips": [{"address": "banana/24"}]}, "ips[0]"),
        ({"ips": []}, "no IP address"),
    ],
)
def test_bad_prev_result_names_the_field(result: dict[str, Any], text: str) -> None:
    with pytest.raises(CniError, match=text.replace("[", r"\[").replace("]", r"\]")):
        attachment(result, "eth0")


def test_version_lists_what_is_supported() -> None:
    rc, out = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": "0.4.0"}).encode())
    assert rc == 0 and out == {
        "cniVersion": "0.4.0",
        "supportedVersions": list(plugin.SUPPORTED_VERSIONS),
    }
    rc, out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and out["cniVersion"] == "1.1.0"


def test_status_is_always_ready_so_that_other_pods_are_never_blocked(tmp_path: Any) -> None:
    rc, out = run({"CNI_COMMAND": "STATUS"}, conf(enrolment_socket=str(tmp_path / "none.sock")))
    assert rc == 0 and out is None


def test_gc_forgets_records_of_attachments_the_runtime_no_longer_has(tmp_path: Any) -> None:
    for name in ("keep-eth0.json", "stale-eth0.json"):
        (tmp_path / name).write_text("{}")
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    rc, _ = run(
        {"CNI_COMMAND": "GC"},
        conf(pod_record_dir=str(tmp_path), **{"cni.dev/valid-attachments": valid}),
    )
    assert rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["keep-eth0.json"]


def test_pods_that_are_not_kubernetes_pods_pass_through_untouched(tmp_path: Any) -> None:
    env = {**ENV, "CNI_ARGS": "IgnoreUnknown=1"}
    rc, out = run(
        env,
        conf(
            prevResult=PTP_RESULT,
            pod_record_dir=str(tmp_path),
            kubeconfig=str(tmp_path / "missing"),
        ),
    )
    assert rc == 0 and out == PTP_RESULT


def test_excluded_namespace_never_reads_the_api(tmp_path: Any) -> None:
    env = {**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ztunnel-abc"}
    rc, out = run(
        env,
        conf(
            prevResult=PTP_RESULT,
            pod_record_dir=str(tmp_path),
            kubeconfig=str(tmp_path / "missing"),
            enrolment_socket=str(tmp_path / "none.sock"),
        ),
    )
    assert rc == 0 and out == PTP_RESULT


@pytest.mark.parametrize(
    ("content", "text"),
    [
        (None, "does not exist"),
        ("{not json", "unusable"),
        ("apiVersion: v1\nkind: Config\n", "unusable"),
        (json.dumps({"clusters": [], "users": []}), "no cluster"),
        (
            json.dumps(
                {
                    "clusters": [{"name": "c", "cluster": {"server": "http://x"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                }
            ),
            "https",
        ),
        (
            json.dumps(
                {
                    "clusters": [{"name": "c", "cluster": {"server": "https://x"}}],
                    "users": [{"name": "u", "user": {}}],
                }
            ),
            "no token",
        ),
        (
            json.dumps(
                {
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": "https://x",
                                "certificate-authority-data": "bm90IGEgY2VydA==",
                            },
                        }
                    ],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                }
            ),
            "unusable",
        ),
    ],
)
def test_corrupt_kubeconfig_is_a_clear_config_error(
    tmp_path: Any, content: str | None, text: str
) -> None:
    kc = tmp_path / "kubeconfig"
    if content is not None:
        kc.write_text(content)
    rc, out = run(
        ENV, conf(prevResult=PTP_RESULT, kubeconfig=str(kc), pod_record_dir=str(tmp_path / "rec"))
    )
    assert (
        rc == 1
        and out["code"] == plugin.E_INVALID_CONFIG
        and text in out["msg"]
        and str(kc) in out["msg"]
    )


def test_del_with_nothing_known_and_no_agent_succeeds(tmp_path: Any) -> None:
    env = {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}
    for _ in range(2):
        rc, out = run(
            env, conf(pod_record_dir=str(tmp_path), enrolment_socket=str(tmp_path / "none.sock"))
        )
        assert rc == 0 and out is None
