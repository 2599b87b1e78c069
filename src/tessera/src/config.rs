//! The configuration files (TOML) of the gateway and the storage node, their validation into
//! the types the daemons take, and errors that name the file, the line and the key.
//!
//! The format is documented in `target-config/README.md` and by the examples next to it; a test
//! loads every file in `target-config/`.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use tessera_gateway::config::*;

/// A configuration error with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub col: usize,
    /// The key, as a dotted path (`target[0].lun[1].block_size`), or empty.
    pub key: String,
    /// What is wrong.
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Sizes: a number of bytes, or a number with a unit (`512`, `64MiB`, `10GiB`, `1T`, `4k`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown size unit in {s:?} (use B, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A size written as a string with a unit or as a plain integer.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// With a unit.
    Text(String),
}

/// CHAP credentials in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapFile {
    /// CHAP name.
    pub user: Spanned<String>,
    /// Secret (12 to 255 characters; RFC 7143 asks for at least 96 bits).
    pub secret: Spanned<String>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Listen addresses (`host:port`).
    #[serde(default = "default_portals")]
    pub portals: Vec<Spanned<String>>,
    /// Directory for persistent state (reservations).
    pub state_dir: Option<Spanned<String>>,
    /// Where `/metrics` (Prometheus) is served (`host:port`; none: not served).
    pub metrics: Option<Spanned<String>>,
    /// Event-loop threads (0: one per CPU).
    #[serde(default)]
    pub workers: usize,
    /// Command window per session (MaxCmdSN - ExpCmdSN + 1).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: Spanned<u32>,
    /// Seconds of silence before the target pings an initiator (0: never).
    #[serde(default = "default_nop_interval")]
    pub nop_interval_secs: u64,
    /// Seconds to wait for the ping's answer before dropping the connection.
    #[serde(default = "default_nop_timeout")]
    pub nop_timeout_secs: u64,
    /// Our MaxRecvDataSegmentLength.
    #[serde(default = "default_mrdsl")]
    pub max_recv_data_segment_length: Spanned<u32>,
    /// Largest MaxBurstLength agreed.
    #[serde(default = "default_max_burst")]
    pub max_burst_length: Spanned<u32>,
    /// Largest FirstBurstLength agreed.
    #[serde(default = "default_first_burst")]
    pub first_burst_length: Spanned<u32>,
    /// Largest MaxOutstandingR2T agreed.
    #[serde(default = "default_max_r2t")]
    pub max_outstanding_r2t: Spanned<u32>,
    /// Accept ImmediateData=Yes.
    #[serde(default = "yes")]
    pub immediate_data: bool,
    /// Insist on InitialR2T=Yes.
    #[serde(default)]
    pub initial_r2t: bool,
    /// Accept CRC32C digests when initiators offer them.
    #[serde(default = "yes")]
    pub digests: bool,
    /// Milliseconds a storage node may take to answer a fragment request.
    #[serde(default = "default_node_timeout")]
    pub node_timeout_ms: u64,
    /// Milliseconds an erasure-coded write waits for its write quorum when too few of its
    /// nodes answer, before it fails with NOT READY, MANUAL INTERVENTION REQUIRED.
    pub write_quorum_wait_ms: Option<Spanned<u64>>,
}

/// The longest `gateway.write_quorum_wait_ms`: below the 15 s a gateway waits for a
/// forwarded command's answer.
pub const MAX_QUORUM_WAIT_MS: u64 = 12_000;

fn default_node_timeout() -> u64 {
    5000
}

fn default_portals() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "0.0.0.0:3260".to_string())]
}
fn default_queue_depth() -> Spanned<u32> {
    Spanned::new(0..0, 128)
}
fn default_nop_interval() -> u64 {
    5
}
fn default_nop_timeout() -> u64 {
    15
}
fn default_mrdsl() -> Spanned<u32> {
    Spanned::new(0..0, 256 * 1024)
}
fn default_max_burst() -> Spanned<u32> {
    Spanned::new(0..0, 1024 * 1024)
}
fn default_first_burst() -> Spanned<u32> {
    Spanned::new(0..0, 256 * 1024)
}
fn default_max_r2t() -> Spanned<u32> {
    Spanned::new(0..0, 16)
}
fn yes() -> bool {
    true
}

/// `[discovery]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryFile {
    /// CHAP required for SendTargets discovery.
    pub chap: Option<ChapFile>,
    /// Mutual CHAP for discovery.
    pub mutual_chap: Option<ChapFile>,
}

/// `[[target]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// iSCSI qualified name.
    pub iqn: Spanned<String>,
    /// TargetAlias.
    pub alias: Option<String>,
    /// Target portal group tag.
    #[serde(default = "one")]
    pub portal_group_tag: u16,
    /// Addresses SendTargets reports (default: the portal the initiator used).
    #[serde(default)]
    pub advertise: Vec<Spanned<String>>,
    /// Initiator IQNs allowed (default: all).
    #[serde(default)]
    pub allowed_initiators: Vec<Spanned<String>>,
    /// One-way CHAP.
    pub chap: Option<ChapFile>,
    /// Mutual CHAP (the target's own credentials).
    pub mutual_chap: Option<ChapFile>,
    /// LUNs.
    #[serde(default)]
    pub lun: Vec<LunFile>,
}

fn one() -> u16 {
    1
}

