//! Hardware probing: GPUs behind the [`GpuProbe`] trait (NVML for real,
//! [`FakeGpus`] for clusters on a laptop and CI), host facts via sysinfo.
//!
//! Nothing here talks to the scheduler; the session converts these plain
//! structs into protobuf at its boundary.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::health::GpuEvent;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};

/// One schedulable GPU as probed: static facts plus the latest samples. A
/// GPU in MIG mode is not itself schedulable: each of its MIG devices is
/// one `GpuInfo` (UUID `MIG-...`, `parent_index` set). `index` numbers the
/// schedulable devices of the node; it equals the NVML index when no GPU is
/// in MIG mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuInfo {
    pub index: u32,
    /// Minor number of its `/dev/nvidiaN` (the parent's, for a MIG device).
    pub minor_number: u32,
    /// NVML index of the physical GPU, for a MIG device.
    pub parent_index: Option<u32>,
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub utilization_pct: u32,
    pub temperature_c: u32,
    pub power_mw: u32,
    pub mig_enabled: bool,
    pub healthy: bool,
    pub health_reason: String,
    /// Memory-controller utilization (%).
    pub memory_util_pct: u32,
    /// Energy since the driver loaded (mJ).
    pub energy_mj: u64,
    /// Volatile ECC error counts (corrected, uncorrected).
    pub ecc_corrected: u64,
    pub ecc_uncorrected: u64,
    /// Compute processes on the GPU: (pid, GPU memory MiB).
    pub processes: Vec<(u32, u64)>,
    /// Current SM and memory clocks (MHz).
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
}

/// Where the agent learns about its GPUs. The real implementation is NVML;
/// fakes are chosen by the caller (`--fake-gpus`), never by `cfg!(test)`.
pub trait GpuProbe: Send + Sync {
    /// Every GPU with fresh samples.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// True for simulated GPUs.
    fn is_fake(&self) -> bool {
        false
    }
    /// Critical events (XID, uncorrectable ECC) since the last call.
    fn events(&self) -> Vec<GpuEvent> {
        Vec::new()
    }
}

/// A machine with no NVIDIA driver: no GPUs.
#[derive(Debug, Default)]
pub struct NoGpus;

impl GpuProbe for NoGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        Vec::new()
    }
}

/// The real probe: one NVML handle for the agent's life.
pub struct NvmlProbe {
    nvml: Arc<Nvml>,
    events: Arc<Mutex<Vec<GpuEvent>>>,
}

impl NvmlProbe {
    /// Loads libnvidia-ml. Fails (with a libloading error inside) on
    /// machines without the NVIDIA driver. Starts a thread that waits on an
    /// NVML event set for critical XIDs and double-bit ECC errors.
    pub fn init() -> Result<Self, nvml_wrapper::error::NvmlError> {
        let nvml = Arc::new(Nvml::init()?);
        let events: Arc<Mutex<Vec<GpuEvent>>> = Arc::default();
        let (n, e) = (nvml.clone(), events.clone());
        std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || watch_events(&n, &e))
            .map_err(|_| nvml_wrapper::error::NvmlError::Unknown)?;
        Ok(Self { nvml, events })
    }
}

/// Blocks on NVML events for the agent's life.
fn watch_events(nvml: &Nvml, out: &Mutex<Vec<GpuEvent>>) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(error = %err, "NVML events unavailable; XIDs will not be seen");
            return;
        }
    };
    for index in 0..nvml.device_count().unwrap_or(0) {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        match device.register_events(
            EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR,
            set,
        ) {
            Ok(s) => set = s,
            Err(err) => {
                tracing::warn!(gpu = index, error = %err.error, "cannot watch GPU events");
                return;
            }
        }
    }
    loop {
        match set.wait(5_000) {
            Ok(event) => {
                let index = event.device.index().unwrap_or(u32::MAX);
                let e = if event.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    GpuEvent::DoubleBitEcc { index }
                } else {
                    let xid = match event.event_data {
                        Some(XidError::Value(v)) => v,
                        _ => 999,
                    };
                    GpuEvent::Xid { index, xid }
                };
                tracing::warn!(gpu = index, event = ?e, "GPU event");
                out.lock().unwrap().push(e);
            }
            Err(nvml_wrapper::error::NvmlError::Timeout) => {}
            Err(err) => {
                tracing::warn!(error = %err, "NVML event wait failed; stopping the event watch");
                return;
            }
        }
    }
}

