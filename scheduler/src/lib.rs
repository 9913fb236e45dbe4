//! `gpupool-scheduler`: the central daemon. Owns nodes, pools and jobs,
//! places jobs on nodes, talks to agents over one gRPC session each, stores
//! everything in SQLite, and serves Prometheus `/metrics`. The `gpupool`
//! CLI is the `gpupool-cli` crate: it reaches this daemon over gRPC only;
//! the benchmarks are the `gpupool-bench` crate, outside this binary.
//!
//! Modules, from the inside out (`scripts/import-graph.py` checks that no
//! import goes in a circle):
//! - [`domain`]: the pure core — nodes, jobs, pools, tenants, billing,
//!   placement and the scheduling planner; no I/O, no clock;
//! - [`store`] (SQLite) and [`pgstore`] (PostgreSQL, lease, fencing): durable
//!   state behind the `Store` trait;
//! - [`cluster`]: the state machine over the domain, written through to the
//!   store; [`config`]: the daemon's TOML; [`metrics`]: Prometheus;
//!   [`net`]: socket settings of every listener;
//! - [`state`]: the cluster behind its lock, the agents' sessions, commits;
//!   no protobuf;
//! - [`api`]: the gRPC edge (services, access table, limits, the one
//!   mapping of errors to statuses);
//! - [`server`] wires them up; [`replica`] runs leader/standby on
//!   PostgreSQL; [`dev`] is the one-command dev cluster (with local agents);
//!   [`snapshot`] saves and restores a whole store as one file.

pub mod api;
pub mod cluster;
pub mod config;
pub mod console;
pub mod dev;
pub mod domain;
pub mod metrics;
pub mod net;
pub mod pgstore;
pub mod replica;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod store;

/// Milliseconds since the Unix epoch: the only clock the scheduler reads
/// (the state machine is handed it, never reads it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An error and its sources on one line, `outer: inner: innermost`: how an
/// error is logged, once, where it is handled (the messages themselves
/// never repeat their source).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// Sets up logging once: text (journald-friendly) or JSON, filtered by
/// `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: not in files, journald or pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
///
/// The handlers are installed when this is called (inside the runtime), not
/// when the future is first polled, so a signal that arrives before the
/// server waits on it is not lost to the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
