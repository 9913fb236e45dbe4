//! The foundation's end-to-end check: one real scheduler, two real agents
//! (fake 2x and 8x GPUs), real processes, real gRPC and the real CLI.

use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

const READY: i32 = pb::NodeStatus::Ready as i32;
const NOT_READY: i32 = pb::NodeStatus::NotReady as i32;

async fn node(s: &Scheduler, id: &str) -> pb::Node {
    list_nodes(s)
        .await
        .into_iter()
        .find(|n| n.node_id == id)
        .unwrap_or_else(|| panic!("node {id} not listed"))
}

async fn both_ready(s: &Scheduler) -> Vec<pb::Node> {
    eventually(Duration::from_secs(20), "both nodes Ready", || async {
        let nodes = list_nodes(s).await;
        (nodes.len() == 2 && nodes.iter().all(|n| n.status == READY)).then_some(nodes)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_cluster_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Scheduler::start(dir.path()).await;
    let small = Agent::start(dir.path(), &sched, "node-small", "2xH100-80GB");
    let mut big = Agent::start(dir.path(), &sched, "node-big", "8xH100-80GB");
    let _keep = &big;

    // Both nodes Ready with the right inventory.
    let nodes = both_ready(&sched).await;
    for n in &nodes {
        let inv = n.inventory.as_ref().unwrap();
        let want = if n.node_id == "node-small" { 2 } else { 8 };
        assert_eq!(inv.gpus.len(), want, "{}", n.node_id);
        assert!(
            inv.gpus
                .iter()
                .all(|g| g.model == "H100-80GB" && g.healthy && g.memory_total_mib == 80 * 1024)
        );
        assert!(inv.fake_gpus);
        assert!(inv.cpu_cores > 0 && inv.memory_mib > 0);
        assert_eq!(n.pool, "public");
    }
    let big_uuids: Vec<String> = node(&sched, "node-big")
        .await
        .inventory
        .unwrap()
        .gpus
        .into_iter()
        .map(|g| g.uuid)
        .collect();

    // A 4-GPU training job runs on the 8-GPU node and sees exactly 4 GPUs.
    let job = submit(
        &sched,
        training(
            4,
            &[
                "sh",
                "-c",
                "echo \"visible=$CUDA_VISIBLE_DEVICES\"; echo \"rank=$RANK\"",
            ],
        ),
    )
    .await
    .unwrap();
    let done = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    let inst = &done.instances[0];
    assert_eq!(inst.node_id, "node-big");
    assert_eq!(inst.gpu_indexes.len(), 4);
    assert_eq!(inst.exit_code, Some(0));
    let out = sched.cli(&["job", "logs", &job.job_id]);
    assert!(
        out.status.success(),
        "logs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8(out.stdout).unwrap();
    let visible = log
        .lines()
        .find_map(|l| l.strip_prefix("visible="))
        .unwrap_or_else(|| panic!("no visible= line in log {log:?}"));
    let seen: Vec<&str> = visible.split(',').collect();
    assert_eq!(seen.len(), 4, "CUDA_VISIBLE_DEVICES={visible}");
    assert!(
        seen.iter().all(|u| big_uuids.iter().any(|b| b == u)),
        "{visible} not on node-big"
    );
    assert_eq!(
        seen,
        inst.gpu_uuids
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    assert!(log.contains("rank=0"));

    // The CLI shows the same job as JSON.
    let out = sched.cli(&["job", "get", &job.job_id, "--output", "json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "Succeeded");
    assert_eq!(json["instances"][0]["node_id"], "node-big");

    // More GPUs than any node has: stays Queued with a reason.
    let huge = submit(&sched, training(16, &["true"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3 * HEARTBEAT_MS as u64)).await;
    let huge = get_job(&sched, &huge.job_id).await;
    assert_eq!(huge.state, pb::JobState::Queued as i32);
    assert!(huge.reason.contains("16 GPUs"), "reason: {}", huge.reason);
    assert!(huge.instances.is_empty());

    // Cancel kills the whole process group, a SIGTERM-ignoring child included.
    // The job has its own PID namespace: the test finds the child's host
    // pid by its command line.
    let script = "sh -c 'trap \"\" TERM; : stubborn-child; while true; do sleep 0.2; done' & \
         trap '' TERM; while true; do sleep 0.2; done";
    let long = submit(&sched, training(1, &["sh", "-c", &script]))
        .await
        .unwrap();
    wait_job(
        &sched,
        &long.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    let child_pid: i32 = eventually(Duration::from_secs(10), "the child's pid", || async {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).into_owned();
            (text.contains(": stubborn-child;") && !text.contains(" & ")).then_some(pid)
        })
    })
    .await;
    let leader_pid = {
        let j = get_job(&sched, &long.job_id).await;
        assert_eq!(j.instances.len(), 1);
        j.instances[0].clone()
    };
    assert!(!process_dead(child_pid));
    let out = sched.cli(&["job", "cancel", &long.job_id]);
    assert!(
        out.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cancelled = eventually(
        Duration::from_secs(15),
        "cancelled instance stopped",
        || async {
            let j = get_job(&sched, &long.job_id).await;
            (j.instances[0].state == pb::InstanceState::Stopped as i32).then_some(j)
        },
    )
    .await;
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert_eq!(cancelled.instances[0].node_id, leader_pid.node_id);
    eventually(
        Duration::from_secs(5),
        "SIGTERM-ignoring child killed",
        || async { process_dead(child_pid).then_some(()) },
    )
    .await;

    // Restarting the scheduler keeps nodes and jobs; agents reconnect alone.
    let before: Vec<(String, i32)> = {
        let mut c = sched.jobs().await;
        let jobs = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        jobs.into_iter().map(|j| (j.job_id, j.state)).collect()
    };
    assert_eq!(before.len(), 3);
    sched = sched.restart(dir.path()).await;
    let after: Vec<(String, i32)> = {
        let mut c = sched.jobs().await;
        let jobs = c
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        jobs.into_iter().map(|j| (j.job_id, j.state)).collect()
    };
    assert_eq!(before, after, "jobs changed across a restart");
    assert_eq!(
        list_nodes(&sched).await.len(),
        2,
        "nodes lost across a restart"
    );
    let restarted_at = gpupool_proto::unix_ms_from_timestamp(
        &node(&sched, "node-small").await.last_heartbeat.unwrap(),
    );
    eventually(
        Duration::from_secs(20),
        "agents reconnected (fresh heartbeats)",
        || async {
            let nodes = list_nodes(&sched).await;
            nodes
                .iter()
                .all(|n| {
                    n.status == READY
                        && gpupool_proto::unix_ms_from_timestamp(n.last_heartbeat.as_ref().unwrap())
                            > restarted_at
                })
                .then_some(())
        },
    )
    .await;
    // Work placed after the restart runs: the sessions are real.
    let again = submit(&sched, training(2, &["sh", "-c", "echo after-restart"]))
        .await
        .unwrap();
    wait_job(
        &sched,
        &again.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    let out = sched.cli(&["job", "logs", &again.job_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "after-restart");
    // The job that did not fit is still queued with its reason.
    let huge_after = get_job(&sched, &huge.job_id).await;
    assert_eq!(huge_after.state, pb::JobState::Queued as i32);

    // Killing an agent makes its node NotReady after the grace.
    big.proc.kill();
    let t0 = std::time::Instant::now();
    eventually(
        Duration::from_millis(u64::from(GRACE_MS) * 5),
        "node-big NotReady",
        || async { (node(&sched, "node-big").await.status == NOT_READY).then_some(()) },
    )
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(u64::from(GRACE_MS) / 2),
        "NotReady before the grace"
    );
    assert_eq!(node(&sched, "node-small").await.status, READY);
    drop(small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_job_is_placed_when_capacity_appears() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _small = Agent::start(dir.path(), &sched, "only-small", "2xA100-40GB");
    wait_ready(&sched, 1).await;
    let job = submit(&sched, training(4, &["sh", "-c", "echo placed-later"]))
        .await
        .unwrap();
    assert_eq!(job.state, pb::JobState::Queued as i32);
    assert!(job.reason.contains("largest has 2"), "{}", job.reason);
    let _big = Agent::start(dir.path(), &sched, "late-big", "4xA100-40GB");
    let done = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.instances[0].node_id, "late-big");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_reports_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start(dir.path(), &sched, "n1", "1xT4-16GB");
    let job = submit(&sched, training(0, &["sh", "-c", "echo bad >&2; exit 7"]))
        .await
        .unwrap();
    let failed = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(failed.instances[0].exit_code, Some(7));
    assert!(failed.reason.contains("code 7"), "{}", failed.reason);
    let out = sched.cli(&["job", "logs", &job.job_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bad");
}

/// Exceeding the memory limit gets the instance OOM-killed in its cgroup
/// and the job reports OOM; the node is unharmed. The agent runs with
/// `confinement = "required"`: where cgroups are not writable the job fails
/// to start instead of eating the machine's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_is_reported_as_oom() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start_with(
        dir.path(),
        &sched,
        "n1",
        "1xT4-16GB",
        "AZ1",
        "confinement = \"required\"",
    );
    wait_ready(&sched, 1).await;
    let mut spec = training(0, &["tail", "/dev/zero"]);
    spec.resources.as_mut().unwrap().memory_mib = 32;
    let job = submit(&sched, spec).await.unwrap();
    let failed = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Failed,
        Duration::from_secs(30),
    )
    .await;
    let reason = &failed.instances[0].reason;
    if reason.contains("no writable cgroup") || reason.contains("cannot create cgroup") {
        assert!(!in_ci(), "cgroups must be writable under CI: {reason}");
        eprintln!("SKIPPED CHECK: cgroups not writable here ({reason})");
        return;
    }
    assert!(reason.starts_with("OOM"), "{reason}");
    assert!(failed.reason.contains("OOM"), "{}", failed.reason);
    // The node still runs work.
    let ok = submit(&sched, training(0, &["true"])).await.unwrap();
    wait_job(
        &sched,
        &ok.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
}

/// An agent SIGKILLed and restarted (within the grace) does not lose its
/// instances: the job keeps running, is never Lost, and ends with its real
/// exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_reattaches_running_instances() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let mut agent = Agent::start(dir.path(), &sched, "n1", "1xT4-16GB");
    wait_ready(&sched, 1).await;
    let job = submit(
        &sched,
        training(1, &["sh", "-c", "sleep 3; echo finished; exit 4"]),
    )
    .await
    .unwrap();
    let running = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    agent.proc.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _agent = Agent::start(dir.path(), &sched, "n1", "1xT4-16GB");
    let done = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Failed,
        Duration::from_secs(30),
    )
    .await;
    let inst = &done.instances[0];
    assert_eq!(inst.exit_code, Some(4), "{inst:?}");
    assert_eq!(
        inst.started_at, running.instances[0].started_at,
        "the instance was reattached, not restarted"
    );
    let out = sched.cli(&["job", "logs", &job.job_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "finished");
}

/// A critical XID takes the GPU out of service: the scheduler places
/// nothing on it, and the node shows why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_xid_takes_a_gpu_out_of_service() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start(dir.path(), &sched, "xid-node", "2xA100-40GB");
    wait_ready(&sched, 1).await;
    // Failure injection into the fake GPUs: XID 79 on GPU 1.
    let inject = dir.path().join("agent-xid-node/state/inject-gpu-events");
    std::fs::write(&inject, "1 79\n").unwrap();
    let gpu = eventually(Duration::from_secs(20), "GPU 1 unhealthy", || async {
        let node = list_nodes(&sched).await.remove(0);
        node.inventory
            .unwrap()
            .gpus
            .into_iter()
            .find(|g| g.index == 1 && !g.healthy)
    })
    .await;
    assert!(
        gpu.health_reason.contains("XID 79") && gpu.health_reason.contains("reboot"),
        "{}",
        gpu.health_reason
    );
    // Two GPUs no longer fit; one does, on the healthy GPU.
    let two = submit(&sched, training(2, &["true"])).await.unwrap();
    let one = submit(&sched, training(1, &["true"])).await.unwrap();
    let done = wait_job(
        &sched,
        &one.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done.instances[0].gpu_indexes, vec![0]);
    assert_eq!(
        get_job(&sched, &two.job_id).await.state,
        pb::JobState::Queued as i32
    );
}

/// A 2-instance training job gets consistent torchrun-style variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_training_env_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start(dir.path(), &sched, "t1", "4xH100-80GB");
    wait_ready(&sched, 1).await;
    let mut spec = training(
        1,
        &[
            "sh",
            "-c",
            "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT",
        ],
    );
    spec.instances = 2;
    let job = submit(&sched, spec).await.unwrap();
    wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    let line = |rank: &str| {
        let out = sched.cli(&["job", "logs", &job.job_id, "--instance", rank]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (r0, r1) = (line("0"), line("1"));
    let f0: Vec<&str> = r0.split(' ').collect();
    let f1: Vec<&str> = r1.split(' ').collect();
    assert_eq!(&f0[..5], ["0", "2", "0", "2", "127.0.0.1"], "{r0}");
    assert_eq!(&f1[..5], ["1", "2", "1", "2", "127.0.0.1"], "{r1}");
    assert_eq!(f0[5], f1[5], "both ranks agree on MASTER_PORT");
    assert!(
        f0[5]
            .parse::<u32>()
            .is_ok_and(|p| (29_500..30_500).contains(&p)),
        "{r0}"
    );
}
