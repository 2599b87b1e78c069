//! A scripted iSCSI initiator that drives a target [`Connection`] without sockets (the shape of
//! quinn's test `Pair`): it encodes initiator PDUs with this crate's own [`TxQueue`], feeds them
//! to the connection with a virtual clock, and decodes everything the target queued with a
//! digest-aware [`Framer`] into [`Received`] PDUs.
//!
//! Used by the conversation tests in `iscsi/tests.rs` and by [`crate::fuzzing`] (scripted
//! logins, corpus generation). Not part of the public API: the shape may change at any time.
//!
//! Everything the initiator does can be recorded as a fuzz script
//! ([`Initiator::start_trace`]), so a test conversation doubles as a seed for the `iscsi_conn`
//! fuzz target.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::chap::{self, Credentials};
use super::conn::{Completion, ConnConfig, Connection, Event, TmfEvent};
use super::framer::{Framer, TxQueue};
use super::keys::Limits;
use super::login::{Directory, LoginSetup, TargetEntry};
use super::pdu::{
    attr, stage, Bhs, DataIn, DataOut, LoginRequest, LoginResponse, LogoutRequest, NopIn, NopOut,
    R2t, Reject, Response, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, TextResponse, RESERVED_TAG,
};
use super::text::{self, Pair};
use crate::fuzzing;

/// Initiator name used by default.
pub const INITIATOR: &str = "iqn.2024-01.test:initiator";
/// A target without authentication (alias "disk one", portal group 1).
pub const TARGET: &str = "iqn.2024-01.test:disk1";
/// A target requiring one-way CHAP ([`chap_user`]).
pub const TARGET_CHAP: &str = "iqn.2024-01.test:chap";
/// A target requiring CHAP and answering mutual CHAP ([`chap_user`], [`mutual_user`]).
pub const TARGET_MUTUAL: &str = "iqn.2024-01.test:mutual";
/// A target only [`ALLOWED_INITIATOR`] may see, advertised on two portals.
pub const TARGET_ACL: &str = "iqn.2024-01.test:acl";
/// The one initiator in [`TARGET_ACL`]'s ACL.
pub const ALLOWED_INITIATOR: &str = "iqn.2024-01.test:allowed";
/// The portal the test connection pretends to be accepted on.
pub const LOCAL_PORTAL: &str = "192.0.2.1:3260";
/// The CHAP challenge the target sends.
pub const CHAP_CHALLENGE: [u8; 16] = *b"0123456789abcdef";
/// The CHAP identifier the target sends.
pub const CHAP_ID: u8 = 7;

/// The credentials the CHAP targets expect from the initiator.
pub fn chap_user() -> Credentials {
    Credentials {
        user: "alice".into(),
        secret: b"alice-secret-123".to_vec(),
    }
}

/// The credentials the mutual-CHAP target answers with.
pub fn mutual_user() -> Credentials {
    Credentials {
        user: "target-user".into(),
        secret: b"target-secret-456".to_vec(),
    }
}

/// The exported targets of every test connection.
pub fn directory() -> Directory {
    Directory {
        targets: vec![
            TargetEntry {
                name: TARGET.into(),
                alias: Some("disk one".into()),
                portal_group_tag: 1,
                ..Default::default()
            },
            TargetEntry {
                name: TARGET_CHAP.into(),
                chap: Some(chap_user()),
                portal_group_tag: 2,
                ..Default::default()
            },
            TargetEntry {
                name: TARGET_MUTUAL.into(),
                chap: Some(chap_user()),
                mutual_chap: Some(mutual_user()),
                portal_group_tag: 3,
                ..Default::default()
            },
            TargetEntry {
                name: TARGET_ACL.into(),
                allowed_initiators: vec![ALLOWED_INITIATOR.into()],
                portal_group_tag: 4,
                portals: vec!["198.51.100.7:3260".into(), "[2001:db8::7]:3261".into()],
                ..Default::default()
            },
        ],
        discovery_chap: None,
        discovery_mutual_chap: None,
    }
}

