//! INQUIRY, VPD, MODE SENSE/SELECT, REQUEST SENSE, REPORT SUPPORTED OPERATION CODES,
//! REPORT TARGET PORT GROUPS, START STOP UNIT, PREVENT ALLOW, unknown and bad CDBs.

use std::sync::atomic::Ordering;

use super::*;

const ILLEGAL: u8 = 0x5;

fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}

#[tokio::test(flavor = "current_thread")]
async fn standard_inquiry() {
    let (lu, _) = setup();
    let n = nexus("a", 1);
    let r = run(&lu, &n, &inquiry(false, 0, 260), &[]).await;
    assert_good(&r);
    let d = &r.data_in;
    assert_eq!(d[0], 0);
    assert_eq!(d[2], 6);
    assert_eq!(d[3] & 0x0F, 2);
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(&d[8..16], b"TESSERA ");
    assert_eq!(d[5] & 0x30, 0x10, "TPGS implicit ALUA");
    assert_eq!(r.transfer_len as usize, d.len());
    // Allocation lengths truncate; 0 returns nothing.
    for alloc in [0u16, 5, 36, 255, 256] {
        let r = run(&lu, &n, &inquiry(false, 0, alloc), &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in.len(), usize::from(alloc).min(74));
    }
    // EVPD = 0 with a page code is invalid; an unknown VPD page too.
    let r = run(&lu, &n, &inquiry(false, 1, 255), &[]).await;
    assert_check(&r, ILLEGAL, 0x24, 0);
    assert_eq!(sks(&r), [0xCF, 0, 2]);
    assert_illegal(&lu, &n, &inquiry(true, 0x81, 255), &[], 0x24).await;
}

#[tokio::test(flavor = "current_thread")]
async fn every_supported_vpd_page_reads() {
    let (lu, _) = setup();
    let n = nexus_on("a", 1, T2, 7);
    let r = run(&lu, &n, &inquiry(true, 0, 255), &[]).await;
    assert_good(&r);
    let pages: Vec<u8> = r.data_in[4..].to_vec();
    assert_eq!(pages, vec![0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]);
    for p in pages {
        let r = run(&lu, &n, &inquiry(true, p, 255), &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in[1], p);
    }
    let r = run(&lu, &n, &inquiry(true, 0x80, 255), &[]).await;
    assert_eq!(&r.data_in[4..], b"SN42");
    // Device identification carries this nexus's port and group (7/7).
    let r = run(&lu, &n, &inquiry(true, 0x83, 255), &[]).await;
    let d = &r.data_in;
    let mut at = 4;
    let mut seen = vec![];
    while at < d.len() {
        let kind = d[at + 1] & 0x0F;
        let len = d[at + 3] as usize;
        if kind == 4 || kind == 5 {
            seen.push((kind, u16::from_be_bytes([d[at + 6], d[at + 7]])));
        }
        if kind == 3 {
            assert_eq!(d[at + 4] >> 4, 6, "NAA-6");
        }
        at += 4 + len;
    }
    assert_eq!(seen, vec![(4, 7), (5, 7)]);
    // Block limits: UNMAP supported on this thin LU, 0x3C page length.
    let r = run(&lu, &n, &inquiry(true, 0xB0, 64), &[]).await;
    assert_eq!(r.data_in.len(), 64);
    assert_eq!(r.data_in[3], 0x3C);
    let r = run(&lu, &n, &inquiry(true, 0xB2, 64), &[]).await;
    assert_eq!(r.data_in[5] & 0xE4, 0xE4);
}

fn mode_sense6(dbd: bool, pc: u8, page: u8, sub: u8, alloc: u8) -> Vec<u8> {
    vec![
        0x1A,
        if dbd { 0x08 } else { 0 },
        (pc << 6) | page,
        sub,
        alloc,
        0,
    ]
}

