//! `FileDevice` tests on ext4 (the default tmpdir) and tmpfs (/dev/shm), with io_uring and the
//! synchronous fallback.

use std::fs::{metadata, File};
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Waker};

use super::*;
use tessera_uring::testing::{engine, pattern, run, tmpdir};
use tessera_uring::EngineMode;

const MIB: u64 = 1 << 20;

/// Options for a device of `size` bytes that uses the thread's engine (io_uring or the forced
/// synchronous fallback) even on tmpfs.
fn opts(size: u64, direct: DirectMode, block_size: u32) -> FileOptions {
    FileOptions {
        size_bytes: Some(size),
        direct,
        block_size,
        io: IoPath::Ring,
        ..FileOptions::default()
    }
}

/// A model of the device: what every byte should read as.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, off: u64, data: &[u8]) {
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.0[off as usize..(off + len) as usize].fill(0);
    }
    async fn check(&self, dev: &FileDevice) {
        let got = dev.read(0, self.0.len()).await.expect("read whole device");
        assert!(
            got[..] == self.0[..],
            "device content differs from the model"
        );
    }
}

/// Writes of every size from one block up, at block-aligned offsets, then read back in
/// differently-shaped pieces.
async fn exercise(dev: &FileDevice, bs: u64) {
    let size = dev.info().size_bytes;
    let mut model = Model(vec![0u8; size as usize]);
    let mut seed = 1;
    for &(blk, nblk) in &[
        (0u64, 1u64),
        (1, 1),
        (3, 2),
        (7, 9),
        (16, 8),
        (31, 1),
        (40, 64),
        (2, 3),
    ] {
        let data = pattern(seed, (nblk * bs) as usize);
        seed += 1;
        dev.write(blk * bs, Bytes::from(data.clone()), seed % 3 == 0)
            .await
            .expect("write");
        model.write(blk * bs, &data);
    }
    // A write whose memory is not page-aligned (an offset into a larger Bytes).
    let big = Bytes::from(pattern(77, (4 * bs + 1) as usize));
    let odd = big.slice(1..);
    dev.write(100 * bs, odd.clone(), false)
        .await
        .expect("misaligned-memory write");
    model.write(100 * bs, &odd);
    dev.flush().await.expect("flush");
    model.check(dev).await;
    for (blk, nblk) in [(1u64, 1u64), (3, 5), (39, 3), (101, 2)] {
        let got = dev
            .read(blk * bs, (nblk * bs) as usize)
            .await
            .expect("read");
        assert_eq!(
            &got[..],
            &model.0[(blk * bs) as usize..((blk + nblk) * bs) as usize]
        );
    }
}

fn direct_available(dir: &Path) -> bool {
    let p = dir.join("probe");
    match FileDevice::open(&p, opts(MIB, DirectMode::On, 4096)) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP O_DIRECT in {}: {e}", dir.display());
            false
        }
    }
}

fn read_after_write(mode: EngineMode) {
    let Some(ring) = engine(mode) else { return };
    for shm in [false, true] {
        let dir = tmpdir(shm);
        let can_direct = direct_available(dir.path());
        for (direct, io) in [
            (DirectMode::Off, IoPath::Ring),
            (DirectMode::Auto, IoPath::Auto),
            (DirectMode::Auto, IoPath::Ring),
            (DirectMode::On, IoPath::Ring),
        ] {
            if direct == DirectMode::On && !can_direct {
                continue;
            }
            for bs in [512u32, 4096] {
                let path = dir.path().join(format!("{direct:?}-{io:?}-{bs}"));
                let dev = FileDevice::open(
                    &path,
                    FileOptions {
                        io,
                        ..opts(4 * MIB, direct, bs)
                    },
                )
                .expect("open");
                // Auto skips O_DIRECT on tmpfs, where it bypasses nothing.
                let want_direct = match direct {
                    DirectMode::Off => false,
                    DirectMode::Auto => can_direct && !shm,
                    DirectMode::On => true,
                };
                assert_eq!(dev.info().direct, want_direct);
                assert_eq!(dev.is_sync_io(), io == IoPath::Auto && shm);
                eprintln!(
                    "{} {direct:?} {io:?} bs {bs}: dio alignment {:?}, thin {}, granularity {}",
                    if shm { "tmpfs" } else { "ext4" },
                    dev.dio_alignment(),
                    dev.info().thin,
                    dev.info().unmap_granularity
                );
                run(exercise(&dev, u64::from(bs)));
            }
        }
    }
    let s = ring.stats();
    assert!(
        if mode == EngineMode::Sync {
            s.ring_ops == 0 && s.sync_ops > 0
        } else {
            s.ring_ops > 0 && s.sync_ops == 0
        },
        "{s:?}"
    );
}

