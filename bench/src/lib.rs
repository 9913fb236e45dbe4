//! `gpupool-bench`: benchmarks of gpupool's placement and of a real
//! scheduler under load. A program of its own, so that no production binary
//! carries benchmark code (`load --database-url` empties a PostgreSQL
//! schema).
//!
//! `replay` replays an Alibaba openb trace (cluster-trace-gpu-v2023)
//! on its 1,213-node GPU cluster exactly as the FGD paper's simulator does
//! (see the data set's `REPLAY.md`) and reports the allocation rate at 100%
//! and 130% of GPU capacity arrived:
//!
//! ```text
//! gpupool-bench replay --nodes openb_node_list_gpu_node.csv \
//!     --pods openb_pod_list_default.csv --policy fgd --seed 42 --output json
//! ```
//!
//! `tenants` replays the public pool shared by 8 tenants (FIFO against
//! fair share). `speed` measures placements per second on synthetic clusters, `load`
//! runs the `gpupool-scheduler` binary under simulated agents, `churn`
//! pushes many short jobs through a real `gpupool-scheduler dev` cluster
//! from concurrent CLI or gRPC clients (optionally against a baseline build).
//!
//! Rooms: [`data`] reads the CSV files, [`replay`] is the pure engine (no
//! I/O), [`policy`] holds random, best-fit, FGD and gpupool's `default`
//! policy, [`rng`] the seeded PRNG, [`speed`], [`load`] and [`churn`] the
//! other benchmarks, [`procs`] what `load` and `churn` read of the processes
//! they run. The placement engine, cluster, store and server come
//! from the `gpupool-scheduler` library. Figures and commands are in
//! `BENCHMARKS.md` at the repository root.

pub mod churn;
pub mod data;
pub mod load;
pub mod net;
pub mod policy;
pub mod procs;
pub mod replay;
pub mod rng;
pub mod speed;
pub mod stranded;
pub mod tenants;

use std::path::PathBuf;
use std::time::Instant;

pub use policy::PolicyName;

/// `gpupool-bench` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Replay an openb trace (FGD paper's discrete experiment) under a policy.
    Replay(ReplayArgs),
    /// Placement speed on synthetic clusters (production policy vs best fit).
    Speed(speed::SpeedArgs),
    /// A real scheduler under N simulated agents and a submission stream.
    Load(load::LoadArgs),
    /// Many short jobs through a real dev cluster: accepted/s, completed/s, cost per job.
    Churn(churn::ChurnArgs),
    /// The public pool shared by 8 tenants over simulated hours: FIFO vs fair share.
    Tenants(tenants::TenantsArgs),
    /// Two instances on two hosts: throughput and round trip over an instance network vs the host network (root).
    Net(net::NetArgs),
    /// (`net`'s helper, run in a host namespace.)
    #[command(hide = true)]
    NetAttach(net::AttachArgs),
    /// (`net`'s helper: a 1-byte TCP echo.)
    #[command(hide = true)]
    NetEcho(net::EchoArgs),
}

/// Output format of `replay` and `churn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Options of `replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Cluster: node list CSV (`sn,cpu_milli,memory_mib,gpu,model`), e.g. openb_node_list_gpu_node.csv.
    #[arg(long)]
    pub nodes: PathBuf,
    /// Trace: pod list CSV, e.g. openb_pod_list_default.csv.
    #[arg(long)]
    pub pods: PathBuf,
    /// Placement policy (`default-online`: `default` with shapes learned from arrivals only).
    #[arg(long, value_enum, default_value = "default")]
    pub policy: PolicyName,
    /// Seed of the arrival shuffle/inflation, the tie-break node order and random choices.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// `text` (a short summary) or `json` (one JSON object on one line).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// Runs a `gpupool-bench` subcommand.
pub fn run(command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Replay(args) => run_replay(args),
        BenchCommand::Speed(args) => speed::run_speed(args),
        BenchCommand::Load(args) => load::run_load(args),
        BenchCommand::Churn(args) => churn::run_churn(args),
        BenchCommand::Tenants(args) => tenants::run_tenants(args),
        BenchCommand::Net(args) => net::run_net(args),
        BenchCommand::NetAttach(args) => net::run_attach(args),
        BenchCommand::NetEcho(args) => net::run_echo(args),
    }
}

/// `replay`: reads the files, replays, prints the result.
pub fn run_replay(args: &ReplayArgs) -> anyhow::Result<()> {
    let nodes = data::read_nodes(&args.nodes)?;
    let pods = data::read_pods(&args.pods)?;
    let workload = replay::Workload::new(&nodes, &pods)?;
    let start = Instant::now();
    let result = replay::replay(&workload, args.policy, args.seed);
    let elapsed = start.elapsed();
    match args.output {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&result)?;
            if let Some(obj) = value.as_object_mut() {
                obj.insert("nodes_file".into(), args.nodes.display().to_string().into());
                obj.insert("pods_file".into(), args.pods.display().to_string().into());
                obj.insert(
                    "replay_ms".into(),
                    serde_json::json!(elapsed.as_secs_f64() * 1000.0),
                );
            }
            println!("{}", serde_json::to_string(&value)?);
        }
        OutputFormat::Text => {
            let pct = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}%"));
            println!(
                "replay {} on {} ({} nodes, {} GPUs), policy {}, seed {}",
                args.pods.display(),
                args.nodes.display(),
                nodes.len(),
                result.capacity_milli / 1000,
                result.policy.as_str(),
                result.seed
            );
            println!(
                "pods: {} arrived ({} in the trace), {} failed ({} GPU pods)",
                result.pods, result.original_pods, result.failed, result.failed_gpu
            );
            println!(
                "GPU allocation rate: {} at 100% arrived, {} at 130% arrived",
                pct(result.alloc_pct_at_100),
                pct(result.alloc_pct_at_130)
            );
            for (at, s) in [
                ("100%", result.stranded_at_100.as_ref()),
                ("130%", Some(&result.stranded_at_130)),
            ] {
                let Some(s) = s else { continue };
                println!(
                    "unallocated at {at} arrived: {:.2}% of capacity: CPU exhausted {:.2}, memory exhausted {:.2}, \
                     shares below the smallest failed {:.2}, too few GPUs per node {:.2}, model {:.2}, nothing failed {:.2}",
                    s.unallocated_pct,
                    s.cpu_exhausted_pct,
                    s.memory_exhausted_pct,
                    s.shares_below_smallest_failed_pct,
                    s.too_few_gpus_per_node_pct,
                    s.model_pct,
                    s.no_failed_request_pct
                );
            }
            println!("replay time: {:.0} ms", elapsed.as_secs_f64() * 1000.0);
        }
    }
    Ok(())
}
