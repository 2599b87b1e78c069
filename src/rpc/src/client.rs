//! A pipelined client for one node, bound to the calling thread's tokio runtime.
//!
//! Calls made while the connection is busy are queued in one send buffer and go out together
//! in the next write, so a burst of fragment requests from many commands costs one syscall per
//! wake-up, not one per request. Responses are matched to calls by request id. A broken
//! connection fails every call in flight; the next call reconnects. Every call has a deadline:
//! a call that misses it closes the connection (a node that does not answer one request is not
//! answering the others either), which fails the calls still in flight and frees every request
//! still queued. The queue is bounded: past [`MAX_PENDING`] calls or [`MAX_QUEUED_BYTES`] of
//! unsent requests, a call fails at once instead of queueing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tracing::debug;

use crate::msg::{self, decode_frame, Request, Response, Status};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection (refused, reset, closed).
    #[error("node {addr} unreachable: {reason}")]
    Unreachable {
        /// The node.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("node {0} did not answer in time")]
    Timeout(SocketAddr),
    /// The node refused the request for a stale fencing epoch.
    #[error("node {addr} refused epoch {sent}: it has seen epoch {current}")]
    StaleEpoch {
        /// The node.
        addr: SocketAddr,
        /// The epoch sent.
        sent: u64,
        /// The node's epoch.
        current: u64,
    },
    /// The node answered with an error status.
    #[error("node {addr}: {status}: {reason}")]
    Status {
        /// The node.
        addr: SocketAddr,
        /// Its status.
        status: Status,
        /// Its reason text.
        reason: String,
    },
    /// The answer did not decode.
    #[error("node {addr} sent a malformed answer: {reason}")]
    Protocol {
        /// The node.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

impl CallError {
    /// Whether the node itself is unavailable (as opposed to refusing this request).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CallError::Unreachable { .. } | CallError::Timeout(_))
    }
}

type Reply = oneshot::Sender<Result<Response, CallError>>;

/// The most calls one client has waiting for answers.
pub const MAX_PENDING: usize = 8192;
/// The most bytes of requests one client holds unsent.
pub const MAX_QUEUED_BYTES: usize = 256 << 20;

struct Conn {
    /// Encoded requests waiting to be written, as segments (fragment data is not copied).
    out: Vec<Bytes>,
    /// Bytes in `out`.
    out_bytes: usize,
    /// Tells the connection of the current generation to close (see [`fail_all`]).
    stop: Rc<Notify>,
    /// Calls waiting for an answer: id → (op, epoch sent, reply).
    pending: HashMap<u64, (msg::Op, u64, Reply)>,
    /// The connection's generation; bumped when it breaks.
    generation: u64,
    /// Whether a driver task is running for `generation`.
    running: bool,
}

struct Inner {
    addr: SocketAddr,
    timeout: Duration,
    next_id: RefCell<u64>,
    conn: RefCell<Conn>,
    wake: Notify,
}

/// A client for one node. Cheap to clone; `!Send` (one per thread). When the last clone is
/// dropped, its connection closes.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
    _closer: Rc<Closer>,
}

/// Closes the connection when the last [`Client`] clone goes (the connection's own task holds
/// only `Inner`).
struct Closer(Rc<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        let generation = self.0.conn.borrow().generation;
        fail_all(&self.0, generation, "the client was dropped");
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.inner.addr)
    }
}

impl Client {
    /// A client for the node at `addr`; it connects on first use.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        let inner = Rc::new(Inner {
            addr,
            timeout,
            next_id: RefCell::new(1),
            conn: RefCell::new(Conn {
                out: Vec::new(),
                out_bytes: 0,
                stop: Rc::new(Notify::new()),
                pending: HashMap::new(),
                generation: 0,
                running: false,
            }),
            wake: Notify::new(),
        });
        Self {
            _closer: Rc::new(Closer(inner.clone())),
            inner,
        }
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Send `req` and wait for the answer, at most the client's timeout. Must be called
    /// inside a `LocalSet`.
    pub async fn call(&self, req: &Request) -> Result<Response, CallError> {
        self.call_within(req, self.inner.timeout).await
    }

    /// Send `req` and wait for the answer, at most `timeout` (capped at the client's). A call
    /// that times out closes the connection. Dropping the returned future forgets the call
    /// (a late answer is discarded).
    pub async fn call_within(
        &self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let id = {
            let mut n = self.inner.next_id.borrow_mut();
            *n += 1;
            *n
        };
        let epoch = req.fencing().map_or(0, |(_, e)| e);
        let (tx, rx) = oneshot::channel();
        let generation = {
            let mut c = self.inner.conn.borrow_mut();
            if c.pending.len() >= MAX_PENDING || c.out_bytes >= MAX_QUEUED_BYTES {
                return Err(CallError::Unreachable {
                    addr: self.inner.addr,
                    reason: format!(
                        "too much queued for the node ({} calls, {} bytes unsent)",
                        c.pending.len(),
                        c.out_bytes
                    ),
                });
            }
            let before = c.out.len();
            req.encode_vectored(id, &mut c.out);
            c.out_bytes += c.out[before..].iter().map(Bytes::len).sum::<usize>();
            c.pending.insert(id, (req.op(), epoch, tx));
            if !c.running {
                c.running = true;
                let generation = c.generation;
                let inner = self.inner.clone();
                tokio::task::spawn_local(drive(inner, generation));
            }
            c.generation
        };
        let mut forget = Forget {
            inner: &self.inner,
            id,
            armed: true,
        };
        self.inner.wake.notify_waiters();
        let r = match tokio::time::timeout(timeout.min(self.inner.timeout), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Unreachable {
                addr: self.inner.addr,
                reason: "connection closed".into(),
            }),
            Err(_) => {
                // The node does not answer: close the connection (failing the other calls on
                // it, freeing what is queued); the next call connects again.
                fail_all(&self.inner, generation, "a request timed out");
                Err(CallError::Timeout(self.inner.addr))
            }
        };
        forget.armed = false;
        r
    }

    /// Calls waiting for an answer (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.inner.conn.borrow().pending.len()
    }
}

