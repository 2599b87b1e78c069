//! The gateway's part in the cluster (`[cluster]` in its configuration).
//!
//! One thread, with its own runtime, that:
//! - numbers the gateway in the cluster once (its target portal group tag, SCSI target port
//!   group and relative target port on the cluster target), registers it in etcd under a
//!   lease with its portals and forwarding address, and keeps the lease alive;
//! - campaigns to be the controller (an etcd election); while it is, it makes the first
//!   placement map of every volume that has none;
//! - exports every volume as LUN `lun` of the cluster target. Each volume has one owner:
//!   the gateway weighted rendezvous hashing prefers among the live ones
//!   ([`tessera_cluster::preferred_owner`]). The owner takes it (fencing epoch raised in etcd,
//!   owner key under its lease), opens it with that epoch and executes its commands; every
//!   other gateway forwards each command for it to the owner ([`super::forward`]), so
//!   reservations, COMPARE AND WRITE and ordering hold cluster-wide. With no owner (a takeover
//!   in progress) commands get NOT READY, ASYMMETRIC ACCESS STATE TRANSITION, which initiators
//!   retry;
//! - hands a volume over when another gateway, live for a few seconds, is preferred (a
//!   gateway joined): it stops using it and releases the owner key, and the preferred gateway
//!   takes it. A volume unowned for a few seconds is taken by any gateway (the preferred one
//!   cannot open it);
//! - reports ALUA: the owner's port group active/optimized, the others active/non-optimized;
//!   a logical unit that took a volume over greets every nexus with ASYMMETRIC ACCESS STATE
//!   CHANGED;
//! - keeps persistent reservations in etcd, written only while the owner key is held.
//!
//! Self-fencing: the lease is renewed every fifth of its TTL. When two thirds of the TTL pass
//! without a renewal etcd confirmed (counted from when the renewal was sent), the gateway
//! stops writing every volume it owns (writes get BUSY, which initiators retry) before the
//! lease can expire and another gateway can take them over. When it reaches etcd again it
//! registers anew and takes back, with new epochs, the volumes nobody else took.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::metrics;
use tessera_cluster::rebuild::{self, Hold, PlanInput};
use tessera_cluster::{stable_hash, Cluster, FillRecord, GatewayRecord, PgMapRecord, VolumeRecord};
use tessera_proto::scsi::Sense;
use tessera_scsi::{
    status, Alua, LogicalUnit, LuConfig, Nexus, PrStore, RemoteLun, ScsiCommand, ScsiResult,
    TmfFunction, TmfResponse,
};
use tessera_volume::nodes::{Connector, RpcConnector};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::forward::{self, Request, Response};
use super::{revision, Gateway};
use crate::config::ClusterConfig;

/// A preferred gateway must have been live this long before an owner hands a volume over.
const HANDOVER_AFTER: Duration = Duration::from_secs(3);
/// A volume unowned this long is taken by any gateway, preferred or not.
const TAKE_ANY_AFTER: Duration = Duration::from_secs(3);
/// Forwarded commands not answered in this long fail (retryably).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

type Ready = Arc<(Mutex<bool>, Condvar)>;

fn signal_ready(ready: &Ready) {
    let (lock, cv) = &**ready;
    *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
    cv.notify_all();
}

/// Run the cluster agent until shutdown. `forward` is the bound listener other gateways
/// forward commands to.
pub(super) fn run(
    gw: Arc<Gateway>,
    cl: ClusterConfig,
    portals: Vec<SocketAddr>,
    forward: std::net::TcpListener,
    ready: Ready,
    shutdown: watch::Receiver<bool>,
) {
    let forward_addr = match forward.local_addr() {
        Ok(a) => a,
        Err(e) => {
            error!("forwarding listener: {e}");
            signal_ready(&ready);
            return;
        }
    };
    let server = match forward::serve(
        forward,
        forward::once(handler(gw.clone(), &cl)),
        shutdown.clone(),
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            error!("cannot serve forwarded commands: {e}");
            None
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cluster runtime: {e}");
            signal_ready(&ready);
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, agent(gw, cl, portals, forward_addr, ready, shutdown));
    if let Some(t) = server {
        let _ = t.join();
    }
}

/// NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION: the volume is
/// between owners; initiators retry.
fn transitioning() -> ScsiResult {
    ScsiResult {
        status: status::CHECK_CONDITION,
        sense: Some(
            Sense::ASYMMETRIC_ACCESS_STATE_TRANSITION
                .encode(false)
                .into(),
        ),
        data_in: Default::default(),
        transfer_len: 0,
    }
}

/// CHECK CONDITION with `sense`.
fn check(sense: Sense) -> ScsiResult {
    ScsiResult {
        status: status::CHECK_CONDITION,
        sense: Some(sense.encode(false).into()),
        data_in: Default::default(),
        transfer_len: 0,
    }
}

/// Forwarded nexuses: (origin port group, origin nexus id) → the nexus here.
type NexusMap = HashMap<(u16, u64), Arc<Nexus>>;

/// The owner's side: forwarded requests run on the local logical unit, for a nexus that
/// carries the initiator's and the receiving gateway's port identities.
fn handler(gw: Arc<Gateway>, cl: &ClusterConfig) -> forward::Handler {
    let key = cl.target.to_ascii_lowercase();
    let nexuses: Arc<Mutex<NexusMap>> = Arc::default();
    Arc::new(move |req: Request| {
        let gw = gw.clone();
        let key = key.clone();
        let nexuses = nexuses.clone();
        Box::pin(async move {
            let Some(target) = gw.target(&key) else {
                return match req {
                    Request::Execute { .. } => Response::Executed(transitioning()),
                    Request::TaskMgmt { .. } => Response::TaskMgmt(TmfResponse::NoSuchLun),
                    Request::NexusGone { .. } => Response::Done,
                };
            };
            let local = |n: &Nexus| -> Arc<Nexus> {
                let mut m = nexuses.lock().unwrap_or_else(|e| e.into_inner());
                m.entry((n.port_group, n.id))
                    .or_insert_with(|| {
                        Arc::new(Nexus {
                            id: gw.alloc_nexus_id(),
                            ..n.clone()
                        })
                    })
                    .clone()
            };
            match req {
                Request::Execute {
                    nexus, lun, cmd, ..
                } => match target.lun(lun) {
                    Some(lu) => Response::Executed(lu.execute(&local(&nexus), &cmd).await),
                    None => Response::Executed(transitioning()),
                },
                Request::TaskMgmt {
                    nexus,
                    lun,
                    function,
                } => match target.lun(lun) {
                    Some(_) => Response::TaskMgmt(
                        target
                            .task_mgmt(
                                &local(&nexus),
                                tessera_proto::scsi::luns::encode(lun),
                                function,
                            )
                            .await,
                    ),
                    None => Response::TaskMgmt(TmfResponse::Complete),
                },
                Request::NexusGone { nexus } => {
                    let mine = nexuses
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(nexus.port_group, nexus.id));
                    if let Some(n) = mine {
                        // Local logical units only: a remote one would forward it on.
                        for l in target.luns() {
                            if let Some(lu) = target.lun(l) {
                                lu.nexus_gone(&n);
                            }
                        }
                    }
                    Response::Done
                }
            }
        })
    })
}

