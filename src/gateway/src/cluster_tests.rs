//! The cluster agent's ownership decisions ([`step`]) on their own, and played out by several
//! gateways against one in-memory store ([`Memory`]): each round a gateway reads volumes,
//! gateways and owners, decides with [`step`] and makes the calls `reconcile` makes for that
//! decision (take: [`Cluster::acquire`]; hand over: [`Cluster::release`]). Time is tokio's,
//! paused: leases expire and gateways settle as the tests advance it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tessera_cluster::{Cluster, GatewayRecord, Memory, NewVolume, OwnerRecord};
use tokio::time::Instant;

use super::{step, Step, HANDOVER_AFTER, TAKE_ANY_AFTER};

const TTL: i64 = 6;

fn record(id: &str, weight: u32) -> GatewayRecord {
    GatewayRecord {
        id: id.into(),
        portals: vec![],
        number: 0,
        forward: format!("{id}:3261"),
        weight,
        target: "iqn.2024-01.io.tessera:cluster".into(),
    }
}

fn owner(g: &str, epoch: u64) -> OwnerRecord {
    OwnerRecord {
        gateway: g.into(),
        epoch,
    }
}

#[test]
fn a_served_volume_is_kept_lost_or_handed_over() {
    let now = Instant::now() + Duration::from_secs(100);
    let (me, other) = (record("gw-a", 1), record("gw-b", 1));
    let mine = owner("gw-a", 3);
    let theirs = owner("gw-b", 4);
    let s = |o: Option<&OwnerRecord>, p: &GatewayRecord, seen: Option<Duration>| {
        step("gw-a", o, Some(p), true, seen.map(|d| now - d), None, now)
    };
    assert_eq!(s(Some(&mine), &me, None), Step::Keep);
    assert_eq!(s(Some(&theirs), &me, None), Step::Lost(Some("gw-b".into())));
    assert_eq!(s(None, &me, None), Step::Lost(None), "no owner: fenced too");
    // A preferred gateway is handed the volume only once it has been live a while.
    assert_eq!(s(Some(&mine), &other, Some(Duration::ZERO)), Step::Keep);
    assert_eq!(
        s(
            Some(&mine),
            &other,
            Some(HANDOVER_AFTER - Duration::from_millis(1))
        ),
        Step::Keep
    );
    assert_eq!(
        s(Some(&mine), &other, Some(HANDOVER_AFTER)),
        Step::HandOver("gw-b".into())
    );
}

#[test]
fn an_unserved_volume_is_forwarded_or_taken() {
    let now = Instant::now() + Duration::from_secs(100);
    let (me, other) = (record("gw-a", 1), record("gw-b", 1));
    let s = |o: Option<&OwnerRecord>, p: Option<&GatewayRecord>, waited: Option<Duration>| {
        step("gw-a", o, p, false, None, waited.map(|d| now - d), now)
    };
    let theirs = owner("gw-b", 4);
    assert_eq!(
        s(Some(&theirs), Some(&me), None),
        Step::Forward(Some("gw-b".into())),
        "owned elsewhere: forwarded, even when this gateway is preferred"
    );
    assert_eq!(
        s(None, Some(&me), None),
        Step::Take,
        "preferred: taken at once"
    );
    assert_eq!(s(None, None, None), Step::Take, "no gateway preferred");
    assert_eq!(
        s(None, Some(&other), Some(Duration::from_secs(1))),
        Step::Forward(None),
        "the preferred gateway gets its chance first"
    );
    assert_eq!(
        s(None, Some(&other), Some(TAKE_ANY_AFTER)),
        Step::Take,
        "unowned too long: anyone takes it"
    );
    assert_eq!(
        s(Some(&owner("gw-a", 2)), Some(&other), None),
        Step::Take,
        "held under this lease but not open here: opened"
    );
}

/// A gateway as the agent keeps it: its store client, lease, and what it saw.
struct Gw {
    rec: GatewayRecord,
    mem: Memory,
    c: Cluster,
    lease: i64,
    served: HashMap<u64, u64>,
    seen: HashMap<String, Instant>,
    unowned: HashMap<u64, Instant>,
}

