//! Footprint benchmark of the agent (a program, not a test):
//! `cargo run --release -p gpupool-e2e --bin footprint [SECONDS]`.
//!
//! Starts the real scheduler and one real agent with 8 fake GPUs and
//! 1 s heartbeats, runs 16 instances on it, then samples the agent's
//! resident memory (VmRSS) and CPU time (utime + stime from /proc) once a
//! second for SECONDS (default 30) while it also serves /metrics every
//! second, and prints the figures.

use std::time::{Duration, Instant};

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    // The harness uses fast heartbeats; the agent follows the scheduler's 200 ms.
    let agent = Agent::start_with_metrics(dir.path(), &sched, "bench", "8xH100-80GB");
    let pid = agent.proc.child.id();
    wait_ready(&sched, 1).await;
    let mut jobs = Vec::new();
    for i in 0..16 {
        let mut spec = training(0, &["sleep", "600"]);
        if i < 8 {
            spec.resources.as_mut().unwrap().gpus = 1;
        }
        let r = spec.resources.as_mut().unwrap();
        r.cpu_milli = 10;
        r.memory_mib = 16;
        jobs.push(submit(&sched, spec).await.unwrap().job_id);
    }
    for id in &jobs {
        wait_job(&sched, id, pb::JobState::Running, Duration::from_secs(60)).await;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    let mut rss = Vec::new();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = http_get(agent.metrics_port, "/metrics").await;
        rss.push(rss_kib(pid));
    }
    let cpu_s = (cpu_ticks(pid) - c0) as f64 / hz;
    let wall = t0.elapsed().as_secs_f64();
    rss.sort_unstable();
    println!(
        "agent footprint: 8 fake GPUs, 16 running instances, heartbeat every 200 ms, /metrics scraped every 1 s, {seconds} s"
    );
    println!(
        "  RSS median {:.1} MiB, max {:.1} MiB",
        rss[rss.len() / 2] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0
    );
    println!(
        "  CPU {:.2}% of one core ({cpu_s:.2} s over {wall:.1} s)",
        cpu_s / wall * 100.0
    );
    let mut jobs_client = sched.jobs().await;
    for id in jobs {
        let _ = jobs_client
            .cancel_job(pb::CancelJobRequest { job_id: id })
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}
