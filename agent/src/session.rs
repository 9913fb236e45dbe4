//! The agent's side of the protocol: register, hold one Session stream,
//! heartbeat, obey StartInstance/StopInstance/ForgetInstance/ReadLogs, and
//! reconnect with exponential backoff when the scheduler goes away.
//!
//! Protobuf types are converted to and from the runtime's plain types here
//! and nowhere else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gpupool_proto::v1 as pb;
use gpupool_proto::v1::agent_service_client::AgentServiceClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

use crate::probe::{GpuInfo, GpuProbe, HostInfo};
use crate::runtime::{InstanceReport, InstanceSpec, Phase, Runtime};

/// The file in the state dir holding the node's credential.
pub const CREDENTIAL_FILE: &str = "node-credential";

/// The node's credential, if it has one.
fn read_credential(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// Keeps a newly issued credential: written to a 0600 temporary file, synced,
/// then renamed over the old one, so a crash leaves the old or the new.
fn save_credential(path: &std::path::Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Most bytes returned for one log read.
const MAX_LOG_CHUNK: usize = 1 << 20;

/// Everything the session needs about this node.
pub struct AgentCtx {
    pub node_id: String,
    pub host: HostInfo,
    pub az: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Scheduler replicas (comma-separated in the config, at least one);
    /// the agent moves to the next when one fails or is a standby.
    pub scheduler_addrs: Vec<String>,
    pub next_addr: std::sync::atomic::AtomicUsize,
    /// TLS files for `https://` addresses.
    pub tls: gpupool_common::tls::ClientTls,
    pub join_token: Option<String>,
    /// This node's own credential (issued at enrolment), 0600.
    pub credential_file: std::path::PathBuf,
    pub max_backoff: Duration,
    pub probe: Arc<dyn GpuProbe>,
    pub runtime: Runtime,
    pub connected: AtomicBool,
    /// Process limit per instance.
    pub pids_max: Option<u64>,
    /// MPS pipe directory, when an MPS daemon serves fractional GPUs.
    pub mps_pipe_dir: Option<std::path::PathBuf>,
    /// GPU health from critical events.
    pub health: std::sync::Mutex<crate::health::Tracker>,
    /// Address other nodes reach this one at.
    pub address: String,
    /// The GPUs are read at most this often.
    pub sample_interval: Duration,
    /// The last GPU sample and when it was taken.
    pub last_sample: std::sync::Mutex<Option<(std::time::Instant, Vec<GpuInfo>)>>,
}

/// Probes the GPUs and applies GPU health: new critical events take a GPU
/// out of service, observed recovery actions bring it back.
pub fn probe_gpus(ctx: &AgentCtx) -> Vec<GpuInfo> {
    let mut gpus = {
        let mut last = ctx.last_sample.lock().unwrap();
        match &*last {
            Some((at, gpus)) if at.elapsed() < ctx.sample_interval => gpus.clone(),
            _ => {
                let gpus = ctx.probe.gpus();
                *last = Some((std::time::Instant::now(), gpus.clone()));
                gpus
            }
        }
    };
    let events = ctx.probe.events();
    let present: Vec<(u32, String)> = gpus.iter().map(|g| (g.index, g.uuid.clone())).collect();
    let mut health = ctx.health.lock().unwrap();
    health.observe(&events, &present, &crate::health::boot_id());
    for g in gpus.iter_mut() {
        if let Some(reason) = health.reason(&g.uuid) {
            g.healthy = false;
            g.health_reason = reason;
        }
    }
    gpus
}

/// The agent's credentials on every call: the join token (to enrol) and
/// the node's own credential (once it has one).
#[derive(Clone)]
struct AgentCredentials {
    join: Option<MetadataValue<tonic::metadata::Ascii>>,
    node: Arc<std::sync::Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>>,
}

impl Interceptor for AgentCredentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.join {
            req.metadata_mut().insert("authorization", value.clone());
        }
        if let Some(value) = self.node.lock().unwrap().as_ref() {
            req.metadata_mut()
                .insert("gpupool-node-token", value.clone());
        }
        Ok(req)
    }
}

/// Runs sessions until `shutdown` turns true, reconnecting after failures.
pub async fn run(ctx: Arc<AgentCtx>, mut shutdown: watch::Receiver<bool>) {
    let min_backoff = Duration::from_millis(200);
    let mut backoff = min_backoff;
    let mut attempt = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        let result = serve_once(&ctx, &mut shutdown).await;
        ctx.connected.store(false, Ordering::Relaxed);
        // A session that lasted starts the next round of retries afresh.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = min_backoff;
        }
        let replicas = ctx.scheduler_addrs.len();
        let text = match result {
            Ok(()) => return,
            Err(err) => format!("{err:#}"),
        };
        if replicas > 1 {
            // Try the next replica at once; back off after a full round.
            let tried = ctx.next_addr.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(error = %text, "scheduler session ended; trying the next replica");
            if !tried.is_multiple_of(replicas) {
                if *shutdown.borrow() {
                    return;
                }
                continue;
            }
        }
        attempt += 1;
        let wait = retry_wait(backoff, &ctx.node_id, attempt, &text);
        tracing::warn!(error = %text, retry_in = ?wait, "scheduler session ended");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(ctx.max_backoff.max(min_backoff));
    }
}

