//! [`Meta`] in the process: etcd's semantics (revisions, leases that expire, guarded
//! transactions, an election, watches) on a map, for unit tests of everything above the store.
//!
//! Every [`Memory::client`] of one store shares its keys and leases but can be cut off on its
//! own ([`Memory::set_reachable`]): a partitioned gateway sees every call fail while the others
//! go on. Leases expire on tokio's clock (`tokio::time::Instant`), so tests may pause and
//! advance time. Expiry is checked at every call and by waiting watchers and campaigns (every
//! 50 ms), as etcd's own lessor does on its own.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::meta::{renew_period, Changes, Cmp, Kv, Meta, Op, Txn, TxnResult};
use crate::{ClusterError, Result};

/// How often waiting watchers and campaigns look for expired leases.
const TICK: Duration = Duration::from_millis(50);
/// Changes remembered for watchers that fall behind (older ones: a watcher just wakes).
const LOG: usize = 4096;

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
}

#[derive(Debug, Default)]
struct State {
    keys: BTreeMap<String, Entry>,
    revision: i64,
    /// Live leases: TTL (seconds) and when they expire unless renewed.
    leases: HashMap<i64, (i64, Instant)>,
    next_lease: i64,
    /// (revision, key) of recent changes, oldest first.
    log: VecDeque<(i64, String)>,
}

impl State {
    fn changed(&mut self, key: &str) {
        self.log.push_back((self.revision, key.to_string()));
        while self.log.len() > LOG {
            self.log.pop_front();
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: i64) {
        self.revision += 1;
        let rev = self.revision;
        let create = self.keys.get(key).map_or(rev, |e| e.create_revision);
        self.keys.insert(
            key.to_string(),
            Entry {
                value,
                create_revision: create,
                mod_revision: rev,
                lease,
            },
        );
        self.changed(key);
    }

    fn delete(&mut self, key: &str) {
        if self.keys.remove(key).is_some() {
            self.revision += 1;
            self.changed(key);
        }
    }

    fn delete_prefix(&mut self, prefix: &str) {
        let gone: Vec<String> = self
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.delete(&k);
        }
    }

    fn drop_lease(&mut self, lease: i64) {
        self.leases.remove(&lease);
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == lease)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.delete(&k);
        }
    }

    /// Drop the leases whose time is up, with their keys.
    fn expire(&mut self) {
        let now = Instant::now();
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.drop_lease(id);
        }
    }

    fn kv(&self, key: &str) -> Option<Kv> {
        self.keys.get(key).map(|e| Kv {
            key: key.as_bytes().to_vec(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
            lease: e.lease,
        })
    }

    fn holds(&self, c: &Cmp) -> bool {
        match c {
            Cmp::Absent(k) => !self.keys.contains_key(k),
            Cmp::Present(k) => self.keys.contains_key(k),
            Cmp::ModRevision(k, rev) => self.keys.get(k).is_some_and(|e| e.mod_revision == *rev),
            Cmp::Lease(k, lease) => self.keys.get(k).is_some_and(|e| e.lease == *lease),
        }
    }

    fn check_lease(&self, lease: Option<i64>) -> Result<i64> {
        match lease {
            None => Ok(0),
            Some(l) if self.leases.contains_key(&l) => Ok(l),
            Some(l) => Err(ClusterError::Invalid(format!(
                "requested lease {l:x} not found"
            ))),
        }
    }

    /// The leader of `election`: its key with the lowest create revision.
    fn leader(&self, election: &str) -> Option<(String, Vec<u8>)> {
        let prefix = format!("{election}/");
        self.keys
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .min_by_key(|(_, e)| e.create_revision)
            .map(|(k, e)| (k.clone(), e.value.clone()))
    }
}

struct Shared {
    state: Mutex<State>,
    /// The store's revision, for watchers.
    revision: watch::Sender<i64>,
}

