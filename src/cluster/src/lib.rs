//! tessera's control plane: the cluster's state in etcd.
//!
//! [`Cluster`] speaks to the store through [`Meta`], the little of etcd it uses: [`etcd::Etcd`]
//! in production, [`Memory`] in unit tests (the tests in `tests.rs` run against both).
//!
//! Everything lives under one key prefix (default `/tessera`), so several clusters can share
//! an etcd. Values are JSON. Every change that must not race is one transaction guarded by
//! revisions; nothing here reads and then writes unguarded.
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `P/nodes/ID` | [`NodeRecord`] | the node's lease (TTL default 10 s, kept alive) |
//! | `P/gateways/ID` | [`GatewayRecord`] | the gateway's lease |
//! | `P/volumes/NAME` | [`VolumeRecord`] | until deleted |
//! | `P/meta/next-lun` | next LUN number (decimal) | forever |
//! | `P/meta/next-gateway` | next gateway number (decimal) | forever |
//! | `P/gateway-numbers/ID` | the gateway's number (decimal, 1..=65535) | forever |
//! | `P/pgmaps/VOLID` | [`PgMapRecord`]: placement of every PG, with an epoch | the volume's |
//! | `P/epochs/VOLID` | the volume's fencing epoch (decimal), raised at every takeover | the volume's |
//! | `P/owners/VOLID` | [`OwnerRecord`]: the owning gateway and its epoch | the owner's lease |
//! | `P/reservations/VOLID` | the volume's persistent reservations (the SCSI target's binary PR state) | the volume's |
//! | `P/fills/VOLID` | [`FillRecord`]: how far the owner has rebuilt the moved positions of the current map | the volume's |
//! | `P/trimmed/VOLID` | the highest map epoch up to which every node a position left has had that position's fragments trimmed (decimal) | the volume's |
//! | `P/moves/VOLID/EPOCH` | the [`Move`]s the map change to `EPOCH` made (16 hex digits) | the volume's |
//! | `P/node-states/ID` | [`NodeState`] an operator set (`draining`, `out`) | until set `up` |
//! | `P/absent/ID` | when a controller first saw a mapped node without a lease (Unix seconds) | until it returns or no map names it |
//! | `P/writes/VOLID` | [`WriteHealthRecord`]: nodes of the volume its owner cannot reach, PGs write-suspended (present only while some are) | the owner's lease |
//! | `P/sessions/ID` | initiators with sessions to the cluster target on gateway `ID` | the gateway's lease |
//! | `P/settings` | [`Settings`]: rebuild grace period and rate | forever |
//! | `P/election/controller` | etcd election: the gateway that computes placement | leader's lease |
//!
//! `VOLID` is the volume id in 16 hex digits. etcd is off the data path: gateways and nodes
//! read it at start, cache it, and watch it.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod etcd;
pub mod memory;
pub mod meta;
pub mod process;
pub mod rebuild;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tessera_ec::{placement, Profile};

pub use etcd_client;
pub use memory::Memory;
pub use meta::{Changes, Cmp, Kv, Meta, Op, Txn, TxnResult};
pub use rebuild::{FillRecord, Move, MoveReason, Settings};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/tessera";
/// The default lease TTL of nodes and gateways, in seconds.
pub const DEFAULT_TTL: i64 = 10;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd could not be reached or refused the request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A value in etcd did not decode.
    #[error("etcd key {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The named volume exists already.
    #[error("volume {0} exists already")]
    Exists(String),
    /// No such volume.
    #[error("no volume named {0}")]
    NoVolume(String),
    /// A request that cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, ClusterError>;

/// A storage node's state as an operator set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Serving and eligible for placement.
    #[default]
    Up,
    /// Serving, but its data is to move elsewhere.
    Draining,
    /// Not to be used.
    Out,
}

/// A registered storage node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Stable id.
    pub id: String,
    /// Fragment RPC address.
    pub address: String,
    /// Failure-domain labels.
    #[serde(default)]
    pub host: String,
    /// Rack label.
    #[serde(default)]
    pub rack: String,
    /// Zone label.
    #[serde(default)]
    pub zone: String,
    /// Bytes the store may use (0: unlimited).
    #[serde(default)]
    pub capacity: u64,
    /// Operator state.
    #[serde(default)]
    pub state: NodeState,
    /// Set by the node when its store failed a write or sync (why): the store is fail-stop
    /// until the node restarts, and the controller moves its positions at once, as for a lost
    /// node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl NodeRecord {
    /// The state to show: the operator's, or `failed` when the node reports its store failed.
    pub fn shown_state(&self) -> String {
        if self.failed.is_some() {
            return "failed".into();
        }
        format!("{:?}", self.state).to_lowercase()
    }
}

