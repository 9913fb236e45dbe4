//! `gpupool-bench load`: a real scheduler process (`gpupool-scheduler
//! serve`, SQLite in a temp dir) driven over loopback gRPC by N simulated
//! agents in this process (fake GPUs, the real agent protocol: register,
//! session, hello, heartbeats with GPU samples) while a client submits
//! 1-GPU jobs at a fixed rate.
//!
//! `gpupool-bench load [--nodes 1000,10000] [--heartbeat-ms 5000] [--seconds 30] [--rate 500]
//! [--instance-seconds exp:20] [--seed 42] [--preload-jobs 100000]
//! [--usage-ledger-years 0] [--database-url postgres://...]`
//!
//! Instances churn: a simulated agent runs each instance it is told to
//! start for a time drawn from `--instance-seconds` (`exp:MEAN`
//! exponential, `uniform:MIN-MAX`, `fixed:S`, in seconds; node `i` draws
//! from the bench's seeded PRNG `Rng::new(seed + i)`, so each node's
//! sequence of durations is fixed by `--seed`; which job lands on which
//! node is the scheduler's), then reports it Succeeded with exit code 0.
//! It reports as the real agent's session loop does: every heartbeat
//! carries every instance it runs or has finished and not yet been told
//! to forget, and a change of phase (started: Running; exited) sends a
//! heartbeat at once; StopInstance ends an instance (Stopped, SIGTERM),
//! ForgetInstance drops a finished one. `forever` is the benchmark before
//! instances finished: commands are read and dropped, heartbeats carry no
//! instance, the jobs stay Scheduled and the cluster fills up.
//!
//! Capacity: each node has 8 GPUs, each job takes one, so the cluster has
//! `8 x nodes` GPUs against `rate x mean run` busy in steady state. The
//! default `exp:20` at 500/s keeps 10,000 busy: at 10,000 nodes (80,000
//! GPUs) every job is placed at once and no queue forms (the target: 500
//! submits/s sustained with heartbeat p99 < 10 ms, instances churning);
//! at 1,000 nodes (8,000 GPUs) the demand is deliberately above the
//! cluster, but from an empty cluster `exp:20` fills it only after about
//! 32 s of submissions (`20000 x (1 - e^(-t/20)) = 8000`), so a 20-30 s
//! window sees no queue yet; after that a queue forms and grows by at most
//! `rate - GPUs/mean` = 100 jobs/s, bounded by the window (e.g.
//! `--nodes 1000 --seconds 30 --instance-seconds exp:60` queues from
//! about 18 s on). A queue in steady state is either transient
//! (`rate x mean < GPUs`) or grows linearly: the end and max depth say
//! which.
//!
//! Reports, per cluster size:
//! - the scheduler's CPU and RSS over the window;
//! - heartbeats handled per second (ticks plus the at-once heartbeats of
//!   instance changes) and their handling time p50/p99, from the
//!   scheduler's own `gpupool_heartbeat_handle_seconds` histogram (bucket
//!   upper bounds);
//! - submits/s sustained (acknowledged submissions / window), how many
//!   were scheduled at once, and the submit latency p50/p99 as the client
//!   sees it (the SubmitJob call; submissions are open-loop at `--rate`);
//! - jobs completed per second over the window (`gpupool_jobs{state=
//!   "Succeeded"}` after minus before), the queued jobs at the end and
//!   their max (`/metrics` sampled once a second), Scheduled and Running
//!   at the end, and the GPUs against the steady-state demand;
//! - the time a restart takes to serve again with everything in the store.
//!
//! Restart-to-serving is measured with `--preload-jobs` finished jobs
//! written to the store (besides the window's) while the scheduler is
//! stopped. With `--database-url` the scheduler runs on that PostgreSQL
//! database, whose `public` schema is emptied before each cluster size.
//!
//! The scheduler binary is the `gpupool-scheduler` next to this one (as
//! cargo builds them, e.g. `target/release/`), else the one on `$PATH`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use gpupool_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::rng::Rng;

