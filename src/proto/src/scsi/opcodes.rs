//! The supported-commands table and REPORT SUPPORTED OPERATION CODES data (SPC-4 §6.35).
//!
//! Every command [`Command::parse`](super::cdb::Command::parse) accepts has one row here, with
//! its CDB USAGE DATA: a bit is set exactly when the device server evaluates that CDB bit (the
//! operation code and service action bytes hold their values). Bits the parser rejects when
//! non-zero (RDPROTECT, ANCHOR, third-party reservations, NACA) are reported as zero, i.e.
//! not supported. A test checks the table against the parser.

use super::cdb::{Opcode, ServiceAction};
use super::sense::Sense;

/// One supported operation code / service action.
#[derive(Debug, Clone, Copy)]
pub struct CommandInfo {
    /// OPERATION CODE.
    pub opcode: u8,
    /// SERVICE ACTION, for commands that have service actions.
    pub sa: Option<u8>,
    /// CDB USAGE DATA (its length is the CDB length).
    pub usage: &'static [u8],
    /// Recommended timeout in seconds (command timeouts descriptor).
    pub timeout_s: u32,
}

const IO_TIMEOUT: u32 = 30;
const ADMIN_TIMEOUT: u32 = 10;

macro_rules! row {
    ($op:expr, $sa:expr, $t:expr, [$($u:expr),* $(,)?]) => {
        CommandInfo { opcode: $op, sa: $sa, usage: &[$($u),*], timeout_s: $t }
    };
}