/// `[[target.lun]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunFile {
    /// LUN number.
    pub id: Spanned<u64>,
    /// `file` or `mem`.
    #[serde(default = "file_backend")]
    pub backend: Spanned<String>,
    /// Backing file or block device (file backend).
    pub path: Option<Spanned<String>>,
    /// Size: creates or extends a file; required for `mem`.
    pub size: Option<Spanned<SizeValue>>,
    /// Logical block size, 512 or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: Spanned<u32>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// O_DIRECT: `auto`, `on` or `off`.
    #[serde(default = "auto")]
    pub direct: Spanned<String>,
    /// Unit serial number (VPD 0x80); derived from the IQN and LUN when absent.
    pub serial: Option<Spanned<String>>,
    /// Removable medium (START STOP UNIT with LOEJ ejects it).
    #[serde(default)]
    pub removable: bool,
    /// ec backend: the volume's name (default: `<target iqn>/lun<id>`).
    pub volume: Option<Spanned<String>>,
    /// ec backend: the erasure-code profile, `K+M`.
    pub ec: Option<Spanned<String>>,
    /// ec backend: bytes per chunk (a power of two, 4 KiB to 1 MiB).
    pub chunk: Option<Spanned<SizeValue>>,
    /// ec backend: placement groups (a power of two).
    pub pgs: Option<Spanned<u32>>,
    /// ec backend: fragments durable before a write is acknowledged (k to k + m).
    pub write_quorum: Option<Spanned<usize>>,
}

/// `[[node]]`: a storage node the gateway's ec volumes use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The node's id (as in its own configuration).
    pub id: Spanned<String>,
    /// Where its fragment protocol listens (`host:port`).
    pub address: Spanned<String>,
    /// Failure-domain labels.
    #[serde(default)]
    pub zone: String,
    /// Rack label.
    #[serde(default)]
    pub rack: String,
    /// Host label.
    #[serde(default)]
    pub host: String,
    /// Relative capacity (default 1).
    pub weight: Option<Spanned<f64>>,
}

fn file_backend() -> Spanned<String> {
    Spanned::new(0..0, "file".into())
}
fn default_block_size() -> Spanned<u32> {
    Spanned::new(0..0, 512)
}
fn auto() -> Spanned<String> {
    Spanned::new(0..0, "auto".into())
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Gateway settings.
    pub gateway: Option<GatewayFile>,
    /// Discovery authentication.
    #[serde(default)]
    pub discovery: DiscoveryFile,
    /// Targets.
    #[serde(default)]
    pub target: Vec<TargetFile>,
    /// Storage nodes (for ec LUNs).
    #[serde(default)]
    pub node: Vec<NodeFile>,
    /// The etcd control plane.
    pub cluster: Option<ClusterFile>,
}

/// `[cluster]`: where the cluster's state lives (etcd), in gateway and node files alike.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// etcd client URLs (`http://host:port`).
    pub etcd: Vec<Spanned<String>>,
    /// Key prefix (several clusters can share an etcd).
    pub prefix: Option<Spanned<String>>,
    /// Seconds a node's or gateway's lease lives unrenewed.
    pub lease_ttl_secs: Option<Spanned<i64>>,
    /// Gateways: the target whose LUNs are the cluster's volumes.
    pub target: Option<Spanned<String>>,
    /// Gateways: this gateway's id (default: the host name).
    pub gateway_id: Option<Spanned<String>>,
    /// Gateways: where other gateways forward commands for volumes this one owns (default:
    /// the first portal's address, any free port).
    pub forward: Option<Spanned<String>>,
    /// Gateways: share of volume ownership relative to the other gateways (default 1; 0 owns
    /// nothing unless no other gateway is left).
    pub weight: Option<Spanned<i64>>,
    /// Gateways: also export each volume as a target of its own, `<target>:<volume>`, with
    /// the volume as LUN 0 (default false).
    pub volume_targets: Option<bool>,
    /// Gateways: a login to a volume's own target at a gateway that does not own the volume
    /// is redirected to the owner's portal (needs `volume_targets`; default false).
    pub redirect: Option<Spanned<bool>>,
}

struct Ctx<'a> {
    file: &'a Path,
    src: &'a str,
}