/// How long to wait before retry `attempt` after `error`: between half
/// the backoff and all of it, by a hash of the node id and the attempt (so
/// nodes that failed together, e.g. a whole cluster enrolling at once
/// against the join token's rate limit, do not retry together), and never
/// less than the "retry in N ms" a rate-limited scheduler named.
pub(crate) fn retry_wait(backoff: Duration, node_id: &str, attempt: u64, error: &str) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in node_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 29;
    let half = backoff.as_millis() as u64 / 2;
    let jittered = Duration::from_millis(half + h % (half + 1));
    let asked = error
        .split("retry in ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.min(60_000)));
    jittered.max(asked.unwrap_or_default())
}

async fn serve_once(ctx: &AgentCtx, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    if *shutdown.borrow() {
        return Ok(());
    }
    let addrs = &ctx.scheduler_addrs;
    let addr = addrs[ctx.next_addr.load(Ordering::Relaxed) % addrs.len()].clone();
    let endpoint = ctx.tls.endpoint(&addr, Duration::from_secs(3))?;
    let channel = endpoint.connect().await?;
    let join = match &ctx.join_token {
        Some(t) => Some(format!("Bearer {t}").parse()?),
        None => None,
    };
    let node = match read_credential(&ctx.credential_file) {
        Some(t) => Some(t.parse()?),
        None => None,
    };
    let creds = AgentCredentials {
        join,
        node: Arc::new(std::sync::Mutex::new(node)),
    };
    let mut client = AgentServiceClient::with_interceptor(channel, creds.clone());

    let mut gpus = probe_gpus(ctx);
    let registered = client
        .register(pb::RegisterRequest {
            node_id: ctx.node_id.clone(),
            inventory: Some(inventory(ctx, &gpus)),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "registration as node {} refused: {} (credential file {})",
                ctx.node_id,
                status.message(),
                ctx.credential_file.display()
            )
        })?
        .into_inner();
    if !registered.node_token.is_empty() {
        save_credential(&ctx.credential_file, &registered.node_token).map_err(|e| {
            anyhow::anyhow!(
                "cannot keep the node credential in {}: {e}",
                ctx.credential_file.display()
            )
        })?;
        *creds.node.lock().unwrap() = Some(registered.node_token.parse()?);
        tracing::info!(node = %ctx.node_id, file = %ctx.credential_file.display(), "enrolled: node credential issued and kept");
    }
    let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));

    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
    let hello = pb::SessionHello {
        node_id: ctx.node_id.clone(),
        instances: ctx.runtime.snapshot().iter().map(status_to_pb).collect(),
    };
    tx.send(msg(pb::agent_message::Msg::Hello(hello))).await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    ctx.connected.store(true, Ordering::Relaxed);
    tracing::info!(node = %ctx.node_id, scheduler = %addr, "session established");

    let changed = ctx.runtime.changed();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent_inventory = gpus.iter().map(static_part).collect::<Vec<_>>();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = ticker.tick() => {}
            _ = changed.notified() => {}
            incoming = inbound.message() => {
                match incoming? {
                    Some(m) => handle(ctx, m, &tx).await?,
                    None => anyhow::bail!("scheduler closed the session"),
                }
                continue;
            }
        }
        gpus = probe_gpus(ctx);
        let now_static: Vec<_> = gpus.iter().map(static_part).collect();
        let inventory_changed = now_static != last_sent_inventory;
        if inventory_changed {
            last_sent_inventory = now_static;
        }
        let hb = pb::Heartbeat {
            sent_at: Some(gpupool_proto::prost_types::Timestamp::from(
                std::time::SystemTime::now(),
            )),
            inventory: inventory_changed.then(|| inventory(ctx, &gpus)),
            instances: ctx.runtime.snapshot().iter().map(status_to_pb).collect(),
            gpu_samples: gpus.iter().map(gpu_to_pb).collect(),
        };
        tx.send(msg(pb::agent_message::Msg::Heartbeat(hb))).await?;
    }
}

