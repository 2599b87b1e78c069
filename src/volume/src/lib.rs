//! The erasure-coded volume behind tessera's gateways: a [`BlockDevice`] whose bytes are
//! Reed-Solomon stripes on storage nodes (`COMMIT.md` beside this crate describes the commit
//! protocol and recovery).
//!
//! The volume talks to nodes only through [`nodes::Connector`]: over TCP in the gateway
//! ([`nodes::RpcConnector`]), in-process in tests (`testing::LocalNodes`, real fragment stores
//! with faults on demand; behind the `testing` feature, so that only test builds link the
//! node's fragment store).
//!
//! [`BlockDevice`]: tessera_proto::block::BlockDevice

#![forbid(unsafe_code)]

pub mod fault;
pub mod locks;
pub mod nodes;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod volume;

pub use volume::{
    EcVolume, FillProgress, Health, NodeCondition, OpenError, ScrubStats, VolumeSpec, VolumeStats,
    BLOB_INTENT, CLEAR_AFTER, QUORUM_WAIT,
};

#[cfg(test)]
mod tests;
