//! The storage node's fragment store: fragments in versioned slots on one file or block
//! device, through the thread's io_uring engine. The byte layout is in `FORMAT.md` beside this
//! crate; the encoders are in [`format`].
//!
//! # Model
//!
//! A fragment `(volume, stripe, index)` has two slots. A write at version `V` goes to the slot
//! that already holds `V` (a retry or a repair), else to the empty one, else to the one with
//! the lower version: the other slot, which holds the newest copy the store had, is never
//! touched. So a write torn by a crash destroys nothing but itself (its slot fails its
//! checksum and the other copy stands), and a gateway can roll an uncommitted write back by
//! voiding its slot ([`FragmentStore::revert`]). Both copies carry their stripe state (the
//! manifest) so the gateway can decide after a crash which state is whole.
//!
//! Extents: fragments of one (volume, PG, index) live together in 64 MiB extents of slot pairs;
//! the metadata log (extent allocations, fencing epochs, per-volume records) is a two-half
//! append-only log of checksummed records. Every write is durable before it is acknowledged
//! (`O_DSYNC` writes, or writes followed by one shared `fdatasync` per batch: [`SyncMode`]).
//!
//! # Memory
//!
//! For each extent in use the store keeps the version and kind of both slots of every
//! fragment (18 bytes a fragment), loaded from the slot headers the first time the extent is
//! touched after start.
//!
//! The store is single-threaded (`!Send`): a node runs one event loop.

pub mod format;
mod handler;
mod meta;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_rpc::msg::{
    FragKey, Manifest, NodeStats, ReadItem, ReadResult, ScrubProgress, ScrubReport, SlotInfo,
    Status, VersionEntry, VolumeCtx, Want, WriteItem,
};
use tessera_rpc::Refusal;
use tokio::sync::Notify;

use format::{
    pairs_per_extent, ExtentKey, ExtentRec, Record, SlotHeader, Superblock, BLOCK, EXTENT_AREA,
    EXTENT_SIZE, FLAG_VOID, FLAG_ZERO,
};
pub use handler::NodeHandler;
use meta::MetaLog;
use tessera_uring::buf::AlignedBuf;
use tessera_uring::{sys, FallocateMode, RwFlags, SharedFd, Uring};

/// How writes become durable before they are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Every write is an `RWF_DSYNC` write.
    Dsync,
    /// Writes, then one `fdatasync` shared by every write that finished meanwhile.
    #[default]
    Batched,
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The node's id, recorded when the store is formatted and checked on every open.
    pub node_id: String,
    /// Bytes the store may use on a regular file (0: unlimited); block devices use their size.
    pub capacity: u64,
    /// Durability.
    pub sync: SyncMode,
    /// Use `O_DIRECT` (where the file system allows; tmpfs never needs it).
    pub direct: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            node_id: "node".into(),
            capacity: 0,
            sync: SyncMode::Batched,
            direct: true,
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The store's path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The file holds something else, or a damaged store.
    #[error("{path}: {reason}")]
    Format {
        /// The store's path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

const EMPTY: u8 = 0;
const DATA: u8 = 1;
const ZERO: u8 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    version: u64,
    kind: u8,
}

struct ExtentMem {
    rec: ExtentRec,
    /// Both slots of every pair, once loaded.
    slots: RefCell<Option<Vec<[Slot; 2]>>>,
    loading: Cell<bool>,
    loaded: Notify,
}

#[derive(Default)]
struct Counters {
    writes: Cell<u64>,
    reads: Cell<u64>,
    checksum_errors: Cell<u64>,
    stale_epoch_rejects: Cell<u64>,
}

struct Inner {
    path: PathBuf,
    fd: SharedFd,
    engine: Uring,
    sync: SyncMode,
    /// The store is on a memory file system (tmpfs): there is nothing for fdatasync to make
    /// durable, and it is skipped.
    memory_fs: bool,
    is_block: bool,
    /// The descriptor was opened with `O_DIRECT` (memory and offsets must be aligned).
    direct: bool,
    capacity: u64,
    store_id: u64,
    node_id: String,
    meta: MetaLog,
    extents: RefCell<HashMap<ExtentKey, Rc<ExtentMem>>>,
    allocating: RefCell<HashSet<ExtentKey>>,
    allocated: Notify,
    /// The next extent number not yet handed out (allocations in flight included).
    reserved: Cell<u32>,
    busy: RefCell<HashSet<(ExtentKey, u32)>>,
    released: Notify,
    flush: Flusher,
    counters: Counters,
    /// How far the running (or last) scrub has got.
    scrub: Cell<ScrubProgress>,
    /// Held by the running scrub: scrubs run one at a time.
    scrubbing: tokio::sync::Mutex<()>,
    /// errno of the first write-side failure: the store is then fail-stop for writes.
    failed: Cell<i32>,
}

/// A fragment store. Cheap to clone; `!Send`.
#[derive(Clone)]
pub struct FragmentStore {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for FragmentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FragmentStore({})", self.inner.path.display())
    }
}

fn io_status(e: &io::Error) -> Status {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => Status::NO_SPACE,
        _ => Status::IO_ERROR,
    }
}

/// Where a fragment lives.
#[derive(Debug, Clone, Copy)]
struct Loc {
    key: ExtentKey,
    pair: u32,
}

fn locate(vol: &VolumeCtx, key: &FragKey) -> Loc {
    let pgs = u64::from(vol.pgs.max(1));
    let pg = (key.stripe % pgs) as u32;
    let n = key.stripe / pgs;
    let per = u64::from(pairs_per_extent(vol.chunk));
    Loc {
        key: ExtentKey {
            volume: vol.volume,
            pg,
            index: key.index,
            seq: (n / per) as u32,
        },
        pair: (n % per) as u32,
    }
}

