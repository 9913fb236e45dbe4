//! Wiring: the shared state behind every service, the gRPC server (with the
//! standard health and reflection services), the metrics endpoint, the
//! heartbeat clock, and graceful shutdown.

use crate::api::access::Guard;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use gpupool_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::cluster::{Cluster, Outbox, Settings};
use crate::config::SchedulerConfig;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::store::SqliteStore;

/// One agent's open session.
pub struct SessionHandle {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Result<pb::SchedulerMessage, Status>>,
}

/// Mutable state guarded by one lock. Never held across an `.await`.
pub struct Core {
    pub cluster: Cluster,
    pub sessions: HashMap<String, SessionHandle>,
    next_session: u64,
    /// request id -> (the node asked, where its answer goes)
    pending_logs: HashMap<u64, (String, oneshot::Sender<pb::LogChunk>)>,
    next_request: u64,
}

impl Core {
    /// Sends commands to connected agents. Commands for a node without a
    /// session are dropped here and re-derived when it reconnects (hello).
    pub fn deliver(&mut self, out: Outbox) {
        for (node_id, cmd) in out {
            match self.sessions.get(&node_id) {
                Some(session) => {
                    let _ = session.tx.send(Ok(crate::api::command_to_pb(cmd)));
                }
                None => {
                    tracing::debug!(node = %node_id, ?cmd, "node not connected; command waits for reconnect")
                }
            }
        }
    }

    pub fn open_session(
        &mut self,
        node_id: &str,
        tx: mpsc::UnboundedSender<Result<pb::SchedulerMessage, Status>>,
    ) -> u64 {
        self.next_session += 1;
        let id = self.next_session;
        if self
            .sessions
            .insert(node_id.to_string(), SessionHandle { id, tx })
            .is_some()
        {
            tracing::info!(node = %node_id, "replacing an older session of the node");
        }
        id
    }

    /// True while session `id` is the node's current one.
    pub fn session_is(&self, node_id: &str, id: u64) -> bool {
        self.sessions.get(node_id).is_some_and(|s| s.id == id)
    }

    /// Forgets the node's session if nobody reads it any more.
    pub fn drop_closed_session(&mut self, node_id: &str) {
        if self.sessions.get(node_id).is_some_and(|s| s.tx.is_closed()) {
            self.sessions.remove(node_id);
        }
    }

    pub fn close_session(&mut self, node_id: &str, id: u64) {
        if self.sessions.get(node_id).is_some_and(|s| s.id == id) {
            self.sessions.remove(node_id);
        }
    }

    /// Sends a ReadLogs to a node; the answer arrives on the receiver
    /// (with the request id, for [`Core::cancel_log`]). At most
    /// `max_pending` reads wait for agents at once.
    pub fn request_log(
        &mut self,
        node_id: &str,
        instance_id: &str,
        offset: u64,
        max_bytes: u32,
        max_pending: usize,
    ) -> Result<(u64, oneshot::Receiver<pb::LogChunk>), Status> {
        if self.pending_logs.len() >= max_pending {
            return Err(Status::resource_exhausted(format!(
                "{max_pending} log reads already wait for agents (`[limits] pending_log_reads`); retry shortly"
            )));
        }
        let session = self.sessions.get(node_id).ok_or_else(|| {
            Status::unavailable(format!(
                "node {node_id} is not connected; its logs cannot be read now"
            ))
        })?;
        self.next_request += 1;
        let request_id = self.next_request;
        let (tx, rx) = oneshot::channel();
        let msg = pb::SchedulerMessage {
            msg: Some(pb::scheduler_message::Msg::ReadLogs(pb::ReadLogs {
                request_id,
                instance_id: instance_id.to_string(),
                offset,
                max_bytes,
            })),
        };
        session
            .tx
            .send(Ok(msg))
            .map_err(|_| Status::unavailable(format!("node {node_id} disconnected")))?;
        self.pending_logs
            .insert(request_id, (node_id.to_string(), tx));
        Ok((request_id, rx))
    }

    /// Forgets a log read whose answer is no longer awaited (timed out).
    pub fn cancel_log(&mut self, request_id: u64) {
        self.pending_logs.remove(&request_id);
    }

