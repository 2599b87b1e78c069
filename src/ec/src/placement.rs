//! Placement: which `k + m` nodes hold the fragments of each placement group.
//!
//! A volume's stripes are grouped into placement groups (stripe `s` is in PG `s mod pgs`).
//! Each PG maps to an ordered list of `width = k + m` distinct nodes: position `i` of the list
//! holds fragment index `i` of every stripe in the PG. [`compute`] makes the whole map of a
//! volume at once.
//!
//! # How nodes are chosen
//!
//! Rendezvous (highest random weight) hashing: for each PG every node gets the score
//! `w / -ln(u)`, `u` a uniform hash of (volume seed, PG, node id) and `w` the node's weight.
//! A PG prefers its highest-scoring nodes. Hashing alone leaves per-node load binomially
//! spread (about ±4% standard deviation for 16 nodes over 1024 PGs, more for larger
//! clusters), so the map is made with bounded loads: a node takes no more than its share of
//! the `pgs × width` fragments plus 5%, and a final pass moves fragments from nodes above
//! their share to nodes below it, preferring the moves the scores favour most, until every
//! node is within 5% of its share or no allowed move is left.
//!
//! # Failure domains
//!
//! A node carries `zone`, `rack` and `host` labels. A PG's nodes are spread over the widest
//! level that has at least `width` distinct domains (zones, else racks, else hosts), each
//! domain used at most once; at the levels above that one, no domain holds more than its even
//! share of the PG. With too few domains at every level the nodes are merely distinct.
//!
//! # Stability
//!
//! Given the map in force ([`compute`]'s `previous`), every fragment whose node is still
//! eligible stays where it is; only the fragments of departed nodes, and those the balancing
//! pass must move to fill a new node or drain an overfull one, change place. Adding or
//! removing one of `n` nodes therefore moves about `1/n` of the fragments.

use std::collections::HashMap;

/// A candidate node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Stable identity (never reused for another disk).
    pub id: String,
    /// Relative capacity; 0 excludes the node.
    pub weight: f64,
    /// Zone label (empty: the node is its own zone).
    pub zone: String,
    /// Rack label.
    pub rack: String,
    /// Host label.
    pub host: String,
}

impl Node {
    /// A node of weight 1 with the given labels.
    pub fn new(id: &str, zone: &str, rack: &str, host: &str) -> Self {
        Self {
            id: id.into(),
            weight: 1.0,
            zone: zone.into(),
            rack: rack.into(),
            host: host.into(),
        }
    }

    fn domain(&self, level: usize) -> &str {
        let d = match level {
            0 => &self.zone,
            1 => &self.rack,
            _ => &self.host,
        };
        if d.is_empty() {
            &self.id
        } else {
            d
        }
    }
}

/// Why a map cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Fewer eligible nodes than the stripe width.
    #[error("{need} distinct nodes needed, {have} available")]
    TooFewNodes {
        /// Fragments per stripe.
        need: usize,
        /// Nodes of positive weight.
        have: usize,
    },
}

/// Allowed deviation of a node's load from its share.
const SLACK: f64 = 0.05;

fn fnv(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finalizer: a stable, well-spread 64-bit mix.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous score of a node for a PG.
pub fn score(seed: u64, pg: u32, node_id: &str, weight: f64) -> f64 {
    let h = mix(seed ^ mix(u64::from(pg) ^ mix(fnv(node_id.as_bytes()))));
    // u in (0, 1): 53 random bits, never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// The PG of a stripe.
pub fn pg_of(stripe: u64, pgs: u32) -> u32 {
    (stripe % u64::from(pgs.max(1))) as u32
}

struct Ctx<'a> {
    nodes: &'a [Node],
    /// The level used strictly (one node per domain), if any.
    strict: Option<usize>,
    /// Per level above `strict`: the most nodes of one PG a domain may hold.
    limit: [usize; 3],
}

impl Ctx<'_> {
    /// Whether `cand` may join the PG's other nodes `others`.
    fn fits(&self, others: &[usize], cand: usize) -> bool {
        if others.contains(&cand) {
            return false;
        }
        let c = &self.nodes[cand];
        for level in 0..3 {
            let d = c.domain(level);
            let same = others
                .iter()
                .filter(|&&o| self.nodes[o].domain(level) == d)
                .count();
            match self.strict {
                Some(s) if level == s && same > 0 => return false,
                Some(s) if level < s && same + 1 > self.limit[level] => return false,
                _ => {}
            }
        }
        true
    }
}

