//! `net`: throughput and round-trip time between two instances on two
//! hosts, over an instance network (the agent's own code builds it: bridge,
//! VXLAN or routes, namespaces, nftables) and over the host network, in the
//! same run: the overlay (`[networks] mode = "overlay"`, VXLAN) and the
//! routed mode (`mode = "routed"`) side by side.
//!
//! The hosts are network namespaces on one bridge (as `tests/networks.rs`
//! makes them); in each, this program runs itself (`net-attach`) to attach
//! one instance with `gpupool_agent::network::Networks`, exactly as the
//! agent does. Throughput is `iperf3` (Debian's), TCP, one stream;
//! round-trip time is a 1-byte TCP echo (`net-echo`), both between the
//! hosts' own addresses and between the instances' addresses. Needs root.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Options of `net`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Runs of each measure (each run measures every path, starting at
    /// another each time); medians are reported, throughput also as each
    /// instance network's against the host network's in the same run.
    #[arg(long, default_value_t = 3)]
    pub repetitions: u32,
    /// Round trips per RTT run.
    #[arg(long, default_value_t = 2000)]
    pub round_trips: u32,
    /// `text` or `json` (one object on one line).
    #[arg(long, value_enum, default_value_t = crate::OutputFormat::Text)]
    pub output: crate::OutputFormat,
}

/// Options of the hidden `net-attach` (run inside a host namespace).
#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    #[arg(long)]
    pub state: std::path::PathBuf,
    #[arg(long)]
    pub local: String,
    #[arg(long)]
    pub instance: String,
    #[arg(long)]
    pub address: String,
    #[arg(long)]
    pub peers: String,
    /// A routed network (no VXLAN) with these routes, `ADDR=NODE,...`.
    #[arg(long)]
    pub routes: Option<String>,
    /// Detach instead.
    #[arg(long)]
    pub detach: bool,
}

/// Options of the hidden `net-echo`.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// `serve` or `ping`.
    pub mode: String,
    /// `ADDR:PORT` to ping, or the port to serve on.
    pub target: String,
    #[arg(long, default_value_t = 2000)]
    pub round_trips: u32,
}

/// The overlay network's and the routed one's VNI, subnet and gateway.
const NETS: [(u32, &str, &str); 2] = [
    (0x10_0fff, "10.250.0.0/24", "10.250.0.1"),
    (0x10_0ffe, "10.251.0.0/24", "10.251.0.1"),
];

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// In a host namespace: attaches (or detaches) one instance, printing its
/// namespace's name.
pub fn run_attach(a: &AttachArgs) -> anyhow::Result<()> {
    let n = gpupool_agent::network::Networks::new(&a.state, &a.local)?;
    if a.detach {
        n.detach(&a.instance);
        return Ok(());
    }
    let (vni, subnet, gateway) = NETS[usize::from(a.routes.is_some())];
    let routes = a
        .routes
        .iter()
        .flat_map(|r| r.split(','))
        .filter_map(|r| r.split_once('='))
        .map(|(addr, node)| (addr.to_string(), node.to_string()))
        .collect();
    let attach = gpupool_agent::network::Attach {
        name: "bench".into(),
        vni,
        subnet: subnet.into(),
        gateway: gateway.into(),
        address: a.address.clone(),
        peers: a.peers.split(',').map(String::from).collect(),
        routed: a.routes.is_some(),
        routes,
        ..Default::default()
    };
    let attached = n.attach(&a.instance, &attach, 0)?;
    println!(
        "{}",
        attached
            .netns
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    Ok(())
}

/// A 1-byte TCP echo: `serve PORT` answers one connection's bytes; `ping
/// ADDR:PORT` prints the median and p99 round trip in microseconds.
pub fn run_echo(a: &EchoArgs) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    match a.mode.as_str() {
        "serve" => {
            let l = std::net::TcpListener::bind(("0.0.0.0", a.target.parse::<u16>()?))?;
            println!("ready");
            let (mut s, _) = l.accept()?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                s.write_all(&b)?;
            }
            Ok(())
        }
        "ping" => {
            let mut s = connect_retrying(&a.target)?;
            s.set_nodelay(true)?;
            let mut b = [7u8; 1];
            let mut rtts = Vec::with_capacity(a.round_trips as usize);
            for _ in 0..a.round_trips {
                let t = Instant::now();
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            rtts.sort_by(f64::total_cmp);
            println!(
                "{:.1} {:.1}",
                rtts[rtts.len() / 2],
                rtts[rtts.len() * 99 / 100]
            );
            Ok(())
        }
        other => bail!("net-echo: serve or ping, not {other:?}"),
    }
}

