//! CDB decoding: bytes → [`Command`] (SPC-4 §4.2, SBC-3 §5).
//!
//! [`Command::parse`] checks everything that can be checked from the CDB alone: its length,
//! the control byte, reserved and unsupported field values (protection information, third
//! party reservations, obsolete bits with meaning). A failure is the [`Sense`] to complete the
//! command with, carrying a sense-key-specific field pointer at the offending byte/bit.
//! Checks that need the logical unit's state (LBA range, transfer limits, write protection,
//! reservations) are the logical unit's job.
//!
//! Decoding never allocates and never panics on any input (see the truncation tests).

use super::sense::Sense;

/// Operation codes tessera implements (SPC-4 Annex D, SBC-3 Table 12).
pub struct Opcode;

#[allow(missing_docs)] // the names are the spec's command names
impl Opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN tessera implements.
pub struct ServiceAction;

#[allow(missing_docs)] // the names are the spec's command names
impl ServiceAction {
    /// SERVICE ACTION IN(16): READ CAPACITY(16) (SBC-3 §5.16).
    pub const READ_CAPACITY_16: u8 = 0x10;
    /// SERVICE ACTION IN(16): GET LBA STATUS (SBC-3 §5.7).
    pub const GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN: REPORT TARGET PORT GROUPS (SPC-4 §6.35).
    pub const REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES (SPC-4 §6.33).
    pub const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0C;
}

/// READ/WRITE family fields (SBC-3 §5.10–5.13, §5.31–5.34).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rw {
    /// First LBA.
    pub lba: u64,
    /// TRANSFER LENGTH in logical blocks (READ(6)/WRITE(6): 0 already mapped to 256).
    pub blocks: u32,
    /// FUA: complete only once the data is on stable storage.
    pub fua: bool,
    /// DPO: a caching hint, accepted and ignored.
    pub dpo: bool,
    /// Byte offset of the TRANSFER LENGTH field (for field pointers).
    pub len_field: u16,
}

/// VERIFY(10/12/16) (SBC-3 §5.35–5.37).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verify {
    /// First LBA.
    pub lba: u64,
    /// VERIFICATION LENGTH in blocks.
    pub blocks: u32,
    /// BYTCHK: 0 medium verification only, 1 compare with Data-Out, 3 compare every block
    /// with the single Data-Out block (SBC-4). 2 is rejected while parsing.
    pub bytchk: u8,
    /// Byte offset of the VERIFICATION LENGTH field.
    pub len_field: u16,
}

/// WRITE SAME(10/16) (SBC-3 §5.41–5.42).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSame {
    /// First LBA.
    pub lba: u64,
    /// NUMBER OF LOGICAL BLOCKS; 0 means "to the end of the medium".
    pub blocks: u32,
    /// UNMAP: deallocate when the data allows it.
    pub unmap: bool,
    /// ANCHOR (not supported: rejected by the logical unit, which knows ANC_SUP).
    pub anchor: bool,
    /// NDOB (WRITE SAME(16)): no Data-Out, the block is zeroes.
    pub ndob: bool,
    /// Byte offset of the NUMBER OF LOGICAL BLOCKS field.
    pub len_field: u16,
}

/// MODE SENSE(6/10) (SPC-4 §6.11–6.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSense {
    /// MODE SENSE(10) rather than (6).
    pub ten: bool,
    /// DBD: no block descriptors.
    pub dbd: bool,
    /// LLBAA: long LBA block descriptors allowed (10 only).
    pub llbaa: bool,
    /// PC: 0 current, 1 changeable, 2 default, 3 saved.
    pub pc: u8,
    /// PAGE CODE.
    pub page: u8,
    /// SUBPAGE CODE.
    pub subpage: u8,
    /// ALLOCATION LENGTH.
    pub alloc_len: u16,
}

/// MODE SELECT(6/10) (SPC-4 §6.9–6.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSelect {
    /// MODE SELECT(10) rather than (6).
    pub ten: bool,
    /// PF: the pages follow the standard page format.
    pub pf: bool,
    /// SP: save pages.
    pub sp: bool,
    /// PARAMETER LIST LENGTH.
    pub param_len: u16,
}

