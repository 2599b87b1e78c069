//! The `file` backend: a regular file or a block device served as a [`BlockDevice`] through
//! the per-thread io_uring engine ([`tessera_uring`]).
//!
//! # I/O path
//!
//! Each operation runs on the calling core: through that thread's io_uring ring
//! ([`Uring::current`]), or as a synchronous syscall ([`Uring::blocking`]) for files on tmpfs or
//! ramfs, where io_uring cannot complete page-cache copies inline and hands each one to an
//! io-wq worker thread (measured here: ~1 µs of CPU per 4 KiB op with `pread`/`pwrite`, ~4 µs
//! through the ring); see [`IoPath`]. [`DirectMode::Auto`] likewise skips `O_DIRECT` on those
//! file systems, where it bypasses nothing and only imposes 4 KiB alignment.
//!
//! # Direct I/O
//!
//! With `O_DIRECT` (the default where the file system accepts it) every request must be
//! aligned to the file's direct-I/O offset alignment (from `statx(STATX_DIOALIGN)`, else the
//! block device's logical sector size or the file system's block size) and use memory aligned
//! to its memory alignment. Reads land in an [`AlignedBuf`] that becomes the returned `Bytes`
//! without a copy; write data already aligned in memory is passed straight through, anything
//! else is copied once into an `AlignedBuf`.
//!
//! When the LUN's logical block is smaller than that alignment (512-byte LBAs on a 4 KiB
//! device), a request may cover part of an aligned unit. Reads then fetch the enclosing aligned
//! range and return a slice of it. Writes read the unaligned head and tail units, patch them and
//! write the whole aligned range back; to keep two such read-modify-writes (or a
//! read-modify-write and any overlapping write) from losing each other's data, every write and
//! unmap on such a device takes a range lock over its aligned range. The lock guard travels
//! with the write's buffer into the engine, so it is released when the kernel has finished the
//! write, even if the caller's future was dropped first.
//!
//! # Thin provisioning
//!
//! Regular files are sparse. `unmap` punches holes (`FALLOC_FL_PUNCH_HOLE | KEEP_SIZE`) over
//! the whole file-system blocks of the range and writes zeroes over the partial blocks at its
//! edges; [`DeviceInfo::thin`] says whether the file system can punch holes (probed at open).
//! Without hole punching, `unmap` zeroes the range (`FALLOC_FL_ZERO_RANGE`, else zero writes).
//! On block devices `unmap` asks the kernel to zero the range by deallocation (`fallocate`
//! with `PUNCH_HOLE`, which fails rather than writing zeroes) and otherwise zeroes it with
//! `ZERO_RANGE`; block devices are reported as not thin. `extents` uses `lseek(SEEK_DATA /
//! SEEK_HOLE)`, a synchronous metadata call on the calling thread.
//!
//! # Durability and failure
//!
//! A FUA write is an `RWF_DSYNC` write (or a write plus `fdatasync` where `RWF_DSYNC` is
//! refused); `flush` is `fdatasync`. After a failed `fdatasync` or an `EIO` from a write the
//! device is fail-stop: Linux may already have dropped the dirty pages, so a later `fdatasync`
//! could succeed without the data being durable. Every later write and flush returns the
//! first error; reads keep working.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tessera_proto::block::{BlockDevice, BlockError, BlockFuture, DeviceInfo, Extent};

use crate::mapped::{MappedChunks, CHUNK_SHIFT};
use tessera_uring::buf::{AlignedBuf, BufWith, PAGE_SIZE};
use tessera_uring::{sys, FallocateMode, RwFlags, SharedFd, Uring};

/// Whether to bypass the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectMode {
    /// Use `O_DIRECT` where the file system accepts it, else buffered I/O (with a log line).
    #[default]
    Auto,
    /// Require `O_DIRECT`; opening fails where it is refused.
    On,
    /// Buffered I/O through the page cache.
    Off,
}

