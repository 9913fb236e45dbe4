//! Placement: the choice of node and GPUs for every instance of a job, all
//! instances or none (gang), for every pool. Pure: no I/O, no clock;
//! randomness only from the seed given to [`Placer::new`].
//!
//! This is the policy `gpupool-bench replay --policy default`
//! runs (the replay drives this very [`Placer`]; BENCHMARKS.md has its
//! figures against the FGD paper's).
//!
//! # Scoring (GPU requests)
//!
//! FGD (Weng et al., ATC'23; REPLAY.md §13): a node's fragmentation
//! `F = Σ p_t·x_t` over typical request shapes `t` with frequencies `p_t`
//! (in production each pool's own, learned from its submissions and given
//! by [`Placer::set_shapes`], else [`default_shapes`]; the replay derives
//! them from the trace as FGD does, or learns them from arrivals), where `x_t` is the free milli of the GPUs that cannot host
//! `t` when `t` fits the node at all, else all its free GPU milli. A
//! placement scores `int(100·sigmoid((F_before − F_after)/1000))` — FGD's
//! coarse buckets — and the highest score wins.
//!
//! # Tie-breaking (lexicographic, first difference decides)
//!
//! GPU requests: 1. more instances of the job on this node (gangs, see
//! below); 2. fewer of the job's instances already on this node, then in its
//! zone (services only); 3. a node whose CPU still feeds its free GPUs
//! afterwards as well as before (below); 4. the FGD score; 5. a node that
//! already runs something beats a fully idle one, so idle nodes stay whole
//! for multi-GPU jobs; 6. the node order drawn from the seed (a
//! pseudo-random rank per node id, stable across passes). Finer
//! tie-breakers (the exact ΔF, best fit) were measured and lose 2–7 points
//! on the replay: inside FGD's coarse buckets the random order spreads load
//! across node types.
//!
//! Rule 3, CPU feed: the typical GPU requests need `R` CPU milli per GPU
//! milli (their frequency-weighted CPU over their GPU); a node with `c` CPU
//! and `g` GPU milli free starves `max(0, g − c/R)` of its GPU. A placement
//! that would starve more GPU on its node than before loses to one that
//! does not, whatever FGD says: CPU-heavy jobs go where CPU is plentiful,
//! CPU-light ones still go anywhere. It is a yes/no key, not a score, so
//! FGD and the random order still spread the rest. On the openb replay it
//! takes the GPU stranded behind exhausted CPU at 130 % arrived from
//! 0.39–0.70 % of capacity to 0.03–0.27 % (BENCHMARKS.md). Memory is left
//! out: it strands almost nothing there.
//!
//! CPU-only requests ignore fragmentation: 1.–2. as above; 3. the node with
//! the least free GPU milli (GPU-full nodes first, where CPU is worth nothing
//! to GPU jobs); 4. the best-fit score (REPLAY §9); 5. the node order.
//!
//! Inside a node: whole GPUs are the lowest-index fully free usable GPUs
//! (all alike to `F`); a fraction takes the usable GPU with the best score,
//! the lowest index on ties. Unhealthy GPUs count as fully taken.
//!
//! # Gangs and services
//!
//! Several instances are placed node by node: each round picks, by the keys
//! above, the node that can host the most of the remaining instances, and
//! places that many there. So a gang that fits on one node lands on one
//! node, otherwise on few; it is placed whenever the pool has room for all
//! instances in total, else nothing is taken and the error says why the job
//! waits. Online-service replicas (`spread`) take one instance per round and
//! prefer nodes, then zones, holding fewer of the job's replicas (a soft
//! spread: more replicas than nodes still place).
//!
//! # Speed
//!
//! A [`Placer`] keeps, per request class (pool and request shape), an
//! ordered index of the feasible nodes' keys, updated for the nodes each
//! placement changes; a single-instance placement costs O(classes · log n)
//! once its class is indexed (building the index is one O(n) pass).

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
    /// What the node has in all: a job waiting for it could use that once
    /// everything on it ended (backfill reserves by it).
    pub cpu_total_milli: i64,
    pub memory_total_mib: i64,
    pub gpus: Vec<GpuSlot>,
    /// Availability zone (services spread across them).
    pub az: String,
}

/// Where one instance goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub node_id: String,
    pub gpu_indexes: Vec<u32>,
    pub gpu_uuids: Vec<String>,
}

/// Why a request does not fit now. Its `Display` is the reason a waiting
/// job shows; the variants name what is short.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NoFit {
    /// The pool has no nodes at all.
    NoNodes { pool: String, want: Demand },
    /// None of the pool's nodes is Ready (and uncordoned).
    NoReadyNode { pool: String, want: Demand },
    /// No node of the pool has that many GPUs (of the models asked), even
    /// idle.
    TooFewGpus {
        pool: String,
        gpus: u32,
        models: Vec<String>,
        largest: usize,
        want: Demand,
    },
    /// Each instance fits somewhere, but not all of them at once.
    NotTogether {
        pool: String,
        room: u64,
        want: Demand,
    },
    /// The best Ready node of the pool lacks these.
    Short {
        pool: String,
        node: String,
        short: Vec<Shortfall>,
        want: Demand,
    },
}

/// What a request asks for: `instances` x `resources`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Demand {
    pub instances: u32,
    /// Boxed: a `NoFit` is an `Err` of every placement and stays small.
    pub resources: Box<Resources>,
}

/// One resource a node is short of, with the numbers. `models` is the
/// request's model list (empty: any).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Shortfall {
    Gpus {
        free: usize,
        needed: u32,
        models: Vec<String>,
    },
    GpuShare {
        most_free_milli: u32,
        needed_milli: u32,
        models: Vec<String>,
    },
    Cpu {
        free_milli: u64,
        needed_milli: u64,
    },
    Memory {
        free_mib: u64,
        needed_mib: u64,
    },
}

impl std::fmt::Display for Demand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} instance(s) of {}",
            self.instances,
            self.resources.describe()
        )
    }
}