impl GpuProbe for NvmlProbe {
    fn events(&self) -> Vec<GpuEvent> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        let count = match self.nvml.device_count() {
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(error = %err, "NVML device_count failed");
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(count as usize);
        for nvml_index in 0..count {
            let next = out.len() as u32;
            let device = match self.nvml.device_by_index(nvml_index) {
                Ok(d) => d,
                Err(err) => {
                    out.push(GpuInfo {
                        index: next,
                        minor_number: nvml_index,
                        uuid: format!("unknown-{nvml_index}"),
                        model: "unknown".into(),
                        health_reason: format!("NVML cannot open device: {err}"),
                        ..Default::default()
                    });
                    continue;
                }
            };
            let mut gpu = sample(&device, next);
            gpu.minor_number = device.minor_number().unwrap_or(nvml_index);
            if !gpu.mig_enabled {
                out.push(gpu);
                continue;
            }
            // MIG mode: each MIG device is schedulable on its own.
            let max = device.mig_device_count().unwrap_or(0);
            let migs: Vec<_> = (0..max)
                .filter_map(|m| device.mig_device_by_index(m).ok())
                .collect();
            if migs.is_empty() {
                gpu.healthy = false;
                gpu.health_reason = "MIG mode is on but no MIG devices are configured".into();
                out.push(gpu);
                continue;
            }
            for mig in migs {
                let mut m = sample(&mig, out.len() as u32);
                m.minor_number = gpu.minor_number;
                m.parent_index = Some(nvml_index);
                m.pci_bus_id = gpu.pci_bus_id.clone();
                m.mig_enabled = true;
                // Per-MIG power, temperature and clocks are the parent's.
                m.temperature_c = gpu.temperature_c;
                m.power_mw = gpu.power_mw;
                m.sm_clock_mhz = gpu.sm_clock_mhz;
                m.mem_clock_mhz = gpu.mem_clock_mhz;
                m.ecc_corrected = gpu.ecc_corrected;
                m.ecc_uncorrected = gpu.ecc_uncorrected;
                out.push(m);
            }
        }
        out
    }
}

/// Reads one device (a physical GPU or a MIG device); fields a device does
/// not support read as zero.
fn sample(device: &nvml_wrapper::Device<'_>, index: u32) -> GpuInfo {
    use nvml_wrapper::enum_wrappers::device::Clock;
    let memory = device.memory_info().ok();
    let utilization = device.utilization_rates().ok();
    GpuInfo {
        index,
        minor_number: 0,
        parent_index: None,
        uuid: device.uuid().unwrap_or_else(|_| format!("unknown-{index}")),
        model: device.name().unwrap_or_else(|_| "unknown".into()),
        pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
        memory_total_mib: memory.as_ref().map_or(0, |m| m.total / (1024 * 1024)),
        memory_used_mib: memory.as_ref().map_or(0, |m| m.used / (1024 * 1024)),
        utilization_pct: utilization.as_ref().map_or(0, |u| u.gpu),
        memory_util_pct: utilization.as_ref().map_or(0, |u| u.memory),
        energy_mj: device.total_energy_consumption().unwrap_or(0),
        ecc_corrected: device
            .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .unwrap_or(0),
        ecc_uncorrected: device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .unwrap_or(0),
        processes: device
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let used = match p.used_gpu_memory {
                    nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b / (1024 * 1024),
                    nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
                };
                (p.pid, used)
            })
            .collect(),
        temperature_c: device.temperature(TemperatureSensor::Gpu).unwrap_or(0),
        power_mw: device.power_usage().unwrap_or(0),
        sm_clock_mhz: device.clock_info(Clock::SM).unwrap_or(0),
        mem_clock_mhz: device.clock_info(Clock::Memory).unwrap_or(0),
        mig_enabled: device.mig_mode().is_ok_and(|m| m.current == 1),
        healthy: true,
        health_reason: String::new(),
    }
}

/// Simulated GPUs, e.g. `8xH100-80GB` or `2xA100-40GB,1xT4-16GB`.
/// Utilization and health can be changed at run time (failure injection).
pub struct FakeGpus {
    gpus: Mutex<Vec<GpuInfo>>,
    /// Failure injection: a file of `INDEX XID` or `INDEX dbe` lines, read
    /// and removed on the next probe.
    inject: Option<PathBuf>,
}