/// A LUN whose volume another gateway owns (or, with no client, nobody owns right now).
struct Forwarded {
    lun: u64,
    to: Option<forward::Client>,
}

impl RemoteLun for Forwarded {
    fn execute<'a>(
        &'a self,
        nexus: &'a Nexus,
        cmd: &'a ScsiCommand,
    ) -> tessera_proto::block::LocalBoxFuture<'a, ScsiResult> {
        Box::pin(async move {
            let Some(c) = &self.to else {
                return transitioning();
            };
            match forward::execute_once(c, nexus, self.lun, cmd).await {
                Ok(r) => r,
                // Provably not run: the initiator retries it (with the new owner, if any).
                Err(forward::Unanswered::NotRun(e)) => {
                    debug!(owner = %c.addr(), "forwarding failed before the owner got it: {e}");
                    transitioning()
                }
                // The owner would refuse it for its size too.
                Err(forward::Unanswered::TooLarge) => check(Sense::INVALID_FIELD_IN_CDB),
                // It may have run. A command a repeat cannot disturb is the initiator's to
                // retry; one whose repeat could answer wrongly (COMPARE AND WRITE, PERSISTENT
                // RESERVE OUT, ...) must not run twice: a hardware error, which Linux does not
                // retry.
                Err(forward::Unanswered::Unknown(e)) => {
                    if forward::unrepeatable(&cmd.cdb) {
                        warn!(owner = %c.addr(), "a forwarded command that must not run twice got no answer: {e}; failing it");
                        check(Sense::INTERNAL_TARGET_FAILURE)
                    } else {
                        debug!(owner = %c.addr(), "forwarded command unanswered: {e}");
                        transitioning()
                    }
                }
            }
        })
    }

    fn task_mgmt<'a>(
        &'a self,
        nexus: &'a Nexus,
        f: TmfFunction,
    ) -> tessera_proto::block::LocalBoxFuture<'a, TmfResponse> {
        Box::pin(async move {
            let Some(c) = &self.to else {
                return TmfResponse::Complete;
            };
            let req = Request::TaskMgmt {
                nexus: nexus.clone(),
                lun: self.lun,
                function: f,
            };
            match c.call(req).await {
                Ok(Response::TaskMgmt(r)) => r,
                // The owner is gone, and its tasks with it.
                _ => TmfResponse::Complete,
            }
        })
    }

    fn nexus_gone(&self, nexus: &Nexus) {
        let Some(c) = self.to.clone() else { return };
        let nexus = nexus.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = c.call(Request::NexusGone { nexus }).await;
            });
        }
    }
}

/// Persistent reservations of a cluster volume, in etcd: loaded when the owner opens it,
/// saved (only while the owner key is held under this gateway's lease) before PERSISTENT
/// RESERVE OUT completes.
struct EtcdPrStore {
    cluster: Cluster,
    volume: u64,
    lease: i64,
    initial: Option<Vec<u8>>,
}

impl PrStore for EtcdPrStore {
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.initial.clone())
    }

    fn save(&self, state: &[u8]) -> std::io::Result<()> {
        // Called from a worker's runtime: the etcd request runs on a thread of its own.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        self.cluster
                            .save_reservations(self.volume, self.lease, state),
                    )
                    .await
                })
                .map_err(|_| std::io::Error::other("etcd did not answer in 10 s"))?
                .map_err(std::io::Error::other)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("saving reservations panicked")))
        })
    }
}

struct Exported {
    volume: tessera_volume::EcVolume,
    lun: u64,
    lu: Arc<LogicalUnit>,
    /// The volume's nodes, and each node id's index among them.
    connector: Arc<RpcConnector>,
    index: HashMap<String, usize>,
    /// The epoch of the placement map in force.
    map_epoch: u64,
    /// The fill progress last reported to etcd, and when.
    reported: Option<((u64, u64, bool), tokio::time::Instant)>,
    /// The write health last published (`None`: not yet).
    health: Option<Option<tessera_cluster::WriteHealthRecord>>,
    /// Trimming of positions nodes left (see [`Exported::trim`]).
    trims: Trims,
}

/// A move of a position: (map epoch, the node it left, PG, index).
type MovedFrom = (u64, String, u32, usize);

/// What the owner knows of the trimming of positions nodes left.
#[derive(Default)]
struct Trims {
    /// `P/trimmed/VOLID` as last read or saved (`None`: not read yet).
    upto: Option<u64>,
    /// Moves whose trim is done here.
    done: std::collections::HashSet<MovedFrom>,
    /// The pass running, with the moves it trims.
    running: Option<tokio::task::JoinHandle<Vec<MovedFrom>>>,
    /// When the last pass started.
    at: Option<tokio::time::Instant>,
}

impl Exported {
    /// Switch the volume to `m`, a newer map of it: positions that moved are filled.
    fn apply_map(&mut self, m: &PgMapRecord) -> anyhow::Result<()> {
        let mut idx = Vec::with_capacity(m.nodes.len());
        for n in &m.nodes {
            let i = match self.index.get(&n.id) {
                Some(i) => *i,
                None => {
                    let a: SocketAddr = n.address.parse().map_err(|_| {
                        anyhow::anyhow!("node {} has a bad address {:?}", n.id, n.address)
                    })?;
                    let i = self.connector.push(a);
                    self.index.insert(n.id.clone(), i);
                    i
                }
            };
            idx.push(i);
        }
        let map = m
            .map
            .iter()
            .map(|row| row.iter().map(|&j| idx[j]).collect())
            .collect();
        let mut names = vec![String::new(); self.connector.nodes()];
        for (id, i) in &self.index {
            names[*i] = id.clone();
        }
        self.volume
            .remap(map, names, m.epoch)
            .map_err(|e| anyhow::anyhow!(e))?;
        self.map_epoch = m.epoch;
        Ok(())
    }

