//! Scheduler replicas on one PostgreSQL database: each starts as a
//! standby; the one that takes the lease loads the state and serves;
//! the others keep trying and, meanwhile, answer every gRPC call with
//! `UNAVAILABLE` naming the leader (clients and agents given several
//! addresses move on to it). A leader that finds its lease taken exits, so
//! its supervisor (systemd) restarts it as a standby; its writes were
//! already refused by the store's fencing.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::watch;

use crate::config::SchedulerConfig;
use crate::pgstore::{LEASE_RENEW, PgStore};

/// Runs one replica until `shutdown`.
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
    let advertise = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.grpc_listen));
    let addr = grpc.local_addr()?;
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

    // Standby until the lease is ours.
    let mut grpc = Some(grpc);
    loop {
        let lease = {
            let (store, h, a) = (lease_store.clone(), holder.clone(), advertise.clone());
            tokio::task::spawn_blocking(move || store.acquire(&h, &a)).await?
        };
        match lease {
            Ok(lease) if lease.mine => break,
            Ok(lease) => {
                let listener = match grpc.take() {
                    Some(l) => l,
                    None => tokio::net::TcpListener::bind(addr).await?,
                };
                tracing::info!(leader = %lease.address, holder = %lease.holder, "standby: another replica leads");
                gpupool_agent::sdnotify::notify(&format!(
                    "READY=1\nSTATUS=standby; the leader is {}",
                    lease.address
                ));
                // Answer as a standby until the next attempt.
                let responder = standby_router(lease.address.clone());
                let stop = stop_rx.clone();
                let period = tokio::time::sleep(LEASE_RENEW);
                let done = async move {
                    tokio::select! {
                        _ = period => {}
                        _ = wait(stop) => {}
                    }
                };
                axum::serve(listener, responder)
                    .with_graceful_shutdown(done)
                    .await?;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot reach PostgreSQL for the leader lease; retrying");
                tokio::time::sleep(LEASE_RENEW).await;
            }
        }
        if *stop_rx.borrow() {
            return Ok(());
        }
    }
    tracing::info!(%advertise, "took the leader lease; loading state");
    let grpc = match grpc.take() {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?,
    };
    let (store_url, fence) = (url.clone(), holder.clone());
    let store = tokio::task::spawn_blocking(move || PgStore::open(&store_url, Some(fence)))
        .await?
        .context("cannot open the PostgreSQL store")?;
    let shared = crate::server::open_with(config, Box::new(store), &crate::pgstore::redact(&url))?;

    // Renew the lease; losing it ends this replica.
    let (lost_tx, mut lost_rx) = watch::channel(false);
    let renew = {
        let (store, h, a) = (lease_store.clone(), holder.clone(), advertise.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LEASE_RENEW);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let (s, h, a) = (store.clone(), h.clone(), a.clone());
                match tokio::task::spawn_blocking(move || s.acquire(&h, &a)).await {
                    Ok(Ok(lease)) if !lease.mine => {
                        tracing::error!(leader = %lease.address, "lost the leader lease; stopping");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "cannot renew the leader lease; writes wait for PostgreSQL");
                    }
                    Err(err) => tracing::error!(error = %err, "lease task failed"),
                }
            }
        })
    };
    let lost = {
        let mut stop = stop_rx.clone();
        async move {
            tokio::select! {
                _ = lost_rx.wait_for(|l| *l) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
    };
    let served = crate::server::serve(shared, grpc, metrics, lost).await;
    renew.abort();
    if !*stop_rx.borrow() {
        anyhow::bail!("this replica lost the leader lease");
    }
    let (store, h) = (lease_store.clone(), holder.clone());
    if let Err(err) = tokio::task::spawn_blocking(move || store.release(&h)).await? {
        tracing::warn!(error = %err, "cannot release the leader lease; it expires by itself");
    }
    served
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
