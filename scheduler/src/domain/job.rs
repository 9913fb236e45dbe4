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
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

    /// What one instance holds: GPU milli, CPU milli, memory MiB (the
    /// resources a fair share is measured in).
    pub fn held(&self) -> [u64; 3] {
        [
            u64::from(self.gpu_demand_milli()),
            self.cpu_milli,
            self.memory_mib,
        ]
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
    /// Online services: the agent's readiness check of each replica.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Notebooks and TensorBoards: stopped after this long idle; 0 = never.
    #[serde(default)]
    pub idle_timeout_secs: u64,
    /// Training: where it writes TensorBoard logs (exported as
    /// `GPUPOOL_LOG_DIR`); TensorBoard: the directory it serves.
    #[serde(default)]
    pub log_dir: String,
    /// TensorBoard: the training job whose logs it serves.
    #[serde(default)]
    pub for_job: String,
    /// OCI image the instances run in; empty = host processes.
    #[serde(default)]
    pub image: String,
    /// Container network: "" (the agent's default), "host" or "none".
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub priority_class: PriorityClass,
}

/// Which jobs a job may preempt (a lower class, in its pool) and be
/// preempted by (a higher one). Ordered: `Preemptible < Normal < High`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum PriorityClass {
    Preemptible,
    #[default]
    Normal,
    High,
}

impl PriorityClass {
    pub fn name(self) -> &'static str {
        match self {
            PriorityClass::Preemptible => "preemptible",
            PriorityClass::Normal => "normal",
            PriorityClass::High => "high",
        }
    }
}

/// How the agent checks that a replica is ready to serve: an HTTP GET of
/// `http_path` answered 2xx/3xx, or (no path) a TCP connection accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub http_path: Option<String>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive failures that take a ready replica out of the endpoints.
    pub failure_threshold: u32,
    /// No check before this long after the start.
    pub initial_delay_ms: u32,
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
    pub health_check: Option<HealthCheck>,
    pub idle_timeout_secs: u64,
    pub log_dir: String,
    pub for_job: String,
    /// Ask no GPU even when the kind's default has one.
    pub cpu_only: bool,
    pub image: String,
    pub network: String,
    pub priority_class: PriorityClass,
}

/// Defaults applied when a field is left at zero.
pub const DEFAULT_CPU_MILLI: u64 = 1000;
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

/// The operator's defaults and limits for one job kind (`[kinds.<kind>]`
/// in the scheduler config; `gpupool job kinds` shows them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindSettings {
    /// Command run when a job gives none (notebooks, TensorBoards). The
    /// agent replaces `{port}`, `{token}` and `{log_dir}` in it.
    pub command: Vec<String>,
    /// Default GPUs per instance (whole, or a fraction in thousandths).
    pub gpus: u32,
    pub gpu_milli: u32,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    /// Maximum run time when a job sets none; 0 = unlimited.
    pub max_runtime_secs: u64,
    /// Longest maximum run time a job may ask; 0 = no limit.
    pub max_runtime_limit_secs: u64,
    /// Idle time after which a notebook or TensorBoard is stopped; 0 = never.
    pub idle_timeout_secs: u64,
    /// GPU utilization (%) at or above which a notebook counts as active.
    pub idle_gpu_util_pct: u32,
    /// Image jobs of this kind run in when they name none; empty = host
    /// processes.
    pub image: String,
}

impl KindSettings {
    fn plain() -> Self {
        Self {
            command: Vec::new(),
            gpus: 0,
            gpu_milli: 0,
            cpu_milli: DEFAULT_CPU_MILLI,
            memory_mib: DEFAULT_MEMORY_MIB,
            max_runtime_secs: 0,
            max_runtime_limit_secs: 0,
            idle_timeout_secs: 0,
            idle_gpu_util_pct: 0,
            image: String::new(),
        }
    }
}

/// Settings of the five kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindTable {
    pub notebook: KindSettings,
    pub training: KindSettings,
    pub tensorboard: KindSettings,
    pub online_service: KindSettings,
    pub batch_service: KindSettings,
}