/// " H100|A100", or nothing for any model.
fn models_suffix(models: &[String]) -> String {
    if models.is_empty() {
        String::new()
    } else {
        format!(" {}", models.join("|"))
    }
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::Gpus {
                free,
                needed,
                models,
            } => write!(
                f,
                "GPUs: {free} free{} GPU(s), {needed} needed",
                models_suffix(models)
            ),
            Shortfall::GpuShare {
                most_free_milli,
                needed_milli,
                models,
            } => write!(
                f,
                "GPU share: at most {most_free_milli}m free on one{} GPU, {needed_milli}m needed",
                models_suffix(models)
            ),
            Shortfall::Cpu {
                free_milli,
                needed_milli,
            } => write!(f, "CPU: {free_milli}m free, {needed_milli}m needed"),
            Shortfall::Memory {
                free_mib,
                needed_mib,
            } => write!(f, "memory: {free_mib} MiB free, {needed_mib} MiB needed"),
        }
    }
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("waiting for capacity: ")?;
        match self {
            NoFit::NoNodes { pool, want } => write!(f, "pool {pool:?} has no nodes; needs {want}"),
            NoFit::NoReadyNode { pool, want } => {
                write!(f, "no Ready node in pool {pool:?}; needs {want}")
            }
            NoFit::TooFewGpus {
                pool,
                gpus,
                models,
                largest,
                want,
            } => write!(
                f,
                "no node in pool {pool:?} has {gpus} GPUs{} (largest has {largest}); needs {want}",
                if models.is_empty() {
                    String::new()
                } else {
                    format!(" of model {}", models.join("|"))
                },
            ),
            NoFit::NotTogether { pool, room, want } => write!(
                f,
                "needs {want}; pool {pool:?} has room for {room} now (all instances are placed together)"
            ),
            NoFit::Short {
                pool,
                node,
                short,
                want,
            } => {
                write!(
                    f,
                    "needs {want}; the best Ready node in pool {pool:?}, {node}, is short of "
                )?;
                for (i, s) in short.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{s}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for NoFit {}

/// Whether `model` is one of `allowed` (empty: any).
pub fn model_allowed(allowed: &[String], model: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|m| m == model)
}

/// A typical request shape that fragmentation is measured against (FGD,
/// REPLAY §13): `num_gpu` GPUs with at least `milli` free each (1000 for
/// whole GPUs; `num_gpu == 0` is CPU-only work), `cpu_milli` of CPU, GPU
/// models it accepts (empty = any), and its relative frequency `p`.
#[derive(Debug, Clone, PartialEq)]
pub struct TypicalShape {
    pub num_gpu: u32,
    pub milli: i64,
    pub cpu_milli: i64,
    pub models: Vec<String>,
    pub p: f64,
}

/// The built-in typical shapes (frequencies sum to 1): mostly single GPUs,
/// a fair share of fractions and CPU-only work, and multi-GPU training jobs
/// whose room on idle nodes is worth keeping.
pub fn default_shapes() -> Vec<TypicalShape> {
    let shape = |num_gpu, milli, cpu_milli, p| TypicalShape {
        num_gpu,
        milli,
        cpu_milli,
        models: Vec::new(),
        p,
    };
    vec![
        shape(0, 0, 2000, 0.10),      // CPU-only
        shape(1, 100, 1000, 0.05),    // 0.1 GPU
        shape(1, 250, 1000, 0.10),    // 0.25 GPU
        shape(1, 500, 2000, 0.15),    // 0.5 GPU
        shape(1, 1000, 4000, 0.35),   // 1 GPU
        shape(2, 1000, 8000, 0.10),   // 2 GPUs
        shape(4, 1000, 16_000, 0.08), // 4 GPUs
        shape(8, 1000, 32_000, 0.07), // 8 GPUs
    ]
}

/// A typical shape with its models as a bit set over the placer's model
/// table (`spec == 0`: any model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Typical {
    pub cpu: i64,
    pub milli: i64,
    pub num_gpu: u32,
    pub spec: u64,
    pub p: f64,
}

/// Whether a GPU of model bit `model` is allowed by the set `spec`.
fn spec_ok(spec: u64, model: u64) -> bool {
    spec == 0 || spec & model != 0
}

/// REPLAY §13 node fragmentation `F = Σ p_t·x_t`: `x_t` is the free milli of
/// the GPUs that cannot host shape t (less free than it needs, or a model it
/// does not accept) when t fits the node (CPU, and enough GPUs that can host
/// it), else all the node's free GPU milli (always so for CPU-only shapes).
/// `model_of(i)` is GPU i's model bit.
pub fn fragmentation(
    typical: &[Typical],
    cpu: i64,
    free: &[i64],
    model_of: impl Fn(usize) -> u64,
) -> f64 {
    let total: i64 = free.iter().sum();
    let mut f = 0.0;
    for t in typical {
        let x = if t.num_gpu == 0 || cpu < t.cpu {
            total
        } else {
            let (mut fit, mut below) = (0u32, 0i64);
            for (i, &g) in free.iter().enumerate() {
                if g >= t.milli && spec_ok(t.spec, model_of(i)) {
                    fit += 1;
                } else {
                    below += g;
                }
            }
            if fit >= t.num_gpu { below } else { total }
        };
        f += t.p * x as f64;
    }
    f
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// FGD's score of a fragmentation change: `int64(100·sigmoid(ΔF/1000))`
/// with `ΔF = F_before − F_after` (higher is better).
pub fn fgd_score(f_before: f64, f_after: f64) -> i64 {
    (100.0 * sigmoid((f_before - f_after) / 1000.0)) as i64
}

/// REPLAY §9 best-fit score of a request (`cpu` milli, `gpu_total` milli)
/// on a node with `cpu_free` and `gpu_free` left: `s = 0.5·(cpu_free −
/// cpu)/128000 + 0.5·(gpu_free − gpu_total)/8000`, score `int64((1 −
/// s)·100)`; a CPU request of 0 counts as 100.
pub fn bestfit_score(cpu_free: i64, gpu_free: i64, cpu: i64, gpu_total: i64) -> i64 {
    let cpu = if cpu == 0 { 100 } else { cpu };
    let s =
        0.5 * (cpu_free - cpu) as f64 / 128_000.0 + 0.5 * (gpu_free - gpu_total) as f64 / 8_000.0;
    ((1.0 - s) * 100.0) as i64
}

/// One instance's request in scoring terms: `num_gpu` GPUs with `milli`
/// each (a fraction when `num_gpu == 1 && milli < 1000`), model set `spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Want {
    pub cpu: i64,
    pub mem: i64,
    pub num_gpu: u32,
    pub milli: i64,
    pub spec: u64,
}

impl Want {
    fn shared(&self) -> bool {
        self.num_gpu == 1 && self.milli < 1000
    }
}

/// The GPUs a request takes on a node and FGD's score of taking them: for a
/// fraction, every distinct choice (GPUs with equal free milli give equal
/// results; the lowest index stands for them) is scored and the best wins,
/// lowest index on ties; whole GPUs are the lowest-index fully free ones
/// (all alike to `F`). None when the GPUs do not fit (CPU and memory are the
/// caller's). `model_of(i)` is GPU i's model bit.
pub fn gpu_choice(
    typical: &[Typical],
    cpu: i64,
    free: &[i64],
    model_of: impl Fn(usize) -> u64 + Copy,
    w: &Want,
    scratch: &mut Vec<i64>,
) -> Option<(i64, Vec<usize>)> {
    let frag = |cpu: i64, free: &[i64]| fragmentation(typical, cpu, free, model_of);
    gpu_choice_by(frag, cpu, free, model_of, w, scratch)
}

/// [`gpu_choice`] with the fragmentation `frag(cpu, free)` of the node's
/// model bits given.
fn gpu_choice_by(
    fragmentation: impl Fn(i64, &[i64]) -> f64,
    cpu: i64,
    free: &[i64],
    model_of: impl Fn(usize) -> u64 + Copy,
    w: &Want,
    scratch: &mut Vec<i64>,
) -> Option<(i64, Vec<usize>)> {
    let fits = |i: usize| free[i] >= w.milli && spec_ok(w.spec, model_of(i));
    let before = fragmentation(cpu, free);
    let cpu_after = cpu - w.cpu;
    scratch.clear();
    scratch.extend_from_slice(free);
    if w.shared() {
        let mut best: Option<(i64, usize)> = None;
        for g in 0..free.len() {
            if !fits(g) || (0..g).any(|e| fits(e) && free[e] == free[g]) {
                continue;
            }
            scratch[g] = free[g] - w.milli;
            let s = fgd_score(before, fragmentation(cpu_after, scratch));
            scratch[g] = free[g];
            if best.is_none_or(|b| s > b.0) {
                best = Some((s, g));
            }
        }
        best.map(|(s, g)| (s, vec![g]))
    } else {
        let gpus: Vec<usize> = (0..free.len())
            .filter(|&i| fits(i))
            .take(w.num_gpu as usize)
            .collect();
        if gpus.len() < w.num_gpu as usize {
            return None;
        }
        for &g in &gpus {
            scratch[g] -= w.milli;
        }
        let s = fgd_score(before, fragmentation(cpu_after, scratch));
        Some((s, gpus))
    }
}

/// Typical shapes grouped by their GPU ask (count, milli, models), for a
/// faster [`fragmentation`]: a shape's `x_t` depends on the node's CPU only
/// through `cpu < t.cpu`, so the GPUs are walked once per group, not once
/// per shape, and the CPU test is a binary search over the group's shapes
/// by CPU.
#[derive(Debug, Clone, Default)]
struct Grouped {
    groups: Vec<Group>,
    /// Total frequency of the CPU-only shapes (their `x` is all free GPU).
    cpu_only_p: f64,
}

