//! Confinement of job instances in cgroups: a memory limit, a CPU quota from
//! millicores, a pids limit, and device access limited to the instance's own
//! GPUs (v1 `devices.allow`, v2 an eBPF program). One cgroup per instance, created under the agent's
//! own cgroup (so a systemd unit with `Delegate=yes`, or a container, keeps
//! the whole tree), in `gpupool/<instance>`.
//!
//! Two managers behind [`CgroupManager`]: [`V1`] (one hierarchy per
//! controller under `/sys/fs/cgroup/<controller>`) and [`V2`] (the unified
//! hierarchy). Both take their root directory as a parameter, so the file
//! layout is tested against a temp dir; the real kernel behaviour (OOM kill,
//! quota) is tested end to end where cgroups are writable.

use std::path::{Path, PathBuf};

pub use crate::devfilter::DeviceRule;

/// What an instance may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPU in millicores (1000 = one core), enforced as a CFS quota.
    pub cpu_milli: Option<u64>,
    pub pids_max: Option<u64>,
    /// Minor numbers of the `/dev/nvidiaN` devices the instance may open;
    /// `None` leaves devices unrestricted.
    pub gpu_minors: Option<Vec<u32>>,
    /// An OCI runtime makes the container's cgroup below this one and
    /// writes its default device rules there (mknod of any device, which a
    /// user namespace cannot use, the console and `/dev/net/tun`): a child
    /// may only narrow what its parent allows, so the parent allows them.
    pub runtime_devices: bool,
}

/// v1 device lines an OCI runtime writes besides the defaults.
pub const RUNTIME_DEVICE_LINES: [&str; 4] = ["c *:* m", "b *:* m", "c 5:1 rwm", "c 10:200 rwm"];

/// One instance's cgroup (in every hierarchy it spans).
pub trait Cgroup: Send + Sync {
    /// The `cgroup.procs` files a new process writes `0` to, to join.
    fn procs_files(&self) -> Vec<PathBuf>;
    /// OOM kills in this cgroup so far.
    fn oom_kills(&self) -> u64;
    /// v1: memory use reached the limit at least once (`memory.failcnt`).
    /// A container's OOM kill is counted in the runtime's child cgroup,
    /// which the runtime removes before the agent can read it; a container
    /// SIGKILLed after its cgroup hit the limit was the OOM killer's.
    fn hit_memory_limit(&self) -> bool {
        false
    }
    /// Processes still in the cgroup.
    fn pids(&self) -> Vec<i32>;
    /// Removes the (empty) cgroup, and the (empty) cgroups below it.
    fn remove(&self) -> std::io::Result<()>;
    /// The `cgroupsPath` an OCI runtime started inside this cgroup is
    /// given: v1, a child below the runtime's own cgroup (this one), in
    /// every hierarchy; v2, this cgroup itself (a cgroup holding processes
    /// may have no child with controllers there).
    fn runtime_path(&self, instance_id: &str) -> String;
    /// Sets the CPU quota (millicores) after creation.
    fn set_cpu_quota(&self, milli: u64) -> std::io::Result<()>;
    /// Processes in the runtime's child cgroup (v1), or in this one (v2).
    fn runtime_pids(&self, instance_id: &str) -> Vec<i32>;
    /// CPU time and memory in use, for the metrics.
    fn usage(&self) -> Usage;
}

/// What an instance's cgroup has used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used so far (µs).
    pub cpu_usec: u64,
    /// Memory in use now (bytes).
    pub memory_bytes: u64,
}

