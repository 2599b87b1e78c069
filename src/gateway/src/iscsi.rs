//! The tokio driver of one iSCSI connection: socket bytes in and out of the sans-IO
//! [`Connection`], commands to the SCSI target, timers.
//!
//! All of it runs on one worker's current-thread runtime. Commands execute concurrently as
//! futures in a `FuturesUnordered` owned by the connection's task; after every wake-up the
//! driver takes every completion that is ready, then writes all queued PDUs with one
//! vectored write, so a burst of commands costs a few syscalls, not a few per command.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics;
use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use rand::Rng;
use tessera_proto::iscsi::conn::{
    CloseReason, Command, Completion, ConnConfig, Connection, Event, TmfEvent,
};
use tessera_proto::iscsi::framer::TxQueue;
use tessera_proto::iscsi::login::{LoginSetup, SessionType};
use tessera_proto::iscsi::pdu::tmf;
use tessera_proto::scsi::sense::SenseKey;
use tessera_scsi::{status, Nexus, Target, TmfFunction};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::session::{wait_gone, Registration};
use super::Gateway;

/// Stop reading while this much is queued for the initiator (it is not reading).
const TX_HIGH_WATER: usize = 8 << 20;
/// Largest write command accepted (matches the Block Limits VPD page's maximum transfer).
const MAX_WRITE_TRANSFER: u32 = 32 << 20;
/// Write data a connection may hold before R2Ts wait.
const WRITE_BUDGET: usize = 256 << 20;

type CmdFuture = Pin<Box<dyn Future<Output = (u32, Completion)>>>;
type TmfFuture = Pin<Box<dyn Future<Output = (u32, u8, u8)>>>;

/// How long a task management function waits for the commands it aborts before it says so in
/// the log (it goes on waiting: its answer means they can have no further effect).
const TMF_SLOW: Duration = Duration::from_secs(30);
/// How long a closing connection waits for its commands to end (each is bounded by the data
/// path's own limits; this only caps a bug).
const CLOSE_DRAIN: Duration = Duration::from_secs(60);

struct Session {
    target: Arc<Target>,
    nexus: Arc<Nexus>,
    registration: Registration,
    /// The target's name, for metrics labels.
    target_name: Arc<str>,
    /// Per-LUN metric handles, looked up once per session and LUN.
    lun_metrics: std::cell::RefCell<HashMap<[u8; 8], Rc<LunMetrics>>>,
}

/// The metrics of one LUN as a session updates them.
struct LunMetrics {
    commands: [prometheus::IntCounter; 3],
    duration: [prometheus::Histogram; 3],
    bytes: [prometheus::IntCounter; 2],
    in_flight: prometheus::IntGauge,
    target: Arc<str>,
    lun: String,
}

const KINDS: [&str; 3] = ["read", "write", "other"];

impl LunMetrics {
    fn new(target: &Arc<str>, lun: u64) -> Self {
        let m = metrics::metrics();
        let l = lun.to_string();
        let t: &str = target;
        Self {
            commands: KINDS.map(|k| m.scsi_commands.with_label_values(&[t, &l, k])),
            duration: KINDS.map(|k| m.scsi_duration.with_label_values(&[t, &l, k])),
            bytes: ["read", "write"].map(|d| m.scsi_bytes.with_label_values(&[t, &l, d])),
            in_flight: m.scsi_in_flight.with_label_values(&[t, &l]),
            target: target.clone(),
            lun: l,
        }
    }

    fn check_condition(&self, sense: &[u8]) {
        const KEYS: [&str; 16] = [
            "no_sense",
            "recovered_error",
            "not_ready",
            "medium_error",
            "hardware_error",
            "illegal_request",
            "unit_attention",
            "data_protect",
            "blank_check",
            "vendor_specific",
            "copy_aborted",
            "aborted_command",
            "reserved_c",
            "volume_overflow",
            "miscompare",
            "reserved_f",
        ];
        let key = SenseKey::of(sense);
        metrics::metrics()
            .scsi_check_conditions
            .with_label_values(&[&*self.target, self.lun.as_str(), KEYS[usize::from(key)]])
            .inc();
    }
}

