"""The `ztunnel` command: `run` (the node agent), `ca` (the built-in CA), `demo` (two agents
on loopback), `ctl` (inspect a running agent), `lab` (the namespace lab), `bench` (the
benchmark suite), `analyze` (configuration analysis, istioctl's exit codes). Exit codes: 0 ok,
1 runtime failure, 2 bad configuration or usage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ztunnel import config, ctl, logs
from ztunnel.ca import CertificateAuthority, write_workload_files
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.identity import DEFAULT_TRUST_DOMAIN, SpiffeId


def _run(args: argparse.Namespace) -> int:
    try:
        settings = config.settings_from(args)
    except ConfigError as e:
        print(f"ztunnel: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format, settings.log_level)
    from ztunnel.app import Agent

    async def main() -> int:
        if settings.workers != 1:  # worker processes (ztunnel.workers), unless one it is
            from ztunnel.workers.supervisor import run_workers

            rc = await run_workers(settings)
            if rc is not None:
                return rc
        agent = Agent(settings)
        agent.load_state()
        await agent.start()
        await agent.run_until_signalled()
        return 0

    try:
        return run_loop(main, settings.event_loop)
    except ConfigError as e:
        print(f"ztunnel: configuration error: {e}", file=sys.stderr)
        return 2
    except ZtunnelError as e:
        print(f"ztunnel: {e}", file=sys.stderr)
        return 1


def run_loop(main: Callable[[], Coroutine[Any, Any, int]], kind: str = "uvloop") -> int:
    """Run `main()` on uvloop when asked for and installed, else on asyncio's own loop."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger("ztunnel").warning("uvloop is not installed; using asyncio")
        else:
            return int(uvloop.run(main()))
    return int(asyncio.run(main()))


def _ca_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.create(args.trust_domain)
    ca.save(args.dir)
    print(
        f"wrote a CA for trust domain {args.trust_domain} to {args.dir} "
        "(ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)"
    )
    return 0


