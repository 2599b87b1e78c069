//! LUN addressing and REPORT LUNS data (SAM-5 §4.6, SPC-4 §6.33).
//!
//! tessera uses single-level LUNs: peripheral device addressing (00b) for LUNs below 256
//! and flat space addressing (01b) for 256..=16383.

/// The highest LUN number flat space addressing can express.
pub const MAX_LUN: u64 = 0x3FFF;

/// Decode an 8-byte LUN field into a LUN number; `None` for anything that is not a
/// single-level peripheral or flat-space LUN.
pub fn decode(raw: [u8; 8]) -> Option<u64> {
    if raw[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match raw[0] >> 6 {
        // Peripheral device addressing; a non-zero BUS IDENTIFIER is a multi-level LUN.
        0b00 if raw[0] == 0 => Some(u64::from(raw[1])),
        0b01 => Some((u64::from(raw[0] & 0x3F) << 8) | u64::from(raw[1])),
        _ => None,
    }
}

/// Encode a LUN number (at most [`MAX_LUN`]).
pub fn encode(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        let lun = lun.min(MAX_LUN);
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    }
    b
}

/// REPORT LUNS parameter data listing `luns`, untruncated.
pub fn report_luns(luns: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 8 * luns.len());
    let len = u32::try_from(8 * luns.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for &l in luns {
        out.extend_from_slice(&encode(l));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for lun in [0, 1, 255, 256, 1000, MAX_LUN] {
            assert_eq!(decode(encode(lun)), Some(lun), "{lun}");
        }
        assert_eq!(encode(5), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode(256), [0x41, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_other_formats() {
        assert_eq!(decode([0x01, 0, 0, 0, 0, 0, 0, 0]), None); // bus identifier
        assert_eq!(decode([0x80, 0, 0, 0, 0, 0, 0, 0]), None); // logical unit addressing
        assert_eq!(decode([0xC0, 0, 0, 0, 0, 0, 0, 0]), None); // extended
        assert_eq!(decode([0, 1, 0, 1, 0, 0, 0, 0]), None); // second level
    }

    #[test]
    fn report_layout() {
        let d = report_luns(&[0, 300]);
        assert_eq!(&d[..4], &16u32.to_be_bytes());
        assert_eq!(&d[8..10], &[0, 0]);
        assert_eq!(&d[16..18], &[0x41, 0x2C]);
    }
}
