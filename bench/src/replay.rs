//! The pure replay engine of `gpupool-bench replay`: the FGD
//! paper's discrete allocation experiment (USENIX ATC'23, "Beware of
//! Fragmentation"), with the exact semantics written down in the data set's
//! `REPLAY.md`. No I/O here: callers hand in parsed [`NodeSpec`]s and
//! [`PodSpec`]s (see [`super::data`]) and get a [`ReplayResult`] back.
//!
//! Outline (section numbers of `REPLAY.md`):
//! * §2 pods are normalised to [`Req`]: GPU milli clipped to 0..=1000, models
//!   only for GPU pods, `gpu_spec` split on `|` (empty tokens dropped).
//! * §3–4 [`build_arrivals`]: sort by name, seeded shuffle, inflate to 1.3·C
//!   with replacement from the name-sorted list (stopping at the first draw
//!   whose *per-GPU* milli would cross the limit), then trim at random
//!   positions while above 1.3·C.
//! * §6–8 one node permutation is drawn per run for tie-breaking; feasible
//!   nodes are listed in that order; no feasible node = failure; exactly one
//!   = taken without scoring; otherwise the policy decides (see
//!   [`super::policy`]).
//! * §15–16 [`Curve`]: the allocation-rate curve over arrived GPU demand.

use super::policy::{self, PolicyName};
use super::rng::Rng;

/// A node row of the cluster file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub cpu_milli: i64,
    pub memory_mib: i64,
    pub gpus: u32,
    pub model: String,
}

/// A pod row of a trace file (only the columns the replay uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub cpu_milli: i64,
    pub memory_mib: i64,
    pub num_gpu: u32,
    /// Per-GPU share in milli-GPU (1000 = a whole GPU).
    pub gpu_milli: i64,
    /// Allowed GPU models separated by `|`; empty = any.
    pub gpu_spec: String,
}

/// Why a workload cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("the cluster has no GPUs")]
    NoGpus,
    #[error("the pod list is empty")]
    NoPods,
    #[error("more than 64 distinct GPU models")]
    TooManyModels,
}

/// A normalised pod request (REPLAY §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Req {
    pub cpu: i64,
    pub mem: i64,
    /// Number of GPUs (0 = CPU-only pod).
    pub num_gpu: u32,
    /// Per-GPU milli, 0..=1000 (0 for CPU-only pods).
    pub milli: i64,
    /// Bit set of allowed models; 0 = any.
    pub spec: u64,
    /// Id of the distinct (cpu, milli, num_gpu, gpu_spec) shape, an index
    /// into [`Workload::shapes`].
    pub shape: u32,
}

impl Req {
    /// Total GPU demand `num_gpu·milli`.
    pub fn gpu_total(&self) -> i64 {
        self.num_gpu as i64 * self.milli
    }

    /// A shared-GPU pod: one GPU, less than all of it.
    pub fn is_shared(&self) -> bool {
        self.num_gpu == 1 && self.milli < 1000
    }
}

/// A distinct pod shape (cpu, per-GPU milli, GPU count, model set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub cpu: i64,
    pub milli: i64,
    pub num_gpu: u32,
    pub spec: u64,
    /// The `gpu_spec` text the shape was keyed by.
    pub spec_text: String,
}

/// The state of one node during a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Free CPU milli.
    pub cpu: i64,
    /// Free memory MiB.
    pub mem: i64,
    /// This node's model as a one-bit set (0 if the model never appears).
    pub model: u64,
    /// Free milli of each GPU, 0..=1000.
    pub free: Vec<i64>,
    /// Sum of `free`.
    pub free_total: i64,
}

impl NodeState {
    /// A node with `gpus` idle GPUs.
    pub fn new(cpu: i64, mem: i64, model: u64, gpus: u32) -> Self {
        NodeState {
            cpu,
            mem,
            model,
            free: vec![1000; gpus as usize],
            free_total: 1000 * gpus as i64,
        }
    }

    /// Whether the model set `spec` (0 = any) allows this node.
    pub fn model_ok(&self, spec: u64) -> bool {
        spec == 0 || spec & self.model != 0
    }

    /// REPLAY §6: CPU and memory fit; for GPU pods the model is allowed and
    /// `num_gpu` GPUs each have at least `milli` free (for `num_gpu > 1`,
    /// always whole GPUs, that is fully free GPUs).
    pub fn feasible(&self, r: &Req) -> bool {
        if self.cpu < r.cpu || self.mem < r.mem {
            return false;
        }
        if r.num_gpu == 0 {
            return true;
        }
        if !self.model_ok(r.spec) {
            return false;
        }
        let mut need = r.num_gpu;
        for &f in &self.free {
            if f >= r.milli {
                need -= 1;
                if need == 0 {
                    return true;
                }
            }
        }
        false
    }