/// Connection settings of every test connection: queue depth 8, NOP-In after 5 s of silence,
/// 5 s to answer, 15 s to log in, writes up to 1 MiB, 4 MiB of write data held at most.
pub fn config() -> ConnConfig {
    ConnConfig {
        login: LoginSetup {
            directory: Arc::new(directory()),
            limits: Limits::default(),
            tsih: 0x1234,
            chap_id: CHAP_ID,
            chap_challenge: CHAP_CHALLENGE,
            cmd_window: 8,
        },
        local_portal: LOCAL_PORTAL.into(),
        nop_interval: Some(Duration::from_secs(5)),
        nop_timeout: Duration::from_secs(5),
        login_timeout: Duration::from_secs(15),
        max_write_transfer: 1 << 20,
        write_budget: 4 << 20,
    }
}

/// One PDU from the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The raw header.
    pub bhs: Bhs,
    /// The header, decoded by opcode.
    pub pdu: Response,
    /// The data segment (without padding and digests).
    pub data: Bytes,
}

macro_rules! accessor {
    ($name:ident, $variant:ident, $ty:ty) => {
        /// The PDU as this type.
        ///
        /// # Panics
        /// If it is another PDU (tests want to fail loudly).
        pub fn $name(&self) -> &$ty {
            match &self.pdu {
                Response::$variant(p) => p,
                other => panic!(
                    concat!("expected ", stringify!($variant), ", got {:?}"),
                    other
                ),
            }
        }
    };
}

impl Received {
    accessor!(login, Login, LoginResponse);
    accessor!(scsi, ScsiResponse, ScsiResponse);
    accessor!(data_in, DataIn, DataIn);
    accessor!(r2t, R2t, R2t);
    accessor!(reject, Reject, Reject);
    accessor!(nop_in, NopIn, NopIn);
    accessor!(text, Text, TextResponse);
    accessor!(logout, Logout, super::pdu::LogoutResponse);
    accessor!(tmf, TaskMgmt, TaskMgmtResponse);

    /// The data segment as text pairs.
    ///
    /// # Panics
    /// If the target sent malformed text.
    pub fn pairs(&self) -> Vec<Pair> {
        text::parse(&self.data).expect("the target sends well-formed text")
    }

    /// The value of `key` in the data segment, if present.
    pub fn key(&self, key: &str) -> Option<String> {
        self.pairs()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Sense data of a SCSI Response (without the 2-byte SenseLength prefix).
    pub fn sense(&self) -> Option<Bytes> {
        if self.data.len() < 2 {
            return None;
        }
        let n = u16::from_be_bytes([self.data[0], self.data[1]]) as usize;
        Some(self.data.slice(2..2 + n.min(self.data.len() - 2)))
    }

    /// (sense key, ASC, ASCQ) of fixed-format sense data in a SCSI Response.
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        let s = self.sense()?;
        (s.len() >= 14).then(|| (s[2] & 0x0f, s[12], s[13]))
    }
}

/// How [`Initiator::login`] logs in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// InitiatorName.
    pub initiator_name: String,
    /// TargetName; `None` for a discovery session.
    pub target: Option<String>,
    /// CHAP credentials to answer the target's challenge with (offers `AuthMethod=CHAP,None`).
    pub chap: Option<Credentials>,
    /// Mutual CHAP: the credentials the target must answer with, and the challenge to send.
    pub mutual: Option<(Credentials, u8, Vec<u8>)>,
    /// Offer HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// Offer DataDigest=CRC32C.
    pub data_digest: bool,
    /// Operational keys that replace (same key) or extend the defaults of [`default_keys`].
    pub keys: Vec<Pair>,
}

