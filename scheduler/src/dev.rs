//! `gpupool-scheduler dev`: a scheduler on an SQLite file in a data dir plus
//! local agents in the same process, on localhost (like `nomad agent -dev`):
//! the whole product on one machine. `--config` takes the same TOML as
//! `serve` (prices, kinds, limits, regions; dev's flags win), `--nodes N`
//! runs N agents spread over AZ1..AZ3, Ctrl-C stops the cluster and its
//! instances, and a lock keeps a second dev off the same data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::SchedulerConfig;

/// Options of the dev command.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the database and the agents' logs live.
    #[arg(long, default_value = ".gpupool-dev")]
    pub data_dir: PathBuf,
    /// Scheduler config (the TOML of `serve`: prices, [kinds.*], [limits],
    /// subscription_regions...); dev's flags override it, and the data
    /// stays in --data-dir.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Local agents to run, each its own node (spread over AZ1..AZ3).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub nodes: u32,
    /// Simulated GPUs for each local agent, e.g. 8xH100-80GB (default: real
    /// NVML, or CPU-only).
    #[arg(long, value_name = "COUNTxMODEL", value_parser = parse_fake_gpus)]
    pub fake_gpus: Option<String>,
    /// gRPC listen address (default 127.0.0.1:7070, or the config's).
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// Scheduler metrics listen address (default 127.0.0.1:9400).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Web console listen address (default 127.0.0.1:7080, or the
    /// config's).
    #[arg(long)]
    pub console_listen: Option<SocketAddr>,
    /// Metrics address of the first local agent; the others take the next
    /// ports.
    #[arg(long, default_value = "127.0.0.1:9401")]
    pub agent_metrics_listen: SocketAddr,
    /// Require this admin token (and tenant tokens) on every call. Without
    /// it (and without one in --config) the dev cluster runs without
    /// authentication: every caller is the admin.
    #[arg(long, env = "GPUPOOL_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Run every tenant's instances as this one user. Default: as root,
    /// each tenant's own ids (the agents' `tenant_uid_base`); else dev's own
    /// user.
    #[arg(long, value_name = "USER")]
    pub run_as_user: Option<String>,
    /// Leave the instances running when dev stops (by default Ctrl-C stops
    /// them with the cluster).
    #[arg(long)]
    pub keep_instances: bool,
    /// A registry (`HOST:PORT`) the agents reach over plain HTTP, e.g. a
    /// local `docker-registry` for `job submit --image` (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    pub insecure_registry: Vec<String>,
}

/// `--fake-gpus` is checked before anything starts.
fn parse_fake_gpus(spec: &str) -> Result<String, String> {
    gpupool_agent::probe::FakeGpus::parse(spec, "check")
        .map(|_| spec.to_string())
        .map_err(|e| e.to_string())
}

/// Prices dev uses when the config sets none, so billing, subscriptions and
/// conversion (R-BILL-1 needs a consumption record) can be tried.
fn dev_prices(config: &mut SchedulerConfig) -> bool {
    let b = &mut config.billing;
    let unpriced =
        b.prices.is_empty() && b.default_price == crate::domain::billing::SpecPrice::default();
    if unpriced {
        b.default_price = crate::domain::billing::SpecPrice {
            on_demand_node_hour_micros: 2_000_000,
            subscription_node_month_micros: 1_000_000_000,
            public_instance_hour_micros: 500_000,
            preemptible_instance_hour_micros: Some(200_000),
        };
    }
    if config.subscription_regions.is_empty() {
        config.subscription_regions = vec!["region-1".into()];
    }
    unpriced
}

/// The dev cluster's join token: `DATA_DIR/join-token` (0600), made once.
fn dev_join_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("join-token");
    if let Ok(text) = std::fs::read_to_string(&path)
        && !text.trim().is_empty()
    {
        return Ok(text.trim().to_string());
    }
    let token = crate::api::auth::new_token()
        .with_context(|| "cannot read /dev/urandom for the join token")?
        .replacen("gpt_", "gpj_", 1);
    let _ = std::fs::remove_file(&path);
    crate::api::auth::write_secret_file(&path, &token)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// Holds `DATA_DIR/lock` (flock) while dev runs: a second dev on the same
