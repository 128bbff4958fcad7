#!/usr/bin/env bash
# Every test: unit tests of every crate, then the root tier (real FIFREEZE on loop filesystems
# the tests create, always scoped), then one short run of the benchmark so its figures are in
# the log. Needs root; the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run-all.sh: the root tier needs root: sudo $0" >&2; exit 2; }
bash tests/setup.sh

echo "== build"
cargo build --workspace --locked   # libraries too: the C test links libappvss.a

echo "== guest image for the VM tier (Debian kernel, busybox, static vssd; cached in target/guest)"
bash tests/guest/build.sh --install

echo "== unit tests, root tier and VM tier"
# A private mount namespace: the tests' mounts stay out of the host's view, and nothing
# outside (a qemu-ga elsewhere on the machine thaws every filesystem it sees) reaches them.
unshare -m --propagation private cargo test --workspace --locked

echo "== benchmarks (short runs; the full ones: ./target/release/freeze-bench, ./target/release/app-bench)"
cargo build --release --locked -p vssd -p tests --bins
unshare -m --propagation private ./target/release/freeze-bench --counts 1,16 --cycles 5
unshare -m --propagation private ./target/release/app-bench --counts 1,100,1000 --cycles 3
cargo build --release --locked -p hostsim -p tests --bins
VSSD_BIN_DIR=target/release unshare -m --propagation private ./target/release/backup-bench --cycles 3

leftover=$(losetup -a | grep -c -e vssd -e /tmp/ || true)
if [ "$leftover" -gt 0 ]; then
  echo "run-all.sh: $leftover loop device(s) left attached by a test:" >&2; losetup -a >&2; exit 1
fi
if pgrep -a qemu-system | grep -q /tmp/vssd-vm- || ls -d /tmp/vssd-vm-* >/dev/null 2>&1; then
  echo "run-all.sh: a VM test left a QEMU or its directory behind:" >&2; pgrep -a qemu-system >&2; ls -d /tmp/vssd-vm-* >&2; exit 1
fi
echo "== all tests passed"
