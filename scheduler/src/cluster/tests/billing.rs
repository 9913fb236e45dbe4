//! Billing over real cluster timelines (with the SQLite store): the
//! subscription lifecycle, and a randomized comparison of the ledger with an
//! independent integration of the allocation timeline.

use std::collections::BTreeMap;

use super::*;
use crate::domain::billing::{HOUR_MS, OrderKind, add_months, hour_floor};
use crate::domain::pool::{BillingMode, CreateRequest, PoolStatus, PoolType, SubscriptionTerms};
use crate::domain::tenant::Quota;

/// 2026-11-27T10:00:00Z
const T0: i64 = 1_795_773_600_000;
const NODE_HOUR: i64 = 3_600_000; // settings(): on-demand price per node-hour
const NODE_MONTH: i64 = 1_000_000_000; // subscription price per node-month
const INSTANCE_HOUR: i64 = 360_000; // public price per instance-hour
const PREEMPTIBLE_HOUR: i64 = 120_000; // a preemptible job's instance-hour

fn cluster_with_nodes(dir: &std::path::Path, n: usize, now: i64) -> Cluster {
    let mut c = open(dir, now);
    for i in 0..n {
        let inv = Inventory {
            az: "AZ1".into(),
            ..inventory(2)
        };
        c.register_node(&format!("n{i}"), inv, now).unwrap();
    }
    c.create_tenant(
        &admin(),
        "t",
        Quota {
            max_dedicated_nodes: 100,
            max_gpus: 1000,
            ..Default::default()
        },
        now,
    )
    .unwrap();
    c
}

fn keep_alive(c: &mut Cluster, now: i64, out: &mut Outbox) {
    let ids: Vec<String> = c.nodes().map(|n| n.node_id.clone()).collect();
    for id in ids {
        c.heartbeat(&id, None, vec![], now, out);
    }
}

fn spec(c: &Cluster) -> String {
    c.nodes().next().unwrap().spec_name()
}

fn train(c: &Cluster, name: &str, nodes: u32, sub: Option<SubscriptionTerms>) -> CreateRequest {
    CreateRequest {
        pool_type: Some(PoolType::Train),
        name: name.into(),
        spec: spec(c),
        node_count: nodes,
        billing_mode: Some(if sub.is_some() {
            BillingMode::Subscription
        } else {
            BillingMode::OnDemand
        }),
        subscription: sub,
        ..Default::default()
    }
}

fn tenant() -> Caller {
    Caller::tenant("t")
}

fn terms(months: u32, auto_renew: bool, convert: bool) -> Option<SubscriptionTerms> {
    Some(SubscriptionTerms {
        months,
        auto_renew,
        convert_to_on_demand_at_expiry: convert,
    })
}

#[test]
fn r_create_8_a_year_subscription_orders_ten_months() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 2, T0);
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 2, terms(12, false, false)), 0, T0)
        .unwrap();
    let orders: Vec<_> = c.orders(&admin()).cloned().collect();
    assert_eq!(orders.len(), 1);
    assert_eq!(
        (orders[0].kind, orders[0].billed_months),
        (OrderKind::New, 10)
    );
    assert_eq!(orders[0].amount_micros, 2 * 10 * NODE_MONTH);
    assert_eq!(pool.term.unwrap().end_ms, add_months(T0, 12));
    // Covered time is recorded at zero.
    let rows = c.live_usage(T0, T0 + HOUR_MS);
    assert_eq!((rows[0].amount_micros, rows[0].unit_ms), (0, 2 * HOUR_MS));
}

#[test]
fn r_create_11_deploy_subscriptions_only_in_configured_regions() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut req = train(&c, "x", 1, terms(3, false, false));
    req.pool_type = Some(PoolType::Deploy);
    req.name = "serve".into();
    req.region = "elsewhere".into();
    let err = c.create_pool(&tenant(), req.clone(), 0, T0).unwrap_err();
    assert!(err.to_string().contains("R-CREATE-11"), "{err}");
    req.region = "region-1".into();
    c.create_pool(&tenant(), req, 0, T0).unwrap();
    assert!(c.orders(&admin()).all(|o| o.billed_months == 3));
}

