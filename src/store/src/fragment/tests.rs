//! The fragment store against real files (ext4 under the default tmpdir, and tmpfs).

use std::os::unix::fs::FileExt;

use super::*;
use tessera_uring::testing::{pattern, run, tmpdir};

fn vol(chunk: u32) -> VolumeCtx {
    VolumeCtx {
        volume: 0xabc,
        epoch: 1,
        pgs: 8,
        k: 4,
        m: 2,
        codec: 1,
        chunk,
    }
}

fn key(stripe: u64, index: u8) -> FragKey {
    FragKey { stripe, index }
}

fn item(stripe: u64, index: u8, version: u64, data: &[u8]) -> WriteItem {
    WriteItem {
        key: key(stripe, index),
        manifest: Manifest {
            version,
            data: vec![version, 1, 2, 3],
        },
        zero: false,
        data: Bytes::copy_from_slice(data),
        offset: 0,
        base: 0,
        xor: false,
    }
}

fn read_item(stripe: u64, index: u8, want: Want) -> ReadItem {
    ReadItem {
        key: key(stripe, index),
        want,
        offset: 0,
        len: 0,
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        node_id: "n1".into(),
        ..StoreOptions::default()
    }
}

async fn read1(s: &FragmentStore, v: &VolumeCtx, stripe: u64, index: u8, want: Want) -> ReadResult {
    s.read(v, vec![read_item(stripe, index, want)])
        .await
        .remove(0)
}

#[test]
fn write_read_versions_and_slots() {
    for shm in [false, true] {
        let dir = tmpdir(shm);
        run(async {
            let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
            let v = vol(4096);
            let a = pattern(1, 4096);
            let b = pattern(2, 4096);
            let c = pattern(3, 4096);
            // Stripe 1000 index 3 at versions 10, 20, 30; stripe 5 index 1 at version 7.
            assert_eq!(
                s.write(&v, vec![item(1000, 3, 10, &a), item(5, 1, 7, &c)])
                    .await
                    .unwrap(),
                vec![Status::OK, Status::OK]
            );
            let r = read1(&s, &v, 1000, 3, Want::Latest).await;
            assert_eq!((r.status, r.manifest.version), (Status::OK, 10));
            assert_eq!(&r.data[..], &a[..]);
            assert_eq!(r.manifest.data, vec![10, 1, 2, 3]);
            s.write(&v, vec![item(1000, 3, 20, &b)]).await.unwrap();
            s.write(&v, vec![item(1000, 3, 30, &c)]).await.unwrap();
            // The two newest copies are kept; the oldest was overwritten.
            let r = read1(&s, &v, 1000, 3, Want::Latest).await;
            assert_eq!((r.manifest.version, &r.data[..]), (30, &c[..]));
            let r = read1(&s, &v, 1000, 3, Want::Version(20)).await;
            assert_eq!((r.status, &r.data[..]), (Status::OK, &b[..]));
            let r = read1(&s, &v, 1000, 3, Want::Version(10)).await;
            assert_eq!(r.status, Status::NOT_FOUND);
            // A rewrite at the same version goes to the slot holding it.
            s.write(&v, vec![item(1000, 3, 30, &a)]).await.unwrap();
            let r = read1(&s, &v, 1000, 3, Want::Version(20)).await;
            assert_eq!(
                &r.data[..],
                &b[..],
                "the older copy survives a same-version rewrite"
            );
            // Sub-range reads.
            let r = s
                .read(
                    &v,
                    vec![ReadItem {
                        key: key(5, 1),
                        want: Want::Latest,
                        offset: 512,
                        len: 1024,
                    }],
                )
                .await
                .remove(0);
            assert_eq!(&r.data[..], &c[512..1536]);
            // Missing fragments.
            assert_eq!(
                read1(&s, &v, 4, 1, Want::Latest).await.status,
                Status::NOT_FOUND
            );
            assert_eq!(
                read1(&s, &v, 1000, 2, Want::Latest).await.status,
                Status::NOT_FOUND
            );
            // The versions listing.
            let vs = s.versions(&v, 0, 2000).await.unwrap();
            assert_eq!(vs.len(), 2);
            assert_eq!(vs[0].key, key(5, 1));
            assert_eq!(vs[1].key, key(1000, 3));
            let versions: Vec<u64> = vs[1].slots.iter().map(|x| x.manifest.version).collect();
            assert_eq!(versions, vec![30, 20]);
            assert!(s.versions(&v, 6, 100).await.unwrap().is_empty());
        });
    }
}

