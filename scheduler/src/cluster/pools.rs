//! Tenants, specs and dedicated pools on top of the cluster state: the
//! pure rules of `domain::pool` and `domain::tenant` applied to the live
//! inventory, with every change written through to the store in one
//! transaction.

use crate::store::Store as _;
use std::collections::BTreeMap;

use super::{Cluster, ClusterError, Outbox};
use crate::domain::billing::{self, ModeSpan, Order, OrderKind, Span, Term};
use crate::domain::pool::BillingMode;
use crate::domain::pool::{
    self, CreateRequest, FreeNode, Network, NodeHealth, Pool, PoolError, PoolNode, PoolStatus,
    PoolType, ScaleInPick,
};
use crate::domain::tenant::{self, Caller, Quota, QuotaUse, Tenant};
use crate::domain::{Node, NodeStatus, PUBLIC_POOL, StopCause};
use crate::store::Record;

/// A pool as a job or request names it.
#[derive(Debug, Clone, Copy)]
pub enum PoolRef<'a> {
    Public,
    Dedicated(&'a Pool),
}

/// A node spec (flavor) with its capacity (R-CREATE-7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecInfo {
    pub name: String,
    pub gpu_model: String,
    pub gpu_count: u32,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub nodes_total: u32,
    pub nodes_free: u32,
}

impl SpecInfo {
    pub fn sold_out(&self) -> bool {
        self.nodes_free == 0
    }
}

fn admin_only(caller: &Caller, what: &'static str) -> Result<(), ClusterError> {
    if caller.admin {
        Ok(())
    } else {
        Err(ClusterError::AdminOnly { what })
    }
}

impl Cluster {
    // ---- tenants -------------------------------------------------------

    /// The tenant a token hash belongs to.
    pub fn tenant_of_token(&self, sha256: &str) -> Option<&str> {
        self.tokens.get(sha256).map(String::as_str)
    }

    pub fn tenants(&self, caller: &Caller) -> Result<Vec<&Tenant>, ClusterError> {
        admin_only(caller, "listing tenants")?;
        Ok(self.tenants.values().collect())
    }

    pub fn tenant(&self, caller: &Caller, name: &str) -> Result<&Tenant, ClusterError> {
        if !caller.may_access(name) {
            return Err(ClusterError::NotYourTenant {
                name: name.to_string(),
            });
        }
        self.tenants
            .get(name)
            .ok_or_else(|| ClusterError::TenantNotFound {
                name: name.to_string(),
            })
    }

    /// Number of tokens issued to a tenant.
    pub fn token_count(&self, tenant: &str) -> u32 {
        self.tokens.values().filter(|t| *t == tenant).count() as u32
    }

    pub fn create_tenant(
        &mut self,
        caller: &Caller,
        name: &str,
        quota: Quota,
        now_ms: i64,
    ) -> Result<Tenant, ClusterError> {
        admin_only(caller, "creating tenants")?;
        tenant::validate_tenant_name(name)?;
        if self.tenants.contains_key(name) {
            return Err(ClusterError::TenantExists {
                name: name.to_string(),
            });
        }
        let t = Tenant {
            name: name.to_string(),
            quota,
            created_at_ms: now_ms,
            network_id: format!("net-{name}"),
            recent: Default::default(),
        };
        self.store.write(&[Record::Tenant(&t)], now_ms)?;
        self.tenants.insert(name.to_string(), t.clone());
        tracing::info!(tenant = %name, "tenant created");
        Ok(t)
    }

    /// Records a new token (its hash only) for a tenant.
    pub fn add_token(
        &mut self,
        caller: &Caller,
        tenant: &str,
        sha256: &str,
        now_ms: i64,
    ) -> Result<(), ClusterError> {
        admin_only(caller, "issuing tokens")?;
        if !self.tenants.contains_key(tenant) {
            return Err(ClusterError::TenantNotFound {
                name: tenant.to_string(),
            });
        }
        self.store
            .write(&[Record::Token { sha256, tenant }], now_ms)?;
        self.tokens.insert(sha256.to_string(), tenant.to_string());
        tracing::info!(tenant = %tenant, "token issued");
        Ok(())
    }

