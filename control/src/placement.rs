//! Placement: which nodes hold a volume's replicas, and where its nexus opens. A pure function
//! of the node records (and a seed), so the leader's decision can be recorded before anything
//! acts on it, and tests can check it without a cluster.
//!
//! The rules, in order (docs/control.md, "Placement"):
//!
//! 1. a replica goes only to an `up` node with a pool whose first pool (where the replica
//!    volume is created) has at least the volume's size free, in the volume's zone if it has
//!    a zone constraint, and never to a node that already holds a replica of the volume:
//!    replicas of one volume never share a node;
//! 2. each pick prefers the zones, then within them the racks, that hold the fewest replicas
//!    of the volume so far, so replicas spread across failure domains when there are enough;
//! 3. among the nodes left, the pick is random, weighted by free capacity, from a generator
//!    seeded by the caller (the volume name's hash), so one input always gives one answer.
//!
//! When too few nodes qualify, the error names how many do and why each other node does not.
//! No per-volume or per-node labels are needed: the failure domain comes from the node's
//! registration (zone and rack, defaulting to its host name).

use crate::membership::NodeRecord;
use crate::units::human_size;
use cairn_control_api::NodeState;
use std::collections::HashMap;
use std::fmt;

/// What a volume needs from placement.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Each replica's size: its node's first pool must have this much free.
    pub size_bytes: u64,
    /// How many new replicas to place.
    pub replicas: usize,
    /// Only nodes of this zone qualify.
    pub zone: Option<&'a str>,
    /// Nodes that already hold a replica of the volume: never chosen, and counted when
    /// spreading over zones and racks.
    pub holders: &'a [String],
    /// Seeds the capacity-weighted choice; the same seed and records give the same nodes.
    pub seed: u64,
}

/// Why a node cannot take a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    Down,
    NoPool,
    TooLittleFree {
        pool: String,
        free_bytes: u64,
        need_bytes: u64,
    },
    WrongZone {
        zone: String,
        wanted: String,
    },
    HoldsReplica,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Down => write!(f, "down"),
            Rejection::NoPool => write!(f, "no pool"),
            Rejection::TooLittleFree {
                pool,
                free_bytes,
                need_bytes,
            } => write!(
                f,
                "too little free space: {} free in {pool}, {} needed",
                human_size(*free_bytes),
                human_size(*need_bytes)
            ),
            Rejection::WrongZone { zone, wanted } => write!(f, "zone {zone}, not {wanted}"),
            Rejection::HoldsReplica => write!(f, "already holds a replica"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "{wanted} replica(s) need {wanted} eligible node(s), but only {} of {} node(s) qualify{}{}",
        eligible.len(),
        eligible.len() + rejected.len(),
        list_eligible(eligible),
        list_rejected(rejected)
    )]
    Shortage {
        wanted: usize,
        eligible: Vec<String>,
        rejected: Vec<(String, Rejection)>,
    },
    #[error("no node is up to open the nexus on (replica nodes: {})", holders.join(", "))]
    NoAttachNode { holders: Vec<String> },
}

fn list_eligible(eligible: &[String]) -> String {
    if eligible.is_empty() {
        String::new()
    } else {
        format!(" ({})", eligible.join(", "))
    }
}

fn list_rejected(rejected: &[(String, Rejection)]) -> String {
    if rejected.is_empty() {
        return String::new();
    }
    let each: Vec<String> = rejected.iter().map(|(n, r)| format!("{n}: {r}")).collect();
    format!("; not eligible: {}", each.join("; "))
}

/// Why `node` cannot take a replica under `req`, or None when it can.
pub fn rejection(node: &NodeRecord, req: &Request<'_>) -> Option<Rejection> {
    if req.holders.contains(&node.id) {
        return Some(Rejection::HoldsReplica);
    }
    if node.state != NodeState::Up {
        return Some(Rejection::Down);
    }
    let Some(pool) = node.pools.first() else {
        return Some(Rejection::NoPool);
    };
    if let Some(wanted) = req.zone {
        if node.zone != wanted {
            return Some(Rejection::WrongZone {
                zone: node.zone.clone(),
                wanted: wanted.to_string(),
            });
        }
    }
    if pool.free_bytes < req.size_bytes {
        return Some(Rejection::TooLittleFree {
            pool: pool.name.clone(),
            free_bytes: pool.free_bytes,
            need_bytes: req.size_bytes,
        });
    }
    None
}