impl Default for KindTable {
    /// Built-in defaults: JupyterLab on a quarter GPU, culled after an idle
    /// hour; TensorBoard without GPU, culled after an idle hour.
    fn default() -> Self {
        Self {
            notebook: KindSettings {
                command: [
                    "jupyter",
                    "lab",
                    "--no-browser",
                    "--ip=0.0.0.0",
                    "--port={port}",
                ]
                .map(String::from)
                .to_vec(),
                // The token reaches JupyterLab as JUPYTER_TOKEN, not in its
                // argv (which every process on the node can read).
                gpu_milli: 250,
                cpu_milli: 1000,
                memory_mib: 4096,
                idle_timeout_secs: 3600,
                idle_gpu_util_pct: 5,
                ..KindSettings::plain()
            },
            training: KindSettings::plain(),
            tensorboard: KindSettings {
                command: [
                    "tensorboard",
                    "--logdir={log_dir}",
                    "--port={port}",
                    "--bind_all",
                ]
                .map(String::from)
                .to_vec(),
                memory_mib: 2048,
                idle_timeout_secs: 3600,
                ..KindSettings::plain()
            },
            online_service: KindSettings::plain(),
            batch_service: KindSettings::plain(),
        }
    }
}

impl KindTable {
    pub fn get(&self, kind: JobKind) -> &KindSettings {
        match kind {
            JobKind::Notebook => &self.notebook,
            JobKind::Training => &self.training,
            JobKind::Tensorboard => &self.tensorboard,
            JobKind::OnlineService => &self.online_service,
            JobKind::BatchService => &self.batch_service,
        }
    }

    pub fn get_mut(&mut self, kind: JobKind) -> &mut KindSettings {
        match kind {
            JobKind::Notebook => &mut self.notebook,
            JobKind::Training => &mut self.training,
            JobKind::Tensorboard => &mut self.tensorboard,
            JobKind::OnlineService => &mut self.online_service,
            JobKind::BatchService => &mut self.batch_service,
        }
    }
}

impl JobKind {
    pub const ALL: [JobKind; 5] = [
        JobKind::Notebook,
        JobKind::Training,
        JobKind::Tensorboard,
        JobKind::OnlineService,
        JobKind::BatchService,
    ];

    /// Kinds whose instances are replicas managed one by one (restarted,
    /// scaled, completed) rather than one gang run.
    pub fn has_replicas(self) -> bool {
        matches!(self, JobKind::OnlineService | JobKind::BatchService)
    }

    /// Kinds the agent gives a port (notebooks, TensorBoards, services).
    pub fn serves(self) -> bool {
        matches!(
            self,
            JobKind::Notebook | JobKind::Tensorboard | JobKind::OnlineService
        )
    }

    /// Kinds that are stopped when idle.
    pub fn interactive(self) -> bool {
        matches!(self, JobKind::Notebook | JobKind::Tensorboard)
    }

    pub fn from_name(name: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.name() == name)
    }
}
/// Upper bounds that catch typos before they become unschedulable jobs.
pub const MAX_INSTANCES: i64 = 10_000;
pub const MAX_GPUS_PER_INSTANCE: i64 = 64;
/// Longest run time or idle timeout a job may ask (ten years).
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 86_400;