/// Creates cgroups; v1 or v2.
pub trait CgroupManager: Send + Sync {
    fn version(&self) -> &'static str;
    fn create(&self, name: &str, limits: &Limits) -> std::io::Result<Box<dyn Cgroup>>;
    /// An existing instance cgroup (after an agent restart).
    fn open(&self, name: &str) -> Box<dyn Cgroup>;
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const NVIDIA_MAJOR: u32 = 195;
const NVIDIACTL_MINOR: u32 = 255;
const CFS_PERIOD_US: u64 = 100_000;

/// Detects the cgroup layout under `root` (normally `/sys/fs/cgroup`):
/// cgroup2 when `root` is a cgroup2 mount (statfs magic), else v1 when a
/// `memory` hierarchy is mounted there.
pub fn detect(root: &Path) -> Option<Box<dyn CgroupManager>> {
    let self_cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if is_cgroup2(root) {
        let path = self_cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .to_string();
        return Some(Box::new(V2 {
            root: root.to_path_buf(),
            parent: v2_parent(root, &path, std::process::id() as i32),
        }));
    }
    if root.join("memory").is_dir() {
        let own = |controller: &str| {
            self_cgroups
                .lines()
                .filter_map(|l| l.split(':').nth(1).zip(l.splitn(3, ':').nth(2)))
                .find(|(names, _)| names.split(',').any(|n| n == controller))
                .map(|(_, path)| path.to_string())
                .unwrap_or_else(|| "/".into())
        };
        return Some(Box::new(V1 {
            root: root.to_path_buf(),
            parents: V1::CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), join(&own(c), "gpupool")))
                .collect(),
        }));
    }
    None
}

/// Where the instance cgroups go on cgroup v2: `gpupool` below the agent's
/// own cgroup when the agent is alone there (a systemd unit with
/// `Delegate=yes`; the agent then moves itself into the leaf `agent` to
/// delegate), else `/gpupool` at the root — a cgroup shared with other
/// processes (a login shell's scope, a CI job) cannot delegate controllers.
fn v2_parent(root: &Path, own: &str, me: i32) -> String {
    // Our own leaf from an earlier delegation: the unit's cgroup is above.
    let own = own.strip_suffix("/agent").unwrap_or(own);
    if own.trim_matches('/').is_empty() {
        return "/gpupool".into();
    }
    let dir = root.join(own.trim_start_matches('/'));
    let others = read_pids(&dir.join("cgroup.procs"))
        .into_iter()
        .any(|p| p != me);
    if others {
        tracing::warn!(
            cgroup = own,
            "the agent's cgroup holds other processes and cannot delegate controllers; \
             instance cgroups go under /gpupool (run the agent as a unit with Delegate=yes)"
        );
        "/gpupool".into()
    } else {
        join(own, "gpupool")
    }
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

fn join(base: &str, child: &str) -> String {
    format!("{}/{child}", base.trim_end_matches('/'))
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The key's value in a flat keyed file (`oom_kill 3`).
fn keyed(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// The cgroup an OCI runtime makes for a container below its instance's
/// (v1; in the hierarchies the agent does not manage it is below the
/// runtime's own cgroup, so the name is the instance's own).
pub fn runtime_child(instance_id: &str) -> String {
    format!("container-{instance_id}")
}

/// Processes in `dir` and the cgroups below it.
fn tree_pids(dir: &Path) -> Vec<i32> {
    let mut out = read_pids(&dir.join("cgroup.procs"));
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(tree_pids(&child.path()));
            }
        }
    }
    out
}

/// The `key` value of `file` in `dir` and the cgroups below it, summed.
fn tree_sum(dir: &Path, file: &str, key: &str) -> u64 {
    let mut sum = keyed(&dir.join(file), key);
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                sum += tree_sum(&child.path(), file, key);
            }
        }
    }
    sum
}

/// Removes the cgroup `dir` and those below it, deepest first.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&child.path())?;
            }
        }
    }
    std::fs::remove_dir(dir)
}

/// cgroup v1: one directory per controller.
pub struct V1 {
    root: PathBuf,
    /// controller -> parent path inside its hierarchy
    parents: Vec<(String, String)>,
}

