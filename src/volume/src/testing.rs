//! Storage nodes inside the test process: real fragment stores on files (tmpfs in tests),
//! called without TCP, with faults on demand (a node down, a node restarted from its disk).
//! Each request runs as its own task, as in a node process, so a caller that gives up (a
//! "crashed" gateway) does not cut a node's work short.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tessera_proto::block::LocalBoxFuture;
use tessera_rpc::{CallError, Handler, Request, Response, Status};
use tessera_store::fragment::{FragmentStore, NodeHandler, StoreOptions};

use crate::nodes::{Connector, NodeIo};

/// Fault switches of one node, shared with the test.
#[derive(Debug, Default)]
pub struct NodeFaults {
    /// Every call fails as if the node were unreachable.
    pub down: AtomicBool,
    /// Incremented to make the node reopen its store from disk on the next call (a restart).
    pub restarts: AtomicU64,
    /// Calls that reached the node.
    pub calls: AtomicU64,
    /// Every call waits and is never answered (a hung process: connections open, no answers).
    pub hung: AtomicBool,
    /// Calls that reached the node while it was hung.
    pub hung_calls: AtomicU64,
}

/// A set of in-process nodes.
pub struct LocalNodes {
    paths: Vec<PathBuf>,
    faults: Vec<Arc<NodeFaults>>,
}

impl LocalNodes {
    /// `n` nodes whose stores are files in `dir`.
    pub fn new(dir: &std::path::Path, n: usize) -> Arc<Self> {
        Arc::new(Self {
            paths: (0..n).map(|i| dir.join(format!("node{i}.store"))).collect(),
            faults: (0..n).map(|_| Arc::default()).collect(),
        })
    }

    /// Node `i`'s fault switches.
    pub fn faults(&self, i: usize) -> &NodeFaults {
        &self.faults[i]
    }

    /// Take node `i` down or bring it back.
    pub fn set_down(&self, i: usize, down: bool) {
        self.faults[i].down.store(down, Ordering::SeqCst);
    }

    /// Hang node `i` (calls are never answered) or let it go on.
    pub fn set_hung(&self, i: usize, hung: bool) {
        self.faults[i].hung.store(hung, Ordering::SeqCst);
    }

    /// Restart node `i`: its next call reopens the store from disk.
    pub fn restart(&self, i: usize) {
        self.faults[i].restarts.fetch_add(1, Ordering::SeqCst);
    }

    /// Node `i`'s store on the calling thread.
    pub fn store(&self, i: usize) -> FragmentStore {
        open(
            &self.paths[i],
            i,
            self.faults[i].restarts.load(Ordering::SeqCst),
        )
        .store()
        .clone()
    }

    /// The path of node `i`'s store.
    pub fn path(&self, i: usize) -> &PathBuf {
        &self.paths[i]
    }
}

thread_local! {
    static OPEN: RefCell<HashMap<PathBuf, (u64, Rc<NodeHandler>)>> = RefCell::new(HashMap::new());
}

fn open(path: &PathBuf, i: usize, generation: u64) -> Rc<NodeHandler> {
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        if let Some((g, h)) = o.get(path) {
            if *g == generation {
                return h.clone();
            }
        }
        let opts = StoreOptions {
            node_id: format!("node-{i}"),
            ..StoreOptions::default()
        };
        let store = FragmentStore::open(path, &opts).expect("open test node store");
        let h = Rc::new(NodeHandler::new(store));
        o.insert(path.clone(), (generation, h.clone()));
        h
    })
}

struct LocalIo {
    nodes: Arc<LocalNodes>,
    i: usize,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000 + i as u16))
}

impl NodeIo for LocalIo {
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Response, CallError>> {
        let nodes = self.nodes.clone();
        let i = self.i;
        Box::pin(async move {
            let f = &nodes.faults[i];
            if f.down.load(Ordering::SeqCst) {
                return Err(CallError::Unreachable {
                    addr: addr(i),
                    reason: "node is down (test)".into(),
                });
            }
            if f.hung.load(Ordering::SeqCst) {
                f.hung_calls.fetch_add(1, Ordering::Relaxed);
                // Received and never answered (nor executed): the caller's deadline decides.
                std::future::pending::<()>().await;
            }
            f.calls.fetch_add(1, Ordering::Relaxed);
            let h = open(&nodes.paths[i], i, f.restarts.load(Ordering::SeqCst));
            let epoch = req.fencing().map_or(0, |(_, e)| e);
            let task = tokio::task::spawn_local(h.handle(req));
            match task.await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(refusal)) if refusal.status == Status::STALE_EPOCH => {
                    Err(CallError::StaleEpoch {
                        addr: addr(i),
                        sent: epoch,
                        current: refusal.epoch,
                    })
                }
                Ok(Err(refusal)) => Err(CallError::Status {
                    addr: addr(i),
                    status: refusal.status,
                    reason: refusal.reason,
                }),
                Err(e) => Err(CallError::Unreachable {
                    addr: addr(i),
                    reason: format!("node task failed: {e}"),
                }),
            }
        })
    }
}

impl Connector for Arc<LocalNodes> {
    fn connect(&self, node: usize) -> Rc<dyn NodeIo> {
        Rc::new(LocalIo {
            nodes: self.clone(),
            i: node,
        })
    }
    fn nodes(&self) -> usize {
        self.paths.len()
    }
}