/// Why a job spec was rejected; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("kind is required (notebook, training, tensorboard, online_service, batch_service)")]
    MissingKind,
    #[error(
        "a {0} cannot be preemptible: only training jobs are (a preempted one is queued again)"
    )]
    NotPreemptible(&'static str),
    #[error("command must not be empty")]
    EmptyCommand,
    #[error("a {0} has exactly one instance")]
    SingleInstance(&'static str),
    #[error("{field} applies to {applies} jobs only, not to a {kind}")]
    NotForKind {
        field: &'static str,
        applies: &'static str,
        kind: &'static str,
    },
    #[error("max_runtime_secs {asked} exceeds the {kind} limit of {limit} s")]
    RuntimeOverLimit {
        asked: u64,
        limit: u64,
        kind: &'static str,
    },
    #[error(
        "a tensorboard needs a log directory: give log_dir, or for_job with a training job that sets log_dir"
    )]
    NoLogDir,
    #[error("{field} must be at most {MAX_DURATION_SECS} s, ten years (got {value})")]
    TooLong { field: &'static str, value: u64 },
    #[error("port must be 1..65535 (got {0})")]
    BadPort(u32),
    #[error("max_retries {asked} exceeds the cluster's limit of {limit} (`[limits] max_retries`)")]
    RetriesOverLimit { asked: u32, limit: u32 },
    #[error("health_check: {0}")]
    BadHealthCheck(String),
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
    #[error(
        "image {0:?} is not an image reference ({1}); e.g. registry.example.com/team/app:1.0 or ...@sha256:<64 hex>"
    )]
    BadImage(String, &'static str),
    #[error("network must be \"host\" or \"none\" (got {0:?})")]
    BadNetwork(String),
    #[error("network applies to image jobs only (give --image)")]
    NetworkWithoutImage,
    #[error(
        "the host network is for training jobs in a train pool (its nodes are the tenant's own), not for {0}"
    )]
    HostNetworkNotHere(String),
    #[error("{field} {path:?} must not contain `..`")]
    DotDotPath { field: &'static str, path: String },
    #[error("name must be at most 128 characters")]
    NameTooLong,
    #[error(
        "gpu_models: at most {MAX_GPU_MODELS} models of at most {MAX_GPU_MODEL_LEN} printable characters each ({0})"
    )]
    BadGpuModels(String),
}

/// Most GPU models one job may accept.
pub const MAX_GPU_MODELS: usize = 16;
/// Longest GPU model name a job may give (NVML's names are far shorter).
pub const MAX_GPU_MODEL_LEN: usize = 96;

impl RawJobSpec {
    /// Validates and fills the built-in kind defaults.
    pub fn validate(self) -> Result<JobSpec, SpecError> {
        self.validate_for(&KindTable::default())
    }

