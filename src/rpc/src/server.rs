//! Serving the fragment protocol on a connection: frames in, a [`Handler`] per request,
//! answers out in completion order (requests pipeline; ids match them up).
//!
//! Backpressure: a connection has at most [`MAX_IN_FLIGHT`] requests executing; past that it
//! stops reading, so a client that floods a node is slowed by TCP, not by the node's memory.
//!
//! Each request runs as its own task: when the client goes away (a gateway crash), requests
//! already started still run to completion, as a disk write already issued would.
//! A malformed frame (bad magic, oversized length) ends the connection; a malformed body gets
//! a [`Status::BAD_REQUEST`] answer and the connection goes on.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::msg::{self, decode_frame, Op, Request, Response, Status};

/// Requests executing at once on one connection.
pub const MAX_IN_FLIGHT: usize = 256;

/// Why a request failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status.
    pub status: Status,
    /// Why (for the log and the client's error).
    pub reason: String,
    /// With [`Status::STALE_EPOCH`]: the node's epoch.
    pub epoch: u64,
}

impl Refusal {
    /// A refusal with a reason.
    pub fn new(status: Status, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            epoch: 0,
        }
    }
}

/// A boxed, thread-local future.
pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// What executes requests.
pub trait Handler: 'static {
    /// Execute one request.
    fn handle(&self, req: Request) -> LocalFuture<Result<Response, Refusal>>;
}

/// Serve `stream` until the peer closes it or `stop` resolves.
pub async fn serve<H: Handler>(
    handler: Rc<H>,
    stream: TcpStream,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let (mut rd, mut wr) = stream.into_split();
    let mut inbuf = BytesMut::with_capacity(256 * 1024);
    let mut outbuf: Vec<Bytes> = Vec::new();
    type Done = (Op, u64, Result<Response, Refusal>);
    let mut running: FuturesUnordered<tokio::task::JoinHandle<Done>> = FuturesUnordered::new();
    tokio::pin!(stop);
    let mut eof = false;
    loop {
        // Start every complete request in the buffer, up to the in-flight limit.
        while running.len() < MAX_IN_FLIGHT {
            match decode_frame(&mut inbuf) {
                Ok(Some(f)) => {
                    let (op, id) = (f.header.op, f.header.id);
                    if f.header.response {
                        error_frame(op, id, Status::BAD_REQUEST, "a response", 0, &mut outbuf);
                        continue;
                    }
                    match Request::decode(op, f.body) {
                        Ok(req) => {
                            let fut = handler.handle(req);
                            running
                                .push(tokio::task::spawn_local(async move { (op, id, fut.await) }));
                        }
                        Err(e) => {
                            let status = if matches!(e, msg::DecodeError::Invalid("opcode")) {
                                Status::UNSUPPORTED
                            } else {
                                Status::BAD_REQUEST
                            };
                            error_frame(op, id, status, &e.to_string(), 0, &mut outbuf);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(?peer, "dropping connection: {e}");
                    return Ok(());
                }
            }
        }
        // Collect whatever has finished without waiting.
        while let Some(Some(done)) = futures_util::FutureExt::now_or_never(running.next()) {
            if let Ok((op, id, r)) = done {
                answer(op, id, r, &mut outbuf);
            }
        }
        if !outbuf.is_empty() {
            crate::write_segments(&mut wr, std::mem::take(&mut outbuf)).await?;
        }
        if eof && running.is_empty() {
            return Ok(());
        }
        let can_read = !eof && running.len() < MAX_IN_FLIGHT;
        crate::make_room(&mut inbuf);
        tokio::select! {
            r = rd.read_buf(&mut inbuf), if can_read => {
                if r? == 0 {
                    eof = true;
                }
            }
            Some(done) = running.next(), if !running.is_empty() => {
                if let Ok((op, id, r)) = done {
                    answer(op, id, r, &mut outbuf);
                }
            }
            _ = &mut stop => return Ok(()),
        }
    }
}

fn answer(op: Op, id: u64, r: Result<Response, Refusal>, out: &mut Vec<Bytes>) {
    match r {
        Ok(resp) => resp.encode_vectored(op, id, out),
        Err(f) => error_frame(op, id, f.status, &f.reason, f.epoch, out),
    }
}

fn error_frame(op: Op, id: u64, status: Status, reason: &str, epoch: u64, out: &mut Vec<Bytes>) {
    let mut b = BytesMut::new();
    msg::encode_error(op, id, status, reason, epoch, &mut b);
    out.push(b.freeze());
}
