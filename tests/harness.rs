//! Test harness for end-to-end tests: starts the real `gpupool-scheduler`
//! and `gpupool-agent` binaries on free localhost ports, talks to them over
//! real gRPC, and runs the real `gpupool` CLI.
//!
//! The binaries are taken from the cargo target dir the tests were built in
//! (`cargo test --workspace` builds them, since the agent, scheduler and
//! CLI crates have integration tests of their own), or from
//! `GPUPOOL_BIN_DIR`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpupool_proto::v1 as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The admin token every test scheduler is configured with.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Sends `authorization: Bearer <token>` with every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Self(Some(format!("Bearer {token}").parse().unwrap()))
    }
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that authenticates as someone.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Clients of every client-facing service, as one caller.
pub struct Clients {
    pub jobs: pb::job_service_client::JobServiceClient<Authed>,
    pub nodes: pb::node_service_client::NodeServiceClient<Authed>,
    pub pools: pb::pool_service_client::PoolServiceClient<Authed>,
    pub tenants: pb::tenant_service_client::TenantServiceClient<Authed>,
    pub usage: pb::usage_service_client::UsageServiceClient<Authed>,
}

/// A copy of `program` that jobs can run. A root agent runs each tenant's
/// jobs as an unprivileged id with its own `/tmp` and `/var/tmp`: a target
/// dir under `/tmp`, or below a 0700 home, is not theirs to see. The copy
/// goes to `/var/lib/gpupool-e2e/` (0755) then; as another user, the
/// program itself is returned.
pub fn job_visible(program: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return program.to_path_buf();
    }
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new("/var/lib/gpupool-e2e");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = program.file_name().unwrap().to_string_lossy().into_owned();
    let copy = dir.join(format!("{name}-{}", std::process::id()));
    if !copy.exists() {
        let tmp = dir.join(format!(".{name}-{}.tmp", std::process::id()));
        std::fs::copy(program, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &copy).unwrap();
    }
    copy
}

