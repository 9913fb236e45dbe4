//! `PoolService` and `TenantService`: dedicated pools, specs, tenants,
//! tokens and quotas. Conversions between protobuf and the pool domain
//! happen here.

use gpupool_proto::timestamp_from_unix_ms as ts;
use gpupool_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::auth::{caller, new_token, sha256_hex};
use super::client::Api;
use super::status;
use crate::cluster::{Cluster, PoolRef};
use crate::domain::pool::{
    BillingMode, CreateRequest, Network, Pool, PoolStatus, PoolType, SubscriptionTerms,
};
use crate::domain::scheduling::Share;
use crate::domain::tenant::{Quota, Tenant};
use crate::domain::{NodeStatus, PUBLIC_POOL};
use crate::now_ms;

fn pool_type_to_pb(t: PoolType) -> pb::PoolType {
    match t {
        PoolType::Train => pb::PoolType::Train,
        PoolType::Deploy => pb::PoolType::Deploy,
    }
}

fn status_to_pb(s: PoolStatus) -> pb::PoolStatus {
    match s {
        PoolStatus::Creating => pb::PoolStatus::Creating,
        PoolStatus::Running => pb::PoolStatus::Running,
        PoolStatus::Scaling => pb::PoolStatus::Scaling,
        PoolStatus::Abnormal => pb::PoolStatus::Abnormal,
        PoolStatus::Unavailable => pb::PoolStatus::Unavailable,
        PoolStatus::CreateFailed => pb::PoolStatus::CreateFailed,
        PoolStatus::Deleting => pb::PoolStatus::Deleting,
        PoolStatus::Deleted => pb::PoolStatus::Deleted,
        PoolStatus::Frozen => pb::PoolStatus::Frozen,
    }
}

fn billing_to_pb(b: BillingMode) -> pb::BillingMode {
    match b {
        BillingMode::OnDemand => pb::BillingMode::OnDemand,
        BillingMode::Subscription => pb::BillingMode::Subscription,
    }
}

fn network_to_pb(n: &Network) -> pb::Network {
    use pb::network::Network as N;
    pb::Network {
        network: Some(match n {
            Network::Custom {
                vpc_id,
                subnet_id,
                security_group_ids,
            } => N::Custom(pb::CustomNetwork {
                vpc_id: vpc_id.clone(),
                subnet_id: subnet_id.clone(),
                security_group_ids: security_group_ids.clone(),
            }),
            Network::Isolated { network_id } => N::Isolated(pb::IsolatedNetwork {
                network_id: network_id.clone(),
            }),
        }),
    }
}

/// A dedicated pool with capacity figures from the cluster.
fn pool_to_pb(p: &Pool, cluster: &Cluster) -> pb::Pool {
    let usage = cluster.usage();
    let nodes: Vec<_> = p
        .node_ids
        .iter()
        .filter_map(|id| cluster.node(id).ok())
        .collect();
    pb::Pool {
        pool_id: p.pool_id.clone(),
        name: p.name.clone(),
        r#type: pool_type_to_pb(p.pool_type) as i32,
        description: p.description.clone(),
        tenant: p.tenant.clone(),
        spec: p.spec.clone(),
        node_count: p.node_ids.len() as u32,
        target_node_count: p.target_node_count() as u32,
        no_egress: p.no_egress,
        az: p.az_requested.clone(),
        resolved_az: p.az.clone(),
        network: p.network.as_ref().map(network_to_pb),
        billing_mode: billing_to_pb(p.billing_mode) as i32,
        subscription: p.subscription.map(|s| pb::Subscription {
            months: s.months,
            auto_renew: s.auto_renew,
            convert_to_on_demand_at_expiry: s.convert_to_on_demand_at_expiry,
            starts_at: p.term.map(|t| ts(t.start_ms)),
            ends_at: p.term.map(|t| ts(t.end_ms)),
            billed_months: crate::domain::billing::billed_months(p.pool_type, s.months),
        }),
        region: p.region.clone(),
        status: status_to_pb(p.status) as i32,
        status_reason: p.status_reason.clone(),
        node_ids: p.node_ids.clone(),
        created_at: Some(ts(p.created_at_ms)),
        deleted_at: p.deleted_at_ms.map(ts),
        gpus_total: nodes.iter().map(|n| n.inventory.gpus.len() as u32).sum(),
        gpus_allocated_milli: nodes
            .iter()
            .filter_map(|n| usage.get(&n.node_id))
            .map(|u| u.gpu_milli.iter().sum::<u32>())
            .sum(),
        nodes_ready: nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready)
            .count() as u32,
    }
}