/// data dir is refused instead of adopting the first one's instances.
struct DataDirLock {
    /// The lock lasts as long as this descriptor.
    _file: std::fs::File,
}

impl DataDirLock {
    fn take(data_dir: &Path) -> anyhow::Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = data_dir.join("lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            anyhow::bail!(
                "another gpupool-scheduler dev (pid {}) is using {}; stop it, or pass another --data-dir",
                holder.trim(),
                data_dir.display()
            );
        }
        f.set_len(0)?;
        f.rewind()?;
        write!(f, "{}", std::process::id())?;
        Ok(Self { _file: f })
    }
}

/// The agents dev runs: config and what the banner says of each.
fn agent_configs(
    args: &DevArgs,
    data_dir: &Path,
    grpc: SocketAddr,
    join_token: &str,
    run_as_user: Option<String>,
) -> Vec<gpupool_agent::AgentConfig> {
    let n = args.nodes;
    let (first, last) = gpupool_agent::runtime::DEFAULT_PORT_RANGE;
    let span = (u32::from(last - first) + 1) / n;
    let host = gpupool_agent::probe::host_info().hostname;
    (0..n)
        .map(|i| {
            // One node keeps the layout of earlier dev clusters (node id
            // from the machine, state in DATA_DIR/agent).
            let (node_id, state_dir) = if n == 1 {
                (None, data_dir.join("agent"))
            } else {
                (
                    Some(format!("{host}-{}", i + 1)),
                    data_dir.join(format!("agent-{}", i + 1)),
                )
            };
            // Port 0 stays 0 (any free port); else the next ports.
            let mut metrics = args.agent_metrics_listen;
            if metrics.port() != 0 {
                metrics.set_port(metrics.port().checked_add(i as u16).unwrap_or(0));
            }
            let lo = first + (i * span) as u16;
            let mut c =
                gpupool_agent::AgentConfig::parse(&format!("scheduler_addr = \"http://{grpc}\""))
                    .expect("a scheduler address parses");
            c.node_id = node_id;
            c.state_dir = state_dir;
            c.metrics_listen = Some(metrics);
            c.fake_gpus = args.fake_gpus.clone();
            c.az = format!("AZ{}", i % 3 + 1);
            c.join_token = Some(join_token.to_string());
            c.max_backoff_ms = 2_000;
            c.run_as_user = run_as_user.clone();
            c.advertise_address = Some(grpc.ip().to_string());
            // Jobs see neither the scheduler's data (its database, keys)
            // nor the other agents' state.
            c.hidden_paths.push(data_dir.to_path_buf());
            if let Ok(data) = std::path::absolute(&args.data_dir) {
                c.hidden_paths.push(data);
            }
            c.port_range = [lo, lo + span as u16 - 1];
            c.stop_instances_on_exit = !args.keep_instances;
            for host in &args.insecure_registry {
                c.registries.insert(
                    host.clone(),
                    gpupool_agent::config::RegistryConfig {
                        insecure: true,
                        ca_file: None,
                    },
                );
            }
            c
        })
        .collect()
}

/// `/var/tmp/gpupool-dev-HASH` for the agents of the dev cluster in
/// `data_dir`: made 0711 and owned by us, or refused if someone else made it.
fn open_agent_root(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let hash = crate::api::auth::sha256_hex(&data_dir.display().to_string());
    let dir = Path::new("/var/tmp").join(format!("gpupool-dev-{}", &hash[..12]));
    open_agent_root_at(&dir)?;
    Ok(dir)
}

