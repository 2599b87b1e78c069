//! Bytes in pieces: a write command's data as it arrived, one piece per PDU, never gathered
//! into one buffer on the way in.
//!
//! The pieces are slices of the connection's receive buffer, so taking a Data-Out PDU costs no
//! copy. Whoever needs the data as one slice asks for it with [`Segments::to_bytes`], which
//! copies only when there is more than one piece; the erasure-coded backend instead cuts its
//! chunks out of the pieces with [`Segments::slice`] and copies only a chunk that straddles two
//! of them.

use std::ops::{Bound, RangeBounds};

use bytes::{BufMut, Bytes, BytesMut};

/// A byte sequence held as a list of [`Bytes`] pieces.
///
/// One piece (a write whose data came as immediate data or one Data-Out PDU: nearly every
/// small write) is held inline, without allocating; the lists are built from the second.
#[derive(Clone, Default)]
pub struct Segments {
    /// The only piece while there is at most one (`parts` is then empty).
    one: Option<Bytes>,
    /// Every piece, once there are two or more.
    parts: Vec<Bytes>,
    /// `ends[i]`: the offset just past `parts[i]`.
    ends: Vec<usize>,
}

impl Segments {
    /// No bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append `piece` (an empty piece is dropped).
    pub fn push(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        if self.parts.is_empty() {
            match self.one.take() {
                None => {
                    self.one = Some(piece);
                    return;
                }
                Some(first) => {
                    self.ends.push(first.len());
                    self.parts.push(first);
                }
            }
        }
        let end = self.len() + piece.len();
        self.parts.push(piece);
        self.ends.push(end);
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        match &self.one {
            Some(one) => one.len(),
            None => self.ends.last().copied().unwrap_or(0),
        }
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.one.is_none() && self.parts.is_empty()
    }

    /// The pieces, in order, none of them empty.
    pub fn parts(&self) -> &[Bytes] {
        match &self.one {
            Some(one) => std::slice::from_ref(one),
            None => &self.parts,
        }
    }

    /// Append every byte, in order, to `out`.
    pub fn put_into(&self, out: &mut impl BufMut) {
        for p in self.parts() {
            out.put_slice(p);
        }
    }

    /// The bytes as one buffer: the piece itself when there is one, else a copy.
    pub fn to_bytes(&self) -> Bytes {
        match self.parts() {
            [] => Bytes::new(),
            [one] => one.clone(),
            _ => {
                let mut b = BytesMut::with_capacity(self.len());
                self.put_into(&mut b);
                b.freeze()
            }
        }
    }

    /// The bytes of `range`, sharing the pieces (no copy).
    ///
    /// # Panics
    /// When the range is out of bounds or decreasing, as [`Bytes::slice`] does.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Segments {
        let len = self.len();
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.checked_add(1).expect("range start overflows"),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1).expect("range end overflows"),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => len,
        };
        assert!(
            start <= end && end <= len,
            "range {start}..{end} out of bounds for {len} bytes"
        );
        let mut out = Segments::new();
        if let Some(one) = &self.one {
            out.push(one.slice(start..end));
            return out;
        }
        // The first piece that ends after `start`.
        let mut i = self.ends.partition_point(|&e| e <= start);
        let mut at = start;
        while at < end {
            let piece_start = self.ends[i] - self.parts[i].len();
            let from = at - piece_start;
            let to = (end.min(self.ends[i])) - piece_start;
            out.push(self.parts[i].slice(from..to));
            at = piece_start + to;
            i += 1;
        }
        out
    }
}

impl From<Bytes> for Segments {
    fn from(b: Bytes) -> Self {
        let mut s = Segments::new();
        s.push(b);
        s
    }
}

impl From<Vec<u8>> for Segments {
    fn from(v: Vec<u8>) -> Self {
        Bytes::from(v).into()
    }
}

impl From<&'static [u8]> for Segments {
    fn from(v: &'static [u8]) -> Self {
        Bytes::from_static(v).into()
    }
}