async fn handle(
    ctx: &AgentCtx,
    message: pb::SchedulerMessage,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> anyhow::Result<()> {
    use pb::scheduler_message::Msg;
    match message.msg {
        Some(Msg::Start(start)) => ctx.runtime.start(spec_from_pb(start, ctx)),
        Some(Msg::Stop(stop)) => ctx.runtime.stop(
            &stop.instance_id,
            Duration::from_millis(u64::from(stop.grace_ms)),
            &stop.reason,
        ),
        Some(Msg::Forget(forget)) => ctx.runtime.forget(&forget.instance_id),
        Some(Msg::NetworkPeers(p)) => {
            ctx.runtime
                .set_network_peers(p.vni, &p.peers, &p.routes.into_iter().collect())
        }
        Some(Msg::NetworkHosts(h)) => ctx
            .runtime
            .set_network_hosts(&h.instance_id, &h.hosts.into_iter().collect()),
        Some(Msg::ReadLogs(read)) => {
            let max = (read.max_bytes as usize).clamp(1, MAX_LOG_CHUNK);
            let chunk = match ctx
                .runtime
                .read_log(&read.instance_id, read.offset, max)
                .await
            {
                Ok((data, next_offset)) => pb::LogChunk {
                    request_id: read.request_id,
                    data,
                    next_offset,
                    error: String::new(),
                },
                Err(err) => pb::LogChunk {
                    request_id: read.request_id,
                    data: Vec::new(),
                    next_offset: read.offset,
                    error: err.to_string(),
                },
            };
            tx.send(msg(pb::agent_message::Msg::LogChunk(chunk)))
                .await?;
        }
        None => {}
    }
    Ok(())
}

fn msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// The parts of a GPU whose change must be announced as an inventory delta.
fn static_part(g: &GpuInfo) -> (u32, String, String, u64, bool, String, bool) {
    (
        g.index,
        g.uuid.clone(),
        g.model.clone(),
        g.memory_total_mib,
        g.healthy,
        g.health_reason.clone(),
        g.mig_enabled,
    )
}

fn inventory(ctx: &AgentCtx, gpus: &[GpuInfo]) -> pb::Inventory {
    pb::Inventory {
        hostname: ctx.host.hostname.clone(),
        cpu_cores: ctx.host.cpu_cores,
        cpu_model: ctx.host.cpu_model.clone(),
        memory_mib: ctx.host.memory_mib,
        gpus: gpus.iter().map(gpu_to_pb).collect(),
        os: ctx.host.os.clone(),
        kernel: ctx.host.kernel.clone(),
        az: ctx.az.clone(),
        labels: ctx.labels.clone().into_iter().collect(),
        fake_gpus: ctx.probe.is_fake(),
        address: ctx.address.clone(),
    }
}

fn gpu_to_pb(g: &GpuInfo) -> pb::Gpu {
    pb::Gpu {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        memory_total_mib: g.memory_total_mib,
        healthy: g.healthy,
        health_reason: g.health_reason.clone(),
        mig_enabled: g.mig_enabled,
        pci_bus_id: g.pci_bus_id.clone(),
        utilization_pct: g.utilization_pct,
        memory_used_mib: g.memory_used_mib,
        temperature_c: g.temperature_c,
        power_mw: g.power_mw,
    }
}

fn status_to_pb(r: &InstanceReport) -> pb::InstanceStatus {
    let state = match r.phase {
        Phase::Running => pb::InstanceState::Running,
        Phase::Stopping => pb::InstanceState::Stopping,
        Phase::Succeeded => pb::InstanceState::Succeeded,
        Phase::Failed => pb::InstanceState::Failed,
        Phase::Stopped => pb::InstanceState::Stopped,
    };
    pb::InstanceStatus {
        instance_id: r.instance_id.clone(),
        state: state as i32,
        exit_code: r.exit_code,
        signal: r.signal,
        reason: r.reason.clone(),
        pid: r.pid,
        port: u32::from(r.port),
        ready: r.ready,
        idle_ms: r.idle_ms,
        image_digest: r.image_digest.clone(),
        pulling: r.pull.is_some(),
        pull_done_bytes: r.pull.map_or(0, |p| p.0),
        pull_total_bytes: r.pull.map_or(0, |p| p.1),
    }
}

/// The `/dev/nvidiaN` minors behind the scheduler's device indexes (a MIG
/// device opens its parent's). An index the probe no longer knows maps to
/// nothing: the instance then sees no GPU rather than another one.
fn gpu_minors(indexes: &[u32], gpus: &[GpuInfo]) -> Vec<u32> {
    let mut minors: Vec<u32> = indexes
        .iter()
        .filter_map(|i| gpus.iter().find(|g| g.index == *i))
        .map(|g| g.minor_number)
        .collect();
    minors.sort_unstable();
    minors.dedup();
    minors
}

fn spec_from_pb(s: pb::StartInstance, ctx: &AgentCtx) -> InstanceSpec {
    let pids_max = ctx.pids_max;
    let res = s.resources.unwrap_or_default();
    let gpus = probe_gpus(ctx);
    // A fraction of a GPU, with an MPS daemon configured: limit its threads
    // and its memory to its share.
    let mps = match (&ctx.mps_pipe_dir, res.gpu_milli) {
        (Some(dir), milli) if milli > 0 => Some(crate::runtime::Mps {
            pipe_dir: dir.clone(),
            active_thread_pct: (milli as u32).div_ceil(10).clamp(1, 100),
            pinned_mem_mib: s
                .gpu_indexes
                .iter()
                .filter_map(|i| gpus.iter().find(|g| g.index == *i))
                .map(|g| (g.uuid.clone(), g.memory_total_mib * milli as u64 / 1000))
                .collect(),
        }),
        _ => None,
    };
    let limits = crate::cgroup::Limits {
        memory_bytes: (res.memory_mib > 0).then(|| res.memory_mib as u64 * 1024 * 1024),
        cpu_milli: (res.cpu_milli > 0).then_some(res.cpu_milli as u64),
        pids_max,
        gpu_minors: Some(gpu_minors(&s.gpu_indexes, &gpus)),
        runtime_devices: !s.image.is_empty(),
    };
    let token = s
        .env
        .get("GPUPOOL_NOTEBOOK_TOKEN")
        .cloned()
        .unwrap_or_default();
    InstanceSpec {
        limits,
        mps,
        instance_id: s.instance_id,
        job_id: s.job_id,
        command: s.command,
        env: s.env.into_iter().collect(),
        working_dir: Some(s.working_dir)
            .filter(|d| !d.is_empty())
            .map(Into::into),
        gpu_uuids: s.gpu_uuids,
        gpu_indexes: s.gpu_indexes,
        image: s.image,
        network: s.network,
        attach: s.attach.map(|a| crate::network::Attach {
            name: a.name,
            vni: a.vni,
            subnet: a.subnet,
            gateway: a.gateway,
            address: a.address,
            peers: a.peers,
            hosts: a.hosts.into_iter().collect(),
            vpc: a.vpc,
            rules: a
                .rules
                .into_iter()
                // A port out of range leaves the rule out (it lets nothing in).
                .filter_map(|r| {
                    Some(crate::network::Rule {
                        ingress: r.ingress,
                        protocol: r.protocol,
                        ports: (
                            u16::try_from(r.port_first).ok()?,
                            u16::try_from(r.port_last).ok()?,
                        ),
                        cidr: r.cidr,
                    })
                })
                .collect(),
            no_egress: a.no_egress,
            routed: a.routed,
            routes: a.routes.into_iter().collect(),
        }),
        attached: None,
        rank: s.rank,
        world_size: s.world_size,
        metadata: s.metadata.into_iter().collect(),
        serve: s.needs_port.then(|| crate::runtime::Serve {
            port: u16::try_from(s.port).unwrap_or(0),
            health: s.health_check.map(|h| crate::serving::HealthSpec {
                http_path: Some(h.http_path).filter(|p| !p.is_empty()),
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                failure_threshold: h.failure_threshold,
                initial_delay_ms: h.initial_delay_ms,
            }),
            watch_activity: s.watch_activity,
            token: token.clone(),
            address: None,
            netns: None,
        }),
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn retries_spread_between_half_the_backoff_and_all_of_it() {
        let b = Duration::from_millis(1000);
        let waits: Vec<Duration> = (0..50)
            .map(|i| retry_wait(b, &format!("node-{i}"), 1, "transport error"))
            .collect();
        assert!(waits.iter().all(|w| *w >= b / 2 && *w <= b), "{waits:?}");
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 25, "nodes retry apart: {distinct:?}");
        // The same node and attempt: the same wait; the next attempt: another.
        assert_eq!(retry_wait(b, "n", 3, ""), retry_wait(b, "n", 3, ""));
        let by_attempt: std::collections::BTreeSet<_> =
            (1..20).map(|a| retry_wait(b, "n", a, "")).collect();
        assert!(by_attempt.len() > 5);
    }

    #[test]
    fn a_rate_limited_agent_waits_as_long_as_the_scheduler_asks() {
        let b = Duration::from_millis(200);
        let err = "status: ResourceExhausted, message: \"rate limit: 200 requests/s (burst 400) for (join token); retry in 1500 ms\"";
        assert_eq!(retry_wait(b, "n", 1, err), Duration::from_millis(1500));
        // Never more than a minute, whatever it says.
        let err = "retry in 99999999 ms";
        assert_eq!(retry_wait(b, "n", 1, err), Duration::from_secs(60));
        // Shorter than the jitter: the jitter.
        assert!(retry_wait(b, "n", 1, "retry in 1 ms") >= b / 2);
    }
}
