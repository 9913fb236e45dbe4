//! `gpupool node drain` end to end, through the real binaries: a training
//! job with a retry moves to the other node without spending its retry, a
//! job without retries stays until `--force`, the command waits until the
//! node is empty, and `uncordon` ends the drain.

use std::time::Duration;

use gpupool_e2e::*;
use serde_json::Value;

fn json_of(out: std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_drain_moves_training_off_and_stops_the_rest_only_when_forced() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _agents: Vec<Agent> = ["n1", "n2"]
        .iter()
        .map(|id| Agent::start(dir.path(), &sched, id, "1xH100-80GB"))
        .collect();
    wait_ready(&sched, 2).await;
    json_of(
        sched.cli(&["node", "cordon", "n2", "-o", "json"]),
        "cordon n2",
    );
    let submit = |extra: &[&str]| {
        let mut args = vec![
            "job",
            "submit",
            "--kind",
            "training",
            "--gpu-milli",
            "500",
            "--cpu",
            "100m",
            "--memory",
            "64MiB",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sleep", "300"]);
        json_of(sched.cli(&args), "submit")["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let movable = submit(&["--max-retries", "1"]);
    let pinned = submit(&[]);
    let job = |id: &str| json_of(sched.cli(&["job", "get", id, "-o", "json"]), "job get");
    let on = |j: &Value| -> Vec<String> {
        j["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "Running")
            .map(|i| i["node_id"].as_str().unwrap().to_string())
            .collect()
    };
    until("both jobs running on n1", || {
        on(&job(&movable)) == ["n1"] && on(&job(&pinned)) == ["n1"]
    })
    .await;
    json_of(
        sched.cli(&["node", "uncordon", "n2", "-o", "json"]),
        "uncordon n2",
    );

    let n = json_of(
        sched.cli(&["node", "drain", "n1", "--no-wait", "-o", "json"]),
        "drain",
    );
    assert_eq!(
        (n["cordoned"].as_bool(), n["draining"].as_bool()),
        (Some(true), Some(true)),
        "{n}"
    );
    until("the job with a retry runs on n2", || {
        on(&job(&movable)) == ["n2"]
    })
    .await;
    let moved = job(&movable);
    assert_eq!(moved["retries"], 1, "{moved}");
    assert!(
        moved["instances"].as_array().unwrap().len() >= 2,
        "its run on n1 stays in its history: {moved}"
    );
    // The one without retries stays: it waits for --force or a deadline.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(on(&job(&pinned)), ["n1"]);

    // Forced, the command returns once the node is empty.
    let out = sched.cli(&["node", "drain", "n1", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("drained"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stopped = job(&pinned);
    assert_eq!(stopped["state"], "Cancelled", "{stopped}");
    assert!(
        stopped["reason"].as_str().unwrap().contains("drained"),
        "{stopped}"
    );
    let node = json_of(sched.cli(&["node", "get", "n1", "-o", "json"]), "node get");
    assert_eq!(node["draining"], true);
    // The drain calls are in the audit trail.
    let trail = json_of(
        sched.cli(&["audit", "list", "--node", "n1", "-o", "json"]),
        "audit",
    );
    let drains = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["method"] == "NodeService/DrainNode")
        .count();
    assert_eq!(drains, 2, "{trail:#}");
    // Uncordon ends it.
    let n = json_of(
        sched.cli(&["node", "uncordon", "n1", "-o", "json"]),
        "uncordon",
    );
    assert_eq!(
        (n["cordoned"].as_bool(), n["draining"].as_bool()),
        (Some(false), Some(false)),
        "{n}"
    );
}