impl V1 {
    const CONTROLLERS: [&'static str; 5] = ["memory", "cpu", "cpuacct", "pids", "devices"];

    /// A manager over `root` with parents given explicitly (tests).
    pub fn new(root: &Path, parent: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            parents: Self::CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), parent.to_string()))
                .collect(),
        }
    }

    fn dir(&self, controller: &str, name: &str) -> PathBuf {
        let parent = self
            .parents
            .iter()
            .find(|(c, _)| c == controller)
            .map_or("/gpupool", |(_, p)| p.as_str());
        self.root
            .join(controller)
            .join(parent.trim_start_matches('/'))
            .join(name)
    }
}

struct V1Group {
    dirs: Vec<(String, PathBuf)>,
}

impl CgroupManager for V1 {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, name: &str, limits: &Limits) -> std::io::Result<Box<dyn Cgroup>> {
        let mut dirs = Vec::new();
        for controller in Self::CONTROLLERS {
            if !self.root.join(controller).is_dir() {
                continue;
            }
            let dir = self.dir(controller, name);
            std::fs::create_dir_all(&dir)?;
            dirs.push((controller.to_string(), dir));
        }
        let group = V1Group { dirs };
        for (controller, dir) in &group.dirs {
            match controller.as_str() {
                "memory" => {
                    if let Some(bytes) = limits.memory_bytes {
                        write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    }
                }
                "cpu" => {
                    if let Some(milli) = limits.cpu_milli {
                        write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                        write(
                            &dir.join("cpu.cfs_quota_us"),
                            &(milli * CFS_PERIOD_US / 1000).max(1000).to_string(),
                        )?;
                    }
                }
                "pids" => {
                    if let Some(max) = limits.pids_max {
                        write(&dir.join("pids.max"), &max.to_string())?;
                    }
                }
                "devices" => {
                    if let Some(minors) = &limits.gpu_minors {
                        write(&dir.join("devices.deny"), "a")?;
                        for rule in device_rules(minors) {
                            write(&dir.join("devices.allow"), &rule.v1_line())?;
                        }
                        if limits.runtime_devices {
                            for line in RUNTIME_DEVICE_LINES {
                                write(&dir.join("devices.allow"), line)?;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Box::new(group))
    }

    fn open(&self, name: &str) -> Box<dyn Cgroup> {
        let dirs = Self::CONTROLLERS
            .iter()
            .filter(|c| self.root.join(c).is_dir())
            .map(|c| (c.to_string(), self.dir(c, name)))
            .collect();
        Box::new(V1Group { dirs })
    }
}

/// The devices every process needs, plus the instance's GPUs.
pub fn device_rules(minors: &[u32]) -> Vec<DeviceRule> {
    let rule = |major, minor| DeviceRule { major, minor };
    let mut rules = vec![
        rule(1, Some(3)), // null
        rule(1, Some(5)), // zero
        rule(1, Some(7)), // full
        rule(1, Some(8)), // random
        rule(1, Some(9)), // urandom
        rule(5, Some(0)), // tty
        rule(5, Some(2)), // ptmx
        rule(136, None),  // pts
        rule(NVIDIA_MAJOR, Some(NVIDIACTL_MINOR)),
    ];
    rules.extend(minors.iter().map(|m| rule(NVIDIA_MAJOR, Some(*m))));
    // nvidia-uvm has a dynamic major.
    if let Some(major) = char_major("nvidia-uvm") {
        rules.push(rule(major, None));
    }
    rules
}

fn char_major(name: &str) -> Option<u32> {
    let devices = std::fs::read_to_string("/proc/devices").ok()?;
    let chars = devices.split("Block devices:").next()?;
    chars.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let major = it.next()?.parse().ok()?;
        (it.next()? == name).then_some(major)
    })
}

impl Cgroup for V1Group {
    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .find(|(c, _)| c == "memory")
            // A kill is counted in the victim's cgroup: a container's is
            // below the instance's.
            .map_or(0, |(_, d)| tree_sum(d, "memory.oom_control", "oom_kill "))
    }

    fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .map(|(_, d)| tree_pids(d))
            .unwrap_or_default()
    }

