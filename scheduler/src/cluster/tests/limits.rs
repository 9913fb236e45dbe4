//! What one job may cost the scheduler: retries capped and backed off, old
//! runs pruned once billed, finished jobs forgotten after their retention.

use super::*;

fn with_limits(dir: &std::path::Path, limits: JobLimits) -> Cluster {
    let store = SqliteStore::open(&dir.join("t.db")).unwrap();
    let s = Settings {
        limits,
        ..settings()
    };
    let mut c = Cluster::load(Box::new(store), s, 0).unwrap();
    c.register_node("n1", inventory(1), 0).unwrap();
    c
}

fn fail_current(c: &mut Cluster, job_id: &str, now: i64, out: &mut Outbox) {
    let ids: Vec<String> = c
        .job(&admin(), job_id)
        .unwrap()
        .current()
        .filter(|i| !i.state.is_terminal())
        .map(|i| i.instance_id.clone())
        .collect();
    assert!(!ids.is_empty(), "{job_id} has a live instance");
    let reports = ids
        .iter()
        .map(|id| report(id, InstanceState::Failed, Some(1)))
        .collect();
    c.heartbeat("n1", None, reports, now, out);
}

#[test]
fn retries_are_capped_and_each_waits_twice_as_long_as_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let limits = JobLimits {
        max_retries: 3,
        retry_backoff_ms: 1_000,
        retry_backoff_max_ms: 3_000,
        ..JobLimits::default()
    };
    let mut c = with_limits(dir.path(), limits);
    let mut out = Outbox::new();
    let mut spec = raw(1);
    spec.max_retries = u32::MAX;
    let err = c.submit(&admin(), spec.clone(), 0, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            ClusterError::InvalidSpec(SpecError::RetriesOverLimit { limit: 3, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_retries"), "{err}");
    spec.max_retries = 3;
    let job = c.submit(&admin(), spec, 0, &mut out).unwrap();
    let mut now = 10;
    // Waits: 1 s, 2 s, then the cap of 3 s.
    for (retry, wait) in [(1, 1_000), (2, 2_000), (3, 3_000)] {
        fail_current(&mut c, &job.job_id, now, &mut out);
        let j = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(
            (j.state, j.retries),
            (JobState::Queued, retry),
            "{}",
            j.reason
        );
        assert!(j.reason.contains(&format!("{wait} ms")), "{}", j.reason);
        c.heartbeat("n1", None, vec![], now + wait - 1, &mut out);
        c.tick(now + wait - 1, &mut out);
        let j = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(j.state, JobState::Queued, "placed before its backoff");
        now += wait;
        c.heartbeat("n1", None, vec![], now, &mut out);
        c.tick(now, &mut out);
        let j = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(j.state, JobState::Scheduled, "{}", j.reason);
        now += 10;
    }
    fail_current(&mut c, &job.job_id, now, &mut out);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.instances.len(), 4, "the first run and three retries");
}

#[test]
fn a_crash_looping_service_keeps_a_bounded_record_and_its_bill() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_limits(dir.path(), JobLimits::default());
    let mut out = Outbox::new();
    let job = c
        .submit(
            &admin(),
            RawJobSpec {
                kind: Some(JobKind::OnlineService),
                command: vec!["crash".into()],
                instances: 1,
                gpus: 1,
                ..Default::default()
            },
            0,
            &mut out,
        )
        .unwrap();
    // 80 replicas run a few seconds and crash, over several hours.
    let mut now = 1_000;
    let mut seen = Vec::new();
    for _ in 0..80 {
        let id = c
            .job(&admin(), &job.job_id)
            .unwrap()
            .instances
            .iter()
            .find(|i| !i.state.is_terminal())
            .map(|i| i.instance_id.clone())
            .expect("a replacement was placed");
        seen.push(id.clone());
        c.heartbeat(
            "n1",
            None,
            vec![report(&id, InstanceState::Running, None)],
            now,
            &mut out,
        );
        now += 200_000;
        c.heartbeat(
            "n1",
            None,
            vec![report(&id, InstanceState::Failed, Some(1))],
            now,
            &mut out,
        );
        c.close_hours(now);
        // Its backoff (up to a minute) passes.
        now += 61_000;
        c.heartbeat("n1", None, vec![], now, &mut out);
        c.tick(now, &mut out);
    }
    let j = c.job(&admin(), &job.job_id).unwrap();
    // Kept: at most KEPT_ENDED_INSTANCES whose hours are billed, plus those
    // that ended in the hour still open.
    let closed = c.ledger_closed_until_ms;
    let billed_and_kept = j
        .instances
        .iter()
        .filter(|i| i.state.is_terminal() && i.finished_at_ms.is_some_and(|f| f < closed))
        .count();
    assert!(
        billed_and_kept <= Cluster::KEPT_ENDED_INSTANCES,
        "{billed_and_kept} kept"
    );
    assert!(j.instances.len() < 50, "{} kept", j.instances.len());
    assert!(j.pruned_instances >= 30, "{}", j.pruned_instances);
    assert_eq!(
        j.instances.len() as u64 + j.pruned_instances,
        seen.len() as u64 + 1
    );
    // Every pruned replica's hours are in the ledger: nothing was lost.
    let billed: std::collections::BTreeSet<String> = c
        .store
        .ledger(0, now)
        .unwrap()
        .into_iter()
        .map(|r| r.subject)
        .collect();
    let pruned: Vec<&String> = seen
        .iter()
        .filter(|id| !j.instances.iter().any(|i| &i.instance_id == *id))
        .collect();
    assert_eq!(pruned.len() as u64, j.pruned_instances);
    for id in pruned {
        assert!(
            billed.contains(&format!("instance:{id}")),
            "{id} not billed"
        );
    }
}