    /// Trim the fragments nodes still hold for positions they left (`P/moves`), once the
    /// owner is on the map that moved them: every 5 s at most, in a task of its own, skipping
    /// nodes without a lease (their turn comes when they are back) and positions a node holds
    /// again. `P/trimmed/VOLID` records the epoch up to which every move is trimmed.
    async fn trim(&mut self, c: &Cluster, lease: i64, map: &PgMapRecord) {
        let t = &mut self.trims;
        if let Some(h) = &t.running {
            if !h.is_finished() {
                return;
            }
            if let Some(h) = t.running.take() {
                if let Ok(done) = h.await {
                    t.done.extend(done);
                }
            }
        }
        let now = tokio::time::Instant::now();
        if t.at
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(5))
        {
            return;
        }
        let id = self.volume.spec().id;
        let upto = match t.upto {
            Some(u) => u,
            None => match c.trimmed(id).await {
                Ok(u) => *t.upto.insert(u),
                Err(_) => return,
            },
        };
        if upto >= map.epoch {
            return;
        }
        t.at = Some(now);
        let (Ok(moves), Ok(nodes)) = (c.moves(id).await, c.nodes().await) else {
            return;
        };
        let holds = |node: &str, pg: u32, index: usize| {
            map.map
                .get(pg as usize)
                .and_then(|row| row.get(index))
                .is_some_and(|&i| map.nodes.get(i).is_some_and(|n| n.id == node))
        };
        let mut work = Vec::new();
        let mut whole = upto;
        let mut complete = true;
        for (epoch, ms) in moves
            .iter()
            .filter(|(ep, _)| *ep > upto && *ep <= map.epoch)
        {
            let mut pending = false;
            for mv in ms {
                let key = (*epoch, mv.from.clone(), mv.pg, mv.index);
                if t.done.contains(&key) || holds(&mv.from, mv.pg, mv.index) {
                    continue;
                }
                pending = true;
                let Some(rec) = nodes.iter().find(|n| n.id == mv.from) else {
                    continue;
                };
                let node = match self.index.get(&mv.from) {
                    Some(&i) => i,
                    None => {
                        let Ok(a) = rec.address.parse::<SocketAddr>() else {
                            continue;
                        };
                        let i = self.connector.push(a);
                        self.index.insert(mv.from.clone(), i);
                        i
                    }
                };
                work.push((node, key));
            }
            complete &= !pending;
            if complete {
                whole = *epoch;
            }
        }
        if complete {
            whole = map.epoch;
        }
        if whole > upto && c.save_trimmed(id, lease, whole).await.is_ok() {
            t.upto = Some(whole);
            t.done.retain(|(ep, ..)| *ep > whole);
        }
        if work.is_empty() {
            return;
        }
        let vol = self.volume.clone();
        t.running = Some(tokio::task::spawn_local(async move {
            let mut done = Vec::new();
            let mut per_node: HashMap<String, u64> = HashMap::new();
            for (node, key) in work {
                match vol.trim_position(node, key.2, key.3).await {
                    Ok(n) => {
                        *per_node.entry(key.1.clone()).or_default() += n;
                        done.push(key);
                    }
                    Err(e) => {
                        debug!(volume = %vol.spec().name, node = %key.1, "trimming a position it left: {e}")
                    }
                }
            }
            for (node, n) in per_node.into_iter().filter(|(_, n)| *n > 0) {
                info!(volume = %vol.spec().name, node = %node, fragments = n, "trimmed the fragments of positions the node left");
            }
            done
        }));
    }

    /// Report fill progress to etcd when it changed (at most once a second, at once when it
    /// finishes).
    async fn report_fill(&mut self, c: &Cluster, lease: i64, gateway: &str) {
        let Some(p) = self.volume.fill_progress() else {
            return;
        };
        let key = (p.generation, p.done, p.finished);
        let now = tokio::time::Instant::now();
        if let Some((last, at)) = self.reported {
            if last == key || (!p.finished && now.duration_since(at) < Duration::from_secs(1)) {
                return;
            }
        }
        let rec = FillRecord {
            map_epoch: p.generation,
            gateway: gateway.to_string(),
            stripes: p.stripes,
            done: p.done,
            bytes: p.bytes,
            rate: p.rate,
            eta_secs: p.eta_secs,
            finished: p.finished,
            updated: unix_now(),
        };
        match c.save_fill(self.volume.spec().id, lease, &rec).await {
            Ok(()) => self.reported = Some((key, now)),
            Err(e) => debug!(volume = %self.volume.spec().name, "reporting fill progress: {e}"),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What this gateway knows and has set up, across rounds.
#[derive(Default)]
struct View {
    /// Volumes owned and served here.
    exported: HashMap<u64, Exported>,
    /// Volumes forwarded elsewhere: volume → (LUN, owner's forwarding address or none).
    remote: HashMap<u64, (u64, Option<String>)>,
    /// Forwarding clients by address.
    clients: HashMap<String, forward::Client>,
    /// Since when each live gateway has been seen.
    seen: HashMap<String, tokio::time::Instant>,
    /// Since when each volume has been seen without an owner.
    unowned: HashMap<u64, tokio::time::Instant>,
    /// The controller's last word on each volume it cannot place, so it says it once.
    held: HashMap<u64, String>,
    /// The session list last published, and when.
    published: Option<(Vec<String>, tokio::time::Instant)>,
    /// Volumes' own targets (`[cluster] volume_targets`): volume → its target.
    volume_targets: HashMap<u64, VolumeTarget>,
}

/// A volume's own target and what its LUN 0 leads to now.
struct VolumeTarget {
    name: String,
    lun0: Lun0,
}

#[derive(Clone)]
enum Lun0 {
    /// The logical unit served here.
    Local(Arc<LogicalUnit>),
    /// Forwarded to this owner (its forwarding address; `None`: no owner).
    Remote(Option<String>),
}

impl PartialEq for Lun0 {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Lun0::Local(a), Lun0::Local(b)) => Arc::ptr_eq(a, b),
            (Lun0::Remote(a), Lun0::Remote(b)) => a == b,
            _ => false,
        }
    }
}

