//! A cache of which 1 MiB chunks of a sparse file are known to be wholly allocated.
//!
//! `lseek(SEEK_HOLE)` cannot be bounded: on a fully allocated file it walks every page up to
//! the end of the file, about 1.4 ms per call on a 1 GiB tmpfs file. Initiators that track
//! allocation (qemu's iSCSI driver, for one) send GET LBA STATUS often, so [`FileDevice`]
//! remembers what a scan proved. Writes only ever add allocation, so a chunk once seen
//! allocated stays so until an UNMAP punches it; UNMAP clears the chunk's bit *before* it
//! punches. A scan that raced with an UNMAP (the generation moved) forgets what it learned.
//!
//! [`FileDevice`]: crate::FileDevice

use std::sync::atomic::{AtomicU64, Ordering};

/// Chunk size: 1 MiB.
pub(crate) const CHUNK_SHIFT: u32 = 20;

#[derive(Debug)]
pub(crate) struct MappedChunks {
    bits: Vec<AtomicU64>,
    generation: AtomicU64,
}

impl MappedChunks {
    /// Nothing known for a device of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        let chunks = size.div_ceil(1 << CHUNK_SHIFT);
        let words = chunks.div_ceil(64) as usize;
        Self {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
        }
    }

    /// Current generation (changes with every [`clear`](Self::clear)).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the chunk holding byte `offset` is known to be wholly allocated.
    pub(crate) fn is_mapped(&self, offset: u64) -> bool {
        let c = offset >> CHUNK_SHIFT;
        self.bits
            .get((c / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
    }

    fn chunks_within(start: u64, end: u64) -> std::ops::Range<u64> {
        let first = start.div_ceil(1 << CHUNK_SHIFT);
        let last = end >> CHUNK_SHIFT;
        first..last.max(first)
    }

    fn chunks_touching(start: u64, end: u64) -> std::ops::Range<u64> {
        (start >> CHUNK_SHIFT)..end.div_ceil(1 << CHUNK_SHIFT)
    }

    fn set(&self, chunks: std::ops::Range<u64>, on: bool) {
        for c in chunks {
            let Some(w) = self.bits.get((c / 64) as usize) else {
                break;
            };
            let bit = 1u64 << (c % 64);
            if on {
                w.fetch_or(bit, Ordering::AcqRel);
            } else {
                w.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    /// A scan that began at generation `gen` found `[start, end)` allocated: remember the
    /// chunks wholly inside it, unless an UNMAP ran meanwhile.
    pub(crate) fn learn_mapped(&self, start: u64, end: u64, gen: u64) {
        let chunks = Self::chunks_within(start, end);
        self.set(chunks.clone(), true);
        if self.generation() != gen {
            self.set(chunks, false);
        }
    }

    /// `[start, end)` is about to be deallocated: forget every chunk it touches.
    pub(crate) fn clear(&self, start: u64, end: u64) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.set(Self::chunks_touching(start, end), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn learns_whole_chunks_and_forgets_on_clear() {
        let m = MappedChunks::new(10 * MIB);
        assert!(!m.is_mapped(0));
        let g = m.generation();
        m.learn_mapped(MIB / 2, 4 * MIB + 5, g);
        assert!(!m.is_mapped(0), "chunk 0 only partly seen");
        assert!(m.is_mapped(MIB) && m.is_mapped(3 * MIB + 7));
        assert!(!m.is_mapped(4 * MIB), "chunk 4 only partly seen");
        m.clear(2 * MIB + 1, 2 * MIB + 2);
        assert!(!m.is_mapped(2 * MIB) && m.is_mapped(MIB) && m.is_mapped(3 * MIB));
        assert!(!m.is_mapped(100 * MIB), "beyond the end is never mapped");
    }

    #[test]
    fn a_scan_that_raced_an_unmap_learns_nothing() {
        let m = MappedChunks::new(4 * MIB);
        let g = m.generation();
        m.clear(0, MIB);
        m.learn_mapped(0, 4 * MIB, g);
        assert!((0..4).all(|c| !m.is_mapped(c * MIB)));
    }
}
