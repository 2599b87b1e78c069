//! Reservations: SPC-2 RESERVE/RELEASE and PERSISTENT RESERVE IN/OUT (SPC-4 §5.13).
//!
//! The PR rules themselves are `tessera_proto::scsi::pr`; this module applies them to the
//! logical unit: PERSISTENT RESERVE OUT commands are serialized, the new state is saved
//! through the [`PrStore`](crate::PrStore) before it takes effect, unit attentions go to the
//! I_T nexuses the registrations name, and the admission epoch is bumped so every core
//! re-evaluates conflicts.

use std::sync::Arc;

use tessera_proto::scsi::pr::{self, PrState, RegId};
use tessera_proto::scsi::Sense;

use crate::api::{Nexus, ScsiResult};
use crate::lu::{LogicalUnit, State};
use crate::prstore::PrStore;
use crate::ua::NexusKey;

impl LogicalUnit {
    /// RESERVE(6/10): an SPC-2 reservation for this I_T nexus. Conflicts with another
    /// holder, and with any persistent reservation or registration (SPC-4 §5.13.3).
    pub(crate) fn reserve_spc2(&self, nexus: &Nexus) -> Result<ScsiResult, Sense> {
        let key = NexusKey::of(nexus);
        let mut st = self.lock_state();
        if !st.pr.is_empty() || st.spc2.as_ref().is_some_and(|h| *h != key) {
            return Err(Sense::RESERVATION_CONFLICT);
        }
        if st.spc2.is_none() {
            st.spc2 = Some(key);
            self.bump();
        }
        Ok(Self::good(0))
    }

    /// RELEASE(6/10): releases this nexus's SPC-2 reservation; a no-op otherwise.
    pub(crate) fn release_spc2(&self, nexus: &Nexus) -> Result<ScsiResult, Sense> {
        let key = NexusKey::of(nexus);
        let mut st = self.lock_state();
        if !st.pr.is_empty() {
            return Err(Sense::RESERVATION_CONFLICT);
        }
        if st.spc2.as_ref() == Some(&key) {
            st.spc2 = None;
            self.bump();
        }
        Ok(Self::good(0))
    }

    /// PERSISTENT RESERVE IN.
    pub(crate) fn persistent_reserve_in(&self, sa: u8, alloc_len: u16) -> ScsiResult {
        let st = self.lock_state();
        let data = match sa {
            0 => st.pr.read_keys(),
            1 => st.pr.read_reservation(),
            2 => st.pr.report_capabilities(),
            _ => st.pr.read_full_status(),
        };
        Self::data(data, usize::from(alloc_len))
    }

    /// PERSISTENT RESERVE OUT.
    pub(crate) async fn persistent_reserve_out(
        &self,
        nexus: &Nexus,
        sa: u8,
        scope: u8,
        kind: u8,
        param_len: u32,
        data_out: &[u8],
    ) -> Result<ScsiResult, Sense> {
        let params = pr::parse_params(sa, param_len, data_out)?;
        let port = Self::port(nexus);
        let _serial = self.pr_out.lock().await;
        let (next, uas) = {
            let st = self.lock_state();
            let mut next = st.pr.clone();
            let port_name = |rel: u16| st.ports.get(&rel).map(|(_, name)| name.to_string());
            let uas = next.apply(&port, sa, scope, kind, &params, &port_name)?;
            if next == st.pr {
                return Ok(Self::good(param_len));
            }
            (next, uas)
        };
        if let Some(store) = &self.pr_store {
            save(store, next.encode())
                .await
                .map_err(|_| Sense::INTERNAL_TARGET_FAILURE)?;
        }
        let mut st = self.lock_state();
        st.pr = next;
        let me = NexusKey::of(nexus);
        for (id, sense) in uas {
            deliver(&mut st, &me, &id, sense);
        }
        self.bump();
        Ok(Self::good(param_len))
    }

    /// The persistent reservation state (for tests and diagnostics).
    pub fn pr_state(&self) -> PrState {
        self.lock_state().pr.clone()
    }
}

/// Queue `sense` for every I_T nexus `id` names (never the nexus that caused it). A
/// registrant that is not connected gets an entry so it sees the condition on its return.
fn deliver(st: &mut State, me: &NexusKey, id: &RegId, sense: Sense) {
    let mut hit = false;
    for (k, e) in st.nexuses.iter_mut() {
        if k == me {
            continue;
        }
        let port = pr::Port {
            initiator_port: &k.initiator,
            initiator_name: k.initiator_name(),
            target_port: &k.target,
            relative_port: 0,
        };
        if id.matches(&port) {
            e.push(sense);
            hit = true;
        }
    }
    if !hit && !id.name_only {
        if let Some(target) = &id.target {
            let key = NexusKey {
                initiator: Arc::from(id.initiator.as_str()),
                target: Arc::from(target.as_str()),
            };
            if key != *me {
                st.nexuses.entry(key).or_default().push(sense);
            }
        }
    }
}

/// Save PR state, off the event loop when running inside tokio.
async fn save(store: &Arc<dyn PrStore>, bytes: Vec<u8>) -> std::io::Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        let store = Arc::clone(store);
        match tokio::task::spawn_blocking(move || store.save(&bytes)).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    } else {
        store.save(&bytes)
    }
}