/// An in-memory store; clone it or call [`Memory::client`] for more clients of the same one.
#[derive(Clone)]
pub struct Memory {
    shared: Arc<Shared>,
    reachable: Arc<AtomicBool>,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("reachable", &self.reachable.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Memory {
    /// An empty store, and its first client.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    next_lease: 0x7e55_0000,
                    ..State::default()
                }),
                revision: watch::channel(0).0,
            }),
            reachable: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Another client of the same store, reachable on its own.
    pub fn client(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            reachable: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Cut this client off from the store (every call fails at once, keep-alives stop
    /// renewing), or connect it again.
    pub fn set_reachable(&self, yes: bool) {
        self.reachable.store(yes, Ordering::Relaxed);
    }

    /// End `lease` now, as if its TTL had passed unrenewed: its keys go.
    pub fn expire_lease(&self, lease: i64) {
        let mut s = self.lock();
        s.drop_lease(lease);
        self.publish(&s);
    }

    /// The live leases.
    pub fn leases(&self) -> Vec<i64> {
        let mut s = self.lock();
        s.expire();
        self.publish(&s);
        let mut l: Vec<i64> = s.leases.keys().copied().collect();
        l.sort_unstable();
        l
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, s: &State) {
        self.shared.revision.send_if_modified(|r| {
            let new = *r != s.revision;
            *r = s.revision;
            new
        });
    }

    /// The state, with expired leases dropped, if this client can reach the store.
    fn reach(&self) -> Result<MutexGuard<'_, State>> {
        if !self.reachable.load(Ordering::Relaxed) {
            return Err(ClusterError::Invalid(
                "the store is unreachable from this client".into(),
            ));
        }
        let mut s = self.lock();
        s.expire();
        Ok(s)
    }

    /// Run `f` on the reachable state and tell watchers what it changed.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut s = self.reach()?;
        let r = f(&mut s);
        self.publish(&s);
        r
    }
}

struct MemChanges {
    store: Memory,
    prefix: String,
    seen: i64,
    rx: watch::Receiver<i64>,
}

impl Changes for MemChanges {
    fn changed(&mut self) -> BoxFuture<'_, Result<()>> {
        async move {
            loop {
                {
                    let mut s = self.store.reach()?;
                    s.expire();
                    self.store.publish(&s);
                    let seen = self.seen;
                    let oldest = s.log.front().map_or(s.revision, |(r, _)| *r);
                    let hit = s.revision > seen
                        && (oldest > seen + 1
                            || s.log
                                .iter()
                                .any(|(r, k)| *r > seen && k.starts_with(&self.prefix)));
                    self.seen = s.revision;
                    if hit {
                        return Ok(());
                    }
                }
                let _ = tokio::time::timeout(TICK, self.rx.changed()).await;
            }
        }
        .boxed()
    }
}

