#!/usr/bin/env bash
# bench/codec.sh - Reed-Solomon codec throughput on one core, one table.
#
# Builds bench/codec twice (its own workspace, so features do not unify with tessera's):
# once with reed-solomon-erasure in pure Rust, once with its `simd-accel` backend plus
# reed-solomon-simd and ISA-L (Debian's libisal-dev). Checks that both reed-solomon-erasure
# builds computed the same parity bytes, then prints the rows of both runs as one table.
# Environment: EC ("4+2"), CODEC_SECONDS (0.5 per cell).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EC=${EC:-4+2}
SECS=${CODEC_SECONDS:-0.5}
MANIFEST=$HERE/codec/Cargo.toml
BIN=$HERE/codec/target/release/tessera-codec-bench
# Debian's libisal.pc names /usr/include, which pkg-config drops unless told not to; bindgen
# needs it to find isa-l.h.
export PKG_CONFIG_ALLOW_SYSTEM_CFLAGS=1

cargo build -q --release --locked --manifest-path "$MANIFEST"
pure=$(taskset -c 1 "$BIN" --header --ec "$EC" --seconds "$SECS")
cargo build -q --release --locked --manifest-path "$MANIFEST" --features simd,others
fast=$(taskset -c 1 "$BIN" --ec "$EC" --seconds "$SECS")

crc() { awk -F'|' '/reed-solomon-erasure/ && /encode/ {gsub(/ /, "", $9); print $9}'; }
a=$(crc <<<"$pure")
b=$(crc <<<"$fast")
printf '\n%s\n%s\n\n' "$pure" "$fast"
if [ -n "$a" ] && [ "$a" = "$b" ]; then
    echo "reed-solomon-erasure pure Rust and simd-accel computed identical parity (crc32c $a)"
else
    echo "reed-solomon-erasure builds disagree on parity: '$a' vs '$b'" >&2
    exit 1
fi