#[tokio::test(flavor = "current_thread")]
async fn mode_sense_pages_and_residuals() {
    let (lu, n) = setup_fresh().await;
    let r = run(&lu, &n, &mode_sense6(false, 0, 0x3F, 0, 255), &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in[0] as usize, r.data_in.len() - 1);
    assert_eq!(r.data_in[2] & 0x90, 0x10, "DPOFUA set, WP clear");
    assert_eq!(r.transfer_len as usize, r.data_in.len());
    // Allocation length 4: exactly 4 bytes, no more.
    let r = run(&lu, &n, &mode_sense6(false, 0, 0x3F, 0, 4), &[]).await;
    assert_eq!(r.data_in.len(), 4);
    assert_eq!(r.transfer_len, 4);
    // The control page directly equals the one in all pages.
    let all = run(&lu, &n, &mode_sense6(true, 0, 0x3F, 0, 255), &[])
        .await
        .data_in;
    let ctl = run(&lu, &n, &mode_sense6(true, 0, 0x0A, 0, 255), &[])
        .await
        .data_in;
    let pos = all.windows(2).position(|w| w == [0x0A, 0x0A]).unwrap();
    assert_eq!(&all[pos..pos + 12], &ctl[4..16]);
    // MODE SENSE(10) with LLBAA.
    let r = run(&lu, &n, &[0x5A, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]).await;
    assert_good(&r);
    assert_eq!(u16::from_be_bytes([r.data_in[6], r.data_in[7]]), 16);
    // Saved values are not supported; unknown pages are invalid.
    assert_illegal(&lu, &n, &mode_sense6(true, 3, 0x08, 0, 255), &[], 0x39).await;
    assert_illegal(&lu, &n, &mode_sense6(true, 0, 0x19, 0, 255), &[], 0x24).await;
}

async fn control_page(lu: &LogicalUnit, n: &Nexus) -> Vec<u8> {
    let r = run(lu, n, &mode_sense6(true, 0, 0x0A, 0, 255), &[]).await;
    assert_good(&r);
    r.data_in[4..16].to_vec()
}

fn mode_select6(page: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut data = vec![0u8; 4];
    data.extend_from_slice(page);
    (vec![0x15, 0x10, 0, 0, data.len() as u8, 0], data)
}

#[tokio::test(flavor = "current_thread")]
async fn swp_write_protects_and_tells_other_nexuses() {
    let (lu, a, b) = setup_fresh_pair().await;
    let mut page = control_page(&lu, &a).await;
    page[4] |= 0x08;
    let (cdb, data) = mode_select6(&page);
    let r = run(&lu, &a, &cdb, &data).await;
    assert_good(&r);
    assert_eq!(r.transfer_len as usize, data.len());
    assert_eq!(control_page(&lu, &a).await[4] & 0x08, 0x08);
    let r = run(&lu, &a, &mode_sense6(true, 0, 0x3F, 0, 255), &[]).await;
    assert_eq!(r.data_in[2] & 0x80, 0x80, "WP in the header");
    assert_check(&write0(&lu, &a).await, 0x7, 0x27, 0x02);
    assert_good(&read0(&lu, &a).await);
    // b hears about it once.
    assert_ua_once(&lu, &b, 0x2A, 0x01).await;
    page[4] &= !0x08;
    let (cdb, data) = mode_select6(&page);
    assert_good(&run(&lu, &a, &cdb, &data).await);
    assert_good(&write0(&lu, &a).await);
}