#[test]
fn r_create_9_auto_renew_orders_the_next_term_at_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut out = Outbox::new();
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 1, terms(1, true, false)), 0, T0)
        .unwrap();
    let end = add_months(T0, 1);
    keep_alive(&mut c, end - 1, &mut out);
    c.tick(end - 1, &mut out);
    assert_eq!(c.orders(&admin()).count(), 1);
    // Down for three months: every missed term is renewed, back to back.
    let later = add_months(T0, 3) + 5;
    keep_alive(&mut c, later, &mut out);
    c.tick(later, &mut out);
    let orders: Vec<_> = c.orders(&admin()).cloned().collect();
    assert_eq!(
        orders.iter().map(|o| o.kind).collect::<Vec<_>>(),
        [
            OrderKind::New,
            OrderKind::Renewal,
            OrderKind::Renewal,
            OrderKind::Renewal
        ]
    );
    assert_eq!(orders[1].starts_at_ms, end);
    assert_eq!(orders[3].ends_at_ms, add_months(T0, 4));
    let p = c.dedicated(&admin(), &pool.pool_id).unwrap();
    assert_eq!(p.status, PoolStatus::Running);
    assert_eq!(
        c.live_usage(T0, later)
            .iter()
            .map(|r| r.amount_micros)
            .sum::<i64>(),
        0
    );
}

#[test]
fn r_bill_2_convert_at_expiry_bills_on_demand_from_the_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut out = Outbox::new();
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 1, terms(1, false, false)), 0, T0)
        .unwrap();
    c.set_renewal(&tenant(), &pool.pool_id, false, true, T0 + 1)
        .unwrap();
    let end = add_months(T0, 1);
    let after = end + 2 * HOUR_MS;
    keep_alive(&mut c, after, &mut out);
    c.tick(after, &mut out);
    let p = c.dedicated(&admin(), &pool.pool_id).unwrap();
    assert_eq!(
        (p.status, p.billing_mode),
        (PoolStatus::Running, BillingMode::OnDemand)
    );
    let rows = c.live_usage(end - HOUR_MS, after);
    let paid: i64 = rows.iter().map(|r| r.amount_micros).sum();
    assert_eq!(
        paid,
        2 * NODE_HOUR,
        "two on-demand hours after the expiry: {rows:?}"
    );
}

#[test]
fn frozen_without_renewal_stops_jobs_then_released_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut out = Outbox::new();
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 1, terms(1, false, false)), 0, T0)
        .unwrap();
    keep_alive(&mut c, T0 + 10, &mut out);
    c.tick(T0 + 10, &mut out);
    let mut spec = raw(1);
    spec.pool = pool.pool_id.clone();
    let job = c.submit(&tenant(), spec, T0 + 20, &mut out).unwrap();
    let end = add_months(T0, 1);
    keep_alive(&mut c, end + 1, &mut out);
    out.clear();
    c.tick(end + 1, &mut out);
    let p = c.dedicated(&admin(), &pool.pool_id).unwrap();
    assert_eq!(p.status, PoolStatus::Frozen);
    assert!(
        out.iter()
            .any(|(_, cmd)| matches!(cmd, AgentCommand::Stop { .. })),
        "running instances are stopped"
    );
    assert_eq!(
        c.job(&admin(), &job.job_id).unwrap().state,
        JobState::Failed
    );
    // No new jobs, no charge while frozen.
    let mut spec = raw(0);
    spec.pool = pool.pool_id.clone();
    assert!(c.submit(&tenant(), spec, end + 2, &mut out).is_err());
    assert!(c.live_usage(end, end + 5 * HOUR_MS).is_empty());
    // Released after the retention (24 h in these settings).
    let gone = end + 24 * HOUR_MS + 1;
    keep_alive(&mut c, gone, &mut out);
    let id = format!("{}-0", job.job_id);
    c.heartbeat(
        "n0",
        None,
        vec![report(&id, InstanceState::Stopped, None)],
        gone,
        &mut out,
    );
    c.tick(gone, &mut out);
    assert_eq!(
        c.dedicated(&admin(), &pool.pool_id).unwrap().status,
        PoolStatus::Deleted
    );
    assert_eq!(c.node("n0").unwrap().pool, "public");
}

