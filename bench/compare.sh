#!/usr/bin/env bash
# bench/compare.sh - tessera (file backend) side by side with tgt and istgt, same client, same
# backing.
#
# For each backing it starts tgtd, istgt and a tessera gateway, each serving a 1 GiB LUN of
# random data from its own file of that kind:
#
#   tmpfs          files in /dev/shm (tessera uses plain syscalls there: io_uring punts tmpfs
#                  I/O to a kernel worker thread and is slower)
#   disk-direct    files on the project's disk, O_DIRECT (tgt bsoflags=direct, tessera
#                  direct = "on"; istgt has no O_DIRECT mode and goes through the page cache,
#                  so its disk-direct figures are not like for like)
#   disk-buffered  the same files through the page cache (tgt's and istgt's default,
#                  tessera direct = "off"), read into the cache before the first run
#   ec             tgt and istgt on files in /dev/shm; tessera serves an erasure-coded volume
#                  (`tessera demo --backend ec`, profile EC, default 4+2, 16 KiB chunks) whose
#                  node processes keep their stores in /dev/shm, filled with the same random
#                  data through iSCSI first. Nothing is pinned in these rows (neither the
#                  peers nor tessera's seven processes nor the client): in a cluster the
#                  nodes run on other machines, and squeezing them onto the one core a
#                  single-process peer gets would measure the scheduler, not the target.
#
# and runs, interleaved (tgt, istgt, tessera, tgt, ...) for ROUNDS rounds:
#
#   4k-randread-qd1    iscsi-perf -m 1  -b 8 -r     (client and target pinned to core 0)
#   4k-randread-qd32   iscsi-perf -m 32 -b 8 -r     (target on core 1, client on core 0)
#   4k-write-qd1       qemu-img bench -w -d 1  -s 4k, stride 4096*100003 (scattered), data 0xa5
#   4k-write-qd32      qemu-img bench -w -d 32 -s 4k, same stride
#   1m-seqread-qd8     qemu-img bench    -d 8 -s 1M
#   1m-seqwrite-qd8    qemu-img bench -w -d 8 -s 1M
#
# and prints two tables: the median of each, and the median CPU time the target's processes
# (all of tessera's for ec: gateway and nodes) spent per I/O (utime + stime from /proc, over
# the I/Os of that run), each with the tessera/peer ratios.
#
# TESSERA_BASE_BIN names another tessera binary (an earlier commit's, built elsewhere): it then
# runs as one more target, `base`, set up exactly like `tessera` (its own LUN file of the same
# bytes, its own port), and the tables get tessera/base ratios: a before/after comparison in
# one run, interleaved with the rest.
# Environment: ROUNDS (3), SECONDS_PER_RUN (5), BACKINGS ("tmpfs disk-direct disk-buffered ec"),
# PEERS ("tgt istgt"), EC ("4+2"), TESSERA_BIN, TESSERA_BASE_BIN.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${TESSERA_BIN:-$ROOT/target/release/tessera}
BASE_BIN=${TESSERA_BASE_BIN:-}
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
BACKINGS=${BACKINGS:-"tmpfs disk-direct disk-buffered ec"}
EC=${EC:-4+2}
WORK=$ROOT/build/bench
SHM=/dev/shm/tessera-bench
TGT_PORT=${TGT_PORT:-3290}
TSR_PORT=${TSR_PORT:-3291}
IST_PORT=${IST_PORT:-3292}
IST_UC_PORT=${IST_UC_PORT:-3293}
BASE_PORT=${BASE_PORT:-3294}
PEERS=${PEERS:-"tgt istgt"}
TGT_IQN=iqn.2024-01.io.tessera:bench-tgt
IST_IQN=iqn.2024-01.io.tessera:bench-istgt
TSR_IQN=iqn.2024-01.io.tessera:bench
SIZE_MB=1024
PIDS=()