impl Ctx<'_> {
    fn ec_lun(
        &self,
        l: &LunFile,
        lkey: &str,
        iqn: &str,
        id: u64,
        nodes: usize,
    ) -> Result<EcLun, ConfigError> {
        let km =
            l.ec.as_ref()
                .map_or("4+2".to_string(), |e| e.get_ref().clone());
        let ec_span = l.ec.as_ref().map_or(l.backend.span(), Spanned::span);
        let chunk = match &l.chunk {
            None => 16 << 10,
            Some(c) => match c.get_ref() {
                SizeValue::Bytes(n) => *n,
                SizeValue::Text(t) => {
                    parse_size(t).map_err(|m| self.err(c.span(), format!("{lkey}.chunk"), m))?
                }
            },
        };
        let profile = tessera_ec::Profile::parse(&km, chunk).map_err(|e| {
            let (span, key) = match e {
                tessera_ec::ProfileError::ChunkSize(_) => (
                    l.chunk.as_ref().map_or(ec_span.clone(), Spanned::span),
                    format!("{lkey}.chunk"),
                ),
                _ => (ec_span.clone(), format!("{lkey}.ec")),
            };
            self.err(span, key, e.to_string())
        })?;
        if nodes < profile.width() {
            return Err(self.err(
                ec_span,
                format!("{lkey}.ec"),
                format!(
                    "{km} needs {} storage nodes; the file lists {nodes} ([[node]])",
                    profile.width()
                ),
            ));
        }
        let pgs = l.pgs.as_ref().map_or(64, |p| *p.get_ref());
        if !pgs.is_power_of_two() || pgs > 1 << 16 {
            let span = l.pgs.as_ref().map_or(0..0, Spanned::span);
            return Err(self.err(
                span,
                format!("{lkey}.pgs"),
                "must be a power of two from 1 to 65536",
            ));
        }
        let q = l
            .write_quorum
            .as_ref()
            .map_or(profile.default_write_quorum(), |q| *q.get_ref());
        if q < usize::from(profile.k) || q > profile.width() {
            let span = l.write_quorum.as_ref().map_or(0..0, Spanned::span);
            return Err(self.err(
                span,
                format!("{lkey}.write_quorum"),
                format!(
                    "must be from k ({}) to k + m ({})",
                    profile.k,
                    profile.width()
                ),
            ));
        }
        let volume = l
            .volume
            .as_ref()
            .map_or(format!("{iqn}/lun{id}"), |v| v.get_ref().clone());
        if volume.is_empty() || volume.len() > 255 {
            let span = l.volume.as_ref().map_or(0..0, Spanned::span);
            return Err(self.err(span, format!("{lkey}.volume"), "1 to 255 characters"));
        }
        Ok(EcLun {
            volume,
            profile,
            pgs,
            write_quorum: q,
        })
    }

    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        let (line, col) = if span == (0..0) {
            (0, 0)
        } else {
            line_col(self.src, span.start)
        };
        ConfigError {
            file: self.file.into(),
            line,
            col,
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// An optional `host:port`.
    fn addr(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        v.as_ref()
            .map(|a| {
                a.get_ref().parse().map_err(|_| {
                    self.err(
                        a.span(),
                        key,
                        format!("not an address:port: {:?}", a.get_ref()),
                    )
                })
            })
            .transpose()
    }

    fn cluster(&self, c: &Option<ClusterFile>) -> Result<Option<ClusterConfig>, ConfigError> {
        let Some(c) = c else {
            return Ok(None);
        };
        let mut etcd = Vec::new();
        for (i, u) in c.etcd.iter().enumerate() {
            let url = u.get_ref().trim();
            let ok = url
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && rest.contains(':'));
            if !ok {
                return Err(self.err(
                    u.span(),
                    format!("cluster.etcd[{i}]"),
                    format!("not an etcd client URL http://host:port: {url:?}"),
                ));
            }
            etcd.push(url.to_string());
        }
        if etcd.is_empty() {
            return Err(self.err(0..0, "cluster.etcd", "at least one etcd URL is needed"));
        }
        let prefix = match &c.prefix {
            None => "/tessera".to_string(),
            Some(p) => {
                let v = p.get_ref();
                if !v.starts_with('/') || v.len() < 2 || v.ends_with('/') {
                    return Err(self.err(
                        p.span(),
                        "cluster.prefix",
                        "a key prefix like /tessera (leading '/', no trailing '/')",
                    ));
                }
                v.clone()
            }
        };
        let lease_ttl = match &c.lease_ttl_secs {
            None => 10,
            Some(t) if (2..=300).contains(t.get_ref()) => *t.get_ref(),
            Some(t) => {
                return Err(self.err(
                    t.span(),
                    "cluster.lease_ttl_secs",
                    format!("must be between 2 and 300 (got {})", t.get_ref()),
                ))
            }
        };
        let target = match &c.target {
            None => CLUSTER_TARGET.to_string(),
            Some(t) if valid_iscsi_name(t.get_ref()) => t.get_ref().clone(),
            Some(t) => {
                return Err(self.err(
                    t.span(),
                    "cluster.target",
                    format!("not an iSCSI name: {:?}", t.get_ref()),
                ))
            }
        };
        let gateway_id = match &c.gateway_id {
            None => host_name(),
            Some(g) if !g.get_ref().is_empty() && g.get_ref().len() <= 255 => g.get_ref().clone(),
            Some(g) => return Err(self.err(g.span(), "cluster.gateway_id", "1 to 255 characters")),
        };
        let forward = match &c.forward {
            None => None,
            Some(f) => Some(f.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.err(
                    f.span(),
                    "cluster.forward",
                    format!("not an address host:port: {:?}", f.get_ref()),
                )
            })?),
        };
        let weight = match &c.weight {
            None => 1,
            Some(w) if (0..=1_000_000).contains(w.get_ref()) => *w.get_ref() as u32,
            Some(w) => {
                return Err(self.err(
                    w.span(),
                    "cluster.weight",
                    format!("must be between 0 and 1000000 (got {})", w.get_ref()),
                ))
            }
        };
        let volume_targets = c.volume_targets.unwrap_or(false);
        let redirect = match &c.redirect {
            Some(r) if *r.get_ref() && !volume_targets => {
                return Err(self.err(
                    r.span(),
                    "cluster.redirect",
                    "redirects logins to volumes' own targets: set volume_targets = true too",
                ))
            }
            r => r.as_ref().is_some_and(|r| *r.get_ref()),
        };
        Ok(Some(ClusterConfig {
            etcd,
            prefix,
            lease_ttl,
            target,
            gateway_id,
            forward,
            weight,
            volume_targets,
            redirect,
        }))
    }

    fn chap(&self, c: &Option<ChapFile>, key: &str) -> Result<Option<Chap>, ConfigError> {
        let Some(c) = c else { return Ok(None) };
        if c.user.get_ref().is_empty() {
            return Err(self.err(c.user.span(), format!("{key}.user"), "must not be empty"));
        }
        let len = c.secret.get_ref().len();
        if !(12..=255).contains(&len) {
            return Err(self.err(
                c.secret.span(),
                format!("{key}.secret"),
                format!(
                    "CHAP secrets must be 12 to 255 characters (RFC 7143 asks for at least \
                     96 bits); this one has {len}"
                ),
            ));
        }
        Ok(Some(Chap {
            user: c.user.get_ref().clone(),
            secret: c.secret.get_ref().clone(),
        }))
    }
}

