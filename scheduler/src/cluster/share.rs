//! The public pool's fair share: what each tenant's jobs hold there now,
//! its weight and its limit, for the planner (step 7 of
//! [`crate::domain::scheduling`]) and for `gpupool tenant list`.

use std::collections::HashMap;

use super::Cluster;
use crate::domain::PUBLIC_POOL;
use crate::domain::scheduling::{self, Share, TenantShare};
use crate::store::{Record, Store as _};

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
                    recent_ppb: t.recent.avg_ppb,
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

    /// How often the recent shares are written (a crash loses at most
    /// this much of their history).
    const RECENT_WRITE_MS: i64 = 60_000;

    /// Folds the time since the last tick into each tenant's recent share
    /// of the public pool (its dominant share now, not over its weight);
    /// writes them once a minute.
    pub(super) fn advance_recent_shares(&mut self, now_ms: i64) {
        let half_life = self.settings.fair_share_half_life_ms;
        if half_life <= 0 && self.tenants.values().all(|t| t.recent.is_empty()) {
            return;
        }
        let share = self.public_share();
        // Tenants whose history just ran out are written at once (the
        // minute's write covers those with one).
        let mut emptied = Vec::new();
        for t in self.tenants.values_mut() {
            let now = share.tenants.get(&t.name).map_or(0, |s| {
                // At most the whole pool: jobs on nodes that went NotReady
                // or were cordoned still count, their capacity does not.
                let held = scheduling::dominant_share(&s.used, &share.capacity, 1).min(1.0);
                (held * 1e9).round() as u64
            });
            let was = t.recent;
            t.recent = t.recent.advance(now_ms, now, half_life);
            if !was.is_empty() && t.recent.is_empty() {
                emptied.push(t.name.clone());
            }
        }
        // A clock that went back writes at once, not once it has caught up.
        let due = !(0..Self::RECENT_WRITE_MS).contains(&(now_ms - self.recent_written_ms));
        let tenants: Vec<Record<'_>> = self
            .tenants
            .values()
            .filter(|t| emptied.contains(&t.name) || (due && !t.recent.is_empty()))
            .map(Record::Tenant)
            .collect();
        if tenants.is_empty() && !due {
            return;
        }
        match self.store.write(&tenants, now_ms) {
            Ok(()) if due => self.recent_written_ms = now_ms,
            Ok(()) => {}
            Err(err) => {
                tracing::warn!(error = %crate::ErrorChain(&err), "cannot write the tenants' recent shares; will retry");
            }
        }
    }
}
