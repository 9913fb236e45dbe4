//! End-to-end: each job kind with real agents (fake GPUs), real processes
//! (the `standin` servers) and real gRPC. A training job on a node that
//! dies is requeued by its policy in `faults.rs` (network cut).

use std::time::{Duration, Instant};

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

fn standin() -> String {
    job_visible(&bin("standin")).display().to_string()
}

/// GET `http://<endpoint><path>`: (status, body), None when nothing answers.
async fn http(endpoint: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(endpoint),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut buf))
        .await
        .ok()?
        .ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `http://host:port/rest` -> ("host:port", "/rest").
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let slash = rest.find('/').unwrap_or(rest.len());
    (rest[..slash].to_string(), rest[slash..].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notebook_url_answers_and_an_idle_notebook_is_culled() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_config(
        dir.path(),
        "[kinds.notebook]\nidle_timeout_secs = 3\ncpu_milli = 200\nmemory_mib = 128\n",
    )
    .await;
    let _a = Agent::start(dir.path(), &sched, "nb1", "1xH100-80GB");
    wait_ready(&sched, 1).await;
    // The operator's settings, as `job kinds` shows them.
    let kinds: serde_json::Value =
        serde_json::from_str(&cli_ok(&sched, &["job", "kinds", "-o", "json"])).unwrap();
    let nb = kinds
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "notebook")
        .unwrap();
    assert_eq!(nb["idle_timeout_secs"], 3);
    assert_eq!(
        nb["resources"]["gpu_milli"], 250,
        "fractional GPU by default"
    );
    assert_eq!(nb["resources"]["cpu_milli"], 200);

    let started = Instant::now();
    let out = cli_ok(
        &sched,
        &[
            "job",
            "submit",
            "--kind",
            "notebook",
            "--",
            &standin(),
            "notebook",
        ],
    );
    let job_id = out.split_whitespace().nth(1).unwrap().to_string();
    let job = eventually(Duration::from_secs(20), "notebook URL", || async {
        let j = get_job(&sched, &job_id).await;
        (!j.url.is_empty()).then_some(j)
    })
    .await;
    assert_eq!(
        job.spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .gpu_milli,
        250
    );
    let url = cli_ok(&sched, &["notebook", "open", &job_id])
        .trim()
        .to_string();
    assert_eq!(url, job.url);
    assert!(url.contains("?token="), "{url}");
    let (endpoint, path) = split_url(&url);
    assert!(endpoint.starts_with("127.0.0.1:"), "{endpoint}");
    // The URL answers; a wrong token does not get in.
    let answer = eventually(Duration::from_secs(10), "notebook answers", || async {
        http(&endpoint, &path).await
    })
    .await;
    assert_eq!(answer.0, 200, "{answer:?}");
    assert_eq!(http(&endpoint, "/?token=wrong").await.unwrap().0, 403);

    // No kernel activity, no GPU use: stopped after the idle timeout.
    let culled = wait_job(
        &sched,
        &job_id,
        pb::JobState::Cancelled,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        culled.reason.starts_with("culled: idle for"),
        "{}",
        culled.reason
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(culled.url.is_empty());
    eventually(Duration::from_secs(10), "notebook process gone", || async {
        http(&endpoint, &path).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instance_training_ranks_meet_at_the_master_port() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start(dir.path(), &sched, "w1", "1xH100-80GB");
    let _b = Agent::start(dir.path(), &sched, "w2", "1xH100-80GB");
    wait_ready(&sched, 2).await;
    let mut spec = training(1, &[&standin(), "rendezvous"]);
    spec.instances = 2;
    let job = submit(&sched, spec).await.unwrap();
    let done = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(40),
    )
    .await;
    let nodes: std::collections::BTreeSet<&str> =
        done.instances.iter().map(|i| i.node_id.as_str()).collect();
    assert_eq!(
        nodes.len(),
        2,
        "one GPU per node: the ranks are on two nodes"
    );
    let log = |rank: &str| cli_ok(&sched, &["job", "logs", &job.job_id, "--instance", rank]);
    assert!(
        log("0").contains("rendezvous complete: 2 ranks"),
        "{}",
        log("0")
    );
    assert!(
        log("1").contains("rank 1 reached 127.0.0.1:"),
        "{}",
        log("1")
    );
}

/// Ready endpoints of a service as `service endpoints -o json` lists them.
fn endpoints(s: &Scheduler, job_id: &str) -> Vec<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(s, &["service", "endpoints", job_id, "-o", "json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["instance_id"].as_str().unwrap().to_string(),
                e["endpoint"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn current_ids(j: &pb::Job) -> Vec<String> {
    j.instances
        .iter()
        .filter(|i| !i.replaced)
        .map(|i| i.instance_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_replicas_are_health_gated_restarted_and_rolled() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(dir.path(), &sched, &format!("s{i}"), "1xH100-80GB"))
        .collect();
    wait_ready(&sched, 3).await;
    let out = cli_ok(
        &sched,
        &[
            "job",
            "submit",
            "--kind",
            "online-service",
            "--instances",
            "3",
            "--cpu",
            "100m",
            "--memory",
            "64",
            "--health-http",
            "/healthz",
            "--health-interval-ms",
            "200",
            "--health-failures",
            "1",
            "--env",
            "READY_AFTER_MS=1500",
            "--",
            &standin(),
            "service",
        ],
    );
    let job_id = out.split_whitespace().nth(1).unwrap().to_string();

    // Running before ready: the health check gates the endpoints, and
    // every endpoint listed answers its health check.
    let running = eventually(Duration::from_secs(20), "replicas running", || async {
        let j = get_job(&sched, &job_id).await;
        (j.instances
            .iter()
            .filter(|i| i.state == pb::InstanceState::Running as i32)
            .count()
            == 3)
            .then_some(j)
    })
    .await;
    assert!(
        running.ready_replicas < 3,
        "not ready within READY_AFTER_MS"
    );
    let nodes: std::collections::BTreeSet<&str> = running
        .instances
        .iter()
        .map(|i| i.node_id.as_str())
        .collect();
    assert_eq!(nodes.len(), 3, "replicas spread over the three nodes");
    eventually(Duration::from_secs(20), "3 endpoints", || async {
        let eps = endpoints(&sched, &job_id);
        for (_, ep) in &eps {
            assert_eq!(http(ep, "/healthz").await.map(|a| a.0), Some(200), "{ep}");
        }
        (eps.len() == 3).then_some(())
    })
    .await;
    for (id, ep) in endpoints(&sched, &job_id) {
        assert_eq!(
            http(&ep, "/").await.unwrap().1,
            id,
            "each endpoint is its replica"
        );
    }

    // A replica dies: it is restarted (after its backoff) and ready again.
    let (victim, ep) = endpoints(&sched, &job_id).remove(1);
    let _ = http(&ep, "/crash").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        let j = get_job(&sched, &job_id).await;
        if j.restarts == 1 && j.ready_replicas == 3 {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "replica never restarted: {j:#?}\n{}",
            sched.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!current_ids(&restarted).contains(&victim));
    let old = restarted
        .instances
        .iter()
        .find(|i| i.instance_id == victim)
        .unwrap();
    assert_eq!(old.exit_code, Some(3));

    // Rolling restart: every replica replaced, never fewer than 2 ready.
    let before = current_ids(&restarted);
    cli_ok(&sched, &["service", "restart", &job_id]);
    let mut min_ready = u32::MAX;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = get_job(&sched, &job_id).await;
        min_ready = min_ready.min(j.ready_replicas);
        let ids = current_ids(&j);
        if j.ready_replicas == 3 && ids.iter().all(|id| !before.contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "rolling restart stuck: {j:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(min_ready >= 2, "ready replicas fell to {min_ready}");

    // Scale down to one replica.
    cli_ok(&sched, &["service", "scale", &job_id, "--replicas", "1"]);
    eventually(Duration::from_secs(20), "scaled to 1", || async {
        let j = get_job(&sched, &job_id).await;
        let live = j
            .instances
            .iter()
            .filter(|i| i.state == pb::InstanceState::Running as i32)
            .count();
        (live == 1 && endpoints(&sched, &job_id).len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_service_completes_and_max_runtime_stops_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _a = Agent::start(dir.path(), &sched, "b1", "1xH100-80GB");
    wait_ready(&sched, 1).await;
    let out = cli_ok(
        &sched,
        &[
            "job",
            "submit",
            "--kind",
            "batch-service",
            "--instances",
            "2",
            "--completions",
            "5",
            "--cpu",
            "100m",
            "--memory",
            "64",
            "--",
            "sh",
            "-c",
            "sleep 0.3",
        ],
    );
    let job_id = out.split_whitespace().nth(1).unwrap().to_string();
    let done = wait_job(
        &sched,
        &job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(done.succeeded, 5);
    assert_eq!(done.instances.len(), 5);
    let detail = cli_ok(&sched, &["job", "get", &job_id]);
    assert!(detail.contains("5 of 5 succeeded"), "{detail}");

    let mut spec = training(0, &["sleep", "60"]);
    spec.max_runtime_secs = 2;
    let job = submit(&sched, spec).await.unwrap();
    let failed = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Failed,
        Duration::from_secs(20),
    )
    .await;
    assert!(failed.reason.contains("timeout"), "{}", failed.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorboard_serves_a_training_jobs_log_dir() {
    let dir = tempfile::tempdir().unwrap();
    // Relative to the tenant's directory on the node.
    let logs = std::path::PathBuf::from("run-logs");
    let sched = Scheduler::start_with_config(
        dir.path(),
        &format!(
            "[kinds.tensorboard]\ncommand = [\"{}\", \"service\"]\ncpu_milli = 100\nmemory_mib = 64\n",
            standin()
        ),
    )
    .await;
    let _a = Agent::start(dir.path(), &sched, "tb1", "1xH100-80GB");
    wait_ready(&sched, 1).await;
    let train = cli_ok(
        &sched,
        &[
            "job",
            "submit",
            "--log-dir",
            logs.to_str().unwrap(),
            "--cpu",
            "100m",
            "--memory",
            "64",
            "--",
            "sh",
            "-c",
            "echo $GPUPOOL_LOG_DIR; sleep 30",
        ],
    );
    let train_id = train.split_whitespace().nth(1).unwrap().to_string();
    let out = cli_ok(
        &sched,
        &[
            "tensorboard",
            "start",
            "--job",
            &train_id,
            "--cpu",
            "100m",
            "--memory",
            "64MiB",
        ],
    );
    let tb_id = out.split_whitespace().nth(1).unwrap().to_string();
    let url = eventually(Duration::from_secs(20), "tensorboard URL", || async {
        let j = get_job(&sched, &tb_id).await;
        (!j.url.is_empty()).then_some(j.url)
    })
    .await;
    assert_eq!(cli_ok(&sched, &["tensorboard", "open", &tb_id]).trim(), url);
    let tb = get_job(&sched, &tb_id).await;
    assert_eq!(tb.spec.as_ref().unwrap().log_dir, logs.to_str().unwrap());
    let res = tb.spec.as_ref().unwrap().resources.clone().unwrap();
    assert_eq!((res.cpu_milli, res.memory_mib), (100, 64), "--cpu/--memory");
    let (endpoint, _) = split_url(&url);
    let answer = eventually(Duration::from_secs(10), "tensorboard answers", || async {
        http(&endpoint, "/").await
    })
    .await;
    assert_eq!(answer.0, 200);
    let log = cli_ok(&sched, &["job", "logs", &train_id]);
    let tenant_dir = dir.path().join("agent-tb1/state/tenants").join(&tb.tenant);
    assert_eq!(log.trim(), tenant_dir.join(&logs).to_str().unwrap());
    // A path that is not a training job is refused clearly.
    let bad = sched.cli(&["tensorboard", "start", "--job", &tb_id]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("a tensorboard serves a training job"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// The real JupyterLab behind the notebook kind's default command, with
/// its activity read from the Jupyter server API. Needs `jupyter` on the
/// PATH (`pip install jupyterlab`); run with
/// `cargo test -p gpupool-e2e --test kinds -- --ignored real_jupyterlab`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs JupyterLab installed (pip install jupyterlab)"]
async fn real_jupyterlab_is_served_and_culled_by_kernel_api_activity() {
    assert!(
        std::process::Command::new("jupyter")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "jupyter is not on the PATH: pip install jupyterlab"
    );
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_config(
        dir.path(),
        // The built-in command plus --allow-root: the test agent runs
        // instances as root, which JupyterLab refuses by default.
        "[kinds.notebook]\nidle_timeout_secs = 10\ncpu_milli = 500\nmemory_mib = 1024\n\
         command = [\"jupyter\", \"lab\", \"--no-browser\", \"--ip=0.0.0.0\", \"--port={port}\", \
         \"--allow-root\"]\n",
    )
    .await;
    let _a = Agent::start(dir.path(), &sched, "jl1", "1xH100-80GB");
    wait_ready(&sched, 1).await;
    // No command: the kind's, `jupyter lab ... --port={port}` (the token in
    // JUPYTER_TOKEN).
    let out = cli_ok(&sched, &["job", "submit", "--kind", "notebook"]);
    let job_id = out.split_whitespace().nth(1).unwrap().to_string();
    let url = eventually(Duration::from_secs(30), "notebook URL", || async {
        let j = get_job(&sched, &job_id).await;
        (!j.url.is_empty()).then_some(j.url)
    })
    .await;
    let (endpoint, path) = split_url(&url);
    let token = path.split("token=").nth(1).unwrap().to_string();
    let answer = eventually(Duration::from_secs(60), "JupyterLab answers", || async {
        http(&endpoint, &path).await.filter(|a| a.0 != 0)
    })
    .await;
    assert!(matches!(answer.0, 200 | 302), "{answer:?}");
    let status = http(&endpoint, &format!("/api/status?token={token}"))
        .await
        .unwrap();
    assert_eq!(status.0, 200, "{status:?}");
    assert!(status.1.contains("last_activity"), "{status:?}");
    // A user request is activity: the notebook is culled 10 s after it,
    // not 10 s after its start (it answered within those).
    let started = get_job(&sched, &job_id).await.instances[0]
        .started_at
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let poked = Instant::now();
    let answer = http(&endpoint, &format!("/api/contents?token={token}")).await;
    assert_eq!(answer.as_ref().map(|a| a.0), Some(200), "{answer:?}");
    let culled = wait_job(
        &sched,
        &job_id,
        pb::JobState::Cancelled,
        Duration::from_secs(40),
    )
    .await;
    assert!(
        culled.reason.starts_with("culled: idle for"),
        "{}",
        culled.reason
    );
    assert!(
        poked.elapsed() >= Duration::from_secs(10),
        "culled {:?} after the user request (started at {started:?})",
        poked.elapsed(),
    );
}