#[test]
fn r_bill_1_conversion_is_refused_without_a_consumption_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut out = Outbox::new();
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 1, None), 0, T0)
        .unwrap();
    keep_alive(&mut c, T0, &mut out);
    c.tick(T0, &mut out);
    // Nothing billed yet.
    let err = c
        .convert_to_subscription(&tenant(), &pool.pool_id, 6, false, T0)
        .unwrap_err();
    assert!(
        matches!(err, ClusterError::NoConsumptionRecord { .. })
            && err.to_string().contains("no consumption record"),
        "{err}"
    );
    // Mid-hour conversion splits the hour exactly.
    let at = T0 + 25 * 60_000 + 300;
    keep_alive(&mut c, at, &mut out);
    c.tick(at, &mut out);
    let p = c
        .convert_to_subscription(&tenant(), &pool.pool_id, 6, true, at)
        .unwrap();
    assert_eq!(p.billing_mode, BillingMode::Subscription);
    let rows = c.live_usage(T0, T0 + HOUR_MS);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].mode, rows[0].unit_ms),
        (BillingMode::OnDemand, at - T0)
    );
    assert_eq!(
        (rows[1].mode, rows[1].unit_ms, rows[1].amount_micros),
        (BillingMode::Subscription, T0 + HOUR_MS - at, 0)
    );
    assert_eq!(
        c.orders(&admin()).last().unwrap().kind,
        OrderKind::Conversion
    );
}

#[test]
fn r_del_3_unsubscribe_refunds_the_unused_part_then_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 2, T0);
    let mut out = Outbox::new();
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 1, terms(12, false, false)), 0, T0)
        .unwrap();
    // Delete is refused for subscription pools.
    let err = c
        .delete_pool(&tenant(), &pool.pool_id, true, T0 + 1, &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("unsubscrib"), "{err}");
    // Scale out at the middle of the term: charged pro rata to the end.
    let end = add_months(T0, 12);
    let mid = T0 + (end - T0) / 2;
    keep_alive(&mut c, mid, &mut out);
    c.tick(mid, &mut out);
    c.scale_out(&tenant(), &pool.pool_id, 1, 0, mid).unwrap();
    let scale = c.orders(&admin()).last().unwrap().clone();
    assert_eq!(scale.kind, OrderKind::ScaleOut);
    assert_eq!(scale.amount_micros, 10 * NODE_MONTH / 2);
    keep_alive(&mut c, mid + 1, &mut out);
    c.tick(mid + 1, &mut out);
    // Unsubscribe three quarters in: a quarter of both orders comes back.
    let at = T0 + (end - T0) / 4 * 3;
    keep_alive(&mut c, at, &mut out);
    c.tick(at, &mut out);
    let (p, refund) = c
        .unsubscribe(&tenant(), &pool.pool_id, true, at, &mut out)
        .unwrap();
    let new_part = crate::domain::billing::pro_rata(10 * NODE_MONTH, T0, end, at);
    let scale_part = crate::domain::billing::pro_rata(scale.amount_micros, mid, end, at);
    assert_eq!(refund, new_part + scale_part);
    // A quarter of the year order, and half of the half-year scale-out order.
    assert!(
        (refund - (10 * NODE_MONTH / 4 + 10 * NODE_MONTH / 2 / 2)).abs() <= 2,
        "{refund}"
    );
    let last = c.orders(&admin()).last().unwrap().clone();
    assert_eq!(
        (last.kind, last.amount_micros),
        (OrderKind::Refund, -refund)
    );
    assert!(matches!(
        p.status,
        PoolStatus::Deleting | PoolStatus::Deleted
    ));
    // R-DEL-2: nothing is metered after it.
    assert!(c.live_usage(at + 1, at + 10 * HOUR_MS).is_empty());
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The test's own model of what was allocated when.
#[derive(Default)]
struct Model {
    /// subject -> [(from, to)] unit spans
    spans: BTreeMap<String, Vec<(i64, Option<i64>)>>,
    /// pool subject -> [(from, mode)]
    modes: BTreeMap<String, Vec<(i64, BillingMode)>>,
    price: BTreeMap<String, i64>,
    /// Subjects metered at the preemptible price.
    preemptible: std::collections::BTreeSet<String>,
}

