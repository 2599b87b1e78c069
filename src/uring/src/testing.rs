//! Helpers for tests of the crates doing I/O through the engine (the `testing` feature; this
//! crate's own unit tests have them too). Never in a release build.

use std::future::Future;
use std::path::PathBuf;

use crate::{EngineConfig, EngineError, EngineMode, Uring};

/// Run `f` on a fresh current-thread runtime inside a `LocalSet`, as tessera runs a core.
pub fn run<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// Set up this test thread's engine in `mode`. When io_uring was asked for and cannot be
/// set up here the test fails, unless `TESSERA_ALLOW_NO_URING=1` is set: then `None`
/// (after printing why) and the caller skips. The log says which engine ran.
pub fn engine(mode: EngineMode) -> Option<Uring> {
    match Uring::init_current(&EngineConfig {
        mode,
        ..EngineConfig::default()
    }) {
        Ok(u) => {
            eprintln!(
                "engine: {}",
                if u.is_uring() { "io_uring" } else { "synchronous system calls" }
            );
            Some(u)
        }
        Err(EngineError::Setup(e)) if allow_no_uring() => {
            eprintln!("SKIP: io_uring unavailable on this machine ({e}); TESSERA_ALLOW_NO_URING=1 is set");
            None
        }
        Err(EngineError::Setup(e)) => panic!(
            "io_uring cannot be set up here: {e} (set TESSERA_ALLOW_NO_URING=1 to skip the io_uring tests)"
        ),
        Err(e) => panic!("engine setup: {e}"),
    }
}

/// Whether `TESSERA_ALLOW_NO_URING=1` lets io_uring tests skip on a machine without it.
pub fn allow_no_uring() -> bool {
    std::env::var("TESSERA_ALLOW_NO_URING").is_ok_and(|v| v == "1")
}

/// A temporary directory on the default tmpdir (ext4 here) or on tmpfs (/dev/shm).
pub fn tmpdir(shm: bool) -> tempfile::TempDir {
    if shm {
        tempfile::tempdir_in(PathBuf::from("/dev/shm")).expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
