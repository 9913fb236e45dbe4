//! `gpupool-bench`: `replay`, `speed`, `load` and `churn` (see
//! `gpupool-bench --help` and `BENCHMARKS.md`).

use std::process::ExitCode;

use clap::Parser;

/// gpupool benchmarks: trace replay, placement speed, a scheduler under load, job churn.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: gpupool_bench::BenchCommand,
}

fn main() -> ExitCode {
    gpupool_proto::install_tls_provider();
    let args = Args::parse();
    gpupool_scheduler::init_tracing(args.log_json);
    match gpupool_bench::run(&args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
