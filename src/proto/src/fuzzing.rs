//! Entry points of the fuzz targets in `src/proto/fuzz/` (each target is a one-liner calling a
//! function here, rustls style), so the harness logic is compiled, linted and unit-tested with
//! the crate. Not part of the public API.
//!
//! Every function takes arbitrary bytes, must not panic, and asserts the invariants that keep
//! a hostile peer from growing memory or output without bound:
//!
//! - [`framer`]: bytes through [`Framer::decode`] with the mode byte choosing digests and the
//!   data segment limit; every frame re-encodes to itself.
//! - [`conn`]: a script of byte feeds, command completions, task management answers and clock
//!   ticks against a fresh [`Connection`](crate::iscsi::conn::Connection), raw from the first
//!   byte or after a scripted login; everything the target sends must frame and decode.
//! - [`text`]: [`text::parse`] and the login state machine with arbitrary text.
//! - [`cdb`]: [`scsi::cdb::Command::parse`](crate::scsi::cdb::Command::parse) on arbitrary
//!   bytes: a command or sense data, never a panic, and the same answer twice.
//!
//! # Script format of [`conn`]
//!
//! One mode byte, then operations:
//!
//! | op | bytes | meaning |
//! | --- | --- | --- |
//! | `0x00` | `len:u16be`, `len` bytes | feed bytes |
//! | `0x01` | `sel`, `status`, `len:u16be`, `transfer:u16be` | complete pending command `sel` |
//! | `0x02` | `sel`, `response` | answer pending task management request `sel` |
//! | `0x03` | `ticks` | advance the clock `ticks` × 250 ms and run timers |
//! | other | the rest of the input | feed it all (so a raw byte stream is a valid script) |
//!
//! Mode bits: 0 scripted login first, 1 header digest, 2 data digest, 3 discovery session,
//! 4 CHAP, 5 mutual CHAP, 6 InitialR2T=Yes and ImmediateData=No.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::iscsi::chap;
use crate::iscsi::conn::{Completion, Event};
use crate::iscsi::framer::{Framer, TxQueue};
use crate::iscsi::login::{Login, LoginStep};
use crate::iscsi::pdu::{LoginRequest, Request, Response, BHS_LEN};
use crate::iscsi::testing::{self, Initiator, LoginOptions};
use crate::iscsi::text;

/// Feed op tag.
pub const OP_FEED: u8 = 0;
/// Complete op tag.
pub const OP_COMPLETE: u8 = 1;
/// Task management answer op tag.
pub const OP_TMF: u8 = 2;
/// Clock op tag.
pub const OP_TIME: u8 = 3;
/// One clock tick.
pub const TICK: Duration = Duration::from_millis(250);

