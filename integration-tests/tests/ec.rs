//! Erasure-coded volumes end to end: `tessera demo --backend ec` (six `tessera node`
//! processes and a gateway, 4+2), written and read through iSCSI with `qemu-img`, with nodes
//! killed (SIGKILL) and restarted, fragments damaged on disk, and a second gateway fencing
//! the first.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_integration_tests::images::{compare, convert, random_file};
use tessera_integration_tests::initiator::Session;
use tessera_integration_tests::{open_volume, require_tool, seed, Demo};

fn qemu() {
    require_tool("qemu-img", "qemu-utils and qemu-block-extra");
}

/// Every node's own scrub: (fragment copies checked, mismatches).
fn scrub_all(demo: &Demo) -> Vec<(u64, u64)> {
    demo.node_cmd("scrub")
        .into_iter()
        .map(|o| {
            let t = String::from_utf8_lossy(&o.stdout).to_string();
            println!("{}", t.trim());
            let num = |before: &str| -> u64 {
                t.split(before)
                    .next()
                    .and_then(|s| s.split_whitespace().last())
                    .and_then(|n| n.trim_start_matches('(').parse().ok())
                    .unwrap_or(u64::MAX)
            };
            (num(" fragment copies"), num(" mismatches"))
        })
        .collect()
}

fn node_stat(demo: &Demo, i: usize, key: &str) -> u64 {
    demo.node_stat(i, key)
}

#[test]
fn losing_any_two_of_six_nodes_loses_nothing() {
    qemu();
    let mut demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "256MiB"]);
    assert_eq!(demo.nodes().len(), 6, "six node processes in demo.json");
    let src = demo.dir.path().join("source.img");
    random_file(&src, 256, 0x5eed);
    let url = demo.url(0);
    let t = Instant::now();
    convert(&src, &url);
    println!("wrote 256 MiB in {:.1} s", t.elapsed().as_secs_f64());
    // Two nodes chosen at random (printed, so a failure can be replayed by eye).
    let s = seed("losing_any_two_of_six_nodes_loses_nothing");
    let a = (s % 6) as usize;
    let b = (a + 1 + ((s >> 8) % 5) as usize) % 6;
    println!("killing nodes {a} and {b}");
    demo.kill_node(a);
    demo.kill_node(b);
    assert!(
        compare(&src, &url),
        "data differs with nodes {a} and {b} dead"
    );
    demo.restart_node(a);
    demo.restart_node(b);
    assert!(compare(&src, &url), "data differs after the nodes returned");
    // Give the gateway's maintenance a moment, then every node's scrub is clean.
    std::thread::sleep(Duration::from_secs(2));
    for (i, (checked, bad)) in scrub_all(&demo).into_iter().enumerate() {
        assert!(checked > 0, "node {i} holds fragments");
        assert_eq!(bad, 0, "node {i} has damaged fragments");
    }
    assert!(demo.stop());
}

#[test]
fn a_node_killed_mid_write_loses_nothing_acknowledged() {
    qemu();
    let mut demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "128MiB"]);
    let src = demo.dir.path().join("source.img");
    random_file(&src, 128, 0xfeed);
    let url = demo.url(0);
    // Write in the background; kill a node while the write runs.
    let mut writer = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&url)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    demo.kill_node(3);
    let st = writer.wait().unwrap();
    assert!(st.success(), "the write failed with one node of six gone");
    assert!(compare(&src, &url), "data differs with node 3 dead");
    // The node restarts from its disk after kill -9 and is brought up to date. The gateway
    // says so in its log once no node is behind and nothing waits for repair.
    const WHOLE: &str = "volume whole again";
    let before = demo.log().matches(WHOLE).count();
    demo.restart_node(3);
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if demo.log().matches(WHOLE).count() > before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "node 3 never caught up"
        );
    }
    let writes = node_stat(&demo, 3, "writes");
    println!(
        "node 3 caught up ({writes} fragments rewritten) after {:?}",
        start.elapsed()
    );
    assert!(writes > 0, "node 3 was brought up to date without a write");
    for (i, (checked, bad)) in scrub_all(&demo).into_iter().enumerate() {
        assert!(checked > 0, "node {i} holds fragments");
        assert_eq!(bad, 0, "node {i} has damaged fragments");
    }
    // With node 3 current again, any two others may go.
    demo.kill_node(0);
    demo.kill_node(5);
    assert!(
        compare(&src, &url),
        "data differs after catching up and losing two others"
    );
    assert!(demo.stop());
}