say() { printf '[bench] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

for t in tgtd tgtadm istgt iscsi-perf qemu-img taskset; do
    command -v $t >/dev/null || die "$t missing (make deps installs it)"
done
[ -x "$BIN" ] || die "no tessera binary at $BIN (make build)"
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "no tessera binary at TESSERA_BASE_BIN=$BASE_BIN"
qemu-img --help | grep -qw iscsi || die "qemu-img lacks the iscsi driver (qemu-block-extra)"

stop_all() {
    # tgtd ignores SIGTERM while it has targets: ask it to shut down, then make sure.
    tgtadm -C 9 --op delete --mode system >/dev/null 2>&1 || true
    IST_PID=
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
rm -f "$WORK/source.img"
load=$(cut -d' ' -f1 /proc/loadavg)
say "load average before starting: $load"

# Every LUN compared holds the same bytes: one random image per run, copied.
SOURCE=$WORK/source.img
make_lun() { # path
    if [ ! -f "$SOURCE" ] || [ "$(stat -c %s "$SOURCE")" -ne $((SIZE_MB << 20)) ]; then
        say "writing $SIZE_MB MiB of random data to $SOURCE"
        head -c $((SIZE_MB << 20)) /dev/urandom > "$SOURCE"
    fi
    cmp -s "$SOURCE" "$1" 2>/dev/null && return 0
    say "copying the random image to $1"
    cp "$SOURCE" "$1"
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

start_istgt() { # backing-file
    cat > "$WORK/istgt.conf" <<EOF
[Global]
  NodeBase "iqn.2024-01.io.tessera"
  PidFile $WORK/istgt.pid
  AuthFile $WORK/istgt-auth.conf
  MediaDirectory $WORK
  LogFacility "local7"
  Timeout 30
  NopInInterval 20
  DiscoveryAuthMethod None
  MaxSessions 16
  MaxConnections 4
  MaxR2T 32
  MaxOutstandingR2T 16
  FirstBurstLength 262144
  MaxBurstLength 1048576
  MaxRecvDataSegmentLength 262144
  InitialR2T Yes
  ImmediateData Yes
  DataPDUInOrder Yes
  DataSequenceInOrder Yes
  ErrorRecoveryLevel 0
[UnitControl]
  AuthMethod None
  Portal UC1 127.0.0.1:$IST_UC_PORT
  Netmask 127.0.0.1
[PortalGroup1]
  Portal DA1 127.0.0.1:$IST_PORT
[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 127.0.0.1
[LogicalUnit1]
  TargetName bench-istgt
  Mapping PortalGroup1 InitiatorGroup1
  AuthMethod None
  UseDigest Auto
  UnitType Disk
  QueueDepth 32
  LUN0 Storage $1 Auto
EOF
    : > "$WORK/istgt-auth.conf"
    istgt -c "$WORK/istgt.conf" -D >"$WORK/istgt.log" 2>&1 &
    IST_PID=$!
    PIDS+=("$IST_PID")
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$IST_PORT) 2>/dev/null && break; sleep 0.1; done
}

start_tessera() { # backing-file direct-mode binary port name
    local bin=$3 port=$4 name=$5
    cat > "$WORK/$name.toml" <<EOF
[gateway]
portals = ["127.0.0.1:$port"]
state_dir = "$WORK/state-$name"
[[target]]
iqn = "$TSR_IQN"
[[target.lun]]
id = 0
backend = "file"
path = "$1"
block_size = 512
direct = "$2"
EOF
    RUST_LOG=warn "$bin" gateway --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    TSR_PID=$!
    PIDS+=("$TSR_PID")
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
}

start_tessera_ec() { # source-image binary port name: sets TSR_PID (all pids) and TSR_URL
    local bin=$2 port=$3 name=$4
    local d=$SHM/ec-$name
    rm -rf "$d"
    mkdir -p "$d"
    RUST_LOG=warn "$bin" demo --dir "$d" --portal 127.0.0.1:$port --backend ec --ec "$EC" \
        --size ${SIZE_MB}MiB >"$WORK/$name-ec.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 300); do
        [ -f "$d/demo.json" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
        sleep 0.1
    done
    [ -f "$d/demo.json" ] || die "tessera demo --backend ec did not start (see $WORK/$name-ec.log)"
    TSR_PID=$(python3 -c 'import json,sys; print(" ".join(str(p["pid"]) for p in json.load(open(sys.argv[1]))["processes"]))' "$d/demo.json")
    # shellcheck disable=SC2206
    PIDS+=($TSR_PID)
    local iqn
    iqn=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["iqn"])' "$d/demo.json")
    TSR_URL=iscsi://127.0.0.1:$port/$iqn/0
    say "filling the $name ec volume ($EC, processes $TSR_PID) with $SIZE_MB MiB of random data"
    qemu-img convert -n -f raw -O raw "$1" "$TSR_URL"
}

# PINNED=1: targets and client pinned as described above; 0 (the ec rows): nothing pinned.
PINNED=1
pin() { # "pid..." cpu
    local p
    [ "$PINNED" = 1 ] || return 0
    for p in $1; do taskset -a -p -c "$2" "$p" >/dev/null; done
}
client() { # command...: the load generator, on core 0 when pinned
    if [ "$PINNED" = 1 ]; then taskset -c 0 "$@"; else "$@"; fi
}

# One measurement: prints "value unit".
measure() { # workload url target-pid
    local w=$1 url=$2 pid=$3 out
    case $w in
        4k-randread-qd1)
            pin "$pid" 0
            out=$(client iscsi-perf -m 1 -b 8 -r -t "$SECS" "$url" 2>&1 | tr '\r' '\n')
            echo "$out" | awk -v s="$SECS" '/iops average/ {v=$3} END {print v, "IOPS", v*s}' ;;
        4k-randread-qd32)
            pin "$pid" 1
            out=$(client iscsi-perf -m 32 -b 8 -r -t "$SECS" "$url" 2>&1 | tr '\r' '\n')
            echo "$out" | awk -v s="$SECS" '/iops average/ {v=$3} END {print v, "IOPS", v*s}' ;;
        4k-write-qd1|4k-write-qd32)
            local d=1 c=20000 cpu=0
            [ "$w" = 4k-write-qd32 ] && { d=32; c=100000; cpu=1; }
            pin "$pid" $cpu
            out=$(client qemu-img bench -f raw -w --pattern=165 -c $c -d $d -s 4096 -S 409612288 "$url" 2>&1)
            echo "$out" | awk -v c=$c '/Run completed in/ {printf "%.0f IOPS %d\n", c/$4, c}' ;;
        1m-seqread-qd8|1m-seqwrite-qd8)
            local wflag="" c=3000
            [ "$w" = 1m-seqwrite-qd8 ] && wflag=-w
            pin "$pid" 1
            out=$(client qemu-img bench -f raw $wflag --pattern=165 -c $c -d 8 -s 1048576 "$url" 2>&1)
            echo "$out" | awk -v c=$c '/Run completed in/ {printf "%.0f MB/s %d\n", c*1.048576/$4, c}' ;;
    esac
}

