//! Unit tests of the target against `MemDevice` (wrapped to observe FUA, flushes, errors
//! and to yield inside I/O so concurrent commands interleave).

mod hostile;
mod info;
mod media;
mod reserve;
mod target;
mod ua;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tessera_proto::block::{
    BlockDevice, BlockError, BlockFuture, DeviceInfo, Extent, LocalBoxFuture, MemDevice,
};
use tessera_proto::segments::Segments;

use crate::{LogicalUnit, LuConfig, Nexus, ScsiCommand, ScsiResult, TaskAttr};

pub(crate) const T1: &str = "iqn.2024-01.io.tessera:vol,t,0x1";
pub(crate) const T2: &str = "iqn.2024-01.io.tessera:vol,t,0x2";

/// A nexus from initiator `name` (ISID derived from `id`) through target port `tport`.
pub(crate) fn nexus_on(name: &str, id: u64, tport: &str, rel: u16) -> Nexus {
    let iqn = format!("iqn.1994-05.com.example:{name}");
    Nexus {
        id,
        initiator_port: format!("{iqn},i,0x23d00000000{id}").into(),
        initiator_name: iqn.into(),
        target_port: tport.into(),
        relative_port: rel,
        port_group: rel,
    }
}

pub(crate) fn nexus(name: &str, id: u64) -> Nexus {
    nexus_on(name, id, T1, 1)
}

/// `MemDevice` with observable FUA / flush, injectable errors, and optional yields.
pub(crate) struct TestDevice {
    pub mem: MemDevice,
    pub thin: bool,
    pub yields: bool,
    pub last_fua: AtomicBool,
    pub writes: AtomicUsize,
    pub flushes: AtomicUsize,
    pub fail: Mutex<Option<BlockError>>,
}

impl TestDevice {
    pub(crate) fn new(bytes: u64) -> Self {
        Self {
            mem: MemDevice::new(bytes),
            thin: true,
            yields: false,
            last_fua: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            fail: Mutex::new(None),
        }
    }

    fn failure(&self) -> Option<BlockError> {
        self.fail.lock().unwrap().clone()
    }

    fn wrap<'a, T: 'a>(
        &'a self,
        f: LocalBoxFuture<'a, Result<T, BlockError>>,
    ) -> LocalBoxFuture<'a, Result<T, BlockError>> {
        let fail = self.failure();
        let yields = self.yields;
        Box::pin(async move {
            if yields {
                tokio::task::yield_now().await;
            }
            if let Some(e) = fail {
                return Err(e);
            }
            let r = f.await;
            if yields {
                tokio::task::yield_now().await;
            }
            r
        })
    }
}

impl BlockDevice for TestDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            thin: self.thin,
            ..self.mem.info()
        }
    }

    fn read(&self, offset: u64, len: usize) -> BlockFuture<'_, Bytes> {
        self.wrap(Box::pin(async move {
            // Read late so a concurrent write between yields is observed.
            self.mem.read(offset, len).await
        }))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockFuture<'_> {
        self.last_fua.store(fua, Ordering::SeqCst);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.wrap(Box::pin(
            async move { self.mem.write(offset, data, fua).await },
        ))
    }

    fn flush(&self) -> BlockFuture<'_> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.wrap(self.mem.flush())
    }

    fn unmap(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        self.wrap(Box::pin(async move { self.mem.unmap(offset, len).await }))
    }

    fn extents(&self, offset: u64, len: u64) -> BlockFuture<'_, Vec<Extent>> {
        self.wrap(Box::pin(async move { self.mem.extents(offset, len).await }))
    }
}

/// A 1 MiB logical unit of 512-byte blocks (2048 blocks) over a thin `TestDevice`.
pub(crate) fn setup() -> (Arc<LogicalUnit>, Arc<TestDevice>) {
    setup_with(
        LuConfig {
            serial: "SN42".into(),
            naa_id: 0x1405_0000_0000_0042,
            ..LuConfig::default()
        },
        TestDevice::new(1 << 20),
    )
}

pub(crate) fn setup_with(cfg: LuConfig, dev: TestDevice) -> (Arc<LogicalUnit>, Arc<TestDevice>) {
    let dev = Arc::new(dev);
    let lu = LogicalUnit::new(cfg, dev.clone(), None).expect("logical unit");
    (Arc::new(lu), dev)
}

