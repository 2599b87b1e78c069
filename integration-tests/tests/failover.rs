//! Gateway failover (issue 4, acceptance 1), end to end: three etcd members, eight storage
//! nodes, one 4+2 volume and three gateways, each on a loopback address of its own. Every
//! gateway exports the volume; the owner (recorded in etcd under its lease) serves it and the
//! others forward to it. Killing the owner (SIGKILL) moves the volume to a survivor once the
//! lease has lapsed, with a higher epoch, within TTL + 2 s; an initiator that reconnects
//! through a survivor sees only retryable answers meanwhile, and no acknowledged write is lost.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_cluster::process::free_port;
use tessera_cluster::{Cluster, OwnerRecord};
use tessera_integration_tests::initiator::{cdb10, Outcome, Session};
use tessera_integration_tests::Started;
use tessera_integration_tests::{start_three_etcds, tessera_bin, Gateway};

const TARGET: &str = "iqn.2024-01.io.tessera:cluster";
/// The gateways' lease TTL (`lease_ttl_secs`).
const TTL: u64 = 5;
const BS: usize = 512;
/// Phase 1 writes lbas `0..PHASE1_BLOCKS`, eight blocks a write.
const PHASE1_BLOCKS: u64 = 320;
/// Phase 2 writes 1 to 8 blocks at a time in `REGION_START..REGION_START + REGION_LEN`.
const REGION_START: u64 = 1024;
const REGION_LEN: u64 = 1024;
/// How long writes must go on succeeding after the takeover.
const GOOD_AFTER: Duration = Duration::from_secs(3);
/// Retryable answers are retried this long in the phases where none is expected.
const PATIENCE: Duration = Duration::from_secs(10);

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The content of block `lba` as written by write number `seq`: the lba and the sequence
/// number, then bytes that depend on both.
fn pattern(lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    b[..8].copy_from_slice(&lba.to_be_bytes());
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    let mut x =
        (lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xd1b5_4a32_d192_ed03)) | 1;
    for c in b[16..].chunks_mut(8) {
        let v = xorshift(&mut x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    b
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Never written.
    Zero,
    /// Write number `seq`.
    Write(u64),
    /// Neither.
    Garbage,
}

fn content(lba: u64, b: &[u8]) -> Content {
    if b.iter().all(|&x| x == 0) {
        return Content::Zero;
    }
    let seq = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
    if b == pattern(lba, seq).as_slice() {
        Content::Write(seq)
    } else {
        Content::Garbage
    }
}

/// One block of the model: the last acknowledged write, and the writes issued since whose
/// outcome is unknown (not GOOD, or the connection dropped): any of them may have landed.
#[derive(Debug, Clone, Default)]
struct Slot {
    acked: Option<u64>,
    uncertain: Vec<u64>,
}

/// How a block read back compares with the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The last acknowledged write, no uncertain write since.
    Exact,
    /// Uncertain writes since, none landed: the last acknowledged write.
    Old,
    /// One of the uncertain writes.
    New,
}

#[derive(Debug, Clone, Default)]
struct Model {
    blocks: HashMap<u64, Slot>,
}

impl Model {
    fn acked(&mut self, lba: u64, seq: u64) {
        let s = self.blocks.entry(lba).or_default();
        s.acked = Some(seq);
        s.uncertain.clear();
    }

    fn uncertain(&mut self, lba: u64, seq: u64) {
        self.blocks.entry(lba).or_default().uncertain.push(seq);
    }

    /// Check what block `lba` holds (a block outside the model must be zeroes).
    fn check(&self, lba: u64, data: &[u8]) -> Result<Verdict, String> {
        let got = content(lba, data);
        let slot = self.blocks.get(&lba).cloned().unwrap_or_default();
        let acked = slot.acked.map_or(Content::Zero, Content::Write);
        if got == acked {
            return Ok(if slot.uncertain.is_empty() {
                Verdict::Exact
            } else {
                Verdict::Old
            });
        }
        if let Content::Write(seq) = got {
            if slot.uncertain.contains(&seq) {
                return Ok(Verdict::New);
            }
        }
        Err(format!(
            "lba {lba} holds {got:?}; expected {acked:?} (the last acknowledged write){}",
            if slot.uncertain.is_empty() {
                String::new()
            } else {
                format!(" or one of the uncertain writes {:?}", slot.uncertain)
            }
        ))
    }
}

