//! PostgreSQL: the store against a real server (initdb + pg_ctl in a temp
//! dir), scheduler replicas with a standby taking over from a killed
//! leader, and a PostgreSQL restart under a running scheduler. Under
//! CI=true these run (`.ci/run` installs Debian's postgresql); elsewhere
//! they say they were skipped when PostgreSQL is missing.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;
use gpupool_scheduler::cluster::{Cluster, Outbox, Settings};
use gpupool_scheduler::domain::job::{KindTable, RawJobSpec};
use gpupool_scheduler::domain::tenant::{Caller, Quota};
use gpupool_scheduler::domain::{Gpu, Inventory, JobKind};
use gpupool_scheduler::pgstore::PgStore;
use gpupool_scheduler::store::{SqliteStore, Store, StoreError};

fn settings() -> Settings {
    Settings {
        node_grace_ms: 60_000,
        stop_grace_ms: 500,
        preemption_min_runtime_ms: 0,
        fair_share_half_life_ms: 0,
        fair_share_preemption: false,
        subscription_regions: Vec::new(),
        currency: "USD".into(),
        prices: BTreeMap::new(),
        default_price: Default::default(),
        frozen_retention_ms: 3_600_000,
        kinds: KindTable::default(),
        limits: Default::default(),
        token_key: gpupool_scheduler::cluster::SecretKey(vec![1; 32]),
        networks: None,
        custom_networks: Default::default(),
    }
}

/// The same operations on a cluster over `store`; returns what a reload
/// from the store then holds.
fn exercise(store: Box<dyn Store>, reopen: impl Fn() -> Box<dyn Store>) -> String {
    let mut c = Cluster::load(store, settings(), 0).unwrap();
    let inv = Inventory {
        hostname: "h1".into(),
        cpu_cores: 8,
        memory_mib: 16_384,
        gpus: (0..2)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                model: "H100".into(),
                memory_total_mib: 81_920,
                healthy: true,
                health_reason: String::new(),
                mig_enabled: false,
                pci_bus_id: String::new(),
            })
            .collect(),
        ..Default::default()
    };
    c.register_node("n1", inv, 1).unwrap();
    c.create_tenant(
        &Caller::admin(),
        "t1",
        Quota {
            max_dedicated_nodes: 1,
            max_gpus: 8,
            ..Default::default()
        },
        2,
    )
    .unwrap();
    let mut out = Outbox::new();
    for (i, kind) in [
        JobKind::Training,
        JobKind::OnlineService,
        JobKind::BatchService,
    ]
    .into_iter()
    .enumerate()
    {
        c.submit(
            &Caller::tenant("t1"),
            RawJobSpec {
                kind: Some(kind),
                command: vec!["true".into()],
                instances: 1,
                gpus: 1,
                name: format!("job-{i}"),
                ..Default::default()
            },
            10 + i as i64,
            &mut out,
        )
        .unwrap();
    }
    c.close_hours(3 * 3_600_000);
    drop(c);
    let c = Cluster::load(reopen(), settings(), 4 * 3_600_000).unwrap();
    let nodes: Vec<_> = c.nodes().map(|n| n.node_id.clone()).collect();
    let jobs: Vec<_> = c.jobs().cloned().collect();
    drop(c);
    // The ledger's pages: the same rows, filters and cursors in both
    // stores, and through their second (reader) handle.
    let store = reopen();
    let mut rows = Vec::new();
    for hour in 0..5i64 {
        for (tenant, pool) in [("t1", "public"), ("t2", "p-000009")] {
            for s in 0..3 {
                rows.push(gpupool_scheduler::domain::billing::LedgerRow {
                    subject: format!("instance:{tenant}-{s}"),
                    tenant: tenant.into(),
                    pool_id: pool.into(),
                    job_id: format!("j-{tenant}-{s}"),
                    instance_id: format!("{tenant}-{s}-0"),
                    spec: "gpu-2xH100".into(),
                    hour_start_ms: 10 * 3_600_000 + hour * 3_600_000,
                    mode: gpupool_scheduler::domain::pool::BillingMode::OnDemand,
                    unit_ms: 3_600_000,
                    quantity: 1,
                    unit_price_micros: 100 + s,
                    amount_micros: 100 + s,
                    gpu_allocated_ms: 0,
                    gpu_used_ms: 0,
                    preemptible: false,
                });
            }
        }
    }
    let records: Vec<gpupool_scheduler::store::Record<'_>> = rows
        .iter()
        .map(gpupool_scheduler::store::Record::Ledger)
        .collect();
    store.write(&records, 5).unwrap();
    let reader = store.reader().expect("a second handle");
    let mut pages = String::new();
    for (tenant, pool, job) in [
        (None, None, None),
        (Some("t1"), None, None),
        (None, Some("p-000009"), None),
        (None, None, Some("j-t2-1")),
    ] {
        for handle in [&store, &reader] {
            let mut q = gpupool_scheduler::store::LedgerQuery {
                from_ms: 11 * 3_600_000,
                to_ms: 20 * 3_600_000,
                tenant: tenant.map(String::from),
                pool: pool.map(String::from),
                job: job.map(String::from),
                after: None,
                limit: 4,
            };
            loop {
                let page = handle.ledger_page(&q).unwrap();
                for r in &page {
                    pages.push_str(&format!(
                        "{} {} {}|",
                        r.hour_start_ms, r.subject, r.amount_micros
                    ));
                }
                pages.push('\n');
                if page.len() < q.limit {
                    break;
                }
                q.after = page.last().map(gpupool_scheduler::store::LedgerQuery::key);
            }
        }
    }
    format!("{nodes:?}\n{jobs:?}\n{:?}\n{pages}", jobs.len())
}