/// Directory holding the gpupool binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GPUPOOL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/debug/deps/<test> -> target/debug; target/debug/<bin> -> target/debug
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of one gpupool binary; panics with advice when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo test --workspace` (which builds it) or set GPUPOOL_BIN_DIR",
        path.display()
    );
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True under CI, where a test that cannot run must fail instead of skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Finds a host tool; outside CI a missing tool skips the check loudly.
pub fn require_tool(tool: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => Some(path),
        None if in_ci() => {
            panic!("{tool} is required under CI=true: install Debian's {package} package")
        }
        None => {
            eprintln!(
                "SKIPPED CHECK: {tool} not found (install Debian's {package}); this check fails under CI=true"
            );
            None
        }
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self { child, log }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit after SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scheduler process with its ports and data dir.
pub struct Scheduler {
    pub proc: Proc,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub config_path: PathBuf,
    /// The `gpupool-scheduler` binary it runs (restarts run it again).
    pub exe: PathBuf,
}

/// The regions and prices of every test scheduler's config: its own keys
/// come first (`extra` may start with top-level keys), its tables last.
const REGIONS: &str = "subscription_regions = [\"region-1\"]\n";
const BILLING: &str = "[billing.default_price]\n\
     on_demand_node_hour_micros = 3600000\n\
     subscription_node_month_micros = 1000000000\n\
     public_instance_hour_micros = 360000\n";

/// Heartbeat and grace used by the tests (ms).
pub const HEARTBEAT_MS: u32 = 200;
pub const GRACE_MS: u32 = 2_000;

impl Scheduler {
    /// Writes a config in `dir` and starts the scheduler on fresh ports.
    pub async fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1").await
    }

    /// [`Scheduler::start`] listening for gRPC on `ip` (e.g. `0.0.0.0` for
    /// agents in another network namespace).
    pub async fn start_on(dir: &Path, ip: &str) -> Self {
        Self::start_configured(dir, ip, "").await
    }

    /// [`Scheduler::start`] with TOML appended to its config (tables such
    /// as `[kinds.notebook]`).
    pub async fn start_with_config(dir: &Path, extra: &str) -> Self {
        Self::start_configured(dir, "127.0.0.1", extra).await
    }

    /// [`Scheduler::start_on`] with TOML appended to its config.
    pub async fn start_on_with_config(dir: &Path, ip: &str, extra: &str) -> Self {
        Self::start_configured(dir, ip, extra).await
    }

    async fn start_configured(dir: &Path, ip: &str, extra: &str) -> Self {
        let config_path = Self::write_config(dir, ip, extra);
        Self::start_with(dir, config_path).await
    }

    /// [`Scheduler::start`] with top-level settings (`key = value` lines,
    /// before the config's tables) added; the previous release refuses
    /// keys it does not know, so the base config holds none of 0.2.0's.
    pub async fn start_with_top(dir: &Path, top: &str) -> Self {
        Self::start_with_top_and_config(dir, top, "").await
    }

    /// [`Scheduler::start_with_top`] with TOML (tables) appended too.
    pub async fn start_with_top_and_config(dir: &Path, top: &str, extra: &str) -> Self {
        let config_path = Self::write_config(dir, "127.0.0.1", extra);
        let text = std::fs::read_to_string(&config_path).unwrap();
        std::fs::write(&config_path, format!("{top}\n{text}")).unwrap();
        Self::start_with(dir, config_path).await
    }

    /// Starts a scheduler with TOML appended to its config without waiting
    /// for it to serve (e.g. one that serves TLS, which the plaintext wait
    /// cannot reach).
    pub fn spawn_with_config(dir: &Path, extra: &str) -> Self {
        let config_path = Self::write_config(dir, "127.0.0.1", extra);
        Self::spawn(dir, config_path)
    }

    /// Starts `gpupool-scheduler serve` on a written config, logging to a
    /// new file in `dir`, and waits only until it listens: it binds the
    /// ports its config names (0: any free one, no race with another
    /// process) and writes the bound addresses to a file.
    fn spawn(dir: &Path, config_path: PathBuf) -> Self {
        Self::spawn_exe(dir, config_path, bin("gpupool-scheduler"))
    }

    /// [`Scheduler::spawn`] of the binary `exe` (another release's).
    fn spawn_exe(dir: &Path, config_path: PathBuf, exe: PathBuf) -> Self {
        let addresses = config_path.with_extension("addresses");
        let _ = std::fs::remove_file(&addresses);
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--address-file")
            .arg(&addresses);
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let mut proc = Proc::spawn(cmd, dir.join(format!("scheduler-{n}.log")));
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&addresses) {
                break text;
            }
            assert!(
                proc.child.try_wait().unwrap().is_none(),
                "the scheduler exited before listening; log:\n{}",
                proc.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "the scheduler is not listening after 20 s; log:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let port = |key: &str| -> u16 {
            text.lines()
                .find_map(|l| {
                    let value = l.strip_prefix(key)?.trim().strip_prefix('=')?;
                    value
                        .trim()
                        .trim_matches('"')
                        .rsplit_once(':')?
                        .1
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {key} address in {}: {text:?}", addresses.display()))
        };
        Self {
            grpc_port: port("grpc"),
            metrics_port: port("metrics"),
            proc,
            config_path,
            exe,
        }
    }

    fn write_config(dir: &Path, ip: &str, extra: &str) -> PathBuf {
        let config_path = dir.join("scheduler.toml");
        std::fs::write(
            &config_path,
            format!(
                "grpc_listen = \"{ip}:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n\
                 data_dir = \"{}\"\n\
                 heartbeat_interval_ms = {HEARTBEAT_MS}\n\
                 node_grace_ms = {GRACE_MS}\n\
                 stop_grace_ms = 1000\n\
                 join_token = \"test-join-token\"\n\
                 admin_token = \"{ADMIN_TOKEN}\"\n\
                 {REGIONS}{extra}\n{BILLING}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        config_path
    }

    /// Pins the config's listen ports to the ones bound, so a restart
    /// listens where the agents and clients already connect.
    fn pin_ports(&self) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let pin = |line: &str, key: &str, port: u16| {
            let addr = line.strip_prefix(key)?.trim().strip_prefix('=')?.trim();
            let (ip, _) = addr.trim_matches('"').rsplit_once(':')?;
            Some(format!("{key} = \"{ip}:{port}\""))
        };
        let pinned: Vec<String> = text
            .lines()
            .map(|l| {
                pin(l, "grpc_listen", self.grpc_port)
                    .or_else(|| pin(l, "metrics_listen", self.metrics_port))
                    .unwrap_or_else(|| l.to_string())
            })
            .collect();
        std::fs::write(&self.config_path, pinned.join("\n") + "\n").unwrap();
    }

    /// [`Scheduler::start`] of the binary `exe` (another release's).
    pub async fn start_installed(dir: &Path, exe: &Path) -> Self {
        let config_path = Self::write_config(dir, "127.0.0.1", "");
        let s = Self::spawn_exe(dir, config_path, exe.to_path_buf());
        s.wait_serving().await;
        s
    }

    /// Starts a scheduler replica on `database_url` without waiting for it
    /// to lead (a standby answers UNAVAILABLE until it takes over).
    pub async fn start_replica(dir: &Path, database_url: &str) -> Self {
        Self::start_replica_installed(dir, database_url, &bin("gpupool-scheduler")).await
    }

    /// [`Scheduler::start_replica`] of the binary `exe`.
    pub async fn start_replica_installed(dir: &Path, database_url: &str, exe: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config_path = dir.join("scheduler.toml");
        std::fs::write(
            &config_path,
            format!(
                "grpc_listen = \"127.0.0.1:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n\
                 database_url = \"{database_url}\"\n\
                 heartbeat_interval_ms = {HEARTBEAT_MS}\n\
                 node_grace_ms = {GRACE_MS}\n\
                 stop_grace_ms = 1000\n\
                 join_token = \"test-join-token\"\n\
                 admin_token = \"{ADMIN_TOKEN}\"\n\
                 {REGIONS}{BILLING}"
            ),
        )
        .unwrap();
        Self::spawn_exe(dir, config_path, exe.to_path_buf())
    }

    /// True when this replica answers its health check SERVING (it leads).
    pub async fn serving(&self) -> bool {
        let Ok(ch) = Channel::from_shared(self.addr()).unwrap().connect().await else {
            return false;
        };
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok_and(|r| {
                r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            })
    }

    async fn start_with(dir: &Path, config_path: PathBuf) -> Self {
        let s = Self::spawn(dir, config_path);
        s.wait_serving().await;
        s
    }

    /// Restarts on the same config, ports and database.
    pub async fn restart(self, dir: &Path) -> Self {
        self.restart_after(dir, |_| {}).await
    }

    /// Stops (SIGTERM), runs `between` with the config path while it is
    /// down, and starts again on the same config and ports.
    pub async fn restart_after(self, dir: &Path, between: impl FnOnce(&Path)) -> Self {
        let exe = self.exe.clone();
        self.restart_as(dir, &exe, between).await
    }

    /// [`Scheduler::restart_after`], starting the binary `exe` (an upgrade).
    pub async fn restart_as(self, dir: &Path, exe: &Path, between: impl FnOnce(&Path)) -> Self {
        let s = self.respawn_as(dir, exe, between);
        s.wait_serving().await;
        s
    }

    /// [`Scheduler::restart_as`] without waiting to serve (a standby
    /// replica serves only once it leads).
    pub fn respawn_as(mut self, dir: &Path, exe: &Path, between: impl FnOnce(&Path)) -> Self {
        let status = self.proc.terminate(Duration::from_secs(15));
        assert!(
            status.success(),
            "scheduler exit on SIGTERM: {status}; log:\n{}",
            self.proc.log_text()
        );
        self.pin_ports();
        let config = self.config_path.clone();
        drop(self);
        between(&config);
        Self::spawn_exe(dir, config, exe.to_path_buf())
    }

    /// SIGKILL (no clean shutdown), then start again on the same config,
    /// ports and database.
    pub async fn kill_and_restart(mut self, dir: &Path) -> Self {
        self.proc.kill();
        self.pin_ports();
        let (config, exe) = (self.config_path.clone(), self.exe.clone());
        drop(self);
        let s = Self::spawn_exe(dir, config, exe);
        s.wait_serving().await;
        s
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Polls the standard health service until it answers SERVING.
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = Channel::from_shared(self.addr()).unwrap().connect().await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
                if let Ok(resp) = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && resp.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "scheduler not serving; log:\n{}",
                self.proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clients that authenticate with `token` (None: send no token).
    pub async fn clients(&self, token: Option<&str>) -> Clients {
        let ch = self.channel().await;
        let b = token.map_or_else(Bearer::none, Bearer::new);
        Clients {
            jobs: pb::job_service_client::JobServiceClient::with_interceptor(ch.clone(), b.clone()),
            nodes: pb::node_service_client::NodeServiceClient::with_interceptor(
                ch.clone(),
                b.clone(),
            ),
            pools: pb::pool_service_client::PoolServiceClient::with_interceptor(
                ch.clone(),
                b.clone(),
            ),
            tenants: pb::tenant_service_client::TenantServiceClient::with_interceptor(
                ch.clone(),
                b.clone(),
            ),
            usage: pb::usage_service_client::UsageServiceClient::with_interceptor(ch, b),
        }
    }

    /// Admin clients.
    pub async fn admin(&self) -> Clients {
        self.clients(Some(ADMIN_TOKEN)).await
    }

    pub async fn jobs(&self) -> pb::job_service_client::JobServiceClient<Authed> {
        self.admin().await.jobs
    }

    pub async fn nodes(&self) -> pb::node_service_client::NodeServiceClient<Authed> {
        self.admin().await.nodes
    }

    /// Runs the real `gpupool` CLI against this scheduler as the admin.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(ADMIN_TOKEN, args)
    }

    /// Runs the real `gpupool` CLI with `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(bin("gpupool"))
            .args(args)
            .env("GPUPOOL_ADDR", self.addr())
            .env("GPUPOOL_TOKEN", token)
            .output()
            .unwrap()
    }
}

