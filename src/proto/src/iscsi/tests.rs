//! Conversation tests: the scripted [`Initiator`] talks to a target [`Connection`] and every
//! answer is checked field by field against RFC 7143. One behaviour per test.
//!
//! Where RFC 7143 leaves a choice, the tests pin what Linux open-iscsi and libiscsi expect
//! (noted at the test).

use std::time::Duration;

use bytes::Bytes;

use super::chap::{self, Credentials};
use super::conn::{CloseReason, Completion, ConnError, Event, TmfEvent};
use super::framer::{digest, FrameError};
use super::login::LoginFailure;
use super::pdu::{
    reject, stage, tmf, Bhs, LogoutRequest, NopOut, Opcode, Residual, Response, SnackRequest,
    TextRequest, RESERVED_TAG,
};
use super::testing::*;
use super::text::{self, Pair};
use crate::scsi::sense::{SenseKey, Status};

fn pairs(kv: &[(&str, &str)]) -> Vec<Pair> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ffp() -> Initiator {
    Initiator::logged_in(&[])
}

/// A session whose target declares (and accepts) `mrdsl`-byte data segments.
fn with_target_mrdsl(mrdsl: u32, keys: &[(&str, &str)]) -> Initiator {
    let mut cfg = config();
    cfg.login.limits.max_recv_data_segment_length = mrdsl;
    let mut ini = Initiator::with_config(cfg);
    let mut opts = LoginOptions::default();
    for (k, v) in keys {
        opts = opts.key(k, v);
    }
    ini.login_ok(&opts);
    ini
}

fn close_reason(ini: &mut Initiator) -> Option<CloseReason> {
    ini.take_events().into_iter().find_map(|e| match e {
        Event::Close(r) => Some(r),
        _ => None,
    })
}

fn only(mut rs: Vec<Received>) -> Received {
    assert_eq!(rs.len(), 1, "exactly one PDU expected: {rs:?}");
    rs.pop().expect("checked")
}

fn first_security_pairs(target: Option<&str>) -> Vec<Pair> {
    let mut p = pairs(&[("InitiatorName", INITIATOR)]);
    match target {
        Some(t) => {
            p.extend(pairs(&[("SessionType", "Normal"), ("TargetName", t)]));
        }
        None => p.extend(pairs(&[("SessionType", "Discovery")])),
    }
    p.extend(pairs(&[("AuthMethod", "None")]));
    p
}

/// [`first_security_pairs`] for a normal session to `target` without AuthMethod (for a
/// login that starts past the security stage or negotiates it itself).
fn pairs_without_auth_method(target: &str) -> Vec<Pair> {
    let mut p = first_security_pairs(Some(target));
    p.retain(|(k, _)| k != "AuthMethod");
    p
}

/// A new initiator's first Login Request (security stage, T to operational) with the keys `p`
/// fails with `status`, closing the connection with `why` (see [`expect_login_failure`]).
fn first_login_fails(p: &[Pair], status: (u8, u8), why: LoginFailure) {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = ini.send_login(&req, p);
    expect_login_failure(&mut ini, &r, status, why);
}

/// Send `text` as the first login PDU (security stage, T to operational) and expect a failure
/// with `status` that closes the connection with `why`.
fn expect_login_failure(ini: &mut Initiator, r: &Received, status: (u8, u8), why: LoginFailure) {
    let l = r.login();
    assert_eq!((l.status_class, l.status_detail), status, "{r:?}");
    assert!(!l.transit);
    assert_eq!(l.tsih, 0);
    assert_eq!(close_reason(ini), Some(CloseReason::LoginFailed(why)));
    assert!(ini.conn.is_closed());
    // Nothing more is read or answered.
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    assert!(ini
        .send(
            req.encode(),
            text::encode(&first_security_pairs(Some(TARGET)))
        )
        .is_empty());
}

// ==================================================================== login: happy paths

#[test]
fn normal_login_answers_identity_and_declares_portal_group_and_alias() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = ini.send_login(&req, &first_security_pairs(Some(TARGET)));
    let l = r.login();
    assert!(l.transit && !l.continue_bit);
    assert_eq!((l.csg, l.nsg), (stage::SECURITY, stage::OPERATIONAL));
    assert_eq!((l.status_class, l.status_detail), (0, 0));
    assert_eq!((l.version_max, l.version_active), (0, 0));
    assert_eq!(l.isid, ini.isid);
    assert_eq!(l.tsih, 0, "TSIH only in the final response");
    assert_eq!(l.itt, req.itt);
    // The first StatSN is the initiator's ExpStatSN; ExpCmdSN is the login CmdSN and the window
    // is the queue depth (8).
    assert_eq!((l.stat_sn, l.exp_cmd_sn, l.max_cmd_sn), (0, 1, 8));
    assert_eq!(
        r.pairs(),
        pairs(&[
            ("TargetAlias", "disk one"),
            ("TargetPortalGroupTag", "1"),
            ("AuthMethod", "None")
        ])
    );
}

#[test]
fn normal_login_negotiates_every_operational_key_and_gives_a_tsih() {
    let mut ini = Initiator::new();
    let res = ini.login(&LoginOptions::default()).expect("login");
    assert_eq!(res.responses.len(), 2);
    let op = &res.responses[1];
    let l = op.login();
    assert!(l.transit);
    assert_eq!((l.csg, l.nsg), (stage::OPERATIONAL, stage::FULL_FEATURE));
    assert_eq!(l.tsih, 0x1234);
    assert_eq!((l.stat_sn, l.exp_cmd_sn, l.max_cmd_sn), (1, 1, 8));
    assert_eq!(
        op.pairs(),
        pairs(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("ErrorRecoveryLevel", "0"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "1048576"),
            ("FirstBurstLength", "262144"),
            ("MaxOutstandingR2T", "1"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("MaxRecvDataSegmentLength", "262144"),
        ])
    );
    let Some(Event::LoggedIn(o)) = ini.next_event() else {
        panic!("LoggedIn expected")
    };
    assert_eq!(o.session_type, super::login::SessionType::Normal);
    assert_eq!(o.initiator_name, INITIATOR);
    assert_eq!((o.isid, o.tsih, o.cid), (ini.isid, 0x1234, 0));
    assert_eq!(o.target.as_ref().map(|t| t.name.as_str()), Some(TARGET));
    assert_eq!((o.exp_cmd_sn, o.stat_sn), (1, 2));
    assert_eq!(o.params.initiator_mrdsl, 262_144);
    assert_eq!(o.params.max_burst_length, 1 << 20);
    assert!(!o.params.initial_r2t && o.params.immediate_data);
}

#[test]
fn target_declares_its_receive_limit_in_the_operational_stage_only() {
    // RFC 3720 §5.3.3 (kept by RFC 7143): operational negotiation starts after security.
    let mut ini = Initiator::new();
    let res = ini.login(&LoginOptions::default()).expect("login");
    assert_eq!(res.responses[0].key("MaxRecvDataSegmentLength"), None);
    assert_eq!(
        res.responses[1].key("MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
}

#[test]
fn discovery_login_declares_no_portal_group_and_calls_session_keys_irrelevant() {
    let mut ini = Initiator::new();
    let opts = LoginOptions::discovery().key("MaxBurstLength", "4096");
    let res = ini.login(&opts).expect("login");
    assert_eq!(res.responses[0].pairs(), pairs(&[("AuthMethod", "None")]));
    assert_eq!(
        res.responses[1].pairs(),
        pairs(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxBurstLength", "4096"),
            ("MaxRecvDataSegmentLength", "262144"),
        ])
    );
    assert_eq!(res.responses[1].login().tsih, 0x1234);
    let Some(Event::LoggedIn(o)) = ini.next_event() else {
        panic!("LoggedIn expected")
    };
    assert_eq!(o.session_type, super::login::SessionType::Discovery);
    assert!(o.target.is_none());
}

#[test]
fn login_may_start_in_the_operational_stage_without_authentication() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::OPERATIONAL, stage::FULL_FEATURE, true);
    let mut p = pairs_without_auth_method(TARGET);
    p.extend(pairs(&[("MaxRecvDataSegmentLength", "65536")]));
    let r = ini.send_login(&req, &p);
    let l = r.login();
    assert_eq!(
        (l.status_class, l.transit, l.nsg, l.tsih),
        (0, true, stage::FULL_FEATURE, 0x1234)
    );
    assert_eq!(r.key("TargetPortalGroupTag").as_deref(), Some("1"));
    assert_eq!(r.key("MaxRecvDataSegmentLength").as_deref(), Some("262144"));
    assert!(matches!(ini.next_event(), Some(Event::LoggedIn(_))));
}

