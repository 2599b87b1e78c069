//! Primary commands (SPC-4 §6) and medium handling: INQUIRY, REQUEST SENSE, MODE SENSE,
//! MODE SELECT, REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT GROUPS, START STOP
//! UNIT, PREVENT ALLOW MEDIUM REMOVAL.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use tessera_proto::scsi::alua::{self, AccessState, PortGroup};
use tessera_proto::scsi::cdb::{ModeSelect, ModeSense, StartStop};
use tessera_proto::scsi::inquiry::{self, Identity};
use tessera_proto::scsi::mode::{self, ModeContext};
use tessera_proto::scsi::vpd::{self, BlockLimits, Provisioning, VpdParams};
use tessera_proto::scsi::{opcodes, Sense};

use crate::api::{status, Nexus, ScsiResult};
use crate::lu::LogicalUnit;
use crate::ua::NexusKey;

impl LogicalUnit {
    pub(crate) fn block_limits(&self) -> BlockLimits {
        BlockLimits {
            max_compare_and_write: self.lim.max_compare_and_write,
            optimal_granularity: self.lim.granularity,
            max_transfer: self.lim.max_transfer,
            optimal_transfer: 0,
            max_unmap_lbas: self.lim.max_unmap_lbas,
            max_unmap_descriptors: self.lim.max_unmap_descriptors,
            unmap_granularity: self.lim.unmap_granularity,
            max_write_same: self.lim.max_write_same,
        }
    }

    /// INQUIRY: standard data or a VPD page.
    pub(crate) fn inquiry(
        &self,
        nexus: &Nexus,
        evpd: bool,
        page: u8,
        alloc_len: u16,
    ) -> Result<ScsiResult, Sense> {
        let data = if evpd {
            let naa = vpd::naa6(self.cfg.naa_id, &self.cfg.serial);
            let p = VpdParams {
                serial: &self.cfg.serial,
                vendor: &self.cfg.vendor,
                naa,
                target_port: &nexus.target_port,
                relative_port: nexus.relative_port,
                port_group: nexus.port_group,
                limits: self.block_limits(),
                provisioning: Provisioning {
                    thin: self.info.thin,
                    zeroes: true,
                },
            };
            vpd::encode(page, &p).ok_or(Sense::invalid_cdb(2, Some(7)))?
        } else {
            let id = Identity {
                vendor: &self.cfg.vendor,
                product: &self.cfg.product,
                revision: &self.cfg.revision,
                removable: self.cfg.removable,
            };
            inquiry::standard(&id).to_vec()
        };
        Ok(Self::data(data, usize::from(alloc_len)))
    }

    /// REQUEST SENSE: reports (and clears) a pending unit attention, else the medium state,
    /// else NO SENSE, as parameter data with GOOD status.
    pub(crate) fn request_sense(&self, nexus: &Nexus, desc: bool, alloc_len: u8) -> ScsiResult {
        let pending = {
            let mut st = self.lock_state();
            let key = self.touch(&mut st, nexus);
            st.nexuses.get_mut(&key).and_then(|e| e.ua.pop_front())
        };
        let sense = match pending {
            Some(ua) => ua,
            None if !self.medium.load(Ordering::Relaxed) => Sense::MEDIUM_NOT_PRESENT,
            None => Sense::NO_SENSE,
        };
        Self::data(sense.encode(desc), usize::from(alloc_len))
    }

    fn mode_context(&self) -> ModeContext {
        ModeContext {
            write_protected: self.cfg.read_only || self.swp.load(Ordering::Relaxed),
            blocks: self.blocks.load(Ordering::Relaxed),
            block_size: self.block_size(),
        }
    }

    /// MODE SENSE(6/10).
    pub(crate) fn mode_sense(&self, req: &ModeSense) -> Result<ScsiResult, Sense> {
        let params = self.lock_state().mode;
        let data = mode::sense(req, &params, &self.mode_context())?;
        Ok(Self::data(data, usize::from(req.alloc_len)))
    }

