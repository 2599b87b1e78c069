//! iSCSI PDUs (RFC 7143 §11): the Basic Header Segment and a typed view of every PDU.
//!
//! Every PDU type decodes from and encodes to a [`Bhs`] in both directions (target and
//! initiator), so tests can play either side and round-trip properties hold. Multi-byte fields
//! are big-endian. The data segment and AHS travel beside the BHS in a [`Pdu`]; framing
//! (lengths, padding, digests) is the [`framer`](super::framer)'s job.

use bytes::Bytes;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The reserved tag value (RFC 7143 §11.2.1.6: 0xffffffff).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// An iSCSI opcode (BHS byte 0, bits 0-5). Open: unknown values parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(pub u8);

impl Opcode {
    /// NOP-Out (initiator).
    pub const NOP_OUT: Self = Self(0x00);
    /// SCSI Command (initiator).
    pub const SCSI_COMMAND: Self = Self(0x01);
    /// SCSI Task Management Function Request (initiator).
    pub const TASK_MGMT_REQUEST: Self = Self(0x02);
    /// Login Request (initiator).
    pub const LOGIN_REQUEST: Self = Self(0x03);
    /// Text Request (initiator).
    pub const TEXT_REQUEST: Self = Self(0x04);
    /// SCSI Data-Out (initiator).
    pub const DATA_OUT: Self = Self(0x05);
    /// Logout Request (initiator).
    pub const LOGOUT_REQUEST: Self = Self(0x06);
    /// SNACK Request (initiator).
    pub const SNACK_REQUEST: Self = Self(0x10);
    /// NOP-In (target).
    pub const NOP_IN: Self = Self(0x20);
    /// SCSI Response (target).
    pub const SCSI_RESPONSE: Self = Self(0x21);
    /// SCSI Task Management Function Response (target).
    pub const TASK_MGMT_RESPONSE: Self = Self(0x22);
    /// Login Response (target).
    pub const LOGIN_RESPONSE: Self = Self(0x23);
    /// Text Response (target).
    pub const TEXT_RESPONSE: Self = Self(0x24);
    /// SCSI Data-In (target).
    pub const DATA_IN: Self = Self(0x25);
    /// Logout Response (target).
    pub const LOGOUT_RESPONSE: Self = Self(0x26);
    /// Ready To Transfer (target).
    pub const R2T: Self = Self(0x31);
    /// Asynchronous Message (target).
    pub const ASYNC_MESSAGE: Self = Self(0x32);
    /// Reject (target).
    pub const REJECT: Self = Self(0x3f);
}

/// Why a BHS could not be understood as its opcode's PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// A field holds a value the PDU type does not allow.
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    /// The opcode is not one this side of the connection understands.
    #[error("unsupported opcode 0x{0:02x}")]
    UnsupportedOpcode(u8),
}

/// The Basic Header Segment: 48 raw bytes with field accessors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op=0x{:02x} ", self.opcode().0)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Self([0; BHS_LEN])
    }
}

impl Bhs {
    /// Opcode (byte 0, bits 0-5).
    pub fn opcode(&self) -> Opcode {
        Opcode(self.0[0] & 0x3f)
    }
    /// The I (immediate delivery) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in 4-byte words (byte 4).
    pub fn total_ahs_words(&self) -> u8 {
        self.0[4]
    }
    /// DataSegmentLength (bytes 5-7, 24 bits), without padding.
    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    /// Set TotalAHSLength and DataSegmentLength.
    ///
    /// # Panics
    /// If `data_len` does not fit in 24 bits (callers split data to the negotiated limits).
    pub fn set_lengths(&mut self, ahs_words: u8, data_len: u32) {
        assert!(
            data_len < 1 << 24,
            "data segment length {data_len} exceeds 24 bits"
        );
        self.0[4] = ahs_words;
        self.0[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
    }
    /// The 8-byte LUN field (bytes 8-15).
    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }
    /// Initiator Task Tag (bytes 16-19).
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// Big-endian u16 at `off`.
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    /// Big-endian u32 at `off`.
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes([
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        ])
    }
    fn put_u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn start(op: Opcode, immediate: bool, flags: u8) -> Self {
        let mut b = Self::default();
        b.0[0] = op.0 | if immediate { 0x40 } else { 0 };
        b.0[1] = flags;
        b
    }
    fn put_lun(&mut self, lun: [u8; 8]) {
        self.0[8..16].copy_from_slice(&lun);
    }
}

/// A whole PDU: header, additional header segments and data segment (digests and padding
/// already checked and stripped).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pdu {
    /// The BHS.
    pub bhs: Bhs,
    /// Additional Header Segments, raw (a multiple of 4 bytes).
    pub ahs: Bytes,
    /// The data segment, without padding.
    pub data: Bytes,
}

