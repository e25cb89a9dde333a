#!/usr/bin/env bash
# Runs the test suite inside a virtual machine on another kernel (default: Debian 12's 6.1,
# the oldest kernel the project's machines run), so kernel-dependent code (eBPF capture,
# tc/tcx attach, bcc against that kernel's headers) can be checked without such a machine.
# A developer tool, not part of CI. Usage:
#
#   sudo scripts/kernel-vm.sh [options] [--] [pytest args...]     (default pytest args: -m lab)
#
#   --accel A        kvm, tcg or auto (default): kvm where the CPU has hardware
#                    virtualization (vmx/svm), else tcg (emulation: the same kernel code,
#                    but ~10-30x slower; on the project's machines it is tcg, see below)
#   --timeout SECS   hard bound on the VM's run, boot to power-off (default 1800 with kvm,
#                    10800 with tcg)
#   --mem MIB        guest memory (default 4096); --cpus N (default 2)
#   --rebuild        build the cached layers again even if they match
#   --build-only     build (or check) the cached layers, boot nothing
#   --keep           keep the run directory (source tarball, console and test logs)
#
# Cached in $ZTUNNEL_VM_CACHE (default /var/cache/ztunnel-kernel-vm), outside the repo, in
# three layers rebuilt only when what they come from changes: the Debian 12 base (mmdebstrap:
# the kernel of $ZTUNNEL_VM_KERNEL with matching headers, every package of scripts/setup.sh,
# ~4 min), the wheelhouse (pyproject.toml) and the boot disk (base + the project's venv,
# built natively in a chroot with the guest's own python). Each run boots the disk
# copy-on-write (nothing persists), copies the working tree in (tracked and untracked, not
# ignored, files) and runs scripts/test.sh with the given arguments, as CI would. The guest
# has no network device at all: its traffic stays in the namespaces the tests create in it.
# Exit code: that of scripts/test.sh (pytest's), 124 when the run hit --timeout, 2 for a
# problem with the tool or the VM. The last logs stay in the cache (last-*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SUITE=bookworm
read -r -a KERNEL_PKGS <<<"${ZTUNNEL_VM_KERNEL:-linux-image-amd64 linux-headers-amd64}"
CACHE=${ZTUNNEL_VM_CACHE:-/var/cache/ztunnel-kernel-vm}
LAYOUT=2 # bump when the image layout or the in-image init changes
GUEST_SRC=/root/src # where the guest runs the tree; the image's venv is $GUEST_SRC/.venv
TIMEOUT=""
MEM=4096
CPUS=2
ACCEL=auto
REBUILD=0
BUILD_ONLY=0
KEEP=0
APT_LOCK=(-o DPkg::Lock::Timeout=600)

say() { echo "kernel-vm: $*" >&2; }
die() {
  say "$*"
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) REBUILD=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    --keep) KEEP=1 ;;
    --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift ;;
    --mem) MEM=${2:?--mem needs MiB}; shift ;;
    --cpus) CPUS=${2:?--cpus needs a count}; shift ;;
    --accel) ACCEL=${2:?--accel needs kvm, tcg or auto}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
  shift
done
[ $# -gt 0 ] || set -- -m lab
[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap, chroot, /dev/kvm); re-run with sudo"

# KVM boots a stock kernel only with hardware virtualization. The project's machines are
# themselves guests whose /dev/kvm is PVM (module kvm_pvm, no vmx/svm flag): it runs only
# kernels built as PVM guests; Debian's 6.1 hangs right after its real-mode setup there (and
# `-cpu host` aborts on MSR 0x10a). TCG then runs the very same kernel, only slower.
kvm_usable() {
  [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo
}
case "$ACCEL" in
  auto) if kvm_usable; then ACCEL=kvm; else ACCEL=tcg; fi ;;
  kvm) kvm_usable || die "no usable KVM: no /dev/kvm, or no vmx/svm (a PVM /dev/kvm cannot boot a stock kernel)" ;;
  tcg) ;;
  *) die "--accel: kvm, tcg or auto, not $ACCEL" ;;
esac
if [ -z "$TIMEOUT" ]; then
  if [ "$ACCEL" = kvm ]; then TIMEOUT=1800; else TIMEOUT=10800; fi