/// Read and validate a configuration file.
pub fn load_gateway(path: &Path) -> Result<Config, ConfigError> {
    parse_gateway(path, &read(path)?)
}

/// The text of configuration file `path`.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.into(),
        line: 0,
        col: 0,
        key: String::new(),
        msg: format!("cannot read: {e}"),
    })
}

/// TOML text `src` of file `path` as a `T`; a syntax or type error names the line, the column
/// and the key (the text left of '=' on the offending line, when there is one).
fn from_toml<T: serde::de::DeserializeOwned>(path: &Path, src: &str) -> Result<T, ConfigError> {
    toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let (line, col) = line_col(src, span.start);
        let key = src
            .lines()
            .nth(line.saturating_sub(1))
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim().to_string())
            .unwrap_or_default();
        ConfigError {
            file: path.into(),
            line,
            col,
            key,
            msg: e.message().trim().to_string(),
        }
    })
}

/// Parse and validate configuration text (`path` is used in messages).
pub fn parse_gateway(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let cx = Ctx { file: path, src };
    let raw: ConfigFile = from_toml(path, src)?;
    let g = raw.gateway.clone().unwrap_or_else(|| {
        toml::from_str::<GatewayFile>("").expect("the empty gateway section has defaults")
    });
    let mut portals = Vec::new();
    for (i, p) in g.portals.iter().enumerate() {
        let a: SocketAddr = p.get_ref().parse().map_err(|_| {
            cx.err(
                p.span(),
                format!("gateway.portals[{i}]"),
                format!("not an address:port: {:?}", p.get_ref()),
            )
        })?;
        portals.push(a);
    }
    if portals.is_empty() {
        return Err(cx.err(0..0, "gateway.portals", "at least one portal is needed"));
    }
    let check_range = |v: &Spanned<u32>, key: &str, lo: u32, hi: u32| {
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) {
            Ok(n)
        } else {
            Err(cx.err(
                v.span(),
                key,
                format!("must be between {lo} and {hi} (got {n})"),
            ))
        }
    };
    let queue_depth = check_range(&g.queue_depth, "gateway.queue_depth", 1, 65536)?;
    let mrdsl = check_range(
        &g.max_recv_data_segment_length,
        "gateway.max_recv_data_segment_length",
        512,
        16_777_215,
    )?;
    let max_burst = check_range(
        &g.max_burst_length,
        "gateway.max_burst_length",
        512,
        16_777_215,
    )?;
    let first_burst = check_range(
        &g.first_burst_length,
        "gateway.first_burst_length",
        512,
        16_777_215,
    )?;
    let max_r2t = check_range(
        &g.max_outstanding_r2t,
        "gateway.max_outstanding_r2t",
        1,
        65535,
    )?;
    let mut targets: Vec<Target> = Vec::new();
    for (ti, t) in raw.target.iter().enumerate() {
        let key = format!("target[{ti}]");
        let iqn = t.iqn.get_ref().clone();
        if !valid_iscsi_name(&iqn) {
            return Err(cx.err(
                t.iqn.span(),
                format!("{key}.iqn"),
                format!("not an iSCSI name (iqn.YYYY-MM.domain:name, eui. or naa.): {iqn:?}"),
            ));
        }
        if targets.iter().any(|o| o.iqn.eq_ignore_ascii_case(&iqn)) {
            return Err(cx.err(t.iqn.span(), format!("{key}.iqn"), "duplicate target IQN"));
        }
        for (i, a) in t.advertise.iter().enumerate() {
            if a.get_ref()
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(cx.err(
                    a.span(),
                    format!("{key}.advertise[{i}]"),
                    "expected host:port",
                ));
            }
        }
        for (i, a) in t.allowed_initiators.iter().enumerate() {
            if !valid_iscsi_name(a.get_ref()) {
                return Err(cx.err(
                    a.span(),
                    format!("{key}.allowed_initiators[{i}]"),
                    format!("not an iSCSI name: {:?}", a.get_ref()),
                ));
            }
        }
        let chap = cx.chap(&t.chap, &format!("{key}.chap"))?;
        let mutual_chap = cx.chap(&t.mutual_chap, &format!("{key}.mutual_chap"))?;
        if let (Some(m), None) = (&t.mutual_chap, &chap) {
            return Err(cx.err(
                m.user.span(),
                format!("{key}.mutual_chap"),
                "mutual CHAP needs one-way CHAP (`chap`) too",
            ));
        }
        if let (Some(a), Some(b), Some(m)) = (&chap, &mutual_chap, &t.mutual_chap) {
            if a.secret == b.secret {
                return Err(cx.err(
                    m.secret.span(),
                    format!("{key}.mutual_chap.secret"),
                    "must differ from the one-way CHAP secret",
                ));
            }
        }
        let mut luns: Vec<Lun> = Vec::new();
        for (li, l) in t.lun.iter().enumerate() {
            let lkey = format!("{key}.lun[{li}]");
            let id = *l.id.get_ref();
            if id > 16383 {
                return Err(cx.err(l.id.span(), format!("{lkey}.id"), "LUNs go from 0 to 16383"));
            }
            if luns.iter().any(|o| o.id == id) {
                return Err(cx.err(l.id.span(), format!("{lkey}.id"), "duplicate LUN id"));
            }
            let backend = match l.backend.get_ref().as_str() {
                "file" => Backend::File,
                "mem" => Backend::Mem,
                "ec" => Backend::Ec,
                other => {
                    return Err(cx.err(
                        l.backend.span(),
                        format!("{lkey}.backend"),
                        format!("unknown backend {other:?} (this gateway has: file, mem, ec)"),
                    ))
                }
            };
            if backend != Backend::Ec {
                let stray = [
                    ("volume", l.volume.as_ref().map(Spanned::span)),
                    ("ec", l.ec.as_ref().map(Spanned::span)),
                    ("chunk", l.chunk.as_ref().map(Spanned::span)),
                    ("pgs", l.pgs.as_ref().map(Spanned::span)),
                    ("write_quorum", l.write_quorum.as_ref().map(Spanned::span)),
                ];
                if let Some((name, Some(span))) = stray.into_iter().find(|(_, sp)| sp.is_some()) {
                    return Err(cx.err(
                        span,
                        format!("{lkey}.{name}"),
                        "only ec LUNs take this key",
                    ));
                }
            }
            let bs = *l.block_size.get_ref();
            if bs != 512 && bs != 4096 {
                return Err(cx.err(
                    l.block_size.span(),
                    format!("{lkey}.block_size"),
                    format!("must be 512 or 4096 (got {bs})"),
                ));
            }
            let size = match &l.size {
                None => None,
                Some(s) => {
                    let n = match s.get_ref() {
                        SizeValue::Bytes(n) => *n,
                        SizeValue::Text(t) => parse_size(t)
                            .map_err(|m| cx.err(s.span(), format!("{lkey}.size"), m))?,
                    };
                    if n == 0 || n % bs as u64 != 0 {
                        return Err(cx.err(
                            s.span(),
                            format!("{lkey}.size"),
                            format!("must be a non-zero multiple of the block size {bs}"),
                        ));
                    }
                    Some(n)
                }
            };
            let path = l.path.as_ref().map(|p| PathBuf::from(p.get_ref()));
            match backend {
                Backend::File if path.is_none() => {
                    return Err(cx.err(
                        l.backend.span(),
                        format!("{lkey}.path"),
                        "the file backend needs a path",
                    ))
                }
                Backend::Mem | Backend::Ec if size.is_none() => {
                    return Err(cx.err(
                        l.backend.span(),
                        format!("{lkey}.size"),
                        format!("the {} backend needs a size", l.backend.get_ref()),
                    ))
                }
                _ => {}
            }
            let ec = if backend == Backend::Ec {
                Some(cx.ec_lun(l, &lkey, &iqn, id, raw.node.len())?)
            } else {
                None
            };
            let direct = match l.direct.get_ref().as_str() {
                "auto" => Direct::Auto,
                "on" => Direct::On,
                "off" => Direct::Off,
                other => {
                    return Err(cx.err(
                        l.direct.span(),
                        format!("{lkey}.direct"),
                        format!("must be auto, on or off (got {other:?})"),
                    ))
                }
            };
            let serial = l.serial.as_ref().map(|s| s.get_ref().clone());
            if let (Some(s), Some(sp)) = (&serial, &l.serial) {
                if s.is_empty() || s.len() > 64 || !s.bytes().all(|c| c.is_ascii_graphic()) {
                    return Err(cx.err(
                        sp.span(),
                        format!("{lkey}.serial"),
                        "1 to 64 printable ASCII characters",
                    ));
                }
            }
            luns.push(Lun {
                id,
                backend,
                path,
                size,
                block_size: bs,
                read_only: l.read_only,
                direct,
                serial,
                removable: l.removable,
                ec,
            });
        }
        targets.push(Target {
            iqn,
            alias: t.alias.clone(),
            portal_group_tag: t.portal_group_tag,
            advertise: t.advertise.iter().map(|a| a.get_ref().clone()).collect(),
            allowed_initiators: t
                .allowed_initiators
                .iter()
                .map(|a| a.get_ref().clone())
                .collect(),
            chap,
            mutual_chap,
            luns,
        });
    }
    let mut nodes: Vec<NodeRef> = Vec::new();
    for (i, n) in raw.node.iter().enumerate() {
        let key = format!("node[{i}]");
        let id = n.id.get_ref().clone();
        if id.is_empty() || id.len() > 255 {
            return Err(cx.err(n.id.span(), format!("{key}.id"), "1 to 255 characters"));
        }
        if nodes.iter().any(|o| o.id == id) {
            return Err(cx.err(n.id.span(), format!("{key}.id"), "duplicate node id"));
        }
        let address: SocketAddr = n.address.get_ref().parse().map_err(|_| {
            cx.err(
                n.address.span(),
                format!("{key}.address"),
                format!("not an address:port: {:?}", n.address.get_ref()),
            )
        })?;
        let weight = n.weight.as_ref().map_or(1.0, |w| *w.get_ref());
        if !(weight.is_finite() && weight >= 0.0) {
            let span = n.weight.as_ref().map_or(0..0, Spanned::span);
            return Err(cx.err(span, format!("{key}.weight"), "must be a number >= 0"));
        }
        nodes.push(NodeRef {
            id,
            address,
            zone: n.zone.clone(),
            rack: n.rack.clone(),
            host: n.host.clone(),
            weight,
        });
    }
    let discovery_chap = cx.chap(&raw.discovery.chap, "discovery.chap")?;
    let discovery_mutual_chap = cx.chap(&raw.discovery.mutual_chap, "discovery.mutual_chap")?;
    let cluster = cx.cluster(&raw.cluster)?;
    let write_quorum_wait_ms = match &g.write_quorum_wait_ms {
        None => tessera_volume::QUORUM_WAIT.as_millis() as u64,
        Some(w) if *w.get_ref() > MAX_QUORUM_WAIT_MS => {
            return Err(cx.err(
                w.span(),
                "gateway.write_quorum_wait_ms",
                format!(
                    "at most {MAX_QUORUM_WAIT_MS} (a forwarded write must be answered within the forwarding timeout)"
                ),
            ))
        }
        Some(w) => *w.get_ref(),
    };
    Ok(Config {
        file: path.into(),
        portals,
        state_dir: g.state_dir.as_ref().map(|s| PathBuf::from(s.get_ref())),
        metrics: cx.addr(&g.metrics, "gateway.metrics")?,
        workers: g.workers,
        queue_depth,
        nop_interval_secs: g.nop_interval_secs,
        nop_timeout_secs: g.nop_timeout_secs.max(1),
        max_recv_data_segment_length: mrdsl,
        max_burst_length: max_burst,
        first_burst_length: first_burst,
        max_outstanding_r2t: max_r2t,
        immediate_data: g.immediate_data,
        initial_r2t: g.initial_r2t,
        digests: g.digests,
        discovery_chap,
        discovery_mutual_chap,
        targets,
        nodes,
        node_timeout_ms: g.node_timeout_ms.max(1),
        write_quorum_wait_ms,
        cluster,
    })
}

