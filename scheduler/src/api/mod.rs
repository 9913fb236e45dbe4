//! The gRPC edge: services, the one place errors become `tonic::Status`
//! (`error`), and conversions between protobuf and domain types.

pub mod access;
pub mod agent;
pub mod audit;
pub mod auth;
pub mod client;
mod error;
pub mod limits;
pub mod pools;
pub mod usage;

#[cfg(test)]
mod commit_tests;

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn pages_cover_every_item_once_in_order() {
        let items: Vec<String> = (0..10).map(|i| format!("k{i:02}")).collect();
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let (page, next) = take_page(items.iter().map(|k| (k.clone(), k.clone())), &token, 3);
            assert!(page.len() <= 3);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);
        // An exact fit ends with an empty token, not an empty page.
        let (page, next) = take_page(items.iter().map(|k| (k.clone(), 0)), "", 10);
        assert_eq!((page.len(), next.as_str()), (10, ""));
        assert_eq!(page_size(0, 1000), 1000);
        assert_eq!(page_size(5_000, 1000), 1000);
        assert_eq!(page_size(7, 1000), 7);
    }
}

use gpupool_proto::timestamp_from_unix_ms as ts;
use gpupool_proto::v1 as pb;

pub use error::status;

use crate::cluster::{AgentCommand, NodeUsage, ReportedInstance};
use crate::domain::job::PriorityClass;
use crate::domain::{self, InstanceState, JobKind, JobState, NodeStatus, job::RawJobSpec};
use crate::state::{LogChunk, ToAgent};

/// The page size a list request gets: its own, at most `max` (0: `max`).
pub fn page_size(asked: u32, max: u32) -> usize {
    let max = max.max(1);
    (if asked == 0 { max } else { asked.min(max) }) as usize
}

/// One page of `items` (ascending by key): those whose key comes after
/// `token` (all for an empty token), at most `size`, and the token of the
/// next page (the last key taken), empty when nothing is left.
pub fn take_page<K: AsRef<str>, T>(
    items: impl Iterator<Item = (K, T)>,
    token: &str,
    size: usize,
) -> (Vec<T>, String) {
    let mut items = items
        .filter(|(k, _)| token.is_empty() || k.as_ref() > token)
        .peekable();
    let mut page = Vec::new();
    let mut last = String::new();
    while page.len() < size {
        match items.next() {
            Some((k, v)) => {
                last = k.as_ref().to_string();
                page.push(v);
            }
            None => return (page, String::new()),
        }
    }
    let next = if items.peek().is_some() {
        last
    } else {
        String::new()
    };
    (page, next)
}

pub fn kind_from_pb(k: i32) -> Option<JobKind> {
    match pb::JobKind::try_from(k).ok()? {
        pb::JobKind::Notebook => Some(JobKind::Notebook),
        pb::JobKind::Training => Some(JobKind::Training),
        pb::JobKind::Tensorboard => Some(JobKind::Tensorboard),
        pb::JobKind::OnlineService => Some(JobKind::OnlineService),
        pb::JobKind::BatchService => Some(JobKind::BatchService),
        pb::JobKind::Unspecified => None,
    }
}

/// Unset or unknown classes are normal.
pub fn class_from_pb(c: i32) -> PriorityClass {
    match pb::PriorityClass::try_from(c) {
        Ok(pb::PriorityClass::Preemptible) => PriorityClass::Preemptible,
        Ok(pb::PriorityClass::High) => PriorityClass::High,
        _ => PriorityClass::Normal,
    }
}

/// Normal is sent as unset, as before classes existed (so a job's spec
/// reads back the same to an older client or across an upgrade).
fn class_to_pb(c: PriorityClass) -> pb::PriorityClass {
    match c {
        PriorityClass::Preemptible => pb::PriorityClass::Preemptible,
        PriorityClass::Normal => pb::PriorityClass::Unspecified,
        PriorityClass::High => pb::PriorityClass::High,
    }
}

pub fn kind_to_pb(k: JobKind) -> pb::JobKind {
    match k {
        JobKind::Notebook => pb::JobKind::Notebook,
        JobKind::Training => pb::JobKind::Training,
        JobKind::Tensorboard => pb::JobKind::Tensorboard,
        JobKind::OnlineService => pb::JobKind::OnlineService,
        JobKind::BatchService => pb::JobKind::BatchService,
    }
}

