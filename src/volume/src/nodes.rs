//! How a volume talks to its storage nodes: one [`NodeIo`] per node per thread, made by a
//! [`Connector`] the volume shares between threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::block::LocalBoxFuture;
use tessera_rpc::{CallError, Client, Op, Request, Response};

/// One node, as seen from one thread.
pub trait NodeIo: 'static {
    /// Send a request and wait for its answer.
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Response, CallError>>;

    /// Send a request and wait for its answer at most `timeout` ([`CallError::Timeout`]
    /// after it). A connection-based handle closes the connection on a timeout.
    fn call_within(
        &self,
        req: Request,
        timeout: Duration,
    ) -> LocalBoxFuture<'static, Result<Response, CallError>> {
        let f = self.call(req);
        Box::pin(async move {
            tokio::time::timeout(timeout, f)
                .await
                .unwrap_or(Err(CallError::Timeout(SocketAddr::from(([0, 0, 0, 0], 0)))))
        })
    }
}

/// Makes a thread's [`NodeIo`] for node `i` of the volume's node list.
pub trait Connector: Send + Sync + 'static {
    /// A handle to node `node` for the calling thread.
    fn connect(&self, node: usize) -> Rc<dyn NodeIo>;
    /// How many nodes there are.
    fn nodes(&self) -> usize;
}

/// Told of every call made through an [`RpcConnector`] (for metrics): the node, the
/// operation, how long the answer took and whether the call failed. Called on the I/O
/// threads: keep it to atomics.
pub trait CallObserver: Send + Sync + 'static {
    /// One finished call.
    fn observe(&self, addr: SocketAddr, op: Op, elapsed: Duration, result: Result<(), &CallError>);
}

/// Nodes reached over TCP with the fragment protocol. The list only grows ([`RpcConnector::push`]):
/// a volume's indices stay valid when its map later names new nodes.
pub struct RpcConnector {
    addrs: std::sync::RwLock<Vec<SocketAddr>>,
    timeout: Duration,
    observer: Option<Arc<dyn CallObserver>>,
}

impl std::fmt::Debug for RpcConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcConnector")
            .field("addrs", &self.addrs)
            .field("timeout", &self.timeout)
            .field("observed", &self.observer.is_some())
            .finish()
    }
}

impl RpcConnector {
    /// Nodes at `addrs`; calls time out after `timeout`.
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            addrs: std::sync::RwLock::new(addrs),
            timeout,
            observer: None,
        }
    }

    /// Tell `observer` of every call.
    pub fn observed(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
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

    fn call_within(
        &self,
        req: Request,
        timeout: Duration,
    ) -> LocalBoxFuture<'static, Result<Response, CallError>> {
        let c = self.0.clone();
        Box::pin(async move { c.call_within(&req, timeout).await })
    }
}

struct ObservedIo(Client, Arc<dyn CallObserver>);

impl NodeIo for ObservedIo {
    fn call(&self, req: Request) -> LocalBoxFuture<'static, Result<Response, CallError>> {
        let timeout = Duration::MAX;
        self.call_within(req, timeout)
    }

    fn call_within(
        &self,
        req: Request,
        timeout: Duration,
    ) -> LocalBoxFuture<'static, Result<Response, CallError>> {
        let (c, o) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            let op = req.op();
            let started = Instant::now();
            let r = c.call_within(&req, timeout).await;
            o.observe(c.addr(), op, started.elapsed(), r.as_ref().map(|_| ()));
            r
        })
    }
}

impl Connector for RpcConnector {
    fn connect(&self, node: usize) -> Rc<dyn NodeIo> {
        let addr = self.addrs.read().expect("connector poisoned")[node];
        let client = Client::new(addr, self.timeout);
        match &self.observer {
            Some(o) => Rc::new(ObservedIo(client, o.clone())),
            None => Rc::new(ClientIo(client)),
        }
    }
    fn nodes(&self) -> usize {
        self.addrs.read().expect("connector poisoned").len()
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<(u64, usize), Rc<dyn NodeIo>>> = RefCell::new(HashMap::new());
    /// The last [`CLOSED`] generation this thread has swept.
    static SWEPT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Volume instances closed recently, with the generation each was closed at: every thread
/// drops its handles of them at its next [`handle`] or [`sweep`]. The most recent
/// [`CLOSED_KEPT`] are kept (a thread sweeps at least every second in the gateway).
static CLOSED: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
static CLOSED_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const CLOSED_KEPT: usize = 1 << 16;

/// The calling thread's handle to `node` for volume instance `instance`.
pub(crate) fn handle(instance: u64, connector: &dyn Connector, node: usize) -> Rc<dyn NodeIo> {
    sweep();
    HANDLES.with(|h| {
        h.borrow_mut()
            .entry((instance, node))
            .or_insert_with(|| connector.connect(node))
            .clone()
    })
}

/// Forget every thread's handles of `instance` (a closed volume): this thread's now, the
/// others' at their next [`handle`] or [`sweep`]. A handle's connection closes when it is
/// dropped.
pub(crate) fn forget(instance: u64) {
    HANDLES.with(|h| h.borrow_mut().retain(|(i, _), _| *i != instance));
    let mut c = CLOSED.lock().expect("closed volumes poisoned");
    let g = CLOSED_GEN.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
    c.push_back((g, instance));
    while c.len() > CLOSED_KEPT {
        c.pop_front();
    }
}

/// Drop the calling thread's handles of volumes closed since its last sweep (cheap when
/// nothing was closed). Threads that serve volumes call it now and then, so that handles of
/// closed volumes never linger on a thread that no longer uses them.
pub fn sweep() {
    let now = CLOSED_GEN.load(std::sync::atomic::Ordering::Acquire);
    let last = SWEPT.with(std::cell::Cell::get);
    if now == last {
        return;
    }
    SWEPT.with(|s| s.set(now));
    let gone: Vec<u64> = {
        let c = CLOSED.lock().expect("closed volumes poisoned");
        c.iter()
            .filter(|(g, _)| *g > last)
            .map(|(_, i)| *i)
            .collect()
    };
    if gone.is_empty() {
        return;
    }
    HANDLES.with(|h| h.borrow_mut().retain(|(i, _), _| !gone.contains(i)));
}

/// Handles the calling thread holds (for tests).
pub fn handles_on_this_thread() -> usize {
    HANDLES.with(|h| h.borrow().len())
}