/// `[node]` of a storage node's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's id: stable for the life of its store.
    pub id: Spanned<String>,
    /// Where the fragment protocol listens (`host:port`).
    pub listen: Spanned<String>,
    /// The store: a file (created sparse) or a block device.
    pub data: Spanned<String>,
    /// Bytes the store may use on a file (default: unlimited).
    pub capacity: Option<Spanned<SizeValue>>,
    /// `batched` (writes then one shared fdatasync) or `dsync` (O_DSYNC writes).
    #[serde(default = "batched")]
    pub sync: Spanned<String>,
    /// Background scrub speed in bytes a second (0: off).
    pub scrub_rate: Option<Spanned<SizeValue>>,
    /// Seconds between background scrubs.
    #[serde(default = "day")]
    pub scrub_interval_secs: u64,
    /// Where `/metrics` (Prometheus) is served (`host:port`; none: not served).
    pub metrics: Option<Spanned<String>>,
    /// Failure-domain labels (for operators; gateways take theirs from `[[node]]`).
    #[serde(default)]
    pub zone: String,
    /// Rack label.
    #[serde(default)]
    pub rack: String,
    /// Host label.
    #[serde(default)]
    pub host: String,
}

fn batched() -> Spanned<String> {
    Spanned::new(0..0, "batched".into())
}
fn day() -> u64 {
    86400
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFileTop {
    node: NodeSection,
    cluster: Option<ClusterFile>,
}

/// A validated storage-node configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node id.
    pub id: String,
    /// Listen address.
    pub listen: SocketAddr,
    /// Store path.
    pub data: PathBuf,
    /// Capacity in bytes (0: unlimited).
    pub capacity: u64,
    /// O_DSYNC writes instead of batched fdatasync.
    pub dsync: bool,
    /// Background scrub rate (bytes a second, 0: off).
    pub scrub_rate: u64,
    /// Seconds between background scrubs.
    pub scrub_interval_secs: u64,
    /// Where `/metrics` is served.
    pub metrics: Option<SocketAddr>,
    /// Failure-domain labels.
    pub zone: String,
    /// Rack label.
    pub rack: String,
    /// Host label (default: the machine's host name).
    pub host: String,
    /// The etcd control plane to register with.
    pub cluster: Option<ClusterConfig>,
}

