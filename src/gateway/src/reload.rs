//! Reloading the gateway's configuration (SIGHUP) without dropping a session.
//!
//! What applies at once: new targets, new LUNs (opened before anything changes: a LUN that
//! cannot be opened refuses the whole reload), ACLs, CHAP secrets (target and discovery),
//! aliases and advertised portals, for every login from then on. Sessions already logged in
//! keep going. A removed LUN leaves its target's LUN map at once (initiators see REPORTED
//! LUNS DATA HAS CHANGED, then LOGICAL UNIT NOT SUPPORTED), drains (the commands it is
//! executing finish), is flushed and then closed. A removed target is no longer discovered
//! or logged in to; its LUNs drain the same way.
//!
//! What a reload does not change (listed in the answer, taking effect at the next start):
//! portals, workers, negotiation limits, the state directory, metrics, storage nodes and the
//! cluster. A LUN cannot change in place (its identity, size and backing are what initiators
//! have cached): remove it in one reload and add it back in the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tessera_cluster::stable_hash;
use tessera_proto::block::BlockDevice;
use tessera_proto::iscsi::login::Directory;
use tessera_scsi::{LogicalUnit, Target};
use tracing::{info, warn};

use super::{directory_of, make_lu, open_device, open_ec, Gateway};
use crate::config::{self, Backend, Config};

/// How long a removed LUN may take to finish the commands it is executing.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Targets added (IQNs).
    pub targets_added: Vec<String>,
    /// Targets removed.
    pub targets_removed: Vec<String>,
    /// LUNs added, as `(target, lun)`.
    pub luns_added: Vec<(String, u64)>,
    /// LUNs removed (draining).
    pub luns_removed: Vec<(String, u64)>,
    /// Targets whose access settings (ACL, CHAP, alias, advertised portals, tag) changed.
    pub access_changed: Vec<String>,
    /// Whether the discovery secrets changed.
    pub discovery_changed: bool,
    /// Settings that differ but apply only at the next start.
    pub need_restart: Vec<&'static str>,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let luns = |v: &[(String, u64)]| {
            v.iter()
                .map(|(t, l)| format!("{t} LUN {l}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !self.targets_added.is_empty() {
            parts.push(format!("targets added: {}", self.targets_added.join(", ")));
        }
        if !self.targets_removed.is_empty() {
            parts.push(format!(
                "targets removed: {}",
                self.targets_removed.join(", ")
            ));
        }
        if !self.luns_added.is_empty() {
            parts.push(format!("LUNs added: {}", luns(&self.luns_added)));
        }
        if !self.luns_removed.is_empty() {
            parts.push(format!(
                "LUNs removed (draining): {}",
                luns(&self.luns_removed)
            ));
        }
        if !self.access_changed.is_empty() {
            parts.push(format!(
                "access settings changed: {}",
                self.access_changed.join(", ")
            ));
        }
        if self.discovery_changed {
            parts.push("discovery secrets changed".into());
        }
        if !self.need_restart.is_empty() {
            parts.push(format!(
                "not applied until restart: {}",
                self.need_restart.join(", ")
            ));
        }
        if parts.is_empty() {
            write!(f, "nothing changed")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}

/// The settings a reload cannot change that differ between `old` and `new`.
/// What login and discovery see after a reload to `new`: its targets and discovery secrets,
/// but the running configuration's `[cluster]` (a restart-only setting: the cluster target
/// keeps its name and the portal group tag `old` gave it).
fn reloaded_directory(running: &Config, new: &Config, old: &Directory) -> Directory {
    let mut view = new.clone();
    view.cluster = running.cluster.clone();
    directory_of(&view, &new.targets, Some(old))
}

fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut differ = |name: &'static str, d: bool| {
        if d {
            v.push(name);
        }
    };
    differ("portals", old.portals != new.portals);
    differ("state_dir", old.state_dir != new.state_dir);
    differ("metrics", old.metrics != new.metrics);
    differ("workers", old.workers != new.workers);
    differ("queue_depth", old.queue_depth != new.queue_depth);
    differ(
        "nop_interval_secs/nop_timeout_secs",
        (old.nop_interval_secs, old.nop_timeout_secs)
            != (new.nop_interval_secs, new.nop_timeout_secs),
    );
    differ(
        "negotiation limits",
        (
            old.max_recv_data_segment_length,
            old.max_burst_length,
            old.first_burst_length,
            old.max_outstanding_r2t,
            old.immediate_data,
            old.initial_r2t,
            old.digests,
        ) != (
            new.max_recv_data_segment_length,
            new.max_burst_length,
            new.first_burst_length,
            new.max_outstanding_r2t,
            new.immediate_data,
            new.initial_r2t,
            new.digests,
        ),
    );
    differ(
        "node",
        old.nodes != new.nodes
            || old.node_timeout_ms != new.node_timeout_ms
            || old.write_quorum_wait_ms != new.write_quorum_wait_ms,
    );
    differ("cluster", old.cluster != new.cluster);
    v
}