/// Options of `load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Cluster sizes (simulated nodes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub nodes: Vec<usize>,
    /// Heartbeat interval the scheduler asks of agents (ms).
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_ms: u32,
    /// Length of the measured window (s).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Job submissions per second during the window.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Finished jobs added to the store before the restart measurement.
    #[arg(long, default_value_t = 100_000)]
    pub preload_jobs: u64,
    /// Run the scheduler on this PostgreSQL database instead of SQLite
    /// (its `public` schema is dropped and recreated: use a scratch one).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Years of hourly ledger rows (100 subjects) to write into the store
    /// for the usage phase: heartbeats with nobody reading usage, then
    /// with a client walking `ListUsage` pages over all of it (0: skip).
    #[arg(long, default_value_t = 0)]
    pub usage_ledger_years: u32,
    /// How long each simulated instance runs before its agent reports it
    /// Succeeded (exit 0): `exp:MEAN` (exponential), `uniform:MIN-MAX`,
    /// `fixed:S` (seconds, fractions allowed) or `forever` (never ends,
    /// nothing reported: the benchmark before instances finished).
    #[arg(long, default_value = "exp:20")]
    pub instance_seconds: InstanceSeconds,
    /// Seed of the instance durations (each node draws from its own
    /// stream, seeded from this and its index).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// The distribution of a simulated instance's run time, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InstanceSeconds {
    /// Exponential with this mean.
    Exp(f64),
    /// Uniform between the two.
    Uniform(f64, f64),
    /// Always this long.
    Fixed(f64),
    /// Never ends.
    Forever,
}

impl std::str::FromStr for InstanceSeconds {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let seconds = |v: &str| -> Result<f64, String> {
            match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
                _ => Err(format!("{v:?} is not a number of seconds >= 0")),
            }
        };
        let shape = "expected exp:MEAN, uniform:MIN-MAX, fixed:S or forever";
        if text.trim() == "forever" {
            return Ok(InstanceSeconds::Forever);
        }
        let (kind, rest) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?}: {shape}"))?;
        match kind.trim() {
            "exp" => Ok(InstanceSeconds::Exp(seconds(rest)?)),
            "fixed" => Ok(InstanceSeconds::Fixed(seconds(rest)?)),
            "uniform" => {
                let (lo, hi) = rest
                    .split_once('-')
                    .ok_or_else(|| format!("{text:?}: uniform:MIN-MAX"))?;
                let (lo, hi) = (seconds(lo)?, seconds(hi)?);
                if lo > hi {
                    return Err(format!("{text:?}: MIN is above MAX"));
                }
                Ok(InstanceSeconds::Uniform(lo, hi))
            }
            _ => Err(format!("{text:?}: {shape}")),
        }
    }
}

impl std::fmt::Display for InstanceSeconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstanceSeconds::Exp(m) => write!(f, "exp:{m}"),
            InstanceSeconds::Uniform(lo, hi) => write!(f, "uniform:{lo}-{hi}"),
            InstanceSeconds::Fixed(s) => write!(f, "fixed:{s}"),
            InstanceSeconds::Forever => write!(f, "forever"),
        }
    }
}

impl InstanceSeconds {
    /// The mean run time (None: forever).
    pub fn mean(&self) -> Option<f64> {
        match *self {
            InstanceSeconds::Exp(m) | InstanceSeconds::Fixed(m) => Some(m),
            InstanceSeconds::Uniform(lo, hi) => Some((lo + hi) / 2.0),
            InstanceSeconds::Forever => None,
        }
    }

    /// One run time (None: forever).
    pub fn draw(&self, rng: &mut Rng) -> Option<Duration> {
        let s = match *self {
            InstanceSeconds::Exp(m) => -m * (1.0 - rng.unit()).ln(),
            InstanceSeconds::Uniform(lo, hi) => lo + (hi - lo) * rng.unit(),
            InstanceSeconds::Fixed(s) => s,
            InstanceSeconds::Forever => return None,
        };
        Some(Duration::from_secs_f64(s.clamp(0.0, 1e9)))
    }
}

const ADMIN: &str = "bench-admin-token-0123456789";
const JOIN: &str = "bench-join-token";
/// Sessions multiplexed on one HTTP/2 connection.
const SESSIONS_PER_CONNECTION: usize = 100;

/// Runs the benchmark on its own runtime (the caller may be inside one).
pub fn run_load(args: &LoadArgs) -> anyhow::Result<()> {
    let args = args.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(load(&args))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the load benchmark panicked"))?
}

