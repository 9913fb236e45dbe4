//! Preemption (step 8 of [`super::scheduling`]): which running jobs of a
//! lower class make room for a request that does not fit.
//!
//! The cheapest victim set wins: fewest instances evicted, then least run
//! time lost (instances × time run), then the pool's node order. A victim
//! is evicted whole (every instance of its run, a gang included), and only
//! jobs that have run at least the minimum run time are candidates. For a
//! request of several instances the room is made one instance at a time:
//! an instance that fits without evicting anything takes no victim;
//! otherwise each node's cheapest set that makes room for one instance
//! there is found (every subset of the node's candidates, up to
//! [`EXACT_UP_TO`] of them; beyond that, candidates are added cheapest
//! first) and the cheapest node's set is taken. The capacity model is the
//! placer's: whole GPUs are never shared, a fraction goes on one GPU,
//! models and health count.

use super::job::{PriorityClass, Resources};
use super::placement::NodeCapacity;

/// Candidates on one node searched exhaustively (2^N subsets).
pub const EXACT_UP_TO: usize = 12;

/// A running job that a higher class may preempt.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub job_id: &'a str,
    pub tenant: &'a str,
    pub pool: &'a str,
    pub class: PriorityClass,
    /// When its current run started (ms).
    pub started_ms: i64,
    /// Per instance.
    pub resources: &'a Resources,
    /// Each instance holding resources: its node and GPU indexes.
    pub instances: Vec<(&'a str, &'a [u32])>,
}

impl Candidate<'_> {
    /// What evicting it costs: (instances, run time lost in ms).
    fn cost(&self, now_ms: i64) -> (u64, i64) {
        let n = self.instances.len() as u64;
        (
            n,
            (now_ms - self.started_ms).max(0).saturating_mul(n as i64),
        )
    }
}

/// Whether one instance of `res` fits on `n` now.
pub fn fits(n: &NodeCapacity, res: &Resources) -> bool {
    if !n.schedulable
        || n.cpu_free_milli < res.cpu_milli as i64
        || n.memory_free_mib < res.memory_mib as i64
    {
        return false;
    }
    let model_ok = |m: &str| res.gpu_models.is_empty() || res.gpu_models.iter().any(|x| x == m);
    let usable = n.gpus.iter().filter(|g| g.healthy && model_ok(&g.model));
    if res.gpus > 0 {
        usable.filter(|g| g.free_milli >= 1000).count() >= res.gpus as usize
    } else if res.gpu_milli > 0 {
        usable.into_iter().any(|g| g.free_milli >= res.gpu_milli)
    } else {
        true
    }
}

/// Takes one instance of `res` on `n` (it must fit): the lowest-index
/// whole GPUs, or the fullest GPU a fraction fits on.
fn take(n: &mut NodeCapacity, res: &Resources) {
    n.cpu_free_milli -= res.cpu_milli as i64;
    n.memory_free_mib -= res.memory_mib as i64;
    let model_ok = |m: &str| res.gpu_models.is_empty() || res.gpu_models.iter().any(|x| x == m);
    if res.gpus > 0 {
        let mut left = res.gpus;
        for g in n.gpus.iter_mut() {
            if left > 0 && g.healthy && model_ok(&g.model) && g.free_milli >= 1000 {
                g.free_milli = 0;
                left -= 1;
            }
        }
    } else if res.gpu_milli > 0
        && let Some(g) = n
            .gpus
            .iter_mut()
            .filter(|g| g.healthy && model_ok(&g.model) && g.free_milli >= res.gpu_milli)
            .min_by_key(|g| g.free_milli)
    {
        g.free_milli -= res.gpu_milli;
    }
}

/// Gives back what `c`'s instances hold on the nodes.
fn release(nodes: &mut [NodeCapacity], c: &Candidate<'_>) {
    let per = super::placement::gpu_ask(c.resources).1 as u32;
    for (node, gpus) in &c.instances {
        let Some(n) = nodes.iter_mut().find(|n| n.node_id == *node) else {
            continue;
        };
        n.cpu_free_milli += c.resources.cpu_milli as i64;
        n.memory_free_mib += c.resources.memory_mib as i64;
        for idx in *gpus {
            if let Some(g) = n.gpus.iter_mut().find(|g| g.index == *idx) {
                g.free_milli = (g.free_milli + per).min(1000);
            }
        }
    }
}

