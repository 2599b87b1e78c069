//! tessera's gateway: targets and LUNs from a validated [`Config`], iSCSI portals, one event
//! loop per core, configuration reload, command forwarding to a volume's owner and the
//! cluster agent. The `tessera` binary wraps it into a daemon (configuration file, signals,
//! metrics serving, systemd notification); [`start`] is where it begins.
//!
//! Threading: an acceptor on the main thread hands each new connection to a worker thread
//! (round robin). A worker runs a tokio current-thread runtime with a `LocalSet`; a connection
//! and every command it carries stay on that worker, including the backend's io_uring ring,
//! so a command's path never crosses cores. Targets and LUNs are shared by all workers.

#![forbid(unsafe_code)]

mod cluster;
pub mod config;
pub(crate) mod forward;
mod iscsi;
pub mod metrics;
mod reload;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tessera_cluster::stable_hash;
use tessera_proto::block::{BlockDevice, MemDevice};
use tessera_proto::iscsi::chap::Credentials;
use tessera_proto::iscsi::keys::Limits;
use tessera_proto::iscsi::login::{Directory, TargetEntry};
use tessera_scsi::{
    DirectMode, FileDevice, FileOptions, FilePrStore, LogicalUnit, LuConfig, PrStore, Target,
};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::{Backend, Config};

pub use cluster::volume_spec;
pub use reload::Reloaded;
pub use session::SessionRegistry;

/// What the daemon around the gateway runs as each of its event loops starts: on the loop's
/// own thread, inside its `LocalSet` (so it may spawn local tasks there), with the loop's
/// name. The binary registers the loop with its watchdog's health check.
pub type LoopHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything the workers share.
pub struct Gateway {
    /// The validated configuration it started with (what a reload cannot change stays so).
    pub cfg: Config,
    /// Targets by lower-case IQN.
    targets: RwLock<HashMap<String, Arc<Target>>>,
    /// The target definitions in force: the startup configuration's, then each reload's.
    defs: Mutex<Vec<config::Target>>,
    /// What login and discovery see (replaced when the cluster numbers this gateway).
    directory: Mutex<Arc<Directory>>,
    /// The cluster volumes' own targets (`[cluster] volume_targets`), by lower-case IQN:
    /// their directory entries, kept across reloads.
    volume_targets: Mutex<HashMap<String, TargetEntry>>,
    /// Negotiation limits.
    pub limits: Limits,
    /// Called by each event loop (worker, maintenance) on its own thread as it starts.
    loop_started: LoopHook,
    /// The cluster's store when it is not the configured etcd ([`Gateway::use_cluster_store`]).
    cluster_store: Option<Arc<dyn tessera_cluster::Meta>>,
    /// Sessions, for reinstatement.
    pub sessions: SessionRegistry,
    /// Every configured LUN's device (flushed at shutdown).
    devices: Mutex<Vec<Arc<dyn BlockDevice>>>,
    /// Erasure-coded volumes, for their maintenance loop (cluster volumes come and go).
    volumes: Mutex<Vec<tessera_volume::EcVolume>>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
}

/// What login and discovery see for targets `defs` under configuration `cfg` (its discovery
/// secrets and cluster target); `pgt_of` gives the portal group tags already assigned (the
/// cluster's, once it numbers this gateway).
fn directory_of(cfg: &Config, defs: &[config::Target], pgt_of: Option<&Directory>) -> Directory {
    let tag = |name: &str, configured: u16| {
        pgt_of
            .and_then(|d| d.targets.iter().find(|t| t.name.eq_ignore_ascii_case(name)))
            .map_or(configured, |t| t.portal_group_tag)
    };
    let cluster = cfg.cluster.as_ref().map(|c| c.target.as_str());
    let mut entries: Vec<TargetEntry> = defs
        .iter()
        .map(|t| TargetEntry {
            name: t.iqn.clone(),
            alias: t.alias.clone(),
            chap: creds(&t.chap),
            mutual_chap: creds(&t.mutual_chap),
            allowed_initiators: t.allowed_initiators.clone(),
            portal_group_tag: if cluster.is_some_and(|c| c.eq_ignore_ascii_case(&t.iqn)) {
                tag(&t.iqn, t.portal_group_tag)
            } else {
                t.portal_group_tag
            },
            portals: t.advertise.clone(),
            redirect: None,
        })
        .collect();
    if let Some(c) = cluster {
        if !defs.iter().any(|t| t.iqn.eq_ignore_ascii_case(c)) {
            entries.push(TargetEntry {
                name: c.to_string(),
                alias: Some("tessera-cluster".into()),
                chap: None,
                mutual_chap: None,
                allowed_initiators: Vec::new(),
                portal_group_tag: tag(c, 1),
                portals: Vec::new(),
                redirect: None,
            });
        }
    }
    Directory {
        targets: entries,
        discovery_chap: creds(&cfg.discovery_chap),
        discovery_mutual_chap: creds(&cfg.discovery_mutual_chap),
    }
}