#[test]
fn revert_trim_and_zero_fragments() {
    let dir = tmpdir(false);
    run(async {
        let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
        let v = vol(8192);
        let a = pattern(4, 8192);
        let b = pattern(5, 8192);
        s.write(&v, vec![item(9, 0, 1, &a)]).await.unwrap();
        s.write(&v, vec![item(9, 0, 2, &b)]).await.unwrap();
        // Roll version 2 back: the latest is version 1 again.
        assert_eq!(
            s.revert(&v, vec![(key(9, 0), 2), (key(9, 0), 77)])
                .await
                .unwrap(),
            vec![Status::OK, Status::NOT_FOUND]
        );
        let r = read1(&s, &v, 9, 0, Want::Latest).await;
        assert_eq!((r.manifest.version, &r.data[..]), (1, &a[..]));
        // The voided slot takes the next write; version 1 stays.
        s.write(&v, vec![item(9, 0, 3, &b)]).await.unwrap();
        assert_eq!(
            read1(&s, &v, 9, 0, Want::Version(1)).await.status,
            Status::OK
        );
        // A zero fragment.
        let z = WriteItem {
            key: key(9, 0),
            manifest: Manifest {
                version: 4,
                data: vec![4, 0, 0, 0],
            },
            zero: true,
            data: Bytes::new(),
            offset: 0,
            base: 0,
            xor: false,
        };
        s.write(&v, vec![z]).await.unwrap();
        let r = read1(&s, &v, 9, 0, Want::Latest).await;
        assert_eq!(
            (r.status, r.zero, r.manifest.version),
            (Status::OK, true, 4)
        );
        assert!(r.data.is_empty());
        // Trim removes every copy.
        assert_eq!(s.trim(&v, vec![key(9, 0)]).await.unwrap(), vec![Status::OK]);
        assert_eq!(
            read1(&s, &v, 9, 0, Want::Latest).await.status,
            Status::NOT_FOUND
        );
        assert!(s.versions(&v, 0, 100).await.unwrap().is_empty());
    });
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tmpdir(false);
    let path = dir.path().join("store");
    let v = vol(4096);
    let data: Vec<Vec<u8>> = (0..300).map(|i| pattern(i, 4096)).collect();
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        // Fragments in many PGs and extents (pairs_per_extent(4096) = 4096 per extent).
        for (i, d) in data.iter().enumerate() {
            let stripe = i as u64 * 97;
            s.write(&v, vec![item(stripe, (i % 6) as u8, 100 + i as u64, d)])
                .await
                .unwrap();
        }
        s.raise_epoch(v.volume, 5).await.unwrap();
        s.put_blob(v.volume, 1, 3, Bytes::from_static(b"intent"))
            .await
            .unwrap();
    });
    // A new process, in effect: nothing is cached.
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        assert_eq!(s.epoch(v.volume), 5);
        assert_eq!(s.get_blob(v.volume, 1), (3, Bytes::from_static(b"intent")));
        for (i, d) in data.iter().enumerate() {
            let stripe = i as u64 * 97;
            let r = read1(&s, &v, stripe, (i % 6) as u8, Want::Latest).await;
            assert_eq!(r.status, Status::OK, "fragment {i}");
            assert_eq!(r.manifest.version, 100 + i as u64);
            assert_eq!(&r.data[..], &d[..]);
        }
        // The wrong node id is refused.
        let other = StoreOptions {
            node_id: "n2".into(),
            ..opts()
        };
        let e = FragmentStore::open(&path, &other).unwrap_err();
        assert!(e.to_string().contains("belongs to node"), "{e}");
    });
}