#[test]
fn login_text_continued_with_the_c_bit_is_gathered_before_it_is_answered() {
    let mut ini = Initiator::new();
    let text = text::encode(&first_security_pairs(Some(TARGET)));
    let (a, b) = text.split_at(20);
    let mut req = ini.login_request(stage::SECURITY, 0, false);
    req.continue_bit = true;
    let r = only(ini.send(req.encode(), Bytes::copy_from_slice(a)));
    let l = r.login();
    assert!(
        r.data.is_empty(),
        "a partial request is answered with an empty response"
    );
    assert!(!l.transit && !l.continue_bit);
    assert_eq!(
        (l.csg, l.status_class, l.itt, l.stat_sn),
        (stage::SECURITY, 0, req.itt, 0)
    );
    let mut req2 = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    req2.itt = req.itt;
    let r = only(ini.send(req2.encode(), Bytes::copy_from_slice(b)));
    let l = r.login();
    assert!(l.transit);
    assert_eq!(l.stat_sn, 1);
    assert_eq!(r.key("AuthMethod").as_deref(), Some("None"));
    assert_eq!(r.key("TargetPortalGroupTag").as_deref(), Some("1"));
}

#[test]
fn one_way_chap_login_challenges_and_accepts_the_right_response() {
    let mut ini = Initiator::new();
    let opts = LoginOptions {
        chap: Some(chap_user()),
        ..LoginOptions::target(TARGET_CHAP)
    };
    let res = ini.login(&opts).expect("CHAP login");
    let r0 = &res.responses[0];
    assert!(!r0.login().transit, "no transit before authentication");
    assert_eq!(r0.key("AuthMethod").as_deref(), Some("CHAP"));
    let r1 = &res.responses[1];
    assert_eq!(r1.key("CHAP_A").as_deref(), Some("5"));
    assert_eq!(r1.key("CHAP_I").as_deref(), Some("7"));
    assert_eq!(r1.key("CHAP_C"), Some(text::hex(&CHAP_CHALLENGE)));
    let r2 = &res.responses[2];
    assert!(r2.login().transit);
    assert!(r2.data.is_empty(), "no mutual CHAP asked: {:?}", r2.pairs());
    assert_eq!(res.responses.len(), 4);
}

#[test]
fn mutual_chap_answer_is_the_md5_of_the_initiators_challenge() {
    let mut ini = Initiator::new();
    let challenge = b"initiator-challenge-0001".to_vec();
    let opts = LoginOptions {
        chap: Some(chap_user()),
        mutual: Some((mutual_user(), 42, challenge.clone())),
        ..LoginOptions::target(TARGET_MUTUAL)
    };
    let res = ini.login(&opts).expect("mutual CHAP login");
    let r = &res.responses[2];
    assert_eq!(r.key("CHAP_N").as_deref(), Some("target-user"));
    let want = chap::response(42, b"target-secret-456", &challenge);
    assert_eq!(r.key("CHAP_R"), Some(text::hex(&want)));
}

// ==================================================================== login: failures

#[test]
fn logins_missing_a_name_or_with_an_unknown_session_type_fail() {
    let mut no_initiator_name = first_security_pairs(Some(TARGET));
    no_initiator_name.remove(0);
    let no_target_name = pairs(&[("InitiatorName", INITIATOR), ("AuthMethod", "None")]);
    let bogus_type = pairs(&[("InitiatorName", INITIATOR), ("SessionType", "Bogus")]);
    for (p, status, why) in [
        (no_initiator_name, (2, 7), LoginFailure::MissingParameter),
        (no_target_name, (2, 7), LoginFailure::MissingParameter),
        (bogus_type, (2, 9), LoginFailure::SessionType),
    ] {
        first_login_fails(&p, status, why);
    }
}

#[test]
fn login_to_an_unknown_target_fails_not_found() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = ini.send_login(&req, &first_security_pairs(Some("iqn.2024-01.test:nope")));
    assert_eq!(r.login().itt, req.itt);
    assert_eq!(r.login().isid, ini.isid);
    expect_login_failure(&mut ini, &r, (2, 3), LoginFailure::NotFound);
}

#[test]
fn login_outside_the_acl_fails_authorization() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = ini.send_login(&req, &first_security_pairs(Some(TARGET_ACL)));
    expect_login_failure(&mut ini, &r, (2, 2), LoginFailure::Authorization);
}

#[test]
fn login_inside_the_acl_succeeds() {
    let mut ini = Initiator::new();
    let opts = LoginOptions {
        initiator_name: ALLOWED_INITIATOR.into(),
        ..LoginOptions::target(TARGET_ACL)
    };
    let res = ini.login(&opts).expect("allowed initiator");
    assert_eq!(
        res.responses[0].key("TargetPortalGroupTag").as_deref(),
        Some("4")
    );
}

fn chap_failure(opts: LoginOptions) {
    let mut ini = Initiator::new();
    let r = ini.login(&opts).expect_err("CHAP must fail");
    expect_login_failure(&mut ini, &r, (2, 1), LoginFailure::Authentication);
}

#[test]
fn chap_with_a_wrong_secret_fails_authentication() {
    let creds = Credentials {
        secret: b"not-the-secret".to_vec(),
        ..chap_user()
    };
    chap_failure(LoginOptions {
        chap: Some(creds),
        ..LoginOptions::target(TARGET_CHAP)
    });
}

#[test]
fn chap_with_a_wrong_user_fails_authentication() {
    let creds = Credentials {
        user: "mallory".into(),
        ..chap_user()
    };
    chap_failure(LoginOptions {
        chap: Some(creds),
        ..LoginOptions::target(TARGET_CHAP)
    });
}

#[test]
fn mutual_chap_reflecting_the_targets_challenge_fails_authentication() {
    chap_failure(LoginOptions {
        chap: Some(chap_user()),
        mutual: Some((mutual_user(), CHAP_ID, CHAP_CHALLENGE.to_vec())),
        ..LoginOptions::target(TARGET_MUTUAL)
    });
}

#[test]
fn mutual_chap_against_a_target_without_mutual_credentials_fails() {
    chap_failure(LoginOptions {
        chap: Some(chap_user()),
        mutual: Some((mutual_user(), 1, b"some challenge".to_vec())),
        ..LoginOptions::target(TARGET_CHAP)
    });
}

#[test]
fn chap_required_but_only_none_offered_fails_authentication() {
    let mut ini = Initiator::new();
    let r = ini
        .login(&LoginOptions::target(TARGET_CHAP))
        .expect_err("must fail");
    expect_login_failure(&mut ini, &r, (2, 1), LoginFailure::Authentication);
}

#[test]
fn skipping_the_security_stage_when_chap_is_required_fails_authentication() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::OPERATIONAL, stage::FULL_FEATURE, true);
    let p = pairs_without_auth_method(TARGET_CHAP);
    let r = ini.send_login(&req, &p);
    expect_login_failure(&mut ini, &r, (2, 1), LoginFailure::Authentication);
}

#[test]
fn chap_response_before_a_challenge_fails_authentication() {
    let mut p = pairs_without_auth_method(TARGET_CHAP);
    p.extend(pairs(&[
        ("AuthMethod", "CHAP"),
        ("CHAP_N", "alice"),
        ("CHAP_R", "0x00"),
    ]));
    first_login_fails(&p, (2, 1), LoginFailure::Authentication);
}

#[test]
fn unsupported_version_fails() {
    let mut ini = Initiator::new();
    let mut req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    (req.version_max, req.version_min) = (2, 1);
    let r = ini.send_login(&req, &first_security_pairs(Some(TARGET)));
    expect_login_failure(&mut ini, &r, (2, 5), LoginFailure::Version);
}

#[test]
fn changing_the_isid_during_login_is_an_initiator_error() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::SECURITY, 0, false);
    let r = ini.send_login(&req, &first_security_pairs(Some(TARGET)));
    assert_eq!(r.login().status_class, 0);
    ini.isid[5] ^= 1;
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = ini.send_login(&req, &[]);
    expect_login_failure(&mut ini, &r, (2, 0), LoginFailure::InitiatorError);
}

#[test]
fn malformed_login_text_is_an_initiator_error() {
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = only(ini.send(req.encode(), Bytes::from_static(b"InitiatorName\0")));
    expect_login_failure(&mut ini, &r, (2, 0), LoginFailure::InitiatorError);
}

#[test]
fn a_nonzero_tsih_names_no_session() {
    let mut ini = Initiator::new();
    let mut req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    req.tsih = 77;
    let r = ini.send_login(&req, &first_security_pairs(Some(TARGET)));
    expect_login_failure(&mut ini, &r, (2, 10), LoginFailure::SessionDoesNotExist);
}

#[test]
fn login_response_text_never_exceeds_the_default_receive_limit() {
    // Thousands of unknown keys would be answered NotUnderstood, far beyond the 8192 bytes an
    // initiator accepts during login; the target refuses the login instead.
    let mut ini = Initiator::new();
    let req = ini.login_request(stage::OPERATIONAL, stage::FULL_FEATURE, true);
    let mut p = pairs_without_auth_method(TARGET);
    for i in 0..700 {
        p.push((format!("X-k{i}"), "1".into()));
    }
    let r = ini.send_login(&req, &p);
    assert!(r.data.len() <= 8192);
    expect_login_failure(&mut ini, &r, (2, 0), LoginFailure::InitiatorError);
}