#[test]
fn finished_jobs_are_forgotten_after_their_retention_and_their_ids_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = JobLimits {
        finished_job_retention_ms: 3_600_000,
        ..JobLimits::default()
    };
    let mut c = with_limits(dir.path(), limits.clone());
    let mut out = Outbox::new();
    let run_to_end = |c: &mut Cluster, job: &Job, at: i64, out: &mut Outbox| {
        let id = format!("{}-0", job.job_id);
        let running = report(&id, InstanceState::Running, None);
        c.heartbeat("n1", None, vec![running], at, out);
        let done = report(&id, InstanceState::Succeeded, Some(0));
        c.heartbeat("n1", None, vec![done], at + 100, out);
    };
    let old = c.submit(&admin(), raw(1), 0, &mut out).unwrap();
    run_to_end(&mut c, &old, 10, &mut out);
    let newest = c.submit(&admin(), raw(1), 2_000, &mut out).unwrap();
    // Within its retention a finished job stays; a running one always.
    c.close_hours(3_000_000);
    assert_eq!(c.forget_finished_jobs(3_000_000), 0);
    let later = 3 * 3_600_000;
    c.close_hours(later);
    assert_eq!(c.forget_finished_jobs(later), 1);
    assert!(c.job(&admin(), &old.job_id).is_err());
    assert!(c.job(&admin(), &newest.job_id).is_ok());
    // The newest ends and goes too: no stored job keeps the sequence up.
    run_to_end(&mut c, &newest, later, &mut out);
    let much_later = later + 3 * 3_600_000;
    c.close_hours(much_later);
    assert_eq!(c.forget_finished_jobs(much_later), 1);
    assert_eq!(c.jobs().count(), 0);
    // Their hours stay billed.
    let billed = c.store.ledger(0, much_later).unwrap();
    for j in [&old, &newest] {
        assert!(
            billed.iter().any(|r| r.job_id == j.job_id),
            "{} not billed",
            j.job_id
        );
    }
    // After a restart the store agrees, and ids go on from where they were
    // (only the stored mark says 3 is next).
    drop(c);
    let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
    let s = Settings {
        limits,
        ..settings()
    };
    let mut c = Cluster::load(Box::new(store), s, much_later).unwrap();
    assert_eq!(c.jobs().count(), 0);
    c.heartbeat("n1", None, vec![], much_later, &mut out);
    let next = c.submit(&admin(), raw(0), much_later, &mut out).unwrap();
    assert_eq!(next.job_id, "j-000003");
}
