//! Mode parameters: MODE SENSE data and MODE SELECT validation (SPC-4 §7.5, SBC-3 §6.4).
//!
//! Pages: caching (08h, WCE changeable), control (0Ah, D_SENSE and SWP changeable), control
//! extension (0Ah/01h) and informational exceptions control (1Ch). Page control values:
//! current, changeable and default; tessera does not save mode parameters (pages report
//! PS = 0), so saved values are reported as not supported (SAVING PARAMETERS NOT SUPPORTED,
//! SPC-4 §6.11). MODE SELECT accepts a page only if every byte that differs from the
//! current value is changeable.

use super::cdb::{be16, ModeSelect, ModeSense};
use super::sense::Sense;

/// The changeable mode parameters (their current values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeParams {
    /// Caching page WCE: writes may be cached until SYNCHRONIZE CACHE (or FUA).
    pub wce: bool,
    /// Control page D_SENSE: report descriptor-format sense data.
    pub d_sense: bool,
    /// Control page SWP: software write protect.
    pub swp: bool,
}

impl Default for ModeParams {
    fn default() -> Self {
        Self {
            wce: true,
            d_sense: false,
            swp: false,
        }
    }
}

/// Logical unit facts that appear in the mode parameter header and block descriptor.
#[derive(Debug, Clone, Copy)]
pub struct ModeContext {
    /// WP bit of the DEVICE-SPECIFIC PARAMETER (read-only LU or SWP).
    pub write_protected: bool,
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Logical block length in bytes.
    pub block_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// (page, subpage) in the order they appear in "all pages".
const PAGES: [(u8, u8); 4] = [(0x08, 0x00), (0x0A, 0x00), (0x0A, 0x01), (0x1C, 0x00)];

/// A page_0 format mode page (SPC-4 §7.5.7): PAGE CODE, PAGE LENGTH `len`, and `len` bytes of
/// zeros for the caller to fill.
fn page_0_format(code: u8, len: u8) -> Vec<u8> {
    let mut b = vec![0u8; 2 + usize::from(len)];
    b[0] = code;
    b[1] = len;
    b
}

fn page_bytes(page: u8, subpage: u8, pc: Pc, p: &ModeParams) -> Option<Vec<u8>> {
    let v = match pc {
        Pc::Current => *p,
        Pc::Default => ModeParams::default(),
        Pc::Changeable => ModeParams {
            wce: true,
            d_sense: true,
            swp: true,
        },
    };
    let changeable = pc == Pc::Changeable;
    Some(match (page, subpage) {
        (0x08, 0x00) => {
            // Caching (SBC-3 §6.4.5), page length 12h.
            let mut b = page_0_format(0x08, 0x12);
            if v.wce {
                b[2] |= 0x04;
            }
            b
        }
        (0x0A, 0x00) => {
            // Control (SPC-4 §7.5.8), page length 0Ah.
            let mut b = page_0_format(0x0A, 0x0A);
            if v.d_sense {
                b[2] |= 0x04;
            }
            if v.swp {
                b[4] |= 0x08;
            }
            if !changeable {
                b[2] |= 0x02; // GLTSD: no log parameters are saved
                b[3] = 0x10; // QUEUE ALGORITHM MODIFIER = 1: unrestricted reordering
                             // BUSY TIMEOUT PERIOD: 10 s (units of 100 ms): the longest BUSY we return
                             // while volume ownership moves.
                b[8..10].copy_from_slice(&100u16.to_be_bytes());
            }
            b
        }
        (0x0A, 0x01) => {
            // Control extension (SPC-4 §7.5.9), SPF = 1, page length 1Ch. Nothing changeable.
            let mut b = vec![0u8; 32];
            b[0] = 0x40 | 0x0A;
            b[1] = 0x01;
            b[2..4].copy_from_slice(&0x1Cu16.to_be_bytes());
            b
        }
        (0x1C, 0x00) => {
            // Informational exceptions control (SPC-4 §7.5.14): exceptions disabled.
            let mut b = page_0_format(0x1C, 0x0A);
            if !changeable {
                b[2] = 0x08; // DEXCPT
            }
            b
        }
        _ => return None,
    })
}

/// MODE SENSE(6/10) parameter data, untruncated (the caller applies the allocation length).
pub fn sense(req: &ModeSense, p: &ModeParams, ctx: &ModeContext) -> Result<Vec<u8>, Sense> {
    let pc = match req.pc {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED.cdb_field(2, Some(7))),
    };
    let selected: Vec<(u8, u8)> = match (req.page, req.subpage) {
        (0x3F, 0x00) => PAGES.iter().copied().filter(|(_, s)| *s == 0).collect(),
        (0x3F, 0xFF) => PAGES.to_vec(),
        (0x3F, _) => return Err(Sense::invalid_cdb(3, None)),
        (page, 0xFF) => PAGES
            .iter()
            .copied()
            .filter(|(pg, _)| *pg == page)
            .collect(),
        (page, sub) => PAGES
            .iter()
            .copied()
            .filter(|e| *e == (page, sub))
            .collect(),
    };
    if selected.is_empty() {
        let known_page = PAGES.iter().any(|(pg, _)| *pg == req.page);
        return Err(if known_page {
            Sense::invalid_cdb(3, None)
        } else {
            Sense::invalid_cdb(2, Some(5))
        });
    }

