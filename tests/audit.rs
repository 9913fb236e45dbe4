//! The audit trail end to end, through the real binaries: a pool's whole
//! life (create, scale, convert, unsubscribe; another pool deleted), a
//! cancelled job, a refused and a failed call, each recorded once and
//! attributed to the tenant that made it from its address; a tenant sees
//! only its own records; no token and no `--env` value is ever in them
//! (the `gpupool audit list` output and the JSON lines file).

use std::time::Duration;

use gpupool_e2e::*;
use serde_json::Value;

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_of(out: std::process::Output, what: &str) -> Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

/// (method, code) of each record, in order.
fn calls(records: &Value) -> Vec<(String, String)> {
    records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_pools_life_and_a_cancelled_job_are_audited_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("audit.jsonl");
    let sched = Scheduler::start_with_config(
        dir.path(),
        &format!("[audit]\nretention_days = 30\njsonl_file = {:?}\n", lines),
    )
    .await;
    let _agents: Vec<Agent> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| Agent::start(dir.path(), &sched, id, "2xH100-80GB"))
        .collect();
    wait_ready(&sched, 3).await;
    let mut admin = sched.admin().await;
    let acme = tenant_with_token(&mut admin, "acme", 3, 6).await;
    let beta = tenant_with_token(&mut admin, "beta", 1, 2).await;
    let specs = json_of(
        sched.cli_as(&acme, &["spec", "list", "-o", "json"]),
        "specs",
    );
    let spec = specs[0]["name"].as_str().unwrap().to_string();

    // The pool's whole life, as acme.
    let pool = json_of(
        sched.cli_as(
            &acme,
            &[
                "pool", "create", "--type", "train", "--name", "life", "--spec", &spec, "--nodes",
                "1", "-o", "json",
            ],
        ),
        "create",
    );
    let pool_id = pool["pool_id"].as_str().unwrap().to_string();
    let running = |name: &str| {
        let p = json_of(
            sched.cli_as(&acme, &["pool", "get", name, "-o", "json"]),
            "get",
        );
        p["status"] == "running" || p["status"] == "Running"
    };
    let wait_running = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !running("life") {
            assert!(
                std::time::Instant::now() < deadline,
                "pool life never running"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    wait_running().await;
    ok(
        sched.cli_as(&acme, &["pool", "scale-out", "life", "--count", "1"]),
        "scale-out",
    );
    wait_running().await;
    ok(
        sched.cli_as(&acme, &["pool", "convert", "life", "--months", "1"]),
        "convert",
    );
    ok(
        sched.cli_as(&acme, &["pool", "unsubscribe", "life", "--yes"]),
        "unsubscribe",
    );
    let other = json_of(
        sched.cli_as(
            &acme,
            &[
                "pool", "create", "--type", "train", "--name", "other", "--spec", &spec, "--nodes",
                "1", "-o", "json",
            ],
        ),
        "create other",
    );
    let other_id = other["pool_id"].as_str().unwrap().to_string();
    ok(
        sched.cli_as(&acme, &["pool", "delete", &other_id, "--yes"]),
        "delete",
    );

    // A job with a secret in its environment, cancelled.
    let secret = "s3cr3t-env-value-4f1c";
    let job = json_of(
        sched.cli_as(
            &acme,
            &[
                "job",
                "submit",
                "--kind",
                "training",
                "--gpus",
                "1",
                "--cpu",
                "100m",
                "--memory",
                "64MiB",
                "--env",
                &format!("API_KEY={secret}"),
                "-o",
                "json",
                "--",
                "sleep",
                "30",
            ],
        ),
        "submit",
    );
    let job_id = job["job_id"].as_str().unwrap().to_string();
    ok(sched.cli_as(&acme, &["job", "cancel", &job_id]), "cancel");

    // A failed call and a refused one.
    assert!(
        !sched
            .cli_as(&acme, &["pool", "delete", "no-such-pool", "--yes"])
            .status
            .success()
    );
    assert!(
        !sched
            .cli_as(&acme, &["node", "cordon", "n1"])
            .status
            .success()
    );

    let listed = json_of(
        sched.cli_as(&acme, &["audit", "list", "-o", "json"]),
        "acme's audit",
    );
    // The admin's calls about acme (it was made, its token issued) are
    // acme's to see too; the rest are its own.
    let (admins, own): (Vec<Value>, Vec<Value>) = listed
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .partition(|r| r["role"] == "admin");
    assert_eq!(
        calls(&Value::Array(admins.clone())),
        [
            ("TenantService/CreateTenant", "OK"),
            ("TenantService/IssueToken", "OK")
        ]
        .map(|(m, c)| (m.to_string(), c.to_string())),
        "{listed:#}"
    );
    assert!(
        admins
            .iter()
            .all(|r| r["targets"]["tenant"] == "acme" && r["tenant"] == "acme")
    );
    let mine = Value::Array(own);
    assert_eq!(
        calls(&mine),
        [
            ("PoolService/CreatePool", "OK"),
            ("PoolService/ScalePool", "OK"),
            ("PoolService/ConvertToSubscription", "OK"),
            ("PoolService/Unsubscribe", "OK"),
            ("PoolService/CreatePool", "OK"),
            ("PoolService/DeletePool", "OK"),
            ("JobService/SubmitJob", "OK"),
            ("JobService/CancelJob", "OK"),
            ("PoolService/DeletePool", "NOT_FOUND"),
            ("NodeService/CordonNode", "PERMISSION_DENIED"),
        ]
        .map(|(m, c)| (m.to_string(), c.to_string())),
        "{mine:#}"
    );
    let records = mine.as_array().unwrap();
    for r in records {
        assert_eq!(
            (r["role"].as_str(), r["who"].as_str()),
            (Some("tenant"), Some("acme")),
            "{r}"
        );
        assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
    }
    for i in 0..4 {
        assert_eq!(
            records[i]["targets"]["pool"],
            pool_id.as_str(),
            "{}",
            records[i]
        );
    }
    assert_eq!(records[0]["args"]["name"], "life");
    assert_eq!(records[1]["args"]["add_nodes"], "1");
    assert_eq!(records[2]["args"]["months"], "1");
    assert_eq!(records[5]["targets"]["pool"], other_id.as_str());
    assert_eq!(records[6]["targets"]["job"], job_id.as_str());
    assert_eq!(records[6]["args"]["env_vars"], "1");
    assert_eq!(records[7]["targets"]["job"], job_id.as_str());
    assert!(!records[8]["message"].as_str().unwrap().is_empty());
    assert_eq!(records[9]["targets"]["node"], "n1");

    // Filters and pages.
    let of_pool = json_of(
        sched.cli_as(&acme, &["audit", "list", "--pool", &pool_id, "-o", "json"]),
        "by pool",
    );
    assert_eq!(of_pool.as_array().unwrap().len(), 4, "{of_pool:#}");
    let of_job = json_of(
        sched.cli_as(&acme, &["audit", "list", "--job", &job_id, "-o", "json"]),
        "by job",
    );
    assert_eq!(calls(&of_job).len(), 2, "{of_job:#}");
    let first = json_of(
        sched.cli_as(&acme, &["audit", "list", "--limit", "3", "-o", "json"]),
        "limit",
    );
    assert_eq!(calls(&first), calls(&listed)[..3].to_vec());

    // beta names acme's job: NOT_FOUND, as for an id that does not exist,
    // and the record is beta's alone (acme's trail does not change, and
    // beta's does not miss it, which would tell beta the id exists).
    assert!(
        !sched
            .cli_as(&beta, &["job", "cancel", &job_id])
            .status
            .success()
    );
    let acme_after = json_of(
        sched.cli_as(&acme, &["audit", "list", "-o", "json"]),
        "acme's audit after beta",
    );
    assert_eq!(acme_after, listed, "beta's call reached acme's trail");

    // beta sees none of acme's, and may not ask for them.
    let theirs = json_of(
        sched.cli_as(&beta, &["audit", "list", "-o", "json"]),
        "beta's audit",
    );
    // (The admin's calls about beta itself, and its own.)
    assert_eq!(
        calls(&theirs),
        [
            ("TenantService/CreateTenant", "OK"),
            ("TenantService/IssueToken", "OK"),
            ("JobService/CancelJob", "NOT_FOUND")
        ]
        .map(|(m, c)| (m.to_string(), c.to_string())),
        "{theirs:#}"
    );
    let cancel = &theirs.as_array().unwrap()[2];
    assert_eq!(
        (cancel["who"].as_str(), cancel["tenant"].as_str()),
        (Some("beta"), Some("beta")),
        "{cancel}"
    );
    assert!(!theirs.to_string().contains("acme"), "{theirs:#}");
    assert!(
        !sched
            .cli_as(&beta, &["audit", "list", "--tenant", "acme"])
            .status
            .success()
    );
    let beta_by_pool = sched.cli_as(&beta, &["audit", "list", "--pool", &pool_id, "-o", "json"]);
    assert!(
        !beta_by_pool.status.success()
            || json_of(beta_by_pool, "beta by pool")
                .as_array()
                .unwrap()
                .is_empty()
    );

    // The admin sees everything, its own calls too.
    let all = json_of(sched.cli(&["audit", "list", "-o", "json"]), "admin's audit");
    let all_calls = calls(&all);
    for want in [
        "TenantService/CreateTenant",
        "TenantService/IssueToken",
        "AgentService/Register",
    ] {
        assert!(
            all_calls.iter().any(|(m, _)| m == want),
            "{want} missing: {all:#}"
        );
    }
    let issued = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "TenantService/IssueToken")
        .unwrap();
    assert_eq!(
        (issued["role"].as_str(), issued["tenant"].as_str()),
        (Some("admin"), Some("acme"))
    );
    let text = all.to_string();
    // The lines are appended by a thread of their own, after the commit.
    let want = all.as_array().unwrap().len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let file = loop {
        let file = std::fs::read_to_string(&lines).unwrap_or_default();
        if file.lines().count() >= want || std::time::Instant::now() > deadline {
            break file;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for (what, secret) in [
        ("acme's token", &acme[..]),
        ("beta's token", &beta[..]),
        ("the admin token", ADMIN_TOKEN),
        ("the --env value", secret),
    ] {
        assert!(!text.contains(secret), "{what} in the audit trail");
        assert!(!file.contains(secret), "{what} in the JSON lines");
    }
    // Every record committed is a line of the file.
    assert_eq!(
        file.lines().count(),
        all.as_array().unwrap().len(),
        "{file}"
    );
    for line in file.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["seq"].as_u64().unwrap() > 0);
    }

    // A restarted scheduler numbers on from where the trail ends.
    let last = all.as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    let sched = sched.restart(dir.path()).await;
    ok(
        sched.cli(&["node", "cordon", "n2"]),
        "cordon after the restart",
    );
    let after = json_of(
        sched.cli(&["audit", "list", "--node", "n2", "-o", "json"]),
        "after the restart",
    );
    let cordon = after
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "NodeService/CordonNode")
        .unwrap_or_else(|| panic!("no cordon record: {after:#}"));
    assert!(cordon["seq"].as_u64().unwrap() > last, "{cordon}");
    assert_eq!(
        (cordon["role"].as_str(), cordon["code"].as_str()),
        (Some("admin"), Some("OK"))
    );
}
