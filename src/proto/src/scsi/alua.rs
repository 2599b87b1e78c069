//! REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.36).

/// ASYMMETRIC ACCESS STATE values (SPC-4 Table 199).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessState {
    /// 0h: active/optimized.
    ActiveOptimized,
    /// 1h: active/non-optimized.
    ActiveNonOptimized,
    /// 2h: standby.
    Standby,
    /// 3h: unavailable.
    Unavailable,
    /// Fh: transitioning between states.
    Transitioning,
}

impl AccessState {
    fn code(self) -> u8 {
        match self {
            Self::ActiveOptimized => 0x0,
            Self::ActiveNonOptimized => 0x1,
            Self::Standby => 0x2,
            Self::Unavailable => 0x3,
            Self::Transitioning => 0xF,
        }
    }
}

/// One target port group and the relative identifiers of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    /// TARGET PORT GROUP.
    pub id: u16,
    /// Its asymmetric access state.
    pub state: AccessState,
    /// PREF: preferred group.
    pub preferred: bool,
    /// RELATIVE TARGET PORT IDENTIFIERs.
    pub ports: Vec<u16>,
}

/// Seconds an implicit transition may take (extended header IMPLICIT TRANSITION TIME).
pub const IMPLICIT_TRANSITION_TIME_S: u8 = 10;

/// REPORT TARGET PORT GROUPS data, untruncated; `extended` selects the 8-byte header
/// (PARAMETER DATA FORMAT 001b).
pub fn report(groups: &[PortGroup], extended: bool) -> Vec<u8> {
    let header = if extended { 8 } else { 4 };
    let mut out = vec![0u8; header];
    for g in groups {
        out.push(if g.preferred { 0x80 } else { 0 } | g.state.code());
        // Supported states: active/optimized, active/non-optimized, transitioning (T_SUP).
        out.push(0x80 | 0x02 | 0x01);
        out.extend_from_slice(&g.id.to_be_bytes());
        out.push(0);
        out.push(0); // STATUS CODE: no status available
        out.push(0);
        out.push(u8::try_from(g.ports.len()).unwrap_or(u8::MAX));
        for p in g.ports.iter().take(255) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    if extended {
        out[4] = 0x10; // FORMAT TYPE = 001b
        out[5] = IMPLICIT_TRANSITION_TIME_S;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_layout() {
        let g = PortGroup {
            id: 1,
            state: AccessState::ActiveOptimized,
            preferred: true,
            ports: vec![1, 2],
        };
        let d = report(std::slice::from_ref(&g), false);
        assert_eq!(d.len(), 4 + 8 + 8);
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
            d.len() - 4
        );
        assert_eq!(d[4], 0x80);
        assert_eq!(&d[6..8], &[0, 1]);
        assert_eq!(d[11], 2);
        assert_eq!(&d[12..16], &[0, 0, 0, 1]);
        let d = report(&[g], true);
        assert_eq!(d[4], 0x10);
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
            d.len() - 4
        );
    }
}