#[test]
fn a_non_login_pdu_during_login_closes_without_an_answer() {
    let mut ini = Initiator::new();
    assert!(ini.nop_out(b"").is_empty());
    assert!(matches!(
        close_reason(&mut ini),
        Some(CloseReason::Fatal(ConnError::Protocol(_)))
    ));
}

#[test]
fn login_that_takes_too_long_times_out() {
    let mut ini = Initiator::new();
    let start = ini.now;
    assert_eq!(
        ini.conn.poll_timeout(),
        Some(start + Duration::from_secs(15))
    );
    let req = ini.login_request(stage::SECURITY, 0, false);
    ini.send_login(&req, &first_security_pairs(Some(TARGET)));
    assert!(ini.advance(Duration::from_secs(14)).is_empty());
    assert!(!ini.conn.is_closed());
    assert!(ini.advance(Duration::from_secs(1)).is_empty());
    assert_eq!(close_reason(&mut ini), Some(CloseReason::LoginTimeout));
    assert_eq!(ini.conn.poll_timeout(), None);
}

// ==================================================================== discovery

fn send_targets(ini: &mut Initiator, value: &str) -> Received {
    only(ini.text(&pairs(&[("SendTargets", value)])))
}

#[test]
fn send_targets_lists_permitted_targets_at_the_local_portal() {
    let mut ini = Initiator::new();
    ini.login_ok(&LoginOptions::discovery());
    let r = send_targets(&mut ini, "All");
    let t = r.text();
    assert!(t.final_bit && !t.continue_bit);
    assert_eq!(t.ttt, RESERVED_TAG);
    assert_eq!((t.stat_sn, t.exp_cmd_sn, t.max_cmd_sn), (2, 2, 9));
    assert_eq!(
        r.pairs(),
        pairs(&[
            ("TargetName", TARGET),
            ("TargetAddress", "192.0.2.1:3260,1"),
            ("TargetName", TARGET_CHAP),
            ("TargetAddress", "192.0.2.1:3260,2"),
            ("TargetName", TARGET_MUTUAL),
            ("TargetAddress", "192.0.2.1:3260,3"),
        ])
    );
}

#[test]
fn send_targets_advertises_configured_portals_to_permitted_initiators() {
    let mut ini = Initiator::new();
    ini.login_ok(&LoginOptions {
        initiator_name: ALLOWED_INITIATOR.into(),
        ..LoginOptions::discovery()
    });
    let r = send_targets(&mut ini, TARGET_ACL);
    assert_eq!(
        r.pairs(),
        pairs(&[
            ("TargetName", TARGET_ACL),
            ("TargetAddress", "198.51.100.7:3260,4"),
            ("TargetAddress", "[2001:db8::7]:3261,4"),
        ])
    );
}

#[test]
fn send_targets_hides_targets_outside_the_acl_even_by_name() {
    let mut ini = Initiator::new();
    ini.login_ok(&LoginOptions::discovery());
    let r = send_targets(&mut ini, TARGET_ACL);
    assert!(r.data.is_empty());
}

#[test]
fn a_long_send_targets_answer_is_split_with_the_c_bit() {
    let mut cfg = config();
    let mut dir = directory();
    for i in 0..10 {
        let t = super::login::TargetEntry {
            name: format!("iqn.2024-01.test:extra{i}"),
            ..Default::default()
        };
        dir.targets.push(t);
    }
    cfg.login.directory = std::sync::Arc::new(dir);
    let mut ini = Initiator::with_config(cfg);
    ini.login_ok(&LoginOptions::discovery().key("MaxRecvDataSegmentLength", "512"));
    let req = TextRequest {
        final_bit: true,
        ..new_text_request(&mut ini)
    };
    let itt = req.itt;
    let first = only(ini.send(
        req.encode(),
        text::encode(&pairs(&[("SendTargets", "All")])),
    ));
    let t = first.text().clone();
    assert!(t.continue_bit && !t.final_bit);
    assert_ne!(t.ttt, RESERVED_TAG);
    assert_eq!(first.data.len(), 512);
    let mut body = first.data.to_vec();
    // The initiator asks for the rest by echoing the TTT with an empty request.
    let next = TextRequest {
        ttt: t.ttt,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: ini.exp_stat_sn,
        ..req
    };
    ini.cmd_sn += 1;
    let second = only(ini.send(next.encode(), Bytes::new()));
    let t2 = second.text();
    assert!(t2.final_bit && !t2.continue_bit);
    assert_eq!(
        (t2.ttt, t2.itt, t2.stat_sn),
        (RESERVED_TAG, itt, t.stat_sn + 1)
    );
    body.extend_from_slice(&second.data);
    let all = text::parse(&body).expect("whole answer parses");
    assert_eq!(all.iter().filter(|(k, _)| k == "TargetName").count(), 13);
    assert!(body.len() > 512);
}

/// A Text Request for a new task (new ITT, no TTT) that takes the next CmdSN.
fn new_text_request(ini: &mut Initiator) -> TextRequest {
    let itt = ini.itt();
    let req = TextRequest {
        itt,
        ttt: RESERVED_TAG,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: ini.exp_stat_sn,
        ..Default::default()
    };
    ini.cmd_sn += 1;
    req
}

#[test]
fn a_text_request_continued_with_the_c_bit_carries_the_targets_ttt() {
    // RFC 7143 §11.10.4 / §11.11.4: the target answers a C-bit request with an empty response
    // carrying a TTT, and the initiator copies that TTT into the next part.
    let mut ini = Initiator::new();
    ini.login_ok(&LoginOptions::discovery());
    let body = text::encode(&pairs(&[("SendTargets", "All")]));
    let (a, b) = body.split_at(5);
    let req = TextRequest {
        continue_bit: true,
        ..new_text_request(&mut ini)
    };
    let r = only(ini.send(req.encode(), Bytes::copy_from_slice(a)));
    let t = r.text().clone();
    assert!(!t.final_bit && !t.continue_bit && r.data.is_empty());
    assert_ne!(t.ttt, RESERVED_TAG);
    let rest = TextRequest {
        final_bit: true,
        continue_bit: false,
        ttt: t.ttt,
        cmd_sn: ini.cmd_sn,
        ..req
    };
    ini.cmd_sn += 1;
    let r = only(ini.send(rest.encode(), Bytes::copy_from_slice(b)));
    assert!(r.text().final_bit);
    assert_eq!(r.key("TargetName").as_deref(), Some(TARGET));
}

#[test]
fn a_text_request_with_an_unknown_ttt_is_rejected() {
    let mut ini = Initiator::new();
    ini.login_ok(&LoginOptions::discovery());
    let req = TextRequest {
        final_bit: true,
        itt: 5,
        ttt: 0x4242,
        cmd_sn: ini.cmd_sn,
        ..Default::default()
    };
    ini.cmd_sn += 1;
    let r = only(ini.send(req.encode(), Bytes::new()));
    assert_eq!(r.reject().reason, reject::INVALID_PDU_FIELD);
}

#[test]
fn send_targets_in_a_normal_session_reports_the_sessions_target() {
    let mut ini = ffp();
    let r = send_targets(&mut ini, "");
    assert_eq!(
        r.pairs(),
        pairs(&[
            ("TargetName", TARGET),
            ("TargetAddress", "192.0.2.1:3260,1")
        ])
    );
}

#[test]
fn a_scsi_command_in_a_discovery_session_is_rejected() {
    let mut ini = Initiator::new();
    ini.login_ok(&LoginOptions::discovery());
    let (_, rs) = ini.read(512);
    let r = only(rs);
    assert_eq!(r.reject().reason, reject::PROTOCOL_ERROR);
    assert_eq!(r.data.len(), 48);
    assert_eq!(
        Bhs(r.data[..].try_into().expect("48")).opcode(),
        Opcode::SCSI_COMMAND
    );
    assert!(ini.take_events().is_empty());
}

// ==================================================================== digests

fn digest_session_with(keys: &[(&str, &str)]) -> Initiator {
    let mut ini = Initiator::new();
    let mut opts = LoginOptions {
        header_digest: true,
        data_digest: true,
        ..Default::default()
    };
    for (k, v) in keys {
        opts = opts.key(k, v);
    }
    let res = ini.login_ok(&opts);
    let op = &res.responses[1];
    assert_eq!(op.key("HeaderDigest").as_deref(), Some("CRC32C"));
    assert_eq!(op.key("DataDigest").as_deref(), Some("CRC32C"));
    assert!(ini.header_digest && ini.data_digest);
    ini
}

fn digest_session() -> Initiator {
    digest_session_with(&[])
}

