//! The metadata log: a two-half append-only log of checksummed records (extent allocations,
//! fencing epochs, per-volume records). The active half starts with a snapshot of the whole
//! state; records follow it with consecutive sequence numbers. When a half is full, a
//! snapshot of the state is written at the start of the other half with the next sequence
//! number, which makes that half the active one: a crash in the middle of the switch leaves
//! the old half whole and active.
//!
//! On open, the half whose first record is the valid snapshot with the higher sequence number
//! is replayed until the first record that is invalid (torn, never written) or out of
//! sequence (left from an earlier use of the half). Every append is durable before it
//! returns, so nothing after that point was ever acknowledged.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use tessera_uring::buf::AlignedBuf;
use tessera_uring::{sys, RwFlags, SharedFd, Uring};

use super::format::{MetaState, Record, BLOCK, META_HALF, META_OFFSET, RECORD_HEADER};

pub(super) struct MetaLog {
    state: RefCell<MetaState>,
    half: Cell<u64>,
    /// Next write position within the active half.
    pos: Cell<u64>,
    next_seq: Cell<u64>,
    io: Option<(SharedFd, Uring)>,
    lock: tokio::sync::Mutex<()>,
}

fn half_offset(half: u64) -> u64 {
    META_OFFSET + half * META_HALF
}

fn read_at(file: &File, off: u64, len: usize) -> io::Result<AlignedBuf> {
    let mut b = AlignedBuf::new(len);
    let mut got = 0;
    while got < len {
        let n = sys::pread(file.as_fd(), &mut b[got..], off + got as u64)?;
        if n == 0 {
            break; // past the end of a sparse file: zeroes
        }
        got += n;
    }
    Ok(b)
}

impl MetaLog {
    /// Write the first snapshot of an empty state into half 0.
    pub(super) fn format(file: &File) -> io::Result<()> {
        let rec = Record::Snapshot(MetaState::default()).encode(1);
        let b = AlignedBuf::copy_from_slice(&rec);
        sys::pwrite(file.as_fd(), &b, half_offset(0), 0)?;
        // Make sure half 1 does not start with a valid snapshot from an earlier store.
        let z = AlignedBuf::new(BLOCK);
        sys::pwrite(file.as_fd(), &z, half_offset(1), 0)?;
        Ok(())
    }

    /// Replay the log.
    pub(super) fn open(file: &File) -> Result<Self, String> {
        let io = |e: io::Error| e.to_string();
        let mut best: Option<(u64, u64, MetaState, u64)> = None; // (seq, half, state, len)
        for half in 0..2 {
            let head = read_at(file, half_offset(half), BLOCK).map_err(io)?;
            let Some((_, len)) = Record::decode_header(&head) else {
                continue;
            };
            let total = (RECORD_HEADER + len).div_ceil(BLOCK) * BLOCK;
            if total as u64 > META_HALF {
                continue;
            }
            let whole = read_at(file, half_offset(half), total).map_err(io)?;
            if let Some((seq, Record::Snapshot(s))) = Record::decode(&whole) {
                if best.as_ref().is_none_or(|b| seq > b.0) {
                    best = Some((seq, half, s, total as u64));
                }
            }
        }
        let Some((mut seq, half, mut state, mut pos)) = best else {
            return Err("no valid snapshot in either half".into());
        };
        // Replay the records that follow.
        loop {
            if pos + BLOCK as u64 > META_HALF {
                break;
            }
            let head = read_at(file, half_offset(half) + pos, BLOCK).map_err(io)?;
            let Some((s, len)) = Record::decode_header(&head) else {
                break;
            };
            if s != seq + 1 {
                break;
            }
            let total = (RECORD_HEADER + len).div_ceil(BLOCK) * BLOCK;
            if pos + total as u64 > META_HALF {
                break;
            }
            let whole = if total == BLOCK {
                head
            } else {
                read_at(file, half_offset(half) + pos, total).map_err(io)?
            };
            let Some((_, r)) = Record::decode(&whole) else {
                break;
            };
            state.apply(&r);
            seq = s;
            pos += total as u64;
        }
        Ok(Self {
            state: RefCell::new(state),
            half: Cell::new(half),
            pos: Cell::new(pos),
            next_seq: Cell::new(seq + 1),
            io: None,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Attach the descriptor and engine appends go through.
    pub(super) fn with_fd(mut self, fd: SharedFd, engine: Uring) -> Self {
        self.io = Some((fd, engine));
        self
    }

    pub(super) fn with_state<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        f(&self.state.borrow())
    }

    /// Append `recs` durably and apply them.
    pub(super) async fn append(&self, recs: Vec<Record>) -> io::Result<()> {
        self.append_if(|| true, recs).await
    }

    /// Append `recs` if `cond` holds once the log is ours (checked under the append lock, so
    /// a condition on the state cannot race another append).
    pub(super) async fn append_if(
        &self,
        cond: impl Fn() -> bool,
        recs: Vec<Record>,
    ) -> io::Result<()> {
        let _g = self.lock.lock().await;
        if !cond() {
            return Ok(());
        }
        let (fd, engine) = self
            .io
            .as_ref()
            .expect("metadata log attached to a descriptor");
        let mut seq = self.next_seq.get();
        let mut bytes = Vec::new();
        for r in &recs {
            bytes.extend_from_slice(&r.encode(seq));
            seq += 1;
        }
        let (off, new_half, new_pos) = if self.pos.get() + bytes.len() as u64 <= META_HALF {
            (
                half_offset(self.half.get()) + self.pos.get(),
                self.half.get(),
                self.pos.get() + bytes.len() as u64,
            )
        } else {
            // Switch halves: the snapshot of the state with `recs` applied replaces them.
            let mut s = self.state.borrow().clone();
            for r in &recs {
                s.apply(r);
            }
            seq = self.next_seq.get();
            bytes = Record::Snapshot(s).encode(seq);
            seq += 1;
            if bytes.len() as u64 > META_HALF {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let other = 1 - self.half.get();
            (half_offset(other), other, bytes.len() as u64)
        };
        let len = bytes.len();
        let buf = AlignedBuf::copy_from_slice(&bytes);
        let (r, _) = engine.write_at(fd, buf, off, RwFlags::DSYNC).await;
        match r {
            Ok(n) if n == len => {}
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Err(e) => return Err(e),
        }
        {
            let mut st = self.state.borrow_mut();
            for r in &recs {
                st.apply(r);
            }
        }
        self.half.set(new_half);
        self.pos.set(new_pos);
        self.next_seq.set(seq);
        Ok(())
    }
}