    /// Validates and fills defaults from the operator's kind settings.
    pub fn validate_for(mut self, kinds: &KindTable) -> Result<JobSpec, SpecError> {
        let kind = self.kind.ok_or(SpecError::MissingKind)?;
        if self.priority_class == PriorityClass::Preemptible && kind != JobKind::Training {
            return Err(SpecError::NotPreemptible(kind.name()));
        }
        let defaults = kinds.get(kind);
        if self.image.trim().is_empty() {
            self.image = defaults.image.clone();
        }
        let image = self.image.trim().to_string();
        if !image.is_empty() {
            check_image_reference(&image)?;
        }
        if !matches!(self.network.as_str(), "" | "host" | "none") {
            return Err(SpecError::BadNetwork(self.network.clone()));
        }
        if !self.network.is_empty() && image.is_empty() {
            return Err(SpecError::NetworkWithoutImage);
        }
        if self.command.is_empty() && image.is_empty() {
            self.command = defaults.command.clone();
        }
        // An image job without a command runs the image's entrypoint.
        if self.command.first().is_some_and(|c| c.trim().is_empty())
            || (self.command.is_empty() && image.is_empty())
        {
            return Err(SpecError::EmptyCommand);
        }
        for (field, path) in [
            ("working_dir", &self.working_dir),
            ("log_dir", &self.log_dir),
        ] {
            if std::path::Path::new(path)
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(SpecError::DotDotPath {
                    field,
                    path: path.clone(),
                });
            }
        }
        let not_for = |field, applies| SpecError::NotForKind {
            field,
            applies,
            kind: kind.name(),
        };
        if kind.interactive() && self.instances > 1 {
            return Err(SpecError::SingleInstance(kind.name()));
        }
        if self.completions != 0 && kind != JobKind::BatchService {
            return Err(not_for("completions", "batch_service"));
        }
        if self.health_check.is_some() && kind != JobKind::OnlineService {
            return Err(not_for("health_check", "online_service"));
        }
        if self.idle_timeout_secs != 0 && !kind.interactive() {
            return Err(not_for("idle_timeout_secs", "notebook and tensorboard"));
        }
        for (field, value) in [
            ("max_runtime_secs", self.max_runtime_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if value > MAX_DURATION_SECS {
                return Err(SpecError::TooLong { field, value });
            }
        }
        if self.port > 65_535 {
            return Err(SpecError::BadPort(self.port));
        }
        if kind == JobKind::Tensorboard && self.log_dir.trim().is_empty() {
            return Err(SpecError::NoLogDir);
        }
        if let Some(h) = &self.health_check {
            if let Some(path) = &h.http_path
                && !path.starts_with('/')
            {
                return Err(SpecError::BadHealthCheck(format!(
                    "http_path must start with / (got {path:?})"
                )));
            }
            if h.interval_ms < 100 || h.timeout_ms == 0 || h.timeout_ms > h.interval_ms.max(1000) {
                return Err(SpecError::BadHealthCheck(format!(
                    "interval_ms must be at least 100 and timeout_ms 1..max(interval_ms, 1000) (got {} and {})",
                    h.interval_ms, h.timeout_ms
                )));
            }
        }
        let limit = defaults.max_runtime_limit_secs;
        let max_runtime_secs = match (self.max_runtime_secs, defaults.max_runtime_secs) {
            (0, 0) => limit,
            (0, default) => default,
            (asked, _) => asked,
        };
        if limit > 0 && max_runtime_secs > limit {
            return Err(SpecError::RuntimeOverLimit {
                asked: max_runtime_secs,
                limit,
                kind: kind.name(),
            });
        }
        if self.gpus == 0 && self.gpu_milli == 0 && !self.cpu_only {
            self.gpus = i64::from(defaults.gpus);
            self.gpu_milli = i64::from(defaults.gpu_milli);
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
        if self.gpu_models.len() > MAX_GPU_MODELS {
            return Err(SpecError::BadGpuModels(format!(
                "{} given",
                self.gpu_models.len()
            )));
        }
        if let Some(m) = self
            .gpu_models
            .iter()
            .find(|m| m.chars().count() > MAX_GPU_MODEL_LEN || m.chars().any(char::is_control))
        {
            let shown: String = m.chars().take(32).filter(|c| !c.is_control()).collect();
            return Err(SpecError::BadGpuModels(format!("{shown:?}…")));
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
        let idle_timeout_secs = match self.idle_timeout_secs {
            0 if kind.interactive() => defaults.idle_timeout_secs,
            secs => secs,
        };
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
                cpu_milli: or_default(self.cpu_milli, defaults.cpu_milli),
                memory_mib: or_default(self.memory_mib, defaults.memory_mib),
            },
            instances: self.instances as u32,
            command: self.command,
            env: self.env,
            working_dir: Some(self.working_dir).filter(|d| !d.is_empty()),
            priority: self.priority,
            max_runtime_secs,
            max_retries: self.max_retries,
            port: self.port,
            completions: self.completions,
            health_check: self.health_check,
            idle_timeout_secs,
            log_dir: self.log_dir,
            for_job: self.for_job,
            image,
            network: self.network,
            priority_class: self.priority_class,
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
    /// The port the agent gave the instance (notebooks, TensorBoards,
    /// services); 0 = none yet.
    #[serde(default)]
    pub port: u32,
    /// Passes its health check (or, without one, runs): listed as an
    /// endpoint.
    #[serde(default)]
    pub ready: bool,
    /// A later instance took this one's rank (a restarted replica, a
    /// retried completion, a rolling restart, a scale-down).
    #[serde(default)]
    pub replaced: bool,
    /// Last user activity the agent saw (notebook kernels, connections).
    #[serde(default)]
    pub last_activity_ms: Option<i64>,
    /// Last GPU sample at or above the kind's activity threshold.
    #[serde(default)]
    pub gpu_active_ms: Option<i64>,
    /// Image instances: the manifest digest the agent resolved and runs.
    #[serde(default)]
    pub image_digest: String,
    /// While the agent pulls its image: (bytes done, bytes in all).
    #[serde(default, skip)]
    pub pull: Option<(u64, u64)>,
    /// Address of its node, for endpoints and URLs.
    #[serde(default)]
    pub address: String,
    /// Its place in its network (tenant's or job's), when networks are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<super::network::InstanceNet>,
}

impl Instance {
    /// A new instance of `job_id`, not yet started.
    pub fn scheduled(instance_id: String, rank: u32, attempt: u32) -> Self {
        Self {
            instance_id,
            rank,
            node_id: String::new(),
            gpu_indexes: Vec::new(),
            gpu_uuids: Vec::new(),
            state: InstanceState::Scheduled,
            exit_code: None,
            signal: None,
            reason: String::new(),
            started_at_ms: None,
            finished_at_ms: None,
            gpu_used_ms_by_hour: BTreeMap::new(),
            last_sample_ms: None,
            attempt,
            port: 0,
            ready: false,
            replaced: false,
            last_activity_ms: None,
            gpu_active_ms: None,
            address: String::new(),
            image_digest: String::new(),
            pull: None,
            net: None,
        }
    }

    /// `host:port` where it serves, once the agent gave it a port.
    pub fn endpoint(&self) -> Option<String> {
        (self.port != 0 && !self.address.is_empty()).then(|| {
            if self.address.contains(':') {
                format!("[{}]:{}", self.address, self.port)
            } else {
                format!("{}:{}", self.address, self.port)
            }
        })
    }
}

/// A replica rank waiting to be placed (services, batch completions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRank {
    pub rank: u32,
    /// Not before this time (restart backoff).
    pub not_before_ms: i64,
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
    /// The `jobs.state` column's text. Existing databases hold these
    /// strings: a rename of a variant must not change them.
    pub fn as_db_str(self) -> &'static str {
        match self {
            Self::Queued => "Queued",
            Self::Scheduled => "Scheduled",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::Lost => "Lost",
            Self::Unavailable => "Unavailable",
        }
    }

