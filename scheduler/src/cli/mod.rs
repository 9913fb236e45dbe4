//! `gpupool`: the command-line client of the scheduler's gRPC API.
//!
//! One subcommand per user-facing RPC (`node`, `pool`, `spec`, `usage`,
//! `order`, `bill`, `job`, `tenant`, `whoami`), global `--addr`, `--token` and
//! `--output table|json` flags. Values are only parsed here; the scheduler validates them and its
//! gRPC status is reported as `error: <message> (<code>)` with exit code 1.
//!
//! With `--output json` every command prints one pretty-printed JSON value
//! built by the converters of [`json`] (jobs, nodes, pools... with
//! snake_case keys, readable enum names and `*_ms` timestamps); list
//! commands print an array, except `usage` which prints
//! `{"records": [...], "total_micros": N}` (and `usage --csv` prints RFC 4180
//! CSV whatever `--output` says). `bill` prints the bill's object, `tenant token` prints
//! `{"tenant", "token"}`, `whoami` prints `{"tenant", "admin"}` and
//! `pool scale-in-plan` an array of picks.

mod args;
mod billing;
mod format;
mod json;
mod tenant;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gpupool_proto::v1::{
    self as pb, job_service_client::JobServiceClient, node_service_client::NodeServiceClient,
    pool_service_client::PoolServiceClient, tenant_service_client::TenantServiceClient,
    usage_service_client::UsageServiceClient,
};
use serde_json::Value;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use self::args::{DEFAULT_ADDR, normalize_addr, parse_cpu, parse_env, parse_memory};
pub use self::billing::{BillArgs, OrderCommand, RollupArg, UsageArgs};
use self::format::{
    Details, Table, billing_mode_name, dash, format_age, format_command, format_mib, format_micros,
    format_milli, format_time, format_time_ago, instance_state_name, job_kind_name, job_state_name,
    node_status_name, now_ms, pool_status_name, pool_type_name, ts_ms,
};
pub use self::tenant::TenantCommand;

/// Runs the `gpupool` command line: parses the arguments, runs the command on
/// its own tokio runtime and returns the process exit code (0 on success, 1
/// on an error, 2 on a usage error).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&CliError::Message(format!("cannot start the runtime: {e}")));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::from(1)
        }
    }
}

/// Prints `error: ...` on stderr.
fn report(e: &CliError) {
    let _ = writeln!(std::io::stderr(), "error: {e}");
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Command-line client of the gpupool GPU cluster manager.
#[derive(Debug, Parser)]
#[command(name = "gpupool", version, propagate_version = true)]
pub struct Cli {
    /// Scheduler address: `http://host:port` or `host:port`; several
    /// replicas comma-separated (the leader among them is used).
    #[arg(long, global = true, env = "GPUPOOL_ADDR", default_value = DEFAULT_ADDR, value_name = "URL")]
    pub addr: String,
    /// API token, sent as `authorization: Bearer <token>` with every request.
    #[arg(long, global = true, env = "GPUPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA (PEM) that signed the scheduler's certificate, for `https://`
    /// addresses.
    #[arg(long, global = true, env = "GPUPOOL_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        long,
        global = true,
        env = "GPUPOOL_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(
        long,
        global = true,
        env = "GPUPOOL_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns or `Key: value` lines.
    Table,
    /// One pretty-printed JSON value.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// GPU nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Resource pools (public, dedicated train and deploy pools).
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Node specs (flavors) and their free capacity.
    Spec {
        #[command(subcommand)]
        command: SpecCommand,
    },
    /// Metered usage records, by hour or rolled up by day or month.
    Usage(UsageArgs),
    /// Subscription orders and refunds.
    Order {
        #[command(subcommand)]
        command: OrderCommand,
    },
    /// A tenant's bill for one calendar month.
    Bill(BillArgs),
    /// Jobs: notebooks, training, tensorboards, online and batch services.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Notebooks (submit with `gpupool job submit --kind notebook`).
    Notebook {
        #[command(subcommand)]
        command: NotebookCommand,
    },
    /// TensorBoards for training jobs' logs.
    Tensorboard {
        #[command(subcommand)]
        command: TensorboardCommand,
    },
    /// Online services: endpoints, scaling, rolling restarts.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Tenants, their API tokens and quotas (admin only).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Show which tenant the token belongs to.
    Whoami,
}

/// `gpupool node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    List {
        /// Only the nodes of this pool (id or name).
        #[arg(long)]
        pool: Option<String>,
    },
    /// Show one node and its GPUs.
    Get {
        /// Node id.
        node_id: String,
    },
    /// Stop placing new work on a node.
    Cordon {
        /// Node id.
        node_id: String,
    },
    /// Allow new work on a cordoned node again.
    Uncordon {
        /// Node id.
        node_id: String,
    },
    /// Revoke a node's credential: its session ends, its instances are
    /// Lost, and it cannot register again until readmitted (admin).
    Revoke {
        /// Node id.
        node_id: String,
    },
    /// Let a revoked node enrol again with the join token (admin).
    Readmit {
        /// Node id.
        node_id: String,
    },
}

/// `gpupool pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List pools.
    List {
        /// Also list deleted pools.
        #[arg(long)]
        all: bool,
    },
    /// Show one pool.
    Get {
        /// Pool id or name.
        pool: String,
    },
    /// List the nodes of a pool.
    Nodes {
        /// Pool id or name.
        pool: String,
    },
    /// Create a dedicated pool.
    Create(PoolCreateArgs),
    /// Delete a pool (asks for confirmation unless --yes).
    Delete {
        /// Pool id or name.
        pool: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Add nodes to a pool.
    ScaleOut {
        /// Pool id or name.
        pool: String,
        /// Number of nodes to add.
        #[arg(long, value_name = "N")]
        count: u32,
    },
    /// Remove exactly these nodes from a pool (see `scale-in-plan` for which
    /// to pick).
    ScaleIn {
        /// Pool id or name.
        pool: String,
        /// Node ids to remove.
        #[arg(value_name = "NODE_ID", required = true, num_args = 1..)]
        node_ids: Vec<String>,
        /// Stop the instances running on the removed nodes instead of
        /// refusing.
        #[arg(long)]
        force: bool,
    },
    /// Show which nodes to remove to shrink a pool, least disruptive first
    /// (changes nothing).
    ScaleInPlan {
        /// Pool id or name.
        pool: String,
        /// Number of nodes to remove.
        #[arg(long, value_name = "N")]
        count: u32,
    },
    /// Convert an on-demand pool to a subscription.
    Convert {
        /// Pool id or name.
        pool: String,
        /// Subscription length in months.
        #[arg(long)]
        months: u32,
        /// Renew the subscription automatically.
        #[arg(long)]
        auto_renew: bool,
    },
    /// Change the renewal settings of a subscription pool; settings not given
    /// keep their current values.
    Renewal {
        /// Pool id or name.
        pool: String,
        /// Renew the subscription automatically.
        #[arg(long, value_name = "BOOL")]
        auto_renew: Option<bool>,
        /// Switch to on-demand billing when the subscription ends.
        #[arg(long, value_name = "BOOL")]
        convert_at_expiry: Option<bool>,
    },
    /// End a subscription early: refund and delete the pool (asks for
    /// confirmation unless --yes).
    Unsubscribe {
        /// Pool id or name.
        pool: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Arguments of `gpupool pool create`.
#[derive(Debug, Args)]
pub struct PoolCreateArgs {
    /// Pool type.
    #[arg(long = "type", value_enum)]
    pub pool_type: PoolTypeArg,
    /// Pool name.
    #[arg(long)]
    pub name: String,
    /// Node spec (see `gpupool spec list`).
    #[arg(long)]
    pub spec: String,
    /// Number of nodes.
    #[arg(long, value_name = "K")]
    pub nodes: u32,
    /// Free-form description.
    #[arg(long)]
    pub description: Option<String>,
    /// Availability zone of a deploy pool: random, AZ1, AZ2 or AZ3.
    #[arg(long)]
    pub az: Option<String>,
    /// Billing mode (default: subscription when --months is given, else
    /// on-demand).
    #[arg(long, value_enum)]
    pub billing: Option<BillingArg>,
    /// Subscription length in months.
    #[arg(long)]
    pub months: Option<u32>,
    /// Renew the subscription automatically.
    #[arg(long)]
    pub auto_renew: bool,
    /// Region (subscription availability).
    #[arg(long)]
    pub region: Option<String>,
    /// Custom network: VPC id.
    #[arg(long)]
    pub vpc: Option<String>,
    /// Custom network: subnet id.
    #[arg(long)]
    pub subnet: Option<String>,
    /// Custom network: security group id (repeatable).
    #[arg(long = "security-group", value_name = "ID")]
    pub security_groups: Vec<String>,
}

/// `--type` of `pool create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolTypeArg {
    /// Development and training: notebooks, training, tensorboards.
    Train,
    /// Deployment: online and batch services.
    Deploy,
}

/// `--billing` of `pool create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BillingArg {
    /// Pay per hour.
    OnDemand,
    /// Pay for months in advance.
    Subscription,
}

/// `gpupool spec ...`
#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// List node specs with their free capacity.
    List,
}

