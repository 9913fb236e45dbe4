//! JSON output (`--output json`): hand-written converters from the protobuf
//! messages (which do not implement `Serialize`) to `serde_json` values.
//!
//! Keys are the protobuf field names in snake_case; enums use the readable
//! names of [`super::format`]; timestamps become `<name>_ms` (milliseconds
//! since the Unix epoch, `null` when absent).

use std::collections::BTreeMap;

use gpupool_proto::v1::{
    Bill, BillLine, Gpu, Instance, IssueTokenResponse, Job, ListUsageResponse, Network, Node,
    Order, Pool, ScaleInPick, Spec, Subscription, Tenant, UnsubscribeResponse, UsageRecord,
    WhoAmIResponse, network,
};
use serde_json::{Value, json};

use super::format::{
    billing_mode_name, instance_state_name, job_kind_name, job_state_name, node_status_name,
    pool_status_name, pool_type_name, ts_ms,
};

/// Milliseconds of an optional timestamp, `null` when absent.
fn ts(t: Option<&prost_types::Timestamp>) -> Value {
    ts_ms(t).map_or(Value::Null, Value::from)
}

/// A job; see the crate documentation of the CLI for the shape.
pub fn job(j: &Job) -> Value {
    let spec = j.spec.clone().unwrap_or_default();
    let res = spec.resources.clone().unwrap_or_default();
    let env: BTreeMap<&String, &String> = spec.env.iter().collect();
    json!({
        "job_id": j.job_id,
        "name": spec.name,
        "kind": job_kind_name(spec.kind),
        "pool": spec.pool,
        "pool_id": j.pool_id,
        "tenant": j.tenant,
        "state": job_state_name(j.state),
        "reason": j.reason,
        "priority": spec.priority,
        "instances_requested": spec.instances,
        "resources": {
            "gpus": res.gpus,
            "gpu_milli": res.gpu_milli,
            "gpu_models": res.gpu_models,
            "cpu_milli": res.cpu_milli,
            "memory_mib": res.memory_mib,
        },
        "command": spec.command,
        "env": env,
        "working_dir": spec.working_dir,
        "max_runtime_secs": spec.max_runtime_secs,
        "max_retries": spec.max_retries,
        "port": spec.port,
        "completions": spec.completions,
        "health_check": spec.health_check.as_ref().map(|h| json!({
            "http_path": h.http_path,
            "interval_ms": h.interval_ms,
            "timeout_ms": h.timeout_ms,
            "failure_threshold": h.failure_threshold,
            "initial_delay_ms": h.initial_delay_ms,
        })),
        "idle_timeout_secs": spec.idle_timeout_secs,
        "log_dir": spec.log_dir,
        "image": spec.image,
        "network": spec.network,
        "for_job": spec.for_job,
        "url": j.url,
        "retries": j.retries,
        "restarts": j.restarts,
        "ready_replicas": j.ready_replicas,
        "succeeded": j.succeeded,
        "submitted_at_ms": ts(j.submitted_at.as_ref()),
        "started_at_ms": ts(j.started_at.as_ref()),
        "finished_at_ms": ts(j.finished_at.as_ref()),
        "instances": j.instances.iter().map(instance).collect::<Vec<_>>(),
    })
}

/// One instance of a job.
pub fn instance(i: &Instance) -> Value {
    json!({
        "instance_id": i.instance_id,
        "rank": i.rank,
        "node_id": i.node_id,
        "gpu_indexes": i.gpu_indexes,
        "gpu_uuids": i.gpu_uuids,
        "state": instance_state_name(i.state),
        "exit_code": i.exit_code,
        "signal": i.signal,
        "reason": i.reason,
        "started_at_ms": ts(i.started_at.as_ref()),
        "finished_at_ms": ts(i.finished_at.as_ref()),
        "attempt": i.attempt,
        "port": i.port,
        "ready": i.ready,
        "endpoint": i.endpoint,
        "network": i.network,
        "network_address": i.network_address,
        "replaced": i.replaced,
        "image_digest": i.image_digest,
        "pulling": i.pulling,
        "pull_done_bytes": i.pull_done_bytes,
        "pull_total_bytes": i.pull_total_bytes,
    })
}