#[test]
fn read_after_write_uring() {
    read_after_write(EngineMode::Uring);
}

#[test]
fn read_after_write_sync_fallback() {
    read_after_write(EngineMode::Sync);
}

/// 512-byte LBAs on a device whose direct-I/O alignment is 4096 (forced with `min_dio_align`):
/// reads slice the enclosing aligned range, writes read-modify-write the edges, and many
/// concurrent writes into the same 4 KiB units keep each other's data.
fn unaligned_small_requests(mode: EngineMode, shm: bool) {
    let Some(_ring) = engine(mode) else { return };
    let dir = tmpdir(shm);
    if !direct_available(dir.path()) {
        return;
    }
    let o = FileOptions {
        min_dio_align: Some(4096),
        ..opts(MIB, DirectMode::On, 512)
    };
    let dev = FileDevice::open(dir.path().join("u"), o).expect("open");
    assert_eq!(dev.dio_alignment(), Some(4096));
    run(async {
        let mut model = Model(vec![0u8; MIB as usize]);
        for (i, &(off, len)) in [
            (512u64, 512u64),
            (3584, 1024),
            (8192 + 1024, 8192),
            (20480, 512),
            (4096 * 9 - 512, 512),
        ]
        .iter()
        .enumerate()
        {
            let data = pattern(i as u64, len as usize);
            dev.write(off, Bytes::from(data.clone()), i % 2 == 0)
                .await
                .expect("unaligned write");
            model.write(off, &data);
            let got = dev.read(off, len as usize).await.expect("unaligned read");
            assert_eq!(&got[..], &data[..]);
        }
        model.check(&dev).await;

        // 256 single-sector writes in flight at once, 8 per 4 KiB unit.
        let dev = std::rc::Rc::new(dev);
        let handles: Vec<_> = (0..256u64)
            .map(|i| {
                let dev = dev.clone();
                tokio::task::spawn_local(async move {
                    let sector = (i * 37) % 256 + 256;
                    dev.write(sector * 512, Bytes::from(pattern(1000 + i, 512)), false)
                        .await
                        .expect("write");
                })
            })
            .collect();
        for h in handles {
            h.await.expect("join");
        }
        for i in 0..256u64 {
            let sector = (i * 37) % 256 + 256;
            model.write(sector * 512, &pattern(1000 + i, 512));
        }
        model.check(&dev).await;

        // Unmap with sub-unit edges.
        dev.unmap(512 * 3, 4096 * 4).await.expect("unmap");
        model.zero(512 * 3, 4096 * 4);
        model.check(&dev).await;
    });
}

#[test]
fn unaligned_small_requests_ext4_uring() {
    unaligned_small_requests(EngineMode::Uring, false);
}

#[test]
fn unaligned_small_requests_tmpfs_uring() {
    unaligned_small_requests(EngineMode::Uring, true);
}

#[test]
fn unaligned_small_requests_sync_fallback() {
    unaligned_small_requests(EngineMode::Sync, false);
}

