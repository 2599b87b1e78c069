//! Command forwarding between gateways.
//!
//! Every volume has one owning gateway at a time. A gateway that receives a SCSI command (or a
//! task management function, or the end of a nexus) for a volume another gateway owns does not
//! execute it: it forwards it to the owner, which executes it against its logical unit and
//! answers. Because the owner executes every command of the volume, persistent reservations,
//! COMPARE AND WRITE and command ordering stay correct cluster-wide without any distributed
//! locking. The identity of the nexus the command arrived on travels with each request, so the
//! owner keys reservations and unit attentions by the real initiator port and by the target
//! port of the gateway that received the command, exactly as if the initiator were logged in
//! to the owner.
//!
//! The nexus `id` is the receiving gateway's (unique only within that process): the owner must
//! not mix it with the ids of its own nexuses, e.g. it keys forwarded nexuses by connection and
//! id, or by the port names.
//!
//! This module holds the sans-IO codec ([`encode_request`], [`take_request`], ...), a pipelined
//! [`Client`] usable from any tokio runtime, and [`serve`], the owner's side.
//!
//! # Wire format
//!
//! One TCP connection carries frames both ways; all integers are big-endian. The client sends
//! requests, the server answers each with a response carrying the same request id, in whatever
//! order the commands complete (many requests are in flight at once).
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 4    | length `L` of everything after this field, 10 ≤ `L` ≤ [`MAX_FRAME`] |
//! | 4      | 1    | protocol version, 2                                          |
//! | 5      | 1    | kind (below)                                                 |
//! | 6      | 8    | request id, chosen by the client, echoed by the server      |
//! | 14     | L-10 | body of the kind                                             |
//!
//! A variable field `var` is a 4-byte length `n` followed by `n` bytes. Strings are UTF-8.
//! Every field is mandatory; a body with bytes left over after its last field is malformed.
//!
//! | kind | direction  | body                                                         |
//! |-----:|------------|--------------------------------------------------------------|
//! | 0x01 | request    | Execute: nexus, lun u64, operation id u64, tag u32, attr u8, flags u8, expected length u32, cdb var, data-out var |
//! | 0x02 | request    | Task management: nexus, lun u64, function u8, referenced tag u32 |
//! | 0x03 | request    | Nexus gone: nexus                                            |
//! | 0x81 | response   | Executed: status u8, transfer length u32, sense present u8 (0 or 1), sense var (only if present), data-in var |
//! | 0x82 | response   | Task management done: response code u8                       |
//! | 0x83 | response   | Done (answer to nexus gone): empty                           |
//!
//! The nexus block:
//!
//! | size | field                                                               |
//! |-----:|---------------------------------------------------------------------|
//! | 8    | nexus id (the receiving gateway's)                                  |
//! | var  | initiator name (IQN)                                                |
//! | var  | initiator port name, `<iqn>,i,0x<isid>`                             |
//! | var  | target port name, `<target iqn>,t,0x<tpgt>`                         |
//! | 2    | relative target port identifier                                     |
//! | 2    | target port group                                                   |
//!
//! Codes: task attribute as iSCSI's ATTR field (0 untagged, 1 simple, 2 ordered, 3 head of
//! queue, 4 ACA); flags bit 0 = read, bit 1 = write, other bits zero; task management
//! functions as iSCSI's (1 ABORT TASK, 2 ABORT TASK SET, 3 CLEAR ACA, 4 CLEAR TASK SET,
//! 5 LOGICAL UNIT RESET, 6 TARGET WARM RESET, 7 TARGET COLD RESET; the referenced tag is
//! meaningful for ABORT TASK only and zero otherwise); task management responses as iSCSI's
//! (0 to 6, and 255 rejected).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tessera_proto::scsi::Sense;
use tessera_scsi::{status, Nexus, ScsiCommand, ScsiResult, TaskAttr, TmfFunction, TmfResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinSet, LocalSet};
use tokio::time::Instant;
use tracing::{debug, warn};

/// What a gateway asks the owner of a volume to do.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    /// Execute a SCSI command that arrived on `nexus` for `lun`.
    Execute {
        /// The nexus the command arrived on.
        nexus: Nexus,
        /// The logical unit, as the receiving gateway addresses it.
        lun: u64,
        /// The receiving gateway's id of this command, the same when it sends it again
        /// (0: none). The owner runs a command with side effects once per id and answers a
        /// repeat with the first execution's result ([`once`]).
        op: u64,
        /// The command with all of its Data-Out.
        cmd: ScsiCommand,
    },
    /// Perform a task management function that arrived on `nexus` for `lun`.
    TaskMgmt {
        /// The nexus the function arrived on.
        nexus: Nexus,
        /// The logical unit.
        lun: u64,
        /// The function.
        function: TmfFunction,
    },
    /// The nexus ended (session closed or reinstated): drop its state.
    NexusGone {
        /// The nexus that ended.
        nexus: Nexus,
    },
}

/// The owner's answer to a [`Request`].
#[derive(Debug, Clone)]
pub(crate) enum Response {
    /// The outcome of [`Request::Execute`].
    Executed(ScsiResult),
    /// The outcome of [`Request::TaskMgmt`].
    TaskMgmt(TmfResponse),
    /// The answer to [`Request::NexusGone`].
    Done,
}

/// Protocol version carried in every frame.
pub(crate) const VERSION: u8 = 2;

/// The largest frame length (the 4-byte length field's value): a 16 MiB transfer plus headers.
pub(crate) const MAX_FRAME: usize = 17 << 20;

/// Version, kind and request id.
const HEADER: usize = 10;

/// Frame kinds.
mod kind {
    pub(super) const EXECUTE: u8 = 0x01;
    pub(super) const TASK_MGMT: u8 = 0x02;
    pub(super) const NEXUS_GONE: u8 = 0x03;
    pub(super) const EXECUTED: u8 = 0x81;
    pub(super) const TASK_MGMT_DONE: u8 = 0x82;
    pub(super) const DONE: u8 = 0x83;
}

const FLAG_READ: u8 = 1;
const FLAG_WRITE: u8 = 2;

