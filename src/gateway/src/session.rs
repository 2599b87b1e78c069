//! Live sessions, keyed by initiator name, ISID and target: what session reinstatement needs
//! (RFC 7143 §6.3.5: a login with the ISID of an existing session and TSIH 0 replaces it).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

/// Identity of a session for reinstatement.
pub type SessionKey = (String, [u8; 6], String);

#[derive(Debug)]
struct Entry {
    id: u64,
    kill: Arc<Notify>,
    done: watch::Receiver<()>,
    /// A duplicate of the session's socket, to see whether its peer has already hung up.
    socket: Option<OwnedFd>,
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
    ///
    /// `socket` is a duplicate of the session's connection socket (see [`Self::hung_up`]).
    pub fn register(
        &self,
        key: SessionKey,
        id: u64,
        socket: Option<OwnedFd>,
    ) -> (Registration, Option<Replaced>) {
        let kill = Arc::new(Notify::new());
        let (done, done_rx) = watch::channel(());
        let entry = Entry {
            id,
            kill: kill.clone(),
            done: done_rx,
            socket,
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

    /// The other sessions of `initiator` to `target` whose initiator has already closed its
    /// connection but whose teardown has not run yet (their worker has not read the end of
    /// the stream). A new login waits for them: the initiator dropped that I_T nexus before it
    /// logged in again, so what the nexus held (PREVENT MEDIUM REMOVAL, reservations) must be
    /// gone before the new session's first command, whichever worker each connection is on.
    pub fn hung_up(&self, initiator: &str, target: &str, except: u64) -> Vec<Replaced> {
        let (i, t) = (initiator.to_ascii_lowercase(), target.to_ascii_lowercase());
        self.inner
            .lock()
            .expect("session registry poisoned")
            .iter()
            .filter(|((ki, _, kt), e)| *ki == i && *kt == t && e.id != except)
            .filter(|(_, e)| e.socket.as_ref().is_some_and(peer_hung_up))
            .map(|(_, e)| e.done.clone())
            .collect()
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

/// Whether the peer of a connected socket has closed or reset it (checked without waiting).
fn peer_hung_up(fd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // nix names no POLLRDHUP (Linux: the peer shut down its writing half, i.e. sent its FIN),
    // and its revents() gives up on flags it does not know; asked for nothing else, the
    // descriptor is ready only with RDHUP, HUP or ERR (the flags poll always reports).
    let mut fds = [PollFd::new(
        fd.as_fd(),
        PollFlags::from_bits_retain(libc::POLLRDHUP),
    )];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
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
        let (a, none) = reg.register(key.clone(), 1, None);
        assert!(none.is_none());
        let (b, old) = reg.register(key, 2, None);
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

    #[test]
    fn a_session_whose_initiator_hung_up_is_waited_for() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let other_client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (other_server, _) = l.accept().unwrap();
        let reg = SessionRegistry::default();
        let dup = |s: &TcpStream| Some(s.as_fd().try_clone_to_owned().unwrap());
        let (old, _) = reg.register(("iqn.a".into(), [1; 6], "iqn.t".into()), 1, dup(&server));
        // The same initiator to another target, and another initiator: never waited for.
        let (_elsewhere, _) = reg.register(("iqn.a".into(), [1; 6], "iqn.u".into()), 2, None);
        let (_stranger, _) = reg.register(
            ("iqn.b".into(), [1; 6], "iqn.t".into()),
            3,
            dup(&other_server),
        );
        assert!(
            reg.hung_up("IQN.A", "iqn.t", 9).is_empty(),
            "its connection is open"
        );
        drop(client);
        drop(other_client);
        let mut waiting = Vec::new();
        for _ in 0..100 {
            waiting = reg.hung_up("IQN.A", "iqn.t", 9);
            if !waiting.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            waiting.len(),
            1,
            "the closed session of iqn.a to iqn.t, and only it"
        );
        assert!(
            reg.hung_up("iqn.a", "iqn.t", 1).is_empty(),
            "a session never waits for itself"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = waiting.pop().unwrap();
            let mut wait = std::pin::pin!(wait_gone(w));
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(50), &mut wait)
                    .await
                    .is_err(),
                "it is waited for until its teardown"
            );
            reg.unregister(&old);
            drop(old);
            tokio::time::timeout(std::time::Duration::from_secs(5), wait)
                .await
                .expect("the wait ends with the teardown");
        });
        drop(server);
    }
}
