//! Every test runs twice: against the in-memory store ([`Memory`]) and against a real etcd
//! member (Debian's etcd-server, started per test on a free loopback port with a temporary
//! data directory, killed by PID at the end), so the in-memory store the gateway's unit tests
//! use is held to etcd's behaviour.

use std::time::Duration;

use super::*;
use crate::process::{free_port, Etcd};

struct Fixture {
    _dir: tempfile::TempDir,
    etcd: Etcd,
}

fn etcd() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let client = std::net::SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1]).unwrap()));
    let mut etcd = Etcd::start_single(
        client,
        &dir.path().join("data"),
        &dir.path().join("etcd.log"),
    )
    .expect("start etcd (Debian package etcd-server; `make deps` installs it)");
    etcd.wait_ready(Duration::from_secs(20)).unwrap();
    Fixture { _dir: dir, etcd }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Run `body` against the in-memory store, then against a real etcd member: both must behave
/// the same (the in-memory one stands in for etcd in the gateway's unit tests).
fn on_both<F, Fut>(body: F)
where
    F: Fn(Cluster) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    run(body(Cluster::new(Arc::new(Memory::new()), "/t")));
    let f = etcd();
    run(async {
        let c = Cluster::connect(&[f.etcd.member.client_url()], "/t")
            .await
            .unwrap();
        body(c).await;
    });
}

fn node(i: usize) -> NodeRecord {
    NodeRecord {
        id: format!("node-{i}"),
        address: format!("127.0.0.1:{}", 7000 + i),
        host: format!("host-{i}"),
        rack: String::new(),
        zone: String::new(),
        capacity: 1 << 30,
        state: NodeState::Up,
        failed: None,
    }
}

fn new_volume(name: &str) -> NewVolume {
    NewVolume {
        name: name.into(),
        size: 64 << 20,
        block_size: 4096,
        profile: Profile::parse("4+2", 16384).unwrap(),
        pgs: 16,
        write_quorum: None,
    }
}

#[test]
fn nodes_register_under_a_lease_and_vanish_when_it_goes() {
    on_both(|c| async move {
        let other = c.with_prefix("/t2");
        let lease = c.grant(10).await.unwrap();
        for i in 0..3 {
            c.register_node(&node(i), lease).await.unwrap();
        }
        let got = c.nodes().await.unwrap();
        assert_eq!(got, vec![node(0), node(1), node(2)]);
        // Prefixes keep clusters apart.
        assert!(other.nodes().await.unwrap().is_empty());
        c.revoke(lease).await.unwrap();
        assert!(c.nodes().await.unwrap().is_empty());
    });
}

#[test]
fn a_lease_kept_alive_outlives_its_ttl() {
    on_both(|c| async move {
        let lease = c.grant(2).await.unwrap();
        c.register_node(&node(0), lease).await.unwrap();
        let kept = {
            let c = c.clone();
            tokio::spawn(async move { c.keep_alive(lease, 2).await })
        };
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(c.nodes().await.unwrap().len(), 1, "alive past its TTL");
        kept.abort();
        // Unrenewed, it expires.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(c.nodes().await.unwrap().is_empty(), "gone after its TTL");
    });
}

#[test]
fn volumes_get_distinct_luns_and_names_are_unique() {
    on_both(|c| async move {
        // Racing creators: every volume gets its own LUN.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.create_volume(&new_volume(&format!("v{i}"))).await
            }));
        }
        let mut luns = Vec::new();
        for t in tasks {
            luns.push(t.await.unwrap().unwrap().lun);
        }
        luns.sort_unstable();
        assert_eq!(luns, (0..8).collect::<Vec<u64>>());
        assert!(matches!(
            c.create_volume(&new_volume("v3")).await,
            Err(ClusterError::Exists(_))
        ));
        let v = c.volume("v3").await.unwrap().unwrap();
        assert_eq!(
            (v.k, v.m, v.chunk, v.write_quorum, v.pgs),
            (4, 2, 16384, 5, 16)
        );
        assert_eq!(v.profile().unwrap(), Profile::parse("4+2", 16384).unwrap());
        // Bad requests are refused with a reason.
        let mut bad = new_volume("bad name!");
        assert!(matches!(
            c.create_volume(&bad).await,
            Err(ClusterError::Invalid(_))
        ));
        bad.name = "ok".into();
        bad.size = 1000;
        assert!(matches!(
            c.create_volume(&bad).await,
            Err(ClusterError::Invalid(_))
        ));
        // Volumes grow, never shrink, in whole blocks.
        let grown = c.resize_volume("v3", 128 << 20).await.unwrap();
        assert_eq!(grown.size, 128 << 20);
        assert_eq!(c.volume("v3").await.unwrap().unwrap().size, 128 << 20);
        for bad in [64 << 20, (128 << 20) + 100] {
            assert!(matches!(
                c.resize_volume("v3", bad).await,
                Err(ClusterError::Invalid(_))
            ));
        }
        assert!(matches!(
            c.resize_volume("nope", 1 << 30).await,
            Err(ClusterError::NoVolume(_))
        ));
        // Delete, and a re-created name gets a new id.
        let gone = c.delete_volume("v3").await.unwrap();
        assert!(c.volume("v3").await.unwrap().is_none());
        assert!(matches!(
            c.delete_volume("v3").await,
            Err(ClusterError::NoVolume(_))
        ));
        let again = c.create_volume(&new_volume("v3")).await.unwrap();
        assert_ne!(again.id, gone.id);
        assert_eq!(again.lun, 8);
        assert_eq!(c.volumes().await.unwrap().len(), 8);
    });
}

