//! Erasure-coded volumes end to end: `tessera demo --backend ec` (six `tessera node`
//! processes and a gateway, 4+2), written and read through iSCSI with `qemu-img`, with nodes
//! killed (SIGKILL) and restarted, fragments damaged on disk, and a second gateway fencing
//! the first.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_integration_tests::images::{compare, convert, random_file};
use tessera_integration_tests::initiator::Session;
use tessera_integration_tests::{require_tool, Demo, Gateway};

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
    let out = &demo.node_cmd("stats")[i];
    let t = String::from_utf8_lossy(&out.stdout);
    t.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {t}"))
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
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
    let s = seed();
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
    }
    assert!(compare(&src, &url));
    assert!(demo.stop());
}

#[test]
fn a_gateway_with_an_older_epoch_is_refused() {
    let demo = Demo::start(&["--backend", "ec", "--ec", "2+1", "--size", "64MiB"]);
    let mut a = Session::login(
        demo.portal,
        "iqn.2024-01.test:fence",
        &demo.iqn,
        [0x80, 0, 0, 0, 0, 1],
    )
    .expect("login to the first gateway");
    a.ready(0).unwrap();
    let w10 = [0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    assert_eq!(a.command(0, &w10, &[0x11; 512], 0).unwrap().status, 0);
    // The first gateway is cut off: etcd sees its ownership go (as when its lease expires
    // in a partition) while it still reaches the nodes. A second gateway of the cluster (its
    // own id and portal) takes the volume over with a new fencing epoch.
    let cfg = std::fs::read_to_string(demo.dir.path().join("gateway.toml"))
        .unwrap()
        .replace(&demo.portal.to_string(), "127.0.0.1:{PORT}")
        .replace("gateway_id = \"gw-0\"", "gateway_id = \"gw-1\"");
    let (id, before) = demo.cluster(async |c| {
        let v = c.volume("demo").await.unwrap().expect("the demo volume");
        let before = c.epoch(v.id).await.unwrap();
        let owners = c.key("owners/");
        c.client()
            .delete(
                owners,
                Some(tessera_cluster::etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        (v.id, before)
    });
    let b = Gateway::start(&cfg);
    let (owner, after) =
        demo.cluster(async |c| (c.owner(id).await.unwrap(), c.epoch(id).await.unwrap()));
    assert_eq!(owner.map(|o| o.gateway).as_deref(), Some("gw-1"));
    assert!(
        after > before,
        "the takeover raised the epoch ({before} -> {after})"
    );
    let mut bs = Session::login(
        b.portal,
        "iqn.2024-01.test:fence",
        &demo.iqn,
        [0x80, 0, 0, 0, 0, 2],
    )
    .expect("login to the second gateway");
    bs.ready(0).unwrap();
    // The first gateway is refused by the nodes: its write fails (BUSY, retryable), and its
    // log says why.
    let r = a.command(0, &w10, &[0x22; 512], 0).unwrap();
    assert_eq!(
        r.status, 0x08,
        "expected BUSY from the fenced gateway, got {r:?}"
    );
    // The new owner's data stands.
    let r10 = [0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    let o = bs.command(0, &r10, &[], 512).unwrap();
    assert_eq!(
        (o.status, o.data[0]),
        (0, 0x11),
        "the fenced write did not land"
    );
    assert_eq!(bs.command(0, &w10, &[0x33; 512], 0).unwrap().status, 0);
    let rejects: u64 = (0..3)
        .map(|i| node_stat(&demo, i, "stale_epoch_rejects"))
        .sum();
    assert!(rejects > 0, "nodes counted the stale epoch");
    drop(a);
    let log = demo.log();
    let line = log
        .lines()
        .find(|l| l.contains("fenced"))
        .unwrap_or_else(|| panic!("the fenced gateway did not say why:\n{log}"));
    println!("{line}");
    assert!(line.contains("newer than this gateway"), "{line}");
    assert!(demo.stop());
    drop(b);
}