/// The kinds' defaults and limits.
pub fn kinds(k: &gpupool_proto::v1::ListJobKindsResponse) -> Value {
    Value::Array(
        k.kinds
            .iter()
            .map(|k| {
                let res = k.resources.clone().unwrap_or_default();
                json!({
                    "kind": job_kind_name(k.kind),
                    "command": k.command,
                    "resources": {
                        "gpus": res.gpus,
                        "gpu_milli": res.gpu_milli,
                        "cpu_milli": res.cpu_milli,
                        "memory_mib": res.memory_mib,
                    },
                    "max_runtime_secs": k.max_runtime_secs,
                    "max_runtime_limit_secs": k.max_runtime_limit_secs,
                    "idle_timeout_secs": k.idle_timeout_secs,
                    "idle_gpu_util_pct": k.idle_gpu_util_pct,
                })
            })
            .collect(),
    )
}

/// A list of jobs.
pub fn jobs(jobs: &[Job]) -> Value {
    Value::Array(jobs.iter().map(job).collect())
}

/// A node, with its inventory flattened in.
pub fn node(n: &Node) -> Value {
    let inv = n.inventory.clone().unwrap_or_default();
    let labels: BTreeMap<&String, &String> = inv.labels.iter().collect();
    let gpus: Vec<Value> = inv
        .gpus
        .iter()
        .map(|g| gpu(g, allocated_milli(n, g)))
        .collect();
    json!({
        "node_id": n.node_id,
        "hostname": inv.hostname,
        "status": node_status_name(n.status),
        "pool": n.pool,
        "spec": n.spec,
        "cordoned": n.cordoned,
        "revoked": n.revoked,
        "draining": n.draining,
        "drain_deadline_ms": ts(n.drain_deadline.as_ref()),
        "drain_force": n.drain_force,
        "cpu_cores": inv.cpu_cores,
        "cpu_model": inv.cpu_model,
        "memory_mib": inv.memory_mib,
        "az": inv.az,
        "os": inv.os,
        "kernel": inv.kernel,
        "labels": labels,
        "fake_gpus": inv.fake_gpus,
        "gpus": gpus,
        "gpus_allocated_milli": n.gpus_allocated_milli,
        "cpu_allocated_milli": n.cpu_allocated_milli,
        "memory_allocated_mib": n.memory_allocated_mib,
        "instance_ids": n.instance_ids,
        "last_heartbeat_ms": ts(n.last_heartbeat.as_ref()),
        "registered_at_ms": ts(n.registered_at.as_ref()),
    })
}

/// Thousandths of GPU `g` allocated on node `n` (0 when not reported).
pub fn allocated_milli(n: &Node, g: &Gpu) -> u32 {
    usize::try_from(g.index)
        .ok()
        .and_then(|i| n.gpu_allocated_milli.get(i))
        .copied()
        .unwrap_or(0)
}

fn gpu(g: &Gpu, allocated_milli: u32) -> Value {
    json!({
        "index": g.index,
        "uuid": g.uuid,
        "model": g.model,
        "memory_total_mib": g.memory_total_mib,
        "healthy": g.healthy,
        "health_reason": g.health_reason,
        "allocated_milli": allocated_milli,
        "mig_enabled": g.mig_enabled,
        "pci_bus_id": g.pci_bus_id,
        "utilization_pct": g.utilization_pct,
        "memory_used_mib": g.memory_used_mib,
        "temperature_c": g.temperature_c,
        "power_mw": g.power_mw,
    })
}

/// A list of nodes.
pub fn nodes(nodes: &[Node]) -> Value {
    Value::Array(nodes.iter().map(node).collect())
}