    fn remove(&self) -> std::io::Result<()> {
        for (_, dir) in &self.dirs {
            remove_tree(dir)?;
        }
        Ok(())
    }

    fn runtime_path(&self, instance_id: &str) -> String {
        runtime_child(instance_id)
    }

    fn set_cpu_quota(&self, milli: u64) -> std::io::Result<()> {
        for (controller, dir) in &self.dirs {
            if controller == "cpu" {
                write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                write(
                    &dir.join("cpu.cfs_quota_us"),
                    &(milli * CFS_PERIOD_US / 1000).max(1000).to_string(),
                )?;
            }
        }
        Ok(())
    }

    fn runtime_pids(&self, instance_id: &str) -> Vec<i32> {
        self.dirs
            .first()
            .map(|(_, d)| read_pids(&d.join(runtime_child(instance_id)).join("cgroup.procs")))
            .unwrap_or_default()
    }

    fn hit_memory_limit(&self) -> bool {
        self.dirs
            .iter()
            .find(|(c, _)| c == "memory")
            .and_then(|(_, d)| std::fs::read_to_string(d.join("memory.failcnt")).ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    }

    fn usage(&self) -> Usage {
        let file = |controller: &str, name: &str| {
            self.dirs
                .iter()
                .find(|(c, _)| c == controller)
                .and_then(|(_, d)| std::fs::read_to_string(d.join(name)).ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Usage {
            cpu_usec: file("cpuacct", "cpuacct.usage") / 1000,
            memory_bytes: file("memory", "memory.usage_in_bytes"),
        }
    }
}

/// cgroup v2: the unified hierarchy. Device access is an eBPF program
/// attached to each instance cgroup ([`crate::devfilter`]).
pub struct V2 {
    root: PathBuf,
    parent: String,
}

impl V2 {
    pub fn new(root: &Path, parent: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            parent: parent.to_string(),
        }
    }

    /// Enables the controllers the limits need on every level from the root
    /// down to the instances' parent (`cgroup.subtree_control`). The
    /// agent's own cgroup holds the agent, and a non-root cgroup with
    /// processes cannot delegate (the "no internal processes" rule), so the
    /// agent first moves itself into a leaf `agent` beside `gpupool` — what
    /// systemd documents for units with `Delegate=yes`.
    fn delegate(&self, limits: &Limits) -> std::io::Result<()> {
        let wanted: Vec<&str> = [
            ("memory", limits.memory_bytes.is_some()),
            ("cpu", limits.cpu_milli.is_some()),
            ("pids", limits.pids_max.is_some()),
        ]
        .into_iter()
        .filter_map(|(c, needed)| needed.then_some(c))
        .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut levels = vec![self.root.clone()];
        for part in self.parent.split('/').filter(|p| !p.is_empty()) {
            let next = levels[levels.len() - 1].join(part);
            levels.push(next);
        }
        let own_level = levels.len().saturating_sub(2);
        for (depth, level) in levels.iter().enumerate() {
            let file = level.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&file).unwrap_or_default();
            for c in &wanted {
                if enabled.split_whitespace().any(|e| e == *c) {
                    continue;
                }
                let mut result = write(&file, &format!("+{c}"));
                if depth == own_level
                    && depth > 0
                    && result
                        .as_ref()
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ResourceBusy)
                {
                    let leaf = level.join("agent");
                    std::fs::create_dir_all(&leaf)?;
                    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
                    tracing::info!(cgroup = %leaf.display(), "agent moved into a leaf cgroup to delegate controllers");
                    result = write(&file, &format!("+{c}"));
                }
                result.map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cgroup v2 controller {c} cannot be delegated below {}: {e}",
                            level.display()
                        ),
                    )
                })?;
            }
        }
        Ok(())
    }
}

struct V2Group {
    dir: PathBuf,
}

