//! Vital product data pages (SPC-4 §7.8, SBC-3 §6.5).
//!
//! Supported pages: 00h supported pages, 80h unit serial number, 83h device identification,
//! 86h extended INQUIRY data, B0h block limits, B1h block device characteristics and B2h
//! logical block provisioning. The values come from [`VpdParams`]; this module only lays
//! them out.

use super::inquiry::put_ascii;

/// Pages returned by VPD page 00h, ascending.
pub const SUPPORTED_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2];

/// iSCSI PROTOCOL IDENTIFIER (SPC-4 Table 362).
pub const PROTOCOL_ISCSI: u8 = 0x5;

/// Block limits reported in VPD page B0h, in logical blocks unless stated otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// MAXIMUM COMPARE AND WRITE LENGTH.
    pub max_compare_and_write: u8,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY.
    pub optimal_granularity: u16,
    /// MAXIMUM TRANSFER LENGTH.
    pub max_transfer: u32,
    /// OPTIMAL TRANSFER LENGTH (0: not reported).
    pub optimal_transfer: u32,
    /// MAXIMUM UNMAP LBA COUNT (0 when UNMAP is not supported).
    pub max_unmap_lbas: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (0 when UNMAP is not supported).
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY.
    pub unmap_granularity: u32,
    /// MAXIMUM WRITE SAME LENGTH.
    pub max_write_same: u64,
}

/// Logical block provisioning as the backend really does it (VPD B2h, READ CAPACITY(16)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provisioning {
    /// Thin provisioned: UNMAP and WRITE SAME with UNMAP deallocate (LBPME, LBPU, LBPWS,
    /// LBPWS10).
    pub thin: bool,
    /// Deallocated blocks read as zeroes (LBPRZ).
    pub zeroes: bool,
}

/// Everything the VPD pages report.
#[derive(Debug, Clone, Copy)]
pub struct VpdParams<'a> {
    /// UNIT SERIAL NUMBER (page 80h).
    pub serial: &'a str,
    /// T10 vendor identification (T10 designator).
    pub vendor: &'a str,
    /// The 16-byte NAA IEEE Registered Extended designator.
    pub naa: [u8; 16],
    /// Target port name (`<iqn>,t,0x<tpgt>`) of the nexus asking.
    pub target_port: &'a str,
    /// Relative target port identifier of that port.
    pub relative_port: u16,
    /// Target port group of that port.
    pub port_group: u16,
    /// Block limits.
    pub limits: BlockLimits,
    /// Provisioning.
    pub provisioning: Provisioning,
}

/// The NAA-6 (IEEE Registered Extended, SPC-4 §7.8.6.6.4) designator: the low 60 bits of
/// `naa_id` fill IEEE COMPANY_ID and VENDOR SPECIFIC IDENTIFIER after the NAA nibble, and
/// the VENDOR SPECIFIC IDENTIFIER EXTENSION is a 64-bit FNV-1a hash of the serial number, so
/// two logical units differ whenever either differs.
pub fn naa6(naa_id: u64, serial: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let head = (0x6u64 << 60) | (naa_id & ((1u64 << 60) - 1));
    out[..8].copy_from_slice(&head.to_be_bytes());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serial.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    out[8..].copy_from_slice(&h.to_be_bytes());
    out
}

fn page(code: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.push(0x00); // peripheral qualifier 000b, direct access
    out.push(code);
    // Every page here is far below 64 KiB.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn designator(
    out: &mut Vec<u8>,
    code_set: u8,
    piv_proto: Option<u8>,
    assoc: u8,
    kind: u8,
    d: &[u8],
) {
    let proto = piv_proto.unwrap_or(0);
    out.push((proto << 4) | code_set);
    out.push(if piv_proto.is_some() { 0x80 } else { 0 } | (assoc << 4) | kind);
    out.push(0);
    // Designators are bounded by the 255-byte DESIGNATOR LENGTH; longer names are cut.
    let len = d.len().min(252);
    out.push(len as u8);
    out.extend_from_slice(&d[..len]);
}

