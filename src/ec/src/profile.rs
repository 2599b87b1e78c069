//! The erasure-code profile of a volume.

use std::fmt;
use std::str::FromStr;

/// Which codec wrote a volume's parity. Fragments are readable only by the codec that wrote
/// them (codecs differ in their generator matrices), so the id is part of the volume profile
/// and of every fragment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodecId(pub u8);

impl CodecId {
    /// Reed-Solomon over GF(2^8) (polynomial 0x11d) with the systematic matrix derived from a
    /// Vandermonde matrix, as computed by the `reed-solomon-erasure` crate (with or without its
    /// SIMD kernels: the bytes are the same). The test vectors in `codec.rs` pin it.
    pub const RS_VANDERMONDE: CodecId = CodecId(1);

    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            CodecId::RS_VANDERMONDE => "rs-vandermonde",
            _ => "unknown",
        }
    }

    /// Parse a configuration name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "rs-vandermonde" | "reed-solomon-erasure" => Some(CodecId::RS_VANDERMONDE),
            _ => None,
        }
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A volume's erasure-code profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Data chunks per stripe, 1..=16.
    pub k: u8,
    /// Parity chunks per stripe, 0..=4.
    pub m: u8,
    /// Bytes per chunk: a power of two from 4 KiB to 1 MiB.
    pub chunk_size: u32,
    /// The codec.
    pub codec: CodecId,
}

/// Why a profile is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// `k` outside 1..=16.
    #[error("k must be 1 to 16 data chunks, not {0}")]
    K(u32),
    /// `m` outside 0..=4.
    #[error("m must be 0 to 4 parity chunks, not {0}")]
    M(u32),
    /// The chunk size is not a power of two in range.
    #[error("chunk size must be a power of two from 4 KiB to 1 MiB, not {0} bytes")]
    ChunkSize(u64),
    /// Not of the form `K+M`.
    #[error("expected K+M (for example 4+2), got {0:?}")]
    Syntax(String),
}

/// Smallest chunk.
pub const MIN_CHUNK: u32 = 4096;
/// Largest chunk.
pub const MAX_CHUNK: u32 = 1 << 20;
/// Largest `k`.
pub const MAX_K: u8 = 16;
/// Largest `m`.
pub const MAX_M: u8 = 4;

impl Profile {
    /// A checked profile with the default codec.
    pub fn new(k: u32, m: u32, chunk_size: u64) -> Result<Self, ProfileError> {
        if !(1..=u32::from(MAX_K)).contains(&k) {
            return Err(ProfileError::K(k));
        }
        if m > u32::from(MAX_M) {
            return Err(ProfileError::M(m));
        }
        if !chunk_size.is_power_of_two()
            || chunk_size < u64::from(MIN_CHUNK)
            || chunk_size > u64::from(MAX_CHUNK)
        {
            return Err(ProfileError::ChunkSize(chunk_size));
        }
        Ok(Self {
            k: k as u8,
            m: m as u8,
            chunk_size: chunk_size as u32,
            codec: CodecId::RS_VANDERMONDE,
        })
    }

    /// Parse `K+M` (for example `4+2`) with the given chunk size.
    pub fn parse(km: &str, chunk_size: u64) -> Result<Self, ProfileError> {
        let syntax = || ProfileError::Syntax(km.to_string());
        let (k, m) = km.trim().split_once('+').ok_or_else(syntax)?;
        let k = u32::from_str(k.trim()).map_err(|_| syntax())?;
        let m = u32::from_str(m.trim()).map_err(|_| syntax())?;
        Self::new(k, m, chunk_size)
    }

    /// Fragments per stripe, `k + m`.
    pub fn width(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }

    /// Data bytes per stripe, `k · chunk`.
    pub fn stripe_bytes(&self) -> u64 {
        u64::from(self.k) * u64::from(self.chunk_size)
    }

    /// The default write quorum: `k + 1` fragments durable before a write is acknowledged,
    /// or all of them when `m` is 0 (DESIGN.md, invariant 1).
    pub fn default_write_quorum(&self) -> usize {
        (usize::from(self.k) + 1).min(self.width())
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{} chunk {} KiB {}",
            self.k,
            self.m,
            self.chunk_size / 1024,
            self.codec
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_checked() {
        let p = Profile::parse("4+2", 16384).unwrap();
        assert_eq!((p.k, p.m, p.width(), p.stripe_bytes()), (4, 2, 6, 65536));
        assert_eq!(p.default_write_quorum(), 5);
        assert_eq!(
            Profile::parse("1+0", 4096).unwrap().default_write_quorum(),
            1
        );
        assert_eq!(Profile::parse("0+2", 4096), Err(ProfileError::K(0)));
        assert_eq!(Profile::parse("17+2", 4096), Err(ProfileError::K(17)));
        assert_eq!(Profile::parse("4+5", 4096), Err(ProfileError::M(5)));
        assert_eq!(
            Profile::parse("4+2", 6000),
            Err(ProfileError::ChunkSize(6000))
        );
        assert_eq!(
            Profile::parse("4+2", 2048),
            Err(ProfileError::ChunkSize(2048))
        );
        assert!(matches!(
            Profile::parse("4x2", 4096),
            Err(ProfileError::Syntax(_))
        ));
        assert_eq!(p.to_string(), "4+2 chunk 16 KiB rs-vandermonde");
        assert_eq!(
            CodecId::from_name("rs-vandermonde"),
            Some(CodecId::RS_VANDERMONDE)
        );
    }
}
