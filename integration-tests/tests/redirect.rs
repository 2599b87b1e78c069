//! Volumes' own targets and login redirection (`[cluster] volume_targets` and `redirect`):
//! two gateways of one cluster each export every volume also as a target of its own
//! (`<cluster target>:<volume>`, LUN 0); a login to it at the gateway that does not own the
//! volume is answered "target moved temporarily" with the owner's portal, and initiators
//! (tessera's own, and libiscsi's) follow it there. Discovery lists the volume targets; a
//! deleted volume's target goes.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_integration_tests::{images, require_tool, run, tessera_cli, Gateway, SmallCluster};

const TARGET: &str = "iqn.2024-01.io.tessera:cluster";
const VOLUME_TARGET: &str = "iqn.2024-01.io.tessera:cluster:red-vol";

fn discovered(portal: SocketAddr) -> String {
    let out = run(
        Command::new("iscsi-ls").arg(format!("iscsi://{portal}")),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn logins_to_a_volumes_own_target_are_redirected_to_its_owner() {
    require_tool("iscsi-ls", "libiscsi-bin");
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let cl = SmallCluster::start(dir.path(), [127, 0, 0, 1], [127, 0, 0, 1], "r");
    let url = cl.url.clone();
    let vol = cl.create_volume("red_vol", 32 << 20, 16384);
    let cfg = |id: &str, weight: u32| {
        format!(
            "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\n\n[cluster]\netcd = [\"{url}\"]\n\
             gateway_id = \"{id}\"\nlease_ttl_secs = 5\nweight = {weight}\n\
             volume_targets = true\nredirect = true\n"
        )
    };
    // gw-1 owns the volume; gw-2 (weight 0) does not.
    let lo = [127, 0, 0, 1];
    let g1 = Gateway::start_on(lo, &cfg("gw-1", 1));
    cl.wait_owner(vol.id, "gw-1", &g1);
    let g2 = Gateway::start_on(lo, &cfg("gw-2", 0));
    let start = Instant::now();
    while !discovered(g2.portal).contains(VOLUME_TARGET) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "gw-2 never listed the volume's target:\n{}\n{}",
            discovered(g2.portal),
            g2.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let listing = discovered(g1.portal);
    assert!(
        listing.contains(VOLUME_TARGET) && listing.contains(TARGET),
        "both targets at gw-1:\n{listing}"
    );

    // tessera's own initiator, sent to the non-owner, is redirected to the owner.
    let img = dir.path().join("img.raw");
    images::random_file(&img, 8, 21);
    let cli = |args: &[&str]| tessera_cli(args, &[("TESSERA_ETCD", &url), ("RUST_LOG", "info")]);
    let via_g2 = g2.portal.to_string();
    let (ok, out) = cli(&[
        "volume",
        "import",
        "red_vol",
        img.to_str().unwrap(),
        "--own-target",
        "--portal",
        &via_g2,
    ]);
    assert!(ok, "import through the volume's target: {out}");
    assert!(out.contains("login redirected"), "redirected: {out}");
    assert!(
        out.contains(&format!("of {VOLUME_TARGET} at {}", g1.portal)),
        "the session ran on the owner's portal: {out}"
    );
    let start = Instant::now();
    while !g2.log().contains("login redirected to the volume's owner") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "gw-2 logs the redirection\n{}",
            g2.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The owner does not redirect its own volume's logins.
    let (ok, out) = cli(&[
        "volume",
        "export",
        "red_vol",
        dir.path().join("out.raw").to_str().unwrap(),
        "--own-target",
        "--portal",
        &g1.portal.to_string(),
    ]);
    assert!(ok && !out.contains("login redirected"), "{out}");

    // libiscsi follows the redirection too: the image reads back through the non-owner's
    // portal on the volume's own target, and on the cluster target (forwarded).
    let redirects = || {
        g2.log()
            .matches("login redirected to the volume's owner")
            .count()
    };
    let before = redirects();
    assert!(
        images::compare(&img, &format!("iscsi://{}/{VOLUME_TARGET}/0", g2.portal)),
        "the volume's own target through gw-2"
    );
    assert!(redirects() > before, "qemu-img's login was redirected");
    assert!(
        images::compare(&img, &format!("iscsi://{}/{TARGET}/{}", g2.portal, vol.lun)),
        "the cluster target's LUN through gw-2"
    );

    // A deleted volume's target goes from discovery.
    cl.rt
        .block_on(cl.cluster.delete_volume("red_vol"))
        .expect("delete");
    let start = Instant::now();
    while discovered(g2.portal).contains(VOLUME_TARGET)
        || discovered(g1.portal).contains(VOLUME_TARGET)
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the deleted volume's target is still listed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(g2);
    drop(g1);
    drop(cl);
}