async fn load(args: &LoadArgs) -> anyhow::Result<()> {
    println!(
        "load: heartbeat every {} ms, {} submissions/s for {} s, instances run {} (seed {}), \
         scheduler = {}",
        args.heartbeat_ms,
        args.rate,
        args.seconds,
        args.instance_seconds,
        args.seed,
        scheduler_binary()?.display()
    );
    let store = match &args.database_url {
        Some(url) => format!("PostgreSQL {}", gpupool_scheduler::pgstore::redact(url)),
        None => "SQLite".to_string(),
    };
    println!("store: {store}");
    for &n in &args.nodes {
        let dir = TempDir::new(n)?;
        if let Some(url) = &args.database_url {
            let url = url.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
                c.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")?;
                Ok(())
            })
            .await??;
        }
        let db = args.database_url.clone();
        let mut sched = Daemon::start(dir.path(), args.heartbeat_ms, db.as_deref()).await?;
        let t = Instant::now();
        let agents = start_agents(&sched, n, args.instance_seconds, args.seed).await?;
        wait_ready(&sched, n).await?;
        println!(
            "{n} nodes: all registered, in session and Ready after {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Let one full heartbeat round pass before measuring.
        tokio::time::sleep(Duration::from_millis(u64::from(args.heartbeat_ms))).await;
        let before_metrics = sched.metrics().await?;
        let (cpu0, t0) = (sched.cpu_ticks(), Instant::now());
        let window = Duration::from_secs(args.seconds);
        let (submits, queue) = tokio::join!(
            submit_stream(&sched, args.rate, window),
            sample_queue(sched.metrics_port, window)
        );
        let submits = submits?;
        let (cpu1, wall) = (sched.cpu_ticks(), t0.elapsed());
        let after_metrics = sched.metrics().await?;
        let jobs = |text: &str, state: &str| {
            gauge(text, &format!("gpupool_jobs{{state=\"{state}\"}}")).unwrap_or(0.0)
        };
        let succeeded = jobs(&after_metrics, "Succeeded") - jobs(&before_metrics, "Succeeded");
        let failed = jobs(&after_metrics, "Failed") - jobs(&before_metrics, "Failed");
        let queued_end = jobs(&after_metrics, "Queued");
        let queued_max = queue.iter().copied().fold(queued_end, f64::max);
        let hb = histogram_delta(
            &before_metrics,
            &after_metrics,
            "gpupool_heartbeat_handle_seconds",
        );
        // The commit pipeline (absent from schedulers before group commit).
        let commits = histogram_delta(
            &before_metrics,
            &after_metrics,
            "gpupool_store_commit_seconds",
        );
        let changes = gauge(&after_metrics, "gpupool_store_changes_total").unwrap_or(0.0)
            - gauge(&before_metrics, "gpupool_store_changes_total").unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_pct = (cpu1 - cpu0) as f64 / hz / wall.as_secs_f64() * 100.0;
        let mut lat: Vec<f64> = submits.iter().map(|s| s.0).collect();
        lat.sort_by(f64::total_cmp);
        let placed = submits.iter().filter(|s| s.1).count();
        println!(
            "{n} nodes: scheduler CPU {cpu_pct:.0}% of one core, RSS {:.0} MiB; \
             heartbeats {:.0}/s, handling p50 <= {} p99 <= {}; \
             submits sustained {:.0}/s ({} acknowledged, {placed} scheduled at once), latency p50 {:.2} ms p99 {:.2} ms",
            sched.rss_kib() as f64 / 1024.0,
            hb.count as f64 / wall.as_secs_f64(),
            hb.quantile(0.5),
            hb.quantile(0.99),
            submits.len() as f64 / wall.as_secs_f64(),
            submits.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
        );
        if commits.count > 0 {
            println!(
                "{n} nodes: store transactions {:.0}/s, {:.1} changes each, write p50 <= {} p99 <= {}",
                commits.count as f64 / wall.as_secs_f64(),
                changes / commits.count as f64,
                commits.quantile(0.5),
                commits.quantile(0.99),
            );
        }
        let gpus = n * 8;
        let demand = args.instance_seconds.mean().map_or_else(
            || "all (never end)".to_string(),
            |m| format!("{:.0}", m * args.rate as f64),
        );
        println!(
            "{n} nodes: instances {}: jobs completed {:.1}/s ({succeeded:.0} in the window{}), \
             queued at the end {queued_end:.0} (max {queued_max:.0}), \
             Scheduled {:.0} Running {:.0} at the end; \
             GPUs {gpus}, busy in steady state (rate x mean run) {demand}",
            args.instance_seconds,
            succeeded / wall.as_secs_f64(),
            if failed > 0.0 {
                format!(", {failed:.0} failed")
            } else {
                String::new()
            },
            jobs(&after_metrics, "Scheduled"),
            jobs(&after_metrics, "Running"),
        );
        if args.usage_ledger_years > 0 {
            usage_phase(&sched, dir.path(), db.as_deref(), args).await?;
        }
        for a in agents {
            a.abort();
        }
        // Restart: SIGTERM, add the preloaded jobs, start again on the same
        // store, time to serving.
        sched.stop();
        let total = preload(dir.path(), db.as_deref(), args.preload_jobs).await?;
        let t = Instant::now();
        let restarted =
            Daemon::start_in(dir.path(), args.heartbeat_ms, sched.port, db.as_deref()).await?;
        println!(
            "{n} nodes: restart to serving {:.2} s ({n} nodes, {total} jobs in the store)",
            t.elapsed().as_secs_f64(),
        );
        drop(restarted);
    }
    Ok(())
}

