//! The `tessera` command: `gateway`, `node`, `demo`, `config check`, and the cluster commands
//! (`volume`, `node list|drain|undrain`, `cluster`, `status`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the data path allocates and frees many short-lived buffers per I/O on every
/// thread; glibc's malloc spent a tenth of the CPU there (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tessera::logging::{self, LogFormat};

/// tessera: erasure-coded, multi-active block storage over iSCSI.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the gateway daemon (iSCSI target).
    Gateway {
        /// Configuration file (TOML; see target-config/).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a storage node (fragments of erasure-coded volumes on one file or disk).
    Node(NodeCli),
    /// Serve a LUN locally with one command (see README).
    Demo(tessera::demo::DemoArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Volumes of the cluster (in etcd).
    Volume {
        #[command(flatten)]
        etcd: tessera::admin::EtcdArgs,
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// The cluster at a glance: nodes, gateways, the controller, volumes and owners,
    /// rebuilds with progress.
    Status {
        #[command(flatten)]
        etcd: tessera::admin::EtcdArgs,
    },
    /// Cluster-wide settings (in etcd; they apply at once).
    Cluster {
        #[command(flatten)]
        etcd: tessera::admin::EtcdArgs,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Print the settings.
    Show,
    /// Change a setting: `rebuild-grace` (how long a node may be away before its data is
    /// rebuilt elsewhere, e.g. 10m) or `rebuild-rate` (bytes per second each volume's
    /// rebuild may write, e.g. 200MiB; 0: unlimited).
    Set {
        /// rebuild-grace or rebuild-rate.
        key: String,
        /// The value.
        value: String,
    },
    /// Follow rebuilds (and rebalancing) until none is in progress: a progress bar per
    /// volume on a terminal, plain lines otherwise. Fails after the timeout.
    WaitRebuild {
        /// Only this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Give up after this long (e.g. 30m).
        #[arg(long, default_value = "1h")]
        timeout: String,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume; every gateway exports it as a LUN of its cluster target.
    Create(tessera::admin::CreateArgs),
    /// List the volumes with their owners.
    List,
    /// Grow a volume; initiators see CAPACITY DATA HAS CHANGED.
    Resize {
        /// Volume name.
        name: String,
        /// The new size (e.g. 200GiB).
        #[arg(long)]
        size: String,
    },
    /// Copy a raw image file (or block device) into the volume, through the owner
    /// gateway's iSCSI portal; progress on a terminal, plain lines otherwise.
    Import(tessera::image::ImageArgs),
    /// Copy the whole volume out to a file (created; all-zero ranges left as holes) or a
    /// block device, through the owner gateway's iSCSI portal.
    Export(tessera::image::ImageArgs),
    /// Delete a volume (refused while initiators have sessions to the cluster target, unless
    /// --force).
    Delete {
        /// Volume name.
        name: String,
        /// Delete even while in use.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct NodeCli {
    #[command(subcommand)]
    cmd: Option<NodeCmd>,
    /// Configuration file (TOML; see target-config/node.toml). Flags override nothing: give
    /// either a file or the flags.
    #[arg(long, conflicts_with_all = ["id", "listen", "data"])]
    config: Option<PathBuf>,
    /// Node id (stable for the life of its store).
    #[arg(long)]
    id: Option<String>,
    /// Fragment-protocol listen address.
    #[arg(long)]
    listen: Option<String>,
    /// Store file or block device.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Bytes the store may use on a file (e.g. 100GiB).
    #[arg(long)]
    capacity: Option<String>,
    /// Durability: batched (writes + one shared fdatasync) or dsync.
    #[arg(long, default_value = "batched")]
    sync: String,
    /// Background scrub rate (e.g. 16MiB a second; 0: off).
    #[arg(long, default_value = "0")]
    scrub_rate: String,
    /// Register in the cluster at these etcd URLs (comma-separated; or set TESSERA_ETCD).
    #[arg(long, env = "TESSERA_ETCD")]
    etcd: Option<String>,
    /// etcd key prefix of the cluster.
    #[arg(long, default_value = "/tessera")]
    prefix: String,
    /// Host label (failure domain; default: the host name).
    #[arg(long)]
    host: Option<String>,
    /// Rack label.
    #[arg(long, default_value = "")]
    rack: String,
    /// Zone label.
    #[arg(long, default_value = "")]
    zone: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port).
    #[arg(long)]
    metrics: Option<String>,
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Ask a running node to verify every fragment's checksum now.
    Scrub {
        /// The node's fragment-protocol address.
        #[arg(long)]
        addr: std::net::SocketAddr,
    },
    /// Print a running node's counters.
    Stats {
        /// The node's fragment-protocol address.
        #[arg(long)]
        addr: std::net::SocketAddr,
    },
    /// List the nodes registered in the cluster.
    List {
        #[command(flatten)]
        etcd: tessera::admin::EtcdArgs,
    },
    /// Move every fragment off a node now (it keeps serving until its data has moved).
    Drain {
        /// Node id.
        id: String,
        #[command(flatten)]
        etcd: tessera::admin::EtcdArgs,
    },
    /// Make a drained node eligible for data again.
    Undrain {
        /// Node id.
        id: String,
        #[command(flatten)]
        etcd: tessera::admin::EtcdArgs,
    },
}

fn node_config(n: NodeCli) -> anyhow::Result<tessera::config::NodeConfig> {
    use tessera::config::{parse_size, NodeConfig};
    if let Some(path) = n.config {
        return Ok(NodeConfig::load(&path)?);
    }
    let (Some(id), Some(listen), Some(data)) = (n.id, n.listen, n.data) else {
        anyhow::bail!("tessera node needs --config FILE, or --id, --listen and --data");
    };
    let mut text = format!(
        "[node]\nid = {:?}\nlisten = {:?}\ndata = {:?}\nsync = {:?}\ncapacity = {}\nscrub_rate = {}\nrack = {:?}\nzone = {:?}\n",
        id,
        listen,
        data.to_string_lossy(),
        n.sync,
        n.capacity
            .as_deref()
            .map_or(Ok(0), parse_size)
            .map_err(|e| anyhow::anyhow!("--capacity: {e}"))?,
        parse_size(&n.scrub_rate).map_err(|e| anyhow::anyhow!("--scrub-rate: {e}"))?,
        n.rack,
        n.zone,
    );
    if let Some(h) = &n.host {
        text.push_str(&format!("host = {h:?}\n"));
    }
    if let Some(m) = &n.metrics {
        text.push_str(&format!("metrics = {m:?}\n"));
    }
    if let Some(urls) = &n.etcd {
        let list: Vec<String> = urls.split(',').map(|u| format!("{:?}", u.trim())).collect();
        text.push_str(&format!(
            "[cluster]\netcd = [{}]\nprefix = {:?}\n",
            list.join(", "),
            n.prefix
        ));
    }
    Ok(NodeConfig::parse(
        std::path::Path::new("command line"),
        &text,
    )?)
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Check a gateway or node configuration file; errors name the file, line and key.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `tessera config check`: a gateway file, or a node file (one with a `[node]` table).
fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", file.display()))?;
    let is_node = text.lines().any(|l| l.trim_start().starts_with("[node]"));
    if is_node {
        let n = tessera::config::NodeConfig::parse(file, &text)?;
        println!(
            "{}: OK (storage node {} on {}, store {})",
            file.display(),
            n.id,
            n.listen,
            n.data.display()
        );
        return Ok(());
    }
    let c = tessera::config::parse_gateway(file, &text)?;
    let luns: usize = c.targets.iter().map(|t| t.luns.len()).sum();
    let cluster = c.cluster.as_ref().map_or(String::new(), |cl| {
        format!(
            ", cluster {} at {} as gateway {}, volumes on {}",
            cl.prefix,
            cl.etcd.join(","),
            cl.gateway_id,
            cl.target
        )
    });
    println!(
        "{}: OK ({} targets, {luns} LUNs, {} storage nodes{cluster})",
        file.display(),
        c.targets.len(),
        c.nodes.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let r = match cli.cmd {
        Cmd::Gateway { config } => tessera::gateway::run_config(&config),
        Cmd::Node(n) => match n.cmd {
            Some(NodeCmd::Scrub { addr }) => tessera::node::scrub(addr),
            Some(NodeCmd::Stats { addr }) => tessera::node::stats(addr),
            Some(NodeCmd::List { etcd }) => tessera::admin::node_list(&etcd),
            Some(NodeCmd::Drain { id, etcd }) => tessera::admin::node_drain(&etcd, &id, true),
            Some(NodeCmd::Undrain { id, etcd }) => tessera::admin::node_drain(&etcd, &id, false),
            None => node_config(n).and_then(tessera::node::run),
        },
        Cmd::Demo(a) => tessera::demo::run(a),
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => check_config(&file),
        Cmd::Volume { etcd, cmd } => match cmd {
            VolumeCmd::Create(a) => tessera::admin::volume_create(&etcd, &a),
            VolumeCmd::List => tessera::admin::volume_list(&etcd),
            VolumeCmd::Resize { name, size } => tessera::admin::volume_resize(&etcd, &name, &size),
            VolumeCmd::Delete { name, force } => tessera::admin::volume_delete(&etcd, &name, force),
            VolumeCmd::Import(a) => tessera::image::import(&etcd, &a),
            VolumeCmd::Export(a) => tessera::image::export(&etcd, &a),
        },
        Cmd::Status { etcd } => tessera::admin::status(&etcd),
        Cmd::Cluster { etcd, cmd } => match cmd {
            ClusterCmd::Show => tessera::admin::cluster_show(&etcd),
            ClusterCmd::Set { key, value } => tessera::admin::cluster_set(&etcd, &key, &value),
            ClusterCmd::WaitRebuild { volume, timeout } => {
                tessera::admin::cluster_wait_rebuild(&etcd, volume.as_deref(), &timeout)
            }
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}