/// Which path a device's I/O takes on each core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoPath {
    /// Synchronous syscalls on tmpfs and ramfs (io_uring hands their page-cache copies to a
    /// worker thread, 3–4x the CPU per 4 KiB op here), the thread's io_uring engine elsewhere.
    #[default]
    Auto,
    /// The calling thread's io_uring engine ([`Uring::current`]).
    Ring,
    /// Synchronous syscalls on the calling thread ([`Uring::blocking`]).
    Sync,
}

/// How [`FileDevice::open`] opens its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// The device size in bytes (a multiple of `block_size`). A regular file is created if
    /// missing and extended (sparsely) if shorter; it is never truncated. `None`: use the
    /// existing file's size, rounded down to a whole block.
    pub size_bytes: Option<u64>,
    /// Open read-only; writes and unmaps fail with [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// Whether to bypass the page cache.
    pub direct: DirectMode,
    /// The LUN's logical block size: a power of two from 512 to 65536.
    pub block_size: u32,
    /// Treat the direct-I/O offset alignment as at least this many bytes (a power of two),
    /// for example to match a 4 KiB-sector device behind a file system that reports 512.
    pub min_dio_align: Option<u32>,
    /// io_uring or synchronous syscalls.
    pub io: IoPath,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            size_bytes: None,
            read_only: false,
            direct: DirectMode::Auto,
            block_size: 512,
            min_dio_align: None,
            io: IoPath::Auto,
        }
    }
}

/// Why a [`FileDevice`] could not be opened.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The block size is not a power of two from 512 to 65536.
    #[error("invalid block size {0}: must be a power of two from 512 to 65536")]
    BlockSize(u32),
    /// `DirectMode::On` was asked for and the file system refuses `O_DIRECT`.
    #[error("{path}: O_DIRECT refused: {source}")]
    DirectUnsupported {
        /// The file.
        path: PathBuf,
        /// The error from `open` or the trial read.
        #[source]
        source: io::Error,
    },
    /// The device would have no blocks.
    #[error("{0}: the device would be empty")]
    Empty(PathBuf),
    /// A system call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0}: not a regular file or a block device")]
    NotFileOrBlockDevice(PathBuf),
    /// The size is not a multiple of the block size.
    #[error("size {size} is not a multiple of the block size {block_size}")]
    Size {
        /// The size asked for.
        size: u64,
        /// The block size.
        block_size: u32,
    },
    /// The file or device is smaller than `size_bytes` and cannot be extended (read-only, or a
    /// block device).
    #[error("{path}: holds {have} bytes, {want} needed")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The size asked for.
        want: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Regular,
    Block,
}

/// A regular file or block device behind the [`BlockDevice`] interface. `Send + Sync`: one
/// instance serves every core; each core's operations go through that core's io_uring.
#[derive(Debug)]
pub struct FileDevice {
    path: PathBuf,
    fd: SharedFd,
    kind: Kind,
    info: DeviceInfo,
    read_only: bool,
    /// Direct-I/O offset alignment (1 when buffered).
    align: u64,
    /// Direct-I/O memory alignment (1 when buffered).
    mem_align: usize,
    /// Orders writes when requests can be smaller than `align`.
    rmw: Option<Arc<RangeLock>>,
    /// Deallocation unit: file-system block, or the device's logical block.
    punch_unit: u64,
    /// Whether `RWF_DSYNC` writes work (cleared on the first refusal).
    dsync: AtomicBool,
    /// errno of the first write or flush failure (fail-stop); 0 while healthy.
    failed: AtomicI32,
    /// Use synchronous syscalls instead of the ring.
    sync_io: bool,
    /// Chunks known to be allocated (regular files), so GET LBA STATUS stays cheap.
    mapped: MappedChunks,
}

fn round_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn read_error(e: &io::Error) -> BlockError {
    match errno(e) {
        libc::EIO | libc::EILSEQ | libc::EBADMSG => BlockError::Medium,
        n => BlockError::Io(n),
    }
}