    let header_len = if req.ten { 8 } else { 4 };
    let long = req.ten && req.llbaa;
    let bd_len = match (req.dbd, long) {
        (true, _) => 0,
        (false, true) => 16,
        (false, false) => 8,
    };
    let mut out = vec![0u8; header_len];
    let dsp = 0x10 | if ctx.write_protected { 0x80 } else { 0 }; // DPOFUA, WP
    if bd_len == 16 {
        out.extend_from_slice(&ctx.blocks.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&ctx.block_size.to_be_bytes());
    } else if bd_len == 8 {
        let blocks = u32::try_from(ctx.blocks).unwrap_or(u32::MAX);
        out.extend_from_slice(&blocks.to_be_bytes());
        out.push(0); // DENSITY CODE
        out.extend_from_slice(&ctx.block_size.to_be_bytes()[1..]);
    }
    for (page, sub) in selected {
        if let Some(b) = page_bytes(page, sub, pc, p) {
            out.extend_from_slice(&b);
        }
    }
    if req.ten {
        let len = u16::try_from(out.len() - 2).unwrap_or(u16::MAX);
        out[0..2].copy_from_slice(&len.to_be_bytes());
        out[3] = dsp;
        out[4] = u8::from(long);
        out[6..8].copy_from_slice(&(bd_len as u16).to_be_bytes());
    } else {
        // The largest 6-byte reply (header, descriptor, all pages) is far below 256.
        out[0] = (out.len() - 1) as u8;
        out[2] = dsp;
        out[3] = bd_len as u8;
    }
    Ok(out)
}

