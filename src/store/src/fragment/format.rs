//! The byte layouts of the fragment store (see `FORMAT.md` beside this crate for the picture).
//! Everything here is pure: encode to and decode from byte slices, checksums included.

use bytes::Bytes;

/// The unit of every on-disk structure and of all I/O.
pub const BLOCK: usize = 4096;
/// Superblock magic.
pub const SUPER_MAGIC: [u8; 8] = *b"TSRNODE\0";
/// Format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Slot header magic.
pub const SLOT_MAGIC: [u8; 4] = *b"TSFR";
/// Metadata record magic.
pub const RECORD_MAGIC: [u8; 4] = *b"TSML";
/// Bytes of one extent.
pub const EXTENT_SIZE: u64 = 64 << 20;
/// Bytes of one half of the metadata log.
pub const META_HALF: u64 = 16 << 20;
/// Offset of the metadata log (after the two superblock copies).
pub const META_OFFSET: u64 = 2 * BLOCK as u64;
/// Offset of extent 0.
pub const EXTENT_AREA: u64 = META_OFFSET + 2 * META_HALF;
/// Most bytes a node id may have.
pub const MAX_ID: usize = 255;

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The superblock: what a store is and where its parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The node's id (stable for the life of the store).
    pub node_id: String,
    /// Random identity of this store, set when it was formatted.
    pub uuid: [u8; 16],
    /// Bytes the store may use (0: as much as the file system gives).
    pub capacity: u64,
}

impl Superblock {
    /// Encode into one block.
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(&SUPER_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, BLOCK as u32);
        put_u64(&mut b, 16, EXTENT_SIZE);
        put_u64(&mut b, 24, META_OFFSET);
        put_u64(&mut b, 32, META_HALF);
        put_u64(&mut b, 40, EXTENT_AREA);
        put_u64(&mut b, 48, self.capacity);
        b[56..72].copy_from_slice(&self.uuid);
        let id = self.node_id.as_bytes();
        let n = id.len().min(MAX_ID);
        b[72] = n as u8;
        b[73..73 + n].copy_from_slice(&id[..n]);
        let c = crc(&b[..BLOCK - 4]);
        put_u32(&mut b, BLOCK - 4, c);
        b
    }

    /// Decode one block: `Ok(None)` when it is not a superblock at all (all zeroes, or another
    /// magic), an error when it is one but damaged or of another format.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, String> {
        if b.len() < BLOCK || b[0..8] != SUPER_MAGIC {
            return Ok(None);
        }
        if get_u32(b, BLOCK - 4) != crc(&b[..BLOCK - 4]) {
            return Err("superblock checksum mismatch".into());
        }
        let v = get_u32(b, 8);
        if v != FORMAT_VERSION {
            return Err(format!(
                "format version {v}, this build reads {FORMAT_VERSION}"
            ));
        }
        if get_u32(b, 12) as usize != BLOCK
            || get_u64(b, 16) != EXTENT_SIZE
            || get_u64(b, 24) != META_OFFSET
            || get_u64(b, 32) != META_HALF
            || get_u64(b, 40) != EXTENT_AREA
        {
            return Err("superblock geometry differs from this build's".into());
        }
        let n = usize::from(b[72]);
        let node_id = String::from_utf8(b[73..73 + n].to_vec())
            .map_err(|_| "node id is not UTF-8".to_string())?;
        Ok(Some(Self {
            node_id,
            uuid: b[56..72].try_into().expect("16 bytes"),
            capacity: get_u64(b, 48),
        }))
    }
}

/// Slot flag: the fragment is all zeroes; no data follows.
pub const FLAG_ZERO: u8 = 1;
/// Slot flag: the copy was reverted (rolled back); the slot is free.
pub const FLAG_VOID: u8 = 2;

/// The header block at the start of every slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHeader {
    /// [`FLAG_ZERO`], [`FLAG_VOID`].
    pub flags: u8,
    /// Codec id of the volume.
    pub codec: u8,
    /// Data chunks per stripe.
    pub k: u8,
    /// Parity chunks per stripe.
    pub m: u8,
    /// Fragment index.
    pub index: u8,
    /// Chunk bytes.
    pub chunk: u32,
    /// Volume id.
    pub volume: u64,
    /// Stripe.
    pub stripe: u64,
    /// The writer's fencing epoch.
    pub epoch: u64,
    /// The store this copy was written by (the first 8 bytes of its uuid), so that headers
    /// left on a device by an earlier store are never taken for this one's.
    pub store: u64,
    /// The stripe version this copy belongs to.
    pub version: u64,
    /// Versions of the stripe's data chunks in that state (`k` of them).
    pub data_versions: Vec<u64>,
    /// crc32c of each 4 KiB block of the chunk's data (empty for zero fragments).
    pub block_crcs: Vec<u32>,
}

