//! Thin, safe wrappers over the raw Linux calls tessera needs outside io_uring: the
//! synchronous fallback (`pread`, `pwritev2`, `fdatasync`, `fallocate`), and metadata queries
//! (`statx` for the direct-I/O alignment, `lseek` SEEK_DATA/SEEK_HOLE, block-device ioctls).
//!
//! Every function retries `EINTR` and returns `io::Error` with the errno.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn retry<F: FnMut() -> libc::c_long>(mut f: F) -> io::Result<usize> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `pread(2)` into `buf`; may return fewer bytes than asked (end of file).
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let o = off(offset)?;
    // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call.
    retry(|| unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), o) as _ })
}

/// `pwritev2(2)` of one buffer with `RWF_*` flags (0 for a plain `pwrite`).
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64, flags: i32) -> io::Result<usize> {
    let o = off(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, valid for reads for the whole call; the kernel does not
    // write through it.
    retry(|| unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, o, flags) as _ })
}

/// `preadv(2)`.
///
/// # Safety
///
/// Every iovec must describe memory writable for the whole call.
pub(crate) unsafe fn preadv(
    fd: BorrowedFd<'_>,
    iov: &[libc::iovec],
    offset: u64,
) -> io::Result<usize> {
    let o = off(offset)?;
    let n = iov.len() as libc::c_int;
    // SAFETY: guaranteed by the caller.
    retry(|| unsafe { libc::preadv(fd.as_raw_fd(), iov.as_ptr(), n, o) as _ })
}

/// `pwritev2(2)`.
///
/// # Safety
///
/// Every iovec must describe memory readable for the whole call.
pub(crate) unsafe fn pwritev2(
    fd: BorrowedFd<'_>,
    iov: &[libc::iovec],
    offset: u64,
    flags: i32,
) -> io::Result<usize> {
    let o = off(offset)?;
    let n = iov.len() as libc::c_int;
    // SAFETY: guaranteed by the caller.
    retry(|| unsafe { libc::pwritev2(fd.as_raw_fd(), iov.as_ptr(), n, o, flags) as _ })
}

/// `fsync(2)` or, with `data_only`, `fdatasync(2)`.
pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a borrowed, open descriptor.
    retry(|| unsafe {
        (if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }) as _
    })
    .map(drop)
}

/// `fallocate(2)`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: plain syscall on a borrowed, open descriptor; no memory is passed.
    retry(|| unsafe { libc::fallocate(fd.as_raw_fd(), mode, o, l) as _ }).map(drop)
}

/// `lseek(2)`; with `SEEK_DATA`/`SEEK_HOLE`, `Ok(None)` stands for `ENXIO` (no data / offset
/// past the end of the file).
pub fn lseek(fd: BorrowedFd<'_>, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let o = off(offset)?;
    // SAFETY: plain syscall on a borrowed, open descriptor.
    match retry(|| unsafe { libc::lseek(fd.as_raw_fd(), o, whence) as _ }) {
        Ok(p) => Ok(Some(p as u64)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The direct-I/O alignment `statx(2)` reports as `(memory, offset)`, or `None` when the
/// kernel or file system does not say (`STATX_DIOALIGN` missing or zero).
pub fn dio_align(fd: BorrowedFd<'_>) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, with AT_EMPTY_PATH the call
    // refers to `fd`, and `stx` is a valid, writable `struct statx`.
    retry(|| unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        ) as _
    })?;
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

// Block-device ioctls (include/uapi/linux/fs.h); `_IOR(0x12, 114, size_t)` with the generic
// ioctl encoding used by x86-64, aarch64 and riscv64.
const BLKGETSIZE64: u64 = (2 << 30) | ((size_of::<u64>() as u64) << 16) | (0x12 << 8) | 114;

/// Size of a block device in bytes (`BLKGETSIZE64`).
pub fn blk_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid and writable.
    retry(|| unsafe {
        libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) as _
    })?;
    Ok(size)
}

/// Logical sector size of a block device (`BLKSSZGET`).
pub fn blk_logical_block(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid and writable.
    retry(|| unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::BLKSSZGET as _,
            &mut ssz as *mut libc::c_int,
        ) as _
    })?;
    u32::try_from(ssz).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A new non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; no memory is passed.
    let fd = retry(|| unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) as _ })?;
    // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `statfs(2)` magic numbers of file systems that live only in the page cache.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// True when `fd` lives on tmpfs or ramfs (memory only, no device behind the page cache).
pub fn is_memory_fs(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: `statfs` is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `struct statfs`.
    retry(|| unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) as _ })?;
    let magic = st.f_type as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}