/// START STOP UNIT (SBC-3 §5.25).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartStop {
    /// IMMED.
    pub immed: bool,
    /// POWER CONDITION; non-zero values only change the power condition.
    pub power_condition: u8,
    /// NO_FLUSH: do not synchronize the cache when stopping.
    pub no_flush: bool,
    /// LOEJ: load (START=1) or eject (START=0) the medium.
    pub loej: bool,
    /// START.
    pub start: bool,
}

/// A decoded CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// TEST UNIT READY (SPC-4 §6.47).
    TestUnitReady,
    /// REQUEST SENSE (SPC-4 §6.39).
    RequestSense {
        /// DESC: descriptor-format sense data requested.
        desc: bool,
        /// ALLOCATION LENGTH.
        alloc_len: u8,
    },
    /// INQUIRY (SPC-4 §6.6).
    Inquiry {
        /// EVPD: return a VPD page.
        evpd: bool,
        /// PAGE CODE.
        page: u8,
        /// ALLOCATION LENGTH.
        alloc_len: u16,
    },
    /// MODE SENSE(6/10).
    ModeSense(ModeSense),
    /// MODE SELECT(6/10).
    ModeSelect(ModeSelect),
    /// READ CAPACITY(10) (SBC-3 §5.15).
    ReadCapacity10,
    /// READ CAPACITY(16) (SBC-3 §5.16).
    ReadCapacity16 {
        /// ALLOCATION LENGTH.
        alloc_len: u32,
    },
    /// READ(6/10/12/16).
    Read(Rw),
    /// WRITE(6/10/12/16).
    Write(Rw),
    /// WRITE AND VERIFY(10/12/16) (SBC-3 §5.38–5.40).
    WriteAndVerify {
        /// The write fields (FUA is implied by the verification).
        rw: Rw,
        /// BYTCHK: compare the medium with the Data-Out after writing.
        bytchk: bool,
    },
    /// VERIFY(10/12/16).
    Verify(Verify),
    /// WRITE SAME(10/16).
    WriteSame(WriteSame),
    /// UNMAP (SBC-3 §5.28).
    Unmap {
        /// ANCHOR.
        anchor: bool,
        /// PARAMETER LIST LENGTH.
        param_len: u16,
    },
    /// GET LBA STATUS (SBC-3 §5.7).
    GetLbaStatus {
        /// STARTING LOGICAL BLOCK ADDRESS.
        lba: u64,
        /// ALLOCATION LENGTH.
        alloc_len: u32,
    },
    /// SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22–5.23).
    SynchronizeCache {
        /// First LBA.
        lba: u64,
        /// NUMBER OF LOGICAL BLOCKS; 0 means to the end.
        blocks: u32,
    },
    /// PRE-FETCH(10/16) (SBC-3 §5.8–5.9).
    PreFetch {
        /// First LBA.
        lba: u64,
        /// PREFETCH LENGTH.
        blocks: u32,
    },
    /// COMPARE AND WRITE (SBC-3 §5.2).
    CompareAndWrite {
        /// First LBA.
        lba: u64,
        /// NUMBER OF LOGICAL BLOCKS (of each half of the Data-Out).
        blocks: u8,
        /// FUA.
        fua: bool,
    },
    /// REPORT LUNS (SPC-4 §6.33).
    ReportLuns {
        /// SELECT REPORT.
        select: u8,
        /// ALLOCATION LENGTH.
        alloc_len: u32,
    },
    /// REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
    ReportSupportedOpcodes {
        /// RCTD: include command timeouts descriptors.
        rctd: bool,
        /// REPORTING OPTIONS.
        options: u8,
        /// REQUESTED OPERATION CODE.
        opcode: u8,
        /// REQUESTED SERVICE ACTION.
        sa: u16,
        /// ALLOCATION LENGTH.
        alloc_len: u32,
    },
    /// REPORT TARGET PORT GROUPS (SPC-4 §6.36).
    ReportTargetPortGroups {
        /// PARAMETER DATA FORMAT 001b: extended header.
        extended: bool,
        /// ALLOCATION LENGTH.
        alloc_len: u32,
    },
    /// START STOP UNIT.
    StartStopUnit(StartStop),
    /// PREVENT ALLOW MEDIUM REMOVAL (SBC-3 §5.11).
    PreventAllow {
        /// PREVENT = 01b.
        prevent: bool,
    },
    /// RESERVE(6/10) (SPC-2 §7.21–7.22), third-party reservations not supported.
    Reserve,
    /// RELEASE(6/10) (SPC-2 §7.19–7.20).
    Release,
    /// PERSISTENT RESERVE IN (SPC-4 §6.15).
    PersistentReserveIn {
        /// SERVICE ACTION (0..=3).
        sa: u8,
        /// ALLOCATION LENGTH.
        alloc_len: u16,
    },
    /// PERSISTENT RESERVE OUT (SPC-4 §6.16).
    PersistentReserveOut {
        /// SERVICE ACTION (0..=7).
        sa: u8,
        /// SCOPE.
        scope: u8,
        /// TYPE.
        kind: u8,
        /// PARAMETER LIST LENGTH.
        param_len: u32,
    },
}

