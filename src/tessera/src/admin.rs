//! Admin commands that act on the cluster's state in etcd: `volume create|list|delete`,
//! `node list|drain|undrain`, `cluster show|set`, `status`. They find the cluster through `--etcd URL` (or `TESSERA_ETCD`).

use anyhow::Context as _;
use tessera_cluster::{Cluster, NewVolume, NodeState};

use crate::config::parse_size;

/// Where the cluster is.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd client URL (several: comma-separated).
    #[arg(long, env = "TESSERA_ETCD", global = true)]
    pub etcd: Option<String>,
    /// Key prefix of the cluster.
    #[arg(long, default_value = tessera_cluster::DEFAULT_PREFIX, global = true)]
    pub prefix: String,
}

/// `volume create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Volume name.
    pub name: String,
    /// Size (e.g. 100GiB).
    #[arg(long)]
    pub size: String,
    /// Erasure-code profile K+M.
    #[arg(long, default_value = "4+2")]
    pub ec: String,
    /// Bytes per chunk.
    #[arg(long, default_value = "16KiB")]
    pub chunk: String,
    /// Logical block size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Placement groups (a power of two).
    #[arg(long, default_value_t = 64)]
    pub pgs: u32,
    /// Fragments durable before a write is acknowledged (default k + 1).
    #[arg(long)]
    pub write_quorum: Option<usize>,
}

pub(crate) fn block_on<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

impl EtcdArgs {
    fn url(&self) -> anyhow::Result<&str> {
        self.etcd
            .as_deref()
            .context("where is the cluster? give --etcd URL or set TESSERA_ETCD")
    }
}

pub(crate) async fn connect(e: &EtcdArgs) -> anyhow::Result<Cluster> {
    let url = e.url()?;
    let urls: Vec<String> = url.split(',').map(|s| s.trim().to_string()).collect();
    Cluster::connect(&urls, &e.prefix)
        .await
        .with_context(|| format!("connecting to etcd at {url}"))
}

/// The request of `volume create`, checked.
pub fn new_volume(a: &CreateArgs) -> anyhow::Result<NewVolume> {
    let size = parse_size(&a.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    let chunk = parse_size(&a.chunk).map_err(|e| anyhow::anyhow!("--chunk: {e}"))?;
    let profile =
        tessera_ec::Profile::parse(&a.ec, chunk).map_err(|e| anyhow::anyhow!("--ec: {e}"))?;
    Ok(NewVolume {
        name: a.name.clone(),
        size,
        block_size: a.block_size,
        profile,
        pgs: a.pgs,
        write_quorum: a.write_quorum,
    })
}

/// `tessera volume create`.
pub fn volume_create(e: &EtcdArgs, a: &CreateArgs) -> anyhow::Result<()> {
    let req = new_volume(a)?;
    block_on(async {
        let c = connect(e).await?;
        let v = c.create_volume(&req).await?;
        println!(
            "created volume {} (LUN {}, {} bytes, {}+{} with {}-byte chunks, {}-byte blocks, {} PGs, id {:016x})",
            v.name, v.lun, v.size, v.k, v.m, v.chunk, v.block_size, v.pgs, v.id
        );
        Ok(())
    })
}

/// `tessera volume list`.
pub fn volume_list(e: &EtcdArgs) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        println!(
            "{:<20} {:>4} {:>14} {:>8} {:>6} {:>6} {:<16} {:>6}",
            "NAME", "LUN", "BYTES", "PROFILE", "BLOCK", "PGS", "OWNER", "EPOCH"
        );
        for v in c.volumes().await? {
            let owner = c.owner(v.id).await?;
            println!(
                "{:<20} {:>4} {:>14} {:>8} {:>6} {:>6} {:<16} {:>6}",
                v.name,
                v.lun,
                v.size,
                format!("{}+{}", v.k, v.m),
                v.block_size,
                v.pgs,
                owner.as_ref().map_or("-", |o| o.gateway.as_str()),
                c.epoch(v.id).await?
            );
        }
        Ok(())
    })
}

