//! Placement: fragmentation-aware choice of node and GPUs for every instance
//! of a job, all instances or none (gang).
//!
//! # Scoring
//!
//! The score of putting instances on a node is the change of the node's
//! *fragmentation* (FGD, REPLAY.md §13) measured against a fixed set of
//! typical request shapes ([`DEFAULT_SHAPES`]: fractions of 0.1, 0.25 and 0.5
//! GPU, 1, 2, 4 and 8 whole GPUs, and CPU-only, with weights):
//! `F = Σ weight_t · x_t`, where `x_t` is the free milli of the node's
//! healthy GPUs that have less free than shape `t` needs when `t` fits the
//! node (CPU, memory, enough GPUs with that much free), else all the node's
//! free GPU milli (always so for the CPU-only shape). The placement with the
//! smallest increase `ΔF = F_after − F_before` wins. It is computed exactly in
//! integers (no sigmoid, no truncation), so results are deterministic.
//!
//! Feasible nodes: same pool, schedulable, CPU and memory fit, and the GPUs
//! are healthy and of an allowed model; whole GPUs need fully free GPUs (a
//! whole-GPU instance never shares a GPU), a fraction needs one GPU with
//! enough free milli.
//!
//! # Tie-breaking (lexicographic, first difference decides)
//!
//! GPU requests (whole or fraction), per candidate node:
//! 1. more instances of the gang placed on this node (see *Gangs*);
//! 2. smaller `ΔF`;
//! 3. a node that already runs something (some GPU not fully free) beats a
//!    fully idle one, so idle nodes stay whole for large requests;
//! 4. less free healthy GPU milli left on the node afterwards (fewer free
//!    GPUs left stranded: best fit);
//! 5. node order as given (the caller sorts nodes by id).
//!
//! CPU-only requests ignore `ΔF` (they take no GPU; FGD scores them alike
//! nearly everywhere): 1. more instances of the gang on this node; 2. less
//! free healthy GPU milli on the node (GPU-less and GPU-full nodes first,
//! where CPU is worth nothing to GPU jobs); 3. less CPU left afterwards;
//! 4. less memory left afterwards; 5. node order.
//!
//! Inside a node: whole-GPU instances take the lowest-positioned fully free
//! usable GPUs (all fully free GPUs are alike to `F`); a fraction takes the
//! usable GPU giving the smallest `F` after, then the one with the least free
//! milli that fits, then the lowest GPU index.
//!
//! # Gangs
//!
//! Instances of one job are placed node by node: each round picks, by the
//! keys above, the node that can host the most of the remaining instances
//! (capped at what remains), and places that many there (each instance
//! choosing its GPUs as above; `ΔF` is the total over them). So a gang that
//! fits on one node lands on one node, and otherwise uses few nodes.
//! Every instance has the same shape, and taking one instance from a node
//! lowers the number of instances that node can still host by exactly one
//! whatever GPU it takes, so the gang is placed whenever the pool has room
//! for all instances in total; otherwise nothing is taken and the error
//! says why the job must wait.

use super::job::Resources;

/// One GPU's free share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub healthy: bool,
    /// Thousandths of the GPU not yet allocated (0..=1000).
    pub free_milli: u32,
}

/// What a node has left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub node_id: String,
    pub pool: String,
    /// Ready and not cordoned.
    pub schedulable: bool,
    pub cpu_free_milli: i64,
    pub memory_free_mib: i64,
    pub gpus: Vec<GpuSlot>,
}

/// Where one instance goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub node_id: String,
    pub gpu_indexes: Vec<u32>,
    pub gpu_uuids: Vec<String>,
}

/// A typical request shape that fragmentation is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypicalShape {
    /// Whole GPUs (0 for a fraction or CPU-only).
    pub gpus: u32,
    /// A fraction of one GPU in thousandths when `gpus == 0` (0 = CPU-only).
    pub gpu_milli: u32,
    pub cpu_milli: i64,
    pub memory_mib: i64,
    /// Relative frequency (any scale; only ratios matter).
    pub weight: i64,
}

const fn shape(
    gpus: u32,
    gpu_milli: u32,
    cpu_milli: i64,
    memory_mib: i64,
    weight: i64,
) -> TypicalShape {
    TypicalShape {
        gpus,
        gpu_milli,
        cpu_milli,
        memory_mib,
        weight,
    }
}

