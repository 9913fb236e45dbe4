//! Stranded capacity end to end (`gpupool capacity`, the metric
//! `gpupool_gpus_stranded_milli`): a job that stays queued because CPU,
//! not GPU, is short shows the free GPU under cause `cpu` on the node that
//! has it; a cordoned node's GPU is `unschedulable`; a tenant judges by its
//! own queued jobs only.

use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;
use serde_json::Value;

fn json_of(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_short_of_cpu_shows_its_gpus_stranded_by_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _busy = Agent::start(dir.path(), &sched, "busy", "2xH100-80GB");
    let _off = Agent::start(dir.path(), &sched, "off", "1xH100-80GB");
    wait_ready(&sched, 2).await;
    let out = sched.cli(&["node", "cordon", "off"]);
    assert!(out.status.success());
    let cores = list_nodes(&sched)
        .await
        .iter()
        .find(|n| n.node_id == "busy")
        .unwrap()
        .inventory
        .as_ref()
        .unwrap()
        .cpu_cores;
    // One GPU and all but 100m of the node's CPU, then one GPU and 500m:
    // the second waits for CPU while a GPU is free.
    let mut hog = training(1, &["sleep", "300"]);
    hog.resources.as_mut().unwrap().cpu_milli = i64::from(cores) * 1000 - 100;
    let hog = submit(&sched, hog).await.unwrap();
    wait_job(
        &sched,
        &hog.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    let mut waiting = training(1, &["true"]);
    waiting.resources.as_mut().unwrap().cpu_milli = 500;
    let waiting = submit(&sched, waiting).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get_job(&sched, &waiting.job_id).await.state,
        pb::JobState::Queued as i32
    );

    let report = json_of(sched.cli(&["capacity", "--pool", "public", "-o", "json"]));
    let public = &report[0];
    assert_eq!(public["pool_id"], "public", "{report:#}");
    assert_eq!(public["basis"], "queued");
    assert_eq!(public["queued_jobs"], 1);
    assert_eq!(public["gpus_milli"], 3000);
    assert_eq!(public["free_milli"], 2000);
    assert_eq!(public["causes_milli"]["cpu"], 1000, "{report:#}");
    assert_eq!(public["causes_milli"]["unschedulable"], 1000);
    assert_eq!(public["stranded_milli"], 2000);
    let node = |id: &str| {
        public["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {report:#}"))
    };
    assert_eq!(node("busy")["causes_milli"]["cpu"], 1000);
    assert_eq!(node("off")["causes_milli"]["unschedulable"], 1000);
    let table = sched.cli(&["capacity"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("busy") && l.trim_end().ends_with("cpu")),
        "{table}"
    );

    // The metric says the same.
    let metrics = http_get(sched.metrics_port, "/metrics").await;
    for (cause, milli) in [("cpu", 1000), ("unschedulable", 1000), ("usable", 0)] {
        let series =
            format!("gpupool_gpus_stranded_milli{{cause=\"{cause}\",pool=\"public\"}} {milli}");
        assert!(metrics.contains(&series), "no {series:?} in:\n{metrics}");
    }

    // A tenant with nothing queued is judged by the typical shapes, not by
    // the admin's queued job.
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "acme", 1, 4).await;
    let theirs = json_of(sched.cli_as(&token, &["capacity", "-o", "json"]));
    assert_eq!(theirs[0]["basis"], "typical", "{theirs:#}");
    assert_eq!(theirs[0]["queued_jobs"], 0);
    // Once the CPU is back, the queued job starts: nothing stranded by CPU.
    sched.cli(&["job", "cancel", &hog.job_id]);
    wait_job(
        &sched,
        &waiting.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    // (A report is served again for up to a second: ask until it is new.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = json_of(sched.cli(&["capacity", "--pool", "public", "-o", "json"]));
        if after[0]["causes_milli"]["cpu"] == 0 || std::time::Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(after[0]["causes_milli"]["cpu"], 0, "{after:#}");
    assert_eq!(after[0]["basis"], "typical");
}
