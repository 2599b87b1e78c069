//! The volume against in-process nodes (real fragment stores on tmpfs): round trips, degraded
//! reads and writes, nodes coming back, bit rot, fencing, gateway crashes at every step of a
//! write (with `--features fault-injection`), and a long model-based run.

use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tessera_ec::{placement, Profile};
use tessera_proto::block::{BlockDevice, BlockError};
use tessera_proto::segments::Segments;

use crate::nodes::Connector;
use crate::testing::LocalNodes;
use crate::{EcVolume, VolumeSpec};

pub(crate) use tessera_uring::testing::run;

pub(crate) struct Setup {
    pub _dir: tempfile::TempDir,
    pub nodes: Arc<LocalNodes>,
    pub spec: VolumeSpec,
}

pub(crate) fn setup(km: &str, chunk: u64, n: usize, size: u64) -> Setup {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let nodes = LocalNodes::new(dir.path(), n);
    let profile = Profile::parse(km, chunk).unwrap();
    let pgs = 16;
    let ns: Vec<placement::Node> = (0..n)
        .map(|i| placement::Node::new(&format!("node-{i}"), "", "", &format!("host-{i}")))
        .collect();
    let map = placement::compute(42, pgs, &ns, profile.width(), None).unwrap();
    let spec = VolumeSpec {
        id: 0x7e55,
        name: "test".into(),
        size,
        block_size: 512,
        profile,
        pgs,
        write_quorum: profile.default_write_quorum(),
        region_stripes: 8,
        clear_after: std::time::Duration::from_millis(20),
        map,
        node_names: (0..n).map(|i| format!("node-{i}")).collect(),
        epoch: None,
    };
    Setup {
        _dir: dir,
        nodes,
        spec,
    }
}

pub(crate) async fn open(s: &Setup) -> EcVolume {
    let c: Arc<dyn Connector> = Arc::new(s.nodes.clone());
    EcVolume::open(s.spec.clone(), c)
        .await
        .expect("open volume")
}

pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Run maintenance until nothing is pending (or give up). Nodes marked down are probed at
/// once first (a gateway probes them every half second).
pub(crate) async fn settle(v: &EcVolume) {
    v.probe_down_nodes().await;
    for _ in 0..200 {
        if !v.maintain().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("maintenance did not settle: {:?}", v.pending());
}

async fn write(v: &EcVolume, off: u64, data: &[u8]) -> Result<(), BlockError> {
    v.write(off, Bytes::copy_from_slice(data), false).await
}

/// Write `data` handed over in pieces of `piece` bytes, as the iSCSI layer hands over the
/// Data-Out PDUs of a command.
async fn write_in_pieces(
    v: &EcVolume,
    off: u64,
    data: &[u8],
    piece: usize,
) -> Result<(), BlockError> {
    let mut segs = Segments::new();
    for p in data.chunks(piece) {
        segs.push(Bytes::copy_from_slice(p));
    }
    v.write_segments(off, segs, false).await
}

async fn read(v: &EcVolume, off: u64, len: usize) -> Vec<u8> {
    v.read(off, len).await.expect("read").to_vec()
}

#[test]
fn writes_of_every_shape_read_back() {
    for (km, chunk) in [
        ("4+2", 4096),
        ("4+2", 16384),
        ("2+1", 4096),
        ("3+0", 8192),
        ("1+1", 4096),
    ] {
        let s = setup(km, chunk, 6, 4 << 20);
        run(async {
            let v = open(&s).await;
            let mut model = vec![0u8; 4 << 20];
            assert_eq!(
                read(&v, 0, 65536).await,
                vec![0u8; 65536],
                "{km}: fresh volume reads zeroes"
            );
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            for step in 0..60u64 {
                let len = match step % 4 {
                    0 => 512,
                    1 => 4096,
                    2 => rng.gen_range(1..200) * 512,
                    _ => 256 << 10,
                };
                let off = rng.gen_range(0..((4 << 20) - len) / 512) * 512;
                let d = pattern(step, len as usize);
                // Every other write comes in pieces: chunk-sized, unaligned ones that cut
                // chunks in two, and pieces smaller than a chunk.
                match step % 8 {
                    1 => write_in_pieces(&v, off, &d, 16384).await.unwrap(),
                    3 => write_in_pieces(&v, off, &d, 5000).await.unwrap(),
                    5 => write_in_pieces(&v, off, &d, 1536).await.unwrap(),
                    7 => write_in_pieces(&v, off, &d, 65536 + 512).await.unwrap(),
                    _ => write(&v, off, &d).await.unwrap(),
                }
                model[off as usize..off as usize + d.len()].copy_from_slice(&d);
                let r = read(
                    &v,
                    off.saturating_sub(1024),
                    (len + 2048).min((4 << 20) - off.saturating_sub(1024)) as usize,
                )
                .await;
                let from = off.saturating_sub(1024) as usize;
                assert_eq!(&r[..], &model[from..from + r.len()], "{km} step {step}");
            }
            assert_eq!(read(&v, 0, 4 << 20).await, model, "{km}: whole volume");
            let sc = v.scrub().await;
            assert_eq!(
                (sc.inconsistent, sc.parity_mismatches),
                (0, 0),
                "{km}: {sc:?}"
            );
            // Out of range.
            assert_eq!(v.read(4 << 20, 512).await, Err(BlockError::OutOfRange));
            // Unmap reads back zeroes.
            v.unmap(65536, 200 * 1024).await.unwrap();
            model[65536..65536 + 200 * 1024].fill(0);
            assert_eq!(
                read(&v, 0, 1 << 20).await,
                model[..1 << 20].to_vec(),
                "{km}: unmap"
            );
            v.close();
        });
    }
}

#[test]
fn losing_m_nodes_loses_nothing_and_stale_nodes_catch_up() {
    let s = setup("4+2", 4096, 6, 2 << 20);
    run(async {
        let v = open(&s).await;
        let data = pattern(7, 2 << 20);
        write(&v, 0, &data).await.unwrap();
        // Any two nodes down: every byte still reads back.
        for (a, b) in [(0, 1), (2, 5), (3, 4)] {
            s.nodes.set_down(a, true);
            s.nodes.set_down(b, true);
            assert_eq!(read(&v, 0, 2 << 20).await, data, "nodes {a} and {b} down");
            s.nodes.set_down(a, false);
            s.nodes.set_down(b, false);
            settle(&v).await;
            assert_eq!(v.probe_down_nodes().await, 0, "nodes {a} and {b} back");
        }
        assert!(
            v.stats()
                .degraded_reads
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        // One node down: writes go on (quorum k + 1 = 5 of 6), degraded.
        s.nodes.set_down(2, true);
        let d2 = pattern(8, 300 * 1024);
        write(&v, 100 * 1024, &d2).await.unwrap();
        let mut model = data.clone();
        model[100 * 1024..400 * 1024].copy_from_slice(&d2);
        assert_eq!(read(&v, 0, 2 << 20).await, model);
        let h = v.health();
        assert_eq!(h.stale_nodes, 1, "{h:?}");
        assert!(h.degraded_pgs > 0 && h.rebuilding_pgs == 0, "{h:?}");
        // Two down: no quorum; the write waits for it (briefly here), then fails as
        // suspended, which initiators do not retry for ever.
        s.nodes.set_down(3, true);
        v.set_quorum_wait(std::time::Duration::from_millis(300));
        let e = write(&v, 0, &pattern(9, 4096)).await.unwrap_err();
        assert!(matches!(e, BlockError::Suspended(_)), "{e:?}");
        v.set_quorum_wait(crate::QUORUM_WAIT);
        s.nodes.set_down(3, false);
        assert_eq!(
            v.probe_down_nodes().await,
            1,
            "node 3 back, node 2 still down"
        );
        // The refused write left its stripe either old or new; settle it and rewrite.
        write(&v, 0, &pattern(9, 4096)).await.unwrap();
        model[..4096].copy_from_slice(&pattern(9, 4096));
        // Node 2 comes back: it is brought up to date.
        s.nodes.set_down(2, false);
        settle(&v).await;
        assert_eq!(v.health(), crate::Health::default(), "caught up");
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        // Now lose two others: node 2's fragments are current.
        s.nodes.set_down(0, true);
        s.nodes.set_down(1, true);
        assert_eq!(read(&v, 0, 2 << 20).await, model);
        v.close();
    });
}

/// Below its write quorum a write waits for it, for a bound: a node back within it lets the
/// write through; past it the write fails as suspended, and the volume says which PGs are
/// write-suspended and why, while reads go on.
#[test]
fn a_write_below_its_quorum_waits_for_a_node_then_fails_as_suspended() {
    use std::time::{Duration, Instant};
    let s = setup("4+2", 4096, 6, 1 << 20);
    run(async {
        let v = open(&s).await;
        let mut model = pattern(30, 1 << 20);
        write(&v, 0, &model).await.unwrap();
        assert!(v.write_suspended().is_empty());
        v.set_quorum_wait(Duration::from_secs(20));
        s.nodes.set_down(1, true);
        s.nodes.set_down(4, true);
        // Node 4 returns half a second into the write's wait: the write goes through.
        let nodes = s.nodes.clone();
        let back = tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            nodes.set_down(4, false);
        });
        let t = Instant::now();
        let d = pattern(31, 64 * 1024);
        write(&v, 4096, &d).await.unwrap();
        model[4096..4096 + d.len()].copy_from_slice(&d);
        back.await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "acknowledged before its quorum was back: {:?}",
            t.elapsed()
        );
        // Node 4 down again: every PG is below its quorum of 5 (both nodes are in every
        // PG of six nodes). The write waits its bound, then fails; reads go on.
        s.nodes.set_down(4, true);
        v.set_quorum_wait(Duration::from_millis(400));
        let t = Instant::now();
        let e = write(&v, 0, &pattern(32, 8192)).await.unwrap_err();
        assert!(matches!(e, BlockError::Suspended(_)), "{e:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        let sus = v.write_suspended();
        assert_eq!(sus.len(), s.spec.pgs as usize, "{sus:?}");
        assert!(
            sus.iter()
                .all(|(_, down)| down == &["node-1".to_string(), "node-4".to_string()]),
            "{sus:?}"
        );
        assert_eq!(v.health().write_suspended_pgs, s.spec.pgs as usize);
        assert_eq!(
            v.stats()
                .suspended_writes
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // The failed write left its stripe old or new; the rest reads back as it was.
        assert_eq!(read(&v, 8192, (1 << 20) - 8192).await, model[8192..]);
        // Both back: writes resume by themselves.
        s.nodes.set_down(1, false);
        s.nodes.set_down(4, false);
        v.set_quorum_wait(Duration::from_secs(20));
        let d = pattern(33, 8192);
        write(&v, 0, &d).await.unwrap();
        model[..8192].copy_from_slice(&d);
        assert!(v.write_suspended().is_empty());
        settle(&v).await;
        assert_eq!(read(&v, 0, 1 << 20).await, model);
        v.close();
    });
}

/// A node that hangs (its connections stay open, it answers nothing): reads are served
/// around it after their hedge delay, before anything marks it down; a write is acknowledged
/// at its quorum; the first call left unanswered past its deadline marks the node down, and from
/// then on nothing is sent to it but probes; when it answers again it is probed back and brought
/// up to date.
#[test]
fn a_hung_node_is_read_around_at_once_and_then_skipped_until_it_answers() {
    use crate::NodeCondition;
    use std::sync::atomic::Ordering::Relaxed;
    let s = setup("4+2", 16384, 6, 4 << 20);
    run(async {
        let v = open(&s).await;
        let mut model = pattern(21, 4 << 20);
        write(&v, 0, &model).await.unwrap();
        // Small reads everywhere first: the volume learns how fast each node answers.
        for i in 0..64u64 {
            let off = i * 65536 + (i % 4) * 16384;
            assert_eq!(
                read(&v, off, 4096).await,
                &model[off as usize..off as usize + 4096]
            );
        }
        let hung = v.node_of(3, 1);
        s.nodes.set_hung(hung, true);
        // 4 KiB reads of the chunk on the hung node: reconstructed after the hedge delay, so
        // they are all served before a call to it could have timed out (that marks it down).
        let before = v.stats().degraded_reads.load(Relaxed);
        let mut hits = 0;
        for stripe in 0..64u64 {
            for i in 0..4 {
                if v.node_of(stripe, i) != hung {
                    continue;
                }
                let off = stripe * 65536 + i as u64 * 16384 + 4096;
                assert_eq!(
                    read(&v, off, 4096).await,
                    &model[off as usize..off as usize + 4096],
                    "stripe {stripe} chunk {i} read around the hung node"
                );
                hits += 1;
            }
        }
        assert!(hits > 4, "{hits}");
        assert!(v.stats().degraded_reads.load(Relaxed) > before);
        assert_eq!(
            v.node_condition(hung),
            NodeCondition::Slow,
            "reads went around the node without waiting for its calls to time out"
        );
        // A full-stripe write is acknowledged at its quorum, before the hung node's fragment
        // call times out.
        let d = pattern(39, 65536);
        write(&v, 3 * 65536, &d).await.unwrap();
        model[3 * 65536..4 * 65536].copy_from_slice(&d);
        assert_ne!(v.node_condition(hung), NodeCondition::Down);
        // Writes of every shape: correct.
        for (i, (off, len)) in [(0u64, 65536usize), (4096 + 65536, 4096), (200_000, 70_000)]
            .into_iter()
            .enumerate()
        {
            let d = pattern(40 + i as u64, len);
            write(&v, off, &d).await.unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
        // Its calls time out: it is down, and nothing more is sent to it but probes.
        for _ in 0..400 {
            if v.node_condition(hung) == NodeCondition::Down {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(v.node_condition(hung), NodeCondition::Down);
        let sent = s.nodes.faults(hung).hung_calls.load(Relaxed);
        let t = std::time::Instant::now();
        for i in 0..40u64 {
            let off = (i * 104_729) % ((4 << 20) - 8192);
            let d = pattern(100 + i, 8192);
            write(&v, off, &d).await.unwrap();
            model[off as usize..off as usize + 8192].copy_from_slice(&d);
            assert_eq!(read(&v, off, 8192).await, d);
        }
        let probes = (t.elapsed().as_millis() / 500 + 2) as u64;
        let more = s.nodes.faults(hung).hung_calls.load(Relaxed) - sent;
        assert!(
            more <= probes,
            "{more} calls reached the down node in {:?} (probes only: at most {probes})",
            t.elapsed()
        );
        assert_eq!(read(&v, 0, 4 << 20).await, model);
        // It answers again: probed back, brought up to date, whole.
        s.nodes.set_hung(hung, false);
        settle(&v).await;
        assert_eq!(v.node_condition(hung), NodeCondition::Up);
        assert_eq!(v.health(), crate::Health::default());
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        // And it holds its share: any two others may go.
        let others: Vec<usize> = (0..6).filter(|&n| n != hung).take(2).collect();
        for &n in &others {
            s.nodes.set_down(n, true);
        }
        assert_eq!(read(&v, 0, 4 << 20).await, model);
        v.close();
    });
}

#[test]
fn a_restarted_gateway_reads_everything_and_nodes_reopen_from_disk() {
    let s = setup("4+2", 8192, 6, 1 << 20);
    let data = pattern(3, 1 << 20);
    run(async {
        let v = open(&s).await;
        write(&v, 0, &data).await.unwrap();
        write(&v, 4096, &pattern(4, 4096)).await.unwrap();
        v.close();
    });
    let mut model = data;
    model[4096..8192].copy_from_slice(&pattern(4, 4096));
    for i in 0..6 {
        s.nodes.restart(i);
    }
    run(async {
        let v = open(&s).await;
        assert!(v.epoch() >= 2, "a new epoch for the new instance");
        assert_eq!(read(&v, 0, 1 << 20).await, model);
        settle(&v).await;
        assert_eq!(v.pending().3, 0, "idle regions leave the intent log");
        v.close();
    });
}

#[test]
fn bit_rot_is_read_around_counted_and_repaired() {
    use std::os::unix::fs::FileExt;
    let s = setup("4+2", 4096, 6, 1 << 20);
    let data = pattern(11, 1 << 20);
    run(async {
        let v = open(&s).await;
        write(&v, 0, &data).await.unwrap();
        v.close();
    });
    // Flip bytes in the data area of every slot of node 1's store (its extents start after
    // the 32 MiB metadata log; headers are 4 KiB, data follows).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.nodes.path(1))
        .unwrap();
    let len = f.metadata().unwrap().len();
    let area = tessera_store::fragment::format::EXTENT_AREA;
    let mut flipped = 0;
    let mut off = area;
    while off + 8192 <= len {
        let mut hdr = [0u8; 4];
        f.read_exact_at(&mut hdr, off).unwrap();
        if &hdr == b"TSFR" {
            let mut b = [0u8; 16];
            f.read_exact_at(&mut b, off + 4096 + 100).unwrap();
            for x in &mut b {
                *x ^= 0xa5;
            }
            f.write_all_at(&b, off + 4096 + 100).unwrap();
            flipped += 1;
        }
        off += 4096;
    }
    assert!(flipped > 10, "found fragments to damage ({flipped})");
    drop(f);
    s.nodes.restart(1);
    run(async {
        let v = open(&s).await;
        assert_eq!(
            read(&v, 0, 1 << 20).await,
            data,
            "reads return the right data"
        );
        let errors = v
            .stats()
            .checksum_errors
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(errors > 0, "checksum errors counted");
        let before = s.nodes.store(1).stats().checksum_errors;
        assert!(before > 0);
        settle(&v).await;
        // Damaged parity is found by a scrub (reads never need it while the data is whole).
        let sc = v.scrub().await;
        assert!(sc.inconsistent > 0, "{sc:?}");
        settle(&v).await;
        assert!(
            v.stats()
                .repaired_fragments
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        let rep = s.nodes.store(1).scrub(0).await;
        assert_eq!(rep.mismatches, 0, "node 1 repaired: {rep:?}");
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0));
        v.close();
    });
}

#[test]
fn small_aligned_writes_swap_in_one_round_trip_and_fall_back_on_damage() {
    use std::os::unix::fs::FileExt;
    let s = setup("4+2", 16384, 6, 1 << 20);
    let mut model = pattern(12, 1 << 20);
    let totals = |s: &Setup| {
        (0..6).fold((0, 0), |(r, w), i| {
            let st = s.nodes.store(i).stats();
            (r + st.reads, w + st.writes)
        })
    };
    run(async {
        let v = open(&s).await;
        write(&v, 0, &model).await.unwrap();
        // A 4 KiB write into a stripe whose state the gateway remembers: the data node swaps
        // (writes, answers with the old bytes), the two parity nodes take the delta. No reads.
        let (r0, w0) = totals(&s);
        let d = pattern(13, 4096);
        write(&v, 8192, &d).await.unwrap();
        model[8192..12288].copy_from_slice(&d);
        let (r1, w1) = totals(&s);
        assert_eq!(
            (r1 - r0, w1 - w0),
            (0, 3),
            "no reads, three fragment writes"
        );
        assert_eq!(read(&v, 0, 1 << 20).await, model);

        // Damage block 0 of every copy on the node holding stripe 1's chunk 0: the swap there
        // is refused (it would hand back damaged bytes) and the write takes the reading path,
        // which reconstructs around the damage.
        let node = v.node_of(1, 0);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.nodes.path(node))
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut off = tessera_store::fragment::format::EXTENT_AREA;
        while off + 8192 <= len {
            let mut hdr = [0u8; 4];
            f.read_exact_at(&mut hdr, off).unwrap();
            if &hdr == b"TSFR" {
                f.write_all_at(&[0x5a; 16], off + 4096 + 100).unwrap();
            }
            off += 4096;
        }
        drop(f);
        let errors = s.nodes.store(node).stats().checksum_errors;
        let d = pattern(14, 4096);
        write(&v, 65536, &d).await.unwrap();
        model[65536..69632].copy_from_slice(&d);
        assert!(
            s.nodes.store(node).stats().checksum_errors > errors,
            "the damage was seen"
        );
        assert_eq!(read(&v, 65536, 65536).await, &model[65536..131072]);
        v.close();
    });
}

#[test]
fn an_older_epoch_is_fenced_with_a_clear_error() {
    let s = setup("2+1", 4096, 3, 1 << 20);
    run(async {
        let old = open(&s).await;
        write(&old, 0, &pattern(1, 8192)).await.unwrap();
        let new = open(&s).await;
        assert!(new.epoch() > old.epoch());
        let e = write(&old, 0, &pattern(2, 8192)).await.unwrap_err();
        assert!(matches!(e, BlockError::Busy(_)), "{e:?}");
        // The data is the new owner's to change; the old one's write did not land.
        assert_eq!(read(&new, 0, 8192).await, pattern(1, 8192));
        write(&new, 0, &pattern(3, 8192)).await.unwrap();
        assert_eq!(read(&new, 0, 8192).await, pattern(3, 8192));
        // Every later write of the fenced instance fails at once.
        assert!(write(&old, 65536, &pattern(4, 512)).await.is_err());
        assert!(s.nodes.store(0).stats().stale_epoch_rejects > 0);
        old.close();
        new.close();
    });
}

#[test]
fn a_granted_epoch_is_used_and_an_outdated_grant_is_refused() {
    let mut s = setup("2+1", 4096, 3, 1 << 20);
    run(async {
        s.spec.epoch = Some(7);
        let v = open(&s).await;
        assert_eq!(v.epoch(), 7);
        write(&v, 0, &pattern(1, 4096)).await.unwrap();
        v.close();
        // The control plane never grants the same epoch twice; an older grant means another
        // gateway took the volume since.
        s.spec.epoch = Some(5);
        let e = EcVolume::open(s.spec.clone(), Arc::new(s.nodes.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                crate::OpenError::Stale {
                    granted: 5,
                    seen: 7,
                    ..
                }
            ),
            "{e}"
        );
        s.spec.epoch = Some(8);
        let v = open(&s).await;
        assert_eq!(read(&v, 0, 4096).await, pattern(1, 4096));
        v.close();
    });
}

#[test]
fn a_volume_grows_and_the_new_space_reads_as_zeroes() {
    let s = setup("4+2", 16384, 6, 100 << 10);
    run(async {
        let v = open(&s).await;
        let data = pattern(21, 100 << 10);
        write(&v, 0, &data).await.unwrap();
        // Past the end: out of range until it grows.
        assert!(matches!(
            v.write(100 << 10, Bytes::from(vec![1u8; 512]), false).await,
            Err(BlockError::OutOfRange)
        ));
        assert!(v.grow(50 << 10).is_err(), "never shrinks");
        assert!(v.grow((300 << 10) + 1).is_err(), "whole blocks");
        v.grow(300 << 10).unwrap();
        assert_eq!(v.size(), 300 << 10);
        assert_eq!(BlockDevice::info(&v).size_bytes, 300 << 10);
        assert_eq!(read(&v, 0, 100 << 10).await, data);
        assert_eq!(read(&v, 100 << 10, 200 << 10).await, vec![0u8; 200 << 10]);
        let more = pattern(22, 150 << 10);
        write(&v, 120 << 10, &more).await.unwrap();
        assert_eq!(read(&v, 120 << 10, 150 << 10).await, more);
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        v.close();
    });
}

/// Random writes, reads, node failures and restarts, gateway restarts, against a model.
#[test]
fn model_based_random_operations() {
    let steps: usize = std::env::var("TESSERA_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let size = 2u64 << 20;
    let s = setup("4+2", 4096, 6, size);
    let mut model = vec![0u8; size as usize];
    // A fixed seed by default (the same run every time); TESSERA_SEED explores others.
    let seed: u64 = std::env::var("TESSERA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2024);
    println!(
        "model_based_random_operations: seed {seed} (replay: TESSERA_SEED={seed}), {steps} steps"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut down: Option<usize> = None;
    run(async {
        let mut v = open(&s).await;
        for step in 0..steps {
            match rng.gen_range(0..100) {
                0..=44 => {
                    let len = *[512u64, 4096, 8192, 16384, 65536, 3 * 512]
                        .get(rng.gen_range(0..6))
                        .unwrap();
                    let off = rng.gen_range(0..(size - len) / 512) * 512;
                    let d = pattern(step as u64, len as usize);
                    write(&v, off, &d).await.unwrap_or_else(|e| {
                        panic!("seed {seed} step {step}: write {off}+{len} down {down:?}: {e:?}")
                    });
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                45..=84 => {
                    let len = rng.gen_range(1..64u64) * 512;
                    let off = rng.gen_range(0..(size - len) / 512) * 512;
                    let r = v.read(off, len as usize).await.unwrap_or_else(|e| {
                        panic!(
                            "seed {seed} step {step}: read {off}+{len} down {down:?}: {e:?} {:?}",
                            v.pending()
                        )
                    });
                    assert!(
                        r == model[off as usize..(off + len) as usize],
                        "seed {seed} step {step}: read {off}+{len}"
                    );
                }
                85..=89 => {
                    // One node fails or hangs, or comes back (at most one away: writes keep a
                    // quorum).
                    match down.take() {
                        Some(n) => {
                            s.nodes.set_down(n, false);
                            s.nodes.set_hung(n, false);
                            // Time passes: the volume's probe finds it back.
                            assert_eq!(v.probe_down_nodes().await, 0, "step {step}");
                        }
                        None => {
                            let n = rng.gen_range(0..6);
                            if rng.gen_range(0..6) == 0 {
                                s.nodes.set_hung(n, true);
                            } else {
                                s.nodes.set_down(n, true);
                            }
                            down = Some(n);
                        }
                    }
                }
                90..=93 => {
                    let n = rng.gen_range(0..6);
                    s.nodes.restart(n);
                }
                94..=96 => {
                    let _ = v.maintain().await;
                }
                _ => {
                    // The gateway restarts (no clean shutdown work).
                    v.close();
                    v = open(&s).await;
                }
            }
        }
        if let Some(n) = down {
            s.nodes.set_down(n, false);
            s.nodes.set_hung(n, false);
        }
        settle(&v).await;
        assert_eq!(read(&v, 0, size as usize).await, model, "final contents");
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        v.close();
    });
}

#[cfg(feature = "fault-injection")]
mod crash {
    //! A gateway that dies at every step of a write: after each fragment request is issued,
    //! after each node's answer, after the reads of a read-modify-write, before the ack. After
    //! a restart every stripe reads back wholly old or wholly new, an acknowledged write reads
    //! back new, and every stripe is whole (scrub: 0 inconsistent, 0 parity mismatches).

    use super::*;
    use crate::fault;
    use std::time::Duration;

    fn case(km: &str, point: &str, nth: usize, off: u64, len: usize) {
        case_chunk(km, 4096, point, nth, off, len);
    }

    /// With 4 KiB chunks, and with 16 KiB ones, where small writes become copies built on the
    /// nodes' current ones.
    fn case_both(km: &str, point: &str, nth: usize, off: u64, len: usize) {
        case_chunk(km, 4096, point, nth, off, len);
        case_chunk(km, 16384, point, nth, off, len);
    }

    fn case_chunk(km: &str, chunk: u64, point: &str, nth: usize, off: u64, len: usize) {
        let s = setup(km, chunk, 6, 1 << 20);
        let old = pattern(100, 1 << 20);
        let new = pattern(200 + nth as u64, len);
        run(async {
            let v = open(&s).await;
            write(&v, 0, &old).await.unwrap();
            fault::arm(point, nth);
            let w = {
                let v = v.clone();
                let new = new.clone();
                tokio::task::spawn_local(async move { write(&v, off, &new).await })
            };
            // The write is acknowledged as soon as its quorum is durable, so the gateway may
            // die before or after the acknowledgement: wait for the crash (or, with no point
            // armed, for the acknowledgement), then see whether it was acknowledged.
            let mut ended = false;
            for _ in 0..2000 {
                ended = if point == "never" {
                    w.is_finished()
                } else {
                    fault::crashed()
                };
                if ended {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                ended,
                "{point}#{nth}: the write neither crashed nor finished within 10 s"
            );
            let acked = if w.is_finished() {
                let r = w.await.unwrap();
                if point == "never" {
                    assert!(r.is_ok(), "{point}#{nth}: write failed: {r:?}");
                }
                r.is_ok()
            } else {
                w.abort();
                false
            };
            fault::disarm();
            v.close();
            // Let requests already issued to nodes finish (they do in a real node process).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let v = open(&s).await;
            settle(&v).await;
            let got = read(&v, off, len).await;
            let was_old = got == old[off as usize..off as usize + len];
            let is_new = got == new;
            assert!(
                was_old || is_new,
                "{point}#{nth}: torn: neither old nor new"
            );
            if acked {
                assert!(is_new, "{point}#{nth}: acknowledged write lost");
            }
            // The rest of the volume is untouched.
            let all = read(&v, 0, 1 << 20).await;
            assert_eq!(&all[..off as usize], &old[..off as usize]);
            assert_eq!(&all[off as usize + len..], &old[off as usize + len..]);
            let sc = v.scrub().await;
            assert_eq!(
                (sc.inconsistent, sc.parity_mismatches),
                (0, 0),
                "{point}#{nth}: {sc:?}"
            );
            v.close();
        });
    }

    #[test]
    fn a_gateway_crash_at_every_step_of_a_partial_write() {
        // A 4 KiB write into one chunk (delta: 1 data + 2 parity fragments, on 3 nodes), a
        // write over two chunks of one stripe, and an unaligned 512-byte write.
        for (off, len) in [(8192u64, 4096usize), (4096, 8192), (16384 + 512, 512)] {
            for nth in 1..=3 {
                case_both("4+2", "write:send", nth, off, len);
                case_both("4+2", "write:acked-node", nth, off, len);
            }
            case_both("4+2", "write:after-read", 1, off, len);
            case_both("4+2", "write:before-ack", 1, off, len);
        }
    }

    #[test]
    fn a_gateway_crash_at_every_step_of_a_full_stripe_write() {
        for nth in 1..=6 {
            case("4+2", "write:send", nth, 16384, 16384);
            case("4+2", "write:acked-node", nth, 16384, 16384);
        }
    }

    /// A command aborted (ABORT TASK, a LUN reset, a lost connection: its future is dropped)
    /// while its write waits at `point`, then a second write to the same stripe: the first
    /// keeps the stripe until it has run to its end, the second follows it, and every byte
    /// reads back old-or-new (the second write's range new), before and after a restart.
    fn abort_case(chunk: u64, point: &str, nth: usize, off: u64, len: usize) {
        let s = setup("4+2", chunk, 6, 1 << 20);
        let old = pattern(100, 1 << 20);
        let first = pattern(300 + nth as u64, len);
        // The second write covers the first's start and goes on past it.
        let (off2, len2) = (off, len + 4096);
        let second = pattern(400 + nth as u64, len2);
        let what = format!("{point}#{nth} chunk {chunk} at {off}+{len}");
        run(async {
            let v = open(&s).await;
            write(&v, 0, &old).await.unwrap();
            fault::arm_pause(point, nth);
            let w1 = {
                let v = v.clone();
                let first = first.clone();
                tokio::task::spawn_local(async move { write(&v, off, &first).await })
            };
            for _ in 0..2000 {
                if fault::paused() || w1.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                fault::paused(),
                "{what}: the write did not reach its pause point"
            );
            // The command is aborted: the future waiting for it is dropped.
            w1.abort();
            let _ = w1.await;
            assert_eq!(v.running(), 1, "{what}: the aborted write runs on");
            let w2 = {
                let v = v.clone();
                let second = second.clone();
                tokio::task::spawn_local(async move { write(&v, off2, &second).await })
            };
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(
                !w2.is_finished(),
                "{what}: the second write went ahead while the aborted one was in flight"
            );
            fault::release();
            let r2 = tokio::time::timeout(Duration::from_secs(10), w2)
                .await
                .expect("the second write finishes")
                .unwrap();
            assert!(r2.is_ok(), "{what}: second write failed: {r2:?}");
            for _ in 0..2000 {
                if v.running() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(v.running(), 0, "{what}: the aborted write never ended");
            fault::disarm();
            let check = |all: &[u8], when: &str| {
                let (a, b) = (off as usize, off as usize + len);
                let (c, d) = (off2 as usize, off2 as usize + len2);
                assert_eq!(
                    &all[c..d],
                    &second[..],
                    "{what} {when}: acknowledged write lost"
                );
                assert_eq!(&all[..a.min(c)], &old[..a.min(c)], "{what} {when}");
                assert_eq!(&all[d.max(b)..], &old[d.max(b)..], "{what} {when}");
            };
            check(&read(&v, 0, 1 << 20).await, "live");
            let sc = v.scrub().await;
            assert_eq!(
                (sc.inconsistent, sc.parity_mismatches),
                (0, 0),
                "{what}: {sc:?}"
            );
            v.close();
            let v = open(&s).await;
            settle(&v).await;
            check(&read(&v, 0, 1 << 20).await, "after a restart");
            let sc = v.scrub().await;
            assert_eq!(
                (sc.inconsistent, sc.parity_mismatches),
                (0, 0),
                "{what}: {sc:?}"
            );
            v.close();
        });
    }

    #[test]
    fn an_aborted_write_runs_to_its_end_before_the_next_write_of_its_stripe() {
        for chunk in [4096u64, 16384] {
            // Partial writes: one chunk, two chunks, unaligned; and a full stripe.
            for (off, len) in [(8192u64, 4096usize), (4096, 8192), (16384 + 512, 512)] {
                for nth in 1..=3 {
                    abort_case(chunk, "write:send", nth, off, len);
                    abort_case(chunk, "write:acked-node", nth, off, len);
                }
                abort_case(chunk, "write:after-read", 1, off, len);
                abort_case(chunk, "write:before-ack", 1, off, len);
            }
        }
        for nth in 1..=6 {
            abort_case(4096, "write:send", nth, 16384, 16384);
            abort_case(4096, "write:acked-node", nth, 16384, 16384);
        }
    }

    #[test]
    fn an_acknowledged_write_survives_an_immediate_crash() {
        // No fault armed: the write completes, the gateway dies before any clean-up.
        case("4+2", "never", 1, 4096, 4096);
    }
}

/// A map over nodes `0..6` of a larger set, and the nodes' names.
fn map_over(s: &mut Setup, nodes: &[usize]) {
    let ns: Vec<placement::Node> = nodes
        .iter()
        .map(|&i| placement::Node::new(&format!("node-{i}"), "", "", &format!("host-{i}")))
        .collect();
    let m = placement::compute(42, s.spec.pgs, &ns, s.spec.profile.width(), None).unwrap();
    s.spec.map = m
        .into_iter()
        .map(|row| row.into_iter().map(|j| nodes[j]).collect())
        .collect();
}

/// The map recomputed without `gone`, keeping every other position in place.
fn remap_without(s: &Setup, current: &[Vec<usize>], live: &[usize]) -> Vec<Vec<usize>> {
    let ns: Vec<placement::Node> = live
        .iter()
        .map(|&i| placement::Node::new(&format!("node-{i}"), "", "", &format!("host-{i}")))
        .collect();
    let prev: Vec<Vec<String>> = current
        .iter()
        .map(|r| r.iter().map(|i| format!("node-{i}")).collect())
        .collect();
    placement::compute(42, s.spec.pgs, &ns, s.spec.profile.width(), Some(&prev))
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|j| live[j]).collect())
        .collect()
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

#[test]
fn a_lost_node_is_rebuilt_elsewhere_and_then_m_more_losses_cost_nothing() {
    let mut s = setup("4+2", 4096, 8, 2 << 20);
    map_over(&mut s, &[0, 1, 2, 3, 4, 5, 6]);
    run(async {
        let v = open(&s).await;
        let mut model = pattern(21, 2 << 20);
        write(&v, 0, &model).await.unwrap();
        // Node 3 is lost for good; node 7 joins. The new map replaces node 3 everywhere.
        s.nodes.set_down(3, true);
        let new = remap_without(&s, &s.spec.map, &[0, 1, 2, 4, 5, 6, 7]);
        let moved = v.remap(new.clone(), names(8), 2).unwrap();
        let lost = s.spec.map.iter().flatten().filter(|&&n| n == 3).count();
        assert!(
            moved >= lost && lost > 0,
            "moved {moved}, node 3 held {lost}"
        );
        assert!(new.iter().flatten().all(|&n| n != 3));
        // Writes go on during the fill and land on the new nodes.
        let d = pattern(22, 100 * 1024);
        write(&v, 300 * 1024, &d).await.unwrap();
        model[300 * 1024..400 * 1024].copy_from_slice(&d);
        let p = v.fill_progress().expect("a fill is in progress");
        assert_eq!((p.generation, p.finished), (2, false));
        let h = v.health();
        let held = s.spec.map.iter().filter(|r| r.contains(&3)).count();
        assert!(
            h.rebuilding_pgs >= held && held > 0,
            "{held} PGs held node 3: {h:?}"
        );
        settle(&v).await;
        let p = v.fill_progress().unwrap();
        assert!(p.finished && p.done == p.stripes, "{p:?}");
        assert!(p.bytes >= 4096 * lost as u64, "{p:?}");
        assert!(v.filling().is_empty());
        assert_eq!(v.health().rebuilding_pgs, 0);
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        // Two more nodes of the new map lost: everything still reads back.
        s.nodes.set_down(0, true);
        s.nodes.set_down(7, true);
        assert_eq!(read(&v, 0, 2 << 20).await, model);
        assert_eq!(
            v.stats()
                .rolled_back
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        v.close();
    });
}

/// Fragments node `i` holds of the volume (any copy).
async fn held(s: &Setup, v: &EcVolume, i: usize) -> usize {
    let p = s.spec.profile;
    let ctx = tessera_rpc::VolumeCtx {
        volume: s.spec.id,
        epoch: v.epoch(),
        pgs: s.spec.pgs,
        k: p.k,
        m: p.m,
        codec: p.codec.0,
        chunk: p.chunk_size,
    };
    let stripes = s
        .spec
        .size
        .div_ceil(u64::from(p.k) * u64::from(p.chunk_size));
    s.nodes
        .store(i)
        .versions(&ctx, 0, stripes as u32)
        .await
        .expect("versions")
        .iter()
        .filter(|e| !e.slots.is_empty())
        .count()
}

/// A node a position left keeps its copies until they are trimmed; trimming takes only the
/// positions it left, never one it holds.
#[test]
fn a_position_a_node_left_is_trimmed_there_and_one_it_holds_never() {
    let mut s = setup("4+2", 4096, 8, 1 << 20);
    map_over(&mut s, &[0, 1, 2, 3, 4, 5, 6]);
    run(async {
        let v = open(&s).await;
        let model = pattern(40, 1 << 20);
        write(&v, 0, &model).await.unwrap();
        let before = held(&s, &v, 3).await;
        assert!(before > 0);
        // Node 3 leaves every position (a drain); node 7 takes them.
        let new = remap_without(&s, &s.spec.map, &[0, 1, 2, 4, 5, 6, 7]);
        v.remap(new.clone(), names(8), 2).unwrap();
        settle(&v).await;
        assert_eq!(held(&s, &v, 3).await, before, "copies stay until trimmed");
        // A position a node holds is never trimmed.
        let keeper = new[0][0];
        let kept = held(&s, &v, keeper).await;
        assert_eq!(v.trim_position(keeper, 0, 0).await.unwrap(), 0);
        assert_eq!(held(&s, &v, keeper).await, kept);
        let mut trimmed = 0;
        for (pg, row) in s.spec.map.iter().enumerate() {
            for (i, &n) in row.iter().enumerate() {
                if n == 3 {
                    trimmed += v.trim_position(3, pg as u32, i).await.unwrap();
                }
            }
        }
        assert!(trimmed >= before as u64, "{trimmed} trimmed, {before} held");
        assert_eq!(
            held(&s, &v, 3).await,
            0,
            "node 3 holds nothing of the volume"
        );
        assert_eq!(
            v.stats()
                .trimmed_fragments
                .load(std::sync::atomic::Ordering::Relaxed),
            trimmed
        );
        assert_eq!(read(&v, 0, 1 << 20).await, model);
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        v.close();
    });
}

#[test]
fn a_fill_survives_its_owner_and_resumes_where_it_was() {
    let mut s = setup("4+2", 4096, 8, 4 << 20);
    map_over(&mut s, &[0, 1, 2, 3, 4, 5, 6]);
    let model = pattern(31, 4 << 20);
    let new = remap_without(&s, &s.spec.map, &[0, 1, 2, 3, 4, 6, 7]);
    let (positions, cursor) = run(async {
        let v = open(&s).await;
        write(&v, 0, &model).await.unwrap();
        s.nodes.set_down(5, true);
        v.remap(new.clone(), names(8), 2).unwrap();
        // A few steps, then the owner dies.
        for _ in 0..3 {
            v.maintain().await;
        }
        let p = v.fill_progress().unwrap();
        assert!(!p.finished && p.done > 0 && p.done < p.stripes, "{p:?}");
        let pos = v.filling();
        v.close();
        (pos, p.done)
    });
    let mut s2 = Setup {
        _dir: tempfile::tempdir_in("/dev/shm").unwrap(),
        nodes: s.nodes.clone(),
        spec: s.spec.clone(),
    };
    s2.spec.map = new;
    run(async {
        let v = open(&s2).await;
        v.resume_fill(&positions, cursor, 2);
        assert_eq!(v.fill_progress().unwrap().done, cursor);
        settle(&v).await;
        assert!(v.fill_progress().unwrap().finished);
        let sc = v.scrub().await;
        assert_eq!((sc.inconsistent, sc.parity_mismatches), (0, 0), "{sc:?}");
        s.nodes.set_down(0, true);
        s.nodes.set_down(7, true);
        assert_eq!(read(&v, 0, 4 << 20).await, model);
        v.close();
    });
}

#[test]
fn a_fill_keeps_to_its_rate_limit() {
    let mut s = setup("4+2", 4096, 8, 2 << 20);
    map_over(&mut s, &[0, 1, 2, 3, 4, 5, 6]);
    run(async {
        let v = open(&s).await;
        write(&v, 0, &pattern(41, 2 << 20)).await.unwrap();
        s.nodes.set_down(1, true);
        let new = remap_without(&s, &s.spec.map, &[0, 2, 3, 4, 5, 6, 7]);
        // 1 KiB/s: the first batch writes several KiB, so the next waits for seconds.
        v.set_fill_rate(1024);
        v.remap(new, names(8), 2).unwrap();
        v.maintain().await;
        let after_one = v.fill_progress().unwrap();
        assert!(after_one.bytes > 0 && after_one.done > 0, "{after_one:?}");
        for _ in 0..5 {
            v.maintain().await;
        }
        assert_eq!(
            v.fill_progress().unwrap().done,
            after_one.done,
            "held by the rate limit"
        );
        // Lifted live: the fill runs to the end.
        v.set_fill_rate(0);
        settle(&v).await;
        assert!(v.fill_progress().unwrap().finished);
        v.close();
    });
}

#[test]
fn a_missing_copy_on_a_filling_node_is_no_evidence_to_undo_a_write() {
    // Two positions of every PG move at once (nodes 0 and 1 drained to 6 and 7) and a third
    // node is away: four of six positions lack nothing but only three answer with the
    // state. Without care, 3 consistent + 1 unreachable < the quorum of 5 would read as an
    // unacknowledged write and undo it; instead the stripe waits for the node.
    let mut s = setup("4+2", 4096, 8, 1 << 20);
    map_over(&mut s, &[0, 1, 2, 3, 4, 5]);
    run(async {
        let v = open(&s).await;
        let model = pattern(51, 1 << 20);
        write(&v, 0, &model).await.unwrap();
        let new: Vec<Vec<usize>> = s
            .spec
            .map
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&n| match n {
                        0 => 6,
                        1 => 7,
                        x => x,
                    })
                    .collect()
            })
            .collect();
        s.nodes.set_down(2, true);
        v.remap(new, names(8), 2).unwrap();
        for _ in 0..3 {
            v.maintain().await;
        }
        assert!(!v.fill_progress().unwrap().finished);
        let e = v.read(0, 1 << 20).await.unwrap_err();
        assert!(matches!(e, BlockError::Busy(_)), "{e:?}");
        s.nodes.set_down(2, false);
        settle(&v).await;
        assert!(v.fill_progress().unwrap().finished);
        assert_eq!(read(&v, 0, 1 << 20).await, model);
        assert_eq!(
            v.stats()
                .rolled_back
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        v.close();
    });
}

/// Closing a volume closes its node connections on every thread that used it (each thread
/// drops its handles at its next sweep, as the gateway's workers do every second): a hundred
/// volumes opened, used from two other threads and closed leave the process's open file
/// descriptors where they were.
#[test]
fn closed_volumes_leave_no_node_connections_behind_on_any_thread() {
    use std::rc::Rc;
    use std::sync::mpsc;
    use tessera_store::fragment::{FragmentStore, NodeHandler, StoreOptions};

    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let (addr_tx, addr_rx) = mpsc::channel();
    let store_dir = dir.path().to_path_buf();
    // Six storage nodes served over TCP by one thread (it lives until the process ends).
    std::thread::spawn(move || {
        run(async move {
            for i in 0..6 {
                let opts = StoreOptions {
                    node_id: format!("node-{i}"),
                    ..StoreOptions::default()
                };
                let store = FragmentStore::open(store_dir.join(format!("n{i}")), &opts).unwrap();
                let handler = Rc::new(NodeHandler::new(store));
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                tokio::task::spawn_local(async move {
                    loop {
                        let (s, _) = l.accept().await.unwrap();
                        let h = handler.clone();
                        tokio::task::spawn_local(tessera_rpc::server::serve(
                            h,
                            s,
                            std::future::pending(),
                        ));
                    }
                });
            }
            std::future::pending::<()>().await;
        })
    });
    let addrs: Vec<std::net::SocketAddr> = (0..6).map(|_| addr_rx.recv().unwrap()).collect();
    let connector: Arc<dyn Connector> = Arc::new(crate::nodes::RpcConnector::new(
        addrs,
        std::time::Duration::from_secs(5),
    ));
    let s = setup("4+2", 4096, 6, 1 << 20);
    // Two threads that use each volume they are handed, like a gateway's workers.
    let mut workers = Vec::new();
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    for _ in 0..2 {
        let (tx, rx) = mpsc::channel::<Option<EcVolume>>();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            run(async move {
                // Some(volume): use it; None: sweep (the gateway's periodic sweep); a closed
                // channel: the end (the thread's runtime, and whatever it holds, goes).
                while let Ok(job) = rx.recv() {
                    crate::nodes::sweep();
                    if let Some(v) = job {
                        assert_eq!(read(&v, 0, 65536).await.len(), 65536);
                    }
                    // Let connections whose handles were dropped close.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    done.send(crate::nodes::handles_on_this_thread()).unwrap();
                }
            })
        });
        workers.push(tx);
    }
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let mut base = 0;
    for round in 0..100 {
        let v = run(async {
            let v = EcVolume::open(s.spec.clone(), connector.clone())
                .await
                .unwrap();
            write(&v, 4096 * (round % 16), &pattern(round, 4096))
                .await
                .unwrap();
            v.release_thread();
            v
        });
        for w in &workers {
            w.send(Some(v.clone())).unwrap();
        }
        for _ in &workers {
            let held = done_rx.recv().unwrap();
            assert!(
                held <= 6,
                "round {round}: a worker holds {held} node handles"
            );
        }
        run(async { v.close() });
        if round == 4 {
            for w in &workers {
                w.send(None).unwrap();
            }
            for _ in &workers {
                done_rx.recv().unwrap();
            }
            base = fds();
        }
    }
    // The workers sweep (their threads and runtimes live on).
    for w in &workers {
        w.send(None).unwrap();
    }
    for _ in &workers {
        assert_eq!(
            done_rx.recv().unwrap(),
            0,
            "a worker kept handles of closed volumes"
        );
    }
    // The connections close asynchronously on both ends: let them.
    let mut now = fds();
    for _ in 0..100 {
        if now <= base + 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        now = fds();
    }
    println!("open file descriptors: {base} after 5 volumes, {now} after 100");
    assert!(
        now <= base + 4,
        "file descriptors grew from {base} to {now} over 95 volumes"
    );
    drop(workers);
}
