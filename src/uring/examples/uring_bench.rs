//! Micro-benchmark of the io_uring engine: 4 KiB random reads and writes at QD1 and QD32 on
//! tmpfs (/dev/shm) and on the default tmpdir (ext4 here), buffered and O_DIRECT, through the
//! engine with several ring configurations and through plain synchronous pread/pwrite.
//!
//! Run pinned to one core, in release mode:
//!
//! ```text
//! taskset -c 0 cargo run --release -p tessera-uring --example uring_bench
//! ```
//!
//! Environment: `BENCH_SECS` (seconds per cell, default 1), `BENCH_MIB` (file size, default
//! 256), `BENCH_DIRS` (comma-separated `name=path` list, default `tmpfs=/dev/shm,ext4=$TMPDIR`).

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tessera_uring::{AlignedBuf, EngineConfig, EngineMode, FlushPolicy, RwFlags, SharedFd, Uring};

const BS: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy)]
enum Engine {
    /// Plain pread/pwrite on the thread.
    Sync,
    /// The io_uring engine with a named configuration.
    Ring(&'static str, fn() -> EngineConfig),
}

fn cfg_default() -> EngineConfig {
    EngineConfig {
        mode: EngineMode::Uring,
        ..EngineConfig::default()
    }
}

fn cfg_immediate() -> EngineConfig {
    EngineConfig {
        flush: FlushPolicy::Immediate,
        ..cfg_default()
    }
}

fn cfg_defer() -> EngineConfig {
    EngineConfig {
        defer_taskrun: true,
        ..cfg_default()
    }
}

fn cfg_plain() -> EngineConfig {
    EngineConfig {
        coop_taskrun: false,
        single_issuer: false,
        ..cfg_default()
    }
}

/// CPU time of the whole process (all threads, including io_uring workers), in seconds.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn open(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path)
}

/// IOPS of plain synchronous calls on this thread.
fn run_sync(file: &File, op: Op, blocks: u64, secs: f64) -> (f64, f64) {
    let mut buf = AlignedBuf::new(BS as usize);
    buf.fill(0x5a);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let cpu0 = process_cpu();
    let mut n = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let off = rng.next() % blocks * BS;
            let r = match op {
                Op::Read => file.read_at(&mut buf, off),
                Op::Write => file.write_at(&buf, off),
            };
            if let Err(e) = r {
                panic!("sync I/O failed: {e}");
            }
            n += 1;
        }
    }
    (
        n as f64 / start.elapsed().as_secs_f64(),
        (process_cpu() - cpu0) * 1e6 / n as f64,
    )
}

/// IOPS through the engine with `qd` tasks on one current-thread runtime + LocalSet. Runs on a
/// fresh thread so the ring gets the configuration.
fn run_ring(
    path: PathBuf,
    direct: bool,
    cfg: EngineConfig,
    op: Op,
    qd: usize,
    blocks: u64,
    secs: f64,
) -> Option<(f64, f64, f64)> {
    std::thread::spawn(move || {
        let ring = match Uring::init_current(&cfg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skip {:?}: {e}", cfg);
                return None;
            }
        };
        let fd = SharedFd::from(open(&path, direct).expect("open"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        let done = Rc::new(Cell::new(0u64));
        let start = Instant::now();
        let cpu0 = process_cpu();
        let deadline = start + Duration::from_secs_f64(secs);
        local.block_on(&rt, async {
            let tasks: Vec<_> = (0..qd)
                .map(|t| {
                    let (ring, fd, done) = (ring.clone(), fd.clone(), done.clone());
                    tokio::task::spawn_local(async move {
                        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x1000_0001));
                        let mut buf = AlignedBuf::new(BS as usize);
                        buf.fill(0x5a);
                        while Instant::now() < deadline {
                            let off = rng.next() % blocks * BS;
                            let (r, b) = match op {
                                Op::Read => ring.read_at(&fd, buf, off).await,
                                Op::Write => ring.write_at(&fd, buf, off, RwFlags::NONE).await,
                            };
                            buf = b;
                            if let Err(e) = r {
                                panic!("ring I/O failed: {e}");
                            }
                            done.set(done.get() + 1);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("bench task");
            }
        });
        let iops = done.get() as f64 / start.elapsed().as_secs_f64();
        let cpu = (process_cpu() - cpu0) * 1e6 / done.get().max(1) as f64;
        let s = ring.stats();
        Some((iops, cpu, s.ring_ops as f64 / s.enters.max(1) as f64))
    })
    .join()
    .expect("bench thread")
}

fn prepare(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join(format!("tessera-uring-bench-{}", std::process::id()));
    let f = File::create(&path).expect("create bench file");
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..mib {
        f.write_all_at(&chunk, i << 20).expect("fill bench file");
    }
    f.sync_all().expect("sync bench file");
    path
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let mib: u64 = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dirs: Vec<(String, PathBuf)> = match std::env::var("BENCH_DIRS") {
        Ok(s) => s
            .split(',')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            })
            .collect(),
        Err(_) => vec![
            ("tmpfs".into(), "/dev/shm".into()),
            ("ext4".into(), std::env::temp_dir()),
        ],
    };
    let blocks = mib * (1 << 20) / BS;
    let engines = [
        Engine::Sync,
        Engine::Ring("ring", cfg_default),
        Engine::Ring("ring-immediate", cfg_immediate),
        Engine::Ring("ring-defer", cfg_defer),
        Engine::Ring("ring-noflags", cfg_plain),
    ];
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    println!("4 KiB random I/O, {mib} MiB file, {secs} s per cell; CPU = process CPU µs per op");
    println!();
    println!("| fs | mode | op | engine | QD1 IOPS | QD1 µs | QD1 CPU | QD32 IOPS | QD32 CPU | ops/enter @QD32 |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, dir) in &dirs {
        let path = prepare(dir, mib);
        for direct in [false, true] {
            if direct && open(&path, true).is_err() {
                println!("| {name} | O_DIRECT | - | refused by the file system | | | | |");
                continue;
            }
            let mode = if direct { "O_DIRECT" } else { "buffered" };
            for op in [Op::Read, Op::Write] {
                let opn = if op == Op::Read {
                    "randread"
                } else {
                    "randwrite"
                };
                for e in engines {
                    let label = match e {
                        Engine::Sync => "pread/pwrite",
                        Engine::Ring(l, _) => l,
                    };
                    let cell = format!("{name} {mode} {opn} {label}");
                    if !filter.split(',').all(|f| cell.contains(f)) {
                        continue;
                    }
                    match e {
                        Engine::Sync => {
                            let f = open(&path, direct).expect("open");
                            let (iops, cpu) = run_sync(&f, op, blocks, secs);
                            println!(
                                "| {name} | {mode} | {opn} | {label} | {iops:.0} | {:.1} | {cpu:.1} | — | — | — |",
                                1e6 / iops
                            );
                        }
                        Engine::Ring(_, cfg) => {
                            let q1 = run_ring(path.clone(), direct, cfg(), op, 1, blocks, secs);
                            let q32 = run_ring(path.clone(), direct, cfg(), op, 32, blocks, secs);
                            if let (Some((i1, c1, _)), Some((i32_, c32, b32))) = (q1, q32) {
                                println!(
                                    "| {name} | {mode} | {opn} | {label} | {i1:.0} | {:.1} | {c1:.1} | {i32_:.0} | {c32:.1} | {b32:.1} |",
                                    1e6 / i1
                                );
                            }
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}