/// Forgets a call whose future is dropped before its answer came.
struct Forget<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut c) = self.inner.conn.try_borrow_mut() {
                c.pending.remove(&self.id);
            }
        }
    }
}

fn fail_all(inner: &Inner, generation: u64, reason: &str) {
    let mut c = inner.conn.borrow_mut();
    if c.generation != generation {
        return;
    }
    c.generation += 1;
    c.running = false;
    c.out.clear();
    c.out_bytes = 0;
    // The connection of that generation closes (its socket with it), whatever it waits for.
    c.stop.notify_one();
    c.stop = Rc::new(Notify::new());
    for (_, (_, _, tx)) in c.pending.drain() {
        let _ = tx.send(Err(CallError::Unreachable {
            addr: inner.addr,
            reason: reason.to_string(),
        }));
    }
}

async fn drive(inner: Rc<Inner>, generation: u64) {
    let stop = {
        let c = inner.conn.borrow();
        if c.generation != generation {
            return;
        }
        c.stop.clone()
    };
    let stream = match tokio::time::timeout(inner.timeout, TcpStream::connect(inner.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail_all(&inner, generation, &e.to_string()),
        Err(_) => return fail_all(&inner, generation, "connect timed out"),
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let reader = {
        let inner = inner.clone();
        async move {
            let mut buf = BytesMut::with_capacity(256 * 1024);
            loop {
                loop {
                    match decode_frame(&mut buf) {
                        Ok(Some(f)) => deliver(&inner, f),
                        Ok(None) => break,
                        Err(e) => return Err::<(), String>(format!("bad frame: {e}")),
                    }
                }
                crate::make_room(&mut buf);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => return Err("closed by the node".to_string()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    };
    let writer = {
        let inner = inner.clone();
        async move {
            loop {
                // Registered before looking at the queue: a call queued after the look wakes it.
                let woken = inner.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let chunk = {
                    let mut c = inner.conn.borrow_mut();
                    if c.generation != generation {
                        return Err::<(), String>("superseded".into());
                    }
                    c.out_bytes = 0;
                    std::mem::take(&mut c.out)
                };
                if chunk.is_empty() {
                    woken.await;
                    continue;
                }
                if let Err(e) = crate::write_segments(&mut wr, chunk).await {
                    return Err(e.to_string());
                }
            }
        }
    };
    let why = tokio::select! {
        r = reader => r.err().unwrap_or_default(),
        r = writer => r.err().unwrap_or_default(),
        () = stop.notified() => "closed by the client".to_string(),
    };
    debug!(addr = %inner.addr, "node connection ended: {why}");
    fail_all(&inner, generation, &why);
}

fn deliver(inner: &Inner, f: msg::Frame) {
    let Some((op, epoch, tx)) = inner.conn.borrow_mut().pending.remove(&f.header.id) else {
        return; // timed out already
    };
    let addr = inner.addr;
    let r = if f.header.op != op || !f.header.response {
        Err(CallError::Protocol {
            addr,
            reason: format!("answer of op {:?} to op {:?}", f.header.op, op),
        })
    } else if f.header.status == Status::STALE_EPOCH {
        Err(CallError::StaleEpoch {
            addr,
            sent: epoch,
            current: msg::stale_epoch_of(&f.body),
        })
    } else if f.header.status != Status::OK {
        Err(CallError::Status {
            addr,
            status: f.header.status,
            reason: String::from_utf8_lossy(&f.body).into_owned(),
        })
    } else {
        Response::decode(op, f.body).map_err(|e| CallError::Protocol {
            addr,
            reason: e.to_string(),
        })
    };
    let _ = tx.send(r);
}