/// A `--fake-gpus` value that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid fake GPU spec {spec:?}: expected COUNTxMODEL[,COUNTxMODEL...], e.g. 8xH100-80GB")]
pub struct FakeSpecError {
    spec: String,
}

impl FakeGpus {
    /// Parses a spec; `seed` (the node id) makes the UUIDs unique per node.
    pub fn parse(spec: &str, seed: &str) -> Result<Self, FakeSpecError> {
        let err = || FakeSpecError {
            spec: spec.to_string(),
        };
        let mut gpus = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (count, model) = part.split_once(['x', 'X']).ok_or_else(err)?;
            let count: u32 = count.trim().parse().map_err(|_| err())?;
            let model = model.trim();
            if count == 0 || count > 64 || model.is_empty() {
                return Err(err());
            }
            let memory_total_mib = memory_from_model(model).unwrap_or(16 * 1024);
            for _ in 0..count {
                let index = gpus.len() as u32;
                gpus.push(GpuInfo {
                    index,
                    minor_number: index,
                    parent_index: None,
                    sm_clock_mhz: 1980,
                    mem_clock_mhz: 2619,
                    uuid: fake_uuid(seed, index),
                    model: model.to_string(),
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x10 + index),
                    memory_total_mib,
                    memory_used_mib: 0,
                    utilization_pct: 0,
                    temperature_c: 35,
                    power_mw: 60_000,
                    mig_enabled: false,
                    healthy: true,
                    health_reason: String::new(),
                    ..Default::default()
                });
            }
        }
        if gpus.is_empty() {
            return Err(err());
        }
        Ok(Self {
            gpus: Mutex::new(gpus),
            inject: None,
        })
    }

    /// Reads injected events from `path` (see [`FakeGpus::events`]).
    pub fn with_injection(mut self, path: PathBuf) -> Self {
        self.inject = Some(path);
        self
    }

    /// Failure injection: mark a GPU unhealthy (or healthy again).
    pub fn set_health(&self, index: u32, healthy: bool, reason: &str) {
        let mut gpus = self.gpus.lock().unwrap();
        if let Some(gpu) = gpus.iter_mut().find(|g| g.index == index) {
            gpu.healthy = healthy;
            gpu.health_reason = reason.to_string();
        }
    }
}

impl GpuProbe for FakeGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.lock().unwrap().clone()
    }
    fn is_fake(&self) -> bool {
        true
    }
    fn events(&self) -> Vec<GpuEvent> {
        let Some(path) = &self.inject else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let _ = std::fs::remove_file(path);
        text.lines()
            .filter_map(|l| {
                let (index, what) = l.trim().split_once(' ')?;
                let index = index.parse().ok()?;
                Some(match what.trim() {
                    "dbe" => GpuEvent::DoubleBitEcc { index },
                    xid => GpuEvent::Xid {
                        index,
                        xid: xid.parse().ok()?,
                    },
                })
            })
            .collect()
    }
}

/// "H100-80GB" -> 80 GiB in MiB.
fn memory_from_model(model: &str) -> Option<u64> {
    let upper = model.to_ascii_uppercase();
    let digits = upper
        .strip_suffix("GB")
        .or_else(|| upper.strip_suffix('G'))?;
    let start = digits
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    digits[start..].parse::<u64>().ok().map(|g| g * 1024)
}

/// A stable UUID-shaped id from the node seed and index (FNV-1a).
fn fake_uuid(seed: &str, index: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes().chain(index.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let h2 = h.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        h as u16,
        (h2 >> 48) as u16,
        h2 & 0xffff_ffff_ffff
    )
}

/// Picks the GPU probe: fakes when asked, else NVML, else CPU-only with one
/// clear log line.
pub fn select_probe(
    fake: Option<&str>,
    seed: &str,
    state_dir: &std::path::Path,
) -> anyhow::Result<Box<dyn GpuProbe>> {
    if let Some(spec) = fake {
        let fake = FakeGpus::parse(spec, seed)?.with_injection(state_dir.join("inject-gpu-events"));
        tracing::info!(spec, "using simulated GPUs");
        return Ok(Box::new(fake));
    }
    match NvmlProbe::init() {
        Ok(probe) => {
            tracing::info!(gpus = probe.gpus().len(), "NVML initialised");
            Ok(Box::new(probe))
        }
        Err(err) => {
            tracing::warn!(error = %err, "NVML not available (no NVIDIA driver?); running as a CPU-only node");
            Ok(Box::new(NoGpus))
        }
    }
}

