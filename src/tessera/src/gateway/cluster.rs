//! The gateway's part in the cluster (`[cluster]` in its configuration).
//!
//! One thread, with its own runtime, that:
//! - registers the gateway in etcd under a lease and keeps the lease alive;
//! - campaigns to be the controller (an etcd election); while it is, it makes the first
//!   placement map of every volume that has none;
//! - watches the volumes and their maps and, for each volume with a map, takes ownership
//!   (a fencing epoch raised in etcd, the owner key under this gateway's lease), opens it with
//!   that epoch and adds it to the cluster target as LUN `lun`; a deleted volume's LUN goes.
//!
//! Volumes another gateway owns are not exported here yet (forwarding to the owner is the
//! next step).
//!
//! Self-fencing: the lease is renewed every third of its TTL. When two thirds of the TTL pass
//! without a renewal etcd confirmed (etcd unreachable, or this gateway cut off from it), the
//! gateway stops writing every volume it owns (writes get BUSY, which initiators retry)
//! before the lease can expire and another gateway can take them over. When it reaches etcd
//! again it registers anew and takes back, with new epochs, the volumes nobody else took.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tessera_cluster::{Cluster, GatewayRecord, PgMapRecord, VolumeRecord};
use tessera_target::LuConfig;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{lu_over, revision, stable_hash, Gateway};
use crate::config::ClusterConfig;

type Ready = Arc<(Mutex<bool>, Condvar)>;

fn signal_ready(ready: &Ready) {
    let (lock, cv) = &**ready;
    *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
    cv.notify_all();
}

/// Run the cluster agent until shutdown.
pub(super) fn run(
    gw: Arc<Gateway>,
    cl: ClusterConfig,
    portals: Vec<SocketAddr>,
    ready: Ready,
    shutdown: watch::Receiver<bool>,
) {
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
    local.block_on(&rt, agent(gw, cl, portals, ready, shutdown));
}

struct Exported {
    volume: tessera_volume::EcVolume,
    lun: u64,
}

