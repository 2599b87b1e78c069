//! Live sessions, keyed by initiator name, ISID and target: what session reinstatement needs
//! (RFC 7143 §6.3.5: a login with the ISID of an existing session and TSIH 0 replaces it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

/// Identity of a session for reinstatement.
pub type SessionKey = (String, [u8; 6], String);

#[derive(Debug)]
struct Entry {
    id: u64,
    kill: Arc<Notify>,
    done: watch::Receiver<()>,
}

/// The registry shared by all workers.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    inner: Mutex<HashMap<SessionKey, Entry>>,
}

/// What a connection keeps for its registration.
#[derive(Debug)]
pub struct Registration {
    /// Notified when a newer login with the same identity replaces this session.
    pub kill: Arc<Notify>,
    /// Dropped when the session is gone; waiters see it.
    pub done: watch::Sender<()>,
    key: SessionKey,
    id: u64,
}

/// A session being replaced: wait for it to finish.
pub type Replaced = watch::Receiver<()>;

impl SessionRegistry {
    /// Register session `id` under `key`. If a session with that identity exists it is told
    /// to end; the returned receiver completes once it has.
    pub fn register(&self, key: SessionKey, id: u64) -> (Registration, Option<Replaced>) {
        let kill = Arc::new(Notify::new());
        let (done, done_rx) = watch::channel(());
        let entry = Entry {
            id,
            kill: kill.clone(),
            done: done_rx,
        };
        let old = self
            .inner
            .lock()
            .expect("session registry poisoned")
            .insert(key.clone(), entry);
        let replaced = old.map(|o| {
            o.kill.notify_one();
            o.done
        });
        (
            Registration {
                kill,
                done,
                key,
                id,
            },
            replaced,
        )
    }

    /// Remove a registration (only if it is still the current one for its key).
    pub fn unregister(&self, r: &Registration) {
        let mut m = self.inner.lock().expect("session registry poisoned");
        if m.get(&r.key).is_some_and(|e| e.id == r.id) {
            m.remove(&r.key);
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("session registry poisoned").len()
    }

    /// No live sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The initiators (names as the key holds them, lowercase) with sessions to `target`,
    /// sorted, one entry per session.
    pub fn initiators(&self, target: &str) -> Vec<String> {
        let t = target.to_ascii_lowercase();
        let mut v: Vec<String> = self
            .inner
            .lock()
            .expect("session registry poisoned")
            .keys()
            .filter(|(_, _, tg)| *tg == t)
            .map(|(i, _, _)| i.clone())
            .collect();
        v.sort();
        v
    }
}

/// Wait until a replaced session has ended.
pub async fn wait_gone(mut r: Replaced) {
    // `changed` fails once the sender (the old session) is dropped.
    while r.changed().await.is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reinstatement_signals_the_old_session() {
        let reg = SessionRegistry::default();
        let key = ("iqn.a".to_string(), [1; 6], "iqn.t".to_string());
        let (a, none) = reg.register(key.clone(), 1);
        assert!(none.is_none());
        let (b, old) = reg.register(key, 2);
        let old = old.expect("the first session is replaced");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            // The old session sees the kill signal...
            a.kill.notified().await;
            // ...and the new one waits until it is gone.
            reg.unregister(&a);
            drop(a);
            wait_gone(old).await;
        });
        assert_eq!(reg.len(), 1, "unregistering the old one keeps the new one");
        assert_eq!(reg.initiators("IQN.T"), vec!["iqn.a".to_string()]);
        assert!(reg.initiators("iqn.other").is_empty());
        reg.unregister(&b);
        assert!(reg.is_empty());
    }
}
