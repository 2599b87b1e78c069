//! Public types of the SCSI target.

use std::sync::Arc;

use bytes::Bytes;

/// An I_T nexus: one initiator port talking to one target port (SAM-5 §4.6.4).
///
/// For iSCSI the initiator port name is `<initiator iqn>,i,0x<isid hex>` and the target port
/// name `<target iqn>,t,0x<tpgt hex>` (RFC 7143 §4.4.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Unique for the lifetime of the process; a reinstated session gets a new one.
    pub id: u64,
    /// The initiator's name (IQN), without the ISID.
    pub initiator_name: Arc<str>,
    /// The initiator port name, `<iqn>,i,0x<isid>`: the key for reservations and UAs.
    pub initiator_port: Arc<str>,
    /// The target port name, `<target iqn>,t,0x<tpgt>`.
    pub target_port: Arc<str>,
    /// Relative target port identifier (VPD 0x83, REPORT TARGET PORT GROUPS).
    pub relative_port: u16,
    /// Target port group this port belongs to.
    pub port_group: u16,
}

pub use tessera_proto::scsi::{ScsiCommand, TaskAttr};

/// SCSI status byte values (SAM-5 §5.3).
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data follows.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// ACA ACTIVE.
    pub const ACA_ACTIVE: u8 = 0x30;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The outcome of a SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    /// SCSI status byte (see [`status`]).
    pub status: u8,
    /// Sense data (fixed or descriptor format) when `status` is CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In. The transport sends at most `expected_len` bytes of it.
    pub data_in: Bytes,
    /// How many bytes the command itself meant to transfer (from the CDB's transfer or
    /// allocation length, in the command's direction): the transport compares it with the
    /// expected length to report residual overflow or underflow. For reads this is usually
    /// `data_in.len()`.
    pub transfer_len: u32,
}

/// Task management functions (SAM-5 §7; iSCSI function codes RFC 7143 §11.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfFunction {
    /// ABORT TASK: the task with this tag.
    AbortTask {
        /// Referenced task tag.
        tag: u32,
    },
    /// ABORT TASK SET.
    AbortTaskSet,
    /// CLEAR ACA.
    ClearAca,
    /// CLEAR TASK SET.
    ClearTaskSet,
    /// LOGICAL UNIT RESET.
    LogicalUnitReset,
    /// TARGET WARM RESET.
    TargetWarmReset,
    /// TARGET COLD RESET.
    TargetColdReset,
}

/// Responses to task management (RFC 7143 §11.6.1 response codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    /// Function complete (0).
    Complete,
    /// Task does not exist (1).
    NoSuchTask,
    /// LUN does not exist (2).
    NoSuchLun,
    /// Task still allegiant (3).
    StillAllegiant,
    /// Task allegiance reassignment not supported (4).
    ReassignNotSupported,
    /// Task management function not supported (5).
    NotSupported,
    /// Function authorization failed (6).
    AuthFailed,
    /// Function rejected (255).
    Rejected,
}

impl TmfResponse {
    /// Its RFC 7143 §11.6.1 response code.
    pub fn code(self) -> u8 {
        match self {
            Self::Complete => 0,
            Self::NoSuchTask => 1,
            Self::NoSuchLun => 2,
            Self::StillAllegiant => 3,
            Self::ReassignNotSupported => 4,
            Self::NotSupported => 5,
            Self::AuthFailed => 6,
            Self::Rejected => 255,
        }
    }

    /// The response with RFC 7143 response code `code`, if there is one.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Complete,
            1 => Self::NoSuchTask,
            2 => Self::NoSuchLun,
            3 => Self::StillAllegiant,
            4 => Self::ReassignNotSupported,
            5 => Self::NotSupported,
            6 => Self::AuthFailed,
            255 => Self::Rejected,
            _ => return None,
        })
    }
}
