//! Erasure coding for tessera, free of I/O: the volume profile (`k + m`, chunk size, codec),
//! the geometry that cuts a volume's byte range into stripes and chunks, the Reed-Solomon
//! codec behind one small interface, and the placement function that maps placement groups
//! to storage nodes.
//!
//! Terms (DESIGN.md, "Data layout"): a *stripe* is `k` data chunks and `m` parity chunks;
//! stripe `s` covers volume bytes `[s·k·chunk, (s+1)·k·chunk)`, data chunk `i` of it the bytes
//! `[s·k·chunk + i·chunk, s·k·chunk + (i+1)·chunk)`. A *fragment* is one chunk of one stripe as
//! stored on one node; its *index* is `0..k` for data and `k..k+m` for parity.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod geometry;
pub mod placement;
pub mod profile;

pub use codec::{Codec, CodecError};
pub use geometry::{ChunkPiece, Geometry, StripeSpan};
pub use profile::{CodecId, Profile, ProfileError};
