//! Shared helpers for the cross-process tests: find the `tessera` binary, start
//! `tessera demo` on a free loopback port, wait for it, and stop it (by PID) when dropped.
//!
//! A test that needs an external tool calls [`require_tool`], which fails the test with the
//! tool's name and the Debian package that provides it (`make deps` installs them all); tests
//! never skip silently.

#![forbid(unsafe_code)]

pub mod faultyfs;
pub mod initiator;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `tessera` binary under test: `$TESSERA_BIN`, else `target/release/tessera`, else
/// `target/debug/tessera` (whichever exists).
pub fn tessera_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TESSERA_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("tessera");
        if p.exists() {
            return p;
        }
    }
    panic!("tessera binary not found: build it (make build) or set TESSERA_BIN");
}

/// Fail unless `tool` is on PATH; `package` names the Debian package.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: apt-get install {package} (make deps does this)"
    );
}

/// `GET path` from the HTTP server at `addr` (`ip:port`), HTTP/1.0: the status code and
/// the body. Panics on a connection failure.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let a: SocketAddr = addr.parse().expect("an ip:port address");
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer from {addr}: {text}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (code, body.to_string())
}

/// `s` percent-encoded for a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The last `n` lines of `log`, in order: what a failure message shows of a process's log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The arguments of `tessera demo` for an erasure-coded 4+2 volume, then `more`.
pub fn ec_4_2<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--backend", "ec", "--ec", "4+2"];
    args.extend_from_slice(more);
    args
}

/// The arguments of `tessera demo` for an erasure-coded 4+2 volume of `size` over eight
/// storage nodes (two more than a stripe is wide: spares to move positions to).
pub fn ec_4_2_on_eight_nodes(size: &str) -> Vec<&str> {
    ec_4_2(&["--nodes", "8", "--size", size])
}

/// The seed of a randomised test: `TESSERA_SEED` when set (to replay a failure), else one
/// from the clock. Printed either way, with how to replay it.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("TESSERA_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    println!("{test}: seed {s} (replay: TESSERA_SEED={s})");
    s
}

/// A small deterministic generator (xorshift64*) for randomised tests.
pub struct Rng(u64);

impl Rng {
    /// Seeded (0 is replaced by a fixed non-zero value).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    tessera_cluster::process::free_port([127, 0, 0, 1]).expect("a free port")
}

/// Run a command, capture its output, with a time limit.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "command timed out after {limit:?}: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `tessera demo`.
pub struct Demo {
    child: Child,
    /// Its directory (deleted on drop).
    pub dir: tempfile::TempDir,
    /// The portal.
    pub portal: SocketAddr,
    /// The target IQN.
    pub iqn: String,
    /// demo.json, parsed.
    pub json: serde_json::Value,
    /// Nodes restarted by the test (not the demo's children): stopped on drop.
    restarted: Vec<Child>,
}

/// A storage node of an ec demo, as demo.json lists it.
#[derive(Debug, Clone)]
pub struct NodeProc {
    /// Its PID when the demo started it.
    pub pid: u32,
    /// Its fragment-protocol address.
    pub address: SocketAddr,
    /// The command line that starts it.
    pub command: Vec<String>,
}

