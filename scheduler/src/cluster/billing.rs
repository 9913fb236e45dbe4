//! Metering and billing on top of the cluster state: the pure arithmetic of
//! `domain::billing` applied to committed pool and job timelines.
//!
//! The ledger is derived, never accumulated: a pool's meter spans and mode
//! changes, and a public instance's start and finish times, are committed
//! with the transitions that cause them. Closing an hour computes its rows
//! from that timeline and inserts them keyed by (subject, hour, mode), so a
//! scheduler killed at any moment and restarted neither loses nor counts a
//! second twice: the same timeline gives the same rows.

use super::{Cluster, ClusterError, Outbox};
use crate::domain::billing::{
    self, ExpiryAction, LedgerRow, ModeSpan, Order, OrderKind, Span, SpecPrice, Term, hour_floor,
};
use crate::domain::job::PriorityClass;
use crate::domain::pool::{BillingMode, Pool, PoolError, PoolStatus, PoolType, SubscriptionTerms};
use crate::domain::tenant::Caller;
use crate::domain::{PUBLIC_POOL, StopCause};
use crate::store::Record;
use crate::store::Store as _;

/// Where every public instance is billed from (no mode changes).
const ALWAYS_ON_DEMAND: [ModeSpan; 1] = [ModeSpan {
    from_ms: i64::MIN,
    mode: BillingMode::OnDemand,
}];

impl Cluster {
    /// The price catalog entry of a spec (the default for unlisted specs).
    pub fn price_of(&self, spec: &str) -> SpecPrice {
        self.settings
            .prices
            .get(spec)
            .copied()
            .unwrap_or(self.settings.default_price)
    }

    pub fn currency(&self) -> &str {
        &self.settings.currency
    }

