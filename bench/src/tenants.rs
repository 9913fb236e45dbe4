//! `tenants`: a multi-tenant replay of the public pool. The openb cluster
//! (1,213 nodes) is one public pool shared by 8 tenants; the trace's pods,
//! with the durations the trace gives them (`deletion_time −
//! creation_time`, capped), arrive over simulated hours at a pace that
//! keeps demand above capacity. One tenant (`t0`, weight 2) submits half of
//! everything in bursts; the other seven (weight 1) share the rest. Every
//! `tick_s` of simulated time the production planner runs a pass over the
//! queue (`scheduling::plan` for FIFO by priority, `plan_shared` for fair
//! share) on the production `Placer`; started jobs leave when their
//! duration has passed. Pure: no I/O, the same seed gives the same result.

use std::collections::{BTreeMap, HashMap};

use gpupool_scheduler::domain::job::{PriorityClass, Resources};
use gpupool_scheduler::domain::placement::{Assignment, GpuSlot, NodeCapacity, Placer, gpu_ask};
use gpupool_scheduler::domain::preemption::Candidate;
use gpupool_scheduler::domain::scheduling::{
    self, Decision, Preemption, Request, Shape, Share, TenantShare, dominant_share,
};
use gpupool_scheduler::domain::tenant::RecentShare;
use serde::Serialize;

use crate::replay::{NodeSpec, PodSpec};
use crate::rng::Rng;

/// Options of `tenants`.
#[derive(Debug, Clone, clap::Args)]
pub struct TenantsArgs {
    /// Cluster: node list CSV, e.g. openb_node_list_gpu_node.csv.
    #[arg(long)]
    pub nodes: std::path::PathBuf,
    /// Trace: pod list CSV with creation_time and deletion_time.
    #[arg(long)]
    pub pods: std::path::PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// `text` or `json` (one JSON object per policy, one per line).
    #[arg(long, value_enum, default_value = "text")]
    pub output: crate::OutputFormat,
    /// Simulated hours of arrivals.
    #[arg(long, default_value_t = 12.0)]
    pub hours: f64,
    /// Offered GPU load over capacity (1.3: 30 % more GPU-time arrives
    /// than the cluster has).
    #[arg(long, default_value_t = 1.3)]
    pub load: f64,
    /// Longest duration a pod keeps (seconds): the trace's tail runs for
    /// days.
    #[arg(long, default_value_t = 7200)]
    pub max_duration_s: i64,
    /// Simulated seconds between scheduling passes.
    #[arg(long, default_value_t = 30)]
    pub tick_s: i64,
    /// The fair share's half-life of recent use, seconds (the scheduler's
    /// `fair_share_half_life_secs`; 0: only what is held now counts).
    #[arg(long, default_value_t = 3600)]
    pub half_life_s: i64,
    /// A public-pool quota on the heavy tenant `t0` for the fair
    /// policies: at most this percentage of the pool's GPU capacity in use
    /// at once (`tenant quota t0 --public-max-gpus`); none by default.
    #[arg(long)]
    pub heavy_max_gpu_pct: Option<f64>,
}

/// The tenants: `t0` is the heavy one.
const TENANTS: usize = 8;
const WEIGHTS: [u32; TENANTS] = [2, 1, 1, 1, 1, 1, 1, 1];
/// Arrivals come in blocks of this many; every other block is all `t0`'s.
const BURST: usize = 40;

/// One policy's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TenantsResult {
    pub policy: &'static str,
    pub seed: u64,
    pub jobs: usize,
    /// The fair policies' half-life of recent use, seconds.
    pub half_life_s: i64,
    /// `t0`'s quota, % of the pool's GPUs (`--heavy-max-gpu-pct`; FIFO
    /// ignores it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heavy_max_gpu_pct: Option<f64>,
    /// Jain's index of the backlogged tenants' weighted dominant shares,
    /// averaged over the passes where demand exceeds supply (2+ tenants
    /// backlogged).
    pub fairness: f64,
    /// Mean GPU allocation (% of capacity) over the passes from the first
    /// one that leaves work waiting to the last arrival.
    pub alloc_pct: f64,
    /// The light tenants' (t1..t7) p99 wait, seconds; a job never started
    /// counts its wait until the end.
    pub light_p99_wait_s: f64,
    pub light_p50_wait_s: f64,
    pub heavy_p50_wait_s: f64,
    pub heavy_p99_wait_s: f64,
    /// FIFO's light-tenant p99 wait, beside the fair policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fifo_light_p99_wait_s: Option<f64>,
    /// GPU-hours of runs cut short by preemption, % of all GPU-hours
    /// allocated.
    pub preempted_gpu_hours_pct: f64,
    pub preemptions: u64,
    /// Per tenant: (p50, p99) wait in seconds.
    pub waits: BTreeMap<String, (f64, f64)>,
    /// Per tenant, over the passes the index counts: (the fraction of them
    /// in which it was backlogged, its mean weighted dominant share in
    /// those), what the index compares.
    pub backlogged_shares: BTreeMap<String, (f64, f64)>,
    pub sim_ms: f64,
}

