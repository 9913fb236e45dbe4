//! Upgrading from the previous release (`tests/previous-release` names its
//! version and commit; `scripts/build-previous-release.sh` builds its
//! binaries): its scheduler and agents run a workload — a tenant, a
//! subscription pool with its order, jobs running and finished, metered
//! hours — then the scheduler is replaced by this build's on the same data
//! (SQLite; and PostgreSQL replicas, one at a time), the previous release's
//! agents and CLI keep working with it, and each agent is replaced in place
//! with its instances kept. README, *Upgrades*, describes the procedure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gpupool_e2e::workload::{Before, finds_everything, workload};
use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

/// The previous release's binaries, built on first use.
struct Previous {
    version: String,
    bin: PathBuf,
}

impl Previous {
    /// Built once per test binary (both tests ask for it at once). `None`
    /// (a loud skip) where it cannot be built outside CI: a checkout
    /// without the git history that holds the release, say.
    fn get() -> Option<&'static Self> {
        static PREVIOUS: std::sync::OnceLock<Option<Previous>> = std::sync::OnceLock::new();
        PREVIOUS.get_or_init(Self::build).as_ref()
    }

    fn build() -> Option<Self> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(manifest.join("previous-release")).unwrap();
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
                .unwrap_or_else(|| panic!("tests/previous-release has no {key}"))
        };
        let (version, commit) = (field("version"), field("commit"));
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("../target"));
        let bin = target.join("previous-release").join(&commit).join("bin");
        let names = ["gpupool-scheduler", "gpupool-agent", "gpupool"];
        if !names.iter().all(|n| bin.join(n).exists()) {
            eprintln!(
                "building release {version} ({commit}) with scripts/build-previous-release.sh"
            );
            let status = Command::new(manifest.join("../scripts/build-previous-release.sh"))
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .unwrap();
            if !status.success() {
                assert!(!in_ci(), "building release {version} failed");
                eprintln!(
                    "SKIPPED CHECK: release {version}'s binaries could not be built (see above); \
                     this check fails under CI=true"
                );
                return None;
            }
        }
        let out = Command::new(bin.join("gpupool-scheduler"))
            .arg("--version")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(said.contains(&version), "{said}");
        assert_ne!(
            version,
            env!("CARGO_PKG_VERSION"),
            "tests/previous-release names this build's own version"
        );
        Some(Self { version, bin })
    }

    fn exe(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// The previous release's CLI against `addr`, as the admin.
    fn cli(&self, addr: &str, args: &[&str]) -> std::process::Output {
        Command::new(self.exe("gpupool"))
            .args(args)
            .env("GPUPOOL_ADDR", addr)
            .env("GPUPOOL_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap()
    }
}

/// Both nodes Ready, their agents at `version`.
async fn agents_at(s: &Scheduler, version: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("both agents registered at {version}"),
        || async {
            let nodes = list_nodes(s).await;
            (nodes.len() == 2
                && nodes.iter().all(|n| {
                    n.status == pb::NodeStatus::Ready as i32 && n.agent_version == version
                }))
            .then_some(())
        },
    )
    .await;
}