#[test]
fn fencing_epochs() {
    let dir = tmpdir(false);
    run(async {
        let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
        s.check_epoch(7, 3).await.unwrap();
        assert_eq!(s.epoch(7), 3, "a higher epoch is adopted");
        let e = s.check_epoch(7, 2).await.unwrap_err();
        assert_eq!((e.status, e.epoch), (Status::STALE_EPOCH, 3));
        assert_eq!(s.stats().stale_epoch_rejects, 1);
        assert_eq!(s.raise_epoch(7, 1).await.unwrap(), 3, "never lowered");
        assert_eq!(s.raise_epoch(7, 0).await.unwrap(), 3, "0 only asks");
        s.check_epoch(8, 0).await.unwrap();
    });
}

#[test]
fn bit_rot_is_detected_on_read_and_scrub() {
    let dir = tmpdir(false);
    let path = dir.path().join("store");
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        let v = vol(4096);
        let a = pattern(8, 4096);
        let b = pattern(9, 4096);
        s.write(&v, vec![item(3, 2, 1, &a)]).await.unwrap();
        s.write(&v, vec![item(3, 2, 2, &b)]).await.unwrap();
        assert_eq!(s.scrub(0).await.mismatches, 0);
        // Flip a byte in the data of the slot holding version 2.
        let e = s.extent(&locate(&v, &key(3, 2)).key).unwrap();
        let pair = locate(&v, &key(3, 2)).pair;
        let slot = (0..2)
            .find(|&i| FragmentStore::slots(&e, pair)[i].version == 2)
            .unwrap();
        let off = e.rec.slot_offset(pair, slot) + BLOCK as u64 + 100;
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, off).unwrap();
        f.write_all_at(&[byte[0] ^ 0x5a], off).unwrap();
        f.sync_all().unwrap();
        drop(f);
        drop(s);
        // Reopen so the page cache of the O_DIRECT file cannot hide the change.
        let s = FragmentStore::open(&path, &opts()).unwrap();
        let r = read1(&s, &v, 3, 2, Want::Latest).await;
        assert_eq!(r.status, Status::CHECKSUM);
        assert_eq!(s.stats().checksum_errors, 1);
        // The older copy is intact and readable by version.
        let r = read1(&s, &v, 3, 2, Want::Version(1)).await;
        assert_eq!((r.status, &r.data[..]), (Status::OK, &a[..]));
        let rep = s.scrub(0).await;
        assert_eq!((rep.checked, rep.mismatches), (2, 1));
        // A repair at the same version replaces the bad copy, not the good one.
        s.write(&v, vec![item(3, 2, 2, &b)]).await.unwrap();
        assert_eq!(
            read1(&s, &v, 3, 2, Want::Latest).await.data,
            Bytes::from(b.clone())
        );
        assert_eq!(
            read1(&s, &v, 3, 2, Want::Version(1)).await.status,
            Status::OK
        );
        assert_eq!(s.scrub(0).await.mismatches, 0);
    });
}

