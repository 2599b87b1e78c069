//! A SCSI command as a transport delivers it to the SCSI layer: the one command type the
//! iSCSI connection yields, the target executes, and forwarding carries between gateways.

use bytes::Bytes;

use crate::segments::Segments;

/// SAM task attribute of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    /// Untagged.
    Untagged,
    /// SIMPLE.
    #[default]
    Simple,
    /// ORDERED.
    Ordered,
    /// HEAD OF QUEUE.
    HeadOfQueue,
    /// ACA.
    Aca,
}

/// A SCSI command as the transport delivers it, with all of its Data-Out collected.
#[derive(Debug, Clone)]
pub struct ScsiCommand {
    /// The CDB (6 to 260 bytes; iSCSI carries up to 16 in the BHS, more in an AHS).
    pub cdb: Bytes,
    /// The Data-Out the initiator sent: exactly `expected_len` bytes for a write command
    /// (fewer only if the transport gave up collecting it), empty for reads. In the pieces the
    /// transport received it in: WRITE hands them to the device as they are, other commands
    /// gather them.
    pub data_out: Segments,
    /// The transport's Expected Data Transfer Length (iSCSI EDTL), in bytes.
    pub expected_len: u32,
    /// The initiator declared a read (Data-In) transfer.
    pub read: bool,
    /// The initiator declared a write (Data-Out) transfer.
    pub write: bool,
    /// Task attribute.
    pub attr: TaskAttr,
    /// The transport's task tag (iSCSI ITT), for task management.
    pub tag: u32,
}
