//! GPUs for containers: CDI specs, or the device nodes and driver files.
//!
//! [`inject`] edits the OCI runtime spec of a container (the bundle the
//! agent hands to runc) so that it sees exactly the instance's GPUs:
//!
//! * **CDI**, when a spec of kind `nvidia.com/gpu` lies in the CDI
//!   directories (as `nvidia-ctk cdi generate` writes it): the
//!   `container-device-interface` crate loads the specs and applies the
//!   spec-level edits plus the edits of each instance GPU's own device,
//!   named by UUID (or by index when the spec names none by UUID), never
//!   `all`.
//! * **Direct**, without such a spec: the `/dev/nvidia*` nodes, stat'ed on
//!   the host, and read-only bind mounts of the driver's user-space
//!   libraries and tools, the way `nvidia-container-cli` does it.
//!
//! Either way every device node added gets an allow rule in
//! `linux.resources.devices`, since runc rewrites the devices cgroup from
//! the spec. Not here: `CUDA_VISIBLE_DEVICES` (the caller sets it; this
//! module never sets `NVIDIA_VISIBLE_DEVICES` either), the deny-all rule
//! that must precede the allow rules, and NVML.
//!
//! Everything here is blocking file-system work (and, on the direct path
//! with `host_root` = `/`, one run of `ldconfig -p`).

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use container_device_interface::container_edits::ContainerEdits;
use container_device_interface::device::Device as CdiDevice;
use container_device_interface::spec::{Spec as CdiSpec, read_spec};
use container_device_interface::utils::is_cdi_spec;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, Mount, Spec};

/// The CDI kind whose specs describe NVIDIA GPUs.
pub const CDI_KIND: &str = "nvidia.com/gpu";
const CDI_VENDOR: &str = "nvidia.com";
const CDI_CLASS: &str = "gpu";

/// Where CDI specs are looked for when the configuration names no
/// directories; a later directory overrides an earlier one.
pub const DEFAULT_CDI_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// [`DEFAULT_CDI_DIRS`] as paths.
pub fn default_cdi_dirs() -> Vec<PathBuf> {
    DEFAULT_CDI_DIRS.iter().map(PathBuf::from).collect()
}

/// One GPU given to the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// The GPU's NVML index: the name of its CDI device when the spec names
    /// no device by UUID, and the minor of `/dev/nvidia<index>` when
    /// `/proc/driver/nvidia/gpus` does not list its UUID. For a MIG device
    /// pass the parent GPU's minor number: a MIG device is found in a CDI
    /// spec by UUID only, and on the direct path it is reached through its
    /// parent's node plus the `/dev/nvidia-caps` nodes.
    pub index: u32,
    /// `GPU-...`, or `MIG-...` for a MIG device.
    pub uuid: String,
}

/// How the GPUs were added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// From a CDI spec: the file that defined the (first) GPU's device.
    Cdi { spec_file: PathBuf },
    /// Device nodes and driver files found on the host; also what an
    /// instance without GPUs reports, for which nothing was read or added.
    Direct,
}

/// What [`inject`] did, for the instance's report and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub method: Method,
    /// Container paths of the device nodes added, in the order added.
    pub devices: Vec<PathBuf>,
}

