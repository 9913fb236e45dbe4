//! Job instances as real child processes: one process group each, exact GPU
//! visibility, a log file per instance, stop = SIGTERM to the group then
//! SIGKILL after a grace.
//!
//! The runtime knows nothing of gRPC: the session feeds it plain
//! [`InstanceSpec`]s and reads [`InstanceReport`]s back.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Notify;

use crate::cgroup::{Cgroup, CgroupManager, Limits};

/// What the scheduler asked to run.
#[derive(Debug, Clone, Default)]
pub struct InstanceSpec {
    pub instance_id: String,
    pub job_id: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub gpu_uuids: Vec<String>,
    pub rank: u32,
    pub world_size: u32,
    /// Pool metadata (network settings), exported as `GPUPOOL_<KEY>`.
    pub metadata: BTreeMap<String, String>,
    /// Cgroup limits (memory, CPU, pids, GPU devices).
    pub limits: Limits,
    /// MPS settings for an instance sharing a GPU (when an MPS daemon is
    /// configured).
    pub mps: Option<Mps>,
    /// The instance serves on a port (notebooks, TensorBoards, services).
    pub serve: Option<Serve>,
    /// OCI image to run in; empty = a host process.
    pub image: String,
    /// Container network: "host", "none", or "" (host for instances that
    /// serve a port or belong to a gang, else none).
    pub network: String,
    /// The node's GPU indexes given to the instance (CDI names them).
    pub gpu_indexes: Vec<u32>,
    /// Its place in its network (the scheduler's `[networks]`).
    pub attach: Option<crate::network::Attach>,
    /// Set once attached: its namespace and hosts file.
    pub attached: Option<crate::network::Attached>,
}

/// How an instance serves: its port, readiness check and activity watch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Serve {
    /// This port, or (0) a free one from the agent's range.
    pub port: u16,
    pub health: Option<crate::serving::HealthSpec>,
    /// Report user activity (idle time).
    pub watch_activity: bool,
    /// Token of the notebook server's API (for the activity watch).
    #[serde(default)]
    pub token: String,
    /// In a network: the instance's address, where checks reach it (else
    /// the node's loopback).
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// In a network: its namespace, where the checks connect from.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// CUDA MPS limits of a fractional-GPU instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mps {
    pub pipe_dir: PathBuf,
    /// CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (the GPU share, 1..100).
    pub active_thread_pct: u32,
    /// (GPU UUID, MiB) for CUDA_MPS_PINNED_DEVICE_MEM_LIMIT.
    pub pinned_mem_mib: Vec<(String, u64)>,
}

/// How strictly instances are confined in cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Confinement {
    /// Confine when cgroups are available; otherwise log and run unconfined.
    #[default]
    BestEffort,
    /// Refuse to start an instance that cannot be confined.
    Required,
    /// Never use cgroups.
    Off,
}

/// Lifecycle of an instance on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    Stopping,
    Succeeded,
    Failed,
    Stopped,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Stopped)
    }
}

/// What the agent reports about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceReport {
    pub instance_id: String,
    pub phase: Phase,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    pub pid: u32,
    /// The port it serves on; 0 = none.
    pub port: u16,
    /// Passes its readiness check.
    pub ready: bool,
    /// Time since user activity was last seen (watched instances only).
    pub idle_ms: Option<u64>,
    /// Image instances: the manifest digest run.
    pub image_digest: String,
    /// While the image is pulled: (bytes done, bytes in all).
    pub pull: Option<(u64, u64)>,
}

struct Entry {
    report: InstanceReport,
    pgid: Option<i32>,
    stop_requested: bool,
    cgroup: Option<Arc<dyn Cgroup>>,
    memory_limit: Option<u64>,
    /// Who holds the instance's GPUs, for the metrics labels.
    owner: Owner,
    /// Last user activity seen (watched instances).
    last_activity: Option<std::time::Instant>,
    /// Image instances: the runtime's container id (= the instance id).
    container: bool,
    /// The unpacked image it runs on (kept from the image cache's GC).
    rootfs: Option<PathBuf>,
}

/// The labels of an instance's GPUs in the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub gpu_uuids: Vec<String>,
    pub pool: String,
    /// The pool's name (its id may be all the metrics show otherwise).
    pub pool_name: String,
    /// Job ids, comma-separated when instances share a GPU.
    pub job: String,
    pub tenant: String,
}

impl Owner {
    fn from_spec(spec: &InstanceSpec) -> Self {
        Self {
            gpu_uuids: spec.gpu_uuids.clone(),
            pool: spec
                .metadata
                .get("pool")
                .cloned()
                .unwrap_or_else(|| "public".into()),
            pool_name: spec
                .metadata
                .get("pool.name")
                .cloned()
                .unwrap_or_else(|| "public".into()),
            job: spec.job_id.clone(),
            tenant: spec.metadata.get("tenant").cloned().unwrap_or_default(),
        }
    }
}

/// Errors reading an instance's log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid instance id {0:?}")]
    BadId(String),
    #[error("no log for instance {0}")]
    NotFound(String),
    #[error("cannot read log of instance {instance_id}")]
    Io {
        instance_id: String,
        #[source]
        source: std::io::Error,
    },
}

/// The set of instances this agent supervises.
#[derive(Clone)]
pub struct Runtime {
    state_dir: PathBuf,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    changed: Arc<Notify>,
    cgroups: Option<Arc<dyn CgroupManager>>,
    confinement: Confinement,
    /// The binary that runs `shim` (this agent); None runs commands directly
    /// (their exit status is then lost if the agent restarts).
    shim: Option<PathBuf>,
    /// Prefix of instance cgroup names, unique per agent on a host.
    cgroup_scope: String,
    /// Run instances as this (uid, gid) instead of the agent's user.
    run_as: Option<(u32, u32)>,
    /// Ports given to serving instances.
    port_range: (u16, u16),
    port_cursor: Arc<std::sync::atomic::AtomicU16>,
    /// One identity per tenant (a root agent without `run_as_user`).
    identities: Option<crate::identity::Identities>,
    /// Host processes get their own PID, mount and IPC namespaces, and
    /// these paths (the agent's config and state) are covered.
    isolate: Option<Vec<PathBuf>>,
    /// Image instances: where images come from and what runs them.
    images: Option<crate::image::ImageStore>,
    oci: Option<OciRuntime>,
    /// Image pulls, cache hits and bytes pulled, for the metrics.
    pub image_counters: Arc<ImageCounters>,
    /// Instance networks (a root agent with an IPv4 address).
    networks: Option<Arc<crate::network::Networks>>,
}

/// The OCI runtime that runs image instances.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    /// `runc` or `crun` (a path).
    pub binary: PathBuf,
    /// Its state directory (`--root`).
    pub root: PathBuf,
    /// Where CDI specs are looked for.
    pub cdi_dirs: Vec<PathBuf>,
    /// The node's GPUs are simulated: containers get no device for them.
    pub fake_gpus: bool,
}

/// Counts of image use on this node.
#[derive(Debug, Default)]
pub struct ImageCounters {
    pub pulls: std::sync::atomic::AtomicU64,
    pub cache_hits: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

/// What the agent remembers of a running instance across its own restarts
/// (`STATE_DIR/instances/<id>.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    instance_id: String,
    pid: u32,
    /// Kernel start time of the process, to tell it from a reused pid.
    start_ticks: u64,
    memory_limit: Option<u64>,
    stop_requested: bool,
    cgroup: bool,
    #[serde(default)]
    gpu_uuids: Vec<String>,
    #[serde(default)]
    pool: String,
    #[serde(default)]
    pool_name: String,
    #[serde(default)]
    job_id: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    serve: Option<Serve>,
    #[serde(default)]
    container: bool,
    #[serde(default)]
    image_digest: String,
    #[serde(default)]
    rootfs: Option<PathBuf>,
    /// A container's CPU quota, set once its process is in its cgroup
    /// (again on reattach: a restart may have come before).
    #[serde(default)]
    cpu_milli: Option<u64>,
}

