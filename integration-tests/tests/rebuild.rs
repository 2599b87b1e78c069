//! Node loss and rebuild, end to end (issue 4, acceptance 2), on `tessera demo --backend ec`
//! with eight nodes for a 4+2 volume:
//! - a node away for less than the grace period keeps its place in the map and, back, gets
//!   only the writes it missed;
//! - a node gone for good (past the grace period, shortened for the test) has its positions
//!   moved to the other nodes by the controller and rebuilt there by the owner, throttled,
//!   with progress in `tessera status`; afterwards two more nodes can go and every byte still
//!   reads back.

use std::time::{Duration, Instant};

use tessera_integration_tests::images::{compare, convert, random_file};
use tessera_integration_tests::{ec_4_2_on_eight_nodes, require_tool, tail, Demo};

fn tessera(demo: &Demo, args: &[&str]) -> (bool, String) {
    demo.tessera(args)
}

fn status(demo: &Demo) -> String {
    let (ok, text) = tessera(demo, &["status"]);
    assert!(ok, "tessera status failed: {text}");
    text
}

fn node_stat(demo: &Demo, i: usize, key: &str) -> u64 {
    demo.node_stat(i, key)
}

/// Wait until the gateway logs `line` once more than `before` times.
fn wait_log(demo: &Demo, line: &str, before: usize, limit: Duration, what: &str) {
    let start = Instant::now();
    while demo.log().matches(line).count() <= before {
        assert!(
            start.elapsed() < limit,
            "{what}: no {line:?} in {limit:?}; log tail:\n{}",
            tail(&demo.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_lost_node_is_rebuilt_elsewhere_and_two_more_losses_cost_nothing() {
    require_tool("qemu-img", "qemu-utils and qemu-block-extra");
    let demo = Demo::start(&ec_4_2_on_eight_nodes("64MiB"));
    assert_eq!(demo.nodes().len(), 8);
    let url = demo.url(0);
    let dir = demo.dir.path().to_path_buf();
    let src = dir.join("source.img");
    random_file(&src, 64, 0xb17d);
    convert(&src, &url);
    let st = status(&demo);
    assert!(st.contains("map epoch 1"), "{st}");

    // 1. Away within the grace period (10 minutes by default): the map stays, and back, the
    //    node is sent only what it missed.
    let mut demo = demo;
    demo.kill_node(1);
    let part = dir.join("part.img");
    random_file(&part, 4, 0xde17a);
    convert(&part, &url);
    {
        // The model: the first 4 MiB replaced.
        let mut model = std::fs::read(&src).unwrap();
        model[..4 << 20].copy_from_slice(&std::fs::read(&part).unwrap());
        std::fs::write(&src, model).unwrap();
    }
    const WHOLE: &str = "volume whole again";
    let before = demo.log().matches(WHOLE).count();
    demo.restart_node(1);
    wait_log(
        &demo,
        WHOLE,
        before,
        Duration::from_secs(120),
        "node-1 catching up",
    );
    let caught_up = node_stat(&demo, 1, "writes");
    let held = node_stat(&demo, 0, "writes");
    println!("node-1 back: {caught_up} fragment writes to catch up (node-0 took {held} in all)");
    assert!(caught_up > 0, "node-1 was not brought up to date");
    assert!(
        caught_up * 4 < held,
        "node-1 got more than what it missed: {caught_up} writes vs {held}"
    );
    let st = status(&demo);
    assert!(
        st.contains("map epoch 1") && !st.contains("rebuild"),
        "no data moved for a node back within the grace period:\n{st}"
    );
    assert!(compare(&src, &url), "data differs after node-1 came back");

    // 2. Gone for good: a short grace period and a slow rebuild, to watch it.
    for (k, v) in [("rebuild-grace", "2s"), ("rebuild-rate", "4MiB")] {
        let (ok, text) = tessera(&demo, &["cluster", "set", k, v]);
        assert!(ok, "{text}");
    }
    let (ok, shown) = tessera(&demo, &["cluster", "show"]);
    assert!(
        ok && shown.contains("rebuild-grace 2s") && shown.contains("rebuild-rate 4194304"),
        "{shown}"
    );
    demo.kill_node(3);
    let t = Instant::now();
    // An operator following it once it has started: `tessera cluster wait-rebuild` (plain
    // lines, not a terminal).
    let mut follower = None;
    let mut progress = Vec::new();
    let done = loop {
        let st = status(&demo);
        if let Some(l) = st.lines().find(|l| l.contains("rebuild")) {
            let l = l.trim().to_string();
            if follower.is_none() && l.contains("rebuilding map") {
                follower = Some(tessera_integration_tests::Started(
                    std::process::Command::new(tessera_integration_tests::tessera_bin())
                        .args(["cluster", "wait-rebuild", "--timeout", "4m"])
                        .env("TESSERA_ETCD", demo.etcd())
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .expect("tessera cluster wait-rebuild"),
                ));
            }
            if progress.last() != Some(&l) {
                println!("{:>5.1} s  {l}", t.elapsed().as_secs_f64());
                progress.push(l.clone());
            }
            if l.contains(": done") {
                break st;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the rebuild did not finish; status:\n{st}\nlog tail:\n{}",
            tail(&demo.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("{done}");
    assert!(
        progress
            .iter()
            .any(|l| l.contains("rebuilding map") && l.contains('%')),
        "progress was never shown: {progress:?}"
    );
    // Moved off, node-3 is forgotten: no map names it.
    assert!(!done.contains("node-3"), "{done}");
    // The replacement may leave a PG or two a position away from what placement wants: a
    // rebalance follows once the rebuild is whole. Wait until the map is settled (its fill
    // whole, no newer map for a few controller rounds) before losing more nodes.
    let settle = Instant::now();
    let mut last = (0, Instant::now());
    let moves = loop {
        let (epoch, filled, moves) = demo.cluster(async |c| {
            let v = c.volume("demo").await.unwrap().unwrap();
            let map = c.pg_map(v.id).await.unwrap().unwrap();
            assert!(
                map.nodes.iter().all(|n| n.id != "node-3"),
                "node-3 is out of the map"
            );
            let fill = c.fill(v.id).await.unwrap();
            let filled = fill.is_some_and(|f| f.fills(map.epoch));
            (map.epoch, filled, c.moves(v.id).await.unwrap())
        });
        if epoch != last.0 {
            last = (epoch, Instant::now());
        }
        if filled && last.1.elapsed() > Duration::from_secs(5) {
            break moves;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(120),
            "the map did not settle after the rebuild (epoch {epoch}); moves: {moves:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(moves[0].0, 2, "the rebuild is the first change: {moves:?}");
    assert!(
        moves[0]
            .1
            .iter()
            .all(|m| m.from == "node-3" && m.reason == tessera_cluster::MoveReason::Lost),
        "the rebuild moves node-3's positions and nothing else: {:?}",
        moves[0]
    );
    let follow: Vec<_> = moves[1..].iter().flat_map(|(_, m)| m).collect();
    assert!(
        follow
            .iter()
            .all(|m| m.reason == tessera_cluster::MoveReason::Rebalance && m.to != "node-3"),
        "only rebalancing follows the rebuild: {follow:?}"
    );
    println!(
        "rebuild: {} positions moved off node-3 in {:.1} s; then {} rebalancing move(s) in {} change(s)",
        moves[0].1.len(),
        t.elapsed().as_secs_f64(),
        follow.len(),
        moves.len() - 1
    );
    assert!(compare(&src, &url), "data differs after the rebuild");
    let mut follower = follower.expect("the rebuild was seen in progress");
    let waited = Instant::now();
    let status = loop {
        if let Some(st) = follower.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "wait-rebuild still waiting with the map settled"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut said = String::new();
    use std::io::Read;
    follower
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    follower
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    println!("tessera cluster wait-rebuild:\n{said}");
    assert!(status.success(), "{said}");
    assert!(
        said.contains("demo map 2: ")
            && said.contains("% (")
            && said.contains("demo map 2: done")
            && said.trim_end().ends_with("no rebuild in progress"),
        "progress lines, the end of the rebuild and the wait's end: {said}"
    );

    // 3. Two more nodes lost: the rebuilt fragments carry the data.
    demo.kill_node(0);
    demo.kill_node(6);
    assert!(
        compare(&src, &url),
        "data differs with node-3 rebuilt away and nodes 0 and 6 dead"
    );
    assert!(demo.stop());
}