/// An agent process.
pub struct Agent {
    pub proc: Proc,
    pub node_id: String,
    pub metrics_port: u16,
}

impl Agent {
    pub fn start(dir: &Path, scheduler: &Scheduler, node_id: &str, fake_gpus: &str) -> Self {
        Self::start_in(dir, scheduler, node_id, fake_gpus, "AZ1")
    }

    /// An agent whose node carries availability-zone label `az`.
    pub fn start_in(
        dir: &Path,
        scheduler: &Scheduler,
        node_id: &str,
        fake_gpus: &str,
        az: &str,
    ) -> Self {
        Self::start_with(dir, scheduler, node_id, fake_gpus, az, "")
    }

    /// An agent serving `/metrics` on a fresh port (only tests that read
    /// metrics ask for one: every extra port is a chance of a collision).
    pub fn start_with_metrics(
        dir: &Path,
        scheduler: &Scheduler,
        node_id: &str,
        fake_gpus: &str,
    ) -> Self {
        let port = free_port();
        let mut agent = Self::start_with(
            dir,
            scheduler,
            node_id,
            fake_gpus,
            "AZ1",
            &format!("metrics_listen = \"127.0.0.1:{port}\""),
        );
        agent.metrics_port = port;
        agent
    }

    /// An agent with extra TOML lines appended to its config.
    pub fn start_with(
        dir: &Path,
        scheduler: &Scheduler,
        node_id: &str,
        fake_gpus: &str,
        az: &str,
        extra: &str,
    ) -> Self {
        Self::spawn(dir, &scheduler.addr(), node_id, fake_gpus, az, extra, None)
    }

