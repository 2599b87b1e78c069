//! SCSI (SAM-5, SPC-4, SBC-3) for a direct-access block device, free of I/O.
//!
//! - [`cdb`]: CDB decoding into [`cdb::Command`], with the field pointer of any bad field.
//! - [`sense`]: completion conditions ([`sense::Sense`]: status, sense key, ASC/ASCQ), the
//!   sense table, fixed and descriptor sense data, and the one mapping from
//!   [`BlockError`](crate::block::BlockError).
//! - [`inquiry`], [`vpd`]: standard INQUIRY data and VPD pages.
//! - [`mode`]: mode pages, MODE SENSE data and MODE SELECT validation.
//! - [`capacity`], [`provision`]: READ CAPACITY, UNMAP parameter lists, GET LBA STATUS.
//! - [`luns`]: LUN addressing and REPORT LUNS data.
//! - [`opcodes`]: the supported-command table and REPORT SUPPORTED OPERATION CODES.
//! - [`alua`]: REPORT TARGET PORT GROUPS data.
//! - [`pr`]: persistent reservations as state transitions, and their persistence encoding.
//!
//! What to do with a command — ordering, unit attentions, reservations, talking to the
//! backend — is the `tessera-scsi` crate's logical unit.

pub mod alua;
pub mod capacity;
pub mod cdb;
pub mod command;
pub mod inquiry;
pub mod luns;
pub mod mode;
pub mod opcodes;
pub mod pr;
pub mod provision;
pub mod sense;
pub mod vpd;

pub use cdb::Command;
pub use command::{ScsiCommand, TaskAttr};
pub use sense::Sense;
