//! Placement: which Proxmox node each service's container runs on.
//!
//! Pure: the nodes come in as data (from `proxmox.nodes`, or what the shell read from the PVE
//! API), the services as their sizes, pins, recorded nodes and spread groups. The rules:
//!
//! 1. A pin (`host.node`) is obeyed; in a known cluster it must name one of its nodes.
//! 2. A node recorded in `nixmox.lock` is kept while the cluster still has that node (even when
//!    it is offline: a service is never moved by an outage), so adding a service never moves
//!    another.
//! 3. Every other service, largest first (then in name order), goes to the online node with room for it that holds
//!    the fewest services of its spread group, then has the most free memory, then the most
//!    free cores, then the smallest name. Free means the node's size minus what the services
//!    already placed there take.
//!
//! `rebalance` asks for a fresh placement (rules 1 and 3 only) and moves what differs.

use std::collections::HashMap;

use crate::model::Origin;

/// Memory per unit of `weight` when a node's memory is not given, in MiB.
pub const WEIGHT_MEMORY_MIB: u64 = 64 * 1024;
/// Cores per unit of `weight` when a node's cores are not given.
pub const WEIGHT_CORES: u64 = 16;

/// One node services may be placed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// Online and listed: new services may go here. An offline node keeps what it has.
    pub online: bool,
    /// Whether new services may go here at all (false for a node only known because a pin or
    /// the lock names it, in a project that does not list its nodes).
    pub placeable: bool,
    /// Memory limit in MiB, when known.
    pub memory: Option<u64>,
    /// Cores of the node, when known: no container placed here gets more.
    pub cores: Option<u32>,
    pub weight: u32,
}

impl Candidate {
    fn memory_size(&self) -> u64 {
        self.memory
            .unwrap_or(u64::from(self.weight) * WEIGHT_MEMORY_MIB)
    }
    fn cores_size(&self) -> u64 {
        self.cores
            .map(u64::from)
            .unwrap_or(u64::from(self.weight) * WEIGHT_CORES)
    }
}

/// One service to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want<'a> {
    pub name: &'a str,
    /// MiB.
    pub memory: u64,
    pub cores: u32,
    /// `host.node`.
    pub pin: Option<&'a str>,
    /// The node `nixmox.lock` records.
    pub locked: Option<&'a str>,
    /// `host.spread`.
    pub spread: Option<&'a str>,
}

/// What could not be placed as asked; the index is into the wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A pin to a node the cluster does not have.
    UnknownNode { service: usize },
    /// A pin to a node without room for the service.
    PinWithoutRoom { service: usize, why: String },
    /// Two services of one spread group pinned to the same node while other nodes are free of
    /// the group.
    Spread {
        service: usize,
        other: usize,
        node: String,
    },
    /// No usable node has room for the service.
    NoRoom { service: usize, why: String },
}

/// The outcome: per want, the index of its node and where the choice came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub nodes: Vec<Option<(usize, Origin)>>,
    pub problems: Vec<Problem>,
}