/// Offset of the manifest's data-version count in the header.
const H_NVERS: usize = 56;
/// Offset of the number of block checksums, then the checksums (up to 256: 1 MiB chunks).
const H_NCRC: usize = 1024;
/// Most block checksums a header holds.
pub const MAX_BLOCKS: usize = 256;
const H_CRC: usize = BLOCK - 4;

impl SlotHeader {
    /// Encode into the first [`BLOCK`] bytes of `b`.
    pub fn encode_into(&self, b: &mut [u8]) {
        let b = &mut b[..BLOCK];
        b.fill(0);
        b[0..4].copy_from_slice(&SLOT_MAGIC);
        b[4] = 1;
        b[5] = self.flags;
        b[6] = self.codec;
        b[7] = self.k;
        b[8] = self.m;
        b[9] = self.index;
        put_u32(b, 12, self.chunk);
        put_u64(b, 16, self.volume);
        put_u64(b, 24, self.stripe);
        put_u64(b, 32, self.epoch);
        put_u64(b, 40, self.version);
        put_u64(b, 48, self.store);
        b[H_NVERS] = self.data_versions.len() as u8;
        for (i, v) in self.data_versions.iter().enumerate() {
            put_u64(b, H_NVERS + 1 + 8 * i, *v);
        }
        let n = self.block_crcs.len().min(MAX_BLOCKS);
        put_u32(b, H_NCRC, n as u32);
        for (i, c) in self.block_crcs.iter().take(n).enumerate() {
            put_u32(b, H_NCRC + 4 + 4 * i, *c);
        }
        let c = crc(&b[..Self::covered(n)]);
        put_u32(b, H_CRC, c);
    }

    /// Bytes the header checksum covers: everything up to the last block checksum (the rest
    /// of the block is zero and never read).
    fn covered(ncrc: usize) -> usize {
        H_NCRC + 4 + 4 * ncrc
    }

    /// Decode a header block; `None` if it is not a valid header (never written, torn, or
    /// damaged).
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < BLOCK || b[0..4] != SLOT_MAGIC || b[4] != 1 {
            return None;
        }
        let n = usize::from(b[H_NVERS]);
        let ncrc = get_u32(b, H_NCRC) as usize;
        if n > 16 || ncrc > MAX_BLOCKS {
            return None;
        }
        if get_u32(b, H_CRC) != crc(&b[..Self::covered(ncrc)]) {
            return None;
        }
        Some(Self {
            flags: b[5],
            codec: b[6],
            k: b[7],
            m: b[8],
            index: b[9],
            chunk: get_u32(b, 12),
            volume: get_u64(b, 16),
            stripe: get_u64(b, 24),
            epoch: get_u64(b, 32),
            version: get_u64(b, 40),
            store: get_u64(b, 48),
            data_versions: (0..n).map(|i| get_u64(b, H_NVERS + 1 + 8 * i)).collect(),
            block_crcs: (0..ncrc).map(|i| get_u32(b, H_NCRC + 4 + 4 * i)).collect(),
        })
    }

    /// The crc32c of one block as stored in headers.
    pub fn checksum(data: &[u8]) -> u32 {
        crc(data)
    }

    /// The checksums of every 4 KiB block of `data`.
    pub fn block_checksums(data: &[u8]) -> Vec<u32> {
        data.chunks(BLOCK).map(crc).collect()
    }

    /// Whether blocks `first..` of the chunk, given as `data` (whole blocks), match.
    pub fn blocks_match(&self, first: usize, data: &[u8]) -> bool {
        data.chunks(BLOCK)
            .enumerate()
            .all(|(i, blk)| self.block_crcs.get(first + i) == Some(&crc(blk)))
    }
}

/// Where an extent's fragments belong: one volume's fragments of one index in one PG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentKey {
    /// Volume id.
    pub volume: u64,
    /// Placement group.
    pub pg: u32,
    /// Fragment index.
    pub index: u8,
    /// Which run of the PG's stripes (`(stripe / pgs) / pairs_per_extent`).
    pub seq: u32,
}