    /// MODE SELECT(6/10): applies changeable parameters; a change is announced to every
    /// other I_T nexus (MODE PARAMETERS CHANGED).
    pub(crate) fn mode_select(
        &self,
        nexus: &Nexus,
        req: &ModeSelect,
        data_out: &[u8],
    ) -> Result<ScsiResult, Sense> {
        let ctx = self.mode_context();
        let mut st = self.lock_state();
        let new = mode::select(req, data_out, &st.mode, &ctx)?;
        if new != st.mode {
            st.mode = new;
            self.set_mode_atomics(&new);
            let me = NexusKey::of(nexus);
            self.broadcast(&mut st, Sense::MODE_PARAMETERS_CHANGED, Some(&me));
        }
        Ok(Self::good(u32::from(req.param_len)))
    }

    /// REPORT SUPPORTED OPERATION CODES.
    pub(crate) fn report_supported_opcodes(
        &self,
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc_len: u32,
    ) -> Result<ScsiResult, Sense> {
        let data = if options == 0 {
            opcodes::report_all(rctd)
        } else {
            opcodes::report_one(options, opcode, sa, rctd)?
        };
        Ok(Self::data(data, alloc_len as usize))
    }

    /// REPORT TARGET PORT GROUPS: every target port seen, grouped. Without ALUA settings every
    /// group is active/optimized; with them (a cluster), every configured group is listed, the
    /// owner's active/optimized and the others active/non-optimized.
    pub(crate) fn report_target_port_groups(
        &self,
        nexus: &Nexus,
        extended: bool,
        alloc_len: u32,
    ) -> ScsiResult {
        let mut groups: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        let alua = {
            let st = self.lock_state();
            for (rel, (group, _)) in &st.ports {
                groups.entry(*group).or_default().push(*rel);
            }
            st.alua.clone()
        };
        let mine = groups.entry(nexus.port_group).or_default();
        if !mine.contains(&nexus.relative_port) {
            mine.push(nexus.relative_port);
        }
        if let Some(a) = &alua {
            // A cluster gateway's group holds one port, numbered like the group.
            for g in &a.groups {
                let ports = groups.entry(*g).or_default();
                if ports.is_empty() {
                    ports.push(*g);
                }
            }
        }
        let state = |id: u16| match alua.as_ref().and_then(|a| a.optimized) {
            Some(opt) if opt != id => AccessState::ActiveNonOptimized,
            _ => AccessState::ActiveOptimized,
        };
        let groups: Vec<PortGroup> = groups
            .into_iter()
            .map(|(id, ports)| PortGroup {
                id,
                state: state(id),
                preferred: false,
                ports,
            })
            .collect();
        Self::data(alua::report(&groups, extended), alloc_len as usize)
    }

    /// START STOP UNIT: power conditions are accepted; LOEJ loads or ejects a removable
    /// medium unless removal is prevented; stopping synchronizes the cache unless NO_FLUSH.
    pub(crate) async fn start_stop_unit(
        &self,
        _nexus: &Nexus,
        ss: StartStop,
    ) -> Result<ScsiResult, Sense> {
        if ss.power_condition != 0 {
            return Ok(Self::good(0));
        }
        if ss.loej {
            if !self.cfg.removable {
                return Err(Sense::invalid_cdb(4, Some(1)));
            }
            let prevented = self.lock_state().nexuses.values().any(|e| e.prevent);
            if prevented {
                return Err(Sense::MEDIUM_REMOVAL_PREVENTED);
            }
            if !ss.start && !ss.no_flush && self.medium.load(Ordering::Relaxed) {
                self.dev.flush().await.map_err(|e| Sense::from(&e))?;
            }
            self.medium.store(ss.start, Ordering::Relaxed);
            return Ok(Self::good(0));
        }
        if !ss.start && !ss.no_flush && self.medium.load(Ordering::Relaxed) {
            self.dev.flush().await.map_err(|e| Sense::from(&e))?;
        }
        Ok(Self::good(0))
    }

    /// PREVENT ALLOW MEDIUM REMOVAL, per I_T nexus.
    pub(crate) fn prevent_allow(&self, nexus: &Nexus, prevent: bool) -> ScsiResult {
        let mut st = self.lock_state();
        let key = self.touch(&mut st, nexus);
        if let Some(e) = st.nexuses.get_mut(&key) {
            e.prevent = prevent;
        }
        ScsiResult {
            status: status::GOOD,
            sense: None,
            data_in: Default::default(),
            transfer_len: 0,
        }
    }
}