#[tokio::test(flavor = "current_thread")]
async fn d_sense_switches_to_descriptor_format() {
    let (lu, n) = setup_fresh().await;
    let mut page = control_page(&lu, &n).await;
    page[2] |= 0x04;
    let (cdb, data) = mode_select6(&page);
    assert_good(&run(&lu, &n, &cdb, &data).await);
    let r = run(&lu, &n, &rw16(READ16, u64::MAX, 1, 0), &[]).await;
    assert_eq!(r.sense.as_ref().unwrap()[0], 0x72);
    assert_eq!(sense(&r), (ILLEGAL, 0x21, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn wce_off_forces_fua() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    let r = run(&lu, &n, &mode_sense6(true, 0, 0x08, 0, 255), &[]).await;
    let mut page = r.data_in[4..24].to_vec();
    assert_eq!(page[2] & 0x04, 0x04);
    page[2] &= !0x04;
    let (cdb, data) = mode_select6(&page);
    assert_good(&run(&lu, &n, &cdb, &data).await);
    assert_good(&write0(&lu, &n).await);
    assert!(dev.last_fua.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "current_thread")]
async fn mode_select_rejects_what_is_not_changeable() {
    let (lu, n) = setup_fresh().await;
    let mut page = control_page(&lu, &n).await;
    page[3] ^= 0x06; // QERR
    let (cdb, data) = mode_select6(&page);
    let r = run(&lu, &n, &cdb, &data).await;
    assert_check(&r, ILLEGAL, 0x26, 0);
    assert_eq!(sks(&r), [0x8A, 0, 7]);
    // Truncated header, SP set, PS set.
    assert_illegal(&lu, &n, &[0x15, 0x10, 0, 0, 2, 0], &[0, 0], 0x1A).await;
    let page = control_page(&lu, &n).await;
    let (mut cdb, data) = mode_select6(&page);
    cdb[1] |= 0x01;
    assert_illegal(&lu, &n, &cdb, &data, 0x24).await;
    let mut ps = page.clone();
    ps[0] |= 0x80;
    let (cdb, data) = mode_select6(&ps);
    assert_illegal(&lu, &n, &cdb, &data, 0x26).await;
}

#[tokio::test(flavor = "current_thread")]
async fn request_sense_reports_and_clears_the_unit_attention() {
    let (lu, _) = setup();
    let n = nexus("a", 1);
    let r = run(&lu, &n, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 18);
    assert_eq!(
        (r.data_in[0], r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x70, 0x6, 0x29, 0x00)
    );
    let r = run(&lu, &n, &[0x03, 1, 0, 0, 252, 0], &[]).await;
    assert_good(&r);
    assert_eq!(&r.data_in[..4], &[0x72, 0, 0, 0]);
    assert_good(&run(&lu, &n, &[0; 6], &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn unknown_opcodes_and_bad_control_bytes() {
    let (lu, n) = setup_fresh().await;
    for op in [0x02u8, 0x04, 0x3B, 0x48, 0x7F, 0xC0, 0xFF] {
        let r = run(&lu, &n, &[op, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
        assert_check(&r, ILLEGAL, 0x20, 0);
    }
    let r = run(&lu, &n, &[0x00, 0, 0, 0, 0, 0x04], &[]).await;
    assert_check(&r, ILLEGAL, 0x24, 0);
    assert_eq!(sks(&r), [0xCA, 0, 5]);
    // Unsupported service actions point at the service action field (byte 1).
    let r = run(
        &lu,
        &n,
        &[0x9E, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    )
    .await;
    assert_check(&r, ILLEGAL, 0x24, 0);
    assert_eq!(sks(&r), [0xCC, 0, 1]);
}

fn rsoc(rctd: bool, options: u8, op: u8, sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0C;
    c[2] = (u8::from(rctd) << 7) | options;
    c[3] = op;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[tokio::test(flavor = "current_thread")]
async fn report_supported_operation_codes() {
    let (lu, n) = setup_fresh().await;
    let r = run(&lu, &n, &rsoc(false, 0, 0, 0, 65535), &[]).await;
    assert_good(&r);
    let d = &r.data_in;
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len());
    // Every listed command reports as supported one by one, with its opcode first.
    let mut at = 4;
    while at < d.len() {
        let (op, sa, servactv) = (
            d[at],
            u16::from_be_bytes([d[at + 2], d[at + 3]]),
            d[at + 5] & 1,
        );
        let options = if servactv == 1 { 2 } else { 1 };
        let one = run(&lu, &n, &rsoc(true, options, op, sa, 65535), &[]).await;
        assert_good(&one);
        assert_eq!(one.data_in[1], 0x83, "op {op:#x}");
        assert_eq!(one.data_in[4], op);
        let wrong = if servactv == 1 { 1 } else { 2 };
        assert_illegal(&lu, &n, &rsoc(false, wrong, op, sa, 65535), &[], 0x24).await;
        at += 8;
    }
    let r = run(&lu, &n, &rsoc(true, 0, 0, 0, 65535), &[]).await;
    assert_eq!(r.data_in[4 + 5] & 0x02, 0x02);
    assert_eq!(&r.data_in[12..14], &[0, 0x0A]);
    // Unsupported opcode: SUPPORT = 001b. Small allocation lengths truncate.
    let r = run(&lu, &n, &rsoc(false, 1, 0x02, 0, 65535), &[]).await;
    assert_eq!(&r.data_in[..], &[0, 1, 0, 0]);
    let r = run(&lu, &n, &rsoc(false, 0, 0, 0, 10), &[]).await;
    assert_eq!(r.data_in.len(), 10);
}

#[tokio::test(flavor = "current_thread")]
async fn report_target_port_groups_lists_seen_ports() {
    let (lu, _) = setup();
    let a = nexus_on("a", 1, T1, 1);
    let b = nexus_on("a", 2, T2, 2);
    fresh(&lu, &a).await;
    fresh(&lu, &b).await;
    let cdb = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let r = run(&lu, &a, &cdb, &[]).await;
    assert_good(&r);
    let d = &r.data_in;
    assert_eq!(
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
        d.len() - 4
    );
    assert_eq!(d.len(), 4 + 2 * 12);
    assert_eq!(d[4] & 0x0F, 0, "active/optimized");
    let mut ext = cdb;
    ext[1] = 0x2A;
    let r = run(&lu, &a, &ext, &[]).await;
    assert_eq!(r.data_in[4], 0x10);
}

/// (group, state) pairs of REPORT TARGET PORT GROUPS data (4-byte header).
fn groups_of(d: &[u8]) -> Vec<(u16, u8, Vec<u16>)> {
    let mut out = vec![];
    let mut at = 4;
    while at + 8 <= d.len() {
        let n = d[at + 7] as usize;
        let ports = (0..n)
            .map(|i| u16::from_be_bytes([d[at + 8 + 4 * i + 2], d[at + 8 + 4 * i + 3]]))
            .collect();
        out.push((
            u16::from_be_bytes([d[at + 2], d[at + 3]]),
            d[at] & 0x0F,
            ports,
        ));
        at += 8 + 4 * n;
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn alua_reports_the_owner_optimized_and_a_move_raises_state_changed() {
    let (lu, _) = setup();
    // Three gateways (groups 1, 2, 3), gateway 2 owns the volume; the initiator is on 1.
    lu.set_alua(crate::Alua {
        groups: vec![1, 2, 3],
        optimized: Some(2),
    });
    let a = nexus_on("a", 1, T1, 1);
    fresh(&lu, &a).await;
    let cdb = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let r = run(&lu, &a, &cdb, &[]).await;
    assert_good(&r);
    assert_eq!(
        groups_of(&r.data_in),
        vec![(1, 1, vec![1]), (2, 0, vec![2]), (3, 1, vec![3])],
        "owner active/optimized, the others active/non-optimized"
    );
    // Same owner again: no unit attention.
    lu.set_alua(crate::Alua {
        groups: vec![1, 2, 3],
        optimized: Some(2),
    });
    assert_good(&run(&lu, &a, &[0; 6], &[]).await);
    // Ownership moves to gateway 3: ASYMMETRIC ACCESS STATE CHANGED, then the new states.
    lu.set_alua(crate::Alua {
        groups: vec![1, 2, 3],
        optimized: Some(3),
    });
    assert_check(&run(&lu, &a, &[0; 6], &[]).await, 0x6, 0x2A, 0x06);
    let r = run(&lu, &a, &cdb, &[]).await;
    assert_eq!(
        groups_of(&r.data_in),
        vec![(1, 1, vec![1]), (2, 1, vec![2]), (3, 0, vec![3])]
    );
    // No owner known: every group active/optimized.
    lu.set_alua(crate::Alua {
        groups: vec![1, 2, 3],
        optimized: None,
    });
    let r = run(&lu, &a, &cdb, &[]).await;
    assert_check(&r, 0x6, 0x2A, 0x06);
    let r = run(&lu, &a, &cdb, &[]).await;
    assert!(groups_of(&r.data_in).iter().all(|g| g.1 == 0));
}

#[tokio::test(flavor = "current_thread")]
async fn a_taken_over_unit_greets_new_nexuses_with_state_changed() {
    let (lu, _) = setup();
    lu.set_first_unit_attention(tessera_proto::scsi::Sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
    let a = nexus("a", 1);
    assert_ua_once(&lu, &a, 0x2A, 0x06).await;
}

#[tokio::test(flavor = "current_thread")]
async fn start_stop_unit_on_fixed_media() {
    let (lu, dev) = setup();
    let n = fresh_nexus(&lu, "a", 1).await;
    let r = run(&lu, &n, &[0x1B, 0, 0, 0, 0x02, 0], &[]).await;
    assert_check(&r, ILLEGAL, 0x24, 0);
    assert_eq!(sks(&r), [0xC9, 0, 4]);
    assert_good(&run(&lu, &n, &[0x1B, 0, 0, 0, 0x00, 0], &[]).await);
    assert_eq!(
        dev.flushes.load(Ordering::SeqCst),
        1,
        "stopping synchronizes"
    );
    assert_good(&run(&lu, &n, &[0x1B, 0, 0, 0, 0x04, 0], &[]).await);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 1, "NO_FLUSH");
    for pc in 1..16u8 {
        assert_good(&run(&lu, &n, &[0x1B, 1, 0, 0, (pc << 4) | 0x02, 0], &[]).await);
    }
    assert_good(&run(&lu, &n, &[0; 6], &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn prevent_blocks_eject_for_every_nexus_until_allowed() {
    let (lu, _) = setup_removable();
    let (a, b) = fresh_pair(&lu).await;
    let inq = run(&lu, &a, &inquiry(false, 0, 36), &[]).await;
    assert_eq!(inq.data_in[1], 0x80, "RMB");
    assert_good(&run(&lu, &a, &[0x1E, 0, 0, 0, 1, 0], &[]).await);
    let eject = [0x1B, 0, 0, 0, 0x02, 0];
    assert_check(&run(&lu, &a, &eject, &[]).await, ILLEGAL, 0x53, 0x02);
    assert_check(&run(&lu, &b, &eject, &[]).await, ILLEGAL, 0x53, 0x02);
    assert_check(
        &run(&lu, &a, &[0x1B, 0, 0, 0, 0x03, 0], &[]).await,
        ILLEGAL,
        0x53,
        0x02,
    );
    assert_illegal(&lu, &a, &[0x1E, 0, 0, 0, 2, 0], &[], 0x24).await;
    assert_good(&run(&lu, &a, &[0x1E, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&run(&lu, &b, &eject, &[]).await);
    assert_check(&run(&lu, &a, &[0; 6], &[]).await, 0x2, 0x3A, 0);
    assert_good(&run(&lu, &a, &[0x1B, 0, 0, 0, 0x03, 0], &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn prevent_is_cleared_by_nexus_loss_and_reset() {
    let (lu, _) = setup_removable();
    let a = fresh_nexus(&lu, "a", 1).await;
    let (eject, load) = eject_load(false);
    assert_good(&run(&lu, &a, &[0x1E, 0, 0, 0, 1, 0], &[]).await);
    lu.nexus_gone(&a);
    let a2 = fresh_nexus(&lu, "a", 3).await;
    assert_good(&run(&lu, &a2, &eject, &[]).await);
    assert_good(&run(&lu, &a2, &load, &[]).await);
    assert_good(&run(&lu, &a2, &[0x1E, 0, 0, 0, 1, 0], &[]).await);
    lu.reset(tessera_proto::scsi::Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    fresh(&lu, &a2).await;
    assert_good(&run(&lu, &a2, &eject, &[]).await);
    assert_good(&run(&lu, &a2, &load, &[]).await);
}

#[tokio::test(flavor = "current_thread")]
async fn mode_select_ten_with_block_descriptor() {
    let (lu, n) = setup_fresh().await;
    // MODE SENSE(10) of the caching page with its block descriptor, sent back with WCE off.
    let r = run(&lu, &n, &[0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]).await;
    assert_good(&r);
    let mut data = r.data_in.to_vec();
    assert_eq!(u16::from_be_bytes([data[6], data[7]]), 8);
    data[0] = 0;
    data[1] = 0;
    data[3] = 0; // DEVICE-SPECIFIC PARAMETER is reserved in MODE SELECT
    data[16 + 2] &= !0x04;
    let len = (data.len() as u16).to_be_bytes();
    let cdb = [0x55, 0x10, 0, 0, 0, 0, 0, len[0], len[1], 0];
    assert_good(&run(&lu, &n, &cdb, &data).await);
    let r = run(&lu, &n, &mode_sense6(true, 0, 0x08, 0, 255), &[]).await;
    assert_eq!(r.data_in[4 + 2] & 0x04, 0);
    // A block descriptor that changes the block length is refused.
    data[8 + 6] = 0x10;
    let r = run(&lu, &n, &cdb, &data).await;
    assert_check(&r, ILLEGAL, 0x26, 0);
    // A logical unit reset restores the defaults.
    lu.reset(tessera_proto::scsi::Sense::BUS_DEVICE_RESET_FUNCTION_OCCURRED);
    fresh(&lu, &n).await;
    let r = run(&lu, &n, &mode_sense6(true, 0, 0x08, 0, 255), &[]).await;
    assert_eq!(r.data_in[4 + 2] & 0x04, 0x04);
}