    /// Revokes a tenant's tokens: the one whose id (the first
    /// [`super::TOKEN_ID_LEN`] hex digits of its hash) is `token_id`, or all
    /// with "all". Returns how many.
    pub fn revoke_tokens(
        &mut self,
        caller: &Caller,
        tenant: &str,
        token_id: &str,
        now_ms: i64,
    ) -> Result<u32, ClusterError> {
        admin_only(caller, "revoking tokens")?;
        if !self.tenants.contains_key(tenant) {
            return Err(ClusterError::TenantNotFound {
                name: tenant.to_string(),
            });
        }
        let all = token_id == "all";
        if !all && token_id.len() != super::TOKEN_ID_LEN {
            return Err(ClusterError::BadTokenId {
                token_id: token_id.to_string(),
            });
        }
        let hashes: Vec<String> = self
            .tokens
            .iter()
            .filter(|(h, t)| *t == tenant && (all || h.starts_with(token_id)))
            .map(|(h, _)| h.clone())
            .collect();
        if hashes.is_empty() && !all {
            return Err(ClusterError::TokenNotFound {
                tenant: tenant.to_string(),
                token_id: token_id.to_string(),
            });
        }
        let records: Vec<Record<'_>> = hashes
            .iter()
            .map(|h| Record::RevokeToken { sha256: h })
            .collect();
        self.store.write(&records, now_ms)?;
        for h in &hashes {
            self.tokens.remove(h);
        }
        tracing::info!(tenant = %tenant, count = hashes.len(), "tokens revoked");
        Ok(hashes.len() as u32)
    }

    pub fn set_quota(
        &mut self,
        caller: &Caller,
        name: &str,
        quota: Quota,
        now_ms: i64,
    ) -> Result<Tenant, ClusterError> {
        admin_only(caller, "setting quotas")?;
        let mut t =
            self.tenants
                .get(name)
                .cloned()
                .ok_or_else(|| ClusterError::TenantNotFound {
                    name: name.to_string(),
                })?;
        t.quota = quota;
        self.store.write(&[Record::Tenant(&t)], now_ms)?;
        self.tenants.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// Dedicated nodes and their GPUs a tenant holds now (draining ones too).
    pub fn quota_use(&self, tenant: &str) -> QuotaUse {
        let mut used = QuotaUse::default();
        for pool in self
            .pools
            .values()
            .filter(|p| p.tenant == tenant && p.status != PoolStatus::Deleted)
        {
            used.nodes += pool.node_ids.len() as u32;
            used.gpus += pool
                .node_ids
                .iter()
                .filter_map(|n| self.nodes.get(n))
                .map(|n| n.inventory.gpus.len() as u32)
                .sum::<u32>();
        }
        used
    }

    fn quota_of(&self, tenant: &str) -> Quota {
        self.tenants
            .get(tenant)
            .map(|t| t.quota)
            .unwrap_or_default()
    }

    // ---- specs ---------------------------------------------------------

    /// Nodes that may join a pool: Ready, public, not cordoned, idle.
    fn free_nodes(&self) -> Vec<FreeNode> {
        let usage = self.usage();
        self.nodes
            .values()
            .filter(|n| {
                n.pool == PUBLIC_POOL
                    && n.status == NodeStatus::Ready
                    && !n.cordoned
                    && !n.revoked
                    && usage
                        .get(&n.node_id)
                        .is_none_or(|u| u.instance_ids.is_empty())
            })
            .map(|n| FreeNode {
                node_id: n.node_id.clone(),
                spec: n.spec_name(),
                az: n.inventory.az.clone(),
                gpus: n.inventory.gpus.len() as u32,
            })
            .collect()
    }

    /// Every spec of the registered nodes with total and free nodes.
    pub fn specs(&self) -> Vec<SpecInfo> {
        let free = self.free_nodes();
        let mut specs: BTreeMap<String, SpecInfo> = BTreeMap::new();
        for node in self.nodes.values() {
            let name = node.spec_name();
            let entry = specs.entry(name.clone()).or_insert_with(|| SpecInfo {
                name: name.clone(),
                gpu_model: node
                    .inventory
                    .gpus
                    .first()
                    .map(|g| g.model.clone())
                    .unwrap_or_default(),
                gpu_count: node.inventory.gpus.len() as u32,
                cpu_cores: node.inventory.cpu_cores,
                memory_mib: node.inventory.memory_mib,
                nodes_total: 0,
                nodes_free: 0,
            });
            entry.nodes_total += 1;
        }
        for f in free {
            if let Some(s) = specs.get_mut(&f.spec) {
                s.nodes_free += 1;
            }
        }
        specs.into_values().collect()
    }

    // ---- pools: queries --------------------------------------------------

    /// Resolves a pool named by id or name for `caller`: "" and "public"
    /// are the public pool; another tenant's pool is "not found".
    pub fn resolve_pool(&self, caller: &Caller, key: &str) -> Result<PoolRef<'_>, ClusterError> {
        let key = key.trim();
        if key.is_empty() || key == PUBLIC_POOL {
            return Ok(PoolRef::Public);
        }
        let not_found = || ClusterError::PoolNotFound {
            key: key.to_string(),
        };
        if let Some(pool) = self.pools.get(key) {
            return if caller.may_access(&pool.tenant) {
                Ok(PoolRef::Dedicated(pool))
            } else {
                Err(not_found())
            };
        }
        let named: Vec<&Pool> = self
            .pools
            .values()
            .filter(|p| {
                p.name == key && p.status != PoolStatus::Deleted && caller.may_access(&p.tenant)
            })
            .collect();
        match named.as_slice() {
            [] => Err(not_found()),
            [one] => Ok(PoolRef::Dedicated(one)),
            many => Err(ClusterError::AmbiguousPoolName {
                name: key.to_string(),
                pool_ids: many.iter().map(|p| p.pool_id.clone()).collect(),
            }),
        }
    }

