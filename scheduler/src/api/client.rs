//! The client-facing services: jobs, nodes, pools, usage. Calls that later
//! issues fill in answer `UNIMPLEMENTED`, never made-up data.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gpupool_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{job_state_from_pb, job_to_pb, node_to_pb, raw_spec_from_pb, status};
use crate::domain::{NodeStatus, PUBLIC_POOL};
use crate::server::{Shared, now_ms};

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

fn unimplemented(what: &str, issue: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented yet ({issue})"))
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::JobLogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for Api {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let raw = raw_spec_from_pb(spec);
        let job = self
            .shared
            .with(|core, out| core.cluster.submit(raw, "", now_ms(), out))
            .map_err(status)?;
        self.shared.metrics.jobs_submitted.inc();
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = req.into_inner().job_id;
        self.shared
            .with(|core, _| core.cluster.job(&id).map(job_to_pb))
            .map(Response::new)
            .map_err(status)
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = req.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            states.push(
                job_state_from_pb(*s)
                    .ok_or_else(|| Status::invalid_argument(format!("unknown job state {s}")))?,
            );
        }
        let jobs = self.shared.with(|core, _| {
            core.cluster
                .jobs()
                .filter(|j| req.pool.is_empty() || j.pool_id == req.pool)
                .filter(|j| states.is_empty() || states.contains(&j.state))
                .map(job_to_pb)
                .collect()
        });
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let id = req.into_inner().job_id;
        self.shared
            .with(|core, out| core.cluster.cancel(&id, now_ms(), out))
            .map(|j| Response::new(job_to_pb(&j)))
            .map_err(status)
    }

    type GetJobLogsStream = LogStream;

    async fn get_job_logs(
        &self,
        req: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let req = req.into_inner();
        // Fail fast on unknown jobs and instances.
        let (node_id, instance_id) = self.shared.with(|core, _| {
            core.cluster
                .instance(&req.job_id, req.instance)
                .map(|(_, i)| (i.node_id.clone(), i.instance_id.clone()))
                .map_err(status)
        })?;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut offset = req.offset;
            loop {
                let done = shared.with(|core, _| {
                    core.cluster
                        .instance(&req.job_id, req.instance)
                        .map(|(_, i)| i.state.is_terminal())
                        .unwrap_or(true)
                });
                let rx = match shared
                    .with(|core, _| core.request_log(&node_id, &instance_id, offset, LOG_CHUNK))
                {
                    Ok(rx) => rx,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
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
        let pool = req.into_inner().pool;
        let nodes = self.shared.with(|core, _| {
            let usage = core.cluster.usage();
            core.cluster
                .nodes()
                .filter(|n| pool.is_empty() || n.pool == pool)
                .map(|n| node_to_pb(n, usage.get(&n.node_id)))
                .collect()
        });
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = req.into_inner().node_id;
        self.shared
            .with(|core, _| {
                let usage = core.cluster.usage();
                core.cluster
                    .node(&id)
                    .map(|n| node_to_pb(n, usage.get(&n.node_id)))
            })
            .map(Response::new)
            .map_err(status)
    }

    async fn cordon_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.set_cordon(req.into_inner().node_id, true)
    }

    async fn uncordon_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.set_cordon(req.into_inner().node_id, false)
    }
}

impl Api {
    fn set_cordon(&self, id: String, cordoned: bool) -> Result<Response<pb::Node>, Status> {
        self.shared
            .with(|core, out| {
                core.cluster.set_cordon(&id, cordoned, now_ms(), out)?;
                let usage = core.cluster.usage();
                core.cluster
                    .node(&id)
                    .map(|n| node_to_pb(n, usage.get(&n.node_id)))
            })
            .map(Response::new)
            .map_err(status)
    }

    /// The built-in public pool, summarised from its nodes.
    fn public_pool(&self) -> pb::Pool {
        self.shared.with(|core, _| {
            let usage = core.cluster.usage();
            let nodes: Vec<_> = core
                .cluster
                .nodes()
                .filter(|n| n.pool == PUBLIC_POOL)
                .collect();
            let ready = nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Ready)
                .count() as u32;
            let (status, reason) = if ready > 0 {
                (pb::PoolStatus::Running, String::new())
            } else if nodes.is_empty() {
                (
                    pb::PoolStatus::Unavailable,
                    "no nodes registered".to_string(),
                )
            } else {
                (pb::PoolStatus::Unavailable, "no node Ready".to_string())
            };
            pb::Pool {
                pool_id: PUBLIC_POOL.into(),
                name: PUBLIC_POOL.into(),
                r#type: pb::PoolType::Public as i32,
                description: "Shared pool; resources are allocated per job (R-POOL-1)".into(),
                node_count: nodes.len() as u32,
                status: status as i32,
                status_reason: reason,
                node_ids: nodes.iter().map(|n| n.node_id.clone()).collect(),
                gpus_total: nodes.iter().map(|n| n.inventory.gpus.len() as u32).sum(),
                gpus_allocated_milli: nodes
                    .iter()
                    .filter_map(|n| usage.get(&n.node_id))
                    .map(|u| u.gpu_milli.iter().sum::<u32>())
                    .sum(),
                nodes_ready: ready,
                billing_mode: pb::BillingMode::OnDemand as i32,
                ..Default::default()
            }
        })
    }
}

#[tonic::async_trait]
impl pb::pool_service_server::PoolService for Api {
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Ok(Response::new(pb::ListPoolsResponse {
            pools: vec![self.public_pool()],
        }))
    }

    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let pool = req.into_inner().pool;
        if pool == PUBLIC_POOL {
            Ok(Response::new(self.public_pool()))
        } else {
            Err(Status::not_found(format!("pool {pool:?} not found")))
        }
    }

    async fn create_pool(
        &self,
        _: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Err(unimplemented("CreatePool", "dedicated pools"))
    }
    async fn delete_pool(
        &self,
        _: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Err(unimplemented("DeletePool", "dedicated pools"))
    }
    async fn scale_pool(
        &self,
        _: Request<pb::ScalePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Err(unimplemented("ScalePool", "dedicated pools"))
    }
    async fn list_specs(
        &self,
        _: Request<pb::ListSpecsRequest>,
    ) -> Result<Response<pb::ListSpecsResponse>, Status> {
        Err(unimplemented("ListSpecs", "dedicated pools"))
    }
    async fn convert_to_subscription(
        &self,
        _: Request<pb::ConvertToSubscriptionRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Err(unimplemented("ConvertToSubscription", "billing"))
    }
    async fn set_renewal(
        &self,
        _: Request<pb::SetRenewalRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Err(unimplemented("SetRenewal", "billing"))
    }
    async fn unsubscribe(
        &self,
        _: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        Err(unimplemented("Unsubscribe", "billing"))
    }
}

#[tonic::async_trait]
impl pb::usage_service_server::UsageService for Api {
    async fn list_usage(
        &self,
        _: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        Err(unimplemented("ListUsage", "billing"))
    }
    async fn list_orders(
        &self,
        _: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        Err(unimplemented("ListOrders", "billing"))
    }
}
