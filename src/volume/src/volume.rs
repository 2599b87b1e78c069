//! The erasure-coded volume: a [`BlockDevice`] whose bytes are Reed-Solomon stripes on storage
//! nodes. The commit protocol and what recovery does are described in `COMMIT.md` beside this
//! crate; the code follows it step by step.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use tessera_ec::{placement, Codec, Geometry, Profile, StripeSpan};
use tessera_proto::block::{
    BlockDevice, BlockError, BlockFuture, DeviceInfo, Extent, LocalBoxFuture,
};
use tessera_proto::segments::Segments;
use tessera_rpc::{
    CallError, FragKey, Manifest, ReadItem, Request, Response, SlotInfo, Status, VolumeCtx, Want,
    WriteItem,
};
use tessera_uring::AlignedBuf;
use tracing::{debug, error, info, warn};

use crate::fault;
use crate::locks::StripeLocks;
use crate::nodes::{self, Connector};

/// Name of the per-volume record holding the write-intent (dirty region) set.
pub const BLOB_INTENT: u8 = 1;

/// What a volume is.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Volume id (stable; the nodes key fragments by it).
    pub id: u64,
    /// Name, for logs.
    pub name: String,
    /// Size in bytes (a multiple of the block size).
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Erasure-code profile.
    pub profile: Profile,
    /// Placement groups.
    pub pgs: u32,
    /// Fragments durable before a write is acknowledged (k + 1 by default, never below k).
    pub write_quorum: usize,
    /// Stripes per region of the write-intent log.
    pub region_stripes: u64,
    /// How long after its last write a region leaves the intent log.
    pub clear_after: Duration,
    /// For each PG, the node (index into the connector's list) of each fragment index.
    pub map: Vec<Vec<usize>>,
    /// Node names, for logs (index as in `map`).
    pub node_names: Vec<String>,
    /// The fencing epoch the control plane granted this owner (etcd raises it at every
    /// takeover). `None`: without a control plane, one above every epoch the nodes have seen.
    pub epoch: Option<u64>,
}

/// Why a volume could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Too few nodes answered to read the volume.
    #[error("volume {name}: only {reachable} of {total} nodes reachable, {need} needed")]
    TooFewNodes {
        /// Volume name.
        name: String,
        /// Nodes that answered.
        reachable: usize,
        /// Nodes in the volume.
        total: usize,
        /// At least `k`.
        need: usize,
    },
    /// The spec is inconsistent.
    #[error("volume {0}: {1}")]
    Spec(String, String),
    /// A node has seen a newer epoch than the one granted: another gateway took over since.
    #[error("volume {name}: granted epoch {granted}, but a node has seen epoch {seen}: another gateway owns it now")]
    Stale {
        /// Volume name.
        name: String,
        /// The epoch this owner was granted.
        granted: u64,
        /// The newest a node has seen.
        seen: u64,
    },
}

/// Counters of one volume.
#[derive(Debug, Default)]
pub struct VolumeStats {
    /// Reads that had to reconstruct a fragment.
    pub degraded_reads: AtomicU64,
    /// Fragments rewritten by repair or recovery.
    pub repaired_fragments: AtomicU64,
    /// Fragments that failed their checksum on a node.
    pub checksum_errors: AtomicU64,
    /// Stripes whose interrupted write was completed.
    pub rolled_forward: AtomicU64,
    /// Stripes whose interrupted write was undone.
    pub rolled_back: AtomicU64,
    /// Writes acknowledged with fewer than all fragments.
    pub degraded_writes: AtomicU64,
    /// Writes that waited for their quorum longer than the volume's bound
    /// ([`EcVolume::set_quorum_wait`]) and failed as suspended.
    pub suspended_writes: AtomicU64,
    /// Fragments deleted from nodes that a position left ([`EcVolume::trim_position`]).
    pub trimmed_fragments: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Regions whose intent is durable on the nodes.
    dirty: BTreeSet<u64>,
    /// Regions waiting to be added.
    want_dirty: BTreeSet<u64>,
    /// Writes in flight per region.
    inflight: HashMap<u64, usize>,
    /// When a region was last written.
    last_write: HashMap<u64, Instant>,
    /// Per node: regions where it may lack writes or hold undone ones.
    stale: Vec<BTreeSet<u64>>,
    /// Stripes whose last write did not reach its quorum: resolved before the next access.
    suspect: HashSet<u64>,
    /// Regions dirty at open, not yet checked stripe by stripe.
    resync: BTreeSet<u64>,
    /// Stripes of `resync` regions already resolved.
    resolved: HashSet<u64>,
    /// Stripes with a damaged or missing fragment to rewrite.
    repair: BTreeSet<u64>,
    /// Why the volume no longer writes (a newer epoch exists).
    fenced: Option<String>,
    /// The settled state of recently written stripes whose every fragment took the write:
    /// lets a partial write update parity by its delta without reading it first. Dropped
    /// for a stripe as soon as anything is sent to its fragments.
    manifests: HashMap<u64, Manifest>,
}

/// Most stripes whose state [`State::manifests`] keeps (about 64 bytes each).
const MANIFEST_CACHE: usize = 1 << 20;

struct Shared {
    spec: VolumeSpec,
    geo: Geometry,
    codec: Codec,
    epoch: u64,
    next_version: AtomicU64,
    connector: Arc<dyn Connector>,
    instance: u64,
    locks: StripeLocks,
    state: Mutex<State>,
    intent_seq: AtomicU64,
    intent_lock: tokio::sync::Mutex<()>,
    /// Per node: how it has been answering (see [`NodeHealth`]).
    health: Vec<NodeHealth>,
    t0: Instant,
    stats: VolumeStats,
    closed: AtomicBool,
    /// Whether the last maintenance round left stale, unchecked or damaged stripes behind.
    unwhole: AtomicBool,
    /// Bytes: the spec's size, or more after [`EcVolume::grow`].
    size: AtomicU64,
    /// Where fragments live now: the spec's map, or a later one (see [`EcVolume::remap`]).
    layout: RwLock<Arc<Layout>>,
    /// Stripes below this are filled on every position of [`Layout::filling`].
    fill_cursor: AtomicU64,
    /// Bytes per second a fill may write (0: unlimited).
    fill_rate: AtomicU64,
    /// The fill in progress or last finished.
    fill: Mutex<Fill>,
    /// Operations started and not finished (see [`EcVolume::running`]).
    running: Arc<AtomicU64>,
    /// Repeated warnings, rate-limited.
    warned: Limiter,
    /// Milliseconds a write that cannot reach its quorum waits for it (see
    /// [`EcVolume::set_quorum_wait`]).
    quorum_wait_ms: AtomicU64,
    /// PGs write-suspended when last looked at (see [`EcVolume::write_suspended`]): the
    /// state change is logged once.
    suspended_pgs: Mutex<usize>,
}