#[test]
fn the_first_placement_map_is_made_once_from_live_nodes() {
    on_both(|c| async move {
        let lease = c.grant(10).await.unwrap();
        let v = c.create_volume(&new_volume("v")).await.unwrap();
        // Too few nodes: a clear refusal, nothing stored.
        for i in 0..4 {
            c.register_node(&node(i), lease).await.unwrap();
        }
        assert!(matches!(
            c.ensure_pg_map(&v).await,
            Err(ClusterError::Invalid(_))
        ));
        assert!(c.pg_map(v.id).await.unwrap().is_none());
        for i in 4..8 {
            c.register_node(&node(i), lease).await.unwrap();
        }
        let m = c.ensure_pg_map(&v).await.unwrap();
        assert_eq!(m.epoch, 1);
        assert_eq!(m.map.len(), 16);
        for pg in &m.map {
            let mut ids: Vec<&str> = pg.iter().map(|&i| m.nodes[i].id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), 6, "distinct nodes per PG");
        }
        // Asked again (or by another controller), the stored map stands.
        c.register_node(&node(8), lease).await.unwrap();
        assert_eq!(c.ensure_pg_map(&v).await.unwrap(), m);
    });
}

#[test]
fn ownership_is_exclusive_and_every_takeover_raises_the_epoch() {
    on_both(|c| async move {
        let v = c.create_volume(&new_volume("v")).await.unwrap();
        let a = c.grant(10).await.unwrap();
        let b = c.grant(10).await.unwrap();
        assert_eq!(c.epoch(v.id).await.unwrap(), 0);
        assert_eq!(c.acquire(v.id, "gw-a", a).await.unwrap(), Some(1));
        // Held: the other gateway is refused; the holder is told its epoch again.
        assert_eq!(c.acquire(v.id, "gw-b", b).await.unwrap(), None);
        assert_eq!(c.acquire(v.id, "gw-a", a).await.unwrap(), Some(1));
        assert_eq!(
            c.owner(v.id).await.unwrap(),
            Some(OwnerRecord {
                gateway: "gw-a".into(),
                epoch: 1
            })
        );
        // The owner's lease goes (it died): the next owner gets a higher epoch.
        c.revoke(a).await.unwrap();
        assert_eq!(c.owner(v.id).await.unwrap(), None);
        assert_eq!(c.acquire(v.id, "gw-b", b).await.unwrap(), Some(2));
        // A release by a non-owner does nothing; by the owner, frees it.
        c.release(v.id, "gw-a", a).await.unwrap();
        assert!(c.owner(v.id).await.unwrap().is_some());
        c.release(v.id, "gw-b", b).await.unwrap();
        assert_eq!(c.owner(v.id).await.unwrap(), None);
        assert_eq!(c.epoch(v.id).await.unwrap(), 2);
    });
}

