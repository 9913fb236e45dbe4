//! The client-facing job and node services (pools and tenants are in
//! `pools.rs`, usage and bills in `usage.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gpupool_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::{job_state_from_pb, job_to_pb, node_to_pb, raw_spec_from_pb, status};
use crate::cluster::{Cluster, ClusterError, PoolRef};
use crate::domain::PUBLIC_POOL;
use crate::domain::tenant::Caller;
use crate::now_ms;
use crate::state::Shared;

/// Bytes asked of the agent per log read.
const LOG_CHUNK: u32 = 256 * 1024;
/// How long an agent may take to answer a log read.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period while following a running instance's log.
const FOLLOW_POLL: Duration = Duration::from_millis(300);

#[derive(Clone)]
pub struct Api {
    pub shared: Arc<Shared>,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::JobLogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for Api {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        if spec.kind != 0 && super::kind_from_pb(spec.kind).is_none() {
            return Err(Status::invalid_argument(format!(
                "unknown kind {} (notebook, training, tensorboard, online_service, batch_service)",
                spec.kind
            )));
        }
        let raw = raw_spec_from_pb(spec);
        let job = self
            .shared
            .mutate(|core, out| core.cluster.submit(&caller, raw, now_ms(), out))
            .await
            .map_err(status)?;
        self.shared.metrics.jobs_submitted.inc();
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let id = req.into_inner().job_id;
        self.shared
            .with(|core, _| core.cluster.job(&caller, &id).map(job_to_pb))
            .map(Response::new)
            .map_err(status)
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            states.push(
                job_state_from_pb(*s)
                    .ok_or_else(|| Status::invalid_argument(format!("unknown job state {s}")))?,
            );
        }
        let size = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        let (jobs, next_page_token) = self.shared.with(|core, _| {
            let pool = match req.pool.as_str() {
                "" => None,
                key => Some(pool_id_of(&core.cluster, &caller, key)?),
            };
            let (page, next) = super::take_page(
                core.cluster
                    .jobs_after(&req.page_token)
                    .filter(|j| caller.may_access(&j.tenant))
                    .filter(|j| pool.as_ref().is_none_or(|p| j.pool_id == *p))
                    .filter(|j| states.is_empty() || states.contains(&j.state))
                    .map(|j| (j.job_id.as_str(), j)),
                &req.page_token,
                size,
            );
            Ok::<_, Status>((page.into_iter().map(job_to_pb).collect(), next))
        })?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let id = req.into_inner().job_id;
        self.shared
            .mutate(|core, out| core.cluster.cancel(&caller, &id, now_ms(), out))
            .await
            .map(|j| Response::new(job_to_pb(&j)))
            .map_err(status)
    }

    async fn scale_service(
        &self,
        req: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, out| {
                core.cluster
                    .scale_service(&caller, &req.job_id, req.replicas, now_ms(), out)
            })
            .await
            .map(|j| Response::new(job_to_pb(&j)))
            .map_err(status)
    }

    async fn restart_service(
        &self,
        req: Request<pb::RestartServiceRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let id = req.into_inner().job_id;
        self.shared
            .mutate(|core, out| core.cluster.restart_service(&caller, &id, now_ms(), out))
            .await
            .map(|j| Response::new(job_to_pb(&j)))
            .map_err(status)
    }

    async fn list_job_kinds(
        &self,
        req: Request<pb::ListJobKindsRequest>,
    ) -> Result<Response<pb::ListJobKindsResponse>, Status> {
        caller(&self.shared, req.metadata())?;
        let kinds = self
            .shared
            .with(|core, _| super::kinds_to_pb(core.cluster.kinds()));
        Ok(Response::new(kinds))
    }

    type GetJobLogsStream = LogStream;

    async fn get_job_logs(
        &self,
        req: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        // A tenant's stream ends when its token is revoked (checked each poll).
        let token_hash = (!caller.admin)
            .then(|| super::auth::bearer(req.metadata()).map(super::auth::sha256_hex))
            .flatten();
        let req = req.into_inner();
        // Fail fast on unknown jobs and instances.
        let (node_id, instance_id) = self.shared.with(|core, _| {
            core.cluster
                .instance(&caller, &req.job_id, req.instance)
                .map(|(_, i)| (i.node_id.clone(), i.instance_id.clone()))
                .map_err(status)
        })?;
        let slot = self.shared.open_log_stream(&caller.rate_key())?;
        let shared = self.shared.clone();
        let max_pending = shared.config.limits.pending_log_reads as usize;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let _slot = slot;
            let mut offset = req.offset;
            loop {
                if tx.is_closed() {
                    // The caller went away.
                    return;
                }
                let (done, revoked) = shared.with(|core, _| {
                    let revoked = token_hash.as_ref().is_some_and(|h| {
                        core.cluster.tenant_of_token(h) != Some(caller.tenant.as_str())
                    });
                    let done = core
                        .cluster
                        .instance(&caller, &req.job_id, req.instance)
                        .map(|(_, i)| i.state.is_terminal())
                        .unwrap_or(true);
                    (done, revoked)
                });
                if revoked {
                    let _ = tx
                        .send(Err(Status::unauthenticated("API token revoked")))
                        .await;
                    return;
                }
                let (request_id, rx) = match shared.with(|core, _| {
                    core.request_log(&node_id, &instance_id, offset, LOG_CHUNK, max_pending)
                }) {
                    Ok(r) => r,
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                let chunk = match tokio::time::timeout(LOG_TIMEOUT, rx).await {
                    Ok(Ok(chunk)) => chunk,
                    Ok(Err(_)) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "node {node_id} disconnected"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => {
                        shared.with(|core, _| core.cancel_log(request_id));
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "node {node_id} did not answer"
                            ))))
                            .await;
                        return;
                    }
                };
                if !chunk.error.is_empty() {
                    let _ = tx.send(Err(Status::not_found(chunk.error))).await;
                    return;
                }
                let got = !chunk.data.is_empty();
                if got {
                    offset = chunk.next_offset;
                    let out = pb::JobLogChunk {
                        data: chunk.data,
                        next_offset: chunk.next_offset,
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                    continue;
                }
                if !req.follow || done {
                    return;
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for Api {
    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let size = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        let (nodes, next_page_token) = self.shared.with(|core, _| {
            let pool = match req.pool.as_str() {
                "" => None,
                key => Some(pool_id_of(&core.cluster, &caller, key)?),
            };
            let (page, next) = super::take_page(
                core.cluster
                    .nodes()
                    .filter(|n| core.cluster.node_visible(&caller, n))
                    .filter(|n| pool.as_ref().is_none_or(|p| n.pool == *p))
                    .map(|n| (n.node_id.as_str(), n)),
                &req.page_token,
                size,
            );
            let usage = visible_usage(&core.cluster, &caller);
            Ok::<_, Status>((
                page.into_iter()
                    .map(|n| node_to_pb(n, usage.get(&n.node_id)))
                    .collect(),
                next,
            ))
        })?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes,
            next_page_token,
        }))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let id = req.into_inner().node_id;
        self.shared
            .with(|core, _| {
                let usage = visible_usage(&core.cluster, &caller);
                core.cluster
                    .node(&id)
                    .ok()
                    .filter(|n| core.cluster.node_visible(&caller, n))
                    .map(|n| node_to_pb(n, usage.get(&n.node_id)))
                    .ok_or_else(|| ClusterError::NodeNotFound { id: id.clone() }.into())
            })
            .map(Response::new)
    }

    async fn cordon_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        self.set_cordon(&caller, req.into_inner().node_id, true)
            .await
    }

    async fn uncordon_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        self.set_cordon(&caller, req.into_inner().node_id, false)
            .await
    }

    async fn revoke_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = req.into_inner().node_id;
        let node = self
            .node_change(&id, |cluster, out| cluster.revoke_node(&id, now_ms(), out))
            .await?;
        // Committed: its session ends now (the stream closes with its sender).
        self.shared.with(|core, _| core.sessions.remove(&id));
        Ok(Response::new(node))
    }

    async fn readmit_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = req.into_inner().node_id;
        let node = self
            .node_change(&id, |cluster, _| cluster.readmit_node(&id, now_ms()))
            .await?;
        Ok(Response::new(node))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let req = req.into_inner();
        let id = req.node_id;
        let deadline_secs = i64::try_from(req.deadline_secs)
            .ok()
            .filter(|s| *s <= 366 * 86_400)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "deadline_secs {} is more than a year",
                    req.deadline_secs
                ))
            })?;
        let now = now_ms();
        let deadline = (deadline_secs > 0).then(|| now + deadline_secs * 1000);
        let node = self
            .node_change(&id, |cluster, out| {
                cluster.drain_node(&id, deadline, req.force, now, out)
            })
            .await?;
        Ok(Response::new(node))
    }
}