impl Gw {
    async fn join(store: &Memory, id: &str, weight: u32) -> Self {
        let mem = store.client();
        let c = Cluster::new(Arc::new(mem.clone()), "/t");
        let lease = c.grant(TTL).await.unwrap();
        let rec = record(id, weight);
        c.register_gateway(&rec, lease).await.unwrap();
        Self {
            rec,
            mem,
            c,
            lease,
            served: HashMap::new(),
            seen: HashMap::new(),
            unowned: HashMap::new(),
        }
    }

    /// Keep the lease alive in the background (as the agent does), until the task is dropped.
    fn keep_alive(&self) -> tokio::task::JoinHandle<()> {
        let (c, lease) = (self.c.clone(), self.lease);
        tokio::spawn(async move {
            c.keep_alive(lease, TTL).await;
        })
    }

    /// One reconcile round's ownership part; returns every volume's step.
    async fn round(&mut self) -> HashMap<u64, Step> {
        let (Ok(vols), Ok(gws), Ok(owners)) = (
            self.c.volumes().await,
            self.c.gateways().await,
            self.c.owners().await,
        ) else {
            return HashMap::new();
        };
        let now = Instant::now();
        self.seen.retain(|id, _| gws.iter().any(|g| &g.id == id));
        for g in &gws {
            self.seen.entry(g.id.clone()).or_insert(now);
        }
        let mut steps = HashMap::new();
        for v in &vols {
            let o = owners.get(&v.id);
            let p = tessera_cluster::preferred_owner(v.id, &gws);
            let seen = p.and_then(|p| self.seen.get(&p.id).copied());
            let served = self.served.contains_key(&v.id);
            let since = self.unowned.get(&v.id).copied();
            let s = step(&self.rec.id, o, p, served, seen, since, now);
            match &s {
                Step::Lost(_) => {
                    self.served.remove(&v.id);
                }
                Step::HandOver(_) => {
                    self.served.remove(&v.id);
                    self.c
                        .release(v.id, &self.rec.id, self.lease)
                        .await
                        .unwrap();
                }
                Step::Forward(Some(_)) => {
                    self.unowned.remove(&v.id);
                }
                Step::Forward(None) => {
                    self.unowned.entry(v.id).or_insert(now);
                }
                Step::Take => {
                    self.unowned.entry(v.id).or_insert(now);
                    if let Ok(Some(epoch)) = self.c.acquire(v.id, &self.rec.id, self.lease).await {
                        self.served.insert(v.id, epoch);
                        self.unowned.remove(&v.id);
                    }
                }
                Step::Keep => {}
            }
            steps.insert(v.id, s);
        }
        steps
    }
}

async fn volumes(c: &Cluster, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let v = c
            .create_volume(&NewVolume {
                name: format!("v{i}"),
                size: 64 << 20,
                block_size: 4096,
                profile: tessera_ec::Profile::parse("4+2", 16384).unwrap(),
                pgs: 16,
                write_quorum: None,
            })
            .await
            .unwrap();
        ids.push(v.id);
    }
    ids
}

