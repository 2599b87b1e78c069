//! A disk that fails a sync, for real (issue 20, item 1): storage node 2 of an ec demo (4+2
//! over eight nodes) keeps its store on a FUSE file system of the test's own
//! ([`tessera_integration_tests::faultyfs`]), which starts answering every `fdatasync` with
//! EIO in the middle of the run. The node must say so (`tessera node stats`, its metric, its
//! state in etcd), refuse every write from then on, and the cluster must treat its fragments
//! as lost at once: the controller moves its positions, the owner rebuilds them elsewhere,
//! writes go on meanwhile, and every acknowledged byte reads back.

use std::time::{Duration, Instant};

use tessera_integration_tests::faultyfs::FaultyMount;
use tessera_integration_tests::initiator::{cdb10, Session};
use tessera_integration_tests::{ec_4_2_on_eight_nodes, http_get, tail, Demo, Rng};

const INITIATOR: &str = "iqn.2024-01.io.tessera:failed-sync-test";
const BLOCK: usize = 512;
const CHUNK: usize = 64 << 10;
const SIZE: usize = 64 << 20;

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

/// Write 64 KiB at every MiB of the volume (at `shift` into each), recording it in `model`.
fn write_across(s: &mut Session, model: &mut [u8], shift: usize, seed: u64) {
    for (i, off) in (0..SIZE).step_by(1 << 20).enumerate() {
        let off = off + shift;
        let d = bytes(seed + i as u64, CHUNK);
        let o = s
            .command(
                0,
                &cdb10(0x2a, (off / BLOCK) as u64, (CHUNK / BLOCK) as u16),
                &d,
                0,
            )
            .expect("WRITE(10)");
        assert_eq!(o.status, 0, "write at {off} failed: {o:?}");
        model[off..off + CHUNK].copy_from_slice(&d);
    }
}

fn read_all(s: &mut Session, model: &[u8], when: &str) {
    for off in (0..SIZE).step_by(256 << 10) {
        let o = s
            .command(
                0,
                &cdb10(0x28, (off / BLOCK) as u64, ((256 << 10) / BLOCK) as u16),
                &[],
                256 << 10,
            )
            .expect("READ(10)");
        assert_eq!(o.status, 0, "read at {off} {when}: {o:?}");
        assert!(
            o.data == model[off..off + (256 << 10)],
            "data differs at {off} {when}"
        );
    }
}

#[test]
fn a_node_whose_disk_fails_a_sync_says_so_and_is_rebuilt_elsewhere() {
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE (modprobe fuse)"
    );
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes");
    let mnt = dir.path().join("faulty");
    std::fs::create_dir_all(&nodes).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = FaultyMount::mount(&mnt, &dir.path().join("node-2.backing"))
        .expect("mount the test's FUSE file system (needs root and /dev/fuse)");
    std::os::unix::fs::symlink(fs.file(), nodes.join("node-2.store")).unwrap();
    let demo = Demo::start_in(dir, &ec_4_2_on_eight_nodes("64MiB"));
    let mut s =
        Session::login(demo.portal, INITIATOR, &demo.iqn, [0x80, 0, 0, 0, 0x5f, 1]).expect("login");
    s.set_timeout(Duration::from_secs(40)).unwrap();
    assert_eq!(s.ready(0).expect("TEST UNIT READY").status, 0);
    let mut model = vec![0u8; SIZE];
    write_across(&mut s, &mut model, 0, 1);
    let synced = fs.faults.syncs.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        synced > 0,
        "node-2 never synced: its store is not on the FUSE file system"
    );
    // The disk goes bad: every sync fails from now on. Writes go on (quorum 5 of the 6).
    fs.faults
        .fail_syncs
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let failed_at = Instant::now();
    write_across(&mut s, &mut model, CHUNK, 100);
    assert!(
        fs.faults
            .failed_syncs
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "no sync of node-2 was failed"
    );
    // The node says so: `tessera node stats`, its metric (refreshed every second), its
    // state in etcd.
    let metrics = demo.metrics_addrs("node").remove(2);
    let start = Instant::now();
    loop {
        let (_, body) = http_get(&metrics, "/metrics");
        let metric = body.lines().any(|l| l == "tessera_node_store_failed 1");
        let stats = String::from_utf8_lossy(&demo.node_cmd("stats")[2].stdout).into_owned();
        let (ok, list) = demo.tessera(&["node", "list"]);
        let failed_in_etcd = ok
            && list
                .lines()
                .any(|l| l.contains("node-2") && l.contains("failed"));
        if stats.contains("FAILED") && failed_in_etcd && metric {
            println!("node-2: {}", stats.trim());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node-2 does not say its store failed (metric 1: {metric}):\n{stats}\n{list}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The controller moves node-2's positions at once (no grace period), the owner rebuilds
    // them on the others.
    let start = Instant::now();
    loop {
        let (_, st) = demo.tessera(&["status"]);
        if st.contains("rebuild of map") && st.contains("done") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "node-2's fragments were not rebuilt elsewhere:\n{st}\n{}",
            tail(&demo.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let moved = demo.cluster(async |c| {
        let v = c.volumes().await.unwrap().remove(0);
        let map = c.pg_map(v.id).await.unwrap().expect("a map");
        assert!(
            map.nodes.iter().all(|n| n.id != "node-2"),
            "node-2 is still in the map"
        );
        c.moves(v.id)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|(_, m)| m)
            .filter(|m| m.from == "node-2")
            .count()
    });
    println!(
        "node-2's {moved} positions rebuilt elsewhere {:.1} s after its disk started failing syncs",
        failed_at.elapsed().as_secs_f64()
    );
    assert!(moved > 0);
    // Writes go on, and everything acknowledged reads back.
    write_across(&mut s, &mut model, 2 * CHUNK, 200);
    read_all(&mut s, &model, "after node-2's disk failed");
    drop(s);
    assert!(demo.stop(), "demo did not stop cleanly");
    drop(fs);
}
