//! Where a volume byte lives: stripe, data chunk, offset in the chunk.

use crate::profile::Profile;

/// The part of a request that falls in one stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeSpan {
    /// Stripe number.
    pub stripe: u64,
    /// First byte within the stripe's data (`0..k·chunk`).
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// Where these bytes are in the request's buffer.
    pub buf_offset: u64,
}

impl StripeSpan {
    /// Whether the span covers the stripe's whole data.
    pub fn is_full(&self, g: &Geometry) -> bool {
        self.start == 0 && self.len == g.stripe_bytes()
    }
}

/// The part of a stripe span that falls in one data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPiece {
    /// Data chunk index, `0..k`.
    pub index: usize,
    /// First byte within the chunk.
    pub start: usize,
    /// Bytes.
    pub len: usize,
    /// Where these bytes are in the request's buffer.
    pub buf_offset: usize,
}

/// The layout of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The profile.
    pub profile: Profile,
    /// Volume size in bytes.
    pub size: u64,
}

impl Geometry {
    /// The layout of a volume of `size` bytes.
    pub fn new(profile: Profile, size: u64) -> Self {
        Self { profile, size }
    }

    /// Data bytes per stripe.
    pub fn stripe_bytes(&self) -> u64 {
        self.profile.stripe_bytes()
    }

    /// Bytes per chunk.
    pub fn chunk(&self) -> usize {
        self.profile.chunk_size as usize
    }

    /// Stripes in the volume (the last may extend past its end; those bytes read as zeroes).
    pub fn stripes(&self) -> u64 {
        self.size.div_ceil(self.stripe_bytes())
    }

    /// The stripe spans of `[offset, offset + len)`, in order. The range must lie inside the
    /// volume (the block layer checks before it calls).
    pub fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = StripeSpan> {
        let sb = self.stripe_bytes();
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let stripe = at / sb;
            let start = at % sb;
            let n = (sb - start).min(end - at);
            let span = StripeSpan {
                stripe,
                start,
                len: n,
                buf_offset: at - offset,
            };
            at += n;
            Some(span)
        })
    }

    /// The data-chunk pieces of a stripe span, in order; `buf_offset` is relative to the
    /// span's own bytes.
    pub fn pieces(&self, span: &StripeSpan) -> impl Iterator<Item = ChunkPiece> {
        let chunk = self.profile.chunk_size as u64;
        let end = span.start + span.len;
        let mut at = span.start;
        let base = span.start;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let index = (at / chunk) as usize;
            let start = at % chunk;
            let n = (chunk - start).min(end - at);
            let p = ChunkPiece {
                index,
                start: start as usize,
                len: n as usize,
                buf_offset: (at - base) as usize,
            };
            at += n;
            Some(p)
        })
    }

    /// Volume byte offset of data chunk `index` of `stripe`.
    pub fn chunk_offset(&self, stripe: u64, index: usize) -> u64 {
        stripe * self.stripe_bytes() + index as u64 * self.profile.chunk_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g() -> Geometry {
        Geometry::new(Profile::parse("4+2", 4096).unwrap(), 10 * 16384 + 8192)
    }

    #[test]
    fn spans_and_pieces() {
        let g = g();
        assert_eq!(g.stripes(), 11);
        let s: Vec<_> = g.spans(16384 - 512, 1024).collect();
        assert_eq!(
            s,
            vec![
                StripeSpan {
                    stripe: 0,
                    start: 16384 - 512,
                    len: 512,
                    buf_offset: 0
                },
                StripeSpan {
                    stripe: 1,
                    start: 0,
                    len: 512,
                    buf_offset: 512
                }
            ]
        );
        let p: Vec<_> = g.pieces(&s[0]).collect();
        assert_eq!(
            p,
            vec![ChunkPiece {
                index: 3,
                start: 3584,
                len: 512,
                buf_offset: 0
            }]
        );
        let full = g.spans(16384, 16384).next().unwrap();
        assert!(full.is_full(&g));
        assert_eq!(g.pieces(&full).count(), 4);
        assert_eq!(g.chunk_offset(2, 3), 2 * 16384 + 3 * 4096);
    }

    proptest! {
        #[test]
        fn spans_tile_the_range(off in 0u64..170_000, len in 1u64..100_000) {
            let g = g();
            let len = len.min(g.size.saturating_sub(off));
            prop_assume!(len > 0);
            let mut next = off;
            let mut buf = 0;
            for s in g.spans(off, len) {
                prop_assert_eq!(s.stripe * g.stripe_bytes() + s.start, next);
                prop_assert_eq!(s.buf_offset, buf);
                let mut inner = 0usize;
                for p in g.pieces(&s) {
                    prop_assert_eq!(
                        g.chunk_offset(s.stripe, p.index) + p.start as u64,
                        next + inner as u64
                    );
                    prop_assert_eq!(p.buf_offset, inner);
                    prop_assert!(p.start + p.len <= g.chunk());
                    inner += p.len;
                }
                prop_assert_eq!(inner as u64, s.len);
                next += s.len;
                buf += s.len;
            }
            prop_assert_eq!(next, off + len);
        }
    }
}
