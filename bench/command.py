"""`ztunnel bench`: parse the options, run the suite, print and write the results, and tear
every lab down whatever happens (also on Ctrl-C or SIGTERM)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (root): mesh vs direct TCP vs stunnel vs TPROXY capture, in the lab",
        description="Runs every scenario in the namespace lab in one run (direct, stunnel, "
        "mesh with eBPF capture, mesh with nft TPROXY capture) and prints medians and ratios; "
        "writes JSON and a PNG chart to the output directory and, after a full run, the "
        "README's Benchmarks table.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny durations, one repetition, fewer scenarios (< 1 min)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (median over them)")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="duration of each measurement (bulk rounds up to whole seconds)",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help="comma-separated subset of: direct, direct-same, stunnel, mesh, "
        "mesh-same, tproxy, tproxy-same, mesh-workers, mesh-asyncio",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes per agent in the mesh-workers scenario (default: the usable "
        "CPUs, at least 2)",
    )
    p.add_argument("--rate", type=float, default=None, help="req/s of the latency test")
    p.add_argument(
        "--memory-conns",
        type=int,
        default=None,
        help="idle connections of the memory test (default 10000; 0 skips it)",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"output directory (default {RESULTS_DIR}, or its quick/ subdirectory with --quick)",
    )
    p.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the README's Benchmarks table (default: after full runs)",
    )
    p.add_argument(
        "--l7",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the L7 section (waypoint vs nginx vs HAProxy; default: on, off with --quick)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also sample the agents with py-spy under bulk, max-rate and "
        "new-connection load (mesh scenario)",
    )
    p.set_defaults(func=main)


def _plan(args: argparse.Namespace) -> Any:
    from bench.suite import SCENARIOS, Plan

    plan = Plan.quick_plan() if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.reps is not None:
        if not 1 <= args.reps <= 50:
            raise ValueError("--reps must be 1..50")
        changes["reps"] = args.reps
    if args.seconds is not None:
        if not 0.2 <= args.seconds <= 60:
            raise ValueError("--seconds must be 0.2..60")
        changes["load_seconds"] = args.seconds
        changes["bulk_seconds"] = max(1, round(args.seconds))
    if args.scenarios:
        names = tuple(n.strip() for n in args.scenarios.split(",") if n.strip())
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenarios: {', '.join(unknown)}")
        changes["scenarios"] = names
    if args.rate is not None:
        if not 1 <= args.rate <= 100_000:
            raise ValueError("--rate must be 1..100000")
        changes["fixed_rate"] = args.rate
    if args.memory_conns is not None:
        if not 0 <= args.memory_conns <= 50_000:
            raise ValueError("--memory-conns must be 0..50000")
        changes["memory_conns"] = args.memory_conns
        if args.memory_conns == 0:
            changes["memory_scenarios"] = ()
    if args.profile:
        changes["profile"] = True
    if getattr(args, "workers", None) is not None:
        if not 2 <= args.workers <= 64:
            raise ValueError("--workers must be 2..64")
        changes["workers"] = args.workers
    if getattr(args, "l7", None) is not None:
        changes["l7"] = args.l7
    return dataclasses.replace(plan, **changes)


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the run's finally: every lab is torn down


def main(args: argparse.Namespace) -> int:
    from bench import report
    from bench.suite import Run
    from ztunnel.errors import ZtunnelError

    if os.geteuid() != 0:
        print("ztunnel bench: needs root (network namespaces, eBPF, nftables)", file=sys.stderr)
        return 2
    try:
        plan = _plan(args)
    except ValueError as e:
        print(f"ztunnel bench: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (RESULTS_DIR / "quick" if plan.quick else RESULTS_DIR)
    started = time.monotonic()

    def progress(msg: str) -> None:
        print(f"  [{time.monotonic() - started:5.1f}s] {msg}", flush=True)

    print(
        f"ztunnel bench{' --quick' if plan.quick else ''}: scenarios "
        f"{', '.join(plan.scenarios)}; {plan.reps} repetition(s); results in {out}",
        flush=True,
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    run = Run(plan, out, progress)
    failed = False
    try:
        run.execute()
    except (ZtunnelError, OSError) as e:
        failed = True
        run.errors.append(f"run aborted: {e}")
        print(f"ztunnel bench: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        run.errors.append("interrupted")
        print("ztunnel bench: interrupted; tearing the labs down", file=sys.stderr)
    finally:
        try:
            results = run.results()
        finally:
            try:
                run.close(keep_logs=failed or bool(run.errors))
            finally:
                signal.signal(signal.SIGTERM, previous)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    report.write_json(results, out / "latest.json")
    if results["summary"]:
        report.chart(results, out / "latest.png")
    text = report.terminal(results)
    (out / "latest.txt").write_text(text + "\n")
    print()
    print(text)
    if "l7" in results:
        from bench import l7

        print("\nL7 (waypoint vs nginx vs HAProxy):\n" + l7.table(results["l7"]))
    print(
        f"\nwrote {out / 'latest.json'}, {out / 'latest.png'}, {out / 'latest.txt'} "
        f"in {results['elapsed_s']:.0f}s"
    )
    write_readme = args.readme if args.readme is not None else not plan.quick
    if write_readme and not failed and results["summary"]:
        report.update_readme(README, report.readme_section(results))
        if "l7" in results:
            from bench import l7

            l7.update_readme(README, results["l7"])
        print(f"updated the Benchmarks section of {README}")
    return 1 if failed or results["errors"] else 0
