//! The Linux kernel's iSCSI initiator (open-iscsi, `iscsi_tcp`) against `tessera demo`,
//! inside the qemu guest of `../shared/tools/guest` (software-emulated: correctness only).
//!
//! Needs the guest built (`make guest-build`); `GUEST_DIR` and `GUEST_CACHE` point at the
//! harness and its cache (the Makefile sets both).

use std::process::Command;
use std::time::Duration;

use tessera_integration_tests::Demo;
use tessera_integration_tests::{ec_4_2_on_eight_nodes, follow_output, guest_cache};
use tessera_integration_tests::{guest_script, print_matching, project_guest_tests, run, tail};

fn guest(demo: &Demo, test: &str, settings: &[&str]) {
    let script = guest_script();
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

/// Start `tessera demo` with `args`, run guest test `test` against it (open-iscsi
/// `settings`), and stop the demo, which must exit cleanly.
fn on_a_new_demo(args: &[&str], test: &str, settings: &[&str]) {
    let demo = Demo::start(args);
    guest(&demo, test, settings);
    assert!(demo.stop());
}

#[test]
fn ext4_over_chap() {
    on_a_new_demo(
        &["--size", "256MiB", "--chap", "guestuser:guest-secret-0123"],
        "iscsi-ext4",
        &[
            "node.session.auth.authmethod=CHAP",
            "node.session.auth.username=guestuser",
            "node.session.auth.password=guest-secret-0123",
        ],
    );
}

#[test]
fn ext4_with_crc32c_digests() {
    on_a_new_demo(
        &["--size", "256MiB"],
        "iscsi-ext4",
        &[
            "node.conn[0].iscsi.HeaderDigest=CRC32C",
            "node.conn[0].iscsi.DataDigest=CRC32C",
        ],
    );
}

#[test]
fn fio_verify() {
    on_a_new_demo(&["--size", "256MiB"], "iscsi-fio", &[]);
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

/// fio's verified random writes through the kernel initiator keep going when two nodes of a
/// 4+2 volume die mid-run on a cluster with spares (eight nodes): the project's guest test
/// `tests/guest/iscsi-fio-nodeloss.sh` prints a marker while fio writes, the host kills two
/// nodes, fio must end without an I/O error and verify everything; the controller moved the
/// dead nodes' positions in the PGs left below their write quorum at once.
#[test]
fn ec_volume_fio_while_two_nodes_die() {
    use std::process::Stdio;
    const MARK: &str = "NODELOSS-KILL-TWO";
    let script = guest_script();
    let demo = Demo::start(&ec_4_2_on_eight_nodes("128MiB"));
    let mut cmd = Command::new(script);
    cmd.arg("--cache")
        .arg(guest_cache())
        .arg("--test-dir")
        .arg(project_guest_tests())
        .args(["--test", "iscsi-fio-nodeloss", "--iqn", &demo.iqn])
        .args(["--iscsi-port", &demo.portal.port().to_string()])
        .args(["--size-mb", "64", "--timeout", "400"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("run-guest.sh");
    let mut killed = false;
    let (status, out) = follow_output(child, Duration::from_secs(440), |line, elapsed| {
        if line.trim_end().ends_with(MARK) && !killed {
            demo.kill_node(1);
            demo.kill_node(2);
            killed = true;
            println!(
                "host: killed node-1 and node-2 {:.1} s into the run, as the guest asked",
                elapsed.as_secs_f64()
            );
        }
    });
    let text = out.join("\n");
    print_matching(&out, &["HARNESS-RESULT", "phase"]);
    assert!(
        killed,
        "the guest never asked for the nodes to die:\n{text}"
    );
    assert!(
        status.success(),
        "guest test iscsi-fio-nodeloss failed:\n{text}\n--- gateway log tail:\n{}",
        tail(&demo.log(), 40)
    );
    let moved = demo.cluster(async |c| {
        let v = c.volumes().await.unwrap().remove(0);
        c.moves(v.id)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|(_, m)| m)
            .filter(|m| m.reason == tessera_cluster::MoveReason::Quorum)
            .count()
    });
    println!("{moved} positions moved for quorum");
    assert!(moved > 0, "no position was moved for the write quorum");
    assert!(demo.stop(), "demo did not stop cleanly");
}
