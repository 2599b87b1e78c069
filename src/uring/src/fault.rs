//! Fault injection in the I/O engine (the `fault-injection` feature; never in a release build).
//!
//! A test arms a fault on one file (named by path: every descriptor open on that inode is
//! affected, on any thread): the next `times` writes or syncs of it fail with `errno` without
//! reaching the kernel, as a disk that lost the data would report it. Linux reports a writeback
//! error to `fsync` once and then succeeds again; arming a sync fault with `times = 1` models
//! exactly that, which is what a store must not be fooled by. An injected sync failure is
//! answered after a few milliseconds, as a real one would be, so that writes finishing meanwhile
//! wait on it.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Mutex;

/// Which operations a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// `pwrite`/`pwritev2` (and their io_uring forms).
    Write,
    /// `fsync`/`fdatasync`.
    Sync,
}

struct Plan {
    dev: u64,
    ino: u64,
    op: FaultOp,
    errno: i32,
    times: u32,
}

static PLANS: Mutex<Vec<Plan>> = Mutex::new(Vec::new());

fn id_of(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::File::from(fd.try_clone_to_owned().ok()?)
        .metadata()
        .ok()?;
    Some((md.dev(), md.ino()))
}

/// Make the next `times` `op`s on the file at `path` fail with `errno`.
pub fn arm(path: &Path, op: FaultOp, errno: i32, times: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path)?;
    PLANS.lock().expect("fault plans").push(Plan {
        dev: md.dev(),
        ino: md.ino(),
        op,
        errno,
        times,
    });
    Ok(())
}

/// Forget the faults armed on the file at `path` (a file that is gone has none).
pub fn clear(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(md) = std::fs::metadata(path) {
        PLANS
            .lock()
            .expect("fault plans")
            .retain(|p| (p.dev, p.ino) != (md.dev(), md.ino()));
    }
}

/// The injected error for `op` on `fd`, if one is armed (it is used up).
pub(crate) fn take(fd: BorrowedFd<'_>, op: FaultOp) -> Option<io::Error> {
    let mut plans = PLANS.lock().expect("fault plans");
    if plans.is_empty() {
        return None;
    }
    let (dev, ino) = id_of(fd)?;
    let at = plans
        .iter()
        .position(|p| p.op == op && p.dev == dev && p.ino == ino && p.times > 0)?;
    let p = &mut plans[at];
    p.times -= 1;
    let e = io::Error::from_raw_os_error(p.errno);
    if p.times == 0 {
        plans.remove(at);
    }
    Some(e)
}
