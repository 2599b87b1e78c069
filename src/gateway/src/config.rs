//! The gateway's validated configuration: what [`Gateway::build`](crate::Gateway::build) and
//! [`Gateway::reload`](crate::Gateway::reload) take. Reading and checking the TOML file that
//! holds it is the binary's job (`tessera::config`), so the library never sees TOML and its
//! errors name the file, line and key where they arise.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The validated `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// Lease TTL in seconds.
    pub lease_ttl: i64,
    /// The cluster target's IQN (gateways).
    pub target: String,
    /// This gateway's id (gateways).
    pub gateway_id: String,
    /// Forwarding listener address (gateways); `None`: the first portal's address, any port.
    pub forward: Option<SocketAddr>,
    /// Ownership weight (gateways).
    pub weight: u32,
    /// Each volume also has a target of its own (gateways).
    pub volume_targets: bool,
    /// Logins to a volume's own target go to its owner's portal (gateways).
    pub redirect: bool,
}

/// The default IQN of the target that exports the cluster's volumes.
pub const CLUSTER_TARGET: &str = "iqn.2024-01.io.tessera:cluster";

/// This machine's host name (or "localhost").
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A file or block device through io_uring.
    File,
    /// Memory (tests, demos).
    Mem,
    /// Erasure-coded over the configured storage nodes.
    Ec,
}

/// The erasure-coded volume behind an ec LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcLun {
    /// Volume name.
    pub volume: String,
    /// Profile.
    pub profile: tessera_ec::Profile,
    /// Placement groups.
    pub pgs: u32,
    /// Write quorum.
    pub write_quorum: usize,
}

/// A storage node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRef {
    /// Its id.
    pub id: String,
    /// Its fragment-protocol address.
    pub address: SocketAddr,
    /// Zone label.
    pub zone: String,
    /// Rack label.
    pub rack: String,
    /// Host label.
    pub host: String,
    /// Relative capacity.
    pub weight: f64,
}

/// O_DIRECT policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// Use O_DIRECT where the filesystem supports it.
    Auto,
    /// Require O_DIRECT.
    On,
    /// Never.
    Off,
}

/// CHAP user and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// Name.
    pub user: String,
    /// Secret.
    pub secret: String,
}

impl fmt::Debug for Chap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A validated LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lun {
    /// LUN number.
    pub id: u64,
    /// Backend.
    pub backend: Backend,
    /// Backing path.
    pub path: Option<PathBuf>,
    /// Size in bytes, if given.
    pub size: Option<u64>,
    /// Logical block size.
    pub block_size: u32,
    /// Read-only.
    pub read_only: bool,
    /// O_DIRECT policy.
    pub direct: Direct,
    /// Serial number.
    pub serial: Option<String>,
    /// Removable.
    pub removable: bool,
    /// The ec volume (ec backend).
    pub ec: Option<EcLun>,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// IQN.
    pub iqn: String,
    /// Alias.
    pub alias: Option<String>,
    /// Portal group tag.
    pub portal_group_tag: u16,
    /// Advertised addresses.
    pub advertise: Vec<String>,
    /// ACL.
    pub allowed_initiators: Vec<String>,
    /// One-way CHAP.
    pub chap: Option<Chap>,
    /// Mutual CHAP.
    pub mutual_chap: Option<Chap>,
    /// LUNs.
    pub luns: Vec<Lun>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from.
    pub file: PathBuf,
    /// Listen addresses.
    pub portals: Vec<SocketAddr>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Where `/metrics` is served.
    pub metrics: Option<SocketAddr>,
    /// Worker threads (0: per CPU).
    pub workers: usize,
    /// Command window.
    pub queue_depth: u32,
    /// NOP-In interval (0: off).
    pub nop_interval_secs: u64,
    /// NOP-In answer timeout.
    pub nop_timeout_secs: u64,
    /// Negotiation limits.
    pub max_recv_data_segment_length: u32,
    /// Negotiation limits.
    pub max_burst_length: u32,
    /// Negotiation limits.
    pub first_burst_length: u32,
    /// Negotiation limits.
    pub max_outstanding_r2t: u32,
    /// ImmediateData allowed.
    pub immediate_data: bool,
    /// InitialR2T required.
    pub initial_r2t: bool,
    /// Digests allowed.
    pub digests: bool,
    /// Discovery CHAP.
    pub discovery_chap: Option<Chap>,
    /// Discovery mutual CHAP.
    pub discovery_mutual_chap: Option<Chap>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Storage nodes.
    pub nodes: Vec<NodeRef>,
    /// How long a node may take to answer a fragment request.
    pub node_timeout_ms: u64,
    /// How long an erasure-coded write waits for its quorum before it fails as suspended.
    pub write_quorum_wait_ms: u64,
    /// The etcd control plane, when the gateway is part of a cluster.
    pub cluster: Option<ClusterConfig>,
}

/// Whether `s` is a plausible iSCSI name (iqn., eui. or naa. format, RFC 7143 §4.2.7).
pub fn valid_iscsi_name(s: &str) -> bool {
    if s.len() > 223 || s.is_empty() {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("iqn.") {
        // iqn.yyyy-mm.reversed.domain[:anything]
        let b = rest.as_bytes();
        b.len() > 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'.'
            && lower
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-:".contains(&c))
    } else if let Some(hex) = lower.strip_prefix("eui.") {
        hex.len() == 16 && hex.bytes().all(|c| c.is_ascii_hexdigit())
    } else if let Some(hex) = lower.strip_prefix("naa.") {
        (hex.len() == 16 || hex.len() == 32) && hex.bytes().all(|c| c.is_ascii_hexdigit())
    } else {
        false
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Configurations for unit tests (the file format's defaults, one portal).
    use super::*;

    /// A gateway on 127.0.0.1:3260 with no targets, in cluster `target` when given.
    pub fn config(cluster_target: Option<&str>) -> Config {
        Config {
            file: "t.toml".into(),
            portals: vec!["127.0.0.1:3260".parse().unwrap()],
            state_dir: None,
            metrics: None,
            workers: 0,
            queue_depth: 128,
            nop_interval_secs: 5,
            nop_timeout_secs: 30,
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1 << 20,
            first_burst_length: 65_536,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            digests: true,
            discovery_chap: None,
            discovery_mutual_chap: None,
            targets: Vec::new(),
            nodes: Vec::new(),
            node_timeout_ms: 2_000,
            write_quorum_wait_ms: 0,
            cluster: cluster_target.map(|t| ClusterConfig {
                etcd: vec!["http://a:1".into()],
                prefix: "/tessera".into(),
                lease_ttl: 5,
                target: t.into(),
                gateway_id: "gw-test".into(),
                forward: None,
                weight: 1,
                volume_targets: false,
                redirect: false,
            }),
        }
    }

    /// A target with no LUNs.
    pub fn target(iqn: &str) -> Target {
        Target {
            iqn: iqn.into(),
            alias: None,
            portal_group_tag: 1,
            advertise: Vec::new(),
            allowed_initiators: Vec::new(),
            chap: None,
            mutual_chap: None,
            luns: Vec::new(),
        }
    }
}
