//! Block commands (SBC-3 §5): READ, WRITE, WRITE AND VERIFY, VERIFY, COMPARE AND WRITE,
//! WRITE SAME, UNMAP, GET LBA STATUS, SYNCHRONIZE CACHE, PRE-FETCH, READ CAPACITY.
//!
//! Common checks, in order: medium present (NOT READY, MEDIUM NOT PRESENT), write protection
//! (DATA PROTECT), transfer length against the block limits (INVALID FIELD IN CDB at the
//! length field), LBA range (LOGICAL BLOCK ADDRESS OUT OF RANGE). A range is valid when
//! `lba + blocks <= capacity`; a zero-length range at the capacity is valid.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tessera_proto::block::Extent;
use tessera_proto::scsi::capacity::{self, Capacity};
use tessera_proto::scsi::cdb::{Rw, Verify, WriteSame};
use tessera_proto::scsi::provision::{self, LbaState, LbaStatus, UnmapLimits};
use tessera_proto::scsi::Sense;
use tessera_proto::segments::Segments;

use crate::api::{status, ScsiResult};
use crate::lu::LogicalUnit;

/// Bytes of pattern WRITE SAME builds and writes at a time.
const WRITE_SAME_CHUNK: usize = 1 << 20;
/// Bytes of the device GET LBA STATUS describes per command at most.
const LBA_STATUS_WINDOW: u64 = 64 << 20;

/// Offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn backend(e: tessera_proto::block::BlockError) -> Sense {
    Sense::from(&e)
}