impl Demo {
    /// Start `tessera demo` on a free port with extra arguments; wait until demo.json exists
    /// and the portal accepts connections.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    /// Like [`Demo::start`] in a given directory.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let port = free_port();
        let portal: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Command::new(tessera_bin())
            .arg("demo")
            .arg("--dir")
            .arg(dir.path())
            .arg("--portal")
            .arg(portal.to_string())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("demo.log"))
                    .expect("demo log"),
            )
            .env(
                "RUST_LOG",
                // The volume's maintenance reports at info level what tests wait for.
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,tessera_volume=info".into()),
            )
            .spawn()
            .expect("start tessera demo");
        let mut d = Self {
            child,
            dir,
            portal,
            iqn: String::new(),
            json: serde_json::Value::Null,
            restarted: Vec::new(),
        };
        let start = Instant::now();
        let json_path = d.dir.path().join("demo.json");
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!(
                    "tessera demo exited early: {st}; the end of its log:\n{}",
                    tail(&d.log(), 20)
                );
            }
            if json_path.exists() && TcpStream::connect(portal).is_ok() {
                break;
            }
            assert!(
                // Generous: etcd, the nodes and the gateway start one after another, and a
                // loaded 2-core machine can take a while.
                start.elapsed() < Duration::from_secs(60),
                "tessera demo did not start within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&json_path).expect("demo.json");
        d.json = serde_json::from_str(&text).expect("demo.json parses");
        d.iqn = d.json["iqn"].as_str().expect("iqn").to_string();
        d
    }

    /// The demo cluster's etcd URL (ec backend).
    pub fn etcd(&self) -> String {
        self.json["etcd"]
            .as_str()
            .expect("demo.json names the etcd of an ec demo")
            .to_string()
    }

    /// Run `f` against the demo cluster's state in etcd.
    pub fn cluster<T>(&self, f: impl AsyncFnOnce(tessera_cluster::Cluster) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let c =
                tessera_cluster::Cluster::connect(&[self.etcd()], tessera_cluster::DEFAULT_PREFIX)
                    .await
                    .expect("connect to the demo's etcd");
            f(c).await
        })
    }

    /// What the demo and its processes logged (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("demo.log")).unwrap_or_default()
    }

    /// The metrics addresses (`ip:port`) demo.json lists for the processes of `role`
    /// (`gateway`, `node`), in its order.
    pub fn metrics_addrs(&self, role: &str) -> Vec<String> {
        self.json["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter(|p| p["role"] == role)
            .map(|p| {
                p["metrics"]
                    .as_str()
                    .expect("processes[].metrics")
                    .to_string()
            })
            .collect()
    }

    /// The gateway's metrics (`GET /metrics`, which must answer 200).
    pub fn gateway_metrics(&self) -> String {
        let addr = self.metrics_addrs("gateway").remove(0);
        let (code, body) = http_get(&addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// `iscsi://[auth@]portal/iqn/lun`.
    pub fn url(&self, lun: u32) -> String {
        format!("iscsi://{}/{}/{lun}", self.portal, self.iqn)
    }

    /// PID of the demo supervisor.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// PIDs of the processes demo.json lists.
    pub fn process_pids(&self) -> Vec<u32> {
        self.json["processes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The storage nodes (ec backend), in demo.json's order.
    pub fn nodes(&self) -> Vec<NodeProc> {
        self.json["processes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["role"] == "node")
                    .map(|p| NodeProc {
                        pid: p["pid"].as_u64().expect("pid") as u32,
                        address: p["address"]
                            .as_str()
                            .expect("address")
                            .parse()
                            .expect("addr"),
                        command: p["command"]
                            .as_array()
                            .expect("command")
                            .iter()
                            .map(|x| x.as_str().expect("arg").to_string())
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILL storage node `i` (by its PID).
    pub fn kill_node(&self, i: usize) {
        let n = &self.nodes()[i];
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(n.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Wait until its port is free again (the process is gone).
        let start = Instant::now();
        while TcpStream::connect(n.address).is_ok() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start storage node `i` again with its command line; wait until it listens.
    pub fn restart_node(&mut self, i: usize) {
        self.restart_node_with(i, &[]);
    }

    /// Start storage node `i` again with its command line and `extra` arguments; wait until
    /// it listens.
    pub fn restart_node_with(&mut self, i: usize, extra: &[&str]) {
        let n = self.nodes()[i].clone();
        let child = Command::new(&n.command[0])
            .args(&n.command[1..])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("restart node");
        self.restarted.push(child);
        let start = Instant::now();
        while TcpStream::connect(n.address).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "node {i} did not come back"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `tessera node SUB --addr ADDR` against every node; returns the outputs.
    pub fn node_cmd(&self, sub: &str) -> Vec<Output> {
        self.nodes()
            .iter()
            .map(|n| {
                run(
                    Command::new(tessera_bin())
                        .arg("node")
                        .arg(sub)
                        .arg("--addr")
                        .arg(n.address.to_string()),
                    Duration::from_secs(300),
                )
            })
            .collect()
    }

    /// Run `tessera ARGS` against the demo's cluster (`TESSERA_ETCD` set): whether it
    /// succeeded, and what it printed (stdout, then stderr).
    pub fn tessera(&self, args: &[&str]) -> (bool, String) {
        let out = run(
            Command::new(tessera_bin())
                .args(args)
                .env("TESSERA_ETCD", self.etcd()),
            Duration::from_secs(60),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Counter `key` of storage node `i` (`tessera node stats`).
    pub fn node_stat(&self, i: usize, key: &str) -> u64 {
        let out = &self.node_cmd("stats")[i];
        let t = String::from_utf8_lossy(&out.stdout);
        t.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {t}"))
    }

    /// Send SIGTERM and wait for a clean exit; returns whether it exited with success.
    pub fn stop(mut self) -> bool {
        let ok = self.terminate();
        self.stop_restarted();
        ok
    }

    fn stop_restarted(&mut self) {
        for c in &mut self.restarted {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        for c in &mut self.restarted {
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.restarted.clear();
    }

    /// Stop cleanly and hand back the directory (for a restart with [`Demo::start_in`]).
    pub fn stop_keep_dir(mut self) -> (bool, tempfile::TempDir) {
        let ok = self.terminate();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (ok, dir)
    }

    fn terminate(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop_restarted();
        if let Ok(None) = self.child.try_wait() {
            let children = self.process_pids();
            self.terminate();
            // Belt and braces: no process of ours outlives the test.
            for pid in children {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A `tessera gateway` started from configuration text (`{PORT}` is replaced by a free port).
pub struct Gateway {
    child: std::sync::Mutex<Child>,
    /// Directory holding the configuration.
    pub dir: tempfile::TempDir,
    /// The portal.
    pub portal: SocketAddr,
}

impl Gateway {
    /// Write the configuration, start the gateway, wait for its portal.
    pub fn start(config: &str) -> Self {
        Self::launch([127, 0, 0, 1], free_port(), config, "warn")
    }

    /// Like [`Gateway::start`], but `{PORT}` is a free port on the loopback address `ip`
    /// (127.0.0.N: each gateway of a cluster test on an address of its own), and the portal
    /// waited for is `ip:{PORT}`. Logs at info level for the gateway crate (`RUST_LOG`
    /// overrides), to `gateway.log` in its directory.
    pub fn start_on(ip: [u8; 4], config: &str) -> Self {
        let port = TcpListener::bind(SocketAddr::from((ip, 0)))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a free port");
        Self::launch(ip, port, config, "warn,tessera=info")
    }

    /// Write the configuration (`{PORT}` is `port`, `{DIR}` a new directory of its own) and
    /// start `tessera gateway` with it, logging JSON lines to `gateway.log` at `RUST_LOG`, else
    /// `log_level`; wait (30 s at most) until `ip:port` accepts connections.
    fn launch(ip: [u8; 4], port: u16, config: &str, log_level: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config
            .replace("{PORT}", &port.to_string())
            .replace("{DIR}", &dir.path().to_string_lossy());
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
        let child = Command::new(tessera_bin())
            .arg("gateway")
            .arg("--config")
            .arg(&path)
            .arg("--log-format")
            .arg("json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| log_level.into()),
            )
            .stderr(log)
            .spawn()
            .expect("start tessera gateway");
        let portal = SocketAddr::from((ip, port));
        let mut g = Self {
            child: std::sync::Mutex::new(child),
            dir,
            portal,
        };
        let start = Instant::now();
        while TcpStream::connect(portal).is_err() {
            if let Ok(Some(st)) = g.child.get_mut().expect("child").try_wait() {
                panic!("tessera gateway exited early: {st}\n{}", g.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "gateway on {portal} did not start\n{}",
                g.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }
}

impl Gateway {
    /// What the gateway has logged so far (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(_)) = child.try_wait() {
            // Already reaped (terminated by the test): its PID is no longer ours to signal.
            return;
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A process a test started; SIGKILLed (by PID) and reaped when dropped.
pub struct Started(pub Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest harness (`GUEST_DIR`, default `../shared/tools/guest`).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/guest")
        })
}

/// The guest harness's build cache (`GUEST_CACHE`, default `build/guest-cache`).
pub fn guest_cache() -> PathBuf {
    std::env::var_os("GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/guest-cache"))
}

/// The guest harness's `run-guest.sh`, once it is known that qemu is installed, the harness
/// is there and the guest is built (each a failure otherwise, saying what to do).
pub fn guest_script() -> PathBuf {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let script = guest_dir().join("run-guest.sh");
    assert!(
        script.exists(),
        "guest harness not found at {}",
        script.display()
    );
    assert!(
        guest_cache().join("initramfs.img").exists(),
        "guest not built in {}: run make guest-build",
        guest_cache().display()
    );
    script
}

/// The project's own guest tests (`tests/guest`), for `run-guest.sh --test-dir`.
pub fn project_guest_tests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/guest")
}

/// Follow `child` (started with its stdout and stderr piped) line by line, both streams as
/// the lines come, until both are closed: each line is handed to `on_line` with the time
/// since following began. Fails if they are not closed after `limit` (the child is killed
/// then). Its exit status and every line.
pub fn follow_output(
    mut child: Child,
    limit: Duration,
    mut on_line: impl FnMut(&str, Duration),
) -> (std::process::ExitStatus, Vec<String>) {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().expect("stdout piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut child = Started(child);
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                on_line(&line, start.elapsed());
                out.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => assert!(
                start.elapsed() < limit,
                "the guest did not finish:\n{}",
                out.join("\n")
            ),
        }
    }
    let status = child.0.wait().expect("the child's exit status");
    (status, out)
}

/// Print the lines of `lines` that contain any of `needles` (a guest run's milestones).
pub fn print_matching(lines: &[String], needles: &[&str]) {
    let shown: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .collect();
    println!("{}", shown.join("\n"));
}

/// Disk images through `qemu-img` (raw files against `iscsi://` URLs).
pub mod images {
    use std::io::Write;
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use crate::run;

    /// A file of `mb` MiB of pseudo-random bytes (xorshift from `seed`).
    pub fn random_file(path: &Path, mb: usize, seed: u64) {
        let mut f = std::fs::File::create(path).unwrap();
        let mut x = seed | 1;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mb {
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }

    /// `qemu-img convert` a raw file onto an iSCSI URL.
    pub fn convert(src: &Path, url: &str) {
        let out = run(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(src)
                .arg(url),
            Duration::from_secs(600),
        );
        assert!(
            out.status.success(),
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `qemu-img compare`: whether the file and the URL hold the same bytes.
    pub fn compare(src: &Path, url: &str) -> bool {
        let out = run(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(src)
                .arg(url),
            Duration::from_secs(600),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        println!("qemu-img compare: {}", text.trim());
        if !out.status.success() {
            println!("{}", String::from_utf8_lossy(&out.stderr));
        }
        out.status.success() && text.contains("identical")
    }
}

impl Gateway {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// SIGTERM it (by PID) and wait for it to exit: its exit status and how long it took.
    /// Panics if it is still running after `limit`.
    pub fn terminate(&self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("wait for the gateway") {
                return (st, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "gateway {} still running {limit:?} after SIGTERM",
                self.portal
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL it (by PID) and wait until its portal refuses connections. The process is
    /// left for drop to reap, so its PID cannot be reused meanwhile.
    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let start = Instant::now();
        while TcpStream::connect_timeout(&self.portal, Duration::from_millis(200)).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "gateway {} still accepts connections after SIGKILL",
                self.portal
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The fixture of the multi-gateway tests: one etcd member and six storage nodes registered
/// in it (their stores and logs in a directory of the test's). Dropping it stops the nodes
/// (by PID), then etcd.
pub struct SmallCluster {
    /// The etcd member.
    pub etcd: tessera_cluster::process::Etcd,
    /// Its client URL.
    pub url: String,
    /// The storage node processes.
    pub nodes: Vec<Started>,
    /// A runtime for the cluster calls.
    pub rt: tokio::runtime::Runtime,
    /// A connection to the cluster.
    pub cluster: tessera_cluster::Cluster,
}

impl SmallCluster {
    /// etcd on a free port of `etcd_ip`, six nodes (ids `{tag}0` to `{tag}5`, one host label
    /// each) on free ports of `node_ip`; waits until every node has registered.
    pub fn start(dir: &Path, etcd_ip: [u8; 4], node_ip: [u8; 4], tag: &str) -> Self {
        use tessera_cluster::process::{free_port, Etcd};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let eaddr = SocketAddr::from((etcd_ip, free_port(etcd_ip).expect("a free port")));
        let mut etcd = Etcd::start_single(eaddr, &dir.join("etcd"), &dir.join("etcd.log"))
            .expect("start etcd");
        etcd.wait_ready(Duration::from_secs(30))
            .expect("etcd ready");
        let url = etcd.member.client_url();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let listen = SocketAddr::from((node_ip, free_port(node_ip).expect("a free port")));
            nodes.push(Started(
                Command::new(tessera_bin())
                    .args(["node", "--id", &format!("{tag}{i}"), "--listen"])
                    .arg(listen.to_string())
                    .arg("--data")
                    .arg(dir.join(format!("{tag}{i}.store")))
                    .args(["--host", &format!("h{i}"), "--etcd", &url])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join(format!("{tag}{i}.log"))).expect("log"))
                    .spawn()
                    .expect("start node"),
            ));
        }
        let cluster = rt.block_on(async {
            let start = Instant::now();
            let c = tessera_cluster::Cluster::connect(
                std::slice::from_ref(&url),
                tessera_cluster::DEFAULT_PREFIX,
            )
            .await
            .expect("etcd");
            while c.nodes().await.map_or(0, |n| n.len()) < 6 {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "nodes did not register"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c
        });
        Self {
            etcd,
            url,
            nodes,
            rt,
            cluster,
        }
    }

    /// Create a 4+2 volume of `size` bytes, 512-byte blocks, 16 PGs, chunks of `chunk`.
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        chunk: u64,
    ) -> tessera_cluster::VolumeRecord {
        self.rt
            .block_on(self.cluster.create_volume(&tessera_cluster::NewVolume {
                name: name.into(),
                size,
                block_size: 512,
                profile: tessera_ec::Profile::parse("4+2", chunk).expect("a profile"),
                pgs: 16,
                write_quorum: None,
            }))
            .expect("create the volume")
    }

    /// Wait (30 s at most) until gateway `id` (`g`, whose log a failure shows) owns `volume`.
    pub fn wait_owner(&self, volume: u64, id: &str, g: &Gateway) {
        let start = Instant::now();
        while self
            .rt
            .block_on(self.cluster.owner(volume))
            .ok()
            .flatten()
            .map(|o| o.gateway)
            .as_deref()
            != Some(id)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{id} never took the volume\n{}",
                g.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SmallCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.etcd.stop();
    }
}

/// Run `tessera ARGS` with extra environment `env` (two minutes at most): whether it
/// succeeded and what it printed (stdout, then stderr), also printed for the test's log.
pub fn tessera_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(tessera_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run(&mut c, Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.success(), text)
}

/// Open volume `v` as `map` places it, straight on its storage nodes (RPC calls bounded by
/// `timeout`), at owner epoch `epoch` (`None`: unfenced): a data path of the test's own,
/// outside any gateway. Call it within a [`tokio::task::LocalSet`].
pub async fn open_volume(
    v: &tessera_cluster::VolumeRecord,
    map: &tessera_cluster::PgMapRecord,
    epoch: Option<u64>,
    timeout: Duration,
) -> Result<tessera_volume::EcVolume, tessera_volume::OpenError> {
    let (spec, addrs) =
        tessera_gateway::volume_spec(v, map, epoch).expect("the volume's spec and node addresses");
    let connector: std::sync::Arc<dyn tessera_volume::nodes::Connector> =
        std::sync::Arc::new(tessera_volume::nodes::RpcConnector::new(addrs, timeout));
    tessera_volume::EcVolume::open(spec, connector).await
}

/// Three etcd members, `e1` to `e3` on 127.0.0.1, .2 and .3 (their data and logs in `dir`),
/// started and ready: the members and their client URLs.
pub fn start_three_etcds(dir: &Path) -> (Vec<tessera_cluster::process::Etcd>, Vec<String>) {
    use tessera_cluster::process::{free_port, Etcd, Member};
    let members: Vec<Member> = (1..=3u8)
        .map(|i| {
            let ip = [127, 0, 0, i];
            Member {
                name: format!("e{i}"),
                client: SocketAddr::from((ip, free_port(ip).unwrap())),
                peer: SocketAddr::from((ip, free_port(ip).unwrap())),
            }
        })
        .collect();
    let mut etcds: Vec<Etcd> = members
        .iter()
        .map(|m| {
            Etcd::start(
                m,
                &members,
                &dir.join(&m.name),
                &dir.join(format!("{}.log", m.name)),
            )
            .expect("start etcd")
        })
        .collect();
    for e in &mut etcds {
        e.wait_ready(Duration::from_secs(30)).unwrap();
    }
    let urls = members.iter().map(Member::client_url).collect();
    (etcds, urls)
}