/// Give every volume its own target (LUN 0: the volume, served here or forwarded to its
/// owner), redirecting logins at a gateway that does not own it to the owner's portal when
/// `[cluster] redirect` says so; drop the targets of deleted volumes.
fn sync_volume_targets(
    gw: &Gateway,
    cl: &ClusterConfig,
    vols: &[VolumeRecord],
    owners: &HashMap<u64, tessera_cluster::OwnerRecord>,
    gateways: &[GatewayRecord],
    me: &GatewayRecord,
    view: &mut View,
) {
    if !cl.volume_targets {
        return;
    }
    let gone: Vec<u64> = view
        .volume_targets
        .keys()
        .filter(|id| !vols.iter().any(|v| v.id == **id))
        .copied()
        .collect();
    for id in gone {
        let t = view.volume_targets.remove(&id).expect("present");
        gw.remove_volume_target(&t.name);
        info!(target = %t.name, "volume deleted: its target removed");
    }
    for v in vols {
        let name = tessera_cluster::volume_target_name(&cl.target, &v.name);
        if let Some(other) = view
            .volume_targets
            .iter()
            .find(|(id, t)| **id != v.id && t.name == name)
        {
            debug!(volume = %v.name, other = other.0, "its target name is taken");
            continue;
        }
        let owner = owners.get(&v.id).filter(|o| o.gateway != me.id);
        let redirect = owner
            .filter(|_| cl.redirect && !view.exported.contains_key(&v.id))
            .and_then(|o| gateways.iter().find(|g| g.id == o.gateway))
            .and_then(|g| g.portals.first())
            .filter(|p| {
                p.parse::<SocketAddr>()
                    .is_ok_and(|a| !a.ip().is_unspecified())
            })
            .cloned();
        let target = gw.put_volume_target(&name, &cl.target, &v.name, redirect);
        let lun0 = match view.exported.get(&v.id) {
            Some(e) => Lun0::Local(e.lu.clone()),
            None => Lun0::Remote(view.remote.get(&v.id).and_then(|(_, o)| o.clone())),
        };
        let known = view.volume_targets.get(&v.id).map(|t| t.lun0.clone());
        if known.as_ref() == Some(&lun0) {
            continue;
        }
        match &lun0 {
            Lun0::Local(lu) => target.add_lun(0, lu.clone()),
            Lun0::Remote(owner) => {
                let to = owner.as_deref().and_then(|a| view.client(a));
                // The owner runs it on the volume's LUN of its cluster target.
                target.add_remote_lun(0, Arc::new(Forwarded { lun: v.lun, to }));
            }
        }
        if known.is_none() {
            info!(volume = %v.name, target = %name, "serving the volume's own target");
        }
        view.volume_targets
            .insert(v.id, VolumeTarget { name, lun0 });
    }
}

impl View {
    fn client(&mut self, addr: &str) -> Option<forward::Client> {
        if let Some(c) = self.clients.get(addr) {
            return Some(c.clone());
        }
        let a: SocketAddr = addr.parse().ok()?;
        let c = forward::Client::new(a, FORWARD_TIMEOUT);
        self.clients.insert(addr.to_string(), c.clone());
        Some(c)
    }

    /// Make LUN `lun` of volume `id` lead to `owner` (its forwarding address; `None`: no owner).
    fn forward(&mut self, target: &tessera_scsi::Target, id: u64, lun: u64, owner: Option<String>) {
        if self.remote.get(&id) == Some(&(lun, owner.clone())) {
            return;
        }
        let to = owner.as_deref().and_then(|a| self.client(a));
        target.add_remote_lun(lun, Arc::new(Forwarded { lun, to }));
        self.remote.insert(id, (lun, owner));
    }
}