/// An allocated extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRec {
    /// Its owner.
    pub key: ExtentKey,
    /// Extent number: it starts at `EXTENT_AREA + no · EXTENT_SIZE`.
    pub no: u32,
    /// Chunk bytes of its fragments.
    pub chunk: u32,
    /// The volume's PG count (which stripes the pairs hold).
    pub pgs: u32,
}

impl ExtentRec {
    /// The stripe held by pair `pair`.
    pub fn stripe_of(&self, pair: u32) -> u64 {
        let n = u64::from(self.key.seq) * u64::from(self.pairs()) + u64::from(pair);
        n * u64::from(self.pgs.max(1)) + u64::from(self.key.pg)
    }

    /// Bytes of one slot: a header block and a chunk.
    pub fn slot_size(&self) -> u64 {
        BLOCK as u64 + u64::from(self.chunk)
    }

    /// Slot pairs (fragments) the extent holds.
    pub fn pairs(&self) -> u32 {
        pairs_per_extent(self.chunk)
    }

    /// Device offset of slot `slot` (0 or 1) of pair `pair`.
    pub fn slot_offset(&self, pair: u32, slot: usize) -> u64 {
        EXTENT_AREA
            + u64::from(self.no) * EXTENT_SIZE
            + u64::from(pair) * 2 * self.slot_size()
            + slot as u64 * self.slot_size()
    }
}

/// Fragments per extent for a chunk size.
pub fn pairs_per_extent(chunk: u32) -> u32 {
    (EXTENT_SIZE / (2 * (BLOCK as u64 + u64::from(chunk)))) as u32
}

/// A metadata log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The whole state; the first record of a log half.
    Snapshot(MetaState),
    /// An extent was allocated.
    Extent(ExtentRec),
    /// A volume's fencing epoch was raised.
    Epoch {
        /// Volume.
        volume: u64,
        /// New epoch.
        epoch: u64,
    },
    /// A per-volume record was stored.
    Blob {
        /// Volume.
        volume: u64,
        /// Record name.
        name: u8,
        /// Its sequence number.
        seq: u64,
        /// Contents.
        data: Bytes,
    },
}

/// Everything the metadata log holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaState {
    /// The next extent number to allocate.
    pub next_extent: u32,
    /// Allocated extents.
    pub extents: Vec<ExtentRec>,
    /// Highest epoch seen per volume.
    pub epochs: Vec<(u64, u64)>,
    /// Per-volume records: (volume, name) → (seq, data).
    pub blobs: Vec<(u64, u8, u64, Bytes)>,
}

impl MetaState {
    /// Apply one record (not a snapshot).
    pub fn apply(&mut self, r: &Record) {
        match r {
            Record::Snapshot(s) => *self = s.clone(),
            Record::Extent(e) => {
                self.next_extent = self.next_extent.max(e.no + 1);
                self.extents.push(*e);
            }
            Record::Epoch { volume, epoch } => {
                match self.epochs.iter_mut().find(|(v, _)| v == volume) {
                    Some((_, e)) => *e = (*e).max(*epoch),
                    None => self.epochs.push((*volume, *epoch)),
                }
            }
            Record::Blob {
                volume,
                name,
                seq,
                data,
            } => match self
                .blobs
                .iter_mut()
                .find(|(v, n, _, _)| v == volume && n == name)
            {
                Some(b) if b.2 < *seq => {
                    b.2 = *seq;
                    b.3 = data.clone();
                }
                Some(_) => {}
                None => self.blobs.push((*volume, *name, *seq, data.clone())),
            },
        }
    }
}

const KIND_SNAPSHOT: u32 = 1;
const KIND_EXTENT: u32 = 2;
const KIND_EPOCH: u32 = 3;
const KIND_BLOB: u32 = 4;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 32;

fn encode_extent(e: &ExtentRec, p: &mut Vec<u8>) {
    p.extend_from_slice(&e.key.volume.to_le_bytes());
    p.extend_from_slice(&e.key.pg.to_le_bytes());
    p.push(e.key.index);
    p.extend_from_slice(&e.key.seq.to_le_bytes());
    p.extend_from_slice(&e.no.to_le_bytes());
    p.extend_from_slice(&e.chunk.to_le_bytes());
    p.extend_from_slice(&e.pgs.to_le_bytes());
}

const EXTENT_REC_LEN: usize = 8 + 4 + 1 + 4 + 4 + 4 + 4;