/// Writes years of ledger rows into the running scheduler's store (hours
/// before the ledger's closed mark, so they are read from the store), then
/// measures heartbeat handling for `--seconds` with nobody reading usage
/// (the baseline) and for `--seconds` with one client walking `ListUsage`
/// pages from the epoch, and prints both with the page latency.
async fn usage_phase(
    sched: &Daemon,
    dir: &Path,
    db: Option<&str>,
    args: &LoadArgs,
) -> anyhow::Result<()> {
    const SUBJECTS: i64 = 100;
    const HOUR: i64 = 3_600_000;
    let years = i64::from(args.usage_ledger_years);
    let path = dir.join("data").join("gpupool.db");
    let url = db.map(String::from);
    let t = Instant::now();
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        use gpupool_scheduler::store::{Record, Store};
        let store: Box<dyn Store> = match &url {
            Some(url) => Box::new(gpupool_scheduler::pgstore::PgStore::open(url, None)?),
            None => Box::new(gpupool_scheduler::store::SqliteStore::open(&path)?),
        };
        let last = gpupool_scheduler::now_ms() / HOUR * HOUR - 2 * HOUR;
        let first = last - years * 365 * 24 * HOUR;
        let mut batch = Vec::with_capacity(20_000);
        let mut rows = 0;
        let mut hour = first;
        while hour < last {
            for s in 0..SUBJECTS {
                batch.push(gpupool_scheduler::domain::billing::LedgerRow {
                    subject: format!("instance:j-bench-{s}-0"),
                    tenant: "bench".into(),
                    pool_id: "public".into(),
                    job_id: format!("j-bench-{s}"),
                    instance_id: format!("j-bench-{s}-0"),
                    spec: "gpu-8xH100-80GB".into(),
                    hour_start_ms: hour,
                    mode: gpupool_scheduler::domain::pool::BillingMode::OnDemand,
                    unit_ms: HOUR,
                    quantity: 1,
                    unit_price_micros: 1_000_000,
                    amount_micros: 1_000_000,
                    gpu_allocated_ms: HOUR,
                    gpu_used_ms: HOUR / 2,
                    preemptible: false,
                });
            }
            hour += HOUR;
            if batch.len() >= 20_000 || hour >= last {
                let records: Vec<Record<'_>> = batch.iter().map(Record::Ledger).collect();
                store.write(&records, gpupool_scheduler::now_ms())?;
                rows += batch.len() as i64;
                batch.clear();
            }
        }
        Ok(rows)
    })
    .await??;
    println!(
        "usage: {rows} ledger rows ({years} years x {SUBJECTS} subjects) written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The baseline of the old ListUsage: every row of the range read and
    // decoded in one call (then under the cluster lock, stalling every
    // heartbeat for as long).
    let path = dir.join("data").join("gpupool.db");
    let url = db.map(String::from);
    let (whole, took) = tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, f64)> {
        use gpupool_scheduler::store::Store;
        let store: Box<dyn Store> = match &url {
            Some(url) => Box::new(gpupool_scheduler::pgstore::PgStore::open(url, None)?),
            None => Box::new(gpupool_scheduler::store::SqliteStore::open_reader(&path)?),
        };
        let t = Instant::now();
        let all = store.ledger(0, gpupool_scheduler::now_ms())?;
        Ok((all.len(), t.elapsed().as_secs_f64()))
    })
    .await??;
    println!(
        "usage: reading the whole range at once (the old ListUsage, under the lock): {whole} rows in {took:.2} s"
    );
    let window = Duration::from_secs(args.seconds);
    let before = sched.metrics().await?;
    tokio::time::sleep(window).await;
    let idle = sched.metrics().await?;
    let base = histogram_delta(&before, &idle, "gpupool_heartbeat_handle_seconds");
    // A client walks every page from the epoch, over and over.
    let channel = sched.channel().await?;
    let mut usage =
        pb::usage_service_client::UsageServiceClient::with_interceptor(channel, bearer(ADMIN))
            .max_decoding_message_size(64 << 20);
    let from = Some(gpupool_proto::timestamp_from_unix_ms(0));
    let (mut lat, mut records, mut token) = (Vec::new(), 0usize, String::new());
    let end = Instant::now() + window;
    while Instant::now() < end {
        let t = Instant::now();
        let page = usage
            .list_usage(pb::ListUsageRequest {
                from,
                page_token: std::mem::take(&mut token),
                ..Default::default()
            })
            .await?
            .into_inner();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        records += page.records.len();
        token = page.next_page_token;
    }
    let after = sched.metrics().await?;
    let busy = histogram_delta(&idle, &after, "gpupool_heartbeat_handle_seconds");
    lat.sort_by(f64::total_cmp);
    println!(
        "usage: heartbeats without usage reads: p50 <= {} p99 <= {}; while a client walks \
         ListUsage: p50 <= {} p99 <= {}; {} pages ({records} records, {:.0} rows/s), \
         page latency p50 {:.1} ms p99 {:.1} ms",
        base.quantile(0.5),
        base.quantile(0.99),
        busy.quantile(0.5),
        busy.quantile(0.99),
        lat.len(),
        records as f64 / window.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
    );
    Ok(())
}