async fn agent(
    gw: Arc<Gateway>,
    cl: ClusterConfig,
    portals: Vec<SocketAddr>,
    forward_addr: SocketAddr,
    ready: Ready,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut view = View::default();
    let mut first = true;
    let mut logged_down = false;
    loop {
        let session = async {
            let c = match &gw.cluster_store {
                Some(meta) => Cluster::new(meta.clone(), &cl.prefix),
                None => Cluster::connect(&cl.etcd, &cl.prefix).await?,
            };
            // The lease runs at least its TTL from before it was asked for.
            let asked = tokio::time::Instant::now();
            let lease = c.grant(cl.lease_ttl).await?;
            let number = c.gateway_number(&cl.gateway_id).await?;
            let me = GatewayRecord {
                id: cl.gateway_id.clone(),
                portals: portals.iter().map(ToString::to_string).collect(),
                number,
                forward: forward_addr.to_string(),
                weight: cl.weight,
                target: cl.target.clone(),
            };
            c.register_gateway(&me, lease).await?;
            Ok::<_, tessera_cluster::ClusterError>((c, lease, asked, me))
        };
        let (c, lease, asked, me) = tokio::select! {
            r = session => match r {
                Ok(x) => x,
                Err(e) => {
                    if !logged_down {
                        warn!(gateway = %cl.gateway_id, "cannot join the cluster: {e}");
                        logged_down = true;
                    }
                    if first {
                        // Nothing to wait for: serve the configured LUNs meanwhile.
                        signal_ready(&ready);
                        first = false;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => break,
                    }
                }
            },
            _ = shutdown.changed() => break,
        };
        logged_down = false;
        metrics::metrics().cluster_lease_held.set(1);
        metrics::metrics().cluster_etcd_reachable.set(1);
        // What was published went with the old lease.
        view.published = None;
        // Sessions from now on see this gateway's own target port.
        gw.set_portal_group_tag(&cl.target, me.number);
        info!(gateway = %cl.gateway_id, number = me.number, forward = %me.forward, etcd = ?cl.etcd, lease = format!("{lease:x}"), "joined the cluster");
        // Volumes fenced when an earlier lease was lost are opened afresh, with new epochs.
        let stale: Vec<u64> = view
            .exported
            .iter()
            .filter(|(_, e)| e.volume.is_fenced())
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(e) = view.exported.remove(&id) {
                gw.volumes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|v| v.spec().id != id);
                e.volume.close();
            }
        }
        // When the last renewal etcd confirmed was sent (written by the keep-alive task).
        let renewed_at = Arc::new(Mutex::new(asked));
        // The controller election runs beside everything else; it holds while the lease does.
        let (leader_tx, leader_rx) = watch::channel(false);
        let campaign = {
            let c = c.clone();
            let id = cl.gateway_id.clone();
            tokio::task::spawn_local(async move {
                match c.campaign(&id, lease).await {
                    Ok(()) => {
                        info!(gateway = %id, "elected controller");
                        let _ = leader_tx.send(true);
                    }
                    Err(e) => warn!(gateway = %id, "controller campaign: {e}"),
                }
                // Keep the sender alive (and the flag true) while this session lasts.
                std::future::pending::<()>().await;
            })
        };
        let kept = {
            let c = c.clone();
            let ttl = cl.lease_ttl;
            let at = renewed_at.clone();
            tokio::task::spawn_local(async move {
                c.keep_alive_with(lease, ttl, move |sent| {
                    *at.lock().unwrap_or_else(|e| e.into_inner()) = sent
                })
                .await
            })
        };
        // Stop writing well before the lease could expire unrenewed: a watchdog of its own, so
        // that nothing this loop waits for (etcd calls time out after seconds) can delay it.
        let fence_after = Duration::from_millis(cl.lease_ttl as u64 * 1000 * 2 / 3);
        // How often the lease is renewed (as `Cluster::keep_alive_with` does it).
        let renew_every = Duration::from_millis((cl.lease_ttl.max(1) as u64 * 1000 / 5).min(2000));
        let owned: Rc<std::cell::RefCell<Vec<tessera_volume::EcVolume>>> = Rc::new(
            std::cell::RefCell::new(view.exported.values().map(|e| e.volume.clone()).collect()),
        );
        let lost = Rc::new(tokio::sync::Notify::new());
        let watchdog = {
            let (at, owned, lost) = (renewed_at.clone(), owned.clone(), lost.clone());
            let (id, ttl) = (cl.gateway_id.clone(), cl.lease_ttl);
            tokio::task::spawn_local(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let quiet = at.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                    let m = metrics::metrics();
                    m.cluster_lease_age.set(quiet.as_secs_f64());
                    m.cluster_etcd_reachable
                        .set(i64::from(quiet < renew_every * 2));
                    if quiet > fence_after {
                        let why = format!(
                            "lease not renewed for {:.1} s (TTL {ttl} s): stopping writes before another gateway can take over",
                            quiet.as_secs_f64()
                        );
                        error!(gateway = %id, "{why}");
                        for v in owned.borrow().iter() {
                            v.fence(&format!("self-fenced: {why}"));
                        }
                        lost.notify_one();
                        return;
                    }
                }
            })
        };
        let mut kept = kept;
        let mut events = match c.watch().await {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("cannot watch the cluster: {e}; polling");
                None
            }
        };
        // A single gateway's first round: give its own campaign a moment to win, so the
        // volumes' first maps exist before the portals open.
        if first {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            if *leader_rx.borrow() {
                controller_round(&c, &mut view.held).await;
            }
            reconcile(&gw, &cl, &c, lease, &me, &mut view).await;
            follow_maps(&c, lease, &me, &mut view).await;
            publish_sessions(&gw, &cl, &c, lease, &mut view).await;
            publish_write_health(&c, lease, &me, &mut view).await;
            *owned.borrow_mut() = view.exported.values().map(|e| e.volume.clone()).collect();
            if first {
                signal_ready(&ready);
                first = false;
            }
            // Wake on any change under the prefix, or every 2 s regardless.
            let changed = async {
                match events.as_mut() {
                    Some(ev) => {
                        match tokio::time::timeout(Duration::from_secs(2), ev.changed()).await {
                            Ok(Ok(())) | Err(_) => true,
                            Ok(Err(_)) => false,
                        }
                    }
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        true
                    }
                }
            };
            tokio::select! {
                ok = changed => {
                    if !ok {
                        warn!("the cluster watch ended; polling");
                        events = None;
                    }
                }
                r = &mut kept => {
                    let why = match r {
                        Ok(e) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    error!(gateway = %cl.gateway_id, "cluster lease lost: {why}");
                    self_fence(&view.exported, &why);
                    break;
                }
                _ = lost.notified() => {
                    self_fence(&view.exported, "the cluster lease lapsed");
                    kept.abort();
                    break;
                }
                _ = shutdown.changed() => {
                    campaign.abort();
                    kept.abort();
                    watchdog.abort();
                    // Leave cleanly: owners and the election go with the lease.
                    let _ = c.revoke(lease).await;
                    for (_, e) in view.exported.drain() {
                        e.volume.close();
                    }
                    return;
                }
            }
        }
        campaign.abort();
        watchdog.abort();
        let m = metrics::metrics();
        m.cluster_lease_held.set(0);
        m.cluster_etcd_reachable.set(0);
    }
    for (_, e) in view.exported.drain() {
        e.volume.close();
    }
}

fn self_fence(exported: &HashMap<u64, Exported>, why: &str) {
    for e in exported.values() {
        e.volume.fence(&format!("self-fenced: {why}"));
    }
}

