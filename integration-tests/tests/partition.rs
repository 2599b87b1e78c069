//! Partition and fencing (issue 4, acceptance 3): a gateway cut off from etcd while it still
//! reaches the storage nodes stops writing within its lease TTL, and once another gateway has
//! taken the volume over, nothing the cut-off gateway is asked to write ever lands.
//!
//! Two network namespaces the test creates, joined by two veth pairs:
//! - `core`: etcd (on 10.213.2.1), six storage nodes (on 10.213.1.1) and gateway 2 (weight 0:
//!   it owns a volume only when nobody else does);
//! - `iso`: gateway 1, the owner, reaching the nodes over link 1 (10.213.1.0/24) and etcd
//!   over link 2 (10.213.2.0/24).
//!
//! Cutting link 2 partitions gateway 1 from etcd only. A client inside `iso` writes through
//! gateway 1 throughout; after the takeover a client in `core` writes through gateway 2. In
//! the end every block gateway 2 wrote holds gateway 2's data, and every other block holds
//! what gateway 1 acknowledged (or a write of its whose answer was not GOOD).
//!
//! Needs root (network namespaces); CI runs as root. Every process is killed by PID and both
//! namespaces are deleted at the end, whatever happens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_integration_tests::initiator::{Outcome, Session};
use tessera_integration_tests::{Gateway, SmallCluster};

const TARGET: &str = "iqn.2024-01.io.tessera:cluster";
const TTL: u64 = 5;
const BS: usize = 512;
/// Gateway 1's client writes here throughout.
const BLOCKS: u64 = 2048;
/// Gateway 2's client writes the first half after the takeover.
const TAKEN: u64 = 1024;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two namespaces and their links; deleted on drop (which removes the veths too).
struct Net {
    core: String,
    iso: String,
    /// iso's end of link 2 (the one to etcd).
    iso_etcd_link: String,
}

