//! `tessera demo`: a complete local setup in one command.
//!
//! Writes a gateway configuration into `--dir`, starts `tessera gateway` as a child process,
//! waits until its portal answers, records everything in `DIR/demo.json` (portal, IQN, LUNs,
//! and the PID, role and address of every process it runs), prints how to use it, and runs
//! until SIGINT or SIGTERM, which it passes on to its children before it exits.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::config::{parse_size, Config};

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
    /// Backend: file (a sparse file in --dir, through io_uring) or mem.
    #[arg(long, default_value = "file")]
    pub backend: String,
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
}

#[derive(Debug, Serialize)]
struct DemoJson {
    portal: String,
    iqn: String,
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

/// Build the gateway configuration text for the demo.
pub fn config_text(a: &DemoArgs, dir: &Path) -> anyhow::Result<String> {
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
            bail!("the gateway exited during startup ({status})");
        }
        if start.elapsed() > limit {
            bail!("the gateway did not listen on {addr} within {limit:?}");
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
    std::fs::write(&cfg_path, config_text(&a, &dir)?)
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    // Validate before starting anything, so a bad flag gets a clear message.
    let cfg = Config::load(&cfg_path)?;
    let portal = cfg.portals[0];
    let exe = std::env::current_exe().context("locating the tessera binary")?;
    let mut child = Command::new(exe)
        .arg("gateway")
        .arg("--config")
        .arg(&cfg_path)
        .spawn()
        .context("starting the gateway")?;
    let connect_to = if portal.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), portal.port())
    } else {
        portal
    };
    if let Err(e) = wait_listening(connect_to, &mut child, Duration::from_secs(20)) {
        terminate(&mut child, Duration::from_secs(2));
        return Err(e);
    }
    let lun = &cfg.targets[0].luns[0];
    let json = DemoJson {
        portal: portal.to_string(),
        iqn: a.iqn.clone(),
        luns: vec![DemoLun {
            lun: 0,
            size_bytes: lun.size.unwrap_or(0),
            block_size: lun.block_size,
            backend: a.backend.clone(),
            path: lun.path.clone(),
        }],
        chap_user: cfg.targets[0].chap.as_ref().map(|c| c.user.clone()),
        config: cfg_path,
        pid: std::process::id(),
        processes: vec![DemoProcess {
            role: "gateway",
            pid: child.id(),
            address: portal.to_string(),
        }],
    };
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
        "  LUN 0   {} bytes, {}-byte blocks, {} backend",
        json.luns[0].size_bytes, lun.block_size, a.backend
    );
    println!("  state   {}", json_path.display());
    println!();
    println!("Try it:");
    println!("  iscsi-ls -s iscsi://{url_auth}{connect_to}");
    println!("  iscsi-inq iscsi://{url_auth}{connect_to}/{}/0", a.iqn);
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
        bail!("the gateway exited unexpectedly ({st})");
    }
    println!("stopping");
    terminate(&mut child, Duration::from_secs(15));
    Ok(())
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
        };
        let text = config_text(&a, Path::new("/tmp/x")).unwrap();
        let c = Config::parse(Path::new("demo.toml"), &text).unwrap();
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
        assert!(config_text(&bad, Path::new("/tmp/x")).is_err());
    }
}