/// The built-in typical shapes (weights sum to 100): mostly single GPUs, a
/// fair share of fractions and CPU-only work, and multi-GPU training jobs
/// whose room on idle nodes is worth keeping.
pub const DEFAULT_SHAPES: &[TypicalShape] = &[
    shape(0, 0, 2000, 4096, 10),     // CPU-only
    shape(0, 100, 1000, 2048, 5),    // 0.1 GPU
    shape(0, 250, 1000, 4096, 10),   // 0.25 GPU
    shape(0, 500, 2000, 8192, 15),   // 0.5 GPU
    shape(1, 0, 4000, 16_384, 35),   // 1 GPU
    shape(2, 0, 8000, 32_768, 10),   // 2 GPUs
    shape(4, 0, 16_000, 65_536, 8),  // 4 GPUs
    shape(8, 0, 32_000, 131_072, 7), // 8 GPUs
];

fn model_allowed(allowed: &[String], model: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|m| m == model)
}

/// What one instance asks of the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Whole(u32),
    Fraction(u32),
    CpuOnly,
}

impl Want {
    fn of(req: &Resources) -> Want {
        if req.gpus > 0 {
            Want::Whole(req.gpus)
        } else if req.gpu_milli > 0 {
            Want::Fraction(req.gpu_milli)
        } else {
            Want::CpuOnly
        }
    }

    /// Milli taken from each GPU an instance uses.
    fn per_gpu(self) -> u32 {
        match self {
            Want::Whole(_) => 1000,
            Want::Fraction(m) => m,
            Want::CpuOnly => 0,
        }
    }
}

/// A node's state during a placement attempt (GPUs by position).
#[derive(Debug, Clone)]
struct Sim {
    cpu: i64,
    mem: i64,
    free: Vec<u32>,
    healthy: Vec<bool>,
    /// Healthy and of a model the request allows.
    usable: Vec<bool>,
}

impl Sim {
    fn new(node: &NodeCapacity, req: &Resources) -> Sim {
        Sim {
            cpu: node.cpu_free_milli,
            mem: node.memory_free_mib,
            free: node.gpus.iter().map(|g| g.free_milli.min(1000)).collect(),
            healthy: node.gpus.iter().map(|g| g.healthy).collect(),
            usable: node
                .gpus
                .iter()
                .map(|g| g.healthy && model_allowed(&req.gpu_models, &g.model))
                .collect(),
        }
    }

    /// Free milli of the healthy GPUs.
    fn healthy_free(&self) -> i64 {
        self.free
            .iter()
            .zip(&self.healthy)
            .filter(|&(_, &h)| h)
            .map(|(&f, _)| f as i64)
            .sum()
    }

    /// F of this state against `shapes`; with `over = Some((pos, free))`, as
    /// if GPU `pos` had `free` milli free.
    fn fragmentation(&self, shapes: &[TypicalShape], over: Option<(usize, u32)>) -> i64 {
        let free_of = |i: usize| match over {
            Some((p, f)) if p == i => f,
            _ => self.free[i],
        };
        let mut total = 0i64;
        for i in 0..self.free.len() {
            if self.healthy[i] {
                total += free_of(i) as i64;
            }
        }
        let mut f = 0i64;
        for t in shapes {
            let x = if (t.gpus == 0 && t.gpu_milli == 0)
                || self.cpu < t.cpu_milli
                || self.mem < t.memory_mib
            {
                total
            } else {
                let need = if t.gpus > 0 { 1000 } else { t.gpu_milli };
                let count = t.gpus.max(1);
                let (mut fit, mut below) = (0u32, 0i64);
                for i in 0..self.free.len() {
                    if !self.healthy[i] {
                        continue;
                    }
                    let g = free_of(i);
                    if g >= need {
                        fit += 1;
                    } else {
                        below += g as i64;
                    }
                }
                if fit >= count { below } else { total }
            };
            f += t.weight * x;
        }
        f
    }

    /// How many instances (at most `cap`) still fit.
    fn fit_count(&self, req: &Resources, want: Want, cap: u32) -> u32 {
        let by = |free: i64, need: u64| -> u64 {
            if free < need as i64 {
                0
            } else {
                (free as u64).checked_div(need).unwrap_or(u64::MAX)
            }
        };
        let gpu = match want {
            Want::Whole(n) => {
                let full = (0..self.free.len())
                    .filter(|&i| self.usable[i] && self.free[i] == 1000)
                    .count() as u64;
                full / n as u64
            }
            Want::Fraction(m) => (0..self.free.len())
                .filter(|&i| self.usable[i])
                .map(|i| (self.free[i] / m) as u64)
                .sum(),
            Want::CpuOnly => u64::MAX,
        };
        by(self.cpu, req.cpu_milli)
            .min(by(self.mem, req.memory_mib))
            .min(gpu)
            .min(cap as u64) as u32
    }