/// A removed LUN waiting for its commands: target, LUN, logical unit, its volume's id.
type Draining = (String, u64, Arc<LogicalUnit>, Option<u64>);

/// A LUN opened for a reload, not yet in its target.
struct Opened {
    key: String,
    iqn: String,
    id: u64,
    lu: Arc<LogicalUnit>,
    dev: Arc<dyn BlockDevice>,
    volume: Option<tessera_volume::EcVolume>,
}

impl Opened {
    /// Give up on it (the reload was refused).
    fn discard(self) {
        if let Some(v) = self.volume {
            v.close();
        }
    }
}

fn access(t: &config::Target) -> impl PartialEq + '_ {
    (
        &t.alias,
        t.portal_group_tag,
        &t.advertise,
        &t.allowed_initiators,
        &t.chap,
        &t.mutual_chap,
    )
}

impl Gateway {
    /// Apply `new` (the configuration file read again). Refused as a whole, with nothing
    /// changed, when a LUN changed in place or a new LUN cannot be opened.
    pub fn reload(self: &Arc<Self>, new: Config) -> anyhow::Result<Reloaded> {
        let file = new.file.display().to_string();
        let mut out = Reloaded {
            need_restart: restart_only(&self.cfg, &new),
            discovery_changed: (&self.cfg.discovery_chap, &self.cfg.discovery_mutual_chap)
                != (&new.discovery_chap, &new.discovery_mutual_chap),
            ..Reloaded::default()
        };
        let cluster_key = self
            .cfg
            .cluster
            .as_ref()
            .map(|c| c.target.to_ascii_lowercase());
        let old: Vec<config::Target> = self.defs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let old_by: HashMap<String, &config::Target> = old
            .iter()
            .map(|t| (t.iqn.to_ascii_lowercase(), t))
            .collect();
        let new_by: HashMap<String, &config::Target> = new
            .targets
            .iter()
            .map(|t| (t.iqn.to_ascii_lowercase(), t))
            .collect();
        // 1. What changes, refusing a LUN changed in place.
        let mut to_open: Vec<(&config::Target, &config::Lun)> = Vec::new();
        for t in &new.targets {
            let key = t.iqn.to_ascii_lowercase();
            match old_by.get(&key) {
                None => out.targets_added.push(t.iqn.clone()),
                Some(o) => {
                    if access(o) != access(t) {
                        out.access_changed.push(t.iqn.clone());
                    }
                }
            }
            for l in &t.luns {
                let before = old_by
                    .get(&key)
                    .and_then(|o| o.luns.iter().find(|x| x.id == l.id));
                match before {
                    Some(b) if b == l => {}
                    Some(_) => bail!(
                        "{file}: target {} LUN {} differs from the one being served; a LUN \
                         cannot change in place: remove it, reload, then add it back",
                        t.iqn,
                        l.id
                    ),
                    None => to_open.push((t, l)),
                }
            }
        }
        for o in &old {
            let key = o.iqn.to_ascii_lowercase();
            let kept = new_by.get(&key);
            if kept.is_none() && cluster_key.as_deref() != Some(key.as_str()) {
                out.targets_removed.push(o.iqn.clone());
            }
            for l in &o.luns {
                if !kept.is_some_and(|t| t.luns.iter().any(|x| x.id == l.id)) {
                    out.luns_removed.push((o.iqn.clone(), l.id));
                }
            }
        }
        // 2. Open the new LUNs before anything changes.
        let mut opened: Vec<Opened> = Vec::new();
        for (t, l) in to_open {
            let r = self
                .open_lun(t, l)
                .with_context(|| format!("{file}: target {} LUN {}", t.iqn, l.id));
            match r {
                Ok(o) => opened.push(o),
                Err(e) => {
                    for o in opened {
                        o.discard();
                    }
                    return Err(e);
                }
            }
        }
        // 3. Apply: targets and LUNs, then what logins see.
        let mut draining: Vec<Draining> = Vec::new();
        {
            let mut targets = self.targets.write().unwrap_or_else(|e| e.into_inner());
            for iqn in &out.targets_added {
                targets
                    .entry(iqn.to_ascii_lowercase())
                    .or_insert_with(|| Arc::new(Target::new(iqn)));
            }
            for o in opened {
                let Some(target) = targets.get(&o.key).cloned() else {
                    o.discard();
                    continue;
                };
                self.devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(o.dev.clone());
                if let Some(v) = &o.volume {
                    self.volumes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(v.clone());
                }
                target.add_lun(o.id, o.lu);
                out.luns_added.push((o.iqn, o.id));
            }
            for (iqn, id) in &out.luns_removed {
                if let Some(target) = targets.get(&iqn.to_ascii_lowercase()) {
                    if let Some(lu) = target.remove_lun(*id) {
                        // The volume of an ec LUN closes once drained.
                        let volume = old_by
                            .get(&iqn.to_ascii_lowercase())
                            .and_then(|t| t.luns.iter().find(|l| l.id == *id))
                            .and_then(|l| l.ec.as_ref())
                            .map(|ec| stable_hash(&[b"tessera-volume", ec.volume.as_bytes()]));
                        draining.push((iqn.clone(), *id, lu, volume));
                    }
                }
            }
            for iqn in &out.targets_removed {
                targets.remove(&iqn.to_ascii_lowercase());
            }
        }
        {
            let kept = self.volume_target_entries();
            let mut d = self.directory.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = reloaded_directory(&self.cfg, &new, &d);
            next.targets.extend(kept);
            *d = Arc::new(next);
        }
        *self.defs.lock().unwrap_or_else(|e| e.into_inner()) = new.targets.clone();
        if !draining.is_empty() {
            let gw = self.clone();
            std::thread::Builder::new()
                .name("tessera-drain".into())
                .spawn(move || {
                    for (iqn, id, lu, volume) in draining {
                        gw.drain(&iqn, id, lu, volume);
                    }
                })
                .context("starting the drain thread")?;
        }
        Ok(out)
    }

