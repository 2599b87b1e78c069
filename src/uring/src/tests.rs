//! Engine tests: both back ends (io_uring and the synchronous fallback) on ext4 and tmpfs.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::pin::pin;
use std::rc::Rc;
use std::task::Context;

use super::*;
use crate::testing::{engine, pattern, run, tmpdir};

fn open(path: &std::path::Path, direct: bool) -> SharedFd {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true).create(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    SharedFd::from(oo.open(path).expect("open test file"))
}

/// Run `test` with an engine of each mode (io_uring, then the synchronous fallback), each on
/// a thread of its own (the engine is per thread); a mode `engine` cannot give is skipped.
fn in_each_mode(test: fn(Uring)) {
    for mode in [EngineMode::Uring, EngineMode::Sync] {
        std::thread::spawn(move || {
            let Some(ring) = engine(mode) else { return };
            test(ring);
        })
        .join()
        .expect("test thread");
    }
}

/// Write block `i` (4 KiB of `pattern(i, 4096)` at `i * 4096`) through `ring`; the count
/// written.
async fn write_block(ring: &Uring, fd: &SharedFd, i: u64) -> usize {
    let data = AlignedBuf::copy_from_slice(&pattern(i, 4096));
    let (r, _) = ring.write_at(fd, data, i * 4096, RwFlags::NONE).await;
    r.expect("write")
}

/// Read block `i` back through `ring`: what [`write_block`] wrote.
async fn check_block(ring: &Uring, fd: &SharedFd, i: u64) {
    let (r, buf) = ring.read_at(fd, AlignedBuf::new(4096), i * 4096).await;
    r.expect("read");
    assert_eq!(&buf[..], &pattern(i, 4096)[..]);
}

/// Write, fsync, read back through `ring`, at 4 KiB-aligned offsets.
async fn roundtrip(ring: &Uring, fd: &SharedFd) {
    for i in 0..8u64 {
        let data = AlignedBuf::copy_from_slice(&pattern(i, 8192));
        let (r, _) = ring.write_at(fd, data, i * 8192, RwFlags::NONE).await;
        assert_eq!(r.expect("write"), 8192);
    }
    let (r, _) = ring
        .write_at(
            fd,
            AlignedBuf::copy_from_slice(&pattern(99, 4096)),
            65536,
            RwFlags::DSYNC,
        )
        .await;
    assert_eq!(r.expect("dsync write"), 4096);
    ring.fdatasync(fd).await.expect("fdatasync");
    ring.fsync(fd).await.expect("fsync");
    for i in 0..8u64 {
        let (r, buf) = ring.read_at(fd, AlignedBuf::new(8192), i * 8192).await;
        assert_eq!(r.expect("read"), 8192);
        assert_eq!(&buf[..], &pattern(i, 8192)[..], "block {i}");
    }
    // Reading past the end of the file returns a short count.
    let (r, _) = ring.read_at(fd, AlignedBuf::new(8192), 65536).await;
    assert_eq!(r.expect("read at end"), 4096);
}

fn roundtrip_all(mode: EngineMode) {
    let Some(ring) = engine(mode) else { return };
    let before = engine_totals();
    for shm in [false, true] {
        for direct in [false, true] {
            let dir = tmpdir(shm);
            let path = dir.path().join("f");
            let fd = match (
                direct,
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path),
            ) {
                (true, Err(e)) => {
                    eprintln!("SKIP O_DIRECT on {}: {e}", dir.path().display());
                    continue;
                }
                _ => open(&path, direct),
            };
            run(roundtrip(&ring, &fd));
        }
    }
    let s = ring.stats();
    match mode {
        EngineMode::Sync => assert!(s.sync_ops > 0 && s.ring_ops == 0, "{s:?}"),
        _ => assert!(s.ring_ops > 0 && s.sync_ops == 0, "{s:?}"),
    }
    // The process-wide totals count this thread's work too (other tests may add theirs).
    let after = engine_totals();
    assert!(
        after.submitted - before.submitted >= s.ring_ops,
        "{after:?} {s:?}"
    );
    assert!(
        after.completed - before.completed >= s.ring_ops,
        "{after:?} {s:?}"
    );
    assert!(
        after.sync_ops - before.sync_ops >= s.sync_ops,
        "{after:?} {s:?}"
    );
    assert!(after.enters - before.enters >= s.enters, "{after:?} {s:?}");
}

