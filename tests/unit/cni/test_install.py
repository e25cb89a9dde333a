"""The installer: textual chain edits that keep every other byte, the host Python check, and
the watch loop (re-insert after the primary CNI rewrites its file, token refresh, exit)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from cni import install
from cni.install import Installer, InstallError, InstallSettings

pytestmark = pytest.mark.unit

CONFLIST = """{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "calico",   "log_level" : "info",
      "ipam": {"type": "calico-ipam"}, "weird": [1,  2,3]
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
"""
CONF = '{"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0",\n "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}}\n'
ENTRY = {"type": "ztunnel-cni", "kubeconfig": "/etc/cni/net.d/ztunnel-cni-kubeconfig"}


def test_insert_keeps_every_byte_of_the_other_plugins_and_is_idempotent() -> None:
    once = install.insert_entry(CONFLIST, ENTRY)
    last = CONFLIST.index('{"type": "portmap"')
    end = CONFLIST.index("}}", last) + 2
    assert once.startswith(CONFLIST[:end]) and once.endswith(CONFLIST[end:])
    plugins = json.loads(once)["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "portmap", "ztunnel-cni"]
    assert install.insert_entry(once, ENTRY) == once
    assert install.remove_entry(once) == CONFLIST


def test_insert_replaces_an_older_entry_of_ours() -> None:
    once = install.insert_entry(CONFLIST, {**ENTRY, "kubeconfig": "/old"})
    again = install.insert_entry(once, ENTRY)
    assert [p.get("kubeconfig") for p in json.loads(again)["plugins"]][-1] == ENTRY["kubeconfig"]
    assert sum(p["type"] == "ztunnel-cni" for p in json.loads(again)["plugins"]) == 1


def test_entry_in_the_middle_is_removed_and_ours_goes_last() -> None:
    text = '{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"},{"type":"ztunnel-cni"},{"type":"b"}]}'
    assert (
        install.remove_entry(text)
        == '{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"},{"type":"b"}]}'
    )
    assert [p["type"] for p in json.loads(install.insert_entry(text, ENTRY))["plugins"]] == [
        "a",
        "b",
        "ztunnel-cni",
    ]
    empty = '{"cniVersion":"1.0.0","name":"n","plugins":[ ]}'
    assert json.loads(install.insert_entry(empty, ENTRY))["plugins"] == [ENTRY]


def test_conf_becomes_a_conflist_with_the_plugin_text_unchanged() -> None:
    text = install.conf_to_conflist(CONF)
    assert CONF.strip() in text
    obj = json.loads(text)
    assert (
        obj["cniVersion"] == "0.4.0"
        and obj["name"] == "bridge-net"
        and obj["plugins"][0]["bridge"] == "cni0"
    )


@pytest.mark.parametrize("bad", ["{", '{"plugins": 3}', "[]", '{"name": "x"}'])
def test_malformed_conflists_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        install.insert_entry(bad, ENTRY)


def test_primary_is_the_first_config_by_name(tmp_path: Path) -> None:
    assert install.primary_config(tmp_path / "missing") is None
    for n in ("20-b.conflist", "10-a.conf", ".hidden.conf", "README", "05-kubeconfig"):
        (tmp_path / n).write_text("{}")
    assert install.primary_config(tmp_path) == tmp_path / "10-a.conf"


def _fake_host(root: Path, target: str) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin" / target).write_text("")
    os.symlink(target, root / "usr/bin/python3")


def test_host_python_found_through_its_symlink(tmp_path: Path) -> None:
    _fake_host(tmp_path, "python3.11")
    assert install.find_host_python(tmp_path) == ("/usr/bin/python3", (3, 11))


@pytest.mark.parametrize("target", ["python3.8", None])
def test_missing_or_old_host_python_is_a_clear_error(tmp_path: Path, target: str | None) -> None:
    if target:
        _fake_host(tmp_path, target)
    with pytest.raises(InstallError, match=r"python3 >= 3.9"):
        install.find_host_python(tmp_path)


def settings(tmp_path: Path) -> InstallSettings:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("token-1")
    (sa / "ca.crt").write_bytes(b"-----CA-----\n")
    (tmp_path / "net.d").mkdir()
    return InstallSettings(
        cni_bin_dir=tmp_path / "bin",
        cni_conf_dir=tmp_path / "net.d",
        host_root=tmp_path,
        kubeconfig_host_path="/etc/cni/net.d/ztunnel-cni-kubeconfig",
        api_server="https://10.0.0.1:6443",
        token_file=sa / "token",
        ca_file=sa / "ca.crt",
        poll_interval=0.02,
        host_python="/usr/bin/python3",
    )


def _wait(pred: object, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("deleted", [False, True])
def test_installer_keeps_itself_chained_and_leaves_only_when_the_daemonset_goes(
    tmp_path: Path, deleted: bool
) -> None:
    s = settings(tmp_path)
    primary = s.cni_conf_dir / "10-calico.conflist"
    primary.write_text(CONFLIST)
    inst = Installer(s, lambda: deleted)
    stop = threading.Event()
    t = threading.Thread(target=inst.run, args=(stop,))
    t.start()
    try:
        assert _wait(lambda: "ztunnel-cni" in primary.read_text())
        plugin_bin = s.cni_bin_dir / "ztunnel-cni"
        assert plugin_bin.read_bytes().startswith(b"#!/usr/bin/python3 -IS\n") and os.access(
            plugin_bin, os.X_OK
        )
        kc = json.loads((s.cni_conf_dir / "ztunnel-cni-kubeconfig").read_text())
        assert kc["users"][0]["user"]["token"] == "token-1"
        # The primary CNI rewrites its file: we come back, its bytes kept.
        primary.write_text(CONFLIST)
        assert _wait(lambda: "ztunnel-cni" in primary.read_text())
        assert install.remove_entry(primary.read_text()) == CONFLIST
        # The projected token rotates: the kubeconfig follows.
        s.token_file.write_text("token-2")
        os.utime(s.token_file, (1, 1))
        assert _wait(lambda: "token-2" in (s.cni_conf_dir / "ztunnel-cni-kubeconfig").read_text())
    finally:
        stop.set()
        t.join(5)
    assert ("ztunnel-cni" in primary.read_text()) is not deleted
    assert (s.cni_bin_dir / "ztunnel-cni").exists() is not deleted


def test_installer_converts_a_conf_and_restarting_changes_nothing(tmp_path: Path) -> None:
    s = settings(tmp_path)
    (s.cni_conf_dir / "10-bridge.conf").write_text(CONF)
    inst = Installer(s)
    first = inst.ensure_chain()
    assert (
        first == s.cni_conf_dir / "10-bridge.conflist"
        and not (s.cni_conf_dir / "10-bridge.conf").exists()
    )
    before = first.read_text()
    assert Installer(s).ensure_chain() == first and first.read_text() == before