fn creds(c: &Option<config::Chap>) -> Option<Credentials> {
    c.as_ref().map(|c| Credentials {
        user: c.user.clone(),
        secret: c.secret.clone().into_bytes(),
    })
}

/// Open the erasure-coded volume of an ec LUN (on a thread of its own: opening talks to the
/// nodes on a private runtime).
fn open_ec(cfg: &Config, lun: &config::Lun) -> anyhow::Result<tessera_volume::EcVolume> {
    let ec = lun.ec.as_ref().context("ec LUN without a profile")?;
    let size = lun.size.context("ec backend needs a size")?;
    let id = stable_hash(&[b"tessera-volume", ec.volume.as_bytes()]);
    let nodes: Vec<tessera_ec::placement::Node> = cfg
        .nodes
        .iter()
        .map(|n| tessera_ec::placement::Node {
            id: n.id.clone(),
            weight: n.weight,
            zone: n.zone.clone(),
            rack: n.rack.clone(),
            host: n.host.clone(),
        })
        .collect();
    let map = tessera_ec::placement::compute(id, ec.pgs, &nodes, ec.profile.width(), None)
        .with_context(|| format!("placing volume {}", ec.volume))?;
    let spec = tessera_volume::VolumeSpec {
        id,
        name: ec.volume.clone(),
        size,
        block_size: lun.block_size,
        profile: ec.profile,
        pgs: ec.pgs,
        write_quorum: ec.write_quorum,
        region_stripes: 1024,
        clear_after: tessera_volume::CLEAR_AFTER,
        map,
        node_names: cfg.nodes.iter().map(|n| n.id.clone()).collect(),
        epoch: None,
    };
    let connector: Arc<dyn tessera_volume::nodes::Connector> = Arc::new(
        tessera_volume::nodes::RpcConnector::new(
            cfg.nodes.iter().map(|n| n.address).collect(),
            Duration::from_millis(cfg.node_timeout_ms),
        )
        .observed(Arc::new(metrics::FragmentCalls)),
    );
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            let v = local.block_on(&rt, tessera_volume::EcVolume::open(spec, connector))?;
            v.release_thread();
            v.set_quorum_wait(Duration::from_millis(cfg.write_quorum_wait_ms));
            Ok(v)
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("opening the volume panicked")))
    })
}

fn open_device(lun: &config::Lun) -> anyhow::Result<Arc<dyn BlockDevice>> {
    Ok(match lun.backend {
        Backend::Ec => anyhow::bail!("ec LUNs are opened with their volume"),
        Backend::Mem => Arc::new(MemDevice::new(
            lun.size.context("mem backend needs a size")?,
        )),
        Backend::File => {
            let path = lun.path.as_ref().context("file backend needs a path")?;
            if let Some(parent) = path.parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
            }
            let opts = FileOptions {
                size_bytes: lun.size,
                read_only: lun.read_only,
                direct: match lun.direct {
                    config::Direct::Auto => DirectMode::Auto,
                    config::Direct::On => DirectMode::On,
                    config::Direct::Off => DirectMode::Off,
                },
                block_size: lun.block_size,
                ..FileOptions::default()
            };
            Arc::new(
                FileDevice::open(path, opts).with_context(|| {
                    format!("opening LUN {} backing {}", lun.id, path.display())
                })?,
            )
        }
    })
}