/// SCSI task attributes as coded in the SCSI Command PDU (RFC 7143 §11.3.1.4).
pub mod attr {
    /// Untagged.
    pub const UNTAGGED: u8 = 0;
    /// Simple.
    pub const SIMPLE: u8 = 1;
    /// Ordered.
    pub const ORDERED: u8 = 2;
    /// Head of queue.
    pub const HEAD_OF_QUEUE: u8 = 3;
    /// ACA.
    pub const ACA: u8 = 4;

    /// The SAM task attribute of ATTR code `code` (reserved codes: SIMPLE).
    pub fn task_attr(code: u8) -> crate::scsi::TaskAttr {
        use crate::scsi::TaskAttr;
        match code {
            UNTAGGED => TaskAttr::Untagged,
            ORDERED => TaskAttr::Ordered,
            HEAD_OF_QUEUE => TaskAttr::HeadOfQueue,
            ACA => TaskAttr::Aca,
            _ => TaskAttr::Simple,
        }
    }
}

/// SCSI Command (RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    /// I bit.
    pub immediate: bool,
    /// F bit: no unsolicited Data-Out follows.
    pub final_bit: bool,
    /// R bit: data will be read (Data-In).
    pub read: bool,
    /// W bit: data will be written (Data-Out).
    pub write: bool,
    /// ATTR field (see [`attr`]).
    pub attr: u8,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub edtl: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The 16-byte CDB field (longer CDBs continue in an extended-CDB AHS).
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    /// Decode from a BHS whose opcode is SCSI Command.
    pub fn decode(b: &Bhs) -> Self {
        let f = b.flags();
        let mut cdb = [0; 16];
        cdb.copy_from_slice(&b.0[32..48]);
        Self {
            immediate: b.immediate(),
            final_bit: f & 0x80 != 0,
            read: f & 0x40 != 0,
            write: f & 0x20 != 0,
            attr: f & 0x07,
            lun: b.lun(),
            itt: b.itt(),
            edtl: b.u32_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
            cdb,
        }
    }
    /// Encode (data segment length is set by the framer's caller).
    pub fn encode(&self) -> Bhs {
        let flags = (self.final_bit as u8) << 7
            | (self.read as u8) << 6
            | (self.write as u8) << 5
            | (self.attr & 0x07);
        let mut b = Bhs::start(Opcode::SCSI_COMMAND, self.immediate, flags);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.edtl);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        b.0[32..48].copy_from_slice(&self.cdb);
        b
    }
}

/// Residual flags shared by SCSI Response and Data-In.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    /// No residual.
    #[default]
    None,
    /// U: fewer bytes than expected were transferred; the count is the difference.
    Underflow(u32),
    /// O: the command wanted more than the expected length; the count is the excess.
    Overflow(u32),
}

impl Residual {
    fn flags(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Underflow(_) => 0x02,
            Self::Overflow(_) => 0x04,
        }
    }
    fn count(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Underflow(n) | Self::Overflow(n) => n,
        }
    }
    fn from_parts(flags: u8, count: u32) -> Self {
        if flags & 0x04 != 0 {
            Self::Overflow(count)
        } else if flags & 0x02 != 0 {
            Self::Underflow(count)
        } else {
            Self::None
        }
    }
    /// Residual of a transfer: the command wanted `wanted` bytes and the initiator expected
    /// `expected`.
    pub fn of(expected: u32, wanted: u32) -> Self {
        use std::cmp::Ordering::*;
        match wanted.cmp(&expected) {
            Equal => Self::None,
            Less => Self::Underflow(expected - wanted),
            Greater => Self::Overflow(wanted - expected),
        }
    }
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    /// Response code: 0x00 command completed at target, 0x01 target failure.
    pub response: u8,
    /// SCSI status byte.
    pub status: u8,
    /// Residual (O/U flags and Residual Count).
    pub residual: Residual,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// ExpDataSN: the number of R2T and Data-In PDUs sent for the command.
    pub exp_data_sn: u32,
}

impl ScsiResponse {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            response: b.0[2],
            status: b.0[3],
            residual: Residual::from_parts(b.flags(), b.u32_at(44)),
            itt: b.itt(),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            exp_data_sn: b.u32_at(36),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::SCSI_RESPONSE, false, 0x80 | self.residual.flags());
        b.0[2] = self.response;
        b.0[3] = self.status;
        b.put_u32(16, self.itt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.put_u32(36, self.exp_data_sn);
        b.put_u32(44, self.residual.count());
        b
    }
}

/// Task management function codes (RFC 7143 §11.5.1).
pub mod tmf {
    /// ABORT TASK.
    pub const ABORT_TASK: u8 = 1;
    /// ABORT TASK SET.
    pub const ABORT_TASK_SET: u8 = 2;
    /// CLEAR ACA.
    pub const CLEAR_ACA: u8 = 3;
    /// CLEAR TASK SET.
    pub const CLEAR_TASK_SET: u8 = 4;
    /// LOGICAL UNIT RESET.
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    /// TARGET WARM RESET.
    pub const TARGET_WARM_RESET: u8 = 6;
    /// TARGET COLD RESET.
    pub const TARGET_COLD_RESET: u8 = 7;
    /// TASK REASSIGN.
    pub const TASK_REASSIGN: u8 = 8;
}