/// Why the GPUs could not be added; the container must not start.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("cannot read CDI spec directory {dir}")]
    SpecDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid CDI spec {path} of kind nvidia.com/gpu")]
    SpecInvalid {
        path: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("CDI device {name:?} of kind nvidia.com/gpu is defined in both {first} and {second}")]
    ConflictingDevice {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no CDI device of kind nvidia.com/gpu for GPU {index} ({uuid}); looked for {tried:?}")]
    GpuNotInSpec {
        index: u32,
        uuid: String,
        tried: Vec<String>,
    },
    #[error("cannot apply the CDI edits of {spec_file}")]
    ApplyEdits {
        spec_file: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("GPU {index} ({uuid}) is not among the GPUs listed in {proc_dir}")]
    GpuNotOnHost {
        index: u32,
        uuid: String,
        proc_dir: PathBuf,
    },
    #[error("device node {path} of GPU {index} is missing")]
    GpuNodeMissing {
        index: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, the node of GPU {index}, is not a device node")]
    NotADeviceNode { index: u32, path: PathBuf },
}

/// Adds exactly `gpus` to `spec`: through the CDI spec of kind
/// `nvidia.com/gpu` in `cdi_dirs` when there is one (a later directory
/// overrides an earlier one, as in CDI), else directly from the host.
/// `host_root` is `/` in production; the direct path looks up `/dev`,
/// `/proc/driver/nvidia` and the driver files under it (tests pass a temp
/// dir). `mig_caps` adds the `/dev/nvidia-caps` nodes on the direct path
/// (a CDI spec carries its own). Without GPUs nothing is read or added.
///
/// Allow rules are appended to `linux.resources.devices`: a deny-all rule
/// the caller wants must come before them.
pub fn inject(
    spec: &mut Spec,
    gpus: &[Gpu],
    mig_caps: bool,
    cdi_dirs: &[PathBuf],
    host_root: &Path,
) -> Result<Injected, CdiError> {
    if gpus.is_empty() {
        return Ok(Injected {
            method: Method::Direct,
            devices: Vec::new(),
        });
    }
    let specs = load_gpu_specs(cdi_dirs)?;
    let injected = if specs.is_empty() {
        inject_direct(spec, gpus, mig_caps, host_root)?
    } else {
        inject_cdi(spec, gpus, &specs)?
    };
    tracing::debug!(
        method = ?injected.method,
        devices = ?injected.devices,
        gpus = gpus.len(),
        "GPUs injected into the container spec"
    );
    Ok(injected)
}

// ---------------------------------------------------------------- CDI path

/// Every loadable spec of kind `nvidia.com/gpu` in `dirs` (recursively, in
/// name order), each with its directory's index as priority. A file that
/// fails to load is an error when it mentions the kind, and is skipped with
/// a warning otherwise: another vendor's broken spec must not stop GPU
/// containers.
fn load_gpu_specs(dirs: &[PathBuf]) -> Result<Vec<CdiSpec>, CdiError> {
    let mut specs = Vec::new();
    for (priority, dir) in dirs.iter().enumerate() {
        let mut files = Vec::new();
        spec_files(dir, &mut files)?;
        for path in files {
            match read_spec(&path, priority as i32) {
                Ok(s) if s.get_vendor() == CDI_VENDOR && s.get_class() == CDI_CLASS => {
                    specs.push(s)
                }
                Ok(_) => {}
                Err(err) => {
                    let ours = std::fs::read_to_string(&path)
                        .map(|text| text.contains(CDI_KIND))
                        .unwrap_or(true);
                    if ours {
                        return Err(CdiError::SpecInvalid {
                            path,
                            source: err.into(),
                        });
                    }
                    tracing::warn!(path = %path.display(), error = format!("{err:#}"), "skipping an invalid CDI spec of another kind");
                }
            }
        }
    }
    Ok(specs)
}

/// The `.json` and `.yaml` files under `dir`, sorted; nothing when `dir`
/// does not exist.
fn spec_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CdiError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CdiError::SpecDir {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            spec_files(&path, out)?;
        } else if is_cdi_spec(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// A device of the loaded specs, by unqualified name.
struct Candidate {
    device: CdiDevice,
    priority: i32,
    path: PathBuf,
    /// Another spec of the same priority defines the same name.
    conflict: Option<PathBuf>,
}

/// The devices of `specs` by name; of two with one name, the one from the
/// later directory wins, and two from one directory conflict.
fn index_devices(specs: &[CdiSpec]) -> HashMap<String, Candidate> {
    let mut by_name: HashMap<String, Candidate> = HashMap::new();
    for spec in specs {
        let path = PathBuf::from(spec.get_path());
        for (name, device) in &spec.devices {
            let priority = spec.get_priority();
            match by_name.get_mut(name) {
                Some(old) if old.priority > priority => {}
                Some(old) if old.priority == priority => {
                    old.conflict.get_or_insert_with(|| path.clone());
                }
                _ => {
                    by_name.insert(
                        name.clone(),
                        Candidate {
                            device: device.clone(),
                            priority,
                            path: path.clone(),
                            conflict: None,
                        },
                    );
                }
            }
        }
    }
    by_name
}

fn is_uuid_name(name: &str) -> bool {
    name.starts_with("GPU-") || name.starts_with("MIG-")
}

/// The device of `gpu`: the one named by its UUID; when no device is named
/// by UUID at all (`--device-name-strategy=index` or `type-index`), the one
/// named `<index>` or `gpu<index>`. A spec that names GPUs by UUID but not
/// this one is stale, and an index could then point at another GPU.
fn pick_device<'a>(
    gpu: &Gpu,
    devices: &'a HashMap<String, Candidate>,
) -> Result<(&'a str, &'a Candidate), CdiError> {
    let mut tried = Vec::new();
    if !gpu.uuid.is_empty() {
        tried.push(gpu.uuid.clone());
    }
    let by_index_only = !devices.keys().any(|n| is_uuid_name(n));
    if by_index_only && !gpu.uuid.starts_with("MIG-") {
        tried.push(gpu.index.to_string());
        tried.push(format!("gpu{}", gpu.index));
    }
    for name in &tried {
        if let Some((name, candidate)) = devices.get_key_value(name) {
            if let Some(second) = &candidate.conflict {
                return Err(CdiError::ConflictingDevice {
                    name: name.clone(),
                    first: candidate.path.clone(),
                    second: second.clone(),
                });
            }
            return Ok((name, candidate));
        }
    }
    Err(CdiError::GpuNotInSpec {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        tried,
    })
}

fn inject_cdi(spec: &mut Spec, gpus: &[Gpu], specs: &[CdiSpec]) -> Result<Injected, CdiError> {
    let devices = index_devices(specs);
    let mut chosen: Vec<(&str, &Candidate)> = Vec::new();
    for gpu in gpus {
        let pick = pick_device(gpu, &devices)?;
        if !chosen.iter().any(|(name, _)| *name == pick.0) {
            chosen.push(pick);
        }
    }
    let spec_file = chosen[0].1.path.clone();

    // As the crate's own `Cache::inject_devices`: each spec's edits once,
    // before the edits of its first device.
    let mut edits = ContainerEdits::new();
    let mut seen_specs = HashSet::new();
    let apply_err = |path: &Path, source: anyhow::Error| CdiError::ApplyEdits {
        spec_file: path.to_path_buf(),
        source: source.into(),
    };
    for (_, candidate) in &chosen {
        if seen_specs.insert(candidate.path.clone())
            && let Some(spec_edits) = candidate.device.get_spec().edits()
        {
            edits
                .append(spec_edits)
                .map_err(|e| apply_err(&candidate.path, e))?;
        }
        edits
            .append(candidate.device.edits())
            .map_err(|e| apply_err(&candidate.path, e))?;
    }
    let env_keys: HashSet<String> = edits
        .container_edits
        .env
        .iter()
        .flatten()
        .map(|e| env_key(e).to_owned())
        .collect();

    // The crate's generator gives a spec without mounts a default (empty)
    // mount before adding its own: start from an empty list instead.
    if spec.mounts().is_none() {
        spec.set_mounts(Some(Vec::new()));
    }
    let before = linux_devices(spec);
    edits.apply(spec).map_err(|e| apply_err(&spec_file, e))?;
    override_env(spec, &env_keys);

    let added: Vec<LinuxDevice> = linux_devices(spec)
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    for device in &added {
        allow_device(spec, device);
    }
    let names: Vec<&str> = chosen.iter().map(|(name, _)| *name).collect();
    tracing::debug!(spec = %spec_file.display(), devices = ?names, "applying CDI devices");
    Ok(Injected {
        method: Method::Cdi { spec_file },
        devices: added.iter().map(|d| d.path().clone()).collect(),
    })
}

fn env_key(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(k, _)| k)
}