/// The logical unit of LUN `id` of target `iqn` over `dev`.
fn make_lu(
    cfg: &Config,
    iqn: &str,
    id: u64,
    l: &config::Lun,
    dev: Arc<dyn BlockDevice>,
) -> anyhow::Result<LogicalUnit> {
    let id_hash = stable_hash(&[iqn.to_ascii_lowercase().as_bytes(), &id.to_be_bytes()]);
    lu_over(
        cfg,
        iqn,
        id,
        dev,
        LuConfig {
            block_size: l.block_size,
            read_only: l.read_only,
            removable: l.removable,
            vendor: "TESSERA".into(),
            product: "VIRTUAL-DISK".into(),
            revision: revision(),
            serial: l
                .serial
                .clone()
                .unwrap_or_else(|| format!("TSR{:016X}", id_hash)),
            naa_id: id_hash,
        },
    )
}

fn revision() -> String {
    env!("CARGO_PKG_VERSION")
        .chars()
        .filter(|c| *c != '.')
        .take(4)
        .collect()
}

/// A logical unit with its reservations kept under the state directory.
fn lu_over(
    cfg: &Config,
    iqn: &str,
    id: u64,
    dev: Arc<dyn BlockDevice>,
    lu_cfg: LuConfig,
) -> anyhow::Result<LogicalUnit> {
    let pr: Option<Box<dyn PrStore>> = cfg.state_dir.as_ref().map(|d| {
        let p = d
            .join("pr")
            .join(format!("{}-lun{}.json", sanitize(iqn), id));
        Box::new(FilePrStore::new(p)) as Box<dyn PrStore>
    });
    LogicalUnit::new(lu_cfg, dev, pr).with_context(|| format!("LUN {id} of {iqn}"))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Gateway {
    /// Open every LUN's backend and build the targets.
    pub fn build(cfg: Config) -> anyhow::Result<Self> {
        let mut targets = HashMap::new();
        let mut devices = Vec::new();
        let mut volumes = Vec::new();
        if let Some(dir) = &cfg.state_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating state directory {}", dir.display()))?;
        }
        for t in &cfg.targets {
            let target = Target::new(&t.iqn);
            for l in &t.luns {
                let dev: Arc<dyn BlockDevice> = if l.backend == Backend::Ec {
                    let v =
                        open_ec(&cfg, l).with_context(|| format!("LUN {} of {}", l.id, t.iqn))?;
                    volumes.push(v.clone());
                    Arc::new(v)
                } else {
                    open_device(l)?
                };
                devices.push(dev.clone());
                let lu = make_lu(&cfg, &t.iqn, l.id, l, dev)?;
                target.add_lun(l.id, Arc::new(lu));
            }
            targets.insert(t.iqn.to_ascii_lowercase(), Arc::new(target));
        }
        // The cluster's volumes are LUNs of one target (configured above, for its access
        // settings, or made here with none).
        if let Some(cl) = &cfg.cluster {
            let key = cl.target.to_ascii_lowercase();
            if let std::collections::hash_map::Entry::Vacant(e) = targets.entry(key) {
                e.insert(Arc::new(Target::new(&cl.target)));
            }
        }
        let directory = Arc::new(directory_of(&cfg, &cfg.targets, None));
        let limits = Limits {
            max_recv_data_segment_length: cfg.max_recv_data_segment_length,
            max_burst_length: cfg.max_burst_length,
            first_burst_length: cfg.first_burst_length,
            immediate_data: cfg.immediate_data,
            initial_r2t: cfg.initial_r2t,
            max_outstanding_r2t: cfg.max_outstanding_r2t,
            allow_header_digest: cfg.digests,
            allow_data_digest: cfg.digests,
        };
        Ok(Self {
            defs: Mutex::new(cfg.targets.clone()),
            cfg,
            targets: RwLock::new(targets),
            directory: Mutex::new(directory),
            volume_targets: Mutex::new(HashMap::new()),
            limits,
            sessions: SessionRegistry::default(),
            loop_started: Arc::new(|_: &str| {}),
            cluster_store: None,
            devices: Mutex::new(devices),
            volumes: Mutex::new(volumes),
            next_tsih: AtomicU16::new(1),
            next_nexus: AtomicU64::new(1),
        })
    }

    /// The target named `iqn` (any case), if it is configured now.
    pub fn target(&self, iqn: &str) -> Option<Arc<Target>> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&iqn.to_ascii_lowercase())
            .cloned()
    }

    /// What login and discovery see now.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serve (or update) the volume target `name`, with the cluster target `like`'s access
    /// settings and portal group tag, redirecting new logins to `redirect` (`host:port`)
    /// when set. Returns the target (its LUNs are the caller's).
    pub fn put_volume_target(
        &self,
        name: &str,
        like: &str,
        alias: &str,
        redirect: Option<String>,
    ) -> Arc<Target> {
        let key = name.to_ascii_lowercase();
        let target = self
            .targets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Target::new(name)))
            .clone();
        let mut d = self.directory.lock().unwrap_or_else(|e| e.into_inner());
        let Some(template) = d.targets.iter().find(|t| t.name.eq_ignore_ascii_case(like)) else {
            return target;
        };
        let entry = TargetEntry {
            name: name.to_string(),
            alias: Some(alias.to_string()),
            redirect,
            ..template.clone()
        };
        let mut dynamic = self
            .volume_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if dynamic.get(&key) != Some(&entry) {
            let mut next = (**d).clone();
            next.targets.retain(|t| !t.name.eq_ignore_ascii_case(name));
            next.targets.push(entry.clone());
            *d = Arc::new(next);
            dynamic.insert(key, entry);
        }
        target
    }

    /// Stop serving the volume target `name` (its sessions keep the target until they end).
    pub fn remove_volume_target(&self, name: &str) {
        let key = name.to_ascii_lowercase();
        if self
            .volume_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
            .is_none()
        {
            return;
        }
        self.targets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let mut d = self.directory.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**d).clone();
        next.targets.retain(|t| !t.name.eq_ignore_ascii_case(name));
        *d = Arc::new(next);
    }

    /// The volume targets' directory entries (a reload keeps them).
    fn volume_target_entries(&self) -> Vec<TargetEntry> {
        self.volume_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Give the target `name` the portal group tag `tag` (the cluster target takes the
    /// gateway's cluster number, so every gateway is a distinct target port). New sessions
    /// see it.
    pub fn set_portal_group_tag(&self, name: &str, tag: u16) {
        let mut d = self.directory.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**d).clone();
        for t in &mut next.targets {
            if t.name.eq_ignore_ascii_case(name) {
                t.portal_group_tag = tag;
            }
        }
        *d = Arc::new(next);
    }

    /// A fresh TSIH (never 0).
    pub fn alloc_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// A fresh I_T nexus id.
    pub fn alloc_nexus_id(&self) -> u64 {
        self.next_nexus.fetch_add(1, Ordering::Relaxed)
    }
}