impl NodeConfig {
    /// Read and validate a node configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, &read(path)?)
    }

    /// Parse and validate node configuration text.
    pub fn parse(path: &Path, src: &str) -> Result<Self, ConfigError> {
        let cx = Ctx { file: path, src };
        let raw: NodeFileTop = from_toml(path, src)?;
        let n = raw.node;
        let size = |v: &Option<Spanned<SizeValue>>, key: &str| -> Result<u64, ConfigError> {
            match v {
                None => Ok(0),
                Some(s) => match s.get_ref() {
                    SizeValue::Bytes(b) => Ok(*b),
                    SizeValue::Text(t) => parse_size(t).map_err(|m| cx.err(s.span(), key, m)),
                },
            }
        };
        let id = n.id.get_ref().clone();
        if id.is_empty() || id.len() > 255 {
            return Err(cx.err(n.id.span(), "node.id", "1 to 255 characters"));
        }
        let listen: SocketAddr = n.listen.get_ref().parse().map_err(|_| {
            cx.err(
                n.listen.span(),
                "node.listen",
                format!("not an address:port: {:?}", n.listen.get_ref()),
            )
        })?;
        if n.data.get_ref().is_empty() {
            return Err(cx.err(n.data.span(), "node.data", "a file or block device path"));
        }
        let dsync = match n.sync.get_ref().as_str() {
            "batched" => false,
            "dsync" => true,
            other => {
                return Err(cx.err(
                    n.sync.span(),
                    "node.sync",
                    format!("must be batched or dsync (got {other:?})"),
                ))
            }
        };
        Ok(Self {
            id,
            listen,
            data: PathBuf::from(n.data.get_ref()),
            capacity: size(&n.capacity, "node.capacity")?,
            dsync,
            scrub_rate: size(&n.scrub_rate, "node.scrub_rate")?,
            scrub_interval_secs: n.scrub_interval_secs.max(1),
            metrics: cx.addr(&n.metrics, "node.metrics")?,
            zone: n.zone.clone(),
            rack: n.rack.clone(),
            host: if n.host.is_empty() {
                host_name()
            } else {
                n.host.clone()
            },
            cluster: cx.cluster(&raw.cluster)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        parse_gateway(Path::new("t.toml"), s)
    }

    #[test]
    fn cluster_tables_are_checked_with_file_line_and_key() {
        let base = "[gateway]\nportals = [\"127.0.0.1:3260\"]\n";
        let c = parse(&format!(
            "{base}[cluster]\netcd = [\"http://127.0.0.1:2379\"]\ngateway_id = \"gw-9\"\n"
        ))
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(
            (
                cl.prefix.as_str(),
                cl.lease_ttl,
                cl.gateway_id.as_str(),
                cl.target.as_str()
            ),
            ("/tessera", 10, "gw-9", CLUSTER_TARGET)
        );
        assert!(
            !cl.volume_targets && !cl.redirect,
            "both off unless asked for"
        );
        let c = parse(&format!(
            "{base}[cluster]\netcd = [\"http://a:1\"]\nvolume_targets = true\nredirect = true\n"
        ))
        .unwrap();
        let cl = c.cluster.unwrap();
        assert!(cl.volume_targets && cl.redirect);
        for (table, key, line) in [
            ("etcd = [\"127.0.0.1:2379\"]", "cluster.etcd[0]", 4),
            ("etcd = []", "cluster.etcd", 0),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"tessera/\"",
                "cluster.prefix",
                5,
            ),
            (
                "etcd = [\"http://a:1\"]\nlease_ttl_secs = 1",
                "cluster.lease_ttl_secs",
                5,
            ),
            (
                "etcd = [\"http://a:1\"]\ntarget = \"not an iqn\"",
                "cluster.target",
                5,
            ),
            (
                "etcd = [\"http://a:1\"]\nredirect = true",
                "cluster.redirect",
                5,
            ),
        ] {
            let e = parse(&format!("{base}[cluster]\n{table}\n")).unwrap_err();
            assert_eq!((e.key.as_str(), e.line), (key, line), "{e}");
        }
        let e = parse(&format!(
            "{base}[cluster]\netcd = [\"http://a:1\"]\nbogus = 1\n"
        ))
        .unwrap_err();
        assert!(e.msg.contains("bogus"), "{e}");
        // Nodes take the same table.
        let n = NodeConfig::parse(
            Path::new("n.toml"),
            "[node]\nid = \"n1\"\nlisten = \"127.0.0.1:7000\"\ndata = \"/tmp/n1\"\nhost = \"h1\"\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n",
        )
        .unwrap();
        assert_eq!(n.host, "h1");
        assert_eq!(
            n.cluster.unwrap().etcd,
            vec!["http://127.0.0.1:2379".to_string()]
        );
    }

    const GOOD: &str = r#"
[gateway]
portals = ["127.0.0.1:3260"]

[[target]]
iqn = "iqn.2024-01.io.tessera:disk1"
chap = { user = "alice", secret = "0123456789abcdef" }

[[target.lun]]
id = 0
backend = "mem"
size = "64MiB"
block_size = 4096
"#;

    #[test]
    fn parses_a_good_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.portals, vec!["127.0.0.1:3260".parse().unwrap()]);
        assert_eq!(c.targets[0].luns[0].size, Some(64 << 20));
        assert_eq!(c.targets[0].luns[0].block_size, 4096);
        assert_eq!(c.targets[0].chap.as_ref().unwrap().user, "alice");
        assert_eq!(c.queue_depth, 128);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let bad = GOOD.replace("block_size = 4096", "block_size = 1000");
        let e = parse(&bad).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (13, "target[0].lun[0].block_size")
        );
        assert_eq!(
            e.to_string(),
            "t.toml:13:14: key `target[0].lun[0].block_size`: must be 512 or 4096 (got 1000)"
        );
        let unknown = GOOD.replace("block_size = 4096", "blocksize = 4096");
        let e = parse(&unknown).unwrap_err();
        assert_eq!(e.line, 13);
        assert_eq!(e.key, "blocksize");
        assert!(e.msg.contains("unknown field `blocksize`"), "{}", e.msg);
        let short = GOOD.replace("0123456789abcdef", "short");
        let e = parse(&short).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "target[0].chap.secret"));
        let iqn = GOOD.replace("iqn.2024-01.io.tessera:disk1", "disk1");
        assert_eq!(parse(&iqn).unwrap_err().key, "target[0].iqn");
        let syntax = GOOD.replace("id = 0", "id = ");
        let e = parse(&syntax).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (10, "id"));
        let wait = GOOD.replace(
            "portals = [\"127.0.0.1:3260\"]",
            "portals = [\"127.0.0.1:3260\"]\nwrite_quorum_wait_ms = 60000",
        );
        let e = parse(&wait).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (4, "gateway.write_quorum_wait_ms")
        );
        assert!(e.msg.contains("at most 12000"), "{}", e.msg);
        let wait = wait.replace("60000", "2500");
        assert_eq!(parse(&wait).unwrap().write_quorum_wait_ms, 2500);
        assert_eq!(
            parse(GOOD).unwrap().write_quorum_wait_ms,
            tessera_volume::QUORUM_WAIT.as_millis() as u64
        );
    }

    const EC: &str = r#"
