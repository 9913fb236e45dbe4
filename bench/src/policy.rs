//! Placement policies of the replay benchmark (REPLAY.md §8–13) and
//! gpupool's own `default` policy.
//!
//! Every policy sees the feasible nodes of a pod listed in the run's random
//! node order (drawn once per run) and picks the highest score; ties go to
//! the earliest node in that order. Scores are cached per (node, pod shape)
//! and recomputed only when the node changed (or the policy's typical shapes
//! did), which keeps a 1,213-node, 10,000-pod replay well under a second.

use super::replay::{Cluster, NodeState, Req, Shape, Workload};
use super::rng::Rng;
use gpupool_scheduler::domain::Resources;
use gpupool_scheduler::domain::placement::{GpuSlot, NodeCapacity, Placer, TypicalShape};
use gpupool_scheduler::domain::shapes::ShapeStats;

/// Policy names of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// A uniformly random feasible node (and a random fitting GPU).
    Random,
    /// Best-fit (REPLAY §9).
    Bestfit,
    /// Fragmentation Gradient Descent, as published (REPLAY §13).
    Fgd,
    /// gpupool's production placement ([`gpupool_scheduler::domain::placement::Placer`])
    /// with the trace's typical shapes: FGD for GPU pods with idle nodes
    /// kept whole on ties; CPU-only pods onto GPU-full nodes.
    Default,
    /// `default` with typical shapes learned from the arrivals so far.
    DefaultOnline,
}

impl PolicyName {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Random => "random",
            PolicyName::Bestfit => "bestfit",
            PolicyName::Fgd => "fgd",
            PolicyName::Default => "default",
            PolicyName::DefaultOnline => "default-online",
        }
    }
}

/// A placement policy, driven by [`super::replay::replay`].
pub trait Policy {
    /// Sees each arriving pod before it is placed (online learning).
    fn observe(&mut self, _r: &Req) {}
    /// GPUs for `r` on `node` (the only feasible node; no node scoring).
    fn gpus(&mut self, cluster: &Cluster, node: usize, r: &Req, rng: &mut Rng) -> Vec<usize>;
    /// Picks a node among `feasible` (≥ 2, in tie-break order) and its GPUs.
    fn choose(
        &mut self,
        cluster: &Cluster,
        feasible: &[usize],
        r: &Req,
        rng: &mut Rng,
    ) -> (usize, Vec<usize>);
    /// Number of typical shapes in use (0 where not applicable).
    fn typical_shapes(&self) -> usize {
        0
    }
}

/// Builds the policy `name` for workload `w`; `order` is the run's node
/// order (ties go to the earliest).
pub fn make(name: PolicyName, w: &Workload, order: &[usize]) -> Box<dyn Policy> {
    match name {
        PolicyName::Random => Box::new(RandomPolicy),
        PolicyName::Bestfit => Box::new(Scored::new(BestFit, w)),
        PolicyName::Fgd => Box::new(Scored::new(Fgd::published(w), w)),
        PolicyName::Default => Box::new(Production::new(w, order, ShapeSource::Trace)),
        PolicyName::DefaultOnline => Box::new(Production::new(w, order, ShapeSource::Online)),
    }
}

// ------------------------------------------------------------ production

/// The scheduler's own placement engine, unchanged: the replay's nodes and
/// pods are handed to a [`Placer`] (node `i` is `n{i}`, its GPUs of the
/// node's model), which keeps its own copy of the cluster. Every choice is
/// checked against the replay's independent feasibility rules (REPLAY §6).
struct Production {
    placer: Placer,
    models: Vec<String>,
    typical: usize,
    /// With [`ShapeSource::Online`]: what arrived so far, learned as the
    /// scheduler learns a pool's submissions.
    learned: Option<ShapeStats>,
}