impl Meta for Memory {
    fn get(&self, key: String) -> BoxFuture<'_, Result<Option<Kv>>> {
        let r = self.with(|s| Ok(s.kv(&key)));
        async move { r }.boxed()
    }

    fn get_prefix(&self, prefix: String) -> BoxFuture<'_, Result<Vec<Kv>>> {
        let r = self.with(|s| {
            Ok(s.keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, _)| s.kv(k))
                .collect())
        });
        async move { r }.boxed()
    }

    fn put(&self, key: String, value: Vec<u8>, lease: Option<i64>) -> BoxFuture<'_, Result<()>> {
        let r = self.with(|s| {
            let l = s.check_lease(lease)?;
            s.put(&key, value, l);
            Ok(())
        });
        async move { r }.boxed()
    }

    fn delete(&self, key: String, prefix: bool) -> BoxFuture<'_, Result<()>> {
        let r = self.with(|s| {
            if prefix {
                s.delete_prefix(&key);
            } else {
                s.delete(&key);
            }
            Ok(())
        });
        async move { r }.boxed()
    }

    fn txn(&self, t: Txn) -> BoxFuture<'_, Result<TxnResult>> {
        let r = self.with(|s| {
            let succeeded = t.when.iter().all(|c| s.holds(c));
            let ops = if succeeded { t.then } else { t.otherwise };
            // etcd checks every lease before it changes anything.
            for o in &ops {
                if let Op::Put { lease, .. } = o {
                    s.check_lease(*lease)?;
                }
            }
            let mut got = Vec::new();
            for o in ops {
                match o {
                    Op::Put { key, value, lease } => {
                        let l = s.check_lease(lease)?;
                        s.put(&key, value, l);
                    }
                    Op::Delete(key) => s.delete(&key),
                    Op::DeletePrefix(key) => s.delete_prefix(&key),
                    Op::Get(key) => got.push(s.kv(&key)),
                }
            }
            Ok(TxnResult { succeeded, got })
        });
        async move { r }.boxed()
    }

    fn grant(&self, ttl: i64) -> BoxFuture<'_, Result<i64>> {
        let r = self.with(|s| {
            s.next_lease += 1;
            let id = s.next_lease;
            let ttl = ttl.max(1);
            s.leases
                .insert(id, (ttl, Instant::now() + Duration::from_secs(ttl as u64)));
            Ok(id)
        });
        async move { r }.boxed()
    }

    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
        let r = self.with(|s| {
            s.drop_lease(lease);
            Ok(())
        });
        async move { r }.boxed()
    }

    fn keep_alive<'a>(
        &'a self,
        lease: i64,
        ttl: i64,
        mut renewed: Box<dyn FnMut(Instant) + Send + 'a>,
    ) -> BoxFuture<'a, ClusterError> {
        async move {
            let period = renew_period(ttl);
            let limit = Duration::from_secs(ttl.max(1) as u64);
            let mut last_ok = Instant::now();
            loop {
                let sent = Instant::now();
                let r = self.with(|s| match s.leases.get_mut(&lease) {
                    Some((ttl, at)) => {
                        *at = sent + Duration::from_secs(*ttl as u64);
                        Ok(true)
                    }
                    None => Ok(false),
                });
                let pause = match r {
                    Ok(true) => {
                        last_ok = sent;
                        renewed(sent);
                        period
                    }
                    Ok(false) => {
                        return ClusterError::Invalid(format!("lease {lease:x} expired"));
                    }
                    Err(e) => {
                        if last_ok.elapsed() > limit {
                            return e;
                        }
                        Duration::from_millis(100)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        }
        .boxed()
    }

    fn campaign(&self, election: String, value: String, lease: i64) -> BoxFuture<'_, Result<()>> {
        async move {
            let mine = format!("{election}/{lease:x}");
            self.with(|s| {
                let l = s.check_lease(Some(lease))?;
                if !s.keys.contains_key(&mine) {
                    s.put(&mine, value.into_bytes(), l);
                }
                Ok(())
            })?;
            let mut rx = self.shared.revision.subscribe();
            loop {
                let won = self.with(|s| {
                    if !s.keys.contains_key(&mine) {
                        return Err(ClusterError::Invalid(format!(
                            "lease {lease:x} expired while campaigning"
                        )));
                    }
                    Ok(s.leader(&election).is_some_and(|(k, _)| k == mine))
                })?;
                if won {
                    return Ok(());
                }
                let _ = tokio::time::timeout(TICK, rx.changed()).await;
            }
        }
        .boxed()
    }

    fn leader(&self, election: String) -> BoxFuture<'_, Result<Option<String>>> {
        let r = self.with(|s| {
            Ok(s.leader(&election)
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
        });
        async move { r }.boxed()
    }

    fn watch(&self, prefix: String) -> BoxFuture<'_, Result<Box<dyn Changes>>> {
        let r = self.with(|s| Ok(s.revision)).map(|seen| {
            Box::new(MemChanges {
                store: self.clone(),
                prefix,
                seen,
                rx: self.shared.revision.subscribe(),
            }) as Box<dyn Changes>
        });
        async move { r }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leased_keys_go_when_the_lease_expires_unless_kept_alive() {
        let m = Memory::new();
        let a = m.grant(2).await.unwrap();
        let b = m.grant(2).await.unwrap();
        m.put("/k/a".into(), b"1".to_vec(), Some(a)).await.unwrap();
        m.put("/k/b".into(), b"2".to_vec(), Some(b)).await.unwrap();
        let kept = m.clone();
        let alive =
            tokio::spawn(async move { kept.keep_alive(b, 2, Box::new(|_| {})).await.to_string() });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(m.get("/k/a".into()).await.unwrap().is_none(), "a expired");
        assert!(
            m.get("/k/b".into()).await.unwrap().is_some(),
            "b kept alive"
        );
        m.expire_lease(b);
        let why = alive.await.unwrap();
        assert!(why.contains("expired"), "{why}");
        assert!(m.get("/k/b".into()).await.unwrap().is_none());
        assert!(m.put("/k/c".into(), vec![], Some(b)).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_client_fails_and_its_lease_lapses_while_others_go_on() {
        let m = Memory::new();
        let other = m.client();
        let l = m.grant(3).await.unwrap();
        m.put("/k".into(), b"v".to_vec(), Some(l)).await.unwrap();
        let kept = m.clone();
        let alive = tokio::spawn(async move { kept.keep_alive(l, 3, Box::new(|_| {})).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        m.set_reachable(false);
        assert!(m.get("/k".into()).await.is_err());
        assert!(other.get("/k".into()).await.unwrap().is_some());
        alive.await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(other.get("/k".into()).await.unwrap().is_none(), "lapsed");
    }

    #[tokio::test(start_paused = true)]
    async fn transactions_are_guarded_by_revision_presence_and_lease() {
        let m = Memory::new();
        let l = m.grant(10).await.unwrap();
        let take = Txn::new(
            vec![Cmp::Absent("/o".into())],
            vec![Op::put_leased("/o", "x", l), Op::put("/e", "1")],
        )
        .or_else(vec![Op::Get("/o".into())]);
        let r = m.txn(take).await.unwrap();
        assert!(r.succeeded && r.got.is_empty());
        let o = m.get("/o".into()).await.unwrap().unwrap();
        assert_eq!((o.value.as_slice(), o.lease), (&b"x"[..], l));
        let again = Txn::new(vec![Cmp::Absent("/o".into())], vec![Op::put("/o", "y")])
            .or_else(vec![Op::Get("/o".into())]);
        let r = m.txn(again).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.got, vec![Some(o.clone())]);
        let e = m.get("/e".into()).await.unwrap().unwrap();
        for (c, want) in [
            (Cmp::ModRevision("/e".into(), e.mod_revision), true),
            (Cmp::ModRevision("/e".into(), e.mod_revision + 1), false),
            (Cmp::Lease("/o".into(), l), true),
            (Cmp::Lease("/o".into(), l + 1), false),
            (Cmp::Present("/e".into()), true),
            (Cmp::Present("/none".into()), false),
        ] {
            let r = m.txn(Txn::new(vec![c.clone()], vec![])).await.unwrap();
            assert_eq!(r.succeeded, want, "{c:?}");
        }
        m.put("/p/1".into(), vec![], None).await.unwrap();
        m.put("/p/2".into(), vec![], None).await.unwrap();
        m.txn(Txn::new(vec![], vec![Op::DeletePrefix("/p/".into())]))
            .await
            .unwrap();
        assert!(m.get_prefix("/p/".into()).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn watches_wake_on_changes_under_their_prefix_only() {
        let m = Memory::new();
        let mut w = m.watch("/a/".into()).await.unwrap();
        m.put("/b/x".into(), vec![], None).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), w.changed())
                .await
                .is_err(),
            "a change elsewhere does not wake it"
        );
        m.put("/a/x".into(), vec![], None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), w.changed())
            .await
            .expect("woken")
            .unwrap();
    }
}