/// Task Management Function Request (RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    /// I bit.
    pub immediate: bool,
    /// Function code (see [`tmf`]).
    pub function: u8,
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag of this request.
    pub itt: u32,
    /// Referenced Task Tag (ABORT TASK).
    pub rtt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// RefCmdSN.
    pub ref_cmd_sn: u32,
    /// ExpDataSN.
    pub exp_data_sn: u32,
}

impl TaskMgmtRequest {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            immediate: b.immediate(),
            function: b.flags() & 0x7f,
            lun: b.lun(),
            itt: b.itt(),
            rtt: b.u32_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
            ref_cmd_sn: b.u32_at(32),
            exp_data_sn: b.u32_at(36),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(
            Opcode::TASK_MGMT_REQUEST,
            self.immediate,
            0x80 | (self.function & 0x7f),
        );
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.rtt);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        b.put_u32(32, self.ref_cmd_sn);
        b.put_u32(36, self.exp_data_sn);
        b
    }
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    /// Response code (0 complete, 1 no task, 2 no LUN, 3 still allegiant, 4 reassign
    /// unsupported, 5 not supported, 6 auth failed, 255 rejected).
    pub response: u8,
    /// Initiator Task Tag of the request.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl TaskMgmtResponse {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            response: b.0[2],
            itt: b.itt(),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::TASK_MGMT_RESPONSE, false, 0x80);
        b.0[2] = self.response;
        b.put_u32(16, self.itt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b
    }
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    /// F bit: last PDU of the sequence.
    pub final_bit: bool,
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
}

impl DataOut {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            final_bit: b.final_bit(),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            exp_stat_sn: b.u32_at(28),
            data_sn: b.u32_at(36),
            buffer_offset: b.u32_at(40),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::DATA_OUT, false, (self.final_bit as u8) << 7);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(28, self.exp_stat_sn);
        b.put_u32(36, self.data_sn);
        b.put_u32(40, self.buffer_offset);
        b
    }
}

/// SCSI Data-In (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    /// F bit: last PDU of the sequence.
    pub final_bit: bool,
    /// A bit: acknowledge requested (ERL > 0 only).
    pub ack: bool,
    /// With S set, the status (and residual) of the command; the PDU then also carries a
    /// StatSN that advances.
    pub status: Option<u8>,
    /// Residual (only meaningful with a status).
    pub residual: Residual,
    /// LUN (with the A bit) or zero.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff unless A is set).
    pub ttt: u32,
    /// StatSN (only with status).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
}

impl DataIn {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        let f = b.flags();
        let has_status = f & 0x01 != 0;
        Self {
            final_bit: f & 0x80 != 0,
            ack: f & 0x40 != 0,
            status: has_status.then_some(b.0[3]),
            residual: if has_status {
                Residual::from_parts(f, b.u32_at(44))
            } else {
                Residual::None
            },
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            stat_sn: if has_status { b.u32_at(24) } else { 0 },
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            data_sn: b.u32_at(36),
            buffer_offset: b.u32_at(40),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut flags = (self.final_bit as u8) << 7 | (self.ack as u8) << 6;
        if self.status.is_some() {
            flags |= 0x01 | self.residual.flags();
        }
        let mut b = Bhs::start(Opcode::DATA_IN, false, flags);
        if let Some(s) = self.status {
            b.0[3] = s;
            b.put_u32(24, self.stat_sn);
            b.put_u32(44, self.residual.count());
        }
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.put_u32(36, self.data_sn);
        b.put_u32(40, self.buffer_offset);
        b
    }
}

/// Ready To Transfer (RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag.
    pub ttt: u32,
    /// StatSN (next, not advanced).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
    /// Desired Data Transfer Length.
    pub desired_len: u32,
}

impl R2t {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            r2t_sn: b.u32_at(36),
            buffer_offset: b.u32_at(40),
            desired_len: b.u32_at(44),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::R2T, false, 0x80);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.put_u32(36, self.r2t_sn);
        b.put_u32(40, self.buffer_offset);
        b.put_u32(44, self.desired_len);
        b
    }
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    /// LUN (for SCSI async events).
    pub lun: [u8; 8],
    /// StatSN (advances).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// AsyncEvent: 0 SCSI event, 1 logout request, 2 dropping connection, 3 dropping all
    /// connections, 4 renegotiate, 248 vendor.
    pub event: u8,
    /// AsyncVCode.
    pub vcode: u8,
    /// Parameter1..3.
    pub parameters: [u16; 3],
}

