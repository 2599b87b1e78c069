//! Chaos (issue 20, item 9): a 4+2 volume on eight storage nodes, one etcd and two gateways,
//! under a verifying writer and reader for a few minutes while a seeded schedule kills,
//! restarts, SIGSTOPs and resumes nodes (never more than two unavailable at once, and none
//! made unavailable while a rebuild is still filling, so no PG ever has more than `m`
//! positions missing), kills the owner gateway (a new one takes its place) and restarts etcd.
//! It must end with zero verify errors, no command unanswered for longer than 30 s, and every
//! node whole again: every byte reads back as written (or, for a write that was not
//! acknowledged, wholly old or wholly new), and a scrub of the volume finds every stripe whole.
//!
//! `TESSERA_SEED` replays a run (the seed is printed): every step draws the same numbers, so
//! the same choices are made wherever the cluster's state allows them (which gateway owns the
//! volume and whether a rebuild is filling depend on timing); `TESSERA_CHAOS_SECS` sets how
//! long the schedule runs (default 150).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_cluster::process::{free_port, Etcd};
use tessera_integration_tests::initiator::{cdb10, Session};
use tessera_integration_tests::{open_volume, seed, tessera_bin, Gateway, Rng};

const TARGET: &str = "iqn.2024-01.io.tessera:cluster";
const INITIATOR: &str = "iqn.2024-01.io.tessera:chaos";
const NODES: usize = 8;
const BLOCK: usize = 4096;
const VOLUME: u64 = 32 << 20;
const BLOCKS: usize = (VOLUME as usize) / BLOCK;
/// The longest any command may go unanswered.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// The bytes of block `b` as written by write `tag` (tag 0: never written, zeroes).
fn block_bytes(tag: u64, b: usize) -> Vec<u8> {
    if tag == 0 {
        return vec![0; BLOCK];
    }
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(b as u64).to_le_bytes());
    let mut r = Rng::new(tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b as u64);
    while out.len() < BLOCK {
        out.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    out
}

/// The write tag that block `b`'s bytes carry, if they are some write's (or zeroes: 0).
fn tag_of(data: &[u8], b: usize) -> Option<u64> {
    if data.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(data[..8].try_into().ok()?);
    (tag != 0 && data == block_bytes(tag, b).as_slice()).then_some(tag)
}