/// Leaves one entry per key of `keys`, the last (the CDI value): the
/// crate appends a variable the spec already had instead of replacing it,
/// and a process reading its environment sees the first.
fn override_env(spec: &mut Spec, keys: &HashSet<String>) {
    let Some(env) = spec
        .process_mut()
        .as_mut()
        .and_then(|p| p.env_mut().as_mut())
    else {
        return;
    };
    let mut kept: HashSet<String> = HashSet::new();
    let mut out: Vec<String> = Vec::with_capacity(env.len());
    for entry in env.iter().rev() {
        let key = env_key(entry);
        if keys.contains(key) && !kept.insert(key.to_owned()) {
            continue;
        }
        out.push(entry.clone());
    }
    out.reverse();
    *env = out;
}

fn linux_devices(spec: &Spec) -> Vec<LinuxDevice> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default()
}

/// Appends an allow rule (`rwm`) for `device` unless an allow rule for its
/// type, major and minor is there already (a CDI spec may narrow the
/// access; that rule stands).
fn allow_device(spec: &mut Spec, device: &LinuxDevice) {
    let typ = match device.typ() {
        LinuxDeviceType::B => LinuxDeviceType::B,
        LinuxDeviceType::C | LinuxDeviceType::U => LinuxDeviceType::C,
        _ => return,
    };
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    let resources = linux.resources_mut().get_or_insert_with(Default::default);
    let rules = resources.devices_mut().get_or_insert_with(Vec::new);
    let present = rules.iter().any(|r| {
        r.allow()
            && r.typ() == Some(typ)
            && r.major() == Some(device.major())
            && r.minor() == Some(device.minor())
    });
    if !present {
        let mut rule = LinuxDeviceCgroup::from(device);
        rule.set_typ(Some(typ));
        rules.push(rule);
    }
}

// ------------------------------------------------------------- direct path

/// Driver libraries mounted on the direct path: `nvidia-container-cli`'s
/// "utility" and "compute" sets. A file matches a stem when its name is
/// the stem or the stem followed by `.` (`libcuda.so.1`, `libcuda.so.550.54.15`).
pub const DRIVER_LIBRARIES: &[&str] = &[
    // utility
    "libnvidia-ml.so",
    "libnvidia-cfg.so",
    "libnvidia-nscq.so",
    // compute
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-opencl.so",
    "libnvidia-gpucomp.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-fatbinaryloader.so",
    "libnvidia-allocator.so",
    "libnvidia-compiler.so",
    "libnvidia-pkcs11.so",
    "libnvidia-pkcs11-openssl3.so",
    "libnvidia-nvvm.so",
];

/// Driver tools mounted on the direct path, from `/usr/bin`.
pub const DRIVER_BINARIES: &[&str] = &[
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
];

/// Directories searched for [`DRIVER_LIBRARIES`], first match of a name
/// (after resolving directory symlinks) winning. Only ELF files of the
/// agent's own class and machine are taken, which leaves out 32-bit and
/// foreign-architecture copies (`/usr/lib` holds 32-bit ones on RHEL).
const LIBRARY_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/lib64",
    "/lib",
];

/// The nodes every GPU container gets when they exist.
const CONTROL_NODES: &[&str] = &["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"];

const MOUNT_OPTIONS: &[&str] = &["ro", "nosuid", "nodev", "bind"];

/// A device node wanted in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WantedNode {
    /// Absolute path in the container, looked up under the host root.
    path: PathBuf,
    /// The GPU (by index) whose own node this is: it must exist.
    gpu: Option<u32>,
}

fn inject_direct(
    spec: &mut Spec,
    gpus: &[Gpu],
    mig_caps: bool,
    host_root: &Path,
) -> Result<Injected, CdiError> {
    let minors = gpu_minors(gpus, host_root)?;
    let caps = if mig_caps {
        sorted_names(&under(host_root, Path::new("/dev/nvidia-caps")))
    } else {
        Vec::new()
    };
    let wanted = wanted_nodes(&minors, &caps);
    let nodes = stat_nodes(&wanted, host_root)?;
    let ldconfig = if host_root == Path::new("/") {
        ldconfig_cache()
    } else {
        None
    };
    let files = driver_files(host_root, ldconfig.as_deref());

    let devices = nodes.iter().map(|d| d.path().clone()).collect();
    for node in nodes {
        add_device(spec, node);
    }
    for (source, destination) in files {
        add_bind_mount(spec, source, destination);
    }
    Ok(Injected {
        method: Method::Direct,
        devices,
    })
}

/// `path` (absolute, as seen in the container) on the host.
fn under(host_root: &Path, path: &Path) -> PathBuf {
    host_root.join(path.strip_prefix("/").unwrap_or(path))
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// `(index, minor)` of each GPU: the "Device Minor" of the entry of
/// `/proc/driver/nvidia/gpus` with its UUID, else its index. A UUID absent
/// from a listing that exists is an error (MIG UUIDs are never listed).
fn gpu_minors(gpus: &[Gpu], host_root: &Path) -> Result<Vec<(u32, u32)>, CdiError> {
    let proc_dir = under(host_root, Path::new("/proc/driver/nvidia/gpus"));
    let listed: HashMap<String, u32> = sorted_names(&proc_dir)
        .iter()
        .filter_map(|bus| std::fs::read_to_string(proc_dir.join(bus).join("information")).ok())
        .filter_map(|text| parse_gpu_information(&text))
        .collect();
    gpus.iter()
        .map(|gpu| match listed.get(&gpu.uuid) {
            Some(minor) => Ok((gpu.index, *minor)),
            None if listed.is_empty() || gpu.uuid.is_empty() || gpu.uuid.starts_with("MIG-") => {
                Ok((gpu.index, gpu.index))
            }
            None => Err(CdiError::GpuNotOnHost {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                proc_dir: proc_dir.clone(),
            }),
        })
        .collect()
}

/// `(UUID, minor)` from a `/proc/driver/nvidia/gpus/<bus>/information`.
fn parse_gpu_information(text: &str) -> Option<(String, u32)> {
    let (mut uuid, mut minor) = (None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "GPU UUID" => uuid = Some(value.trim().to_owned()),
            "Device Minor" => minor = value.trim().parse().ok(),
            _ => {}
        }
    }
    Some((uuid?, minor?))
}

