//! Instance networks for real (R-CREATE-14, R-POOL-1): five test hosts,
//! each an agent in its own network namespace on one bridge, the scheduler
//! on the host with `[networks] enabled`.
//!
//! - Tenant A's deploy pool on hosts 1 and 2: A's two service replicas
//!   reach each other by name (`RANK.JOB`, the sandbox's hosts file) over
//!   A's network (VXLAN between the hosts); tenant B's instance on host 3
//!   reaches neither replica's address (the connection is dropped).
//! - `service endpoints` answer from the test's own namespace (outside the
//!   cluster): the published port is DNAT to the replica.
//! - The public pool: a 2-rank training job on hosts 4 and 5 meets at
//!   MASTER_ADDR:MASTER_PORT over the job's own network; another job
//!   cannot connect to rank 0.
//! - Nothing is left behind: no namespace, veth, bridge, VXLAN or DNAT
//!   rule once the jobs end, also after an agent SIGKILL whose instance
//!   died while it was down (the restarted agent removes its namespace).
//!
//! Real parts: root agents (tenant uids, namespaces), iproute2, nftables,
//! the kernel's VXLAN; the jobs are python3 scripts run as host processes.

use std::process::Command;
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;

/// A replica: serves "replica RANK" on PORT, and reaches its sibling by
/// name on the same port.
const REPLICA: &str = r#"
import os, socket, threading, time
port = int(os.environ["PORT"]); job = os.environ["GPUPOOL_JOB_ID"]; rank = int(os.environ["RANK"])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(16)
def peer():
    other = f"{1 - rank}.{job}"
    for _ in range(300):
        try:
            c = socket.create_connection((other, port), timeout=1)
            print(f"reached {other} at {c.getpeername()[0]}: {c.recv(100).decode().strip()}", flush=True)
            return
        except Exception:
            time.sleep(0.2)
    print(f"cannot reach {other}", flush=True)
threading.Thread(target=peer, daemon=True).start()
while True:
    c, _ = s.accept(); c.sendall(f"replica {rank}\n".encode()); c.close()
"#;

/// Tries each `host:port` of TARGETS: "reached" or "blocked" per target.
const PROBE: &str = r#"
import os, socket
for t in os.environ["TARGETS"].split(","):
    host, port = t.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(f"reached {t}", flush=True)
    except Exception as e:
        print(f"blocked {t}: {type(e).__name__}", flush=True)
"#;

/// Torch-style rendezvous: rank 0 listens on MASTER_PORT and prints what
/// arrives; rank 1 connects to MASTER_ADDR and says hello. Both stay.
const RANKS: &str = r#"
import os, socket, time
rank = int(os.environ["RANK"]); addr = os.environ["MASTER_ADDR"]; port = int(os.environ["MASTER_PORT"])
if rank == 0:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    print(f"rank 0 listening on {addr}:{port}", flush=True)
    while True:
        c, peer = s.accept(); data = c.recv(100).decode().strip(); c.close()
        if data: print(f"rank 0 got {data!r} from {peer[0]}", flush=True)
else:
    for _ in range(300):
        try:
            c = socket.create_connection((addr, port), timeout=1); c.sendall(b"hello from rank 1"); c.close(); break
        except Exception:
            time.sleep(0.2)
    print("rank 1 sent", flush=True)
    time.sleep(3600)
"#;

/// One test host: a network namespace with a veth on the test bridge.
struct Host {
    ns: String,
    host_if: String,
    address: String,
}

