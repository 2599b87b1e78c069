//! Persistent reservations as pure state transitions (SPC-4 §5.13, §6.15, §6.16).
//!
//! [`PrState`] holds registrations, the reservation and PRgeneration. PERSISTENT RESERVE OUT
//! service actions are applied with [`PrState::apply`], which either fails with the
//! completion to report (RESERVATION CONFLICT or CHECK CONDITION) leaving the state
//! unchanged, or returns the unit attentions the change establishes for other I_T nexuses.
//! [`PrState::conflicts`] decides whether a command from an I_T nexus conflicts with the
//! reservation (SPC-4 Table 66 reduced to read/write classes). The PERSISTENT RESERVE IN data
//! and a versioned, checksummed byte encoding for persistence are here too.
//!
//! Not here: task abortion for PREEMPT AND ABORT (the transport aborts the tasks of the
//! preempted nexuses) and where the encoded state is stored.

use super::cdb::{be16, be32, be64};
use super::sense::Sense;

/// Registrations kept at most (INSUFFICIENT REGISTRATION RESOURCES beyond).
pub const MAX_REGISTRATIONS: usize = 1024;

/// The iSCSI protocol identifier in TransportIDs (SPC-4 Table 362).
const PROTO_ISCSI: u8 = 0x5;

/// PERSISTENT RESERVE OUT service actions (SPC-4 Table 172).
pub struct ProutAction;

#[allow(missing_docs)] // the names are the spec's
impl ProutAction {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// Persistent reservation types (SPC-4 Table 169).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrType {
    /// 1h Write Exclusive.
    WriteExclusive,
    /// 3h Exclusive Access.
    ExclusiveAccess,
    /// 5h Write Exclusive – Registrants Only.
    WriteExclusiveRegistrantsOnly,
    /// 6h Exclusive Access – Registrants Only.
    ExclusiveAccessRegistrantsOnly,
    /// 7h Write Exclusive – All Registrants.
    WriteExclusiveAllRegistrants,
    /// 8h Exclusive Access – All Registrants.
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// Decode a TYPE field.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// The TYPE field value.
    pub fn code(self) -> u8 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 3,
            Self::WriteExclusiveRegistrantsOnly => 5,
            Self::ExclusiveAccessRegistrantsOnly => 6,
            Self::WriteExclusiveAllRegistrants => 7,
            Self::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Every registrant is a reservation holder.
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants only or all registrants: registrants are granted access.
    pub fn registrants_access(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }

    /// Exclusive access: reads conflict too.
    pub fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// An I_T nexus as persistent reservations see it.
#[derive(Debug, Clone, Copy)]
pub struct Port<'a> {
    /// Initiator port name, `<iqn>,i,0x<isid>`.
    pub initiator_port: &'a str,
    /// Initiator name (iqn).
    pub initiator_name: &'a str,
    /// Target port name, `<iqn>,t,0x<tpgt>`.
    pub target_port: &'a str,
    /// Relative target port identifier.
    pub relative_port: u16,
}

/// Which I_T nexuses a registration (or a unit attention) applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegId {
    /// The initiator port name, or the initiator name when `name_only`.
    pub initiator: String,
    /// Registered through a TransportID without ISID: every port of that initiator.
    pub name_only: bool,
    /// The target port name; `None` after ALL_TG_PT: every target port.
    pub target: Option<String>,
}

impl RegId {
    fn for_port(p: &Port<'_>, all_tg_pt: bool) -> Self {
        Self {
            initiator: p.initiator_port.to_string(),
            name_only: false,
            target: (!all_tg_pt).then(|| p.target_port.to_string()),
        }
    }

    /// True when the I_T nexus `p` is one of the nexuses this identity names.
    pub fn matches(&self, p: &Port<'_>) -> bool {
        let initiator = if self.name_only {
            p.initiator_name
        } else {
            p.initiator_port
        };
        self.initiator.eq_ignore_ascii_case(initiator)
            && self
                .target
                .as_deref()
                .is_none_or(|t| t.eq_ignore_ascii_case(p.target_port))
    }
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The reservation key.
    pub key: u64,
    /// The registered I_T nexus(es).
    pub id: RegId,
    /// Relative target port identifier reported by READ FULL STATUS.
    pub relative_port: u16,
}

