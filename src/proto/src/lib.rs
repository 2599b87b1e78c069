//! tessera's protocol cores, free of I/O.
//!
//! Everything in this crate takes bytes in and gives events and bytes out; time is passed in
//! by the caller. Nothing here opens a socket, reads a clock, spawns a task or touches a file,
//! so every state machine is unit-testable and fuzzable on its own.
//!
//! - [`iscsi`]: RFC 7143 PDUs, the framer, text-key negotiation, CHAP, login and the
//!   full-feature-phase connection state machine.
//! - [`scsi`]: SPC-4 / SBC-3 command parsing, sense data, INQUIRY/VPD, mode pages,
//!   persistent-reservation rules.
//! - [`block`]: the one block interface every transport speaks and every backend implements.
//! - [`segments`]: write data as it arrived, in pieces, without gathering it into one buffer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod block;
#[doc(hidden)]
pub mod fuzzing;
pub mod iscsi;
pub mod scsi;
pub mod segments;
