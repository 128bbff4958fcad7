#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmark need on a fresh Debian 12 machine.
# Idempotent; needs root. Rust (cargo) must already be installed.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs packages and makes loop devices)" >&2; exit 2; }
command -v cargo >/dev/null || { echo "setup.sh: cargo not found: install Rust first (https://rustup.rs or apt-get install cargo)" >&2; exit 2; }
# run-all.sh lints the workspace (cargo clippy ... -D warnings) before it tests it.
if ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null; then
    echo "setup.sh: installing clippy (rustup component add clippy)"
    rustup component add clippy
  else
    echo "setup.sh: cargo clippy is missing: install it with your Rust (rustup component add clippy, or Debian's rust-clippy)" >&2
    exit 2
  fi
fi

pkgs=(
  e2fsprogs xfsprogs btrfs-progs   # the filesystems the root tier freezes
  fuse3 fuse2fs                    # a local writable filesystem that cannot freeze (FUSE)
  util-linux kmod                  # losetup, mount, fsfreeze, unshare; modprobe
  qemu-guest-agent                 # the peer we compare with (run only scoped, never as a service)
  qemu-system-x86 qemu-utils       # the VM tier and vmctl: a real guest under QEMU (TCG here)
  libvirt-daemon-system libvirt-clients  # vm_libvirt: virsh against the agents (QEMU driver comes as a dependency)
  libvirt-dev                      # vmctl --connect: the virt crate links libvirt and libvirt-qemu
  busybox-static cpio fdisk        # the guest image: busybox initramfs, partitioned data disk
  dosfstools sqlite3               # vfat in the guest (cannot-freeze), SQLite checks of backups
  python3                          # appvss's Python example (appvss/tests/python.rs)
)
missing=()
for p in "${pkgs[@]}"; do
  [[ $p == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends, and never start qemu-guest-agent's service: it must not freeze this host.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
systemctl stop qemu-guest-agent.service 2>/dev/null || true
# libvirtd may run as a service (systemd starts it on install) or not (no systemd: the libvirt
# test starts virtlogd and libvirtd itself, and stops them after). Its QEMU runs as libvirt-qemu
# (group kvm); without udev (a container) /dev/kvm stays root's alone, and libvirtd then finds
# KVM "enabled when probed, not available now" and probes QEMU again for nearly every command
# (about 30 s each). udev's rule on any other Debian: group kvm, mode 0660.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "setup.sh: no /dev/loop-control: the loop driver is missing" >&2; exit 1; }
modprobe fuse 2>/dev/null || true

# ---------------------------------------------------------------------------------------
# The Debian packages (packaging/build-debs.sh; checked by tests/tests/packages.rs): cargo-deb
# builds them (dpkg-dev for their dependencies), lintian checks them, pkg-config and man read
# what they ship.
deb_pkgs=(lintian dpkg-dev pkgconf man-db)
deb_missing=()
for p in "${deb_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || deb_missing+=("$p")
done
if [ ${#deb_missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${deb_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${deb_missing[@]}" >/dev/null
fi
if ! cargo deb --version 2>/dev/null | grep -q '^3\.8\.'; then
  echo "setup.sh: installing cargo-deb 3.8 (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked --version '~3.8' --quiet
fi

# cargo-fuzz for the bounded fuzz step (tests/fuzz.sh), only where nightly Rust is installed:
# without nightly, fuzz.sh says it skipped and the corpus replay still runs on stable.
if cargo +nightly --version >/dev/null 2>&1 && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "setup.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked --quiet
fi