/// Handle to a running gateway.
pub struct Running {
    /// The addresses the portals listen on.
    pub portals: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    gateway: Arc<Gateway>,
}

impl Running {
    /// The running gateway.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stop accepting, let connections finish their commands (bounded), flush the backends.
    pub fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.threads {
            let _ = t.join();
        }
        flush_all(&self.gateway);
    }
}

/// A current-thread runtime for one of the gateway's threads (`None`, logged with `what`,
/// when it cannot be built).
fn runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            error!("{what}: {e}");
            None
        }
    }
}

fn flush_all(gw: &Gateway) {
    let Some(rt) = runtime("cannot flush backends") else {
        return;
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let devices = gw.devices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for d in &devices {
            if let Err(e) = d.flush().await {
                warn!("flush on shutdown failed: {e}");
            }
        }
    });
}

/// Bind the portals and start the workers (and the cluster agent, with a `[cluster]`
/// configuration: its volumes are opened, for up to 30 s, before the portals listen).
pub fn start(gw: Arc<Gateway>) -> anyhow::Result<Running> {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut threads = Vec::new();
    if let Some(cl) = gw.cfg.cluster.clone() {
        // The cluster's volumes are opened before the portals listen, so an initiator that
        // logs in as soon as it can connect finds them (bounded: a volume whose nodes are away
        // comes later).
        let g = gw.clone();
        let sd = shutdown_rx.clone();
        let ready = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let r2 = ready.clone();
        let addrs = gw.cfg.portals.clone();
        // Other gateways forward commands for the volumes this one owns here.
        let at = cl.forward.unwrap_or_else(|| {
            let ip = addrs
                .first()
                .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
            SocketAddr::new(ip, 0)
        });
        if at.ip().is_unspecified() {
            warn!(
                "[cluster] forward is not set and the first portal is {at}: other gateways \
                 cannot reach this one's forwarding listener at an unspecified address; set \
                 [cluster] forward to an address they can reach"
            );
        }
        let forward = std::net::TcpListener::bind(at)
            .with_context(|| format!("binding the forwarding listener {at}"))?;
        threads.push(
            std::thread::Builder::new()
                .name("tessera-cluster".into())
                .spawn(move || cluster::run(g, cl, addrs, forward, r2, sd))?,
        );
        let (lock, cv) = &*ready;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, waited) = cv
            .wait_timeout_while(guard, Duration::from_secs(30), |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
        if waited.timed_out() && !*guard {
            warn!("the cluster's volumes are not all open yet; serving what is ready");
        }
    }
    let mut listeners = Vec::new();
    for p in &gw.cfg.portals {
        let l = std::net::TcpListener::bind(p).with_context(|| format!("binding portal {p}"))?;
        l.set_nonblocking(true)?;
        listeners.push(l);
    }
    let portals: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let workers = match gw.cfg.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut senders = Vec::new();
    for i in 0..workers {
        // Bounded: a worker that falls behind slows the acceptor (the kernel's listen backlog
        // holds new connections meanwhile).
        let (tx, rx) = mpsc::channel::<std::net::TcpStream>(ACCEPT_QUEUE);
        senders.push(tx);
        let gw = gw.clone();
        let sd = shutdown_rx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("tessera-w{i}"))
                .spawn(move || worker(gw, rx, sd))?,
        );
    }
    // Always: volumes may come later (the cluster's, or a reload's ec LUNs).
    {
        let g = gw.clone();
        let sd = shutdown_rx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tessera-maint".into())
                .spawn(move || maintenance(g, sd))?,
        );
    }
    let sd = shutdown_rx;
    threads.push(
        std::thread::Builder::new()
            .name("tessera-accept".into())
            .spawn(move || {
                acceptor(listeners, senders, sd);
            })?,
    );
    for p in &portals {
        info!(portal = %p, workers, "iSCSI portal listening");
    }
    Ok(Running {
        portals,
        shutdown,
        threads,
        gateway: gw,
    })
}