/// A running gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// Its id.
    pub id: String,
    /// Its iSCSI portals.
    pub portals: Vec<String>,
    /// Its number in the cluster (see [`Cluster::gateway_number`]): its iSCSI target portal
    /// group tag, SCSI target port group and relative target port on the cluster target.
    #[serde(default)]
    pub number: u16,
    /// Where it accepts commands forwarded by other gateways (`host:port`).
    #[serde(default)]
    pub forward: String,
    /// Its share of volume ownership, relative to the others' (weighted rendezvous).
    #[serde(default = "one")]
    pub weight: u32,
    /// The IQN of its cluster target (whose LUNs are the volumes).
    #[serde(default)]
    pub target: String,
}

fn one() -> u32 {
    1
}

/// The gateway that should own `volume` among `gateways`: weighted rendezvous hashing, so
/// volumes spread over gateways in proportion to their weights, and a gateway coming or
/// going moves only the volumes it gains or loses. `None` without a gateway of weight > 0.
pub fn preferred_owner(volume: u64, gateways: &[GatewayRecord]) -> Option<&GatewayRecord> {
    gateways
        .iter()
        .filter(|g| g.weight > 0)
        .map(|g| {
            let s = placement::score(volume, 0, &g.id, f64::from(g.weight));
            (s, g)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.id.cmp(&a.1.id)))
        .map(|(_, g)| g)
}

/// The IQN of volume `volume`'s own target under cluster target `cluster` (gateways with
/// `[cluster] volume_targets`): lower case, `_` as `-` (iSCSI names allow neither).
pub fn volume_target_name(cluster: &str, volume: &str) -> String {
    format!(
        "{}:{}",
        cluster.to_ascii_lowercase(),
        volume.to_ascii_lowercase().replace('_', "-")
    )
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name (unique in the cluster).
    pub name: String,
    /// Id: the nodes key fragments by it. Never reused, even for a re-created name.
    pub id: u64,
    /// LUN number on every gateway's cluster target.
    pub lun: u64,
    /// Bytes.
    pub size: u64,
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Data chunks per stripe.
    pub k: u8,
    /// Parity chunks per stripe.
    pub m: u8,
    /// Bytes per chunk.
    pub chunk: u32,
    /// Codec name (fragments are readable only by the codec that wrote them).
    pub codec: String,
    /// Placement groups (a power of two, fixed at creation).
    pub pgs: u32,
    /// Fragments durable before a write is acknowledged.
    pub write_quorum: usize,
}

impl VolumeRecord {
    /// The erasure-code profile.
    pub fn profile(&self) -> Result<Profile> {
        let mut p = Profile::new(u32::from(self.k), u32::from(self.m), u64::from(self.chunk))
            .map_err(|e| ClusterError::Invalid(format!("volume {}: {e}", self.name)))?;
        p.codec = tessera_ec::CodecId::from_name(&self.codec).ok_or_else(|| {
            ClusterError::Invalid(format!(
                "volume {}: unknown codec {}",
                self.name, self.codec
            ))
        })?;
        Ok(p)
    }
}

/// What a volume's owner sees of its nodes (`P/writes/VOLID`), while some do not answer.
/// The controller moves the positions of nodes listed here at once in PGs left with fewer
/// than the write quorum of nodes answering; `tessera status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteHealthRecord {
    /// The owning gateway.
    pub gateway: String,
    /// Nodes of the volume's map that do not answer the owner (sorted ids).
    pub unreachable: Vec<String>,
    /// How many PGs cannot take writes (fewer nodes answering than the write quorum).
    pub suspended_pgs: u32,
    /// The first of them (at most [`WriteHealthRecord::LISTED`]).
    pub pgs: Vec<u32>,
    /// Since when (Unix seconds) the owner has seen PGs write-suspended (0: none are).
    pub since: u64,
}

impl WriteHealthRecord {
    /// The most PGs listed by number.
    pub const LISTED: usize = 16;
}

/// What `volume create` asks for.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// Name.
    pub name: String,
    /// Bytes (rounded up to whole blocks by nobody: must be a multiple of the block size).
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Profile.
    pub profile: Profile,
    /// Placement groups.
    pub pgs: u32,
    /// Write quorum (`None`: the profile's default).
    pub write_quorum: Option<usize>,
}

/// A node as a placement map names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    /// Node id.
    pub id: String,
    /// Its address when the map was made.
    pub address: String,
    /// Its host label then.
    #[serde(default)]
    pub host: String,
    /// Its rack label then.
    #[serde(default)]
    pub rack: String,
    /// Its zone label then.
    #[serde(default)]
    pub zone: String,
}

