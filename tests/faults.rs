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
    let long = submit(&sched, training(1, &["sleep", "600"]))
        .await
        .unwrap();
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
        let known: HashSet<String> = all_jobs(&sched)
            .await
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        let acked_now = acked.lock().unwrap().clone();
        let lost: Vec<&String> = acked_now.iter().filter(|id| !known.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged but gone: {lost:?}"
        );

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
    assert!(
        acked >= 20,
        "only {acked} of {attempts} submissions acknowledged"
    );
    eprintln!("{kills} kills, {attempts} submissions tried, {acked} acknowledged, none lost");
}

/// Every job, page after page (a fast machine acknowledges more than one
/// page's worth).
async fn all_jobs(sched: &Scheduler) -> Vec<pb::Job> {
    let mut client = sched.jobs().await;
    let (mut jobs, mut page_token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return jobs;
        }
        page_token = page.next_page_token;
    }
}

async fn assert_gpus_unique(sched: &Scheduler, round: u64) {
    let jobs = all_jobs(sched).await;
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

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    /// None (the test is skipped, loudly; under CI=true it fails) when
    /// namespaces cannot be made here.
    fn create() -> Option<Netns> {
        let id = std::process::id() % 200 + 20;
        let ns = Netns {
            name: format!("gpns{id}"),
            host_if: format!("gph{id}"),
            host_ip: format!("10.231.{id}.1"),
        };
        let peer = format!("gpp{id}");
        let ns_ip = format!("10.231.{id}.2/30");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                ns.host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                peer.clone(),
                "netns".into(),
                ns.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{}/30", ns.host_ip),
                "dev".into(),
                ns.host_if.clone(),
            ],
            vec!["link".into(), "set".into(), ns.host_if.clone(), "up".into()],
        ];
        let inside: Vec<Vec<String>> = vec![
            vec![
                "addr".into(),
                "add".into(),
                ns_ip,
                "dev".into(),
                peer.clone(),
            ],
            vec!["link".into(), "set".into(), peer, "up".into()],
            vec!["link".into(), "set".into(), "lo".into(), "up".into()],
        ];
        let run = |args: &[String]| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    if o.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&o.stderr).into_owned())
                    }
                })
        };
        let mut result = Ok(());
        for s in &steps {
            result = result.and_then(|()| run(s));
        }
        for s in &inside {
            let mut args = vec![
                "netns".to_string(),
                "exec".into(),
                ns.name.clone(),
                "ip".into(),
            ];
            args.extend(s.iter().cloned());
            result = result.and_then(|()| run(&args));
        }
        match result {
            Ok(()) => Some(ns),
            Err(err) => {
                drop(ns);
                assert!(
                    !in_ci(),
                    "cannot make a network namespace: {err}; CI runs as root"
                );
                eprintln!("SKIPPED: cannot make a network namespace ({err}); run as root");
                None
            }
        }
    }

    fn link(&self, up: bool) {
        let ok = std::process::Command::new("ip")
            .args(["link", "set", &self.host_if, if up { "up" } else { "down" }])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip link set {} failed", self.host_if);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An agent in its own network namespace, its link cut: for less than the
/// grace nothing happens to its instance; for longer the node goes
/// NotReady, the instance is Lost and the training job (max_retries 1) is
/// queued again and, once the link is back, runs again as a new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_network_cut_short_is_harmless_long_requeues() {
    let Some(ns) = Netns::create() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_on(dir.path(), "0.0.0.0").await;
    let addr = sched.addr().replace("127.0.0.1", &ns.host_ip);
    let _agent = Agent::start_in_netns(dir.path(), &addr, "cut-node", "2xH100-80GB", &ns.name);
    wait_ready(&sched, 1).await;
    let mut spec = training(1, &["sleep", "600"]);
    spec.max_retries = 1;
    let job = submit(&sched, spec).await.unwrap();
    let running = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    let first = running.instances[0].clone();

    // Shorter than the grace (GRACE_MS): nothing happens. A quarter of it:
    // after the link is back, TCP resends only when its backed-off
    // retransmission timer fires (0.2, 0.6, 1.4 s after the first lost
    // segment), so a cut of half the grace could leave the node silent past
    // it (a CI run saw that).
    ns.link(false);
    tokio::time::sleep(Duration::from_millis(u64::from(GRACE_MS) / 4)).await;
    ns.link(true);
    tokio::time::sleep(Duration::from_millis(u64::from(GRACE_MS))).await;
    let after = get_job(&sched, &job.job_id).await;
    assert_eq!(after.state, pb::JobState::Running as i32, "{after:#?}");
    assert_eq!(after.retries, 0);
    assert_eq!(after.instances.len(), 1);
    assert_eq!(after.instances[0].started_at, first.started_at);
    assert_eq!(
        list_nodes(&sched).await[0].status,
        pb::NodeStatus::Ready as i32
    );

    // Longer than the grace: NotReady, Lost, requeued.
    ns.link(false);
    let requeued = eventually(
        Duration::from_secs(15),
        "requeue after the node is lost",
        || async {
            let j = get_job(&sched, &job.job_id).await;
            (j.retries == 1).then_some(j)
        },
    )
    .await;
    assert_eq!(requeued.instances[0].state, pb::InstanceState::Lost as i32);
    assert!(
        requeued.instances[0].reason.contains("NotReady"),
        "{requeued:#?}"
    );
    assert_eq!(
        list_nodes(&sched).await[0].status,
        pb::NodeStatus::NotReady as i32
    );
    ns.link(true);
    // Back: the node is Ready, the old process is stopped, the new run runs.
    let again = eventually(Duration::from_secs(30), "the retry running", || async {
        let j = get_job(&sched, &job.job_id).await;
        (j.state == pb::JobState::Running as i32).then_some(j)
    })
    .await;
    let current: Vec<_> = again.instances.iter().filter(|i| i.attempt == 1).collect();
    assert_eq!(current.len(), 1, "{again:#?}");
    assert_eq!(current[0].state, pb::InstanceState::Running as i32);
    assert_eq!(
        list_nodes(&sched).await[0].status,
        pb::NodeStatus::Ready as i32
    );
}
