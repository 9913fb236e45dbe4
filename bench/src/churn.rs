//! `gpupool-bench churn`: many short jobs through a real dev cluster (issue
//! 17's workload, the one measured against Slurm). Each run starts a fresh
//! `gpupool-scheduler dev` process (its own data dir, SQLite, one local
//! agent in the same process with 8 fake H100s):
//!
//! ```text
//! gpupool-scheduler dev --data-dir TMP/dev --fake-gpus 8xH100-80GB \
//!     --grpc-listen 127.0.0.1:PORT --metrics-listen 127.0.0.1:PORT2 \
//!     --agent-metrics-listen 127.0.0.1:PORT3 --config TMP/config.toml
//! ```
//!
//! where `config.toml` is `[limits] requests_per_second = 0` (no per-caller
//! rate limit). N jobs (`--jobs`), each exactly
//! `gpupool job submit --kind training --gpus 1 --cpu 100m --memory 100MiB -- true`,
//! are submitted by C concurrent clients (`--clients`), each submitting its
//! share one after the other. A `cli` client runs that command (the
//! `gpupool` binary) per submission; a `grpc` client calls
//! `JobService.SubmitJob` with the same spec on its own channel.
//!
//! Per (client kind, C) it reports: accepted/s (N / time from the first
//! submission to the last acknowledgement), completed/s (N / time until the
//! scheduler's `gpupool_jobs{state="Succeeded"}` gauge reaches N, polled
//! every 50 ms; any Failed, Lost or Cancelled job is an error), submit
//! latency p50/p99 (the RPC for grpc, the process's wall time for cli), the
//! dev process's CPU per job (utime+stime from `/proc/PID/stat`: scheduler
//! and agent are one process) and that of the instances it started and
//! reaped (cutime+cstime: the shims and `true`), fsync+fdatasync calls per
//! job (`perf stat -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync
//! -p PID`, which follows the threads and processes it starts), write
//! syscalls (`syscw`) and bytes written (`write_bytes`) per job from
//! `/proc/PID/io` (which adds reaped children), the queue depth (the
//! `Queued` gauge, max and at each tenth of the run) and the dev process's
//! RSS after the run. Then an idle phase: on an idle cluster, `--idle-jobs`
//! jobs submitted one at a time over gRPC, each timed from submission to
//! its instance Running by the scheduler's own timestamps (the job's
//! `submitted_at` to the instance's `started_at`, milliseconds) and as the
//! client sees it (GetJob polled every millisecond).
//!
//! `gpupool-bench churn [--jobs 1000] [--clients 1,8] [--client cli,grpc]
//! [--reps 3] [--drain] [--bin-dir DIR] [--baseline-bin-dir DIR]
//! [--output text|json]`
//!
//! Every figure is the median of `--reps` runs, each on a fresh dev process
//! and data dir. With `--baseline-bin-dir` (an older build's
//! `gpupool-scheduler` and `gpupool`) each repetition runs the baseline and
//! the current build alternately on the same machine, and both are shown
//! with their ratio. `--drain` cordons the node before submitting and
//! uncordons it once every job is accepted, so the whole queue is deep at
//! once; completed/s is then counted from the uncordon (accepted/s and the
//! queue series still start at the first submission).
//!
//! The binaries are `gpupool-scheduler` and `gpupool` in `--bin-dir`, else
//! next to this one (as cargo builds them, e.g. `target/release/`), else on
//! `$PATH`. The clients run on the same machine as the cluster and share
//! its cores.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use gpupool_proto::v1 as pb;
use tonic::transport::Channel;

use crate::OutputFormat;
use crate::load::{free_port, pct};
use crate::procs::{cpu, find_binary, rss_kib};

/// The job every submission asks for, as CLI arguments.
const SUBMIT_ARGS: [&str; 12] = [
    "job", "submit", "--kind", "training", "--gpus", "1", "--cpu", "100m", "--memory", "100MiB",
    "--", "true",
];
const FAKE_GPUS: &str = "8xH100-80GB";
const CONFIG: &str = "[limits]\nrequests_per_second = 0\n";
/// How often the scheduler's gauges are read during a run.
const POLL: Duration = Duration::from_millis(50);

/// How the clients submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// One `gpupool job submit` process per submission.
    Cli,
    /// In-process tonic clients, one channel each.
    Grpc,
}

impl ClientKind {
    fn as_str(self) -> &'static str {
        match self {
            ClientKind::Cli => "cli",
            ClientKind::Grpc => "grpc",
        }
    }
}