/// An immediate NOP-Out (ITT 9, no TTT) at the session's CmdSN.
fn ping(ini: &Initiator) -> NopOut {
    NopOut {
        immediate: true,
        itt: 9,
        ttt: RESERVED_TAG,
        cmd_sn: ini.cmd_sn,
        ..Default::default()
    }
}

#[test]
fn digests_apply_to_every_pdu_after_the_last_login_response() {
    let mut ini = digest_session();
    let n = ping(&ini);
    let mut wire = ini.encode(n.encode(), Bytes::from_static(b"abc"));
    ini.conn.handle_input(&mut wire, ini.now);
    let out = ini.conn.tx().take_all();
    // BHS, header digest, "abc" + 1 byte of padding, data digest.
    assert_eq!(out.len(), 48 + 4 + 4 + 4);
    assert_eq!(out[48..52], digest(&out[..48]));
    assert_eq!(&out[52..56], b"abc\0");
    assert_eq!(out[56..60], digest(b"abc\0"));
    assert_eq!(
        Bhs(out[..48].try_into().expect("48")).opcode(),
        Opcode::NOP_IN
    );
}

#[test]
fn a_corrupted_header_digest_closes_the_connection() {
    let mut ini = digest_session();
    let n = ping(&ini);
    let mut wire = ini.encode(n.encode(), Bytes::new());
    wire[20] ^= 0x01;
    assert!(ini.send_raw(&wire).is_empty());
    assert_eq!(
        close_reason(&mut ini),
        Some(CloseReason::Fatal(ConnError::Frame(
            FrameError::HeaderDigest
        )))
    );
    assert_eq!(ini.conn.stats().digest_errors, 1);
}

#[test]
fn a_corrupted_data_out_digest_is_rejected_and_fails_the_command() {
    let mut ini = digest_session_with(&[("InitialR2T", "Yes"), ("ImmediateData", "No")]);
    let c = ini.write_command(4096);
    let r2t = only(ini.send_command(&c, Bytes::new())).r2t().clone();
    let d = ini.data_out(c.itt, r2t.ttt, 0, 0, true);
    let mut wire = ini.encode(d.encode(), Bytes::from(pattern(4096)));
    wire[60] ^= 0x80;
    let rs = ini.send_raw(&wire);
    assert_eq!(rs.len(), 2, "{rs:?}");
    let rej = rs[0].reject();
    assert_eq!(rej.reason, reject::DATA_DIGEST_ERROR);
    let mut echoed = d.encode();
    echoed.set_lengths(0, 4096);
    assert_eq!(
        &rs[0].data[..],
        &echoed.0[..],
        "the rejected header is echoed as received"
    );
    let s = rs[1].scsi();
    assert_eq!(
        (s.itt, s.status, s.response),
        (c.itt, Status::CHECK_CONDITION, 0)
    );
    assert_eq!(
        rs[1].sense_code(),
        Some((SenseKey::ABORTED_COMMAND, 0x47, 0x05))
    );
    assert_eq!(ini.conn.stats().digest_errors, 1);
    assert!(ini.take_events().is_empty());
    assert_eq!(ini.conn.tasks_in_flight(), 0);
}

#[test]
fn a_corrupted_immediate_data_digest_is_rejected_and_fails_the_command() {
    // RFC 7143 §7.8 rejects the PDU; at ErrorRecoveryLevel 0 the initiator cannot resend it,
    // so the command is failed with "protocol service CRC error" instead of hanging until
    // the initiator's SCSI timeout. Linux logs the Reject and completes on the response.
    let mut ini = digest_session();
    let c = ini.write_command(512);
    ini.cmd_sn += 1;
    let mut wire = ini.encode(c.encode(), Bytes::from(pattern(512)));
    wire[52 + 100] ^= 0x01;
    let rs = ini.send_raw(&wire);
    assert_eq!(rs.len(), 2, "{rs:?}");
    assert_eq!(rs[0].reject().reason, reject::DATA_DIGEST_ERROR);
    assert_eq!(rs[1].scsi().itt, c.itt);
    assert_eq!(
        rs[1].sense_code(),
        Some((SenseKey::ABORTED_COMMAND, 0x47, 0x05))
    );
    // The CmdSN was used: the next command runs.
    let (itt, rs) = ini.read(512);
    assert!(rs.is_empty());
    assert_eq!(ini.expect_command().itt(), itt);
    assert!(rs.is_empty());
}

// ==================================================================== CmdSN window

fn window_probe(ini: &mut Initiator) -> (u32, u32) {
    let r = only(ini.nop_out(b""));
    let n = r.nop_in();
    (n.exp_cmd_sn, n.max_cmd_sn)
}

#[test]
fn a_command_beyond_max_cmd_sn_is_dropped_silently() {
    let mut ini = ffp();
    let mut c = ini.read(512).1;
    assert!(c.is_empty());
    ini.expect_command();
    let mut late = ini.scsi_command(&[0x28], 512, true, false);
    late.cmd_sn = ini.cmd_sn + 7; // MaxCmdSN is ExpCmdSN + 6 with one command outstanding.
    c = ini.send(late.encode(), Bytes::new());
    assert!(c.is_empty());
    assert!(ini.take_events().is_empty());
    assert_eq!(ini.conn.stats().cmdsn_dropped, 1);
}

#[test]
fn a_command_below_exp_cmd_sn_is_dropped_silently() {
    let mut ini = ffp();
    ini.read(512);
    ini.expect_command();
    let mut old = ini.scsi_command(&[0x28], 512, true, false);
    old.cmd_sn = ini.cmd_sn - 1;
    assert!(ini.send(old.encode(), Bytes::new()).is_empty());
    assert!(ini.take_events().is_empty());
    assert_eq!(ini.conn.stats().cmdsn_dropped, 1);
}

#[test]
fn commands_after_a_gap_are_held_and_released_in_cmd_sn_order() {
    let mut ini = ffp();
    let base = ini.cmd_sn;
    let a = ini.scsi_command(&[0x28], 512, true, false);
    let mut b = ini.scsi_command(&[0x28], 512, true, false);
    let mut c = ini.scsi_command(&[0x28], 512, true, false);
    b.cmd_sn = base + 1;
    c.cmd_sn = base + 2;
    assert!(ini.send(c.encode(), Bytes::new()).is_empty());
    assert!(ini.send(b.encode(), Bytes::new()).is_empty());
    assert!(ini.take_events().is_empty(), "held until the gap fills");
    ini.send(a.encode(), Bytes::new());
    let order: Vec<u32> = (0..3).map(|_| ini.expect_command().itt()).collect();
    assert_eq!(order, vec![a.itt, b.itt, c.itt]);
    // ExpCmdSN moved past all three: the next command runs at once.
    ini.cmd_sn = base + 3;
    let (d, _) = ini.read(512);
    assert_eq!(ini.expect_command().itt(), d);
    assert_eq!(window_probe(&mut ini).0, base + 4);
}

#[test]
fn immediate_commands_do_not_advance_exp_cmd_sn() {
    let mut ini = ffp();
    let before = window_probe(&mut ini);
    let mut c = ini.scsi_command(&[0x28], 512, true, false);
    c.immediate = true;
    ini.send(c.encode(), Bytes::new());
    assert_eq!(ini.expect_command().itt(), c.itt);
    // Same CmdSN, not immediate: accepted, since ExpCmdSN did not move.
    let (itt, _) = ini.read(512);
    assert_eq!(ini.expect_command().itt(), itt);
    let after = window_probe(&mut ini);
    assert_eq!(after.0, before.0 + 1);
    assert_eq!(
        after.1, before.1,
        "the immediate command does not take a window slot"
    );
}

#[test]
fn max_cmd_sn_closes_at_the_queue_depth_and_reopens_on_completion() {
    let mut ini = ffp();
    let mut itts = Vec::new();
    for _ in 0..8 {
        itts.push(ini.read(512).0);
    }
    assert_eq!(ini.take_events().len(), 8);
    let (exp, max) = window_probe(&mut ini);
    assert_eq!((exp, max), (9, 8), "window closed: MaxCmdSN = ExpCmdSN - 1");
    // A ninth command in the closed window is dropped.
    let (ninth, _) = ini.read(512);
    assert!(ini.take_events().is_empty());
    assert_eq!(ini.conn.stats().cmdsn_dropped, 1);
    let r = ini.complete_good(itts[0], Bytes::from(vec![0u8; 512]));
    let d = r[0].data_in();
    assert_eq!((d.exp_cmd_sn, d.max_cmd_sn), (9, 9));
    // The initiator retries the dropped command with the same CmdSN.
    ini.cmd_sn -= 1;
    let retry = ini.scsi_command(&[0x28], 512, true, false);
    ini.send_command(&retry, Bytes::new());
    assert_eq!(ini.expect_command().itt(), retry.itt);
    assert_ne!(retry.itt, ninth);
}