    /// An agent run from `exe` (a copy of the agent binary installed
    /// elsewhere), with extra TOML lines.
    pub fn start_installed(
        dir: &Path,
        scheduler: &Scheduler,
        node_id: &str,
        fake_gpus: &str,
        extra: &str,
        exe: &Path,
    ) -> Self {
        Self::spawn_exe(
            dir,
            &scheduler.addr(),
            node_id,
            fake_gpus,
            "AZ1",
            extra,
            None,
            exe.to_path_buf(),
        )
    }

    /// [`Agent::start_installed`] reaching the scheduler at `addr`
    /// (replicas comma-separated).
    pub fn start_at_installed(
        dir: &Path,
        addr: &str,
        node_id: &str,
        fake_gpus: &str,
        exe: &Path,
    ) -> Self {
        Self::spawn_exe(
            dir,
            addr,
            node_id,
            fake_gpus,
            "AZ1",
            "",
            None,
            exe.to_path_buf(),
        )
    }

    /// An agent reaching the scheduler at `addr` (replicas comma-separated).
    pub fn start_at(dir: &Path, addr: &str, node_id: &str, fake_gpus: &str) -> Self {
        Self::spawn(dir, addr, node_id, fake_gpus, "AZ1", "", None)
    }

    /// [`Agent::start_at`] with TOML lines added to its config.
    pub fn start_at_with(
        dir: &Path,
        addr: &str,
        node_id: &str,
        fake_gpus: &str,
        extra: &str,
    ) -> Self {
        Self::spawn(dir, addr, node_id, fake_gpus, "AZ1", extra, None)
    }

    /// An agent run with `ip netns exec NETNS`, reaching the scheduler at
    /// `scheduler_addr`.
    pub fn start_in_netns(
        dir: &Path,
        scheduler_addr: &str,
        node_id: &str,
        fake_gpus: &str,
        netns: &str,
    ) -> Self {
        Self::spawn(dir, scheduler_addr, node_id, fake_gpus, "", "", Some(netns))
    }