    /// The lowest-index GPUs with at least `r.milli` free (REPLAY §11, whole
    /// GPU pods). Empty for CPU-only pods.
    pub fn lowest_fitting(&self, r: &Req) -> Vec<usize> {
        self.free
            .iter()
            .enumerate()
            .filter(|&(_, &f)| f >= r.milli)
            .map(|(i, _)| i)
            .take(r.num_gpu as usize)
            .collect()
    }

    /// Takes `r`'s resources, its GPU share from each GPU in `gpus`.
    pub fn apply(&mut self, r: &Req, gpus: &[usize]) {
        debug_assert_eq!(gpus.len(), r.num_gpu as usize);
        self.cpu -= r.cpu;
        self.mem -= r.mem;
        for &g in gpus {
            debug_assert!(self.free[g] >= r.milli);
            self.free[g] -= r.milli;
            self.free_total -= r.milli;
        }
    }
}

/// The cluster during a replay; `epoch[i]` changes whenever node `i` does
/// (policies key their score caches on it).
#[derive(Debug, Clone)]
pub struct Cluster {
    pub nodes: Vec<NodeState>,
    pub epoch: Vec<u32>,
}

impl Cluster {
    /// Places `r` on `node` using `gpus`.
    pub fn apply(&mut self, node: usize, r: &Req, gpus: &[usize]) {
        self.nodes[node].apply(r, gpus);
        self.epoch[node] = self.epoch[node].wrapping_add(1);
    }
}

/// A normalised, replayable workload: the cluster and the name-sorted pods.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Initial node states, in file order.
    pub nodes: Vec<NodeState>,
    /// Pods sorted by name.
    pub pods: Vec<Req>,
    /// Distinct pod shapes; `Req::shape` indexes this.
    pub shapes: Vec<Shape>,
    /// GPU model names; bit `i` of a model set is `models[i]`.
    pub models: Vec<String>,
    /// Total GPU capacity C in milli-GPU.
    pub capacity: i64,
}

impl Workload {
    /// Normalises parsed rows (REPLAY §1–2).
    pub fn new(nodes: &[NodeSpec], pods: &[PodSpec]) -> Result<Workload, ReplayError> {
        let mut models: Vec<String> = Vec::new();
        let bit = |name: &str, models: &mut Vec<String>| -> Result<u64, ReplayError> {
            let i = match models.iter().position(|m| m == name) {
                Some(i) => i,
                None => {
                    models.push(name.to_string());
                    models.len() - 1
                }
            };
            if i >= 64 {
                return Err(ReplayError::TooManyModels);
            }
            Ok(1u64 << i)
        };
        let mut states = Vec::with_capacity(nodes.len());
        for n in nodes {
            let model = if n.gpus > 0 {
                bit(&n.model, &mut models)?
            } else {
                0
            };
            states.push(NodeState::new(n.cpu_milli, n.memory_mib, model, n.gpus));
        }
        let capacity: i64 = states.iter().map(|n| n.free_total).sum();
        if capacity == 0 {
            return Err(ReplayError::NoGpus);
        }
        if pods.is_empty() {
            return Err(ReplayError::NoPods);
        }
        let mut sorted: Vec<&PodSpec> = pods.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut shapes: Vec<Shape> = Vec::new();
        let mut index: std::collections::HashMap<(i64, i64, u32, String), u32> = Default::default();
        let mut reqs = Vec::with_capacity(sorted.len());
        for p in sorted {
            let (num_gpu, milli, spec, spec_text) = if p.num_gpu > 0 {
                let mut spec = 0u64;
                for token in p
                    .gpu_spec
                    .split('|')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                {
                    spec |= bit(token, &mut models)?;
                }
                (
                    p.num_gpu,
                    p.gpu_milli.clamp(0, 1000),
                    spec,
                    p.gpu_spec.clone(),
                )
            } else {
                (0, 0, 0, String::new())
            };
            let key = (p.cpu_milli, milli, num_gpu, spec_text.clone());
            let shape = *index.entry(key).or_insert_with(|| {
                shapes.push(Shape {
                    cpu: p.cpu_milli,
                    milli,
                    num_gpu,
                    spec,
                    spec_text,
                });
                (shapes.len() - 1) as u32
            });
            reqs.push(Req {
                cpu: p.cpu_milli,
                mem: p.memory_mib,
                num_gpu,
                milli,
                spec,
                shape,
            });
        }
        Ok(Workload {
            nodes: states,
            pods: reqs,
            shapes,
            models,
            capacity,
        })
    }

