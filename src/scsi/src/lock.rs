//! Striped LBA range locks: ordinary writes share, COMPARE AND WRITE excludes.
//!
//! The LBA space is cut into stripes of `1 << shift` blocks, hashed onto a fixed array of
//! async reader-writer locks. Writes take the stripes they touch shared, COMPARE AND WRITE
//! takes them exclusive, so a compare-and-write is atomic against every concurrent write to
//! overlapping LBAs, from any session and any core, while writes to other stripes (and all
//! reads) proceed untouched. Locks are always taken in ascending index order, so there is no
//! deadlock. A write within one stripe — almost every small random write — takes one lock
//! and allocates nothing.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of lock stripes.
const STRIPES: usize = 256;

/// The lock array of one logical unit.
#[derive(Debug)]
pub(crate) struct RangeLocks {
    stripes: Box<[RwLock<()>]>,
    shift: u32,
}

/// Held stripe locks; released on drop.
#[allow(dead_code)] // the guards are held for their Drop
pub(crate) enum Held<'a> {
    /// A zero-length range: nothing to hold.
    Nothing,
    /// One stripe, shared.
    One(RwLockReadGuard<'a, ()>),
    /// Several stripes, shared.
    Shared(Vec<RwLockReadGuard<'a, ()>>),
    /// Stripes held exclusively.
    Exclusive(Vec<RwLockWriteGuard<'a, ()>>),
}

impl RangeLocks {
    /// Locks for stripes of `1 << shift` logical blocks.
    pub(crate) fn new(shift: u32) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            shift,
        }
    }

    /// The stripe indexes `[lba, lba + blocks)` touches, ascending.
    fn indexes(&self, lba: u64, blocks: u64) -> Vec<usize> {
        let first = lba >> self.shift;
        let last = lba.saturating_add(blocks - 1) >> self.shift;
        if last - first + 1 >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut v: Vec<usize> = (first..=last)
            .map(|s| (s % STRIPES as u64) as usize)
            .collect();
        v.sort_unstable();
        v
    }

    /// Take the stripes of `[lba, lba + blocks)` shared (ordinary writes).
    pub(crate) async fn shared(&self, lba: u64, blocks: u64) -> Held<'_> {
        if blocks == 0 {
            return Held::Nothing;
        }
        let first = lba >> self.shift;
        if lba.saturating_add(blocks - 1) >> self.shift == first {
            return Held::One(self.stripes[(first % STRIPES as u64) as usize].read().await);
        }
        let mut held = Vec::new();
        for i in self.indexes(lba, blocks) {
            held.push(self.stripes[i].read().await);
        }
        Held::Shared(held)
    }

    /// Take the stripes of `[lba, lba + blocks)` exclusive (COMPARE AND WRITE).
    pub(crate) async fn exclusive(&self, lba: u64, blocks: u64) -> Held<'_> {
        if blocks == 0 {
            return Held::Nothing;
        }
        let mut held = Vec::new();
        for i in self.indexes(lba, blocks) {
            held.push(self.stripes[i].write().await);
        }
        Held::Exclusive(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_wrap_and_sort() {
        let l = RangeLocks::new(4);
        assert_eq!(l.indexes(0, 16), vec![0]);
        assert_eq!(l.indexes(15, 2), vec![0, 1]);
        let wrap = l.indexes(255 * 16, 32);
        assert_eq!(wrap, vec![0, 255]);
        assert_eq!(l.indexes(0, u64::MAX).len(), STRIPES);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn exclusive_waits_for_shared() {
        let l = RangeLocks::new(4);
        let s = l.shared(0, 1).await;
        let x = l.exclusive(0, 1);
        tokio::pin!(x);
        assert!(futures_poll_once(x.as_mut()).await.is_none());
        drop(s);
        let _held = x.await;
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
