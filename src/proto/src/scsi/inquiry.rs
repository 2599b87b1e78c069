//! Standard INQUIRY data (SPC-4 §6.6.2).
//!
//! tessera reports itself as an SPC-4 direct-access block device with implicit ALUA
//! (TPGS = 01b), command queuing, hierarchical LUN support, and the version descriptors of
//! SAM-5, SPC-4, SBC-3 and iSCSI. VPD pages are in [`super::vpd`].

/// Length of the standard INQUIRY data tessera returns.
pub const STANDARD_LEN: usize = 74;

/// Version descriptors (SPC-4 Table 147): SAM-5, SPC-4, SBC-3, iSCSI (no version claimed).
pub const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0460, 0x04C0, 0x0960];

/// The identity strings and flags of a logical unit.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// T10 VENDOR IDENTIFICATION (8 characters, space padded).
    pub vendor: &'a str,
    /// PRODUCT IDENTIFICATION (16 characters).
    pub product: &'a str,
    /// PRODUCT REVISION LEVEL (4 characters).
    pub revision: &'a str,
    /// RMB: removable medium.
    pub removable: bool,
}

/// Copy `s` into `dst` as printable ASCII (SPC-4 §4.4.1), space padded and truncated.
pub fn put_ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = if (0x20..=0x7E).contains(&c) { c } else { b'?' };
    }
}

/// Standard INQUIRY data for a connected logical unit (peripheral qualifier 000b).
pub fn standard(id: &Identity<'_>) -> [u8; STANDARD_LEN] {
    let mut b = [0u8; STANDARD_LEN];
    b[0] = 0x00; // peripheral qualifier 000b, direct-access block device
    b[1] = if id.removable { 0x80 } else { 0 };
    b[2] = 0x06; // VERSION: SPC-4
    b[3] = 0x12; // HISUP, RESPONSE DATA FORMAT = 2
    b[4] = (STANDARD_LEN - 5) as u8;
    b[5] = 0x10; // TPGS = 01b: implicit asymmetric logical unit access
    b[6] = 0x10; // MULTIP: the logical unit is reachable through several target ports
    b[7] = 0x02; // CMDQUE
    put_ascii(&mut b[8..16], id.vendor);
    put_ascii(&mut b[16..32], id.product);
    put_ascii(&mut b[32..36], id.revision);
    for (i, d) in VERSION_DESCRIPTORS.iter().enumerate() {
        b[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    b
}

/// Standard INQUIRY data for a LUN with no logical unit behind it: peripheral qualifier
/// 011b, device type 1Fh (SPC-4 §6.6.2).
pub fn standard_absent() -> [u8; 36] {
    let mut b = [0u8; 36];
    b[0] = 0x7F;
    b[2] = 0x06;
    b[3] = 0x12;
    b[4] = 31;
    put_ascii(&mut b[8..36], "");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_layout() {
        let id = Identity {
            vendor: "TESSERA",
            product: "VIRTUAL-DISK",
            revision: "0.1",
            removable: true,
        };
        let b = standard(&id);
        assert_eq!(b[4] as usize, b.len() - 5);
        assert_eq!(b[1], 0x80);
        assert_eq!(b[5] & 0x30, 0x10);
        assert_eq!(&b[8..16], b"TESSERA ");
        assert_eq!(&b[16..32], b"VIRTUAL-DISK    ");
        assert_eq!(&b[32..36], b"0.1 ");
        assert_eq!(&b[58..60], &[0x00, 0xA0]);
        assert_eq!(&b[62..64], &[0x04, 0xC0]);
    }

    #[test]
    fn non_ascii_is_replaced() {
        let mut d = [0u8; 4];
        put_ascii(&mut d, "é1");
        assert!(d.iter().all(|c| (0x20..=0x7E).contains(c)));
    }

    #[test]
    fn absent_lun_qualifier() {
        let b = standard_absent();
        assert_eq!(b[0], 0x7F);
        assert_eq!(b[4] as usize, b.len() - 5);
    }
}
