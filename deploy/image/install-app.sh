#!/bin/sh
# Image build step 2 (runs inside the build, build context at $1): the project in
# /opt/ztunnel-py laid out like a source checkout (so `bpf/` sits where the agent looks for
# it), its virtual environment in /opt/ztunnel-py/.venv, and Debian's bcc linked into the venv
# exactly as scripts/setup.sh does on a development machine. Python packages come from the
# wheelhouse build/image/wheels when the context has one (the offline build), otherwise from
# the package index.
set -eu
ctx=$1
app=/opt/ztunnel-py
mkdir -p "$app"
for item in pyproject.toml README.md ztunnel bpf cni waypoint; do
  if [ -e "$ctx/$item" ]; then cp -a "$ctx/$item" "$app/"; fi
done
find "$app" -name __pycache__ -prune -exec rm -rf {} +
wheels="$ctx/build/image/wheels"
if ls "$wheels"/pip-*.whl >/dev/null 2>&1; then
  # Offline: no pip or setuptools in the venv; pip runs from its wheel, everything comes from
  # the wheelhouse (the build backend too, in pip's isolated build environment).
  python3 -m venv --without-pip "$app/.venv"
  pip_whl=$(ls "$wheels"/pip-*.whl | head -n 1)
  "$app/.venv/bin/python" "$pip_whl/pip" install -q --no-cache-dir --disable-pip-version-check \
    --no-index --find-links "$wheels" -e "$app"
else
  python3 -m venv "$app/.venv"
  "$app/.venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check -e "$app"
fi
site=$("$app/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
# The root file system is read-only in the cluster: compile the project's bytecode now (pip
# has compiled the installed packages').
"$app/.venv/bin/python" -m compileall -q "$app" -x '/\.venv/' >/dev/null
# Smoke test: the command runs and bcc imports (bcc itself loads only in the BPF loader).
"$app/.venv/bin/ztunnel" --help >/dev/null
"$app/.venv/bin/python" -c 'import bcc, grpc, ztunnel.app, ztunnel.xds.client, ztunnel.istioca'