pub(crate) fn command(cdb: &[u8], data: &[u8], expected_len: u32) -> ScsiCommand {
    let mut c = [0u8; 16];
    let n = cdb.len().min(16);
    c[..n].copy_from_slice(&cdb[..n]);
    // The data in uneven pieces, as a transport hands over Data-Out PDUs.
    let mut data_out = Segments::new();
    for piece in data.chunks(1000) {
        data_out.push(Bytes::copy_from_slice(piece));
    }
    ScsiCommand {
        cdb: Bytes::copy_from_slice(&c),
        data_out,
        expected_len,
        read: data.is_empty(),
        write: !data.is_empty(),
        attr: TaskAttr::Simple,
        tag: 1,
    }
}

/// Run one command with the Data-Out `data` (expected length = its length, or 64 KiB for
/// data-in commands).
pub(crate) async fn run(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data: &[u8]) -> ScsiResult {
    let exp = if data.is_empty() {
        65536
    } else {
        data.len() as u32
    };
    lu.execute(n, &command(cdb, data, exp)).await
}

/// Consume the new-nexus unit attention (and any other) with TEST UNIT READY.
pub(crate) async fn fresh(lu: &LogicalUnit, n: &Nexus) {
    for _ in 0..20 {
        if run(lu, n, &[0; 6], &[]).await.status == 0 {
            return;
        }
    }
    panic!("unit attentions never cleared");
}

/// Nexus `name` (initiator port `id`), its new-nexus unit attention already consumed.
pub(crate) async fn fresh_nexus(lu: &LogicalUnit, name: &str, id: u64) -> Nexus {
    let n = nexus(name, id);
    fresh(lu, &n).await;
    n
}

/// Nexuses `a` (1) and `b` (2), made fresh in that order.
pub(crate) async fn fresh_pair(lu: &LogicalUnit) -> (Nexus, Nexus) {
    let a = fresh_nexus(lu, "a", 1).await;
    let b = fresh_nexus(lu, "b", 2).await;
    (a, b)
}

/// A 1 MiB logical unit (default configuration) over a `TestDevice` that yields in every
/// call, so that concurrent commands interleave.
pub(crate) fn setup_yielding() -> Arc<LogicalUnit> {
    let mut dev = TestDevice::new(1 << 20);
    dev.yields = true;
    setup_with(LuConfig::default(), dev).0
}

/// [`setup`]'s logical unit with nexuses `a` (1) and `b` (2) made fresh on it.
pub(crate) async fn setup_fresh_pair() -> (Arc<LogicalUnit>, Nexus, Nexus) {
    let (lu, _) = setup();
    let (a, b) = fresh_pair(&lu).await;
    (lu, a, b)
}

/// [`setup`]'s logical unit with nexus `a` (1) made fresh on it.
pub(crate) async fn setup_fresh() -> (Arc<LogicalUnit>, Nexus) {
    let (lu, _) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    (lu, n)
}

/// A 1 MiB removable logical unit (default identity) over a thin `TestDevice`.
pub(crate) fn setup_removable() -> (Arc<LogicalUnit>, Arc<TestDevice>) {
    setup_with(
        LuConfig {
            removable: true,
            ..LuConfig::default()
        },
        TestDevice::new(1 << 20),
    )
}

/// Runs `cdb` with the Data-Out `data` from `n`, which must end in CHECK CONDITION with
/// ILLEGAL REQUEST and `asc` (ASCQ 0).
pub(crate) async fn assert_illegal(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data: &[u8], asc: u8) {
    assert_check(&run(lu, n, cdb, data).await, 0x5, asc, 0);
}

/// START STOP UNIT CDBs that eject and that load the medium, with IMMED as given.
pub(crate) fn eject_load(immed: bool) -> ([u8; 6], [u8; 6]) {
    let immed = u8::from(immed);
    ([0x1B, immed, 0, 0, 0x02, 0], [0x1B, immed, 0, 0, 0x03, 0])
}

