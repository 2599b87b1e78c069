//! The SCSI target: targets own logical units; a logical unit executes SCSI commands
//! (SPC-4 / SBC-3) against a [`BlockDevice`](tessera_proto::block::BlockDevice).
//!
//! - [`Target`]: LUN routing, REPORT LUNS, absent LUNs, task management side effects.
//! - [`LogicalUnit`]: command execution, unit attentions, reservations, mode parameters;
//!   see its module documentation for the processing order and transfer-length rules.
//! - [`PrStore`] / [`FilePrStore`]: where persistent reservations are kept.
//! - [`FileDevice`] ([`file`](mod@file)): the `file` backend, a regular file or a block
//!   device served as a `BlockDevice` through the io_uring engine (`tessera-uring`). The
//!   erasure-coded backend is `tessera-volume`'s `EcVolume`.
//!
//! Wire formats and pure rules live in `tessera_proto::scsi`; this crate adds state,
//! concurrency and the backends.
#![forbid(unsafe_code)]

mod api;
pub mod file;
mod info;
mod lock;
mod lu;
mod mapped;
mod media;
mod prstore;
mod reserve;
mod target;
mod ua;

pub use api::*;
pub use file::{DirectMode, FileDevice, FileOptions, IoPath, OpenError};
pub use lu::{Alua, LogicalUnit, LuConfig};
pub use prstore::{FilePrStore, PrStore};
pub use target::{RemoteLun, Target};

#[cfg(test)]
mod tests;