/// `gpupool notebook ...`
#[derive(Debug, Subcommand)]
pub enum NotebookCommand {
    /// Start a notebook (the kind's command, JupyterLab by default); what
    /// is not given comes from the kind's settings (`gpupool job kinds`).
    Start {
        /// Pool id or name (default: public).
        #[arg(long)]
        pool: Option<String>,
        /// Whole GPUs.
        #[arg(long, default_value_t = 0)]
        gpus: i32,
        /// A fraction of one GPU in thousandths (250 = a quarter).
        #[arg(long, value_name = "M", default_value_t = 0)]
        gpu_milli: i32,
        /// CPU: cores (`2`) or millicores (`500m`).
        #[arg(long, value_name = "CPU", value_parser = parse_cpu, default_value = "0", hide_default_value = true)]
        cpu: i64,
        /// Memory: `4GiB`, `512MiB`.
        #[arg(long, value_name = "MEM", value_parser = parse_memory, default_value = "0", hide_default_value = true)]
        memory: i64,
        /// Stop after this long idle (default: the kind's).
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Job name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a running notebook's URL (with its access token).
    Open {
        /// Job id.
        job_id: String,
    },
}

/// `gpupool tensorboard ...`
#[derive(Debug, Subcommand)]
pub enum TensorboardCommand {
    /// Start a TensorBoard for a training job's log directory (in its
    /// pool) or for a path.
    Start {
        /// Training job whose `--log-dir` to serve.
        #[arg(long = "job", value_name = "JOB", required_unless_present = "logdir")]
        job: Option<String>,
        /// Directory to serve (default: the training job's `--log-dir`).
        #[arg(long = "log-dir", visible_alias = "logdir", value_name = "DIR")]
        logdir: Option<String>,
        /// CPU: cores (`2`) or millicores (`500m`) (default: the kind's).
        #[arg(long, value_name = "CPU", value_parser = parse_cpu, default_value = "0", hide_default_value = true)]
        cpu: i64,
        /// Memory: `4GiB`, `512MiB` (default: the kind's).
        #[arg(long, value_name = "MEM", value_parser = parse_memory, default_value = "0", hide_default_value = true)]
        memory: i64,
        /// Pool id or name (default: the training job's, else public).
        #[arg(long)]
        pool: Option<String>,
        /// Stop after this long without a connection (default: the kind's).
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Job name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a running TensorBoard's URL.
    Open {
        /// Job id.
        job_id: String,
    },
}

/// `gpupool service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// List the ready replicas' addresses (host:port).
    Endpoints {
        /// Job id of the online service.
        job_id: String,
    },
    /// Set the number of replicas.
    Scale {
        /// Job id of the online service.
        job_id: String,
        /// Replicas wanted.
        #[arg(long)]
        replicas: u32,
    },
    /// Restart every replica in turn, keeping all but one ready.
    Restart {
        /// Job id of the online service.
        job_id: String,
    },
}

/// `gpupool job ...`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show each kind's defaults and limits (resources, run time, idle
    /// timeout) as the operator configured them.
    Kinds,
    /// Submit a job: `gpupool job submit [OPTIONS] -- COMMAND ARGS...`
    Submit(Box<SubmitArgs>),
    /// List jobs.
    List {
        /// Only the jobs of this pool (id or name).
        #[arg(long)]
        pool: Option<String>,
        /// Only jobs in these states (repeatable or comma-separated).
        #[arg(long = "state", value_enum, value_delimiter = ',', ignore_case = true)]
        states: Vec<JobStateArg>,
    },
    /// Show one job and its instances.
    Get {
        /// Job id.
        job_id: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        job_id: String,
    },
    /// Print an instance's log.
    Logs {
        /// Job id.
        job_id: String,
        /// Instance rank.
        #[arg(long, default_value_t = 0)]
        instance: u32,
        /// Keep streaming until the instance ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// Arguments of `gpupool job submit`. Ranges are checked by the scheduler,
/// so negative numbers are passed through.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Job name.
    #[arg(long)]
    pub name: Option<String>,
    /// Job kind.
    #[arg(long, value_enum, default_value_t = KindArg::Training)]
    pub kind: KindArg,
    /// Pool id or name (default: the public pool).
    #[arg(long)]
    pub pool: Option<String>,
    /// Whole GPUs per instance.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub gpus: i32,
    /// A fraction of one GPU per instance, in thousandths (1..999).
    #[arg(
        long,
        value_name = "MILLI",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub gpu_milli: i32,
    /// Allowed GPU model (repeatable; default: any).
    #[arg(long = "gpu-model", value_name = "MODEL")]
    pub gpu_models: Vec<String>,
    /// No GPU, even when the kind's default has one (notebooks).
    #[arg(long)]
    pub cpu_only: bool,
    /// CPU per instance: cores (`2`, `0.5`) or millicores (`500m`);
    /// default: the kind's (`gpupool job kinds`).
    #[arg(long, value_name = "CPU", value_parser = parse_cpu, default_value = "0", hide_default_value = true, allow_hyphen_values = true)]
    pub cpu: i64,
    /// Memory per instance: `512MiB`, `4GiB`, `1.5GiB`, `2G`, `1024M`; a
    /// plain number is MiB; default: the kind's.
    #[arg(long, value_name = "MEM", value_parser = parse_memory, default_value = "0", hide_default_value = true, allow_hyphen_values = true)]
    pub memory: i64,
    /// Training workers or service replicas.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub instances: i32,
    /// Environment variable (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the command: a path relative to the tenant's
    /// directory on the node (where it is created); default: a fresh one
    /// per instance. An image job sees it at /work.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run in this OCI image (`registry/repo:tag` or `...@sha256:...`),
    /// pulled by the node; the command (optional then) replaces the image's
    /// cmd. Default: a host process, or the kind's image.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// Image jobs' network: `none` (loopback only) or `host`; default: host
    /// for jobs that serve a port or run several instances, else none.
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// Scheduling priority.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Maximum run time in seconds (default: the kind's default).
    #[arg(long, value_name = "SECS")]
    pub max_runtime: Option<u64>,
    /// Restarts allowed after a failure or crash.
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// Service port inside the instance (online services).
    #[arg(long)]
    pub port: Option<u32>,
    /// Completions needed (batch services; `--instances` run at a time).
    #[arg(long, value_name = "N")]
    pub completions: Option<u32>,
    /// Readiness check of online service replicas: HTTP GET of this path
    /// on `$PORT`, ready on 2xx/3xx.
    #[arg(long, value_name = "PATH", conflicts_with = "health_tcp")]
    pub health_http: Option<String>,
    /// Readiness check: a TCP connection to `$PORT` accepted.
    #[arg(long)]
    pub health_tcp: bool,
    /// Health check period in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub health_interval_ms: u32,
    /// Consecutive failed checks that make a replica unready.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub health_failures: u32,
    /// Notebooks and TensorBoards: stop after this long idle (default: the
    /// kind's).
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Training: TensorBoard log directory (exported as GPUPOOL_LOG_DIR).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<String>,
    /// The command to run and its arguments (after `--`).
    #[arg(value_name = "COMMAND", trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// `--kind` of `job submit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Interactive notebook.
    Notebook,
    /// Training (one or more workers).
    Training,
    /// TensorBoard.
    Tensorboard,
    /// Online service (replicas serving a port).
    OnlineService,
    /// Batch service (runs to a number of completions).
    BatchService,
}

impl KindArg {
    fn proto(self) -> pb::JobKind {
        match self {
            KindArg::Notebook => pb::JobKind::Notebook,
            KindArg::Training => pb::JobKind::Training,
            KindArg::Tensorboard => pb::JobKind::Tensorboard,
            KindArg::OnlineService => pb::JobKind::OnlineService,
            KindArg::BatchService => pb::JobKind::BatchService,
        }
    }
}

/// `--state` of `job list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JobStateArg {
    Queued,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
    Unavailable,
}

impl JobStateArg {
    fn proto(self) -> pb::JobState {
        match self {
            JobStateArg::Queued => pb::JobState::Queued,
            JobStateArg::Scheduled => pb::JobState::Scheduled,
            JobStateArg::Running => pb::JobState::Running,
            JobStateArg::Succeeded => pb::JobState::Succeeded,
            JobStateArg::Failed => pb::JobState::Failed,
            JobStateArg::Cancelled => pb::JobState::Cancelled,
            JobStateArg::Lost => pb::JobState::Lost,
            JobStateArg::Unavailable => pb::JobState::Unavailable,
        }
    }
}

// ---------------------------------------------------------------------------
// Errors, connection, output
// ---------------------------------------------------------------------------

/// Why a command failed.
#[derive(Debug)]
enum CliError {
    /// The scheduler answered with an error status.
    Status(tonic::Status),
    /// No connection to the scheduler.
    Connect { addr: String, cause: String },
    /// Anything else, already worded for the user.
    Message(String),
}

/// The scheduler's errors name API fields; the CLI user typed flags.
fn in_flag_names(message: &str) -> String {
    const FLAGS: &[(&str, &str)] = &[
        ("gpu_milli", "--gpu-milli"),
        ("cpu_milli", "--cpu"),
        ("memory_mib", "--memory"),
        ("for_job", "--job"),
        ("max_runtime_secs", "--max-runtime"),
        ("idle_timeout_secs", "--idle-timeout"),
        ("max_retries", "--max-retries"),
        ("log_dir", "--log-dir"),
        ("health_check", "--health-http/--health-tcp"),
        ("working_dir", "--workdir"),
        ("node_count", "--nodes"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match FLAGS.iter().find(|(field, _)| *field == word.as_str()) {
            Some((_, flag)) => out.push_str(flag),
            None => out.push_str(word),
        }
        word.clear();
    };
    // Quoted text is left as it is: config fields in backticks, values
    // (ids, names, paths) in double quotes.
    let mut quoted: Option<char> = None;
    for c in message.chars() {
        if quoted.is_none() && (c.is_ascii_alphanumeric() || c == '_') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            if c == '`' || c == '"' {
                quoted = match quoted {
                    Some(q) if q == c => None,
                    None => Some(c),
                    other => other,
                };
            }
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Status(s)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Status(s) => {
                let message = if s.message().is_empty() {
                    s.code().description().to_string()
                } else {
                    in_flag_names(s.message())
                };
                write!(f, "{message} ({:?})", s.code())
            }
            CliError::Connect { addr, cause } => write!(f, "cannot connect to {addr}: {cause}"),
            CliError::Message(m) => f.write_str(m),
        }
    }
}