#[test]
fn max_cmd_sn_never_decreases() {
    let mut ini = ffp();
    let mut last = window_probe(&mut ini).1;
    let mut itts = Vec::new();
    for round in 0..20 {
        if round % 3 != 2 {
            itts.push(ini.read(512).0);
        } else if let Some(itt) = itts.pop() {
            ini.take_events();
            ini.complete_good(itt, Bytes::new());
        }
        let m = window_probe(&mut ini).1;
        assert!(super::seq::le(last, m), "MaxCmdSN went from {last} to {m}");
        last = m;
    }
}

#[test]
fn the_window_works_across_cmd_sn_wrap_around() {
    let mut ini = Initiator::new();
    ini.cmd_sn = u32::MAX - 2;
    ini.login_ok(&LoginOptions::default());
    for _ in 0..6 {
        let (itt, _) = ini.read(512);
        assert_eq!(ini.expect_command().itt(), itt);
        ini.complete_good(itt, Bytes::from(vec![1u8; 512]));
    }
    assert_eq!(window_probe(&mut ini), (3, 10));
}

// ==================================================================== writes

#[test]
fn an_all_immediate_write_runs_without_r2t() {
    let mut ini = ffp();
    let data = pattern(4096);
    let (itt, rs) = ini.write(&data);
    assert!(rs.is_empty(), "no R2T: {rs:?}");
    let c = ini.expect_command();
    assert_eq!(
        (c.itt(), c.cmd.expected_len, c.cmd.write, c.cmd.read),
        (itt, 4096, true, false)
    );
    assert_eq!(&c.cmd.data_out.to_bytes()[..], &data[..]);
    assert_eq!(c.cmd.cdb[0], 0x2a);
    let r = only(ini.complete_write(itt, 4096));
    let s = r.scsi();
    assert_eq!(
        (s.itt, s.status, s.response, s.residual),
        (itt, Status::GOOD, 0, Residual::None)
    );
    assert_eq!((s.stat_sn, s.exp_data_sn), (2, 0));
    assert_eq!((s.exp_cmd_sn, s.max_cmd_sn), (2, 9));
    assert!(r.data.is_empty());
}

#[test]
fn immediate_then_unsolicited_data_then_one_r2t_for_the_rest() {
    let mut ini = with_target_mrdsl(8192, &[("FirstBurstLength", "65536")]);
    let data = pattern(100_000);
    let (itt, rs) = ini.write(&data);
    let r2ts = r2ts(&rs);
    assert_eq!(r2ts.len(), 1, "{rs:?}");
    let r = r2ts[0];
    assert_eq!(
        (r.itt, r.r2t_sn, r.buffer_offset, r.desired_len),
        (itt, 0, 65_536, 34_464)
    );
    assert_ne!(r.ttt, RESERVED_TAG);
    assert_eq!(
        r.stat_sn, 2,
        "R2T carries the next StatSN without advancing it"
    );
    assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (2, 8));
    let c = ini.expect_command();
    assert_eq!(&c.cmd.data_out.to_bytes()[..], &data[..]);
    // Immediate data, then 8 KiB Data-Out PDUs: the pieces as they came, none gathered.
    let lens: Vec<usize> = c.cmd.data_out.parts().iter().map(|p| p.len()).collect();
    assert_eq!(lens.first(), Some(&8192), "{lens:?}");
    assert!(lens.iter().all(|&l| l <= 8192), "{lens:?}");
    assert_eq!(lens.len(), 100_000usize.div_ceil(8192), "{lens:?}");
    let s = only(ini.complete_write(itt, 100_000));
    assert_eq!((s.scsi().stat_sn, s.scsi().residual), (2, Residual::None));
    assert_eq!(s.scsi().exp_data_sn, 1, "one R2T was sent");
}

#[test]
fn solicited_writes_get_r2ts_in_max_burst_pieces_up_to_max_outstanding_r2t() {
    let mut ini = Initiator::logged_in(&[
        ("InitialR2T", "Yes"),
        ("ImmediateData", "No"),
        ("MaxBurstLength", "16384"),
        ("MaxOutstandingR2T", "4"),
    ]);
    let len = 4 * 16384 + 1000;
    let c = ini.write_command(len as u32);
    let rs = ini.send_command(&c, Bytes::new());
    let first: Vec<_> = r2ts(&rs).into_iter().cloned().collect();
    assert_eq!(first.len(), 4);
    for (i, r) in first.iter().enumerate() {
        assert_eq!(
            (r.r2t_sn, r.buffer_offset, r.desired_len),
            (i as u32, i as u32 * 16384, 16384)
        );
    }
    let mut ttts: Vec<u32> = first.iter().map(|r| r.ttt).collect();
    ttts.dedup();
    assert_eq!(ttts.len(), 4, "distinct TTTs");
    let data = pattern(len);
    let more = ini.send_sequence(c.itt, first[0].ttt, 0, &data[..16384]);
    let fifth = only(more).r2t().clone();
    assert_eq!(
        (fifth.r2t_sn, fifth.buffer_offset, fifth.desired_len),
        (4, 65536, 1000)
    );
    for r in &first[1..] {
        let o = r.buffer_offset as usize;
        assert!(ini
            .send_sequence(c.itt, r.ttt, r.buffer_offset, &data[o..o + 16384])
            .is_empty());
    }
    assert!(ini.take_events().is_empty());
    assert!(ini
        .send_sequence(c.itt, fifth.ttt, 65536, &data[65536..])
        .is_empty());
    let cmd = ini.expect_command();
    assert_eq!(&cmd.cmd.data_out.to_bytes()[..], &data[..]);
    let s = only(ini.complete_write(c.itt, len as u32));
    assert_eq!(s.scsi().exp_data_sn, 5);
}

fn solicited() -> (Initiator, super::pdu::ScsiCommand, super::pdu::R2t) {
    let mut ini = Initiator::logged_in(&[("InitialR2T", "Yes"), ("ImmediateData", "No")]);
    let c = ini.write_command(8192);
    let r2t = only(ini.send_command(&c, Bytes::new())).r2t().clone();
    assert_eq!((r2t.buffer_offset, r2t.desired_len), (0, 8192));
    (ini, c, r2t)
}

/// A full-feature session with a 512-byte READ handed to the driver, and its ITT.
fn executing_read() -> (Initiator, u32) {
    let mut ini = ffp();
    let (itt, _) = ini.read(512);
    ini.expect_command();
    (ini, itt)
}

/// A GOOD completion of a read with `n` bytes of [`pattern`] data.
fn good_read(n: usize) -> Completion {
    Completion {
        status: Status::GOOD,
        sense: None,
        data: Bytes::from(pattern(n)),
        transfer_len: n as u32,
    }
}

fn expect_sequence_error(ini: &mut Initiator, rs: Vec<Received>, itt: u32) {
    let r = only(rs);
    let s = r.scsi();
    assert_eq!((s.itt, s.status), (itt, Status::CHECK_CONDITION));
    assert_eq!(r.sense_code().map(|c| c.0), Some(SenseKey::ABORTED_COMMAND));
    assert!(ini.take_events().is_empty());
    // Later Data-Out for the failed task is dropped without a word.
    let d = ini.data_out(itt, 1, 1, 4096, true);
    assert!(ini
        .send(d.encode(), Bytes::from(vec![0u8; 4096]))
        .is_empty());
    assert_eq!(ini.conn.tasks_in_flight(), 0);
}

#[test]
fn a_data_out_out_of_sequence_fails_the_write() {
    // (what is wrong, its TTT from the R2T, DataSN, buffer offset)
    type TttOf = fn(&super::pdu::R2t) -> u32;
    let table: [(&str, TttOf, u32, u32); 4] = [
        ("DataSN", |r2t| r2t.ttt, 1, 0),
        ("buffer offset", |r2t| r2t.ttt, 0, 512),
        ("TTT", |r2t| r2t.ttt.wrapping_add(100), 0, 0),
        // Unsolicited Data-Out when InitialR2T is Yes.
        ("unsolicited", |_| RESERVED_TAG, 0, 0),
    ];
    for (what, ttt, data_sn, offset) in table {
        eprintln!("a wrong {what}");
        let (mut ini, c, r2t) = solicited();
        let d = ini.data_out(c.itt, ttt(&r2t), data_sn, offset, false);
        let rs = ini.send(d.encode(), Bytes::from(vec![0u8; 4096]));
        expect_sequence_error(&mut ini, rs, c.itt);
    }
}

#[test]
fn data_out_for_an_unknown_task_is_rejected() {
    let mut ini = ffp();
    let d = ini.data_out(0xdead, RESERVED_TAG, 0, 0, true);
    let r = only(ini.send(d.encode(), Bytes::from_static(b"data")));
    assert_eq!(r.reject().reason, reject::INVALID_PDU_FIELD);
    let mut echoed = d.encode();
    echoed.set_lengths(0, 4);
    assert_eq!(&r.data[..], &echoed.0[..]);
}