/// Append "feed `bytes`" to a script (split into ops of at most 65535 bytes).
pub fn script_feed(out: &mut Vec<u8>, bytes: &[u8]) {
    for chunk in bytes.chunks(0xffff) {
        out.push(OP_FEED);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Append "complete pending command `sel`" to a script (lengths saturate at 65535).
pub fn script_complete(out: &mut Vec<u8>, sel: usize, status: u8, len: usize, transfer: u32) {
    out.extend_from_slice(&[OP_COMPLETE, sel as u8, status]);
    out.extend_from_slice(&(len.min(0xffff) as u16).to_be_bytes());
    out.extend_from_slice(&(transfer.min(0xffff) as u16).to_be_bytes());
}

/// Append "answer pending task management request `sel`" to a script.
pub fn script_tmf(out: &mut Vec<u8>, sel: usize, response: u8) {
    out.extend_from_slice(&[OP_TMF, sel as u8, response]);
}

/// Append "advance the clock by `d`" (rounded up to ticks) to a script.
pub fn script_time(out: &mut Vec<u8>, d: Duration) {
    let mut ticks = d.as_millis().div_ceil(TICK.as_millis());
    while ticks > 0 {
        let n = ticks.min(255);
        out.extend_from_slice(&[OP_TIME, n as u8]);
        ticks -= n;
    }
}

/// The scripted login a `conn` mode byte asks for.
pub fn login_options(mode: u8) -> LoginOptions {
    let mut o = if mode & 0x08 != 0 {
        LoginOptions::discovery()
    } else if mode & 0x20 != 0 {
        LoginOptions::target(testing::TARGET_MUTUAL)
    } else if mode & 0x10 != 0 {
        LoginOptions::target(testing::TARGET_CHAP)
    } else {
        LoginOptions::default()
    };
    if mode & 0x30 != 0 && mode & 0x08 == 0 {
        o.chap = Some(testing::chap_user());
    }
    if mode & 0x20 != 0 && mode & 0x08 == 0 {
        o.mutual = Some((testing::mutual_user(), 9, b"initiator-challenge".to_vec()));
    }
    o.header_digest = mode & 0x02 != 0;
    o.data_digest = mode & 0x04 != 0;
    if mode & 0x40 != 0 {
        o = o.key("InitialR2T", "Yes").key("ImmediateData", "No");
    }
    o
}

/// Output bytes a batch of received PDUs occupied on the wire (upper bound with digests).
fn wire_len(rs: &[testing::Received]) -> usize {
    rs.iter().map(|r| BHS_LEN + 8 + r.data.len() + 3).sum()
}

/// The `iscsi_conn` target.
///
/// # Panics
/// When an invariant breaks (that is the point).
pub fn conn(data: &[u8]) {
    let Some((&mode, mut ops)) = data.split_first() else {
        return;
    };
    let mut ini = Initiator::new();
    if mode & 0x01 != 0 {
        ini.login_ok(&login_options(mode));
    }
    let window = 8usize;
    while let Some((&op, rest)) = ops.split_first() {
        let (out, input) = match op {
            OP_FEED if rest.len() >= 2 => {
                let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
                let feed = &rest[2..2 + n];
                ops = &rest[2 + n..];
                (ini.send_raw(feed), feed.len())
            }
            OP_COMPLETE if rest.len() >= 6 => {
                let (sel, status) = (rest[0] as usize, rest[1]);
                let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
                let transfer = u16::from_be_bytes([rest[4], rest[5]]) as u32;
                ops = &rest[6..];
                let itt = match ini.pending.len() {
                    0 => sel as u32,
                    n => ini.pending[sel % n],
                };
                let c = Completion {
                    status,
                    sense: (status == 2).then(|| Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 0])),
                    data: Bytes::from(vec![0xa5; len]),
                    transfer_len: transfer,
                };
                (ini.complete(itt, c), len + 64 * 1024)
            }
            OP_TMF if rest.len() >= 2 => {
                let (sel, response) = (rest[0] as usize, rest[1]);
                ops = &rest[2..];
                let (itt, function) = match ini.pending_tmf.len() {
                    0 => (sel as u32, 1),
                    n => (
                        ini.pending_tmf[sel % n].itt,
                        ini.pending_tmf[sel % n].function,
                    ),
                };
                (ini.complete_tmf(itt, function, response), 0)
            }
            OP_TIME if !rest.is_empty() => {
                let d = TICK * u32::from(rest[0]);
                ops = &rest[1..];
                (ini.advance(d), 0)
            }
            _ => {
                let feed = ops;
                ops = &[];
                (ini.send_raw(feed), feed.len())
            }
        };
        // Output stays proportional to input: no PDU is answered with more than a bounded
        // number of PDUs (R2Ts up to MaxOutstandingR2T, a Reject echoing a header).
        let produced = wire_len(&out);
        assert!(
            produced <= 64 * input + 4 * window * 1024 + 8192,
            "{produced} bytes out for {input} bytes in"
        );
        for ev in ini.take_events() {
            if let Event::Command(c) = ev {
                if c.cmd.write {
                    assert_eq!(
                        c.cmd.data_out.len(),
                        c.cmd.expected_len as usize,
                        "writes carry exactly EDTL bytes"
                    );
                }
                assert!(c.cmd.cdb.len() <= 16 + 1020);
            }
        }
        ini.conn.check_invariants();
        assert!(ini.conn.tx().is_empty());
    }
}