/// A job of the simulation.
struct SimJob {
    id: String,
    tenant: usize,
    arrival_s: i64,
    duration_s: i64,
    resources: Resources,
    start_s: Option<i64>,
}

/// Builds the arrivals: the trace shuffled and cycled, paced so the
/// offered GPU load is `load` × capacity, assigned to tenants in bursts.
fn arrivals(
    pods: &[PodSpec],
    durations: &[i64],
    capacity_milli: u64,
    args: &TenantsArgs,
) -> Vec<SimJob> {
    let mut rng = Rng::new(args.seed);
    let horizon = (args.hours * 3600.0) as i64;
    let gpu_s = |i: usize| {
        let p = &pods[i];
        (p.num_gpu as f64 * p.gpu_milli as f64 / 1000.0).max(0.0)
            * durations[i].clamp(1, args.max_duration_s) as f64
    };
    let mean_gpu_s = (0..pods.len()).map(gpu_s).sum::<f64>() / pods.len() as f64;
    // GPU-seconds per second offered = load × GPUs.
    let per_s = args.load * capacity_milli as f64 / 1000.0 / mean_gpu_s;
    let mut order: Vec<usize> = Vec::new();
    let mut jobs = Vec::new();
    let mut t = 0.0;
    let mut light = 0;
    while (t as i64) < horizon {
        if order.is_empty() {
            order = rng.permutation(pods.len());
        }
        let i = order.pop().expect("refilled");
        let n = jobs.len();
        let tenant = if (n / BURST) % 2 == 0 {
            0
        } else {
            light = light % (TENANTS - 1) + 1;
            light
        };
        let p = &pods[i];
        let resources = Resources {
            gpus: if p.num_gpu > 1 || p.gpu_milli >= 1000 {
                p.num_gpu
            } else {
                0
            },
            gpu_milli: if p.num_gpu == 1 && p.gpu_milli < 1000 {
                p.gpu_milli as u32
            } else {
                0
            },
            gpu_models: p
                .gpu_spec
                .split('|')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            cpu_milli: p.cpu_milli.max(0) as u64,
            memory_mib: p.memory_mib.max(0) as u64,
        };
        jobs.push(SimJob {
            id: format!("j{n}"),
            tenant,
            arrival_s: t as i64,
            duration_s: durations[i].clamp(1, args.max_duration_s),
            resources,
            start_s: None,
        });
        // Exponential gaps (a Poisson stream).
        t += -(1.0 - rng.unit()).ln() / per_s;
    }
    jobs
}

fn cluster(nodes: &[NodeSpec]) -> Vec<NodeCapacity> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| NodeCapacity {
            node_id: format!("n{i}"),
            pool: "public".into(),
            schedulable: true,
            cpu_free_milli: n.cpu_milli,
            memory_free_mib: n.memory_mib,
            cpu_total_milli: n.cpu_milli,
            memory_total_mib: n.memory_mib,
            gpus: (0..n.gpus)
                .map(|g| GpuSlot {
                    index: g,
                    uuid: format!("n{i}-{g}"),
                    model: n.model.clone(),
                    healthy: true,
                    free_milli: 1000,
                })
                .collect(),
            az: String::new(),
        })
        .collect()
}

