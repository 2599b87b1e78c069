//! One iSCSI connection, target side: login, then the full feature phase (RFC 7143 §4, §11).
//!
//! [`Connection`] is sans-IO. The driver feeds it received bytes ([`Connection::handle_input`])
//! and the current time, takes [`Event`]s (commands ready to execute, task management, login
//! completion, close), reports finished commands ([`Connection::complete`]), and writes out the
//! [`TxQueue`]. Timers are [`Connection::poll_timeout`] / [`Connection::handle_timeout`].
//!
//! What it implements at ErrorRecoveryLevel 0, MaxConnections 1:
//! - the CmdSN window: commands outside `[ExpCmdSN, MaxCmdSN]` are dropped silently, commands
//!   ahead of a gap are held until the gap fills, MaxCmdSN opens as commands complete;
//! - write data: immediate data, unsolicited Data-Out up to FirstBurstLength, R2Ts in
//!   MaxBurstLength pieces with at most MaxOutstandingR2T per task, DataSN / buffer offset /
//!   TTT checks, a per-connection budget of buffered write data; a command's data is handed
//!   on as the [`Segments`] it arrived in (slices of the receive buffer, never copied here);
//! - read data: Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength, F bits per
//!   MaxBurstLength sequence, the status collapsed into the last Data-In when there is no sense;
//! - residual overflow and underflow from the command's own transfer length;
//! - NOP-Out answers, NOP-In pings of idle initiators and dropping connections that don't answer;
//! - task management (aborting this connection's tasks; the driver applies the LU effects);
//! - Text (SendTargets, FFP declarations, long answers split with the C bit), Logout, Reject.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::framer::{Frame, FrameError, Framer, TxQueue};
use super::keys::{self, Answer, Params, Phase as KeyPhase};
use super::login::{Login, LoginFailure, LoginOutcome, LoginSetup, LoginStep, SessionType};
use super::pdu::{
    reject, tmf, Bhs, DataIn, DataOut, LoginRequest, LogoutRequest, LogoutResponse, NopIn, NopOut,
    Opcode, Pdu, R2t, Reject, Residual, ScsiCommand, ScsiResponse, TaskMgmtRequest,
    TaskMgmtResponse, TextRequest, TextResponse, RESERVED_TAG,
};
use super::seq;
use super::text;
use crate::scsi::sense::{Sense, Status};
use crate::segments::Segments;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Login inputs (directory, limits, TSIH, CHAP challenge).
    pub login: LoginSetup,
    /// `host:port` the initiator connected to, advertised by SendTargets when a target has no
    /// configured portals.
    pub local_portal: String,
    /// Ping the initiator after this much silence (None: never).
    pub nop_interval: Option<Duration>,
    /// Drop the connection when a ping stays unanswered this long.
    pub nop_timeout: Duration,
    /// Drop the connection when login takes longer.
    pub login_timeout: Duration,
    /// Largest Expected Data Transfer Length accepted for a write.
    pub max_write_transfer: u32,
    /// Bytes of write data the connection may hold; R2Ts wait beyond it.
    pub write_budget: usize,
}

/// A SCSI command whose Data-Out is complete, ready for the SCSI layer: the command and the
/// LUN it is for.
#[derive(Debug, Clone)]
pub struct Command {
    /// Raw 8-byte LUN field.
    pub lun: [u8; 8],
    /// The command: its CDB (16 bytes from the BHS, more from an extended-CDB AHS), its
    /// Data-Out (exactly EDTL bytes for writes, in the pieces it arrived in: immediate data and
    /// each Data-Out PDU's segment, uncopied), EDTL, R and W bits, task attribute, and the
    /// Initiator Task Tag as its tag.
    pub cmd: crate::scsi::ScsiCommand,
}

impl Command {
    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.cmd.tag
    }
}

/// A finished command, as the SCSI layer reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completion {
    /// SCSI status.
    pub status: u8,
    /// Sense data (CHECK CONDITION).
    pub sense: Option<Bytes>,
    /// Data-In (truncated to the expected length here).
    pub data: Bytes,
    /// Bytes the command meant to transfer, for the residual.
    pub transfer_len: u32,
}

/// A task management request the driver must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfEvent {
    /// ITT of the TMF request (answer with [`Connection::complete_tmf`]).
    pub itt: u32,
    /// Function code (see [`tmf`](super::pdu::tmf)).
    pub function: u8,
    /// LUN field.
    pub lun: [u8; 8],
    /// Referenced Task Tag (ABORT TASK).
    pub rtt: u32,
    /// Tasks of this connection that were executing and are now aborted: cancel them; their
    /// completions are ignored.
    pub aborted: Vec<u32>,
}

/// What the connection asks of its driver.
#[derive(Debug, Clone)]
pub enum Event {
    /// Login succeeded (before any command of the session).
    LoggedIn(Box<LoginOutcome>),
    /// Execute a SCSI command; report it with [`Connection::complete`].
    Command(Command),
    /// Task management.
    TaskMgmt(TmfEvent),
    /// Close the connection once the transmit queue is written.
    Close(CloseReason),
}

/// Why a connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Logout completed.
    Logout,
    /// Login failed.
    LoginFailed(LoginFailure),
    /// Login did not finish in time.
    LoginTimeout,
    /// The initiator stopped answering NOP-In pings.
    NopTimeout,
    /// A protocol violation that leaves the stream untrustworthy.
    Fatal(ConnError),
    /// TARGET COLD RESET.
    ColdReset,
}