#[test]
fn scrub_progress_follows_a_running_scrub_and_scrubs_run_one_at_a_time() {
    let dir = tmpdir(false);
    run(async {
        let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
        assert_eq!(s.scrub_progress(), ScrubProgress::default(), "no scrub yet");
        let v = vol(4096);
        for stripe in 0..16 {
            s.write(&v, vec![item(stripe, 0, 1, &pattern(stripe, 4096))])
                .await
                .unwrap();
        }
        let copy = (BLOCK + 4096) as u64;
        // 16 copies at 8 copies a second: about two seconds, watched as it goes.
        let watch = async {
            let mut seen = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let p = s.scrub_progress();
                seen.push(p);
                if p.scrubs == 2 && !p.running {
                    return seen;
                }
            }
        };
        let (a, b, seen) = tokio::join!(s.scrub(8 * copy), s.scrub(0), watch);
        assert_eq!((a.checked, b.checked), (16, 16));
        let first: Vec<_> = seen.iter().filter(|p| p.scrubs == 1 && p.running).collect();
        assert!(
            first.len() >= 5,
            "the throttled scrub was seen running: {seen:?}"
        );
        assert!(first.iter().all(|p| p.total_bytes == 16 * copy));
        assert!(
            first
                .iter()
                .any(|p| p.done_bytes > 0 && p.done_bytes < p.total_bytes),
            "seen part way: {seen:?}"
        );
        assert!(
            first.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes),
            "progress only moves forward"
        );
        let last = s.scrub_progress();
        assert_eq!(
            last,
            ScrubProgress {
                scrubs: 2,
                running: false,
                total_bytes: 16 * copy,
                done_bytes: 16 * copy,
                checked: 16,
                mismatches: 0,
            },
            "the second scrub waited for the first, then ran whole"
        );
    });
}

/// Where in the store file the copy of version `version` of fragment (`stripe`, `index`)
/// of `v` starts.
fn slot_offset(s: &FragmentStore, v: &VolumeCtx, stripe: u64, index: u8, version: u64) -> u64 {
    let loc = locate(v, &key(stripe, index));
    let e = s.extent(&loc.key).unwrap();
    let slot = (0..2)
        .find(|&i| FragmentStore::slots(&e, loc.pair)[i].version == version)
        .unwrap();
    e.rec.slot_offset(loc.pair, slot)
}

/// Overwrite the store file at `path` with `bytes` at `at` (damage, or a torn write).
fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn torn_writes_keep_the_previous_copy() {
    let dir = tmpdir(false);
    let path = dir.path().join("store");
    let v = vol(4096);
    let a = pattern(10, 4096);
    let off = run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        s.write(&v, vec![item(0, 0, 1, &a)]).await.unwrap();
        s.write(&v, vec![item(0, 0, 2, &pattern(11, 4096))])
            .await
            .unwrap();
        slot_offset(&s, &v, 0, 0, 2)
    });
    // A crash mid-write of version 2: its header landed, half its data did not.
    overwrite(&path, off + BLOCK as u64 + 2048, &[0u8; 2048]);
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        let r = read1(&s, &v, 0, 0, Want::Latest).await;
        assert_eq!(r.status, Status::CHECKSUM, "the torn copy is refused");
        let r = read1(&s, &v, 0, 0, Want::Version(1)).await;
        assert_eq!((r.status, &r.data[..]), (Status::OK, &a[..]));
        // And a crash that tore the header: the slot is empty, version 1 is the latest.
        overwrite(&path, off + 100, &[0xffu8; 64]);
    });
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        let r = read1(&s, &v, 0, 0, Want::Latest).await;
        assert_eq!((r.status, r.manifest.version), (Status::OK, 1));
    });
}

#[test]
fn the_metadata_log_switches_halves_and_replays() {
    let dir = tmpdir(true);
    let path = dir.path().join("store");
    // Blobs of ~100 KiB: a half (16 MiB) fills after ~160 of them.
    let big = Bytes::from(vec![7u8; 100 << 10]);
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        for seq in 1..=400u64 {
            s.put_blob(1, (seq % 3) as u8, seq, big.clone())
                .await
                .unwrap();
        }
        s.raise_epoch(1, 99).await.unwrap();
    });
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        assert_eq!(s.epoch(1), 99);
        for name in 0..3u8 {
            let (seq, data) = s.get_blob(1, name);
            assert!(seq >= 398, "name {name}: seq {seq}");
            assert_eq!(data.len(), 100 << 10);
        }
        // Older sequence numbers do not replace newer ones.
        s.put_blob(1, 0, 5, Bytes::from_static(b"old"))
            .await
            .unwrap();
        assert_eq!(s.get_blob(1, 0).1.len(), 100 << 10);
    });
}

