//! The block interface: what the SCSI (and later NVMe) layers ask of a backend.
//!
//! A backend is a linear array of bytes of a fixed size. Offsets and lengths are in bytes and
//! always multiples of the LUN's logical block size (the callers check ranges and alignment
//! before they call). The futures are not `Send`: tessera runs one event loop per core and a
//! command stays on the core that received it, so a backend may keep per-core state (an
//! io_uring ring, RPC connections) behind them. The device object itself is `Send + Sync` and is
//! shared by every core.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::segments::Segments;

/// A boxed, core-local future, as returned by [`BlockDevice`] methods.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What a [`BlockDevice`] operation returns: a local future of its result.
pub type BlockFuture<'a, T = ()> = LocalBoxFuture<'a, Result<T, BlockError>>;

/// Why a block operation failed. Mapped to SCSI sense data in one place
/// (`scsi::sense`), and later to NVMe status.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The backend is briefly unavailable (ownership move, node restart); retryable.
    #[error("backend temporarily unavailable: {0}")]
    Busy(&'static str),
    /// An operating-system I/O error, with its errno.
    #[error("I/O error (errno {0})")]
    Io(i32),
    /// The data could not be read back (checksum failure with no redundancy left, EIO).
    #[error("unrecovered read error")]
    Medium,
    /// The range lies (partly) outside the device.
    #[error("range outside the device")]
    OutOfRange,
    /// The device is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The operation is not supported by this backend.
    #[error("operation not supported")]
    Unsupported,
    /// A write could not be made durable.
    #[error("write error (errno {0})")]
    Write(i32),
    /// Writes are suspended: too few of the nodes that must hold a write can be reached, and
    /// they stayed so for longer than the backend waits. Not retried by initiators (an
    /// operator must bring nodes back or add some); reads may still work.
    #[error("writes suspended: {0}")]
    Suspended(&'static str),
}

/// Static facts about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes, a multiple of the logical block size.
    pub size_bytes: u64,
    /// Whether [`BlockDevice::unmap`] deallocates (thin provisioning). When false, `unmap`
    /// still zeroes the range.
    pub thin: bool,
    /// The unit the backend deallocates in, in bytes (a punch-hole granularity, e.g. 4096).
    pub unmap_granularity: u32,
    /// Whether the backend bypasses the page cache (writes are on the device once they
    /// complete, though not necessarily flushed from its cache).
    pub direct: bool,
}

/// Whether a range of the device is mapped (holds data) or deallocated (reads as zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset of the extent.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// True when the range is allocated.
    pub mapped: bool,
}

/// The one interface every backend implements.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size and capabilities.
    fn info(&self) -> DeviceInfo;

    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> BlockFuture<'_, Bytes>;

    /// Write `data` at `offset`. With `fua`, the data is durable (on stable storage) when the
    /// future resolves.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockFuture<'_>;

    /// Write `data`, held in pieces, at `offset`, as [`write`](Self::write) does. The default
    /// gathers the pieces into one buffer (a copy when there is more than one); a backend
    /// that can use the pieces as they are overrides it.
    fn write_segments(&self, offset: u64, data: Segments, fua: bool) -> BlockFuture<'_> {
        self.write(offset, data.to_bytes(), fua)
    }

    /// Make every completed write durable (SYNCHRONIZE CACHE).
    fn flush(&self) -> BlockFuture<'_>;

    /// Deallocate `len` bytes at `offset`; afterwards the range reads as zeroes.
    fn unmap(&self, offset: u64, len: u64) -> BlockFuture<'_>;

    /// Describe the allocation state starting at `offset`: one or more extents covering at
    /// most `len` bytes, in order, the first starting at `offset` (GET LBA STATUS).
    fn extents(&self, offset: u64, len: u64) -> BlockFuture<'_, Vec<Extent>>;
}

/// An in-memory device: the reference backend for tests and for `--backend mem`.
///
/// Thin: blocks are allocated on first write in `unmap_granularity`-sized pages; unmapped
/// pages read as zeroes and are reported deallocated by [`BlockDevice::extents`].
#[derive(Debug)]
pub struct MemDevice {
    size_bytes: u64,
    page: u64,
    pages: std::sync::Mutex<std::collections::BTreeMap<u64, Box<[u8]>>>,
}