/// Why a frame could not be decoded. After any of these the byte stream cannot be trusted:
/// the connection must be closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The length field announces more than [`MAX_FRAME`] bytes.
    #[error("forwarding frame of {0} bytes is over the limit of {max} bytes", max = MAX_FRAME)]
    TooLarge(usize),
    /// A protocol version this gateway does not speak.
    #[error("forwarding protocol version {0} is not supported (this gateway speaks {v})", v = VERSION)]
    BadVersion(u8),
    /// An unknown frame kind, or a response where a request belongs or vice versa.
    #[error("unexpected forwarding frame kind {0:#04x}")]
    BadKind(u8),
    /// The frame ends inside the named field.
    #[error("forwarding frame ends inside the {0}")]
    Truncated(&'static str),
    /// A field holds a value outside its range.
    #[error("malformed forwarding frame: {0}")]
    BadValue(&'static str),
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Append a request frame to `out`. A request whose frame exceeds [`MAX_FRAME`] is encoded all
/// the same and refused by the peer; senders check the size (see `Client`).
pub(crate) fn encode_request(id: u64, r: &Request, out: &mut BytesMut) {
    match r {
        Request::Execute {
            nexus,
            lun,
            op,
            cmd,
        } => {
            out.reserve(72 + nexus_len(nexus) + cmd.cdb.len() + cmd.data_out.len());
            let start = begin(out, kind::EXECUTE, id);
            put_nexus(out, nexus);
            out.put_u64(*lun);
            out.put_u64(*op);
            out.put_u32(cmd.tag);
            out.put_u8(attr_code(cmd.attr));
            let mut flags = 0;
            if cmd.read {
                flags |= FLAG_READ;
            }
            if cmd.write {
                flags |= FLAG_WRITE;
            }
            out.put_u8(flags);
            out.put_u32(cmd.expected_len);
            put_var(out, &cmd.cdb);
            out.put_u32(u32::try_from(cmd.data_out.len()).unwrap_or(u32::MAX));
            cmd.data_out.put_into(out);
            finish(out, start);
        }
        Request::TaskMgmt {
            nexus,
            lun,
            function,
        } => {
            out.reserve(32 + nexus_len(nexus));
            let start = begin(out, kind::TASK_MGMT, id);
            put_nexus(out, nexus);
            out.put_u64(*lun);
            let (code, tag) = tmf_code(*function);
            out.put_u8(code);
            out.put_u32(tag);
            finish(out, start);
        }
        Request::NexusGone { nexus } => {
            out.reserve(16 + nexus_len(nexus));
            let start = begin(out, kind::NEXUS_GONE, id);
            put_nexus(out, nexus);
            finish(out, start);
        }
    }
}

/// Append a response frame to `out`. As with [`encode_request`], a frame over [`MAX_FRAME`]
/// is the sender's to avoid.
pub(crate) fn encode_response(id: u64, r: &Response, out: &mut BytesMut) {
    match r {
        Response::Executed(res) => {
            let sense_len = res.sense.as_ref().map_or(0, Bytes::len);
            out.reserve(32 + sense_len + res.data_in.len());
            let start = begin(out, kind::EXECUTED, id);
            out.put_u8(res.status);
            out.put_u32(res.transfer_len);
            match &res.sense {
                Some(sense) => {
                    out.put_u8(1);
                    put_var(out, sense);
                }
                None => out.put_u8(0),
            }
            put_var(out, &res.data_in);
            finish(out, start);
        }
        Response::TaskMgmt(resp) => {
            let start = begin(out, kind::TASK_MGMT_DONE, id);
            out.put_u8(resp.code());
            finish(out, start);
        }
        Response::Done => {
            let start = begin(out, kind::DONE, id);
            finish(out, start);
        }
    }
}

/// Write the frame header with a placeholder length; returns where the frame starts.
fn begin(out: &mut BytesMut, kind: u8, id: u64) -> usize {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u64(id);
    start
}

/// Fill in the length of the frame that starts at `start`.
fn finish(out: &mut BytesMut, start: usize) {
    // A frame too long for the field is far over MAX_FRAME: saturate so the peer refuses it.
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Whether the frame appended to `out` from `start` on is within [`MAX_FRAME`].
fn frame_fits(out: &BytesMut, start: usize) -> bool {
    out.len() - start <= 4 + MAX_FRAME
}

fn put_var(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    out.put_slice(b);
}

fn nexus_len(n: &Nexus) -> usize {
    8 + 12 + n.initiator_name.len() + n.initiator_port.len() + n.target_port.len() + 4
}

fn put_nexus(out: &mut BytesMut, n: &Nexus) {
    out.put_u64(n.id);
    put_var(out, n.initiator_name.as_bytes());
    put_var(out, n.initiator_port.as_bytes());
    put_var(out, n.target_port.as_bytes());
    out.put_u16(n.relative_port);
    out.put_u16(n.port_group);
}

fn attr_code(a: TaskAttr) -> u8 {
    match a {
        TaskAttr::Untagged => 0,
        TaskAttr::Simple => 1,
        TaskAttr::Ordered => 2,
        TaskAttr::HeadOfQueue => 3,
        TaskAttr::Aca => 4,
    }
}

fn attr_from(code: u8) -> Result<TaskAttr, FrameError> {
    Ok(match code {
        0 => TaskAttr::Untagged,
        1 => TaskAttr::Simple,
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => return Err(FrameError::BadValue("unknown task attribute")),
    })
}

fn tmf_code(f: TmfFunction) -> (u8, u32) {
    match f {
        TmfFunction::AbortTask { tag } => (1, tag),
        TmfFunction::AbortTaskSet => (2, 0),
        TmfFunction::ClearAca => (3, 0),
        TmfFunction::ClearTaskSet => (4, 0),
        TmfFunction::LogicalUnitReset => (5, 0),
        TmfFunction::TargetWarmReset => (6, 0),
        TmfFunction::TargetColdReset => (7, 0),
    }
}

fn tmf_from(code: u8, tag: u32) -> Result<TmfFunction, FrameError> {
    Ok(match code {
        1 => TmfFunction::AbortTask { tag },
        2 => TmfFunction::AbortTaskSet,
        3 => TmfFunction::ClearAca,
        4 => TmfFunction::ClearTaskSet,
        5 => TmfFunction::LogicalUnitReset,
        6 => TmfFunction::TargetWarmReset,
        7 => TmfFunction::TargetColdReset,
        _ => return Err(FrameError::BadValue("unknown task management function")),
    })
}

fn tmf_response_of(code: u8) -> Result<TmfResponse, FrameError> {
    TmfResponse::from_code(code).ok_or(FrameError::BadValue("unknown task management response"))
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Split one whole request frame off the front of `buf` if it is complete. `Ok(None)` means
/// more bytes are needed and leaves `buf` untouched. The length is checked against
/// [`MAX_FRAME`] before anything is allocated. Variable fields are slices of `buf`'s memory,
/// not copies. After an error, `buf` is in an unspecified state: close the connection.
pub(crate) fn take_request(buf: &mut BytesMut) -> Result<Option<(u64, Request)>, FrameError> {
    let Some((kind, id, mut r)) = take_frame(buf)? else {
        return Ok(None);
    };
    let req = match kind {
        kind::EXECUTE => {
            let nexus = r.nexus()?;
            let lun = r.u64("lun")?;
            let op = r.u64("operation id")?;
            let tag = r.u32("task tag")?;
            let attr = attr_from(r.u8("task attribute")?)?;
            let flags = r.u8("flags")?;
            if flags & !(FLAG_READ | FLAG_WRITE) != 0 {
                return Err(FrameError::BadValue("unknown command flags"));
            }
            let expected_len = r.u32("expected length")?;
            let cdb = r.var("cdb")?;
            let data_out = r.var("data-out")?;
            Request::Execute {
                nexus,
                lun,
                op,
                cmd: ScsiCommand {
                    cdb,
                    data_out: data_out.into(),
                    expected_len,
                    read: flags & FLAG_READ != 0,
                    write: flags & FLAG_WRITE != 0,
                    attr,
                    tag,
                },
            }
        }
        kind::TASK_MGMT => {
            let nexus = r.nexus()?;
            let lun = r.u64("lun")?;
            let code = r.u8("task management function")?;
            let tag = r.u32("referenced task tag")?;
            Request::TaskMgmt {
                nexus,
                lun,
                function: tmf_from(code, tag)?,
            }
        }
        kind::NEXUS_GONE => Request::NexusGone { nexus: r.nexus()? },
        other => return Err(FrameError::BadKind(other)),
    };
    r.end()?;
    Ok(Some((id, req)))
}

/// Split one whole response frame off the front of `buf`; see [`take_request`].
pub(crate) fn take_response(buf: &mut BytesMut) -> Result<Option<(u64, Response)>, FrameError> {
    let Some((kind, id, mut r)) = take_frame(buf)? else {
        return Ok(None);
    };
    let resp = match kind {
        kind::EXECUTED => {
            let status = r.u8("status")?;
            let transfer_len = r.u32("transfer length")?;
            let sense = match r.u8("sense flag")? {
                0 => None,
                1 => Some(r.var("sense")?),
                _ => return Err(FrameError::BadValue("sense flag is neither 0 nor 1")),
            };
            let data_in = r.var("data-in")?;
            Response::Executed(ScsiResult {
                status,
                sense,
                data_in,
                transfer_len,
            })
        }
        kind::TASK_MGMT_DONE => {
            Response::TaskMgmt(tmf_response_of(r.u8("task management response")?)?)
        }
        kind::DONE => Response::Done,
        other => return Err(FrameError::BadKind(other)),
    };
    r.end()?;
    Ok(Some((id, resp)))
}

/// How many more bytes the frame at the front of `buf` needs (0 if unknown or complete),
/// capped at the largest frame. Only meaningful after `take_*` returned `Ok(None)`.
fn bytes_wanted(buf: &BytesMut) -> usize {
    if buf.len() < 4 {
        return 0;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    (4 + len.min(MAX_FRAME)).saturating_sub(buf.len())
}

/// The frame layer: length, version, kind, id. Returns the body to parse.
fn take_frame(buf: &mut BytesMut) -> Result<Option<(u8, u64, Body)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len < HEADER {
        return Err(FrameError::Truncated("frame header"));
    }
    if buf.len() - 4 < len {
        return Ok(None);
    }
    buf.advance(4);
    let mut frame = buf.split_to(len);
    let version = frame.get_u8();
    if version != VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let kind = frame.get_u8();
    let id = frame.get_u64();
    Ok(Some((kind, id, Body(frame))))
}

/// A cursor over a frame's body that reports which field ran out.
struct Body(BytesMut);

impl Body {
    fn need(&self, n: usize, field: &'static str) -> Result<(), FrameError> {
        if self.0.len() < n {
            Err(FrameError::Truncated(field))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(1, field)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(2, field)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(4, field)?;
        Ok(self.0.get_u32())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(8, field)?;
        Ok(self.0.get_u64())
    }

    /// A length-prefixed field, as a slice of the frame.
    fn var(&mut self, field: &'static str) -> Result<Bytes, FrameError> {
        let n = self.u32(field)? as usize;
        self.need(n, field)?;
        Ok(self.0.split_to(n).freeze())
    }

    fn string(&mut self, field: &'static str) -> Result<Arc<str>, FrameError> {
        let b = self.var(field)?;
        match std::str::from_utf8(&b) {
            Ok(s) => Ok(Arc::from(s)),
            Err(_) => Err(FrameError::BadValue("a name is not UTF-8")),
        }
    }

    fn nexus(&mut self) -> Result<Nexus, FrameError> {
        Ok(Nexus {
            id: self.u64("nexus id")?,
            initiator_name: self.string("initiator name")?,
            initiator_port: self.string("initiator port name")?,
            target_port: self.string("target port name")?,
            relative_port: self.u16("relative port")?,
            port_group: self.u16("port group")?,
        })
    }

    fn end(self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::BadValue("bytes left over after the last field"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared by client and server

/// Read at least this much at a time.
const READ_CHUNK: usize = 64 << 10;

/// Stop taking more work while this much is waiting to be written.
const WRITE_HIGH_WATER: usize = 1 << 20;

/// Make room in `buf` for the next read: the rest of the frame being received (its length
/// was already checked by `take_*`), at least [`READ_CHUNK`].
fn reserve_for_read(buf: &mut BytesMut) {
    buf.reserve(bytes_wanted(buf).max(READ_CHUNK));
}

/// The answer given when the owner cannot produce a proper one (the handler panicked, or its
/// Data-In does not fit in a frame).
fn failure_answer(req: &Request) -> Response {
    match req {
        Request::Execute { .. } => Response::Executed(internal_failure()),
        Request::TaskMgmt { .. } => Response::TaskMgmt(TmfResponse::Rejected),
        Request::NexusGone { .. } => Response::Done,
    }
}

fn internal_failure() -> ScsiResult {
    ScsiResult {
        status: status::CHECK_CONDITION,
        sense: Some(Bytes::from(Sense::INTERNAL_TARGET_FAILURE.encode(false))),
        data_in: Bytes::new(),
        transfer_len: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// How many calls may wait for the connection thread before `call` itself waits.
const CLIENT_QUEUE: usize = 1024;

/// One call on its way to the connection thread.
struct Call {
    req: Request,
    reply: oneshot::Sender<io::Result<Response>>,
    /// Set once the request is queued on a connection (from then on the owner may run it).
    sent: Arc<AtomicBool>,
}

impl Call {
    fn fail(self, e: &io::Error) {
        let _ = self.reply.send(Err(copy_error(e)));
    }
}

fn copy_error(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

/// A connection to another gateway's forwarding server, shared by every clone.
///
/// A thread of its own (a current-thread tokio runtime) holds the TCP connection, so `call`
/// works from any runtime and any thread. The connection is opened on the first call, and
/// again on the call after it broke. The thread ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Client {
    addr: SocketAddr,
    timeout: Duration,
    calls: mpsc::Sender<Call>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the gateway listening at `addr`; connects lazily, reconnects after errors.
    /// `timeout` bounds connecting and every call.
    pub(crate) fn new(addr: SocketAddr, timeout: Duration) -> Self {
        let (calls, rx) = mpsc::channel(CLIENT_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("fwd-client".into())
            .spawn(move || client_thread(addr, timeout, rx));
        if let Err(e) = spawned {
            // The receiver went with the closure: every call fails instead of hanging.
            warn!("cannot start the forwarding client thread for {addr}: {e}");
        }
        Self {
            addr,
            timeout,
            calls,
        }
    }

    /// The address of the gateway this client talks to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Send one request and wait for its answer. Many calls may be in flight on the one
    /// connection. Errors come back promptly: `TimedOut` when there is no answer within the
    /// timeout, the connect error when the gateway cannot be reached, `ConnectionAborted` (or
    /// the socket's error) when the connection broke with the call in flight. A call that
    /// fails may or may not have been executed by the owner. The calling runtime needs its time
    /// driver enabled (`enable_all`), for the timeout.
    pub(crate) async fn call(&self, req: Request) -> io::Result<Response> {
        self.call_tracked(req).await.0
    }

    /// [`Client::call`], and whether the request went out on a connection (`false`: the
    /// owner provably never saw it; `true` with an error: it may or may not have run).
    pub(crate) async fn call_tracked(&self, req: Request) -> (io::Result<Response>, bool) {
        let sent = Arc::new(AtomicBool::new(false));
        let r = self.exchange(req, sent.clone()).await;
        (r, sent.load(Ordering::Acquire))
    }

    async fn exchange(&self, req: Request, sent: Arc<AtomicBool>) -> io::Result<Response> {
        let (reply, answer) = oneshot::channel();
        let addr = self.addr;
        let exchange = async {
            if self.calls.send(Call { req, reply, sent }).await.is_err() {
                return Err(io::Error::other(format!(
                    "forwarding client for {addr} is not running"
                )));
            }
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("forwarding to {addr}: call dropped"),
                )),
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("forwarding to {addr}: no answer within {:?}", self.timeout),
            )),
        }
    }
}

fn client_thread(addr: SocketAddr, timeout: Duration, mut calls: mpsc::Receiver<Call>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!("forwarding client for {addr}: cannot build a runtime: {e}");
            return;
        }
    };
    rt.block_on(client_loop(addr, timeout, &mut calls));
}

/// Wait for a call, connect, run the connection until it breaks; again, until every
/// `Client` clone is gone.
async fn client_loop(addr: SocketAddr, timeout: Duration, calls: &mut mpsc::Receiver<Call>) {
    let mut next_id: u64 = 1;
    while let Some(first) = calls.recv().await {
        if first.reply.is_closed() {
            continue; // its caller gave up already
        }
        let stream = match connect(addr, timeout).await {
            Ok(stream) => stream,
            Err(e) => {
                debug!("{e}");
                first.fail(&e);
                if e.kind() == io::ErrorKind::TimedOut {
                    // The calls that queued up meanwhile would wait a timeout each.
                    while let Ok(call) = calls.try_recv() {
                        call.fail(&e);
                    }
                }
                continue;
            }
        };
        if let Flow::ClientsGone =
            run_connection(stream, first, calls, addr, timeout, &mut next_id).await
        {
            return;
        }
    }
}

/// Connect within `timeout`. A refused connection is tried once more straight away: when the
/// peer restarted on the same port, the kernel may reuse the local port of the previous
/// connection, whose TIME_WAIT the peer still holds and answers with a reset.
async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let attempts = async {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                TcpStream::connect(addr).await
            }
            other => other,
        }
    };
    let stream = match tokio::time::timeout(timeout, attempts).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err(io::Error::new(
                e.kind(),
                format!("forwarding to {addr}: cannot connect: {e}"),
            ))
        }
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("forwarding to {addr}: no connection within {timeout:?}"),
            ))
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

