//! What strands each pool's free GPUs (`gpupool capacity`, the metric
//! `gpupool_gpus_stranded_milli`): the free capacity split by cause
//! ([`crate::domain::stranded`]) against the pool's queued jobs, or, with
//! none queued, the pool's typical request shapes (learned from its
//! submissions, `cluster::shapes`; the built-in ones before any, and in a
//! tenant's view of the public pool).

use std::collections::HashMap;

use super::Cluster;
use crate::domain::placement::{self, NodeCapacity};
use crate::domain::stranded::{self, Ask, ByCause, CAUSES, Cause};
use crate::domain::tenant::Caller;
use crate::domain::{JobState, PUBLIC_POOL};

/// Nodes a report names per pool (those that strand the most).
pub const NODES_SHOWN: usize = 20;

/// One pool's free GPU capacity by cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStranded {
    pub pool_id: String,
    /// What the causes were judged by: `queued` (the queued jobs: the
    /// caller's own, for a tenant) or `typical` (nothing queued: the
    /// pool's typical shapes).
    pub basis: &'static str,
    pub queued_jobs: usize,
    /// The pool's GPU capacity and what of it is free, in milli.
    pub gpus_milli: i64,
    pub free_milli: i64,
    pub by_cause: ByCause,
    /// The nodes whose free GPUs are stranded the most (not usable), most
    /// first, at most [`NODES_SHOWN`].
    pub nodes: Vec<(String, ByCause)>,
}

impl PoolStranded {
    /// Free GPU milli the requests cannot use (everything but `usable`).
    pub fn stranded_milli(by: &ByCause) -> i64 {
        by.iter().sum::<i64>() - by[Cause::Usable as usize]
    }
}

impl Cluster {
    /// The stranded capacity of the pools `caller` sees (a tenant: the
    /// public pool and its own), or of `pool` alone; a tenant's report
    /// judges by its own queued jobs and names only nodes it may see.
    pub fn stranded(&self, caller: &Caller, pool: Option<&str>) -> Vec<PoolStranded> {
        // The kept placer's nodes are the capacity, current (it is dropped
        // whenever capacity changes other than by its own placements):
        // no copy of every node under the cluster lock.
        let built;
        let capacity: &[NodeCapacity] = match &self.placer {
            Some(p) => p.nodes(),
            None => {
                built = self.capacity();
                &built
            }
        };
        let mut pools: Vec<&str> = std::iter::once(PUBLIC_POOL)
            .chain(
                self.pools
                    .values()
                    .filter(|p| p.status != crate::domain::pool::PoolStatus::Deleted)
                    .filter(|p| caller.admin || p.tenant == caller.tenant)
                    .map(|p| p.pool_id.as_str()),
            )
            .collect();
        pools.retain(|p| pool.is_none_or(|want| want == *p));
        // Each node and queued job looked at once, not once per pool.
        let mut nodes: HashMap<&str, Vec<&NodeCapacity>> = HashMap::new();
        for n in capacity {
            nodes.entry(n.pool.as_str()).or_default().push(n);
        }
        let mut queued: HashMap<&str, Vec<&crate::domain::Job>> = HashMap::new();
        for j in self.jobs.values().filter(|j| j.state == JobState::Queued) {
            if caller.admin || j.tenant == caller.tenant {
                queued.entry(j.pool_id.as_str()).or_default().push(j);
            }
        }
        pools
            .into_iter()
            .map(|p| {
                let n = nodes.get(p).map_or(&[][..], |n| n.as_slice());
                let q = queued.get(p).map_or(&[][..], |q| q.as_slice());
                self.pool_stranded(caller, p, n, q)
            })
            .collect()
    }

    fn pool_stranded(
        &self,
        caller: &Caller,
        pool: &str,
        capacity: &[&NodeCapacity],
        queued: &[&crate::domain::Job],
    ) -> PoolStranded {
        // Per ask, the models it accepts (empty: any).
        let mut asks: Vec<(Ask, Vec<String>)> = queued
            .iter()
            .filter_map(|j| {
                let r = &j.spec.resources;
                stranded::ask_of(r).map(|a| (a, r.gpu_models.clone()))
            })
            .collect();
        let basis = if asks.is_empty() {
            // A tenant's view of the shared pool is not judged by what
            // other tenants submitted there: the built-in shapes.
            let shapes = if caller.admin || pool != PUBLIC_POOL {
                self.typical_shapes(pool)
            } else {
                placement::default_shapes()
            };
            asks = shapes
                .into_iter()
                .filter(|s| s.num_gpu > 0)
                .map(|s| {
                    let ask = Ask {
                        num_gpu: s.num_gpu,
                        milli: s.milli,
                        cpu_milli: s.cpu_milli,
                        memory_mib: 0,
                    };
                    (ask, s.models)
                })
                .collect();
            "typical"
        } else {
            "queued"
        };
        asks.sort();
        asks.dedup();
        let only: Vec<Ask> = asks.iter().map(|a| a.0).collect();
        let mut report = PoolStranded {
            pool_id: pool.to_string(),
            basis,
            queued_jobs: queued.len(),
            gpus_milli: 0,
            free_milli: 0,
            by_cause: [0; CAUSES.len()],
            nodes: Vec::new(),
        };
        for n in capacity {
            report.gpus_milli += 1000 * n.gpus.len() as i64;
            let free: Vec<i64> = n.gpus.iter().map(|g| i64::from(g.free_milli)).collect();
            report.free_milli += free.iter().sum::<i64>();
            let mut split = [0; CAUSES.len()];
            // What cannot take work at all, then the rest by the rule.
            let (usable, unusable): (Vec<_>, Vec<_>) = n
                .gpus
                .iter()
                .zip(&free)
                .partition(|(g, _)| n.schedulable && g.healthy);
            split[Cause::Unschedulable as usize] = unusable.iter().map(|(_, f)| **f).sum();
            let usable_free: Vec<i64> = usable.iter().map(|(_, f)| **f).collect();
            let models: Vec<&str> = usable.iter().map(|(g, _)| g.model.as_str()).collect();
            let by = stranded::split_node(
                &usable_free,
                n.cpu_free_milli,
                n.memory_free_mib,
                &only,
                |g, a| placement::model_allowed(&asks[a].1, models[g]),
            );
            for (s, b) in split.iter_mut().zip(by) {
                *s += b;
            }
            for (t, s) in report.by_cause.iter_mut().zip(split) {
                *t += s;
            }
            let visible = self
                .nodes
                .get(&n.node_id)
                .is_some_and(|node| self.node_visible(caller, node));
            if visible && PoolStranded::stranded_milli(&split) > 0 {
                report.nodes.push((n.node_id.clone(), split));
            }
        }
        report.nodes.sort_by(|a, b| {
            PoolStranded::stranded_milli(&b.1)
                .cmp(&PoolStranded::stranded_milli(&a.1))
                .then_with(|| a.0.cmp(&b.0))
        });
        report.nodes.truncate(NODES_SHOWN);
        report
    }
}