fn decode_extent(p: &[u8]) -> ExtentRec {
    ExtentRec {
        key: ExtentKey {
            volume: get_u64(p, 0),
            pg: get_u32(p, 8),
            index: p[12],
            seq: get_u32(p, 13),
        },
        no: get_u32(p, 17),
        chunk: get_u32(p, 21),
        pgs: get_u32(p, 25),
    }
}

impl Record {
    /// Encode with sequence number `seq`, padded to whole blocks.
    pub fn encode(&self, seq: u64) -> Vec<u8> {
        let mut p = Vec::new();
        let kind = match self {
            Record::Snapshot(s) => {
                p.extend_from_slice(&s.next_extent.to_le_bytes());
                p.extend_from_slice(&(s.extents.len() as u32).to_le_bytes());
                for e in &s.extents {
                    encode_extent(e, &mut p);
                }
                p.extend_from_slice(&(s.epochs.len() as u32).to_le_bytes());
                for (v, e) in &s.epochs {
                    p.extend_from_slice(&v.to_le_bytes());
                    p.extend_from_slice(&e.to_le_bytes());
                }
                p.extend_from_slice(&(s.blobs.len() as u32).to_le_bytes());
                for (v, n, sq, d) in &s.blobs {
                    p.extend_from_slice(&v.to_le_bytes());
                    p.push(*n);
                    p.extend_from_slice(&sq.to_le_bytes());
                    p.extend_from_slice(&(d.len() as u32).to_le_bytes());
                    p.extend_from_slice(d);
                }
                KIND_SNAPSHOT
            }
            Record::Extent(e) => {
                encode_extent(e, &mut p);
                KIND_EXTENT
            }
            Record::Epoch { volume, epoch } => {
                p.extend_from_slice(&volume.to_le_bytes());
                p.extend_from_slice(&epoch.to_le_bytes());
                KIND_EPOCH
            }
            Record::Blob {
                volume,
                name,
                seq,
                data,
            } => {
                p.extend_from_slice(&volume.to_le_bytes());
                p.push(*name);
                p.extend_from_slice(&seq.to_le_bytes());
                p.extend_from_slice(data);
                KIND_BLOB
            }
        };
        let total = (RECORD_HEADER + p.len()).div_ceil(BLOCK) * BLOCK;
        let mut out = vec![0u8; total];
        out[0..4].copy_from_slice(&RECORD_MAGIC);
        put_u32(&mut out, 4, kind);
        put_u64(&mut out, 8, seq);
        put_u32(&mut out, 16, p.len() as u32);
        put_u32(&mut out, 20, crc(&p));
        let hc = crc(&out[..24]);
        put_u32(&mut out, 24, hc);
        out[RECORD_HEADER..RECORD_HEADER + p.len()].copy_from_slice(&p);
        out
    }

    /// Decode a record header: `(seq, payload length)` if valid.
    pub fn decode_header(b: &[u8]) -> Option<(u64, usize)> {
        if b.len() < RECORD_HEADER || b[0..4] != RECORD_MAGIC {
            return None;
        }
        if get_u32(b, 24) != crc(&b[..24]) {
            return None;
        }
        Some((get_u64(b, 8), get_u32(b, 16) as usize))
    }