    /// An agent on a test host: in network namespace `netns`, in zone `az`,
    /// advertising `address` (its own in that namespace); `extra` is
    /// appended to its config.
    #[allow(clippy::too_many_arguments)]
    pub fn start_on_host(
        dir: &Path,
        scheduler_addr: &str,
        node_id: &str,
        fake_gpus: &str,
        az: &str,
        netns: &str,
        address: &str,
        extra: &str,
    ) -> Self {
        let extra = format!("advertise_address = \"{address}\"\n{extra}");
        Self::spawn(
            dir,
            scheduler_addr,
            node_id,
            fake_gpus,
            az,
            &extra,
            Some(netns),
        )
    }

    fn spawn(
        dir: &Path,
        scheduler_addr: &str,
        node_id: &str,
        fake_gpus: &str,
        az: &str,
        extra: &str,
        netns: Option<&str>,
    ) -> Self {
        let exe = bin("gpupool-agent");
        Self::spawn_exe(
            dir,
            scheduler_addr,
            node_id,
            fake_gpus,
            az,
            extra,
            netns,
            exe,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_exe(
        dir: &Path,
        scheduler_addr: &str,
        node_id: &str,
        fake_gpus: &str,
        az: &str,
        extra: &str,
        netns: Option<&str>,
        exe: PathBuf,
    ) -> Self {
        let metrics_port = 0;
        let state = dir.join(format!("agent-{node_id}"));
        std::fs::create_dir_all(&state).unwrap();
        let config = state.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "scheduler_addr = \"{}\"\nnode_id = \"{node_id}\"\nstate_dir = \"{}\"\n\
                 join_token = \"test-join-token\"\n\
                 max_backoff_ms = 500\naz = \"{az}\"\n{advertise}{extra}\n",
                scheduler_addr,
                state.join("state").display(),
                advertise = if extra.contains("advertise_address") {
                    ""
                } else {
                    "advertise_address = \"127.0.0.1\"\n"
                },
            ),
        )
        .unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("--config")
            .arg(&config)
            .arg("--fake-gpus")
            .arg(fake_gpus);
        let proc = Proc::spawn(cmd, state.join("agent.log"));
        Self {
            proc,
            node_id: node_id.to_string(),
            metrics_port,
        }
    }
}

/// The CLI against the scheduler at `addr` with `token`.
pub fn cli_at(addr: &str, token: &str, args: &[&str]) -> Output {
    Command::new(bin("gpupool"))
        .args(args)
        .env("GPUPOOL_ADDR", addr)
        .env("GPUPOOL_TOKEN", token)
        .output()
        .unwrap()
}

