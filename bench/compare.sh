#!/usr/bin/env bash
# bench/compare.sh - tessera (file backend) side by side with tgt, same client, same backing.
#
# For each backing it starts tgtd and a tessera gateway, each serving a 1 GiB LUN of random
# data from its own file of that kind:
#
#   tmpfs          files in /dev/shm (tessera uses plain syscalls there: io_uring punts tmpfs
#                  I/O to a kernel worker thread and is slower)
#   disk-direct    files on the project's disk, O_DIRECT on both sides (tgt bsoflags=direct,
#                  tessera direct = "on"): what the device does
#   disk-buffered  the same files through the page cache on both sides (tgt's default,
#                  tessera direct = "off")
#
# and runs,
# interleaved (tgt, tessera, tgt, tessera, ...) for ROUNDS rounds:
#
#   4k-randread-qd1    iscsi-perf -m 1  -b 8 -r     (client and target pinned to core 0)
#   4k-randread-qd32   iscsi-perf -m 32 -b 8 -r     (target on core 1, client on core 0)
#   4k-write-qd1       qemu-img bench -w -d 1  -s 4k, stride 4096*100003 (scattered)
#   4k-write-qd32      qemu-img bench -w -d 32 -s 4k, same stride
#   1m-seqread-qd8     qemu-img bench    -d 8 -s 1M
#   1m-seqwrite-qd8    qemu-img bench -w -d 8 -s 1M
#
# and prints one table: the median of each, and the tessera/tgt ratio.
# Environment: ROUNDS (3), SECONDS_PER_RUN (5), BACKINGS ("tmpfs disk-direct disk-buffered"),
# TESSERA_BIN.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${TESSERA_BIN:-$ROOT/target/release/tessera}
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
BACKINGS=${BACKINGS:-"tmpfs disk-direct disk-buffered"}
WORK=$ROOT/build/bench
SHM=/dev/shm/tessera-bench
TGT_PORT=${TGT_PORT:-3290}
TSR_PORT=${TSR_PORT:-3291}
TGT_IQN=iqn.2024-01.io.tessera:bench-tgt
TSR_IQN=iqn.2024-01.io.tessera:bench
SIZE_MB=1024
PIDS=()

say() { printf '[bench] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

for t in tgtd tgtadm iscsi-perf qemu-img taskset; do
    command -v $t >/dev/null || die "$t missing (make deps installs it)"
done
[ -x "$BIN" ] || die "no tessera binary at $BIN (make build)"
qemu-img --help | grep -qw iscsi || die "qemu-img lacks the iscsi driver (qemu-block-extra)"

stop_all() {
    # tgtd ignores SIGTERM while it has targets: ask it to shut down, then make sure.
    tgtadm -C 9 --op delete --mode system >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
}

cleanup() {
    stop_all
    rm -rf "$SHM"
}
trap cleanup EXIT

mkdir -p "$WORK" "$SHM"
load=$(cut -d' ' -f1 /proc/loadavg)
say "load average before starting: $load"

make_lun() { # path
    [ -f "$1" ] && [ "$(stat -c %s "$1")" -eq $((SIZE_MB << 20)) ] && return 0
    say "writing $SIZE_MB MiB of random data to $1"
    head -c $((SIZE_MB << 20)) /dev/urandom > "$1"
}

start_tgt() { # backing-file [bsoflags]
    tgtd --iscsi portal=127.0.0.1:$TGT_PORT -C 9 -f >"$WORK/tgtd.log" 2>&1 &
    TGT_PID=$!
    PIDS+=("$TGT_PID")
    for _ in $(seq 50); do tgtadm -C 9 --mode sys --op show >/dev/null 2>&1 && break; sleep 0.1; done
    tgtadm -C 9 --lld iscsi --op new --mode target --tid 1 -T $TGT_IQN
    tgtadm -C 9 --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$1" --blocksize 512 \
        ${2:+--bsoflags "$2"}
    tgtadm -C 9 --lld iscsi --op bind --mode target --tid 1 -I ALL
}

start_tessera() { # backing-file direct-mode
    cat > "$WORK/gateway.toml" <<EOF
[gateway]
portals = ["127.0.0.1:$TSR_PORT"]
state_dir = "$WORK/state"
[[target]]
iqn = "$TSR_IQN"
[[target.lun]]
id = 0
backend = "file"
path = "$1"
block_size = 512
direct = "$2"
EOF
    RUST_LOG=warn "$BIN" gateway --config "$WORK/gateway.toml" >"$WORK/tessera.log" 2>&1 &
    TSR_PID=$!
    PIDS+=("$TSR_PID")
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$TSR_PORT) 2>/dev/null && break; sleep 0.1; done
}