/// `tessera volume resize`: grow a volume.
pub fn volume_resize(e: &EtcdArgs, name: &str, size: &str) -> anyhow::Result<()> {
    let size = parse_size(size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    block_on(async {
        let c = connect(e).await?;
        let v = c.resize_volume(name, size).await?;
        println!("volume {} is now {} bytes", v.name, v.size);
        Ok(())
    })
}

/// `tessera volume delete`: refused while a gateway serves the volume, unless `force`.
pub fn volume_delete(e: &EtcdArgs, name: &str, force: bool) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        if c.volume(name).await?.is_none() {
            anyhow::bail!("no volume named {name}");
        }
        // Every session to the cluster target can reach every volume.
        let users = c.sessions().await?;
        if !users.is_empty() && !force {
            let n: usize = users.values().map(Vec::len).sum();
            let list: Vec<String> = users
                .iter()
                .map(|(g, i)| format!("{} through {g}", i.join(", ")))
                .collect();
            anyhow::bail!(
                "volume {name} is in use: {n} session{} ({}); --force deletes it anyway",
                if n == 1 { "" } else { "s" },
                list.join("; ")
            );
        }
        c.delete_volume(name).await?;
        println!("deleted volume {name}");
        Ok(())
    })
}

/// `tessera node list`.
pub fn node_list(e: &EtcdArgs) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        println!(
            "{:<16} {:<22} {:<12} {:<10} {:<10} {:>14} {:<8}",
            "ID", "ADDRESS", "HOST", "RACK", "ZONE", "CAPACITY", "STATE"
        );
        for n in c.nodes().await? {
            println!(
                "{:<16} {:<22} {:<12} {:<10} {:<10} {:>14} {:<8}",
                n.id,
                n.address,
                n.host,
                n.rack,
                n.zone,
                n.capacity,
                n.shown_state()
            );
        }
        Ok(())
    })
}

/// `tessera node drain|undrain ID`.
pub fn node_drain(e: &EtcdArgs, id: &str, drain: bool) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        let known = c.nodes().await?.iter().any(|n| n.id == id)
            || c.pg_maps()
                .await?
                .values()
                .any(|m| m.nodes.iter().any(|n| n.id == id));
        if !known {
            anyhow::bail!("no node {id} is registered or holds data");
        }
        let state = if drain {
            NodeState::Draining
        } else {
            NodeState::Up
        };
        c.set_node_state(id, state).await?;
        if drain {
            println!("node {id} draining: its data moves to other nodes (see `tessera status`)");
        } else {
            println!("node {id} up: eligible for data again");
        }
        Ok(())
    })
}

/// Seconds from `10m`, `1h`, `90s` or `90`.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1),
        Some((i, _)) => {
            let mul = match t[i..].trim() {
                "s" => 1,
                "m" | "min" => 60,
                "h" => 3600,
                "d" => 86400,
                u => return Err(format!("{s:?}: unknown unit {u:?} (s, m, h or d)")),
            };
            (&t[..i], mul)
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 10m, 90s)"))
}

/// `tessera cluster show`.
pub fn cluster_show(e: &EtcdArgs) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        let s = c.settings().await?;
        println!("rebuild-grace {}s", s.rebuild_grace_secs);
        println!(
            "rebuild-rate {} bytes/s{}",
            s.rebuild_rate,
            if s.rebuild_rate == 0 {
                " (unlimited)"
            } else {
                ""
            }
        );
        Ok(())
    })
}

/// `tessera cluster set KEY VALUE`.
pub fn cluster_set(e: &EtcdArgs, key: &str, value: &str) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        let mut s = c.settings().await?;
        match key {
            "rebuild-grace" => {
                s.rebuild_grace_secs =
                    parse_duration(value).map_err(|e| anyhow::anyhow!("rebuild-grace: {e}"))?
            }
            "rebuild-rate" => {
                s.rebuild_rate =
                    parse_size(value).map_err(|e| anyhow::anyhow!("rebuild-rate: {e}"))?
            }
            k => anyhow::bail!("unknown setting {k:?} (rebuild-grace or rebuild-rate)"),
        }
        c.set_settings(&s).await?;
        println!("{key} set");
        Ok(())
    })
}

