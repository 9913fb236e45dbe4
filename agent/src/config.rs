//! Agent configuration (TOML). Every field is documented here and in
//! `systemd/agent.toml`; unknown fields are rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gpupool_common::config::{load_toml, parse_toml};
use serde::Deserialize;

pub use gpupool_common::config::ConfigError;

/// `/etc/gpupool/agent.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Scheduler gRPC address, e.g. `http://10.0.0.1:7070`; replicas
    /// sharing a PostgreSQL database comma-separated (the agent follows the
    /// leader).
    pub scheduler_addr: String,
    /// Stable node id. Default: the contents of `/etc/machine-id`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Directory for instance logs and working directories.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where to serve Prometheus `/metrics`; omit to disable.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Simulated GPUs instead of NVML, e.g. `8xH100-80GB`.
    #[serde(default)]
    pub fake_gpus: Option<String>,
    /// Availability-zone label reported to the scheduler (`AZ1`..`AZ3`).
    #[serde(default)]
    pub az: String,
    /// Free-form labels reported with the inventory.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// TLS (with an `https://` scheduler address): the CA that signed the
    /// scheduler's certificate.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Mutual TLS: this node's client certificate and key (PEM).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Name to verify in the scheduler's certificate instead of the
    /// address's host.
    #[serde(default)]
    pub tls_domain: Option<String>,
    /// Cluster join token (the scheduler's `join_token`), sent as a bearer
    /// token to enrol; the node then holds its own credential.
    #[serde(default)]
    pub join_token: Option<String>,
    /// Longest wait between reconnect attempts, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Cgroup confinement of instances: `required` (refuse to start
    /// unconfined; the default on a node with real GPUs, where
    /// CUDA_VISIBLE_DEVICES alone is only advice), `best-effort` (the
    /// default otherwise: confine when cgroups are writable, else run
    /// unconfined with a warning) or `off`.
    #[serde(default)]
    pub confinement: Option<crate::runtime::Confinement>,
    /// Where the cgroup hierarchies are mounted.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    /// Most processes per instance (cgroup pids.max); 0 = unlimited.
    #[serde(default = "default_pids_max")]
    pub pids_max: u64,
    /// Run every tenant's instances as this one user. Default: a root agent
    /// runs each tenant as its own identity (`tenant_uid_base`), an
    /// unprivileged agent runs everything as itself.
    #[serde(default)]
    pub run_as_user: Option<String>,
    /// First host uid of the per-tenant id blocks (65536 ids each: a
    /// host-process job runs as the block's first id, a container's root is
    /// mapped onto it).
    #[serde(default = "default_tenant_uid_base")]
    pub tenant_uid_base: u32,
    /// Number of tenant id blocks.
    #[serde(default = "default_tenant_uid_slots")]
    pub tenant_uid_slots: u32,
    /// Fixed host uids of host-process jobs, by tenant name (shared file
    /// systems), e.g. `{ acme = 5000 }`.
    #[serde(default)]
    pub tenant_uids: std::collections::BTreeMap<String, u32>,
    /// Paths host-process jobs must not see, covered in their mount
    /// namespace (the state dir always is).
    #[serde(default = "default_hidden_paths")]
    pub hidden_paths: Vec<PathBuf>,
    /// OCI runtime for image jobs (`runc`, `crun`); default: the first of
    /// runc, crun found in PATH. Image jobs fail on a node without one.
    #[serde(default)]
    pub oci_runtime: Option<PathBuf>,
    /// Disk the unpacked images and their blobs may take, in MiB; the
    /// least recently used go first (never one a running instance uses).
    /// 0 = unlimited.
    #[serde(default = "default_image_cache_mib")]
    pub image_cache_mib: u64,
    /// `if-not-present` (default: a tag pulled before is used without
    /// asking the registry) or `always` (resolve the tag at every start).
    #[serde(default)]
    pub image_pull_policy: crate::image::PullPolicy,
    /// Per-registry settings, by `host[:port]`: `insecure = true` for plain
    /// HTTP, `ca_file` for a self-signed certificate.
    #[serde(default)]
    pub registries: std::collections::BTreeMap<String, RegistryConfig>,
    /// Registry credentials, a docker-style `auth.json`.
    #[serde(default)]
    pub registry_auth_file: Option<PathBuf>,
    /// Where CDI specs of the GPUs are looked for (`nvidia-ctk cdi
    /// generate` writes them).
    #[serde(default = "default_cdi_dirs")]
    pub cdi_dirs: Vec<PathBuf>,
    /// CUDA MPS pipe directory of the node's MPS daemon; when set,
    /// fractional-GPU instances get CUDA_MPS_ACTIVE_THREAD_PERCENTAGE and
    /// CUDA_MPS_PINNED_DEVICE_MEM_LIMIT from their share.
    #[serde(default)]
    pub mps_pipe_dir: Option<PathBuf>,
    /// Address other nodes reach this one at (MASTER_ADDR of distributed
    /// training). Default: the hostname.
    #[serde(default)]
    pub advertise_address: Option<String>,
    /// Instance logs are rotated past this size, in bytes.
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// Rotated copies kept per instance (`.1` newest).
    #[serde(default = "default_log_keep")]
    pub log_keep: u32,
    /// Disk the instances' logs and agent-made working directories may take
    /// together, in MiB; past it the oldest ended instances' go first (a
    /// running instance's never). 0 = unlimited.
    #[serde(default = "default_disk_budget_mib")]
    pub disk_budget_mib: u64,
    /// GPUs are sampled (NVML read) at most this often; `/metrics` scrapes
    /// and heartbeats in between reuse the last sample.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// Ports given to notebooks, TensorBoards and services that ask for
    /// none, as `[first, last]`.
    #[serde(default = "default_port_range")]
    pub port_range: [u16; 2],
    /// Stop the running instances when the agent stops (`gpupool-scheduler
    /// dev` does). Off for nodes: restarting the agent leaves them running
    /// and reattaches.
    #[serde(default)]
    pub stop_instances_on_exit: bool,
    /// Instance networks on this node (the scheduler's `[networks]` turns
    /// them on).
    #[serde(default)]
    pub networks: NetworksConfig,
}

