//! Write availability when placement groups lose their write quorum (issue 20, item 4), on
//! `tessera demo --backend ec` (4+2, write quorum 5):
//! - with spare nodes (eight), two nodes killed at once: the owner finds them down, says so
//!   in etcd, and the controller moves their positions in every PG left below its quorum to
//!   the spares within seconds (not after the rebuild grace period); writes issued right
//!   after the kill are acknowledged, the moved positions are rebuilt, every byte reads back;
//! - without spares (six nodes), two nodes killed: a write waits for its quorum for its bound
//!   (`gateway.write_quorum_wait_ms`), then fails with NOT READY, LOGICAL UNIT NOT READY,
//!   MANUAL INTERVENTION REQUIRED; reads go on; `tessera status` and the metrics say which PGs
//!   are write-suspended and why; a node back and writes resume by themselves.

use std::time::{Duration, Instant};

use tessera_integration_tests::initiator::{cdb10, Outcome, Session};
use tessera_integration_tests::{ec_4_2, ec_4_2_on_eight_nodes, tail, Demo, Rng};

const INITIATOR: &str = "iqn.2024-01.io.tessera:write-quorum-test";

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    cdb10(0x2a, u64::from(lba), blocks)
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    cdb10(0x28, u64::from(lba), blocks)
}

