//! The shipped dashboard under a real Prometheus server (Debian's
//! `prometheus`) scraping a scheduler and an agent with a running GPU job:
//! every panel's query and variable is valid and answers what the panel
//! means — busy GPUs are the job's GPU only, the job variable lists gpupool
//! jobs (not scrape jobs), and no label arrives renamed `exported_*`.

use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One instant query: the result vector.
async fn query(port: u16, q: &str) -> Vec<serde_json::Value> {
    let body = http_get(port, &format!("/api/v1/query?query={}", encode(q))).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{q}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_answers_under_a_real_prometheus() {
    let Some(prometheus) = require_tool("prometheus", "prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let agent = Agent::start_with_metrics(dir.path(), &sched, "prom-node", "2xH100-80GB");
    wait_ready(&sched, 1).await;
    let job = submit(&sched, training(1, &["sleep", "120"]))
        .await
        .unwrap();
    wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;

    // A standard scrape: Prometheus adds its own `job` and `instance`.
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: gpupool-scheduler\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n\
             \x20 - job_name: gpupool-agent\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            sched.metrics_port, agent.metrics_port
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let _prom = Proc::spawn(cmd, dir.path().join("prometheus.log"));
    // Both targets up, with a few samples each (rates need two).
    eventually(Duration::from_secs(30), "both targets scraped", || async {
        // Prometheus listens before it is ready (503 until its TSDB is up).
        let ready = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            stream
                .write_all(b"GET /-/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await
                .ok()?;
            let mut buf = String::new();
            stream.read_to_string(&mut buf).await.ok()?;
            (buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")).then_some(())
        };
        ready.await?;
        let up = query(port, "up == 1").await;
        (up.len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/gpupool.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Grafana's substitution: "All" is `.*`; the job is the running one.
    let fill = |expr: &str| {
        expr.replace("$pool", ".*")
            .replace("$node", ".*")
            .replace("$job", &job.job_id)
    };
    // Queries that filter for trouble answer nothing on a healthy node.
    let may_be_empty = ["== 0", "> 0"];
    let mut answered = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = fill(t["expr"].as_str().unwrap());
            let result = query(port, &expr).await;
            if !may_be_empty.iter().any(|m| expr.contains(m)) {
                assert!(
                    !result.is_empty(),
                    "{}: {expr} answered nothing",
                    panel["title"]
                );
            }
            for series in &result {
                let labels = series["metric"].as_object().unwrap();
                assert!(
                    !labels.keys().any(|k| k.starts_with("exported_")),
                    "{expr}: a label clashed with a target label: {series}"
                );
            }
            answered += 1;
        }
    }
    assert!(answered >= 30, "{answered}");

    // What the panels mean: one busy GPU (the job's), in the public pool.
    let busy = query(
        port,
        &fill("count by (pool) (DCGM_FI_DEV_GPU_UTIL{pool=~\"$pool\", gpupool_job!=\"\"})"),
    )
    .await;
    assert_eq!(busy.len(), 1, "{busy:?}");
    assert_eq!(busy[0]["metric"]["pool"], "public");
    assert_eq!(
        busy[0]["value"][1], "1",
        "idle GPUs counted as busy: {busy:?}"
    );
    let per_job = query(
        port,
        &fill("DCGM_FI_DEV_GPU_UTIL{gpupool_job=~\".*$job.*\"}"),
    )
    .await;
    assert_eq!(per_job.len(), 1, "{per_job:?}");
    assert_eq!(
        per_job[0]["metric"]["job"], "gpupool-agent",
        "the scrape job stays"
    );
    // The job variable lists gpupool jobs, not scrape jobs.
    let var = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "job")
        .unwrap()["definition"]
        .as_str()
        .unwrap()
        .to_string();
    let inner = var
        .strip_prefix("label_values(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap();
    let (selector, label) = inner.rsplit_once(", ").unwrap();
    let body = http_get(
        port,
        &format!("/api/v1/label/{label}/values?match[]={}", encode(selector)),
    )
    .await;
    let values: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(values["data"], serde_json::json!([job.job_id]), "{body}");
}
