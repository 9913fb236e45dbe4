//! `gpupool notebook ...` and `gpupool tensorboard ...`: start the
//! interactive kinds with their defaults, and print their URLs.

use clap::Subcommand;
use gpupool_proto::v1 as pb;

use crate::OutputFormat;
use crate::args::{opt, parse_cpu, parse_memory};
use crate::conn::Conn;
use crate::error::CliError;
use crate::format::{job_kind_name, job_state_name};
use crate::json;
use crate::output::emit;

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

/// Runs one `gpupool notebook ...` command.
pub(crate) async fn notebook_command(
    conn: &Conn,
    out: OutputFormat,
    command: NotebookCommand,
) -> Result<(), CliError> {
    match command {
        NotebookCommand::Open { job_id } => open_url(conn, out, job_id).await,
        NotebookCommand::Start {
            pool,
            gpus,
            gpu_milli,
            cpu,
            memory,
            idle_timeout,
            name,
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
            start_interactive(conn, out, spec, "notebook").await
        }
    }
}

/// Runs one `gpupool tensorboard ...` command.
pub(crate) async fn tensorboard_command(
    conn: &Conn,
    out: OutputFormat,
    command: TensorboardCommand,
) -> Result<(), CliError> {
    match command {
        TensorboardCommand::Open { job_id } => open_url(conn, out, job_id).await,
        TensorboardCommand::Start {
            job,
            logdir,
            cpu,
            memory,
            pool,
            idle_timeout,
            name,
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
            start_interactive(conn, out, spec, "tensorboard").await
        }
    }
}

/// Submits a notebook or TensorBoard and says how to open it.
async fn start_interactive(
    conn: &Conn,
    out: OutputFormat,
    spec: pb::JobSpec,
    what: &str,
) -> Result<(), CliError> {
    let j = crate::jobs::submit_job(conn, spec).await?;
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
