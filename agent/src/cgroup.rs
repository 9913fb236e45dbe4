//! Confinement of job instances in cgroups: a memory limit, a CPU quota from
//! millicores, a pids limit, and (v1) device access limited to the
//! instance's own GPUs. One cgroup per instance, created under the agent's
//! own cgroup (so a systemd unit with `Delegate=yes`, or a container, keeps
//! the whole tree), in `gpupool/<instance>`.
//!
//! Two managers behind [`CgroupManager`]: [`V1`] (one hierarchy per
//! controller under `/sys/fs/cgroup/<controller>`) and [`V2`] (the unified
//! hierarchy). Both take their root directory as a parameter, so the file
//! layout is tested against a temp dir; the real kernel behaviour (OOM kill,
//! quota) is tested end to end where cgroups are writable.

use std::path::{Path, PathBuf};

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
}

/// One instance's cgroup (in every hierarchy it spans).
pub trait Cgroup: Send + Sync {
    /// The `cgroup.procs` files a new process writes `0` to, to join.
    fn procs_files(&self) -> Vec<PathBuf>;
    /// OOM kills in this cgroup so far.
    fn oom_kills(&self) -> u64;
    /// Processes still in the cgroup.
    fn pids(&self) -> Vec<i32>;
    /// Removes the (empty) cgroup.
    fn remove(&self) -> std::io::Result<()>;
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
            parent: join(&path, "gpupool"),
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

/// cgroup v1: one directory per controller.
pub struct V1 {
    root: PathBuf,
    /// controller -> parent path inside its hierarchy
    parents: Vec<(String, String)>,
}

impl V1 {
    const CONTROLLERS: [&'static str; 4] = ["memory", "cpu", "pids", "devices"];

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
                            write(&dir.join("devices.allow"), &rule)?;
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
fn device_rules(minors: &[u32]) -> Vec<String> {
    let mut rules: Vec<String> = [
        "c 1:3 rwm",   // null
        "c 1:5 rwm",   // zero
        "c 1:7 rwm",   // full
        "c 1:8 rwm",   // random
        "c 1:9 rwm",   // urandom
        "c 5:0 rwm",   // tty
        "c 5:2 rwm",   // ptmx
        "c 136:* rwm", // pts
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    rules.push(format!("c {NVIDIA_MAJOR}:{NVIDIACTL_MINOR} rwm"));
    for m in minors {
        rules.push(format!("c {NVIDIA_MAJOR}:{m} rwm"));
    }
    // nvidia-uvm has a dynamic major.
    if let Some(major) = char_major("nvidia-uvm") {
        rules.push(format!("c {major}:* rwm"));
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
            .map_or(0, |(_, d)| {
                keyed(&d.join("memory.oom_control"), "oom_kill ")
            })
    }

    fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .map(|(_, d)| read_pids(&d.join("cgroup.procs")))
            .unwrap_or_default()
    }

    fn remove(&self) -> std::io::Result<()> {
        for (_, dir) in &self.dirs {
            if dir.exists() {
                std::fs::remove_dir(dir)?;
            }
        }
        Ok(())
    }
}

/// cgroup v2: the unified hierarchy. Device filtering there needs eBPF and
/// is not done; GPU visibility relies on CUDA_VISIBLE_DEVICES.
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
        // Delegate the controllers to the instance cgroups.
        let _ = write(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)?;
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
        Ok(Box::new(V2Group { dir }))
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
        read_pids(&self.dir.join("cgroup.procs"))
    }
    fn remove(&self) -> std::io::Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir(&self.dir)?;
        }
        Ok(())
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
        let rules = device_rules(&[0, 3]);
        assert!(
            rules.contains(&"c 195:0 rwm".to_string())
                && rules.contains(&"c 195:3 rwm".to_string())
        );
        assert!(
            rules.contains(&"c 195:255 rwm".to_string())
                && rules.contains(&"c 1:3 rwm".to_string())
        );
        assert!(!rules.contains(&"c 195:1 rwm".to_string()));
        assert_eq!(g.procs_files().len(), 4);
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
}