    /// An answer to a log read, from `node_id`'s session: accepted only
    /// from the node that was asked.
    pub fn resolve_log(&mut self, node_id: &str, chunk: pb::LogChunk) {
        match self.pending_logs.get(&chunk.request_id) {
            Some((asked, _)) if asked == node_id => {
                if let Some((_, tx)) = self.pending_logs.remove(&chunk.request_id) {
                    let _ = tx.send(chunk);
                }
            }
            Some((asked, _)) => tracing::warn!(
                node = %node_id, asked = %asked, request = chunk.request_id,
                "ignoring a log answer from a node that was not asked"
            ),
            None => {}
        }
    }
}

/// What every service holds.
pub struct Shared {
    core: Mutex<Core>,
    pub config: SchedulerConfig,
    pub metrics: Metrics,
    /// Per-caller request budgets (`[limits]`).
    pub limiter: Mutex<crate::api::limits::RateLimiter>,
    /// Set when a replica stops serving to stand by again (not a process
    /// shutdown: systemd is not told STOPPING).
    pub stepping_down: std::sync::atomic::AtomicBool,
    /// Open log streams per caller (`[limits] log_streams_per_caller`).
    log_streams: Mutex<HashMap<String, u32>>,
    /// Reads the ledger without the cluster lock (SQLite: a second
    /// connection), when the store gives one.
    ledger_reader: Option<Mutex<Box<dyn crate::store::Store>>>,
}

/// One open log stream of a caller; closing it (drop) frees the slot.
pub struct LogStreamSlot {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for LogStreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .log_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Shared {
    /// Runs `f` on the core with an outbox; what it wrote is committed in
    /// one transaction, and only then is the outbox delivered. If the commit
    /// fails, memory is reloaded from the (unchanged) store and the outbox
    /// dropped; the failure is logged. For reads and for what agents and
    /// the clock drive; a client's mutation uses [`Shared::mutate`], which
    /// reports the failure.
    pub fn with<T>(&self, f: impl FnOnce(&mut Core, &mut Outbox) -> T) -> T {
        let mut value = None;
        self.with_committed(|core, out| value = Some(f(core, out)));
        value.expect("the closure ran")
    }

    /// [`Shared::with`], answering `None` when the commit failed (and the
    /// change was undone), for callers that act on what was committed.
    pub fn with_committed<T>(&self, f: impl FnOnce(&mut Core, &mut Outbox) -> T) -> Option<T> {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Outbox::new();
        let now = now_ms();
        core.cluster.begin(now);
        let result = f(&mut core, &mut out);
        match core.cluster.commit(now_ms()) {
            Ok(()) => {
                core.deliver(out);
                Some(result)
            }
            Err(err) => {
                tracing::error!(error = %err, cause = ?std::error::Error::source(&err), "cannot persist state; change undone");
                None
            }
        }
    }

