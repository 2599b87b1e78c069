//! Local storage through io_uring: the per-thread engine ([`uring`]), owned page-aligned
//! buffers ([`buf`]), the `file` block backend ([`file::FileDevice`]) that serves a regular
//! file or a block device as a [`tessera_proto::block::BlockDevice`], and the storage node's
//! fragment store ([`fragment::FragmentStore`], on-disk format in `FORMAT.md`).
//!
//! `unsafe` code lives only in [`uring`] and [`buf`]; every block carries a `SAFETY:` comment.

pub mod buf;
pub mod file;
pub mod fragment;
mod mapped;
pub mod uring;

pub use buf::{AlignedBuf, BufWith, IoBuf, IoBufMut};
pub use file::{DirectMode, FileDevice, FileOptions, IoPath, OpenError};
pub use uring::{
    engine_totals, BufResult, EngineConfig, EngineError, EngineMode, EngineStats, EngineTotals,
    FallocateMode, FlushPolicy, RwFlags, SharedFd, Uring,
};

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the unit tests.

    use std::future::Future;
    use std::path::PathBuf;

    use crate::uring::{EngineConfig, EngineError, EngineMode, Uring};

    /// Run `f` on a fresh current-thread runtime inside a `LocalSet`, as tessera runs a core.
    pub(crate) fn run<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a current-thread runtime");
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    /// Set up this test thread's engine in `mode`. When io_uring was asked for and cannot be
    /// set up here the test fails, unless `TESSERA_ALLOW_NO_URING=1` is set: then `None`
    /// (after printing why) and the caller skips. The log says which engine ran.
    pub(crate) fn engine(mode: EngineMode) -> Option<Uring> {
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
    pub(crate) fn allow_no_uring() -> bool {
        std::env::var("TESSERA_ALLOW_NO_URING").is_ok_and(|v| v == "1")
    }

    /// A temporary directory on the default tmpdir (ext4 here) or on tmpfs (/dev/shm).
    pub(crate) fn tmpdir(shm: bool) -> tempfile::TempDir {
        if shm {
            tempfile::tempdir_in(PathBuf::from("/dev/shm")).expect("tempdir in /dev/shm")
        } else {
            tempfile::tempdir().expect("tempdir")
        }
    }

    /// Deterministic pseudo-random bytes.
    pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
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
}
