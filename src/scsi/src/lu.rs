//! The logical unit: executes SCSI commands (SPC-4, SBC-3) against a block device.
//!
//! # Command processing
//!
//! Every command goes through, in order (SAM-5 unit attention rules, SPC-4 §5.13):
//! 1. **admission** — pending unit attentions of the I_T nexus (not for INQUIRY, REPORT LUNS
//!    and REQUEST SENSE), then SPC-2 and persistent reservation conflicts for the command's
//!    class ([`ua`](crate::ua));
//! 2. **CDB decoding** ([`Command::parse`]) with field pointers for bad fields;
//! 3. **execution**: medium, write protection and LBA range checks, then the backend.
//!
//! Admission has a lock-free fast path: each core caches "this nexus is clean at epoch E",
//! and every event that could change the answer (a unit attention queued anywhere, a
//! reservation change) bumps the logical unit's epoch. READ and WRITE therefore take no lock
//! and allocate nothing beyond the data buffer; the `Bytes` from the device is the Data-In.
//!
//! # Transfer lengths
//!
//! [`ScsiResult::transfer_len`] is the number of bytes the CDB asks to transfer in the
//! command's direction: for READ/WRITE/VERIFY/WRITE AND VERIFY the transfer length in blocks
//! times the block size; COMPARE AND WRITE twice the blocks; WRITE SAME one block (zero
//! with NDOB); UNMAP, MODE SELECT and PERSISTENT RESERVE OUT the parameter list length; for
//! data-in commands with an allocation length the bytes actually produced, capped by the
//! allocation length. A command failing before any transfer reports 0.
//!
//! Writes whose Data-Out (the iSCSI expected length) differs from the CDB transfer length
//! (libiscsi's iSCSIResiduals tests, FCP-4 rule a): when longer, only the CDB's blocks are
//! written (the transport reports underflow); when shorter, what arrived is written — a
//! trailing partial block by read-modify-write, so the rest of that block is kept — and the
//! transport reports overflow. `transfer_len` is the CDB length in both cases.
//!
//! # Persistent reservations
//!
//! PR state is saved through the [`PrStore`] on every change, before the command completes,
//! and loaded when the logical unit is created — regardless of APTPL: a gateway restart is
//! not a power loss of the distributed logical unit (the volume lives on), so registrations
//! must survive it. APTPL is recorded and reported (REPORT CAPABILITIES PTPL_A) as given.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tessera_proto::block::{BlockDevice, DeviceInfo};
use tessera_proto::scsi::cdb::{Command, Opcode, ServiceAction};
use tessera_proto::scsi::mode::ModeParams;
use tessera_proto::scsi::pr::{Access, Port, PrState};
use tessera_proto::scsi::Sense;

use crate::api::{status, Nexus, ScsiCommand, ScsiResult};
use crate::lock::RangeLocks;
use crate::prstore::PrStore;
use crate::ua::{self, NexusEntry, NexusKey};

/// Configuration of one logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuConfig {
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Reject writes with DATA PROTECT / WRITE PROTECTED.
    pub read_only: bool,
    /// Removable medium (START STOP UNIT LOEJ, PREVENT ALLOW MEDIUM REMOVAL).
    pub removable: bool,
    /// INQUIRY T10 VENDOR IDENTIFICATION (up to 8 characters).
    pub vendor: String,
    /// INQUIRY PRODUCT IDENTIFICATION (up to 16 characters).
    pub product: String,
    /// INQUIRY PRODUCT REVISION LEVEL (up to 4 characters).
    pub revision: String,
    /// VPD 80h unit serial number.
    pub serial: String,
    /// Low 60 bits used in the NAA-6 designator (derive it from the volume identity).
    pub naa_id: u64,
}

impl Default for LuConfig {
    fn default() -> Self {
        Self {
            block_size: 512,
            read_only: false,
            removable: false,
            vendor: "TESSERA".into(),
            product: "VIRTUAL-DISK".into(),
            revision: "0001".into(),
            serial: String::new(),
            naa_id: 0,
        }
    }
}

