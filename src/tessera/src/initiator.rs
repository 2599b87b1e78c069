//! A small blocking iSCSI initiator for the CLI's own use (`tessera volume import/export`):
//! one session over one connection, built on `tessera-proto`'s PDU encoders.
//!
//! What it does: login with or without CHAP (one-way, MD5), operational negotiation
//! (it honours what the target answers: data segment and burst lengths, immediate data,
//! InitialR2T), login redirection (a target's "moved" answer sends it to the portal named in
//! `TargetAddress`), SCSI commands pipelined up to the target's command window with
//! solicited (R2T) and unsolicited Data-Out, answers to the target's NOP-In pings, and logout.
//! What it leaves out: digests, multiple connections, error recovery levels above 0 (a broken
//! connection is an error; the caller logs in again and repeats what was in flight).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tessera_proto::iscsi::chap::{self, Credentials};
use tessera_proto::iscsi::framer::{Framer, TxQueue};
use tessera_proto::iscsi::pdu::{
    stage, Bhs, DataOut, LoginRequest, LogoutRequest, NopOut, Pdu, Response, ScsiCommand,
    RESERVED_TAG,
};
use tessera_proto::iscsi::text;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    /// The connection failed or closed.
    #[error("{portal}: {err}")]
    Io {
        /// The portal.
        portal: SocketAddr,
        /// The error.
        err: std::io::Error,
    },
    /// The target refused the login.
    #[error("{portal}: login refused ({class:02x}{detail:02x}: {why})")]
    Login {
        /// The portal.
        portal: SocketAddr,
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
        /// What the status means.
        why: &'static str,
    },
    /// The target broke the protocol (or rejected a PDU of ours).
    #[error("{portal}: {what}")]
    Protocol {
        /// The portal.
        portal: SocketAddr,
        /// What happened.
        what: String,
    },
}

impl InitiatorError {
    /// Whether logging in again may help (the connection broke, the target is moving).
    pub fn is_transient(&self) -> bool {
        match self {
            InitiatorError::Io { .. } => true,
            // Target error (03xx): service unavailable, out of resources.
            InitiatorError::Login { class, .. } => *class == 3,
            InitiatorError::Protocol { .. } => false,
        }
    }
}

/// Who logs in where.
#[derive(Debug, Clone)]
pub struct LoginParams {
    /// The portal first connected to.
    pub portal: SocketAddr,
    /// Our IQN.
    pub initiator: String,
    /// The target's IQN.
    pub target: String,
    /// CHAP credentials, if the target wants them.
    pub chap: Option<Credentials>,
    /// How long any one answer may take.
    pub timeout: Duration,
}

/// The outcome of a SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// SCSI status (0 GOOD, 2 CHECK CONDITION, 8 BUSY, 0x28 TASK SET FULL...).
    pub status: u8,
    /// Data-In.
    pub data: Vec<u8>,
    /// Sense data (without its 2-byte length).
    pub sense: Vec<u8>,
}

impl Outcome {
    /// Sense key, additional sense code and qualifier (fixed or descriptor format).
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        let s = &self.sense;
        match s.first().map(|b| b & 0x7f) {
            Some(0x70 | 0x71) if s.len() >= 14 => Some((s[2] & 0xf, s[12], s[13])),
            Some(0x72 | 0x73) if s.len() >= 4 => Some((s[1] & 0xf, s[2], s[3])),
            _ => None,
        }
    }

    /// Whether repeating the command may succeed: BUSY, TASK SET FULL, a UNIT ATTENTION, or
    /// NOT READY while the unit becomes ready or changes owner.
    pub fn is_retryable(&self) -> bool {
        match self.status {
            0x08 | 0x28 => true,
            0x02 => matches!(self.sense_code(), Some((0x6, _, _)) | Some((0x2, 0x04, _))),
            _ => false,
        }
    }

    /// A one-line description of a status other than GOOD.
    pub fn describe(&self) -> String {
        match (self.status, self.sense_code()) {
            (0x02, Some((k, asc, ascq))) => {
                format!("CHECK CONDITION, sense key {k:x}, ASC/ASCQ {asc:02x}/{ascq:02x}")
            }
            (s, _) => format!("SCSI status {s:02x}"),
        }
    }
}

/// The 8-byte LUN field for LUN `n` (SAM: peripheral addressing below 256, flat up to 16383).
pub fn lun_field(n: u64) -> [u8; 8] {
    let mut l = [0u8; 8];
    if n < 256 {
        l[1] = n as u8;
    } else {
        l[0] = 0x40 | ((n >> 8) as u8 & 0x3f);
        l[1] = n as u8;
    }
    l
}