#[test]
fn a_write_larger_than_the_maximum_transfer_fails_with_invalid_field() {
    let mut ini = ffp();
    let mut c = ini.write_command(0);
    c.edtl = (1 << 20) + 512;
    c.final_bit = false;
    let r = only(ini.send_command(&c, Bytes::from(vec![0u8; 512])));
    assert_eq!(r.scsi().status, Status::CHECK_CONDITION);
    assert_eq!(
        r.sense_code(),
        Some((SenseKey::ILLEGAL_REQUEST, 0x24, 0x00))
    );
    // The unsolicited data that follows is dropped quietly.
    let d = ini.data_out(c.itt, RESERVED_TAG, 0, 512, false);
    assert!(ini.send(d.encode(), Bytes::from(vec![0u8; 512])).is_empty());
    assert!(ini.take_events().is_empty());
}

#[test]
fn immediate_data_when_immediate_data_is_no_fails_the_write() {
    let mut ini = Initiator::logged_in(&[("ImmediateData", "No")]);
    let c = ini.write_command(512);
    let r = only(ini.send_command(&c, Bytes::from(vec![0u8; 512])));
    assert_eq!(r.scsi().status, Status::CHECK_CONDITION);
    assert_eq!(
        r.sense_code(),
        Some((SenseKey::ABORTED_COMMAND, 0x0c, 0x0c))
    );
    // Fixed-format sense data, 18 bytes, nothing beyond the key and ASC/ASCQ.
    let mut fixed = [0u8; 18];
    (fixed[0], fixed[2], fixed[7], fixed[12], fixed[13]) = (0x70, 0x0b, 10, 0x0c, 0x0c);
    assert_eq!(r.sense().as_deref(), Some(&fixed[..]));
    assert!(ini.take_events().is_empty());
}

#[test]
fn an_extended_cdb_ahs_extends_the_cdb() {
    let mut ini = ffp();
    let c = ini.scsi_command(&[0x7f, 0, 0, 0, 0, 0, 0, 0x18], 0, false, false);
    ini.cmd_sn += 1;
    let mut bhs = c.encode();
    bhs.set_lengths(2, 0);
    // AHSLength 5 (4 CDB bytes + the reserved byte), type 1 (extended CDB), reserved.
    let ahs = [0, 5, 1, 0, 0xa0, 0xa1, 0xa2, 0xa3];
    assert!(ini.send_raw(&[&bhs.0[..], &ahs[..]].concat()).is_empty());
    let cmd = ini.expect_command();
    assert_eq!(cmd.cmd.cdb.len(), 20);
    assert_eq!(&cmd.cmd.cdb[..8], &[0x7f, 0, 0, 0, 0, 0, 0, 0x18]);
    assert_eq!(&cmd.cmd.cdb[16..], &[0xa0, 0xa1, 0xa2, 0xa3]);
}

#[test]
fn a_reused_itt_is_rejected_as_task_in_progress() {
    let (mut ini, itt) = executing_read();
    let mut again = ini.scsi_command(&[0x28], 512, true, false);
    again.itt = itt;
    let r = only(ini.send_command(&again, Bytes::new()));
    assert_eq!(r.reject().reason, reject::TASK_IN_PROGRESS);
}

#[test]
fn immediate_commands_beyond_the_queue_depth_are_rejected() {
    let mut ini = ffp();
    let mut rejected = 0;
    for _ in 0..20 {
        let mut c = ini.scsi_command(&[0x28], 512, true, false);
        c.immediate = true;
        for r in ini.send(c.encode(), Bytes::new()) {
            assert_eq!(r.reject().reason, reject::IMMEDIATE_COMMAND_REJECT);
            rejected += 1;
        }
    }
    assert_eq!(ini.conn.tasks_in_flight(), 8);
    assert_eq!(rejected, 12);
}

// ==================================================================== reads

#[test]
fn read_data_is_split_at_the_initiators_receive_limit_with_status_collapsed() {
    let mut ini = Initiator::logged_in(&[("MaxRecvDataSegmentLength", "4096")]);
    let (itt, _) = ini.read(10_000);
    ini.expect_command();
    let data = pattern(10_000);
    let rs = ini.complete_good(itt, data.clone());
    let d = data_ins(&rs);
    assert_eq!(rs.len(), 3, "no separate SCSI Response");
    let lens: Vec<usize> = rs.iter().map(|r| r.data.len()).collect();
    assert_eq!(lens, vec![4096, 4096, 1808]);
    for (i, x) in d.iter().enumerate() {
        assert_eq!(
            (x.itt, x.data_sn, x.buffer_offset),
            (itt, i as u32, i as u32 * 4096)
        );
        assert_eq!(x.ttt, RESERVED_TAG);
        assert_eq!((x.exp_cmd_sn, x.max_cmd_sn), (2, 9));
    }
    assert!(!d[0].final_bit && !d[1].final_bit && d[2].final_bit);
    assert_eq!((d[0].status, d[1].status), (None, None));
    assert_eq!(d[2].status, Some(Status::GOOD));
    assert_eq!((d[2].residual, d[2].stat_sn), (Residual::None, 2));
    assert_eq!(assemble(&rs, itt), data);
}

#[test]
fn data_in_sequences_end_with_the_f_bit_at_every_max_burst_length() {
    let mut ini = Initiator::logged_in(&[
        ("MaxRecvDataSegmentLength", "4096"),
        ("MaxBurstLength", "8192"),
    ]);
    let (itt, _) = ini.read(20_000);
    ini.expect_command();
    let rs = ini.complete_good(itt, pattern(20_000));
    let f: Vec<bool> = data_ins(&rs).iter().map(|d| d.final_bit).collect();
    assert_eq!(f, vec![false, true, false, true, true]);
    assert_eq!(rs.last().map(|r| r.data.len()), Some(20_000 - 16_384));
}

#[test]
fn check_condition_goes_in_a_scsi_response_with_length_prefixed_sense() {
    let (mut ini, itt) = executing_read();
    let sense = Bytes::from(vec![
        0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0,
    ]);
    let c = Completion {
        status: Status::CHECK_CONDITION,
        sense: Some(sense.clone()),
        data: Bytes::new(),
        transfer_len: 512,
    };
    let r = only(ini.complete(itt, c));
    let s = r.scsi();
    assert_eq!(
        (s.itt, s.status, s.response, s.exp_data_sn),
        (itt, Status::CHECK_CONDITION, 0, 0)
    );
    assert_eq!(&r.data[..2], &[0, 18]);
    assert_eq!(r.sense(), Some(sense));
}

#[test]
fn read_data_with_sense_is_sent_before_a_separate_response() {
    let mut ini = Initiator::logged_in(&[("MaxRecvDataSegmentLength", "512")]);
    let (itt, _) = ini.read(1024);
    ini.expect_command();
    let c = Completion {
        status: Status::CHECK_CONDITION,
        sense: Some(Bytes::from(vec![
            0x70, 0, 3, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0,
        ])),
        data: Bytes::from(pattern(1024)),
        transfer_len: 1024,
    };
    let rs = ini.complete(itt, c);
    assert_eq!(rs.len(), 3);
    assert!(data_ins(&rs).iter().all(|d| d.status.is_none()));
    assert!(data_ins(&rs)[1].final_bit);
    assert_eq!(rs[2].scsi().exp_data_sn, 2);
    assert_eq!(rs[2].scsi().stat_sn, 2);
}

#[test]
fn a_short_read_reports_an_underflow_residual() {
    let mut ini = ffp();
    let (itt, _) = ini.read(4096);
    ini.expect_command();
    let c = good_read(1024);
    let r = only(ini.complete(itt, c));
    assert_eq!(r.data_in().residual, Residual::Underflow(3072));
    assert_eq!(r.data.len(), 1024);
}

#[test]
fn a_read_beyond_edtl_is_truncated_and_reports_an_overflow_residual() {
    let (mut ini, itt) = executing_read();
    let c = good_read(1024);
    let r = only(ini.complete(itt, c));
    assert_eq!(r.data.len(), 512);
    assert_eq!(r.data_in().residual, Residual::Overflow(512));
}

#[test]
fn a_command_with_edtl_zero_that_wanted_data_reports_overflow_in_the_response() {
    let mut ini = ffp();
    let c = ini.scsi_command(&[0x12, 0, 0, 0, 36, 0], 0, false, false);
    ini.send_command(&c, Bytes::new());
    ini.expect_command();
    let done = Completion {
        status: Status::GOOD,
        sense: None,
        data: Bytes::from(vec![0u8; 36]),
        transfer_len: 36,
    };
    let r = only(ini.complete(c.itt, done));
    let s = r.scsi();
    assert_eq!(
        (s.status, s.residual),
        (Status::GOOD, Residual::Overflow(36))
    );
    assert!(r.data.is_empty());
}