/// The persistent reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// TYPE.
    pub kind: PrType,
    /// The holder's reservation key (reported as 0 for all-registrants types).
    pub key: u64,
    /// The holder; `None` for all-registrants types, where every registrant holds it.
    pub holder: Option<RegId>,
}

/// Persistent reservation state of one logical unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrState {
    /// PRgeneration.
    pub generation: u32,
    /// Registrations in registration order (READ KEYS order).
    pub registrations: Vec<Registration>,
    /// The reservation, if any.
    pub reservation: Option<Reservation>,
    /// APTPL as last given by REGISTER / REGISTER AND MOVE (reported; tessera persists
    /// regardless, see the logical unit documentation).
    pub aptpl: bool,
}

/// Command classes for reservation conflicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Never conflicts (INQUIRY, REPORT LUNS, PERSISTENT RESERVE IN/OUT, …).
    None,
    /// Reads the medium or mode data (conflicts with Exclusive Access types).
    Read,
    /// Modifies the medium or LU state (conflicts with every type for non-holders).
    Write,
}

/// A unit attention a PERSISTENT RESERVE OUT establishes.
pub type UnitAttention = (RegId, Sense);

/// Decoded PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3–6.16.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProutParams {
    /// RESERVATION KEY.
    pub key: u64,
    /// SERVICE ACTION RESERVATION KEY.
    pub sa_key: u64,
    /// SPEC_I_PT.
    pub spec_i_pt: bool,
    /// ALL_TG_PT.
    pub all_tg_pt: bool,
    /// APTPL.
    pub aptpl: bool,
    /// TransportIDs (SPEC_I_PT, or the REGISTER AND MOVE destination).
    pub transport_ids: Vec<TransportId>,
    /// REGISTER AND MOVE: UNREG.
    pub unreg: bool,
    /// REGISTER AND MOVE: RELATIVE TARGET PORT IDENTIFIER.
    pub relative_port: u16,
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportId {
    /// `<iqn>,i,0x<isid>` (format 01b) or the bare iSCSI name (format 00b).
    pub name: String,
    /// Format 00b: the name without an ISID.
    pub name_only: bool,
}

impl TransportId {
    /// Encode as an iSCSI TransportID, padded to a multiple of four bytes (at least 24).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![
            if self.name_only { 0x00 } else { 0x40 } | PROTO_ISCSI,
            0,
            0,
            0,
        ];
        v.extend(self.name.bytes().take(2000));
        v.push(0);
        while !v.len().is_multiple_of(4) || v.len() < 24 {
            v.push(0);
        }
        let add = (v.len() - 4) as u16;
        v[2..4].copy_from_slice(&add.to_be_bytes());
        v
    }

    /// Decode one TransportID at the start of `b`, returning it and its length.
    /// `at` is its offset in the parameter list (for field pointers).
    pub fn decode(b: &[u8], at: usize) -> Result<(Self, usize), Sense> {
        if b.len() < 4 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if b[0] & 0x0F != PROTO_ISCSI {
            return Err(Sense::invalid_param(at as u16, Some(3)));
        }
        let format = b[0] >> 6;
        if format > 1 {
            return Err(Sense::invalid_param(at as u16, Some(7)));
        }
        let add = usize::from(be16(b, 2));
        if add < 20 || !add.is_multiple_of(4) {
            return Err(Sense::invalid_param((at + 2) as u16, None));
        }
        let total = 4 + add;
        if b.len() < total {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let body = &b[4..total];
        let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
        let Ok(name) = std::str::from_utf8(&body[..end]) else {
            return Err(Sense::invalid_param((at + 4) as u16, None));
        };
        let name = name.trim().to_ascii_lowercase();
        let has_isid = name.contains(",i,0x");
        if name.is_empty() || (format == 1) != has_isid {
            return Err(Sense::invalid_param((at + 4) as u16, None));
        }
        Ok((
            Self {
                name,
                name_only: format == 0,
            },
            total,
        ))
    }

    fn reg_id(&self, target: Option<String>) -> RegId {
        RegId {
            initiator: self.name.clone(),
            name_only: self.name_only,
            target,
        }
    }
}