#[test]
fn the_postgres_store_keeps_what_the_sqlite_store_keeps_and_fences_writes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(dir.path()) else {
        return;
    };
    let db = dir.path().join("t.db");
    let sqlite = exercise(Box::new(SqliteStore::open(&db).unwrap()), || {
        Box::new(SqliteStore::open(&db).unwrap())
    });
    let url = pg.url();
    let postgres = exercise(Box::new(PgStore::open(&url, None).unwrap()), || {
        Box::new(PgStore::open(&url, None).unwrap())
    });
    assert_eq!(sqlite, postgres);
    assert!(postgres.contains("job-2"), "{postgres}");
    // 4 hours of the range x 6 subjects (24 rows), t1's 12, the pool's 12,
    // one job's 4, each read by both handles, all in pages of 4.
    assert_eq!(
        postgres.matches("instance:").count(),
        2 * (24 + 12 + 12 + 4),
        "{postgres}"
    );
    assert!(postgres.contains("instance:t2-1"), "{postgres}");

    // Fencing: a replica writes only while it holds the lease.
    let a = PgStore::open(&url, Some("a".into())).unwrap();
    let b = PgStore::open(&url, Some("b".into())).unwrap();
    assert!(a.acquire("a", "http://a").unwrap().mine);
    let lease = b.acquire("b", "http://b").unwrap();
    assert!(!lease.mine && lease.address == "http://a");
    let snapshot = a.load().unwrap();
    let node = &snapshot.nodes[0];
    a.put_node(node, 5).unwrap();
    assert!(matches!(b.put_node(node, 5), Err(StoreError::NotLeader(h)) if h == "a"));
    a.release("a").unwrap();
    assert!(b.acquire("b", "http://b").unwrap().mine);
    b.put_node(node, 6).unwrap();
    assert!(matches!(a.put_node(node, 7), Err(StoreError::NotLeader(_))));
}

/// The CLI against `addr` (replicas comma-separated).
fn cli_at(addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("gpupool"))
        .args(args)
        .env("GPUPOOL_ADDR", addr)
        .env("GPUPOOL_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap()
}

