//! Admin commands that act on the cluster's state in etcd: `volume create|list|delete`,
//! `node list`, `status`. They find the cluster through `--etcd URL` (or `TESSERA_ETCD`).

use anyhow::Context as _;
use tessera_cluster::{Cluster, NewVolume};

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

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
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

async fn connect(e: &EtcdArgs) -> anyhow::Result<Cluster> {
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
        let Some(v) = c.volume(name).await? else {
            anyhow::bail!("no volume named {name}");
        };
        if let Some(o) = c.owner(v.id).await? {
            if !force {
                anyhow::bail!(
                    "volume {name} is in use (gateway {} serves it); --force deletes it anyway",
                    o.gateway
                );
            }
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
                format!("{:?}", n.state).to_lowercase()
            );
        }
        Ok(())
    })
}

/// `tessera status`: nodes, gateways, the controller, volumes with owners.
pub fn status(e: &EtcdArgs) -> anyhow::Result<()> {
    block_on(async {
        let c = connect(e).await?;
        let nodes = c.nodes().await?;
        let gws = c.gateways().await?;
        println!("cluster {} at {}", e.prefix, e.url()?);
        println!(
            "controller: {}",
            c.controller().await?.unwrap_or_else(|| "none".into())
        );
        println!("nodes: {} up", nodes.len());
        for n in &nodes {
            println!(
                "  {} {} host={} {}",
                n.id,
                n.address,
                n.host,
                format!("{:?}", n.state).to_lowercase()
            );
        }
        println!("gateways: {}", gws.len());
        for g in &gws {
            println!("  {} portals {}", g.id, g.portals.join(","));
        }
        let vols = c.volumes().await?;
        println!("volumes: {}", vols.len());
        for v in &vols {
            let owner = c.owner(v.id).await?;
            let map = c.pg_map(v.id).await?;
            let missing = map.as_ref().map_or(0, |m| {
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
                map.as_ref()
                    .map_or("none".to_string(), |m| format!("epoch {}", m.epoch)),
                if missing > 0 {
                    format!(" (degraded: {missing} of its nodes down)")
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    })
}
