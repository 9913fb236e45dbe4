//! `gpupool-scheduler dev`: a scheduler on an SQLite file in a data dir plus
//! a local agent in the same process, on localhost (like `nomad agent -dev`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::SchedulerConfig;

/// Options of the dev command.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the database and the agent's logs live.
    #[arg(long, default_value = ".gpupool-dev")]
    pub data_dir: PathBuf,
    /// Simulated GPUs for the local agent, e.g. 8xH100-80GB (default: real NVML, or CPU-only).
    #[arg(long)]
    pub fake_gpus: Option<String>,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub grpc_listen: SocketAddr,
    /// Scheduler metrics listen address.
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub metrics_listen: SocketAddr,
    /// Local agent metrics listen address.
    #[arg(long, default_value = "127.0.0.1:9401")]
    pub agent_metrics_listen: SocketAddr,
    /// Require this admin token (and tenant tokens) on every call. Without
    /// it the dev cluster runs without authentication: every caller is the
    /// admin.
    #[arg(long, env = "GPUPOOL_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
}

/// The dev cluster's join token: `DATA_DIR/join-token` (0600), made once.
fn dev_join_token(data_dir: &std::path::Path) -> anyhow::Result<String> {
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

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let data_dir = std::path::absolute(&args.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    // Even on loopback, nodes enrol with a join token (kept for agents
    // started by hand); each then holds its own credential.
    let join_token = dev_join_token(&data_dir)?;
    let config = SchedulerConfig {
        grpc_listen: args.grpc_listen,
        metrics_listen: Some(args.metrics_listen),
        data_dir: data_dir.join("scheduler"),
        stop_grace_ms: 5_000,
        admin_token: args.admin_token.clone(),
        join_token: Some(join_token.clone()),
        ..SchedulerConfig::default()
    };
    config
        .check()
        .map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
    config.check_serving().map_err(|e| {
        anyhow::anyhow!("{e} (in dev: --grpc-listen beyond loopback needs --admin-token)")
    })?;
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (another gpupool running? use --grpc-listen)",
                config.grpc_listen
            )
        })?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (use --metrics-listen)",
                args.metrics_listen
            )
        })?;
    let grpc_addr = grpc.local_addr()?;
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

    let agent_config = gpupool_agent::AgentConfig {
        scheduler_addr: format!("http://{grpc_addr}"),
        node_id: None,
        state_dir: data_dir.join("agent"),
        metrics_listen: Some(args.agent_metrics_listen),
        fake_gpus: args.fake_gpus.clone(),
        az: "AZ1".into(),
        labels: Default::default(),
        join_token: Some(join_token),
        max_backoff_ms: 2_000,
        confinement: Default::default(),
        cgroup_root: "/sys/fs/cgroup".into(),
        pids_max: 4096,
        run_as_user: None,
        mps_pipe_dir: None,
        advertise_address: Some(args.grpc_listen.ip().to_string()),
        log_max_bytes: 100 * 1024 * 1024,
        log_keep: 3,
        disk_budget_mib: 10 * 1024,
        sample_interval_ms: 1000,
        tls_ca_file: None,
        tls_cert_file: None,
        tls_key_file: None,
        tls_domain: None,
        port_range: [
            gpupool_agent::runtime::DEFAULT_PORT_RANGE.0,
            gpupool_agent::runtime::DEFAULT_PORT_RANGE.1,
        ],
    };
    let agent = tokio::spawn(gpupool_agent::run(agent_config, None, wait(stop_rx)));

    let gpus = args.fake_gpus.as_deref().map_or(
        "real GPUs via NVML (CPU-only if no driver)".to_string(),
        |s| format!("simulated {s}"),
    );
    println!(
        "gpupool dev cluster is up\n\
         \x20 scheduler gRPC : http://{grpc_addr}\n\
         \x20 metrics        : http://{}/metrics (scheduler), http://{}/metrics (agent)\n\
         \x20 local agent    : {gpus}\n\
         \x20 data           : {} (agents started by hand enrol with the join_token in join-token)\n\
         \x20 authentication : {}\n\n\
         In another terminal:\n\
         \x20 gpupool node list\n\
         \x20 gpupool job submit --kind training -- echo hello\n\
         \x20 gpupool job list\n\
         \x20 gpupool job logs <JOB_ID>\n\
         (set GPUPOOL_ADDR=http://{grpc_addr} if you changed --grpc-listen)\n\
         Ctrl-C stops the cluster; its state stays in the data dir.",
        args.metrics_listen,
        args.agent_metrics_listen,
        data_dir.display(),
        if args.admin_token.is_some() {
            "on (export GPUPOOL_TOKEN=<admin token> for the CLI)"
        } else {
            "off: every caller is the admin (pass --admin-token to turn it on)"
        }
    );

    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    agent.await??;
    scheduler.await??;
    Ok(())
}