impl FragmentStore {
    /// Open the store at `path` (a regular file, created if missing, or a block device),
    /// formatting it if it has never held a store.
    pub fn open(path: impl AsRef<Path>, opts: &StoreOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let ioe = |op: &'static str| {
            let path = path.clone();
            move |source| StoreError::Io { path, op, source }
        };
        let fmt_err = |reason: String| StoreError::Format {
            path: path.clone(),
            reason,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        let exists = path.exists();
        if !exists {
            oo.create(true);
        }
        let file = oo.open(&path).map_err(ioe("open"))?;
        let meta = file.metadata().map_err(ioe("fstat"))?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.file_type().is_file() {
            return Err(fmt_err("not a regular file or block device".into()));
        }
        let memory_fs = !is_block && sys::is_memory_fs(file.as_fd()).unwrap_or(false);
        let (file, direct) = if opts.direct && !memory_fs {
            let mut oo = oo.clone();
            oo.create(false).custom_flags(libc::O_DIRECT);
            match oo.open(&path) {
                Ok(f) => (f, true),
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "O_DIRECT refused; using buffered I/O");
                    (file, false)
                }
            }
        } else {
            (file, false)
        };
        let capacity = if is_block {
            sys::blk_size_bytes(file.as_fd()).map_err(ioe("BLKGETSIZE64"))?
        } else {
            opts.capacity
        };
        if capacity != 0 && capacity < EXTENT_AREA + EXTENT_SIZE {
            return Err(fmt_err(format!(
                "capacity {capacity} bytes is below the minimum of {} bytes",
                EXTENT_AREA + EXTENT_SIZE
            )));
        }
        // The superblock (two copies).
        let mut b = AlignedBuf::new(2 * BLOCK);
        let n = sys::pread(file.as_fd(), &mut b, 0).map_err(ioe("read superblock"))?;
        let sb = match (
            Superblock::decode(&b[..BLOCK]),
            Superblock::decode(&b[BLOCK..]),
        ) {
            (Ok(Some(s)), _) | (_, Ok(Some(s))) => s,
            (Err(e), _) | (_, Err(e)) => return Err(fmt_err(e)),
            (Ok(None), Ok(None)) => {
                let blank = n == 0 || b[..n].iter().all(|&x| x == 0);
                if !blank {
                    return Err(fmt_err(
                        "holds data that is not a tessera node store (refusing to format it)"
                            .into(),
                    ));
                }
                let mut uuid = [0u8; 16];
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let seed = crc32c::crc32c(opts.node_id.as_bytes()) as u128;
                uuid.copy_from_slice(
                    &(t ^ (seed << 64) ^ u128::from(std::process::id())).to_le_bytes(),
                );
                let sb = Superblock {
                    node_id: opts.node_id.clone(),
                    uuid,
                    capacity,
                };
                MetaLog::format(&file).map_err(ioe("format metadata log"))?;
                let enc = sb.encode();
                let mut w = AlignedBuf::new(2 * BLOCK);
                w[..BLOCK].copy_from_slice(&enc);
                w[BLOCK..].copy_from_slice(&enc);
                sys::pwrite(file.as_fd(), &w, 0, 0).map_err(ioe("write superblock"))?;
                sys::fsync(file.as_fd(), false).map_err(ioe("fsync"))?;
                tracing::info!(path = %path.display(), node = %sb.node_id, "formatted a new fragment store");
                sb
            }
        };
        if sb.node_id != opts.node_id {
            return Err(fmt_err(format!(
                "belongs to node {:?}, not {:?}",
                sb.node_id, opts.node_id
            )));
        }
        let meta = MetaLog::open(&file).map_err(|e| fmt_err(format!("metadata log: {e}")))?;
        let fd = SharedFd::from(file);
        let extents = meta
            .with_state(|s| s.extents.clone())
            .into_iter()
            .map(|rec| {
                (
                    rec.key,
                    Rc::new(ExtentMem {
                        rec,
                        slots: RefCell::new(None),
                        loading: Cell::new(false),
                        loaded: Notify::new(),
                    }),
                )
            })
            .collect();
        let store_id = u64::from_le_bytes(sb.uuid[..8].try_into().expect("8 bytes"));
        let engine = if memory_fs {
            Uring::blocking()
        } else {
            Uring::current()
        };
        Ok(Self {
            inner: Rc::new(Inner {
                path,
                meta: meta.with_fd(fd.clone(), engine.clone()),
                engine,
                fd,
                sync: opts.sync,
                memory_fs,
                is_block,
                direct,
                capacity,
                store_id,
                node_id: sb.node_id,
                extents: RefCell::new(extents),
                allocating: RefCell::default(),
                allocated: Notify::new(),
                reserved: Cell::new(0),
                busy: RefCell::default(),
                released: Notify::new(),
                flush: Flusher::default(),
                counters: Counters::default(),
                scrub: Cell::new(ScrubProgress::default()),
                scrubbing: tokio::sync::Mutex::new(()),
                failed: Cell::new(0),
            }),
        })
    }

    /// The node id the store was formatted for.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Bytes the store may use (0: unlimited).
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Counters.
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        let extents = self.inner.meta.with_state(|s| s.next_extent);
        NodeStats {
            capacity: self.inner.capacity,
            allocated: u64::from(extents) * EXTENT_SIZE,
            writes: c.writes.get(),
            reads: c.reads.get(),
            checksum_errors: c.checksum_errors.get(),
            stale_epoch_rejects: c.stale_epoch_rejects.get(),
            failed_errno: self.inner.failed.get() as u64,
        }
    }

    /// The errno of the write or sync that made the store fail-stop (`None`: healthy). Once
    /// set, it stays until the store is reopened, and every write is refused.
    pub fn failed(&self) -> Option<i32> {
        match self.inner.failed.get() {
            0 => None,
            e => Some(e),
        }
    }

    /// The highest epoch seen for `volume`.
    pub fn epoch(&self, volume: u64) -> u64 {
        self.inner.meta.with_state(|s| {
            s.epochs
                .iter()
                .find(|(v, _)| *v == volume)
                .map_or(0, |(_, e)| *e)
        })
    }

    /// The fencing check of every volume request: refuse an epoch older than the highest
    /// seen; persist a higher one before going on.
    pub async fn check_epoch(&self, volume: u64, epoch: u64) -> Result<(), Refusal> {
        let have = self.epoch(volume);
        if epoch < have {
            self.inner
                .counters
                .stale_epoch_rejects
                .set(self.inner.counters.stale_epoch_rejects.get() + 1);
            return Err(Refusal {
                status: Status::STALE_EPOCH,
                reason: format!("epoch {epoch} is older than {have}"),
                epoch: have,
            });
        }
        if epoch > have {
            self.raise_epoch(volume, epoch).await?;
        }
        Ok(())
    }

    /// Raise `volume`'s epoch to `epoch` if higher (durably); returns the epoch after.
    pub async fn raise_epoch(&self, volume: u64, epoch: u64) -> Result<u64, Refusal> {
        self.inner
            .meta
            .append_if(
                || self.epoch(volume) < epoch,
                vec![Record::Epoch { volume, epoch }],
            )
            .await
            .map_err(|e| {
                self.fail_meta(&e);
                Refusal::new(io_status(&e), format!("persisting the epoch: {e}"))
            })?;
        Ok(self.epoch(volume))
    }

    /// Store a per-volume record if `seq` is newer than the one held.
    pub async fn put_blob(
        &self,
        volume: u64,
        name: u8,
        seq: u64,
        data: Bytes,
    ) -> Result<(), Refusal> {
        self.check_writable()?;
        let newer = || {
            self.inner.meta.with_state(|s| {
                s.blobs
                    .iter()
                    .find(|(v, n, _, _)| *v == volume && *n == name)
                    .is_none_or(|b| b.2 < seq)
            })
        };
        self.inner
            .meta
            .append_if(
                newer,
                vec![Record::Blob {
                    volume,
                    name,
                    seq,
                    data,
                }],
            )
            .await
            .map_err(|e| {
                self.fail_meta(&e);
                Refusal::new(io_status(&e), format!("persisting the record: {e}"))
            })
    }

    /// A per-volume record: `(seq, data)`, `(0, empty)` when absent.
    pub fn get_blob(&self, volume: u64, name: u8) -> (u64, Bytes) {
        self.inner.meta.with_state(|s| {
            s.blobs
                .iter()
                .find(|(v, n, _, _)| *v == volume && *n == name)
                .map_or((0, Bytes::new()), |b| (b.2, b.3.clone()))
        })
    }

    fn extent(&self, key: &ExtentKey) -> Option<Rc<ExtentMem>> {
        self.inner.extents.borrow().get(key).cloned()
    }

    /// The extent for `key`, allocated (durably) if missing.
    async fn extent_or_alloc(
        &self,
        key: ExtentKey,
        chunk: u32,
        pgs: u32,
    ) -> Result<Rc<ExtentMem>, Status> {
        loop {
            if let Some(e) = self.extent(&key) {
                return Ok(e);
            }
            if self.inner.allocating.borrow().contains(&key) {
                let n = self.inner.allocated.notified();
                if self.extent(&key).is_some() || !self.inner.allocating.borrow().contains(&key) {
                    continue;
                }
                n.await;
                continue;
            }
            self.inner.allocating.borrow_mut().insert(key);
            let r = self.allocate(key, chunk, pgs).await;
            self.inner.allocating.borrow_mut().remove(&key);
            self.inner.allocated.notify_waiters();
            return r;
        }
    }

    async fn allocate(
        &self,
        key: ExtentKey,
        chunk: u32,
        pgs: u32,
    ) -> Result<Rc<ExtentMem>, Status> {
        // Reserve the number before the (asynchronous) log append, so that allocations of
        // other keys meanwhile take other numbers.
        let no = self
            .inner
            .meta
            .with_state(|s| s.next_extent)
            .max(self.inner.reserved.get());
        self.inner.reserved.set(no + 1);
        let end = EXTENT_AREA + (u64::from(no) + 1) * EXTENT_SIZE;
        if self.inner.capacity != 0 && end > self.inner.capacity {
            return Err(Status::NO_SPACE);
        }
        let rec = ExtentRec {
            key,
            no,
            chunk,
            pgs,
        };
        self.inner
            .meta
            .append(vec![Record::Extent(rec)])
            .await
            .map_err(|e| {
                self.fail_meta(&e);
                io_status(&e)
            })?;
        let mem = Rc::new(ExtentMem {
            rec,
            // A fresh extent holds nothing of this store: no need to read its headers.
            slots: RefCell::new(Some(vec![[Slot::default(); 2]; rec.pairs() as usize])),
            loading: Cell::new(false),
            loaded: Notify::new(),
        });
        self.inner.extents.borrow_mut().insert(key, mem.clone());
        Ok(mem)
    }

    /// Read every slot header of an extent (once per start).
    async fn ensure_loaded(&self, e: &Rc<ExtentMem>) -> Result<(), Status> {
        loop {
            if e.slots.borrow().is_some() {
                return Ok(());
            }
            if e.loading.get() {
                let n = e.loaded.notified();
                if e.slots.borrow().is_some() || !e.loading.get() {
                    continue;
                }
                n.await;
                continue;
            }
            e.loading.set(true);
            let r = self.load(&e.rec).await;
            e.loading.set(false);
            if let Ok(v) = &r {
                *e.slots.borrow_mut() = Some(v.clone());
            }
            e.loaded.notify_waiters();
            return r.map(drop);
        }
    }

    async fn load(&self, rec: &ExtentRec) -> Result<Vec<[Slot; 2]>, Status> {
        let pairs = rec.pairs();
        let mut out = vec![[Slot::default(); 2]; pairs as usize];
        // Only slots whose header lies in allocated space can hold anything: on a sparse
        // file, skip the holes (most of a young extent).
        let segments = self.data_segments(rec);
        let mut batch = Vec::new();
        for pair in 0..pairs {
            for slot in 0..2 {
                let off = rec.slot_offset(pair, slot);
                let end = off + BLOCK as u64;
                if segments.iter().any(|&(a, b)| off < b && end > a) {
                    batch.push((pair, slot));
                }
            }
        }
        for part in batch.chunks(128) {
            let reads = part.iter().map(|&(pair, slot)| {
                let off = rec.slot_offset(pair, slot);
                let eng = self.inner.engine.clone();
                let fd = self.inner.fd.clone();
                async move {
                    let (r, buf) = eng
                        .read_at(&fd, AlignedBuf::for_overwrite(BLOCK, BLOCK), off)
                        .await;
                    (pair, slot, r, buf)
                }
            });
            for (pair, slot, r, buf) in futures_util::future::join_all(reads).await {
                match r {
                    Ok(n) if n == BLOCK => {}
                    Ok(_) => continue, // beyond the end of a sparse file: never written
                    Err(e) => return Err(io_status(&e)),
                }
                let stripe = rec.stripe_of(pair);
                if let Some(h) = SlotHeader::decode(&buf) {
                    if self.header_matches(&h, rec.key.volume, stripe, rec.key.index)
                        && h.flags & FLAG_VOID == 0
                    {
                        out[pair as usize][slot] = Slot {
                            version: h.version,
                            kind: if h.flags & FLAG_ZERO != 0 { ZERO } else { DATA },
                        };
                    }
                }
            }
        }
        Ok(out)
    }

    /// The allocated byte ranges of an extent (the whole extent where the file system cannot
    /// tell, as on block devices).
    fn data_segments(&self, rec: &ExtentRec) -> Vec<(u64, u64)> {
        let start = rec.slot_offset(0, 0);
        let end = start + EXTENT_SIZE;
        let whole = vec![(start, end)];
        if self.inner.is_block {
            return whole;
        }
        let fd = self.inner.fd.as_fd();
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            match sys::lseek(fd, pos, libc::SEEK_DATA) {
                Ok(Some(d)) if d < end => {
                    let h = match sys::lseek(fd, d, libc::SEEK_HOLE) {
                        Ok(Some(h)) => h.min(end),
                        Ok(None) => end,
                        Err(_) => return whole,
                    };
                    out.push((d, h));
                    pos = h.max(d + 1);
                }
                Ok(_) => break,
                Err(_) => return whole,
            }
        }
        out
    }

    fn header_matches(&self, h: &SlotHeader, volume: u64, stripe: u64, index: u8) -> bool {
        h.store == self.inner.store_id
            && h.volume == volume
            && h.stripe == stripe
            && h.index == index
    }

    async fn lock_pair(&self, key: ExtentKey, pair: u32) -> PairGuard {
        loop {
            let n = self.inner.released.notified();
            if self.inner.busy.borrow_mut().insert((key, pair)) {
                return PairGuard {
                    store: self.inner.clone(),
                    key,
                    pair,
                };
            }
            n.await;
        }
    }

    fn slots(e: &ExtentMem, pair: u32) -> [Slot; 2] {
        e.slots
            .borrow()
            .as_ref()
            .map_or([Slot::default(); 2], |v| v[pair as usize])
    }

    fn set_slot(e: &ExtentMem, pair: u32, slot: usize, s: Slot) {
        if let Some(v) = e.slots.borrow_mut().as_mut() {
            v[pair as usize][slot] = s;
        }
    }

    fn write_flags(&self) -> RwFlags {
        match self.inner.sync {
            SyncMode::Dsync => RwFlags::DSYNC,
            SyncMode::Batched => RwFlags::NONE,
        }
    }

    fn check_writable(&self) -> Result<(), Refusal> {
        match self.inner.failed.get() {
            0 => Ok(()),
            e => Err(Refusal::new(
                Status::IO_ERROR,
                format!("the store failed a write (errno {e}) and accepts no more"),
            )),
        }
    }

    /// A metadata log append failed: the device failed a durable write, unless the log
    /// merely had no room (which refuses only that append).
    fn fail_meta(&self, e: &io::Error) {
        if e.raw_os_error() != Some(libc::ENOSPC) {
            self.fail(e);
        }
    }

    fn fail(&self, e: &io::Error) {
        if self.inner.failed.get() == 0 {
            let n = e.raw_os_error().unwrap_or(libc::EIO);
            tracing::error!(path = %self.inner.path.display(), errno = n, "write failed; the store is now fail-stop");
            self.inner.failed.set(n);
        }
    }

    /// Write fragments; each is durable when its status is OK.
    pub async fn write(
        &self,
        vol: &VolumeCtx,
        items: Vec<WriteItem>,
    ) -> Result<Vec<Status>, Refusal> {
        let out = self.write_items(vol, items, false).await?;
        Ok(out.into_iter().map(|(s, _)| s).collect())
    }

    /// Write ranges on the fragments' newest copies (each item's `base` must be the node's
    /// newest copy, as for a delta) and return, per item, the bytes each range replaced. The
    /// replaced blocks are checked against their checksums first: a damaged one fails the item
    /// with [`Status::CHECKSUM`] and nothing is written for it.
    pub async fn swap(
        &self,
        vol: &VolumeCtx,
        items: Vec<WriteItem>,
    ) -> Result<Vec<(Status, Bytes)>, Refusal> {
        self.write_items(vol, items, true).await
    }

    async fn write_items(
        &self,
        vol: &VolumeCtx,
        items: Vec<WriteItem>,
        swap: bool,
    ) -> Result<Vec<(Status, Bytes)>, Refusal> {
        self.check_writable()?;
        let work = items.into_iter().map(|it| self.write_one(vol, it, swap));
        let results = futures_util::future::join_all(work).await;
        let mut statuses: Vec<(Status, Bytes)> = Vec::with_capacity(results.len());
        let mut commits = Vec::new();
        for r in results {
            match r {
                Ok((c, old)) => {
                    statuses.push((Status::OK, old));
                    commits.push(c);
                }
                Err(s) => statuses.push((s, Bytes::new())),
            }
        }
        if self.inner.sync == SyncMode::Batched && !commits.is_empty() && !self.inner.memory_fs {
            if let Err(e) = self
                .inner
                .flush
                .sync(&self.inner.engine, &self.inner.fd)
                .await
            {
                self.fail(&e);
                return Err(Refusal::new(Status::IO_ERROR, format!("fdatasync: {e}")));
            }
        }
        for c in commits {
            Self::set_slot(&c.extent, c.pair, c.slot, c.state);
            drop(c.guard);
        }
        self.inner
            .counters
            .writes
            .set(self.inner.counters.writes.get() + statuses.len() as u64);
        Ok(statuses)
    }

    async fn write_one(
        &self,
        vol: &VolumeCtx,
        it: WriteItem,
        swap: bool,
    ) -> Result<(Commit, Bytes), Status> {
        if swap && (it.base == 0 || it.xor || it.zero) {
            return Err(Status::BAD_REQUEST);
        }
        let loc = locate(vol, &it.key);
        let e = self.extent_or_alloc(loc.key, vol.chunk, vol.pgs).await?;
        if e.rec.chunk != vol.chunk || e.rec.pgs != vol.pgs {
            return Err(Status::BAD_REQUEST);
        }
        self.ensure_loaded(&e).await?;
        let guard = self.lock_pair(loc.key, loc.pair).await;
        let cur = Self::slots(&e, loc.pair);
        let v = it.manifest.version;
        let chunk = vol.chunk as usize;
        // A partial write builds on the copy at `base`, which must stay untouched.
        let base_slot = if it.base != 0 {
            match (0..2).find(|&s| cur[s].kind != EMPTY && cur[s].version == it.base) {
                // A delta applies only to the copy it was computed against, and a swap reports
                // what the newest copy held: both need the base to be the newest.
                Some(s)
                    if (it.xor || swap)
                        && cur[1 - s].kind != EMPTY
                        && cur[1 - s].version > it.base =>
                {
                    return Err(Status::NOT_FOUND)
                }
                Some(s) => Some(s),
                None => return Err(Status::NOT_FOUND),
            }
        } else {
            None
        };
        let slot = if let Some(b) = base_slot {
            1 - b
        } else if cur[0].kind != EMPTY && cur[0].version == v {
            0
        } else if cur[1].kind != EMPTY && cur[1].version == v {
            1
        } else if cur[0].kind == EMPTY {
            0
        } else if cur[1].kind == EMPTY {
            1
        } else if cur[0].version <= cur[1].version {
            0
        } else {
            1
        };
        // The new copy's whole data and its block checksums. A partial write merges into the
        // base copy's buffer (read with room for the header in front) and keeps the base's
        // checksums for the blocks it carries over: a block damaged on disk keeps a checksum
        // that does not match it, so the damage stays visible to reads and scrub.
        let mut merged_buf: Option<AlignedBuf> = None;
        let mut replaced = Bytes::new();
        let (data, crcs): (Bytes, Vec<u32>) = match base_slot {
            None if it.zero => (Bytes::new(), Vec::new()),
            None => {
                let crcs = SlotHeader::block_checksums(&it.data);
                (it.data.clone(), crcs)
            }
            Some(b) => {
                let off = it.offset as usize;
                let (mut buf, base_crcs) = match cur[b].kind {
                    ZERO => {
                        let mut buf = AlignedBuf::for_overwrite(BLOCK + chunk, BLOCK);
                        buf[BLOCK..].fill(0);
                        (buf, None)
                    }
                    _ => {
                        let (r, buf) = self
                            .inner
                            .engine
                            .read_at(
                                &self.inner.fd,
                                AlignedBuf::for_overwrite(BLOCK + chunk, BLOCK),
                                e.rec.slot_offset(loc.pair, b),
                            )
                            .await;
                        if !matches!(r, Ok(n) if n == BLOCK + chunk) {
                            return Err(Status::IO_ERROR);
                        }
                        let Some(h) = SlotHeader::decode(&buf) else {
                            self.counters_checksum();
                            return Err(Status::CHECKSUM);
                        };
                        if h.version != it.base {
                            self.counters_checksum();
                            return Err(Status::CHECKSUM);
                        }
                        (buf, Some(h.block_crcs))
                    }
                };
                let range = &mut buf[BLOCK + off..BLOCK + off + it.data.len()];
                if swap {
                    if let Some(c) = &base_crcs {
                        let first = off / BLOCK;
                        let ok = range
                            .chunks(BLOCK)
                            .enumerate()
                            .all(|(i, blk)| c.get(first + i) == Some(&SlotHeader::checksum(blk)));
                        if !ok {
                            self.counters_checksum();
                            return Err(Status::CHECKSUM);
                        }
                    }
                    replaced = Bytes::copy_from_slice(range);
                }
                if it.xor {
                    xor_into(range, &it.data);
                } else {
                    range.copy_from_slice(&it.data);
                }
                let mut crcs = match base_crcs {
                    Some(c) if c.len() == chunk / BLOCK => c,
                    _ => SlotHeader::block_checksums(&buf[BLOCK..]),
                };
                let range = &buf[BLOCK + off..BLOCK + off + it.data.len()];
                for (i, blk) in range.chunks(BLOCK).enumerate() {
                    crcs[off / BLOCK + i] = SlotHeader::checksum(blk);
                }
                merged_buf = Some(buf);
                (Bytes::new(), crcs)
            }
        };
        let zero = it.zero && base_slot.is_none();
        let h = SlotHeader {
            flags: if zero { FLAG_ZERO } else { 0 },
            codec: vol.codec,
            k: vol.k,
            m: vol.m,
            index: it.key.index,
            chunk: vol.chunk,
            volume: vol.volume,
            stripe: it.key.stripe,
            epoch: vol.epoch,
            store: self.inner.store_id,
            version: v,
            data_versions: it.manifest.data.clone(),
            block_crcs: crcs,
        };
        let len = if zero { BLOCK } else { BLOCK + chunk };
        let off = e.rec.slot_offset(loc.pair, slot);
        // Header and data in one write: straight from the data's buffer where its memory suits
        // the descriptor (buffered I/O, or aligned memory), else copied once into an aligned
        // buffer.
        let aligned =
            (data.as_ptr() as usize).is_multiple_of(BLOCK) && data.len().is_multiple_of(BLOCK);
        let r = if let Some(mut buf) = merged_buf {
            h.encode_into(&mut buf);
            self.inner
                .engine
                .write_at(&self.inner.fd, buf, off, self.write_flags())
                .await
                .0
        } else if !zero && (!self.inner.direct || aligned) {
            let mut hb = AlignedBuf::for_overwrite(BLOCK, BLOCK);
            h.encode_into(&mut hb);
            self.inner
                .engine
                .write_vectored_at(
                    &self.inner.fd,
                    vec![hb.into_bytes(), data],
                    off,
                    self.write_flags(),
                )
                .await
                .0
        } else {
            let mut buf = AlignedBuf::for_overwrite(len, BLOCK);
            h.encode_into(&mut buf);
            if !zero {
                buf[BLOCK..].copy_from_slice(&data);
            }
            self.inner
                .engine
                .write_at(&self.inner.fd, buf, off, self.write_flags())
                .await
                .0
        };
        match r {
            Ok(n) if n == len => {}
            Ok(_) => return Err(Status::IO_ERROR),
            Err(err) => {
                self.fail(&err);
                return Err(io_status(&err));
            }
        }
        if zero && !self.inner.is_block {
            // Give the old data's space back (the header says the copy is zeroes).
            let _ = self
                .inner
                .engine
                .fallocate(
                    &self.inner.fd,
                    FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE,
                    off + BLOCK as u64,
                    u64::from(vol.chunk),
                )
                .await;
        }
        Ok((
            Commit {
                extent: e,
                pair: loc.pair,
                slot,
                state: Slot {
                    version: v,
                    kind: if zero { ZERO } else { DATA },
                },
                guard,
            },
            replaced,
        ))
    }

    /// Read fragments.
    pub async fn read(&self, vol: &VolumeCtx, items: Vec<ReadItem>) -> Vec<ReadResult> {
        let work = items.into_iter().map(|it| self.read_one(vol, it));
        let out = futures_util::future::join_all(work).await;
        self.inner
            .counters
            .reads
            .set(self.inner.counters.reads.get() + out.len() as u64);
        out
    }

    fn not(status: Status) -> ReadResult {
        ReadResult {
            status,
            manifest: Manifest::default(),
            zero: false,
            data: Bytes::new(),
        }
    }

    async fn read_one(&self, vol: &VolumeCtx, it: ReadItem) -> ReadResult {
        let loc = locate(vol, &it.key);
        let Some(e) = self.extent(&loc.key) else {
            return Self::not(Status::NOT_FOUND);
        };
        if e.rec.chunk != vol.chunk || e.rec.pgs != vol.pgs {
            return Self::not(Status::BAD_REQUEST);
        }
        if let Err(s) = self.ensure_loaded(&e).await {
            return Self::not(s);
        }
        let cur = Self::slots(&e, loc.pair);
        let pick = match it.want {
            Want::Latest => (0..2)
                .filter(|&s| cur[s].kind != EMPTY)
                .max_by_key(|&s| cur[s].version),
            Want::Version(v) => (0..2).find(|&s| cur[s].kind != EMPTY && cur[s].version == v),
        };
        let Some(slot) = pick else {
            return Self::not(Status::NOT_FOUND);
        };
        let chunk = vol.chunk as usize;
        let zero = cur[slot].kind == ZERO;
        let (from, to) = (
            it.offset as usize,
            if it.len == 0 {
                chunk
            } else {
                (it.offset + it.len) as usize
            },
        );
        // Whole blocks covering the range; the header and everything up to the last of them in
        // one read when that is at most 64 KiB (one I/O instead of two; only the covering
        // blocks are checked), else two reads. In memory (tmpfs) every byte read is a copy and
        // a second read costs little: one read only when it fetches at most one block the
        // range does not need.
        let (b0, b1) = (from / BLOCK, to.div_ceil(BLOCK));
        let together = if self.inner.memory_fs {
            b0 <= 1
        } else {
            b0 == 0 || (b1 - b0) * 2 >= chunk / BLOCK || (1 + b1) * BLOCK <= ONE_READ
        };
        let off = e.rec.slot_offset(loc.pair, slot);
        let io_err = |err: io::Error| {
            if matches!(
                err.raw_os_error(),
                Some(libc::EIO | libc::EILSEQ | libc::EBADMSG)
            ) {
                self.counters_checksum();
                Status::CHECKSUM
            } else {
                Status::IO_ERROR
            }
        };
        let (hbuf, dbuf, dstart): (Bytes, Bytes, usize) = if zero {
            let (r, b) = self
                .inner
                .engine
                .read_at(&self.inner.fd, AlignedBuf::for_overwrite(BLOCK, BLOCK), off)
                .await;
            match r {
                Ok(n) if n == BLOCK => {}
                Ok(_) => return self.corrupt(),
                Err(err) => return Self::not(io_err(err)),
            }
            (b.into_bytes(), Bytes::new(), 0)
        } else if together {
            let len = BLOCK + b1 * BLOCK;
            let (r, b) = self
                .inner
                .engine
                .read_at(&self.inner.fd, AlignedBuf::for_overwrite(len, BLOCK), off)
                .await;
            match r {
                Ok(n) if n == len => {}
                Ok(_) => return self.corrupt(),
                Err(err) => return Self::not(io_err(err)),
            }
            let all = b.into_bytes();
            (
                all.slice(..BLOCK),
                all.slice(BLOCK + b0 * BLOCK..),
                b0 * BLOCK,
            )
        } else {
            let dlen = (b1 - b0) * BLOCK;
            let eng = &self.inner.engine;
            let (hr, dr) = futures_util::future::join(
                eng.read_at(&self.inner.fd, AlignedBuf::for_overwrite(BLOCK, BLOCK), off),
                eng.read_at(
                    &self.inner.fd,
                    AlignedBuf::for_overwrite(dlen, BLOCK),
                    off + (BLOCK + b0 * BLOCK) as u64,
                ),
            )
            .await;
            for (r, want) in [(&hr.0, BLOCK), (&dr.0, dlen)] {
                match r {
                    Ok(n) if *n == want => {}
                    Ok(_) => return self.corrupt(),
                    Err(err) => {
                        return Self::not(io_err(io::Error::from_raw_os_error(
                            err.raw_os_error().unwrap_or(libc::EIO),
                        )))
                    }
                }
            }
            (hr.1.into_bytes(), dr.1.into_bytes(), b0 * BLOCK)
        };
        let Some(h) = SlotHeader::decode(&hbuf) else {
            return self.corrupt();
        };
        if !self.header_matches(&h, vol.volume, it.key.stripe, it.key.index)
            || h.version != cur[slot].version
            || h.flags & FLAG_VOID != 0
        {
            return self.corrupt();
        }
        let manifest = Manifest {
            version: h.version,
            data: h.data_versions.clone(),
        };
        if zero {
            return ReadResult {
                status: Status::OK,
                manifest,
                zero: true,
                data: Bytes::new(),
            };
        }
        if !h.blocks_match(dstart / BLOCK, &dbuf) {
            return self.corrupt();
        }
        ReadResult {
            status: Status::OK,
            manifest,
            zero: false,
            data: dbuf.slice(from - dstart..to - dstart),
        }
    }

    fn counters_checksum(&self) {
        let c = &self.inner.counters.checksum_errors;
        c.set(c.get() + 1);
    }

    fn corrupt(&self) -> ReadResult {
        self.counters_checksum();
        Self::not(Status::CHECKSUM)
    }

    async fn read_header(&self, off: u64) -> Option<SlotHeader> {
        let (r, buf) = self
            .inner
            .engine
            .read_at(&self.inner.fd, AlignedBuf::for_overwrite(BLOCK, BLOCK), off)
            .await;
        match r {
            Ok(n) if n == BLOCK => SlotHeader::decode(&buf),
            _ => None,
        }
    }

    /// The copies held of every fragment of stripes `first..first+count`, ordered by stripe.
    pub async fn versions(
        &self,
        vol: &VolumeCtx,
        first: u64,
        count: u32,
    ) -> Result<Vec<VersionEntry>, Status> {
        let end = first.saturating_add(u64::from(count));
        // The fragments to report: found by walking the stripes of a small range, or the
        // extents of the volume for a large one.
        let mut found: Vec<(Rc<ExtentMem>, u32)> = Vec::new();
        if count <= 65536 {
            for stripe in first..end {
                for index in 0..vol.width() as u8 {
                    let loc = locate(vol, &FragKey { stripe, index });
                    if let Some(e) = self.extent(&loc.key) {
                        found.push((e, loc.pair));
                    }
                }
            }
        } else {
            let mine: Vec<Rc<ExtentMem>> = self
                .inner
                .extents
                .borrow()
                .values()
                .filter(|e| e.rec.key.volume == vol.volume)
                .cloned()
                .collect();
            for e in mine {
                for p in 0..e.rec.pairs() {
                    let st = e.rec.stripe_of(p);
                    if st >= first && st < end {
                        found.push((e.clone(), p));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (e, pair) in found {
            self.ensure_loaded(&e).await?;
            let cur = Self::slots(&e, pair);
            if cur.iter().all(|x| x.kind == EMPTY) {
                continue;
            }
            {
                let stripe = e.rec.stripe_of(pair);
                let mut slots = Vec::new();
                for (s, c) in cur.iter().enumerate() {
                    if c.kind == EMPTY {
                        continue;
                    }
                    if let Some(h) = self.read_header(e.rec.slot_offset(pair, s)).await {
                        if self.header_matches(&h, vol.volume, stripe, e.rec.key.index)
                            && h.version == c.version
                        {
                            slots.push(SlotInfo {
                                manifest: Manifest {
                                    version: h.version,
                                    data: h.data_versions,
                                },
                                zero: h.flags & FLAG_ZERO != 0,
                            });
                        }
                    }
                }
                slots.sort_by_key(|x| std::cmp::Reverse(x.manifest.version));
                out.push(VersionEntry {
                    key: FragKey {
                        stripe,
                        index: e.rec.key.index,
                    },
                    slots,
                });
            }
        }
        out.sort_by_key(|e| e.key);
        Ok(out)
    }

    async fn void_slot(
        &self,
        e: &ExtentMem,
        pair: u32,
        slot: usize,
        vol: &VolumeCtx,
        stripe: u64,
    ) -> Result<(), Status> {
        let off = e.rec.slot_offset(pair, slot);
        let h = SlotHeader {
            flags: FLAG_VOID,
            codec: vol.codec,
            k: vol.k,
            m: vol.m,
            index: e.rec.key.index,
            chunk: vol.chunk,
            volume: vol.volume,
            stripe,
            epoch: vol.epoch,
            store: self.inner.store_id,
            version: 0,
            data_versions: Vec::new(),
            block_crcs: Vec::new(),
        };
        let mut buf = AlignedBuf::for_overwrite(BLOCK, BLOCK);
        h.encode_into(&mut buf);
        // Rare operations: each is durable on its own.
        let (r, _) = self
            .inner
            .engine
            .write_at(&self.inner.fd, buf, off, RwFlags::DSYNC)
            .await;
        match r {
            Ok(n) if n == BLOCK => Ok(()),
            Ok(_) => Err(Status::IO_ERROR),
            Err(err) => {
                self.fail(&err);
                Err(io_status(&err))
            }
        }
    }

    /// Void the copy holding each given version (a rollback). NOT_FOUND where no copy holds it.
    pub async fn revert(
        &self,
        vol: &VolumeCtx,
        items: Vec<(FragKey, u64)>,
    ) -> Result<Vec<Status>, Refusal> {
        self.check_writable()?;
        let mut out = Vec::with_capacity(items.len());
        for (key, version) in items {
            let loc = locate(vol, &key);
            let Some(e) = self.extent(&loc.key) else {
                out.push(Status::NOT_FOUND);
                continue;
            };
            if let Err(s) = self.ensure_loaded(&e).await {
                out.push(s);
                continue;
            }
            let _guard = self.lock_pair(loc.key, loc.pair).await;
            let cur = Self::slots(&e, loc.pair);
            let Some(slot) = (0..2).find(|&s| cur[s].kind != EMPTY && cur[s].version == version)
            else {
                out.push(Status::NOT_FOUND);
                continue;
            };
            match self.void_slot(&e, loc.pair, slot, vol, key.stripe).await {
                Ok(()) => {
                    Self::set_slot(&e, loc.pair, slot, Slot::default());
                    out.push(Status::OK);
                }
                Err(s) => out.push(s),
            }
        }
        Ok(out)
    }

    /// Delete every copy of each fragment (space is given back on regular files).
    pub async fn trim(&self, vol: &VolumeCtx, items: Vec<FragKey>) -> Result<Vec<Status>, Refusal> {
        self.check_writable()?;
        let mut out = Vec::with_capacity(items.len());
        for key in items {
            let loc = locate(vol, &key);
            let Some(e) = self.extent(&loc.key) else {
                out.push(Status::OK);
                continue;
            };
            if let Err(s) = self.ensure_loaded(&e).await {
                out.push(s);
                continue;
            }
            let _guard = self.lock_pair(loc.key, loc.pair).await;
            let cur = Self::slots(&e, loc.pair);
            let mut status = Status::OK;
            for (slot, s) in cur.iter().enumerate() {
                if s.kind == EMPTY {
                    continue;
                }
                if let Err(st) = self.void_slot(&e, loc.pair, slot, vol, key.stripe).await {
                    status = st;
                    break;
                }
                Self::set_slot(&e, loc.pair, slot, Slot::default());
                if !self.inner.is_block {
                    let off = e.rec.slot_offset(loc.pair, slot);
                    let _ = self
                        .inner
                        .engine
                        .fallocate(
                            &self.inner.fd,
                            FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE,
                            off + BLOCK as u64,
                            u64::from(e.rec.chunk),
                        )
                        .await;
                }
            }
            out.push(status);
        }
        Ok(out)
    }

    /// How far the running scrub (or else the last one) has got.
    pub fn scrub_progress(&self) -> ScrubProgress {
        self.inner.scrub.get()
    }

    /// Verify the checksum of every copy held, at most `rate` bytes a second (0: unlimited).
    /// One scrub runs at a time: a second one waits for the first to end, then runs.
    /// [`FragmentStore::scrub_progress`] follows it.
    pub async fn scrub(&self, rate: u64) -> ScrubReport {
        let _one = self.inner.scrubbing.lock().await;
        let mut report = ScrubReport::default();
        let start = Instant::now();
        let all: Vec<Rc<ExtentMem>> = self.inner.extents.borrow().values().cloned().collect();
        let mut loaded = Vec::with_capacity(all.len());
        let mut total = 0u64;
        for e in all {
            if self.ensure_loaded(&e).await.is_err() {
                continue;
            }
            for pair in 0..e.rec.pairs() {
                let copies = Self::slots(&e, pair)
                    .iter()
                    .filter(|c| c.kind == DATA)
                    .count();
                total += (copies * (BLOCK + e.rec.chunk as usize)) as u64;
            }
            loaded.push(e);
        }
        let progress = |report: &ScrubReport, running: bool| {
            let p = self.inner.scrub.get();
            self.inner.scrub.set(ScrubProgress {
                scrubs: p.scrubs,
                running,
                total_bytes: total,
                done_bytes: report.bytes,
                checked: report.checked,
                mismatches: report.mismatches,
            });
        };
        let p = self.inner.scrub.get();
        self.inner.scrub.set(ScrubProgress {
            scrubs: p.scrubs + 1,
            ..ScrubProgress::default()
        });
        progress(&report, true);
        for e in loaded {
            for pair in 0..e.rec.pairs() {
                let cur = Self::slots(&e, pair);
                for (slot, c) in cur.iter().enumerate() {
                    if c.kind != DATA {
                        continue;
                    }
                    let len = BLOCK + e.rec.chunk as usize;
                    let off = e.rec.slot_offset(pair, slot);
                    let _g = self.lock_pair(e.rec.key, pair).await;
                    // The copy may have been replaced while we waited.
                    if Self::slots(&e, pair)[slot] != *c {
                        continue;
                    }
                    let (r, buf) = self
                        .inner
                        .engine
                        .read_at(&self.inner.fd, AlignedBuf::for_overwrite(len, BLOCK), off)
                        .await;
                    report.checked += 1;
                    report.bytes += len as u64;
                    let ok = matches!(r, Ok(n) if n == len)
                        && SlotHeader::decode(&buf).is_some_and(|h| {
                            h.version == c.version && h.blocks_match(0, &buf[BLOCK..])
                        });
                    if !ok {
                        report.mismatches += 1;
                        self.counters_checksum();
                        tracing::warn!(
                            volume = e.rec.key.volume,
                            pg = e.rec.key.pg,
                            index = e.rec.key.index,
                            pair,
                            slot,
                            version = cur[slot].version,
                            "scrub: checksum mismatch"
                        );
                    }
                    progress(&report, true);
                    if rate > 0 {
                        let due = Duration::from_secs_f64(report.bytes as f64 / rate as f64);
                        let spent = start.elapsed();
                        if due > spent {
                            tokio::time::sleep(due - spent).await;
                        }
                    }
                }
            }
        }
        progress(&report, false);
        report
    }
}

struct Commit {
    extent: Rc<ExtentMem>,
    pair: u32,
    slot: usize,
    state: Slot,
    guard: PairGuard,
}

/// Holds one fragment's slots against concurrent writers.
struct PairGuard {
    store: Rc<Inner>,
    key: ExtentKey,
    pair: u32,
}

impl Drop for PairGuard {
    fn drop(&mut self) {
        self.store.busy.borrow_mut().remove(&(self.key, self.pair));
        self.store.released.notify_waiters();
    }
}

/// Largest read that fetches a slot's header together with data blocks it does not need.
const ONE_READ: usize = 64 * 1024;

/// `dst ^= src`, eight bytes at a time.
fn xor_into(dst: &mut [u8], src: &[u8]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        let x = u64::from_le_bytes((&*a).try_into().expect("8 bytes"))
            ^ u64::from_le_bytes(b.try_into().expect("8 bytes"));
        a.copy_from_slice(&x.to_le_bytes());
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= b;
    }
}

/// Group commit: one `fdatasync` shared by every write that finished before it started. A sync that fails
/// fails every write waiting on it, and every later one: the kernel reports a writeback error
/// once, so a second `fdatasync` would succeed without the lost data being on the disk.
#[derive(Default)]
struct Flusher {
    requested: Cell<u64>,
    done: Cell<u64>,
    running: Cell<bool>,
    /// The errno of the sync that failed, for good.
    failed: Cell<Option<i32>>,
    finished: Notify,
}

impl Flusher {
    async fn sync(&self, engine: &Uring, fd: &SharedFd) -> io::Result<()> {
        let mine = self.requested.get() + 1;
        self.requested.set(mine);
        loop {
            if self.done.get() >= mine {
                return Ok(());
            }
            if let Some(errno) = self.failed.get() {
                return Err(io::Error::from_raw_os_error(errno));
            }
            if !self.running.get() {
                self.running.set(true);
                let target = self.requested.get();
                let r = engine.fdatasync(fd).await;
                self.running.set(false);
                match &r {
                    Ok(()) => self.done.set(target),
                    Err(e) => self.failed.set(Some(e.raw_os_error().unwrap_or(libc::EIO))),
                }
                self.finished.notify_waiters();
                continue;
            }
            let n = self.finished.notified();
            if self.done.get() >= mine || !self.running.get() {
                continue;
            }
            n.await;
        }
    }
}

#[cfg(test)]
mod tests;