/// The controller's work: a first placement map for every volume without one; a new map
/// when a node of one is lost (absent past the grace period), drained, or a new node can
/// take a share ([`tessera_cluster::rebuild::plan`]).
async fn controller_round(c: &Cluster, held: &mut HashMap<u64, String>) {
    let all = async {
        Ok::<_, tessera_cluster::ClusterError>((
            c.volumes().await?,
            c.nodes().await?,
            c.pg_maps().await?,
            c.fills().await?,
            c.settings().await?,
            c.absent().await?,
            c.write_health().await?,
        ))
    };
    let (vols, nodes, maps, fills, settings, absent, health) = match all.await {
        Ok(x) => x,
        Err(e) => {
            warn!("controller: reading the cluster: {e}");
            return;
        }
    };
    // Absence: since when each node some map names has been without a lease.
    let now = unix_now();
    let registered: std::collections::HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    let named: std::collections::HashSet<&str> = maps
        .values()
        .flat_map(|m| m.nodes.iter().map(|n| n.id.as_str()))
        .collect();
    let mut lost = std::collections::HashSet::new();
    for id in &named {
        if registered.contains(id) {
            continue;
        }
        match c.mark_absent(id, now).await {
            Ok(since) => {
                let gone = now.saturating_sub(since);
                if gone >= settings.rebuild_grace_secs {
                    lost.insert(id.to_string());
                } else if since == now {
                    info!(node = %id, grace_secs = settings.rebuild_grace_secs, "node absent: its data is rebuilt elsewhere if it stays away past the grace period");
                }
            }
            Err(e) => warn!(node = %id, "controller: recording absence: {e}"),
        }
    }
    for id in absent.keys() {
        if registered.contains(id.as_str()) || !named.contains(id.as_str()) {
            if registered.contains(id.as_str()) {
                info!(node = %id, "node back");
            }
            let _ = c.clear_absent(id).await;
        }
    }
    held.retain(|id, _| vols.iter().any(|v| v.id == *id));
    for v in vols {
        let Some(map) = maps.get(&v.id) else {
            match c.ensure_pg_map(&v).await {
                Ok(m) => {
                    info!(volume = %v.name, nodes = m.nodes.len(), pgs = m.map.len(), "placed volume")
                }
                Err(e) => warn!(volume = %v.name, "cannot place volume yet: {e}"),
            }
            continue;
        };
        let filled = fills.get(&v.id).is_some_and(|f| f.fills(map.epoch));
        let unreachable: std::collections::HashSet<String> = health
            .get(&v.id)
            .map(|h| h.unreachable.iter().cloned().collect())
            .unwrap_or_default();
        let planned = rebuild::plan(&PlanInput {
            volume: &v,
            map,
            nodes: &nodes,
            lost: &lost,
            unreachable: &unreachable,
            filled,
        });
        match planned {
            Ok((next, moves)) => match c.replace_pg_map(&v, map, &next, &moves).await {
                Ok(true) => {
                    let count = |r: tessera_cluster::MoveReason| {
                        moves.iter().filter(|m| m.reason == r).count()
                    };
                    info!(
                        volume = %v.name,
                        epoch = next.epoch,
                        lost = count(tessera_cluster::MoveReason::Lost),
                        drain = count(tessera_cluster::MoveReason::Drain),
                        rebalance = count(tessera_cluster::MoveReason::Rebalance),
                        quorum = count(tessera_cluster::MoveReason::Quorum),
                        "placement changed: moved positions will be rebuilt on their new nodes"
                    );
                    held.remove(&v.id);
                }
                Ok(false) => debug!(volume = %v.name, "map changed meanwhile; planning again"),
                Err(e) => warn!(volume = %v.name, "controller: storing the new map: {e}"),
            },
            Err(Hold::Impossible(why)) => {
                if held.get(&v.id) != Some(&why) {
                    warn!(volume = %v.name, "cannot move its data: {why}");
                    held.insert(v.id, why);
                }
            }
            Err(Hold::Settled | Hold::Filling) => {
                held.remove(&v.id);
            }
        }
    }
}

/// Export what should be exported, forward what others own, drop what is gone.
/// What this gateway does about one volume in a reconcile round ([`step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Served here and still owned here: keep serving it.
    Keep,
    /// Served here, but etcd names another owner (`Some`: that gateway) or none: stop at once
    /// (fence) and forward to the owner.
    Lost(Option<String>),
    /// Served here, and this other, preferred gateway has been live for [`HANDOVER_AFTER`]:
    /// stop, release the owner key, and let it take the volume.
    HandOver(String),
    /// Owned by another gateway (`Some`), or waiting for the preferred one to take it
    /// (`None`): forward (with no owner, commands get NOT READY, TRANSITIONING).
    Forward(Option<String>),
    /// Take it: unowned (or held under this lease but not open here) and this gateway is the
    /// preferred one, or the volume has waited [`TAKE_ANY_AFTER`] for the preferred one.
    Take,
}

/// The ownership decision for one volume: `owner` is etcd's owner record, `preferred` the
/// gateway rendezvous hashing prefers among the live ones, `served` whether it is open
/// here, `preferred_seen` since when the preferred gateway has been live, `unowned_since`
/// since when the volume has been seen without an owner here (`None`: not before now).
fn step(
    me: &str,
    owner: Option<&tessera_cluster::OwnerRecord>,
    preferred: Option<&GatewayRecord>,
    served: bool,
    preferred_seen: Option<tokio::time::Instant>,
    unowned_since: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
) -> Step {
    if served {
        if owner.is_none_or(|o| o.gateway != me) {
            return Step::Lost(owner.map(|o| o.gateway.clone()));
        }
        let settled = preferred_seen.is_some_and(|t| now.duration_since(t) >= HANDOVER_AFTER);
        return match preferred.filter(|p| p.id != me) {
            Some(p) if settled => Step::HandOver(p.id.clone()),
            _ => Step::Keep,
        };
    }
    if let Some(o) = owner.filter(|o| o.gateway != me) {
        return Step::Forward(Some(o.gateway.clone()));
    }
    let since = unowned_since.unwrap_or(now);
    let mine = owner.is_some();
    let take =
        mine || preferred.is_none_or(|p| p.id == me) || now.duration_since(since) >= TAKE_ANY_AFTER;
    if take {
        Step::Take
    } else {
        Step::Forward(None)
    }
}