impl Runtime {
    pub fn new(state_dir: &Path) -> std::io::Result<Self> {
        // Logs and records are the agent's alone (a job reaches its own log
        // through the descriptor it was started with); `work/` is passed
        // through, each instance's directory its own.
        use std::os::unix::fs::PermissionsExt;
        // Passable (tenants reach their directories), not listable.
        std::fs::create_dir_all(state_dir)?;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o711))?;
        for (sub, mode) in [
            ("logs", 0o700),
            ("instances", 0o700),
            ("work", 0o711),
            ("tenants", 0o711),
            // Passable: each instance reads its own stop notice.
            ("notices", 0o711),
            // Passable: the runtime resolves a bundle's root and mount
            // points inside the container's user namespace.
            ("bundles", 0o711),
        ] {
            let dir = state_dir.join(sub);
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            entries: Arc::default(),
            changed: Arc::default(),
            cgroups: None,
            confinement: Confinement::Off,
            shim: None,
            cgroup_scope: "local".into(),
            run_as: None,
            port_range: DEFAULT_PORT_RANGE,
            port_cursor: Arc::default(),
            identities: None,
            isolate: None,
            images: None,
            oci: None,
            image_counters: Arc::default(),
            networks: None,
        })
    }

    /// Gives instances that the scheduler puts in a network their
    /// namespace there.
    pub fn with_networks(mut self, networks: crate::network::Networks) -> Self {
        self.networks = Some(Arc::new(networks));
        self
    }

    /// Floods network `vni` to these nodes.
    pub fn set_network_peers(
        &self,
        vni: u32,
        peers: &[String],
        routes: &std::collections::BTreeMap<String, String>,
    ) {
        if let Some(n) = &self.networks
            && let Err(err) = n.set_peers(vni, peers, routes)
        {
            tracing::warn!(vni, %err, "cannot update the network's peers");
        }
    }

    /// Rewrites a running instance's hosts file (its job's instances
    /// changed).
    pub fn set_network_hosts(
        &self,
        instance_id: &str,
        hosts: &std::collections::BTreeMap<String, String>,
    ) {
        if let Some(n) = &self.networks
            && valid_id(instance_id)
            && let Err(err) = n.set_hosts(instance_id, hosts)
        {
            tracing::warn!(instance = %instance_id, %err, "cannot update the instance's hosts file");
        }
    }

    /// The instances not yet ended.
    fn live_ids(&self) -> std::collections::HashSet<String> {
        self.entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.report.phase.is_terminal())
            .map(|e| e.report.instance_id.clone())
            .collect()
    }

    /// After [`Runtime::recover`]: removes the networks of instances that
    /// are gone.
    pub fn reconcile_networks(&self) {
        let Some(n) = &self.networks else { return };
        let live = self.live_ids();
        n.reconcile(&live);
    }

    /// Attaches `spec` to its network, if it has one; an error says why it
    /// cannot start.
    fn attach_network(&self, spec: &mut InstanceSpec, port: u16) -> Result<(), String> {
        let Some(a) = &spec.attach else {
            return Ok(());
        };
        let Some(n) = &self.networks else {
            return Err(format!(
                "the scheduler puts this instance in network {}, but this node cannot build networks (the agent must run as root with an IPv4 advertise_address)",
                a.name
            ));
        };
        if spec.image.is_empty() && (self.isolate.is_none() || self.identities.is_none()) {
            return Err(
                "host processes join a network only in their own namespaces (a root agent)".into(),
            );
        }
        let attached = n
            .attach(&spec.instance_id, a, port)
            .map_err(|e| format!("cannot attach to network {}: {e}", a.name))?;
        tracing::info!(instance = %spec.instance_id, network = %a.name, address = %attached.address, "instance attached to its network");
        if let Some(serve) = &mut spec.serve {
            serve.address = Some(attached.address);
            serve.netns = Some(attached.netns.clone());
        }
        spec.attached = Some(attached);
        Ok(())
    }

    fn detach_network(&self, instance_id: &str) {
        if let Some(n) = &self.networks {
            n.detach(instance_id);
        }
    }

    /// Runs each tenant's instances under its own identity.
    pub fn with_identities(mut self, ids: crate::identity::Identities) -> Self {
        self.identities = Some(ids);
        self
    }

    /// Gives host processes their own namespaces, with `hide` (besides
    /// the state dir) covered.
    pub fn with_isolation(mut self, hide: Vec<PathBuf>) -> Self {
        let mut all = vec![self.state_dir.clone()];
        all.extend(hide);
        self.isolate = Some(all);
        self
    }

    /// Runs image instances from `images` with `oci`.
    pub fn with_images(mut self, images: crate::image::ImageStore, oci: OciRuntime) -> Self {
        self.images = Some(images);
        self.oci = Some(oci);
        self
    }

    /// The image store, for its garbage collection.
    pub fn image_store(&self) -> Option<&crate::image::ImageStore> {
        self.images.as_ref()
    }

    /// Root file systems running instances use.
    pub fn images_in_use(&self) -> std::collections::HashSet<PathBuf> {
        self.entries
            .lock()
            .unwrap()
            .values()
            .filter_map(|e| e.rootfs.clone())
            .collect()
    }

    fn bundles_dir(&self) -> PathBuf {
        self.state_dir.join("bundles")
    }

    /// Who runs the instance: the pinned user, the tenant's identity, or
    /// (None) the agent's own user.
    fn identity_for(
        &self,
        spec: &InstanceSpec,
    ) -> anyhow::Result<Option<crate::identity::Identity>> {
        if let Some((uid, gid)) = self.run_as {
            return Ok(Some(crate::identity::Identity {
                uid,
                gid,
                range_base: uid,
                range_size: 1,
            }));
        }
        match &self.identities {
            Some(ids) => {
                let tenant = spec.metadata.get("tenant").map_or("", String::as_str);
                Ok(Some(ids.for_tenant(tenant)?))
            }
            None => Ok(None),
        }
    }

    /// The tenant's directory (`tenants/<tenant>`, the tenant's alone),
    /// created on first use.
    fn tenant_root(
        &self,
        spec: &InstanceSpec,
        identity: Option<crate::identity::Identity>,
    ) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let tenant = spec.metadata.get("tenant").map_or("", String::as_str);
        let root = self
            .state_dir
            .join("tenants")
            .join(crate::identity::dir_name(tenant));
        if !root.exists() {
            std::fs::create_dir_all(&root)?;
        }
        if let Some(id) = identity {
            let meta = std::fs::symlink_metadata(&root)?;
            anyhow::ensure!(meta.is_dir(), "{} is not a directory", root.display());
            use std::os::unix::fs::MetadataExt;
            // A pinned uid owns it; the group is the tenant's block, whose
            // first id is root in the tenant's containers.
            let (gid, mode) = if id.uid == id.range_base {
                (id.gid, 0o700)
            } else {
                (id.range_base, 0o770)
            };
            if meta.uid() != id.uid || meta.gid() != gid {
                std::os::unix::fs::chown(&root, Some(id.uid), Some(gid))?;
            }
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(root)
    }

    /// A job's directory: relative paths are inside the tenant's directory;
    /// an absolute one must be too when tenants have identities (else
    /// anywhere but the agent's state dir).
    fn resolve_dir(
        &self,
        root: &Path,
        dir: &Path,
        identity: bool,
        what: &str,
    ) -> anyhow::Result<PathBuf> {
        anyhow::ensure!(
            !dir.components()
                .any(|c| c == std::path::Component::ParentDir),
            "{what} {} must not contain `..`",
            dir.display()
        );
        if dir.is_relative() {
            return Ok(root.join(dir));
        }
        if identity {
            anyhow::ensure!(
                dir.starts_with(root),
                "{what} {} is outside the tenant's directory {} on this node (give a path relative to it)",
                dir.display(),
                root.display()
            );
        } else if inside(dir, &self.state_dir) {
            anyhow::bail!(
                "{what} {} is inside the agent's state dir {}",
                dir.display(),
                self.state_dir.display()
            );
        }
        Ok(dir.to_path_buf())
    }

    /// Gives serving instances ports from `first..=last`.
    pub fn with_port_range(mut self, first: u16, last: u16) -> Self {
        self.port_range = (first, last);
        // Start at a point of the range that differs between agents (and
        // agent restarts), so agents sharing a host rarely race for one.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let span = u32::from(last.saturating_sub(first)) + 1;
        self.port_cursor.store(
            first.saturating_add((seed % span) as u16),
            std::sync::atomic::Ordering::Relaxed,
        );
        self
    }

    /// Runs instances as `user` (a name from the passwd database).
    pub fn with_user(mut self, user: &str) -> anyhow::Result<Self> {
        self.run_as = Some(lookup_user(user)?);
        Ok(self)
    }

    /// Names this agent's instance cgroups `<scope>_<instance>` (the node
    /// id), so several agents on one host never share a cgroup.
    pub fn with_cgroup_scope(mut self, scope: &str) -> Self {
        self.cgroup_scope = scope
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self
    }

    fn cgroup_name(&self, instance_id: &str) -> String {
        format!("{}_{instance_id}", self.cgroup_scope)
    }

    /// Starts instances through `binary shim ...` so their exit status
    /// survives an agent restart.
    pub fn with_shim(mut self, binary: PathBuf) -> Self {
        self.shim = Some(binary);
        self
    }

    /// The instance's notice directory (root's, readable, not writable by
    /// the job): the agent writes `stop` there before it signals a stop.
    fn notice_dir(&self, instance_id: &str) -> PathBuf {
        self.state_dir.join("notices").join(instance_id)
    }

    /// Makes the instance's notice directory, empty: the agent's, 0700;
    /// or, with `group` (the job's group on the host), root's and that
    /// group's to read (0750): no other tenant's job sees it.
    fn make_notice_dir(&self, instance_id: &str, group: Option<u32>) -> anyhow::Result<PathBuf> {
        let dir = self.notice_dir(instance_id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        share_notice_dir(&dir, group)?;
        Ok(dir)
    }

    /// Writes why the instance is being stopped to its notice file
    /// (`GPUPOOL_STOP_NOTICE`), whole or not at all, before the SIGTERM: a
    /// preemption's reason begins with `preempted`.
    fn write_notice(&self, instance_id: &str, reason: &str) {
        let dir = self.notice_dir(instance_id);
        if !dir.is_dir() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let tmp = dir.join(".stop");
        let written = std::fs::write(&tmp, format!("{reason}\n"))
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)))
            .and_then(|()| std::fs::rename(&tmp, dir.join(NOTICE_FILE)));
        if let Err(err) = written {
            tracing::warn!(instance = %instance_id, error = %err, "cannot write the stop notice");
        }
    }

    fn record_path(&self, instance_id: &str) -> PathBuf {
        self.state_dir
            .join("instances")
            .join(format!("{instance_id}.json"))
    }

    fn exit_path(&self, instance_id: &str) -> PathBuf {
        self.state_dir
            .join("instances")
            .join(format!("{instance_id}.exit"))
    }

    /// Where agents before 0.1's stdin hand-over wrote an instance's
    /// environment; `forget` removes a file one left.
    fn env_path(&self, instance_id: &str) -> PathBuf {
        self.state_dir
            .join("instances")
            .join(format!("{instance_id}.env"))
    }

    fn save_record(&self, record: &Record) {
        let path = self.record_path(&record.instance_id);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string(record).expect("record serializes");
        if let Err(err) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!(instance = %record.instance_id, error = %err, "cannot persist instance record");
        }
    }

    /// Reattaches to instances started before this agent restarted: still
    /// running ones are adopted and watched; ended ones report how they
    /// ended (from the shim's exit file).
    pub fn recover(&self) {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("instances")) else {
            return;
        };
        for entry in dir.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(record) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<Record>(&t).ok())
            else {
                continue;
            };
            let cgroup: Option<Arc<dyn Cgroup>> = match (&self.cgroups, record.cgroup) {
                (Some(m), true) => Some(Arc::from(m.open(&self.cgroup_name(&record.instance_id)))),
                _ => None,
            };
            let alive = process_start_ticks(record.pid) == Some(record.start_ticks);
            if let (true, true, Some(group), Some(milli)) =
                (alive, record.container, &cgroup, record.cpu_milli)
                && let Err(err) = group.set_cpu_quota(milli)
            {
                tracing::warn!(instance = %record.instance_id, error = %err, "cannot set the container's CPU quota");
            }
            tracing::info!(instance = %record.instance_id, pid = record.pid, alive, "recovered instance");
            self.entries.lock().unwrap().insert(
                record.instance_id.clone(),
                Entry {
                    report: InstanceReport {
                        instance_id: record.instance_id.clone(),
                        phase: if record.stop_requested {
                            Phase::Stopping
                        } else {
                            Phase::Running
                        },
                        exit_code: None,
                        signal: None,
                        reason: String::new(),
                        pid: record.pid,
                        port: record.port,
                        ready: false,
                        idle_ms: None,
                        image_digest: record.image_digest.clone(),
                        pull: None,
                    },
                    pgid: Some(record.pid as i32),
                    stop_requested: record.stop_requested,
                    cgroup,
                    memory_limit: record.memory_limit,
                    owner: Owner {
                        gpu_uuids: record.gpu_uuids.clone(),
                        pool: record.pool.clone(),
                        pool_name: record.pool_name.clone(),
                        job: record.job_id.clone(),
                        tenant: record.tenant.clone(),
                    },
                    last_activity: Some(std::time::Instant::now()),
                    container: record.container,
                    rootfs: record.rootfs.clone(),
                },
            );
            if let Some(serve) = record.serve.clone()
                && record.port != 0
            {
                self.watch(record.instance_id.clone(), record.port, serve);
            }
            let this = self.clone();
            tokio::spawn(async move {
                while process_start_ticks(record.pid) == Some(record.start_ticks) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                this.finish(&record.instance_id, None).await;
            });
        }
        self.changed.notify_one();
    }

    /// Confines instances with `manager` (None: cgroups unavailable).
    pub fn with_cgroups(
        mut self,
        manager: Option<Arc<dyn CgroupManager>>,
        confinement: Confinement,
    ) -> Self {
        self.cgroups = if confinement == Confinement::Off {
            None
        } else {
            manager
        };
        self.confinement = confinement;
        self
    }

    /// Notified whenever an instance changes phase.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Rotates the logs of running instances larger than `max_bytes`: the
    /// file is copied to `.1` (older copies shift up to `.keep`) and
    /// truncated in place, so the instance keeps writing to the same file
    /// (it was opened with O_APPEND). Lines written between the copy and
    /// the truncation can be lost.
    pub fn rotate_logs(&self, max_bytes: u64, keep: u32) {
        let running: Vec<String> = self
            .entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.report.phase.is_terminal())
            .map(|e| e.report.instance_id.clone())
            .collect();
        for id in running {
            let Ok(path) = self.log_path(&id) else {
                continue;
            };
            if std::fs::metadata(&path).map_or(true, |m| m.len() <= max_bytes) {
                continue;
            }
            let rotated = |n: u32| path.with_extension(format!("log.{n}"));
            for n in (1..keep).rev() {
                let _ = std::fs::rename(rotated(n), rotated(n + 1));
            }
            let result = std::fs::copy(&path, rotated(1))
                .and_then(|_| std::fs::OpenOptions::new().write(true).open(&path))
                .and_then(|f| f.set_len(0));
            if let Err(err) = result {
                tracing::warn!(instance = %id, error = %err, "cannot rotate log");
            }
        }
    }

    /// Keeps the instances' logs and agent-made working directories within
    /// `budget_bytes` together: while over it, the ended instance whose files
    /// changed longest ago loses its log (rotated copies too) and its
    /// `work/` directory. A live instance's files are never touched; nor is
    /// a `--workdir` outside the state dir. Returns the instances cleaned.
    pub fn collect_garbage(&self, budget_bytes: u64) -> Vec<String> {
        // instance id -> (bytes, newest change)
        let mut files: HashMap<String, (u64, std::time::SystemTime)> = HashMap::new();
        let mut note = |id: &str, bytes: u64, at: std::time::SystemTime| {
            let e = files
                .entry(id.to_string())
                .or_insert((0, std::time::UNIX_EPOCH));
            e.0 += bytes;
            e.1 = e.1.max(at);
        };
        if let Ok(dir) = std::fs::read_dir(self.state_dir.join("logs")) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((id, _)) = name.split_once(".log") else {
                    continue;
                };
                if let Ok(meta) = entry.path().symlink_metadata() {
                    note(
                        id,
                        meta.len(),
                        meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    );
                }
            }
        }
        // Work directories: the agent's own (`work/<id>`, one user), and
        // each tenant's (`tenants/<t>/work/<id>`), which the tenant owns and
        // may fill with anything, links included: those are separate items
        // (a name there never takes another tenant's log along), and are
        // removed without following any link (`remove_in_tenant_dir`).
        // (path, a tenant's)
        let mut paths: HashMap<String, (PathBuf, bool)> = HashMap::new();
        let mut work_dirs = vec![(String::new(), self.state_dir.join("work"), false)];
        if let Ok(tenants) = std::fs::read_dir(self.state_dir.join("tenants")) {
            for t in tenants.flatten() {
                let work = t.path().join("work");
                let (Ok(tm), Ok(wm)) = (t.path().symlink_metadata(), work.symlink_metadata())
                else {
                    continue;
                };
                if !tm.is_dir() || !wm.is_dir() {
                    continue;
                }
                let name = t.file_name().to_string_lossy().into_owned();
                work_dirs.push((format!("{name}/"), work, true));
            }
        }
        for (prefix, work, tenant) in &work_dirs {
            let Ok(dir) = std::fs::read_dir(work) else {
                continue;
            };
            for entry in dir.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let key = format!("{prefix}{id}");
                let (bytes, at) = tree_size(&entry.path());
                note(&key, bytes, at);
                paths.insert(key, (entry.path(), *tenant));
            }
        }
        let total: u64 = files.values().map(|(b, _)| b).sum();
        if total <= budget_bytes {
            return Vec::new();
        }
        let live = self.live_ids();
        // The instance id of an item: the key, less a tenant's prefix.
        let id_of = |key: &str| key.rsplit('/').next().unwrap_or(key).to_string();
        let mut ended: Vec<(std::time::SystemTime, String, u64)> = files
            .into_iter()
            .filter(|(key, _)| {
                let id = id_of(key);
                !live.contains(&id) && valid_id(&id)
            })
            .map(|(key, (bytes, at))| (at, key, bytes))
            .collect();
        ended.sort();
        let mut over = total - budget_bytes;
        let mut cleaned = Vec::new();
        for (_, key, bytes) in ended {
            if over == 0 {
                break;
            }
            let id = id_of(&key);
            // Checked again under the lock: it may have started meanwhile.
            if self
                .entries
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|e| !e.report.phase.is_terminal())
            {
                continue;
            }
            if key == id {
                let logs = self.state_dir.join("logs");
                let _ = std::fs::remove_file(logs.join(format!("{id}.log")));
                for n in 1..=64 {
                    if std::fs::remove_file(logs.join(format!("{id}.log.{n}"))).is_err() {
                        break;
                    }
                }
            }
            match paths.get(&key) {
                Some((work, false)) => {
                    if work.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                        let _ = std::fs::remove_dir_all(work);
                    } else {
                        let _ = std::fs::remove_file(work);
                    }
                }
                // Not freed: nothing to subtract.
                Some((work, true)) if !remove_in_tenant_dir(work) => continue,
                Some((_, true)) | None => {}
            }
            over = over.saturating_sub(bytes);
            cleaned.push(id);
        }
        if over > 0 {
            tracing::warn!(
                over_bytes = over,
                budget_bytes,
                "instance files exceed the disk budget, and what is left belongs to running instances"
            );
        }
        if !cleaned.is_empty() {
            tracing::info!(
                instances = cleaned.len(),
                "removed ended instances' logs and work directories for the disk budget"
            );
        }
        cleaned
    }

    /// CPU and memory of each running instance's cgroup:
    /// (instance, job, usage).
    pub fn cgroup_usage(&self) -> Vec<(String, String, crate::cgroup::Usage)> {
        let mut out: Vec<_> = self
            .entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| !e.report.phase.is_terminal())
            .filter_map(|(id, e)| {
                let cg = e.cgroup.as_ref()?;
                Some((id.clone(), e.owner.job.clone(), cg.usage()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Pool, tenant and job(s) using each GPU (by UUID), from running
    /// instances.
    pub fn gpu_owners(&self) -> HashMap<String, Owner> {
        let mut out: HashMap<String, Owner> = HashMap::new();
        for e in self
            .entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.report.phase.is_terminal())
        {
            for uuid in &e.owner.gpu_uuids {
                let slot = out.entry(uuid.clone()).or_insert_with(|| Owner {
                    gpu_uuids: Vec::new(),
                    pool: e.owner.pool.clone(),
                    pool_name: e.owner.pool_name.clone(),
                    job: String::new(),
                    tenant: e.owner.tenant.clone(),
                });
                if !slot.job.is_empty() {
                    slot.job.push(',');
                }
                slot.job.push_str(&e.owner.job);
            }
        }
        out
    }

    /// Every known instance, running or finished-but-not-forgotten.
    pub fn snapshot(&self) -> Vec<InstanceReport> {
        let entries = self.entries.lock().unwrap();
        let mut out: Vec<_> = entries
            .values()
            .map(|e| {
                let mut r = e.report.clone();
                r.idle_ms = e
                    .last_activity
                    .map(|t| t.elapsed().as_millis().min(u128::from(u64::MAX)) as u64);
                r
            })
            .collect();
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }

    fn log_path(&self, instance_id: &str) -> Result<PathBuf, LogError> {
        if !valid_id(instance_id) {
            return Err(LogError::BadId(instance_id.to_string()));
        }
        Ok(self
            .state_dir
            .join("logs")
            .join(format!("{instance_id}.log")))
    }

    /// Starts an instance. Idempotent: a known id is left alone.
    pub fn start(&self, mut spec: InstanceSpec) {
        if !valid_id(&spec.instance_id) {
            // Ids name files and directories here: the scheduler sends
            // none such, and none is ever used.
            tracing::error!(instance = ?spec.instance_id, "refusing an instance with an invalid id");
            return;
        }
        let port = {
            let mut entries = self.entries.lock().unwrap();
            if entries.contains_key(&spec.instance_id) {
                return;
            }
            let held: std::collections::HashSet<u16> = entries
                .values()
                .filter(|e| !e.report.phase.is_terminal())
                .map(|e| e.report.port)
                .collect();
            let port = match &spec.serve {
                None => Ok(0),
                Some(serve) if serve.port != 0 => {
                    if !held.contains(&serve.port) && crate::serving::port_free(serve.port) {
                        Ok(serve.port)
                    } else {
                        Err(format!("port {} is in use on this node", serve.port))
                    }
                }
                Some(_) => {
                    let cursor = self.port_cursor.load(std::sync::atomic::Ordering::Relaxed);
                    match crate::serving::allocate_port(self.port_range, &held, cursor) {
                        Some(p) => {
                            self.port_cursor
                                .store(p.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
                            Ok(p)
                        }
                        None => Err(format!(
                            "no free port in {}-{}",
                            self.port_range.0, self.port_range.1
                        )),
                    }
                }
            };
            entries.insert(
                spec.instance_id.clone(),
                Entry {
                    report: InstanceReport {
                        instance_id: spec.instance_id.clone(),
                        phase: Phase::Running,
                        exit_code: None,
                        signal: None,
                        reason: String::new(),
                        pid: 0,
                        port: 0,
                        ready: false,
                        idle_ms: None,
                        image_digest: String::new(),
                        pull: None,
                    },
                    pgid: None,
                    stop_requested: false,
                    cgroup: None,
                    memory_limit: spec.limits.memory_bytes,
                    owner: Owner::from_spec(&spec),
                    last_activity: spec
                        .serve
                        .as_ref()
                        .filter(|s| s.watch_activity)
                        .map(|_| std::time::Instant::now()),
                    container: !spec.image.is_empty(),
                    rootfs: None,
                },
            );
            port
        };
        let port = match port {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(instance = %spec.instance_id, %why, "instance failed to start");
                self.update(&spec.instance_id, |e| {
                    e.report.phase = Phase::Failed;
                    e.report.reason = format!("failed to start: {why}");
                });
                self.changed.notify_one();
                return;
            }
        };
        if port != 0 {
            for key in ["PORT", "GPUPOOL_PORT"] {
                spec.env.insert(key.into(), port.to_string());
            }
            self.update(&spec.instance_id, |e| e.report.port = port);
        }
        if let Err(why) = self.attach_network(&mut spec, port) {
            tracing::warn!(instance = %spec.instance_id, %why, "instance failed to start");
            self.detach_network(&spec.instance_id);
            self.update(&spec.instance_id, |e| {
                e.report.phase = Phase::Failed;
                e.report.reason = format!("failed to start: {why}");
            });
            self.changed.notify_one();
            return;
        }
        if spec.image.is_empty() {
            let result = self
                .prepare_host(&mut spec, port)
                .and_then(|p| self.spawn(&spec, p));
            self.started(spec, port, result, None);
            return;
        }
        spec.limits.runtime_devices = true;
        self.update(&spec.instance_id, |e| {
            e.container = true;
            e.report.pull = Some((0, 0));
        });
        self.changed.notify_one();
        let this = self.clone();
        tokio::spawn(async move {
            let prepared = this.pull(&spec).await;
            let stopped = this
                .entries
                .lock()
                .unwrap()
                .get(&spec.instance_id)
                .is_none_or(|e| e.stop_requested);
            match prepared {
                Ok(_) if stopped => {
                    this.detach_network(&spec.instance_id);
                    this.update(&spec.instance_id, |e| {
                        e.report.phase = Phase::Stopped;
                        e.report.pull = None;
                    });
                    this.changed.notify_one();
                }
                Ok((image, identity)) => {
                    let rootfs = image.rootfs.clone();
                    this.update(&spec.instance_id, |e| {
                        e.report.pull = None;
                        e.report.image_digest = image.digest.clone();
                        e.rootfs = Some(rootfs.clone());
                    });
                    let result = this
                        .prepare_container(&mut spec, port, &image, identity)
                        .and_then(|p| this.spawn(&spec, p));
                    this.started(spec, port, result, Some((image.digest, rootfs)));
                }
                Err(err) => {
                    tracing::warn!(instance = %spec.instance_id, error = %err, "image not prepared");
                    this.detach_network(&spec.instance_id);
                    this.update(&spec.instance_id, |e| {
                        e.report.pull = None;
                        e.report.phase = Phase::Failed;
                        e.report.reason = format!("image {}: {err}", spec.image);
                    });
                    this.changed.notify_one();
                }
            }
        });
    }

    /// Pulls (or finds in the cache) the instance's image, for its tenant's
    /// identity.
    async fn pull(
        &self,
        spec: &InstanceSpec,
    ) -> anyhow::Result<(crate::image::Prepared, crate::identity::Identity)> {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some(images), Some(_)) = (&self.images, &self.oci) else {
            anyhow::bail!(
                "this node runs no images (no OCI runtime found; see `oci_runtime` in the agent config)"
            );
        };
        let Some(identity) = self.identity_for(spec)? else {
            anyhow::bail!(
                "this node runs no images: image instances need an agent running as root"
            );
        };
        let _ = self.log_line(
            &spec.instance_id,
            &format!("gpupool: preparing image {}", spec.image),
        );
        let this = self.clone();
        let id = spec.instance_id.clone();
        let progress = move |done: u64, total: u64| {
            this.update(&id, |e| e.report.pull = Some((done, total)));
        };
        let notify = self.changed.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                notify.notify_one();
            }
        });
        let result = images
            .prepare(
                &spec.image,
                (identity.range_base, identity.range_size),
                progress,
            )
            .await;
        ticker.abort();
        match &result {
            Ok(p) if p.pulled_bytes == 0 => {
                self.image_counters.cache_hits.fetch_add(1, Relaxed);
                let _ = self.log_line(
                    &spec.instance_id,
                    &format!("gpupool: image {} found in the node's cache", p.digest),
                );
            }
            Ok(p) => {
                self.image_counters.pulls.fetch_add(1, Relaxed);
                self.image_counters.bytes.fetch_add(p.pulled_bytes, Relaxed);
                let _ = self.log_line(
                    &spec.instance_id,
                    &format!(
                        "gpupool: pulled image {} ({} bytes)",
                        p.digest, p.pulled_bytes
                    ),
                );
            }
            Err(e) => {
                self.image_counters.failures.fetch_add(1, Relaxed);
                let _ = self.log_line(
                    &spec.instance_id,
                    &format!("gpupool: cannot pull {}: {e}", spec.image),
                );
            }
        }
        Ok((result?, identity))
    }

    /// Appends a line of gpupool's own to an instance's log.
    fn log_line(&self, instance_id: &str, line: &str) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.log_path(instance_id)?)?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    /// Records a started (or failed) instance and watches it.
    fn started(
        &self,
        spec: InstanceSpec,
        port: u16,
        result: anyhow::Result<(tokio::process::Child, Option<Arc<dyn Cgroup>>)>,
        image: Option<(String, PathBuf)>,
    ) {
        match result {
            Ok((child, cgroup)) => {
                let pid = child.id().unwrap_or(0);
                let owner = Owner::from_spec(&spec);
                let (image_digest, rootfs) = match image {
                    Some((d, r)) => (d, Some(r)),
                    None => (String::new(), None),
                };
                self.save_record(&Record {
                    instance_id: spec.instance_id.clone(),
                    pid,
                    start_ticks: process_start_ticks(pid).unwrap_or(0),
                    memory_limit: spec.limits.memory_bytes,
                    stop_requested: false,
                    cgroup: cgroup.is_some(),
                    gpu_uuids: owner.gpu_uuids,
                    pool: owner.pool,
                    pool_name: owner.pool_name,
                    job_id: owner.job,
                    tenant: owner.tenant,
                    port,
                    serve: spec.serve.clone(),
                    container: !spec.image.is_empty(),
                    image_digest,
                    rootfs,
                    cpu_milli: spec.limits.cpu_milli,
                });
                self.update(&spec.instance_id, |e| {
                    e.report.pid = pid;
                    e.pgid = Some(pid as i32);
                    e.cgroup = cgroup;
                });
                tracing::info!(instance = %spec.instance_id, pid, port, image = %spec.image, "instance started");
                if let Some(serve) = spec.serve.clone() {
                    self.watch(spec.instance_id.clone(), port, serve);
                }
                let this = self.clone();
                tokio::spawn(async move { this.wait(spec.instance_id, child).await });
            }
            Err(err) => {
                tracing::warn!(instance = %spec.instance_id, error = %err, "instance failed to start");
                let _ = std::fs::remove_dir_all(self.bundles_dir().join(&spec.instance_id));
                // Its address goes back to the plan: nothing may keep it.
                self.detach_network(&spec.instance_id);
                self.update(&spec.instance_id, |e| {
                    e.report.phase = Phase::Failed;
                    e.report.reason = format!("failed to start: {err}");
                });
            }
        }
        self.changed.notify_one();
    }

    /// The instance's cgroup, per the confinement policy.
    fn cgroup_for(&self, spec: &InstanceSpec) -> anyhow::Result<Option<Arc<dyn Cgroup>>> {
        let Some(manager) = &self.cgroups else {
            if self.confinement == Confinement::Required {
                anyhow::bail!("confinement is required but no writable cgroup hierarchy was found");
            }
            return Ok(None);
        };
        match manager.create(&self.cgroup_name(&spec.instance_id), &spec.limits) {
            Ok(group) => Ok(Some(Arc::from(group))),
            Err(err) if self.confinement == Confinement::BestEffort => {
                tracing::warn!(instance = %spec.instance_id, error = %err, "cannot create cgroup; running unconfined");
                Ok(None)
            }
            Err(err) => Err(anyhow::anyhow!("cannot create cgroup: {err}")),
        }
    }

    /// The working and log directories of an instance, and its identity.
    fn directories(
        &self,
        spec: &mut InstanceSpec,
        identity: Option<crate::identity::Identity>,
    ) -> anyhow::Result<(PathBuf, PathBuf, Option<PathBuf>)> {
        let root = self.tenant_root(spec, identity)?;
        let workdir = match &spec.working_dir {
            Some(dir) => self.resolve_dir(&root, dir, identity.is_some(), "working directory")?,
            None if identity.is_some() => root.join("work").join(&spec.instance_id),
            None => self.state_dir.join("work").join(&spec.instance_id),
        };
        let logdir = match spec.env.get("GPUPOOL_LOG_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => Some(self.resolve_dir(
                &root,
                Path::new(dir),
                identity.is_some(),
                "log directory",
            )?),
            None => None,
        };
        Ok((root, workdir, logdir))
    }

    /// Expands `{port}`, `{token}` and `{log_dir}` in the command.
    fn expand(spec: &mut InstanceSpec, port: u16) {
        if port == 0 {
            return;
        }
        let var = |k: &str| spec.env.get(k).cloned().unwrap_or_default();
        spec.command = crate::serving::expand(
            &spec.command,
            Some(port),
            &var("GPUPOOL_NOTEBOOK_TOKEN"),
            &var("GPUPOOL_LOG_DIR"),
        );
    }

    /// How a host process is launched.
    fn prepare_host(&self, spec: &mut InstanceSpec, port: u16) -> anyhow::Result<Launch> {
        let identity = self.identity_for(spec)?;
        let (root, workdir, logdir) = self.directories(spec, identity)?;
        if let Some(dir) = &logdir {
            spec.env
                .insert("GPUPOOL_LOG_DIR".into(), dir.display().to_string());
        }
        Self::expand(spec, port);
        spec.env
            .insert("GPUPOOL_TENANT_DIR".into(), root.display().to_string());
        let notice = self.make_notice_dir(&spec.instance_id, identity.map(|i| i.gid))?;
        spec.env.insert(
            "GPUPOOL_STOP_NOTICE".into(),
            notice.join(NOTICE_FILE).display().to_string(),
        );
        if identity.is_none() {
            // The agent's own user: the directory is made here.
            std::fs::create_dir_all(&workdir)?;
        }
        Ok(Launch::Host {
            identity,
            workdir,
            keep: root,
        })
    }

    /// How an image instance is launched: its bundle, written.
    fn prepare_container(
        &self,
        spec: &mut InstanceSpec,
        port: u16,
        image: &crate::image::Prepared,
        identity: crate::identity::Identity,
    ) -> anyhow::Result<Launch> {
        let oci = self.oci.clone().expect("checked by pull");
        let (tenant_root, workdir, logdir) = self.directories(spec, Some(identity))?;
        if logdir.is_some() {
            spec.env
                .insert("GPUPOOL_LOG_DIR".into(), crate::container::LOGDIR.into());
        }
        Self::expand(spec, port);
        let notice = self.make_notice_dir(&spec.instance_id, None)?;
        spec.env.insert(
            "GPUPOOL_STOP_NOTICE".into(),
            format!("{}/{NOTICE_FILE}", crate::container::NOTICE_DIR),
        );
        // In a network, the shim joins its namespace and the container
        // stays in it.
        let host_network = spec.attached.is_some()
            || match spec.network.as_str() {
                "host" => true,
                "none" => false,
                _ => spec.serve.is_some() || spec.world_size > 1,
            };
        let env = instance_env(spec, Path::new(crate::container::WORKDIR));
        let cgroups_path = match &self.cgroups {
            Some(m) => m
                .open(&self.cgroup_name(&spec.instance_id))
                .runtime_path(&spec.instance_id),
            None => crate::cgroup::runtime_child(&spec.instance_id),
        };
        let dirs = crate::container::BundleDirs::new(&self.bundles_dir(), &spec.instance_id);
        let bundle = crate::container::BundleSpec {
            instance_id: &spec.instance_id,
            command: &spec.command,
            env: &env,
            image: &image.config,
            identity,
            workdir: &dirs.mnt_work,
            logdir: logdir.as_ref().map(|_| dirs.mnt_logs.as_path()),
            notice_dir: Some(&notice),
            host_network,
            hosts_file: spec.attached.as_ref().map(|a| a.hosts_file.as_path()),
            mps_pipe_dir: spec
                .mps
                .as_ref()
                .map(|m| m.pipe_dir.as_path())
                .filter(|d| d.is_dir()),
            cgroups_path: &cgroups_path,
        };
        let mut oci_spec = crate::container::runtime_spec(&bundle, &image.rootfs)?;
        let gpus: Vec<crate::cdi::Gpu> = spec
            .gpu_indexes
            .iter()
            .zip(&spec.gpu_uuids)
            .map(|(index, uuid)| crate::cdi::Gpu {
                index: *index,
                uuid: uuid.clone(),
            })
            .collect();
        if !gpus.is_empty() && oci.fake_gpus {
            tracing::info!(instance = %spec.instance_id, "simulated GPUs: no device given to the container");
        } else if !gpus.is_empty() {
            let injected =
                crate::cdi::inject(&mut oci_spec, &gpus, false, &oci.cdi_dirs, Path::new("/"))
                    .map_err(|e| anyhow::anyhow!("cannot give the container its GPUs: {e}"))?;
            tracing::info!(instance = %spec.instance_id, devices = ?injected.devices, "GPUs injected");
        }
        dirs.write(&oci_spec, (identity.range_base, identity.range_base))?;
        // The image's user, as the spec resolved it.
        let owner = oci_spec
            .process()
            .as_ref()
            .map(|p| (p.user().uid(), p.user().gid()));
        // Its group (on the host, in the instance's id range) reads the
        // notice directory.
        let gid = identity.range_base + owner.map_or(0, |o| o.1);
        share_notice_dir(&notice, Some(gid))?;
        Ok(Launch::Container {
            owner,
            identity,
            workdir,
            logdir,
            tenant_root,
            dirs,
            lower: image.rootfs.clone(),
            oci,
        })
    }

    /// The command that starts an instance: its shim, which first joins
    /// `procs_files` (the instance's cgroup), or, with no shim, the
    /// command itself. `env_out` gets what to write to the shim's stdin.
    fn instance_command(
        &self,
        spec: &InstanceSpec,
        launch: &Launch,
        exit_file: &Path,
        procs_files: &[PathBuf],
        env_out: &mut Option<Vec<u8>>,
    ) -> anyhow::Result<tokio::process::Command> {
        Ok(match (launch, &self.shim) {
            (
                Launch::Container {
                    identity,
                    workdir,
                    logdir,
                    tenant_root,
                    dirs,
                    lower,
                    oci,
                    owner,
                },
                Some(shim),
            ) => {
                let mut c = tokio::process::Command::new(shim);
                c.arg("shim").arg(exit_file);
                for f in procs_files {
                    c.arg("--join").arg(f);
                }
                c.arg("--as")
                    .arg(format!("{}:{}", identity.range_base, identity.range_base));
                c.arg("--cwd").arg(workdir);
                c.arg("--keep").arg(tenant_root);
                if let Some((uid, gid)) = owner.filter(|o| *o != (0, 0)) {
                    c.arg("--owner").arg(format!(
                        "{}:{}",
                        identity.range_base + uid,
                        identity.range_base + gid
                    ));
                }
                if let Some(a) = &spec.attached {
                    c.arg("--netns").arg(&a.netns);
                }
                c.arg("--stage").arg(workdir).arg(&dirs.mnt_work);
                if let Some(dir) = logdir {
                    c.arg("--stage").arg(dir).arg(&dirs.mnt_logs);
                }
                c.arg("--container")
                    .arg(&oci.binary)
                    .arg(&oci.root)
                    .arg(&dirs.dir)
                    .arg(&spec.instance_id)
                    .arg(format!(
                        "{}:{}:{}:{}",
                        lower.display(),
                        dirs.upper.display(),
                        dirs.work.display(),
                        dirs.rootfs.display()
                    ));
                c.env_clear().current_dir("/");
                c
            }
            (Launch::Container { .. }, None) => anyhow::bail!("image instances need the shim"),
            (
                Launch::Host {
                    identity,
                    workdir,
                    keep,
                },
                Some(shim),
            ) => {
                // The shim runs as the agent's user: it gets none of the
                // job's environment (LD_PRELOAD and friends would run the
                // job's code with its privileges), only the bytes of it on
                // its stdin (`--env-file -`), which it gives to the command
                // alone. Nothing of it is ever written to disk.
                *env_out = Some(env_bytes(&instance_env(spec, workdir)));
                let (program, args) = spec
                    .command
                    .split_first()
                    .ok_or_else(|| anyhow::anyhow!("empty command"))?;
                let mut c = tokio::process::Command::new(shim);
                c.arg("shim").arg(exit_file);
                for f in procs_files {
                    c.arg("--join").arg(f);
                }
                if let Some(id) = identity {
                    c.arg("--as").arg(format!("{}:{}", id.uid, id.gid));
                }
                c.arg("--env-file").arg("-");
                c.arg("--cwd").arg(workdir);
                if let Some(a) = &spec.attached {
                    c.arg("--netns").arg(&a.netns);
                }
                if let (Some(hide), Some(_)) = (&self.isolate, identity) {
                    c.arg("--isolate");
                    for h in hide {
                        c.arg("--hide").arg(h);
                    }
                    c.arg("--keep").arg(keep);
                    c.arg("--keep").arg(self.notice_dir(&spec.instance_id));
                    if let Some(a) = &spec.attached {
                        c.arg("--hosts").arg(&a.hosts_file);
                    }
                    // The MPS daemon's pipes, wherever they are (a /tmp one
                    // would be under the instance's own /tmp).
                    if let Some(mps) = spec.mps.as_ref().filter(|m| m.pipe_dir.is_dir()) {
                        c.arg("--keep").arg(&mps.pipe_dir);
                    }
                }
                c.arg("--").arg(program).args(args);
                c.env_clear().current_dir("/");
                c
            }
            (
                Launch::Host {
                    identity, workdir, ..
                },
                None,
            ) => {
                let (program, args) = spec
                    .command
                    .split_first()
                    .ok_or_else(|| anyhow::anyhow!("empty command"))?;
                if let Some(id) = identity {
                    std::fs::create_dir_all(workdir)?;
                    std::os::unix::fs::chown(workdir, Some(id.uid), Some(id.gid))?;
                }
                let mut c = tokio::process::Command::new(program);
                c.args(args)
                    .env_clear()
                    .envs(instance_env(spec, workdir))
                    .current_dir(workdir);
                c
            }
        })
    }

    fn spawn(
        &self,
        spec: &InstanceSpec,
        launch: Launch,
    ) -> anyhow::Result<(tokio::process::Child, Option<Arc<dyn Cgroup>>)> {
        let log_path = self.log_path(&spec.instance_id)?;
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&log_path)?
        };
        std::fs::create_dir_all(self.state_dir.join("instances"))?;
        let exit_file = self.exit_path(&spec.instance_id);
        let _ = std::fs::remove_file(&exit_file);
        // A container's CPU quota is set once its process is in its cgroup:
        // the runtime's own start (a Go program, tens of ms of CPU) under a
        // small quota would take several CFS periods.
        let deferred_cpu = match &launch {
            Launch::Container { .. } => spec.limits.cpu_milli,
            Launch::Host { .. } => None,
        };
        let cgroup = if deferred_cpu.is_some() {
            let mut unquoted = spec.clone();
            unquoted.limits.cpu_milli = None;
            self.cgroup_for(&unquoted)?
        } else {
            self.cgroup_for(spec)?
        };
        let procs_files = cgroup.as_ref().map(|g| g.procs_files()).unwrap_or_default();
        let mut env = None;
        let built = self.instance_command(spec, &launch, &exit_file, &procs_files, &mut env);
        let mut cmd = match built {
            Ok(cmd) => cmd,
            Err(err) => {
                if let Some(group) = &cgroup {
                    let _ = group.remove();
                }
                return Err(err);
            }
        };
        cmd.stdin(if env.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0)
        .kill_on_drop(false);
        let drop_to = match (&launch, &self.shim) {
            (
                Launch::Host {
                    identity: Some(id), ..
                },
                None,
            ) => Some((id.uid, id.gid)),
            _ => None,
        };
        if let (Some(milli), Some(group)) = (deferred_cpu, cgroup.clone()) {
            let id = spec.instance_id.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                // Until the container's process is there (or 5 s: then the
                // quota holds from now on anyway).
                while group.runtime_pids(&id).is_empty()
                    && started.elapsed() < Duration::from_secs(5)
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if let Err(err) = group.set_cpu_quota(milli) {
                    tracing::warn!(instance = %id, error = %err, "cannot set the container's CPU quota");
                }
            });
        }
        // The shim joins the cgroup itself (`--join`), before it starts the
        // command: with nothing to run between fork and exec, the agent
        // spawns it with posix_spawn (a vfork), not a fork of the whole
        // agent, whose page tables and copy-on-write faults cost more than
        // the instance. Without a shim, the child joins before exec.
        let files: Vec<std::ffi::CString> = if self.shim.is_some() {
            Vec::new()
        } else {
            procs_files
                .iter()
                .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()))
                .collect::<Result<_, _>>()?
        };
        if !files.is_empty() || drop_to.is_some() {
            // The child joins its cgroup before exec, so nothing it starts
            // escapes, and only then gives up root (an unprivileged process
            // may not write cgroup.procs). Paths are prepared here: pre_exec
            // may not allocate.
            // SAFETY: the closure only calls open/write/close and
            // setgroups/setgid/setuid (async-signal-safe) on memory prepared
            // before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    for f in &files {
                        let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                        libc::close(fd);
                        if !ok {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some((uid, gid)) = drop_to
                        && (libc::setgroups(0, std::ptr::null()) != 0
                            || libc::setgid(gid) != 0
                            || libc::setuid(uid) != 0)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        match cmd.spawn() {
            Ok(mut child) => {
                if let (Some(bytes), Some(stdin)) = (env, child.stdin.take()) {
                    give_env(&spec.instance_id, stdin, bytes);
                }
                Ok((child, cgroup))
            }
            Err(err) => {
                if let Some(group) = &cgroup {
                    let _ = group.remove();
                }
                // Name what was being done, and with which files.
                let how = match (&self.shim, drop_to) {
                    (Some(shim), _) => format!("the shim {}", shim.display()),
                    (None, Some((uid, _))) => format!("{} as uid {uid}", spec.command[0]),
                    (None, None) => spec.command.first().cloned().unwrap_or_default(),
                };
                let joining = cgroup
                    .as_ref()
                    .map(|g| {
                        let files: Vec<String> = g
                            .procs_files()
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect();
                        format!(" (joining {})", files.join(", "))
                    })
                    .unwrap_or_default();
                Err(anyhow::anyhow!("cannot start {how}{joining}: {err}"))
            }
        }
    }

    async fn wait(&self, instance_id: String, mut child: tokio::process::Child) {
        let status = child.wait().await;
        self.finish(&instance_id, Some(status)).await;
    }

    /// Records how an instance ended: the shim's exit file when there is
    /// one, else the waited status, else (an adopted process that left no
    /// file) unknown.
    async fn finish(
        &self,
        instance_id: &str,
        waited: Option<std::io::Result<std::process::ExitStatus>>,
    ) {
        let instance_id = instance_id.to_string();
        let status: std::io::Result<(Option<i32>, Option<i32>)> = match (
            crate::shim::read_exit(&self.exit_path(&instance_id)),
            waited,
        ) {
            (Some(crate::shim::Exit::Code(c)), _) => Ok((Some(c), None)),
            (Some(crate::shim::Exit::Signal(s)), _) => Ok((None, Some(s))),
            (None, Some(Ok(st))) => Ok((st.code(), st.signal())),
            (None, Some(Err(e))) => Err(e),
            (None, None) => Ok((None, Some(libc::SIGKILL))),
        };
        let pgid = self
            .entries
            .lock()
            .unwrap()
            .get(&instance_id)
            .and_then(|e| e.pgid);
        // Whatever the leader left behind in its group goes with it.
        if let Some(pgid) = pgid {
            signal_group(pgid, libc::SIGKILL);
        }
        let cgroup = self
            .entries
            .lock()
            .unwrap()
            .get(&instance_id)
            .and_then(|e| e.cgroup.clone());
        let container = self
            .entries
            .lock()
            .unwrap()
            .get(&instance_id)
            .is_some_and(|e| e.container);
        let killed = matches!(&status, Ok((_, Some(libc::SIGKILL))));
        let oom_killed = cgroup
            .as_ref()
            .is_some_and(|g| g.oom_kills() > 0 || container && killed && g.hit_memory_limit());
        if let Some(group) = &cgroup {
            // Also what left the process group but not the cgroup.
            for pid in group.pids() {
                // SAFETY: kill(2) on a pid read from our own cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let group = group.clone();
            let id = instance_id.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    if group.remove().is_ok() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tracing::warn!(instance = %id, "cgroup not removed: processes still in it");
            });
        }
        if container {
            // The shim deletes the runtime's state; not when it was killed.
            if let Some(oci) = &self.oci {
                let _ = tokio::process::Command::new(&oci.binary)
                    .arg("--root")
                    .arg(&oci.root)
                    .args(["delete", "--force", &instance_id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
            let bundle = self.bundles_dir().join(&instance_id);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(bundle)).await;
        }
        // Its namespace, veth and published port go with it.
        if let Some(n) = self.networks.clone() {
            let id = instance_id.clone();
            let _ = tokio::task::spawn_blocking(move || n.detach(&id)).await;
        }
        self.update(&instance_id, |e| {
            match &status {
                Ok((code, signal)) => {
                    e.report.exit_code = *code;
                    e.report.signal = *signal;
                    e.report.phase = if e.stop_requested {
                        Phase::Stopped
                    } else if *code == Some(0) {
                        Phase::Succeeded
                    } else {
                        Phase::Failed
                    };
                    if oom_killed && !e.stop_requested {
                        e.report.phase = Phase::Failed;
                        e.report.reason = format!(
                            "OOM: killed for exceeding its memory limit ({} MiB)",
                            e.memory_limit.unwrap_or(0) >> 20
                        );
                    } else if e.report.phase == Phase::Failed {
                        e.report.reason = match (*code, *signal) {
                            (Some(code), _) => format!("exited with code {code}"),
                            (None, Some(sig)) => format!("killed by signal {sig}"),
                            _ => "exited".into(),
                        };
                    }
                }
                Err(err) => {
                    e.report.phase = Phase::Failed;
                    e.report.reason = format!("wait failed: {err}");
                }
            }
            tracing::info!(instance = %e.report.instance_id, phase = ?e.report.phase,
                exit_code = ?e.report.exit_code, signal = ?e.report.signal, "instance ended");
        });
        self.changed.notify_one();
    }

    /// Runs an instance's readiness check and activity watch until it
    /// ends.
    fn watch(&self, instance_id: String, port: u16, serve: Serve) {
        if serve.health.is_none() && !serve.watch_activity {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let period = serve.health.as_ref().map_or(ACTIVITY_PERIOD, |h| {
                Duration::from_millis(u64::from(h.interval_ms.max(100)))
            });
            if let Some(h) = &serve.health {
                tokio::time::sleep(Duration::from_millis(u64::from(h.initial_delay_ms))).await;
            }
            let mut readiness = crate::serving::Readiness::default();
            let mut activity = crate::serving::ActivityWatch::default();
            let mut next_activity = tokio::time::Instant::now();
            loop {
                let running = this
                    .entries
                    .lock()
                    .unwrap()
                    .get(&instance_id)
                    .is_some_and(|e| e.report.phase == Phase::Running);
                if !running {
                    this.update(&instance_id, |e| e.report.ready = false);
                    return;
                }
                let ip = serve.address.unwrap_or(std::net::Ipv4Addr::LOCALHOST);
                if let Some(h) = &serve.health {
                    let ok = crate::serving::probe_ready(ip, serve.netns.as_deref(), port, h).await;
                    if readiness.observe(ok, h.failure_threshold) {
                        let ready = readiness.ready;
                        tracing::info!(instance = %instance_id, ready, "readiness changed");
                        this.update(&instance_id, |e| e.report.ready = ready);
                        this.changed.notify_one();
                    }
                }
                if serve.watch_activity && tokio::time::Instant::now() >= next_activity {
                    next_activity = tokio::time::Instant::now() + ACTIVITY_PERIOD;
                    // Its connections are in its namespace, which its
                    // shim (the group leader) joined.
                    let net = match (serve.address, this.pgid_of(&instance_id)) {
                        (Some(_), Some(pgid)) => PathBuf::from(format!("/proc/{pgid}/net")),
                        _ => PathBuf::from("/proc/net"),
                    };
                    let at = (ip, serve.netns.as_deref());
                    if activity.active(at, &net, port, &serve.token).await {
                        this.update(&instance_id, |e| {
                            e.last_activity = Some(std::time::Instant::now());
                        });
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
    }

    fn pgid_of(&self, instance_id: &str) -> Option<i32> {
        self.entries.lock().unwrap().get(instance_id)?.pgid
    }

    fn update(&self, instance_id: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.entries.lock().unwrap().get_mut(instance_id) {
            f(entry);
        }
    }

    /// Stops an instance: SIGTERM to its process group, SIGKILL to the group
    /// after `grace` if anything in it is still alive.
    pub fn stop(&self, instance_id: &str, grace: Duration, reason: &str) {
        let pgid = {
            let mut entries = self.entries.lock().unwrap();
            let Some(entry) = entries.get_mut(instance_id) else {
                return;
            };
            // Idempotent: a repeated stop neither re-signals nor adds timers.
            if entry.report.phase.is_terminal() || entry.stop_requested {
                return;
            }
            entry.stop_requested = true;
            if let Ok(text) = std::fs::read_to_string(self.record_path(instance_id))
                && let Ok(mut record) = serde_json::from_str::<Record>(&text)
            {
                record.stop_requested = true;
                self.save_record(&record);
            }
            entry.report.phase = Phase::Stopping;
            entry.report.reason = reason.to_string();
            entry.pgid
        };
        self.changed.notify_one();
        let Some(pgid) = pgid else { return };
        tracing::info!(instance = %instance_id, pgid, ?grace, "stopping instance");
        self.write_notice(instance_id, reason);
        signal_group(pgid, libc::SIGTERM);
        let cgroup = self
            .entries
            .lock()
            .unwrap()
            .get(instance_id)
            .and_then(|e| e.cgroup.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline {
                if !group_alive(pgid) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if group_alive(pgid) {
                tracing::info!(pgid, "grace expired, sending SIGKILL to the group");
                // A container's processes are in its cgroup, not always in
                // the shim's process group.
                for pid in cgroup.iter().flat_map(|g| g.pids()) {
                    // SAFETY: kill(2) on a pid read from the instance's cgroup.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                signal_group(pgid, libc::SIGKILL);
            }
        });
    }

    /// Stops every live instance (SIGTERM, SIGKILL after `grace`); returns
    /// how many.
    pub fn stop_all(&self, grace: Duration, reason: &str) -> usize {
        let live: Vec<String> = self
            .entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.report.phase.is_terminal())
            .map(|e| e.report.instance_id.clone())
            .collect();
        for id in &live {
            self.stop(id, grace, reason);
        }
        live.len()
    }

    /// SIGKILLs the process group of every live instance (the last word of
    /// a shutdown that stops its instances).
    pub fn kill_all(&self) {
        let groups: Vec<i32> = self
            .entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.report.phase.is_terminal())
            .filter_map(|e| e.pgid)
            .collect();
        for pgid in groups {
            signal_group(pgid, libc::SIGKILL);
        }
    }

    /// Instances not yet ended.
    pub fn live(&self) -> usize {
        self.entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| !e.report.phase.is_terminal())
            .count()
    }

    /// Drops a finished instance the scheduler has recorded. Its log stays.
    pub fn forget(&self, instance_id: &str) {
        if !valid_id(instance_id) {
            return;
        }
        let mut entries = self.entries.lock().unwrap();
        if entries
            .get(instance_id)
            .is_some_and(|e| e.report.phase.is_terminal())
        {
            entries.remove(instance_id);
            self.detach_network(instance_id);
            let _ = std::fs::remove_file(self.record_path(instance_id));
            let _ = std::fs::remove_file(self.exit_path(instance_id));
            let _ = std::fs::remove_file(self.env_path(instance_id));
            let _ = std::fs::remove_dir_all(self.bundles_dir().join(instance_id));
            let _ = std::fs::remove_dir_all(self.notice_dir(instance_id));
        }
    }

    /// Reads up to `max` bytes of an instance's log from `offset`.
    /// Returns the bytes and the offset after them.
    pub async fn read_log(
        &self,
        instance_id: &str,
        offset: u64,
        max: usize,
    ) -> Result<(Vec<u8>, u64), LogError> {
        let path = self.log_path(instance_id)?;
        let io = |source| LogError::Io {
            instance_id: instance_id.to_string(),
            source,
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LogError::NotFound(instance_id.to_string()));
            }
            Err(e) => return Err(io(e)),
        };
        // After a rotation the file is shorter than the reader's offset:
        // start again from the top of the new file.
        let len = file.metadata().await.map_err(io)?.len();
        let offset = if offset > len { 0 } else { offset };
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io)?;
        let mut buf = Vec::with_capacity(max.min(64 * 1024));
        file.take(max as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        let next = offset + buf.len() as u64;
        Ok((buf, next))
    }
}

/// How an instance is started.
enum Launch {
    /// A host process as `identity` (None: the agent's user) in `workdir`;
    /// `keep` is the tenant's directory, visible under the covered state
    /// dir.
    Host {
        identity: Option<crate::identity::Identity>,
        workdir: PathBuf,
        keep: PathBuf,
    },
    /// A container from its bundle, on the image's unpacked `lower` layer.
    Container {
        identity: crate::identity::Identity,
        workdir: PathBuf,
        logdir: Option<PathBuf>,
        tenant_root: PathBuf,
        dirs: crate::container::BundleDirs,
        /// The image's user (container ids), to own /work and /logs.
        owner: Option<(u32, u32)>,
        lower: PathBuf,
        oci: OciRuntime,
    },
}

/// Ports given to serving instances unless configured otherwise.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (30_000, 32_767);

/// How often a watched instance is checked for user activity.
const ACTIVITY_PERIOD: Duration = Duration::from_secs(1);

/// The stop notice's file name, in the instance's notice directory.
const NOTICE_FILE: &str = "stop";

/// The environment an instance sees: nothing of the agent's but PATH and
/// LANG, then the job's own variables, then what gpupool sets (which wins).
fn instance_env(spec: &InstanceSpec, workdir: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in ["PATH", "LANG"] {
        if let Ok(value) = std::env::var(key) {
            env.insert(key.to_string(), value);
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.extend(spec.env.clone());
    let visible = spec.gpu_uuids.join(",");
    env.insert(
        "NVIDIA_VISIBLE_DEVICES".into(),
        if visible.is_empty() {
            "void".into()
        } else {
            visible.clone()
        },
    );
    env.insert("CUDA_VISIBLE_DEVICES".into(), visible);
    env.insert("HOME".into(), workdir.display().to_string());
    env.insert("GPUPOOL_JOB_ID".into(), spec.job_id.clone());
    env.insert("GPUPOOL_INSTANCE_ID".into(), spec.instance_id.clone());
    for (key, value) in &spec.metadata {
        let name: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.insert(format!("GPUPOOL_{name}"), value.clone());
    }
    if let Some(mps) = &spec.mps {
        env.insert(
            "CUDA_MPS_PIPE_DIRECTORY".into(),
            mps.pipe_dir.display().to_string(),
        );
        env.insert(
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(),
            mps.active_thread_pct.to_string(),
        );
        let limits: Vec<String> = mps
            .pinned_mem_mib
            .iter()
            .map(|(uuid, mib)| format!("{uuid}={mib}M"))
            .collect();
        env.insert("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(), limits.join(","));
    }
    env.insert("RANK".into(), spec.rank.to_string());
    env.insert("WORLD_SIZE".into(), spec.world_size.max(1).to_string());
    env
}

/// (uid, gid) of a user name.
fn lookup_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy
    // the two integers out before any other call.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        anyhow::bail!("user {name:?} not found");
    }
    // SAFETY: pw is non-null and points to a valid passwd entry.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// The kernel start time of a live (non-zombie) process, in clock ticks.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Writes `bytes` to the shim's stdin and closes it: at once when they
/// fit in a pipe's atomic write (the shim is not kept waiting for a task
/// to be scheduled), else, or for what is left, from a task that gives up
/// after 30 s (a shim that neither reads nor exits). A shim that died
/// first gets nothing (EPIPE); one given less than the length it was
/// promised runs nothing.
fn give_env(instance_id: &str, mut stdin: tokio::process::ChildStdin, bytes: Vec<u8>) {
    let mut done = 0;
    if bytes.len() <= libc::PIPE_BUF {
        use std::os::fd::AsRawFd;
        // SAFETY: writing our own buffer to our own (non-blocking) pipe.
        let n = unsafe { libc::write(stdin.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n == bytes.len() as isize {
            return;
        }
        done = usize::try_from(n).unwrap_or(0);
    }
    let id = instance_id.to_string();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let write = stdin.write_all(&bytes[done..]);
        match tokio::time::timeout(Duration::from_secs(30), write).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(instance = %id, error = %err, "cannot give the shim the instance's environment");
            }
            Err(_) => {
                tracing::warn!(instance = %id, "the shim did not read the instance's environment in 30 s");
            }
        }
    });
}

/// An instance's environment for the shim's stdin: its length in decimal
/// and a newline, then `KEY=VALUE` entries, each ended by a NUL (values
/// may hold newlines). The length lets the shim tell a whole environment
/// from one cut short by an agent that died while writing it.
fn env_bytes(env: &BTreeMap<String, String>) -> Vec<u8> {
    let mut body = Vec::with_capacity(env.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (k, v) in env {
        body.extend_from_slice(k.as_bytes());
        body.push(b'=');
        body.extend_from_slice(v.as_bytes());
        body.push(b'\0');
    }
    let mut out = format!("{}\n", body.len()).into_bytes();
    out.extend_from_slice(&body);
    out
}

/// True when `path` is `dir` or below it, compared on the normalised paths
/// (`..` resolved lexically, then symlinks of the longest existing prefix).
fn inside(path: &Path, dir: &Path) -> bool {
    fn normal(p: &Path) -> PathBuf {
        let absolute = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut out = PathBuf::new();
        for c in absolute.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        // Resolve links where the path exists.
        let mut existing = out.clone();
        let mut rest = Vec::new();
        while !existing.exists() {
            match existing.file_name() {
                Some(name) => rest.push(name.to_os_string()),
                None => break,
            }
            existing.pop();
        }
        let mut real = existing.canonicalize().unwrap_or(existing);
        for name in rest.iter().rev() {
            real.push(name);
        }
        real
    }
    normal(path).starts_with(normal(dir))
}

/// Removes `STATE/tenants/<t>/work/<name>` (a tree the tenant owns and may
/// fill with links) without following any link: `tenants/<t>` (whose parent
/// is root's) and then `work` are opened with O_NOFOLLOW, and the entry is
/// removed below that descriptor by std's `remove_dir_all`, which never
/// follows a link (a link entry itself is unlinked). Returns whether it is
/// gone.
fn remove_in_tenant_dir(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let (Some(name), Some(work)) = (path.file_name(), path.parent()) else {
        return false;
    };
    let (Some(tenant), Some(_)) = (work.parent(), work.file_name()) else {
        return false;
    };
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(p)
    };
    let Ok(tenant_fd) = open(tenant) else {
        return false;
    };
    let pinned = |fd: &std::fs::File| {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    };
    let Ok(work_fd) = open(&pinned(&tenant_fd).join("work")) else {
        return false;
    };
    let target = pinned(&work_fd).join(name);
    let removed = match target.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
        Ok(_) => std::fs::remove_file(&target),
        Err(e) => Err(e),
    };
    if let Err(err) = &removed {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove a tenant's work directory");
    }
    target.symlink_metadata().is_err()
}