    /// Decode a whole record (header and payload): `(seq, record)` if valid.
    pub fn decode(b: &[u8]) -> Option<(u64, Record)> {
        let (seq, len) = Self::decode_header(b)?;
        let p = b.get(RECORD_HEADER..RECORD_HEADER + len)?;
        if get_u32(b, 20) != crc(p) {
            return None;
        }
        let r = match get_u32(b, 4) {
            KIND_SNAPSHOT => {
                let mut at = 0usize;
                let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
                    let s = p.get(*at..*at + n)?;
                    *at += n;
                    Some(s)
                };
                let next_extent = get_u32(take(&mut at, 4)?, 0);
                let n = get_u32(take(&mut at, 4)?, 0) as usize;
                let mut extents = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    extents.push(decode_extent(take(&mut at, EXTENT_REC_LEN)?));
                }
                let n = get_u32(take(&mut at, 4)?, 0) as usize;
                let mut epochs = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    let e = take(&mut at, 16)?;
                    epochs.push((get_u64(e, 0), get_u64(e, 8)));
                }
                let n = get_u32(take(&mut at, 4)?, 0) as usize;
                let mut blobs = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    let h = take(&mut at, 21)?;
                    let (v, name, sq, len) =
                        (get_u64(h, 0), h[8], get_u64(h, 9), get_u32(h, 17) as usize);
                    let d = Bytes::copy_from_slice(take(&mut at, len)?);
                    blobs.push((v, name, sq, d));
                }
                Record::Snapshot(MetaState {
                    next_extent,
                    extents,
                    epochs,
                    blobs,
                })
            }
            KIND_EXTENT if p.len() == EXTENT_REC_LEN => Record::Extent(decode_extent(p)),
            KIND_EPOCH if p.len() == 16 => Record::Epoch {
                volume: get_u64(p, 0),
                epoch: get_u64(p, 8),
            },
            KIND_BLOB if p.len() >= 17 => Record::Blob {
                volume: get_u64(p, 0),
                name: p[8],
                seq: get_u64(p, 9),
                data: Bytes::copy_from_slice(&p[17..]),
            },
            _ => return None,
        };
        Some((seq, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_damage() {
        let s = Superblock {
            node_id: "node-7".into(),
            uuid: [3; 16],
            capacity: 1 << 40,
        };
        let mut b = s.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), Some(s));
        assert_eq!(Superblock::decode(&[0u8; BLOCK]).unwrap(), None);
        b[100] ^= 1;
        assert!(Superblock::decode(&b).is_err());
    }

    #[test]
    fn slot_header_round_trip_and_damage() {
        let h = SlotHeader {
            flags: FLAG_ZERO,
            codec: 1,
            k: 4,
            m: 2,
            index: 5,
            chunk: 16384,
            volume: 9,
            stripe: 123_456,
            epoch: 3,
            store: 0x1122,
            version: 77,
            data_versions: vec![1, 2, 77, 4],
            block_crcs: vec![1, 2, 3, 0xdead_beef],
        };
        let mut b = vec![0u8; BLOCK];
        h.encode_into(&mut b);
        assert_eq!(SlotHeader::decode(&b), Some(h));
        b[30] ^= 0x40;
        assert_eq!(SlotHeader::decode(&b), None, "a flipped bit is detected");
        b[30] ^= 0x40;
        b[1024 + 4 + 15] ^= 1;
        assert_eq!(
            SlotHeader::decode(&b),
            None,
            "a flipped block checksum is detected"
        );
        b[1024 + 4 + 15] ^= 1;
        assert!(SlotHeader::decode(&b).is_some());
        assert_eq!(SlotHeader::decode(&[0u8; BLOCK]), None);
    }

    #[test]
    fn records_round_trip() {
        let e = ExtentRec {
            key: ExtentKey {
                volume: 1,
                pg: 7,
                index: 2,
                seq: 0,
            },
            no: 3,
            chunk: 4096,
            pgs: 64,
        };
        let recs = [
            Record::Extent(e),
            Record::Epoch {
                volume: 1,
                epoch: 9,
            },
            Record::Blob {
                volume: 1,
                name: 2,
                seq: 5,
                data: Bytes::from_static(b"hello"),
            },
            Record::Snapshot(MetaState {
                next_extent: 4,
                extents: vec![e],
                epochs: vec![(1, 9)],
                blobs: vec![(1, 2, 5, Bytes::from_static(b"hello"))],
            }),
        ];
        for (i, r) in recs.iter().enumerate() {
            let b = r.encode(100 + i as u64);
            assert_eq!(b.len() % BLOCK, 0);
            assert_eq!(Record::decode(&b), Some((100 + i as u64, r.clone())));
            let mut bad = b.clone();
            bad[RECORD_HEADER] ^= 1;
            assert_eq!(Record::decode(&bad), None);
        }
    }

    #[test]
    fn extent_geometry() {
        let e = ExtentRec {
            key: ExtentKey {
                volume: 1,
                pg: 0,
                index: 0,
                seq: 0,
            },
            no: 2,
            chunk: 16384,
            pgs: 8,
        };
        assert_eq!(e.stripe_of(0), 0);
        assert_eq!(e.stripe_of(3), 24);
        assert_eq!(e.pairs(), 1638);
        let last = e.slot_offset(e.pairs() - 1, 1) + e.slot_size();
        assert!(last <= EXTENT_AREA + 3 * EXTENT_SIZE);
        assert_eq!(e.slot_offset(0, 0), EXTENT_AREA + 2 * EXTENT_SIZE);
        assert_eq!(e.slot_offset(0, 0) % BLOCK as u64, 0);
        assert_eq!(e.slot_offset(5, 1) % BLOCK as u64, 0);
    }
}