pub fn raw_spec_from_pb(s: pb::JobSpec) -> RawJobSpec {
    let res = s.resources.unwrap_or_default();
    RawJobSpec {
        name: s.name,
        kind: kind_from_pb(s.kind),
        pool: s.pool,
        gpus: i64::from(res.gpus),
        gpu_milli: i64::from(res.gpu_milli),
        gpu_models: res.gpu_models,
        cpu_milli: res.cpu_milli,
        memory_mib: res.memory_mib,
        instances: i64::from(s.instances),
        command: s.command,
        env: s.env.into_iter().collect(),
        working_dir: s.working_dir,
        priority: s.priority,
        max_runtime_secs: s.max_runtime_secs,
        max_retries: s.max_retries,
        port: s.port,
        completions: s.completions,
        health_check: s.health_check.map(health_from_pb),
        idle_timeout_secs: s.idle_timeout_secs,
        log_dir: s.log_dir,
        for_job: s.for_job,
        priority_class: class_from_pb(s.priority_class),
        cpu_only: s.cpu_only,
        image: s.image,
        network: s.network,
    }
}

/// A health check with its defaults filled in.
fn health_from_pb(h: pb::HealthCheck) -> domain::job::HealthCheck {
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    domain::job::HealthCheck {
        http_path: Some(h.http_path).filter(|p| !p.is_empty()),
        interval_ms: or(h.interval_ms, 1000),
        timeout_ms: or(h.timeout_ms, 1000),
        failure_threshold: or(h.failure_threshold, 3),
        initial_delay_ms: h.initial_delay_ms,
    }
}

fn health_to_pb(h: &domain::job::HealthCheck) -> pb::HealthCheck {
    pb::HealthCheck {
        http_path: h.http_path.clone().unwrap_or_default(),
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        failure_threshold: h.failure_threshold,
        initial_delay_ms: h.initial_delay_ms,
    }
}

/// The kinds' settings as `ListJobKinds` returns them.
pub fn kinds_to_pb(kinds: &domain::job::KindTable) -> pb::ListJobKindsResponse {
    pb::ListJobKindsResponse {
        kinds: JobKind::ALL
            .into_iter()
            .map(|kind| {
                let k = kinds.get(kind);
                pb::JobKindInfo {
                    kind: kind_to_pb(kind) as i32,
                    command: k.command.clone(),
                    resources: Some(pb::Resources {
                        gpus: k.gpus as i32,
                        gpu_milli: k.gpu_milli as i32,
                        gpu_models: Vec::new(),
                        cpu_milli: k.cpu_milli as i64,
                        memory_mib: k.memory_mib as i64,
                    }),
                    max_runtime_secs: k.max_runtime_secs,
                    max_runtime_limit_secs: k.max_runtime_limit_secs,
                    idle_timeout_secs: k.idle_timeout_secs,
                    idle_gpu_util_pct: k.idle_gpu_util_pct,
                    image: k.image.clone(),
                }
            })
            .collect(),
    }
}

fn resources_to_pb(r: &domain::Resources) -> pb::Resources {
    pb::Resources {
        gpus: r.gpus as i32,
        gpu_milli: r.gpu_milli as i32,
        gpu_models: r.gpu_models.clone(),
        cpu_milli: r.cpu_milli as i64,
        memory_mib: r.memory_mib as i64,
    }
}

fn job_state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Scheduled => pb::JobState::Scheduled,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::Lost => pb::JobState::Lost,
        JobState::Unavailable => pb::JobState::Unavailable,
    }
}

pub fn job_state_from_pb(s: i32) -> Option<JobState> {
    Some(match pb::JobState::try_from(s).ok()? {
        pb::JobState::Queued => JobState::Queued,
        pb::JobState::Scheduled => JobState::Scheduled,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
        pb::JobState::Lost => JobState::Lost,
        pb::JobState::Unavailable => JobState::Unavailable,
        pb::JobState::Unspecified => return None,
    })
}

fn instance_state_to_pb(s: InstanceState) -> pb::InstanceState {
    match s {
        InstanceState::Scheduled => pb::InstanceState::Scheduled,
        InstanceState::Running => pb::InstanceState::Running,
        InstanceState::Stopping => pb::InstanceState::Stopping,
        InstanceState::Succeeded => pb::InstanceState::Succeeded,
        InstanceState::Failed => pb::InstanceState::Failed,
        InstanceState::Stopped => pb::InstanceState::Stopped,
        InstanceState::Lost => pb::InstanceState::Lost,
    }
}

