//! The SCSI target: targets own logical units; a logical unit executes SCSI commands
//! (SPC-4 / SBC-3) against a [`BlockDevice`](tessera_proto::block::BlockDevice).
//!
//! - [`Target`]: LUN routing, REPORT LUNS, absent LUNs, task management side effects.
//! - [`LogicalUnit`]: command execution, unit attentions, reservations, mode parameters;
//!   see its module documentation for the processing order and transfer-length rules.
//! - [`PrStore`] / [`FilePrStore`]: where persistent reservations are kept.
//!
//! Wire formats and pure rules live in `tessera_proto::scsi`; this crate adds state,
//! concurrency and the backend.
#![forbid(unsafe_code)]

mod api;
mod info;
mod lock;
mod lu;
mod media;
mod prstore;
mod reserve;
mod target;
mod ua;

pub use api::*;
pub use lu::{Alua, LogicalUnit, LuConfig};
pub use prstore::{FilePrStore, PrStore};
pub use target::{RemoteLun, Target};

#[cfg(test)]
mod tests;