/// The victims (indexes into `candidates`) that make room for `instances`
/// instances of `res` in `pool`, cheapest first by the module's rule; None
/// when evicting every eligible candidate would not make room (or there
/// is none). Candidates of another pool, of `class` or above, or younger
/// than `min_runtime_ms` are not taken; another tenant's only if
/// preemptible (a normal job is preempted only by its own tenant's) or,
/// with `reclaim` (fair-share preemption: the caller has already masked,
/// in `taken`, another tenant's candidates its share protects), of
/// `class` or below.
#[allow(clippy::too_many_arguments)]
pub fn choose(
    nodes: &[NodeCapacity],
    pool: &str,
    tenant: &str,
    res: &Resources,
    instances: u32,
    class: PriorityClass,
    candidates: &[Candidate<'_>],
    taken: &[bool],
    reclaim: bool,
    min_runtime_ms: i64,
    now_ms: i64,
) -> Option<Vec<usize>> {
    let eligible: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            let c = &candidates[i];
            let by_class =
                c.class < class && (c.class == PriorityClass::Preemptible || c.tenant == tenant);
            let by_share = reclaim && c.tenant != tenant && c.class <= class;
            !taken.get(i).copied().unwrap_or(false)
                && c.pool == pool
                && (by_class || by_share)
                && now_ms - c.started_ms >= min_runtime_ms
        })
        .collect();
    if eligible.is_empty() {
        return None;
    }
    // The eligible candidates by node.
    let mut by_node: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for &i in &eligible {
        for (node, _) in &candidates[i].instances {
            let list = by_node.entry(node).or_default();
            if list.last() != Some(&i) {
                list.push(i);
            }
        }
    }
    let mut sim: Vec<NodeCapacity> = nodes.iter().filter(|n| n.pool == pool).cloned().collect();
    let mut chosen: Vec<usize> = Vec::new();
    for _ in 0..instances {
        if let Some(n) = sim.iter_mut().find(|n| fits(n, res)) {
            take(n, res);
            continue;
        }
        let mut best: Option<((u64, i64), usize, Vec<usize>)> = None;
        for (pos, node) in sim.iter().enumerate() {
            if !node.schedulable {
                continue;
            }
            let Some(on) = by_node.get(node.node_id.as_str()) else {
                continue;
            };
            let here: Vec<usize> = on.iter().copied().filter(|i| !chosen.contains(i)).collect();
            if let Some((cost, set)) = cheapest_on(&sim, pos, res, &here, candidates, now_ms)
                && best.as_ref().is_none_or(|b| cost < b.0)
            {
                best = Some((cost, pos, set));
            }
        }
        let (_, pos, set) = best?;
        for &i in &set {
            release(&mut sim, &candidates[i]);
        }
        take(&mut sim[pos], res);
        chosen.extend(set);
    }
    Some(chosen)
}

