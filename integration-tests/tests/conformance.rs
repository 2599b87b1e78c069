//! libiscsi's conformance suite (`iscsi-test-cu`, Debian libiscsi-bin) against `tessera demo`
//! (a file LUN with 512- and 4096-byte blocks, a removable one, an erasure-coded volume) and
//! against a cluster volume reached through a gateway that does not own it (every command
//! forwarded to the owner).
//!
//! Runs every test of the families the project commits to, with a second session for the
//! MultipathIO family, prints the suite's own summary and every failure, and fails on any
//! failed test. Tests the suite skips (it prints `[SKIPPED]` for what it finds absent or not
//! applicable) are compared with `integration-tests/libiscsi-skips.txt`, which gives each
//! run's expected skips a reason: a skip not listed there fails the run (a listed one that no
//! longer skips is printed, to be taken off the list).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use tessera_integration_tests::{require_tool, run, Demo, Gateway, SmallCluster};

/// The families of the acceptance list.
const FAMILIES: &[&str] = &[
    "iSCSI",
    "SCSI.TestUnitReady",
    "SCSI.Inquiry",
    "SCSI.ReadCapacity10",
    "SCSI.ReadCapacity16",
    "SCSI.Read6",
    "SCSI.Read10",
    "SCSI.Read12",
    "SCSI.Read16",
    "SCSI.Write10",
    "SCSI.Write12",
    "SCSI.Write16",
    "SCSI.WriteVerify10",
    "SCSI.WriteVerify12",
    "SCSI.WriteVerify16",
    "SCSI.Verify10",
    "SCSI.Verify12",
    "SCSI.Verify16",
    "SCSI.WriteSame10",
    "SCSI.WriteSame16",
    "SCSI.Unmap",
    "SCSI.GetLBAStatus",
    "SCSI.CompareAndWrite",
    "SCSI.Prefetch10",
    "SCSI.Prefetch16",
    "SCSI.ModeSense6",
    "SCSI.ReportSupportedOpcodes",
    "SCSI.StartStopUnit",
    "SCSI.PreventAllow",
    "SCSI.Reserve6",
    "SCSI.ProutRegister",
    "SCSI.ProutReserve",
    "SCSI.ProutClear",
    "SCSI.ProutPreempt",
    "SCSI.PrinReadKeys",
    "SCSI.PrinServiceactionRange",
    "SCSI.PrinReportCapabilities",
    "SCSI.MultipathIO",
    "SCSI.NoMedia",
    "SCSI.Mandatory",
];

struct Summary {
    ran: u64,
    passed: u64,
    failed: u64,
    /// The tests that printed `[SKIPPED]`, as `Suite.Test`.
    skipped: BTreeSet<String>,
}

/// The skips `libiscsi-skips.txt` expects of run `label`, each with its reason.
fn expected_skips(label: &str) -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/libiscsi-skips.txt");
    let text = std::fs::read_to_string(path).expect("libiscsi-skips.txt");
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, char::is_whitespace);
        let (Some(labels), Some(test), Some(reason)) = (parts.next(), parts.next(), parts.next())
        else {
            panic!(
                "{path}:{}: want `RUNS Suite.Test reason`, got {line:?}",
                n + 1
            );
        };
        assert!(
            !reason.trim().is_empty(),
            "{path}:{}: a skip needs its reason",
            n + 1
        );
        if labels == "*" || labels.split(',').any(|l| l == label) {
            out.push((test.to_string(), reason.trim().to_string()));
        }
    }
    out
}