enum Flow {
    /// The connection broke; every call on it was failed.
    Broken,
    /// Every `Client` is gone: stop.
    ClientsGone,
}

/// Carry calls over one connection until it breaks or the clients are gone.
async fn run_connection(
    stream: TcpStream,
    first: Call,
    calls: &mut mpsc::Receiver<Call>,
    addr: SocketAddr,
    timeout: Duration,
    next_id: &mut u64,
) -> Flow {
    let (mut rd, mut wr) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = BytesMut::new();
    // Each call's reply and when it was queued for writing.
    type Pending = HashMap<u64, (oneshot::Sender<io::Result<Response>>, Instant)>;
    let mut pending: Pending = HashMap::new();
    // When the last answer arrived (or the connection opened). A call that went a whole
    // timeout without anything at all arriving after it was sent means the peer is stuck or
    // gone: the connection is dropped (failing the calls on it) so the next call reconnects.
    let mut last_rx = Instant::now();
    let mut sweep = tokio::time::interval(
        (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
    );
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut enqueue = |call: Call, wbuf: &mut BytesMut, pending: &mut Pending| {
        if call.reply.is_closed() {
            return;
        }
        let id = *next_id;
        *next_id = next_id.wrapping_add(1);
        let start = wbuf.len();
        encode_request(id, &call.req, wbuf);
        if !frame_fits(wbuf, start) {
            wbuf.truncate(start);
            let _ = call.reply.send(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("forwarding to {addr}: request over the {MAX_FRAME}-byte frame limit"),
            )));
            return;
        }
        call.sent.store(true, Ordering::Release);
        pending.insert(id, (call.reply, Instant::now()));
    };
    enqueue(first, &mut wbuf, &mut pending);

    let broke: io::Error = loop {
        reserve_for_read(&mut rbuf);
        tokio::select! {
            call = calls.recv(), if wbuf.len() < WRITE_HIGH_WATER => match call {
                Some(call) => enqueue(call, &mut wbuf, &mut pending),
                None => return Flow::ClientsGone,
            },
            written = wr.write_buf(&mut wbuf), if !wbuf.is_empty() => match written {
                Ok(0) => break io::ErrorKind::WriteZero.into(),
                Ok(_) => {}
                Err(e) => break e,
            },
            read = rd.read_buf(&mut rbuf) => match read {
                Ok(0) => {
                    break io::Error::new(io::ErrorKind::ConnectionAborted, "closed by the peer")
                }
                Ok(_) => {
                    let mut bad = None;
                    loop {
                        match take_response(&mut rbuf) {
                            Ok(Some((id, resp))) => {
                                last_rx = Instant::now();
                                match pending.remove(&id) {
                                    Some((reply, _)) => {
                                        let _ = reply.send(Ok(resp));
                                    }
                                    None => debug!("forwarding to {addr}: late answer {id}"),
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                bad = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = bad {
                        warn!("forwarding to {addr}: {e}; dropping the connection");
                        break io::Error::new(io::ErrorKind::InvalidData, e.to_string());
                    }
                }
                Err(e) => break e,
            },
            _ = sweep.tick() => {
                // Forget the calls whose callers gave up, once a timeout old (a caller that
                // dropped its call early says nothing about the peer); look for silence.
                let now = Instant::now();
                let mut silent = false;
                pending.retain(|_, (reply, sent)| {
                    if now.duration_since(*sent) < timeout {
                        return true;
                    }
                    silent |= last_rx < *sent;
                    !reply.is_closed()
                });
                if silent {
                    break io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing received for {timeout:?} with calls outstanding"),
                    );
                }
            },
        }
    };

    let e = io::Error::new(
        broke.kind(),
        format!("forwarding to {addr}: connection lost: {broke}"),
    );
    if !pending.is_empty() {
        debug!("{e}; failing {} calls", pending.len());
    }
    for (_, (reply, _)) in pending.drain() {
        let _ = reply.send(Err(copy_error(&e)));
    }
    Flow::Broken
}

// ---------------------------------------------------------------------------------------------
// Exactly once

/// Whether a command changes nothing a repeat could disturb (it may simply run again): the
/// reads and inquiries. Every other command is run once per operation id.
fn repeatable(cdb: &[u8]) -> bool {
    matches!(
        cdb.first(),
        Some(
            0x00 // TEST UNIT READY
            | 0x03 // REQUEST SENSE
            | 0x08 | 0x28 | 0xa8 | 0x88 // READ
            | 0x12 // INQUIRY
            | 0x1a | 0x5a // MODE SENSE
            | 0x25 // READ CAPACITY (10)
            | 0x2f | 0xaf | 0x8f // VERIFY
            | 0x4d // LOG SENSE
            | 0x5e // PERSISTENT RESERVE IN
            | 0x9e // SERVICE ACTION IN (READ CAPACITY (16), GET LBA STATUS)
            | 0xa0 // REPORT LUNS
            | 0xa3 // MAINTENANCE IN (REPORT TARGET PORT GROUPS, ...)
        )
    )
}

/// Whether running a command twice can answer differently from running it once even with
/// nothing in between (a second COMPARE AND WRITE miscompares against its own write, a second
/// registration conflicts with the first, ...): such a command whose fate is unknown must not
/// be left to the initiator to retry.
pub(crate) fn unrepeatable(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x89 | 0x5f | 0x16 | 0x56 | 0x17 | 0x57))
}

/// How long an owner remembers the outcome of an operation it ran.
const REMEMBER_FOR: Duration = Duration::from_secs(120);
/// The most operations an owner remembers (the oldest go first).
const REMEMBER_MAX: usize = 1 << 16;

enum Op {
    /// Running now; waiters are told when it ends.
    Running(Arc<tokio::sync::Notify>),
    /// Its result, and when it ended.
    Done(ScsiResult, std::time::Instant),
}