/// The supported commands, in operation code / service action order.
pub static COMMANDS: &[CommandInfo] = &[
    row!(
        Opcode::TEST_UNIT_READY,
        None,
        ADMIN_TIMEOUT,
        [0x00, 0, 0, 0, 0, 0]
    ),
    row!(
        Opcode::REQUEST_SENSE,
        None,
        ADMIN_TIMEOUT,
        [0x03, 0x01, 0, 0, 0xFF, 0]
    ),
    row!(
        Opcode::READ_6,
        None,
        IO_TIMEOUT,
        [0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::WRITE_6,
        None,
        IO_TIMEOUT,
        [0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::INQUIRY,
        None,
        ADMIN_TIMEOUT,
        [0x12, 0x01, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::MODE_SELECT_6,
        None,
        ADMIN_TIMEOUT,
        [0x15, 0x11, 0, 0, 0xFF, 0]
    ),
    row!(
        Opcode::RESERVE_6,
        None,
        ADMIN_TIMEOUT,
        [0x16, 0, 0, 0, 0, 0]
    ),
    row!(
        Opcode::RELEASE_6,
        None,
        ADMIN_TIMEOUT,
        [0x17, 0, 0, 0, 0, 0]
    ),
    row!(
        Opcode::MODE_SENSE_6,
        None,
        ADMIN_TIMEOUT,
        [0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::START_STOP_UNIT,
        None,
        ADMIN_TIMEOUT,
        [0x1B, 0x01, 0, 0x0F, 0xF7, 0]
    ),
    row!(
        Opcode::PREVENT_ALLOW_MEDIUM_REMOVAL,
        None,
        ADMIN_TIMEOUT,
        [0x1E, 0, 0, 0, 0x01, 0]
    ),
    row!(
        Opcode::READ_CAPACITY_10,
        None,
        ADMIN_TIMEOUT,
        [0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0]
    ),
    row!(
        Opcode::READ_10,
        None,
        IO_TIMEOUT,
        [0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::WRITE_10,
        None,
        IO_TIMEOUT,
        [0x2A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::WRITE_AND_VERIFY_10,
        None,
        IO_TIMEOUT,
        [0x2E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::VERIFY_10,
        None,
        IO_TIMEOUT,
        [0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PRE_FETCH_10,
        None,
        IO_TIMEOUT,
        [0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::SYNCHRONIZE_CACHE_10,
        None,
        IO_TIMEOUT,
        [0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::WRITE_SAME_10,
        None,
        IO_TIMEOUT,
        [0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::UNMAP,
        None,
        IO_TIMEOUT,
        [0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::MODE_SELECT_10,
        None,
        ADMIN_TIMEOUT,
        [0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::RESERVE_10,
        None,
        ADMIN_TIMEOUT,
        [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    row!(
        Opcode::RELEASE_10,
        None,
        ADMIN_TIMEOUT,
        [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ),
    row!(
        Opcode::MODE_SENSE_10,
        None,
        ADMIN_TIMEOUT,
        [0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_IN,
        Some(0),
        ADMIN_TIMEOUT,
        [0x5E, 0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_IN,
        Some(1),
        ADMIN_TIMEOUT,
        [0x5E, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_IN,
        Some(2),
        ADMIN_TIMEOUT,
        [0x5E, 0x02, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_IN,
        Some(3),
        ADMIN_TIMEOUT,
        [0x5E, 0x03, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(0),
        ADMIN_TIMEOUT,
        [0x5F, 0x00, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(1),
        ADMIN_TIMEOUT,
        [0x5F, 0x01, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(2),
        ADMIN_TIMEOUT,
        [0x5F, 0x02, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(3),
        ADMIN_TIMEOUT,
        [0x5F, 0x03, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(4),
        ADMIN_TIMEOUT,
        [0x5F, 0x04, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(5),
        ADMIN_TIMEOUT,
        [0x5F, 0x05, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(6),
        ADMIN_TIMEOUT,
        [0x5F, 0x06, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::PERSISTENT_RESERVE_OUT,
        Some(7),
        ADMIN_TIMEOUT,
        [0x5F, 0x07, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]
    ),
    row!(
        Opcode::READ_16,
        None,
        IO_TIMEOUT,
        [
            0x88, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::COMPARE_AND_WRITE,
        None,
        IO_TIMEOUT,
        [0x89, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, 0]
    ),
    row!(
        Opcode::WRITE_16,
        None,
        IO_TIMEOUT,
        [
            0x8A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::WRITE_AND_VERIFY_16,
        None,
        IO_TIMEOUT,
        [
            0x8E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::VERIFY_16,
        None,
        IO_TIMEOUT,
        [
            0x8F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::PRE_FETCH_16,
        None,
        IO_TIMEOUT,
        [
            0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::SYNCHRONIZE_CACHE_16,
        None,
        IO_TIMEOUT,
        [
            0x91, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::WRITE_SAME_16,
        None,
        IO_TIMEOUT,
        [
            0x93, 0x09, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0
        ]
    ),
    row!(
        Opcode::SERVICE_ACTION_IN_16,
        Some(ServiceAction::READ_CAPACITY_16),
        ADMIN_TIMEOUT,
        [
            0x9E, 0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x01, 0
        ]
    ),
    row!(
        Opcode::SERVICE_ACTION_IN_16,
        Some(ServiceAction::GET_LBA_STATUS),
        IO_TIMEOUT,
        [
            0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0
        ]
    ),
    row!(
        Opcode::REPORT_LUNS,
        None,
        ADMIN_TIMEOUT,
        [0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]
    ),
    row!(
        Opcode::MAINTENANCE_IN,
        Some(ServiceAction::REPORT_TARGET_PORT_GROUPS),
        ADMIN_TIMEOUT,
        [0xA3, 0x2A, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]
    ),
    row!(
        Opcode::MAINTENANCE_IN,
        Some(ServiceAction::REPORT_SUPPORTED_OPERATION_CODES),
        ADMIN_TIMEOUT,
        [0xA3, 0x0C, 0x83, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]
    ),
    row!(
        Opcode::READ_12,
        None,
        IO_TIMEOUT,
        [0xA8, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]
    ),
    row!(
        Opcode::WRITE_12,
        None,
        IO_TIMEOUT,
        [0xAA, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]
    ),
    row!(
        Opcode::WRITE_AND_VERIFY_12,
        None,
        IO_TIMEOUT,
        [0xAE, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]
    ),
    row!(
        Opcode::VERIFY_12,
        None,
        IO_TIMEOUT,
        [0xAF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0]
    ),
];

fn timeouts_descriptor(info: &CommandInfo, out: &mut Vec<u8>) {
    // COMMAND TIMEOUTS DESCRIPTOR (SPC-4 §6.35.4): length 0Ah, nominal, recommended.
    out.extend_from_slice(&[0x00, 0x0A, 0x00, 0x00]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&info.timeout_s.to_be_bytes());
}

fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.sa.is_some())
}

/// REPORTING OPTIONS 000b: all commands (SPC-4 §6.35.2), untruncated.
pub fn report_all(rctd: bool) -> Vec<u8> {
    let per = if rctd { 20 } else { 8 };
    let mut out = Vec::with_capacity(4 + per * COMMANDS.len());
    out.extend_from_slice(&[0; 4]);
    for c in COMMANDS {
        out.push(c.opcode);
        out.push(0);
        out.extend_from_slice(&u16::from(c.sa.unwrap_or(0)).to_be_bytes());
        out.push(0);
        out.push(if rctd { 0x02 } else { 0 } | u8::from(c.sa.is_some()));
        // CDB lengths are at most 16: the conversion cannot truncate.
        out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
        if rctd {
            timeouts_descriptor(c, &mut out);
        }
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// REPORTING OPTIONS 001b/010b/011b: one command (SPC-4 §6.35.3).
pub fn report_one(options: u8, opcode: u8, sa: u16, rctd: bool) -> Result<Vec<u8>, Sense> {
    let with_sa = has_service_actions(opcode);
    let wanted_sa = match options {
        1 if with_sa => return Err(Sense::invalid_cdb(2, Some(2))),
        1 => None,
        2 if !with_sa && COMMANDS.iter().any(|c| c.opcode == opcode) => {
            return Err(Sense::invalid_cdb(2, Some(2)))
        }
        2 => Some(sa),
        3 if with_sa => Some(sa),
        3 => None,
        _ => return Err(Sense::invalid_cdb(2, Some(2))),
    };
    let found = COMMANDS
        .iter()
        .find(|c| c.opcode == opcode && c.sa.map(u16::from) == wanted_sa);
    let Some(c) = found else {
        // SUPPORT = 001b: not supported.
        return Ok(vec![0, 0x01, 0, 0]);
    };
    let mut out = Vec::with_capacity(4 + c.usage.len() + 12);
    out.push(0);
    out.push(if rctd { 0x80 } else { 0 } | 0x03); // CTDP, SUPPORT = 011b
    out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
    out.extend_from_slice(c.usage);
    if rctd {
        timeouts_descriptor(c, &mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::cdb::{cdb_len, Command};
    use super::*;

    #[test]
    fn table_rows_parse_and_have_the_right_length() {
        for c in COMMANDS {
            assert_eq!(Some(c.usage.len()), cdb_len(c.opcode), "{:#x}", c.opcode);
            assert_eq!(c.usage[0], c.opcode);
            if let Some(sa) = c.sa {
                assert_eq!(c.usage[1] & 0x1F, sa);
            }
            // The all-zero CDB with the service action parses (or fails only on a
            // field that needs a value), never as an unknown opcode.
            let mut cdb = [0u8; 16];
            cdb[0] = c.opcode;
            if let Some(sa) = c.sa {
                cdb[1] = sa;
            }
            if let Err(e) = Command::parse(&cdb) {
                assert_ne!(
                    e.asc, 0x20,
                    "{:#x} is in the table but not parsed",
                    c.opcode
                );
            }
        }
    }

    #[test]
    fn usage_bits_are_accepted_by_the_parser() {
        // Setting every bit the usage data advertises must not be rejected as an invalid
        // CDB field: a rejected bit is an unsupported bit and must be reported as zero.
        for c in COMMANDS {
            let mut cdb = [0u8; 16];
            cdb[..c.usage.len()].copy_from_slice(c.usage);
            let Err(e) = Command::parse(&cdb) else {
                continue;
            };
            let Some(sks) = e.sks else { continue };
            if sks[0] & 0x48 == 0x48 {
                let byte = usize::from(u16::from_be_bytes([sks[1], sks[2]]));
                let bit = sks[0] & 0x07;
                assert_eq!(
                    c.usage[byte] & (1 << bit),
                    0,
                    "{:#x}: usage advertises a rejected bit",
                    c.opcode
                );
            }
        }
    }

    #[test]
    fn all_commands_layout() {
        let d = report_all(false);
        assert_eq!(d.len(), 4 + 8 * COMMANDS.len());
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
            d.len() - 4
        );
        let d = report_all(true);
        assert_eq!(d.len(), 4 + 20 * COMMANDS.len());
        // First descriptor: CTDP set, timeouts descriptor length 0Ah.
        assert_eq!(d[4 + 5] & 0x02, 0x02);
        assert_eq!(&d[12..14], &[0x00, 0x0A]);
    }

    #[test]
    fn one_command_rules() {
        let d = report_one(1, Opcode::READ_16, 0, false).unwrap();
        assert_eq!(d[1], 0x03);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 16);
        assert_eq!(d[4], Opcode::READ_16);
        assert!(report_one(1, Opcode::PERSISTENT_RESERVE_OUT, 0, false).is_err());
        assert!(report_one(2, Opcode::READ_16, 0, false).is_err());
        let d = report_one(2, Opcode::SERVICE_ACTION_IN_16, 0x10, true).unwrap();
        assert_eq!(d[1], 0x83);
        assert_eq!(d.len(), 4 + 16 + 12);
        assert_eq!(report_one(1, 0x02, 0, false).unwrap(), vec![0, 1, 0, 0]);
        assert_eq!(
            report_one(2, Opcode::MAINTENANCE_IN, 0x1F, false).unwrap(),
            vec![0, 1, 0, 0]
        );
    }
}