/// Options of `churn`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Jobs per run.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Concurrent clients, comma-separated (each submits its share in turn).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub clients: Vec<usize>,
    /// Client kinds, comma-separated: `cli` (a `gpupool` process per job),
    /// `grpc` (in-process tonic clients).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cli,grpc")]
    pub client: Vec<ClientKind>,
    /// Runs of each configuration (fresh dev process and data dir each);
    /// the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Cordon the node while submitting, uncordon once all are accepted;
    /// completed/s is then counted from the uncordon.
    #[arg(long)]
    pub drain: bool,
    /// Where the current `gpupool-scheduler` and `gpupool` are (default:
    /// next to this binary, else `$PATH`).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// An older build's `gpupool-scheduler` and `gpupool`: run alternately
    /// with the current build in every repetition, and show the ratio.
    #[arg(long, value_name = "DIR")]
    pub baseline_bin_dir: Option<PathBuf>,
    /// Jobs of the idle submit-to-Running phase (0: skip it).
    #[arg(long, default_value_t = 50)]
    pub idle_jobs: usize,
    /// A run that has not finished after this long is an error (s).
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// `text` (an aligned table) or `json` (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// The two binaries of one build.
#[derive(Debug, Clone)]
struct Build {
    label: &'static str,
    scheduler: PathBuf,
    cli: PathBuf,
}

impl Build {
    fn in_dir(label: &'static str, dir: &Path) -> anyhow::Result<Build> {
        let dir = std::path::absolute(dir)?;
        let scheduler = dir.join("gpupool-scheduler");
        let cli = dir.join("gpupool");
        for p in [&scheduler, &cli] {
            anyhow::ensure!(p.is_file(), "{label} build: {} not found", p.display());
        }
        Ok(Build {
            label,
            scheduler,
            cli,
        })
    }

    /// The current build: `--bin-dir`, else next to this binary, else `$PATH`.
    fn current(dir: Option<&Path>) -> anyhow::Result<Build> {
        if let Some(dir) = dir {
            return Build::in_dir("current", dir);
        }
        Ok(Build {
            label: "current",
            scheduler: find_binary(
                "gpupool-scheduler",
                "gpupool-scheduler",
                " or pass --bin-dir",
            )?,
            cli: find_binary("gpupool", "gpupool-cli", " or pass --bin-dir")?,
        })
    }
}

/// Runs the benchmark on its own runtime (the caller may be inside one).
pub fn run_churn(args: &ChurnArgs) -> anyhow::Result<()> {
    let args = args.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(churn(&args))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the churn benchmark panicked"))?
}

/// The figures of one churn run (or their medians).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    accepted: usize,
    completed: usize,
    accepted_per_s: f64,
    completed_per_s: f64,
    submit_p50_ms: f64,
    submit_p99_ms: f64,
    /// The dev process (scheduler and agent): utime+stime.
    dev_cpu_ms_per_job: f64,
    /// Its reaped children (instance shims and commands): cutime+cstime.
    instances_cpu_ms_per_job: f64,
    /// None: perf is missing or failed.
    fsyncs_per_job: Option<f64>,
    syscw_per_job: f64,
    write_kib_per_job: f64,
    queue_max: f64,
    /// Queued jobs at 0%, 10% ... 100% of the run.
    queue_series: Vec<f64>,
    rss_mib: f64,
}

/// The figures of one idle phase (or their medians).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Idle {
    jobs: usize,
    /// Submitted to the instance Running, by the scheduler's timestamps (ms).
    server_p50_ms: f64,
    server_p90_ms: f64,
    /// Jobs whose instance never was Running by the scheduler's record
    /// (reported Succeeded at once), left out of the server figures.
    server_missing: usize,
    /// Submission to the first GetJob showing it Running (or done).
    client_p50_ms: f64,
    client_p90_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn median_figures(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    let points = runs.iter().map(|r| r.queue_series.len()).min().unwrap_or(0);
    Figures {
        accepted: runs.iter().map(|r| r.accepted).min().unwrap_or(0),
        completed: runs.iter().map(|r| r.completed).min().unwrap_or(0),
        accepted_per_s: m(|r| r.accepted_per_s),
        completed_per_s: m(|r| r.completed_per_s),
        submit_p50_ms: m(|r| r.submit_p50_ms),
        submit_p99_ms: m(|r| r.submit_p99_ms),
        dev_cpu_ms_per_job: m(|r| r.dev_cpu_ms_per_job),
        instances_cpu_ms_per_job: m(|r| r.instances_cpu_ms_per_job),
        fsyncs_per_job: runs
            .iter()
            .map(|r| r.fsyncs_per_job)
            .collect::<Option<Vec<f64>>>()
            .map(median),
        syscw_per_job: m(|r| r.syscw_per_job),
        write_kib_per_job: m(|r| r.write_kib_per_job),
        queue_max: m(|r| r.queue_max),
        queue_series: (0..points)
            .map(|i| median(runs.iter().map(|r| r.queue_series[i]).collect()))
            .collect(),
        rss_mib: m(|r| r.rss_mib),
    }
}