/// Length of a CDB with this operation code, from its group code (SPC-4 §4.2.5.1);
/// `None` for the reserved and vendor-specific groups.
pub const fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reject a non-zero field: `mask` of byte `byte`, pointing at its most significant bit.
fn reject_bits(cdb: &[u8], byte: usize, mask: u8) -> Result<(), Sense> {
    let v = cdb[byte] & mask;
    if v == 0 {
        return Ok(());
    }
    let bit = 7 - mask.leading_zeros() as u8;
    Err(Sense::invalid_cdb(byte as u16, Some(bit)))
}

impl Command {
    /// The operation code and, for commands with service actions, the service action.
    pub fn opcode_of(cdb: &[u8]) -> (u8, Option<u8>) {
        let op = cdb.first().copied().unwrap_or(0xFF);
        let sa = match op {
            Opcode::SERVICE_ACTION_IN_16
            | Opcode::MAINTENANCE_IN
            | Opcode::PERSISTENT_RESERVE_IN
            | Opcode::PERSISTENT_RESERVE_OUT => cdb.get(1).map(|b| b & 0x1F),
            _ => None,
        };
        (op, sa)
    }

    /// Decode a CDB. `cdb` may be longer than the command (iSCSI pads CDBs to 16 bytes).
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        let Some(&op) = cdb.first() else {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
        };
        let Some(len) = cdb_len(op) else {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE.cdb_field(0, Some(7)));
        };
        if !is_supported_opcode(op) {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE.cdb_field(0, Some(7)));
        }
        if cdb.len() < len {
            // The transport delivered fewer bytes than the operation code implies.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let cdb = &cdb[..len];
        // CONTROL byte: NACA (bit 2) is not supported (NORMACA = 0), LINK (bit 0) is obsolete.
        reject_bits(cdb, len - 1, 0x04)?;
        reject_bits(cdb, len - 1, 0x01)?;
        parse_known(op, cdb)
    }
}