impl Model {
    /// Expected (unit_ms, amount upper and lower bound) per (subject, mode) over [from, to).
    fn integrate(&self, to: i64) -> BTreeMap<(String, BillingMode), i64> {
        let mut out = BTreeMap::new();
        for (subject, spans) in &self.spans {
            let modes = self
                .modes
                .get(subject)
                .cloned()
                .unwrap_or_else(|| vec![(i64::MIN, BillingMode::OnDemand)]);
            for (i, (m0, mode)) in modes.iter().enumerate() {
                let m1 = modes.get(i + 1).map_or(to, |m| m.0).min(to);
                let mut ms = 0;
                for (a, b) in spans {
                    let (s0, s1) = ((*a).max(*m0), b.unwrap_or(to).min(m1));
                    ms += (s1 - s0).max(0);
                }
                if ms > 0 {
                    *out.entry((subject.clone(), *mode)).or_insert(0) += ms;
                }
            }
        }
        out
    }
}

/// One random timeline: the cluster, the test's own model of it, and what
/// is alive to act on.
struct Timeline {
    dir: tempfile::TempDir,
    c: Cluster,
    out: Outbox,
    rng: Rng,
    now: i64,
    model: Model,
    running: Vec<String>,
    /// Preempted instances whose stop the agent has not reported yet.
    stopping: Vec<String>,
    pools: Vec<String>,
    preemptions: usize,
}

impl Timeline {
    fn new(seed: u64) -> Timeline {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let now = T0 + rng.below(HOUR_MS as u64) as i64;
        let c = cluster_with_nodes(dir.path(), 6, now);
        Timeline {
            dir,
            c,
            out: Outbox::new(),
            rng,
            now,
            model: Model::default(),
            running: Vec::new(),
            stopping: Vec::new(),
            pools: Vec::new(),
            preemptions: 0,
        }
    }

    /// A random live pool's id, if any.
    fn some_pool(&mut self) -> Option<String> {
        (!self.pools.is_empty())
            .then(|| self.pools[self.rng.below(self.pools.len() as u64) as usize].clone())
    }

    fn create_pool(&mut self, step: u32) {
        let n = 1 + self.rng.below(2) as u32;
        let seed = self.rng.next();
        let req = train(&self.c, &format!("p{step}"), n, None);
        let Ok(p) = self.c.create_pool(&tenant(), req, seed, self.now) else {
            return;
        };
        let subject = format!("pool:{}", p.pool_id);
        let spans = self.model.spans.entry(subject.clone()).or_default();
        spans.extend(p.node_ids.iter().map(|_| (self.now, None)));
        self.model
            .modes
            .insert(subject.clone(), vec![(self.now, BillingMode::OnDemand)]);
        self.model.price.insert(subject, NODE_HOUR);
        self.pools.push(p.pool_id);
    }

    fn scale_out(&mut self, id: &str) {
        let seed = self.rng.next();
        if self.c.scale_out(&tenant(), id, 1, seed, self.now).is_ok() {
            let spans = self.model.spans.get_mut(&format!("pool:{id}")).unwrap();
            spans.push((self.now, None));
        }
    }

    fn scale_in(&mut self, id: &str) {
        let p = self.c.dedicated(&admin(), id).unwrap();
        if p.target_node_count() <= 1 {
            return;
        }
        let node = p
            .node_ids
            .iter()
            .find(|n| !p.draining.contains(n))
            .unwrap()
            .clone();
        let removed = self.c.scale_in(
            &tenant(),
            id,
            std::slice::from_ref(&node),
            true,
            self.now,
            &mut self.out,
        );
        if removed.is_ok() {
            // The model closes the span of that node: the one whose start
            // matches the meter.
            let start = p
                .meter
                .iter()
                .find(|s| s.unit == node && s.to_ms.is_none())
                .unwrap()
                .from_ms;
            let spans = self.model.spans.get_mut(&format!("pool:{id}")).unwrap();
            let open = spans
                .iter_mut()
                .find(|s| s.0 == start && s.1.is_none())
                .unwrap();
            open.1 = Some(self.now);
        }
    }