fi
for n in "$TIMEOUT" "$MEM" "$CPUS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $n"
done

# Host tools, installed once (Debian packages, without their recommends).
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing host tools: ${need[*]}"
  apt-get "${APT_LOCK[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK[@]}" install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
fi

# The guest gets what scripts/setup.sh installs (read from its package arrays, so the two
# never drift), the kernel with matching headers, and what running without systemd needs.
pkgs=() pkgs_norec=()
eval "$(sed -n '/^pkgs=(/,/^)/p; /^pkgs_norec=(/,/)/p' scripts/setup.sh)"
[ "${#pkgs[@]}" -gt 0 ] || die "could not read the package list of scripts/setup.sh"
extra=(python3-venv containernetworking-plugins kmod procps iputils-ping netbase
  ca-certificates openssl psmisc)
mapfile -t guest_pkgs < <(printf '%s\n' "${KERNEL_PKGS[@]}" "${pkgs[@]}" \
  "${pkgs_norec[@]}" "${extra[@]}" | sort -u)

mkdir -p "$CACHE"
base_key=$( (echo "$LAYOUT $SUITE"; printf '%s\n' "${guest_pkgs[@]}") | sha256sum | cut -c1-16)
wheel_key=$(sha256sum pyproject.toml | cut -c1-16)
BASE="$CACHE/base-$base_key"
WHEELS="$CACHE/wheels-$wheel_key"
IMAGE="$CACHE/image-$base_key-$wheel_key"

# The guest's init, baked into the disk: mount the run's 9p share and hand over to the
# guest.sh in it (written for every run, so changing the run steps needs no new disk).
stub_init() {
  cat <<'STUB'
#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
modprobe 9pnet_virtio && modprobe 9p && mkdir -p /run/vm &&
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 vmrun /run/vm &&
  exec /bin/bash /run/vm/guest.sh
echo "ztunnel-vm-init: cannot mount the run share" >&2
echo o >/proc/sysrq-trigger
STUB
}

build_base() {
  local tmp vmlinuz initrd
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  say "building the Debian base ($SUITE, ${#guest_pkgs[@]} packages); a few minutes"
  # No mirror given: mmdebstrap takes Debian's default one plus the security and updates
  # suites. Hooks run on the host with the root directory as $1.
  if ! mmdebstrap --quiet --variant=apt --include="$(IFS=,; echo "${guest_pkgs[*]}")" \
    --customize-hook="cp \"\$1\"/boot/vmlinuz-* \"\$1\"/boot/initrd.img-* '$tmp/'" \
    --customize-hook="chroot \"\$1\" dpkg-query -W >'$tmp/packages.txt'" \
    "$SUITE" "$tmp/rootfs.tar" >"$tmp/mmdebstrap.log" 2>&1; then
    tail -n 30 "$tmp/mmdebstrap.log" >&2
    rm -rf "$tmp"
    die "mmdebstrap failed"
  fi
  vmlinuz=$(find "$tmp" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)
  initrd=$(find "$tmp" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -n 1)
  [ -n "$vmlinuz" ] && [ -n "$initrd" ] || { rm -rf "$tmp"; die "no kernel or initrd in the base"; }
  echo "${vmlinuz##*/vmlinuz-}" >"$tmp/release"
  mv "$vmlinuz" "$tmp/vmlinuz"
  mv "$initrd" "$tmp/initrd.img"
  mv "$tmp" "$BASE"
}

build_wheels() {
  local tmp
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  say "building the wheelhouse of pyproject.toml"
  # Everything `pip install -e .[dev]` needs, the build backend included, as wheels.
  if ! python3 -m pip wheel -q -w "$tmp" ".[dev]" "setuptools>=68" wheel >"$tmp/pip.log" 2>&1; then
    tail -n 30 "$tmp/pip.log" >&2
    rm -rf "$tmp"
    die "pip wheel failed"
  fi
  rm -f "$tmp"/ztunnel_py-*.whl "$tmp/pip.log"
  mv "$tmp" "$WHEELS"
}