fn is_supported_opcode(op: u8) -> bool {
    matches!(
        op,
        Opcode::TEST_UNIT_READY
            | Opcode::REQUEST_SENSE
            | Opcode::READ_6
            | Opcode::WRITE_6
            | Opcode::INQUIRY
            | Opcode::MODE_SELECT_6
            | Opcode::RESERVE_6
            | Opcode::RELEASE_6
            | Opcode::MODE_SENSE_6
            | Opcode::START_STOP_UNIT
            | Opcode::PREVENT_ALLOW_MEDIUM_REMOVAL
            | Opcode::READ_CAPACITY_10
            | Opcode::READ_10
            | Opcode::WRITE_10
            | Opcode::WRITE_AND_VERIFY_10
            | Opcode::VERIFY_10
            | Opcode::PRE_FETCH_10
            | Opcode::SYNCHRONIZE_CACHE_10
            | Opcode::WRITE_SAME_10
            | Opcode::UNMAP
            | Opcode::MODE_SELECT_10
            | Opcode::RESERVE_10
            | Opcode::RELEASE_10
            | Opcode::MODE_SENSE_10
            | Opcode::PERSISTENT_RESERVE_IN
            | Opcode::PERSISTENT_RESERVE_OUT
            | Opcode::READ_16
            | Opcode::COMPARE_AND_WRITE
            | Opcode::WRITE_16
            | Opcode::WRITE_AND_VERIFY_16
            | Opcode::VERIFY_16
            | Opcode::PRE_FETCH_16
            | Opcode::SYNCHRONIZE_CACHE_16
            | Opcode::WRITE_SAME_16
            | Opcode::SERVICE_ACTION_IN_16
            | Opcode::REPORT_LUNS
            | Opcode::MAINTENANCE_IN
            | Opcode::READ_12
            | Opcode::WRITE_12
            | Opcode::WRITE_AND_VERIFY_12
            | Opcode::VERIFY_12
    )
}

/// Decode the LBA / length fields of the 10/12/16-byte block commands:
/// (lba, blocks, offset of the length field).
fn lba_len(cdb: &[u8]) -> (u64, u32, u16) {
    match cdb.len() {
        10 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7)), 7),
        12 => (u64::from(be32(cdb, 2)), be32(cdb, 6), 6),
        _ => (be64(cdb, 2), be32(cdb, 10), 10),
    }
}

/// The fields of a READ, WRITE or WRITE AND VERIFY(10/12/16) CDB, which carries no
/// protection information (RDPROTECT/WRPROTECT 0) and takes FUA and DPO from byte 1.
fn rw_fields(cdb: &[u8]) -> Result<Rw, Sense> {
    reject_bits(cdb, 1, 0xE0)?;
    let (lba, blocks, len_field) = lba_len(cdb);
    Ok(Rw {
        lba,
        blocks,
        fua: cdb[1] & 0x08 != 0,
        dpo: cdb[1] & 0x10 != 0,
        len_field,
    })
}