/// `[networks]` of the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworksConfig {
    /// Custom networks: the node's bridge on each VPC, by VPC id, e.g.
    /// `{ "vpc-1" = "br-vpc1" }` (a bridge the operator made, holding the
    /// node's link, VLAN or macvlan parent on that VPC).
    #[serde(default)]
    pub vpcs: std::collections::BTreeMap<String, String>,
    /// Ranges instances may not reach through the node, besides those
    /// always denied (link-local, i.e. cloud metadata, and the node's own
    /// subnet), e.g. `["10.0.0.0/8"]` for a management network.
    #[serde(default)]
    pub egress_deny: Vec<String>,
}

/// `[registries."host:port"]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// CA certificate (PEM) of a registry with a self-signed certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_tenant_uid_base() -> u32 {
    crate::identity::DEFAULT_BASE
}

fn default_tenant_uid_slots() -> u32 {
    crate::identity::DEFAULT_SLOTS
}

fn default_hidden_paths() -> Vec<PathBuf> {
    vec![PathBuf::from("/etc/gpupool")]
}

fn default_image_cache_mib() -> u64 {
    20 * 1024
}

fn default_cdi_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")]
}

fn default_port_range() -> [u16; 2] {
    let (first, last) = crate::runtime::DEFAULT_PORT_RANGE;
    [first, last]
}

fn default_sample_interval_ms() -> u64 {
    1000
}

fn default_log_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_log_keep() -> u32 {
    3
}

fn default_disk_budget_mib() -> u64 {
    10 * 1024
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}

fn default_pids_max() -> u64 {
    4096
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/gpupool/agent")
}

fn default_max_backoff_ms() -> u64 {
    10_000
}

impl AgentConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path, Self::check)
    }

    /// Parses TOML text; the error text names the offending field.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_toml(text, Self::check)
    }

    fn check(&self) -> Result<(), String> {
        if self.scheduler_addrs().is_empty() {
            return Err("field `scheduler_addr` must name at least one address".into());
        }
        let [first, last] = self.port_range;
        if first == 0 || first > last {
            return Err(format!(
                "field `port_range` must be [first, last] with 0 < first <= last (got [{first}, {last}])"
            ));
        }
        if let Some(bad) = self
            .networks
            .egress_deny
            .iter()
            .find(|c| !crate::network::is_cidr(c.trim()))
        {
            return Err(format!(
                "field `networks.egress_deny`: {bad:?} is not an IPv4 CIDR like 10.0.0.0/8"
            ));
        }
        if let Some((vpc, br)) = self
            .networks
            .vpcs
            .iter()
            .find(|(_, br)| !crate::network::is_ifname(br))
        {
            return Err(format!(
                "field `networks.vpcs`: {vpc:?} = {br:?} is not an interface name"
            ));
        }
        Ok(())
    }

    /// The scheduler replicas of `scheduler_addr` (comma-separated).
    pub fn scheduler_addrs(&self) -> Vec<String> {
        self.scheduler_addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect()
    }

    /// The node id: configured, else `/etc/machine-id`, else the hostname.
    pub fn resolved_node_id(&self, hostname: &str) -> String {
        if let Some(id) = self.node_id.as_ref().filter(|s| !s.trim().is_empty()) {
            return id.trim().to_string();
        }
        std::fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| hostname.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_settings_are_checked() {
        let base = "scheduler_addr = \"127.0.0.1:7070\"\n[networks]\n";
        assert!(AgentConfig::parse(&format!("{base}egress_deny = [\"10.0.0.0/8\"]")).is_ok());
        for bad in [
            "egress_deny = [\"10.0.0.0/+8\"]",
            "egress_deny = [\"10.0.0.0/8 accept\"]",
            "vpcs = { v = \"br0 accept\" }",
        ] {
            let err = AgentConfig::parse(&format!("{base}{bad}")).unwrap_err();
            assert!(err.contains("networks."), "{bad}: {err}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::parse("scheduler_addr = \"http://127.0.0.1:7070\"").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/gpupool/agent"));
        assert!(c.metrics_listen.is_none());
        assert_eq!(c.max_backoff_ms, 10_000);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = AgentConfig::parse("scheduler_addr = \"x\"\nbogus = 1").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn wrong_type_names_field() {
        let err = AgentConfig::parse("scheduler_addr = \"x\"\nmetrics_listen = 5").unwrap_err();
        assert!(err.contains("metrics_listen"), "{err}");
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml");
        AgentConfig::load(&path).unwrap();
    }
}