/// Takes (`sign` −1) or gives back (+1) what `a` holds of `res` on its
/// node, and adds it to (−1) or takes it from (+1) its tenant's `used`.
fn apply(
    nodes: &mut [NodeCapacity],
    index: &HashMap<String, usize>,
    used: &mut [u64; 3],
    res: &Resources,
    a: &Assignment,
    sign: i64,
) {
    let n = &mut nodes[index[&a.node_id]];
    n.cpu_free_milli += sign * res.cpu_milli as i64;
    n.memory_free_mib += sign * res.memory_mib as i64;
    let per = gpu_ask(res).1;
    for idx in &a.gpu_indexes {
        let g = n
            .gpus
            .iter_mut()
            .find(|g| g.index == *idx)
            .expect("known GPU");
        g.free_milli = (i64::from(g.free_milli) + sign * per) as u32;
    }
    for (u, h) in used.iter_mut().zip(res.held()) {
        *u = if sign < 0 { *u + h } else { *u - h };
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Jain's index of `x`: 1 when all equal, 1/n when one holds everything.
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    if sq == 0.0 {
        return 1.0;
    }
    sum * sum / (x.len() as f64 * sq)
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Priority, then submission order.
    Fifo,
    /// Weighted dominant share first.
    Fair,
    /// Fair share, and `t0`'s jobs are preemptible: the others' may
    /// preempt them (after the minimum run time); a victim restarts from
    /// the beginning.
    FairPreempt,
    /// Fair share with fair-share preemption (`fair_share_preemption`):
    /// every job normal; a tenant under its share preempts another's
    /// while that one keeps at least its share.
    FairReclaim,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Fair => "fair-share",
            Policy::FairPreempt => "fair-share+preemption",
            Policy::FairReclaim => "fair-share+reclaim",
        }
    }
}

/// The minimum run time before a job may be preempted (the scheduler's
/// default).
const MIN_RUNTIME_S: i64 = 120;