def _ca_issue(args: argparse.Namespace) -> int:
    try:
        ident = SpiffeId.parse(args.identity)
        ca = CertificateAuthority.load(args.dir)
        if ident.trust_domain != ca.trust_domain:
            raise ZtunnelError(
                f"identity {ident} is outside the CA's trust domain {ca.trust_domain}"
            )
        cert = ca.issue(ident)
    except ZtunnelError as e:
        print(f"ztunnel ca issue: {e}", file=sys.stderr)
        return 2
    write_workload_files(cert, args.out)
    print(
        f"wrote cert-chain.pem, key.pem, root-cert.pem for {ident} to {args.out} "
        f"(valid until {cert.not_after.isoformat()})"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ztunnel.demo import run_demo

    return run_demo(verbose=args.verbose)


def _lab(args: argparse.Namespace) -> int:
    from ztunnel.lab import demo, runner, topology
    from ztunnel.lab.image import ImageOptions
    from ztunnel.lab.topology import LabError

    try:
        image = ImageOptions(args.image) if getattr(args, "image", None) else None
        if args.lab_command == "up":
            t = runner.up(
                args.nodes,
                args.pods,
                lambda m: print(f"  .. {m}", flush=True),
                istiod=args.istiod,
                image=image,
            )
            print(
                f"lab {t.lab_id} is up; `ztunnel lab status` shows it, `ztunnel lab down` "
                "removes it"
            )
            return 0
        if args.lab_command == "demo":
            rc = 0
            if args.mode in ("all", "k8s"):  # the Kubernetes story (ztunnel.lab.k8sdemo)
                from ztunnel.lab import k8sdemo

                rc |= k8sdemo.main(args.nodes, args.pods, args.cni, image)
            if args.mode in ("all", "static"):
                rc |= demo.main(args.nodes, args.pods, args.keep, args.istiod, image)
            return rc
        if args.lab_command == "machine":
            from ztunnel.lab import machine_cli

            return machine_cli.main(args)
        if args.lab_command == "status":
            return runner.print_status()
        if args.lab_command == "down":
            removed = runner.down(args.lab)
            print("removed: " + (", ".join(removed) if removed else "nothing"))
            left = [n for n in topology.list_netns() if topology.LAB_NETNS_RE.match(n)]
            return 1 if left and args.lab is None else 0
    except (LabError, ZtunnelError) as e:
        print(f"ztunnel lab: {e}", file=sys.stderr)
        return 1
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztunnel",
        description="Sidecar-less service-mesh node agent (Istio ambient compatible).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the node agent",
        description="Run the node agent. Every setting is a flag or an environment variable "
        "(flags win).",
    )
    config.add_arguments(run)
    run.set_defaults(func=_run)

    ca = sub.add_parser("ca", help="the built-in certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create a CA in Istio's cacerts layout")
    init.add_argument("--dir", required=True, help="directory to write the CA files to")
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    init.set_defaults(func=_ca_init)
    issue = ca_sub.add_parser("issue", help="issue a workload certificate")
    issue.add_argument("--dir", required=True, help="the CA directory (from ca init)")
    issue.add_argument("--identity", required=True, help="spiffe://TD/ns/N/sa/S")
    issue.add_argument(
        "--out", required=True, help="directory for cert-chain.pem, key.pem, root-cert.pem"
    )
    issue.set_defaults(func=_ca_issue)

    demo = sub.add_parser("demo", help="two agents on loopback, real traffic, a summary")
    demo.add_argument("-v", "--verbose", action="store_true", help="show the agents' logs")
    demo.set_defaults(func=_demo)

    ctl.add_parser(sub)
    # `ztunnel analyze`: istioctl-style analysis (ztunnel.analyze), its own parser and exit codes.
    from ztunnel.analyze import command as analyze_command

    analyze_command.add_parser(sub)
    lab = sub.add_parser("lab", help="the network-namespace lab (root): nodes, pods, eBPF")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    for name, text in (
        ("up", "build a lab and start its agents"),
        ("demo", "build a lab, send every kind of flow, summarise, tear down"),
    ):
        p = lab_sub.add_parser(name, help=text)
        p.add_argument("--nodes", type=int, default=2)
        p.add_argument("--pods", type=int, default=3, help="pods per node")
        p.add_argument(
            "--image",
            default=None,
            help="run the node agents from this OCI image with podman (scripts/build-image.sh)",
        )
        if name == "demo":
            p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
            p.add_argument(
                "--mode",
                choices=["all", "k8s", "static"],
                default="all",
                help="k8s: the Kubernetes story (API server stand-in, CNI, enrolment by label); "
                "static: the lab with the mesh file and the waypoint; all: both (default)",
            )
            p.add_argument(
                "--cni", choices=["ptp", "bridge"], default="ptp", help="primary CNI (k8s mode)"
            )
        p.add_argument(
            "--istiod",
            action="store_true",
            help="agents take mesh state and certificates from a test istiod (delta xDS + CA) "
            "running in the lab network, instead of the file",
        )
    lab_sub.add_parser("status", help="labs, agents, enrolled pods, connections")
    from ztunnel.lab import machine_cli

    machine_cli.add_parser(lab_sub)
    down = lab_sub.add_parser("down", help="remove labs (all, also leftovers of killed runs)")
    down.add_argument("--lab", default=None, help="only this lab id")
    lab.set_defaults(func=_lab)
    # `ztunnel bench`: the benchmark suite lives in the source tree (the top-level `bench`
    # package, not shipped in the agent's wheel); its module registers the command.
    _add_bench_parser(sub)
    # `ztunnel waypoint run`: the L7 proxy (waypoint package), registered by its own module.
    from waypoint import cli as waypoint_cli

    waypoint_cli.add_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    """Register `ztunnel bench` from the checkout's `bench` package (stdlib-only at import; the
    suite itself is imported when the command runs), or a stub that says where it lives."""
    # Run from a checkout (editable install, `ztunnel` console script anywhere): the checkout's
    # root holds `bench/`; appended, so it shadows nothing.
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "bench" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    try:
        from bench import command as bench_command
    except ModuleNotFoundError as e:
        if e.name != "bench":
            raise

        def _missing(_args: argparse.Namespace) -> int:
            print(
                "ztunnel bench: the benchmark suite is part of the source checkout (bench/), "
                "not of the installed agent; run `sudo bench/run.sh` in the checkout",
                file=sys.stderr,
            )
            return 2

        p = sub.add_parser("bench", help="benchmarks (source checkout only: bench/run.sh)")
        p.set_defaults(func=_missing)
        return
    bench_command.add_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["analyze"]:
        from ztunnel.analyze.command import main as analyze_main

        return analyze_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