/// The `iscsi_framer` target.
///
/// # Panics
/// When an invariant breaks.
pub fn framer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let max = [512, 8192, 65536, 0xff_ffff][(mode >> 2 & 3) as usize];
    let f = Framer {
        header_digest: mode & 1 != 0,
        data_digest: mode & 2 != 0,
        max_data_segment: max,
    };
    let mut buf = BytesMut::from(rest);
    loop {
        let before = buf.len();
        let want = f.frame_len(&buf);
        match f.decode(&mut buf) {
            Ok(Some(frame)) => {
                let used = before - buf.len();
                assert_eq!(
                    Ok(Some(used)),
                    want,
                    "decode consumes exactly frame_len bytes"
                );
                let pdu = &frame.pdu;
                assert!(pdu.data.len() as u32 <= max);
                assert_eq!(pdu.data.len() as u32, pdu.bhs.data_segment_len());
                assert_eq!(pdu.ahs.len(), pdu.bhs.total_ahs_words() as usize * 4);
                let _ = Request::decode(&pdu.bhs);
                let _ = Response::decode(&pdu.bhs);
                if pdu.ahs.is_empty() && frame.data_digest_ok {
                    // Without AHS the encoder reproduces the PDU.
                    let mut q = TxQueue::new();
                    q.push_pdu(pdu.bhs, pdu.data.clone(), f.header_digest, f.data_digest);
                    let mut again = q.take_all();
                    let back = f.decode(&mut again).expect("re-encoded PDU frames");
                    assert_eq!(back.as_ref().map(|b| &b.pdu), Some(pdu));
                    assert!(again.is_empty());
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more consumes nothing");
                assert!(!matches!(want, Ok(Some(n)) if n <= before));
                break;
            }
            Err(_) => break,
        }
    }
}

/// The `iscsi_text` target: the first byte picks the target and discovery CHAP; then Login
/// Request data segments separated by `0xfe`, each led by a flags byte (bit 0 T, bit 1 C,
/// bits 2-3 CSG, bits 4-5 NSG, bit 6 change the ISID).
///
/// # Panics
/// When an invariant breaks.
pub fn cdb(data: &[u8]) {
    let first = crate::scsi::cdb::Command::parse(data);
    let again = crate::scsi::cdb::Command::parse(data);
    assert_eq!(
        format!("{first:?}"),
        format!("{again:?}"),
        "parsing is deterministic"
    );
    // Every CDB length the transport may deliver, from the same bytes.
    for n in [6usize, 10, 12, 16, 32] {
        if data.len() >= n {
            let _ = crate::scsi::cdb::Command::parse(&data[..n]);
        }
    }
}

pub fn text(data: &[u8]) {
    if let Ok(pairs) = text::parse(data) {
        // What parses re-encodes to text that parses the same.
        assert_eq!(text::parse(&text::encode(&pairs)).as_ref(), Ok(&pairs));
    }
    let _ = text::parse_number(&String::from_utf8_lossy(&data[..data.len().min(64)]));
    let _ = text::parse_binary(&String::from_utf8_lossy(&data[..data.len().min(2048)]));
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut setup = testing::config().login;
    if mode & 1 != 0 {
        let mut d = testing::directory();
        d.discovery_chap = Some(testing::chap_user());
        if mode & 2 != 0 {
            d.discovery_mutual_chap = Some(testing::mutual_user());
        }
        setup.directory = std::sync::Arc::new(d);
    }
    let mut login = Login::new(setup);
    for (i, pdu) in rest.split(|&b| b == 0xfe).enumerate().take(64) {
        let Some((&flags, text_data)) = pdu.split_first() else {
            continue;
        };
        let req = LoginRequest {
            transit: flags & 1 != 0,
            continue_bit: flags & 2 != 0,
            csg: flags >> 2 & 3,
            nsg: flags >> 4 & 3,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, u8::from(flags & 0x40 != 0)],
            tsih: 0,
            itt: i as u32,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        let (resp, text_out) = match login.handle(&req, text_data) {
            LoginStep::Continue(r, t) => (r, t),
            LoginStep::Done(r, t, outcome) => {
                let p = &outcome.params;
                assert!(p.first_burst_length <= p.max_burst_length);
                assert!((512..=0xff_ffff).contains(&p.initiator_mrdsl));
                assert!(p.max_outstanding_r2t >= 1);
                assert_eq!((p.error_recovery_level, p.max_connections), (0, 1));
                check_login_text(&t);
                assert_ne!(r.tsih, 0);
                return;
            }
            LoginStep::Failed(r, t, _) => {
                assert_ne!(r.status_class, 0);
                check_login_text(&t);
                return;
            }
        };
        assert_eq!(resp.status_class, 0);
        check_login_text(&text_out);
        if req.continue_bit {
            assert!(
                text_out.is_empty(),
                "a C-bit request is answered with empty text"
            );
        }
    }
}