/// What the rest of the agent relies on from any [`GpuProbe`]. The fake and
/// the NVML probe are held to the same list: by the unit tests (fakes), by
/// `tests/nvml.rs` on a GPU node, and by `gpupool-agent probe --check`.
/// Returns every violation found (empty: the probe conforms).
pub fn check_probe(probe: &dyn GpuProbe) -> Vec<String> {
    let mut bad = Vec::new();
    let first = probe.gpus();
    let second = probe.gpus();
    let _ = probe.events(); // must return at once, never block
    for (i, g) in first.iter().enumerate() {
        let at = format!("gpu {i} ({})", g.uuid);
        if g.index != i as u32 {
            bad.push(format!("{at}: index {} out of order", g.index));
        }
        let is_mig = g.uuid.starts_with("MIG-");
        if !(g.uuid.starts_with("GPU-") || is_mig) {
            bad.push(format!("{at}: UUID is neither GPU-... nor MIG-..."));
        }
        if is_mig != g.parent_index.is_some() {
            bad.push(format!(
                "{at}: a MIG device needs a parent index, and only it"
            ));
        }
        if g.model.trim().is_empty() {
            bad.push(format!("{at}: empty model"));
        }
        if g.healthy && g.memory_total_mib == 0 {
            bad.push(format!("{at}: healthy with no memory"));
        }
        if g.memory_used_mib > g.memory_total_mib {
            bad.push(format!(
                "{at}: {} MiB used of {} MiB",
                g.memory_used_mib, g.memory_total_mib
            ));
        }
        if g.utilization_pct > 100 || g.memory_util_pct > 100 {
            bad.push(format!("{at}: utilization over 100%"));
        }
        if !g.healthy && g.health_reason.is_empty() {
            bad.push(format!("{at}: unhealthy without a reason"));
        }
    }
    let mut uuids: Vec<&str> = first.iter().map(|g| g.uuid.as_str()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    if uuids.len() != first.len() {
        bad.push("duplicate UUIDs".into());
    }
    let mut minors: Vec<u32> = first
        .iter()
        .filter(|g| g.parent_index.is_none())
        .map(|g| g.minor_number)
        .collect();
    minors.sort_unstable();
    minors.dedup();
    if minors.len() != first.iter().filter(|g| g.parent_index.is_none()).count() {
        bad.push("two GPUs share a /dev/nvidiaN minor".into());
    }
    let identity = |gs: &[GpuInfo]| -> Vec<(u32, String, String, u64)> {
        gs.iter()
            .map(|g| (g.index, g.uuid.clone(), g.model.clone(), g.memory_total_mib))
            .collect()
    };
    if identity(&first) != identity(&second) {
        bad.push("two successive probes disagree on the devices".into());
    }
    for (a, b) in first.iter().zip(&second) {
        if b.energy_mj < a.energy_mj {
            bad.push(format!("gpu {}: energy went backwards", a.index));
        }
    }
    bad
}

/// Host facts from sysinfo.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpu_cores: u32,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub os: String,
    pub kernel: String,
    pub uptime_s: u64,
    pub disks: Vec<DiskInfo>,
}

/// One mounted disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskInfo {
    pub mount_point: String,
    pub file_system: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

fn disks() -> Vec<DiskInfo> {
    let Ok(disks) = sysinfo::Disks::new_with_refreshed_list() else {
        return Vec::new();
    };
    disks
        .iter()
        .map(|d| DiskInfo {
            mount_point: d.mount_point().display().to_string(),
            file_system: d.file_system().to_string_lossy().into_owned(),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        })
        .collect()
}

