#!/usr/bin/env bash
# Provisioning of the lab VM (vagrant/Vagrantfile runs each step as a named provisioner; CI
# runs them all in a fresh Debian 12 container to prove they complete). Idempotent.
#
#   provision.sh kernel   the running kernel has what the lab needs (6.x, BTF, bpf()); if not,
#                         install the backports kernel and ask for `vagrant reload` (only then)
#   provision.sh bpffs    bpffs mounted on /sys/fs/bpf, now and at boot
#   provision.sh setup    the project's own set-up (scripts/setup.sh: packages, headers, venv)
#   provision.sh check    bcc finds kernel headers and compiles and loads the capture programs
#   provision.sh all      every step above, in order
# Environment: ZTUNNEL_DIR (default: the repository this script is in).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ZTUNNEL_DIR=${ZTUNNEL_DIR:-$(dirname "$HERE")}
export DEBIAN_FRONTEND=noninteractive

say() { echo "provision[$1]: ${*:2}"; }

kernel_ok() {
  local major minor
  IFS=. read -r major minor _ <<<"$(uname -r)"
  [ "$major" -ge 6 ] && [ -e /sys/kernel/btf/vmlinux ]
}

step_kernel() {
  if kernel_ok; then
    say kernel "$(uname -r) with BTF: nothing to do"
    return
  fi
  say kernel "$(uname -r) lacks a 6.x kernel with BTF; installing the bookworm-backports kernel"
  echo "deb http://deb.debian.org/debian bookworm-backports main" \
    >/etc/apt/sources.list.d/backports.list
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports linux-image-amd64 >/dev/null
  say kernel "installed; run \`vagrant reload\` once, then \`vagrant provision\`"
}

step_bpffs() {
  if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
  fi
  if ! grep -qs '^bpf[[:space:]]\+/sys/fs/bpf' /etc/fstab; then
    echo "bpf /sys/fs/bpf bpf defaults 0 0" >>/etc/fstab
  fi
  say bpffs "mounted on /sys/fs/bpf (and in /etc/fstab)"
}

step_setup() {
  "$ZTUNNEL_DIR/scripts/setup.sh"
  say setup "done: $ZTUNNEL_DIR/.venv"
}

step_check() {
  local pins=/sys/fs/bpf/ztunnel-provision-check
  rm -rf "$pins"
  # The BPF loader as the agent runs it: headers found, programs compiled, loaded and pinned.
  "$ZTUNNEL_DIR/.venv/bin/python" - "$pins" <<'PY'
import ipaddress
import sys
from pathlib import Path

from ztunnel.capture.config import CaptureConfig
from ztunnel.capture.headers import find_kernel_headers
from ztunnel.capture.loader import run_loader

print(f"provision[check]: kernel headers: {find_kernel_headers().describe()}")
node = (ipaddress.IPv4Address("192.0.2.1"),)  # compile-time only: nothing is attached
report = run_loader(CaptureConfig(node_addresses=node, pin_dir=Path(sys.argv[1])))
print(f"provision[check]: capture programs compiled and loaded: {dict(report.program_ids)}")
PY
  rm -rf "$pins"
  say check "the lab can run here: sudo ./scripts/lab.sh, sudo ./scripts/test.sh"
}

case "${1:-all}" in
  kernel) step_kernel ;;
  bpffs) step_bpffs ;;
  setup) step_setup ;;
  check) step_check ;;
  all)
    step_kernel
    if ! kernel_ok; then exit 0; fi  # the rest after `vagrant reload`
    step_bpffs
    step_setup
    step_check
    ;;
  *)
    echo "usage: provision.sh kernel|bpffs|setup|check|all" >&2
    exit 2
    ;;
esac
