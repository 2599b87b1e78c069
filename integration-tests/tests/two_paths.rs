//! The Linux kernel initiator with two paths (issue 4, acceptance 5): inside the qemu guest of
//! `../shared/tools/guest` (software-emulated: correctness only), open-iscsi logs in to two
//! gateways of one cluster (the second portal through the harness's `--forward`), runs the
//! project's own guest test `tests/guest/iscsi-two-paths.sh` (`--test-dir`): data written
//! through one gateway reads back identical through the other; then, while the guest writes
//! and verifies through the owner, the host kills the owner when the guest says so, and the
//! guest carries on through the other session and verifies everything acknowledged.
//!
//! Needs the guest built (`make guest-build`); `GUEST_DIR` and `GUEST_CACHE` point at the
//! harness and its cache (the Makefile sets both).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_integration_tests::{guest_cache, guest_dir};
use tessera_integration_tests::{require_tool, Gateway, SmallCluster, Started};

const TARGET: &str = "iqn.2024-01.io.tessera:cluster";
const MARK: &str = "TWO-PATHS-KILL-OWNER";

#[test]
fn two_sessions_through_two_gateways_survive_the_owners_death() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let script = guest_dir().join("run-guest.sh");
    assert!(
        script.exists(),
        "guest harness not found at {}",
        script.display()
    );
    assert!(
        guest_cache().join("initramfs.img").exists(),
        "guest not built in {}: run make guest-build",
        guest_cache().display()
    );
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/guest");
    let dir = tempfile::tempdir().unwrap();
    let cl = SmallCluster::start(dir.path(), [127, 0, 0, 1], [127, 0, 0, 1], "t");
    let url = cl.url.clone();
    let vol = cl.create_volume("paths", 64 << 20, 16384);
    let cfg = |id: &str, weight: u32| {
        format!(
            "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\n\n[cluster]\netcd = [\"{url}\"]\n\
             gateway_id = \"{id}\"\nlease_ttl_secs = 5\nweight = {weight}\n"
        )
    };
    // The owner first; the second gateway (weight 0) forwards to it.
    let lo = [127, 0, 0, 1];
    let g1 = Gateway::start_on(lo, &cfg("gw-1", 1));
    cl.wait_owner(vol.id, "gw-1", &g1);
    let g2 = Gateway::start_on(lo, &cfg("gw-2", 0));
    std::thread::sleep(Duration::from_secs(1));

    let mut guest = Command::new(&script)
        .arg("--cache")
        .arg(guest_cache())
        .arg("--test-dir")
        .arg(&tests)
        .args(["--test", "iscsi-two-paths", "--iqn", TARGET])
        .args(["--lun", &vol.lun.to_string()])
        .args(["--iscsi-port", &g1.portal.port().to_string()])
        .args([
            "--forward",
            &format!("10.0.2.101:3260={}", g2.portal.port()),
        ])
        .args(["--timeout", "280"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run-guest.sh");
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(guest.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(guest.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let guest = Started(guest);
    let start = Instant::now();
    let mut out = Vec::new();
    let mut killed = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                if line.contains(MARK) && killed.is_none() && !line.contains("+ ") {
                    g1.kill();
                    killed = Some(start.elapsed());
                    println!(
                        "host: killed the owner gw-1 (PID {}) when the guest asked",
                        g1.pid()
                    );
                }
                out.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    start.elapsed() < Duration::from_secs(320),
                    "the guest did not finish:\n{}",
                    out.join("\n")
                );
            }
        }
    }
    let mut guest = guest;
    let status = guest.0.wait().expect("run-guest.sh status");
    let text = out.join("\n");
    let shown: Vec<&str> = out
        .iter()
        .map(String::as_str)
        .filter(|l| {
            l.contains("HARNESS-RESULT")
                || l.contains("phase")
                || l.contains("carrying on")
                || l.contains("path")
        })
        .collect();
    println!("{}", shown.join("\n"));
    assert!(
        status.success(),
        "guest test iscsi-two-paths failed:\n{text}\n--- gw-2:\n{}",
        g2.log()
    );
    assert!(
        killed.is_some(),
        "the guest never asked for the owner to die:\n{text}"
    );
    let owner = cl
        .rt
        .block_on(cl.cluster.owner(vol.id))
        .unwrap()
        .expect("an owner");
    assert_eq!(owner.gateway, "gw-2", "the survivor owns the volume");
    assert!(owner.epoch >= 2, "{owner:?}");
    drop(guest);
    drop(g2);
    drop(g1);
    drop(cl);
}
