//! Hostile input against a running target: garbage bytes, oversized length fields, wrong
//! CHAP answers, unknown opcodes. Each gets a protocol answer or a dropped connection within a
//! second or two, never a hang or a crash, and the target keeps serving a healthy session
//! throughout (checked with libiscsi's `iscsi-inq` and our own initiator).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tessera_integration_tests::{require_tool, run, Demo};
use tessera_proto::iscsi::framer::{Framer, TxQueue};
use tessera_proto::iscsi::pdu::{
    stage, Bhs, LoginRequest, LoginResponse, Opcode, Pdu, Reject, Response,
};
use tessera_proto::iscsi::text;

const SECRET: &str = "the-right-secret-42";

fn connect(demo: &Demo) -> TcpStream {
    let s = TcpStream::connect(demo.portal).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn send(s: &mut TcpStream, bhs: Bhs, data: &[u8]) {
    let mut q = TxQueue::new();
    q.push_pdu(bhs, Bytes::copy_from_slice(data), false, false);
    s.write_all(&q.take_all()).expect("send");
}

fn recv(s: &mut TcpStream) -> Option<Pdu> {
    let f = Framer::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(fr) = f.decode(&mut buf).expect("target sends valid framing") {
            return Some(fr.pdu);
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("no answer from the target: {e}"),
        }
    }
}

/// The connection ends (EOF or reset) without hanging.
fn expect_closed(s: &mut TcpStream, what: &str) {
    let start = Instant::now();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                start.elapsed() < Duration::from_secs(5),
                "{what}: still open"
            ),
        }
    }
}

fn login_pdu(itt: u32, csg: u8, nsg: u8, transit: bool) -> Bhs {
    LoginRequest {
        transit,
        csg,
        nsg,
        isid: [0x80, 0, 0, 0, 0x12, 0x34],
        itt,
        cmd_sn: 1,
        ..Default::default()
    }
    .encode()
}

fn healthy(demo: &Demo) {
    let out = run(
        Command::new("iscsi-inq").arg(demo.url(0)),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iscsi-inq failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("TESSERA"), "unexpected INQUIRY: {text}");
}

#[test]
fn hostile_input_is_answered_and_the_target_keeps_serving() {
    require_tool("iscsi-inq", "libiscsi-bin");
    let demo = Demo::start(&["--backend", "mem", "--size", "64MiB"]);
    healthy(&demo);

    // 1. Garbage: random bytes instead of a BHS.
    let mut s = connect(&demo);
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&garbage);
    expect_closed(&mut s, "garbage");

    // 2. A login whose DataSegmentLength claims 16 MiB: refused before it is buffered.
    let mut s = connect(&demo);
    let mut bhs = login_pdu(1, stage::OPERATIONAL, stage::FULL_FEATURE, true);
    bhs.0[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    s.write_all(&bhs.0).unwrap();
    expect_closed(&mut s, "oversized length");

    // 3. A half-sent PDU and silence: the login timer ends it, other sessions unaffected.
    let mut s = connect(&demo);
    s.write_all(&bhs.0[..20]).unwrap();
    healthy(&demo);
    drop(s);

    // 4. Not a login request first.
    let mut s = connect(&demo);
    let mut b = Bhs::default();
    b.0[0] = Opcode::SCSI_COMMAND.0;
    send(&mut s, b, &[]);
    expect_closed(&mut s, "command before login");

    healthy(&demo);
    assert!(demo.stop());
}

#[test]
fn wrong_chap_answers_get_authentication_failure() {
    let demo = Demo::start(&[
        "--backend",
        "mem",
        "--size",
        "64MiB",
        "--chap",
        &format!("alice:{SECRET}"),
    ]);
    for (user, resp) in [
        ("alice", "0x00112233445566778899aabbccddeeff"),
        ("mallory", "0x00"),
        ("alice", "nothex"),
    ] {
        let mut s = connect(&demo);
        let keys = text::encode(&[
            ("InitiatorName", "iqn.2024-01.test:bad-input"),
            ("TargetName", demo.iqn.as_str()),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ]);
        send(
            &mut s,
            login_pdu(1, stage::SECURITY, stage::OPERATIONAL, false),
            &keys,
        );
        let r = recv(&mut s).expect("login response");
        let lr = LoginResponse::decode(&r.bhs);
        assert_eq!((lr.status_class, lr.status_detail), (0, 0));
        send(
            &mut s,
            login_pdu(2, stage::SECURITY, stage::OPERATIONAL, false),
            &text::encode(&[("CHAP_A", "5")]),
        );
        let r = recv(&mut s).expect("challenge");
        let pairs = text::parse(&r.data).unwrap();
        assert!(pairs.iter().any(|(k, _)| k == "CHAP_C"), "{pairs:?}");
        send(
            &mut s,
            login_pdu(3, stage::SECURITY, stage::OPERATIONAL, true),
            &text::encode(&[("CHAP_N", user), ("CHAP_R", resp)]),
        );
        let r = recv(&mut s).expect("failure response");
        let lr = LoginResponse::decode(&r.bhs);
        assert_eq!(
            (lr.status_class, lr.status_detail),
            (2, 1),
            "{user}/{resp}: authentication failure"
        );
        expect_closed(&mut s, "after authentication failure");
    }
    // The right secret still works (libiscsi logs in with CHAP from the URL).
    let url = format!("iscsi://alice%{SECRET}@{}/{}/0", demo.portal, demo.iqn);
    let out = run(Command::new("iscsi-inq").arg(&url), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "CHAP login failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(demo.stop());
}

#[test]
fn unknown_opcodes_after_login_get_a_reject() {
    let demo = Demo::start(&["--backend", "mem", "--size", "64MiB"]);
    let mut s = connect(&demo);
    let keys = text::encode(&[
        ("InitiatorName", "iqn.2024-01.test:bad-input"),
        ("TargetName", demo.iqn.as_str()),
    ]);
    send(
        &mut s,
        login_pdu(1, stage::OPERATIONAL, stage::FULL_FEATURE, true),
        &keys,
    );
    let r = recv(&mut s).expect("login response");
    let lr = LoginResponse::decode(&r.bhs);
    assert_eq!(
        (lr.status_class, lr.status_detail, lr.transit),
        (0, 0, true)
    );
    let mut b = Bhs::default();
    b.0[0] = 0x1d; // no such opcode
    b.0[16..20].copy_from_slice(&7u32.to_be_bytes());
    send(&mut s, b, &[]);
    let r = recv(&mut s).expect("reject");
    let Ok(Response::Reject(Reject { reason, .. })) = Response::decode(&r.bhs) else {
        panic!("expected Reject, got {:?}", r.bhs)
    };
    assert_eq!(reason, 0x05, "command not supported");
    assert_eq!(
        &r.data[..],
        &b.0[..],
        "the Reject carries the rejected header"
    );
    assert!(demo.stop());
}
