//! The agent's Prometheus `/metrics`: host CPU and memory, instances by
//! phase, and per-GPU gauges named as NVIDIA's dcgm-exporter names them so
//! existing Grafana dashboards work.

use std::sync::{Arc, Mutex};

use prometheus::{Encoder, GaugeVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::session::AgentCtx;

/// Gauges refreshed on every scrape.
pub struct AgentMetrics {
    registry: Registry,
    cpu_utilization: prometheus::Gauge,
    memory_total: IntGauge,
    memory_used: IntGauge,
    instances: IntGaugeVec,
    connected: IntGauge,
    /// Image use: [pulls, cache hits, failures, bytes pulled].
    images: [prometheus::IntCounter; 4],
    /// Scrapes bring the counters up to date one at a time.
    images_sync: std::sync::Mutex<()>,
    gpu_util: GaugeVec,
    fb_used: GaugeVec,
    fb_free: GaugeVec,
    gpu_temp: GaugeVec,
    power: GaugeVec,
    gpu_healthy: GaugeVec,
    xid: GaugeVec,
    mem_copy_util: GaugeVec,
    energy: GaugeVec,
    ecc_sbe: GaugeVec,
    ecc_dbe: GaugeVec,
    sm_clock: GaugeVec,
    mem_clock: GaugeVec,
    instance_cpu: GaugeVec,
    instance_memory: GaugeVec,
    sys: Mutex<Option<sysinfo::System>>,
}

/// dcgm-exporter calls the model label `modelName`; promtool rejects camelCase
/// label names, so it is `model_name` here (the other labels match).
/// `pool`, `gpupool_job` and `tenant` are empty on GPUs no instance holds.
/// The job is `gpupool_job`, not `job` (dcgm-exporter's HPC mapping says
/// `hpc_job` for the same reason): every Prometheus scrape adds its own
/// `job` and `instance` target labels, and a clashing exported label would
/// arrive renamed `exported_job`.
const GPU_LABELS: &[&str] = &[
    "gpu",
    "UUID",
    "device",
    "model_name",
    "Hostname",
    "pool",
    "pool_name",
    JOB_LABEL,
    "tenant",
];

/// The label naming a gpupool job (see [`GPU_LABELS`]).
pub const JOB_LABEL: &str = "gpupool_job";
/// The label naming a gpupool instance.
pub const INSTANCE_LABEL: &str = "gpupool_instance";

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn instance_gauge(registry: &Registry, name: &str, help: &str) -> GaugeVec {
    gauge(registry, name, help, &[INSTANCE_LABEL, JOB_LABEL])
}

fn gpu_gauge(registry: &Registry, name: &str, help: &str) -> GaugeVec {
    gauge(registry, name, help, GPU_LABELS)
}

impl AgentMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg =
            |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("unique metric");
        let cpu_utilization = prometheus::Gauge::new(
            "gpupool_agent_host_cpu_utilization_ratio",
            "Host CPU utilization over all cores (0..1).",
        )
        .unwrap();
        reg(Box::new(cpu_utilization.clone()));
        let memory_total =
            IntGauge::new("gpupool_agent_host_memory_total_bytes", "Host memory.").unwrap();
        reg(Box::new(memory_total.clone()));
        let memory_used = IntGauge::new(
            "gpupool_agent_host_memory_used_bytes",
            "Host memory in use.",
        )
        .unwrap();
        reg(Box::new(memory_used.clone()));
        let instances = IntGaugeVec::new(
            Opts::new(
                "gpupool_agent_instances",
                "Job instances known to the agent, by phase.",
            ),
            &["phase"],
        )
        .unwrap();
        reg(Box::new(instances.clone()));
        let connected = IntGauge::new(
            "gpupool_agent_scheduler_connected",
            "1 while the session with the scheduler is up.",
        )
        .unwrap();
        reg(Box::new(connected.clone()));
        let images = [
            ("gpupool_agent_image_pulls_total", "Image instances whose image was pulled from its registry."),
            ("gpupool_agent_image_cache_hits_total", "Image instances started from the node's image cache, without a pull."),
            ("gpupool_agent_image_pull_failures_total", "Images that could not be prepared (not found, unauthorized, digest mismatch, registry unreachable...)."),
            ("gpupool_agent_image_pulled_bytes_total", "Bytes of image blobs downloaded."),
        ]
        .map(|(name, help)| {
            let c = prometheus::IntCounter::new(name, help).unwrap();
            reg(Box::new(c.clone()));
            c
        });
        Self {
            images,
            images_sync: std::sync::Mutex::new(()),
            gpu_util: gpu_gauge(&registry, "DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
            fb_used: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_FB_USED",
                "Framebuffer memory used (in MiB).",
            ),
            fb_free: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_FB_FREE",
                "Framebuffer memory free (in MiB).",
            ),
            gpu_temp: gpu_gauge(&registry, "DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)."),
            power: gpu_gauge(&registry, "DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
            mem_copy_util: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_MEM_COPY_UTIL",
                "Memory utilization (in %).",
            ),
            energy: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                "Total energy consumption since boot (in mJ).",
            ),
            ecc_sbe: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
                "Total number of single-bit volatile ECC errors.",
            ),
            ecc_dbe: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
                "Total number of double-bit volatile ECC errors.",
            ),
            xid: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_XID_ERRORS",
                "Value of the last XID error seen.",
            ),
            gpu_healthy: gpu_gauge(
                &registry,
                "gpupool_agent_gpu_healthy",
                "1 when the GPU is healthy.",
            ),
            sm_clock: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_SM_CLOCK",
                "SM clock frequency (in MHz).",
            ),
            mem_clock: gpu_gauge(
                &registry,
                "DCGM_FI_DEV_MEM_CLOCK",
                "Memory clock frequency (in MHz).",
            ),
            instance_cpu: instance_gauge(
                &registry,
                "gpupool_agent_instance_cpu_seconds",
                "CPU time used by the instance's cgroup so far (seconds).",
            ),
            instance_memory: instance_gauge(
                &registry,
                "gpupool_agent_instance_memory_bytes",
                "Memory in use by the instance's cgroup.",
            ),
            registry,
            cpu_utilization,
            memory_total,
            memory_used,
            instances,
            connected,
            sys: Mutex::new(sysinfo::System::new().ok()),
        }
    }

    /// Samples everything and renders the Prometheus text format.
    pub fn render(&self, ctx: &AgentCtx) -> String {
        {
            let mut sys = self.sys.lock().unwrap();
            if let Some(sys) = sys.as_mut() {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                self.cpu_utilization
                    .set(f64::from(sys.global_cpu_usage()) / 100.0);
                self.memory_total.set(sys.total_memory() as i64);
                self.memory_used.set(sys.used_memory() as i64);
            }
        }
        self.connected.set(i64::from(
            ctx.connected.load(std::sync::atomic::Ordering::Relaxed),
        ));
        {
            use std::sync::atomic::Ordering::Relaxed;
            let _one = self.images_sync.lock().unwrap();
            let c = &ctx.runtime.image_counters;
            let now = [&c.pulls, &c.cache_hits, &c.failures, &c.bytes].map(|a| a.load(Relaxed));
            for (counter, value) in self.images.iter().zip(now) {
                // The runtime's counts only grow: the counter follows them.
                counter.inc_by(value.saturating_sub(counter.get()));
            }
        }
        self.instances.reset();
        for phase in ["running", "stopping", "succeeded", "failed", "stopped"] {
            self.instances.with_label_values(&[phase]).set(0);
        }
        for report in ctx.runtime.snapshot() {
            let phase = format!("{:?}", report.phase).to_lowercase();
            self.instances.with_label_values(&[phase.as_str()]).inc();
        }
        for g in [
            &self.gpu_util,
            &self.fb_used,
            &self.fb_free,
            &self.gpu_temp,
            &self.power,
            &self.gpu_healthy,
            &self.xid,
            &self.mem_copy_util,
            &self.energy,
            &self.ecc_sbe,
            &self.ecc_dbe,
            &self.sm_clock,
            &self.mem_clock,
            &self.instance_cpu,
            &self.instance_memory,
        ] {
            g.reset();
        }
        for (instance, job, usage) in ctx.runtime.cgroup_usage() {
            let labels = [instance.as_str(), job.as_str()];
            self.instance_cpu
                .with_label_values(&labels)
                .set(usage.cpu_usec as f64 / 1e6);
            self.instance_memory
                .with_label_values(&labels)
                .set(usage.memory_bytes as f64);
        }
        let owners = ctx.runtime.gpu_owners();
        for gpu in crate::session::probe_gpus(ctx) {
            let index = gpu.index.to_string();
            let owner = owners.get(&gpu.uuid).cloned().unwrap_or_default();
            let device = format!("nvidia{}", gpu.minor_number);
            let labels = [
                index.as_str(),
                gpu.uuid.as_str(),
                device.as_str(),
                gpu.model.as_str(),
                ctx.host.hostname.as_str(),
                owner.pool.as_str(),
                owner.pool_name.as_str(),
                owner.job.as_str(),
                owner.tenant.as_str(),
            ];
            self.sm_clock
                .with_label_values(&labels)
                .set(f64::from(gpu.sm_clock_mhz));
            self.mem_clock
                .with_label_values(&labels)
                .set(f64::from(gpu.mem_clock_mhz));
            self.gpu_util
                .with_label_values(&labels)
                .set(f64::from(gpu.utilization_pct));
            self.fb_used
                .with_label_values(&labels)
                .set(gpu.memory_used_mib as f64);
            self.fb_free
                .with_label_values(&labels)
                .set(gpu.memory_total_mib.saturating_sub(gpu.memory_used_mib) as f64);
            self.gpu_temp
                .with_label_values(&labels)
                .set(f64::from(gpu.temperature_c));
            self.power
                .with_label_values(&labels)
                .set(f64::from(gpu.power_mw) / 1000.0);
            self.gpu_healthy
                .with_label_values(&labels)
                .set(if gpu.healthy { 1.0 } else { 0.0 });
            let xid = ctx.health.lock().unwrap().last_xid(&gpu.uuid);
            self.xid.with_label_values(&labels).set(xid as f64);
            self.mem_copy_util
                .with_label_values(&labels)
                .set(f64::from(gpu.memory_util_pct));
            self.energy
                .with_label_values(&labels)
                .set(gpu.energy_mj as f64);
            self.ecc_sbe
                .with_label_values(&labels)
                .set(gpu.ecc_corrected as f64);
            self.ecc_dbe
                .with_label_values(&labels)
                .set(gpu.ecc_uncorrected as f64);
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<AgentCtx>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::new(AgentMetrics::new());
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            let ctx = ctx.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || metrics.render(&ctx))
                    .await
                    .unwrap_or_default();
                (
                    [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                    body,
                )
            }
        }),
    );
    // Nagle off: a scrape's reply is small and would wait for the delayed
    // ACK.
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|s| {
        if let Err(err) = s.set_nodelay(true) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY on a metrics connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
