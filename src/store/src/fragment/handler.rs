//! The fragment protocol served from a [`FragmentStore`]: fencing first, then the op.

use std::rc::Rc;

use tessera_rpc::server::LocalFuture;
use tessera_rpc::{Handler, Refusal, Request, Response, Status};
use tokio::sync::Semaphore;

use super::FragmentStore;

/// Bytes of request data a node holds at once across every connection; a request waits for
/// its share before it runs (and its connection stops reading meanwhile).
pub const MEMORY_BUDGET: usize = 256 << 20;

/// Serves requests from a store. Cheap to share between connections (one per node thread).
pub struct NodeHandler {
    store: FragmentStore,
    budget: Rc<Semaphore>,
    inflight: Rc<std::cell::Cell<usize>>,
    /// Bytes a second for scrubs asked for over the protocol (0: unlimited).
    pub scrub_rate: u64,
}

impl NodeHandler {
    /// A handler over `store`.
    pub fn new(store: FragmentStore) -> Self {
        Self {
            store,
            budget: Rc::new(Semaphore::new(MEMORY_BUDGET >> 12)),
            inflight: Rc::default(),
            scrub_rate: 0,
        }
    }

    /// The store.
    pub fn store(&self) -> &FragmentStore {
        &self.store
    }

    /// Requests running now.
    pub fn in_flight(&self) -> usize {
        self.inflight.get()
    }
}

fn weight(req: &Request) -> u32 {
    let bytes: usize = match req {
        Request::Write { items, .. } => items.iter().map(|i| i.data.len()).sum(),
        // A swap also holds the replaced bytes.
        Request::Swap { items, .. } => items.iter().map(|i| 2 * i.data.len()).sum(),
        // What a read will hold: its chunks, read whole.
        Request::Read { vol, items } => items.len() * (vol.chunk as usize + 4096),
        Request::PutBlob { data, .. } => data.len(),
        _ => 0,
    };
    // In 4 KiB units, at least one, at most the whole budget.
    bytes.div_ceil(4096).clamp(1, MEMORY_BUDGET >> 12) as u32
}

impl Handler for NodeHandler {
    fn handle(&self, req: Request) -> LocalFuture<Result<Response, Refusal>> {
        let store = self.store.clone();
        let budget = self.budget.clone();
        let scrub_rate = self.scrub_rate;
        let inflight = self.inflight.clone();
        inflight.set(inflight.get() + 1);
        Box::pin(async move {
            struct Done(Rc<std::cell::Cell<usize>>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.set(self.0.get() - 1);
                }
            }
            let _done = Done(inflight);
            let _permit = budget
                .acquire_many(weight(&req))
                .await
                .map_err(|_| Refusal::new(Status::BUSY, "shutting down"))?;
            // Epoch 0 is no writer's: an observer (a scrub from outside the owner) may read
            // with it, without moving the volume's epoch, and never write.
            match req.fencing() {
                Some((_, 0)) if req.is_read_only() => {}
                Some((_, 0)) => {
                    return Err(Refusal::new(Status::BAD_REQUEST, "epoch 0 may only read"))
                }
                Some((volume, epoch)) => store.check_epoch(volume, epoch).await?,
                None => {}
            }
            Ok(match req {
                Request::Hello { client } => {
                    tracing::debug!(%client, "hello");
                    Response::Hello {
                        node_id: store.node_id().to_string(),
                        capacity: store.capacity(),
                    }
                }
                Request::Write { vol, items } => Response::Write(store.write(&vol, items).await?),
                Request::Swap { vol, items } => Response::Swap(store.swap(&vol, items).await?),
                Request::Read { vol, items } => Response::Read(store.read(&vol, items).await),
                Request::Versions { vol, first, count } => Response::Versions(
                    store
                        .versions(&vol, first, count)
                        .await
                        .map_err(|s| Refusal::new(s, "reading versions"))?,
                ),
                Request::Revert { vol, items } => {
                    Response::Revert(store.revert(&vol, items).await?)
                }
                Request::Trim { vol, items } => Response::Trim(store.trim(&vol, items).await?),
                Request::Stats => Response::Stats(store.stats()),
                Request::Epoch { volume, epoch } => {
                    Response::Epoch(store.raise_epoch(volume, epoch).await?)
                }
                Request::Scrub => Response::Scrub(store.scrub(scrub_rate).await),
                Request::ScrubStatus => Response::ScrubStatus(store.scrub_progress()),
                Request::PutBlob {
                    volume,
                    name,
                    seq,
                    data,
                    ..
                } => {
                    store.put_blob(volume, name, seq, data).await?;
                    Response::PutBlob
                }
                Request::GetBlob { volume, name } => {
                    let (seq, data) = store.get_blob(volume, name);
                    Response::GetBlob { seq, data }
                }
            })
        })
    }
}
