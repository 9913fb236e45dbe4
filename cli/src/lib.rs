//! `gpupool-cli`: the command-line client of the scheduler's gRPC API (the
//! `gpupool` binary).
//!
//! One subcommand per user-facing RPC (`node`, `pool`, `spec`, `usage`,
//! `order`, `bill`, `job`, `notebook`, `tensorboard`, `service`, `tenant`,
//! `whoami`), global `--addr`, `--token` and `--output table|json` flags.
//! Values are only parsed here; the scheduler validates them and its gRPC
//! status is reported as `error: <message> (<code>)` with exit code 1.
//!
//! With `--output json` every command prints one pretty-printed JSON value
//! built by the converters of `json` (jobs, nodes, pools... with
//! snake_case keys, readable enum names and `*_ms` timestamps); list
//! commands print an array, except `usage` which prints
//! `{"records": [...], "total_micros": N}` (and `usage --csv` prints RFC 4180
//! CSV whatever `--output` says). `bill` prints the bill's object, `tenant token` prints
//! `{"tenant", "token"}`, `whoami` prints `{"tenant", "admin"}` and
//! `pool scale-in-plan` an array of picks.
//!
//! Rooms: one module per resource (`nodes`, `pools`, `specs`,
//! `jobs`, `interactive` for notebooks and TensorBoards, `services`,
//! `billing` for usage, orders and bills, `tenants` for tenants, tokens
//! and `whoami`), each with its subcommands' arguments, the calls and the
//! table output; `conn` reaches the scheduler, `error` says what went
//! wrong, `args` parses values, `format` and `json` render them.
//!
//! This crate talks gRPC only: it depends on `gpupool-proto` and
//! `gpupool-common`, never on the scheduler or the agent, so the binary
//! links no storage engine and no NVML.

mod args;
mod audit;
mod billing;
mod capacity;
mod conn;
mod error;
mod format;
mod interactive;
mod jobs;
mod json;
mod nodes;
mod output;
mod pools;
mod services;
mod specs;
mod tenants;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use self::args::DEFAULT_ADDR;
pub use self::audit::AuditCommand;
pub use self::billing::{BillArgs, OrderCommand, RollupArg, UsageArgs};
use self::conn::Conn;
use self::error::CliError;
pub use self::interactive::{NotebookCommand, TensorboardCommand};
pub use self::jobs::{JobCommand, JobStateArg, KindArg, SubmitArgs};
pub use self::nodes::NodeCommand;
pub use self::pools::{BillingArg, PoolCommand, PoolCreateArgs, PoolTypeArg};
pub use self::services::ServiceCommand;
pub use self::specs::SpecCommand;
pub use self::tenants::TenantCommand;

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
    /// The audit trail: who changed what, from where, and how it ended.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Free GPUs each pool's queued jobs cannot use, by cause (CPU or memory
    /// exhausted, shares too small, too few GPUs per node, model,
    /// unschedulable), with the nodes that strand the most. A tenant sees
    /// the public pool and its own, judged by its own queued jobs.
    Capacity {
        /// Only this pool (id or name).
        #[arg(long)]
        pool: Option<String>,
    },
}

/// Runs one parsed command line against the scheduler.
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
        Command::Node { command } => nodes::node_command(&conn, out, command).await,
        Command::Pool { command } => pools::pool_command(&conn, out, command).await,
        Command::Spec {
            command: SpecCommand::List,
        } => specs::spec_list(&conn, out).await,
        Command::Usage(args) => billing::usage_command(&conn, out, args).await,
        Command::Order { command } => billing::order_command(&conn, out, command).await,
        Command::Bill(args) => billing::bill_command(&conn, out, args).await,
        Command::Job { command } => jobs::job_command(&conn, out, command).await,
        Command::Notebook { command } => interactive::notebook_command(&conn, out, command).await,
        Command::Tensorboard { command } => {
            interactive::tensorboard_command(&conn, out, command).await
        }
        Command::Service { command } => services::service_command(&conn, out, command).await,
        Command::Tenant { command } => tenants::tenant_command(&conn, out, command).await,
        Command::Whoami => tenants::whoami(&conn, out).await,
        Command::Audit { command } => audit::audit_command(&conn, out, command).await,
        Command::Capacity { pool } => capacity::capacity_command(&conn, out, pool).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gpupool").chain(line.split_whitespace()))
    }

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse("job list --output json --addr h:1 --token t").unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(args::normalize_addr(&cli.addr), "http://h:1");
        assert_eq!(cli.token.as_deref(), Some("t"));
        let cli = parse("-o json node list").unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert!(parse("job list --output yaml").is_err());
    }
}
