//! OCI bundles for image instances: the `config.json` a runtime (`runc`,
//! `crun`) runs, typed by `oci-spec`.
//!
//! What a container gets: its own PID, mount, IPC, UTS and user namespaces
//! (container ids `0..65536` are the tenant's host block, see
//! [`crate::identity`]), its own network namespace with loopback only unless
//! the instance uses the host's network; the image's root file system as an
//! overlay (read-only image layers, a writable layer of its own that goes
//! with the instance); a private `/tmp`; the instance's working directory at
//! `/work`; no new privileges; Docker's default capabilities less `NET_RAW`
//! and `MKNOD`; a seccomp filter refusing the syscalls that reach past a
//! container (module loading, mounts, namespaces, keyrings, BPF, kexec...);
//! `/proc` and `/sys` paths masked as Docker masks them; a cgroup under the
//! instance's (whose limits the agent set), with device access only to the
//! default devices and the instance's GPUs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::identity::Identity;
use crate::image::ImageConfig;

/// Where the instance's working directory appears in the container.
pub const WORKDIR: &str = "/work";

/// Where a TensorBoard's (or training job's) log directory appears.
pub const LOGDIR: &str = "/logs";
/// Where the instance's notice directory is mounted, read-only.
pub const NOTICE_DIR: &str = "/run/gpupool";

/// Everything the bundle is made from.
#[derive(Debug)]
pub struct BundleSpec<'a> {
    pub instance_id: &'a str,
    /// Job command; empty = the image's entrypoint and cmd.
    pub command: &'a [String],
    /// The instance's variables (gpupool's and the job's).
    pub env: &'a BTreeMap<String, String>,
    pub image: &'a ImageConfig,
    pub identity: Identity,
    /// Host directory mounted at [`WORKDIR`].
    pub workdir: &'a Path,
    /// Host directory mounted at [`LOGDIR`] (read-write), if any.
    pub logdir: Option<&'a Path>,
    /// The agent's notice directory for the instance, mounted read-only
    /// at [`NOTICE_DIR`].
    pub notice_dir: Option<&'a Path>,
    pub host_network: bool,
    /// In an instance network: its names, mounted at /etc/hosts.
    pub hosts_file: Option<&'a Path>,
    /// The CUDA MPS daemon's pipe directory, mounted at the same path.
    pub mps_pipe_dir: Option<&'a Path>,
    /// `cgroupsPath`: relative (v1: below the runtime's own cgroup, the
    /// instance's) or absolute (v2).
    pub cgroups_path: &'a str,
}

/// Errors writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("image user {0:?} is not a number or a user of the image's /etc/passwd")]
    User(String),
    #[error("the image has no entrypoint or cmd, and the job gave no command")]
    NoCommand,
    #[error("invalid runtime spec: {0}")]
    Spec(String),
}

/// Docker's default capabilities, less NET_RAW (spoofed packets) and MKNOD.
const CAPABILITIES: [&str; 12] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Syscalls a container is refused (EPERM): those that reach the kernel or
/// the host past namespaces, as Docker's default profile refuses them.
pub const REFUSED_SYSCALLS: [&str; 44] = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
    "_sysctl",
];

/// `clone` flags that make namespaces: refused like `unshare` (a nested
/// user namespace would give the container `CAP_NET_ADMIN` and the like
/// over fresh namespaces, and the kernel surface behind them).
const CLONE_NAMESPACE_FLAGS: [u64; 8] = [
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
    0x0000_0080, // CLONE_NEWTIME
];

/// The seccomp rules (the default action allows): the refused syscalls,
/// `clone` with any namespace flag, `clone3` as missing (ENOSYS, so libc
/// falls back to `clone`, whose flags can be checked; Docker does the
/// same), and io_uring (its own path past seccomp).
fn seccomp_rules() -> serde_json::Value {
    let mut rules = vec![
        json!({"names": REFUSED_SYSCALLS.to_vec(), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}),
        json!({"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
               "action": "SCMP_ACT_ERRNO", "errnoRet": 1}),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        rules.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    serde_json::Value::Array(rules)
}

const MASKED: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY: [&str; 6] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/sys/fs/cgroup",
];