impl AsyncMessage {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            lun: b.lun(),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            event: b.0[36],
            vcode: b.0[37],
            parameters: [b.u16_at(38), b.u16_at(40), b.u16_at(42)],
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::ASYNC_MESSAGE, false, 0x80);
        b.put_lun(self.lun);
        b.put_u32(16, RESERVED_TAG);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.0[36] = self.event;
        b.0[37] = self.vcode;
        b.put_u16(38, self.parameters[0]);
        b.put_u16(40, self.parameters[1]);
        b.put_u16(42, self.parameters[2]);
        b
    }
}

/// Text Request (RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextRequest {
    /// I bit.
    pub immediate: bool,
    /// F bit.
    pub final_bit: bool,
    /// C bit: the text continues in the next PDU.
    pub continue_bit: bool,
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff on a new request).
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl TextRequest {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            immediate: b.immediate(),
            final_bit: b.final_bit(),
            continue_bit: b.flags() & 0x40 != 0,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let flags = (self.final_bit as u8) << 7 | (self.continue_bit as u8) << 6;
        let mut b = Bhs::start(Opcode::TEXT_REQUEST, self.immediate, flags);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        b
    }
}

/// Text Response (RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResponse {
    /// F bit.
    pub final_bit: bool,
    /// C bit.
    pub continue_bit: bool,
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff when final).
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl TextResponse {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            final_bit: b.final_bit(),
            continue_bit: b.flags() & 0x40 != 0,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let flags = (self.final_bit as u8) << 7 | (self.continue_bit as u8) << 6;
        let mut b = Bhs::start(Opcode::TEXT_RESPONSE, false, flags);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b
    }
}

/// Login stages (CSG/NSG, RFC 7143 §11.12.3).
pub mod stage {
    /// SecurityNegotiation.
    pub const SECURITY: u8 = 0;
    /// LoginOperationalNegotiation.
    pub const OPERATIONAL: u8 = 1;
    /// FullFeaturePhase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Login Request (RFC 7143 §11.12).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginRequest {
    /// T bit: the initiator is ready to move to `nsg`.
    pub transit: bool,
    /// C bit: text continues in the next PDU.
    pub continue_bit: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage (valid with T).
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// ISID (6 bytes).
    pub isid: [u8; 6],
    /// TSIH (0 for a new session).
    pub tsih: u16,
    /// Initiator Task Tag.
    pub itt: u32,
    /// CID.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl LoginRequest {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        let f = b.flags();
        let mut isid = [0; 6];
        isid.copy_from_slice(&b.0[8..14]);
        Self {
            transit: f & 0x80 != 0,
            continue_bit: f & 0x40 != 0,
            csg: (f >> 2) & 0x3,
            nsg: f & 0x3,
            version_max: b.0[2],
            version_min: b.0[3],
            isid,
            tsih: b.u16_at(14),
            itt: b.itt(),
            cid: b.u16_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
        }
    }
    /// Encode (Login Requests are always immediate).
    pub fn encode(&self) -> Bhs {
        let flags = (self.transit as u8) << 7
            | (self.continue_bit as u8) << 6
            | (self.csg & 3) << 2
            | (self.nsg & 3);
        let mut b = Bhs::start(Opcode::LOGIN_REQUEST, true, flags);
        b.0[2] = self.version_max;
        b.0[3] = self.version_min;
        b.0[8..14].copy_from_slice(&self.isid);
        b.put_u16(14, self.tsih);
        b.put_u32(16, self.itt);
        b.put_u16(20, self.cid);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        b
    }
}

/// Login Response (RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginResponse {
    /// T bit.
    pub transit: bool,
    /// C bit.
    pub continue_bit: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// ISID.
    pub isid: [u8; 6],
    /// TSIH.
    pub tsih: u16,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Status-Class.
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
}

impl LoginResponse {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        let f = b.flags();
        let mut isid = [0; 6];
        isid.copy_from_slice(&b.0[8..14]);
        Self {
            transit: f & 0x80 != 0,
            continue_bit: f & 0x40 != 0,
            csg: (f >> 2) & 0x3,
            nsg: f & 0x3,
            version_max: b.0[2],
            version_active: b.0[3],
            isid,
            tsih: b.u16_at(14),
            itt: b.itt(),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            status_class: b.0[36],
            status_detail: b.0[37],
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let flags = (self.transit as u8) << 7
            | (self.continue_bit as u8) << 6
            | (self.csg & 3) << 2
            | (self.nsg & 3);
        let mut b = Bhs::start(Opcode::LOGIN_RESPONSE, false, flags);
        b.0[2] = self.version_max;
        b.0[3] = self.version_active;
        b.0[8..14].copy_from_slice(&self.isid);
        b.put_u16(14, self.tsih);
        b.put_u32(16, self.itt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.0[36] = self.status_class;
        b.0[37] = self.status_detail;
        b
    }
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    /// I bit.
    pub immediate: bool,
    /// Reason code: 0 close session, 1 close connection, 2 remove connection for recovery.
    pub reason: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// CID (reasons 1 and 2).
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            immediate: b.immediate(),
            reason: b.flags() & 0x7f,
            itt: b.itt(),
            cid: b.u16_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(
            Opcode::LOGOUT_REQUEST,
            self.immediate,
            0x80 | (self.reason & 0x7f),
        );
        b.put_u32(16, self.itt);
        b.put_u16(20, self.cid);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        b
    }
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    /// Response: 0 closed successfully, 1 CID not found, 2 recovery not supported,
    /// 3 cleanup failed.
    pub response: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Time2Wait.
    pub time2wait: u16,
    /// Time2Retain.
    pub time2retain: u16,
}