impl LogicalUnit {
    pub(crate) fn check_medium(&self) -> Result<(), Sense> {
        if self.medium.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(Sense::MEDIUM_NOT_PRESENT)
        }
    }

    pub(crate) fn check_writable(&self) -> Result<(), Sense> {
        if self.cfg.read_only {
            Err(Sense::WRITE_PROTECTED)
        } else if self.swp.load(Ordering::Relaxed) {
            Err(Sense::SOFTWARE_WRITE_PROTECTED)
        } else {
            Ok(())
        }
    }

    pub(crate) fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks.load(Ordering::Relaxed) => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    /// Checks a block transfer's length against the transfer limit (`len_field` is the CDB
    /// byte of the TRANSFER LENGTH, for the sense key specific field) and its blocks against
    /// the capacity, in that order; gives the transfer's length in bytes.
    fn check_transfer(&self, lba: u64, blocks: u32, len_field: u16) -> Result<usize, Sense> {
        if blocks > self.lim.max_transfer {
            return Err(Sense::invalid_cdb(len_field, None));
        }
        self.check_range(lba, u64::from(blocks))?;
        Ok(self.bytes(u64::from(blocks)))
    }

    fn offset(&self, lba: u64) -> u64 {
        lba << self.shift
    }

    /// Bytes of `blocks` logical blocks (callers bound `blocks` by the block limits first).
    fn bytes(&self, blocks: u64) -> usize {
        usize::try_from(blocks << self.shift).unwrap_or(usize::MAX)
    }

    fn fua(&self, requested: bool) -> bool {
        // With the write cache disabled (MODE SELECT WCE = 0) every write is forced.
        requested || !self.wce.load(Ordering::Relaxed)
    }

    /// READ(6/10/12/16).
    pub(crate) async fn read(&self, rw: Rw) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        let len = self.check_transfer(rw.lba, rw.blocks, rw.len_field)?;
        if len == 0 {
            return Ok(Self::good(0));
        }
        let data = self
            .dev
            .read(self.offset(rw.lba), len)
            .await
            .map_err(backend)?;
        Ok(ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: data,
            transfer_len: len as u32,
        })
    }

    /// Write `data` at `lba`. Whole blocks go straight to the device under shared stripe
    /// locks. A Data-Out that ends inside a block (the initiator sent fewer bytes than the CDB
    /// asked for) is completed by read-modify-write of that last block under exclusive
    /// locks, so the rest of the block keeps its contents (FCP-4 rule a: transfer what
    /// arrived).
    async fn write_at(&self, lba: u64, data: Segments, fua: bool) -> Result<(), Sense> {
        let bs = self.bytes(1);
        let n = data.len();
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(bs) as u64;
        if n.is_multiple_of(bs) {
            let _held = self.locks.shared(lba, blocks).await;
            return self
                .dev
                .write_segments(self.offset(lba), data, fua)
                .await
                .map_err(backend);
        }
        let _held = self.locks.exclusive(lba, blocks).await;
        let full = n - n % bs;
        let old = self
            .dev
            .read(self.offset(lba) + full as u64, bs)
            .await
            .map_err(backend)?;
        let mut buf = BytesMut::with_capacity(full + bs);
        data.put_into(&mut buf);
        // A device returning fewer bytes than asked is broken: fail rather than panic.
        let rest = old.get(n - full..).ok_or(Sense::INTERNAL_TARGET_FAILURE)?;
        buf.extend_from_slice(rest);
        self.dev
            .write(self.offset(lba), buf.freeze(), fua)
            .await
            .map_err(backend)
    }

    /// WRITE(6/10/12/16). A Data-Out longer than the CDB asks is cut to the CDB length; a
    /// shorter one is written as far as it goes.
    pub(crate) async fn write(&self, rw: Rw, data_out: &Segments) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        self.check_writable()?;
        let want = self.check_transfer(rw.lba, rw.blocks, rw.len_field)?;
        let n = data_out.len().min(want);
        self.write_at(rw.lba, data_out.slice(..n), self.fua(rw.fua))
            .await?;
        Ok(Self::good(want as u32))
    }

    /// WRITE AND VERIFY(10/12/16): write through to stable storage, read back, and with
    /// BYTCHK compare.
    pub(crate) async fn write_and_verify(
        &self,
        rw: Rw,
        bytchk: bool,
        data_out: &Bytes,
    ) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        self.check_writable()?;
        let want = self.check_transfer(rw.lba, rw.blocks, rw.len_field)?;
        let n = data_out.len().min(want);
        if n > 0 {
            let data = data_out.slice(..n);
            self.write_at(rw.lba, data.clone().into(), true).await?;
            let back = self
                .dev
                .read(
                    self.offset(rw.lba),
                    n.div_ceil(self.bytes(1)) * self.bytes(1),
                )
                .await
                .map_err(backend)?;
            if bytchk {
                let back = back.get(..n).ok_or(Sense::INTERNAL_TARGET_FAILURE)?;
                if let Some(at) = first_difference(back, &data) {
                    return Ok(self.fail_len(
                        Sense::MISCOMPARE_DURING_VERIFY.with_info(at as u64),
                        want as u32,
                    ));
                }
            }
        }
        Ok(Self::good(want as u32))
    }

    /// VERIFY(10/12/16): BYTCHK 0 reads the blocks (medium verification), 1 compares them
    /// with the Data-Out, 3 compares each with the single Data-Out block.
    pub(crate) async fn verify(&self, v: Verify, data_out: &Bytes) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        let len = self.check_transfer(v.lba, v.blocks, v.len_field)?;
        if len == 0 {
            return Ok(Self::good(0));
        }
        let bs = self.bytes(1);
        let expect = match v.bytchk {
            0 => 0,
            1 => len,
            _ => bs,
        };
        if data_out.len() < expect {
            return Ok(self.fail_len(
                Sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
                expect as u32,
            ));
        }
        let medium = self
            .dev
            .read(self.offset(v.lba), len)
            .await
            .map_err(backend)?;
        if medium.len() != len {
            return Err(Sense::INTERNAL_TARGET_FAILURE);
        }
        let mismatch = match v.bytchk {
            0 => None,
            1 => first_difference(&medium, &data_out[..len]),
            _ => medium
                .chunks(bs)
                .enumerate()
                .find_map(|(i, blk)| first_difference(blk, &data_out[..bs]).map(|at| i * bs + at)),
        };
        if let Some(at) = mismatch {
            return Ok(self.fail_len(
                Sense::MISCOMPARE_DURING_VERIFY.with_info(at as u64),
                expect as u32,
            ));
        }
        Ok(Self::good(expect as u32))
    }

    /// COMPARE AND WRITE: atomically (against every overlapping write) compare the first
    /// half of the Data-Out with the medium and, if equal, write the second half.
    pub(crate) async fn compare_and_write(
        &self,
        lba: u64,
        blocks: u8,
        fua: bool,
        data_out: &Bytes,
    ) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        self.check_writable()?;
        if blocks > self.lim.max_compare_and_write {
            return Err(Sense::invalid_cdb(13, None));
        }
        self.check_range(lba, u64::from(blocks))?;
        let half = self.bytes(u64::from(blocks));
        let expect = 2 * half;
        if data_out.len() != expect {
            // The Data-Out must be exactly the verify and write instances of the blocks.
            return Ok(self.fail_len(Sense::invalid_cdb(13, None), expect as u32));
        }
        if blocks == 0 {
            return Ok(Self::good(0));
        }
        let off = self.offset(lba);
        let _held = self.locks.exclusive(lba, u64::from(blocks)).await;
        let current = self.dev.read(off, half).await.map_err(backend)?;
        if current.len() != half {
            return Err(Sense::INTERNAL_TARGET_FAILURE);
        }
        if let Some(at) = first_difference(&current, &data_out[..half]) {
            return Ok(self.fail_len(
                Sense::MISCOMPARE_DURING_VERIFY.with_info(at as u64),
                expect as u32,
            ));
        }
        self.dev
            .write(off, data_out.slice(half..), self.fua(fua))
            .await
            .map_err(backend)?;
        Ok(Self::good(expect as u32))
    }

    /// WRITE SAME(10/16).
    pub(crate) async fn write_same(
        &self,
        ws: WriteSame,
        data_out: &Bytes,
    ) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        self.check_writable()?;
        if ws.anchor {
            // ANC_SUP = 0: anchored LBAs are not supported.
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        if ws.unmap && !self.info.thin {
            // LBPWS = LBPWS10 = 0 on a fully provisioned logical unit.
            return Err(Sense::invalid_cdb(1, Some(3)));
        }
        let cap = self.blocks.load(Ordering::Relaxed);
        if ws.lba > cap {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        // NUMBER OF LOGICAL BLOCKS = 0 (WSNZ = 0): to the end of the medium.
        let n = if ws.blocks == 0 {
            cap - ws.lba
        } else {
            u64::from(ws.blocks)
        };
        if n > self.lim.max_write_same {
            return Err(Sense::invalid_cdb(ws.len_field, None));
        }
        self.check_range(ws.lba, n)?;
        let bs = self.bytes(1);
        let block = if ws.ndob {
            Bytes::from(vec![0u8; bs])
        } else {
            if data_out.len() != bs {
                return Ok(
                    self.fail_len(Sense::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT, bs as u32)
                );
            }
            data_out.slice(..bs)
        };
        let transfer = if ws.ndob { 0 } else { bs as u32 };
        if n == 0 {
            return Ok(Self::good(transfer));
        }
        let _held = self.locks.shared(ws.lba, n).await;
        let off = self.offset(ws.lba);
        let total = self.bytes(n);
        // UNMAP on a thin logical unit deallocates; the blocks then read as zeroes (LBPRZ)
        // whatever the Data-Out block held, as initiators expect (SBC-3 §4.7.3.4 lets the
        // device server unmap instead of writing).
        if ws.unmap && self.info.thin {
            self.dev.unmap(off, total as u64).await.map_err(backend)?;
            return Ok(Self::good(transfer));
        }
        let chunk = total.min(WRITE_SAME_CHUNK.max(bs));
        let mut pattern = BytesMut::with_capacity(chunk);
        while pattern.len() < chunk {
            pattern.extend_from_slice(&block);
        }
        let pattern = pattern.freeze();
        let mut done = 0usize;
        while done < total {
            let len = (total - done).min(chunk);
            self.dev
                .write(
                    off + done as u64,
                    pattern.slice(..len),
                    !self.wce.load(Ordering::Relaxed),
                )
                .await
                .map_err(backend)?;
            done += len;
        }
        Ok(Self::good(transfer))
    }

    /// UNMAP.
    pub(crate) async fn unmap(
        &self,
        anchor: bool,
        param_len: u16,
        data_out: &Bytes,
    ) -> Result<ScsiResult, Sense> {
        if !self.info.thin {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE.cdb_field(0, Some(7)));
        }
        self.check_medium()?;
        self.check_writable()?;
        if anchor {
            return Err(Sense::invalid_cdb(1, Some(0)));
        }
        let lim = UnmapLimits {
            capacity: self.blocks.load(Ordering::Relaxed),
            max_lbas: u64::from(self.lim.max_unmap_lbas),
            max_descriptors: self.lim.max_unmap_descriptors as usize,
        };
        let descs = provision::parse_unmap(data_out, usize::from(param_len), &lim)?;
        for d in descs.iter().filter(|d| d.blocks > 0) {
            let _held = self.locks.shared(d.lba, u64::from(d.blocks)).await;
            self.dev
                .unmap(self.offset(d.lba), u64::from(d.blocks) << self.shift)
                .await
                .map_err(backend)?;
        }
        Ok(Self::good(u32::from(param_len)))
    }

    /// GET LBA STATUS: describes the provisioning state from `lba` on, as far as the
    /// allocation length has room for descriptors (at least one).
    pub(crate) async fn get_lba_status(
        &self,
        lba: u64,
        alloc_len: u32,
    ) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        let cap = self.blocks.load(Ordering::Relaxed);
        if lba >= cap {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        let max_descs = ((alloc_len as usize).saturating_sub(8) / 16).max(1);
        let window = (cap - lba).min(LBA_STATUS_WINDOW >> self.shift);
        let extents = self
            .dev
            .extents(self.offset(lba), window << self.shift)
            .await
            .map_err(backend)?;
        let descs = self.lba_descriptors(lba, window, &extents, max_descs);
        Ok(Self::data(
            provision::lba_status(&descs),
            alloc_len as usize,
        ))
    }

    fn lba_descriptors(
        &self,
        lba: u64,
        window: u64,
        extents: &[Extent],
        max: usize,
    ) -> Vec<LbaStatus> {
        let bs = 1u64 << self.shift;
        let end = lba + window;
        let mut out: Vec<LbaStatus> = Vec::new();
        let mut at = lba;
        for e in extents {
            let first = (e.offset / bs).max(at);
            let last = (e.offset.saturating_add(e.len)).div_ceil(bs).min(end);
            if last <= first {
                continue;
            }
            let state = if e.mapped {
                LbaState::Mapped
            } else {
                LbaState::Deallocated
            };
            let mut start = first;
            while start < last {
                let n = (last - start).min(u64::from(u32::MAX)) as u32;
                match out.last_mut() {
                    Some(p)
                        if p.state == state
                            && p.lba + u64::from(p.blocks) == start
                            && p.blocks.checked_add(n).is_some() =>
                    {
                        p.blocks += n;
                    }
                    _ => out.push(LbaStatus {
                        lba: start,
                        blocks: n,
                        state,
                    }),
                }
                start += u64::from(n);
            }
            at = last;
        }
        if out.is_empty() {
            let n = window.min(u64::from(u32::MAX)) as u32;
            out.push(LbaStatus {
                lba,
                blocks: n,
                state: LbaState::Mapped,
            });
        }
        out.truncate(max);
        out
    }

    /// SYNCHRONIZE CACHE(10/16): the whole backend is flushed (ranges are checked).
    pub(crate) async fn synchronize_cache(
        &self,
        lba: u64,
        blocks: u32,
    ) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        // An LBA past the capacity fails the range check whatever the block count.
        self.check_range(lba, u64::from(blocks))?;
        self.dev.flush().await.map_err(backend)?;
        Ok(Self::good(0))
    }

    /// PRE-FETCH(10/16): there is no cache to load, so GOOD (not CONDITION MET, SBC-3
    /// §5.8: the blocks do not fit a cache of size zero).
    pub(crate) fn pre_fetch(&self, lba: u64, blocks: u32) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        self.check_range(lba, u64::from(blocks))?;
        Ok(Self::good(0))
    }

    pub(crate) fn capacity(&self) -> Capacity {
        Capacity {
            blocks: self.blocks.load(Ordering::Relaxed),
            block_size: self.block_size(),
            lbppbe: self.lim.lbppbe,
            lbpme: self.info.thin,
            lbprz: true,
        }
    }

    /// READ CAPACITY(10).
    pub(crate) fn read_capacity10(&self) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        Ok(Self::data(
            capacity::read_capacity10(&self.capacity()).to_vec(),
            8,
        ))
    }

    /// READ CAPACITY(16).
    pub(crate) fn read_capacity16(&self, alloc_len: u32) -> Result<ScsiResult, Sense> {
        self.check_medium()?;
        Ok(Self::data(
            capacity::read_capacity16(&self.capacity()).to_vec(),
            alloc_len as usize,
        ))
    }
}
