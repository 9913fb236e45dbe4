//! Scheduler configuration (TOML). Every field is documented here and in
//! `systemd/scheduler.toml`; unknown fields are rejected and errors name the
//! file and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gpupool_common::config::{load_toml, parse_toml};
use serde::Deserialize;

use crate::domain::JobKind;
use crate::domain::billing::SpecPrice;
use crate::domain::job::KindTable;

pub use gpupool_common::config::ConfigError;

/// `/etc/gpupool/scheduler.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// gRPC listen address (agents, CLI, any gRPC client).
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    /// Prometheus `/metrics` listen address; omit to disable.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The web console's listen address (HTTP, or HTTPS with `[tls]`);
    /// omit to disable. `gpupool-scheduler dev` serves it on
    /// 127.0.0.1:7080 by default.
    #[serde(default)]
    pub console_listen: Option<SocketAddr>,
    /// Host names the console answers to besides its IP addresses and
    /// `localhost` (the name in its URL behind DNS); requests for any
    /// other name are refused, so a DNS-rebinding page cannot reach it.
    #[serde(default)]
    pub console_hosts: Vec<String>,
    /// Directory of the SQLite database `gpupool.db`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// PostgreSQL instead of SQLite: `postgres://user:password@host:5432/db`.
    /// Several scheduler replicas may share it; one leads (a lease in the
    /// database), the others stand by and take over when it dies.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The address clients and agents reach this replica at, told to them
    /// by standbys. Default: `http://` + the bound `grpc_listen` address.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// Heartbeat interval asked of agents, in milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u32,
    /// A node without a heartbeat for this long becomes NotReady and its
    /// instances Lost, in milliseconds. Must exceed the heartbeat interval.
    #[serde(default = "default_grace_ms")]
    pub node_grace_ms: u32,
    /// SIGTERM -> SIGKILL grace when stopping instances, in milliseconds.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u32,
    /// A job runs at least this long before a higher-class job may preempt
    /// it, in seconds (no thrashing).
    #[serde(default = "default_preemption_min_runtime_secs")]
    pub preemption_min_runtime_secs: u64,
    /// The public pool's fair share adds each tenant's recent share, its
    /// use averaged with weights halving every this many seconds (Slurm's
    /// `PriorityDecayHalfLife`); 0: only what is held now counts.
    #[serde(default = "default_fair_share_half_life_secs")]
    pub fair_share_half_life_secs: u64,
    /// In the public pool, a job whose tenant is under its fair share may
    /// also preempt another tenant's training jobs of its own class (not
    /// only lower classes), while that tenant keeps at least its share.
    #[serde(default)]
    pub fair_share_preemption: bool,
    /// Cluster join token: a node without a credential of its own enrols
    /// with it (and is then issued one, bound to its node id). Required when
    /// `grpc_listen` reaches beyond loopback, unless agents must present a
    /// client certificate (`tls.require_agent_client_cert`).
    #[serde(default)]
    pub join_token: Option<String>,
    /// The key notebook tokens are derived from (hex, 32 bytes or more;
    /// neither key nor tokens are stored in the database). Default
    /// `DATA_DIR/secret.key`, made (0600) at the first start. Replicas
    /// sharing PostgreSQL must all point at the same key.
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// Token of the admin tenant (creates tenants, sees everything). Omit
    /// to run without authentication: every caller is then the admin
    /// (development only; `gpupool-scheduler dev` does this).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Regions where deploy pools may be bought by subscription
    /// (R-CREATE-11); pools name their region at creation.
    #[serde(default)]
    pub subscription_regions: Vec<String>,
    /// Prices and billing behaviour.
    #[serde(default)]
    pub billing: BillingConfig,
    /// Request size and rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The audit trail: how long it is kept, and a JSON lines copy.
    #[serde(default)]
    pub audit: AuditConfig,
    /// TLS for gRPC (omit for plaintext).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Per-kind defaults and limits: `[kinds.notebook]`, `[kinds.training]`,
    /// `[kinds.tensorboard]`, `[kinds.online_service]`,
    /// `[kinds.batch_service]`. Fields left out keep the built-in values
    /// (`gpupool job kinds` shows the result).
    #[serde(default)]
    pub kinds: std::collections::BTreeMap<String, KindConfig>,
    /// Instance networks: each tenant's own across its dedicated pools'
    /// nodes, each public-pool job's own (VXLAN between the agents). Off:
    /// instances use the host's network, as before.
    #[serde(default)]
    pub networks: NetworksConfig,
}