#[test]
fn a_write_shorter_than_the_command_wants_reports_overflow() {
    let mut ini = ffp();
    let (itt, _) = ini.write(&pattern(512));
    ini.expect_command();
    let c = Completion {
        status: Status::GOOD,
        sense: None,
        data: Bytes::new(),
        transfer_len: 1024,
    };
    assert_eq!(
        only(ini.complete(itt, c)).scsi().residual,
        Residual::Overflow(512)
    );
}

// ==================================================================== NOP

#[test]
fn a_nop_out_ping_is_echoed_with_the_next_stat_sn() {
    let mut ini = ffp();
    let r = only(ini.nop_out(b"hello"));
    let n = r.nop_in();
    assert_eq!(n.ttt, RESERVED_TAG);
    assert_eq!((n.stat_sn, n.exp_cmd_sn, n.max_cmd_sn), (2, 1, 8));
    assert_eq!(&r.data[..], b"hello");
    assert_eq!(only(ini.nop_out(b"")).nop_in().stat_sn, 3);
}

#[test]
fn nop_in_echo_is_truncated_to_the_initiators_receive_limit() {
    let mut ini = Initiator::logged_in(&[("MaxRecvDataSegmentLength", "512")]);
    let r = only(ini.nop_out(&pattern(2000)));
    assert_eq!(&r.data[..], &pattern(512)[..]);
}

#[test]
fn an_unsolicited_nop_out_is_not_answered() {
    let mut ini = ffp();
    let n = NopOut {
        immediate: true,
        itt: RESERVED_TAG,
        ttt: RESERVED_TAG,
        cmd_sn: ini.cmd_sn,
        ..Default::default()
    };
    assert!(ini.send(n.encode(), Bytes::new()).is_empty());
}

#[test]
fn an_idle_initiator_is_pinged_and_dropped_when_it_does_not_answer() {
    let mut ini = ffp();
    let t0 = ini.now;
    assert_eq!(ini.conn.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    assert!(ini.advance(Duration::from_secs(4)).is_empty());
    let r = only(ini.advance(Duration::from_secs(1)));
    let n = r.nop_in();
    assert_eq!(n.itt, RESERVED_TAG);
    assert_ne!(n.ttt, RESERVED_TAG);
    assert_eq!(n.stat_sn, 2, "a ping does not advance StatSN");
    assert_eq!(ini.conn.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    assert!(ini.advance(Duration::from_secs(5)).is_empty());
    assert_eq!(close_reason(&mut ini), Some(CloseReason::NopTimeout));
}

#[test]
fn answering_the_ping_keeps_the_connection() {
    let mut ini = ffp();
    let ping = only(ini.advance(Duration::from_secs(5))).nop_in().clone();
    let answer = answer_ping(&ping, ini.cmd_sn, ini.exp_stat_sn);
    assert!(ini.send(answer.encode(), Bytes::new()).is_empty());
    assert!(ini.advance(Duration::from_secs(4)).is_empty());
    assert!(!ini.conn.is_closed());
    assert_eq!(close_reason(&mut ini), None);
    // Idle again: another ping, not a close.
    assert_eq!(
        only(ini.advance(Duration::from_secs(1))).nop_in().itt,
        RESERVED_TAG
    );
    assert!(!ini.conn.is_closed());
}

// ==================================================================== task management

/// The task management request the connection hands the driver next.
fn next_tmf(ini: &mut Initiator) -> TmfEvent {
    let Some(Event::TaskMgmt(t)) = ini.next_event() else {
        panic!("TaskMgmt event expected")
    };
    t
}

#[test]
fn abort_task_on_an_executing_command_waits_for_the_driver() {
    let (mut ini, itt) = executing_read();
    assert!(ini.tmf(tmf::ABORT_TASK, itt, 1).is_empty());
    let t = next_tmf(&mut ini);
    assert_eq!(
        (t.function, t.rtt, t.aborted.clone()),
        (tmf::ABORT_TASK, itt, vec![itt])
    );
    // The late completion of the aborted command is ignored.
    assert!(ini.complete_good(itt, pattern(512)).is_empty());
    let r = only(ini.complete_tmf(t.itt, t.function, 0));
    let m = r.tmf();
    assert_eq!((m.response, m.itt, m.stat_sn), (0, t.itt, 2));
    assert_eq!(
        (m.exp_cmd_sn, m.max_cmd_sn),
        (2, 9),
        "the aborted task's slot is free again"
    );
}

#[test]
fn abort_task_for_a_task_that_does_not_exist_answers_1() {
    let (mut ini, itt) = executing_read();
    ini.complete_good(itt, pattern(512));
    // RefCmdSN 1 is below ExpCmdSN: outside the window, so "task does not exist".
    let r = only(ini.tmf(tmf::ABORT_TASK, itt, 1));
    assert_eq!(r.tmf().response, 1);
    assert!(ini.take_events().is_empty());
}

#[test]
fn abort_task_for_a_lost_command_in_the_window_fills_its_cmd_sn() {
    // RFC 7143 §11.6.1 b): the task is unknown but RefCmdSN is in the window and older than
    // the TMF: the CmdSN counts as received and the answer is "function complete", so the
    // commands held behind the hole run.
    let mut ini = ffp();
    let lost = ini.scsi_command(&[0x28], 512, true, false);
    ini.cmd_sn += 1;
    let (next, _) = ini.read(512);
    assert!(ini.take_events().is_empty(), "held behind the lost command");
    let r = only(ini.tmf(tmf::ABORT_TASK, lost.itt, lost.cmd_sn));
    assert_eq!(r.tmf().response, 0);
    assert_eq!(ini.expect_command().itt(), next);
}

#[test]
fn logical_unit_reset_aborts_the_tasks_of_that_lun_only() {
    let mut ini = ffp();
    let (a, _) = ini.read(512);
    let (b, _) = ini.read(512);
    let mut other = ini.scsi_command(&[0x28], 512, true, false);
    other.lun = [0, 1, 0, 0, 0, 0, 0, 0];
    ini.send_command(&other, Bytes::new());
    assert_eq!(ini.take_events().len(), 3);
    assert!(ini.tmf(tmf::LOGICAL_UNIT_RESET, RESERVED_TAG, 0).is_empty());
    let t = next_tmf(&mut ini);
    let mut aborted = t.aborted.clone();
    aborted.sort_unstable();
    assert_eq!(aborted, vec![a, b]);
    assert_eq!(ini.conn.tasks_in_flight(), 1);
    assert_eq!(
        only(ini.complete_tmf(t.itt, t.function, 0)).tmf().response,
        0
    );
    assert_eq!(
        only(ini.complete_good(other.itt, pattern(512)))
            .data_in()
            .itt,
        other.itt
    );
}

#[test]
fn abort_task_set_aborts_a_write_still_collecting_data() {
    let (mut ini, c, r2t) = solicited();
    ini.tmf(tmf::ABORT_TASK_SET, RESERVED_TAG, 0);
    let t = next_tmf(&mut ini);
    assert!(t.aborted.is_empty(), "nothing was executing");
    let d = ini.data_out(c.itt, r2t.ttt, 0, 0, true);
    assert!(ini
        .send(d.encode(), Bytes::from(vec![0u8; 8192]))
        .is_empty());
    assert!(ini.take_events().is_empty());
}

#[test]
fn clear_aca_and_task_reassign_are_answered_at_once() {
    let mut ini = ffp();
    assert_eq!(
        only(ini.tmf(tmf::CLEAR_ACA, RESERVED_TAG, 0))
            .tmf()
            .response,
        5
    );
    assert_eq!(only(ini.tmf(tmf::TASK_REASSIGN, 5, 0)).tmf().response, 4);
    assert!(ini.take_events().is_empty());
}

#[test]
fn target_cold_reset_closes_the_connection_once_answered() {
    let (mut ini, itt) = executing_read();
    assert!(ini.tmf(tmf::TARGET_COLD_RESET, RESERVED_TAG, 0).is_empty());
    let t = next_tmf(&mut ini);
    assert_eq!(t.aborted, vec![itt]);
    assert_eq!(
        only(ini.complete_tmf(t.itt, t.function, 0)).tmf().response,
        0
    );
    assert_eq!(close_reason(&mut ini), Some(CloseReason::ColdReset));
}

// ==================================================================== logout

#[test]
fn logout_waits_for_tasks_in_flight() {
    let (mut ini, itt) = executing_read();
    assert!(ini.logout(0).is_empty());
    let rs = ini.complete_good(itt, pattern(512));
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].data_in().status, Some(Status::GOOD));
    let l = rs[1].logout();
    assert_eq!(
        (l.response, l.stat_sn, l.time2wait, l.time2retain),
        (0, 3, 2, 0)
    );
    assert_eq!(close_reason(&mut ini), Some(CloseReason::Logout));
}