/// Many concurrent reads and writes through the device from one LocalSet.
#[test]
fn many_concurrent_device_ops() {
    let Some(ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let dev = std::rc::Rc::new(
        FileDevice::open(dir.path().join("c"), opts(4 * MIB, DirectMode::Auto, 4096))
            .expect("open"),
    );
    run(async {
        let before = ring.stats();
        let writes: Vec<_> = (0..256u64)
            .map(|i| {
                let dev = dev.clone();
                tokio::task::spawn_local(async move {
                    dev.write(i * 8192, Bytes::from(pattern(i, 8192)), false)
                        .await
                })
            })
            .collect();
        for w in writes {
            w.await.expect("join").expect("write");
        }
        let reads: Vec<_> = (0..256u64)
            .map(|i| {
                let dev = dev.clone();
                tokio::task::spawn_local(async move {
                    let got = dev.read(i * 8192, 8192).await.expect("read");
                    assert_eq!(&got[..], &pattern(i, 8192)[..]);
                })
            })
            .collect();
        for r in reads {
            r.await.expect("join");
        }
        let after = ring.stats();
        assert!(
            after.enters - before.enters < 64,
            "512 ops used {} enters",
            after.enters - before.enters
        );
    });
}

/// Unmap punches holes in whole file-system blocks and zeroes the partial edges; extents
/// report the hole; the rest of the data is intact.
fn punch_hole_extents(mode: EngineMode) {
    let Some(_ring) = engine(mode) else { return };
    for shm in [false, true] {
        let dir = tmpdir(shm);
        let dev =
            FileDevice::open(dir.path().join("t"), opts(MIB, DirectMode::Auto, 512)).expect("open");
        assert!(dev.info().thin, "ext4 and tmpfs punch holes");
        let g = u64::from(dev.info().unmap_granularity);
        assert_eq!(g, 4096);
        run(async {
            assert_eq!(
                dev.extents(0, MIB).await.expect("extents"),
                vec![Extent {
                    offset: 0,
                    len: MIB,
                    mapped: false
                }]
            );
            let mut model = Model(vec![0u8; MIB as usize]);
            let data = pattern(5, 256 * 1024);
            dev.write(0, Bytes::from(data.clone()), false)
                .await
                .expect("write");
            model.write(0, &data);
            dev.flush().await.expect("flush");
            // [3 * 512, 3 * 512 + 40 KiB): edges 1536..4096 and 40960..44544 are partial.
            let (off, len) = (1536u64, 40960u64);
            dev.unmap(off, len).await.expect("unmap");
            model.zero(off, len);
            model.check(&dev).await;
            let ext = dev.extents(0, MIB).await.expect("extents");
            assert_eq!(
                ext,
                vec![
                    Extent {
                        offset: 0,
                        len: 4096,
                        mapped: true
                    },
                    Extent {
                        offset: 4096,
                        len: 40960 - 4096,
                        mapped: false
                    },
                    Extent {
                        offset: 40960,
                        len: 256 * 1024 - 40960,
                        mapped: true
                    },
                    Extent {
                        offset: 256 * 1024,
                        len: MIB - 256 * 1024,
                        mapped: false
                    },
                ],
                "on {}",
                if shm { "tmpfs" } else { "ext4" }
            );
            // A window that starts inside a hole and ends inside data.
            let ext = dev.extents(8192, 40960).await.expect("extents");
            assert_eq!(
                ext,
                vec![
                    Extent {
                        offset: 8192,
                        len: 32768,
                        mapped: false
                    },
                    Extent {
                        offset: 40960,
                        len: 8192,
                        mapped: true
                    }
                ]
            );
            // Unmap smaller than a block only zeroes.
            dev.unmap(65536 + 512, 1024).await.expect("small unmap");
            model.zero(65536 + 512, 1024);
            model.check(&dev).await;
            assert_eq!(
                dev.extents(65536, 4096).await.expect("extents"),
                vec![Extent {
                    offset: 65536,
                    len: 4096,
                    mapped: true
                }]
            );
            // Zero-length requests are no-ops.
            dev.unmap(0, 0).await.expect("empty unmap");
            assert!(dev.read(0, 0).await.expect("empty read").is_empty());
        });
    }
}

#[test]
fn punch_hole_extents_uring() {
    punch_hole_extents(EngineMode::Uring);
}

#[test]
fn punch_hole_extents_sync_fallback() {
    punch_hole_extents(EngineMode::Sync);
}

#[test]
fn read_only_refuses_writes() {
    let Some(_ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let path = dir.path().join("ro");
    run(async {
        let dev = FileDevice::open(&path, opts(MIB, DirectMode::Auto, 512)).expect("create");
        dev.write(4096, Bytes::from(pattern(1, 4096)), true)
            .await
            .expect("write");
    });
    let ro = FileOptions {
        read_only: true,
        ..opts(MIB, DirectMode::Auto, 512)
    };
    let dev = FileDevice::open(&path, ro).expect("open read-only");
    assert!(!dev.info().thin);
    run(async {
        assert_eq!(
            dev.write(0, Bytes::from(vec![1u8; 512]), false).await,
            Err(BlockError::ReadOnly)
        );
        assert_eq!(dev.unmap(0, 4096).await, Err(BlockError::ReadOnly));
        assert_eq!(dev.flush().await, Ok(()));
        assert_eq!(
            &dev.read(4096, 4096).await.expect("read")[..],
            &pattern(1, 4096)[..]
        );
    });
    // Read-only never creates or extends.
    let err = FileDevice::open(
        dir.path().join("missing"),
        FileOptions {
            read_only: true,
            ..opts(MIB, DirectMode::Auto, 512)
        },
    );
    assert!(matches!(err, Err(OpenError::Io { .. })), "{err:?}");
    let err = FileDevice::open(
        &path,
        FileOptions {
            read_only: true,
            ..opts(2 * MIB, DirectMode::Auto, 512)
        },
    );
    assert!(
        matches!(err, Err(OpenError::TooSmall { have, want, .. }) if have == MIB && want == 2 * MIB),
        "{err:?}"
    );
}

#[test]
fn size_create_extend_and_validation() {
    let dir = tmpdir(false);
    let path = dir.path().join("s");
    let dev = FileDevice::open(&path, opts(MIB, DirectMode::Auto, 4096)).expect("create");
    assert_eq!(dev.info().size_bytes, MIB);
    assert_eq!(metadata(&path).expect("stat").len(), MIB);
    drop(dev);
    let dev = FileDevice::open(&path, opts(3 * MIB, DirectMode::Auto, 4096)).expect("extend");
    assert_eq!(dev.info().size_bytes, 3 * MIB);
    assert_eq!(metadata(&path).expect("stat").len(), 3 * MIB);
    // Sparse: extending allocated nothing.
    assert!(metadata(&path).expect("stat").blocks() < 64);
    drop(dev);
    let dev = FileDevice::open(
        &path,
        FileOptions {
            size_bytes: None,
            ..FileOptions::default()
        },
    )
    .expect("existing size");
    assert_eq!(dev.info().size_bytes, 3 * MIB);
    drop(dev);
    // A smaller size exposes a prefix and never truncates.
    let dev = FileDevice::open(&path, opts(MIB, DirectMode::Auto, 512)).expect("prefix");
    assert_eq!(dev.info().size_bytes, MIB);
    assert_eq!(metadata(&path).expect("stat").len(), 3 * MIB);
    drop(dev);

    assert!(matches!(
        FileDevice::open(&path, opts(MIB + 512, DirectMode::Auto, 4096)),
        Err(OpenError::Size { .. })
    ));
    assert!(matches!(
        FileDevice::open(&path, opts(MIB, DirectMode::Auto, 1000)),
        Err(OpenError::BlockSize(1000))
    ));
    assert!(matches!(
        FileDevice::open(&path, opts(MIB, DirectMode::Auto, 256)),
        Err(OpenError::BlockSize(256))
    ));
    assert!(matches!(
        FileDevice::open(dir.path(), opts(MIB, DirectMode::Off, 512)),
        Err(OpenError::Io { .. } | OpenError::NotFileOrBlockDevice(_))
    ));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").expect("create empty");
    assert!(matches!(
        FileDevice::open(&empty, FileOptions::default()),
        Err(OpenError::Empty(_))
    ));
    assert!(matches!(
        FileDevice::open("/dev/null", FileOptions::default()),
        Err(OpenError::NotFileOrBlockDevice(_))
    ));
}

#[test]
fn out_of_range_and_fua_flush() {
    let Some(_ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let dev =
        FileDevice::open(dir.path().join("r"), opts(MIB, DirectMode::Auto, 512)).expect("open");
    run(async {
        assert_eq!(dev.read(MIB - 512, 1024).await, Err(BlockError::OutOfRange));
        assert_eq!(
            dev.read(u64::MAX - 10, 512).await,
            Err(BlockError::OutOfRange)
        );
        assert_eq!(
            dev.write(MIB, Bytes::from(vec![0u8; 512]), false).await,
            Err(BlockError::OutOfRange)
        );
        assert_eq!(
            dev.unmap(MIB - 512, 1024).await,
            Err(BlockError::OutOfRange)
        );
        assert_eq!(dev.extents(MIB, 1).await, Err(BlockError::OutOfRange));
        // The last block is reachable, with FUA.
        dev.write(MIB - 512, Bytes::from(pattern(9, 512)), true)
            .await
            .expect("fua write");
        dev.flush().await.expect("flush");
        assert_eq!(
            &dev.read(MIB - 512, 512).await.expect("read")[..],
            &pattern(9, 512)[..]
        );
    });
}

/// A write future dropped after submission: the engine keeps its buffer; the data lands.
#[test]
fn dropped_write_future_completes_safely() {
    let Some(ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let dev = FileDevice::open(dir.path().join("d"), opts(4 * MIB, DirectMode::Auto, 4096))
        .expect("open");
    run(async {
        {
            let mut fut = pin!(dev.write(0, Bytes::from(pattern(4, 2 * MIB as usize)), false));
            let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        }
        // Wait until the abandoned write has completed (nothing in flight).
        for _ in 0..2000 {
            tokio::task::yield_now().await;
            if ring.stats().ring_ops > 0
                && dev.read(0, 4096).await.expect("read")[..] == pattern(4, 4096)[..]
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let got = dev.read(0, 2 * MIB as usize).await.expect("read");
        assert!(got[..] == pattern(4, 2 * MIB as usize)[..]);
    });
}

/// A block device with 4 KiB sectors (a loop device), served with 512-byte blocks. Needs root
/// and `losetup`; skipped with a message otherwise.
#[test]
fn loop_block_device_4k_sectors() {
    let Some(_ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let backing = dir.path().join("backing");
    File::create(&backing)
        .and_then(|f| f.set_len(8 * MIB))
        .expect("backing file");
    let out = std::process::Command::new("losetup")
        .args([
            "--find",
            "--show",
            "--sector-size",
            "4096",
            "--direct-io=on",
        ])
        .arg(&backing)
        .output();
    let dev_path = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            eprintln!(
                "SKIP loop device test: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP loop device test: cannot run losetup: {e}");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }
    let _detach = Detach(dev_path.clone());
    let dev = FileDevice::open(
        &dev_path,
        FileOptions {
            block_size: 512,
            ..FileOptions::default()
        },
    )
    .expect("open loop device");
    assert!(dev.is_block_device());
    assert_eq!(dev.info().size_bytes, 8 * MIB);
    assert_eq!(dev.dio_alignment(), Some(4096));
    assert!(!dev.info().thin);
    run(async {
        let mut model = Model(vec![0u8; (8 * MIB) as usize]);
        for (i, &(off, len)) in [
            (0u64, 4096u64),
            (512, 512),
            (4096 * 3 + 1024, 8192),
            (MIB, 65536),
        ]
        .iter()
        .enumerate()
        {
            let data = pattern(50 + i as u64, len as usize);
            dev.write(off, Bytes::from(data.clone()), true)
                .await
                .expect("write");
            model.write(off, &data);
        }
        model.check(&dev).await;
        dev.unmap(MIB + 512, 32768).await.expect("unmap");
        model.zero(MIB + 512, 32768);
        model.check(&dev).await;
        dev.flush().await.expect("flush");
        assert_eq!(
            dev.extents(0, 8 * MIB).await.expect("extents"),
            vec![Extent {
                offset: 0,
                len: 8 * MIB,
                mapped: true
            }]
        );
    });
}