/// The node ids for `req.replicas` new replicas, in pick order, or the shortage.
pub fn place(nodes: &[NodeRecord], req: &Request<'_>) -> Result<Vec<String>, PlacementError> {
    let mut sorted: Vec<&NodeRecord> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut eligible = Vec::new();
    let mut rejected = Vec::new();
    for n in sorted.iter().copied() {
        match rejection(n, req) {
            None => eligible.push(n),
            Some(r) => rejected.push((n.id.clone(), r)),
        }
    }
    if eligible.len() < req.replicas {
        // A holder is not a node the caller could have used; the shortage counts the others.
        rejected.retain(|(_, r)| *r != Rejection::HoldsReplica);
        return Err(PlacementError::Shortage {
            wanted: req.replicas,
            eligible: eligible.iter().map(|n| n.id.clone()).collect(),
            rejected,
        });
    }
    let mut zones: HashMap<&str, usize> = HashMap::new();
    let mut racks: HashMap<(&str, &str), usize> = HashMap::new();
    for h in sorted.iter().filter(|n| req.holders.contains(&n.id)) {
        *zones.entry(&h.zone).or_default() += 1;
        *racks.entry((&h.zone, &h.rack)).or_default() += 1;
    }
    let mut rng = SplitMix64(req.seed);
    let mut chosen = Vec::with_capacity(req.replicas);
    for _ in 0..req.replicas {
        let zone_min = eligible
            .iter()
            .map(|n| zones.get(n.zone.as_str()).copied().unwrap_or(0))
            .min();
        let in_zone: Vec<&NodeRecord> = eligible
            .iter()
            .copied()
            .filter(|n| Some(zones.get(n.zone.as_str()).copied().unwrap_or(0)) == zone_min)
            .collect();
        let rack_of = |n: &NodeRecord| {
            racks
                .get(&(n.zone.as_str(), n.rack.as_str()))
                .copied()
                .unwrap_or(0)
        };
        let rack_min = in_zone.iter().map(|n| rack_of(n)).min();
        let pool: Vec<&NodeRecord> = in_zone
            .into_iter()
            .filter(|n| Some(rack_of(n)) == rack_min)
            .collect();
        let pick = weighted_pick(&pool, &mut rng);
        *zones.entry(&pick.zone).or_default() += 1;
        *racks.entry((&pick.zone, &pick.rack)).or_default() += 1;
        eligible.retain(|n| n.id != pick.id);
        chosen.push(pick.id.clone());
    }
    Ok(chosen)
}

/// One of `nodes` (not empty, each with a first pool), chosen with probability proportional to
/// its first pool's free bytes (plus one, so an exactly-full fit still has a chance).
fn weighted_pick<'a>(nodes: &[&'a NodeRecord], rng: &mut SplitMix64) -> &'a NodeRecord {
    assert!(!nodes.is_empty(), "weighted_pick over no nodes");
    let weight = |n: &NodeRecord| u128::from(n.pools.first().map_or(0, |p| p.free_bytes)) + 1;
    let total: u128 = nodes.iter().map(|n| weight(n)).sum();
    let mut point = (u128::from(rng.next()) * total) >> 64;
    for n in nodes {
        let w = weight(n);
        if point < w {
            return n;
        }
        point -= w;
    }
    nodes[nodes.len() - 1]
}

/// Where to open a volume's nexus when the caller names no node: an `up` node holding a
/// replica (the one with the most free space, then the lowest id), else any `up` node with an
/// NBD listener. Reading beside the data saves a network hop for every local read.
pub fn attach_target(nodes: &[NodeRecord], holders: &[String]) -> Result<String, PlacementError> {
    let free = |n: &NodeRecord| n.pools.first().map_or(0, |p| p.free_bytes);
    let up = |n: &&NodeRecord| n.state == NodeState::Up && n.addresses.nbd.is_some();
    let best = |it: &mut dyn Iterator<Item = &NodeRecord>| {
        it.max_by(|a, b| free(a).cmp(&free(b)).then_with(|| b.id.cmp(&a.id)))
            .map(|n| n.id.clone())
    };
    best(&mut nodes.iter().filter(up).filter(|n| holders.contains(&n.id)))
        .or_else(|| best(&mut nodes.iter().filter(up)))
        .ok_or_else(|| PlacementError::NoAttachNode {
            holders: holders.to_vec(),
        })
}