async fn reconcile(
    gw: &Arc<Gateway>,
    cl: &ClusterConfig,
    c: &Cluster,
    lease: i64,
    me: &GatewayRecord,
    view: &mut View,
) {
    let Some(target) = gw.target(&cl.target) else {
        return;
    };
    let (vols, gateways, owners) = match (c.volumes().await, c.gateways().await, c.owners().await) {
        (Ok(v), Ok(g), Ok(o)) => (v, g, o),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            warn!("reading the cluster: {e}");
            return;
        }
    };
    let now = tokio::time::Instant::now();
    view.seen
        .retain(|id, _| gateways.iter().any(|g| &g.id == id));
    for g in &gateways {
        view.seen.entry(g.id.clone()).or_insert(now);
    }
    let mut groups: Vec<u16> = gateways
        .iter()
        .map(|g| g.number)
        .chain(std::iter::once(me.number))
        .filter(|n| *n > 0)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    // Deleted volumes: their LUNs go.
    let live: Vec<u64> = vols.iter().map(|v| v.id).collect();
    let gone: Vec<u64> = view
        .exported
        .keys()
        .chain(view.remote.keys())
        .filter(|id| !live.contains(id))
        .copied()
        .collect();
    for id in gone {
        if let Some(e) = view.exported.remove(&id) {
            target.remove_lun(e.lun);
            drop_volume(gw, &e);
            info!(lun = e.lun, "volume deleted: LUN removed");
        }
        if let Some((lun, _)) = view.remote.remove(&id) {
            target.remove_lun(lun);
            info!(lun, "volume deleted: LUN removed");
        }
    }
    view.unowned.retain(|id, _| live.contains(id));
    for v in &vols {
        let owner = owners.get(&v.id);
        let preferred = tessera_cluster::preferred_owner(v.id, &gateways);
        let forward_of = |gateway: &str| {
            gateways
                .iter()
                .find(|g| g.id == gateway)
                .map(|g| g.forward.clone())
                .filter(|f| !f.is_empty())
        };
        let preferred_seen = preferred.and_then(|p| view.seen.get(&p.id).copied());
        let served = view.exported.contains_key(&v.id);
        let unowned_since = view.unowned.get(&v.id).copied();
        match step(
            &me.id,
            owner,
            preferred,
            served,
            preferred_seen,
            unowned_since,
            now,
        ) {
            Step::Lost(to) => {
                // etcd says someone else (or nobody) owns it: stop at once.
                warn!(volume = %v.name, "ownership lost");
                let e = view.exported.remove(&v.id).expect("served");
                e.volume.fence("ownership moved to another gateway");
                drop_volume(gw, &e);
                let to = to.and_then(|g| forward_of(&g));
                view.forward(&target, v.id, v.lun, to);
                continue;
            }
            Step::Keep => {
                let e = view.exported.get(&v.id).expect("served");
                // Grown: the volume takes the new size, the initiators are told.
                if v.size > e.volume.size() {
                    match e.volume.grow(v.size) {
                        Ok(()) => e.lu.capacity_changed(),
                        Err(why) => warn!(volume = %v.name, "cannot grow: {why}"),
                    }
                }
                e.lu.set_alua(Alua {
                    groups: groups.clone(),
                    optimized: Some(me.number),
                });
                continue;
            }
            Step::HandOver(to) => {
                info!(volume = %v.name, %to, "handing the volume over");
                let e = view.exported.remove(&v.id).expect("served");
                view.forward(&target, v.id, v.lun, None);
                e.volume.fence("handed over to another gateway");
                drop_volume(gw, &e);
                if let Err(err) = c.release(v.id, &me.id, lease).await {
                    warn!(volume = %v.name, "releasing: {err}");
                }
                continue;
            }
            Step::Forward(Some(owner)) => {
                view.unowned.remove(&v.id);
                view.forward(&target, v.id, v.lun, forward_of(&owner));
                continue;
            }
            Step::Forward(None) => {
                view.unowned.entry(v.id).or_insert(now);
                view.forward(&target, v.id, v.lun, None);
                continue;
            }
            Step::Take => {
                view.unowned.entry(v.id).or_insert(now);
            }
        }
        let map = match c.pg_map(v.id).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                view.forward(&target, v.id, v.lun, None);
                continue;
            }
            Err(e) => {
                warn!(volume = %v.name, "reading its map: {e}");
                continue;
            }
        };
        let epoch = match c.acquire(v.id, &me.id, lease).await {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                warn!(volume = %v.name, "taking ownership: {e}");
                continue;
            }
        };
        let prs = match c.reservations(v.id).await {
            Ok(p) => p,
            Err(e) => {
                warn!(volume = %v.name, "reading its reservations: {e}");
                let _ = c.release(v.id, &me.id, lease).await;
                continue;
            }
        };
        match open(gw, c, v, &map, epoch).await {
            Ok((vol, connector, index)) => {
                let naa = stable_hash(&[b"tessera-volume", &v.id.to_be_bytes()]);
                let lu_cfg = LuConfig {
                    block_size: v.block_size,
                    read_only: false,
                    removable: false,
                    vendor: "TESSERA".into(),
                    product: "VIRTUAL-DISK".into(),
                    revision: revision(),
                    serial: format!("TSV{:016X}", v.id),
                    naa_id: naa,
                };
                let dev: Arc<dyn tessera_proto::block::BlockDevice> = Arc::new(vol.clone());
                let store = EtcdPrStore {
                    cluster: c.clone(),
                    volume: v.id,
                    lease,
                    initial: prs,
                };
                match LogicalUnit::new(lu_cfg, dev, Some(Box::new(store))) {
                    Ok(lu) => {
                        let lu = Arc::new(lu);
                        lu.set_alua(Alua {
                            groups: groups.clone(),
                            optimized: Some(me.number),
                        });
                        if epoch > 1 {
                            // Taken over: to the initiators it is the same logical unit,
                            // now optimized on another port.
                            lu.set_first_unit_attention(Sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
                        }
                        target.add_lun(v.lun, lu.clone());
                        view.remote.remove(&v.id);
                        view.unowned.remove(&v.id);
                        gw.volumes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(vol.clone());
                        info!(volume = %v.name, lun = v.lun, epoch, "serving volume");
                        view.exported.insert(
                            v.id,
                            Exported {
                                volume: vol,
                                lun: v.lun,
                                lu,
                                connector,
                                index,
                                map_epoch: map.epoch,
                                reported: None,
                                health: None,
                                trims: Trims::default(),
                            },
                        );
                    }
                    Err(e) => {
                        error!(volume = %v.name, "cannot export: {e:#}");
                        vol.close();
                        let _ = c.release(v.id, &me.id, lease).await;
                    }
                }
            }
            Err(e) => {
                warn!(volume = %v.name, "cannot open: {e}");
                let _ = c.release(v.id, &me.id, lease).await;
            }
        }
    }
    sync_volume_targets(gw, cl, &vols, &owners, &gateways, me, view);
}