fn run_suite(
    url: &str,
    dir: &std::path::Path,
    label: &str,
    families: &[&str],
    paths: usize,
) -> Summary {
    let mut cmd = Command::new("iscsi-test-cu");
    cmd.arg("-d").arg("-t").arg(families.join(","));
    for _ in 0..paths {
        cmd.arg(url);
    }
    let out = run(&mut cmd, Duration::from_secs(900));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let log = dir.join(format!("iscsi-test-cu-{label}.log"));
    std::fs::write(&log, &text).expect("write log");
    // Print the tests that failed (lines inside passing tests that merely log an expected
    // error, e.g. "[FAILED] ... should have failed", are not failures), then the summary.
    // CUnit writes "Test: NAME ..." then the test's own log lines, then "passed" or
    // "FAILED" at the end of a line.
    let mut suite = String::new();
    let mut test = String::new();
    let mut skipped = BTreeSet::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim().to_string();
            continue;
        }
        if let Some(t) = line.trim_start().strip_prefix("Test: ") {
            test = t.split(" ...").next().unwrap_or("").to_string();
        }
        // (A test's first log line follows its "Test: NAME ..." on the same line.)
        if line.contains("[SKIPPED]") && !test.is_empty() {
            skipped.insert(format!("{suite}.{test}"));
        }
        let l = line.trim_end();
        if l == "FAILED" || l.ends_with("...FAILED") {
            println!("[{label}] FAILED {suite}.{test}");
        }
    }
    let start = text.find("Run Summary").unwrap_or_else(|| {
        panic!(
            "no summary from iscsi-test-cu ({label}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    println!("[{label}] iscsi-test-cu {}", &text[start..].trim_end());
    let tests_line = text[start..]
        .lines()
        .find(|l| l.trim_start().starts_with("tests"))
        .expect("tests line");
    let n: Vec<u64> = tests_line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    println!(
        "[{label}] {} tests skipped by the suite: {}",
        skipped.len(),
        skipped.iter().cloned().collect::<Vec<_>>().join(" ")
    );
    Summary {
        ran: n[1],
        passed: n[2],
        failed: n[3],
        skipped,
    }
}

/// The summary's verdict: no failure, enough tests, no skip the list does not expect.
fn judge(label: &str, s: &Summary, min_tests: u64) {
    assert!(s.ran >= min_tests, "{label}: only {} tests ran", s.ran);
    assert_eq!(
        s.failed, 0,
        "{label}: {} of {} tests failed (passed {})",
        s.failed, s.ran, s.passed
    );
    let expected = expected_skips(label);
    let unexpected: Vec<&String> = s
        .skipped
        .iter()
        .filter(|t| !expected.iter().any(|(e, _)| e == *t))
        .collect();
    for (t, why) in &expected {
        if s.skipped.contains(t) {
            println!("[{label}] skipped as expected: {t}: {why}");
        } else {
            println!("[{label}] listed as a skip but ran: {t} (take it off libiscsi-skips.txt)");
        }
    }
    assert!(
        unexpected.is_empty(),
        "{label}: skips libiscsi-skips.txt does not list: {unexpected:?}"
    );
}

fn check(label: &str, args: &[&str], families: &[&str], paths: usize, min_tests: u64) {
    require_tool("iscsi-test-cu", "libiscsi-bin");
    let demo = Demo::start(args);
    let s = run_suite(&demo.url(0), demo.dir.path(), label, families, paths);
    judge(label, &s, min_tests);
    assert!(demo.stop(), "{label}: tessera demo did not stop cleanly");
}

#[test]
fn libiscsi_suite_passes_with_512_byte_blocks() {
    check(
        "512",
        &["--size", "256MiB", "--block-size", "512"],
        FAMILIES,
        2,
        190,
    );
}

#[test]
fn libiscsi_suite_passes_with_4096_byte_blocks() {
    check(
        "4096",
        &["--size", "256MiB", "--block-size", "4096"],
        FAMILIES,
        2,
        190,
    );
}

/// The medium-handling tests the suite skips for fixed disks, on a removable LU (one path:
/// the suite's two-path PreventAllow test expects no unit attention left over from its own
/// earlier LUN reset on the second path).
#[test]
fn libiscsi_removable_medium_tests_pass() {
    check(
        "removable",
        &["--size", "64MiB", "--removable"],
        &["SCSI.PreventAllow", "SCSI.NoMedia", "SCSI.StartStopUnit"],
        1,
        10,
    );
}

/// An erasure-coded volume (4+2 over six node processes): the same suite, the same answers.
#[test]
fn libiscsi_suite_passes_on_an_erasure_coded_volume() {
    check(
        "ec",
        &[
            "--backend",
            "ec",
            "--ec",
            "4+2",
            "--size",
            "256MiB",
            "--block-size",
            "512",
        ],
        FAMILIES,
        2,
        190,
    );
}

/// A cluster volume reached through a gateway that does not own it: every command, task
/// management function and session end is forwarded to the owner, and the answers are the
/// owner's.
#[test]
fn libiscsi_suite_passes_through_a_gateway_that_forwards_to_the_owner() {
    require_tool("iscsi-test-cu", "libiscsi-bin");
    let dir = tempfile::tempdir().unwrap();
    let cl = SmallCluster::start(dir.path(), [127, 0, 0, 1], [127, 0, 0, 1], "c");
    let vol = cl.create_volume("conf", 256 << 20, 16384);
    let url = cl.url.clone();
    let cfg = |id: &str, weight: u32| {
        format!(
            "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\n\n[cluster]\netcd = [\"{url}\"]\n\
             gateway_id = \"{id}\"\nlease_ttl_secs = 5\nweight = {weight}\n"
        )
    };
    let lo = [127, 0, 0, 1];
    let owner = Gateway::start_on(lo, &cfg("gw-o", 1));
    cl.wait_owner(vol.id, "gw-o", &owner);
    // Weight 0: never the owner while the other lives.
    let other = Gateway::start_on(lo, &cfg("gw-f", 0));
    std::thread::sleep(Duration::from_secs(1));
    let url = format!(
        "iscsi://{}/iqn.2024-01.io.tessera:cluster/{}",
        other.portal, vol.lun
    );
    let s = run_suite(&url, dir.path(), "forwarded", FAMILIES, 2);
    cl.wait_owner(vol.id, "gw-o", &owner);
    judge("forwarded", &s, 190);
}