#[derive(Default)]
struct Memory {
    ops: HashMap<(u16, u64), Op>,
    /// Ended operations in the order they ended, for expiry.
    ended: std::collections::VecDeque<((u16, u64), std::time::Instant)>,
}

impl Memory {
    fn expire(&mut self, now: std::time::Instant) {
        while let Some(&(key, at)) = self.ended.front() {
            if now.duration_since(at) < REMEMBER_FOR && self.ended.len() <= REMEMBER_MAX {
                break;
            }
            self.ended.pop_front();
            if matches!(self.ops.get(&key), Some(Op::Done(_, t)) if *t == at) {
                self.ops.remove(&key);
            }
        }
    }
}

/// The owner's side of exactly-once forwarding: wraps `handler` so that an Execute with an
/// operation id whose command has side effects runs once; a repeat of the id (the receiving
/// gateway sending it again after losing the answer) waits for the first execution if it is
/// still running and gets its result, for [`REMEMBER_FOR`] after it ended. Operation ids are
/// the receiving gateway's, so they are kept per port group (the receiving gateway's number).
pub(crate) fn once(handler: Handler) -> Handler {
    let memory: Arc<Mutex<Memory>> = Arc::default();
    Arc::new(move |req: Request| {
        let handler = handler.clone();
        let memory = memory.clone();
        Box::pin(async move {
            let key = match &req {
                Request::Execute { nexus, op, cmd, .. } if *op != 0 && !repeatable(&cmd.cdb) => {
                    (nexus.port_group, *op)
                }
                _ => return handler(req).await,
            };
            loop {
                let wait = {
                    let mut m = memory.lock().unwrap_or_else(|e| e.into_inner());
                    m.expire(std::time::Instant::now());
                    match m.ops.get(&key) {
                        Some(Op::Done(r, _)) => {
                            debug!(
                                op = key.1,
                                "forwarded operation repeated: answered with its first result"
                            );
                            return Response::Executed(r.clone());
                        }
                        Some(Op::Running(n)) => n.clone(),
                        None => {
                            m.ops
                                .insert(key, Op::Running(Arc::new(tokio::sync::Notify::new())));
                            break;
                        }
                    }
                };
                let ended = wait.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                let still = matches!(
                    memory
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .ops
                        .get(&key),
                    Some(Op::Running(_))
                );
                if still {
                    ended.await;
                }
            }
            // Ends the entry even if the handler panics (the task is then answered with a
            // failure, and a repeat runs the command again: it did not complete here).
            struct Settle {
                memory: Arc<Mutex<Memory>>,
                key: (u16, u64),
                result: Option<ScsiResult>,
            }
            impl Drop for Settle {
                fn drop(&mut self) {
                    let mut m = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                    let prev = match self.result.take() {
                        Some(r) => {
                            let now = std::time::Instant::now();
                            m.ended.push_back((self.key, now));
                            m.ops.insert(self.key, Op::Done(r, now))
                        }
                        None => m.ops.remove(&self.key),
                    };
                    if let Some(Op::Running(n)) = prev {
                        n.notify_waiters();
                    }
                }
            }
            let mut settle = Settle {
                memory: memory.clone(),
                key,
                result: None,
            };
            let resp = handler(req).await;
            if let Response::Executed(r) = &resp {
                // What an Execute with side effects answers is small (no Data-In to speak of).
                settle.result = Some(r.clone());
            }
            drop(settle);
            resp
        })
    })
}

/// Operation ids of this process: a random start, so a restarted gateway never repeats one
/// an owner still remembers.
static NEXT_OP: std::sync::LazyLock<AtomicU64> =
    std::sync::LazyLock::new(|| AtomicU64::new(rand::random::<u64>() | 1));

/// A new operation id (never 0).
pub(crate) fn next_op() -> u64 {
    loop {
        let op = NEXT_OP.fetch_add(1, Ordering::Relaxed);
        if op != 0 {
            return op;
        }
    }
}

/// How a forwarded command ended, when the owner did not answer it.
#[derive(Debug)]
pub(crate) enum Unanswered {
    /// It never reached the owner: it did not run.
    NotRun(io::Error),
    /// It cannot be forwarded at all (over the frame limit).
    TooLarge,
    /// It reached the owner (or may have), and no answer came back, also to repeats.
    Unknown(io::Error),
}

/// How long a forwarded command whose answer was lost is sent again (with the same operation
/// id) before its fate is declared unknown.
const REPEAT_FOR: Duration = Duration::from_secs(10);

/// Forward a command to its owner exactly once: it carries a fresh operation id, and when the
/// answer is lost after the request went out (a connection cut, a timeout) it is sent again
/// with the same id, so the owner answers with the first execution's result instead of
/// running it twice.
pub(crate) async fn execute_once(
    c: &Client,
    nexus: &Nexus,
    lun: u64,
    cmd: &ScsiCommand,
) -> Result<ScsiResult, Unanswered> {
    execute_once_within(c, nexus, lun, cmd, REPEAT_FOR).await
}