#[derive(Debug, Clone)]
struct Group {
    num_gpu: u32,
    milli: i64,
    spec: u64,
    /// The group's shapes' CPU, ascending, and the running sum of their
    /// frequencies (`p_upto[i]`: shapes `0..=i`).
    cpu: Vec<i64>,
    p_upto: Vec<f64>,
}

impl Grouped {
    fn of(typical: &[Typical]) -> Grouped {
        let mut g = Grouped::default();
        for t in typical {
            if t.num_gpu == 0 {
                g.cpu_only_p += t.p;
                continue;
            }
            let at = g
                .groups
                .iter()
                .position(|x| (x.num_gpu, x.milli, x.spec) == (t.num_gpu, t.milli, t.spec));
            let i = at.unwrap_or_else(|| {
                g.groups.push(Group {
                    num_gpu: t.num_gpu,
                    milli: t.milli,
                    spec: t.spec,
                    cpu: Vec::new(),
                    p_upto: Vec::new(),
                });
                g.groups.len() - 1
            });
            // Kept sorted by CPU as it is built (a group has few shapes).
            let grp = &mut g.groups[i];
            let at = grp.cpu.partition_point(|&c| c <= t.cpu);
            grp.cpu.insert(at, t.cpu);
            grp.p_upto.insert(at, t.p);
        }
        for grp in &mut g.groups {
            // Frequencies to running sums.
            let mut sum = 0.0;
            for p in &mut grp.p_upto {
                sum += *p;
                *p = sum;
            }
        }
        g
    }

    /// [`fragmentation`] over the shapes grouped (equal up to rounding).
    fn fragmentation(&self, cpu: i64, free: &[i64], model_of: impl Fn(usize) -> u64) -> f64 {
        let total: i64 = free.iter().sum();
        let mut f = self.cpu_only_p * total as f64;
        for g in &self.groups {
            let all = *g.p_upto.last().expect("a group has a shape");
            // Shapes whose CPU the node has: 0..fed.
            let fed = g.cpu.partition_point(|&c| c <= cpu);
            let p_fed = if fed == 0 { 0.0 } else { g.p_upto[fed - 1] };
            let (mut fit, mut below) = (0u32, 0i64);
            for (i, &x) in free.iter().enumerate() {
                if x >= g.milli && spec_ok(g.spec, model_of(i)) {
                    fit += 1;
                } else {
                    below += x;
                }
            }
            let x_fed = if fit >= g.num_gpu { below } else { total };
            f += (all - p_fed) * total as f64 + p_fed * x_fed as f64;
        }
        f
    }
}

/// What one instance of `req` asks of GPUs: (count, milli each) — whole
/// GPUs are 1000 each, a fraction is one GPU's share, (0, 0) is CPU-only.
pub fn gpu_ask(req: &Resources) -> (u32, i64) {
    if req.gpus > 0 {
        (req.gpus, 1000)
    } else if req.gpu_milli > 0 {
        (1, i64::from(req.gpu_milli.min(1000)))
    } else {
        (0, 0)
    }
}

/// A node as the placer scores it. Unhealthy GPUs count as fully taken.
#[derive(Debug, Clone)]
struct NodeState {
    cpu: i64,
    mem: i64,
    free: Vec<i64>,
    models: Vec<u64>,
    free_total: i64,
}

impl NodeState {
    /// How many instances (at most `cap`) fit.
    fn fit_count(&self, w: &Want, cap: u32) -> u32 {
        fit_count(
            (self.cpu, self.mem),
            self.free.len(),
            |i| self.free[i],
            |i| self.models[i],
            w,
            cap,
        )
    }

    fn take(&mut self, w: &Want, gpus: &[usize]) {
        self.cpu -= w.cpu;
        self.mem -= w.mem;
        for &g in gpus {
            self.free[g] -= w.milli;
            self.free_total -= w.milli;
        }
    }
}

/// How many instances (at most `cap`) of `w` fit in `(cpu, mem)` and
/// `gpus` GPUs, GPU `i` with `free(i)` milli and model bit `model(i)`.
fn fit_count(
    (cpu, mem): (i64, i64),
    gpus: usize,
    free: impl Fn(usize) -> i64,
    model: impl Fn(usize) -> u64,
    w: &Want,
    cap: u32,
) -> u32 {
    let by = |free: i64, need: i64| -> u64 {
        if free < need {
            0
        } else if need <= 0 {
            u64::MAX
        } else {
            (free / need) as u64
        }
    };
    let usable = |i: usize| spec_ok(w.spec, model(i));
    let gpu = if w.num_gpu == 0 {
        u64::MAX
    } else if w.shared() {
        (0..gpus)
            .filter(|&i| usable(i))
            .map(|i| (free(i) / w.milli.max(1)) as u64)
            .sum()
    } else {
        let full = (0..gpus)
            .filter(|&i| usable(i) && free(i) >= w.milli)
            .count() as u64;
        full / u64::from(w.num_gpu)
    };
    by(cpu, w.cpu)
        .min(by(mem, w.mem))
        .min(gpu)
        .min(u64::from(cap)) as u32
}

/// Ordering of candidate nodes; the largest wins. For GPU requests:
/// (instances placed here, spread penalty, strands no GPU behind CPU, FGD
/// score, busy, rank); for CPU-only requests: (instances placed here,
/// spread penalty, 0, −free GPU milli, best-fit score, rank).
type Key = (i64, i64, i64, i64, i64, std::cmp::Reverse<u64>);

/// The free GPU milli of a node with `cpu` milli of CPU and `free` GPU
/// milli free that its CPU cannot feed, when each GPU milli needs
/// `cpu_per_milli` of CPU (the typical requests' ratio); 0 when no typical
/// request wants a GPU.
fn cpu_starved(cpu_per_milli: f64, cpu: i64, free: i64) -> f64 {
    if cpu_per_milli <= 0.0 {
        return 0.0;
    }
    (free as f64 - cpu.max(0) as f64 / cpu_per_milli).max(0.0)
}

/// The CPU milli per GPU milli of the typical GPU requests (frequency
/// weighted; CPU-only shapes left out); 0 without GPU shapes.
fn cpu_per_milli(typical: &[Typical]) -> f64 {
    let (mut cpu, mut gpu) = (0.0, 0.0);
    for t in typical.iter().filter(|t| t.num_gpu > 0) {
        cpu += t.p * t.cpu as f64;
        gpu += t.p * (t.milli * i64::from(t.num_gpu)) as f64;
    }
    if gpu > 0.0 { cpu / gpu } else { 0.0 }
}

/// A request class's index of feasible nodes by key (single instances).
struct ClassIndex {
    pool: String,
    want: Want,
    keys: Vec<Option<Key>>,
    order: std::collections::BTreeSet<(Key, usize)>,
    last_used: u64,
}

/// Most request classes indexed at once.
const MAX_CLASSES: usize = 32;

/// The placement engine over a set of nodes. See the module docs for the
/// policy. Single-instance requests are answered from a per-request-class
/// index of node keys, kept current as nodes change, so a placement costs
/// O(classes · log n) after the first request of its class (O(n)).
pub struct Placer {
    /// The typical shapes nodes are scored against: `sets[0]` those given
    /// at construction, then one set per pool given its own
    /// ([`Placer::set_shapes`]).
    sets: Vec<ShapeSet>,
    /// Node position -> its set in `sets`.
    node_set: Vec<usize>,
    models: Vec<String>,
    nodes: Vec<NodeCapacity>,
    state: Vec<NodeState>,
    rank: Vec<u64>,
    classes: Vec<ClassIndex>,
    clock: u64,
    scratch: Vec<i64>,
}

/// Typical shapes as scoring uses them.
struct ShapeSet {
    /// None for the default set.
    pool: Option<String>,
    /// The typical shapes grouped for [`Grouped::fragmentation`].
    grouped: Grouped,
    /// [`cpu_per_milli`] of the typical shapes.
    cpu_per_milli: f64,
}