/// Simulates one policy.
pub fn simulate(
    nodes: &[NodeSpec],
    pods: &[PodSpec],
    durations: &[i64],
    args: &TenantsArgs,
    policy: Policy,
) -> TenantsResult {
    let fair = policy != Policy::Fifo;
    let started = std::time::Instant::now();
    let mut caps = cluster(nodes);
    let index: HashMap<String, usize> = caps
        .iter()
        .enumerate()
        .map(|(i, n)| (n.node_id.clone(), i))
        .collect();
    let capacity = [
        caps.iter().map(|n| n.gpus.len() as u64 * 1000).sum::<u64>(),
        caps.iter().map(|n| n.cpu_total_milli as u64).sum::<u64>(),
        caps.iter().map(|n| n.memory_total_mib as u64).sum::<u64>(),
    ];
    let mut jobs = arrivals(pods, durations, capacity[0], args);
    let tenant_names: Vec<String> = (0..TENANTS).map(|t| format!("t{t}")).collect();
    let shapes = gpupool_scheduler::domain::placement::default_shapes();
    let order: Vec<usize> = Rng::new(args.seed ^ 0x5eed).permutation(caps.len());
    let mut placer: Option<Placer> = None;
    let mut used = vec![[0u64; 3]; TENANTS];
    let mut recent = [RecentShare::default(); TENANTS];
    let mut queue: Vec<usize> = Vec::new();
    let mut running: Vec<(i64, usize, Assignment)> = Vec::new();
    let (mut next, horizon) = (0, (args.hours * 3600.0) as i64);
    let (mut fairness, mut fair_n, mut alloc, mut alloc_n) = (0.0, 0usize, 0.0, 0usize);
    let mut contended = false;
    let heavy_max = args
        .heavy_max_gpu_pct
        .map(|pct| (pct / 100.0 * capacity[0] as f64) as u64);
    // Per tenant: passes counted while backlogged, and the sum of its
    // weighted shares in them.
    let mut backlog = [(0usize, 0f64); TENANTS];
    let (mut lost_milli_s, mut held_milli_s, mut preemptions) = (0f64, 0f64, 0u64);
    let class_of = |tenant: usize| {
        if policy == Policy::FairPreempt && tenant == 0 {
            PriorityClass::Preemptible
        } else {
            PriorityClass::Normal
        }
    };
    let mut now = 0;
    while now <= horizon {
        // Ends, then arrivals, up to now.
        let before = running.len();
        running.retain(|(end, j, a)| {
            if *end > now {
                return true;
            }
            let res = &jobs[*j].resources;
            held_milli_s += f64::from(res.gpu_demand_milli()) * jobs[*j].duration_s as f64;
            apply(&mut caps, &index, &mut used[jobs[*j].tenant], res, a, 1);
            false
        });
        if running.len() != before {
            placer = None;
        }
        while next < jobs.len() && jobs[next].arrival_s <= now {
            queue.push(next);
            next += 1;
        }
        // What the scheduler's tick does (the clock starts at 1 ms: 0 is
        // "never sampled").
        for (r, u) in recent.iter_mut().zip(&used) {
            let held = (dominant_share(u, &capacity, 1) * 1e9).round() as u64;
            *r = r.advance(now * 1000 + 1, held, args.half_life_s * 1000);
        }
        let mut p = placer
            .take()
            .unwrap_or_else(|| Placer::with_order(caps.clone(), &shapes, &order));
        let reqs: Vec<Request> = queue
            .iter()
            .map(|&j| Request {
                job_id: &jobs[j].id,
                tenant: &tenant_names[jobs[j].tenant],
                class: class_of(jobs[j].tenant),
                priority: 0,
                seq: j as u64,
                pool: "public",
                resources: &jobs[j].resources,
                shape: Shape::Gang {
                    instances: 1,
                    not_before_ms: 0,
                },
            })
            .collect();
        let decisions = if fair {
            let mut share = Share {
                pool: "public",
                capacity,
                tenants: (0..TENANTS)
                    .map(|t| {
                        (
                            tenant_names[t].clone(),
                            TenantShare {
                                used: used[t],
                                weight: WEIGHTS[t],
                                max_gpu_milli: heavy_max.filter(|_| t == 0),
                                recent_ppb: recent[t].avg_ppb,
                            },
                        )
                    })
                    .collect(),
            };
            let preempt =
                matches!(policy, Policy::FairPreempt | Policy::FairReclaim).then(|| Preemption {
                    candidates: running
                        .iter()
                        .map(|(_, j, a)| Candidate {
                            job_id: &jobs[*j].id,
                            tenant: &tenant_names[jobs[*j].tenant],
                            pool: "public",
                            class: class_of(jobs[*j].tenant),
                            started_ms: jobs[*j].start_s.unwrap_or(now) * 1000,
                            resources: &jobs[*j].resources,
                            instances: vec![(a.node_id.as_str(), &a.gpu_indexes[..])],
                        })
                        .collect(),
                    min_runtime_ms: MIN_RUNTIME_S * 1000,
                    stopping: HashMap::new(),
                    reclaim: policy == Policy::FairReclaim,
                });
            scheduling::plan_shared(
                &reqs,
                &mut p,
                now * 1000,
                Some(&mut share),
                preempt.as_ref(),
            )
        } else {
            scheduling::plan(&reqs, &mut p, now * 1000)
        };
        drop(reqs);
        let mut placed = Vec::new();
        let mut victims = Vec::new();
        for d in decisions {
            if let Decision::Preempt { job_id, .. } = &d {
                victims.push(job_id[1..].parse::<usize>().expect("j<n>"));
            }
            if let Decision::Place {
                job_id, assignment, ..
            } = d
            {
                let j: usize = job_id[1..].parse().expect("j<n>");
                placed.push(j);
                let tenant = jobs[j].tenant;
                apply(
                    &mut caps,
                    &index,
                    &mut used[tenant],
                    &jobs[j].resources,
                    &assignment,
                    -1,
                );
                jobs[j].start_s = Some(now);
                running.push((now + jobs[j].duration_s, j, assignment));
            }
        }
        placer = Some(p);
        // Victims stop at once (the pass after next places their
        // preemptors) and wait again from the start.
        for v in victims {
            let Some(at) = running.iter().position(|(_, j, _)| *j == v) else {
                continue;
            };
            let (_, j, a) = running.remove(at);
            let res = &jobs[j].resources;
            apply(&mut caps, &index, &mut used[jobs[j].tenant], res, &a, 1);
            let ran_milli_s = f64::from(res.gpu_demand_milli())
                * (now - jobs[j].start_s.expect("running")) as f64;
            jobs[j].start_s = None;
            lost_milli_s += ran_milli_s;
            held_milli_s += ran_milli_s;
            preemptions += 1;
            queue.push(j);
            placer = None;
        }
        queue.retain(|j| jobs[*j].start_s.is_none());
        // Figures of this pass.
        contended |= !queue.is_empty();
        if contended && next < jobs.len() {
            let held: u64 = used.iter().map(|u| u[0]).sum();
            alloc += held as f64 / capacity[0] as f64;
            alloc_n += 1;
            let mut backlogged = [false; TENANTS];
            for &j in &queue {
                backlogged[jobs[j].tenant] = true;
            }
            let x: Vec<(usize, f64)> = (0..TENANTS)
                .filter(|&t| backlogged[t])
                .map(|t| (t, dominant_share(&used[t], &capacity, WEIGHTS[t])))
                .collect();
            if x.len() >= 2 {
                fairness += jain(&x.iter().map(|(_, v)| *v).collect::<Vec<_>>());
                fair_n += 1;
                for (t, v) in x {
                    backlog[t].0 += 1;
                    backlog[t].1 += v;
                }
            }
        }
        now += args.tick_s;
    }
    let end = now;
    let mut waits: Vec<Vec<f64>> = vec![Vec::new(); TENANTS];
    for j in &jobs {
        let w = j.start_s.unwrap_or(end) - j.arrival_s;
        waits[j.tenant].push(w as f64);
    }
    for w in &mut waits {
        w.sort_by(f64::total_cmp);
    }
    let mut light: Vec<f64> = waits[1..].iter().flatten().copied().collect();
    light.sort_by(f64::total_cmp);
    TenantsResult {
        policy: policy.name(),
        seed: args.seed,
        jobs: jobs.len(),
        half_life_s: args.half_life_s,
        heavy_max_gpu_pct: args.heavy_max_gpu_pct.filter(|_| fair),
        fairness: if fair_n == 0 {
            1.0
        } else {
            fairness / fair_n as f64
        },
        alloc_pct: if alloc_n == 0 {
            0.0
        } else {
            100.0 * alloc / alloc_n as f64
        },
        light_p99_wait_s: percentile(&light, 0.99),
        light_p50_wait_s: percentile(&light, 0.5),
        heavy_p50_wait_s: percentile(&waits[0], 0.5),
        heavy_p99_wait_s: percentile(&waits[0], 0.99),
        fifo_light_p99_wait_s: None,
        preempted_gpu_hours_pct: if held_milli_s > 0.0 {
            100.0 * lost_milli_s / held_milli_s
        } else {
            0.0
        },
        preemptions,
        waits: (0..TENANTS)
            .map(|t| {
                (
                    tenant_names[t].clone(),
                    (percentile(&waits[t], 0.5), percentile(&waits[t], 0.99)),
                )
            })
            .collect(),
        backlogged_shares: (0..TENANTS)
            .map(|t| {
                let (n, sum) = backlog[t];
                let mean = if n == 0 { 0.0 } else { sum / n as f64 };
                (
                    tenant_names[t].clone(),
                    (n as f64 / fair_n.max(1) as f64, mean),
                )
            })
            .collect(),
        sim_ms: started.elapsed().as_secs_f64() * 1000.0,
    }
}

