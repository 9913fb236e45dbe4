//! What makes each job kind behave like its name, on top of the generic
//! job lifecycle: replicas of online services (restart with backoff,
//! scale, rolling restart) and batch services (parallel instances until
//! the completions succeed), maximum run times, and idle culling of
//! notebooks and TensorBoards.

use super::{Cluster, ClusterError, Outbox, stop_instance};
use crate::domain::job::{KindTable, PendingRank};
use crate::domain::tenant::Caller;
use crate::domain::{InstanceState, JobKind, JobState, StopCause};
use crate::store::Store as _;

/// First restart of a crashed replica waits this long; each quick crash
/// after it doubles the wait, up to [`MAX_BACKOFF_MS`].
pub const BASE_BACKOFF_MS: i64 = 1_000;
pub const MAX_BACKOFF_MS: i64 = 60_000;
/// A replica that ran this long before ending starts its backoff afresh.
pub const STABLE_RUN_MS: i64 = 30_000;
/// Most replicas a service may be scaled to.
pub const MAX_REPLICAS: u32 = 10_000;

/// Restart delay of a replica whose instances of this rank ended after
/// running `runs` milliseconds each (latest last; None = never started).
pub fn backoff_ms(runs: &[Option<i64>]) -> i64 {
    let quick = runs
        .iter()
        .rev()
        .take_while(|ran| ran.is_none_or(|ms| ms < STABLE_RUN_MS))
        .count()
        .max(1);
    let doublings = (quick - 1).min(16) as u32;
    (BASE_BACKOFF_MS << doublings).min(MAX_BACKOFF_MS)
}

impl Cluster {
    /// The operator's kind settings (`gpupool job kinds`).
    pub fn kinds(&self) -> &KindTable {
        &self.settings.kinds
    }

