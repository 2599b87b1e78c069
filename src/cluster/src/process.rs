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

/// A TCP port on `ip` that was free a moment ago (bound and released; for tests and the demo).
///
/// It is picked at random from below the kernel's ephemeral range (or above it, if nothing is
/// left below), not by binding port 0: port 0 hands out an ephemeral port, and between its
/// release and the server's bind any outgoing connection on the machine may take that very port
/// as its source port, so the server's bind would fail. Outside that range only another picker
/// can collide, and picks are spread at random and never repeated within this process.
pub fn free_port(ip: [u8; 4]) -> std::io::Result<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|w| w.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Prefer the ports below the ephemeral range, down to 10000 (well-known services sit below).
    let window = if low >= 12_000 {
        Some((10_000, low))
    } else if high + 2_000 <= 65_535 {
        Some((high + 1, 65_536))
    } else {
        None
    };
    if let Some((from, to)) = window {
        let seed = std::collections::hash_map::RandomState::new();
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let handed = handed.get_or_insert_with(HashSet::new);
        for attempt in 0u32..512 {
            let mut h = seed.build_hasher();
            h.write_u32(attempt);
            h.write_u32(std::process::id());
            let port = (from + (h.finish() % u64::from(to - from)) as u32) as u16;
            if handed.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(SocketAddr::from((ip, port))).is_ok() {
                handed.insert(port);
                return Ok(port);
            }
        }
    }
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
