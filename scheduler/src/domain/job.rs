//! Jobs and their instances: the validated job spec, instance states as
//! agents report them, and the job state derived from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The five job kinds (R-DED-1, R-DED-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Notebook,
    Training,
    Tensorboard,
    OnlineService,
    BatchService,
}

impl JobKind {
    /// The name users type (`online_service`).
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Notebook => "notebook",
            JobKind::Training => "training",
            JobKind::Tensorboard => "tensorboard",
            JobKind::OnlineService => "online_service",
            JobKind::BatchService => "batch_service",
        }
    }
}

/// Per-instance resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Whole GPUs, all on one node.
    pub gpus: u32,
    /// A fraction of one GPU, 1..999 thousandths; 0 = none.
    pub gpu_milli: u32,
    /// Allowed GPU models; empty = any.
    pub gpu_models: Vec<String>,
    pub cpu_milli: u64,
    pub memory_mib: u64,
}

impl Resources {
    /// GPU demand in thousandths of a GPU.
    pub fn gpu_demand_milli(&self) -> u32 {
        self.gpus * 1000 + self.gpu_milli
    }

    /// "4 GPU, 1000m CPU, 1024 MiB".
    pub fn describe(&self) -> String {
        let gpu = if self.gpu_milli > 0 {
            format!("{}m GPU", self.gpu_milli)
        } else {
            format!("{} GPU", self.gpus)
        };
        let models = if self.gpu_models.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.gpu_models.join("|"))
        };
        format!(
            "{gpu}{models}, {}m CPU, {} MiB",
            self.cpu_milli, self.memory_mib
        )
    }
}

/// A job as submitted, after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    /// Pool as named by the user; empty = public.
    pub pool: String,
    pub resources: Resources,
    pub instances: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub priority: i32,
    pub max_runtime_secs: u64,
    pub max_retries: u32,
    pub port: u32,
    pub completions: u32,
}

/// A job spec as it arrives, before validation (signed, so that negative
/// numbers can be reported instead of wrapped).
#[derive(Debug, Clone, Default)]
pub struct RawJobSpec {
    pub name: String,
    pub kind: Option<JobKind>,
    pub pool: String,
    pub gpus: i64,
    pub gpu_milli: i64,
    pub gpu_models: Vec<String>,
    pub cpu_milli: i64,
    pub memory_mib: i64,
    pub instances: i64,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
    pub priority: i32,
    pub max_runtime_secs: u64,
    pub max_retries: u32,
    pub port: u32,
    pub completions: u32,
}

/// Defaults applied when a field is left at zero.
pub const DEFAULT_CPU_MILLI: u64 = 1000;
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
/// Upper bounds that catch typos before they become unschedulable jobs.
pub const MAX_INSTANCES: i64 = 10_000;
pub const MAX_GPUS_PER_INSTANCE: i64 = 64;

/// Why a job spec was rejected; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("kind is required (notebook, training, tensorboard, online_service, batch_service)")]
    MissingKind,
    #[error("command must not be empty")]
    EmptyCommand,
    #[error("{field} must not be negative (got {value})")]
    Negative { field: &'static str, value: i64 },
    #[error(
        "gpu_milli must be 1..999 thousandths of one GPU (got {0}); ask for whole GPUs with gpus"
    )]
    GpuFractionTooLarge(i64),
    #[error("gpus and gpu_milli are exclusive: ask for whole GPUs or a fraction of one, not both")]
    GpusAndFraction,
    #[error("gpus must be at most {MAX_GPUS_PER_INSTANCE} per instance (got {0})")]
    TooManyGpus(i64),
    #[error("instances must be at least 1 (got {0})")]
    ZeroInstances(i64),
    #[error("instances must be at most {MAX_INSTANCES} (got {0})")]
    TooManyInstances(i64),
    #[error(
        "env name {0:?} is invalid: use letters, digits and underscores, not starting with a digit"
    )]
    BadEnvName(String),
    #[error("name must be at most 128 characters")]
    NameTooLong,
}