/// Replaces each agent in place by this build's (SIGTERM, start on the
/// same state dir), then checks the instances were kept and new work runs.
async fn upgrade_agents(
    dir: &Path,
    s: &Scheduler,
    addr: &str,
    agents: Vec<Agent>,
    before: &Before,
) -> Vec<Agent> {
    let mut upgraded = Vec::new();
    for mut agent in agents {
        let status = agent.proc.terminate(Duration::from_secs(15));
        assert!(
            status.success(),
            "agent exit: {status}\n{}",
            agent.proc.log_text()
        );
        let node = agent.node_id.clone();
        drop(agent);
        upgraded.push(Agent::start_at(dir, addr, &node, "1xH100-80GB"));
    }
    let ours = env!("CARGO_PKG_VERSION");
    eventually(Duration::from_secs(30), "agents upgraded", || async {
        let nodes = list_nodes(s).await;
        nodes
            .iter()
            .all(|n| n.status == pb::NodeStatus::Ready as i32 && n.agent_version == ours)
            .then_some(())
    })
    .await;
    finds_everything(s, before).await;
    // The previous release's shims report to this build's agent: a
    // cancelled instance ends Stopped, and its GPU takes new work.
    let public = &before.running[1];
    let mut admin = s.admin().await;
    admin
        .jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: public.job_id.clone(),
        })
        .await
        .unwrap();
    wait_job(
        s,
        &public.job_id,
        pb::JobState::Cancelled,
        Duration::from_secs(30),
    )
    .await;
    let fresh = submit(s, training(1, &["sh", "-c", "echo after the upgrade"]))
        .await
        .unwrap();
    wait_job(
        s,
        &fresh.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    upgraded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_cluster_upgrades_from_the_previous_release() {
    let Some(prev) = Previous::get() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_installed(dir.path(), &prev.exe("gpupool-scheduler")).await;
    let agents: Vec<Agent> = ["up1", "up2"]
        .iter()
        .map(|n| {
            Agent::start_installed(
                dir.path(),
                &sched,
                n,
                "1xH100-80GB",
                "",
                &prev.exe("gpupool-agent"),
            )
        })
        .collect();
    wait_ready(&sched, 2).await;
    // This build's agent is newer than the previous scheduler: refused,
    // with the policy's words (upgrade the scheduler first).
    let mut early = Agent::start(dir.path(), &sched, "too-new", "1xH100-80GB");
    eventually(
        Duration::from_secs(20),
        "the newer agent refused",
        || async {
            early
                .proc
                .log_text()
                .contains("newer than this scheduler: upgrade the scheduler first")
                .then_some(())
        },
    )
    .await;
    early.proc.kill();
    drop(early);
    let before = workload(&sched).await;

    // The scheduler: stopped, this build started on the same data.
    let sched = sched
        .restart_as(dir.path(), &bin("gpupool-scheduler"), |_| {})
        .await;
    finds_everything(&sched, &before).await;
    agents_at(&sched, &prev.version).await;
    // The previous release's CLI works against it.
    let listed = prev.cli(&sched.addr(), &["job", "list", "-o", "json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains(&before.running[0].job_id), "{listed}");

    let addr = sched.addr();
    let _agents = upgrade_agents(dir.path(), &sched, &addr, agents, &before).await;
}

/// The admin's `gpupool job list` at `addr` by this build's CLI: its
/// output, or the error it printed.
fn job_list_at(addr: &str) -> Result<String, String> {
    let out = Command::new(bin("gpupool"))
        .args(["job", "list"])
        .env("GPUPOOL_ADDR", addr)
        .env("GPUPOOL_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The rolling upgrade of two PostgreSQL replicas: the standby is replaced
/// first (this build's replica waits behind the previous release's
/// leader), then the leader is stopped and the upgraded standby takes over
/// with everything, then the old leader comes back as this build's
/// standby; the agents follow, and are upgraded in place after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_replicas_upgrade_one_at_a_time() {
    let Some(prev) = Previous::get() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(dir.path()) else {
        return;
    };
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let old = prev.exe("gpupool-scheduler");
    let a = Scheduler::start_replica_installed(&dir_a, &pg.url(), &old).await;
    a.wait_serving().await;
    let b = Scheduler::start_replica_installed(&dir_b, &pg.url(), &old).await;
    let both = format!("{},{}", a.addr(), b.addr());
    let agents: Vec<Agent> = ["pu1", "pu2"]
        .iter()
        .map(|n| {
            Agent::start_at_installed(
                dir.path(),
                &both,
                n,
                "1xH100-80GB",
                &prev.exe("gpupool-agent"),
            )
        })
        .collect();
    wait_ready(&a, 2).await;
    let before = workload(&a).await;

    // 1. The standby: this build's, behind the previous release's leader.
    let new = bin("gpupool-scheduler");
    let b = b.respawn_as(&dir_b, &new, |_| {});
    let refused = eventually(
        Duration::from_secs(20),
        "the upgraded standby answers",
        || async {
            job_list_at(&b.addr())
                .err()
                .filter(|e| e.contains("standby"))
        },
    )
    .await;
    assert!(refused.contains(&a.addr()), "{refused}");
    assert!(job_list_at(&a.addr()).is_ok(), "the old leader still leads");

    // 2. The leader: stopped; the upgraded standby takes over; then it
    // comes back as this build's standby.
    let b_addr = b.addr();
    let _a = a.respawn_as(&dir_a, &new, |_| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while job_list_at(&b_addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the upgraded standby did not take over: {:?}",
                job_list_at(&b_addr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    finds_everything(&b, &before).await;
    agents_at(&b, &prev.version).await;

    // 3. The agents, in place.
    let _agents = upgrade_agents(dir.path(), &b, &both, agents, &before).await;
}
