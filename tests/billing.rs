//! Metering survives crashes: the real scheduler is SIGKILLed at random
//! moments while a dedicated pool and a public job run, and the ledger
//! still holds every metered millisecond exactly once.

use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::unix_ms_from_timestamp as ms;
use gpupool_proto::v1 as pb;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_neither_loses_nor_double_counts_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start(dir.path(), &sched, "pool-node", "1xH100-80GB");
    let _b = Agent::start(dir.path(), &sched, "public-node", "1xL4-24GB");
    wait_ready(&sched, 2).await;
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "acme", 2, 8).await;
    let mut t = sched.clients(Some(&token)).await;
    let pool = train_pool(&mut t, "metered", "H100-80GB", 1).await;
    let created = ms(pool.created_at.as_ref().unwrap());
    let job = t
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                kind: pb::JobKind::Notebook as i32,
                instances: 1,
                resources: Some(pb::Resources {
                    gpus: 1,
                    cpu_milli: 100,
                    memory_mib: 64,
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "600".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;

    // Ten SIGKILLs at random moments; the agents reconnect each time.
    let mut seed = now_ms() as u64 | 1;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(100 + seed % 500)).await;
        sched = sched.kill_and_restart(dir.path()).await;
    }
    let mut t = sched.clients(Some(&token)).await;
    assert_eq!(
        get_job(&sched, &job.job_id).await.state,
        pb::JobState::Running as i32,
        "the public job survived"
    );

    // End both: the pool by deletion, the job by cancel.
    let before_delete = now_ms();
    t.pools
        .delete_pool(pb::DeletePoolRequest {
            pool: pool.pool_id.clone(),
            confirm: true,
        })
        .await
        .unwrap();
    let after_delete = now_ms();
    t.jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap();
    let ended = eventually(Duration::from_secs(20), "instance stopped", || async {
        let j = get_job(&sched, &job.job_id).await;
        j.instances[0].finished_at.is_some().then_some(j)
    })
    .await;
    let inst = &ended.instances[0];
    let (started, finished) = (
        ms(inst.started_at.as_ref().unwrap()),
        ms(inst.finished_at.as_ref().unwrap()),
    );
    // One more crash after the end: nothing may change.
    sched = sched.kill_and_restart(dir.path()).await;
    let mut t = sched.clients(Some(&token)).await;

    let usage = t
        .usage
        .list_usage(pb::ListUsageRequest {
            from: Some(gpupool_proto::timestamp_from_unix_ms(created - 3_600_000)),
            by: pb::Rollup::Hour as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sum = |pred: &dyn Fn(&pb::UsageRecord) -> bool| -> i64 {
        usage
            .records
            .iter()
            .filter(|r| r.entry_kind == "usage" && pred(r))
            .map(|r| r.unit_ms)
            .sum()
    };
    // The pool: metered from creation to the delete request, exactly once.
    let pool_ms = sum(&|r| r.pool_id == pool.pool_id);
    assert!(
        pool_ms >= before_delete - created && pool_ms <= after_delete - created,
        "pool metered {pool_ms} ms; expected {}..={} ms",
        before_delete - created,
        after_delete - created
    );
    // The public instance: from its start to its end, to the millisecond.
    let job_ms = sum(&|r| r.job_id == job.job_id);
    assert_eq!(
        job_ms,
        finished - started,
        "public instance metered {job_ms} ms, ran {} ms",
        finished - started
    );
    // Amounts follow the prices (3.6/node-hour, 0.36/instance-hour), rounded per record.
    let pool_amount: i64 = usage
        .records
        .iter()
        .filter(|r| r.pool_id == pool.pool_id)
        .map(|r| r.amount_micros)
        .sum();
    assert!(
        (pool_amount - pool_ms).abs() <= 1,
        "{pool_amount} vs {pool_ms}"
    );
    // Each (subject, hour, mode) once.
    let mut keys: Vec<_> = usage
        .records
        .iter()
        .map(|r| {
            (
                r.pool_id.clone(),
                r.instance_id.clone(),
                r.period.clone(),
                r.billing_mode,
            )
        })
        .collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        n,
        "a ledger row was written twice: {:#?}",
        usage.records
    );
    // The bill agrees.
    let bill = t
        .usage
        .get_bill(pb::GetBillRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bill.tenant, "acme");
    assert_eq!(bill.total_micros, usage.total_micros);
}