/// `tenants`: reads the files, simulates FIFO and fair share, prints.
pub fn run_tenants(args: &TenantsArgs) -> anyhow::Result<()> {
    let nodes = crate::data::read_nodes(&args.nodes)?;
    let pods = crate::data::read_pods(&args.pods)?;
    let durations = crate::data::read_pod_durations(&args.pods)?;
    anyhow::ensure!(!pods.is_empty(), "the pod list is empty");
    anyhow::ensure!(
        args.tick_s > 0 && args.hours > 0.0 && args.load > 0.0 && args.half_life_s >= 0,
        "--tick-s, --hours and --load must be positive, --half-life-s not negative"
    );
    if let Some(pct) = args.heavy_max_gpu_pct {
        anyhow::ensure!(
            pct > 0.0 && pct <= 100.0,
            "--heavy-max-gpu-pct must be in (0, 100], got {pct}"
        );
    }
    let fifo = simulate(&nodes, &pods, &durations, args, Policy::Fifo);
    let mut fair = simulate(&nodes, &pods, &durations, args, Policy::Fair);
    let mut preempt = simulate(&nodes, &pods, &durations, args, Policy::FairPreempt);
    let mut reclaim = simulate(&nodes, &pods, &durations, args, Policy::FairReclaim);
    for r in [&mut fair, &mut preempt, &mut reclaim] {
        r.fifo_light_p99_wait_s = Some(fifo.light_p99_wait_s);
    }
    for r in [&fifo, &fair, &preempt, &reclaim] {
        match args.output {
            crate::OutputFormat::Json => println!("{}", serde_json::to_string(r)?),
            crate::OutputFormat::Text => println!(
                "{:<22} jobs {} fairness {:.3} alloc {:.2}% light wait p50/p99 {:.0}/{:.0} s, t0 (heavy) {:.0}/{:.0} s, preempted {} ({:.2}% of GPU-hours), {:.0} ms",
                r.policy,
                r.jobs,
                r.fairness,
                r.alloc_pct,
                r.light_p50_wait_s,
                r.light_p99_wait_s,
                r.heavy_p50_wait_s,
                r.heavy_p99_wait_s,
                r.preemptions,
                r.preempted_gpu_hours_pct,
                r.sim_ms
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_when_equal_and_one_over_n_when_one_holds_all() {
        assert_eq!(jain(&[0.2, 0.2, 0.2]), 1.0);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    }

    /// A small cluster, a flood from t0: fair share gives the light
    /// tenants shorter waits and a fairer split than FIFO.
    #[test]
    fn fair_share_beats_fifo_for_the_light_tenants() {
        let nodes: Vec<NodeSpec> = (0..4)
            .map(|i| NodeSpec {
                name: format!("n{i}"),
                cpu_milli: 64_000,
                memory_mib: 256 * 1024,
                gpus: 8,
                model: "V100M16".into(),
            })
            .collect();
        let pods: Vec<PodSpec> = (0..50)
            .map(|i| PodSpec {
                name: format!("p{i}"),
                cpu_milli: 4000,
                memory_mib: 8192,
                num_gpu: 1 + (i % 2) as u32,
                gpu_milli: 1000,
                gpu_spec: String::new(),
            })
            .collect();
        let durations: Vec<i64> = (0..50).map(|i| 300 + 60 * (i % 7)).collect();
        let args = TenantsArgs {
            nodes: "n".into(),
            pods: "p".into(),
            seed: 3,
            output: crate::OutputFormat::Json,
            hours: 3.0,
            load: 1.5,
            max_duration_s: 7200,
            tick_s: 30,
            half_life_s: 3600,
            heavy_max_gpu_pct: None,
        };
        let fifo = simulate(&nodes, &pods, &durations, &args, Policy::Fifo);
        let fair = simulate(&nodes, &pods, &durations, &args, Policy::Fair);
        let preempt = simulate(&nodes, &pods, &durations, &args, Policy::FairPreempt);
        assert!(preempt.preemptions > 0, "{preempt:?}");
        assert!(
            preempt.light_p99_wait_s <= fair.light_p99_wait_s,
            "{preempt:?}\n{fair:?}"
        );
        assert_eq!(fifo.jobs, fair.jobs, "the same arrivals");
        assert!(fair.fairness > fifo.fairness, "{fair:?}\n{fifo:?}");
        assert!(
            fair.light_p99_wait_s < fifo.light_p99_wait_s,
            "{fair:?}\n{fifo:?}"
        );
        assert_eq!(
            simulate(&nodes, &pods, &durations, &args, Policy::Fair).fairness,
            fair.fairness,
            "deterministic"
        );
        // A quota on t0 holds its share below what fair share alone lets
        // it take; FIFO does not use it.
        let capped_args = TenantsArgs {
            heavy_max_gpu_pct: Some(15.0),
            ..args.clone()
        };
        let capped = simulate(&nodes, &pods, &durations, &capped_args, Policy::Fair);
        let t0 = |r: &TenantsResult| r.backlogged_shares["t0"].1;
        assert!(t0(&capped) < t0(&fair), "{capped:?}\n{fair:?}");
        assert_eq!(capped.heavy_max_gpu_pct, Some(15.0));
        let fifo_capped = simulate(&nodes, &pods, &durations, &capped_args, Policy::Fifo);
        assert_eq!(fifo_capped.heavy_max_gpu_pct, None);
        assert_eq!(
            fifo_capped.fairness, fifo.fairness,
            "FIFO ignores the quota"
        );
    }
}
