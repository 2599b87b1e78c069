//! A SCSI target: a set of logical units addressed by LUN (SAM-5 §4.6, SPC-4 §6.33).
//!
//! The target routes commands to logical units, answers REPORT LUNS itself, answers for
//! LUNs with no logical unit (INQUIRY with peripheral qualifier 011b, REQUEST SENSE and
//! everything else with LOGICAL UNIT NOT SUPPORTED), and applies the logical-unit side
//! effects of task management functions. Aborting in-flight tasks is the transport's job.
//!
//! Routing takes no lock: each core keeps a snapshot of the LUN map (reference counted
//! per core) and refreshes it when the target's generation changes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tessera_proto::scsi::cdb::{Command, Opcode};
use tessera_proto::scsi::{inquiry, luns, vpd, Sense};

use crate::api::{status, Nexus, ScsiCommand, ScsiResult, TmfFunction, TmfResponse};
use crate::lu::LogicalUnit;

/// A LUN whose logical unit lives elsewhere (in a cluster: on the gateway that owns the
/// volume): every command, task management function and nexus loss goes there.
pub trait RemoteLun: Send + Sync {
    /// Execute `cmd` from `nexus` where the logical unit is.
    fn execute<'a>(
        &'a self,
        nexus: &'a Nexus,
        cmd: &'a ScsiCommand,
    ) -> tessera_proto::block::LocalBoxFuture<'a, ScsiResult>;
    /// Apply a task management function there.
    fn task_mgmt<'a>(
        &'a self,
        nexus: &'a Nexus,
        f: TmfFunction,
    ) -> tessera_proto::block::LocalBoxFuture<'a, TmfResponse>;
    /// `nexus` ended (best effort, need not wait).
    fn nexus_gone(&self, nexus: &Nexus);
}

/// What a LUN leads to.
#[derive(Clone)]
enum Entry {
    Local(Arc<LogicalUnit>),
    Remote(Arc<dyn RemoteLun>),
}

type LunMap = BTreeMap<u64, Entry>;

static NEXT_TARGET: AtomicU64 = AtomicU64::new(1);

struct Snapshot {
    target: u64,
    generation: u64,
    luns: Rc<LunMap>,
}

thread_local! {
    static SNAPSHOTS: RefCell<Vec<Snapshot>> = const { RefCell::new(Vec::new()) };
}

/// One iSCSI target: a set of LUNs. `Send + Sync`.
pub struct Target {
    uid: u64,
    name: String,
    luns: Mutex<LunMap>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("luns", &self.luns())
            .finish()
    }
}

/// REPORT LUNS data for `list` (SELECT REPORT 00h and 02h: all; 01h: well-known logical
/// units, of which there are none).
pub(crate) fn report_luns(list: &[u64], select: u8, alloc_len: u32) -> Result<ScsiResult, Sense> {
    if alloc_len < 16 {
        return Err(Sense::invalid_cdb(6, None));
    }
    let data = match select {
        0x00 | 0x02 => luns::report_luns(list),
        0x01 => luns::report_luns(&[]),
        _ => return Err(Sense::invalid_cdb(2, None)),
    };
    Ok(LogicalUnit::data(data, alloc_len as usize))
}

impl Target {
    /// An empty target called `name` (its iSCSI target name).
    pub fn new(name: &str) -> Self {
        Self {
            uid: NEXT_TARGET.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            luns: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(1),
        }
    }

