//! Command completion conditions and sense data (SPC-4 §4.5, SAM-5 §5.3).
//!
//! A [`Sense`] is everything a failed command needs to complete: the SCSI status byte and,
//! for CHECK CONDITION, the sense key, additional sense code (ASC/ASCQ), an optional
//! INFORMATION field and an optional sense-key-specific field (a CDB or parameter-list field
//! pointer). BUSY and RESERVATION CONFLICT are completions without sense data and are
//! represented the same way, so a backend error maps to *one* value through
//! `From<&BlockError> for Sense` ([`Sense::from`]).
//!
//! The conditions tessera reports are a table (the `senses!` macro), one row per condition, in the
//! shape quinn uses for its transport errors. [`Sense::encode`] produces fixed-format sense
//! data (response code 70h, SPC-4 §4.5.3) or descriptor-format sense data (72h, §4.5.2) when
//! the control mode page's D_SENSE bit is set.
//!
//! This module does not decide *when* a condition applies; the logical unit does.

use crate::block::BlockError;

/// Sense keys (SPC-4 Table 27).
pub struct SenseKey;

impl SenseKey {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// RECOVERED ERROR.
    pub const RECOVERED_ERROR: u8 = 0x1;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xB;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xE;

    /// The sense key of sense data: descriptor format (response code 72h/73h) or else fixed
    /// format; NO SENSE when the data is too short to hold one.
    pub fn of(sense_data: &[u8]) -> u8 {
        let at = match sense_data.first().map(|b| b & 0x7F) {
            Some(0x72 | 0x73) => 1,
            _ => 2,
        };
        sense_data.get(at).map_or(Self::NO_SENSE, |b| b & 0x0F)
    }
}

/// SCSI status codes used by [`Sense`] and the iSCSI connection (SAM-5 Table 33).
pub struct Status;

impl Status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
}

/// How a command completes when it does not complete with GOOD status.
///
/// `status` is CHECK CONDITION for every row of the table except [`Sense::BUSY`] and
/// [`Sense::RESERVATION_CONFLICT`], which carry no sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    /// SCSI status byte.
    pub status: u8,
    /// Sense key (SPC-4 §4.5.6).
    pub key: u8,
    /// ADDITIONAL SENSE CODE.
    pub asc: u8,
    /// ADDITIONAL SENSE CODE QUALIFIER.
    pub ascq: u8,
    /// INFORMATION field (e.g. the miscompare offset), reported with VALID set.
    pub info: Option<u64>,
    /// SENSE KEY SPECIFIC field bytes 15..18 of fixed sense, SKSV already set.
    pub sks: Option<[u8; 3]>,
}