/// An error and its sources: `transport error: tcp connect error: ...`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Debug, Clone)]
struct BearerAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, BearerAuth>;

/// Largest response the CLI reads (lists of 10,000 nodes pass 4 MiB).
const MAX_RESPONSE: usize = 256 << 20;

/// Where and how to reach the scheduler.
#[derive(Debug)]
struct Conn {
    addr: String,
    token: Option<String>,
    tls: gpupool_common::tls::ClientTls,
}

impl Conn {
    async fn channel(&self) -> Result<(Channel, BearerAuth), CliError> {
        let auth = match &self.token {
            Some(token) => {
                let value = format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        CliError::Message(
                            "invalid token: it must be printable ASCII without newlines".into(),
                        )
                    })?;
                BearerAuth(Some(value))
            }
            None => BearerAuth(None),
        };
        // Several addresses (scheduler replicas): the first whose health
        // check says SERVING is the leader; standbys answer UNAVAILABLE.
        let addrs: Vec<String> = self
            .addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(normalize_addr)
            .collect();
        let mut failures = Vec::new();
        for addr in &addrs {
            let timeout = Duration::from_secs(if addrs.len() > 1 { 3 } else { 10 });
            let endpoint = self
                .tls
                .endpoint(addr, timeout)
                .map_err(|e| CliError::Message(format!("{e:#}")))?;
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    failures.push((addr.clone(), error_chain(&e)));
                    continue;
                }
            };
            if addrs.len() == 1 {
                return Ok((channel, auth));
            }
            let serving = tonic_health::pb::health_client::HealthClient::new(channel.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            match serving {
                Ok(r)
                    if r.get_ref().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving
                            as i32 =>
                {
                    return Ok((channel, auth));
                }
                Ok(_) => failures.push((addr.clone(), "not serving".into())),
                Err(s) => failures.push((addr.clone(), s.message().to_string())),
            }
        }
        let (addr, cause) = match &failures[..] {
            [(addr, cause)] => (addr.clone(), cause.clone()),
            _ => (
                self.addr.clone(),
                failures
                    .iter()
                    .map(|(a, c)| format!("{a}: {c}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        Err(CliError::Connect { addr, cause })
    }

    async fn jobs(&self) -> Result<JobServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(JobServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    async fn nodes(&self) -> Result<NodeServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(NodeServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    async fn pools(&self) -> Result<PoolServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(PoolServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    async fn usage(&self) -> Result<UsageServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(UsageServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    async fn tenants(&self) -> Result<TenantServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(TenantServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }
}

/// Writes to stdout; a closed pipe (`gpupool ... | head`) is not an error.
fn emit_bytes(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Message(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints the table text, or the JSON value (pretty, one value).
fn emit(
    output: OutputFormat,
    table: impl FnOnce() -> String,
    json: impl FnOnce() -> Value,
) -> Result<(), CliError> {
    let text = match output {
        OutputFormat::Table => table(),
        OutputFormat::Json => format!("{:#}\n", json()),
    };
    emit_bytes(text.as_bytes())
}

/// Asks the user to type the pool's name (or the id given) on the terminal.
async fn confirm_pool(
    pools: &mut PoolServiceClient<Svc>,
    pool: &str,
    action: &str,
) -> Result<(), CliError> {
    let p = pools
        .get_pool(pb::GetPoolRequest {
            pool: pool.to_string(),
        })
        .await?
        .into_inner();
    let prompt = format!(
        "{action} pool {} ({}). This cannot be undone.\nType the pool name to confirm: ",
        p.name, p.pool_id
    );
    let mut stderr = std::io::stderr();
    let _ = stderr
        .write_all(prompt.as_bytes())
        .and_then(|()| stderr.flush());
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Message(format!("cannot read the confirmation: {e}")))?;
    let typed = line.trim();
    if !typed.is_empty() && (typed == p.name || typed == pool || typed == p.pool_id) {
        Ok(())
    } else {
        Err(CliError::Message(format!(
            "confirmation did not match the pool name `{}`; nothing done",
            p.name
        )))
    }
}

/// Refuses to prompt when stdin is not a terminal and `--yes` was not given.
fn require_terminal(yes: bool, pool: &str, action: &str) -> Result<(), CliError> {
    if yes || std::io::stdin().is_terminal() {
        Ok(())
    } else {
        Err(CliError::Message(format!(
            "refusing to {action} pool `{pool}` without confirmation: stdin is not a terminal; pass --yes to confirm"
        )))
    }
}

fn opt(s: Option<String>) -> String {
    s.unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

async fn run(cli: Cli) -> Result<(), CliError> {
    let conn = Conn {
        addr: cli.addr.clone(),
        token: cli.token.filter(|t| !t.is_empty()),
        tls: gpupool_common::tls::ClientTls {
            ca_file: cli.tls_ca.clone(),
            cert_file: cli.tls_cert.clone(),
            key_file: cli.tls_key.clone(),
            domain: None,
        },
    };
    let out = cli.output;
    match cli.command {
        Command::Node { command } => node_command(&conn, out, command).await,
        Command::Pool { command } => pool_command(&conn, out, command).await,
        Command::Spec {
            command: SpecCommand::List,
        } => spec_list(&conn, out).await,
        Command::Usage(args) => billing::usage_command(&conn, out, args).await,
        Command::Order { command } => billing::order_command(&conn, out, command).await,
        Command::Bill(args) => billing::bill_command(&conn, out, args).await,
        Command::Job { command } => job_command(&conn, out, command).await,
        Command::Notebook {
            command: NotebookCommand::Open { job_id },
        }
        | Command::Tensorboard {
            command: TensorboardCommand::Open { job_id },
        } => open_url(&conn, out, job_id).await,
        Command::Notebook {
            command:
                NotebookCommand::Start {
                    pool,
                    gpus,
                    gpu_milli,
                    cpu,
                    memory,
                    idle_timeout,
                    name,
                },
        } => {
            let spec = pb::JobSpec {
                name: opt(name),
                kind: pb::JobKind::Notebook as i32,
                pool: opt(pool),
                instances: 1,
                resources: Some(pb::Resources {
                    gpus,
                    gpu_milli,
                    cpu_milli: cpu,
                    memory_mib: memory,
                    ..Default::default()
                }),
                idle_timeout_secs: idle_timeout.unwrap_or(0),
                ..Default::default()
            };
            start_interactive(&conn, out, spec, "notebook").await
        }
        Command::Tensorboard {
            command:
                TensorboardCommand::Start {
                    job,
                    logdir,
                    cpu,
                    memory,
                    pool,
                    idle_timeout,
                    name,
                },
        } => {
            let spec = pb::JobSpec {
                name: opt(name),
                kind: pb::JobKind::Tensorboard as i32,
                pool: opt(pool),
                instances: 1,
                resources: Some(pb::Resources {
                    cpu_milli: cpu,
                    memory_mib: memory,
                    ..Default::default()
                }),
                idle_timeout_secs: idle_timeout.unwrap_or(0),
                log_dir: opt(logdir),
                for_job: opt(job),
                ..Default::default()
            };
            start_interactive(&conn, out, spec, "tensorboard").await
        }
        Command::Service { command } => service_command(&conn, out, command).await,
        Command::Tenant { command } => tenant::tenant_command(&conn, out, command).await,
        Command::Whoami => tenant::whoami(&conn, out).await,
    }
}

// --- nodes -----------------------------------------------------------------

/// Submits a notebook or TensorBoard and says how to open it.
async fn start_interactive(
    conn: &Conn,
    out: OutputFormat,
    spec: pb::JobSpec,
    what: &str,
) -> Result<(), CliError> {
    let j = conn
        .jobs()
        .await?
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await?
        .into_inner();
    emit(
        out,
        || {
            format!(
                "{what} {} started ({}); `gpupool {what} open {}` prints its URL\n",
                j.job_id,
                job_state_name(j.state),
                j.job_id
            )
        },
        || json::job(&j),
    )
}

/// Every item of a paginated list call: `fetch(page_token)` answers one
/// page and the next page's token (empty after the last).
async fn every_page<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = fetch(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Every node (of `pool`, or all), page after page.
async fn all_nodes(
    nodes: &NodeServiceClient<Svc>,
    pool: String,
) -> Result<Vec<pb::Node>, CliError> {
    every_page(|page_token| {
        let (mut nodes, pool) = (nodes.clone(), pool.clone());
        async move {
            let page = nodes
                .list_nodes(pb::ListNodesRequest {
                    pool,
                    page_size: 0,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.nodes, page.next_page_token))
        }
    })
    .await
}

async fn node_command(
    conn: &Conn,
    out: OutputFormat,
    command: NodeCommand,
) -> Result<(), CliError> {
    let mut nodes = conn.nodes().await?;
    let now = now_ms();
    match command {
        NodeCommand::List { pool } => {
            let list = all_nodes(&nodes, opt(pool)).await?;
            emit(out, || node_table(&list), || json::nodes(&list))
        }
        NodeCommand::Get { node_id } => {
            let n = nodes
                .get_node(pb::GetNodeRequest { node_id })
                .await?
                .into_inner();
            emit(out, || node_detail(&n, now), || json::node(&n))
        }
        NodeCommand::Cordon { node_id } => {
            let n = nodes
                .cordon_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || format!("node {} cordoned\n", n.node_id),
                || json::node(&n),
            )
        }
        NodeCommand::Uncordon { node_id } => {
            let n = nodes
                .uncordon_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || format!("node {} uncordoned\n", n.node_id),
                || json::node(&n),
            )
        }
        NodeCommand::Revoke { node_id } => {
            let n = nodes
                .revoke_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "node {} revoked: its credential no longer works; `gpupool node readmit {}` lets it enrol again\n",
                        n.node_id, n.node_id
                    )
                },
                || json::node(&n),
            )
        }
        NodeCommand::Readmit { node_id } => {
            let n = nodes
                .readmit_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "node {} readmitted: it may enrol again with the join token\n",
                        n.node_id
                    )
                },
                || json::node(&n),
            )
        }
    }
}

fn node_status_text(n: &pb::Node) -> String {
    let mut status = node_status_name(n.status).to_string();
    if n.cordoned {
        status.push_str(",Cordoned");
    }
    if n.revoked {
        status.push_str(",Revoked");
    }
    status
}

fn node_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&[
        "node", "hostname", "status", "pool", "spec", "gpus", "cpu", "memory", "az",
    ]);
    for n in nodes {
        let inv = n.inventory.clone().unwrap_or_default();
        t.row(vec![
            n.node_id.clone(),
            inv.hostname.clone(),
            node_status_text(n),
            n.pool.clone(),
            n.spec.clone(),
            format!(
                "{}/{}",
                format_milli(i64::from(n.gpus_allocated_milli)),
                inv.gpus.len()
            ),
            format!("{}/{}", format_milli(n.cpu_allocated_milli), inv.cpu_cores),
            format!(
                "{}/{}",
                format_mib(n.memory_allocated_mib),
                format_mib(i64::try_from(inv.memory_mib).unwrap_or(i64::MAX))
            ),
            inv.az.clone(),
        ]);
    }
    t.render()
}

