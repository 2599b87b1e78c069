//! tessera's local I/O: the io_uring engine (asynchronous positional I/O on file descriptors,
//! one ring per thread: [`Uring`]), owned page-aligned buffers ([`buf`]: [`AlignedBuf`] and the
//! [`IoBuf`] / [`IoBufMut`] contract the engine needs), and thin wrappers over the raw Linux
//! calls used outside the ring ([`sys`]). The fragment store (`tessera-store`) and the file LUN
//! backend (`tessera-scsi`) do their I/O through it.
//!
//! All of the project's `unsafe` code lives in this crate (the engine, [`buf`] and [`sys`]);
//! every block carries a `SAFETY:` comment. The other crates `#![forbid(unsafe_code)]`.
//!
//! # Threading model
//!
//! tessera runs one tokio current-thread runtime plus a [`tokio::task::LocalSet`] per core and
//! keeps a command on the core that received it. The engine follows suit: each thread owns one
//! ring, created lazily by the first [`Uring::current`] call on that thread (or explicitly with
//! [`Uring::init_current`]). Handles are `!Send` (`Rc`), the futures they return are `!Send`, and
//! submissions, completions and wake-ups all happen on the owning thread: no helper thread, no
//! cross-thread wake-up. A *reaper* task, spawned with [`tokio::task::spawn_local`] on first
//! use, waits for completions through tokio's own reactor: the ring's file descriptor (or, with
//! `IORING_SETUP_DEFER_TASKRUN`, an eventfd registered with the ring) is registered with
//! [`tokio::io::unix::AsyncFd`], so a completion wakes the thread's `epoll_wait` like any socket
//! does. If the `LocalSet` that ran the reaper is dropped, the next operation spawns a new one
//! in the current `LocalSet`.
//!
//! Requirements: ring-backed operations must be polled inside a `LocalSet` (or a
//! `LocalRuntime`) on a runtime with I/O enabled; tokio panics otherwise.
//!
//! # Batching: where submissions are flushed
//!
//! An operation pushes its SQE into the submission queue when first polled and, with the
//! default [`FlushPolicy::Reaper`], wakes the reaper instead of entering the kernel. The reaper
//! is queued behind every task already runnable in this scheduler tick, so all operations
//! issued in the tick reach the kernel in one `io_uring_enter`; the reaper then reaps whatever
//! completed inline (page-cache hits, tmpfs) before it sleeps. The queue is also flushed at
//! once when it is full. [`FlushPolicy::Immediate`] enters the kernel from the operation's
//! own poll instead (one syscall per operation, no extra task switch); the micro-benchmark in
//! `examples/uring_bench.rs` compares the two. Measured on the project's 2-vCPU machine, pinned
//! to one core, 4 KiB random reads served from the ext4 page cache: `Reaper` 1.1 µs at QD1 and
//! 1.19 M IOPS at QD32 (32 ops per `io_uring_enter`), `Immediate` 1.0 µs and 1.08 M IOPS; on
//! the disk with `O_DIRECT` both are device-bound and within run-to-run noise. The defaults
//! (`Reaper`, `COOP_TASKRUN | SINGLE_ISSUER`, no `DEFER_TASKRUN`, which measured no better and
//! needs an extra eventfd) follow from that.
//!
//! # Buffer lifetime rule
//!
//! Operations take their buffers *by value* ([`IoBuf`], [`IoBufMut`]) and a cloned
//! [`SharedFd`], and give the buffer back with the result ([`BufResult`]). While the kernel
//! may use them, the engine owns them: if the future is dropped before the completion arrives,
//! the buffer and the descriptor move into the engine's slot for that operation and are freed
//! only when its CQE is reaped. A descriptor can therefore never be closed and reused under an
//! in-flight operation. When a thread exits with operations still in flight, the ring's
//! destructor waits for them before unmapping anything.
//!
//! # Fallback
//!
//! If `io_uring_setup` fails (`ENOSYS`, or `EPERM` under seccomp or
//! `kernel.io_uring_disabled`), [`EngineMode::Auto`] logs one warning per process and performs
//! every operation as a plain synchronous syscall (`pread`, `pwritev2`, `fdatasync`,
//! `fallocate`) on the calling thread when the future is first polled. The environment
//! variable `TESSERA_IO_ENGINE=sync|uring|auto` selects the mode for lazily created engines.

pub mod buf;
pub mod sys;

#[cfg(feature = "fault-injection")]
pub mod fault;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::future::{poll_fn, Future};
use std::io;
use std::ops::BitOr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub use buf::{AlignedBuf, BufWith, IoBuf, IoBufMut};

/// An operation's result together with the buffer(s) it was given.
pub type BufResult<T, B> = (io::Result<T>, B);