struct NodeSlot {
    id: String,
    argv: Vec<String>,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl NodeSlot {
    fn start(&mut self) {
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .expect("node log"),
            )
            .spawn()
            .expect("start node");
        self.child = Some(child);
        self.stopped = false;
        let start = Instant::now();
        while TcpStream::connect(self.addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} did not listen again",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), s);
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    fn available(&self) -> bool {
        self.child.is_some() && !self.stopped
    }
}

impl Drop for NodeSlot {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

/// What the verifying client saw.
#[derive(Default, Debug)]
struct Seen {
    writes_ok: u64,
    writes_failed: u64,
    reads_ok: u64,
    reads_failed: u64,
    reconnects: u64,
    /// Failed commands by status (and sense key/ASC/ASCQ).
    failures: std::collections::BTreeMap<String, u64>,
    slowest: Duration,
    verify_errors: Vec<String>,
    unanswered: Vec<String>,
}

/// Per 4 KiB block: the write tags its bytes may be (more than one while a write that was
/// not acknowledged may or may not have landed).
type Model = Vec<HashSet<u64>>;

/// A session through one of the live gateways, trying them from the `isid`-th on (so that
/// successive sessions go to different gateways: owner and forwarder in turn).
fn connect(portals: &Mutex<Vec<SocketAddr>>, lun: u8, isid: u8) -> Option<Session> {
    let mut list = portals.lock().unwrap().clone();
    if !list.is_empty() {
        let n = usize::from(isid) % list.len();
        list.rotate_left(n);
    }
    for p in list {
        let Ok(mut s) = Session::login(p, INITIATOR, TARGET, [0x80, 0, 0, 0, 0xc4, isid]) else {
            continue;
        };
        if s.set_timeout(ANSWER_WITHIN).is_err() {
            continue;
        }
        if s.ready(lun).is_ok_and(|o| o.status == 0) {
            return Some(s);
        }
    }
    None
}

/// Check `data` (blocks from `first`) against the model; record any mismatch.
fn verify(model: &Model, first: usize, data: &[u8], seen: &mut Seen, when: &str) {
    for (i, chunk) in data.chunks(BLOCK).enumerate() {
        let b = first + i;
        let ok = tag_of(chunk, b).is_some_and(|t| model[b].contains(&t));
        if !ok && seen.verify_errors.len() < 20 {
            seen.verify_errors.push(format!(
                "{when}: block {b} holds {:?}, expected one of {:?}",
                tag_of(chunk, b).map_or("foreign bytes".to_string(), |t| format!("tag {t}")),
                model[b]
            ));
        }
    }
}

/// The verifying client: writes of 1 to 16 blocks and reads of 1 to 32 blocks at random
/// places, one at a time, through whichever gateway answers; every read checked against the
/// model.
fn client(
    portals: Arc<Mutex<Vec<SocketAddr>>>,
    lun: u8,
    seed: u64,
    stop: Arc<AtomicBool>,
    model: Arc<Mutex<Model>>,
) -> Seen {
    let mut rng = Rng::new(seed ^ 0xc1e7);
    let mut seen = Seen::default();
    let mut next_tag = 1u64;
    let mut sess: Option<Session> = None;
    let mut isid = 1u8;
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Now and then a new session, through the next gateway.
        ops += 1;
        if ops.is_multiple_of(5000) {
            if let Some(s) = sess.take() {
                s.drop_connection();
            }
        }
        let Some(s) = sess.as_mut() else {
            isid = isid.wrapping_add(1).max(1);
            sess = connect(&portals, lun, isid);
            if sess.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
            seen.reconnects += 1;
            continue;
        };
        let write = rng.below(10) < 7;
        let len = if write {
            1 + rng.below(16) as usize
        } else {
            1 + rng.below(32) as usize
        };
        let first = rng.below((BLOCKS - len) as u64) as usize;
        let t = Instant::now();
        let r = if write {
            let tag = next_tag;
            next_tag += 1;
            let mut data = Vec::with_capacity(len * BLOCK);
            for b in first..first + len {
                data.extend_from_slice(&block_bytes(tag, b));
            }
            // Until answered, each block may be old or new.
            {
                let mut m = model.lock().unwrap();
                for b in first..first + len {
                    m[b].insert(tag);
                }
            }
            let lba = (first * BLOCK / 512) as u64;
            let r = s.command(lun, &cdb10(0x2a, lba, (len * BLOCK / 512) as u16), &data, 0);
            if let Ok(o) = &r {
                if o.status == 0 {
                    seen.writes_ok += 1;
                    let mut m = model.lock().unwrap();
                    for b in first..first + len {
                        m[b].clear();
                        m[b].insert(tag);
                    }
                } else {
                    seen.writes_failed += 1;
                    *seen.failures.entry(describe(o)).or_default() += 1;
                }
            }
            r.map(|_| ())
        } else {
            let lba = (first * BLOCK / 512) as u64;
            let r = s.command(
                lun,
                &cdb10(0x28, lba, (len * BLOCK / 512) as u16),
                &[],
                (len * BLOCK) as u32,
            );
            if let Ok(o) = &r {
                if o.status == 0 && o.data.len() == len * BLOCK {
                    seen.reads_ok += 1;
                    let m = model.lock().unwrap();
                    verify(&m, first, &o.data, &mut seen, "read during the run");
                } else {
                    seen.reads_failed += 1;
                    *seen.failures.entry(describe(o)).or_default() += 1;
                }
            }
            r.map(|_| ())
        };
        let took = t.elapsed();
        seen.slowest = seen.slowest.max(took);
        if let Err(e) = r {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                seen.unanswered.push(format!(
                    "{} of blocks {first}..{} unanswered for {took:?}",
                    if write { "write" } else { "read" },
                    first + len
                ));
            }
            sess = None;
        }
    }
    seen
}

/// A failed command's status, and its sense key/ASC/ASCQ for a CHECK CONDITION.
fn describe(o: &tessera_integration_tests::initiator::Outcome) -> String {
    if o.status == 2 && o.sense.len() >= 14 {
        format!(
            "CHECK CONDITION {:x}/{:02x}/{:02x}",
            o.sense[2] & 0xf,
            o.sense[12],
            o.sense[13]
        )
    } else {
        format!("status {:#04x}", o.status)
    }
}