/// Sense key, ASC and ASCQ, fixed or descriptor format.
fn sense(s: &[u8]) -> Option<(u8, u8, u8)> {
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    match s.first()? & 0x7f {
        0x70 | 0x71 => Some((at(2) & 0x0f, at(12), at(13))),
        0x72 | 0x73 => Some((at(1) & 0x0f, at(2), at(3))),
        _ => None,
    }
}

enum Answer {
    Good,
    /// What initiators retry, named.
    Retry(String),
    /// Anything else, described.
    Bad(String),
}

fn classify(o: &Outcome) -> Answer {
    match o.status {
        0x00 => Answer::Good,
        0x08 => Answer::Retry("BUSY".into()),
        0x28 => Answer::Retry("TASK SET FULL".into()),
        0x02 => match sense(&o.sense) {
            Some((2, asc, ascq)) => Answer::Retry(format!("NOT READY {asc:02x}/{ascq:02x}")),
            Some((6, asc, ascq)) => Answer::Retry(format!("UNIT ATTENTION {asc:02x}/{ascq:02x}")),
            Some((key @ (3 | 4), asc, ascq)) => Answer::Bad(format!(
                "CHECK CONDITION, sense key {key} ({}) {asc:02x}/{ascq:02x}: an I/O error, \
                 never acceptable during a failover",
                if key == 3 {
                    "MEDIUM ERROR"
                } else {
                    "HARDWARE ERROR"
                }
            )),
            Some((key, asc, ascq)) => Answer::Bad(format!(
                "CHECK CONDITION, sense key {key:#x} {asc:02x}/{ascq:02x}: not retryable"
            )),
            None => Answer::Bad(format!(
                "CHECK CONDITION without usable sense data {:02x?}",
                o.sense
            )),
        },
        st => Answer::Bad(format!("SCSI status {st:#04x}: not retryable")),
    }
}

/// WRITE(10) of `data` at `lba`.
fn write(s: &mut Session, lun: u8, lba: u64, data: &[u8]) -> std::io::Result<Outcome> {
    let n = (data.len() / BS) as u16;
    s.command(lun, &cdb10(0x2a, lba, n), data, 0)
}

/// READ(10) of `n` blocks at `lba`.
fn read(s: &mut Session, lun: u8, lba: u64, n: u16) -> std::io::Result<Outcome> {
    s.command(lun, &cdb10(0x28, lba, n), &[], u32::from(n) * BS as u32)
}

/// Issue a command with `issue` again while its answer is retryable, for [`PATIENCE`] at
/// most; its GOOD outcome, or why not (prefixed by `what`).
fn retrying(
    what: &str,
    mut issue: impl FnMut() -> std::io::Result<Outcome>,
) -> Result<Outcome, String> {
    let start = Instant::now();
    loop {
        let o = issue().map_err(|e| format!("{what}: {e}"))?;
        match classify(&o) {
            Answer::Good => return Ok(o),
            Answer::Retry(_) if start.elapsed() < PATIENCE => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Answer::Retry(why) => return Err(format!("{what}: still {why} after {PATIENCE:?}")),
            Answer::Bad(why) => return Err(format!("{what}: {why}")),
        }
    }
}

/// READ, retrying retryable answers for a while; the data.
fn read_retrying(s: &mut Session, lun: u8, lba: u64, n: u16, via: &str) -> Result<Vec<u8>, String> {
    let what = format!("READ {lba}+{n} through {via}");
    let o = retrying(&what, || read(s, lun, lba, n))?;
    if o.data.len() != usize::from(n) * BS {
        return Err(format!(
            "{what}: {} bytes of data, not {}",
            o.data.len(),
            usize::from(n) * BS
        ));
    }
    Ok(o.data)
}

