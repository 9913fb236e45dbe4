//! Instance networks for real (R-CREATE-14, R-POOL-1): five test hosts,
//! each an agent in its own network namespace on one bridge, the scheduler
//! on the host with `[networks] enabled`; the checks below run twice, with
//! the overlay (VXLAN) and with `mode = "routed"` (routes between hosts).
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
//! - Nothing is left behind: no namespace, veth, bridge, VXLAN, route or DNAT
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

/// The tests here count the machine's instance namespaces and share the
/// hosts' names: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    /// still has: links named gpb*/gpx*/gv*/gpr*, DNAT rules and routes.
    fn leftovers(&self, k: usize) -> Vec<String> {
        let ns = &self.hosts[k - 1].ns;
        let mut left: Vec<String> = ip(&["-n", ns, "-o", "link", "show"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| ["gpb", "gpx", "gv", "gpr"].iter().any(|p| n.starts_with(p)))
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
        // A routed network's routes to instances on other hosts.
        left.extend(
            ip(&["-n", ns, "route", "show", "proto", "201"])
                .unwrap_or_default()
                .lines()
                .map(|l| format!("route {}", l.trim())),
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

/// "The world": an address outside the hosts' network, in the test's
/// namespace where the hosts' default route leads (on the test bridge),
/// with a TCP listener; removed on drop.
struct World {
    dev: String,
    address: String,
    target: String,
    _listener: std::net::TcpListener,
}

impl World {
    fn make(bridge: &str) -> World {
        let id = std::process::id() % 200 + 20;
        let address = format!("198.18.{id}.1/32");
        ip(&["addr", "add", &address, "dev", bridge]).unwrap();
        let ip4 = address.trim_end_matches("/32").to_string();
        let listener = std::net::TcpListener::bind((ip4.as_str(), 0)).unwrap();
        let target = format!("{ip4}:{}", listener.local_addr().unwrap().port());
        World {
            dev: bridge.to_string(),
            address,
            target,
            _listener: listener,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = ip(&["addr", "del", &self.address, "dev", &self.dev]);
    }
}

/// One test's hosts, the instance namespaces there were before it and its
/// directory. On drop (a panic too) its instances' processes are killed
/// and their namespaces removed, so a failed test leaves nothing running.
struct Bed {
    hosts: Hosts,
    before: Vec<String>,
    dir: tempfile::TempDir,
}

impl Bed {
    /// None (after saying why) where the test cannot run here.
    fn make(hosts: usize) -> Option<Bed> {
        if !can_run() {
            return None;
        }
        let hosts = match Hosts::create(hosts) {
            Ok(h) => h,
            Err(err) => {
                assert!(!in_ci(), "cannot make the test hosts: {err}");
                eprintln!("SKIPPED: cannot make the test hosts: {err}");
                return None;
            }
        };
        Some(Bed {
            hosts,
            before: instance_namespaces(),
            dir: test_dir(),
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let path = self.dir.path().to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&path) {
                // SAFETY: kill has no memory preconditions; the shims lead
                // their process groups.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        for ns in instance_namespaces() {
            if !self.before.contains(&ns) {
                let _ = ip(&["netns", "del", &ns]);
            }
        }
    }
}

/// Runs `args` in instance namespace `ns`, entered through its shim's
/// process (the agents run in mount namespaces of their own, where its
/// /run/netns mount is).
fn in_instance_ns(ns: &str, args: &[&str]) -> String {
    let needle = format!("--netns\0/run/netns/{ns}\0");
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| panic!("no process of {ns}"));
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// The `host:18080` endpoints `service endpoints` lists for `svc`.
fn endpoints_of(s: &Scheduler, token: &str, svc: &str) -> Vec<String> {
    let out = s.cli_as(token, &["service", "endpoints", svc]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.ends_with(":18080"))
        .map(String::from)
        .collect()
}

/// A one-shot PROBE of `targets` (`host:port,...`) in `pool`, as `token`'s
/// tenant: its job id.
fn probe_job(s: &Scheduler, token: &str, pool: &str, targets: &str) -> String {
    let env = format!("TARGETS={targets}");
    submit_id(
        s,
        token,
        &[
            "--kind",
            "batch-service",
            "--pool",
            pool,
            "--cpu-only",
            "--completions",
            "1",
            "--env",
            &env,
            "--",
            "python3",
            "-c",
            PROBE,
        ],
    )
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
    networks_are_real_and_isolated("overlay").await;
}

/// The same checks with `[networks] mode = "routed"`: no VXLAN, the hosts
/// route to each other's instances (they share the test bridge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_tenant_and_job_networks_are_real_and_isolated() {
    networks_are_real_and_isolated("routed").await;
}

async fn networks_are_real_and_isolated(mode: &str) {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(bed) = Bed::make(5) else { return };
    let (hosts, before, dir) = (&bed.hosts, &bed.before, &bed.dir);
    let log_since = own_mac_complaints(0.0).map(|(_, last)| last);
    let config = format!("[networks]\nenabled = true\nmode = \"{mode}\"\n");
    let sched = Scheduler::start_on_with_config(dir.path(), "0.0.0.0", &config).await;
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
                "",
            )
        })
        .collect();
    wait_ready(&sched, 5).await;
    let mut admin = sched.admin().await;
    let token_a = tenant_with_token(&mut admin, "net-a", 2, 8).await;
    let token_b = tenant_with_token(&mut admin, "net-b", 1, 8).await;
    let spec = spec_of(&mut admin, "H100-80GB").await;
    // B's pool lets nothing out of its network.
    for (token, name, nodes, az, egress) in [
        (&token_a, "a-svc", "2", "AZ1", None),
        (&token_b, "b-svc", "1", "AZ2", Some("--no-egress")),
    ] {
        let mut args = vec![
            "pool", "create", "--type", "deploy", "--name", name, "--spec", &spec, "--nodes",
            nodes, "--az", az,
        ];
        args.extend(egress);
        let out = sched.cli_as(token, &args);
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
    // IPv4 only in the instances' namespaces: no IPv6 address at all.
    let mine: Vec<String> = instance_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert_eq!(mine.len(), 2, "{mine:?}");
    for ns in &mine {
        let v6 = in_instance_ns(ns, &["ip", "-6", "addr", "show"]);
        assert!(v6.trim().is_empty(), "{ns}: {v6}");
        assert!(
            in_instance_ns(ns, &["ip", "-4", "addr", "show"]).contains("10.144."),
            "the check sees the instance's namespace"
        );
    }
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

    // Across the hosts over VXLAN, or (routed) through host 1's route to
    // host 2's replica, with no VXLAN device and no bridge: the replica's
    // veth on host 1 is on no bridge, and its address is routed on it.
    let on = |node: &str| replicas.iter().find(|i| i.node_id == node).unwrap();
    let links = ip(&["-n", &hosts.hosts[0].ns, "-o", "link", "show"]).unwrap();
    let routes = ip(&["-n", &hosts.hosts[0].ns, "route", "show", "proto", "201"]).unwrap();
    let via_h2 = format!(
        "{} via {} ",
        on("h2").network_address,
        hosts.hosts[1].address
    );
    if mode == "routed" {
        assert!(
            !links.contains(": gpx") && !links.contains(": gpb"),
            "{links}"
        );
        assert!(routes.contains(&via_h2), "{routes}");
        let veth = links
            .lines()
            .find(|l| l.contains(": gpr"))
            .unwrap_or_else(|| panic!("no routed veth on host 1: {links}"));
        assert!(!veth.contains(" master "), "{veth}");
        let name = veth.split(": ").nth(1).unwrap().split('@').next().unwrap();
        let local = ip(&["-n", &hosts.hosts[0].ns, "route", "show", "dev", name]).unwrap();
        assert!(
            local.contains(&format!("{} ", on("h1").network_address)),
            "{name}: {local}"
        );
    } else {
        assert!(links.contains(": gpx"), "{links}");
        assert!(routes.trim().is_empty(), "{routes}");
    }

    // The endpoints answer from outside the cluster (the test's namespace).
    let endpoints: Vec<String> = eventually(Duration::from_secs(20), "both endpoints", || async {
        let eps = endpoints_of(&sched, &token_a, &svc);
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

    // A rolling restart replaces both replicas, one at a time: the
    // endpoints answer again, and each new replica's hosts file (its
    // sandbox's /etc/hosts) names its sibling's new address, also the
    // first one, started while its sibling was still the old one.
    let old_ids: Vec<String> = replicas.iter().map(|i| i.instance_id.clone()).collect();
    cli_ok_at(&sched.addr(), &token_a, &["service", "restart", &svc]);
    let renewed = eventually(
        Duration::from_secs(60),
        "both replicas replaced",
        || async {
            let j = get_job(&sched, &svc).await;
            let now: Vec<pb::Instance> = j
                .instances
                .into_iter()
                .filter(|i| i.state == pb::InstanceState::Running as i32 && i.ready)
                .filter(|i| !old_ids.contains(&i.instance_id))
                .collect();
            (now.len() == 2).then_some(now)
        },
    )
    .await;
    for i in &renewed {
        let sibling = renewed.iter().find(|o| o.rank != i.rank).unwrap();
        let file = dir.path().join(format!(
            "agent-{}/state/networks/{}.hosts",
            i.node_id, i.instance_id
        ));
        wait_until(Duration::from_secs(10), "the hosts file updated", || {
            std::fs::read_to_string(&file)
                .unwrap_or_default()
                .contains(&format!(
                    "{}\t{}.{svc}\n",
                    sibling.network_address, sibling.rank
                ))
        });
    }
    eventually(
        Duration::from_secs(20),
        "the endpoints after the restart",
        || async {
            let eps = endpoints_of(&sched, &token_a, &svc);
            let answered = eps.iter().all(|ep| {
                std::net::TcpStream::connect_timeout(&ep.parse().unwrap(), Duration::from_secs(2))
                    .ok()
                    .and_then(|mut c| {
                        let mut text = String::new();
                        std::io::Read::read_to_string(&mut c, &mut text).ok()?;
                        Some(text.starts_with("replica "))
                    })
                    .unwrap_or(false)
            });
            (eps.len() == 2 && answered).then_some(())
        },
    )
    .await;
    let replicas = renewed;
    let replicas: Vec<&pb::Instance> = replicas.iter().collect();

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
    let mut targets: Vec<String> = replicas
        .iter()
        .map(|i| format!("{}:18080", i.network_address))
        .collect();
    // Nor the scheduler, on the nodes' own network (the underlay); nor,
    // its pool being no_egress, the world, which A's instances reach.
    let scheduler = addr.trim_start_matches("http://").to_string();
    targets.push(scheduler.clone());
    let world = World::make(&hosts.bridge);
    targets.push(world.target.clone());
    let a_out = probe_job(&sched, &token_a, "a-svc", &world.target);
    wait_state(&sched, &a_out, pb::JobState::Succeeded).await;
    let seen = logs(&sched, &a_out, 0);
    assert!(
        seen.contains(&format!("reached {}", world.target)),
        "A's egress: {seen}"
    );
    let probe = probe_job(&sched, &token_b, "b-svc", &targets.join(","));
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
        "",
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
    // Every node's gateway has the same MAC: none of its frames crossed a
    // VXLAN, so no bridge saw its own MAC come in from another node.
    if let Some(since) = log_since {
        let seen = own_mac_complaints(since).map(|(seen, _)| seen);
        assert_eq!(seen, Some(Vec::new()), "the kernel log");
    }
}

/// The kernel's complaints of a bridge receiving its own MAC from a VXLAN
/// device, logged after `since` (a `dmesg` time stamp; 0: all), and the
/// time stamp of the last line logged. None where the log cannot be read,
/// which CI does not allow.
fn own_mac_complaints(since: f64) -> Option<(Vec<String>, f64)> {
    let stamp = |l: &str| -> f64 {
        l.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let out = Command::new("dmesg").output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let last = text.lines().last().map(stamp).unwrap_or(0.0);
            let seen = text
                .lines()
                .filter(|l| stamp(l) > since)
                .filter(|l| l.contains("on gpx") && l.contains("own address as source"))
                .map(String::from)
                .collect();
            Some((seen, last))
        }
        _ => {
            assert!(!in_ci(), "cannot read the kernel log (dmesg)");
            eprintln!("not checked: cannot read the kernel log (dmesg)");
            None
        }
    }
}

/// The instance of a custom network: serves on 9000 (its security group
/// lets the VPC in) and 9001 (it does not), then tries the VPC host on
/// 8080 (allowed out) and 8081 (not).
const VPC_INSTANCE: &str = r#"
import os, socket, threading, time
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"instance\n"); c.close()
for p in (9000, 9001):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
vpc = os.environ["VPC_HOST"]
# (no brace-wrapped "port" in this text: the agent expands it in a service command)
for dest in (8080, 8081):
    try:
        c = socket.create_connection((vpc, dest), timeout=3)
        print(f"reached {vpc}:{dest}: {c.recv(100).decode().strip()}", flush=True)
    except Exception as e:
        print(f"blocked {vpc}:{dest}: {type(e).__name__}", flush=True)
print("probed", flush=True)
time.sleep(3600)
"#;

/// Listens on 8080 and 8081 ("vpc host PORT" to each connection).
const VPC_HOST: &str = r#"
import socket, threading, time
def serve(s, port):
    while True:
        c, _ = s.accept(); c.sendall(f"vpc host {port}\n".encode()); c.close()
for p in (8080, 8081):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(16)
    threading.Thread(target=serve, args=(s, p), daemon=True).start()
print("vpc host up", flush=True)
time.sleep(3600)
"#;

/// From namespace `ns`: "reached" or "blocked" for each target (PROBE).
fn probe_from(ns: &str, targets: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", PROBE])
        .env("TARGETS", targets)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// R-CREATE-14 with a custom network: the operator's bridge on a test host
/// holds a "VPC host"; a deploy pool naming the VPC's subnet and a
/// security group puts its instance on that bridge with an address of the
/// configured range, and the group decides what passes, both ways; its
/// health check works from inside its namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_network_is_the_vpc_with_its_security_groups() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let Some(bed) = Bed::make(1) else { return };
    let (hosts, before, dir) = (&bed.hosts, &bed.before, &bed.dir);
    let id = std::process::id() % 200 + 20;
    // The operator's side, in host 1: a bridge on the VPC, and a VPC host.
    let host = &hosts.hosts[0];
    let (vpc_br, vpc_ns) = (format!("gptvb{id}"), format!("gptv{id}"));
    let (vpc_if, vpc_peer) = (format!("gptv{id}a"), format!("gptv{id}b"));
    let vpc_host = format!("192.168.{id}.10");
    let _vpc = VpcHost { ns: vpc_ns.clone() };
    for args in [
        vec!["-n", &host.ns, "link", "add", &vpc_br, "type", "bridge"],
        vec!["-n", &host.ns, "link", "set", &vpc_br, "up"],
        vec!["netns", "add", &vpc_ns],
        vec![
            "-n", &host.ns, "link", "add", &vpc_if, "type", "veth", "peer", "name", &vpc_peer,
        ],
        vec!["-n", &host.ns, "link", "set", &vpc_peer, "netns", &vpc_ns],
        vec![
            "-n", &host.ns, "link", "set", &vpc_if, "master", &vpc_br, "up",
        ],
        vec!["-n", &vpc_ns, "link", "set", &vpc_peer, "name", "eth0"],
    ] {
        ip(&args).unwrap();
    }
    let cidr = format!("{vpc_host}/24");
    for args in [
        vec!["-n", &vpc_ns, "addr", "add", &cidr, "dev", "eth0"],
        vec!["-n", &vpc_ns, "link", "set", "eth0", "up"],
        vec!["-n", &vpc_ns, "link", "set", "lo", "up"],
    ] {
        ip(&args).unwrap();
    }
    let mut vpc_server = Proc::spawn(
        {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &vpc_ns, "python3", "-c", VPC_HOST]);
            c
        },
        dir.path().join("vpc-host.log"),
    );
    // Listening before any instance probes it.
    wait_until(Duration::from_secs(30), "the VPC host listening", || {
        std::fs::read_to_string(dir.path().join("vpc-host.log"))
            .is_ok_and(|l| l.contains("vpc host up"))
    });

    let config = format!(
        "[networks]\nenabled = true\n\
         [networks.subnets.subnet-t]\nvpc = \"vpc-t\"\ncidr = \"192.168.{id}.0/24\"\n\
         first = \"192.168.{id}.100\"\nlast = \"192.168.{id}.120\"\ntenants = [\"net-c\"]\n\
         [networks.security_groups.sg-t]\ntenants = [\"net-c\"]\n\
         ingress = [{{ protocol = \"tcp\", ports = \"9000\", cidr = \"192.168.{id}.0/24\" }}]\n\
         egress = [{{ protocol = \"tcp\", ports = \"8080\", cidr = \"{vpc_host}/32\" }}]\n"
    );
    let sched = Scheduler::start_on_with_config(dir.path(), "0.0.0.0", &config).await;
    let addr = sched.addr().replace("127.0.0.1", &hosts.gateway);
    let _agent = Agent::start_on_host(
        dir.path(),
        &addr,
        "h1",
        "1xH100-80GB",
        "AZ1",
        &host.ns,
        &host.address,
        &format!("[networks.vpcs]\n\"vpc-t\" = \"{vpc_br}\"\n"),
    );
    wait_ready(&sched, 1).await;
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "net-c", 1, 8).await;
    let other = tenant_with_token(&mut admin, "net-d", 1, 8).await;
    let spec = spec_of(&mut admin, "H100-80GB").await;
    let create_as = |token: &str, subnet: &str, group: &str| {
        sched.cli_as(
            token,
            &[
                "pool",
                "create",
                "--type",
                "deploy",
                "--name",
                "c-svc",
                "--spec",
                &spec,
                "--nodes",
                "1",
                "--az",
                "AZ1",
                "--vpc",
                "vpc-t",
                "--subnet",
                subnet,
                "--security-group",
                group,
            ],
        )
    };
    let create = |subnet: &str, group: &str| create_as(&token, subnet, group);
    // Unknown ids are refused, each named; so are ids not open to the
    // tenant.
    let refused = create_as(&other, "subnet-t", "sg-t");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        why.contains("\"subnet-t\"") && why.contains("\"sg-t\""),
        "{why}"
    );
    let refused = create("subnet-x", "sg-x");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        why.contains("\"subnet-x\"") && why.contains("\"sg-x\""),
        "{why}"
    );
    let out = create("subnet-t", "sg-t");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(30), "the pool Running", || {
        String::from_utf8_lossy(&sched.cli_as(&token, &["pool", "list"]).stdout)
            .lines()
            .any(|l| l.contains("c-svc") && l.contains("Running"))
    });

    let vpc_env = format!("VPC_HOST={vpc_host}");
    let svc = submit_id(
        &sched,
        &token,
        &[
            "--kind",
            "online-service",
            "--pool",
            "c-svc",
            "--port",
            "9000",
            "--health-tcp",
            "--env",
            &vpc_env,
            "--",
            "python3",
            "-c",
            VPC_INSTANCE,
        ],
    );
    wait_state(&sched, &svc, pb::JobState::Running).await;
    // Ready: the agent's health check reaches it from inside its namespace
    // (the node has no address on the VPC).
    let job = eventually(Duration::from_secs(30), "the replica ready", || async {
        let j = get_job(&sched, &svc).await;
        j.instances.first().is_some_and(|i| i.ready).then_some(j)
    })
    .await;
    let inst = &job.instances[0];
    assert_eq!(inst.network, "subnet/subnet-t");
    assert_eq!(inst.network_address, format!("192.168.{id}.100"));
    wait_until(Duration::from_secs(30), "the instance's probes", || {
        logs(&sched, &svc, 0).contains("probed")
    });
    let seen = logs(&sched, &svc, 0);
    assert!(
        seen.contains(&format!("reached {vpc_host}:8080: vpc host 8080")),
        "egress allowed on 8080: {seen}"
    );
    assert!(
        seen.contains(&format!("blocked {vpc_host}:8081")),
        "egress not allowed on 8081: {seen}"
    );
    // Ingress: the VPC host reaches the instance on 9000 only.
    let a = &inst.network_address;
    let seen = probe_from(&vpc_ns, &format!("{a}:9000,{a}:9001"));
    assert!(seen.contains(&format!("reached {a}:9000")), "{seen}");
    assert!(seen.contains(&format!("blocked {a}:9001")), "{seen}");

    cli_ok(&sched, &["job", "cancel", &svc]);
    wait_state(&sched, &svc, pb::JobState::Cancelled).await;
    wait_until(Duration::from_secs(30), "the namespace removed", || {
        instance_namespaces() == *before
    });
    // The operator's bridge stays; nothing of ours is on it.
    let ports = ip(&["-n", &host.ns, "-o", "link", "show", "master", &vpc_br]).unwrap();
    assert!(
        ports.lines().all(|l| !l.contains(": gv")),
        "a veth left on the VPC bridge: {ports}"
    );
    wait_until(Duration::from_secs(10), "no rule left", || {
        hosts.leftovers(1).is_empty()
    });
    vpc_server.kill();
}

/// The VPC host's namespace, removed on drop.
struct VpcHost {
    ns: String,
}

impl Drop for VpcHost {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
