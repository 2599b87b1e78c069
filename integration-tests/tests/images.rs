//! `tessera volume import/export` (an image copied through the cluster's own iSCSI target,
//! with progress, CHAP, a cut connection survived) and `tessera node scrub`'s progress.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_integration_tests::{images, require_tool, run, tessera_bin, tessera_cli, Demo};

/// The percent values of a progress item's plain lines (`NAME: P% (...)`).
fn percents(out: &str, name: &str) -> Vec<u64> {
    let prefix = format!("{name}: ");
    out.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|r| r.split_once('%'))
        .filter_map(|(p, _)| p.parse().ok())
        .collect()
}

fn assert_progress(out: &str, name: &str) {
    let p = percents(out, name);
    assert!(p.len() >= 3, "several progress lines for {name}: {out}");
    assert!(
        p.windows(2).all(|w| w[0] <= w[1]),
        "progress only rises: {p:?}"
    );
    assert_eq!(p.last(), Some(&100), "{name} ends at 100%: {out}");
    assert!(
        out.lines().any(|l| l.starts_with(&format!("{name}: done"))),
        "{name} reports its end: {out}"
    );
}

/// The file's first `len` bytes equal `want`'s, and the rest is zeros.
fn same_then_zeros(got: &Path, want: &Path) {
    let g = std::fs::read(got).unwrap();
    let w = std::fs::read(want).unwrap();
    assert!(g.len() >= w.len());
    assert!(
        g[..w.len()] == w[..],
        "the exported bytes equal the imported ones"
    );
    assert!(
        g[w.len()..].iter().all(|&b| b == 0),
        "the rest of the volume reads zeros"
    );
}

#[test]
fn import_and_export_copy_a_volume_byte_for_byte_through_its_target() {
    require_tool("qemu-img", "qemu-utils");
    let demo = Demo::start(&["--backend", "ec", "--size", "64MiB"]);
    let dir = tempfile::tempdir().unwrap();
    // 40 MiB and a bit: the last, partial block is padded with zeros.
    let img = dir.path().join("in.raw");
    images::random_file(&img, 40, 11);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&img)
        .unwrap()
        .write_all(&[0xa5; 1000])
        .unwrap();
    let img_s = img.to_str().unwrap();
    let (ok, out) = demo.tessera(&["volume", "import", "demo", img_s]);
    println!("{out}");
    assert!(ok, "import: {out}");
    assert_progress(&out, "import demo");
    assert!(
        out.contains("imported") && out.contains("41944040 bytes"),
        "{out}"
    );
    // Another initiator (libiscsi through qemu-img) sees the image on the LUN.
    assert!(
        images::compare(&img, &demo.url(0)),
        "the LUN holds the image"
    );

    let exp = dir.path().join("out.raw");
    let exp_s = exp.to_str().unwrap();
    let (ok, out) = demo.tessera(&["volume", "export", "demo", exp_s, "--depth", "4"]);
    println!("{out}");
    assert!(ok, "export: {out}");
    assert_progress(&out, "export demo");
    let meta = std::fs::metadata(&exp).unwrap();
    assert_eq!(meta.len(), 64 << 20, "the whole volume");
    assert!(
        meta.blocks() * 512 < 50 << 20,
        "the never-written range is a hole ({} bytes allocated)",
        meta.blocks() * 512
    );
    same_then_zeros(&exp, &img);

    // Clear refusals.
    let (ok, out) = demo.tessera(&["volume", "export", "demo", exp_s]);
    assert!(!ok && out.contains("exists and is not empty"), "{out}");
    let (ok, out) = demo.tessera(&["volume", "export", "demo", exp_s, "--force"]);
    assert!(ok, "--force overwrites: {out}");
    let big = dir.path().join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let (ok, out) = demo.tessera(&["volume", "import", "demo", big.to_str().unwrap()]);
    assert!(!ok && out.contains("grow it first"), "{out}");
    let (ok, out) = demo.tessera(&["volume", "import", "demo", img_s, "--io-size", "1000"]);
    assert!(
        !ok && out.contains("multiple of the volume's block size"),
        "{out}"
    );
    let (ok, out) = demo.tessera(&["volume", "import", "nosuch", img_s]);
    assert!(!ok && out.contains("no volume named"), "{out}");
    let (ok, out) = demo.tessera(&["volume", "import", "demo", "/nonexistent/x.raw"]);
    assert!(!ok && out.contains("/nonexistent/x.raw"), "{out}");

    // Scrub progress: a node restarted with a slow scrub rate is followed as it scrubs.
    let mut demo = demo;
    demo.kill_node(0);
    demo.restart_node_with(0, &["--scrub-rate", "2MiB"]);
    let addr = demo.nodes()[0].address.to_string();
    let out = run(
        Command::new(tessera_bin()).args(["node", "scrub", "--addr", &addr]),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{text}");
    assert!(out.status.success(), "scrub: {text}");
    let scrub = format!("{addr} scrub 1");
    assert_progress(&text, &scrub);
    assert!(text.contains(": 0 mismatches"), "{text}");
    assert!(demo.stop(), "the demo stops cleanly");
}