#[test]
fn foreign_data_is_never_formatted_and_capacity_is_enforced() {
    let dir = tmpdir(false);
    let path = dir.path().join("junk");
    std::fs::write(&path, b"precious data that is not a store").unwrap();
    let e = FragmentStore::open(&path, &opts()).unwrap_err();
    assert!(e.to_string().contains("refusing to format"), "{e}");
    // Room for exactly one extent.
    let o = StoreOptions {
        capacity: EXTENT_AREA + EXTENT_SIZE,
        ..opts()
    };
    run(async {
        let s = FragmentStore::open(dir.path().join("small"), &o).unwrap();
        let v = vol(4096);
        let d = pattern(1, 4096);
        // PG 0 and PG 1 need two extents.
        let st = s.write(&v, vec![item(0, 0, 1, &d)]).await.unwrap();
        assert_eq!(st, vec![Status::OK]);
        let st = s.write(&v, vec![item(1, 0, 1, &d)]).await.unwrap();
        assert_eq!(st, vec![Status::NO_SPACE]);
    });
}

#[test]
fn concurrent_writes_to_one_fragment_are_serialized() {
    let dir = tmpdir(false);
    run(async {
        let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
        let v = vol(4096);
        let writes = (1..=20u64).map(|ver| {
            let s = s.clone();
            let d = pattern(ver, 4096);
            async move { s.write(&v, vec![item(2, 1, ver, &d)]).await.unwrap() }
        });
        futures_util::future::join_all(writes).await;
        let vs = s.versions(&v, 2, 1).await.unwrap();
        assert_eq!(vs.len(), 1);
        assert_eq!(vs[0].slots.len(), 2);
        // Whatever the order, each read of a listed version returns that version's data.
        for sl in &vs[0].slots {
            let ver = sl.manifest.version;
            let r = read1(&s, &v, 2, 1, Want::Version(ver)).await;
            assert_eq!(&r.data[..], &pattern(ver, 4096)[..]);
        }
    });
}

#[test]
fn concurrent_writes_to_new_extents_get_distinct_extents() {
    // On a real disk file the metadata appends complete asynchronously, so allocations of
    // different extents overlap in time.
    let dir = tmpdir(false);
    run(async {
        let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
        let v = VolumeCtx {
            pgs: 64,
            ..vol(4096)
        };
        let writes = (0..64u64).map(|stripe| {
            let s = s.clone();
            let d = pattern(stripe + 1, 4096);
            async move { s.write(&v, vec![item(stripe, 0, 5, &d)]).await.unwrap() }
        });
        for st in futures_util::future::join_all(writes).await {
            assert_eq!(st, vec![Status::OK]);
        }
        assert_eq!(s.stats().allocated, 64 * EXTENT_SIZE, "one extent per PG");
        for stripe in 0..64u64 {
            let r = read1(&s, &v, stripe, 0, Want::Latest).await;
            assert_eq!(r.status, Status::OK, "stripe {stripe}");
            assert_eq!(&r.data[..], &pattern(stripe + 1, 4096)[..]);
        }
    });
}

#[test]
fn partial_writes_build_on_their_base_and_reads_check_only_their_blocks() {
    // On a disk and in memory (tmpfs), whose reads of ranges fetch the header apart.
    for shm in [false, true] {
        partial_writes_case(shm);
    }
}