    fn delete_pool(&mut self) {
        let id = self
            .pools
            .remove(self.rng.below(self.pools.len() as u64) as usize);
        let (now, out) = (self.now, &mut self.out);
        if self.c.delete_pool(&tenant(), &id, true, now, out).is_err() {
            // A converted pool is released by unsubscribing (R-DEL-3).
            self.c.unsubscribe(&tenant(), &id, true, now, out).unwrap();
        }
        let spans = self.model.spans.get_mut(&format!("pool:{id}")).unwrap();
        for s in spans.iter_mut().filter(|s| s.1.is_none()) {
            s.1 = Some(now);
        }
    }

    /// A public job, preemptible or not; its instance starts with
    /// [`Self::start_placed`].
    fn start_instance(&mut self) {
        let preemptible = self.rng.below(2) == 0;
        let spec = RawJobSpec {
            priority_class: if preemptible {
                crate::domain::job::PriorityClass::Preemptible
            } else {
                Default::default()
            },
            ..raw(0)
        };
        self.c
            .submit(&tenant(), spec, self.now, &mut self.out)
            .unwrap();
        self.start_placed();
    }

    /// The agent reports every placed instance running now (a preempted
    /// job's next run, too); the model meters each from now at its price.
    fn start_placed(&mut self) {
        let placed: Vec<(String, String, bool)> = self
            .c
            .jobs()
            .filter(|j| j.pool_id == PUBLIC_POOL)
            .flat_map(|j| {
                let preemptible =
                    j.spec.priority_class == crate::domain::job::PriorityClass::Preemptible;
                j.instances
                    .iter()
                    .filter(|i| i.state == InstanceState::Scheduled)
                    .map(move |i| (i.node_id.clone(), i.instance_id.clone(), preemptible))
            })
            .collect();
        for (node, id, preemptible) in placed {
            let running = vec![report(&id, InstanceState::Running, None)];
            self.c
                .heartbeat(&node, None, running, self.now, &mut self.out);
            let subject = format!("instance:{id}");
            self.model
                .spans
                .insert(subject.clone(), vec![(self.now, None)]);
            let price = if preemptible {
                self.model.preemptible.insert(subject.clone());
                PREEMPTIBLE_HOUR
            } else {
                INSTANCE_HOUR
            };
            self.model.price.insert(subject, price);
            self.running.push(id);
        }
    }

    fn node_of(&self, id: &str) -> String {
        self.c
            .jobs()
            .flat_map(|j| j.instances.iter())
            .find(|i| i.instance_id == id)
            .unwrap()
            .node_id
            .clone()
    }

    /// A running preemptible job is preempted: it is metered on until its
    /// agent reports the stop.
    fn preempt(&mut self) {
        let Some(pos) = self
            .running
            .iter()
            .position(|id| self.model.preemptible.contains(&format!("instance:{id}")))
        else {
            return;
        };
        let id = self.running.remove(pos);
        let job = self
            .c
            .jobs()
            .find(|j| j.instances.iter().any(|i| i.instance_id == id))
            .unwrap()
            .job_id
            .clone();
        self.c.preempt(&job, "j-999999", &mut self.out);
        self.preemptions += 1;
        self.stopping.push(id);
    }

    /// The agent reports a preempted instance gone (SIGTERM): its meter
    /// ends now, and its job is queued again.
    fn stopped(&mut self) {
        let id = self.stopping.remove(0);
        let node = self.node_of(&id);
        let mut gone = report(&id, InstanceState::Failed, None);
        gone.signal = Some(15); // SIGTERM
        self.c
            .heartbeat(&node, None, vec![gone], self.now, &mut self.out);
        self.model.spans.get_mut(&format!("instance:{id}")).unwrap()[0].1 = Some(self.now);
    }