/// A pool. `network` is `{"custom": {...}}`, `{"isolated": {...}}` or
/// `null`; `subscription` is an object or `null`.
pub fn pool(p: &Pool) -> Value {
    json!({
        "pool_id": p.pool_id,
        "name": p.name,
        "type": pool_type_name(p.r#type),
        "description": p.description,
        "tenant": p.tenant,
        "spec": p.spec,
        "node_count": p.node_count,
        "az": p.az,
        "resolved_az": p.resolved_az,
        "network": p.network.as_ref().map_or(Value::Null, network_json),
        "billing_mode": billing_mode_name(p.billing_mode),
        "subscription": p.subscription.as_ref().map_or(Value::Null, subscription),
        "region": p.region,
        "status": pool_status_name(p.status),
        "status_reason": p.status_reason,
        "node_ids": p.node_ids,
        "created_at_ms": ts(p.created_at.as_ref()),
        "deleted_at_ms": ts(p.deleted_at.as_ref()),
        "gpus_total": p.gpus_total,
        "gpus_allocated_milli": p.gpus_allocated_milli,
        "nodes_ready": p.nodes_ready,
        "target_node_count": p.target_node_count,
    })
}

fn network_json(n: &Network) -> Value {
    match &n.network {
        Some(network::Network::Custom(c)) => json!({
            "custom": {
                "vpc_id": c.vpc_id,
                "subnet_id": c.subnet_id,
                "security_group_ids": c.security_group_ids,
            }
        }),
        Some(network::Network::Isolated(i)) => json!({
            "isolated": { "network_id": i.network_id }
        }),
        None => Value::Null,
    }
}

fn subscription(s: &Subscription) -> Value {
    json!({
        "months": s.months,
        "auto_renew": s.auto_renew,
        "convert_to_on_demand_at_expiry": s.convert_to_on_demand_at_expiry,
        "starts_at_ms": ts(s.starts_at.as_ref()),
        "ends_at_ms": ts(s.ends_at.as_ref()),
        "billed_months": s.billed_months,
    })
}

/// A list of pools.
pub fn pools(pools: &[Pool]) -> Value {
    Value::Array(pools.iter().map(pool).collect())
}

/// The answer to `pool unsubscribe`: `{"pool": <pool or null>, "refund_micros"}`.
pub fn unsubscribe(r: &UnsubscribeResponse) -> Value {
    json!({
        "pool": r.pool.as_ref().map_or(Value::Null, pool),
        "refund_micros": r.refund_micros,
    })
}

/// One pick of `pool scale-in-plan`.
pub fn scale_in_pick(p: &ScaleInPick) -> Value {
    json!({
        "node_id": p.node_id,
        "instances_disrupted": p.instances_disrupted,
        "job_ids": p.job_ids,
        "free_gpus": p.free_gpus,
        "pool_free_gpus_after": p.pool_free_gpus_after,
        "pool_fragmented_gpus_after": p.pool_fragmented_gpus_after,
        "explanation": p.explanation,
    })
}

/// The picks of `pool scale-in-plan`, in order.
pub fn scale_in_picks(picks: &[ScaleInPick]) -> Value {
    Value::Array(picks.iter().map(scale_in_pick).collect())
}

/// A tenant, with its quota flattened in.
pub fn tenant(t: &Tenant) -> Value {
    let quota = t.quota.unwrap_or_default();
    json!({
        "name": t.name,
        "max_dedicated_nodes": quota.max_dedicated_nodes,
        "max_gpus": quota.max_gpus,
        "dedicated_nodes_used": t.dedicated_nodes_used,
        "gpus_used": t.gpus_used,
        "public_max_gpus": quota.public_max_gpus,
        "public_weight": quota.public_weight.max(1),
        "allow_high_class": quota.allow_high_class,
        "public_gpu_milli_used": t.public_gpu_milli_used,
        "public_share_ppm": t.public_share_ppm,
        "public_recent_share_ppm": t.public_recent_share_ppm,
        "tokens": t.tokens,
        "network_id": t.network_id,
        "created_at_ms": ts(t.created_at.as_ref()),
    })
}

/// A list of tenants.
pub fn tenants(tenants: &[Tenant]) -> Value {
    Value::Array(tenants.iter().map(tenant).collect())
}

/// The answer to `tenant token`: `{"tenant", "token"}`.
pub fn token(r: &IssueTokenResponse) -> Value {
    json!({
        "tenant": r.tenant,
        "token": r.token,
        "token_id": r.token_id,
    })
}

/// The answer to `whoami`: `{"tenant", "admin"}`.
pub fn whoami(r: &WhoAmIResponse) -> Value {
    json!({
        "tenant": r.tenant,
        "admin": r.admin,
    })
}

/// A node spec (flavor) with its free capacity.
pub fn spec(s: &Spec) -> Value {
    json!({
        "name": s.name,
        "gpu_model": s.gpu_model,
        "gpu_count": s.gpu_count,
        "cpu_cores": s.cpu_cores,
        "memory_mib": s.memory_mib,
        "nodes_total": s.nodes_total,
        "nodes_free": s.nodes_free,
        "sold_out": s.sold_out,
    })
}

/// A list of specs.
pub fn specs(specs: &[Spec]) -> Value {
    Value::Array(specs.iter().map(spec).collect())
}

/// One usage record.
pub fn usage_record(r: &UsageRecord) -> Value {
    json!({
        "record_id": r.record_id,
        "tenant": r.tenant,
        "pool_id": r.pool_id,
        "job_id": r.job_id,
        "instance_id": r.instance_id,
        "spec": r.spec,
        "hour_start_ms": ts(r.hour_start.as_ref()),
        "seconds": r.seconds,
        "quantity": r.quantity,
        "unit_price_micros": r.unit_price_micros,
        "amount_micros": r.amount_micros,
        "billing_mode": billing_mode_name(r.billing_mode),
        "entry_kind": r.entry_kind,
        "unit_ms": r.unit_ms,
        "period": r.period,
        "gpu_allocated_ms": r.gpu_allocated_ms,
        "gpu_used_ms": r.gpu_used_ms,
        "preemptible": r.preemptible,
    })
}

/// The answer to `usage`: `{"records": [...], "total_micros"}`.
pub fn usage(r: &ListUsageResponse) -> Value {
    json!({
        "records": r.records.iter().map(usage_record).collect::<Vec<_>>(),
        "total_micros": r.total_micros,
    })
}

/// One subscription order (or refund: `kind` is `refund`).
pub fn order(o: &Order) -> Value {
    json!({
        "order_id": o.order_id,
        "kind": o.kind,
        "created_at_ms": ts(o.created_at.as_ref()),
        "pool_id": o.pool_id,
        "tenant": o.tenant,
        "months": o.months,
        "billed_months": o.billed_months,
        "amount_micros": o.amount_micros,
        "starts_at_ms": ts(o.starts_at.as_ref()),
        "ends_at_ms": ts(o.ends_at.as_ref()),
    })
}

/// A list of orders.
pub fn orders(orders: &[Order]) -> Value {
    Value::Array(orders.iter().map(order).collect())
}

/// One usage line of a bill.
pub fn bill_line(l: &BillLine) -> Value {
    json!({
        "pool_id": l.pool_id,
        "job_id": l.job_id,
        "spec": l.spec,
        "billing_mode": billing_mode_name(l.billing_mode),
        "seconds": l.seconds,
        "amount_micros": l.amount_micros,
        "preemptible": l.preemptible,
    })
}

/// The answer to `bill`: a tenant's bill for one month.
pub fn bill(b: &Bill) -> Value {
    json!({
        "tenant": b.tenant,
        "month": b.month,
        "currency": b.currency,
        "usage": b.usage.iter().map(bill_line).collect::<Vec<_>>(),
        "orders": orders(&b.orders),
        "usage_micros": b.usage_micros,
        "orders_micros": b.orders_micros,
        "refunds_micros": b.refunds_micros,
        "total_micros": b.total_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::v1::{InstanceState, JobKind, JobSpec, JobState, Resources};

    #[test]
    fn job_shape() {
        let j = Job {
            job_id: "j-1".into(),
            spec: Some(JobSpec {
                name: "train".into(),
                kind: JobKind::Training as i32,
                pool: "p1".into(),
                resources: Some(Resources {
                    gpus: 2,
                    gpu_milli: 0,
                    gpu_models: vec!["H100".into()],
                    cpu_milli: 1500,
                    memory_mib: 4096,
                }),
                instances: 1,
                command: vec!["sleep".into(), "10".into()],
                env: [("A".to_string(), "1".to_string())].into_iter().collect(),
                ..Default::default()
            }),
            state: JobState::Running as i32,
            pool_id: "pool-1".into(),
            instances: vec![Instance {
                instance_id: "j-1-0".into(),
                node_id: "n1".into(),
                gpu_indexes: vec![0, 1],
                state: InstanceState::Running as i32,
                exit_code: Some(3),
                ..Default::default()
            }],
            submitted_at: Some(gpupool_proto::timestamp_from_unix_ms(1234)),
            ..Default::default()
        };
        let v = job(&j);
        assert_eq!(v["job_id"], "j-1");
        assert_eq!(v["kind"], "training");
        assert_eq!(v["state"], "Running");
        assert_eq!(v["pool"], "p1");
        assert_eq!(v["pool_id"], "pool-1");
        assert_eq!(v["instances_requested"], 1);
        assert_eq!(v["resources"]["gpus"], 2);
        assert_eq!(v["resources"]["gpu_models"], json!(["H100"]));
        assert_eq!(v["resources"]["cpu_milli"], 1500);
        assert_eq!(v["resources"]["memory_mib"], 4096);
        assert_eq!(v["command"], json!(["sleep", "10"]));
        assert_eq!(v["env"], json!({"A": "1"}));
        assert_eq!(v["submitted_at_ms"], 1234);
        assert!(v["started_at_ms"].is_null());
        assert!(v["finished_at_ms"].is_null());
        let i = &v["instances"][0];
        assert_eq!(i["state"], "Running");
        assert_eq!(i["gpu_indexes"], json!([0, 1]));
        assert_eq!(i["exit_code"], 3);
        assert!(i["signal"].is_null());
        for key in ["tenant", "reason", "priority"] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
    }

    #[test]
    fn pool_shape() {
        let p = Pool {
            pool_id: "p-1".into(),
            r#type: gpupool_proto::v1::PoolType::Train as i32,
            status: gpupool_proto::v1::PoolStatus::Running as i32,
            billing_mode: gpupool_proto::v1::BillingMode::Subscription as i32,
            subscription: Some(Subscription {
                months: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = pool(&p);
        assert_eq!(v["type"], "train");
        assert_eq!(v["status"], "Running");
        assert_eq!(v["billing_mode"], "subscription");
        assert_eq!(v["subscription"]["months"], 3);
        assert!(v["network"].is_null());
        assert!(v["created_at_ms"].is_null());
        assert_eq!(v["target_node_count"], 0);
    }

    /// The keys of a JSON object, sorted.
    fn keys(v: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn tenant_shape() {
        let t = Tenant {
            name: "acme".into(),
            quota: Some(gpupool_proto::v1::Quota {
                max_dedicated_nodes: 4,
                max_gpus: 32,
                ..Default::default()
            }),
            created_at: Some(gpupool_proto::timestamp_from_unix_ms(5000)),
            dedicated_nodes_used: 2,
            gpus_used: 16,
            tokens: 1,
            network_id: "net-acme".into(),
            public_gpu_milli_used: 1500,
            public_share_ppm: 250_000,
            public_recent_share_ppm: 100_000,
        };
        let v = tenant(&t);
        let mut expected = [
            "name",
            "max_dedicated_nodes",
            "max_gpus",
            "dedicated_nodes_used",
            "gpus_used",
            "public_max_gpus",
            "public_weight",
            "allow_high_class",
            "public_gpu_milli_used",
            "public_share_ppm",
            "public_recent_share_ppm",
            "tokens",
            "network_id",
            "created_at_ms",
        ];
        expected.sort_unstable();
        assert_eq!(keys(&v), expected);
        assert_eq!(v["name"], "acme");
        assert_eq!(v["max_dedicated_nodes"], 4);
        assert_eq!(v["max_gpus"], 32);
        assert_eq!(v["dedicated_nodes_used"], 2);
        assert_eq!(v["gpus_used"], 16);
        assert_eq!(v["tokens"], 1);
        assert_eq!(v["network_id"], "net-acme");
        assert_eq!(v["created_at_ms"], 5000);

        // No quota and no creation time: zeros and null.
        let v = tenant(&Tenant::default());
        assert_eq!(v["max_dedicated_nodes"], 0);
        assert_eq!(v["max_gpus"], 0);
        assert!(v["created_at_ms"].is_null());
        assert_eq!(
            tenants(&[Tenant::default()]).as_array().map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn token_and_whoami_shapes() {
        let v = token(&IssueTokenResponse {
            tenant: "acme".into(),
            token: "gp_secret".into(),
            token_id: "0123456789ab".into(),
        });
        assert_eq!(
            v,
            json!({"tenant": "acme", "token": "gp_secret", "token_id": "0123456789ab"})
        );
        let v = whoami(&WhoAmIResponse {
            tenant: "admin".into(),
            admin: true,
        });
        assert_eq!(v, json!({"tenant": "admin", "admin": true}));
    }

    #[test]
    fn usage_shape() {
        let r = ListUsageResponse {
            records: vec![UsageRecord {
                record_id: 7,
                tenant: "acme".into(),
                pool_id: "public".into(),
                job_id: "j-1".into(),
                instance_id: "j-1-0".into(),
                spec: "1xH100".into(),
                hour_start: Some(gpupool_proto::timestamp_from_unix_ms(3_600_000)),
                seconds: 90,
                quantity: 1,
                unit_price_micros: 2_000_000,
                amount_micros: 50_000,
                billing_mode: gpupool_proto::v1::BillingMode::OnDemand as i32,
                entry_kind: "usage".into(),
                unit_ms: 90_400,
                period: "2026-11-27".into(),
                gpu_allocated_ms: 90_400,
                gpu_used_ms: 45_200,
                preemptible: true,
            }],
            total_micros: 50_000,
            next_page_token: String::new(),
        };
        let v = usage(&r);
        assert_eq!(keys(&v), ["records", "total_micros"]);
        assert_eq!(v["total_micros"], 50_000);
        let rec = &v["records"][0];
        let mut expected = [
            "record_id",
            "tenant",
            "pool_id",
            "job_id",
            "instance_id",
            "spec",
            "hour_start_ms",
            "seconds",
            "quantity",
            "unit_price_micros",
            "amount_micros",
            "billing_mode",
            "entry_kind",
            "unit_ms",
            "period",
            "gpu_allocated_ms",
            "gpu_used_ms",
            "preemptible",
        ];
        expected.sort_unstable();
        assert_eq!(keys(rec), expected);
        assert_eq!(rec["billing_mode"], "on-demand");
        assert_eq!(rec["hour_start_ms"], 3_600_000);
        assert_eq!(rec["unit_ms"], 90_400);
        assert_eq!(rec["period"], "2026-11-27");
    }

    #[test]
    fn order_and_bill_shapes() {
        let o = Order {
            order_id: "o-1".into(),
            kind: "refund".into(),
            created_at: Some(gpupool_proto::timestamp_from_unix_ms(9000)),
            pool_id: "pool-1".into(),
            tenant: "acme".into(),
            months: 3,
            billed_months: 1,
            amount_micros: -1_500_000,
            starts_at: None,
            ends_at: Some(gpupool_proto::timestamp_from_unix_ms(10_000)),
        };
        let v = order(&o);
        assert_eq!(v["kind"], "refund");
        assert_eq!(v["created_at_ms"], 9000);
        assert_eq!(v["amount_micros"], -1_500_000);
        assert!(v["starts_at_ms"].is_null());
        assert_eq!(v["ends_at_ms"], 10_000);

        let b = Bill {
            tenant: "acme".into(),
            month: "2026-11".into(),
            currency: "USD".into(),
            usage: vec![BillLine {
                pool_id: "public".into(),
                job_id: "j-1".into(),
                spec: "1xH100".into(),
                billing_mode: gpupool_proto::v1::BillingMode::OnDemand as i32,
                seconds: 3600,
                amount_micros: 2_000_000,
                preemptible: false,
            }],
            orders: vec![o],
            usage_micros: 2_000_000,
            orders_micros: 0,
            refunds_micros: -1_500_000,
            total_micros: 500_000,
        };
        let v = bill(&b);
        let mut expected = [
            "tenant",
            "month",
            "currency",
            "usage",
            "orders",
            "usage_micros",
            "orders_micros",
            "refunds_micros",
            "total_micros",
        ];
        expected.sort_unstable();
        assert_eq!(keys(&v), expected);
        assert_eq!(
            v["usage"],
            json!([{
                "pool_id": "public",
                "job_id": "j-1",
                "spec": "1xH100",
                "billing_mode": "on-demand",
                "seconds": 3600,
                "amount_micros": 2_000_000,
                "preemptible": false,
            }])
        );
        assert_eq!(v["orders"][0]["order_id"], "o-1");
        assert_eq!(v["refunds_micros"], -1_500_000);
        assert_eq!(v["total_micros"], 500_000);
    }

    #[test]
    fn scale_in_pick_shape() {
        let p = ScaleInPick {
            node_id: "n2".into(),
            instances_disrupted: 1,
            job_ids: vec!["j-1".into()],
            free_gpus: 7,
            pool_free_gpus_after: 8,
            pool_fragmented_gpus_after: 0,
            explanation: "n2 runs 1 instance".into(),
        };
        let v = scale_in_picks(std::slice::from_ref(&p));
        assert_eq!(
            v,
            json!([{
                "node_id": "n2",
                "instances_disrupted": 1,
                "job_ids": ["j-1"],
                "free_gpus": 7,
                "pool_free_gpus_after": 8,
                "pool_fragmented_gpus_after": 0,
                "explanation": "n2 runs 1 instance",
            }])
        );
    }
}
