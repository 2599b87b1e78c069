//! Serial number arithmetic for 32-bit sequence numbers (RFC 1982, as RFC 7143 §4.2.2.1
//! requires for CmdSN, StatSN, DataSN, R2TSN). Comparisons always go through here, never raw `<`.

/// `a < b` in serial arithmetic.
pub fn lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// `a <= b` in serial arithmetic.
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// `a` lies in the window `[lo, hi]` (inclusive, serial arithmetic).
pub fn in_window(a: u32, lo: u32, hi: u32) -> bool {
    le(lo, a) && le(a, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        assert!(lt(1, 2));
        assert!(!lt(2, 1));
        assert!(!lt(5, 5));
        assert!(le(5, 5));
        assert!(lt(u32::MAX, 0));
        assert!(lt(u32::MAX - 10, 5));
        assert!(!lt(5, u32::MAX - 10));
        assert!(in_window(0, u32::MAX - 1, 3));
        assert!(!in_window(4, u32::MAX - 1, 3));
        // An empty window (MaxCmdSN = ExpCmdSN - 1) holds nothing.
        assert!(!in_window(10, 10, 9));
    }
}