    /// The 1.3·C arrival limit in milli-GPU.
    pub fn limit(&self) -> i64 {
        self.capacity * 13 / 10
    }
}

/// REPLAY §3–4: the arrival sequence. `sorted` is the name-sorted pod list.
pub fn build_arrivals(sorted: &[Req], limit: i64, rng: &mut Rng) -> Vec<Req> {
    let mut arrivals = sorted.to_vec();
    rng.shuffle(&mut arrivals);
    let mut total: i64 = arrivals.iter().map(Req::gpu_total).sum();
    while total < limit {
        let pod = sorted[rng.below(sorted.len())];
        // The simulator's quirk: the test uses the per-GPU milli.
        if total + pod.milli > limit {
            break;
        }
        arrivals.push(pod);
        total += pod.gpu_total();
    }
    while total > limit && !arrivals.is_empty() {
        let i = rng.below(arrivals.len());
        total -= arrivals.remove(i).gpu_total();
    }
    arrivals
}

/// Python's `round(v)` for the bucket index: round half to even.
pub fn round_half_even(v: f64) -> f64 {
    v.round_ties_even()
}

/// `round(v, 2)`, half to even.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round_ties_even() / 100.0
}

/// REPLAY §15–16: allocation rate (used/C, %) bucketed by arrived demand
/// (arrived/C, %, rounded half to even) for x = 0..=130.
#[derive(Debug, Clone)]
pub struct Curve {
    capacity: f64,
    sum: [f64; 131],
    count: [u64; 131],
}

impl Curve {
    pub fn new(capacity: i64) -> Self {
        Curve {
            capacity: capacity as f64,
            sum: [0.0; 131],
            count: [0; 131],
        }
    }

    /// One event: after a pod was placed or failed.
    pub fn record(&mut self, arrived: i64, used: i64) {
        let x = round_half_even(arrived as f64 / self.capacity * 100.0);
        if (0.0..=130.0).contains(&x) {
            let x = x as usize;
            self.sum[x] += round2(used as f64 / self.capacity * 100.0);
            self.count[x] += 1;
        }
    }

    /// Column means; an empty column falls back to the events at x ± 1.
    pub fn finish(&self) -> Vec<Option<f64>> {
        (0..131)
            .map(|x| {
                if self.count[x] > 0 {
                    return Some(self.sum[x] / self.count[x] as f64);
                }
                let (mut s, mut c) = (0.0, 0u64);
                for y in [x.wrapping_sub(1), x + 1] {
                    if y < 131 {
                        s += self.sum[y];
                        c += self.count[y];
                    }
                }
                (c > 0).then(|| s / c as f64)
            })
            .collect()
    }
}

/// The outcome of one replay.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayResult {
    pub policy: PolicyName,
    pub seed: u64,
    /// Pods in the trace file.
    pub original_pods: usize,
    /// Pods replayed (after inflation/trimming).
    pub pods: usize,
    /// Pods no node could take.
    pub failed: usize,
    /// GPU pods among the failed ones.
    pub failed_gpu: usize,
    pub capacity_milli: i64,
    pub arrived_milli: i64,
    pub used_milli: i64,
    /// Typical shapes the policy used at the end (0 for random/best-fit).
    pub typical_shapes: usize,
    pub alloc_pct_at_100: Option<f64>,
    pub alloc_pct_at_130: Option<f64>,
    /// Allocation rate (%) at arrived = x % of capacity, x = 0..=130.
    pub curve: Vec<Option<f64>>,
    /// The unallocated capacity by cause once 100 % of capacity had arrived
    /// (after that arrival), and at the end (130 %); see `stranded.rs`.
    pub stranded_at_100: Option<crate::stranded::Stranded>,
    pub stranded_at_130: crate::stranded::Stranded,
}