/// The cheapest subset of `here` whose eviction makes room for one
/// instance on `sim[pos]`.
fn cheapest_on(
    sim: &[NodeCapacity],
    pos: usize,
    res: &Resources,
    here: &[usize],
    candidates: &[Candidate<'_>],
    now_ms: i64,
) -> Option<((u64, i64), Vec<usize>)> {
    let room_after = |set: &[usize]| {
        let mut n = vec![sim[pos].clone()];
        for &i in set {
            release(&mut n, &candidates[i]);
        }
        fits(&n[0], res)
    };
    let cost_of = |set: &[usize]| {
        set.iter().fold((0u64, 0i64), |(a, b), &i| {
            let (x, y) = candidates[i].cost(now_ms);
            (a + x, b.saturating_add(y))
        })
    };
    // Freeing more never hurts: if all of them do not make room, no
    // subset does (spares the subsets on nodes that cannot help).
    if !room_after(here) {
        return None;
    }
    if here.len() <= EXACT_UP_TO {
        let mut best: Option<((u64, i64), Vec<usize>)> = None;
        for mask in 1u32..(1 << here.len()) {
            let set: Vec<usize> = (0..here.len())
                .filter(|b| mask & (1 << b) != 0)
                .map(|b| here[b])
                .collect();
            let cost = cost_of(&set);
            if best.as_ref().is_some_and(|b| b.0 <= cost) || !room_after(&set) {
                continue;
            }
            best = Some((cost, set));
        }
        return best;
    }
    let mut order = here.to_vec();
    order.sort_by_key(|&i| candidates[i].cost(now_ms));
    let mut set = Vec::new();
    for i in order {
        set.push(i);
        if room_after(&set) {
            return Some((cost_of(&set), set));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    //! The choice against brute force on small clusters, and its rules.

    use super::*;
    use crate::domain::placement::GpuSlot;
    use proptest::prelude::*;

    const NOW: i64 = 1_000_000;

    fn node(id: &str, gpus: u32) -> NodeCapacity {
        NodeCapacity {
            node_id: id.into(),
            pool: "public".into(),
            schedulable: true,
            cpu_free_milli: 32_000,
            memory_free_mib: 128 * 1024,
            cpu_total_milli: 32_000,
            memory_total_mib: 128 * 1024,
            gpus: (0..gpus)
                .map(|i| GpuSlot {
                    index: i,
                    uuid: format!("{id}-{i}"),
                    model: "A100".into(),
                    healthy: true,
                    free_milli: 1000,
                })
                .collect(),
            az: String::new(),
        }
    }

    fn gpus(n: u32) -> Resources {
        Resources {
            gpus: n,
            cpu_milli: 1000,
            memory_mib: 1024,
            ..Default::default()
        }
    }

    /// A running job: `count` instances of `res` on `node`, taking GPUs
    /// from `first`.
    #[derive(Debug, Clone)]
    struct Running {
        id: String,
        class: PriorityClass,
        started: i64,
        res: Resources,
        at: Vec<(String, Vec<u32>)>,
    }

    fn occupy(nodes: &mut [NodeCapacity], r: &Running) {
        for (node, idx) in &r.at {
            let n = nodes.iter_mut().find(|n| n.node_id == *node).unwrap();
            n.cpu_free_milli -= r.res.cpu_milli as i64;
            n.memory_free_mib -= r.res.memory_mib as i64;
            for i in idx {
                n.gpus[*i as usize].free_milli = 0;
            }
        }
    }

    fn candidates(rs: &[Running]) -> Vec<Candidate<'_>> {
        rs.iter()
            .map(|r| Candidate {
                job_id: &r.id,
                tenant: "t",
                pool: "public",
                class: r.class,
                started_ms: r.started,
                resources: &r.res,
                instances: r.at.iter().map(|(n, g)| (n.as_str(), &g[..])).collect(),
            })
            .collect()
    }

    /// Random single-GPU-per-instance jobs packed onto 1..3 nodes of 4 GPUs.
    fn cluster() -> impl Strategy<Value = (Vec<NodeCapacity>, Vec<Running>)> {
        (
            1usize..=3,
            prop::collection::vec((0u8..3, 1i64..10, 1u32..=2, 0usize..3), 1..8),
        )
            .prop_map(|(n, jobs)| {
                let mut nodes: Vec<NodeCapacity> =
                    (0..n).map(|i| node(&format!("n{i}"), 4)).collect();
                let mut running = Vec::new();
                for (k, (class, mins, count, at)) in jobs.into_iter().enumerate() {
                    let class = [
                        PriorityClass::Preemptible,
                        PriorityClass::Normal,
                        PriorityClass::High,
                    ][class as usize];
                    let mut placed = Vec::new();
                    for c in 0..count {
                        let pos = (at + c as usize) % n;
                        let free = nodes[pos].gpus.iter().position(|g| g.free_milli == 1000);
                        let Some(g) = free else { continue };
                        nodes[pos].gpus[g].free_milli = 0;
                        placed.push((nodes[pos].node_id.clone(), vec![g as u32]));
                    }
                    if placed.is_empty() {
                        continue;
                    }
                    for (node, _) in &placed {
                        let nd = nodes.iter_mut().find(|x| x.node_id == *node).unwrap();
                        nd.cpu_free_milli -= 1000;
                        nd.memory_free_mib -= 1024;
                    }
                    running.push(Running {
                        id: format!("v{k}"),
                        class,
                        started: NOW - mins * 60_000,
                        res: gpus(1),
                        at: placed,
                    });
                }
                (nodes, running)
            })
    }

    proptest! {
        /// A one-instance request: the victims are a cheapest set (fewest
        /// instances, then least run time lost) among all that make room,
        /// all of a lower class and old enough.
        #[test]
        fn victims_of_a_single_node_request_are_minimal(
            (nodes, running) in cluster(),
            want in 1u32..=4,
            class in 1usize..3,
            min_minutes in 0i64..5,
        ) {
            let class = [PriorityClass::Preemptible, PriorityClass::Normal, PriorityClass::High][class];
            let cands = candidates(&running);
            let min_ms = min_minutes * 60_000;
            let res = gpus(want);
            let got = choose(&nodes, "public", "t", &res, 1, class, &cands, &[], false, min_ms, NOW);
            let ok = |i: usize| cands[i].class < class && NOW - cands[i].started_ms >= min_ms;
            // Brute force over every subset of every candidate.
            let mut best: Option<(u64, i64)> = None;
            for mask in 0u32..(1 << cands.len()) {
                let set: Vec<usize> = (0..cands.len()).filter(|b| mask & (1 << b) != 0).collect();
                if !set.iter().all(|&i| ok(i)) {
                    continue;
                }
                let mut sim = nodes.clone();
                for &i in &set {
                    release(&mut sim, &cands[i]);
                }
                if !sim.iter().any(|n| fits(n, &res)) {
                    continue;
                }
                let cost = set.iter().fold((0, 0), |(a, b), &i| {
                    let (x, y) = cands[i].cost(NOW);
                    (a + x, b + y)
                });
                if best.is_none_or(|b| cost < b) {
                    best = Some(cost);
                }
            }
            let fits_now = nodes.iter().any(|n| fits(n, &res));
            let any_eligible = (0..cands.len()).any(ok);
            match (got, best) {
                // Nothing eligible: no choice is made (the planner asks only
                // after a request failed).
                (None, Some(_)) if !any_eligible => {}
                (Some(set), Some(best)) => {
                    prop_assert!(set.iter().all(|&i| ok(i)), "an ineligible victim");
                    let cost = set.iter().fold((0, 0), |(a, b), &i| {
                        let (x, y) = cands[i].cost(NOW);
                        (a + x, b + y)
                    });
                    prop_assert_eq!(cost, best, "not the cheapest: {:?}", set);
                }
                (None, None) => {}
                (None, Some(best)) => prop_assert!(false, "missed a set costing {:?}", best),
                (Some(set), None) => prop_assert!(fits_now && set.is_empty(), "{:?}", set),
            }
        }
    }

    #[test]
    fn a_gang_victim_is_evicted_whole_and_equal_classes_are_spared() {
        let mut nodes = vec![node("n0", 2), node("n1", 2)];
        let running = vec![
            // A preemptible gang over both nodes, and a normal job.
            Running {
                id: "gang".into(),
                class: PriorityClass::Preemptible,
                started: NOW - 600_000,
                res: gpus(1),
                at: vec![("n0".into(), vec![0]), ("n1".into(), vec![0])],
            },
            Running {
                id: "normal".into(),
                class: PriorityClass::Normal,
                started: NOW - 600_000,
                res: gpus(1),
                at: vec![("n0".into(), vec![1])],
            },
        ];
        for r in &running {
            occupy(&mut nodes, r);
        }
        nodes[1].gpus[1].free_milli = 0; // something unlisted holds n1's other GPU
        let cands = candidates(&running);
        // A normal 2-GPU request: only the gang is below it; evicting it
        // frees one GPU per node, not two on one: no room.
        assert_eq!(
            choose(
                &nodes,
                "public",
                "t",
                &gpus(2),
                1,
                PriorityClass::Normal,
                &cands,
                &[],
                false,
                0,
                NOW
            ),
            None
        );
        // A high one may take the normal job too: gang + normal free n0.
        let got = choose(
            &nodes,
            "public",
            "t",
            &gpus(2),
            1,
            PriorityClass::High,
            &cands,
            &[],
            false,
            0,
            NOW,
        );
        assert_eq!(got, Some(vec![0, 1]));
        // Another tenant's high job takes only preemptible victims: the
        // gang alone does not make room.
        let other = choose(
            &nodes,
            "public",
            "u",
            &gpus(2),
            1,
            PriorityClass::High,
            &cands,
            &[],
            false,
            0,
            NOW,
        );
        assert_eq!(
            other, None,
            "a normal job is preempted only by its own tenant"
        );
        // Two 1-GPU instances (a gang): evicting the gang alone frees one
        // GPU on each node.
        let got = choose(
            &nodes,
            "public",
            "t",
            &gpus(1),
            2,
            PriorityClass::Normal,
            &cands,
            &[],
            false,
            0,
            NOW,
        );
        assert_eq!(got, Some(vec![0]));
    }

    #[test]
    fn young_jobs_and_jobs_already_taken_are_not_victims() {
        let mut nodes = vec![node("n0", 1)];
        let running = vec![Running {
            id: "young".into(),
            class: PriorityClass::Preemptible,
            started: NOW - 30_000,
            res: gpus(1),
            at: vec![("n0".into(), vec![0])],
        }];
        occupy(&mut nodes, &running[0]);
        let cands = candidates(&running);
        let args = |min| {
            choose(
                &nodes,
                "public",
                "t",
                &gpus(1),
                1,
                PriorityClass::Normal,
                &cands,
                &[],
                false,
                min,
                NOW,
            )
        };
        assert_eq!(args(60_000), None, "ran 30 s of the 60 s minimum");
        assert_eq!(args(30_000), Some(vec![0]));
        assert_eq!(
            choose(
                &nodes,
                "public",
                "t",
                &gpus(1),
                1,
                PriorityClass::Normal,
                &cands,
                &[true],
                false,
                0,
                NOW
            ),
            None,
            "already a victim of this pass"
        );
        assert_eq!(
            choose(
                &nodes,
                "p1",
                "t",
                &gpus(1),
                1,
                PriorityClass::Normal,
                &cands,
                &[],
                false,
                0,
                NOW
            ),
            None,
            "another pool's"
        );
    }
}