/// Adds `n` finished 1-GPU training jobs (one instance each, on nodes of
/// the store) after the jobs already there; returns the jobs now stored.
async fn preload(dir: &Path, db: Option<&str>, n: u64) -> anyhow::Result<u64> {
    let path = dir.join("data").join("gpupool.db");
    let url = db.map(String::from);
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        use gpupool_scheduler::store::{Record, Store};
        let store: Box<dyn Store> = match &url {
            Some(url) => Box::new(gpupool_scheduler::pgstore::PgStore::open(url, None)?),
            None => Box::new(gpupool_scheduler::store::SqliteStore::open(&path)?),
        };
        let snapshot = store.load()?;
        let template = snapshot
            .jobs
            .iter()
            .find(|j| !j.instances.is_empty())
            .cloned()
            .context("no placed job to copy")?;
        let nodes: Vec<String> = snapshot.nodes.iter().map(|n| n.node_id.clone()).collect();
        let first = snapshot.jobs.iter().map(|j| j.seq).max().unwrap_or(0) + 1;
        let now = gpupool_scheduler::now_ms();
        let mut batch = Vec::with_capacity(5_000);
        for seq in first..first + n {
            let mut job = template.clone();
            job.seq = seq;
            job.job_id = format!("j-{seq:06}");
            job.state = gpupool_scheduler::domain::JobState::Succeeded;
            job.finished_at_ms = Some(now);
            for inst in &mut job.instances {
                inst.instance_id = format!("{}-{}", job.job_id, inst.rank);
                inst.node_id = nodes[(seq as usize) % nodes.len().max(1)].clone();
                inst.state = gpupool_scheduler::domain::InstanceState::Succeeded;
                inst.finished_at_ms = Some(now);
            }
            batch.push(job);
            if batch.len() == 5_000 || seq + 1 == first + n {
                let records: Vec<Record<'_>> = batch.iter().map(Record::Job).collect();
                store.write(&records, now)?;
                batch.clear();
            }
        }
        Ok(snapshot.jobs.len() as u64 + n)
    })
    .await?
}

/// A scratch directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(n: usize) -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("gpupool-load-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// The scheduler process.
struct Daemon {
    child: std::process::Child,
    port: u16,
    metrics_port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `gpupool-scheduler` binary to run: the one next to this binary,
/// else the one on `$PATH`.
fn scheduler_binary() -> anyhow::Result<std::path::PathBuf> {
    crate::procs::find_binary("gpupool-scheduler", "gpupool-scheduler", "")
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Daemon {
    async fn start(dir: &Path, heartbeat_ms: u32, db: Option<&str>) -> anyhow::Result<Daemon> {
        Daemon::start_in(dir, heartbeat_ms, free_port()?, db).await
    }

    async fn start_in(
        dir: &Path,
        heartbeat_ms: u32,
        port: u16,
        db: Option<&str>,
    ) -> anyhow::Result<Daemon> {
        let metrics_port = free_port()?;
        let config = dir.join("scheduler.toml");
        std::fs::write(
            &config,
            format!(
                "grpc_listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
                 data_dir = \"{}\"\nheartbeat_interval_ms = {heartbeat_ms}\n\
                 node_grace_ms = {}\njoin_token = \"{JOIN}\"\nadmin_token = \"{ADMIN}\"\n\
                 {}\n[limits]\nrequests_per_second = 0\n",
                dir.join("data").display(),
                heartbeat_ms * 4,
                db.map(|url| format!("database_url = \"{url}\""))
                    .unwrap_or_default()
            ),
        )?;
        let child = std::process::Command::new(scheduler_binary()?)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("scheduler.log"))?)
            .spawn()
            .context("starting the scheduler")?;
        let d = Daemon {
            child,
            port,
            metrics_port,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(ch) = d.channel().await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if h.check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok()
                {
                    return Ok(d);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the scheduler did not serve");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(
            Channel::from_shared(format!("http://127.0.0.1:{}", self.port))?
                .connect()
                .await?,
        )
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    fn cpu_ticks(&self) -> u64 {
        crate::procs::cpu(self.child.id()).own
    }

    fn rss_kib(&self) -> u64 {
        crate::procs::rss_kib(self.child.id())
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        scrape(self.metrics_port).await
    }
}

/// The scheduler's `/metrics` page.
async fn scrape(metrics_port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf)
}

/// The queued jobs (`gpupool_jobs{state="Queued"}`) once a second for
/// `window`.
async fn sample_queue(metrics_port: u16, window: Duration) -> Vec<f64> {
    let end = Instant::now() + window;
    let mut depths = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
        if let Some(q) = scrape(metrics_port)
            .await
            .ok()
            .and_then(|text| gauge(&text, "gpupool_jobs{state=\"Queued\"}"))
        {
            depths.push(q);
        }
    }
    depths
}

