//! The public pool shared fairly between tenants, end to end: a real
//! scheduler and agent (fake GPUs), tenants with their own tokens, the
//! CLI setting a tenant's public-pool limit.

use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

async fn submit_as(s: &Scheduler, token: &str, command: &[&str]) -> String {
    s.clients(Some(token))
        .await
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(training(1, command)),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id
}

/// One agent (two GPUs) and tenants A and B with a token each.
async fn two_tenants(dir: &std::path::Path, s: &Scheduler) -> (Agent, String, String) {
    let agent = Agent::start(dir, s, "n1", "2xA100-40GB");
    wait_ready(s, 1).await;
    let mut admin = s.admin().await;
    let a = tenant_with_token(&mut admin, "tenant-a", 0, 0).await;
    let b = tenant_with_token(&mut admin, "tenant-b", 0, 0).await;
    (agent, a, b)
}

async fn state_of(s: &Scheduler, id: &str) -> (pb::JobState, String) {
    let j = get_job(s, id).await;
    (
        pb::JobState::try_from(j.state).unwrap_or(pb::JobState::Unspecified),
        j.reason,
    )
}

async fn wait_state(s: &Scheduler, id: &str, state: pb::JobState) {
    wait_job(s, id, state, Duration::from_secs(30)).await;
}

/// Tenant A floods the pool with 100 jobs; B then submits one. When one
/// of A's jobs ends, B's starts, not A's older ones. With A held
/// to 1 GPU in the public pool, A's next job waits saying so, until the
/// limit is lifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_another_and_its_limit_holds() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let (_agent, a, b) = two_tenants(dir.path(), &sched).await;

    // A floods the pool: 100 one-GPU jobs, 2 running, 98 queued.
    let a_long = submit_as(&sched, &a, &["sleep", "120"]).await;
    let a_short = submit_as(&sched, &a, &["sleep", "120"]).await;
    wait_state(&sched, &a_long, pb::JobState::Running).await;
    wait_state(&sched, &a_short, pb::JobState::Running).await;
    let mut a_queued = Vec::new();
    for _ in 0..98 {
        a_queued.push(submit_as(&sched, &a, &["sleep", "120"]).await);
    }
    let b_job = submit_as(&sched, &b, &["sleep", "120"]).await;
    assert_eq!(state_of(&sched, &b_job).await.0, pb::JobState::Queued);

    // A GPU frees: B's job is next (A holds half the pool, B nothing),
    // though A's 98 waited longer.
    cancel_as(&sched, &a, &a_short).await;
    wait_state(&sched, &b_job, pb::JobState::Running).await;
    for id in &a_queued {
        assert_eq!(state_of(&sched, id).await.0, pb::JobState::Queued);
    }
    let a_next = &a_queued[0];
    let list = cli_ok(&sched, &["tenant", "list", "-o", "json"]);
    let tenants: serde_json::Value = serde_json::from_str(&list).unwrap();
    let of = |name: &str| {
        tenants
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {list}"))
            .clone()
    };
    assert_eq!(of("tenant-a")["public_gpu_milli_used"], 1000, "{list}");
    assert_eq!(of("tenant-b")["public_gpu_milli_used"], 1000, "{list}");
    // Half the pool now, plus the little of it held in the seconds since
    // (the recent share; half-life 3600 s).
    let recent = of("tenant-a")["public_recent_share_ppm"].as_u64().unwrap();
    assert!(recent > 0 && recent < 10_000, "{list}");
    let share = of("tenant-a")["public_share_ppm"].as_u64().unwrap();
    assert!(share.abs_diff(500_000 + recent) <= 1, "{list}");

    // A may hold 1 GPU in the public pool: when B's job ends, A's next
    // waits on its limit, not on room.
    let set = cli_ok(
        &sched,
        &[
            "tenant",
            "quota",
            "tenant-a",
            "--public-max-gpus",
            "1",
            "-o",
            "json",
        ],
    );
    assert!(set.contains("\"public_max_gpus\": 1"), "{set}");
    assert!(
        set.contains("\"max_gpus\": 0"),
        "the other quotas are kept: {set}"
    );
    cancel_as(&sched, &b, &b_job).await;
    let reason = eventually(Duration::from_secs(20), "the limit's reason", || async {
        let (state, reason) = state_of(&sched, a_next).await;
        assert_eq!(state, pb::JobState::Queued, "{reason}");
        reason.contains("limit in pool public").then_some(reason)
    })
    .await;
    assert_eq!(
        reason,
        "tenant tenant-a's limit in pool public is 1 GPU(s): 1 in use, this asks for 1 more"
    );
    // A tenant cannot lift its own limit.
    let own = sched.cli_as(
        &a,
        &["tenant", "quota", "tenant-a", "--public-max-gpus", "none"],
    );
    assert!(!own.status.success());
    cli_ok(
        &sched,
        &["tenant", "quota", "tenant-a", "--public-max-gpus", "none"],
    );
    wait_state(&sched, a_next, pb::JobState::Running).await;
}

