//! Framing of iSCSI PDUs on a byte stream (RFC 7143 §11.2): BHS, AHS, header digest, data
//! segment padded to 4 bytes, data digest (CRC32C, RFC 7143 §13.1 and Appendix B.4).
//!
//! The decoder checks the data segment length against the negotiated limit *before* waiting
//! for (and so before buffering) the data, so a peer cannot make the connection hold more than
//! one maximal PDU. The encoder writes into a [`TxQueue`] of `Bytes` segments so that bulk data
//! is sent with vectored writes and never copied.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::pdu::{Bhs, Pdu, BHS_LEN};

/// CRC32C as iSCSI puts it on the wire: the value's bytes in little-endian order
/// (RFC 7143 §13.1: for 32 zero bytes the wire bytes are `aa 36 91 8a`).
pub fn digest(data: &[u8]) -> [u8; 4] {
    crc32c::crc32c(data).to_le_bytes()
}

fn digest_parts(a: &[u8], pad: usize) -> [u8; 4] {
    let c = crc32c::crc32c(a);
    crc32c::crc32c_append(c, &ZEROS[..pad]).to_le_bytes()
}

static ZEROS: [u8; 4] = [0; 4];

/// Bytes of padding after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// A fatal framing error: the stream can no longer be trusted, drop the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The data segment is longer than the negotiated maximum.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The header digest did not match: the lengths in the header can't be trusted.
    #[error("header digest mismatch")]
    HeaderDigest,
}

/// One decoded PDU and whether its data digest matched (a data digest error is not fatal:
/// the PDU's header is good and the connection answers with a Reject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The PDU.
    pub pdu: Pdu,
    /// False when data digests are on and the data digest did not match.
    pub data_digest_ok: bool,
}

/// Splits a byte stream into PDUs.
#[derive(Debug, Clone)]
pub struct Framer {
    /// Header digests are on.
    pub header_digest: bool,
    /// Data digests are on.
    pub data_digest: bool,
    /// Largest data segment accepted (our MaxRecvDataSegmentLength).
    pub max_data_segment: u32,
}

impl Framer {
    /// A framer without digests accepting data segments up to `max_data_segment` bytes.
    pub fn new(max_data_segment: u32) -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_data_segment,
        }
    }

    /// How many bytes the PDU at the front of `buf` occupies, once its header is in; `None`
    /// until 48 bytes are buffered.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let ahs = buf[4] as usize * 4;
        let dlen = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
        if dlen > self.max_data_segment {
            return Err(FrameError::DataSegmentTooLong {
                len: dlen,
                max: self.max_data_segment,
            });
        }
        let dlen = dlen as usize;
        let mut n = BHS_LEN + ahs;
        if self.header_digest {
            n += 4;
        }
        if dlen > 0 {
            n += dlen + pad_len(dlen);
            if self.data_digest {
                n += 4;
            }
        }
        Ok(Some(n))
    }

    /// Take one PDU off the front of `buf`. `Ok(None)` means more bytes are needed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        let ahs_len = buf[4] as usize * 4;
        let hdr_len = BHS_LEN + ahs_len;
        if self.header_digest {
            let want = digest(&buf[..hdr_len]);
            if buf[hdr_len..hdr_len + 4] != want {
                return Err(FrameError::HeaderDigest);
            }
        }
        let mut raw = buf.split_to(total);
        let mut bhs = Bhs::default();
        bhs.0.copy_from_slice(&raw[..BHS_LEN]);
        raw.advance(BHS_LEN);
        let ahs = raw.split_to(ahs_len).freeze();
        if self.header_digest {
            raw.advance(4);
        }
        let dlen = bhs.data_segment_len() as usize;
        let mut data_digest_ok = true;
        let data = if dlen > 0 {
            let pad = pad_len(dlen);
            if self.data_digest {
                let want = digest(&raw[..dlen + pad]);
                data_digest_ok = raw[dlen + pad..dlen + pad + 4] == want;
            }
            raw.truncate(dlen);
            raw.freeze()
        } else {
            Bytes::new()
        };
        Ok(Some(Frame {
            pdu: Pdu { bhs, ahs, data },
            data_digest_ok,
        }))
    }
}

/// Data segments up to this size are copied next to their header (one segment, one iovec);
/// larger ones are queued as their own `Bytes`.
const COPY_THRESHOLD: usize = 1024;

/// Outgoing bytes, as a queue of segments ready for a vectored write.
#[derive(Debug, Default)]
pub struct TxQueue {
    segs: VecDeque<Bytes>,
    len: usize,
    arena: BytesMut,
}