# The working tree as git sees it (tracked and untracked files, not the ignored ones).
source_tar() {
  git -C "$ROOT" ls-files -z -co --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$ROOT/$f" ] && printf '%s\0' "$f"; done |
    tar -C "$ROOT" --null -T - -cf "$1"
}

build_image() {
  local tmp rootfs size_mib
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  rootfs="$tmp/rootfs"
  say "building the boot disk (base + venv)"
  mkdir "$rootfs"
  tar -C "$rootfs" -xf "$BASE/rootfs.tar"
  stub_init >"$rootfs/sbin/ztunnel-vm-init"
  chmod 755 "$rootfs/sbin/ztunnel-vm-init"
  echo ztunnel-vm >"$rootfs/etc/hostname"
  printf '127.0.0.1\tlocalhost ztunnel-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    >"$rootfs/etc/hosts"
  : >"$rootfs/etc/resolv.conf"
  # The venv, at native speed with the guest's own python: the project installed editable
  # from a snapshot of the tree at $GUEST_SRC, whose files are then removed (each run brings
  # the current tree to the same place), and the stamp that tells scripts/setup.sh the
  # dependencies are in. The mounts live in a private mount namespace and end with it.
  mkdir -p "$rootfs$GUEST_SRC" "$rootfs/tmp/wheels"
  source_tar "$tmp/src.tar"
  tar -C "$rootfs$GUEST_SRC" -xf "$tmp/src.tar"
  cp "$WHEELS"/*.whl "$rootfs/tmp/wheels/"
  # shellcheck disable=SC2016 # expanded by the inner shells
  if ! unshare --mount --propagation private sh -c '
      set -e
      mount --rbind /dev "$1/dev"; mount -t proc proc "$1/proc"; mount -t sysfs sysfs "$1/sys"
      chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root sh -c "cd $2 && python3 -m venv .venv &&
        .venv/bin/python -m pip install -q --no-index --find-links /tmp/wheels -e \".[dev]\" &&
        sha256sum pyproject.toml | cut -d\" \" -f1 >.venv/.deps-stamp"
    ' sh "$rootfs" "$GUEST_SRC" >"$tmp/venv.log" 2>&1; then
    tail -n 30 "$tmp/venv.log" >&2
    rm -rf "$tmp"
    die "creating the guest's venv failed"
  fi
  find "$rootfs$GUEST_SRC" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
  rm -rf "$rootfs/tmp/wheels" "$tmp/src.tar"
  # Room for the source tree and the tests' files; the file is sparse on the host.
  size_mib=$(($(du -sm "$rootfs" | cut -f1) + 2048))
  mke2fs -q -t ext4 -L ztvm -d "$rootfs" "$tmp/rootfs.ext4" "${size_mib}M" >/dev/null ||
    { rm -rf "$tmp"; die "mke2fs failed"; }
  rm -rf "$rootfs"
  cp "$BASE/vmlinuz" "$BASE/initrd.img" "$BASE/release" "$BASE/packages.txt" "$tmp/"
  mv "$tmp" "$IMAGE"
}

exec 9>"$CACHE/.lock"
flock -w 3600 9 || die "another run is building in $CACHE (lock held for an hour)"
[ "$REBUILD" -eq 0 ] || rm -rf "$BASE" "$WHEELS" "$IMAGE"
[ -f "$BASE/rootfs.tar" ] || build_base
[ -d "$WHEELS" ] || build_wheels
[ -f "$IMAGE/rootfs.ext4" ] || build_image
for old in "$CACHE"/base-* "$CACHE"/wheels-* "$CACHE"/image-* "$CACHE"/build.*; do
  case "$old" in "$BASE" | "$WHEELS" | "$IMAGE") continue ;; esac
  [ ! -e "$old" ] || rm -rf "$old" # an older layer, or what a killed build left
done
flock -u 9
RELEASE=$(cat "$IMAGE/release")
say "disk $IMAGE: kernel $RELEASE"
[ "$BUILD_ONLY" -eq 0 ] || exit 0

RUN=$(mktemp -d "$CACHE/run.XXXXXX")
QEMU_PID=""
cleanup() {
  [ -z "$QEMU_PID" ] || kill "$QEMU_PID" 2>/dev/null || true
  if [ "$KEEP" -eq 1 ]; then say "run directory kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

source_tar "$RUN/src.tar"
# Emulated, user space is 10-30x slower: the lab's waits stretch (tests/lab/conftest.py) and
# so does pytest's per-test timeout (a later --timeout among the arguments still wins).
scale=1
[ "$ACCEL" = kvm ] || scale=${ZTUNNEL_LAB_TIME_SCALE:-20}
[[ "$scale" =~ ^[1-9][0-9]*$ ]] || die "ZTUNNEL_LAB_TIME_SCALE: a positive integer, not $scale"
printf '%s\0' "--timeout=$((300 * scale))" "$@" >"$RUN/args"
guest_timeout=$((TIMEOUT > 600 ? TIMEOUT - 300 : TIMEOUT / 2)) # leave time to boot and report

cat >"$RUN/guest.sh" <<GUEST
#!/bin/bash
# PID 1 of the guest: set up what systemd would, run the tests, record the code, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export ZTUNNEL_LAB_TIME_SCALE=$scale PYTHONUNBUFFERED=1
finish() { echo "\$1" >/run/vm/rc; sync; echo o >/proc/sysrq-trigger; sleep 60; }
trap 'finish 2' EXIT
m() { mountpoint -q "\$3" || { mkdir -p "\$3" && mount -t "\$1" "\$2" "\$3"; }; }
m devpts devpts /dev/pts; m tmpfs tmpfs /dev/shm; m tmpfs tmpfs /tmp
m bpf bpf /sys/fs/bpf; m cgroup2 cgroup2 /sys/fs/cgroup
m debugfs debugfs /sys/kernel/debug; m tracefs tracefs /sys/kernel/tracing
ip link set lo up
hostname ztunnel-vm
ulimit -n 20000
echo "guest: kernel \$(uname -r), \$(nproc) cpus, \$(free -m | awk '/Mem:/ {print \$2}') MiB"
tar -xf /run/vm/src.tar -C $GUEST_SRC && cd $GUEST_SRC || exit
mapfile -d '' args </run/vm/args
start=\$(date +%s)
set -o pipefail
timeout -k 20 $guest_timeout ./scripts/test.sh "\${args[@]}" 2>&1 | tee /run/vm/test.log
rc=\$?
echo "guest: scripts/test.sh exited \$rc after \$((\$(date +%s) - start)) s"
trap - EXIT
finish "\$rc"
GUEST

if [ "$ACCEL" = kvm ]; then
  accel_args=(-accel kvm -cpu host)
else
  accel_args=(-accel tcg,thread=multi,tb-size=512 -cpu max)
fi
say "booting kernel $RELEASE with $ACCEL (timeout ${TIMEOUT}s): pytest $*"
t0=$(date +%s)
# -nodefaults and -nic none: no network device; one 9p share: the run directory.
TMPDIR="$RUN" timeout -k 10 "$TIMEOUT" qemu-system-x86_64 \
  "${accel_args[@]}" -smp "$CPUS" -m "$MEM" \
  -nodefaults -no-user-config -display none -no-reboot -nic none \
  -chardev "stdio,id=con,signal=off,logfile=$RUN/console.log" -serial chardev:con \
  -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" \
  -append "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/ztunnel-vm-init panic=-1 quiet loglevel=4" \
  -drive "file=$IMAGE/rootfs.ext4,format=raw,if=virtio,snapshot=on" \
  -virtfs "local,path=$RUN,mount_tag=vmrun,security_model=none" \
  </dev/null &
QEMU_PID=$!
set +e
wait "$QEMU_PID"
qrc=$?
set -e
QEMU_PID=""
say "VM ran $(($(date +%s) - t0)) s"
for f in test console; do
  [ ! -f "$RUN/$f.log" ] || cp "$RUN/$f.log" "$CACHE/last-$f.log"
done
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
  say "timed out after ${TIMEOUT}s (logs: $CACHE/last-*.log)"
  exit 124
fi
[ -f "$RUN/rc" ] || die "the VM stopped (qemu exit $qrc) without a test result (log: $CACHE/last-console.log)"
rc=$(cat "$RUN/rc")
say "kernel $RELEASE: scripts/test.sh exited $rc (log: $CACHE/last-test.log)"
exit "$rc"
