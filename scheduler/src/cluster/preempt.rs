//! Preemption, the cluster's side (the choice is the planner's, step 8 of
//! [`crate::domain::scheduling`]): which running jobs are candidates, and
//! stopping a victim so that it is queued again once its run has ended.

use std::collections::{BTreeSet, HashMap};

use super::{Cluster, Outbox, stop_instance};
use crate::domain::JobKind;
use crate::domain::job::PriorityClass;
use crate::domain::preemption::Candidate;
use crate::domain::scheduling::Preemption;

impl Cluster {
    /// The candidates: running training jobs below the high class, not
    /// being stopped, with what each instance holds; and the jobs whose
    /// victims are still stopping. Walks the jobs on nodes, not every job.
    pub(super) fn preemption(&self) -> Preemption<'_> {
        let on_nodes: BTreeSet<&String> = self.jobs_on_node.values().flatten().collect();
        let mut p = Preemption {
            candidates: Vec::new(),
            min_runtime_ms: self.settings.preemption_min_runtime_ms,
            stopping: HashMap::new(),
            reclaim: self.settings.fair_share_preemption,
        };
        for job in on_nodes.into_iter().filter_map(|id| self.jobs.get(id)) {
            if job.active_instances().next().is_none() {
                continue;
            }
            if let Some(by) = &job.preempted_by {
                *p.stopping.entry(by.as_str()).or_default() += 1;
                continue;
            }
            // Not one being stopped already (a drain, a failed rank).
            if job.spec.kind != JobKind::Training
                || job.spec.priority_class == PriorityClass::High
                || job.stop_cause.is_some()
                || job.drained_from.is_some()
                || job.state.is_terminal()
                || job
                    .active_instances()
                    .any(|i| i.state == crate::domain::InstanceState::Stopping)
            {
                continue;
            }
            p.candidates.push(Candidate {
                job_id: &job.job_id,
                tenant: &job.tenant,
                pool: &job.pool_id,
                class: job.spec.priority_class,
                started_ms: job.started_at_ms.unwrap_or(i64::MAX),
                resources: &job.spec.resources,
                instances: job
                    .active_instances()
                    .map(|i| (i.node_id.as_str(), &i.gpu_indexes[..]))
                    .collect(),
            });
        }
        p
    }

    /// Stops `job_id`'s run for `by`: every instance gets SIGTERM and the
    /// stop grace, and once the run has ended the job is queued again
    /// (`settle`), spending no retry.
    pub(super) fn preempt(&mut self, job_id: &str, by: &str, out: &mut Outbox) {
        let grace_ms = self.settings.stop_grace_ms;
        let (tenant, class) = self
            .jobs
            .get(by)
            .map(|j| (j.tenant.clone(), j.spec.priority_class.name()))
            .unwrap_or_default();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.preempted_by = Some(by.to_string());
        job.preemptions += 1;
        // Another tenant's job is not named to it.
        let (by_shown, why) = if job.tenant == tenant {
            let why = format!("preempted by {by} (class {class}): queued again once stopped");
            (by.to_string(), why)
        } else {
            let why = format!(
                "preempted by another tenant's {class}-class job: queued again once stopped"
            );
            ("(another tenant's job)".to_string(), why)
        };
        job.last_preempted_by = by_shown;
        let run = job.retries;
        for inst in job
            .instances
            .iter_mut()
            .filter(|i| i.attempt == run && !i.state.is_terminal())
        {
            inst.reason = why.clone();
            stop_instance(inst, grace_ms, &why, out);
        }
        job.reason = why;
        tracing::info!(job = %job_id, by = %by, "job preempted");
    }
}