/// The built-in public pool, summarised from its nodes.
fn public_pool(cluster: &Cluster) -> pb::Pool {
    let usage = cluster.usage();
    let nodes: Vec<_> = cluster.nodes().filter(|n| n.pool == PUBLIC_POOL).collect();
    let ready = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Ready)
        .count() as u32;
    let (status, reason) = if ready > 0 {
        (pb::PoolStatus::Running, String::new())
    } else if nodes.is_empty() {
        let reason = match cluster.nodes().count() {
            0 => "no nodes registered".to_string(),
            n => format!("no nodes: all {n} are in dedicated pools"),
        };
        (pb::PoolStatus::Unavailable, reason)
    } else {
        (pb::PoolStatus::Unavailable, "no node Ready".to_string())
    };
    pb::Pool {
        pool_id: PUBLIC_POOL.into(),
        name: PUBLIC_POOL.into(),
        r#type: pb::PoolType::Public as i32,
        description: "Shared pool; resources are allocated per job (R-POOL-1)".into(),
        node_count: nodes.len() as u32,
        target_node_count: nodes.len() as u32,
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
}

fn create_from_pb(r: pb::CreatePoolRequest) -> CreateRequest {
    let pool_type = match pb::PoolType::try_from(r.r#type) {
        Ok(pb::PoolType::Train) => Some(PoolType::Train),
        Ok(pb::PoolType::Deploy) => Some(PoolType::Deploy),
        _ => None,
    };
    let billing_mode = match pb::BillingMode::try_from(r.billing_mode) {
        Ok(pb::BillingMode::OnDemand) => Some(BillingMode::OnDemand),
        Ok(pb::BillingMode::Subscription) => Some(BillingMode::Subscription),
        _ => None,
    };
    let custom_network = match r.network.and_then(|n| n.network) {
        Some(pb::network::Network::Custom(c)) => {
            Some((c.vpc_id, c.subnet_id, c.security_group_ids))
        }
        _ => None,
    };
    CreateRequest {
        pool_type,
        name: r.name,
        description: r.description,
        spec: r.spec,
        node_count: r.node_count,
        az: r.az,
        custom_network,
        no_egress: r.no_egress,
        billing_mode,
        // An all-default subscription message means "none".
        subscription: r
            .subscription
            .filter(|s| s.months > 0 || s.auto_renew)
            .map(|s| SubscriptionTerms {
                months: s.months,
                auto_renew: s.auto_renew,
                convert_to_on_demand_at_expiry: s.convert_to_on_demand_at_expiry,
            }),
        region: r.region,
    }
}

/// A seed for drawing a random zone (R-CREATE-15).
fn seed() -> u64 {
    now_ms() as u64 ^ 0x9e37_79b9_7f4a_7c15
}

