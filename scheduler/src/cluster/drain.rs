//! Draining a node for maintenance (`gpupool node drain`): the node is
//! cordoned, then every clock tick moves what runs there off it:
//!
//! - online services: the replicas there are replaced one at a time by the
//!   rolling restart's rule (the next only once every replica is ready
//!   again), so at least N-1 stay ready; the replacements go elsewhere (the
//!   node is cordoned);
//! - batch services: the replicas there are stopped and placed again;
//! - training jobs with retries (`max_retries > 0`): the run is stopped
//!   (the whole gang) and queued again once it has ended, without spending
//!   a retry or waiting for a backoff;
//! - notebooks, TensorBoards and training jobs without retries: left alone
//!   until the drain's `--force` or its deadline, then stopped
//!   ([`StopCause::Drained`]).
//!
//! A dedicated pool's jobs stay in their pool. The drain is over when no
//! instance is left on the node; the node stays cordoned until `uncordon`,
//! which ends the drain.

use super::{Cluster, ClusterError, Outbox, stop_instance};
use crate::domain::job::PendingRank;
use crate::domain::node::Drain;
use crate::domain::{InstanceState, JobKind, Node, StopCause};
use crate::store::Store;

impl Cluster {
    /// Starts (or changes) the drain of `node_id`.
    pub fn drain_node(
        &mut self,
        node_id: &str,
        deadline_ms: Option<i64>,
        force: bool,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Node, ClusterError> {
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| ClusterError::NodeNotFound {
                id: node_id.to_string(),
            })?;
        node.cordoned = true;
        node.drain = Some(Drain {
            started_at_ms: node.drain.as_ref().map_or(now_ms, |d| d.started_at_ms),
            deadline_ms,
            force,
        });
        let node = node.clone();
        self.store.put_node(&node, now_ms)?;
        self.placer = None;
        tracing::info!(node = %node_id, ?deadline_ms, force, "draining node");
        self.advance_drains(now_ms, out);
        self.advance_rollouts(now_ms, out);
        self.schedule(now_ms, out);
        Ok(self.nodes[node_id].clone())
    }

    /// Moves what runs on draining nodes off them (see the module docs).
    pub(super) fn advance_drains(&mut self, now_ms: i64, out: &mut Outbox) {
        let draining: Vec<(String, bool)> = self
            .nodes
            .values()
            .filter_map(|n| {
                let d = n.drain.as_ref()?;
                let stop_all = d.force || d.deadline_ms.is_some_and(|at| now_ms >= at);
                Some((n.node_id.clone(), stop_all))
            })
            .collect();
        for (node_id, stop_all) in draining {
            let jobs: Vec<String> = self
                .jobs
                .values()
                .filter(|j| !j.state.is_terminal() && j.stop_cause.is_none())
                .filter(|j| {
                    j.instances.iter().any(|i| {
                        i.node_id == node_id
                            && matches!(i.state, InstanceState::Scheduled | InstanceState::Running)
                    })
                })
                .map(|j| j.job_id.clone())
                .collect();
            for job_id in jobs {
                if self.drain_job(&job_id, &node_id, stop_all, now_ms, out) {
                    self.persist_job(&job_id, now_ms);
                }
            }
        }
    }

    /// Moves one job off `node_id`; true when it changed.
    fn drain_job(
        &mut self,
        job_id: &str,
        node_id: &str,
        stop_all: bool,
        now_ms: i64,
        out: &mut Outbox,
    ) -> bool {
        let grace_ms = self.settings.stop_grace_ms;
        let job = self.jobs.get_mut(job_id).expect("listed above");
        let retries = job.retries;
        let here = |i: &crate::domain::Instance| {
            i.node_id == node_id
                && i.attempt == retries
                && !i.replaced
                && matches!(i.state, InstanceState::Scheduled | InstanceState::Running)
        };
        match job.spec.kind {
            JobKind::OnlineService if !stop_all => {
                let ranks: Vec<u32> = job
                    .instances
                    .iter()
                    .filter(|i| here(i))
                    .map(|i| i.rank)
                    .collect();
                let before = job.rollout.len();
                for rank in ranks {
                    if !job.rollout.contains(&rank) {
                        job.rollout.push(rank);
                    }
                }
                job.rollout.len() != before
            }
            JobKind::OnlineService | JobKind::BatchService => {
                let mut changed = false;
                for inst in job.instances.iter_mut().filter(|i| here(i)) {
                    inst.replaced = true;
                    inst.ready = false;
                    inst.reason = format!("node {node_id} drained");
                    stop_instance(inst, grace_ms, &format!("node {node_id} drained"), out);
                    job.pending.push(PendingRank {
                        rank: inst.rank,
                        not_before_ms: 0,
                    });
                    job.rollout.retain(|r| *r != inst.rank);
                    changed = true;
                }
                changed
            }
            JobKind::Training if job.spec.max_retries > 0 && job.drained_from.is_none() => {
                job.drained_from = Some(node_id.to_string());
                job.drains += 1;
                let why = format!("node {node_id} drained: requeued");
                for inst in job
                    .instances
                    .iter_mut()
                    .filter(|i| i.attempt == retries && !i.state.is_terminal())
                {
                    inst.reason = why.clone();
                    stop_instance(inst, grace_ms, &why, out);
                }
                tracing::info!(job = %job_id, node = %node_id, "drain: stopping the run to requeue it");
                true
            }
            _ if stop_all && job.drained_from.is_none() => {
                let cause = StopCause::Drained {
                    node: node_id.to_string(),
                };
                tracing::info!(job = %job_id, node = %node_id, "drain: stopping the job");
                let reason = format!("node {node_id} drained");
                self.stop_job(job_id, cause, &reason, now_ms, out);
                true
            }
            _ => false,
        }
    }
}