impl Default for LoginOptions {
    fn default() -> Self {
        Self {
            initiator_name: INITIATOR.into(),
            target: Some(TARGET.into()),
            chap: None,
            mutual: None,
            header_digest: false,
            data_digest: false,
            keys: Vec::new(),
        }
    }
}

impl LoginOptions {
    /// A discovery session.
    pub fn discovery() -> Self {
        Self {
            target: None,
            ..Self::default()
        }
    }

    /// A normal session to `target`.
    pub fn target(target: &str) -> Self {
        Self {
            target: Some(target.into()),
            ..Self::default()
        }
    }

    /// Replace or add one operational key.
    pub fn key(mut self, k: &str, v: &str) -> Self {
        self.keys.retain(|(k2, _)| k2 != k);
        self.keys.push((k.into(), v.into()));
        self
    }
}

/// The operational keys Linux open-iscsi offers by default in a normal session.
pub fn default_keys() -> Vec<Pair> {
    [
        ("MaxRecvDataSegmentLength", "262144"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// What a completed login left behind.
#[derive(Debug, Clone)]
pub struct LoginResult {
    /// Every Login Response, in order.
    pub responses: Vec<Received>,
}

/// The scripted initiator and the target connection it talks to.
#[derive(Debug)]
pub struct Initiator {
    /// The target side under test.
    pub conn: Connection,
    /// The virtual clock.
    pub now: Instant,
    /// Next CmdSN to use.
    pub cmd_sn: u32,
    /// ExpStatSN to send.
    pub exp_stat_sn: u32,
    /// ISID.
    pub isid: [u8; 6],
    /// Login CID.
    pub cid: u16,
    /// Events taken from the connection, oldest first.
    pub events: VecDeque<Event>,
    /// Commands handed to the driver and not yet completed, oldest first.
    pub pending: Vec<u32>,
    /// Task management requests handed to the driver and not yet answered, oldest first.
    pub pending_tmf: Vec<TmfEvent>,
    /// Digests the initiator uses (on after login when negotiated).
    pub header_digest: bool,
    /// See `header_digest`.
    pub data_digest: bool,
    /// The target's declared MaxRecvDataSegmentLength (8192 until declared).
    pub target_mrdsl: u32,
    next_itt: u32,
    rx: Framer,
    input: BytesMut,
    offered_digests: (bool, bool),
    trace: Option<Vec<u8>>,
}

impl Initiator {
    /// A fresh connection with [`config`].
    pub fn new() -> Self {
        Self::with_config(config())
    }

    /// A fresh connection with `cfg`.
    pub fn with_config(cfg: ConnConfig) -> Self {
        // Any instant works as the origin of the virtual clock; nothing reads the real time
        // after this.
        let now = Instant::now();
        Self {
            conn: Connection::new(cfg, now),
            now,
            cmd_sn: 1,
            exp_stat_sn: 0,
            isid: [0x80, 0, 0x02, 0x3d, 0, 1],
            cid: 0,
            events: VecDeque::new(),
            pending: Vec::new(),
            pending_tmf: Vec::new(),
            header_digest: false,
            data_digest: false,
            target_mrdsl: 8192,
            next_itt: 0x100,
            rx: Framer {
                header_digest: false,
                data_digest: false,
                max_data_segment: 0xff_ffff,
            },
            input: BytesMut::new(),
            offered_digests: (false, false),
            trace: None,
        }
    }

    // ------------------------------------------------------------ tracing

    /// Record everything from now on as an `iscsi_conn` fuzz script (see [`fuzzing`]).
    pub fn start_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    /// The recorded script (empty if tracing was never started).
    pub fn take_trace(&mut self) -> Vec<u8> {
        self.trace.take().unwrap_or_default()
    }

    // ------------------------------------------------------------ raw I/O

    /// A fresh ITT.
    pub fn itt(&mut self) -> u32 {
        self.next_itt += 1;
        self.next_itt
    }

    /// Bytes of one PDU as the initiator puts it on the wire (with its current digests).
    pub fn encode(&self, bhs: Bhs, data: Bytes) -> BytesMut {
        let mut q = TxQueue::new();
        q.push_pdu(bhs, data, self.header_digest, self.data_digest);
        q.take_all()
    }

    /// Feed raw bytes to the target; returns what it sent back.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Vec<Received> {
        if let Some(t) = &mut self.trace {
            fuzzing::script_feed(t, bytes);
        }
        self.input.extend_from_slice(bytes);
        self.conn.handle_input(&mut self.input, self.now);
        self.pump();
        self.recv()
    }

    /// Send one PDU; returns what the target sent back.
    pub fn send(&mut self, bhs: Bhs, data: impl Into<Bytes>) -> Vec<Received> {
        let wire = self.encode(bhs, data.into());
        self.send_raw(&wire)
    }

    /// Move events from the connection into [`Initiator::events`], tracking pending commands
    /// and task management requests.
    pub fn pump(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match &ev {
                Event::Command(c) => self.pending.push(c.itt()),
                Event::TaskMgmt(t) => {
                    self.pending.retain(|i| !t.aborted.contains(i));
                    self.pending_tmf.push(t.clone());
                }
                _ => {}
            }
            self.events.push_back(ev);
        }
    }

    /// Decode everything the target queued.
    ///
    /// # Panics
    /// If the target's output does not frame or decode: the target must only ever send
    /// well-formed PDUs.
    pub fn recv(&mut self) -> Vec<Received> {
        let mut wire = self.conn.tx().take_all();
        let mut out = Vec::new();
        while !wire.is_empty() {
            let f = self
                .rx
                .decode(&mut wire)
                .expect("target output frames")
                .expect("target output holds whole PDUs");
            assert!(f.data_digest_ok, "target data digest");
            let pdu = Response::decode(&f.pdu.bhs).expect("target opcode");
            let r = Received {
                bhs: f.pdu.bhs,
                pdu,
                data: f.pdu.data,
            };
            self.observe(&r);
            out.push(r);
        }
        out
    }

    /// Track StatSN and, at the end of a login, switch digests on.
    fn observe(&mut self, r: &Received) {
        let stat_sn = match &r.pdu {
            Response::ScsiResponse(p) => Some(p.stat_sn),
            Response::DataIn(p) if p.status.is_some() => Some(p.stat_sn),
            Response::NopIn(p) if p.itt != RESERVED_TAG => Some(p.stat_sn),
            Response::TaskMgmt(p) => Some(p.stat_sn),
            Response::Login(p) => Some(p.stat_sn),
            Response::Text(p) => Some(p.stat_sn),
            Response::Logout(p) => Some(p.stat_sn),
            Response::Reject(p) => Some(p.stat_sn),
            Response::Async(p) => Some(p.stat_sn),
            _ => None,
        };
        if let Some(s) = stat_sn {
            self.exp_stat_sn = s.wrapping_add(1);
        }
        if let Response::Login(l) = &r.pdu {
            if let Ok(pairs) = text::parse(&r.data) {
                for (k, v) in pairs {
                    match k.as_str() {
                        "HeaderDigest" => self.offered_digests.0 = v == "CRC32C",
                        "DataDigest" => self.offered_digests.1 = v == "CRC32C",
                        "MaxRecvDataSegmentLength" => {
                            self.target_mrdsl = v.parse().unwrap_or(self.target_mrdsl);
                        }
                        _ => {}
                    }
                }
            }
            if l.transit && l.nsg == stage::FULL_FEATURE && l.status_class == 0 {
                (self.header_digest, self.data_digest) = self.offered_digests;
                self.rx.header_digest = self.header_digest;
                self.rx.data_digest = self.data_digest;
            }
        }
    }

    /// Take the oldest event.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Take every event.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Move the clock forward and run the target's timers; returns what it sent.
    pub fn advance(&mut self, d: Duration) -> Vec<Received> {
        if let Some(t) = &mut self.trace {
            fuzzing::script_time(t, d);
        }
        self.now += d;
        self.conn.handle_timeout(self.now);
        self.pump();
        self.recv()
    }

    /// Report a command finished; returns what the target sent.
    pub fn complete(&mut self, itt: u32, c: Completion) -> Vec<Received> {
        if let Some(t) = &mut self.trace {
            let sel = self.pending.iter().position(|&i| i == itt).unwrap_or(0);
            fuzzing::script_complete(t, sel, c.status, c.data.len(), c.transfer_len);
        }
        self.pending.retain(|&i| i != itt);
        self.conn.complete(itt, c);
        self.pump();
        self.recv()
    }

    /// Answer a task management request; returns what the target sent.
    pub fn complete_tmf(&mut self, itt: u32, function: u8, response: u8) -> Vec<Received> {
        if let Some(t) = &mut self.trace {
            let sel = self
                .pending_tmf
                .iter()
                .position(|e| e.itt == itt)
                .unwrap_or(0);
            fuzzing::script_tmf(t, sel, response);
        }
        self.pending_tmf.retain(|e| e.itt != itt);
        self.conn.complete_tmf(itt, function, response);
        self.pump();
        self.recv()
    }

    // ------------------------------------------------------------ login

    /// A Login Request with this initiator's ISID, CID and CmdSN and a fresh ITT.
    pub fn login_request(&mut self, csg: u8, nsg: u8, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            continue_bit: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: self.isid,
            tsih: 0,
            itt: self.itt(),
            cid: self.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }
    }

    /// Send a Login Request with text `pairs`; returns the one response.
    ///
    /// # Panics
    /// If the target does not answer with exactly one PDU.
    pub fn send_login(&mut self, req: &LoginRequest, pairs: &[Pair]) -> Received {
        let mut r = self.send(req.encode(), text::encode(pairs));
        assert_eq!(r.len(), 1, "one Login Response per Login Request: {r:?}");
        r.pop().expect("checked")
    }

    /// Log in as `opts` says (security stage, CHAP if asked, operational stage). `Err` holds
    /// the response that did not go as planned.
    pub fn login(&mut self, opts: &LoginOptions) -> Result<LoginResult, Box<Received>> {
        let mut responses = Vec::new();
        let mut pairs: Vec<Pair> = vec![("InitiatorName".into(), opts.initiator_name.clone())];
        match &opts.target {
            Some(t) => {
                pairs.push(("SessionType".into(), "Normal".into()));
                pairs.push(("TargetName".into(), t.clone()));
            }
            None => pairs.push(("SessionType".into(), "Discovery".into())),
        }
        let method = if opts.chap.is_some() {
            "CHAP,None"
        } else {
            "None"
        };
        pairs.push(("AuthMethod".into(), method.into()));
        let req = self.login_request(stage::SECURITY, stage::OPERATIONAL, true);
        let r = self.send_login(&req, &pairs);
        check_login(&r)?;
        responses.push(r.clone());
        if let Some(creds) = &opts.chap {
            if r.key("AuthMethod").as_deref() != Some("CHAP") {
                return Err(Box::new(r));
            }
            let req = self.login_request(stage::SECURITY, 0, false);
            let r = self.send_login(&req, &[("CHAP_A".into(), "5".into())]);
            check_login(&r)?;
            responses.push(r.clone());
            let (Some(id), Some(c)) = (r.key("CHAP_I"), r.key("CHAP_C")) else {
                return Err(Box::new(r));
            };
            let id: u8 = id.parse().map_err(|_| Box::new(r.clone()))?;
            let challenge = text::parse_binary(&c).ok_or_else(|| Box::new(r.clone()))?;
            let resp = chap::response(id, &creds.secret, &challenge);
            let mut pairs: Vec<Pair> = vec![
                ("CHAP_N".into(), creds.user.clone()),
                ("CHAP_R".into(), text::hex(&resp)),
            ];
            if let Some((_, mid, mch)) = &opts.mutual {
                pairs.push(("CHAP_I".into(), mid.to_string()));
                pairs.push(("CHAP_C".into(), text::hex(mch)));
            }
            let req = self.login_request(stage::SECURITY, stage::OPERATIONAL, true);
            let r = self.send_login(&req, &pairs);
            check_login(&r)?;
            responses.push(r.clone());
            if let Some((m, mid, mch)) = &opts.mutual {
                let want = text::hex(&chap::response(*mid, &m.secret, mch));
                if r.key("CHAP_N").as_deref() != Some(m.user.as_str())
                    || r.key("CHAP_R").as_deref() != Some(want.as_str())
                {
                    return Err(Box::new(r));
                }
            }
        }
        if !responses.last().is_some_and(|r| r.login().transit) {
            return Err(Box::new(responses.pop().expect("one response at least")));
        }
        // Operational stage.
        let mut keys: Vec<Pair> = Vec::new();
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" }.to_string();
        keys.push(("HeaderDigest".into(), digest(opts.header_digest)));
        keys.push(("DataDigest".into(), digest(opts.data_digest)));
        let defaults = if opts.target.is_some() {
            default_keys()
        } else {
            vec![("MaxRecvDataSegmentLength".into(), "262144".into())]
        };
        for (k, v) in defaults.into_iter().chain(opts.keys.iter().cloned()) {
            keys.retain(|(k2, _)| *k2 != k);
            keys.push((k, v));
        }
        let mut text = keys;
        for _ in 0..4 {
            let req = self.login_request(stage::OPERATIONAL, stage::FULL_FEATURE, true);
            let r = self.send_login(&req, &text);
            check_login(&r)?;
            responses.push(r.clone());
            if r.login().transit && r.login().nsg == stage::FULL_FEATURE {
                self.pump();
                return Ok(LoginResult { responses });
            }
            text = Vec::new();
        }
        Err(Box::new(responses.pop().expect("one response at least")))
    }

    /// [`Initiator::login`] that must succeed; drains the `LoggedIn` event.
    ///
    /// # Panics
    /// If the login fails.
    pub fn login_ok(&mut self, opts: &LoginOptions) -> LoginResult {
        let r = self
            .login(opts)
            .unwrap_or_else(|e| panic!("login failed: {e:?}"));
        match self.next_event() {
            Some(Event::LoggedIn(_)) => {}
            other => panic!("expected LoggedIn, got {other:?}"),
        }
        r
    }

    /// A logged-in normal session on [`TARGET`] with the default keys plus `keys`.
    pub fn logged_in(keys: &[(&str, &str)]) -> Self {
        let mut ini = Self::new();
        let mut opts = LoginOptions::default();
        for (k, v) in keys {
            opts = opts.key(k, v);
        }
        ini.login_ok(&opts);
        ini
    }

    // ------------------------------------------------------------ full feature phase

    /// A SCSI Command header with a fresh ITT, the next CmdSN (not yet consumed) and F set.
    pub fn scsi_command(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> ScsiCommand {
        let mut c = [0u8; 16];
        c[..cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        ScsiCommand {
            immediate: false,
            final_bit: true,
            read,
            write,
            attr: attr::SIMPLE,
            lun: [0; 8],
            itt: self.itt(),
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
        }
    }

    /// Send a SCSI Command with immediate `data`; a non-immediate command consumes a CmdSN.
    pub fn send_command(&mut self, c: &ScsiCommand, data: impl Into<Bytes>) -> Vec<Received> {
        if !c.immediate {
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
        }
        self.send(c.encode(), data)
    }

    /// A READ(10) of `edtl` bytes (512-byte blocks) at LBA 0; returns its ITT and responses.
    pub fn read(&mut self, edtl: u32) -> (u32, Vec<Received>) {
        let blocks = (edtl / 512) as u16;
        let cdb = [0x28, 0, 0, 0, 0, 0, 0, (blocks >> 8) as u8, blocks as u8, 0];
        let c = self.scsi_command(&cdb, edtl, true, false);
        let r = self.send_command(&c, Bytes::new());
        (c.itt, r)
    }

    /// A WRITE(10) header of `edtl` bytes.
    pub fn write_command(&mut self, edtl: u32) -> ScsiCommand {
        let blocks = (edtl / 512) as u16;
        let cdb = [0x2a, 0, 0, 0, 0, 0, 0, (blocks >> 8) as u8, blocks as u8, 0];
        self.scsi_command(&cdb, edtl, false, true)
    }

    /// A Data-Out PDU header.
    pub fn data_out(&self, itt: u32, ttt: u32, data_sn: u32, offset: u32, fin: bool) -> DataOut {
        DataOut {
            final_bit: fin,
            lun: [0; 8],
            itt,
            ttt,
            exp_stat_sn: self.exp_stat_sn,
            data_sn,
            buffer_offset: offset,
        }
    }

    /// Send `data` (placed at `offset` of the task's buffer) as a Data-Out sequence for `ttt`,
    /// split at the target's MaxRecvDataSegmentLength, DataSN from 0, F on the last PDU.
    pub fn send_sequence(&mut self, itt: u32, ttt: u32, offset: u32, data: &[u8]) -> Vec<Received> {
        let mut out = Vec::new();
        let max = self.target_mrdsl as usize;
        let n = data.len().div_ceil(max);
        for (i, chunk) in data.chunks(max).enumerate() {
            let off = offset + (i * max) as u32;
            let d = self.data_out(itt, ttt, i as u32, off, i + 1 == n);
            out.extend(self.send(d.encode(), Bytes::copy_from_slice(chunk)));
        }
        out
    }

    /// Write `data` the way a Linux initiator does with the negotiated keys: immediate data,
    /// then unsolicited Data-Out up to FirstBurstLength, then an answer to every R2T. Stops
    /// when no R2T is left to answer. Returns the ITT and everything the target sent.
    pub fn write(&mut self, data: &[u8]) -> (u32, Vec<Received>) {
        let p = self.conn.params().clone();
        let mut c = self.write_command(data.len() as u32);
        let first_burst = (p.first_burst_length as usize).min(data.len());
        let imm = if p.immediate_data {
            first_burst.min(self.target_mrdsl as usize)
        } else {
            0
        };
        let unsol_end = if p.initial_r2t { imm } else { first_burst };
        c.final_bit = unsol_end == imm;
        let mut seen = self.send_command(&c, Bytes::copy_from_slice(&data[..imm]));
        if unsol_end > imm {
            seen.extend(self.send_sequence(c.itt, RESERVED_TAG, imm as u32, &data[imm..unsol_end]));
        }
        let mut i = 0;
        while i < seen.len() {
            if let Response::R2t(r) = &seen[i].pdu {
                if r.itt == c.itt {
                    let (o, n) = (r.buffer_offset as usize, r.desired_len as usize);
                    let more = self.send_sequence(c.itt, r.ttt, r.buffer_offset, &data[o..o + n]);
                    seen.extend(more);
                }
            }
            i += 1;
        }
        (c.itt, seen)
    }

    /// Complete `itt` with GOOD and `data`, transfer length `data.len()`.
    pub fn complete_good(&mut self, itt: u32, data: impl Into<Bytes>) -> Vec<Received> {
        let data = data.into();
        let transfer_len = data.len() as u32;
        self.complete(
            itt,
            Completion {
                status: 0,
                sense: None,
                data,
                transfer_len,
            },
        )
    }

    /// Complete a write `itt` with GOOD and no data, transfer length `transfer_len`.
    pub fn complete_write(&mut self, itt: u32, transfer_len: u32) -> Vec<Received> {
        self.complete(
            itt,
            Completion {
                status: 0,
                sense: None,
                data: Bytes::new(),
                transfer_len,
            },
        )
    }

    /// The next command event.
    ///
    /// # Panics
    /// If the next event is not a command.
    pub fn expect_command(&mut self) -> super::conn::Command {
        match self.next_event() {
            Some(Event::Command(c)) => c,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    /// A NOP-Out ping with a fresh ITT and the current CmdSN (immediate, not consumed).
    pub fn nop_out(&mut self, data: &[u8]) -> Vec<Received> {
        let n = NopOut {
            immediate: true,
            lun: [0; 8],
            itt: self.itt(),
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.send(n.encode(), Bytes::copy_from_slice(data))
    }

    /// A Text Request with `pairs` (F set, new request).
    pub fn text(&mut self, pairs: &[Pair]) -> Vec<Received> {
        let t = TextRequest {
            immediate: false,
            final_bit: true,
            continue_bit: false,
            lun: [0; 8],
            itt: self.itt(),
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(t.encode(), text::encode(pairs))
    }

    /// A task management request (immediate, like Linux sends them).
    pub fn tmf(&mut self, function: u8, rtt: u32, ref_cmd_sn: u32) -> Vec<Received> {
        let t = TaskMgmtRequest {
            immediate: true,
            function,
            lun: [0; 8],
            itt: self.itt(),
            rtt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        self.send(t.encode(), Bytes::new())
    }

    /// A Logout Request (immediate) with `reason`.
    pub fn logout(&mut self, reason: u8) -> Vec<Received> {
        let l = LogoutRequest {
            immediate: true,
            reason,
            itt: self.itt(),
            cid: self.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.send(l.encode(), Bytes::new())
    }
}

impl Default for Initiator {
    fn default() -> Self {
        Self::new()
    }
}

fn check_login(r: &Received) -> Result<(), Box<Received>> {
    match &r.pdu {
        Response::Login(l) if l.status_class == 0 => Ok(()),
        _ => Err(Box::new(r.clone())),
    }
}

/// Assemble the Data-In of one task: data in offset order.
///
/// # Panics
/// If offsets are not contiguous.
pub fn assemble(rs: &[Received], itt: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rs {
        if let Response::DataIn(d) = &r.pdu {
            if d.itt == itt {
                assert_eq!(
                    d.buffer_offset as usize,
                    out.len(),
                    "Data-In offsets are contiguous"
                );
                out.extend_from_slice(&r.data);
            }
        }
    }
    out
}

/// A data pattern of `n` bytes.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// The Data-In PDUs among `rs`.
pub fn data_ins(rs: &[Received]) -> Vec<&DataIn> {
    rs.iter()
        .filter_map(|r| match &r.pdu {
            Response::DataIn(d) => Some(d),
            _ => None,
        })
        .collect()
}

/// The R2Ts among `rs`.
pub fn r2ts(rs: &[Received]) -> Vec<&R2t> {
    rs.iter()
        .filter_map(|r| match &r.pdu {
            Response::R2t(d) => Some(d),
            _ => None,
        })
        .collect()
}

/// The Rejects among `rs`.
pub fn rejects(rs: &[Received]) -> Vec<&Reject> {
    rs.iter()
        .filter_map(|r| match &r.pdu {
            Response::Reject(d) => Some(d),
            _ => None,
        })
        .collect()
}

/// A NOP-In answer helper: the NOP-Out that answers target ping `n`.
pub fn answer_ping(n: &NopIn, cmd_sn: u32, exp_stat_sn: u32) -> NopOut {
    NopOut {
        immediate: true,
        lun: n.lun,
        itt: RESERVED_TAG,
        ttt: n.ttt,
        cmd_sn,
        exp_stat_sn,
    }
}
