//! The fragment protocol's frames, sans IO: bytes in, messages out, and back.
//!
//! # Frame
//!
//! Every frame is a 24-byte header and a body; all integers are big-endian.
//!
//! | bytes | field | |
//! |---|---|---|
//! | 0..2 | magic | `"TS"` |
//! | 2 | version | 1 |
//! | 3 | op | request opcode; a response sets bit 7 |
//! | 4..8 | body length | at most [`MAX_BODY`], checked before anything is buffered |
//! | 8..16 | request id | chosen by the client, echoed in the response; requests pipeline |
//! | 16 | status | responses: [`Status`]; requests: 0 |
//! | 17..24 | reserved | 0 |
//!
//! A response whose status is not [`Status::OK`] carries a text body saying why, except
//! [`Status::STALE_EPOCH`], whose body is the node's current epoch (u64). Per-item outcomes of
//! batched requests (a write of many fragments) are in the body of an OK response.
//!
//! # Bodies
//!
//! Requests that touch a volume start with a [`VolumeCtx`] (volume id, fencing epoch, PG
//! count, profile). Fragment data travels as `Bytes` slices of the received frame: decoding
//! copies nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"TS";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 24;
/// The largest body a peer may announce (a write batch of many 1 MiB fragments).
pub const MAX_BODY: u32 = 64 << 20;
/// The most items one batched request may carry.
pub const MAX_ITEMS: u32 = 4096;
/// The most data versions a manifest may carry (`k` ≤ 16).
pub const MAX_K: u8 = 16;

/// Request opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Op(pub u8);

impl Op {
    /// Identify both ends.
    pub const HELLO: Op = Op(1);
    /// Write fragments at a version.
    pub const WRITE: Op = Op(2);
    /// Read fragments with their versions.
    pub const READ: Op = Op(3);
    /// Read the versions held for a range of stripes, without data.
    pub const VERSIONS: Op = Op(4);
    /// Void the slot holding a version (roll back an uncommitted write).
    pub const REVERT: Op = Op(5);
    /// Delete fragments.
    pub const TRIM: Op = Op(6);
    /// Node statistics.
    pub const STATS: Op = Op(7);
    /// Learn or raise a volume's fencing epoch.
    pub const EPOCH: Op = Op(8);
    /// Verify every fragment's checksum now and report.
    pub const SCRUB: Op = Op(9);
    /// Store a small per-volume record (the gateway's write-intent and degraded logs).
    pub const PUT_BLOB: Op = Op(10);
    /// Fetch a per-volume record.
    pub const GET_BLOB: Op = Op(11);
    /// Write ranges of fragments on their newest copies and return the bytes they replaced
    /// (a data chunk's part of a small write: the old bytes give the parity delta).
    pub const SWAP: Op = Op(12);
    /// How far the scrub in progress (or the last one) has got.
    pub const SCRUB_STATUS: Op = Op(13);

    /// A short lowercase name (for logs and metric labels); `unknown` for an unknown code.
    pub fn name(self) -> &'static str {
        match self {
            Op::HELLO => "hello",
            Op::WRITE => "write",
            Op::READ => "read",
            Op::VERSIONS => "versions",
            Op::REVERT => "revert",
            Op::TRIM => "trim",
            Op::STATS => "stats",
            Op::EPOCH => "epoch",
            Op::SCRUB => "scrub",
            Op::PUT_BLOB => "put_blob",
            Op::GET_BLOB => "get_blob",
            Op::SWAP => "swap",
            Op::SCRUB_STATUS => "scrub_status",
            _ => "unknown",
        }
    }
}

/// Outcome codes, per frame and per item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u8);

impl Status {
    /// Done.
    pub const OK: Status = Status(0);
    /// The request's epoch is older than one the node has seen for the volume.
    pub const STALE_EPOCH: Status = Status(1);
    /// No such fragment (or version).
    pub const NOT_FOUND: Status = Status(2);
    /// The fragment failed its checksum.
    pub const CHECKSUM: Status = Status(3);
    /// The node's store is full.
    pub const NO_SPACE: Status = Status(4);
    /// The request is malformed or inconsistent.
    pub const BAD_REQUEST: Status = Status(5);
    /// The node's disk failed.
    pub const IO_ERROR: Status = Status(6);
    /// The op is not known.
    pub const UNSUPPORTED: Status = Status(7);
    /// The node is shutting down or overloaded; retry.
    pub const BUSY: Status = Status(8);

    /// A short name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Status::OK => "ok",
            Status::STALE_EPOCH => "stale epoch",
            Status::NOT_FOUND => "not found",
            Status::CHECKSUM => "checksum mismatch",
            Status::NO_SPACE => "no space",
            Status::BAD_REQUEST => "bad request",
            Status::IO_ERROR => "I/O error",
            Status::UNSUPPORTED => "unsupported",
            Status::BUSY => "busy",
            _ => "unknown status",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoding failure. At the frame level it is fatal for the connection (lengths can no
/// longer be trusted); inside a body it is answered with [`Status::BAD_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a tessera frame.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 2]),
    /// Another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The announced body is larger than [`MAX_BODY`].
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(u32),
    /// The body ended early.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A count or value is out of range.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Bytes left over after the body.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Opcode (without the response bit).
    pub op: Op,
    /// Whether this is a response.
    pub response: bool,
    /// Body bytes.
    pub body_len: u32,
    /// Request id.
    pub id: u64,
    /// Status (responses).
    pub status: Status,
}

impl Header {
    /// Encode into `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.op.0 | if self.response { 0x80 } else { 0 });
        out.put_u32(self.body_len);
        out.put_u64(self.id);
        out.put_u8(self.status.0);
        out.put_bytes(0, 7);
    }

    /// The header of a frame; its body length is filled in when the body is encoded.
    fn new(op: Op, response: bool, id: u64, status: Status) -> Self {
        Self {
            op,
            response,
            body_len: 0,
            id,
            status,
        }
    }

    /// Encode this header and then the body `body` writes, patching in the body length
    /// afterwards.
    fn encode_with_body(&self, out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
        let start = out.len();
        self.encode(out);
        body(out);
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
    }

