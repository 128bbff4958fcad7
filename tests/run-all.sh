#!/usr/bin/env bash
# Every test, in tiers, each timed (CI has 90 minutes): setup, build, clippy, the guest image,
# the unit tests of every crate (no root), the root tier (real FIFREEZE on loop filesystems the
# tests create, always scoped), the VM tier (a real guest under QEMU), then one short run of
# each benchmark so its figures are in the log. Needs root; the README's test command.
#
# Root-tier and VM-tier tests are `#[ignore = "root tier: ..."]` / `#[ignore = "vm tier: ..."]`:
# the unit step lists them as ignored, and the tier steps run them with `--include-ignored`.
# The run fails when any test was ignored and no tier ran it, or a tier's run ignored any,
# and names the test binaries. A tier test that cannot run here fails; it never passes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run-all.sh: the root tier needs root: sudo $0" >&2; exit 2; }

logs=target/run-all
rm -rf "$logs"
mkdir -p "$logs"

# ---------------------------------------------------------------------------------------
# Steps and their times

timings=()
step=
step_start=$SECONDS
begin() {
  step=$1
  step_start=$SECONDS
  echo "== $step"
}
end() {
  local d=$((SECONDS - step_start))
  timings+=("$(printf '  %-12s %3dm%02ds' "$step" $((d / 60)) $((d % 60)))")
  echo "== $step: done in ${d}s"
  step=
}
summary() {
  local rc=$? total=$SECONDS
  [ -n "$step" ] && timings+=("$(printf '  %-12s %3dm%02ds  (failed here)' "$step" $(((SECONDS - step_start) / 60)) $(((SECONDS - step_start) % 60)))")
  echo "== time per step (the CI budget is 90 minutes):"
  printf '%s\n' "${timings[@]}"
  printf '  %-12s %3dm%02ds\n' total $((total / 60)) $((total % 60))
  [ "$total" -le 5400 ] || echo "run-all.sh: over the 90-minute CI budget" >&2
  exit "$rc"
}
trap summary EXIT

# ---------------------------------------------------------------------------------------
# cargo test, logged, and what its summaries say

# Runs `cargo test ARGS...` in a private mount namespace, its output (cargo's and the test
# binaries') also in $logs/NAME.log. The namespace: the tests' mounts stay out of the host's
# view, and nothing outside (a qemu-ga elsewhere on the machine thaws every filesystem it sees)
# reaches them.
cargo_test() {
  local name=$1
  shift
  unshare -m --propagation private cargo test "$@" 2>&1 | tee "$logs/$name.log"
}

# Per test binary of a cargo test log: "BINARY<TAB>IGNORED" (BINARY as cargo names it in its
# `Running ...` or `Doc-tests ...` line, less the hash: a binary built for `--test X` has
# another hash than the same test built by the unit run).
ignored_per_binary() {
  awk '
    /^ *Running / { bin = $0; sub(/^ *Running /, "", bin); sub(/-[0-9a-f]+\)$/, ")", bin); next }
    /^ *Doc-tests / { bin = $0; sub(/^ *Doc-tests /, "doc-tests ", bin); next }
    /^test result: / {
      n = 0
      for (i = 2; i <= NF; i++) if ($i ~ /^ignored/) n = $(i - 1)
      print bin "\t" n
    }' "$1"
}

# Fails, naming them, when binaries of a tier's run ignored tests (they must all run there).
no_ignored_in() {
  local bad
  bad=$(ignored_per_binary "$logs/$1.log" | awk -F'\t' '$2 > 0 { print "  " $1 ": " $2 " ignored" }')
  if [ -n "$bad" ]; then
    echo "run-all.sh: the $1 run ignored tests (every test of a tier must run; see $logs/$1.log):" >&2
    echo "$bad" >&2
    exit 1
  fi
}

# Fails, naming them, when the unit run ignored tests in a binary no tier ran.
ignored_ones_ran_in_a_tier() {
  local bad
  bad=$(ignored_per_binary "$logs/unit.log" | awk -F'\t' '$2 > 0 { print $1 "\t" $2 }' | while IFS=$'\t' read -r bin n; do
    grep -qxF "$bin" <(for t in root-tier root-tier-crates vm-tier; do ignored_per_binary "$logs/$t.log" | cut -f1; done) \
      || echo "  $bin: $n ignored"
  done)
  if [ -n "$bad" ]; then
    echo "run-all.sh: tests ignored by the unit run that no tier runs (see $logs/unit.log):" >&2
    echo "$bad" >&2
    exit 1
  fi
}

