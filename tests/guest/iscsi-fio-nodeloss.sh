# iscsi-fio-nodeloss: fio's verified random writes on an erasure-coded LUN while two of its
# nodes die. The host runs a 4+2 volume on eight nodes (two spares) and kills two nodes when
# this test prints the marker line NODELOSS-KILL-TWO.
#   1. fio writes and verifies the first 8 MiB (crc32c in every 4 KiB block);
#   2. fio writes $TEST_SIZE_MB MiB after it (random 4 KiB blocks, O_DIRECT, QD 16); a
#      second into it the marker is printed; fio must still be writing a few seconds later
#      (else the test proves nothing and fails), and must end without an I/O error, then
#      verify everything it wrote;
#   3. the first 8 MiB verify again.
# Kept in the tessera repository and passed to run-guest.sh with --test-dir.
. /harness/lib.sh
. /harness/params.sh
. /harness/iscsi.sh

command -v fio >/dev/null || fail "fio missing (build-guest.sh with GUEST_WITH_FIO=1)"
iscsi_start
iscsi_node
iscsi_login

FIO="fio --filename=$DISK --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --verify=crc32c --verify_fatal=1 --output-format=terse"

run $FIO --name=before --randrepeat=1 --rw=randwrite --offset=0 --size=8M --do_verify=1 >/tmp/before.out 2>&1 ||
    { cat /tmp/before.out; fail "fio (before) reported an error"; }
log "phase 1: 8 MiB written and verified"

$FIO --name=during --randrepeat=0 --rw=randwrite --offset=8M --size="${TEST_SIZE_MB}M" --do_verify=1 \
    >/tmp/during.out 2>&1 &
pid=$!
sleep 1
kill -0 $pid 2>/dev/null || { cat /tmp/during.out; fail "fio (during) ended at once"; }
echo NODELOSS-KILL-TWO
sleep 4
kill -0 $pid 2>/dev/null ||
    { cat /tmp/during.out; fail "fio had finished 4 s after the marker: make --size-mb larger"; }
log "phase 2: fio still writing 4 s after the nodes were killed"
wait $pid || { cat /tmp/during.out; fail "fio (during) reported an error"; }
log "phase 2: ${TEST_SIZE_MB} MiB written across the loss of two nodes and verified"

run $FIO --name=before --randrepeat=1 --rw=randwrite --offset=0 --size=8M --verify_only >/tmp/after.out 2>&1 ||
    { cat /tmp/after.out; fail "the first 8 MiB no longer verify"; }
log "phase 3: the first 8 MiB verify again"
iscsi_logout
log "iscsi-fio-nodeloss OK"
