//! SIGHUP reloads the gateway's configuration without dropping a session (issue 5): a new
//! LUN and a new target appear, a removed LUN drains and disappears (REPORTED LUNS DATA HAS
//! CHANGED, then LOGICAL UNIT NOT SUPPORTED), ACL and CHAP changes apply to new logins while
//! the sessions already in keep going; a LUN changed in place and a broken file are refused
//! with the running configuration kept, the error naming file and line.

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_integration_tests::initiator::{Outcome, Session};
use tessera_integration_tests::{require_tool, run, Gateway};

const A: &str = "iqn.2024-01.test:reload-a";
const B: &str = "iqn.2024-01.test:reload-b";
const ONE: &str = "iqn.2024-01.test:one";
const TWO: &str = "iqn.2024-01.test:two";

fn before() -> String {
    format!(
        r#"[gateway]
portals = ["127.0.0.1:{{PORT}}"]

[[target]]
iqn = "{A}"
allowed_initiators = ["{ONE}", "{TWO}"]

[[target.lun]]
id = 0
backend = "mem"
size = "16MiB"
block_size = 512

[[target.lun]]
id = 1
backend = "mem"
size = "16MiB"
block_size = 512
"#
    )
}

/// LUN 1 gone, LUN 2 new (a file), `TWO` no longer allowed, CHAP required on A; target B new.
fn after(port: u16, dir: &str, lun0_size: &str) -> String {
    format!(
        r#"[gateway]
portals = ["127.0.0.1:{port}"]

[[target]]
iqn = "{A}"
allowed_initiators = ["{ONE}"]
chap = {{ user = "alice", secret = "alice-secret-1" }}

[[target.lun]]
id = 0
backend = "mem"
size = "{lun0_size}"
block_size = 512

[[target.lun]]
id = 2
path = "{dir}/lun2.img"
size = "8MiB"
block_size = 512

[[target]]
iqn = "{B}"
chap = {{ user = "bob", secret = "bob-secret-123" }}

[[target.lun]]
id = 0
backend = "mem"
size = "8MiB"
block_size = 512
"#
    )
}