#[test]
fn logout_for_recovery_answers_recovery_not_supported_and_stays() {
    let mut ini = ffp();
    let r = only(ini.logout(2));
    assert_eq!(r.logout().response, 2);
    assert!(!ini.conn.is_closed());
    assert_eq!(only(ini.nop_out(b"")).nop_in().stat_sn, 3);
}

#[test]
fn logout_of_another_connection_answers_cid_not_found() {
    let mut ini = ffp();
    let l = LogoutRequest {
        immediate: true,
        reason: 1,
        itt: 3,
        cid: 9,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: 0,
    };
    assert_eq!(
        only(ini.send(l.encode(), Bytes::new())).logout().response,
        1
    );
    assert!(!ini.conn.is_closed());
}

// ==================================================================== rejects

#[test]
fn an_unknown_opcode_is_rejected_with_its_header_echoed() {
    let mut ini = ffp();
    let mut b = Bhs::default();
    b.0[0] = 0x1c;
    b.0[16..20].copy_from_slice(&0x55u32.to_be_bytes());
    let r = only(ini.send(b, Bytes::new()));
    let rej = r.reject();
    assert_eq!(rej.reason, reject::COMMAND_NOT_SUPPORTED);
    assert_eq!((rej.stat_sn, rej.exp_cmd_sn, rej.max_cmd_sn), (2, 1, 8));
    assert_eq!(r.bhs.itt(), RESERVED_TAG);
    assert_eq!(&r.data[..], &b.0[..]);
}

#[test]
fn a_snack_is_rejected_at_error_recovery_level_0() {
    let mut ini = ffp();
    let s = SnackRequest {
        itt: 4,
        ..Default::default()
    };
    let r = only(ini.send(s.encode(), Bytes::new()));
    assert_eq!(r.reject().reason, reject::PROTOCOL_ERROR);
    assert_eq!(
        Bhs(r.data[..].try_into().expect("48")).opcode(),
        Opcode::SNACK_REQUEST
    );
}

#[test]
fn a_login_request_in_full_feature_phase_is_rejected() {
    let mut ini = ffp();
    let req = ini.login_request(stage::SECURITY, stage::OPERATIONAL, true);
    let r = only(ini.send(req.encode(), Bytes::new()));
    assert_eq!(r.reject().reason, reject::PROTOCOL_ERROR);
}

#[test]
fn the_test_initiator_decodes_every_target_pdu_kind() {
    // Sanity of the harness itself: a full conversation leaves nothing undecoded.
    let mut ini = ffp();
    let (itt, _) = ini.write(&pattern(1024));
    ini.expect_command();
    ini.complete_good(itt, Bytes::new());
    let (itt, _) = ini.read(1024);
    ini.expect_command();
    let rs = ini.complete_good(itt, pattern(1024));
    assert!(matches!(rs[0].pdu, Response::DataIn(_)));
    assert!(ini.conn.tx().is_empty());
    ini.conn.check_invariants();
}

// ==================================================================== model-based

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Read(u16),
        Write(u16),
        CompleteOldest,
        CompleteNewest,
        Nop,
        AbortOldest,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u16..40).prop_map(|b| Op::Read(b * 512)),
            (1u16..40).prop_map(|b| Op::Write(b * 512)),
            Just(Op::CompleteOldest),
            Just(Op::CompleteNewest),
            Just(Op::Nop),
            Just(Op::AbortOldest),
        ]
    }

    /// StatSN of PDUs that carry (and advance) one.
    fn stat_sn(r: &Received) -> Option<u32> {
        match &r.pdu {
            Response::ScsiResponse(p) => Some(p.stat_sn),
            Response::DataIn(p) if p.status.is_some() => Some(p.stat_sn),
            Response::NopIn(p) if p.itt != RESERVED_TAG => Some(p.stat_sn),
            Response::TaskMgmt(p) => Some(p.stat_sn),
            Response::Text(p) => Some(p.stat_sn),
            Response::Logout(p) => Some(p.stat_sn),
            Response::Reject(p) => Some(p.stat_sn),
            _ => None,
        }
    }

    fn window(r: &Received) -> Option<(u32, u32)> {
        match &r.pdu {
            Response::ScsiResponse(p) => Some((p.exp_cmd_sn, p.max_cmd_sn)),
            Response::DataIn(p) => Some((p.exp_cmd_sn, p.max_cmd_sn)),
            Response::NopIn(p) => Some((p.exp_cmd_sn, p.max_cmd_sn)),
            Response::TaskMgmt(p) => Some((p.exp_cmd_sn, p.max_cmd_sn)),
            Response::R2t(p) => Some((p.exp_cmd_sn, p.max_cmd_sn)),
            _ => None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever valid conversation a Linux-like initiator has, StatSN advances by one per
        /// status, ExpCmdSN and MaxCmdSN never go back, every command gets exactly one status
        /// (unless aborted) and read data arrives whole.
        #[test]
        fn conversations_keep_the_sequence_numbers_straight(
            ops in proptest::collection::vec(op(), 1..60),
            r2t in any::<bool>(),
        ) {
            let keys: &[(&str, &str)] = if r2t {
                &[("InitialR2T", "Yes"), ("ImmediateData", "No"), ("MaxBurstLength", "4096"),
                  ("MaxOutstandingR2T", "2"), ("MaxRecvDataSegmentLength", "2048")]
            } else {
                &[("MaxRecvDataSegmentLength", "4096")]
            };
            let mut ini = Initiator::logged_in(keys);
            let mut seen: Vec<Received> = Vec::new();
            let mut running: Vec<(u32, bool, u32)> = Vec::new(); // (itt, read, edtl)
            let mut expected_data: HashMap<u32, Vec<u8>> = HashMap::new();
            let mut aborted: Vec<u32> = Vec::new();
            let mut issued: Vec<u32> = Vec::new();
            for op in ops {
                let out = match op {
                    Op::Read(n) if running.len() < 8 => {
                        let (itt, rs) = ini.read(u32::from(n));
                        issued.push(itt);
                        running.push((itt, true, u32::from(n)));
                        rs
                    }
                    Op::Write(n) if running.len() < 8 => {
                        let (itt, rs) = ini.write(&pattern(n as usize));
                        issued.push(itt);
                        running.push((itt, false, u32::from(n)));
                        rs
                    }
                    Op::CompleteOldest | Op::CompleteNewest if !running.is_empty() => {
                        let i = if matches!(op, Op::CompleteOldest) { 0 } else { running.len() - 1 };
                        let (itt, read, edtl) = running.remove(i);
                        if read {
                            let data = pattern(edtl as usize);
                            expected_data.insert(itt, data.clone());
                            ini.complete_good(itt, data)
                        } else {
                            ini.complete_write(itt, edtl)
                        }
                    }
                    Op::AbortOldest if !running.is_empty() => {
                        let (itt, _, _) = running.remove(0);
                        aborted.push(itt);
                        let mut rs = ini.tmf(tmf::ABORT_TASK, itt, 0);
                        while let Some(t) = ini.pending_tmf.first().cloned() {
                            rs.extend(ini.complete_tmf(t.itt, t.function, 0));
                        }
                        rs
                    }
                    _ => ini.nop_out(b"x"),
                };
                // Writes still collecting data are not in `pending` yet; everything else is.
                for e in ini.take_events() {
                    prop_assert!(matches!(e, Event::Command(_) | Event::TaskMgmt(_)), "{e:?}");
                }
                seen.extend(out);
            }
            let sns: Vec<u32> = seen.iter().filter_map(stat_sn).collect();
            for w in sns.windows(2) {
                prop_assert_eq!(w[1], w[0].wrapping_add(1), "StatSN advances by one");
            }
            let mut last = seen.iter().find_map(window).unwrap_or((0, 0));
            for r in &seen {
                if let Some((e, m)) = window(r) {
                    prop_assert!(super::super::seq::le(last.0, e) && super::super::seq::le(last.1, m));
                    last = (e, m);
                }
            }
            let mut statuses: HashMap<u32, usize> = HashMap::new();
            for r in &seen {
                let itt = match &r.pdu {
                    Response::ScsiResponse(p) => Some(p.itt),
                    Response::DataIn(p) if p.status.is_some() => Some(p.itt),
                    _ => None,
                };
                if let Some(itt) = itt {
                    *statuses.entry(itt).or_default() += 1;
                }
            }
            for itt in &issued {
                let n = statuses.get(itt).copied().unwrap_or(0);
                let open = running.iter().any(|r| r.0 == *itt);
                if aborted.contains(itt) || open {
                    prop_assert!(n <= 1);
                } else {
                    prop_assert_eq!(n, 1, "one status for {}", itt);
                }
            }
            for (itt, data) in &expected_data {
                prop_assert_eq!(&assemble(&seen, *itt), data);
            }
            ini.conn.check_invariants();
        }
    }
}
