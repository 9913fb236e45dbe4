//! `gpupool-agent --config /etc/gpupool/agent.toml`: the node agent binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// gpupool node agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file.
    #[arg(long, default_value = "/etc/gpupool/agent.toml")]
    config: PathBuf,
    /// Present simulated GPUs instead of probing NVML, e.g. 8xH100-80GB.
    #[arg(long)]
    fake_gpus: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    // `shim EXIT_FILE -- CMD...`: the wrapper the agent starts instances with.
    gpupool_agent::shim::run_if_shim(&std::env::args().skip(1).collect::<Vec<_>>());
    let args = Args::parse();
    init_tracing(&args.log_format);
    let mut config = match gpupool_agent::AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if args.fake_gpus.is_some() {
        config.fake_gpus = args.fake_gpus;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gpupool_agent::run(config, None, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "agent failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