/// `tessera cluster wait-rebuild`: follow every volume's (or one volume's) rebuild until
/// none is in progress and no new map has come for a few seconds (a rebalance may follow a
/// rebuild).
pub fn cluster_wait_rebuild(
    e: &EtcdArgs,
    volume: Option<&str>,
    timeout: &str,
) -> anyhow::Result<()> {
    const SETTLED: std::time::Duration = std::time::Duration::from_secs(5);
    let limit = std::time::Duration::from_secs(
        parse_duration(timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?,
    );
    block_on(async {
        let c = connect(e).await?;
        let mut p = crate::progress::Progress::new();
        let start = std::time::Instant::now();
        let mut quiet: Option<std::time::Instant> = None;
        let mut followed: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        loop {
            let vols = c.volumes().await?;
            if let Some(n) = volume {
                anyhow::ensure!(vols.iter().any(|v| v.name == n), "no volume named {n:?}");
            }
            let maps = c.pg_maps().await?;
            let fills = c.fills().await?;
            let mut busy = 0;
            for v in vols.iter().filter(|v| volume.is_none_or(|n| n == v.name)) {
                let Some(m) = maps.get(&v.id).filter(|m| !m.moving.is_empty()) else {
                    continue;
                };
                let name = format!("{} map {}", v.name, m.epoch);
                // A newer map replaced the one followed: end that one's line.
                if let Some(old) = followed.insert(v.id, m.epoch).filter(|e| *e != m.epoch) {
                    let old_name = format!("{} map {old}", v.name);
                    match fills.get(&v.id).filter(|f| f.map_epoch == old) {
                        Some(f) if f.finished => p.finish(
                            &old_name,
                            &format!("done: {} written", human_bytes(f.bytes as f64)),
                        ),
                        _ => p.finish(
                            &old_name,
                            &format!("done or superseded: map {} follows", m.epoch),
                        ),
                    }
                }
                match fills.get(&v.id).filter(|f| f.map_epoch == m.epoch) {
                    Some(f) if f.finished => p.finish(
                        &name,
                        &format!(
                            "done: {} fragment positions moved, {} written",
                            m.moving.len(),
                            human_bytes(f.bytes as f64)
                        ),
                    ),
                    Some(f) => {
                        busy += 1;
                        p.update(
                            &name,
                            f.done,
                            f.stripes,
                            &format!(
                                "stripes, {} written at {}/s",
                                human_bytes(f.bytes as f64),
                                human_bytes(f.rate)
                            ),
                        );
                    }
                    None => {
                        busy += 1;
                        p.update(&name, 0, 1, "waiting for the owner to start");
                    }
                }
            }
            if busy == 0 {
                if quiet.get_or_insert_with(std::time::Instant::now).elapsed() >= SETTLED {
                    println!("no rebuild in progress");
                    return Ok(());
                }
            } else {
                quiet = None;
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "rebuilds still in progress after {timeout}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
}

/// Bytes as B, KiB, MiB, GiB or TiB with one decimal.
pub(crate) fn human_bytes(b: f64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < U.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", U[u])
}

/// `tessera status`: nodes (with absent ones), gateways, the controller, volumes with
/// owners, and rebuilds with progress and ETA.
pub fn status(e: &EtcdArgs) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        let nodes = c.nodes().await?;
        let gws = c.gateways().await?;
        let maps = c.pg_maps().await?;
        let fills = c.fills().await?;
        let absent = c.absent().await?;
        let settings = c.settings().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        println!("cluster {} at {}", e.prefix, e.url()?);
        println!(
            "controller: {}",
            c.controller().await?.unwrap_or_else(|| "none".into())
        );
        let mut away: Vec<(&String, &u64)> = absent.iter().collect();
        away.sort();
        println!("nodes: {} up, {} absent", nodes.len(), away.len());
        for n in &nodes {
            println!(
                "  {} {} host={} {}",
                n.id,
                n.address,
                n.host,
                n.shown_state()
            );
        }
        for (id, since) in &away {
            let gone = now.saturating_sub(**since);
            let left = settings.rebuild_grace_secs.saturating_sub(gone);
            println!(
                "  {id} absent for {gone}s{}",
                if left > 0 {
                    format!(" (rebuilt elsewhere in {left}s if still away)")
                } else {
                    " (lost: its data is rebuilt elsewhere)".into()
                }
            );
        }
        println!("gateways: {}", gws.len());
        for g in &gws {
            println!("  {} portals {}", g.id, g.portals.join(","));
        }
        let vols = c.volumes().await?;
        let health = c.write_health().await?;
        println!("volumes: {}", vols.len());
        for v in &vols {
            let owner = c.owner(v.id).await?;
            let map = maps.get(&v.id);
            let missing = map.map_or(0, |m| {
                m.nodes
                    .iter()
                    .filter(|mn| !nodes.iter().any(|n| n.id == mn.id))
                    .count()
            });
            println!(
                "  {} lun {} {} bytes {}+{} owner {} epoch {} map {}{}",
                v.name,
                v.lun,
                v.size,
                v.k,
                v.m,
                owner.as_ref().map_or("-", |o| o.gateway.as_str()),
                c.epoch(v.id).await?,
                map.map_or("none".to_string(), |m| format!("epoch {}", m.epoch)),
                if missing > 0 {
                    format!(" (degraded: {missing} of its nodes down)")
                } else {
                    String::new()
                }
            );
            if let Some(h) = health.get(&v.id) {
                if h.suspended_pgs > 0 {
                    let listed: Vec<String> = h.pgs.iter().map(|p| p.to_string()).collect();
                    println!(
                        "    writes suspended for {}s: {} PGs have fewer nodes answering than the write quorum {} (PGs {}{}); not answering the owner: {}",
                        now.saturating_sub(h.since),
                        h.suspended_pgs,
                        v.write_quorum,
                        listed.join(","),
                        if h.suspended_pgs as usize > listed.len() { ",..." } else { "" },
                        h.unreachable.join(", ")
                    );
                } else {
                    println!(
                        "    not answering the owner: {} (every PG keeps its write quorum)",
                        h.unreachable.join(", ")
                    );
                }
            }
            let Some(m) = map.filter(|m| !m.moving.is_empty()) else {
                continue;
            };
            let pgs: std::collections::BTreeSet<u32> = m.moving.iter().map(|(pg, _)| *pg).collect();
            match fills.get(&v.id).filter(|f| f.map_epoch == m.epoch) {
                Some(f) if f.finished => println!(
                    "    rebuild of map {}: done ({} fragment positions moved, {} written)",
                    m.epoch,
                    m.moving.len(),
                    human_bytes(f.bytes as f64)
                ),
                Some(f) => println!(
                    "    rebuilding map {}: {} PGs, {} positions; {}/{} stripes ({:.1}%), {} written at {}/s, ETA {}",
                    m.epoch,
                    pgs.len(),
                    m.moving.len(),
                    f.done,
                    f.stripes,
                    if f.stripes == 0 { 100.0 } else { f.done as f64 * 100.0 / f.stripes as f64 },
                    human_bytes(f.bytes as f64),
                    human_bytes(f.rate),
                    f.eta_secs.map_or("unknown".to_string(), |s| format!("{s:.0}s"))
                ),
                None => println!(
                    "    rebuilding map {}: {} PGs, {} positions; waiting for the owner to start",
                    m.epoch,
                    pgs.len(),
                    m.moving.len()
                ),
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86400));
        assert!(parse_duration("10 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
