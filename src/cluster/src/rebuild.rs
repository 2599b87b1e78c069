//! Rebuild and rebalance: when a volume's placement map changes, and what the new one is.
//!
//! The controller calls [`plan`] for every volume at every round. It is pure: the stored map,
//! the registered nodes, which absent nodes are past their grace period, and whether the
//! owner reports the last change filled. A new map is made when:
//! - a node of the map has been absent longer than the grace period, or reports that its store
//!   failed a write or sync (its positions move to other nodes: a **rebuild** from the
//!   remaining fragments), or
//! - a PG has fewer positions on nodes that answer than its write quorum (nodes absent, or
//!   reported unreachable by the volume's owner) while other live nodes could take them: the
//!   positions of the nodes that do not answer move at once, not after the grace period, so
//!   that writes resume (**quorum**; the rest of the PG stays where it is), or
//! - an operator set a node of the map to `draining` or `out` (**drain**), or
//! - a registered node in state `up` is not yet used and placement gives it a share
//!   (**rebalance**), or the map is otherwise not what placement would make now.
//!
//! Positions of lost nodes always move. Any other move takes a position away from a node
//! that still holds it while its new node is filled, so a PG gets at most one such move per
//! map change and only while nothing else of it is missing, filling or absent: a PG never has
//! more positions unavailable than its parity covers. A change that replaces a lost node
//! makes no other move at all: redundancy is restored first, and rebalancing (placement may
//! want a position or two elsewhere once the lost node is gone) follows when the rebuild is
//! whole. The rest follows in later changes, one per finished fill. (A volume without parity cannot be drained: its fragments can only be
//! rebuilt from the others.)
//!
//! While the owner fills a change, the next waits, unless a node of the map is lost
//! meanwhile (positions still filling stay filling in the next map).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tessera_ec::placement;

use crate::{MapNode, NodeRecord, NodeState, PgMapRecord, VolumeRecord};

/// Why a position moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveReason {
    /// Its node was absent longer than the grace period.
    Lost,
    /// Its node is draining (or out).
    Drain,
    /// Placement moved it (a node joined, or the map was uneven).
    Rebalance,
    /// Its node did not answer while its PG had fewer nodes answering than the write quorum:
    /// moved at once so that writes resume.
    Quorum,
}

impl std::fmt::Display for MoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lost => "lost",
            Self::Drain => "drain",
            Self::Rebalance => "rebalance",
            Self::Quorum => "quorum",
        })
    }
}

/// One position of one PG moved by a map change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The PG.
    pub pg: u32,
    /// The fragment position (index).
    pub index: usize,
    /// The node it left.
    pub from: String,
    /// The node it went to.
    pub to: String,
    /// Why.
    pub reason: MoveReason,
}

/// How far the owner has filled a volume's map (`P/fills/VOLID`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FillRecord {
    /// The map epoch being filled.
    pub map_epoch: u64,
    /// The gateway filling it.
    pub gateway: String,
    /// Stripes in the volume.
    pub stripes: u64,
    /// Stripes done.
    pub done: u64,
    /// Bytes written to new nodes.
    pub bytes: u64,
    /// Bytes per second.
    pub rate: f64,
    /// Seconds left, if known.
    pub eta_secs: Option<f64>,
    /// Whether every moved position is whole.
    pub finished: bool,
    /// When this was written (seconds since the Unix epoch).
    pub updated: u64,
}

impl FillRecord {
    /// Whether this record says map `epoch` is wholly filled.
    pub fn fills(&self, epoch: u64) -> bool {
        self.finished && self.map_epoch == epoch
    }
}

/// Cluster-wide settings (`P/settings`), changeable at any time (`tessera cluster set`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Seconds a node may be absent before its data is rebuilt elsewhere.
    #[serde(default = "default_grace")]
    pub rebuild_grace_secs: u64,
    /// Bytes per second a volume's fill (rebuild, drain, rebalance) may write; 0: unlimited.
    #[serde(default = "default_rate")]
    pub rebuild_rate: u64,
}