fn partial_writes_case(shm: bool) {
    let dir = tmpdir(shm);
    let path = dir.path().join("store");
    let v = vol(16384);
    let a = pattern(20, 16384);
    let b = pattern(21, 4096);
    let partial = |version: u64, base: u64, offset: u32, data: &[u8]| WriteItem {
        offset,
        base,
        ..item(4, 1, version, data)
    };
    let slot_of = run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        s.write(&v, vec![item(4, 1, 1, &a)]).await.unwrap();
        assert_eq!(
            s.write(&v, vec![partial(2, 1, 8192, &b)]).await.unwrap(),
            vec![Status::OK]
        );
        let mut want = a.clone();
        want[8192..12288].copy_from_slice(&b);
        let r = read1(&s, &v, 4, 1, Want::Latest).await;
        assert_eq!((r.manifest.version, &r.data[..]), (2, &want[..]));
        // The base copy is untouched.
        assert_eq!(
            read1(&s, &v, 4, 1, Want::Version(1)).await.data,
            Bytes::from(a.clone())
        );
        // A base the store does not hold.
        assert_eq!(
            s.write(&v, vec![partial(9, 7, 0, &b)]).await.unwrap(),
            vec![Status::NOT_FOUND]
        );
        // Building on version 2 replaces version 1, keeps version 2.
        s.write(&v, vec![partial(3, 2, 0, &b)]).await.unwrap();
        assert_eq!(
            read1(&s, &v, 4, 1, Want::Version(2)).await.data,
            Bytes::from(want.clone())
        );
        assert_eq!(
            read1(&s, &v, 4, 1, Want::Version(1)).await.status,
            Status::NOT_FOUND
        );
        slot_offset(&s, &v, 4, 1, 3)
    });
    // Damage block 0 of version 3's copy.
    overwrite(&path, slot_of + BLOCK as u64 + 10, &[0xee; 8]);
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        let range = |offset: u32, len: u32| ReadItem {
            key: key(4, 1),
            want: Want::Latest,
            offset,
            len,
        };
        let r = s.read(&v, vec![range(8192, 4096)]).await.remove(0);
        assert_eq!(
            (r.status, &r.data[..]),
            (Status::OK, &b[..]),
            "an undamaged block reads"
        );
        let r = s.read(&v, vec![range(100, 200)]).await.remove(0);
        assert_eq!(r.status, Status::CHECKSUM, "the damaged block is refused");
        // A copy built on the damaged one carries the damaged block with its old checksum,
        // so the damage is still seen; the new range reads back.
        assert_eq!(
            s.write(&v, vec![partial(4, 3, 12288, &b)]).await.unwrap(),
            vec![Status::OK]
        );
        let mut at4 = range(100, 200);
        at4.want = Want::Version(4);
        let r = s.read(&v, vec![at4]).await.remove(0);
        assert_eq!(
            r.status,
            Status::CHECKSUM,
            "the carried-over damage is refused"
        );
        let r = s.read(&v, vec![range(12288, 4096)]).await.remove(0);
        assert_eq!((r.status, &r.data[..]), (Status::OK, &b[..]));
    });
}

#[test]
fn xor_writes_apply_a_delta_to_the_newest_copy_only() {
    let dir = tmpdir(true);
    let v = vol(16384);
    let a = pattern(30, 16384);
    let d = pattern(31, 4096);
    let xor = |version: u64, base: u64, offset: u32, data: &[u8]| WriteItem {
        offset,
        base,
        xor: true,
        ..item(6, 4, version, data)
    };
    run(async {
        let s = FragmentStore::open(dir.path().join("store"), &opts()).unwrap();
        s.write(&v, vec![item(6, 4, 1, &a)]).await.unwrap();
        assert_eq!(
            s.write(&v, vec![xor(2, 1, 4096, &d)]).await.unwrap(),
            vec![Status::OK]
        );
        let mut want = a.clone();
        for (w, x) in want[4096..8192].iter_mut().zip(&d) {
            *w ^= x;
        }
        let r = read1(&s, &v, 6, 4, Want::Latest).await;
        assert_eq!((r.manifest.version, &r.data[..]), (2, &want[..]));
        // Block checksums follow the merged content: a range read checks out.
        let r = s
            .read(
                &v,
                vec![ReadItem {
                    key: key(6, 4),
                    want: Want::Latest,
                    offset: 4096,
                    len: 4096,
                }],
            )
            .await
            .remove(0);
        assert_eq!((r.status, &r.data[..]), (Status::OK, &want[4096..8192]));
        // Version 1 is still held, but a delta against it would be applied to a copy that is
        // no longer the newest: refused.
        assert_eq!(
            s.write(&v, vec![xor(3, 1, 0, &d)]).await.unwrap(),
            vec![Status::NOT_FOUND]
        );
        // A delta on a zero copy is the delta itself.
        let z = WriteItem {
            zero: true,
            data: Bytes::new(),
            ..item(7, 4, 5, &[])
        };
        s.write(&v, vec![z]).await.unwrap();
        let it = WriteItem {
            key: key(7, 4),
            ..xor(6, 5, 0, &d)
        };
        assert_eq!(s.write(&v, vec![it]).await.unwrap(), vec![Status::OK]);
        let r = read1(&s, &v, 7, 4, Want::Latest).await;
        assert_eq!(&r.data[..4096], &d[..]);
        assert!(r.data[4096..].iter().all(|b| *b == 0));
    });
}