    /// Encode this header (with the body length measured first) and the body `enc` writes,
    /// as segments for a vectored write: the fragment data `enc` hands to its callback is
    /// not copied when large, but becomes a segment of its own.
    fn encode_vectored_with_body(
        mut self,
        segs: &mut Vec<Bytes>,
        enc: impl Fn(&mut BytesMut, &mut dyn FnMut(&mut BytesMut, &Bytes)),
    ) {
        self.body_len = body_len(&enc);
        let mut cur = BytesMut::with_capacity(256);
        self.encode(&mut cur);
        enc(&mut cur, &mut |o, b| put_segment(o, b, segs));
        segs.push(cur.freeze());
    }

    /// Decode the first [`HEADER_LEN`] bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < HEADER_LEN {
            return Err(DecodeError::Truncated("header"));
        }
        if b[0..2] != MAGIC {
            return Err(DecodeError::Magic([b[0], b[1]]));
        }
        if b[2] != VERSION {
            return Err(DecodeError::Version(b[2]));
        }
        let body_len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if body_len > MAX_BODY {
            return Err(DecodeError::TooLarge(body_len));
        }
        Ok(Self {
            op: Op(b[3] & 0x7f),
            response: b[3] & 0x80 != 0,
            body_len,
            id: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            status: Status(b[16]),
        })
    }
}

/// A whole frame: header and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The body (a slice of the receive buffer).
    pub body: Bytes,
}

/// Take one frame off the front of `buf`: `Ok(None)` until it is complete. The header is
/// checked (magic, version, length limit) as soon as its 24 bytes are there, so an oversized
/// length is refused before any of its body is buffered.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = Header::decode(&buf[..HEADER_LEN])?;
    let total = HEADER_LEN + header.body_len as usize;
    if buf.len() < total {
        // Room for the rest of this frame and the next ones (see `RECV_STEP`).
        if buf.capacity() < total {
            buf.reserve((total - buf.len()).max(crate::RECV_STEP));
        }
        return Ok(None);
    }
    let mut whole = buf.split_to(total);
    whole.advance(HEADER_LEN);
    Ok(Some(Frame {
        header,
        body: whole.freeze(),
    }))
}

/// Which volume a request is about, with the facts the node needs to place its fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeCtx {
    /// Volume id.
    pub volume: u64,
    /// The sender's fencing epoch for the volume.
    pub epoch: u64,
    /// Placement groups of the volume (stripe `s` is in PG `s mod pgs`).
    pub pgs: u32,
    /// Data chunks per stripe.
    pub k: u8,
    /// Parity chunks per stripe.
    pub m: u8,
    /// Codec id.
    pub codec: u8,
    /// Bytes per chunk.
    pub chunk: u32,
}

const VOLUME_CTX_LEN: usize = 8 + 8 + 4 + 1 + 1 + 1 + 4;

impl VolumeCtx {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.volume);
        out.put_u64(self.epoch);
        out.put_u32(self.pgs);
        out.put_u8(self.k);
        out.put_u8(self.m);
        out.put_u8(self.codec);
        out.put_u32(self.chunk);
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        r.need(VOLUME_CTX_LEN, "volume")?;
        let v = Self {
            volume: r.b.get_u64(),
            epoch: r.b.get_u64(),
            pgs: r.b.get_u32(),
            k: r.b.get_u8(),
            m: r.b.get_u8(),
            codec: r.b.get_u8(),
            chunk: r.b.get_u32(),
        };
        if v.pgs == 0 || v.k == 0 || v.k > MAX_K || v.m > 4 || v.chunk == 0 {
            return Err(DecodeError::Invalid("volume profile"));
        }
        if v.chunk > 1 << 20 || !v.chunk.is_multiple_of(4096) {
            return Err(DecodeError::Invalid("chunk size"));
        }
        Ok(v)
    }

    /// Fragments per stripe.
    pub fn width(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }
}

/// One fragment: stripe and index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// Stripe number.
    pub stripe: u64,
    /// Fragment index, `0..k+m`.
    pub index: u8,
}

impl FragKey {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.stripe);
        out.put_u8(self.index);
    }

    fn decode(r: &mut Reader, vol: &VolumeCtx) -> Result<Self, DecodeError> {
        r.need(9, "fragment key")?;
        let k = Self {
            stripe: r.b.get_u64(),
            index: r.b.get_u8(),
        };
        if usize::from(k.index) >= vol.width() {
            return Err(DecodeError::Invalid("fragment index"));
        }
        Ok(k)
    }
}

/// What a stripe's fragments at one version encode: the version, and the version of each data
/// chunk the parity covers (a data chunk written at this version has `data[i] == version`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Manifest {
    /// The stripe version this fragment was written at.
    pub version: u64,
    /// The version of each of the `k` data chunks in the stripe state this fragment belongs to.
    pub data: Vec<u64>,
}

impl Manifest {
    /// Encoded size for `k` data chunks.
    pub fn encoded_len(k: usize) -> usize {
        9 + 8 * k
    }

    /// Encode.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.version);
        out.put_u8(self.data.len() as u8);
        for v in &self.data {
            out.put_u64(*v);
        }
    }

    /// Decode from a plain byte slice (fragment headers use the same layout).
    pub fn decode_slice(b: &mut &[u8]) -> Result<Self, DecodeError> {
        if b.len() < 9 {
            return Err(DecodeError::Truncated("manifest"));
        }
        let version = b.get_u64();
        let n = b.get_u8();
        if n > MAX_K || b.len() < 8 * usize::from(n) {
            return Err(DecodeError::Invalid("manifest"));
        }
        let data = (0..n).map(|_| b.get_u64()).collect();
        Ok(Self { version, data })
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut s: &[u8] = &r.b;
        let before = s.len();
        let m = Self::decode_slice(&mut s)?;
        let used = before - s.len();
        r.b.advance(used);
        Ok(m)
    }
}

/// One fragment to write: a whole chunk, or (with `base`) the copy at version `base` with
/// the 4 KiB-aligned range at `offset` replaced by `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteItem {
    /// Which fragment.
    pub key: FragKey,
    /// The stripe state it belongs to.
    pub manifest: Manifest,
    /// The fragment is all zeroes (deallocated): `data` is empty.
    pub zero: bool,
    /// A whole chunk (`base == 0`), or the changed range.
    pub data: Bytes,
    /// Where `data` goes in the chunk (0 for a whole chunk).
    pub offset: u32,
    /// 0: `data` is the whole chunk. Else the version of the copy the new one is made from.
    pub base: u64,
    /// With `base`: `data` is XORed into the range instead of replacing it (a parity update
    /// by its delta). The base must then be the node's newest copy.
    pub xor: bool,
}

