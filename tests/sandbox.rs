//! Every instance in its own sandbox (R-POOL-1 "isolated per job"): two
//! tenants' jobs on one node, host processes and images alike. Tenant B's
//! job tries every step of the reproduction that read tenant A's secrets
//! and forged its exit, and each attempt is asserted to fail; A's job ends
//! with its real exit status; a gang's ranks still reach each other.
//!
//! Real parts: a root agent (per-tenant uids, PID/mount/IPC namespaces),
//! `runc` from Debian, Debian's `docker-registry` on 127.0.0.1 and an image
//! the test builds (a busybox-static root file system).

use std::time::Duration;

use gpupool_e2e::registry::{BusyboxConfig, Registry};
use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

/// True when this test can run here (root, runc); under CI it must.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(!in_ci(), "CI runs the tests as root");
        eprintln!("SKIPPED: not root: tenants cannot get identities of their own");
        return false;
    }
    require_tool("runc", "runc").is_some()
}

/// The test's directory, searchable by the tenants' ids (the state dir's
/// parents must be, as /var/lib is), and under /var/lib as on a node (not
/// /tmp or /var/tmp, which every job replaces), so the agent's state is
/// covered in the jobs' mount namespace.
fn test_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("gpupool-sandbox-")
        .tempdir_in("/var/lib")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