#[tonic::async_trait]
impl pb::pool_service_server::PoolService for Api {
    async fn list_pools(
        &self,
        req: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let size = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        let (pools, next_page_token) = self.shared.with(|core, _| {
            let c = &core.cluster;
            // The public pool first ("!" sorts before every pool id).
            let mut all: Vec<(String, Option<&crate::domain::pool::Pool>)> =
                vec![("!public".to_string(), None)];
            all.extend(
                c.visible_pools(&caller, req.include_deleted)
                    .map(|p| (p.pool_id.clone(), Some(p))),
            );
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let (page, next) = super::take_page(all.into_iter(), &req.page_token, size);
            let pools = page
                .into_iter()
                .map(|p| match p {
                    None => public_pool(c),
                    Some(p) => pool_to_pb(p, c),
                })
                .collect();
            (pools, next)
        });
        Ok(Response::new(pb::ListPoolsResponse {
            pools,
            next_page_token,
        }))
    }

    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let key = req.into_inner().pool;
        self.shared
            .with(|core, _| {
                let c = &core.cluster;
                Ok(match c.resolve_pool(&caller, &key)? {
                    PoolRef::Public => public_pool(c),
                    PoolRef::Dedicated(p) => pool_to_pb(p, c),
                })
            })
            .map(Response::new)
            .map_err(status)
    }

    async fn create_pool(
        &self,
        req: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let create = create_from_pb(req.into_inner());
        self.shared
            .mutate(|core, _| {
                let pool = core
                    .cluster
                    .create_pool(&caller, create, seed(), now_ms())?;
                Ok(pool_to_pb(&pool, &core.cluster))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_pool(
        &self,
        req: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, out| {
                let pool =
                    core.cluster
                        .delete_pool(&caller, &req.pool, req.confirm, now_ms(), out)?;
                Ok(pool_to_pb(&pool, &core.cluster))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn scale_pool(
        &self,
        req: Request<pb::ScalePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let change = req.change.ok_or_else(|| {
            Status::invalid_argument("say add_nodes (scale out) or remove_nodes (scale in)")
        })?;
        self.shared
            .mutate(|core, out| {
                let pool = match change {
                    pb::scale_pool_request::Change::AddNodes(n) => {
                        core.cluster
                            .scale_out(&caller, &req.pool, n, seed(), now_ms())?
                    }
                    pb::scale_pool_request::Change::RemoveNodes(ids) => core.cluster.scale_in(
                        &caller,
                        &req.pool,
                        &ids.node_ids,
                        req.force,
                        now_ms(),
                        out,
                    )?,
                };
                Ok(pool_to_pb(&pool, &core.cluster))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_specs(
        &self,
        req: Request<pb::ListSpecsRequest>,
    ) -> Result<Response<pb::ListSpecsResponse>, Status> {
        caller(&self.shared, req.metadata())?;
        let specs = self.shared.with(|core, _| core.cluster.specs());
        Ok(Response::new(pb::ListSpecsResponse {
            specs: specs
                .into_iter()
                .map(|s| pb::Spec {
                    sold_out: s.sold_out(),
                    name: s.name,
                    gpu_model: s.gpu_model,
                    gpu_count: s.gpu_count,
                    cpu_cores: s.cpu_cores,
                    memory_mib: s.memory_mib,
                    nodes_total: s.nodes_total,
                    nodes_free: s.nodes_free,
                })
                .collect(),
        }))
    }

    async fn scale_in_plan(
        &self,
        req: Request<pb::ScaleInPlanRequest>,
    ) -> Result<Response<pb::ScaleInPlanResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let picks = self
            .shared
            .with(|core, _| core.cluster.scale_in_plan(&caller, &req.pool, req.count))
            .map_err(status)?;
        Ok(Response::new(pb::ScaleInPlanResponse {
            picks: picks
                .into_iter()
                .map(|p| pb::ScaleInPick {
                    node_id: p.node_id,
                    instances_disrupted: p.instances_disrupted,
                    job_ids: p.job_ids,
                    free_gpus: p.free_gpus,
                    pool_free_gpus_after: p.pool_free_gpus_after,
                    pool_fragmented_gpus_after: p.pool_fragmented_gpus_after,
                    explanation: p.explanation,
                })
                .collect(),
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let reports = self.shared.capacity_view(&caller, &req.pool, || {
            self.shared.with(|core, _| {
                let pool = match req.pool.as_str() {
                    "" => None,
                    key => Some(super::client::pool_id_of(&core.cluster, &caller, key)?),
                };
                Ok::<_, Status>(core.cluster.stranded(&caller, pool.as_deref()))
            })
        })?;
        Ok(Response::new(pb::GetCapacityResponse {
            pools: reports.iter().map(capacity_to_pb).collect(),
        }))
    }

    async fn convert_to_subscription(
        &self,
        req: Request<pb::ConvertToSubscriptionRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, _| {
                let pool = core.cluster.convert_to_subscription(
                    &caller,
                    &req.pool,
                    req.months,
                    req.auto_renew,
                    now_ms(),
                )?;
                Ok(pool_to_pb(&pool, &core.cluster))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn set_renewal(
        &self,
        req: Request<pb::SetRenewalRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, _| {
                let pool = core.cluster.set_renewal(
                    &caller,
                    &req.pool,
                    req.auto_renew,
                    req.convert_to_on_demand_at_expiry,
                    now_ms(),
                )?;
                Ok(pool_to_pb(&pool, &core.cluster))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn unsubscribe(
        &self,
        req: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, out| {
                let (pool, refund) =
                    core.cluster
                        .unsubscribe(&caller, &req.pool, req.confirm, now_ms(), out)?;
                Ok(pb::UnsubscribeResponse {
                    pool: Some(pool_to_pb(&pool, &core.cluster)),
                    refund_micros: refund,
                })
            })
            .await
            .map(Response::new)
            .map_err(status)
    }
}

fn tenant_to_pb(t: &Tenant, cluster: &Cluster, share: &Share) -> pb::Tenant {
    let used = cluster.quota_use(&t.name);
    pb::Tenant {
        name: t.name.clone(),
        quota: Some(pb::Quota {
            max_dedicated_nodes: t.quota.max_dedicated_nodes,
            max_gpus: t.quota.max_gpus,
            public_max_gpus: t.quota.public_max_gpus,
            public_weight: t.quota.public_weight.max(1),
            allow_high_class: t.quota.allow_high_class,
        }),
        public_gpu_milli_used: share.tenants.get(&t.name).map_or(0, |s| s.used[0]),
        public_share_ppm: (share.dominant(&t.name) * 1e6).round() as u64,
        public_recent_share_ppm: t.recent.avg_ppb.div_ceil(1000),
        created_at: Some(ts(t.created_at_ms)),
        dedicated_nodes_used: used.nodes,
        gpus_used: used.gpus,
        tokens: cluster.token_count(&t.name),
        network_id: t.network_id.clone(),
    }
}

fn quota_from_pb(q: Option<pb::Quota>) -> Quota {
    q.map(|q| Quota {
        max_dedicated_nodes: q.max_dedicated_nodes,
        max_gpus: q.max_gpus,
        public_max_gpus: q.public_max_gpus,
        public_weight: q.public_weight,
        allow_high_class: q.allow_high_class,
    })
    .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::tenant_service_server::TenantService for Api {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, _| {
                let t = core.cluster.create_tenant(
                    &caller,
                    &req.name,
                    quota_from_pb(req.quota),
                    now_ms(),
                )?;
                Ok(tenant_to_pb(
                    &t,
                    &core.cluster,
                    &core.cluster.public_share(),
                ))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let size = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        self.shared
            .with(|core, _| {
                let c = &core.cluster;
                let share = c.public_share();
                let (page, next_page_token) = super::take_page(
                    c.tenants(&caller)?
                        .into_iter()
                        .map(|t| (t.name.as_str(), t)),
                    &req.page_token,
                    size,
                );
                Ok(pb::ListTenantsResponse {
                    tenants: page
                        .into_iter()
                        .map(|t| tenant_to_pb(t, c, &share))
                        .collect(),
                    next_page_token,
                })
            })
            .map(Response::new)
            .map_err(status)
    }

    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let name = req.into_inner().name;
        self.shared
            .with(|core, _| {
                let c = &core.cluster;
                c.tenant(&caller, &name)
                    .map(|t| tenant_to_pb(t, c, &c.public_share()))
            })
            .map(Response::new)
            .map_err(status)
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let tenant = req.into_inner().tenant;
        let token =
            new_token().map_err(|e| Status::internal(format!("cannot read random bytes: {e}")))?;
        let hash = sha256_hex(&token);
        self.shared
            .mutate(|core, _| core.cluster.add_token(&caller, &tenant, &hash, now_ms()))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::IssueTokenResponse {
            tenant,
            token,
            token_id: hash[..crate::cluster::TOKEN_ID_LEN].to_string(),
        }))
    }

    async fn revoke_tokens(
        &self,
        req: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let revoked = self
            .shared
            .mutate(|core, _| {
                core.cluster
                    .revoke_tokens(&caller, &req.tenant, &req.token_id, now_ms())
            })
            .await?;
        Ok(Response::new(pb::RevokeTokensResponse { revoked }))
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        self.shared
            .mutate(|core, _| {
                let t = core.cluster.set_quota(
                    &caller,
                    &req.tenant,
                    quota_from_pb(req.quota),
                    now_ms(),
                )?;
                Ok(tenant_to_pb(
                    &t,
                    &core.cluster,
                    &core.cluster.public_share(),
                ))
            })
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        Ok(Response::new(pb::WhoAmIResponse {
            tenant: caller.tenant,
            admin: caller.admin,
        }))
    }
}

/// A pool's stranded capacity at the gRPC boundary.
fn capacity_to_pb(r: &crate::cluster::PoolStranded) -> pb::PoolCapacity {
    let causes = |by: &crate::domain::stranded::ByCause| {
        crate::domain::stranded::CAUSES
            .iter()
            .map(|c| pb::StrandedMilli {
                cause: c.as_str().to_string(),
                milli: by[*c as usize],
            })
            .collect()
    };
    pb::PoolCapacity {
        pool_id: r.pool_id.clone(),
        basis: r.basis.to_string(),
        queued_jobs: u32::try_from(r.queued_jobs).unwrap_or(u32::MAX),
        gpus_milli: r.gpus_milli,
        free_milli: r.free_milli,
        causes: causes(&r.by_cause),
        nodes: r
            .nodes
            .iter()
            .map(|(node_id, by)| pb::NodeStranded {
                node_id: node_id.clone(),
                causes: causes(by),
            })
            .collect(),
    }
}