fn gateway_config(url: &str, id: &str, metrics: u16) -> String {
    format!(
        "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\nmetrics = \"127.0.0.1:{metrics}\"\n\n\
         [cluster]\netcd = [\"{url}\"]\ngateway_id = \"{id}\"\nlease_ttl_secs = 5\n"
    )
}

fn metric_sum(addr: &str, name: &str) -> f64 {
    let (code, body) = tessera_integration_tests::http_get(addr, "/metrics");
    if code != 200 {
        return f64::NAN;
    }
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_seeded_storm_of_node_gateway_and_etcd_faults_loses_nothing() {
    let seed = seed("chaos");
    let secs: u64 = std::env::var("TESSERA_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let lo = [127, 0, 0, 1];
    let eaddr = SocketAddr::from((lo, free_port(lo).unwrap()));
    let mut etcd = Etcd::start_single(
        eaddr,
        &dir.path().join("etcd"),
        &dir.path().join("etcd.log"),
    )
    .expect("start etcd");
    etcd.wait_ready(Duration::from_secs(30)).unwrap();
    let member = etcd.member.clone();
    let url = member.client_url();
    let mut nodes: Vec<NodeSlot> = (0..NODES)
        .map(|i| {
            let addr = SocketAddr::from((lo, free_port(lo).unwrap()));
            let id = format!("c{i}");
            NodeSlot {
                argv: vec![
                    tessera_bin().to_string_lossy().into_owned(),
                    "node".into(),
                    "--id".into(),
                    id.clone(),
                    "--listen".into(),
                    addr.to_string(),
                    "--data".into(),
                    dir.path()
                        .join(format!("{id}.store"))
                        .to_string_lossy()
                        .into_owned(),
                    "--host".into(),
                    format!("h{i}"),
                    "--etcd".into(),
                    url.clone(),
                ],
                id,
                addr,
                log: dir.path().join(format!("c{i}.log")),
                child: None,
                stopped: false,
            }
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt.block_on(async {
        let start = Instant::now();
        loop {
            if let Ok(c) = tessera_cluster::Cluster::connect(
                std::slice::from_ref(&url),
                tessera_cluster::DEFAULT_PREFIX,
            )
            .await
            {
                if c.nodes().await.map_or(0, |n| n.len()) == NODES {
                    break c;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nodes did not register"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let vol = rt
        .block_on(cluster.create_volume(&tessera_cluster::NewVolume {
            name: "chaos".into(),
            size: VOLUME,
            block_size: 512,
            profile: tessera_ec::Profile::parse("4+2", 16384).unwrap(),
            pgs: 16,
            write_quorum: None,
        }))
        .expect("create the volume");
    let lun = vol.lun as u8;
    let mut gw_n = 0;
    let mut start_gateway = |gws: &mut Vec<(String, Gateway, String)>| {
        gw_n += 1;
        let id = format!("gw-{gw_n}");
        let mport = free_port(lo).unwrap();
        let g = Gateway::start_on(lo, &gateway_config(&url, &id, mport));
        gws.push((id, g, format!("127.0.0.1:{mport}")));
    };
    let mut gws: Vec<(String, Gateway, String)> = Vec::new();
    start_gateway(&mut gws);
    start_gateway(&mut gws);
    let portals = Arc::new(Mutex::new(
        gws.iter().map(|(_, g, _)| g.portal).collect::<Vec<_>>(),
    ));
    let owner = |cluster: &tessera_cluster::Cluster| -> Option<String> {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), cluster.owner(vol.id))
                .await
                .ok()?
                .ok()?
                .map(|o| o.gateway)
        })
    };
    let t0 = Instant::now();
    while owner(&cluster).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nobody took the volume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("chaos: seed {seed} (replay: TESSERA_SEED={seed}), {secs} s of faults");

    let model: Arc<Mutex<Model>> = Arc::new(Mutex::new(vec![HashSet::from([0]); BLOCKS]));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (p, s, m) = (portals.clone(), stop.clone(), model.clone());
        std::thread::spawn(move || client(p, lun, seed, s, m))
    };

    // The schedule.
    let mut counts: std::collections::BTreeMap<&str, u32> = Default::default();
    let mut log = Vec::new();
    let run = Instant::now();
    // Whether a rebuild is still filling moved positions (then nothing more is taken away).
    let filling = |cluster: &tessera_cluster::Cluster| -> bool {
        rt.block_on(async {
            let go = async {
                let map = cluster.pg_map(vol.id).await.ok()??;
                if map.moving.is_empty() {
                    return Some(false);
                }
                let f = cluster.fill(vol.id).await.ok()?;
                Some(!f.is_some_and(|f| f.fills(map.epoch)))
            };
            tokio::time::timeout(Duration::from_secs(5), go)
                .await
                .ok()
                .flatten()
                .unwrap_or(true)
        })
    };
    while run.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(2000 + rng.below(3000)));
        let at = run.elapsed().as_secs_f64();
        // Every step draws the same numbers whatever the cluster's state, so that a seed
        // replays the same sequence of choices.
        let roll = rng.below(100);
        let (restore, pick, coin, pause) = (
            rng.below(2) == 0,
            rng.next_u64(),
            rng.below(2) == 0,
            rng.below(1500),
        );
        let down: Vec<usize> = (0..NODES).filter(|&i| !nodes[i].available()).collect();
        let event = if roll < 8 {
            // The owner gateway dies; a new gateway takes its place.
            let Some(o) = owner(&cluster) else { continue };
            let Some(pos) = gws.iter().position(|(id, _, _)| *id == o) else {
                continue;
            };
            let (id, g, _) = gws.remove(pos);
            g.kill();
            portals.lock().unwrap().retain(|p| *p != g.portal);
            drop(g);
            start_gateway(&mut gws);
            portals.lock().unwrap().push(gws.last().unwrap().1.portal);
            format!(
                "killed owner gateway {id}, started {}",
                gws.last().unwrap().0
            )
        } else if roll < 14 {
            etcd.stop();
            std::thread::sleep(Duration::from_millis(500 + pause));
            etcd = Etcd::start(
                &member,
                std::slice::from_ref(&member),
                &dir.path().join("etcd"),
                &dir.path().join("etcd.log"),
            )
            .expect("restart etcd");
            etcd.wait_ready(Duration::from_secs(30)).unwrap();
            "restarted etcd".to_string()
        } else if !down.is_empty() && (down.len() >= 2 || restore) {
            let i = down[(pick % down.len() as u64) as usize];
            if nodes[i].child.is_some() {
                nodes[i].signal(nix::sys::signal::Signal::SIGCONT);
                nodes[i].stopped = false;
                format!("resumed {}", nodes[i].id)
            } else {
                nodes[i].start();
                format!("restarted {}", nodes[i].id)
            }
        } else if filling(&cluster) {
            "(rebuild filling: nothing taken away)".to_string()
        } else {
            let up: Vec<usize> = (0..NODES).filter(|&i| nodes[i].available()).collect();
            let i = up[(pick % up.len() as u64) as usize];
            if coin {
                nodes[i].kill();
                format!("killed {}", nodes[i].id)
            } else {
                nodes[i].signal(nix::sys::signal::Signal::SIGSTOP);
                nodes[i].stopped = true;
                format!("stopped {}", nodes[i].id)
            }
        };
        let kind = event.split_whitespace().next().unwrap_or("");
        let kind = match kind {
            "killed" if event.contains("gateway") => "owner gateway killed",
            "killed" => "node killed",
            "stopped" => "node stopped (SIGSTOP)",
            "resumed" => "node resumed (SIGCONT)",
            "restarted" if event.contains("etcd") => "etcd restarted",
            "restarted" => "node restarted",
            _ => "nothing taken away (rebuild filling)",
        };
        *counts.entry(kind).or_default() += 1;
        log.push(format!("{at:>6.1} s  {event}"));
    }
    // Everything back.
    for n in nodes.iter_mut() {
        if n.child.is_none() {
            n.start();
        } else if n.stopped {
            n.signal(nix::sys::signal::Signal::SIGCONT);
            n.stopped = false;
        }
    }
    log.push(format!(
        "{:>6.1} s  every node back",
        run.elapsed().as_secs_f64()
    ));
    // Writes and reads go on a little with everything back, then stop.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let mut seen = worker.join().expect("the client panicked");
    println!("chaos schedule (seed {seed}):\n{}", log.join("\n"));
    println!("chaos events: {counts:?}");
    println!("failed commands by answer: {:?}", seen.failures);
    println!(
        "client: {} writes acknowledged, {} failed; {} reads verified, {} failed; {} sessions; slowest answer {:.1} s",
        seen.writes_ok,
        seen.writes_failed,
        seen.reads_ok,
        seen.reads_failed,
        seen.reconnects,
        seen.slowest.as_secs_f64()
    );
    let gateway_logs = |gws: &[(String, Gateway, String)]| -> String {
        gws.iter()
            .map(|(id, g, _)| {
                let l = g.log();
                let lines: Vec<&str> = l.lines().collect();
                format!(
                    "--- {id}:\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        seen.unanswered.is_empty(),
        "commands unanswered for {ANSWER_WITHIN:?} (seed {seed}): {:?}\n{}",
        seen.unanswered,
        gateway_logs(&gws)
    );
    assert!(
        seen.writes_ok > 100,
        "too few writes went through: {seen:?}"
    );

    // Whole again: every node registered, no rebuild filling, the owner's volume healthy.
    let start = Instant::now();
    loop {
        let registered = rt.block_on(cluster.nodes()).map_or(0, |n| n.len());
        let health: f64 = gws
            .iter()
            .map(|(_, _, m)| {
                [
                    "tessera_volume_degraded_pgs",
                    "tessera_volume_stale_nodes",
                    "tessera_volume_rebuilding_pgs",
                    "tessera_volume_repair_stripes",
                    "tessera_volume_write_suspended_pgs",
                ]
                .iter()
                .map(|n| metric_sum(m, n))
                .sum::<f64>()
            })
            .sum();
        if registered == NODES && health == 0.0 && !filling(&cluster) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "not whole again 180 s after every node came back (registered {registered}, unhealthy {health}, seed {seed})\n{}",
            gateway_logs(&gws)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "whole again {:.1} s after the end of the faults",
        start.elapsed().as_secs_f64()
    );
    // Every byte, through a gateway, against the model.
    let mut s = connect(&portals, lun, 0x77).expect("a session for the final read");
    let model = model.lock().unwrap();
    for first in (0..BLOCKS).step_by(64) {
        let o = s
            .command(
                lun,
                &cdb10(0x28, (first * BLOCK / 512) as u64, 512),
                &[],
                64 * BLOCK as u32,
            )
            .expect("final read");
        assert_eq!(o.status, 0, "final read of blocks {first}.. failed: {o:?}");
        verify(&model, first, &o.data, &mut seen, "final read");
    }
    drop(s);
    assert!(
        seen.verify_errors.is_empty(),
        "verify errors (seed {seed}):\n{}",
        seen.verify_errors.join("\n")
    );
    // The gateways go; the volume opened here is scrubbed: every stripe whole, parity right.
    for (_, g, _) in &gws {
        g.terminate(Duration::from_secs(30));
    }
    let (map, vrec) = rt.block_on(async {
        (
            cluster.pg_map(vol.id).await.unwrap().expect("a map"),
            cluster.volume("chaos").await.unwrap().expect("the volume"),
        )
    });
    let sc = scrub(&vrec, &map);
    println!("scrub: {sc:?}");
    assert_eq!(
        (sc.inconsistent, sc.parity_mismatches),
        (0, 0),
        "the volume is not whole after the storm (seed {seed}): {sc:?}"
    );
    drop(nodes);
    etcd.stop();
}

fn scrub(
    v: &tessera_cluster::VolumeRecord,
    map: &tessera_cluster::PgMapRecord,
) -> tessera_volume::ScrubStats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let vol = open_volume(v, map, None, Duration::from_secs(10))
            .await
            .expect("open the volume");
        // What the last owner's intent log still names is checked first.
        for _ in 0..1200 {
            if !vol.maintain().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sc = vol.scrub().await;
        vol.close();
        sc
    })
}