impl WriteItem {
    /// A whole-chunk write (or a zero fragment when `data` is empty and `zero`).
    pub fn whole(key: FragKey, manifest: Manifest, zero: bool, data: Bytes) -> Self {
        Self {
            key,
            manifest,
            zero,
            data,
            offset: 0,
            base: 0,
            xor: false,
        }
    }
}

/// Which copy of a fragment a read wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The newest valid one.
    Latest,
    /// Exactly this version.
    Version(u64),
}

/// One fragment to read: all of it, or the byte range `offset..offset+len` of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadItem {
    /// Which fragment.
    pub key: FragKey,
    /// Which copy.
    pub want: Want,
    /// First byte of the data wanted.
    pub offset: u32,
    /// Bytes wanted (0 = to the end of the chunk).
    pub len: u32,
}

/// What one fragment read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    /// OK, NOT_FOUND, CHECKSUM or IO_ERROR.
    pub status: Status,
    /// The copy's manifest (its version in `manifest.version`).
    pub manifest: Manifest,
    /// The copy is all zeroes (`data` is empty).
    pub zero: bool,
    /// The requested range.
    pub data: Bytes,
}

/// One copy of a fragment, as the versions query reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Its manifest.
    pub manifest: Manifest,
    /// Written as zeroes.
    pub zero: bool,
}

/// The copies a node holds of one fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionEntry {
    /// Which fragment.
    pub key: FragKey,
    /// Its valid copies, newest first (at most two).
    pub slots: Vec<SlotInfo>,
}

/// Node counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeStats {
    /// Bytes the store may use.
    pub capacity: u64,
    /// Bytes allocated to extents.
    pub allocated: u64,
    /// Fragments written.
    pub writes: u64,
    /// Fragments read.
    pub reads: u64,
    /// Reads and scrubs that found a checksum mismatch.
    pub checksum_errors: u64,
    /// Requests refused for a stale epoch.
    pub stale_epoch_rejects: u64,
    /// The errno of the write or sync that failed the store (0: healthy). A failed store is
    /// fail-stop until it is reopened: it refuses every write.
    pub failed_errno: u64,
}

/// What a scrub found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrubReport {
    /// Copies checked.
    pub checked: u64,
    /// Copies whose checksum did not match.
    pub mismatches: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// How far a node's scrub has got: the one running, or else the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrubProgress {
    /// Scrubs started since the node started (0: none yet).
    pub scrubs: u64,
    /// Whether one is running now.
    pub running: bool,
    /// Bytes it has to read (counted when it started; writes since may add some).
    pub total_bytes: u64,
    /// Bytes it has read.
    pub done_bytes: u64,
    /// Copies checked.
    pub checked: u64,
    /// Copies whose checksum did not match.
    pub mismatches: u64,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Identify the client.
    Hello {
        /// Free text (gateway name, process).
        client: String,
    },
    /// Write fragments.
    Write {
        /// The volume.
        vol: VolumeCtx,
        /// The fragments.
        items: Vec<WriteItem>,
    },
    /// Write ranges built on each fragment's newest copy (`base` set, neither `zero` nor
    /// `xor`), answering with the bytes each replaced.
    Swap {
        /// The volume.
        vol: VolumeCtx,
        /// The ranges.
        items: Vec<WriteItem>,
    },
    /// Read fragments.
    Read {
        /// The volume.
        vol: VolumeCtx,
        /// The fragments.
        items: Vec<ReadItem>,
    },
    /// The versions held for stripes `first..first+count`.
    Versions {
        /// The volume.
        vol: VolumeCtx,
        /// First stripe.
        first: u64,
        /// Stripes.
        count: u32,
    },
    /// Void the copies holding the given versions.
    Revert {
        /// The volume.
        vol: VolumeCtx,
        /// Fragment and version.
        items: Vec<(FragKey, u64)>,
    },
    /// Delete fragments (every copy).
    Trim {
        /// The volume.
        vol: VolumeCtx,
        /// The fragments.
        items: Vec<FragKey>,
    },
    /// Counters.
    Stats,
    /// Raise the volume's epoch to `epoch` (when higher) and return the node's epoch; `epoch` 0
    /// only asks.
    Epoch {
        /// Volume id.
        volume: u64,
        /// The epoch.
        epoch: u64,
    },
    /// Verify everything now.
    Scrub,
    /// How far the scrub has got.
    ScrubStatus,
    /// Store record `name` of the volume, replacing an older `seq`.
    PutBlob {
        /// Volume id.
        volume: u64,
        /// Epoch (checked like any write).
        epoch: u64,
        /// Record name.
        name: u8,
        /// Sequence number; a lower one than stored is ignored.
        seq: u64,
        /// Contents.
        data: Bytes,
    },
    /// Fetch record `name` of the volume.
    GetBlob {
        /// Volume id.
        volume: u64,
        /// Record name.
        name: u8,
    },
}

/// An OK response's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Who the node is.
    Hello {
        /// The node's id.
        node_id: String,
        /// Store capacity in bytes.
        capacity: u64,
    },
    /// Per-item outcome of a write.
    Write(Vec<Status>),
    /// Per-item outcome of a swap, with the replaced bytes (empty unless OK).
    Swap(Vec<(Status, Bytes)>),
    /// Per-item outcome of a read.
    Read(Vec<ReadResult>),
    /// The copies held.
    Versions(Vec<VersionEntry>),
    /// Per-item outcome.
    Revert(Vec<Status>),
    /// Per-item outcome.
    Trim(Vec<Status>),
    /// Counters.
    Stats(NodeStats),
    /// The node's epoch for the volume after the request.
    Epoch(u64),
    /// Scrub findings.
    Scrub(ScrubReport),
    /// Scrub progress.
    ScrubStatus(ScrubProgress),
    /// Stored.
    PutBlob,
    /// The record (`seq` 0 and empty when absent).
    GetBlob {
        /// Its sequence number.
        seq: u64,
        /// Contents.
        data: Bytes,
    },
}