/// Fatal connection errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// Framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A PDU that cannot be answered within the protocol.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// Counters for metrics (plain numbers; the gateway exports them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnStats {
    /// PDUs received.
    pub pdus_in: u64,
    /// PDUs queued for sending.
    pub pdus_out: u64,
    /// SCSI commands received.
    pub commands: u64,
    /// Header or data digest errors.
    pub digest_errors: u64,
    /// Reject PDUs sent.
    pub rejects: u64,
    /// Commands dropped for a CmdSN outside the window.
    pub cmdsn_dropped: u64,
}

#[derive(Debug)]
enum Phase {
    Login(Box<Login>),
    Full(SessionType),
    Closed,
}

#[derive(Debug)]
struct R2tState {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    data_sn: u32,
}

#[derive(Debug)]
struct Collect {
    data: Segments,
    received: u32,
    unsol_end: u32,
    unsol_data_sn: u32,
    next_r2t_offset: u32,
    r2ts: Vec<R2tState>,
    r2t_sn: u32,
}

#[derive(Debug)]
enum TaskState {
    Collecting(Box<Collect>),
    Executing,
}

#[derive(Debug)]
struct Task {
    lun: [u8; 8],
    cdb: Bytes,
    edtl: u32,
    read: bool,
    write: bool,
    attr: u8,
    counted: bool,
    held_bytes: usize,
    r2t_count: u32,
    state: TaskState,
}

/// Text continuation (Text Response longer than the initiator accepts in one PDU).
#[derive(Debug)]
struct TextCont {
    itt: u32,
    ttt: u32,
    rest: Bytes,
}

const DEAD_ITTS: usize = 64;

/// One iSCSI connection (and, with MaxConnections=1, its session).
#[derive(Debug)]
pub struct Connection {
    cfg: ConnConfig,
    phase: Phase,
    framer: Framer,
    tx: TxQueue,
    events: VecDeque<Event>,
    params: Params,
    target_name: Option<String>,
    initiator: String,
    cid: u16,
    exp_cmd_sn: u32,
    advertised_max: u32,
    outstanding: u32,
    stat_sn: u32,
    tasks: HashMap<u32, Task>,
    /// Commands ahead of a CmdSN gap; `None` marks a CmdSN counted as received without a
    /// command (ABORT TASK of a lost command).
    held: HashMap<u32, Option<Frame>>,
    dead_itts: VecDeque<u32>,
    r2t_waiting: VecDeque<u32>,
    held_write_bytes: usize,
    next_ttt: u32,
    text_in: Option<(u32, u32, Vec<u8>)>,
    text_cont: Option<TextCont>,
    logout_pending: Option<LogoutRequest>,
    login_deadline: Instant,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    stats: ConnStats,
}

impl Connection {
    /// A new connection waiting for its first Login Request.
    pub fn new(cfg: ConnConfig, now: Instant) -> Self {
        let mrdsl = cfg.login.limits.max_recv_data_segment_length.max(8192);
        Self {
            framer: Framer::new(mrdsl),
            phase: Phase::Login(Box::new(Login::new(cfg.login.clone()))),
            tx: TxQueue::new(),
            events: VecDeque::new(),
            params: Params::default(),
            target_name: None,
            initiator: String::new(),
            cid: 0,
            exp_cmd_sn: 0,
            advertised_max: 0,
            outstanding: 0,
            stat_sn: 0,
            tasks: HashMap::new(),
            held: HashMap::new(),
            dead_itts: VecDeque::new(),
            r2t_waiting: VecDeque::new(),
            held_write_bytes: 0,
            next_ttt: 1,
            text_in: None,
            text_cont: None,
            logout_pending: None,
            login_deadline: now + cfg.login_timeout,
            last_rx: now,
            ping: None,
            stats: ConnStats::default(),
            cfg,
        }
    }

    /// The transmit queue: write it out to the socket.
    pub fn tx(&mut self) -> &mut TxQueue {
        &mut self.tx
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Counters.
    pub fn stats(&self) -> &ConnStats {
        &self.stats
    }

    /// Negotiated parameters (defaults until login completes).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Whether the connection is closed (after a Close event).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Commands in flight (received, not yet completed).
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }

    fn close(&mut self, why: CloseReason) {
        if !self.is_closed() {
            self.phase = Phase::Closed;
            self.events.push_back(Event::Close(why));
        }
    }

