#!/usr/bin/env bash
# Run every fuzz target of tessera-proto for N seconds (default 20) from the committed seed
# corpus and print libFuzzer's summary line for each. New inputs go to a temporary directory,
# so the committed corpus stays as it is; a crash leaves its input in artifacts/<target>/ and
# fails the run.
#
#   src/proto/fuzz/smoke.sh [seconds]
#
# Needs cargo-fuzz (installed here when missing) and a nightly compiler, or the stable one with
# RUSTC_BOOTSTRAP=1 (set here) for the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# -a: debug assertions (integer overflow checks) on, as in the unit tests.
cargo fuzz build -a
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for t in $(cargo fuzz list); do
  mkdir -p "$tmp/$t"
  log="$tmp/$t.log"
  if cargo fuzz run -a "$t" "$tmp/$t" "corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -n1 || true)
    echo "$t: ${line:-finished without a summary line}"
  else
    status=1
    echo "$t: FAILED"
    tail -n 60 "$log"
  fi
done
exit "$status"
