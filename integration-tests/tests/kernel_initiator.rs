//! The Linux kernel's iSCSI initiator (open-iscsi, `iscsi_tcp`) against `tessera demo`,
//! inside the qemu guest of `../shared/tools/guest` (software-emulated: correctness only).
//!
//! Needs the guest built (`make guest-build`); `GUEST_DIR` and `GUEST_CACHE` point at the
//! harness and its cache (the Makefile sets both).

use std::process::Command;
use std::time::Duration;

use tessera_integration_tests::{guest_cache, guest_dir};
use tessera_integration_tests::{require_tool, run, Demo};

fn guest(demo: &Demo, test: &str, settings: &[String]) {
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
    let mut cmd = Command::new(&script);
    cmd.arg("--cache")
        .arg(guest_cache())
        .arg("--test")
        .arg(test)
        .arg("--iqn")
        .arg(&demo.iqn)
        .arg("--iscsi-port")
        .arg(demo.portal.port().to_string())
        .arg("--timeout")
        .arg("280")
        .arg("--quiet");
    for s in settings {
        cmd.arg("--iscsi-set").arg(s);
    }
    let out = run(&mut cmd, Duration::from_secs(320));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let verdict = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("HARNESS-RESULT") || l.contains("[run-guest]"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("{test} {settings:?}:\n{verdict}");
    assert!(
        out.status.success(),
        "guest test {test} failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn ext4_over_chap() {
    let demo = Demo::start(&["--size", "256MiB", "--chap", "guestuser:guest-secret-0123"]);
    guest(
        &demo,
        "iscsi-ext4",
        &[
            "node.session.auth.authmethod=CHAP".into(),
            "node.session.auth.username=guestuser".into(),
            "node.session.auth.password=guest-secret-0123".into(),
        ],
    );
    assert!(demo.stop());
}

#[test]
fn ext4_with_crc32c_digests() {
    let demo = Demo::start(&["--size", "256MiB"]);
    guest(
        &demo,
        "iscsi-ext4",
        &[
            "node.conn[0].iscsi.HeaderDigest=CRC32C".into(),
            "node.conn[0].iscsi.DataDigest=CRC32C".into(),
        ],
    );
    assert!(demo.stop());
}

#[test]
fn fio_verify() {
    let demo = Demo::start(&["--size", "256MiB"]);
    guest(&demo, "iscsi-fio", &[]);
    assert!(demo.stop());
}

/// The ext4 cycle and fio's verified random writes on an erasure-coded volume (4+2 over six
/// node processes), healthy and with one node killed before the run.
#[test]
fn ec_volume_ext4_and_fio() {
    for killed in [false, true] {
        for test in ["iscsi-ext4", "iscsi-fio"] {
            let demo = Demo::start(&["--backend", "ec", "--ec", "4+2", "--size", "256MiB"]);
            if killed {
                demo.kill_node(4);
                println!("node 4 killed before the run");
            }
            guest(&demo, test, &[]);
            assert!(demo.stop(), "{test}: demo did not stop cleanly");
        }
    }
}
