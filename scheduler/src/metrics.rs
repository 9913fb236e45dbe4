//! The scheduler's Prometheus `/metrics`: nodes by status, jobs by state,
//! GPUs allocated, agent sessions, submissions.
//!
//! It reads the cluster it is handed ([`Metrics::sample`]); it does not
//! know the shared state or the server (the wiring hands [`serve`] what
//! renders the page).

use prometheus::{Encoder, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::cluster::Cluster;
use crate::domain::{JobState, NodeStatus};

pub struct Metrics {
    registry: Registry,
    nodes: IntGaugeVec,
    jobs: IntGaugeVec,
    gpus: IntGauge,
    gpus_allocated_milli: IntGauge,
    /// Free GPU capacity per pool and cause (see `domain::stranded`).
    gpus_stranded_milli: IntGaugeVec,
    /// The (pool, cause) series of the last sample: the next one removes
    /// those it no longer sets (never a reset, which would show a
    /// concurrent scrape's encoding no series at all).
    stranded_series: std::sync::Mutex<std::collections::BTreeSet<(String, &'static str)>>,
    sessions: IntGauge,
    pub jobs_submitted: IntCounter,
    pub audit_records: IntCounter,
    /// Audit JSON lines not written: the file's writer fell too far behind.
    pub audit_lines_dropped: IntCounter,
    pub sessions_opened: IntCounter,
    /// Requests refused by the per-caller rate limit.
    pub requests_limited: IntCounter,
    /// Agent registrations and sessions refused for their identity.
    pub agent_auth_refused: IntCounter,
    billable_seconds: prometheus::IntCounterVec,
    billed_amount: prometheus::IntCounterVec,
    /// Time to handle one agent heartbeat, waiting for the cluster lock
    /// included.
    pub heartbeat_seconds: prometheus::Histogram,
    /// Store transactions the commit pipeline wrote.
    pub store_transactions: IntCounter,
    /// Changes (one per lock hold that staged writes or commands) it
    /// committed: over `store_transactions`, how many share an fsync.
    pub store_changes: IntCounter,
    /// Time the commit thread takes to write one transaction.
    pub store_commit_seconds: prometheus::Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let nodes = IntGaugeVec::new(
            Opts::new("gpupool_nodes", "Registered nodes by status."),
            &["status"],
        )
        .unwrap();
        let jobs =
            IntGaugeVec::new(Opts::new("gpupool_jobs", "Jobs by state."), &["state"]).unwrap();
        let gpus = IntGauge::new("gpupool_gpus", "GPUs on registered nodes.").unwrap();
        let gpus_allocated_milli = IntGauge::new(
            "gpupool_gpus_allocated_milli",
            "GPU thousandths allocated to instances (1000 = one whole GPU).",
        )
        .unwrap();
        let gpus_stranded_milli = IntGaugeVec::new(
            Opts::new(
                "gpupool_gpus_stranded_milli",
                "Free GPU thousandths per pool by why its queued jobs (none queued: the typical \
                 request shapes) cannot use them: unschedulable, no_request, \
                 shares_below_smallest_request, model, too_few_gpus_per_node, cpu, memory; \
                 usable: a queued job fits there.",
            ),
            &["pool", "cause"],
        )
        .unwrap();
        let sessions =
            IntGauge::new("gpupool_agent_sessions", "Agent sessions currently open.").unwrap();
        let jobs_submitted =
            IntCounter::new("gpupool_jobs_submitted_total", "Jobs accepted.").unwrap();
        let audit_records = IntCounter::new(
            "gpupool_audit_records_total",
            "Audit records written (one per mutating call, refused and failed ones included; unauthenticated refusals are not recorded).",
        )
        .unwrap();
        let audit_lines_dropped = IntCounter::new(
            "gpupool_audit_jsonl_dropped_total",
            "Audit records not appended to [audit] jsonl_file because its writer was more than 65,536 records behind (the store holds them all).",
        )
        .unwrap();
        let requests_limited = IntCounter::new(
            "gpupool_requests_rate_limited_total",
            "Client requests refused with RESOURCE_EXHAUSTED by the per-caller rate limit.",
        )
        .unwrap();
        let agent_auth_refused = IntCounter::new(
            "gpupool_agent_auth_refused_total",
            "Agent registrations and sessions refused: not the node's own credential, or a revoked node.",
        )
        .unwrap();
        let sessions_opened = IntCounter::new(
            "gpupool_agent_sessions_opened_total",
            "Agent sessions opened.",
        )
        .unwrap();
        let billing_labels = &["tenant", "pool", "spec", "mode"];
        let billable_seconds = prometheus::IntCounterVec::new(
            Opts::new(
                "gpupool_billable_seconds_total",
                "Metered unit-seconds in closed ledger hours.",
            ),
            billing_labels,
        )
        .unwrap();
        let billed_amount = prometheus::IntCounterVec::new(
            Opts::new(
                "gpupool_billed_amount_micros_total",
                "Usage amounts in closed ledger hours, in micro-units of the currency.",
            ),
            billing_labels,
        )
        .unwrap();
        let heartbeat_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "gpupool_heartbeat_handle_seconds",
                "Time to handle one agent heartbeat, the wait for the cluster lock included.",
            )
            .buckets(vec![
                25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                100e-3, 250e-3, 1.0,
            ]),
        )
        .unwrap();
        let store_transactions = IntCounter::new(
            "gpupool_store_transactions_total",
            "Store transactions written by the commit pipeline (one fsync each).",
        )
        .unwrap();
        let store_changes = IntCounter::new(
            "gpupool_store_changes_total",
            "Changes committed by the commit pipeline; over gpupool_store_transactions_total, \
             how many changes share one transaction.",
        )
        .unwrap();
        let store_commit_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "gpupool_store_commit_seconds",
                "Time to write one transaction of the commit pipeline (its fsync included).",
            )
            .buckets(vec![
                100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
                1.0,
            ]),
        )
        .unwrap();
        for c in [
            Box::new(store_commit_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(store_transactions.clone()),
            Box::new(store_changes.clone()),
            Box::new(heartbeat_seconds.clone()),
            Box::new(billable_seconds.clone()),
            Box::new(billed_amount.clone()),
            Box::new(nodes.clone()),
            Box::new(jobs.clone()),
            Box::new(gpus.clone()),
            Box::new(gpus_allocated_milli.clone()),
            Box::new(gpus_stranded_milli.clone()),
            Box::new(sessions.clone()),
            Box::new(jobs_submitted.clone()),
            Box::new(audit_records.clone()),
            Box::new(audit_lines_dropped.clone()),
            Box::new(sessions_opened.clone()),
            Box::new(requests_limited.clone()),
            Box::new(agent_auth_refused.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            nodes,
            jobs,
            gpus,
            gpus_allocated_milli,
            gpus_stranded_milli,
            stranded_series: Default::default(),
            sessions,
            jobs_submitted,
            audit_records,
            audit_lines_dropped,
            sessions_opened,
            requests_limited,
            agent_auth_refused,
            billable_seconds,
            billed_amount,
            heartbeat_seconds,
            store_transactions,
            store_changes,
            store_commit_seconds,
        }
    }

    /// Counts rows of newly closed ledger hours.
    pub fn count_ledger(&self, rows: &[crate::domain::billing::LedgerRow]) {
        for r in rows {
            let mode = match r.mode {
                crate::domain::pool::BillingMode::OnDemand => "on_demand",
                crate::domain::pool::BillingMode::Subscription => "subscription",
            };
            let labels = [r.tenant.as_str(), r.pool_id.as_str(), r.spec.as_str(), mode];
            self.billable_seconds
                .with_label_values(&labels)
                .inc_by(r.seconds().max(0) as u64);
            self.billed_amount
                .with_label_values(&labels)
                .inc_by(r.amount_micros.max(0) as u64);
        }
    }

    /// Sets the gauges from the cluster, the number of open agent sessions
    /// and the admin's stranded-capacity report (called under the cluster
    /// lock: no encoding here).
    pub fn sample(
        &self,
        cluster: &Cluster,
        sessions: usize,
        stranded: &[crate::cluster::PoolStranded],
    ) {
        for (status, label) in [
            (NodeStatus::Ready, "Ready"),
            (NodeStatus::NotReady, "NotReady"),
        ] {
            self.nodes
                .with_label_values(&[label])
                .set(cluster.nodes().filter(|n| n.status == status).count() as i64);
        }
        for state in [
            JobState::Queued,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Lost,
            JobState::Unavailable,
        ] {
            let label = format!("{state:?}");
            self.jobs
                .with_label_values(&[label.as_str()])
                .set(cluster.jobs().filter(|j| j.state == state).count() as i64);
        }
        self.gpus
            .set(cluster.nodes().map(|n| n.inventory.gpus.len() as i64).sum());
        self.gpus_allocated_milli.set(
            cluster
                .usage()
                .values()
                .flat_map(|u| u.gpu_milli.iter())
                .map(|m| i64::from(*m))
                .sum(),
        );
        let mut now = std::collections::BTreeSet::new();
        for r in stranded {
            for cause in crate::domain::stranded::CAUSES {
                self.gpus_stranded_milli
                    .with_label_values(&[r.pool_id.as_str(), cause.as_str()])
                    .set(r.by_cause[cause as usize]);
                now.insert((r.pool_id.clone(), cause.as_str()));
            }
        }
        // Pools that went since the last sample lose their series.
        let mut last = self
            .stranded_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (pool, cause) in last.difference(&now) {
            let _ = self
                .gpus_stranded_milli
                .remove_label_values(&[pool.as_str(), cause]);
        }
        *last = now;
        self.sessions.set(sessions as i64);
    }

    /// Every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` until `shutdown`, each page made by `render`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                    render(),
                )
            }
        }),
    );
    use axum::serve::ListenerExt as _;
    axum::serve(listener.tap_io(|s| crate::net::nodelay(s)), app)
        .with_graceful_shutdown(shutdown)
        .await
}
