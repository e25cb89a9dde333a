#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages (bcc, kernel headers,
# iproute2, comparison tools), the bcc header links of shared/PLATFORM.md, and the project's
# virtual environment in .venv with its Python dependencies. Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${ZTUNNEL_VENV:-$ROOT/.venv}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# One group per line: what it is for. `--no-install-recommends` ones are listed apart.
pkgs=(
  python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2   # eBPF capture (bcc) and netlink
  stunnel4 iperf3 tcpdump nftables                         # benchmark peers, captures, tproxy
  nodejs                                                   # HTTP/2 interop peer (nghttp2)
  containernetworking-plugins                              # real CNI plugins (bridge, ptp, host-local) for the Kubernetes lab
  nginx-light haproxy nghttp2-client curl                  # waypoint: L7 benchmark peers, HTTP clients
  python3-venv                                             # the venv on a plain Debian (lab VM)
  podman runc buildah mmdebstrap                           # the OCI image: offline build, image lab
)
pkgs_norec=(
  vagrant                                                  # Vagrantfile validation (no provider)
)
APT_LOCK=(-o DPkg::Lock::Timeout=600)
missing() { for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done; }
mapfile -t need < <(missing "${pkgs[@]}")
mapfile -t need_norec < <(missing "${pkgs_norec[@]}")
if [ "${#need[@]}" -gt 0 ] || [ "${#need_norec[@]}" -gt 0 ]; then
  echo "setup: installing system packages: ${need[*]} ${need_norec[*]}"
  $SUDO apt-get "${APT_LOCK[@]}" update -qq
  if [ "${#need[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_LOCK[@]}" install -y -qq "${need[@]}" >/dev/null
  fi
  if [ "${#need_norec[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_LOCK[@]}" install -y -qq \
      --no-install-recommends "${need_norec[@]}" >/dev/null
  fi
fi

# bcc needs /lib/modules/$(uname -r)/{build,source}; point them at the Debian headers (PLATFORM.md).
KREL=$(uname -r)
HDR_BUILD=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
HDR_COMMON=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$HDR_BUILD" ] && [ -n "$HDR_COMMON" ]; then
  $SUDO mkdir -p "/lib/modules/$KREL"
  [ -e "/lib/modules/$KREL/build" ] || $SUDO ln -sfn "$HDR_BUILD" "/lib/modules/$KREL/build"
  [ -e "/lib/modules/$KREL/source" ] || $SUDO ln -sfn "$HDR_COMMON" "/lib/modules/$KREL/source"
else
  echo "setup: warning: no Debian kernel headers found under /usr/src; bcc will not compile" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.deps-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python dependencies"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

# Debian's bcc Python module lives in the system dist-packages; link only that package in.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$SITE/bcc" ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/bcc"
fi