/// Tell etcd which initiators have sessions to the cluster target here (what `volume
/// delete` checks): when the list changes, and every 30 s regardless (a session ended between
/// two rounds is seen within one round).
async fn publish_sessions(
    gw: &Gateway,
    cl: &ClusterConfig,
    c: &Cluster,
    lease: i64,
    view: &mut View,
) {
    let now = tokio::time::Instant::now();
    let mut list = gw.sessions.initiators(&cl.target);
    for t in view.volume_targets.values() {
        list.extend(gw.sessions.initiators(&t.name));
    }
    list.sort();
    if let Some((last, at)) = &view.published {
        if *last == list && now.duration_since(*at) < Duration::from_secs(30) {
            return;
        }
    }
    match c.publish_sessions(&cl.gateway_id, lease, &list).await {
        Ok(()) => view.published = Some((list, now)),
        Err(e) => debug!("publishing sessions: {e}"),
    }
}

/// Publish, for each owned volume, which of its nodes do not answer and how many PGs are
/// write-suspended (`P/writes/VOLID`), when that changes: the controller moves the positions
/// of PGs below their write quorum at once, and `tessera status` shows it.
async fn publish_write_health(c: &Cluster, lease: i64, me: &GatewayRecord, view: &mut View) {
    for (id, e) in view.exported.iter_mut() {
        let unreachable = e.volume.unreachable_nodes();
        let rec = if unreachable.is_empty() {
            None
        } else {
            let sus = e.volume.write_suspended();
            let was = e.health.as_ref().and_then(|h| h.as_ref());
            let since = match was {
                Some(w) if w.since > 0 && !sus.is_empty() => w.since,
                _ if !sus.is_empty() => unix_now(),
                _ => 0,
            };
            Some(tessera_cluster::WriteHealthRecord {
                gateway: me.id.clone(),
                unreachable,
                suspended_pgs: sus.len() as u32,
                pgs: sus
                    .iter()
                    .take(tessera_cluster::WriteHealthRecord::LISTED)
                    .map(|(pg, _)| *pg)
                    .collect(),
                since,
            })
        };
        if e.health.as_ref() == Some(&rec) {
            continue;
        }
        match c.save_write_health(*id, lease, rec.as_ref()).await {
            Ok(()) => e.health = Some(rec),
            Err(err) => debug!(volume = id, "publishing write health: {err}"),
        }
    }
}

/// Keep owned volumes on their newest maps, at the cluster's fill rate, and report their
/// fills.
async fn follow_maps(c: &Cluster, lease: i64, me: &GatewayRecord, view: &mut View) {
    if view.exported.is_empty() {
        return;
    }
    let (maps, settings) = match (c.pg_maps().await, c.settings().await) {
        (Ok(m), Ok(s)) => (m, s),
        (Err(e), _) | (_, Err(e)) => {
            warn!("reading the maps: {e}");
            return;
        }
    };
    for (id, e) in view.exported.iter_mut() {
        if let Some(m) = maps.get(id) {
            if m.epoch > e.map_epoch {
                if let Err(err) = e.apply_map(m) {
                    warn!(volume = %e.volume.spec().name, "cannot switch to map {}: {err:#}", m.epoch);
                }
            }
        }
        e.volume.set_fill_rate(settings.rebuild_rate);
        e.report_fill(c, lease, &me.id).await;
        if let Some(m) = maps.get(id).filter(|m| m.epoch == e.map_epoch) {
            e.trim(c, lease, m).await;
        }
    }
}

/// Stop serving an exported volume here (its LUN is replaced or removed by the caller).
fn drop_volume(gw: &Gateway, e: &Exported) {
    let id = e.volume.spec().id;
    gw.volumes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|v| v.spec().id != id);
    e.volume.close();
}

/// Open a cluster volume with the epoch etcd granted; an interrupted fill of its map
/// resumes where the last owner reported it.
/// How volume `v` opens as `map` places it, at owner epoch `epoch` (`None`: unfenced): its
/// spec, and its nodes' addresses in the map's order.
pub fn volume_spec(
    v: &VolumeRecord,
    map: &PgMapRecord,
    epoch: Option<u64>,
) -> anyhow::Result<(tessera_volume::VolumeSpec, Vec<SocketAddr>)> {
    let profile = v.profile()?;
    let mut addrs = Vec::with_capacity(map.nodes.len());
    for n in &map.nodes {
        addrs.push(
            n.address
                .parse::<SocketAddr>()
                .map_err(|_| anyhow::anyhow!("node {} has a bad address {:?}", n.id, n.address))?,
        );
    }
    let spec = tessera_volume::VolumeSpec {
        id: v.id,
        name: v.name.clone(),
        size: v.size,
        block_size: v.block_size,
        profile,
        pgs: v.pgs,
        write_quorum: v.write_quorum,
        region_stripes: 1024,
        clear_after: tessera_volume::CLEAR_AFTER,
        map: map.map.clone(),
        node_names: map.nodes.iter().map(|n| n.id.clone()).collect(),
        epoch,
    };
    Ok((spec, addrs))
}

async fn open(
    gw: &Gateway,
    c: &Cluster,
    v: &VolumeRecord,
    map: &PgMapRecord,
    epoch: u64,
) -> anyhow::Result<(
    tessera_volume::EcVolume,
    Arc<RpcConnector>,
    HashMap<String, usize>,
)> {
    let fill = if map.moving.is_empty() {
        None
    } else {
        c.fill(v.id).await?
    };
    let (spec, addrs) = volume_spec(v, map, Some(epoch))?;
    let connector = Arc::new(
        RpcConnector::new(addrs, Duration::from_millis(gw.cfg.node_timeout_ms))
            .observed(Arc::new(metrics::FragmentCalls)),
    );
    let index = map
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.clone(), i))
        .collect();
    let vol = tessera_volume::EcVolume::open(spec, connector.clone()).await?;
    vol.release_thread();
    vol.set_quorum_wait(Duration::from_millis(gw.cfg.write_quorum_wait_ms));
    if !map.moving.is_empty() && !fill.as_ref().is_some_and(|f| f.fills(map.epoch)) {
        let from = fill
            .filter(|f| f.map_epoch == map.epoch)
            .map_or(0, |f| f.done);
        vol.resume_fill(&map.moving, from, map.epoch);
    }
    Ok((vol, connector, index))
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