/// A reference-counted, thread-safe file descriptor. In-flight operations hold a clone, so the
/// descriptor stays open until every operation using it has completed.
#[derive(Clone, Debug)]
pub struct SharedFd(Arc<OwnedFd>);

impl SharedFd {
    /// Wrap an owned descriptor (a `File`, an `OwnedFd`, ...).
    pub fn new(fd: impl Into<OwnedFd>) -> Self {
        Self(Arc::new(fd.into()))
    }
}

impl AsFd for SharedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl From<File> for SharedFd {
    fn from(f: File) -> Self {
        Self::new(f)
    }
}

impl From<OwnedFd> for SharedFd {
    fn from(f: OwnedFd) -> Self {
        Self::new(f)
    }
}

/// Per-I/O flags for writes (`RWF_*` of `pwritev2(2)`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RwFlags(i32);

impl RwFlags {
    /// No flags.
    pub const NONE: Self = Self(0);
    /// `RWF_DSYNC`: the write is durable (as after `fdatasync`) when it completes.
    pub const DSYNC: Self = Self(libc::RWF_DSYNC);

    /// The raw flag bits.
    pub fn bits(self) -> i32 {
        self.0
    }
}

impl BitOr for RwFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// The `mode` of `fallocate(2)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FallocateMode(i32);

impl FallocateMode {
    /// Allocate blocks (and extend the file if the range passes its end).
    pub const ALLOCATE: Self = Self(0);
    /// Do not change the file size.
    pub const KEEP_SIZE: Self = Self(libc::FALLOC_FL_KEEP_SIZE);
    /// Deallocate the range; must be combined with [`KEEP_SIZE`](Self::KEEP_SIZE).
    pub const PUNCH_HOLE: Self = Self(libc::FALLOC_FL_PUNCH_HOLE);
    /// Make the range read as zeroes, preferably without writing them.
    pub const ZERO_RANGE: Self = Self(libc::FALLOC_FL_ZERO_RANGE);

    /// The raw mode bits.
    pub fn bits(self) -> i32 {
        self.0
    }
}

impl BitOr for FallocateMode {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// How the engine of a thread performs I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineMode {
    /// io_uring if `io_uring_setup` works, else synchronous syscalls (with one warning).
    #[default]
    Auto,
    /// io_uring, or an error from [`Uring::init_current`].
    Uring,
    /// Synchronous syscalls on the calling thread.
    Sync,
}

/// When queued submissions are handed to the kernel (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlushPolicy {
    /// The reaper task flushes once per scheduler tick (and a full queue is flushed at once).
    #[default]
    Reaper,
    /// Every operation enters the kernel as soon as it is queued.
    Immediate,
}