impl Production {
    fn new(w: &Workload, order: &[usize], source: ShapeSource) -> Self {
        let names = |spec: u64| -> Vec<String> {
            (0..w.models.len())
                .filter(|&b| spec & (1u64 << b) != 0)
                .map(|b| w.models[b].clone())
                .collect()
        };
        let nodes = w
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let model = names(n.model).pop().unwrap_or_default();
                NodeCapacity {
                    node_id: format!("n{i}"),
                    pool: "public".into(),
                    schedulable: true,
                    cpu_free_milli: n.cpu,
                    memory_free_mib: n.mem,
                    cpu_total_milli: n.cpu,
                    memory_total_mib: n.mem,
                    gpus: (0..n.free.len() as u32)
                        .map(|g| GpuSlot {
                            index: g,
                            uuid: format!("n{i}-{g}"),
                            model: model.clone(),
                            healthy: true,
                            free_milli: n.free[g as usize] as u32,
                        })
                        .collect(),
                    az: String::new(),
                }
            })
            .collect();
        let shapes: Vec<TypicalShape> = match source {
            ShapeSource::Online => Vec::new(),
            ShapeSource::Trace => {
                let mut counts = vec![0u64; w.shapes.len()];
                for r in &w.pods {
                    counts[r.shape as usize] += 1;
                }
                typical_shapes(&counts, &w.shapes)
                    .into_iter()
                    .map(|t| TypicalShape {
                        num_gpu: t.num_gpu,
                        milli: t.milli,
                        cpu_milli: t.cpu,
                        models: names(t.spec),
                        p: t.p,
                    })
                    .collect()
            }
        };
        Production {
            typical: shapes.len(),
            placer: Placer::with_order(nodes, &shapes, order),
            models: w.models.clone(),
            learned: (source == ShapeSource::Online).then(ShapeStats::default),
        }
    }

    fn resources(&self, r: &Req) -> Resources {
        Resources {
            gpus: if r.num_gpu > 0 && !r.is_shared() {
                r.num_gpu
            } else {
                0
            },
            gpu_milli: if r.is_shared() { r.milli as u32 } else { 0 },
            gpu_models: (0..self.models.len())
                .filter(|&b| r.spec & (1u64 << b) != 0)
                .map(|b| self.models[b].clone())
                .collect(),
            cpu_milli: r.cpu as u64,
            memory_mib: r.mem as u64,
        }
    }

    fn place(&mut self, cluster: &Cluster, r: &Req) -> (usize, Vec<usize>) {
        let req = self.resources(r);
        let a = self
            .placer
            .place("public", &req, 1, false)
            .unwrap_or_else(|e| {
                panic!("the replay found a feasible node, the placer did not: {e}")
            });
        let node: usize = a[0].node_id[1..].parse().expect("node ids are n<i>");
        let gpus: Vec<usize> = a[0].gpu_indexes.iter().map(|&g| g as usize).collect();
        assert!(
            cluster.nodes[node].feasible(r),
            "the placer chose node {node}, infeasible by REPLAY §6"
        );
        (node, gpus)
    }
}

impl Policy for Production {
    fn observe(&mut self, r: &Req) {
        let req = self.resources(r);
        if let Some(learned) = &mut self.learned
            && learned.observe(&req, 1)
        {
            let shapes = learned.typical();
            self.typical = shapes.len();
            self.placer.set_shapes("public", &shapes);
        }
    }

    fn gpus(&mut self, cluster: &Cluster, node: usize, r: &Req, _rng: &mut Rng) -> Vec<usize> {
        let (chosen, gpus) = self.place(cluster, r);
        assert_eq!(chosen, node, "the only feasible node");
        gpus
    }

    fn choose(
        &mut self,
        cluster: &Cluster,
        feasible: &[usize],
        r: &Req,
        _rng: &mut Rng,
    ) -> (usize, Vec<usize>) {
        let (node, gpus) = self.place(cluster, r);
        debug_assert!(feasible.contains(&node));
        (node, gpus)
    }

    fn typical_shapes(&self) -> usize {
        self.typical
    }
}

// ---------------------------------------------------------------- random

/// REPLAY §10: a uniformly random feasible node; shared pods get a uniformly
/// random fitting GPU, whole-GPU pods the lowest-index free GPUs.
struct RandomPolicy;

impl RandomPolicy {
    fn pick(node: &NodeState, r: &Req, rng: &mut Rng) -> Vec<usize> {
        if !r.is_shared() {
            return node.lowest_fitting(r);
        }
        let fitting: Vec<usize> = (0..node.free.len())
            .filter(|&g| node.free[g] >= r.milli)
            .collect();
        vec![fitting[rng.below(fitting.len())]]
    }
}