    /// Replica kinds: after an instance of `job_id` changed. An ended
    /// service replica is replaced after its backoff (a lost node's at
    /// once); a batch completion that failed is retried while
    /// `max_retries` allows, one that succeeded makes room for the next
    /// completion index.
    pub(super) fn settle_replicas(&mut self, job_id: &str, now_ms: i64, out: &mut Outbox) {
        let grace_ms = self.settings.stop_grace_ms;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.stop_cause.is_some() || job.gave_up.is_some() {
            return;
        }
        let kind = job.spec.kind;
        let ended: Vec<(usize, u32, InstanceState, String)> = job
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.attempt == job.retries && !i.replaced && i.state.is_terminal())
            .filter(|(_, i)| {
                !(kind == JobKind::BatchService && i.state == InstanceState::Succeeded)
            })
            .map(|(pos, i)| (pos, i.rank, i.state, i.reason.clone()))
            .collect();
        for (pos, rank, state, reason) in ended {
            if kind == JobKind::BatchService && job.failures >= job.spec.max_retries {
                job.gave_up = Some(format!(
                    "instance {rank} {}: {reason} (all {} retries used)",
                    format!("{state:?}").to_lowercase(),
                    job.spec.max_retries
                ));
                job.pending.clear();
                for other in job.instances.iter_mut().filter(|i| {
                    matches!(i.state, InstanceState::Running | InstanceState::Scheduled)
                }) {
                    stop_instance(other, grace_ms, "batch job failed", out);
                }
                break;
            }
            job.instances[pos].replaced = true;
            if kind == JobKind::BatchService {
                job.failures += 1;
            }
            let delay = if state == InstanceState::Lost {
                0
            } else {
                let runs: Vec<Option<i64>> = job
                    .instances
                    .iter()
                    .filter(|i| i.rank == rank && i.state.is_terminal())
                    .map(|i| {
                        i.started_at_ms
                            .map(|s| i.finished_at_ms.unwrap_or(now_ms) - s)
                    })
                    .collect();
                backoff_ms(&runs)
            };
            tracing::info!(job = %job_id, rank, ?state, delay_ms = delay, "replica will be replaced");
            job.pending.push(PendingRank {
                rank,
                not_before_ms: now_ms + delay,
            });
        }
        if kind == JobKind::BatchService && job.gave_up.is_none() {
            // Keep `instances` completion indexes in flight.
            let started = job
                .instances
                .iter()
                .map(|i| i.rank + 1)
                .chain(job.pending.iter().map(|p| p.rank + 1))
                .max()
                .unwrap_or(0);
            let in_flight =
                job.current().filter(|i| !i.state.is_terminal()).count() + job.pending.len();
            let room = (job.spec.instances as usize).saturating_sub(in_flight) as u32;
            for rank in started..job.completions().min(started + room) {
                job.pending.push(PendingRank {
                    rank,
                    not_before_ms: 0,
                });
            }
        }
        job.refresh_state(now_ms);
    }

    /// Sets the number of replicas of an online service: new ranks are
    /// placed, the highest ranks are stopped.
    pub fn scale_service(
        &mut self,
        caller: &Caller,
        job_id: &str,
        replicas: u32,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<crate::domain::Job, ClusterError> {
        let job = self.job(caller, job_id)?;
        self.check_service(job)?;
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(ClusterError::ReplicasOutOfRange {
                job_id: job_id.to_string(),
                replicas,
            });
        }
        let grace_ms = self.settings.stop_grace_ms;
        let job = self.jobs.get_mut(job_id).expect("checked above");
        let before = job.spec.instances;
        job.spec.instances = replicas;
        job.pending.retain(|p| p.rank < replicas);
        job.rollout.retain(|r| *r < replicas);
        for rank in before..replicas {
            job.pending.push(PendingRank {
                rank,
                not_before_ms: 0,
            });
        }
        let retries = job.retries;
        for inst in job
            .instances
            .iter_mut()
            .filter(|i| i.attempt == retries && !i.replaced && i.rank >= replicas)
        {
            inst.replaced = true;
            if !inst.state.is_terminal() {
                inst.ready = false;
                inst.reason = format!("scaled down to {replicas} replicas");
                let reason = inst.reason.clone();
                stop_instance(inst, grace_ms, &reason, out);
            }
        }
        job.refresh_state(now_ms);
        tracing::info!(job = %job_id, before, replicas, "service scaled");
        self.store.put_job(&self.jobs[job_id], now_ms)?;
        self.schedule(now_ms, out);
        Ok(self.jobs[job_id].clone())
    }

    /// Starts a rolling restart: each replica in turn is stopped and
    /// replaced, the next only once every replica is ready again, so at
    /// least N-1 stay ready throughout.
    pub fn restart_service(
        &mut self,
        caller: &Caller,
        job_id: &str,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<crate::domain::Job, ClusterError> {
        let job = self.job(caller, job_id)?;
        self.check_service(job)?;
        let job = self.jobs.get_mut(job_id).expect("checked above");
        job.rollout = (0..job.spec.instances).collect();
        tracing::info!(job = %job_id, replicas = job.spec.instances, "rolling restart started");
        self.store.put_job(&self.jobs[job_id], now_ms)?;
        self.advance_rollouts(now_ms, out);
        self.schedule(now_ms, out);
        Ok(self.jobs[job_id].clone())
    }

    fn check_service(&self, job: &crate::domain::Job) -> Result<(), ClusterError> {
        if job.spec.kind != JobKind::OnlineService {
            return Err(ClusterError::NotAnOnlineService {
                job_id: job.job_id.clone(),
                kind: job.spec.kind.name(),
            });
        }
        if job.state.is_terminal() {
            return Err(ClusterError::ServiceEnded {
                job_id: job.job_id.clone(),
                state: job.state,
            });
        }
        Ok(())
    }

    /// Moves rolling restarts on: when every replica of a service is ready
    /// and none waits to be placed, the next rank is stopped and replaced.
    pub(super) fn advance_rollouts(&mut self, now_ms: i64, out: &mut Outbox) {
        let grace_ms = self.settings.stop_grace_ms;
        let mut changed = Vec::new();
        for job in self.jobs.values_mut().filter(|j| !j.rollout.is_empty()) {
            if job.stop_cause.is_some() || job.state.is_terminal() {
                job.rollout.clear();
                changed.push(job.job_id.clone());
                continue;
            }
            let ready = job.ready_replicas();
            if ready < job.spec.instances || !job.pending.is_empty() {
                continue;
            }
            let rank = job.rollout.remove(0);
            let retries = job.retries;
            if let Some(inst) = job
                .instances
                .iter_mut()
                .find(|i| i.attempt == retries && !i.replaced && i.rank == rank)
            {
                inst.replaced = true;
                inst.ready = false;
                inst.reason = "rolling restart".into();
                stop_instance(inst, grace_ms, "rolling restart", out);
            }
            job.pending.push(PendingRank {
                rank,
                not_before_ms: 0,
            });
            tracing::info!(job = %job.job_id, rank, left = job.rollout.len(), "rolling restart: replacing replica");
            changed.push(job.job_id.clone());
        }
        for id in changed {
            self.persist_job(&id, now_ms);
        }
    }

    /// Stops jobs past their maximum run time, and notebooks and
    /// TensorBoards idle past their idle timeout: no activity reported by
    /// the agent (kernel activity from the notebook server's API, or
    /// connections) and no GPU use at or above the kind's threshold.
    pub(super) fn enforce_time_limits(&mut self, now_ms: i64, out: &mut Outbox) {
        let mut stops: Vec<(String, StopCause, String)> = Vec::new();
        for job in self.jobs.values() {
            if job.state.is_terminal() || job.stop_cause.is_some() {
                continue;
            }
            let secs = job.spec.max_runtime_secs;
            if secs > 0
                && let Some(started) = job.started_at_ms
                && now_ms - started >= (secs as i64).saturating_mul(1000)
            {
                stops.push((
                    job.job_id.clone(),
                    StopCause::Timeout { secs },
                    "timeout".into(),
                ));
                continue;
            }
            let idle = job.spec.idle_timeout_secs;
            if idle == 0 || !job.spec.kind.interactive() || job.state != JobState::Running {
                continue;
            }
            let Some(inst) = job.current().find(|i| i.state == InstanceState::Running) else {
                continue;
            };
            let since = [
                inst.started_at_ms,
                inst.last_activity_ms,
                inst.gpu_active_ms,
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(now_ms);
            if now_ms - since >= (idle as i64).saturating_mul(1000) {
                let threshold = self.settings.kinds.get(job.spec.kind).idle_gpu_util_pct;
                let why = if inst.gpu_indexes.is_empty() {
                    "no kernel or connection activity".to_string()
                } else {
                    format!(
                        "no kernel or connection activity, GPU utilization under {}%",
                        threshold.max(1)
                    )
                };
                stops.push((
                    job.job_id.clone(),
                    StopCause::Idle {
                        secs: (now_ms - since) as u64 / 1000,
                        why,
                    },
                    "idle".into(),
                ));
            }
        }
        for (job_id, cause, reason) in stops {
            tracing::info!(job = %job_id, ?cause, "stopping job");
            let job = self.stop_job(&job_id, cause, &reason, now_ms, out);
            if let Err(err) = self.store.put_job(&job, now_ms) {
                tracing::error!(job = %job_id, error = %crate::ErrorChain(&err), "cannot persist job");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_on_quick_crashes_and_resets_after_a_stable_run() {
        assert_eq!(backoff_ms(&[Some(10)]), 1_000);
        assert_eq!(backoff_ms(&[Some(10), Some(10)]), 2_000);
        assert_eq!(backoff_ms(&[None, Some(10), Some(10)]), 4_000);
        assert_eq!(backoff_ms(&[Some(10); 20]), MAX_BACKOFF_MS);
        assert_eq!(
            backoff_ms(&[Some(10), Some(10), Some(STABLE_RUN_MS)]),
            1_000
        );
        assert_eq!(backoff_ms(&[Some(10), Some(STABLE_RUN_MS), Some(5)]), 1_000);
    }
}