# The tiers, by integration test file of the tests crate: the VM tier is every tests/tests/vm_*.rs
# (a new one joins by its name), the root tier every other file there.
root_tests=()
vm_tests=()
for f in tests/tests/*.rs; do
  name=$(basename "$f" .rs)
  case $name in
    vm_*) vm_tests+=(--test "$name") ;;
    *) root_tests+=(--test "$name") ;;
  esac
done

# ---------------------------------------------------------------------------------------

begin setup
bash tests/setup.sh
end

begin build
# Everything the steps below run, so that their times are the tests' own. (No step needs this
# build: each test builds what it runs.)
cargo build --workspace --locked --bins
cargo test --workspace --locked --no-run
end

begin clippy
cargo clippy --workspace --all-targets --locked -- -D warnings
end

begin guest-image
echo "(Debian kernel, busybox, static vssd; cached in target/guest)"
bash tests/guest/build.sh --install
# --- The systemd guest (vm_systemd.rs): Debian 12 from debootstrap, cached in
# target/guest-debian by its inputs (the first build takes minutes, later ones seconds).
echo "(Debian 12 systemd guest: debootstrap from Debian's mirror; cached in target/guest-debian)"
command -v debootstrap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
    { echo "run-all.sh: cannot install debootstrap (apt-get install debootstrap) for the systemd guest" >&2; exit 1; }
}
sysguest_t0=$SECONDS
bash tests/guest/build-debian.sh ||
  { echo "run-all.sh: the systemd guest did not build (see above: is Debian's mirror reachable?)" >&2; exit 1; }
echo "(systemd guest: $((SECONDS - sysguest_t0)) s)"
# --- end of the systemd guest
end

# `--workspace` on every test step: the same feature resolution as the build step, so no step
# rebuilds what another built.
begin unit-tests
cargo_test unit --workspace --locked
end

# Fuzzing, bounded (the corpus replay, tests/tests/fuzz_corpus.rs, ran in unit-tests either
# way): each target for 18 s, with nightly and cargo-fuzz; says so when they are missing.
begin fuzz
fuzz_rc=0
bash tests/fuzz.sh --seconds 18 || fuzz_rc=$?
case $fuzz_rc in
  0) ;;
  3) echo "(fuzzing skipped: no nightly; the corpus replay ran in unit-tests)" ;;
  *) exit "$fuzz_rc" ;;
esac
end

begin root-tier
cargo_test root-tier --workspace --locked "${root_tests[@]}" -- --include-ignored
no_ignored_in root-tier
# The other crates' ignored tests (e.g. appvss's Python example): only those, here.
cargo_test root-tier-crates --workspace --exclude tests --locked --tests -- --ignored
no_ignored_in root-tier-crates
end

begin vm-tier
cargo_test vm-tier --workspace --locked "${vm_tests[@]}" -- --include-ignored
no_ignored_in vm-tier
ignored_ones_ran_in_a_tier
end

begin benchmarks
echo "(short runs; the full ones: ./target/release/freeze-bench, ./target/release/app-bench)"
cargo build --release --locked -p vssd -p tests --bins
cat target/release/deps/vssd-*.layout 2>/dev/null || echo "layout: no summary: vssd's code layout was not applied (ARCHITECTURE.md, Code layout)"
unshare -m --propagation private ./target/release/freeze-bench --counts 1,16 --cycles 5
unshare -m --propagation private ./target/release/app-bench --counts 1,100,1000 --cycles 3
cargo build --release --locked -p hostsim -p tests --bins
VSSD_BIN_DIR=target/release unshare -m --propagation private ./target/release/backup-bench --cycles 5
end

leftover=$(losetup -a | grep -c -e vssd -e /tmp/ || true)
if [ "$leftover" -gt 0 ]; then
  echo "run-all.sh: $leftover loop device(s) left attached by a test:" >&2; losetup -a >&2; exit 1
fi
if pgrep -a qemu-system | grep -q /tmp/vssd-vm- || ls -d /tmp/vssd-vm-* >/dev/null 2>&1; then
  echo "run-all.sh: a VM test left a QEMU or its directory behind:" >&2; pgrep -a qemu-system >&2; ls -d /tmp/vssd-vm-* >&2; exit 1
fi
echo "== all tests passed"
