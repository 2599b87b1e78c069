//! Reed-Solomon codec throughput on one core.
//!
//! For each codec this build has, and each chunk (shard) size, it measures:
//!
//! - `encode`: `k` data chunks in, `m` parity chunks out;
//! - `rebuild-1`: data chunk 0 lost, rebuilt from the `k` others that remain;
//! - `rebuild-2`: data chunks 0 and 1 lost (only with `m >= 2`).
//!
//! Throughput is the stripe's data (`k × chunk` bytes) per second of one thread, in GB/s
//! (10^9 bytes). Every codec's output is checked once per cell (rebuilt chunks equal the
//! originals), and the reed-solomon-erasure rows print a checksum of the parity they computed
//! so that bench/codec.sh can check the pure-Rust and SIMD builds agree byte for byte.
//!
//! Usage: `tessera-codec-bench [--header] [--ec K+M] [--seconds S]`.

use std::hint::black_box;
use std::time::{Duration, Instant};

const SIZES: [usize; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];

struct Args {
    header: bool,
    k: usize,
    m: usize,
    secs: f64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        header: false,
        k: 4,
        m: 2,
        secs: 0.3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--header" => a.header = true,
            "--ec" => {
                let v = it.next().ok_or("--ec needs K+M")?;
                let (k, m) = v.split_once('+').ok_or("--ec wants K+M, like 4+2")?;
                a.k = k.parse().map_err(|_| format!("bad k in {v}"))?;
                a.m = m.parse().map_err(|_| format!("bad m in {v}"))?;
                if !(1..=16).contains(&a.k) || !(1..=4).contains(&a.m) {
                    return Err(format!("--ec {v}: k must be 1..=16 and m 1..=4"));
                }
            }
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a number")?;
                a.secs = v.parse().map_err(|_| format!("bad --seconds {v}"))?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Deterministic pseudo-random bytes (xorshift), so every codec and build sees the same data.
fn fill(buf: &mut [u8], mut seed: u64) {
    for b in buf.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let w = seed.to_le_bytes();
        b.copy_from_slice(&w[..b.len()]);
    }
}

fn stripe(k: usize, chunk: usize) -> Vec<Vec<u8>> {
    (0..k)
        .map(|i| {
            let mut v = vec![0u8; chunk];
            fill(&mut v, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            v
        })
        .collect()
}

/// Run `f` repeatedly for about `secs`; operations per second.
fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    // Warm up (page faults, tables, caches).
    for _ in 0..3 {
        f();
    }
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    let mut batch = 1u64;
    loop {
        for _ in 0..batch {
            f();
        }
        n += batch;
        let el = start.elapsed();
        if el >= budget {
            return n as f64 / el.as_secs_f64();
        }
        batch = (batch * 2).min(1 << 14);
    }
}

/// One codec: how it encodes and rebuilds lost data chunks.
trait Bench {
    fn name(&self) -> String;
    fn encode(&mut self, data: &[Vec<u8>], parity: &mut [Vec<u8>]);
    /// Rebuild data chunks `lost` (their buffers in `shards` are garbage) from the rest.
    fn rebuild(&mut self, shards: &mut [Vec<u8>], lost: &[usize]);
}

struct Rse {
    rs: reed_solomon_erasure::galois_8::ReedSolomon,
}

impl Bench for Rse {
    fn name(&self) -> String {
        if cfg!(feature = "simd") {
            "reed-solomon-erasure simd-accel".into()
        } else {
            "reed-solomon-erasure pure Rust".into()
        }
    }
    fn encode(&mut self, data: &[Vec<u8>], parity: &mut [Vec<u8>]) {
        self.rs.encode_sep(data, parity).expect("rse encode");
    }
    fn rebuild(&mut self, shards: &mut [Vec<u8>], lost: &[usize]) {
        let mut v: Vec<(&mut [u8], bool)> = shards
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (s.as_mut_slice(), !lost.contains(&i)))
            .collect();
        self.rs.reconstruct_data(&mut v).expect("rse rebuild");
    }
}

#[cfg(feature = "others")]
struct RsSimd {
    k: usize,
    m: usize,
}

#[cfg(feature = "others")]
impl Bench for RsSimd {
    fn name(&self) -> String {
        "reed-solomon-simd".into()
    }
    fn encode(&mut self, data: &[Vec<u8>], parity: &mut [Vec<u8>]) {
        let out = reed_solomon_simd::encode(self.k, self.m, data).expect("rss encode");
        for (p, o) in parity.iter_mut().zip(out) {
            p.copy_from_slice(&o);
        }
    }
    fn rebuild(&mut self, shards: &mut [Vec<u8>], lost: &[usize]) {
        let k = self.k;
        let original = (0..k)
            .filter(|i| !lost.contains(i))
            .map(|i| (i, &shards[i]));
        let recovery = (0..self.m).map(|j| (j, &shards[k + j]));
        let restored =
            reed_solomon_simd::decode(k, self.m, original, recovery).expect("rss decode");
        for (i, data) in restored {
            shards[i].copy_from_slice(&data);
        }
    }
}