/// Places every want on a node. `strict`: the cluster's nodes are known, so a pin elsewhere is
/// an error. `fresh`: ignore the recorded nodes (for `rebalance`).
pub fn place(nodes: &[Candidate], wants: &[Want<'_>], strict: bool, fresh: bool) -> Placement {
    let by_name: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut u = Usage {
        memory: vec![0; nodes.len()],
        cores: vec![0; nodes.len()],
        first: HashMap::new(),
        counts: HashMap::new(),
    };
    let mut out = Placement {
        nodes: vec![None; wants.len()],
        problems: Vec::new(),
    };
    place_pins(&mut u, &mut out, nodes, wants, &by_name, strict);
    if !fresh {
        place_locked(&mut u, &mut out, wants, &by_name);
    }
    place_rest(&mut u, &mut out, nodes, wants);
    out
}

/// The first pass: pins, each on its node, reporting an unknown node, a node without room and
/// a spread group that could have avoided the node.
fn place_pins<'a>(
    u: &mut Usage<'a>,
    out: &mut Placement,
    nodes: &[Candidate],
    wants: &[Want<'a>],
    by_name: &HashMap<&str, usize>,
    strict: bool,
) {
    let placeable = nodes.iter().filter(|n| n.placeable && n.online).count();
    for (w, want) in wants.iter().enumerate() {
        let Some(pin) = want.pin else { continue };
        let Some(&n) = by_name.get(pin) else {
            // Only a strict cluster leaves a pin without a candidate.
            debug_assert!(strict);
            out.problems.push(Problem::UnknownNode { service: w });
            continue;
        };
        if let Some(why) = no_room(&nodes[n], u.memory[n], want) {
            out.problems
                .push(Problem::PinWithoutRoom { service: w, why });
        }
        if let Some(g) = want.spread {
            let here = u.first.get(g).and_then(|f| f[n]);
            let occupied = u
                .counts
                .get(g)
                .map(|c| c.iter().filter(|&&k| k > 0).count())
                .unwrap_or(0);
            if let Some(other) = here {
                if occupied < placeable {
                    out.problems.push(Problem::Spread {
                        service: w,
                        other,
                        node: pin.to_string(),
                    });
                }
            }
        }
        u.take(out, wants, w, n, Origin::Manifest);
    }
}

/// The second pass: recorded nodes, kept while the cluster has them.
fn place_locked<'a>(
    u: &mut Usage<'a>,
    out: &mut Placement,
    wants: &[Want<'a>],
    by_name: &HashMap<&str, usize>,
) {
    for (w, want) in wants.iter().enumerate() {
        if want.pin.is_some() {
            continue;
        }
        if let Some(&n) = want.locked.and_then(|l| by_name.get(l)) {
            u.take(out, wants, w, n, Origin::Lock);
        }
    }
}

/// The last pass: the rest, largest first (fewer clusters left without room by fragmentation),
/// then by name (the wants come sorted by name), each on the best node with room.
fn place_rest<'a>(u: &mut Usage<'a>, out: &mut Placement, nodes: &[Candidate], wants: &[Want<'a>]) {
    let mut rest: Vec<usize> = (0..wants.len())
        .filter(|&w| out.nodes[w].is_none() && wants[w].pin.is_none())
        .collect();
    rest.sort_by_key(|&w| (std::cmp::Reverse((wants[w].memory, wants[w].cores)), w));
    for w in rest {
        match best_node(u, nodes, &wants[w]) {
            Some(n) => u.take(out, wants, w, n, Origin::Allocated),
            None => out.problems.push(Problem::NoRoom {
                service: w,
                why: why_no_room(u, nodes, &wants[w]),
            }),
        }
    }
}

/// The node with room for `want` that has fewest of its spread group, then the most free
/// memory, then the most free cores, then the first name.
fn best_node(u: &Usage, nodes: &[Candidate], want: &Want) -> Option<usize> {
    let group = want.spread.and_then(|g| u.counts.get(g));
    let mut best: Option<(usize, (u32, u64, u64))> = None;
    for (n, node) in nodes.iter().enumerate() {
        if !node.placeable || !node.online || no_room(node, u.memory[n], want).is_some() {
            continue;
        }
        let members = group.map(|c| c[n]).unwrap_or(0);
        let free_memory = node.memory_size().saturating_sub(u.memory[n]);
        let free_cores = node.cores_size().saturating_sub(u.cores[n]);
        let better = match &best {
            None => true,
            Some((b, (bm, bfm, bfc))) => (members, u64::MAX - free_memory, u64::MAX - free_cores)
                .cmp(&(*bm, u64::MAX - bfm, u64::MAX - bfc))
                .then_with(|| node.name.cmp(&nodes[*b].name))
                .is_lt(),
        };
        if better {
            best = Some((n, (members, free_memory, free_cores)));
        }
    }
    best.map(|(n, _)| n)
}

/// Why no node can take `want`: each node's reason.
fn why_no_room(u: &Usage, nodes: &[Candidate], want: &Want) -> String {
    if nodes.is_empty() {
        return "the cluster has no nodes".into();
    }
    nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let state = if !node.online {
                "offline".to_string()
            } else if !node.placeable {
                "not in proxmox.nodes".to_string()
            } else {
                no_room(node, u.memory[n], want).unwrap_or_default()
            };
            format!("{}: {state}", node.name)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the services placed so far take of each node.
struct Usage<'a> {
    memory: Vec<u64>,
    cores: Vec<u64>,
    /// Spread group → the first member on each node.
    first: HashMap<&'a str, Vec<Option<usize>>>,
    /// Spread group → members on each node.
    counts: HashMap<&'a str, Vec<u32>>,
}

impl<'a> Usage<'a> {
    fn take(
        &mut self,
        out: &mut Placement,
        wants: &[Want<'a>],
        w: usize,
        n: usize,
        origin: Origin,
    ) {
        let len = self.memory.len();
        self.memory[n] += wants[w].memory;
        self.cores[n] += u64::from(wants[w].cores);
        if let Some(g) = wants[w].spread {
            self.counts.entry(g).or_insert_with(|| vec![0; len])[n] += 1;
            self.first.entry(g).or_insert_with(|| vec![None; len])[n].get_or_insert(w);
        }
        out.nodes[w] = Some((n, origin));
    }
}

/// Why `want` does not fit on `node` with `used` MiB already placed there, if it does not.
fn no_room(node: &Candidate, used: u64, want: &Want<'_>) -> Option<String> {
    if let Some(limit) = node.memory {
        if used + want.memory > limit {
            return Some(format!(
                "{} MiB free of {limit} MiB, {} MiB needed",
                limit.saturating_sub(used),
                want.memory
            ));
        }
    }
    if let Some(cores) = node.cores {
        if want.cores > cores {
            return Some(format!("{cores} cores, {} needed", want.cores));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, memory: Option<u64>) -> Candidate {
        Candidate {
            name: name.into(),
            online: true,
            placeable: true,
            memory,
            cores: None,
            weight: 1,
        }
    }

    fn want<'a>(name: &'a str, memory: u64) -> Want<'a> {
        Want {
            name,
            memory,
            cores: 1,
            pin: None,
            locked: None,
            spread: None,
        }
    }

    fn names(nodes: &[Candidate], p: &Placement) -> Vec<String> {
        p.nodes
            .iter()
            .map(|n| n.map(|(i, _)| nodes[i].name.clone()).unwrap_or_default())
            .collect()
    }

    #[test]
    fn most_free_memory_wins_then_name() {
        let nodes = [node("pve1", Some(4096)), node("pve2", Some(8192))];
        let wants = [want("a", 4096), want("b", 1024), want("c", 1024)];
        let p = place(&nodes, &wants, true, false);
        assert_eq!(names(&nodes, &p), ["pve2", "pve1", "pve2"]);
        assert!(p.problems.is_empty());
    }

    #[test]
    fn spread_and_offline() {
        let mut nodes = vec![node("a", None), node("b", None), node("c", None)];
        nodes[1].online = false;
        let mut wants = vec![want("w1", 512), want("w2", 512), want("w3", 512)];
        for w in &mut wants {
            w.spread = Some("web");
        }
        let p = place(&nodes, &wants, true, false);
        assert_eq!(names(&nodes, &p), ["a", "c", "a"]);
    }

    #[test]
    fn locks_are_kept_and_pins_checked() {
        let nodes = [node("pve1", None), node("pve2", None)];
        let mut wants = vec![want("a", 512), want("b", 512), want("c", 512)];
        wants[0].locked = Some("pve1");
        wants[1].locked = Some("pve1");
        wants[2].pin = Some("pve9");
        let p = place(&nodes, &wants, true, false);
        assert_eq!(p.nodes[0], Some((0, Origin::Lock)));
        assert_eq!(p.nodes[1], Some((0, Origin::Lock)));
        assert_eq!(p.problems, [Problem::UnknownNode { service: 2 }]);
        let fresh = place(&nodes, &wants[..2], true, true);
        assert_eq!(names(&nodes, &fresh), ["pve1", "pve2"]);
    }

    #[test]
    fn no_room_and_pinned_spread() {
        let nodes = [node("pve1", Some(1024)), node("pve2", Some(1024))];
        let mut wants = vec![want("a", 1024), want("b", 1024), want("c", 512)];
        wants[0].pin = Some("pve1");
        wants[1].pin = Some("pve1");
        wants[0].spread = Some("g");
        wants[1].spread = Some("g");
        let p = place(&nodes, &wants, true, false);
        assert!(p.problems.iter().any(|q| matches!(
            q,
            Problem::Spread {
                service: 1,
                other: 0,
                ..
            }
        )));
        assert!(p
            .problems
            .iter()
            .any(|q| matches!(q, Problem::PinWithoutRoom { service: 1, .. })));
        // c fits nowhere: pve1 is over-full, pve2 is empty... so it goes to pve2.
        assert_eq!(names(&nodes, &p)[2], "pve2");
    }
}