/// A SCSI name string designator body: the UTF-8 name, NUL terminated, padded to a
/// multiple of four (SPC-4 §7.8.6.11).
fn name_string(name: &str) -> Vec<u8> {
    let mut v: Vec<u8> = name.bytes().take(250).collect();
    v.push(0);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

/// Page 83h: device identification.
fn device_identification(p: &VpdParams<'_>) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    // Logical unit: NAA (binary).
    designator(&mut b, 0x1, None, 0, 0x3, &p.naa);
    // Logical unit: T10 vendor ID based, vendor + serial (ASCII).
    let mut t10 = [b' '; 8].to_vec();
    put_ascii(&mut t10, p.vendor);
    t10.extend(
        p.serial
            .bytes()
            .filter(|c| (0x20..=0x7E).contains(c))
            .take(240),
    );
    designator(&mut b, 0x2, None, 0, 0x1, &t10);
    // Target port: relative target port, target port group, SCSI name string.
    designator(
        &mut b,
        0x1,
        Some(PROTOCOL_ISCSI),
        1,
        0x4,
        &[0, 0, (p.relative_port >> 8) as u8, p.relative_port as u8],
    );
    designator(
        &mut b,
        0x1,
        Some(PROTOCOL_ISCSI),
        1,
        0x5,
        &[0, 0, (p.port_group >> 8) as u8, p.port_group as u8],
    );
    designator(
        &mut b,
        0x3,
        Some(PROTOCOL_ISCSI),
        1,
        0x8,
        &name_string(p.target_port),
    );
    // Target device: SCSI name string (the target iqn without the ",t,0x..." suffix).
    let target_name = p.target_port.split(",t,").next().unwrap_or(p.target_port);
    designator(
        &mut b,
        0x3,
        Some(PROTOCOL_ISCSI),
        2,
        0x8,
        &name_string(target_name),
    );
    page(0x83, &b)
}

fn block_limits(l: &BlockLimits) -> Vec<u8> {
    let mut b = [0u8; 0x3C];
    // Offsets below are page offsets minus the 4-byte header.
    b[0] = 0; // WSNZ = 0: a zero NUMBER OF LOGICAL BLOCKS means "to the end"
    b[1] = l.max_compare_and_write;
    b[2..4].copy_from_slice(&l.optimal_granularity.to_be_bytes());
    b[4..8].copy_from_slice(&l.max_transfer.to_be_bytes());
    b[8..12].copy_from_slice(&l.optimal_transfer.to_be_bytes());
    // MAXIMUM PREFETCH LENGTH 0: no limit reported.
    b[16..20].copy_from_slice(&l.max_unmap_lbas.to_be_bytes());
    b[20..24].copy_from_slice(&l.max_unmap_descriptors.to_be_bytes());
    b[24..28].copy_from_slice(&l.unmap_granularity.to_be_bytes());
    if l.max_unmap_lbas != 0 {
        // UGAVALID, UNMAP GRANULARITY ALIGNMENT = 0.
        b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes());
    }
    b[32..40].copy_from_slice(&l.max_write_same.to_be_bytes());
    page(0xB0, &b)
}

fn provisioning(p: &Provisioning) -> Vec<u8> {
    let mut b = [0u8; 4];
    b[0] = 0; // THRESHOLD EXPONENT: no thresholds
    if p.thin {
        b[1] |= 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
    }
    if p.zeroes {
        b[1] |= 0x04; // LBPRZ
    }
    // ANC_SUP = 0, DP = 0. PROVISIONING TYPE: 010b thin, 000b full.
    b[2] = if p.thin { 0x02 } else { 0x00 };
    page(0xB2, &b)
}

/// Encode VPD page `code`, or `None` if it is not supported.
pub fn encode(code: u8, p: &VpdParams<'_>) -> Option<Vec<u8>> {
    Some(match code {
        0x00 => page(0x00, &SUPPORTED_PAGES),
        0x80 => {
            let s: Vec<u8> = p
                .serial
                .bytes()
                .filter(|c| (0x20..=0x7E).contains(c))
                .take(252)
                .collect();
            page(0x80, &s)
        }
        0x83 => device_identification(p),
        0x86 => {
            // Extended INQUIRY data: SIMPSUP only (task attributes are the transport's).
            let mut b = [0u8; 0x3C];
            b[1] = 0x01;
            page(0x86, &b)
        }
        0xB0 => block_limits(&p.limits),
        0xB1 => {
            let mut b = [0u8; 0x3C];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // MEDIUM ROTATION RATE: non-rotating
            page(0xB1, &b)
        }
        0xB2 => provisioning(&p.provisioning),
        _ => return None,
    })
}