    fn end_instance(&mut self) {
        let id = self
            .running
            .remove(self.rng.below(self.running.len() as u64) as usize);
        let node = self.node_of(&id);
        let done = vec![report(&id, InstanceState::Succeeded, Some(0))];
        self.c.heartbeat(&node, None, done, self.now, &mut self.out);
        self.model.spans.get_mut(&format!("instance:{id}")).unwrap()[0].1 = Some(self.now);
    }

    fn convert(&mut self, id: &str) {
        if self
            .c
            .convert_to_subscription(&tenant(), id, 1, true, self.now)
            .is_ok()
        {
            let modes = self.model.modes.get_mut(&format!("pool:{id}")).unwrap();
            modes.push((self.now, BillingMode::Subscription));
        }
    }

    /// Sixty random steps, hours closing now and then.
    fn run(&mut self) {
        for step in 0..60 {
            self.now += 1 + self.rng.below(2 * HOUR_MS as u64) as i64;
            keep_alive(&mut self.c, self.now, &mut self.out);
            self.c.tick(self.now, &mut self.out);
            self.start_placed();
            match self.rng.below(11) {
                0 | 1 => self.create_pool(step),
                2 => {
                    if let Some(id) = self.some_pool() {
                        self.scale_out(&id);
                    }
                }
                3 => {
                    if let Some(id) = self.some_pool() {
                        self.scale_in(&id);
                    }
                }
                4 if !self.pools.is_empty() => self.delete_pool(),
                5 => self.start_instance(),
                6 if !self.running.is_empty() => self.end_instance(),
                // Restart from the database at this instant.
                7 => self.c = open(self.dir.path(), self.now),
                8 => {
                    if let Some(id) = self.some_pool() {
                        self.convert(&id);
                    }
                }
                9 => self.preempt(),
                10 if !self.stopping.is_empty() => self.stopped(),
                _ => {}
            }
            if self.rng.below(3) == 0 {
                self.c.close_hours(self.now);
            }
        }
    }

    /// Closes the last hours and checks the ledger against the model;
    /// returns the (pool, instance, conversion, preemptible instance)
    /// subjects it covered.
    fn check(mut self, seed: u64) -> (usize, usize, usize, usize) {
        self.now += 1 + self.rng.below(HOUR_MS as u64) as i64;
        let now = self.now;
        self.c.close_hours(now);
        let rows = self.c.usage_rows(T0 - HOUR_MS, now).unwrap();
        let mut got: BTreeMap<(String, BillingMode), (i64, i64, i64)> = BTreeMap::new();
        for r in &rows {
            assert_eq!(
                r.preemptible,
                self.model.preemptible.contains(&r.subject),
                "seed {seed}: {} marked preemptible {}",
                r.subject,
                r.preemptible
            );
            let e = got.entry((r.subject.clone(), r.mode)).or_default();
            e.0 += r.unit_ms;
            e.1 += r.amount_micros;
            e.2 += 1;
        }
        // Closed hours never repeat a (subject, hour, mode).
        let mut keys: Vec<_> = rows
            .iter()
            .map(|r| (r.subject.clone(), r.hour_start_ms, r.mode))
            .collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "seed {seed}: duplicated ledger rows");
        let want = self.model.integrate(now);
        let got_ms: BTreeMap<_, _> = got.iter().map(|(k, v)| (k.clone(), v.0)).collect();
        assert_eq!(
            got_ms, want,
            "seed {seed}: ledger milliseconds differ from the timeline"
        );
        for ((subject, mode), (ms, amount, records)) in &got {
            let price = if *mode == BillingMode::OnDemand {
                self.model.price[subject]
            } else {
                0
            };
            let exact = (i128::from(price) * i128::from(*ms)) as f64 / HOUR_MS as f64;
            assert!(
                (*amount as f64 - exact).abs() <= *records as f64 * 0.5 + 1e-6,
                "seed {seed} {subject}: {amount} vs {exact}"
            );
        }
        assert!(hour_floor(now) >= hour_floor(T0));
        (
            want.keys().filter(|k| k.0.starts_with("pool:")).count(),
            want.keys().filter(|k| k.0.starts_with("instance:")).count(),
            want.keys()
                .filter(|k| k.1 == BillingMode::Subscription)
                .count(),
            want.keys()
                .filter(|k| self.model.preemptible.contains(&k.0))
                .count(),
        )
    }
}