#[test]
fn one_controller_at_a_time() {
    on_both(|c| async move {
        assert_eq!(c.controller().await.unwrap(), None);
        let a = c.grant(10).await.unwrap();
        let b = c.grant(10).await.unwrap();
        c.campaign("gw-a", a).await.unwrap();
        assert_eq!(c.controller().await.unwrap().as_deref(), Some("gw-a"));
        let second = {
            let c = c.clone();
            tokio::spawn(async move { c.campaign("gw-b", b).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!second.is_finished(), "the second candidate waits");
        c.revoke(a).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("elected once the first is gone")
            .unwrap()
            .unwrap();
        assert_eq!(c.controller().await.unwrap().as_deref(), Some("gw-b"));
    });
}

fn gw(id: &str, weight: u32) -> GatewayRecord {
    GatewayRecord {
        id: id.into(),
        portals: vec![],
        number: 0,
        forward: String::new(),
        weight,
        target: String::new(),
    }
}

#[test]
fn owners_spread_by_weight_and_a_new_gateway_takes_only_its_share() {
    let three: Vec<GatewayRecord> = vec![gw("gw-a", 1), gw("gw-b", 1), gw("gw-c", 2)];
    let vols: Vec<u64> = (0..4000u64)
        .map(|i| stable_hash(&[&i.to_be_bytes()]))
        .collect();
    let owner_of = |gws: &[GatewayRecord], v: u64| preferred_owner(v, gws).unwrap().id.clone();
    let mut count = std::collections::HashMap::<String, usize>::new();
    for &v in &vols {
        *count.entry(owner_of(&three, v)).or_default() += 1;
    }
    // Shares 1:1:2 of 4000 → 1000, 1000, 2000, within ±10%.
    for (id, want) in [("gw-a", 1000.0), ("gw-b", 1000.0), ("gw-c", 2000.0)] {
        let got = count[id] as f64;
        assert!(
            (got - want).abs() < want * 0.1,
            "{id}: {got} of 4000, want ~{want}"
        );
    }
    // A fourth gateway (weight 1, so 1/5 of the total): only volumes it takes move.
    let mut four = three.clone();
    four.push(gw("gw-d", 1));
    let mut moved = 0;
    for &v in &vols {
        let (before, after) = (owner_of(&three, v), owner_of(&four, v));
        if before != after {
            assert_eq!(after, "gw-d", "a volume moved between old gateways");
            moved += 1;
        }
    }
    assert!(
        (640..=960).contains(&moved),
        "{moved} of 4000 moved, want ~800"
    );
    // Weight 0 owns nothing; nobody at all: None.
    assert_ne!(owner_of(&[gw("x", 0), gw("y", 1)], 7), "x");
    assert!(preferred_owner(7, &[gw("x", 0)]).is_none());
}

#[test]
fn gateway_numbers_are_distinct_and_kept() {
    on_both(|c| async move {
        // Eight gateways numbering themselves at once get 1..=8, each once.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.gateway_number(&format!("gw-{i}")).await.unwrap()
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        got.sort_unstable();
        assert_eq!(got, (1..=8).collect::<Vec<u16>>());
        let again = c.gateway_number("gw-3").await.unwrap();
        let first = c.gateway_number("gw-3").await.unwrap();
        assert_eq!(again, first, "a gateway keeps its number");
        assert_eq!(c.gateway_number("gw-new").await.unwrap(), 9);
    });
}

#[test]
fn only_the_owner_saves_reservations() {
    on_both(|c| async move {
        let v = c.create_volume(&new_volume("prs")).await.unwrap();
        let (a, b) = (c.grant(10).await.unwrap(), c.grant(10).await.unwrap());
        assert!(c.reservations(v.id).await.unwrap().is_none());
        assert!(
            c.save_reservations(v.id, a, b"x").await.is_err(),
            "no owner yet"
        );
        assert_eq!(c.acquire(v.id, "gw-a", a).await.unwrap(), Some(1));
        c.save_reservations(v.id, a, b"state-1").await.unwrap();
        assert!(c.save_reservations(v.id, b, b"evil").await.is_err());
        assert_eq!(
            c.reservations(v.id).await.unwrap().as_deref(),
            Some(&b"state-1"[..])
        );
        // Ownership moves: the old owner can no longer write them; the new one reads them.
        c.revoke(a).await.unwrap();
        assert_eq!(c.acquire(v.id, "gw-b", b).await.unwrap(), Some(2));
        assert!(c.save_reservations(v.id, a, b"late").await.is_err());
        assert_eq!(
            c.reservations(v.id).await.unwrap().as_deref(),
            Some(&b"state-1"[..])
        );
        // They go with the volume.
        c.delete_volume("prs").await.unwrap();
        assert!(c.reservations(v.id).await.unwrap().is_none());
    });
}

#[test]
fn map_changes_are_guarded_recorded_and_fills_reported_by_the_owner_only() {
    on_both(|c| async move {
        let lease = c.grant(30).await.unwrap();
        for i in 0..7 {
            c.register_node(&node(i), lease).await.unwrap();
        }
        let v = c.create_volume(&new_volume("moving")).await.unwrap();
        let m1 = c.ensure_pg_map(&v).await.unwrap();
        // The operator's state overlays the node's own record, and survives re-registration.
        c.set_node_state("node-2", NodeState::Draining)
            .await
            .unwrap();
        c.register_node(&node(2), lease).await.unwrap();
        let nodes = c.nodes().await.unwrap();
        assert_eq!(nodes[2].state, NodeState::Draining);
        let none = std::collections::HashSet::new();
        let (m2, moves) = rebuild::plan(&rebuild::PlanInput {
            volume: &v,
            map: &m1,
            nodes: &nodes,
            lost: &none,
            unreachable: &none,
            filled: true,
        })
        .unwrap();
        assert!(moves
            .iter()
            .all(|m| m.from == "node-2" && m.reason == MoveReason::Drain));
        assert!(c.replace_pg_map(&v, &m1, &m2, &moves).await.unwrap());
        assert_eq!(c.pg_map(v.id).await.unwrap().unwrap(), m2);
        // A controller working from the old map loses the race.
        assert!(!c.replace_pg_map(&v, &m1, &m2, &moves).await.unwrap());
        assert_eq!(c.moves(v.id).await.unwrap(), vec![(2, moves.clone())]);
        // Fill progress: only the owner reports it.
        let rec = FillRecord {
            map_epoch: 2,
            gateway: "gw-a".into(),
            stripes: 10,
            done: 10,
            bytes: 1,
            rate: 1.0,
            eta_secs: Some(0.0),
            finished: true,
            updated: 0,
        };
        assert!(c.save_fill(v.id, lease, &rec).await.is_err(), "no owner");
        c.acquire(v.id, "gw-a", lease).await.unwrap().unwrap();
        c.save_fill(v.id, lease, &rec).await.unwrap();
        assert!(c.fill(v.id).await.unwrap().unwrap().fills(2));
        assert_eq!(c.fills().await.unwrap().len(), 1);
        // Absence is recorded once, by the first controller to see it.
        assert_eq!(c.mark_absent("node-5", 100).await.unwrap(), 100);
        assert_eq!(c.mark_absent("node-5", 200).await.unwrap(), 100);
        assert_eq!(c.absent().await.unwrap().get("node-5"), Some(&100));
        c.clear_absent("node-5").await.unwrap();
        assert!(c.absent().await.unwrap().is_empty());
        // Settings: defaults until set.
        assert_eq!(c.settings().await.unwrap(), Settings::default());
        let s = Settings {
            rebuild_grace_secs: 5,
            rebuild_rate: 1 << 20,
        };
        c.set_settings(&s).await.unwrap();
        assert_eq!(c.settings().await.unwrap(), s);
        c.set_node_state("node-2", NodeState::Up).await.unwrap();
        assert_eq!(c.nodes().await.unwrap()[2].state, NodeState::Up);
        // Everything of the volume goes with it.
        c.delete_volume("moving").await.unwrap();
        assert!(c.fill(v.id).await.unwrap().is_none());
        assert!(c.moves(v.id).await.unwrap().is_empty());
    });
}

/// Volume ids, fragment stores and NAA identifiers are derived with `stable_hash`: its values
/// must never change (computed with the implementation of the day they were pinned).
#[test]
fn stable_hash_values_are_pinned() {
    assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
    assert_eq!(stable_hash(&[b""]), 0xaf64_724c_8602_eb6e);
    assert_eq!(stable_hash(&[b"ab"]), 0xe720_2e19_0542_452f);
    assert_eq!(stable_hash(&[b"a", b"b"]), 0xd2b3_7181_9297_f98a);
    assert_eq!(
        stable_hash(&[b"tessera-volume", b"vol0"]),
        0x912d_70f9_2d97_4f8c
    );
    assert_eq!(
        stable_hash(&[b"tessera-volume", &7u64.to_be_bytes()]),
        0xacf0_9755_0e53_d886
    );
    assert_eq!(
        stable_hash(&[b"iqn.2024-01.com.example:disk1", &0u64.to_be_bytes()]),
        0x0699_96c9_5ca1_8eba
    );
}