pub fn job_to_pb(j: &domain::Job) -> pb::Job {
    let s = &j.spec;
    pb::Job {
        job_id: j.job_id.clone(),
        spec: Some(pb::JobSpec {
            name: s.name.clone(),
            kind: kind_to_pb(s.kind) as i32,
            pool: s.pool.clone(),
            resources: Some(resources_to_pb(&s.resources)),
            instances: s.instances as i32,
            command: s.command.clone(),
            env: s.env.clone().into_iter().collect(),
            working_dir: s.working_dir.clone().unwrap_or_default(),
            priority: s.priority,
            max_runtime_secs: s.max_runtime_secs,
            max_retries: s.max_retries,
            port: s.port,
            completions: s.completions,
            health_check: s.health_check.as_ref().map(health_to_pb),
            idle_timeout_secs: s.idle_timeout_secs,
            log_dir: s.log_dir.clone(),
            for_job: s.for_job.clone(),
            cpu_only: false,
            image: s.image.clone(),
            network: s.network.clone(),
            priority_class: class_to_pb(s.priority_class) as i32,
        }),
        preemptions: j.preemptions,
        preempted_by: j.last_preempted_by.clone(),
        state: job_state_to_pb(j.state) as i32,
        reason: j.reason.clone(),
        tenant: j.tenant.clone(),
        pool_id: j.pool_id.clone(),
        instances: j
            .instances
            .iter()
            .map(|i| pb::Instance {
                instance_id: i.instance_id.clone(),
                rank: i.rank,
                node_id: i.node_id.clone(),
                gpu_indexes: i.gpu_indexes.clone(),
                state: instance_state_to_pb(i.state) as i32,
                exit_code: i.exit_code,
                signal: i.signal,
                reason: i.reason.clone(),
                started_at: i.started_at_ms.map(ts),
                finished_at: i.finished_at_ms.map(ts),
                gpu_uuids: i.gpu_uuids.clone(),
                attempt: i.attempt,
                port: i.port,
                ready: i.ready,
                endpoint: i.endpoint().unwrap_or_default(),
                replaced: i.replaced,
                image_digest: i.image_digest.clone(),
                pulling: i.pull.is_some(),
                pull_done_bytes: i.pull.map_or(0, |p| p.0),
                pull_total_bytes: i.pull.map_or(0, |p| p.1),
                network_address: i
                    .net
                    .as_ref()
                    .map(|n| n.address.clone())
                    .unwrap_or_default(),
                network: i.net.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
            })
            .collect(),
        submitted_at: Some(ts(j.submitted_at_ms)),
        started_at: j.started_at_ms.map(ts),
        finished_at: j.finished_at_ms.map(ts),
        // Retries used: runs requeued, or for a batch service the failed
        // completions retried (what `max_retries` bounds for each).
        retries: if j.spec.kind == JobKind::BatchService {
            j.failures
        } else {
            j.retries
        },
        url: j.url().unwrap_or_default(),
        restarts: j.restarts,
        ready_replicas: j.ready_replicas(),
        succeeded: j.succeeded(),
    }
}

pub fn inventory_from_pb(inv: pb::Inventory) -> domain::Inventory {
    domain::Inventory {
        hostname: inv.hostname,
        cpu_cores: inv.cpu_cores,
        cpu_model: inv.cpu_model,
        memory_mib: inv.memory_mib,
        gpus: inv
            .gpus
            .into_iter()
            .map(|g| domain::Gpu {
                index: g.index,
                uuid: g.uuid,
                model: g.model,
                memory_total_mib: g.memory_total_mib,
                healthy: g.healthy,
                health_reason: g.health_reason,
                mig_enabled: g.mig_enabled,
                pci_bus_id: g.pci_bus_id,
            })
            .collect(),
        os: inv.os,
        kernel: inv.kernel,
        az: inv.az,
        labels: inv.labels.into_iter().collect(),
        fake_gpus: inv.fake_gpus,
        address: inv.address,
    }
}

fn inventory_to_pb(inv: &domain::Inventory) -> pb::Inventory {
    pb::Inventory {
        hostname: inv.hostname.clone(),
        cpu_cores: inv.cpu_cores,
        cpu_model: inv.cpu_model.clone(),
        memory_mib: inv.memory_mib,
        gpus: inv
            .gpus
            .iter()
            .map(|g| pb::Gpu {
                index: g.index,
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                memory_total_mib: g.memory_total_mib,
                healthy: g.healthy,
                health_reason: g.health_reason.clone(),
                mig_enabled: g.mig_enabled,
                pci_bus_id: g.pci_bus_id.clone(),
                ..Default::default()
            })
            .collect(),
        os: inv.os.clone(),
        kernel: inv.kernel.clone(),
        az: inv.az.clone(),
        labels: inv.labels.clone().into_iter().collect(),
        fake_gpus: inv.fake_gpus,
        address: inv.address.clone(),
    }
}