async fn submit_spec(
    s: &Scheduler,
    token: &str,
    spec: pb::JobSpec,
) -> Result<pb::Job, tonic::Status> {
    s.clients(Some(token))
        .await
        .jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .map(tonic::Response::into_inner)
}

const PUBLIC_HOUR: i64 = 360_000;
const PREEMPTIBLE_HOUR: i64 = 120_000;

/// The victim's usage, as its tenant reads it: its first run's rows are
/// preemptible, at the preemptible price, and meter exactly the time from
/// its start to its stop; its second run is metered from its own start.
async fn ledger_ends_at_the_stop(s: &Scheduler, token: &str, victim: &pb::Job) {
    let rows = s
        .clients(Some(token))
        .await
        .usage
        .list_usage(pb::ListUsageRequest {
            job: victim.job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let ms = |t: &Option<_>| gpupool_proto::unix_ms_from_timestamp(t.as_ref().unwrap());
    let first = victim.instances.iter().find(|i| i.finished_at.is_some());
    let first = first.expect("the preempted run has ended");
    let metered: i64 = rows
        .iter()
        .filter(|r| r.instance_id == first.instance_id)
        .map(|r| r.unit_ms)
        .sum();
    assert_eq!(
        metered,
        ms(&first.finished_at) - ms(&first.started_at),
        "the preempted run is metered to its stop: {rows:?}"
    );
    assert!(rows.len() >= 2, "both runs are metered: {rows:?}");
    for r in &rows {
        assert!(r.preemptible, "{r:?}");
        assert_eq!(r.unit_price_micros, PREEMPTIBLE_HOUR, "{r:?}");
        let exact = r.unit_ms as f64 * PREEMPTIBLE_HOUR as f64 / 3_600_000.0;
        assert!((r.amount_micros as f64 - exact).abs() <= 0.5, "{r:?}");
    }
}

fn classed(class: pb::PriorityClass, command: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        priority_class: class as i32,
        ..training(1, command)
    }
}

/// A floods the pool with 100 preemptible jobs; B's normal job starts
/// within seconds: one of A's is stopped (its notice file says why,
/// SIGTERM, grace), queued again without spending a retry, metered at the
/// preemptible price exactly to the stop, and runs again once there is
/// room. A preemptible job preempts nothing; `high` needs the admin's
/// grant; only training jobs may be preemptible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_job_preempts_a_preemptible_one_which_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_top_and_config(
        dir.path(),
        "preemption_min_runtime_secs = 2",
        &format!(
            "[billing.prices.\"gpu-2xA100-40GB-2c-24g\"]\n\
             public_instance_hour_micros = {PUBLIC_HOUR}\n\
             preemptible_instance_hour_micros = {PREEMPTIBLE_HOUR}\n"
        ),
    )
    .await;
    let (_agent, a, b) = two_tenants(dir.path(), &sched).await;
    let pre = pb::PriorityClass::Preemptible;
    // A job that checkpoints when told: on SIGTERM it reads why from its
    // notice file and exits 0 (it is queued again all the same).
    let long = [
        "sh",
        "-c",
        "echo preemptible=$GPUPOOL_PREEMPTIBLE; \
         trap 'echo \"notice: $(cat \"$GPUPOOL_STOP_NOTICE\")\"; exit 0' TERM; \
         sleep 120 & wait",
    ];
    let mut a_jobs = Vec::new();
    for _ in 0..100 {
        a_jobs.push(
            submit_spec(&sched, &a, classed(pre, &long))
                .await
                .unwrap()
                .job_id,
        );
    }
    wait_state(&sched, &a_jobs[0], pb::JobState::Running).await;
    wait_state(&sched, &a_jobs[1], pb::JobState::Running).await;
    let log = cli_ok(&sched, &["job", "logs", &a_jobs[0]]);
    assert!(log.contains("preemptible=1"), "{log}");
    // Past the minimum run time (2 s in this test's config), a preemptible
    // job still preempts nothing: the rest stay queued.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state_of(&sched, &a_jobs[2]).await.0, pb::JobState::Queued);

    // B's normal job starts within seconds: one of A's is preempted.
    let started = std::time::Instant::now();
    let b_job = submit_spec(&sched, &b, training(1, &["sleep", "3"]))
        .await
        .unwrap()
        .job_id;
    wait_state(&sched, &b_job, pb::JobState::Running).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let victims: Vec<pb::Job> = {
        let mut v = Vec::new();
        for id in &a_jobs[..2] {
            let j = get_job(&sched, id).await;
            if j.preemptions > 0 {
                v.push(j);
            }
        }
        v
    };
    assert_eq!(victims.len(), 1, "exactly one victim for one GPU");
    let victim = &victims[0];
    // B's job is another tenant's: A is not told its name.
    assert_eq!(victim.preempted_by, "(another tenant's job)");
    let reason = &victim.instances[0].reason;
    assert!(
        reason.contains("preempted by another tenant's normal-class job"),
        "{reason}"
    );
    assert!(
        !reason.contains(&b_job) && !reason.contains("tenant-b"),
        "{reason}"
    );
    // Stopped, queued again (B's runs 3 s): its run's log says it read why.
    wait_state(&sched, &victim.job_id, pb::JobState::Queued).await;
    let log = cli_ok(&sched, &["job", "logs", &victim.job_id]);
    assert!(
        log.contains("notice: preempted by another tenant's normal-class job"),
        "the victim read why it was stopped: {log}"
    );
    // B's job ends; the victim (older than A's third) runs again, its
    // retries untouched.
    wait_state(&sched, &b_job, pb::JobState::Succeeded).await;
    wait_state(&sched, &victim.job_id, pb::JobState::Running).await;
    let again = get_job(&sched, &victim.job_id).await;
    assert_eq!(again.preemptions, 1);
    let text = cli_ok(&sched, &["job", "get", &victim.job_id]);
    assert!(
        text.contains("1 time(s), last by (another tenant's job)"),
        "{text}"
    );
    assert!(text.contains("class preemptible"), "{text}");
    ledger_ends_at_the_stop(&sched, &a, &again).await;

    // High-class jobs preempt other tenants' normal work too: the admin
    // grants them.
    let high = pb::PriorityClass::High;
    let refused = submit_spec(&sched, &b, classed(high, &["sleep", "3"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(
        refused.message().contains("--allow-high-class"),
        "{refused}"
    );
    let own = sched.cli_as(
        &b,
        &["tenant", "quota", "tenant-b", "--allow-high-class", "true"],
    );
    assert!(!own.status.success(), "a tenant grants itself nothing");
    cli_ok(
        &sched,
        &["tenant", "quota", "tenant-b", "--allow-high-class", "true"],
    );
    let b_high = submit_spec(&sched, &b, classed(high, &["sleep", "3"]))
        .await
        .unwrap()
        .job_id;
    cancel_as(&sched, &b, &b_high).await;

    // Only training jobs may be preemptible.
    let mut nb = classed(pre, &[]);
    nb.kind = pb::JobKind::Notebook as i32;
    let err = submit_spec(&sched, &a, nb).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("only training jobs"), "{err}");
}

/// With `fair_share_preemption`, B's normal job takes a GPU from A's
/// normal ones at once (A holds the whole pool, B nothing): A's victim is
/// queued again; B's next job preempts nothing (A would fall below B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_preemption_reclaims_from_a_tenant_over_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_top(
        dir.path(),
        "preemption_min_runtime_secs = 1\nfair_share_preemption = true",
    )
    .await;
    let (_agent, a, b) = two_tenants(dir.path(), &sched).await;
    let mut a_jobs = Vec::new();
    for _ in 0..100 {
        a_jobs.push(submit_as(&sched, &a, &["sleep", "120"]).await);
    }
    wait_state(&sched, &a_jobs[0], pb::JobState::Running).await;
    wait_state(&sched, &a_jobs[1], pb::JobState::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b_first = submit_as(&sched, &b, &["sleep", "120"]).await;
    wait_state(&sched, &b_first, pb::JobState::Running).await;
    let mut preempted = 0;
    for id in &a_jobs[..2] {
        preempted += get_job(&sched, id).await.preemptions;
    }
    assert_eq!(preempted, 1, "one of A's two running jobs");
    // Half each now: B's second job would push A below B.
    let b_second = submit_as(&sched, &b, &["sleep", "120"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state_of(&sched, &b_second).await.0, pb::JobState::Queued);
    let mut preempted = 0;
    for id in &a_jobs[..2] {
        preempted += get_job(&sched, id).await.preemptions;
    }
    assert_eq!(preempted, 1, "no second victim");
}