/// Bytes under `path` (not following symlinks) and the newest change.
fn tree_size(path: &Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut newest = std::time::UNIX_EPOCH;
    let mut stack = vec![path.to_path_buf()];
    // Disk actually used: a sparse file counts its blocks, not its length,
    // and a file linked under many names counts once.
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = stack.pop() {
        let Ok(meta) = p.symlink_metadata() else {
            continue;
        };
        newest = newest.max(meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        bytes += if meta.is_file() {
            meta.len().min(meta.blocks().saturating_mul(512))
        } else {
            meta.len()
        };
        if meta.is_dir()
            && let Ok(dir) = std::fs::read_dir(&p)
        {
            stack.extend(dir.flatten().map(|e| e.path()));
        }
    }
    (bytes, newest)
}

/// Gives `dir` to root and `group` to read (0750), or keeps it the
/// agent's alone (0700).
fn share_notice_dir(dir: &Path, group: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match group {
        Some(gid) => {
            std::os::unix::fs::chown(dir, None, Some(gid))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        }
        None => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn signal_group(pgid: i32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// True while any non-zombie process is left in the group. Zombies count as
/// gone: they hold no resources and may belong to a parent that never reaps.
fn group_alive(pgid: i32) -> bool {
    if !signal_group(pgid, 0) {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| {
            // pid (comm) state ppid pgrp ...; comm may hold spaces, so cut at the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
            pgrp == Some(pgid) && state != Some("Z")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, command: &[&str]) -> InstanceSpec {
        InstanceSpec {
            instance_id: id.into(),
            job_id: "j1".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            world_size: 1,
            ..Default::default()
        }
    }

    async fn wait_terminal(rt: &Runtime, id: &str) -> InstanceReport {
        for _ in 0..400 {
            if let Some(r) = rt.snapshot().into_iter().find(|r| r.instance_id == id)
                && r.phase.is_terminal()
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("instance {id} did not end");
    }

    /// A tenant's work entries go without following any link the tenant
    /// planted: not a symlinked `work`, not a link entry, not a link inside.
    #[test]
    fn tenant_work_is_removed_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(victim.join("keep")).unwrap();
        let work = dir.path().join("tenants/t/work");
        std::fs::create_dir_all(work.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&victim, work.join("a/b/link")).unwrap();
        std::os::unix::fs::symlink(&victim, work.join("l")).unwrap();
        assert!(remove_in_tenant_dir(&work.join("a")));
        assert!(remove_in_tenant_dir(&work.join("l")));
        assert!(!work.join("a").exists() && work.join("l").symlink_metadata().is_err());
        assert!(victim.join("keep").exists());
        // `work` itself a link: nothing is removed through it.
        std::fs::remove_dir_all(&work).unwrap();
        std::os::unix::fs::symlink(&victim, &work).unwrap();
        assert!(!remove_in_tenant_dir(&work.join("keep")));
        assert!(victim.join("keep").exists());
    }

    /// A sparse file counts the disk it uses, a hard-linked one once.
    #[test]
    fn tree_sizes_count_disk_used() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("sparse")).unwrap();
        f.set_len(1 << 40).unwrap();
        std::fs::write(dir.path().join("data"), vec![1u8; 100_000]).unwrap();
        for i in 0..10 {
            std::fs::hard_link(dir.path().join("data"), dir.path().join(format!("h{i}"))).unwrap();
        }
        let (bytes, _) = tree_size(dir.path());
        assert!((100_000..200_000).contains(&bytes), "{bytes}");
    }

    /// Many finished instances and a small budget: the oldest ended ones'
    /// logs and work directories go first, until the rest fits; a running
    /// instance's files stay however old and large they are.
    #[tokio::test]
    async fn the_disk_budget_removes_the_oldest_ended_instances_files_never_a_running_one() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        // The oldest instance is a running one with 300 KB of files.
        rt.start(spec(
            "live",
            &[
                "sh",
                "-c",
                "head -c 300000 /dev/zero > big; echo up; exec sleep 60",
            ],
        ));
        for _ in 0..200 {
            if dir
                .path()
                .join("work/live/big")
                .metadata()
                .is_ok_and(|m| m.len() == 300_000)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // Then ten finished ones of 100 KB each, oldest first.
        for i in 0..10 {
            let id = format!("done-{i}");
            rt.start(spec(
                &id,
                &["sh", "-c", "head -c 100000 /dev/zero > data; echo done"],
            ));
            wait_terminal(&rt, &id).await;
            rt.forget(&id);
            // Distinct modification times.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Budget 750 KB: the live 300 KB plus four finished ones fit.
        let cleaned = rt.collect_garbage(750_000);
        let want: Vec<String> = (0..6).map(|i| format!("done-{i}")).collect();
        assert_eq!(cleaned, want);
        for i in 0..10 {
            let gone = i < 6;
            assert_eq!(
                !dir.path().join(format!("work/done-{i}")).exists(),
                gone,
                "work of {i}"
            );
            assert_eq!(
                !dir.path().join(format!("logs/done-{i}.log")).exists(),
                gone,
                "log of {i}"
            );
        }
        assert!(dir.path().join("work/live/big").exists());
        assert!(dir.path().join("logs/live.log").exists());
        // Within budget now: nothing more goes. Even a budget of nothing
        // leaves the running instance alone.
        assert!(rt.collect_garbage(750_000).is_empty());
        assert_eq!(rt.collect_garbage(0).len(), 4);
        assert!(dir.path().join("work/live/big").exists());
        rt.stop("live", Duration::from_millis(100), "test over");
        wait_terminal(&rt, "live").await;
    }

    #[tokio::test]
    async fn a_working_directory_inside_the_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        let outside = tempfile::tempdir().unwrap();
        for (id, wd, ok) in [
            ("w1", dir.path().join("work/other-instance"), false),
            ("w2", dir.path().join("logs"), false),
            (
                "w3",
                outside
                    .path()
                    .join("a/../../")
                    .join(dir.path().file_name().unwrap())
                    .join("x"),
                false,
            ),
            ("w4", outside.path().join("mine"), true),
        ] {
            let mut s = spec(id, &["true"]);
            s.working_dir = Some(wd.clone());
            rt.start(s);
            let r = wait_terminal(&rt, id).await;
            if ok {
                assert_eq!(r.phase, Phase::Succeeded, "{wd:?}: {}", r.reason);
            } else {
                assert_eq!(r.phase, Phase::Failed, "{wd:?}");
                assert!(
                    r.reason.contains("inside the agent's state dir")
                        || r.reason.contains("must not contain `..`"),
                    "{}",
                    r.reason
                );
            }
        }
        assert!(!dir.path().join("work/other-instance").exists());
    }

    #[tokio::test]
    async fn runs_with_exact_gpu_visibility_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        let mut s = spec(
            "i1",
            &[
                "sh",
                "-c",
                "echo cuda=$CUDA_VISIBLE_DEVICES nv=$NVIDIA_VISIBLE_DEVICES vpc=$GPUPOOL_NETWORK_VPC_ID; echo oops >&2",
            ],
        );
        s.metadata.insert("network.vpc_id".into(), "vpc-7".into());
        rt.start(s);
        let r = wait_terminal(&rt, "i1").await;
        assert_eq!(r.phase, Phase::Succeeded);
        assert_eq!(r.exit_code, Some(0));
        let (log, next) = rt.read_log("i1", 0, 1 << 20).await.unwrap();
        let log = String::from_utf8(log).unwrap();
        assert!(
            log.contains("cuda=GPU-a,GPU-b nv=GPU-a,GPU-b vpc=vpc-7"),
            "{log}"
        );
        assert!(log.contains("oops"), "{log}");
        assert_eq!(next as usize, log.len());
        let (tail, _) = rt.read_log("i1", 5, 3).await.unwrap();
        assert_eq!(tail, log.as_bytes()[5..8]);
    }

    #[tokio::test]
    async fn nonzero_exit_is_failed_with_code() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        rt.start(spec("i2", &["sh", "-c", "exit 3"]));
        let r = wait_terminal(&rt, "i2").await;
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.exit_code, Some(3));
        assert!(r.reason.contains("code 3"));
    }

    #[tokio::test]
    async fn missing_program_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        rt.start(spec("i3", &["/nonexistent/program"]));
        let r = wait_terminal(&rt, "i3").await;
        assert_eq!(r.phase, Phase::Failed);
        assert!(r.reason.contains("failed to start"), "{}", r.reason);
    }

    /// Before the SIGTERM, the reason is in the file `GPUPOOL_STOP_NOTICE`
    /// names (a preempted job can tell it is one and checkpoint); the job
    /// cannot write there; forgetting the instance removes it.
    #[tokio::test]
    async fn a_stopped_instance_reads_why_from_its_notice_file() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        let ready = dir.path().join("ready");
        let script = format!(
            "trap 'echo notice: $(cat \"$GPUPOOL_STOP_NOTICE\"); exit 0' TERM; \
             test -e \"$GPUPOOL_STOP_NOTICE\" && echo early; touch {}; \
             while true; do sleep 0.05; done",
            ready.display()
        );
        rt.start(spec("i9", &["sh", "-c", &script]));
        for _ in 0..200 {
            if ready.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(ready.exists(), "the job started");
        let why = "preempted by j-000007 (class high): queued again once stopped";
        rt.stop("i9", Duration::from_secs(5), why);
        let r = wait_terminal(&rt, "i9").await;
        let (log, _) = rt.read_log("i9", 0, 1 << 16).await.unwrap();
        let log = String::from_utf8_lossy(&log);
        assert!(log.contains(&format!("notice: {why}")), "{log}");
        assert!(!log.contains("early"), "no notice before the stop: {log}");
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        let notice = rt.notice_dir("i9");
        let mode = std::fs::metadata(&notice).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o700, "the agent's own user runs it");
        rt.forget("i9");
        assert!(!notice.exists(), "forgotten with its instance");
    }

    #[tokio::test]
    async fn stop_kills_group_including_sigterm_ignorer() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; while true; do sleep 0.1; done' & wait",
            pidfile.display()
        );
        rt.start(spec("i4", &["sh", "-c", &script]));
        let mut child_pid = None;
        for _ in 0..200 {
            if let Ok(s) = std::fs::read_to_string(&pidfile)
                && let Ok(p) = s.trim().parse::<i32>()
            {
                child_pid = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let child_pid = child_pid.expect("child wrote its pid");
        rt.stop("i4", Duration::from_millis(300), "killed by user");
        let r = wait_terminal(&rt, "i4").await;
        assert_eq!(r.phase, Phase::Stopped);
        let mut dead = false;
        for _ in 0..100 {
            let stat =
                std::fs::read_to_string(format!("/proc/{child_pid}/stat")).unwrap_or_default();
            if stat.is_empty()
                || stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                dead = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(dead, "SIGTERM-ignoring child {child_pid} survived stop");
    }

    /// Tests probe cgroups concurrently: each probe gets its own name.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    /// A runtime confining in the machine's real cgroups, or None (the
    /// test is skipped, loudly; under CI=true it fails instead).
    fn confined_runtime(dir: &Path) -> Option<Runtime> {
        let manager = crate::cgroup::detect(Path::new("/sys/fs/cgroup"));
        let probe = manager.as_ref().map(|m| {
            m.create(
                &format!(
                    "gpupool-probe-{}-{}",
                    std::process::id(),
                    PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ),
                &Limits::default(),
            )
        });
        let usable = matches!(&probe, Some(Ok(g)) if g.remove().is_ok());
        let probe = probe.map(|r| r.map(|_| ()));
        if !usable {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "cgroups are not writable here ({probe:?}); CI must run these tests as root"
            );
            eprintln!("SKIPPED: no writable cgroup hierarchy (run as root to test confinement)");
            return None;
        }
        let rt = Runtime::new(dir)
            .unwrap()
            .with_cgroups(manager.map(Arc::from), Confinement::Required);
        // As root (CI), the confined instances run as `nobody`: the limits
        // must hold for an unprivileged instance, which joins its cgroup
        // before it drops root.
        // SAFETY: geteuid has no preconditions.
        Some(if unsafe { libc::geteuid() } == 0 {
            rt.with_user("nobody").unwrap()
        } else {
            rt
        })
    }

    #[tokio::test]
    async fn memory_limit_oom_kills_and_reports_oom() {
        let dir = tempfile::tempdir().unwrap();
        let Some(rt) = confined_runtime(dir.path()) else {
            return;
        };
        let mut s = spec(
            "oom-1",
            &[
                "sh",
                "-c",
                "grep -E 'memory|0::' /proc/self/cgroup; exec tail /dev/zero",
            ],
        );
        s.limits = Limits {
            memory_bytes: Some(32 << 20),
            cpu_milli: Some(500),
            pids_max: Some(64),
            gpu_minors: Some(vec![]),
            ..Limits::default()
        };
        rt.start(s);
        let r = wait_terminal(&rt, "oom-1").await;
        assert_eq!(r.phase, Phase::Failed);
        assert!(r.reason.starts_with("OOM"), "{r:?}");
        assert!(r.reason.contains("32 MiB"), "{}", r.reason);
        let (log, _) = rt.read_log("oom-1", 0, 1 << 20).await.unwrap();
        assert!(
            String::from_utf8_lossy(&log).contains("gpupool/local_oom-1"),
            "the process ran in its cgroup: {}",
            String::from_utf8_lossy(&log)
        );
    }

    #[tokio::test]
    async fn cpu_quota_caps_a_busy_loop_near_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let Some(rt) = confined_runtime(dir.path()) else {
            return;
        };
        // A busy loop for ~1.5 s of wall time, then its own CPU ticks.
        let script = "sh -c 'while :; do :; done' & p=$!; sleep 1.5; cut -d' ' -f14,15 /proc/$p/stat; kill $p";
        let mut s = spec("cpu-1", &["sh", "-c", script]);
        s.limits = Limits {
            memory_bytes: None,
            cpu_milli: Some(200),
            pids_max: None,
            gpu_minors: None,
            ..Limits::default()
        };
        rt.start(s);
        let r = wait_terminal(&rt, "cpu-1").await;
        assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
        let (log, _) = rt.read_log("cpu-1", 0, 1024).await.unwrap();
        let text = String::from_utf8_lossy(&log);
        let ticks: u64 = text
            .split_whitespace()
            .filter_map(|t| t.parse::<u64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_s = ticks as f64 / hz;
        // 200m of one core over 1.5 s is 0.3 s; an uncapped loop burns ~1.5 s.
        assert!(
            cpu_s <= 0.45,
            "busy loop used {cpu_s:.2} s of CPU in 1.5 s with a 200m quota ({text})"
        );
        assert!(cpu_s >= 0.1, "the loop barely ran ({cpu_s:.2} s): {text}");
    }

    #[tokio::test]
    async fn confined_instance_within_limits_succeeds_and_its_cgroup_goes() {
        let dir = tempfile::tempdir().unwrap();
        let Some(rt) = confined_runtime(dir.path()) else {
            return;
        };
        let mut s = spec(
            "fits-1",
            &[
                "sh",
                "-c",
                "echo fine > /dev/null && id -u && cat /proc/self/cgroup",
            ],
        );
        s.limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_milli: Some(1000),
            pids_max: Some(32),
            gpu_minors: Some(vec![0]),
            ..Limits::default()
        };
        rt.start(s);
        let r = wait_terminal(&rt, "fits-1").await;
        assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
        let (log, _) = rt.read_log("fits-1", 0, 4096).await.unwrap();
        let log = String::from_utf8_lossy(&log);
        // In its own cgroup, and (as root) as nobody.
        assert!(log.contains("local_fits-1"), "{log}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let (uid, _) = lookup_user("nobody").unwrap();
            assert!(log.starts_with(&format!("{uid}\n")), "{log}");
        }
        // The cgroup is removed once empty.
        let mut gone = false;
        for _ in 0..50 {
            let left = walk_find(Path::new("/sys/fs/cgroup"), "local_fits-1", 6);
            if !left {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "the instance's cgroup was not removed");
    }

    /// True if a directory named `name` exists within `depth` levels.
    fn walk_find(dir: &Path, name: &str, depth: u32) -> bool {
        if depth == 0 {
            return false;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .any(|e| e.file_name() == name || walk_find(&e.path(), name, depth - 1))
    }

    #[tokio::test]
    async fn runs_as_the_configured_user_with_mps_limits() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "CI runs as root");
            eprintln!("SKIPPED: not root, cannot switch users");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path())
            .unwrap()
            .with_user("nobody")
            .unwrap();
        let mut s = spec(
            "user-1",
            &[
                "sh",
                "-c",
                "id -u; touch here && echo wrote; echo $CUDA_MPS_ACTIVE_THREAD_PERCENTAGE $CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
            ],
        );
        s.mps = Some(Mps {
            pipe_dir: "/tmp/mps".into(),
            active_thread_pct: 25,
            pinned_mem_mib: vec![("GPU-a".into(), 20480)],
        });
        rt.start(s);
        let r = wait_terminal(&rt, "user-1").await;
        assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
        let (log, _) = rt.read_log("user-1", 0, 1024).await.unwrap();
        let log = String::from_utf8_lossy(&log);
        let (uid, _) = lookup_user("nobody").unwrap();
        assert!(log.starts_with(&format!("{uid}\n")), "{log}");
        assert!(
            log.contains("wrote"),
            "its working directory is writable: {log}"
        );
        assert!(log.contains("25 GPU-a=20480M"), "{log}");
        assert!(
            Runtime::new(dir.path())
                .unwrap()
                .with_user("no-such-user-x")
                .is_err()
        );
    }

    #[tokio::test]
    async fn logs_rotate_by_size_and_readers_restart_at_the_top() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        rt.start(spec(
            "rot-1",
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 200 ]; do echo line-$i; i=$((i+1)); done; sleep 2; echo after",
            ],
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (before, offset) = rt.read_log("rot-1", 0, 1 << 20).await.unwrap();
        assert!(before.len() > 1000);
        rt.rotate_logs(1000, 2);
        let old = std::fs::read_to_string(dir.path().join("logs/rot-1.log.1")).unwrap();
        assert!(old.contains("line-199"));
        let r = wait_terminal(&rt, "rot-1").await;
        assert_eq!(r.phase, Phase::Succeeded);
        // The reader's old offset is past the new end: it gets the new file.
        let (after, _) = rt.read_log("rot-1", offset, 1 << 20).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&after).trim(), "after");
    }

    #[tokio::test]
    async fn log_ids_cannot_escape_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(dir.path()).unwrap();
        assert!(matches!(
            rt.read_log("../etc/passwd", 0, 10).await,
            Err(LogError::BadId(_))
        ));
        assert!(matches!(
            rt.read_log("nope", 0, 10).await,
            Err(LogError::NotFound(_))
        ));
    }
}