impl CgroupManager for V2 {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, name: &str, limits: &Limits) -> std::io::Result<Box<dyn Cgroup>> {
        let parent = self.root.join(self.parent.trim_start_matches('/'));
        std::fs::create_dir_all(&parent)?;
        self.delegate(limits)?;
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)?;
        let group = V2Group { dir: dir.clone() };
        if let Some(minors) = &limits.gpu_minors
            && let Err(err) = crate::devfilter::attach(&dir, &device_rules(minors))
        {
            let _ = group.remove();
            return Err(err);
        }
        if let Some(bytes) = limits.memory_bytes {
            write(&dir.join("memory.max"), &bytes.to_string())?;
        }
        if let Some(milli) = limits.cpu_milli {
            write(
                &dir.join("cpu.max"),
                &format!(
                    "{} {CFS_PERIOD_US}",
                    (milli * CFS_PERIOD_US / 1000).max(1000)
                ),
            )?;
        }
        if let Some(max) = limits.pids_max {
            write(&dir.join("pids.max"), &max.to_string())?;
        }
        Ok(Box::new(group))
    }

    fn open(&self, name: &str) -> Box<dyn Cgroup> {
        Box::new(V2Group {
            dir: self
                .root
                .join(self.parent.trim_start_matches('/'))
                .join(name),
        })
    }
}