/// The value of the sample `series` (name and labels as the text format
/// writes them) in a scrape.
fn gauge(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// An interceptor sending `authorization: Bearer TOKEN`.
fn bearer(token: &str) -> impl tonic::service::Interceptor + Clone + Send + 'static {
    let value: MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {token}").parse().expect("ASCII token");
    move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    }
}

/// A simulated agent's inventory: 8 fake H100s, 64 cores, 512 GiB.
fn inventory(i: usize) -> pb::Inventory {
    pb::Inventory {
        hostname: format!("sim-{i:05}"),
        cpu_cores: 64,
        cpu_model: "simulated".into(),
        memory_mib: 512 * 1024,
        gpus: (0..8)
            .map(|g| pb::Gpu {
                index: g,
                uuid: format!("GPU-sim-{i:05}-{g}"),
                model: "H100-80GB".into(),
                memory_total_mib: 80 * 1024,
                healthy: true,
                ..Default::default()
            })
            .collect(),
        az: format!("AZ{}", i % 3 + 1),
        fake_gpus: true,
        ..Default::default()
    }
}

/// Registers `n` agents and opens their sessions; each then heartbeats at
/// the interval the scheduler asked for, from a random phase, and runs
/// what it is told to start for a time drawn from `runs` (node `i` draws
/// from `Rng::new(seed + i)`). Aborting the returned handles ends them.
async fn start_agents(
    d: &Daemon,
    n: usize,
    runs: InstanceSeconds,
    seed: u64,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(n);
    let mut channel = d.channel().await?;
    for i in 0..n {
        if i % SESSIONS_PER_CONNECTION == 0 {
            channel = d.channel().await?;
        }
        let channel = channel.clone();
        let rng = Rng::new(seed.wrapping_add(i as u64));
        handles.push(tokio::spawn(async move {
            if let Err(err) = agent(channel, i, runs, rng).await {
                eprintln!("simulated agent {i}: {err:#}");
            }
        }));
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
    }
    Ok(handles)
}

/// An instance a simulated agent runs or has finished and not yet been
/// told to forget.
struct SimInstance {
    state: pb::InstanceState,
    exit_code: Option<i32>,
    signal: Option<i32>,
    /// When it exits by itself (None: never, or it has ended).
    ends: Option<tokio::time::Instant>,
}

/// What the real agent reports of an instance (`session::status_to_pb`),
/// less what a simulated one has not (pid, port, readiness, images).
fn sim_status(id: &str, inst: &SimInstance) -> pb::InstanceStatus {
    pb::InstanceStatus {
        instance_id: id.to_string(),
        state: inst.state as i32,
        exit_code: inst.exit_code,
        signal: inst.signal,
        ..Default::default()
    }
}

/// Obeys one command as the real agent's runtime does: StartInstance runs
/// (a start already known is a repeat and ignored), StopInstance ends it
/// (SIGTERM), ForgetInstance drops a finished one. Returns true when an
/// instance changed phase (the real agent then heartbeats at once).
fn sim_command(
    m: pb::SchedulerMessage,
    instances: &mut std::collections::BTreeMap<String, SimInstance>,
    runs: InstanceSeconds,
    rng: &mut Rng,
) -> bool {
    use pb::scheduler_message::Msg;
    match m.msg {
        Some(Msg::Start(start)) => {
            if instances.contains_key(&start.instance_id) {
                return false;
            }
            let ends = runs.draw(rng).map(|d| tokio::time::Instant::now() + d);
            instances.insert(
                start.instance_id,
                SimInstance {
                    state: pb::InstanceState::Running,
                    exit_code: None,
                    signal: None,
                    ends,
                },
            );
            true
        }
        Some(Msg::Stop(stop)) => match instances.get_mut(&stop.instance_id) {
            Some(inst) if inst.state == pb::InstanceState::Running => {
                inst.state = pb::InstanceState::Stopped;
                inst.signal = Some(libc::SIGTERM);
                inst.ends = None;
                true
            }
            _ => false,
        },
        Some(Msg::Forget(forget)) => {
            if instances
                .get(&forget.instance_id)
                .is_some_and(|i| i.state != pb::InstanceState::Running)
            {
                instances.remove(&forget.instance_id);
            }
            false
        }
        // Simulated instances write no logs and build no networks.
        Some(Msg::ReadLogs(_) | Msg::NetworkPeers(_) | Msg::NetworkHosts(_)) | None => false,
    }
}