/// [`execute_once`], sending again for at most `repeat_for`.
async fn execute_once_within(
    c: &Client,
    nexus: &Nexus,
    lun: u64,
    cmd: &ScsiCommand,
    repeat_for: Duration,
) -> Result<ScsiResult, Unanswered> {
    let op = next_op();
    let started = Instant::now();
    let mut went_out = false;
    let mut delay = Duration::from_millis(50);
    loop {
        let req = Request::Execute {
            nexus: nexus.clone(),
            lun,
            op,
            cmd: cmd.clone(),
        };
        let (r, sent) = c.call_tracked(req).await;
        went_out |= sent;
        let e = match r {
            Ok(Response::Executed(r)) => return Ok(r),
            Ok(other) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("forwarding to {}: unexpected answer {other:?}", c.addr()),
            ),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Err(Unanswered::TooLarge),
            Err(e) => e,
        };
        if !went_out {
            return Err(Unanswered::NotRun(e));
        }
        if started.elapsed() + delay >= repeat_for {
            return Err(Unanswered::Unknown(e));
        }
        debug!(owner = %c.addr(), op, "forwarded command unanswered ({e}); sending it again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Executes one forwarded request on the owner. Its futures need not be `Send`: they run on
/// the server's own thread.
pub(crate) type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response>>> + Send + Sync>;

/// Requests one connection may have executing at once; past this the server stops reading
/// from that connection until some finish.
const MAX_IN_FLIGHT: usize = 256;

/// How long shutdown waits for connections to finish the requests they started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve forwarded requests on `listener` (already bound) on a thread of its own (a
/// current-thread runtime with a `LocalSet`, because handler futures are `!Send`).
///
/// Each connection's requests run concurrently, as tasks of their own; answers are written as
/// they complete. A connection with [`MAX_IN_FLIGHT`] requests executing is not read until one
/// finishes. A malformed frame closes its connection with a warning. When `shutdown` becomes
/// true (or its sender is dropped) the server stops accepting and reading, lets the requests
/// already executing finish and answers them (for at most a few seconds), then the thread ends.
pub(crate) fn serve(
    listener: std::net::TcpListener,
    handler: Handler,
    shutdown: watch::Receiver<bool>,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _guard = rt.enter();
        TcpListener::from_std(listener)?
    };
    std::thread::Builder::new()
        .name("fwd-server".into())
        .spawn(move || {
            let local = LocalSet::new();
            local.block_on(&rt, accept_loop(listener, handler, shutdown));
        })
}

async fn accept_loop(listener: TcpListener, handler: Handler, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn_local(serve_connection(
                        stream,
                        peer,
                        handler.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // E.g. out of file descriptors: do not spin.
                    warn!("forwarding server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(ended) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = ended {
                    warn!("forwarding server: a connection task failed: {e}");
                }
            }
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            "forwarding server: {} connections still busy after {SHUTDOWN_GRACE:?}; dropping them",
            conns.len()
        );
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Handler,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!("forwarding server: {peer}: cannot set TCP_NODELAY: {e}");
    }
    let (mut rd, mut wr) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = BytesMut::new();
    let mut tasks: JoinSet<(u64, Response)> = JoinSet::new();
    // For each task: its request id and the answer to give should it panic.
    let mut started: HashMap<tokio::task::Id, (u64, Response)> = HashMap::new();
    let mut closing = false;

    loop {
        // Start the complete requests already buffered, up to the bound.
        while !closing && tasks.len() < MAX_IN_FLIGHT {
            match take_request(&mut rbuf) {
                Ok(Some((id, req))) => {
                    let fallback = failure_answer(&req);
                    let handler = handler.clone();
                    let task = tasks.spawn_local(async move { (id, handler(req).await) });
                    started.insert(task.id(), (id, fallback));
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("forwarding server: {peer}: {e}; closing the connection");
                    // Requests already executing run to completion; their answers are lost.
                    tasks.detach_all();
                    return;
                }
            }
        }
        if closing && tasks.is_empty() && wbuf.is_empty() {
            break;
        }
        let can_read = !closing && tasks.len() < MAX_IN_FLIGHT && wbuf.len() < WRITE_HIGH_WATER;
        if can_read {
            reserve_for_read(&mut rbuf);
        }
        tokio::select! {
            read = rd.read_buf(&mut rbuf), if can_read => match read {
                Ok(0) => {
                    if !rbuf.is_empty() {
                        debug!("forwarding server: {peer}: closed inside a frame");
                    }
                    closing = true;
                }
                Ok(_) => {}
                Err(e) => {
                    debug!("forwarding server: {peer}: {e}");
                    break;
                }
            },
            written = wr.write_buf(&mut wbuf), if !wbuf.is_empty() => match written {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    debug!("forwarding server: {peer}: {e}");
                    break;
                }
            },
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let (id, resp) = match done {
                    Ok((task, answer)) => {
                        started.remove(&task);
                        answer
                    }
                    Err(e) => {
                        let Some((id, fallback)) = started.remove(&e.id()) else {
                            continue;
                        };
                        warn!("forwarding server: {peer}: request {id} failed: {e}");
                        (id, fallback)
                    }
                };
                let start = wbuf.len();
                encode_response(id, &resp, &mut wbuf);
                if !frame_fits(&wbuf, start) {
                    wbuf.truncate(start);
                    warn!("forwarding server: {peer}: answer to {id} is over the frame limit");
                    encode_response(id, &Response::Executed(internal_failure()), &mut wbuf);
                }
            }
            _ = shutdown.wait_for(|stop| *stop), if !closing => closing = true,
        }
    }
    tasks.detach_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;

    use tessera_proto::scsi::sense::SenseKey;

    type BoxFuture = Pin<Box<dyn Future<Output = Response>>>;

    fn nexus(id: u64) -> Nexus {
        Nexus {
            id,
            initiator_name: Arc::from("iqn.1994-05.com.example:host"),
            initiator_port: Arc::from(format!("iqn.1994-05.com.example:host,i,0x23d0{id:08x}")),
            target_port: Arc::from("iqn.2024-01.org.tessera:vol,t,0x0002"),
            relative_port: 2,
            port_group: 0x8001,
        }
    }

    fn pattern(n: usize, seed: u8) -> Bytes {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    const ATTRS: [TaskAttr; 5] = [
        TaskAttr::Untagged,
        TaskAttr::Simple,
        TaskAttr::Ordered,
        TaskAttr::HeadOfQueue,
        TaskAttr::Aca,
    ];

    const TMFS: [TmfFunction; 8] = [
        TmfFunction::AbortTask { tag: 0 },
        TmfFunction::AbortTask { tag: 0xdead_beef },
        TmfFunction::AbortTaskSet,
        TmfFunction::ClearAca,
        TmfFunction::ClearTaskSet,
        TmfFunction::LogicalUnitReset,
        TmfFunction::TargetWarmReset,
        TmfFunction::TargetColdReset,
    ];

    const TMF_RESPONSES: [TmfResponse; 8] = [
        TmfResponse::Complete,
        TmfResponse::NoSuchTask,
        TmfResponse::NoSuchLun,
        TmfResponse::StillAllegiant,
        TmfResponse::ReassignNotSupported,
        TmfResponse::NotSupported,
        TmfResponse::AuthFailed,
        TmfResponse::Rejected,
    ];

    /// One of each kind of request, covering every enum value and field shape.
    fn sample_requests() -> Vec<Request> {
        let mut v = Vec::new();
        let mut i = 0u64;
        for attr in ATTRS {
            for (cdb_len, data_len, read, write) in [
                (6, 0, false, false),
                (10, 0, true, false),
                (16, 4096, false, true),
                (32, 1, true, true),
                (0, 0, false, false),
            ] {
                i += 1;
                v.push(Request::Execute {
                    nexus: nexus(i),
                    lun: (i << 48) | 7,
                    op: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    cmd: ScsiCommand {
                        cdb: pattern(cdb_len, i as u8),
                        data_out: pattern(data_len, 3).into(),
                        expected_len: data_len as u32 + 512,
                        read,
                        write,
                        attr,
                        tag: 0xffff_0000 | i as u32,
                    },
                });
            }
        }
        for function in TMFS {
            v.push(Request::TaskMgmt {
                nexus: nexus(99),
                lun: u64::MAX,
                function,
            });
        }
        v.push(Request::NexusGone { nexus: nexus(0) });
        // Empty names, extreme numbers.
        v.push(Request::NexusGone {
            nexus: Nexus {
                id: u64::MAX,
                initiator_name: Arc::from(""),
                initiator_port: Arc::from(""),
                target_port: Arc::from("ünïcødé,t,0x1"),
                relative_port: u16::MAX,
                port_group: 0,
            },
        });
        v
    }

    fn sample_responses() -> Vec<Response> {
        let mut v = Vec::new();
        for (status, sense, data) in [
            (status::GOOD, None, Bytes::new()),
            (status::GOOD, None, pattern(8192, 1)),
            (status::CHECK_CONDITION, Some(Bytes::new()), Bytes::new()),
            (status::CHECK_CONDITION, Some(pattern(18, 9)), pattern(3, 0)),
            (status::RESERVATION_CONFLICT, None, Bytes::new()),
        ] {
            v.push(Response::Executed(ScsiResult {
                status,
                sense,
                data_in: data.clone(),
                transfer_len: data.len() as u32 * 3 + 1,
            }));
        }
        v.extend(TMF_RESPONSES.map(Response::TaskMgmt));
        v.push(Response::Done);
        v
    }

    fn assert_cmd_eq(a: &ScsiCommand, b: &ScsiCommand) {
        assert_eq!(a.cdb, b.cdb);
        assert_eq!(a.data_out, b.data_out);
        assert_eq!(a.expected_len, b.expected_len);
        assert_eq!(a.read, b.read);
        assert_eq!(a.write, b.write);
        assert_eq!(a.attr, b.attr);
        assert_eq!(a.tag, b.tag);
    }

    fn assert_req_eq(a: &Request, b: &Request) {
        match (a, b) {
            (
                Request::Execute {
                    nexus,
                    lun,
                    op,
                    cmd,
                },
                Request::Execute {
                    nexus: n2,
                    lun: l2,
                    op: o2,
                    cmd: c2,
                },
            ) => {
                assert_eq!(nexus, n2);
                assert_eq!(lun, l2);
                assert_eq!(op, o2);
                assert_cmd_eq(cmd, c2);
            }
            (
                Request::TaskMgmt {
                    nexus,
                    lun,
                    function,
                },
                Request::TaskMgmt {
                    nexus: n2,
                    lun: l2,
                    function: f2,
                },
            ) => {
                assert_eq!(nexus, n2);
                assert_eq!(lun, l2);
                assert_eq!(function, f2);
            }
            (Request::NexusGone { nexus }, Request::NexusGone { nexus: n2 }) => {
                assert_eq!(nexus, n2)
            }
            _ => panic!("different requests: {a:?} vs {b:?}"),
        }
    }

    fn assert_resp_eq(a: &Response, b: &Response) {
        match (a, b) {
            (Response::Executed(x), Response::Executed(y)) => assert_eq!(x, y),
            (Response::TaskMgmt(x), Response::TaskMgmt(y)) => assert_eq!(x, y),
            (Response::Done, Response::Done) => {}
            _ => panic!("different responses: {a:?} vs {b:?}"),
        }
    }

    fn request_frame(id: u64, r: &Request) -> BytesMut {
        let mut b = BytesMut::new();
        encode_request(id, r, &mut b);
        b
    }

    fn response_frame(id: u64, r: &Response) -> BytesMut {
        let mut b = BytesMut::new();
        encode_response(id, r, &mut b);
        b
    }

    #[test]
    fn every_request_round_trips() {
        let reqs = sample_requests();
        let mut stream = BytesMut::new();
        for (i, r) in reqs.iter().enumerate() {
            let mut one = request_frame(i as u64 * 0x1_0000_0001, r);
            let len = one.len();
            assert_eq!(
                u32::from_be_bytes(one[..4].try_into().unwrap()) as usize,
                len - 4
            );
            assert_eq!(one[4], VERSION);
            let (id, back) = take_request(&mut one).unwrap().expect("complete frame");
            assert!(one.is_empty(), "frame consumed entirely");
            assert_eq!(id, i as u64 * 0x1_0000_0001);
            assert_req_eq(r, &back);
            encode_request(i as u64, r, &mut stream);
        }
        // Back to back in one buffer, with the start of another frame behind them.
        stream.extend_from_slice(&[0, 0, 0]);
        for (i, r) in reqs.iter().enumerate() {
            let (id, back) = take_request(&mut stream).unwrap().unwrap();
            assert_eq!(id, i as u64);
            assert_req_eq(r, &back);
        }
        assert!(take_request(&mut stream).unwrap().is_none());
        assert_eq!(&stream[..], &[0, 0, 0]);
    }

    #[test]
    fn every_response_round_trips() {
        let resps = sample_responses();
        let mut stream = BytesMut::new();
        for (i, r) in resps.iter().enumerate() {
            let mut one = response_frame(u64::MAX - i as u64, r);
            let (id, back) = take_response(&mut one).unwrap().expect("complete frame");
            assert!(one.is_empty());
            assert_eq!(id, u64::MAX - i as u64);
            assert_resp_eq(r, &back);
            encode_response(i as u64, r, &mut stream);
        }
        for (i, r) in resps.iter().enumerate() {
            let (id, back) = take_response(&mut stream).unwrap().unwrap();
            assert_eq!(id, i as u64);
            assert_resp_eq(r, &back);
        }
        assert!(stream.is_empty());
    }

    #[test]
    fn empty_sense_is_not_no_sense() {
        let with = Response::Executed(ScsiResult {
            status: status::CHECK_CONDITION,
            sense: Some(Bytes::new()),
            data_in: Bytes::new(),
            transfer_len: 0,
        });
        let mut f = response_frame(1, &with);
        match take_response(&mut f).unwrap().unwrap().1 {
            Response::Executed(r) => assert_eq!(r.sense, Some(Bytes::new())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn payloads_are_slices_of_the_frame() {
        let req = Request::Execute {
            nexus: nexus(1),
            lun: 0,
            op: 0,
            cmd: ScsiCommand {
                cdb: pattern(16, 0),
                data_out: pattern(65536, 5).into(),
                expected_len: 65536,
                read: false,
                write: true,
                attr: TaskAttr::Simple,
                tag: 1,
            },
        };
        let mut f = request_frame(1, &req);
        let range = f.as_ptr() as usize..f.as_ptr() as usize + f.len();
        let Some((_, Request::Execute { cmd, .. })) = take_request(&mut f).unwrap() else {
            panic!("not an Execute");
        };
        assert_eq!(cmd.data_out.parts().len(), 1);
        assert!(range.contains(&(cmd.data_out.parts()[0].as_ptr() as usize)));
        assert!(range.contains(&(cmd.cdb.as_ptr() as usize)));

        let resp = Response::Executed(ScsiResult {
            status: 0,
            sense: Some(pattern(18, 1)),
            data_in: pattern(4096, 2),
            transfer_len: 4096,
        });
        let mut f = response_frame(2, &resp);
        let range = f.as_ptr() as usize..f.as_ptr() as usize + f.len();
        let Some((_, Response::Executed(r))) = take_response(&mut f).unwrap() else {
            panic!("not Executed");
        };
        assert!(range.contains(&(r.data_in.as_ptr() as usize)));
        assert!(range.contains(&(r.sense.unwrap().as_ptr() as usize)));
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let reqs = sample_requests();
        for r in reqs
            .iter()
            .filter(|r| !matches!(r, Request::Execute { cmd, .. } if cmd.data_out.len() > 100))
        {
            let whole = request_frame(7, r);
            for cut in 0..whole.len() {
                let mut buf = BytesMut::from(&whole[..cut]);
                assert!(take_request(&mut buf).unwrap().is_none(), "cut at {cut}");
                assert_eq!(&buf[..], &whole[..cut], "nothing consumed at cut {cut}");
                buf.extend_from_slice(&whole[cut..]);
                let (id, back) = take_request(&mut buf).unwrap().unwrap();
                assert_eq!(id, 7);
                assert_req_eq(r, &back);
                assert!(buf.is_empty());
            }
        }
        for r in sample_responses()
            .iter()
            .filter(|r| !matches!(r, Response::Executed(x) if x.data_in.len() > 100))
        {
            let whole = response_frame(8, r);
            for cut in 0..whole.len() {
                let mut buf = BytesMut::from(&whole[..cut]);
                assert!(take_response(&mut buf).unwrap().is_none(), "cut at {cut}");
                assert_eq!(buf.len(), cut);
                buf.extend_from_slice(&whole[cut..]);
                let (id, back) = take_response(&mut buf).unwrap().unwrap();
                assert_eq!(id, 8);
                assert_resp_eq(r, &back);
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        for len in [MAX_FRAME + 1, u32::MAX as usize] {
            let mut buf = BytesMut::with_capacity(16);
            buf.put_u32(len as u32);
            buf.put_u8(VERSION);
            let cap = buf.capacity();
            match take_request(&mut buf) {
                Err(FrameError::TooLarge(n)) => assert_eq!(n, len),
                other => panic!("{other:?}"),
            }
            match take_response(&mut buf) {
                Err(FrameError::TooLarge(n)) => assert_eq!(n, len),
                other => panic!("{other:?}"),
            }
            assert_eq!(buf.capacity(), cap, "no allocation for a refused frame");
            assert_eq!(bytes_wanted(&buf), 4 + MAX_FRAME - buf.len());
        }
        // Exactly MAX_FRAME is fine: just incomplete.
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME as u32);
        assert!(take_request(&mut buf).unwrap().is_none());
    }

    #[test]
    fn malformed_frames_are_errors() {
        let good = request_frame(1, &Request::NexusGone { nexus: nexus(1) });

        // The previous version (no operation ids) and a later one.
        for v in [1, 3] {
            let mut f = good.clone();
            f[4] = v;
            assert!(matches!(
                take_request(&mut f),
                Err(FrameError::BadVersion(x)) if x == v
            ));
        }

        let mut f = good.clone();
        f[5] = 0x81; // a response kind where a request belongs
        assert!(matches!(
            take_request(&mut f),
            Err(FrameError::BadKind(0x81))
        ));
        let mut f = response_frame(1, &Response::Done);
        assert!(matches!(
            take_request(&mut f),
            Err(FrameError::BadKind(kind::DONE))
        ));
        let mut f = good.clone();
        assert!(matches!(
            take_response(&mut f),
            Err(FrameError::BadKind(kind::NEXUS_GONE))
        ));

        // A length too short to hold the header.
        for len in 0..HEADER as u32 {
            let mut f = BytesMut::new();
            f.put_u32(len);
            f.put_bytes(1, 16);
            assert!(matches!(
                take_request(&mut f),
                Err(FrameError::Truncated("frame header"))
            ));
        }

        // Trailing bytes.
        let mut f = good.clone();
        f.put_u8(0);
        let len = f.len() as u32 - 4;
        f[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(take_request(&mut f), Err(FrameError::BadValue(_))));

        // A variable length pointing past the end.
        let mut f = good.clone();
        f[22..26].copy_from_slice(&1000u32.to_be_bytes()); // the initiator name's length
        assert!(matches!(
            take_request(&mut f),
            Err(FrameError::Truncated("initiator name"))
        ));

        // Not UTF-8.
        let mut f = good;
        f[26] = 0xff;
        assert!(matches!(take_request(&mut f), Err(FrameError::BadValue(_))));

        // Out-of-range codes.
        let exec = Request::Execute {
            nexus: nexus(1),
            lun: 0,
            op: 0,
            cmd: ScsiCommand {
                cdb: pattern(6, 0),
                data_out: Default::default(),
                expected_len: 0,
                read: false,
                write: false,
                attr: TaskAttr::Simple,
                tag: 0,
            },
        };
        let at = 14 + nexus_len(&nexus(1)) + 8 + 8 + 4; // the task attribute (after lun, op, tag)
        let mut f = request_frame(1, &exec);
        f[at] = 5;
        assert!(matches!(take_request(&mut f), Err(FrameError::BadValue(_))));
        let mut f = request_frame(1, &exec);
        f[at + 1] = 4; // flags
        assert!(matches!(take_request(&mut f), Err(FrameError::BadValue(_))));
        let tmf = Request::TaskMgmt {
            nexus: nexus(1),
            lun: 0,
            function: TmfFunction::ClearAca,
        };
        for code in [0u8, 8, 255] {
            let mut f = request_frame(1, &tmf);
            f[14 + nexus_len(&nexus(1)) + 8] = code;
            assert!(matches!(take_request(&mut f), Err(FrameError::BadValue(_))));
        }
        for code in [7u8, 8, 254] {
            let mut f = response_frame(1, &Response::TaskMgmt(TmfResponse::Complete));
            f[14] = code;
            assert!(matches!(
                take_response(&mut f),
                Err(FrameError::BadValue(_))
            ));
        }
        let mut f = response_frame(1, &sample_responses()[0]);
        f[14 + 5] = 2; // sense flag
        assert!(matches!(
            take_response(&mut f),
            Err(FrameError::BadValue(_))
        ));
    }

    #[test]
    fn every_truncated_body_is_an_error() {
        // Cut the body short but keep the length field consistent with it, so the
        // field parsers (not the framing) meet the end.
        let check = |whole: &BytesMut, is_req: bool| {
            for body in HEADER..whole.len() - 4 {
                let mut f = BytesMut::new();
                f.put_u32(body as u32);
                f.extend_from_slice(&whole[4..4 + body]);
                if is_req {
                    assert!(take_request(&mut f).is_err(), "body cut at {body}");
                } else {
                    assert!(take_response(&mut f).is_err(), "body cut at {body}");
                }
            }
        };
        for r in sample_requests()
            .iter()
            .take(12)
            .chain(sample_requests().iter().rev().take(10))
        {
            check(&request_frame(3, r), true);
        }
        for r in sample_responses()
            .iter()
            .filter(|r| !matches!(r, Response::Done))
        {
            check(&response_frame(3, r), false);
        }
    }

    /// xorshift64*: enough randomness for fuzzing without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut seeds: Vec<BytesMut> = sample_requests()
            .iter()
            .map(|r| request_frame(1, r))
            .chain(sample_responses().iter().map(|r| response_frame(1, r)))
            .collect();
        seeds.retain(|s| s.len() < 2048);
        let (mut ok, mut err) = (0u32, 0u32);
        for round in 0..60_000 {
            let mut buf = match round % 3 {
                // Pure garbage, often with a plausible length so the body parsers run.
                0 => {
                    let n = rng.below(96);
                    let mut b: BytesMut = (0..n).map(|_| rng.next() as u8).collect();
                    if n >= 6 && rng.below(2) == 0 {
                        let len = (n - 4) as u32;
                        b[..4].copy_from_slice(&len.to_be_bytes());
                        b[4] = VERSION;
                        b[5] = [1u8, 2, 3, 0x81, 0x82, 0x83][rng.below(6)];
                    }
                    b
                }
                // A valid frame with a few bytes changed.
                1 => {
                    let mut b = seeds[rng.below(seeds.len())].clone();
                    for _ in 0..1 + rng.below(4) {
                        let at = 4 + rng.below(b.len() - 4);
                        b[at] = rng.next() as u8;
                    }
                    b
                }
                // A valid frame truncated or extended, length field adjusted or not.
                _ => {
                    let s = &seeds[rng.below(seeds.len())];
                    let cut = rng.below(s.len() + 8);
                    let mut b = BytesMut::from(&s[..cut.min(s.len())]);
                    b.put_bytes(rng.next() as u8, cut.saturating_sub(s.len()));
                    if b.len() >= 4 && rng.below(2) == 0 {
                        let len = (b.len() - 4) as u32;
                        b[..4].copy_from_slice(&len.to_be_bytes());
                    }
                    b
                }
            };
            let before = buf.clone();
            let res = if round % 2 == 0 {
                take_request(&mut buf).map(|o| o.map(|_| ()))
            } else {
                take_response(&mut buf).map(|o| o.map(|_| ()))
            };
            match res {
                Ok(None) => assert_eq!(buf, before, "incomplete input left untouched"),
                Ok(Some(())) => ok += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    err += 1;
                }
            }
        }
        // The generator reached both outcomes, so the parsers really ran.
        assert!(ok > 100 && err > 1000, "ok {ok}, err {err}");
    }

    // --- client and server over loopback ---

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Execute echoes Data-Out back as Data-In, the CDB as "sense" and the nexus's initiator
    /// port as the first bytes after it; the transfer length is the tag. Some commands take a
    /// little while, so answers come back out of order. Uses an `Rc` to prove handler
    /// futures need not be `Send`.
    fn echo_handler() -> Handler {
        Arc::new(|req: Request| -> BoxFuture {
            Box::pin(async move {
                let not_send = std::rc::Rc::new(());
                let resp = match req {
                    Request::Execute {
                        nexus, lun, cmd, ..
                    } => {
                        let delay = u64::from(cmd.tag % 4);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let mut sense = BytesMut::from(&cmd.cdb[..]);
                        sense.extend_from_slice(nexus.initiator_port.as_bytes());
                        sense.put_u64(lun);
                        Response::Executed(ScsiResult {
                            status: status::GOOD,
                            sense: Some(sense.freeze()),
                            data_in: cmd.data_out.to_bytes(),
                            transfer_len: cmd.tag,
                        })
                    }
                    Request::TaskMgmt { function, .. } => Response::TaskMgmt(match function {
                        TmfFunction::AbortTask { tag } if tag % 2 == 1 => TmfResponse::NoSuchTask,
                        _ => TmfResponse::Complete,
                    }),
                    Request::NexusGone { .. } => Response::Done,
                };
                drop(not_send);
                resp
            })
        })
    }

    struct TestServer {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        thread: JoinHandle<()>,
    }

    impl TestServer {
        fn start_on(addr: SocketAddr, handler: Handler) -> Self {
            let listener = std::net::TcpListener::bind(addr).unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, rx) = watch::channel(false);
            let thread = serve(listener, handler, rx).unwrap();
            TestServer { addr, stop, thread }
        }

        fn start(handler: Handler) -> Self {
            Self::start_on("127.0.0.1:0".parse().unwrap(), handler)
        }

        fn stop(self) {
            self.stop.send(true).unwrap();
            self.thread.join().unwrap();
        }
    }

    fn exec(i: u32) -> Request {
        Request::Execute {
            nexus: nexus(u64::from(i % 3)),
            lun: u64::from(i % 5),
            op: 0,
            cmd: ScsiCommand {
                cdb: pattern(if i.is_multiple_of(2) { 16 } else { 32 }, i as u8),
                data_out: pattern((i as usize * 37) % 9000, i as u8).into(),
                expected_len: 0,
                read: true,
                write: true,
                attr: TaskAttr::Simple,
                tag: i,
            },
        }
    }

    fn check_echo(i: u32, resp: Response) {
        let Request::Execute {
            nexus, lun, cmd, ..
        } = exec(i)
        else {
            unreachable!()
        };
        let Response::Executed(r) = resp else {
            panic!("call {i}: {resp:?}");
        };
        assert_eq!(r.status, status::GOOD);
        assert_eq!(r.transfer_len, i, "answer matched to its call");
        assert_eq!(r.data_in, cmd.data_out.to_bytes());
        let mut sense = BytesMut::from(&cmd.cdb[..]);
        sense.extend_from_slice(nexus.initiator_port.as_bytes());
        sense.put_u64(lun);
        assert_eq!(&r.sense.unwrap()[..], &sense[..]);
    }

    #[test]
    fn concurrent_calls_from_one_runtime() {
        let server = TestServer::start(echo_handler());
        let client = Client::new(server.addr, Duration::from_secs(10));
        assert_eq!(client.addr(), server.addr);
        runtime().block_on(async {
            let calls = (0..200).map(|i| {
                let client = client.clone();
                async move { (i, client.call(exec(i)).await) }
            });
            for (i, r) in futures_util::future::join_all(calls).await {
                check_echo(i, r.unwrap());
            }
            // The other kinds.
            for (tag, want) in [(1, TmfResponse::NoSuchTask), (2, TmfResponse::Complete)] {
                let r = client
                    .call(Request::TaskMgmt {
                        nexus: nexus(1),
                        lun: 0,
                        function: TmfFunction::AbortTask { tag },
                    })
                    .await
                    .unwrap();
                assert!(matches!(r, Response::TaskMgmt(got) if got == want), "{r:?}");
            }
            let r = client
                .call(Request::NexusGone { nexus: nexus(1) })
                .await
                .unwrap();
            assert!(matches!(r, Response::Done));
        });
        drop(client);
        server.stop();
    }

    #[test]
    fn calls_from_two_runtimes_at_once() {
        let server = TestServer::start(echo_handler());
        let client = Client::new(server.addr, Duration::from_secs(10));
        let threads: Vec<_> = (0..2u32)
            .map(|t| {
                let client = client.clone();
                std::thread::spawn(move || {
                    runtime().block_on(async {
                        let calls = (0..150u32).map(|k| {
                            let i = t * 1000 + k;
                            let client = &client;
                            async move { (i, client.call(exec(i)).await) }
                        });
                        for (i, r) in futures_util::future::join_all(calls).await {
                            check_echo(i, r.unwrap());
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        server.stop();
    }

    #[test]
    fn in_flight_requests_are_bounded_per_connection() {
        let peak = Arc::new(AtomicUsize::new(0));
        let handler: Handler = {
            let now = Arc::new(AtomicUsize::new(0));
            let peak = peak.clone();
            Arc::new(move |_req: Request| -> BoxFuture {
                let (now, peak) = (now.clone(), peak.clone());
                Box::pin(async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Response::Done
                })
            })
        };
        let server = TestServer::start(handler);
        let client = Client::new(server.addr, Duration::from_secs(10));
        runtime().block_on(async {
            let calls = (0..600).map(|i| client.call(Request::NexusGone { nexus: nexus(i) }));
            for r in futures_util::future::join_all(calls).await {
                assert!(matches!(r.unwrap(), Response::Done));
            }
        });
        let peak = peak.load(Ordering::SeqCst);
        // 600 calls pipelined at once: the server runs as many as it may, and no more.
        assert_eq!(peak, MAX_IN_FLIGHT);
        server.stop();
    }

    #[test]
    fn a_panicking_handler_gets_a_failure_answer() {
        let handler: Handler = Arc::new(|req: Request| -> BoxFuture {
            Box::pin(async move {
                if let Request::Execute { cmd, .. } = &req {
                    assert_ne!(cmd.tag, 13, "handler bug");
                }
                Response::Done
            })
        });
        let server = TestServer::start(handler);
        let client = Client::new(server.addr, Duration::from_secs(10));
        runtime().block_on(async {
            let Response::Executed(r) = client.call(exec(13)).await.unwrap() else {
                panic!("not Executed");
            };
            assert_eq!(r.status, status::CHECK_CONDITION);
            assert_eq!(SenseKey::of(&r.sense.unwrap()), SenseKey::HARDWARE_ERROR);
            // The connection carries on.
            assert!(matches!(
                client.call(exec(12)).await.unwrap(),
                Response::Done
            ));
        });
        server.stop();
    }

    #[test]
    fn a_16_mib_transfer_fits_and_bigger_is_refused() {
        let handler: Handler = Arc::new(|req: Request| -> BoxFuture {
            Box::pin(async move {
                let Request::Execute { cmd, .. } = req else {
                    return Response::Done;
                };
                let data_in = if cmd.tag == 99 {
                    Bytes::from(vec![7u8; MAX_FRAME]) // too big to send back
                } else {
                    cmd.data_out.to_bytes()
                };
                Response::Executed(ScsiResult {
                    status: status::GOOD,
                    sense: None,
                    transfer_len: data_in.len() as u32,
                    data_in,
                })
            })
        });
        let server = TestServer::start(handler);
        let client = Client::new(server.addr, Duration::from_secs(20));
        let write = |tag: u32, len: usize| Request::Execute {
            nexus: nexus(1),
            lun: 0,
            op: 0,
            cmd: ScsiCommand {
                cdb: pattern(16, 0),
                data_out: pattern(len, 1).into(),
                expected_len: len as u32,
                read: false,
                write: true,
                attr: TaskAttr::Simple,
                tag,
            },
        };
        runtime().block_on(async {
            // The largest transfer, both ways.
            let Response::Executed(r) = client.call(write(1, 16 << 20)).await.unwrap() else {
                panic!("not Executed");
            };
            assert_eq!(r.data_in, pattern(16 << 20, 1));
            // Too big to send: refused locally, the connection unharmed.
            let err = client.call(write(2, MAX_FRAME)).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
            // Too big to answer: the owner reports a failure instead.
            let Response::Executed(r) = client.call(write(99, 0)).await.unwrap() else {
                panic!("not Executed");
            };
            assert_eq!(r.status, status::CHECK_CONDITION);
            assert!(r.data_in.is_empty());
            let Response::Executed(r) = client.call(write(3, 10)).await.unwrap() else {
                panic!("not Executed");
            };
            assert_eq!(r.data_in, pattern(10, 1));
        });
        server.stop();
    }

    #[test]
    fn server_gone_fails_promptly_then_reconnects() {
        let timeout = Duration::from_millis(500);
        let server = TestServer::start(echo_handler());
        let addr = server.addr;
        let client = Client::new(addr, timeout);
        let rt = runtime();
        rt.block_on(async {
            check_echo(1, client.call(exec(1)).await.unwrap());
        });
        server.stop();
        rt.block_on(async {
            for i in 0..3 {
                let t0 = std::time::Instant::now();
                let r = client.call(exec(i)).await;
                assert!(r.is_err(), "no server, yet {r:?}");
                assert!(
                    t0.elapsed() < timeout + Duration::from_millis(500),
                    "took {:?}",
                    t0.elapsed()
                );
            }
        });
        // A new server on the same address: calls work again.
        let server = TestServer::start_on(addr, echo_handler());
        rt.block_on(async {
            let calls = (0..20).map(|i| {
                let client = &client;
                async move { (i, client.call(exec(i)).await) }
            });
            for (i, r) in futures_util::future::join_all(calls).await {
                check_echo(i, r.unwrap());
            }
        });
        server.stop();
    }

    #[test]
    fn nobody_listening_is_an_error_not_a_hang() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let client = Client::new(addr, Duration::from_millis(300));
        runtime().block_on(async {
            let t0 = std::time::Instant::now();
            let calls = (0..50).map(|i| client.call(exec(i)));
            for r in futures_util::future::join_all(calls).await {
                assert!(r.is_err());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t0.elapsed()
            );
        });
    }

    #[test]
    fn a_silent_peer_times_out() {
        // Accepts connections (the kernel does) but never reads or answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let timeout = Duration::from_millis(300);
        let client = Client::new(silent.local_addr().unwrap(), timeout);
        let rt = runtime();
        for round in 1..=2 {
            rt.block_on(async {
                let t0 = std::time::Instant::now();
                let err = client.call(exec(1)).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
                let took = t0.elapsed();
                assert!(took >= timeout && took < timeout * 3, "took {took:?}");
                // Time for the client to give up on the connection.
                tokio::time::sleep(timeout).await;
            });
            // Each call went out on a connection of its own: the silent one was dropped.
            silent.set_nonblocking(true).unwrap();
            let mut conns = 0;
            while silent.accept().is_ok() {
                conns += 1;
            }
            assert_eq!(conns, 1, "round {round}");
        }
    }

    #[test]
    fn connection_lost_with_calls_in_flight() {
        // A peer that takes the request and hangs up without answering.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            use std::io::Read;
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).unwrap();
        });
        let client = Client::new(addr, Duration::from_secs(10));
        runtime().block_on(async {
            let t0 = std::time::Instant::now();
            let calls = (0..5).map(|i| client.call(exec(i)));
            for r in futures_util::future::join_all(calls).await {
                let err = r.unwrap_err();
                assert_ne!(err.kind(), io::ErrorKind::TimedOut, "{err}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t0.elapsed()
            );
        });
        peer.join().unwrap();
    }

    #[test]
    fn malformed_request_closes_only_its_connection() {
        use std::io::{Read, Write};
        let server = TestServer::start(echo_handler());
        let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut frame = request_frame(1, &Request::NexusGone { nexus: nexus(1) });
        frame[4] = 9; // bad version
        raw.write_all(&frame).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            raw.read(&mut b).unwrap(),
            0,
            "the server closed the connection"
        );

        let client = Client::new(server.addr, Duration::from_secs(5));
        runtime().block_on(async {
            check_echo(3, client.call(exec(3)).await.unwrap());
        });
        server.stop();
    }

    #[test]
    fn dropping_the_last_client_closes_its_connection() {
        use std::io::{Read, Write};
        // A hand-made owner: answer one request, then wait for the client to hang up.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let owner = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = BytesMut::new();
            let id = loop {
                let mut b = [0u8; 4096];
                let n = s.read(&mut b).unwrap();
                assert!(n > 0, "client hung up before its request");
                buf.extend_from_slice(&b[..n]);
                if let Some((id, req)) = take_request(&mut buf).unwrap() {
                    assert!(matches!(req, Request::NexusGone { .. }));
                    break id;
                }
            };
            let mut out = BytesMut::new();
            encode_response(id, &Response::Done, &mut out);
            s.write_all(&out).unwrap();
            // EOF (not the read timeout) once the client's thread has ended.
            let mut b = [0u8; 64];
            assert_eq!(s.read(&mut b).unwrap(), 0);
        });
        let client = Client::new(addr, Duration::from_secs(5));
        let other = client.clone();
        runtime().block_on(async {
            let r = other
                .call(Request::NexusGone { nexus: nexus(5) })
                .await
                .unwrap();
            assert!(matches!(r, Response::Done));
        });
        drop(other);
        drop(client);
        owner.join().unwrap();
    }

    /// A handler that counts the Executes it runs (each takes `delay`) and answers with the
    /// count so far as the transfer length.
    fn counting(runs: Arc<AtomicUsize>, delay: Duration) -> Handler {
        Arc::new(move |req: Request| -> BoxFuture {
            let runs = runs.clone();
            Box::pin(async move {
                match req {
                    Request::Execute { cmd, .. } => {
                        tokio::time::sleep(delay).await;
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        Response::Executed(ScsiResult {
                            status: status::GOOD,
                            sense: None,
                            data_in: cmd.data_out.to_bytes(),
                            transfer_len: n as u32,
                        })
                    }
                    Request::TaskMgmt { .. } => Response::TaskMgmt(TmfResponse::Complete),
                    Request::NexusGone { .. } => Response::Done,
                }
            })
        })
    }

    fn op_exec(op: u64, opcode: u8, port_group: u16) -> Request {
        let mut n = nexus(1);
        n.port_group = port_group;
        let mut cdb = vec![0u8; 16];
        cdb[0] = opcode;
        Request::Execute {
            nexus: n,
            lun: 0,
            op,
            cmd: ScsiCommand {
                cdb: Bytes::from(cdb),
                data_out: pattern(512, 3).into(),
                expected_len: 512,
                read: false,
                write: true,
                attr: TaskAttr::Simple,
                tag: 1,
            },
        }
    }

    #[test]
    fn an_operation_with_side_effects_runs_once_per_id() {
        let runs = Arc::new(AtomicUsize::new(0));
        let h = once(counting(runs.clone(), Duration::from_millis(30)));
        let rt = runtime();
        LocalSet::new().block_on(&rt, async {
            let transfer = |r: Response| match r {
                Response::Executed(r) => r.transfer_len,
                other => panic!("{other:?}"),
            };
            // A COMPARE AND WRITE sent three times, twice while the first still runs: one run,
            // one answer for all.
            let (a, b) =
                futures_util::future::join(h(op_exec(7, 0x89, 1)), h(op_exec(7, 0x89, 1))).await;
            let c = h(op_exec(7, 0x89, 1)).await;
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert_eq!((transfer(a), transfer(b), transfer(c)), (1, 1, 1));
            // Another id, or the same id from another gateway (port group), runs.
            assert_eq!(transfer(h(op_exec(8, 0x89, 1)).await), 2);
            assert_eq!(transfer(h(op_exec(7, 0x89, 2)).await), 3);
            // No id, or a read: runs every time.
            assert_eq!(transfer(h(op_exec(0, 0x2a, 1)).await), 4);
            assert_eq!(transfer(h(op_exec(0, 0x2a, 1)).await), 5);
            assert_eq!(transfer(h(op_exec(9, 0x28, 1)).await), 6);
            assert_eq!(transfer(h(op_exec(9, 0x28, 1)).await), 7);
            // A PERSISTENT RESERVE OUT and a WRITE are remembered too.
            assert_eq!(transfer(h(op_exec(10, 0x5f, 1)).await), 8);
            assert_eq!(transfer(h(op_exec(10, 0x5f, 1)).await), 8);
            assert_eq!(transfer(h(op_exec(11, 0x2a, 1)).await), 9);
            assert_eq!(transfer(h(op_exec(11, 0x2a, 1)).await), 9);
        });
        assert!(unrepeatable(&[0x89]) && unrepeatable(&[0x5f]) && !unrepeatable(&[0x2a]));
    }

    /// A TCP proxy to `to` that cuts the first `cuts` connections as soon as the server
    /// starts answering (the request was delivered and ran; its answer is lost). Later
    /// connections pass through.
    fn cutting_proxy(to: SocketAddr, cuts: usize) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for (n, c) in l.incoming().enumerate() {
                let Ok(c) = c else { return };
                let s = std::net::TcpStream::connect(to).unwrap();
                let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = io::copy(&mut &c2, &mut &s2);
                });
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 65536];
                    loop {
                        let k = match (&s).read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => k,
                        };
                        if n < cuts {
                            // Lose the answer: cut both sides.
                            let _ = c.shutdown(std::net::Shutdown::Both);
                            let _ = s.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        if (&c).write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn a_forwarded_command_whose_answer_is_lost_runs_once() {
        let runs = Arc::new(AtomicUsize::new(0));
        let server = TestServer::start(once(counting(runs.clone(), Duration::ZERO)));
        let proxy = cutting_proxy(server.addr, 1);
        let rt = runtime();
        LocalSet::new().block_on(&rt, async {
            let client = Client::new(proxy, Duration::from_secs(5));
            let Request::Execute { nexus, cmd, .. } = op_exec(0, 0x89, 1) else {
                unreachable!()
            };
            let r = execute_once_within(&client, &nexus, 0, &cmd, Duration::from_secs(5))
                .await
                .expect("answered after sending again");
            assert_eq!(r.transfer_len, 1, "the first execution's answer");
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1, "ran once");
        server.stop();
    }

    #[test]
    fn a_forwarded_command_never_answered_is_unknown_and_still_ran_once() {
        let runs = Arc::new(AtomicUsize::new(0));
        let server = TestServer::start(once(counting(runs.clone(), Duration::ZERO)));
        let proxy = cutting_proxy(server.addr, usize::MAX);
        let rt = runtime();
        LocalSet::new().block_on(&rt, async {
            let client = Client::new(proxy, Duration::from_secs(5));
            let Request::Execute { nexus, cmd, .. } = op_exec(0, 0x89, 1) else {
                unreachable!()
            };
            let r = execute_once_within(&client, &nexus, 0, &cmd, Duration::from_millis(600)).await;
            assert!(matches!(r, Err(Unanswered::Unknown(_))), "{r:?}");
            // Nobody listening: provably not run.
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let dead = gone.local_addr().unwrap();
            drop(gone);
            let c2 = Client::new(dead, Duration::from_secs(2));
            let r = execute_once_within(&c2, &nexus, 0, &cmd, Duration::from_millis(600)).await;
            assert!(matches!(r, Err(Unanswered::NotRun(_))), "{r:?}");
            // Over the frame limit: refused before anything is sent.
            let mut big = cmd.clone();
            big.data_out = Bytes::from(vec![0u8; MAX_FRAME]).into();
            let r = execute_once_within(&client, &nexus, 0, &big, Duration::from_millis(600)).await;
            assert!(matches!(r, Err(Unanswered::TooLarge)), "{r:?}");
        });
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "sent again and again, ran once"
        );
        server.stop();
    }
}