/// WRITE, retrying retryable answers for a while (phase 1: no failover going on).
fn write_retrying(
    s: &mut Session,
    lun: u8,
    lba: u64,
    data: &[u8],
    via: &str,
) -> Result<(), String> {
    let n = data.len() / BS;
    retrying(&format!("WRITE {lba}+{n} through {via}"), || {
        write(s, lun, lba, data)
    })?;
    Ok(())
}

/// Log in and wait (TEST UNIT READY) until the LUN answers GOOD.
fn open(
    portal: SocketAddr,
    initiator: &str,
    isid: [u8; 6],
    lun: u8,
    via: &str,
) -> Result<Session, String> {
    let mut s = Session::login(portal, initiator, TARGET, isid)
        .map_err(|e| format!("login to {via} ({portal}): {e}"))?;
    retrying(
        &format!("TEST UNIT READY of LUN {lun} through {via}"),
        || s.command(lun, &[0; 6], &[], 0),
    )?;
    Ok(s)
}

/// Contiguous runs (at most `max` long) of the sorted lbas.
fn runs(lbas: &[u64], max: u64) -> Vec<(u64, u16)> {
    let mut out: Vec<(u64, u16)> = Vec::new();
    for &l in lbas {
        match out.last_mut() {
            Some((start, n)) if *start + u64::from(*n) == l && u64::from(*n) < max => *n += 1,
            _ => out.push((l, 1)),
        }
    }
    out
}

/// The kill, as the writer sees it: when SIGKILL was sent, and when the process was gone.
#[derive(Clone, Copy)]
struct Kill {
    sent: Instant,
    gone: Instant,
}

struct Shared {
    kill: Mutex<Option<Kill>>,
    stop: AtomicBool,
}

/// Tells the writer to stop if the main thread unwinds.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Report {
    model: Model,
    next_seq: u64,
    acked_writes: u64,
    acked_blocks: u64,
    uncertain_writes: u64,
    drops: u64,
    logins: Vec<String>,
    login_failures: u64,
    readbacks: u64,
    spot_checks: u64,
    retryable: BTreeMap<String, u64>,
    /// The first GOOD write issued after the owner was gone: when, and through which gateway.
    first_good: Option<(Instant, String)>,
    error: Option<String>,
}

impl Report {
    /// Write `seq` of `n` blocks at `lba` got no GOOD: it may or may not have landed.
    fn uncertain(&mut self, lba: u64, n: u64, seq: u64) {
        for i in 0..n {
            self.model.uncertain(lba + i, seq);
        }
        self.uncertain_writes += 1;
    }

    /// Read `n` blocks at `lba` and check each against the model: `wrong` describes a block
    /// that fails (a short read is an error of the model's check). A GOOD answer is counted
    /// in `count`, a retryable one in `retryable` (as a read). Whether the connection was
    /// lost; or why the check failed (a wrong block, or an answer that is neither).
    fn check_read(
        &mut self,
        s: &mut Session,
        lun: u8,
        lba: u64,
        n: u64,
        count: fn(&mut Report) -> &mut u64,
        wrong: impl Fn(&Result<Verdict, String>) -> Option<String>,
    ) -> Result<bool, String> {
        let Ok(o) = read(s, lun, lba, n as u16) else {
            return Ok(true);
        };
        match classify(&o) {
            Answer::Good => {
                *count(self) += 1;
                for i in 0..n {
                    let b = o.data.get((i as usize) * BS..(i as usize + 1) * BS);
                    let v = b
                        .ok_or_else(|| format!("short read: {} bytes", o.data.len()))
                        .and_then(|b| self.model.check(lba + i, b));
                    if let Some(why) = wrong(&v) {
                        return Err(why);
                    }
                }
            }
            Answer::Retry(why) => {
                *self.retryable.entry(format!("{why} (read)")).or_default() += 1;
            }
            Answer::Bad(why) => return Err(why),
        }
        Ok(false)
    }
}

