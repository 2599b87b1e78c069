//! iSCSI (RFC 7143), target side, without I/O.
//!
//! - [`pdu`]: the BHS and a typed view of every PDU, both directions.
//! - [`framer`]: PDUs on a byte stream (lengths, padding, CRC32C digests) and the transmit
//!   queue.
//! - [`text`], [`keys`]: text key=value data and operational negotiation.
//! - [`chap`], [`login`]: authentication and the login phase.
//! - [`conn`]: the connection state machine of the full feature phase.
//! - [`seq`]: serial-number arithmetic for CmdSN, StatSN, DataSN.
//!
//! Not implemented: ErrorRecoveryLevel 1 and 2 (SNACK, connection recovery), multiple
//! connections per session, markers, bidirectional commands.

pub mod chap;
pub mod conn;
pub mod framer;
pub mod keys;
pub mod login;
pub mod pdu;
pub mod seq;
#[doc(hidden)]
pub mod testing;
pub mod text;

#[cfg(test)]
mod tests;