/// [`cli_at`], panicking with its output unless it succeeds; its stdout.
pub fn cli_ok_at(addr: &str, token: &str, args: &[&str]) -> String {
    let out = cli_at(addr, token, args);
    assert!(
        out.status.success(),
        "gpupool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 200 ms until it holds; panics naming `what` after
/// `timeout` (the blocking twin of [`eventually`]).
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until exactly `n` nodes are registered and all are Ready.
pub async fn wait_ready(s: &Scheduler, n: usize) {
    eventually(Duration::from_secs(30), "nodes Ready", || async {
        let nodes = list_nodes(s).await;
        (nodes.len() == n
            && nodes
                .iter()
                .all(|x| x.status == pb::NodeStatus::Ready as i32))
        .then_some(())
    })
    .await;
}

/// GET over plain HTTP/1.0 on localhost; returns the body.
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// A training job spec with the given GPUs and command.
pub fn training(gpus: i32, command: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        kind: pb::JobKind::Training as i32,
        resources: Some(pb::Resources {
            gpus,
            cpu_milli: 100,
            memory_mib: 64,
            ..Default::default()
        }),
        instances: 1,
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Runs the CLI as the admin; panics with its stderr unless it succeeds.
pub fn cli_ok(s: &Scheduler, args: &[&str]) -> String {
    let out = s.cli(args);
    assert!(
        out.status.success(),
        "gpupool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Submits a job over gRPC.
pub async fn submit(s: &Scheduler, spec: pb::JobSpec) -> Result<pb::Job, tonic::Status> {
    s.jobs()
        .await
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .map(tonic::Response::into_inner)
}

/// Cancels job `id` as the holder of `token`.
pub async fn cancel_as(s: &Scheduler, token: &str, id: &str) {
    s.clients(Some(token))
        .await
        .jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.to_string(),
        })
        .await
        .unwrap();
}

/// Fetches a job over gRPC.
pub async fn get_job(s: &Scheduler, id: &str) -> pb::Job {
    s.jobs()
        .await
        .get_job(pb::GetJobRequest {
            job_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the job is in `state`.
pub async fn wait_job(s: &Scheduler, id: &str, state: pb::JobState, timeout: Duration) -> pb::Job {
    let mut last = None;
    let found = tokio::time::timeout(timeout, async {
        loop {
            let job = get_job(s, id).await;
            if job.state == state as i32 {
                return job;
            }
            last = Some(job);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    match found {
        Ok(job) => job,
        Err(_) => panic!("job {id} never reached {state:?}; last seen: {last:#?}"),
    }
}

/// Lists nodes over gRPC.
pub async fn list_nodes(s: &Scheduler) -> Vec<pb::Node> {
    s.nodes()
        .await
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
}

/// The host pid of the live process whose command line is exactly `argv`
/// (jobs run in PID namespaces of their own: their `$$` means nothing on
/// the host).
pub fn host_pid_of(argv: &[&str]) -> Option<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        (cmdline == want && !process_dead(pid)).then_some(pid)
    })
}

/// True when the process is gone or a zombie.
pub fn process_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Creates `tenant` with a quota (dedicated nodes, GPUs) and returns a new
/// API token of it.
pub async fn tenant_with_token(admin: &mut Clients, tenant: &str, nodes: u32, gpus: u32) -> String {
    admin
        .tenants
        .create_tenant(pb::CreateTenantRequest {
            name: tenant.into(),
            quota: Some(pb::Quota {
                max_dedicated_nodes: nodes,
                max_gpus: gpus,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .tenants
        .issue_token(pb::IssueTokenRequest {
            tenant: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// The name of the node spec whose GPUs are `model` (e.g. `H100-80GB`).
pub async fn spec_of(c: &mut Clients, model: &str) -> String {
    c.pools
        .list_specs(pb::ListSpecsRequest {})
        .await
        .unwrap()
        .into_inner()
        .specs
        .into_iter()
        .find(|s| s.gpu_model == model)
        .unwrap_or_else(|| panic!("no spec of {model}"))
        .name
}

/// Creates, as `c`'s tenant, an on-demand train pool `name` of `nodes`
/// nodes of the spec whose GPUs are `model` (e.g. `H100-80GB`).
pub async fn train_pool(c: &mut Clients, name: &str, model: &str, nodes: u32) -> pb::Pool {
    let spec = spec_of(c, model).await;
    c.pools
        .create_pool(pb::CreatePoolRequest {
            r#type: pb::PoolType::Train as i32,
            name: name.into(),
            spec,
            node_count: nodes,
            billing_mode: pb::BillingMode::OnDemand as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A real PostgreSQL server in a temporary directory on a free port
/// (initdb + pg_ctl; as the `postgres` user when the tests run as root,
/// since PostgreSQL refuses to run as root). Stopped when dropped.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    run_as: Option<String>,
}

impl Postgres {
    /// Starts one; None (outside CI, after saying so) when PostgreSQL is
    /// not installed. Under CI=true a missing PostgreSQL fails the test.
    pub fn start(dir: &Path) -> Option<Self> {
        let bin = Self::bin_dir()?;
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).unwrap();
        // SAFETY: geteuid has no preconditions.
        let run_as = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let ok = Command::new("chown")
                .args(["-R", &format!("{user}:"), root.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot give {} to {user}", root.display());
            // The user must reach the directory through the test's tempdir.
            for dir in [dir, root.parent().unwrap()] {
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap();
            }
        }
        let pg = Self {
            port: free_port(),
            data: root.join("data"),
            log: root.join("postgres.log"),
            bin,
            run_as,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.start_server();
        Some(pg)
    }

    fn bin_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("GPUPOOL_PG_BIN") {
            return Some(PathBuf::from(dir));
        }
        // Debian keeps the server binaries out of PATH.
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .collect()
            })
            .unwrap_or_default();
        versions.retain(|d| d.join("pg_ctl").is_file());
        versions.sort();
        if let Some(dir) = versions.pop() {
            return Some(dir);
        }
        require_tool("pg_ctl", "postgresql").map(|p| p.parent().unwrap().to_path_buf())
    }

    /// A PostgreSQL tool, run as the server's user.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = self
            .command(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Starts (again) the server on its port and waits until it accepts.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.data.parent().unwrap().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A real registry (Debian's docker-registry) and images built by the tests.
#[path = "registry.rs"]
pub mod registry;
pub mod workload;
