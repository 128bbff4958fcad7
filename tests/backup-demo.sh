#!/usr/bin/env bash
# The main job of issue 4: a consistent backup of a running QEMU VM, checked.
#
# Installs what it needs (Debian 12, root), builds vmctl and the guest image (Debian's kernel,
# busybox, a static vssd, writers), boots the demo VM under QEMU (KVM when usable, else TCG),
# takes a backup with `vmctl backup` while an SQLite writer and plain writers run, verifies it,
# looks inside, takes an incremental, restores it as a new VM and boots that. Prints what it
# proved and the freeze window. Everything it makes lives under /tmp/vssd-vm-demo-* and is
# removed at the end (VSSD_VM_KEEP=1 keeps it); every QEMU it starts is killed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "backup-demo.sh: needs root (packages, loop devices to look inside backups): sudo $0" >&2; exit 2; }
bash tests/setup.sh
bash tests/guest/build.sh --install >/dev/null
echo "== build"
cargo build --release --locked -p hostsim -p tests --bins
# A private mount namespace: the mounts used to look inside the backups stay out of sight.
VSSD_BIN_DIR=target/release exec unshare -m --propagation private ./target/release/backup-demo
