#!/usr/bin/env bash
# The test command: does all of its own set-up (scripts/setup.sh), then runs every tier of the
# suite: unit, loopback integration, and the kernel lab (network namespaces + eBPF, root).
# Extra arguments go to pytest (e.g. `scripts/test.sh -m unit`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test: the kernel-lab tests need root; re-run with sudo" >&2
  exit 2
fi
./scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