impl RawJobSpec {
    /// Validates and fills defaults.
    pub fn validate(self) -> Result<JobSpec, SpecError> {
        let kind = self.kind.ok_or(SpecError::MissingKind)?;
        if self.command.first().is_none_or(|c| c.trim().is_empty()) {
            return Err(SpecError::EmptyCommand);
        }
        for (field, value) in [
            ("gpus", self.gpus),
            ("gpu_milli", self.gpu_milli),
            ("cpu_milli", self.cpu_milli),
            ("memory_mib", self.memory_mib),
            ("instances", self.instances),
        ] {
            if value < 0 {
                return Err(SpecError::Negative { field, value });
            }
        }
        if self.gpu_milli >= 1000 {
            return Err(SpecError::GpuFractionTooLarge(self.gpu_milli));
        }
        if self.gpus > 0 && self.gpu_milli > 0 {
            return Err(SpecError::GpusAndFraction);
        }
        if self.gpus > MAX_GPUS_PER_INSTANCE {
            return Err(SpecError::TooManyGpus(self.gpus));
        }
        if self.instances == 0 {
            return Err(SpecError::ZeroInstances(self.instances));
        }
        if self.instances > MAX_INSTANCES {
            return Err(SpecError::TooManyInstances(self.instances));
        }
        if self.name.chars().count() > 128 {
            return Err(SpecError::NameTooLong);
        }
        for key in self.env.keys() {
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(SpecError::BadEnvName(key.clone()));
            }
        }
        let or_default = |v: i64, d: u64| if v == 0 { d } else { v as u64 };
        Ok(JobSpec {
            name: self.name,
            kind,
            pool: self.pool,
            resources: Resources {
                gpus: self.gpus as u32,
                gpu_milli: self.gpu_milli as u32,
                gpu_models: self
                    .gpu_models
                    .into_iter()
                    .filter(|m| !m.is_empty())
                    .collect(),
                cpu_milli: or_default(self.cpu_milli, DEFAULT_CPU_MILLI),
                memory_mib: or_default(self.memory_mib, DEFAULT_MEMORY_MIB),
            },
            instances: self.instances as u32,
            command: self.command,
            env: self.env,
            working_dir: Some(self.working_dir).filter(|d| !d.is_empty()),
            priority: self.priority,
            max_runtime_secs: self.max_runtime_secs,
            max_retries: self.max_retries,
            port: self.port,
            completions: self.completions,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    Scheduled,
    Running,
    Stopping,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

impl InstanceState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Stopped | Self::Lost
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_id: String,
    pub rank: u32,
    pub node_id: String,
    pub gpu_indexes: Vec<u32>,
    pub gpu_uuids: Vec<String>,
    pub state: InstanceState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// GPU-milliseconds actually used (utilization-weighted agent
    /// samples), by UTC hour start.
    #[serde(default)]
    pub gpu_used_ms_by_hour: BTreeMap<i64, i64>,
    /// When the last utilization sample was taken.
    #[serde(default)]
    pub last_sample_ms: Option<i64>,
    /// Which run of the job this instance belongs to (0 = the first; a
    /// retry places a new set of instances with the next number).
    #[serde(default)]
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
    Unavailable,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Lost | Self::Unavailable
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    /// Submission order; ties in priority go to the older job.
    pub seq: u64,
    pub spec: JobSpec,
    pub pool_id: String,
    pub tenant: String,
    pub state: JobState,
    pub reason: String,
    pub submitted_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub instances: Vec<Instance>,
    /// Why gpupool is ending the job, once it decided to.
    #[serde(default)]
    pub stop_cause: Option<StopCause>,
    /// Times the job was requeued after a failure or a lost node (at most
    /// `spec.max_retries`); instances of earlier runs stay for the record.
    #[serde(default)]
    pub retries: u32,
}

/// Why the scheduler stops a job's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopCause {
    /// `gpupool job cancel`.
    User,
    /// R-DEL-1: the job's pool was deleted.
    PoolDeleted { pool: String },
    /// R-SCALE-3 with force: the node it ran on left the pool.
    ScaleIn { node: String, pool: String },
    /// The pool's subscription lapsed and the pool was frozen.
    PoolFrozen { pool: String },
}

impl StopCause {
    fn outcome(&self) -> (JobState, String) {
        match self {
            StopCause::User => (JobState::Cancelled, "cancelled by user".into()),
            StopCause::PoolDeleted { pool } => (
                JobState::Unavailable,
                format!("pool {pool} was deleted (R-DEL-1)"),
            ),
            StopCause::PoolFrozen { pool } => (
                JobState::Failed,
                format!("pool {pool} was frozen: its subscription expired"),
            ),
            StopCause::ScaleIn { node, pool } => (
                JobState::Failed,
                format!("node {node} was removed from pool {pool} by a forced scale-in"),
            ),
        }
    }
}

impl Job {
    /// Instances that still hold resources on their node.
    pub fn active_instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(|i| !i.state.is_terminal())
    }