fn login(demo: &Demo, isid: u8) -> Session {
    let mut s = Session::login(
        demo.portal,
        INITIATOR,
        &demo.iqn,
        [0x80, 0, 0, 0, 0x5e, isid],
    )
    .expect("login");
    s.set_timeout(Duration::from_secs(40)).unwrap();
    let o = s.ready(0).expect("TEST UNIT READY");
    assert_eq!(o.status, 0, "LUN 0 not ready: {o:?}");
    s
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION's fixed-format sense.
fn sense(o: &Outcome) -> (u8, u8, u8) {
    assert_eq!(o.status, 2, "not a CHECK CONDITION: {o:?}");
    assert!(o.sense.len() >= 14, "short sense: {o:?}");
    (o.sense[2] & 0xf, o.sense[12], o.sense[13])
}

fn status(demo: &Demo) -> String {
    let (ok, text) = demo.tessera(&["status"]);
    assert!(ok, "tessera status failed: {text}");
    text
}

/// The value of the first sample of `name` (any labels).
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

const BLOCK: usize = 512;
/// Each write: 64 KiB, one every MiB of the volume.
const CHUNK: usize = 64 << 10;

#[test]
fn two_nodes_lost_with_spares_writes_go_on_and_the_pgs_move_at_once() {
    let demo = Demo::start(&ec_4_2_on_eight_nodes("64MiB"));
    let mut s = login(&demo, 1);
    let size: usize = 64 << 20;
    let mut model = vec![0u8; size];
    let write = |s: &mut Session, model: &mut Vec<u8>, off: usize, seed: u64| -> Duration {
        let d = bytes(seed, CHUNK);
        let t = Instant::now();
        let o = s
            .command(
                0,
                &write10((off / BLOCK) as u32, (CHUNK / BLOCK) as u16),
                &d,
                0,
            )
            .expect("WRITE(10)");
        let took = t.elapsed();
        assert_eq!(o.status, 0, "write at {off} failed: {o:?}");
        model[off..off + CHUNK].copy_from_slice(&d);
        took
    };
    for (i, off) in (0..size).step_by(1 << 20).enumerate() {
        write(&mut s, &mut model, off, i as u64);
    }
    // Two nodes die at once: every PG holding both has four positions left, below five.
    demo.kill_node(1);
    demo.kill_node(2);
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    for (i, off) in (0..size).step_by(1 << 20).enumerate() {
        slowest = slowest.max(write(&mut s, &mut model, off + CHUNK, 1000 + i as u64));
    }
    println!(
        "64 writes across the volume after the kill: all acknowledged in {:.1} s, the slowest in {:.1} s",
        killed.elapsed().as_secs_f64(),
        slowest.as_secs_f64()
    );
    // The controller moved the silent positions of the PGs below quorum (not after the
    // grace period of 10 minutes).
    let (vol, moves) = demo.cluster(async |c| {
        let v = c.volumes().await.unwrap().remove(0);
        let m = c.moves(v.id).await.unwrap();
        (v, m)
    });
    let quorum: Vec<_> = moves
        .iter()
        .flat_map(|(_, ms)| ms.iter())
        .filter(|m| m.reason == tessera_cluster::MoveReason::Quorum)
        .collect();
    assert!(
        !quorum.is_empty(),
        "no position moved for quorum: {moves:?}\n{}",
        tail(&demo.log(), 40)
    );
    assert!(
        quorum
            .iter()
            .all(|m| m.from.ends_with("-1") || m.from.ends_with("-2")),
        "only the dead nodes' positions move: {quorum:?}"
    );
    println!(
        "volume {}: {} positions moved for quorum (from the two dead nodes to spares)",
        vol.name,
        quorum.len()
    );
    // The moved positions are rebuilt; then every byte reads back, and a further write
    // everywhere is whole on its nodes.
    let start = Instant::now();
    loop {
        let st = status(&demo);
        if st.contains("rebuild of map") && st.contains("done") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the moved positions were not rebuilt:\n{st}\n{}",
            tail(&demo.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let read_all = |s: &mut Session, when: &str| {
        for off in (0..size).step_by(1 << 20) {
            let o = s
                .command(0, &read10((off / BLOCK) as u32, 256), &[], 128 << 10)
                .expect("READ(10)");
            assert_eq!(o.status, 0, "read at {off} {when}: {o:?}");
            assert!(
                o.data == model[off..off + (128 << 10)],
                "data differs at {off} {when}"
            );
        }
    };
    read_all(&mut s, "after the move");
    // The two nodes come back: placement gives them positions again (rebalancing, one
    // position per PG per change), and the fragments they still hold for positions they
    // left are trimmed.
    let positions = |demo: &Demo| {
        demo.cluster(async |c| {
            let map = c.pg_map(vol.id).await.unwrap().expect("a map");
            map.map
                .iter()
                .flatten()
                .filter(|&&i| ["node-1", "node-2"].contains(&map.nodes[i].id.as_str()))
                .count()
        })
    };
    let held_after_move = positions(&demo);
    let mut demo = demo;
    demo.restart_node(1);
    demo.restart_node(2);
    let start = Instant::now();
    let (trimmed, used) = loop {
        let m = demo.gateway_metrics();
        let trimmed = m
            .lines()
            .find(|l| l.contains("event=\"trimmed_fragment\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let used = positions(&demo);
        if trimmed > 0.0 && used > held_after_move {
            break (trimmed, used);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "back for {:?}: {trimmed} fragments trimmed, the two nodes hold {used} positions (after the move: {held_after_move})\n{}",
            start.elapsed(),
            tail(&demo.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "node-1 and node-2 back: {trimmed} fragments of positions they left trimmed, {held_after_move} -> {used} positions held by them after {:.1} s (rebalancing)",
        start.elapsed().as_secs_f64()
    );
    read_all(&mut s, "after the nodes came back");
    drop(s);
    assert!(demo.stop(), "demo did not stop cleanly");
}

#[test]
fn two_nodes_lost_without_spares_writes_fail_as_not_ready_then_resume() {
    let mut demo = Demo::start(&ec_4_2(&[
        "--size",
        "16MiB",
        "--write-quorum-wait-ms",
        "2000",
    ]));
    let mut s = login(&demo, 2);
    let first = bytes(1, CHUNK);
    let o = s.command(0, &write10(0, 128), &first, 0).expect("write");
    assert_eq!(o.status, 0, "{o:?}");
    demo.kill_node(0);
    demo.kill_node(3);
    // Every PG of six nodes holds both: no write can reach five nodes, and there is no node
    // to move to. The write waits its two seconds, then fails in a way Linux does not retry.
    let t = Instant::now();
    let o = s
        .command(0, &write10(256, 128), &bytes(2, CHUNK), 0)
        .expect("write");
    let took = t.elapsed();
    assert_eq!(
        sense(&o),
        (0x2, 0x04, 0x03),
        "not NOT READY, MANUAL INTERVENTION REQUIRED: {o:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "failed after {took:?}, not after its 2 s bound"
    );
    // Reads go on.
    let o = s
        .command(0, &read10(0, 128), &[], CHUNK as u32)
        .expect("read");
    assert_eq!(o.status, 0, "{o:?}");
    assert!(
        o.data == first,
        "read back different while writes are suspended"
    );
    // Status and metrics say so, and why.
    let start = Instant::now();
    let st = loop {
        let st = status(&demo);
        if st.contains("writes suspended") {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "status does not say writes are suspended:\n{st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let line = st
        .lines()
        .find(|l| l.contains("writes suspended"))
        .unwrap()
        .to_string();
    println!("tessera status: {}", line.trim());
    assert!(
        line.contains("node-0") && line.contains("node-3"),
        "the reason names the nodes: {line}"
    );
    let m = demo.gateway_metrics();
    let pgs = sample(&m, "tessera_volume_write_suspended_pgs").unwrap_or(0.0);
    assert!(pgs > 0.0, "write-suspended PGs not in the metrics");
    let failed = m
        .lines()
        .find(|l| l.contains("event=\"suspended_write\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failed >= 1.0, "the failed write is not counted:\n{m}");
    // A node comes back: writes resume without anyone doing anything.
    demo.restart_node(3);
    let start = Instant::now();
    let d = bytes(3, CHUNK);
    loop {
        let o = s.command(0, &write10(256, 128), &d, 0).expect("write");
        if o.status == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "writes did not resume with node 3 back: {o:?}\n{}",
            tail(&demo.log(), 40)
        );
    }
    println!(
        "writes resumed {:.1} s after node 3 restarted",
        start.elapsed().as_secs_f64()
    );
    let o = s
        .command(0, &read10(256, 128), &[], CHUNK as u32)
        .expect("read");
    assert!(o.status == 0 && o.data == d, "the resumed write reads back");
    let start = Instant::now();
    while status(&demo).contains("writes suspended") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "status still says writes are suspended"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(s);
    assert!(demo.stop(), "demo did not stop cleanly");
}