async fn agent(
    gw: Arc<Gateway>,
    cl: ClusterConfig,
    portals: Vec<SocketAddr>,
    ready: Ready,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut exported: HashMap<u64, Exported> = HashMap::new();
    let mut first = true;
    let mut logged_down = false;
    loop {
        let session = async {
            let c = Cluster::connect(&cl.etcd, &cl.prefix).await?;
            // The lease runs at least its TTL from before it was asked for.
            let asked = tokio::time::Instant::now();
            let lease = c.grant(cl.lease_ttl).await?;
            c.register_gateway(
                &GatewayRecord {
                    id: cl.gateway_id.clone(),
                    portals: portals.iter().map(ToString::to_string).collect(),
                },
                lease,
            )
            .await?;
            Ok::<_, tessera_cluster::ClusterError>((c, lease, asked))
        };
        let (c, lease, asked) = tokio::select! {
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
        info!(gateway = %cl.gateway_id, etcd = ?cl.etcd, lease = format!("{lease:x}"), "joined the cluster");
        // Volumes fenced when an earlier lease was lost are opened afresh, with new epochs.
        let stale: Vec<u64> = exported
            .iter()
            .filter(|(_, e)| e.volume.is_fenced())
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(e) = exported.remove(&id) {
                gw.volumes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|v| v.spec().id != id);
                e.volume.close();
            }
        }
        let renewed_at = Rc::new(Cell::new(asked));
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
                c.keep_alive_with(lease, ttl, |sent| at.set(sent))
                    .await
            })
        };
        // Stop writing well before the lease could expire unrenewed: a watchdog of its own, so
        // that nothing this loop waits for (etcd calls time out after seconds) can delay it.
        let fence_after = Duration::from_millis(cl.lease_ttl as u64 * 1000 * 2 / 3);
        let owned: Rc<std::cell::RefCell<Vec<tessera_volume::EcVolume>>> = Rc::new(
            std::cell::RefCell::new(exported.values().map(|e| e.volume.clone()).collect()),
        );
        let lost = Rc::new(tokio::sync::Notify::new());
        let watchdog = {
            let (at, owned, lost) = (renewed_at.clone(), owned.clone(), lost.clone());
            let (id, ttl) = (cl.gateway_id.clone(), cl.lease_ttl);
            tokio::task::spawn_local(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let quiet = at.get().elapsed();
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
        let mut events = match c
            .client()
            .watch(
                c.key(""),
                Some(tessera_cluster::etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
        {
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
                controller_round(&c).await;
            }
            reconcile(&gw, &cl, &c, lease, &mut exported).await;
            *owned.borrow_mut() = exported.values().map(|e| e.volume.clone()).collect();
            if first {
                signal_ready(&ready);
                first = false;
            }
            // Wake on any change under the prefix, or every 2 s regardless.
            let changed = async {
                match events.as_mut() {
                    Some(ev) => {
                        match tokio::time::timeout(Duration::from_secs(2), ev.message()).await {
                            Ok(Ok(Some(_))) | Err(_) => true,
                            Ok(_) => false,
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
                    self_fence(&exported, &why);
                    break;
                }
                _ = lost.notified() => {
                    self_fence(&exported, "the cluster lease lapsed");
                    kept.abort();
                    break;
                }
                _ = shutdown.changed() => {
                    campaign.abort();
                    kept.abort();
                    watchdog.abort();
                    // Leave cleanly: owners and the election go with the lease.
                    let _ = c.revoke(lease).await;
                    for (_, e) in exported.drain() {
                        e.volume.close();
                    }
                    return;
                }
            }
        }
        campaign.abort();
        watchdog.abort();
    }
    for (_, e) in exported.drain() {
        e.volume.close();
    }
}

fn self_fence(exported: &HashMap<u64, Exported>, why: &str) {
    for e in exported.values() {
        e.volume.fence(&format!("self-fenced: {why}"));
    }
}

/// The controller's work: a first placement map for every volume without one.
async fn controller_round(c: &Cluster) {
    let vols = match c.volumes().await {
        Ok(v) => v,
        Err(e) => {
            warn!("controller: listing volumes: {e}");
            return;
        }
    };
    for v in vols {
        match c.pg_map(v.id).await {
            Ok(Some(_)) => {}
            Ok(None) => match c.ensure_pg_map(&v).await {
                Ok(m) => {
                    info!(volume = %v.name, nodes = m.nodes.len(), pgs = m.map.len(), "placed volume")
                }
                Err(e) => warn!(volume = %v.name, "cannot place volume yet: {e}"),
            },
            Err(e) => warn!(volume = %v.name, "reading its map: {e}"),
        }
    }
}

/// Export what should be exported, drop what is gone.
async fn reconcile(
    gw: &Arc<Gateway>,
    cl: &ClusterConfig,
    c: &Cluster,
    lease: i64,
    exported: &mut HashMap<u64, Exported>,
) {
    let Some(target) = gw.targets.get(&cl.target.to_ascii_lowercase()).cloned() else {
        return;
    };
    let vols = match c.volumes().await {
        Ok(v) => v,
        Err(e) => {
            warn!("listing volumes: {e}");
            return;
        }
    };
    // Deleted volumes: their LUNs go.
    let live: Vec<u64> = vols.iter().map(|v| v.id).collect();
    let gone: Vec<u64> = exported
        .keys()
        .filter(|id| !live.contains(id))
        .copied()
        .collect();
    for id in gone {
        if let Some(e) = exported.remove(&id) {
            target.remove_lun(e.lun);
            gw.volumes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|v| v.spec().id != id);
            e.volume.close();
            info!(lun = e.lun, "volume deleted: LUN removed");
        }
    }
    for v in vols {
        if let Some(e) = exported.get(&v.id) {
            // Grown: the volume takes the new size, the initiators are told.
            if v.size > e.volume.size() {
                match e.volume.grow(v.size) {
                    Ok(()) => {
                        if let Some(lu) = target.lun(e.lun) {
                            lu.capacity_changed();
                        }
                    }
                    Err(why) => warn!(volume = %v.name, "cannot grow: {why}"),
                }
            }
            continue;
        }
        let map = match c.pg_map(v.id).await {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                warn!(volume = %v.name, "reading its map: {e}");
                continue;
            }
        };
        let epoch = match c.acquire(v.id, &cl.gateway_id, lease).await {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                warn!(volume = %v.name, "taking ownership: {e}");
                continue;
            }
        };
        match open(gw, &v, &map, epoch).await {
            Ok(vol) => {
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
                match lu_over(&gw.cfg, &cl.target, v.lun, dev, lu_cfg) {
                    Ok(lu) => {
                        target.add_lun(v.lun, Arc::new(lu));
                        gw.volumes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(vol.clone());
                        info!(volume = %v.name, lun = v.lun, epoch, "serving volume");
                        exported.insert(
                            v.id,
                            Exported {
                                volume: vol,
                                lun: v.lun,
                            },
                        );
                    }
                    Err(e) => {
                        error!(volume = %v.name, "cannot export: {e:#}");
                        vol.close();
                        let _ = c.release(v.id, &cl.gateway_id, lease).await;
                    }
                }
            }
            Err(e) => {
                warn!(volume = %v.name, "cannot open: {e}");
                let _ = c.release(v.id, &cl.gateway_id, lease).await;
            }
        }
    }
}

/// Open a cluster volume with the epoch etcd granted.
async fn open(
    gw: &Gateway,
    v: &VolumeRecord,
    map: &PgMapRecord,
    epoch: u64,
) -> anyhow::Result<tessera_volume::EcVolume> {
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
        epoch: Some(epoch),
    };
    let connector: Arc<dyn tessera_volume::nodes::Connector> =
        Arc::new(tessera_volume::nodes::RpcConnector::new(
            addrs,
            Duration::from_millis(gw.cfg.node_timeout_ms),
        ));
    let vol = tessera_volume::EcVolume::open(spec, connector).await?;
    vol.release_thread();
    Ok(vol)
}
