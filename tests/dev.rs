//! The first hour: `gpupool-scheduler dev` shows the whole product on one
//! machine. Three local nodes over three zones, a config file, then through
//! the real CLI a tenant, a train pool and a deploy pool, jobs in both,
//! scaling, conversion to a subscription, unsubscribing, deleting; Ctrl-C
//! (SIGINT) leaves no instance running.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gpupool_e2e::*;

const ADMIN: &str = "dev-test-admin-token-0123456789";

use gpupool_e2e::{cli_at as cli, cli_ok_at as ok};

fn json(addr: &str, token: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&ok(addr, token, &all)).unwrap()
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) && !process_dead(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn start_dev(dir: &Path, config: &Path, grpc: u16) -> Proc {
    let mut cmd = Command::new(bin("gpupool-scheduler"));
    cmd.arg("dev")
        .args(["--nodes", "3", "--fake-gpus", "2xA100-40GB"])
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--console-listen", &format!("127.0.0.1:{}", free_port())])
        // Any free ports: three consecutive ones from a free one may not be
        // (CI saw the second taken by another test's connection).
        .args(["--agent-metrics-listen", "127.0.0.1:0"])
        .args(["--admin-token", ADMIN]);
    Proc::spawn(cmd, dir.join("dev.log"))
}

#[test]
fn dev_shows_the_whole_product_and_ctrl_c_stops_its_instances() {
    let dir = tempfile::tempdir().unwrap();
    // A data dir closed to other users (as a home directory is): run as
    // root, dev runs instances as nobody and keeps their state where they
    // can reach it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let config = dir.path().join("dev.toml");
    // Prices from the config (dev's own apply only when it sets none), a
    // short stop grace, no rate limit.
    std::fs::write(
        &config,
        "stop_grace_ms = 1000\n\
         subscription_regions = [\"region-1\"]\n\
         [billing.default_price]\n\
         on_demand_node_hour_micros = 3600000000\n\
         subscription_node_month_micros = 1000000000\n\
         public_instance_hour_micros = 360000\n\
         [limits]\nrequests_per_second = 0\n",
    )
    .unwrap();
    // Commands this run alone starts (no other run's leftovers match).
    let mark = format!("7{:06}", std::process::id() % 1_000_000);
    let (m1, m2, m3) = (format!("{mark}1"), format!("{mark}2"), format!("{mark}3"));
    let grpc = free_port();
    let dev = start_dev(dir.path(), &config, grpc);
    let addr = format!("http://127.0.0.1:{grpc}");
    let mut last = String::new();
    let ready = (0..150).any(|_| {
        let out = cli(&addr, ADMIN, &["node", "list", "-o", "json"]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ready = out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|nodes| {
                    nodes.len() == 3 && nodes.iter().all(|n| n["status"] == "Ready")
                });
        if !ready {
            std::thread::sleep(Duration::from_millis(200));
        }
        ready
    });
    assert!(
        ready,
        "timed out waiting for three Ready nodes; last `node list`: {last}\ndev's log:\n{}",
        dev.log_text()
    );
    let log = dev.log_text();
    assert!(
        log.contains("3 node(s)") && log.contains("from --config"),
        "{log}"
    );
    let nodes = json(&addr, ADMIN, &["node", "list"]);
    let zones: std::collections::BTreeSet<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["az"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(zones.len(), 3, "{nodes}");

    // A second dev on the same data dir is refused, naming the first.
    let second = Command::new(bin("gpupool-scheduler"))
        .arg("dev")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another gpupool-scheduler dev"),
        "{second:?}"
    );

    // A tenant, then its pools.
    ok(
        &addr,
        ADMIN,
        &[
            "tenant",
            "create",
            "acme",
            "--max-nodes",
            "3",
            "--max-gpus",
            "6",
        ],
    );
    let token = ok(&addr, ADMIN, &["tenant", "token", "acme"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("gpt_"), "{token}");
    let specs = json(&addr, &token, &["spec", "list"]);
    let spec = specs[0]["name"].as_str().unwrap().to_string();
    ok(
        &addr,
        &token,
        &[
            "pool",
            "create",
            "--type",
            "train",
            "--name",
            "acme_train",
            "--spec",
            &spec,
            "--nodes",
            "1",
        ],
    );
    ok(
        &addr,
        &token,
        &[
            "pool",
            "create",
            "--type",
            "deploy",
            "--name",
            "acme-serve",
            "--spec",
            &spec,
            "--nodes",
            "1",
            "--az",
            "AZ2",
        ],
    );
    wait_until(Duration::from_secs(30), "both pools Running", || {
        let pools = json(&addr, &token, &["pool", "list"]);
        pools
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "acme_train" || p["name"] == "acme-serve")
            .filter(|p| p["status"] == "Running")
            .count()
            == 2
    });
    let serve = json(&addr, &token, &["pool", "get", "acme-serve"]);
    assert!(
        serve["az"] == "AZ2" || serve["resolved_az"] == "AZ2",
        "{serve}"
    );

    // Jobs in both: a training job and an online service.
    ok(
        &addr,
        &token,
        &[
            "job",
            "submit",
            "--kind",
            "training",
            "--pool",
            "acme_train",
            "--gpus",
            "1",
            "--",
            "sh",
            "-c",
            &format!("echo trained; touch \"$HOME/reach\" && echo home-ok; exec sleep {m1}"),
        ],
    );
    ok(
        &addr,
        &token,
        &[
            "job",
            "submit",
            "--kind",
            "online-service",
            "--pool",
            "acme-serve",
            "--cpu",
            "100m",
            "--memory",
            "64MiB",
            "--",
            "sleep",
            &m2,
        ],
    );
    wait_until(Duration::from_secs(30), "both jobs running", || {
        let jobs = json(&addr, &token, &["job", "list"]);
        jobs.as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "Running")
            .count()
            == 2
    });
    assert!(!processes_with(&m1).is_empty() && !processes_with(&m2).is_empty());
    let train = json(&addr, &token, &["job", "list"]);
    let train_id = train
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "training")
        .unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(Duration::from_secs(30), "the training job's output", || {
        ok(&addr, &token, &["job", "logs", &train_id]).contains("trained")
    });
    let out = ok(&addr, &token, &["job", "logs", &train_id]);
    assert!(out.contains("home-ok"), "its HOME is not reachable: {out}");
    let state_dir = std::fs::read_to_string(dir.path().join("data/agents-state-dir")).ok();
    if root {
        let state_dir = state_dir.clone().expect("the agents' state moved");
        assert!(
            state_dir.starts_with("/var/tmp/gpupool-dev-"),
            "{state_dir}"
        );
    }

    // Scale the train pool out to the free node, convert it to a
    // subscription (it has a consumption record at once at this price),
    // then unsubscribe (refund, delete) and delete the deploy pool.
    ok(
        &addr,
        &token,
        &["pool", "scale-out", "acme_train", "--count", "1"],
    );
    wait_until(
        Duration::from_secs(30),
        "two nodes in the train pool",
        || {
            let p = json(&addr, &token, &["pool", "get", "acme_train"]);
            p["status"] == "Running" && p["node_ids"].as_array().is_some_and(|n| n.len() == 2)
        },
    );
    std::thread::sleep(Duration::from_millis(50));
    ok(
        &addr,
        &token,
        &["pool", "convert", "acme_train", "--months", "1"],
    );
    let p = json(&addr, &token, &["pool", "get", "acme_train"]);
    assert_eq!(p["billing_mode"], "subscription", "{p}");
    ok(
        &addr,
        &token,
        &["pool", "unsubscribe", "acme_train", "--yes"],
    );
    ok(&addr, &token, &["pool", "delete", "acme-serve", "--yes"]);
    wait_until(Duration::from_secs(30), "both pools Deleted", || {
        let pools = json(&addr, &token, &["pool", "list", "--all"]);
        pools
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"] == "Deleted")
            .count()
            == 2
    });
    let orders = json(&addr, &token, &["order", "list"]);
    assert!(
        orders
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["kind"] == "refund"),
        "{orders}"
    );

    // A public job still runs, and one that ignores SIGTERM; Ctrl-C stops
    // both with the cluster.
    ok(
        &addr,
        &token,
        &["job", "submit", "--kind", "training", "--", "sleep", &m3],
    );
    let stubborn = format!("trap '' TERM; while :; do sleep 1; done; echo {mark}9");
    ok(
        &addr,
        &token,
        &[
            "job", "submit", "--kind", "training", "--", "sh", "-c", &stubborn,
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while processes_with(&m3).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the public job never ran: {}\n{}",
            ok(&addr, &token, &["job", "list"]),
            ok(&addr, ADMIN, &["node", "list"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let nine = format!("{mark}9");
    wait_until(
        Duration::from_secs(30),
        "the job that ignores SIGTERM",
        || !processes_with(&nine).is_empty(),
    );
    dev.signal(libc::SIGINT);
    let mut dev = dev;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dev ignored SIGINT:\n{}",
            dev.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "dev exited {status:?}:\n{}",
        dev.log_text()
    );
    let left = processes_with(&mark);
    assert!(left.is_empty(), "instances left running: {left:?}");
    if let Some(state_dir) = state_dir {
        let _ = std::fs::remove_dir_all(state_dir.trim());
    }
}
