//! The Reed-Solomon codec behind one small interface.
//!
//! Reed-Solomon is linear and byte-wise: parity byte `b` of every parity chunk depends only on
//! byte `b` of the data chunks. So any byte range of a stripe can be coded alone (a 4 KiB
//! piece of a 16 KiB chunk together with the same 4 KiB of the parity chunks), and a change to
//! one data chunk changes parity by the change's own encoding ([`Codec::apply_delta`]).

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::profile::{CodecId, Profile};

/// Why coding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer than `k` fragments are available.
    #[error("too few fragments to reconstruct: {have} of the {need} needed")]
    TooFew {
        /// Fragments present.
        have: usize,
        /// `k`.
        need: usize,
    },
    /// Buffers of different lengths, or the wrong number of them.
    #[error("fragment buffers do not match the profile")]
    Shape,
    /// The profile names a codec this build does not have.
    #[error("codec {0} is not available")]
    Unknown(CodecId),
}

/// An encoder/decoder for one profile. Cheap to share (`Send + Sync`).
pub struct Codec {
    k: usize,
    m: usize,
    rs: Option<ReedSolomon>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec({}+{})", self.k, self.m)
    }
}

impl Codec {
    /// The codec of `profile`.
    pub fn new(profile: &Profile) -> Result<Self, CodecError> {
        if profile.codec != CodecId::RS_VANDERMONDE {
            return Err(CodecError::Unknown(profile.codec));
        }
        let (k, m) = (usize::from(profile.k), usize::from(profile.m));
        let rs = if m == 0 {
            None
        } else {
            Some(ReedSolomon::new(k, m).map_err(|_| CodecError::Shape)?)
        };
        Ok(Self { k, m, rs })
    }