/// `[networks]`: the address plan the scheduler hands out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworksConfig {
    /// Give instances their network (agents must run as root).
    #[serde(default)]
    pub enabled: bool,
    /// The range every network's subnet comes from. It must not overlap
    /// the nodes' own networks.
    #[serde(default = "default_networks_cidr")]
    pub cidr: String,
    /// Prefix length of one network's subnet (22: 1,021 instances each,
    /// 1,024 networks in the default /12).
    #[serde(default = "default_networks_subnet_prefix_len")]
    pub subnet_prefix_len: u8,
    /// How a network crosses nodes: `"overlay"` (the default: a VXLAN per
    /// network, the nodes need only reach each other over IPv4) or
    /// `"routed"` (no encapsulation: each node routes to the network's
    /// instances on the others and answers ARP for them; the nodes must
    /// share one layer-2 segment, as with flannel's `host-gw`; faster,
    /// see BENCHMARKS.md).
    #[serde(default)]
    pub mode: NetworkMode,
    /// Custom networks' subnets by id (R-CREATE-14): a pool naming one
    /// puts its instances on the operator's segment of that VPC.
    #[serde(default)]
    pub subnets: std::collections::BTreeMap<String, SubnetConfig>,
    /// Security groups by id: what a custom network's instances may
    /// receive (`ingress`) and send (`egress`); nothing else passes.
    #[serde(default)]
    pub security_groups: std::collections::BTreeMap<String, SecurityGroupConfig>,
}

/// `[networks] mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Overlay,
    Routed,
}

/// `[networks.subnets.ID]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    /// The VPC it belongs to (agents map VPC ids to a node-side bridge).
    pub vpc: String,
    /// The subnet, e.g. `192.168.50.0/24`.
    pub cidr: String,
    /// Its router, the instances' default route (none when absent).
    #[serde(default)]
    pub gateway: String,
    /// The addresses gpupool may hand out, inclusive (keep them out of
    /// the VPC's own DHCP range).
    pub first: String,
    pub last: String,
    /// The tenants whose pools may use it (`"*"`: every tenant); none by
    /// default.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// `[networks.security_groups.ID]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupConfig {
    #[serde(default)]
    pub ingress: Vec<SecurityRuleConfig>,
    #[serde(default)]
    pub egress: Vec<SecurityRuleConfig>,
    /// The tenants whose pools may use it (`"*"`: every tenant); none by
    /// default.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// `{ protocol = "tcp", ports = "8000-8100", cidr = "10.0.0.0/8" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityRuleConfig {
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    /// `PORT` or `FIRST-LAST`; empty: all.
    #[serde(default)]
    pub ports: String,
    /// Where from (ingress) or to (egress).
    pub cidr: String,
}

impl Default for NetworksConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cidr: default_networks_cidr(),
            subnet_prefix_len: default_networks_subnet_prefix_len(),
            mode: NetworkMode::Overlay,
            subnets: Default::default(),
            security_groups: Default::default(),
        }
    }
}

impl NetworksConfig {
    /// The plan, when enabled; an error names what is wrong.
    pub fn plan(&self) -> Result<Option<crate::domain::network::Plan>, String> {
        if !self.enabled {
            return Ok(None);
        }
        crate::domain::network::Plan::new(&self.cidr, self.subnet_prefix_len)
            .map(|p| Some(p.routed(self.mode == NetworkMode::Routed)))
            .map_err(|e| e.to_string())
    }
}

