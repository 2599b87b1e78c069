//! The control plane in etcd, end to end: `tessera demo --backend ec` runs a private etcd
//! member; its nodes register under leases, its volume is created through etcd and served by
//! the gateway, which also exports volumes created later (`tessera volume create`) as new
//! LUNs without a restart, and drops deleted ones. `tessera status` and `tessera node list`
//! show what etcd holds.

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_integration_tests::images::{compare, convert, random_file};
use tessera_integration_tests::Started;
use tessera_integration_tests::{require_tool, run, tessera_bin, Demo};

fn tessera(demo: &Demo, args: &[&str]) -> (bool, String) {
    demo.tessera(args)
}

/// Wait until `tessera ARGS` prints something `pred` accepts.
fn wait_for(demo: &Demo, args: &[&str], what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let (ok, text) = tessera(demo, args);
        if ok && pred(&text) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: `tessera {}` printed:\n{text}",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn luns(demo: &Demo) -> String {
    let out = run(
        Command::new("iscsi-ls")
            .arg("-s")
            .arg(format!("iscsi://{}", demo.portal)),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn volumes_created_through_etcd_are_served_without_a_restart() {
    require_tool("qemu-img", "qemu-utils and qemu-block-extra");
    require_tool("iscsi-ls", "libiscsi-bin");
    let mut demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "64MiB"]);
    let pids = demo.process_pids();
    assert_eq!(pids.len(), 8, "gateway, six nodes and etcd in demo.json");

    // Everything registered; the demo volume placed, owned and served.
    let status = wait_for(&demo, &["status"], "the demo cluster", |t| {
        t.contains("nodes: 6 up") && t.contains("owner gw-0")
    });
    println!("{status}");
    assert!(status.contains("controller: gw-0"), "{status}");
    assert!(status.contains("demo lun 0 67108864 bytes 4+2"), "{status}");
    assert!(luns(&demo).contains("Lun:0 "));

    // A new volume: a new LUN on the running gateway, usable at once.
    let (ok, text) = tessera(
        &demo,
        &[
            "volume", "create", "second", "--size", "16MiB", "--ec", "2+1", "--chunk", "4KiB",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("LUN 1"), "{text}");
    let start = Instant::now();
    while !luns(&demo).contains("Lun:1 ") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "LUN 1 never appeared: {}",
            luns(&demo)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 16, 7);
    convert(&src, &demo.url(1));
    assert!(
        compare(&src, &demo.url(1)),
        "LUN 1 reads back what was written"
    );
    let (ok, list) = tessera(&demo, &["volume", "list"]);
    assert!(ok, "{list}");
    println!("{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("second") && l.contains("2+1") && l.contains("gw-0")),
        "{list}"
    );
    // Growing it: a logged-in initiator is told (UNIT ATTENTION, CAPACITY DATA HAS
    // CHANGED) and READ CAPACITY reports the new size.
    let mut sess = tessera_integration_tests::initiator::Session::login(
        demo.portal,
        "iqn.2024-01.test:resize",
        &demo.iqn,
        [0x80, 0, 0, 0, 0, 9],
    )
    .expect("login");
    sess.ready(1).unwrap();
    let rc16 = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let last_lba = |o: &tessera_integration_tests::initiator::Outcome| {
        u64::from_be_bytes(o.data[..8].try_into().unwrap())
    };
    let o = sess.command(1, &rc16, &[], 32).unwrap();
    assert_eq!((o.status, last_lba(&o)), (0, (16 << 20) / 512 - 1));
    let (ok, text) = tessera(&demo, &["volume", "resize", "second", "--size", "32MiB"]);
    assert!(ok, "{text}");
    let (ok, text) = tessera(&demo, &["volume", "resize", "second", "--size", "8MiB"]);
    assert!(!ok && text.contains("never shrink"), "{text}");
    let start = Instant::now();
    let mut told = false;
    loop {
        let o = sess.command(1, &rc16, &[], 32).unwrap();
        if o.status == 2 {
            // Sense key UNIT ATTENTION, ASC/ASCQ 2A/09.
            assert_eq!(
                (o.sense[2] & 0x0f, o.sense[12], o.sense[13]),
                (6, 0x2a, 0x09),
                "{o:?}"
            );
            told = true;
        } else if o.status == 0 && last_lba(&o) == (32 << 20) / 512 - 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the new size never showed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(told, "no CAPACITY DATA HAS CHANGED unit attention");
    // qemu-img compares the grown tail against zeroes.
    assert!(
        compare(&src, &demo.url(1)),
        "grown: the data intact, the new space zeroes"
    );
    // Names are unique; bad requests name what is wrong.
    let (ok, text) = tessera(&demo, &["volume", "create", "second", "--size", "1MiB"]);
    assert!(!ok && text.contains("exists already"), "{text}");
    let (ok, text) = tessera(
        &demo,
        &["volume", "create", "third", "--size", "1MiB", "--ec", "9+9"],
    );
    assert!(!ok && text.contains("--ec"), "{text}");

    // Deleting a volume while a session can use it needs --force; without sessions it does
    // not (the gateways publish their sessions in etcd).
    let (ok, text) = tessera(&demo, &["volume", "delete", "second"]);
    assert!(
        !ok && text.contains("in use: 1 session (iqn.2024-01.test:resize through gw-0)"),
        "{text}"
    );
    let (ok, text) = tessera(&demo, &["volume", "create", "third", "--size", "4MiB"]);
    assert!(ok, "{text}");
    drop(sess);
    let start = Instant::now();
    loop {
        let (ok, text) = tessera(&demo, &["volume", "delete", "third"]);
        if ok {
            break;
        }
        assert!(
            text.contains("in use") && start.elapsed() < Duration::from_secs(20),
            "{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (ok, text) = tessera(&demo, &["volume", "delete", "second", "--force"]);
    assert!(ok, "{text}");
    let start = Instant::now();
    while luns(&demo).contains("Lun:1 ") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "LUN 1 stayed after delete"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A killed node's registration lapses with its lease; restarted, it is back.
    demo.kill_node(3);
    let list = wait_for(&demo, &["node", "list"], "node-3's lease to lapse", |t| {
        !t.contains("node-3")
    });
    assert_eq!(list.lines().filter(|l| l.starts_with("node-")).count(), 5);
    let status = wait_for(&demo, &["status"], "the degraded volume", |t| {
        t.contains("degraded: 1 of its nodes down")
    });
    println!("{status}");
    demo.restart_node(3);
    wait_for(&demo, &["node", "list"], "node-3 to register again", |t| {
        t.contains("node-3")
    });
    assert!(demo.stop());
}

#[test]
fn admin_commands_say_where_the_cluster_is_missing() {
    let out = run(
        Command::new(tessera_bin())
            .args(["volume", "list"])
            .env_remove("TESSERA_ETCD"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--etcd"), "{err}");
    // An etcd that is not there: a clear error, not a hang.
    let port = tessera_integration_tests::free_port();
    let out = run(
        Command::new(tessera_bin())
            .args(["status", "--etcd", &format!("http://127.0.0.1:{port}")])
            .env_remove("TESSERA_ETCD"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd"), "{err}");
}

#[test]
fn with_etcd_gone_the_owner_stops_writing_within_its_lease_and_recovers_when_it_returns() {
    use tessera_integration_tests::initiator::Session;
    let demo = Demo::start(&["--backend", "ec", "--ec", "2+1", "--size", "64MiB"]);
    // The demo's gateway holds its lease for 5 s (lease_ttl_secs in its configuration).
    let etcd = demo.json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "etcd")
        .expect("etcd in demo.json")
        .clone();
    let mut s = Session::open(
        demo.portal,
        "iqn.2024-01.test:etcd-gone",
        &demo.iqn,
        [0x80, 0, 0, 0, 0, 3],
    );
    // GOOD (0), BUSY (8), or CHECK CONDITION with its sense key (2 << 8 | key).
    let write = |s: &mut Session, lba: u8, fill: u8| -> u16 {
        let cdb = [0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0];
        let o = s.command(0, &cdb, &[fill; 512], 0).unwrap();
        match o.status {
            2 => 0x200 | u16::from(o.sense.get(2).map_or(0, |k| k & 0x0f)),
            st => u16::from(st),
        }
    };
    // What initiators retry: BUSY, or a UNIT ATTENTION (the LUN was re-attached).
    let retryable = |st: u16| st == 0x08 || st == 0x206;
    let read = |s: &mut Session, lba: u8| {
        let cdb = [0x28, 0, 0, 0, 0, lba, 0, 0, 1, 0];
        let o = s.command(0, &cdb, &[], 512).unwrap();
        (o.status, o.data.first().copied())
    };
    assert_eq!(write(&mut s, 8, 0x11), 0);

    // All of etcd stops. Writes go on until the lease policy says stop: BUSY (retryable),
    // before the 5 s lease could have expired; reads go on.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(etcd["pid"].as_u64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let killed = Instant::now();
    let mut acked = 0u8;
    let stopped = loop {
        let fill = 0x20 + (acked % 64);
        match write(&mut s, 8, fill) {
            0 => acked = fill,
            st if retryable(st) => break killed.elapsed(),
            st => panic!("a write with etcd gone got status {st:#x}, not GOOD or BUSY"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the gateway kept writing without its lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "writes stopped {:.2} s after etcd went away",
        stopped.as_secs_f64()
    );
    assert!(
        stopped < Duration::from_secs(5),
        "stopped writing only after the lease could have expired ({stopped:?})"
    );
    assert!(acked != 0, "writes went on while the lease was still valid");
    assert_eq!(
        read(&mut s, 8),
        (0, Some(acked)),
        "the last acknowledged write reads back"
    );
    assert!(demo.log().contains("self-fenced"), "{}", demo.log());

    // etcd returns (same data directory): the gateway joins again and, once its old lease
    // has lapsed, takes the volume back with a new epoch; writes succeed again.
    let argv: Vec<String> = etcd["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let _etcd = Started(
        Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("restart etcd"),
    );
    let back = Instant::now();
    loop {
        let st = write(&mut s, 9, 0x77);
        if st == 0 {
            break;
        }
        assert!(
            retryable(st),
            "status {st:#x} while recovering: not retryable"
        );
        assert!(
            back.elapsed() < Duration::from_secs(40),
            "writes never resumed after etcd returned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "writes resumed {:.2} s after etcd returned",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(read(&mut s, 8), (0, Some(acked)));
    assert_eq!(read(&mut s, 9), (0, Some(0x77)));
    let (ok, list) = tessera(&demo, &["volume", "list"]);
    assert!(ok, "{list}");
    let epoch: u64 = list
        .lines()
        .find(|l| l.starts_with("demo"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    assert!(epoch >= 2, "the takeback raised the epoch: {list}");
    drop(s);
    assert!(demo.stop());
}

#[test]
fn losing_one_of_three_etcd_members_under_load_costs_no_io_error() {
    use tessera_cluster::process::free_port;
    use tessera_integration_tests::initiator::Session;
    use tessera_integration_tests::{start_three_etcds, Gateway};
    let dir = tempfile::tempdir().unwrap();
    // Three members on three loopback addresses.
    let (mut etcds, urls) = start_three_etcds(dir.path());
    // The member killed below is made the raft leader first: the worst case (a leader
    // election while the gateway's keep-alive stream, which starts on the first endpoint,
    // has to move).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tessera_cluster::etcd_client::Client;
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "could not make e1 the leader"
            );
            let mut first = Client::connect([urls[0].clone()], None).await.unwrap();
            let Ok(st) = first.status().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let me = st.header().map(|h| h.member_id()).unwrap_or(0);
            if st.leader() == me && me != 0 {
                break;
            }
            for u in &urls[1..] {
                let mut c = Client::connect([u.clone()], None).await.unwrap();
                if let Ok(s) = c.status().await {
                    if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                        let _ = c.move_leader(me).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Three storage nodes (2+1) registering through all three members.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let port = free_port([127, 0, 0, 1]).unwrap();
        nodes.push(Started(
            Command::new(tessera_bin())
                .args(["node", "--id", &format!("n{i}"), "--listen"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data")
                .arg(dir.path().join(format!("n{i}.store")))
                .args(["--host", &format!("h{i}"), "--etcd", &urls.join(",")])
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("start node"),
        ));
    }
    rt.block_on(async {
        let c = tessera_cluster::Cluster::connect(&urls, tessera_cluster::DEFAULT_PREFIX)
            .await
            .unwrap();
        let start = Instant::now();
        // A fresh cluster may still be electing its leader: errors are retried.
        while c.nodes().await.map_or(0, |n| n.len()) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nodes did not register"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.create_volume(&tessera_cluster::NewVolume {
            name: "v".into(),
            size: 16 << 20,
            block_size: 512,
            profile: tessera_ec::Profile::parse("2+1", 4096).unwrap(),
            pgs: 16,
            write_quorum: None,
        })
        .await
        .unwrap();
    });
    let etcd_list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let gw = Gateway::start(&format!(
        "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\n\n[cluster]\netcd = [{}]\ngateway_id = \"gw-a\"\n",
        etcd_list.join(", ")
    ));
    let mut s = Session::open(
        gw.portal,
        "iqn.2024-01.test:three-members",
        "iqn.2024-01.io.tessera:cluster",
        [0x80, 0, 0, 0, 0, 4],
    );
    // Writes for longer than the lease TTL (the default, 10 s); one member is killed a
    // second in.
    let start = Instant::now();
    let mut killed = false;
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(12) {
        if !killed && start.elapsed() > Duration::from_secs(1) {
            etcds[0].stop(); // the leader, holding the gateway's keep-alive stream
            killed = true;
        }
        let lba = (n % 1000) as u8;
        let cdb = [0x2a, 0, 0, 0, ((n % 1000) >> 8) as u8, lba, 0, 0, 1, 0];
        let o = s.command(0, &cdb, &[(n % 251) as u8; 512], 0).unwrap();
        assert_eq!(
            o.status,
            0,
            "write {n} failed after a member died: {o:?}\ngateway log:\n{}",
            gw.log()
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("{n} writes, every one GOOD, with one of three etcd members killed");
    // The last thousand writes read back.
    for m in n.saturating_sub(1000)..n {
        let cdb = [
            0x28,
            0,
            0,
            0,
            ((m % 1000) >> 8) as u8,
            (m % 1000) as u8,
            0,
            0,
            1,
            0,
        ];
        let o = s.command(0, &cdb, &[], 512).unwrap();
        assert_eq!(
            (o.status, o.data[0]),
            (0, (m % 251) as u8),
            "block of write {m}"
        );
    }
    // The cluster still answers through the other two.
    let out = run(
        Command::new(tessera_bin())
            .args(["status", "--etcd", &urls.join(",")])
            .env_remove("TESSERA_ETCD"),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("owner gw-a epoch 1"), "{text}");
    drop(s);
    drop(gw);
    drop(nodes);
}
