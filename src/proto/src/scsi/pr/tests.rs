//! Persistent reservation scenarios across several I_T nexuses.

use super::*;

const T1: &str = "iqn.2024-01.io.tessera:t,t,0x1";
const T2: &str = "iqn.2024-01.io.tessera:t,t,0x2";

fn port(i: &'static str, t: &'static str) -> Port<'static> {
    let name = i.split(",i,").next().unwrap();
    Port {
        initiator_port: i,
        initiator_name: name,
        target_port: t,
        relative_port: if t == T1 { 1 } else { 2 },
    }
}

fn a() -> Port<'static> {
    port("iqn.1994-05.com.example:a,i,0x23d000000001", T1)
}
fn b() -> Port<'static> {
    port("iqn.1994-05.com.example:b,i,0x23d000000002", T1)
}
fn c() -> Port<'static> {
    port("iqn.1994-05.com.example:c,i,0x23d000000003", T1)
}

fn no_ports(_: u16) -> Option<String> {
    None
}

fn params(key: u64, sa_key: u64) -> ProutParams {
    ProutParams {
        key,
        sa_key,
        ..Default::default()
    }
}

fn out(
    s: &mut PrState,
    p: &Port<'_>,
    sa: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
) -> Result<Vec<UnitAttention>, Sense> {
    s.apply(p, sa, 0, kind, &params(key, sa_key), &no_ports)
}

fn reg(s: &mut PrState, p: &Port<'_>, key: u64) {
    out(s, p, ProutAction::REGISTER, 0, 0, key).unwrap();
}

/// `a` (key 1) and `b` (key 2) registered, `a` holding a reservation of type code `kind`.
fn reserved_by_a(kind: u8) -> PrState {
    let mut s = PrState::default();
    reg(&mut s, &a(), 1);
    reg(&mut s, &b(), 2);
    out(&mut s, &a(), ProutAction::RESERVE, kind, 1, 0).unwrap();
    s
}

fn assert_conflict(r: Result<Vec<UnitAttention>, Sense>) {
    assert_eq!(r, Err(Sense::RESERVATION_CONFLICT));
}

#[test]
fn register_read_keys_and_unregister() {
    let mut s = PrState::default();
    reg(&mut s, &a(), 0xAA);
    reg(&mut s, &b(), 0xBB);
    assert_eq!(s.generation, 2);
    let d = s.read_keys();
    assert_eq!(&d[4..8], &16u32.to_be_bytes());
    assert_eq!(&d[8..16], &0xAAu64.to_be_bytes());
    // Re-registering with a wrong (zero) reservation key conflicts.
    assert_conflict(out(&mut s, &a(), ProutAction::REGISTER, 0, 0, 0xAB));
    // Unregistered nexus with a non-zero key conflicts.
    assert_conflict(out(&mut s, &c(), ProutAction::REGISTER, 0, 1, 2));
    // Key change, then unregister.
    out(&mut s, &a(), ProutAction::REGISTER, 0, 0xAA, 0xAC).unwrap();
    assert_eq!(s.registration(&a()).unwrap().key, 0xAC);
    out(&mut s, &a(), ProutAction::REGISTER, 0, 0xAC, 0).unwrap();
    assert!(s.registration(&a()).is_none());
    assert_eq!(s.generation, 4);
    // Register-and-ignore ignores the key.
    out(
        &mut s,
        &b(),
        ProutAction::REGISTER_AND_IGNORE_EXISTING_KEY,
        0,
        12345,
        0xBC,
    )
    .unwrap();
    assert_eq!(s.registration(&b()).unwrap().key, 0xBC);
}

#[test]
fn access_matrix_for_every_type() {
    // (type, registered non-holder read, write, unregistered read, write)
    let table = [
        (PrType::ExclusiveAccess, false, false, false, false),
        (PrType::WriteExclusive, true, false, true, false),
        (
            PrType::ExclusiveAccessRegistrantsOnly,
            true,
            true,
            false,
            false,
        ),
        (
            PrType::WriteExclusiveRegistrantsOnly,
            true,
            true,
            true,
            false,
        ),
        (
            PrType::ExclusiveAccessAllRegistrants,
            true,
            true,
            false,
            false,
        ),
        (
            PrType::WriteExclusiveAllRegistrants,
            true,
            true,
            true,
            false,
        ),
    ];
    for (kind, rr, rw, ur, uw) in table {
        let s = reserved_by_a(kind.code());
        assert!(
            !s.conflicts(&a(), Access::Read) && !s.conflicts(&a(), Access::Write),
            "{kind:?}"
        );
        for (p, access, allowed, what) in [
            (b(), Access::Read, rr, "registered read"),
            (b(), Access::Write, rw, "registered write"),
            (c(), Access::Read, ur, "unregistered read"),
            (c(), Access::Write, uw, "unregistered write"),
        ] {
            assert_eq!(!s.conflicts(&p, access), allowed, "{kind:?} {what}");
        }
        assert!(!s.conflicts(&c(), Access::None));
        // READ RESERVATION reports key 0 for all-registrants types.
        let d = s.read_reservation();
        let key = u64::from_be_bytes(d[8..16].try_into().unwrap());
        assert_eq!(key, if kind.all_registrants() { 0 } else { 1 });
        assert_eq!(d[21], kind.code());
    }
}

