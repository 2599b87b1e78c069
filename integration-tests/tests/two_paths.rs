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

use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_integration_tests::{follow_output, guest_cache, guest_script, print_matching};
use tessera_integration_tests::{project_guest_tests, Gateway, SmallCluster};

const TARGET: &str = "iqn.2024-01.io.tessera:cluster";
const MARK: &str = "TWO-PATHS-KILL-OWNER";

#[test]
fn two_sessions_through_two_gateways_survive_the_owners_death() {
    let script = guest_script();
    let tests = project_guest_tests();
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

    let guest = Command::new(&script)
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
    let mut killed = None;
    let (status, out) = follow_output(guest, Duration::from_secs(320), |line, elapsed| {
        if line.contains(MARK) && killed.is_none() && !line.contains("+ ") {
            g1.kill();
            killed = Some(elapsed);
            println!(
                "host: killed the owner gw-1 (PID {}) when the guest asked",
                g1.pid()
            );
        }
    });
    let text = out.join("\n");
    print_matching(&out, &["HARNESS-RESULT", "phase", "carrying on", "path"]);
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
    drop(g2);
    drop(g1);
    drop(cl);
}