/// VPD page 00h for a LUN with no logical unit (peripheral qualifier 011b).
pub fn supported_absent() -> Vec<u8> {
    vec![0x7F, 0x00, 0x00, 0x01, 0x00]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> VpdParams<'static> {
        VpdParams {
            serial: "SN-0001",
            vendor: "TESSERA",
            naa: naa6(0x0123_4567_89AB_CDEF, "SN-0001"),
            target_port: "iqn.2024-01.io.tessera:vol1,t,0x1",
            relative_port: 3,
            port_group: 2,
            limits: BlockLimits {
                max_compare_and_write: 255,
                optimal_granularity: 8,
                max_transfer: 32768,
                optimal_transfer: 0,
                max_unmap_lbas: 1 << 20,
                max_unmap_descriptors: 1024,
                unmap_granularity: 8,
                max_write_same: 65536,
            },
            provisioning: Provisioning {
                thin: true,
                zeroes: true,
            },
        }
    }

    #[test]
    fn every_supported_page_encodes_with_consistent_length() {
        for code in SUPPORTED_PAGES {
            let b = encode(code, &params()).unwrap();
            assert_eq!(b[1], code);
            assert_eq!(u16::from_be_bytes([b[2], b[3]]) as usize, b.len() - 4);
        }
        assert!(encode(0x81, &params()).is_none());
    }

    #[test]
    fn naa6_layout() {
        let n = naa6(0xF123_4567_89AB_CDEF, "x");
        assert_eq!(n[0] >> 4, 6);
        assert_eq!(n[0] & 0x0F, 0x1);
        assert_ne!(naa6(1, "a")[8..], naa6(1, "b")[8..]);
    }

    #[test]
    fn device_identification_designators() {
        let b = encode(0x83, &params()).unwrap();
        let mut at = 4;
        let mut kinds = vec![];
        while at < b.len() {
            let (assoc, kind, len) = ((b[at + 1] >> 4) & 3, b[at + 1] & 0x0F, b[at + 3] as usize);
            kinds.push((assoc, kind));
            if kind == 4 {
                assert_eq!(&b[at + 4..at + 8], &[0, 0, 0, 3]);
            }
            if kind == 5 {
                assert_eq!(&b[at + 4..at + 8], &[0, 0, 0, 2]);
            }
            if kind == 8 {
                assert_eq!(len % 4, 0);
                assert_eq!(b[at] & 0x0F, 3);
                assert_eq!(b[at] >> 4, PROTOCOL_ISCSI);
                assert_eq!(b[at + 1] & 0x80, 0x80);
            }
            at += 4 + len;
        }
        assert_eq!(at, b.len());
        assert_eq!(kinds, vec![(0, 3), (0, 1), (1, 4), (1, 5), (1, 8), (2, 8)]);
    }

    #[test]
    fn block_limits_fields() {
        let b = encode(0xB0, &params()).unwrap();
        assert_eq!(b[3], 0x3C);
        assert_eq!(b[5], 255);
        assert_eq!(u32::from_be_bytes([b[8], b[9], b[10], b[11]]), 32768);
        assert_eq!(u32::from_be_bytes([b[20], b[21], b[22], b[23]]), 1 << 20);
        assert_eq!(u32::from_be_bytes([b[24], b[25], b[26], b[27]]), 1024);
        assert_eq!(b[32] & 0x80, 0x80);
        assert_eq!(u64::from_be_bytes(b[36..44].try_into().unwrap()), 65536);
    }

    #[test]
    fn provisioning_bits() {
        let b = encode(0xB2, &params()).unwrap();
        assert_eq!(b[5], 0xE4);
        assert_eq!(b[6], 0x02);
        let mut p = params();
        p.provisioning = Provisioning {
            thin: false,
            zeroes: true,
        };
        let b = encode(0xB2, &p).unwrap();
        assert_eq!(b[5], 0x04);
        assert_eq!(b[6], 0x00);
    }
}