#[cfg(feature = "others")]
struct Isal {
    ec: erasure_isa_l::erasure::ErasureCode,
    k: usize,
    tables: Vec<(Vec<usize>, erasure_isa_l::erasure::DecodeTable)>,
}

#[cfg(feature = "others")]
impl Bench for Isal {
    fn name(&self) -> String {
        "ISA-L (libisal 2.30)".into()
    }
    fn encode(&mut self, data: &[Vec<u8>], parity: &mut [Vec<u8>]) {
        self.ec.encode(data, parity).expect("isal encode");
    }
    fn rebuild(&mut self, shards: &mut [Vec<u8>], lost: &[usize]) {
        // A gateway would keep the decode table of each loss pattern; so does this.
        if !self.tables.iter().any(|(l, _)| l == lost) {
            let t = self
                .ec
                .make_decode_table(lost.to_vec())
                .expect("isal decode table");
            self.tables.push((lost.to_vec(), t));
        }
        let table = &self
            .tables
            .iter()
            .find(|(l, _)| l == lost)
            .expect("table")
            .1;
        let (data, code) = shards.split_at_mut(self.k);
        self.ec
            .decode_with_table(data, code, table, lost.to_vec())
            .expect("isal decode");
    }
}

fn codecs(k: usize, m: usize) -> Vec<Box<dyn Bench>> {
    #[cfg_attr(not(feature = "others"), allow(unused_mut))]
    let mut v: Vec<Box<dyn Bench>> = vec![Box::new(Rse {
        rs: reed_solomon_erasure::galois_8::ReedSolomon::new(k, m).expect("rse profile"),
    })];
    #[cfg(feature = "others")]
    {
        use std::num::NonZeroUsize;
        v.push(Box::new(RsSimd { k, m }));
        let nz = |n: usize| NonZeroUsize::new(n).expect("non-zero");
        v.push(Box::new(Isal {
            ec: erasure_isa_l::erasure::ErasureCode::with_reed_solomon(nz(k), nz(m))
                .expect("isal profile"),
            k,
            tables: Vec::new(),
        }));
    }
    v
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tessera-codec-bench: {e}");
            std::process::exit(2);
        }
    };
    let (k, m) = (a.k, a.m);
    if a.header {
        let sizes: Vec<String> = SIZES.iter().map(|s| format!("{:>8}", kib(*s))).collect();
        println!(
            "| RS {k}+{m}, GB/s of data per core | op        | {} | parity crc32c |",
            sizes.join(" | ")
        );
        println!("|---|---|{}---|", "---:|".repeat(SIZES.len()));
    }
    let mut ops = vec![("encode", Vec::new()), ("rebuild-1", vec![0usize])];
    if m >= 2 {
        ops.push(("rebuild-2", vec![0, 1]));
    }
    for mut c in codecs(k, m) {
        for (op, lost) in &ops {
            let mut cells = Vec::new();
            let mut digest = 0u32;
            for &chunk in &SIZES {
                let data = stripe(k, chunk);
                let mut parity = vec![vec![0u8; chunk]; m];
                c.encode(&data, &mut parity);
                digest = parity
                    .iter()
                    .fold(digest, |d, p| crc32c::crc32c_append(d, p));
                let r = if lost.is_empty() {
                    rate(a.secs, || {
                        c.encode(black_box(&data), &mut parity);
                    })
                } else {
                    let mut shards: Vec<Vec<u8>> =
                        data.iter().chain(parity.iter()).cloned().collect();
                    let r = rate(a.secs, || {
                        for &i in lost {
                            shards[i][0] ^= 0xff;
                        }
                        c.rebuild(black_box(&mut shards), lost);
                    });
                    for &i in lost {
                        assert_eq!(shards[i], data[i], "{} rebuilt chunk {i} wrong", c.name());
                    }
                    r
                };
                cells.push(format!("{:>8.2}", r * (k * chunk) as f64 / 1e9));
            }
            let crc = if *op == "encode" && c.name().starts_with("reed-solomon-erasure") {
                format!("{digest:08x}")
            } else {
                "-".into()
            };
            println!(
                "| {:<32} | {:<9} | {} | {crc} |",
                c.name(),
                op,
                cells.join(" | ")
            );
        }
    }
}

fn kib(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}
