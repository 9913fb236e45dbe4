//! Snapshots end to end, through the real binaries: `snapshot save` while
//! submissions stream in, then the scheduler stopped, the snapshot
//! restored over its database (`--force`), and the scheduler started
//! again: every job acknowledged before the save is there, nothing that was
//! never acknowledged is, the agent reconnects and its running instance is
//! reattached (same instance, still running), tokens still authenticate,
//! and the audit trail is there. A damaged snapshot or a full target is
//! refused, and a refused restore changes nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

fn snapshot(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("gpupool-scheduler"))
        .arg("snapshot")
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_under_load_restores_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _agent = Agent::start(dir.path(), &sched, "s1", "2xH100-80GB");
    wait_ready(&sched, 1).await;
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "acme", 1, 2).await;
    let long = submit(&sched, training(1, &["sleep", "300"]))
        .await
        .unwrap();
    let running = wait_job(
        &sched,
        &long.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    let config = sched.config_path.clone();

    // A stream of submissions, each id kept once acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stream = {
        let (acked, ch) = (acked.clone(), sched.channel().await);
        tokio::spawn(async move {
            let mut jobs = pb::job_service_client::JobServiceClient::with_interceptor(
                ch,
                Bearer::new(ADMIN_TOKEN),
            );
            for _ in 0..120 {
                let job = jobs
                    .submit_job(pb::SubmitJobRequest {
                        spec: Some(training(0, &["true"])),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                acked.lock().unwrap().push(job.job_id);
            }
        })
    };
    while acked.lock().unwrap().len() < 30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before: Vec<String> = acked.lock().unwrap().clone();
    let file = dir.path().join("cluster.snapshot");
    let file_s = file.to_str().unwrap().to_string();
    let config_s = config.to_str().unwrap().to_string();
    let saved = snapshot(&["save", &file_s, "--config", &config_s]);
    assert!(saved.status.success(), "{}", text(&saved));
    stream.await.unwrap();
    let all: Vec<String> = acked.lock().unwrap().clone();
    assert_eq!(all.len(), 120);

    // Refused while the database holds anything; a damaged copy refused
    // even with --force, before the database is touched.
    let refused = snapshot(&["restore", &file_s, "--config", &config_s]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("not empty"), "{}", text(&refused));
    let damaged = dir.path().join("damaged.snapshot");
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&damaged, original.replacen("acme", "acmf", 1)).unwrap();
    let refused = snapshot(&[
        "restore",
        damaged.to_str().unwrap(),
        "--config",
        &config_s,
        "--force",
    ]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("damaged"), "{}", text(&refused));

    // Stop, restore over the database, start again.
    let sched = sched
        .restart_after(dir.path(), |_| {
            let restored = snapshot(&["restore", &file_s, "--config", &config_s, "--force"]);
            assert!(restored.status.success(), "{}", text(&restored));
            assert!(
                text(&restored).contains("moved the old database aside"),
                "{}",
                text(&restored)
            );
        })
        .await;
    let listed = sched.cli(&["job", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let ids: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect();
    for id in &before {
        assert!(
            ids.contains(id),
            "{id}, acknowledged before the save, is missing"
        );
    }
    for id in &ids {
        assert!(
            *id == long.job_id || all.contains(id),
            "{id} was never acknowledged"
        );
    }
    // The agent reconnects; its instance is the same and still runs.
    let after = eventually(
        Duration::from_secs(20),
        "the long job reattached",
        || async {
            let j = get_job(&sched, &long.job_id).await;
            let nodes = list_nodes(&sched).await;
            (j.state == pb::JobState::Running as i32
                && nodes
                    .iter()
                    .any(|n| n.status == pb::NodeStatus::Ready as i32))
            .then_some(j)
        },
    )
    .await;
    assert_eq!(
        after.instances[0].instance_id,
        running.instances[0].instance_id
    );
    assert_eq!(
        after.instances[0].started_at,
        running.instances[0].started_at
    );
    // The tenant's token, and the audit trail, came back too.
    let who = sched.cli_as(&token, &["whoami"]);
    assert!(
        String::from_utf8_lossy(&who.stdout).contains("acme"),
        "{}",
        text(&who)
    );
    let trail = sched.cli(&["audit", "list", "-o", "json"]);
    let trail: serde_json::Value = serde_json::from_slice(&trail.stdout).unwrap();
    assert!(
        trail
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["method"] == "TenantService/CreateTenant"),
        "{trail:#}"
    );
    // New work runs.
    let fresh = submit(&sched, training(0, &["true"])).await.unwrap();
    wait_job(
        &sched,
        &fresh.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;

    // `--data-dir` instead of a config (as for `dev`): the same database.
    let toml = std::fs::read_to_string(&config).unwrap();
    let data_dir = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("data_dir = "))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap();
    let again = dir.path().join("again.snapshot");
    let by_dir = snapshot(&["save", again.to_str().unwrap(), "--data-dir", &data_dir]);
    assert!(by_dir.status.success(), "{}", text(&by_dir));
    assert!(
        std::fs::read_to_string(&again)
            .unwrap()
            .contains(&fresh.job_id),
        "the snapshot by --data-dir misses the newest job"
    );
}