/// Limits derived from the configuration and the device (VPD B0h, READ CAPACITY(16)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
    pub lbppbe: u8,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY in blocks (the backend's allocation unit).
    pub granularity: u16,
    /// MAXIMUM TRANSFER LENGTH in blocks.
    pub max_transfer: u32,
    /// MAXIMUM WRITE SAME LENGTH in blocks.
    pub max_write_same: u64,
    /// MAXIMUM UNMAP LBA COUNT (0: UNMAP unsupported).
    pub max_unmap_lbas: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY in blocks.
    pub unmap_granularity: u32,
    /// MAXIMUM COMPARE AND WRITE LENGTH.
    pub max_compare_and_write: u8,
}

const MAX_TRANSFER_BYTES: u64 = 16 << 20;
/// WRITE SAME covers at most what one WRITE may (initiators size their buffers by it).
const MAX_WRITE_SAME_BYTES: u64 = MAX_TRANSFER_BYTES;
const MAX_UNMAP_LBAS: u32 = 1 << 20;
const MAX_UNMAP_DESCRIPTORS: u32 = 1024;
/// Bytes covered by one range-lock stripe.
const LOCK_STRIPE_BYTES: u64 = 1 << 20;

/// Mutable state behind the logical unit's one lock (never held across an await).
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Per I_T nexus: unit attentions and PREVENT.
    pub nexuses: HashMap<NexusKey, NexusEntry>,
    /// The SPC-2 (RESERVE/RELEASE) reservation holder.
    pub spc2: Option<NexusKey>,
    /// Persistent reservations.
    pub pr: PrState,
    /// Current mode parameters.
    pub mode: ModeParams,
    /// Target ports seen: relative port → (port group, port name).
    pub ports: BTreeMap<u16, (u16, Arc<str>)>,
    /// Asymmetric access, when set (see [`LogicalUnit::set_alua`]).
    pub alua: Option<Alua>,
    /// The unit attention a nexus first seen gets (POWER ON, RESET OCCURRED unless set).
    pub first_ua: Option<Sense>,
}

/// Asymmetric logical unit access: the target port groups there are and which one is
/// active/optimized (the others are active/non-optimized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alua {
    /// Every target port group of the logical unit (in a cluster: one per gateway).
    pub groups: Vec<u16>,
    /// The active/optimized group (the owner's); `None`: every group is (no owner known).
    pub optimized: Option<u16>,
}

/// Source of [`LogicalUnit`] identities for the per-core admission cache.
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A logical unit. `Send + Sync`: shared by every core behind an `Arc`.
pub struct LogicalUnit {
    pub(crate) uid: u64,
    pub(crate) cfg: LuConfig,
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) info: DeviceInfo,
    pub(crate) shift: u32,
    pub(crate) blocks: AtomicU64,
    pub(crate) lim: Limits,
    /// Bumped (under `state`) whenever admission answers may change.
    pub(crate) epoch: AtomicU64,
    pub(crate) wce: AtomicBool,
    pub(crate) d_sense: AtomicBool,
    pub(crate) swp: AtomicBool,
    /// Medium present (removable logical units can eject it).
    pub(crate) medium: AtomicBool,
    pub(crate) state: Mutex<State>,
    pub(crate) locks: RangeLocks,
    /// Serializes PERSISTENT RESERVE OUT including persistence.
    pub(crate) pr_out: tokio::sync::Mutex<()>,
    pub(crate) pr_store: Option<Arc<dyn PrStore>>,
    /// Commands executing now (a removed logical unit drains until this is 0).
    pub(crate) busy: AtomicUsize,
}