impl LogoutResponse {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            response: b.0[2],
            itt: b.itt(),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            time2wait: b.u16_at(40),
            time2retain: b.u16_at(42),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::LOGOUT_RESPONSE, false, 0x80);
        b.0[2] = self.response;
        b.put_u32(16, self.itt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.put_u16(40, self.time2wait);
        b.put_u16(42, self.time2retain);
        b
    }
}

/// SNACK Request (RFC 7143 §11.16).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnackRequest {
    /// Type: 0 Data/R2T, 1 Status, 2 DataACK, 3 R-Data.
    pub snack_type: u8,
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag or SNACK Tag.
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// BegRun.
    pub beg_run: u32,
    /// RunLength.
    pub run_length: u32,
}

impl SnackRequest {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            snack_type: b.flags() & 0x0f,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            exp_stat_sn: b.u32_at(28),
            beg_run: b.u32_at(40),
            run_length: b.u32_at(44),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(
            Opcode::SNACK_REQUEST,
            false,
            0x80 | (self.snack_type & 0x0f),
        );
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(28, self.exp_stat_sn);
        b.put_u32(40, self.beg_run);
        b.put_u32(44, self.run_length);
        b
    }
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    /// SNACK Reject.
    pub const SNACK_REJECT: u8 = 0x03;
    /// Protocol Error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject - too many immediate commands.
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    /// Task in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// Invalid data ack.
    pub const INVALID_DATA_ACK: u8 = 0x08;
    /// Invalid PDU field.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    /// Long operation reject - can't generate Target Transfer Tag - out of resources.
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    /// Waiting for Logout.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Reject (RFC 7143 §11.17). The data segment carries the rejected PDU's header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reject {
    /// Reason (see [`reject`]).
    pub reason: u8,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN/R2TSN (for rejected SNACKs).
    pub data_sn: u32,
}

impl Reject {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            reason: b.0[2],
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
            data_sn: b.u32_at(36),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::REJECT, false, 0x80);
        b.0[2] = self.reason;
        b.put_u32(16, RESERVED_TAG);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b.put_u32(36, self.data_sn);
        b
    }
}

/// NOP-Out (RFC 7143 §11.18).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    /// I bit.
    pub immediate: bool,
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag (0xffffffff when answering a target ping).
    pub itt: u32,
    /// Target Transfer Tag (echoes a NOP-In's, or 0xffffffff).
    pub ttt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

impl NopOut {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            immediate: b.immediate(),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            cmd_sn: b.u32_at(24),
            exp_stat_sn: b.u32_at(28),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::NOP_OUT, self.immediate, 0x80);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(24, self.cmd_sn);
        b.put_u32(28, self.exp_stat_sn);
        b
    }
}

/// NOP-In (RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    /// LUN.
    pub lun: [u8; 8],
    /// Initiator Task Tag (0xffffffff for a target-initiated ping).
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff when no answer is wanted).
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl NopIn {
    /// Decode.
    pub fn decode(b: &Bhs) -> Self {
        Self {
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            stat_sn: b.u32_at(24),
            exp_cmd_sn: b.u32_at(28),
            max_cmd_sn: b.u32_at(32),
        }
    }
    /// Encode.
    pub fn encode(&self) -> Bhs {
        let mut b = Bhs::start(Opcode::NOP_IN, false, 0x80);
        b.put_lun(self.lun);
        b.put_u32(16, self.itt);
        b.put_u32(20, self.ttt);
        b.put_u32(24, self.stat_sn);
        b.put_u32(28, self.exp_cmd_sn);
        b.put_u32(32, self.max_cmd_sn);
        b
    }
}

/// A request from the initiator, decoded by opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// NOP-Out.
    NopOut(NopOut),
    /// SCSI Command.
    ScsiCommand(ScsiCommand),
    /// Task management.
    TaskMgmt(TaskMgmtRequest),
    /// Login.
    Login(LoginRequest),
    /// Text.
    Text(TextRequest),
    /// Data-Out.
    DataOut(DataOut),
    /// Logout.
    Logout(LogoutRequest),
    /// SNACK.
    Snack(SnackRequest),
}

