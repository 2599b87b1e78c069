//! libiscsi's conformance suite (`iscsi-test-cu`, Debian libiscsi-bin) against `tessera demo`.
//!
//! Runs every test of the families the project commits to, with a second session for the
//! MultipathIO family, prints the suite's own summary and every failure, and fails on any
//! failed test. Tests the suite itself skips as not applicable are counted and printed.

use std::process::Command;
use std::time::Duration;

use tessera_integration_tests::{require_tool, run, Demo};

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
    skipped: usize,
}

fn run_suite(demo: &Demo, label: &str, families: &[&str], paths: usize) -> Summary {
    let url = demo.url(0);
    let mut cmd = Command::new("iscsi-test-cu");
    cmd.arg("-d").arg("-t").arg(families.join(","));
    for _ in 0..paths {
        cmd.arg(&url);
    }
    let out = run(&mut cmd, Duration::from_secs(900));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let log = demo.dir.path().join(format!("iscsi-test-cu-{label}.log"));
    std::fs::write(&log, &text).expect("write log");
    // Print the tests that failed (lines inside passing tests that merely log an expected
    // error, e.g. "[FAILED] ... should have failed", are not failures), then the summary.
    // CUnit writes "Test: NAME ..." then the test's own log lines, then "passed" or
    // "FAILED" at the end of a line.
    let mut suite = String::new();
    let mut test = String::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim().to_string();
            continue;
        }
        if let Some(t) = line.trim_start().strip_prefix("Test: ") {
            test = t.split(" ...").next().unwrap_or("").to_string();
        }
        let l = line.trim_end();
        if l == "FAILED" || l.ends_with("...FAILED") {
            println!("[{label}] FAILED {suite}.{test}");
        }
    }
    let skipped = text.matches("[SKIPPED]").count();
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
    println!("[{label}] {skipped} [SKIPPED] notes from the suite (features it found absent)");
    Summary {
        ran: n[1],
        passed: n[2],
        failed: n[3],
        skipped,
    }
}

fn check(label: &str, args: &[&str], families: &[&str], paths: usize, min_tests: u64) {
    require_tool("iscsi-test-cu", "libiscsi-bin");
    let demo = Demo::start(args);
    let s = run_suite(&demo, label, families, paths);
    assert!(s.ran >= min_tests, "{label}: only {} tests ran", s.ran);
    assert_eq!(
        s.failed, 0,
        "{label}: {} of {} tests failed (passed {}, skipped notes {})",
        s.failed, s.ran, s.passed, s.skipped
    );
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