async fn logs_as(s: &Scheduler, token: &str, job: &str) -> String {
    let out = s.cli_as(token, &["job", "logs", job]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for `state`; on another end, or none in 90 s, panics with every
/// instance's state and log and the agent's last lines.
async fn wait_for(c: &Cluster, id: &str, state: pb::JobState) -> pb::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let ended = [
        pb::JobState::Succeeded,
        pb::JobState::Failed,
        pb::JobState::Cancelled,
    ];
    let job = loop {
        let j = get_job(&c.sched, id).await;
        if j.state == state as i32
            || ended.iter().any(|s| *s as i32 == j.state)
            || std::time::Instant::now() >= deadline
        {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if job.state != state as i32 {
        let agent_log = std::fs::read_to_string(c.state.parent().unwrap().join("agent.log"))
            .unwrap_or_default();
        let tail: Vec<&str> = agent_log.lines().rev().take(25).collect();
        let mut instances = String::new();
        for (n, i) in job.instances.iter().enumerate() {
            let log = c
                .sched
                .cli(&["job", "logs", id, "--instance", &n.to_string()])
                .stdout;
            instances += &format!(
                "instance {n}: {:?} {:?}\n{}\n",
                i.state,
                i.reason,
                String::from_utf8_lossy(&log)
            );
        }
        panic!(
            "job {id} is {:?}, not {state:?}\n{instances}agent:\n{}",
            job.state,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    job
}

async fn submit_as(s: &Scheduler, token: &str, spec: pb::JobSpec) -> pb::Job {
    s.clients(Some(token))
        .await
        .jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner()
}

/// Host pid of the process whose command line holds `marker`.
fn host_pid_of(marker: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        holds(pid, marker).then_some(pid)
    })
}

fn holds(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        text.contains(marker) && !text.contains("shim")
    })
}

/// Host pid of the process of `instance` (of the agent whose state dir is
/// `state`) whose command line holds `marker`. The tests of this file run
/// side by side, each with its own cluster whose job ids start alike: a
/// search of all of /proc could find another test's process.
fn instance_pid_of(state: &std::path::Path, instance: &str, marker: &str) -> Option<i32> {
    let cg = instance_cgroup(state, "pids", instance)?;
    let mut stack = vec![cg];
    while let Some(dir) = stack.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if let Some(pid) = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .find(|&pid| holds(pid, marker))
        {
            return Some(pid);
        }
        stack.extend(
            std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

/// The cgroup directory of `instance` for `controller` (v1; on v2 the
/// unified one), read from `/proc/<pid>/cgroup` of the process the agent
/// recorded for it (its shim).
fn instance_cgroup(
    state: &std::path::Path,
    controller: &str,
    instance: &str,
) -> Option<std::path::PathBuf> {
    let record = std::fs::read_to_string(state.join(format!("instances/{instance}.json"))).ok()?;
    let record: serde_json::Value = serde_json::from_str(&record).ok()?;
    let pid = record["pid"].as_u64()?;
    let root = std::path::Path::new("/sys/fs/cgroup");
    let v2 = !root.join(controller).exists();
    let dir = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            if controllers.split(',').any(|c| c == controller) {
                Some(root.join(controllers).join(path))
            } else if v2 && controllers.is_empty() {
                Some(root.join(path))
            } else {
                None
            }
        })?;
    dir.to_str()?
        .ends_with(&format!("_{instance}"))
        .then_some(dir)
}

/// The attacks of tenant B, as one shell script that prints `BLOCKED <step>`
/// or `LEAKED <step>` for each. `a_pid` is A's process as the host sees it;
/// `a_dir` A's working directory; `state` the agent's state dir; `config`
/// its config file; `sh` the shell to use.
fn attack_script(a_pid: i32, a_dir: &str, a_instance: &str, state: &str, config: &str) -> String {
    format!(
        r#"
try() {{ step=$1; shift; if "$@" >/dev/null 2>&1; then echo "LEAKED $step"; else echo "BLOCKED $step"; fi; }}
# The marker is spelled so that this script's own command line lacks it.
printf 'marker-of-tenant-%s' a > /tmp/pattern
found() {{ grep -l -f /tmp/pattern /proc/[0-9]*/cmdline 2>/dev/null | grep -q . ; }}
try list-processes found
try read-cmdline grep -q marker /proc/{a_pid}/cmdline
try read-environ grep -q topsecret /proc/{a_pid}/environ
try read-cwd ls /proc/{a_pid}/cwd/
try read-record cat {state}/instances/{a_instance}.json
try read-log cat {state}/logs/{a_instance}.log
try read-workdir cat {a_dir}/secret.txt
try list-workdir ls {a_dir}
try write-exit sh -c 'echo "code 0" > {state}/instances/{a_instance}.exit'
try kill-process kill -9 {a_pid}
try kill-group kill -9 -{a_pid}
try precreate-path sh -c 'mkdir -p {state}/tenants/tenant-a/planted && [ -e {a_dir}/secret.txt ]'
try read-credential cat {state}/node-credential
try read-config grep -q scheduler_addr {config}
try list-state sh -c 'ls {state}/instances | grep -q .'
try list-notice ls {state}/notices/{a_instance}/
try write-notice touch {state}/notices/{a_instance}/stop
echo ATTACKS-DONE
"#
    )
}

fn assert_all_blocked(log: &str, steps: &[&str]) {
    assert!(
        log.contains("ATTACKS-DONE"),
        "the attack script did not finish:\n{log}"
    );
    for step in steps {
        assert!(
            log.contains(&format!("BLOCKED {step}")),
            "step {step} not blocked:\n{log}"
        );
    }
    assert!(!log.contains("LEAKED"), "an attack succeeded:\n{log}");
}

const STEPS: [&str; 17] = [
    "list-processes",
    "read-cmdline",
    "read-environ",
    "read-cwd",
    "read-record",
    "read-log",
    "read-workdir",
    "list-workdir",
    "write-exit",
    "kill-process",
    "kill-group",
    "precreate-path",
    "read-credential",
    "read-config",
    "list-state",
    "list-notice",
    "write-notice",
];

struct Cluster {
    _dir: tempfile::TempDir,
    sched: Scheduler,
    _agent: Agent,
    a: String,
    b: String,
    state: std::path::PathBuf,
    config: std::path::PathBuf,
}

async fn cluster(extra: &str) -> Cluster {
    let dir = test_dir();
    let sched = Scheduler::start(dir.path()).await;
    let agent = Agent::start_with(
        dir.path(),
        &sched,
        "n1",
        "2xA100-40GB",
        "AZ1",
        &format!("confinement = \"required\"\n{extra}"),
    );
    wait_ready(&sched, 1).await;
    let mut admin = sched.admin().await;
    let a = tenant_with_token(&mut admin, "tenant-a", 0, 8).await;
    let b = tenant_with_token(&mut admin, "tenant-b", 0, 8).await;
    let state = dir.path().join("agent-n1/state");
    let config = dir.path().join("agent-n1/agent.toml");
    Cluster {
        _dir: dir,
        sched,
        _agent: agent,
        a,
        b,
        state,
        config,
    }
}

/// Tenant A's victim: a secret in its environment and its working
/// directory; it ends (exit 7) when the test (root on the host) drops
/// `stop-now` into that directory.
fn victim(image: Option<&str>) -> pb::JobSpec {
    let script = "echo topsecret-a-file > secret.txt; echo victim-up; \
                  while [ ! -f stop-now ]; do sleep 0.2; done; exit 7";
    let mut spec = training(0, &["sh", "-c", script, "marker-of-tenant-a"]);
    spec.env.insert("SECRET".into(), "topsecret-a-env".into());
    spec.working_dir = "proj-a".into();
    if let Some(image) = image {
        spec.image = image.into();
    }
    spec
}

async fn run_matrix(c: &Cluster, image: Option<&str>) {
    let a_job = submit_as(&c.sched, &c.a, victim(image)).await;
    wait_for(&c, &a_job.job_id, pb::JobState::Running).await;
    eventually(Duration::from_secs(30), "the victim up", || async {
        logs_as(&c.sched, &c.a, &a_job.job_id)
            .await
            .contains("victim-up")
            .then_some(())
    })
    .await;
    let a_instance = format!("{}-0", a_job.job_id);
    let a_pid = instance_pid_of(&c.state, &a_instance, "marker-of-tenant-a")
        .expect("the victim's host pid");
    let a_dir = c.state.join("tenants/tenant-a/proj-a");
    assert!(
        a_dir.join("secret.txt").exists(),
        "the victim works in its tenant's directory"
    );
    let script = attack_script(
        a_pid,
        a_dir.to_str().unwrap(),
        &a_instance,
        c.state.to_str().unwrap(),
        c.config.to_str().unwrap(),
    );
    let mut spec = training(0, &["sh", "-c", &script]);
    if let Some(image) = image {
        spec.image = image.into();
    }
    let b_job = submit_as(&c.sched, &c.b, spec).await;
    wait_for(&c, &b_job.job_id, pb::JobState::Succeeded).await;
    let log = logs_as(&c.sched, &c.b, &b_job.job_id).await;
    assert_all_blocked(&log, &STEPS);
    assert!(
        !c.state.join("tenants/tenant-a/planted").exists(),
        "B planted a path in A's directory"
    );

    // A TensorBoard of B cannot serve A's directory.
    let mut tb = pb::JobSpec {
        kind: pb::JobKind::Tensorboard as i32,
        command: vec![
            "sh".into(),
            "-c".into(),
            "ls $GPUPOOL_LOG_DIR; sleep 30".into(),
        ],
        log_dir: a_dir.to_str().unwrap().into(),
        instances: 1,
        resources: Some(pb::Resources {
            cpu_milli: 100,
            memory_mib: 64,
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(image) = image {
        tb.image = image.into();
    }
    let tb_job = submit_as(&c.sched, &c.b, tb.clone()).await;
    let failed = wait_for(&c, &tb_job.job_id, pb::JobState::Failed).await;
    assert!(
        failed.instances[0]
            .reason
            .contains("outside the tenant's directory"),
        "{failed:#?}"
    );
    tb.log_dir = "../tenant-a/proj-a".into();
    let refused = c
        .sched
        .clients(Some(&c.b))
        .await
        .jobs
        .submit_job(pb::SubmitJobRequest { spec: Some(tb) })
        .await
        .unwrap_err();
    assert!(refused.message().contains(".."), "{refused:?}");

    // A is unharmed and ends with its real status.
    std::fs::write(a_dir.join("stop-now"), "").unwrap();
    let done = wait_for(&c, &a_job.job_id, pb::JobState::Failed).await;
    assert_eq!(done.instances[0].exit_code, Some(7), "{done:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_process_tenants_cannot_reach_each_other() {
    if !can_run() {
        return;
    }
    // A 1 MiB disk budget: the agent's cleanup pass runs against B's links.
    let c = cluster("disk_budget_mib = 1").await;
    run_matrix(&c, None).await;

    // Each tenant is its own uid, and a job sees only its own processes.
    let who = "id -u; ls -d /proc/[0-9]* | wc -l; cat /proc/1/cmdline | tr '\\0' ' '";
    let a = submit_as(&c.sched, &c.a, training(0, &["sh", "-c", who])).await;
    let b = submit_as(&c.sched, &c.b, training(0, &["sh", "-c", who])).await;
    for j in [&a, &b] {
        wait_for(&c, &j.job_id, pb::JobState::Succeeded).await;
    }
    let la = logs_as(&c.sched, &c.a, &a.job_id).await;
    let lb = logs_as(&c.sched, &c.b, &b.job_id).await;
    let uid = |l: &str| l.lines().next().unwrap().trim().parse::<u32>().unwrap();
    assert_ne!(uid(&la), uid(&lb), "{la}\n{lb}");
    assert!(
        uid(&la) >= 65_536 && uid(&lb) >= 65_536,
        "unprivileged ids: {la} {lb}"
    );
    let procs: usize = la.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(
        procs <= 5,
        "a job sees only its own processes, saw {procs}:\n{la}"
    );
    assert!(la.contains("shim"), "PID 1 is the instance's init: {la}");

    // A gang's ranks reach each other (the host network).
    let gang = "if [ \"$RANK\" = 0 ]; then \
                python3 -c 'import socket,os;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((\"0.0.0.0\",int(os.environ[\"MASTER_PORT\"])));s.listen();c,_=s.accept();print(\"rank0 got\",c.recv(64).decode())'; \
                else for i in $(seq 100); do python3 -c 'import socket,os;s=socket.create_connection((os.environ[\"MASTER_ADDR\"],int(os.environ[\"MASTER_PORT\"])));s.send(b\"hello-from-rank1\")' 2>/dev/null && break; sleep 0.2; done; echo rank1 sent; fi";
    let mut spec = training(0, &["sh", "-c", gang]);
    spec.instances = 2;
    let g = submit_as(&c.sched, &c.a, spec).await;
    wait_for(&c, &g.job_id, pb::JobState::Succeeded).await;
    let lg = logs_as(&c.sched, &c.a, &g.job_id).await;
    assert!(lg.contains("rank0 got hello-from-rank1"), "{lg}");

    // B points its `work` at a directory of the host: the cleanup (root)
    // must not delete through the link.
    let victim = c.state.parent().unwrap().parent().unwrap().join("victim");
    std::fs::create_dir_all(victim.join("sub")).unwrap();
    std::fs::write(victim.join("sub/big"), vec![0u8; 2 << 20]).unwrap();
    let plant = format!(
        "rm -rf \"$GPUPOOL_TENANT_DIR/work\" && ln -s {} \"$GPUPOOL_TENANT_DIR/work\" && echo planted",
        victim.display()
    );
    let p = submit_as(
        &c.sched,
        &c.b,
        pb::JobSpec {
            working_dir: "elsewhere".into(),
            ..training(0, &["sh", "-c", &plant])
        },
    )
    .await;
    wait_for(&c, &p.job_id, pb::JobState::Succeeded).await;
    assert!(logs_as(&c.sched, &c.b, &p.job_id).await.contains("planted"));
    // Two of the agent's 5-s passes.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(
        victim.join("sub/big").exists(),
        "the cleanup deleted through B's link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_tenants_cannot_reach_each_other() {
    if !can_run() {
        return;
    }
    let registry = Registry::start();
    let image = format!("{}/t/busybox:1", registry.addr);
    registry.push_busybox("t/busybox", "1", BusyboxConfig::default());
    let c = cluster(&format!(
        "[registries.\"{}\"]\ninsecure = true\n",
        registry.addr
    ))
    .await;
    run_matrix(&c, Some(&image)).await;

    // A link in B's directory does not bring the host into its container:
    // the working directory is resolved without following links.
    let link = submit_as(
        &c.sched,
        &c.b,
        training(
            0,
            &[
                "sh",
                "-c",
                "ln -s / \"$GPUPOOL_TENANT_DIR/rootlink\" && echo linked",
            ],
        ),
    )
    .await;
    wait_for(&c, &link.job_id, pb::JobState::Succeeded).await;
    let through = submit_as(
        &c.sched,
        &c.b,
        pb::JobSpec {
            image: image.clone(),
            working_dir: "rootlink".into(),
            ..training(
                0,
                &[
                    "sh",
                    "-c",
                    "cat /work/etc/hostname && echo LEAKED-host-root",
                ],
            )
        },
    )
    .await;
    let failed = wait_for(&c, &through.job_id, pb::JobState::Failed).await;
    let log = logs_as(&c.sched, &c.b, &through.job_id).await;
    assert!(!log.contains("LEAKED"), "{log}");
    assert!(log.contains("links are not followed"), "{log}\n{failed:#?}");

    // Root in each tenant's containers is that tenant's own host block.
    let who = "id -u; cat /proc/self/uid_map; ls -d /proc/[0-9]* | wc -l";
    let a = submit_as(
        &c.sched,
        &c.a,
        pb::JobSpec {
            image: image.clone(),
            ..training(0, &["sh", "-c", who])
        },
    )
    .await;
    let b = submit_as(
        &c.sched,
        &c.b,
        pb::JobSpec {
            image: image.clone(),
            ..training(0, &["sh", "-c", who])
        },
    )
    .await;
    for j in [&a, &b] {
        wait_for(&c, &j.job_id, pb::JobState::Succeeded).await;
    }
    let la = logs_as(&c.sched, &c.a, &a.job_id).await;
    let lb = logs_as(&c.sched, &c.b, &b.job_id).await;
    let map = |l: &str| {
        l.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 3 && f[0] == "0")
            .map(|f| f[1].parse::<u64>().unwrap())
            .unwrap_or_else(|| panic!("no uid map in {l}"))
    };
    assert!(
        la.lines().any(|l| l.trim() == "0"),
        "root in the container: {la}"
    );
    assert_ne!(map(&la), map(&lb), "{la}\n{lb}");
    assert!(map(&la) >= 65_536, "{la}");

    // A gang's ranks reach each other (gangs use the host network). Both
    // ends are bounded, so a lost line fails the job instead of hanging it,
    // and each rank says when it started, so a failure shows the skew.
    let gang = "echo \"rank $RANK up at $(date +%s) port $MASTER_PORT\"; \
                if [ \"$RANK\" = 0 ]; then busybox timeout 75 busybox nc -l -p $MASTER_PORT; \
                else for i in $(seq 300); do echo hello-from-rank1 | busybox nc $MASTER_ADDR $MASTER_PORT && break; sleep 0.2; done; \
                echo \"rank1 sent (try $i) at $(date +%s)\"; fi";
    let mut spec = training(0, &["sh", "-c", gang]);
    spec.instances = 2;
    spec.image = image.clone();
    let g = submit_as(&c.sched, &c.a, spec).await;
    wait_for(&c, &g.job_id, pb::JobState::Succeeded).await;
    let lg = logs_as(&c.sched, &c.a, &g.job_id).await;
    assert!(lg.contains("hello-from-rank1"), "{lg}");
}

/// Images from a real registry: output reaches `job logs`, the digest is
/// pinned and shown, the second start uses the cache, and a missing tag or a
/// tampered blob fails with its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_verified_cached_and_pinned() {
    if !can_run() {
        return;
    }
    let registry = Registry::start();
    let digest = registry.push_busybox(
        "t/busybox",
        "1",
        BusyboxConfig {
            env: vec!["GREETING=hello-from-the-image".into()],
            ..BusyboxConfig::default()
        },
    );
    let image = format!("{}/t/busybox:1", registry.addr);
    let c = cluster(&format!(
        "[registries.\"{}\"]\ninsecure = true\n",
        registry.addr
    ))
    .await;

    // A tampered layer is refused; put back, it runs.
    let saved = blobs(&registry.storage);
    registry.tamper_layer("t/busybox", "1");
    let bad = submit_as(
        &c.sched,
        &c.a,
        pb::JobSpec {
            image: image.clone(),
            ..training(0, &["true"])
        },
    )
    .await;
    let failed = wait_for(&c, &bad.job_id, pb::JobState::Failed).await;
    assert!(
        failed.instances[0].reason.contains("digest mismatch"),
        "{failed:#?}"
    );
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).unwrap();
    }

    let out = c.sched.cli_as(
        &c.a,
        &[
            "job",
            "submit",
            "--kind",
            "training",
            "--cpu",
            "100m",
            "--memory",
            "64MiB",
            "--image",
            &image,
            "--",
            "sh",
            "-c",
            "echo $GREETING; cat /etc/passwd | head -1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "job ID submitted (...)"
    let first = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("a job id")
        .to_string();
    let done = wait_for(&c, &first, pb::JobState::Succeeded).await;
    assert_eq!(
        done.instances[0].image_digest, digest,
        "pinned to the pushed digest"
    );
    let log = logs_as(&c.sched, &c.a, &first).await;
    assert!(log.contains("hello-from-the-image"), "{log}");
    assert!(log.contains("root:x:0:0"), "{log}");
    assert!(log.contains("gpupool: pulled image"), "{log}");
    let shown =
        String::from_utf8_lossy(&c.sched.cli_as(&c.a, &["job", "get", &first]).stdout).into_owned();
    assert!(
        shown.contains(&digest),
        "job get shows the digest:\n{shown}"
    );

    // The second start does not pull.
    let again = submit_as(
        &c.sched,
        &c.a,
        pb::JobSpec {
            image: image.clone(),
            ..training(0, &["true"])
        },
    )
    .await;
    wait_for(&c, &again.job_id, pb::JobState::Succeeded).await;
    let log = logs_as(&c.sched, &c.a, &again.job_id).await;
    assert!(
        log.contains("found in the node's cache") && !log.contains("pulled image"),
        "{log}"
    );

    // An image whose user is not root writes its /work all the same.
    registry.push_busybox(
        "t/busybox",
        "user",
        BusyboxConfig {
            user: "1000".into(),
            ..BusyboxConfig::default()
        },
    );
    let as_user = submit_as(
        &c.sched,
        &c.a,
        pb::JobSpec {
            image: format!("{}/t/busybox:user", registry.addr),
            ..training(
                0,
                &["sh", "-c", "id -u; touch /work/mine && echo wrote-work"],
            )
        },
    )
    .await;
    wait_for(&c, &as_user.job_id, pb::JobState::Succeeded).await;
    let log = logs_as(&c.sched, &c.a, &as_user.job_id).await;
    assert!(
        log.contains("\n1000\n") && log.contains("wrote-work"),
        "{log}"
    );

    // An unknown tag fails with its cause.
    let missing = submit_as(
        &c.sched,
        &c.a,
        pb::JobSpec {
            image: format!("{}/t/busybox:nope", registry.addr),
            ..training(0, &["true"])
        },
    )
    .await;
    let failed = wait_for(&c, &missing.job_id, pb::JobState::Failed).await;
    assert!(
        failed.instances[0].reason.contains("image not found"),
        "{failed:#?}"
    );
    // And a registry nobody runs.
    let port = free_port();
    let gone = submit_as(
        &c.sched,
        &c.a,
        pb::JobSpec {
            image: format!("127.0.0.1:{port}/t/x:1"),
            ..training(0, &["true"])
        },
    )
    .await;
    let failed = wait_for(&c, &gone.job_id, pb::JobState::Failed).await;
    assert!(
        failed.instances[0].reason.contains("registry unreachable"),
        "{failed:#?}"
    );
}

/// Cgroup limits hold inside containers; a stop leaves nothing behind; an
/// agent SIGKILLed and restarted reattaches a running container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_keep_limits_stops_and_restarts() {
    if !can_run() {
        return;
    }
    let registry = Registry::start();
    registry.push_busybox("t/busybox", "1", BusyboxConfig::default());
    let image = format!("{}/t/busybox:1", registry.addr);
    let extra = format!("[registries.\"{}\"]\ninsecure = true\n", registry.addr);
    let mut c = cluster(&extra).await;
    let with_image = |spec: pb::JobSpec| pb::JobSpec {
        image: image.clone(),
        ..spec
    };

    // OOM inside the container is reported as OOM.
    let mut hog = with_image(training(
        0,
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    ));
    hog.resources.as_mut().unwrap().memory_mib = 32;
    let j = submit_as(&c.sched, &c.a, hog).await;
    let failed = wait_for(&c, &j.job_id, pb::JobState::Failed).await;
    assert!(failed.instances[0].reason.starts_with("OOM"), "{failed:#?}");

    // The CPU quota holds: two busy loops under half a core use about half
    // a core (measured from the instance's cgroup, which holds the
    // container's).
    let mut busy = with_image(training(
        0,
        &["sh", "-c", "(while :; do :; done) & while :; do :; done"],
    ));
    busy.resources.as_mut().unwrap().cpu_milli = 500;
    let j = submit_as(&c.sched, &c.a, busy).await;
    let running = wait_for(&c, &j.job_id, pb::JobState::Running).await;
    let inst = running.instances[0].instance_id.clone();
    eventually(Duration::from_secs(20), "the busy loops", || async {
        instance_pid_of(&c.state, &inst, "while :").map(|_| ())
    })
    .await;
    let usage = eventually(
        Duration::from_secs(20),
        "the container's CPU use",
        || async {
            let cg = instance_cgroup(&c.state, "cpuacct", &inst)?;
            let read = |f: &str| {
                std::fs::read_to_string(cg.join(f))
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            };
            // v1 cpuacct.usage is in ns; v2 cpu.stat's usage_usec in µs.
            let ns = || {
                read("cpuacct.usage").or_else(|| {
                    std::fs::read_to_string(cg.join("cpu.stat"))
                        .ok()?
                        .lines()
                        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                        .map(|us| us * 1000)
                })
            };
            let before = ns()?;
            (before > 0).then_some(())?;
            std::thread::sleep(Duration::from_secs(2));
            Some((ns()? - before) as f64 / 2e9)
        },
    )
    .await;
    eprintln!(
        "cgroup usage {usage:.3} cores; {:?}",
        instance_cgroup(&c.state, "cpuacct", &inst)
    );
    assert!(
        (0.3..=0.7).contains(&usage),
        "used {usage:.2} cores under a 0.5 core quota"
    );
    cancel_as(&c.sched, &c.a, &j.job_id).await;

    // A stop takes the SIGTERM-ignoring child too.
    let stubborn = with_image(training(
        0,
        &[
            "sh",
            "-c",
            "trap '' TERM; (trap '' TERM; exec sleep 1001) & exec sleep 1002",
        ],
    ));
    let j = submit_as(&c.sched, &c.a, stubborn).await;
    wait_for(&c, &j.job_id, pb::JobState::Running).await;
    eventually(Duration::from_secs(20), "both sleeps", || async {
        (host_pid_of("sleep 1001").is_some() && host_pid_of("sleep 1002").is_some()).then_some(())
    })
    .await;
    cancel_as(&c.sched, &c.a, &j.job_id).await;
    wait_for(&c, &j.job_id, pb::JobState::Cancelled).await;
    eventually(Duration::from_secs(20), "nothing left", || async {
        (host_pid_of("sleep 1001").is_none() && host_pid_of("sleep 1002").is_none()).then_some(())
    })
    .await;

    // Before the SIGTERM the container can read why from its notice file
    // (read-only to it).
    let told = with_image(training(
        0,
        &[
            "sh",
            "-c",
            "touch /run/gpupool/x 2>/dev/null || echo notice-dir-read-only; \
             trap 'echo \"notice: $(cat \"$GPUPOOL_STOP_NOTICE\")\"; exit 0' TERM; \
             echo waiting; sleep 1003 & wait",
        ],
    ));
    let j = submit_as(&c.sched, &c.a, told).await;
    wait_for(&c, &j.job_id, pb::JobState::Running).await;
    eventually(Duration::from_secs(20), "the job waiting", || async {
        logs_as(&c.sched, &c.a, &j.job_id)
            .await
            .contains("waiting")
            .then_some(())
    })
    .await;
    cancel_as(&c.sched, &c.a, &j.job_id).await;
    // (Cancelled at once; the instance stops within the grace.)
    let log = eventually(Duration::from_secs(20), "the notice read", || async {
        let log = logs_as(&c.sched, &c.a, &j.job_id).await;
        log.contains("notice:").then_some(log)
    })
    .await;
    assert!(log.contains("notice-dir-read-only"), "{log}");
    assert!(log.contains("notice: killed by user"), "{log}");

    // SIGKILL the agent while a container runs; the restarted agent
    // reattaches it and reports its real end.
    let j = submit_as(
        &c.sched,
        &c.a,
        with_image(training(0, &["sh", "-c", "sleep 4; echo finished; exit 4"])),
    )
    .await;
    let running = wait_for(&c, &j.job_id, pb::JobState::Running).await;
    eventually(Duration::from_secs(20), "the container", || async {
        host_pid_of("sleep 4").map(|_| ())
    })
    .await;
    // Killed once it has recorded the instance (the container may run a
    // moment before the record is written: a crash in that moment loses
    // it, which this test is not about).
    let record = c
        ._dir
        .path()
        .join(format!("agent-n1/state/instances/{}-0.json", j.job_id));
    wait_until(Duration::from_secs(20), "the instance recorded", || {
        record.exists()
    });
    c._agent.proc.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c._agent = Agent::start_with(
        c._dir.path(),
        &c.sched,
        "n1",
        "2xA100-40GB",
        "AZ1",
        &format!("confinement = \"required\"\n{extra}"),
    );
    let done = wait_for(&c, &j.job_id, pb::JobState::Failed).await;
    assert_eq!(done.instances[0].exit_code, Some(4), "{done:#?}");
    assert_eq!(
        done.instances[0].started_at, running.instances[0].started_at,
        "reattached, not restarted"
    );
    assert!(
        logs_as(&c.sched, &c.a, &j.job_id)
            .await
            .contains("finished")
    );
}

/// Every blob file of a registry's storage, with its bytes.
fn blobs(storage: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![storage.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "data") {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}