[gateway]
portals = ["127.0.0.1:3260"]

[[node]]
id = "n1"
address = "127.0.0.1:7101"
[[node]]
id = "n2"
address = "127.0.0.1:7102"
[[node]]
id = "n3"
address = "127.0.0.1:7103"
zone = "b"

[[target]]
iqn = "iqn.2024-01.io.tessera:ec"

[[target.lun]]
id = 0
backend = "ec"
size = "1GiB"
ec = "2+1"
chunk = "4KiB"
"#;

    #[test]
    fn ec_luns_and_nodes() {
        let c = parse(EC).unwrap();
        let ec = c.targets[0].luns[0].ec.as_ref().unwrap();
        assert_eq!(
            (ec.profile.k, ec.profile.m, ec.profile.chunk_size),
            (2, 1, 4096)
        );
        assert_eq!((ec.pgs, ec.write_quorum), (64, 3));
        assert_eq!(ec.volume, "iqn.2024-01.io.tessera:ec/lun0");
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.nodes[2].zone, "b");
        let e = parse(&EC.replace("ec = \"2+1\"", "ec = \"4+2\"")).unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].ec");
        assert!(e.msg.contains("needs 6 storage nodes"), "{}", e.msg);
        let e = parse(&EC.replace("chunk = \"4KiB\"", "chunk = \"3KiB\"")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (24, "target[0].lun[0].chunk"));
        let e = parse(&EC.replace("ec = \"2+1\"", "ec = \"2x1\"")).unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].ec");
        let e = parse(&EC.replace("address = \"127.0.0.1:7102\"", "address = \"nowhere\""))
            .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (10, "node[1].address"));
        let e = parse(&EC.replace("id = \"n2\"", "id = \"n1\"")).unwrap_err();
        assert_eq!(e.key, "node[1].id");
        let e =
            parse(&GOOD.replace("block_size = 4096", "block_size = 4096\npgs = 8")).unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].pgs");
        assert!(e.msg.contains("only ec LUNs"));
    }

    #[test]
    fn node_files() {
        let good = "[node]\nid = \"n1\"\nlisten = \"127.0.0.1:7101\"\ndata = \"/tmp/n1\"\ncapacity = \"10GiB\"\nscrub_rate = \"8MiB\"\n";
        let n = NodeConfig::parse(Path::new("n.toml"), good).unwrap();
        assert_eq!(
            (n.capacity, n.scrub_rate, n.dsync),
            (10 << 30, 8 << 20, false)
        );
        let e = NodeConfig::parse(Path::new("n.toml"), &good.replace("127.0.0.1:7101", "x"))
            .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "node.listen"));
        let e = NodeConfig::parse(
            Path::new("n.toml"),
            &format!("{good}sync = \"sometimes\"\n"),
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "node.sync"));
        let e = NodeConfig::parse(Path::new("n.toml"), &format!("{good}colour = 1\n")).unwrap_err();
        assert_eq!(e.key, "colour");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert!(parse_size("1x").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn iscsi_names() {
        assert!(valid_iscsi_name("iqn.2024-01.io.tessera:disk1"));
        assert!(valid_iscsi_name("eui.02004567A425678D"));
        assert!(valid_iscsi_name("naa.52004567BA64678D"));
        assert!(!valid_iscsi_name("iqn.24-01.x"));
        assert!(!valid_iscsi_name("iqn.2024-01.io tessera"));
        assert!(!valid_iscsi_name(""));
    }

    #[test]
    fn mutual_chap_rules() {
        let m = GOOD.replace(
            "chap = { user = \"alice\", secret = \"0123456789abcdef\" }",
            "chap = { user = \"alice\", secret = \"0123456789abcdef\" }\n\
             mutual_chap = { user = \"tgt\", secret = \"0123456789abcdef\" }",
        );
        assert_eq!(parse(&m).unwrap_err().key, "target[0].mutual_chap.secret");
    }
}