fn default_grace() -> u64 {
    600
}

fn default_rate() -> u64 {
    100 << 20
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            rebuild_grace_secs: default_grace(),
            rebuild_rate: default_rate(),
        }
    }
}

/// What [`plan`] looks at.
#[derive(Debug)]
pub struct PlanInput<'a> {
    /// The volume.
    pub volume: &'a VolumeRecord,
    /// Its stored map.
    pub map: &'a PgMapRecord,
    /// The registered (live) nodes, with the operator's states applied.
    pub nodes: &'a [NodeRecord],
    /// Nodes of the map absent longer than the grace period.
    pub lost: &'a HashSet<String>,
    /// Nodes of the map the volume's owner reports it cannot reach (registered or not).
    pub unreachable: &'a HashSet<String>,
    /// Whether the owner reports the stored map wholly filled.
    pub filled: bool,
}

/// Why no new map was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The map is what it should be.
    Settled,
    /// The last change is still being filled.
    Filling,
    /// Placement is impossible (too few nodes): the reason.
    Impossible(String),
}

/// The next map of a volume, or why there is none. The new map's `moving` lists the
/// positions its owner must fill, `moves` what changed and why.
pub fn plan(inp: &PlanInput<'_>) -> Result<(PgMapRecord, Vec<Move>), Hold> {
    let map = inp.map;
    let width = usize::from(inp.volume.k) + usize::from(inp.volume.m);
    let m = usize::from(inp.volume.m);
    let registered: HashMap<&str, &NodeRecord> =
        inp.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    // A node whose store failed is lost now: its copies cannot be trusted to be durable.
    let lost: HashSet<String> = inp
        .lost
        .iter()
        .cloned()
        .chain(
            inp.nodes
                .iter()
                .filter(|n| n.failed.is_some())
                .map(|n| n.id.clone()),
        )
        .collect();
    let lost_in_map = map.nodes.iter().any(|n| lost.contains(&n.id));
    let carried: HashSet<(u32, usize)> = if inp.filled {
        HashSet::new()
    } else {
        map.moving.iter().copied().collect()
    };
    // PGs that cannot take writes: fewer positions on nodes that answer than the quorum.
    let quorum = inp.volume.write_quorum.min(width);
    let silent = |id: &str| {
        !registered.contains_key(id) || lost.contains(id) || inp.unreachable.contains(id)
    };
    let below: Vec<usize> = map
        .map
        .iter()
        .enumerate()
        .filter(|(_, row)| row.iter().filter(|&&i| !silent(&map.nodes[i].id)).count() < quorum)
        .map(|(pg, _)| pg)
        .collect();
    if !carried.is_empty() && !lost_in_map && below.is_empty() {
        return Err(Hold::Filling);
    }
    // Candidates: registered nodes that are up, and nodes of the map that are absent but
    // still within their grace period (they keep their positions: a node that returns gets
    // only what it missed).
    let mut cands: Vec<placement::Node> = Vec::new();
    let mut cand_rec: Vec<MapNode> = Vec::new();
    for n in inp.nodes {
        if n.state == NodeState::Up && !lost.contains(&n.id) {
            cands.push(placement::Node::new(&n.id, &n.zone, &n.rack, &n.host));
            cand_rec.push(MapNode::of(n));
        }
    }
    for n in &map.nodes {
        if !registered.contains_key(n.id.as_str()) && !lost.contains(&n.id) {
            cands.push(placement::Node::new(&n.id, &n.zone, &n.rack, &n.host));
            cand_rec.push(n.clone());
        }
    }
    let prev: Vec<Vec<String>> = map
        .map
        .iter()
        .map(|row| row.iter().map(|&i| map.nodes[i].id.clone()).collect())
        .collect();
    let ideal = placement::compute(inp.volume.id, inp.volume.pgs, &cands, width, Some(&prev))
        .map_err(|e| Hold::Impossible(e.to_string()))?;
    // Where the positions of PGs below their write quorum go: placement over the nodes that
    // answer only (none: those PGs wait for their nodes).
    let live: Vec<placement::Node> = cands.iter().filter(|n| !silent(&n.id)).cloned().collect();
    let ideal_live = if below.is_empty() {
        None
    } else {
        placement::compute(inp.volume.id, inp.volume.pgs, &live, width, Some(&prev)).ok()
    };
    // Node ids per position: what is now, what placement wants, what this change does.
    let absent = |id: &str| !registered.contains_key(id);
    let mut next: Vec<Vec<String>> = prev.clone();
    let mut moves = Vec::new();
    let mut moving: HashSet<(u32, usize)> = carried.clone();
    let mut undrainable = false;
    for (pg, row) in ideal.iter().enumerate() {
        let pg32 = pg as u32;
        let want: Vec<&str> = row.iter().map(|&i| cands[i].id.as_str()).collect();
        // 1. Lost nodes' positions move, whatever else.
        for pos in 0..width {
            let cur = prev[pg][pos].as_str();
            if lost.contains(cur) && want[pos] != cur {
                next[pg][pos] = want[pos].to_string();
                moving.insert((pg32, pos));
                moves.push(Move {
                    pg: pg32,
                    index: pos,
                    from: cur.to_string(),
                    to: want[pos].to_string(),
                    reason: MoveReason::Lost,
                });
            }
        }
        // 1b. A PG below its write quorum: the positions of nodes that do not answer move
        //     to nodes that do, now.
        if let (Some(il), true) = (&ideal_live, below.contains(&pg)) {
            for pos in 0..width {
                let cur = next[pg][pos].clone();
                if !silent(&cur) {
                    continue;
                }
                let to = live[il[pg][pos]].id.as_str();
                if to == cur || (0..width).any(|p| next[pg][p] == to) {
                    continue;
                }
                next[pg][pos] = to.to_string();
                moving.insert((pg32, pos));
                moves.push(Move {
                    pg: pg32,
                    index: pos,
                    from: cur,
                    to: to.to_string(),
                    reason: MoveReason::Quorum,
                });
            }
        }
        // 2. At most one other move, and only with nothing of the PG unavailable; none at
        //    all while a lost node's positions are being replaced or PGs are below their
        //    write quorum (redundancy first: rebalancing waits for the rebuild to be whole).
        if lost_in_map || !below.is_empty() {
            continue;
        }
        let unavailable = (0..width)
            .filter(|&p| moving.contains(&(pg32, p)) || absent(&next[pg][p]))
            .count();
        if m == 0 {
            undrainable |= (0..width).any(|p| want[p] != prev[pg][p]);
            continue;
        }
        if unavailable > 0 {
            continue;
        }
        let optional = (0..width).find_map(|pos| {
            let cur = prev[pg][pos].as_str();
            if want[pos] == cur {
                return None;
            }
            // The ideal row is a valid row; one position of it in the current row must not
            // repeat a node the row keeps.
            let dup = (0..width).any(|p| p != pos && next[pg][p] == want[pos]);
            if dup {
                return None;
            }
            let reason = match registered.get(cur).map(|n| n.state) {
                Some(NodeState::Draining) | Some(NodeState::Out) => MoveReason::Drain,
                _ => MoveReason::Rebalance,
            };
            Some((pos, reason))
        });
        // Drains first: a PG with a draining node moves that one before any rebalance.
        let drain = (0..width).find(|&pos| {
            let cur = prev[pg][pos].as_str();
            want[pos] != cur
                && matches!(
                    registered.get(cur).map(|n| n.state),
                    Some(NodeState::Draining) | Some(NodeState::Out)
                )
                && !(0..width).any(|p| p != pos && next[pg][p] == want[pos])
        });
        let pick = drain.map(|p| (p, MoveReason::Drain)).or(optional);
        if let Some((pos, reason)) = pick {
            let from = prev[pg][pos].clone();
            next[pg][pos] = want[pos].to_string();
            moving.insert((pg32, pos));
            moves.push(Move {
                pg: pg32,
                index: pos,
                from,
                to: want[pos].to_string(),
                reason,
            });
        }
    }
    if moves.is_empty() {
        if undrainable {
            return Err(Hold::Impossible(format!(
                "volume {} has no parity: its fragments can only move by being rebuilt from others, and there are none",
                inp.volume.name
            )));
        }
        return Err(if carried.is_empty() {
            Hold::Settled
        } else {
            Hold::Filling
        });
    }
    // The new map's node list: every node it uses, in first-use order.
    let mut nodes: Vec<MapNode> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut rows = Vec::with_capacity(next.len());
    for row in &next {
        let mut r = Vec::with_capacity(width);
        for id in row {
            let i = *index.entry(id.clone()).or_insert_with(|| {
                let rec = cand_rec
                    .iter()
                    .find(|n| &n.id == id)
                    .or_else(|| map.nodes.iter().find(|n| &n.id == id))
                    .cloned()
                    .unwrap_or_else(|| MapNode {
                        id: id.clone(),
                        address: String::new(),
                        host: String::new(),
                        rack: String::new(),
                        zone: String::new(),
                    });
                nodes.push(rec);
                nodes.len() - 1
            });
            r.push(i);
        }
        rows.push(r);
    }
    let mut moving: Vec<(u32, usize)> = moving.into_iter().collect();
    moving.sort_unstable();
    Ok((
        PgMapRecord {
            epoch: map.epoch + 1,
            nodes,
            map: rows,
            moving,
        },
        moves,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No node lost or unreachable, the map filled: the input most tests vary one field of.
    fn input<'a>(
        volume: &'a VolumeRecord,
        map: &'a PgMapRecord,
        nodes: &'a [NodeRecord],
    ) -> PlanInput<'a> {
        static NONE: std::sync::LazyLock<HashSet<String>> = std::sync::LazyLock::new(HashSet::new);
        PlanInput {
            volume,
            map,
            nodes,
            lost: &NONE,
            unreachable: &NONE,
            filled: true,
        }
    }

    fn vol(k: u8, m: u8, pgs: u32) -> VolumeRecord {
        VolumeRecord {
            name: "v".into(),
            id: 77,
            lun: 0,
            size: 1 << 30,
            block_size: 4096,
            k,
            m,
            chunk: 16384,
            codec: "rs-isal".into(),
            pgs,
            write_quorum: usize::from(k) + 1,
        }
    }

    fn node(i: usize, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: format!("n{i}"),
            address: format!("127.0.0.{}:7000", 20 + i),
            host: format!("h{i}"),
            rack: String::new(),
            zone: String::new(),
            capacity: 0,
            state,
            failed: None,
        }
    }

    fn first_map(v: &VolumeRecord, nodes: &[NodeRecord]) -> PgMapRecord {
        let p: Vec<placement::Node> = nodes
            .iter()
            .map(|n| placement::Node::new(&n.id, &n.zone, &n.rack, &n.host))
            .collect();
        let width = usize::from(v.k + v.m);
        PgMapRecord {
            epoch: 1,
            nodes: nodes.iter().map(MapNode::of).collect(),
            map: placement::compute(v.id, v.pgs, &p, width, None).unwrap(),
            moving: Vec::new(),
        }
    }

    fn ids(m: &PgMapRecord) -> Vec<Vec<String>> {
        m.map
            .iter()
            .map(|r| r.iter().map(|&i| m.nodes[i].id.clone()).collect())
            .collect()
    }

    #[test]
    fn a_settled_map_stays_and_an_absent_node_within_grace_keeps_its_place() {
        let v = vol(4, 2, 64);
        let nodes: Vec<NodeRecord> = (0..7).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes);
        let lost = HashSet::new();
        let inp = PlanInput {
            lost: &lost,
            ..input(&v, &map, &nodes)
        };
        assert_eq!(plan(&inp).unwrap_err(), Hold::Settled);
        // n3 unregistered but within grace: nothing moves.
        let fewer: Vec<NodeRecord> = nodes.iter().filter(|n| n.id != "n3").cloned().collect();
        let inp = PlanInput {
            nodes: &fewer,
            ..inp
        };
        assert_eq!(plan(&inp).unwrap_err(), Hold::Settled);
    }

    /// Two nodes of a 4+2 volume over eight go silent (absent within the grace period, or
    /// reported unreachable by the owner): every PG left with fewer than five answering
    /// nodes has those positions moved at once to the spares; PGs that kept their quorum
    /// are left alone; with no spare to take them nothing moves.
    #[test]
    fn pgs_below_their_write_quorum_move_silent_positions_at_once() {
        let v = vol(4, 2, 64);
        let nodes: Vec<NodeRecord> = (0..8).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes);
        let before = ids(&map);
        // n2 has no lease (within its grace period); n5 is registered but the owner cannot
        // reach it.
        let registered: Vec<NodeRecord> = nodes.iter().filter(|n| n.id != "n2").cloned().collect();
        let unreachable: HashSet<String> = ["n5".to_string()].into();
        let (next, moves) = plan(&PlanInput {
            unreachable: &unreachable,
            ..input(&v, &map, &registered)
        })
        .unwrap();
        let after = ids(&next);
        let silent = |id: &str| id == "n2" || id == "n5";
        let mut moved_pgs = 0;
        for (pg, (a, b)) in before.iter().zip(&after).enumerate() {
            let both = a.iter().filter(|x| silent(x)).count() == 2;
            if both {
                moved_pgs += 1;
                assert!(b.iter().all(|x| !silent(x)), "pg {pg}: {a:?} -> {b:?}");
                let kept = a.iter().zip(b).filter(|(x, y)| x == y).count();
                assert_eq!(
                    kept, 4,
                    "pg {pg}: only the silent positions move: {a:?} -> {b:?}"
                );
                let mut uniq = b.clone();
                uniq.sort();
                uniq.dedup();
                assert_eq!(uniq.len(), 6, "pg {pg}: {b:?}");
            } else {
                assert_eq!(a, b, "pg {pg} kept its quorum and must stay");
            }
        }
        assert!(moved_pgs > 0, "no PG held both n2 and n5: {before:?}");
        assert_eq!(moves.len(), moved_pgs * 2);
        assert!(
            moves.iter().all(|m| m.reason == MoveReason::Quorum),
            "{moves:?}"
        );
        let mut moving: Vec<(u32, usize)> = moves.iter().map(|m| (m.pg, m.index)).collect();
        moving.sort_unstable();
        assert_eq!(next.moving, moving);
        // Planned again while that fill runs (not filled): nothing more moves.
        assert_eq!(
            plan(&PlanInput {
                unreachable: &unreachable,
                filled: false,
                ..input(&v, &next, &registered)
            })
            .unwrap_err(),
            Hold::Filling
        );
        // Six nodes only, two silent: no node can take the positions; nothing moves.
        let six: Vec<NodeRecord> = (0..6).map(|i| node(i, NodeState::Up)).collect();
        let map6 = first_map(&v, &six);
        let reg6: Vec<NodeRecord> = six.iter().filter(|n| n.id != "n2").cloned().collect();
        let r = plan(&PlanInput {
            unreachable: &unreachable,
            ..input(&v, &map6, &reg6)
        });
        assert!(r.is_err(), "{r:?}");
        // One silent node only: every PG keeps its quorum; nothing moves before the grace.
        let r = plan(&input(&v, &map, &registered));
        assert_eq!(r.unwrap_err(), Hold::Settled);
    }

    #[test]
    fn a_lost_node_moves_every_position_at_once_and_nothing_else() {
        let v = vol(4, 2, 64);
        let nodes: Vec<NodeRecord> = (0..8).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes);
        let live: Vec<NodeRecord> = nodes.iter().filter(|n| n.id != "n5").cloned().collect();
        let lost: HashSet<String> = ["n5".to_string()].into();
        let (next, moves) = plan(&PlanInput {
            lost: &lost,
            ..input(&v, &map, &live)
        })
        .unwrap();
        let (a, b) = (ids(&map), ids(&next));
        let held = a.iter().flatten().filter(|x| *x == "n5").count();
        assert!(held > 0);
        assert!(b.iter().flatten().all(|x| x != "n5"));
        assert_eq!(moves.len(), held, "only the lost node's positions move");
        assert!(moves
            .iter()
            .all(|m| m.reason == MoveReason::Lost && m.from == "n5"));
        assert_eq!(next.moving.len(), held);
        assert_eq!(next.epoch, 2);
        for (ra, rb) in a.iter().zip(&b) {
            let mut s = rb.clone();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), rb.len(), "distinct nodes per PG");
            let changed = ra.iter().zip(rb).filter(|(x, y)| x != y).count();
            assert!(changed <= 1);
        }
        assert!(next.nodes.iter().all(|n| n.id != "n5"));
    }

    #[test]
    fn a_node_whose_store_failed_is_rebuilt_elsewhere_at_once_while_still_registered() {
        let v = vol(4, 2, 64);
        let mut nodes: Vec<NodeRecord> = (0..8).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes);
        nodes[3].failed = Some("fdatasync: Input/output error".into());
        // Mid-fill too: a failed node does not wait for the fill to finish.
        let mut filling = map.clone();
        filling.moving = vec![(0, 0)];
        for (m, filled) in [(&map, true), (&filling, false)] {
            let (next, moves) = plan(&PlanInput {
                filled,
                ..input(&v, m, &nodes)
            })
            .unwrap();
            let held = ids(m).iter().flatten().filter(|x| *x == "n3").count();
            assert!(held > 0);
            assert_eq!(moves.len(), held, "only the failed node's positions move");
            assert!(moves
                .iter()
                .all(|mv| mv.reason == MoveReason::Lost && mv.from == "n3"));
            assert!(ids(&next).iter().flatten().all(|x| x != "n3"));
            assert!(next.nodes.iter().all(|n| n.id != "n3"), "never a candidate");
        }
        assert_eq!(nodes[3].shown_state(), "failed");
    }

    #[test]
    fn a_fill_in_progress_holds_the_next_change_unless_a_node_is_lost() {
        let v = vol(4, 2, 64);
        let nodes: Vec<NodeRecord> = (0..8).map(|i| node(i, NodeState::Up)).collect();
        let mut map = first_map(&v, &nodes);
        map.moving = vec![(0, 1)];
        let mut drained = nodes.clone();
        drained[2].state = NodeState::Draining;
        let inp = PlanInput {
            filled: false,
            ..input(&v, &map, &drained)
        };
        assert_eq!(plan(&inp).unwrap_err(), Hold::Filling);
        // Lost meanwhile: it moves, and the unfinished position stays filling.
        let lost: HashSet<String> = ["n4".to_string()].into();
        let live: Vec<NodeRecord> = nodes.iter().filter(|n| n.id != "n4").cloned().collect();
        let (next, _) = plan(&PlanInput {
            nodes: &live,
            lost: &lost,
            unreachable: &HashSet::new(),
            ..inp
        })
        .unwrap();
        assert!(next.moving.contains(&(0, 1)));
        assert!(ids(&next).iter().flatten().all(|x| x != "n4"));
    }

    #[test]
    fn a_drain_moves_one_position_per_pg_per_change_until_the_node_is_empty() {
        let v = vol(4, 2, 64);
        let mut nodes: Vec<NodeRecord> = (0..8).map(|i| node(i, NodeState::Up)).collect();
        let mut map = first_map(&v, &nodes);
        nodes[6].state = NodeState::Draining;
        let mut rounds = 0;
        loop {
            match plan(&input(&v, &map, &nodes)) {
                Ok((next, moves)) => {
                    let per_pg: HashMap<u32, usize> =
                        moves.iter().fold(HashMap::new(), |mut h, m| {
                            *h.entry(m.pg).or_default() += 1;
                            h
                        });
                    assert!(per_pg.values().all(|&c| c == 1), "{moves:?}");
                    map = next;
                    rounds += 1;
                    assert!(rounds < 10, "drain converges");
                }
                Err(Hold::Settled) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(ids(&map).iter().flatten().all(|x| x != "n6"), "drained");
    }

    #[test]
    fn a_new_node_gets_a_share_without_pgs_losing_more_than_one_position() {
        let v = vol(4, 2, 256);
        let nodes: Vec<NodeRecord> = (0..8).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes[..7]);
        let (next, moves) = plan(&input(&v, &map, &nodes)).unwrap();
        let to_new = moves.iter().filter(|m| m.to == "n7").count();
        // Its share is 256 * 6 / 8 = 192 positions; a good part of it in one change.
        assert!(to_new > 100, "{to_new}");
        assert!(moves.iter().all(|m| m.reason == MoveReason::Rebalance));
        let mut pgs: Vec<u32> = moves.iter().map(|m| m.pg).collect();
        pgs.sort_unstable();
        let n = pgs.len();
        pgs.dedup();
        assert_eq!(pgs.len(), n, "one move per PG");
        assert_eq!(next.moving.len(), n);
    }

    #[test]
    fn rebalancing_onto_new_nodes_converges() {
        let v = vol(4, 2, 128);
        let nodes: Vec<NodeRecord> = (0..10).map(|i| node(i, NodeState::Up)).collect();
        let mut map = first_map(&v, &nodes[..7]);
        let mut rounds = 0;
        loop {
            match plan(&input(&v, &map, &nodes)) {
                Ok((next, _)) => {
                    map = next;
                    rounds += 1;
                    assert!(rounds <= 12, "rebalancing does not settle");
                }
                Err(Hold::Settled) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        let mut load: HashMap<String, usize> = HashMap::new();
        for id in ids(&map).into_iter().flatten() {
            *load.entry(id).or_default() += 1;
        }
        let share = 128.0 * 6.0 / 10.0;
        for n in &nodes {
            let l = load.get(&n.id).copied().unwrap_or(0) as f64;
            assert!(
                (l - share).abs() <= share * 0.15,
                "{}: {l} of {share}: {load:?}",
                n.id
            );
        }
        println!("settled after {rounds} changes: {load:?}");
    }

    #[test]
    fn no_parity_no_drain_and_too_few_nodes_is_said() {
        let v = vol(3, 0, 16);
        let mut nodes: Vec<NodeRecord> = (0..4).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes);
        nodes[0].state = NodeState::Draining;
        let r = plan(&input(&v, &map, &nodes));
        assert!(
            matches!(&r, Err(Hold::Impossible(why)) if why.contains("no parity")),
            "{r:?}"
        );
        let v = vol(4, 2, 16);
        let nodes: Vec<NodeRecord> = (0..6).map(|i| node(i, NodeState::Up)).collect();
        let map = first_map(&v, &nodes);
        let lost: HashSet<String> = ["n1".to_string()].into();
        let live: Vec<NodeRecord> = nodes.iter().filter(|n| n.id != "n1").cloned().collect();
        let r = plan(&PlanInput {
            lost: &lost,
            ..input(&v, &map, &live)
        });
        assert!(matches!(r, Err(Hold::Impossible(_))), "{r:?}");
    }
}