impl MemDevice {
    /// A zero-filled, fully deallocated device of `size_bytes` (allocation in 4 KiB pages).
    pub fn new(size_bytes: u64) -> Self {
        Self {
            size_bytes,
            page: 4096,
            pages: Default::default(),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(BlockError::OutOfRange),
        }
    }

    fn read_now(&self, offset: u64, len: usize) -> Result<Bytes, BlockError> {
        self.check(offset, len as u64)?;
        let mut out = vec![0u8; len];
        let pages = self.pages.lock().expect("mem device lock poisoned");
        let mut pos = 0usize;
        while pos < len {
            let at = offset + pos as u64;
            let (pno, within) = (at / self.page, (at % self.page) as usize);
            let n = (self.page as usize - within).min(len - pos);
            if let Some(p) = pages.get(&pno) {
                out[pos..pos + n].copy_from_slice(&p[within..within + n]);
            }
            pos += n;
        }
        Ok(Bytes::from(out))
    }

    fn write_now(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.check(offset, data.len() as u64)?;
        let mut pages = self.pages.lock().expect("mem device lock poisoned");
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let (pno, within) = (at / self.page, (at % self.page) as usize);
            let n = (self.page as usize - within).min(data.len() - pos);
            let p = pages
                .entry(pno)
                .or_insert_with(|| vec![0u8; self.page as usize].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    fn unmap_now(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let (pno, within) = (at / self.page, at % self.page);
            let n = (self.page - within).min(end - at);
            let mut pages = self.pages.lock().expect("mem device lock poisoned");
            if within == 0 && n == self.page {
                pages.remove(&pno);
            } else if let Some(p) = pages.get_mut(&pno) {
                p[within as usize..(within + n) as usize].fill(0);
            }
            at += n;
        }
        Ok(())
    }

    fn extents_now(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.check(offset, len)?;
        let pages = self.pages.lock().expect("mem device lock poisoned");
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let pno = at / self.page;
            let n = (self.page - at % self.page).min(end - at);
            let mapped = pages.contains_key(&pno);
            match out.last_mut() {
                Some(last) if last.mapped == mapped => last.len += n,
                _ => out.push(Extent {
                    offset: at,
                    len: n,
                    mapped,
                }),
            }
            at += n;
        }
        Ok(out)
    }
}

/// A future already resolved to `r`: the in-memory device completes every call at once.
fn resolved<T: 'static>(r: T) -> LocalBoxFuture<'static, T> {
    Box::pin(std::future::ready(r))
}

impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size_bytes: self.size_bytes,
            thin: true,
            unmap_granularity: self.page as u32,
            direct: false,
        }
    }

    fn read(&self, offset: u64, len: usize) -> BlockFuture<'_, Bytes> {
        resolved(self.read_now(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BlockFuture<'_> {
        resolved(self.write_now(offset, &data))
    }

    fn flush(&self) -> BlockFuture<'_> {
        resolved(Ok(()))
    }

    fn unmap(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        resolved(self.unmap_now(offset, len))
    }

    fn extents(&self, offset: u64, len: u64) -> BlockFuture<'_, Vec<Extent>> {
        resolved(self.extents_now(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now<T>(f: LocalBoxFuture<'_, T>) -> T {
        // MemDevice futures are always ready.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = f;
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("MemDevice future was not ready"),
        }
    }

    #[test]
    fn mem_device_reads_back_writes_and_zeroes_unmapped() {
        let d = MemDevice::new(64 * 1024);
        assert_eq!(now(d.read(0, 512)).unwrap(), Bytes::from(vec![0u8; 512]));
        now(d.write(4000, Bytes::from(vec![7u8; 200]), false)).unwrap();
        let r = now(d.read(3968, 256)).unwrap();
        assert!(r[..32].iter().all(|&b| b == 0));
        assert!(r[32..232].iter().all(|&b| b == 7));
        assert!(r[232..].iter().all(|&b| b == 0));
        let ext = now(d.extents(0, 16384)).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    len: 8192,
                    mapped: true
                },
                Extent {
                    offset: 8192,
                    len: 8192,
                    mapped: false
                }
            ]
        );
        now(d.unmap(0, 8192)).unwrap();
        assert_eq!(now(d.read(3968, 256)).unwrap(), Bytes::from(vec![0u8; 256]));
        assert!(!now(d.extents(0, 8192)).unwrap()[0].mapped);
        assert_eq!(now(d.read(65536 - 512, 1024)), Err(BlockError::OutOfRange));
    }
}