    /// Data fragments per stripe.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Parity fragments per stripe.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Compute `parity` (`m` buffers) from `data` (`k` buffers), all of one length.
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), CodecError> {
        if data.len() != self.k || parity.len() != self.m {
            return Err(CodecError::Shape);
        }
        let len = data.first().map_or(0, |d| d.len());
        if data.iter().any(|d| d.len() != len) || parity.iter().any(|p| p.len() != len) {
            return Err(CodecError::Shape);
        }
        match &self.rs {
            None => Ok(()),
            Some(rs) => rs.encode_sep(data, parity).map_err(|_| CodecError::Shape),
        }
    }

    /// Update `parity` for data chunk `index` changing from `old` to `new` (same range of
    /// every buffer): `parity ^= encode(old ^ new at index)`.
    pub fn apply_delta(
        &self,
        index: usize,
        old: &[u8],
        new: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), CodecError> {
        if index >= self.k || parity.len() != self.m || old.len() != new.len() {
            return Err(CodecError::Shape);
        }
        if parity.iter().any(|p| p.len() != old.len()) {
            return Err(CodecError::Shape);
        }
        let Some(rs) = &self.rs else { return Ok(()) };
        let delta: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
        // encode_single_sep overwrites the outputs for index 0 and adds to them otherwise; start
        // from zeroes so both give the delta's own contribution.
        let mut contrib: Vec<Vec<u8>> = vec![vec![0u8; delta.len()]; self.m];
        rs.encode_single_sep(index, &delta, &mut contrib)
            .map_err(|_| CodecError::Shape)?;
        for (p, c) in parity.iter_mut().zip(&contrib) {
            for (x, y) in p.iter_mut().zip(c) {
                *x ^= y;
            }
        }
        Ok(())
    }

    /// Fill in the missing fragments. `shards` holds `k + m` buffers of one length, in index
    /// order; `present[i]` says whether buffer `i` holds fragment `i` (the others are
    /// overwritten). With `data_only`, only missing data fragments are rebuilt.
    pub fn reconstruct(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
        data_only: bool,
    ) -> Result<(), CodecError> {
        let w = self.k + self.m;
        if shards.len() != w || present.len() != w {
            return Err(CodecError::Shape);
        }
        let have = present.iter().filter(|p| **p).count();
        if have < self.k {
            return Err(CodecError::TooFew { have, need: self.k });
        }
        if have == w {
            return Ok(());
        }
        let Some(rs) = &self.rs else {
            // m == 0 and all present was handled above; k present of k means complete.
            return Err(CodecError::TooFew { have, need: self.k });
        };
        let mut pairs: Vec<(&mut [u8], bool)> = shards
            .iter_mut()
            .zip(present)
            .map(|(s, p)| (&mut **s, *p))
            .collect();
        let r = if data_only {
            rs.reconstruct_data(&mut pairs)
        } else {
            rs.reconstruct(&mut pairs)
        };
        r.map_err(|e| match e {
            reed_solomon_erasure::Error::TooFewShardsPresent => {
                CodecError::TooFew { have, need: self.k }
            }
            _ => CodecError::Shape,
        })
    }

    /// Whether the parity fragments match the data (`k + m` buffers in index order).
    pub fn verify(&self, shards: &[&[u8]]) -> Result<bool, CodecError> {
        if shards.len() != self.k + self.m {
            return Err(CodecError::Shape);
        }
        match &self.rs {
            None => Ok(true),
            Some(rs) => rs.verify(shards).map_err(|_| CodecError::Shape),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An independent implementation of the code's mathematics, to pin the bytes the crate
    /// produces (fragments on disk must stay readable across crate upgrades).
    mod reference {
        pub struct Gf {
            exp: [u8; 512],
            log: [u8; 256],
        }

        impl Gf {
            pub fn new() -> Self {
                let mut exp = [0u8; 512];
                let mut log = [0u8; 256];
                let mut x: u16 = 1;
                for (i, e) in exp.iter_mut().enumerate().take(255) {
                    *e = x as u8;
                    log[x as usize] = i as u8;
                    x <<= 1;
                    if x & 0x100 != 0 {
                        x ^= 0x11d;
                    }
                }
                for i in 255..512 {
                    exp[i] = exp[i - 255];
                }
                Self { exp, log }
            }
            pub fn mul(&self, a: u8, b: u8) -> u8 {
                if a == 0 || b == 0 {
                    0
                } else {
                    self.exp[self.log[a as usize] as usize + self.log[b as usize] as usize]
                }
            }
            pub fn inv(&self, a: u8) -> u8 {
                self.exp[255 - self.log[a as usize] as usize]
            }
            pub fn pow(&self, a: u8, n: usize) -> u8 {
                let mut r = 1u8;
                for _ in 0..n {
                    r = self.mul(r, a);
                }
                r
            }
        }

        /// Rows `k..k+m` of `V · inv(V[0..k])`, `V[r][c] = r^c`.
        pub fn parity_rows(k: usize, m: usize) -> Vec<Vec<u8>> {
            let gf = Gf::new();
            let v: Vec<Vec<u8>> = (0..k + m)
                .map(|r| (0..k).map(|c| gf.pow(r as u8, c)).collect())
                .collect();
            // Invert the top k×k by Gauss-Jordan.
            let mut a: Vec<Vec<u8>> = v[..k].to_vec();
            let mut inv: Vec<Vec<u8>> = (0..k)
                .map(|r| (0..k).map(|c| u8::from(r == c)).collect())
                .collect();
            for col in 0..k {
                let piv = (col..k).find(|&r| a[r][col] != 0).expect("invertible");
                a.swap(col, piv);
                inv.swap(col, piv);
                let f = gf.inv(a[col][col]);
                for c in 0..k {
                    a[col][c] = gf.mul(a[col][c], f);
                    inv[col][c] = gf.mul(inv[col][c], f);
                }
                for r in 0..k {
                    if r != col && a[r][col] != 0 {
                        let f = a[r][col];
                        for c in 0..k {
                            a[r][c] ^= gf.mul(f, a[col][c]);
                            inv[r][c] ^= gf.mul(f, inv[col][c]);
                        }
                    }
                }
            }
            (k..k + m)
                .map(|r| {
                    (0..k)
                        .map(|c| (0..k).fold(0u8, |acc, j| acc ^ gf.mul(v[r][j], inv[j][c])))
                        .collect()
                })
                .collect()
        }

        pub fn encode(k: usize, m: usize, data: &[Vec<u8>]) -> Vec<Vec<u8>> {
            let gf = Gf::new();
            let rows = parity_rows(k, m);
            rows.iter()
                .map(|row| {
                    (0..data[0].len())
                        .map(|b| (0..k).fold(0u8, |acc, j| acc ^ gf.mul(row[j], data[j][b])))
                        .collect()
                })
                .collect()
        }
    }

    fn codec(k: u32, m: u32) -> Codec {
        Codec::new(&Profile::new(k, m, 4096).unwrap()).unwrap()
    }

    fn data(k: usize, len: usize, seed: u8) -> Vec<Vec<u8>> {
        (0..k)
            .map(|i| {
                (0..len)
                    .map(|b| (i as u8).wrapping_mul(31) ^ (b as u8).wrapping_mul(7) ^ seed)
                    .collect()
            })
            .collect()
    }

    fn encode(c: &Codec, d: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut parity = vec![vec![0u8; d[0].len()]; c.m()];
        let dr: Vec<&[u8]> = d.iter().map(|x| &x[..]).collect();
        let mut pr: Vec<&mut [u8]> = parity.iter_mut().map(|x| &mut x[..]).collect();
        c.encode(&dr, &mut pr).unwrap();
        parity
    }

    /// Test vectors: the parity bytes of a fixed input, for the profiles most used.
    #[test]
    fn test_vectors() {
        let d = data(4, 8, 0);
        let p = encode(&codec(4, 2), &d);
        assert_eq!(
            p,
            reference::encode(4, 2, &d),
            "4+2 differs from the reference"
        );
        // Pinned bytes (computed once by the reference implementation above).
        assert_eq!(p[0], vec![2, 5, 12, 23, 30, 33, 40, 51]);
        assert_eq!(p[1], vec![8, 15, 6, 29, 20, 43, 34, 57]);
        for (k, m) in [(1, 1), (2, 1), (3, 2), (6, 3), (8, 4), (16, 4), (10, 4)] {
            let d = data(k, 64, k as u8);
            assert_eq!(
                encode(&codec(k as u32, m as u32), &d),
                reference::encode(k, m, &d),
                "{k}+{m} differs from the reference"
            );
        }
    }

    /// The volume encodes into reused buffers that still hold old bytes: encoding must
    /// overwrite every parity byte, not add to what is there.
    #[test]
    fn encode_overwrites_what_the_parity_buffers_held() {
        for (k, m) in [(1, 1), (4, 2), (8, 4)] {
            let c = codec(k as u32, m as u32);
            let d = data(k, 4096, 9);
            let mut parity = vec![vec![0xa5u8; 4096]; m];
            let dr: Vec<&[u8]> = d.iter().map(|x| &x[..]).collect();
            let mut pr: Vec<&mut [u8]> = parity.iter_mut().map(|x| &mut x[..]).collect();
            c.encode(&dr, &mut pr).unwrap();
            assert_eq!(parity, reference::encode(k, m, &d), "{k}+{m}");
        }
    }

    #[test]
    fn m_zero_is_plain_striping() {
        let c = codec(3, 0);
        let d = data(3, 16, 1);
        assert!(encode(&c, &d).is_empty());
        let mut bufs = d;
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|x| &mut x[..]).collect();
        c.reconstruct(&mut refs, &[true, true, true], false)
            .unwrap();
        assert_eq!(
            c.reconstruct(&mut refs, &[true, false, true], false),
            Err(CodecError::TooFew { have: 2, need: 3 })
        );
    }

    #[test]
    fn shape_errors() {
        let c = codec(4, 2);
        let d = data(3, 16, 0);
        let dr: Vec<&[u8]> = d.iter().map(|x| &x[..]).collect();
        let mut p = [vec![0u8; 16], vec![0u8; 16]];
        let mut pr: Vec<&mut [u8]> = p.iter_mut().map(|x| &mut x[..]).collect();
        assert_eq!(c.encode(&dr, &mut pr), Err(CodecError::Shape));
        assert_eq!(
            c.apply_delta(4, &[0; 16], &[0; 16], &mut pr),
            Err(CodecError::Shape)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any k of k + m fragments give back the rest.
        #[test]
        fn any_k_reconstruct(k in 1u32..=8, m in 1u32..=4, seed in any::<u8>(), lost in any::<u64>()) {
            let c = codec(k, m);
            let (k, m) = (k as usize, m as usize);
            let d = data(k, 256, seed);
            let p = encode(&c, &d);
            let whole: Vec<Vec<u8>> = d.iter().chain(&p).cloned().collect();
            // Lose up to m fragments, chosen by the bits of `lost`.
            let mut present = vec![true; k + m];
            let mut gone = 0;
            for (i, pr) in present.iter_mut().enumerate() {
                if gone < m && (lost >> i) & 1 == 1 {
                    *pr = false;
                    gone += 1;
                }
            }
            let mut bufs: Vec<Vec<u8>> = whole
                .iter()
                .zip(&present)
                .map(|(b, p)| if *p { b.clone() } else { vec![0xee; 256] })
                .collect();
            let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|x| &mut x[..]).collect();
            c.reconstruct(&mut refs, &present, false).unwrap();
            prop_assert_eq!(&bufs, &whole);
            let views: Vec<&[u8]> = bufs.iter().map(|x| &x[..]).collect();
            prop_assert!(c.verify(&views).unwrap());
        }

        /// Updating parity by a delta equals re-encoding, for every data index and sub-range.
        #[test]
        fn delta_equals_reencode(index in 0usize..6, from in 0usize..200, n in 1usize..56, seed in any::<u8>()) {
            let c = codec(6, 3);
            let mut d = data(6, 256, seed);
            let mut p = encode(&c, &d);
            let old = d[index][from..from + n].to_vec();
            let new: Vec<u8> = old.iter().map(|b| b.wrapping_mul(3).wrapping_add(seed)).collect();
            d[index][from..from + n].copy_from_slice(&new);
            let mut pr: Vec<&mut [u8]> = p.iter_mut().map(|x| &mut x[from..from + n]).collect();
            c.apply_delta(index, &old, &new, &mut pr).unwrap();
            prop_assert_eq!(p, encode(&c, &d));
        }
    }
}