/// The body of a WRITE or SWAP request.
fn decode_write_items(r: &mut Reader) -> Result<(VolumeCtx, Vec<WriteItem>), DecodeError> {
    let vol = VolumeCtx::decode(r)?;
    let n = r.count("write items", 9 + 9 + 1 + 4 + 8 + 4)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let key = FragKey::decode(r, &vol)?;
        let manifest = Manifest::decode(r)?;
        if manifest.data.len() != usize::from(vol.k) {
            return Err(DecodeError::Invalid("manifest length"));
        }
        let flags = r.u8("write flags")?;
        if flags > 3 {
            return Err(DecodeError::Invalid("write flags"));
        }
        let (zero, xor) = (flags & 1 != 0, flags & 2 != 0);
        let offset = r.u32("offset")?;
        let base = r.u64("base version")?;
        if xor && base == 0 {
            return Err(DecodeError::Invalid("xor without a base"));
        }
        let data = r.bytes("fragment data")?;
        if base == 0 {
            let want = if zero { 0 } else { vol.chunk as usize };
            if data.len() != want || offset != 0 {
                return Err(DecodeError::Invalid("fragment length"));
            }
        } else {
            let end = u64::from(offset) + data.len() as u64;
            if zero
                || data.is_empty()
                || offset % 4096 != 0
                || data.len() % 4096 != 0
                || end > u64::from(vol.chunk)
                || base >= manifest.version
            {
                return Err(DecodeError::Invalid("partial fragment write"));
            }
        }
        items.push(WriteItem {
            key,
            manifest,
            zero,
            data,
            offset,
            base,
            xor,
        });
    }
    Ok((vol, items))
}

/// A body cursor over a shared buffer (slices are zero-copy).
struct Reader {
    b: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.b.len() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.b.get_u8())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.b.get_u64())
    }
    fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)?;
        if n > MAX_ITEMS || (n as usize).saturating_mul(min_item) > self.b.len() {
            return Err(DecodeError::Invalid(what));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u32(what)? as usize;
        self.need(n, what)?;
        Ok(self.b.split_to(n))
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid(what))
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.b.len()))
        }
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

/// Data of at least this many bytes travels as its own segment in a vectored frame.
const SEGMENT_MIN: usize = 1024;

fn put_segment(out: &mut BytesMut, b: &Bytes, segs: &mut Vec<Bytes>) {
    out.put_u32(b.len() as u32);
    if b.len() >= SEGMENT_MIN {
        segs.push(out.split().freeze());
        segs.push(b.clone());
    } else {
        out.put_slice(b);
    }
}

/// The body length an encoder produces, without copying its data.
fn body_len(enc: impl FnOnce(&mut BytesMut, &mut dyn FnMut(&mut BytesMut, &Bytes))) -> u32 {
    let mut scratch = BytesMut::new();
    let mut data = 0usize;
    enc(&mut scratch, &mut |o, b| {
        o.put_u32(b.len() as u32);
        data += b.len();
    });
    (scratch.len() + data) as u32
}

fn put_statuses(out: &mut BytesMut, s: &[Status]) {
    out.put_u32(s.len() as u32);
    for x in s {
        out.put_u8(x.0);
    }
}

fn get_statuses(r: &mut Reader) -> Result<Vec<Status>, DecodeError> {
    let n = r.count("statuses", 1)?;
    (0..n).map(|_| r.u8("status").map(Status)).collect()
}

impl Request {
    /// Its opcode.
    pub fn op(&self) -> Op {
        match self {
            Request::Hello { .. } => Op::HELLO,
            Request::Write { .. } => Op::WRITE,
            Request::Swap { .. } => Op::SWAP,
            Request::Read { .. } => Op::READ,
            Request::Versions { .. } => Op::VERSIONS,
            Request::Revert { .. } => Op::REVERT,
            Request::Trim { .. } => Op::TRIM,
            Request::Stats => Op::STATS,
            Request::Epoch { .. } => Op::EPOCH,
            Request::Scrub => Op::SCRUB,
            Request::ScrubStatus => Op::SCRUB_STATUS,
            Request::PutBlob { .. } => Op::PUT_BLOB,
            Request::GetBlob { .. } => Op::GET_BLOB,
        }
    }

    /// The volume and epoch it acts under, for the node's fencing check.
    pub fn fencing(&self) -> Option<(u64, u64)> {
        match self {
            Request::Write { vol, .. }
            | Request::Swap { vol, .. }
            | Request::Read { vol, .. }
            | Request::Versions { vol, .. }
            | Request::Revert { vol, .. }
            | Request::Trim { vol, .. } => Some((vol.volume, vol.epoch)),
            Request::PutBlob { volume, epoch, .. } => Some((*volume, *epoch)),
            _ => None,
        }
    }