fn median_idle(runs: &[Idle]) -> Idle {
    let m = |f: fn(&Idle) -> f64| median(runs.iter().map(f).collect());
    Idle {
        jobs: runs.iter().map(|r| r.jobs).min().unwrap_or(0),
        server_p50_ms: m(|r| r.server_p50_ms),
        server_p90_ms: m(|r| r.server_p90_ms),
        server_missing: runs.iter().map(|r| r.server_missing).max().unwrap_or(0),
        client_p50_ms: m(|r| r.client_p50_ms),
        client_p90_ms: m(|r| r.client_p90_ms),
    }
}

async fn churn(args: &ChurnArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.jobs > 0, "--jobs must be positive");
    anyhow::ensure!(args.reps > 0, "--reps must be positive");
    anyhow::ensure!(
        args.clients.iter().all(|&c| c > 0 && c <= args.jobs),
        "--clients must be between 1 and --jobs"
    );
    let current = Build::current(args.bin_dir.as_deref())?;
    let baseline = args
        .baseline_bin_dir
        .as_deref()
        .map(|d| Build::in_dir("baseline", d))
        .transpose()?;
    let builds: Vec<&Build> = baseline.iter().chain([&current]).collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let perf = perf_available();
    let command = format!("gpupool {}", SUBMIT_ARGS.join(" "));
    let header = serde_json::json!({
        "kind": "header",
        "cores": cores,
        "jobs": args.jobs,
        "clients": args.clients,
        "client_kinds": args.client.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        "reps": args.reps,
        "drain": args.drain,
        "job": command,
        "cluster": format!("gpupool-scheduler dev, 1 node (agent in the dev process), --fake-gpus {FAKE_GPUS}, SQLite"),
        "config": CONFIG.trim().replace('\n', " "),
        "current": current.scheduler.parent().map(|p| p.display().to_string()),
        "baseline": baseline.as_ref().and_then(|b| b.scheduler.parent()).map(|p| p.display().to_string()),
        "perf": perf.as_ref().err(),
    });
    match args.output {
        OutputFormat::Json => println!("{header}"),
        OutputFormat::Text => {
            println!(
                "churn: {} jobs per run, each `{command}`; clients {}; client kinds {}; \
                 median of {} run(s), each on a fresh dev process{}",
                args.jobs,
                join(&args.clients),
                args.client
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                args.reps,
                if args.drain {
                    "; --drain: node cordoned while submitting, completed/s from the uncordon"
                } else {
                    ""
                }
            );
            println!(
                "machine: {cores} cores (clients share them with the cluster); cluster: \
                 gpupool-scheduler dev, 1 node, {FAKE_GPUS} fake, SQLite in {}",
                std::env::temp_dir().display()
            );
            println!(
                "config: `[limits] requests_per_second = 0` (no per-caller rate limit); \
                 gauges polled every {} ms",
                POLL.as_millis()
            );
            for b in &builds {
                println!(
                    "{}: {}, {}",
                    b.label,
                    b.scheduler.display(),
                    b.cli.display()
                );
            }
            println!(
                "cpu: the dev process (scheduler + agent, one process), `inst` its reaped \
                 instance shims and commands; fsync/job: {}",
                match &perf {
                    Ok(()) => "perf stat fsync+fdatasync on the dev process and its children",
                    Err(e) => e.as_str(),
                }
            );
        }
    }

    let mut table = Vec::new();
    for &kind in &args.client {
        for &c in &args.clients {
            let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); builds.len()];
            for rep in 0..args.reps {
                // Alternate which build goes first, so drift hits both alike.
                for i in order(builds.len(), rep) {
                    let b = builds[i];
                    eprintln!(
                        "churn: {} {} x{c} rep {}/{}...",
                        b.label,
                        kind.as_str(),
                        rep + 1,
                        args.reps
                    );
                    let f = churn_once(b, kind, c, args, perf.is_ok())
                        .await
                        .with_context(|| {
                            format!("{} build, {} clients x{c}", b.label, kind.as_str())
                        })?;
                    runs[i].push(f);
                }
            }
            let medians: Vec<Figures> = runs.iter().map(|r| median_figures(r)).collect();
            for (b, f) in builds.iter().zip(&medians) {
                emit_row(args, kind, c, b.label, f)?;
            }
            if medians.len() == 2 {
                emit_ratio(args, kind, c, &medians[1], &medians[0])?;
            }
            table.push((kind, c, medians));
        }
    }
    if args.output == OutputFormat::Text {
        print_table(&builds, &table);
    }

    if args.idle_jobs > 0 {
        let mut runs: Vec<Vec<Idle>> = vec![Vec::new(); builds.len()];
        for rep in 0..args.reps {
            for i in order(builds.len(), rep) {
                let b = builds[i];
                eprintln!(
                    "churn: {} idle phase rep {}/{}...",
                    b.label,
                    rep + 1,
                    args.reps
                );
                let f = idle_once(b, args.idle_jobs)
                    .await
                    .with_context(|| format!("{} build, idle phase", b.label))?;
                runs[i].push(f);
            }
        }
        let medians: Vec<Idle> = runs.iter().map(|r| median_idle(r)).collect();
        match args.output {
            OutputFormat::Json => {
                for (b, f) in builds.iter().zip(&medians) {
                    let mut v = serde_json::to_value(f)?;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("kind".into(), "idle".into());
                        o.insert("build".into(), b.label.into());
                        o.insert("reps".into(), args.reps.into());
                    }
                    println!("{v}");
                }
            }
            OutputFormat::Text => {
                println!();
                println!(
                    "idle submit -> Running ({} jobs one at a time over gRPC on an idle cluster; \
                     server: job submitted_at -> instance started_at, ms resolution; \
                     client: GetJob polled every 1 ms)",
                    args.idle_jobs
                );
                println!(
                    "{:<9} {:>11} {:>11} {:>11} {:>11} {:>15}",
                    "build",
                    "server p50",
                    "server p90",
                    "client p50",
                    "client p90",
                    "never Running"
                );
                for (b, f) in builds.iter().zip(&medians) {
                    println!(
                        "{:<9} {:>8.1} ms {:>8.1} ms {:>8.2} ms {:>8.2} ms {:>15}",
                        b.label,
                        f.server_p50_ms,
                        f.server_p90_ms,
                        f.client_p50_ms,
                        f.client_p90_ms,
                        f.server_missing
                    );
                }
                if medians.len() == 2 {
                    let (cur, base) = (&medians[1], &medians[0]);
                    println!(
                        "{:<9} {:>11} {:>11} {:>11} {:>11}",
                        "ratio",
                        ratio(cur.server_p50_ms, base.server_p50_ms),
                        ratio(cur.server_p90_ms, base.server_p90_ms),
                        ratio(cur.client_p50_ms, base.client_p50_ms),
                        ratio(cur.client_p90_ms, base.client_p90_ms),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Indexes of the builds in the order repetition `rep` runs them.
fn order(n: usize, rep: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if rep % 2 == 1 {
        v.reverse();
    }
    v
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn ratio(current: f64, baseline: f64) -> String {
    if baseline > 0.0 && current.is_finite() {
        format!("x{:.2}", current / baseline)
    } else {
        "-".into()
    }
}

fn emit_row(
    args: &ChurnArgs,
    kind: ClientKind,
    clients: usize,
    build: &str,
    f: &Figures,
) -> anyhow::Result<()> {
    if args.output == OutputFormat::Json {
        let mut v = serde_json::to_value(f)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), "churn".into());
            o.insert("build".into(), build.into());
            o.insert("client".into(), kind.as_str().into());
            o.insert("clients".into(), clients.into());
            o.insert("jobs".into(), args.jobs.into());
            o.insert("reps".into(), args.reps.into());
            o.insert("drain".into(), args.drain.into());
        }
        println!("{v}");
    }
    Ok(())
}

fn emit_ratio(
    args: &ChurnArgs,
    kind: ClientKind,
    clients: usize,
    cur: &Figures,
    base: &Figures,
) -> anyhow::Result<()> {
    if args.output == OutputFormat::Json {
        let r = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
        let v = serde_json::json!({
            "kind": "churn_ratio",
            "build": "current/baseline",
            "client": kind.as_str(),
            "clients": clients,
            "jobs": args.jobs,
            "accepted_per_s": r(cur.accepted_per_s, base.accepted_per_s),
            "completed_per_s": r(cur.completed_per_s, base.completed_per_s),
            "submit_p50_ms": r(cur.submit_p50_ms, base.submit_p50_ms),
            "submit_p99_ms": r(cur.submit_p99_ms, base.submit_p99_ms),
            "dev_cpu_ms_per_job": r(cur.dev_cpu_ms_per_job, base.dev_cpu_ms_per_job),
            "fsyncs_per_job": cur.fsyncs_per_job.zip(base.fsyncs_per_job).and_then(|(a, b)| r(a, b)),
            "syscw_per_job": r(cur.syscw_per_job, base.syscw_per_job),
            "write_kib_per_job": r(cur.write_kib_per_job, base.write_kib_per_job),
            "rss_mib": r(cur.rss_mib, base.rss_mib),
        });
        println!("{v}");
    }
    Ok(())
}

fn print_table(builds: &[&Build], table: &[(ClientKind, usize, Vec<Figures>)]) {
    println!();
    println!(
        "{:<6} {:>3} {:<9} {:>10} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7}  queue at each tenth",
        "client",
        "C",
        "build",
        "accepted/s",
        "completed/s",
        "p50 ms",
        "p99 ms",
        "cpu ms/j",
        "inst ms/j",
        "fsync/job",
        "syscw/job",
        "KiB/job",
        "q max",
        "RSS MiB"
    );
    for (kind, c, medians) in table {
        for (b, f) in builds.iter().zip(medians) {
            println!(
                "{:<6} {:>3} {:<9} {:>10.1} {:>11.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9} {:>9.1} {:>8.1} {:>6.0} {:>7.1}  {}",
                kind.as_str(),
                c,
                b.label,
                f.accepted_per_s,
                f.completed_per_s,
                f.submit_p50_ms,
                f.submit_p99_ms,
                f.dev_cpu_ms_per_job,
                f.instances_cpu_ms_per_job,
                f.fsyncs_per_job
                    .map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}")),
                f.syscw_per_job,
                f.write_kib_per_job,
                f.queue_max,
                f.rss_mib,
                f.queue_series
                    .iter()
                    .map(|q| format!("{q:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let [base, cur] = medians.as_slice() {
            let fsync = match (cur.fsyncs_per_job, base.fsyncs_per_job) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            };
            println!(
                "{:<6} {:>3} {:<9} {:>10} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7}",
                kind.as_str(),
                c,
                "ratio",
                ratio(cur.accepted_per_s, base.accepted_per_s),
                ratio(cur.completed_per_s, base.completed_per_s),
                ratio(cur.submit_p50_ms, base.submit_p50_ms),
                ratio(cur.submit_p99_ms, base.submit_p99_ms),
                ratio(cur.dev_cpu_ms_per_job, base.dev_cpu_ms_per_job),
                ratio(cur.instances_cpu_ms_per_job, base.instances_cpu_ms_per_job),
                fsync,
                ratio(cur.syscw_per_job, base.syscw_per_job),
                ratio(cur.write_kib_per_job, base.write_kib_per_job),
                ratio(cur.queue_max, base.queue_max),
                ratio(cur.rss_mib, base.rss_mib),
            );
        }
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "gpupool-churn-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `gpupool-scheduler dev` process.
struct Dev {
    child: std::process::Child,
    grpc_port: u16,
    metrics_port: u16,
    node_id: String,
    log: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SIGTERM stops the cluster and its instances; SIGKILL if it hangs.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    async fn start(build: &Build, dir: &Path) -> anyhow::Result<Dev> {
        let config = dir.join("config.toml");
        std::fs::write(&config, CONFIG)?;
        let (grpc_port, metrics_port, agent_port) = (free_port()?, free_port()?, free_port()?);
        let log = dir.join("dev.log");
        let child = std::process::Command::new(&build.scheduler)
            .arg("dev")
            .arg("--data-dir")
            .arg(dir.join("dev"))
            .args(["--fake-gpus", FAKE_GPUS])
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--agent-metrics-listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env_remove("GPUPOOL_ADMIN_TOKEN")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("dev.stderr"))?)
            .spawn()
            .with_context(|| format!("starting {}", build.scheduler.display()))?;
        let mut dev = Dev {
            child,
            grpc_port,
            metrics_port,
            node_id: String::new(),
            log,
        };
        // Serving, and its one node Ready with its 8 GPUs.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = dev.child.try_wait()? {
                let err = std::fs::read_to_string(dir.join("dev.stderr")).unwrap_or_default();
                anyhow::bail!("dev exited ({status}) before serving: {}", tail(&err));
            }
            if let Ok(ch) = dev.channel().await {
                let mut nodes = pb::node_service_client::NodeServiceClient::new(ch);
                if let Ok(r) = nodes.list_nodes(pb::ListNodesRequest::default()).await
                    && let Some(n) = r.into_inner().nodes.iter().find(|n| {
                        n.status == pb::NodeStatus::Ready as i32
                            && n.inventory.as_ref().is_some_and(|i| i.gpus.len() == 8)
                    })
                {
                    dev.node_id = n.node_id.clone();
                    return Ok(dev);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the dev cluster's node was not Ready after 120 s (see {})",
                dev.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// The `gpupool_jobs{state=...}` gauges.
    async fn job_gauges(&self) -> anyhow::Result<Gauges> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let mut g = Gauges::default();
        let mut seen = false;
        for line in buf.lines() {
            let Some(rest) = line.strip_prefix("gpupool_jobs{state=\"") else {
                continue;
            };
            let Some((state, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let v: f64 = value.trim().parse().unwrap_or(0.0);
            seen = true;
            match state {
                "Queued" => g.queued = v,
                "Succeeded" => g.succeeded = v,
                "Failed" | "Lost" | "Cancelled" | "Unavailable" => {
                    g.failed += v;
                    if v > 0.0 {
                        g.failed_states.push(format!("{v} {state}"));
                    }
                }
                _ => {}
            }
        }
        anyhow::ensure!(seen, "no gpupool_jobs gauge in the scheduler's /metrics");
        Ok(g)
    }
}

#[derive(Debug, Default)]
struct Gauges {
    queued: f64,
    succeeded: f64,
    failed: f64,
    failed_states: Vec<String>,
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// `/proc/PID/io`: (write_bytes, syscw). Reaped children are included.
fn io(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("write_bytes:"), field("syscw:"))
}

const PERF_EVENTS: &str = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync";

/// Whether `perf stat` can count the fsync tracepoints here; else why not.
fn perf_available() -> Result<(), String> {
    match std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", PERF_EVENTS, "--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("n/a (no perf)".into()),
        Err(e) => Err(format!("n/a (perf: {e})")),
        Ok(out) if !out.status.success() => Err(format!(
            "n/a (perf stat failed: {})",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        )),
        Ok(_) => Ok(()),
    }
}

/// `perf stat` attached to a process, counting fsync and fdatasync calls
/// (inherited by the threads and processes it starts).
struct Perf {
    child: std::process::Child,
    out: PathBuf,
}

impl Perf {
    async fn start(pid: u32, dir: &Path) -> anyhow::Result<Perf> {
        let out = dir.join("perf.csv");
        let mut child = std::process::Command::new("perf")
            .args(["stat", "-x,", "-e", PERF_EVENTS, "-o"])
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf stat")?;
        // Let it attach.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "perf stat -p {pid} exited at once ({status}): {}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        Ok(Perf { child, out })
    }

    /// SIGINT, then the calls counted.
    fn stop(mut self) -> anyhow::Result<u64> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        let mut total = 0;
        let mut seen = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() > 2 && f[2].starts_with("syscalls:sys_enter_f") {
                seen += 1;
                // `<not counted>`: the event never ran, so none happened.
                total += f[0].trim().parse::<u64>().unwrap_or(0);
            }
        }
        anyhow::ensure!(seen == 2, "cannot read perf's output:\n{text}");
        Ok(total)
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the clients share while they submit.
#[derive(Default)]
struct Progress {
    acked: AtomicUsize,
    error: Mutex<Option<String>>,
}

/// One client's submissions: latencies (ms) and when the last was
/// acknowledged.
type ClientResult = (Vec<f64>, Instant);

fn grpc_spec() -> pb::JobSpec {
    pb::JobSpec {
        kind: pb::JobKind::Training as i32,
        resources: Some(pb::Resources {
            gpus: 1,
            cpu_milli: 100,
            memory_mib: 100,
            ..Default::default()
        }),
        instances: 1,
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn grpc_client(
    channel: Channel,
    n: usize,
    progress: Arc<Progress>,
) -> anyhow::Result<ClientResult> {
    let mut jobs = pb::job_service_client::JobServiceClient::new(channel);
    let mut lat = Vec::with_capacity(n);
    let mut last = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        jobs.submit_job(pb::SubmitJobRequest {
            spec: Some(grpc_spec()),
        })
        .await
        .map_err(|s| anyhow::anyhow!("SubmitJob: {:?}: {}", s.code(), s.message()))?;
        last = Instant::now();
        lat.push((last - t).as_secs_f64() * 1000.0);
        progress.acked.fetch_add(1, Ordering::Relaxed);
    }
    Ok((lat, last))
}

async fn cli_client(
    cli: PathBuf,
    url: String,
    n: usize,
    progress: Arc<Progress>,
) -> anyhow::Result<ClientResult> {
    let mut lat = Vec::with_capacity(n);
    let mut last = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let out = tokio::process::Command::new(&cli)
            .arg("--addr")
            .arg(&url)
            .args(SUBMIT_ARGS)
            .env_remove("GPUPOOL_TOKEN")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .await
            .with_context(|| format!("running {}", cli.display()))?;
        last = Instant::now();
        anyhow::ensure!(
            out.status.success(),
            "`gpupool {}` failed ({}): {}",
            SUBMIT_ARGS.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        lat.push((last - t).as_secs_f64() * 1000.0);
        progress.acked.fetch_add(1, Ordering::Relaxed);
    }
    Ok((lat, last))
}

async fn cordon(dev: &Dev, on: bool) -> anyhow::Result<()> {
    let mut nodes = pb::node_service_client::NodeServiceClient::new(dev.channel().await?);
    let req = pb::CordonNodeRequest {
        node_id: dev.node_id.clone(),
    };
    if on {
        nodes.cordon_node(req).await?;
    } else {
        nodes.uncordon_node(req).await?;
    }
    Ok(())
}

/// One run: a fresh dev cluster, `args.jobs` jobs from `clients` clients.
async fn churn_once(
    build: &Build,
    kind: ClientKind,
    clients: usize,
    args: &ChurnArgs,
    use_perf: bool,
) -> anyhow::Result<Figures> {
    let n = args.jobs;
    let dir = Scratch::new()?;
    let dev = Dev::start(build, &dir.0).await?;
    let pid = dev.pid();
    if args.drain {
        cordon(&dev, true).await?;
    }
    // gRPC clients connect before the clock starts.
    let mut channels = Vec::new();
    if kind == ClientKind::Grpc {
        for _ in 0..clients {
            channels.push(dev.channel().await?);
        }
    }
    let perf = if use_perf {
        Some(Perf::start(pid, &dir.0).await?)
    } else {
        None
    };
    let (cpu0, (wb0, syscw0)) = (cpu(pid), io(pid));
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let share = n / clients + usize::from(i < n % clients);
        let progress = progress.clone();
        match kind {
            ClientKind::Grpc => {
                let channel = channels.pop().expect("one channel per client");
                tasks.spawn(async move {
                    let r = grpc_client(channel, share, progress.clone()).await;
                    if let Err(e) = &r {
                        *progress.error.lock().unwrap() = Some(format!("{e:#}"));
                    }
                    r
                });
            }
            ClientKind::Cli => {
                let (cli, url) = (build.cli.clone(), dev.url());
                tasks.spawn(async move {
                    let r = cli_client(cli, url, share, progress.clone()).await;
                    if let Err(e) = &r {
                        *progress.error.lock().unwrap() = Some(format!("{e:#}"));
                    }
                    r
                });
            }
        }
    }
    let deadline = start + Duration::from_secs(args.timeout_secs);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut accepted_at: Option<Instant> = None;
    let mut lat = Vec::with_capacity(n);
    let mut completion_from = start;
    let finished_at;
    loop {
        if let Some(e) = progress.error.lock().unwrap().take() {
            anyhow::bail!("a client failed: {e}");
        }
        if accepted_at.is_none() && progress.acked.load(Ordering::Relaxed) == n {
            let mut last = start;
            while let Some(r) = tasks.join_next().await {
                let (l, t) = r??;
                lat.extend(l);
                last = last.max(t);
            }
            accepted_at = Some(last);
            if args.drain {
                // The deepest the queue gets: sampled before the uncordon.
                let g = dev.job_gauges().await?;
                samples.push((start.elapsed().as_secs_f64(), g.queued));
                completion_from = Instant::now();
                cordon(&dev, false).await?;
            }
        }
        let g = dev.job_gauges().await?;
        let now = Instant::now();
        samples.push(((now - start).as_secs_f64(), g.queued));
        anyhow::ensure!(
            g.failed == 0.0,
            "jobs ended badly: {} (see {})",
            g.failed_states.join(", "),
            dev.log.display()
        );
        if accepted_at.is_some() && g.succeeded >= n as f64 {
            finished_at = now;
            break;
        }
        anyhow::ensure!(
            now < deadline,
            "not finished after {} s: {} of {n} accepted, {} succeeded, {} queued",
            args.timeout_secs,
            progress.acked.load(Ordering::Relaxed),
            g.succeeded,
            g.queued
        );
        tokio::time::sleep(POLL).await;
    }
    let (cpu1, (wb1, syscw1)) = (cpu(pid), io(pid));
    let fsyncs = perf.map(Perf::stop).transpose()?;
    let rss = rss_kib(pid);
    drop(dev);

    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let per_job = |x: u64| x as f64 / n as f64;
    let ms_per_job = |ticks: u64| per_job(ticks) / hz * 1000.0;
    let accepted_at = accepted_at.expect("set before the loop ends");
    lat.sort_by(f64::total_cmp);
    let total = samples.last().map_or(0.0, |s| s.0);
    let queue_series = (0..=10)
        .map(|k| {
            let at = total * k as f64 / 10.0;
            samples
                .iter()
                .take_while(|s| s.0 <= at + 1e-9)
                .last()
                .or(samples.first())
                .map_or(0.0, |s| s.1)
        })
        .collect();
    Ok(Figures {
        accepted: lat.len(),
        completed: n,
        accepted_per_s: n as f64 / (accepted_at - start).as_secs_f64(),
        completed_per_s: n as f64 / (finished_at - completion_from).as_secs_f64(),
        submit_p50_ms: pct(&lat, 0.5),
        submit_p99_ms: pct(&lat, 0.99),
        dev_cpu_ms_per_job: ms_per_job(cpu1.own.saturating_sub(cpu0.own)),
        instances_cpu_ms_per_job: ms_per_job(cpu1.children.saturating_sub(cpu0.children)),
        fsyncs_per_job: fsyncs.map(per_job),
        syscw_per_job: per_job(syscw1.saturating_sub(syscw0)),
        write_kib_per_job: per_job(wb1.saturating_sub(wb0)) / 1024.0,
        queue_max: samples.iter().map(|s| s.1).fold(0.0, f64::max),
        queue_series,
        rss_mib: rss as f64 / 1024.0,
    })
}

/// The idle phase: `jobs` jobs one at a time, each timed to Running.
async fn idle_once(build: &Build, jobs: usize) -> anyhow::Result<Idle> {
    let dir = Scratch::new()?;
    let dev = Dev::start(build, &dir.0).await?;
    let mut client = pb::job_service_client::JobServiceClient::new(dev.channel().await?);
    let running = pb::InstanceState::Running as i32;
    let (mut server, mut seen, mut missing) = (Vec::new(), Vec::new(), 0);
    for _ in 0..jobs {
        let t = Instant::now();
        let job = client
            .submit_job(pb::SubmitJobRequest {
                spec: Some(grpc_spec()),
            })
            .await?
            .into_inner();
        let deadline = t + Duration::from_secs(60);
        let mut first_seen = None;
        let done = loop {
            let j = client
                .get_job(pb::GetJobRequest {
                    job_id: job.job_id.clone(),
                })
                .await?
                .into_inner();
            let terminal = j.state >= pb::JobState::Succeeded as i32;
            if first_seen.is_none() && (terminal || j.instances.iter().any(|i| i.state == running))
            {
                first_seen = Some(t.elapsed());
            }
            if terminal {
                break j;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "job {} not done after 60 s ({:?})",
                j.job_id,
                pb::JobState::try_from(j.state)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        anyhow::ensure!(
            done.state == pb::JobState::Succeeded as i32,
            "job {} ended {:?}: {}",
            done.job_id,
            pb::JobState::try_from(done.state),
            done.reason
        );
        seen.push(first_seen.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0));
        let started = done.instances.first().and_then(|i| i.started_at.as_ref());
        match (done.submitted_at.as_ref(), started) {
            (Some(s), Some(r)) => server.push(
                (gpupool_proto::unix_ms_from_timestamp(r)
                    - gpupool_proto::unix_ms_from_timestamp(s)) as f64,
            ),
            _ => missing += 1,
        }
    }
    drop(dev);
    server.sort_by(f64::total_cmp);
    seen.sort_by(f64::total_cmp);
    Ok(Idle {
        jobs,
        server_p50_ms: pct(&server, 0.5),
        server_p90_ms: pct(&server, 0.9),
        server_missing: missing,
        client_p50_ms: pct(&seen, 0.5),
        client_p90_ms: pct(&seen, 0.9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn builds_alternate() {
        assert_eq!(order(2, 0), vec![0, 1]);
        assert_eq!(order(2, 1), vec![1, 0]);
        assert_eq!(order(1, 1), vec![0]);
    }
}