/// Decode a PERSISTENT RESERVE OUT parameter list. `data` is the Data-Out.
pub fn parse_params(sa: u8, param_len: u32, data: &[u8]) -> Result<ProutParams, Sense> {
    let len = usize::try_from(param_len).unwrap_or(usize::MAX);
    if len < 24 || data.len() < len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let d = &data[..len];
    let mut p = ProutParams {
        key: be64(d, 0),
        sa_key: be64(d, 8),
        ..Default::default()
    };
    if sa == ProutAction::REGISTER_AND_MOVE {
        p.unreg = d[17] & 0x02 != 0;
        p.aptpl = d[17] & 0x01 != 0;
        p.relative_port = be16(d, 18);
        let tid_len = usize::try_from(be32(d, 20)).unwrap_or(usize::MAX);
        if tid_len < 24 || 24 + tid_len > len {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let (tid, _) = TransportId::decode(&d[24..24 + tid_len], 24)?;
        p.transport_ids.push(tid);
        return Ok(p);
    }
    p.spec_i_pt = d[20] & 0x08 != 0;
    p.all_tg_pt = d[20] & 0x04 != 0;
    p.aptpl = d[20] & 0x01 != 0;
    if !p.spec_i_pt {
        if len != 24 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        return Ok(p);
    }
    if len < 28 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let tids_len = usize::try_from(be32(d, 24)).unwrap_or(usize::MAX);
    if 28 + tids_len != len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let mut at = 28;
    while at < len {
        let (tid, n) = TransportId::decode(&d[at..], at)?;
        p.transport_ids.push(tid);
        at += n;
    }
    Ok(p)
}

impl PrState {
    /// The registration of the I_T nexus `p`, if any.
    pub fn registration(&self, p: &Port<'_>) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.id.matches(p))
    }

    /// Make a reservation of type `kind` through `p` with reservation key `key`: held by
    /// `p`'s registration, or, for all-registrants types, by every registrant (key 0, no
    /// holder).
    fn reserve_for(&mut self, p: &Port<'_>, kind: PrType, key: u64) {
        let all = kind.all_registrants();
        let holder = (!all)
            .then(|| self.registration(p).map(|r| r.id.clone()))
            .flatten();
        let key = if all { 0 } else { key };
        self.reservation = Some(Reservation { kind, key, holder });
    }

    /// True when `p` holds the reservation (for all-registrants types: is registered).
    pub fn is_holder(&self, p: &Port<'_>) -> bool {
        match &self.reservation {
            None => false,
            Some(r) => match &r.holder {
                None => self.registration(p).is_some(),
                Some(h) => h.matches(p),
            },
        }
    }

    /// Whether a command of class `access` from `p` conflicts with the reservation.
    pub fn conflicts(&self, p: &Port<'_>, access: Access) -> bool {
        let Some(res) = &self.reservation else {
            return false;
        };
        if access == Access::None || self.is_holder(p) {
            return false;
        }
        if res.kind.registrants_access() && self.registration(p).is_some() {
            return false;
        }
        match access {
            Access::Read => res.kind.exclusive_access(),
            _ => true,
        }
    }

    /// True when nothing is registered or reserved.
    pub fn is_empty(&self) -> bool {
        self.registrations.is_empty() && self.reservation.is_none()
    }

    /// Registrations other than `except`'s (for unit attentions to "other registrants").
    fn others(&self, except: &Port<'_>) -> Vec<RegId> {
        self.registrations
            .iter()
            .filter(|r| !r.id.matches(except))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Queue the unit attention `sense` for every registrant other than `p`.
    fn notify_others(&self, p: &Port<'_>, sense: Sense, ua: &mut Vec<UnitAttention>) {
        ua.extend(self.others(p).into_iter().map(|id| (id, sense)));
    }

    /// Remove `p`'s registration(s) and apply the reservation consequences (SPC-4
    /// §5.13.11.2.1): a non-AR holder's reservation is released (UA RESERVATIONS RELEASED to
    /// other registrants for registrants-only types); an AR reservation ends with its last
    /// registrant.
    fn unregister(&mut self, p: &Port<'_>, ua: &mut Vec<UnitAttention>) {
        let was_holder = self.is_holder(p);
        self.registrations.retain(|r| !r.id.matches(p));
        let Some(res) = &self.reservation else { return };
        if res.kind.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if was_holder {
            if res.kind.registrants_access() {
                self.notify_others(p, Sense::RESERVATIONS_RELEASED, ua);
            }
            self.reservation = None;
        }
    }

    /// Apply a PERSISTENT RESERVE OUT service action from `p`. `port_name` resolves a
    /// relative target port identifier to a target port name (REGISTER AND MOVE).
    pub fn apply(
        &mut self,
        p: &Port<'_>,
        sa: u8,
        scope: u8,
        kind: u8,
        params: &ProutParams,
        port_name: &dyn Fn(u16) -> Option<String>,
    ) -> Result<Vec<UnitAttention>, Sense> {
        let mut ua = Vec::new();
        if Self::needs_registration(sa) {
            self.check_key(p, params.key)?;
        }
        match sa {
            ProutAction::REGISTER | ProutAction::REGISTER_AND_IGNORE_EXISTING_KEY => {
                self.register(p, sa == ProutAction::REGISTER, params, &mut ua)?;
                self.generation = self.generation.wrapping_add(1);
            }
            ProutAction::RESERVE => self.reserve(p, scope, kind, params.key)?,
            ProutAction::RELEASE => self.release(p, scope, kind, &mut ua)?,
            ProutAction::CLEAR => {
                self.notify_others(p, Sense::RESERVATIONS_PREEMPTED, &mut ua);
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            ProutAction::PREEMPT | ProutAction::PREEMPT_AND_ABORT => {
                self.preempt(p, scope, kind, params, &mut ua)?;
                self.generation = self.generation.wrapping_add(1);
            }
            ProutAction::REGISTER_AND_MOVE => {
                self.register_and_move(p, scope, kind, params, port_name)?;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        }
        Ok(ua)
    }

    /// Whether service action `sa` is one only a registered nexus may take, naming its own
    /// reservation key (every action but the two REGISTERs).
    fn needs_registration(sa: u8) -> bool {
        matches!(
            sa,
            ProutAction::RESERVE
                | ProutAction::RELEASE
                | ProutAction::CLEAR
                | ProutAction::PREEMPT
                | ProutAction::PREEMPT_AND_ABORT
                | ProutAction::REGISTER_AND_MOVE
        )
    }

    fn check_key(&self, p: &Port<'_>, key: u64) -> Result<(), Sense> {
        match self.registration(p) {
            Some(r) if r.key == key => Ok(()),
            _ => Err(Sense::RESERVATION_CONFLICT),
        }
    }

    fn check_scope_type(scope: u8, kind: u8) -> Result<PrType, Sense> {
        if scope != 0 {
            return Err(Sense::invalid_cdb(2, Some(7)));
        }
        PrType::from_code(kind).ok_or(Sense::invalid_cdb(2, Some(3)))
    }

    fn add(&mut self, key: u64, id: RegId, relative_port: u16) -> Result<(), Sense> {
        if self.registrations.len() >= MAX_REGISTRATIONS {
            return Err(Sense::INSUFFICIENT_REGISTRATION_RESOURCES);
        }
        self.registrations.push(Registration {
            key,
            id,
            relative_port,
        });
        Ok(())
    }

    fn register(
        &mut self,
        p: &Port<'_>,
        check: bool,
        params: &ProutParams,
        ua: &mut Vec<UnitAttention>,
    ) -> Result<(), Sense> {
        match self.registration(p).map(|r| r.key) {
            None => {
                if check && params.key != 0 {
                    return Err(Sense::RESERVATION_CONFLICT);
                }
                if params.sa_key == 0 {
                    return Ok(()); // unregistering an unregistered nexus: nothing to do
                }
                if params.spec_i_pt && !check {
                    return Err(Sense::invalid_param(20, Some(3)));
                }
                let mut next = self.clone();
                let rel = if params.all_tg_pt { 0 } else { p.relative_port };
                next.add(params.sa_key, RegId::for_port(p, params.all_tg_pt), rel)?;
                let target = (!params.all_tg_pt).then(|| p.target_port.to_string());
                for t in &params.transport_ids {
                    let id = t.reg_id(target.clone());
                    if next.registrations.iter().any(|r| r.id == id) {
                        return Err(Sense::invalid_param(28, None));
                    }
                    next.add(params.sa_key, id, rel)?;
                }
                next.aptpl = params.aptpl;
                *self = next;
                Ok(())
            }
            Some(key) => {
                if check && params.key != key {
                    return Err(Sense::RESERVATION_CONFLICT);
                }
                if params.spec_i_pt {
                    return Err(Sense::invalid_param(20, Some(3)));
                }
                if params.sa_key == 0 {
                    self.unregister(p, ua);
                } else {
                    for r in self.registrations.iter_mut().filter(|r| r.id.matches(p)) {
                        r.key = params.sa_key;
                    }
                    if let Some(res) = &mut self.reservation {
                        if res.holder.as_ref().is_some_and(|h| h.matches(p)) {
                            res.key = params.sa_key;
                        }
                    }
                }
                self.aptpl = params.aptpl;
                Ok(())
            }
        }
    }

    fn reserve(&mut self, p: &Port<'_>, scope: u8, kind: u8, key: u64) -> Result<(), Sense> {
        let kind = Self::check_scope_type(scope, kind)?;
        match &self.reservation {
            None => {
                self.reserve_for(p, kind, key);
                Ok(())
            }
            Some(r) if r.kind == kind && self.is_holder(p) => Ok(()),
            Some(_) => Err(Sense::RESERVATION_CONFLICT),
        }
    }

    fn release(
        &mut self,
        p: &Port<'_>,
        scope: u8,
        kind: u8,
        ua: &mut Vec<UnitAttention>,
    ) -> Result<(), Sense> {
        let Some(res) = &self.reservation else {
            return Ok(());
        };
        if !self.is_holder(p) {
            return Ok(());
        }
        if scope != 0 || PrType::from_code(kind) != Some(res.kind) {
            return Err(Sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION);
        }
        if res.kind.registrants_access() {
            self.notify_others(p, Sense::RESERVATIONS_RELEASED, ua);
        }
        self.reservation = None;
        Ok(())
    }

    fn preempt(
        &mut self,
        p: &Port<'_>,
        scope: u8,
        kind: u8,
        params: &ProutParams,
        ua: &mut Vec<UnitAttention>,
    ) -> Result<(), Sense> {
        let kind = Self::check_scope_type(scope, kind)?;
        let sa_key = params.sa_key;
        let remove_with_key = |s: &mut Self, ua: &mut Vec<UnitAttention>, key: Option<u64>| {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut s.registrations)
                .into_iter()
                .partition(|r| !r.id.matches(p) && key.is_none_or(|k| r.key == k));
            s.registrations = kept;
            ua.extend(
                gone.into_iter()
                    .map(|r| (r.id, Sense::REGISTRATIONS_PREEMPTED)),
            );
        };
        match self.reservation.clone() {
            Some(res) if res.kind.all_registrants() && sa_key == 0 => {
                // Preempt an all-registrants reservation: everybody else goes.
                remove_with_key(self, ua, None);
                self.reserve_for(p, kind, params.key);
            }
            Some(res) if !res.kind.all_registrants() && res.key == sa_key => {
                // Preempt the holder: release, remove the registrations with that key, and
                // reserve for the preempting nexus with the new type.
                remove_with_key(self, ua, Some(sa_key));
                if res.kind != kind {
                    // The type changed: registrants that stay see the old reservation
                    // released (SPC-4 §5.13.11.4.3).
                    for id in self.others(p) {
                        if !ua.iter().any(|(u, _)| *u == id) {
                            ua.push((id, Sense::RESERVATIONS_RELEASED));
                        }
                    }
                }
                let holder = self.registration(p).map(|r| r.id.clone());
                self.reservation = Some(Reservation {
                    kind,
                    key: params.key,
                    holder,
                });
            }
            _ => {
                // No reservation, or SARK names a non-holder: only remove registrations.
                if sa_key == 0 {
                    return Err(Sense::invalid_param(8, None));
                }
                if !self
                    .registrations
                    .iter()
                    .any(|r| r.key == sa_key && !r.id.matches(p))
                {
                    return Err(Sense::RESERVATION_CONFLICT);
                }
                remove_with_key(self, ua, Some(sa_key));
                if let Some(res) = &self.reservation {
                    if res.kind.all_registrants() && self.registrations.is_empty() {
                        self.reservation = None;
                    }
                }
            }
        }
        Ok(())
    }

    fn register_and_move(
        &mut self,
        p: &Port<'_>,
        scope: u8,
        kind: u8,
        params: &ProutParams,
        port_name: &dyn Fn(u16) -> Option<String>,
    ) -> Result<(), Sense> {
        let kind = Self::check_scope_type(scope, kind)?;
        let Some(res) = self.reservation.clone() else {
            return Err(Sense::RESERVATION_CONFLICT);
        };
        if res.kind.all_registrants() || !self.is_holder(p) {
            return Err(Sense::RESERVATION_CONFLICT);
        }
        if params.sa_key == 0 {
            return Err(Sense::invalid_param(8, None));
        }
        let Some(tid) = params.transport_ids.first() else {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        };
        if tid.name_only {
            return Err(Sense::invalid_param(24, Some(7)));
        }
        let Some(target) = port_name(params.relative_port) else {
            return Err(Sense::invalid_param(18, None));
        };
        let dest = tid.reg_id(Some(target.clone()));
        let dest_port = Port {
            initiator_port: &dest.initiator,
            initiator_name: dest.initiator.split(",i,").next().unwrap_or(""),
            target_port: &target,
            relative_port: params.relative_port,
        };
        if RegId::for_port(p, false).matches(&dest_port) {
            return Err(Sense::invalid_param(24, None));
        }
        let mut next = self.clone();
        let dest_key = match next.registration(&dest_port) {
            Some(r) => r.key,
            None => {
                next.add(params.sa_key, dest.clone(), params.relative_port)?;
                params.sa_key
            }
        };
        let dest_id = next
            .registration(&dest_port)
            .map(|r| r.id.clone())
            .unwrap_or(dest);
        next.reservation = Some(Reservation {
            kind,
            key: dest_key,
            holder: Some(dest_id),
        });
        if params.unreg {
            next.registrations.retain(|r| !r.id.matches(p));
        }
        next.aptpl = params.aptpl;
        *self = next;
        Ok(())
    }

    /// READ KEYS data (SPC-4 §6.15.2), untruncated.
    pub fn read_keys(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.registrations.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&((8 * self.registrations.len()) as u32).to_be_bytes());
        for r in &self.registrations {
            out.extend_from_slice(&r.key.to_be_bytes());
        }
        out
    }

    /// READ RESERVATION data (SPC-4 §6.15.3), untruncated.
    pub fn read_reservation(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&self.generation.to_be_bytes());
        match &self.reservation {
            None => out.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                out.extend_from_slice(&16u32.to_be_bytes());
                out.extend_from_slice(&r.key.to_be_bytes());
                out.extend_from_slice(&[0; 4]); // obsolete
                out.push(0);
                out.push(r.kind.code()); // SCOPE = LU_SCOPE (0)
                out.extend_from_slice(&[0; 2]);
            }
        }
        out
    }

    /// REPORT CAPABILITIES data (SPC-4 §6.15.4).
    pub fn report_capabilities(&self) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b[1] = 8;
        b[2] = 0x10 | 0x08 | 0x04 | 0x01; // CRH, SIP_C, ATP_C, PTPL_C
        b[3] = 0x80 | u8::from(self.aptpl); // TMV, ALLOW COMMANDS = 000b, PTPL_A
        b[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
        b[5] = 0x01; // EX_AC_AR
        b
    }

    /// READ FULL STATUS data (SPC-4 §6.15.5), untruncated.
    pub fn read_full_status(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for r in &self.registrations {
            let holder = match &self.reservation {
                Some(res) => res.holder.as_ref().is_none_or(|h| *h == r.id),
                None => false,
            };
            body.extend_from_slice(&r.key.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            body.push(if r.id.target.is_none() { 0x02 } else { 0 } | u8::from(holder));
            body.push(match (&self.reservation, holder) {
                (Some(res), true) => res.kind.code(),
                _ => 0,
            });
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&r.relative_port.to_be_bytes());
            let tid = TransportId {
                name: r.id.initiator.clone(),
                name_only: r.id.name_only,
            }
            .encode();
            body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
            body.extend_from_slice(&tid);
        }
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Why persisted PR state could not be decoded.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrDecodeError {
    /// The checksum does not match the contents.
    #[error("persistent reservation state checksum mismatch")]
    ChecksumMismatch,
    /// A field holds an impossible value.
    #[error("invalid persistent reservation state: {0}")]
    FieldInvalid(&'static str),
    /// Not tessera PR state, or a version this build does not know.
    #[error("not tessera persistent reservation state (bad magic or version)")]
    MagicUnknown,
    /// The data ends early.
    #[error("persistent reservation state truncated")]
    Truncated,
}

const MAGIC: &[u8; 4] = b"TSPR";
const VERSION: u8 = 1;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PrDecodeError> {
        if self.b.len() < n {
            return Err(PrDecodeError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, PrDecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PrDecodeError> {
        Ok(be16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Result<u32, PrDecodeError> {
        Ok(be32(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, PrDecodeError> {
        Ok(be64(self.take(8)?, 0))
    }
    fn string(&mut self) -> Result<String, PrDecodeError> {
        let n = usize::from(self.u16()?);
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| PrDecodeError::FieldInvalid("name is not UTF-8"))
    }
    fn reg_id(&mut self) -> Result<RegId, PrDecodeError> {
        let flags = self.u8()?;
        let initiator = self.string()?;
        let target = if flags & 0x02 != 0 {
            Some(self.string()?)
        } else {
            None
        };
        Ok(RegId {
            initiator,
            name_only: flags & 0x01 != 0,
            target,
        })
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_reg_id(out: &mut Vec<u8>, id: &RegId) {
    out.push(u8::from(id.name_only) | if id.target.is_some() { 0x02 } else { 0 });
    put_string(out, &id.initiator);
    if let Some(t) = &id.target {
        put_string(out, t);
    }
}

impl PrState {
    /// Encode for persistence: magic, version, fields (big-endian), CRC32C of all before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 96 * self.registrations.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.push(u8::from(self.aptpl));
        out.extend_from_slice(&(self.registrations.len() as u32).to_be_bytes());
        for r in &self.registrations {
            out.extend_from_slice(&r.key.to_be_bytes());
            out.extend_from_slice(&r.relative_port.to_be_bytes());
            put_reg_id(&mut out, &r.id);
        }
        match &self.reservation {
            None => out.push(0),
            Some(res) => {
                out.push(1);
                out.push(res.kind.code());
                out.extend_from_slice(&res.key.to_be_bytes());
                match &res.holder {
                    None => out.push(0),
                    Some(h) => {
                        out.push(1);
                        put_reg_id(&mut out, h);
                    }
                }
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decode what [`PrState::encode`] produced.
    pub fn decode(b: &[u8]) -> Result<Self, PrDecodeError> {
        if b.len() < 4 + 1 + 4 {
            return Err(PrDecodeError::Truncated);
        }
        if &b[..4] != MAGIC || b[4] != VERSION {
            return Err(PrDecodeError::MagicUnknown);
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != be32(crc, 0) {
            return Err(PrDecodeError::ChecksumMismatch);
        }
        let mut r = Reader { b: &body[5..] };
        let generation = r.u32()?;
        let aptpl = r.u8()? != 0;
        let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        if n > MAX_REGISTRATIONS {
            return Err(PrDecodeError::FieldInvalid("too many registrations"));
        }
        let mut registrations = Vec::with_capacity(n);
        for _ in 0..n {
            let key = r.u64()?;
            let relative_port = r.u16()?;
            let id = r.reg_id()?;
            registrations.push(Registration {
                key,
                id,
                relative_port,
            });
        }
        let reservation = match r.u8()? {
            0 => None,
            1 => {
                let kind = PrType::from_code(r.u8()?)
                    .ok_or(PrDecodeError::FieldInvalid("reservation type"))?;
                let key = r.u64()?;
                let holder = match r.u8()? {
                    0 => None,
                    1 => Some(r.reg_id()?),
                    _ => return Err(PrDecodeError::FieldInvalid("holder flag")),
                };
                Some(Reservation { kind, key, holder })
            }
            _ => return Err(PrDecodeError::FieldInvalid("reservation flag")),
        };
        if !r.b.is_empty() {
            return Err(PrDecodeError::FieldInvalid("trailing bytes"));
        }
        Ok(Self {
            generation,
            registrations,
            reservation,
            aptpl,
        })
    }
}

#[cfg(test)]
mod tests;
