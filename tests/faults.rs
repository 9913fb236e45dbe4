//! Fault tests with real processes: the scheduler SIGKILLed in the middle of
//! a stream of submissions, again and again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

/// SIGKILL the scheduler 10 times while a client submits jobs as fast as it
/// can: every job whose submission was acknowledged exists afterwards, no
/// GPU is ever held by two active instances, and an instance that was
/// running before the first kill is still the same running instance after
/// the last (the agent keeps it; the scheduler reattaches it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_sigkill_during_submissions_loses_no_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Scheduler::start(dir.path()).await;
    let _agent = Agent::start(dir.path(), &sched, "fault-node", "8xH100-80GB");
    wait_ready(&sched, 1).await;
    let long = submit(&sched, training(1, &["sleep", "600"])).await.unwrap();
    let running = wait_job(
        &sched,
        &long.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    let started = running.instances[0].started_at;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (mut kills, mut attempts) = (0, 0u64);
    for round in 0..10u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let submitter = {
            let (stop, acked, addr) = (stop.clone(), acked.clone(), sched.addr());
            tokio::spawn(async move {
                let channel = tonic::transport::Channel::from_shared(addr)
                    .unwrap()
                    .connect_lazy();
                let mut jobs = pb::job_service_client::JobServiceClient::with_interceptor(
                    channel,
                    Bearer::new(ADMIN_TOKEN),
                );
                let mut tries = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tries += 1;
                    let spec = training(1, &["sleep", "0.3"]);
                    match jobs
                        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                        .await
                    {
                        Ok(r) => acked.lock().unwrap().push(r.into_inner().job_id),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                tries
            })
        };
        // Let some submissions through, then kill mid-stream.
        tokio::time::sleep(Duration::from_millis(150 + 40 * round)).await;
        sched = sched.kill_and_restart(dir.path()).await;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        attempts += submitter.await.unwrap();

        // Every acknowledged job survived the kill.
        let known: HashSet<String> = sched
            .jobs()
            .await
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        let acked_now = acked.lock().unwrap().clone();
        let lost: Vec<&String> = acked_now.iter().filter(|id| !known.contains(*id)).collect();
        assert!(lost.is_empty(), "round {round}: acknowledged but gone: {lost:?}");

        // No GPU held twice, now and a little later (after reattachment).
        for _ in 0..3 {
            assert_gpus_unique(&sched, round).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let job = wait_job(
        &sched,
        &long.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        job.instances[0].started_at, started,
        "the long instance was restarted"
    );
    let acked = acked.lock().unwrap().len();
    assert_eq!(kills, 10);
    assert!(acked >= 20, "only {acked} of {attempts} submissions acknowledged");
    eprintln!("{kills} kills, {attempts} submissions tried, {acked} acknowledged, none lost");
}

async fn assert_gpus_unique(sched: &Scheduler, round: u64) {
    let jobs = sched
        .jobs()
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let mut held: HashSet<(String, String)> = HashSet::new();
    for j in &jobs {
        for i in &j.instances {
            let active = [
                pb::InstanceState::Scheduled,
                pb::InstanceState::Running,
                pb::InstanceState::Stopping,
            ]
            .iter()
            .any(|s| *s as i32 == i.state);
            if !active {
                continue;
            }
            for g in &i.gpu_uuids {
                assert!(
                    held.insert((i.node_id.clone(), g.clone())),
                    "round {round}: GPU {g} on {} held twice ({})",
                    i.node_id,
                    j.job_id
                );
            }
        }
    }
}