# CPU time (clock ticks, user + system, every thread) the processes have used so far.
ticks() { # "pid..."
    local p t=0
    for p in $1; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the command name's ')'.
        t=$((t + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
HZ=$(getconf CLK_TCK)

# One measurement with its CPU cost: prints "value unit cpu-microseconds-per-I/O".
measure_cpu() { # workload url target-pids
    local before after v unit ops
    before=$(ticks "$3")
    read -r v unit ops < <(measure "$1" "$2" "$3")
    after=$(ticks "$3")
    echo "$v $unit $(awk -v d=$((after - before)) -v hz="$HZ" -v n="${ops:-0}" \
        'BEGIN { if (n > 0) printf "%.1f", d * 1e6 / hz / n; else print 0 }')"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

WORKLOADS="4k-randread-qd1 4k-randread-qd32 4k-write-qd1 4k-write-qd32 1m-seqread-qd8 1m-seqwrite-qd8"
TARGETS="$PEERS tessera"
[ -n "$BASE_BIN" ] && TARGETS="$TARGETS base"
# The targets tessera's figures are divided by.
VERSUS="$PEERS"
[ -n "$BASE_BIN" ] && VERSUS="$VERSUS base"
RESULTS=()
CPU_RESULTS=()
declare -A URL=() PID=() VALS=() CPUS=() M=()
for backing in $BACKINGS; do
    case $backing in
        tmpfs) dir=$SHM; tgt_flags=""; tsr_direct=auto ;;
        disk-direct) dir=$WORK; tgt_flags=direct; tsr_direct=on ;;
        disk-buffered) dir=$WORK; tgt_flags=""; tsr_direct=off ;;
        ec) dir=$SHM; tgt_flags=""; tsr_direct=ec ;;
        *) die "unknown backing $backing" ;;
    esac
    PINNED=1
    [ "$backing" = ec ] && PINNED=0
    for t in $TARGETS; do
        make_lun "$dir/$t.img"
        # Buffered rows start with every LUN in the page cache, so no target pays for
        # another's cold start.
        [ "$backing" = disk-buffered ] && cat "$dir/$t.img" >/dev/null
        case $t in
            tgt) start_tgt "$dir/tgt.img" "$tgt_flags"
                 URL[tgt]=iscsi://127.0.0.1:$TGT_PORT/$TGT_IQN/1; PID[tgt]=$TGT_PID ;;
            istgt) start_istgt "$dir/istgt.img"
                 URL[istgt]=iscsi://127.0.0.1:$IST_PORT/$IST_IQN/0; PID[istgt]=$IST_PID ;;
            tessera|base)
                bin=$BIN port=$TSR_PORT
                [ "$t" = base ] && { bin=$BASE_BIN; port=$BASE_PORT; }
                if [ "$tsr_direct" = ec ]; then
                    start_tessera_ec "$dir/$t.img" "$bin" "$port" "$t"
                    URL[$t]=$TSR_URL
                else
                    start_tessera "$dir/$t.img" "$tsr_direct" "$bin" "$port" "$t"
                    URL[$t]=iscsi://127.0.0.1:$port/$TSR_IQN/0
                fi
                PID[$t]=$TSR_PID ;;
            *) die "unknown peer $t" ;;
        esac
    done
    for w in $WORKLOADS; do
        VALS=()
        CPUS=()
        unit=""
        for r in $(seq "$ROUNDS"); do
            line="$backing $w round $r:"
            for t in $TARGETS; do
                read -r v unit cpu < <(measure_cpu "$w" "${URL[$t]}" "${PID[$t]}")
                VALS[$t]="${VALS[$t]:-} $v"
                CPUS[$t]="${CPUS[$t]:-} $cpu"
                line="$line $t $v ($cpu us CPU/IO)"
            done
            say "$line $unit"
        done
        row="$w|$backing|$unit"
        cpu_row="$w|$backing|us/IO"
        for t in $TARGETS; do
            # shellcheck disable=SC2086
            row="$row|$(printf '%s\n' ${VALS[$t]} | median)"
            # shellcheck disable=SC2086
            cpu_row="$cpu_row|$(printf '%s\n' ${CPUS[$t]} | median)"
        done
        RESULTS+=("$row")
        CPU_RESULTS+=("$cpu_row")
    done
    stop_all