/// A stable pseudo-random rank of a node id under `seed` (SplitMix64 over
/// FNV-1a).
fn seeded_rank(seed: u64, node_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in node_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Placer {
    /// A placer whose ties go to a pseudo-random node order drawn from
    /// `seed` (stable per node id, so the same across scheduling passes).
    pub fn new(nodes: Vec<NodeCapacity>, shapes: &[TypicalShape], seed: u64) -> Placer {
        let rank = nodes
            .iter()
            .map(|n| seeded_rank(seed, &n.node_id))
            .collect();
        Placer::with_rank(nodes, shapes, rank)
    }

    /// A placer whose ties go to the node order given (position `order[k]`
    /// ranks k-th).
    pub fn with_order(
        nodes: Vec<NodeCapacity>,
        shapes: &[TypicalShape],
        order: &[usize],
    ) -> Placer {
        let mut rank = vec![u64::MAX; nodes.len()];
        for (k, &pos) in order.iter().enumerate() {
            rank[pos] = k as u64;
        }
        Placer::with_rank(nodes, shapes, rank)
    }

    fn with_rank(nodes: Vec<NodeCapacity>, shapes: &[TypicalShape], rank: Vec<u64>) -> Placer {
        let mut p = Placer {
            sets: Vec::new(),
            node_set: vec![0; nodes.len()],
            models: Vec::new(),
            state: Vec::with_capacity(nodes.len()),
            nodes,
            rank,
            classes: Vec::new(),
            clock: 0,
            scratch: Vec::new(),
        };
        for i in 0..p.nodes.len() {
            let models = p.nodes[i]
                .gpus
                .iter()
                .map(|g| g.model.clone())
                .collect::<Vec<_>>();
            let bits: Vec<u64> = models.iter().map(|m| p.model_bit(m)).collect();
            let n = &p.nodes[i];
            let free: Vec<i64> = n
                .gpus
                .iter()
                .map(|g| {
                    if g.healthy {
                        i64::from(g.free_milli.min(1000))
                    } else {
                        0
                    }
                })
                .collect();
            p.state.push(NodeState {
                cpu: n.cpu_free_milli,
                mem: n.memory_free_mib,
                free_total: free.iter().sum(),
                free,
                models: bits,
            });
        }
        let set = p.shape_set(None, shapes);
        p.sets.push(set);
        p
    }

    fn shape_set(&mut self, pool: Option<&str>, shapes: &[TypicalShape]) -> ShapeSet {
        let typical: Vec<Typical> = shapes
            .iter()
            .map(|t| Typical {
                cpu: t.cpu_milli,
                milli: t.milli,
                num_gpu: t.num_gpu,
                spec: t.models.iter().fold(0, |s, m| s | self.model_bit(m)),
                p: t.p,
            })
            .collect();
        ShapeSet {
            pool: pool.map(str::to_string),
            cpu_per_milli: cpu_per_milli(&typical),
            grouped: Grouped::of(&typical),
        }
    }

    /// Scores `pool`'s nodes against `shapes` from now on (what the pool's
    /// own work asks for, [`super::shapes::ShapeStats::typical`]); empty
    /// `shapes` go back to the placer's defaults. The pool's request
    /// indexes are rebuilt at their next use.
    pub fn set_shapes(&mut self, pool: &str, shapes: &[TypicalShape]) {
        let at = self
            .sets
            .iter()
            .position(|s| s.pool.as_deref() == Some(pool));
        let set = if shapes.is_empty() {
            0
        } else {
            let new = self.shape_set(Some(pool), shapes);
            match at {
                Some(i) => {
                    self.sets[i] = new;
                    i
                }
                None => {
                    self.sets.push(new);
                    self.sets.len() - 1
                }
            }
        };
        for (pos, n) in self.nodes.iter().enumerate() {
            if n.pool == pool {
                self.node_set[pos] = set;
            }
        }
        self.classes.retain(|c| c.pool != pool);
    }

    /// The bit of a model name. Past 64 distinct models the rest share the
    /// last bit: scoring treats them alike, feasibility still compares names.
    fn model_bit(&mut self, model: &str) -> u64 {
        let i = match self.models.iter().position(|m| m == model) {
            Some(i) => i,
            None => {
                self.models.push(model.to_string());
                self.models.len() - 1
            }
        };
        1u64 << i.min(63)
    }

    /// The nodes with what they have left.
    pub fn nodes(&self) -> &[NodeCapacity] {
        &self.nodes
    }

    /// The nodes, consumed.
    #[cfg(test)]
    pub(crate) fn into_nodes(self) -> Vec<NodeCapacity> {
        self.nodes
    }

    fn want(&mut self, req: &Resources) -> Want {
        let (num_gpu, milli) = gpu_ask(req);
        let spec = if num_gpu == 0 {
            0
        } else {
            req.gpu_models.iter().fold(0, |s, m| s | self.model_bit(m))
        };
        Want {
            cpu: req.cpu_milli as i64,
            mem: req.memory_mib as i64,
            num_gpu,
            milli,
            spec,
        }
    }

    /// Whether node `pos` may host `req` at all (pool, readiness); names are
    /// compared here, so models beyond the 64th are still told apart.
    fn eligible(&self, pos: usize, pool: &str, req: &Resources) -> bool {
        let n = &self.nodes[pos];
        n.pool == pool
            && n.schedulable
            && (req.gpus == 0 && req.gpu_milli == 0
                || req.gpu_models.is_empty()
                || self.models.len() <= 64
                || n.gpus
                    .iter()
                    .any(|g| model_allowed(&req.gpu_models, &g.model)))
    }

    /// The key of placing `k` instances (fewer if fewer fit) on node `pos`,
    /// with the GPUs each takes; None if none fits.
    fn key(
        &mut self,
        pos: usize,
        w: &Want,
        cap: u32,
        penalty: i64,
    ) -> Option<(Key, Vec<Vec<usize>>)> {
        let k = self.state[pos].fit_count(w, cap);
        if k == 0 {
            return None;
        }
        let rank = std::cmp::Reverse(self.rank[pos]);
        let node = &self.state[pos];
        if w.num_gpu == 0 {
            let key = (
                i64::from(k),
                penalty,
                0,
                -node.free_total,
                bestfit_score(node.cpu, node.free_total, w.cpu, 0),
                rank,
            );
            return Some((key, vec![Vec::new(); k as usize]));
        }
        let busy = i64::from(node.free.iter().any(|&f| f < 1000));
        let set = &self.sets[self.node_set[pos]];
        let models = &node.models;
        let frag = |cpu: i64, free: &[i64]| set.grouped.fragmentation(cpu, free, |i| models[i]);
        let mut sim = node.clone();
        let mut taken = Vec::with_capacity(k as usize);
        let mut score = 0;
        for _ in 0..k {
            let (s, gpus) = gpu_choice_by(
                frag,
                sim.cpu,
                &sim.free,
                |i| models[i],
                w,
                &mut self.scratch,
            )?;
            score = s;
            sim.take(w, &gpus);
            taken.push(gpus);
        }
        if k > 1 {
            // The score of taking all k together.
            score = fgd_score(frag(node.cpu, &node.free), frag(sim.cpu, &sim.free));
        }
        let keeps_fed = i64::from(
            cpu_starved(set.cpu_per_milli, sim.cpu, sim.free_total)
                <= cpu_starved(set.cpu_per_milli, node.cpu, node.free_total),
        );
        Some(((i64::from(k), penalty, keeps_fed, score, busy, rank), taken))
    }

    /// Places `instances` copies of `req` on nodes of `pool`, all or none.
    /// With `spread`, instances prefer nodes, then availability zones, that
    /// hold fewer of this job's instances (services); otherwise a gang
    /// prefers as few nodes as possible. On failure nothing is taken and
    /// the error says why the job must wait.
    pub fn place(
        &mut self,
        pool: &str,
        req: &Resources,
        instances: u32,
        spread: bool,
    ) -> Result<Vec<Assignment>, NoFit> {
        self.place_avoiding(pool, req, instances, spread, &[])
    }

    /// [`Placer::place`] without using the nodes whose position is `true` in
    /// `avoid` (nodes reserved for a job ahead in the queue; an empty slice
    /// avoids nothing).
    pub(crate) fn place_avoiding(
        &mut self,
        pool: &str,
        req: &Resources,
        instances: u32,
        spread: bool,
        avoid: &[bool],
    ) -> Result<Vec<Assignment>, NoFit> {
        let w = self.want(req);
        let exact_names = self.models.len() > 64 && !req.gpu_models.is_empty();
        if instances == 1 && !exact_names {
            return self.place_indexed(pool, req, &w, avoid);
        }
        self.place_scan(pool, req, &w, instances, spread, avoid)
    }

    /// Node-by-node placement of several instances (or of one whose models
    /// are past the bit table): each round takes the best node by key.
    fn place_scan(
        &mut self,
        pool: &str,
        req: &Resources,
        w: &Want,
        instances: u32,
        spread: bool,
        avoid: &[bool],
    ) -> Result<Vec<Assignment>, NoFit> {
        let w = *w;
        let eligible: Vec<usize> = (0..self.nodes.len())
            .filter(|&p| !avoid.get(p).copied().unwrap_or(false) && self.eligible(p, pool, req))
            .collect();
        let room: u64 = eligible
            .iter()
            .map(|&p| u64::from(self.state[p].fit_count(&w, instances)))
            .sum();
        if room < u64::from(instances) {
            return Err(no_fit_reason(&self.nodes, pool, req, instances));
        }
        let saved: Vec<(usize, NodeState)> = eligible
            .iter()
            .map(|&p| (p, self.state[p].clone()))
            .collect();
        let mut picks: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut on_node: std::collections::HashMap<usize, i64> = Default::default();
        let mut in_az: std::collections::HashMap<String, i64> = Default::default();
        let mut used = vec![false; self.nodes.len()];
        let mut remaining = instances;
        while remaining > 0 {
            let mut best: Option<(Key, usize, Vec<Vec<usize>>)> = None;
            for &pos in &eligible {
                if !spread && used[pos] {
                    continue;
                }
                let (cap, penalty) = if spread {
                    let az = &self.nodes[pos].az;
                    (
                        1,
                        -(on_node.get(&pos).copied().unwrap_or(0) * 1_000_000
                            + in_az.get(az).copied().unwrap_or(0)),
                    )
                } else {
                    (remaining, 0)
                };
                if let Some((key, taken)) = self.key(pos, &w, cap, penalty)
                    && best.as_ref().is_none_or(|b| key > b.0)
                {
                    best = Some((key, pos, taken));
                }
            }
            let Some((_, pos, taken)) = best else {
                for (p, s) in saved {
                    self.state[p] = s;
                }
                return Err(no_fit_reason(&self.nodes, pool, req, instances));
            };
            for gpus in taken {
                self.state[pos].take(&w, &gpus);
                remaining -= 1;
                *on_node.entry(pos).or_default() += 1;
                *in_az.entry(self.nodes[pos].az.clone()).or_default() += 1;
                picks.push((pos, gpus));
            }
            used[pos] = true;
        }
        // Commit: the states already hold the result; mirror it in the
        // capacities and refresh the indexes of the nodes touched.
        drop(saved);
        Ok(self.commit(&w, req, picks))
    }

    fn commit(
        &mut self,
        w: &Want,
        req: &Resources,
        picks: Vec<(usize, Vec<usize>)>,
    ) -> Vec<Assignment> {
        let mut touched: Vec<usize> = Vec::new();
        let mut out = Vec::with_capacity(picks.len());
        for (pos, gpus) in picks {
            let node = &mut self.nodes[pos];
            for &g in &gpus {
                node.gpus[g].free_milli -= w.milli as u32;
            }
            node.cpu_free_milli -= req.cpu_milli as i64;
            node.memory_free_mib -= req.memory_mib as i64;
            out.push(Assignment {
                node_id: node.node_id.clone(),
                gpu_indexes: gpus.iter().map(|&g| node.gpus[g].index).collect(),
                gpu_uuids: gpus.iter().map(|&g| node.gpus[g].uuid.clone()).collect(),
            });
            if !touched.contains(&pos) {
                touched.push(pos);
            }
        }
        for pos in touched {
            self.refresh(pos);
        }
        out
    }

    /// Gives back what an instance of `req` held on `node_id` (the GPUs of
    /// `gpu_indexes`): it ended. Only that node is re-keyed, so a pass after
    /// an instance ends costs what placing costs, not a rebuild over every
    /// node. Answers false if the node is not this placer's (the caller
    /// then rebuilds).
    pub fn release(&mut self, node_id: &str, req: &Resources, gpu_indexes: &[u32]) -> bool {
        let Some(pos) = self.nodes.iter().position(|n| n.node_id == node_id) else {
            return false;
        };
        let w = self.want(req);
        let node = &mut self.nodes[pos];
        let state = &mut self.state[pos];
        node.cpu_free_milli += req.cpu_milli as i64;
        node.memory_free_mib += req.memory_mib as i64;
        state.cpu += w.cpu;
        state.mem += w.mem;
        for idx in gpu_indexes {
            let Some(g) = node.gpus.iter().position(|g| g.index == *idx) else {
                continue;
            };
            node.gpus[g].free_milli += w.milli as u32;
            if node.gpus[g].healthy {
                // As the placer was built: an unhealthy GPU offers nothing.
                let free = i64::from(node.gpus[g].free_milli.min(1000));
                state.free_total += free - state.free[g];
                state.free[g] = free;
            }
        }
        self.refresh(pos);
        true
    }

    /// Re-keys node `pos` in every class index.
    fn refresh(&mut self, pos: usize) {
        for c in 0..self.classes.len() {
            let (pool, want) = (self.classes[c].pool.clone(), self.classes[c].want);
            let new = self.class_key(pos, &pool, &want);
            let class = &mut self.classes[c];
            if let Some(old) = class.keys[pos].take() {
                class.order.remove(&(old, pos));
            }
            if let Some(k) = new {
                class.order.insert((k, pos));
            }
            class.keys[pos] = new;
        }
    }

    fn class_key(&mut self, pos: usize, pool: &str, w: &Want) -> Option<Key> {
        let n = &self.nodes[pos];
        if n.pool != pool || !n.schedulable {
            return None;
        }
        self.key(pos, w, 1, 0).map(|(k, _)| k)
    }

    fn place_indexed(
        &mut self,
        pool: &str,
        req: &Resources,
        w: &Want,
        avoid: &[bool],
    ) -> Result<Vec<Assignment>, NoFit> {
        self.clock += 1;
        let c = match self
            .classes
            .iter()
            .position(|c| c.pool == pool && c.want == *w)
        {
            Some(c) => c,
            None => {
                if self.classes.len() >= MAX_CLASSES {
                    let oldest = (0..self.classes.len())
                        .min_by_key(|&c| self.classes[c].last_used)
                        .expect("classes is full");
                    self.classes.swap_remove(oldest);
                }
                let mut keys = Vec::with_capacity(self.nodes.len());
                let mut order = std::collections::BTreeSet::new();
                for pos in 0..self.nodes.len() {
                    let k = self.class_key(pos, pool, w);
                    if let Some(k) = k {
                        order.insert((k, pos));
                    }
                    keys.push(k);
                }
                self.classes.push(ClassIndex {
                    pool: pool.to_string(),
                    want: *w,
                    keys,
                    order,
                    last_used: 0,
                });
                self.classes.len() - 1
            }
        };
        self.classes[c].last_used = self.clock;
        let Some(&(_, pos)) = self.classes[c]
            .order
            .iter()
            .rev()
            .find(|(_, p)| !avoid.get(*p).copied().unwrap_or(false))
        else {
            return Err(no_fit_reason(&self.nodes, pool, req, 1));
        };
        let (_, mut taken) = self.key(pos, w, 1, 0).expect("an indexed node fits");
        let gpus = taken.pop().expect("one instance");
        self.state[pos].take(w, &gpus);
        Ok(self.commit(w, req, vec![(pos, gpus)]))
    }

    /// The nodes (by position) that `instances` x `req` in `pool` could use
    /// if everything on them had ended; None when even the idle pool cannot
    /// host them all (a job that waits for nodes to be added reserves
    /// nothing).
    pub(crate) fn reservable(
        &mut self,
        pool: &str,
        req: &Resources,
        instances: u32,
    ) -> Option<Vec<bool>> {
        let w = self.want(req);
        let mut room = 0u64;
        let usable: Vec<bool> = (0..self.nodes.len())
            .map(|p| {
                let fit = if self.eligible(p, pool, req) {
                    // As if everything on the node had ended.
                    let (n, models) = (&self.nodes[p], &self.state[p].models);
                    fit_count(
                        (n.cpu_total_milli, n.memory_total_mib),
                        n.gpus.len(),
                        |i| if n.gpus[i].healthy { 1000 } else { 0 },
                        |i| models[i],
                        &w,
                        instances,
                    )
                } else {
                    0
                };
                room += u64::from(fit);
                fit > 0
            })
            .collect();
        (room >= u64::from(instances)).then_some(usable)
    }
}

/// Places `instances` copies of `req` in `pool`, all or none, with the
/// built-in shapes and ties to the node order given. On success the
/// capacities are reduced by what was taken; on failure they are unchanged
/// and the error says why the job must wait. (The tests' entry point.)
#[cfg(test)]
pub(crate) fn place(
    nodes: &mut [NodeCapacity],
    pool: &str,
    req: &Resources,
    instances: u32,
) -> Result<Vec<Assignment>, NoFit> {
    let order: Vec<usize> = (0..nodes.len()).collect();
    let mut placer = Placer::with_order(nodes.to_vec(), &default_shapes(), &order);
    let out = placer.place(pool, req, instances, false)?;
    for (n, placed) in nodes.iter_mut().zip(placer.into_nodes()) {
        *n = placed;
    }
    Ok(out)
}

fn no_fit_reason(nodes: &[NodeCapacity], pool: &str, req: &Resources, instances: u32) -> NoFit {
    let in_pool: Vec<&NodeCapacity> = nodes.iter().filter(|n| n.pool == pool).collect();
    let want = Demand {
        instances,
        resources: Box::new(req.clone()),
    };
    let pool = pool.to_string();
    if in_pool.is_empty() {
        return NoFit::NoNodes { pool, want };
    }
    let schedulable: Vec<&&NodeCapacity> = in_pool.iter().filter(|n| n.schedulable).collect();
    if schedulable.is_empty() {
        return NoFit::NoReadyNode { pool, want };
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
            return NoFit::TooFewGpus {
                pool,
                gpus: req.gpus,
                models: req.gpu_models.clone(),
                largest,
                want,
            };
        }
    }
    // The best candidate: the Ready node short of the fewest resources
    // (then the most instances it could take, then node order).
    let shortfalls: Vec<(usize, Vec<Shortfall>, u64)> = schedulable
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (short, fit) = node_shortfall(n, req);
            (i, short, fit)
        })
        .collect();
    let room: u64 = shortfalls.iter().map(|(_, _, fit)| fit).sum();
    let (best, short, _) = shortfalls
        .into_iter()
        .min_by_key(|(i, short, fit)| (short.len(), std::cmp::Reverse(*fit), *i))
        .expect("at least one schedulable node");
    if short.is_empty() {
        return NoFit::NotTogether { pool, room, want };
    }
    NoFit::Short {
        pool,
        node: schedulable[best].node_id.clone(),
        short,
        want,
    }
}