    /// Open LUN `l` of target `t` (its device, or its ec volume) as a logical unit.
    fn open_lun(&self, t: &config::Target, l: &config::Lun) -> anyhow::Result<Opened> {
        let (dev, volume): (Arc<dyn BlockDevice>, _) = if l.backend == Backend::Ec {
            let v = open_ec(&self.cfg, l)?;
            (Arc::new(v.clone()), Some(v))
        } else {
            (open_device(l)?, None)
        };
        let lu = make_lu(&self.cfg, &t.iqn, l.id, l, dev.clone())?;
        Ok(Opened {
            key: t.iqn.to_ascii_lowercase(),
            iqn: t.iqn.clone(),
            id: l.id,
            lu: Arc::new(lu),
            dev,
            volume,
        })
    }

    /// Wait for a removed LUN's commands to finish, flush it, close it.
    fn drain(&self, iqn: &str, id: u64, lu: Arc<LogicalUnit>, volume: Option<u64>) {
        let start = Instant::now();
        // Commands that looked the LUN up just before it left may not have started yet:
        // idle means idle twice, a moment apart.
        let mut idle = 0;
        while idle < 2 {
            if lu.in_flight() == 0 {
                idle += 1;
            } else {
                idle = 0;
            }
            if start.elapsed() > DRAIN_LIMIT {
                warn!(target = %iqn, lun = id, in_flight = lu.in_flight(), "removed LUN still busy after {DRAIN_LIMIT:?}; closing it");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let dev = lu.device().clone();
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let local = tokio::task::LocalSet::new();
                if let Err(e) = local.block_on(&rt, dev.flush()) {
                    warn!(target = %iqn, lun = id, "flushing the removed LUN: {e}");
                }
            }
            Err(e) => warn!("cannot flush the removed LUN: {e}"),
        }
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| !Arc::ptr_eq(d, &dev));
        let mut closed = false;
        if let Some(vid) = volume {
            self.volumes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|v| {
                    let same = v.spec().id == vid;
                    if same {
                        v.close();
                        closed = true;
                    }
                    !same
                });
        }
        info!(target = %iqn, lun = id, drained_in = ?start.elapsed(), volume_closed = closed, "removed LUN drained");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::testing::{config, target};

    #[test]
    fn a_reload_keeps_the_running_cluster_target_and_its_tag() {
        let running = config(Some("iqn.2024-01.io.tessera:one"));
        let mut old = directory_of(&running, &running.targets, None);
        for t in &mut old.targets {
            t.portal_group_tag = 7;
        }
        // The new file renames the cluster target (restart-only) and adds a target.
        let mut new = config(Some("iqn.2024-01.io.tessera:two"));
        new.targets.push(target("iqn.2024-01.io.tessera:extra"));
        let d = reloaded_directory(&running, &new, &old);
        let names: Vec<&str> = d.targets.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"iqn.2024-01.io.tessera:one"), "{names:?}");
        assert!(!names.contains(&"iqn.2024-01.io.tessera:two"), "{names:?}");
        assert!(names.contains(&"iqn.2024-01.io.tessera:extra"), "{names:?}");
        let one = d
            .targets
            .iter()
            .find(|t| t.name == "iqn.2024-01.io.tessera:one")
            .unwrap();
        assert_eq!(one.portal_group_tag, 7, "the tag the cluster gave it stays");
    }
}
