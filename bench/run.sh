#!/usr/bin/env bash
# The benchmark suite (needs root): set-up (scripts/setup.sh; `ztunnel bench` installs the
# benchmark's own tools: gcc, iperf3, stunnel4, nftables), then every scenario in the namespace
# lab, side by side. Arguments go to `ztunnel bench` (e.g. `bench/run.sh --quick`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench: needs root (network namespaces, eBPF, nftables); re-run with sudo" >&2
  exit 2
fi
./scripts/setup.sh
exec .venv/bin/python -m ztunnel bench "$@"