/// The nodes for GPUs `(index, minor)`, the control nodes, and the
/// `nvidia-caps` nodes named in `caps`; each once.
fn wanted_nodes(minors: &[(u32, u32)], caps: &[String]) -> Vec<WantedNode> {
    let mut wanted: Vec<WantedNode> = Vec::new();
    let mut push = |path: PathBuf, gpu: Option<u32>| {
        if !wanted.iter().any(|w| w.path == path) {
            wanted.push(WantedNode { path, gpu });
        }
    };
    for (index, minor) in minors {
        push(PathBuf::from(format!("/dev/nvidia{minor}")), Some(*index));
    }
    for node in CONTROL_NODES {
        push(PathBuf::from(node), None);
    }
    for cap in caps {
        push(Path::new("/dev/nvidia-caps").join(cap), None);
    }
    wanted
}

/// Each wanted node as an OCI device, type and numbers read with stat (the
/// node's symlinks followed) under `host_root`. Optional nodes that are
/// missing or not device nodes are left out; a GPU's own node must be one.
/// The file mode is left unset, which runc reads as 0666: the cgroup rule
/// is what limits access.
fn stat_nodes(wanted: &[WantedNode], host_root: &Path) -> Result<Vec<LinuxDevice>, CdiError> {
    let mut nodes = Vec::new();
    for want in wanted {
        let host_path = under(host_root, &want.path);
        let meta = match (std::fs::metadata(&host_path), want.gpu) {
            (Ok(meta), _) => meta,
            (Err(source), Some(index)) => {
                return Err(CdiError::GpuNodeMissing {
                    index,
                    path: host_path,
                    source,
                });
            }
            (Err(err), None) => {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %host_path.display(), error = %err, "skipping a device node");
                }
                continue;
            }
        };
        let typ = if meta.file_type().is_char_device() {
            LinuxDeviceType::C
        } else if meta.file_type().is_block_device() {
            LinuxDeviceType::B
        } else if let Some(index) = want.gpu {
            return Err(CdiError::NotADeviceNode {
                index,
                path: host_path,
            });
        } else {
            tracing::warn!(path = %host_path.display(), "skipping what is not a device node");
            continue;
        };
        let rdev = meta.rdev();
        let mut device = LinuxDevice::default();
        device
            .set_path(want.path.clone())
            .set_typ(typ)
            .set_major(i64::from(libc::major(rdev)))
            .set_minor(i64::from(libc::minor(rdev)));
        nodes.push(device);
    }
    Ok(nodes)
}

