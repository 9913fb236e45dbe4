//! The public pool's fair share on a real cluster timeline: a tenant's
//! recent share grows while it holds GPUs, decays once it holds none, is
//! written once a minute (a restart keeps it), and orders the queue.

use super::*;
use crate::domain::tenant::Quota;

const HALF_LIFE: i64 = 600_000;

fn cluster(dir: &std::path::Path, now: i64) -> Cluster {
    let store = SqliteStore::open(&dir.join("t.db")).unwrap();
    let settings = Settings {
        fair_share_half_life_ms: HALF_LIFE,
        ..settings()
    };
    Cluster::load(Box::new(store), settings, now).unwrap()
}

fn beat(c: &mut Cluster, now: i64, out: &mut Outbox) {
    let ids: Vec<String> = c.nodes().map(|n| n.node_id.clone()).collect();
    for id in ids {
        c.heartbeat(&id, None, vec![], now, out);
    }
    c.tick(now, out);
}

fn one_gpu(c: &mut Cluster, tenant: &str, now: i64, out: &mut Outbox) -> String {
    let job = c.submit(&Caller::tenant(tenant), raw(1), now, out).unwrap();
    job.job_id
}

#[test]
fn a_tenant_that_held_the_pool_lately_waits_behind_one_that_did_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut now = 1_000_000;
    let mut c = cluster(dir.path(), now);
    c.register_node("n1", inventory(2), now).unwrap();
    for t in ["a", "b", "c"] {
        c.create_tenant(&admin(), t, Quota::default(), now).unwrap();
    }
    let mut out = Outbox::new();
    // A holds both GPUs for two half-lives, ticking each second.
    let held = [
        one_gpu(&mut c, "a", now, &mut out),
        one_gpu(&mut c, "a", now, &mut out),
    ];
    for _ in 0..(2 * HALF_LIFE / 1000) {
        now += 1000;
        beat(&mut c, now, &mut out);
    }
    let recent = c.tenants["a"].recent.avg_ppb as f64 / 1e9;
    assert!(
        (recent - 0.75).abs() < 0.01,
        "two half-lives at 100%: {recent}"
    );
    assert_eq!(c.tenants["b"].recent.avg_ppb, 0);
    // Written within the minute: a restart keeps it.
    let again = cluster(dir.path(), now);
    let stored = again.tenants["a"].recent.avg_ppb as f64 / 1e9;
    assert!((stored - recent).abs() < 0.05, "{stored} vs {recent}");
    drop(again);

    // A's jobs end; one half-life later its recent share has halved.
    for id in &held {
        end_job(&mut c, "a", id, now, &mut out);
    }
    let ended = c.tenants["a"].recent.avg_ppb as f64 / 1e9;
    for _ in 0..(HALF_LIFE / 1000) {
        now += 1000;
        beat(&mut c, now, &mut out);
    }
    let decayed = c.tenants["a"].recent.avg_ppb as f64 / 1e9;
    assert!(
        (decayed - ended / 2.0).abs() < 0.01,
        "{decayed} vs {ended}/2"
    );

    // C fills the pool; A, then B, queue a job each. Neither holds
    // anything now (plain DRF would start A's, the older), but A used the
    // pool lately: when a GPU frees, B's starts.
    let c_jobs = [
        one_gpu(&mut c, "c", now, &mut out),
        one_gpu(&mut c, "c", now, &mut out),
    ];
    let a_job = one_gpu(&mut c, "a", now + 1, &mut out);
    let b_job = one_gpu(&mut c, "b", now + 2, &mut out);
    now += 1000;
    end_job(&mut c, "c", &c_jobs[0], now, &mut out);
    beat(&mut c, now, &mut out);
    let state = |c: &Cluster, id: &str| c.job(&admin(), id).unwrap().state;
    assert_eq!(state(&c, &b_job), JobState::Scheduled);
    assert_eq!(state(&c, &a_job), JobState::Queued);
}

/// Cancels `id` and reports its instances gone.
fn end_job(c: &mut Cluster, tenant: &str, id: &str, now: i64, out: &mut Outbox) {
    c.cancel(&Caller::tenant(tenant), id, now, out).unwrap();
    let stopping: Vec<String> = c
        .jobs()
        .filter(|j| j.job_id == id)
        .flat_map(|j| j.instances.iter())
        .filter(|i| i.state == InstanceState::Stopping)
        .map(|i| i.instance_id.clone())
        .collect();
    for inst in stopping {
        let done = vec![report(&inst, InstanceState::Failed, None)];
        c.heartbeat("n1", None, done, now, out);
    }
}
