//! Logical block provisioning parameter data: the UNMAP parameter list (SBC-3 §5.28.2) and
//! GET LBA STATUS data (SBC-3 §5.7.2).

use super::cdb::{be16, be32, be64};
use super::sense::Sense;

/// One UNMAP block descriptor: `blocks` logical blocks starting at `lba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapDescriptor {
    /// UNMAP LOGICAL BLOCK ADDRESS.
    pub lba: u64,
    /// NUMBER OF LOGICAL BLOCKS.
    pub blocks: u32,
}

/// Limits the UNMAP parameter list is checked against.
#[derive(Debug, Clone, Copy)]
pub struct UnmapLimits {
    /// Capacity in logical blocks.
    pub capacity: u64,
    /// MAXIMUM UNMAP LBA COUNT (total over all descriptors).
    pub max_lbas: u64,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_descriptors: usize,
}

/// Decode and validate an UNMAP parameter list of `param_len` bytes (from the CDB) found in
/// `data` (the Data-Out). A trailing partial block descriptor is ignored. Every descriptor
/// is checked before anything is unmapped.
pub fn parse_unmap(
    data: &[u8],
    param_len: usize,
    lim: &UnmapLimits,
) -> Result<Vec<UnmapDescriptor>, Sense> {
    if param_len == 0 {
        return Ok(Vec::new());
    }
    if param_len < 8 || data.len() < param_len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let data = &data[..param_len];
    let data_len = usize::from(be16(data, 0));
    let bd_len = usize::from(be16(data, 2));
    // UNMAP DATA LENGTH counts the bytes after itself; it may not exceed the list.
    if data_len + 2 > param_len {
        return Err(Sense::invalid_param(0, None));
    }
    if bd_len + 8 > param_len {
        return Err(Sense::invalid_param(2, None));
    }
    let count = bd_len / 16;
    if count > lim.max_descriptors {
        return Err(Sense::invalid_param(2, None));
    }
    let mut out = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for i in 0..count {
        let at = 8 + 16 * i;
        let d = UnmapDescriptor {
            lba: be64(data, at),
            blocks: be32(data, at + 8),
        };
        let end = d.lba.checked_add(u64::from(d.blocks));
        if end.is_none_or(|e| e > lim.capacity) {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        total = total.saturating_add(u64::from(d.blocks));
        if total > lim.max_lbas {
            return Err(Sense::invalid_param((at + 8) as u16, None));
        }
        out.push(d);
    }
    Ok(out)
}

/// PROVISIONING STATUS values (SBC-3 Table 41).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbaState {
    /// 0h: mapped (or unknown).
    Mapped,
    /// 1h: deallocated.
    Deallocated,
}

/// One LBA status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaStatus {
    /// First LBA of the extent.
    pub lba: u64,
    /// Number of blocks in the extent.
    pub blocks: u32,
    /// Provisioning status.
    pub state: LbaState,
}

/// Encode an UNMAP parameter list of (LBA, block count) descriptors, as an initiator sends it
/// and [`parse_unmap`] reads it (for tests and tools).
pub fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    let n = 8 + 16 * descs.len();
    v[0..2].copy_from_slice(&((n - 2) as u16).to_be_bytes());
    v[2..4].copy_from_slice(&((n - 8) as u16).to_be_bytes());
    for (lba, blocks) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&blocks.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

/// GET LBA STATUS parameter data, untruncated.
pub fn lba_status(descs: &[LbaStatus]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 16 * descs.len());
    let len = u32::try_from(4 + 16 * descs.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for d in descs {
        out.extend_from_slice(&d.lba.to_be_bytes());
        out.extend_from_slice(&d.blocks.to_be_bytes());
        out.push(match d.state {
            LbaState::Mapped => 0,
            LbaState::Deallocated => 1,
        });
        out.extend_from_slice(&[0; 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: UnmapLimits = UnmapLimits {
        capacity: 1000,
        max_lbas: 500,
        max_descriptors: 4,
    };

    #[test]
    fn parses_descriptors() {
        let d = unmap_list(&[(0, 10), (999, 1), (1000, 0)]);
        let got = parse_unmap(&d, d.len(), &LIM).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[1],
            UnmapDescriptor {
                lba: 999,
                blocks: 1
            }
        );
        assert!(parse_unmap(&unmap_list(&[]), 8, &LIM).unwrap().is_empty());
        assert!(parse_unmap(&[], 0, &LIM).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_lists() {
        assert_eq!(
            parse_unmap(&[0; 4], 4, &LIM).unwrap_err(),
            Sense::PARAMETER_LIST_LENGTH_ERROR
        );
        let d = unmap_list(&[(995, 10)]);
        assert_eq!(
            parse_unmap(&d, d.len(), &LIM).unwrap_err(),
            Sense::LBA_OUT_OF_RANGE
        );
        let d = unmap_list(&[(0, 300), (300, 300)]);
        assert_eq!(
            parse_unmap(&d, d.len(), &LIM).unwrap_err(),
            Sense::invalid_param(32, None)
        );
        let d = unmap_list(&[(0, 1); 5]);
        assert_eq!(
            parse_unmap(&d, d.len(), &LIM).unwrap_err(),
            Sense::invalid_param(2, None)
        );
        let mut d = unmap_list(&[(0, 1)]);
        d[3] = 0x40;
        assert_eq!(
            parse_unmap(&d, d.len(), &LIM).unwrap_err(),
            Sense::invalid_param(2, None)
        );
        let d = unmap_list(&[(u64::MAX, 2)]);
        assert_eq!(
            parse_unmap(&d, d.len(), &LIM).unwrap_err(),
            Sense::LBA_OUT_OF_RANGE
        );
        let d = unmap_list(&[(0, 1)]);
        assert_eq!(
            parse_unmap(&d[..20], d.len(), &LIM).unwrap_err(),
            Sense::PARAMETER_LIST_LENGTH_ERROR
        );
    }

    #[test]
    fn lba_status_layout() {
        let b = lba_status(&[
            LbaStatus {
                lba: 5,
                blocks: 3,
                state: LbaState::Mapped,
            },
            LbaStatus {
                lba: 8,
                blocks: 9,
                state: LbaState::Deallocated,
            },
        ]);
        assert_eq!(b.len(), 40);
        assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]), 36);
        assert_eq!(&b[8..16], &5u64.to_be_bytes());
        assert_eq!(b[20], 0);
        assert_eq!(b[36], 1);
    }
}
