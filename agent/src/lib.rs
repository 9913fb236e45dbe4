//! `gpupool-agent`: runs on every node. Probes the hardware (NVML, sysinfo),
//! registers with the scheduler and holds one session with it, runs the job
//! instances it is given as supervised process groups, and serves
//! Prometheus `/metrics`.
//!
//! Modules: [`probe`] (hardware, behind `GpuProbe`), [`health`] (GPU
//! health), [`session`] (the gRPC protocol), [`runtime`] (instances: start,
//! supervise, reattach, clean up), [`shim`] (the wrapper each instance runs
//! under), [`cgroup`] and [`devfilter`] (confinement), [`identity`]
//! (per-tenant ids), [`image`] (OCI pulls and cache), [`container`] (runtime
//! bundles), [`cdi`] (GPU device injection), [`serving`] (service ports and
//! health checks), [`metrics`], [`config`].

pub mod cdi;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod devfilter;
pub mod health;
pub mod identity;
pub mod image;
pub mod metrics;
pub mod network;
pub mod probe;
pub mod runtime;
pub mod serving;
pub mod session;
pub mod shim;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gpupool_common::{sdnotify, tls};
use tokio::sync::watch;

pub use config::AgentConfig;

/// Runs the agent until `shutdown` resolves. `probe` overrides the GPU probe
/// (tests, failure injection); `None` picks fakes from the config or NVML.
pub async fn run(
    config: AgentConfig,
    probe: Option<Arc<dyn probe::GpuProbe>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let host = probe::host_info();
    let address = config
        .advertise_address
        .clone()
        .unwrap_or_else(|| host.hostname.clone());
    let node_id = config.resolved_node_id(&host.hostname);
    let probe: Arc<dyn probe::GpuProbe> = match probe {
        Some(p) => p,
        None => Arc::from(probe::select_probe(
            config.fake_gpus.as_deref(),
            &node_id,
            &config.state_dir,
        )?),
    };
    let cgroups: Option<Arc<dyn cgroup::CgroupManager>> =
        cgroup::detect(&config.cgroup_root).map(Arc::from);
    // On a node with real GPUs, confinement is what makes an instance's
    // GPUs its own: required unless the operator says otherwise.
    let confinement =
        config
            .confinement
            .unwrap_or(if !probe.is_fake() && !probe.gpus().is_empty() {
                runtime::Confinement::Required
            } else {
                runtime::Confinement::BestEffort
            });
    match (&cgroups, confinement) {
        (_, runtime::Confinement::Off) => tracing::info!("cgroup confinement off"),
        (Some(m), _) => tracing::info!(version = m.version(), "confining instances in cgroups"),
        (None, runtime::Confinement::Required) => anyhow::bail!(
            "confinement = \"required\" but no cgroup hierarchy was found under {}",
            config.cgroup_root.display()
        ),
        (None, _) => {
            tracing::warn!(root = %config.cgroup_root.display(), "no cgroup hierarchy found; instances run unconfined")
        }
    }
    let runtime = runtime::Runtime::new(&config.state_dir)
        .with_context(|| format!("cannot create state dir {}", config.state_dir.display()))?
        .with_cgroups(cgroups, confinement)
        .with_cgroup_scope(&cgroup_scope(&node_id, &config.state_dir))
        .with_port_range(config.port_range[0], config.port_range[1]);
    // Instances run under this binary's `shim` so their exit status survives
    // an agent restart; reattach to those that ran before this start.
    let runtime = match std::env::current_exe() {
        Ok(exe) => runtime.with_shim(exe),
        Err(err) => {
            tracing::warn!(error = %err, "cannot find the agent binary; instances run without the shim");
            runtime
        }
    };
    // SAFETY: geteuid(2) reads our own credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let runtime = match &config.run_as_user {
        Some(user) => runtime.with_user(user)?,
        None if root => runtime.with_identities(
            identity::Identities::load(
                &config.state_dir,
                config.tenant_uid_base,
                config.tenant_uid_slots,
                config.tenant_uids.clone(),
            )
            .context("cannot load the tenant ids")?,
        ),
        None => {
            tracing::warn!(
                "the agent is not root: every tenant's instances run as its user, without namespaces, and image jobs cannot run"
            );
            runtime
        }
    };
    let runtime = if root {
        runtime.with_isolation(config.hidden_paths.clone())
    } else {
        runtime
    };
    let oci_runtime = config.oci_runtime.clone().or_else(|| {
        ["runc", "crun"].iter().find_map(|name| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .find(|p| p.is_file())
        })
    });
    let runtime = match (oci_runtime, root) {
        (Some(binary), true) => {
            let images = image::ImageStore::new(image::ImageStoreConfig {
                root: config.state_dir.join("images"),
                registries: config
                    .registries
                    .iter()
                    .map(|(host, r)| {
                        (
                            host.clone(),
                            image::RegistryOptions {
                                insecure: r.insecure,
                                ca_file: r.ca_file.clone(),
                            },
                        )
                    })
                    .collect(),
                auth_file: config.registry_auth_file.clone(),
                max_bytes: config.image_cache_mib.saturating_mul(1 << 20),
                pull_policy: config.image_pull_policy,
            })
            .with_context(|| {
                format!(
                    "cannot create the image cache in {}",
                    config.state_dir.display()
                )
            })?;
            tracing::info!(runtime = %binary.display(), "image jobs run with this OCI runtime");
            runtime.with_images(
                images,
                runtime::OciRuntime {
                    binary,
                    root: config.state_dir.join("runc"),
                    cdi_dirs: config.cdi_dirs.clone(),
                    fake_gpus: probe.is_fake(),
                },
            )
        }
        (None, true) => {
            tracing::warn!("no OCI runtime (runc, crun) found: image jobs will fail on this node");
            runtime
        }
        (_, false) => runtime,
    };
    // Instance networks: a root agent with an IPv4 address builds them.
    let runtime = if root {
        let networks = network::Networks::new(&config.state_dir, &address)
            .and_then(|n| n.with_vpcs(config.networks.vpcs.clone()))
            .and_then(|n| n.with_egress_deny(&config.networks.egress_deny));
        match networks {
            Ok(n) => runtime.with_networks(n),
            Err(err) => {
                tracing::warn!(%err, "instance networks are off on this node");
                runtime
            }
        }
    } else {
        runtime
    };
    runtime.recover();
    runtime.reconcile_networks();
    let ctx = Arc::new(session::AgentCtx {
        node_id: node_id.clone(),
        host,
        az: config.az.clone(),
        labels: config.labels.clone(),
        scheduler_addrs: config.scheduler_addrs(),
        next_addr: Default::default(),
        tls: tls::ClientTls {
            ca_file: config.tls_ca_file.clone(),
            cert_file: config.tls_cert_file.clone(),
            key_file: config.tls_key_file.clone(),
            domain: config.tls_domain.clone(),
        },
        join_token: config.join_token.clone(),
        credential_file: config.state_dir.join(session::CREDENTIAL_FILE),
        max_backoff: Duration::from_millis(config.max_backoff_ms),
        probe,
        runtime,
        connected: Default::default(),
        pids_max: (config.pids_max > 0).then_some(config.pids_max),
        mps_pipe_dir: config.mps_pipe_dir.clone(),
        health: std::sync::Mutex::new(health::Tracker::load(&config.state_dir)),
        address,
        sample_interval: Duration::from_millis(config.sample_interval_ms),
        last_sample: Default::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind metrics address {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "agent metrics listening");
            let mut rx = stop_rx.clone();
            let ctx = ctx.clone();
            Some(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(err) = metrics::serve(listener, ctx, stop).await {
                    tracing::error!(error = %err, "metrics server failed");
                }
            }))
        }
        None => None,
    };
    tracing::info!(node = %node_id, scheduler = %config.scheduler_addr, "agent starting");
    let rotation = {
        let runtime = ctx.runtime.clone();
        let (max, keep) = (config.log_max_bytes, config.log_keep.max(1));
        let budget = config.disk_budget_mib.saturating_mul(1 << 20);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                runtime.rotate_logs(max, keep);
                if budget > 0 {
                    let rt = runtime.clone();
                    // Walking directories is blocking work.
                    let _ = tokio::task::spawn_blocking(move || rt.collect_garbage(budget)).await;
                }
                if let Some(images) = runtime.image_store().cloned() {
                    let in_use = runtime.images_in_use();
                    let _ =
                        tokio::task::spawn_blocking(move || images.collect_garbage(&in_use)).await;
                }
            }
        })
    };
    let session = tokio::spawn(session::run(ctx.clone(), stop_rx));
    sdnotify::notify("READY=1\nSTATUS=running");
    // The watchdog is fed only while the runtime's state can be read.
    let watchdog = sdnotify::watchdog_interval().map(|every| {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                let _ = ctx.runtime.snapshot();
                sdnotify::notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        })
    });
    shutdown.await;
    sdnotify::notify("STOPPING=1");
    if let Some(w) = watchdog {
        w.abort();
    }
    if config.stop_instances_on_exit {
        let stopping = ctx
            .runtime
            .stop_all(Duration::from_secs(3), "the agent is stopping");
        tracing::info!(
            instances = stopping,
            "agent shutting down; stopping its instances"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        while ctx.runtime.live() > 0 && tokio::time::Instant::now() < deadline {
            if tokio::time::Instant::now() + Duration::from_secs(2) >= deadline {
                // A stop already under way may wait out a longer grace:
                // nothing outlives the agent that promised to stop it.
                ctx.runtime.kill_all();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        tracing::info!("agent shutting down; running instances are left running");
    }
    let _ = stop_tx.send(true);
    let _ = session.await;
    rotation.abort();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    Ok(())
}

/// The node id plus a hash of the state dir: stable across restarts of one
/// agent, distinct for two agents sharing a host (tests, dev clusters).
fn cgroup_scope(node_id: &str, state_dir: &std::path::Path) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{node_id}-{h:08x}")
}