/// A small text file of an unpacked image, read by the root agent: only a
/// regular file reached without symlinks (an image's `etc/passwd ->
/// /etc/shadow` or `-> /dev/zero` gets nothing), at most 1 MiB; else empty.
fn read_image_file(rootfs: &Path, rel: &str) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut at = rootfs.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            return String::new();
        };
        let last = i + 1 == parts.len();
        if meta.file_type().is_symlink() || (last && !meta.is_file()) || (!last && !meta.is_dir()) {
            return String::new();
        }
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&at)
    else {
        return String::new();
    };
    let mut text = String::new();
    let _ = file.take(1 << 20).read_to_string(&mut text);
    text
}

/// The container process's uid and gid, from the image's `User`
/// (`uid[:gid]` or a name in the image's `/etc/passwd`; empty = root).
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), BundleError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (name, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_image_file(rootfs, "etc/passwd");
    // (uid, gid) of the passwd entry whose name (field 0) or uid (field 2)
    // is `n`.
    let from_passwd = |field: usize, n: &str| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[field] == n).then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
    };
    let (uid, primary) = match name.parse::<u32>() {
        Ok(uid) => (
            uid,
            from_passwd(2, name).and_then(|(_, g)| g).unwrap_or(uid),
        ),
        Err(_) => match from_passwd(0, name) {
            Some((Some(uid), Some(gid))) => (uid, gid),
            _ => return Err(BundleError::User(user.to_string())),
        },
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(g) => g,
            Err(_) => {
                let groups = read_image_file(rootfs, "etc/group");
                groups
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 3 && f[0] == g)
                            .then(|| f[2].parse().ok())
                            .flatten()
                    })
                    .ok_or_else(|| BundleError::User(user.to_string()))?
            }
        },
    };
    if uid >= crate::identity::BLOCK || gid >= crate::identity::BLOCK {
        return Err(BundleError::User(user.to_string()));
    }
    Ok((uid, gid))
}