/// The placement seed of a volume: FNV-1a of its name, so a retried decision for one volume
/// lands on the same nodes while different volumes spread differently.
pub fn seed_of(name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    name.bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// A small deterministic generator (SplitMix64): placement needs repeatability, not secrecy.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::testing;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const GIB: u64 = 1 << 30;

    fn node(id: &str, zone: &str, rack: &str, free_bytes: u64, up: bool) -> NodeRecord {
        let n = testing::node(id, zone, rack, free_bytes.max(10 * GIB), free_bytes);
        if up {
            n
        } else {
            testing::down(n, 0)
        }
    }

    fn req(replicas: usize) -> Request<'static> {
        Request {
            size_bytes: GIB,
            replicas,
            zone: None,
            holders: &[],
            seed: 7,
        }
    }

    #[test]
    fn replicas_spread_over_zones_then_racks() {
        let nodes = [
            node("a1", "za", "r1", 5 * GIB, true),
            node("a2", "za", "r2", 5 * GIB, true),
            node("b1", "zb", "r1", 5 * GIB, true),
            node("b2", "zb", "r1", 5 * GIB, true),
            node("c1", "zc", "r1", 5 * GIB, true),
        ];
        let got = place(&nodes, &req(3)).unwrap();
        let zones: HashSet<char> = got.iter().map(|id| id.chars().next().unwrap()).collect();
        assert_eq!(zones.len(), 3, "{got:?}");
        // Two zones only: the third replica takes the other rack of the zone it doubles up.
        let two = &nodes[..4];
        for seed in 0..50 {
            let got = place(two, &Request { seed, ..req(3) }).unwrap();
            let a: Vec<_> = got.iter().filter(|id| id.starts_with('a')).collect();
            let b: Vec<_> = got.iter().filter(|id| id.starts_with('b')).collect();
            assert!(!a.is_empty() && !b.is_empty(), "{got:?}");
        }
    }

    #[test]
    fn the_choice_is_deterministic_and_weighted_by_free_space() {
        let nodes = [
            node("big", "z", "r", 90 * GIB, true),
            node("small", "z", "r", 2 * GIB, true),
        ];
        assert_eq!(
            place(&nodes, &req(1)).unwrap(),
            place(&nodes, &req(1)).unwrap()
        );
        let big = (0..1000)
            .filter(|&seed| place(&nodes, &Request { seed, ..req(1) }).unwrap()[0] == "big")
            .count();
        assert!(
            big > 900,
            "the node with 45x the free space got {big} of 1000"
        );
    }

    #[test]
    fn a_shortage_names_the_count_and_every_reason() {
        let nodes = [
            node("ok", "z1", "r", 5 * GIB, true),
            node("down", "z1", "r", 5 * GIB, false),
            node("full", "z1", "r", GIB / 2, true),
            node("far", "z2", "r", 5 * GIB, true),
            NodeRecord {
                pools: vec![],
                ..node("bare", "z1", "r", 0, true)
            },
        ];
        let err = place(
            &nodes,
            &Request {
                zone: Some("z1"),
                ..req(2)
            },
        )
        .unwrap_err();
        let text = err.to_string();
        for part in [
            "2 replica(s) need 2 eligible node(s), but only 1 of 5 node(s) qualify (ok)",
            "down: down",
            "full: too little free space: 512M free in pool0, 1G needed",
            "far: zone z2, not z1",
            "bare: no pool",
        ] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
    }

    #[test]
    fn holders_are_never_chosen_and_count_for_spreading() {
        let nodes = [
            node("a1", "za", "r", 5 * GIB, true),
            node("a2", "za", "r", 50 * GIB, true),
            node("b1", "zb", "r", 5 * GIB, true),
        ];
        let holders = ["a1".to_string()];
        for seed in 0..20 {
            let got = place(
                &nodes,
                &Request {
                    holders: &holders,
                    seed,
                    ..req(1)
                },
            )
            .unwrap();
            assert_eq!(got, ["b1"], "zone zb holds none yet");
        }
    }

    #[test]
    fn attach_prefers_an_up_replica_holder() {
        let nodes = [
            node("a", "z", "r", 90 * GIB, true),
            node("b", "z", "r", 5 * GIB, true),
            node("c", "z", "r", 9 * GIB, false),
        ];
        let holders = ["b".to_string(), "c".to_string()];
        assert_eq!(attach_target(&nodes, &holders).unwrap(), "b");
        assert_eq!(attach_target(&nodes, &["c".to_string()]).unwrap(), "a");
        assert!(attach_target(&nodes[2..], &holders).is_err());
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeRecord>> {
        prop::collection::vec((0u8..3, 0u8..2, 0u64..8, prop::bool::weighted(0.8)), 0..8).prop_map(
            |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (z, r, free_gib, up))| {
                        node(
                            &format!("n{i}"),
                            &format!("z{z}"),
                            &format!("r{r}"),
                            free_gib * GIB,
                            up,
                        )
                    })
                    .collect()
            },
        )
    }

    proptest! {
        /// Never two replicas on one node, every pick eligible, a shortage only when too few
        /// qualify, and distinct zones whenever the eligible nodes span enough of them.
        #[test]
        fn placement_invariants(nodes in arb_nodes(), replicas in 1usize..4, seed: u64) {
            let r = Request { seed, ..req(replicas) };
            let eligible: Vec<&NodeRecord> =
                nodes.iter().filter(|n| rejection(n, &r).is_none()).collect();
            match place(&nodes, &r) {
                Ok(got) => {
                    prop_assert_eq!(got.len(), replicas);
                    let distinct: HashSet<&String> = got.iter().collect();
                    prop_assert_eq!(distinct.len(), replicas, "two replicas on one node: {:?}", got);
                    for id in &got {
                        prop_assert!(eligible.iter().any(|n| &n.id == id));
                    }
                    let zones_eligible: HashSet<&str> =
                        eligible.iter().map(|n| n.zone.as_str()).collect();
                    let zones_got: HashSet<&str> = got
                        .iter()
                        .map(|id| nodes.iter().find(|n| &n.id == id).unwrap().zone.as_str())
                        .collect();
                    prop_assert_eq!(zones_got.len(), replicas.min(zones_eligible.len()));
                }
                Err(PlacementError::Shortage { eligible: e, .. }) => {
                    prop_assert!(eligible.len() < replicas);
                    prop_assert_eq!(e.len(), eligible.len());
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