/// Declares the sense table: one constant per condition plus the description lookup used
/// by `Display`.
macro_rules! senses {
    ($( $(#[$doc:meta])* $name:ident = ($key:ident, $asc:literal, $ascq:literal, $text:literal); )*) => {
        impl Sense {
            $(
                $(#[$doc])*
                pub const $name: Sense = Sense::check(SenseKey::$key, $asc, $ascq);
            )*
        }

        /// The SPC-4 description of an ASC/ASCQ pair tessera reports, if it is in the table.
        pub fn describe(asc: u8, ascq: u8) -> Option<&'static str> {
            match (asc, ascq) {
                $( ($asc, $ascq) => Some($text), )*
                _ => None,
            }
        }

        #[cfg(test)]
        const TABLE: &[(Sense, &str)] = &[ $( (Sense::$name, $text), )* ];
    };
}

senses! {
    /// NO SENSE: nothing to report (REQUEST SENSE with no pending condition).
    NO_SENSE = (NO_SENSE, 0x00, 0x00, "no additional sense information");
    /// The medium was removed (removable logical unit ejected).
    MEDIUM_NOT_PRESENT = (NOT_READY, 0x3A, 0x00, "medium not present");
    /// Ownership of the volume is moving between gateways (ALUA state transition).
    ASYMMETRIC_ACCESS_STATE_TRANSITION = (NOT_READY, 0x04, 0x0A,
        "logical unit not accessible, asymmetric access state transition");
    /// Writes are suspended: the logical unit cannot make a write durable until nodes return
    /// (Linux fails the command at once rather than retrying it until its timeout).
    MANUAL_INTERVENTION_REQUIRED = (NOT_READY, 0x04, 0x03,
        "logical unit not ready, manual intervention required");
    /// A write could not be made durable.
    WRITE_ERROR = (MEDIUM_ERROR, 0x0C, 0x00, "write error");
    /// Data could not be read back.
    UNRECOVERED_READ_ERROR = (MEDIUM_ERROR, 0x11, 0x00, "unrecovered read error");
    /// An internal failure of the target.
    INTERNAL_TARGET_FAILURE = (HARDWARE_ERROR, 0x44, 0x00, "internal target failure");
    /// The Data-Out length does not match what the CDB asked for.
    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = (ILLEGAL_REQUEST, 0x0E, 0x03,
        "invalid field in command information unit");
    /// A parameter list is too short or its length fields disagree.
    PARAMETER_LIST_LENGTH_ERROR = (ILLEGAL_REQUEST, 0x1A, 0x00, "parameter list length error");
    /// Unknown or unsupported operation code (or service action).
    INVALID_COMMAND_OPERATION_CODE = (ILLEGAL_REQUEST, 0x20, 0x00,
        "invalid command operation code");
    /// The LBA range lies (partly) beyond the last LBA.
    LBA_OUT_OF_RANGE = (ILLEGAL_REQUEST, 0x21, 0x00, "logical block address out of range");
    /// A CDB field holds a value the device server does not support.
    INVALID_FIELD_IN_CDB = (ILLEGAL_REQUEST, 0x24, 0x00, "invalid field in cdb");
    /// The addressed logical unit does not exist.
    LOGICAL_UNIT_NOT_SUPPORTED = (ILLEGAL_REQUEST, 0x25, 0x00, "logical unit not supported");
    /// A parameter list field holds an unsupported value.
    INVALID_FIELD_IN_PARAMETER_LIST = (ILLEGAL_REQUEST, 0x26, 0x00,
        "invalid field in parameter list");
    /// PERSISTENT RESERVE OUT RELEASE with a scope or type that does not match.
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (ILLEGAL_REQUEST, 0x26, 0x04,
        "invalid release of persistent reservation");
    /// MODE SENSE of saved values, or MODE SELECT with SP set: nothing is saved.
    SAVING_PARAMETERS_NOT_SUPPORTED = (ILLEGAL_REQUEST, 0x39, 0x00,
        "saving parameters not supported");
    /// START STOP UNIT tried to move the medium while PREVENT is in effect.
    MEDIUM_REMOVAL_PREVENTED = (ILLEGAL_REQUEST, 0x53, 0x02, "medium removal prevented");
    /// The registration table is full.
    INSUFFICIENT_REGISTRATION_RESOURCES = (ILLEGAL_REQUEST, 0x55, 0x04,
        "insufficient registration resources");
    /// The logical unit was created (the gateway started) or the nexus is new.
    POWER_ON_RESET = (UNIT_ATTENTION, 0x29, 0x00,
        "power on, reset, or bus device reset occurred");
    /// A target reset (iSCSI TARGET WARM/COLD RESET) took place.
    SCSI_BUS_RESET = (UNIT_ATTENTION, 0x29, 0x02, "scsi bus reset occurred");
    /// A LOGICAL UNIT RESET took place.
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = (UNIT_ATTENTION, 0x29, 0x03,
        "bus device reset function occurred");
    /// Another I_T nexus changed mode parameters.
    MODE_PARAMETERS_CHANGED = (UNIT_ATTENTION, 0x2A, 0x01, "mode parameters changed");
    /// Another I_T nexus preempted or cleared this nexus's reservation.
    RESERVATIONS_PREEMPTED = (UNIT_ATTENTION, 0x2A, 0x03, "reservations preempted");
    /// The persistent reservation was released.
    RESERVATIONS_RELEASED = (UNIT_ATTENTION, 0x2A, 0x04, "reservations released");
    /// This nexus's registration was removed by another nexus.
    REGISTRATIONS_PREEMPTED = (UNIT_ATTENTION, 0x2A, 0x05, "registrations preempted");
    /// The capacity changed (volume resize).
    CAPACITY_DATA_HAS_CHANGED = (UNIT_ATTENTION, 0x2A, 0x09, "capacity data has changed");
    /// The set of logical units changed.
    REPORTED_LUNS_DATA_HAS_CHANGED = (UNIT_ATTENTION, 0x3F, 0x0E,
        "reported luns data has changed");
    /// The asymmetric access state of a target port group changed.
    ASYMMETRIC_ACCESS_STATE_CHANGED = (UNIT_ATTENTION, 0x2A, 0x06,
        "asymmetric access state changed");
    /// The logical unit is write protected (configured read-only).
    WRITE_PROTECTED = (DATA_PROTECT, 0x27, 0x00, "write protected");
    /// The control mode page's SWP bit is set.
    SOFTWARE_WRITE_PROTECTED = (DATA_PROTECT, 0x27, 0x02, "logical unit software write protected");
    /// Thin provisioning ran out of space.
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (DATA_PROTECT, 0x27, 0x07,
        "space allocation failed write protect");
    /// iSCSI data digest failure (RFC 7143 §13.7.2).
    PROTOCOL_SERVICE_CRC_ERROR = (ABORTED_COMMAND, 0x47, 0x05, "protocol service crc error");
    /// iSCSI: Data-Out the command did not allow (immediate or unsolicited data beyond what
    /// was negotiated, or data with a command that transfers none).
    UNEXPECTED_UNSOLICITED_DATA = (ABORTED_COMMAND, 0x0C, 0x0C,
        "write error - unexpected unsolicited data");
    /// iSCSI: a Data-Out PDU out of sequence (DataSN, buffer offset or target transfer tag).
    DATA_PHASE_ERROR = (ABORTED_COMMAND, 0x4B, 0x00, "data phase error");
    /// VERIFY, WRITE AND VERIFY or COMPARE AND WRITE found different data.
    MISCOMPARE_DURING_VERIFY = (MISCOMPARE, 0x1D, 0x00, "miscompare during verify operation");
}

impl Sense {
    /// BUSY status, no sense data: the backend is briefly unavailable (ownership move, node
    /// restart). Initiators requeue the command after a short delay.
    pub const BUSY: Sense = Sense {
        status: Status::BUSY,
        key: SenseKey::NO_SENSE,
        asc: 0,
        ascq: 0,
        info: None,
        sks: None,
    };

    /// RESERVATION CONFLICT status, no sense data.
    pub const RESERVATION_CONFLICT: Sense = Sense {
        status: Status::RESERVATION_CONFLICT,
        key: SenseKey::NO_SENSE,
        asc: 0,
        ascq: 0,
        info: None,
        sks: None,
    };

    /// A CHECK CONDITION with the given sense key and ASC/ASCQ.
    pub const fn check(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            status: Status::CHECK_CONDITION,
            key,
            asc,
            ascq,
            info: None,
            sks: None,
        }
    }

    /// This condition with the INFORMATION field set (e.g. a miscompare offset).
    pub const fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    /// This condition with a sense-key-specific field pointer into the CDB: byte `byte`,
    /// and when `bit` is given, that bit (the most significant bit of the field) (SPC-4
    /// §4.5.2.4.2).
    pub const fn cdb_field(self, byte: u16, bit: Option<u8>) -> Self {
        self.field_pointer(true, byte, bit)
    }

    /// This condition with a sense-key-specific field pointer into the parameter list.
    pub const fn param_field(self, byte: u16, bit: Option<u8>) -> Self {
        self.field_pointer(false, byte, bit)
    }

    const fn field_pointer(mut self, cdb: bool, byte: u16, bit: Option<u8>) -> Self {
        let mut b0 = 0x80; // SKSV
        if cdb {
            b0 |= 0x40; // C/D
        }
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 0x07); // BPV, BIT POINTER
        }
        let [hi, lo] = byte.to_be_bytes();
        self.sks = Some([b0, hi, lo]);
        self
    }

    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Self {
        Self::INVALID_FIELD_IN_CDB.cdb_field(byte, bit)
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` (and `bit`) of the parameter list.
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Self {
        Self::INVALID_FIELD_IN_PARAMETER_LIST.param_field(byte, bit)
    }

    /// True when the completion carries sense data (CHECK CONDITION).
    pub const fn has_sense_data(&self) -> bool {
        self.status == Status::CHECK_CONDITION
    }

    /// Length of the sense data [`Sense::encode`] produces in the given format.
    pub const fn encoded_len(&self, descriptor: bool) -> usize {
        if descriptor {
            let mut len = 8;
            if self.info.is_some() {
                len += 12;
            }
            if self.sks.is_some() {
                len += 8;
            }
            len
        } else {
            18
        }
    }

    /// Encode as fixed-format (`descriptor == false`, response code 70h) or descriptor-format
    /// (72h) sense data for a current error.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len(descriptor));
        self.encode_into(descriptor, &mut out);
        out
    }

    /// Append the encoded sense data to `out`.
    pub fn encode_into(&self, descriptor: bool, out: &mut Vec<u8>) {
        if descriptor {
            let start = out.len();
            out.extend_from_slice(&[0x72, self.key & 0x0F, self.asc, self.ascq, 0, 0, 0, 0]);
            if let Some(info) = self.info {
                // Information descriptor (SPC-4 §4.5.2.2).
                out.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
                out.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sks {
                // Sense key specific descriptor (SPC-4 §4.5.2.4).
                out.extend_from_slice(&[0x02, 0x06, 0x00, 0x00, sks[0], sks[1], sks[2], 0x00]);
            }
            let additional = out.len() - start - 8;
            // At most 20 bytes of descriptors: always fits the one-byte field.
            out[start + 7] = additional as u8;
        } else {
            let mut b = [0u8; 18];
            b[0] = 0x70;
            b[2] = self.key & 0x0F;
            if let Some(info) = self.info {
                b[0] |= 0x80; // VALID
                              // Fixed format carries the low 32 bits (SPC-4 §4.5.3).
                b[3..7].copy_from_slice(&(info as u32).to_be_bytes());
            }
            b[7] = 10;
            b[12] = self.asc;
            b[13] = self.ascq;
            if let Some(sks) = self.sks {
                b[15..18].copy_from_slice(&sks);
            }
            out.extend_from_slice(&b);
        }
    }
}

impl std::fmt::Display for Sense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Status::BUSY => return f.write_str("BUSY"),
            Status::RESERVATION_CONFLICT => return f.write_str("RESERVATION CONFLICT"),
            _ => {}
        }
        write!(
            f,
            "CHECK CONDITION key {:#x} asc/ascq {:02x}/{:02x}",
            self.key, self.asc, self.ascq
        )?;
        if let Some(text) = describe(self.asc, self.ascq) {
            write!(f, " ({text})")?;
        }
        Ok(())
    }
}

/// errno values the mapping distinguishes (Linux numbering, as the backends report them).
mod errno {
    pub(super) const EAGAIN: i32 = 11;
    pub(super) const ENOSPC: i32 = 28;
    pub(super) const EROFS: i32 = 30;
}

/// The one mapping from backend errors to SCSI completions (STYLE.md §2.4).
impl From<&BlockError> for Sense {
    fn from(e: &BlockError) -> Self {
        match e {
            // Retryable: BUSY status makes initiators requeue with a delay rather than burn
            // their (few, immediate) retries, which rides through an ownership move.
            BlockError::Busy(_) => Sense::BUSY,
            BlockError::Io(errno::EAGAIN) => Sense::BUSY,
            BlockError::Io(errno::ENOSPC) | BlockError::Write(errno::ENOSPC) => {
                Sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT
            }
            BlockError::Io(errno::EROFS) | BlockError::ReadOnly => Sense::WRITE_PROTECTED,
            BlockError::Io(_) => Sense::INTERNAL_TARGET_FAILURE,
            BlockError::Medium => Sense::UNRECOVERED_READ_ERROR,
            BlockError::OutOfRange => Sense::LBA_OUT_OF_RANGE,
            BlockError::Unsupported => Sense::INVALID_COMMAND_OPERATION_CODE,
            BlockError::Write(_) => Sense::WRITE_ERROR,
            BlockError::Suspended(_) => Sense::MANUAL_INTERVENTION_REQUIRED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_are_check_conditions_with_distinct_codes() {
        let mut seen = std::collections::HashSet::new();
        for (s, text) in TABLE {
            assert_eq!(s.status, Status::CHECK_CONDITION, "{text}");
            assert!(seen.insert((s.key, s.asc, s.ascq)), "duplicate row {text}");
        }
    }

    #[test]
    fn sense_key_of_either_format() {
        for s in [
            Sense::NO_SENSE,
            Sense::INTERNAL_TARGET_FAILURE,
            Sense::invalid_cdb(2, Some(7)),
            Sense::MISCOMPARE_DURING_VERIFY.with_info(9),
        ] {
            assert_eq!(SenseKey::of(&s.encode(false)), s.key, "{s}");
            assert_eq!(SenseKey::of(&s.encode(true)), s.key, "{s}");
        }
        assert_eq!(SenseKey::of(&[]), SenseKey::NO_SENSE);
        assert_eq!(SenseKey::of(&[0x72]), SenseKey::NO_SENSE);
        assert_eq!(SenseKey::of(&[0xF0, 0x00, 0x23]), 0x3);
    }

    #[test]
    fn fixed_format_layout() {
        let s = Sense::invalid_cdb(2, Some(7));
        let b = s.encode(false);
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], SenseKey::ILLEGAL_REQUEST);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        // SKSV | C/D | BPV | bit 7, field pointer byte 2.
        assert_eq!(&b[15..18], &[0xCF, 0x00, 0x02]);
    }

    #[test]
    fn fixed_format_information_sets_valid() {
        let b = Sense::MISCOMPARE_DURING_VERIFY
            .with_info(0x1234)
            .encode(false);
        assert_eq!(b[0], 0xF0);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(b[2], SenseKey::MISCOMPARE);
    }

    #[test]
    fn descriptor_format_layout() {
        let s = Sense::MISCOMPARE_DURING_VERIFY
            .with_info(7)
            .param_field(3, None);
        let b = s.encode(true);
        assert_eq!(b.len(), s.encoded_len(true));
        assert_eq!(&b[..4], &[0x72, 0x0E, 0x1D, 0x00]);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!(&b[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(&b[12..20], &7u64.to_be_bytes());
        assert_eq!(&b[20..28], &[0x02, 0x06, 0, 0, 0x80, 0x00, 0x03, 0]);
    }

    #[test]
    fn block_errors_map_to_the_table() {
        let cases = [
            (BlockError::Busy("moving"), Sense::BUSY),
            (BlockError::Io(11), Sense::BUSY),
            (BlockError::Io(5), Sense::INTERNAL_TARGET_FAILURE),
            (
                BlockError::Io(28),
                Sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
            ),
            (BlockError::Medium, Sense::UNRECOVERED_READ_ERROR),
            (BlockError::OutOfRange, Sense::LBA_OUT_OF_RANGE),
            (BlockError::ReadOnly, Sense::WRITE_PROTECTED),
            (
                BlockError::Unsupported,
                Sense::INVALID_COMMAND_OPERATION_CODE,
            ),
            (BlockError::Write(5), Sense::WRITE_ERROR),
            (
                BlockError::Suspended("quorum"),
                Sense::MANUAL_INTERVENTION_REQUIRED,
            ),
            (
                BlockError::Write(28),
                Sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(Sense::from(&e), want, "{e}");
        }
    }

    #[test]
    fn display_names_the_condition() {
        assert_eq!(Sense::BUSY.to_string(), "BUSY");
        assert!(Sense::LBA_OUT_OF_RANGE.to_string().contains("out of range"));
    }
}