/// The environment inside the container: the image's, then the instance's
/// (which wins), with PATH from the image unless the job set one.
fn container_env(image: &ImageConfig, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: BTreeMap<String, String> = image
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    out.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for (k, v) in env {
        // The host's PATH and HOME mean nothing in the image.
        if k == "PATH" || k == "HOME" {
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    out.entry("HOME".into()).or_insert_with(|| WORKDIR.into());
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The process arguments: Docker's rule (the job's command replaces the
/// image's cmd, after the image's entrypoint).
fn container_args(command: &[String], image: &ImageConfig) -> Result<Vec<String>, BundleError> {
    let mut args = image.entrypoint.clone();
    if command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    } else {
        args.extend(command.iter().cloned());
    }
    if args.is_empty() {
        return Err(BundleError::NoCommand);
    }
    Ok(args)
}

/// The runtime spec of an image instance (`rootfs` is the bundle's `rootfs`
/// directory, where the overlay is mounted).
pub fn runtime_spec(
    b: &BundleSpec,
    image_rootfs: &Path,
) -> Result<oci_spec::runtime::Spec, BundleError> {
    let (uid, gid) = resolve_user(&b.image.user, image_rootfs)?;
    let args = container_args(b.command, b.image)?;
    let cwd = if b.image.working_dir.is_empty() || !b.command.is_empty() && b.workdir.is_absolute()
    {
        WORKDIR.to_string()
    } else {
        b.image.working_dir.clone()
    };
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777"]}),
        json!({"destination": WORKDIR, "type": "bind", "source": b.workdir,
               "options": ["rbind", "rw", "nosuid", "nodev"]}),
    ];
    if b.host_network {
        // sysfs can only be mounted by the owner of the network namespace.
        mounts.push(
            json!({"destination": "/sys", "type": "none", "source": "/sys",
               "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
        );
        for f in ["/etc/resolv.conf", "/etc/hosts"] {
            let source = match b.hosts_file {
                Some(h) if f == "/etc/hosts" => h,
                _ => Path::new(f),
            };
            if source.exists() {
                mounts.push(json!({"destination": f, "type": "bind", "source": source,
                       "options": ["bind", "ro", "nosuid", "nodev"]}));
            }
        }
    } else {
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        );
    }
    // In an instance network the node's sysfs is bound in (above): its
    // network devices (every instance's veth and counters) are hidden.
    let mut masked: Vec<&str> = MASKED.to_vec();
    if b.host_network && b.hosts_file.is_some() {
        masked.extend(["/sys/class/net", "/sys/devices/virtual/net"]);
    }
    if let Some(dir) = b.mps_pipe_dir {
        mounts.push(json!({"destination": dir, "type": "bind", "source": dir,
               "options": ["rbind", "rw", "nosuid", "nodev"]}));
    }
    if let Some(dir) = b.logdir {
        mounts.push(json!({"destination": LOGDIR, "type": "bind", "source": dir,
               "options": ["rbind", "rw", "nosuid", "nodev"]}));
    }
    if let Some(dir) = b.notice_dir {
        mounts.push(
            json!({"destination": NOTICE_DIR, "type": "bind", "source": dir,
               "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
        );
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "user"}),
    ];
    if !b.host_network {
        namespaces.push(json!({"type": "network"}));
    }
    let mut devices = vec![json!({"allow": false, "access": "rwm"})];
    // The defaults; GPUs come with their device nodes (crate::cdi).
    for rule in crate::cgroup::device_rules(&[]) {
        devices.push(match rule.minor {
            Some(m) => json!({"allow": true, "type": "c", "major": rule.major, "minor": m, "access": "rwm"}),
            None => json!({"allow": true, "type": "c", "major": rule.major, "access": "rwm"}),
        });
    }
    let id = b.identity;
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": container_env(b.image, b.env),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": format!("gpupool-{}", &b.instance_id[..b.instance_id.len().min(40)]),
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": id.range_base, "size": id.range_size}],
            "gidMappings": [{"containerID": 0, "hostID": id.range_base, "size": id.range_size}],
            "namespaces": namespaces,
            "cgroupsPath": b.cgroups_path,
            "resources": {"devices": devices},
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
                "syscalls": seccomp_rules(),
            },
            "maskedPaths": masked,
            "readonlyPaths": READONLY,
        },
    });
    serde_json::from_value(spec).map_err(|e| BundleError::Spec(e.to_string()))
}

/// The directories of one instance's bundle.
#[derive(Debug, Clone)]
pub struct BundleDirs {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Where the shim binds the instance's working and log directories
    /// (resolved inside the tenant's directory without following links),
    /// so the runtime mounts these root-owned paths, never one a tenant
    /// could have pointed elsewhere.
    pub mnt_work: PathBuf,
    pub mnt_logs: PathBuf,
}

impl BundleDirs {
    pub fn new(bundles: &Path, instance_id: &str) -> Self {
        let dir = bundles.join(instance_id);
        Self {
            rootfs: dir.join("rootfs"),
            upper: dir.join("layer/upper"),
            work: dir.join("layer/work"),
            mnt_work: dir.join("mnt/work"),
            mnt_logs: dir.join("mnt/logs"),
            dir,
        }
    }

