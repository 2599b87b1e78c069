//! The daemons' side of systemd's `Type=notify` protocol, against a stand-in for systemd: a
//! datagram socket named by `NOTIFY_SOCKET`, with `WATCHDOG_USEC` set as systemd sets it for
//! `WatchdogSec=`. Each daemon says READY=1 once it serves, pings WATCHDOG=1 about every half
//! interval while its health check passes, and says STOPPING=1 on SIGTERM, then exits cleanly.
//! (The units themselves are checked by `make install-check`: `systemd-analyze verify`.)

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_integration_tests::{free_port, tessera_bin};

/// Collect notification messages until `until` holds or `limit` passes.
fn collect(sock: &UnixDatagram, limit: Duration, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut got = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while start.elapsed() < limit && !until(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                got.push(line.to_string());
            }
        }
    }
    got
}

fn daemon_speaks_the_notify_protocol(args: &[String], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut child = Command::new(tessera_bin())
        .args(args)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "1000000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let got = collect(&sock, Duration::from_secs(30), |g| {
        g.iter().any(|l| l == "READY=1")
    });
    assert!(
        got.iter().any(|l| l == "READY=1"),
        "{what}: no READY=1 in {got:?}"
    );
    assert!(
        got.iter().any(|l| l.starts_with("STATUS=")),
        "{what}: no STATUS= in {got:?}"
    );
    // A 1 s watchdog: pings about every 0.5 s.
    let t = Instant::now();
    let pings = collect(&sock, Duration::from_secs(3), |g| {
        g.iter().filter(|l| *l == "WATCHDOG=1").count() >= 4
    });
    let n = pings.iter().filter(|l| *l == "WATCHDOG=1").count();
    println!(
        "{what}: READY=1, then {n} watchdog pings in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(n >= 4, "{what}: {n} watchdog pings in 3 s: {pings:?}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let bye = collect(&sock, Duration::from_secs(10), |g| {
        g.iter().any(|l| l == "STOPPING=1")
    });
    assert!(
        bye.iter().any(|l| l == "STOPPING=1"),
        "{what}: no STOPPING=1 in {bye:?}"
    );
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{what} exited with {st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what} did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{what}: STOPPING=1 and exit {:.2} s after SIGTERM",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn a_storage_node_notifies_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    daemon_speaks_the_notify_protocol(
        &[
            "node".into(),
            "--id".into(),
            "sd".into(),
            "--listen".into(),
            listen.to_string(),
            "--data".into(),
            dir.path().join("store").to_string_lossy().into_owned(),
            "--capacity".into(),
            "128MiB".into(),
        ],
        "tessera node",
    );
}

#[test]
fn a_gateway_notifies_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nportals = [\"127.0.0.1:{}\"]\nstate_dir = \"{d}/state\"\n\n\
             [[target]]\niqn = \"iqn.2024-01.test:sd\"\n\n[[target.lun]]\nid = 0\n\
             backend = \"file\"\npath = \"{d}/lun0.img\"\nsize = \"16MiB\"\n",
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    daemon_speaks_the_notify_protocol(
        &[
            "gateway".into(),
            "--config".into(),
            cfg.to_string_lossy().into_owned(),
        ],
        "tessera gateway",
    );
}