done

ratio() { awk -v s="$1" -v t="$2" 'BEGIN { if (t > 0) printf "%.2f", s/t; else print "n/a" }'; }
table() { # title rows...
    local title=$1 header="| workload | backing | unit |" rule="|---|---|---|" row t p i line
    shift
    for t in $TARGETS; do header="$header $t |"; rule="$rule---:|"; done
    for p in $VERSUS; do header="$header tessera/$p |"; rule="$rule---:|"; done
    printf '\n%s\n\n%s\n%s\n' "$title" "$header" "$rule"
    for row in "$@"; do
        IFS='|' read -r -a f <<<"$row"
        M=()
        i=3
        for t in $TARGETS; do M[$t]=${f[$i]}; i=$((i + 1)); done
        line="| ${f[0]} | ${f[1]} | ${f[2]} |"
        for t in $TARGETS; do line="$line ${M[$t]} |"; done
        for p in $VERSUS; do line="$line $(ratio "${M[tessera]}" "${M[$p]}") |"; done
        printf '%s\n' "$line"
    done
}
table "Throughput (medians; higher is better)" "${RESULTS[@]}"
table "CPU time per I/O, all of the target's processes (medians; lower is better)" "${CPU_RESULTS[@]}"
printf '\n%s rounds, medians; %s s per iscsi-perf run; load average at start %s\n' "$ROUNDS" "$SECS" "$load"