/// Rewrite the gateway's file, SIGHUP it, wait for its answer in the log (`reloaded` or
/// `not reloaded`); returns that log line.
fn reload(g: &Gateway, text: &str) -> String {
    let path = g.dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let seen = |log: &str| log.matches("SIGHUP: reloading").count();
    let answered = |log: &str| {
        log.lines()
            .filter(|l| l.contains("configuration reloaded") || l.contains("not reloaded"))
            .count()
    };
    let n = answered(&g.log());
    let before = seen(&g.log());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(g.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let start = Instant::now();
    loop {
        let log = g.log();
        if seen(&log) > before && answered(&log) > n {
            return log
                .lines()
                .filter(|l| l.contains("configuration reloaded") || l.contains("not reloaded"))
                .nth(n)
                .unwrap()
                .to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no answer to SIGHUP:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (sense key, ASC, ASCQ) of fixed or descriptor sense data.
fn sense(s: &[u8]) -> Option<(u8, u8, u8)> {
    match s.first()? & 0x7f {
        0x70 | 0x71 => Some((s.get(2)? & 0xf, *s.get(12)?, *s.get(13)?)),
        0x72 | 0x73 => Some((s.get(1)? & 0xf, *s.get(2)?, *s.get(3)?)),
        _ => None,
    }
}

fn write(s: &mut Session, lun: u8, lba: u32, data: &[u8]) -> Outcome {
    let n = (data.len() / 512) as u16;
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&n.to_be_bytes());
    s.command(lun, &cdb, data, 0).expect("WRITE(10)")
}

fn read(s: &mut Session, lun: u8, lba: u32, n: u16) -> Outcome {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&n.to_be_bytes());
    s.command(lun, &cdb, &[], u32::from(n) * 512)
        .expect("READ(10)")
}

/// REPORT LUNS: the LUN numbers (single-level, peripheral addressing).
fn report_luns(s: &mut Session) -> Vec<u8> {
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa0;
    cdb[6..10].copy_from_slice(&4096u32.to_be_bytes());
    for _ in 0..4 {
        let o = s.command(0, &cdb, &[], 4096).expect("REPORT LUNS");
        if o.status == 0 {
            let len = u32::from_be_bytes(o.data[..4].try_into().unwrap()) as usize;
            return o.data[8..8 + len].chunks(8).map(|e| e[1]).collect();
        }
    }
    panic!("REPORT LUNS kept failing");
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// `iscsi-inq` against `url` as initiator `name`: whether it logged in and answered.
fn inq(url: &str, name: &str) -> bool {
    run(
        Command::new("iscsi-inq").args(["-i", name, url]),
        Duration::from_secs(30),
    )
    .status
    .success()
}

#[test]
fn sighup_applies_new_luns_targets_acls_and_chap_and_drains_removed_luns_without_dropping_sessions()
{
    require_tool("iscsi-inq", "libiscsi-bin");
    require_tool("iscsi-ls", "libiscsi-bin");
    let g = Gateway::start_on([127, 0, 0, 1], &before());
    let portal = g.portal;
    let mut one = Session::login(portal, ONE, A, [0x80, 0, 0, 0, 9, 1]).expect("login as one");
    let mut two = Session::login(portal, TWO, A, [0x80, 0, 0, 0, 9, 2]).expect("login as two");
    for s in [&mut one, &mut two] {
        assert_eq!(s.ready(0).unwrap().status, 0);
    }
    assert_eq!(write(&mut one, 0, 0, &block(1)).status, 0);
    assert_eq!(one.ready(1).unwrap().status, 0);
    assert_eq!(write(&mut one, 1, 0, &block(2)).status, 0);
    assert_eq!(report_luns(&mut one), vec![0, 1]);

    // The reload.
    let dir = g.dir.path().to_string_lossy().into_owned();
    let said = reload(&g, &after(portal.port(), &dir, "16MiB"));
    println!("{said}");
    assert!(said.contains("configuration reloaded"), "{said}");
    for what in [
        "targets added: iqn.2024-01.test:reload-b",
        "LUNs added: iqn.2024-01.test:reload-a LUN 2, iqn.2024-01.test:reload-b LUN 0",
        "LUNs removed (draining): iqn.2024-01.test:reload-a LUN 1",
        "access settings changed: iqn.2024-01.test:reload-a",
    ] {
        assert!(said.contains(what), "{what:?} missing from: {said}");
    }

    // The sessions in before the reload go on: the LUN inventory changed under them.
    let o = one.command(0, &[0; 6], &[], 0).unwrap();
    assert_eq!(
        (o.status, sense(&o.sense)),
        (2, Some((6, 0x3f, 0x0e))),
        "REPORTED LUNS DATA HAS CHANGED first"
    );
    assert_eq!(one.ready(0).unwrap().status, 0);
    assert_eq!(report_luns(&mut one), vec![0, 2]);
    let o = read(&mut one, 0, 0, 8);
    assert_eq!((o.status, o.data), (0, block(1)), "LUN 0 kept its data");
    let o = read(&mut one, 1, 0, 8);
    assert_eq!(
        (o.status, sense(&o.sense)),
        (2, Some((5, 0x25, 0))),
        "the removed LUN answers LOGICAL UNIT NOT SUPPORTED"
    );
    assert_eq!(one.ready(2).unwrap().status, 0);
    assert_eq!(write(&mut one, 2, 8, &block(3)).status, 0);
    assert_eq!(read(&mut one, 2, 8, 8).data, block(3), "the new LUN stores");
    assert_eq!(
        two.ready(0).unwrap().status,
        0,
        "a session no longer allowed stays"
    );
    assert_eq!(read(&mut two, 0, 0, 8).data, block(1));
    println!("sessions kept: both read and write; LUN 1 gone, LUN 2 serving");

    // New logins see the new access settings.
    assert!(
        Session::login(portal, ONE, A, [0x80, 0, 0, 0, 9, 3]).is_err(),
        "A now requires CHAP"
    );
    let url_a = |auth: &str| format!("iscsi://{auth}@{portal}/{A}/0");
    assert!(
        inq(&url_a("alice%alice-secret-1"), ONE),
        "one with alice's secret"
    );
    assert!(
        !inq(&url_a("alice%wrong-secret-1"), ONE),
        "a wrong secret is refused"
    );
    assert!(
        !inq(&url_a("alice%alice-secret-1"), TWO),
        "two is no longer allowed"
    );
    let url_b = |auth: &str| format!("iscsi://{auth}@{portal}/{B}/0");
    assert!(
        inq(&url_b("bob%bob-secret-123"), TWO),
        "the new target serves"
    );
    assert!(!inq(&url_b("bob%wrong-secret-1"), TWO));
    let ls = run(
        Command::new("iscsi-ls").args(["-i", ONE, &format!("iscsi://{portal}")]),
        Duration::from_secs(30),
    );
    let listed = String::from_utf8_lossy(&ls.stdout).into_owned();
    assert!(
        listed.contains(A) && listed.contains(B),
        "discovery: {listed}"
    );
    println!("new logins: CHAP and the ACL apply; discovery lists {A} and {B}");

    // The removed LUN drained and closed.
    let start = Instant::now();
    while !g.log().contains("removed LUN drained") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", g.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Refused reloads keep what runs: a LUN changed in place, then a broken file.
    let said = reload(&g, &after(portal.port(), &dir, "32MiB"));
    println!("{said}");
    assert!(
        said.contains("not reloaded") && said.contains("LUN 0") && said.contains("in place"),
        "{said}"
    );
    let broken = after(portal.port(), &dir, "16MiB").replace("id = 2", "id = \"two\"");
    let said = reload(&g, &broken);
    println!("{said}");
    let file = g.dir.path().join("gateway.toml").display().to_string();
    assert!(
        said.contains("not reloaded") && said.contains(&format!("{file}:")),
        "the error names the file and line: {said}"
    );
    assert_eq!(report_luns(&mut one), vec![0, 2], "still what was running");
    assert_eq!(read(&mut one, 2, 8, 8).data, block(3));
    assert!(inq(&url_b("bob%bob-secret-123"), TWO));
}