#[test]
fn reserve_rules() {
    let mut s = PrState::default();
    // Not registered: conflict.
    assert_conflict(out(&mut s, &a(), ProutAction::RESERVE, 1, 0, 0));
    reg(&mut s, &a(), 1);
    reg(&mut s, &b(), 2);
    let gen = s.generation;
    assert_eq!(
        s.apply(&a(), ProutAction::RESERVE, 1, 1, &params(1, 0), &no_ports),
        Err(Sense::invalid_cdb(2, Some(7)))
    );
    assert_eq!(
        out(&mut s, &a(), ProutAction::RESERVE, 2, 1, 0),
        Err(Sense::invalid_cdb(2, Some(3)))
    );
    out(&mut s, &a(), ProutAction::RESERVE, 1, 1, 0).unwrap();
    // Same type again by the holder: fine. Other type or other nexus: conflict.
    out(&mut s, &a(), ProutAction::RESERVE, 1, 1, 0).unwrap();
    assert_conflict(out(&mut s, &a(), ProutAction::RESERVE, 3, 1, 0));
    assert_conflict(out(&mut s, &b(), ProutAction::RESERVE, 1, 2, 0));
    // RESERVE does not bump the generation.
    assert_eq!(s.generation, gen);
}

#[test]
fn release_rules_and_unit_attentions() {
    let mut s = reserved_by_a(5);
    // Non-holder release is a no-op.
    assert_eq!(out(&mut s, &b(), ProutAction::RELEASE, 5, 2, 0), Ok(vec![]));
    assert!(s.reservation.is_some());
    // Wrong type.
    assert_eq!(
        out(&mut s, &a(), ProutAction::RELEASE, 6, 1, 0),
        Err(Sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    );
    // Registrants-only release tells the other registrants.
    let ua = out(&mut s, &a(), ProutAction::RELEASE, 5, 1, 0).unwrap();
    assert_eq!(ua.len(), 1);
    assert!(ua[0].0.matches(&b()));
    assert_eq!(ua[0].1, Sense::RESERVATIONS_RELEASED);
    assert!(s.reservation.is_none());
    // Exclusive access release: no unit attention.
    out(&mut s, &a(), ProutAction::RESERVE, 3, 1, 0).unwrap();
    assert_eq!(out(&mut s, &a(), ProutAction::RELEASE, 3, 1, 0), Ok(vec![]));
}

#[test]
fn holder_unregistering_releases() {
    for (kind, shared, uas) in [
        (3u8, false, 0usize),
        (1, false, 0),
        (6, false, 1),
        (5, false, 1),
        (8, true, 0),
        (7, true, 0),
    ] {
        let mut s = reserved_by_a(kind);
        let ua = out(&mut s, &a(), ProutAction::REGISTER, 0, 1, 0).unwrap();
        assert_eq!(ua.len(), uas, "type {kind}");
        assert!(ua.iter().all(|(id, _)| id.matches(&b())));
        assert_eq!(s.reservation.is_some(), shared, "type {kind}");
        if shared {
            // The remaining registrant holds it and can release it.
            out(&mut s, &b(), ProutAction::RELEASE, kind, 2, 0).unwrap();
            assert!(s.reservation.is_none());
        }
    }
}

#[test]
fn all_registrants_ends_with_last_registrant() {
    let mut s = PrState::default();
    reg(&mut s, &a(), 1);
    out(&mut s, &a(), ProutAction::RESERVE, 7, 1, 0).unwrap();
    out(&mut s, &a(), ProutAction::REGISTER, 0, 1, 0).unwrap();
    assert!(s.reservation.is_none());
}

#[test]
fn clear_removes_everything() {
    let mut s = reserved_by_a(3);
    assert_conflict(out(&mut s, &c(), ProutAction::CLEAR, 0, 1, 0));
    let g = s.generation;
    let ua = out(&mut s, &a(), ProutAction::CLEAR, 0, 1, 0).unwrap();
    assert_eq!(ua, vec![(b().id(), Sense::RESERVATIONS_PREEMPTED)]);
    assert!(s.is_empty());
    assert_eq!(s.generation, g + 1);
}

impl Port<'_> {
    fn id(&self) -> RegId {
        RegId::for_port(self, false)
    }
}

