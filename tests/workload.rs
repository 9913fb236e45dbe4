//! A workload that touches every kind of state a cluster keeps — a
//! tenant and its token, a pool converted to a subscription (an order),
//! jobs running in the pool and in the public pool, a finished job,
//! metered hours — and the check that a scheduler started later on the
//! same state (an upgrade, a restored snapshot) finds all of it.

use std::time::Duration;

use gpupool_proto::v1 as pb;

use crate::*;

/// What the cluster held before (an upgrade, a snapshot).
pub struct Before {
    pub token: String,
    pub pool: pb::Pool,
    pub orders: Vec<pb::Order>,
    pub usage: Vec<pb::UsageRecord>,
    pub jobs: Vec<pb::Job>,
    /// Running public and pool jobs, as they were.
    pub running: Vec<pb::Job>,
    /// When the usage was read (ms since the epoch).
    pub at_ms: i64,
}

pub async fn wait_running(s: &Scheduler, job: &str) -> pb::Job {
    wait_job(s, job, pb::JobState::Running, Duration::from_secs(30)).await
}

/// On `s` (two agents up, one GPU each at least; the previous release's
/// scheduler, or this one's): a tenant with a pool
/// converted to a subscription (an order), a job running in the pool and
/// one in the public pool, a finished job, and what was metered.
pub async fn workload(s: &Scheduler) -> Before {
    let mut admin = s.admin().await;
    let token = tenant_with_token(&mut admin, "acme", 1, 8).await;
    let mut t = s.clients(Some(&token)).await;
    let pool = train_pool(&mut t, "upgrade", "H100-80GB", 1).await;
    let pool = eventually(Duration::from_secs(20), "pool running", || async {
        let p = s
            .clients(Some(&token))
            .await
            .pools
            .get_pool(pb::GetPoolRequest {
                pool: pool.pool_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        (p.status == pb::PoolStatus::Running as i32).then_some(p)
    })
    .await;
    // R-BILL-1: converted once its first consumption record exists.
    eventually(Duration::from_secs(20), "pool converted", || async {
        s.clients(Some(&token))
            .await
            .pools
            .convert_to_subscription(pb::ConvertToSubscriptionRequest {
                pool: pool.pool_id.clone(),
                months: 1,
                auto_renew: false,
            })
            .await
            .ok()
    })
    .await;
    let in_pool = t
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                pool: pool.pool_id.clone(),
                ..training(1, &["sleep", "600"])
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let public = submit(s, training(1, &["sleep", "600"])).await.unwrap();
    let done = submit(s, training(0, &["sh", "-c", "echo before the upgrade"]))
        .await
        .unwrap();
    wait_job(
        s,
        &done.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    let running = vec![
        wait_running(s, &in_pool.job_id).await,
        wait_running(s, &public.job_id).await,
    ];
    // Let an hour's ledger rows exist for the pool and the public job.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (orders, usage, jobs, pool) = state(s, &token, &pool.pool_id).await;
    assert!(!orders.is_empty(), "the conversion made no order");
    assert!(!usage.is_empty(), "nothing metered");
    Before {
        token,
        pool,
        orders,
        usage,
        jobs,
        running,
        at_ms,
    }
}

/// The tenant's orders and usage, every job, and the pool, on `s`.
pub async fn state(
    s: &Scheduler,
    token: &str,
    pool: &str,
) -> (Vec<pb::Order>, Vec<pb::UsageRecord>, Vec<pb::Job>, pb::Pool) {
    let mut t = s.clients(Some(token)).await;
    let orders = t
        .usage
        .list_orders(pb::ListOrdersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .orders;
    let usage = t
        .usage
        .list_usage(pb::ListUsageRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let jobs = s
        .admin()
        .await
        .jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let pool = t
        .pools
        .get_pool(pb::GetPoolRequest { pool: pool.into() })
        .await
        .unwrap()
        .into_inner();
    (orders, usage, jobs, pool)
}

/// The scheduler at `s` finds everything `before` held: the
/// tenant's token, pool and orders, every job, the metered rows (closed
/// hours unchanged, open ones not shrunk), and the running jobs still
/// running the same instances.
pub async fn finds_everything(s: &Scheduler, before: &Before) {
    let (orders, usage, jobs, pool) = state(s, &before.token, &before.pool.pool_id).await;
    assert_eq!(orders, before.orders);
    assert_eq!(pool.pool_id, before.pool.pool_id);
    assert_eq!(pool.status, before.pool.status);
    assert_eq!(pool.node_ids, before.pool.node_ids);
    for job in &before.jobs {
        let now = jobs
            .iter()
            .find(|j| j.job_id == job.job_id)
            .unwrap_or_else(|| panic!("{} is gone after the upgrade", job.job_id));
        assert_eq!(now.spec, job.spec, "{}", job.job_id);
        assert_eq!(now.submitted_at, job.submitted_at, "{}", job.job_id);
    }
    // Metered time per (hour, pool, job, instance, kind): hours closed
    // before the upgrade unchanged, the open one never less.
    let metered = |rows: &[pb::UsageRecord]| {
        let mut sums = std::collections::BTreeMap::<(i64, String), u64>::new();
        for r in rows {
            let hour = r
                .hour_start
                .as_ref()
                .map_or(0, gpupool_proto::unix_ms_from_timestamp);
            let key = format!(
                "{hour} {} {} {} {}",
                r.pool_id, r.job_id, r.instance_id, r.entry_kind
            );
            *sums.entry((hour, key)).or_default() += u64::from(r.seconds);
        }
        sums
    };
    let now_metered = metered(&usage);
    for (key, seconds) in metered(&before.usage) {
        let now = now_metered.get(&key).copied().unwrap_or(0);
        if key.0 + 3_600_000 <= before.at_ms {
            assert_eq!(now, seconds, "closed hour {} changed", key.1);
        }
        assert!(
            now >= seconds,
            "metered {}: {seconds} s before, {now} s after\n{usage:#?}",
            key.1
        );
    }
    for job in &before.running {
        let now = eventually(
            Duration::from_secs(30),
            "running job reported by its agent",
            || async {
                let j = get_job(s, &job.job_id).await;
                (j.state == pb::JobState::Running as i32).then_some(j)
            },
        )
        .await;
        assert_eq!(now.instances[0].instance_id, job.instances[0].instance_id);
        assert_eq!(
            now.instances[0].started_at, job.instances[0].started_at,
            "{} was restarted, not kept",
            job.job_id
        );
    }
}