/// Rounds of every gateway, a second apart, for `secs` seconds.
async fn rounds(gws: &mut [&mut Gw], secs: u64) {
    for _ in 0..secs {
        for g in gws.iter_mut() {
            g.round().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn owners_of(c: &Cluster) -> HashMap<u64, OwnerRecord> {
    c.owners().await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn volumes_spread_over_gateways_by_weight_each_with_one_owner() {
    let store = Memory::new();
    let mut a = Gw::join(&store, "gw-a", 1).await;
    let mut b = Gw::join(&store, "gw-b", 1).await;
    let mut c = Gw::join(&store, "gw-c", 2).await;
    let _alive = [a.keep_alive(), b.keep_alive(), c.keep_alive()];
    let ids = volumes(&a.c, 64).await;
    rounds(&mut [&mut a, &mut b, &mut c], 2).await;
    let owners = owners_of(&a.c).await;
    let gws = a.c.gateways().await.unwrap();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        let o = owners.get(id).expect("every volume owned");
        let p = tessera_cluster::preferred_owner(*id, &gws).unwrap();
        assert_eq!(o.gateway, p.id, "owned by the preferred gateway");
        assert_eq!(o.epoch, 1);
        *count.entry(o.gateway.as_str()).or_default() += 1;
    }
    // Exactly one gateway serves each volume, the one etcd names.
    for id in &ids {
        let serving: Vec<&str> = [&a, &b, &c]
            .iter()
            .filter(|g| g.served.contains_key(id))
            .map(|g| g.rec.id.as_str())
            .collect();
        assert_eq!(serving, vec![owners[id].gateway.as_str()]);
    }
    // Weight 2 of 4: about half (binomial, 64 draws: 20..=44 holds with margin).
    let c_share = count.get("gw-c").copied().unwrap_or(0);
    assert!((20..=44).contains(&c_share), "{count:?}");
    assert!(count.get("gw-a").copied().unwrap_or(0) > 4, "{count:?}");
    assert!(count.get("gw-b").copied().unwrap_or(0) > 4, "{count:?}");
}

#[tokio::test(start_paused = true)]
async fn a_gateway_cut_off_loses_its_volumes_to_others_with_higher_epochs_and_is_fenced() {
    let store = Memory::new();
    let mut a = Gw::join(&store, "gw-a", 1).await;
    let mut b = Gw::join(&store, "gw-b", 1).await;
    let alive_a = a.keep_alive();
    let _alive_b = b.keep_alive();
    let ids = volumes(&a.c, 16).await;
    rounds(&mut [&mut a, &mut b], 2).await;
    let before = owners_of(&b.c).await;
    let of_a: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| before[id].gateway == "gw-a")
        .collect();
    assert!(!of_a.is_empty(), "gw-a owns some: {before:?}");
    // gw-a is partitioned from etcd: its keep-alive fails, its lease runs out.
    a.mem.set_reachable(false);
    // Meanwhile gw-a still believes it serves them (it fences itself on its own watchdog).
    assert!(
        a.round().await.is_empty(),
        "a partitioned gateway reads nothing"
    );
    // While a's lease may still live, b leaves a's volumes alone (forwarding to a).
    rounds(&mut [&mut b], (TTL as u64) - 2).await;
    assert_eq!(
        owners_of(&b.c).await,
        before,
        "nothing taken while a's lease lives"
    );
    // Then b sees a gone and takes a's volumes: it is the preferred gateway now.
    rounds(&mut [&mut b], 4).await;
    tokio::time::timeout(Duration::from_secs(1), alive_a)
        .await
        .expect("a's keep-alive gave up once its TTL passed unrenewed")
        .unwrap();
    let after = owners_of(&b.c).await;
    for id in &of_a {
        let o = &after[id];
        assert_eq!(o.gateway, "gw-b", "taken over");
        assert_eq!(o.epoch, before[id].epoch + 1, "with a higher epoch");
    }
    // gw-a comes back: the stale lease cannot write as owner, and its next round drops
    // what it served (fenced) in favour of forwarding to b.
    a.mem.set_reachable(true);
    for id in &of_a {
        let err = a.c.save_reservations(*id, a.lease, b"stale").await;
        assert!(err.is_err(), "the old owner cannot save reservations");
        assert_eq!(a.c.acquire(*id, "gw-a", a.lease).await.ok().flatten(), None);
    }
    let steps = a.round().await;
    for id in &of_a {
        assert_eq!(steps[id], Step::Lost(Some("gw-b".into())));
        assert!(!a.served.contains_key(id));
    }
    assert!(b.c.reservations(of_a[0]).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_joining_gateway_gets_its_share_after_it_settles_and_nothing_else_moves() {
    let store = Memory::new();
    let mut a = Gw::join(&store, "gw-a", 1).await;
    let mut b = Gw::join(&store, "gw-b", 1).await;
    let _alive = [a.keep_alive(), b.keep_alive()];
    let ids = volumes(&a.c, 32).await;
    rounds(&mut [&mut a, &mut b], 2).await;
    let before = owners_of(&a.c).await;
    let mut c = Gw::join(&store, "gw-c", 1).await;
    let _alive_c = c.keep_alive();
    // Not before it has been live for HANDOVER_AFTER.
    rounds(&mut [&mut a, &mut b, &mut c], 1).await;
    assert_eq!(owners_of(&a.c).await, before, "nothing moves at once");
    rounds(&mut [&mut a, &mut b, &mut c], HANDOVER_AFTER.as_secs() + 3).await;
    let after = owners_of(&a.c).await;
    let gws = a.c.gateways().await.unwrap();
    let mut moved = 0;
    for id in &ids {
        let p = tessera_cluster::preferred_owner(*id, &gws).unwrap();
        assert_eq!(after[id].gateway, p.id);
        if after[id].gateway != before[id].gateway {
            moved += 1;
            assert_eq!(after[id].gateway, "gw-c", "only to the newcomer");
            assert_eq!(after[id].epoch, before[id].epoch + 1);
            assert_eq!(c.served.get(id), Some(&after[id].epoch));
        } else {
            assert_eq!(after[id].epoch, before[id].epoch, "untouched");
        }
    }
    assert!(moved > 0 && moved < ids.len(), "a share moved: {moved}");
    let all: HashSet<u64> = [&a, &b, &c]
        .iter()
        .flat_map(|g| g.served.keys().copied())
        .collect();
    assert_eq!(all.len(), ids.len(), "every volume served once");
}

/// Poll `f` every 100 ms (of tokio's paused clock) until it holds; panics after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real agent loop (`agent`) against the in-memory store: it joins under a lease with a
/// number, wins the controller election, rejoins with a new lease (same number) after a
/// partition longer than its TTL, and leaves cleanly (lease revoked) at shutdown.
#[tokio::test(start_paused = true)]
async fn the_agent_joins_leads_loses_its_lease_in_a_partition_rejoins_and_leaves() {
    let store = Memory::new();
    let mut cfg = crate::config::testing::config(Some("iqn.2024-01.io.tessera:cluster"));
    let cl = cfg.cluster.as_mut().unwrap();
    cl.lease_ttl = TTL;
    let cl = cl.clone();
    let mut gw = crate::Gateway::build(cfg).unwrap();
    let agent_side = store.client();
    gw.use_cluster_store(Arc::new(agent_side.clone()));
    let gw = Arc::new(gw);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ready: super::Ready = Arc::default();
    let c = Cluster::new(Arc::new(store.client()), &cl.prefix);
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let agent = tokio::task::spawn_local(super::agent(
                gw.clone(),
                cl.clone(),
                vec!["127.0.0.1:3260".parse().unwrap()],
                "127.0.0.1:3261".parse().unwrap(),
                ready.clone(),
                stopped,
            ));
            let registered = || async { c.gateways().await.unwrap() };
            eventually(5, "registered", || async { registered().await.len() == 1 }).await;
            eventually(5, "ready after its first round", || async {
                *ready.0.lock().unwrap()
            })
            .await;
            let first = registered().await.remove(0);
            assert_eq!(first.id, "gw-test");
            assert!(first.number >= 1);
            assert_eq!(first.forward, "127.0.0.1:3261");
            let lease_of = || async {
                let key = format!("{}/gateways/gw-test", cl.prefix);
                c.meta().get(key).await.unwrap().map(|kv| kv.lease)
            };
            let lease1 = lease_of().await.unwrap();
            eventually(5, "elected", || async {
                c.controller().await.unwrap().as_deref() == Some("gw-test")
            })
            .await;
            // Cut off from the store past its TTL: its lease lapses and its keys go...
            agent_side.set_reachable(false);
            eventually(TTL as u64 + 2, "lease lapsed", || async {
                registered().await.is_empty()
            })
            .await;
            assert_eq!(c.controller().await.unwrap(), None);
            assert!(!store.leases().contains(&lease1));
            // ...and when it can reach the store again it rejoins under a new lease, with
            // the number it had, and leads again.
            agent_side.set_reachable(true);
            eventually(5, "rejoined", || async { registered().await.len() == 1 }).await;
            let again = registered().await.remove(0);
            assert_eq!(again.number, first.number, "its number is kept");
            assert_ne!(lease_of().await, Some(lease1), "a new lease");
            eventually(5, "elected again", || async {
                c.controller().await.unwrap().as_deref() == Some("gw-test")
            })
            .await;
            // Shutdown: it revokes its lease, so its keys go at once.
            stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(5), agent)
                .await
                .expect("the agent stops")
                .unwrap();
            assert!(registered().await.is_empty(), "left cleanly");
            assert_eq!(store.leases(), Vec::<i64>::new());
        })
        .await;
}