/// True when `file_name` is one of [`DRIVER_LIBRARIES`].
fn is_driver_library(file_name: &str) -> bool {
    DRIVER_LIBRARIES.iter().any(|stem| {
        file_name
            .strip_prefix(stem)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// The paths in `ldconfig -p` output.
fn parse_ldconfig(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| line.split_once(" => "))
        .map(|(_, path)| PathBuf::from(path.trim()))
        .collect()
}

/// `ldconfig -p` of this host, for libraries in directories configured in
/// `/etc/ld.so.conf.d` rather than in [`LIBRARY_DIRS`].
fn ldconfig_cache() -> Option<String> {
    ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|bin| {
            let out = std::process::Command::new(bin).arg("-p").output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
}

/// `e_machine` of the agent's own architecture.
const NATIVE_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else {
    None
};

/// True for an ELF file (symlinks followed) of the agent's class, byte
/// order and machine.
fn is_native_elf(path: &Path) -> bool {
    let mut header = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    if read.is_err() || &header[..4] != b"\x7fELF" {
        return false;
    }
    let class = if cfg!(target_pointer_width = "64") {
        2
    } else {
        1
    };
    let data = if cfg!(target_endian = "little") { 1 } else { 2 };
    let machine = if data == 1 {
        u16::from_le_bytes([header[18], header[19]])
    } else {
        u16::from_be_bytes([header[18], header[19]])
    };
    header[4] == class && header[5] == data && NATIVE_MACHINE.is_none_or(|m| m == machine)
}

/// The driver files to bind-mount, as `(host path, container path)`: the
/// libraries found in [`LIBRARY_DIRS`] and in `ldconfig` output (already
/// host paths; `None` under a host root other than `/`), then the tools of
/// [`DRIVER_BINARIES`]. A library reached twice through a symlinked
/// directory (`/lib` -> `/usr/lib`) is mounted once, at its first path.
fn driver_files(host_root: &Path, ldconfig: Option<&str>) -> Vec<(PathBuf, PathBuf)> {
    let mut files = Vec::new();
    let mut seen: HashSet<(PathBuf, String)> = HashSet::new();
    let mut consider = |container_path: PathBuf| {
        let host_path = under(host_root, &container_path);
        let (Some(dir), Some(name)) = (
            host_path.parent(),
            container_path.file_name().and_then(|n| n.to_str()),
        ) else {
            return;
        };
        if !is_driver_library(name) || !is_native_elf(&host_path) {
            return;
        }
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if seen.insert((dir, name.to_owned())) {
            files.push((host_path, container_path));
        }
    };
    for dir in LIBRARY_DIRS {
        for name in sorted_names(&under(host_root, Path::new(dir))) {
            consider(Path::new(dir).join(name));
        }
    }
    for path in parse_ldconfig(ldconfig.unwrap_or_default()) {
        if path.is_absolute() {
            consider(path);
        }
    }
    for bin in DRIVER_BINARIES {
        let container_path = Path::new("/usr/bin").join(bin);
        let host_path = under(host_root, &container_path);
        if host_path.is_file() {
            files.push((host_path, container_path));
        }
    }
    files
}

/// Adds `device` to `linux.devices` (replacing one at the same path) with
/// its allow rule.
fn add_device(spec: &mut Spec, device: LinuxDevice) {
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    let devices = linux.devices_mut().get_or_insert_with(Vec::new);
    devices.retain(|d| d.path() != device.path());
    devices.push(device.clone());
    allow_device(spec, &device);
}

/// Adds a read-only bind mount (replacing one at the same destination).
fn add_bind_mount(spec: &mut Spec, source: PathBuf, destination: PathBuf) {
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    mounts.retain(|m| m.destination() != &destination);
    let mut mount = Mount::default();
    mount
        .set_destination(destination)
        .set_source(Some(source))
        .set_typ(Some("bind".to_owned()))
        .set_options(Some(MOUNT_OPTIONS.iter().map(|o| o.to_string()).collect()));
    mounts.push(mount);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
    const UUID1: &str = "GPU-55555555-6666-7777-8888-999999999999";

    fn gpu(index: u32, uuid: &str) -> Gpu {
        Gpu {
            index,
            uuid: uuid.to_owned(),
        }
    }

    /// A spec as `nvidia-ctk cdi generate` writes it, with /dev/null,
    /// /dev/zero, /dev/full and /dev/urandom standing for the GPU nodes
    /// (1:3, 1:5), nvidiactl (1:7) and the "all" device's extra (1:9).
    fn yaml_spec(lib: &Path) -> String {
        let lib = lib.display();
        format!(
            r#"cdiVersion: "0.5.0"
kind: nvidia.com/gpu
containerEdits:
  env:
    - SPEC_LEVEL=1
  deviceNodes:
    - path: /dev/nvidiactl
      hostPath: /dev/full
  mounts:
    - hostPath: {lib}
      containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.1
      options: [ro, nosuid, nodev, bind]
  hooks:
    - hookName: createContainer
      path: /usr/bin/nvidia-cdi-hook
      args: [nvidia-cdi-hook, update-ldcache, --folder, /usr/lib/x86_64-linux-gnu]
devices:
  - name: "0"
    containerEdits:
      env: [NAMED_BY=index0]
      deviceNodes:
        - path: /dev/nvidia0
          hostPath: /dev/null
  - name: {UUID0}
    containerEdits:
      env: [NAMED_BY=uuid0]
      deviceNodes:
        - path: /dev/nvidia0
          hostPath: /dev/null
  - name: "1"
    containerEdits:
      env: [NAMED_BY=index1]
      deviceNodes:
        - path: /dev/nvidia1
          hostPath: /dev/zero
  - name: {UUID1}
    containerEdits:
      env: [NAMED_BY=uuid1]
      deviceNodes:
        - path: /dev/nvidia1
          hostPath: /dev/zero
  - name: all
    containerEdits:
      env: [ALL_DEVICES=1]
      deviceNodes:
        - path: /dev/nvidia0
          hostPath: /dev/null
        - path: /dev/nvidia1
          hostPath: /dev/zero
        - path: /dev/nvidia-all
          hostPath: /dev/urandom
"#
        )
    }

    fn json_spec(lib: &Path) -> String {
        let node = |name: &str, path: &str, host: &str, env: &str| {
            serde_json::json!({
                "name": name,
                "containerEdits": {
                    "env": [env],
                    "deviceNodes": [{"path": path, "hostPath": host}],
                },
            })
        };
        serde_json::json!({
            "cdiVersion": "0.6.0",
            "kind": "nvidia.com/gpu",
            "containerEdits": {
                "env": ["SPEC_LEVEL=1"],
                "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": "/dev/full"}],
                "mounts": [{
                    "hostPath": lib,
                    "containerPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                    "options": ["ro", "nosuid", "nodev", "bind"],
                }],
                "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook"}],
            },
            "devices": [
                node("0", "/dev/nvidia0", "/dev/null", "NAMED_BY=index0"),
                node(UUID0, "/dev/nvidia0", "/dev/null", "NAMED_BY=uuid0"),
                node("1", "/dev/nvidia1", "/dev/zero", "NAMED_BY=index1"),
                node(UUID1, "/dev/nvidia1", "/dev/zero", "NAMED_BY=uuid1"),
                node("all", "/dev/nvidia-all", "/dev/urandom", "ALL_DEVICES=1"),
            ],
        })
        .to_string()
    }

    /// A CDI dir holding `file` with `text`; the lib the spec mounts.
    fn cdi_dir(file: &str, text: impl Fn(&Path) -> String) -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libcuda.so.1");
        std::fs::write(&lib, b"").unwrap();
        std::fs::write(dir.path().join(file), text(&lib)).unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        (dir, dirs)
    }

    /// A host root with nothing in it: the direct path must not be taken.
    fn no_host() -> PathBuf {
        PathBuf::from("/nonexistent-host-root")
    }

    fn env(spec: &Spec) -> Vec<String> {
        spec.process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default()
    }

    fn rules(spec: &Spec) -> Vec<(String, i64, i64, String)> {
        let rules = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.devices().clone())
            .unwrap_or_default();
        rules
            .iter()
            .filter(|r| r.allow())
            .map(|r| {
                (
                    r.typ().map(|t| t.as_str().to_owned()).unwrap_or_default(),
                    r.major().unwrap_or(-1),
                    r.minor().unwrap_or(-1),
                    r.access().clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn device_paths(spec: &Spec) -> Vec<PathBuf> {
        linux_devices(spec)
            .iter()
            .map(|d| d.path().clone())
            .collect()
    }

    fn mount_destinations(spec: &Spec) -> Vec<PathBuf> {
        spec.mounts()
            .iter()
            .flatten()
            .map(|m| m.destination().clone())
            .collect()
    }

    fn rule(major: i64, minor: i64) -> (String, i64, i64, String) {
        ("c".to_owned(), major, minor, "rwm".to_owned())
    }

    fn assert_only_gpu(spec: &Spec, injected: &Injected, ours: u32, dir: &Path, file: &str) {
        let (node, other, minor, other_minor) = if ours == 0 {
            ("/dev/nvidia0", "/dev/nvidia1", 3, 5)
        } else {
            ("/dev/nvidia1", "/dev/nvidia0", 5, 3)
        };
        assert_eq!(
            injected.method,
            Method::Cdi {
                spec_file: dir.join(file)
            }
        );
        assert_eq!(
            injected.devices,
            vec![PathBuf::from("/dev/nvidiactl"), PathBuf::from(node)]
        );
        assert_eq!(device_paths(spec), injected.devices);
        assert!(!device_paths(spec).contains(&PathBuf::from(other)));
        let env = env(spec);
        assert!(env.contains(&"SPEC_LEVEL=1".to_owned()), "{env:?}");
        assert!(env.contains(&format!("NAMED_BY=uuid{ours}")), "{env:?}");
        assert!(!env.iter().any(|e| e.starts_with("NAMED_BY=index")));
        assert!(!env.iter().any(|e| e.starts_with("ALL_DEVICES")));
        assert!(!env.iter().any(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES")));
        let rules = rules(spec);
        assert!(rules.contains(&rule(1, 7)), "{rules:?}");
        assert!(rules.contains(&rule(1, minor)), "{rules:?}");
        assert!(!rules.contains(&rule(1, other_minor)), "{rules:?}");
        assert!(
            mount_destinations(spec)
                .contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1"))
        );
        let hooks = spec.hooks().as_ref().unwrap();
        let create = hooks.create_container().as_ref().unwrap();
        assert_eq!(create.len(), 1);
        assert_eq!(create[0].path(), Path::new("/usr/bin/nvidia-cdi-hook"));
    }

    #[test]
    fn yaml_spec_gives_exactly_the_gpu_by_uuid() {
        let (dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let mut spec = Spec::default();
        let injected = inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap();
        assert_only_gpu(&spec, &injected, 0, dir.path(), "nvidia.yaml");
    }

    #[test]
    fn json_spec_gives_exactly_the_gpu_by_uuid() {
        let (dir, dirs) = cdi_dir("nvidia.json", json_spec);
        let mut spec = Spec::default();
        // The index disagrees with the UUID: the UUID decides.
        let injected = inject(&mut spec, &[gpu(0, UUID1)], false, &dirs, &no_host()).unwrap();
        assert_only_gpu(&spec, &injected, 1, dir.path(), "nvidia.json");
    }

    #[test]
    fn two_gpus_get_spec_edits_once_and_never_all() {
        let (_dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let mut spec = Spec::default();
        let injected = inject(
            &mut spec,
            &[gpu(0, UUID0), gpu(1, UUID1)],
            false,
            &dirs,
            &no_host(),
        )
        .unwrap();
        assert_eq!(
            injected.devices,
            ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1"].map(PathBuf::from)
        );
        let env = env(&spec);
        assert_eq!(env.iter().filter(|e| *e == "SPEC_LEVEL=1").count(), 1);
        assert!(!env.iter().any(|e| e.starts_with("ALL_DEVICES")));
        assert!(!device_paths(&spec).contains(&PathBuf::from("/dev/nvidia-all")));
        assert!(!rules(&spec).contains(&rule(1, 9)));
        let hooks = spec.hooks().as_ref().unwrap();
        assert_eq!(hooks.create_container().as_ref().unwrap().len(), 1);
    }

    #[test]
    fn unknown_gpu_is_an_error() {
        let (_dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let mut spec = Spec::default();
        let stranger = "GPU-deadbeef-0000-0000-0000-000000000000";
        // Index 0 exists, but the spec names GPUs by UUID: index 0 may be
        // another GPU, so no fallback.
        let err = inject(
            &mut spec,
            &[gpu(0, UUID0), gpu(0, stranger)],
            false,
            &dirs,
            &no_host(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, CdiError::GpuNotInSpec { uuid, .. } if uuid == stranger),
            "{err:?}"
        );
        assert!(err.to_string().contains(stranger));
    }

    #[test]
    fn no_gpus_adds_nothing() {
        let (_dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let mut spec = Spec::default();
        let before = serde_json::to_value(&spec).unwrap();
        let injected = inject(&mut spec, &[], true, &dirs, &no_host()).unwrap();
        assert_eq!(injected.devices, Vec::<PathBuf>::new());
        assert_eq!(serde_json::to_value(&spec).unwrap(), before);
    }

    #[test]
    fn index_names_serve_when_the_spec_has_no_uuid_names() {
        let (_dir, dirs) = cdi_dir("nvidia.yaml", |lib| {
            let text = yaml_spec(lib);
            // Drop the UUID-named devices (each is 6 lines).
            let lines: Vec<&str> = text.lines().collect();
            let mut out = Vec::new();
            let mut skip = 0;
            for line in lines {
                if line.contains("name: GPU-") {
                    skip = 6;
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                out.push(line);
            }
            out.join("\n")
        });
        let mut spec = Spec::default();
        let injected = inject(&mut spec, &[gpu(1, UUID1)], false, &dirs, &no_host()).unwrap();
        assert!(injected.devices.contains(&PathBuf::from("/dev/nvidia1")));
        assert!(env(&spec).contains(&"NAMED_BY=index1".to_owned()));
        // A MIG device is never taken by index.
        let mig = "MIG-00000000-1111-2222-3333-444444444444";
        let err = inject(&mut spec, &[gpu(1, mig)], false, &dirs, &no_host()).unwrap_err();
        assert!(matches!(err, CdiError::GpuNotInSpec { .. }), "{err:?}");
    }

    #[test]
    fn cdi_env_replaces_what_the_spec_had() {
        let (_dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let mut spec = Spec::default();
        let mut env = env(&spec);
        env.push("SPEC_LEVEL=0".to_owned());
        env.push("KEEP=1".to_owned());
        spec.process_mut().as_mut().unwrap().set_env(Some(env));
        inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap();
        let env = self::env(&spec);
        let spec_level: Vec<_> = env
            .iter()
            .filter(|e| e.starts_with("SPEC_LEVEL="))
            .collect();
        assert_eq!(spec_level, ["SPEC_LEVEL=1"]);
        assert!(env.contains(&"KEEP=1".to_owned()));
    }

    #[test]
    fn spec_without_mounts_gets_no_empty_mount() {
        let (_dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let mut spec = Spec::default();
        spec.set_mounts(None);
        inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap();
        assert_eq!(
            mount_destinations(&spec),
            [PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1")]
        );
    }

    #[test]
    fn broken_specs_of_other_kinds_are_skipped_and_ours_fail() {
        let (dir, dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        std::fs::write(
            dir.path().join("other.yaml"),
            "cdiVersion: \"0.5.0\"\nkind: example.com/fpga\ndevices: []\n",
        )
        .unwrap();
        let mut spec = Spec::default();
        inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap();

        std::fs::write(
            dir.path().join("nvidia-broken.yaml"),
            "cdiVersion: \"0.5.0\"\nkind: nvidia.com/gpu\ndevices: []\n",
        )
        .unwrap();
        let err = inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap_err();
        assert!(
            matches!(&err, CdiError::SpecInvalid { path, .. } if path.ends_with("nvidia-broken.yaml")),
            "{err:?}"
        );
    }

    #[test]
    fn later_dir_wins_and_one_dir_twice_conflicts() {
        let (_low, mut dirs) = cdi_dir("nvidia.yaml", yaml_spec);
        let (high, high_dirs) = cdi_dir("nvidia.yaml", |lib| {
            yaml_spec(lib).replace("NAMED_BY=uuid0", "NAMED_BY=uuid0-high")
        });
        dirs.extend(high_dirs);
        let mut spec = Spec::default();
        let injected = inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap();
        assert!(env(&spec).contains(&"NAMED_BY=uuid0-high".to_owned()));
        assert_eq!(
            injected.method,
            Method::Cdi {
                spec_file: high.path().join("nvidia.yaml")
            }
        );

        let lib = high.path().join("libcuda.so.1");
        std::fs::write(high.path().join("nvidia-copy.yaml"), yaml_spec(&lib)).unwrap();
        let err = inject(&mut spec, &[gpu(0, UUID0)], false, &dirs, &no_host()).unwrap_err();
        assert!(matches!(err, CdiError::ConflictingDevice { .. }), "{err:?}");
    }

    // ----------------------------------------------------------- direct

    fn elf(machine: u16, class: u8) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    fn native_elf() -> Vec<u8> {
        elf(NATIVE_MACHINE.unwrap_or(62), 2)
    }

    fn write(root: &Path, path: &str, bytes: &[u8]) {
        let path = under(root, Path::new(path));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn link(root: &Path, path: &str, target: &str) {
        let path = under(root, Path::new(path));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
    }

    /// A host: libraries and tools as files, device nodes as symlinks to
    /// real character devices (stat follows them), one GPU in /proc.
    fn fake_host() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(
            r,
            "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
            &native_elf(),
        );
        link(
            r,
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "libcuda.so.550.54.15",
        );
        write(
            r,
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            &native_elf(),
        );
        write(
            r,
            "/usr/lib/x86_64-linux-gnu/libcudart.so.12",
            &native_elf(),
        );
        write(r, "/usr/lib/libcuda.so.1", &elf(3, 1)); // 32-bit x86
        write(r, "/usr/lib/libnvidia-ptxjitcompiler.so.1", b"not an ELF");
        write(r, "/usr/lib64/libnvidia-nvvm.so.4", &native_elf());
        // /lib -> usr/lib: the same files again, mounted once.
        link(r, "/lib", "usr/lib");
        write(r, "/usr/bin/nvidia-smi", b"#!");
        write(r, "/usr/bin/nvidia-cuda-mps-control", b"#!");
        link(r, "/dev/nvidia1", "/dev/null");
        link(r, "/dev/nvidiactl", "/dev/zero");
        link(r, "/dev/nvidia-caps/nvidia-cap1", "/dev/full");
        write(
            r,
            "/proc/driver/nvidia/gpus/0000:01:00.0/information",
            format!(
                "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 140\nGPU UUID: \t {UUID0}\n\
                 Video BIOS: \t 96.00.99.00.01\nBus Type: \t PCIe\nDevice Minor: \t 1\n"
            )
            .as_bytes(),
        );
        root
    }

    #[test]
    fn parses_proc_gpu_information() {
        let text = format!("Model: \t\t A100\nGPU UUID: \t {UUID1}\nDevice Minor: \t 7\n");
        assert_eq!(parse_gpu_information(&text), Some((UUID1.to_owned(), 7)));
        assert_eq!(parse_gpu_information("Model: A100\n"), None);
    }

    #[test]
    fn parses_ldconfig_output() {
        let text = "3 libs found in cache `/etc/ld.so.cache'\n\
            \tlibnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1\n\
            \tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1\n\
            \tlibz.so.1 (libc6,x86-64, hwcap: 0x0000000000000002) => /lib/x86_64-linux-gnu/libz.so.1\n";
        assert_eq!(
            parse_ldconfig(text),
            [
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                "/usr/lib/i386-linux-gnu/libcuda.so.1",
                "/lib/x86_64-linux-gnu/libz.so.1",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn driver_library_names() {
        for yes in [
            "libcuda.so",
            "libcuda.so.1",
            "libcuda.so.550.54.15",
            "libnvidia-ml.so.1",
            "libnvidia-ptxjitcompiler.so.550.54.15",
            "libnvidia-nvvm.so.4",
            "libcudadebugger.so.1",
            "libnvidia-opencl.so.1",
        ] {
            assert!(is_driver_library(yes), "{yes}");
        }
        for no in [
            "libcudart.so.12",
            "libcuda.so1",
            "libnvidia-mlx.so",
            "libnvidia-glcore.so.550",
            "libcuda.a",
        ] {
            assert!(!is_driver_library(no), "{no}");
        }
    }

    #[test]
    fn finds_driver_files_in_a_host_tree() {
        let host = fake_host();
        let r = host.path();
        let files = driver_files(r, None);
        let container: Vec<&Path> = files.iter().map(|(_, c)| c.as_path()).collect();
        assert_eq!(
            container,
            [
                "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                "/usr/lib64/libnvidia-nvvm.so.4",
                "/usr/bin/nvidia-smi",
                "/usr/bin/nvidia-cuda-mps-control",
            ]
            .map(Path::new)
        );
        for (host_path, container_path) in &files {
            assert_eq!(host_path, &under(r, container_path));
        }
        // A library ldconfig knows in a directory of its own.
        write(r, "/opt/nvidia/lib/libnvidia-cfg.so.1", &native_elf());
        let ldconfig = "\tlibnvidia-cfg.so.1 (libc6,x86-64) => /opt/nvidia/lib/libnvidia-cfg.so.1\n\
             \tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1\n";
        let files = driver_files(r, Some(ldconfig));
        let container: Vec<&Path> = files.iter().map(|(_, c)| c.as_path()).collect();
        assert!(container.contains(&Path::new("/opt/nvidia/lib/libnvidia-cfg.so.1")));
        assert!(!container.contains(&Path::new("/lib/x86_64-linux-gnu/libcuda.so.1")));
    }

    #[test]
    fn wanted_nodes_lists_gpus_control_and_caps() {
        let wanted = wanted_nodes(&[(0, 2), (1, 5)], &["nvidia-cap1".to_owned()]);
        let paths: Vec<&Path> = wanted.iter().map(|w| w.path.as_path()).collect();
        assert_eq!(
            paths,
            [
                "/dev/nvidia2",
                "/dev/nvidia5",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia-caps/nvidia-cap1",
            ]
            .map(Path::new)
        );
        assert_eq!(wanted[0].gpu, Some(0));
        assert_eq!(wanted[1].gpu, Some(1));
        assert!(wanted[2..].iter().all(|w| w.gpu.is_none()));
    }

    #[test]
    fn stats_real_char_devices() {
        let want = |path: &str, gpu| WantedNode {
            path: PathBuf::from(path),
            gpu,
        };
        let nodes = stat_nodes(
            &[
                want("/dev/null", Some(0)),
                want("/dev/zero", None),
                want("/dev/nonexistent-nvidia-uvm", None),
            ],
            Path::new("/"),
        )
        .unwrap();
        let got: Vec<_> = nodes
            .iter()
            .map(|d| (d.path().clone(), d.typ(), d.major(), d.minor()))
            .collect();
        assert_eq!(
            got,
            [
                (PathBuf::from("/dev/null"), LinuxDeviceType::C, 1, 3),
                (PathBuf::from("/dev/zero"), LinuxDeviceType::C, 1, 5),
            ]
        );

        let err =
            stat_nodes(&[want("/dev/nonexistent-nvidia7", Some(7))], Path::new("/")).unwrap_err();
        assert!(
            matches!(err, CdiError::GpuNodeMissing { index: 7, .. }),
            "{err:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/dev/nvidia0", b"");
        let err = stat_nodes(&[want("/dev/nvidia0", Some(0))], dir.path()).unwrap_err();
        assert!(
            matches!(err, CdiError::NotADeviceNode { index: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn direct_path_without_a_cdi_spec() {
        let host = fake_host();
        let r = host.path();
        // A spec of another kind does not count.
        let (_dir, dirs) = cdi_dir("fpga.yaml", |_| {
            "cdiVersion: \"0.5.0\"\nkind: example.com/fpga\ndevices:\n  - name: f0\n    containerEdits:\n      env: [FPGA=1]\n".to_owned()
        });
        let mut spec = Spec::default();
        // Index 0, but /proc says the node of this UUID is minor 1.
        let injected = inject(&mut spec, &[gpu(0, UUID0)], true, &dirs, r).unwrap();
        assert_eq!(injected.method, Method::Direct);
        assert_eq!(
            injected.devices,
            [
                "/dev/nvidia1",
                "/dev/nvidiactl",
                "/dev/nvidia-caps/nvidia-cap1"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(device_paths(&spec), injected.devices);
        let allowed = rules(&spec);
        for (major, minor) in [(1, 3), (1, 5), (1, 7)] {
            assert!(allowed.contains(&rule(major, minor)), "{allowed:?}");
        }
        let mounts = spec.mounts().as_ref().unwrap();
        let smi = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/usr/bin/nvidia-smi"))
            .unwrap();
        assert_eq!(
            smi.source().as_deref(),
            Some(under(r, Path::new("/usr/bin/nvidia-smi")).as_path())
        );
        assert_eq!(smi.typ().as_deref(), Some("bind"));
        assert!(smi.options().as_ref().unwrap().contains(&"ro".to_owned()));
        assert!(
            mount_destinations(&spec)
                .contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1"))
        );
        assert!(
            !env(&spec)
                .iter()
                .any(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES"))
        );
        assert!(!env(&spec).iter().any(|e| e.starts_with("FPGA")));

        // Without MIG caps, no caps nodes; injecting again adds no duplicates.
        let mut spec = Spec::default();
        inject(&mut spec, &[gpu(0, UUID0)], false, &[], r).unwrap();
        let again = inject(&mut spec, &[gpu(0, UUID0)], false, &[], r).unwrap();
        assert_eq!(
            again.devices,
            ["/dev/nvidia1", "/dev/nvidiactl"].map(PathBuf::from)
        );
        assert_eq!(device_paths(&spec), again.devices);
        assert_eq!(rules(&spec).len(), 2);
        let dests = mount_destinations(&spec);
        let unique: HashSet<_> = dests.iter().collect();
        assert_eq!(unique.len(), dests.len());
    }

    #[test]
    fn direct_path_refuses_a_gpu_the_host_does_not_have() {
        let host = fake_host();
        let mut spec = Spec::default();
        let err = inject(&mut spec, &[gpu(1, UUID1)], false, &[], host.path()).unwrap_err();
        assert!(
            matches!(&err, CdiError::GpuNotOnHost { uuid, .. } if uuid == UUID1),
            "{err:?}"
        );
        // Without a /proc listing the index is the minor; /dev/nvidia0 is
        // missing in this host.
        std::fs::remove_dir_all(under(host.path(), Path::new("/proc"))).unwrap();
        let err = inject(&mut spec, &[gpu(0, UUID1)], false, &[], host.path()).unwrap_err();
        assert!(
            matches!(err, CdiError::GpuNodeMissing { index: 0, .. }),
            "{err:?}"
        );
    }
}