    /// The state a `jobs.state` column holds; None for an unknown string.
    pub fn from_db_str(s: &str) -> Option<Self> {
        Some(match s {
            "Queued" => Self::Queued,
            "Scheduled" => Self::Scheduled,
            "Running" => Self::Running,
            "Succeeded" => Self::Succeeded,
            "Failed" => Self::Failed,
            "Cancelled" => Self::Cancelled,
            "Lost" => Self::Lost,
            "Unavailable" => Self::Unavailable,
            _ => return None,
        })
    }

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
    /// Notebook access token (part of its URL). Never stored: derived from
    /// the scheduler's key and the job id ([`crate::cluster::Cluster`] sets
    /// it at submission and at load).
    #[serde(default, skip_serializing)]
    pub access_token: String,
    /// Replica kinds: ranks to place, in order.
    #[serde(default)]
    pub pending: Vec<PendingRank>,
    /// Replica kinds: replacement instances started so far (restarts,
    /// retried completions, rolling restarts).
    #[serde(default)]
    pub restarts: u32,
    /// Rolling restart: ranks still to restart, one at a time.
    #[serde(default)]
    pub rollout: Vec<u32>,
    /// Batch services: why the job gave up (retries spent).
    #[serde(default)]
    pub gave_up: Option<String>,
    /// Batch services: failed completions retried so far (counted when the
    /// retry is decided, not when it is placed).
    #[serde(default)]
    pub failures: u32,
    /// A requeued run waits until then (retry backoff).
    #[serde(default)]
    pub not_before_ms: i64,
    /// Runs requeued because their node was drained: they count as retries
    /// (each run has its own attempt number) but not against
    /// `max_retries`.
    #[serde(default)]
    pub drains: u32,
    /// The node a drain stopped this run on: once the run has ended it is
    /// queued again (not counted against `max_retries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_from: Option<String>,
    /// Times a higher-class job preempted this one (each requeue is not
    /// counted against `max_retries`).
    #[serde(default)]
    pub preemptions: u32,
    /// The job that preempted the current run: once the run has ended it is
    /// queued again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempted_by: Option<String>,
    /// The job that preempted it last (kept after the requeue).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_preempted_by: String,
    /// Ended instances of earlier runs (or replaced replicas) dropped from
    /// `instances` once their hours were in the ledger.
    #[serde(default)]
    pub pruned_instances: u64,
    /// Why the planner left it waiting in its last pass, as `reason`
    /// renders it: in memory only, so an unchanged wait costs a comparison,
    /// not a rendering.
    #[serde(skip)]
    pub wait: Option<std::sync::Arc<super::scheduling::Wait>>,
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
    /// It ran past its maximum run time.
    Timeout { secs: u64 },
    /// A notebook or TensorBoard idle past its idle timeout.
    Idle { secs: u64, why: String },
    /// Its node was drained (`--force`, or the drain's deadline passed).
    Drained { node: String },
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
            StopCause::Timeout { secs } => (
                JobState::Failed,
                format!("timeout: ran past its maximum run time of {secs} s"),
            ),
            StopCause::Idle { secs, why } => (
                JobState::Cancelled,
                format!("culled: idle for {secs} s ({why})"),
            ),
            StopCause::Drained { node } => (
                JobState::Cancelled,
                format!("stopped: node {node} was drained for maintenance"),
            ),
        }
    }
}

