//! Sessions against a running gateway: reinstatement by ISID, persistent reservations across
//! a restart, and many targets, LUNs and sessions at once.

use std::process::Command;
use std::time::Duration;

use tessera_integration_tests::initiator::Session;
use tessera_integration_tests::{require_tool, run, Demo, Gateway};

const INITIATOR: &str = "iqn.2024-01.test:sessions";

#[test]
fn a_login_with_the_same_isid_replaces_the_old_session() {
    let demo = Demo::start(&["--backend", "mem", "--size", "64MiB"]);
    let isid = [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a];
    let mut a = Session::login(demo.portal, INITIATOR, &demo.iqn, isid).expect("first login");
    assert_eq!(a.ready(0).unwrap().status, 0);
    let mut b = Session::login(demo.portal, INITIATOR, &demo.iqn, isid).expect("reinstating login");
    assert!(
        a.closed_within(Duration::from_secs(5)),
        "the old session was not closed"
    );
    assert_eq!(b.ready(0).unwrap().status, 0, "the new session works");
    // A different ISID is a different session: both live.
    let mut c = Session::login(demo.portal, INITIATOR, &demo.iqn, [0x80, 0, 0, 0, 0, 1]).unwrap();
    assert_eq!(c.ready(0).unwrap().status, 0);
    assert_eq!(b.ready(0).unwrap().status, 0);
    assert!(demo.stop());
}

fn read_keys(s: &mut Session) -> Vec<u64> {
    let o = s
        .command(0, &[0x5e, 0x00, 0, 0, 0, 0, 0, 0x01, 0x00, 0], &[], 256)
        .unwrap();
    assert_eq!(o.status, 0, "PERSISTENT RESERVE IN failed: {o:?}");
    let len = u32::from_be_bytes([o.data[4], o.data[5], o.data[6], o.data[7]]) as usize;
    o.data[8..8 + len]
        .chunks(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect()
}

#[test]
fn persistent_reservations_survive_a_restart() {
    let demo = Demo::start(&["--size", "64MiB"]);
    let isid = [0x80, 0, 0, 0, 0, 7];
    let mut s = Session::login(demo.portal, INITIATOR, &demo.iqn, isid).unwrap();
    s.ready(0).unwrap();
    // PERSISTENT RESERVE OUT, REGISTER, key 0x1122334455667788.
    let mut params = [0u8; 24];
    params[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    let o = s
        .command(0, &[0x5f, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], &params, 0)
        .unwrap();
    assert_eq!(o.status, 0, "REGISTER failed: {o:?}");
    // RESERVE, Write Exclusive.
    let mut params = [0u8; 24];
    params[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    let o = s
        .command(0, &[0x5f, 0x01, 0x01, 0, 0, 0, 0, 0, 24, 0], &params, 0)
        .unwrap();
    assert_eq!(o.status, 0, "RESERVE failed: {o:?}");
    assert_eq!(read_keys(&mut s), vec![0x1122_3344_5566_7788]);
    drop(s);
    let (ok, dir) = demo.stop_keep_dir();
    assert!(ok);
    let demo = Demo::start_in(dir, &["--size", "64MiB"]);
    let mut s = Session::login(demo.portal, "iqn.2024-01.test:other", &demo.iqn, isid).unwrap();
    s.ready(0).unwrap();
    assert_eq!(
        read_keys(&mut s),
        vec![0x1122_3344_5566_7788],
        "registration lost in restart"
    );
    // The reservation holds too: another initiator cannot write.
    let w = s
        .command(0, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; 512], 0)
        .unwrap();
    assert_eq!(w.status, 0x18, "expected RESERVATION CONFLICT, got {w:?}");
    assert!(demo.stop());
}

const TWO_TARGETS: &str = r#"
[gateway]
portals = ["127.0.0.1:{PORT}"]
state_dir = "{DIR}/state"

[[target]]
iqn = "iqn.2024-01.io.tessera:alpha"
[[target.lun]]
id = 0
backend = "mem"
size = "16MiB"
[[target.lun]]
id = 1
backend = "mem"
size = "32MiB"
block_size = 4096

[[target]]
iqn = "iqn.2024-01.io.tessera:beta"
[[target.lun]]
id = 0
backend = "file"
path = "{DIR}/beta0.img"
size = "16MiB"
[[target.lun]]
id = 5
backend = "mem"
size = "8MiB"
"#;

#[test]
fn many_targets_luns_and_sessions_at_once() {
    require_tool("iscsi-ls", "libiscsi-bin");
    let gw = Gateway::start(TWO_TARGETS);
    let out = run(
        Command::new("iscsi-ls")
            .arg("-s")
            .arg(format!("iscsi://{}", gw.portal)),
        Duration::from_secs(30),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    println!("{listing}");
    for want in [
        "iqn.2024-01.io.tessera:alpha",
        "iqn.2024-01.io.tessera:beta",
        "Lun:5",
        "Lun:1",
    ] {
        assert!(listing.contains(want), "iscsi-ls lacks {want}");
    }
    // 8 sessions at once, each writing its own pattern to its own blocks of every LUN of its
    // target and reading everything back.
    let portal = gw.portal;
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            std::thread::spawn(move || {
                let (target, luns): (&str, &[(u8, usize)]) = if i % 2 == 0 {
                    ("iqn.2024-01.io.tessera:alpha", &[(0, 512), (1, 4096)])
                } else {
                    ("iqn.2024-01.io.tessera:beta", &[(0, 512), (5, 512)])
                };
                let mut s =
                    Session::login(portal, INITIATOR, target, [0x80, 0, 0, 0, 1, i]).unwrap();
                for &(lun, bs) in luns {
                    s.ready(lun).unwrap();
                    for round in 0..50u32 {
                        let lba = u32::from(i) * 64 + round;
                        let data: Vec<u8> = (0..bs)
                            .map(|j| (j as u32 ^ lba ^ u32::from(i)) as u8)
                            .collect();
                        let mut w = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
                        w[2..6].copy_from_slice(&lba.to_be_bytes());
                        assert_eq!(s.command(lun, &w, &data, 0).unwrap().status, 0);
                        let mut r = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
                        r[2..6].copy_from_slice(&lba.to_be_bytes());
                        let o = s.command(lun, &r, &[], bs as u32).unwrap();
                        assert_eq!(
                            (o.status, &o.data[..]),
                            (0, &data[..]),
                            "session {i} lun {lun}"
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("session thread");
    }
}