fn node_detail(n: &pb::Node, now: i64) -> String {
    let inv = n.inventory.clone().unwrap_or_default();
    let mut d = Details::default();
    d.add("Node", &n.node_id);
    d.add("Hostname", &inv.hostname);
    d.add("Status", node_status_name(n.status));
    d.add("Cordoned", n.cordoned.to_string());
    if n.revoked {
        d.add(
            "Revoked",
            "true (gpupool node readmit to let it enrol again)".to_string(),
        );
    }
    d.add("Pool", &n.pool);
    d.add("Spec", &n.spec);
    d.add("AZ", &inv.az);
    d.add(
        "GPUs",
        format!(
            "{}/{} allocated{}",
            format_milli(i64::from(n.gpus_allocated_milli)),
            inv.gpus.len(),
            if inv.fake_gpus { " (fake)" } else { "" }
        ),
    );
    d.add(
        "CPU",
        format!(
            "{}/{} cores allocated",
            format_milli(n.cpu_allocated_milli),
            inv.cpu_cores
        ),
    );
    d.add("CPU model", &inv.cpu_model);
    d.add(
        "Memory",
        format!(
            "{}/{} allocated",
            format_mib(n.memory_allocated_mib),
            format_mib(i64::try_from(inv.memory_mib).unwrap_or(i64::MAX))
        ),
    );
    d.add(
        "OS",
        format!("{} {}", inv.os, inv.kernel).trim().to_string(),
    );
    let mut labels: Vec<String> = inv.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    d.add("Labels", labels.join(","));
    d.add(
        "Last heartbeat",
        format_time_ago(ts_ms(n.last_heartbeat.as_ref()), now),
    );
    d.add(
        "Registered",
        format_time_ago(ts_ms(n.registered_at.as_ref()), now),
    );
    d.add("Instances", n.instance_ids.join(","));
    let mut text = d.render();
    if !inv.gpus.is_empty() {
        let mut t = Table::new(&[
            "index",
            "model",
            "memory",
            "healthy",
            "allocated",
            "util",
            "uuid",
            "reason",
        ]);
        for g in &inv.gpus {
            t.row(vec![
                g.index.to_string(),
                g.model.clone(),
                format_mib(i64::try_from(g.memory_total_mib).unwrap_or(i64::MAX)),
                if g.healthy { "yes" } else { "no" }.to_string(),
                format_milli(i64::from(json::allocated_milli(n, g))),
                format!("{}%", g.utilization_pct),
                g.uuid.clone(),
                g.health_reason.clone(),
            ]);
        }
        text.push('\n');
        text.push_str(&t.render());
    }
    text
}

// --- pools -----------------------------------------------------------------

async fn pool_command(
    conn: &Conn,
    out: OutputFormat,
    command: PoolCommand,
) -> Result<(), CliError> {
    let now = now_ms();
    match command {
        PoolCommand::List { all } => {
            let pools = conn.pools().await?;
            let list = every_page(|page_token| {
                let mut pools = pools.clone();
                async move {
                    let page = pools
                        .list_pools(pb::ListPoolsRequest {
                            include_deleted: all,
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.pools, page.next_page_token))
                }
            })
            .await?;
            emit(out, || pool_table(&list), || json::pools(&list))
        }
        PoolCommand::Get { pool } => {
            let p = conn
                .pools()
                .await?
                .get_pool(pb::GetPoolRequest { pool })
                .await?
                .into_inner();
            emit(out, || pool_detail(&p, now), || json::pool(&p))
        }
        PoolCommand::Nodes { pool } => {
            let p = conn
                .pools()
                .await?
                .get_pool(pb::GetPoolRequest { pool })
                .await?
                .into_inner();
            let list = all_nodes(&conn.nodes().await?, p.pool_id).await?;
            emit(out, || node_table(&list), || json::nodes(&list))
        }
        PoolCommand::Create(a) => {
            let req = create_pool_request(a);
            let p = conn.pools().await?.create_pool(req).await?.into_inner();
            emit(out, || pool_summary(&p, "created"), || json::pool(&p))
        }
        PoolCommand::Delete { pool, yes } => {
            require_terminal(yes, &pool, "delete")?;
            let mut pools = conn.pools().await?;
            if !yes {
                confirm_pool(&mut pools, &pool, "Delete").await?;
            }
            let p = pools
                .delete_pool(pb::DeletePoolRequest {
                    pool,
                    confirm: true,
                })
                .await?
                .into_inner();
            emit(out, || pool_summary(&p, "deleted"), || json::pool(&p))
        }
        PoolCommand::ScaleOut { pool, count } => {
            scale_pool(conn, out, scale_out_request(pool, count), "scaling out").await
        }
        PoolCommand::ScaleIn {
            pool,
            node_ids,
            force,
        } => {
            let req = scale_in_request(pool, node_ids, force);
            scale_pool(conn, out, req, "scaling in").await
        }
        PoolCommand::ScaleInPlan { pool, count } => {
            let picks = conn
                .pools()
                .await?
                .scale_in_plan(pb::ScaleInPlanRequest { pool, count })
                .await?
                .into_inner()
                .picks;
            emit(
                out,
                || scale_in_plan_text(&picks),
                || json::scale_in_picks(&picks),
            )
        }
        PoolCommand::Convert {
            pool,
            months,
            auto_renew,
        } => {
            let p = conn
                .pools()
                .await?
                .convert_to_subscription(pb::ConvertToSubscriptionRequest {
                    pool,
                    months,
                    auto_renew,
                })
                .await?
                .into_inner();
            emit(
                out,
                || pool_summary(&p, "converted to a subscription"),
                || json::pool(&p),
            )
        }
        PoolCommand::Renewal {
            pool,
            auto_renew,
            convert_at_expiry,
        } => {
            let mut pools = conn.pools().await?;
            let (auto_renew, convert) = match (auto_renew, convert_at_expiry) {
                (Some(a), Some(c)) => (a, c),
                (a, c) => {
                    let current = pools
                        .get_pool(pb::GetPoolRequest { pool: pool.clone() })
                        .await?
                        .into_inner()
                        .subscription
                        .unwrap_or_default();
                    (
                        a.unwrap_or(current.auto_renew),
                        c.unwrap_or(current.convert_to_on_demand_at_expiry),
                    )
                }
            };
            let p = pools
                .set_renewal(pb::SetRenewalRequest {
                    pool,
                    auto_renew,
                    convert_to_on_demand_at_expiry: convert,
                })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    let s = p.subscription.unwrap_or_default();
                    format!(
                        "pool {} ({}): auto-renew {}, convert to on-demand at expiry {}\n",
                        p.name, p.pool_id, s.auto_renew, s.convert_to_on_demand_at_expiry
                    )
                },
                || json::pool(&p),
            )
        }
        PoolCommand::Unsubscribe { pool, yes } => {
            require_terminal(yes, &pool, "unsubscribe")?;
            let mut pools = conn.pools().await?;
            if !yes {
                confirm_pool(&mut pools, &pool, "Unsubscribe (refund and delete)").await?;
            }
            let r = pools
                .unsubscribe(pb::UnsubscribeRequest {
                    pool: pool.clone(),
                    confirm: true,
                })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    let name = r.pool.as_ref().map_or(pool.clone(), |p| {
                        format!(
                            "{} ({}) is {}",
                            p.name,
                            p.pool_id,
                            pool_status_name(p.status)
                        )
                    });
                    format!(
                        "pool {name}: unsubscribed, refund {}\n",
                        format_micros(r.refund_micros)
                    )
                },
                || json::unsubscribe(&r),
            )
        }
    }
}

