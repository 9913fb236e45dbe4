//! Benchmark 2: placement speed of the production placement
//! (`domain::placement::Placer`, as `Cluster::schedule` uses it: built over
//! the cluster once, then one request after another) on synthetic clusters,
//! next to a plain best-fit scan over the same data in the same run. The
//! timed span includes building the placer and its indexes.
//!
//! `gpupool-bench speed [--nodes 1000,10000,50000] [--jobs 2000] [--runs 3] [--seed S]`
//!
//! Cluster: N nodes x 8 GPUs of mixed models (H100, A100, L4), 64 cores,
//! 512 GiB, partly loaded (0..60 % of GPUs busy, some with a fractional
//! share). Stream: 70 % 1-GPU, 10 % fractions (0.25/0.5), 10 % 2- or 4-GPU,
//! 5 % 8-GPU, 5 % CPU-only; one instance each. Placements per second is the
//! median over runs of jobs / wall time (placed or refused alike).

use std::time::Instant;

use crate::rng::Rng;
use gpupool_scheduler::domain::Resources;
use gpupool_scheduler::domain::placement::{self, GpuSlot, NodeCapacity, Placer};

/// Options of `speed`.
#[derive(Debug, Clone, clap::Args)]
pub struct SpeedArgs {
    /// Cluster sizes (nodes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub nodes: Vec<usize>,
    /// Jobs placed per run.
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Runs per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

const MODELS: [&str; 3] = ["H100", "A100", "L4"];

fn cluster(n: usize, rng: &mut Rng) -> Vec<NodeCapacity> {
    (0..n)
        .map(|i| {
            let model = MODELS[rng.below(3)];
            let busy = rng.below(5); // 0..4 of 8 whole GPUs busy
            NodeCapacity {
                node_id: format!("n{i:06}"),
                pool: "public".into(),
                az: format!("AZ{}", i % 3 + 1),
                schedulable: true,
                cpu_free_milli: 64_000 - busy as i64 * 4_000,
                memory_free_mib: 512 * 1024 - busy as i64 * 32 * 1024,
                cpu_total_milli: 64_000,
                memory_total_mib: 512 * 1024,
                gpus: (0..8u32)
                    .map(|g| GpuSlot {
                        index: g,
                        uuid: format!("GPU-{i}-{g}"),
                        model: model.into(),
                        healthy: true,
                        free_milli: if (g as usize) < busy {
                            0
                        } else if g as usize == busy && rng.below(4) == 0 {
                            500
                        } else {
                            1000
                        },
                    })
                    .collect(),
            }
        })
        .collect()
}

fn job(rng: &mut Rng) -> Resources {
    let r = rng.below(100);
    let (gpus, gpu_milli) = match r {
        0..70 => (1, 0),
        70..75 => (0, 250),
        75..80 => (0, 500),
        80..85 => (2, 0),
        85..90 => (4, 0),
        90..95 => (8, 0),
        _ => (0, 0),
    };
    Resources {
        gpus,
        gpu_milli,
        gpu_models: Vec::new(),
        cpu_milli: 2_000,
        memory_mib: 8 * 1024,
    }
}

/// Best fit over the same data: the feasible node with the least free GPU
/// capacity left, first fitting GPUs inside it.
fn best_fit(nodes: &mut [NodeCapacity], req: &Resources) -> bool {
    let mut best: Option<(u32, usize)> = None;
    for (i, n) in nodes.iter().enumerate() {
        if n.cpu_free_milli < req.cpu_milli as i64 || n.memory_free_mib < req.memory_mib as i64 {
            continue;
        }
        let whole = n.gpus.iter().filter(|g| g.free_milli == 1000).count() as u32;
        let fits = if req.gpus > 0 {
            whole >= req.gpus
        } else if req.gpu_milli > 0 {
            n.gpus.iter().any(|g| g.free_milli >= req.gpu_milli)
        } else {
            true
        };
        if !fits {
            continue;
        }
        let free: u32 = n.gpus.iter().map(|g| g.free_milli).sum();
        if best.is_none_or(|(f, _)| free < f) {
            best = Some((free, i));
        }
    }
    let Some((_, i)) = best else { return false };
    let n = &mut nodes[i];
    n.cpu_free_milli -= req.cpu_milli as i64;
    n.memory_free_mib -= req.memory_mib as i64;
    if req.gpus > 0 {
        for g in n
            .gpus
            .iter_mut()
            .filter(|g| g.free_milli == 1000)
            .take(req.gpus as usize)
        {
            g.free_milli = 0;
        }
    } else if req.gpu_milli > 0
        && let Some(g) = n
            .gpus
            .iter_mut()
            .filter(|g| g.free_milli >= req.gpu_milli)
            .min_by_key(|g| g.free_milli)
    {
        g.free_milli -= req.gpu_milli;
    }
    true
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run_speed(args: &SpeedArgs) -> anyhow::Result<()> {
    println!(
        "placement speed, {} jobs per run, median of {} runs, one thread",
        args.jobs, args.runs
    );
    println!(
        "{:>8}  {:>16}  {:>16}  {:>8}",
        "nodes", "default/s", "best-fit/s", "placed"
    );
    for &n in &args.nodes {
        let (mut ours, mut base, mut placed) = (Vec::new(), Vec::new(), 0);
        for run in 0..args.runs {
            let mut rng = Rng::new(args.seed + run as u64);
            let nodes = cluster(n, &mut rng);
            let jobs: Vec<Resources> = (0..args.jobs).map(|_| job(&mut rng)).collect();
            let t = Instant::now();
            let mut placer = Placer::new(nodes.clone(), &placement::default_shapes(), args.seed);
            placed = jobs
                .iter()
                .filter(|j| placer.place("public", j, 1, false).is_ok())
                .count();
            ours.push(args.jobs as f64 / t.elapsed().as_secs_f64());
            let mut b = nodes;
            let t = Instant::now();
            let _ = jobs.iter().filter(|j| best_fit(&mut b, j)).count();
            base.push(args.jobs as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "{n:>8}  {:>16.0}  {:>16.0}  {placed:>8}",
            median(ours),
            median(base)
        );
    }
    Ok(())
}