#[test]
fn preempt_registration_without_reservation() {
    let mut s = PrState::default();
    reg(&mut s, &a(), 1);
    reg(&mut s, &b(), 2);
    let g = s.generation;
    let ua = out(&mut s, &b(), ProutAction::PREEMPT, 3, 2, 1).unwrap();
    assert_eq!(ua, vec![(a().id(), Sense::REGISTRATIONS_PREEMPTED)]);
    assert_eq!(s.registrations.len(), 1);
    assert_eq!(s.registrations[0].key, 2);
    assert_eq!(s.generation, g + 1);
    // Nobody holds key 7: conflict. SARK 0 without an AR reservation: invalid.
    assert_conflict(out(&mut s, &b(), ProutAction::PREEMPT, 3, 2, 7));
    assert_eq!(
        out(&mut s, &b(), ProutAction::PREEMPT, 3, 2, 0),
        Err(Sense::invalid_param(8, None))
    );
}

#[test]
fn preempt_holder_takes_the_reservation() {
    let mut s = PrState::default();
    reg(&mut s, &a(), 1);
    reg(&mut s, &b(), 2);
    reg(&mut s, &c(), 3);
    out(&mut s, &a(), ProutAction::RESERVE, 1, 1, 0).unwrap();
    let ua = out(&mut s, &b(), ProutAction::PREEMPT_AND_ABORT, 3, 2, 1).unwrap();
    assert!(ua.contains(&(a().id(), Sense::REGISTRATIONS_PREEMPTED)));
    // The type changed: the remaining registrant c hears of the release.
    assert!(ua.contains(&(c().id(), Sense::RESERVATIONS_RELEASED)));
    let res = s.reservation.clone().unwrap();
    assert_eq!(res.kind, PrType::ExclusiveAccess);
    assert_eq!(res.key, 2);
    assert!(s.is_holder(&b()));
    assert!(s.registration(&a()).is_none());
}

#[test]
fn preempt_all_registrants_with_zero_key() {
    let mut s = reserved_by_a(8);
    let ua = out(&mut s, &b(), ProutAction::PREEMPT, 1, 2, 0).unwrap();
    assert_eq!(ua, vec![(a().id(), Sense::REGISTRATIONS_PREEMPTED)]);
    assert_eq!(s.reservation.as_ref().unwrap().kind, PrType::WriteExclusive);
    assert!(s.is_holder(&b()));
}

fn tid(name: &str, with_isid: bool) -> Vec<u8> {
    TransportId {
        name: name.into(),
        name_only: !with_isid,
    }
    .encode()
}

#[test]
fn transport_ids_round_trip_and_validate() {
    let t = tid("iqn.1994-05.com.example:b,i,0x23d000000002", true);
    assert_eq!(t.len() % 4, 0);
    assert_eq!(t[0], 0x45);
    let (d, n) = TransportId::decode(&t, 0).unwrap();
    assert_eq!(n, t.len());
    assert!(!d.name_only);
    let mut bad = t.clone();
    bad[0] = 0x46;
    assert!(TransportId::decode(&bad, 0).is_err());
    // Format 01b without ",i,0x" is invalid.
    let mut bad = tid("iqn.x", false);
    bad[0] = 0x45;
    assert!(TransportId::decode(&bad, 0).is_err());
    assert!(TransportId::decode(&t[..10], 0).is_err());
}

fn basic_list(key: u64, sa_key: u64, flags: u8, tids: &[Vec<u8>]) -> Vec<u8> {
    let mut d = vec![0u8; 24];
    d[0..8].copy_from_slice(&key.to_be_bytes());
    d[8..16].copy_from_slice(&sa_key.to_be_bytes());
    d[20] = flags;
    if flags & 0x08 != 0 {
        let all: Vec<u8> = tids.concat();
        d.extend_from_slice(&(all.len() as u32).to_be_bytes());
        d.extend_from_slice(&all);
    }
    d
}

#[test]
fn parameter_list_parsing() {
    let d = basic_list(1, 2, 0x05, &[]);
    let p = parse_params(ProutAction::REGISTER, 24, &d).unwrap();
    assert_eq!(
        (p.key, p.sa_key, p.all_tg_pt, p.aptpl, p.spec_i_pt),
        (1, 2, true, true, false)
    );
    assert_eq!(
        parse_params(0, 23, &d),
        Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
    );
    assert_eq!(
        parse_params(0, 28, &d),
        Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
    );
    let t = tid("iqn.1994-05.com.example:b,i,0x23d000000002", true);
    let d = basic_list(0, 9, 0x08, &[t]);
    let p = parse_params(ProutAction::REGISTER, d.len() as u32, &d).unwrap();
    assert_eq!(p.transport_ids.len(), 1);
}