/// Runs one replay of `w` under `policy` with `seed`. Deterministic.
pub fn replay(w: &Workload, policy: PolicyName, seed: u64) -> ReplayResult {
    let mut rng = Rng::new(seed);
    let arrivals = build_arrivals(&w.pods, w.limit(), &mut rng);
    let order = rng.permutation(w.nodes.len());
    let mut cluster = Cluster {
        nodes: w.nodes.clone(),
        epoch: vec![0; w.nodes.len()],
    };
    let mut pol = policy::make(policy, w, &order);
    let mut curve = Curve::new(w.capacity);
    let (mut arrived, mut used, mut failed, mut failed_gpu) = (0i64, 0i64, 0usize, 0usize);
    let mut feasible = Vec::with_capacity(w.nodes.len());
    let (mut failed_reqs, mut at_100) = (Vec::new(), None);
    for r in &arrivals {
        pol.observe(r);
        feasible.clear();
        feasible.extend(
            order
                .iter()
                .copied()
                .filter(|&i| cluster.nodes[i].feasible(r)),
        );
        let placed = match feasible.len() {
            0 => None,
            // REPLAY §7: exactly one feasible node is taken without scoring.
            1 => Some((feasible[0], pol.gpus(&cluster, feasible[0], r, &mut rng))),
            _ => Some(pol.choose(&cluster, &feasible, r, &mut rng)),
        };
        match placed {
            Some((node, gpus)) => {
                cluster.apply(node, r, &gpus);
                used += r.gpu_total();
            }
            None => {
                failed += 1;
                if r.num_gpu > 0 {
                    failed_gpu += 1;
                    failed_reqs.push(*r);
                }
            }
        }
        let before = arrived;
        arrived += r.gpu_total();
        curve.record(arrived, used);
        if before < w.capacity && arrived >= w.capacity {
            at_100 = Some(crate::stranded::stranded(
                &cluster.nodes,
                &failed_reqs,
                w.capacity,
                arrived,
            ));
        }
    }
    let at_130 = crate::stranded::stranded(&cluster.nodes, &failed_reqs, w.capacity, arrived);
    let curve = curve.finish();
    ReplayResult {
        policy,
        seed,
        original_pods: w.pods.len(),
        pods: arrivals.len(),
        failed,
        failed_gpu,
        capacity_milli: w.capacity,
        arrived_milli: arrived,
        used_milli: used,
        typical_shapes: pol.typical_shapes(),
        alloc_pct_at_100: curve[100],
        alloc_pct_at_130: curve[130],
        curve,
        stranded_at_100: at_100,
        stranded_at_130: at_130,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: i64, mem: i64, num_gpu: u32, milli: i64) -> Req {
        Req {
            cpu,
            mem,
            num_gpu,
            milli,
            spec: 0,
            shape: 0,
        }
    }

    #[test]
    fn feasibility() {
        let mut n = NodeState::new(8000, 1024, 0b10, 4);
        n.apply(&req(0, 0, 1, 600), &[0]);
        n.apply(&req(0, 0, 1, 1000), &[2]);
        // free = [400, 1000, 0, 1000]
        assert!(n.feasible(&req(8000, 1024, 0, 0)));
        assert!(!n.feasible(&req(8001, 0, 0, 0)), "CPU matters");
        assert!(!n.feasible(&req(0, 1025, 0, 0)), "memory matters");
        assert!(n.feasible(&req(0, 0, 1, 400)));
        assert!(n.feasible(&req(0, 0, 2, 1000)));
        assert!(!n.feasible(&req(0, 0, 3, 1000)), "needs 3 fully free GPUs");
        let mut r = req(0, 0, 1, 100);
        r.spec = 0b01;
        assert!(!n.feasible(&r), "model not allowed");
        r.spec = 0b11;
        assert!(n.feasible(&r));
        assert_eq!(n.lowest_fitting(&req(0, 0, 2, 1000)), vec![1, 3]);
        assert!(!NodeState::new(8000, 1024, 0, 0).feasible(&req(0, 0, 1, 1)));
    }

    #[test]
    fn normalises_pods() {
        let nodes = [NodeSpec {
            name: "n".into(),
            cpu_milli: 1,
            memory_mib: 1,
            gpus: 2,
            model: "T4".into(),
        }];
        let pod = |name: &str, num_gpu, gpu_milli, spec: &str| PodSpec {
            name: name.into(),
            cpu_milli: 1,
            memory_mib: 1,
            num_gpu,
            gpu_milli,
            gpu_spec: spec.into(),
        };
        let w = Workload::new(
            &nodes,
            &[pod("b", 1, 1500, "|T4||V100|"), pod("a", 0, 300, "T4")],
        )
        .unwrap();
        assert_eq!(w.capacity, 2000);
        assert_eq!(w.models, vec!["T4".to_string(), "V100".to_string()]);
        assert_eq!(
            (w.pods[0].num_gpu, w.pods[0].milli, w.pods[0].spec),
            (0, 0, 0),
            "sorted by name; CPU-only"
        );
        assert_eq!((w.pods[1].milli, w.pods[1].spec), (1000, 0b11));
        assert_eq!(Workload::new(&nodes, &[]).unwrap_err(), ReplayError::NoPods);
    }

    #[test]
    fn inflation_stops_at_first_draw_over_the_limit() {
        // X needs 600 per GPU, Y is CPU-only (0). Start: 600 of 1000. Y
        // always fits, X never does: arrivals grow by the Ys drawn before
        // the first X and stop there even though later Ys would fit.
        let (x, y) = (req(1, 1, 1, 600), req(1, 1, 0, 0));
        let sorted = [x, y];
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            let arrivals = build_arrivals(&sorted, 1000, &mut rng);
            let mut probe = Rng::new(seed);
            probe.shuffle(&mut sorted.to_vec());
            let mut ys = 0;
            while sorted[probe.below(2)] == y {
                ys += 1;
            }
            assert_eq!(arrivals.len(), 2 + ys, "seed {seed}");
            assert!(arrivals[2..].iter().all(|r| *r == y));
        }
    }

    #[test]
    fn inflation_tests_per_gpu_milli_then_trims() {
        // 2×300: 600 + 300 ≤ 1000 lets a second copy in (total 1200), which
        // the trim removes again.
        let z = req(1, 1, 2, 300);
        let arrivals = build_arrivals(&[z], 1000, &mut Rng::new(5));
        assert_eq!(arrivals, vec![z]);
    }

    #[test]
    fn metric_rounding_and_fallback() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round2(12.344), 12.34);
        assert_eq!(round2(12.346), 12.35);
        let mut c = Curve::new(1000);
        c.record(5, 2); // 0.5% arrived -> x = 0, used 0.2%
        c.record(15, 4); // 1.5% -> x = 2, used 0.4%
        c.record(25, 5); // 2.5% -> x = 2, used 0.5%
        let curve = c.finish();
        assert_eq!(curve[0], Some(0.2));
        assert!((curve[2].unwrap() - 0.45).abs() < 1e-12);
        // x = 1 has no event: the events at x = 0 and 2.
        assert!((curve[1].unwrap() - (0.2 + 0.4 + 0.5) / 3.0).abs() < 1e-12);
        assert_eq!(curve[3], Some(0.45), "only x = 2 neighbours x = 3");
        assert_eq!(curve[10], None);
    }

    fn small_workload() -> Workload {
        let mut nodes = Vec::new();
        for i in 0..12 {
            let (gpus, model) = [(2, "P100"), (4, "T4"), (8, "G2")][i % 3];
            nodes.push(NodeSpec {
                name: format!("n{i}"),
                cpu_milli: 32_000,
                memory_mib: 65_536,
                gpus,
                model: model.into(),
            });
        }
        let mut pods = Vec::new();
        let shapes = [
            (4000, 1, 1000, ""),
            (2000, 1, 500, ""),
            (1000, 1, 250, "T4"),
            (8000, 0, 0, ""),
            (16000, 4, 1000, ""),
            (2000, 1, 300, "G2|P100"),
        ];
        for i in 0..60 {
            let (cpu, num_gpu, gpu_milli, spec) = shapes[(i * 7) % shapes.len()];
            pods.push(PodSpec {
                name: format!("p{i:03}"),
                cpu_milli: cpu,
                memory_mib: 4096,
                num_gpu,
                gpu_milli,
                gpu_spec: spec.into(),
            });
        }
        Workload::new(&nodes, &pods).unwrap()
    }

    #[test]
    fn deterministic_for_a_seed() {
        let w = small_workload();
        for policy in [
            PolicyName::Random,
            PolicyName::Bestfit,
            PolicyName::Fgd,
            PolicyName::Default,
            PolicyName::DefaultOnline,
        ] {
            let a = replay(&w, policy, 42);
            let b = replay(&w, policy, 42);
            assert_eq!(a.curve, b.curve, "{policy:?}");
            assert_eq!(
                (a.pods, a.failed, a.used_milli),
                (b.pods, b.failed, b.used_milli)
            );
            assert!(a.arrived_milli <= w.limit());
            assert!(a.used_milli <= a.arrived_milli && a.used_milli <= w.capacity);
            assert_eq!(a.curve.len(), 131);
        }
        let c = replay(&w, PolicyName::Random, 43);
        let a = replay(&w, PolicyName::Random, 42);
        assert!(a.curve != c.curve || a.pods != c.pods, "the seed matters");
    }
}