async fn agent(
    channel: Channel,
    i: usize,
    runs: InstanceSeconds,
    mut rng: Rng,
) -> anyhow::Result<()> {
    let mut client =
        pb::agent_service_client::AgentServiceClient::with_interceptor(channel, bearer(JOIN));
    let node_id = format!("sim-{i:05}");
    let reg = client
        .register(pb::RegisterRequest {
            node_id: node_id.clone(),
            inventory: Some(inventory(i)),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await?
        .into_inner();
    let every = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(100)));
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::SessionHello {
            node_id,
            instances: Vec::new(),
        })),
    })
    .await?;
    // The session needs the node's own credential, issued at enrolment.
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("gpupool-node-token", reg.node_token.parse()?);
    let mut inbound = client.session(request).await?.into_inner();
    if runs == InstanceSeconds::Forever {
        // Commands (StartInstance...) are read and dropped: nothing runs,
        // nothing is reported (the instances stay Scheduled).
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let phase = every.mul_f64((i as f64 * 0.618_034) % 1.0);
        tokio::time::sleep(phase).await;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if tx.send(heartbeat(Vec::new())).await.is_err() {
                return Ok(());
            }
        }
    }
    // As the real agent's session loop: a heartbeat at every tick and at
    // once whenever an instance changes phase (started, exited), each with
    // every instance it runs or has finished and not yet forgotten.
    let mut instances = std::collections::BTreeMap::<String, SimInstance>::new();
    let phase = every.mul_f64((i as f64 * 0.618_034) % 1.0);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_end = instances.values().filter_map(|s| s.ends).min();
        tokio::select! {
            _ = tick.tick() => {}
            incoming = inbound.message() => {
                match incoming {
                    Ok(Some(m)) => {
                        if !sim_command(m, &mut instances, runs, &mut rng) {
                            continue;
                        }
                    }
                    // The scheduler has gone (stopped, or ended the session).
                    _ => return Ok(()),
                }
            }
            _ = tokio::time::sleep_until(next_end.unwrap_or_else(tokio::time::Instant::now)),
                if next_end.is_some() => {
                let now = tokio::time::Instant::now();
                for inst in instances.values_mut().filter(|s| s.ends.is_some_and(|e| e <= now)) {
                    inst.state = pb::InstanceState::Succeeded;
                    inst.exit_code = Some(0);
                    inst.ends = None;
                }
            }
        }
        let reported = instances
            .iter()
            .map(|(id, inst)| sim_status(id, inst))
            .collect();
        if tx.send(heartbeat(reported)).await.is_err() {
            return Ok(());
        }
    }
}

/// A heartbeat with these instances and 8 GPUs at 50%.
fn heartbeat(instances: Vec<pb::InstanceStatus>) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            sent_at: None,
            inventory: None,
            instances,
            gpu_samples: (0..8)
                .map(|g| pb::Gpu {
                    index: g,
                    utilization_pct: 50,
                    ..Default::default()
                })
                .collect(),
        })),
    }
}