/// Makes (or checks) `dir`: a directory of ours, 0711.
fn open_agent_root_at(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = dir.to_path_buf();
    match std::fs::DirBuilder::new().mode(0o711).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        anyhow::bail!(
            "{} exists but is not a directory of this user's; remove it or pass a --data-dir other users can reach",
            dir.display()
        );
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    Ok(())
}

/// The first directory above `dir` (or `dir`) that other users cannot
/// pass through (no `o+x`): instances running as another user could not
/// reach their working directories and HOME below it by path.
fn closed_ancestor(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .find(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
        .map(Path::to_path_buf)
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let data_dir = std::path::absolute(&args.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let _lock = DataDirLock::take(&data_dir)?;
    let mut config = match &args.config {
        Some(path) => SchedulerConfig::load(path)?,
        None => SchedulerConfig {
            stop_grace_ms: 5_000,
            ..SchedulerConfig::default()
        },
    };
    if config.database_url.is_some() {
        anyhow::bail!("dev runs on SQLite in --data-dir: remove `database_url` from the config");
    }
    if config.tls.is_some() {
        anyhow::bail!(
            "dev's local agents speak plaintext on loopback: remove `[tls]` from the config"
        );
    }
    config.data_dir = data_dir.join("scheduler");
    // Flags win; else the config's address, else 7070 on loopback.
    if let Some(addr) = args.grpc_listen {
        config.grpc_listen = addr;
    }
    config.metrics_listen = Some(
        args.metrics_listen
            .or(config.metrics_listen)
            .unwrap_or_else(|| "127.0.0.1:9400".parse().unwrap()),
    );
    config.console_listen = Some(
        args.console_listen
            .or(config.console_listen)
            .unwrap_or_else(|| "127.0.0.1:7080".parse().unwrap()),
    );
    if args.admin_token.is_some() {
        config.admin_token = args.admin_token.clone();
    }
    // Even on loopback, nodes enrol with a join token (kept for agents
    // started by hand); each then holds its own credential.
    let join_token = match &config.join_token {
        Some(t) => t.clone(),
        None => dev_join_token(&data_dir)?,
    };
    config.join_token = Some(join_token.clone());
    let priced = dev_prices(&mut config);
    let flag = if args.config.is_some() {
        "--config"
    } else {
        "--admin-token"
    };
    config.check().map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    config.check_serving().map_err(|e| {
        anyhow::anyhow!("{e} (in dev: --grpc-listen beyond loopback needs --admin-token)")
    })?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let run_as_user = args.run_as_user.clone();
    // Who the instances run as, for the banner.
    let runs_as = match (&run_as_user, root) {
        (Some(user), _) => user.clone(),
        (None, true) => "each tenant's own ids".to_string(),
        (None, false) => "dev's own user".to_string(),
    };

    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (another gpupool running? use --grpc-listen)",
                config.grpc_listen
            )
        })?;
    let metrics_addr = config.metrics_listen.expect("set above");
    let console = config.console_listen.map_or("off".to_string(), |a| {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let who = if config.admin_token.is_some() {
            "sign in with the admin token, or a tenant's"
        } else {
            "authentication off: any token signs in as the admin"
        };
        format!("{scheme}://{a}/ ({who})")
    });
    let metrics = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} (use --metrics-listen)"))?;
    let grpc_addr = grpc.local_addr()?;
    let prices = config.billing.default_price;
    let auth_on = config.admin_token.is_some();
    let shared = crate::server::open(config)?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let scheduler = tokio::spawn(crate::server::serve(
        shared,
        grpc,
        Some(metrics),
        wait(stop_rx.clone()),
    ));

    // Instances that run as another user must reach their working
    // directories: when the data dir is closed to others (under a 0700
    // home, say), the agents' state goes to a directory of their own that
    // others may pass through (0711, made by us, not a stranger's).
    // Decided once: the node credentials live there, so a dev cluster's
    // agents keep their state dir across restarts.
    let recorded = data_dir.join("agents-state-dir");
    let closed = closed_ancestor(&data_dir);
    let used_before = ["agent", "agent-1"]
        .iter()
        .any(|d| data_dir.join(d).exists());
    let agent_root = match std::fs::read_to_string(&recorded) {
        Ok(dir) if !dir.trim().is_empty() => {
            let dir = PathBuf::from(dir.trim());
            open_agent_root_at(&dir)?;
            dir
        }
        _ => match (run_as_user.is_some() || root, &closed) {
            (true, Some(_)) if !used_before => {
                let dir = open_agent_root(&data_dir)?;
                std::fs::write(&recorded, dir.display().to_string())?;
                dir
            }
            _ => data_dir.clone(),
        },
    };
    let agents = agent_configs(
        &args,
        &agent_root,
        grpc_addr,
        &join_token,
        run_as_user.clone(),
    );
    let mut lines = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for config in agents {
        lines.push(format!(
            "    {} {}: metrics http://{}/metrics, ports {}-{}, state {}",
            config.node_id.as_deref().unwrap_or("(this machine's id)"),
            config.az,
            config.metrics_listen.expect("set"),
            config.port_range[0],
            config.port_range[1],
            config.state_dir.display()
        ));
        tasks.spawn(gpupool_agent::run(config, None, wait(stop_rx.clone())));
    }

    if agent_root != data_dir
        && let Some(closed) = &closed
    {
        lines.push(format!(
            "    (instances run as {} and {} is closed to other users: the agents' state is in {})",
            runs_as,
            closed.display(),
            agent_root.display()
        ));
    }
    let gpus = args.fake_gpus.as_deref().map_or(
        "real GPUs via NVML (CPU-only if no driver)".to_string(),
        |s| format!("simulated {s} each"),
    );
    let money = |m: i64| format!("{}.{:02}", m / 1_000_000, m % 1_000_000 / 10_000);

    println!(
        "gpupool dev cluster is up\n\
         \x20 scheduler gRPC : http://{grpc_addr}\n\
         \x20 web console    : {console}\n\
         \x20 metrics        : http://{metrics_addr}/metrics (scheduler)\n\
         \x20 local agents   : {} node(s), {gpus}; instances run as {}\n{}\n\
         \x20 prices         : {} (on demand {}/node-hour, subscription {}/node-month, public {}/instance-hour, preemptible {}/instance-hour)\n\
         \x20 data           : {} (agents started by hand enrol with the join_token in join-token)\n\
         \x20 authentication : {}\n\n\
         In another terminal:\n\
         \x20 gpupool node list\n\
         \x20 gpupool job submit --kind training -- echo hello\n\
         \x20 gpupool job list\n\
         \x20 gpupool job logs <JOB_ID>\n\
         (set GPUPOOL_ADDR=http://{grpc_addr} if you changed --grpc-listen)\n\
         Ctrl-C stops the cluster{}; its state stays in the data dir.",
        args.nodes,
        runs_as,
        lines.join("\n"),
        if priced {
            "dev defaults"
        } else {
            "from --config"
        },
        money(prices.on_demand_node_hour_micros),
        money(prices.subscription_node_month_micros),
        money(prices.public_instance_hour_micros),
        money(prices.public_hour_micros(true)),
        data_dir.display(),
        if auth_on {
            "on (export GPUPOOL_TOKEN=<admin token> for the CLI)"
        } else {
            "off: every caller is the admin (pass --admin-token to turn it on)"
        },
        if args.keep_instances {
            " (its instances keep running: --keep-instances)"
        } else {
            " and its instances"
        },
    );

    let mut failed = None;
    tokio::select! {
        _ = crate::shutdown_signal() => {}
        // An agent that cannot start (a taken port, a bad node) ends dev.
        Some(result) = tasks.join_next() => failed = Some(result),
    }
    let _ = stop_tx.send(true);
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    if let Some(result) = failed {
        result??;
        anyhow::bail!("a local agent stopped");
    }
    scheduler.await??;
    Ok(())
}
