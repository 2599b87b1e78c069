//! The store the cluster's state lives in, as the little of etcd that [`Cluster`](crate::Cluster)
//! uses: keys with revisions and leases, guarded transactions, an election and a watch.
//! [`Etcd`](crate::etcd::Etcd) is the real one; [`Memory`](crate::memory::Memory) keeps it in
//! the process, for unit tests of everything above (the gateway's cluster agent among them),
//! with a switch that makes it unreachable.
//!
//! Keys are full keys (the cluster's prefix included); values are bytes.

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::{ClusterError, Result};

/// A key with its value, the revision that last changed it and the lease it lives under (0:
/// none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The store's revision when the key was last written.
    pub mod_revision: i64,
    /// The lease the key lives under (0: none).
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmp {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Present(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, i64),
    /// The key exists under this lease.
    Lease(String, i64),
}

/// An operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a key (under a lease, when given).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease it lives under.
        lease: Option<i64>,
    },
    /// Delete a key.
    Delete(String),
    /// Delete every key starting with this prefix.
    DeletePrefix(String),
    /// Read a key (its result in [`TxnResult::got`]).
    Get(String),
}

impl Op {
    /// Write `key` with no lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    /// Write `key` under `lease`.
    pub fn put_leased(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }
}

/// A transaction: if every condition of `when` holds, `then` runs, otherwise `otherwise`,
/// atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// The conditions.
    pub when: Vec<Cmp>,
    /// What runs when they all hold.
    pub then: Vec<Op>,
    /// What runs otherwise.
    pub otherwise: Vec<Op>,
}

impl Txn {
    /// `then` if every condition of `when` holds, otherwise nothing.
    pub fn new(when: Vec<Cmp>, then: Vec<Op>) -> Self {
        Self {
            when,
            then,
            otherwise: Vec::new(),
        }
    }

    /// Run `ops` when a condition fails.
    pub fn or_else(mut self, ops: Vec<Op>) -> Self {
        self.otherwise = ops;
        self
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResult {
    /// Every condition held (the `then` operations ran; otherwise the `otherwise` ones).
    pub succeeded: bool,
    /// The results of the [`Op::Get`]s that ran, in order.
    pub got: Vec<Option<Kv>>,
}

/// Changes under a watched prefix.
pub trait Changes: Send {
    /// Wait for the next change (`Err`: the watch ended; watch again or poll).
    fn changed(&mut self) -> BoxFuture<'_, Result<()>>;
}

/// The cluster's store: etcd's semantics, the operations [`Cluster`](crate::Cluster) needs.
///
/// Every call may fail with [`ClusterError::Etcd`] or [`ClusterError::Unreachable`] (the store
/// cannot be reached); none waits without bound except [`Meta::campaign`] (until elected) and
/// [`Meta::keep_alive`] (until the lease is lost).
pub trait Meta: Send + Sync {
    /// The key, if it exists.
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Kv>>>;
    /// Every key starting with `prefix`, in key order.
    fn get_prefix(&self, prefix: String) -> BoxFuture<'_, Result<Vec<Kv>>>;
    /// Write a key (under `lease`, when given).
    fn put(&self, key: String, value: Vec<u8>, lease: Option<i64>) -> BoxFuture<'_, Result<()>>;
    /// Delete a key (or, with `prefix`, every key starting with it).
    fn delete(&self, key: String, prefix: bool) -> BoxFuture<'_, Result<()>>;
    /// Run a transaction.
    fn txn(&self, t: Txn) -> BoxFuture<'_, Result<TxnResult>>;
    /// Grant a lease of `ttl` seconds; its keys go when it expires or is revoked.
    fn grant(&self, ttl: i64) -> BoxFuture<'_, Result<i64>>;
    /// Revoke a lease (its keys go at once).
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<()>>;
    /// Keep `lease` (of `ttl` seconds) alive, renewing it every fifth of the TTL (at most
    /// every 2 s), until it is lost: the store says it expired, or no renewal was confirmed
    /// for a whole TTL. Calls `renewed(sent)` after every confirmed renewal with the instant
    /// its request was sent (the lease runs at least `ttl` from then). Returns why it ended.
    fn keep_alive<'a>(
        &'a self,
        lease: i64,
        ttl: i64,
        renewed: Box<dyn FnMut(Instant) + Send + 'a>,
    ) -> BoxFuture<'a, ClusterError>;
    /// Campaign in `election` with `value` under `lease`; returns once elected (the election
    /// holds while the lease lives).
    fn campaign(&self, election: String, value: String, lease: i64) -> BoxFuture<'_, Result<()>>;
    /// The value of `election`'s leader, if any.
    fn leader(&self, election: String) -> BoxFuture<'_, Result<Option<String>>>;
    /// Watch every key starting with `prefix`.
    fn watch(&self, prefix: String) -> BoxFuture<'_, Result<Box<dyn Changes>>>;
}

/// How often a lease of `ttl` seconds is renewed: a fifth of it, at most every 2 s.
pub fn renew_period(ttl: i64) -> std::time::Duration {
    std::time::Duration::from_millis((ttl.max(1) as u64 * 1000 / 5).min(2000))
}
