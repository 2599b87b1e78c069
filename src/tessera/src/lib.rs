//! tessera: a userspace block-storage target. This crate is the `tessera` binary's library:
//! the configuration, the gateway daemon with its iSCSI connection driver, the storage node
//! daemon, and `tessera demo`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod image;
pub mod initiator;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod progress;