pub fn node_to_pb(n: &domain::Node, usage: Option<&NodeUsage>) -> pb::Node {
    let usage = usage.cloned().unwrap_or_default();
    pb::Node {
        node_id: n.node_id.clone(),
        inventory: Some(inventory_to_pb(&n.inventory)),
        status: match n.status {
            NodeStatus::Ready => pb::NodeStatus::Ready,
            NodeStatus::NotReady => pb::NodeStatus::NotReady,
        } as i32,
        last_heartbeat: Some(ts(n.last_heartbeat_ms)),
        registered_at: Some(ts(n.registered_at_ms)),
        pool: n.pool.clone(),
        spec: n.spec_name(),
        cordoned: n.cordoned,
        gpus_allocated_milli: usage.gpu_milli.iter().sum(),
        cpu_allocated_milli: usage.cpu_milli,
        memory_allocated_mib: usage.memory_mib,
        gpu_allocated_milli: usage.gpu_milli,
        instance_ids: usage.instance_ids,
        revoked: n.revoked,
        draining: n.drain.is_some(),
        drain_started: n.drain.as_ref().map(|d| ts(d.started_at_ms)),
        drain_deadline: n.drain.as_ref().and_then(|d| d.deadline_ms).map(ts),
        drain_force: n.drain.as_ref().is_some_and(|d| d.force),
        agent_version: n.agent_version.clone(),
    }
}

pub fn reported_from_pb(s: pb::InstanceStatus) -> Option<ReportedInstance> {
    let state = match pb::InstanceState::try_from(s.state).ok()? {
        pb::InstanceState::Running => InstanceState::Running,
        pb::InstanceState::Stopping => InstanceState::Stopping,
        pb::InstanceState::Succeeded => InstanceState::Succeeded,
        pb::InstanceState::Failed => InstanceState::Failed,
        pb::InstanceState::Stopped => InstanceState::Stopped,
        pb::InstanceState::Lost => InstanceState::Lost,
        pb::InstanceState::Scheduled | pb::InstanceState::Unspecified => return None,
    };
    Some(ReportedInstance {
        instance_id: s.instance_id,
        state,
        exit_code: s.exit_code,
        signal: s.signal,
        reason: s.reason,
        port: s.port,
        ready: s.ready,
        idle_ms: s.idle_ms,
        image_digest: s.image_digest,
        pull: s.pulling.then_some((s.pull_done_bytes, s.pull_total_bytes)),
    })
}

/// What goes down an agent's session, as the protocol has it.
pub fn to_agent_pb(m: ToAgent) -> pb::SchedulerMessage {
    match m {
        ToAgent::Command(cmd) => command_to_pb(cmd),
        ToAgent::ReadLogs(read) => pb::SchedulerMessage {
            msg: Some(pb::scheduler_message::Msg::ReadLogs(pb::ReadLogs {
                request_id: read.request_id,
                instance_id: read.instance_id,
                offset: read.offset,
                max_bytes: read.max_bytes,
            })),
        },
    }
}

pub fn log_chunk_from_pb(c: pb::LogChunk) -> LogChunk {
    LogChunk {
        request_id: c.request_id,
        data: c.data,
        next_offset: c.next_offset,
        error: c.error,
    }
}

pub fn command_to_pb(cmd: AgentCommand) -> pb::SchedulerMessage {
    use pb::scheduler_message::Msg;
    let msg = match cmd {
        AgentCommand::Start(s) => Msg::Start(pb::StartInstance {
            instance_id: s.instance_id,
            job_id: s.job_id,
            kind: kind_to_pb(s.kind) as i32,
            command: s.command,
            env: s.env.into_iter().collect(),
            working_dir: s.working_dir.unwrap_or_default(),
            gpu_indexes: s.gpu_indexes,
            gpu_uuids: s.gpu_uuids,
            resources: Some(resources_to_pb(&s.resources)),
            rank: s.rank,
            world_size: s.world_size,
            metadata: s.metadata.into_iter().collect(),
            needs_port: s.needs_port,
            port: s.port,
            health_check: s.health_check.as_ref().map(health_to_pb),
            watch_activity: s.watch_activity,
            image: s.image,
            network: s.network,
            attach: s.attach.map(|a| pb::NetworkAttach {
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
                    .map(|r| pb::SecurityRule {
                        ingress: r.ingress,
                        protocol: r.protocol,
                        port_first: r.ports.0.into(),
                        port_last: r.ports.1.into(),
                        cidr: r.cidr,
                    })
                    .collect(),
                no_egress: a.no_egress,
                routed: a.routed,
                routes: a.routes.into_iter().collect(),
            }),
        }),
        AgentCommand::Stop {
            instance_id,
            grace_ms,
            reason,
        } => Msg::Stop(pb::StopInstance {
            instance_id,
            grace_ms,
            reason,
        }),
        AgentCommand::Forget { instance_id } => Msg::Forget(pb::ForgetInstance { instance_id }),
        AgentCommand::NetworkPeers { vni, peers, routes } => Msg::NetworkPeers(pb::NetworkPeers {
            vni,
            peers,
            routes: routes.into_iter().collect(),
        }),
        AgentCommand::NetworkHosts { instance_id, hosts } => Msg::NetworkHosts(pb::NetworkHosts {
            instance_id,
            hosts: hosts.into_iter().collect(),
        }),
    };
    pb::SchedulerMessage { msg: Some(msg) }
}