impl Policy for RandomPolicy {
    fn gpus(&mut self, cluster: &Cluster, node: usize, r: &Req, rng: &mut Rng) -> Vec<usize> {
        Self::pick(&cluster.nodes[node], r, rng)
    }

    fn choose(
        &mut self,
        cluster: &Cluster,
        feasible: &[usize],
        r: &Req,
        rng: &mut Rng,
    ) -> (usize, Vec<usize>) {
        let node = feasible[rng.below(feasible.len())];
        (node, Self::pick(&cluster.nodes[node], r, rng))
    }
}

// ---------------------------------------------------------- scored policies

/// A lexicographic score key; higher is better.
pub type Key = (f64, f64, f64);

/// A node-scoring policy.
pub trait Scorer {
    /// Sees each arriving pod; returns true when cached scores are stale.
    fn observe(&mut self, _r: &Req) -> bool {
        false
    }
    /// Score of placing `r` on `node` (feasible), and for a shared-GPU pod
    /// the GPU it would take.
    fn score(&mut self, node: &NodeState, r: &Req) -> (Key, Option<usize>);
    fn typical_shapes(&self) -> usize {
        0
    }
}

#[derive(Clone, Copy)]
struct CacheEntry {
    stamp: u64,
    key: Key,
    gpu: i32,
}

/// Drives a [`Scorer`] with a (node, shape) score cache.
struct Scored<S> {
    scorer: S,
    shapes: usize,
    version: u32,
    cache: Vec<CacheEntry>,
}

impl<S: Scorer> Scored<S> {
    fn new(scorer: S, w: &Workload) -> Self {
        let shapes = w.shapes.len();
        Scored {
            scorer,
            shapes,
            version: 0,
            cache: vec![
                CacheEntry {
                    stamp: 0,
                    key: (0.0, 0.0, 0.0),
                    gpu: -1
                };
                shapes * w.nodes.len()
            ],
        }
    }

    fn eval(&mut self, cluster: &Cluster, node: usize, r: &Req) -> (Key, Option<usize>) {
        let stamp = ((cluster.epoch[node] as u64) << 32 | self.version as u64) + 1;
        let slot = node * self.shapes + r.shape as usize;
        let e = self.cache[slot];
        if e.stamp == stamp {
            return (e.key, (e.gpu >= 0).then_some(e.gpu as usize));
        }
        let (key, gpu) = self.scorer.score(&cluster.nodes[node], r);
        self.cache[slot] = CacheEntry {
            stamp,
            key,
            gpu: gpu.map_or(-1, |g| g as i32),
        };
        (key, gpu)
    }

    fn gpus_for(node: &NodeState, r: &Req, gpu: Option<usize>) -> Vec<usize> {
        match gpu {
            Some(g) if r.is_shared() => vec![g],
            _ => node.lowest_fitting(r),
        }
    }
}

impl<S: Scorer> Policy for Scored<S> {
    fn observe(&mut self, r: &Req) {
        if self.scorer.observe(r) {
            self.version = self.version.wrapping_add(1);
        }
    }

    fn gpus(&mut self, cluster: &Cluster, node: usize, r: &Req, _rng: &mut Rng) -> Vec<usize> {
        let gpu = if r.is_shared() {
            self.eval(cluster, node, r).1
        } else {
            None
        };
        Self::gpus_for(&cluster.nodes[node], r, gpu)
    }

    fn choose(
        &mut self,
        cluster: &Cluster,
        feasible: &[usize],
        r: &Req,
        _rng: &mut Rng,
    ) -> (usize, Vec<usize>) {
        let mut best: Option<(Key, usize, Option<usize>)> = None;
        for &n in feasible {
            let (key, gpu) = self.eval(cluster, n, r);
            if best.as_ref().is_none_or(|b| key > b.0) {
                best = Some((key, n, gpu));
            }
        }
        let (_, node, gpu) = best.expect("at least one feasible node");
        (node, Self::gpus_for(&cluster.nodes[node], r, gpu))
    }

    fn typical_shapes(&self) -> usize {
        self.scorer.typical_shapes()
    }
}

// ------------------------------------------------------------------ best-fit

/// REPLAY §9 best-fit: `s = 0.5·(cpu_free − cpu)/128000 +
/// 0.5·(gpu_free_total − num_gpu·milli)/8000`, score `int64((1 − s)·100)`;
/// a CPU request of 0 counts as 100 milli. Shared pods take the fitting GPU
/// with the least free milli (lowest index on ties).
struct BestFit;