    /// A new order (not yet stored).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new_order(
        &self,
        kind: OrderKind,
        pool: &Pool,
        nodes: u32,
        months: u32,
        billed_months: u32,
        amount_micros: i64,
        (starts_at_ms, ends_at_ms): (i64, i64),
        now_ms: i64,
    ) -> Order {
        let seq = self.orders.iter().map(|o| o.seq).max().unwrap_or(0) + 1;
        Order {
            order_id: format!("o-{seq:06}"),
            seq,
            kind,
            pool_id: pool.pool_id.clone(),
            tenant: pool.tenant.clone(),
            nodes,
            months,
            billed_months,
            amount_micros,
            starts_at_ms,
            ends_at_ms,
            created_at_ms: now_ms,
        }
    }

    /// Orders the caller may see.
    pub fn orders<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Order> + 'a {
        self.orders
            .iter()
            .filter(move |o| caller.may_access(&o.tenant))
    }

    /// Hourly rows over `[from_ms, to_ms)` computed from the timeline.
    pub fn live_usage(&self, from_ms: i64, to_ms: i64) -> Vec<LedgerRow> {
        let mut rows = Vec::new();
        // Used GPU-ms of dedicated pools, by (pool, hour).
        let mut pool_used: std::collections::HashMap<(&str, i64), i64> =
            std::collections::HashMap::new();
        for job in self.jobs.values().filter(|j| j.pool_id != PUBLIC_POOL) {
            for inst in &job.instances {
                for (hour, used) in inst.gpu_used_ms_by_hour.range(hour_floor(from_ms)..to_ms) {
                    *pool_used.entry((job.pool_id.as_str(), *hour)).or_insert(0) += used;
                }
            }
        }
        for pool in self.pools.values() {
            if pool
                .meter
                .iter()
                .all(|s| s.to_ms.is_some_and(|t| t <= from_ms))
            {
                continue;
            }
            let price = self.price_of(&pool.spec).on_demand_node_hour_micros;
            let gpus_per_node = pool
                .meter
                .iter()
                .find_map(|s| self.nodes.get(&s.unit))
                .map_or(0, |n| n.inventory.gpus.len() as i64);
            let records = billing::meter(&pool.meter, &pool.modes, price, from_ms, to_ms);
            for r in &records {
                // Split an hour's use across its mode rows by metered time.
                let hour_ms: i64 = records
                    .iter()
                    .filter(|x| x.hour_start_ms == r.hour_start_ms)
                    .map(|x| x.unit_ms)
                    .sum();
                let used = pool_used
                    .get(&(pool.pool_id.as_str(), r.hour_start_ms))
                    .copied()
                    .unwrap_or(0);
                rows.push(LedgerRow {
                    gpu_allocated_ms: r.unit_ms * gpus_per_node,
                    gpu_used_ms: billing::round_div(
                        i128::from(used) * i128::from(r.unit_ms),
                        i128::from(hour_ms.max(1)),
                    ),
                    subject: format!("pool:{}", pool.pool_id),
                    tenant: pool.tenant.clone(),
                    pool_id: pool.pool_id.clone(),
                    job_id: String::new(),
                    instance_id: String::new(),
                    spec: pool.spec.clone(),
                    hour_start_ms: r.hour_start_ms,
                    mode: r.mode,
                    unit_ms: r.unit_ms,
                    quantity: r.quantity,
                    unit_price_micros: r.unit_price_micros,
                    amount_micros: r.amount_micros,
                    preemptible: false,
                });
            }
        }
        // R-POOL-1: public use is spec x duration x instances, any job kind.
        for job in self.jobs.values().filter(|j| j.pool_id == PUBLIC_POOL) {
            for inst in &job.instances {
                let Some(start) = inst.started_at_ms else {
                    continue;
                };
                if inst.finished_at_ms.is_some_and(|f| f <= from_ms) || start >= to_ms {
                    continue;
                }
                let spec = self
                    .nodes
                    .get(&inst.node_id)
                    .map(|n| n.spec_name())
                    .unwrap_or_default();
                let preemptible = job.spec.priority_class == PriorityClass::Preemptible;
                let price = self.price_of(&spec).public_hour_micros(preemptible);
                let res = &job.spec.resources;
                let share_milli = i64::from(res.gpus) * 1000 + i64::from(res.gpu_milli);
                let span = Span {
                    unit: inst.instance_id.clone(),
                    from_ms: start,
                    to_ms: inst.finished_at_ms,
                };
                for r in billing::meter(&[span], &ALWAYS_ON_DEMAND, price, from_ms, to_ms) {
                    rows.push(LedgerRow {
                        gpu_allocated_ms: r.unit_ms * share_milli / 1000,
                        gpu_used_ms: inst
                            .gpu_used_ms_by_hour
                            .get(&r.hour_start_ms)
                            .copied()
                            .unwrap_or(0),
                        subject: format!("instance:{}", inst.instance_id),
                        tenant: job.tenant.clone(),
                        pool_id: PUBLIC_POOL.to_string(),
                        job_id: job.job_id.clone(),
                        instance_id: inst.instance_id.clone(),
                        spec: spec.clone(),
                        hour_start_ms: r.hour_start_ms,
                        mode: r.mode,
                        unit_ms: r.unit_ms,
                        quantity: r.quantity,
                        unit_price_micros: r.unit_price_micros,
                        amount_micros: r.amount_micros,
                        preemptible,
                    });
                }
            }
        }
        rows.sort_by(|a, b| (a.hour_start_ms, &a.subject).cmp(&(b.hour_start_ms, &b.subject)));
        rows
    }

    /// Hours before this are in the ledger.
    pub fn ledger_closed_until(&self) -> i64 {
        self.ledger_closed_until_ms
    }

    /// One page of closed ledger rows, read through the cluster's store.
    pub fn ledger_page(
        &self,
        q: &crate::store::LedgerQuery,
    ) -> Result<Vec<LedgerRow>, ClusterError> {
        Ok(self.store.ledger_page(q)?)
    }

    /// A second handle on the store for reading the ledger, if it has one.
    pub fn store_reader(&self) -> Option<Box<dyn crate::store::Store>> {
        self.store.reader()
    }

    /// Rows for hours in `[from_ms, to_ms)`: closed hours from the ledger,
    /// the rest (the current hour) computed live.
    pub fn usage_rows(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, ClusterError> {
        let from = hour_floor(from_ms);
        let closed = self.ledger_closed_until_ms;
        let mut rows = if from < closed {
            self.store.ledger(from, to_ms.min(closed))?
        } else {
            Vec::new()
        };
        if to_ms > closed {
            rows.extend(self.live_usage(from.max(closed), to_ms));
        }
        Ok(rows)
    }

    /// Writes every hour that ended before `now_ms` into the ledger, once.
    /// Returns the rows written (for the billing counters).
    pub fn close_hours(&mut self, now_ms: i64) -> Vec<LedgerRow> {
        let upto = hour_floor(now_ms);
        if upto <= self.ledger_closed_until_ms {
            return Vec::new();
        }
        let rows = self.live_usage(self.ledger_closed_until_ms, upto);
        let mut records: Vec<Record<'_>> = rows.iter().map(Record::Ledger).collect();
        records.push(Record::LedgerClosed(upto));
        if let Err(err) = self.store.write(&records, now_ms) {
            tracing::error!(error = %crate::ErrorChain(&err), "cannot close ledger hours; will retry");
            return Vec::new();
        }
        tracing::debug!(until = upto, rows = rows.len(), "ledger hours closed");
        self.ledger_closed_until_ms = upto;
        rows
    }

    /// R-BILL-1: an on-demand train pool becomes a subscription pool, if it
    /// has at least one consumption record.
    pub fn convert_to_subscription(
        &mut self,
        caller: &Caller,
        key: &str,
        months: u32,
        auto_renew: bool,
        now_ms: i64,
    ) -> Result<Pool, ClusterError> {
        let mut pool = self.dedicated(caller, key)?;
        if pool.pool_type != PoolType::Train {
            return Err(ClusterError::DeployPoolConversion { pool: pool.pool_id });
        }
        if pool.billing_mode != BillingMode::OnDemand {
            return Err(ClusterError::AlreadySubscription { pool: pool.pool_id });
        }
        self.require_steady(&pool, "converting it")?;
        if !(1..=12).contains(&months) {
            return Err(PoolError::TrainMonths(months).into());
        }
        let price = self.price_of(&pool.spec).on_demand_node_hour_micros;
        let consumed = billing::meter(&pool.meter, &pool.modes, price, pool.created_at_ms, now_ms);
        if !billing::has_consumption(&consumed) {
            return Err(ClusterError::NoConsumptionRecord { pool: pool.pool_id });
        }
        let end = billing::add_months(now_ms, months);
        let billed = billing::billed_months(PoolType::Train, months);
        let nodes = pool.target_node_count() as u32;
        let sub_price = self.price_of(&pool.spec).subscription_node_month_micros;
        let order = self.new_order(
            OrderKind::Conversion,
            &pool,
            nodes,
            months,
            billed,
            billing::order_amount(sub_price, nodes, billed),
            (now_ms, end),
            now_ms,
        );
        pool.billing_mode = BillingMode::Subscription;
        pool.subscription = Some(SubscriptionTerms {
            months,
            auto_renew,
            convert_to_on_demand_at_expiry: false,
        });
        pool.term = Some(Term {
            start_ms: now_ms,
            end_ms: end,
        });
        pool.modes.push(ModeSpan {
            from_ms: now_ms,
            mode: BillingMode::Subscription,
        });
        self.store
            .write(&[Record::Pool(&pool), Record::Order(&order)], now_ms)?;
        tracing::info!(pool = %pool.pool_id, order = %order.order_id, months, "pool converted to a subscription");
        self.orders.push(order);
        self.pools.insert(pool.pool_id.clone(), pool.clone());
        Ok(pool)
    }

    /// Renewal management: auto-renew (R-CREATE-9) and convert to on-demand
    /// at expiry (R-BILL-2, train pools).
    pub fn set_renewal(
        &mut self,
        caller: &Caller,
        key: &str,
        auto_renew: bool,
        convert_at_expiry: bool,
        now_ms: i64,
    ) -> Result<Pool, ClusterError> {
        let mut pool = self.dedicated(caller, key)?;
        let Some(terms) = pool
            .subscription
            .as_mut()
            .filter(|_| pool.billing_mode == BillingMode::Subscription)
        else {
            return Err(ClusterError::NotSubscription { pool: pool.pool_id });
        };
        if convert_at_expiry && pool.pool_type != PoolType::Train {
            return Err(ClusterError::DeployPoolConversionAtExpiry {
                pool: pool.pool_id.clone(),
            });
        }
        terms.auto_renew = auto_renew;
        terms.convert_to_on_demand_at_expiry = convert_at_expiry;
        self.store.write(&[Record::Pool(&pool)], now_ms)?;
        self.pools.insert(pool.pool_id.clone(), pool.clone());
        Ok(pool)
    }

    /// R-DEL-3: refunds the unused part of the paid term pro rata by
    /// remaining milliseconds (a 12-for-10 order is spread evenly over its
    /// 12 months), records the refund as a negative order, then deletes the
    /// pool with the effects of R-DEL-1.
    pub fn unsubscribe(
        &mut self,
        caller: &Caller,
        key: &str,
        confirm: bool,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<(Pool, i64), ClusterError> {
        let pool = self.dedicated(caller, key)?;
        if pool.billing_mode != BillingMode::Subscription {
            return Err(ClusterError::UnsubscribeOnDemand { pool: pool.pool_id });
        }
        if !confirm {
            return Err(PoolError::NotConfirmed(pool.pool_id.clone()).into());
        }
        if matches!(pool.status, PoolStatus::Deleting | PoolStatus::Deleted) {
            return Err(PoolError::Busy {
                pool: pool.pool_id.clone(),
                status: pool.status,
                what: "unsubscribing",
            }
            .into());
        }
        let refund: i64 = self
            .orders
            .iter()
            .filter(|o| {
                o.pool_id == pool.pool_id && o.kind != OrderKind::Refund && o.ends_at_ms > now_ms
            })
            .map(|o| billing::pro_rata(o.amount_micros, o.starts_at_ms, o.ends_at_ms, now_ms))
            .sum();
        let end = pool.term.map_or(now_ms, |t| t.end_ms);
        let order = self.new_order(
            OrderKind::Refund,
            &pool,
            0,
            0,
            0,
            -refund,
            (now_ms, end),
            now_ms,
        );
        tracing::info!(pool = %pool.pool_id, refund_micros = refund, "unsubscribing");
        let pool = self.begin_delete(pool, "pool unsubscribed", now_ms, out, Some(order))?;
        Ok((pool, refund))
    }

    /// Subscription terms that ended: renew (R-CREATE-9), convert to
    /// on-demand (R-BILL-2), or freeze; frozen pools past the retention are
    /// released.
    pub(super) fn advance_subscriptions(&mut self, now_ms: i64, out: &mut Outbox) {
        let due: Vec<String> = self
            .pools
            .values()
            .filter(|p| {
                (p.term.is_some_and(|t| t.end_ms <= now_ms)
                    && !matches!(p.status, PoolStatus::Deleting | PoolStatus::Deleted))
                    || (p.status == PoolStatus::Frozen
                        && p.frozen_at_ms
                            .is_some_and(|f| f + self.settings.frozen_retention_ms <= now_ms))
            })
            .map(|p| p.pool_id.clone())
            .collect();
        for id in due {
            let mut pool = self.pools[&id].clone();
            if pool.status == PoolStatus::Frozen {
                tracing::info!(pool = %id, "frozen pool past its retention; releasing it");
                if let Err(err) = self.begin_delete(pool, "frozen pool released", now_ms, out, None)
                {
                    tracing::error!(pool = %id, error = %crate::ErrorChain(&err), "cannot release frozen pool");
                }
                continue;
            }
            let (Some(mut term), Some(terms)) = (pool.term, pool.subscription) else {
                continue;
            };
            let mut orders = Vec::new();
            let mut stop_jobs = false;
            while term.end_ms <= now_ms {
                match billing::at_expiry(&terms) {
                    ExpiryAction::Renew => {
                        let end = billing::add_months(term.end_ms, terms.months);
                        let billed = billing::billed_months(pool.pool_type, terms.months);
                        let nodes = pool.target_node_count() as u32;
                        let price = self.price_of(&pool.spec).subscription_node_month_micros;
                        let mut order = self.new_order(
                            OrderKind::Renewal,
                            &pool,
                            nodes,
                            terms.months,
                            billed,
                            billing::order_amount(price, nodes, billed),
                            (term.end_ms, end),
                            now_ms,
                        );
                        order.seq += orders.len() as u64;
                        order.order_id = format!("o-{:06}", order.seq);
                        orders.push(order);
                        term = Term {
                            start_ms: term.end_ms,
                            end_ms: end,
                        };
                        pool.term = Some(term);
                    }
                    ExpiryAction::ConvertToOnDemand => {
                        pool.modes.push(ModeSpan {
                            from_ms: term.end_ms,
                            mode: BillingMode::OnDemand,
                        });
                        pool.billing_mode = BillingMode::OnDemand;
                        pool.subscription = None;
                        pool.term = None;
                        break;
                    }
                    ExpiryAction::Freeze => {
                        super::pools::close_spans(&mut pool.meter, None, term.end_ms);
                        pool.status = PoolStatus::Frozen;
                        pool.status_reason =
                            "subscription expired (no auto-renew, no convert-at-expiry)".into();
                        pool.frozen_at_ms = Some(term.end_ms);
                        pool.term = None;
                        stop_jobs = true;
                        break;
                    }
                }
            }
            let mut jobs = Vec::new();
            if stop_jobs {
                let ids: Vec<String> = self
                    .jobs
                    .values()
                    .filter(|j| j.pool_id == id && !j.state.is_terminal())
                    .map(|j| j.job_id.clone())
                    .collect();
                for job_id in ids {
                    let cause = StopCause::PoolFrozen { pool: id.clone() };
                    jobs.push(self.stop_job(&job_id, cause, "pool frozen", now_ms, out));
                }
            }
            let mut records: Vec<Record<'_>> = vec![Record::Pool(&pool)];
            records.extend(orders.iter().map(Record::Order));
            records.extend(jobs.iter().map(Record::Job));
            if let Err(err) = self.store.write(&records, now_ms) {
                tracing::error!(pool = %id, error = %crate::ErrorChain(&err), "cannot persist subscription change; will retry");
                continue;
            }
            tracing::info!(pool = %id, status = ?pool.status, mode = ?pool.billing_mode, renewals = orders.len(), "subscription term ended");
            self.orders.extend(orders);
            self.pools.insert(id, pool);
        }
    }
}