fn connect_retrying(target: &str) -> anyhow::Result<std::net::TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpStream::connect(target) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => bail!("connect {target}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The two hosts and their instances; removed on drop. (Its links are not
/// named `gpb*`: a node's rules take those for instance bridges.)
struct Bed {
    id: u32,
    hosts: Vec<(String, String)>,
    instance_ns: Vec<String>,
    state: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Bed {
    fn make() -> anyhow::Result<Bed> {
        let id = std::process::id() % 200 + 20;
        let state = tempdir::Dir(std::env::temp_dir().join(format!("gpupool-bench-net-{id}")));
        let mut bed = Bed {
            id,
            hosts: Vec::new(),
            instance_ns: Vec::new(),
            state,
        };
        let br = format!("gnbb{id}");
        run("ip", &["link", "add", &br, "type", "bridge"])?;
        run("ip", &["link", "set", &br, "up"])?;
        for k in 1..=2u32 {
            let ns = format!("gnb{id}-{k}");
            let addr = format!("10.234.{id}.{}", 10 + k);
            let (veth, peer) = (format!("gnb{id}v{k}"), format!("gnb{id}p{k}"));
            run("ip", &["netns", "add", &ns])?;
            bed.hosts.push((ns.clone(), addr.clone()));
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            )?;
            run("ip", &["link", "set", &peer, "netns", &ns])?;
            run("ip", &["link", "set", &veth, "master", &br, "up"])?;
            run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let me = std::env::current_exe()?;
        let me = me.to_string_lossy();
        let peers = format!("{},{}", bed.hosts[0].1, bed.hosts[1].1);
        let routes = format!(
            "10.251.0.10={},10.251.0.11={}",
            bed.hosts[0].1, bed.hosts[1].1
        );
        // Overlay instances 10.250.0.1K, then routed ones 10.251.0.1K.
        for (net, name) in ["o", "r"].iter().enumerate() {
            for k in 0..2 {
                let (ns, addr) = bed.hosts[k].clone();
                let state = bed.state.0.join(format!("h{k}"));
                let instance = format!("bench-{name}{k}");
                let address = format!("10.25{net}.0.{}", 10 + k);
                let mut args = vec![
                    format!("--net=/run/netns/{ns}"),
                    "--".into(),
                    me.to_string(),
                    "net-attach".into(),
                    "--state".into(),
                    state.to_string_lossy().into_owned(),
                    "--local".into(),
                    addr,
                    "--instance".into(),
                    instance,
                    "--address".into(),
                    address,
                    "--peers".into(),
                    peers.clone(),
                ];
                if net == 1 {
                    args.extend(["--routes".into(), routes.clone()]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                // nsenter, not `ip netns exec`: the latter runs in a mount
                // namespace of its own, where the instance namespace's bind
                // mount under /run/netns would stay.
                let out = run("nsenter", &args)?;
                bed.instance_ns.push(out.trim().to_string());
            }
        }
        Ok(bed)
    }

    /// iperf3 from `client_ns` to `server` (in `server_ns`): bits/s.
    fn iperf(
        &self,
        server_ns: &str,
        client_ns: &str,
        server: &str,
        secs: u32,
    ) -> anyhow::Result<f64> {
        let mut srv = Command::new("ip")
            .args([
                "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5299",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 (install iperf3)")?;
        std::thread::sleep(Duration::from_millis(300));
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                client_ns,
                "iperf3",
                "-c",
                server,
                "-p",
                "5299",
                "-t",
                &secs.to_string(),
                "-J",
            ],
        );
        let _ = srv.kill();
        let _ = srv.wait();
        let v: serde_json::Value = serde_json::from_str(&out?)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 gave no sum_received")
    }

    /// Median and p99 RTT (µs) of the echo from `client_ns` to `server`.
    fn rtt(
        &self,
        server_ns: &str,
        client_ns: &str,
        server: &str,
        n: u32,
    ) -> anyhow::Result<(f64, f64)> {
        let me = std::env::current_exe()?;
        let mut srv = Command::new("ip")
            .args(["netns", "exec", server_ns])
            .arg(&me)
            .args(["net-echo", "serve", "5298"])
            .stdout(Stdio::piped())
            .spawn()?;
        {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(srv.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        }
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                client_ns,
                &me.to_string_lossy(),
                "net-echo",
                "ping",
                &format!("{server}:5298"),
                "--round-trips",
                &n.to_string(),
            ],
        );
        let _ = srv.kill();
        let _ = srv.wait();
        let out = out?;
        let mut it = out.split_whitespace().map(str::parse::<f64>);
        match (it.next(), it.next()) {
            (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50, p99)),
            _ => bail!("net-echo printed {out:?}"),
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Ok(me) = std::env::current_exe() {
            for name in ["o", "r"] {
                for (k, (ns, addr)) in self.hosts.iter().enumerate() {
                    let state = self.state.0.join(format!("h{k}"));
                    let _ = Command::new("nsenter")
                        .arg(format!("--net=/run/netns/{ns}"))
                        .arg("--")
                        .arg(&me)
                        .args(["net-attach", "--detach", "--state"])
                        .arg(&state)
                        .args(["--local", addr, "--instance", &format!("bench-{name}{k}")])
                        .args(["--address", "0.0.0.0", "--peers", ""])
                        .output();
                }
            }
        }
        for (k, (ns, _)) in self.hosts.iter().enumerate() {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("gnb{}v{}", self.id, k + 1)])
                .output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("gnbb{}", self.id)])
            .output();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `net`: builds the bed, measures, prints.
pub fn run_net(a: &NetArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("net needs root (network namespaces, nftables)");
    }
    let bed = Bed::make()?;
    let (h1, h2) = (&bed.hosts[0], &bed.hosts[1]);
    // (client namespace, server namespace, server address) of each path:
    // host network, overlay, routed.
    let paths = [
        (h1.0.as_str(), h2.0.as_str(), h2.1.as_str()),
        (&bed.instance_ns[0], &bed.instance_ns[1], "10.250.0.11"),
        (&bed.instance_ns[2], &bed.instance_ns[3], "10.251.0.11"),
    ];
    let mut bps = vec![Vec::new(); 3];
    let mut p50 = vec![Vec::new(); 3];
    let mut p99 = vec![Vec::new(); 3];
    for run in 0..a.repetitions.max(1) as usize {
        // Each run starts at another path: none is always first (or last)
        // while the machine's speed drifts.
        for j in 0..paths.len() {
            let k = (run + j) % paths.len();
            let (client, server, addr) = paths[k];
            bps[k].push(bed.iperf(server, client, addr, a.seconds)?);
        }
        for (k, (client, server, addr)) in paths.iter().enumerate() {
            let (m, t) = bed.rtt(server, client, addr, a.round_trips)?;
            p50[k].push(m);
            p99[k].push(t);
        }
    }
    // Each instance network against the host network of the same run.
    let ratios: Vec<Vec<f64>> = (1..3)
        .map(|k| bps[k].iter().zip(&bps[0]).map(|(x, h)| x / h).collect())
        .collect();
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        (100.0 * lo, 100.0 * hi)
    };
    let (olo, ohi) = range(&ratios[0]);
    let (rlo, rhi) = range(&ratios[1]);
    let ratio: Vec<f64> = ratios.into_iter().map(median).collect();
    let b: Vec<f64> = bps.into_iter().map(median).collect();
    let r: Vec<f64> = p50.into_iter().map(median).collect();
    let t: Vec<f64> = p99.into_iter().map(median).collect();
    match a.output {
        crate::OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "host_gbps": b[0] / 1e9, "instance_gbps": b[1] / 1e9,
                "routed_gbps": b[2] / 1e9,
                "throughput_ratio": ratio[0], "routed_throughput_ratio": ratio[1],
                "throughput_ratio_range_pct": [olo, ohi], "routed_throughput_ratio_range_pct": [rlo, rhi],
                "host_rtt_p50_us": r[0], "instance_rtt_p50_us": r[1], "routed_rtt_p50_us": r[2],
                "host_rtt_p99_us": t[0], "instance_rtt_p99_us": t[1], "routed_rtt_p99_us": t[2],
                "added_rtt_p50_us": r[1] - r[0], "routed_added_rtt_p50_us": r[2] - r[0],
            })
        ),
        crate::OutputFormat::Text => {
            println!(
                "throughput (iperf3, 1 TCP stream, {} s, median of {} runs; % of the host network in the same run, median and range): host {:.2} Gbit/s; overlay {:.2} Gbit/s ({:.1} %, {olo:.1}–{ohi:.1}); routed {:.2} Gbit/s ({:.1} %, {rlo:.1}–{rhi:.1})",
                a.seconds,
                a.repetitions,
                b[0] / 1e9,
                b[1] / 1e9,
                100.0 * ratio[0],
                b[2] / 1e9,
                100.0 * ratio[1],
            );
            println!(
                "round trip (1-byte TCP echo, {} trips): host p50 {:.1} µs p99 {:.1} µs; overlay p50 {:.1} µs p99 {:.1} µs (+{:.1} µs at p50); routed p50 {:.1} µs p99 {:.1} µs (+{:.1} µs at p50)",
                a.round_trips,
                r[0],
                t[0],
                r[1],
                t[1],
                r[1] - r[0],
                r[2],
                t[2],
                r[2] - r[0],
            );
        }
    }
    Ok(())
}
