//! What one hung storage node costs an erasure-coded volume.
//!
//! Starts `tessera demo --backend ec` (nodes' stores on tmpfs), fills the volume with random
//! bytes, then for 4 KiB random reads and 4 KiB random writes at a queue depth of 32: runs
//! `--seconds` healthy, stops one node with SIGSTOP (its sockets stay open, it answers
//! nothing), runs `--seconds` more from that moment, and resumes it (SIGCONT). Prints one table:
//! IOPS healthy and hung and their ratio, the worst second while hung, the slowest command, and
//! the CPU time per I/O of the demo's processes (gateway, nodes, etcd) and of this client.
//!
//! The client is this program: one iSCSI session keeping `--qd` commands in flight (the test
//! initiator of `tessera-integration-tests`, pipelined).
//!
//! Usage: `cargo run --release -p tessera-bench --bin hung_node -- [--seconds 10] [--qd 32]
//! [--size 1GiB] [--ec 4+2] [--node 2]` (`TESSERA_BIN` names the binary, default
//! target/release/tessera).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tessera_integration_tests::initiator::{Answer, Session};
use tessera_integration_tests::{Demo, Rng};

struct Args {
    seconds: u64,
    qd: usize,
    size: String,
    ec: String,
    node: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        seconds: 10,
        qd: 32,
        size: "1GiB".into(),
        ec: "4+2".into(),
        node: 2,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--qd" => a.qd = v.parse().expect("--qd N"),
            "--size" => a.size = v,
            "--ec" => a.ec = v,
            "--node" => a.node = v.parse().expect("--node N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn size_bytes(s: &str) -> u64 {
    let (n, mult) = match s {
        x if x.ends_with("GiB") => (&x[..x.len() - 3], 1u64 << 30),
        x if x.ends_with("MiB") => (&x[..x.len() - 3], 1 << 20),
        x => (x, 1),
    };
    n.parse::<u64>().expect("a size") * mult
}

/// CPU time (user + system) of a process and its threads, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    num(11) + num(12)
}

fn ticks_per_sec() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

