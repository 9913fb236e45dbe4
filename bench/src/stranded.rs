//! Why unallocated GPU capacity stays unallocated: at one moment of a
//! replay, every free GPU share is put under the first of these causes,
//! judged against the GPU requests that failed so far (each one's shape
//! once), by the rule production uses (`domain::stranded`):
//!
//! 1. `no_failed_request`: no GPU request has failed yet;
//! 2. `shares_below_smallest_failed`: the GPU's free share is smaller than
//!    every failed request's share;
//! 3. `model`: requests whose share fits are all for other GPU models;
//! 4. `too_few_gpus_per_node`: those that fit by share and model want more
//!    such GPUs than the node has free;
//! 5. `cpu_exhausted`: one of the requests that fit by GPU (share, model,
//!    GPU count) is short of the node's free CPU;
//! 6. `memory_exhausted`: otherwise, of its free memory.
//!
//! A replay only ever takes capacity, so a failed request cannot fit a
//! node later: the six causes cover every free share (`fits_a_failed` is
//! kept as a check and is always 0). Percentages are of the cluster's GPU
//! capacity.

use crate::replay::{NodeState, Req};

/// The unallocated GPU capacity by cause, in % of capacity (two decimals).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stranded {
    /// GPU demand that had arrived, in % of capacity (the moment).
    pub arrived_pct: f64,
    pub allocated_pct: f64,
    pub unallocated_pct: f64,
    pub cpu_exhausted_pct: f64,
    pub memory_exhausted_pct: f64,
    pub shares_below_smallest_failed_pct: f64,
    pub too_few_gpus_per_node_pct: f64,
    pub model_pct: f64,
    pub no_failed_request_pct: f64,
    /// Always 0 (see the module's notes): a free share some failed
    /// request could take.
    pub fits_a_failed_pct: f64,
    /// Distinct shapes among the failed GPU requests.
    pub failed_shapes: usize,
}

/// Splits the free GPU capacity of `nodes` by cause, against `failed` (the
/// GPU requests that failed so far, repeats allowed), by the production
/// rule ([`gpupool_scheduler::domain::stranded::split_node`]).
pub fn stranded(nodes: &[NodeState], failed: &[Req], capacity: i64, arrived: i64) -> Stranded {
    use gpupool_scheduler::domain::stranded::{Ask, CAUSES, Cause, split_node};
    let mut shapes: Vec<(Ask, u64)> = failed
        .iter()
        .filter(|r| r.num_gpu > 0)
        .map(|r| {
            let ask = Ask {
                num_gpu: r.num_gpu,
                milli: r.milli,
                cpu_milli: r.cpu,
                memory_mib: r.mem,
            };
            (ask, r.spec)
        })
        .collect();
    shapes.sort_unstable();
    shapes.dedup();
    let asks: Vec<Ask> = shapes.iter().map(|s| s.0).collect();
    let mut milli = [0i64; CAUSES.len()];
    for node in nodes.iter().filter(|n| n.free_total > 0) {
        let split = split_node(&node.free, node.cpu, node.mem, &asks, |_, a| {
            node.model_ok(shapes[a].1)
        });
        for (m, s) in milli.iter_mut().zip(split) {
            *m += s;
        }
    }
    let pct = |m: i64| crate::replay::round2(m as f64 / capacity as f64 * 100.0);
    let free: i64 = milli.iter().sum();
    Stranded {
        arrived_pct: pct(arrived),
        allocated_pct: pct(capacity - free),
        unallocated_pct: pct(free),
        cpu_exhausted_pct: pct(milli[Cause::Cpu as usize]),
        memory_exhausted_pct: pct(milli[Cause::Memory as usize]),
        shares_below_smallest_failed_pct: pct(milli[Cause::SmallShares as usize]),
        too_few_gpus_per_node_pct: pct(milli[Cause::TooFewGpus as usize]),
        model_pct: pct(milli[Cause::Model as usize]),
        no_failed_request_pct: pct(milli[Cause::NoRequest as usize]),
        fits_a_failed_pct: pct(milli[Cause::Usable as usize]),
        failed_shapes: shapes.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu: i64, mem: i64, num_gpu: u32, milli: i64, spec: u64) -> Req {
        Req {
            cpu,
            mem,
            num_gpu,
            milli,
            spec,
            shape: 0,
        }
    }

    #[test]
    fn each_free_share_gets_its_cause() {
        // Four 2-GPU nodes of model 0b01, 1000 milli each GPU: 8000 in all.
        let mut nodes: Vec<NodeState> = (0..4)
            .map(|_| NodeState::new(4000, 4096, 0b01, 2))
            .collect();
        // n0: CPU gone, one whole GPU free.
        nodes[0].apply(&req(4000, 0, 1, 1000, 0), &[0]);
        // n1: memory gone, one whole GPU free.
        nodes[1].apply(&req(0, 4096, 1, 1000, 0), &[0]);
        // n2: 100 milli left on each GPU.
        nodes[2].apply(&req(0, 0, 2, 900, 0), &[0, 1]);
        // n3: one whole GPU free, CPU and memory left.
        nodes[3].apply(&req(0, 0, 1, 1000, 0), &[0]);
        let failed = [
            req(1000, 1024, 1, 500, 0),  // n0: CPU; n1: memory; n3: would fit
            req(1000, 1024, 2, 1000, 0), // needs two whole GPUs
        ];
        let s = stranded(&nodes, &failed[1..], 8000, 9000);
        // Only the 2-GPU request failed: n0, n1, n3 have one whole GPU each
        // (too few); n2's shares are smaller than 1000.
        assert_eq!(s.too_few_gpus_per_node_pct, 37.5);
        assert_eq!(s.shares_below_smallest_failed_pct, 2.5);
        assert_eq!(s.unallocated_pct, 40.0);
        assert_eq!(s.allocated_pct, 60.0);
        let s = stranded(&nodes[..3], &failed, 6000, 9000);
        assert_eq!(s.cpu_exhausted_pct, 16.67);
        assert_eq!(s.memory_exhausted_pct, 16.67);
        assert_eq!(s.shares_below_smallest_failed_pct, 3.33);
        assert_eq!(s.fits_a_failed_pct, 0.0);
        // A request of another model: the model is the cause.
        let s = stranded(&nodes[3..], &[req(0, 0, 1, 500, 0b10)], 2000, 2000);
        assert_eq!(s.model_pct, 50.0);
        let s = stranded(&nodes[3..], &[], 2000, 2000);
        assert_eq!(s.no_failed_request_pct, 50.0);
    }
}
