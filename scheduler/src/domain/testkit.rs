//! Test support for the placement and planner property tests: `proptest`
//! strategies for clusters and requests, and an oracle of how many
//! instances a node can host written from the definitions alone (not from
//! the placement code).

use proptest::prelude::*;

use super::job::Resources;
use super::placement::{GpuSlot, NodeCapacity};

pub const MODELS: [&str; 3] = ["H100", "A100", "T4"];

/// One GPU of a node whose usual model is `model`.
fn gpu(node: usize, i: u32, sparse: bool, model: &'static str) -> impl Strategy<Value = GpuSlot> {
    (
        prop::sample::select(&MODELS[..]),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.9),
        prop_oneof![5 => Just(1000u32), 2 => Just(0u32), 3 => 0u32..=1000],
    )
        .prop_map(move |(other, odd, healthy, free_milli)| GpuSlot {
            index: if sparse { 2 * i + 1 } else { i },
            uuid: format!("node{node}-GPU-{i}"),
            model: if odd { other } else { model }.into(),
            healthy,
            free_milli,
        })
}

/// Node `n` (`node{n}`, zone `AZ{n % 3}`), with some of it already taken.
pub fn node(n: usize) -> impl Strategy<Value = NodeCapacity> {
    (
        prop::sample::select(&MODELS[..]),
        prop::bool::weighted(0.2), // non-contiguous GPU indexes
        prop::sample::select(&[0u32, 1, 2, 4, 8, 8][..]),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.85),
        -1000i64..=64_000,
        -100i64..=256 * 1024,
    )
        .prop_flat_map(
            move |(model, sparse, count, public, schedulable, cpu, mem)| {
                let gpus: Vec<_> = (0..count).map(|i| gpu(n, i, sparse, model)).collect();
                gpus.prop_map(move |gpus| NodeCapacity {
                    node_id: format!("node{n}"),
                    pool: if public { "public" } else { "p1" }.into(),
                    az: format!("AZ{}", n % 3),
                    schedulable,
                    cpu_free_milli: cpu,
                    memory_free_mib: mem,
                    cpu_total_milli: 64_000,
                    memory_total_mib: 256 * 1024,
                    gpus,
                })
            },
        )
}

/// 1 to 7 nodes.
pub fn cluster() -> impl Strategy<Value = Vec<NodeCapacity>> {
    (1usize..=7).prop_flat_map(|count| (0..count).map(node).collect::<Vec<_>>())
}

/// Per-instance resources: whole GPUs, a share, or CPU only.
pub fn resources() -> impl Strategy<Value = Resources> {
    let gpu = prop_oneof![
        4 => prop::sample::select(&[1u32, 1, 1, 2, 4, 8, 16][..]).prop_map(|g| (g, 0u32)),
        3 => prop_oneof![
            prop::sample::select(&[100u32, 250, 333, 500][..]),
            1u32..=999
        ]
        .prop_map(|m| (0, m)),
        3 => Just((0, 0)),
    ];
    let models = prop_oneof![
        8 => Just(Vec::new()),
        2 => prop::sample::subsequence(&MODELS[..], 0..=3)
            .prop_map(|m| m.into_iter().map(String::from).collect()),
    ];
    (
        gpu,
        models,
        prop_oneof![1 => Just(0u64), 9 => 1u64..=16_000],
        prop_oneof![1 => Just(0u64), 9 => 1u64..=64 * 1024],
    )
        .prop_map(
            |((gpus, gpu_milli), gpu_models, cpu_milli, memory_mib)| Resources {
                gpus,
                gpu_milli,
                gpu_models,
                cpu_milli,
                memory_mib,
            },
        )
}

/// A placement request: pool (mostly public; some of another pool or of
/// none), resources, instances (mostly one).
pub fn request() -> impl Strategy<Value = (String, Resources, u32)> {
    (
        prop_oneof![18 => Just("public"), 1 => Just("p1"), 1 => Just("nowhere")],
        resources(),
        prop_oneof![7 => Just(1u32), 3 => 2u32..=6],
    )
        .prop_map(|(pool, r, n)| (pool.to_string(), r, n))
}

/// Independent of the placement code: how many instances of `req` the node
/// could host, from the definitions alone.
pub fn oracle_room(n: &NodeCapacity, pool: &str, req: &Resources) -> u64 {
    if n.pool != pool || !n.schedulable || n.cpu_free_milli < 0 || n.memory_free_mib < 0 {
        return 0;
    }
    let free: Vec<u32> = n.gpus.iter().map(|g| g.free_milli).collect();
    oracle_fit(n, &free, n.cpu_free_milli, n.memory_free_mib, req)
}

/// As [`oracle_room`], for the node with nothing on it (what backfill
/// reserves by).
pub fn oracle_idle_room(n: &NodeCapacity, pool: &str, req: &Resources) -> u64 {
    if n.pool != pool || !n.schedulable {
        return 0;
    }
    let free = vec![1000; n.gpus.len()];
    oracle_fit(n, &free, n.cpu_total_milli, n.memory_total_mib, req)
}

fn oracle_fit(n: &NodeCapacity, free: &[u32], cpu: i64, mem: i64, req: &Resources) -> u64 {
    let ok =
        |g: &GpuSlot| g.healthy && (req.gpu_models.is_empty() || req.gpu_models.contains(&g.model));
    let limit = |free: i64, need: u64| (free.max(0) as u64).checked_div(need).unwrap_or(u64::MAX);
    let usable = n.gpus.iter().zip(free).filter(|(g, _)| ok(g));
    let gpu = if req.gpus > 0 {
        usable.filter(|(_, f)| **f == 1000).count() as u64 / u64::from(req.gpus)
    } else if req.gpu_milli > 0 {
        usable.map(|(_, f)| u64::from(f / req.gpu_milli)).sum()
    } else {
        u64::MAX
    };
    gpu.min(limit(cpu, req.cpu_milli))
        .min(limit(mem, req.memory_mib))
}
