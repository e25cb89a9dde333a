#!/usr/bin/env bash
# The main job: set everything up (scripts/setup.sh), then run the lab: node agents in network
# namespaces with eBPF capture, pods with applications, real traffic and a readable summary.
# With --loopback (or when eBPF is unavailable) it runs the loopback demo instead.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "${1:-}" = "--loopback" ]; then
  exec .venv/bin/python -m ztunnel demo
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "lab: the namespace lab needs root; re-run with sudo (or use --loopback)" >&2
  exit 2
fi
if .venv/bin/python -m ztunnel lab --help >/dev/null 2>&1; then
  exec .venv/bin/python -m ztunnel lab demo
fi
exec .venv/bin/python -m ztunnel demo