fn since(kill: Option<Kill>) -> String {
    match kill {
        Some(k) => format!("{:.2} s after the kill", k.sent.elapsed().as_secs_f64()),
        None => "before the kill".into(),
    }
}

/// Phase 2's client: writes (and reads back) through the owner until it is killed, then
/// through the survivors, round robin, until writes have succeeded for [`GOOD_AFTER`].
fn writer(
    lun: u8,
    owner: (String, SocketAddr),
    survivors: Vec<(String, SocketAddr)>,
    shared: Arc<Shared>,
    mut r: Report,
) -> Report {
    const WRITER: &str = "iqn.2024-01.test:failover-writer";
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut sess: Option<(Session, String)> = None;
    let mut rr = 0usize;
    let started = Instant::now();
    let mut iteration = 0u64;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            r.error
                .get_or_insert_with(|| "stopped by the main thread".into());
            return r;
        }
        let kill = *shared.kill.lock().unwrap_or_else(|e| e.into_inner());
        match (kill, &r.first_good) {
            (Some(_), Some((at, _))) if at.elapsed() >= GOOD_AFTER => return r,
            (Some(k), None) if k.sent.elapsed() > Duration::from_secs(30) => {
                r.error = Some("no write succeeded within 30 s of the kill".into());
                return r;
            }
            (None, _) if started.elapsed() > Duration::from_secs(60) => {
                r.error = Some("the owner was never killed".into());
                return r;
            }
            _ => {}
        }
        if sess.is_none() {
            let (name, portal) = match kill {
                None => owner.clone(),
                Some(_) => {
                    rr += 1;
                    survivors[(rr - 1) % survivors.len()].clone()
                }
            };
            let index = [&owner]
                .into_iter()
                .chain(&survivors)
                .position(|(n, _)| *n == name)
                .unwrap_or(0) as u8;
            match Session::login(portal, WRITER, TARGET, [0x80, 0, 0, 0, 2, index]) {
                Ok(s) => {
                    r.logins.push(format!("{name} ({})", since(kill)));
                    sess = Some((s, name));
                }
                Err(_) => {
                    r.login_failures += 1;
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let Some((s, via)) = sess.as_mut() else {
            continue;
        };
        iteration += 1;
        let n = 1 + xorshift(&mut rng) % 8;
        let lba = REGION_START + xorshift(&mut rng) % (REGION_LEN - n);
        let seq = r.next_seq;
        r.next_seq += 1;
        let data: Vec<u8> = (0..n).flat_map(|i| pattern(lba + i, seq)).collect();
        let issued = Instant::now();
        let mut lost = false;
        match write(s, lun, lba, &data) {
            Ok(o) => match classify(&o) {
                Answer::Good => {
                    for i in 0..n {
                        r.model.acked(lba + i, seq);
                    }
                    r.acked_writes += 1;
                    r.acked_blocks += n;
                    if let Some(k) = kill {
                        if issued > k.gone && r.first_good.is_none() {
                            r.first_good = Some((Instant::now(), via.clone()));
                        }
                    }
                    // Read it back at once: exactly what was acknowledged.
                    match r.check_read(
                        s,
                        lun,
                        lba,
                        n,
                        |r| &mut r.readbacks,
                        |v| (*v != Ok(Verdict::Exact)).then(|| format!("{v:?}")),
                    ) {
                        Ok(l) => lost = l,
                        Err(why) => {
                            r.error = Some(format!(
                                "read-back of write #{seq} (lba {lba}+{n}) through {via}, {}: {why}",
                                since(kill)
                            ));
                            return r;
                        }
                    }
                }
                Answer::Retry(why) => {
                    r.uncertain(lba, n, seq);
                    *r.retryable.entry(why).or_default() += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Answer::Bad(why) => {
                    r.uncertain(lba, n, seq);
                    r.error = Some(format!(
                        "write #{seq} (lba {lba}+{n}) through {via}, {}: {why}",
                        since(kill)
                    ));
                    return r;
                }
            },
            Err(_) => {
                r.uncertain(lba, n, seq);
                lost = true;
            }
        }
        // Now and then, an earlier range.
        if !lost && iteration.is_multiple_of(8) {
            let at = REGION_START + xorshift(&mut rng) % (REGION_LEN - 8);
            // Whatever the model allows.
            match r.check_read(s, lun, at, 8, |r| &mut r.spot_checks, |v| v.clone().err()) {
                Ok(l) => lost = l,
                Err(why) => {
                    r.error = Some(format!(
                        "spot check of lba {at}+8 through {via}, {}: {why}",
                        since(kill)
                    ));
                    return r;
                }
            }
        }
        if lost {
            r.drops += 1;
            sess = None;
        }
    }
}

/// The last lines each gateway logged.
fn logs(gws: &[(String, Gateway)]) -> String {
    let mut out = String::new();
    for (id, g) in gws {
        let log = g.log();
        let lines: Vec<&str> = log.lines().collect();
        out.push_str(&format!(
            "--- {id} ({}), last {} of {} log lines:\n",
            g.portal,
            lines.len().min(40),
            lines.len()
        ));
        for l in &lines[lines.len().saturating_sub(40)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// How the owner gateway goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGKILL: its lease lapses after the TTL.
    Kill,
    /// SIGTERM: it finishes, releases its lease and exits within 10 s.
    Term,
}

#[test]
fn killing_the_owner_gateway_moves_the_volume_and_loses_no_acknowledged_write() {
    failover(Stop::Kill);
}

#[test]
fn stopping_the_owner_gateway_hands_the_volume_over_at_once_and_loses_no_acknowledged_write() {
    failover(Stop::Term);
}

fn failover(how: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Three etcd members on 127.0.0.1, .2 and .3.
    let (etcds, urls) = start_three_etcds(dir.path());

    // Eight storage nodes, each on an address (and host label) of its own.
    let mut nodes = Vec::new();
    for i in 1..=8u8 {
        let ip = [127, 0, 0, 20 + i];
        let listen = SocketAddr::from((ip, free_port(ip).unwrap()));
        let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
        nodes.push(Started(
            Command::new(tessera_bin())
                .args(["node", "--id", &format!("n{i}"), "--listen"])
                .arg(listen.to_string())
                .arg("--data")
                .arg(dir.path().join(format!("n{i}.store")))
                .args(["--host", &format!("h{i}"), "--etcd", &urls.join(",")])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start node"),
        ));
    }

    // The volume, once the nodes are registered (a fresh etcd may still be electing).
    let c = rt.block_on(async {
        let start = Instant::now();
        let c = loop {
            match Cluster::connect(&urls, tessera_cluster::DEFAULT_PREFIX).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(30), "etcd: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        while c.nodes().await.map_or(0, |n| n.len()) < 8 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the nodes did not register: {:?}",
                c.nodes().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    });
    let vol = rt.block_on(async {
        let start = Instant::now();
        loop {
            let r = c
                .create_volume(&tessera_cluster::NewVolume {
                    name: "fo".into(),
                    size: 32 << 20,
                    block_size: 512,
                    profile: tessera_ec::Profile::parse("4+2", 4096).unwrap(),
                    pgs: 32,
                    write_quorum: None,
                })
                .await;
            match r {
                Ok(v) => break v,
                // An earlier attempt went through after all.
                Err(tessera_cluster::ClusterError::Exists(_)) => {
                    break c.volume("fo").await.unwrap().expect("the volume");
                }
                Err(e) => {
                    assert!(start.elapsed() < Duration::from_secs(30), "create: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let lun = u8::try_from(vol.lun).expect("a small LUN number");

    // Three gateways, portals on 127.0.0.11, .12 and .13, each with a lease of TTL s.
    let etcd_list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let gws: Vec<(String, Gateway)> = (1..=3u8)
        .map(|i| {
            let id = format!("gw-{i}");
            let config = format!(
                "[gateway]\nportals = [\"127.0.0.{}:{{PORT}}\"]\n\n[cluster]\netcd = [{}]\n\
                 gateway_id = \"{id}\"\nlease_ttl_secs = {TTL}\n",
                10 + i,
                etcd_list.join(", ")
            );
            let g = Gateway::start_on([127, 0, 0, 10 + i], &config);
            (id, g)
        })
        .collect();
    let portal_of = |id: &str| {
        gws.iter()
            .find(|(g, _)| g == id)
            .map(|(_, g)| g.portal)
            .unwrap_or_else(|| panic!("{id} is none of the test's gateways"))
    };

    // All three registered, and the volume owned (in etcd) by the one weighted rendezvous
    // hashing prefers, for a second: gw-1 takes it alone at first and hands it over to the
    // preferred gateway once that one has been live for a few seconds.
    let start = Instant::now();
    let mut stable: Option<(OwnerRecord, Instant)> = None;
    let owner = loop {
        let (o, g) = rt.block_on(async { (c.owner(vol.id).await, c.gateways().await) });
        let g = g.unwrap_or_default();
        let preferred = tessera_cluster::preferred_owner(vol.id, &g).map(|p| p.id.clone());
        let settled = |o: &OwnerRecord| g.len() == 3 && preferred.as_deref() == Some(&o.gateway);
        match (o, stable.take()) {
            (Ok(Some(o)), Some((prev, t0))) if prev == o && settled(&o) => {
                if t0.elapsed() >= Duration::from_secs(1) {
                    break o;
                }
                stable = Some((prev, t0));
            }
            (Ok(Some(o)), _) if settled(&o) => stable = Some((o, Instant::now())),
            (o, _) => assert!(
                start.elapsed() < Duration::from_secs(30),
                "the volume is not settled on its preferred gateway {preferred:?}: owner {o:?}, \
                 {} gateways registered\n{}",
                g.len(),
                logs(&gws)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let owner_portal = portal_of(&owner.gateway);
    let records = rt.block_on(c.gateways()).unwrap();
    let rec = records
        .iter()
        .find(|r| r.id == owner.gateway)
        .expect("the owner's gateway record");
    assert!(
        rec.portals.contains(&owner_portal.to_string()),
        "{rec:?} vs {owner_portal}"
    );
    let survivors: Vec<(String, SocketAddr)> = gws
        .iter()
        .filter(|(id, _)| *id != owner.gateway)
        .map(|(id, g)| (id.clone(), g.portal))
        .collect();
    println!(
        "volume fo (LUN {lun}): owner {} epoch {} on {owner_portal}; the others {:?}",
        owner.gateway, owner.epoch, survivors
    );

    // Phase 1: written through a non-owner (forwarded), read back through both.
    let (fwd_id, fwd_portal) = survivors[0].clone();
    let fwd_via = format!("{fwd_id} (not the owner)");
    let own_via = format!("{} (the owner)", owner.gateway);
    let fail = |what: String| -> ! { panic!("{what}\n{}", logs(&gws)) };
    let mut r = Report {
        next_seq: 1,
        ..Report::default()
    };
    // Initiator `iqn.2024-01.test:failover-N`, ISID ending in N.
    let open_as = |n: u8, portal: SocketAddr, via: &str| {
        let initiator = format!("iqn.2024-01.test:failover-{n}");
        open(portal, &initiator, [0x80, 0, 0, 0, 1, n], lun, via).unwrap_or_else(|e| fail(e))
    };
    let mut s1 = open_as(1, fwd_portal, &fwd_via);
    let phase1 = Instant::now();
    for w in 0..PHASE1_BLOCKS / 8 {
        let lba = w * 8;
        let seq = r.next_seq;
        r.next_seq += 1;
        let data: Vec<u8> = (0..8).flat_map(|i| pattern(lba + i, seq)).collect();
        write_retrying(&mut s1, lun, lba, &data, &fwd_via).unwrap_or_else(|e| fail(e));
        for i in 0..8 {
            r.model.acked(lba + i, seq);
        }
    }
    let mut s0 = open_as(0, owner_portal, &own_via);
    for (via, s) in [(&own_via, &mut s0), (&fwd_via, &mut s1)] {
        let mut lba = 0;
        while lba < PHASE1_BLOCKS {
            let data = read_retrying(s, lun, lba, 64, via).unwrap_or_else(|e| fail(e));
            for (i, b) in data.chunks(BS).enumerate() {
                let v = r.model.check(lba + i as u64, b);
                if v != Ok(Verdict::Exact) {
                    fail(format!("phase 1, read through {via}: {v:?}"));
                }
            }
            lba += 64;
        }
    }
    drop((s0, s1));
    println!(
        "phase 1: {PHASE1_BLOCKS} blocks written through {fwd_id}, read back identical through {} and {fwd_id} ({:.2} s)",
        owner.gateway,
        phase1.elapsed().as_secs_f64()
    );

    // Phase 2: a writer on the owner; the owner killed two seconds in.
    let shared = Arc::new(Shared {
        kill: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    let _stop = StopOnDrop(shared.clone());
    let handle = {
        let shared = shared.clone();
        let owner = (owner.gateway.clone(), owner_portal);
        let survivors = survivors.clone();
        let r = std::mem::take(&mut r);
        std::thread::spawn(move || writer(lun, owner, survivors, shared, r))
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) && !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    if handle.is_finished() {
        let r = handle.join().expect("the writer thread");
        fail(format!("the writer stopped before the kill: {:?}", r.error));
    }
    // Still the same owner (the writer is on its portal).
    let before = rt.block_on(c.owner(vol.id)).unwrap();
    assert_eq!(
        before.as_ref(),
        Some(&owner),
        "ownership moved before the kill\n{}",
        logs(&gws)
    );
    let victim = &gws.iter().find(|(id, _)| *id == owner.gateway).unwrap().1;
    let sent = Instant::now();
    let pid = victim.pid();
    match how {
        Stop::Kill => {
            victim.kill();
            *shared.kill.lock().unwrap() = Some(Kill {
                sent,
                gone: Instant::now(),
            });
            println!(
                "SIGKILLed {} (pid {pid}) after {:.2} s of writes",
                owner.gateway,
                started.elapsed().as_secs_f64()
            );
        }
        Stop::Term => {
            // The writer moves on once the process is gone; it notices the closed session.
            let (status, took) = victim.terminate(Duration::from_secs(10));
            *shared.kill.lock().unwrap() = Some(Kill {
                sent,
                gone: Instant::now(),
            });
            println!(
                "SIGTERMed {} (pid {pid}) after {:.2} s of writes: exited ({status}) in {:.2} s",
                owner.gateway,
                started.elapsed().as_secs_f64(),
                took.as_secs_f64()
            );
            assert!(status.success(), "{} exited with {status}", owner.gateway);
        }
    }
    // Takeover: etcd names a new owner.
    let (new_owner, takeover) = loop {
        if let Ok(Some(o)) = rt.block_on(c.owner(vol.id)) {
            if o != owner {
                break (o, sent.elapsed());
            }
        }
        if sent.elapsed() > Duration::from_secs(30) {
            fail(format!(
                "no new owner within 30 s of killing {}",
                owner.gateway
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "etcd: new owner {} epoch {} after {:.2} s",
        new_owner.gateway,
        new_owner.epoch,
        takeover.as_secs_f64()
    );
    let r = handle.join().expect("the writer thread");
    let retryable: Vec<String> = r
        .retryable
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect();
    println!(
        "writer: logins {:?}, {} failed logins, {} dropped connections, retryable answers [{}]",
        r.logins,
        r.login_failures,
        r.drops,
        retryable.join(", ")
    );
    if let Some(e) = &r.error {
        fail(format!("phase 2: {e}"));
    }
    let (first_good, first_via) = r.first_good.clone().expect("a GOOD write after the kill");
    let outage = first_good - sent;
    println!(
        "takeover {:.1} s (lease TTL {TTL} s), client outage {:.1} s (first GOOD write through {first_via})",
        takeover.as_secs_f64(),
        outage.as_secs_f64()
    );
    assert!(
        survivors.iter().any(|(id, _)| *id == new_owner.gateway),
        "the new owner {} is not a survivor",
        new_owner.gateway
    );
    assert!(
        new_owner.epoch > owner.epoch,
        "the takeover raised the epoch: {} -> {}",
        owner.epoch,
        new_owner.epoch
    );
    let limit = Duration::from_millis(TTL * 1000 + 2000 + 500);
    assert!(
        takeover <= limit,
        "takeover took {takeover:?}, more than TTL + 2 s (+ polling slack)\n{}",
        logs(&gws)
    );
    if how == Stop::Term {
        // A released lease hands over at once: sooner than any lapse could.
        assert!(
            takeover < Duration::from_secs(TTL),
            "after SIGTERM the takeover took {takeover:?}: the lease was not released\n{}",
            logs(&gws)
        );
    }

    // Every block of the model, read through both survivors: identical, and every
    // acknowledged write there (uncertain blocks: old or new content).
    let mut lbas: Vec<u64> = r.model.blocks.keys().copied().collect();
    lbas.sort_unstable();
    let ranges = runs(&lbas, 64);
    let mut first: Vec<Vec<u8>> = Vec::new();
    let mut verdicts: BTreeMap<&str, u64> = BTreeMap::new();
    for (k, (id, portal)) in survivors.iter().enumerate() {
        let via = if *id == new_owner.gateway {
            format!("{id} (the new owner)")
        } else {
            format!("{id} (not the owner)")
        };
        let mut s = open(
            *portal,
            "iqn.2024-01.test:failover-check",
            [0x80, 0, 0, 0, 3, k as u8],
            lun,
            &via,
        )
        .unwrap_or_else(|e| fail(e));
        for (j, &(lba, n)) in ranges.iter().enumerate() {
            let data = read_retrying(&mut s, lun, lba, n, &via).unwrap_or_else(|e| fail(e));
            for (i, b) in data.chunks(BS).enumerate() {
                match r.model.check(lba + i as u64, b) {
                    Ok(v) if k == 0 => {
                        *verdicts
                            .entry(match v {
                                Verdict::Exact => "exact",
                                Verdict::Old => "old",
                                Verdict::New => "new",
                            })
                            .or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(e) => fail(format!("final check through {via}: {e}")),
                }
            }
            if k == 0 {
                first.push(data);
            } else if first[j] != data {
                fail(format!(
                    "lba {lba}+{n} reads differently through {} and {via}",
                    survivors[0].0
                ));
            }
        }
    }
    let verified: u64 = verdicts.values().sum();
    let uncertain_blocks = verdicts.get("old").unwrap_or(&0) + verdicts.get("new").unwrap_or(&0);
    println!(
        "summary: {} writes acknowledged ({} blocks, {} read back at once, {} spot checks), {} uncertain; \
         {verified} blocks verified through {} and {}, identical ({uncertain_blocks} uncertain: {} old, {} new)",
        r.acked_writes + PHASE1_BLOCKS / 8,
        r.acked_blocks + PHASE1_BLOCKS,
        r.readbacks,
        r.spot_checks,
        r.uncertain_writes,
        survivors[0].0,
        survivors[1].0,
        verdicts.get("old").unwrap_or(&0),
        verdicts.get("new").unwrap_or(&0),
    );
    assert_eq!(verified, lbas.len() as u64);
    drop(gws);
    drop(nodes);
    drop(etcds);
}
