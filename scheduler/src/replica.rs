//! Scheduler replicas on one PostgreSQL database: each starts as a
//! standby; the one that takes the lease loads the state and serves;
//! the others keep trying and, meanwhile, answer every gRPC call with
//! `UNAVAILABLE` naming the leader (clients and agents given several
//! addresses move on to it). A leader that loses its lease (taken by
//! another, a write fenced out, or no renewal for most of the lease) stops
//! serving, drops its state and stands by again; its writes were already
//! refused by the store's fencing.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::watch;

use crate::config::SchedulerConfig;
use crate::pgstore::{LEASE_RENEW, LEASE_TTL_MS, PgStore};

/// Runs one replica until `shutdown`: standby until it takes the lease,
/// then leader until `shutdown` or until it loses the lease (renewals
/// failing for most of the lease, or a write refused by the fencing), after
/// which it drops its state and stands by again.
pub async fn run(
    config: SchedulerConfig,
    url: String,
    grpc: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let holder = format!(
        "{}-{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        std::process::id(),
        crate::now_ms()
    );
    // The bound addresses (a configured port 0 is the one the OS gave):
    // advertised, and listened on again after losing the lease.
    let addr = grpc.local_addr()?;
    let metrics_addr = match &metrics {
        Some(m) => Some(m.local_addr()?),
        None => config.metrics_listen,
    };
    let advertise = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let lease_url = url.clone();
    let lease_store = Arc::new(
        tokio::task::spawn_blocking(move || PgStore::open(&lease_url, None))
            .await?
            .context("cannot open the PostgreSQL store")?,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut grpc = Some(grpc);
    let mut metrics = metrics;
    loop {
        if !standby(&lease_store, &holder, &advertise, addr, &mut grpc, &stop_rx).await? {
            return Ok(());
        }
        tracing::info!(%advertise, "took the leader lease; loading state");
        let listener = match grpc.take() {
            Some(l) => l,
            None => tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        };
        let metrics_listener = match (metrics.take(), metrics_addr) {
            (Some(l), _) => Some(l),
            (None, Some(a)) => Some(tokio::net::TcpListener::bind(a).await?),
            (None, None) => None,
        };
        // Renew from now on: loading may take a while.
        let (lost_tx, lost_rx) = watch::channel(false);
        let (store_url, fence) = (url.clone(), holder.clone());
        let store = tokio::task::spawn_blocking(move || PgStore::open(&store_url, Some(fence)))
            .await?
            .context("cannot open the PostgreSQL store")?;
        let renew = tokio::spawn(renew(
            lease_store.clone(),
            holder.clone(),
            advertise.clone(),
            store.fenced_out(),
            lost_tx,
            stop_rx.clone(),
        ));
        let shared = crate::server::open_with(
            config.clone(),
            Box::new(store),
            &crate::pgstore::redact(&url),
        )?;
        let ended = {
            let (mut lost, mut stop) = (lost_rx.clone(), stop_rx.clone());
            let shared = shared.clone();
            async move {
                tokio::select! {
                    _ = lost.wait_for(|l| *l) => {
                        shared
                            .stepping_down
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        };
        let served = crate::server::serve(shared, listener, metrics_listener, ended).await;
        renew.abort();
        if *stop_rx.borrow() {
            let (store, h) = (lease_store.clone(), holder.clone());
            if let Err(err) = tokio::task::spawn_blocking(move || store.release(&h)).await? {
                tracing::warn!(error = %crate::ErrorChain(&err), "cannot release the leader lease; it expires by itself");
            }
            return served;
        }
        served?;
        tracing::error!("lost the leader lease: this replica stands by again");
    }
}

/// Standby until this replica takes the lease (true) or `stop` (false),
/// answering every gRPC call meanwhile with the leader's address.
async fn standby(
    lease_store: &Arc<PgStore>,
    holder: &str,
    advertise: &str,
    addr: std::net::SocketAddr,
    grpc: &mut Option<tokio::net::TcpListener>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    loop {
        if *stop_rx.borrow() {
            return Ok(false);
        }
        let lease = {
            let (store, h, a) = (
                lease_store.clone(),
                holder.to_string(),
                advertise.to_string(),
            );
            tokio::task::spawn_blocking(move || store.acquire(&h, &a)).await?
        };
        match lease {
            Ok(lease) if lease.mine => return Ok(true),
            Ok(lease) => {
                let listener = match grpc.take() {
                    Some(l) => l,
                    None => tokio::net::TcpListener::bind(addr).await?,
                };
                tracing::info!(leader = %lease.address, holder = %lease.holder, "standby: another replica leads");
                gpupool_common::sdnotify::notify(&format!(
                    "READY=1\nSTATUS=standby; the leader is {}",
                    lease.address
                ));
                // Answer as a standby until the next attempt.
                let stop = stop_rx.clone();
                let done = async move {
                    tokio::select! {
                        _ = tokio::time::sleep(LEASE_RENEW) => {}
                        _ = wait(stop) => {}
                    }
                };
                use axum::serve::ListenerExt as _;
                let listener = listener.tap_io(|s| crate::net::nodelay(s));
                axum::serve(listener, standby_router(lease.address.clone()))
                    .with_graceful_shutdown(done)
                    .await?;
            }
            Err(err) => {
                tracing::warn!(error = %crate::ErrorChain(&err), "cannot reach PostgreSQL for the leader lease; retrying");
                tokio::time::sleep(LEASE_RENEW).await;
            }
        }
    }
}

/// Renews the lease every [`LEASE_RENEW`]; raises `lost` when another
/// replica holds it, when a write was fenced out, or when no renewal
/// succeeded for most of the lease (a standby may take it after
/// [`LEASE_TTL_MS`]).
async fn renew(
    store: Arc<PgStore>,
    holder: String,
    advertise: String,
    fenced_out: Arc<std::sync::atomic::AtomicBool>,
    lost: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(LEASE_RENEW);
    let mut renewed = tokio::time::Instant::now();
    let deadline = std::time::Duration::from_millis(LEASE_TTL_MS as u64)
        .saturating_sub(LEASE_RENEW + LEASE_RENEW / 2);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if fenced_out.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::error!("a write was refused: another replica holds the lease");
            let _ = lost.send(true);
            return;
        }
        let (s, h, a) = (store.clone(), holder.clone(), advertise.clone());
        match tokio::task::spawn_blocking(move || s.acquire(&h, &a)).await {
            Ok(Ok(lease)) if lease.mine => renewed = tokio::time::Instant::now(),
            Ok(Ok(lease)) => {
                tracing::error!(leader = %lease.address, "another replica took the leader lease");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %crate::ErrorChain(&err), "cannot renew the leader lease");
                if renewed.elapsed() >= deadline {
                    tracing::error!(
                        "no lease renewal for {:?}: stepping down before a standby may take over",
                        renewed.elapsed()
                    );
                    let _ = lost.send(true);
                    return;
                }
            }
            Err(err) => tracing::error!(error = %err, "lease task failed"),
        }
    }
}

async fn wait(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Every request gets a trailers-only gRPC answer: UNAVAILABLE, naming the
/// leader (also in the `gpupool-leader` header).
fn standby_router(leader: String) -> axum::Router {
    axum::Router::new().fallback(move || {
        let leader = leader.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static("14"));
            let message = format!("standby replica; the leader is {leader}");
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
                headers.insert("grpc-message", v);
            }
            if let Ok(v) = HeaderValue::from_str(&leader) {
                headers.insert("gpupool-leader", v);
            }
            (StatusCode::OK, headers)
        }
    })
}

/// grpc-message encoding: bytes outside printable ASCII and `%` escaped.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