/// Sends a `ScalePool` request and prints the pool.
async fn scale_pool(
    conn: &Conn,
    out: OutputFormat,
    req: pb::ScalePoolRequest,
    verb: &str,
) -> Result<(), CliError> {
    let p = conn.pools().await?.scale_pool(req).await?.into_inner();
    emit(
        out,
        || pool_summary(&p, &format!("{verb}, nodes {}", pool_nodes(&p))),
        || json::pool(&p),
    )
}

/// `pool scale-out POOL --count N`.
fn scale_out_request(pool: String, count: u32) -> pb::ScalePoolRequest {
    pb::ScalePoolRequest {
        pool,
        change: Some(pb::scale_pool_request::Change::AddNodes(count)),
        force: false,
    }
}

/// `pool scale-in POOL NODE_ID... [--force]`.
fn scale_in_request(pool: String, node_ids: Vec<String>, force: bool) -> pb::ScalePoolRequest {
    pb::ScalePoolRequest {
        pool,
        change: Some(pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds {
            node_ids,
        })),
        force,
    }
}

/// The scale-in plan: one row per pick, then each pick's explanation.
fn scale_in_plan_text(picks: &[pb::ScaleInPick]) -> String {
    let mut t = Table::new(&[
        "rank",
        "node",
        "disrupted",
        "jobs",
        "free gpus",
        "pool free after",
        "fragmented after",
    ]);
    for (i, p) in picks.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            p.node_id.clone(),
            p.instances_disrupted.to_string(),
            p.job_ids.join(","),
            p.free_gpus.to_string(),
            p.pool_free_gpus_after.to_string(),
            p.pool_fragmented_gpus_after.to_string(),
        ]);
    }
    let mut text = t.render();
    for (i, p) in picks.iter().enumerate() {
        text.push_str(&format!("  {}. {}\n", i + 1, dash(&p.explanation)));
    }
    text
}

fn create_pool_request(a: PoolCreateArgs) -> pb::CreatePoolRequest {
    let billing = a.billing.unwrap_or(if a.months.is_some() {
        BillingArg::Subscription
    } else {
        BillingArg::OnDemand
    });
    let subscription = (billing == BillingArg::Subscription || a.months.is_some() || a.auto_renew)
        .then(|| pb::Subscription {
            months: a.months.unwrap_or(0),
            auto_renew: a.auto_renew,
            ..Default::default()
        });
    let network =
        (a.vpc.is_some() || a.subnet.is_some() || !a.security_groups.is_empty()).then(|| {
            pb::Network {
                network: Some(pb::network::Network::Custom(pb::CustomNetwork {
                    vpc_id: a.vpc.unwrap_or_default(),
                    subnet_id: a.subnet.unwrap_or_default(),
                    security_group_ids: a.security_groups,
                })),
            }
        });
    pb::CreatePoolRequest {
        r#type: match a.pool_type {
            PoolTypeArg::Train => pb::PoolType::Train,
            PoolTypeArg::Deploy => pb::PoolType::Deploy,
        } as i32,
        name: a.name,
        description: opt(a.description),
        spec: a.spec,
        node_count: a.nodes,
        az: opt(a.az),
        network,
        billing_mode: match billing {
            BillingArg::OnDemand => pb::BillingMode::OnDemand,
            BillingArg::Subscription => pb::BillingMode::Subscription,
        } as i32,
        subscription,
        region: opt(a.region),
    }
}

/// `pool <name> (<id>) <verb> (<Status>)` plus the status reason.
fn pool_summary(p: &pb::Pool, verb: &str) -> String {
    let mut text = format!(
        "pool {} ({}) {verb} ({})",
        p.name,
        p.pool_id,
        pool_status_name(p.status)
    );
    if !p.status_reason.is_empty() {
        text.push_str(": ");
        text.push_str(&p.status_reason);
    }
    text.push('\n');
    text
}

fn pool_gpus(p: &pb::Pool) -> String {
    format!(
        "{}/{}",
        format_milli(i64::from(p.gpus_allocated_milli)),
        p.gpus_total
    )
}

/// The node count the pool is scaling to, when it differs from its current
/// one. A target of 0 counts only while the pool is Scaling: a scheduler
/// that does not fill the field in sends 0 too.
fn pool_target(p: &pb::Pool) -> Option<u32> {
    let target = p.target_node_count;
    let scaling = p.status == pb::PoolStatus::Scaling as i32;
    (target != p.node_count && (target != 0 || scaling)).then_some(target)
}

/// `ready/node_count`, with `→target` while the pool scales to another size.
fn pool_nodes(p: &pb::Pool) -> String {
    let mut text = format!("{}/{}", p.nodes_ready, p.node_count);
    if let Some(target) = pool_target(p) {
        text.push_str(&format!("→{target}"));
    }
    text
}

fn pool_az(p: &pb::Pool) -> String {
    match (p.az.as_str(), p.resolved_az.as_str()) {
        (asked, resolved) if asked == resolved || resolved.is_empty() => asked.to_string(),
        ("", resolved) => resolved.to_string(),
        (asked, resolved) => format!("{resolved} ({asked})"),
    }
}

