//! READ CAPACITY(10) and READ CAPACITY(16) parameter data (SBC-3 §5.15–5.16).

/// Capacity facts of a logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks (last LBA + 1).
    pub blocks: u64,
    /// Logical block length in bytes.
    pub block_size: u32,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
    pub lbppbe: u8,
    /// LBPME: logical block provisioning management enabled (thin).
    pub lbpme: bool,
    /// LBPRZ: deallocated blocks read as zeroes.
    pub lbprz: bool,
}

/// READ CAPACITY(10) data: the last LBA (FFFFFFFFh when it does not fit) and block length.
pub fn read_capacity10(c: &Capacity) -> [u8; 8] {
    let last = c.blocks.saturating_sub(1);
    let last = u32::try_from(last).unwrap_or(u32::MAX);
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&last.to_be_bytes());
    b[4..].copy_from_slice(&c.block_size.to_be_bytes());
    b
}

/// READ CAPACITY(16) data (32 bytes, untruncated).
pub fn read_capacity16(c: &Capacity) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&c.blocks.saturating_sub(1).to_be_bytes());
    b[8..12].copy_from_slice(&c.block_size.to_be_bytes());
    // Byte 12: P_TYPE / PROT_EN = 0 (no protection information).
    b[13] = c.lbppbe & 0x0F;
    let mut w = 0u16; // LOWEST ALIGNED LOGICAL BLOCK ADDRESS = 0
    if c.lbpme {
        w |= 0x8000;
    }
    if c.lbprz {
        w |= 0x4000;
    }
    b[14..16].copy_from_slice(&w.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let c = Capacity {
            blocks: 2048,
            block_size: 512,
            lbppbe: 3,
            lbpme: true,
            lbprz: true,
        };
        assert_eq!(read_capacity10(&c), [0, 0, 0x07, 0xFF, 0, 0, 2, 0]);
        let b = read_capacity16(&c);
        assert_eq!(&b[..8], &2047u64.to_be_bytes());
        assert_eq!(b[13], 3);
        assert_eq!(&b[14..16], &[0xC0, 0]);
        let big = Capacity {
            blocks: 1 << 33,
            ..c
        };
        assert_eq!(&read_capacity10(&big)[..4], &[0xFF; 4]);
    }
}
