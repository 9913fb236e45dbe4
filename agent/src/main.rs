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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print what this node's probe sees (host and GPUs) as JSON and exit;
    /// NVML unless --fake-gpus is given.
    Probe {
        /// Also run the probe conformance checks; exit 1 on a violation.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    // `shim EXIT_FILE -- CMD...`: the wrapper the agent starts instances with.
    gpupool_agent::shim::run_if_shim(&std::env::args().skip(1).collect::<Vec<_>>());
    gpupool_proto::install_tls_provider();
    let args = Args::parse();
    init_tracing(&args.log_format);
    if let Some(Command::Probe { check }) = args.command {
        return probe(args.fake_gpus.as_deref(), check);
    }
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
    // Jobs never see the agent's config (its join token), nor the files it
    // names that hold secrets, wherever they are.
    let secrets = [
        Some(args.config.clone()),
        config.registry_auth_file.clone(),
        config.tls_key_file.clone(),
    ];
    for path in secrets.into_iter().flatten() {
        if let Ok(path) = std::path::absolute(path) {
            config.hidden_paths.push(path);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Handlers installed now: a SIGTERM right after READY must not kill us.
    let shutdown = {
        let _inside = runtime.enter();
        shutdown_signal()
    };
    match runtime.block_on(gpupool_agent::run(config, None, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "agent failed");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `gpupool-agent probe`: the probe's view as JSON on stdout.
fn probe(fake: Option<&str>, check: bool) -> ExitCode {
    use gpupool_agent::probe::{FakeGpus, GpuProbe, NvmlProbe, check_probe, host_info};
    let probe: Box<dyn GpuProbe> = match fake {
        Some(spec) => match FakeGpus::parse(spec, "probe") {
            Ok(f) => Box::new(f),
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
        },
        None => match NvmlProbe::init() {
            Ok(p) => Box::new(p),
            Err(err) => {
                eprintln!(
                    "error: NVML cannot be initialised (is the NVIDIA driver installed?): {err}"
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let violations = if check {
        check_probe(probe.as_ref())
    } else {
        Vec::new()
    };
    let out = serde_json::json!({
        "host": host_info(),
        "probe": if probe.is_fake() { "fake" } else { "nvml" },
        "gpus": probe.gpus(),
        "check": if check { serde_json::json!(violations) } else { serde_json::Value::Null },
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: the probe breaks {} conformance check(s)",
            violations.len()
        );
        ExitCode::FAILURE
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT; the handlers are installed by the call.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