impl Request {
    /// Decode an initiator PDU's header. Target opcodes and unknown opcodes are
    /// [`PduError::UnsupportedOpcode`].
    pub fn decode(b: &Bhs) -> Result<Self, PduError> {
        Ok(match b.opcode() {
            Opcode::NOP_OUT => Self::NopOut(NopOut::decode(b)),
            Opcode::SCSI_COMMAND => Self::ScsiCommand(ScsiCommand::decode(b)),
            Opcode::TASK_MGMT_REQUEST => Self::TaskMgmt(TaskMgmtRequest::decode(b)),
            Opcode::LOGIN_REQUEST => Self::Login(LoginRequest::decode(b)),
            Opcode::TEXT_REQUEST => Self::Text(TextRequest::decode(b)),
            Opcode::DATA_OUT => Self::DataOut(DataOut::decode(b)),
            Opcode::LOGOUT_REQUEST => Self::Logout(LogoutRequest::decode(b)),
            Opcode::SNACK_REQUEST => Self::Snack(SnackRequest::decode(b)),
            other => return Err(PduError::UnsupportedOpcode(other.0)),
        })
    }
    /// Encode to a BHS.
    pub fn encode(&self) -> Bhs {
        match self {
            Self::NopOut(p) => p.encode(),
            Self::ScsiCommand(p) => p.encode(),
            Self::TaskMgmt(p) => p.encode(),
            Self::Login(p) => p.encode(),
            Self::Text(p) => p.encode(),
            Self::DataOut(p) => p.encode(),
            Self::Logout(p) => p.encode(),
            Self::Snack(p) => p.encode(),
        }
    }
}

/// A PDU from the target, decoded by opcode (used by test initiators).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// NOP-In.
    NopIn(NopIn),
    /// SCSI Response.
    ScsiResponse(ScsiResponse),
    /// Task management response.
    TaskMgmt(TaskMgmtResponse),
    /// Login response.
    Login(LoginResponse),
    /// Text response.
    Text(TextResponse),
    /// Data-In.
    DataIn(DataIn),
    /// Logout response.
    Logout(LogoutResponse),
    /// R2T.
    R2t(R2t),
    /// Asynchronous message.
    Async(AsyncMessage),
    /// Reject.
    Reject(Reject),
}

