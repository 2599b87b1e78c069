//! Block commands: READ/WRITE family, residual rules, VERIFY, WRITE AND VERIFY,
//! COMPARE AND WRITE (incl. atomicity), WRITE SAME, UNMAP, GET LBA STATUS, SYNCHRONIZE
//! CACHE, PRE-FETCH, READ CAPACITY, backend errors, removable media.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tessera_proto::block::BlockError;
use tessera_proto::scsi::provision::unmap_list;

use super::*;
use crate::LuConfig;

const ILLEGAL: u8 = 0x5;

#[tokio::test(flavor = "current_thread")]
async fn write_then_read_back_through_every_cdb_size() {
    let (lu, n) = setup_fresh().await;
    write_blocks(&lu, &n, 10, &blocks(2, 0xAB)).await;
    let r = run(&lu, &n, &rw16(READ16, 10, 2, 0), &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 1024);
    assert_eq!(r.transfer_len, 1024);
    assert!(r.data_in.iter().all(|&b| b == 0xAB));
    let r = run(&lu, &n, &rw12(0xA8, 11, 1, 0), &[]).await;
    assert_good(&r);
    assert!(r.data_in.iter().all(|&b| b == 0xAB));
    // READ(6) with transfer length 0 means 256 blocks.
    let r = run(&lu, &n, &[0x08, 0, 0, 10, 0, 0], &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 256 * 512);
    // WRITE(6), WRITE(12), WRITE(16).
    assert_good(&run(&lu, &n, &[0x0A, 0, 0, 20, 1, 0], &blocks(1, 1)).await);
    assert_good(&run(&lu, &n, &rw12(0xAA, 21, 1, 0), &blocks(1, 2)).await);
    assert_good(&run(&lu, &n, &rw16(WRITE16, 22, 1, 0), &blocks(1, 3)).await);
    let back = read_blocks(&lu, &n, 20, 3).await;
    assert_eq!(
        &back[..],
        &[blocks(1, 1), blocks(1, 2), blocks(1, 3)].concat()[..]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn zero_blocks_is_good_without_data() {
    let (lu, n) = setup_fresh().await;
    let r = run(&lu, &n, &rw10(READ10, 0, 0, 0), &[]).await;
    assert_good(&r);
    assert!(r.data_in.is_empty());
    assert_eq!(r.transfer_len, 0);
    assert_good(&run(&lu, &n, &rw10(WRITE10, 2048, 0, 0), &[]).await);
    // Zero blocks past the end is still out of range.
    assert_illegal(&lu, &n, &rw10(READ10, 2049, 0, 0), &[], 0x21).await;
}

#[tokio::test(flavor = "current_thread")]
async fn beyond_end_of_medium_is_lba_out_of_range() {
    let (lu, n) = setup_fresh().await;
    for (lba, count) in [(2047u64, 2u32), (2048, 1), (1 << 63, 1), (u64::MAX, 1)] {
        assert_illegal(&lu, &n, &rw16(READ16, lba, count, 0), &[], 0x21).await;
        assert_check(
            &run(
                &lu,
                &n,
                &rw16(WRITE16, lba, count, 0),
                &blocks(count as usize, 0),
            )
            .await,
            ILLEGAL,
            0x21,
            0,
        );
    }
    assert_illegal(&lu, &n, &rw10(READ10, u32::MAX, 1, 0), &[], 0x21).await;
}

#[tokio::test(flavor = "current_thread")]
async fn rdprotect_and_wrprotect_are_invalid_fields() {
    let (lu, n) = setup_fresh().await;
    for p in 1..8u8 {
        let r = run(&lu, &n, &rw10(READ10, 0, 1, p << 5), &[]).await;
        assert_check(&r, ILLEGAL, 0x24, 0);
        assert_eq!(sks(&r), [0xCF, 0, 1]);
        assert_illegal(&lu, &n, &rw16(WRITE16, 0, 1, p << 5), &blocks(1, 0), 0x24).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn dpo_is_accepted_and_fua_reaches_the_device() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    assert_good(&run(&lu, &n, &rw10(READ10, 0, 1, 0x18), &[]).await);
    assert_good(&run(&lu, &n, &rw10(WRITE10, 0, 1, 0x08), &blocks(1, 1)).await);
    assert!(dev.last_fua.load(Ordering::SeqCst));
    assert_good(&run(&lu, &n, &rw10(WRITE10, 0, 1, 0x10), &blocks(1, 1)).await);
    assert!(!dev.last_fua.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "current_thread")]
async fn read_only_logical_unit_rejects_writes() {
    let (lu, _) = setup_with(
        LuConfig {
            read_only: true,
            ..LuConfig::default()
        },
        TestDevice::new(1 << 20),
    );
    let n = fresh_nexus(&lu, "a", 1).await;
    assert_check(
        &run(&lu, &n, &rw10(WRITE10, 0, 1, 0), &blocks(1, 1)).await,
        0x7,
        0x27,
        0,
    );
    assert_good(&read0(&lu, &n).await);
    let ws = rw10(0x41, 0, 1, 0);
    assert_check(&run(&lu, &n, &ws, &blocks(1, 0)).await, 0x7, 0x27, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn transfer_length_above_the_block_limit_is_invalid() {
    let (lu, _) = setup_with(LuConfig::default(), TestDevice::new(64 << 20));
    let n = fresh_nexus(&lu, "a", 1).await;
    let max = (16u32 << 20) / 512;
    let r = run(&lu, &n, &rw16(READ16, 0, max + 1, 0), &[]).await;
    assert_check(&r, ILLEGAL, 0x24, 0);
    assert_eq!(sks(&r), [0xC0, 0, 10]);
    assert_good(&run(&lu, &n, &rw16(READ16, 0, max, 0), &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn write_residuals_follow_the_shorter_length() {
    let (lu, n) = setup_fresh().await;
    // (CDB blocks, Data-Out blocks, residual-free length): a Data-Out longer than the CDB
    // writes only the CDB's block; one shorter by a whole block writes only what arrived.
    for (cdb_blocks, data_blocks, transfer_len) in [(1, 2, 512), (2, 1, 1024)] {
        write_blocks(&lu, &n, 0, &blocks(2, b'a')).await;
        let cdb = rw10(WRITE10, 0, cdb_blocks, 0);
        let r = run(&lu, &n, &cdb, &blocks(data_blocks, b'b')).await;
        assert_good(&r);
        assert_eq!(r.transfer_len, transfer_len);
        assert_eq!(
            &read_blocks(&lu, &n, 0, 2).await[..],
            &[blocks(1, b'b'), blocks(1, b'a')].concat()[..]
        );
    }
    // Data-Out ending inside a block: what arrived is written, the rest of the block kept.
    let r = run(&lu, &n, &rw10(WRITE10, 0, 1, 0), &[b'c'; 200]).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 512);
    let back = read_blocks(&lu, &n, 0, 1).await;
    assert!(back[..200].iter().all(|&b| b == b'c'));
    assert!(back[200..].iter().all(|&b| b == b'b'));
    // No Data-Out at all: nothing written, GOOD.
    let r = run(&lu, &n, &rw10(WRITE10, 0, 1, 0), &[]).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 512);
}

#[tokio::test(flavor = "current_thread")]
async fn verify_medium_bytchk_and_single_block_compare() {
    let (lu, n) = setup_fresh().await;
    write_blocks(&lu, &n, 4, &blocks(4, 7)).await;
    assert_good(&run(&lu, &n, &rw10(0x2F, 4, 4, 0x10), &[]).await);
    let r = run(&lu, &n, &rw10(0x2F, 4, 4, 0x02), &blocks(4, 7)).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 2048);
    let mut bad = blocks(4, 7);
    bad[1500] = 8;
    let r = run(&lu, &n, &rw12(0xAF, 4, 4, 0x02), &bad).await;
    assert_check(&r, 0xE, 0x1D, 0);
    let s = r.sense.as_ref().unwrap();
    assert_eq!(s[0] & 0x80, 0x80);
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 1500);
    // BYTCHK = 11b: every block against the one Data-Out block.
    assert_good(&run(&lu, &n, &rw16(0x8F, 4, 4, 0x06), &blocks(1, 7)).await);
    assert_check(
        &run(&lu, &n, &rw16(0x8F, 4, 4, 0x06), &blocks(1, 6)).await,
        0xE,
        0x1D,
        0,
    );
    // VRPROTECT and BYTCHK = 10b are invalid; out of range too.
    assert_illegal(&lu, &n, &rw10(0x2F, 4, 1, 0x20), &[], 0x24).await;
    assert_illegal(&lu, &n, &rw10(0x2F, 4, 1, 0x04), &[], 0x24).await;
    assert_illegal(&lu, &n, &rw10(0x2F, 2047, 2, 0), &[], 0x21).await;
}

#[tokio::test(flavor = "current_thread")]
async fn write_and_verify_writes_through() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    for (op, cdb) in [
        (0x2E, rw10(0x2E, 3, 2, 0x02)),
        (0xAE, rw12(0xAE, 3, 2, 0)),
        (0x8E, rw16(0x8E, 3, 2, 0x12)),
    ] {
        let r = run(&lu, &n, &cdb, &blocks(2, op)).await;
        assert_good(&r);
        assert_eq!(r.transfer_len, 1024);
        assert!(dev.last_fua.load(Ordering::SeqCst));
        assert_eq!(&read_blocks(&lu, &n, 3, 2).await[..], &blocks(2, op)[..]);
    }
    assert_illegal(&lu, &n, &rw10(0x2E, 3, 1, 0x20), &blocks(1, 0), 0x24).await;
    assert_illegal(&lu, &n, &rw10(0x2E, 2048, 1, 0), &blocks(1, 0), 0x21).await;
}

fn caw(lba: u64, n: u8, flags: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x89;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = n;
    c
}

#[tokio::test(flavor = "current_thread")]
async fn compare_and_write_success_and_miscompare() {
    let (lu, n) = setup_fresh().await;
    write_blocks(&lu, &n, 8, &blocks(2, b'A')).await;
    let data = [blocks(2, b'A'), blocks(2, b'B')].concat();
    let r = run(&lu, &n, &caw(8, 2, 0x18), &data).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 2048);
    assert_eq!(&read_blocks(&lu, &n, 8, 2).await[..], &blocks(2, b'B')[..]);
    // Miscompare: offset of the first differing byte, nothing written.
    let mut data = [blocks(2, b'B'), blocks(2, b'C')].concat();
    data[1024 - 27] = b'X';
    let r = run(&lu, &n, &caw(8, 2, 0), &data).await;
    assert_check(&r, 0xE, 0x1D, 0);
    let s = r.sense.unwrap();
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 1024 - 27);
    assert_eq!(&read_blocks(&lu, &n, 8, 2).await[..], &blocks(2, b'B')[..]);
}

#[tokio::test(flavor = "current_thread")]
async fn compare_and_write_checks_length_range_and_protect() {
    let (lu, n) = setup_fresh().await;
    // Data-Out of 4 blocks for 1 or 3 blocks, or a zero-length CDB with data: invalid.
    for count in [1u8, 3] {
        let r = run(&lu, &n, &caw(0, count, 0), &blocks(4, 0)).await;
        assert_check(&r, ILLEGAL, 0x24, 0);
        assert_eq!(sks(&r), [0xC0, 0, 13]);
    }
    assert_illegal(&lu, &n, &caw(0, 0, 0), &blocks(512, 0), 0x24).await;
    assert_good(&run(&lu, &n, &caw(0, 0, 0), &[]).await);
    assert_illegal(&lu, &n, &caw(2047, 2, 0), &blocks(4, 0), 0x21).await;
    assert_illegal(&lu, &n, &caw(0, 1, 0x20), &blocks(2, 0), 0x24).await;
}

/// An ordinary WRITE racing a COMPARE AND WRITE to the same block must serialize: the
/// write lands last (CAW first, or CAW miscompares), so the block always ends as the
/// write's data.
#[test]
fn compare_and_write_is_atomic_against_concurrent_writes() {
    local(async {
        let lu = setup_yielding();
        let (a, b) = fresh_pair(&lu).await;
        for round in 0..50u8 {
            write_blocks(&lu, &a, 0, &blocks(1, b'A')).await;
            let (l1, l2) = (lu.clone(), lu.clone());
            let (a2, b2) = (a.clone(), b.clone());
            let caw_task = tokio::task::spawn_local(async move {
                let data = [blocks(1, b'A'), blocks(1, b'B')].concat();
                run(&l1, &a2, &caw(0, 1, 0), &data).await
            });
            let write_task = tokio::task::spawn_local(async move {
                if round % 2 == 0 {
                    tokio::task::yield_now().await;
                }
                run(&l2, &b2, &rw10(WRITE10, 0, 1, 0), &blocks(1, b'C')).await
            });
            let c = caw_task.await.unwrap();
            assert_good(&write_task.await.unwrap());
            assert!(c.status == 0 || sense(&c) == (0xE, 0x1D, 0));
            let now = read_blocks(&lu, &a, 0, 1).await;
            if c.status == 0 {
                // CAW went first: the write must have followed it.
                assert!(
                    now.iter().all(|&x| x == b'C'),
                    "round {round}: write lost under CAW"
                );
            } else {
                assert!(now.iter().all(|&x| x == b'C'));
            }
        }
    });
}

/// Concurrent read-compare-and-write increments of one counter never lose an update.
#[test]
fn compare_and_write_increments_never_lose_updates() {
    local(async {
        let lu = setup_yielding();
        let mut tasks = vec![];
        for t in 0..4u64 {
            let lu = lu.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let n = nexus(&format!("n{t}"), 10 + t);
                fresh(&lu, &n).await;
                let mut done = 0;
                while done < 10 {
                    let cur = read_blocks(&lu, &n, 5, 1).await;
                    let v = u64::from_be_bytes(cur[..8].try_into().unwrap());
                    let mut next = cur.to_vec();
                    next[..8].copy_from_slice(&(v + 1).to_be_bytes());
                    let r = run(&lu, &n, &caw(5, 1, 0), &[cur.to_vec(), next].concat()).await;
                    if r.status == 0 {
                        done += 1;
                    } else {
                        assert_eq!(sense(&r), (0xE, 0x1D, 0));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = fresh_nexus(&lu, "check", 99).await;
        let cur = read_blocks(&lu, &n, 5, 1).await;
        assert_eq!(u64::from_be_bytes(cur[..8].try_into().unwrap()), 40);
    });
}

fn ws10(lba: u32, n: u16, flags: u8) -> Vec<u8> {
    rw10(0x41, lba, n, flags)
}

fn ws16(lba: u64, n: u32, flags: u8) -> Vec<u8> {
    rw16(0x93, lba, n, flags)
}

#[tokio::test(flavor = "current_thread")]
async fn write_same_replicates_the_block() {
    let (lu, n) = setup_fresh().await;
    let mut block = blocks(1, 0);
    block[0] = 0x5A;
    block[511] = 0xA5;
    let r = run(&lu, &n, &ws10(100, 3, 0), &block).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 512);
    assert_eq!(
        &read_blocks(&lu, &n, 100, 3).await[..],
        &[block.clone(), block.clone(), block.clone()].concat()[..]
    );
    assert_good(&run(&lu, &n, &ws16(2040, 8, 0), &block).await);
    assert_illegal(&lu, &n, &ws16(2041, 8, 0), &block, 0x21).await;
    assert_illegal(&lu, &n, &ws10(2049, 0, 0), &block, 0x21).await;
}

#[tokio::test(flavor = "current_thread")]
async fn write_same_zero_length_runs_to_the_end_within_the_limit() {
    let (lu, n) = setup_fresh().await;
    assert_good(&run(&lu, &n, &ws10(2000, 0, 0), &blocks(1, 9)).await);
    assert_eq!(
        &read_blocks(&lu, &n, 2000, 48).await[..],
        &blocks(48, 9)[..]
    );
    // A 64 MiB LU is larger than MAXIMUM WRITE SAME LENGTH (16 MiB): 0 from LBA 0 is invalid.
    let (big, _) = setup_with(LuConfig::default(), TestDevice::new(64 << 20));
    fresh(&big, &n).await;
    let r = run(&big, &n, &ws10(0, 0, 0), &blocks(1, 0)).await;
    assert_check(&r, ILLEGAL, 0x24, 0);
    let max = (16u32 << 20) / 512;
    assert_check(
        &run(&big, &n, &ws16(0, max + 1, 0), &blocks(1, 0)).await,
        ILLEGAL,
        0x24,
        0,
    );
    assert_good(&run(&big, &n, &ws16(0, max, 0x08), &blocks(1, 0)).await);
}

#[tokio::test(flavor = "current_thread")]
async fn write_same_unmap_deallocates_zero_data() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    write_blocks(&lu, &n, 0, &blocks(16, 0xFF)).await;
    let writes = dev.writes.load(Ordering::SeqCst);
    assert_good(&run(&lu, &n, &ws16(0, 16, 0x08), &blocks(1, 0)).await);
    assert_eq!(
        dev.writes.load(Ordering::SeqCst),
        writes,
        "unmapped, not written"
    );
    assert_eq!(&read_blocks(&lu, &n, 0, 16).await[..], &blocks(16, 0)[..]);
    let ext = dev.mem.extents(0, 8192).await.unwrap();
    assert!(!ext[0].mapped);
    // With UNMAP the Data-Out block is not written: the blocks read as zeroes (LBPRZ).
    write_blocks(&lu, &n, 0, &blocks(2, 3)).await;
    assert_good(&run(&lu, &n, &ws10(0, 2, 0x08), &blocks(1, 0xFF)).await);
    assert_eq!(&read_blocks(&lu, &n, 0, 2).await[..], &blocks(2, 0)[..]);
    // NDOB: zeroes, no Data-Out.
    let r = run(&lu, &n, &ws16(0, 2, 0x09), &[]).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, 0);
    assert_eq!(&read_blocks(&lu, &n, 0, 2).await[..], &blocks(2, 0)[..]);
}

#[tokio::test(flavor = "current_thread")]
async fn write_same_field_errors() {
    let (lu, n) = setup_fresh().await;
    // ANCHOR (with or without UNMAP): ANC_SUP = 0.
    assert_illegal(&lu, &n, &ws10(0, 1, 0x10), &blocks(1, 0), 0x24).await;
    assert_illegal(&lu, &n, &ws10(0, 1, 0x18), &blocks(1, 0), 0x24).await;
    // WRPROTECT, PBDATA/LBDATA.
    assert_illegal(&lu, &n, &ws16(0, 1, 0x20), &blocks(1, 0), 0x24).await;
    assert_illegal(&lu, &n, &ws10(0, 1, 0x02), &blocks(1, 0), 0x24).await;
    // Data-Out other than one block.
    for len in [256usize, 1024] {
        let r = run(&lu, &n, &ws10(0, 1, 0x08), &vec![0; len]).await;
        assert_eq!(r.status, 2);
        assert_eq!(sense(&r).0, ILLEGAL);
    }
    // A fully provisioned LU has no WRITE SAME unmap.
    let mut dev = TestDevice::new(1 << 20);
    dev.thin = false;
    let (full, _) = setup_with(LuConfig::default(), dev);
    fresh(&full, &n).await;
    assert_check(
        &run(&full, &n, &ws10(0, 1, 0x08), &blocks(1, 0)).await,
        ILLEGAL,
        0x24,
        0,
    );
    assert_good(&run(&full, &n, &ws10(0, 1, 0), &blocks(1, 0)).await);
}

fn unmap_cdb(len: u16, anchor: bool) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x42;
    c[1] = u8::from(anchor);
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

#[tokio::test(flavor = "current_thread")]
async fn unmap_deallocates_every_descriptor() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    write_blocks(&lu, &n, 0, &blocks(32, 0xEE)).await;
    let list = unmap_list(&[(0, 8), (16, 16), (2048, 0)]);
    let r = run(&lu, &n, &unmap_cdb(list.len() as u16, false), &list).await;
    assert_good(&r);
    assert_eq!(r.transfer_len, list.len() as u32);
    let back = read_blocks(&lu, &n, 0, 32).await;
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..8192].iter().all(|&b| b == 0xEE));
    assert!(back[8192..].iter().all(|&b| b == 0));
    let ext = dev.mem.extents(0, 16384).await.unwrap();
    assert_eq!(ext.iter().filter(|e| e.mapped).count(), 1);
    // No descriptors and a zero parameter list length are both fine.
    let empty = unmap_list(&[]);
    assert_good(&run(&lu, &n, &unmap_cdb(8, false), &empty).await);
    assert_good(&run(&lu, &n, &unmap_cdb(0, false), &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn unmap_errors() {
    let (lu, n) = setup_fresh().await;
    let list = unmap_list(&[(2040, 9)]);
    assert_illegal(&lu, &n, &unmap_cdb(list.len() as u16, false), &list, 0x21).await;
    assert_illegal(&lu, &n, &unmap_cdb(4, false), &[0; 4], 0x1A).await;
    let list = unmap_list(&[(0, 1)]);
    assert_illegal(&lu, &n, &unmap_cdb(list.len() as u16, true), &list, 0x24).await;
    let many = unmap_list(&vec![(0, 1); 1025]);
    assert_illegal(&lu, &n, &unmap_cdb(many.len() as u16, false), &many, 0x26).await;
    let mut dev = TestDevice::new(1 << 20);
    dev.thin = false;
    let (full, _) = setup_with(LuConfig::default(), dev);
    fresh(&full, &n).await;
    let r = run(&full, &n, &unmap_cdb(list.len() as u16, false), &list).await;
    assert_check(&r, ILLEGAL, 0x20, 0);
}

fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[tokio::test(flavor = "current_thread")]
async fn get_lba_status_reports_mapped_and_deallocated() {
    let (lu, n) = setup_fresh().await;
    write_blocks(&lu, &n, 8, &blocks(8, 1)).await; // one 4 KiB page mapped: LBAs 8..16
    let r = run(&lu, &n, &get_lba_status(0, 1024), &[]).await;
    assert_good(&r);
    let d = &r.data_in;
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len());
    let desc = |i: usize| {
        let at = 8 + 16 * i;
        (
            u64::from_be_bytes(d[at..at + 8].try_into().unwrap()),
            u32::from_be_bytes(d[at + 8..at + 12].try_into().unwrap()),
            d[at + 12],
        )
    };
    assert_eq!(desc(0), (0, 8, 1));
    assert_eq!(desc(1), (8, 8, 0));
    assert_eq!(desc(2), (16, 2048 - 16, 1));
    // Starting mid-extent, with room for one descriptor only.
    let r = run(&lu, &n, &get_lba_status(9, 24), &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 24);
    assert_eq!(u64::from_be_bytes(r.data_in[8..16].try_into().unwrap()), 9);
    assert_eq!(r.data_in[20], 0);
    // Beyond the end.
    for lba in [2048u64, 2049, 1 << 63, u64::MAX] {
        assert_illegal(&lu, &n, &get_lba_status(lba, 24), &[], 0x21).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn synchronize_cache_flushes_and_checks_range() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    assert_good(&run(&lu, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&run(&lu, &n, &rw16(0x91, 100, 10, 0x02), &[]).await);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 2);
    assert_illegal(&lu, &n, &rw16(0x91, 2040, 10, 0), &[], 0x21).await;
}

#[tokio::test(flavor = "current_thread")]
async fn pre_fetch_is_good_and_range_checked() {
    let (lu, n) = setup_fresh().await;
    assert_good(&run(&lu, &n, &rw10(0x34, 0, 256, 0x02), &[]).await);
    assert_good(&run(&lu, &n, &rw16(0x90, 2047, 1, 0), &[]).await);
    assert_good(&run(&lu, &n, &rw10(0x34, 0, 0, 0), &[]).await);
    assert_illegal(&lu, &n, &rw10(0x34, 2049, 0, 0), &[], 0x21).await;
    assert_illegal(&lu, &n, &rw16(0x90, 2047, 2, 0), &[], 0x21).await;
}

#[tokio::test(flavor = "current_thread")]
async fn read_capacity_ten_and_sixteen() {
    let (lu, n) = setup_fresh().await;
    let r = run(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_good(&r);
    assert_eq!(&r.data_in[..], &[0, 0, 0x07, 0xFF, 0, 0, 2, 0]);
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let r = run(&lu, &n, &c, &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 32);
    assert_eq!(r.data_in[13], 0); // LBPPBE 0: provisioning is per logical block
    assert_eq!(r.data_in[14] & 0xC0, 0xC0); // LBPME, LBPRZ
    c[13] = 15;
    let r = run(&lu, &n, &c, &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 15);
    assert_eq!(r.transfer_len, 15);
    // PMI = 0 with a non-zero LBA is invalid.
    assert_illegal(&lu, &n, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[], 0x24).await;
}

#[tokio::test(flavor = "current_thread")]
async fn four_k_logical_units() {
    let (lu, _) = setup_with(
        LuConfig {
            block_size: 4096,
            ..LuConfig::default()
        },
        TestDevice::new(1 << 20),
    );
    let n = fresh_nexus(&lu, "a", 1).await;
    let r = run(&lu, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&r.data_in[..], &[0, 0, 0, 255, 0, 0, 0x10, 0]);
    assert_good(&run(&lu, &n, &rw10(WRITE10, 255, 1, 0), &vec![4; 4096]).await);
    let r = run(&lu, &n, &rw10(READ10, 255, 1, 0), &[]).await;
    assert_eq!(r.data_in.len(), 4096);
    assert_illegal(&lu, &n, &rw10(READ10, 256, 1, 0), &[], 0x21).await;
    assert!(LogicalUnit::new(
        LuConfig {
            block_size: 1024,
            ..LuConfig::default()
        },
        Arc::new(TestDevice::new(1 << 20)),
        None
    )
    .is_err());
}

#[tokio::test(flavor = "current_thread")]
async fn backend_errors_map_through_the_sense_table() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    *dev.fail.lock().unwrap() = Some(BlockError::Medium);
    assert_check(&read0(&lu, &n).await, 0x3, 0x11, 0);
    *dev.fail.lock().unwrap() = Some(BlockError::Write(5));
    assert_check(&write0(&lu, &n).await, 0x3, 0x0C, 0);
    *dev.fail.lock().unwrap() = Some(BlockError::Busy("moving"));
    let r = read0(&lu, &n).await;
    assert_eq!(r.status, 0x08);
    assert!(r.sense.is_none());
    *dev.fail.lock().unwrap() = None;
    assert_good(&read0(&lu, &n).await);
}

#[tokio::test(flavor = "current_thread")]
async fn ejected_medium_is_not_ready() {
    let (lu, _) = setup_removable();
    let n = fresh_nexus(&lu, "a", 1).await;
    let (eject, load) = eject_load(true);
    assert_good(&run(&lu, &n, &eject, &[]).await);
    for cdb in [
        vec![0u8; 6],
        rw10(READ10, 0, 1, 0),
        vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rw10(0x35, 0, 0, 0),
    ] {
        assert_check(&run(&lu, &n, &cdb, &[]).await, 0x2, 0x3A, 0);
    }
    assert_check(&write0(&lu, &n).await, 0x2, 0x3A, 0);
    // REQUEST SENSE describes it, INQUIRY still works.
    let r = run(&lu, &n, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_good(&r);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x2, 0x3A));
    assert_good(&run(&lu, &n, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    assert_good(&run(&lu, &n, &load, &[]).await);
    assert_good(&run(&lu, &n, &[0; 6], &[]).await);
}