/// Counts a command in [`LogicalUnit::busy`] while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn enter(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("uid", &self.uid)
            .field("cfg", &self.cfg)
            .field("blocks", &self.blocks.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn invalid_input(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

impl LogicalUnit {
    /// Create a logical unit over `dev`, loading persistent reservation state from `pr`.
    pub fn new(
        cfg: LuConfig,
        dev: Arc<dyn BlockDevice>,
        pr: Option<Box<dyn PrStore>>,
    ) -> io::Result<Self> {
        let bs = cfg.block_size;
        if bs != 512 && bs != 4096 {
            return Err(invalid_input("block size must be 512 or 4096"));
        }
        let shift = bs.trailing_zeros();
        let info = dev.info();
        let blocks = info.size_bytes >> shift;
        let pr_store: Option<Arc<dyn PrStore>> = pr.map(Arc::from);
        let pr_state = match &pr_store {
            Some(s) => match s.load()? {
                Some(bytes) => PrState::decode(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                None => PrState::default(),
            },
            None => PrState::default(),
        };
        // The backend's allocation unit, in logical blocks: reported as the optimal transfer
        // and unmap granularities. LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: GET
        // LBA STATUS describes single logical blocks, and initiators (libiscsi's
        // GetLBAStatus.UnmapSingle) read LBPPBE as the provisioning granularity.
        let gran = u64::from(info.unmap_granularity).max(u64::from(bs));
        let per_unit = if gran % u64::from(bs) == 0 {
            (gran / u64::from(bs)).min(1 << 15) as u32
        } else {
            1
        };
        let thin = info.thin;
        let lim = Limits {
            lbppbe: 0,
            granularity: per_unit as u16,
            max_transfer: (MAX_TRANSFER_BYTES >> shift) as u32,
            max_write_same: MAX_WRITE_SAME_BYTES >> shift,
            max_unmap_lbas: if thin { MAX_UNMAP_LBAS } else { 0 },
            max_unmap_descriptors: if thin { MAX_UNMAP_DESCRIPTORS } else { 0 },
            unmap_granularity: if thin { per_unit } else { 0 },
            max_compare_and_write: 255,
        };
        let mode = ModeParams::default();
        let lock_shift = (LOCK_STRIPE_BYTES >> shift).trailing_zeros();
        Ok(Self {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            cfg,
            dev,
            info,
            shift,
            blocks: AtomicU64::new(blocks),
            lim,
            epoch: AtomicU64::new(1),
            wce: AtomicBool::new(mode.wce),
            d_sense: AtomicBool::new(mode.d_sense),
            swp: AtomicBool::new(mode.swp),
            medium: AtomicBool::new(true),
            state: Mutex::new(State {
                pr: pr_state,
                mode,
                ..State::default()
            }),
            locks: RangeLocks::new(lock_shift),
            pr_out: tokio::sync::Mutex::new(()),
            pr_store,
            busy: AtomicUsize::new(0),
        })
    }

    /// The configuration this logical unit was created with.
    pub fn config(&self) -> &LuConfig {
        &self.cfg
    }

    /// Capacity in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.cfg.block_size
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a single
        // assignment or push); keep serving rather than poisoning the logical unit.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bump the admission epoch. Call with the state lock held.
    pub(crate) fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Complete with `s` and no data.
    pub(crate) fn fail(&self, s: Sense) -> ScsiResult {
        self.fail_len(s, 0)
    }

    /// Complete with `s`, reporting `transfer_len`.
    pub(crate) fn fail_len(&self, s: Sense, transfer_len: u32) -> ScsiResult {
        let sense = s
            .has_sense_data()
            .then(|| Bytes::from(s.encode(self.d_sense.load(Ordering::Relaxed))));
        ScsiResult {
            status: s.status,
            sense,
            data_in: Bytes::new(),
            transfer_len,
        }
    }

    /// GOOD, no data, reporting `transfer_len`.
    pub(crate) fn good(transfer_len: u32) -> ScsiResult {
        ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: Bytes::new(),
            transfer_len,
        }
    }

    /// GOOD with Data-In `data`, truncated to the allocation length.
    pub(crate) fn data(mut data: Vec<u8>, alloc_len: usize) -> ScsiResult {
        data.truncate(alloc_len);
        let transfer_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: Bytes::from(data),
            transfer_len,
        }
    }

    /// The nexus as persistent reservations see it.
    pub(crate) fn port(nexus: &Nexus) -> Port<'_> {
        Port {
            initiator_port: &nexus.initiator_port,
            initiator_name: &nexus.initiator_name,
            target_port: &nexus.target_port,
            relative_port: nexus.relative_port,
        }
    }

    /// Execute one command from `nexus`.
    pub async fn execute(&self, nexus: &Nexus, cmd: &ScsiCommand) -> ScsiResult {
        let _busy = Busy::enter(&self.busy);
        let cdb = &cmd.cdb[..];
        let (op, sa) = Command::opcode_of(cdb);
        let class = Class::of(op, sa);
        if let Err(s) = self.admit(nexus, &class) {
            return self.fail(s);
        }
        let parsed = match Command::parse(cdb) {
            Ok(c) => c,
            Err(s) => return self.fail(s),
        };
        // READ and WRITE run inline; everything else is boxed so the future of the hot
        // path stays small.
        let done = match parsed {
            Command::Read(rw) => self.read(rw).await,
            Command::Write(rw) => self.write(rw, &cmd.data_out).await,
            other => Box::pin(self.dispatch(nexus, cmd, other)).await,
        };
        match done {
            Ok(r) => r,
            Err(s) => self.fail(s),
        }
    }

    /// Commands executing now.
    pub fn in_flight(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    /// The device the logical unit stores its blocks on.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    fn admit(&self, nexus: &Nexus, class: &Class) -> Result<(), Sense> {
        if !class.ua_exempt {
            let epoch = self.epoch.load(Ordering::Acquire);
            if ua::cached_admits(self.uid, nexus.id, epoch, class.access) {
                return Ok(());
            }
        }
        self.admit_slow(nexus, class)
    }

    fn admit_slow(&self, nexus: &Nexus, class: &Class) -> Result<(), Sense> {
        let mut st = self.lock_state();
        let key = self.touch(&mut st, nexus);
        let port = Self::port(nexus);
        let spc2_other = st.spc2.as_ref().is_some_and(|h| *h != key);
        let Some(entry) = st.nexuses.get_mut(&key) else {
            return Err(Sense::INTERNAL_TARGET_FAILURE);
        };
        if !class.ua_exempt {
            if let Some(ua) = entry.ua.pop_front() {
                return Err(ua);
            }
        }
        let clean = entry.ua.is_empty() && !spc2_other;
        let bits = ua::Admits {
            none: clean,
            read: clean && !st.pr.conflicts(&port, Access::Read),
            write: clean && !st.pr.conflicts(&port, Access::Write),
        };
        ua::cache_admits(self.uid, nexus.id, self.epoch.load(Ordering::Acquire), bits);
        if spc2_other && !class.spc2_exempt {
            return Err(Sense::RESERVATION_CONFLICT);
        }
        if st.pr.conflicts(&port, class.access) {
            return Err(Sense::RESERVATION_CONFLICT);
        }
        Ok(())
    }

    /// Make sure `nexus` has an entry (a new one starts with POWER ON, RESET OCCURRED) and
    /// its target port is known. Returns its key.
    pub(crate) fn touch(&self, st: &mut State, nexus: &Nexus) -> NexusKey {
        let key = NexusKey::of(nexus);
        if !st.nexuses.contains_key(&key) {
            let first = st.first_ua.unwrap_or(Sense::POWER_ON_RESET);
            st.nexuses.insert(key.clone(), NexusEntry::new_with(first));
        }
        st.ports
            .entry(nexus.relative_port)
            .or_insert_with(|| (nexus.port_group, nexus.target_port.clone()));
        key
    }

    /// The session of `nexus` ended (logout or connection loss): its SPC-2 reservation,
    /// PREVENT state and unit attention queue go (SPC-4 §5.13.2, SBC-3 §5.11).
    pub fn nexus_gone(&self, nexus: &Nexus) {
        let key = NexusKey::of(nexus);
        let mut st = self.lock_state();
        st.nexuses.remove(&key);
        if st.spc2.as_ref() == Some(&key) {
            st.spc2 = None;
        }
        self.bump();
        ua::forget(self.uid, nexus.id);
    }

    /// LOGICAL UNIT RESET (SAM-5 §7.7) and target resets: releases the SPC-2 reservation,
    /// clears PREVENT, restores default mode parameters and replaces every nexus's unit
    /// attentions with `ua`. Persistent reservations are unaffected.
    pub fn reset(&self, ua: Sense) {
        let mut st = self.lock_state();
        st.spc2 = None;
        for e in st.nexuses.values_mut() {
            e.prevent = false;
            e.ua.clear();
            e.ua.push_back(ua);
        }
        st.mode = ModeParams::default();
        self.set_mode_atomics(&st.mode);
        self.bump();
    }

    /// Queue a unit attention for every known I_T nexus (e.g. REPORTED LUNS DATA HAS
    /// CHANGED), optionally except one.
    pub(crate) fn broadcast(&self, st: &mut State, ua: Sense, except: Option<&NexusKey>) {
        for (k, e) in st.nexuses.iter_mut() {
            if Some(k) != except {
                e.push(ua);
            }
        }
        self.bump();
    }

    /// Queue `ua` for every nexus and bump the epoch (used by the target).
    pub(crate) fn unit_attention_all(&self, ua: Sense) {
        let mut st = self.lock_state();
        self.broadcast(&mut st, ua, None);
    }

    /// Drop a pending REPORTED LUNS DATA HAS CHANGED for `nexus` (REPORT LUNS clears it).
    pub(crate) fn clear_luns_changed(&self, nexus: &Nexus) {
        let mut st = self.lock_state();
        if let Some(e) = st.nexuses.get_mut(&NexusKey::of(nexus)) {
            e.ua.retain(|s| *s != Sense::REPORTED_LUNS_DATA_HAS_CHANGED);
        }
    }

    /// Set the asymmetric access states REPORT TARGET PORT GROUPS reports. When the optimized
    /// group changes (ownership moved), every nexus gets ASYMMETRIC ACCESS STATE CHANGED.
    pub fn set_alua(&self, alua: Alua) {
        let mut st = self.lock_state();
        let moved = st
            .alua
            .as_ref()
            .is_some_and(|old| old.optimized != alua.optimized);
        st.alua = Some(alua);
        if moved {
            self.broadcast(&mut st, Sense::ASYMMETRIC_ACCESS_STATE_CHANGED, None);
        }
    }

    /// The unit attention every nexus gets at its first command here, instead of POWER ON,
    /// RESET OCCURRED: a logical unit that took over from another gateway sets ASYMMETRIC
    /// ACCESS STATE CHANGED (to the initiator it is the same logical unit, on another port).
    pub fn set_first_unit_attention(&self, ua: Sense) {
        self.lock_state().first_ua = Some(ua);
    }

    /// The backend's size changed (volume resize): re-read it and tell every nexus
    /// (CAPACITY DATA HAS CHANGED).
    pub fn capacity_changed(&self) {
        let blocks = self.dev.info().size_bytes >> self.shift;
        self.blocks.store(blocks, Ordering::Relaxed);
        self.unit_attention_all(Sense::CAPACITY_DATA_HAS_CHANGED);
    }

    pub(crate) fn set_mode_atomics(&self, m: &ModeParams) {
        self.wce.store(m.wce, Ordering::Relaxed);
        self.d_sense.store(m.d_sense, Ordering::Relaxed);
        self.swp.store(m.swp, Ordering::Relaxed);
    }

    async fn dispatch(
        &self,
        nexus: &Nexus,
        cmd: &ScsiCommand,
        c: Command,
    ) -> Result<ScsiResult, Sense> {
        match c {
            Command::Read(rw) => self.read(rw).await,
            Command::Write(rw) => self.write(rw, &cmd.data_out).await,
            Command::TestUnitReady => {
                self.check_medium()?;
                Ok(Self::good(0))
            }
            Command::RequestSense { desc, alloc_len } => {
                Ok(self.request_sense(nexus, desc, alloc_len))
            }
            Command::Inquiry {
                evpd,
                page,
                alloc_len,
            } => self.inquiry(nexus, evpd, page, alloc_len),
            Command::ModeSense(ms) => self.mode_sense(&ms),
            Command::ModeSelect(ms) => self.mode_select(nexus, &ms, &cmd.data_out.to_bytes()),
            Command::ReadCapacity10 => self.read_capacity10(),
            Command::ReadCapacity16 { alloc_len } => self.read_capacity16(alloc_len),
            Command::WriteAndVerify { rw, bytchk } => {
                self.write_and_verify(rw, bytchk, &cmd.data_out.to_bytes())
                    .await
            }
            Command::Verify(v) => self.verify(v, &cmd.data_out.to_bytes()).await,
            Command::WriteSame(ws) => self.write_same(ws, &cmd.data_out.to_bytes()).await,
            Command::Unmap { anchor, param_len } => {
                self.unmap(anchor, param_len, &cmd.data_out.to_bytes())
                    .await
            }
            Command::GetLbaStatus { lba, alloc_len } => self.get_lba_status(lba, alloc_len).await,
            Command::SynchronizeCache { lba, blocks } => self.synchronize_cache(lba, blocks).await,
            Command::PreFetch { lba, blocks } => self.pre_fetch(lba, blocks),
            Command::CompareAndWrite { lba, blocks, fua } => {
                self.compare_and_write(lba, blocks, fua, &cmd.data_out.to_bytes())
                    .await
            }
            Command::ReportLuns { select, alloc_len } => {
                crate::target::report_luns(&[0], select, alloc_len)
            }
            Command::ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc_len,
            } => self.report_supported_opcodes(rctd, options, opcode, sa, alloc_len),
            Command::ReportTargetPortGroups {
                extended,
                alloc_len,
            } => Ok(self.report_target_port_groups(nexus, extended, alloc_len)),
            Command::StartStopUnit(ss) => self.start_stop_unit(nexus, ss).await,
            Command::PreventAllow { prevent } => Ok(self.prevent_allow(nexus, prevent)),
            Command::Reserve => self.reserve_spc2(nexus),
            Command::Release => self.release_spc2(nexus),
            Command::PersistentReserveIn { sa, alloc_len } => {
                Ok(self.persistent_reserve_in(sa, alloc_len))
            }
            Command::PersistentReserveOut {
                sa,
                scope,
                kind,
                param_len,
            } => {
                let params = cmd.data_out.to_bytes();
                self.persistent_reserve_out(nexus, sa, scope, kind, param_len, &params)
                    .await
            }
        }
    }
}