#[test]
fn read_after_write_uring() {
    roundtrip_all(EngineMode::Uring);
}

#[test]
fn read_after_write_sync_fallback() {
    roundtrip_all(EngineMode::Sync);
}

#[test]
fn vectored_io() {
    in_each_mode(|ring| {
        let dir = tmpdir(false);
        let fd = open(&dir.path().join("v"), true);
        run(async {
            let bufs = vec![
                AlignedBuf::copy_from_slice(&pattern(1, 4096)),
                AlignedBuf::copy_from_slice(&pattern(2, 8192)),
            ];
            let (r, _) = ring.write_vectored_at(&fd, bufs, 4096, RwFlags::NONE).await;
            assert_eq!(r.expect("writev"), 12288);
            let (r, bufs) = ring
                .read_vectored_at(
                    &fd,
                    vec![AlignedBuf::new(8192), AlignedBuf::new(4096)],
                    4096,
                )
                .await;
            assert_eq!(r.expect("readv"), 12288);
            let mut all = bufs[0].to_vec();
            all.extend_from_slice(&bufs[1]);
            let mut want = pattern(1, 4096);
            want.extend(pattern(2, 8192));
            assert_eq!(all, want);
        });
    });
}

#[test]
fn fallocate_punch_and_zero() {
    in_each_mode(|ring| {
        for shm in [false, true] {
            let dir = tmpdir(shm);
            let fd = open(&dir.path().join("p"), false);
            run(async {
                ring.fallocate(&fd, FallocateMode::ALLOCATE, 0, 65536)
                    .await
                    .expect("allocate");
                let (r, _) = ring
                    .write_at(&fd, pattern(3, 65536), 0, RwFlags::NONE)
                    .await;
                r.expect("write");
                let punch = FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE;
                ring.fallocate(&fd, punch, 8192, 16384)
                    .await
                    .expect("punch");
                let zero = FallocateMode::ZERO_RANGE | FallocateMode::KEEP_SIZE;
                match ring.fallocate(&fd, zero, 40960, 4096).await {
                    Ok(()) => {}
                    // tmpfs has no ZERO_RANGE.
                    Err(e) if shm && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        let (r, _) = ring
                            .write_at(&fd, vec![0u8; 4096], 40960, RwFlags::NONE)
                            .await;
                        r.expect("zero write");
                    }
                    Err(e) => panic!("zero range: {e}"),
                }
                let (r, buf) = ring.read_at(&fd, vec![1u8; 65536], 0).await;
                assert_eq!(r.expect("read"), 65536);
                let mut want = pattern(3, 65536);
                want[8192..24576].fill(0);
                want[40960..45056].fill(0);
                assert!(buf == want, "punched/zeroed ranges read back wrong");
            });
        }
    });
}

#[test]
fn errors_carry_errno() {
    in_each_mode(|ring| {
        let dir = tmpdir(false);
        let path = dir.path().join("ro");
        std::fs::write(&path, [0u8; 4096]).expect("create");
        let ro = SharedFd::from(File::open(&path).expect("open ro"));
        run(async {
            let (r, _) = ring.write_at(&ro, vec![0u8; 512], 0, RwFlags::NONE).await;
            assert_eq!(
                r.expect_err("write to O_RDONLY").raw_os_error(),
                Some(libc::EBADF)
            );
            let (r, _) = ring.read_at(&ro, vec![0u8; 512], u64::MAX).await;
            assert_eq!(r.expect_err("offset -1").raw_os_error(), Some(libc::EINVAL));
            let fd = open(&dir.path().join("d"), true);
            // O_DIRECT with a misaligned offset.
            let (r, _) = ring
                .write_at(&fd, AlignedBuf::new(4096), 1, RwFlags::NONE)
                .await;
            assert_eq!(
                r.expect_err("misaligned O_DIRECT").raw_os_error(),
                Some(libc::EINVAL)
            );
        });
    });
}