    /// The target name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn map(&self) -> MutexGuard<'_, LunMap> {
        self.luns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self, map: &LunMap) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        // The inventory changed: every logical unit tells its nexuses (SPC-4 §6.33).
        for e in map.values() {
            if let Entry::Local(lu) = e {
                lu.unit_attention_all(Sense::REPORTED_LUNS_DATA_HAS_CHANGED);
            }
        }
    }

    /// Add (or replace) the logical unit at LUN `lun` (0..=16383).
    pub fn add_lun(&self, lun: u64, lu: Arc<LogicalUnit>) {
        self.put(lun, Entry::Local(lu));
    }

    /// Add (or replace) LUN `lun` as one whose logical unit is elsewhere.
    pub fn add_remote_lun(&self, lun: u64, remote: Arc<dyn RemoteLun>) {
        self.put(lun, Entry::Remote(remote));
    }

    fn put(&self, lun: u64, e: Entry) {
        let lun = lun.min(luns::MAX_LUN);
        let mut map = self.map();
        // Swapping a LUN between here and elsewhere changes nothing the initiator sees.
        if !map.contains_key(&lun) {
            self.changed(&map);
        } else {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        map.insert(lun, e);
    }

    /// Remove LUN `lun`; returns its logical unit if it was local.
    pub fn remove_lun(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        let mut map = self.map();
        let e = map.remove(&lun);
        if e.is_some() {
            self.changed(&map);
        }
        match e {
            Some(Entry::Local(lu)) => Some(lu),
            _ => None,
        }
    }

    /// The local logical unit at `lun` (not a remote one).
    pub fn lun(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        match self.map().get(&lun) {
            Some(Entry::Local(lu)) => Some(lu.clone()),
            _ => None,
        }
    }

    /// The LUNs in use, ascending.
    pub fn luns(&self) -> Vec<u64> {
        self.map().keys().copied().collect()
    }

    /// Decode a SAM-5 LUN field (peripheral or flat space addressing); `u64::MAX` when it is
    /// not a valid single-level LUN.
    pub fn decode_lun(raw: [u8; 8]) -> u64 {
        luns::decode(raw).unwrap_or(u64::MAX)
    }

    /// This core's snapshot of the LUN map.
    fn snapshot(&self) -> Rc<LunMap> {
        let generation = self.generation.load(Ordering::Acquire);
        SNAPSHOTS.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(snap) = s.iter().find(|x| x.target == self.uid) {
                if snap.generation == generation {
                    return Rc::clone(&snap.luns);
                }
            }
            let luns = Rc::new(self.map().clone());
            s.retain(|x| x.target != self.uid);
            if s.len() >= 16 {
                s.remove(0);
            }
            s.push(Snapshot {
                target: self.uid,
                generation,
                luns: Rc::clone(&luns),
            });
            luns
        })
    }

    /// Execute a command addressed to the 8-byte LUN field `raw_lun`.
    pub async fn execute(&self, nexus: &Nexus, raw_lun: [u8; 8], cmd: &ScsiCommand) -> ScsiResult {
        let snap = self.snapshot();
        if cmd.cdb.first() == Some(&Opcode::REPORT_LUNS) {
            return self.report_luns(nexus, &snap, cmd);
        }
        match snap.get(&Self::decode_lun(raw_lun)) {
            Some(Entry::Local(lu)) => lu.execute(nexus, cmd).await,
            Some(Entry::Remote(r)) => r.execute(nexus, cmd).await,
            None => Self::absent(cmd),
        }
    }

    fn report_luns(&self, nexus: &Nexus, snap: &LunMap, cmd: &ScsiCommand) -> ScsiResult {
        let fail = |s: Sense| ScsiResult {
            status: s.status,
            sense: s.has_sense_data().then(|| s.encode(false).into()),
            data_in: Default::default(),
            transfer_len: 0,
        };
        let (select, alloc_len) = match Command::parse(&cmd.cdb) {
            Ok(Command::ReportLuns { select, alloc_len }) => (select, alloc_len),
            Ok(_) => return fail(Sense::INTERNAL_TARGET_FAILURE),
            Err(s) => return fail(s),
        };
        let list: Vec<u64> = snap.keys().copied().collect();
        match report_luns(&list, select, alloc_len) {
            Ok(r) => {
                for e in snap.values() {
                    if let Entry::Local(lu) = e {
                        lu.clear_luns_changed(nexus);
                    }
                }
                r
            }
            Err(s) => fail(s),
        }
    }

    /// A command to a LUN with no logical unit (SPC-4 §6.6.2, §6.39).
    fn absent(cmd: &ScsiCommand) -> ScsiResult {
        let check = |s: Sense| ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(s.encode(false).into()),
            data_in: Default::default(),
            transfer_len: 0,
        };
        match Command::parse(&cmd.cdb) {
            Ok(Command::Inquiry {
                evpd: false,
                alloc_len,
                ..
            }) => LogicalUnit::data(inquiry::standard_absent().to_vec(), usize::from(alloc_len)),
            Ok(Command::Inquiry {
                evpd: true,
                page: 0,
                alloc_len,
            }) => LogicalUnit::data(vpd::supported_absent(), usize::from(alloc_len)),
            Ok(Command::Inquiry { .. }) => check(Sense::invalid_cdb(2, Some(7))),
            Ok(Command::RequestSense { desc, alloc_len }) => LogicalUnit::data(
                Sense::LOGICAL_UNIT_NOT_SUPPORTED.encode(desc),
                usize::from(alloc_len),
            ),
            _ => check(Sense::LOGICAL_UNIT_NOT_SUPPORTED),
        }
    }

    /// Apply the logical-unit side effects of a task management function: LOGICAL UNIT
    /// RESET resets the addressed logical unit (UA BUS DEVICE RESET FUNCTION OCCURRED), the
    /// target resets reset all of them (UA POWER ON, RESET, OR BUS DEVICE RESET OCCURRED).
    /// Persistent reservations survive every reset.
    pub async fn task_mgmt(&self, nexus: &Nexus, raw_lun: [u8; 8], f: TmfFunction) -> TmfResponse {
        let snap = self.snapshot();
        let entry = snap.get(&Self::decode_lun(raw_lun));
        if let Some(Entry::Remote(r)) = entry {
            if !matches!(
                f,
                TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset
            ) {
                return r.task_mgmt(nexus, f).await;
            }
        }
        let lu = match entry {
            Some(Entry::Local(lu)) => Some(lu),
            _ => None,
        };
        match f {
            TmfFunction::AbortTask { .. }
            | TmfFunction::AbortTaskSet
            | TmfFunction::ClearTaskSet => match entry {
                Some(_) => TmfResponse::Complete,
                None => TmfResponse::NoSuchLun,
            },
            TmfFunction::ClearAca => TmfResponse::NotSupported,
            TmfFunction::LogicalUnitReset => match lu {
                Some(lu) => {
                    lu.reset(Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
                    TmfResponse::Complete
                }
                None => TmfResponse::NoSuchLun,
            },
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                // Every logical unit at once: the remote ones answer in parallel.
                let mut remote = Vec::new();
                for e in snap.values() {
                    match e {
                        Entry::Local(lu) => lu.reset(Sense::POWER_ON_RESET),
                        Entry::Remote(r) => {
                            remote.push(r.task_mgmt(nexus, TmfFunction::LogicalUnitReset))
                        }
                    }
                }
                futures_util::future::join_all(remote).await;
                TmfResponse::Complete
            }
        }
    }

    /// The session of `nexus` ended: every logical unit forgets it.
    pub fn nexus_gone(&self, nexus: &Nexus) {
        for e in self.snapshot().values() {
            match e {
                Entry::Local(lu) => lu.nexus_gone(nexus),
                Entry::Remote(r) => r.nexus_gone(nexus),
            }
        }
    }
}
