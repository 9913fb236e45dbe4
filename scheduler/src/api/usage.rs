//! `UsageService`: the usage ledger, orders and monthly bills.

use std::collections::BTreeMap;

use gpupool_proto::v1 as pb;
use gpupool_proto::{timestamp_from_unix_ms as ts, unix_ms_from_timestamp};
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::client::Api;
use super::status;
use crate::cluster::{Cluster, PoolRef};
use crate::domain::PUBLIC_POOL;
use crate::domain::billing::{self, LedgerRow, Order, OrderKind, hour_floor};
use crate::domain::pool::BillingMode;
use crate::domain::tenant::Caller;
use crate::now_ms;
use crate::store::LedgerQuery;

const DAY_MS: i64 = 86_400_000;

fn mode_to_pb(m: BillingMode) -> pb::BillingMode {
    match m {
        BillingMode::OnDemand => pb::BillingMode::OnDemand,
        BillingMode::Subscription => pb::BillingMode::Subscription,
    }
}

fn order_to_pb(o: &Order) -> pb::Order {
    pb::Order {
        kind: o.kind.name().into(),
        created_at: Some(ts(o.created_at_ms)),
        order_id: o.order_id.clone(),
        pool_id: o.pool_id.clone(),
        tenant: o.tenant.clone(),
        months: o.months,
        billed_months: o.billed_months,
        amount_micros: o.amount_micros,
        starts_at: Some(ts(o.starts_at_ms)),
        ends_at: Some(ts(o.ends_at_ms)),
    }
}

/// The tenant whose data a caller asks for: tenants only their own.
fn tenant_scope(caller: &Caller, asked: &str) -> Result<Option<String>, Status> {
    match (caller.admin, asked) {
        (true, "") => Ok(None),
        (true, t) => Ok(Some(t.to_string())),
        (false, "") => Ok(Some(caller.tenant.clone())),
        (false, t) if t == caller.tenant => Ok(Some(caller.tenant.clone())),
        (false, _) => Err(Status::permission_denied(
            "a tenant sees only its own usage",
        )),
    }
}

fn pool_scope(cluster: &Cluster, caller: &Caller, key: &str) -> Result<Option<String>, Status> {
    if key.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        match cluster.resolve_pool(caller, key).map_err(status)? {
            PoolRef::Public => PUBLIC_POOL.to_string(),
            PoolRef::Dedicated(p) => p.pool_id.clone(),
        },
    ))
}

/// The ledger rows one page of a usage query reads.
fn ledger_query(
    tenant: &Option<String>,
    pool: &Option<String>,
    job: &str,
    from: i64,
    to: i64,
    after: Option<(i64, String, String)>,
    limit: usize,
) -> LedgerQuery {
    LedgerQuery {
        from_ms: hour_floor(from),
        to_ms: to,
        tenant: tenant.clone(),
        pool: pool.clone(),
        job: (!job.is_empty()).then(|| job.to_string()),
        after,
        limit,
    }
}

/// The token of the page after `row`: its hour, mode and subject.
fn usage_token(row: &LedgerRow) -> String {
    let (hour, subject, mode) = LedgerQuery::key(row);
    format!("{hour}/{mode}/{subject}")
}

fn parse_usage_token(token: &str) -> Result<Option<(i64, String, String)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token is not one this scheduler gave out");
    let mut parts = token.splitn(3, '/');
    let hour = parts.next().and_then(|h| h.parse().ok()).ok_or_else(bad)?;
    let mode = parts.next().ok_or_else(bad)?.to_string();
    let subject = parts.next().ok_or_else(bad)?.to_string();
    Ok(Some((hour, subject, mode)))
}

/// Period start and label of a time for a rollup.
fn period(ms: i64, by: pb::Rollup) -> (i64, String) {
    match by {
        pb::Rollup::Day => {
            let start = ms.div_euclid(DAY_MS) * DAY_MS;
            let (y, m, d) = billing::civil_from_days(start / DAY_MS);
            (start, format!("{y:04}-{m:02}-{d:02}"))
        }
        pb::Rollup::Month => {
            let label = billing::month_of(ms);
            (billing::month_start(&label).unwrap_or(ms), label)
        }
        _ => {
            let start = billing::hour_floor(ms);
            let (y, m, d) = billing::civil_from_days(start.div_euclid(DAY_MS));
            let h = start.rem_euclid(DAY_MS) / billing::HOUR_MS;
            (start, format!("{y:04}-{m:02}-{d:02}T{h:02}:00Z"))
        }
    }
}