/// What the login settled.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    /// The most data the target takes in one PDU.
    target_mrdsl: u32,
    first_burst: u32,
    max_burst: u32,
    immediate_data: bool,
    initial_r2t: bool,
}

impl Default for Negotiated {
    fn default() -> Self {
        // RFC 7143 §13 defaults.
        Self {
            target_mrdsl: 8192,
            first_burst: 65536,
            max_burst: 262_144,
            immediate_data: true,
            initial_r2t: true,
        }
    }
}

/// What we offer.
const OUR_MRDSL: u32 = 262_144;
const OUR_FIRST_BURST: u32 = 262_144;
const OUR_MAX_BURST: u32 = 1 << 20;

struct Task {
    lun: [u8; 8],
    data_out: Bytes,
    data_in: Vec<u8>,
}

/// One logged-in session.
pub struct Session {
    portal: SocketAddr,
    stream: TcpStream,
    rbuf: BytesMut,
    framer: Framer,
    neg: Negotiated,
    cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    done: VecDeque<(u32, Outcome)>,
}

fn login_why(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (2, 0x01) => "authentication failed",
        (2, 0x02) => "this initiator is not allowed",
        (2, 0x03) => "no such target",
        (2, 0x04) => "target removed",
        (2, _) => "initiator error",
        (3, 0x01) => "target error",
        (3, 0x02) => "service unavailable",
        (3, 0x03) => "out of resources",
        (3, _) => "target error",
        _ => "unexpected status",
    }
}

/// `host:port[,tpgt]` or `[v6]:port[,tpgt]` (port 3260 when absent).
fn parse_target_address(v: &str) -> Option<SocketAddr> {
    let addr = v.split(',').next()?.trim();
    let with_port = if addr.starts_with('[') {
        if addr.contains("]:") {
            addr.to_string()
        } else {
            format!("{addr}:3260")
        }
    } else if addr.contains(':') {
        addr.to_string()
    } else {
        format!("{addr}:3260")
    };
    with_port.to_socket_addrs().ok()?.next()
}

/// Serial-number comparison of 32-bit sequence numbers (RFC 1982): `a` before or at `b`.
fn sn_le(a: u32, b: u32) -> bool {
    a == b || b.wrapping_sub(a) < 1 << 31
}

impl Session {
    /// Connect and log in, following up to four redirections.
    pub fn login(p: &LoginParams) -> Result<Self, InitiatorError> {
        let mut portal = p.portal;
        for _ in 0..5 {
            match Self::login_at(portal, p)? {
                Ok(s) => return Ok(s),
                Err(moved) => {
                    tracing::info!(from = %portal, to = %moved, "login redirected");
                    portal = moved;
                }
            }
        }
        Err(InitiatorError::Protocol {
            portal,
            what: "too many login redirections".into(),
        })
    }

    /// The portal this session is connected to (after any redirection).
    pub fn portal(&self) -> SocketAddr {
        self.portal
    }

