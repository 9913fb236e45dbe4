//! The public pool's fair share: what each tenant's jobs hold there now,
//! its weight and its limit, for the planner (step 7 of
//! [`crate::domain::scheduling`]) and for `gpupool tenant list`.

use std::collections::HashMap;

use super::Cluster;
use crate::domain::PUBLIC_POOL;
use crate::domain::scheduling::{Share, TenantShare};

impl Cluster {
    /// The public pool's capacity (its schedulable nodes) and every
    /// tenant's use, weight and limit there. Walks the pool's nodes and
    /// each job on them once, not every job kept.
    pub fn public_share(&self) -> Share<'static> {
        let mut share = Share {
            pool: PUBLIC_POOL,
            capacity: [0; 3],
            tenants: HashMap::new(),
        };
        for t in self.tenants.values() {
            share.tenants.insert(
                t.name.clone(),
                TenantShare {
                    used: [0; 3],
                    weight: t.quota.public_weight.max(1),
                    max_gpu_milli: t.quota.public_max_gpus.map(|g| u64::from(g) * 1000),
                },
            );
        }
        let mut jobs = std::collections::HashSet::new();
        for node in self.nodes.values().filter(|n| n.pool == PUBLIC_POOL) {
            if node.status == crate::domain::node::NodeStatus::Ready && !node.cordoned {
                let healthy = node.inventory.gpus.iter().filter(|g| g.healthy).count();
                share.capacity[0] += healthy as u64 * 1000;
                share.capacity[1] += u64::from(node.inventory.cpu_cores) * 1000;
                share.capacity[2] += node.inventory.memory_mib;
            }
            if let Some(on) = self.jobs_on_node.get(&node.node_id) {
                jobs.extend(on.iter().map(String::as_str));
            }
        }
        // Each job once (a service's replicas span many nodes).
        for job in jobs.into_iter().filter_map(|id| self.jobs.get(id)) {
            if job.pool_id != PUBLIC_POOL {
                continue;
            }
            let held = job.active_instances().count() as u32;
            if held > 0 {
                let t = share.tenants.entry(job.tenant.clone()).or_default();
                t.hold(&job.spec.resources, held);
            }
        }
        share
    }
}