/// The best-fit score of placing `r` on `node`.
pub fn bestfit_score(node: &NodeState, r: &Req) -> i64 {
    gpupool_scheduler::domain::placement::bestfit_score(
        node.cpu,
        node.free_total,
        r.cpu,
        r.gpu_total(),
    )
}

/// The fitting GPU with the least free milli, lowest index on ties.
pub fn least_free_fitting(node: &NodeState, milli: i64) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (g, &f) in node.free.iter().enumerate() {
        if f >= milli && best.is_none_or(|b| f < node.free[b]) {
            best = Some(g);
        }
    }
    best
}

impl Scorer for BestFit {
    fn score(&mut self, node: &NodeState, r: &Req) -> (Key, Option<usize>) {
        let gpu = if r.is_shared() {
            least_free_fitting(node, r.milli)
        } else {
            None
        };
        ((bestfit_score(node, r) as f64, 0.0, 0.0), gpu)
    }
}

// ---------------------------------------------------------------------- FGD

pub use gpupool_scheduler::domain::placement::{Typical, fgd_score};

/// REPLAY §13: distinct shapes most frequent first (ties: first seen in
/// name order), the shortest prefix covering ≥ 95% of the pods, with the
/// frequencies renormalised over that prefix. `counts[i]` counts shape `i`.
pub fn typical_shapes(counts: &[u64], shapes: &[Shape]) -> Vec<Typical> {
    let (order, covered) = gpupool_scheduler::domain::shapes::typical_prefix(counts);
    order
        .iter()
        .map(|&i| {
            let s = &shapes[i];
            Typical {
                cpu: s.cpu,
                milli: s.milli,
                num_gpu: s.num_gpu,
                spec: s.spec,
                p: counts[i] as f64 / covered as f64,
            }
        })
        .collect()
}

/// REPLAY §13 node fragmentation of a node whose GPUs are all of `model`
/// (the production [`gpupool_scheduler::domain::placement::fragmentation`]).
pub fn fragmentation(typical: &[Typical], model: u64, cpu: i64, free: &[i64]) -> f64 {
    gpupool_scheduler::domain::placement::fragmentation(typical, cpu, free, |_| model)
}

/// FGD's best score of placing `r` on the (feasible) `node` and, for a
/// shared pod, the GPU giving it — the production
/// [`gpupool_scheduler::domain::placement::gpu_choice`] on a node of one model.
fn fgd_choice(
    typical: &[Typical],
    node: &NodeState,
    r: &Req,
    scratch: &mut Vec<i64>,
) -> (i64, Option<usize>) {
    let w = gpupool_scheduler::domain::placement::Want {
        cpu: r.cpu,
        mem: r.mem,
        num_gpu: r.num_gpu,
        milli: r.milli,
        spec: r.spec,
    };
    let (s, gpus) = gpupool_scheduler::domain::placement::gpu_choice(
        typical,
        node.cpu,
        &node.free,
        |_| node.model,
        &w,
        scratch,
    )
    .expect("feasible node has a GPU choice");
    (
        s,
        if r.is_shared() {
            gpus.first().copied()
        } else {
            None
        },
    )
}

/// FGD as published: typical shapes from the whole trace file; the node
/// score is the best [`fgd_score`] over the GPU choices (lowest index on
/// ties), and that GPU is the one taken.
struct Fgd {
    typical: Vec<Typical>,
    scratch: Vec<i64>,
}

impl Fgd {
    fn published(w: &Workload) -> Self {
        let mut counts = vec![0u64; w.shapes.len()];
        for r in &w.pods {
            counts[r.shape as usize] += 1;
        }
        Fgd {
            typical: typical_shapes(&counts, &w.shapes),
            scratch: Vec::new(),
        }
    }
}

impl Scorer for Fgd {
    fn score(&mut self, node: &NodeState, r: &Req) -> (Key, Option<usize>) {
        let (s, g) = fgd_choice(&self.typical, node, r, &mut self.scratch);
        ((s as f64, 0.0, 0.0), g)
    }

    fn typical_shapes(&self) -> usize {
        self.typical.len()
    }
}

// ------------------------------------------------------------------ default