/// 256 writes issued from one LocalSet in one tick reach the kernel in a handful of
/// `io_uring_enter` calls, then read back.
#[test]
fn many_concurrent_ops_are_batched() {
    let Some(ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let fd = open(&dir.path().join("q"), true);
    run(async {
        let before = ring.stats();
        let handles: Vec<_> = (0..256u64)
            .map(|i| {
                let (ring, fd) = (ring.clone(), fd.clone());
                tokio::task::spawn_local(async move { write_block(&ring, &fd, i).await })
            })
            .collect();
        for h in handles {
            assert_eq!(h.await.expect("join"), 4096);
        }
        let after = ring.stats();
        assert_eq!(after.ring_ops - before.ring_ops, 256);
        assert!(after.max_in_flight >= 128, "{after:?}");
        assert!(
            after.enters - before.enters <= 8,
            "256 ops took {} enters",
            after.enters - before.enters
        );

        let handles: Vec<_> = (0..256u64)
            .map(|i| {
                let (ring, fd) = (ring.clone(), fd.clone());
                tokio::task::spawn_local(async move {
                    check_block(&ring, &fd, i).await;
                })
            })
            .collect();
        for h in handles {
            h.await.expect("join");
        }
    });
}

/// A buffer that records when it is dropped.
struct Tracked {
    buf: AlignedBuf,
    dropped: Rc<Cell<bool>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.dropped.set(true);
    }
}

// SAFETY: delegates to the AlignedBuf, whose heap memory is stable.
unsafe impl IoBuf for Tracked {
    fn stable_ptr(&self) -> *const u8 {
        self.buf.stable_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.buf.bytes_init()
    }
}

// SAFETY: delegates to the AlignedBuf.
unsafe impl IoBufMut for Tracked {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf.stable_mut_ptr()
    }
}

