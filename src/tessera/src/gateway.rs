//! `tessera gateway`: the gateway library ([`tessera_gateway`]) run as a daemon: its
//! configuration file, signals (SIGHUP reloads), metrics serving and systemd notification.

use std::path::Path;
use std::sync::Arc;

use tessera_gateway::Gateway;
use tracing::{error, info};

use crate::config;
use crate::notify::{self, Heartbeats};

/// Run the gateway from a configuration file until SIGINT or SIGTERM; SIGHUP reloads it.
pub fn run_config(path: &Path) -> anyhow::Result<()> {
    let cfg = config::load_gateway(path)?;
    let mut gw = Gateway::build(cfg)?;
    let heartbeats = Heartbeats::default();
    let hb = heartbeats.clone();
    gw.on_loop_start(move |name| hb.register(name).spawn_local());
    let gw = Arc::new(gw);
    if let Some(addr) = gw.cfg.metrics {
        crate::metrics::serve(addr)?;
        let weak = Arc::downgrade(&gw);
        crate::metrics::set_refresh(move || {
            if let Some(gw) = weak.upgrade() {
                gw.refresh_metrics();
            }
        });
    }
    let portals = gw.cfg.portals.len();
    let running = tessera_gateway::start(gw)?;
    let status = format!("serving on {portals} portal(s)");
    notify::ready(&status);
    heartbeats.start_watchdog();
    let gw = running.gateway().clone();
    wait_for_signal(|| {
        notify::reloading();
        info!(file = %path.display(), "SIGHUP: reloading the configuration");
        match config::load_gateway(path)
            .map_err(anyhow::Error::from)
            .and_then(|c| gw.reload(c))
        {
            Ok(r) => info!("configuration reloaded: {r}"),
            Err(e) => error!("configuration not reloaded, the running one stays: {e:#}"),
        }
        notify::ready(&status);
    })?;
    notify::stopping();
    info!("stopping");
    running.stop();
    info!("stopped");
    Ok(())
}

/// Block until SIGINT or SIGTERM, calling `on_hup` at each SIGHUP meanwhile.
pub fn wait_for_signal(mut on_hup: impl FnMut()) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => on_hup(),
            }
        }
        Ok(())
    })
}