fn jobs_at(addr: &str) -> Vec<serde_json::Value> {
    let out = cli_at(addr, &["job", "list", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn submit_at(addr: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["job", "submit", "--cpu", "100m", "--memory", "64"];
    all.extend_from_slice(args);
    let out = cli_at(addr, &all);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(dir.path()) else {
        return;
    };
    let mut a = Scheduler::start_replica(&dir.path().join("a"), &pg.url()).await;
    a.wait_serving().await;
    let b = Scheduler::start_replica(&dir.path().join("b"), &pg.url()).await;
    // The standby answers, naming the leader.
    let refused = eventually(Duration::from_secs(20), "standby answers", || async {
        let out = cli_at(&b.addr(), &["job", "list"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        err.contains("standby").then_some(err)
    })
    .await;
    assert!(refused.contains(&a.addr()), "{refused}");
    let both = format!("{},{}", b.addr(), a.addr());
    let _agent = Agent::start_at(dir.path(), &both, "ha1", "2xH100-80GB");
    eventually(
        Duration::from_secs(20),
        "node Ready on the leader",
        || async {
            let nodes = list_nodes(&a).await;
            (nodes.len() == 1 && nodes[0].status == pb::NodeStatus::Ready as i32).then_some(())
        },
    )
    .await;
    let long = submit_at(&both, &["--gpus", "1", "--", "sleep", "300"]).unwrap();
    let running = wait_job(&a, &long, pb::JobState::Running, Duration::from_secs(20)).await;
    let mut acked = vec![long.clone()];
    for _ in 0..5 {
        acked.push(submit_at(&both, &["--", "true"]).unwrap());
    }

    a.proc.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(20), "standby takes over", || async {
        b.serving().await.then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    assert!(takeover < Duration::from_secs(10), "took {takeover:?}");
    eprintln!("standby serving {takeover:?} after the leader was killed");

    // Every acknowledged job is there; the running one was not restarted.
    let ids: Vec<String> = jobs_at(&both)
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect();
    for id in &acked {
        assert!(ids.contains(id), "{id} lost after failover: {ids:?}");
    }
    let after = eventually(
        Duration::from_secs(30),
        "agent follows the leader",
        || async {
            let nodes = list_nodes(&b).await;
            let j = get_job(&b, &long).await;
            (nodes
                .first()
                .is_some_and(|n| n.status == pb::NodeStatus::Ready as i32)
                && j.state == pb::JobState::Running as i32)
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
    // Service resumes: new work runs on the new leader.
    let fresh = submit_at(&both, &["--", "true"]).unwrap_or_else(|e| {
        panic!(
            "{e}\nthe new leader's log:\n{}\nthe old one's:\n{}",
            b.proc.log_text(),
            a.proc.log_text()
        )
    });
    wait_job(&b, &fresh, pb::JobState::Succeeded, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_no_accepted_work() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(dir.path()) else {
        return;
    };
    let s = Scheduler::start_replica(&dir.path().join("s"), &pg.url()).await;
    s.wait_serving().await;
    let _agent = Agent::start_at(dir.path(), &s.addr(), "pg1", "1xH100-80GB");
    wait_ready(&s, 1).await;
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(submit_at(&s.addr(), &["--", "true"]).unwrap());
    }
    pg.stop_server();
    // While PostgreSQL is down nothing is accepted, and the caller is told.
    let refused = submit_at(&s.addr(), &["--", "true"]).unwrap_err();
    assert!(refused.contains("storage failure"), "{refused}");
    pg.start_server();
    let after = eventually(Duration::from_secs(30), "accepting again", || async {
        submit_at(&s.addr(), &["--", "true"]).ok()
    })
    .await;
    acked.push(after.clone());
    wait_job(&s, &after, pb::JobState::Succeeded, Duration::from_secs(30)).await;
    // A restart reloads exactly the accepted jobs from PostgreSQL.
    let s = s.kill_and_restart(&dir.path().join("s")).await;
    let ids: Vec<String> = jobs_at(&s.addr())
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, acked, "accepted jobs only, none lost");
}

/// A leader that cannot renew its lease for most of it stops serving
/// (a standby could take over after the lease), and leads again from the
/// database once PostgreSQL is back; the running job is reattached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_postgres_steps_down_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(dir.path()) else {
        return;
    };
    let s = Scheduler::start_replica(&dir.path().join("s"), &pg.url()).await;
    s.wait_serving().await;
    let _agent = Agent::start_at(dir.path(), &s.addr(), "sd1", "1xH100-80GB");
    wait_ready(&s, 1).await;
    let long = submit_at(&s.addr(), &["--", "sleep", "300"]).unwrap();
    let running = wait_job(&s, &long, pb::JobState::Running, Duration::from_secs(20)).await;
    pg.stop_server();
    let down = Instant::now();
    eventually(Duration::from_secs(15), "the leader steps down", || async {
        (!s.serving().await).then_some(())
    })
    .await;
    let stepped = down.elapsed();
    assert!(
        stepped < Duration::from_secs(8),
        "stepped down after {stepped:?}"
    );
    pg.start_server();
    eventually(Duration::from_secs(30), "leads again", || async {
        s.serving().await.then_some(())
    })
    .await;
    let after = eventually(Duration::from_secs(30), "job reattached", || async {
        let j = get_job(&s, &long).await;
        let ready = list_nodes(&s)
            .await
            .first()
            .is_some_and(|n| n.status == pb::NodeStatus::Ready as i32);
        (ready && j.state == pb::JobState::Running as i32).then_some(j)
    })
    .await;
    assert_eq!(after.instances.len(), 1);
    assert_eq!(
        after.instances[0].instance_id,
        running.instances[0].instance_id
    );
    assert!(s.proc.log_text().contains("stands by again"));
}

/// A snapshot saved from PostgreSQL (while the leader runs) restores into
/// SQLite, and saved again from there it holds the same: one format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_moves_between_postgresql_and_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(dir.path()) else {
        return;
    };
    let leader = Scheduler::start_replica(&dir.path().join("a"), &pg.url()).await;
    leader.wait_serving().await;
    let mut admin = leader.admin().await;
    tenant_with_token(&mut admin, "acme", 1, 2).await;
    let job = submit(&leader, training(0, &["true"])).await.unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin("gpupool-scheduler"))
            .arg("snapshot")
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        // "...: 1 tenants, 1 tokens, ..." on stdout: the counts, compared
        // below.
        String::from_utf8_lossy(&out.stdout)
            .rsplit_once(": ")
            .map(|(_, c)| c.trim().to_string())
            .unwrap()
    };
    let file = dir.path().join("pg.snapshot");
    let file_s = file.to_str().unwrap();
    let pg_config = dir.path().join("a/scheduler.toml");
    let saved = run(&["save", file_s, "--config", pg_config.to_str().unwrap()]);
    assert!(saved.starts_with("1 tenants, 1 tokens"), "{saved}");
    assert!(saved.contains("1 jobs"), "{saved}");
    // Into SQLite.
    let sqlite_config = dir.path().join("sqlite.toml");
    std::fs::write(
        &sqlite_config,
        format!("data_dir = {:?}\n", dir.path().join("sqlite-data")),
    )
    .unwrap();
    let restored = run(&[
        "restore",
        file_s,
        "--config",
        sqlite_config.to_str().unwrap(),
    ]);
    assert!(restored.ends_with(&saved), "{restored} vs {saved}");
    // Saved again from SQLite: the same counts; and the job is there.
    let again = dir.path().join("sqlite.snapshot");
    let resaved = run(&[
        "save",
        again.to_str().unwrap(),
        "--config",
        sqlite_config.to_str().unwrap(),
    ]);
    assert_eq!(resaved, saved);
    assert!(
        std::fs::read_to_string(&again)
            .unwrap()
            .contains(&job.job_id)
    );
}