pin() { # pid cpu
    taskset -a -p -c "$2" "$1" >/dev/null
}

# One measurement: prints "value unit".
measure() { # workload url target-pid
    local w=$1 url=$2 pid=$3 out
    case $w in
        4k-randread-qd1)
            pin "$pid" 0
            out=$(taskset -c 0 iscsi-perf -m 1 -b 8 -r -t "$SECS" "$url" 2>&1 | tr '\r' '\n')
            echo "$out" | awk '/iops average/ {v=$3} END {print v, "IOPS"}' ;;
        4k-randread-qd32)
            pin "$pid" 1
            out=$(taskset -c 0 iscsi-perf -m 32 -b 8 -r -t "$SECS" "$url" 2>&1 | tr '\r' '\n')
            echo "$out" | awk '/iops average/ {v=$3} END {print v, "IOPS"}' ;;
        4k-write-qd1|4k-write-qd32)
            local d=1 c=20000 cpu=0
            [ "$w" = 4k-write-qd32 ] && { d=32; c=100000; cpu=1; }
            pin "$pid" $cpu
            out=$(taskset -c 0 qemu-img bench -f raw -w -c $c -d $d -s 4096 -S 409612288 "$url" 2>&1)
            echo "$out" | awk -v c=$c '/Run completed in/ {printf "%.0f IOPS\n", c/$4}' ;;
        1m-seqread-qd8|1m-seqwrite-qd8)
            local wflag="" c=3000
            [ "$w" = 1m-seqwrite-qd8 ] && wflag=-w
            pin "$pid" 1
            out=$(taskset -c 0 qemu-img bench -f raw $wflag -c $c -d 8 -s 1048576 "$url" 2>&1)
            echo "$out" | awk -v c=$c '/Run completed in/ {printf "%.0f MB/s\n", c*1.048576/$4}' ;;
    esac
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

WORKLOADS="4k-randread-qd1 4k-randread-qd32 4k-write-qd1 4k-write-qd32 1m-seqread-qd8 1m-seqwrite-qd8"
RESULTS=()
for backing in $BACKINGS; do
    case $backing in
        tmpfs) dir=$SHM; tgt_flags=""; tsr_direct=auto ;;
        disk-direct) dir=$WORK; tgt_flags=direct; tsr_direct=on ;;
        disk-buffered) dir=$WORK; tgt_flags=""; tsr_direct=off ;;
        *) die "unknown backing $backing" ;;
    esac
    make_lun "$dir/tgt.img"
    make_lun "$dir/tessera.img"
    start_tgt "$dir/tgt.img" "$tgt_flags"
    start_tessera "$dir/tessera.img" "$tsr_direct"
    TGT_URL=iscsi://127.0.0.1:$TGT_PORT/$TGT_IQN/1
    TSR_URL=iscsi://127.0.0.1:$TSR_PORT/$TSR_IQN/0
    for w in $WORKLOADS; do
        tv=(); sv=(); unit=""
        for r in $(seq "$ROUNDS"); do
            read -r v unit < <(measure "$w" "$TGT_URL" "$TGT_PID"); tv+=("$v")
            read -r v unit < <(measure "$w" "$TSR_URL" "$TSR_PID"); sv+=("$v")
            say "$backing $w round $r: tgt ${tv[-1]} tessera ${sv[-1]} $unit"
        done
        tm=$(printf '%s\n' "${tv[@]}" | median)
        sm=$(printf '%s\n' "${sv[@]}" | median)
        RESULTS+=("$w|$backing|$tm|$sm|$unit")
    done
    stop_all
done

printf '\n| workload | backing | tgt | tessera | unit | tessera/tgt |\n'
printf '|---|---|---:|---:|---|---:|\n'
for row in "${RESULTS[@]}"; do
    IFS='|' read -r w b t s u <<<"$row"
    ratio=$(awk -v s="$s" -v t="$t" 'BEGIN { if (t > 0) printf "%.2f", s/t; else print "n/a" }')
    printf '| %s | %s | %s | %s | %s | %s |\n' "$w" "$b" "$t" "$s" "$u" "$ratio"
done
printf '\n%s rounds, medians; %s s per iscsi-perf run; load average at start %s\n' "$ROUNDS" "$SECS" "$load"
