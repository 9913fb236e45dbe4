//! Wiring: opens the store and loads the shared state ([`crate::state`]),
//! then runs the gRPC server (with the standard health and reflection
//! services, every service behind the access guard), the metrics endpoint
//! and the clock, until the shutdown future resolves; then shuts them down
//! in order. No request handling and no state of its own.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use gpupool_proto::v1 as pb;
use tokio::sync::watch;

use crate::api::access::Guard;
use crate::api::limits::RateLimiter;
use crate::config::SchedulerConfig;
use crate::now_ms;
use crate::state::Shared;
use crate::store::SqliteStore;

/// The key notebook tokens are derived from: `secret_key_file`, or
/// `DATA_DIR/secret.key`, made (32 random bytes, hex, 0600) if missing.
fn load_secret_key(config: &SchedulerConfig) -> anyhow::Result<crate::cluster::SecretKey> {
    use std::io::Read;
    let path = config
        .secret_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("secret.key"));
    let decode = |text: &str| -> Option<Vec<u8>> {
        let text = text.trim().as_bytes();
        if text.len() < 64 || text.len() % 2 != 0 || !text.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        text.chunks(2)
            .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
            .collect()
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                tracing::warn!(file = %path.display(), "the secret key file is readable by others than its owner; chmod 600 it");
            }
            decode(&text)
                .map(crate::cluster::SecretKey)
                .with_context(|| {
                    format!(
                        "{} is not a key of 32 or more hex-encoded bytes",
                        path.display()
                    )
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && config.secret_key_file.is_none() => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
            let mut key = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            crate::api::auth::write_secret_file(&path, &hex)
                .with_context(|| format!("cannot create {}", path.display()))?;
            tracing::info!(file = %path.display(), "made the secret key for notebook tokens");
            Ok(crate::cluster::SecretKey(key.to_vec()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the secret key {}", path.display())),
    }
}

/// Opens the SQLite store and loads the cluster.
pub fn open(config: SchedulerConfig) -> anyhow::Result<Arc<Shared>> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let db = config.database_path();
    let store = SqliteStore::open(&db)?;
    open_with(config, Box::new(store), &db.display().to_string())
}

/// Loads the cluster from `store` (described as `what` in the log), with
/// the secret key of `config`.
pub fn open_with(
    config: SchedulerConfig,
    store: Box<dyn crate::store::Store>,
    what: &str,
) -> anyhow::Result<Arc<Shared>> {
    let token_key = load_secret_key(&config)?;
    Ok(crate::state::load(config, store, token_key, what)?)
}

/// The server side of `[tls]`.
fn server_tls(tls: &crate::config::TlsConfig) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).with_context(|| format!("cannot read TLS {what} {}", path.display()))
    };
    let mut config =
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            read(&tls.cert_file, "certificate")?,
            read(&tls.key_file, "key")?,
        ));
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                ca,
                "client CA",
            )?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// Serves gRPC on `grpc` and metrics on `metrics` until `shutdown`
