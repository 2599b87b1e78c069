//! Per-stripe reader/writer locks shared by every core.
//!
//! Writes (and repairs) of a stripe hold it exclusively; reads share it. Only stripes with
//! holders or waiters have an entry. A command that needs several stripes locks them in
//! ascending order, so two commands can never wait on each other in a cycle. A waiting writer
//! stops new readers from joining, so writers are not starved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
struct Entry {
    readers: usize,
    writer: bool,
    waiting_writers: usize,
    notify: Arc<Notify>,
}

/// The lock table of one volume.
#[derive(Default)]
pub struct StripeLocks {
    map: Mutex<HashMap<u64, Entry>>,
}

/// A held lock; released on drop.
pub struct StripeGuard<'a> {
    locks: &'a StripeLocks,
    stripe: u64,
    exclusive: bool,
}

impl StripeLocks {
    /// Lock `stripe` shared (`exclusive == false`) or exclusively. Cancel-safe: a dropped
    /// waiter leaves no trace.
    pub async fn lock(&self, stripe: u64, exclusive: bool) -> StripeGuard<'_> {
        let mut ticket = WriterTicket {
            locks: self,
            stripe,
            active: false,
        };
        loop {
            let notify = {
                let mut map = self.map.lock().expect("stripe lock table poisoned");
                let e = map.entry(stripe).or_default();
                if Self::free(e, exclusive) {
                    if exclusive {
                        e.writer = true;
                        if ticket.active {
                            e.waiting_writers -= 1;
                            ticket.active = false;
                        }
                    } else {
                        e.readers += 1;
                    }
                    return StripeGuard {
                        locks: self,
                        stripe,
                        exclusive,
                    };
                }
                if exclusive && !ticket.active {
                    e.waiting_writers += 1;
                    ticket.active = true;
                }
                e.notify.clone()
            };
            // Register for the wake-up, then check again: a release between the check above
            // and here would otherwise be missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let free_now = {
                let map = self.map.lock().expect("stripe lock table poisoned");
                map.get(&stripe).is_none_or(|e| Self::free(e, exclusive))
            };
            if !free_now {
                notified.await;
            }
        }
    }

    fn free(e: &Entry, exclusive: bool) -> bool {
        if exclusive {
            !e.writer && e.readers == 0
        } else {
            !e.writer && e.waiting_writers == 0
        }
    }

    /// Lock several stripes (ascending order, duplicates once).
    pub async fn lock_many(&self, stripes: &[u64], exclusive: bool) -> Vec<StripeGuard<'_>> {
        let mut s = stripes.to_vec();
        s.sort_unstable();
        s.dedup();
        let mut out = Vec::with_capacity(s.len());
        for st in s {
            out.push(self.lock(st, exclusive).await);
        }
        out
    }

    /// Stripes with an entry (for tests).
    pub fn len(&self) -> usize {
        self.map.lock().expect("stripe lock table poisoned").len()
    }

    /// Whether no stripe is locked or awaited.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StripeGuard<'_> {
    /// The stripe held.
    pub fn stripe(&self) -> u64 {
        self.stripe
    }
}

/// A writer's place in the queue, withdrawn if the waiting future is dropped.
struct WriterTicket<'a> {
    locks: &'a StripeLocks,
    stripe: u64,
    active: bool,
}

impl Drop for WriterTicket<'_> {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let mut map = self.locks.map.lock().expect("stripe lock table poisoned");
        let Some(e) = map.get_mut(&self.stripe) else {
            return;
        };
        e.waiting_writers -= 1;
        let notify = e.notify.clone();
        if !e.writer && e.readers == 0 && e.waiting_writers == 0 {
            map.remove(&self.stripe);
        }
        drop(map);
        notify.notify_waiters();
    }
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().expect("stripe lock table poisoned");
        let Some(e) = map.get_mut(&self.stripe) else {
            return;
        };
        if self.exclusive {
            e.writer = false;
        } else {
            e.readers -= 1;
        }
        let notify = e.notify.clone();
        if !e.writer && e.readers == 0 && e.waiting_writers == 0 {
            map.remove(&self.stripe);
        }
        drop(map);
        notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    use tessera_uring::testing::run;

    #[test]
    fn writers_exclude_everyone_readers_share() {
        run(async {
            let locks = Rc::new(StripeLocks::default());
            let log = Rc::new(RefCell::new(Vec::new()));
            let w = locks.lock(7, true).await;
            let mut tasks = Vec::new();
            for i in 0..3 {
                let (locks, log) = (locks.clone(), log.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let _g = locks.lock(7, false).await;
                    log.borrow_mut().push(format!("r{i}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(log.borrow().is_empty(), "readers wait for the writer");
            // Another stripe is independent.
            drop(locks.lock(8, true).await);
            drop(w);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(log.borrow().len(), 3);
            assert!(locks.is_empty(), "entries go away when free");
        });
    }

    #[test]
    fn a_waiting_writer_is_not_starved() {
        run(async {
            let locks = Rc::new(StripeLocks::default());
            let r1 = locks.lock(1, false).await;
            let l2 = locks.clone();
            let writer = tokio::task::spawn_local(async move {
                let _g = l2.lock(1, true).await;
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
            // A new reader queues behind the writer.
            let l3 = locks.clone();
            let reader = tokio::task::spawn_local(async move {
                let _g = l3.lock(1, false).await;
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(!reader.is_finished());
            drop(r1);
            writer.await.unwrap();
            reader.await.unwrap();
            let many = locks.lock_many(&[5, 3, 5, 4], true).await;
            let order: Vec<u64> = many.iter().map(StripeGuard::stripe).collect();
            assert_eq!(order, vec![3, 4, 5]);
        });
    }
}