async fn wait_ready(d: &Daemon, n: usize) -> anyhow::Result<()> {
    let mut nodes = pb::node_service_client::NodeServiceClient::with_interceptor(
        d.channel().await?,
        bearer(ADMIN),
    )
    .max_decoding_message_size(256 << 20);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // Page through every node.
        let (mut ready, mut page_token) = (0, String::new());
        loop {
            let page = nodes
                .list_nodes(pb::ListNodesRequest {
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            ready += page
                .nodes
                .iter()
                .filter(|n| n.status == pb::NodeStatus::Ready as i32)
                .count();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        if ready >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {ready} of {n} nodes Ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One submission: (latency ms, scheduled at once), or why it failed.
type Outcome = Result<(f64, bool), String>;

/// Submits 1-GPU jobs at `rate`/s for `window`; returns (latency ms,
/// scheduled at once) per acknowledged submission.
async fn submit_stream(
    d: &Daemon,
    rate: u64,
    window: Duration,
) -> anyhow::Result<Vec<(f64, bool)>> {
    let token = bearer(ADMIN);
    let channel = d.channel().await?;
    let results: Arc<std::sync::Mutex<Vec<Outcome>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let (channel, token, results) = (channel.clone(), token.clone(), results.clone());
        tasks.push(tokio::spawn(async move {
            let mut jobs =
                pb::job_service_client::JobServiceClient::with_interceptor(channel, token);
            let spec = pb::JobSpec {
                kind: pb::JobKind::Training as i32,
                resources: Some(pb::Resources {
                    gpus: 1,
                    cpu_milli: 1000,
                    memory_mib: 1024,
                    ..Default::default()
                }),
                instances: 1,
                command: vec!["true".into()],
                ..Default::default()
            };
            let t = Instant::now();
            let r = jobs
                .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await;
            let entry = match r {
                Ok(r) => Ok((
                    t.elapsed().as_secs_f64() * 1000.0,
                    r.into_inner().state == pb::JobState::Scheduled as i32,
                )),
                Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
            };
            results.lock().unwrap().push(entry);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let all = std::mem::take(&mut *results.lock().unwrap());
    let errors: Vec<&String> = all.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = errors.first() {
        println!("  {} submissions failed, e.g. {first}", errors.len());
    }
    Ok(all.into_iter().filter_map(Result::ok).collect())
}

/// A Prometheus histogram's increase between two scrapes.
struct Histogram {
    count: u64,
    /// (upper bound, cumulative count)
    buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// The upper bound of the bucket holding quantile `q`, as text.
    fn quantile(&self, q: f64) -> String {
        if self.count == 0 {
            return "-".into();
        }
        let want = (self.count as f64 * q).ceil() as u64;
        for (le, c) in &self.buckets {
            if *c >= want {
                return if le.is_infinite() {
                    "> 1 s".into()
                } else if *le < 1e-3 {
                    format!("{:.0} µs", le * 1e6)
                } else {
                    format!("{:.1} ms", le * 1e3)
                };
            }
        }
        "-".into()
    }
}

fn histogram_delta(before: &str, after: &str, name: &str) -> Histogram {
    let parse = |text: &str| -> (u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut buckets = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) {
                let (le, value) = rest.split_once("\"} ").unwrap_or(("", "0"));
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                buckets.push((le, value.trim().parse().unwrap_or(0)));
            } else if let Some(v) = line.strip_prefix(&format!("{name}_count ")) {
                count = v.trim().parse().unwrap_or(0);
            }
        }
        (count, buckets)
    };
    let (c0, b0) = parse(before);
    let (c1, b1) = parse(after);
    Histogram {
        count: c1.saturating_sub(c0),
        buckets: b1
            .iter()
            .map(|(le, c)| {
                let old = b0.iter().find(|(l, _)| l == le).map_or(0, |(_, c)| *c);
                (*le, c.saturating_sub(old))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_seconds_parse_and_print() {
        for (text, want) in [
            ("exp:20", InstanceSeconds::Exp(20.0)),
            ("uniform:5-60", InstanceSeconds::Uniform(5.0, 60.0)),
            ("fixed:0.5", InstanceSeconds::Fixed(0.5)),
            ("forever", InstanceSeconds::Forever),
        ] {
            let got: InstanceSeconds = text.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string().parse::<InstanceSeconds>().unwrap(), want);
        }
        for bad in [
            "exp",
            "exp:-1",
            "uniform:9-3",
            "uniform:4",
            "normal:3",
            "fixed:x",
        ] {
            assert!(bad.parse::<InstanceSeconds>().is_err(), "{bad}");
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_seed() {
        let mean = |d: InstanceSeconds, seed| {
            let mut rng = Rng::new(seed);
            (0..20_000)
                .map(|_| d.draw(&mut rng).unwrap().as_secs_f64())
                .sum::<f64>()
                / 20_000.0
        };
        assert!((mean(InstanceSeconds::Exp(20.0), 1) - 20.0).abs() < 0.6);
        assert!((mean(InstanceSeconds::Uniform(5.0, 60.0), 2) - 32.5).abs() < 0.6);
        assert_eq!(mean(InstanceSeconds::Fixed(10.0), 3), 10.0);
        assert_eq!(
            mean(InstanceSeconds::Exp(20.0), 7),
            mean(InstanceSeconds::Exp(20.0), 7)
        );
        assert!(InstanceSeconds::Forever.draw(&mut Rng::new(1)).is_none());
        let mut rng = Rng::new(4);
        assert!((0..1000).all(|_| {
            let s = InstanceSeconds::Uniform(5.0, 60.0)
                .draw(&mut rng)
                .unwrap()
                .as_secs_f64();
            (5.0..=60.0).contains(&s)
        }));
    }
}