fn parse_known(op: u8, cdb: &[u8]) -> Result<Command, Sense> {
    Ok(match op {
        Opcode::TEST_UNIT_READY => Command::TestUnitReady,
        Opcode::REQUEST_SENSE => Command::RequestSense {
            desc: cdb[1] & 0x01 != 0,
            alloc_len: cdb[4],
        },
        Opcode::INQUIRY => {
            reject_bits(cdb, 1, 0x02)?; // CMDDT (obsolete)
            let evpd = cdb[1] & 0x01 != 0;
            if !evpd && cdb[2] != 0 {
                return Err(Sense::invalid_cdb(2, Some(7)));
            }
            Command::Inquiry {
                evpd,
                page: cdb[2],
                alloc_len: be16(cdb, 3),
            }
        }
        Opcode::MODE_SENSE_6 | Opcode::MODE_SENSE_10 => {
            let ten = op == Opcode::MODE_SENSE_10;
            Command::ModeSense(ModeSense {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                llbaa: ten && cdb[1] & 0x10 != 0,
                pc: cdb[2] >> 6,
                page: cdb[2] & 0x3F,
                subpage: cdb[3],
                alloc_len: if ten { be16(cdb, 7) } else { u16::from(cdb[4]) },
            })
        }
        Opcode::MODE_SELECT_6 | Opcode::MODE_SELECT_10 => {
            let ten = op == Opcode::MODE_SELECT_10;
            Command::ModeSelect(ModeSelect {
                ten,
                pf: cdb[1] & 0x10 != 0,
                sp: cdb[1] & 0x01 != 0,
                param_len: if ten { be16(cdb, 7) } else { u16::from(cdb[4]) },
            })
        }
        Opcode::READ_CAPACITY_10 => {
            // PMI = 0 requires LOGICAL BLOCK ADDRESS = 0 (SBC-3 §5.15.1).
            if cdb[8] & 0x01 == 0 && be32(cdb, 2) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::ReadCapacity10
        }
        Opcode::READ_6 | Opcode::WRITE_6 => {
            let lba = u64::from(be24(cdb, 1) & 0x1F_FFFF);
            let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            let rw = Rw {
                lba,
                blocks,
                fua: false,
                dpo: false,
                len_field: 4,
            };
            if op == Opcode::READ_6 {
                Command::Read(rw)
            } else {
                Command::Write(rw)
            }
        }
        Opcode::READ_10 | Opcode::READ_12 | Opcode::READ_16 => Command::Read(rw_fields(cdb)?),
        Opcode::WRITE_10 | Opcode::WRITE_12 | Opcode::WRITE_16 => Command::Write(rw_fields(cdb)?),
        Opcode::WRITE_AND_VERIFY_10 | Opcode::WRITE_AND_VERIFY_12 | Opcode::WRITE_AND_VERIFY_16 => {
            let rw = rw_fields(cdb)?;
            let bytchk = (cdb[1] >> 1) & 0x03;
            if bytchk > 1 {
                return Err(Sense::invalid_cdb(1, Some(2)));
            }
            Command::WriteAndVerify {
                // Writes through whatever FUA says.
                rw: Rw { fua: true, ..rw },
                bytchk: bytchk == 1,
            }
        }
        Opcode::VERIFY_10 | Opcode::VERIFY_12 | Opcode::VERIFY_16 => {
            reject_bits(cdb, 1, 0xE0)?; // VRPROTECT
            let bytchk = (cdb[1] >> 1) & 0x03;
            if bytchk == 2 {
                return Err(Sense::invalid_cdb(1, Some(2)));
            }
            let (lba, blocks, len_field) = lba_len(cdb);
            Command::Verify(Verify {
                lba,
                blocks,
                bytchk,
                len_field,
            })
        }
        Opcode::WRITE_SAME_10 | Opcode::WRITE_SAME_16 => {
            reject_bits(cdb, 1, 0xE0)?; // WRPROTECT
            reject_bits(cdb, 1, 0x06)?; // PBDATA / LBDATA (obsolete)
            let sixteen = op == Opcode::WRITE_SAME_16;
            if !sixteen {
                reject_bits(cdb, 1, 0x01)?;
            }
            let (lba, blocks, len_field) = lba_len(cdb);
            Command::WriteSame(WriteSame {
                lba,
                blocks,
                unmap: cdb[1] & 0x08 != 0,
                anchor: cdb[1] & 0x10 != 0,
                ndob: sixteen && cdb[1] & 0x01 != 0,
                len_field,
            })
        }
        Opcode::UNMAP => Command::Unmap {
            anchor: cdb[1] & 0x01 != 0,
            param_len: be16(cdb, 7),
        },
        Opcode::SYNCHRONIZE_CACHE_10 | Opcode::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks, _) = lba_len(cdb);
            Command::SynchronizeCache { lba, blocks }
        }
        Opcode::PRE_FETCH_10 | Opcode::PRE_FETCH_16 => {
            let (lba, blocks, _) = lba_len(cdb);
            Command::PreFetch { lba, blocks }
        }
        Opcode::COMPARE_AND_WRITE => {
            reject_bits(cdb, 1, 0xE0)?; // WRPROTECT
            Command::CompareAndWrite {
                lba: be64(cdb, 2),
                blocks: cdb[13],
                fua: cdb[1] & 0x08 != 0,
            }
        }
        Opcode::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1F {
            ServiceAction::READ_CAPACITY_16 => {
                if cdb[14] & 0x01 == 0 && be64(cdb, 2) != 0 {
                    return Err(Sense::invalid_cdb(2, None));
                }
                Command::ReadCapacity16 {
                    alloc_len: be32(cdb, 10),
                }
            }
            ServiceAction::GET_LBA_STATUS => Command::GetLbaStatus {
                lba: be64(cdb, 2),
                alloc_len: be32(cdb, 10),
            },
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        },
        Opcode::MAINTENANCE_IN => match cdb[1] & 0x1F {
            ServiceAction::REPORT_TARGET_PORT_GROUPS => {
                let format = cdb[1] >> 5;
                if format > 1 {
                    return Err(Sense::invalid_cdb(1, Some(7)));
                }
                Command::ReportTargetPortGroups {
                    extended: format == 1,
                    alloc_len: be32(cdb, 6),
                }
            }
            ServiceAction::REPORT_SUPPORTED_OPERATION_CODES => {
                let options = cdb[2] & 0x07;
                if options > 3 {
                    return Err(Sense::invalid_cdb(2, Some(2)));
                }
                Command::ReportSupportedOpcodes {
                    rctd: cdb[2] & 0x80 != 0,
                    options,
                    opcode: cdb[3],
                    sa: be16(cdb, 4),
                    alloc_len: be32(cdb, 6),
                }
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        },
        Opcode::REPORT_LUNS => Command::ReportLuns {
            select: cdb[2],
            alloc_len: be32(cdb, 6),
        },
        Opcode::START_STOP_UNIT => Command::StartStopUnit(StartStop {
            immed: cdb[1] & 0x01 != 0,
            power_condition: cdb[4] >> 4,
            no_flush: cdb[4] & 0x04 != 0,
            loej: cdb[4] & 0x02 != 0,
            start: cdb[4] & 0x01 != 0,
        }),
        Opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => {
            // 10b and 11b (medium changer) are obsolete for direct-access devices.
            reject_bits(cdb, 4, 0x02)?;
            Command::PreventAllow {
                prevent: cdb[4] & 0x01 != 0,
            }
        }
        Opcode::RESERVE_6 | Opcode::RELEASE_6 => {
            // 3RDPTY, THIRD PARTY DEVICE ID and EXTENT are not supported.
            reject_bits(cdb, 1, 0x1F)?;
            if op == Opcode::RESERVE_6 {
                Command::Reserve
            } else {
                Command::Release
            }
        }
        Opcode::RESERVE_10 | Opcode::RELEASE_10 => {
            reject_bits(cdb, 1, 0x10)?; // 3RDPTY
            reject_bits(cdb, 1, 0x02)?; // LONGID
            reject_bits(cdb, 1, 0x01)?; // EXTENT (obsolete)
            if op == Opcode::RESERVE_10 {
                Command::Reserve
            } else {
                Command::Release
            }
        }
        Opcode::PERSISTENT_RESERVE_IN => {
            let sa = cdb[1] & 0x1F;
            if sa > 3 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Command::PersistentReserveIn {
                sa,
                alloc_len: be16(cdb, 7),
            }
        }
        Opcode::PERSISTENT_RESERVE_OUT => {
            let sa = cdb[1] & 0x1F;
            if sa > 7 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            Command::PersistentReserveOut {
                sa,
                scope: cdb[2] >> 4,
                kind: cdb[2] & 0x0F,
                param_len: be32(cdb, 5),
            }
        }
        _ => return Err(Sense::INVALID_COMMAND_OPERATION_CODE.cdb_field(0, Some(7))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::SenseKey;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn read10_fields() {
        let c = cdb(&[0x28, 0x18, 0, 0, 0x12, 0x34, 0, 0, 8, 0]);
        assert_eq!(
            Command::parse(&c).unwrap(),
            Command::Read(Rw {
                lba: 0x1234,
                blocks: 8,
                fua: true,
                dpo: true,
                len_field: 7
            })
        );
    }

    #[test]
    fn read6_zero_length_is_256_blocks() {
        let c = cdb(&[0x08, 0x1F, 0xFF, 0xFF, 0, 0]);
        match Command::parse(&c).unwrap() {
            Command::Read(rw) => {
                assert_eq!(rw.lba, 0x1F_FFFF);
                assert_eq!(rw.blocks, 256);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write16_fields() {
        let mut c = cdb(&[0x8A, 0x08]);
        c[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        c[10..14].copy_from_slice(&77u32.to_be_bytes());
        assert_eq!(
            Command::parse(&c).unwrap(),
            Command::Write(Rw {
                lba: 0x0102_0304_0506_0708,
                blocks: 77,
                fua: true,
                dpo: false,
                len_field: 10
            })
        );
    }

    #[test]
    fn protect_fields_are_rejected_with_a_pointer() {
        for op in [
            0x28u8, 0xA8, 0x88, 0x2A, 0xAA, 0x8A, 0x2F, 0xAF, 0x8F, 0x2E, 0x41, 0x93, 0x89,
        ] {
            let c = cdb(&[op, 0x20]);
            let e = Command::parse(&c).unwrap_err();
            assert_eq!(
                (e.key, e.asc, e.ascq),
                (SenseKey::ILLEGAL_REQUEST, 0x24, 0),
                "{op:#x}"
            );
            assert_eq!(e.sks, Some([0xCF, 0, 1]), "{op:#x}");
        }
    }

    #[test]
    fn unknown_opcode() {
        let e = Command::parse(&cdb(&[0x02])).unwrap_err();
        assert_eq!((e.asc, e.ascq), (0x20, 0));
        let e = Command::parse(&cdb(&[0xC0])).unwrap_err();
        assert_eq!((e.asc, e.ascq), (0x20, 0));
    }

    #[test]
    fn naca_is_rejected() {
        let e = Command::parse(&cdb(&[0x00, 0, 0, 0, 0, 0x04])).unwrap_err();
        assert_eq!(e.sks, Some([0xCA, 0, 5]));
    }

    #[test]
    fn inquiry_page_without_evpd_is_invalid() {
        let e = Command::parse(&cdb(&[0x12, 0, 1, 1, 0])).unwrap_err();
        assert_eq!(e, Sense::invalid_cdb(2, Some(7)));
        assert_eq!(
            Command::parse(&cdb(&[0x12, 1, 0x83, 1, 0])).unwrap(),
            Command::Inquiry {
                evpd: true,
                page: 0x83,
                alloc_len: 256
            }
        );
    }

    #[test]
    fn verify_bytchk_values() {
        assert!(matches!(
            Command::parse(&cdb(&[0x2F, 0x06, 0, 0, 0, 0, 0, 0, 1, 0])).unwrap(),
            Command::Verify(Verify { bytchk: 3, .. })
        ));
        assert!(Command::parse(&cdb(&[0x2F, 0x04, 0, 0, 0, 0, 0, 0, 1, 0])).is_err());
    }

    #[test]
    fn service_actions() {
        let mut c = cdb(&[0x9E, 0x10]);
        c[13] = 32;
        assert_eq!(
            Command::parse(&c).unwrap(),
            Command::ReadCapacity16 { alloc_len: 32 }
        );
        let e = Command::parse(&cdb(&[0x9E, 0x11])).unwrap_err();
        assert_eq!(e.sks, Some([0xCC, 0, 1]));
        let e = Command::parse(&cdb(&[0xA3, 0x05])).unwrap_err();
        assert_eq!(e.sks, Some([0xCC, 0, 1]));
        let e = Command::parse(&cdb(&[0x5E, 0x04])).unwrap_err();
        assert_eq!(e.sks, Some([0xCC, 0, 1]));
    }

    #[test]
    fn every_strict_prefix_fails_without_panicking() {
        for op in 0..=255u8 {
            let mut full = [0u8; 16];
            full[0] = op;
            full[1] = 0x10; // a service action for the 0x9E/0xA3 families
            let Ok(_) = Command::parse(&full) else {
                continue;
            };
            let n = cdb_len(op).unwrap_or(16);
            for cut in 0..n {
                assert!(
                    Command::parse(&full[..cut]).is_err(),
                    "op {op:#x} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for _ in 0..20_000 {
            let mut c = [0u8; 16];
            for b in c.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let _ = Command::parse(&c);
        }
    }
}