impl NetworksConfig {
    /// The custom subnets and security groups, checked; an error names the
    /// entry and what is wrong.
    pub fn custom(&self) -> Result<crate::domain::network::Custom, String> {
        use crate::domain::network::{Custom, CustomSubnet, SgRule, parse_cidr};
        use std::net::Ipv4Addr;
        let mut out = Custom::default();
        for (id, s) in &self.subnets {
            let at = |e: String| format!("networks.subnets.{id}: {e}");
            let (base, len) = parse_cidr(&s.cidr).map_err(at)?;
            let size = if len == 0 {
                u32::MAX
            } else {
                (1u32 << (32 - len)) - 1
            };
            let inside = |field: &str, v: &str| -> Result<u32, String> {
                let a: Ipv4Addr = v
                    .parse()
                    .map_err(|_| at(format!("{field} {v:?} is not an IPv4 address")))?;
                let a = u32::from(a);
                if a.wrapping_sub(base) > size {
                    return Err(at(format!("{field} {v} is outside {}", s.cidr)));
                }
                Ok(a)
            };
            let (first, last) = (inside("first", &s.first)?, inside("last", &s.last)?);
            if last < first {
                return Err(at(format!("last {} is before first {}", s.last, s.first)));
            }
            if !s.gateway.is_empty() {
                inside("gateway", &s.gateway)?;
            }
            if s.vpc.trim().is_empty() {
                return Err(at("vpc must be given".into()));
            }
            let overlaps = |(b, l): (u32, u8)| {
                let m = crate::domain::network::mask(len.min(l));
                b & m == base & m
            };
            if self.enabled
                && let Ok(range) = parse_cidr(&self.cidr)
                && overlaps(range)
            {
                return Err(at(format!(
                    "{} overlaps networks.cidr {}",
                    s.cidr, self.cidr
                )));
            }
            if let Some((other, _)) = out
                .subnets
                .iter()
                .find(|(_, o)| parse_cidr(&o.cidr).is_ok_and(overlaps))
            {
                return Err(at(format!("{} overlaps networks.subnets.{other}", s.cidr)));
            }
            out.subnets.insert(
                id.clone(),
                CustomSubnet {
                    vpc: s.vpc.clone(),
                    cidr: s.cidr.trim().to_string(),
                    gateway: s.gateway.clone(),
                    first,
                    last,
                    tenants: s.tenants.clone(),
                },
            );
        }
        for (id, g) in &self.security_groups {
            let mut rules = Vec::new();
            for (ingress, list) in [(true, &g.ingress), (false, &g.egress)] {
                for (k, r) in list.iter().enumerate() {
                    let dir = if ingress { "ingress" } else { "egress" };
                    rules.push(
                        SgRule::parse(ingress, &r.protocol, &r.ports, &r.cidr).map_err(|e| {
                            format!("networks.security_groups.{id}.{dir}[{k}]: {e}")
                        })?,
                    );
                }
            }
            out.groups.insert(id.clone(), rules);
            out.group_tenants.insert(id.clone(), g.tenants.clone());
        }
        Ok(out)
    }
}

fn default_networks_cidr() -> String {
    "10.144.0.0/12".into()
}

fn default_networks_subnet_prefix_len() -> u8 {
    22
}

/// `[tls]`: the scheduler's certificate, and mutual TLS for agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM) clients verify.
    pub cert_file: PathBuf,
    /// Its private key (PEM). Never logged.
    pub key_file: PathBuf,
    /// CA whose client certificates are accepted (mutual TLS); clients
    /// without a certificate may still connect unless required below.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Agent RPCs need a client certificate signed by `client_ca_file`.
    #[serde(default)]
    pub require_agent_client_cert: bool,
}

/// `[limits]`: what one request and one caller may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request message of the client API, in bytes (agents' session
    /// messages may be 4 times this). Larger: `OUT_OF_RANGE`.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Requests per second each caller (a tenant token, the admin, a node's
    /// credential, or the join token: all its holders together) may make,
    /// sustained; 0 = unlimited. Past it: `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_rate")]
    pub requests_per_second: u32,
    /// Requests a caller may make at once after being idle.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Most `max_retries` a job may ask (runs after the first).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Wait before a failed run is retried, doubled per retry, in ms.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// The longest wait between retries, in ms.
    #[serde(default = "default_retry_backoff_max_ms")]
    pub retry_backoff_max_ms: u64,
    /// Finished jobs are forgotten this many hours after they ended (their
    /// ledger rows stay); 0 = kept forever.
    #[serde(default = "default_finished_job_retention_hours")]
    pub finished_job_retention_hours: u32,
    /// Most log streams (`job logs --follow` and plain reads) one caller
    /// may have open at once; past it `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_log_streams_per_caller")]
    pub log_streams_per_caller: u32,
    /// Most log reads waiting for agents' answers, all callers together.
    #[serde(default = "default_pending_log_reads")]
    pub pending_log_reads: u32,
    /// Most items one list call answers (a larger page_size is cut to it).
    #[serde(default = "default_max_page_size")]
    pub max_page_size: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: default_max_request_bytes(),
            requests_per_second: default_rate(),
            burst: default_burst(),
            max_retries: default_max_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            retry_backoff_max_ms: default_retry_backoff_max_ms(),
            finished_job_retention_hours: default_finished_job_retention_hours(),
            log_streams_per_caller: default_log_streams_per_caller(),
            pending_log_reads: default_pending_log_reads(),
            max_page_size: default_max_page_size(),
        }
    }
}