impl Api {
    /// Applies an admin's change to node `id` and answers the node as it is
    /// then.
    async fn node_change(
        &self,
        id: &str,
        f: impl FnOnce(
            &mut Cluster,
            &mut crate::cluster::Outbox,
        ) -> Result<crate::domain::Node, ClusterError>,
    ) -> Result<pb::Node, Status> {
        self.shared
            .mutate(|core, out| {
                let node = f(&mut core.cluster, out)?;
                let usage = core.cluster.usage();
                Ok::<_, ClusterError>(node_to_pb(&node, usage.get(id)))
            })
            .await
            .map_err(status)
    }

    async fn set_cordon(
        &self,
        caller: &Caller,
        id: String,
        cordoned: bool,
    ) -> Result<Response<pb::Node>, Status> {
        if !caller.admin {
            let what = "cordoning nodes";
            return Err(ClusterError::AdminOnly { what }.into());
        }
        self.shared
            .mutate(|core, out| {
                core.cluster.set_cordon(&id, cordoned, now_ms(), out)?;
                let usage = core.cluster.usage();
                core.cluster
                    .node(&id)
                    .map(|n| node_to_pb(n, usage.get(&n.node_id)))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }
}

/// Allocation per node, listing only the caller's own instances (a tenant
/// does not learn another tenant's instance ids from a shared node).
fn visible_usage(
    cluster: &Cluster,
    caller: &Caller,
) -> std::collections::HashMap<String, crate::cluster::NodeUsage> {
    let mut usage = cluster.usage();
    if !caller.admin {
        for u in usage.values_mut() {
            u.instance_ids.retain(|id| {
                cluster
                    .instance_tenant(id)
                    .is_some_and(|t| caller.may_access(t))
            });
        }
    }
    usage
}

/// The pool id a filter names ("public" or a dedicated pool id).
pub(super) fn pool_id_of(cluster: &Cluster, caller: &Caller, key: &str) -> Result<String, Status> {
    match cluster.resolve_pool(caller, key).map_err(status)? {
        PoolRef::Public => Ok(PUBLIC_POOL.to_string()),
        PoolRef::Dedicated(p) => Ok(p.pool_id.clone()),
    }
}