impl Cgroup for V2Group {
    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }
    fn oom_kills(&self) -> u64 {
        keyed(&self.dir.join("memory.events"), "oom_kill ")
    }
    fn pids(&self) -> Vec<i32> {
        tree_pids(&self.dir)
    }
    fn remove(&self) -> std::io::Result<()> {
        remove_tree(&self.dir)
    }
    fn set_cpu_quota(&self, milli: u64) -> std::io::Result<()> {
        write(
            &self.dir.join("cpu.max"),
            &format!(
                "{} {CFS_PERIOD_US}",
                (milli * CFS_PERIOD_US / 1000).max(1000)
            ),
        )
    }
    fn runtime_pids(&self, _instance_id: &str) -> Vec<i32> {
        // The runtime joins this cgroup itself: every process but the
        // shim's is the container's.
        read_pids(&self.dir.join("cgroup.procs"))
    }
    fn runtime_path(&self, _instance_id: &str) -> String {
        // Absolute inside the unified hierarchy.
        let text = self.dir.to_string_lossy();
        match text.find("/sys/fs/cgroup") {
            Some(at) => text[at + "/sys/fs/cgroup".len()..].to_string(),
            None => text.into_owned(),
        }
    }
    fn usage(&self) -> Usage {
        Usage {
            cpu_usec: keyed(&self.dir.join("cpu.stat"), "usage_usec "),
            memory_bytes: std::fs::read_to_string(self.dir.join("memory.current"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_v1_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for c in V1::CONTROLLERS {
            std::fs::create_dir_all(dir.path().join(c)).unwrap();
        }
        dir
    }

    #[test]
    fn v1_writes_every_limit_in_its_hierarchy() {
        let root = fake_v1_root();
        let m = V1::new(root.path(), "/agent/gpupool");
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_milli: Some(1500),
            pids_max: Some(128),
            gpu_minors: Some(vec![0, 3]),
            runtime_devices: false,
        };
        let g = m.create("job-1-0", &limits).unwrap();
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join(c).join("agent/gpupool/job-1-0").join(f))
                .unwrap()
        };
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "150000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids", "pids.max"), "128");
        assert_eq!(read("devices", "devices.deny"), "a");
        // The last allow written on a plain file; the rule list itself:
        let rules: Vec<String> = device_rules(&[0, 3])
            .iter()
            .map(DeviceRule::v1_line)
            .collect();
        assert!(
            rules.contains(&"c 195:0 rwm".to_string())
                && rules.contains(&"c 195:3 rwm".to_string())
        );
        assert!(
            rules.contains(&"c 195:255 rwm".to_string())
                && rules.contains(&"c 1:3 rwm".to_string())
        );
        assert!(!rules.contains(&"c 195:1 rwm".to_string()));
        assert_eq!(g.procs_files().len(), 5);
    }

    #[test]
    fn v1_reads_oom_kills() {
        let root = fake_v1_root();
        let m = V1::new(root.path(), "/gpupool");
        let g = m.create("i", &Limits::default()).unwrap();
        std::fs::write(
            root.path().join("memory/gpupool/i/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(g.oom_kills(), 2);
    }

    #[test]
    fn v2_writes_limits_in_one_directory() {
        let root = tempfile::tempdir().unwrap();
        let m = V2::new(root.path(), "/system.slice/agent.service/gpupool");
        let g = m
            .create(
                "i",
                &Limits {
                    memory_bytes: Some(1 << 30),
                    cpu_milli: Some(250),
                    pids_max: Some(64),
                    gpu_minors: None,
                    runtime_devices: false,
                },
            )
            .unwrap();
        let dir = root.path().join("system.slice/agent.service/gpupool/i");
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            (1u64 << 30).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "64");
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(g.oom_kills(), 1);
        assert_eq!(g.procs_files(), vec![dir.join("cgroup.procs")]);
    }

    /// A cgroup2 mount: `/sys/fs/cgroup` itself, the hybrid layout's
    /// `unified`, or one this test mounts.
    fn cgroup2_mount() -> Option<PathBuf> {
        for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            if is_cgroup2(Path::new(p)) {
                return Some(p.into());
            }
        }
        let dir = std::env::temp_dir().join(format!("gpupool-cg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(dir)
    }

    /// The eBPF device program on a real cgroup2 hierarchy: a process in
    /// the cgroup opens /dev/null (allowed) but not /dev/kmsg (not on the
    /// list), while the test process itself still can.
    #[test]
    fn v2_device_program_enforces_the_allowlist_in_the_kernel() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        let Some(root) = cgroup2_mount() else {
            assert!(
                !ci,
                "no cgroup2 mount and none can be mounted; CI runs as root"
            );
            eprintln!("SKIPPED: no cgroup2 mount (run as root)");
            return;
        };
        let parent = format!("/gpupool-devtest-{}", std::process::id());
        let m = V2::new(&root, &parent);
        let limits = Limits {
            gpu_minors: Some(vec![]),
            ..Limits::default()
        };
        let g = match m.create("dev", &limits) {
            Ok(g) => g,
            Err(err) => {
                assert!(
                    !ci,
                    "cannot attach a device program under {}: {err}",
                    root.display()
                );
                eprintln!("SKIPPED: {err}");
                return;
            }
        };
        let procs = g.procs_files()[0].clone();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}; : < /dev/null && echo null-ok; : < /dev/kmsg && echo kmsg-ok; true",
                procs.display()
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            std::fs::File::open("/dev/kmsg").is_ok(),
            "outside the cgroup kmsg opens"
        );
        g.remove().unwrap();
        let _ = std::fs::remove_dir(root.join(parent.trim_start_matches('/')));
        assert!(text.contains("null-ok"), "{text}");
        assert!(
            !text.contains("kmsg-ok"),
            "kmsg opened inside the cgroup: {text}"
        );
        assert!(text.contains("Operation not permitted"), "{text}");
    }

    #[test]
    fn v2_parent_is_below_the_agent_only_when_it_is_alone_there() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/gpupool-agent.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(unit.join("cgroup.procs"), "42\n").unwrap();
        let own = "/system.slice/gpupool-agent.service";
        assert_eq!(v2_parent(root.path(), own, 42), format!("{own}/gpupool"));
        // After the agent moved itself into its leaf.
        std::fs::write(unit.join("cgroup.procs"), "").unwrap();
        assert_eq!(
            v2_parent(root.path(), &format!("{own}/agent"), 42),
            format!("{own}/gpupool")
        );
        // A shell's scope: shared, so the root.
        std::fs::write(unit.join("cgroup.procs"), "42\n7\n").unwrap();
        assert_eq!(v2_parent(root.path(), own, 42), "/gpupool");
        assert_eq!(v2_parent(root.path(), "/", 42), "/gpupool");
    }
}