    /// Takes one instance; returns the GPU positions, or None if it does not
    /// fit.
    fn take_one(
        &mut self,
        shapes: &[TypicalShape],
        req: &Resources,
        want: Want,
    ) -> Option<Vec<usize>> {
        if self.cpu < req.cpu_milli as i64 || self.mem < req.memory_mib as i64 {
            return None;
        }
        let chosen = match want {
            Want::Whole(n) => {
                let free: Vec<usize> = (0..self.free.len())
                    .filter(|&i| self.usable[i] && self.free[i] == 1000)
                    .take(n as usize)
                    .collect();
                if free.len() < n as usize {
                    return None;
                }
                free
            }
            Want::Fraction(m) => {
                self.cpu -= req.cpu_milli as i64;
                self.mem -= req.memory_mib as i64;
                // (F after, free, position); equal free gives equal F.
                let mut best: Option<(i64, u32, usize)> = None;
                let mut seen: Vec<(u32, i64)> = Vec::new();
                for i in 0..self.free.len() {
                    let f = self.free[i];
                    if !self.usable[i] || f < m {
                        continue;
                    }
                    let after = match seen.iter().find(|s| s.0 == f) {
                        Some(s) => s.1,
                        None => {
                            let a = self.fragmentation(shapes, Some((i, f - m)));
                            seen.push((f, a));
                            a
                        }
                    };
                    if best.is_none_or(|b| (after, f) < (b.0, b.1)) {
                        best = Some((after, f, i));
                    }
                }
                self.cpu += req.cpu_milli as i64;
                self.mem += req.memory_mib as i64;
                vec![best?.2]
            }
            Want::CpuOnly => Vec::new(),
        };
        for &i in &chosen {
            self.free[i] -= want.per_gpu();
        }
        self.cpu -= req.cpu_milli as i64;
        self.mem -= req.memory_mib as i64;
        Some(chosen)
    }
}

/// Places `instances` copies of `req` in `pool`, all or none, scoring with
/// [`DEFAULT_SHAPES`]. On success the capacities are reduced by what was
/// taken; on failure they are unchanged and the error says why the job must
/// wait.
pub fn place(
    nodes: &mut [NodeCapacity],
    pool: &str,
    req: &Resources,
    instances: u32,
) -> Result<Vec<Assignment>, String> {
    place_with(DEFAULT_SHAPES, nodes, pool, req, instances)
}

/// [`place`] measuring fragmentation against `shapes`.
pub fn place_with(
    shapes: &[TypicalShape],
    nodes: &mut [NodeCapacity],
    pool: &str,
    req: &Resources,
    instances: u32,
) -> Result<Vec<Assignment>, String> {
    let want = Want::of(req);
    let mut sims: Vec<Option<Sim>> = nodes
        .iter()
        .map(|n| (n.pool == pool && n.schedulable).then(|| Sim::new(n, req)))
        .collect();
    let room: u64 = sims
        .iter()
        .flatten()
        .map(|s| s.fit_count(req, want, instances) as u64)
        .sum();
    if room < instances as u64 {
        return Err(no_fit_reason(nodes, pool, req, instances));
    }
    // (node position, GPU positions of each instance placed there)
    let mut picks: Vec<(usize, Vec<Vec<usize>>)> = Vec::new();
    let mut remaining = instances;
    while remaining > 0 {
        type Key = (i64, i64, i64, i64, usize);
        let mut best: Option<(Key, Vec<Vec<usize>>)> = None;
        for (pos, sim) in sims.iter().enumerate() {
            let Some(sim) = sim else { continue };
            let k = sim.fit_count(req, want, remaining);
            if k == 0 {
                continue;
            }
            let mut after = sim.clone();
            let mut taken = Vec::with_capacity(k as usize);
            for _ in 0..k {
                match after.take_one(shapes, req, want) {
                    Some(g) => taken.push(g),
                    None => break,
                }
            }
            debug_assert_eq!(taken.len(), k as usize, "fit_count and take_one agree");
            if taken.is_empty() {
                continue;
            }
            let placed = -(taken.len() as i64);
            let key: Key = if want == Want::CpuOnly {
                (placed, sim.healthy_free(), after.cpu, after.mem, pos)
            } else {
                let delta = after.fragmentation(shapes, None) - sim.fragmentation(shapes, None);
                let idle = sim.free.iter().all(|&f| f == 1000) as i64;
                (placed, delta, idle, after.healthy_free(), pos)
            };
            if best.as_ref().is_none_or(|b| key < b.0) {
                best = Some((key, taken));
            }
        }
        let Some((key, taken)) = best else {
            // Unreachable while fit_count and take_one agree; stay safe.
            return Err(no_fit_reason(nodes, pool, req, instances));
        };
        let pos = key.4;
        remaining -= taken.len() as u32;
        sims[pos] = None; // it was filled to what it can host or to the end
        picks.push((pos, taken));
    }
    let mut out = Vec::with_capacity(instances as usize);
    for (pos, taken) in picks {
        let node = &mut nodes[pos];
        for gpus in taken {
            for &i in &gpus {
                node.gpus[i].free_milli -= want.per_gpu();
            }
            node.cpu_free_milli -= req.cpu_milli as i64;
            node.memory_free_mib -= req.memory_mib as i64;
            out.push(Assignment {
                node_id: node.node_id.clone(),
                gpu_indexes: gpus.iter().map(|&i| node.gpus[i].index).collect(),
                gpu_uuids: gpus.iter().map(|&i| node.gpus[i].uuid.clone()).collect(),
            });
        }
    }
    Ok(out)
}