fn row_to_pb(r: &LedgerRow, period_label: String) -> pb::UsageRecord {
    pb::UsageRecord {
        record_id: 0,
        tenant: r.tenant.clone(),
        pool_id: r.pool_id.clone(),
        job_id: r.job_id.clone(),
        instance_id: r.instance_id.clone(),
        spec: r.spec.clone(),
        hour_start: Some(ts(r.hour_start_ms)),
        seconds: r.seconds().clamp(0, i64::from(u32::MAX)) as u32,
        quantity: r.quantity,
        unit_price_micros: r.unit_price_micros,
        amount_micros: r.amount_micros,
        billing_mode: mode_to_pb(r.mode) as i32,
        entry_kind: "usage".into(),
        unit_ms: r.unit_ms,
        period: period_label,
        gpu_allocated_ms: r.gpu_allocated_ms,
        gpu_used_ms: r.gpu_used_ms,
        preemptible: r.preemptible,
    }
}

/// Sums rows per (period, subject, mode).
fn roll_up(rows: Vec<LedgerRow>, by: pb::Rollup) -> Vec<pb::UsageRecord> {
    let mut groups: BTreeMap<(i64, String, String), (LedgerRow, String)> = BTreeMap::new();
    for r in rows {
        let (start, label) = period(r.hour_start_ms, by);
        let key = (start, r.subject.clone(), r.mode.as_db_str().to_string());
        match groups.get_mut(&key) {
            Some((acc, _)) => {
                acc.unit_ms += r.unit_ms;
                acc.amount_micros += r.amount_micros;
                acc.gpu_allocated_ms += r.gpu_allocated_ms;
                acc.gpu_used_ms += r.gpu_used_ms;
                acc.quantity = acc.quantity.max(r.quantity);
            }
            None => {
                let mut first = r;
                first.hour_start_ms = start;
                groups.insert(key, (first, label));
            }
        }
    }
    groups
        .into_values()
        .map(|(r, label)| row_to_pb(&r, label))
        .collect()
}

