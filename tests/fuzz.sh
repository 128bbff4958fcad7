#!/usr/bin/env bash
# Fuzzes every target (or the ones named) for a bounded time each, with cargo-fuzz (nightly).
#   tests/fuzz.sh [--seconds N] [--jobs J] [TARGET...]      (default: 18 s each, all targets)
# The committed corpus (fuzz/corpus/TARGET) is read, never written: what the fuzzer finds
# goes to target/fuzz/corpus/TARGET, crashes to target/fuzz/artifacts/TARGET/. The build is
# cached in target/fuzz. Exit 1 when a target crashed (its input is named), 3 when nightly
# or cargo-fuzz is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=18
jobs=1
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzzing skipped: no nightly (rustup toolchain install nightly)"; exit 3
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzzing skipped: no cargo-fuzz (cargo install cargo-fuzz --locked)"; exit 3
fi
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

# No sanitizer: the code is safe Rust (kmod-shim's unsafe is ioctls the targets never reach);
# debug assertions on, so an overflow is a crash.
flags=(-s none -a --target-dir target/fuzz)
cargo +nightly fuzz build "${flags[@]}"

jobargs=()
[ "$jobs" -le 1 ] || jobargs=(-j "$jobs")
failed=()
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz/corpus/$t" "target/fuzz/artifacts/$t"
  log="target/fuzz/$t.log"
  if cargo +nightly fuzz run "${flags[@]}" "${jobargs[@]}" "$t" "target/fuzz/corpus/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -artifact_prefix="target/fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    printf '  %-22s ok   %9s runs in %ss, coverage %s\n' "$t" "$runs" "$seconds" "${cov:-?}"
  else
    printf '  %-22s CRASH  (log %s; input in target/fuzz/artifacts/%s/)\n' "$t" "$log" "$t"
    grep -m3 -e 'panicked at' -e 'SUMMARY' "$log" | sed 's/^/      /' || true
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashes in ${failed[*]}: reproduce with cargo +nightly fuzz run ${flags[*]} TARGET INPUT;" \
    "copy the input to fuzz/corpus/TARGET/regress-NAME and fix it" >&2
  exit 1
fi