    /// A client's mutation: staged, written in one transaction, and only
    /// then applied (commands to agents sent). If `f` fails, or the write
    /// does, memory, store and agents stay exactly as they were and the
    /// caller gets the error.
    pub fn mutate<T, E>(
        &self,
        f: impl FnOnce(&mut Core, &mut Outbox) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<crate::cluster::ClusterError>,
    {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Outbox::new();
        let now = now_ms();
        core.cluster.begin(now);
        match f(&mut core, &mut out) {
            Ok(value) => match core.cluster.commit(now_ms()) {
                Ok(()) => {
                    core.deliver(out);
                    Ok(value)
                }
                Err(err) => Err(E::from(crate::cluster::ClusterError::Store(err))),
            },
            Err(err) => {
                core.cluster.rollback(now_ms());
                Err(err)
            }
        }
    }
}

impl Shared {
    /// One page of closed ledger rows through the separate reader (or, if
    /// there is none, under the cluster lock).
    pub fn read_ledger(
        &self,
        q: &crate::store::LedgerQuery,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, crate::cluster::ClusterError> {
        match &self.ledger_reader {
            Some(reader) => Ok(reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ledger_page(q)?),
            None => self.with(|core, _| core.cluster.ledger_page(q)),
        }
    }

    /// Every closed ledger row of `q` (its limit ignored), read a page of
    /// 10,000 at a time, so no single read holds anything for long.
    pub fn read_ledger_all(
        &self,
        q: &crate::store::LedgerQuery,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, crate::cluster::ClusterError> {
        let mut q = q.clone();
        q.limit = 10_000;
        let mut all = Vec::new();
        loop {
            let page = self.read_ledger(&q)?;
            let full = page.len() == q.limit;
            q.after = page.last().map(crate::store::LedgerQuery::key);
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// The `/metrics` page: the gauges sampled under the lock, encoded
    /// outside it.
    pub fn render_metrics(&self) -> String {
        self.with(|core, _| self.metrics.sample(&core.cluster, core.sessions.len()));
        self.metrics.encode()
    }

    /// Takes one of the caller's log stream slots, or says the cap is reached.
    pub fn open_log_stream(self: &Arc<Self>, key: &str) -> Result<LogStreamSlot, Status> {
        let cap = self.config.limits.log_streams_per_caller;
        let mut open = self.log_streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.to_string()).or_insert(0);
        if *n >= cap {
            return Err(Status::resource_exhausted(format!(
                "{key} already has {cap} log streams open (`[limits] log_streams_per_caller`); close one first"
            )));
        }
        *n += 1;
        Ok(LogStreamSlot {
            shared: self.clone(),
            key: key.to_string(),
        })
    }
}

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

/// Loads the cluster from `store` (described as `what` in the log).
pub fn open_with(
    config: SchedulerConfig,
    store: Box<dyn crate::store::Store>,
    what: &str,
) -> anyhow::Result<Arc<Shared>> {
    let token_key = load_secret_key(&config)?;
    let settings = Settings {
        token_key,
        node_grace_ms: i64::from(config.node_grace_ms),
        stop_grace_ms: config.stop_grace_ms,
        subscription_regions: config.subscription_regions.clone(),
        currency: config.billing.currency.clone(),
        prices: config.billing.prices.clone(),
        default_price: config.billing.default_price,
        frozen_retention_ms: i64::from(config.billing.frozen_retention_hours) * 3_600_000,
        kinds: config.kind_table().map_err(anyhow::Error::msg)?,
        limits: crate::cluster::JobLimits {
            max_retries: config.limits.max_retries,
            retry_backoff_ms: config.limits.retry_backoff_ms,
            retry_backoff_max_ms: config.limits.retry_backoff_max_ms,
            finished_job_retention_ms: i64::from(config.limits.finished_job_retention_hours)
                * 3_600_000,
        },
    };
    let cluster = Cluster::load(store, settings, now_ms())?;
    let ledger_reader = cluster.store_reader().map(Mutex::new);
    tracing::info!(
        database = %what,
        nodes = cluster.nodes().count(),
        jobs = cluster.jobs().count(),
        "state loaded"
    );
    Ok(Arc::new(Shared {
        core: Mutex::new(Core {
            cluster,
            sessions: HashMap::new(),
            next_session: 0,
            pending_logs: HashMap::new(),
            next_request: 0,
        }),
        limiter: Mutex::new(crate::api::limits::RateLimiter::new(
            config.limits.requests_per_second,
            config.limits.burst,
        )),
        config,
        metrics: Metrics::new(),
        stepping_down: Default::default(),
        log_streams: Default::default(),
        ledger_reader,
    }))
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
    let max_request = shared.config.limits.max_request_bytes;
    let addr = grpc.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
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
        ))
        .add_service(Guard::new(
            pb::job_service_server::JobServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
        ))
        .add_service(Guard::new(
            pb::node_service_server::NodeServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
        ))
        .add_service(Guard::new(
            pb::pool_service_server::PoolServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
        ))
        .add_service(Guard::new(
            pb::usage_service_server::UsageServiceServer::new(api.clone())
                .max_decoding_message_size(max_request),
            shared.clone(),
        ))
        .add_service(Guard::new(
            pb::tenant_service_server::TenantServiceServer::new(api)
                .max_decoding_message_size(max_request),
            shared.clone(),
        ))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    tracing::info!(%addr, "gRPC listening");
    if shared.config.admin_token.is_none() {
        tracing::warn!(
            "no admin_token configured: authentication is OFF and every caller is the admin"
        );
    }
    let mut grpc_task = tokio::spawn(grpc_server);
    gpupool_agent::sdnotify::notify("READY=1\nSTATUS=serving");
    let watchdog = gpupool_agent::sdnotify::watchdog_interval();

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
                            gpupool_agent::sdnotify::notify("WATCHDOG=1");
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
                                flushed_now = Some(now);
                            }
                            core.cluster.close_hours(now)
                        });
                        // Only what was committed counts.
                        if let Some(closed) = closed {
                            shared.metrics.count_ledger(&closed);
                            if let Some(now) = flushed_now {
                                flushed = now;
                            }
                        }
                    }
                    _ = stop.wait_for(|s| *s) => {
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
        gpupool_agent::sdnotify::notify("STOPPING=1");
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
    tracing::info!("stopped");
    Ok(())
}