impl Gateway {
    /// Set what runs as each event loop starts ([`LoopHook`]); before [`start`].
    pub fn on_loop_start(&mut self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.loop_started = Arc::new(hook);
    }

    /// Keep the cluster's state in `meta` instead of the configured etcd (`[cluster] etcd` is
    /// then not used): the in-memory store in tests; before [`start`].
    pub fn use_cluster_store(&mut self, meta: Arc<dyn tessera_cluster::Meta>) {
        self.cluster_store = Some(meta);
    }

    /// Bring what the volumes and the session registry keep into the metrics (the binary
    /// calls it before each scrape).
    pub fn refresh_metrics(&self) {
        refresh_metrics(self);
    }
}

fn refresh_metrics(gw: &Gateway) {
    use crate::metrics::catch_up;
    use std::sync::atomic::Ordering::Relaxed;
    let m = metrics::metrics();
    m.iscsi_sessions.set(gw.sessions.len() as i64);
    let vols = gw.volumes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if gw.cfg.cluster.is_some() {
        m.cluster_volumes_owned.set(vols.len() as i64);
    }
    // A volume no longer served here (taken over by another gateway, deleted) leaves no
    // gauges behind: they are set afresh for the volumes served now.
    for g in [
        &m.volume_epoch,
        &m.volume_fenced,
        &m.volume_degraded_pgs,
        &m.volume_rebuilding_pgs,
        &m.volume_stale_nodes,
        &m.volume_repair_stripes,
        &m.volume_write_suspended_pgs,
        &m.volume_unresponsive_nodes,
        &m.rebuild_active,
        &m.rebuild_stripes,
        &m.rebuild_done_stripes,
        &m.rebuild_written_bytes,
    ] {
        g.reset();
    }
    m.rebuild_rate.reset();
    for v in &vols {
        let name = v.spec().name.as_str();
        let st = v.stats();
        for (event, c) in [
            ("degraded_read", &st.degraded_reads),
            ("repaired_fragment", &st.repaired_fragments),
            ("checksum_error", &st.checksum_errors),
            ("rolled_forward", &st.rolled_forward),
            ("rolled_back", &st.rolled_back),
            ("degraded_write", &st.degraded_writes),
            ("suspended_write", &st.suspended_writes),
            ("trimmed_fragment", &st.trimmed_fragments),
        ] {
            catch_up(
                &m.volume_events.with_label_values(&[name, event]),
                c.load(Relaxed),
            );
        }
        m.volume_epoch
            .with_label_values(&[name])
            .set(v.epoch() as i64);
        m.volume_fenced
            .with_label_values(&[name])
            .set(i64::from(v.is_fenced()));
        let h = v.health();
        for (g, n) in [
            (&m.volume_degraded_pgs, h.degraded_pgs),
            (&m.volume_rebuilding_pgs, h.rebuilding_pgs),
            (&m.volume_stale_nodes, h.stale_nodes),
            (&m.volume_repair_stripes, h.repair_stripes),
            (&m.volume_write_suspended_pgs, h.write_suspended_pgs),
        ] {
            g.with_label_values(&[name]).set(n as i64);
        }
        let (mut down, mut slow) = (0, 0);
        for n in v.used_nodes() {
            match v.node_condition(n) {
                tessera_volume::NodeCondition::Down => down += 1,
                tessera_volume::NodeCondition::Slow => slow += 1,
                tessera_volume::NodeCondition::Up => {}
            }
        }
        m.volume_unresponsive_nodes
            .with_label_values(&[name, "down"])
            .set(down);
        m.volume_unresponsive_nodes
            .with_label_values(&[name, "slow"])
            .set(slow);
        let p = v.fill_progress();
        m.rebuild_active
            .with_label_values(&[name])
            .set(i64::from(p.is_some_and(|p| !p.finished)));
        if let Some(p) = p {
            m.rebuild_stripes
                .with_label_values(&[name])
                .set(p.stripes as i64);
            m.rebuild_done_stripes
                .with_label_values(&[name])
                .set(p.done as i64);
            m.rebuild_written_bytes
                .with_label_values(&[name])
                .set(p.bytes as i64);
            m.rebuild_rate.with_label_values(&[name]).set(p.rate);
        }
    }
}