/// What `n` lacks for one instance of `req`, and how many instances of it
/// fit there.
fn node_shortfall(n: &NodeCapacity, req: &Resources) -> (Vec<Shortfall>, u64) {
    let mut short = Vec::new();
    let usable = |g: &&GpuSlot| g.healthy && model_allowed(&req.gpu_models, &g.model);
    let mut fit = u64::MAX;
    if req.gpus > 0 {
        let whole = n
            .gpus
            .iter()
            .filter(usable)
            .filter(|g| g.free_milli == 1000)
            .count();
        fit = fit.min(whole as u64 / u64::from(req.gpus));
        if whole < req.gpus as usize {
            short.push(Shortfall::Gpus {
                free: whole,
                needed: req.gpus,
                models: req.gpu_models.clone(),
            });
        }
    } else if req.gpu_milli > 0 {
        let shares: u64 = n
            .gpus
            .iter()
            .filter(usable)
            .map(|g| u64::from(g.free_milli / req.gpu_milli))
            .sum();
        fit = fit.min(shares);
        if shares == 0 {
            let most = n
                .gpus
                .iter()
                .filter(usable)
                .map(|g| g.free_milli)
                .max()
                .unwrap_or(0);
            short.push(Shortfall::GpuShare {
                most_free_milli: most,
                needed_milli: req.gpu_milli,
                models: req.gpu_models.clone(),
            });
        }
    }
    if req.cpu_milli > 0 {
        let free = n.cpu_free_milli.max(0) as u64;
        fit = fit.min(free / req.cpu_milli);
        if free < req.cpu_milli {
            short.push(Shortfall::Cpu {
                free_milli: free,
                needed_milli: req.cpu_milli,
            });
        }
    }
    if req.memory_mib > 0 {
        let free = n.memory_free_mib.max(0) as u64;
        fit = fit.min(free / req.memory_mib);
        if free < req.memory_mib {
            short.push(Shortfall::Memory {
                free_mib: free,
                needed_mib: req.memory_mib,
            });
        }
    }
    (short, if fit == u64::MAX { 1 } else { fit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testkit::{self, oracle_room};
    use proptest::prelude::*;

    fn node(id: &str, gpus: u32) -> NodeCapacity {
        NodeCapacity {
            node_id: id.into(),
            pool: "public".into(),
            az: String::new(),
            schedulable: true,
            cpu_free_milli: 64_000,
            memory_free_mib: 512 * 1024,
            cpu_total_milli: 64_000,
            memory_total_mib: 512 * 1024,
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

    /// A job that waits says which resource the best node lacks, with the
    /// numbers: GPUs free but CPU gone names CPU, not GPUs.
    #[test]
    fn a_waiting_job_names_the_resource_that_is_short() {
        let reason = |nodes: &mut Vec<NodeCapacity>, req: &Resources| {
            place(nodes, "public", req, 1)
                .expect_err("does not fit")
                .to_string()
        };
        let mut busy_cpu = vec![node("a", 4), node("b", 4)];
        busy_cpu[0].cpu_free_milli = 500;
        busy_cpu[1].cpu_free_milli = 0;
        let notebook = Resources {
            gpu_milli: 250,
            cpu_milli: 2000,
            memory_mib: 8192,
            ..Default::default()
        };
        let r = reason(&mut busy_cpu, &notebook);
        assert!(r.contains("short of CPU: 500m free, 2000m needed"), "{r}");
        assert!(r.contains(", a,"), "the closest node is named: {r}");
        assert!(!r.contains("GPU share") && !r.contains("memory"), "{r}");

        let mut busy_mem = vec![node("a", 4)];
        busy_mem[0].memory_free_mib = 1000;
        let r = reason(&mut busy_mem, &gpus(1));
        assert!(r.contains("memory: 1000 MiB free, 1024 MiB needed"), "{r}");

        let mut shared = vec![node("a", 2)];
        for g in &mut shared[0].gpus {
            g.free_milli = 200;
        }
        let r = reason(&mut shared, &notebook);
        assert!(
            r.contains("GPU share: at most 200m free on one GPU, 250m needed"),
            "{r}"
        );

        let mut taken = vec![node("a", 8)];
        for g in taken[0].gpus.iter_mut().take(6) {
            g.free_milli = 0;
        }
        let r = reason(&mut taken, &gpus(4));
        assert!(r.contains("GPUs: 2 free GPU(s), 4 needed"), "{r}");
        // Two short at once: both named.
        taken[0].cpu_free_milli = 0;
        let r = reason(&mut taken, &gpus(4));
        assert!(
            r.contains("GPUs: 2 free") && r.contains("CPU: 0m free"),
            "{r}"
        );
        // A model nobody has is still the largest-node message.
        let mut r_model = gpus(1);
        r_model.gpu_models = vec!["A100".into()];
        let r = reason(&mut vec![node("a", 8)], &r_model);
        assert!(r.contains("of model A100 (largest has 0)"), "{r}");
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
        assert!(
            matches!(err, NoFit::TooFewGpus { largest: 8, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("has 16 GPUs (largest has 8)"),
            "{err}"
        );
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
        assert!(err.to_string().contains("of model A100"), "{err}");
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
    fn a_cpu_heavy_job_does_not_strand_gpus_behind_the_cpu_it_takes() {
        // a: 3 of 8 GPUs free but 30 cores; b: 4 idle GPUs and 128 cores.
        // FGD alone prefers a (it fills a busy node: score 51 against 48).
        // With 24 cores gone a's 2 free GPUs would have 6 cores between
        // them, under the typical requests' 4 cores per GPU: b, whose CPU
        // feeds its GPUs either way.
        let mut a = node("a", 8);
        take(&mut a, &[0, 1, 2, 3, 4], 1000);
        a.cpu_free_milli = 30_000;
        let mut b = node("b", 4);
        b.cpu_free_milli = 128_000;
        let heavy = Resources {
            gpus: 1,
            cpu_milli: 24_000,
            memory_mib: 1024,
            ..Default::default()
        };
        let mut nodes = vec![a.clone(), b.clone()];
        assert_eq!(
            place(&mut nodes, "public", &heavy, 1).unwrap()[0].node_id,
            "b"
        );
        // A light job strands nothing on a: FGD's score decides, a.
        let light = Resources {
            cpu_milli: 2000,
            ..heavy.clone()
        };
        let mut nodes = vec![a.clone(), b.clone()];
        assert_eq!(
            place(&mut nodes, "public", &light, 1).unwrap()[0].node_id,
            "a"
        );
        // A pool whose work learned to need 1 core per GPU: 6 cores feed
        // a's 2 GPUs, FGD decides (a); other pools keep the defaults.
        let light_work = [TypicalShape {
            num_gpu: 1,
            milli: 1000,
            cpu_milli: 1000,
            models: Vec::new(),
            p: 1.0,
        }];
        let mut p = Placer::new(vec![a.clone(), b.clone()], &default_shapes(), 1);
        p.set_shapes("public", &light_work);
        p.set_shapes("other", &[]);
        assert_eq!(p.place("public", &heavy, 1, false).unwrap()[0].node_id, "a");
        // Back to the defaults.
        let mut p = Placer::new(vec![a, b], &default_shapes(), 1);
        p.set_shapes("public", &light_work);
        p.set_shapes("public", &[]);
        assert_eq!(p.place("public", &heavy, 1, false).unwrap()[0].node_id, "b");
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
        // total GPU milli placed, summed over 40 streams drawn from a fixed
        // seed (proptest's deterministic generator).
        use proptest::strategy::ValueTree;
        let sizes = prop::collection::vec(prop::sample::select(&[4u32, 8, 8][..]), 6);
        // About 1.2x the cluster's GPUs in demand.
        let stream = prop::collection::vec(
            prop_oneof![
                4 => prop::sample::select(&[100u32, 250, 300, 500, 700][..]).prop_map(frac),
                3 => Just(gpus(1)),
                1 => Just(gpus(2)),
                1 => Just(gpus(4)),
                1 => Just(gpus(8)),
            ],
            25,
        );
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut ours_total, mut ff_total) = (0u64, 0u64);
        for _ in 0..40 {
            let (sizes, stream) = (&sizes, &stream)
                .new_tree(&mut runner)
                .expect("a stream")
                .current();
            let start: Vec<NodeCapacity> = sizes
                .iter()
                .enumerate()
                .map(|(i, &g)| node(&format!("n{i}"), g))
                .collect();
            let (mut ours, mut ff) = (start.clone(), start);
            for r in &stream {
                let d = u64::from(r.gpu_demand_milli());
                if place(&mut ours, "public", r, 1).is_ok() {
                    ours_total += d;
                }
                if first_fit(&mut ff, r) {
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

    /// Checks one `place` call from its inputs and outputs only.
    fn validate(
        before: &[NodeCapacity],
        after: &[NodeCapacity],
        pool: &str,
        req: &Resources,
        instances: u32,
        result: &Result<Vec<Assignment>, NoFit>,
    ) {
        let room: u64 = before
            .iter()
            .map(|n| oracle_room(n, pool, req).min(instances as u64))
            .sum();
        let placed = match result {
            Err(why) => {
                assert_eq!(after, before, "a failed placement changed capacities");
                assert!(why.to_string().starts_with("waiting for capacity"), "{why}");
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

    /// A step of a random run: place a request, or free a node (as if
    /// what ran there ended).
    #[derive(Debug, Clone)]
    enum Step {
        Place(String, Resources, u32),
        Free(prop::sample::Index),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                24 => testkit::request().prop_map(|(p, r, n)| Step::Place(p, r, n)),
                1 => any::<prop::sample::Index>().prop_map(Step::Free),
            ],
            1..80,
        )
    }

    /// Every placement on random clusters passes the independent
    /// validator, and the same input gives the same answer. Both outcomes
    /// are exercised (counted over all cases).
    #[test]
    fn property_random_clusters_and_requests() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (ok, err) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 300,
            ..ProptestConfig::default()
        });
        runner
            .run(&(testkit::cluster(), steps()), |(mut nodes, steps)| {
                for step in steps {
                    let (pool, req, instances) = match step {
                        Step::Free(i) => {
                            let at = i.index(nodes.len());
                            let n = &mut nodes[at];
                            for g in &mut n.gpus {
                                g.free_milli = 1000;
                            }
                            n.cpu_free_milli = n.cpu_total_milli;
                            n.memory_free_mib = n.memory_total_mib;
                            continue;
                        }
                        Step::Place(pool, req, instances) => (pool, req, instances),
                    };
                    let before = nodes.clone();
                    let result = place(&mut nodes, &pool, &req, instances);
                    validate(&before, &nodes, &pool, &req, instances, &result);
                    let mut again = before.clone();
                    prop_assert_eq!(place(&mut again, &pool, &req, instances), result.clone());
                    let counter = if result.is_ok() { &ok } else { &err };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
            .unwrap();
        let (ok, err) = (ok.into_inner(), err.into_inner());
        assert!(ok > 2000 && err > 2000, "ok {ok}, err {err}");
    }

    proptest! {
        /// The grouped fragmentation the placer scores with is FGD's
        /// (REPLAY §13) up to rounding, for any shapes, CPU and GPUs.
        #[test]
        fn property_grouped_fragmentation_is_fgd_s(
            shapes in proptest::collection::vec(
                (0u32..4, prop::sample::select(vec![100i64, 250, 500, 810, 1000]),
                 prop::sample::select(vec![0i64, 1000, 4000, 8000, 16_000, 33_000]),
                 0u64..4, 1u32..100),
                0..40),
            cpu in prop::sample::select(vec![0i64, 999, 1000, 4000, 8000, 12_000, 16_000, 64_000]),
            free in proptest::collection::vec(
                prop::sample::select(vec![0i64, 90, 190, 250, 500, 750, 1000]), 0..9),
            models in proptest::collection::vec(prop::sample::select(vec![1u64, 2]), 9),
        ) {
            let typical: Vec<Typical> = shapes
                .iter()
                .map(|&(num_gpu, milli, cpu, spec, w)| Typical {
                    cpu,
                    milli: if num_gpu == 0 { 0 } else if num_gpu > 1 { 1000 } else { milli },
                    num_gpu,
                    spec,
                    p: f64::from(w) / 100.0,
                })
                .collect();
            let want = fragmentation(&typical, cpu, &free, |i| models[i]);
            let got = Grouped::of(&typical).fragmentation(cpu, &free, |i| models[i]);
            prop_assert!((want - got).abs() <= 1e-6 * want.abs().max(1.0), "{want} vs {got}");
        }

        /// One long-lived placer (class indexes kept current across
        /// requests) decides exactly as a fresh node-by-node scan over the
        /// same nodes, and every decision passes the independent validator.
        #[test]
        fn property_indexed_placer_matches_a_fresh_scan(
            nodes in testkit::cluster(),
            requests in prop::collection::vec(
                prop_oneof![
                    1 => testkit::request().prop_map(|(p, r, _)| (p, r)),
                    // Repeat common classes so the indexes get reused.
                    1 => prop::sample::select(&[1u32, 2][..])
                        .prop_map(|g| ("public".to_string(), gpus(g))),
                ],
                1..150,
            ),
        ) {
            let order: Vec<usize> = (0..nodes.len()).collect();
            let mut live = Placer::with_order(nodes, &default_shapes(), &order);
            for (pool, req) in requests {
                let before = live.nodes().to_vec();
                let mut fresh = Placer::with_order(before.clone(), &default_shapes(), &order);
                let w = fresh.want(&req);
                let expected = fresh.place_scan(&pool, &req, &w, 1, false, &[]);
                let got = live.place(&pool, &req, 1, false);
                prop_assert_eq!(&got, &expected, "request {:?} in {}", req, pool);
                validate(&before, live.nodes(), &pool, &req, 1, &got);
            }
        }

        /// Pools given their own typical shapes mid-stream
        /// ([`Placer::set_shapes`], their indexes rebuilt): the kept placer
        /// still decides as one built afresh with the same shapes.
        #[test]
        fn property_per_pool_shapes_keep_the_placer_as_if_built_afresh(
            nodes in testkit::cluster(),
            steps in prop::collection::vec(
                prop_oneof![
                    3 => testkit::request().prop_map(|(p, r, _)| (p, Some(r), 0usize)),
                    // Repeat common classes so their indexes outlive a change.
                    3 => (prop::sample::select(&[1u32, 2][..]), prop::sample::select(&[1000u64, 16_000][..]))
                        .prop_map(|(g, cpu)| ("public".to_string(), Some(Resources { cpu_milli: cpu, ..gpus(g) }), 0usize)),
                    1 => (testkit::request(), 0usize..3).prop_map(|((p, _, _), k)| (p, None, k)),
                ],
                1..120,
            ),
        ) {
            let shape = |num_gpu, milli, cpu_milli, p| TypicalShape {
                num_gpu,
                milli,
                cpu_milli,
                models: Vec::new(),
                p,
            };
            let sets = [
                Vec::new(),
                vec![shape(1, 1000, 1000, 0.7), shape(1, 250, 500, 0.3)],
                vec![shape(1, 1000, 32_000, 0.5), shape(2, 1000, 8000, 0.3), shape(0, 0, 4000, 0.2)],
            ];
            let order: Vec<usize> = (0..nodes.len()).collect();
            let mut live = Placer::with_order(nodes, &default_shapes(), &order);
            let mut given: Vec<(String, usize)> = Vec::new();
            for (pool, req, k) in steps {
                let Some(req) = req else {
                    live.set_shapes(&pool, &sets[k]);
                    given.push((pool, k));
                    continue;
                };
                let before = live.nodes().to_vec();
                let mut fresh = Placer::with_order(before.clone(), &default_shapes(), &order);
                for (p, k) in &given {
                    fresh.set_shapes(p, &sets[*k]);
                }
                let w = fresh.want(&req);
                let expected = fresh.place_scan(&pool, &req, &w, 1, false, &[]);
                let got = live.place(&pool, &req, 1, false);
                prop_assert_eq!(&got, &expected, "request {:?} in {}", req, pool);
                validate(&before, live.nodes(), &pool, &req, 1, &got);
            }
        }

        /// Instances that end give their room back to a kept placer
        /// ([`Placer::release`]): it then has what a placer built afresh
        /// from the same capacity has, and decides as it does.
        #[test]
        fn property_a_released_instance_leaves_the_placer_as_if_built_afresh(
            nodes in testkit::cluster(),
            steps in prop::collection::vec(
                (testkit::request().prop_map(|(p, r, _)| (p, r)), any::<bool>(), any::<prop::sample::Index>()),
                1..120,
            ),
        ) {
            let order: Vec<usize> = (0..nodes.len()).collect();
            let mut live = Placer::with_order(nodes, &default_shapes(), &order);
            let mut running: Vec<(Resources, Assignment)> = Vec::new();
            for ((pool, req), end_one, which) in steps {
                if end_one && !running.is_empty() {
                    let (req, a) = running.swap_remove(which.index(running.len()));
                    prop_assert!(live.release(&a.node_id, &req, &a.gpu_indexes));
                    continue;
                }
                let mut fresh = Placer::with_order(live.nodes().to_vec(), &default_shapes(), &order);
                let expected = fresh.place(&pool, &req, 1, false);
                let got = live.place(&pool, &req, 1, false);
                prop_assert_eq!(&got, &expected, "request {:?} in {}", req, pool);
                if let Ok(mut a) = got {
                    running.push((req, a.remove(0)));
                }
            }
            // Everything ended: all the room is back.
            for (req, a) in running.drain(..) {
                prop_assert!(live.release(&a.node_id, &req, &a.gpu_indexes));
            }
            let idle = Placer::with_order(live.nodes().to_vec(), &default_shapes(), &order);
            for (l, i) in live.state.iter().zip(&idle.state) {
                prop_assert_eq!((l.cpu, l.mem, &l.free, l.free_total), (i.cpu, i.mem, &i.free, i.free_total));
            }
        }
    }

    #[test]
    fn service_replicas_spread_over_nodes_and_zones() {
        let mut nodes: Vec<NodeCapacity> = (0..6)
            .map(|i| {
                let mut n = node(&format!("n{i}"), 8);
                n.az = format!("AZ{}", i % 3 + 1);
                n
            })
            .collect();
        let order: Vec<usize> = (0..nodes.len()).collect();
        let mut p = Placer::with_order(nodes.clone(), &default_shapes(), &order);
        let placed = p.place("public", &gpus(1), 3, true).unwrap();
        let mut used: Vec<&str> = placed.iter().map(|a| a.node_id.as_str()).collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 3, "three replicas on three nodes: {placed:?}");
        let zones: std::collections::BTreeSet<String> = placed
            .iter()
            .map(|a| {
                let n: usize = a.node_id[1..].parse().unwrap();
                format!("AZ{}", n % 3 + 1)
            })
            .collect();
        assert_eq!(zones.len(), 3, "one replica per zone: {placed:?}");
        // A gang, by contrast, packs onto one node.
        let gang = place(&mut nodes, "public", &gpus(1), 3).unwrap();
        assert!(
            gang.iter().all(|a| a.node_id == gang[0].node_id),
            "{gang:?}"
        );
        // More replicas than nodes still place (spread is a preference).
        let many = p.place("public", &gpus(1), 9, true).unwrap();
        assert_eq!(many.len(), 9);
    }
}