/// Configuration of one thread's engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// io_uring, synchronous, or io_uring with fallback.
    pub mode: EngineMode,
    /// Submission-queue size (a power of two); the completion queue is twice as large and
    /// bounds the number of operations in flight.
    pub entries: u32,
    /// Where submissions are flushed.
    pub flush: FlushPolicy,
    /// `IORING_SETUP_COOP_TASKRUN`: no inter-processor interrupt to run completion work.
    pub coop_taskrun: bool,
    /// `IORING_SETUP_SINGLE_ISSUER`: only the creating thread submits (always true here).
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN`: completion work runs only when the reaper asks for it;
    /// needs `single_issuer`, and an eventfd to learn that work is pending.
    pub defer_taskrun: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mode: EngineMode::Auto,
            entries: 256,
            flush: FlushPolicy::Reaper,
            coop_taskrun: true,
            single_issuer: true,
            defer_taskrun: false,
        }
    }
}

impl EngineConfig {
    /// The default configuration, with [`mode`](Self::mode) taken from the environment
    /// variable `TESSERA_IO_ENGINE` (`auto`, `uring` or `sync`) when set.
    pub fn from_env() -> Self {
        let mut cfg = Self::default();
        match std::env::var("TESSERA_IO_ENGINE").as_deref() {
            Ok("sync") => cfg.mode = EngineMode::Sync,
            Ok("uring") => cfg.mode = EngineMode::Uring,
            Ok("auto") | Err(_) => {}
            Ok(other) => {
                tracing::warn!(value = other, "ignoring unknown TESSERA_IO_ENGINE value");
            }
        }
        cfg
    }
}

/// Why an engine could not be set up.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// This thread already has an engine.
    #[error("this thread already has an I/O engine")]
    AlreadyInitialized,
    /// The configuration is invalid.
    #[error("invalid engine configuration: {0}")]
    Config(&'static str),
    /// `io_uring_setup` (or registering the eventfd) failed.
    #[error("io_uring setup failed: {0}")]
    Setup(#[source] io::Error),
}

/// Counters of one thread's engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// Operations queued to the ring.
    pub ring_ops: u64,
    /// `io_uring_enter` calls made to submit or to run completion work.
    pub enters: u64,
    /// Operations performed as synchronous syscalls.
    pub sync_ops: u64,
    /// The most operations in flight at once.
    pub max_in_flight: usize,
    /// Times the reaper's fallback tick found work no wake-up had announced (completions to
    /// reap, or submissions still queued).
    pub unannounced: u64,
}

/// Counters of every engine in the process together (for metrics): each thread's engine adds
/// to them as it goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineTotals {
    /// Operations queued to a ring.
    pub submitted: u64,
    /// Completions reaped from a ring.
    pub completed: u64,
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// Operations performed as synchronous syscalls.
    pub sync_ops: u64,
}

impl EngineTotals {
    /// Operations queued or in the kernel, not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.submitted.saturating_sub(self.completed)
    }
}

static TOTAL_SUBMITTED: AtomicU64 = AtomicU64::new(0);
static TOTAL_COMPLETED: AtomicU64 = AtomicU64::new(0);
static TOTAL_ENTERS: AtomicU64 = AtomicU64::new(0);
static TOTAL_SYNC: AtomicU64 = AtomicU64::new(0);

/// The counters of every engine of the process.
pub fn engine_totals() -> EngineTotals {
    // Completions first: a completion counted here was submitted before this read of
    // `submitted`, so `in_flight` never goes negative.
    let completed = TOTAL_COMPLETED.load(Ordering::Relaxed);
    EngineTotals {
        submitted: TOTAL_SUBMITTED.load(Ordering::Relaxed),
        completed,
        enters: TOTAL_ENTERS.load(Ordering::Relaxed),
        sync_ops: TOTAL_SYNC.load(Ordering::Relaxed),
    }
}

/// A handle to the calling thread's I/O engine. Cheap to clone; `!Send`.
#[derive(Clone)]
pub struct Uring {
    inner: Rc<Inner>,
}

impl fmt::Debug for Uring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uring")
            .field("ring", &self.is_uring())
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Uring>> = const { RefCell::new(None) };
    static BLOCKING: Uring = Uring::sync();
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

impl Uring {
    /// The calling thread's engine, created on first use from [`EngineConfig::from_env`]. Never
    /// fails: if a ring cannot be set up, the engine falls back to synchronous syscalls.
    pub fn current() -> Self {
        CURRENT.with(|c| {
            if let Some(u) = &*c.borrow() {
                return u.clone();
            }
            let mut cfg = EngineConfig::from_env();
            if cfg.mode == EngineMode::Uring {
                cfg.mode = EngineMode::Auto;
            }
            let u = Self::build(&cfg).unwrap_or_else(|_| Self::sync());
            *c.borrow_mut() = Some(u.clone());
            u
        })
    }

    /// Create the calling thread's engine with `cfg`. Fails if the thread already has one, or
    /// if `cfg.mode` is [`EngineMode::Uring`] and io_uring cannot be set up.
    pub fn init_current(cfg: &EngineConfig) -> Result<Self, EngineError> {
        CURRENT.with(|c| {
            if c.borrow().is_some() {
                return Err(EngineError::AlreadyInitialized);
            }
            let u = Self::build(cfg)?;
            *c.borrow_mut() = Some(u.clone());
            Ok(u)
        })
    }

    /// A handle on the calling thread that performs every operation as a synchronous syscall,
    /// whatever the thread's engine is. For files where io_uring only adds cost: on tmpfs the
    /// kernel hands every read and write to an io-wq worker thread (see `examples/uring_bench.rs`).
    pub fn blocking() -> Self {
        BLOCKING.with(Self::clone)
    }

    fn sync() -> Self {
        Self {
            inner: Rc::new(Inner {
                ring: None,
                notify: None,
                defer: false,
                flush: FlushPolicy::Reaper,
                sync_ops: Default::default(),
            }),
        }
    }

    fn build(cfg: &EngineConfig) -> Result<Self, EngineError> {
        if !cfg.entries.is_power_of_two() || cfg.entries < 2 {
            return Err(EngineError::Config("entries must be a power of two >= 2"));
        }
        if cfg.defer_taskrun && !cfg.single_issuer {
            return Err(EngineError::Config("defer_taskrun requires single_issuer"));
        }
        match cfg.mode {
            EngineMode::Sync => Ok(Self::sync()),
            EngineMode::Uring => Self::with_ring(cfg).map_err(EngineError::Setup),
            EngineMode::Auto => match Self::with_ring(cfg) {
                Ok(u) => Ok(u),
                Err(e) => {
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "io_uring unavailable; performing I/O with synchronous syscalls"
                        );
                    }
                    Ok(Self::sync())
                }
            },
        }
    }

    fn with_ring(cfg: &EngineConfig) -> io::Result<Self> {
        let mut b = IoUring::builder();
        if cfg.coop_taskrun {
            b.setup_coop_taskrun();
        }
        if cfg.single_issuer {
            b.setup_single_issuer();
        }
        if cfg.defer_taskrun {
            b.setup_defer_taskrun();
        }
        let mut defer = cfg.defer_taskrun;
        let uring = match b.build(cfg.entries) {
            Ok(r) => r,
            // An older kernel that does not know a setup flag: retry with none.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "io_uring setup flags refused; retrying without");
                defer = false;
                IoUring::new(cfg.entries)?
            }
            Err(e) => return Err(e),
        };
        let notify = if defer {
            let efd = sys::eventfd()?;
            uring.submitter().register_eventfd(efd.as_raw_fd())?;
            Some(efd)
        } else {
            None
        };
        let max_in_flight = uring.params().cq_entries() as usize;
        let ring = Ring {
            uring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            unsubmitted: 0,
            max_in_flight,
            reaper: None,
            reaper_alive: false,
            space_waiters: Vec::new(),
            stats: EngineStats::default(),
        };
        Ok(Self {
            inner: Rc::new(Inner {
                ring: Some(RefCell::new(ring)),
                notify,
                defer,
                flush: cfg.flush,
                sync_ops: Default::default(),
            }),
        })
    }

    /// True when operations go through io_uring, false in the synchronous fallback.
    pub fn is_uring(&self) -> bool {
        self.inner.ring.is_some()
    }

    /// This engine's counters.
    pub fn stats(&self) -> EngineStats {
        let mut s = match &self.inner.ring {
            Some(r) => r.borrow().stats,
            None => EngineStats::default(),
        };
        s.sync_ops = self.inner.sync_ops.get();
        s
    }

    /// Read `buf.bytes_init()` bytes at `offset` into `buf`. Returns the number of bytes read
    /// (fewer at end of file) and the buffer.
    pub fn read_at<B: IoBufMut>(
        &self,
        fd: &SharedFd,
        mut buf: B,
        offset: u64,
    ) -> impl Future<Output = BufResult<usize, B>> + 'static {
        let (inner, fd) = (self.inner.clone(), fd.clone());
        async move {
            let Some((len, offset)) = check_len_off(buf.bytes_init(), offset) else {
                return (Err(einval()), buf);
            };
            if inner.ring.is_none() {
                inner.count_sync();
                // SAFETY: IoBufMut guarantees `bytes_init()` writable, initialized, unaliased
                // bytes at `stable_mut_ptr()` while `buf` lives; the slice ends before `buf` is
                // returned.
                let s = unsafe {
                    std::slice::from_raw_parts_mut(buf.stable_mut_ptr(), buf.bytes_init())
                };
                let r = sys::pread(fd.as_fd(), s, offset);
                return (r, buf);
            }
            let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.stable_mut_ptr(), len)
                .offset(offset)
                .build();
            // SAFETY: the SQE points into `buf`'s stable memory and names `fd`; both move into
            // the Op, which keeps them alive until the CQE arrives, even if dropped.
            let (res, (buf, _fd)) = unsafe { Op::new(inner, sqe, (buf, fd)) }.await;
            (cvt(res), buf)
        }
    }

    /// Write `buf` at `offset`, with `flags` ([`RwFlags::DSYNC`] for a durable write). Returns
    /// the number of bytes written (a short count is possible) and the buffer.
    pub fn write_at<B: IoBuf>(
        &self,
        fd: &SharedFd,
        buf: B,
        offset: u64,
        flags: RwFlags,
    ) -> impl Future<Output = BufResult<usize, B>> + 'static {
        let (inner, fd) = (self.inner.clone(), fd.clone());
        async move {
            let Some((len, offset)) = check_len_off(buf.bytes_init(), offset) else {
                return (Err(einval()), buf);
            };
            #[cfg(feature = "fault-injection")]
            if let Some(e) = fault::take(fd.as_fd(), fault::FaultOp::Write) {
                return (Err(e), buf);
            }
            if inner.ring.is_none() {
                inner.count_sync();
                // SAFETY: IoBuf guarantees `bytes_init()` initialized bytes at `stable_ptr()`
                // while `buf` lives; the slice ends before `buf` is returned.
                let s = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
                let r = sys::pwrite(fd.as_fd(), s, offset, flags.bits());
                return (r, buf);
            }
            let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), buf.stable_ptr(), len)
                .offset(offset)
                .rw_flags(flags.bits())
                .build();
            // SAFETY: as in `read_at`: `buf` and `fd` live in the Op until the CQE arrives.
            let (res, (buf, _fd)) = unsafe { Op::new(inner, sqe, (buf, fd)) }.await;
            (cvt(res), buf)
        }
    }

    /// Read into several buffers in order, starting at `offset` (`preadv`).
    pub fn read_vectored_at<B: IoBufMut>(
        &self,
        fd: &SharedFd,
        mut bufs: Vec<B>,
        offset: u64,
    ) -> impl Future<Output = BufResult<usize, Vec<B>>> + 'static {
        let (inner, fd) = (self.inner.clone(), fd.clone());
        async move {
            let total: usize = bufs.iter().map(|b| b.bytes_init()).sum();
            let (Some((_, offset)), Ok(n)) =
                (check_len_off(total, offset), u32::try_from(bufs.len()))
            else {
                return (Err(einval()), bufs);
            };
            let iov: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.stable_mut_ptr().cast(),
                    iov_len: b.bytes_init(),
                })
                .collect();
            if inner.ring.is_none() {
                inner.count_sync();
                // SAFETY: each iovec describes a live IoBufMut's writable, unaliased bytes.
                let r = unsafe { sys::preadv(fd.as_fd(), &iov, offset) };
                return (r, bufs);
            }
            let sqe = opcode::Readv::new(types::Fd(fd.as_raw_fd()), iov.as_ptr(), n)
                .offset(offset)
                .build();
            // SAFETY: the SQE points to the iovec array, which points into the buffers; all of
            // them and `fd` live in the Op until the CQE arrives (heap memory, stable on move).
            let (res, (bufs, _iov, _fd)) = unsafe { Op::new(inner, sqe, (bufs, iov, fd)) }.await;
            (cvt(res), bufs)
        }
    }

    /// Write several buffers in order, starting at `offset` (`pwritev2`).
    pub fn write_vectored_at<B: IoBuf>(
        &self,
        fd: &SharedFd,
        bufs: Vec<B>,
        offset: u64,
        flags: RwFlags,
    ) -> impl Future<Output = BufResult<usize, Vec<B>>> + 'static {
        let (inner, fd) = (self.inner.clone(), fd.clone());
        async move {
            let total: usize = bufs.iter().map(|b| b.bytes_init()).sum();
            let (Some((_, offset)), Ok(n)) =
                (check_len_off(total, offset), u32::try_from(bufs.len()))
            else {
                return (Err(einval()), bufs);
            };
            #[cfg(feature = "fault-injection")]
            if let Some(e) = fault::take(fd.as_fd(), fault::FaultOp::Write) {
                return (Err(e), bufs);
            }
            let iov: Vec<libc::iovec> = bufs
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.stable_ptr() as *mut _,
                    iov_len: b.bytes_init(),
                })
                .collect();
            if inner.ring.is_none() {
                inner.count_sync();
                // SAFETY: each iovec describes a live IoBuf's initialized bytes.
                let r = unsafe { sys::pwritev2(fd.as_fd(), &iov, offset, flags.bits()) };
                return (r, bufs);
            }
            let sqe = opcode::Writev::new(types::Fd(fd.as_raw_fd()), iov.as_ptr(), n)
                .offset(offset)
                .rw_flags(flags.bits())
                .build();
            // SAFETY: as in `read_vectored_at`.
            let (res, (bufs, _iov, _fd)) = unsafe { Op::new(inner, sqe, (bufs, iov, fd)) }.await;
            (cvt(res), bufs)
        }
    }

    /// `fsync(2)`: make data and metadata durable.
    pub fn fsync(&self, fd: &SharedFd) -> impl Future<Output = io::Result<()>> + 'static {
        self.sync_op(fd, false)
    }

    /// `fdatasync(2)`: make data (and the metadata needed to read it) durable.
    pub fn fdatasync(&self, fd: &SharedFd) -> impl Future<Output = io::Result<()>> + 'static {
        self.sync_op(fd, true)
    }

    fn sync_op(
        &self,
        fd: &SharedFd,
        data_only: bool,
    ) -> impl Future<Output = io::Result<()>> + 'static {
        let (inner, fd) = (self.inner.clone(), fd.clone());
        async move {
            #[cfg(feature = "fault-injection")]
            if let Some(e) = fault::take(fd.as_fd(), fault::FaultOp::Sync) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                return Err(e);
            }
            if inner.ring.is_none() {
                inner.count_sync();
                return sys::fsync(fd.as_fd(), data_only);
            }
            let flags = if data_only {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            let sqe = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
                .flags(flags)
                .build();
            // SAFETY: the SQE references no memory; `fd` lives in the Op until completion.
            let (res, _fd) = unsafe { Op::new(inner, sqe, fd) }.await;
            cvt(res).map(drop)
        }
    }

    /// `fallocate(2)` on `[offset, offset + len)`.
    pub fn fallocate(
        &self,
        fd: &SharedFd,
        mode: FallocateMode,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + 'static {
        let (inner, fd) = (self.inner.clone(), fd.clone());
        async move {
            if offset > i64::MAX as u64 || len > i64::MAX as u64 {
                return Err(einval());
            }
            if inner.ring.is_none() {
                inner.count_sync();
                return sys::fallocate(fd.as_fd(), mode.bits(), offset, len);
            }
            let sqe = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
                .offset(offset)
                .mode(mode.bits())
                .build();
            // SAFETY: the SQE references no memory; `fd` lives in the Op until completion.
            let (res, _fd) = unsafe { Op::new(inner, sqe, fd) }.await;
            cvt(res).map(drop)
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Validate a length (io_uring takes `u32`) and an offset (`-1` would mean "file position").
fn check_len_off(len: usize, offset: u64) -> Option<(u32, u64)> {
    let len = u32::try_from(len).ok()?;
    (offset <= i64::MAX as u64).then_some((len, offset))
}

fn cvt(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

struct Inner {
    /// `None` in the synchronous fallback.
    ring: Option<RefCell<Ring>>,
    /// The eventfd registered with the ring (DEFER_TASKRUN only).
    notify: Option<OwnedFd>,
    defer: bool,
    flush: FlushPolicy,
    sync_ops: std::cell::Cell<u64>,
}

impl Inner {
    fn count_sync(&self) {
        self.sync_ops.set(self.sync_ops.get() + 1);
        TOTAL_SYNC.fetch_add(1, Ordering::Relaxed);
    }

    fn ring(&self) -> &RefCell<Ring> {
        self.ring
            .as_ref()
            .expect("ring-backed operation on a synchronous engine")
    }
}

/// `user_data` of the engine's own cancel request (never a slot index).
const CANCEL_ALL: u64 = u64::MAX;

/// The state of one submitted operation, indexed by the SQE's `user_data`.
enum Slot {
    Free,
    /// Submitted; the waker of the task awaiting it.
    Waiting(Option<Waker>),
    /// Completed with this result; the future has not collected it yet.
    Done(i32),
    /// The future was dropped; its buffers live here until the completion arrives.
    Ignored(#[allow(dead_code)] Box<dyn Any>),
}

struct Ring {
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
    /// SQEs pushed but not yet consumed by the kernel.
    unsubmitted: usize,
    max_in_flight: usize,
    reaper: Option<Waker>,
    reaper_alive: bool,
    /// Operations waiting for room in the queues.
    space_waiters: Vec<Waker>,
    stats: EngineStats,
}

impl Ring {
    fn alloc(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, idx: usize) {
        self.slots[idx] = Slot::Free;
        self.free.push(idx);
    }

    /// Hand queued SQEs to the kernel; with `getevents`, also run deferred completion work.
    fn enter(&mut self, getevents: bool) -> io::Result<()> {
        let to_submit = self.uring.submission().len() as u32;
        let mut flags = 0;
        if getevents || self.uring.submission().cq_overflow() || self.uring.submission().taskrun() {
            flags |= io_uring::EnterFlags::GETEVENTS.bits();
        }
        if to_submit == 0 && flags == 0 {
            return Ok(());
        }
        loop {
            // SAFETY: `to_submit` SQEs were pushed and synced to the shared ring; every one
            // points to memory owned by its Op or slot until completion; no wait argument.
            let r = unsafe {
                self.uring
                    .submitter()
                    .enter::<libc::sigset_t>(to_submit, 0, flags, None)
            };
            self.stats.enters += 1;
            TOTAL_ENTERS.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(n) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Move every available CQE into its slot; collect wakers to call and abandoned buffers
    /// to free once the ring is no longer borrowed.
    fn drain(&mut self, wakers: &mut Vec<Waker>, garbage: &mut Vec<Box<dyn Any>>) {
        let Self {
            uring,
            slots,
            free,
            in_flight,
            space_waiters,
            ..
        } = self;
        let mut n = 0usize;
        for cqe in uring.completion() {
            if cqe.user_data() == CANCEL_ALL {
                continue;
            }
            n += 1;
            let idx = cqe.user_data() as usize;
            match std::mem::replace(&mut slots[idx], Slot::Free) {
                Slot::Waiting(w) => {
                    slots[idx] = Slot::Done(cqe.result());
                    wakers.extend(w);
                }
                Slot::Ignored(data) => {
                    garbage.push(data);
                    free.push(idx);
                }
                other => {
                    slots[idx] = other;
                    debug_assert!(false, "completion for slot {idx} that is not in flight");
                }
            }
        }
        *in_flight -= n.min(*in_flight);
        TOTAL_COMPLETED.fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            wakers.append(space_waiters);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into abandoned buffers: wait for every completion before
        // the slots (and the ring mappings) are freed.
        let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
        if self.in_flight > 0 {
            // Cancel what can be cancelled (reads from pipes or sockets might never finish);
            // file I/O already issued runs to completion either way.
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_ALL);
            // SAFETY: the cancel SQE references no memory.
            if unsafe { self.uring.submission().push(&cancel) }.is_err() {
                let _ = self.uring.submit();
                // SAFETY: as above.
                let _ = unsafe { self.uring.submission().push(&cancel) };
            }
        }
        while self.in_flight > 0 {
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, in_flight = self.in_flight, "cannot wait for in-flight I/O; leaking its buffers");
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            self.drain(&mut wakers, &mut garbage);
        }
    }
}

/// A ring operation in flight. Owns the data the SQE points to (`T`) until completion; if
/// dropped early, hands `T` to the ring slot instead of freeing it.
struct Op<T: 'static> {
    inner: Rc<Inner>,
    state: OpState,
    data: Option<T>,
}

enum OpState {
    Unsubmitted(squeue::Entry),
    Submitted(usize),
    Finished,
}

// Op never pins `data`: it is only moved out by value.
impl<T> Unpin for Op<T> {}

impl<T: 'static> Op<T> {
    /// # Safety
    ///
    /// Every pointer in `sqe` must point into heap memory owned by `data` (or be valid for the
    /// whole life of the process), and every file descriptor in it must be kept open by `data`.
    unsafe fn new(inner: Rc<Inner>, sqe: squeue::Entry, data: T) -> Self {
        Self {
            inner,
            state: OpState::Unsubmitted(sqe),
            data: Some(data),
        }
    }
}

impl<T: 'static> Future for Op<T> {
    type Output = (i32, T);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, T)> {
        let this = self.get_mut();
        let inner = this.inner.clone();
        let mut wakers = Vec::new();
        let mut garbage: Vec<Box<dyn Any>> = Vec::new();
        let mut spawn_reaper = false;
        let out = 'poll: {
            let mut ring = inner.ring().borrow_mut();
            let idx = match this.state {
                OpState::Submitted(idx) => idx,
                OpState::Finished => panic!("Op polled after completion"),
                OpState::Unsubmitted(ref sqe) => {
                    if !ring.reaper_alive {
                        ring.reaper_alive = true;
                        spawn_reaper = true;
                    }
                    if ring.in_flight >= ring.max_in_flight {
                        ring.space_waiters.push(cx.waker().clone());
                        break 'poll Poll::Pending;
                    }
                    if ring.uring.submission().is_full() {
                        if let Err(e) = ring.enter(inner.defer) {
                            tracing::debug!(error = %e, "io_uring_enter with a full queue failed");
                        }
                        if ring.uring.submission().is_full() {
                            ring.space_waiters.push(cx.waker().clone());
                            break 'poll Poll::Pending;
                        }
                    }
                    let idx = ring.alloc(Slot::Waiting(Some(cx.waker().clone())));
                    let sqe = sqe.clone().user_data(idx as u64);
                    // SAFETY: the SQE's pointers and descriptor are kept alive by `this.data`
                    // (the contract of `Op::new`), which moves into the slot if the Op is
                    // dropped before completion.
                    if unsafe { ring.uring.submission().push(&sqe) }.is_err() {
                        ring.release(idx);
                        ring.space_waiters.push(cx.waker().clone());
                        break 'poll Poll::Pending;
                    }
                    this.state = OpState::Submitted(idx);
                    ring.in_flight += 1;
                    ring.unsubmitted += 1;
                    ring.stats.ring_ops += 1;
                    TOTAL_SUBMITTED.fetch_add(1, Ordering::Relaxed);
                    ring.stats.max_in_flight = ring.stats.max_in_flight.max(ring.in_flight);
                    match inner.flush {
                        FlushPolicy::Immediate => {
                            if let Err(e) = ring.enter(inner.defer) {
                                tracing::debug!(error = %e, "io_uring_enter failed; the reaper retries");
                            }
                            ring.drain(&mut wakers, &mut garbage);
                            if ring.unsubmitted > 0 {
                                wakers.extend(ring.reaper.clone());
                            }
                        }
                        FlushPolicy::Reaper => {
                            // The first SQE of a batch wakes the reaper; it runs after every
                            // task already runnable in this tick and flushes them all at once.
                            if ring.unsubmitted == 1 {
                                wakers.extend(ring.reaper.clone());
                            }
                        }
                    }
                    idx
                }
            };
            match &mut ring.slots[idx] {
                Slot::Done(res) => {
                    let res = *res;
                    ring.release(idx);
                    this.state = OpState::Finished;
                    Poll::Ready(res)
                }
                Slot::Waiting(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                _ => unreachable!("a submitted op's slot is Waiting or Done"),
            }
        };
        for w in wakers {
            w.wake();
        }
        drop(garbage);
        if spawn_reaper {
            tokio::task::spawn_local(reaper(inner));
        }
        match out {
            Poll::Ready(res) => Poll::Ready((
                res,
                this.data
                    .take()
                    .expect("op data is present until completion"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let OpState::Submitted(idx) = self.state else {
            return;
        };
        let Some(data) = self.data.take() else { return };
        let Some(cell) = &self.inner.ring else { return };
        let mut ring = cell.borrow_mut();
        match ring.slots[idx] {
            Slot::Done(_) => {
                ring.release(idx);
                drop(ring);
                drop(data);
            }
            _ => ring.slots[idx] = Slot::Ignored(Box::new(data)),
        }
    }
}

/// The descriptor the reaper waits on, registered with tokio's reactor (not owned).
struct NotifyFd(RawFd);

impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Marks the reaper dead when its task is dropped (its `LocalSet` went away), so the next
/// operation spawns a new one.
struct ReaperAlive(Rc<Inner>);

impl Drop for ReaperAlive {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.ring().try_borrow_mut() {
            r.reaper_alive = false;
            r.reaper = None;
        }
    }
}

/// The per-thread completion task: flushes queued submissions and reaps completions.
async fn reaper(inner: Rc<Inner>) {
    let _alive = ReaperAlive(inner.clone());
    let fd = match &inner.notify {
        Some(efd) => efd.as_raw_fd(),
        None => inner.ring().borrow().uring.as_raw_fd(),
    };
    // SAFETY: `fd` (the ring's descriptor or its eventfd) is owned by `inner`, which this task
    // holds until after `afd` is dropped (locals drop before the `inner` argument), so it stays
    // open and refers to the same file for the AsyncFd's whole life.
    let registered = unsafe { AsyncFd::register_with_interest(NotifyFd(fd), Interest::READABLE) };
    let afd = match registered.map_err(io::Error::from) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the io_uring descriptor with tokio");
            return;
        }
    };
    let mut getevents = inner.defer;
    let tick = tokio::time::sleep(REAP_TICK);
    tokio::pin!(tick);
    poll_fn(|cx| reap_poll(&inner, &afd, &mut getevents, tick.as_mut(), cx)).await;
}

/// While operations are in flight, the reaper also looks for work this often, whatever the
/// descriptor says: a lost wake-up then costs this much latency instead of a hang. (The
/// `Immediate` flush policy's test hung in epoll_wait 6 times in 350 runs on this machine's
/// kernel before the tick existed; the cause was not found, and with the tick in place the
/// runs stopped hanging without the tick ever reporting work, so the tick may only have moved
/// the timing. [`EngineStats::unannounced`] counts what it finds.)
const REAP_TICK: std::time::Duration = std::time::Duration::from_millis(20);

fn reap_poll(
    inner: &Inner,
    afd: &AsyncFd<NotifyFd>,
    getevents: &mut bool,
    mut tick: Pin<&mut tokio::time::Sleep>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
        {
            let mut ring = inner.ring().borrow_mut();
            if !ring
                .reaper
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                ring.reaper = Some(cx.waker().clone());
            }
            if ring.unsubmitted > 0 || *getevents {
                if let Err(e) = ring.enter(*getevents) {
                    // EAGAIN/EBUSY: retried when completions free resources.
                    tracing::debug!(error = %e, "io_uring_enter failed");
                }
                *getevents = false;
                if !ring.uring.submission().is_full() {
                    let w = std::mem::take(&mut ring.space_waiters);
                    wakers.extend(w);
                }
            }
            ring.drain(&mut wakers, &mut garbage);
        }
        for w in wakers {
            w.wake();
        }
        drop(garbage);
        match afd.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                // Clear before draining: a completion after this point raises a new edge.
                guard.clear_ready();
                *getevents = inner.defer;
            }
            Poll::Ready(Err(e)) => {
                tracing::error!(error = %e, "polling the io_uring descriptor failed");
                return Poll::Ready(());
            }
            Poll::Pending => {
                let in_flight = inner.ring().borrow().in_flight;
                if in_flight == 0 {
                    return Poll::Pending;
                }
                if tick.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tick.as_mut().reset(tokio::time::Instant::now() + REAP_TICK);
                // Look again, running deferred completion work too.
                let mut ring = inner.ring().borrow_mut();
                let before = (ring.in_flight, ring.unsubmitted);
                if let Err(e) = ring.enter(true) {
                    tracing::debug!(error = %e, "io_uring_enter failed");
                }
                let (mut wakers, mut garbage) = (Vec::new(), Vec::new());
                ring.drain(&mut wakers, &mut garbage);
                if ring.in_flight < before.0 || ring.unsubmitted < before.1 {
                    ring.stats.unannounced += 1;
                    if !UNANNOUNCED_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("io_uring work was left without a wake-up; the reaper's tick found it (reported once)");
                    }
                }
                drop(ring);
                for w in wakers {
                    w.wake();
                }
                drop(garbage);
            }
        }
    }
}

static UNANNOUNCED_WARNED: AtomicBool = AtomicBool::new(false);