    /// Whether the request only reads (an observer with epoch 0 may send these).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Hello { .. }
                | Request::Read { .. }
                | Request::Versions { .. }
                | Request::Stats
                | Request::Epoch { epoch: 0, .. }
                | Request::GetBlob { .. }
                | Request::Scrub
                | Request::ScrubStatus
        )
    }

    /// Encode as a whole frame with request id `id`, fragment data copied in.
    pub fn encode(&self, id: u64, out: &mut BytesMut) {
        Header::new(self.op(), false, id, Status::OK)
            .encode_with_body(out, |o| self.encode_body(o, &mut |o, b| put_bytes(o, b)));
    }

    /// Encode as a whole frame in segments for a vectored write: fragment data is not copied,
    /// its `Bytes` become segments of their own.
    pub fn encode_vectored(&self, id: u64, segs: &mut Vec<Bytes>) {
        Header::new(self.op(), false, id, Status::OK)
            .encode_vectored_with_body(segs, |o, d| self.encode_body(o, d));
    }

    fn encode_body(&self, out: &mut BytesMut, data: &mut dyn FnMut(&mut BytesMut, &Bytes)) {
        match self {
            Request::Hello { client } => put_bytes(out, client.as_bytes()),
            Request::Write { vol, items } | Request::Swap { vol, items } => {
                vol.encode(out);
                out.put_u32(items.len() as u32);
                for it in items {
                    it.key.encode(out);
                    it.manifest.encode(out);
                    out.put_u8(u8::from(it.zero) | (u8::from(it.xor) << 1));
                    out.put_u32(it.offset);
                    out.put_u64(it.base);
                    data(out, &it.data);
                }
            }
            Request::Read { vol, items } => {
                vol.encode(out);
                out.put_u32(items.len() as u32);
                for it in items {
                    it.key.encode(out);
                    match it.want {
                        Want::Latest => {
                            out.put_u8(0);
                            out.put_u64(0);
                        }
                        Want::Version(v) => {
                            out.put_u8(1);
                            out.put_u64(v);
                        }
                    }
                    out.put_u32(it.offset);
                    out.put_u32(it.len);
                }
            }
            Request::Versions { vol, first, count } => {
                vol.encode(out);
                out.put_u64(*first);
                out.put_u32(*count);
            }
            Request::Revert { vol, items } => {
                vol.encode(out);
                out.put_u32(items.len() as u32);
                for (k, v) in items {
                    k.encode(out);
                    out.put_u64(*v);
                }
            }
            Request::Trim { vol, items } => {
                vol.encode(out);
                out.put_u32(items.len() as u32);
                for k in items {
                    k.encode(out);
                }
            }
            Request::Stats | Request::Scrub | Request::ScrubStatus => {}
            Request::Epoch { volume, epoch } => {
                out.put_u64(*volume);
                out.put_u64(*epoch);
            }
            Request::PutBlob {
                volume,
                epoch,
                name,
                seq,
                data: blob,
            } => {
                out.put_u64(*volume);
                out.put_u64(*epoch);
                out.put_u8(*name);
                out.put_u64(*seq);
                put_bytes(out, blob);
            }
            Request::GetBlob { volume, name } => {
                out.put_u64(*volume);
                out.put_u8(*name);
            }
        }
    }

    /// Decode the body of a request frame.
    pub fn decode(op: Op, body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader { b: body };
        let req = match op {
            Op::HELLO => Request::Hello {
                client: r.string("client")?,
            },
            Op::WRITE => {
                let (vol, items) = decode_write_items(&mut r)?;
                Request::Write { vol, items }
            }
            Op::SWAP => {
                let (vol, items) = decode_write_items(&mut r)?;
                if items.iter().any(|it| it.base == 0 || it.zero || it.xor) {
                    return Err(DecodeError::Invalid(
                        "swap of a whole chunk, zeroes or a delta",
                    ));
                }
                Request::Swap { vol, items }
            }
            Op::READ => {
                let vol = VolumeCtx::decode(&mut r)?;
                let n = r.count("read items", 9 + 9 + 8)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = FragKey::decode(&mut r, &vol)?;
                    let want = match (r.u8("want")?, r.u64("want version")?) {
                        (0, _) => Want::Latest,
                        (1, v) => Want::Version(v),
                        _ => return Err(DecodeError::Invalid("want")),
                    };
                    let offset = r.u32("offset")?;
                    let len = r.u32("length")?;
                    if u64::from(offset) + u64::from(len) > u64::from(vol.chunk) {
                        return Err(DecodeError::Invalid("read range"));
                    }
                    items.push(ReadItem {
                        key,
                        want,
                        offset,
                        len,
                    });
                }
                Request::Read { vol, items }
            }
            Op::VERSIONS => {
                let vol = VolumeCtx::decode(&mut r)?;
                let first = r.u64("first stripe")?;
                let count = r.u32("stripe count")?;
                if count > 1 << 20 {
                    return Err(DecodeError::Invalid("stripe count"));
                }
                Request::Versions { vol, first, count }
            }
            Op::REVERT => {
                let vol = VolumeCtx::decode(&mut r)?;
                let n = r.count("revert items", 17)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = FragKey::decode(&mut r, &vol)?;
                    items.push((k, r.u64("version")?));
                }
                Request::Revert { vol, items }
            }
            Op::TRIM => {
                let vol = VolumeCtx::decode(&mut r)?;
                let n = r.count("trim items", 9)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(FragKey::decode(&mut r, &vol)?);
                }
                Request::Trim { vol, items }
            }
            Op::STATS => Request::Stats,
            Op::SCRUB => Request::Scrub,
            Op::SCRUB_STATUS => Request::ScrubStatus,
            Op::EPOCH => Request::Epoch {
                volume: r.u64("volume")?,
                epoch: r.u64("epoch")?,
            },
            Op::PUT_BLOB => {
                let volume = r.u64("volume")?;
                let epoch = r.u64("epoch")?;
                let name = r.u8("name")?;
                let seq = r.u64("seq")?;
                let data = r.bytes("blob")?;
                if data.len() > 1 << 20 {
                    return Err(DecodeError::Invalid("blob size"));
                }
                Request::PutBlob {
                    volume,
                    epoch,
                    name,
                    seq,
                    data,
                }
            }
            Op::GET_BLOB => Request::GetBlob {
                volume: r.u64("volume")?,
                name: r.u8("name")?,
            },
            _ => return Err(DecodeError::Invalid("opcode")),
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    /// Encode as an OK response frame to request `id` of `op`, data copied in.
    pub fn encode(&self, op: Op, id: u64, out: &mut BytesMut) {
        Header::new(op, true, id, Status::OK)
            .encode_with_body(out, |o| self.encode_body(o, &mut |o, b| put_bytes(o, b)));
    }

    /// Encode as an OK response frame in segments (data not copied; see
    /// [`Request::encode_vectored`]).
    pub fn encode_vectored(&self, op: Op, id: u64, segs: &mut Vec<Bytes>) {
        Header::new(op, true, id, Status::OK)
            .encode_vectored_with_body(segs, |o, d| self.encode_body(o, d));
    }

    fn encode_body(&self, out: &mut BytesMut, data: &mut dyn FnMut(&mut BytesMut, &Bytes)) {
        match self {
            Response::Hello { node_id, capacity } => {
                put_bytes(out, node_id.as_bytes());
                out.put_u64(*capacity);
            }
            Response::Write(s) | Response::Revert(s) | Response::Trim(s) => put_statuses(out, s),
            Response::Swap(items) => {
                out.put_u32(items.len() as u32);
                for (st, old) in items {
                    out.put_u8(st.0);
                    data(out, old);
                }
            }
            Response::Read(items) => {
                out.put_u32(items.len() as u32);
                for it in items {
                    out.put_u8(it.status.0);
                    it.manifest.encode(out);
                    out.put_u8(u8::from(it.zero));
                    data(out, &it.data);
                }
            }
            Response::Versions(entries) => {
                out.put_u32(entries.len() as u32);
                for e in entries {
                    e.key.encode(out);
                    out.put_u8(e.slots.len() as u8);
                    for s in &e.slots {
                        s.manifest.encode(out);
                        out.put_u8(u8::from(s.zero));
                    }
                }
            }
            Response::Stats(s) => {
                for v in [
                    s.capacity,
                    s.allocated,
                    s.writes,
                    s.reads,
                    s.checksum_errors,
                    s.stale_epoch_rejects,
                    s.failed_errno,
                ] {
                    out.put_u64(v);
                }
            }
            Response::Epoch(e) => out.put_u64(*e),
            Response::Scrub(s) => {
                out.put_u64(s.checked);
                out.put_u64(s.mismatches);
                out.put_u64(s.bytes);
            }
            Response::ScrubStatus(p) => {
                out.put_u64(p.scrubs);
                out.put_u8(u8::from(p.running));
                for v in [p.total_bytes, p.done_bytes, p.checked, p.mismatches] {
                    out.put_u64(v);
                }
            }
            Response::PutBlob => {}
            Response::GetBlob { seq, data: blob } => {
                out.put_u64(*seq);
                put_bytes(out, blob);
            }
        }
    }

    /// Decode an OK response body to a request of `op`. `k` is the volume's data-chunk count
    /// where the op carries manifests (reads, versions); it bounds what is accepted.
    pub fn decode(op: Op, body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader { b: body };
        let resp = match op {
            Op::HELLO => Response::Hello {
                node_id: r.string("node id")?,
                capacity: r.u64("capacity")?,
            },
            Op::WRITE => Response::Write(get_statuses(&mut r)?),
            Op::SWAP => {
                let n = r.count("swap results", 1 + 4)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let status = Status(r.u8("status")?);
                    items.push((status, r.bytes("replaced data")?));
                }
                Response::Swap(items)
            }
            Op::REVERT => Response::Revert(get_statuses(&mut r)?),
            Op::TRIM => Response::Trim(get_statuses(&mut r)?),
            Op::READ => {
                let n = r.count("read results", 1 + 9 + 1 + 4)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let status = Status(r.u8("status")?);
                    let manifest = Manifest::decode(&mut r)?;
                    let zero = r.u8("zero flag")? != 0;
                    let data = r.bytes("data")?;
                    items.push(ReadResult {
                        status,
                        manifest,
                        zero,
                        data,
                    });
                }
                Response::Read(items)
            }
            Op::VERSIONS => {
                let n = r.count("version entries", 10)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    r.need(9, "fragment key")?;
                    let key = FragKey {
                        stripe: r.b.get_u64(),
                        index: r.b.get_u8(),
                    };
                    let ns = r.u8("slot count")?;
                    if ns > 2 {
                        return Err(DecodeError::Invalid("slot count"));
                    }
                    let mut slots = Vec::with_capacity(usize::from(ns));
                    for _ in 0..ns {
                        let manifest = Manifest::decode(&mut r)?;
                        let zero = r.u8("zero flag")? != 0;
                        slots.push(SlotInfo { manifest, zero });
                    }
                    entries.push(VersionEntry { key, slots });
                }
                Response::Versions(entries)
            }
            Op::STATS => Response::Stats(NodeStats {
                capacity: r.u64("stats")?,
                allocated: r.u64("stats")?,
                writes: r.u64("stats")?,
                reads: r.u64("stats")?,
                checksum_errors: r.u64("stats")?,
                stale_epoch_rejects: r.u64("stats")?,
                failed_errno: r.u64("stats")?,
            }),
            Op::EPOCH => Response::Epoch(r.u64("epoch")?),
            Op::SCRUB => Response::Scrub(ScrubReport {
                checked: r.u64("scrub")?,
                mismatches: r.u64("scrub")?,
                bytes: r.u64("scrub")?,
            }),
            Op::SCRUB_STATUS => Response::ScrubStatus(ScrubProgress {
                scrubs: r.u64("scrub status")?,
                running: match r.u8("scrub status")? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("scrub running flag")),
                },
                total_bytes: r.u64("scrub status")?,
                done_bytes: r.u64("scrub status")?,
                checked: r.u64("scrub status")?,
                mismatches: r.u64("scrub status")?,
            }),
            Op::PUT_BLOB => Response::PutBlob,
            Op::GET_BLOB => Response::GetBlob {
                seq: r.u64("seq")?,
                data: r.bytes("blob")?,
            },
            _ => return Err(DecodeError::Invalid("opcode")),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Encode an error response: `status` with a text reason, or for [`Status::STALE_EPOCH`] the