#[test]
fn import_with_chap_and_through_a_connection_cut_mid_copy() {
    require_tool("qemu-img", "qemu-utils");
    let demo = Demo::start(&[
        "--backend",
        "ec",
        "--size",
        "32MiB",
        "--chap",
        "copier:copier-secret-42",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.raw");
    images::random_file(&img, 24, 5);
    let img_s = img.to_str().unwrap();
    let etcd = demo.etcd();
    let tessera = |args: &[&str], secret: Option<&str>| {
        let mut env = vec![("TESSERA_ETCD", etcd.as_str())];
        // Without a secret the variable is set empty (the CLI takes that as none given).
        env.push(("TESSERA_CHAP_SECRET", secret.unwrap_or("")));
        tessera_cli(args, &env)
    };
    let (ok, out) = tessera(&["volume", "import", "demo", img_s], None);
    assert!(!ok && out.contains("authentication failed"), "{out}");
    let chap = ["volume", "import", "demo", img_s, "--chap-user", "copier"];
    let (ok, out) = tessera(&chap, None);
    assert!(!ok && out.contains("TESSERA_CHAP_SECRET"), "{out}");
    let (ok, out) = tessera(&chap, Some("wrong-secret-000"));
    assert!(!ok && out.contains("authentication failed"), "{out}");

    // Through a proxy that cuts the first connection after 6 MiB from the initiator: the
    // import logs in again and repeats what was in flight.
    let proxy = CuttingProxy::start(demo.portal, 6 << 20);
    let via = proxy.addr.to_string();
    let mut args = chap.to_vec();
    args.extend(["--portal", &via, "--io-size", "256KiB"]);
    let (ok, out) = tessera(&args, Some("copier-secret-42"));
    assert!(ok, "import through the cut: {out}");
    assert!(out.contains("logging in again"), "the cut was seen: {out}");
    assert!(proxy.connections() >= 2, "a second login");
    assert_progress(&out, "import demo");

    let exp = dir.path().join("out.raw");
    let mut args = vec![
        "volume",
        "export",
        "demo",
        exp.to_str().unwrap(),
        "--chap-user",
        "copier",
    ];
    args.extend(["--portal", &via]);
    let (ok, out) = tessera(&args, Some("copier-secret-42"));
    assert!(ok, "export: {out}");
    same_then_zeros(&exp, &img);
    assert!(demo.stop(), "the demo stops cleanly");
}

/// A TCP proxy to `upstream` that cuts its first connection once `limit` bytes have gone
/// upstream through it; later connections pass untouched.
struct CuttingProxy {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr, limit: u64) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(down) = c else { break };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let cut = (n == 0).then_some(limit);
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || pipe(down, up, cut));
                std::thread::spawn(move || pipe(u2, d2, None));
            }
        });
        Self { addr, accepted }
    }

    fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copy `from` to `to`; after `cut` bytes, shut both down.
fn pipe(mut from: TcpStream, mut to: TcpStream, cut: Option<u64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut moved = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        moved += n as u64;
        if cut.is_some_and(|c| moved >= c) {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