#[tonic::async_trait]
impl pb::usage_service_server::UsageService for Api {
    async fn list_usage(
        &self,
        req: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let tenant = tenant_scope(&caller, &req.tenant)?;
        let by = pb::Rollup::try_from(req.by).unwrap_or(pb::Rollup::Hour);
        let now = now_ms();
        let to = req.to.as_ref().map_or(now, unix_ms_from_timestamp).min(now);
        let from = req.from.as_ref().map_or_else(
            || billing::month_start(&billing::month_of(now)).unwrap_or(0),
            unix_ms_from_timestamp,
        );
        if from > to {
            return Err(Status::invalid_argument("`from` is after `to`"));
        }
        let limit = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        let after = parse_usage_token(&req.page_token)?;
        // The closed hours come from the ledger a page at a time, read
        // without the cluster lock where the store has a second handle.
        let (pool, closed) = self.shared.with(|core, _| {
            let c = &core.cluster;
            Ok::<_, Status>((pool_scope(c, &caller, &req.pool)?, c.ledger_closed_until()))
        })?;
        // The hours memory calls closed are in the store once their commit
        // is: wait for it, or they would be in neither part of the answer.
        self.shared
            .barrier()
            .await
            .map_err(|e| status(crate::cluster::ClusterError::Store(e)))?;
        let query = ledger_query(&tenant, &pool, &req.job, from, to.min(closed), after, limit);
        let mut rows = self.shared.read_ledger(&query).map_err(status)?;
        if rows.len() == limit {
            // A full page of closed hours: the rest, open hours and orders
            // come with later pages.
            let next = rows.last().map(usage_token).unwrap_or_default();
            let records = roll_up(rows, by);
            let total_micros = records.iter().map(|r| r.amount_micros).sum();
            return Ok(Response::new(pb::ListUsageResponse {
                records,
                total_micros,
                next_page_token: next,
            }));
        }
        let keep = |t: &str, p: &str| {
            tenant.as_deref().is_none_or(|x| x == t) && pool.as_deref().is_none_or(|x| x == p)
        };
        let orders = self.shared.with(|core, _| {
            let c = &core.cluster;
            if to > closed {
                rows.extend(
                    c.live_usage(hour_floor(from).max(closed), to)
                        .into_iter()
                        .filter(|r| {
                            keep(&r.tenant, &r.pool_id)
                                && (req.job.is_empty() || r.job_id == req.job)
                        }),
                );
            }
            if req.job.is_empty() {
                c.orders(&caller)
                    .filter(|o| {
                        keep(&o.tenant, &o.pool_id)
                            && o.created_at_ms >= from
                            && o.created_at_ms < to.max(from + 1)
                    })
                    .cloned()
                    .collect::<Vec<Order>>()
            } else {
                Vec::new()
            }
        });
        let mut records = roll_up(rows, by);
        for o in &orders {
            records.push(pb::UsageRecord {
                tenant: o.tenant.clone(),
                pool_id: o.pool_id.clone(),
                hour_start: Some(ts(o.created_at_ms)),
                quantity: o.nodes,
                amount_micros: o.amount_micros,
                billing_mode: pb::BillingMode::Subscription as i32,
                entry_kind: if o.kind == OrderKind::Refund {
                    "refund"
                } else {
                    "order"
                }
                .into(),
                period: period(o.created_at_ms, by).1,
                ..Default::default()
            });
        }
        for (i, r) in records.iter_mut().enumerate() {
            r.record_id = i as u64 + 1;
        }
        let total_micros = records.iter().map(|r| r.amount_micros).sum();
        Ok(Response::new(pb::ListUsageResponse {
            records,
            total_micros,
            next_page_token: String::new(),
        }))
    }

    async fn list_orders(
        &self,
        req: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let tenant = tenant_scope(&caller, &req.tenant)?;
        let size = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        let (orders, next_page_token) = self.shared.with(|core, _| {
            let c = &core.cluster;
            let pool = pool_scope(c, &caller, &req.pool)?;
            // Orders are kept in creation order; their seq is the key.
            let (page, next) = super::take_page(
                c.orders(&caller)
                    .filter(|o| {
                        tenant.as_deref().is_none_or(|t| t == o.tenant)
                            && pool.as_deref().is_none_or(|p| p == o.pool_id)
                    })
                    .map(|o| (format!("{:020}", o.seq), o)),
                &req.page_token,
                size,
            );
            Ok::<_, Status>((page.into_iter().map(order_to_pb).collect(), next))
        })?;
        Ok(Response::new(pb::ListOrdersResponse {
            orders,
            next_page_token,
        }))
    }

