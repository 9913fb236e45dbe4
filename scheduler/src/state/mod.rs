//! The shared state behind every service: the cluster behind one lock, the
//! agents' sessions (`sessions.rs`), the config and the metrics, and the
//! audited call a task is handling (`audit.rs`). Every
//! change runs through here: staged under the lock, committed after it by
//! the commit pipeline (`commit.rs`: one transaction for every change
//! queued meanwhile), and only then delivered to agents and acknowledged.
//!
//! No protobuf and no `tonic` here: what goes down a session is
//! [`ToAgent`], what this layer refuses is a [`StateError`]; the gRPC layer
//! ([`crate::api`]) converts both at its edge. Nor does it read files or
//! randomness: [`load`] is handed the store and the secret key (the one
//! file it writes is the audit trail's JSON lines copy, `[audit]
//! jsonl_file`).

pub mod audit;
mod commit;
mod sessions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use sessions::{LogChunk, LogRead, SessionHandle, Sessions, ToAgent};

use commit::{Done, Pipeline, SharedStore};

use crate::cluster::{Cluster, ClusterError, JobLimits, Outbox, SecretKey, Settings};
use crate::config::SchedulerConfig;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::store::{Store, StoreError};

/// What the shared state refuses (the cluster's own refusals are
/// [`ClusterError`]s).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "{max_pending} log reads already wait for agents (`[limits] pending_log_reads`); retry shortly"
    )]
    TooManyLogReads { max_pending: usize },
    #[error("node {node_id} is not connected; its logs cannot be read now")]
    NodeNotConnected { node_id: String },
    #[error("node {node_id} disconnected")]
    NodeDisconnected { node_id: String },
    #[error(
        "{caller} already has {cap} log streams open (`[limits] log_streams_per_caller`); close one first"
    )]
    TooManyLogStreams { caller: String, cap: u32 },
}

/// Why the state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The `[kinds.*]` tables do not make a kind table, or `[networks]`
    /// no address plan.
    #[error("{0}")]
    Kinds(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Mutable state guarded by one lock. Never held across an `.await`.
pub struct Core {
    pub cluster: Cluster,
    pub sessions: Sessions,
    next_session: u64,
    /// request id -> (the node asked, where its answer goes)
    pending_logs: HashMap<u64, (String, tokio::sync::oneshot::Sender<LogChunk>)>,
    next_request: u64,
}

/// What every service holds.
pub struct Shared {
    core: Mutex<Core>,
    pub config: SchedulerConfig,
    pub metrics: Metrics,
    /// Set when a replica stops serving to stand by again (not a process
    /// shutdown: systemd is not told STOPPING).
    pub stepping_down: std::sync::atomic::AtomicBool,
    /// Open log streams per caller (`[limits] log_streams_per_caller`).
    log_streams: Mutex<HashMap<String, u32>>,
    /// Reads the ledger without the cluster lock (SQLite: a second
    /// connection), when the store gives one.
    ledger_reader: Option<Mutex<Box<dyn Store>>>,
    /// Where staged changes go to be committed (see `commit.rs`).
    pipeline: Arc<Pipeline>,
    /// The pipeline's writer thread, joined when the state goes.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Where committed audit records go besides the store.
    audit_sink: Arc<AuditSink>,
    /// Stranded-capacity reports by view, with when they were made (see
    /// [`Shared::capacity_view`]).
    capacity_cache: Mutex<CapacityCache>,
}

/// (admin, tenant, pool as asked) -> (made at, report).
type CapacityCache =
    HashMap<(bool, String, String), (std::time::Instant, Arc<Vec<crate::cluster::PoolStranded>>)>;

/// How long a stranded-capacity report is served again.
pub const CAPACITY_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Committed audit records: counted, and appended to `[audit] jsonl_file`
/// if there is one, by a thread of its own (`audit-jsonl`): the commit
/// writer only hands the record over, so a slow or stuck file never holds
/// up commits. Records queue in commit order, at most
/// [`AuditSink::QUEUE`]; past that they are counted in
/// `gpupool_audit_jsonl_dropped_total` and logged, not written (the store
/// has every one). What is queued is written before the scheduler exits,
/// waiting at most [`AuditSink::CLOSE_WAIT`] for a file that does not take
/// it.
struct AuditSink {
    tx: Mutex<Option<std::sync::mpsc::SyncSender<crate::domain::audit::AuditEntry>>>,
    /// Disconnected when the thread has written everything and ended.
    ended: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    records: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
}

impl AuditSink {
    const QUEUE: usize = 65_536;
    const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(
        path: Option<std::path::PathBuf>,
        records: prometheus::IntCounter,
        dropped: prometheus::IntCounter,
    ) -> AuditSink {
        let (tx, ended) = match path {
            Some(path) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(Self::QUEUE);
                let (end_tx, ended) = std::sync::mpsc::channel::<()>();
                std::thread::Builder::new()
                    .name("audit-jsonl".into())
                    .spawn(move || {
                        append_lines(&path, rx);
                        drop(end_tx);
                    })
                    .expect("spawn the audit-jsonl thread");
                (Some(tx), Some(ended))
            }
            None => (None, None),
        };
        AuditSink {
            tx: Mutex::new(tx),
            ended: Mutex::new(ended),
            records,
            dropped,
        }
    }

    fn committed(&self, entry: &crate::domain::audit::AuditEntry) {
        self.records.inc();
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else {
            return;
        };
        if let Err(std::sync::mpsc::TrySendError::Full(entry)) = tx.try_send(entry.clone()) {
            self.dropped.inc();
            let n = self.dropped.get();
            if n == 1 || n.is_multiple_of(1000) {
                tracing::error!(
                    seq = entry.seq,
                    dropped = n,
                    "the audit log file's writer is behind; records are not appended to it (the store has them)"
                );
            }
        }
    }

    /// Writes what is queued, then stops the thread (waiting at most
    /// [`AuditSink::CLOSE_WAIT`]: a stuck file does not hold up exit).
    fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(ended) = self.ended.lock().unwrap_or_else(|e| e.into_inner()).take()
            && let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                ended.recv_timeout(Self::CLOSE_WAIT)
        {
            tracing::error!(
                "the audit log file took no more records; the last ones are only in the store"
            );
        }
    }
}