/// The next TEST UNIT READY from `n` reports the unit attention `asc`/`ascq`, and the one
/// after it is GOOD.
pub(crate) async fn assert_ua_once(lu: &LogicalUnit, n: &Nexus, asc: u8, ascq: u8) {
    assert_check(&run(lu, n, &[0; 6], &[]).await, 0x6, asc, ascq);
    assert_good(&run(lu, n, &[0; 6], &[]).await);
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION, either sense format.
pub(crate) fn sense(r: &ScsiResult) -> (u8, u8, u8) {
    let s = r.sense.as_ref().expect("sense data");
    match s[0] & 0x7F {
        0x70 | 0x71 => (s[2] & 0x0F, s[12], s[13]),
        0x72 | 0x73 => (s[1] & 0x0F, s[2], s[3]),
        other => panic!("unknown sense format {other:#x}"),
    }
}

/// The SKS bytes of fixed-format sense.
pub(crate) fn sks(r: &ScsiResult) -> [u8; 3] {
    let s = r.sense.as_ref().expect("sense data");
    [s[15], s[16], s[17]]
}

pub(crate) fn assert_check(r: &ScsiResult, key: u8, asc: u8, ascq: u8) {
    assert_eq!(r.status, 2, "expected CHECK CONDITION, got {r:?}");
    assert_eq!(sense(r), (key, asc, ascq), "{r:?}");
}

pub(crate) fn assert_good(r: &ScsiResult) {
    assert_eq!(
        r.status,
        0,
        "expected GOOD, got {r:?} {:?}",
        r.sense.as_ref().map(|_| sense(r))
    );
}

/// A READ/WRITE-style CDB of `len` bytes: the opcode, the flags byte, and the big-endian
/// LOGICAL BLOCK ADDRESS and TRANSFER LENGTH fields in the byte ranges given.
fn rw_cdb(
    len: usize,
    op: u8,
    flags: u8,
    lba: u64,
    lba_at: Range<usize>,
    blocks: u64,
    blocks_at: Range<usize>,
) -> Vec<u8> {
    let mut c = vec![0u8; len];
    c[0] = op;
    c[1] = flags;
    for (value, at) in [(lba, lba_at), (blocks, blocks_at)] {
        c[at.clone()].copy_from_slice(&value.to_be_bytes()[8 - at.len()..]);
    }
    c
}

pub(crate) fn rw10(op: u8, lba: u32, blocks: u16, flags: u8) -> Vec<u8> {
    rw_cdb(10, op, flags, lba.into(), 2..6, blocks.into(), 7..9)
}

pub(crate) fn rw12(op: u8, lba: u32, blocks: u32, flags: u8) -> Vec<u8> {
    rw_cdb(12, op, flags, lba.into(), 2..6, blocks.into(), 6..10)
}

pub(crate) fn rw16(op: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    rw_cdb(16, op, flags, lba, 2..10, blocks.into(), 10..14)
}

pub(crate) const READ10: u8 = 0x28;
pub(crate) const WRITE10: u8 = 0x2A;
pub(crate) const READ16: u8 = 0x88;
pub(crate) const WRITE16: u8 = 0x8A;

/// Block `n` of 512 bytes filled with `b`.
pub(crate) fn blocks(n: usize, b: u8) -> Vec<u8> {
    vec![b; 512 * n]
}

pub(crate) async fn write_blocks(lu: &LogicalUnit, n: &Nexus, lba: u32, data: &[u8]) {
    let r = run(
        lu,
        n,
        &rw10(WRITE10, lba, (data.len() / 512) as u16, 0),
        data,
    )
    .await;
    assert_good(&r);
}

pub(crate) async fn read_blocks(lu: &LogicalUnit, n: &Nexus, lba: u32, count: u16) -> Bytes {
    let r = run(lu, n, &rw10(READ10, lba, count, 0), &[]).await;
    assert_good(&r);
    r.data_in
}

/// READ(10) of block 0 from `n`.
pub(crate) async fn read0(lu: &LogicalUnit, n: &Nexus) -> ScsiResult {
    run(lu, n, &rw10(READ10, 0, 1, 0), &[]).await
}

/// WRITE(10) of a zero block 0 from `n`.
pub(crate) async fn write0(lu: &LogicalUnit, n: &Nexus) -> ScsiResult {
    run(lu, n, &rw10(WRITE10, 0, 1, 0), &blocks(1, 0)).await
}

/// Drive `f` on a current-thread runtime inside a `LocalSet` (for `spawn_local`).
pub(crate) fn local<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let set = tokio::task::LocalSet::new();
    set.block_on(&rt, f);
}