    async fn get_bill(
        &self,
        req: Request<pb::GetBillRequest>,
    ) -> Result<Response<pb::Bill>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let tenant = tenant_scope(&caller, &req.tenant)?.unwrap_or_else(|| caller.tenant.clone());
        let now = now_ms();
        let month = if req.month.is_empty() {
            billing::month_of(now)
        } else {
            req.month.clone()
        };
        let start = billing::month_start(&month)
            .ok_or_else(|| Status::invalid_argument(format!("month {month:?} is not YYYY-MM")))?;
        let end = billing::add_months(start, 1).min(now);
        let (mut rows, orders, currency, closed) = self.shared.with(|core, _| {
            let c = &core.cluster;
            let closed = c.ledger_closed_until();
            // The open hours from memory; the closed ones below, from the
            // ledger without the cluster lock.
            let rows = if end > closed {
                c.live_usage(start.max(closed), end)
            } else {
                Vec::new()
            };
            let orders: Vec<Order> = c
                .orders(&caller)
                .filter(|o| {
                    o.tenant == tenant
                        && o.created_at_ms >= start
                        && o.created_at_ms < billing::add_months(start, 1)
                })
                .cloned()
                .collect();
            Ok::<_, Status>((rows, orders, c.currency().to_string(), closed))
        })?;
        // As in ListUsage: the hours closed in memory reach the store first.
        self.shared
            .barrier()
            .await
            .map_err(|e| status(crate::cluster::ClusterError::Store(e)))?;
        if start < end.min(closed) {
            let query = ledger_query(
                &Some(tenant.clone()),
                &None,
                "",
                start,
                end.min(closed),
                None,
                0,
            );
            let mut closed_rows = self.shared.read_ledger_all(&query).map_err(status)?;
            closed_rows.append(&mut rows);
            rows = closed_rows;
        }
        let mut lines: BTreeMap<(String, String, String, i32), (i64, i64, bool)> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.tenant == tenant) {
            let e = lines
                .entry((
                    r.pool_id.clone(),
                    r.job_id.clone(),
                    r.spec.clone(),
                    mode_to_pb(r.mode) as i32,
                ))
                .or_default();
            e.0 += r.unit_ms;
            e.1 += r.amount_micros;
            e.2 |= r.preemptible;
        }
        let usage: Vec<pb::BillLine> = lines
            .into_iter()
            .map(
                |((pool_id, job_id, spec, mode), (unit_ms, amount, preemptible))| pb::BillLine {
                    pool_id,
                    job_id,
                    spec,
                    billing_mode: mode,
                    seconds: billing::round_div(i128::from(unit_ms), 1000),
                    amount_micros: amount,
                    preemptible,
                },
            )
            .collect();
        let usage_micros: i64 = usage.iter().map(|l| l.amount_micros).sum();
        let orders_micros: i64 = orders
            .iter()
            .filter(|o| o.amount_micros > 0)
            .map(|o| o.amount_micros)
            .sum();
        let refunds_micros: i64 = orders
            .iter()
            .filter(|o| o.amount_micros < 0)
            .map(|o| o.amount_micros)
            .sum();
        Ok(Response::new(pb::Bill {
            tenant,
            month,
            currency,
            usage,
            orders: orders.iter().map(order_to_pb).collect(),
            usage_micros,
            orders_micros,
            refunds_micros,
            total_micros: usage_micros + orders_micros + refunds_micros,
        }))
    }
}

fn audit_to_pb(e: &crate::domain::audit::AuditEntry) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: e.seq,
        at: Some(ts(e.at_ms)),
        role: e.role.clone(),
        who: e.who.clone(),
        tenant: e.tenant.clone(),
        peer: e.peer.clone(),
        method: e.method.clone(),
        targets: e.targets.clone().into_iter().collect(),
        args: e.args.clone().into_iter().collect(),
        code: e.code.clone(),
        message: e.message.clone(),
    }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for Api {
    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let caller = caller(&self.shared, req.metadata())?;
        let req = req.into_inner();
        let tenant = match (caller.admin, req.tenant.as_str()) {
            (true, "") => None,
            (true, t) => Some(t.to_string()),
            (false, t) if t.is_empty() || t == caller.tenant => Some(caller.tenant.clone()),
            (false, _) => {
                return Err(Status::permission_denied(
                    "a tenant sees only its own audit records",
                ));
            }
        };
        let pool = self
            .shared
            .with(|core, _| pool_scope(&core.cluster, &caller, &req.pool_id))?;
        let after_seq = match req.page_token.as_str() {
            "" => 0,
            t => t
                .parse()
                .map_err(|_| Status::invalid_argument(format!("bad page token {t:?}")))?,
        };
        let size = super::page_size(req.page_size, self.shared.config.limits.max_page_size);
        let q = crate::domain::audit::AuditQuery {
            tenant,
            pool,
            job: Some(req.job_id).filter(|j| !j.is_empty()),
            node: Some(req.node_id).filter(|n| !n.is_empty()),
            from_ms: req.from.as_ref().map_or(i64::MIN, unix_ms_from_timestamp),
            to_ms: req.to.as_ref().map_or(i64::MAX, unix_ms_from_timestamp),
            after_seq,
            limit: size + 1,
        };
        let mut records = self.shared.read_audit(&q).map_err(status)?;
        let next_page_token = if records.len() > size {
            records.truncate(size);
            records
                .last()
                .map(|r| r.seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAuditResponse {
            records: records.iter().map(audit_to_pb).collect(),
            next_page_token,
        }))
    }
}
