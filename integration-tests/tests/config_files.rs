//! Every example in `target-config/` passes `tessera config check`, and a broken file is
//! reported with its file, line and key.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tessera_integration_tests::{run, tessera_bin};

/// `tessera config check FILE` (30 s at most).
fn config_check(file: &Path) -> Output {
    run(
        Command::new(tessera_bin())
            .arg("config")
            .arg("check")
            .arg(file),
        Duration::from_secs(30),
    )
}

#[test]
fn every_example_config_checks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target-config");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("target-config/") {
        let p = e.expect("entry").path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let out = config_check(&p);
        println!("{}", String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(n >= 3, "expected the example configs, found {n}");
}

#[test]
fn a_bad_file_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[[target]]\niqn = \"iqn.2024-01.io.tessera:x\"\n[[target.lun]]\nid = 0\nbackend = \"mem\"\nsize = \"1GiB\"\nblock_size = 520\n",
    )
    .unwrap();
    let out = config_check(&p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml:7:14: key `target[0].lun[0].block_size`: must be 512 or 4096"),
        "{err}"
    );
}