/// A read from an empty pipe stays in flight; dropping its future must not free the buffer
/// until the kernel completes the read (here: after data is written into the pipe).
#[test]
fn dropped_future_keeps_buffer_until_completion() {
    let Some(ring) = engine(EngineMode::Uring) else {
        return;
    };
    let (reader, mut writer) = io::pipe().expect("pipe");
    let rfd = SharedFd::new(OwnedFd::from(reader));
    run(async {
        let dropped = Rc::new(Cell::new(false));
        let buf = Tracked {
            buf: AlignedBuf::new(64),
            dropped: dropped.clone(),
        };
        {
            let mut fut = pin!(ring.read_at(&rfd, buf, 0));
            let waker = Waker::noop();
            assert!(fut
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_pending());
            // Let the reaper submit the read.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
        }
        assert!(
            !dropped.get(),
            "buffer freed while the kernel may still write into it"
        );
        drop(rfd);
        writer.write_all(b"hello").expect("write to pipe");
        for _ in 0..1000 {
            if dropped.get() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(dropped.get(), "buffer not released after the completion");

        // The engine still works.
        let dir = tmpdir(true);
        let fd = open(&dir.path().join("after"), false);
        let (r, _) = ring.write_at(&fd, b"ok".to_vec(), 0, RwFlags::NONE).await;
        assert_eq!(r.expect("write"), 2);
    });
}

/// A thread that exits with a read still in flight (never completing on its own) cancels it
/// and frees the buffer only then.
#[test]
fn thread_exit_with_op_in_flight() {
    let dropped = Arc::new(AtomicBool::new(false));
    let d2 = dropped.clone();
    let (reader, _writer) = io::pipe().expect("pipe");
    std::thread::spawn(move || {
        let Some(ring) = engine(EngineMode::Uring) else {
            d2.store(true, Ordering::SeqCst);
            return;
        };
        let rfd = SharedFd::new(OwnedFd::from(reader));
        struct Flag(Arc<AtomicBool>, AlignedBuf);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        // SAFETY: delegates to the AlignedBuf.
        unsafe impl IoBuf for Flag {
            fn stable_ptr(&self) -> *const u8 {
                self.1.stable_ptr()
            }
            fn bytes_init(&self) -> usize {
                self.1.bytes_init()
            }
        }
        // SAFETY: delegates to the AlignedBuf.
        unsafe impl IoBufMut for Flag {
            fn stable_mut_ptr(&mut self) -> *mut u8 {
                self.1.stable_mut_ptr()
            }
        }
        run(async {
            let fut = ring.read_at(&rfd, Flag(d2.clone(), AlignedBuf::new(64)), 0);
            // Submitted, then abandoned when the timeout fires.
            let r = tokio::time::timeout(std::time::Duration::from_millis(20), fut).await;
            assert!(r.is_err());
            assert!(!d2.load(Ordering::SeqCst));
        });
    })
    .join()
    .expect("test thread");
    assert!(dropped.load(Ordering::SeqCst));
}

/// The ring outlives one runtime + LocalSet; the next one gets a new reaper.
#[test]
fn engine_survives_a_new_local_set() {
    let Some(ring) = engine(EngineMode::Uring) else {
        return;
    };
    let dir = tmpdir(false);
    let fd = open(&dir.path().join("r"), true);
    for round in 0..3u64 {
        run(async {
            let data = AlignedBuf::copy_from_slice(&pattern(round, 4096));
            let (r, _) = ring.write_at(&fd, data, 0, RwFlags::NONE).await;
            r.expect("write");
            let (r, buf) = ring.read_at(&fd, AlignedBuf::new(4096), 0).await;
            r.expect("read");
            assert_eq!(&buf[..], &pattern(round, 4096)[..]);
        });
    }
}

#[test]
fn engine_flag_variants_work() {
    let variants = [
        EngineConfig {
            flush: FlushPolicy::Immediate,
            ..EngineConfig::default()
        },
        EngineConfig {
            defer_taskrun: true,
            ..EngineConfig::default()
        },
        EngineConfig {
            defer_taskrun: true,
            flush: FlushPolicy::Immediate,
            ..EngineConfig::default()
        },
        EngineConfig {
            coop_taskrun: false,
            single_issuer: false,
            ..EngineConfig::default()
        },
    ];
    for cfg in variants {
        std::thread::spawn(move || {
            let cfg = EngineConfig {
                mode: EngineMode::Uring,
                ..cfg
            };
            let ring = match Uring::init_current(&cfg) {
                Ok(r) => r,
                Err(e) if testing::allow_no_uring() => {
                    eprintln!("SKIP {cfg:?}: {e} (TESSERA_ALLOW_NO_URING=1)");
                    return;
                }
                Err(e) => panic!("io_uring with {cfg:?}: {e}"),
            };
            for shm in [false, true] {
                let dir = tmpdir(shm);
                run(roundtrip(&ring, &open(&dir.path().join("f"), !shm)));
            }
            // And concurrency with the variant.
            let dir = tmpdir(false);
            let fd = open(&dir.path().join("c"), true);
            run(async {
                let hs: Vec<_> = (0..64u64)
                    .map(|i| {
                        let (ring, fd) = (ring.clone(), fd.clone());
                        tokio::task::spawn_local(async move {
                            write_block(&ring, &fd, i).await;
                            check_block(&ring, &fd, i).await;
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.expect("join");
                }
            });
        })
        .join()
        .expect("test thread");
    }
}

#[test]
fn init_current_rejects_bad_config_and_double_init() {
    std::thread::spawn(|| {
        let bad = EngineConfig {
            entries: 3,
            ..EngineConfig::default()
        };
        assert!(matches!(
            Uring::init_current(&bad),
            Err(EngineError::Config(_))
        ));
        let bad = EngineConfig {
            single_issuer: false,
            defer_taskrun: true,
            ..EngineConfig::default()
        };
        assert!(matches!(
            Uring::init_current(&bad),
            Err(EngineError::Config(_))
        ));
        let _ = Uring::current();
        assert!(matches!(
            Uring::init_current(&EngineConfig::default()),
            Err(EngineError::AlreadyInitialized)
        ));
    })
    .join()
    .expect("test thread");
}
