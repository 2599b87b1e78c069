//! Per-I_T-nexus state: unit attention queues, PREVENT, and the per-core admission cache.
//!
//! Unit attentions (SAM-5 "unit attention conditions") are kept per I_T
//! nexus, keyed by initiator port and target port names, so a condition established for a
//! registrant that is not connected is reported when it logs in again. A nexus seen for the
//! first time starts with POWER ON, RESET, OR BUS DEVICE RESET OCCURRED. Each condition is
//! reported once (by the next command that is not INQUIRY, REPORT LUNS or REQUEST SENSE, or
//! as REQUEST SENSE parameter data) and then cleared. A reset condition supersedes pending
//! ones; duplicates are not queued twice.
//!
//! The admission cache lets READ and WRITE skip the logical unit's lock: each core keeps,
//! per (logical unit, nexus), the admission answers computed at some epoch. The logical unit
//! bumps its epoch whenever an answer could change, so a stale entry is simply recomputed.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use tessera_proto::scsi::pr::Access;
use tessera_proto::scsi::Sense;

use crate::api::Nexus;

/// Identity of an I_T nexus: (initiator port name, target port name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct NexusKey {
    pub initiator: Arc<str>,
    pub target: Arc<str>,
}

impl NexusKey {
    pub(crate) fn of(n: &Nexus) -> Self {
        Self {
            initiator: n.initiator_port.clone(),
            target: n.target_port.clone(),
        }
    }

    /// The initiator name: the initiator port name without `,i,0x<isid>`.
    pub(crate) fn initiator_name(&self) -> &str {
        self.initiator
            .split(",i,")
            .next()
            .unwrap_or(&self.initiator)
    }
}

/// State of one I_T nexus at one logical unit.
#[derive(Debug, Default)]
pub(crate) struct NexusEntry {
    /// Pending unit attentions, oldest first.
    pub ua: VecDeque<Sense>,
    /// PREVENT ALLOW MEDIUM REMOVAL with PREVENT = 1 is in effect for this nexus.
    pub prevent: bool,
}

impl NexusEntry {
    pub(crate) fn new_with(ua: Sense) -> Self {
        let mut e = Self::default();
        e.push(ua);
        e
    }

    /// Queue a unit attention: a reset supersedes everything pending, duplicates are
    /// dropped, and the queue is bounded (the oldest conditions are reported first).
    pub(crate) fn push(&mut self, ua: Sense) {
        if ua.asc == 0x29 {
            self.ua.clear();
        }
        if self.ua.contains(&ua) {
            return;
        }
        if self.ua.len() >= 16 {
            return;
        }
        self.ua.push_back(ua);
    }
}

/// Admission answers cached for one nexus at one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Admits {
    /// Commands that never conflict with persistent reservations (but with SPC-2 ones).
    pub none: bool,
    /// Read-class commands.
    pub read: bool,
    /// Write-class commands.
    pub write: bool,
}

#[derive(Debug, Clone, Copy)]
struct CacheEntry {
    lu: u64,
    nexus: u64,
    epoch: u64,
    admits: Admits,
}

/// Entries kept per core; old ones are evicted first.
const CACHE_CAPACITY: usize = 64;

thread_local! {
    static ADMITS: RefCell<Vec<CacheEntry>> = const { RefCell::new(Vec::new()) };
}

/// True when this core cached, at `epoch`, that `nexus` may run a command of class `access`
/// on logical unit `lu` without unit attentions or reservation conflicts.
pub(crate) fn cached_admits(lu: u64, nexus: u64, epoch: u64, access: Access) -> bool {
    ADMITS.with(|c| {
        let c = c.borrow();
        c.iter()
            .rev()
            .find(|e| e.lu == lu && e.nexus == nexus)
            .is_some_and(|e| {
                e.epoch == epoch
                    && match access {
                        Access::None => e.admits.none,
                        Access::Read => e.admits.read,
                        Access::Write => e.admits.write,
                    }
            })
    })
}

/// Record admission answers computed at `epoch`.
pub(crate) fn cache_admits(lu: u64, nexus: u64, epoch: u64, admits: Admits) {
    ADMITS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(e) = c.iter_mut().find(|e| e.lu == lu && e.nexus == nexus) {
            e.epoch = epoch;
            e.admits = admits;
            return;
        }
        if c.len() >= CACHE_CAPACITY {
            c.remove(0);
        }
        c.push(CacheEntry {
            lu,
            nexus,
            epoch,
            admits,
        });
    });
}

/// Drop this core's entry for a nexus that is gone.
pub(crate) fn forget(lu: u64, nexus: u64) {
    ADMITS.with(|c| c.borrow_mut().retain(|e| !(e.lu == lu && e.nexus == nexus)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_supersedes_and_duplicates_are_dropped() {
        let mut e = NexusEntry::new_with(Sense::POWER_ON_RESET);
        e.push(Sense::MODE_PARAMETERS_CHANGED);
        e.push(Sense::MODE_PARAMETERS_CHANGED);
        assert_eq!(e.ua.len(), 2);
        e.push(Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
        assert_eq!(
            e.ua,
            VecDeque::from([Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED])
        );
    }

    #[test]
    fn cache_hits_only_at_the_same_epoch() {
        let a = Admits {
            none: true,
            read: true,
            write: false,
        };
        cache_admits(7, 1, 5, a);
        assert!(cached_admits(7, 1, 5, Access::Read));
        assert!(!cached_admits(7, 1, 5, Access::Write));
        assert!(!cached_admits(7, 1, 6, Access::Read));
        assert!(!cached_admits(8, 1, 5, Access::Read));
        forget(7, 1);
        assert!(!cached_admits(7, 1, 5, Access::Read));
    }
}
