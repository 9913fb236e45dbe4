//! Jobs run unprivileged with the agent installed as the README installs it
//! (`cargo install` puts it under `/root/.cargo/bin`, in a 0700 home):
//! `run_as_user = "nobody"` with confinement required, on this host's
//! cgroups (v1 or v2). The instance is `nobody`, in its own cgroup, within
//! its memory limit (an over-limit one is OOM-killed), and cannot touch the
//! agent's records.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

/// True when this test can run here (root, writable cgroups); outside CI it
/// says why it skips, under CI it fails.
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(!in_ci(), "CI runs the tests as root");
        eprintln!("SKIPPED: not root, cannot run jobs as another user");
    }
    root
}

async fn logs(s: &Scheduler, job: &str) -> String {
    let mut stream = s
        .jobs()
        .await
        .get_job_logs(pb::GetJobLogsRequest {
            job_id: job.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        out.extend(c.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_as_nobody_confined_with_the_agent_under_a_private_home() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The installed layout: the binary under a 0700 directory.
    let home = dir.path().join("home");
    let bin_dir = home.join(".cargo/bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let exe = bin_dir.join("gpupool-agent");
    std::fs::copy(bin("gpupool-agent"), &exe).unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let _agent = Agent::start_installed(
        dir.path(),
        &sched,
        "n1",
        "1xH100-80GB",
        "run_as_user = \"nobody\"\nconfinement = \"required\"",
        &exe,
    );
    wait_ready(&sched, 1).await;

    let state = dir.path().join("agent-n1/state");
    let script = format!(
        "id -u; cat /proc/self/cgroup; touch here && echo wrote; \
         ls {}/node-credential >/dev/null 2>&1 && cat {}/node-credential; true",
        state.display(),
        state.display()
    );
    let job = submit(&sched, training(0, &["sh", "-c", &script]))
        .await
        .unwrap();
    let done = wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(30),
    )
    .await;
    let log = logs(&sched, &job.job_id).await;
    assert!(log.starts_with("65534\n"), "not nobody: {log}\n{done:#?}");
    assert!(
        log.lines()
            .any(|l| l.ends_with(&format!("_{}-0", job.job_id))),
        "not in its cgroup: {log}"
    );
    assert!(
        log.contains("wrote"),
        "its working directory is its own: {log}"
    );
    assert!(
        !log.contains("gpn_"),
        "it read the node's credential: {log}"
    );

    // It cannot forge how it ended: its exit file is the root shim's.
    let forge = format!(
        "echo 'code 0' > {}/instances/$GPUPOOL_INSTANCE_ID.exit 2>/dev/null; exit 3",
        state.display()
    );
    let forged = submit(&sched, training(0, &["sh", "-c", &forge]))
        .await
        .unwrap();
    let failed = wait_job(
        &sched,
        &forged.job_id,
        pb::JobState::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(failed.instances[0].exit_code, Some(3), "{failed:#?}");

    // The root shim gets none of the job's environment (LD_PRELOAD and the
    // like would run the job's code as root); the command gets all of it.
    let mut spec = training(0, &["sh", "-c", "exec sleep 60.413"]);
    spec.env.insert("JOB_SECRET".into(), "s3cr3t-value".into());
    spec.env
        .insert("LD_PRELOAD".into(), "/nonexistent/evil.so".into());
    let envjob = submit(&sched, spec).await.unwrap();
    wait_job(
        &sched,
        &envjob.job_id,
        pb::JobState::Running,
        Duration::from_secs(30),
    )
    .await;
    // Host pids: the job is in a PID namespace of its own, its parent is
    // the shim's init there.
    let (ppid, pid) = eventually(Duration::from_secs(10), "the job's pids", || async {
        let pid = host_pid_of(&["sleep", "60.413"])?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .to_string();
        Some((ppid, pid.to_string()))
    })
    .await;
    let environ = |p: &str| {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/environ")).unwrap()).into_owned()
    };
    let shim_env = environ(&ppid);
    assert!(
        !shim_env.contains("s3cr3t-value") && !shim_env.contains("LD_PRELOAD"),
        "the shim got the job's environment: {shim_env:?}"
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{ppid}/cmdline")).unwrap();
    assert!(cmdline.contains("shim"), "{cmdline:?}");
    assert!(environ(&pid).contains("JOB_SECRET=s3cr3t-value"));

    // Its memory limit holds as nobody: over it, OOM-killed.
    let mut spec = training(
        0,
        &[
            "sh",
            "-c",
            "head -c 200000000 /dev/zero | tail > /dev/null; echo survived",
        ],
    );
    spec.resources.as_mut().unwrap().memory_mib = 32;
    let oom = submit(&sched, spec).await.unwrap();
    let failed = wait_job(
        &sched,
        &oom.job_id,
        pb::JobState::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert!(failed.reason.contains("OOM"), "{failed:#?}");
}
