//! Owned I/O buffers whose memory stays put while the kernel uses it.
//!
//! [`AlignedBuf`] is a heap buffer aligned to a page (or any power of two), as `O_DIRECT`
//! wants; it turns into [`Bytes`] without a copy ([`AlignedBuf::into_bytes`]).
//!
//! [`IoBuf`] / [`IoBufMut`] are the contract the io_uring engine needs from a buffer: a pointer
//! that does not move when the owning value is moved, valid for as long as the value lives. The
//! engine takes buffers *by value* and keeps them until the kernel reports completion, so a
//! dropped future never frees memory the kernel may still read or write (see
//! [`crate`]). [`BufWith`] attaches any other value (a range-lock guard, for example) to
//! a buffer so that it, too, lives until completion.
//!
//! This module, the engine and [`crate::sys`] are the only places in the project with `unsafe`
//! code.

use std::alloc::Layout;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use bytes::Bytes;

/// The default alignment of an [`AlignedBuf`]: one page, enough for `O_DIRECT` everywhere.
pub const PAGE_SIZE: usize = 4096;

/// A buffer the kernel may read from until the I/O completes.
///
/// # Safety
///
/// Implementors guarantee that [`stable_ptr`](IoBuf::stable_ptr) points to
/// [`bytes_init`](IoBuf::bytes_init) initialized bytes, and that the pointer and the memory behind
/// it stay valid and unchanged in place while the value lives, even when the value itself is
/// moved (the memory is on the heap or static, never inline).
pub unsafe trait IoBuf: 'static {
    /// Pointer to the first byte.
    fn stable_ptr(&self) -> *const u8;
    /// Number of bytes to write from [`stable_ptr`](IoBuf::stable_ptr).
    fn bytes_init(&self) -> usize;
}

/// A buffer the kernel may write into until the I/O completes. Reads fill
/// `[0, bytes_init())`; the memory is always initialized, so no `set_len` is needed afterwards.
///
/// # Safety
///
/// As for [`IoBuf`], and the `bytes_init()` bytes at
/// [`stable_mut_ptr`](IoBufMut::stable_mut_ptr) are writable and not aliased by anyone else
/// while the value lives.
pub unsafe trait IoBufMut: IoBuf {
    /// Mutable pointer to the first byte.
    fn stable_mut_ptr(&mut self) -> *mut u8;
}

/// A zero-initialized heap buffer with a chosen power-of-two alignment (a page by default).
///
/// It has a fixed capacity (a multiple of the alignment) and a length `<= capacity`; I/O uses
/// the first `len()` bytes. The whole capacity is initialized, so shrinking or growing the
/// length within the capacity is safe.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); no interior mutability or
// thread-bound state, so moving it to or sharing `&AlignedBuf` with another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only permits reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, page-aligned.
    pub fn new(len: usize) -> Self {
        Self::with_alignment(len, PAGE_SIZE)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two; values below the page
    /// size are raised to it, so the buffer is always at least page-aligned).
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two or the size overflows `isize`.
    pub fn with_alignment(len: usize, align: usize) -> Self {
        let layout = Self::layout_for(len, align);
        // SAFETY: `layout` has a non-zero size (cap >= align >= 4096).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, layout }
    }

    /// A buffer of `len` bytes aligned to `align`, for data that is about to be overwritten
    /// (a read's destination): its contents are unspecified (but initialized). It comes from a
    /// per-thread pool of recently freed buffers of the same layout when one is there, which
    /// spares the allocator's page faults and the zeroing on every large read.
    pub fn for_overwrite(len: usize, align: usize) -> Self {
        let layout = Self::layout_for(len, align);
        if let Some(ptr) = pool::take(layout) {
            return Self { ptr, len, layout };
        }
        Self::with_alignment(len, align)
    }

    fn layout_for(len: usize, align: usize) -> Layout {
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let align = align.max(PAGE_SIZE);
        let cap = len
            .max(1)
            .div_ceil(align)
            .checked_mul(align)
            .expect("buffer size overflow");
        Layout::from_size_align(cap, align).expect("buffer layout")
    }

    /// A page-aligned copy of `data`.
    pub fn copy_from_slice(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length in bytes (what I/O reads or writes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated size in bytes, a multiple of [`alignment`](Self::alignment).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The alignment of the first byte.
    pub fn alignment(&self) -> usize {
        self.layout.align()
    }

    /// Set the length.
    ///
    /// # Panics
    ///
    /// If `len > capacity()`.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "len {len} exceeds capacity {}",
            self.capacity()
        );
        self.len = len;
    }

    /// The first `len()` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity() >= len` initialized (zeroed at allocation)
        // bytes and lives as long as `self`; `&self` excludes concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The first `len()` bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Turn the buffer into [`Bytes`] without copying; the allocation is freed when the last
    /// `Bytes` referring to it is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if pool::give(self.layout, self.ptr) {
            return;
        }
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Per-thread free lists of buffers, by layout. A buffer in the pool is owned by nobody else;
/// its memory stays initialized (it was zeroed when allocated and only ever written since).
mod pool {
    use std::alloc::Layout;
    use std::cell::RefCell;
    use std::ptr::NonNull;