/// Background work of the erasure-coded volumes: checks after an unclean stop, nodes catching
/// up, repairs, clearing the write-intent log.
fn maintenance(gw: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let Some(rt) = runtime("maintenance runtime") else {
        return;
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        (gw.loop_started)("maintenance loop");
        loop {
            let mut busy = false;
            let vols = gw.volumes.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for v in &vols {
                busy |= v.maintain().await;
            }
            let pause = if busy { 20 } else { 250 };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                _ = shutdown.changed() => break,
            }
        }
        let vols = gw.volumes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for v in &vols {
            v.close();
        }
    });
}

fn acceptor(
    listeners: Vec<std::net::TcpListener>,
    workers: Vec<mpsc::Sender<std::net::TcpStream>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(rt) = runtime("acceptor runtime") else {
        return;
    };
    rt.block_on(async move {
        let mut ls = Vec::new();
        for l in listeners {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => ls.push(l),
                Err(e) => error!("listener: {e}"),
            }
        }
        let (tx, mut rx) = mpsc::channel(ACCEPT_QUEUE);
        for l in ls {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            if tx.send(s).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        let mut next = 0usize;
        loop {
            tokio::select! {
                s = rx.recv() => {
                    let Some(s) = s else { return };
                    let Ok(s) = s.into_std() else { continue };
                    if workers[next % workers.len()].send(s).await.is_err() {
                        return;
                    }
                    next += 1;
                }
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// Accepted connections waiting for the acceptor, and for each worker.
const ACCEPT_QUEUE: usize = 256;

fn worker(
    gw: Arc<Gateway>,
    mut rx: mpsc::Receiver<std::net::TcpStream>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(rt) = runtime("worker runtime") else {
        return;
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let name = std::thread::current()
            .name()
            .map_or("worker".to_string(), |n| format!("worker {n}"));
        (gw.loop_started)(&name);
        // Node connections of volumes closed elsewhere (a takeover, a reload) close here too.
        tokio::task::spawn_local(async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tessera_volume::nodes::sweep();
            }
        });
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                s = rx.recv() => {
                    let Some(s) = s else { break };
                    let gw = gw.clone();
                    let sd = shutdown.clone();
                    conns.spawn_local(async move { iscsi::serve(gw, s, sd).await });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        // Connections see the shutdown too; give them time to finish in-flight commands.
        let deadline = tokio::time::sleep(Duration::from_secs(8));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = conns.join_next() => if r.is_none() { break },
                _ = &mut deadline => {
                    warn!("{} connections did not finish in time", conns.len());
                    conns.abort_all();
                    break;
                }
            }
        }
    });
}
