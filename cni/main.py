"""The `ztunnel-cni` command: the CNI plugin when the runtime calls it (CNI_COMMAND is set),
else `install` (the DaemonSet's installer) or `controller` (the node enrolment controller)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cni import plugin, selection


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ztunnel-cni",
        description="Ambient enrolment for Kubernetes: CNI plugin, installer, node controller.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    excluded = ",".join(selection.DEFAULT_EXCLUDED_NAMESPACES)

    inst = sub.add_parser("install", help="install the plugin on this node and keep it chained")
    inst.add_argument("--cni-bin-dir", default=os.environ.get("CNI_BIN_DIR", "/host/opt/cni/bin"))
    inst.add_argument(
        "--cni-conf-dir", default=os.environ.get("CNI_CONF_DIR", "/host/etc/cni/net.d")
    )
    inst.add_argument("--host-root", default=os.environ.get("HOST_ROOT", "/host"))
    inst.add_argument(
        "--kubeconfig-host-path",
        default="/etc/cni/net.d/ztunnel-cni-kubeconfig",
        help="where the plugin finds its kubeconfig on the host (in the conf dir)",
    )
    inst.add_argument("--host-python", default="", help="the host's python3 (default: found)")
    inst.add_argument("--api-server", default="", help="https://HOST:PORT (default: in-cluster)")
    inst.add_argument("--token-file", default="/var/run/secrets/kubernetes.io/serviceaccount/token")
    inst.add_argument("--ca-file", default="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    inst.add_argument(
        "--kubeconfig", default="", help="for the DaemonSet check on exit (default: in-cluster)"
    )
    inst.add_argument("--daemonset", default="ztunnel")
    inst.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "istio-system"))
    inst.add_argument("--poll-interval", type=float, default=1.0)
    for a in (inst,):
        a.add_argument("--enrolment-socket", default="/var/run/ztunnel/ztunnel.sock")
        a.add_argument("--pod-record-dir", default=plugin.DEFAULTS["pod_record_dir"])
        a.add_argument("--exclude-namespaces", default=excluded)

    ctl = sub.add_parser("controller", help="the node enrolment controller")
    ctl.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""))
    ctl.add_argument("--kubeconfig", default="", help="default: in-cluster service account")
    ctl.add_argument("--enrolment-socket", default="/var/run/ztunnel/ztunnel.sock")
    ctl.add_argument("--pod-record-dir", default=plugin.DEFAULTS["pod_record_dir"])
    ctl.add_argument("--exclude-namespaces", default=excluded)
    ctl.add_argument("--resync-interval", type=float, default=2.0)
    ctl.add_argument("--status-file", default="", help="write each pod's state here (JSON)")
    sub.add_parser("plugin", help="act as the CNI plugin (what the runtime runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.environ.get("CNI_COMMAND"):
        return plugin.main()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "install":
            from cni import install

            return install.main(args)
        if args.command == "controller":
            from cni import controller

            return controller.main(args)
        return plugin.main()
    except ValueError as e:
        print(f"ztunnel-cni: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