#[test]
fn spec_i_pt_registers_the_listed_ports() {
    let mut s = PrState::default();
    let t = tid(b().initiator_port, true);
    let d = basic_list(0, 9, 0x08, &[t]);
    let p = parse_params(ProutAction::REGISTER, d.len() as u32, &d).unwrap();
    s.apply(&a(), ProutAction::REGISTER, 0, 0, &p, &no_ports)
        .unwrap();
    assert_eq!(s.registration(&a()).unwrap().key, 9);
    assert_eq!(s.registration(&b()).unwrap().key, 9);
    // Register-and-ignore with SPEC_I_PT is invalid.
    let mut s2 = PrState::default();
    assert_eq!(
        s2.apply(
            &c(),
            ProutAction::REGISTER_AND_IGNORE_EXISTING_KEY,
            0,
            0,
            &p,
            &no_ports
        ),
        Err(Sense::invalid_param(20, Some(3)))
    );
}

#[test]
fn all_tg_pt_registration_covers_every_target_port() {
    let mut s = PrState::default();
    let p = ProutParams {
        sa_key: 5,
        all_tg_pt: true,
        ..Default::default()
    };
    s.apply(&a(), ProutAction::REGISTER, 0, 0, &p, &no_ports)
        .unwrap();
    let a2 = port(a().initiator_port, T2);
    assert_eq!(s.registration(&a2).unwrap().key, 5);
    let full = s.read_full_status();
    assert_eq!(full[8 + 12] & 0x02, 0x02);
}

#[test]
fn register_and_move() {
    let mut s = PrState::default();
    reg(&mut s, &a(), 1);
    out(&mut s, &a(), ProutAction::RESERVE, 1, 1, 0).unwrap();
    let mut d = vec![0u8; 24];
    d[0..8].copy_from_slice(&1u64.to_be_bytes());
    d[8..16].copy_from_slice(&0xB0u64.to_be_bytes());
    d[17] = 0x02; // UNREG
    d[18..20].copy_from_slice(&1u16.to_be_bytes());
    let t = tid(b().initiator_port, true);
    d[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
    d.extend_from_slice(&t);
    let p = parse_params(ProutAction::REGISTER_AND_MOVE, d.len() as u32, &d).unwrap();
    let ports = |rel: u16| (rel == 1).then(|| T1.to_string());
    s.apply(&a(), ProutAction::REGISTER_AND_MOVE, 0, 1, &p, &ports)
        .unwrap();
    assert!(s.is_holder(&b()));
    assert_eq!(s.registration(&b()).unwrap().key, 0xB0);
    assert!(s.registration(&a()).is_none());
    assert_eq!(s.reservation.as_ref().unwrap().key, 0xB0);
    // Unknown relative port.
    let mut s2 = PrState::default();
    reg(&mut s2, &a(), 1);
    out(&mut s2, &a(), ProutAction::RESERVE, 1, 1, 0).unwrap();
    assert_eq!(
        s2.apply(&a(), ProutAction::REGISTER_AND_MOVE, 0, 1, &p, &no_ports),
        Err(Sense::invalid_param(18, None))
    );
}

#[test]
fn in_data_layouts() {
    let mut s = PrState::default();
    reg(&mut s, &a(), 1);
    out(&mut s, &a(), ProutAction::RESERVE, 3, 1, 0).unwrap();
    let caps = s.report_capabilities();
    assert_eq!(u16::from_be_bytes([caps[0], caps[1]]), 8);
    assert!(caps[3] & 0x70 <= 0x50);
    let full = s.read_full_status();
    let add = u32::from_be_bytes([full[4], full[5], full[6], full[7]]) as usize;
    assert_eq!(add, full.len() - 8);
    assert_eq!(full[8 + 12] & 0x01, 1); // R_HOLDER
    assert_eq!(full[8 + 13], 3);
    let tid_len = u32::from_be_bytes(full[8 + 20..8 + 24].try_into().unwrap()) as usize;
    assert_eq!(24 + tid_len, add);
    let empty = PrState::default().read_reservation();
    assert_eq!(empty.len(), 8);
}

#[test]
fn persistence_round_trip_and_corruption() {
    let mut s = reserved_by_a(6);
    s.aptpl = true;
    let bytes = s.encode();
    assert_eq!(PrState::decode(&bytes).unwrap(), s);
    let mut bad = bytes.clone();
    bad[10] ^= 1;
    assert_eq!(PrState::decode(&bad), Err(PrDecodeError::ChecksumMismatch));
    assert_eq!(
        PrState::decode(b"XXXX\x01\0\0\0\0"),
        Err(PrDecodeError::MagicUnknown)
    );
    for cut in 0..bytes.len() {
        assert!(PrState::decode(&bytes[..cut]).is_err(), "cut {cut}");
    }
    assert_eq!(
        PrState::decode(&PrState::default().encode()).unwrap(),
        PrState::default()
    );
}