impl Net {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let n = Self {
            core: format!("tsr-core-{tag}"),
            iso: format!("tsr-iso-{tag}"),
            iso_etcd_link: format!("ti2-{tag}"),
        };
        ip(&["netns", "add", &n.core]);
        ip(&["netns", "add", &n.iso]);
        for (link, net) in [(1, "10.213.1"), (2, "10.213.2")] {
            let (c, i) = (format!("tc{link}-{tag}"), format!("ti{link}-{tag}"));
            ip(&[
                "link", "add", &c, "netns", &n.core, "type", "veth", "peer", "name", &i, "netns",
                &n.iso,
            ]);
            ip(&[
                "-n",
                &n.core,
                "addr",
                "add",
                &format!("{net}.1/24"),
                "dev",
                &c,
            ]);
            ip(&[
                "-n",
                &n.iso,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                &i,
            ]);
            ip(&["-n", &n.core, "link", "set", &c, "up"]);
            ip(&["-n", &n.iso, "link", "set", &i, "up"]);
        }
        ip(&["-n", &n.core, "link", "set", "lo", "up"]);
        ip(&["-n", &n.iso, "link", "set", "lo", "up"]);
        n
    }

    /// Move the calling thread (and the processes it starts from now on) into `ns`.
    fn enter(ns: &str) {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns (needs root)");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.core, &self.iso] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Block `lba` as write `seq` wrote it.
fn pattern(lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    b[..8].copy_from_slice(&lba.to_be_bytes());
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    let mut x = (lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq) | 1;
    for c in b[16..].chunks_mut(8) {
        c.copy_from_slice(&xorshift(&mut x).to_le_bytes()[..c.len()]);
    }
    b
}

/// Which write a block holds (`Some(0)`: zeroes; `None`: garbage).
fn seq_of(lba: u64, b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let seq = u64::from_be_bytes(b[8..16].try_into().ok()?);
    (b == pattern(lba, seq).as_slice()).then_some(seq)
}

fn cdb(op: u8, lba: u64, n: u16) -> [u8; 10] {
    let l = (lba as u32).to_be_bytes();
    [op, 0, l[0], l[1], l[2], l[3], 0, (n >> 8) as u8, n as u8, 0]
}

fn retryable(o: &Outcome) -> bool {
    o.status == 0x08
        || o.status == 0x28
        || (o.status == 0x02 && matches!(o.sense.get(2).map(|k| k & 0x0f), Some(2 | 6)))
}

/// Gateway 1's client: what it learned.
#[derive(Default)]
struct Log {
    /// Per block: the last GOOD write, and writes since whose answer was not GOOD.
    acked: HashMap<u64, u64>,
    uncertain: HashMap<u64, Vec<u64>>,
    /// When the last GOOD write was issued.
    last_good: Option<Instant>,
    good: u64,
    refused: u64,
    other: Vec<String>,
}

fn writer(portal: SocketAddr, lun: u8, stop: Arc<AtomicBool>, log: Arc<Mutex<Log>>) {
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut seq = 1u64;
    let mut sess: Option<Session> = None;
    while !stop.load(Ordering::SeqCst) {
        if sess.is_none() {
            match Session::login(
                portal,
                "iqn.2024-01.test:iso",
                TARGET,
                [0x80, 0, 0, 0, 7, 1],
            ) {
                Ok(s) => sess = Some(s),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        let s = sess.as_mut().expect("session");
        let lba = xorshift(&mut rng) % (BLOCKS - 8);
        let data: Vec<u8> = (0..8).flat_map(|i| pattern(lba + i, seq)).collect();
        let issued = Instant::now();
        let r = s.command(lun, &cdb(0x2a, lba, 8), &data, 0);
        let mut l = log.lock().unwrap();
        match r {
            Ok(o) if o.status == 0 => {
                for i in 0..8 {
                    l.acked.insert(lba + i, seq);
                    l.uncertain.remove(&(lba + i));
                }
                l.last_good = Some(issued);
                l.good += 1;
            }
            other => {
                for i in 0..8 {
                    l.uncertain.entry(lba + i).or_default().push(seq);
                }
                match other {
                    Ok(o) if retryable(&o) => l.refused += 1,
                    Ok(o) => l
                        .other
                        .push(format!("status {:#x} sense {:02x?}", o.status, o.sense)),
                    Err(_) => sess = None,
                }
                drop(l);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        seq += 1;
    }
}

#[test]
fn a_gateway_cut_from_etcd_stops_writing_and_never_overwrites_its_successor() {
    // /proc/self belongs to the process's effective user.
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    if euid != 0 {
        println!("SKIPPED: network namespaces need root (CI runs this as root)");
        return;
    }
    let net = Net::new();
    Net::enter(&net.core);
    let dir = tempfile::tempdir().unwrap();
    let cl = SmallCluster::start(dir.path(), [10, 213, 2, 1], [10, 213, 1, 1], "p");
    let (rt, c, url) = (&cl.rt, &cl.cluster, cl.url.clone());
    let vol = cl.create_volume("part", 16 << 20, 4096);
    let lun = u8::try_from(vol.lun).unwrap();

    // Gateway 1, in iso, first: it takes the volume.
    let g1_cfg = format!(
        "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\n\n[cluster]\netcd = [\"{url}\"]\n\
         gateway_id = \"gw-1\"\nlease_ttl_secs = {TTL}\nforward = \"10.213.1.2:0\"\n"
    );
    let iso = net.iso.clone();
    let g1 = std::thread::spawn(move || {
        Net::enter(&iso);
        Gateway::start_on([127, 0, 0, 1], &g1_cfg)
    })
    .join()
    .expect("start gateway 1");
    cl.wait_owner(vol.id, "gw-1", &g1);
    let epoch1 = rt.block_on(c.epoch(vol.id)).unwrap();
    // Gateway 2, in core, weight 0: it forwards to gw-1 while gw-1 owns the volume.
    let g2 = Gateway::start_on(
        [127, 0, 0, 1],
        &format!(
            "[gateway]\nportals = [\"127.0.0.1:{{PORT}}\"]\n\n[cluster]\netcd = [\"{url}\"]\n\
             gateway_id = \"gw-2\"\nlease_ttl_secs = {TTL}\nforward = \"10.213.1.1:0\"\nweight = 0\n"
        ),
    );

    // Gateway 1's client, in iso, writing throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Log::default()));
    let w = {
        let (stop, log, iso, portal) = (stop.clone(), log.clone(), net.iso.clone(), g1.portal);
        std::thread::spawn(move || {
            Net::enter(&iso);
            writer(portal, lun, stop, log);
        })
    };
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stopper = StopOnDrop(stop.clone());
    let start = Instant::now();
    while log.lock().unwrap().good < 50 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "gw-1 does not take writes: {:?}\n{}",
            log.lock().unwrap().other,
            g1.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The cut: iso loses its link to etcd, keeps the one to the nodes.
    ip(&["-n", &net.iso, "link", "set", &net.iso_etcd_link, "down"]);
    let cut = Instant::now();
    let start = Instant::now();
    let epoch2 = loop {
        if let Ok(Some(o)) = rt.block_on(c.owner(vol.id)) {
            if o.gateway == "gw-2" {
                break o.epoch;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(TTL + 20),
            "gw-2 never took the volume over\n{}",
            g2.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let takeover = cut.elapsed();
    assert!(
        epoch2 > epoch1,
        "the takeover raised the epoch ({epoch1} → {epoch2})"
    );
    let stopped = {
        let l = log.lock().unwrap();
        l.last_good.map(|t| t.saturating_duration_since(cut))
    };
    println!(
        "cut at 0 s; gw-1's last acknowledged write issued {:.2} s after; gw-2 owner at {:.2} s (epoch {epoch1} → {epoch2})",
        stopped.unwrap_or_default().as_secs_f64(),
        takeover.as_secs_f64()
    );
    assert!(
        stopped.unwrap_or_default() < Duration::from_secs(TTL),
        "gw-1 acknowledged writes past its lease TTL after the cut"
    );

    // The new owner writes the first half while gw-1's client keeps trying.
    let mut s2 = Session::login(
        g2.portal,
        "iqn.2024-01.test:core",
        TARGET,
        [0x80, 0, 0, 0, 7, 2],
    )
    .expect("login to gw-2");
    const B_SEQ: u64 = 1 << 40;
    for lba in (0..TAKEN).step_by(8) {
        let data: Vec<u8> = (0..8).flat_map(|i| pattern(lba + i, B_SEQ + lba)).collect();
        let t = Instant::now();
        loop {
            let o = s2
                .command(lun, &cdb(0x2a, lba, 8), &data, 0)
                .expect("write through gw-2");
            if o.status == 0 {
                break;
            }
            assert!(
                retryable(&o) && t.elapsed() < Duration::from_secs(20),
                "gw-2 write at {lba}: status {:#x} sense {:02x?}\n{}",
                o.status,
                o.sense,
                g2.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer");

    // Everything read back through the new owner.
    let l = log.lock().unwrap();
    assert!(
        l.other.is_empty(),
        "gw-1 answered with errors: {:?}",
        l.other
    );
    assert!(l.refused > 0, "gw-1 never refused a write after the cut");
    let mut kept = 0;
    for lba in (0..BLOCKS).step_by(64) {
        let o = s2
            .command(lun, &cdb(0x28, lba, 64), &[], 64 * BS as u32)
            .expect("read through gw-2");
        assert_eq!(o.status, 0, "read at {lba}: {:02x?}", o.sense);
        for i in 0..64 {
            let b = lba + i;
            let got = seq_of(b, &o.data[i as usize * BS..(i as usize + 1) * BS]);
            if b < TAKEN {
                assert_eq!(
                    got,
                    Some(B_SEQ + (b & !7)),
                    "block {b}: the new owner's write was overwritten (holds {got:?})"
                );
            } else {
                let acked = l.acked.get(&b).copied().unwrap_or(0);
                let maybe = l.uncertain.get(&b).cloned().unwrap_or_default();
                assert!(
                    got == Some(acked) || got.is_some_and(|s| maybe.contains(&s)),
                    "block {b}: holds {got:?}, gw-1 acknowledged {acked} (unanswered since: {maybe:?})"
                );
                kept += u64::from(acked > 0);
            }
        }
    }
    println!(
        "gw-1: {} writes acknowledged, {} refused; {TAKEN} blocks of gw-2 intact; {kept} blocks of gw-1 kept",
        l.good, l.refused
    );
    drop(l);
    drop(s2);
    drop(g2);
    drop(g1);
    drop(cl);
    drop(net);
}