/// Reads host facts once.
pub fn host_info() -> HostInfo {
    let hostname = sysinfo::System::host_name().unwrap_or_else(|_| "localhost".into());
    let os = sysinfo::System::long_os_version().unwrap_or_default();
    let kernel = sysinfo::System::kernel_version().unwrap_or_default();
    let uptime_s = sysinfo::System::uptime().unwrap_or(0);
    let Ok(mut sys) = sysinfo::System::new() else {
        tracing::warn!("sysinfo cannot read this host; reporting no CPU or memory");
        return HostInfo {
            hostname,
            cpu_cores: 0,
            cpu_model: String::new(),
            memory_mib: 0,
            os,
            kernel,
            uptime_s,
            disks: disks(),
        };
    };
    sys.refresh_cpu_all();
    sys.refresh_memory();
    HostInfo {
        hostname,
        cpu_cores: sys.cpus().len() as u32,
        cpu_model: sys
            .cpus()
            .first()
            .map(|c| c.brand().to_string())
            .unwrap_or_default(),
        memory_mib: sys.total_memory() / (1024 * 1024),
        os,
        kernel,
        uptime_s,
        disks: disks(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_spec_parses_count_model_and_memory() {
        let fake = FakeGpus::parse("2xA100-40GB,1xT4-16GB", "node-a").unwrap();
        let gpus = fake.gpus();
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].model, "A100-40GB");
        assert_eq!(gpus[0].memory_total_mib, 40 * 1024);
        assert_eq!(gpus[2].model, "T4-16GB");
        assert_eq!(gpus[2].index, 2);
        assert!(gpus.iter().all(|g| g.healthy));
    }

    #[test]
    fn fake_uuids_are_unique_per_node_and_stable() {
        let a = FakeGpus::parse("8xH100-80GB", "node-a").unwrap().gpus();
        let b = FakeGpus::parse("8xH100-80GB", "node-b").unwrap().gpus();
        let a2 = FakeGpus::parse("8xH100-80GB", "node-a").unwrap().gpus();
        let mut all: Vec<_> = a.iter().chain(&b).map(|g| g.uuid.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 16);
        assert_eq!(a, a2);
        assert!(a[0].uuid.starts_with("GPU-"));
    }

    #[test]
    fn bad_fake_specs_are_rejected() {
        for bad in ["", "8", "xH100", "0xH100", "ax", "8x"] {
            assert!(FakeGpus::parse(bad, "n").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fake_probes_conform() {
        for spec in ["1xT4-16GB", "8xH100-80GB", "2xA100-40GB,1xT4-16GB"] {
            let fake = FakeGpus::parse(spec, "node-a").unwrap();
            assert_eq!(check_probe(&fake), Vec::<String>::new(), "{spec}");
            fake.set_health(0, false, "XID 79");
            assert_eq!(check_probe(&fake), Vec::<String>::new(), "{spec} unhealthy");
        }
        assert!(check_probe(&NoGpus).is_empty());
    }

    /// The checks catch a probe that breaks the contract.
    #[test]
    fn conformance_catches_broken_probes() {
        struct Broken(Vec<GpuInfo>);
        impl GpuProbe for Broken {
            fn gpus(&self) -> Vec<GpuInfo> {
                self.0.clone()
            }
        }
        let good = FakeGpus::parse("2xH100-80GB", "n").unwrap().gpus();
        let mut dup = good.clone();
        dup[1].uuid = dup[0].uuid.clone();
        dup[1].minor_number = 0;
        let found = check_probe(&Broken(dup));
        assert!(
            found.iter().any(|f| f.contains("duplicate UUIDs")),
            "{found:?}"
        );
        assert!(found.iter().any(|f| f.contains("minor")), "{found:?}");
        let mut over = good.clone();
        over[0].memory_used_mib = over[0].memory_total_mib + 1;
        over[1].healthy = false;
        over[1].index = 5;
        let found = check_probe(&Broken(over));
        assert_eq!(found.len(), 3, "{found:?}");
        let mut mig = good;
        mig[0].uuid = "MIG-0b1f".into();
        assert_eq!(check_probe(&Broken(mig)).len(), 1);
    }

    #[test]
    fn health_can_be_injected() {
        let fake = FakeGpus::parse("2xH100-80GB", "n").unwrap();
        fake.set_health(1, false, "XID 79");
        let gpus = fake.gpus();
        assert!(gpus[0].healthy);
        assert!(!gpus[1].healthy);
        assert_eq!(gpus[1].health_reason, "XID 79");
    }
}