/// Counts an open connection while it lives.
struct ConnCount;

impl ConnCount {
    fn new() -> Self {
        metrics::metrics().iscsi_connections.inc();
        Self
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        metrics::metrics().iscsi_connections.dec();
    }
}

fn failure_reason(f: &tessera_proto::iscsi::login::LoginFailure) -> Option<&'static str> {
    use tessera_proto::iscsi::login::LoginFailure as F;
    Some(match f {
        F::Authentication => "authentication",
        F::Authorization => "authorization",
        F::InitiatorError => "initiator_error",
        F::MissingParameter => "missing_parameter",
        F::NotFound => "target_not_found",
        F::Redirected => return None,
        F::SessionDoesNotExist => "session_does_not_exist",
        F::SessionType => "session_type",
        F::Version => "version",
    })
}

fn tmf_function(t: &TmfEvent) -> Option<TmfFunction> {
    Some(match t.function {
        tmf::ABORT_TASK => TmfFunction::AbortTask { tag: t.rtt },
        tmf::ABORT_TASK_SET => TmfFunction::AbortTaskSet,
        tmf::CLEAR_ACA => TmfFunction::ClearAca,
        tmf::CLEAR_TASK_SET => TmfFunction::ClearTaskSet,
        tmf::LOGICAL_UNIT_RESET => TmfFunction::LogicalUnitReset,
        tmf::TARGET_WARM_RESET => TmfFunction::TargetWarmReset,
        tmf::TARGET_COLD_RESET => TmfFunction::TargetColdReset,
        _ => return None,
    })
}