fn pool_table(pools: &[pb::Pool]) -> String {
    let mut t = Table::new(&[
        "pool", "name", "type", "tenant", "spec", "nodes", "status", "billing", "az", "reason",
    ]);
    for p in pools {
        let az = if p.resolved_az.is_empty() {
            &p.az
        } else {
            &p.resolved_az
        };
        t.row(vec![
            p.pool_id.clone(),
            p.name.clone(),
            pool_type_name(p.r#type).to_string(),
            p.tenant.clone(),
            p.spec.clone(),
            pool_nodes(p),
            pool_status_name(p.status).to_string(),
            billing_mode_name(p.billing_mode).to_string(),
            az.clone(),
            p.status_reason.clone(),
        ]);
    }
    t.render()
}

fn pool_detail(p: &pb::Pool, now: i64) -> String {
    let mut d = Details::default();
    d.add("Pool", &p.pool_id);
    d.add("Name", &p.name);
    d.add("Type", pool_type_name(p.r#type));
    d.add("Status", pool_status_name(p.status));
    d.add("Status reason", &p.status_reason);
    d.add("Tenant", &p.tenant);
    d.add("Description", &p.description);
    d.add("Spec", &p.spec);
    let mut nodes = format!("{} ready / {}", p.nodes_ready, p.node_count);
    if let Some(target) = pool_target(p) {
        nodes.push_str(&format!(" (scaling to {target})"));
    }
    d.add("Nodes", nodes);
    d.add("GPUs", format!("{} allocated", pool_gpus(p)));
    d.add("AZ", pool_az(p));
    d.add("Region", &p.region);
    let network = match p.network.as_ref().and_then(|n| n.network.as_ref()) {
        Some(pb::network::Network::Custom(c)) => format!(
            "custom: vpc {}, subnet {}, security groups {}",
            dash(&c.vpc_id),
            dash(&c.subnet_id),
            dash(&c.security_group_ids.join(","))
        ),
        Some(pb::network::Network::Isolated(i)) => format!("isolated: {}", dash(&i.network_id)),
        None => String::new(),
    };
    d.add("Network", network);
    d.add("Billing", billing_mode_name(p.billing_mode));
    if let Some(s) = &p.subscription {
        d.add(
            "Months",
            format!("{} (billed {})", s.months, s.billed_months),
        );
        d.add("Auto-renew", s.auto_renew.to_string());
        d.add(
            "Convert at expiry",
            s.convert_to_on_demand_at_expiry.to_string(),
        );
        d.add(
            "Starts",
            ts_ms(s.starts_at.as_ref())
                .map(format_time)
                .unwrap_or_default(),
        );
        d.add(
            "Ends",
            ts_ms(s.ends_at.as_ref())
                .map(format_time)
                .unwrap_or_default(),
        );
    }
    d.add(
        "Created",
        format_time_ago(ts_ms(p.created_at.as_ref()), now),
    );
    if p.deleted_at.is_some() {
        d.add(
            "Deleted",
            format_time_ago(ts_ms(p.deleted_at.as_ref()), now),
        );
    }
    d.add("Node ids", p.node_ids.join(","));
    d.render()
}

// --- specs -----------------------------------------------------------------

async fn spec_list(conn: &Conn, out: OutputFormat) -> Result<(), CliError> {
    let specs = conn
        .pools()
        .await?
        .list_specs(pb::ListSpecsRequest {})
        .await?
        .into_inner()
        .specs;
    emit(
        out,
        || {
            let mut t = Table::new(&[
                "spec",
                "gpu model",
                "gpus",
                "cpu",
                "memory",
                "free nodes",
                "status",
            ]);
            for s in &specs {
                t.row(vec![
                    s.name.clone(),
                    s.gpu_model.clone(),
                    s.gpu_count.to_string(),
                    s.cpu_cores.to_string(),
                    format_mib(i64::try_from(s.memory_mib).unwrap_or(i64::MAX)),
                    format!("{}/{}", s.nodes_free, s.nodes_total),
                    if s.sold_out { "sold out" } else { "available" }.to_string(),
                ]);
            }
            t.render()
        },
        || json::specs(&specs),
    )
}

// --- jobs ------------------------------------------------------------------

async fn job_command(conn: &Conn, out: OutputFormat, command: JobCommand) -> Result<(), CliError> {
    let now = now_ms();
    match command {
        JobCommand::Kinds => {
            let kinds = conn
                .jobs()
                .await?
                .list_job_kinds(pb::ListJobKindsRequest {})
                .await?
                .into_inner();
            emit(out, || kinds_table(&kinds), || json::kinds(&kinds))
        }
        JobCommand::Submit(a) => {
            let spec = job_spec(*a);
            let j = conn
                .jobs()
                .await?
                .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    let mut text =
                        format!("job {} submitted ({})", j.job_id, job_state_name(j.state));
                    if !j.reason.is_empty() {
                        text.push_str(": ");
                        text.push_str(&j.reason);
                    }
                    text.push('\n');
                    text
                },
                || json::job(&j),
            )
        }
        JobCommand::List { pool, states } => {
            let jobs = conn.jobs().await?;
            let states: Vec<i32> = states.into_iter().map(|s| s.proto() as i32).collect();
            let pool = opt(pool);
            let list = every_page(|page_token| {
                let (mut jobs, pool, states) = (jobs.clone(), pool.clone(), states.clone());
                async move {
                    let page = jobs
                        .list_jobs(pb::ListJobsRequest {
                            pool,
                            states,
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.jobs, page.next_page_token))
                }
            })
            .await?;
            // Pools by name, as people named them.
            let pools = conn.pools().await?;
            let names: std::collections::HashMap<String, String> = every_page(|page_token| {
                let mut pools = pools.clone();
                async move {
                    let page = pools
                        .list_pools(pb::ListPoolsRequest {
                            include_deleted: true,
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.pools, page.next_page_token))
                }
            })
            .await?
            .into_iter()
            .map(|p| (p.pool_id, p.name))
            .collect();
            emit(
                out,
                || job_table_named(&list, now, &names),
                || json::jobs(&list),
            )
        }
        JobCommand::Get { job_id } => {
            let j = conn
                .jobs()
                .await?
                .get_job(pb::GetJobRequest { job_id })
                .await?
                .into_inner();
            emit(out, || job_detail(&j, now), || json::job(&j))
        }
        JobCommand::Cancel { job_id } => {
            let j = conn
                .jobs()
                .await?
                .cancel_job(pb::CancelJobRequest { job_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "job {} cancel requested ({})\n",
                        j.job_id,
                        job_state_name(j.state)
                    )
                },
                || json::job(&j),
            )
        }
        JobCommand::Logs {
            job_id,
            instance,
            follow,
        } => {
            let mut stream = conn
                .jobs()
                .await?
                .get_job_logs(pb::GetJobLogsRequest {
                    job_id,
                    instance,
                    follow,
                    offset: 0,
                })
                .await?
                .into_inner();
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.message().await? {
                let written = stdout.write_all(&chunk.data).and_then(|()| stdout.flush());
                match written {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => {
                        return Err(CliError::Message(format!("cannot write to stdout: {e}")));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Prints a notebook's or TensorBoard's URL.
async fn open_url(conn: &Conn, out: OutputFormat, job_id: String) -> Result<(), CliError> {
    let j = conn
        .jobs()
        .await?
        .get_job(pb::GetJobRequest { job_id })
        .await?
        .into_inner();
    if j.url.is_empty() {
        let kind = j.spec.as_ref().map_or(0, |s| s.kind);
        return Err(CliError::Message(format!(
            "job {} ({}) has no URL: it is {}{}",
            j.job_id,
            job_kind_name(kind),
            job_state_name(j.state),
            if j.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", j.reason)
            }
        )));
    }
    emit(
        out,
        || format!("{}\n", j.url),
        || serde_json::json!({"job_id": j.job_id, "url": j.url}),
    )
}

async fn service_command(
    conn: &Conn,
    out: OutputFormat,
    command: ServiceCommand,
) -> Result<(), CliError> {
    let mut jobs = conn.jobs().await?;
    match command {
        ServiceCommand::Endpoints { job_id } => {
            let j = jobs
                .get_job(pb::GetJobRequest { job_id })
                .await?
                .into_inner();
            let ready: Vec<&pb::Instance> = j
                .instances
                .iter()
                .filter(|i| i.ready && !i.replaced && !i.endpoint.is_empty())
                .collect();
            emit(
                out,
                || {
                    let mut t = Table::new(&["rank", "instance", "node", "endpoint"]);
                    for i in &ready {
                        t.row(vec![
                            i.rank.to_string(),
                            i.instance_id.clone(),
                            i.node_id.clone(),
                            i.endpoint.clone(),
                        ]);
                    }
                    t.render()
                },
                || {
                    serde_json::Value::Array(
                        ready
                            .iter()
                            .map(|i| {
                                serde_json::json!({
                                    "rank": i.rank,
                                    "instance_id": i.instance_id,
                                    "node_id": i.node_id,
                                    "endpoint": i.endpoint,
                                })
                            })
                            .collect(),
                    )
                },
            )
        }
        ServiceCommand::Scale { job_id, replicas } => {
            let j = jobs
                .scale_service(pb::ScaleServiceRequest { job_id, replicas })
                .await?
                .into_inner();
            emit(
                out,
                || format!("service {} scaled to {replicas} replicas\n", j.job_id),
                || json::job(&j),
            )
        }
        ServiceCommand::Restart { job_id } => {
            let j = jobs
                .restart_service(pb::RestartServiceRequest { job_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "service {}: rolling restart of {} replicas started\n",
                        j.job_id,
                        j.spec.as_ref().map_or(0, |s| s.instances)
                    )
                },
                || json::job(&j),
            )
        }
    }
}

fn kinds_table(k: &pb::ListJobKindsResponse) -> String {
    let secs = |s: u64| {
        if s == 0 {
            "-".to_string()
        } else {
            format!("{s}s")
        }
    };
    let mut t = Table::new(&[
        "kind",
        "gpus",
        "cpu",
        "memory",
        "max runtime",
        "runtime limit",
        "idle timeout",
        "command",
    ]);
    for k in &k.kinds {
        let res = k.resources.clone().unwrap_or_default();
        t.row(vec![
            job_kind_name(k.kind).to_string(),
            job_gpus(&res),
            format_milli(res.cpu_milli),
            format_mib(res.memory_mib),
            secs(k.max_runtime_secs),
            secs(k.max_runtime_limit_secs),
            match (k.idle_timeout_secs, k.idle_gpu_util_pct) {
                (0, _) => "-".to_string(),
                (s, 0) => format!("{s}s"),
                (s, pct) => format!("{s}s (GPU < {pct}%)"),
            },
            format_command(&k.command),
        ]);
    }
    t.render()
}

fn job_spec(a: SubmitArgs) -> pb::JobSpec {
    pb::JobSpec {
        name: opt(a.name),
        kind: a.kind.proto() as i32,
        pool: opt(a.pool),
        resources: Some(pb::Resources {
            gpus: a.gpus,
            gpu_milli: a.gpu_milli,
            gpu_models: a.gpu_models,
            cpu_milli: a.cpu,
            memory_mib: a.memory,
        }),
        instances: a.instances,
        command: a.command,
        env: a.env.into_iter().collect(),
        working_dir: opt(a.workdir),
        priority: a.priority,
        max_runtime_secs: a.max_runtime.unwrap_or(0),
        max_retries: a.max_retries.unwrap_or(0),
        port: a.port.unwrap_or(0),
        completions: a.completions.unwrap_or(0),
        health_check: (a.health_http.is_some() || a.health_tcp).then(|| pb::HealthCheck {
            http_path: a.health_http.unwrap_or_default(),
            interval_ms: a.health_interval_ms,
            timeout_ms: a.health_interval_ms.min(1000),
            failure_threshold: a.health_failures,
            initial_delay_ms: 0,
        }),
        idle_timeout_secs: a.idle_timeout.unwrap_or(0),
        log_dir: opt(a.log_dir),
        for_job: String::new(),
        cpu_only: a.cpu_only,
        image: opt(a.image),
        network: opt(a.network),
    }
}

/// A byte count for people: `812 B`, `3.4 MB`.
fn format_bytes(n: u64) -> String {
    match n {
        0..1000 => format!("{n} B"),
        1000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// GPUs asked per instance: `2`, `0.25` (a fraction) or `0`.
fn job_gpus(r: &pb::Resources) -> String {
    if r.gpu_milli != 0 && r.gpus == 0 {
        format_milli(i64::from(r.gpu_milli))
    } else {
        r.gpus.to_string()
    }
}

fn job_pool(j: &pb::Job, names: &std::collections::HashMap<String, String>) -> String {
    let asked = j.spec.as_ref().map(|s| s.pool.as_str()).unwrap_or_default();
    if j.pool_id.is_empty() {
        asked.to_string()
    } else {
        names
            .get(&j.pool_id)
            .cloned()
            .unwrap_or_else(|| j.pool_id.clone())
    }
}

/// The job list, with pools shown by their names (`names`: id -> name).
fn job_table_named(
    jobs: &[pb::Job],
    now: i64,
    names: &std::collections::HashMap<String, String>,
) -> String {
    let mut t = Table::new(&[
        "job",
        "name",
        "kind",
        "pool",
        "state",
        "instances",
        "gpus",
        "age",
        "reason",
    ]);
    for j in jobs {
        let spec = j.spec.clone().unwrap_or_default();
        let res = spec.resources.clone().unwrap_or_default();
        t.row(vec![
            j.job_id.clone(),
            spec.name.clone(),
            job_kind_name(spec.kind).to_string(),
            job_pool(j, names),
            job_state_name(j.state).to_string(),
            spec.instances.to_string(),
            job_gpus(&res),
            ts_ms(j.submitted_at.as_ref())
                .map(|ms| format_age(ms, now))
                .unwrap_or_default(),
            j.reason.clone(),
        ]);
    }
    t.render()
}

fn job_detail(j: &pb::Job, now: i64) -> String {
    let spec = j.spec.clone().unwrap_or_default();
    let res = spec.resources.clone().unwrap_or_default();
    let mut d = Details::default();
    d.add("Job", &j.job_id);
    d.add("Name", &spec.name);
    d.add("Kind", job_kind_name(spec.kind));
    let pool = match (spec.pool.as_str(), j.pool_id.as_str()) {
        (asked, id) if asked.is_empty() || asked == id => id.to_string(),
        (asked, "") => asked.to_string(),
        (asked, id) => format!("{asked} ({id})"),
    };
    d.add("Pool", pool);
    d.add("Tenant", &j.tenant);
    d.add("State", job_state_name(j.state));
    d.add("Reason", &j.reason);
    d.add("Priority", spec.priority.to_string());
    d.add("Instances", spec.instances.to_string());
    d.add("GPUs", job_gpus(&res));
    d.add("GPU models", res.gpu_models.join(","));
    d.add(
        "CPU",
        match res.cpu_milli {
            1000 => "1 core".to_string(),
            milli => format!("{} cores", format_milli(milli)),
        },
    );
    d.add("Memory", format_mib(res.memory_mib));
    d.add("Command", format_command(&spec.command));
    d.add("Image", &spec.image);
    if !spec.network.is_empty() {
        d.add("Network", &spec.network);
    }
    let digests: std::collections::BTreeSet<&str> = j
        .instances
        .iter()
        .map(|i| i.image_digest.as_str())
        .filter(|d| !d.is_empty())
        .collect();
    if !digests.is_empty() {
        d.add(
            "Image digest",
            digests.into_iter().collect::<Vec<_>>().join(", "),
        );
    }
    d.add("Working dir", &spec.working_dir);
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    d.add("Env", env.join(" "));
    if spec.max_runtime_secs != 0 {
        d.add("Max runtime", format!("{}s", spec.max_runtime_secs));
    }
    d.add(
        "Retries",
        format!("{} of {} used", j.retries, spec.max_retries),
    );
    if spec.port != 0 {
        d.add("Port", spec.port.to_string());
    }
    if spec.completions != 0 || spec.kind == pb::JobKind::BatchService as i32 {
        let needed = if spec.completions == 0 {
            spec.instances as u32
        } else {
            spec.completions
        };
        d.add(
            "Completions",
            format!("{} of {needed} succeeded", j.succeeded),
        );
    }
    if spec.kind == pb::JobKind::OnlineService as i32 {
        d.add(
            "Replicas",
            format!("{} of {} ready", j.ready_replicas, spec.instances),
        );
        if let Some(h) = &spec.health_check {
            let what = if h.http_path.is_empty() {
                "TCP connect".to_string()
            } else {
                format!("HTTP GET {}", h.http_path)
            };
            d.add(
                "Health check",
                format!(
                    "{what} every {} ms, unready after {} failures",
                    h.interval_ms, h.failure_threshold
                ),
            );
        }
    }
    if j.restarts != 0 {
        d.add("Restarts", j.restarts.to_string());
    }
    if spec.idle_timeout_secs != 0 {
        d.add("Idle timeout", format!("{}s", spec.idle_timeout_secs));
    }
    d.add("Log dir", &spec.log_dir);
    d.add("For job", &spec.for_job);
    d.add("URL", &j.url);
    d.add(
        "Submitted",
        format_time_ago(ts_ms(j.submitted_at.as_ref()), now),
    );
    d.add(
        "Started",
        format_time_ago(ts_ms(j.started_at.as_ref()), now),
    );
    d.add(
        "Finished",
        format_time_ago(ts_ms(j.finished_at.as_ref()), now),
    );
    let mut text = d.render();
    text.push('\n');
    let mut t = Table::new(&[
        "rank", "instance", "node", "gpus", "state", "ready", "endpoint", "exit", "reason",
    ]);
    for i in &j.instances {
        let exit = match (i.exit_code, i.signal) {
            (Some(code), _) => code.to_string(),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => String::new(),
        };
        t.row(vec![
            i.rank.to_string(),
            i.instance_id.clone(),
            i.node_id.clone(),
            i.gpu_indexes
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            instance_state_name(i.state).to_string(),
            // Ready only means something while it runs.
            match (i.ready, i.state == pb::InstanceState::Running as i32) {
                (true, _) => "yes",
                (false, true) => "no",
                (false, false) => "",
            }
            .to_string(),
            i.endpoint.clone(),
            exit,
            if i.pulling {
                format!(
                    "pulling image: {} of {}",
                    format_bytes(i.pull_done_bytes),
                    format_bytes(i.pull_total_bytes)
                )
            } else {
                i.reason.clone()
            },
        ]);
    }
    text.push_str(&t.render());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_speak_in_flag_names_but_config_fields_stay() {
        assert_eq!(
            in_flag_names("gpu_milli must be 1..999 (got 1500); for_job is not a training job"),
            "--gpu-milli must be 1..999 (got 1500); --job is not a training job"
        );
        assert_eq!(
            in_flag_names(
                "max_retries 9 exceeds the cluster's limit of 5 (`[limits] max_retries`)"
            ),
            "--max-retries 9 exceeds the cluster's limit of 5 (`[limits] max_retries`)"
        );
        assert_eq!(in_flag_names("gpu_milli_x stays"), "gpu_milli_x stays");
        assert_eq!(
            in_flag_names("job \"my_log_dir\" not found; log_dir \"/data/log_dir\""),
            "job \"my_log_dir\" not found; --log-dir \"/data/log_dir\""
        );
    }
    use clap::CommandFactory;

    /// Parses a command line given as one string split on whitespace.
    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gpupool").chain(line.split_whitespace()))
    }

    fn submit_spec(line: &str) -> pb::JobSpec {
        match parse(line).unwrap().command {
            Command::Job {
                command: JobCommand::Submit(a),
            } => job_spec(*a),
            other => panic!("not a submit: {other:?}"),
        }
    }

    fn create_request(line: &str) -> pb::CreatePoolRequest {
        match parse(line).unwrap().command {
            Command::Pool {
                command: PoolCommand::Create(a),
            } => create_pool_request(a),
            other => panic!("not a create: {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_parses_quantities_and_command() {
        let spec = submit_spec(
            "job submit --name t --gpus -1 --cpu 500m --memory 1.5GiB --env A=1 --env B=x=y \
             --gpu-model H100 --instances 2 -- python -c print(1) --lr 0.1",
        );
        let res = spec.resources.clone().unwrap();
        assert_eq!(res.gpus, -1);
        assert_eq!(res.cpu_milli, 500);
        assert_eq!(res.memory_mib, 1536);
        assert_eq!(res.gpu_models, vec!["H100"]);
        assert_eq!(spec.instances, 2);
        assert_eq!(spec.kind, pb::JobKind::Training as i32);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(spec.command, ["python", "-c", "print(1)", "--lr", "0.1"]);
    }

    #[test]
    fn submit_defaults() {
        let spec = submit_spec("job submit");
        let res = spec.resources.clone().unwrap();
        // 0 = the kind's default, filled in by the scheduler.
        assert_eq!(res.cpu_milli, 0);
        assert_eq!(res.memory_mib, 0);
        assert!(spec.health_check.is_none() && !spec.cpu_only);
        assert_eq!(res.gpus, 0);
        assert_eq!(spec.instances, 1);
        assert_eq!(spec.kind, pb::JobKind::Training as i32);
        assert!(spec.command.is_empty());
        let spec = submit_spec("job submit --kind online-service --port 8080 sleep 5");
        assert_eq!(spec.kind, pb::JobKind::OnlineService as i32);
        assert_eq!(spec.port, 8080);
        assert_eq!(spec.command, ["sleep", "5"]);
    }

    #[test]
    fn submit_rejects_bad_values() {
        assert!(parse("job submit --env NOEQUALS -- true").is_err());
        assert!(parse("job submit --cpu lots -- true").is_err());
        assert!(parse("job submit --memory 4XB -- true").is_err());
        assert!(parse("job submit --kind weird -- true").is_err());
    }

    #[test]
    fn submit_passes_negative_numbers_through() {
        let spec = submit_spec(
            "job submit --cpu -1 --memory -5 --gpu-milli -3 --instances -2 --priority -1 -- true",
        );
        let res = spec.resources.clone().unwrap();
        assert_eq!(res.cpu_milli, -1000);
        assert_eq!(res.memory_mib, -5);
        assert_eq!(res.gpu_milli, -3);
        assert_eq!(spec.instances, -2);
        assert_eq!(spec.priority, -1);
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse("job list --output json --addr h:1 --token t").unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(normalize_addr(&cli.addr), "http://h:1");
        assert_eq!(cli.token.as_deref(), Some("t"));
        let cli = parse("-o json node list").unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert!(parse("job list --output yaml").is_err());
    }

    #[test]
    fn job_list_states() {
        let cli = parse("job list --state running --state Queued,failed").unwrap();
        let Command::Job {
            command: JobCommand::List { states, .. },
        } = cli.command
        else {
            panic!("not a list");
        };
        use JobStateArg::*;
        assert_eq!(states, [Running, Queued, Failed]);
    }

    fn pool_command(line: &str) -> PoolCommand {
        match parse(line).unwrap().command {
            Command::Pool { command } => command,
            other => panic!("not a pool command: {other:?}"),
        }
    }

    #[test]
    fn pool_list_all() {
        assert!(matches!(
            pool_command("pool list"),
            PoolCommand::List { all: false }
        ));
        assert!(matches!(
            pool_command("pool list --all"),
            PoolCommand::List { all: true }
        ));
    }

    #[test]
    fn pool_nodes_takes_a_pool() {
        assert!(matches!(
            pool_command("pool nodes team-a"),
            PoolCommand::Nodes { pool } if pool == "team-a"
        ));
        assert!(parse("pool nodes").is_err());
    }

    #[test]
    fn pool_scale_out_and_in() {
        use pb::scale_pool_request::Change;
        let PoolCommand::ScaleOut { pool, count } = pool_command("pool scale-out p --count 3")
        else {
            panic!("not a scale-out");
        };
        let req = scale_out_request(pool, count);
        assert_eq!(req.pool, "p");
        assert_eq!(req.change, Some(Change::AddNodes(3)));
        assert!(!req.force);
        assert!(parse("pool scale-out p").is_err());

        let PoolCommand::ScaleIn {
            pool,
            node_ids,
            force,
        } = pool_command("pool scale-in p n1 n2 --force")
        else {
            panic!("not a scale-in");
        };
        let req = scale_in_request(pool, node_ids, force);
        assert_eq!(req.pool, "p");
        assert_eq!(
            req.change,
            Some(Change::RemoveNodes(pb::NodeIds {
                node_ids: vec!["n1".into(), "n2".into()]
            }))
        );
        assert!(req.force);
        assert!(matches!(
            pool_command("pool scale-in p n1"),
            PoolCommand::ScaleIn { force: false, .. }
        ));
        assert!(parse("pool scale-in p").is_err());
        assert!(parse("pool scale-in p --force").is_err());
        // The old command is gone.
        assert!(parse("pool scale p --add 1").is_err());
    }

    #[test]
    fn pool_scale_in_plan() {
        assert!(matches!(
            pool_command("pool scale-in-plan p --count 2"),
            PoolCommand::ScaleInPlan { pool, count: 2 } if pool == "p"
        ));
        assert!(parse("pool scale-in-plan p").is_err());

        let picks = [
            pb::ScaleInPick {
                node_id: "n3".into(),
                free_gpus: 8,
                pool_free_gpus_after: 8,
                explanation: "n3 is idle".into(),
                ..Default::default()
            },
            pb::ScaleInPick {
                node_id: "n1".into(),
                instances_disrupted: 2,
                job_ids: vec!["j-1".into(), "j-2".into()],
                free_gpus: 4,
                pool_free_gpus_after: 4,
                pool_fragmented_gpus_after: 4,
                explanation: "n1 runs 2 instances".into(),
            },
        ];
        let text = scale_in_plan_text(&picks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "RANK",
                "NODE",
                "DISRUPTED",
                "JOBS",
                "FREE",
                "GPUS",
                "POOL",
                "FREE",
                "AFTER",
                "FRAGMENTED",
                "AFTER"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["1", "n3", "0", "-", "8", "8", "0"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["2", "n1", "2", "j-1,j-2", "4", "4", "4"]
        );
        assert_eq!(lines[3], "  1. n3 is idle");
        assert_eq!(lines[4], "  2. n1 runs 2 instances");
    }

    #[test]
    fn pool_delete_confirmation_flag() {
        assert!(matches!(
            pool_command("pool delete p --yes"),
            PoolCommand::Delete { yes: true, .. }
        ));
        assert!(matches!(
            pool_command("pool delete p"),
            PoolCommand::Delete { yes: false, .. }
        ));
    }

    #[test]
    fn pool_create_request() {
        let req = create_request(
            "pool create --type deploy --name p --spec s --nodes 2 --months 3 --vpc v \
             --subnet sn --security-group g1 --security-group g2 --az AZ2 --description d \
             --region r1 --auto-renew",
        );
        assert_eq!(req.r#type, pb::PoolType::Deploy as i32);
        assert_eq!(req.name, "p");
        assert_eq!(req.spec, "s");
        assert_eq!(req.node_count, 2);
        assert_eq!(req.description, "d");
        assert_eq!(req.region, "r1");
        assert_eq!(req.billing_mode, pb::BillingMode::Subscription as i32);
        let sub = req.subscription.unwrap();
        assert_eq!(sub.months, 3);
        assert!(sub.auto_renew);
        assert_eq!(req.az, "AZ2");
        let Some(pb::network::Network::Custom(c)) = req.network.unwrap().network else {
            panic!("no custom network");
        };
        assert_eq!(c.vpc_id, "v");
        assert_eq!(c.subnet_id, "sn");
        assert_eq!(c.security_group_ids, ["g1", "g2"]);

        let req = create_request(
            "pool create --type train --name p --spec s --nodes 1 --billing subscription --months 12",
        );
        assert_eq!(req.billing_mode, pb::BillingMode::Subscription as i32);
        let req = create_request(
            "pool create --type train --name p --spec s --nodes 1 --billing on-demand",
        );
        assert_eq!(req.billing_mode, pb::BillingMode::OnDemand as i32);
        assert!(parse("pool create --type public --name p --spec s --nodes 1").is_err());

        let req = create_request("pool create --type train --name p --spec s --nodes 1");
        assert_eq!(req.r#type, pb::PoolType::Train as i32);
        assert_eq!(req.billing_mode, pb::BillingMode::OnDemand as i32);
        assert!(req.subscription.is_none());
        assert!(req.network.is_none());
    }

    #[test]
    fn renewal_flags_take_booleans() {
        assert!(parse("pool renewal p --auto-renew true --convert-at-expiry false").is_ok());
        assert!(parse("pool renewal p --auto-renew maybe").is_err());
    }

    #[test]
    fn status_errors_name_the_code() {
        let e = CliError::from(tonic::Status::not_found("job j-9 not found"));
        assert_eq!(e.to_string(), "job j-9 not found (NotFound)");
        let e = CliError::Connect {
            addr: "http://x:1".into(),
            cause: "refused".into(),
        };
        assert_eq!(e.to_string(), "cannot connect to http://x:1: refused");
    }

    #[test]
    fn tables_render_nodes_and_pools() {
        let node = pb::Node {
            node_id: "n1".into(),
            inventory: Some(pb::Inventory {
                hostname: "gpu-01".into(),
                cpu_cores: 64,
                memory_mib: 512 * 1024,
                az: "AZ1".into(),
                gpus: (0..8)
                    .map(|i| pb::Gpu {
                        index: i,
                        model: "H100".into(),
                        memory_total_mib: 81_559,
                        healthy: i != 3,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: pb::NodeStatus::Ready as i32,
            pool: "public".into(),
            spec: "8xH100".into(),
            cordoned: true,
            gpus_allocated_milli: 4500,
            cpu_allocated_milli: 2500,
            memory_allocated_mib: 8192,
            gpu_allocated_milli: vec![1000, 1000, 1000, 1000, 500],
            ..Default::default()
        };
        let table = node_table(std::slice::from_ref(&node));
        assert!(table.starts_with("NODE "), "{table}");
        assert!(table.contains("Ready,Cordoned"), "{table}");
        assert!(table.contains("4.5/8"), "{table}");
        assert!(table.contains("8GiB/512GiB"), "{table}");
        let detail = node_detail(&node, 0);
        assert!(detail.contains("INDEX"), "{detail}");
        assert_eq!(json::node(&node)["gpus"][4]["allocated_milli"], 500);

        let mut pool = pb::Pool {
            pool_id: "pool-1".into(),
            name: "team-a".into(),
            r#type: pb::PoolType::Deploy as i32,
            tenant: "acme".into(),
            spec: "8xH100".into(),
            az: "random".into(),
            resolved_az: "AZ2".into(),
            status: pb::PoolStatus::Running as i32,
            billing_mode: pb::BillingMode::Subscription as i32,
            node_count: 2,
            target_node_count: 2,
            nodes_ready: 1,
            gpus_total: 16,
            subscription: Some(pb::Subscription {
                months: 12,
                billed_months: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = pool_table(std::slice::from_ref(&pool));
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "POOL", "NAME", "TYPE", "TENANT", "SPEC", "NODES", "STATUS", "BILLING", "AZ",
                "REASON"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "pool-1",
                "team-a",
                "deploy",
                "acme",
                "8xH100",
                "1/2",
                "Running",
                "subscription",
                "AZ2",
                "-"
            ]
        );
        assert!(pool_detail(&pool, 0).contains("12 (billed 10)"));
        assert_eq!(
            pool_summary(&pool, "created"),
            "pool team-a (pool-1) created (Running)\n"
        );

        // A scheduler that leaves the target at 0 shows no target.
        pool.target_node_count = 0;
        assert!(pool_table(std::slice::from_ref(&pool)).contains(" 1/2 "));
        pool.status = pb::PoolStatus::Scaling as i32;
        assert!(pool_table(std::slice::from_ref(&pool)).contains("1/2→0"));

        pool.target_node_count = 4;
        pool.status_reason = "adding 2 nodes".into();
        pool.resolved_az = String::new();
        let table = pool_table(std::slice::from_ref(&pool));
        assert!(table.contains("1/2→4"), "{table}");
        assert!(table.contains("random"), "{table}");
        assert!(table.contains("adding 2 nodes"), "{table}");
        assert!(pool_detail(&pool, 0).contains("(scaling to 4)"));
    }

    #[test]
    fn bearer_interceptor_sets_authorization() {
        let mut auth = BearerAuth(Some("Bearer s3cret".parse().unwrap()));
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let mut none = BearerAuth(None);
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