fn default_max_retries() -> u32 {
    10
}
fn default_retry_backoff_ms() -> u64 {
    1_000
}
fn default_retry_backoff_max_ms() -> u64 {
    300_000
}
fn default_finished_job_retention_hours() -> u32 {
    24 * 30
}
fn default_log_streams_per_caller() -> u32 {
    32
}
fn default_pending_log_reads() -> u32 {
    1024
}
fn default_max_page_size() -> u32 {
    1000
}

fn default_max_request_bytes() -> usize {
    4 << 20
}
fn default_rate() -> u32 {
    200
}
fn default_burst() -> u32 {
    400
}

/// `[kinds.<kind>]`: overrides of one kind's built-in settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// Command run when a job gives none; `{port}`, `{token}` and
    /// `{log_dir}` are replaced by the agent.
    pub command: Option<Vec<String>>,
    /// Default whole GPUs per instance.
    pub gpus: Option<u32>,
    /// Default GPU fraction per instance, in thousandths.
    pub gpu_milli: Option<u32>,
    pub cpu_milli: Option<u64>,
    pub memory_mib: Option<u64>,
    /// Maximum run time of jobs that set none; 0 = unlimited.
    pub max_runtime_secs: Option<u64>,
    /// Longest maximum run time a job may ask; 0 = no limit.
    pub max_runtime_limit_secs: Option<u64>,
    /// Notebooks and TensorBoards: stopped after this long idle; 0 = never.
    pub idle_timeout_secs: Option<u64>,
    /// Notebooks: GPU utilization (%) that counts as activity.
    pub idle_gpu_util_pct: Option<u32>,
    /// Image jobs of this kind run in when they name none.
    pub image: Option<String>,
}

/// `[billing]`: the price catalog. Money is integer micro-units of
/// `currency` (1 unit = 1,000,000 micros).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// Currency code shown on bills.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Prices for specs not listed under `[billing.prices]`.
    #[serde(default)]
    pub default_price: SpecPrice,
    /// Prices per spec name (`gpupool spec list`).
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, SpecPrice>,
    /// How long a frozen pool (subscription lapsed, neither auto-renew nor
    /// convert-at-expiry) is kept before it is released, in hours.
    #[serde(default = "default_retention_hours")]
    pub frozen_retention_hours: u32,
}

impl BillingConfig {
    /// The price of `spec`: its `[billing.prices]` entry, else the default.
    pub fn price_of(&self, spec: &str) -> crate::domain::billing::SpecPrice {
        self.prices.get(spec).copied().unwrap_or(self.default_price)
    }
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            currency: default_currency(),
            default_price: SpecPrice::default(),
            prices: Default::default(),
            frozen_retention_hours: default_retention_hours(),
        }
    }
}

fn default_currency() -> String {
    "USD".into()
}
fn default_retention_hours() -> u32 {
    168
}

fn default_grpc_listen() -> SocketAddr {
    "127.0.0.1:7070".parse().expect("valid address")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/gpupool/scheduler")
}
fn default_heartbeat_ms() -> u32 {
    1_000
}
fn default_grace_ms() -> u32 {
    15_000
}
fn default_stop_grace_ms() -> u32 {
    10_000
}
fn default_preemption_min_runtime_secs() -> u64 {
    120
}
fn default_fair_share_half_life_secs() -> u64 {
    3600
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            grpc_listen: default_grpc_listen(),
            metrics_listen: None,
            console_listen: None,
            console_hosts: Vec::new(),
            data_dir: default_data_dir(),
            database_url: None,
            advertise_url: None,
            heartbeat_interval_ms: default_heartbeat_ms(),
            node_grace_ms: default_grace_ms(),
            stop_grace_ms: default_stop_grace_ms(),
            preemption_min_runtime_secs: default_preemption_min_runtime_secs(),
            fair_share_half_life_secs: default_fair_share_half_life_secs(),
            fair_share_preemption: false,
            join_token: None,
            secret_key_file: None,
            admin_token: None,
            subscription_regions: Vec::new(),
            billing: BillingConfig::default(),
            kinds: Default::default(),
            limits: LimitsConfig::default(),
            audit: AuditConfig::default(),
            tls: None,
            networks: NetworksConfig::default(),
        }
    }
}