impl TxQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Total bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn reserve(&mut self, n: usize) {
        if self.arena.capacity() < n {
            self.arena.reserve(n.max(16 * 1024));
        }
    }

    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.segs.push_back(b);
        }
    }

    /// Queue one PDU: `bhs` (its lengths are set here), optional digests, `data` (padded).
    pub fn push_pdu(&mut self, mut bhs: Bhs, data: Bytes, header_digest: bool, data_digest: bool) {
        let dlen = data.len();
        bhs.set_lengths(0, dlen as u32);
        let pad = pad_len(dlen);
        let inline = dlen <= COPY_THRESHOLD;
        let mut need = BHS_LEN + 4;
        if inline && dlen > 0 {
            need += dlen + pad + 4;
        }
        self.reserve(need);
        self.arena.put_slice(&bhs.0);
        if header_digest {
            let d = digest(&bhs.0);
            self.arena.put_slice(&d);
        }
        if dlen == 0 {
            let h = self.arena.split().freeze();
            self.push(h);
            return;
        }
        let dd = data_digest.then(|| digest_parts(&data, pad));
        if inline {
            self.arena.put_slice(&data);
            self.arena.put_slice(&ZEROS[..pad]);
            if let Some(d) = dd {
                self.arena.put_slice(&d);
            }
            let h = self.arena.split().freeze();
            self.push(h);
        } else {
            let h = self.arena.split().freeze();
            self.push(h);
            self.push(data);
            self.arena.put_slice(&ZEROS[..pad]);
            if let Some(d) = dd {
                self.arena.put_slice(&d);
            }
            if !self.arena.is_empty() {
                let t = self.arena.split().freeze();
                self.push(t);
            }
        }
    }

    /// The queued segments, front first.
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> {
        self.segs.iter().map(|b| &b[..])
    }

    /// Drop `n` bytes from the front (after they were written).
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance past the end of the queue");
        self.len -= n;
        while n > 0 {
            let front = self
                .segs
                .front_mut()
                .expect("len accounts for every segment");
            if front.len() <= n {
                n -= front.len();
                self.segs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Move everything into one contiguous buffer (tests and small tools).
    pub fn take_all(&mut self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.len);
        for s in self.segs.drain(..) {
            out.put_slice(&s);
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{NopOut, Opcode};

    #[test]
    fn crc32c_matches_rfc_vectors() {
        // RFC 3720 Appendix B.4, as wire bytes.
        assert_eq!(digest(&[0u8; 32]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[0xffu8; 32]), [0x43, 0xab, 0xa8, 0x62]);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(digest(&inc), [0x4e, 0x79, 0xdd, 0x46]);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(digest(&dec), [0x5c, 0xdb, 0x3f, 0x11]);
    }

    fn nop(itt: u32) -> Bhs {
        NopOut {
            itt,
            ttt: u32::MAX,
            ..Default::default()
        }
        .encode()
    }

    fn roundtrip(hd: bool, dd: bool, data_len: usize) {
        let mut q = TxQueue::new();
        let data: Bytes = (0..data_len).map(|i| i as u8).collect::<Vec<_>>().into();
        q.push_pdu(nop(7), data.clone(), hd, dd);
        q.push_pdu(nop(8), Bytes::new(), hd, dd);
        let mut wire = q.take_all();
        let f = Framer {
            header_digest: hd,
            data_digest: dd,
            max_data_segment: 1 << 20,
        };
        // Every strict prefix of the first PDU is "need more".
        let first = f.frame_len(&wire).unwrap().unwrap();
        for cut in (0..first).step_by(1 + first / 97) {
            let mut part = BytesMut::from(&wire[..cut]);
            assert_eq!(f.decode(&mut part).unwrap(), None, "prefix {cut}");
        }
        let a = f.decode(&mut wire).unwrap().unwrap();
        assert!(a.data_digest_ok);
        assert_eq!(a.pdu.bhs.opcode(), Opcode::NOP_OUT);
        assert_eq!(a.pdu.bhs.itt(), 7);
        assert_eq!(a.pdu.data, data);
        let b = f.decode(&mut wire).unwrap().unwrap();
        assert_eq!(b.pdu.bhs.itt(), 8);
        assert!(b.pdu.data.is_empty());
        assert!(wire.is_empty());
    }

    #[test]
    fn pdus_round_trip_through_the_queue_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            for len in [0, 1, 3, 4, 5, 1023, 1024, 1025, 4096, 70001] {
                roundtrip(hd, dd, len);
            }
        }
    }

    #[test]
    fn oversized_data_segment_is_refused_before_buffering() {
        let mut b = nop(1);
        b.set_lengths(0, 0x00ff_ffff);
        let mut buf = BytesMut::from(&b.0[..]);
        let f = Framer::new(8192);
        assert_eq!(
            f.decode(&mut buf),
            Err(FrameError::DataSegmentTooLong {
                len: 0xff_ffff,
                max: 8192
            })
        );
    }

    #[test]
    fn header_digest_mismatch_is_fatal_and_data_digest_mismatch_is_reported() {
        let mut q = TxQueue::new();
        q.push_pdu(nop(1), Bytes::from_static(b"hello"), true, true);
        let wire = q.take_all();
        let f = Framer {
            header_digest: true,
            data_digest: true,
            max_data_segment: 8192,
        };
        let mut bad_hdr = wire.clone();
        bad_hdr[20] ^= 1;
        assert_eq!(f.decode(&mut bad_hdr), Err(FrameError::HeaderDigest));
        let mut bad_data = wire;
        bad_data[BHS_LEN + 4] ^= 1;
        let fr = f.decode(&mut bad_data).unwrap().unwrap();
        assert!(!fr.data_digest_ok);
    }

    #[test]
    fn advance_walks_partial_segments() {
        let mut q = TxQueue::new();
        q.push_pdu(nop(1), Bytes::from(vec![9u8; 5000]), false, false);
        let total = q.len();
        assert_eq!(total, 48 + 5000);
        q.advance(10);
        assert_eq!(q.segments().next().unwrap().len(), 38);
        q.advance(38 + 4999);
        assert_eq!(q.len(), 1);
        q.advance(1);
        assert!(q.is_empty());
    }
}
