//! `tessera demo`: a complete local setup in one command.
//!
//! Writes a gateway configuration into `--dir`, starts `tessera gateway` as a child process
//! (and, with `--backend ec`, first a private etcd member and one `tessera node` process per
//! fragment of a stripe, which register in etcd; the demo volume is created through etcd, and
//! the gateway, a member of that cluster, exports it), waits until everything answers, records it all in `DIR/demo.json` (portal, IQN, LUNs, and
//! the PID, role, address and command line of every process it runs), prints how to use it,
//! and runs until SIGINT or SIGTERM, which it passes on to its children (gateway first) before
//! it exits. A node that dies is left dead (tests kill nodes on purpose); the demo ends if the
//! gateway dies.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::config::parse_size;

/// Options of `tessera demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the configuration, the LUN's backing file, state and demo.json.
    #[arg(long)]
    pub dir: PathBuf,
    /// Portal to listen on.
    #[arg(long, default_value = "127.0.0.1:3260")]
    pub portal: String,
    /// LUN size (e.g. 1GiB, 512MiB).
    #[arg(long, default_value = "1GiB")]
    pub size: String,
    /// Backend: file (a sparse file in --dir, through io_uring), mem, or ec (erasure-coded
    /// over local storage-node processes).
    #[arg(long, default_value = "file")]
    pub backend: String,
    /// With --backend ec: the erasure-code profile K+M (K + M node processes are started).
    #[arg(long, default_value = "4+2")]
    pub ec: String,
    /// With --backend ec: how many node processes (default and least: K + M; more leave room
    /// to rebuild a lost node's data elsewhere).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// With --backend ec: bytes per chunk.
    #[arg(long, default_value = "16KiB")]
    pub chunk: String,
    /// Require CHAP: USER:SECRET (the secret needs 12 to 255 characters).
    #[arg(long)]
    pub chap: Option<String>,
    /// Logical block size, 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Target IQN.
    #[arg(long, default_value = "iqn.2024-01.io.tessera:demo")]
    pub iqn: String,
    /// Present LUN 0 as removable medium (START STOP UNIT can eject it).
    #[arg(long)]
    pub removable: bool,
    /// With --backend ec: milliseconds a write waits for its write quorum before it fails
    /// (`gateway.write_quorum_wait_ms`, default 10000).
    #[arg(long)]
    pub write_quorum_wait_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct DemoLun {
    lun: u64,
    size_bytes: u64,
    block_size: u32,
    backend: String,
    path: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct DemoProcess {
    role: &'static str,
    pid: u32,
    address: String,
    /// The command line that starts it again (for a node killed on purpose).
    command: Vec<String>,
    /// Where it serves Prometheus metrics (`host:port`, path `/metrics`).
    metrics: String,
}

#[derive(Debug, Serialize)]
struct DemoJson {
    portal: String,
    iqn: String,
    /// With --backend ec: the etcd client URL of the demo's cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd: Option<String>,
    luns: Vec<DemoLun>,
    chap_user: Option<String>,
    config: PathBuf,
    pid: u32,
    processes: Vec<DemoProcess>,
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A storage node the demo runs.
#[derive(Debug, Clone)]
pub struct DemoNode {
    /// Node id.
    pub id: String,
    /// Listen address.
    pub address: SocketAddr,
    /// Store file.
    pub data: PathBuf,
    /// Where it serves `/metrics`.
    pub metrics: SocketAddr,
}

/// Build the gateway configuration text for the demo (`etcd`: the cluster of an ec backend,
/// whose volume the gateway exports as a cluster volume).
pub fn config_text(a: &DemoArgs, dir: &Path, etcd: Option<&str>) -> anyhow::Result<String> {
    let size = parse_size(&a.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    let mut t = String::new();
    t.push_str("# Written by `tessera demo`.\n[gateway]\n");
    t.push_str(&format!("portals = [{}]\n", toml_str(&a.portal)));
    t.push_str(&format!(
        "state_dir = {}\n\n",
        toml_str(&dir.join("state").to_string_lossy())
    ));
    t.push_str(&format!(
        "[[target]]\niqn = {}\nalias = \"tessera-demo\"\n",
        toml_str(&a.iqn)
    ));
    if let Some(c) = &a.chap {
        let Some((user, secret)) = c.split_once(':') else {
            bail!("--chap wants USER:SECRET");
        };
        t.push_str(&format!(
            "chap = {{ user = {}, secret = {} }}\n",
            toml_str(user),
            toml_str(secret)
        ));
    }
    if a.backend == "ec" {
        let Some(url) = etcd else {
            bail!("--backend ec needs the demo's etcd");
        };
        if a.removable {
            bail!("--removable applies to file and mem LUNs");
        }
        t.push_str(&format!(
            "\n[cluster]\netcd = [{}]\ngateway_id = \"gw-0\"\ntarget = {}\nlease_ttl_secs = 5\n",
            toml_str(url),
            toml_str(&a.iqn)
        ));
        return Ok(t);
    }
    t.push_str(&format!(
        "\n[[target.lun]]\nid = 0\nbackend = {}\nsize = {size}\nblock_size = {}\n",
        toml_str(&a.backend),
        a.block_size
    ));
    if a.removable {
        t.push_str("removable = true\n");
    }
    if a.backend == "file" {
        t.push_str(&format!(
            "path = {}\n",
            toml_str(&dir.join("lun0.img").to_string_lossy())
        ));
    }
    Ok(t)
}

fn wait_listening(addr: SocketAddr, child: &mut Child, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the process exited during startup ({status})");
        }
        if start.elapsed() > limit {
            bail!("nothing listened on {addr} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &mut Child, grace: Duration) {
    // SIGTERM first: the gateway finishes in-flight commands and flushes.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Run the demo until a signal arrives.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    // Take over SIGTERM and SIGINT before anything starts: a signal that arrives while the
    // gateway is still starting is held and acted on as soon as it listens, so the gateway
    // is never left running without its supervisor.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = a.dir.canonicalize()?;
    // demo.json appears only once everything serves; a stale one from an earlier run goes.
    let json_path = dir.join("demo.json");
    match std::fs::remove_file(&json_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", json_path.display()));
        }
        _ => {}
    }
    let cfg_path = dir.join("gateway.toml");
    let exe = std::env::current_exe().context("locating the tessera binary")?;
    let mut nodes = Vec::new();
    let mut etcd: Option<tessera_cluster::process::Etcd> = None;
    let mut profile = None;
    if a.backend == "ec" {
        let chunk = parse_size(&a.chunk).map_err(|e| anyhow::anyhow!("--chunk: {e}"))?;
        let p =
            tessera_ec::Profile::parse(&a.ec, chunk).map_err(|e| anyhow::anyhow!("--ec: {e}"))?;
        profile = Some(p);
        let count = a.nodes.unwrap_or(p.width());
        if count < p.width() || count > 64 {
            bail!(
                "--nodes {count}: a {} volume needs {} to 64 nodes",
                a.ec,
                p.width()
            );
        }
        // The cluster's state: a private etcd member, data under --dir.
        let port = tessera_cluster::process::free_port([127, 0, 0, 1])?;
        let mut e = tessera_cluster::process::Etcd::start_single(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &dir.join("etcd"),
            &dir.join("etcd.log"),
        )?;
        e.wait_ready(Duration::from_secs(30))
            .with_context(|| format!("etcd (see {})", dir.join("etcd.log").display()))?;
        etcd = Some(e);
        std::fs::create_dir_all(dir.join("nodes"))?;
        for i in 0..count {
            let port = tessera_cluster::process::free_port([127, 0, 0, 1])?;
            nodes.push(DemoNode {
                id: format!("node-{i}"),
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                data: dir.join("nodes").join(format!("node-{i}.store")),
                metrics: SocketAddr::from((
                    [127, 0, 0, 1],
                    tessera_cluster::process::free_port([127, 0, 0, 1])?,
                )),
            });
        }
    }
    let etcd_url = etcd.as_ref().map(|e| e.member.client_url());
    let gw_metrics = SocketAddr::from((
        [127, 0, 0, 1],
        tessera_cluster::process::free_port([127, 0, 0, 1])?,
    ));
    let text = config_text(&a, &dir, etcd_url.as_deref())?.replacen(
        "[gateway]\n",
        &format!(
            "[gateway]\nmetrics = \"{gw_metrics}\"\n{}",
            a.write_quorum_wait_ms
                .map(|ms| format!("write_quorum_wait_ms = {ms}\n"))
                .unwrap_or_default()
        ),
        1,
    );
    std::fs::write(&cfg_path, text).with_context(|| format!("writing {}", cfg_path.display()))?;
    // Validate before starting anything, so a bad flag gets a clear message.
    let cfg = crate::config::load_gateway(&cfg_path)?;
    let portal = cfg.portals[0];
    let mut node_children: Vec<(DemoNode, Child, Vec<String>)> = Vec::new();
    for n in &nodes {
        let mut argv: Vec<String> = vec![
            exe.to_string_lossy().into_owned(),
            "node".into(),
            "--id".into(),
            n.id.clone(),
            "--listen".into(),
            n.address.to_string(),
            "--data".into(),
            n.data.to_string_lossy().into_owned(),
            // Each node its own failure domain.
            "--host".into(),
            n.id.clone(),
            "--metrics".into(),
            n.metrics.to_string(),
        ];
        if let Some(url) = &etcd_url {
            argv.extend(["--etcd".into(), url.clone()]);
        }
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .spawn()
            .with_context(|| format!("starting {}", n.id))?;
        node_children.push((n.clone(), child, argv));
    }
    let mut failed = None;
    for (n, c, _) in &mut node_children {
        if let Err(e) = wait_listening(n.address, c, Duration::from_secs(20)) {
            failed = Some(e.context(format!("storage node {}", n.id)));
            break;
        }
    }
    // The demo volume, through etcd, once every node has registered.
    let mut volume = None;
    if failed.is_none() {
        if let (Some(url), Some(p)) = (&etcd_url, profile) {
            let size = parse_size(&a.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
            let req = tessera_cluster::NewVolume {
                name: "demo".into(),
                size,
                block_size: a.block_size,
                profile: p,
                pgs: 64,
                write_quorum: None,
            };
            match rt.block_on(demo_volume(url, &req, nodes.len())) {
                Ok(v) => volume = Some(v),
                Err(e) => failed = Some(e),
            }
        }
    }
    if let Some(e) = failed {
        for (_, c, _) in &mut node_children {
            terminate(c, Duration::from_secs(2));
        }
        return Err(e);
    }
    let gw_argv: Vec<String> = vec![
        exe.to_string_lossy().into_owned(),
        "gateway".into(),
        "--config".into(),
        cfg_path.to_string_lossy().into_owned(),
    ];
    let mut child = match Command::new(&gw_argv[0]).args(&gw_argv[1..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            for (_, c, _) in &mut node_children {
                terminate(c, Duration::from_secs(2));
            }
            return Err(anyhow::Error::from(e).context("starting the gateway"));
        }
    };
    let connect_to = if portal.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), portal.port())
    } else {
        portal
    };
    if let Err(e) = wait_listening(connect_to, &mut child, Duration::from_secs(30)) {
        terminate(&mut child, Duration::from_secs(2));
        for (_, c, _) in &mut node_children {
            terminate(c, Duration::from_secs(2));
        }
        return Err(e);
    }
    let lun = match &volume {
        Some(v) => DemoLun {
            lun: v.lun,
            size_bytes: v.size,
            block_size: v.block_size,
            backend: a.backend.clone(),
            path: None,
        },
        None => {
            let l = &cfg.targets[0].luns[0];
            DemoLun {
                lun: 0,
                size_bytes: l.size.unwrap_or(0),
                block_size: l.block_size,
                backend: a.backend.clone(),
                path: l.path.clone(),
            }
        }
    };
    let (lun_id, lun_block) = (lun.lun, lun.block_size);
    let etcd_child = etcd.map(|e| (e.member.clone(), e.pid(), e.argv.clone(), e.into_child()));
    let json = DemoJson {
        portal: portal.to_string(),
        iqn: a.iqn.clone(),
        etcd: etcd_url.clone(),
        luns: vec![lun],
        chap_user: cfg.targets[0].chap.as_ref().map(|c| c.user.clone()),
        config: cfg_path,
        pid: std::process::id(),
        processes: std::iter::once(DemoProcess {
            role: "gateway",
            pid: child.id(),
            address: portal.to_string(),
            command: gw_argv,
            metrics: gw_metrics.to_string(),
        })
        .chain(node_children.iter().map(|(n, c, argv)| DemoProcess {
            role: "node",
            pid: c.id(),
            address: n.address.to_string(),
            command: argv.clone(),
            metrics: n.metrics.to_string(),
        }))
        .chain(etcd_child.iter().map(|(m, pid, argv, _)| DemoProcess {
            role: "etcd",
            pid: pid.unwrap_or(0),
            address: m.client.to_string(),
            command: argv.clone(),
            // etcd serves its own /metrics on the client port.
            metrics: m.client.to_string(),
        }))
        .collect(),
    };
    let mut etcd_child = etcd_child.map(|(_, _, _, c)| c);
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")?;
    let url_auth = a
        .chap
        .as_ref()
        .and_then(|c| c.split_once(':'))
        .map(|(u, s)| format!("{u}%{s}@"))
        .unwrap_or_default();
    println!("tessera demo is serving one LUN");
    println!("  target  {}", a.iqn);
    println!("  portal  {portal}");
    println!(
        "  LUN {lun_id}   {} bytes, {lun_block}-byte blocks, {} backend",
        json.luns[0].size_bytes, a.backend
    );
    for (n, c, _) in &node_children {
        println!("  node    {} on {} (pid {})", n.id, n.address, c.id());
    }
    if let Some(url) = &etcd_url {
        println!("  etcd    {url} (tessera status --etcd {url})");
    }
    println!("  state   {}", json_path.display());
    println!();
    println!("Try it:");
    println!("  iscsi-ls -s iscsi://{url_auth}{connect_to}");
    println!(
        "  iscsi-inq iscsi://{url_auth}{connect_to}/{}/{lun_id}",
        a.iqn
    );
    println!("  iscsiadm -m discovery -t sendtargets -p {connect_to}");
    println!("  iscsiadm -m node -T {} -p {connect_to} --login", a.iqn);
    println!();
    println!("Press Ctrl-C to stop.");
    // Wait for a signal, or for the gateway to die.
    let died = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok::<_, anyhow::Error>(None),
                _ = int.recv() => return Ok(None),
                _ = tick.tick() => {
                    if let Some(st) = child.try_wait()? {
                        return Ok(Some(st));
                    }
                }
            }
        }
    })?;
    if let Some(st) = died {
        for (_, c, _) in &mut node_children {
            terminate(c, Duration::from_secs(5));
        }
        if let Some(c) = etcd_child.as_mut() {
            terminate(c, Duration::from_secs(5));
        }
        bail!("the gateway exited unexpectedly ({st})");
    }
    println!("stopping");
    // The gateway first: it finishes the writes in flight, which need the nodes; etcd last.
    terminate(&mut child, Duration::from_secs(15));
    for (_, c, _) in &mut node_children {
        terminate(c, Duration::from_secs(10));
    }
    if let Some(c) = etcd_child.as_mut() {
        terminate(c, Duration::from_secs(10));
    }
    Ok(())
}