    /// The instances of the current run.
    pub fn current(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(|i| i.attempt == self.retries)
    }

    /// Recomputes the job state from its instances at `now_ms`. Returns
    /// true when the state changed.
    pub fn refresh_state(&mut self, now_ms: i64) -> bool {
        let before = (self.state, self.reason.clone());
        if self.state == JobState::Queued
            && self.current().next().is_none()
            && self.stop_cause.is_none()
        {
            return false;
        }
        let states: Vec<_> = self.current().map(|i| i.state).collect();
        let all = |s: InstanceState| !states.is_empty() && states.iter().all(|x| *x == s);
        let any = |s: InstanceState| states.contains(&s);
        let (state, reason) = if let Some(cause) = &self.stop_cause {
            cause.outcome()
        } else if let Some(lost) = self.current().find(|i| i.state == InstanceState::Lost) {
            (
                JobState::Lost,
                format!("instance {} lost: {}", lost.rank, lost.reason),
            )
        } else if let Some(failed) = self.current().find(|i| i.state == InstanceState::Failed) {
            (
                JobState::Failed,
                format!("instance {} failed: {}", failed.rank, failed.reason),
            )
        } else if let Some(stopped) = self.current().find(|i| i.state == InstanceState::Stopped) {
            (
                JobState::Failed,
                format!("instance {} stopped: {}", stopped.rank, stopped.reason),
            )
        } else if all(InstanceState::Succeeded) {
            (JobState::Succeeded, String::new())
        } else if any(InstanceState::Running) || any(InstanceState::Succeeded) {
            (JobState::Running, String::new())
        } else {
            (JobState::Scheduled, String::new())
        };
        self.state = state;
        self.reason = reason;
        if state == JobState::Running && self.started_at_ms.is_none() {
            self.started_at_ms = Some(now_ms);
        }
        if state.is_terminal() && self.finished_at_ms.is_none() {
            self.finished_at_ms = Some(now_ms);
        }
        before != (self.state, self.reason.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawJobSpec {
        RawJobSpec {
            kind: Some(JobKind::Training),
            command: vec!["echo".into(), "hi".into()],
            instances: 1,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_filled() {
        let spec = raw().validate().unwrap();
        assert_eq!(spec.resources.cpu_milli, DEFAULT_CPU_MILLI);
        assert_eq!(spec.resources.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(spec.instances, 1);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let cases: Vec<(RawJobSpec, &str)> = vec![
            (
                RawJobSpec {
                    command: vec![],
                    ..raw()
                },
                "command must not be empty",
            ),
            (
                RawJobSpec {
                    command: vec!["  ".into()],
                    ..raw()
                },
                "command must not be empty",
            ),
            (
                RawJobSpec { gpus: -1, ..raw() },
                "gpus must not be negative",
            ),
            (
                RawJobSpec {
                    cpu_milli: -5,
                    ..raw()
                },
                "cpu_milli must not be negative",
            ),
            (
                RawJobSpec {
                    memory_mib: -5,
                    ..raw()
                },
                "memory_mib must not be negative",
            ),
            (
                RawJobSpec {
                    gpu_milli: 1500,
                    ..raw()
                },
                "gpu_milli must be 1..999",
            ),
            (
                RawJobSpec {
                    gpu_milli: 1000,
                    ..raw()
                },
                "gpu_milli must be 1..999",
            ),
            (
                RawJobSpec {
                    gpus: 1,
                    gpu_milli: 500,
                    ..raw()
                },
                "exclusive",
            ),
            (
                RawJobSpec {
                    instances: 0,
                    ..raw()
                },
                "instances must be at least 1",
            ),
            (
                RawJobSpec {
                    instances: -2,
                    ..raw()
                },
                "instances must not be negative",
            ),
            (
                RawJobSpec {
                    kind: None,
                    ..raw()
                },
                "kind is required",
            ),
            (RawJobSpec { gpus: 65, ..raw() }, "at most 64"),
        ];
        for (spec, want) in cases {
            let err = spec.clone().validate().unwrap_err().to_string();
            assert!(err.contains(want), "{spec:?}: {err:?} lacks {want:?}");
        }
        let mut env = BTreeMap::new();
        env.insert("1BAD".to_string(), "x".to_string());
        assert!(matches!(
            RawJobSpec { env, ..raw() }.validate(),
            Err(SpecError::BadEnvName(_))
        ));
    }

    fn job_with(states: &[InstanceState]) -> Job {
        Job {
            job_id: "j".into(),
            seq: 1,
            spec: raw().validate().unwrap(),
            pool_id: "public".into(),
            tenant: String::new(),
            state: JobState::Scheduled,
            reason: String::new(),
            submitted_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            instances: states
                .iter()
                .enumerate()
                .map(|(rank, s)| Instance {
                    instance_id: format!("j-{rank}"),
                    rank: rank as u32,
                    node_id: "n".into(),
                    gpu_indexes: vec![],
                    gpu_uuids: vec![],
                    state: *s,
                    exit_code: None,
                    signal: None,
                    reason: "why".into(),
                    started_at_ms: None,
                    finished_at_ms: None,
                    gpu_used_ms_by_hour: BTreeMap::new(),
                    last_sample_ms: None,
                    attempt: 0,
                })
                .collect(),
            stop_cause: None,
            retries: 0,
        }
    }

    #[test]
    fn job_state_follows_instances() {
        use InstanceState::*;
        let cases = [
            (vec![Scheduled, Scheduled], JobState::Scheduled),
            (vec![Running, Scheduled], JobState::Running),
            (vec![Succeeded, Running], JobState::Running),
            (vec![Succeeded, Succeeded], JobState::Succeeded),
            (vec![Succeeded, Failed], JobState::Failed),
            (vec![Running, Lost], JobState::Lost),
        ];
        for (states, want) in cases {
            let mut job = job_with(&states);
            job.refresh_state(10);
            assert_eq!(job.state, want, "{states:?}");
            assert_eq!(job.finished_at_ms.is_some(), want.is_terminal());
        }
    }

    #[test]
    fn cancel_wins() {
        let mut job = job_with(&[InstanceState::Running]);
        job.stop_cause = Some(StopCause::User);
        assert!(job.refresh_state(5));
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.finished_at_ms, Some(5));
    }

    #[test]
    fn r_del_1_jobs_of_a_deleted_pool_become_unavailable() {
        let mut job = job_with(&[InstanceState::Running]);
        job.stop_cause = Some(StopCause::PoolDeleted { pool: "p-1".into() });
        job.refresh_state(5);
        assert_eq!(job.state, JobState::Unavailable);
        assert!(job.reason.contains("p-1") && job.reason.contains("R-DEL-1"));
        // A queued job of the pool too.
        let mut queued = job_with(&[]);
        queued.state = JobState::Queued;
        queued.stop_cause = Some(StopCause::PoolDeleted { pool: "p-1".into() });
        queued.refresh_state(6);
        assert_eq!(queued.state, JobState::Unavailable);
    }
}