impl PartialEq for Segments {
    /// Equal when the bytes are, however they are cut into pieces.
    fn eq(&self, other: &Self) -> bool {
        if self.len() != other.len() {
            return false;
        }
        let mut a = self.parts().iter().flat_map(|p| p.iter());
        let mut b = other.parts().iter().flat_map(|p| p.iter());
        loop {
            match (a.next(), b.next()) {
                (None, None) => return true,
                (x, y) if x != y => return false,
                _ => {}
            }
        }
    }
}

impl Eq for Segments {}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Segments({} bytes in {} pieces)",
            self.len(),
            self.parts().len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(lens: &[usize]) -> (Segments, Vec<u8>) {
        let mut s = Segments::new();
        let mut all = Vec::new();
        for (n, &l) in lens.iter().enumerate() {
            let p: Vec<u8> = (0..l).map(|i| (i * 7 + n * 31) as u8).collect();
            all.extend_from_slice(&p);
            s.push(Bytes::from(p));
        }
        (s, all)
    }

    #[test]
    fn empty_pieces_are_dropped() {
        let mut s = Segments::new();
        s.push(Bytes::new());
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert_eq!(s.to_bytes(), Bytes::new());
        assert_eq!(s.slice(..), Segments::new());
    }

    #[test]
    fn one_piece_is_handed_out_without_a_copy() {
        let b = Bytes::from(vec![5u8; 4096]);
        let s = Segments::from(b.clone());
        assert_eq!(s.to_bytes().as_ptr(), b.as_ptr());
        let part = s.slice(1024..2048);
        assert_eq!(part.parts().len(), 1);
        assert_eq!(part.to_bytes().as_ptr(), b[1024..].as_ptr());
    }

    #[test]
    fn slices_match_the_flat_bytes() {
        let (s, all) = pieces(&[3, 1, 4096, 7, 512, 512, 9000]);
        assert_eq!(s.len(), all.len());
        assert_eq!(&s.to_bytes()[..], &all[..]);
        let n = all.len();
        for start in [0, 1, 2, 3, 4, 5, 4099, 4100, 4101, 5000, n - 1, n] {
            for end in [start, start + 1, start + 600, start + 5000, n] {
                if end < start || end > n {
                    continue;
                }
                let got = s.slice(start..end);
                assert_eq!(got.len(), end - start, "{start}..{end}");
                assert_eq!(&got.to_bytes()[..], &all[start..end], "{start}..{end}");
                assert!(got.parts().iter().all(|p| !p.is_empty()));
            }
        }
        assert_eq!(&s.slice(4..=4).to_bytes()[..], &all[4..5]);
    }

    #[test]
    fn equality_ignores_where_the_cuts_are() {
        let (a, all) = pieces(&[10, 20, 30]);
        assert_eq!(a, Segments::from(all.clone()));
        let mut other = all.clone();
        other[25] ^= 1;
        assert_ne!(a, Segments::from(other));
        assert_ne!(a, Segments::from(all[..59].to_vec()));
    }

    #[test]
    fn pieces_added_one_by_one_keep_their_order_and_bytes() {
        let mut s = Segments::new();
        let mut all = Vec::new();
        for (n, len) in [4096usize, 1, 700, 3].into_iter().enumerate() {
            let p: Vec<u8> = (0..len).map(|i| (i + n * 50) as u8).collect();
            all.extend_from_slice(&p);
            s.push(Bytes::from(p));
            s.push(Bytes::new());
            assert_eq!(s.len(), all.len());
            assert_eq!(s.parts().len(), n + 1);
            let mut out = BytesMut::new();
            s.put_into(&mut out);
            assert_eq!(&out[..], &all[..], "after {} pieces", n + 1);
            assert_eq!(&s.to_bytes()[..], &all[..]);
            assert_eq!(&s.slice(1..).to_bytes()[..], &all[1..]);
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn a_slice_past_the_end_of_one_piece_panics() {
        let _ = Segments::from(vec![1u8; 10]).slice(5..11);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn a_slice_past_the_end_panics() {
        let (s, _) = pieces(&[10, 10]);
        let _ = s.slice(5..21);
    }
}