/// The demo's volume: created once every node has registered (or found, in a --dir used
/// before).
async fn demo_volume(
    url: &str,
    req: &tessera_cluster::NewVolume,
    width: usize,
) -> anyhow::Result<tessera_cluster::VolumeRecord> {
    let c = tessera_cluster::Cluster::connect(&[url.to_string()], tessera_cluster::DEFAULT_PREFIX)
        .await?;
    // Every demo node registered first, so the first map spreads over all of them.
    let start = Instant::now();
    loop {
        let n = c.nodes().await?.len();
        if n >= width {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("only {n} of {width} storage nodes registered in etcd");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(v) = c.volume(&req.name).await? {
        return Ok(v);
    }
    Ok(c.create_volume(req).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let a = DemoArgs {
            dir: "/tmp/x".into(),
            portal: "127.0.0.1:3260".into(),
            size: "64MiB".into(),
            backend: "file".into(),
            chap: Some("user:0123456789abcdef".into()),
            block_size: 4096,
            iqn: "iqn.2024-01.io.tessera:demo".into(),
            removable: true,
            ec: "4+2".into(),
            chunk: "16KiB".into(),
            nodes: None,
            write_quorum_wait_ms: None,
        };
        let text = config_text(&a, Path::new("/tmp/x"), None).unwrap();
        let c = crate::config::parse_gateway(Path::new("demo.toml"), &text).unwrap();
        assert_eq!(c.targets[0].luns[0].size, Some(64 << 20));
        assert_eq!(c.targets[0].chap.as_ref().unwrap().user, "user");
        assert_eq!(
            c.targets[0].luns[0].path.as_deref(),
            Some(Path::new("/tmp/x/lun0.img"))
        );
        let bad = DemoArgs {
            chap: Some("nocolon".into()),
            ..a
        };
        assert!(config_text(&bad, Path::new("/tmp/x"), None).is_err());
        let ec = DemoArgs {
            backend: "ec".into(),
            ec: "2+1".into(),
            chunk: "4KiB".into(),
            chap: None,
            removable: false,
            ..bad
        };
        assert!(
            config_text(&ec, Path::new("/tmp/x"), None).is_err(),
            "ec needs etcd"
        );
        let c = crate::config::parse_gateway(
            Path::new("demo.toml"),
            &config_text(&ec, Path::new("/tmp/x"), Some("http://127.0.0.1:2379")).unwrap(),
        )
        .unwrap();
        // The ec volume is the cluster's: the target has no LUN of its own.
        assert!(c.targets[0].luns.is_empty());
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!(cl.etcd, vec!["http://127.0.0.1:2379".to_string()]);
        assert_eq!(cl.target, c.targets[0].iqn);
    }
}