    fn max_cmd_sn(&mut self) -> u32 {
        let window = self.cfg.login.cmd_window.max(1);
        let open = window - self.outstanding.min(window);
        let m = self.exp_cmd_sn.wrapping_add(open).wrapping_sub(1);
        // MaxCmdSN never moves backwards.
        if seq::lt(self.advertised_max, m) {
            self.advertised_max = m;
        }
        self.advertised_max
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn send(&mut self, bhs: Bhs, data: Bytes) {
        self.stats.pdus_out += 1;
        let (hd, dd) = (self.framer.header_digest, self.framer.data_digest);
        self.tx.push_pdu(bhs, data, hd, dd);
    }

    /// Consume received bytes: every complete PDU in `buf` is processed.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        while !self.is_closed() {
            let frame = match self.framer.decode(buf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    if e == FrameError::HeaderDigest {
                        self.stats.digest_errors += 1;
                    }
                    self.close(CloseReason::Fatal(e.into()));
                    return;
                }
            };
            self.stats.pdus_in += 1;
            self.last_rx = now;
            self.ping = None;
            match &mut self.phase {
                Phase::Login(_) => self.on_login_pdu(frame),
                Phase::Full(_) => self.on_ffp_pdu(frame, true),
                Phase::Closed => return,
            }
        }
    }

    // ---------------------------------------------------------------- login

    fn on_login_pdu(&mut self, f: Frame) {
        let Phase::Login(login) = &mut self.phase else {
            return;
        };
        if f.pdu.bhs.opcode() != Opcode::LOGIN_REQUEST || !f.data_digest_ok {
            self.close(CloseReason::Fatal(ConnError::Protocol(
                "non-login PDU during login",
            )));
            return;
        }
        let req = LoginRequest::decode(&f.pdu.bhs);
        match login.handle(&req, &f.pdu.data) {
            LoginStep::Continue(r, data) => self.send(r.encode(), data),
            LoginStep::Failed(r, data, why) => {
                self.send(r.encode(), data);
                self.close(CloseReason::LoginFailed(why));
            }
            LoginStep::Done(r, data, outcome) => {
                self.send(r.encode(), data);
                self.params = outcome.params.clone();
                self.exp_cmd_sn = outcome.exp_cmd_sn;
                self.advertised_max = r.max_cmd_sn;
                self.stat_sn = outcome.stat_sn;
                self.cid = outcome.cid;
                self.initiator = outcome.initiator_name.clone();
                self.target_name = outcome.target.as_ref().map(|t| t.name.clone());
                // Digests and our receive limit apply from the next PDU on.
                self.framer.header_digest = self.params.header_digest;
                self.framer.data_digest = self.params.data_digest;
                self.framer.max_data_segment = self.params.target_mrdsl;
                self.phase = Phase::Full(outcome.session_type);
                self.events.push_back(Event::LoggedIn(outcome));
            }
        }
    }

    // ---------------------------------------------------------------- FFP dispatch

    fn session_type(&self) -> Option<SessionType> {
        match self.phase {
            Phase::Full(t) => Some(t),
            _ => None,
        }
    }

    fn reject(&mut self, reason: u8, bhs: &Bhs) {
        self.stats.rejects += 1;
        let r = Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
        };
        self.send(r.encode(), Bytes::copy_from_slice(&bhs.0));
    }

    /// CmdSN acceptance for a command-carrying PDU: process now, hold, or drop.
    fn admit(&mut self, f: &Frame, immediate: bool, cmd_sn: u32) -> Admit {
        if immediate {
            return Admit::Now;
        }
        let max = self.max_cmd_sn();
        // With the window closed (MaxCmdSN = ExpCmdSN - 1) even ExpCmdSN is outside it.
        if cmd_sn == self.exp_cmd_sn && seq::le(cmd_sn, max) {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            return Admit::Now;
        }
        if seq::in_window(cmd_sn, self.exp_cmd_sn.wrapping_add(1), max)
            && !self.held.contains_key(&cmd_sn)
        {
            self.held.insert(cmd_sn, Some(f.clone()));
            return Admit::Held;
        }
        self.stats.cmdsn_dropped += 1;
        Admit::Drop
    }

    fn release_held(&mut self) {
        while let Some(f) = self.held.remove(&self.exp_cmd_sn) {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            if let Some(f) = f {
                self.on_ffp_pdu(f, false);
            }
        }
    }

    fn on_ffp_pdu(&mut self, f: Frame, check_sn: bool) {
        let bhs = f.pdu.bhs;
        let op = bhs.opcode();
        let discovery = self.session_type() == Some(SessionType::Discovery);
        // Command-carrying PDUs pass the CmdSN window first.
        let sn = match op {
            Opcode::SCSI_COMMAND
            | Opcode::TASK_MGMT_REQUEST
            | Opcode::TEXT_REQUEST
            | Opcode::LOGOUT_REQUEST => Some((bhs.immediate(), bhs.u32_at(24))),
            Opcode::NOP_OUT if bhs.itt() != RESERVED_TAG => Some((bhs.immediate(), bhs.u32_at(24))),
            _ => None,
        };
        if let (Some((imm, cmd_sn)), true) = (sn, check_sn) {
            match self.admit(&f, imm, cmd_sn) {
                Admit::Now => {}
                Admit::Held | Admit::Drop => return,
            }
        }
        if !f.data_digest_ok {
            // Checked after the window, so a damaged command still uses its CmdSN in order.
            self.stats.digest_errors += 1;
            self.on_data_digest_error(f);
            if check_sn && sn.is_some() {
                self.release_held();
            }
            return;
        }
        match op {
            Opcode::SCSI_COMMAND if !discovery => self.on_scsi_command(f.pdu, true),
            Opcode::DATA_OUT if !discovery => self.on_data_out(f.pdu),
            Opcode::TASK_MGMT_REQUEST if !discovery => self.on_tmf(f.pdu),
            Opcode::NOP_OUT => self.on_nop_out(f.pdu),
            Opcode::TEXT_REQUEST => self.on_text(f.pdu),
            Opcode::LOGOUT_REQUEST => self.on_logout(LogoutRequest::decode(&bhs)),
            Opcode::SCSI_COMMAND | Opcode::DATA_OUT | Opcode::TASK_MGMT_REQUEST => {
                // Discovery sessions carry only Text, NOP and Logout (RFC 7143 §4.3).
                self.reject(reject::PROTOCOL_ERROR, &bhs);
            }
            Opcode::SNACK_REQUEST | Opcode::LOGIN_REQUEST => {
                // No SNACK at ErrorRecoveryLevel 0; no login once logged in.
                self.reject(reject::PROTOCOL_ERROR, &bhs);
            }
            _ => self.reject(reject::COMMAND_NOT_SUPPORTED, &bhs),
        }
        if check_sn && sn.is_some() {
            self.release_held();
        }
    }

    fn on_data_digest_error(&mut self, f: Frame) {
        let bhs = f.pdu.bhs;
        // RFC 7143 §7.8: reject the PDU. At ErrorRecoveryLevel 0 the initiator cannot resend
        // it, so the command it carries or belongs to ends now with CHECK CONDITION, "protocol
        // service CRC error", rather than hanging until the initiator's SCSI timeout (Linux
        // logs the Reject and completes the command on the SCSI Response).
        self.reject(reject::DATA_DIGEST_ERROR, &bhs);
        let itt = bhs.itt();
        match bhs.opcode() {
            Opcode::DATA_OUT if self.tasks.contains_key(&itt) => {
                self.fail_task(itt, Sense::PROTOCOL_SERVICE_CRC_ERROR);
            }
            Opcode::SCSI_COMMAND if self.session_type() == Some(SessionType::Normal) => {
                self.on_scsi_command(f.pdu, false);
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------- SCSI commands

    /// A SCSI Command; `data_ok` is false when its immediate data failed the digest.
    fn on_scsi_command(&mut self, p: Pdu, data_ok: bool) {
        let c = ScsiCommand::decode(&p.bhs);
        self.stats.commands += 1;
        self.dead_itts.retain(|&i| i != c.itt);
        if self.tasks.contains_key(&c.itt) {
            // An ITT must be unique among the session's tasks.
            self.reject(reject::TASK_IN_PROGRESS, &p.bhs);
            return;
        }
        if c.immediate && self.tasks.len() >= self.cfg.login.cmd_window.max(1) as usize {
            // Immediate commands bypass the CmdSN window; the queue depth still bounds them
            // (RFC 7143 §11.17.1, "too many immediate commands").
            self.reject(reject::IMMEDIATE_COMMAND_REJECT, &p.bhs);
            return;
        }
        let mut cdb = BytesMut::with_capacity(16 + p.ahs.len());
        cdb.put_slice(&c.cdb);
        if !p.ahs.is_empty() {
            // Extended CDB AHS (type 1): 2-byte length, type, reserved, then the CDB bytes.
            let a = &p.ahs;
            if a.len() >= 4 && a[2] == 1 {
                let len = u16::from_be_bytes([a[0], a[1]]) as usize;
                let ext = len.saturating_sub(1).min(a.len() - 4);
                cdb.put_slice(&a[4..4 + ext]);
            }
        }
        let mut task = Task {
            lun: c.lun,
            cdb: cdb.freeze(),
            edtl: c.edtl,
            read: c.read,
            write: c.write,
            attr: c.attr,
            counted: !c.immediate,
            held_bytes: 0,
            r2t_count: 0,
            state: TaskState::Executing,
        };
        if task.counted {
            self.outstanding += 1;
        }
        if !data_ok {
            self.tasks.insert(c.itt, task);
            self.fail_task(c.itt, Sense::PROTOCOL_SERVICE_CRC_ERROR);
            return;
        }
        let imm_len = p.data.len() as u32;
        if !c.write || c.edtl == 0 {
            if imm_len > 0 {
                // Data with a command that declares no Data-Out.
                self.tasks.insert(c.itt, task);
                self.fail_task(c.itt, Sense::UNEXPECTED_UNSOLICITED_DATA);
                return;
            }
            self.tasks.insert(c.itt, task);
            self.dispatch(c.itt, Segments::new());
            return;
        }
        let too_much_imm = imm_len > c.edtl
            || imm_len > self.params.first_burst_length
            || (imm_len > 0 && !self.params.immediate_data);
        if too_much_imm || c.edtl > self.cfg.max_write_transfer {
            self.tasks.insert(c.itt, task);
            if too_much_imm {
                self.fail_task(c.itt, Sense::UNEXPECTED_UNSOLICITED_DATA);
            } else {
                self.fail_task(c.itt, Sense::INVALID_FIELD_IN_CDB);
            }
            return;
        }
        if imm_len == c.edtl {
            // Everything came as immediate data: no R2T.
            task.held_bytes = imm_len as usize;
            self.held_write_bytes += task.held_bytes;
            self.tasks.insert(c.itt, task);
            self.dispatch(c.itt, p.data.into());
            return;
        }
        let unsol_end = if self.params.initial_r2t || c.final_bit {
            imm_len
        } else {
            c.edtl.min(self.params.first_burst_length)
        };
        // Data is counted against the write budget as it is allowed to come: the unsolicited
        // part when it starts arriving, each R2T's part when the R2T goes out. Queued writes
        // hold nothing.
        let mut data = Segments::new();
        if imm_len > 0 {
            admit_upto(&mut task.held_bytes, &mut self.held_write_bytes, unsol_end);
            data.push(p.data);
        }
        task.state = TaskState::Collecting(Box::new(Collect {
            data,
            received: imm_len,
            unsol_end,
            unsol_data_sn: 0,
            next_r2t_offset: unsol_end,
            r2ts: Vec::new(),
            r2t_sn: 0,
        }));
        self.tasks.insert(c.itt, task);
        if unsol_end < c.edtl {
            self.r2t_waiting.push_back(c.itt);
            self.issue_r2ts();
        }
    }

    /// Hand a task with all its data to the driver.
    fn dispatch(&mut self, itt: u32, data: Segments) {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        t.state = TaskState::Executing;
        self.events.push_back(Event::Command(Command {
            lun: t.lun,
            cmd: crate::scsi::ScsiCommand {
                cdb: t.cdb.clone(),
                data_out: data,
                expected_len: t.edtl,
                read: t.read,
                write: t.write,
                attr: super::pdu::attr::task_attr(t.attr),
                tag: itt,
            },
        }));
    }

    /// Issue R2Ts for waiting tasks within MaxOutstandingR2T and the write budget.
    fn issue_r2ts(&mut self) {
        let mut i = 0;
        while i < self.r2t_waiting.len() {
            // Beyond the write budget only the oldest waiting task gets R2Ts, so memory stays
            // bounded and the connection still makes progress.
            if i > 0 && self.held_write_bytes > self.cfg.write_budget {
                break;
            }
            let itt = self.r2t_waiting[i];
            let (max_burst, max_out) = (
                self.params.max_burst_length,
                self.params.max_outstanding_r2t as usize,
            );
            let mut produced = Vec::new();
            let done;
            if let Some(Task {
                state: TaskState::Collecting(c),
                edtl,
                lun,
                held_bytes,
                ..
            }) = self.tasks.get_mut(&itt)
            {
                while c.r2ts.len() < max_out && c.next_r2t_offset < *edtl {
                    let len = (*edtl - c.next_r2t_offset).min(max_burst);
                    let ttt = self.next_ttt;
                    self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
                    if self.next_ttt == RESERVED_TAG {
                        self.next_ttt = 1;
                    }
                    c.r2ts.push(R2tState {
                        ttt,
                        offset: c.next_r2t_offset,
                        len,
                        received: 0,
                        data_sn: 0,
                    });
                    produced.push((*lun, ttt, c.r2t_sn, c.next_r2t_offset, len));
                    c.r2t_sn += 1;
                    c.next_r2t_offset += len;
                    admit_upto(held_bytes, &mut self.held_write_bytes, c.next_r2t_offset);
                }
                done = c.next_r2t_offset >= *edtl;
            } else {
                done = true;
            }
            for (lun, ttt, r2t_sn, offset, len) in produced {
                let r = R2t {
                    lun,
                    itt,
                    ttt,
                    stat_sn: self.stat_sn,
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                    r2t_sn,
                    buffer_offset: offset,
                    desired_len: len,
                };
                if let Some(t) = self.tasks.get_mut(&itt) {
                    t.r2t_count += 1;
                }
                self.send(r.encode(), Bytes::new());
            }
            if done {
                self.r2t_waiting.remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn on_data_out(&mut self, p: Pdu) {
        let d = DataOut::decode(&p.bhs);
        let len = p.data.len() as u32;
        let Some(task) = self.tasks.get_mut(&d.itt) else {
            if !self.dead_itts.contains(&d.itt) {
                self.reject(reject::INVALID_PDU_FIELD, &p.bhs);
            }
            return;
        };
        let TaskState::Collecting(c) = &mut task.state else {
            self.reject(reject::PROTOCOL_ERROR, &p.bhs);
            return;
        };
        // In-order delivery (DataPDUInOrder=Yes, DataSequenceInOrder=Yes): every PDU continues
        // exactly where the previous one ended.
        let in_order = d.buffer_offset == c.received && len > 0;
        let ok = if d.ttt == RESERVED_TAG {
            let ok = in_order
                && d.buffer_offset + len <= c.unsol_end
                && d.data_sn == c.unsol_data_sn
                && (d.final_bit == (d.buffer_offset + len == c.unsol_end));
            c.unsol_data_sn = c.unsol_data_sn.wrapping_add(1);
            ok
        } else if let Some(r) = c.r2ts.iter_mut().find(|r| r.ttt == d.ttt) {
            let ok = in_order
                && d.buffer_offset >= r.offset
                && d.buffer_offset + len <= r.offset + r.len
                && d.data_sn == r.data_sn
                && (d.final_bit == (r.received + len == r.len));
            r.data_sn = r.data_sn.wrapping_add(1);
            r.received += len;
            ok
        } else {
            false
        };
        if !ok {
            // DataSN, offset or TTT out of sequence: the command fails (ERL 0 cannot recover
            // within the connection); later Data-Out for it is dropped.
            self.fail_task(d.itt, Sense::DATA_PHASE_ERROR);
            return;
        }
        if d.ttt == RESERVED_TAG {
            admit_upto(
                &mut task.held_bytes,
                &mut self.held_write_bytes,
                c.unsol_end,
            );
        }
        // The PDU's data stays where the framer cut it from the receive buffer.
        c.data.push(p.data);
        c.received += len;
        c.r2ts.retain(|r| r.received < r.len);
        let complete = c.received == task.edtl;
        let more_r2ts = c.next_r2t_offset < task.edtl && c.r2ts.is_empty();
        if complete {
            let data = std::mem::take(&mut c.data);
            self.dispatch(d.itt, data);
        } else if more_r2ts || c.r2ts.len() < self.params.max_outstanding_r2t as usize {
            if !self.r2t_waiting.contains(&d.itt) && c.next_r2t_offset < task.edtl {
                self.r2t_waiting.push_back(d.itt);
            }
            self.issue_r2ts();
        }
    }

    /// End a task now with `sense` (a CHECK CONDITION, fixed-format sense data); later
    /// Data-Out for it is dropped quietly.
    fn fail_task(&mut self, itt: u32, sense: Sense) {
        if !self.tasks.contains_key(&itt) {
            return;
        }
        let transfer = self.tasks.get(&itt).map_or(0, |t| t.edtl);
        self.complete(
            itt,
            Completion {
                status: sense.status,
                sense: Some(Bytes::from(sense.encode(false))),
                data: Bytes::new(),
                transfer_len: transfer,
            },
        );
        self.dead_itts.push_back(itt);
        if self.dead_itts.len() > DEAD_ITTS {
            self.dead_itts.pop_front();
        }
    }

    /// Report a finished command: queues Data-In and/or the SCSI Response. Completions of
    /// aborted or unknown tasks are ignored.
    pub fn complete(&mut self, itt: u32, c: Completion) {
        let Some(task) = self.tasks.remove(&itt) else {
            return;
        };
        if task.counted {
            self.outstanding = self.outstanding.saturating_sub(1);
        }
        self.held_write_bytes = self.held_write_bytes.saturating_sub(task.held_bytes);
        self.r2t_waiting.retain(|&i| i != itt);
        if self.is_closed() {
            return;
        }
        let residual = if task.edtl == 0 && c.transfer_len == 0 {
            Residual::None
        } else {
            Residual::of(task.edtl, c.transfer_len)
        };
        let data = if task.read {
            let n = c.data.len().min(task.edtl as usize);
            c.data.slice(..n)
        } else {
            Bytes::new()
        };
        let collapse = !data.is_empty()
            && c.sense.is_none()
            && (c.status == Status::GOOD || c.status == Status::CONDITION_MET);
        let n = data.len();
        let mrdsl = self.params.initiator_mrdsl.max(512) as usize;
        let burst = self.params.max_burst_length.max(512) as usize;
        let mut off = 0usize;
        let mut data_sn = 0u32;
        let mut in_burst = 0usize;
        while off < n {
            let seg = (n - off).min(mrdsl).min(burst - in_burst);
            let last = off + seg == n;
            in_burst += seg;
            let end_of_burst = last || in_burst == burst;
            let with_status = last && collapse;
            let di = DataIn {
                final_bit: end_of_burst,
                ack: false,
                status: with_status.then_some(c.status),
                residual: if with_status {
                    residual
                } else {
                    Residual::None
                },
                lun: [0; 8],
                itt,
                ttt: RESERVED_TAG,
                stat_sn: if with_status { self.next_stat_sn() } else { 0 },
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                data_sn,
                buffer_offset: off as u32,
            };
            self.send(di.encode(), data.slice(off..off + seg));
            data_sn += 1;
            off += seg;
            if end_of_burst {
                in_burst = 0;
            }
        }
        if !collapse {
            let sense = match &c.sense {
                Some(s) => {
                    let mut b = BytesMut::with_capacity(2 + s.len());
                    b.put_u16(s.len() as u16);
                    b.put_slice(s);
                    b.freeze()
                }
                None => Bytes::new(),
            };
            let r = ScsiResponse {
                response: 0,
                status: c.status,
                residual,
                itt,
                stat_sn: self.next_stat_sn(),
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                exp_data_sn: if task.read { data_sn } else { task.r2t_count },
            };
            self.send(r.encode(), sense);
        }
        // A waiting logout proceeds once nothing is in flight; R2Ts may now fit the budget.
        self.issue_r2ts();
        self.try_logout();
    }

    // ---------------------------------------------------------------- task management

    fn on_tmf(&mut self, p: Pdu) {
        let t = TaskMgmtRequest::decode(&p.bhs);
        let respond = |me: &mut Self, code: u8| {
            let r = TaskMgmtResponse {
                response: code,
                itt: t.itt,
                stat_sn: me.next_stat_sn(),
                exp_cmd_sn: me.exp_cmd_sn,
                max_cmd_sn: me.max_cmd_sn(),
            };
            me.send(r.encode(), Bytes::new());
        };
        let aborted: Vec<u32> = match t.function {
            tmf::ABORT_TASK => match self.tasks.get(&t.rtt) {
                Some(task) if task.lun == t.lun => vec![t.rtt],
                Some(_) => {
                    respond(self, 1); // Task does not exist (on that LUN).
                    return;
                }
                None => {
                    // RFC 7143 §11.6.1: an unknown task whose RefCmdSN is in the window and
                    // older than this request was lost (or is held behind a gap): its CmdSN
                    // counts as received and the abort is complete. Otherwise the task does
                    // not exist.
                    let max = self.max_cmd_sn();
                    if seq::in_window(t.ref_cmd_sn, self.exp_cmd_sn, max)
                        && seq::lt(t.ref_cmd_sn, t.cmd_sn)
                    {
                        self.held.insert(t.ref_cmd_sn, None);
                        respond(self, 0);
                        self.release_held();
                    } else {
                        respond(self, 1);
                    }
                    return;
                }
            },
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => self
                .tasks
                .iter()
                .filter(|(_, x)| x.lun == t.lun)
                .map(|(i, _)| *i)
                .collect(),
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => self.tasks.keys().copied().collect(),
            tmf::CLEAR_ACA => {
                respond(self, 5); // NACA is never set: nothing to clear, not supported.
                return;
            }
            tmf::TASK_REASSIGN => {
                respond(self, 4); // Needs ErrorRecoveryLevel 2.
                return;
            }
            _ => {
                respond(self, 5);
                return;
            }
        };
        let mut executing = Vec::new();
        for itt in aborted {
            if let Some(task) = self.tasks.remove(&itt) {
                if task.counted {
                    self.outstanding = self.outstanding.saturating_sub(1);
                }
                self.held_write_bytes = self.held_write_bytes.saturating_sub(task.held_bytes);
                self.r2t_waiting.retain(|&i| i != itt);
                if matches!(task.state, TaskState::Collecting(_)) {
                    self.dead_itts.push_back(itt);
                    if self.dead_itts.len() > DEAD_ITTS {
                        self.dead_itts.pop_front();
                    }
                } else {
                    executing.push(itt);
                }
            }
        }
        self.events.push_back(Event::TaskMgmt(TmfEvent {
            itt: t.itt,
            function: t.function,
            lun: t.lun,
            rtt: t.rtt,
            aborted: executing,
        }));
    }

    /// Answer a task management request (response codes of RFC 7143 §11.6.1).
    pub fn complete_tmf(&mut self, itt: u32, function: u8, response: u8) {
        if self.is_closed() {
            return;
        }
        let r = TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        self.send(r.encode(), Bytes::new());
        if function == tmf::TARGET_COLD_RESET && response == 0 {
            self.close(CloseReason::ColdReset);
        }
        self.try_logout();
    }

    // ---------------------------------------------------------------- NOP, text, logout

    fn on_nop_out(&mut self, p: Pdu) {
        let n = NopOut::decode(&p.bhs);
        if n.itt == RESERVED_TAG {
            // An answer to our ping (TTT set) or an unsolicited "I'm alive": nothing to send.
            return;
        }
        let mut data = p.data;
        data.truncate(self.params.initiator_mrdsl as usize);
        let r = NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        self.send(r.encode(), data);
    }

    fn on_text(&mut self, p: Pdu) {
        let t = TextRequest::decode(&p.bhs);
        // A TTT other than 0xffffffff continues what the target's last answer left open: the
        // next part of a request split with the C bit, or the rest of a long answer (RFC 7143
        // §11.10.4). The reserved TTT starts a new request and forgets both.
        let mut gathered = Vec::new();
        if t.ttt == RESERVED_TAG {
            self.text_in = None;
            self.text_cont = None;
        } else {
            match (self.text_in.take(), self.text_cont.take()) {
                (Some((itt, ttt, buf)), _) if itt == t.itt && ttt == t.ttt => gathered = buf,
                (_, Some(cont)) if cont.itt == t.itt && cont.ttt == t.ttt => {
                    self.send_text(t.itt, t.lun, cont.rest);
                    return;
                }
                _ => {
                    self.reject(reject::INVALID_PDU_FIELD, &p.bhs);
                    return;
                }
            }
        }
        gathered.extend_from_slice(&p.data);
        if gathered.len() > 64 * 1024 {
            self.reject(reject::PROTOCOL_ERROR, &p.bhs);
            return;
        }
        if t.continue_bit {
            let ttt = self.alloc_ttt();
            self.text_in = Some((t.itt, ttt, gathered));
            let r = TextResponse {
                final_bit: false,
                continue_bit: false,
                lun: t.lun,
                itt: t.itt,
                ttt,
                stat_sn: self.next_stat_sn(),
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
            };
            self.send(r.encode(), Bytes::new());
            return;
        }
        let Ok(pairs) = text::parse(&gathered) else {
            self.reject(reject::PROTOCOL_ERROR, &p.bhs);
            return;
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                self.send_targets(v, &mut out);
                continue;
            }
            match keys::negotiate(
                k,
                v,
                KeyPhase::FullFeature,
                &self.cfg.login.limits,
                &mut self.params,
            ) {
                Answer::Reply(r) => out.push((k.clone(), r)),
                Answer::Silent => {}
                Answer::NotOperational => out.push((k.clone(), "NotUnderstood".into())),
            }
        }
        self.send_text(t.itt, t.lun, text::encode(&out));
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG || self.next_ttt == 0 {
            self.next_ttt = 1;
        }
        t
    }

    fn send_text(&mut self, itt: u32, lun: [u8; 8], mut body: Bytes) {
        let max = self.params.initiator_mrdsl as usize;
        let more = body.len() > max;
        let part = if more {
            body.split_to(max)
        } else {
            std::mem::take(&mut body)
        };
        let ttt = if more { self.alloc_ttt() } else { RESERVED_TAG };
        let r = TextResponse {
            final_bit: !more,
            continue_bit: more,
            lun,
            itt,
            ttt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        if more {
            self.text_cont = Some(TextCont {
                itt,
                ttt,
                rest: body,
            });
        }
        self.send(r.encode(), part);
    }

    fn send_targets(&self, value: &str, out: &mut Vec<(String, String)>) {
        let dir = &self.cfg.login.directory;
        let discovery = self.session_type() == Some(SessionType::Discovery);
        let initiator = &self.initiator;
        for t in &dir.targets {
            let wanted = match value {
                "All" => discovery || self.target_name.as_deref() == Some(&t.name),
                "" => self.target_name.as_deref() == Some(&t.name),
                name => t.name.eq_ignore_ascii_case(name),
            };
            if !wanted || !t.permits(initiator) {
                continue;
            }
            out.push(("TargetName".into(), t.name.clone()));
            if t.portals.is_empty() {
                out.push((
                    "TargetAddress".into(),
                    format!("{},{}", self.cfg.local_portal, t.portal_group_tag),
                ));
            }
            for portal in &t.portals {
                out.push((
                    "TargetAddress".into(),
                    format!("{portal},{}", t.portal_group_tag),
                ));
            }
        }
    }

    fn on_logout(&mut self, l: LogoutRequest) {
        if l.reason == 2 || (l.reason == 1 && l.cid != self.cid) {
            // Connection recovery needs ERL 2; there is no other connection to close.
            let r = LogoutResponse {
                response: if l.reason == 2 { 2 } else { 1 },
                itt: l.itt,
                stat_sn: self.next_stat_sn(),
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                time2wait: 0,
                time2retain: 0,
            };
            self.send(r.encode(), Bytes::new());
            return;
        }
        self.logout_pending = Some(l);
        self.try_logout();
    }

    /// Answer a pending logout once no task is in flight.
    fn try_logout(&mut self) {
        if self.logout_pending.is_none() || !self.tasks.is_empty() || self.is_closed() {
            return;
        }
        let l = self.logout_pending.take().expect("checked above");
        let r = LogoutResponse {
            response: 0,
            itt: l.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            time2wait: self.params.default_time2wait as u16,
            time2retain: self.params.default_time2retain as u16,
        };
        self.send(r.encode(), Bytes::new());
        self.close(CloseReason::Logout);
    }

    // ---------------------------------------------------------------- timers

    /// When [`Connection::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Login(_) => Some(self.login_deadline),
            Phase::Full(_) => match (self.ping, self.cfg.nop_interval) {
                (Some((_, sent)), _) => Some(sent + self.cfg.nop_timeout),
                (None, Some(iv)) => Some(self.last_rx + iv),
                (None, None) => None,
            },
            Phase::Closed => None,
        }
    }

    /// Run timers: login deadline, NOP-In pings, dead-peer detection.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Login(_) if now >= self.login_deadline => self.close(CloseReason::LoginTimeout),
            Phase::Full(_) => match (self.ping, self.cfg.nop_interval) {
                (Some((_, sent)), _) if now >= sent + self.cfg.nop_timeout => {
                    self.close(CloseReason::NopTimeout);
                }
                (None, Some(iv)) if now >= self.last_rx + iv => {
                    let ttt = self.alloc_ttt();
                    let n = NopIn {
                        lun: [0; 8],
                        itt: RESERVED_TAG,
                        ttt,
                        stat_sn: self.stat_sn,
                        exp_cmd_sn: self.exp_cmd_sn,
                        max_cmd_sn: self.max_cmd_sn(),
                    };
                    self.send(n.encode(), Bytes::new());
                    self.ping = Some((ttt, now));
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// Assert the bounds that keep a hostile initiator from growing the connection's memory
    /// (used by the fuzz targets and tests; cheap, but not meant for the data path).
    ///
    /// # Panics
    /// If an invariant does not hold.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let window = self.cfg.login.cmd_window.max(1) as usize;
        assert!(
            self.held.len() <= window,
            "held commands {} > window",
            self.held.len()
        );
        assert!(self.dead_itts.len() <= DEAD_ITTS);
        let counted = self.tasks.values().filter(|t| t.counted).count();
        assert_eq!(
            counted, self.outstanding as usize,
            "outstanding counts counted tasks"
        );
        assert!(
            counted <= window,
            "{counted} counted tasks > window {window}"
        );
        assert!(
            self.tasks.len() <= 2 * window,
            "{} tasks in flight",
            self.tasks.len()
        );
        let held: usize = self.tasks.values().map(|t| t.held_bytes).sum();
        assert_eq!(
            held, self.held_write_bytes,
            "held_write_bytes is the sum over tasks"
        );
        for t in self.tasks.values() {
            if let TaskState::Collecting(c) = &t.state {
                assert!(c.data.len() as u64 <= u64::from(t.edtl));
                assert!(
                    c.data.len() <= t.held_bytes,
                    "data beyond what was admitted"
                );
                assert!(c.r2ts.len() <= self.params.max_outstanding_r2t.max(1) as usize);
            }
        }
        if let Some((_, _, buf)) = &self.text_in {
            assert!(buf.len() <= 64 * 1024);
        }
        assert!(self.r2t_waiting.len() <= self.tasks.len());
    }
}

/// Count a task's data up to offset `upto` against the task and the connection's write budget
/// (the data itself stays in the receive buffer's pieces; the budget bounds how much of it
/// the connection lets in at once).
fn admit_upto(task_held: &mut usize, conn_held: &mut usize, upto: u32) {
    let upto = upto as usize;
    if upto > *task_held {
        *conn_held += upto - *task_held;
        *task_held = upto;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Now,
    Held,
    Drop,
}