/// The map of a volume: for each of `pgs` PGs, `width` indices into `nodes` (position `i`
/// holds fragment index `i`). `seed` distinguishes volumes. `previous`, the map in force as
/// node ids, keeps every fragment whose node is still eligible in place (see the module
/// docs).
pub fn compute(
    seed: u64,
    pgs: u32,
    nodes: &[Node],
    width: usize,
    previous: Option<&[Vec<String>]>,
) -> Result<Vec<Vec<usize>>, PlacementError> {
    let eligible: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].weight > 0.0)
        .collect();
    if eligible.len() < width {
        return Err(PlacementError::TooFewNodes {
            need: width,
            have: eligible.len(),
        });
    }
    let distinct = |level: usize| {
        let mut d: Vec<&str> = eligible.iter().map(|&i| nodes[i].domain(level)).collect();
        d.sort_unstable();
        d.dedup();
        d.len()
    };
    let strict = (0..3).find(|&l| distinct(l) >= width);
    let mut limit = [usize::MAX; 3];
    for (level, lim) in limit.iter_mut().enumerate() {
        if strict.is_some_and(|s| level < s) {
            *lim = width.div_ceil(distinct(level));
        }
    }
    let ctx = Ctx {
        nodes,
        strict,
        limit,
    };
    let total_w: f64 = eligible.iter().map(|&i| nodes[i].weight).sum();
    let slots = f64::from(pgs) * width as f64;
    let share: Vec<f64> = nodes
        .iter()
        .map(|n| {
            if n.weight > 0.0 {
                slots * n.weight / total_w
            } else {
                0.0
            }
        })
        .collect();
    let cap: Vec<usize> = share
        .iter()
        .map(|s| (s * (1.0 + SLACK)).ceil() as usize)
        .collect();
    let floor: Vec<usize> = share
        .iter()
        .map(|s| (s * (1.0 - SLACK)).floor() as usize)
        .collect();
    let by_id: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.weight > 0.0)
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let scores: Vec<Vec<f64>> = (0..pgs)
        .map(|pg| {
            nodes
                .iter()
                .map(|n| {
                    if n.weight > 0.0 {
                        score(seed, pg, &n.id, n.weight)
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect()
        })
        .collect();
    let mut load = vec![0usize; nodes.len()];
    let mut map: Vec<Vec<Option<usize>>> = vec![vec![None; width]; pgs as usize];
    // 1. What stays: the previous map's fragments on nodes still eligible and still fitting.
    if let Some(prev) = previous {
        for (pg, row) in prev.iter().enumerate().take(pgs as usize) {
            for (pos, id) in row.iter().enumerate().take(width) {
                let Some(&n) = by_id.get(id.as_str()) else {
                    continue;
                };
                let others: Vec<usize> = map[pg].iter().flatten().copied().collect();
                if ctx.fits(&others, n) {
                    map[pg][pos] = Some(n);
                    load[n] += 1;
                }
            }
        }
    }
    // 2. Fill the empty positions: each takes the best-scoring node that fits and has room
    //    (room is relaxed only when nothing else fits).
    let mut order: Vec<usize> = eligible.clone();
    for pg in 0..pgs as usize {
        order.sort_by(|&a, &b| scores[pg][b].total_cmp(&scores[pg][a]));
        for pos in 0..width {
            if map[pg][pos].is_some() {
                continue;
            }
            let others: Vec<usize> = map[pg].iter().flatten().copied().collect();
            let pick = order
                .iter()
                .copied()
                .find(|&n| load[n] < cap[n] && ctx.fits(&others, n))
                .or_else(|| order.iter().copied().find(|&n| ctx.fits(&others, n)));
            let Some(n) = pick else {
                // Only possible when domain limits exclude every node: take any distinct one.
                let n = order
                    .iter()
                    .copied()
                    .find(|n| !others.contains(n))
                    .expect("width <= eligible nodes");
                map[pg][pos] = Some(n);
                load[n] += 1;
                continue;
            };
            map[pg][pos] = Some(n);
            load[n] += 1;
        }
    }
    let mut map: Vec<Vec<usize>> = map
        .into_iter()
        .map(|row| row.into_iter().map(|x| x.expect("filled")).collect())
        .collect();
    // 3. Balance: drain nodes above their cap, then fill nodes below their floor, taking the
    //    moves with the best score gain first.
    for _round in 0..4 {
        let mut changed = false;
        let mut over: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&n| load[n] > cap[n])
            .collect();
        over.sort_by_key(|&n| std::cmp::Reverse(load[n] - cap[n]));
        for from in over {
            let mut cands: Vec<(f64, usize, usize, usize)> = Vec::new();
            for (pg, row) in map.iter().enumerate() {
                let Some(pos) = row.iter().position(|&x| x == from) else {
                    continue;
                };
                let others: Vec<usize> = row.iter().copied().filter(|&x| x != from).collect();
                let best = eligible
                    .iter()
                    .copied()
                    .filter(|&to| (load[to] as f64) < share[to] && ctx.fits(&others, to))
                    .max_by(|&a, &b| scores[pg][a].total_cmp(&scores[pg][b]));
                if let Some(to) = best {
                    cands.push((scores[pg][to] - scores[pg][from], pg, pos, to));
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (_, pg, pos, to) in cands {
                if load[from] <= cap[from] {
                    break;
                }
                let others: Vec<usize> = map[pg].iter().copied().filter(|&x| x != from).collect();
                if load[to] >= cap[to] || !ctx.fits(&others, to) || map[pg][pos] != from {
                    continue;
                }
                map[pg][pos] = to;
                load[from] -= 1;
                load[to] += 1;
                changed = true;
            }
        }
        let under: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&n| load[n] < floor[n])
            .collect();
        for to in under {
            let mut cands: Vec<(f64, usize, usize)> = Vec::new();
            for (pg, row) in map.iter().enumerate() {
                if row.contains(&to) {
                    continue;
                }
                for (pos, &from) in row.iter().enumerate() {
                    if (load[from] as f64) <= share[from] {
                        continue;
                    }
                    let others: Vec<usize> = row
                        .iter()
                        .enumerate()
                        .filter(|(p, _)| *p != pos)
                        .map(|(_, &x)| x)
                        .collect();
                    if ctx.fits(&others, to) {
                        cands.push((scores[pg][to] - scores[pg][from], pg, pos));
                    }
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (_, pg, pos) in cands {
                if load[to] >= floor[to] {
                    break;
                }
                let from = map[pg][pos];
                let others: Vec<usize> = map[pg]
                    .iter()
                    .enumerate()
                    .filter(|(p, _)| *p != pos)
                    .map(|(_, &x)| x)
                    .collect();
                if (load[from] as f64) <= share[from]
                    || map[pg].contains(&to)
                    || !ctx.fits(&others, to)
                {
                    continue;
                }
                map[pg][pos] = to;
                load[from] -= 1;
                load[to] += 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn cluster(zones: usize, racks: usize, hosts: usize, per_host: usize) -> Vec<Node> {
        let mut v = Vec::new();
        for z in 0..zones {
            for r in 0..racks {
                for h in 0..hosts {
                    for d in 0..per_host {
                        v.push(Node::new(
                            &format!("z{z}r{r}h{h}d{d}"),
                            &format!("z{z}"),
                            &format!("z{z}r{r}"),
                            &format!("z{z}r{r}h{h}"),
                        ));
                    }
                }
            }
        }
        v
    }

    fn ids(nodes: &[Node], map: &[Vec<usize>]) -> Vec<Vec<String>> {
        map.iter()
            .map(|r| r.iter().map(|&i| nodes[i].id.clone()).collect())
            .collect()
    }

    fn distinct_at(nodes: &[Node], pick: &[usize], f: impl Fn(&Node) -> &str) -> bool {
        let s: HashSet<&str> = pick.iter().map(|&i| f(&nodes[i])).collect();
        s.len() == pick.len()
    }

    fn moved(a: &[Vec<String>], b: &[Vec<String>]) -> usize {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
            .sum()
    }

    #[test]
    fn too_few_nodes() {
        let n = cluster(1, 1, 1, 3);
        assert_eq!(
            compute(1, 4, &n, 6, None),
            Err(PlacementError::TooFewNodes { need: 6, have: 3 })
        );
    }

    #[test]
    fn spreads_over_the_widest_level_with_room() {
        // 6 zones: every PG in 6 distinct zones.
        let n = cluster(6, 2, 1, 1);
        for p in compute(3, 256, &n, 6, None).unwrap() {
            assert!(distinct_at(&n, &p, |x| &x.zone), "{p:?}");
        }
        // 3 zones × 2 racks: racks distinct, two per zone.
        let n = cluster(3, 2, 2, 1);
        for p in compute(3, 256, &n, 6, None).unwrap() {
            assert!(distinct_at(&n, &p, |x| &x.rack));
            let mut per_zone: HashMap<&str, usize> = HashMap::new();
            for &i in &p {
                *per_zone.entry(&n[i].zone).or_default() += 1;
            }
            assert!(per_zone.values().all(|&c| c == 2), "{per_zone:?}");
        }
        // One host with 8 disks: distinct disks.
        let n = cluster(1, 1, 1, 8);
        for p in compute(3, 64, &n, 6, None).unwrap() {
            let s: HashSet<usize> = p.iter().copied().collect();
            assert_eq!(s.len(), 6);
        }
    }

    #[test]
    fn weights_shift_load_and_zero_excludes() {
        let mut n = cluster(1, 1, 12, 1);
        n[0].weight = 0.0;
        n[1].weight = 2.0;
        let m = compute(5, 1024, &n, 3, None).unwrap();
        let count = |i: usize| m.iter().flatten().filter(|&&x| x == i).count();
        assert_eq!(count(0), 0);
        let ratio = count(1) as f64 / count(2) as f64;
        assert!((1.8..2.2).contains(&ratio), "weight 2 holds {ratio:.2}x");
    }

    #[test]
    fn the_same_inputs_give_the_same_map() {
        let n = cluster(2, 2, 3, 1);
        assert_eq!(
            compute(9, 128, &n, 6, None).unwrap(),
            compute(9, 128, &n, 6, None).unwrap()
        );
        assert_ne!(
            compute(9, 128, &n, 6, None).unwrap(),
            compute(10, 128, &n, 6, None).unwrap(),
            "the seed matters"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Every PG gets distinct nodes in distinct failure domains when enough exist.
        #[test]
        fn distinct_nodes_and_domains(
            zones in 1usize..5, racks in 1usize..4, hosts in 1usize..4, per_host in 1usize..3,
            k in 1usize..=8, m in 0usize..=4, seed in any::<u64>(),
        ) {
            let n = cluster(zones, racks, hosts, per_host);
            let width = k + m;
            prop_assume!(n.len() >= width);
            for p in compute(seed, 64, &n, width, None).unwrap() {
                let s: HashSet<usize> = p.iter().copied().collect();
                prop_assert_eq!(s.len(), width);
                if zones >= width {
                    prop_assert!(distinct_at(&n, &p, |x| &x.zone));
                } else if zones * racks >= width {
                    prop_assert!(distinct_at(&n, &p, |x| &x.rack));
                } else if zones * racks * hosts >= width {
                    prop_assert!(distinct_at(&n, &p, |x| &x.host));
                }
            }
        }

        /// Over 1024 PGs every node's share is within ±10% of the mean.
        #[test]
        fn balanced_load(nodes in 6usize..=40, width in 3usize..=8, seed in any::<u64>()) {
            let n = cluster(1, 1, nodes, 1);
            prop_assume!(nodes >= width);
            let m = compute(seed, 1024, &n, width, None).unwrap();
            let mut count = vec![0usize; nodes];
            for row in &m {
                for &i in row {
                    count[i] += 1;
                }
            }
            let mean = (1024 * width) as f64 / nodes as f64;
            for (i, &c) in count.iter().enumerate() {
                prop_assert!((c as f64 - mean).abs() <= 0.10 * mean, "node {} holds {} (mean {})", i, c, mean);
            }
        }

        /// Adding or removing one of n nodes moves about 1/n of the fragments.
        #[test]
        fn minimal_movement(nodes in 8usize..=24, seed in any::<u64>(), victim in any::<prop::sample::Index>()) {
            let width = 6usize;
            let pgs = 1024u32;
            let base = cluster(1, 1, nodes, 1);
            let before = ids(&base, &compute(seed, pgs, &base, width, None).unwrap());
            let total = (pgs as usize * width) as f64;
            // Add one node.
            let mut grown = base.clone();
            grown.push(Node::new("newcomer", "z0", "z0r0", "newcomer-host"));
            let after = ids(&grown, &compute(seed, pgs, &grown, width, Some(&before)).unwrap());
            let frac = moved(&before, &after) as f64 / total;
            let ideal = 1.0 / (nodes + 1) as f64;
            prop_assert!(frac <= ideal * 1.2 + 0.005, "adding moved {:.3} (ideal {:.3})", frac, ideal);
            // Remove one node.
            let gone = victim.index(nodes);
            let mut shrunk = base;
            shrunk[gone].weight = 0.0;
            let after = ids(&shrunk, &compute(seed, pgs, &shrunk, width, Some(&before)).unwrap());
            let frac = moved(&before, &after) as f64 / total;
            let ideal = 1.0 / nodes as f64;
            prop_assert!(frac <= ideal * 1.2 + 0.005, "removing moved {:.3} (ideal {:.3})", frac, ideal);
        }
    }
}
