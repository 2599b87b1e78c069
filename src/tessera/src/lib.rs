//! tessera: a userspace block-storage target. This crate is the `tessera` binary's library:
//! the configuration files, the gateway daemon around the `tessera-gateway` library, the
//! storage node daemon, the admin and image commands, and `tessera demo`.
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