fn hex6(b: &[u8; 6]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How much the receive buffer grows by at a time.
const RECV_STEP: usize = 1 << 20;

/// Write as much of `tx` as the socket takes. `Ok(true)`: everything was written.
fn flush(stream: &TcpStream, tx: &mut TxQueue) -> io::Result<bool> {
    while !tx.is_empty() {
        let iov: Vec<IoSlice<'_>> = tx.segments().take(64).map(IoSlice::new).collect();
        match stream.try_write_vectored(&iov) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => tx.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Serve one connection until it closes.
pub(super) async fn serve(
    gw: Arc<Gateway>,
    s: std::net::TcpStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = match s.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => {
            warn!(%peer, "connection without a local address: {e}");
            return;
        }
    };
    if let Err(e) = s.set_nonblocking(true) {
        warn!(%peer, "set_nonblocking: {e}");
        return;
    }
    let stream = match TcpStream::from_std(s) {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, "register connection: {e}");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let _counted = ConnCount::new();
    let (mut digest_seen, mut rejects_seen) = (0u64, 0u64);
    let mut challenge = [0u8; 16];
    rand::thread_rng().fill(&mut challenge);
    let cfg = ConnConfig {
        login: LoginSetup {
            directory: gw.directory(),
            limits: gw.limits.clone(),
            tsih: gw.alloc_tsih(),
            chap_id: rand::thread_rng().gen(),
            chap_challenge: challenge,
            cmd_window: gw.cfg.queue_depth,
        },
        local_portal: local,
        nop_interval: (gw.cfg.nop_interval_secs > 0)
            .then(|| Duration::from_secs(gw.cfg.nop_interval_secs)),
        nop_timeout: Duration::from_secs(gw.cfg.nop_timeout_secs),
        login_timeout: Duration::from_secs(15),
        max_write_transfer: MAX_WRITE_TRANSFER,
        write_budget: WRITE_BUDGET,
    };
    let mut conn = Connection::new(cfg, Instant::now());
    let mut session: Option<Session> = None;
    let mut rbuf = BytesMut::with_capacity(256 * 1024);
    let mut inflight: FuturesUnordered<CmdFuture> = FuturesUnordered::new();
    // Commands executing (by ITT), and those of them a task management function aborted:
    // they run to their end (a started write is never cut short), their answers are dropped,
    // and the function is answered once none of them can have any further effect (SAM-5).
    let running: Rc<std::cell::RefCell<HashSet<u32>>> = Rc::default();
    let mut aborted: HashSet<u32> = HashSet::new();
    let ended = Rc::new(tokio::sync::Notify::new());
    let mut tmfs: FuturesUnordered<TmfFuture> = FuturesUnordered::new();
    let mut closing = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let sleep = tokio::time::sleep_until(far);
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    let never = Arc::new(tokio::sync::Notify::new());
    debug!(%peer, "connection accepted");

    'outer: loop {
        // Events and ready completions until nothing moves.
        loop {
            let mut progress = false;
            while let Some(ev) = conn.poll_event() {
                progress = true;
                match ev {
                    Event::LoggedIn(o) => {
                        if o.session_type == SessionType::Discovery {
                            info!(%peer, initiator = %o.initiator_name, "discovery session");
                            continue;
                        }
                        let Some(te) = o.target.as_ref() else {
                            break 'outer;
                        };
                        let Some(target) = gw.target(&te.name) else {
                            break 'outer;
                        };
                        let nexus = Arc::new(Nexus {
                            id: gw.alloc_nexus_id(),
                            initiator_name: o.initiator_name.as_str().into(),
                            initiator_port: format!("{},i,0x{}", o.initiator_name, hex6(&o.isid))
                                .into(),
                            target_port: format!("{},t,0x{:04x}", te.name, te.portal_group_tag)
                                .into(),
                            relative_port: te.portal_group_tag.max(1),
                            port_group: te.portal_group_tag,
                        });
                        let key = (
                            o.initiator_name.to_ascii_lowercase(),
                            o.isid,
                            te.name.to_ascii_lowercase(),
                        );
                        let socket = stream.as_fd().try_clone_to_owned().ok();
                        let (registration, replaced) = gw.sessions.register(key, nexus.id, socket);
                        if let Some(old) = replaced {
                            info!(%peer, initiator = %o.initiator_name, "reinstating session");
                            let _ =
                                tokio::time::timeout(Duration::from_secs(10), wait_gone(old)).await;
                        }
                        // Sessions of this initiator it has already hung up on end first.
                        for old in gw.sessions.hung_up(&o.initiator_name, &te.name, nexus.id) {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(5), wait_gone(old)).await;
                        }
                        info!(
                            %peer,
                            initiator = %o.initiator_name,
                            target = %te.name,
                            header_digest = o.params.header_digest,
                            data_digest = o.params.data_digest,
                            "login"
                        );
                        session = Some(Session {
                            target,
                            nexus,
                            registration,
                            target_name: te.name.as_str().into(),
                            lun_metrics: Default::default(),
                        });
                    }
                    Event::Command(c) => {
                        let Some(s) = &session else { continue };
                        running.borrow_mut().insert(c.itt());
                        inflight.push(command_future(s, c));
                    }
                    Event::TaskMgmt(t) => {
                        let waits: Vec<u32> = t
                            .aborted
                            .iter()
                            .copied()
                            .filter(|i| running.borrow().contains(i))
                            .collect();
                        aborted.extend(waits.iter().copied());
                        let apply = match (&session, tmf_function(&t)) {
                            (Some(s), Some(f)) => Some((s.target.clone(), s.nexus.clone(), f)),
                            _ => None,
                        };
                        let (running, ended, peer) = (running.clone(), ended.clone(), peer.clone());
                        tmfs.push(Box::pin(async move {
                            let began = tokio::time::Instant::now();
                            let mut warned = false;
                            loop {
                                let n = ended.notified();
                                tokio::pin!(n);
                                n.as_mut().enable();
                                if waits.iter().all(|i| !running.borrow().contains(i)) {
                                    break;
                                }
                                if warned {
                                    n.await;
                                } else if tokio::time::timeout_at(began + TMF_SLOW, n).await.is_err() {
                                    warn!(%peer, function = t.function, tasks = ?waits, "task management still waiting for aborted commands to end");
                                    warned = true;
                                }
                            }
                            let code = match apply {
                                Some((target, nexus, f)) => {
                                    target.task_mgmt(&nexus, t.lun, f).await.code()
                                }
                                None => 5,
                            };
                            (t.itt, t.function, code)
                        }));
                    }
                    Event::Close(why) => {
                        match &why {
                            CloseReason::Logout => debug!(%peer, "logout"),
                            CloseReason::LoginFailed(
                                tessera_proto::iscsi::login::LoginFailure::Redirected,
                            ) => info!(%peer, "login redirected to the volume's owner"),
                            CloseReason::LoginFailed(f) => {
                                info!(%peer, "login failed: {f}");
                                if let Some(r) = failure_reason(f) {
                                    metrics::metrics()
                                        .iscsi_login_failures
                                        .with_label_values(&[r])
                                        .inc();
                                }
                            }
                            other => info!(%peer, "closing connection: {other:?}"),
                        }
                        closing = true;
                    }
                }
            }
            while let Some(Some((itt, c))) = inflight.next().now_or_never() {
                progress = true;
                ended_one(&running, &mut aborted, &ended, &mut conn, itt, c);
            }
            while let Some(Some((itt, function, code))) = tmfs.next().now_or_never() {
                progress = true;
                conn.complete_tmf(itt, function, code);
            }
            if !progress {
                break;
            }
        }
        match flush(&stream, conn.tx()) {
            Ok(_) => {}
            Err(e) => {
                debug!(%peer, "write: {e}");
                break;
            }
        }
        if (closing || conn.is_closed()) && conn.tx().is_empty() {
            break;
        }
        if *shutdown.borrow() && inflight.is_empty() && conn.tx().is_empty() {
            break;
        }
        let mut interest: Option<Interest> = None;
        if !closing && !*shutdown.borrow() && conn.tx().len() < TX_HIGH_WATER {
            interest = Some(Interest::READABLE);
        }
        if !conn.tx().is_empty() {
            interest = Some(interest.map_or(Interest::WRITABLE, |i| i | Interest::WRITABLE));
        }
        // The keep-alive deadline moves with every PDU; re-arming the timer each time would
        // cost a timer-wheel update per command. Arm it only when it must fire earlier than
        // it is set to; firing early is harmless (handle_timeout checks, then we re-arm).
        if let Some(d) = conn.poll_timeout() {
            if armed.is_none_or(|a| d < a) {
                armed = Some(d);
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            }
        }
        let kill = session
            .as_ref()
            .map_or(never.clone(), |s| s.registration.kill.clone());
        tokio::select! {
            biased;
            r = async { stream.ready(interest.expect("guarded")).await }, if interest.is_some() => {
                match r {
                    Ok(ready) if ready.is_readable() => {
                        let mut eof = false;
                        let mut read_some = false;
                        loop {
                            // Grow in large steps: growing moves the partial PDU at the
                            // end, so a step per 64 KiB read copied most of each burst.
                            // Grow only before the first read of a wake-up: growing a
                            // buffer nothing was cut from yet copies all of it, so a full
                            // buffer is handed to the connection first (the socket stays
                            // readable and the next turn reads on).
                            if rbuf.capacity() - rbuf.len() < 64 * 1024 {
                                if read_some {
                                    break;
                                }
                                rbuf.reserve(RECV_STEP);
                            }
                            read_some = true;
                            let room = rbuf.capacity() - rbuf.len();
                            match stream.try_read_buf(&mut rbuf) {
                                Ok(0) => { eof = true; break; }
                                Ok(n) if n < room => {
                                    // A short read drained the socket: clear the readiness
                                    // without another recv that would only say EAGAIN. The
                                    // next arrival raises a fresh edge.
                                    let _ = stream.try_io(Interest::READABLE, || {
                                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                                    });
                                    break;
                                }
                                Ok(_) => {}
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => { debug!(%peer, "read: {e}"); eof = true; break; }
                            }
                            if rbuf.len() >= 4 << 20 { break; }
                        }
                        conn.handle_input(&mut rbuf, Instant::now());
                        let st = conn.stats();
                        if st.digest_errors > digest_seen || st.rejects > rejects_seen {
                            let m = metrics::metrics();
                            m.iscsi_digest_errors.inc_by(st.digest_errors - digest_seen);
                            m.iscsi_rejects.inc_by(st.rejects - rejects_seen);
                            (digest_seen, rejects_seen) = (st.digest_errors, st.rejects);
                        }
                        if eof {
                            debug!(%peer, "peer closed the connection");
                            break 'outer;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => { debug!(%peer, "poll: {e}"); break 'outer; }
                }
            }
            Some((itt, c)) = inflight.next(), if !inflight.is_empty() => {
                ended_one(&running, &mut aborted, &ended, &mut conn, itt, c);
            }
            Some((itt, function, code)) = tmfs.next(), if !tmfs.is_empty() => {
                conn.complete_tmf(itt, function, code);
            }
            _ = &mut sleep, if armed.is_some() => {
                conn.handle_timeout(Instant::now());
                armed = None;
            }
            _ = kill.notified() => {
                info!(%peer, "session replaced by a new login");
                break 'outer;
            }
            _ = shutdown.changed() => {}
        }
    }
    // Commands still executing run to their end before the session is gone: a reinstated
    // session (which waits for this one) never overlaps them.
    drop(tmfs);
    if !inflight.is_empty() {
        debug!(%peer, commands = inflight.len(), "waiting for the connection's commands to end");
        let drain = async { while inflight.next().await.is_some() {} };
        if tokio::time::timeout(CLOSE_DRAIN, drain).await.is_err() {
            warn!(%peer, "commands of a closed connection still running after {CLOSE_DRAIN:?}");
        }
    }
    if let Some(s) = session.take() {
        s.target.nexus_gone(&s.nexus);
        gw.sessions.unregister(&s.registration);
        debug!(%peer, "session ended");
    }
}

/// A command ended: answer it unless a task management function aborted it, and wake the
/// functions waiting for it.
fn ended_one(
    running: &std::cell::RefCell<HashSet<u32>>,
    aborted: &mut HashSet<u32>,
    ended: &tokio::sync::Notify,
    conn: &mut Connection,
    itt: u32,
    c: Completion,
) {
    running.borrow_mut().remove(&itt);
    if aborted.remove(&itt) {
        ended.notify_waiters();
    } else {
        conn.complete(itt, c);
    }
}

fn command_future(s: &Session, c: Command) -> CmdFuture {
    let target = s.target.clone();
    let nexus = s.nexus.clone();
    let itt = c.itt();
    let Command { lun, cmd } = c;
    let lm = s
        .lun_metrics
        .borrow_mut()
        .entry(lun)
        .or_insert_with(|| Rc::new(LunMetrics::new(&s.target_name, Target::decode_lun(lun))))
        .clone();
    let kind = match cmd.cdb.first().copied().unwrap_or(0) {
        0x08 | 0x28 | 0xa8 | 0x88 => 0, // READ (6/10/12/16)
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0x8e | 0x89 => 1, // WRITE, WRITE AND VERIFY, COMPARE AND WRITE
        _ => 2,
    };
    let written = cmd.data_out.len() as u64;
    let started = Instant::now();
    lm.in_flight.inc();
    Box::pin(async move {
        let r = target.execute(&nexus, lun, &cmd).await;
        lm.in_flight.dec();
        lm.commands[kind].inc();
        lm.duration[kind].observe(started.elapsed().as_secs_f64());
        if written > 0 {
            lm.bytes[1].inc_by(written);
        }
        if !r.data_in.is_empty() {
            lm.bytes[0].inc_by(r.data_in.len() as u64);
        }
        if r.status == status::CHECK_CONDITION {
            lm.check_condition(r.sense.as_deref().unwrap_or(&[]));
        }
        (
            itt,
            Completion {
                status: r.status,
                sense: r.sense,
                data: r.data_in,
                transfer_len: r.transfer_len,
            },
        )
    })
}