/// The test's bridge and hosts; removed on drop.
struct Hosts {
    bridge: String,
    gateway: String,
    hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Hosts {
    fn create(n: usize) -> Result<Hosts, String> {
        let id = std::process::id() % 200 + 20;
        let mut h = Hosts {
            bridge: format!("gptb{id}"),
            gateway: format!("10.233.{id}.1"),
            hosts: Vec::new(),
        };
        ip(&["link", "add", &h.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", h.gateway),
            "dev",
            &h.bridge,
        ])?;
        ip(&["link", "set", &h.bridge, "up"])?;
        for k in 1..=n {
            let host = Host {
                ns: format!("gpth{id}-{k}"),
                host_if: format!("gpth{id}v{k}"),
                address: format!("10.233.{id}.{}", 10 + k),
            };
            let peer = format!("gptp{id}v{k}");
            let _ = ip(&["netns", "del", &host.ns]);
            ip(&["netns", "add", &host.ns])?;
            h.hosts.push(host);
            let host = h.hosts.last().unwrap();
            ip(&[
                "link",
                "add",
                &host.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", &host.ns])?;
            ip(&["link", "set", &host.host_if, "master", &h.bridge, "up"])?;
            ip(&["-n", &host.ns, "link", "set", &peer, "name", "eth0"])?;
            ip(&[
                "-n",
                &host.ns,
                "addr",
                "add",
                &format!("{}/24", host.address),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &host.ns, "route", "add", "default", "via", &h.gateway])?;
        }
        Ok(h)
    }

    /// The instance-network devices and namespaces host `k` (1-based)
    /// still has: links named gpb*/gpx*/gv*, and DNAT rules.
    fn leftovers(&self, k: usize) -> Vec<String> {
        let ns = &self.hosts[k - 1].ns;
        let mut left: Vec<String> = ip(&["-n", ns, "-o", "link", "show"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("gpb") || n.starts_with("gpx") || n.starts_with("gv"))
            .collect();
        let rules = Command::new("ip")
            .args([
                "netns", "exec", ns, "nft", "list", "table", "inet", "gpupool",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        left.extend(
            rules
                .lines()
                .filter(|l| l.contains("dnat ip to") || l.contains("dnat to"))
                .map(|l| l.trim().to_string()),
        );
        left
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["link", "del", &h.host_if]);
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A route in the test's namespace, with forwarding on; both undone on
/// drop.
struct Route {
    dest: String,
    forwarding: String,
}

impl Route {
    fn add(dest: &str, via: &str) -> Route {
        let forwarding =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        ip(&["route", "add", dest, "via", via]).unwrap();
        Route {
            dest: dest.to_string(),
            forwarding,
        }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        let _ = ip(&["route", "del", &self.dest]);
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", self.forwarding.trim());
    }
}

/// The instance namespaces (`gpi-*`) on this machine.
fn instance_namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("gpi-"))
        .map(String::from)
        .collect()
}

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!in_ci(), "CI runs the tests as root");
        eprintln!("SKIPPED: not root: networks need a root agent");
        return false;
    }
    require_tool("nft", "nftables").is_some()
        && require_tool("bridge", "iproute2").is_some()
        && require_tool("python3", "python3").is_some()
}

/// Searchable by the tenants' ids, under /var/lib as on a node (see
/// tests/sandbox.rs).
fn test_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("gpupool-networks-")
        .tempdir_in("/var/lib")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

async fn wait_state(s: &Scheduler, id: &str, state: pb::JobState) -> pb::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let j = get_job(s, id).await;
        if j.state == state as i32 {
            return j;
        }
        if std::time::Instant::now() >= deadline {
            let logs = String::from_utf8_lossy(&s.cli(&["job", "logs", id]).stdout).into_owned();
            panic!("{id} never {state:?}: {j:#?}\nlogs:\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn logs(s: &Scheduler, id: &str, instance: usize) -> String {
    let out = s.cli(&["job", "logs", id, "--instance", &instance.to_string()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn submit_id(s: &Scheduler, token: &str, args: &[&str]) -> String {
    let mut all = vec!["job", "submit", "--cpu", "100m", "--memory", "64MiB"];
    all.extend_from_slice(args);
    let out = s.cli_as(token, &all);
    assert!(
        out.status.success(),
        "submit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("j-"))
        .unwrap_or_else(|| panic!("no job id in {text}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_and_job_networks_are_real_and_isolated() {
    if !can_run() {
        return;
    }
    let hosts = match Hosts::create(5) {
        Ok(h) => h,
        Err(err) => {
            assert!(!in_ci(), "cannot make the test hosts: {err}");
            eprintln!("SKIPPED: cannot make the test hosts: {err}");
            return;
        }
    };
    let before = instance_namespaces();
    let dir = test_dir();
    let sched =
        Scheduler::start_on_with_config(dir.path(), "0.0.0.0", "[networks]\nenabled = true\n")
            .await;
    let addr = sched.addr().replace("127.0.0.1", &hosts.gateway);
    let zones = ["AZ1", "AZ1", "AZ2", "AZ3", "AZ3"];
    let mut agents: Vec<Agent> = hosts
        .hosts
        .iter()
        .enumerate()
        .map(|(k, h)| {
            Agent::start_on_host(
                dir.path(),
                &addr,
                &format!("h{}", k + 1),
                "1xH100-80GB",
                zones[k],
                &h.ns,
                &h.address,
            )
        })
        .collect();
    wait_ready(&sched, 5).await;
    let mut admin = sched.admin().await;
    let token_a = tenant_with_token(&mut admin, "net-a", 2, 8).await;
    let token_b = tenant_with_token(&mut admin, "net-b", 1, 8).await;
    let spec = admin
        .pools
        .list_specs(pb::ListSpecsRequest {})
        .await
        .unwrap()
        .into_inner()
        .specs
        .into_iter()
        .find(|s| s.gpu_model == "H100-80GB")
        .expect("a spec of the fake GPUs")
        .name;
    for (token, name, nodes, az) in [
        (&token_a, "a-svc", "2", "AZ1"),
        (&token_b, "b-svc", "1", "AZ2"),
    ] {
        let out = sched.cli_as(
            token,
            &[
                "pool", "create", "--type", "deploy", "--name", name, "--spec", &spec, "--nodes",
                nodes, "--az", az,
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(Duration::from_secs(30), "the pool Running", || {
            String::from_utf8_lossy(&sched.cli_as(token, &["pool", "list"]).stdout)
                .lines()
                .any(|l| l.contains(name) && l.contains("Running"))
        });
    }

    // A's two replicas, one per host (a GPU each), reach each other by name.
    let svc = submit_id(
        &sched,
        &token_a,
        &[
            "--kind",
            "online-service",
            "--pool",
            "a-svc",
            "--gpus",
            "1",
            "--instances",
            "2",
            "--port",
            "18080",
            "--health-tcp",
            "--",
            "python3",
            "-c",
            REPLICA,
        ],
    );
    let job = wait_state(&sched, &svc, pb::JobState::Running).await;
    let replicas: Vec<&pb::Instance> = job.instances.iter().collect();
    assert_eq!(replicas.len(), 2);
    let mut nodes: Vec<&str> = replicas.iter().map(|i| i.node_id.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["h1", "h2"]);
    for i in &replicas {
        assert_eq!(i.network, "tenant/net-a");
        assert!(i.network_address.starts_with("10.144."), "{i:?}");
    }
    assert_ne!(replicas[0].network_address, replicas[1].network_address);
    for rank in 0..2 {
        let other = &replicas[1 - rank];
        wait_until(
            Duration::from_secs(30),
            "a replica reaching its sibling",
            || {
                logs(&sched, &svc, rank).contains(&format!(
                    "reached {}.{svc} at {}: replica {}",
                    other.rank, other.network_address, other.rank
                ))
            },
        );
    }

    // The endpoints answer from outside the cluster (the test's namespace).
    let endpoints: Vec<String> = eventually(Duration::from_secs(20), "both endpoints", || async {
        let out = sched.cli_as(&token_a, &["service", "endpoints", &svc]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let eps: Vec<String> = text
            .split_whitespace()
            .filter(|w| w.ends_with(":18080"))
            .map(String::from)
            .collect();
        (eps.len() == 2).then_some(eps)
    })
    .await;
    for ep in &endpoints {
        assert!(
            hosts
                .hosts
                .iter()
                .any(|h| ep.starts_with(&format!("{}:", h.address))),
            "{ep} is a host's address"
        );
        let mut c =
            std::net::TcpStream::connect_timeout(&ep.parse().unwrap(), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("endpoint {ep}: {e}"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut c, &mut text).unwrap();
        assert!(text.starts_with("replica "), "{ep} answered {text:?}");
    }

    // Tenant B, on host 3, reaches neither of A's replicas, even with the
    // underlay routing A's subnet to host 1 (only host 1's rules stop it).
    let a_subnet = format!(
        "{}/22",
        replicas[0]
            .network_address
            .rsplit_once('.')
            .map(|(net, _)| format!("{net}.0"))
            .unwrap()
    );
    let h1 = replicas.iter().find(|i| i.node_id == "h1").unwrap();
    let _route = Route::add(&a_subnet, &hosts.hosts[0].address);
    assert!(h1.network_address.starts_with("10.144.0."), "{h1:?}");
    let targets: Vec<String> = replicas
        .iter()
        .map(|i| format!("{}:18080", i.network_address))
        .collect();
    let probe = submit_id(
        &sched,
        &token_b,
        &[
            "--kind",
            "batch-service",
            "--pool",
            "b-svc",
            "--cpu-only",
            "--completions",
            "1",
            "--env",
            &format!("TARGETS={}", targets.join(",")),
            "--",
            "python3",
            "-c",
            PROBE,
        ],
    );
    let done = wait_state(&sched, &probe, pb::JobState::Succeeded).await;
    assert_eq!(done.instances[0].node_id, "h3");
    assert_eq!(done.instances[0].network, "tenant/net-b");
    let seen = logs(&sched, &probe, 0);
    for t in &targets {
        assert!(
            seen.contains(&format!("blocked {t}")),
            "B reached {t}:\n{seen}"
        );
    }
    assert!(!seen.contains("reached"), "{seen}");

    // The public pool: a job's ranks meet over the job's own network.
    let ranks = submit_id(
        &sched,
        ADMIN_TOKEN,
        &[
            "--kind",
            "training",
            "--gpus",
            "1",
            "--instances",
            "2",
            "--",
            "python3",
            "-c",
            RANKS,
        ],
    );
    let job = wait_state(&sched, &ranks, pb::JobState::Running).await;
    let rank0 = job.instances.iter().find(|i| i.rank == 0).unwrap().clone();
    let rank1 = job.instances.iter().find(|i| i.rank == 1).unwrap().clone();
    assert_eq!(rank0.network, format!("job/{ranks}"));
    wait_until(
        Duration::from_secs(30),
        "rank 0 hearing from rank 1",
        || {
            logs(&sched, &ranks, 0).contains(&format!(
                "rank 0 got 'hello from rank 1' from {}",
                rank1.network_address
            ))
        },
    );
    let master = logs(&sched, &ranks, 0)
        .lines()
        .find_map(|l| l.strip_prefix("rank 0 listening on ").map(String::from))
        .expect("rank 0 says where it listens");
    assert!(
        master.starts_with(&format!("{}:", rank0.network_address)),
        "{master}"
    );
    // Another public job cannot connect to rank 0.
    let other = submit_id(
        &sched,
        ADMIN_TOKEN,
        &[
            "--kind",
            "training",
            "--cpu-only",
            "--env",
            &format!("TARGETS={master}"),
            "--",
            "python3",
            "-c",
            PROBE,
        ],
    );
    wait_state(&sched, &other, pb::JobState::Succeeded).await;
    let seen = logs(&sched, &other, 0);
    assert!(seen.contains(&format!("blocked {master}")), "{seen}");

    for (token, id) in [(&token_a, &svc), (&ADMIN_TOKEN.to_string(), &ranks)] {
        cancel_as(&sched, token, id).await;
        wait_state(&sched, id, pb::JobState::Cancelled).await;
    }

    // An agent killed, its instance dying while it is down: the restarted
    // agent removes the namespace nothing owns.
    let long = submit_id(
        &sched,
        &token_b,
        &[
            "--kind",
            "batch-service",
            "--pool",
            "b-svc",
            "--cpu-only",
            "--completions",
            "1",
            "--",
            "python3",
            "-c",
            "import time; time.sleep(600.4242)",
        ],
    );
    wait_state(&sched, &long, pb::JobState::Running).await;
    wait_until(
        Duration::from_secs(10),
        "the long instance's namespace",
        || instance_namespaces().len() > before.len(),
    );
    let owned: Vec<String> = instance_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    agents[2].proc.signal(libc::SIGKILL);
    let pid = eventually(Duration::from_secs(10), "the long job's pid", || async {
        host_pid_of(&["python3", "-c", "import time; time.sleep(600.4242)"])
    })
    .await;
    // SAFETY: killing the test job's process group (its shim leads it).
    unsafe {
        let pgid = libc::getpgid(pid);
        libc::kill(-pgid, libc::SIGKILL);
    }
    agents[2] = Agent::start_on_host(
        dir.path(),
        &addr,
        "h3",
        "1xH100-80GB",
        "AZ2",
        &hosts.hosts[2].ns,
        &hosts.hosts[2].address,
    );

    wait_until(
        Duration::from_secs(30),
        "the dead instance's namespace removed",
        || {
            let now = instance_namespaces();
            owned.iter().all(|n| !now.contains(n))
        },
    );
    // Its instance died: the job ended Failed (no retries asked).
    wait_state(&sched, &long, pb::JobState::Failed).await;

    // Nothing is left: namespaces, devices, published ports.
    let left = || {
        let mut left: Vec<String> = instance_namespaces()
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        for k in 1..=5 {
            left.extend(hosts.leftovers(k).into_iter().map(|l| format!("h{k}: {l}")));
        }
        left
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !left().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(left(), Vec::<String>::new(), "left behind");
    drop(agents);
}