/// Validate a MODE SELECT parameter list against the current values and the changeable
/// masks, returning the new parameters. `data` is the parameter list (`param_len` bytes).
pub fn select(
    req: &ModeSelect,
    data: &[u8],
    cur: &ModeParams,
    ctx: &ModeContext,
) -> Result<ModeParams, Sense> {
    if req.sp {
        return Err(Sense::invalid_cdb(1, Some(0)));
    }
    let len = usize::from(req.param_len);
    if len == 0 {
        return Ok(*cur);
    }
    if !req.pf {
        return Err(Sense::invalid_cdb(1, Some(4)));
    }
    if data.len() < len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let data = &data[..len];
    let header_len = if req.ten { 8 } else { 4 };
    if len < header_len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let (bd_len, long) = if req.ten {
        (usize::from(be16(data, 6)), data[4] & 0x01 != 0)
    } else {
        (usize::from(data[3]), false)
    };
    let bd_field = if req.ten { 6 } else { 3 };
    let desc_len = if long { 16 } else { 8 };
    if !bd_len.is_multiple_of(desc_len) || bd_len > desc_len {
        return Err(Sense::invalid_param(bd_field, None));
    }
    if header_len + bd_len > len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if bd_len > 0 {
        // The block length cannot be changed.
        let d = &data[header_len..header_len + bd_len];
        let bl = if long {
            u32::from_be_bytes([d[12], d[13], d[14], d[15]])
        } else {
            u32::from_be_bytes([0, d[5], d[6], d[7]])
        };
        if bl != ctx.block_size {
            let at = header_len + if long { 12 } else { 5 };
            return Err(Sense::invalid_param(at as u16, None));
        }
    }

    let mut new = *cur;
    let mut at = header_len + bd_len;
    while at < len {
        if len - at < 2 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if data[at] & 0x80 != 0 {
            return Err(Sense::invalid_param(at as u16, Some(7))); // PS is reserved here
        }
        let spf = data[at] & 0x40 != 0;
        let page = data[at] & 0x3F;
        let (sub, body_len, hdr) = if spf {
            if len - at < 4 {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            (data[at + 1], usize::from(be16(data, at + 2)), 4)
        } else {
            (0, usize::from(data[at + 1]), 2)
        };
        let total = hdr + body_len;
        if len - at < total {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let Some(current) = page_bytes(page, sub, Pc::Current, &new) else {
            return Err(Sense::invalid_param(at as u16, Some(5)));
        };
        if current.len() != total {
            return Err(Sense::invalid_param((at + hdr - 1) as u16, None));
        }
        let mask = page_bytes(page, sub, Pc::Changeable, &new).unwrap_or_default();
        let given = &data[at..at + total];
        for i in hdr..total {
            let diff = (given[i] ^ current[i]) & !mask[i];
            if diff != 0 {
                let bit = 7 - diff.leading_zeros() as u8;
                return Err(Sense::invalid_param((at + i) as u16, Some(bit)));
            }
        }
        match (page, sub) {
            (0x08, 0x00) => new.wce = given[2] & 0x04 != 0,
            (0x0A, 0x00) => {
                new.d_sense = given[2] & 0x04 != 0;
                new.swp = given[4] & 0x08 != 0;
            }
            _ => {}
        }
        at += total;
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ModeContext {
        ModeContext {
            write_protected: false,
            blocks: 2048,
            block_size: 512,
        }
    }

    fn ms(ten: bool, dbd: bool, pc: u8, page: u8, subpage: u8) -> ModeSense {
        ModeSense {
            ten,
            dbd,
            llbaa: false,
            pc,
            page,
            subpage,
            alloc_len: 255,
        }
    }

    #[test]
    fn all_pages_six() {
        let d = sense(
            &ms(false, false, 0, 0x3F, 0),
            &ModeParams::default(),
            &ctx(),
        )
        .unwrap();
        assert_eq!(d[0] as usize, d.len() - 1);
        assert_eq!(d[2], 0x10); // DPOFUA
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &2048u32.to_be_bytes());
        assert_eq!(&d[9..12], &[0, 2, 0]);
        // caching, control, IEC
        assert_eq!(d[12], 0x08);
        assert_eq!(d[12 + 20], 0x0A);
        assert_eq!(d[12 + 20 + 12], 0x1C);
        assert_eq!(d.len(), 12 + 20 + 12 + 12);
        let all = sense(
            &ms(false, true, 0, 0x3F, 0xFF),
            &ModeParams::default(),
            &ctx(),
        )
        .unwrap();
        assert_eq!(all.len(), 4 + 20 + 12 + 32 + 12);
    }

    #[test]
    fn ten_byte_header_and_long_descriptor() {
        let mut r = ms(true, false, 0, 0x0A, 0);
        r.llbaa = true;
        let d = sense(&r, &ModeParams::default(), &ctx()).unwrap();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        assert_eq!(d[4], 1);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
        assert_eq!(&d[8..16], &2048u64.to_be_bytes());
        assert_eq!(d[24], 0x0A);
    }

    #[test]
    fn changeable_and_errors() {
        let d = sense(&ms(false, true, 1, 0x0A, 0), &ModeParams::default(), &ctx()).unwrap();
        assert_eq!(d[4 + 2], 0x04);
        assert_eq!(d[4 + 4], 0x08);
        let e = sense(&ms(false, true, 3, 0x0A, 0), &ModeParams::default(), &ctx()).unwrap_err();
        assert_eq!((e.asc, e.ascq), (0x39, 0));
        let e = sense(&ms(false, true, 0, 0x19, 0), &ModeParams::default(), &ctx()).unwrap_err();
        assert_eq!(e, Sense::invalid_cdb(2, Some(5)));
        let e = sense(&ms(false, true, 0, 0x0A, 5), &ModeParams::default(), &ctx()).unwrap_err();
        assert_eq!(e, Sense::invalid_cdb(3, None));
    }

    fn select6(data: &[u8]) -> Result<ModeParams, Sense> {
        let req = ModeSelect {
            ten: false,
            pf: true,
            sp: false,
            param_len: data.len() as u16,
        };
        select(&req, data, &ModeParams::default(), &ctx())
    }

    #[test]
    fn select_round_trips_a_sensed_page_with_swp_set() {
        let d = sense(&ms(false, true, 0, 0x0A, 0), &ModeParams::default(), &ctx()).unwrap();
        let mut p = vec![0u8; 4];
        p.extend_from_slice(&d[4..]);
        p[4 + 4] |= 0x08;
        let new = select6(&p).unwrap();
        assert!(new.swp);
        p[4 + 2] |= 0x04;
        assert!(select6(&p).unwrap().d_sense);
    }

    #[test]
    fn select_rejects_unchangeable_bits_and_bad_lengths() {
        let d = sense(&ms(false, true, 0, 0x1C, 0), &ModeParams::default(), &ctx()).unwrap();
        let mut p = vec![0u8; 4];
        p.extend_from_slice(&d[4..]);
        p[4 + 3] = 0x06; // MRIE
        let e = select6(&p).unwrap_err();
        assert_eq!(e, Sense::invalid_param(7, Some(2)));
        assert_eq!(
            select6(&[0, 0]).unwrap_err(),
            Sense::PARAMETER_LIST_LENGTH_ERROR
        );
        let e = select6(&[0, 0, 0, 0, 0x0A, 0x06, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e, Sense::invalid_param(5, None));
        let e = select6(&[0, 0, 0, 0, 0x0A, 0x0A, 0, 0]).unwrap_err();
        assert_eq!(e, Sense::PARAMETER_LIST_LENGTH_ERROR);
        let e = select6(&[0, 0, 0, 0, 0x19, 0x00]).unwrap_err();
        assert_eq!(e, Sense::invalid_param(4, Some(5)));
    }

    #[test]
    fn select_block_descriptor_must_keep_block_size() {
        let ok = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2, 0];
        assert!(select6(&ok).is_ok());
        let bad = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 16, 0];
        assert_eq!(select6(&bad).unwrap_err(), Sense::invalid_param(9, None));
    }
}
