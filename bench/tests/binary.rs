//! The `gpupool-bench` binary itself: its subcommands and one small replay
//! with JSON output. (Having an integration test also makes `cargo test
//! --workspace` build the binary.)

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpupool-bench"))
}

#[test]
fn help_lists_the_benchmarks() {
    let out = bench().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["replay", "speed", "load", "churn"] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
}

#[test]
fn replay_prints_one_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.csv");
    let pods = dir.path().join("pods.csv");
    std::fs::write(
        &nodes,
        "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,96000,393216,8,V100M32\n",
    )
    .unwrap();
    std::fs::write(
        &pods,
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,8000,16384,1,1000\n\
         p1,4000,8192,1,500\np2,16000,32768,4,1000\np3,2000,4096,0,0\n",
    )
    .unwrap();
    let out = bench()
        .arg("replay")
        .arg("--nodes")
        .arg(&nodes)
        .arg("--pods")
        .arg(&pods)
        .args(["--policy", "fgd", "--seed", "42", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["policy"], "fgd");
    assert_eq!(v["seed"], 42);
    assert_eq!(v["capacity_milli"], 10_000);
    assert_eq!(v["nodes_file"], nodes.display().to_string());
    assert!(v["replay_ms"].is_number(), "{v}");
}

#[test]
fn missing_trace_file_is_named() {
    let out = bench()
        .args([
            "replay",
            "--nodes",
            "/nonexistent/nodes.csv",
            "--pods",
            "/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nodes.csv"));
}

/// `churn` on a tiny workload: a real dev cluster, 20 jobs from 2 clients of
/// each kind. It needs the `gpupool-scheduler` and `gpupool` binaries next
/// to `gpupool-bench` (`cargo build -p gpupool-scheduler -p gpupool-cli`,
/// or `cargo test --workspace`, builds them); without them the test says so
/// and passes, except under `CI=true`, where it fails.
#[test]
fn churn_small_workload_is_consistent() {
    let dir = std::path::Path::new(env!("CARGO_BIN_EXE_gpupool-bench"))
        .parent()
        .unwrap()
        .to_path_buf();
    let missing: Vec<_> = ["gpupool-scheduler", "gpupool"]
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| !p.is_file())
        .collect();
    if !missing.is_empty() {
        let msg = format!(
            "churn test needs {missing:?}: build them with \
             `cargo build -p gpupool-scheduler -p gpupool-cli` (same profile)"
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let out = bench()
        .args([
            "churn",
            "--jobs",
            "20",
            "--clients",
            "2",
            "--client",
            "cli,grpc",
            "--reps",
            "1",
            "--idle-jobs",
            "3",
            "--timeout-secs",
            "120",
            "--output",
            "json",
        ])
        .arg("--bin-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["kind"], "header", "{text}");
    assert_eq!(lines[0]["jobs"], 20);
    let rows: Vec<&serde_json::Value> = lines.iter().filter(|v| v["kind"] == "churn").collect();
    assert_eq!(rows.len(), 2, "{text}");
    for (row, client) in rows.iter().zip(["cli", "grpc"]) {
        assert_eq!(row["client"], client, "{row}");
        assert_eq!(row["build"], "current", "{row}");
        assert_eq!(row["clients"], 2, "{row}");
        assert_eq!(row["accepted"], 20, "{row}");
        assert_eq!(row["completed"], 20, "{row}");
        for positive in [
            "accepted_per_s",
            "completed_per_s",
            "submit_p50_ms",
            "submit_p99_ms",
            "dev_cpu_ms_per_job",
            "rss_mib",
        ] {
            let v = row[positive].as_f64().unwrap_or(f64::NAN);
            assert!(v > 0.0 && v.is_finite(), "{positive} = {v} in {row}");
        }
        let (p50, p99) = (
            row["submit_p50_ms"].as_f64().unwrap(),
            row["submit_p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 <= p99, "{row}");
        // Submissions are acknowledged before they complete.
        assert!(
            row["accepted_per_s"].as_f64().unwrap() >= row["completed_per_s"].as_f64().unwrap(),
            "{row}"
        );
        assert_eq!(row["queue_series"].as_array().unwrap().len(), 11, "{row}");
        assert!(row["queue_max"].as_f64().unwrap() <= 20.0, "{row}");
    }
    let idle: Vec<&serde_json::Value> = lines.iter().filter(|v| v["kind"] == "idle").collect();
    assert_eq!(idle.len(), 1, "{text}");
    let client_p50 = idle[0]["client_p50_ms"].as_f64().unwrap();
    assert!(client_p50 > 0.0, "{}", idle[0]);
}

/// The `gpupool-scheduler` that `load` runs: the one cargo built next to
/// this binary. Missing (only this package built): skipped loudly, but
/// under CI a failure.
fn scheduler_beside_bench() -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_gpupool-bench"))
        .with_file_name("gpupool-scheduler");
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: build it (`cargo build -p gpupool-scheduler`) to run the load test",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

#[test]
fn load_with_churning_instances_completes_jobs() {
    if scheduler_beside_bench().is_none() {
        return;
    }
    let out = bench()
        .args([
            "load",
            "--nodes",
            "20",
            "--seconds",
            "3",
            "--rate",
            "20",
            "--heartbeat-ms",
            "500",
            "--preload-jobs",
            "10",
            "--instance-seconds",
            "fixed:1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "20 nodes: instances fixed:1: jobs completed 12.3/s (37 in the window"
    let completed: u64 = text
        .split_once("jobs completed ")
        .and_then(|(_, rest)| rest.split_once(" in the window"))
        .and_then(|(head, _)| head.rsplit_once('(')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no completions in:\n{text}"));
    assert!(completed > 0, "{text}");
    assert!(text.contains("restart to serving"), "{text}");
}

#[test]
fn load_refuses_a_bad_instance_distribution() {
    let out = bench()
        .args(["load", "--instance-seconds", "normal:3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exp:MEAN"));
}
