#!/bin/sh
# Image build step 1 (runs inside the build): installs the Debian packages listed in
# `packages` that the base image lacks. A base made by scripts/build-image.sh (mmdebstrap) or
# debian:bookworm-slim both work; nothing is installed twice and apt's lists are not kept.
set -eu
here=$(dirname "$0")
pkgs=$(sed -e 's/#.*//' "$here/packages" | tr -s ' \t\n' ' ')
missing=""
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "install-packages:$missing"
  apt-get update -qq
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