fn no_fit_reason(nodes: &[NodeCapacity], pool: &str, req: &Resources, instances: u32) -> String {
    let in_pool: Vec<&NodeCapacity> = nodes.iter().filter(|n| n.pool == pool).collect();
    let want = format!("{} instance(s) of {}", instances, req.describe());
    if in_pool.is_empty() {
        return format!("waiting for capacity: pool {pool:?} has no nodes; needs {want}");
    }
    let schedulable: Vec<&&NodeCapacity> = in_pool.iter().filter(|n| n.schedulable).collect();
    if schedulable.is_empty() {
        return format!("waiting for capacity: no Ready node in pool {pool:?}; needs {want}");
    }
    if req.gpus > 0 {
        let largest = in_pool
            .iter()
            .map(|n| {
                n.gpus
                    .iter()
                    .filter(|g| model_allowed(&req.gpu_models, &g.model))
                    .count()
            })
            .max()
            .unwrap_or(0);
        if largest < req.gpus as usize {
            return format!(
                "waiting for capacity: no node in pool {pool:?} has {} GPUs{} (largest has {largest}); needs {want}",
                req.gpus,
                if req.gpu_models.is_empty() {
                    String::new()
                } else {
                    format!(" of model {}", req.gpu_models.join("|"))
                },
            );
        }
        let most_free = schedulable
            .iter()
            .map(|n| {
                n.gpus
                    .iter()
                    .filter(|g| g.healthy && g.free_milli == 1000)
                    .count()
            })
            .max()
            .unwrap_or(0);
        return format!(
            "waiting for capacity: needs {want}; most free whole GPUs on a Ready node in pool {pool:?}: {most_free}"
        );
    }
    format!("waiting for capacity: no Ready node in pool {pool:?} has room for {want}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, gpus: u32) -> NodeCapacity {
        NodeCapacity {
            node_id: id.into(),
            pool: "public".into(),
            schedulable: true,
            cpu_free_milli: 64_000,
            memory_free_mib: 512 * 1024,
            gpus: (0..gpus)
                .map(|i| GpuSlot {
                    index: i,
                    uuid: format!("{id}-gpu{i}"),
                    model: "H100".into(),
                    healthy: true,
                    free_milli: 1000,
                })
                .collect(),
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

    #[test]
    fn four_gpus_go_to_the_node_that_has_them() {
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let placed = place(&mut nodes, "public", &gpus(4), 1).unwrap();
        assert_eq!(placed[0].node_id, "b");
        assert_eq!(placed[0].gpu_indexes, vec![0, 1, 2, 3]);
        assert_eq!(
            nodes[1]
                .gpus
                .iter()
                .filter(|g| g.free_milli == 1000)
                .count(),
            4
        );
    }

    #[test]
    fn too_big_waits_with_reason_and_takes_nothing() {
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let before = nodes.clone();
        let err = place(&mut nodes, "public", &gpus(16), 1).unwrap_err();
        assert!(err.contains("has 16 GPUs (largest has 8)"), "{err}");
        assert_eq!(nodes, before);
    }

    #[test]
    fn gang_is_all_or_nothing() {
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let before = nodes.clone();
        assert!(place(&mut nodes, "public", &gpus(4), 3).is_err());
        assert_eq!(nodes, before);
        assert_eq!(place(&mut nodes, "public", &gpus(4), 2).unwrap().len(), 2);
    }

    #[test]
    fn unhealthy_unready_and_other_pools_are_skipped() {
        let mut sick = node("a", 1);
        sick.gpus[0].healthy = false;
        let mut down = node("b", 1);
        down.schedulable = false;
        let mut other = node("c", 1);
        other.pool = "p1".into();
        let mut nodes = vec![sick, down, other, node("d", 1)];
        let placed = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        assert_eq!(placed[0].node_id, "d");
        assert!(place(&mut nodes, "public", &gpus(1), 1).is_err());
    }

    #[test]
    fn r_pool_1_public_pool_never_gives_a_gpu_to_two_jobs() {
        // Per-job isolation: whole-GPU jobs never share a GPU; only requests
        // that explicitly ask for a fraction share one.
        let mut nodes = vec![node("a", 2)];
        let first = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        let second = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        assert_ne!(first[0].gpu_indexes, second[0].gpu_indexes);
        assert!(place(&mut nodes, "public", &gpus(1), 1).is_err());
        let mut nodes = vec![node("a", 1)];
        let half = Resources {
            gpu_milli: 500,
            cpu_milli: 1,
            memory_mib: 1,
            ..Default::default()
        };
        place(&mut nodes, "public", &half, 1).unwrap();
        assert!(
            place(&mut nodes, "public", &gpus(1), 1).is_err(),
            "a whole GPU was given on top of a fraction"
        );
    }

    #[test]
    fn fractions_pack_onto_a_shared_gpu() {
        let mut nodes = vec![node("a", 2)];
        let half = Resources {
            gpu_milli: 500,
            cpu_milli: 100,
            memory_mib: 100,
            ..Default::default()
        };
        let a = place(&mut nodes, "public", &half, 1).unwrap();
        let b = place(&mut nodes, "public", &half, 1).unwrap();
        assert_eq!(a[0].gpu_indexes, b[0].gpu_indexes);
        // The other GPU is still whole.
        assert!(place(&mut nodes, "public", &gpus(1), 1).is_ok());
        assert!(place(&mut nodes, "public", &half, 1).is_err());
    }

    #[test]
    fn cpu_and_memory_are_never_exceeded() {
        let mut small = node("a", 0);
        small.cpu_free_milli = 1500;
        let mut nodes = vec![small];
        let req = Resources {
            cpu_milli: 1000,
            memory_mib: 10,
            ..Default::default()
        };
        assert!(place(&mut nodes, "public", &req, 1).is_ok());
        assert!(place(&mut nodes, "public", &req, 1).is_err());
        assert_eq!(nodes[0].cpu_free_milli, 500);
    }

    #[test]
    fn gpu_models_are_respected() {
        let mut nodes = vec![node("a", 2)];
        let req = Resources {
            gpus: 1,
            gpu_models: vec!["A100".into()],
            ..gpus(1)
        };
        let err = place(&mut nodes, "public", &req, 1).unwrap_err();
        assert!(err.contains("of model A100"), "{err}");
    }

    // ------------------------------------------------------------ policy

    fn frac(milli: u32) -> Resources {
        Resources {
            gpu_milli: milli,
            cpu_milli: 100,
            memory_mib: 100,
            ..Default::default()
        }
    }

    fn take(n: &mut NodeCapacity, idx: &[usize], milli: u32) {
        for &i in idx {
            n.gpus[i].free_milli -= milli;
        }
    }

    #[test]
    fn a_single_gpu_goes_to_a_busy_node_and_keeps_the_idle_one_whole() {
        let mut busy = node("b", 8);
        take(&mut busy, &[0], 1000);
        let mut nodes = vec![node("a", 8), busy];
        let placed = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        assert_eq!(placed[0].node_id, "b");
        assert_eq!(placed[0].gpu_indexes, vec![1]);
        // Same ΔF on two equally busy nodes: node order decides.
        let mut nodes = vec![node("a", 2), node("b", 2)];
        take(&mut nodes[0], &[0], 1000);
        take(&mut nodes[1], &[0], 1000);
        assert_eq!(
            place(&mut nodes, "public", &gpus(1), 1).unwrap()[0].node_id,
            "a"
        );
    }

    #[test]
    fn a_fraction_takes_the_gpu_that_keeps_whole_gpus_free() {
        let mut n = node("a", 3);
        take(&mut n, &[1], 500); // [1000, 500, 1000]
        let mut nodes = vec![n];
        let placed = place(&mut nodes, "public", &frac(500), 1).unwrap();
        assert_eq!(placed[0].gpu_indexes, vec![1]);
        // A partly used node beats an idle one for a fraction.
        let mut used = node("b", 2);
        take(&mut used, &[0], 300);
        let mut nodes = vec![node("a", 2), used];
        let placed = place(&mut nodes, "public", &frac(250), 1).unwrap();
        assert_eq!(
            (placed[0].node_id.as_str(), placed[0].gpu_indexes.clone()),
            ("b", vec![0])
        );
    }

    #[test]
    fn cpu_only_work_goes_to_the_node_with_the_least_free_gpu() {
        let mut full = node("b", 2);
        take(&mut full, &[0, 1], 1000);
        let mut nodes = vec![node("a", 2), full, node("c", 0)];
        let cpu = Resources {
            cpu_milli: 1000,
            memory_mib: 10,
            ..Default::default()
        };
        // GPU-less c and GPU-full b tie on free GPU (0); b has less CPU left?
        // Both have 64 cores: node order (b before c).
        assert_eq!(
            place(&mut nodes, "public", &cpu, 1).unwrap()[0].node_id,
            "b"
        );
        nodes[1].cpu_free_milli = 1000; // b is now CPU-full after one more
        assert_eq!(
            place(&mut nodes, "public", &cpu, 1).unwrap()[0].node_id,
            "b"
        );
        assert_eq!(
            place(&mut nodes, "public", &cpu, 1).unwrap()[0].node_id,
            "c"
        );
    }

    #[test]
    fn a_gang_lands_on_one_node_when_one_can_host_it() {
        // First fit would split 2×2 GPUs over a (2 free) and b.
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let placed = place(&mut nodes, "public", &gpus(2), 2).unwrap();
        assert!(placed.iter().all(|a| a.node_id == "b"), "{placed:?}");
        // 12 instances of 1 GPU on 2 + 8 + 4: fills b (8), then c (4).
        let mut nodes = vec![node("a", 2), node("b", 8), node("c", 4)];
        let placed = place(&mut nodes, "public", &gpus(1), 12).unwrap();
        let on = |id: &str| placed.iter().filter(|a| a.node_id == id).count();
        assert_eq!((on("a"), on("b"), on("c")), (0, 8, 4));
        // Fractions of a gang share GPUs of one node.
        let mut nodes = vec![node("a", 1), node("b", 1)];
        let placed = place(&mut nodes, "public", &frac(250), 4).unwrap();
        assert!(
            placed
                .iter()
                .all(|a| a.node_id == "a" && a.gpu_indexes == vec![0])
        );
    }

    /// The previous policy, kept as the baseline of the quality tests.
    fn first_fit(nodes: &mut [NodeCapacity], req: &Resources) -> bool {
        for n in nodes.iter_mut() {
            if !n.schedulable || n.cpu_free_milli < req.cpu_milli as i64 {
                continue;
            }
            let chosen: Vec<usize> = if req.gpus > 0 {
                let f: Vec<usize> = (0..n.gpus.len())
                    .filter(|&i| n.gpus[i].healthy && n.gpus[i].free_milli == 1000)
                    .take(req.gpus as usize)
                    .collect();
                if f.len() < req.gpus as usize {
                    continue;
                }
                f
            } else if req.gpu_milli > 0 {
                match (0..n.gpus.len())
                    .filter(|&i| n.gpus[i].healthy && n.gpus[i].free_milli >= req.gpu_milli)
                    .min_by_key(|&i| n.gpus[i].free_milli)
                {
                    Some(i) => vec![i],
                    None => continue,
                }
            } else {
                vec![]
            };
            let per = if req.gpus > 0 { 1000 } else { req.gpu_milli };
            take(n, &chosen, per);
            n.cpu_free_milli -= req.cpu_milli as i64;
            return true;
        }
        false
    }

    #[test]
    fn quality_small_jobs_leave_room_for_an_eight_gpu_job() {
        // a idle, b half used: first fit breaks a with the small jobs and
        // the 8-GPU job must wait; fragmentation scoring keeps a whole.
        let mut b = node("b", 8);
        take(&mut b, &[0, 1, 2, 3], 1000);
        let start = vec![node("a", 8), b];
        let stream = [frac(250), frac(500), gpus(1), frac(250), gpus(1), frac(100)];
        let mut ff = start.clone();
        for r in &stream {
            assert!(first_fit(&mut ff, r));
        }
        assert!(!first_fit(&mut ff, &gpus(8)), "first fit strands a");
        let mut ours = start;
        for r in &stream {
            place(&mut ours, "public", r, 1).unwrap();
        }
        let placed = place(&mut ours, "public", &gpus(8), 1).unwrap();
        assert_eq!(placed[0].node_id, "a");
    }

    #[test]
    fn quality_random_streams_place_more_gpu_than_first_fit() {
        // Same random arrival stream (no departures) on the same clusters:
        // total GPU milli placed, summed over seeds.
        let (mut ours_total, mut ff_total) = (0u64, 0u64);
        for seed in 1..=40u64 {
            let mut rng = Rng::new(seed);
            let start: Vec<NodeCapacity> = (0..6)
                .map(|i| node(&format!("n{i}"), [4, 8, 8][rng.below(3) as usize]))
                .collect();
            let (mut ours, mut ff) = (start.clone(), start);
            // About 1.2× the cluster's GPUs in demand.
            for _ in 0..25 {
                let r = match rng.below(10) {
                    0..=3 => frac([100, 250, 300, 500, 700][rng.below(5) as usize]),
                    4..=6 => gpus(1),
                    7 => gpus(2),
                    8 => gpus(4),
                    _ => gpus(8),
                };
                let d = r.gpu_demand_milli() as u64;
                if place(&mut ours, "public", &r, 1).is_ok() {
                    ours_total += d;
                }
                if first_fit(&mut ff, &r) {
                    ff_total += d;
                }
            }
        }
        assert!(
            ours_total > ff_total,
            "ours {ours_total} vs first fit {ff_total}"
        );
        eprintln!("placed GPU milli: ours {ours_total}, first fit {ff_total}");
    }

    // ------------------------------------------------- property tests

    /// xorshift64* — deterministic, no crates.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        fn range(&mut self, lo: i64, hi: i64) -> i64 {
            lo + self.below((hi - lo + 1) as u64) as i64
        }
    }

    const MODELS: [&str; 3] = ["H100", "A100", "T4"];

    fn random_cluster(rng: &mut Rng) -> Vec<NodeCapacity> {
        let count = rng.range(1, 8);
        (0..count)
            .map(|n| {
                let id = format!("node{n}");
                let model = MODELS[rng.below(3) as usize];
                let sparse = rng.chance(20); // non-contiguous GPU indexes
                let gpus = [0, 1, 2, 4, 8, 8][rng.below(6) as usize];
                NodeCapacity {
                    node_id: id.clone(),
                    pool: if rng.chance(85) { "public" } else { "p1" }.into(),
                    schedulable: rng.chance(85),
                    cpu_free_milli: rng.range(-1000, 64_000),
                    memory_free_mib: rng.range(-100, 256 * 1024),
                    gpus: (0..gpus)
                        .map(|i| GpuSlot {
                            index: if sparse { 2 * i + 1 } else { i },
                            uuid: format!("{id}-GPU-{i}"),
                            model: if rng.chance(10) {
                                MODELS[rng.below(3) as usize]
                            } else {
                                model
                            }
                            .into(),
                            healthy: rng.chance(90),
                            free_milli: match rng.below(10) {
                                0..=4 => 1000,
                                5..=6 => 0,
                                _ => rng.range(0, 1000) as u32,
                            },
                        })
                        .collect(),
                }
            })
            .collect()
    }

    fn random_request(rng: &mut Rng) -> (String, Resources, u32) {
        let pool = match rng.below(20) {
            0 => "p1",
            1 => "nowhere",
            _ => "public",
        };
        let (gpus, gpu_milli) = match rng.below(10) {
            0..=3 => ([1, 1, 1, 2, 4, 8, 16][rng.below(7) as usize], 0),
            4..=6 => (
                0,
                if rng.chance(50) {
                    [100, 250, 333, 500][rng.below(4) as usize]
                } else {
                    rng.range(1, 999) as u32
                },
            ),
            _ => (0, 0),
        };
        let gpu_models = if rng.chance(20) {
            MODELS
                .iter()
                .filter(|_| rng.chance(50))
                .map(|m| m.to_string())
                .collect()
        } else {
            Vec::new()
        };
        let req = Resources {
            gpus,
            gpu_milli,
            gpu_models,
            cpu_milli: if rng.chance(10) {
                0
            } else {
                rng.range(1, 16_000) as u64
            },
            memory_mib: if rng.chance(10) {
                0
            } else {
                rng.range(1, 64 * 1024) as u64
            },
        };
        let instances = if rng.chance(70) {
            1
        } else {
            rng.range(2, 6) as u32
        };
        (pool.into(), req, instances)
    }

    /// Independent of the placement code: how many instances of `req` the
    /// node could host, from the definitions alone.
    fn oracle_room(n: &NodeCapacity, pool: &str, req: &Resources) -> u64 {
        if n.pool != pool || !n.schedulable || n.cpu_free_milli < 0 || n.memory_free_mib < 0 {
            return 0;
        }
        let ok = |g: &GpuSlot| {
            g.healthy && (req.gpu_models.is_empty() || req.gpu_models.contains(&g.model))
        };
        let limit = |free: i64, need: u64| (free as u64).checked_div(need).unwrap_or(u64::MAX);
        let gpu = if req.gpus > 0 {
            n.gpus
                .iter()
                .filter(|g| ok(g) && g.free_milli == 1000)
                .count() as u64
                / req.gpus as u64
        } else if req.gpu_milli > 0 {
            n.gpus
                .iter()
                .filter(|g| ok(g))
                .map(|g| (g.free_milli / req.gpu_milli) as u64)
                .sum()
        } else {
            u64::MAX
        };
        gpu.min(limit(n.cpu_free_milli, req.cpu_milli))
            .min(limit(n.memory_free_mib, req.memory_mib))
    }

    /// Checks one `place` call from its inputs and outputs only.
    fn validate(
        before: &[NodeCapacity],
        after: &[NodeCapacity],
        pool: &str,
        req: &Resources,
        instances: u32,
        result: &Result<Vec<Assignment>, String>,
    ) {
        let room: u64 = before
            .iter()
            .map(|n| oracle_room(n, pool, req).min(instances as u64))
            .sum();
        let placed = match result {
            Err(why) => {
                assert_eq!(after, before, "a failed placement changed capacities");
                assert!(why.starts_with("waiting for capacity"), "{why}");
                assert!(
                    room < instances as u64,
                    "room for {room} but refused: {why}"
                );
                return;
            }
            Ok(p) => p,
        };
        assert!(room >= instances as u64, "placed without room");
        assert_eq!(placed.len(), instances as usize);
        assert_eq!(after.len(), before.len());
        // Expected state: before minus each assignment.
        let mut expect: Vec<NodeCapacity> = before.to_vec();
        // users[node][gpu] = (whole-GPU users, fraction users)
        let mut users: Vec<Vec<(u32, u32)>> =
            before.iter().map(|n| vec![(0, 0); n.gpus.len()]).collect();
        for a in placed {
            let ni = before
                .iter()
                .position(|n| n.node_id == a.node_id)
                .expect("assignment names a known node");
            let n = &before[ni];
            assert_eq!(n.pool, pool, "node of another pool");
            assert!(n.schedulable, "unschedulable node used");
            assert_eq!(a.gpu_indexes.len(), a.gpu_uuids.len());
            let want_gpus = if req.gpus > 0 {
                req.gpus as usize
            } else if req.gpu_milli > 0 {
                1
            } else {
                0
            };
            assert_eq!(a.gpu_indexes.len(), want_gpus, "{a:?}");
            let mut seen = Vec::new();
            for (idx, uuid) in a.gpu_indexes.iter().zip(&a.gpu_uuids) {
                assert!(!seen.contains(idx), "GPU twice in one instance");
                seen.push(*idx);
                let gi = n
                    .gpus
                    .iter()
                    .position(|g| g.index == *idx)
                    .expect("known GPU");
                let g = &n.gpus[gi];
                assert_eq!(&g.uuid, uuid);
                assert!(g.healthy, "unhealthy GPU used");
                assert!(
                    req.gpu_models.is_empty() || req.gpu_models.contains(&g.model),
                    "model {} not allowed",
                    g.model
                );
                let take = if req.gpus > 0 {
                    users[ni][gi].0 += 1;
                    assert_eq!(g.free_milli, 1000, "whole GPU was not free");
                    1000
                } else {
                    users[ni][gi].1 += 1;
                    req.gpu_milli
                };
                let e = &mut expect[ni].gpus[gi];
                assert!(e.free_milli >= take, "GPU over 1000 milli");
                e.free_milli -= take;
            }
            expect[ni].cpu_free_milli -= req.cpu_milli as i64;
            expect[ni].memory_free_mib -= req.memory_mib as i64;
            assert!(expect[ni].cpu_free_milli >= 0, "CPU exceeded");
            assert!(expect[ni].memory_free_mib >= 0, "memory exceeded");
        }
        for per_node in &users {
            for &(whole, shared) in per_node {
                assert!(
                    whole <= 1 && (whole == 0 || shared == 0),
                    "whole GPU shared"
                );
            }
        }
        assert_eq!(after, &expect[..], "capacities and assignments disagree");
        // Locality: a gang that one node can host lands on one node.
        if before
            .iter()
            .any(|n| oracle_room(n, pool, req) >= instances as u64)
        {
            assert!(
                placed.iter().all(|a| a.node_id == placed[0].node_id),
                "gang split although one node could host it: {placed:?}"
            );
        }
    }

    #[test]
    fn property_random_clusters_and_requests() {
        let mut rng = Rng::new(42);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..200 {
            let mut nodes = random_cluster(&mut rng);
            for step in 0..200 {
                if step % 25 == 24 {
                    // Something finished: free a random node's GPUs again.
                    let n = rng.below(nodes.len() as u64) as usize;
                    for g in &mut nodes[n].gpus {
                        g.free_milli = 1000;
                    }
                    nodes[n].cpu_free_milli = 64_000;
                    nodes[n].memory_free_mib = 256 * 1024;
                }
                let (pool, req, instances) = random_request(&mut rng);
                let before = nodes.clone();
                let result = place(&mut nodes, &pool, &req, instances);
                validate(&before, &nodes, &pool, &req, instances, &result);
                // Deterministic: the same input gives the same answer.
                let mut again = before.clone();
                assert_eq!(place(&mut again, &pool, &req, instances), result);
                if result.is_ok() {
                    ok += 1;
                } else {
                    err += 1;
                }
            }
        }
        // Both outcomes are exercised.
        assert!(ok > 5000 && err > 5000, "ok {ok}, err {err}");
    }
}
