//! The fragment protocol between gateways and storage nodes.
//!
//! [`msg`] is the wire format, sans IO (see its docs for the frame layout). [`client`] and
//! [`server`] move it over TCP with tokio, one runtime per thread: a client is bound to the
//! thread that made it, and pipelines and batches the calls made on that thread.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod msg;
pub mod server;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

/// How much a receive buffer grows by at a time.
///
/// Frames are split off the front of a receive buffer and keep its allocation alive while
/// their requests run, so growing it means a new allocation and a copy of the partial frame
/// at its end. Growing in large steps makes that copy rare: about once per `RECV_STEP`
/// received, not once per frame (with 256 KiB steps, nearly every large write frame was
/// copied once more). The price is memory: a step stays allocated until every frame split
/// from it is dropped, so a busy connection holds a few MiB while its requests run.
pub(crate) const RECV_STEP: usize = 1 << 20;

/// Make room for the next read into `buf`.
pub(crate) fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 64 * 1024 {
        buf.reserve(RECV_STEP);
    }
}

/// Write every segment with vectored writes (at most 256 a call), however the socket splits
/// them.
pub(crate) async fn write_segments<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    segs: Vec<Bytes>,
) -> std::io::Result<()> {
    let mut q: VecDeque<Bytes> = segs.into_iter().filter(|s| !s.is_empty()).collect();
    while !q.is_empty() {
        let slices: Vec<IoSlice<'_>> = q.iter().take(256).map(|b| IoSlice::new(b)).collect();
        let mut n = w.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let front = q.front_mut().expect("written bytes belong to a segment");
            if n >= front.len() {
                n -= front.len();
                q.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

pub use client::{CallError, Client};
pub use msg::{
    FragKey, Manifest, NodeStats, Op, ReadItem, ReadResult, Request, Response, ScrubProgress,
    ScrubReport, SlotInfo, Status, VersionEntry, VolumeCtx, Want, WriteItem,
};
pub use server::{Handler, Refusal};

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::server::LocalFuture;
    use super::*;

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, req: Request) -> LocalFuture<Result<Response, Refusal>> {
            Box::pin(async move {
                match req {
                    Request::Epoch { epoch, .. } if epoch < 5 => Err(Refusal {
                        status: Status::STALE_EPOCH,
                        reason: String::new(),
                        epoch: 5,
                    }),
                    Request::Epoch { epoch, .. } => {
                        // Answer out of order: later epochs answer sooner.
                        tokio::time::sleep(Duration::from_millis(100 - epoch.min(100))).await;
                        Ok(Response::Epoch(epoch))
                    }
                    Request::GetBlob { .. } => Ok(Response::GetBlob {
                        seq: 1,
                        data: Bytes::from(vec![9u8; 1 << 20]),
                    }),
                    Request::Stats => Err(Refusal::new(Status::IO_ERROR, "disk on fire")),
                    _ => Err(Refusal::new(Status::UNSUPPORTED, "no")),
                }
            })
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    /// A listener on a free loopback port, and its address.
    async fn listener() -> (tokio::net::TcpListener, std::net::SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    #[test]
    fn pipelined_calls_over_tcp() {
        run(async {
            let (l, addr) = listener().await;
            tokio::task::spawn_local(async move {
                loop {
                    let (s, _) = l.accept().await.unwrap();
                    tokio::task::spawn_local(server::serve(
                        Rc::new(Echo),
                        s,
                        std::future::pending(),
                    ));
                }
            });
            let c = Client::new(addr, Duration::from_secs(5));
            // Many calls at once, answered out of order.
            let calls: Vec<_> = (5..60u64)
                .map(|e| {
                    let c = c.clone();
                    async move {
                        c.call(&Request::Epoch {
                            volume: 1,
                            epoch: e,
                        })
                        .await
                    }
                })
                .collect();
            let got = futures_util::future::join_all(calls).await;
            for (e, r) in (5..60u64).zip(got) {
                assert_eq!(r.unwrap(), Response::Epoch(e));
            }
            // Errors arrive as errors.
            let r = c
                .call(&Request::Epoch {
                    volume: 1,
                    epoch: 2,
                })
                .await;
            assert!(
                matches!(r, Err(CallError::StaleEpoch { current: 5, .. })),
                "{r:?}"
            );
            let r = c.call(&Request::Stats).await;
            assert!(
                matches!(
                    r,
                    Err(CallError::Status {
                        status: Status::IO_ERROR,
                        ..
                    })
                ),
                "{r:?}"
            );
            // A large answer.
            match c
                .call(&Request::GetBlob { volume: 1, name: 0 })
                .await
                .unwrap()
            {
                Response::GetBlob { data, .. } => assert_eq!(data.len(), 1 << 20),
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn unreachable_nodes_fail_fast_and_recover() {
        run(async {
            // A port nothing listens on.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            let c = Client::new(addr, Duration::from_secs(2));
            let r = c.call(&Request::Stats).await;
            assert!(matches!(r, Err(CallError::Unreachable { .. })), "{r:?}");
            assert!(r.unwrap_err().is_unavailable());
            // Now it comes up on that port.
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            tokio::task::spawn_local(async move {
                let (s, _) = l.accept().await.unwrap();
                server::serve(Rc::new(Echo), s, std::future::pending())
                    .await
                    .unwrap();
            });
            let r = c
                .call(&Request::Epoch {
                    volume: 1,
                    epoch: 99,
                })
                .await;
            assert_eq!(r.unwrap(), Response::Epoch(99));
        });
    }

    #[test]
    fn a_silent_node_times_out() {
        run(async {
            let (l, addr) = listener().await;
            // Accepts, never answers.
            tokio::task::spawn_local(async move {
                let (_s, _) = l.accept().await.unwrap();
                std::future::pending::<()>().await;
            });
            let c = Client::new(addr, Duration::from_millis(300));
            let r = c.call(&Request::Stats).await;
            assert_eq!(r, Err(CallError::Timeout(addr)));
        });
    }

    /// A node that accepts and reads but never answers (a hung process): a call that misses
    /// its deadline closes the connection, failing the calls in flight with it and freeing
    /// what was queued; a call whose future is dropped is forgotten; the next call connects
    /// again; and the queue has a bound.
    #[test]
    fn a_hung_node_costs_one_deadline_and_leaves_nothing_behind() {
        run(async {
            let (l, addr) = listener().await;
            let accepted = Rc::new(std::cell::Cell::new(0u32));
            let closed = Rc::new(std::cell::Cell::new(0u32));
            {
                let (accepted, closed) = (accepted.clone(), closed.clone());
                tokio::task::spawn_local(async move {
                    loop {
                        let (mut s, _) = l.accept().await.unwrap();
                        accepted.set(accepted.get() + 1);
                        let closed = closed.clone();
                        tokio::task::spawn_local(async move {
                            use tokio::io::AsyncReadExt;
                            let mut b = vec![0u8; 1 << 16];
                            while s.read(&mut b).await.is_ok_and(|n| n > 0) {}
                            closed.set(closed.get() + 1);
                        });
                    }
                });
            }
            let c = Client::new(addr, Duration::from_secs(30));
            let stats = || Request::Stats;
            // Several calls in flight, one with a short deadline.
            let slow: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    tokio::task::spawn_local(async move { c.call(&stats()).await })
                })
                .collect();
            tokio::task::yield_now().await;
            let t = std::time::Instant::now();
            let r = c.call_within(&stats(), Duration::from_millis(200)).await;
            assert_eq!(r, Err(CallError::Timeout(addr)));
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            for h in slow {
                let r = h.await.unwrap();
                assert!(matches!(r, Err(CallError::Unreachable { .. })), "{r:?}");
            }
            assert_eq!(c.pending(), 0);
            // The hung connection is closed.
            for _ in 0..100 {
                if closed.get() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(closed.get(), 1, "the timed-out connection was closed");
            // A dropped call is forgotten.
            {
                let req = stats();
                let f = c.call(&req);
                let _ = tokio::time::timeout(Duration::from_millis(50), f).await;
            }
            assert_eq!(c.pending(), 0, "a dropped call left an entry");
            assert_eq!(accepted.get(), 2, "the next call connected again");
            // The bound: past MAX_PENDING waiting calls, a call fails at once.
            let many: Vec<_> = (0..client::MAX_PENDING)
                .map(|_| {
                    let c = c.clone();
                    tokio::task::spawn_local(async move {
                        c.call_within(&stats(), Duration::from_secs(5)).await
                    })
                })
                .collect();
            for _ in 0..10_000 {
                if c.pending() == client::MAX_PENDING {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(c.pending(), client::MAX_PENDING);
            let r = c.call(&stats()).await;
            assert!(
                matches!(&r, Err(CallError::Unreachable { reason, .. }) if reason.contains("too much queued")),
                "{r:?}"
            );
            for h in many {
                h.abort();
            }
        });
    }
}
