//! `tessera node`: the storage node daemon. One event loop: the fragment store on the thread's
//! io_uring engine, the fragment protocol on a TCP listener, and a background scrub.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use tessera_rpc::{Client, Request, Response};
use tessera_store::fragment::{FragmentStore, NodeHandler, StoreOptions, SyncMode};
use tessera_uring::{EngineConfig, Uring};
use tracing::{info, warn};

use crate::config::NodeConfig;

/// Serve the store until SIGINT or SIGTERM; in-flight requests finish before exit.
pub fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(cfg))
}

async fn serve(cfg: NodeConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if let Err(e) = Uring::init_current(&EngineConfig::from_env()) {
        warn!("io engine: {e}");
    }
    if let Some(dir) = cfg.data.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let opts = StoreOptions {
        node_id: cfg.id.clone(),
        capacity: cfg.capacity,
        sync: if cfg.dsync {
            SyncMode::Dsync
        } else {
            SyncMode::Batched
        },
        direct: true,
    };
    let store = FragmentStore::open(&cfg.data, &opts)?;
    let mut handler = NodeHandler::new(store.clone());
    handler.scrub_rate = cfg.scrub_rate;
    let handler = Rc::new(Metered(handler));
    if let Some(addr) = cfg.metrics {
        crate::metrics::serve(addr)?;
        let store = store.clone();
        tokio::task::spawn_local(async move {
            let m = crate::metrics::metrics();
            loop {
                let st = store.stats();
                for (event, v) in [
                    ("fragment_read", st.reads),
                    ("fragment_write", st.writes),
                    ("checksum_error", st.checksum_errors),
                    ("stale_epoch_reject", st.stale_epoch_rejects),
                ] {
                    crate::metrics::catch_up(&m.node_events.with_label_values(&[event]), v);
                }
                m.node_store_bytes
                    .with_label_values(&["capacity"])
                    .set(st.capacity as i64);
                m.node_store_bytes
                    .with_label_values(&["allocated"])
                    .set(st.allocated as i64);
                m.node_store_failed.set(i64::from(st.failed_errno != 0));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    info!(node = %cfg.id, listen = %cfg.listen, data = %cfg.data.display(), "storage node listening");
    let heartbeats = crate::notify::Heartbeats::default();
    heartbeats.register("node loop").spawn_local();
    heartbeats.start_watchdog();
    crate::notify::ready(&format!("serving {} on {}", cfg.data.display(), cfg.listen));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // A store that failed a write or sync says so once, and in etcd (the controller then
    // rebuilds its fragments elsewhere).
    let (failed_tx, failed_rx) = tokio::sync::watch::channel(None::<String>);
    {
        let store = store.clone();
        let id = cfg.id.clone();
        tokio::task::spawn_local(async move {
            loop {
                if let Some(errno) = store.failed() {
                    let why = format!(
                        "the store failed a write or sync: {}",
                        std::io::Error::from_raw_os_error(errno)
                    );
                    tracing::error!(node = %id, "{why}; refusing every write until restarted, its fragments are to be rebuilt elsewhere");
                    let _ = failed_tx.send(Some(why));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    if let Some(cl) = cfg.cluster.clone() {
        let rec = tessera_cluster::NodeRecord {
            id: cfg.id.clone(),
            address: cfg.listen.to_string(),
            host: cfg.host.clone(),
            rack: cfg.rack.clone(),
            zone: cfg.zone.clone(),
            capacity: store.capacity(),
            state: tessera_cluster::NodeState::Up,
            failed: None,
        };
        let mut stop = stop_rx.clone();
        let failed = failed_rx.clone();
        tokio::task::spawn_local(async move {
            tokio::select! {
                _ = register(cl, rec, failed) => {}
                _ = stop.changed() => {}
            }
        });
    }
    if cfg.scrub_rate > 0 {
        let store = store.clone();
        let mut stop = stop_rx.clone();
        let (rate, every) = (cfg.scrub_rate, Duration::from_secs(cfg.scrub_interval_secs));
        tokio::task::spawn_local(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                let r = store.scrub(rate).await;
                if r.mismatches > 0 {
                    warn!(
                        checked = r.checked,
                        mismatches = r.mismatches,
                        "background scrub found damaged fragments"
                    );
                } else {
                    info!(
                        checked = r.checked,
                        bytes = r.bytes,
                        "background scrub clean"
                    );
                }
            }
        });
    }
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((s, peer)) => {
                    let h = handler.clone();
                    let mut stop = stop_rx.clone();
                    tokio::task::spawn_local(async move {
                        let stopped = async move {
                            let _ = stop.changed().await;
                        };
                        if let Err(e) = tessera_rpc::server::serve(h, s, stopped).await {
                            tracing::debug!(%peer, "connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!(node = %cfg.id, "stopping");
    crate::notify::stopping();
    drop(listener);
    let _ = stop_tx.send(true);
    // Requests already started finish (they may be writes the gateway is waiting for).
    for _ in 0..500 {
        if handler.0.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(node = %cfg.id, "stopped");
    Ok(())
}

/// Stay registered in etcd under a lease, re-registering whenever the lease is lost (etcd
/// away, or the lease expired). A store failure (`failed`) is added to the record at once.
async fn register(
    cl: crate::config::ClusterConfig,
    mut rec: tessera_cluster::NodeRecord,
    mut failed: tokio::sync::watch::Receiver<Option<String>>,
) {
    let mut logged_down = false;
    loop {
        rec.failed = failed.borrow_and_update().clone();
        let attempt = async {
            let c = tessera_cluster::Cluster::connect(&cl.etcd, &cl.prefix).await?;
            let lease = c.grant(cl.lease_ttl).await?;
            c.register_node(&rec, lease).await?;
            Ok::<_, tessera_cluster::ClusterError>((c, lease))
        };
        match attempt.await {
            Ok((c, lease)) => {
                info!(node = %rec.id, etcd = ?cl.etcd, lease = format!("{lease:x}"), "registered in the cluster");
                logged_down = false;
                let alive = c.keep_alive(lease, cl.lease_ttl);
                tokio::pin!(alive);
                let why = loop {
                    tokio::select! {
                        why = &mut alive => break why,
                        r = failed.changed() => {
                            if r.is_err() {
                                // The watcher is gone (it reported already): keep the lease.
                                break (&mut alive).await;
                            }
                            rec.failed = failed.borrow_and_update().clone();
                            match c.register_node(&rec, lease).await {
                                Ok(()) => warn!(node = %rec.id, "reported the store's failure in the cluster"),
                                Err(e) => warn!(node = %rec.id, "reporting the store's failure: {e}"),
                            }
                        }
                    }
                };
                warn!(node = %rec.id, "cluster registration lost: {why}");
            }
            Err(e) => {
                if !logged_down {
                    warn!(node = %rec.id, "cannot register in the cluster: {e}");
                    logged_down = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Ask the node at `addr` to scrub now and follow it (a progress bar on a terminal, plain lines
/// otherwise); prints its report. Fails if anything mismatched.
pub fn scrub(addr: SocketAddr) -> anyhow::Result<()> {
    scrub_with(addr, &mut crate::progress::Progress::new())
}

/// [`scrub`], reporting progress to `progress`.
pub fn scrub_with(
    addr: SocketAddr,
    progress: &mut crate::progress::Progress,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let r = local
        .block_on(&rt, async {
            // The scrub on one connection, its progress asked on another.
            let worker = Client::new(addr, Duration::from_secs(24 * 3600));
            let watcher = Client::new(addr, Duration::from_secs(10));
            let status = async || match watcher.call(&Request::ScrubStatus).await {
                Ok(Response::ScrubStatus(p)) => Some(p),
                _ => None,
            };
            let before = status().await.map_or(0, |p| p.scrubs);
            let run = worker.call(&Request::Scrub);
            tokio::pin!(run);
            let mut shown: Option<u64> = None;
            loop {
                tokio::select! {
                    r = &mut run => {
                        if let (Some(n), Ok(Response::Scrub(rep))) = (shown, &r) {
                            let name = format!("{addr} scrub {n}");
                            progress.update(&name, rep.bytes, rep.bytes, "");
                            progress.finish(&name, "done");
                        }
                        return r;
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let Some(p) = status().await else { continue };
                if !p.running {
                    continue;
                }
                if let Some(n) = shown.filter(|&n| n != p.scrubs) {
                    progress.finish(&format!("{addr} scrub {n}"), "done");
                }
                shown = Some(p.scrubs);
                let whose = if p.scrubs > before {
                    ""
                } else {
                    " (a scrub already running: ours follows it)"
                };
                progress.update(
                    &format!("{addr} scrub {}", p.scrubs),
                    p.done_bytes,
                    p.total_bytes,
                    &format!(
                        "{} copies checked, {} mismatches{whose}",
                        p.checked, p.mismatches
                    ),
                );
            }
        })
        .with_context(|| format!("asking node {addr}"))?;
    let Response::Scrub(r) = r else {
        anyhow::bail!("unexpected answer {r:?}");
    };
    println!(
        "{addr}: scrub checked {} fragment copies ({} bytes): {} mismatches",
        r.checked, r.bytes, r.mismatches
    );
    if r.mismatches > 0 {
        anyhow::bail!("{} damaged fragment copies", r.mismatches);
    }
    Ok(())
}

/// Print the node's counters.
pub fn stats(addr: SocketAddr) -> anyhow::Result<()> {
    let r = call(addr, Request::Stats, Duration::from_secs(10))?;
    let Response::Stats(s) = r else {
        anyhow::bail!("unexpected answer {r:?}");
    };
    println!(
        "{addr}: capacity {} allocated {} writes {} reads {} checksum_errors {} stale_epoch_rejects {}",
        s.capacity, s.allocated, s.writes, s.reads, s.checksum_errors, s.stale_epoch_rejects
    );
    if s.failed_errno != 0 {
        println!(
            "{addr}: FAILED: the store failed a write or sync ({}); it refuses writes until the node restarts",
            std::io::Error::from_raw_os_error(s.failed_errno as i32)
        );
    }
    Ok(())
}

fn call(addr: SocketAddr, req: Request, timeout: Duration) -> anyhow::Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local
        .block_on(
            &rt,
            async move { Client::new(addr, timeout).call(&req).await },
        )
        .with_context(|| format!("asking node {addr}"))
}

/// The node's request handler, counted and timed per operation for `/metrics`.
struct Metered(NodeHandler);

impl tessera_rpc::Handler for Metered {
    fn handle(
        &self,
        req: Request,
    ) -> tessera_rpc::server::LocalFuture<Result<Response, tessera_rpc::Refusal>> {
        let op = req.op().name();
        let started = std::time::Instant::now();
        let f = self.0.handle(req);
        Box::pin(async move {
            let r = f.await;
            let m = crate::metrics::metrics();
            m.node_request_duration
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            let outcome = if r.is_ok() { "ok" } else { "refused" };
            m.node_requests.with_label_values(&[op, outcome]).inc();
            r
        })
    }
}