/// resolves, then stops taking requests, ends agent sessions and returns.
pub async fn serve(
    shared: Arc<Shared>,
    grpc: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in [
        "gpupool.v1.AgentService",
        "gpupool.v1.JobService",
        "gpupool.v1.NodeService",
        "gpupool.v1.PoolService",
        "gpupool.v1.UsageService",
        "gpupool.v1.TenantService",
        "",
    ] {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gpupool_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gpupool_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let api = crate::api::client::Api {
        shared: shared.clone(),
    };
    let agent = crate::api::agent::AgentApi {
        shared: shared.clone(),
    };
    // Per-caller request budgets (`[limits]`), one for every service.
    let limiter = Arc::new(Mutex::new(RateLimiter::new(
        shared.config.limits.requests_per_second,
        shared.config.limits.burst,
    )));
    let max_request = shared.config.limits.max_request_bytes;
    let addr = grpc.local_addr()?;
    // The web console: the same services behind the same guards, in process.
    let console_task = match shared.config.console_listen {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on console_listen {at}"))?;
            let console = crate::console::Console::new(shared.clone(), limiter.clone())?;
            tracing::info!(addr = %listener.local_addr()?, tls = shared.config.tls.is_some(), "console listening");
            let stop = stopped(stop_rx.clone());
            Some(tokio::spawn(async move {
                if let Err(err) = crate::console::serve(listener, console, stop).await {
                    tracing::error!(error = %err, "console server failed");
                }
            }))
        }
        None => None,
    };
    let incoming = crate::net::nodelay_incoming(grpc);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &shared.config.tls {
        builder = builder.tls_config(server_tls(tls)?)?;
        tracing::info!(
            mutual = tls.client_ca_file.is_some(),
            agents_need_cert = tls.require_agent_client_cert,
            "gRPC over TLS"
        );
    }
    let grpc_server = builder
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(Guard::new(
            pb::agent_service_server::AgentServiceServer::new(agent)
                .max_decoding_message_size(max_request.saturating_mul(4)),
            shared.clone(),
            limiter.clone(),
        ))
        .add_service(Guard::new(
            pb::job_service_server::JobServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
            limiter.clone(),
        ))
        .add_service(Guard::new(
            pb::node_service_server::NodeServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
            limiter.clone(),
        ))
        .add_service(Guard::new(
            pb::pool_service_server::PoolServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
            limiter.clone(),
        ))
        .add_service(Guard::new(
            pb::usage_service_server::UsageServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
            limiter.clone(),
        ))
        .add_service(Guard::new(
            pb::audit_service_server::AuditServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
            limiter.clone(),
        ))
        .add_service(Guard::new(
            pb::tenant_service_server::TenantServiceServer::new(api)
                .max_decoding_message_size(max_request),
            shared.clone(),
            limiter.clone(),
        ))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    tracing::info!(%addr, "gRPC listening");
    if shared.config.admin_token.is_none() {
        tracing::warn!(
            "no admin_token configured: authentication is OFF and every caller is the admin"
        );
    }
    let mut grpc_task = tokio::spawn(grpc_server);
    gpupool_common::sdnotify::notify("READY=1\nSTATUS=serving");
    let watchdog = gpupool_common::sdnotify::watchdog_interval();

    let metrics_task = match metrics {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            let shared = shared.clone();
            let stop = stopped(stop_rx.clone());
            Some(tokio::spawn(async move {
                let render = move || shared.render_metrics();
                if let Err(err) = crate::metrics::serve(listener, render, stop).await {
                    tracing::error!(error = %err, "metrics server failed");
                }
            }))
        }
        None => None,
    };

    // The clock: readiness, subscriptions, queued jobs, ledger hours.
    let ticker = {
        let shared = shared.clone();
        let period = Duration::from_millis(
            u64::from(shared.config.heartbeat_interval_ms.clamp(100, 1000)) / 2,
        );
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            let mut flushed = now_ms();
            let mut fed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        // systemd's watchdog is fed from this clock, which
                        // takes the cluster lock: a wedged scheduler starves it.
                        if let Some(every) = watchdog
                            && fed.elapsed() >= every.min(period)
                        {
                            gpupool_common::sdnotify::notify("WATCHDOG=1");
                            fed = tokio::time::Instant::now();
                        }
                        let mut flushed_now = None;
                        let closed = shared.with_committed(|core, out| {
                            let now = now_ms();
                            core.cluster.tick(now, out);
                            // Utilization samples reach the store once a
                            // minute; finished jobs past their retention go.
                            if now - flushed >= 60_000 {
                                core.cluster.flush_samples(flushed, now);
                                core.cluster.forget_finished_jobs(now);
                                let days = shared.config.audit.retention_days;
                                if days > 0 {
                                    let before = now - i64::from(days) * 86_400_000;
                                    if let Err(err) = core.cluster.prune_audit(before, now) {
                                        tracing::error!(error = %crate::ErrorChain(&err), "cannot prune the audit trail");
                                    }
                                }
                                flushed_now = Some(now);
                            }
                            core.cluster.close_hours(now)
                        }).await;
                        // Only what was committed counts.
                        if let Some(closed) = closed {
                            shared.metrics.count_ledger(&closed);
                            if let Some(now) = flushed_now {
                                flushed = now;
                            }
                        }
                    }
                    // (No watch::Ref in select's output: it is not Send.)
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                        shared.with(|core, _| core.cluster.flush_samples(flushed, now_ms()));
                        return;
                    }
                }
            }
        })
    };

    tokio::select! {
        _ = shutdown => {}
        result = &mut grpc_task => {
            result??;
            anyhow::bail!("gRPC server stopped unexpectedly");
        }
    }
    tracing::info!("shutting down");
    if !shared
        .stepping_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        gpupool_common::sdnotify::notify("STOPPING=1");
    }
    let _ = health_reporter;
    let _ = stop_tx.send(true);
    // End agent sessions so the server's graceful shutdown can finish.
    shared.with(|core, _| core.sessions.clear());
    let _ = ticker.await;
    match tokio::time::timeout(Duration::from_secs(5), &mut grpc_task).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!("open streams did not finish within 5s; closing them");
            grpc_task.abort();
        }
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(task) = console_task {
        // Open pages (a log being followed) get no longer than the streams.
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!("console connections did not finish within 5s; closed");
        }
    }
    tracing::info!("stopped");
    Ok(())
}
