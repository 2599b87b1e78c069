//! Local storage on the io_uring engine (`tessera-uring`): the `file` block backend
//! ([`file::FileDevice`]) that serves a regular file or a block device as a
//! [`tessera_proto::block::BlockDevice`], and the storage node's fragment store
//! ([`fragment::FragmentStore`], on-disk format in `FORMAT.md`).
//!
//! No `unsafe` code here: it all lives in `tessera-uring`.

#![forbid(unsafe_code)]

pub mod file;
pub mod fragment;
mod mapped;

pub use file::{DirectMode, FileDevice, FileOptions, IoPath, OpenError};