/// Where the production policy takes its typical shapes from in a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeSource {
    /// The whole trace file's shape statistics (what FGD is given).
    Trace,
    /// Only the pods that arrived so far, learned as the scheduler learns a
    /// pool's submissions ([`ShapeStats`]: refreshed after 1, 2, 4, … 256
    /// arrivals and every 512 after that).
    Online,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: i64, num_gpu: u32, milli: i64) -> Req {
        Req {
            cpu,
            mem: 0,
            num_gpu,
            milli,
            spec: 0,
            shape: 0,
        }
    }

    fn node(cpu: i64, free: &[i64]) -> NodeState {
        NodeState {
            cpu,
            mem: 1 << 20,
            model: 1,
            free: free.to_vec(),
            free_total: free.iter().sum(),
        }
    }

    fn typical(cpu: i64, num_gpu: u32, milli: i64, spec: u64, p: f64) -> Typical {
        Typical {
            cpu,
            milli,
            num_gpu,
            spec,
            p,
        }
    }

    #[test]
    fn bestfit_score_truncates_and_counts_cpu_zero_as_100() {
        // s = 0.5·56000/128000 + 0.5·1500/8000 = 0.3125 -> 68.75 -> 68
        assert_eq!(
            bestfit_score(&node(64_000, &[1000, 1000]), &req(8000, 1, 500)),
            68
        );
        // CPU 0 counts as 100: s = 0.5·128000/128000 = 0.5 -> 50 (49 with 0).
        assert_eq!(bestfit_score(&node(128_100, &[]), &req(0, 0, 0)), 50);
        assert_eq!(bestfit_score(&node(128_000, &[]), &req(100, 0, 0)), 50);
        assert_eq!(
            least_free_fitting(&node(0, &[700, 300, 500, 300]), 300),
            Some(1)
        );
        assert_eq!(least_free_fitting(&node(0, &[700, 200]), 300), Some(0));
    }

    #[test]
    fn fragmentation_of_a_small_node() {
        let n = node(8000, &[1000, 500, 300, 0]); // 1800 free
        let t = [
            typical(4000, 1, 400, 0, 0.5),     // fits: 300 + 0 below 400 -> 300
            typical(0, 0, 0, 0, 0.25),         // CPU-only: all 1800
            typical(16_000, 1, 100, 0, 0.125), // CPU does not fit: 1800
            typical(0, 2, 1000, 0, 0.0625),    // one full GPU only: 1800
            typical(0, 1, 200, 0b10, 0.0625),  // other model: 1800
        ];
        let f = fragmentation(&t, n.model, n.cpu, &n.free);
        assert!(
            (f - (150.0 + 450.0 + 225.0 + 112.5 + 112.5)).abs() < 1e-9,
            "{f}"
        );
        assert_eq!(fgd_score(f, f), 50);
        assert_eq!(fgd_score(1000.0, 0.0), 73); // 100·sigmoid(1) = 73.1
    }

    #[test]
    fn typical_shapes_take_the_95_percent_prefix() {
        let shape = |cpu| Shape {
            cpu,
            milli: 0,
            num_gpu: 0,
            spec: 0,
            spec_text: String::new(),
        };
        let shapes: Vec<Shape> = (0..4).map(shape).collect();
        // 60 + 30 = 90% < 95%, + 6 = 96%: three shapes, renormalised over 96.
        let t = typical_shapes(&[6, 60, 4, 30], &shapes);
        assert_eq!(t.iter().map(|t| t.cpu).collect::<Vec<_>>(), vec![1, 3, 0]);
        assert!((t[0].p - 60.0 / 96.0).abs() < 1e-12);
    }

    #[test]
    fn fgd_picks_the_gpu_with_the_best_score() {
        let w_shapes = [typical(0, 1, 500, 0, 0.5), typical(0, 1, 1000, 0, 0.5)];
        let mut fgd = Fgd {
            typical: w_shapes.to_vec(),
            scratch: Vec::new(),
        };
        // Half a GPU on [1000, 500]: filling GPU 1 keeps a whole GPU (F 250 -> 0).
        let (key, gpu) = fgd.score(&node(0, &[1000, 500]), &req(0, 1, 500));
        assert_eq!((key.0, gpu), (56.0, Some(1)));
    }
}