/// How a command is admitted (by operation code, before decoding).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Class {
    /// Reservation conflict class (SPC-4 Table 66, SBC-3 Table 13).
    pub access: Access,
    /// Neither reports nor clears unit attentions (SAM-5: INQUIRY,
    /// REPORT LUNS, REQUEST SENSE).
    pub ua_exempt: bool,
    /// Allowed while another I_T nexus holds an SPC-2 reservation.
    pub spc2_exempt: bool,
}

impl Class {
    pub(crate) fn of(op: u8, sa: Option<u8>) -> Self {
        let (access, ua_exempt, spc2_exempt) = match op {
            Opcode::INQUIRY | Opcode::REPORT_LUNS | Opcode::REQUEST_SENSE => {
                (Access::None, true, true)
            }
            Opcode::RELEASE_6 | Opcode::RELEASE_10 => (Access::None, false, true),
            Opcode::MAINTENANCE_IN => (Access::None, false, true),
            Opcode::TEST_UNIT_READY
            | Opcode::READ_CAPACITY_10
            | Opcode::RESERVE_6
            | Opcode::RESERVE_10
            | Opcode::PERSISTENT_RESERVE_IN
            | Opcode::PERSISTENT_RESERVE_OUT => (Access::None, false, false),
            Opcode::SERVICE_ACTION_IN_16 if sa == Some(ServiceAction::READ_CAPACITY_16) => {
                (Access::None, false, false)
            }
            Opcode::READ_6
            | Opcode::READ_10
            | Opcode::READ_12
            | Opcode::READ_16
            | Opcode::VERIFY_10
            | Opcode::VERIFY_12
            | Opcode::VERIFY_16
            | Opcode::PRE_FETCH_10
            | Opcode::PRE_FETCH_16
            | Opcode::MODE_SENSE_6
            | Opcode::MODE_SENSE_10
            | Opcode::SERVICE_ACTION_IN_16 => (Access::Read, false, false),
            // Writes, WRITE SAME, UNMAP, COMPARE AND WRITE, SYNCHRONIZE CACHE, MODE SELECT,
            // START STOP UNIT, PREVENT ALLOW and unknown operation codes.
            _ => (Access::Write, false, false),
        };
        Self {
            access,
            ua_exempt,
            spc2_exempt,
        }
    }
}