impl MapNode {
    /// A registered node as a map names it.
    pub fn of(n: &NodeRecord) -> Self {
        Self {
            id: n.id.clone(),
            address: n.address.clone(),
            host: n.host.clone(),
            rack: n.rack.clone(),
            zone: n.zone.clone(),
        }
    }
}

/// The placement of a volume's PGs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgMapRecord {
    /// Raised at every change of the map.
    pub epoch: u64,
    /// The nodes the map uses.
    pub nodes: Vec<MapNode>,
    /// For each PG, the index in `nodes` of each fragment position.
    pub map: Vec<Vec<usize>>,
    /// Positions `(pg, index)` whose node is new to them under this map: the owner fills
    /// them (rebuilds their fragments there) and reports when done (`fills/VOLID`).
    #[serde(default)]
    pub moving: Vec<(u32, usize)>,
}

/// Who owns a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owning gateway.
    pub gateway: String,
    /// The fencing epoch it took.
    pub epoch: u64,
}

/// A connection to the cluster's state: etcd ([`Cluster::connect`]) or another [`Meta`]
/// ([`Cluster::new`]: the in-memory one in tests).
#[derive(Clone)]
pub struct Cluster {
    meta: Arc<dyn Meta>,
    prefix: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({})", self.prefix)
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn parse_u64(key: &[u8], value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ClusterError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "not a number".into(),
        })
}