/// `[audit]`: the audit trail of every mutating call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Records older than this many days are deleted (checked once a
    /// minute); 0 = kept forever.
    #[serde(default = "default_audit_retention_days")]
    pub retention_days: u32,
    /// Also append each record, once committed, as one JSON line to this
    /// file (0600), for a log shipper. The database stays the record of
    /// truth: a line can be lost in a crash after the commit.
    #[serde(default)]
    pub jsonl_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: default_audit_retention_days(),
            jsonl_file: None,
        }
    }
}

fn default_audit_retention_days() -> u32 {
    365
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path, Self::check)
    }

    /// Parses and checks TOML text; errors name the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_toml(text, Self::check)
    }

    /// Cross-field checks.
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms < 100 {
            return Err("field `heartbeat_interval_ms` must be at least 100".into());
        }
        if self.node_grace_ms <= self.heartbeat_interval_ms {
            return Err(format!(
                "field `node_grace_ms` ({}) must be greater than `heartbeat_interval_ms` ({})",
                self.node_grace_ms, self.heartbeat_interval_ms
            ));
        }
        if self
            .join_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err("field `join_token` must not be empty when set".into());
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().len() < 16)
        {
            return Err("field `admin_token` must be at least 16 characters".into());
        }
        self.kind_table()?;
        self.networks.plan()?;
        self.networks.custom()?;
        if let Some(tls) = &self.tls
            && tls.require_agent_client_cert
            && tls.client_ca_file.is_none()
        {
            return Err("field `tls.require_agent_client_cert` needs `tls.client_ca_file`".into());
        }
        if self.limits.max_request_bytes < 1024 {
            return Err("field `limits.max_request_bytes` must be at least 1024".into());
        }
        Ok(())
    }

    /// What `serve` checks on top of [`SchedulerConfig::check`]: no
    /// placeholder secret of the example config, and beyond loopback no
    /// listener without agent and caller authentication.
    pub fn check_serving(&self) -> Result<(), String> {
        for (field, value) in [
            ("admin_token", &self.admin_token),
            ("join_token", &self.join_token),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| v.to_ascii_lowercase().contains("change-me"))
            {
                return Err(format!(
                    "field `{field}` is still the example's placeholder: set a long random value \
                     (e.g. `openssl rand -hex 32`)"
                ));
            }
        }
        let agents_need_cert = self
            .tls
            .as_ref()
            .is_some_and(|t| t.require_agent_client_cert);
        if self.join_token.is_none() && !agents_need_cert {
            if !self.grpc_listen.ip().is_loopback() {
                return Err(format!(
                    "field `grpc_listen` ({}) reaches beyond loopback, but agents would enrol \
                     without authentication: set `join_token` (or require agent client \
                     certificates with `tls.require_agent_client_cert`)",
                    self.grpc_listen
                ));
            }
            if self.admin_token.is_some() {
                // Callers are authenticated, so nodes must be too: else a
                // job on this host could enrol a node and receive others' work.
                return Err(
                    "field `admin_token` is set but `join_token` is not: without it any local \
                     process could enrol a node; set `join_token`"
                        .into(),
                );
            }
        }
        if let Some(console) = self.console_listen
            && !console.ip().is_loopback()
            && self.admin_token.is_none()
        {
            return Err(format!(
                "field `console_listen` ({console}) reaches beyond loopback, but without \
                 `admin_token` every browser is the admin: set `admin_token`"
            ));
        }
        if let Some(console) = self.console_listen
            && !console.ip().is_loopback()
            && self.tls.is_none()
        {
            return Err(format!(
                "field `console_listen` ({console}) reaches beyond loopback without `[tls]`: \
                 tokens would cross the network in clear; set `[tls]` or listen on loopback"
            ));
        }
        if !self.grpc_listen.ip().is_loopback() {
            if self.admin_token.is_none() {
                return Err(format!(
                    "field `grpc_listen` ({}) reaches beyond loopback, but without `admin_token` \
                     every caller is the admin: set `admin_token`",
                    self.grpc_listen
                ));
            }
        }
        Ok(())
    }

    /// The built-in kind settings with the config's overrides applied.
    pub fn kind_table(&self) -> Result<KindTable, String> {
        let mut table = KindTable::default();
        for (name, c) in &self.kinds {
            let kind = JobKind::from_name(name).ok_or_else(|| {
                format!(
                    "unknown kind `kinds.{name}`: expected one of {}",
                    JobKind::ALL.map(JobKind::name).join(", ")
                )
            })?;
            let k = table.get_mut(kind);
            if let Some(v) = &c.command {
                k.command = v.clone();
            }
            if let Some(image) = &c.image {
                if !image.is_empty() {
                    crate::domain::job::check_image_reference(image)
                        .map_err(|e| format!("`kinds.{name}.image`: {e}"))?;
                }
                k.image = image.clone();
            }
            macro_rules! set {
                ($($f:ident),*) => { $(if let Some(v) = c.$f { k.$f = v; })* };
            }
            set!(
                gpus,
                gpu_milli,
                cpu_milli,
                memory_mib,
                max_runtime_secs,
                max_runtime_limit_secs,
                idle_timeout_secs,
                idle_gpu_util_pct
            );
            if k.gpus > 0 && k.gpu_milli > 0 || k.gpu_milli >= 1000 {
                return Err(format!(
                    "`kinds.{name}`: give gpus or gpu_milli (1..999), not both"
                ));
            }
            if k.idle_gpu_util_pct > 100 {
                return Err(format!("`kinds.{name}.idle_gpu_util_pct` must be 0..100"));
            }
            if k.max_runtime_limit_secs > 0 && k.max_runtime_secs > k.max_runtime_limit_secs {
                return Err(format!(
                    "`kinds.{name}.max_runtime_secs` exceeds its `max_runtime_limit_secs`"
                ));
            }
        }
        Ok(table)
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("gpupool.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c = SchedulerConfig::parse("").unwrap();
        assert_eq!(c.grpc_listen.port(), 7070);
        assert_eq!(c.node_grace_ms, 15_000);
    }

    const CUSTOM: &str = "[networks]\nenabled = true\n\
        [networks.subnets.s1]\nvpc = \"v1\"\ncidr = \"192.168.5.0/24\"\n\
        first = \"192.168.5.100\"\nlast = \"192.168.5.101\"\ntenants = [\"acme\"]\n\
        [networks.security_groups.web]\ntenants = [\"*\"]\n\
        ingress = [{ protocol = \"tcp\", ports = \"80\", cidr = \"0.0.0.0/0\" }]\n\
        [networks.security_groups.db]\ntenants = [\"beta\"]\n";

    #[test]
    fn networks_mode_is_overlay_unless_routed_is_asked_and_nothing_else_is_taken() {
        let plan = |text: &str| SchedulerConfig::parse(text).map(|c| c.networks.plan());
        let on = "[networks]\nenabled = true\n";
        assert!(!plan(on).unwrap().unwrap().unwrap().is_routed);
        let routed = format!("{on}mode = \"routed\"\n");
        assert!(plan(&routed).unwrap().unwrap().unwrap().is_routed);
        let err = plan(&format!("{on}mode = \"vxlan\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlay") && err.contains("routed"), "{err}");
    }

    #[test]
    fn r_create_14_custom_subnets_and_security_groups_are_checked() {
        let custom = SchedulerConfig::parse(CUSTOM)
            .unwrap()
            .networks
            .custom()
            .unwrap();
        assert_eq!(custom.groups["web"][0].ports, (80, 80));
        let no = |tenant: &str, ids: (&str, &str, &[&str])| {
            let groups: Vec<String> = ids.2.iter().map(|g| g.to_string()).collect();
            custom.check(tenant, ids.0, ids.1, &groups).unwrap_err()
        };
        let err = no("acme", ("v1", "s9", &["web", "nope"]));
        assert!(
            err.contains("subnet \"s9\"") && err.contains("security group \"nope\""),
            "{err}"
        );
        assert!(no("acme", ("v2", "s1", &[])).contains("in VPC \"v1\""));
        assert!(custom.check("acme", "v1", "s1", &["web".into()]).is_ok());
        // Open to its tenants only: another's reads as unknown.
        let err = no("beta", ("v1", "s1", &["web"]));
        assert!(
            err.contains("subnet \"s1\"") && !err.contains("VPC"),
            "{err}"
        );
        let err = no("acme", ("v1", "s1", &["db"]));
        assert!(err.contains("security group \"db\""), "{err}");
        // Two addresses: the third instance waits for one.
        let two = custom.allocate("s1", &["web".into()], 2, []).unwrap();
        assert_eq!(two[1].address, "192.168.5.101");
        assert_eq!(two[0].rules.len(), 1);
        assert!(custom.allocate("s1", &[], 1, &two).is_err());
        for (bad, what) in [
            ("last = \"192.168.5.101\"", "last = \"192.168.6.1\""),
            ("cidr = \"192.168.5.0/24\"", "cidr = \"192.168.5.1/24\""),
            ("ports = \"80\"", "ports = \"80-70\""),
            ("protocol = \"tcp\"", "protocol = \"sctp\""),
            ("cidr = \"0.0.0.0/0\"", "cidr = \"0.0.0.0/+0\""),
            (
                "tenants = [\"beta\"]\n",
                "tenants = [\"beta\"]\n[networks.subnets.s2]\nvpc = \"v1\"\n\
                 cidr = \"192.168.0.0/16\"\nfirst = \"192.168.9.1\"\nlast = \"192.168.9.2\"\n",
            ),
            ("cidr = \"192.168.5.0/24\"", "cidr = \"10.144.5.0/24\""),
        ] {
            let text = CUSTOM.replace(bad, what);
            let err = SchedulerConfig::parse(&text).unwrap_err();
            assert!(err.contains("networks."), "{what}: {err}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("grpc_listen = \"nonsense\"", "grpc_listen"),
            ("node_grace_ms = -1", "node_grace_ms"),
            ("no_such_field = 1", "no_such_field"),
            (
                "node_grace_ms = 500\nheartbeat_interval_ms = 1000",
                "node_grace_ms",
            ),
            ("join_token = \" \"", "join_token"),
            ("[kinds.notbook]\nidle_timeout_secs = 5", "kinds.notbook"),
            ("[kinds.notebook]\nidle_secs = 5", "idle_secs"),
            (
                "[kinds.notebook]\ngpus = 1\ngpu_milli = 5",
                "kinds.notebook",
            ),
        ] {
            let err = SchedulerConfig::parse(text).unwrap_err();
            assert!(err.contains(field), "{text:?}: {err}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "metrics_listen = 12").unwrap();
        let err = SchedulerConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.toml") && err.contains("metrics_listen"),
            "{err}"
        );
    }

    #[test]
    fn shipped_example_parses_but_does_not_serve_with_its_placeholders() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/scheduler.toml");
        let mut c = SchedulerConfig::load(&path).unwrap();
        let err = c.check_serving().unwrap_err();
        assert!(
            err.contains("admin_token") && err.contains("placeholder"),
            "{err}"
        );
        c.admin_token = Some("a-long-random-admin-token".into());
        let err = c.check_serving().unwrap_err();
        assert!(
            err.contains("join_token") && err.contains("placeholder"),
            "{err}"
        );
        c.join_token = Some("a-long-random-join-token".into());
        c.check_serving().unwrap();
    }

    #[test]
    fn beyond_loopback_needs_agent_and_caller_authentication() {
        let mut c = SchedulerConfig::parse("grpc_listen = \"0.0.0.0:7070\"").unwrap();
        let err = c.check_serving().unwrap_err();
        assert!(
            err.contains("join_token") && err.contains("loopback"),
            "{err}"
        );
        c.join_token = Some("join-join-join-join".into());
        let err = c.check_serving().unwrap_err();
        assert!(err.contains("admin_token"), "{err}");
        c.admin_token = Some("admin-admin-admin-admin".into());
        c.check_serving().unwrap();
        // Loopback may run open (no tokens at all), but callers
        // authenticated and agents not is refused.
        SchedulerConfig::parse("").unwrap().check_serving().unwrap();
        let err = SchedulerConfig::parse("admin_token = \"admin-admin-admin-admin\"")
            .unwrap()
            .check_serving()
            .unwrap_err();
        assert!(err.contains("join_token"), "{err}");
    }
}