#[test]
fn swaps_write_a_range_on_the_newest_copy_and_return_what_it_replaced() {
    let dir = tmpdir(true);
    let path = dir.path().join("store");
    let v = vol(16384);
    let a = pattern(40, 16384);
    let d = pattern(41, 4096);
    let swap = |version: u64, base: u64, offset: u32, data: &[u8]| WriteItem {
        offset,
        base,
        ..item(6, 4, version, data)
    };
    let slot_of = run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        s.write(&v, vec![item(6, 4, 1, &a)]).await.unwrap();
        let out = s.swap(&v, vec![swap(2, 1, 8192, &d)]).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, &out[0].1[..]), (Status::OK, &a[8192..12288]));
        let mut want = a.clone();
        want[8192..12288].copy_from_slice(&d);
        let r = read1(&s, &v, 6, 4, Want::Latest).await;
        assert_eq!((r.manifest.version, &r.data[..]), (2, &want[..]));
        // The base copy is still held but no longer the newest: refused, nothing written.
        let out = s.swap(&v, vec![swap(3, 1, 0, &d)]).await.unwrap();
        assert_eq!((out[0].0, out[0].1.len()), (Status::NOT_FOUND, 0));
        assert_eq!(read1(&s, &v, 6, 4, Want::Latest).await.manifest.version, 2);
        // A swap must build on a copy: a whole-chunk one is refused.
        let out = s.swap(&v, vec![item(6, 4, 4, &a)]).await.unwrap();
        assert_eq!(out[0].0, Status::BAD_REQUEST);
        slot_offset(&s, &v, 6, 4, 2)
    });
    // Damage block 0 of version 2's copy.
    overwrite(&path, slot_of + BLOCK as u64 + 10, &[0xee; 8]);
    run(async {
        let s = FragmentStore::open(&path, &opts()).unwrap();
        let before = s.stats().checksum_errors;
        // Replacing the damaged block would hand back damaged bytes: refused.
        let out = s.swap(&v, vec![swap(3, 2, 0, &d)]).await.unwrap();
        assert_eq!(out[0].0, Status::CHECKSUM);
        assert_eq!(s.stats().checksum_errors, before + 1);
        let r = s
            .read(
                &v,
                vec![ReadItem {
                    key: key(6, 4),
                    want: Want::Latest,
                    offset: 12288,
                    len: 4096,
                }],
            )
            .await
            .remove(0);
        assert_eq!((r.status, r.manifest.version), (Status::OK, 2));
        // An undamaged block swaps.
        let out = s.swap(&v, vec![swap(3, 2, 12288, &d)]).await.unwrap();
        assert_eq!((out[0].0, &out[0].1[..]), (Status::OK, &a[12288..]));
    });
}