    /// A session, or the portal the target redirected us to.
    fn login_at(
        portal: SocketAddr,
        p: &LoginParams,
    ) -> Result<Result<Self, SocketAddr>, InitiatorError> {
        let io = |err| InitiatorError::Io { portal, err };
        let stream = TcpStream::connect_timeout(&portal, p.timeout).map_err(io)?;
        stream.set_read_timeout(Some(p.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(p.timeout)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let mut s = Self {
            portal,
            stream,
            rbuf: BytesMut::new(),
            framer: Framer::new(16 << 20),
            neg: Negotiated::default(),
            cmd_sn: 1,
            max_cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            tasks: HashMap::new(),
            done: VecDeque::new(),
        };
        // A random ISID qualifier (type 0x80): sessions of concurrent CLI runs stay apart.
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let isid = [
            0x80,
            0,
            (seed >> 24) as u8,
            (seed >> 16) as u8,
            (seed >> 8) as u8,
            seed as u8,
        ];
        let mut first: Vec<(&str, String)> = vec![
            ("InitiatorName", p.initiator.clone()),
            ("TargetName", p.target.clone()),
            ("SessionType", "Normal".into()),
        ];
        let mut csg = stage::OPERATIONAL;
        let mut tsih = 0u16;
        macro_rules! round {
            ($transit:expr, $keys:expr) => {
                match s.login_round(isid, &mut tsih, csg, $transit, $keys)? {
                    Ok(r) => r,
                    Err(moved) => return Ok(Err(moved)),
                }
            };
        }
        if let Some(c) = &p.chap {
            csg = stage::SECURITY;
            first.push(("AuthMethod", "CHAP,None".into()));
            let mut r = round!(false, &first);
            let method = r.get("AuthMethod");
            match method.as_deref() {
                Some("CHAP") => {
                    let r2 = round!(false, &[("CHAP_A", "5".into())]);
                    let (Some(id), Some(challenge)) = (
                        r2.get("CHAP_I").and_then(|v| text::parse_number(&v)),
                        r2.get("CHAP_C").and_then(|v| text::parse_binary(&v)),
                    ) else {
                        return Err(InitiatorError::Protocol {
                            portal,
                            what: "the target's CHAP challenge lacks CHAP_I or CHAP_C".into(),
                        });
                    };
                    let resp = chap::response(id as u8, &c.secret, &challenge);
                    let answer = [("CHAP_N", c.user.clone()), ("CHAP_R", text::hex(&resp))];
                    r = round!(true, &answer);
                }
                Some("None") if !r.transit => r = round!(true, &[]),
                Some("None") => {}
                other => {
                    return Err(InitiatorError::Protocol {
                        portal,
                        what: format!(
                            "the target chose no authentication method we offered ({other:?})"
                        ),
                    })
                }
            }
            if !r.transit {
                return Err(InitiatorError::Protocol {
                    portal,
                    what: "the target did not end the security stage".into(),
                });
            }
            csg = stage::OPERATIONAL;
            first.clear();
        }
        let mut offer = first;
        offer.extend([
            ("HeaderDigest", "None".into()),
            ("DataDigest", "None".into()),
            ("MaxRecvDataSegmentLength", OUR_MRDSL.to_string()),
            ("ImmediateData", "Yes".into()),
            ("InitialR2T", "No".into()),
            ("FirstBurstLength", OUR_FIRST_BURST.to_string()),
            ("MaxBurstLength", OUR_MAX_BURST.to_string()),
            ("MaxOutstandingR2T", "1".into()),
            ("ErrorRecoveryLevel", "0".into()),
        ]);
        // What we offered stands unless the target answers otherwise.
        let mut neg = Negotiated {
            immediate_data: true,
            initial_r2t: false,
            first_burst: OUR_FIRST_BURST,
            max_burst: OUR_MAX_BURST,
            ..Negotiated::default()
        };
        for _ in 0..8 {
            let r = round!(true, &offer);
            for (k, v) in &r.keys {
                let n = || text::parse_number(v).map(|n| n.min(u64::from(u32::MAX)) as u32);
                match k.as_str() {
                    "MaxRecvDataSegmentLength" => {
                        neg.target_mrdsl = n().unwrap_or(8192).max(512);
                    }
                    "FirstBurstLength" => neg.first_burst = n().unwrap_or(65536).max(512),
                    "MaxBurstLength" => neg.max_burst = n().unwrap_or(262_144).max(512),
                    "ImmediateData" => neg.immediate_data = v == "Yes",
                    "InitialR2T" => neg.initial_r2t = v == "Yes",
                    _ => {}
                }
            }
            offer.clear();
            if r.transit {
                neg.first_burst = neg.first_burst.min(neg.max_burst);
                s.neg = neg;
                return Ok(Ok(s));
            }
        }
        Err(InitiatorError::Protocol {
            portal,
            what: "login negotiation did not finish".into(),
        })
    }

    /// Send one login request, read its answer: its keys, or where the target moved.
    fn login_round(
        &mut self,
        isid: [u8; 6],
        tsih: &mut u16,
        csg: u8,
        transit: bool,
        keys: &[(&str, String)],
    ) -> Result<Result<Round, SocketAddr>, InitiatorError> {
        let nsg = if csg == stage::SECURITY {
            stage::OPERATIONAL
        } else {
            stage::FULL_FEATURE
        };
        let req = LoginRequest {
            transit,
            csg,
            nsg: if transit { nsg } else { 0 },
            isid,
            tsih: *tsih,
            itt: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ..Default::default()
        };
        self.send(req.encode(), text::encode(keys))?;
        let pdu = self.recv()?;
        let Ok(Response::Login(lr)) = Response::decode(&pdu.bhs) else {
            return Err(self.protocol("expected a login response"));
        };
        let parsed = text::parse(&pdu.data)
            .map_err(|e| self.protocol(&format!("login response keys: {e}")))?;
        let r = Round {
            keys: parsed,
            transit: lr.transit && lr.nsg == nsg,
        };
        match lr.status_class {
            0 => {}
            1 => {
                return match r
                    .get("TargetAddress")
                    .and_then(|v| parse_target_address(&v))
                {
                    Some(a) => Ok(Err(a)),
                    None => Err(self.protocol("redirected without a usable TargetAddress")),
                }
            }
            class => {
                return Err(InitiatorError::Login {
                    portal: self.portal,
                    class,
                    detail: lr.status_detail,
                    why: login_why(class, lr.status_detail),
                })
            }
        }
        *tsih = lr.tsih;
        self.exp_stat_sn = lr.stat_sn.wrapping_add(1);
        self.max_cmd_sn = lr.max_cmd_sn;
        Ok(Ok(r))
    }

    fn protocol(&self, what: &str) -> InitiatorError {
        InitiatorError::Protocol {
            portal: self.portal,
            what: what.to_string(),
        }
    }

    fn io(&self, err: std::io::Error) -> InitiatorError {
        InitiatorError::Io {
            portal: self.portal,
            err,
        }
    }

    fn send(&mut self, bhs: Bhs, data: Bytes) -> Result<(), InitiatorError> {
        let mut q = TxQueue::new();
        q.push_pdu(bhs, data, false, false);
        let out = q.take_all();
        self.stream.write_all(&out).map_err(|e| self.io(e))
    }

    fn recv(&mut self) -> Result<Pdu, InitiatorError> {
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            match self.framer.decode(&mut self.rbuf) {
                Ok(Some(f)) => return Ok(f.pdu),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(&format!("bad PDU from the target: {e}"))),
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(self.io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the target closed the connection",
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            };
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Send a command on `lun` (its CDB, Data-Out, Data-In length expected); returns its tag.
    /// Waits for answers first while the target's command window is closed.
    pub fn submit(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        read_len: u32,
    ) -> Result<u32, InitiatorError> {
        while !sn_le(self.cmd_sn, self.max_cmd_sn) {
            self.pump()?;
        }
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1).max(1);
        if self.next_itt == RESERVED_TAG {
            self.next_itt = 1;
        }
        let lun_f = lun_field(lun);
        let write = !data_out.is_empty();
        let cmd = ScsiCommand {
            final_bit: true,
            read: read_len > 0,
            write,
            attr: 1,
            lun: lun_f,
            itt,
            edtl: if write {
                data_out.len() as u32
            } else {
                read_len
            },
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
            ..Default::default()
        };
        // Unsolicited data (RFC 7143 §4.2.5.2): immediate data in the command PDU, then, unless
        // InitialR2T, Data-Out PDUs up to the first burst; the target asks for the rest by R2T.
        let len = data_out.len() as u32;
        let (immediate, unsolicited) = match (write, self.neg.immediate_data, self.neg.initial_r2t)
        {
            (false, _, _) => (0, 0),
            (true, imm, false) => {
                let u = len.min(self.neg.first_burst);
                (if imm { u.min(self.neg.target_mrdsl) } else { 0 }, u)
            }
            (true, true, true) => {
                let i = len.min(self.neg.first_burst).min(self.neg.target_mrdsl);
                (i, i)
            }
            (true, false, true) => (0, 0),
        };
        let cmd = ScsiCommand {
            // F: no unsolicited Data-Out follows the command.
            final_bit: unsolicited == immediate,
            ..cmd
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.tasks.insert(
            itt,
            Task {
                lun: lun_f,
                data_out: data_out.clone(),
                data_in: Vec::with_capacity(read_len as usize),
            },
        );
        let mut q = TxQueue::new();
        q.push_pdu(
            cmd.encode(),
            data_out.slice(..immediate as usize),
            false,
            false,
        );
        if unsolicited > immediate {
            self.push_data_out(
                &mut q,
                itt,
                lun_f,
                RESERVED_TAG,
                &data_out,
                immediate,
                unsolicited - immediate,
            );
        }
        let out = q.take_all();
        self.stream.write_all(&out).map_err(|e| self.io(e))?;
        Ok(itt)
    }

    /// Data-Out PDUs for `len` bytes of `data` from `offset`, each at most the target's
    /// data segment length; the last one has F set.
    #[allow(clippy::too_many_arguments)]
    fn push_data_out(
        &self,
        q: &mut TxQueue,
        itt: u32,
        lun: [u8; 8],
        ttt: u32,
        data: &Bytes,
        offset: u32,
        len: u32,
    ) {
        let end = offset + len;
        let mut at = offset;
        let mut data_sn = 0;
        while at < end {
            let n = (end - at).min(self.neg.target_mrdsl);
            let d = DataOut {
                final_bit: at + n == end,
                lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: at,
            };
            q.push_pdu(
                d.encode(),
                data.slice(at as usize..(at + n) as usize),
                false,
                false,
            );
            at += n;
            data_sn += 1;
        }
    }

    /// Wait for the next command to finish: its tag and outcome.
    pub fn wait_any(&mut self) -> Result<(u32, Outcome), InitiatorError> {
        loop {
            if let Some(d) = self.done.pop_front() {
                return Ok(d);
            }
            if self.tasks.is_empty() {
                return Err(self.protocol("waiting with no command in flight"));
            }
            self.pump()?;
        }
    }

    /// Run one command to its end (other commands' answers are kept for `wait_any`).
    pub fn command(
        &mut self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        read_len: u32,
    ) -> Result<Outcome, InitiatorError> {
        let itt = self.submit(lun, cdb, data_out, read_len)?;
        loop {
            if let Some(i) = self.done.iter().position(|(t, _)| *t == itt) {
                let (_, o) = self.done.remove(i).expect("present");
                return Ok(o);
            }
            self.pump()?;
        }
    }

    /// Receive and act on one PDU.
    fn pump(&mut self) -> Result<(), InitiatorError> {
        let pdu = self.recv()?;
        let r = Response::decode(&pdu.bhs)
            .map_err(|e| self.protocol(&format!("unexpected PDU from the target: {e}")))?;
        match r {
            Response::DataIn(d) => {
                self.window(d.max_cmd_sn);
                let Some(t) = self.tasks.get_mut(&d.itt) else {
                    return Err(self.protocol("Data-In for no command of ours"));
                };
                let off = d.buffer_offset as usize;
                if off != t.data_in.len() {
                    return Err(self.protocol("Data-In out of order"));
                }
                t.data_in.extend_from_slice(&pdu.data);
                if let Some(status) = d.status {
                    self.exp_stat_sn = d.stat_sn.wrapping_add(1);
                    let t = self.tasks.remove(&d.itt).expect("present");
                    self.done.push_back((
                        d.itt,
                        Outcome {
                            status,
                            data: t.data_in,
                            sense: Vec::new(),
                        },
                    ));
                }
            }
            Response::ScsiResponse(r) => {
                self.window(r.max_cmd_sn);
                self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                let Some(t) = self.tasks.remove(&r.itt) else {
                    return Err(self.protocol("SCSI Response for no command of ours"));
                };
                if r.response != 0 {
                    return Err(self.protocol(&format!(
                        "the target failed a command (iSCSI response {:02x})",
                        r.response
                    )));
                }
                let sense = if pdu.data.len() > 2 {
                    let n = usize::from(u16::from_be_bytes([pdu.data[0], pdu.data[1]]));
                    pdu.data[2..(2 + n).min(pdu.data.len())].to_vec()
                } else {
                    Vec::new()
                };
                self.done.push_back((
                    r.itt,
                    Outcome {
                        status: r.status,
                        data: t.data_in,
                        sense,
                    },
                ));
            }
            Response::R2t(r) => {
                self.window(r.max_cmd_sn);
                let Some(t) = self.tasks.get(&r.itt) else {
                    return Err(self.protocol("R2T for no command of ours"));
                };
                let end = u64::from(r.buffer_offset) + u64::from(r.desired_len);
                if end > t.data_out.len() as u64 || r.desired_len > self.neg.max_burst {
                    return Err(self.protocol("R2T beyond the command's data"));
                }
                let (lun, data) = (t.lun, t.data_out.clone());
                let mut q = TxQueue::new();
                self.push_data_out(
                    &mut q,
                    r.itt,
                    lun,
                    r.ttt,
                    &data,
                    r.buffer_offset,
                    r.desired_len,
                );
                let out = q.take_all();
                self.stream.write_all(&out).map_err(|e| self.io(e))?;
            }
            Response::NopIn(n) => {
                self.window(n.max_cmd_sn);
                if n.itt == RESERVED_TAG {
                    // A target ping: its StatSN is the next one, not a new status.
                    if n.ttt != RESERVED_TAG {
                        let out = NopOut {
                            immediate: true,
                            lun: n.lun,
                            itt: RESERVED_TAG,
                            ttt: n.ttt,
                            cmd_sn: self.cmd_sn,
                            exp_stat_sn: self.exp_stat_sn,
                        };
                        self.send(out.encode(), Bytes::new())?;
                    }
                } else {
                    self.exp_stat_sn = n.stat_sn.wrapping_add(1);
                }
            }
            Response::Async(a) => {
                self.window(a.max_cmd_sn);
                self.exp_stat_sn = a.stat_sn.wrapping_add(1);
                if matches!(a.event, 1..=3) {
                    // The target asks for logout or drops the connection/session.
                    return Err(self.io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        format!("the target ends the session (async event {})", a.event),
                    )));
                }
            }
            Response::Reject(r) => {
                return Err(self.protocol(&format!(
                    "the target rejected a PDU of ours (reason {:02x})",
                    r.reason
                )));
            }
            other => {
                return Err(self.protocol(&format!("unexpected PDU from the target: {other:?}")));
            }
        }
        Ok(())
    }

    fn window(&mut self, max_cmd_sn: u32) {
        if sn_le(self.max_cmd_sn, max_cmd_sn) {
            self.max_cmd_sn = max_cmd_sn;
        }
    }

    /// Log out (waiting for the target's answer); the connection closes.
    pub fn logout(mut self) -> Result<(), InitiatorError> {
        while !self.tasks.is_empty() {
            self.pump()?;
        }
        let itt = self.next_itt;
        let req = LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.send(req.encode(), Bytes::new())?;
        loop {
            let pdu = self.recv()?;
            if let Ok(Response::Logout(l)) = Response::decode(&pdu.bhs) {
                if l.itt == itt {
                    return Ok(());
                }
            }
        }
    }
}

/// One login response's keys.
struct Round {
    keys: Vec<(String, String)>,
    /// The target moved on to the stage we asked for.
    transit: bool,
}

impl Round {
    fn get(&self, key: &str) -> Option<String> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_fields_use_peripheral_then_flat_addressing() {
        assert_eq!(lun_field(0), [0; 8]);
        assert_eq!(lun_field(7), [0, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(lun_field(255), [0, 255, 0, 0, 0, 0, 0, 0]);
        assert_eq!(lun_field(256), [0x41, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(lun_field(16383), [0x7f, 0xff, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn target_addresses_parse_with_and_without_port_and_tag() {
        let a = |s: &str| parse_target_address(s).map(|a| a.to_string());
        assert_eq!(a("127.0.0.2:3261,2").as_deref(), Some("127.0.0.2:3261"));
        assert_eq!(a("127.0.0.2").as_deref(), Some("127.0.0.2:3260"));
        assert_eq!(a("127.0.0.3,1").as_deref(), Some("127.0.0.3:3260"));
        assert_eq!(a("[::1]:3262,1").as_deref(), Some("[::1]:3262"));
        assert_eq!(a("[::1]").as_deref(), Some("[::1]:3260"));
        assert_eq!(a("not an address:x"), None);
    }

    #[test]
    fn sense_in_both_formats_and_what_is_retried() {
        let mut fixed = vec![0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x2a;
        fixed[13] = 0x06;
        let o = Outcome {
            status: 2,
            data: vec![],
            sense: fixed,
        };
        assert_eq!(o.sense_code(), Some((6, 0x2a, 0x06)));
        assert!(o.is_retryable(), "a unit attention is retried");
        let o = Outcome {
            status: 2,
            data: vec![],
            sense: vec![0x72, 0x02, 0x04, 0x0a, 0, 0, 0, 0],
        };
        assert_eq!(o.sense_code(), Some((2, 0x04, 0x0a)));
        assert!(
            o.is_retryable(),
            "NOT READY during an owner change is retried"
        );
        let o = Outcome {
            status: 2,
            data: vec![],
            sense: vec![0x72, 0x03, 0x11, 0x00],
        };
        assert!(!o.is_retryable(), "a medium error is not");
        assert!(o.describe().contains("sense key 3, ASC/ASCQ 11/00"));
        for (status, retry) in [(0x08, true), (0x28, true), (0x18, false)] {
            let o = Outcome {
                status,
                data: vec![],
                sense: vec![],
            };
            assert_eq!(o.is_retryable(), retry, "status {status:02x}");
        }
    }

    #[test]
    fn command_numbers_compare_across_the_wrap() {
        assert!(sn_le(1, 1));
        assert!(sn_le(1, 2));
        assert!(!sn_le(2, 1));
        assert!(sn_le(u32::MAX, 0), "0 follows 0xffffffff");
        assert!(!sn_le(0, u32::MAX));
    }
}