fn check_login_text(t: &Bytes) {
    // A login response fits the initiator's default MaxRecvDataSegmentLength.
    assert!(t.len() <= 8192, "login response text of {} bytes", t.len());
    let pairs = text::parse(t).expect("the target's own text parses");
    for (k, v) in &pairs {
        if k == "CHAP_R" {
            assert_eq!(text::parse_binary(v).map(|r| r.len()), Some(16));
        }
    }
    let _ = chap::ALGORITHM_MD5;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{tmf, RESERVED_TAG};
    use std::path::{Path, PathBuf};

    fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    fn replay(target: &str, f: fn(&[u8])) -> usize {
        let dir = corpus_dir(target);
        let mut n = 0;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        for e in entries {
            let path = e.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            f(&data);
            n += 1;
        }
        n
    }

    #[test]
    fn corpus_replays_through_every_target() {
        assert!(replay("iscsi_framer", framer) >= 3, "framer corpus");
        assert!(replay("iscsi_conn", conn) >= 5, "conn corpus");
        assert!(replay("iscsi_text", text) >= 3, "text corpus");
        assert!(replay("scsi_cdb", cdb) >= 5, "cdb corpus");
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        for f in [framer as fn(&[u8]), conn, text] {
            f(&[]);
            f(&[0]);
            f(&[0xff; 3]);
            f(&[1, 0, 0xff, 0xff]);
            f(&[0x7f; 200]);
        }
    }

    #[test]
    fn a_hostile_write_stream_stays_within_limits() {
        // 200 immediate WRITEs of the largest EDTL, each with one byte of immediate data.
        let mut ini = Initiator::new();
        ini.login_ok(&LoginOptions::default());
        let mut s = vec![1u8];
        for _ in 0..200 {
            let mut c = ini.write_command(1 << 20);
            c.immediate = true;
            c.final_bit = false;
            script_feed(&mut s, &ini.encode(c.encode(), Bytes::from_static(b"x")));
        }
        conn(&s);
    }

    /// The seed corpus, written by the test initiator. Regenerate with
    /// `TESSERA_WRITE_CORPUS=1 cargo test -p tessera-proto --lib fuzzing -- --ignored`.
    fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
        let mut out = Vec::new();
        // iscsi_conn: a raw login and I/O (mode 0), and the same I/O after scripted logins.
        for (name, mode) in [
            ("raw-login-io", 0u8),
            ("scripted-io", 0x01),
            ("scripted-digests-io", 0x07),
            ("scripted-r2t-io", 0x41),
            ("raw-chap-login-io", 0x10),
        ] {
            let mut ini = Initiator::new();
            if mode & 1 == 0 {
                ini.start_trace();
                ini.login_ok(&login_options(mode | 0x06));
            } else {
                ini.login_ok(&login_options(mode));
                ini.start_trace();
            }
            let (itt, _) = ini.read(1024);
            ini.complete_good(itt, testing::pattern(1024));
            let (itt, _) = ini.write(&testing::pattern(512));
            ini.complete_write(itt, 512);
            let (itt, _) = ini.read(512);
            ini.tmf(tmf::ABORT_TASK, itt, ini.cmd_sn - 1);
            if let Some(t) = ini.pending_tmf.first().cloned() {
                ini.complete_tmf(t.itt, t.function, 0);
            }
            ini.nop_out(b"ping");
            ini.advance(Duration::from_secs(6));
            ini.logout(0);
            out.push((
                "iscsi_conn",
                name.to_string(),
                [&[mode][..], &ini.take_trace()].concat(),
            ));
        }
        {
            let mut ini = Initiator::new();
            ini.start_trace();
            ini.login_ok(&LoginOptions::discovery());
            ini.text(&[("SendTargets".into(), "All".into())]);
            ini.logout(0);
            out.push((
                "iscsi_conn",
                "raw-discovery".into(),
                [&[0u8][..], &ini.take_trace()].concat(),
            ));
        }
        // iscsi_framer: initiator PDUs with each digest combination.
        for mode in [0u8, 1, 3, 7] {
            let mut ini = Initiator::new();
            ini.header_digest = mode & 1 != 0;
            ini.data_digest = mode & 2 != 0;
            let c = ini.write_command(256);
            let mut wire = ini
                .encode(c.encode(), Bytes::from(testing::pattern(256)))
                .to_vec();
            let d = ini.data_out(0x77, RESERVED_TAG, 0, 0, true);
            wire.extend_from_slice(&ini.encode(d.encode(), Bytes::from_static(b"abc")));
            out.push((
                "iscsi_framer",
                format!("pdus-{mode}"),
                [&[mode][..], &wire].concat(),
            ));
        }
        // iscsi_text: a normal login without and with CHAP, and a discovery login.
        let normal = [
            &[0x11u8][..],
            b"InitiatorName=iqn.2024-01.test:initiator\0SessionType=Normal\0TargetName=iqn.2024-01.test:disk1\0AuthMethod=None\0",
            &[0xfe, 0x35],
            b"HeaderDigest=CRC32C,None\0DataDigest=None\0MaxRecvDataSegmentLength=65536\0MaxBurstLength=262144\0FirstBurstLength=65536\0InitialR2T=No\0ImmediateData=Yes\0",
        ]
        .concat();
        out.push((
            "iscsi_text",
            "normal".into(),
            [&[0u8][..], &normal].concat(),
        ));
        let chap_r = text::hex(&chap::response(
            testing::CHAP_ID,
            &testing::chap_user().secret,
            &testing::CHAP_CHALLENGE,
        ));
        let chap = [
            &[0x01u8, 0x11][..],
            b"InitiatorName=iqn.2024-01.test:initiator\0SessionType=Discovery\0AuthMethod=CHAP,None\0",
            &[0xfe, 0x00],
            b"CHAP_A=5\0",
            &[0xfe, 0x11],
            format!("CHAP_N=alice\0CHAP_R={chap_r}\0").as_bytes(),
            &[0xfe, 0x35],
            b"MaxRecvDataSegmentLength=8192\0",
        ]
        .concat();
        out.push(("iscsi_text", "discovery-chap".into(), chap));
        let cont = [
            &[0u8, 0x06][..],
            b"InitiatorName=iqn.2024-01.test:initiator\0Sessi",
            &[0xfe, 0x35],
            b"onType=Discovery\0",
        ]
        .concat();
        out.push(("iscsi_text", "continued".into(), cont));
        out
    }

    #[test]
    fn seeds_are_valid_inputs() {
        for (target, name, data) in seeds() {
            match target {
                "iscsi_conn" => conn(&data),
                "iscsi_framer" => framer(&data),
                _ => text(&data),
            }
            assert!(!data.is_empty(), "{name}");
        }
    }

    #[test]
    #[ignore = "writes the seed corpus when TESSERA_WRITE_CORPUS=1"]
    fn write_corpus() {
        if std::env::var_os("TESSERA_WRITE_CORPUS").is_none() {
            return;
        }
        for (target, name, data) in seeds() {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(dir.join(name), data).expect("write seed");
        }
    }
}