    pub(super) fn dedicated(&self, caller: &Caller, key: &str) -> Result<Pool, ClusterError> {
        match self.resolve_pool(caller, key)? {
            PoolRef::Dedicated(p) => Ok(p.clone()),
            PoolRef::Public => Err(ClusterError::PublicPoolIsBuiltIn),
        }
    }

    /// Dedicated pools the caller may see.
    pub fn visible_pools<'a>(
        &'a self,
        caller: &'a Caller,
        include_deleted: bool,
    ) -> impl Iterator<Item = &'a Pool> + 'a {
        self.pools.values().filter(move |p| {
            caller.may_access(&p.tenant) && (include_deleted || p.status != PoolStatus::Deleted)
        })
    }

    /// May the caller see this node? Public nodes and nodes of its pools.
    pub fn node_visible(&self, caller: &Caller, node: &Node) -> bool {
        caller.admin
            || node.pool == PUBLIC_POOL
            || self
                .pools
                .get(&node.pool)
                .is_some_and(|p| p.tenant == caller.tenant)
    }

    // ---- pools: changes --------------------------------------------------

    /// R-CREATE-1..18: validates, checks quota, takes idle nodes of the spec
    /// atomically (pool row and node rows in one transaction). `seed` draws
    /// the zone for `random`.
    pub fn create_pool(
        &mut self,
        caller: &Caller,
        req: CreateRequest,
        seed: u64,
        now_ms: i64,
    ) -> Result<Pool, ClusterError> {
        let owner = caller.tenant.clone();
        if !caller.admin && !self.tenants.contains_key(&owner) {
            return Err(ClusterError::TenantNotFound { name: owner });
        }
        let v = pool::validate_create(req, &self.settings.subscription_regions)?;
        if v.no_egress && self.settings.networks.is_none() {
            return Err(PoolError::EgressWithoutNetworks.into());
        }
        if self.settings.networks.is_some()
            && let Some(pool::Network::Custom {
                vpc_id,
                subnet_id,
                security_group_ids,
            }) = &v.custom_network
        {
            self.settings
                .custom_networks
                .check(&owner, vpc_id, subnet_id, security_group_ids)
                .map_err(PoolError::UnknownNetwork)?;
        }
        if self
            .pools
            .values()
            .any(|p| p.tenant == owner && p.name == v.name && p.status != PoolStatus::Deleted)
        {
            return Err(PoolError::NameTaken(v.name).into());
        }
        let gpus_per_node = self
            .nodes
            .values()
            .find(|n| n.spec_name() == v.spec)
            .map(|n| n.inventory.gpus.len() as u32)
            .ok_or_else(|| PoolError::UnknownSpec(v.spec.clone()))?;
        tenant::check_quota(
            &owner,
            self.quota_of(&owner),
            self.quota_use(&owner),
            QuotaUse {
                nodes: v.node_count,
                gpus: v.node_count * gpus_per_node,
            },
        )?;
        let (node_ids, az) = pool::choose_nodes(
            &self.free_nodes(),
            &v.spec,
            v.node_count,
            v.pool_type,
            v.zone.as_deref(),
            seed,
        )?;
        let seq = self.next_pool_seq;
        let pool_id = format!("p-{seq:06}");
        let network = self.pool_network(&owner, v.pool_type, v.custom_network);
        let mut pool = Pool {
            pool_id: pool_id.clone(),
            seq,
            name: v.name,
            pool_type: v.pool_type,
            description: v.description,
            tenant: owner,
            spec: v.spec,
            node_ids: node_ids.clone(),
            draining: Vec::new(),
            az_requested: v.zone.clone().unwrap_or_else(|| {
                if v.pool_type == PoolType::Deploy {
                    "random".into()
                } else {
                    String::new()
                }
            }),
            az,
            network,
            no_egress: v.no_egress,
            billing_mode: v.billing_mode,
            subscription: v.subscription,
            region: v.region,
            status: PoolStatus::Creating,
            status_reason: "taking nodes".into(),
            created_at_ms: now_ms,
            deleted_at_ms: None,
            meter: node_ids
                .iter()
                .map(|n| Span {
                    unit: n.clone(),
                    from_ms: now_ms,
                    to_ms: None,
                })
                .collect(),
            modes: vec![ModeSpan {
                from_ms: now_ms,
                mode: v.billing_mode,
            }],
            term: None,
            frozen_at_ms: None,
        };
        // R-DED-4/5: billing starts now; a subscription is paid by an order.
        let order = match v.subscription {
            Some(terms) if v.billing_mode == BillingMode::Subscription => {
                Some(self.first_term(&mut pool, v.node_count, terms.months, now_ms))
            }
            _ => None,
        };
        self.move_nodes(&pool, &node_ids, &pool_id, now_ms, order)?;
        self.next_pool_seq += 1;
        tracing::info!(pool = %pool_id, tenant = %pool.tenant, nodes = ?node_ids, "pool created");
        self.pools.insert(pool_id, pool.clone());
        Ok(pool)
    }

    /// The network a new pool of `owner` gets: a deploy pool the custom one
    /// asked for, else its tenant's isolated network; a training pool none.
    fn pool_network(
        &self,
        owner: &str,
        pool_type: PoolType,
        custom: Option<Network>,
    ) -> Option<Network> {
        match (pool_type, custom) {
            (PoolType::Deploy, Some(custom)) => Some(custom),
            (PoolType::Deploy, None) => Some(Network::Isolated {
                network_id: self
                    .tenants
                    .get(owner)
                    .map_or_else(|| format!("net-{owner}"), |t| t.network_id.clone()),
            }),
            (PoolType::Train, _) => None,
        }
    }

    /// A new subscription pool's first term, from now for `months`, and the
    /// order that pays it.
    fn first_term(&self, pool: &mut Pool, nodes: u32, months: u32, now_ms: i64) -> Order {
        let end = billing::add_months(now_ms, months);
        pool.term = Some(Term {
            start_ms: now_ms,
            end_ms: end,
        });
        let billed = billing::billed_months(pool.pool_type, months);
        let price = self.price_of(&pool.spec).subscription_node_month_micros;
        self.new_order(
            OrderKind::New,
            pool,
            nodes,
            months,
            billed,
            billing::order_amount(price, nodes, billed),
            (now_ms, end),
            now_ms,
        )
    }

    /// Moves nodes into `target` and writes the pool with them, atomically.
    fn move_nodes(
        &mut self,
        pool: &Pool,
        node_ids: &[String],
        target: &str,
        now_ms: i64,
        order: Option<crate::domain::billing::Order>,
    ) -> Result<(), ClusterError> {
        let moved: Vec<Node> = node_ids
            .iter()
            .map(|id| Node {
                pool: target.to_string(),
                ..self.nodes[id].clone()
            })
            .collect();
        let mut records: Vec<Record<'_>> = moved.iter().map(Record::Node).collect();
        records.push(Record::Pool(pool));
        if let Some(order) = &order {
            records.push(Record::Order(order));
        }
        self.store.write(&records, now_ms)?;
        for node in moved {
            self.nodes.insert(node.node_id.clone(), node);
            self.placer = None;
        }
        if let Some(order) = order {
            self.orders.push(order);
        }
        Ok(())
    }

    /// R-SCALE-1/2/4: adds `count` idle nodes of the pool's spec (and zone).
    pub fn scale_out(
        &mut self,
        caller: &Caller,
        key: &str,
        count: u32,
        seed: u64,
        now_ms: i64,
    ) -> Result<Pool, ClusterError> {
        let mut pool = self.dedicated(caller, key)?;
        if count == 0 {
            return Err(PoolError::ZeroScale.into());
        }
        self.require_steady(&pool, "scaling")?;
        let gpus_per_node = pool
            .node_ids
            .first()
            .and_then(|n| self.nodes.get(n))
            .map_or(0, |n| n.inventory.gpus.len() as u32);
        tenant::check_quota(
            &pool.tenant,
            self.quota_of(&pool.tenant),
            self.quota_use(&pool.tenant),
            QuotaUse {
                nodes: count,
                gpus: count * gpus_per_node,
            },
        )?;
        let zone = (pool.pool_type == PoolType::Deploy).then_some(pool.az.as_str());
        let (added, _) = pool::choose_nodes(
            &self.free_nodes(),
            &pool.spec,
            count,
            pool.pool_type,
            zone,
            seed,
        )?;
        pool.node_ids.extend(added.iter().cloned());
        pool.meter.extend(added.iter().map(|n| Span {
            unit: n.clone(),
            from_ms: now_ms,
            to_ms: None,
        }));
        pool.status = PoolStatus::Scaling;
        pool.status_reason = format!("adding {}", added.join(", "));
        let pool_id = pool.pool_id.clone();
        // A subscription pool pays for added nodes pro rata to its term's end.
        let order = match (pool.term, pool.subscription) {
            (Some(term), Some(terms)) => {
                let billed = billing::billed_months(pool.pool_type, terms.months);
                let price = self.price_of(&pool.spec).subscription_node_month_micros;
                let full = billing::order_amount(price, count, billed);
                Some(self.new_order(
                    OrderKind::ScaleOut,
                    &pool,
                    count,
                    terms.months,
                    billed,
                    billing::pro_rata(full, term.start_ms, term.end_ms, now_ms),
                    (now_ms, term.end_ms),
                    now_ms,
                ))
            }
            _ => None,
        };
        self.move_nodes(&pool, &added, &pool_id, now_ms, order)?;
        tracing::info!(pool = %pool_id, added = ?added, "pool scaling out");
        self.pools.insert(pool_id, pool.clone());
        Ok(pool)
    }

    pub(super) fn require_steady(
        &self,
        pool: &Pool,
        what: &'static str,
    ) -> Result<(), ClusterError> {
        match pool.status {
            PoolStatus::Running | PoolStatus::Abnormal | PoolStatus::Unavailable => Ok(()),
            status => Err(PoolError::Busy {
                pool: pool.pool_id.clone(),
                status,
                what,
            }
            .into()),
        }
    }

    fn pool_nodes(&self, pool: &Pool) -> Vec<PoolNode> {
        let usage = self.usage();
        pool.node_ids
            .iter()
            .filter(|id| !pool.draining.contains(id))
            .filter_map(|id| self.nodes.get(id))
            .map(|n| {
                let u = usage.get(&n.node_id);
                let job_ids = u
                    .map(|u| {
                        u.instance_ids
                            .iter()
                            .filter_map(|i| self.instance_job.get(i).cloned())
                            .collect()
                    })
                    .unwrap_or_default();
                let free = u.map_or(n.inventory.gpus.len() as u32, |u| {
                    u.gpu_milli.iter().filter(|m| **m == 0).count() as u32
                });
                PoolNode {
                    node_id: n.node_id.clone(),
                    job_ids,
                    gpus: n.inventory.gpus.len() as u32,
                    free_whole_gpus: free,
                }
            })
            .collect()
    }

    /// R-SCALE-3: removes exactly the named nodes. Busy nodes are refused
    /// unless `force`, which stops their jobs. Nodes return to the public
    /// pool once nothing runs on them (R-SCALE-4: status Scaling till then).
    pub fn scale_in(
        &mut self,
        caller: &Caller,
        key: &str,
        remove: &[String],
        force: bool,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Pool, ClusterError> {
        let mut pool = self.dedicated(caller, key)?;
        self.require_steady(&pool, "scaling")?;
        let nodes = self.pool_nodes(&pool);
        pool::check_scale_in(&pool.pool_id, &nodes, remove, force)?;
        let mut stopped = Vec::new();
        for node in nodes.iter().filter(|n| remove.contains(&n.node_id)) {
            for job_id in &node.job_ids {
                if stopped.contains(job_id) {
                    continue;
                }
                let cause = StopCause::ScaleIn {
                    node: node.node_id.clone(),
                    pool: pool.pool_id.clone(),
                };
                let job = self.stop_job(job_id, cause, "node removed from the pool", now_ms, out);
                self.store.put_job(&job, now_ms)?;
                stopped.push(job_id.clone());
            }
        }
        for id in remove {
            if !pool.draining.contains(id) {
                pool.draining.push(id.clone());
            }
        }
        close_spans(&mut pool.meter, Some(remove), now_ms);
        pool.status = PoolStatus::Scaling;
        pool.status_reason = format!("removing {}", remove.join(", "));
        self.store.write(&[Record::Pool(&pool)], now_ms)?;
        tracing::info!(pool = %pool.pool_id, removing = ?remove, stopped_jobs = ?stopped, "pool scaling in");
        self.pools.insert(pool.pool_id.clone(), pool.clone());
        self.advance_pools(now_ms);
        Ok(self.pools[&pool.pool_id].clone())
    }

    /// The scale-in advisor (read only).
    pub fn scale_in_plan(
        &self,
        caller: &Caller,
        key: &str,
        count: u32,
    ) -> Result<Vec<ScaleInPick>, ClusterError> {
        let pool = self.dedicated(caller, key)?;
        let nodes = self.pool_nodes(&pool);
        if count as usize >= nodes.len() {
            return Err(ClusterError::ScaleInTooMany {
                pool: pool.pool_id,
                nodes: nodes.len(),
                asked: count,
            });
        }
        Ok(pool::plan_scale_in(&nodes, count))
    }

    /// R-DEL-1,2,4,5: jobs of the pool become Unavailable and their
    /// processes are stopped; nodes go back to the public pool once empty.
    pub fn delete_pool(
        &mut self,
        caller: &Caller,
        key: &str,
        confirm: bool,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Pool, ClusterError> {
        let pool = self.dedicated(caller, key)?;
        pool::check_delete(&pool.pool_id, pool.status, pool.billing_mode, confirm)?;
        self.begin_delete(pool, "pool deleted", now_ms, out, None)
    }

    /// Deletes a pool: its jobs become Unavailable (R-DEL-1) and their
    /// processes are stopped, its meter stops now (R-DEL-2), and its nodes
    /// return to the public pool once empty. `extra` (a refund) is written
    /// in the same transaction.
    pub(super) fn begin_delete(
        &mut self,
        mut pool: Pool,
        why: &str,
        now_ms: i64,
        out: &mut Outbox,
        extra: Option<crate::domain::billing::Order>,
    ) -> Result<Pool, ClusterError> {
        let job_ids: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.pool_id == pool.pool_id && !j.state.is_terminal())
            .map(|j| j.job_id.clone())
            .collect();
        let mut jobs = Vec::new();
        for job_id in &job_ids {
            let cause = StopCause::PoolDeleted {
                pool: pool.pool_id.clone(),
            };
            jobs.push(self.stop_job(job_id, cause, why, now_ms, out));
        }
        pool.status = PoolStatus::Deleting;
        pool.status_reason = "stopping jobs and releasing nodes".into();
        pool.draining = pool.node_ids.clone();
        pool.term = None;
        close_spans(&mut pool.meter, None, now_ms);
        let mut records: Vec<Record<'_>> = jobs.iter().map(Record::Job).collect();
        records.push(Record::Pool(&pool));
        if let Some(order) = &extra {
            records.push(Record::Order(order));
        }
        self.store.write(&records, now_ms)?;
        if let Some(order) = extra {
            self.orders.push(order);
        }
        tracing::info!(pool = %pool.pool_id, jobs = ?job_ids, "pool deleting");
        self.pools.insert(pool.pool_id.clone(), pool.clone());
        self.advance_pools(now_ms);
        Ok(self.pools[&pool.pool_id].clone())
    }

    /// Releases drained nodes, finishes deletions and recomputes every
    /// pool's status from node health (R-DED-3, R-CREATE-18, R-SCALE-4).
    pub(super) fn advance_pools(&mut self, now_ms: i64) {
        let usage = self.usage();
        let ids: Vec<String> = self.pools.keys().cloned().collect();
        for id in ids {
            let mut pool = self.pools[&id].clone();
            if pool.status == PoolStatus::Deleted {
                continue;
            }
            let released: Vec<String> = pool
                .draining
                .iter()
                .filter(|n| usage.get(*n).is_none_or(|u| u.instance_ids.is_empty()))
                .cloned()
                .collect();
            pool.node_ids.retain(|n| !released.contains(n));
            pool.draining.retain(|n| !released.contains(n));
            if pool.status == PoolStatus::Deleting && pool.node_ids.is_empty() {
                pool.status = PoolStatus::Deleted;
                pool.status_reason = String::new();
                pool.deleted_at_ms = Some(now_ms);
            }
            let health: Vec<NodeHealth> = pool
                .node_ids
                .iter()
                .filter(|n| !pool.draining.contains(n))
                .filter_map(|n| self.nodes.get(n))
                .map(|n| NodeHealth {
                    node_id: n.node_id.clone(),
                    ready: n.status == NodeStatus::Ready,
                    unhealthy_gpus: n
                        .inventory
                        .gpus
                        .iter()
                        .filter(|g| !g.healthy)
                        .map(|g| (g.index, g.health_reason.clone()))
                        .collect(),
                })
                .collect();
            let (status, reason) =
                pool::derive_status(pool.status, &health, !pool.draining.is_empty());
            if status != pool.status
                && !matches!(pool.status, PoolStatus::Deleting | PoolStatus::Deleted)
            {
                tracing::info!(pool = %id, from = ?pool.status, to = ?status, reason = %reason, "pool status");
                pool.status = status;
                pool.status_reason = reason;
            } else if status == pool.status
                && reason != pool.status_reason
                && !matches!(pool.status, PoolStatus::Deleting | PoolStatus::Deleted)
            {
                pool.status_reason = reason;
            }
            if pool == self.pools[&id] {
                continue;
            }
            let freed: Vec<Node> = released
                .iter()
                .filter_map(|n| self.nodes.get(n))
                .map(|n| Node {
                    pool: PUBLIC_POOL.to_string(),
                    ..n.clone()
                })
                .collect();
            let mut records: Vec<Record<'_>> = freed.iter().map(Record::Node).collect();
            records.push(Record::Pool(&pool));
            if let Err(err) = self.store.write(&records, now_ms) {
                tracing::error!(pool = %id, error = %crate::ErrorChain(&err), "cannot persist pool change; will retry");
                continue;
            }
            if !released.is_empty() {
                tracing::info!(pool = %id, released = ?released, "nodes returned to the public pool");
            }
            for node in freed {
                self.nodes.insert(node.node_id.clone(), node);
                self.placer = None;
            }
            self.pools.insert(id, pool);
        }
    }
}

/// Closes the open meter spans (of `only` nodes, or all) at `at_ms`.
pub(super) fn close_spans(
    meter: &mut [crate::domain::billing::Span],
    only: Option<&[String]>,
    at_ms: i64,
) {
    for span in meter.iter_mut().filter(|s| s.to_ms.is_none()) {
        if only.is_none_or(|nodes| nodes.contains(&span.unit)) {
            span.to_ms = Some(at_ms.max(span.from_ms));
        }
    }
}