#[test]
fn bit_rot_on_a_node_is_read_around_counted_and_repaired() {
    qemu();
    let demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "64MiB"]);
    let src = demo.dir.path().join("source.img");
    random_file(&src, 64, 0xb17);
    let url = demo.url(0);
    convert(&src, &url);
    // Damage the data of every data fragment (index < k) on node 2's disk. O_DIRECT reads see
    // the change at once.
    let store = demo.dir.path().join("nodes").join("node-2.store");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&store)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut damaged = 0;
    let mut off = (8 << 10) + (32 << 20); // the extent area (FORMAT.md)
    let mut hdr = [0u8; 16];
    while off + 4096 <= len {
        f.read_exact_at(&mut hdr, off).unwrap();
        if &hdr[..4] == b"TSFR" && hdr[9] < hdr[7] && hdr[5] & 3 == 0 {
            let mut b = [0u8; 64];
            f.read_exact_at(&mut b, off + 4096 + 999).unwrap();
            for x in &mut b {
                *x ^= 0x3c;
            }
            f.write_all_at(&b, off + 4096 + 999).unwrap();
            damaged += 1;
        }
        off += 4096;
    }
    f.sync_all().unwrap();
    drop(f);
    println!("damaged {damaged} data fragments on node 2");
    assert!(damaged > 50);
    assert!(compare(&src, &url), "reads did not route around the damage");
    let errors = node_stat(&demo, 2, "checksum_errors");
    assert!(errors > 0, "the node counted checksum errors");
    println!("node 2 checksum_errors {errors}");
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (_, bad) = scrub_all(&demo)[2];
        if bad == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "node 2 never repaired ({bad} left)"
        );
        // A read hedged around node 2 while it was slow did not see the damage there; a later
        // read does (and queues the repair).
        assert!(compare(&src, &url));
    }
    assert!(compare(&src, &url));
    assert!(demo.stop());
}

#[test]
fn a_gateway_with_an_older_epoch_is_refused() {
    use tessera_proto::block::BlockDevice;
    let demo = Demo::start(&["--backend", "ec", "--ec", "2+1", "--size", "64MiB"]);
    let mut a = Session::open(
        demo.portal,
        "iqn.2024-01.test:fence",
        &demo.iqn,
        [0x80, 0, 0, 0, 0, 1],
    );
    let w10 = [0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    assert_eq!(a.command(0, &w10, &[0x11; 512], 0).unwrap().status, 0);
    // A second gateway's data path holds the volume at the current epoch, as a gateway does
    // that is about to be cut off from etcd while it still reaches the nodes. Then the
    // volume's ownership moves on (its owner key goes, as when a lease expires in a
    // partition, and it is taken again with a raised epoch). The cut-off gateway's write is
    // refused by the nodes, with a clear error, and lands nowhere.
    let etcd = demo.etcd();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let (before, after, refused) = local.block_on(&rt, async {
        let c = tessera_cluster::Cluster::connect(&[etcd], tessera_cluster::DEFAULT_PREFIX)
            .await
            .unwrap();
        let v = c.volume("demo").await.unwrap().expect("the demo volume");
        let map = c.pg_map(v.id).await.unwrap().expect("its map");
        let before = c.epoch(v.id).await.unwrap();
        let cut_off = open_volume(&v, &map, Some(before), Duration::from_secs(2))
            .await
            .expect("open at the current epoch");
        c.meta().delete(c.key("owners/"), true).await.unwrap();
        let start = Instant::now();
        let mut after = before;
        while after <= before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nobody took it over"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = c.epoch(v.id).await.unwrap();
        }
        let refused = cut_off
            .write(8 * 512, bytes::Bytes::from(vec![0x22u8; 512]), false)
            .await
            .expect_err("the nodes refuse an older epoch");
        cut_off.close();
        (before, after, refused.to_string())
    });
    println!("epoch {before} -> {after}; the cut-off writer was told: {refused}");
    assert!(refused.contains("fenced by a newer owner"), "{refused}");
    let log = demo.log();
    assert!(
        !log.contains("newer than this gateway"),
        "the owner itself was never fenced"
    );
    let rejects: u64 = (0..3)
        .map(|i| node_stat(&demo, i, "stale_epoch_rejects"))
        .sum();
    assert!(rejects > 0, "nodes counted the stale epoch");
    // The owner (with the raised epoch) serves on: the refused write did not land, its own
    // writes do. Its new logical unit first says the access state changed.
    a.ready(0).unwrap();
    let r10 = [0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    let o = a.command(0, &r10, &[], 512).unwrap();
    assert_eq!(
        (o.status, o.data[0]),
        (0, 0x11),
        "the fenced write did not land"
    );
    assert_eq!(a.command(0, &w10, &[0x33; 512], 0).unwrap().status, 0);
    drop(a);
    assert!(demo.stop());
}
