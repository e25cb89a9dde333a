"""`ztunnel-waypoint` (also `ztunnel waypoint run`): run one waypoint. Exit codes: 0 ok, 1
runtime failure, 2 bad configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from waypoint import config


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="ztunnel-waypoint",
        description="Run a waypoint: the mesh's L7 proxy (Istio VirtualService, "
        "DestinationRule, HTTPRoute, L7 AuthorizationPolicy, request telemetry).",
    )
    config.add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ztunnel import logs
    from ztunnel.cli import run_loop
    from ztunnel.errors import ConfigError, ZtunnelError

    try:
        settings = config.settings_from(args)
    except ConfigError as e:
        print(f"ztunnel-waypoint: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format, settings.log_level)
    from waypoint.app import Waypoint

    async def main() -> int:
        wp = Waypoint(settings)
        await wp.start()
        await wp.run_until_signalled()
        return 0

    try:
        return run_loop(main, settings.event_loop)
    except ConfigError as e:
        print(f"ztunnel-waypoint: configuration error: {e}", file=sys.stderr)
        return 2
    except ZtunnelError as e:
        print(f"ztunnel-waypoint: {e}", file=sys.stderr)
        return 1


def add_parser(sub: Any) -> None:
    """`ztunnel waypoint run ...` in the main command."""
    wp = sub.add_parser("waypoint", help="the L7 proxy (waypoint)")
    wsub = wp.add_subparsers(dest="waypoint_command", required=True)
    build_parser(wsub.add_parser("run", help="run one waypoint"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