/// Lets a repeated warning through at most once per [`Limiter::EVERY`], with the count of
/// those held back since (`repeated`).
#[derive(Default)]
struct Limiter {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Limiter {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(held back since the last one)` when the warning `key` may be logged now.
    fn allow(&self, key: &'static str) -> Option<u64> {
        let mut m = self.last.lock().expect("limiter poisoned");
        let now = Instant::now();
        match m.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                *at = now;
                *held = 0;
                Some(n)
            }
            None => {
                m.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Where a volume's fragments live.
#[derive(Debug, Clone)]
struct Layout {
    /// For each PG, the node (connector index) of each fragment index.
    map: Vec<Vec<usize>>,
    /// Node names by connector index, for logs.
    names: Vec<String>,
    /// PG → the fragment positions whose node is new to them and still being filled: for a
    /// stripe at or past the fill cursor that node may lack the fragment, so it is treated as
    /// behind (reads reconstruct, it does not count toward a quorum it did not take, and a
    /// missing copy there is no evidence that a write was not acknowledged).
    filling: HashMap<u32, Vec<usize>>,
}

/// The most nodes a volume's connector may name.
pub const MAX_NODES: usize = 1024;

/// Stripes a fill checks per step.
const FILL_BATCH: u64 = 64;

#[derive(Debug)]
struct Fill {
    /// The caller's name for the layout being filled (the control plane's map epoch).
    generation: u64,
    /// Bytes written by this fill.
    bytes: u64,
    /// When it began (or resumed).
    started: Instant,
    /// The rate limit holds the next step until then.
    next_at: Instant,
    /// Whether it finished.
    finished: bool,
    /// Whether the new nodes have been told the volume's epoch.
    epoch_told: bool,
    /// Whether any fill was ever asked for.
    active: bool,
}

/// What a volume has to mend, at a glance (for metrics and status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// PGs with a position on a node that may lack writes (it missed some while away).
    pub degraded_pgs: usize,
    /// PGs with a position being filled onto a node new to it.
    pub rebuilding_pgs: usize,
    /// Nodes that may lack writes.
    pub stale_nodes: usize,
    /// Stripes with a damaged or missing fragment waiting to be rewritten.
    pub repair_stripes: usize,
    /// PGs that cannot take writes: fewer of their positions than the write quorum are on
    /// nodes that answer (see [`EcVolume::write_suspended`]).
    pub write_suspended_pgs: usize,
}

/// How a volume sees one of its nodes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeCondition {
    /// Answering.
    Up,
    /// A read of it missed its hedge delay less than a second ago and it has not answered
    /// since: reads go around it.
    Slow,
    /// Unreachable, or a call went unanswered too long: nothing waits for it until it answers
    /// a probe.
    Down,
}

/// How far a fill (a rebuild onto replacement nodes, or a rebalance) has come.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillProgress {
    /// The generation given to [`EcVolume::remap`] or [`EcVolume::resume_fill`].
    pub generation: u64,
    /// Stripes in the volume.
    pub stripes: u64,
    /// Stripes checked and filled.
    pub done: u64,
    /// Bytes written to the new nodes.
    pub bytes: u64,
    /// Average bytes per second since the fill began.
    pub rate: f64,
    /// Seconds left at that rate (`None` before anything was written).
    pub eta_secs: Option<f64>,
    /// Whether every moved position is filled.
    pub finished: bool,
}

/// An erasure-coded volume. Cheap to clone; shared by every core.
#[derive(Clone)]
pub struct EcVolume {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for EcVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EcVolume({} {} epoch {})",
            self.sh.spec.name, self.sh.spec.profile, self.sh.epoch
        )
    }
}

static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// How a volume sees one node. A node is *down* once a call to it found it unreachable or
/// went unanswered past [`EcVolume::hang_after`]: from then on nothing waits for it (calls to it
/// fail at once, reads go around it, writes leave it behind) until it answers a probe, which
/// the volume sends every [`PROBE_EVERY`] while it is down. A node is *slow* for [`SLOW_FOR`]
/// after a read of it missed its hedge delay, unless an answer comes from it sooner: reads and
/// read-modify-writes go around it, writes still go to it.
#[derive(Default)]
struct NodeHealth {
    /// Whether the node is down.
    down: AtomicBool,
    /// When (ms since `t0`) the next probe of a down node may start.
    probe_at: AtomicU64,
    /// Smoothed time to answer, in microseconds (0: no answer yet).
    lat_us: AtomicU64,
    /// The same, of small reads only (at most [`SMALL_READ`] bytes): what hedging compares.
    read_lat_us: AtomicU64,
    /// Until when (ms since `t0`) the node counts as slow.
    slow_until: AtomicU64,
}

/// The shortest time a call may go unanswered before its node is marked down.
const HANG_MIN: Duration = Duration::from_millis(1000);
/// A call unanswered for this many times its node's smoothed answer time marks it down (when
/// that is longer than [`HANG_MIN`]).
const HANG_FACTOR: u64 = 16;
/// A read not answered within this many times its node's smoothed answer time is served
/// around the node (within [`HEDGE_MIN`] ..= [`HEDGE_MAX`]).
const HEDGE_FACTOR: u64 = 4;
/// See [`HEDGE_FACTOR`].
const HEDGE_MIN: Duration = Duration::from_millis(2);
/// See [`HEDGE_FACTOR`].
const HEDGE_MAX: Duration = Duration::from_millis(100);
/// Reads of at most this many bytes from one node are hedged (larger ones take longer for
/// their size, and reconstructing them costs more than waiting).
const SMALL_READ: u64 = 64 << 10;
/// How long reads go around a node that missed a hedge delay (unless it answers sooner): then
/// they try it again, so a node that was only briefly slow is read again, and damage on it is
/// found.
const SLOW_FOR: Duration = Duration::from_millis(1000);
/// How often a down node is probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a write that cannot reach its write quorum waits for it by default (see
/// [`EcVolume::set_quorum_wait`]).
pub const QUORUM_WAIT: Duration = Duration::from_secs(10);

/// How often a write waiting for its quorum tries again.
const QUORUM_RETRY: Duration = Duration::from_millis(200);

/// How long to wait for the answers of a batch of reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// For every answer.
    All,
    /// Until the hedge delay, and past it until at least `answered` items are answered and at
    /// most `unanswered` are not (items of down nodes, which are not asked, count as
    /// unanswered); the rest count as unavailable (their nodes are marked slow).
    Hedged {
        /// Answers needed to stop waiting.
        answered: usize,
        /// Items that may be left unanswered.
        unanswered: usize,
    },
}
/// The default for [`VolumeSpec::clear_after`].
pub const CLEAR_AFTER: Duration = Duration::from_secs(2);

/// What became of one swap.
#[derive(Debug, Clone)]
enum Swapped {
    /// Written; the bytes it replaced.
    Old(Bytes),
    /// The node answered that it did not write it (its newest copy is not the base, or the
    /// replaced blocks were damaged).
    Refused,
    /// No usable answer: it may or may not have been written.
    Unknown,
}

/// One fragment as read.
#[derive(Debug, Clone)]
enum Got {
    /// Data of the requested range, and the copy's manifest.
    Data(Bytes, Manifest),
    /// The copy is zeroes.
    Zero(Manifest),
    /// The node holds no such fragment (or version).
    Missing,
    /// Damaged (checksum) on the node.
    Corrupt,
    /// The node did not answer, or is not to be trusted for this stripe.
    Unavailable,
}

impl Got {
    fn manifest(&self) -> Option<&Manifest> {
        match self {
            Got::Data(_, m) | Got::Zero(m) => Some(m),
            _ => None,
        }
    }
}

fn encode_regions(set: &BTreeSet<u64>) -> Bytes {
    let mut b = BytesMut::with_capacity(set.len() * 8);
    for r in set {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b.freeze()
}

fn decode_regions(b: &[u8]) -> BTreeSet<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Whether `b` is all zeroes, 64 bytes at a time (vectorized), stopping at the first block
/// that is not.
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for c in &mut blocks {
        let acc = c.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_le_bytes(w.try_into().expect("8 bytes"))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

impl EcVolume {
    /// Open a volume: take a new fencing epoch on its nodes, load its write-intent log, and
    /// queue every region that was dirty for a check. Must run inside a `LocalSet`.
    pub async fn open(spec: VolumeSpec, connector: Arc<dyn Connector>) -> Result<Self, OpenError> {
        let p = spec.profile;
        let width = p.width();
        if spec.map.len() != spec.pgs as usize || spec.map.iter().any(|r| r.len() != width) {
            return Err(OpenError::Spec(
                spec.name.clone(),
                "the PG map does not match the PG count and stripe width".into(),
            ));
        }
        let q = spec.write_quorum;
        if q < usize::from(p.k) || q > width {
            return Err(OpenError::Spec(
                spec.name.clone(),
                format!("write quorum {q} outside k ({}) ..= k + m ({width})", p.k),
            ));
        }
        let codec =
            Codec::new(&p).map_err(|e| OpenError::Spec(spec.name.clone(), e.to_string()))?;
        let n = connector.nodes();
        if n > MAX_NODES || spec.map.iter().flatten().any(|&i| i >= n) {
            return Err(OpenError::Spec(
                spec.name.clone(),
                format!(
                    "the PG map names nodes the connector lacks (it has {n}, at most {MAX_NODES})"
                ),
            ));
        }
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        // (Every call of the open waits at most HANG_MIN: a node that does not answer is
        // unreachable for it.)
        // 1. A fencing epoch above every node's.
        let ask = (0..n).map(|i| {
            let io = nodes::handle(instance, &*connector, i);
            let req = Request::Epoch {
                volume: spec.id,
                epoch: 0,
            };
            async move { io.call_within(req, HANG_MIN).await }
        });
        let answers = join_all(ask).await;
        let mut reachable = 0;
        let mut max = 0;
        for a in &answers {
            if let Ok(Response::Epoch(e)) = a {
                reachable += 1;
                max = max.max(*e);
            }
        }
        if reachable < usize::from(p.k) {
            return Err(OpenError::TooFewNodes {
                name: spec.name.clone(),
                reachable,
                total: n,
                need: usize::from(p.k),
            });
        }
        let epoch = match spec.epoch {
            None => max + 1,
            Some(granted) if granted >= max => granted,
            Some(granted) => {
                return Err(OpenError::Stale {
                    name: spec.name.clone(),
                    granted,
                    seen: max,
                })
            }
        };
        // (Nodes that did not answer are not asked again: they are unreachable for this open.)
        let answered: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        let raise = (0..n).map(|i| {
            let io = nodes::handle(instance, &*connector, i);
            let req = Request::Epoch {
                volume: spec.id,
                epoch,
            };
            let ask = answered[i];
            async move {
                if ask {
                    io.call_within(req, HANG_MIN).await
                } else {
                    Err(CallError::Timeout(std::net::SocketAddr::from((
                        [0, 0, 0, 0],
                        0,
                    ))))
                }
            }
        });
        let raised: Vec<bool> = join_all(raise)
            .await
            .into_iter()
            .map(|r| matches!(r, Ok(Response::Epoch(e)) if e == epoch))
            .collect();
        // 2. The intent log: the newest copy any node has.
        let fetch = (0..n).map(|i| {
            let io = nodes::handle(instance, &*connector, i);
            let req = Request::GetBlob {
                volume: spec.id,
                name: BLOB_INTENT,
            };
            let ask = raised[i];
            async move {
                if ask {
                    io.call_within(req, HANG_MIN).await
                } else {
                    Err(CallError::Timeout(std::net::SocketAddr::from((
                        [0, 0, 0, 0],
                        0,
                    ))))
                }
            }
        });
        let mut seq = 0;
        let mut dirty = BTreeSet::new();
        for r in join_all(fetch).await.into_iter().flatten() {
            if let Response::GetBlob { seq: s, data } = r {
                if s > seq {
                    seq = s;
                    dirty = decode_regions(&data);
                }
            }
        }
        let mut st = State {
            stale: vec![BTreeSet::new(); n],
            ..State::default()
        };
        // A node we could not reach may lack any write made to a dirty region (a node the
        // map does not use holds nothing this volume reads).
        let used: HashSet<usize> = spec.map.iter().flatten().copied().collect();
        for (i, ok) in raised.iter().enumerate() {
            if !ok && used.contains(&i) {
                st.stale[i] = dirty.clone();
            }
        }
        st.resync = dirty.clone();
        st.dirty = dirty;
        if !st.resync.is_empty() {
            info!(volume = %spec.name, regions = st.resync.len(), "regions to check after an unclean stop");
        }
        info!(
            volume = %spec.name,
            epoch,
            nodes_reachable = raised.iter().filter(|x| **x).count(),
            nodes = n,
            profile = %p,
            "volume open"
        );
        let geo = Geometry::new(p, spec.size);
        Ok(Self {
            sh: Arc::new(Shared {
                geo,
                codec,
                epoch,
                next_version: AtomicU64::new((epoch << 40) + 1),
                connector,
                instance,
                locks: StripeLocks::default(),
                state: Mutex::new(st),
                intent_seq: AtomicU64::new(seq + 1),
                intent_lock: tokio::sync::Mutex::new(()),
                health: (0..MAX_NODES).map(|_| NodeHealth::default()).collect(),
                t0: Instant::now(),
                stats: VolumeStats::default(),
                closed: AtomicBool::new(false),
                unwhole: AtomicBool::new(false),
                size: AtomicU64::new(spec.size),
                layout: RwLock::new(Arc::new(Layout {
                    map: spec.map.clone(),
                    names: spec.node_names.clone(),
                    filling: HashMap::new(),
                })),
                fill_cursor: AtomicU64::new(0),
                fill_rate: AtomicU64::new(0),
                fill: Mutex::new(Fill {
                    generation: 0,
                    bytes: 0,
                    started: Instant::now(),
                    next_at: Instant::now(),
                    finished: false,
                    epoch_told: false,
                    active: false,
                }),
                running: Arc::new(AtomicU64::new(0)),
                warned: Limiter::default(),
                quorum_wait_ms: AtomicU64::new(QUORUM_WAIT.as_millis() as u64),
                suspended_pgs: Mutex::new(0),
                spec,
            }),
        })
    }

    /// The fencing epoch this instance writes with.
    pub fn epoch(&self) -> u64 {
        self.sh.epoch
    }

    /// The spec.
    pub fn spec(&self) -> &VolumeSpec {
        &self.sh.spec
    }

    /// Counters.
    pub fn stats(&self) -> &VolumeStats {
        &self.sh.stats
    }

    /// Forget the calling thread's node handles (a thread that will not use the volume again,
    /// such as the one that opened it).
    pub fn release_thread(&self) {
        nodes::forget(self.sh.instance);
    }

    /// Stop the maintenance loop (see [`EcVolume::maintain`]) and forget this thread's node
    /// handles.
    pub fn close(&self) {
        self.sh.closed.store(true, Ordering::SeqCst);
        nodes::forget(self.sh.instance);
    }

    /// Whether work is pending: regions to check, stale nodes, repairs, or dirty regions.
    pub fn pending(&self) -> (usize, usize, usize, usize) {
        let st = self.sh.state.lock().expect("volume state poisoned");
        (
            st.resync.len(),
            st.stale.iter().filter(|s| !s.is_empty()).count(),
            st.repair.len(),
            st.dirty.len(),
        )
    }

    /// What the volume has to mend now.
    pub fn health(&self) -> Health {
        let l = self.layout();
        let st = self.sh.state.lock().expect("volume state poisoned");
        let stale: Vec<bool> = st.stale.iter().map(|s| !s.is_empty()).collect();
        let degraded_pgs = l
            .map
            .iter()
            .filter(|row| row.iter().any(|&n| stale.get(n).copied().unwrap_or(false)))
            .count();
        Health {
            degraded_pgs,
            rebuilding_pgs: l.filling.values().filter(|p| !p.is_empty()).count(),
            stale_nodes: stale.iter().filter(|&&s| s).count(),
            repair_stripes: st.repair.len(),
            write_suspended_pgs: self.count_suspended(&l),
        }
    }

    /// How long a write that cannot reach its write quorum (too few of its nodes answer)
    /// waits for it, trying again as nodes come back or positions move, before it fails
    /// with [`BlockError::Suspended`] (default [`QUORUM_WAIT`]; zero: it fails at once).
    pub fn set_quorum_wait(&self, wait: Duration) {
        self.sh
            .quorum_wait_ms
            .store(wait.as_millis() as u64, Ordering::Relaxed);
    }

    fn quorum_wait(&self) -> Duration {
        Duration::from_millis(self.sh.quorum_wait_ms.load(Ordering::Relaxed))
    }

    fn count_suspended(&self, l: &Layout) -> usize {
        let q = self.sh.spec.write_quorum;
        l.map
            .iter()
            .filter(|row| {
                row.iter()
                    .filter(|&&n| !self.sh.health[n].down.load(Ordering::Relaxed))
                    .count()
                    < q
            })
            .count()
    }

    /// The PGs that cannot take writes now, each with the names of its nodes that do not
    /// answer: fewer of its positions than the write quorum are on nodes that answer. A
    /// write to one waits for its quorum (see [`EcVolume::set_quorum_wait`]); reads go on
    /// while `k` positions answer.
    pub fn write_suspended(&self) -> Vec<(u32, Vec<String>)> {
        let l = self.layout();
        let q = self.sh.spec.write_quorum;
        let mut out = Vec::new();
        for (pg, row) in l.map.iter().enumerate() {
            let down: Vec<usize> = row
                .iter()
                .copied()
                .filter(|&n| self.sh.health[n].down.load(Ordering::Relaxed))
                .collect();
            if row.len() - down.len() < q {
                let mut names: Vec<String> = down
                    .iter()
                    .map(|&n| l.names.get(n).cloned().unwrap_or_else(|| format!("#{n}")))
                    .collect();
                names.sort();
                out.push((pg as u32, names));
            }
        }
        out
    }

    /// The names of the volume's nodes that are down (do not answer), sorted.
    pub fn unreachable_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .used_nodes()
            .into_iter()
            .filter(|&n| self.sh.health[n].down.load(Ordering::Relaxed))
            .map(|n| self.name_of(n))
            .collect();
        v.sort();
        v
    }

    /// Log a change between "every PG takes writes" and "some PGs are write-suspended",
    /// once (called where a node's condition or the layout changes).
    fn note_suspension(&self) {
        let l = self.layout();
        let now = self.count_suspended(&l);
        let mut was = self
            .sh
            .suspended_pgs
            .lock()
            .expect("volume suspension poisoned");
        if (*was == 0) != (now == 0) {
            if now > 0 {
                let down = self.unreachable_nodes();
                warn!(volume = %self.sh.spec.name, pgs = now, quorum = self.sh.spec.write_quorum, down = ?down, "writes suspended: PGs have fewer nodes answering than the write quorum; writes to them wait up to {:?}, then fail", self.quorum_wait());
            } else {
                info!(volume = %self.sh.spec.name, "writes resumed: every PG has its write quorum of nodes answering");
            }
        }
        *was = now;
    }

    fn ctx(&self) -> VolumeCtx {
        let p = self.sh.spec.profile;
        VolumeCtx {
            volume: self.sh.spec.id,
            epoch: self.sh.epoch,
            pgs: self.sh.spec.pgs,
            k: p.k,
            m: p.m,
            codec: p.codec.0,
            chunk: p.chunk_size,
        }
    }

    fn k(&self) -> usize {
        usize::from(self.sh.spec.profile.k)
    }

    fn width(&self) -> usize {
        self.sh.spec.profile.width()
    }

    fn chunk(&self) -> usize {
        self.sh.spec.profile.chunk_size as usize
    }

    fn region(&self, stripe: u64) -> u64 {
        stripe / self.sh.spec.region_stripes.max(1)
    }

    pub(crate) fn node_of(&self, stripe: u64, index: usize) -> usize {
        let l = self.sh.layout.read().expect("volume layout poisoned");
        l.map[placement::pg_of(stripe, self.sh.spec.pgs) as usize][index]
    }

    /// The nodes (connector indices) the map in force uses, ascending.
    pub fn used_nodes(&self) -> Vec<usize> {
        let l = self.sh.layout.read().expect("volume layout poisoned");
        let mut v: Vec<usize> = l.map.iter().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn layout(&self) -> Arc<Layout> {
        self.sh
            .layout
            .read()
            .expect("volume layout poisoned")
            .clone()
    }

    fn name_of(&self, node: usize) -> String {
        let l = self.sh.layout.read().expect("volume layout poisoned");
        l.names
            .get(node)
            .cloned()
            .unwrap_or_else(|| format!("#{node}"))
    }

    /// Whether position `index` of `stripe` is on a node still being filled there.
    fn filling_at(&self, stripe: u64, index: usize) -> bool {
        let l = self.sh.layout.read().expect("volume layout poisoned");
        if l.filling.is_empty() || stripe < self.sh.fill_cursor.load(Ordering::Acquire) {
            return false;
        }
        let pg = placement::pg_of(stripe, self.sh.spec.pgs);
        l.filling.get(&pg).is_some_and(|ps| ps.contains(&index))
    }

    /// Whether `node` is being filled for `stripe` (at whatever position).
    fn node_filling(&self, node: usize, stripe: u64) -> bool {
        let l = self.sh.layout.read().expect("volume layout poisoned");
        if l.filling.is_empty() || stripe < self.sh.fill_cursor.load(Ordering::Acquire) {
            return false;
        }
        let pg = placement::pg_of(stripe, self.sh.spec.pgs);
        l.filling
            .get(&pg)
            .is_some_and(|ps| ps.iter().any(|&p| l.map[pg as usize][p] == node))
    }

    fn now_ms(&self) -> u64 {
        self.sh.t0.elapsed().as_millis() as u64
    }

    /// Whether `node` is down. A down node whose probe is due gets one (in the background).
    fn is_down(&self, node: usize) -> bool {
        let h = &self.sh.health[node];
        if !h.down.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.now_ms();
        let at = h.probe_at.load(Ordering::Relaxed);
        if now >= at
            && h.probe_at
                .compare_exchange(
                    at,
                    now + PROBE_EVERY.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let this = self.clone();
            tokio::task::spawn_local(async move {
                this.probe(node).await;
            });
        }
        true
    }

    /// How this volume sees `node` (an index of its connector) now.
    pub fn node_condition(&self, node: usize) -> NodeCondition {
        let h = &self.sh.health[node];
        if h.down.load(Ordering::Relaxed) {
            NodeCondition::Down
        } else if h.slow_until.load(Ordering::Relaxed) > self.now_ms() {
            NodeCondition::Slow
        } else {
            NodeCondition::Up
        }
    }

    /// Whether reads (and the reads of read-modify-writes) should go around `node`: it is
    /// down, or slow.
    fn avoid(&self, node: usize) -> bool {
        self.is_down(node)
            || self.sh.health[node].slow_until.load(Ordering::Relaxed) > self.now_ms()
    }

    /// How long a call to `node` may go unanswered before the node is marked down.
    fn hang_after(&self, node: usize) -> Duration {
        let lat = self.sh.health[node].lat_us.load(Ordering::Relaxed);
        HANG_MIN.max(Duration::from_micros(lat.saturating_mul(HANG_FACTOR)))
    }

    /// How long reads of `nodes` are waited for before they are served around them (a node
    /// that has not answered yet, such as one loading its extents after a restart, is waited
    /// for as long as any call).
    fn hedge_delay(&self, nodes: impl Iterator<Item = usize>) -> Duration {
        nodes
            .map(
                |n| match self.sh.health[n].read_lat_us.load(Ordering::Relaxed) {
                    0 => self.hang_after(n),
                    lat => Duration::from_micros(lat.saturating_mul(HEDGE_FACTOR))
                        .clamp(HEDGE_MIN, HEDGE_MAX),
                },
            )
            .max()
            .unwrap_or(HEDGE_MIN)
    }

    fn mark_down(&self, node: usize, why: &CallError) {
        let h = &self.sh.health[node];
        h.probe_at.store(
            self.now_ms() + PROBE_EVERY.as_millis() as u64,
            Ordering::Relaxed,
        );
        if !h.down.swap(true, Ordering::AcqRel) {
            warn!(volume = %self.sh.spec.name, node = %self.name_of(node), "node down: {why}; nothing waits for it until it answers a probe");
            self.note_suspension();
        }
    }

    /// `node` answered (a call or a probe, a small read if `small_read`): it is up, and not
    /// slow.
    fn answered(&self, node: usize, took: Duration, small_read: bool) {
        let h = &self.sh.health[node];
        let sample = took.as_micros().min(u128::from(u32::MAX)) as u64;
        let smooth = |a: &AtomicU64| {
            let old = a.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                old - old / 8 + sample / 8
            };
            a.store(new.max(1), Ordering::Relaxed);
        };
        smooth(&h.lat_us);
        if small_read {
            smooth(&h.read_lat_us);
        }
        h.slow_until.store(0, Ordering::Relaxed);
        if h.down.swap(false, Ordering::AcqRel) {
            info!(volume = %self.sh.spec.name, node = %self.name_of(node), "node answers again");
            self.note_suspension();
        }
    }

    fn is_stale(&self, node: usize, stripe: u64) -> bool {
        let r = self.region(stripe);
        let behind = {
            let st = self.sh.state.lock().expect("volume state poisoned");
            st.stale.get(node).is_some_and(|s| s.contains(&r))
        };
        behind || self.node_filling(node, stripe)
    }

    fn mark_stale(&self, node: usize, stripe: u64) {
        let r = self.region(stripe);
        let mut st = self.sh.state.lock().expect("volume state poisoned");
        if st.stale.len() <= node {
            st.stale.resize(node + 1, BTreeSet::new());
        }
        if st.stale[node].insert(r) {
            drop(st);
            debug!(volume = %self.sh.spec.name, node = %self.name_of(node), region = r, "node marked stale");
        }
    }

    /// Stop writing, for good: every later write (and flush) of this instance fails with a
    /// retryable status. For an owner that lost its lease: it must stop before another
    /// gateway can take the volume over.
    pub fn fence(&self, why: &str) {
        let mut st = self.sh.state.lock().expect("volume state poisoned");
        if st.fenced.is_none() {
            error!(volume = %self.sh.spec.name, "fenced: {why}");
            st.fenced = Some(why.to_string());
        }
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.sh.size.load(Ordering::Acquire)
    }

    fn stripes(&self) -> u64 {
        self.size().div_ceil(self.sh.geo.stripe_bytes())
    }

    /// Grow the volume to `bytes` (a multiple of the block size, not smaller than now). The
    /// new space reads as zeroes: no node holds a fragment of a stripe never written.
    pub fn grow(&self, bytes: u64) -> Result<(), String> {
        let bs = u64::from(self.sh.spec.block_size);
        if !bytes.is_multiple_of(bs) {
            return Err(format!("{bytes} is not a multiple of the block size {bs}"));
        }
        let cur = self.size();
        if bytes < cur {
            return Err(format!(
                "volumes only grow ({cur} bytes now, {bytes} asked)"
            ));
        }
        self.sh.size.store(bytes, Ordering::Release);
        info!(volume = %self.sh.spec.name, from = cur, to = bytes, "volume grown");
        Ok(())
    }

    /// Whether this instance has stopped writing (see [`EcVolume::fence`]).
    pub fn is_fenced(&self) -> bool {
        self.sh
            .state
            .lock()
            .expect("volume state poisoned")
            .fenced
            .is_some()
    }

    fn fenced(&self) -> Result<(), BlockError> {
        let st = self.sh.state.lock().expect("volume state poisoned");
        match &st.fenced {
            Some(_) => Err(BlockError::Busy("volume fenced by a newer owner")),
            None => Ok(()),
        }
    }

    /// One call to a node. A down node is not called at all (the call fails at once); a node
    /// that does not answer within [`EcVolume::hang_after`], or cannot be reached, is marked
    /// down. The call runs in its caller's task: every volume operation is a task of its own
    /// that runs to its end ([`EcVolume::to_the_end`]), and the callers that stop waiting
    /// early (hedged reads, acknowledging at quorum) spawn their calls, so no caller that
    /// goes away cuts a request short; a request once queued is sent whole by the client's
    /// connection task either way.
    async fn call(&self, node: usize, req: Request) -> Result<Response, CallError> {
        // Whatever changes fragments makes the cached state of their stripes unknown.
        let touched: Vec<u64> = match &req {
            Request::Write { items, .. } | Request::Swap { items, .. } => {
                items.iter().map(|it| it.key.stripe).collect()
            }
            Request::Revert { items, .. } => items.iter().map(|(k, _)| k.stripe).collect(),
            Request::Trim { items, .. } => items.iter().map(|k| k.stripe).collect(),
            _ => Vec::new(),
        };
        if !touched.is_empty() {
            let mut st = self.sh.state.lock().expect("volume state poisoned");
            if !st.manifests.is_empty() {
                for s in touched {
                    st.manifests.remove(&s);
                }
            }
        }
        if self.is_down(node) {
            return Err(CallError::Unreachable {
                addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                reason: "the node is down (nothing waits for it until it answers a probe)".into(),
            });
        }
        self.call_node(node, req, self.hang_after(node)).await
    }

    /// [`EcVolume::call`] without the down check, waiting at most `timeout`.
    async fn call_node(
        &self,
        node: usize,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let io = nodes::handle(self.sh.instance, &*self.sh.connector, node);
        let small_read = self.read_bytes(&req).is_some_and(|b| b <= SMALL_READ);
        let started = Instant::now();
        let r = io.call_within(req, timeout).await;
        match &r {
            Err(e) if e.is_unavailable() => self.mark_down(node, e),
            _ => self.answered(node, started.elapsed(), small_read),
        }
        if let Err(CallError::StaleEpoch { current, .. }) = &r {
            let mut st = self.sh.state.lock().expect("volume state poisoned");
            if st.fenced.is_none() {
                let why = format!(
                    "node {} has epoch {current}, newer than this gateway's {}: another gateway owns volume {} now",
                    self.name_of(node), self.sh.epoch, self.sh.spec.name
                );
                error!(volume = %self.sh.spec.name, "fenced: {why}");
                st.fenced = Some(why);
            }
        }
        r
    }

    /// The bytes a read request asks for (`None`: not a read).
    fn read_bytes(&self, req: &Request) -> Option<u64> {
        match req {
            Request::Read { items, .. } => Some(
                items
                    .iter()
                    .map(|it| match it.len {
                        0 => u64::from(self.sh.spec.profile.chunk_size),
                        n => u64::from(n),
                    })
                    .sum(),
            ),
            _ => None,
        }
    }

    /// Probe every node marked down now (rather than at its next due probe); returns how
    /// many are still down.
    pub async fn probe_down_nodes(&self) -> usize {
        let down: Vec<usize> = (0..self.sh.connector.nodes().min(MAX_NODES))
            .filter(|&n| self.sh.health[n].down.load(Ordering::Relaxed))
            .collect();
        join_all(down.iter().map(|&n| self.probe(n)))
            .await
            .into_iter()
            .filter(|up| !up)
            .count()
    }

    /// Whether the node answers now (a probe, made whether or not it is marked down; an
    /// answer marks it up).
    async fn probe(&self, node: usize) -> bool {
        matches!(
            self.call_node(node, Request::Stats, PROBE_TIMEOUT).await,
            Ok(Response::Stats(_))
        )
    }

    /// Read fragments: `(stripe, index, want, offset, len)`, one request per node, waiting for
    /// every answer.
    async fn read_frags(&self, items: &[(u64, usize, Want, u32, u32)]) -> Vec<Got> {
        self.read_frags_wait(items, Wait::All).await
    }

    /// Read fragments, one request per node (none to a down node), waiting as `wait` says.
    /// Requests not waited for run on (their answers still count for their nodes' health).
    async fn read_frags_wait(
        &self,
        items: &[(u64, usize, Want, u32, u32)],
        wait: Wait,
    ) -> Vec<Got> {
        let mut per_node: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, it) in items.iter().enumerate() {
            per_node
                .entry(self.node_of(it.0, it.1))
                .or_default()
                .push(i);
        }
        let vol = self.ctx();
        let mut out = vec![Got::Unavailable; items.len()];
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let mut waiting: HashSet<usize> = HashSet::new();
        let mut large = false;
        for (node, idx) in per_node {
            if self.is_down(node) {
                continue;
            }
            let bytes: u64 = idx
                .iter()
                .map(|&i| match items[i].4 {
                    0 => u64::from(self.sh.spec.profile.chunk_size),
                    n => u64::from(n),
                })
                .sum();
            large |= bytes > SMALL_READ;
            let req = Request::Read {
                vol,
                items: idx
                    .iter()
                    .map(|&i| {
                        let it = &items[i];
                        ReadItem {
                            key: FragKey {
                                stripe: it.0,
                                index: it.1 as u8,
                            },
                            want: it.2,
                            offset: it.3,
                            len: it.4,
                        }
                    })
                    .collect(),
            };
            let this = self.clone();
            let call = tokio::task::spawn_local(async move { this.call(node, req).await });
            waiting.insert(node);
            pending.push(async move { (node, idx, call.await) });
        }
        let wait = if large { Wait::All } else { wait };
        let deadline = match wait {
            Wait::All => None,
            Wait::Hedged { .. } => {
                Some(tokio::time::Instant::now() + self.hedge_delay(waiting.iter().copied()))
            }
        };
        let mut answered = 0usize;
        loop {
            if pending.is_empty() {
                break;
            }
            let past = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if let Wait::Hedged {
                answered: need,
                unanswered,
            } = wait
            {
                if past && answered >= need && items.len() - answered <= unanswered {
                    // Served around the nodes that missed the hedge delay.
                    for &n in &waiting {
                        self.sh.health[n].slow_until.store(
                            self.now_ms() + SLOW_FOR.as_millis() as u64,
                            Ordering::Relaxed,
                        );
                    }
                    break;
                }
            }
            let next = match deadline {
                Some(d) if !past => tokio::select! {
                    r = futures_util::StreamExt::next(&mut pending) => r,
                    () = tokio::time::sleep_until(d) => continue,
                },
                _ => futures_util::StreamExt::next(&mut pending).await,
            };
            let Some((node, idx, r)) = next else { break };
            waiting.remove(&node);
            let Ok(Ok(Response::Read(results))) = r else {
                continue;
            };
            for (i, res) in idx.into_iter().zip(results) {
                out[i] = match res.status {
                    Status::OK if res.zero => Got::Zero(res.manifest),
                    Status::OK => Got::Data(res.data, res.manifest),
                    // A node still being filled may lack what its position holds.
                    Status::NOT_FOUND if self.filling_at(items[i].0, items[i].1) => {
                        Got::Unavailable
                    }
                    Status::NOT_FOUND => Got::Missing,
                    Status::CHECKSUM => {
                        self.sh
                            .stats
                            .checksum_errors
                            .fetch_add(1, Ordering::Relaxed);
                        Got::Corrupt
                    }
                    _ => Got::Unavailable,
                };
                if matches!(out[i], Got::Data(..) | Got::Zero(_)) {
                    answered += 1;
                }
            }
        }
        out
    }

    /// The copies each position's node holds of `stripe` (`None`: no answer).
    async fn versions(&self, stripe: u64) -> Vec<Option<Vec<SlotInfo>>> {
        let vol = self.ctx();
        let calls = (0..self.width()).map(|i| {
            let node = self.node_of(stripe, i);
            let req = Request::Versions {
                vol,
                first: stripe,
                count: 1,
            };
            async move {
                match self.call(node, req).await {
                    Ok(Response::Versions(v)) => Some(
                        v.into_iter()
                            .filter(|e| e.key.stripe == stripe && usize::from(e.key.index) == i)
                            .flat_map(|e| e.slots)
                            .collect(),
                    ),
                    _ => None,
                }
            }
        });
        join_all(calls).await
    }

    /// Group `items` by node and issue one request per node (built by `make`), in node
    /// order, each as its own task (issued now, whatever happens to the caller). Returns per
    /// node the positions in `items` it carries and its pending answer.
    #[allow(clippy::type_complexity)]
    async fn issue_per_node(
        &self,
        items: Vec<(u64, usize, WriteItem)>,
        make: impl Fn(VolumeCtx, Vec<WriteItem>) -> Request,
    ) -> Vec<(
        usize,
        Vec<usize>,
        tokio::task::JoinHandle<Result<Response, CallError>>,
    )> {
        let mut per_node: HashMap<usize, (Vec<usize>, Vec<WriteItem>)> = HashMap::new();
        for (i, (stripe, index, it)) in items.into_iter().enumerate() {
            let e = per_node.entry(self.node_of(stripe, index)).or_default();
            e.0.push(i);
            e.1.push(it);
        }
        let vol = self.ctx();
        let mut nodes_sorted: Vec<_> = per_node.into_iter().collect();
        nodes_sorted.sort_by_key(|(node, _)| *node);
        let mut calls = Vec::new();
        for (node, (idx, its)) in nodes_sorted {
            fault::point("write:send").await;
            let this = self.clone();
            let req = make(vol, its);
            // (A down node's call fails at once, without being sent: its fragments count as
            // not written, and it is marked behind in their regions.)
            let h = tokio::task::spawn_local(async move { this.call(node, req).await });
            calls.push((node, idx, h));
        }
        calls
    }

    /// Write fragments of one or more stripes; `items[i] = (stripe, index, item)`. Returns
    /// per item whether the node made it durable. The fault points model a gateway that
    /// stops after issuing some of them.
    async fn write_frags(&self, items: Vec<(u64, usize, WriteItem)>) -> Vec<bool> {
        self.write_frags_acking(items, None).await
    }

    /// [`EcVolume::write_frags`] for the last step of a write: once every stripe of `items`
    /// has its write quorum durable (the fragments confirmed so far plus `already[stripe]`,
    /// those of the new state that were durable before), the write is acknowledged to its
    /// caller ([`ack_stripes`]), while this goes on waiting for the other fragments (each
    /// bounded by [`EcVolume::hang_after`]) with the stripes still locked.
    async fn write_frags_acking(
        &self,
        items: Vec<(u64, usize, WriteItem)>,
        already: Option<&HashMap<u64, usize>>,
    ) -> Vec<bool> {
        let n = items.len();
        let stripe_of: Vec<u64> = items.iter().map(|(s, _, _)| *s).collect();
        let calls = self
            .issue_per_node(items, |vol, items| Request::Write { vol, items })
            .await;
        let mut ok = vec![false; n];
        let quorum = self.sh.spec.write_quorum;
        let mut durable: HashMap<u64, usize> = HashMap::new();
        if let Some(a) = already {
            for s in &stripe_of {
                durable.insert(*s, a.get(s).copied().unwrap_or(0));
            }
        }
        let mut acked = already.is_none();
        let mut pending: futures_util::stream::FuturesUnordered<_> = calls
            .into_iter()
            .map(|(node, idx, h)| async move { (node, idx, h.await) })
            .collect();
        while let Some((node, idx, r)) = futures_util::StreamExt::next(&mut pending).await {
            match r {
                Ok(Ok(Response::Write(st))) => {
                    for (i, s) in idx.into_iter().zip(st) {
                        ok[i] = s == Status::OK;
                        if ok[i] {
                            *durable.entry(stripe_of[i]).or_insert(0) += 1;
                        }
                    }
                }
                other => {
                    debug!(node = %self.name_of(node), "write failed: {other:?}");
                }
            }
            fault::point("write:acked-node").await;
            if !acked && durable.values().all(|&d| d >= quorum) {
                acked = true;
                ack_stripes(durable.keys().copied());
            }
        }
        ok
    }

    /// Send swaps (ranges written on the nodes' newest copies, answered with what they
    /// replaced), one request per node, all in parallel.
    async fn swap_frags(&self, items: Vec<(u64, usize, WriteItem)>) -> Vec<Swapped> {
        let n = items.len();
        let calls = self
            .issue_per_node(items, |vol, items| Request::Swap { vol, items })
            .await;
        let mut out = vec![Swapped::Unknown; n];
        for (node, idx, h) in calls {
            match h.await {
                Ok(Ok(Response::Swap(st))) if st.len() == idx.len() => {
                    for (i, (s, old)) in idx.into_iter().zip(st) {
                        out[i] = match s {
                            Status::OK => Swapped::Old(old),
                            // Refused before anything was written.
                            Status::NOT_FOUND | Status::CHECKSUM | Status::BAD_REQUEST => {
                                Swapped::Refused
                            }
                            _ => Swapped::Unknown,
                        };
                    }
                }
                other => {
                    debug!(node = %self.name_of(node), "swap failed: {other:?}");
                }
            }
            fault::point("write:acked-node").await;
        }
        out
    }

    fn next_version(&self) -> u64 {
        self.sh.next_version.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether every fragment of `keys` was written (`ok`) or is on a node marked down (which
    /// is behind in the region and gets nothing until it answers again: the stripe's state on
    /// the other nodes is still the one just written).
    fn landed_or_down(&self, keys: &[(u64, usize)], ok: &[bool]) -> bool {
        keys.iter()
            .zip(ok)
            .all(|((s, i), good)| *good || self.is_down(self.node_of(*s, *i)))
    }

    /// Remember `stripe`'s state after a write every fragment took.
    fn remember(&self, stripe: u64, m: Manifest) {
        let mut st = self.sh.state.lock().expect("volume state poisoned");
        if st.manifests.len() >= MANIFEST_CACHE {
            st.manifests.clear();
        }
        st.manifests.insert(stripe, m);
    }

    fn remembered(&self, stripe: u64) -> Option<Manifest> {
        let st = self.sh.state.lock().expect("volume state poisoned");
        st.manifests.get(&stripe).cloned()
    }

    fn forget(&self, stripe: u64) {
        let mut st = self.sh.state.lock().expect("volume state poisoned");
        st.manifests.remove(&stripe);
    }

    fn expected(&self, m: &Manifest, index: usize) -> u64 {
        if index < self.k() {
            m.data.get(index).copied().unwrap_or(0)
        } else {
            m.version
        }
    }

    // ---- the intent log -------------------------------------------------------------------

    async fn ensure_dirty(&self, regions: &BTreeSet<u64>) -> Result<(), BlockError> {
        {
            let mut st = self.sh.state.lock().expect("volume state poisoned");
            let missing: Vec<u64> = regions
                .iter()
                .copied()
                .filter(|r| !st.dirty.contains(r))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            st.want_dirty.extend(missing);
        }
        self.persist_intent(false).await
    }

    /// Write the intent set to the nodes. With `shrink`, clear the regions that are idle and
    /// healthy; otherwise add the wanted ones.
    async fn persist_intent(&self, shrink: bool) -> Result<(), BlockError> {
        let _g = self.sh.intent_lock.lock().await;
        let (set, added) = {
            let st = self.sh.state.lock().expect("volume state poisoned");
            if shrink {
                let now = Instant::now();
                let clear: Vec<u64> =
                    st.dirty
                        .iter()
                        .copied()
                        .filter(|r| {
                            st.inflight.get(r).copied().unwrap_or(0) == 0
                                && st.last_write.get(r).is_none_or(|t| {
                                    now.duration_since(*t) >= self.sh.spec.clear_after
                                })
                                && !st.resync.contains(r)
                                && !st.want_dirty.contains(r)
                                && st.stale.iter().all(|s| !s.contains(r))
                                && !st.suspect.iter().any(|s| self.region(*s) == *r)
                                && !st.repair.iter().any(|s| self.region(*s) == *r)
                        })
                        .collect();
                if clear.is_empty() {
                    return Ok(());
                }
                let mut set = st.dirty.clone();
                for r in &clear {
                    set.remove(r);
                }
                (set, BTreeSet::new())
            } else {
                if st.want_dirty.iter().all(|r| st.dirty.contains(r)) {
                    return Ok(());
                }
                let mut set = st.dirty.clone();
                set.extend(st.want_dirty.iter().copied());
                (set, st.want_dirty.clone())
            }
        };
        let seq = self.sh.intent_seq.fetch_add(1, Ordering::Relaxed);
        let data = encode_regions(&set);
        // On the nodes the map uses: a node it no longer names is never read at an open.
        let used = self.used_nodes();
        let n = used.len();
        let calls = used.iter().map(|&node| {
            let req = Request::PutBlob {
                volume: self.sh.spec.id,
                epoch: self.sh.epoch,
                name: BLOB_INTENT,
                seq,
                data: data.clone(),
            };
            async move { self.call(node, req).await }
        });
        let ok = join_all(calls)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(Response::PutBlob)))
            .count();
        let need = (usize::from(self.sh.spec.profile.m) + 1).min(n);
        if ok < need {
            self.fenced()?;
            if let Some(more) = self.sh.warned.allow("intent") {
                warn!(volume = %self.sh.spec.name, ok, need, repeated = more, "write-intent log not stored on enough nodes");
            }
            return Err(BlockError::Busy("too few nodes to record the write intent"));
        }
        let mut st = self.sh.state.lock().expect("volume state poisoned");
        if shrink {
            // Regions written meanwhile were re-added to want_dirty or are still in flight.
            st.dirty = set;
        } else {
            st.dirty.extend(added.iter().copied());
            for r in &added {
                st.want_dirty.remove(r);
            }
        }
        Ok(())
    }

    // ---- recovery ------------------------------------------------------------------------

    /// Whether `stripe` must be resolved before use.
    fn needs_resolve(&self, stripe: u64) -> bool {
        let st = self.sh.state.lock().expect("volume state poisoned");
        st.suspect.contains(&stripe)
            || (st.resync.contains(&self.region(stripe)) && !st.resolved.contains(&stripe))
    }

    fn mark_resolved(&self, stripe: u64) {
        let mut st = self.sh.state.lock().expect("volume state poisoned");
        st.suspect.remove(&stripe);
        if st.resync.contains(&self.region(stripe)) {
            st.resolved.insert(stripe);
        }
    }

    /// Bring `stripe` to one whole state (caller holds it exclusively): complete an
    /// interrupted write that left at least `k` fragments of its state, undo one that cannot
    /// have been acknowledged, and rewrite fragments that are missing, behind or damaged.
    async fn resolve(&self, stripe: u64) -> Result<(), BlockError> {
        let (k, width) = (self.k(), self.width());
        let quorum = self.sh.spec.write_quorum;
        // The highest version undone here: the state that remains must be rewritten above it,
        // so copies of it left on unreachable nodes can never look newest again.
        let mut undone: u64 = 0;
        for _ in 0..8 {
            let views = self.versions(stripe).await;
            let unreachable = views.iter().filter(|v| v.is_none()).count();
            let Some(top) = views
                .iter()
                .flatten()
                .flatten()
                .max_by_key(|s| s.manifest.version)
                .cloned()
            else {
                // No copy anywhere reachable: never written (or all copies lost).
                for (i, v) in views.iter().enumerate() {
                    if v.is_none() {
                        self.mark_stale(self.node_of(stripe, i), stripe);
                    }
                }
                self.mark_resolved(stripe);
                return Ok(());
            };
            let m = top.manifest.clone();
            let consistent: Vec<bool> = (0..width)
                .map(|i| {
                    let e = self.expected(&m, i);
                    views[i]
                        .as_ref()
                        .is_some_and(|v| v.iter().any(|s| s.manifest.version == e))
                })
                .collect();
            let junk: Vec<Vec<u64>> = (0..width)
                .map(|i| {
                    let e = self.expected(&m, i);
                    views[i].as_ref().map_or(Vec::new(), |v| {
                        v.iter()
                            .map(|s| s.manifest.version)
                            .filter(|&x| x > e)
                            .collect()
                    })
                })
                .collect();
            let c = consistent.iter().filter(|x| **x).count();
            // A position still being filled that lacks this state's copy may have had it on
            // the node it moved from: no evidence either way, like a node that did not answer.
            let unknown = unreachable
                + (0..width)
                    .filter(|&i| views[i].is_some() && !consistent[i] && self.filling_at(stripe, i))
                    .count();
            let clean = c == width && junk.iter().all(Vec::is_empty);
            if clean && undone == 0 {
                self.mark_resolved(stripe);
                return Ok(());
            }
            if c >= k && undone > 0 {
                if self.rewrite_fresh(stripe, &m, &consistent).await? {
                    self.mark_resolved(stripe);
                    return Ok(());
                }
                return Err(BlockError::Busy("could not rewrite the stripe's state"));
            }
            if c >= k {
                // Roll forward: rebuild what is missing from k fragments of this state.
                let fixed = self.rewrite(stripe, &m, &consistent, &junk, &views).await?;
                if fixed {
                    self.sh.stats.rolled_forward.fetch_add(1, Ordering::Relaxed);
                    self.mark_resolved(stripe);
                    return Ok(());
                }
                continue;
            }
            if c + unknown < quorum {
                // The newest write reached too few nodes to have been acknowledged: undo it.
                let mut reverts = Vec::new();
                for (i, v) in views.iter().enumerate() {
                    if v.as_ref()
                        .is_some_and(|v| v.iter().any(|s| s.manifest.version == m.version))
                    {
                        reverts.push(i);
                    }
                }
                let vol = self.ctx();
                let calls = reverts.iter().map(|&i| {
                    let node = self.node_of(stripe, i);
                    let req = Request::Revert {
                        vol,
                        items: vec![(
                            FragKey {
                                stripe,
                                index: i as u8,
                            },
                            m.version,
                        )],
                    };
                    async move { (node, self.call(node, req).await) }
                });
                for (node, r) in join_all(calls).await {
                    if !matches!(r, Ok(Response::Revert(_))) {
                        self.mark_stale(node, stripe);
                    }
                }
                // Nodes we could not reach may still hold it.
                for (i, v) in views.iter().enumerate() {
                    if v.is_none() {
                        self.mark_stale(self.node_of(stripe, i), stripe);
                    }
                }
                undone = undone.max(m.version);
                self.sh.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                info!(volume = %self.sh.spec.name, stripe, version = m.version, "rolled back an unacknowledged write");
                continue;
            }
            return Err(BlockError::Busy(
                "stripe state undecidable until more nodes return",
            ));
        }
        Err(BlockError::Busy("stripe did not settle"))
    }

    /// Rewrite every position of state `m` that is not consistent (or holds newer junk) from
    /// `k` consistent fragments. Returns false if fewer than `k` could be read.
    async fn rewrite(
        &self,
        stripe: u64,
        m: &Manifest,
        consistent: &[bool],
        junk: &[Vec<u64>],
        views: &[Option<Vec<SlotInfo>>],
    ) -> Result<bool, BlockError> {
        let (k, width, chunk) = (self.k(), self.width(), self.chunk());
        let reads: Vec<(u64, usize, Want, u32, u32)> = (0..width)
            .filter(|&i| consistent[i])
            .map(|i| (stripe, i, Want::Version(self.expected(m, i)), 0, 0))
            .collect();
        let got = self.read_frags(&reads).await;
        let mut shards: Vec<Vec<u8>> = vec![vec![0u8; chunk]; width];
        let mut present = vec![false; width];
        let mut zero_at = vec![false; width];
        for ((_, i, _, _, _), g) in reads.iter().zip(got) {
            match g {
                Got::Data(d, _) if d.len() == chunk => {
                    shards[*i].copy_from_slice(&d);
                    present[*i] = true;
                }
                Got::Zero(_) => {
                    present[*i] = true;
                    zero_at[*i] = true;
                }
                _ => {}
            }
        }
        if present.iter().filter(|p| **p).count() < k {
            return Ok(false);
        }
        let had = present.clone();
        {
            let mut refs: Vec<&mut [u8]> = shards.iter_mut().map(|s| &mut s[..]).collect();
            self.sh
                .codec
                .reconstruct(&mut refs, &present, false)
                .map_err(|_| BlockError::Medium)?;
        }
        let vol = self.ctx();
        let mut fixes = Vec::new();
        for i in 0..width {
            let bad = !had[i] || !junk[i].is_empty();
            if !bad {
                continue;
            }
            let node = self.node_of(stripe, i);
            if views[i].is_none() {
                self.mark_stale(node, stripe);
                continue;
            }
            // Newer copies than this state's are leftovers of undone writes: void them first.
            if !junk[i].is_empty() {
                let req = Request::Revert {
                    vol,
                    items: junk[i]
                        .iter()
                        .map(|&v| {
                            (
                                FragKey {
                                    stripe,
                                    index: i as u8,
                                },
                                v,
                            )
                        })
                        .collect(),
                };
                if self.call(node, req).await.is_err() {
                    self.mark_stale(node, stripe);
                    continue;
                }
            }
            if had[i] {
                continue; // consistent copy present; only junk needed voiding
            }
            let version = self.expected(m, i);
            let zero = is_zero(&shards[i]);
            fixes.push((
                stripe,
                i,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: i as u8,
                    },
                    manifest: Manifest {
                        version,
                        data: m.data.clone(),
                    },
                    zero,
                    data: if zero {
                        Bytes::new()
                    } else {
                        Bytes::from(shards[i].clone())
                    },
                    offset: 0,
                    base: 0,
                    xor: false,
                },
            ));
        }
        let positions: Vec<usize> = fixes.iter().map(|f| f.1).collect();
        let n = fixes.len();
        let ok = self.write_frags(fixes).await;
        for (pos, good) in positions.iter().zip(&ok) {
            if *good {
                self.sh
                    .stats
                    .repaired_fragments
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.mark_stale(self.node_of(stripe, *pos), stripe);
            }
        }
        if n > 0 {
            debug!(volume = %self.sh.spec.name, stripe, fragments = n, "rewrote fragments");
        }
        Ok(true)
    }

    /// Rewrite all of state `m` at a fresh version (above anything undone), from `k` of its
    /// consistent fragments. Returns false if fewer than `k` could be read or the rewrite
    /// missed its quorum.
    async fn rewrite_fresh(
        &self,
        stripe: u64,
        m: &Manifest,
        consistent: &[bool],
    ) -> Result<bool, BlockError> {
        let (k, width, chunk) = (self.k(), self.width(), self.chunk());
        let reads: Vec<(u64, usize, Want, u32, u32)> = (0..width)
            .filter(|&i| consistent[i])
            .map(|i| (stripe, i, Want::Version(self.expected(m, i)), 0, 0))
            .collect();
        let got = self.read_frags(&reads).await;
        let mut shards: Vec<Vec<u8>> = vec![vec![0u8; chunk]; width];
        let mut present = vec![false; width];
        for ((_, i, _, _, _), g) in reads.iter().zip(got) {
            match g {
                Got::Data(d, _) if d.len() == chunk => {
                    shards[*i].copy_from_slice(&d);
                    present[*i] = true;
                }
                Got::Zero(_) => present[*i] = true,
                _ => {}
            }
        }
        if present.iter().filter(|p| **p).count() < k {
            return Ok(false);
        }
        {
            let mut refs: Vec<&mut [u8]> = shards.iter_mut().map(|s| &mut s[..]).collect();
            self.sh
                .codec
                .reconstruct(&mut refs, &present, false)
                .map_err(|_| BlockError::Medium)?;
        }
        let v = self.next_version();
        let data: Vec<Bytes> = shards[..k].iter().map(|c| Bytes::from(c.clone())).collect();
        let parity: Vec<Bytes> = shards[k..].iter().map(|p| Bytes::from(p.clone())).collect();
        let items = self.stripe_items(stripe, v, &data, parity);
        let keys: Vec<(u64, usize)> = items.iter().map(|(s, i, _)| (*s, *i)).collect();
        let ok = self.write_frags(items).await;
        self.sh
            .stats
            .repaired_fragments
            .fetch_add(ok.iter().filter(|x| **x).count() as u64, Ordering::Relaxed);
        Ok(self.settle(&keys, &ok, &HashMap::new()).is_ok())
    }

    /// Read every data chunk of `stripe` whole, reconstructing what is missing, damaged or
    /// behind. Returns the chunks (zeroes for a never-written stripe) and the stripe's state
    /// (`None` if never written). Caller holds the stripe.
    async fn read_whole(
        &self,
        stripe: u64,
    ) -> Result<(Vec<Vec<u8>>, Option<Manifest>), BlockError> {
        let (k, width, chunk) = (self.k(), self.width(), self.chunk());
        let reads: Vec<(u64, usize, Want, u32, u32)> = (0..width)
            .map(|i| (stripe, i, Want::Latest, 0, 0))
            .collect();
        // A node that is slow to answer is read around, when the answers that came cannot miss
        // the stripe's newest acknowledged state: every write leaves its state's manifest on at
        // least `quorum - (k - 1)` positions (parity and the data it changed; at most `k - 1`
        // unchanged data chunks count toward its quorum), so fewer unanswered positions than
        // that cannot hide it.
        let spare = self.sh.spec.write_quorum.saturating_sub(k);
        let got = self
            .read_frags_wait(
                &reads,
                Wait::Hedged {
                    answered: k,
                    unanswered: spare,
                },
            )
            .await;
        let busy_or_medium = |got: &[Got]| {
            if let Err(fenced) = self.fenced() {
                // A node refused this gateway's epoch: say so, not "unreachable".
                fenced
            } else if got.iter().any(|g| matches!(g, Got::Unavailable)) {
                BlockError::Busy("too few nodes reachable to read the stripe")
            } else {
                BlockError::Medium
            }
        };
        // Candidate states, newest first: the newest copy anywhere is normally the stripe's
        // state (recovery always leaves the settled state above any undone write); older
        // candidates cover copies left by a write that is still being settled.
        let mut candidates: Vec<Manifest> = got.iter().filter_map(Got::manifest).cloned().collect();
        candidates.sort_by_key(|m| std::cmp::Reverse(m.version));
        candidates.dedup_by_key(|m| m.version);
        if candidates.is_empty() {
            let missing = got.iter().filter(|g| matches!(g, Got::Missing)).count();
            if missing >= (width - k).max(1) {
                // Never written: every write leaves at least k + 1 copies, so this many "no
                // such fragment" answers rule one out.
                return Ok((vec![vec![0u8; chunk]; k], None));
            }
            return Err(busy_or_medium(&got));
        }
        for m in candidates.into_iter().take(3) {
            let mut shards: Vec<Vec<u8>> = vec![vec![0u8; chunk]; width];
            let mut present = vec![false; width];
            let mut retry = Vec::new();
            for (i, g) in got.iter().enumerate() {
                let e = self.expected(&m, i);
                match g {
                    Got::Data(d, mf) if mf.version == e && d.len() == chunk => {
                        shards[i].copy_from_slice(d);
                        present[i] = true;
                    }
                    Got::Zero(mf) if mf.version == e => present[i] = true,
                    Got::Data(..) | Got::Zero(_) => retry.push((stripe, i, Want::Version(e), 0, 0)),
                    _ => {}
                }
            }
            if present.iter().filter(|p| **p).count() < k && !retry.is_empty() {
                let again = self.read_frags(&retry).await;
                for ((_, i, _, _, _), g) in retry.iter().zip(again) {
                    match g {
                        Got::Data(d, _) if d.len() == chunk => {
                            shards[*i].copy_from_slice(&d);
                            present[*i] = true;
                        }
                        Got::Zero(_) => present[*i] = true,
                        _ => {}
                    }
                }
            }
            let have = present.iter().filter(|p| **p).count();
            if have < k {
                continue;
            }
            if have < width {
                self.sh.stats.degraded_reads.fetch_add(1, Ordering::Relaxed);
                let mut refs: Vec<&mut [u8]> = shards.iter_mut().map(|s| &mut s[..]).collect();
                self.sh
                    .codec
                    .reconstruct(&mut refs, &present, true)
                    .map_err(|_| BlockError::Medium)?;
                // Something reachable was missing, behind or damaged: repair it later.
                let reachable_bad = got
                    .iter()
                    .zip(&present)
                    .any(|(g, p)| !p && !matches!(g, Got::Unavailable));
                if reachable_bad {
                    let mut st = self.sh.state.lock().expect("volume state poisoned");
                    st.repair.insert(stripe);
                }
            }
            shards.truncate(k);
            return Ok((shards, Some(m)));
        }
        Err(busy_or_medium(&got))
    }

    // ---- reads ---------------------------------------------------------------------------

    async fn prepare(&self, stripes: &[u64]) -> Result<(), BlockError> {
        for &s in stripes {
            if self.needs_resolve(s) {
                let _g = self.sh.locks.lock(s, true).await;
                if self.needs_resolve(s) {
                    self.resolve(s).await?;
                }
            }
        }
        Ok(())
    }

    async fn do_read(&self, offset: u64, len: usize) -> Result<Bytes, BlockError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.size())
        {
            return Err(BlockError::OutOfRange);
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let spans: Vec<StripeSpan> = self.sh.geo.spans(offset, len as u64).collect();
        let stripes: Vec<u64> = spans.iter().map(|s| s.stripe).collect();
        for _attempt in 0..4 {
            self.prepare(&stripes).await?;
            let _guards = self.sh.locks.lock_many(&stripes, false).await;
            if stripes.iter().any(|&s| self.needs_resolve(s)) {
                continue;
            }
            return self.read_locked(&spans, len).await;
        }
        Err(BlockError::Busy("stripes kept changing state"))
    }

    async fn read_locked(&self, spans: &[StripeSpan], len: usize) -> Result<Bytes, BlockError> {
        // Fast path: each piece from its data fragment's node.
        let mut items = Vec::new();
        let mut owners = Vec::new(); // (span index, buf offset within the request, len)
        let mut degraded: BTreeSet<usize> = BTreeSet::new();
        for (si, sp) in spans.iter().enumerate() {
            for p in self.sh.geo.pieces(sp) {
                let node = self.node_of(sp.stripe, p.index);
                if self.avoid(node) || self.is_stale(node, sp.stripe) {
                    degraded.insert(si);
                    continue;
                }
                items.push((
                    sp.stripe,
                    p.index,
                    Want::Latest,
                    p.start as u32,
                    p.len as u32,
                ));
                owners.push((si, sp.buf_offset as usize + p.buf_offset, p.len));
            }
        }
        // A piece not answered in time is served by reconstruction (below), which decides.
        let mut got = self
            .read_frags_wait(
                &items,
                Wait::Hedged {
                    answered: 0,
                    unanswered: usize::MAX,
                },
            )
            .await;
        // One piece (a small read within a chunk): its fragment's bytes are the answer, no copy.
        if degraded.is_empty() && owners.len() == 1 && owners[0] == (0, 0, len) {
            if let Got::Data(d, _) = &mut got[0] {
                if d.len() == len {
                    return Ok(std::mem::take(d));
                }
            }
        }
        let mut out = BytesMut::zeroed(len);
        for ((si, at, n), g) in owners.into_iter().zip(got) {
            if degraded.contains(&si) {
                continue;
            }
            match g {
                Got::Data(d, _) if d.len() == n => out[at..at + n].copy_from_slice(&d),
                Got::Zero(_) => {} // already zeroes
                Got::Corrupt => {
                    // Damaged on its node: served around it below (which may not read that
                    // fragment again), and rewritten by the maintenance loop.
                    let mut st = self.sh.state.lock().expect("volume state poisoned");
                    st.repair.insert(spans[si].stripe);
                    degraded.insert(si);
                }
                _ => {
                    degraded.insert(si);
                }
            }
        }
        for si in degraded {
            let sp = &spans[si];
            let at = sp.buf_offset as usize;
            if let Some(bytes) = self.read_span_around(sp).await {
                out[at..at + bytes.len()].copy_from_slice(&bytes);
                continue;
            }
            let (chunks, _) = self.read_whole(sp.stripe).await?;
            let mut pos = 0usize;
            for p in self.sh.geo.pieces(sp) {
                out[at + pos..at + pos + p.len]
                    .copy_from_slice(&chunks[p.index][p.start..p.start + p.len]);
                pos += p.len;
            }
        }
        Ok(out.freeze())
    }

    /// A small read of one stripe around a node that cannot serve it (down, slow, behind,
    /// or late): the same byte range of the other positions, and the missing data rebuilt
    /// from any `k` of them that belong to the newest state among the answers (reading whole
    /// chunks would cost a multiple of it). `None` when that cannot be decided or is not small:
    /// the caller reads the stripe whole.
    async fn read_span_around(&self, sp: &StripeSpan) -> Option<Vec<u8>> {
        let (k, width) = (self.k(), self.width());
        let pieces: Vec<_> = self.sh.geo.pieces(sp).collect();
        let lo = pieces.iter().map(|p| p.start).min()?;
        let hi = pieces.iter().map(|p| p.start + p.len).max()?;
        let len = hi - lo;
        if len as u64 > SMALL_READ {
            return None;
        }
        let stripe = sp.stripe;
        let ask: Vec<usize> = (0..width)
            .filter(|&i| {
                let n = self.node_of(stripe, i);
                !self.avoid(n) && !self.is_stale(n, stripe) && !self.filling_at(stripe, i)
            })
            .collect();
        let spare = self.sh.spec.write_quorum.saturating_sub(k);
        // Positions not asked count as unanswered (see read_whole).
        let unasked = width - ask.len();
        if ask.len() < k || unasked > spare {
            return None;
        }
        let reads: Vec<(u64, usize, Want, u32, u32)> = ask
            .iter()
            .map(|&i| (stripe, i, Want::Latest, lo as u32, len as u32))
            .collect();
        let got = self
            .read_frags_wait(
                &reads,
                Wait::Hedged {
                    answered: k,
                    unanswered: spare - unasked,
                },
            )
            .await;
        let answered = got
            .iter()
            .filter(|g| matches!(g, Got::Data(..) | Got::Zero(_)))
            .count();
        if got.iter().any(|g| matches!(g, Got::Missing)) || width - answered > spare {
            return None;
        }
        // The newest state among the answers; every answer must belong to it.
        let m = got
            .iter()
            .filter_map(Got::manifest)
            .max_by_key(|m| m.version)?
            .clone();
        let mut shards: Vec<Vec<u8>> = vec![vec![0u8; len]; width];
        let mut present = vec![false; width];
        for ((_, i, _, _, _), g) in reads.iter().zip(&got) {
            let e = self.expected(&m, *i);
            match g {
                Got::Data(d, mf) if mf.version == e && d.len() == len => {
                    shards[*i].copy_from_slice(d);
                    present[*i] = true;
                }
                Got::Zero(mf) if mf.version == e => present[*i] = true,
                Got::Unavailable => {}
                // Another state, damaged: let the whole-stripe read sort it out (and repair).
                _ => return None,
            }
        }
        if present.iter().filter(|p| **p).count() < k {
            return None;
        }
        if present[..k].iter().any(|p| !p) {
            let mut refs: Vec<&mut [u8]> = shards.iter_mut().map(|x| &mut x[..]).collect();
            self.sh.codec.reconstruct(&mut refs, &present, true).ok()?;
            self.sh.stats.degraded_reads.fetch_add(1, Ordering::Relaxed);
        }
        let mut out = Vec::with_capacity(sp.len as usize);
        for p in &pieces {
            out.extend_from_slice(&shards[p.index][p.start - lo..p.start - lo + p.len]);
        }
        Some(out)
    }

    // ---- writes --------------------------------------------------------------------------

    async fn do_write(&self, offset: u64, data: Segments) -> Result<(), BlockError> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size())
        {
            return Err(BlockError::OutOfRange);
        }
        self.fenced()?;
        if data.is_empty() {
            return Ok(());
        }
        let spans: Vec<StripeSpan> = self.sh.geo.spans(offset, data.len() as u64).collect();
        let regions: BTreeSet<u64> = spans.iter().map(|s| self.region(s.stripe)).collect();
        self.ensure_dirty(&regions).await?;
        let _inflight = Inflight::new(self, &regions);
        let (full, partial): (Vec<StripeSpan>, Vec<StripeSpan>) =
            spans.into_iter().partition(|s| s.is_full(&self.sh.geo));
        let full_w = async {
            for group in full.chunks(64) {
                self.write_full(group, &data).await?;
            }
            Ok::<(), BlockError>(())
        };
        // A partial stripe works on its own bytes in one buffer (a copy only when they
        // straddle two of the pieces the data came in).
        let partial_w = join_all(partial.iter().map(|s| {
            let start = s.buf_offset as usize;
            let own = data.slice(start..start + s.len as usize).to_bytes();
            let sp = StripeSpan {
                buf_offset: 0,
                ..*s
            };
            async move { self.write_partial(&sp, &own).await }
        }));
        let (a, b) = futures_util::future::join(full_w, partial_w).await;
        a?;
        for r in b {
            r?;
        }
        Ok(())
    }

    fn stripe_items(
        &self,
        stripe: u64,
        version: u64,
        data: &[Bytes],
        parity: Vec<Bytes>,
    ) -> Vec<(u64, usize, WriteItem)> {
        let k = self.k();
        let all_zero = data.iter().all(|d| is_zero(d));
        let manifest = Manifest {
            version,
            data: vec![version; k],
        };
        let mut items = Vec::with_capacity(self.width());
        for (i, d) in data.iter().enumerate() {
            let zero = all_zero || is_zero(d);
            items.push((
                stripe,
                i,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: i as u8,
                    },
                    manifest: manifest.clone(),
                    zero,
                    data: if zero { Bytes::new() } else { d.clone() },
                    offset: 0,
                    base: 0,
                    xor: false,
                },
            ));
        }
        for (j, p) in parity.into_iter().enumerate() {
            let zero = all_zero;
            items.push((
                stripe,
                k + j,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: (k + j) as u8,
                    },
                    manifest: manifest.clone(),
                    zero,
                    data: if zero { Bytes::new() } else { p },
                    offset: 0,
                    base: 0,
                    xor: false,
                },
            ));
        }
        items
    }

    async fn write_full(&self, spans: &[StripeSpan], data: &Segments) -> Result<(), BlockError> {
        let (k, m, chunk) = (self.k(), usize::from(self.sh.spec.profile.m), self.chunk());
        let stripes: Vec<u64> = spans.iter().map(|s| s.stripe).collect();
        let _g = self.sh.locks.lock_many(&stripes, true).await;
        for &s in &stripes {
            if self.needs_resolve(s) {
                self.resolve(s).await?;
            }
        }
        let mut items = Vec::new();
        for sp in spans {
            let base = sp.buf_offset as usize;
            // Each chunk straight out of the piece of the data that holds it.
            let chunks: Vec<Bytes> = (0..k)
                .map(|i| {
                    data.slice(base + i * chunk..base + (i + 1) * chunk)
                        .to_bytes()
                })
                .collect();
            // Parity buffers from the thread's pool of recently freed ones (the encoder
            // overwrites every byte, so they need no zeroing); they go back to it when the
            // fragment writes are done with them.
            let mut parity: Vec<AlignedBuf> = (0..m)
                .map(|_| AlignedBuf::for_overwrite(chunk, 64))
                .collect();
            {
                let dr: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
                let mut pr: Vec<&mut [u8]> = parity.iter_mut().map(|p| p.as_mut_slice()).collect();
                self.sh
                    .codec
                    .encode(&dr, &mut pr)
                    .map_err(|_| BlockError::Io(libc_einval()))?;
            }
            let parity: Vec<Bytes> = parity.into_iter().map(AlignedBuf::into_bytes).collect();
            let v = self.next_version();
            items.extend(self.stripe_items(sp.stripe, v, &chunks, parity));
        }
        let keys: Vec<(u64, usize)> = items.iter().map(|(s, i, _)| (*s, *i)).collect();
        let states: Vec<(u64, Manifest)> = items
            .iter()
            .filter(|(_, i, _)| *i == 0)
            .map(|(s, _, it)| (*s, it.manifest.clone()))
            .collect();
        let ok = self.write_frags_acking(items, Some(&HashMap::new())).await;
        let r = self.settle(&keys, &ok, &HashMap::new());
        if r.is_ok() {
            let w = self.width();
            for (n, (s, m)) in states.into_iter().enumerate() {
                let r = n * w..(n + 1) * w;
                if self.landed_or_down(&keys[r.clone()], &ok[r]) {
                    self.remember(s, m);
                }
            }
        }
        r
    }

    /// Count durable fragments per stripe; mark failures stale; a stripe below its quorum
    /// becomes suspect and fails the write. `already` counts fragments of each stripe's new
    /// state that were durable before (unmodified data chunks).
    fn settle(
        &self,
        keys: &[(u64, usize)],
        ok: &[bool],
        already: &HashMap<u64, usize>,
    ) -> Result<(), BlockError> {
        let quorum = self.sh.spec.write_quorum;
        let mut per: HashMap<u64, (usize, usize)> = HashMap::new();
        for ((s, i), good) in keys.iter().zip(ok) {
            let e = per.entry(*s).or_insert((0, 0));
            e.1 += 1;
            if *good {
                e.0 += 1;
            } else {
                self.mark_stale(self.node_of(*s, *i), *s);
            }
        }
        let mut result = Ok(());
        for (s, (good, sent)) in per {
            let durable = good + already.get(&s).copied().unwrap_or(0);
            if durable < quorum {
                let mut st = self.sh.state.lock().expect("volume state poisoned");
                st.suspect.insert(s);
                drop(st);
                self.fenced()?;
                if let Some(more) = self.sh.warned.allow("quorum") {
                    warn!(volume = %self.sh.spec.name, stripe = s, durable, quorum, repeated = more, "write did not reach its quorum");
                }
                result = Err(BlockError::Busy("write quorum not reached"));
            } else if good < sent {
                self.sh
                    .stats
                    .degraded_writes
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn write_partial(&self, sp: &StripeSpan, data: &Bytes) -> Result<(), BlockError> {
        let _g = self.sh.locks.lock(sp.stripe, true).await;
        match self.write_partial_locked(sp, data, false).await {
            // A node failed on the way: try once more writing every fragment, which needs no
            // unmodified fragment to count toward the quorum.
            Err(BlockError::Busy(_)) if self.fenced().is_ok() => {
                self.write_partial_locked(sp, data, true).await
            }
            r => r,
        }
    }

    async fn write_partial_locked(
        &self,
        sp: &StripeSpan,
        data: &Bytes,
        force_all: bool,
    ) -> Result<(), BlockError> {
        let (k, m, chunk) = (self.k(), usize::from(self.sh.spec.profile.m), self.chunk());
        let stripe = sp.stripe;
        if self.needs_resolve(stripe) {
            self.resolve(stripe).await?;
        }
        let pieces: Vec<_> = self.sh.geo.pieces(sp).collect();
        let written: BTreeSet<usize> = pieces.iter().map(|p| p.index).collect();
        let partial: BTreeSet<usize> = pieces
            .iter()
            .filter(|p| p.len < chunk)
            .map(|p| p.index)
            .collect();
        // Delta (old written chunks + parity) or re-encode (the other data chunks, plus old
        // copies of partly written chunks): whichever reads fewer fragments.
        let delta_reads = written.len() + m;
        let reencode_reads = (k - written.len()) + partial.len();
        let delta = m > 0 && delta_reads <= reencode_reads;
        let need: Vec<usize> = if delta {
            written.iter().copied().chain(k..k + m).collect()
        } else {
            (0..k)
                .filter(|i| !written.contains(i) || partial.contains(i))
                .collect()
        };
        let usable = |i: usize| {
            let n = self.node_of(stripe, i);
            !self.avoid(n) && !self.is_stale(n, stripe)
        };
        let healthy = need.iter().all(|&i| usable(i));
        // Unmodified data chunks count toward the quorum only on nodes known current; if
        // those and the fragments this write can reach fall short, rewrite the whole stripe.
        // (A slow node still holds its chunk: it counts; a down one may not.)
        let untouched_now = (0..k)
            .filter(|&i| {
                let n = self.node_of(stripe, i);
                !written.contains(&i) && !self.is_down(n) && !self.is_stale(n, stripe)
            })
            .count();
        let reachable_targets = written
            .iter()
            .copied()
            .chain(k..k + m)
            .filter(|&i| !self.is_down(self.node_of(stripe, i)))
            .count();
        let rewrite_all =
            force_all || untouched_now + reachable_targets < self.sh.spec.write_quorum;
        // The remembered-state paths read nothing but the written chunks' old bytes (from
        // their own nodes): parity nodes that are down or behind are simply left behind (their
        // deltas fail, they are marked behind), as long as the quorum can still be met.
        let written_usable = written.iter().all(|&i| usable(i));
        if delta && written_usable && !rewrite_all {
            if let Some(known) = self.remembered(stripe) {
                let whole_blocks = pieces
                    .iter()
                    .all(|p| p.start % 4096 == 0 && p.len % 4096 == 0);
                let based = written.iter().all(|&i| known.data.get(i) > Some(&0));
                if whole_blocks && based {
                    if let Some(r) = self
                        .write_swap(sp, data, &pieces, &written, untouched_now, known.clone())
                        .await
                    {
                        return r;
                    }
                } else if let Some(r) = self
                    .write_xor(sp, data, &pieces, &written, untouched_now, known)
                    .await
                {
                    return r;
                }
            }
        }
        if delta && healthy && !rewrite_all {
            if let Some(r) = self
                .write_delta(sp, data, &pieces, &written, untouched_now)
                .await
            {
                return r;
            }
        }
        let reads: Vec<(u64, usize, Want, u32, u32)> = need
            .iter()
            .map(|&i| (stripe, i, Want::Latest, 0, 0))
            .collect();
        let got = if healthy && !rewrite_all {
            self.read_frags(&reads).await
        } else {
            vec![Got::Unavailable; reads.len()]
        };
        fault::point("write:after-read").await;
        let all_ok = got
            .iter()
            .all(|g| matches!(g, Got::Data(..) | Got::Zero(_)));
        let all_missing = !got.is_empty() && got.iter().all(|g| matches!(g, Got::Missing));
        let content = |g: &Got| -> Vec<u8> {
            match g {
                Got::Data(d, _) => d.to_vec(),
                _ => vec![0u8; chunk],
            }
        };

        // Phase 1: the old state this write builds on.
        enum Old {
            /// Old copies of the written chunks and of the parity, and the state's versions.
            Delta(HashMap<usize, Vec<u8>>, Vec<Vec<u8>>, Vec<u64>),
            /// Every data chunk, and the state's versions (`None`: never written).
            Whole(Vec<Vec<u8>>, Option<Vec<u64>>),
        }
        let old = if !got.is_empty() && all_ok && self.consistent(&need, &got, delta) {
            if delta {
                let pm = got[written.len()].manifest().expect("parity read").clone();
                let olds: HashMap<usize, Vec<u8>> = written
                    .iter()
                    .zip(&got)
                    .map(|(i, g)| (*i, content(g)))
                    .collect();
                let parity: Vec<Vec<u8>> = got[written.len()..].iter().map(content).collect();
                Old::Delta(olds, parity, pm.data)
            } else {
                // Re-encode: the chunks read, and the written ones (partly written: their old
                // copy was read too; wholly written: zeroes, about to be replaced).
                let mut all = vec![vec![0u8; chunk]; k];
                let mut dv = vec![0u64; k];
                for (i, g) in need.iter().zip(&got) {
                    all[*i] = content(g);
                    dv[*i] = g.manifest().expect("read").version;
                }
                Old::Whole(all, Some(dv))
            }
        } else if all_missing && self.unwritten(stripe).await {
            Old::Whole(vec![vec![0u8; chunk]; k], None)
        } else {
            // Degraded, damaged or inconsistent: settle the stripe, then rebuild it whole.
            if got
                .iter()
                .any(|g| matches!(g, Got::Data(..) | Got::Zero(_)))
            {
                self.resolve(stripe).await?;
            }
            let (chunks, state) = self.read_whole(stripe).await?;
            Old::Whole(chunks, state.map(|s| s.data))
        };
        let old = match old {
            // Rewriting everything: the state's versions are all the new one.
            Old::Whole(chunks, Some(_)) if rewrite_all => Old::Whole(chunks, None),
            o => o,
        };

        // Phase 2: the new state, at a version above everything recovery may have written.
        let v = self.next_version();
        let mut new_chunks: HashMap<usize, Vec<u8>> = HashMap::new();
        let (parity, dv, all_chunks) = match old {
            Old::Delta(olds, mut parity, mut dv) => {
                for &i in &written {
                    new_chunks.insert(i, olds[&i].clone());
                }
                self.overlay(sp, data, &pieces, &mut new_chunks);
                for &i in &written {
                    let mut pr: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[..]).collect();
                    self.sh
                        .codec
                        .apply_delta(i, &olds[&i], &new_chunks[&i], &mut pr)
                        .map_err(|_| BlockError::Io(libc_einval()))?;
                    dv[i] = v;
                }
                (parity, dv, None)
            }
            Old::Whole(mut all, dv) => {
                for &i in &written {
                    new_chunks.insert(i, std::mem::take(&mut all[i]));
                }
                self.overlay(sp, data, &pieces, &mut new_chunks);
                for (i, c) in &new_chunks {
                    all[*i] = c.clone();
                }
                let parity = self.encode(&all)?;
                match dv {
                    Some(mut dv) => {
                        for &i in &written {
                            dv[i] = v;
                        }
                        (parity, dv, None)
                    }
                    // A first write: every fragment is written, untouched chunks as zeroes.
                    None => (parity, vec![v; k], Some(all)),
                }
            }
        };
        let first_write = all_chunks.is_some();
        let manifest = Manifest {
            version: v,
            data: dv,
        };
        let mut items = Vec::new();
        let targets: Vec<usize> = if first_write {
            (0..k).collect()
        } else {
            written.iter().copied().collect()
        };
        for i in targets {
            let bytes = match (&all_chunks, new_chunks.get(&i)) {
                (_, Some(c)) => c.clone(),
                (Some(all), None) => all[i].clone(),
                (None, None) => vec![0u8; chunk],
            };
            let zero = is_zero(&bytes);
            items.push((
                stripe,
                i,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: i as u8,
                    },
                    manifest: manifest.clone(),
                    zero,
                    data: if zero {
                        Bytes::new()
                    } else {
                        Bytes::from(bytes)
                    },
                    offset: 0,
                    base: 0,
                    xor: false,
                },
            ));
        }
        for (j, p) in parity.into_iter().enumerate() {
            let zero = is_zero(&p);
            items.push((
                stripe,
                k + j,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: (k + j) as u8,
                    },
                    manifest: manifest.clone(),
                    zero,
                    data: if zero { Bytes::new() } else { Bytes::from(p) },
                    offset: 0,
                    base: 0,
                    xor: false,
                },
            ));
        }
        // Unmodified data chunks on healthy nodes already hold their part of the new state.
        let untouched = if first_write {
            0
        } else {
            (0..k)
                .filter(|i| !written.contains(i))
                .filter(|&i| {
                    let n = self.node_of(stripe, i);
                    !self.is_down(n) && !self.is_stale(n, stripe)
                })
                .count()
        };
        let keys: Vec<(u64, usize)> = items.iter().map(|(s, i, _)| (*s, *i)).collect();
        let already: HashMap<u64, usize> = [(stripe, untouched)].into_iter().collect();
        let ok = self.write_frags_acking(items, Some(&already)).await;
        fault::point("write:before-ack").await;
        self.settle(&keys, &ok, &already)
    }

    /// The small-write fast path: read only the 4 KiB blocks each written chunk changes (and
    /// the same blocks of the parity), update the parity by the change, and send just those
    /// blocks, each as a new copy built on the node's current one. `None` if the reads did
    /// not come back whole and consistent (the caller takes the general path).
    async fn write_delta(
        &self,
        sp: &StripeSpan,
        data: &Bytes,
        pieces: &[tessera_ec::ChunkPiece],
        written: &BTreeSet<usize>,
        untouched: usize,
    ) -> Option<Result<(), BlockError>> {
        let (k, m) = (self.k(), usize::from(self.sh.spec.profile.m));
        let stripe = sp.stripe;
        let (win, hull) = self.windows(pieces);
        let mut reads = Self::window_reads(stripe, written, &win);
        for j in k..k + m {
            reads.push((
                stripe,
                j,
                Want::Latest,
                hull.0 as u32,
                (hull.1 - hull.0) as u32,
            ));
        }
        let got = self.read_frags(&reads).await;
        fault::point("write:after-read").await;
        let need: Vec<usize> = reads.iter().map(|r| r.1).collect();
        let sized = reads.iter().zip(&got).all(|(r, g)| match g {
            Got::Data(d, _) => d.len() == r.4 as usize,
            Got::Zero(_) => true,
            _ => false,
        });
        if !sized || !self.consistent(&need, &got, true) {
            return None;
        }
        let old = |pos: usize| -> Vec<u8> {
            match &got[pos] {
                Got::Data(d, _) => d.to_vec(),
                _ => vec![0u8; reads[pos].4 as usize],
            }
        };
        let pm = got[written.len()].manifest().expect("parity read").clone();
        let v = self.next_version();
        let mut parity: Vec<Vec<u8>> = (0..m).map(|j| old(written.len() + j)).collect();
        let mut items = Vec::new();
        let mut dv = pm.data.clone();
        for &i in written {
            dv[i] = v;
        }
        let manifest = Manifest {
            version: v,
            data: dv,
        };
        for (pos, &i) in written.iter().enumerate() {
            let w0 = win[&i].0;
            let after =
                match self.change(sp, data, pieces, i, win[&i], hull.0, old(pos), &mut parity) {
                    Ok(a) => a,
                    Err(e) => return Some(Err(e)),
                };
            let base = got[pos].manifest().expect("read").version;
            items.push((
                stripe,
                i,
                self.range_item(stripe, i, &manifest, w0, after, base),
            ));
        }
        for (j, p) in parity.into_iter().enumerate() {
            let base = got[written.len() + j].manifest().expect("read").version;
            items.push((
                stripe,
                k + j,
                self.range_item(stripe, k + j, &manifest, hull.0, p, base),
            ));
        }
        let keys: Vec<(u64, usize)> = items.iter().map(|(s, i, _)| (*s, *i)).collect();
        let already: HashMap<u64, usize> = [(stripe, untouched)].into_iter().collect();
        let ok = self.write_frags_acking(items, Some(&already)).await;
        fault::point("write:before-ack").await;
        let r = self.settle(&keys, &ok, &already);
        if r.is_ok() && self.landed_or_down(&keys, &ok) {
            self.remember(stripe, manifest);
        }
        Some(r)
    }

    /// A partial write of a stripe whose state is remembered: read the old copies of the
    /// written ranges only, then send the new ranges to their chunks and each parity chunk the
    /// change's encoding, which its node XORs into its newest copy (the one at the remembered
    /// version, or it refuses). `None`: the state was not as remembered; nothing was sent.
    async fn write_xor(
        &self,
        sp: &StripeSpan,
        data: &Bytes,
        pieces: &[tessera_ec::ChunkPiece],
        written: &BTreeSet<usize>,
        untouched: usize,
        known: Manifest,
    ) -> Option<Result<(), BlockError>> {
        let (k, m) = (self.k(), usize::from(self.sh.spec.profile.m));
        let stripe = sp.stripe;
        let (win, hull) = self.windows(pieces);
        let reads = Self::window_reads(stripe, written, &win);
        let got = self.read_frags(&reads).await;
        fault::point("write:after-read").await;
        let as_known = reads.iter().zip(&got).all(|(r, g)| {
            let at = g.manifest().map(|mf| mf.version) == known.data.get(r.1).copied();
            match g {
                Got::Data(d, _) => at && d.len() == r.4 as usize,
                Got::Zero(_) => at,
                _ => false,
            }
        });
        if !as_known {
            self.forget(stripe);
            return None;
        }
        let v = self.next_version();
        let mut dv = known.data.clone();
        for &i in written {
            dv[i] = v;
        }
        let manifest = Manifest {
            version: v,
            data: dv,
        };
        let mut contrib: Vec<Vec<u8>> = vec![vec![0u8; hull.1 - hull.0]; m];
        let mut items = Vec::new();
        for (pos, &i) in written.iter().enumerate() {
            let (w0, w1) = win[&i];
            let before = match &got[pos] {
                Got::Data(d, _) => d.to_vec(),
                _ => vec![0u8; w1 - w0],
            };
            let after =
                match self.change(sp, data, pieces, i, win[&i], hull.0, before, &mut contrib) {
                    Ok(a) => a,
                    Err(e) => return Some(Err(e)),
                };
            items.push((
                stripe,
                i,
                self.range_item(stripe, i, &manifest, w0, after, known.data[i]),
            ));
        }
        for (j, c) in contrib.into_iter().enumerate() {
            items.push((
                stripe,
                k + j,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: (k + j) as u8,
                    },
                    manifest: manifest.clone(),
                    zero: false,
                    data: Bytes::from(c),
                    offset: hull.0 as u32,
                    base: known.version,
                    xor: true,
                },
            ));
        }
        let keys: Vec<(u64, usize)> = items.iter().map(|(s, i, _)| (*s, *i)).collect();
        let already: HashMap<u64, usize> = [(stripe, untouched)].into_iter().collect();
        let ok = self.write_frags_acking(items, Some(&already)).await;
        fault::point("write:before-ack").await;
        let r = self.settle(&keys, &ok, &already);
        if r.is_ok() && self.landed_or_down(&keys, &ok) {
            self.remember(stripe, manifest);
        }
        Some(r)
    }

    /// A small write of whole 4 KiB blocks on a stripe whose settled state is remembered:
    /// each written chunk's node writes the range on its newest copy (which must be at the
    /// remembered version) and answers with the bytes replaced, so one round trip does what a
    /// read and a write did; then the parity nodes get the change's encoding as deltas, as in
    /// [`Self::write_xor`]. `None`: nothing was written (the nodes refused: their newest copy
    /// was not the remembered one, or its blocks were damaged), take another path.
    #[allow(clippy::too_many_arguments)]
    async fn write_swap(
        &self,
        sp: &StripeSpan,
        data: &Bytes,
        pieces: &[tessera_ec::ChunkPiece],
        written: &BTreeSet<usize>,
        untouched: usize,
        known: Manifest,
    ) -> Option<Result<(), BlockError>> {
        let (k, m) = (self.k(), usize::from(self.sh.spec.profile.m));
        let stripe = sp.stripe;
        let (win, hull) = self.windows(pieces);
        let v = self.next_version();
        let mut dv = known.data.clone();
        for &i in written {
            dv[i] = v;
        }
        let manifest = Manifest {
            version: v,
            data: dv,
        };
        let swaps: Vec<(u64, usize, WriteItem)> = written
            .iter()
            .map(|&i| {
                let (w0, w1) = win[&i];
                let mut after = vec![0u8; w1 - w0];
                for p in pieces.iter().filter(|p| p.index == i) {
                    let from = sp.buf_offset as usize + p.buf_offset;
                    after[p.start - w0..p.start - w0 + p.len]
                        .copy_from_slice(&data[from..from + p.len]);
                }
                let item = WriteItem {
                    key: FragKey {
                        stripe,
                        index: i as u8,
                    },
                    manifest: manifest.clone(),
                    zero: false,
                    data: Bytes::from(after),
                    offset: w0 as u32,
                    base: known.data[i],
                    xor: false,
                };
                (stripe, i, item)
            })
            .collect();
        let got = self.swap_frags(swaps).await;
        // The old bytes came back: this path's read.
        fault::point("write:after-read").await;
        if got.iter().all(|g| matches!(g, Swapped::Refused)) {
            self.forget(stripe);
            return None;
        }
        let mut keys: Vec<(u64, usize)> = written.iter().map(|&i| (stripe, i)).collect();
        let mut ok: Vec<bool> = written
            .iter()
            .zip(&got)
            .map(|(i, g)| matches!(g, Swapped::Old(b) if b.len() == win[i].1 - win[i].0))
            .collect();
        if !ok.iter().all(|b| *b) {
            // Some of the new state landed, but without every replaced range the parity
            // cannot follow: the stripe is suspect, and the caller's retry resolves it (rolling
            // the partial state back or forward) before it rewrites the stripe whole.
            self.forget(stripe);
            let r = self.settle(&keys, &ok, &HashMap::new());
            let mut st = self.sh.state.lock().expect("volume state poisoned");
            st.suspect.insert(stripe);
            drop(st);
            let busy = BlockError::Busy("a data fragment of a small write failed");
            return Some(Err(r.err().unwrap_or(busy)));
        }
        let mut contrib: Vec<Vec<u8>> = vec![vec![0u8; hull.1 - hull.0]; m];
        for (&i, g) in written.iter().zip(&got) {
            let Swapped::Old(before) = g else {
                unreachable!("checked above")
            };
            if let Err(e) = self.change(
                sp,
                data,
                pieces,
                i,
                win[&i],
                hull.0,
                before.to_vec(),
                &mut contrib,
            ) {
                return Some(Err(e));
            }
        }
        let mut items = Vec::with_capacity(m);
        for (j, c) in contrib.into_iter().enumerate() {
            keys.push((stripe, k + j));
            items.push((
                stripe,
                k + j,
                WriteItem {
                    key: FragKey {
                        stripe,
                        index: (k + j) as u8,
                    },
                    manifest: manifest.clone(),
                    zero: false,
                    data: Bytes::from(c),
                    offset: hull.0 as u32,
                    base: known.version,
                    xor: true,
                },
            ));
        }
        // The swapped data chunks are durable already, beside the untouched ones.
        let before: HashMap<u64, usize> =
            [(stripe, untouched + written.len())].into_iter().collect();
        ok.extend(self.write_frags_acking(items, Some(&before)).await);
        fault::point("write:before-ack").await;
        let already: HashMap<u64, usize> = [(stripe, untouched)].into_iter().collect();
        let r = self.settle(&keys, &ok, &already);
        if r.is_ok() && self.landed_or_down(&keys, &ok) {
            self.remember(stripe, manifest);
        }
        Some(r)
    }

    /// Each written chunk's window of whole 4 KiB blocks, and their hull (the parity range).
    #[allow(clippy::type_complexity)]
    fn windows(
        &self,
        pieces: &[tessera_ec::ChunkPiece],
    ) -> (HashMap<usize, (usize, usize)>, (usize, usize)) {
        const B: usize = 4096;
        let win: HashMap<usize, (usize, usize)> = pieces
            .iter()
            .map(|p| {
                (
                    p.index,
                    (p.start / B * B, (p.start + p.len).div_ceil(B) * B),
                )
            })
            .collect();
        let hull = (
            win.values().map(|w| w.0).min().unwrap_or(0),
            win.values().map(|w| w.1).max().unwrap_or(self.chunk()),
        );
        (win, hull)
    }

    /// Reads of the written chunks' windows.
    fn window_reads(
        stripe: u64,
        written: &BTreeSet<usize>,
        win: &HashMap<usize, (usize, usize)>,
    ) -> Vec<(u64, usize, Want, u32, u32)> {
        written
            .iter()
            .map(|&i| {
                let (w0, w1) = win[&i];
                (stripe, i, Want::Latest, w0 as u32, (w1 - w0) as u32)
            })
            .collect()
    }

    /// Chunk `i`'s new window (`before` with this write's pieces laid over it), with its
    /// change applied to `parity` (buffers covering the hull from `hull0`).
    #[allow(clippy::too_many_arguments)]
    fn change(
        &self,
        sp: &StripeSpan,
        data: &Bytes,
        pieces: &[tessera_ec::ChunkPiece],
        i: usize,
        (w0, w1): (usize, usize),
        hull0: usize,
        before: Vec<u8>,
        parity: &mut [Vec<u8>],
    ) -> Result<Vec<u8>, BlockError> {
        let mut after = before.clone();
        for p in pieces.iter().filter(|p| p.index == i) {
            let from = sp.buf_offset as usize + p.buf_offset;
            after[p.start - w0..p.start - w0 + p.len].copy_from_slice(&data[from..from + p.len]);
        }
        let mut pr: Vec<&mut [u8]> = parity
            .iter_mut()
            .map(|p| &mut p[w0 - hull0..w1 - hull0])
            .collect();
        self.sh
            .codec
            .apply_delta(i, &before, &after, &mut pr)
            .map_err(|_| BlockError::Io(libc_einval()))?;
        Ok(after)
    }

    /// A write of `bytes` at `offset` of a fragment: a whole-chunk write when it covers the
    /// chunk, else a new copy built on the node's copy at `base`.
    fn range_item(
        &self,
        stripe: u64,
        index: usize,
        m: &Manifest,
        offset: usize,
        bytes: Vec<u8>,
        base: u64,
    ) -> WriteItem {
        let key = FragKey {
            stripe,
            index: index as u8,
        };
        if offset == 0 && bytes.len() == self.chunk() {
            let zero = is_zero(&bytes);
            let data = if zero {
                Bytes::new()
            } else {
                Bytes::from(bytes)
            };
            return WriteItem::whole(key, m.clone(), zero, data);
        }
        WriteItem {
            key,
            manifest: m.clone(),
            zero: false,
            data: Bytes::from(bytes),
            offset: offset as u32,
            base,
            xor: false,
        }
    }

    /// Whether fragments read for a partial write belong to one stripe state.
    fn consistent(&self, need: &[usize], got: &[Got], delta: bool) -> bool {
        let k = self.k();
        if delta {
            // Every parity copy at the same version, and each written data chunk at the
            // version that state records for it.
            let parity: Vec<&Manifest> = need
                .iter()
                .zip(got)
                .filter(|(i, _)| **i >= k)
                .filter_map(|(_, g)| g.manifest())
                .collect();
            let Some(pm) = parity.first() else {
                return false;
            };
            if parity.iter().any(|p| p.version != pm.version) {
                return false;
            }
            need.iter().zip(got).filter(|(i, _)| **i < k).all(|(i, g)| {
                g.manifest()
                    .is_some_and(|mf| pm.data.get(*i) == Some(&mf.version))
            })
        } else {
            // Data chunks alone: their own manifests must agree on each other's versions.
            let ms: Vec<(usize, &Manifest)> = need
                .iter()
                .zip(got)
                .filter_map(|(i, g)| g.manifest().map(|m| (*i, m)))
                .collect();
            let Some(newest) = ms.iter().map(|(_, m)| *m).max_by_key(|m| m.version) else {
                return false;
            };
            ms.iter()
                .all(|(i, mf)| newest.data.get(*i).is_none_or(|v| *v == mf.version))
        }
    }

    /// A stripe with no fragment on enough nodes to have been written.
    async fn unwritten(&self, stripe: u64) -> bool {
        let views = self.versions(stripe).await;
        let answered = views.iter().filter(|v| v.is_some()).count();
        let with_copies = views.iter().flatten().filter(|v| !v.is_empty()).count();
        with_copies == 0
            && (answered >= (self.width() - self.k()).max(1) || answered == self.width())
    }

    fn overlay(
        &self,
        sp: &StripeSpan,
        data: &Bytes,
        pieces: &[tessera_ec::ChunkPiece],
        chunks: &mut HashMap<usize, Vec<u8>>,
    ) {
        let base = sp.buf_offset as usize;
        for p in pieces {
            let c = chunks.get_mut(&p.index).expect("written chunk prepared");
            let from = base + p.buf_offset;
            c[p.start..p.start + p.len].copy_from_slice(&data[from..from + p.len]);
        }
    }

    fn encode(&self, data: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, BlockError> {
        let m = usize::from(self.sh.spec.profile.m);
        let mut parity = vec![vec![0u8; self.chunk()]; m];
        let dr: Vec<&[u8]> = data.iter().map(|c| &c[..]).collect();
        let mut pr: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[..]).collect();
        self.sh
            .codec
            .encode(&dr, &mut pr)
            .map_err(|_| BlockError::Io(libc_einval()))?;
        Ok(parity)
    }

    async fn do_unmap(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(BlockError::OutOfRange);
        }
        // Zeroes, written in pieces of at most 64 stripes; whole stripes become zero
        // fragments (no data moves, space is given back).
        let step = self.sh.geo.stripe_bytes() * 64;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(step - at % step.max(1)).min(step);
            let zeros = Bytes::from(vec![0u8; n as usize]);
            self.do_write(at, zeros.into()).await?;
            at += n;
        }
        Ok(())
    }

    // ---- maintenance ---------------------------------------------------------------------

    /// One round of background work: check regions left dirty by an unclean stop, resync
    /// nodes that came back, repair damaged fragments, and clear idle regions from the
    /// intent log. Returns whether anything is left to do.
    pub async fn maintain(&self) -> bool {
        // 1. Regions dirty at open.
        let next = {
            let st = self.sh.state.lock().expect("volume state poisoned");
            st.resync.iter().next().copied()
        };
        if let Some(r) = next {
            if self.resync_region(r, None).await.is_ok() {
                let mut st = self.sh.state.lock().expect("volume state poisoned");
                st.resync.remove(&r);
                let rs = self.sh.spec.region_stripes;
                st.resolved.retain(|s| s / rs != r);
                info!(volume = %self.sh.spec.name, region = r, "region checked");
            }
        }
        // 2. Nodes that were behind.
        let stale: Vec<(usize, u64)> = {
            let st = self.sh.state.lock().expect("volume state poisoned");
            st.stale
                .iter()
                .enumerate()
                .filter_map(|(n, s)| s.iter().next().map(|r| (n, *r)))
                .collect()
        };
        for (node, r) in stale {
            // A node marked down is probed in the background (see `is_down`); one that is
            // not answers this round's checks itself.
            if self.is_down(node) {
                continue;
            }
            if self.resync_region(r, Some(node)).await.is_ok() {
                let mut st = self.sh.state.lock().expect("volume state poisoned");
                st.stale[node].remove(&r);
                info!(volume = %self.sh.spec.name, node = %self.name_of(node), region = r, "node caught up on region");
            }
        }
        // 3. Positions moved to new nodes.
        let filling = self.fill_step().await;
        // 4. Repairs.
        let repairs: Vec<u64> = {
            let st = self.sh.state.lock().expect("volume state poisoned");
            st.repair.iter().take(64).copied().collect()
        };
        for s in repairs {
            let _g = self.sh.locks.lock(s, true).await;
            if self.repair(s).await.is_ok() {
                let mut st = self.sh.state.lock().expect("volume state poisoned");
                st.repair.remove(&s);
            }
        }
        // 5. Idle regions out of the intent log.
        let _ = self.persist_intent(true).await;
        let (a, b, c, d) = self.pending();
        let unwhole = a + b + c > 0 || filling;
        if self.sh.unwhole.swap(unwhole, Ordering::SeqCst) && !unwhole {
            info!(volume = %self.sh.spec.name, "volume whole again: every node current, nothing to repair");
        }
        a + b + c + d > 0 || filling
    }

    /// Move fragment positions to other nodes: `map` (same shape as the spec's, indices into
    /// the connector's nodes, which may have grown since the open) replaces the map in
    /// force. Every position whose node changes is *filled*: from now on it is written on its
    /// new node, treated as behind there until the fill has checked its stripe, and the
    /// maintenance loop ([`EcVolume::maintain`]) rebuilds every stripe's fragment there from
    /// `k` others, in stripe order, within the rate limit ([`EcVolume::set_fill_rate`]).
    /// Positions of an unfinished earlier fill stay filling, and the fill starts over from
    /// the first stripe (stripes already whole cost one versions query per node per batch).
    /// `generation` names the new layout (the control plane's map epoch) in
    /// [`EcVolume::fill_progress`]. The nodes a position left are no longer used.
    pub fn remap(
        &self,
        map: Vec<Vec<usize>>,
        names: Vec<String>,
        generation: u64,
    ) -> Result<usize, String> {
        let width = self.width();
        let n = self.sh.connector.nodes();
        if map.len() != self.sh.spec.pgs as usize || map.iter().any(|r| r.len() != width) {
            return Err("the map does not match the PG count and stripe width".into());
        }
        if n > MAX_NODES || map.iter().flatten().any(|&i| i >= n) {
            return Err(format!(
                "the map names nodes the connector lacks (it has {n}, at most {MAX_NODES})"
            ));
        }
        let old = self.layout();
        let mut filling: HashMap<u32, Vec<usize>> = HashMap::new();
        let mut moved = 0;
        for (pg, row) in map.iter().enumerate() {
            for (pos, &node) in row.iter().enumerate() {
                let pg32 = pg as u32;
                let changed = old.map[pg][pos] != node;
                let unfinished = old.filling.get(&pg32).is_some_and(|ps| ps.contains(&pos));
                if changed {
                    moved += 1;
                }
                if changed || unfinished {
                    filling.entry(pg32).or_default().push(pos);
                }
            }
        }
        let used: HashSet<usize> = map.iter().flatten().copied().collect();
        let mut names = names;
        if names.len() < n {
            names.extend((names.len()..n).map(|i| format!("#{i}")));
        }
        {
            let mut st = self.sh.state.lock().expect("volume state poisoned");
            if st.stale.len() < n {
                st.stale.resize(n, BTreeSet::new());
            }
            // Nodes no longer in the map hold nothing this volume will read.
            for (i, s) in st.stale.iter_mut().enumerate() {
                if !used.contains(&i) {
                    s.clear();
                }
            }
            // Remembered stripe states name the old nodes' copies.
            st.manifests.clear();
        }
        let fills = !filling.is_empty();
        if moved > 0 || fills {
            self.sh.fill_cursor.store(0, Ordering::Release);
        }
        *self.sh.layout.write().expect("volume layout poisoned") = Arc::new(Layout {
            map,
            names,
            filling,
        });
        if fills {
            let mut f = self.sh.fill.lock().expect("volume fill poisoned");
            *f = Fill {
                generation,
                bytes: 0,
                started: Instant::now(),
                next_at: Instant::now(),
                finished: false,
                epoch_told: false,
                active: true,
            };
        }
        info!(volume = %self.sh.spec.name, generation, moved, "placement changed: moved positions are being filled");
        self.note_suspension();
        Ok(moved)
    }

    /// Delete from `node` (an index of the connector) its fragments of position `index` of
    /// PG `pg`, which the node left in an earlier layout: once a position has moved, its old
    /// node's copies are never read again. Stripe by stripe under the stripes' locks, and only
    /// while the layout in force does not place `node` there (a node given its position back
    /// keeps it: its copies are being filled again). Returns the fragments trimmed (0 when
    /// the node holds the position again).
    pub async fn trim_position(&self, node: usize, pg: u32, index: usize) -> Result<u64, String> {
        if node >= self.sh.connector.nodes() || pg >= self.sh.spec.pgs || index >= self.width() {
            return Err(format!("no position {pg}/{index} on node #{node}"));
        }
        let mine: Vec<u64> = (0..self.stripes())
            .filter(|&s| placement::pg_of(s, self.sh.spec.pgs) == pg)
            .collect();
        let mut trimmed = 0;
        for batch in mine.chunks(256) {
            let _g = self.sh.locks.lock_many(batch, true).await;
            if self.layout().map[pg as usize][index] == node {
                return Ok(trimmed);
            }
            let items: Vec<FragKey> = batch
                .iter()
                .map(|&stripe| FragKey {
                    stripe,
                    index: index as u8,
                })
                .collect();
            match self
                .call(
                    node,
                    Request::Trim {
                        vol: self.ctx(),
                        items,
                    },
                )
                .await
            {
                Ok(Response::Trim(st)) if st.iter().all(|s| *s == Status::OK) => {
                    trimmed += st.len() as u64;
                    self.sh
                        .stats
                        .trimmed_fragments
                        .fetch_add(st.len() as u64, Ordering::Relaxed);
                }
                Ok(r) => return Err(format!("trim answered {r:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(trimmed)
    }

    /// After an open: positions `(pg, index)` of the spec's map are on nodes still being
    /// filled (an earlier owner's fill, interrupted), every stripe below `from_stripe`
    /// already filled. The fill carries on from there.
    pub fn resume_fill(&self, positions: &[(u32, usize)], from_stripe: u64, generation: u64) {
        if positions.is_empty() {
            return;
        }
        let mut filling: HashMap<u32, Vec<usize>> = HashMap::new();
        for &(pg, pos) in positions {
            if pg < self.sh.spec.pgs && pos < self.width() {
                filling.entry(pg).or_default().push(pos);
            }
        }
        self.sh.fill_cursor.store(from_stripe, Ordering::Release);
        {
            let mut l = self.sh.layout.write().expect("volume layout poisoned");
            let mut next = (**l).clone();
            next.filling = filling;
            *l = Arc::new(next);
        }
        *self.sh.fill.lock().expect("volume fill poisoned") = Fill {
            generation,
            bytes: 0,
            started: Instant::now(),
            next_at: Instant::now(),
            finished: false,
            epoch_told: false,
            active: true,
        };
        info!(volume = %self.sh.spec.name, generation, from_stripe, "resuming an interrupted fill");
    }

    /// Limit fills to `bytes_per_sec` written (0: unlimited). Takes effect at the next step.
    pub fn set_fill_rate(&self, bytes_per_sec: u64) {
        let was = self.sh.fill_rate.swap(bytes_per_sec, Ordering::Relaxed);
        if was != bytes_per_sec {
            // The wait the old limit imposed is void; the next step computes its own.
            self.sh.fill.lock().expect("volume fill poisoned").next_at = Instant::now();
        }
    }

    /// The fill in progress or last finished (`None`: none since the open).
    pub fn fill_progress(&self) -> Option<FillProgress> {
        let f = self.sh.fill.lock().expect("volume fill poisoned");
        if !f.active {
            return None;
        }
        let stripes = self.stripes();
        let done = if f.finished {
            stripes
        } else {
            self.sh.fill_cursor.load(Ordering::Acquire).min(stripes)
        };
        let secs = f.started.elapsed().as_secs_f64().max(1e-3);
        let rate = f.bytes as f64 / secs;
        let eta_secs = if f.finished {
            Some(0.0)
        } else if done > 0 {
            Some(secs * (stripes - done) as f64 / done as f64)
        } else {
            None
        };
        Some(FillProgress {
            generation: f.generation,
            stripes,
            done,
            bytes: f.bytes,
            rate,
            eta_secs,
            finished: f.finished,
        })
    }

    /// The current positions still being filled, as `(pg, index)`.
    pub fn filling(&self) -> Vec<(u32, usize)> {
        let l = self.layout();
        let mut v: Vec<(u32, usize)> = l
            .filling
            .iter()
            .flat_map(|(pg, ps)| ps.iter().map(move |p| (*pg, *p)))
            .collect();
        v.sort_unstable();
        v
    }

    /// One step of the fill: check (and rebuild where needed) the next batch of stripes.
    /// Returns whether a fill is in progress.
    async fn fill_step(&self) -> bool {
        let layout = self.layout();
        if layout.filling.is_empty() {
            return false;
        }
        let tell = {
            let f = self.sh.fill.lock().expect("volume fill poisoned");
            if Instant::now() < f.next_at {
                return true;
            }
            !f.epoch_told
        };
        if tell {
            // A node new to the volume learns its epoch before anything is written there, so
            // an older owner cut off from the control plane cannot write to it either.
            let targets: HashSet<usize> = layout
                .filling
                .iter()
                .flat_map(|(pg, ps)| ps.iter().map(|&p| layout.map[*pg as usize][p]))
                .collect();
            let calls = targets.into_iter().map(|node| {
                let req = Request::Epoch {
                    volume: self.sh.spec.id,
                    epoch: self.sh.epoch,
                };
                async move { self.call(node, req).await }
            });
            let all = join_all(calls)
                .await
                .iter()
                .all(|r| matches!(r, Ok(Response::Epoch(e)) if *e == self.sh.epoch));
            if all {
                self.sh
                    .fill
                    .lock()
                    .expect("volume fill poisoned")
                    .epoch_told = true;
            }
        }
        let total = self.stripes();
        let first = self.sh.fill_cursor.load(Ordering::Acquire);
        if first >= total {
            let finished = {
                let mut l = self.sh.layout.write().expect("volume layout poisoned");
                if Arc::ptr_eq(&l, &layout) {
                    let mut next = (**l).clone();
                    next.filling.clear();
                    *l = Arc::new(next);
                    true
                } else {
                    false // remapped meanwhile: the next step starts the new fill
                }
            };
            if finished {
                let mut f = self.sh.fill.lock().expect("volume fill poisoned");
                f.finished = true;
                info!(volume = %self.sh.spec.name, generation = f.generation, bytes = f.bytes, secs = format!("{:.1}", f.started.elapsed().as_secs_f64()), "fill finished: every moved position is whole");
            }
            return !finished;
        }
        let last = (first + FILL_BATCH).min(total);
        let before = self.sh.stats.repaired_fragments.load(Ordering::Relaxed);
        let t = Instant::now();
        let r = self.resync_range(first, last, None).await;
        let wrote = self.sh.stats.repaired_fragments.load(Ordering::Relaxed) - before;
        let bytes = wrote * self.chunk() as u64;
        let rate = self.sh.fill_rate.load(Ordering::Relaxed);
        let mut f = self.sh.fill.lock().expect("volume fill poisoned");
        f.bytes += bytes;
        if r.is_err() {
            // A stripe that cannot be settled yet (too many nodes away): try again shortly.
            f.next_at = Instant::now() + Duration::from_secs(1);
            return true;
        }
        // A remap meanwhile reset the cursor: leave it there.
        let _ =
            self.sh
                .fill_cursor
                .compare_exchange(first, last, Ordering::AcqRel, Ordering::Acquire);
        if rate > 0 && bytes > 0 {
            f.next_at = t + Duration::from_secs_f64(bytes as f64 / rate as f64);
        }
        true
    }

    /// Resolve every stripe of region `r` that is not whole (for a returning `node`, only
    /// those where it differs).
    async fn resync_region(&self, r: u64, node: Option<usize>) -> Result<(), BlockError> {
        let rs = self.sh.spec.region_stripes;
        self.resync_range(r * rs, ((r + 1) * rs).min(self.stripes()), node)
            .await
    }

    /// Resolve every stripe of `first..last` that is not whole (for a returning `node`, only
    /// those where it differs).
    async fn resync_range(
        &self,
        first: u64,
        last: u64,
        node: Option<usize>,
    ) -> Result<(), BlockError> {
        if first >= last {
            return Ok(());
        }
        // One versions query per node of the map for the whole range.
        let vol = self.ctx();
        let n = self.sh.connector.nodes();
        let calls = self.used_nodes().into_iter().map(|nd| {
            let req = Request::Versions {
                vol,
                first,
                count: (last - first) as u32,
            };
            async move { (nd, self.call(nd, req).await) }
        });
        let mut by_stripe: HashMap<u64, Vec<(usize, usize, Vec<SlotInfo>)>> = HashMap::new();
        let mut answered = vec![false; n];
        for (nd, res) in join_all(calls).await {
            if let Ok(Response::Versions(entries)) = res {
                answered[nd] = true;
                for e in entries {
                    by_stripe.entry(e.key.stripe).or_default().push((
                        nd,
                        usize::from(e.key.index),
                        e.slots,
                    ));
                }
            }
        }
        if let Some(nd) = node {
            if !answered[nd] {
                return Err(BlockError::Busy("node did not answer"));
            }
        }
        let width = self.width();
        let mut work = Vec::new();
        for s in first..last {
            let entries = by_stripe.get(&s);
            let Some(entries) = entries else {
                continue; // never written
            };
            // Whole: every position has a copy, all agree on the newest state.
            let newest = entries
                .iter()
                .filter(|(nd, idx, _)| *nd == self.node_of(s, *idx))
                .flat_map(|(_, _, sl)| sl.iter())
                .max_by_key(|x| x.manifest.version)
                .map(|x| x.manifest.clone());
            let Some(m) = newest else { continue };
            let whole = (0..width).all(|i| {
                let nd = self.node_of(s, i);
                answered[nd]
                    && entries.iter().any(|(at, idx, sl)| {
                        *at == nd
                            && *idx == i
                            && sl
                                .first()
                                .is_some_and(|top| top.manifest.version == self.expected(&m, i))
                    })
            });
            if !whole {
                work.push(s);
            }
        }
        let mut result = Ok(());
        for s in work {
            let _g = self.sh.locks.lock(s, true).await;
            if let Err(e) = self.resolve(s).await {
                result = Err(e);
            }
        }
        result
    }

    /// Re-read every fragment of `stripe` in full and rewrite any that is damaged, missing or
    /// behind (caller holds the stripe).
    async fn repair(&self, stripe: u64) -> Result<(), BlockError> {
        self.resolve(stripe).await?;
        let width = self.width();
        let reads: Vec<(u64, usize, Want, u32, u32)> = (0..width)
            .map(|i| (stripe, i, Want::Latest, 0, 0))
            .collect();
        let got = self.read_frags(&reads).await;
        let Some(m) = got
            .iter()
            .filter_map(Got::manifest)
            .max_by_key(|m| m.version)
            .cloned()
        else {
            return Ok(());
        };
        let consistent: Vec<bool> = got
            .iter()
            .enumerate()
            .map(|(i, g)| {
                g.manifest()
                    .is_some_and(|mf| mf.version == self.expected(&m, i))
            })
            .collect();
        if consistent.iter().all(|c| *c) {
            return Ok(());
        }
        let views: Vec<Option<Vec<SlotInfo>>> = got
            .iter()
            .map(|g| match g {
                Got::Unavailable => None,
                _ => Some(Vec::new()),
            })
            .collect();
        let junk = vec![Vec::new(); width];
        if self.rewrite(stripe, &m, &consistent, &junk, &views).await? {
            Ok(())
        } else {
            Err(BlockError::Medium)
        }
    }
}

/// What a volume scrub found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubStats {
    /// Stripes that hold data.
    pub stripes: u64,
    /// Stripes with a fragment missing, damaged, behind, or of another state.
    pub inconsistent: u64,
    /// Stripes whose parity does not match their data.
    pub parity_mismatches: u64,
}

impl EcVolume {
    /// Read every fragment of every stripe and check that each stripe is whole: every
    /// fragment present at the stripe's state, and the parity matching the data. Stripes that
    /// are not whole are queued for repair ([`EcVolume::maintain`]).
    pub async fn scrub(&self) -> ScrubStats {
        let (k, width, chunk) = (self.k(), self.width(), self.chunk());
        let mut out = ScrubStats::default();
        for stripe in 0..self.stripes() {
            let _g = self.sh.locks.lock(stripe, false).await;
            let reads: Vec<(u64, usize, Want, u32, u32)> = (0..width)
                .map(|i| (stripe, i, Want::Latest, 0, 0))
                .collect();
            let got = self.read_frags(&reads).await;
            if got.iter().all(|g| matches!(g, Got::Missing)) {
                continue;
            }
            out.stripes += 1;
            let Some(m) = got
                .iter()
                .filter_map(Got::manifest)
                .max_by_key(|m| m.version)
                .cloned()
            else {
                out.inconsistent += 1;
                let mut st = self.sh.state.lock().expect("volume state poisoned");
                st.repair.insert(stripe);
                continue;
            };
            let whole = got.iter().enumerate().all(|(i, g)| {
                g.manifest()
                    .is_some_and(|mf| mf.version == self.expected(&m, i))
            });
            if !whole {
                out.inconsistent += 1;
                let mut st = self.sh.state.lock().expect("volume state poisoned");
                st.repair.insert(stripe);
                continue;
            }
            let shards: Vec<Vec<u8>> = got
                .iter()
                .map(|g| match g {
                    Got::Data(d, _) => d.to_vec(),
                    _ => vec![0u8; chunk],
                })
                .collect();
            let views: Vec<&[u8]> = shards.iter().map(|x| &x[..]).collect();
            if !self.sh.codec.verify(&views).unwrap_or(false) {
                out.parity_mismatches += 1;
                warn!(volume = %self.sh.spec.name, stripe, "parity does not match data");
            }
            let _ = k;
        }
        out
    }
}

fn libc_einval() -> i32 {
    22
}

fn libc_eio() -> i32 {
    5
}

/// Counts a write as in flight in its regions (the intent log keeps them dirty meanwhile).
struct Inflight<'a> {
    vol: &'a EcVolume,
    regions: Vec<u64>,
}

impl<'a> Inflight<'a> {
    fn new(vol: &'a EcVolume, regions: &BTreeSet<u64>) -> Self {
        let mut st = vol.sh.state.lock().expect("volume state poisoned");
        for r in regions {
            *st.inflight.entry(*r).or_insert(0) += 1;
        }
        drop(st);
        Self {
            vol,
            regions: regions.iter().copied().collect(),
        }
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut st = self.vol.sh.state.lock().expect("volume state poisoned");
        let now = Instant::now();
        for r in &self.regions {
            if let Some(n) = st.inflight.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    st.inflight.remove(r);
                }
            }
            st.last_write.insert(*r, now);
        }
    }
}

/// The acknowledgement of one write in progress: which of its stripes have their quorum.
struct AckState {
    stripes: usize,
    done: std::cell::RefCell<HashSet<u64>>,
    tx: std::cell::RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
}

tokio::task_local! {
    static ACK: std::rc::Rc<AckState>;
}

/// The last step of a write reached the write quorum for `stripes`: once every stripe of the
/// write has, its caller is answered (the write goes on to its end meanwhile). Outside a write
/// (a repair, a recovery) nothing happens.
fn ack_stripes(stripes: impl Iterator<Item = u64>) {
    let _ = ACK.try_with(|a| {
        let mut done = a.done.borrow_mut();
        done.extend(stripes);
        if done.len() >= a.stripes {
            if let Some(tx) = a.tx.borrow_mut().take() {
                let _ = tx.send(());
            }
        }
    });
}

impl EcVolume {
    /// [`EcVolume::to_the_end`] for a write of `stripes` stripes: its caller is answered as
    /// soon as every stripe has its write quorum durable (see [`ack_stripes`]), or with its
    /// error when it ends without.
    fn write_to_the_end(
        &self,
        stripes: usize,
        op: impl std::future::Future<Output = Result<(), BlockError>> + 'static,
    ) -> LocalBoxFuture<'static, Result<(), BlockError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = std::rc::Rc::new(AckState {
            stripes: stripes.max(1),
            done: Default::default(),
            tx: std::cell::RefCell::new(Some(tx)),
        });
        let mut whole = self.to_the_end(ACK.scope(state, op));
        Box::pin(async move {
            tokio::select! {
                r = &mut whole => r,
                a = rx => match a {
                    Ok(()) => Ok(()),
                    // Ended without every stripe at its quorum: its own answer says why.
                    Err(_) => whole.await,
                },
            }
        })
    }

    /// Run an operation as its own task, so that it runs to its end whatever becomes of the
    /// caller: a command aborted by ABORT TASK or a LUN reset, or whose connection is lost,
    /// drops the returned future, but a started write keeps its stripe locks and its regions
    /// in the intent log until no fragment request of it is left in flight (COMMIT.md, "A
    /// started write runs to its end"). The caller that waits sees its result.
    fn to_the_end<T: 'static>(
        &self,
        op: impl std::future::Future<Output = Result<T, BlockError>> + 'static,
    ) -> LocalBoxFuture<'static, Result<T, BlockError>> {
        struct Running(Arc<AtomicU64>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.sh.running.fetch_add(1, Ordering::AcqRel);
        let counted = Running(self.sh.running.clone());
        let task = tokio::task::spawn_local(async move {
            let _counted = counted;
            op.await
        });
        Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                error!("volume operation failed: {e}");
                Err(BlockError::Io(libc_eio()))
            })
        })
    }

    /// How many stripes a write of `len` bytes at `offset` touches (0 when it is empty or
    /// out of range: such a write ends at once).
    fn stripes_of(&self, offset: u64, len: usize) -> usize {
        if len == 0
            || offset
                .checked_add(len as u64)
                .is_none_or(|e| e > self.size())
        {
            return 0;
        }
        self.sh.geo.spans(offset, len as u64).count()
    }

    /// Run a write (`attempt` starts one try of it) until it succeeds, fails for a reason
    /// other than too few nodes answering, or has waited [`EcVolume::set_quorum_wait`] for
    /// its quorum: then it fails with [`BlockError::Suspended`], which initiators do not
    /// retry for ever. Each try runs to its end; a caller that goes away (an aborted
    /// command) starts no further try. A fenced volume fails at once.
    fn patiently<F, Fut>(&self, attempt: F) -> LocalBoxFuture<'static, Result<(), BlockError>>
    where
        F: Fn() -> Fut + 'static,
        Fut: std::future::Future<Output = Result<(), BlockError>> + 'static,
    {
        let v = self.clone();
        Box::pin(async move {
            let start = Instant::now();
            loop {
                match attempt().await {
                    Err(BlockError::Busy(why))
                        if v.fenced().is_ok() && !v.sh.closed.load(Ordering::Acquire) =>
                    {
                        let (bound, gone) = (v.quorum_wait(), start.elapsed());
                        if gone >= bound {
                            v.sh.stats.suspended_writes.fetch_add(1, Ordering::Relaxed);
                            if let Some(more) = v.sh.warned.allow("suspended") {
                                warn!(volume = %v.sh.spec.name, waited = ?gone, repeated = more, "write failed: no quorum within the wait bound ({why})");
                            }
                            return Err(BlockError::Suspended(why));
                        }
                        tokio::time::sleep(QUORUM_RETRY.min(bound - gone)).await;
                    }
                    r => return r,
                }
            }
        })
    }

    /// Operations started through [`BlockDevice`] and not yet finished (whether or not their
    /// callers still wait for them).
    pub fn running(&self) -> u64 {
        self.sh.running.load(Ordering::Acquire)
    }
}

impl BlockDevice for EcVolume {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size_bytes: self.size(),
            thin: true,
            unmap_granularity: u32::try_from(self.sh.geo.stripe_bytes()).unwrap_or(u32::MAX),
            direct: true,
        }
    }

    fn read(&self, offset: u64, len: usize) -> BlockFuture<'_, Bytes> {
        // A read may resolve a stripe (which writes): it runs to its end too.
        let v = self.clone();
        self.to_the_end(async move { v.do_read(offset, len).await })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockFuture<'_> {
        self.write_segments(offset, data.into(), fua)
    }

    fn write_segments(&self, offset: u64, data: Segments, _fua: bool) -> BlockFuture<'_> {
        // Every acknowledged write is durable on its quorum: FUA asks for nothing more.
        let v = self.clone();
        let stripes = self.stripes_of(offset, data.len());
        self.patiently(move || {
            let (v, data) = (v.clone(), data.clone());
            v.clone()
                .write_to_the_end(stripes, async move { v.do_write(offset, data).await })
        })
    }

    fn flush(&self) -> BlockFuture<'_> {
        Box::pin(async move { self.fenced() })
    }

    fn unmap(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        let v = self.clone();
        self.patiently(move || {
            let v = v.clone();
            v.clone()
                .to_the_end(async move { v.do_unmap(offset, len).await })
        })
    }

    fn extents(&self, offset: u64, len: u64) -> BlockFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            Ok(vec![Extent {
                offset,
                len,
                mapped: true,
            }])
        })
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::Limiter;

    #[test]
    fn a_repeated_warning_is_let_through_once_per_period_with_the_count_held_back() {
        let l = Limiter::default();
        assert_eq!(l.allow("a"), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow("a"), None);
        }
        assert_eq!(l.allow("b"), Some(0), "keys are apart");
        // The period passes.
        l.last.lock().unwrap().get_mut("a").unwrap().0 -= Limiter::EVERY;
        assert_eq!(l.allow("a"), Some(5));
        assert_eq!(l.allow("a"), None);
    }
}