/// R-POOL-1 and the preemptible price: public and preemptible instances,
/// preempted and run again, are each metered exactly from start to stop.
#[test]
fn ledger_equals_an_independent_integration_of_random_timelines() {
    let (mut pools_seen, mut instances_seen, mut conversions_seen) = (0, 0, 0);
    let (mut preemptible_seen, mut preemptions) = (0, 0);
    for seed in 1..=12u64 {
        let mut timeline = Timeline::new(seed);
        timeline.run();
        preemptions += timeline.preemptions;
        let (pools, instances, conversions, preemptible) = timeline.check(seed);
        pools_seen += pools;
        instances_seen += instances;
        conversions_seen += conversions;
        preemptible_seen += preemptible;
    }
    // The timelines really exercised pools, public instances, conversions
    // and preemptions (a preempted job's later runs are instances too).
    assert!(
        pools_seen > 20
            && instances_seen > 20
            && conversions_seen > 3
            && preemptible_seen > 10
            && preemptions > 5,
        "{pools_seen} {instances_seen} {conversions_seen} {preemptible_seen} {preemptions}"
    );
}

#[test]
fn used_gpu_time_is_metered_next_to_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut out = Outbox::new();
    // A public job with both GPUs of n0, running from T0.
    let job = c.submit(&tenant(), raw(2), T0, &mut out).unwrap();
    let id = job.instances[0].instance_id.clone();
    c.heartbeat(
        "n0",
        None,
        vec![report(&id, InstanceState::Running, None)],
        T0,
        &mut out,
    );
    // Samples every 500 ms for ten minutes: GPU 0 at 80 %, GPU 1 at 20 %.
    let mut now = T0;
    c.record_gpu_samples("n0", &[(0, 80), (1, 20)], now);
    for _ in 0..1200 {
        now += 500;
        c.record_gpu_samples("n0", &[(0, 80), (1, 20)], now);
    }
    let rows = c.live_usage(T0, now);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].gpu_allocated_ms, 2 * 600_000);
    // (0.8 + 0.2) GPUs busy for ten minutes.
    assert_eq!(rows[0].gpu_used_ms, 600_000);
    // Persisted by the periodic flush: survives a restart.
    c.flush_samples(T0, now);
    drop(c);
    let c = open(dir.path(), now);
    assert_eq!(c.live_usage(T0, now)[0].gpu_used_ms, 600_000);
}

/// R-DEL-1 for TensorBoards: started for a training job, it runs in that
/// job's pool, so deleting the pool ends both.
#[test]
fn r_del_1_a_tensorboard_ends_with_its_training_jobs_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_with_nodes(dir.path(), 1, T0);
    let mut out = Outbox::new();
    let pool = c
        .create_pool(&tenant(), train(&c, "p", 1, None), 0, T0)
        .unwrap();
    keep_alive(&mut c, T0 + 1, &mut out);
    c.tick(T0 + 1, &mut out);
    let train_job = c
        .submit(
            &tenant(),
            RawJobSpec {
                pool: "p".into(),
                log_dir: "/shared/logs".into(),
                ..raw(0)
            },
            T0 + 2,
            &mut out,
        )
        .unwrap();
    let tb = c
        .submit(
            &tenant(),
            RawJobSpec {
                kind: Some(JobKind::Tensorboard),
                instances: 1,
                for_job: train_job.job_id.clone(),
                ..Default::default()
            },
            T0 + 3,
            &mut out,
        )
        .unwrap();
    assert_eq!(tb.pool_id, pool.pool_id);
    c.delete_pool(&tenant(), "p", true, T0 + 4, &mut out)
        .unwrap();
    for id in [&train_job.job_id, &tb.job_id] {
        let j = c.job(&tenant(), id).unwrap();
        assert_eq!(j.state, JobState::Unavailable, "{id}: {}", j.reason);
    }
}