impl Response {
    /// Decode a target PDU's header.
    pub fn decode(b: &Bhs) -> Result<Self, PduError> {
        Ok(match b.opcode() {
            Opcode::NOP_IN => Self::NopIn(NopIn::decode(b)),
            Opcode::SCSI_RESPONSE => Self::ScsiResponse(ScsiResponse::decode(b)),
            Opcode::TASK_MGMT_RESPONSE => Self::TaskMgmt(TaskMgmtResponse::decode(b)),
            Opcode::LOGIN_RESPONSE => Self::Login(LoginResponse::decode(b)),
            Opcode::TEXT_RESPONSE => Self::Text(TextResponse::decode(b)),
            Opcode::DATA_IN => Self::DataIn(DataIn::decode(b)),
            Opcode::LOGOUT_RESPONSE => Self::Logout(LogoutResponse::decode(b)),
            Opcode::R2T => Self::R2t(R2t::decode(b)),
            Opcode::ASYNC_MESSAGE => Self::Async(AsyncMessage::decode(b)),
            Opcode::REJECT => Self::Reject(Reject::decode(b)),
            other => return Err(PduError::UnsupportedOpcode(other.0)),
        })
    }
    /// Encode to a BHS.
    pub fn encode(&self) -> Bhs {
        match self {
            Self::NopIn(p) => p.encode(),
            Self::ScsiResponse(p) => p.encode(),
            Self::TaskMgmt(p) => p.encode(),
            Self::Login(p) => p.encode(),
            Self::Text(p) => p.encode(),
            Self::DataIn(p) => p.encode(),
            Self::Logout(p) => p.encode(),
            Self::R2t(p) => p.encode(),
            Self::Async(p) => p.encode(),
            Self::Reject(p) => p.encode(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A SCSI Command PDU as the Linux initiator sends it (READ(10) of 8 blocks at LBA 0x20,
    /// ITT 0x10, CmdSN 5), written out from RFC 7143 §11.3's field layout.
    const READ10_CMD: [u8; 48] = [
        0x01, 0xc1, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // op, F|R|SIMPLE, lengths 0
        0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // LUN 1
        0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x10, 0x00, // ITT, EDTL 4096
        0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x07, // CmdSN 5, ExpStatSN 7
        0x28, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, // READ(10) LBA 0x20
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 8 blocks
    ];

    #[test]
    fn scsi_command_vector_decodes_field_by_field() {
        let c = ScsiCommand::decode(&Bhs(READ10_CMD));
        assert!(c.final_bit && c.read && !c.write && !c.immediate);
        assert_eq!(c.attr, attr::SIMPLE);
        assert_eq!(c.lun, [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!((c.itt, c.edtl, c.cmd_sn, c.exp_stat_sn), (0x10, 4096, 5, 7));
        assert_eq!(&c.cdb[..10], &[0x28, 0, 0, 0, 0, 0x20, 0, 0, 8, 0]);
        assert_eq!(c.encode().0, READ10_CMD);
    }

    #[test]
    fn lengths_are_24_bit_big_endian() {
        let mut b = Bhs::default();
        b.set_lengths(2, 0x01_02_03);
        assert_eq!(&b.0[4..8], &[2, 1, 2, 3]);
        assert_eq!(b.data_segment_len(), 0x010203);
        assert_eq!(b.total_ahs_words(), 2);
    }

    #[test]
    fn residual_of_compares_expected_and_wanted() {
        assert_eq!(Residual::of(512, 512), Residual::None);
        assert_eq!(Residual::of(1024, 512), Residual::Underflow(512));
        assert_eq!(Residual::of(200, 512), Residual::Overflow(312));
    }

    #[test]
    fn unknown_opcode_is_reported_not_panicked() {
        let mut b = Bhs::default();
        b.0[0] = 0x1c;
        assert_eq!(Request::decode(&b), Err(PduError::UnsupportedOpcode(0x1c)));
        b.0[0] = Opcode::SCSI_RESPONSE.0;
        assert_eq!(Request::decode(&b), Err(PduError::UnsupportedOpcode(0x21)));
    }

    fn arb_lun() -> impl Strategy<Value = [u8; 8]> {
        any::<[u8; 8]>()
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                any::<bool>(),
                arb_lun(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(immediate, lun, itt, ttt, cmd_sn, exp_stat_sn)| {
                    Request::NopOut(NopOut {
                        immediate,
                        lun,
                        itt,
                        ttt,
                        cmd_sn,
                        exp_stat_sn,
                    })
                }),
            (
                (
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    0u8..8
                ),
                arb_lun(),
                (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
                any::<[u8; 16]>()
            )
                .prop_map(
                    |((immediate, final_bit, read, write, attr), lun, n, cdb)| {
                        Request::ScsiCommand(ScsiCommand {
                            immediate,
                            final_bit,
                            read,
                            write,
                            attr,
                            lun,
                            itt: n.0,
                            edtl: n.1,
                            cmd_sn: n.2,
                            exp_stat_sn: n.3,
                            cdb,
                        })
                    }
                ),
            (any::<bool>(), 0u8..128, arb_lun(), any::<[u32; 6]>()).prop_map(
                |(immediate, function, lun, n)| {
                    Request::TaskMgmt(TaskMgmtRequest {
                        immediate,
                        function,
                        lun,
                        itt: n[0],
                        rtt: n[1],
                        cmd_sn: n[2],
                        exp_stat_sn: n[3],
                        ref_cmd_sn: n[4],
                        exp_data_sn: n[5],
                    })
                }
            ),
            (
                (
                    any::<bool>(),
                    any::<bool>(),
                    0u8..4,
                    0u8..4,
                    any::<u8>(),
                    any::<u8>()
                ),
                any::<[u8; 6]>(),
                any::<u16>(),
                any::<u16>(),
                any::<[u32; 3]>()
            )
                .prop_map(|(f, isid, tsih, cid, n)| {
                    Request::Login(LoginRequest {
                        transit: f.0,
                        continue_bit: f.1,
                        csg: f.2,
                        nsg: f.3,
                        version_max: f.4,
                        version_min: f.5,
                        isid,
                        tsih,
                        itt: n[0],
                        cid,
                        cmd_sn: n[1],
                        exp_stat_sn: n[2],
                    })
                }),
            (any::<[bool; 3]>(), arb_lun(), any::<[u32; 4]>()).prop_map(|(f, lun, n)| {
                Request::Text(TextRequest {
                    immediate: f[0],
                    final_bit: f[1],
                    continue_bit: f[2],
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    cmd_sn: n[2],
                    exp_stat_sn: n[3],
                })
            }),
            (any::<bool>(), arb_lun(), any::<[u32; 5]>()).prop_map(|(final_bit, lun, n)| {
                Request::DataOut(DataOut {
                    final_bit,
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    exp_stat_sn: n[2],
                    data_sn: n[3],
                    buffer_offset: n[4],
                })
            }),
            (any::<bool>(), 0u8..128, any::<u16>(), any::<[u32; 3]>()).prop_map(
                |(immediate, reason, cid, n)| {
                    Request::Logout(LogoutRequest {
                        immediate,
                        reason,
                        itt: n[0],
                        cid,
                        cmd_sn: n[1],
                        exp_stat_sn: n[2],
                    })
                }
            ),
            (0u8..16, arb_lun(), any::<[u32; 5]>()).prop_map(|(snack_type, lun, n)| {
                Request::Snack(SnackRequest {
                    snack_type,
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    exp_stat_sn: n[2],
                    beg_run: n[3],
                    run_length: n[4],
                })
            }),
        ]
    }

    fn arb_residual() -> impl Strategy<Value = Residual> {
        prop_oneof![
            Just(Residual::None),
            any::<u32>().prop_map(Residual::Underflow),
            any::<u32>().prop_map(Residual::Overflow),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (arb_lun(), any::<[u32; 5]>()).prop_map(|(lun, n)| Response::NopIn(NopIn {
                lun,
                itt: n[0],
                ttt: n[1],
                stat_sn: n[2],
                exp_cmd_sn: n[3],
                max_cmd_sn: n[4],
            })),
            (any::<u8>(), any::<u8>(), arb_residual(), any::<[u32; 5]>()).prop_map(
                |(response, status, residual, n)| {
                    Response::ScsiResponse(ScsiResponse {
                        response,
                        status,
                        residual,
                        itt: n[0],
                        stat_sn: n[1],
                        exp_cmd_sn: n[2],
                        max_cmd_sn: n[3],
                        exp_data_sn: n[4],
                    })
                }
            ),
            (any::<u8>(), any::<[u32; 4]>()).prop_map(|(response, n)| {
                Response::TaskMgmt(TaskMgmtResponse {
                    response,
                    itt: n[0],
                    stat_sn: n[1],
                    exp_cmd_sn: n[2],
                    max_cmd_sn: n[3],
                })
            }),
            (
                (
                    any::<bool>(),
                    any::<bool>(),
                    0u8..4,
                    0u8..4,
                    any::<u8>(),
                    any::<u8>()
                ),
                any::<[u8; 6]>(),
                any::<u16>(),
                any::<[u32; 4]>(),
                any::<[u8; 2]>()
            )
                .prop_map(|(f, isid, tsih, n, st)| {
                    Response::Login(LoginResponse {
                        transit: f.0,
                        continue_bit: f.1,
                        csg: f.2,
                        nsg: f.3,
                        version_max: f.4,
                        version_active: f.5,
                        isid,
                        tsih,
                        itt: n[0],
                        stat_sn: n[1],
                        exp_cmd_sn: n[2],
                        max_cmd_sn: n[3],
                        status_class: st[0],
                        status_detail: st[1],
                    })
                }),
            (any::<[bool; 2]>(), arb_lun(), any::<[u32; 5]>()).prop_map(|(f, lun, n)| {
                Response::Text(TextResponse {
                    final_bit: f[0],
                    continue_bit: f[1],
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    stat_sn: n[2],
                    exp_cmd_sn: n[3],
                    max_cmd_sn: n[4],
                })
            }),
            (
                any::<[bool; 2]>(),
                proptest::option::of(any::<u8>()),
                arb_residual(),
                arb_lun(),
                any::<[u32; 7]>()
            )
                .prop_map(|(f, status, residual, lun, n)| {
                    Response::DataIn(DataIn {
                        final_bit: f[0],
                        ack: f[1],
                        status,
                        residual: if status.is_some() {
                            residual
                        } else {
                            Residual::None
                        },
                        lun,
                        itt: n[0],
                        ttt: n[1],
                        stat_sn: if status.is_some() { n[2] } else { 0 },
                        exp_cmd_sn: n[3],
                        max_cmd_sn: n[4],
                        data_sn: n[5],
                        buffer_offset: n[6],
                    })
                }),
            (any::<u8>(), any::<[u32; 4]>(), any::<[u16; 2]>()).prop_map(|(response, n, t)| {
                Response::Logout(LogoutResponse {
                    response,
                    itt: n[0],
                    stat_sn: n[1],
                    exp_cmd_sn: n[2],
                    max_cmd_sn: n[3],
                    time2wait: t[0],
                    time2retain: t[1],
                })
            }),
            (arb_lun(), any::<[u32; 8]>()).prop_map(|(lun, n)| Response::R2t(R2t {
                lun,
                itt: n[0],
                ttt: n[1],
                stat_sn: n[2],
                exp_cmd_sn: n[3],
                max_cmd_sn: n[4],
                r2t_sn: n[5],
                buffer_offset: n[6],
                desired_len: n[7],
            })),
            (
                arb_lun(),
                any::<[u32; 3]>(),
                any::<[u8; 2]>(),
                any::<[u16; 3]>()
            )
                .prop_map(|(lun, n, e, parameters)| {
                    Response::Async(AsyncMessage {
                        lun,
                        stat_sn: n[0],
                        exp_cmd_sn: n[1],
                        max_cmd_sn: n[2],
                        event: e[0],
                        vcode: e[1],
                        parameters,
                    })
                }),
            (any::<u8>(), any::<[u32; 4]>()).prop_map(|(reason, n)| Response::Reject(Reject {
                reason,
                stat_sn: n[0],
                exp_cmd_sn: n[1],
                max_cmd_sn: n[2],
                data_sn: n[3],
            })),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(r in arb_request()) {
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn responses_round_trip(r in arb_response()) {
            prop_assert_eq!(Response::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn any_bhs_decodes_without_panic(raw in any::<[u8; 32]>(), tail in any::<[u8; 16]>()) {
            let mut b = Bhs::default();
            b.0[..32].copy_from_slice(&raw);
            b.0[32..].copy_from_slice(&tail);
            let _ = Request::decode(&b);
            let _ = Response::decode(&b);
        }
    }
}