/// FNV-1a over the parts, each followed by a 0xff byte (so `["ab"]` and `["a", "b"]` differ):
/// the stable hash of identifiers derived from names (volume ids, the gateway's NAA
/// identifiers). std's hasher may change between Rust releases; these values must not, as
/// they are persisted (volume records, fragment stores) and seen by initiators.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl Cluster {
    /// Connect to etcd at `endpoints` (URLs like `http://127.0.0.1:2379`), keys under
    /// `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        Ok(Self::new(
            Arc::new(etcd::Etcd::connect(endpoints).await?),
            prefix,
        ))
    }

    /// The cluster kept in `meta`, keys under `prefix`.
    pub fn new(meta: Arc<dyn Meta>, prefix: &str) -> Self {
        Self {
            meta,
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The store itself (for tests and tools that reach past the records).
    pub fn meta(&self) -> &dyn Meta {
        &*self.meta
    }

    /// The cluster kept in the same store under another prefix.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        Self::new(self.meta.clone(), prefix)
    }

    /// Watch every key of the cluster: wakes at each change.
    pub async fn watch(&self) -> Result<Box<dyn Changes>> {
        self.meta.watch(self.key("")).await
    }

    /// The key `prefix/rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Run `then` if every condition of `when` holds; whether they did.
    async fn guarded(&self, when: Vec<Cmp>, then: Vec<Op>) -> Result<bool> {
        Ok(self.meta.txn(Txn::new(when, then)).await?.succeeded)
    }

    async fn get_prefix(&self, rest: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let kvs = self.meta.get_prefix(self.key(rest)).await?;
        Ok(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }

    async fn get_one(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let kv = self.meta.get(key.to_string()).await?;
        Ok(kv.map(|kv| (kv.value, kv.mod_revision)))
    }

    // ---- leases -------------------------------------------------------------------------

    /// Grant a lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        self.meta.grant(ttl).await
    }

    /// Keep lease `id` alive until it is lost (etcd says it expired, or it could not be
    /// renewed within its TTL); returns why. Renews every `ttl / 5` seconds (at least every
    /// 2 s), so that a renewal lost to an etcd leader election leaves most of the TTL.
    pub async fn keep_alive(&self, id: i64, ttl: i64) -> ClusterError {
        self.keep_alive_with(id, ttl, |_| {}).await
    }

    /// [`Cluster::keep_alive`], calling `renewed(sent)` after every renewal etcd confirmed,
    /// with the instant its request was sent: the lease runs at least `ttl` from then, so the
    /// holder knows how fresh its lease is and can stop acting on it before it can expire.
    pub async fn keep_alive_with<F: FnMut(tokio::time::Instant) + Send>(
        &self,
        id: i64,
        ttl: i64,
        renewed: F,
    ) -> ClusterError {
        self.meta.keep_alive(id, ttl, Box::new(renewed)).await
    }

    /// Revoke a lease (its keys go at once).
    pub async fn revoke(&self, id: i64) -> Result<()> {
        self.meta.revoke(id).await
    }

    // ---- nodes and gateways -------------------------------------------------------------

    async fn put_leased<T: Serialize>(&self, rest: &str, v: &T, lease: i64) -> Result<()> {
        self.meta.put(self.key(rest), encode(v), Some(lease)).await
    }

    async fn list<T: serde::de::DeserializeOwned>(&self, rest: &str) -> Result<Vec<T>> {
        self.get_prefix(rest)
            .await?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    /// Register (or refresh) a node under `lease`.
    pub async fn register_node(&self, rec: &NodeRecord, lease: i64) -> Result<()> {
        self.put_leased(&format!("nodes/{}", rec.id), rec, lease)
            .await
    }

    /// Every live node, by id, with the state an operator set for it
    /// ([`Cluster::set_node_state`]).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut out: Vec<NodeRecord> = self.list("nodes/").await?;
        let states = self.node_states().await?;
        for n in &mut out {
            if let Some(s) = states.get(&n.id) {
                n.state = *s;
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The states operators set, by node id (nodes without one are up).
    pub async fn node_states(&self) -> Result<std::collections::HashMap<String, NodeState>> {
        Ok(self
            .by_name("node-states/", decode)
            .await?
            .into_iter()
            .collect())
    }

    /// Every key under `rest`, as (the rest of its name, its value parsed by `parse`).
    async fn by_name<T>(
        &self,
        rest: &str,
        parse: impl Fn(&[u8], &[u8]) -> Result<T>,
    ) -> Result<Vec<(String, T)>> {
        let prefix = self.key(rest);
        self.get_prefix(rest)
            .await?
            .iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[prefix.len().min(k.len())..]).into_owned();
                Ok((name, parse(k, v)?))
            })
            .collect()
    }

    /// Set a node's state (`draining`: move its data elsewhere now; `out`: the same, and
    /// never place anything on it; `up`: eligible again). Kept across the node's restarts.
    pub async fn set_node_state(&self, id: &str, state: NodeState) -> Result<()> {
        let key = self.key(&format!("node-states/{id}"));
        if state == NodeState::Up {
            self.meta.delete(key, false).await
        } else {
            self.meta.put(key, encode(&state), None).await
        }
    }

    /// When node `id` was first seen absent by a controller (seconds since the Unix epoch),
    /// recording `now` if no controller had.
    pub async fn mark_absent(&self, id: &str, now: u64) -> Result<u64> {
        let key = self.key(&format!("absent/{id}"));
        let put = Op::put(key.clone(), now.to_string());
        let when = vec![Cmp::Absent(key.clone())];
        if self.guarded(when, vec![put]).await? {
            return Ok(now);
        }
        match self.get_one(&key).await? {
            Some((v, _)) => parse_u64(key.as_bytes(), &v),
            None => Ok(now),
        }
    }

    /// Forget that node `id` was absent (it is back).
    pub async fn clear_absent(&self, id: &str) -> Result<()> {
        self.meta
            .delete(self.key(&format!("absent/{id}")), false)
            .await
    }

    /// Nodes recorded absent, with since when.
    pub async fn absent(&self) -> Result<std::collections::HashMap<String, u64>> {
        Ok(self
            .by_name("absent/", parse_u64)
            .await?
            .into_iter()
            .collect())
    }

    /// The cluster-wide settings (defaults where unset).
    pub async fn settings(&self) -> Result<Settings> {
        let key = self.key("settings");
        match self.get_one(&key).await? {
            Some((v, _)) => decode(key.as_bytes(), &v),
            None => Ok(Settings::default()),
        }
    }

    /// Replace the cluster-wide settings.
    pub async fn set_settings(&self, s: &Settings) -> Result<()> {
        self.meta.put(self.key("settings"), encode(s), None).await
    }

    /// Register a gateway under `lease`.
    pub async fn register_gateway(&self, rec: &GatewayRecord, lease: i64) -> Result<()> {
        self.put_leased(&format!("gateways/{}", rec.id), rec, lease)
            .await
    }

    /// The number of gateway `id` (1..=65535), allocated at its first call and kept forever:
    /// the gateway's target portal group tag, target port group and relative target port, so
    /// that every gateway is a distinct SCSI target port of the one cluster target.
    pub async fn gateway_number(&self, id: &str) -> Result<u16> {
        let nkey = self.key(&format!("gateway-numbers/{id}"));
        let ckey = self.key("meta/next-gateway");
        loop {
            if let Some((v, _)) = self.get_one(&nkey).await? {
                let n = parse_u64(nkey.as_bytes(), &v)?;
                return u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                    ClusterError::Corrupt {
                        key: nkey.clone(),
                        reason: format!("gateway number {n} out of 1..=65535"),
                    }
                });
            }
            let counter = self.get_one(&ckey).await?;
            let (next, guard) = match &counter {
                Some((v, rev)) => (
                    parse_u64(ckey.as_bytes(), v)?,
                    Cmp::ModRevision(ckey.clone(), *rev),
                ),
                None => (1, Cmp::Absent(ckey.clone())),
            };
            if next > u64::from(u16::MAX) {
                return Err(ClusterError::Invalid(
                    "all 65535 gateway numbers are used".into(),
                ));
            }
            let when = vec![guard, Cmp::Absent(nkey.clone())];
            let then = vec![
                Op::put(nkey.clone(), next.to_string()),
                Op::put(ckey.clone(), (next + 1).to_string()),
            ];
            if self.guarded(when, then).await? {
                return Ok(next as u16);
            }
            // Another gateway took that number, or this one was numbered meanwhile: again.
        }
    }

    /// Every volume's owner, by volume id.
    pub async fn owners(&self) -> Result<std::collections::HashMap<u64, OwnerRecord>> {
        self.by_volume("owners/").await
    }

    /// Publish the initiators with sessions to the cluster target on gateway `gateway`
    /// (`P/sessions/ID`, under its lease).
    pub async fn publish_sessions(
        &self,
        gateway: &str,
        lease: i64,
        initiators: &[String],
    ) -> Result<()> {
        self.put_leased(&format!("sessions/{gateway}"), &initiators, lease)
            .await
    }

    /// The initiators with sessions to the cluster target, by gateway (gateways without
    /// sessions are left out).
    pub async fn sessions(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
        Ok(self
            .by_name("sessions/", decode::<Vec<String>>)
            .await?
            .into_iter()
            .filter(|(_, list)| !list.is_empty())
            .collect())
    }

    /// Every live gateway, by id.
    pub async fn gateways(&self) -> Result<Vec<GatewayRecord>> {
        let mut out: Vec<GatewayRecord> = self.list("gateways/").await?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    // ---- volumes ------------------------------------------------------------------------

    /// Create a volume: its record and the next free LUN number, in one transaction.
    pub async fn create_volume(&self, req: &NewVolume) -> Result<VolumeRecord> {
        let name = req.name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(ClusterError::Invalid(format!(
                "volume name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        if req.block_size != 512 && req.block_size != 4096 {
            return Err(ClusterError::Invalid(format!(
                "block size {} (512 or 4096)",
                req.block_size
            )));
        }
        if req.size == 0 || !req.size.is_multiple_of(u64::from(req.block_size)) {
            return Err(ClusterError::Invalid(format!(
                "size {} is not a positive multiple of the block size {}",
                req.size, req.block_size
            )));
        }
        if !req.pgs.is_power_of_two() || req.pgs > 1 << 16 {
            return Err(ClusterError::Invalid(format!(
                "PG count {} (a power of two up to 65536)",
                req.pgs
            )));
        }
        let quorum = req
            .write_quorum
            .unwrap_or_else(|| req.profile.default_write_quorum());
        if quorum < usize::from(req.profile.k) || quorum > req.profile.width() {
            return Err(ClusterError::Invalid(format!(
                "write quorum {quorum} outside k ({}) ..= k + m ({})",
                req.profile.k,
                req.profile.width()
            )));
        }
        let vkey = self.key(&format!("volumes/{name}"));
        let ckey = self.key("meta/next-lun");
        loop {
            let counter = self.get_one(&ckey).await?;
            let (lun, guard) = match &counter {
                Some((v, rev)) => (
                    parse_u64(ckey.as_bytes(), v)?,
                    Cmp::ModRevision(ckey.clone(), *rev),
                ),
                None => (0, Cmp::Absent(ckey.clone())),
            };
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let rec = VolumeRecord {
                name: name.to_string(),
                id: stable_hash(&[
                    b"tessera-volume",
                    name.as_bytes(),
                    &lun.to_be_bytes(),
                    &nanos.to_be_bytes(),
                ]),
                lun,
                size: req.size,
                block_size: req.block_size,
                k: req.profile.k,
                m: req.profile.m,
                chunk: req.profile.chunk_size,
                codec: req.profile.codec.name().to_string(),
                pgs: req.pgs,
                write_quorum: quorum,
            };
            let when = vec![Cmp::Absent(vkey.clone()), guard];
            let then = vec![
                Op::put(vkey.clone(), encode(&rec)),
                Op::put(ckey.clone(), (lun + 1).to_string()),
            ];
            if self.guarded(when, then).await? {
                return Ok(rec);
            }
            if self.get_one(&vkey).await?.is_some() {
                return Err(ClusterError::Exists(name.to_string()));
            }
            // Another volume took the LUN number meanwhile: try the next.
        }
    }

    /// Every volume, by LUN.
    pub async fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut out: Vec<VolumeRecord> = self.list("volumes/").await?;
        out.sort_by_key(|v| v.lun);
        Ok(out)
    }

    /// One volume.
    pub async fn volume(&self, name: &str) -> Result<Option<VolumeRecord>> {
        let key = self.key(&format!("volumes/{name}"));
        match self.get_one(&key).await? {
            Some((v, _)) => Ok(Some(decode(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Grow a volume to `size` bytes (a multiple of its block size; volumes never shrink),
    /// guarded by the record's revision. The gateways see the change and tell initiators
    /// (CAPACITY DATA HAS CHANGED).
    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeRecord> {
        let key = self.key(&format!("volumes/{name}"));
        loop {
            let Some((raw, rev)) = self.get_one(&key).await? else {
                return Err(ClusterError::NoVolume(name.to_string()));
            };
            let mut v: VolumeRecord = decode(key.as_bytes(), &raw)?;
            if size < v.size {
                return Err(ClusterError::Invalid(format!(
                    "volume {name} is {} bytes: volumes grow, never shrink",
                    v.size
                )));
            }
            if !size.is_multiple_of(u64::from(v.block_size)) {
                return Err(ClusterError::Invalid(format!(
                    "size {size} is not a multiple of the block size {}",
                    v.block_size
                )));
            }
            v.size = size;
            let when = vec![Cmp::ModRevision(key.clone(), rev)];
            let then = vec![Op::put(key.clone(), encode(&v))];
            if self.guarded(when, then).await? {
                return Ok(v);
            }
        }
    }

    /// Delete a volume's records (its record, map, epoch and owner) in one transaction.
    /// The fragments on the nodes are left for the nodes to reclaim.
    pub async fn delete_volume(&self, name: &str) -> Result<VolumeRecord> {
        let Some(v) = self.volume(name).await? else {
            return Err(ClusterError::NoVolume(name.to_string()));
        };
        let id = format!("{:016x}", v.id);
        let vkey = self.key(&format!("volumes/{name}"));
        let mut then = vec![Op::Delete(vkey.clone())];
        for what in [
            "pgmaps",
            "epochs",
            "owners",
            "reservations",
            "fills",
            "trimmed",
        ] {
            then.push(Op::Delete(self.key(&format!("{what}/{id}"))));
        }
        then.push(Op::DeletePrefix(self.key(&format!("moves/{id}/"))));
        if !self.guarded(vec![Cmp::Present(vkey)], then).await? {
            return Err(ClusterError::NoVolume(name.to_string()));
        }
        Ok(v)
    }

    // ---- placement ----------------------------------------------------------------------

    /// A volume's placement map, if the controller made one.
    pub async fn pg_map(&self, volume: u64) -> Result<Option<PgMapRecord>> {
        let key = self.key(&format!("pgmaps/{volume:016x}"));
        match self.get_one(&key).await? {
            Some((v, _)) => Ok(Some(decode(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Every volume's map, by volume id.
    pub async fn pg_maps(&self) -> Result<std::collections::HashMap<u64, PgMapRecord>> {
        self.by_volume("pgmaps/").await
    }

    async fn by_volume<T: serde::de::DeserializeOwned>(
        &self,
        rest: &str,
    ) -> Result<std::collections::HashMap<u64, T>> {
        let prefix = self.key(rest);
        let mut out = std::collections::HashMap::new();
        for (k, v) in self.get_prefix(rest).await? {
            let id = std::str::from_utf8(&k[prefix.len().min(k.len())..])
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            if let Some(id) = id {
                out.insert(id, decode(&k, &v)?);
            }
        }
        Ok(out)
    }

    /// The controller's part: replace the volume's map `old` (still the stored one) by
    /// `new`, recording the moves under `moves/VOLID/EPOCH`, in one transaction. `false`:
    /// the stored map changed meanwhile, or the volume is gone.
    pub async fn replace_pg_map(
        &self,
        vol: &VolumeRecord,
        old: &PgMapRecord,
        new: &PgMapRecord,
        moves: &[Move],
    ) -> Result<bool> {
        let key = self.key(&format!("pgmaps/{:016x}", vol.id));
        let Some((cur, rev)) = self.get_one(&key).await? else {
            return Ok(false);
        };
        let cur: PgMapRecord = decode(key.as_bytes(), &cur)?;
        if cur != *old {
            return Ok(false);
        }
        let when = vec![
            Cmp::ModRevision(key.clone(), rev),
            Cmp::Present(self.key(&format!("volumes/{}", vol.name))),
        ];
        let then = vec![
            Op::put(key, encode(new)),
            Op::put(
                self.key(&format!("moves/{:016x}/{:016x}", vol.id, new.epoch)),
                encode(&moves),
            ),
        ];
        self.guarded(when, then).await
    }

    /// The moves each map change of a volume made, oldest first, as `(epoch, moves)`.
    pub async fn moves(&self, volume: u64) -> Result<Vec<(u64, Vec<Move>)>> {
        let rest = format!("moves/{volume:016x}/");
        let prefix = self.key(&rest);
        let mut out = Vec::new();
        for (k, v) in self.get_prefix(&rest).await? {
            let epoch = std::str::from_utf8(&k[prefix.len().min(k.len())..])
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            if let Some(e) = epoch {
                out.push((e, decode(&k, &v)?));
            }
        }
        out.sort_by_key(|(e, _)| *e);
        Ok(out)
    }

    /// The highest map epoch up to which the nodes positions left have had those positions'
    /// fragments trimmed (0: none yet).
    pub async fn trimmed(&self, volume: u64) -> Result<u64> {
        let key = self.key(&format!("trimmed/{volume:016x}"));
        match self.get_one(&key).await? {
            Some((v, _)) => parse_u64(key.as_bytes(), &v),
            None => Ok(0),
        }
    }

    /// Record [`Cluster::trimmed`]: only while the owner key is held under `lease`.
    pub async fn save_trimmed(&self, volume: u64, lease: i64, epoch: u64) -> Result<()> {
        self.put_as_owner(volume, lease, "trimmed", epoch.to_string().into_bytes())
            .await
    }

    /// How far the owner has filled each volume's map, by volume id.
    pub async fn fills(&self) -> Result<std::collections::HashMap<u64, FillRecord>> {
        self.by_volume("fills/").await
    }

    /// How far the owner has filled the volume's map.
    pub async fn fill(&self, volume: u64) -> Result<Option<FillRecord>> {
        let key = self.key(&format!("fills/{volume:016x}"));
        match self.get_one(&key).await? {
            Some((v, _)) => Ok(Some(decode(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Report fill progress: only while the owner key is held under `lease`.
    pub async fn save_fill(&self, volume: u64, lease: i64, rec: &FillRecord) -> Result<()> {
        self.put_as_owner(volume, lease, "fills", encode(rec)).await
    }

    /// Every volume's [`WriteHealthRecord`] (volumes whose nodes all answer have none).
    pub async fn write_health(&self) -> Result<std::collections::HashMap<u64, WriteHealthRecord>> {
        self.by_volume("writes/").await
    }

    /// Publish what the owner sees of the volume's nodes (`None`: every node answers),
    /// under the owner's lease; only while the owner key is held under `lease`.
    pub async fn save_write_health(
        &self,
        volume: u64,
        lease: i64,
        rec: Option<&WriteHealthRecord>,
    ) -> Result<()> {
        let okey = self.key(&format!("owners/{volume:016x}"));
        let key = self.key(&format!("writes/{volume:016x}"));
        let op = match rec {
            Some(r) => Op::put_leased(key, encode(r), lease),
            None => Op::Delete(key),
        };
        let when = vec![Cmp::Lease(okey, lease)];
        if self.guarded(when, vec![op]).await? {
            Ok(())
        } else {
            Err(ClusterError::Invalid(format!(
                "volume {volume:016x} is no longer owned here: write health not saved"
            )))
        }
    }

    async fn put_as_owner(&self, volume: u64, lease: i64, what: &str, v: Vec<u8>) -> Result<()> {
        let okey = self.key(&format!("owners/{volume:016x}"));
        let key = self.key(&format!("{what}/{volume:016x}"));
        let when = vec![Cmp::Lease(okey, lease)];
        if self.guarded(when, vec![Op::put(key, v)]).await? {
            Ok(())
        } else {
            Err(ClusterError::Invalid(format!(
                "volume {volume:016x} is no longer owned here: {what} not saved"
            )))
        }
    }

    /// The controller's part: make the volume's first placement map from the live nodes in
    /// state up (rendezvous hashing over failure domains), unless one exists; returns the
    /// stored map either way.
    pub async fn ensure_pg_map(&self, vol: &VolumeRecord) -> Result<PgMapRecord> {
        if let Some(m) = self.pg_map(vol.id).await? {
            return Ok(m);
        }
        let live: Vec<NodeRecord> = self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.state == NodeState::Up)
            .collect();
        let pnodes: Vec<placement::Node> = live
            .iter()
            .map(|n| placement::Node::new(&n.id, &n.zone, &n.rack, &n.host))
            .collect();
        let width = usize::from(vol.k) + usize::from(vol.m);
        let map = placement::compute(vol.id, vol.pgs, &pnodes, width, None)
            .map_err(|e| ClusterError::Invalid(format!("placing volume {}: {e}", vol.name)))?;
        let rec = PgMapRecord {
            epoch: 1,
            nodes: live.iter().map(MapNode::of).collect(),
            map,
            moving: Vec::new(),
        };
        let key = self.key(&format!("pgmaps/{:016x}", vol.id));
        let when = vec![
            Cmp::Absent(key.clone()),
            // Only for a volume that still exists.
            Cmp::Present(self.key(&format!("volumes/{}", vol.name))),
        ];
        let then = vec![Op::put(key.clone(), encode(&rec))];
        if self.guarded(when, then).await? {
            return Ok(rec);
        }
        self.pg_map(vol.id)
            .await?
            .ok_or_else(|| ClusterError::NoVolume(vol.name.clone()))
    }

    // ---- ownership ----------------------------------------------------------------------

    /// The volume's owner, if any gateway holds it.
    pub async fn owner(&self, volume: u64) -> Result<Option<OwnerRecord>> {
        let key = self.key(&format!("owners/{volume:016x}"));
        match self.get_one(&key).await? {
            Some((v, _)) => Ok(Some(decode(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// The volume's fencing epoch (0 before its first owner).
    pub async fn epoch(&self, volume: u64) -> Result<u64> {
        let key = self.key(&format!("epochs/{volume:016x}"));
        match self.get_one(&key).await? {
            Some((v, _)) => parse_u64(key.as_bytes(), &v),
            None => Ok(0),
        }
    }

    /// Take ownership of a volume that has no owner: raise its fencing epoch and record
    /// `gateway` as owner under `lease`, in one transaction. `Some(epoch)`: taken (or already
    /// held under this lease); `None`: another gateway owns it.
    pub async fn acquire(&self, volume: u64, gateway: &str, lease: i64) -> Result<Option<u64>> {
        let okey = self.key(&format!("owners/{volume:016x}"));
        let ekey = self.key(&format!("epochs/{volume:016x}"));
        loop {
            let cur = self.get_one(&ekey).await?;
            let (epoch, guard) = match &cur {
                Some((v, rev)) => (
                    parse_u64(ekey.as_bytes(), v)?,
                    Cmp::ModRevision(ekey.clone(), *rev),
                ),
                None => (0, Cmp::Absent(ekey.clone())),
            };
            let next = epoch + 1;
            let rec = OwnerRecord {
                gateway: gateway.to_string(),
                epoch: next,
            };
            let when = vec![Cmp::Absent(okey.clone()), guard];
            let then = vec![
                Op::put_leased(okey.clone(), encode(&rec), lease),
                Op::put(ekey.clone(), next.to_string()),
            ];
            let take = Txn::new(when, then).or_else(vec![Op::Get(okey.clone())]);
            let resp = self.meta.txn(take).await?;
            if resp.succeeded {
                return Ok(Some(next));
            }
            let held = resp
                .got
                .into_iter()
                .flatten()
                .next()
                .map(|kv| (kv.value, kv.lease));
            match held {
                Some((v, l)) => {
                    let o: OwnerRecord = decode(okey.as_bytes(), &v)?;
                    return Ok((l == lease && o.gateway == gateway).then_some(o.epoch));
                }
                // The owner went between the two reads, or the epoch moved: again.
                None => continue,
            }
        }
    }

    /// Give a volume up (only if `gateway` holds it under `lease`).
    pub async fn release(&self, volume: u64, gateway: &str, lease: i64) -> Result<()> {
        let okey = self.key(&format!("owners/{volume:016x}"));
        if let Some(o) = self.owner(volume).await? {
            if o.gateway == gateway {
                let when = vec![Cmp::Lease(okey.clone(), lease)];
                self.guarded(when, vec![Op::Delete(okey)]).await?;
            }
        }
        Ok(())
    }

    // ---- persistent reservations --------------------------------------------------------

    /// The volume's saved persistent reservation state, if any.
    pub async fn reservations(&self, volume: u64) -> Result<Option<Vec<u8>>> {
        let key = self.key(&format!("reservations/{volume:016x}"));
        Ok(self.get_one(&key).await?.map(|(v, _)| v))
    }

    /// Save the volume's persistent reservation state: only while the owner key is held
    /// under `lease` (a gateway that lost the volume cannot overwrite its successor's).
    pub async fn save_reservations(&self, volume: u64, lease: i64, state: &[u8]) -> Result<()> {
        self.put_as_owner(volume, lease, "reservations", state.to_vec())
            .await
    }

    // ---- the controller -----------------------------------------------------------------

    /// Campaign to be the controller under `lease`; returns once elected (the election
    /// holds while the lease lives).
    pub async fn campaign(&self, gateway: &str, lease: i64) -> Result<()> {
        self.meta
            .campaign(self.key("election/controller"), gateway.to_string(), lease)
            .await
    }

    /// The current controller's id, if any.
    pub async fn controller(&self) -> Result<Option<String>> {
        self.meta.leader(self.key("election/controller")).await
    }

    /// Delete every key under the prefix (tests).
    pub async fn wipe(&self) -> Result<()> {
        self.meta.delete(format!("{}/", self.prefix), true).await
    }
}

#[cfg(test)]
mod tests;
