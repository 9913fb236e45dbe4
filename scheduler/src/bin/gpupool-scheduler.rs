//! `gpupool-scheduler`: `serve --config FILE` runs the daemon, `dev` runs a
//! one-machine cluster (scheduler + local agent) for trying gpupool out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpupool_scheduler::config::SchedulerConfig;

/// gpupool central scheduler.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scheduler daemon.
    Serve {
        /// TOML config file.
        #[arg(long, default_value = "/etc/gpupool/scheduler.toml")]
        config: PathBuf,
        /// Once listening, write the bound addresses here (TOML: `grpc =
        /// "IP:PORT"`, `metrics = "IP:PORT"`), whole or not at all: for
        /// listen addresses with port 0 (tests, several schedulers on one
        /// host).
        #[arg(long)]
        address_file: Option<PathBuf>,
    },
    /// Run a scheduler and a local agent on localhost (development).
    Dev(Box<gpupool_scheduler::dev::DevArgs>),
}

fn main() -> ExitCode {
    // `shim EXIT_FILE -- CMD...`: the wrapper the agent starts instances with.
    gpupool_agent::shim::run_if_shim(&std::env::args().skip(1).collect::<Vec<_>>());
    gpupool_proto::install_tls_provider();
    let args = Args::parse();
    gpupool_scheduler::init_tracing(args.log_json);
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(args.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            config,
            address_file,
        } => {
            let path = config;
            let config = SchedulerConfig::load(&path)?;
            config
                .check_serving()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.grpc_listen))?;
            let metrics = match config.metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?,
                ),
                None => None,
            };
            if let Some(file) = &address_file {
                let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
                write_addresses(file, grpc.local_addr()?, metrics_addr)?;
            }
            if let Some(url) = config.database_url.clone() {
                return gpupool_scheduler::replica::run(
                    config,
                    url,
                    grpc,
                    metrics,
                    gpupool_scheduler::shutdown_signal(),
                )
                .await;
            }
            let shared = gpupool_scheduler::server::open(config)?;
            gpupool_scheduler::server::serve(
                shared,
                grpc,
                metrics,
                gpupool_scheduler::shutdown_signal(),
            )
            .await
        }
        Command::Dev(args) => gpupool_scheduler::dev::run(*args).await,
    }
}

/// Writes the bound addresses to `path` through a temporary file and a
/// rename, so a reader sees all of it or nothing.
fn write_addresses(
    path: &std::path::Path,
    grpc: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let mut text = format!("grpc = \"{grpc}\"\n");
    if let Some(m) = metrics {
        text.push_str(&format!("metrics = \"{m}\"\n"));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the address file {}", path.display()))
}