    /// At most this many bytes wait in one thread's pool.
    const MAX_BYTES: usize = 64 << 20;
    /// Buffers larger than this are not pooled.
    const MAX_BUF: usize = 16 << 20;

    struct Pool {
        free: Vec<(Layout, NonNull<u8>)>,
        bytes: usize,
    }

    impl Drop for Pool {
        fn drop(&mut self) {
            for (layout, ptr) in self.free.drain(..) {
                // SAFETY: every pooled pointer came from `alloc_zeroed(layout)` and is owned
                // by the pool alone.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
            }
        }
    }

    thread_local! {
        static POOL: RefCell<Pool> = const { RefCell::new(Pool { free: Vec::new(), bytes: 0 }) };
    }

    pub(super) fn take(layout: Layout) -> Option<NonNull<u8>> {
        POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            let i = p.free.iter().rposition(|(l, _)| *l == layout)?;
            let (_, ptr) = p.free.swap_remove(i);
            p.bytes -= layout.size();
            Some(ptr)
        })
        .ok()
        .flatten()
    }

    /// Keep a freed buffer for reuse; false if the pool is full (or the thread is exiting).
    pub(super) fn give(layout: Layout, ptr: NonNull<u8>) -> bool {
        if layout.size() > MAX_BUF {
            return false;
        }
        POOL.try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return false;
            };
            if p.bytes + layout.size() > MAX_BYTES {
                return false;
            }
            p.bytes += layout.size();
            p.free.push((layout, ptr));
            true
        })
        .unwrap_or(false)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("alignment", &self.alignment())
            .finish()
    }
}

// SAFETY: the heap allocation never moves while the AlignedBuf lives and holds `len`
// initialized bytes.
unsafe impl IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
}

// SAFETY: the buffer is uniquely owned, so `&mut self` gives exclusive, writable access to the
// `len` initialized bytes.
unsafe impl IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

// SAFETY: a `Bytes` refers to heap or static memory that is immutable and kept alive by the
// `Bytes` value (or a clone); moving the handle does not move the data.
unsafe impl IoBuf for Bytes {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: a Vec's heap buffer does not move when the Vec is moved; `len` bytes are initialized.
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: the Vec is uniquely owned; its `len` initialized bytes are writable through `&mut`.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
}

/// A buffer together with a value that must stay alive as long as the kernel may use the
/// buffer (for example a lock guard that orders this write against others). The engine drops
/// both together, after the completion arrives.
#[derive(Debug)]
pub struct BufWith<B, K> {
    /// The buffer the I/O uses.
    pub buf: B,
    /// The value kept alive with it.
    pub keep: K,
}

// SAFETY: delegates to `B`, whose guarantees do not depend on `keep`.
unsafe impl<B: IoBuf, K: 'static> IoBuf for BufWith<B, K> {
    fn stable_ptr(&self) -> *const u8 {
        self.buf.stable_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.buf.bytes_init()
    }
}

// SAFETY: delegates to `B`.
unsafe impl<B: IoBufMut, K: 'static> IoBufMut for BufWith<B, K> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf.stable_mut_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_buffers_are_reused_by_for_overwrite_but_never_by_new() {
        let mut a = AlignedBuf::for_overwrite(1 << 20, PAGE_SIZE);
        a.as_mut_slice().fill(0xab);
        let ptr = a.as_slice().as_ptr();
        drop(a.into_bytes());
        let b = AlignedBuf::for_overwrite(1 << 20, PAGE_SIZE);
        assert_eq!(
            b.as_slice().as_ptr(),
            ptr,
            "same layout: taken from the pool"
        );
        assert_eq!(b.len(), 1 << 20);
        drop(b);
        // `new` promises zeroes, so it never hands out a pooled buffer.
        let c = AlignedBuf::new(1 << 20);
        assert!(c.as_slice().iter().all(|&x| x == 0));
        // Another layout is not served from the pool either.
        let d = AlignedBuf::for_overwrite(4096, 8192);
        assert_eq!(d.alignment(), 8192);
        assert_eq!(d.as_slice().as_ptr() as usize % 8192, 0);
    }

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_converts_without_copy() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[4999] = 9;
        let p = b.as_ptr();
        let bytes = b.into_bytes();
        assert_eq!(bytes.as_ptr(), p);
        assert_eq!(bytes[4999], 9);
        let tail = bytes.slice(4096..);
        drop(bytes);
        assert_eq!(tail.len(), 904);
        assert_eq!(tail[903], 9);

        let big = AlignedBuf::with_alignment(10, 1 << 16);
        assert_eq!(big.as_ptr() as usize % (1 << 16), 0);
        let empty = AlignedBuf::new(0);
        assert!(empty.is_empty());
        assert_eq!(empty.capacity(), PAGE_SIZE);
    }

    #[test]
    fn set_len_within_capacity() {
        let mut b = AlignedBuf::copy_from_slice(&[1, 2, 3]);
        b.set_len(4096);
        assert_eq!(&b[..4], &[1, 2, 3, 0]);
        b.set_len(2);
        assert_eq!(b.as_slice(), &[1, 2]);
    }
}
