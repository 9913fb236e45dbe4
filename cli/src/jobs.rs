//! `gpupool job ...` (JobService): the kinds' settings, submit, list, show,
//! cancel, logs.

use std::collections::HashMap;
use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};
use gpupool_proto::v1 as pb;

use crate::OutputFormat;
use crate::args::{opt, parse_cpu, parse_env, parse_memory};
use crate::conn::{Conn, every_page};
use crate::error::CliError;
use crate::format::{
    Details, Table, format_age, format_command, format_mib, format_milli, format_time_ago,
    instance_state_name, job_kind_name, job_state_name, now_ms, ts_ms,
};
use crate::json;
use crate::output::emit;

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
    /// Scheduling priority (inside its class and, in the public pool, its
    /// tenant).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// `high` may preempt lower classes in its pool when it cannot start;
    /// `preemptible` (training only) may be preempted and is then queued
    /// again.
    #[arg(long, value_enum, default_value = "normal")]
    pub priority_class: ClassArg,
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

/// Runs one `gpupool job ...` command.
pub(crate) async fn job_command(
    conn: &Conn,
    out: OutputFormat,
    command: JobCommand,
) -> Result<(), CliError> {
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
        JobCommand::Submit(a) => submit(conn, out, job_spec(*a)).await,
        JobCommand::List { pool, states } => list_jobs(conn, out, pool, states, now).await,
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
            let req = pb::GetJobLogsRequest {
                job_id,
                instance,
                follow,
                offset: 0,
            };
            print_logs(conn, req).await
        }
    }
}

/// Submits `spec`, waiting out the scheduler's rate limit
/// ([`crate::conn::within_rate_limit`]); the job as accepted.
pub(crate) async fn submit_job(conn: &Conn, spec: pb::JobSpec) -> Result<pb::Job, CliError> {
    let jobs = conn.jobs().await?;
    let job = crate::conn::within_rate_limit(|| {
        let (mut jobs, spec) = (jobs.clone(), spec.clone());
        async move {
            jobs.submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await
        }
    })
    .await?;
    Ok(job.into_inner())
}

/// `job submit ... -- COMMAND...`: submits and says what became of it.
async fn submit(conn: &Conn, out: OutputFormat, spec: pb::JobSpec) -> Result<(), CliError> {
    let j = crate::jobs::submit_job(conn, spec).await?;
    emit(
        out,
        || {
            let mut text = format!("job {} submitted ({})", j.job_id, job_state_name(j.state));
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

/// `job list [--pool P] [--state S...]`: every job, page after page, with
/// pools shown by their names.
async fn list_jobs(
    conn: &Conn,
    out: OutputFormat,
    pool: Option<String>,
    states: Vec<JobStateArg>,
    now: i64,
) -> Result<(), CliError> {
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
    let names = pool_names(conn).await?;
    emit(
        out,
        || job_table_named(&list, now, &names),
        || json::jobs(&list),
    )
}

/// Pools by name, as people named them: id -> name of every pool, deleted
/// ones too.
async fn pool_names(conn: &Conn) -> Result<HashMap<String, String>, CliError> {
    let pools = conn.pools().await?;
    Ok(every_page(|page_token| {
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
    .collect())
}

/// `job logs JOB [--instance N] [--follow]`: copies the log to stdout; a
/// closed pipe ends it quietly.
async fn print_logs(conn: &Conn, req: pb::GetJobLogsRequest) -> Result<(), CliError> {
    let mut stream = conn.jobs().await?.get_job_logs(req).await?.into_inner();
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

/// `--priority-class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassArg {
    Preemptible,
    Normal,
    High,
}

impl ClassArg {
    fn proto(self) -> pb::PriorityClass {
        match self {
            ClassArg::Preemptible => pb::PriorityClass::Preemptible,
            ClassArg::Normal => pb::PriorityClass::Normal,
            ClassArg::High => pb::PriorityClass::High,
        }
    }
}

fn class_name(c: i32) -> &'static str {
    match pb::PriorityClass::try_from(c) {
        Ok(pb::PriorityClass::Preemptible) => "preemptible",
        Ok(pb::PriorityClass::High) => "high",
        _ => "normal",
    }
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
        priority_class: a.priority_class.proto() as i32,
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

fn job_pool(j: &pb::Job, names: &HashMap<String, String>) -> String {
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
fn job_table_named(jobs: &[pb::Job], now: i64, names: &HashMap<String, String>) -> String {
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

/// `job get`: the job's fields, then one row per instance.
fn job_detail(j: &pb::Job, now: i64) -> String {
    let spec = j.spec.clone().unwrap_or_default();
    let mut d = Details::default();
    add_spec_fields(&mut d, j, &spec);
    add_run_fields(&mut d, j, &spec);
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
    text.push_str(&instance_table(j));
    text
}

/// What the job asked for: where, what, with which resources.
fn add_spec_fields(d: &mut Details, j: &pb::Job, spec: &pb::JobSpec) {
    let res = spec.resources.clone().unwrap_or_default();
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
    d.add(
        "Priority",
        format!(
            "{} (class {})",
            spec.priority,
            class_name(spec.priority_class)
        ),
    );
    if j.preemptions > 0 {
        d.add(
            "Preempted",
            format!("{} time(s), last by {}", j.preemptions, j.preempted_by),
        );
    }
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
}

/// How it runs: limits, retries, and the kind's own fields (completions,
/// replicas and their health check, idle timeout).
fn add_run_fields(d: &mut Details, j: &pb::Job, spec: &pb::JobSpec) {
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
}

/// One row per instance: where it runs, its state, readiness and exit.
fn instance_table(j: &pb::Job) -> String {
    let mut t = Table::new(&[
        "rank", "instance", "node", "gpus", "state", "ready", "endpoint", "address", "exit",
        "reason",
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
            i.network_address.clone(),
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
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

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
}