fn rw16(write: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Fill the volume with random bytes, 64 KiB per command (the first burst: the data goes as
/// immediate data), 16 in flight.
fn fill(s: &mut Session, size: u64, demo: &Demo) {
    let chunk = 64 << 10;
    let mut r = Rng::new(0xf111);
    let data: Vec<u8> = (0..chunk / 8)
        .flat_map(|_| r.next_u64().to_le_bytes())
        .collect();
    let mut off = 0u64;
    let mut inflight = 0;
    while off < size || inflight > 0 {
        while inflight < 16 && off < size {
            // Each command's bytes differ: its offset in the first 8 bytes.
            let mut d = data.clone();
            d[..8].copy_from_slice(&off.to_le_bytes());
            s.send_command(0, &rw16(true, off / 512, (chunk / 512) as u32), &d, 0)
                .expect("send");
            off += chunk as u64;
            inflight += 1;
        }
        match s.next_answer().expect("answer") {
            Answer::Command(_, o) => {
                if o.status != 0 {
                    let log = demo.log();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "fill write failed: {o:?}; the demo's log ends:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                inflight -= 1;
            }
            Answer::TaskMgmt(..) | Answer::Nop(_) => {}
        }
    }
}

#[derive(Debug, Default)]
struct Run {
    /// Completions per second of the run.
    per_second: Vec<u64>,
    /// The slowest command.
    max_latency: Duration,
    errors: u64,
    ios: u64,
}

/// 4 KiB random reads or writes at `qd` for `secs`; `at_start` runs once the load is going.
fn load(
    s: &mut Session,
    size: u64,
    write: bool,
    qd: usize,
    secs: u64,
    seed: u64,
    at_start: impl FnOnce(),
) -> Run {
    let mut r = Rng::new(seed);
    let data: Vec<u8> = (0..512).flat_map(|_| r.next_u64().to_le_bytes()).collect();
    let blocks = size / 4096;
    let mut sent: HashMap<u32, Instant> = HashMap::new();
    let mut run = Run {
        per_second: vec![0; secs as usize],
        ..Run::default()
    };
    let mut at_start = Some(at_start);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    loop {
        let now = Instant::now();
        if now < end {
            while sent.len() < qd {
                let lba = r.below(blocks) * 8;
                let out: &[u8] = if write { &data } else { &[] };
                let (itt, _) = s
                    .send_command(0, &rw16(write, lba, 8), out, if write { 0 } else { 4096 })
                    .expect("send");
                sent.insert(itt, Instant::now());
            }
            if let Some(f) = at_start.take() {
                f();
            }
        } else if sent.is_empty() {
            break;
        }
        let Answer::Command(itt, o) = s.next_answer().expect("answer") else {
            continue;
        };
        let Some(t) = sent.remove(&itt) else { continue };
        let done = Instant::now();
        run.max_latency = run.max_latency.max(done - t);
        if o.status != 0 {
            run.errors += 1;
            continue;
        }
        let sec = (done - start).as_secs() as usize;
        if sec < run.per_second.len() {
            run.per_second[sec] += 1;
            run.ios += 1;
        }
    }
    run
}

fn main() {
    let a = parse_args();
    let size = size_bytes(&a.size);
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
    eprintln!(
        "[hung_node] starting tessera demo --backend ec --ec {} --size {}",
        a.ec, a.size
    );
    let demo = Demo::start_in(dir, &["--backend", "ec", "--ec", &a.ec, "--size", &a.size]);
    let node = demo.nodes()[a.node].clone();
    let pids = demo.process_pids();
    let mut s = Session::open(
        demo.portal,
        "iqn.2024-01.io.tessera:bench",
        &demo.iqn,
        [0x80, 0, 0, 0, 0, 7],
    );
    eprintln!("[hung_node] filling {} with random bytes", a.size);
    let t = Instant::now();
    fill(&mut s, size, &demo);
    // Once more: a node's second copy of every fragment is allocated by its second write, which
    // the measured writes should not pay for.
    fill(&mut s, size, &demo);
    eprintln!(
        "[hung_node] filled twice in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = load(&mut s, size, false, a.qd, 2, 1, || {});
    let hz = ticks_per_sec() as f64;
    let cpu = |pids: &[u32]| -> u64 { pids.iter().map(|&p| cpu_ticks(p)).sum() };
    let me = std::process::id();
    println!(
        "| workload (QD{}) | healthy IOPS | hung IOPS ({} s from SIGSTOP) | ratio | worst second | slowest command healthy / hung | errors | CPU µs/IO healthy: targets + client | hung: targets + client |",
        a.qd, a.seconds
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, write) in [("4k-randread", false), ("4k-randwrite", true)] {
        let (c0, m0) = (cpu(&pids), cpu_ticks(me));
        let healthy = load(&mut s, size, write, a.qd, a.seconds, 2, || {});
        let (c1, m1) = (cpu(&pids), cpu_ticks(me));
        eprintln!("[hung_node] {name}: healthy {:?}", healthy.per_second);
        let pid = node.pid as i32;
        let hung = load(&mut s, size, write, a.qd, a.seconds, 3, || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            );
        });
        let (c2, m2) = (cpu(&pids), cpu_ticks(me));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGCONT,
        );
        eprintln!("[hung_node] {name}: hung {:?}", hung.per_second);
        let per_io = |ticks: u64, ios: u64| ticks as f64 / hz * 1e6 / ios.max(1) as f64;
        let h = healthy.ios as f64 / a.seconds as f64;
        let g = hung.ios as f64 / a.seconds as f64;
        println!(
            "| {name} | {h:.0} | {g:.0} | {:.2} | {} | {:.1} / {:.1} ms | {} / {} | {:.0} + {:.0} | {:.0} + {:.0} |",
            g / h.max(1.0),
            hung.per_second.iter().min().copied().unwrap_or(0),
            healthy.max_latency.as_secs_f64() * 1e3,
            hung.max_latency.as_secs_f64() * 1e3,
            healthy.errors,
            hung.errors,
            per_io(c1 - c0, healthy.ios),
            per_io(m1 - m0, healthy.ios),
            per_io(c2 - c1, hung.ios),
            per_io(m2 - m1, hung.ios),
        );
        // Let the node catch up before the next workload.
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(demo.stop(), "the demo stopped cleanly");
}