/// Durable means durable: the engine's fault hook fails a write or a sync of the store's file,
/// the way a dying disk does (Linux reports a writeback error to one `fdatasync`, then the
/// next succeeds).
#[cfg(feature = "fault-injection")]
mod faults {
    use super::*;
    use tessera_uring::fault::{self, FaultOp};

    fn refused_io(r: &Result<Vec<Status>, Refusal>) -> bool {
        match r {
            Err(refusal) => refusal.status == Status::IO_ERROR,
            Ok(st) => st.iter().all(|s| *s == Status::IO_ERROR),
        }
    }

    #[test]
    fn a_failed_sync_fails_every_write_that_waited_on_it_and_every_later_one() {
        let dir = tmpdir(false);
        let path = dir.path().join("store");
        let v = vol(4096);
        let good = pattern(7, 4096);
        run(async {
            let s = FragmentStore::open(&path, &opts()).unwrap();
            s.write(&v, vec![item(1, 0, 10, &good)]).await.unwrap();
            // The next fdatasync of the store's file fails once; the one after would succeed.
            fault::arm(&path, FaultOp::Sync, libc::EIO, 1).unwrap();
            let writes = (0..8u64).map(|i| {
                let s = s.clone();
                let data = pattern(100 + i, 4096);
                async move { s.write(&v, vec![item(2 + i, 1, 20, &data)]).await }
            });
            let results = futures_util::future::join_all(writes).await;
            for (i, r) in results.iter().enumerate() {
                assert!(
                    refused_io(r),
                    "write {i} was acknowledged after the sync it waited on failed: {r:?}"
                );
            }
            assert_eq!(s.failed(), Some(libc::EIO));
            assert_eq!(s.stats().failed_errno, libc::EIO as u64);
            // Later writes are refused although a sync would now succeed.
            let later = s.write(&v, vec![item(50, 0, 30, &good)]).await;
            assert!(refused_io(&later), "{later:?}");
            let err = later.unwrap_err();
            assert!(err.reason.contains("accepts no more"), "{}", err.reason);
            assert!(
                s.put_blob(v.volume, 1, 9, Bytes::from_static(b"intent"))
                    .await
                    .is_err(),
                "a per-volume record is a write too"
            );
            // What was durable before still reads.
            let r = read1(&s, &v, 1, 0, Want::Latest).await;
            assert_eq!((r.status, &r.data[..]), (Status::OK, &good[..]));
        });
        fault::clear(&path);
        // The failure stays until the store is reopened.
        run(async {
            let s = FragmentStore::open(&path, &opts()).unwrap();
            assert_eq!(s.failed(), None);
            assert_eq!(
                s.write(&v, vec![item(60, 0, 40, &good)]).await.unwrap(),
                vec![Status::OK]
            );
        });
    }

    #[test]
    fn a_failed_write_makes_the_store_fail_stop_in_both_sync_modes() {
        for sync in [SyncMode::Batched, SyncMode::Dsync] {
            let dir = tmpdir(false);
            let path = dir.path().join("store");
            let v = vol(4096);
            let data = pattern(3, 4096);
            run(async {
                let o = StoreOptions { sync, ..opts() };
                let s = FragmentStore::open(&path, &o).unwrap();
                s.write(&v, vec![item(1, 0, 10, &data)]).await.unwrap();
                fault::arm(&path, FaultOp::Write, libc::EIO, 1).unwrap();
                let r = s.write(&v, vec![item(2, 0, 20, &data)]).await;
                assert!(refused_io(&r), "{sync:?}: {r:?}");
                assert_eq!(s.failed(), Some(libc::EIO), "{sync:?}");
                let r = s.write(&v, vec![item(3, 0, 30, &data)]).await;
                assert!(refused_io(&r), "{sync:?}: {r:?}");
                let r = read1(&s, &v, 2, 0, Want::Latest).await;
                assert_eq!(
                    r.status,
                    Status::NOT_FOUND,
                    "{sync:?}: the failed copy is not there"
                );
            });
            fault::clear(&path);
        }
    }
}
