# iscsi-two-paths: the Linux kernel initiator with two sessions to one tessera cluster
# target, one through each of two gateways (the second portal is the first --forward,
# 10.0.2.101:3260 in the guest). The host makes the gateway behind $PORTAL the volume's owner
# and the other one a forwarder.
#   1. write through the forwarding gateway, read back identical through the owner; and the
#      other way round;
#   2. write through the owner, chunk by chunk (O_DIRECT, each dd's success is an
#      acknowledgement); after a few chunks print the marker line TWO-PATHS-KILL-OWNER, on
#      which the host kills the owner gateway; when a write through the owner fails, carry on
#      through the other session (retrying while the takeover is in progress), then verify
#      everything written, phase 1 included, through the surviving session.
# Kept in the tessera repository and passed to run-guest.sh with --test-dir.
. /harness/lib.sh
. /harness/params.sh
. /harness/iscsi.sh

[ -n "$GUEST_FORWARDS" ] || fail "needs --forward A:P=HP for the second gateway's portal"
PORTAL_B=${GUEST_FORWARDS%%=*}
PORTAL_B=${PORTAL_B%% *}
CHUNK_KB=256
CHUNKS=48
# Phase 2 writes from this chunk on (8 MiB into the LUN).
BASE=32

# all_disks: every disk-type LUN of every session, one sdX a line
all_disks() {
    for _d in /sys/class/iscsi_session/session*/device/target*/*:*:*:*; do
        [ -e "$_d/type" ] && [ "$(cat "$_d/type")" = 0 ] || continue
        [ -z "$ISCSI_LUN" ] || [ "${_d##*:}" = "$ISCSI_LUN" ] || continue
        for _b in "$_d"/block/*; do
            [ -e "$_b" ] && [ -b "/dev/${_b##*/}" ] && echo "${_b##*/}"
        done
    done
}

md5() { md5sum | cut -d' ' -f1; }

# readback DEV I: chunk I of phase 2 from DEV into /tmp/rb; fails unless all of it was read
readback() {
    dd if="$1" of=/tmp/rb bs=${CHUNK_KB}k skip=$((BASE + $2)) count=1 iflag=direct 2>/dev/null &&
        [ "$(wc -c < /tmp/rb)" -eq $((CHUNK_KB * 1024)) ]
}

# fail_over_or_retry WHAT WHATS: after WHAT of chunk $i failed through $dev: through the
# owner ($A), carry on through $B; through $B (the takeover in progress), try again a second
# later, 90 tries at most
fail_over_or_retry() {
    if [ "$dev" = "$A" ]; then
        log "chunk $i: $1 through the owner ($A) failed: carrying on through $B"
        dev=$B
    else
        tries=$((tries + 1))
        [ $tries -lt 90 ] || fail "chunk $i: $2 through $B still fail after $tries tries"
        sleep 1
    fi
}

iscsi_start
iscsi_discover
iscsi_node
run iscsiadm -m node -o new -T "$ISCSI_IQN" -p "$PORTAL_B" >/dev/null || fail "iscsiadm -o new ($PORTAL_B) failed"
run iscsiadm -m node -T "$ISCSI_IQN" -p "$PORTAL" --login || fail "login through $PORTAL failed"
wait_for 30 '[ -n "$(all_disks)" ]' || fail "no disk after the first login"
A=/dev/$(all_disks | head -n1)
run iscsiadm -m node -T "$ISCSI_IQN" -p "$PORTAL_B" --login || fail "login through $PORTAL_B failed"
wait_for 30 '[ "$(all_disks | wc -l)" -ge 2 ]' || fail "no second disk after the second login"
B=/dev/$(all_disks | grep -v "^${A#/dev/}\$" | head -n1)
log "owner path $A ($PORTAL), other path $B ($PORTAL_B)"
[ "$(cat /sys/block/${A#/dev/}/size)" = "$(cat /sys/block/${B#/dev/}/size)" ] || fail "the two paths differ in size"

# 1. Through one gateway, back through the other.
dd if=/dev/urandom of=/tmp/p1 bs=1M count=4 2>/dev/null
dd if=/tmp/p1 of="$B" bs=1M oflag=direct conv=notrunc 2>/dev/null || fail "write through $B (forwarded) failed"
[ "$(dd if="$A" bs=1M count=4 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/p1)" ] ||
    fail "data written through the forwarding gateway reads back different through the owner"
dd if=/dev/urandom of=/tmp/q1 bs=1M count=4 2>/dev/null
dd if=/tmp/q1 of="$A" bs=1M seek=4 oflag=direct conv=notrunc 2>/dev/null || fail "write through $A failed"
[ "$(dd if="$B" bs=1M skip=4 count=4 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/q1)" ] ||
    fail "data written through the owner reads back different through the forwarding gateway"
log "phase 1: 4 MiB each way, identical through both gateways"

# 2. Writing through the owner while it is killed.
dd if=/dev/urandom of=/tmp/p2 bs=${CHUNK_KB}k count=$CHUNKS 2>/dev/null
dev=$A
i=0
tries=0
marked=0
while [ $i -lt $CHUNKS ]; do
    if dd if=/tmp/p2 of="$dev" bs=${CHUNK_KB}k skip=$i seek=$((BASE + i)) count=1 oflag=direct conv=notrunc 2>/dev/null; then
        # Acknowledged: it must read back at once (through the other path if the owner
        # died in between).
        until readback "$dev" $i; do
            fail_over_or_retry "reading back" reads
        done
        [ "$(md5 < /tmp/rb)" = "$(dd if=/tmp/p2 bs=${CHUNK_KB}k skip=$i count=1 2>/dev/null | md5)" ] ||
            fail "acknowledged chunk $i reads back different through $dev"
        i=$((i + 1))
        tries=0
        if [ $i -eq 8 ] && [ $marked -eq 0 ]; then
            marked=1
            log "TWO-PATHS-KILL-OWNER"
            # Give the host a moment to act before the owner is asked for more.
            sleep 2
        fi
    else
        fail_over_or_retry "the write" writes
    fi
done
[ "$dev" = "$B" ] || fail "every write through the owner succeeded: it was never killed"
[ "$(dd if="$B" bs=${CHUNK_KB}k skip=$BASE count=$CHUNKS iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/p2)" ] ||
    fail "phase 2 data differs through the surviving gateway"
[ "$(dd if="$B" bs=1M count=4 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/p1)" ] &&
[ "$(dd if="$B" bs=1M skip=4 count=4 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/q1)" ] ||
    fail "phase 1 data differs through the surviving gateway after the failover"
log "phase 2: $CHUNKS chunks of $CHUNK_KB KiB acknowledged across the failover, all identical"
run iscsiadm -m node -T "$ISCSI_IQN" -p "$PORTAL_B" --logout >/dev/null 2>&1
log "iscsi-two-paths OK"