impl Job {
    /// Instances that still hold resources on their node.
    pub fn active_instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(|i| !i.state.is_terminal())
    }

    /// The instances of the current run (for replica kinds: the latest
    /// instance of each rank).
    pub fn current(&self) -> impl Iterator<Item = &Instance> {
        self.instances
            .iter()
            .filter(|i| i.attempt == self.retries && !i.replaced)
    }

    /// The URL of a running notebook (with its token) or TensorBoard.
    pub fn url(&self) -> Option<String> {
        if !self.spec.kind.interactive() || self.state.is_terminal() {
            return None;
        }
        let endpoint = self
            .current()
            .find(|i| i.state == InstanceState::Running)?
            .endpoint()?;
        Some(match self.spec.kind {
            JobKind::Notebook => format!("http://{endpoint}/?token={}", self.access_token),
            _ => format!("http://{endpoint}/"),
        })
    }

    /// Replicas of the current run that run and pass their health check.
    pub fn ready_replicas(&self) -> u32 {
        self.current()
            .filter(|i| i.ready && i.state == InstanceState::Running)
            .count() as u32
    }

    /// Instances of the current run that succeeded (batch completions).
    pub fn succeeded(&self) -> u32 {
        self.current()
            .filter(|i| i.state == InstanceState::Succeeded)
            .count() as u32
    }

    /// Batch services: completions needed (default: one per instance).
    pub fn completions(&self) -> u32 {
        match self.spec.completions {
            0 => self.spec.instances,
            n => n,
        }
    }

    /// Replica kinds: the job's state from its replicas. A service runs
    /// while any replica runs and never ends by itself; a batch service
    /// succeeds once every completion index has succeeded.
    fn replica_state(&self) -> (JobState, String) {
        let current: Vec<&Instance> = self.current().collect();
        let count = |s: InstanceState| current.iter().filter(|i| i.state == s).count();
        if let Some(why) = &self.gave_up {
            return (JobState::Failed, why.clone());
        }
        if self.spec.kind == JobKind::BatchService && self.succeeded() >= self.completions() {
            return (JobState::Succeeded, String::new());
        }
        let waiting = match self.pending.first() {
            Some(p) => format!(
                "{} replica(s) waiting to be placed{}",
                self.pending.len(),
                if p.not_before_ms > 0 {
                    " (restart backoff)"
                } else {
                    ""
                }
            ),
            None => String::new(),
        };
        if count(InstanceState::Running) > 0 || count(InstanceState::Succeeded) > 0 {
            (JobState::Running, waiting)
        } else if count(InstanceState::Scheduled) > 0 {
            (JobState::Scheduled, waiting)
        } else {
            (JobState::Queued, waiting)
        }
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
        } else if self.spec.kind.has_replicas() {
            self.replica_state()
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
        self.wait = None;
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

    /// What `jobs.state` holds for each state, fixed (existing databases
    /// hold these strings), and the state after it: an exhaustive match,
    /// so a new state does not compile until it is listed here.
    fn state_on_disk(s: JobState) -> (&'static str, Option<JobState>) {
        use JobState::*;
        match s {
            Queued => ("Queued", Some(Scheduled)),
            Scheduled => ("Scheduled", Some(Running)),
            Running => ("Running", Some(Succeeded)),
            Succeeded => ("Succeeded", Some(Failed)),
            Failed => ("Failed", Some(Cancelled)),
            Cancelled => ("Cancelled", Some(Lost)),
            Lost => ("Lost", Some(Unavailable)),
            Unavailable => ("Unavailable", None),
        }
    }

    #[test]
    fn every_job_state_round_trips_through_its_fixed_column_text() {
        let mut seen = 0;
        let mut next = Some(JobState::Queued);
        while let Some(state) = next {
            let (text, after) = state_on_disk(state);
            assert_eq!(state.as_db_str(), text);
            assert_eq!(JobState::from_db_str(text), Some(state));
            seen += 1;
            next = after;
        }
        assert_eq!(seen, 8);
        assert_eq!(JobState::from_db_str("queued"), None);
    }

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
                    gpu_models: vec!["H100".into(); 17],
                    ..raw()
                },
                "gpu_models: at most 16 models",
            ),
            (
                RawJobSpec {
                    gpu_models: vec!["x".repeat(97)],
                    ..raw()
                },
                "gpu_models: at most 16 models of at most 96",
            ),
            (
                RawJobSpec {
                    gpu_models: vec!["H100\n".into()],
                    ..raw()
                },
                "printable characters",
            ),
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
            (
                RawJobSpec {
                    max_runtime_secs: u64::MAX,
                    ..raw()
                },
                "max_runtime_secs must be at most",
            ),
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
            wait: None,
            submitted_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            instances: states
                .iter()
                .enumerate()
                .map(|(rank, s)| Instance {
                    node_id: "n".into(),
                    state: *s,
                    reason: "why".into(),
                    ..Instance::scheduled(format!("j-{rank}"), rank as u32, 0)
                })
                .collect(),
            stop_cause: None,
            retries: 0,
            access_token: String::new(),
            pending: Vec::new(),
            restarts: 0,
            rollout: Vec::new(),
            not_before_ms: 0,
            drains: 0,
            drained_from: None,
            preemptions: 0,
            preempted_by: None,
            last_preempted_by: String::new(),
            pruned_instances: 0,
            gave_up: None,
            failures: 0,
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

/// A plausible OCI image reference: `[registry/]repo[:tag][@sha256:hex]`,
/// lower-case repository path, no spaces. The agent parses it for real.
pub fn check_image_reference(image: &str) -> Result<(), SpecError> {
    let bad = |why| Err(SpecError::BadImage(image.to_string(), why));
    if image.len() > 512 {
        return bad("longer than 512 characters");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains spaces");
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some(hex) = d.strip_prefix("sha256:") else {
            return bad("only sha256 digests");
        };
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return bad("a sha256 digest is 64 lower-case hex digits");
        }
    }
    // The tag is after the last ':' that follows the last '/'.
    let last = name.rsplit('/').next().unwrap_or(name);
    let (repo_last, tag) = match last.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (last, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return bad("a tag is 1..128 of [A-Za-z0-9_.-]");
    }
    let path = &name[..name.len() - last.len()];
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    parts.push(repo_last);
    // The first part may be a registry host[:port].
    let repo = if parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
    {
        &parts[1..]
    } else {
        &parts[..]
    };
    if repo.is_empty()
        || repo.iter().any(|p| {
            p.is_empty()
                || !p.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')
                })
        })
    {
        return bad("a repository path is lower-case [a-z0-9._-] parts");
    }
    Ok(())
}
