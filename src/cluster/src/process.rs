//! Starting a private etcd member (Debian's `etcd-server`): for `tessera demo` and tests.
//!
//! The member listens on loopback addresses given by the caller and keeps its data in a
//! directory of the caller's. It runs until [`Etcd::stop`] or drop, which kill it by PID.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary: `$TESSERA_ETCD_BIN`, else `etcd` on the PATH.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("TESSERA_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests and the demo).
pub fn free_port(ip: [u8; 4]) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(SocketAddr::from((ip, 0)))?
        .local_addr()?
        .port())
}

/// One member of an etcd cluster.
#[derive(Debug, Clone)]
pub struct Member {
    /// Member name.
    pub name: String,
    /// Client URL address.
    pub client: SocketAddr,
    /// Peer URL address.
    pub peer: SocketAddr,
}

impl Member {
    /// Its client URL.
    pub fn client_url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Its peer URL.
    pub fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }
}

/// A running etcd member.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    /// This member.
    pub member: Member,
    /// The command line (to start it again).
    pub argv: Vec<String>,
}

impl Etcd {
    /// The command line of `me` in a cluster of `all` (a single member: `all` = `[me]`),
    /// data under `dir`.
    pub fn command(me: &Member, all: &[Member], dir: &Path) -> Vec<String> {
        let initial: Vec<String> = all
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        vec![
            etcd_binary().to_string_lossy().into_owned(),
            "--name".into(),
            me.name.clone(),
            "--data-dir".into(),
            dir.to_string_lossy().into_owned(),
            "--listen-client-urls".into(),
            me.client_url(),
            "--advertise-client-urls".into(),
            me.client_url(),
            "--listen-peer-urls".into(),
            me.peer_url(),
            "--initial-advertise-peer-urls".into(),
            me.peer_url(),
            "--initial-cluster".into(),
            initial.join(","),
            "--initial-cluster-state".into(),
            "new".into(),
            // The same for every member of one cluster.
            "--initial-cluster-token".into(),
            format!(
                "tessera-{}",
                all.first().map_or(me.peer.port(), |m| m.peer.port())
            ),
            // Small and quick: a test cluster, on loopback.
            "--heartbeat-interval".into(),
            "100".into(),
            "--election-timeout".into(),
            "1000".into(),
            "--quota-backend-bytes".into(),
            (256u64 << 20).to_string(),
            "--log-level".into(),
            "warn".into(),
        ]
    }

    /// Start a member; `log` receives its output. Returns once the process is started (see
    /// [`Etcd::wait_ready`]).
    pub fn start(me: &Member, all: &[Member], dir: &Path, log: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let argv = Self::command(me, all, dir);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "starting {} (Debian package etcd-server; make deps installs it): {e}",
                        argv[0]
                    ),
                )
            })?;
        Ok(Self {
            child: Some(child),
            member: me.clone(),
            argv,
        })
    }

    /// A single-member cluster on `client` (its peer port chosen free), data under `dir`.
    pub fn start_single(client: SocketAddr, dir: &Path, log: &Path) -> std::io::Result<Self> {
        let ip = match client.ip() {
            std::net::IpAddr::V4(v4) => v4.octets(),
            std::net::IpAddr::V6(_) => [127, 0, 0, 1],
        };
        let me = Member {
            name: "tessera-etcd".into(),
            client,
            peer: SocketAddr::from((ip, free_port(ip)?)),
        };
        let e = Self::start(&me, std::slice::from_ref(&me), dir, log)?;
        Ok(e)
    }

    /// Wait until the client port accepts connections (or the process dies, or `limit`).
    pub fn wait_ready(&mut self, limit: Duration) -> std::io::Result<()> {
        let start = Instant::now();
        loop {
            if TcpStream::connect_timeout(&self.member.client, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    return Err(std::io::Error::other(format!(
                        "etcd {} exited during startup ({st})",
                        self.member.name
                    )));
                }
            }
            if start.elapsed() > limit {
                return Err(std::io::Error::other(format!(
                    "etcd {} did not listen on {} within {limit:?}",
                    self.member.name, self.member.client
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Hand the process over (the caller becomes responsible for it).
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("a running member")
    }

    /// Kill it (SIGKILL) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