    /// Creates the directories (the writable layer owned by the
    /// container's root, below a directory only root may enter) and writes
    /// `config.json` (0600).
    pub fn write(&self, spec: &oci_spec::runtime::Spec, root: (u32, u32)) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_dir_all(&self.dir);
        for d in [
            &self.dir,
            &self.rootfs,
            &self.upper,
            &self.work,
            &self.mnt_work,
            &self.mnt_logs,
        ] {
            std::fs::create_dir_all(d)?;
        }
        // Traversable (the runtime resolves the root and the mount points
        // inside the user namespace), not listable.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o711))?;
        std::fs::set_permissions(self.dir.join("mnt"), std::fs::Permissions::from_mode(0o711))?;
        std::fs::set_permissions(
            self.dir.join("layer"),
            std::fs::Permissions::from_mode(0o700),
        )?;
        std::fs::set_permissions(&self.work, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::chown(&self.upper, Some(root.0), Some(root.1))?;
        std::fs::set_permissions(&self.upper, std::fs::Permissions::from_mode(0o755))?;
        let config = self.dir.join("config.json");
        let text = serde_json::to_vec_pretty(spec)?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&config)?;
            f.write_all(&text)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            uid: 2_000_000,
            gid: 2_000_000,
            range_base: 2_000_000,
            range_size: 65_536,
        }
    }

    #[test]
    fn spec_has_the_sandbox() {
        let env = BTreeMap::from([
            ("PATH".to_string(), "/host/bin".to_string()),
            ("SECRET".to_string(), "s".to_string()),
        ]);
        let image = ImageConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            env: vec!["PATH=/img/bin".into(), "A=1".into()],
            ..ImageConfig::default()
        };
        let b = BundleSpec {
            instance_id: "i-1",
            command: &[],
            env: &env,
            image: &image,
            identity: identity(),
            workdir: Path::new("/w"),
            logdir: None,
            notice_dir: Some(Path::new("/state/notices/i-1")),
            host_network: false,
            hosts_file: None,
            mps_pipe_dir: None,
            cgroups_path: "gpupool",
        };
        let spec = runtime_spec(&b, Path::new("/nonexistent")).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        // The stop notice: the agent's directory, read-only.
        let notice = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == NOTICE_DIR)
            .expect("the notice directory is mounted");
        assert_eq!(notice["source"], "/state/notices/i-1");
        assert!(notice["options"].as_array().unwrap().contains(&json!("ro")));
        assert_eq!(v["process"]["args"], json!(["/bin/sh", "-c", "echo hi"]));
        let envs: Vec<String> = serde_json::from_value(v["process"]["env"].clone()).unwrap();
        assert!(envs.contains(&"PATH=/img/bin".into()), "{envs:?}");
        assert!(envs.contains(&"SECRET=s".into()));
        assert_eq!(v["process"]["noNewPrivileges"], json!(true));
        let caps = v["process"]["capabilities"]["bounding"].to_string();
        assert!(
            !caps.contains("NET_RAW") && !caps.contains("SYS_ADMIN"),
            "{caps}"
        );
        let ns = v["linux"]["namespaces"].to_string();
        for n in ["pid", "ipc", "uts", "mount", "user", "network"] {
            assert!(ns.contains(n), "{n} in {ns}");
        }
        assert_eq!(v["linux"]["uidMappings"][0]["hostID"], json!(2_000_000));
        assert!(v["linux"]["seccomp"].to_string().contains("\"mount\""));
        // The job's command replaces cmd, after the entrypoint.
        let cmd = ["ls".to_string()];
        let b = BundleSpec {
            command: &cmd,
            host_network: true,
            hosts_file: None,
            ..b
        };
        let v = serde_json::to_value(runtime_spec(&b, Path::new("/x")).unwrap()).unwrap();
        assert_eq!(v["process"]["args"], json!(["/bin/sh", "-c", "ls"]));
        assert!(!v["linux"]["namespaces"].to_string().contains("network"));
        let masked = |v: &serde_json::Value| v["linux"]["maskedPaths"].to_string();
        assert!(!masked(&v).contains("/sys/class/net"));
        // In an instance network (its hosts file): the node's network
        // devices are hidden.
        let b = BundleSpec {
            hosts_file: Some(Path::new("/state/networks/i-1.hosts")),
            ..b
        };
        let v = serde_json::to_value(runtime_spec(&b, Path::new("/x")).unwrap()).unwrap();
        assert!(masked(&v).contains("\"/sys/class/net\""), "{}", masked(&v));
        assert!(masked(&v).contains("/sys/devices/virtual/net"));
    }

    #[test]
    fn users_resolve_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "staff:x:50:\n").unwrap();
        assert_eq!(resolve_user("", dir.path()).unwrap(), (0, 0));
        assert_eq!(resolve_user("app", dir.path()).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("1000", dir.path()).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("7:staff", dir.path()).unwrap(), (7, 50));
        assert!(resolve_user("nobody-here", dir.path()).is_err());
        assert!(
            resolve_user("70000", dir.path()).is_err(),
            "outside the block"
        );
    }
}