/// The `audit-jsonl` thread: one JSON line per record received, the file
/// (mode 0600) opened at the first and again after a failed write.
fn append_lines(
    path: &std::path::Path,
    rx: std::sync::mpsc::Receiver<crate::domain::audit::AuditEntry>,
) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file: Option<std::fs::File> = None;
    for entry in rx {
        if file.is_none() {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
            {
                Ok(f) => file = Some(f),
                Err(err) => {
                    tracing::error!(file = %path.display(), error = %err, "cannot open the audit log file");
                    continue;
                }
            }
        }
        let mut line = serde_json::to_string(&entry).unwrap_or_default();
        line.push('\n');
        if let Some(f) = file.as_mut()
            && let Err(err) = f.write_all(line.as_bytes())
        {
            tracing::error!(file = %path.display(), error = %err, "cannot append to the audit log file");
            file = None;
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // What is queued is written before the store closes.
        self.pipeline.close();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
        // Then the audit lines those commits queued.
        self.audit_sink.close();
    }
}

/// Loads the cluster from `store` (described as `what` in the log), its
/// notebook tokens derived from `token_key`, with the settings of `config`.
pub fn load(
    config: SchedulerConfig,
    store: Box<dyn Store>,
    token_key: SecretKey,
    what: &str,
) -> Result<Arc<Shared>, LoadError> {
    let settings = Settings {
        token_key,
        node_grace_ms: i64::from(config.node_grace_ms),
        stop_grace_ms: config.stop_grace_ms,
        preemption_min_runtime_ms: (config.preemption_min_runtime_secs as i64).saturating_mul(1000),
        fair_share_half_life_ms: (config.fair_share_half_life_secs as i64).saturating_mul(1000),
        fair_share_preemption: config.fair_share_preemption,
        subscription_regions: config.subscription_regions.clone(),
        currency: config.billing.currency.clone(),
        prices: config.billing.prices.clone(),
        default_price: config.billing.default_price,
        frozen_retention_ms: i64::from(config.billing.frozen_retention_hours) * 3_600_000,
        kinds: config.kind_table().map_err(LoadError::Kinds)?,
        networks: config.networks.plan().map_err(LoadError::Kinds)?,
        custom_networks: std::sync::Arc::new(config.networks.custom().map_err(LoadError::Kinds)?),
        limits: JobLimits {
            max_retries: config.limits.max_retries,
            retry_backoff_ms: config.limits.retry_backoff_ms,
            retry_backoff_max_ms: config.limits.retry_backoff_max_ms,
            finished_job_retention_ms: i64::from(config.limits.finished_job_retention_hours)
                * 3_600_000,
        },
    };
    let store = SharedStore(Arc::new(Mutex::new(store)));
    let cluster = Cluster::load(Box::new(store.clone()), settings, now_ms())?;
    let ledger_reader = cluster.store_reader().map(Mutex::new);
    let metrics = Metrics::new();
    let sessions = Sessions::default();
    let (pipeline, writer) = Pipeline::start(
        store,
        sessions.clone(),
        commit::Counters {
            transactions: metrics.store_transactions.clone(),
            batches: metrics.store_changes.clone(),
            seconds: metrics.store_commit_seconds.clone(),
        },
    );
    tracing::info!(
        database = %what,
        nodes = cluster.nodes().count(),
        jobs = cluster.jobs().count(),
        "state loaded"
    );
    Ok(Arc::new(Shared {
        core: Mutex::new(Core {
            cluster,
            sessions,
            next_session: 0,
            pending_logs: HashMap::new(),
            next_request: 0,
        }),
        stepping_down: Default::default(),
        log_streams: Default::default(),
        ledger_reader,
        pipeline,
        writer: Mutex::new(Some(writer)),
        audit_sink: Arc::new(AuditSink::new(
            config.audit.jsonl_file.clone(),
            metrics.audit_records.clone(),
            metrics.audit_lines_dropped.clone(),
        )),
        capacity_cache: Mutex::new(HashMap::new()),
        config,
        metrics,
    }))
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
    /// Runs `f` on the core with an outbox, under the lock; queues what it
    /// staged and its outbox for the commit pipeline. Memory is reloaded
    /// first if an earlier commit failed.
    fn stage<T>(
        &self,
        f: impl FnOnce(&mut Core, &mut Outbox) -> T,
        done: impl FnOnce(&T) -> Done,
    ) -> T {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.begin(&mut core);
        let mut out = Outbox::new();
        let value = f(&mut core, &mut out);
        core.cluster.network_peers(&mut out);
        let staged = core.cluster.take_staged();
        self.pipeline
            .push(generation, staged, out, done(&value), &core.sessions);
        value
    }

    /// Starts an operation under the lock. After a failed commit memory is
    /// reloaded from the store, which none of the failed changes reached
    /// (the writer emptied the queue when it failed). Before any other
    /// reload (an operation panicked, or a reload failed) every queued
    /// write reaches the store first, or the reload would miss changes
    /// already acknowledged. The generation to stage in: [`commit::DIVERGED`]
    /// while memory could not be reloaded, so nothing staged on it is
    /// written.
    fn begin(&self, core: &mut Core) -> u64 {
        if core.cluster.needs_reload() {
            self.pipeline.wait_idle();
        }
        let (reload, generation) = self.pipeline.recover();
        if reload {
            core.cluster.reload_from_store(now_ms());
        }
        core.cluster.begin(now_ms());
        if core.cluster.is_diverged() {
            commit::DIVERGED
        } else {
            generation
        }
    }

    /// Waits until every change staged so far is committed, for a reader
    /// that combines what it read in memory with what it reads from the
    /// store (closed ledger hours): its answer then holds both or neither.
    /// Fails if that commit did (memory was undone): the caller answers
    /// UNAVAILABLE.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let rx = {
            let _core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            self.pipeline.barrier()
        };
        match rx {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or_else(|_| {
                Err(StoreError::Unreachable("the commit thread stopped".into()))
            }),
        }
    }

    /// Runs `f` on the core with an outbox; what it wrote is committed
    /// (with whatever else is queued) before this returns, and only then is
    /// the outbox delivered. If the commit fails, memory is reloaded from
    /// the (unchanged) store and the outbox dropped; the failure is logged.
    /// For reads and for what needs no acknowledgement: a client's mutation
    /// uses [`Shared::mutate`], which reports the failure, and an agent's
    /// message or the clock [`Shared::with_committed`], which says it was
    /// undone. Blocks the thread while its changes are written: an async
    /// caller that changes something uses those.
    pub fn with<T>(&self, f: impl FnOnce(&mut Core, &mut Outbox) -> T) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let value = self.stage(f, |_| Done::Blocking(tx));
        // The writer answers every batch; a closed channel means it stopped.
        let _ = rx.recv();
        value
    }

    /// [`Shared::with`], answering `None` when the commit failed (and the
    /// change was undone), for callers that act on what was committed.
    pub async fn with_committed<T>(
        &self,
        f: impl FnOnce(&mut Core, &mut Outbox) -> T,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let value = self.stage(f, |_| Done::Async(tx));
        match rx.await {
            Ok(Ok(())) => Some(value),
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Writes an audit record `f` makes under the lock in a transaction of
    /// its own; once committed it reaches the sink (the JSON lines file)
    /// from the writer, even if the caller is gone by then.
    pub async fn record_audit_alone(
        &self,
        f: impl FnOnce(&mut Core) -> Result<crate::domain::audit::AuditEntry, StoreError>,
    ) -> Option<Result<crate::domain::audit::AuditEntry, StoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let made = self.stage(
            |core, _| f(core),
            |made| match made {
                Ok(entry) => self.audited_done(tx, entry.clone()),
                Err(_) => Done::Async(tx),
            },
        );
        match rx.await {
            Ok(Ok(())) => Some(made),
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// A client's mutation: staged under the lock, written by the commit
    /// pipeline, and only then applied (commands to agents sent) and
    /// answered. If `f` fails, or the write does, memory, store and agents
    /// end exactly as they were and the caller gets the error.
    pub async fn mutate<T, E>(
        &self,
        f: impl FnOnce(&mut Core, &mut Outbox) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<ClusterError>,
    {
        let stopped = || StoreError::Unreachable("the commit thread stopped".into());
        let mut audited = None;
        let (value, rx) = {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let generation = self.begin(&mut core);
            let mut out = Outbox::new();
            match f(&mut core, &mut out) {
                Ok(value) => {
                    // An audited call's record goes with its own writes.
                    if let Some(call) = audit::current()
                        && call.claim()
                    {
                        audited = stage_audit(&mut core, &call).map(|e| (call, e));
                    }
                    core.cluster.network_peers(&mut out);
                    let staged = core.cluster.take_staged();
                    if staged.is_empty() && out.is_empty() {
                        // Nothing of its own to write, but its answer may
                        // rest on a change still being committed: it waits
                        // for that.
                        (Ok(value), self.pipeline.barrier())
                    } else {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let done = match &audited {
                            Some((_, entry)) => self.audited_done(tx, entry.clone()),
                            None => Done::Async(tx),
                        };
                        self.pipeline
                            .push(generation, staged, out, done, &core.sessions);
                        (Ok(value), Some(rx))
                    }
                }
                Err(err) => {
                    // It may have changed memory before it failed: reload
                    // once what is queued ahead of it is written.
                    if !core.cluster.take_staged().is_empty() {
                        self.pipeline.wait_idle();
                        self.pipeline.recover();
                        core.cluster.reload_from_store(now_ms());
                    }
                    // A refusal decided on a change still being committed
                    // waits for it too.
                    (Err(err), self.pipeline.barrier())
                }
            }
        };
        let committed = match rx {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or_else(|_| Err(stopped())),
        };
        match committed {
            // The record reached the sink on the writer (`audited_done`).
            Ok(()) => value,
            Err(err) => {
                // The record went with the change: the guard records the
                // failure in a transaction of its own.
                if let Some((call, _)) = audited {
                    call.unclaim();
                }
                Err(E::from(ClusterError::Store(err)))
            }
        }
    }

    /// What a batch carrying audit record `entry` is answered with: the
    /// record reaches the sink once committed, even if the caller went.
    fn audited_done(
        &self,
        tx: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
        entry: crate::domain::audit::AuditEntry,
    ) -> Done {
        let sink = self.audit_sink.clone();
        Done::AsyncThen(tx, Box::new(move || sink.committed(&entry)))
    }

    /// One page of closed ledger rows through the separate reader (or, if
    /// there is none, under the cluster lock).
    pub fn read_ledger(
        &self,
        q: &crate::store::LedgerQuery,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, ClusterError> {
        match &self.ledger_reader {
            Some(reader) => Ok(reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ledger_page(q)?),
            None => self.with(|core, _| core.cluster.ledger_page(q)),
        }
    }

    /// One page of the audit trail, through the separate reader (or, if
    /// there is none, under the cluster lock).
    pub fn read_audit(
        &self,
        q: &crate::domain::audit::AuditQuery,
    ) -> Result<Vec<crate::domain::audit::AuditEntry>, ClusterError> {
        match &self.ledger_reader {
            Some(reader) => Ok(reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .audit_page(q)?),
            None => self.with(|core, _| Ok(core.cluster.audit_page(q)?)),
        }
    }

    /// Every closed ledger row of `q` (its limit ignored), read a page of
    /// 10,000 at a time, so no single read holds anything for long.
    pub fn read_ledger_all(
        &self,
        q: &crate::store::LedgerQuery,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, ClusterError> {
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
        self.with(|core, _| {
            let admin = crate::domain::tenant::Caller::admin();
            let stranded = self
                .capacity_view(&admin, "", || {
                    Ok::<_, std::convert::Infallible>(core.cluster.stranded(&admin, None))
                })
                .unwrap_or_else(|e| match e {});
            self.metrics
                .sample(&core.cluster, core.sessions.len(), &stranded)
        });
        self.metrics.encode()
    }

    /// `caller`'s stranded-capacity report of `pool` (as asked; "" = every
    /// pool it sees), made by `make` at most once per [`CAPACITY_FRESH`]:
    /// a caller asking in a loop (or many scrapes) costs the cluster lock
    /// one report per view per interval, not one per call. Failures are
    /// not kept.
    pub fn capacity_view<E>(
        &self,
        caller: &crate::domain::tenant::Caller,
        pool: &str,
        make: impl FnOnce() -> Result<Vec<crate::cluster::PoolStranded>, E>,
    ) -> Result<Arc<Vec<crate::cluster::PoolStranded>>, E> {
        let key = (caller.admin, caller.tenant.clone(), pool.to_string());
        let now = std::time::Instant::now();
        let fresh = |at: &std::time::Instant| now.duration_since(*at) < CAPACITY_FRESH;
        {
            let cache = self
                .capacity_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((at, r)) = cache.get(&key)
                && fresh(at)
            {
                return Ok(r.clone());
            }
        }
        let report = Arc::new(make()?);
        let mut cache = self
            .capacity_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() >= 1024 {
            cache.retain(|_, (at, _)| fresh(at));
        }
        cache.insert(key, (now, report.clone()));
        Ok(report)
    }

    /// Takes one of the caller's log stream slots, or says the cap is reached.
    pub fn open_log_stream(self: &Arc<Self>, key: &str) -> Result<LogStreamSlot, StateError> {
        let cap = self.config.limits.log_streams_per_caller;
        let mut open = self.log_streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.to_string()).or_insert(0);
        if *n >= cap {
            return Err(StateError::TooManyLogStreams {
                caller: key.to_string(),
                cap,
            });
        }
        *n += 1;
        Ok(LogStreamSlot {
            shared: self.clone(),
            key: key.to_string(),
        })
    }
}

/// Stages the record of a call that succeeded: its targets with the ids
/// of what it created (a submission's job, a new pool) and the tenant they
/// belong to.
fn stage_audit(
    core: &mut Core,
    call: &audit::AuditCall,
) -> Option<crate::domain::audit::AuditEntry> {
    let now = now_ms();
    let (jobs, pools) = core.cluster.staged_ids();
    let mut entry = call.entry(None, "OK", "", now);
    match call.method.as_str() {
        "JobService/SubmitJob" if jobs.len() == 1 => {
            entry.targets.insert("job".into(), jobs[0].clone());
        }
        "PoolService/CreatePool" if pools.len() == 1 => {
            entry.targets.insert("pool".into(), pools[0].clone());
        }
        _ => {}
    }
    // A pool named by its name: the id it resolves to (or, when the call
    // deleted it, the one pool it wrote).
    if let Some(key) = entry.targets.get("pool").cloned() {
        use crate::cluster::PoolRef;
        let caller = match call.role.as_str() {
            "admin" => crate::domain::tenant::Caller::admin(),
            _ => crate::domain::tenant::Caller::tenant(&call.caller_tenant),
        };
        let id = match core.cluster.resolve_pool(&caller, &key) {
            Ok(PoolRef::Dedicated(p)) => Some(p.pool_id.clone()),
            Ok(PoolRef::Public) => Some(crate::domain::PUBLIC_POOL.to_string()),
            Err(_) => (pools.len() == 1).then(|| pools[0].clone()),
        };
        if let Some(id) = id.filter(|id| *id != key) {
            entry.args.insert("pool_name".into(), key);
            entry.targets.insert("pool".into(), id);
        }
    }
    entry.tenant = call.trail_of(core.cluster.audit_owner(&entry.targets));
    match core.cluster.record_audit(entry, now) {
        Ok(entry) => Some(entry),
        Err(err) => {
            tracing::error!(method = %call.method, error = %crate::ErrorChain(&err), "cannot stage an audit record");
            None
        }
    }
}