impl FileDevice {
    /// Open (or create) `path` as a block device; see [`FileOptions`].
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self, OpenError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |op: &'static str| {
            let path = path.clone();
            move |source| OpenError::Io { path, op, source }
        };
        let bs = opts.block_size;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(OpenError::BlockSize(bs));
        }
        let bs64 = u64::from(bs);
        if let Some(size) = opts.size_bytes {
            if !size.is_multiple_of(bs64) {
                return Err(OpenError::Size {
                    size,
                    block_size: bs,
                });
            }
        }
        let ro = opts.read_only;
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(!ro)
            .create(!ro && opts.size_bytes.is_some());
        let file = oo.open(&path).map_err(io_err("open"))?;
        let meta = file.metadata().map_err(io_err("fstat"))?;
        let kind = if meta.file_type().is_file() {
            Kind::Regular
        } else if meta.file_type().is_block_device() {
            Kind::Block
        } else {
            return Err(OpenError::NotFileOrBlockDevice(path));
        };
        let have = match kind {
            Kind::Regular => meta.len(),
            Kind::Block => sys::blk_size_bytes(file.as_fd()).map_err(io_err("BLKGETSIZE64"))?,
        };
        let size = match opts.size_bytes {
            Some(want) if have < want && (ro || kind == Kind::Block) => {
                return Err(OpenError::TooSmall { path, have, want });
            }
            Some(want) => want,
            None => round_down(have, bs64),
        };
        if size == 0 {
            return Err(OpenError::Empty(path));
        }
        let logical = match kind {
            Kind::Block => {
                u64::from(sys::blk_logical_block(file.as_fd()).map_err(io_err("BLKSSZGET"))?)
            }
            Kind::Regular => 512,
        };
        let fs_block = match kind {
            Kind::Regular => meta.blksize().max(512),
            Kind::Block => logical,
        };

        // tmpfs accepts O_DIRECT but it bypasses nothing there; it only imposes alignment.
        let memory_fs = kind == Kind::Regular && sys::is_memory_fs(file.as_fd()).unwrap_or(false);
        let (file, align, mem_align) = match opts.direct {
            DirectMode::Off => (file, 1, 1),
            DirectMode::Auto if memory_fs => (file, 1, 1),
            mode => match open_direct(&path, &oo, kind, logical, fs_block, opts.min_dio_align) {
                Ok((f, align, mem)) => (f, align, mem),
                Err(source) if mode == DirectMode::On => {
                    return Err(OpenError::DirectUnsupported { path, source });
                }
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "O_DIRECT refused; using buffered I/O");
                    (file, 1, 1)
                }
            },
        };
        let direct = align > 1;

        // Regular files: extend sparsely to the device size, rounded up to the direct-I/O
        // alignment so an aligned read-modify-write of the last block stays inside the file.
        let mut thin = false;
        if kind == Kind::Regular && !ro {
            let phys = round_up(size, align);
            if have < phys {
                file.set_len(phys).map_err(io_err("extend"))?;
            }
            // Probe hole punching beyond the end of the data (a no-op where supported).
            let probe = sys::fallocate(
                file.as_fd(),
                (FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE).bits(),
                phys.max(have),
                fs_block,
            );
            thin = probe.is_ok();
        }
        let rmw = (align > bs64).then(|| Arc::new(RangeLock::default()));
        let punch_unit = fs_block.max(bs64);
        Ok(Self {
            path,
            fd: SharedFd::from(file),
            kind,
            info: DeviceInfo {
                size_bytes: size,
                thin,
                unmap_granularity: u32::try_from(punch_unit).unwrap_or(u32::MAX),
                direct,
            },
            read_only: ro,
            align,
            mem_align: mem_align.max(1) as usize,
            rmw,
            punch_unit,
            dsync: AtomicBool::new(true),
            failed: AtomicI32::new(0),
            mapped: MappedChunks::new(size),
            sync_io: match opts.io {
                IoPath::Auto => memory_fs,
                IoPath::Ring => false,
                IoPath::Sync => true,
            },
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the device is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::Block
    }

    /// The direct-I/O offset alignment in use, or `None` for buffered I/O.
    pub fn dio_alignment(&self) -> Option<u64> {
        (self.align > 1).then_some(self.align)
    }

    /// The descriptor I/O goes through (for callers that want the engine directly).
    pub fn fd(&self) -> &SharedFd {
        &self.fd
    }

    /// True when this device's I/O uses synchronous syscalls rather than io_uring.
    pub fn is_sync_io(&self) -> bool {
        self.sync_io
    }

    fn engine(&self) -> Uring {
        if self.sync_io {
            Uring::blocking()
        } else {
            Uring::current()
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size_bytes => Ok(()),
            _ => Err(BlockError::OutOfRange),
        }
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        match self.failed.load(Ordering::Relaxed) {
            0 => Ok(()),
            e => Err(BlockError::Write(e)),
        }
    }

    /// Record a write-side failure; `EIO` and any flush failure make the device fail-stop.
    fn write_failed(&self, e: &io::Error, fatal: bool) -> BlockError {
        let n = errno(e);
        if (fatal || n == libc::EIO)
            && self
                .failed
                .compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(path = %self.path.display(), errno = n, "write-side I/O error; device is now fail-stop");
        }
        BlockError::Write(n)
    }

    async fn lock(&self, offset: u64, end: u64, unit: u64) -> Option<Arc<RangeGuard>> {
        match &self.rmw {
            Some(l) => Some(Arc::new(
                l.lock(round_down(offset, unit), round_up(end, unit)).await,
            )),
            None => None,
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`; the part past the end of the file reads as
    /// zeroes.
    async fn read_exact(&self, buf: AlignedBuf, offset: u64) -> Result<AlignedBuf, BlockError> {
        let ring = self.engine();
        let want = buf.len();
        let (r, mut buf) = ring.read_at(&self.fd, buf, offset).await;
        let mut done = r.map_err(|e| read_error(&e))?;
        while done < want {
            let tmp = AlignedBuf::with_alignment(want - done, self.mem_align);
            let (r, tmp) = ring.read_at(&self.fd, tmp, offset + done as u64).await;
            let n = r.map_err(|e| read_error(&e))?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            buf[done..done + n].copy_from_slice(&tmp[..n]);
            done += n;
        }
        Ok(buf)
    }

    async fn read_impl(&self, offset: u64, len: usize) -> Result<Bytes, BlockError> {
        self.check(offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset + len as u64;
        let (start, stop) = (round_down(offset, self.align), round_up(end, self.align));
        let buf = AlignedBuf::for_overwrite((stop - start) as usize, self.mem_align);
        let bytes = self.read_exact(buf, start).await?.into_bytes();
        Ok(if start == offset && stop == end {
            bytes
        } else {
            bytes.slice((offset - start) as usize..(end - start) as usize)
        })
    }

    async fn write_impl(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let guard = self
            .lock(offset, offset + data.len() as u64, self.align)
            .await;
        self.write_locked(offset, data, fua, guard).await
    }

    /// Write `data` at `offset`, read-modify-writing unaligned edges. The caller holds the
    /// range lock (if this device needs one) over the aligned range.
    async fn write_locked(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        guard: Option<Arc<RangeGuard>>,
    ) -> Result<(), BlockError> {
        let a = self.align;
        let end = offset + data.len() as u64;
        if offset.is_multiple_of(a) && end.is_multiple_of(a) {
            let data = if (data.as_ptr() as usize).is_multiple_of(self.mem_align) {
                data
            } else {
                AlignedBuf::copy_from_slice(&data).into_bytes()
            };
            return self.write_all(offset, data, fua, guard).await;
        }
        let (start, stop) = (round_down(offset, a), round_up(end, a));
        let mut buf = AlignedBuf::with_alignment((stop - start) as usize, self.mem_align);
        let head = (offset != start).then_some(start);
        let tail = (end != stop && (head.is_none() || stop - a != start)).then_some(stop - a);
        let edge = |at: Option<u64>| async move {
            match at {
                Some(at) => self
                    .read_exact(AlignedBuf::with_alignment(a as usize, self.mem_align), at)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (h, t) = tokio::join!(edge(head), edge(tail));
        if let Some(h) = h? {
            buf[..a as usize].copy_from_slice(&h);
        }
        if let Some(t) = t? {
            let n = buf.len();
            buf[n - a as usize..].copy_from_slice(&t);
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(&data);
        self.write_all(start, buf.into_bytes(), fua, guard).await
    }

    /// Write all of `data` (aligned as the descriptor requires) at `offset`.
    async fn write_all(
        &self,
        mut offset: u64,
        mut data: Bytes,
        fua: bool,
        guard: Option<Arc<RangeGuard>>,
    ) -> Result<(), BlockError> {
        let ring = self.engine();
        let mut sync_after = fua && !self.dsync.load(Ordering::Relaxed);
        while !data.is_empty() {
            let flags = if fua && !sync_after {
                RwFlags::DSYNC
            } else {
                RwFlags::NONE
            };
            let len = data.len();
            let (r, b) = ring
                .write_at(
                    &self.fd,
                    BufWith {
                        buf: data,
                        keep: guard.clone(),
                    },
                    offset,
                    flags,
                )
                .await;
            data = b.buf;
            match r {
                Ok(0) => {
                    return Err(self.write_failed(&io::Error::from_raw_os_error(libc::EIO), false))
                }
                Ok(n) if n == len => break,
                Ok(n) => {
                    data = data.slice(n..);
                    offset += n as u64;
                }
                Err(e)
                    if flags == RwFlags::DSYNC
                        && matches!(errno(&e), libc::EINVAL | libc::EOPNOTSUPP) =>
                {
                    tracing::info!(path = %self.path.display(), "RWF_DSYNC refused; FUA writes use fdatasync");
                    self.dsync.store(false, Ordering::Relaxed);
                    sync_after = true;
                }
                Err(e) => return Err(self.write_failed(&e, false)),
            }
        }
        if sync_after {
            ring.fdatasync(&self.fd)
                .await
                .map_err(|e| self.write_failed(&e, true))?;
        }
        Ok(())
    }

    async fn flush_impl(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        self.engine()
            .fdatasync(&self.fd)
            .await
            .map_err(|e| self.write_failed(&e, true))
    }

    /// Write zeroes over `[offset, offset + len)` through the normal write path.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        guard: &Option<Arc<RangeGuard>>,
    ) -> Result<(), BlockError> {
        const CHUNK: u64 = 1 << 20;
        let zeroes =
            AlignedBuf::with_alignment(len.min(CHUNK) as usize, self.mem_align).into_bytes();
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(CHUNK);
            self.write_locked(at, zeroes.slice(..n as usize), false, guard.clone())
                .await?;
            at += n;
        }
        Ok(())
    }

    /// Zero a range without deallocating: `ZERO_RANGE`, else zero writes.
    async fn zero_range(
        &self,
        offset: u64,
        len: u64,
        guard: &Option<Arc<RangeGuard>>,
    ) -> Result<(), BlockError> {
        let u = self.punch_unit;
        let (zs, ze) = (round_up(offset, u), round_down(offset + len, u));
        if zs < ze {
            let mode = FallocateMode::ZERO_RANGE | FallocateMode::KEEP_SIZE;
            if self
                .engine()
                .fallocate(&self.fd, mode, zs, ze - zs)
                .await
                .is_ok()
            {
                self.write_zeroes(offset, zs - offset, guard).await?;
                return self.write_zeroes(ze, offset + len - ze, guard).await;
            }
        }
        self.write_zeroes(offset, len, guard).await
    }

    async fn unmap_impl(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let u = self.punch_unit;
        let guard = self.lock(offset, end, u.max(self.align)).await;
        if !self.info.thin && self.kind == Kind::Regular {
            return self.zero_range(offset, len, &guard).await;
        }
        let (ps, pe) = (round_up(offset, u), round_down(end, u));
        if ps >= pe {
            return self.write_zeroes(offset, len, &guard).await;
        }
        let mode = FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE;
        self.mapped.clear(ps, pe);
        match self.engine().fallocate(&self.fd, mode, ps, pe - ps).await {
            Ok(()) => {}
            // A block device that cannot deallocate-and-zero: zero it the slow way.
            Err(e)
                if self.kind == Kind::Block
                    && matches!(errno(&e), libc::EOPNOTSUPP | libc::EINVAL) =>
            {
                return self.zero_range(offset, len, &guard).await;
            }
            Err(e) => return Err(self.write_failed(&e, false)),
        }
        self.write_zeroes(offset, ps - offset, &guard).await?;
        self.write_zeroes(pe, end - pe, &guard).await
    }

    fn extents_impl(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.check(offset, len)?;
        let end = offset + len;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.kind == Kind::Block {
            return Ok(vec![Extent {
                offset,
                len,
                mapped: true,
            }]);
        }
        let fd = self.fd.as_fd();
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |offset: u64, stop: u64, mapped: bool| match out.last_mut() {
            Some(last) if last.mapped == mapped => last.len += stop - offset,
            _ => out.push(Extent {
                offset,
                len: stop - offset,
                mapped,
            }),
        };
        let mut pos = offset;
        while pos < end {
            if self.mapped.is_mapped(pos) {
                let chunk_end = ((pos >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT;
                let stop = chunk_end.min(end);
                push(pos, stop, true);
                pos = stop;
                continue;
            }
            let gen = self.mapped.generation();
            let data =
                sys::lseek(fd, pos, libc::SEEK_DATA).map_err(|e| BlockError::Io(errno(&e)))?;
            let data = data.unwrap_or(end).min(end);
            if data > pos {
                push(pos, data, false);
                pos = data;
                continue;
            }
            let hole =
                sys::lseek(fd, pos, libc::SEEK_HOLE).map_err(|e| BlockError::Io(errno(&e)))?;
            let hole = hole.unwrap_or(end).max(pos + 1);
            // Everything up to the hole is allocated, far beyond `end` too: remember it.
            self.mapped
                .learn_mapped(pos, hole.min(self.info.size_bytes), gen);
            let hole = hole.min(end);
            push(pos, hole, true);
            pos = hole;
        }
        Ok(out)
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn read(&self, offset: u64, len: usize) -> BlockFuture<'_, Bytes> {
        Box::pin(self.read_impl(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockFuture<'_> {
        Box::pin(self.write_impl(offset, data, fua))
    }

    fn flush(&self) -> BlockFuture<'_> {
        Box::pin(self.flush_impl())
    }

    fn unmap(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        Box::pin(self.unmap_impl(offset, len))
    }

    fn extents(&self, offset: u64, len: u64) -> BlockFuture<'_, Vec<Extent>> {
        Box::pin(std::future::ready(self.extents_impl(offset, len)))
    }
}

/// Open `path` with `O_DIRECT` and find its alignment; a trial read proves the file system
/// accepts it. Returns the file, the offset alignment and the memory alignment.
fn open_direct(
    path: &Path,
    oo: &OpenOptions,
    kind: Kind,
    logical: u64,
    fs_block: u64,
    min_align: Option<u32>,
) -> io::Result<(File, u64, u64)> {
    let mut oo = oo.clone();
    oo.create(false).custom_flags(libc::O_DIRECT);
    let file = oo.open(path)?;
    let (mem, mut align) = match sys::dio_align(file.as_fd())? {
        Some((mem, off)) => (u64::from(mem), u64::from(off)),
        None if kind == Kind::Block => (logical, logical),
        None => (PAGE_SIZE as u64, fs_block),
    };
    if let Some(min) = min_align {
        if !min.is_power_of_two() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        align = align.max(u64::from(min));
    }
    let align = align.max(512);
    let mut probe = AlignedBuf::with_alignment(align as usize, mem as usize);
    sys::pread(file.as_fd(), &mut probe, 0)?;
    Ok((file, align, mem))
}

/// Excludes overlapping writes on devices that read-modify-write unaligned edges. Shared by
/// every core; contention (and so a cross-core wake-up) only arises between writes that touch
/// the same aligned unit.
#[derive(Debug, Default)]
struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: tokio::sync::Notify,
}

impl RangeLock {
    async fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        loop {
            let mut notified = pin!(self.released.notified());
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        lock: self.clone(),
                        range: (start, end),
                    };
                }
            }
            notified.await;
        }
    }
}

/// A held range of a [`RangeLock`]; released on drop.
#[derive(Debug)]
struct RangeGuard {
    lock: Arc<RangeLock>,
    range: (u64, u64),
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests;
