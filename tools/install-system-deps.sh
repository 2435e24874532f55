#!/usr/bin/env bash
# Install the system tools cdp's tests and benchmarks drive (real clients and peers).
# Idempotent: does nothing when every tool is already on PATH. Needs root (or sudo).
set -euo pipefail

# tool -> Debian package
declare -A PKG=(
  [qemu-io]=qemu-utils [qemu-img]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin [nbdsh]=python3-libnbd
  [nbdkit]=nbdkit [fio]=fio
  [mkntfs]=ntfs-3g [ntfs-3g]=ntfs-3g
  [fls]=sleuthkit [icat]=sleuthkit [istat]=sleuthkit
  [mkfs.ext4]=e2fsprogs [debugfs]=e2fsprogs [fuse2fs]=fuse2fs
  [sfdisk]=fdisk [sgdisk]=gdisk
  [iscsi-test-cu]=libiscsi-bin [iscsi-inq]=libiscsi-bin
  [tgtd]=tgt [fusermount3]=fuse3
  [qemu-system-x86_64]=qemu-system-x86
  # the S3 tests' Ceph RGW (tools/ceph-s3, which installs the same list itself when run
  # alone; no ceph-mgr: S3 does not need it)
  [ceph-mon]=ceph-mon [monmaptool]=ceph-mon [ceph-osd]=ceph-osd [radosgw]=radosgw
  [ceph]=ceph-common [radosgw-admin]=ceph-common [uuidgen]=uuid-runtime
  # the web console's real-browser test (selenium drives headless chromium)
  [chromium]=chromium [chromedriver]=chromium-driver
  # tools/bench/sentinel_cachegrind (instruction counts; a bench, not a test)
  [valgrind]=valgrind
)
# qemu-block-extra has no binary of its own (it adds iscsi:// to qemu): check the file
EXTRA_FILES=(/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so)

missing=()
for tool in "${!PKG[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PKG[$tool]}")
done
for f in "${EXTRA_FILES[@]}"; do
  [ -e "$f" ] || [ "$(uname -m)" != x86_64 ] || missing+=(qemu-block-extra)
done
[ ${#missing[@]} -eq 0 ] && exit 0

mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" qemu-block-extra | sort -u)
echo "install-system-deps: installing ${pkgs[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install-system-deps: missing ${pkgs[*]} and not root: install them with apt-get" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