/// node's epoch.
pub fn encode_error(op: Op, id: u64, status: Status, reason: &str, epoch: u64, out: &mut BytesMut) {
    Header::new(op, true, id, status).encode_with_body(out, |o| {
        if status == Status::STALE_EPOCH {
            o.put_u64(epoch);
        } else {
            o.put_slice(reason.as_bytes());
        }
    });
}

/// The epoch in a STALE_EPOCH response body (0 if absent).
pub fn stale_epoch_of(body: &[u8]) -> u64 {
    body.get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vol() -> VolumeCtx {
        VolumeCtx {
            volume: 9,
            epoch: 3,
            pgs: 64,
            k: 4,
            m: 2,
            codec: 1,
            chunk: 4096,
        }
    }

    fn roundtrip_req(req: &Request) -> Request {
        let mut out = BytesMut::new();
        req.encode(42, &mut out);
        let f = decode_frame(&mut out).unwrap().unwrap();
        assert!(out.is_empty());
        assert_eq!(f.header.id, 42);
        assert!(!f.header.response);
        Request::decode(f.header.op, f.body).unwrap()
    }

    fn roundtrip_resp(op: Op, resp: &Response) -> Response {
        let mut out = BytesMut::new();
        resp.encode(op, 7, &mut out);
        let f = decode_frame(&mut out).unwrap().unwrap();
        assert!(f.header.response);
        assert_eq!((f.header.op, f.header.status), (op, Status::OK));
        Response::decode(op, f.body).unwrap()
    }

    #[test]
    fn every_request_and_response_round_trips() {
        let m = Manifest {
            version: 77,
            data: vec![70, 77, 12, 0],
        };
        let reqs = vec![
            Request::Hello {
                client: "gw-1".into(),
            },
            Request::Write {
                vol: vol(),
                items: vec![
                    WriteItem {
                        key: FragKey {
                            stripe: 5,
                            index: 4,
                        },
                        manifest: m.clone(),
                        zero: false,
                        data: Bytes::from(vec![7u8; 4096]),
                        offset: 0,
                        base: 0,
                        xor: false,
                    },
                    WriteItem {
                        key: FragKey {
                            stripe: 6,
                            index: 1,
                        },
                        manifest: m.clone(),
                        zero: true,
                        data: Bytes::new(),
                        offset: 0,
                        base: 0,
                        xor: false,
                    },
                ],
            },
            Request::Write {
                vol: vol(),
                items: vec![WriteItem {
                    key: FragKey {
                        stripe: 3,
                        index: 4,
                    },
                    manifest: Manifest {
                        version: 9,
                        data: vec![9, 1, 1, 1],
                    },
                    zero: false,
                    data: Bytes::from(vec![5u8; 4096]),
                    offset: 0,
                    base: 8,
                    xor: true,
                }],
            },
            Request::Swap {
                vol: vol(),
                items: vec![WriteItem {
                    key: FragKey {
                        stripe: 3,
                        index: 1,
                    },
                    manifest: Manifest {
                        version: 10,
                        data: vec![9, 10, 1, 1],
                    },
                    zero: false,
                    data: Bytes::from(vec![6u8; 4096]),
                    offset: 0,
                    base: 1,
                    xor: false,
                }],
            },
            Request::Read {
                vol: vol(),
                items: vec![
                    ReadItem {
                        key: FragKey {
                            stripe: 1,
                            index: 0,
                        },
                        want: Want::Latest,
                        offset: 512,
                        len: 1024,
                    },
                    ReadItem {
                        key: FragKey {
                            stripe: 1,
                            index: 5,
                        },
                        want: Want::Version(9),
                        offset: 0,
                        len: 0,
                    },
                ],
            },
            Request::Versions {
                vol: vol(),
                first: 100,
                count: 64,
            },
            Request::Revert {
                vol: vol(),
                items: vec![(
                    FragKey {
                        stripe: 2,
                        index: 3,
                    },
                    99,
                )],
            },
            Request::Trim {
                vol: vol(),
                items: vec![FragKey {
                    stripe: 2,
                    index: 3,
                }],
            },
            Request::Stats,
            Request::Scrub,
            Request::ScrubStatus,
            Request::Epoch {
                volume: 9,
                epoch: 4,
            },
            Request::PutBlob {
                volume: 9,
                epoch: 4,
                name: 1,
                seq: 12,
                data: Bytes::from_static(b"bitmap"),
            },
            Request::GetBlob { volume: 9, name: 1 },
        ];
        for r in &reqs {
            assert_eq!(&roundtrip_req(r), r);
        }
        let resps = vec![
            (
                Op::HELLO,
                Response::Hello {
                    node_id: "n1".into(),
                    capacity: 1 << 40,
                },
            ),
            (
                Op::WRITE,
                Response::Write(vec![Status::OK, Status::NO_SPACE]),
            ),
            (
                Op::SWAP,
                Response::Swap(vec![
                    (Status::OK, Bytes::from(vec![7u8; 4096])),
                    (Status::NOT_FOUND, Bytes::new()),
                ]),
            ),
            (
                Op::READ,
                Response::Read(vec![ReadResult {
                    status: Status::OK,
                    manifest: m.clone(),
                    zero: false,
                    data: Bytes::from_static(b"abcd"),
                }]),
            ),
            (
                Op::VERSIONS,
                Response::Versions(vec![VersionEntry {
                    key: FragKey {
                        stripe: 3,
                        index: 2,
                    },
                    slots: vec![
                        SlotInfo {
                            manifest: m,
                            zero: false,
                        },
                        SlotInfo {
                            manifest: Manifest::default(),
                            zero: true,
                        },
                    ],
                }]),
            ),
            (Op::REVERT, Response::Revert(vec![Status::NOT_FOUND])),
            (Op::TRIM, Response::Trim(vec![])),
            (
                Op::STATS,
                Response::Stats(NodeStats {
                    capacity: 1,
                    allocated: 2,
                    writes: 3,
                    reads: 4,
                    checksum_errors: 5,
                    stale_epoch_rejects: 6,
                    failed_errno: 5,
                }),
            ),
            (Op::EPOCH, Response::Epoch(17)),
            (
                Op::SCRUB,
                Response::Scrub(ScrubReport {
                    checked: 10,
                    mismatches: 1,
                    bytes: 40960,
                }),
            ),
            (
                Op::SCRUB_STATUS,
                Response::ScrubStatus(ScrubProgress {
                    scrubs: 2,
                    running: true,
                    total_bytes: 1 << 30,
                    done_bytes: 1 << 20,
                    checked: 7,
                    mismatches: 1,
                }),
            ),
            (Op::PUT_BLOB, Response::PutBlob),
            (
                Op::GET_BLOB,
                Response::GetBlob {
                    seq: 3,
                    data: Bytes::from_static(b"x"),
                },
            ),
        ];
        for (op, r) in &resps {
            assert_eq!(&roundtrip_resp(*op, r), r);
        }
    }

    #[test]
    fn vectored_frames_equal_flat_ones() {
        let reqs = [
            Request::Write {
                vol: vol(),
                items: vec![
                    WriteItem {
                        key: FragKey {
                            stripe: 5,
                            index: 1,
                        },
                        manifest: Manifest {
                            version: 3,
                            data: vec![3, 3, 1, 2],
                        },
                        zero: false,
                        data: Bytes::from(vec![7u8; 4096]),
                        offset: 0,
                        base: 0,
                        xor: false,
                    },
                    WriteItem {
                        key: FragKey {
                            stripe: 6,
                            index: 1,
                        },
                        manifest: Manifest {
                            version: 4,
                            data: vec![4, 4, 4, 4],
                        },
                        zero: true,
                        data: Bytes::new(),
                        offset: 0,
                        base: 0,
                        xor: false,
                    },
                ],
            },
            Request::Stats,
            Request::PutBlob {
                volume: 1,
                epoch: 2,
                name: 1,
                seq: 3,
                data: Bytes::from_static(b"xyz"),
            },
        ];
        for r in &reqs {
            let mut flat = BytesMut::new();
            r.encode(9, &mut flat);
            let mut segs = Vec::new();
            r.encode_vectored(9, &mut segs);
            let joined: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(&flat[..], &joined[..], "{r:?}");
        }
        let resp = Response::Read(vec![ReadResult {
            status: Status::OK,
            manifest: Manifest {
                version: 1,
                data: vec![1, 1],
            },
            zero: false,
            data: Bytes::from(vec![1u8; 8192]),
        }]);
        let mut flat = BytesMut::new();
        resp.encode(Op::READ, 4, &mut flat);
        let mut segs = Vec::new();
        resp.encode_vectored(Op::READ, 4, &mut segs);
        assert!(segs.len() >= 3, "the data is a segment of its own");
        let joined: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(&flat[..], &joined[..]);
    }

    #[test]
    fn frames_arrive_in_pieces() {
        let mut all = BytesMut::new();
        Request::Stats.encode(1, &mut all);
        Request::Epoch {
            volume: 1,
            epoch: 2,
        }
        .encode(2, &mut all);
        let bytes = all.freeze();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode_frame(&mut buf).unwrap() {
                got.push(f.header.id);
            }
        }
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn hostile_headers_are_refused_before_buffering() {
        let mut out = BytesMut::new();
        Request::Stats.encode(1, &mut out);
        let mut big = out.clone();
        big[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_frame(&mut big), Err(DecodeError::TooLarge(u32::MAX)));
        let mut bad = out.clone();
        bad[0] = b'X';
        assert!(matches!(decode_frame(&mut bad), Err(DecodeError::Magic(_))));
        let mut ver = out.clone();
        ver[2] = 9;
        assert_eq!(decode_frame(&mut ver), Err(DecodeError::Version(9)));
    }

    #[test]
    fn inconsistent_bodies_are_bad_requests() {
        // A write whose fragment is not one chunk long.
        let req = Request::Write {
            vol: vol(),
            items: vec![WriteItem {
                key: FragKey {
                    stripe: 0,
                    index: 0,
                },
                manifest: Manifest {
                    version: 1,
                    data: vec![1, 0, 0, 0],
                },
                zero: false,
                data: Bytes::from_static(b"short"),
                offset: 0,
                base: 0,
                xor: false,
            }],
        };
        let mut out = BytesMut::new();
        req.encode(1, &mut out);
        let f = decode_frame(&mut out).unwrap().unwrap();
        assert_eq!(
            Request::decode(f.header.op, f.body),
            Err(DecodeError::Invalid("fragment length"))
        );
        // Unknown write flags, and a delta with no base to apply it to.
        for (flags, base, why) in [(4u8, 8u64, "write flags"), (2, 0, "xor without a base")] {
            let req = Request::Write {
                vol: vol(),
                items: vec![WriteItem {
                    key: FragKey {
                        stripe: 0,
                        index: 4,
                    },
                    manifest: Manifest {
                        version: 9,
                        data: vec![1, 0, 0, 0],
                    },
                    zero: false,
                    data: Bytes::from(vec![1u8; 4096]),
                    offset: 0,
                    base,
                    xor: false,
                }],
            };
            let mut out = BytesMut::new();
            req.encode(1, &mut out);
            // The flags byte follows the key (9 bytes) and the manifest (1 + 8 + 4 × 8).
            let at = HEADER_LEN + VOLUME_CTX_LEN + 4 + 9 + 9 + 4 * 8;
            assert_eq!(out[at], 0);
            out[at] = flags;
            let f = decode_frame(&mut out).unwrap().unwrap();
            assert_eq!(
                Request::decode(f.header.op, f.body),
                Err(DecodeError::Invalid(why))
            );
        }
        // A swap must build on a base, and neither zero nor XOR.
        for (flags, base) in [(0u8, 0u64), (2, 8)] {
            let req = Request::Swap {
                vol: vol(),
                items: vec![WriteItem {
                    key: FragKey {
                        stripe: 0,
                        index: 1,
                    },
                    manifest: Manifest {
                        version: 9,
                        data: vec![1, 9, 0, 0],
                    },
                    zero: false,
                    data: Bytes::from(vec![1u8; 4096]),
                    offset: 0,
                    base,
                    xor: false,
                }],
            };
            let mut out = BytesMut::new();
            req.encode(1, &mut out);
            let at = HEADER_LEN + VOLUME_CTX_LEN + 4 + 9 + 9 + 4 * 8;
            out[at] = flags;
            let f = decode_frame(&mut out).unwrap().unwrap();
            assert_eq!(
                Request::decode(f.header.op, f.body),
                Err(DecodeError::Invalid(
                    "swap of a whole chunk, zeroes or a delta"
                )),
                "flags {flags} base {base}"
            );
        }
        // An index beyond k + m.
        let req = Request::Trim {
            vol: vol(),
            items: vec![FragKey {
                stripe: 0,
                index: 6,
            }],
        };
        let mut out = BytesMut::new();
        req.encode(1, &mut out);
        let f = decode_frame(&mut out).unwrap().unwrap();
        assert_eq!(
            Request::decode(f.header.op, f.body),
            Err(DecodeError::Invalid("fragment index"))
        );
        // An item count far beyond the body.
        let mut body = BytesMut::new();
        vol().encode(&mut body);
        body.put_u32(1_000_000);
        assert!(Request::decode(Op::TRIM, body.freeze()).is_err());
        // Unknown opcode.
        assert!(Request::decode(Op(0x55), Bytes::new()).is_err());
    }

    #[test]
    fn error_responses() {
        let mut out = BytesMut::new();
        encode_error(Op::WRITE, 5, Status::STALE_EPOCH, "", 12, &mut out);
        let f = decode_frame(&mut out).unwrap().unwrap();
        assert_eq!(f.header.status, Status::STALE_EPOCH);
        assert_eq!(stale_epoch_of(&f.body), 12);
        encode_error(Op::READ, 6, Status::BAD_REQUEST, "no", 0, &mut out);
        let f = decode_frame(&mut out).unwrap().unwrap();
        assert_eq!(&f.body[..], b"no");
    }

    proptest! {
        /// Arbitrary bytes never panic the decoders, and never make them allocate past the
        /// input (item counts are checked against the bytes present).
        #[test]
        fn arbitrary_bodies_do_not_panic(op in 0u8..16, body in prop::collection::vec(any::<u8>(), 0..300)) {
            let b = Bytes::from(body);
            let _ = Request::decode(Op(op), b.clone());
            let _ = Response::decode(Op(op), b);
        }

        #[test]
        fn arbitrary_streams_do_not_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf) {}
        }
    }
}
