#!/usr/bin/env bash
# Builds the ztunnel-py OCI image without a container registry (README, "Install on a cluster"):
#   1. a Debian 12 root file system made by mmdebstrap, imported with podman as the base
#      (kept as localhost/ztunnel-py-base:bookworm and reused; --rebuild-base makes it again);
#   2. a wheelhouse of the Python dependencies, downloaded on this machine (build/image/wheels);
#   3. deploy/image/Containerfile built on that base with podman; the Python packages are
#      installed from the wheelhouse (no index), the Debian ones from the Debian mirror.
# podman runs with deploy/image/containers.conf (runc, cgroupfs, the hosts' ulimits), never a
# global configuration. Needs root (mmdebstrap, rootful podman).
#
#   scripts/build-image.sh [--tag IMAGE] [--base IMAGE] [--rebuild-base] [--base-only]
#                          [--save FILE.tar]
#     --tag IMAGE      name of the result (default localhost/ztunnel-py:<version>)
#     --base IMAGE     build on this image instead (e.g. docker.io/library/debian:bookworm-slim)
#     --rebuild-base   make the mmdebstrap base again even if it exists
#     --base-only      only make (or keep) the base (the Vagrant provisioning check uses it)
#     --save FILE      also write an OCI archive for `kind load image-archive`, `ctr images import`
# Environment: ZTUNNEL_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CONTAINERS_CONF="$ROOT/deploy/image/containers.conf"

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
TAG="localhost/ztunnel-py:$VERSION"
BASE=""
BASE_LOCAL="localhost/ztunnel-py-base:bookworm"
REBUILD_BASE=0
BASE_ONLY=0
SAVE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --base-only) BASE_ONLY=1; shift ;;
    --save) SAVE=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "build-image: needs root (mmdebstrap and rootful podman); re-run with sudo" >&2
  exit 2
fi
for tool in podman mmdebstrap runc; do
  command -v "$tool" >/dev/null || {
    echo "build-image: $tool is missing (scripts/setup.sh installs it)" >&2
    exit 2
  }
done

step_start=$SECONDS
step() { echo "build-image: $* (+$((SECONDS - step_start))s)"; }

# 1. The base.
if [ -z "$BASE" ]; then
  BASE=$BASE_LOCAL
  if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE"; then
    MIRROR=${ZTUNNEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    SECURITY=${MIRROR%/debian}/debian-security
    step "making the base $BASE with mmdebstrap (Debian 12, $MIRROR)"
    # A minimal Debian system (required packages and apt: what every Debian install has,
    # the Vagrant box too), streamed into podman.
    # No manuals, docs or translations (as Debian's slim images): smaller, same behaviour.
    mmdebstrap --quiet --variant=minbase --include=ca-certificates \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      bookworm - \
      "deb $MIRROR bookworm main" \
      "deb $MIRROR bookworm-updates main" \
      "deb $SECURITY bookworm-security main" |
      podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  fi
  PULL=never
else
  PULL=missing
fi
if [ "$BASE_ONLY" = 1 ]; then
  echo "$BASE"
  exit 0
fi

# 2. The wheelhouse: the project's runtime dependencies (and its build backend), as wheels for
# this CPython (the image's Debian python3 is the same 3.11 / glibc x86_64 ABI).
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
WHEELS="$ROOT/build/image/wheels"
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
step "downloading wheels into ${WHEELS#"$ROOT"/}"
"$PY" - > "$ROOT/build/image/requirements.txt" <<'PYEOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
build = project["build-system"]["requires"]
print("\n".join([*project["project"]["dependencies"], *build, "pip"]))
PYEOF
# (the filter drops notes about this machine's extra local package indexes)
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
  --dest "$WHEELS" -r "$ROOT/build/image/requirements.txt" 2>&1 |
  { grep -v "^WARNING: Location .* is ignored" || true; } >&2

# 3. The image.
step "building $TAG on $BASE"
# apt may take the .debs this machine has downloaded already, through an overlay: the host's
# cache stays as it is and nothing of it lands in the image.
CACHE=()
if [ -d /var/cache/apt/archives ]; then
  CACHE=(--volume /var/cache/apt/archives:/var/cache/apt/archives:O)
fi
LOG="$ROOT/build/image/build.log"
BUILD_ID="$(date +%s)-$$-$RANDOM"
if ! podman build --pull="$PULL" --network host --build-arg "BASE=$BASE" "${CACHE[@]}" \
  --build-arg "BUILD_ID=$BUILD_ID" \
  -f deploy/image/Containerfile -t "$TAG" . >"$LOG" 2>&1; then
  tail -n 40 "$LOG" >&2
  echo "build-image: podman build failed; the whole log is $LOG" >&2
  exit 1
fi
# This build's build-stage image is only a step: remove it (the runtime stage stays as a
# cache); builds running in parallel on this machine keep theirs.
podman images --quiet --filter "label=ztunnel-py.build-stage=$BUILD_ID" |
  xargs --no-run-if-empty podman rmi >/dev/null 2>&1 || true
size=$(podman image inspect --format '{{.Size}}' "$TAG")
step "built $TAG ($((size / 1024 / 1024)) MiB)"
if [ -n "$SAVE" ]; then
  rm -f "$SAVE"
  podman save --quiet --format oci-archive -o "$SAVE" "$TAG"
  step "saved $TAG to $SAVE"
fi
echo "$TAG"
