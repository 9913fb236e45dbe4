//! Instance start latency (a program, not a test):
//! `cargo run --release -p gpupool-e2e --bin startbench [STARTS]` (as root).
//!
//! Starts Debian's docker-registry, the real scheduler and one real root
//! agent, pushes a busybox image, makes the node a tenant's train pool (the
//! image job needs the host network to reach this program's listener, and
//! the host network is for training jobs there), and measures submit → process running on
//! the idle node, STARTS times each (default 50), for: a host process, the
//! image from the node's cache, and `podman run` of the same image (when
//! podman is installed). "Running" is the moment the process connects to a
//! TCP listener of this program: the first thing its command does. Prints
//! p50/p90/p99 and the mean, in milliseconds.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use gpupool_e2e::registry::{BusyboxConfig, Registry};
use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    println!(
        "{name:<22} n={:<3} p50 {:>7.1} ms  p90 {:>7.1} ms  p99 {:>7.1} ms  mean {:>7.1} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        percentile(&ms, 0.99),
        mean
    );
    percentile(&ms, 0.5)
}

/// Waits for one connection on `listener`; the time it came.
fn accepted(listener: &TcpListener, timeout: Duration) -> Option<Instant> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok(_) => return Some(Instant::now()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// Submits as the tenant whose train pool is `POOL`.
async fn submit_in_pool(tenant: &mut Clients, spec: pb::JobSpec) -> pb::Job {
    tenant
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                pool: POOL.into(),
                ..spec
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The tenant's own train pool: the host network (which the image job
/// needs to reach the benchmark's listener) is for training jobs there.
const POOL: &str = "bench";

async fn measure(
    sched: &Scheduler,
    tenant: &mut Clients,
    spec: impl Fn(u16) -> pb::JobSpec,
    starts: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..starts {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t0 = Instant::now();
        let job = submit_in_pool(tenant, spec(port)).await;
        let at = tokio::task::spawn_blocking(move || accepted(&listener, Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("job {} never connected", job.job_id));
        out.push((at - t0).as_secs_f64() * 1000.0);
        wait_job(
            sched,
            &job.job_id,
            pb::JobState::Succeeded,
            Duration::from_secs(60),
        )
        .await;
    }
    out
}

fn podman(conf: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("podman");
    // runc and cgroupfs: what works on a host with hybrid cgroups; no
    // default ulimits: podman raises nofile/nproc, which needs
    // CAP_SYS_RESOURCE (gpupool's containers inherit the agent's limits).
    c.env("CONTAINERS_CONF", conf)
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .args(args);
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let starts: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let registry = Registry::start();
    registry.push_busybox("t/busybox", "1", BusyboxConfig::default());
    let image = format!("{}/t/busybox:1", registry.addr);
    let sched = Scheduler::start(dir.path()).await;
    let _agent = Agent::start_with(
        dir.path(),
        &sched,
        "n1",
        "1xA100-40GB",
        "AZ1",
        &format!("[registries.\"{}\"]\ninsecure = true\n", registry.addr),
    );
    wait_ready(&sched, 1).await;
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "bench", 1, 1).await;
    let mut tenant = sched.clients(Some(&token)).await;
    train_pool(&mut tenant, POOL, "A100-40GB", 1).await;
    let connect = |port: u16| {
        vec![
            "/bin/busybox".to_string(),
            "nc".into(),
            "127.0.0.1".into(),
            port.to_string(),
        ]
    };
    // Warm-up: the first pull fills the cache.
    let warm = submit_in_pool(
        &mut tenant,
        pb::JobSpec {
            image: image.clone(),
            ..training(0, &["true"])
        },
    )
    .await;
    wait_job(
        &sched,
        &warm.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    println!("instance start latency, submit -> process running, {starts} starts each");
    let host = measure(
        &sched,
        &mut tenant,
        |port| pb::JobSpec {
            command: connect(port),
            ..training(0, &[])
        },
        starts,
    )
    .await;
    let host_p50 = report("host process", host);
    let cached = measure(
        &sched,
        &mut tenant,
        |port| pb::JobSpec {
            command: connect(port),
            image: image.clone(),
            network: "host".into(),
            ..training(0, &[])
        },
        starts,
    )
    .await;
    let cached_p50 = report("image (cached)", cached);
    println!(
        "cached image - host process (p50): {:+.1} ms",
        cached_p50 - host_p50
    );
    if which("podman").is_none() {
        println!("podman run             not installed (apt-get install podman)");
        return;
    }
    let conf = dir.path().join("containers.conf");
    std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n").unwrap();
    let pulled = podman(&conf, &["pull", "--tls-verify=false", &image])
        .output()
        .unwrap();
    if !pulled.status.success() {
        println!(
            "podman pull failed: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
        return;
    }
    let mut ms = Vec::new();
    for _ in 0..starts {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let t0 = Instant::now();
        let mut child = podman(
            &conf,
            &[
                "run",
                "--rm",
                "--network",
                "host",
                &image,
                "/bin/busybox",
                "nc",
                "127.0.0.1",
                &port,
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let Some(at) = accepted(&listener, Duration::from_secs(60)) else {
            let out = child.wait_with_output().unwrap();
            println!(
                "podman run never connected: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        };
        ms.push((at - t0).as_secs_f64() * 1000.0);
        let _ = child.wait();
    }
    let podman_p50 = report("podman run", ms);
    println!(
        "cached image - podman run (p50): {:+.1} ms",
        cached_p50 - podman_p50
    );
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}
