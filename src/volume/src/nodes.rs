//! How a volume talks to its storage nodes: one [`NodeIo`] per node per thread, made by a
//! [`Connector`] the volume shares between threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tessera_proto::block::LocalBoxFuture;
use tessera_rpc::{CallError, Client, Request, Response};

/// One node, as seen from one thread.
pub trait NodeIo: 'static {
    /// Send a request and wait for its answer.
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Response, CallError>>;
}

/// Makes a thread's [`NodeIo`] for node `i` of the volume's node list.
pub trait Connector: Send + Sync + 'static {
    /// A handle to node `node` for the calling thread.
    fn connect(&self, node: usize) -> Rc<dyn NodeIo>;
    /// How many nodes there are.
    fn nodes(&self) -> usize;
}

/// Nodes reached over TCP with the fragment protocol. The list only grows ([`RpcConnector::push`]):
/// a volume's indices stay valid when its map later names new nodes.
#[derive(Debug)]
pub struct RpcConnector {
    addrs: std::sync::RwLock<Vec<SocketAddr>>,
    timeout: Duration,
}

impl RpcConnector {
    /// Nodes at `addrs`; calls time out after `timeout`.
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            addrs: std::sync::RwLock::new(addrs),
            timeout,
        }
    }

    /// Add a node; returns its index.
    pub fn push(&self, addr: SocketAddr) -> usize {
        let mut a = self.addrs.write().expect("connector poisoned");
        a.push(addr);
        a.len() - 1
    }
}

struct ClientIo(Client);

impl NodeIo for ClientIo {
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Response, CallError>> {
        let c = self.0.clone();
        Box::pin(async move { c.call(&req).await })
    }
}

impl Connector for RpcConnector {
    fn connect(&self, node: usize) -> Rc<dyn NodeIo> {
        let addr = self.addrs.read().expect("connector poisoned")[node];
        Rc::new(ClientIo(Client::new(addr, self.timeout)))
    }
    fn nodes(&self) -> usize {
        self.addrs.read().expect("connector poisoned").len()
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<(u64, usize), Rc<dyn NodeIo>>> = RefCell::new(HashMap::new());
}

/// The calling thread's handle to `node` for volume instance `instance`.
pub(crate) fn handle(instance: u64, connector: &dyn Connector, node: usize) -> Rc<dyn NodeIo> {
    HANDLES.with(|h| {
        h.borrow_mut()
            .entry((instance, node))
            .or_insert_with(|| connector.connect(node))
            .clone()
    })
}

/// Forget the calling thread's handles of `instance` (a closed volume).
pub(crate) fn forget(instance: u64) {
    HANDLES.with(|h| h.borrow_mut().retain(|(i, _), _| *i != instance));
}
