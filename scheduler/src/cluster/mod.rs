//! The scheduler's state machine: nodes, jobs and instances in memory,
//! written through to the [`Store`] on every change. Every operation takes
//! `now_ms` and appends what the agents must be told to an outbox; the gRPC
//! layer delivers it. No tonic or tokio here.
//!
//! Submodules: `pools` (dedicated pools, scaling, specs), `billing` (the
//! ledger, orders, subscriptions), `kinds` (replicas, completions, time
//! limits, culling), `drain` (emptying a node for maintenance), `staged`
//! (the store writes of one operation, committed together), `error`
//! ([`ClusterError`]). The scheduling pass itself is
//! [`crate::domain::scheduling::plan`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

mod billing;
mod capacity;
mod drain;
mod error;
mod kinds;
mod networks;
mod pools;
mod preempt;
mod shapes;
mod share;
mod staged;
pub use capacity::{NODES_SHOWN, PoolStranded};
pub use staged::Staged;

use crate::domain::job::{HealthCheck, KindTable, PendingRank, PriorityClass};
use crate::domain::placement::{self, GpuSlot, NodeCapacity};
use crate::domain::pool::Pool;
use crate::domain::scheduling;
use crate::domain::tenant::{Caller, Tenant};
use crate::domain::{
    AgentIdentity, Instance, InstanceState, Inventory, Job, JobKind, JobState, Node, NodeStatus,
    PUBLIC_POOL, Resources, SpecError, StopCause, job::RawJobSpec,
};
use crate::store::{Record, Store, StoreError};

pub use error::ClusterError;
pub use pools::{PoolRef, SpecInfo};

/// Hex digits of a token's SHA-256 that name it (for revocation).
pub const TOKEN_ID_LEN: usize = 12;

/// What an agent must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    Start(Box<StartSpec>),
    Stop {
        instance_id: String,
        grace_ms: u32,
        reason: String,
    },
    Forget {
        instance_id: String,
    },
    /// The nodes a network spans changed: the agent's VXLAN floods to these
    /// (a routed network's instances changed: the routes to them).
    NetworkPeers {
        vni: u32,
        peers: Vec<String>,
        routes: BTreeMap<String, String>,
    },
    /// A job's instances changed: a running one's new hosts file.
    NetworkHosts {
        instance_id: String,
        hosts: BTreeMap<String, String>,
    },
}

/// Everything the agent needs to start one instance. Its `Debug` names the
/// environment's keys only: values (secrets, tokens) never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct StartSpec {
    pub instance_id: String,
    pub job_id: String,
    pub kind: JobKind,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub gpu_indexes: Vec<u32>,
    pub gpu_uuids: Vec<String>,
    pub resources: Resources,
    pub rank: u32,
    pub world_size: u32,
    /// Pool metadata for the instance (network settings, R-CREATE-14).
    pub metadata: BTreeMap<String, String>,
    /// The agent gives the instance a port (exported as `PORT`): this one,
    /// or (0) a free one from its range.
    pub needs_port: bool,
    pub port: u32,
    /// Readiness check the agent runs (online services).
    pub health_check: Option<HealthCheck>,
    /// The agent reports user activity (notebooks, TensorBoards).
    pub watch_activity: bool,
    /// OCI image to run in (empty: a host process) and its network.
    pub image: String,
    pub network: String,
    /// Its network attachment (networks on, and the job has one).
    pub attach: Option<crate::domain::network::Attach>,
}

impl std::fmt::Debug for StartSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartSpec")
            .field("instance_id", &self.instance_id)
            .field("job_id", &self.job_id)
            .field("kind", &self.kind)
            .field("command", &self.command.first())
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("gpu_indexes", &self.gpu_indexes)
            .field("resources", &self.resources)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

/// Commands for agents, by node id, in order.
pub type Outbox = Vec<(String, AgentCommand)>;

/// An instance's state as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedInstance {
    pub instance_id: String,
    pub state: InstanceState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    /// The port the agent gave it (0 = none).
    pub port: u32,
    /// Passes its health check.
    pub ready: bool,
    /// Time since the agent last saw user activity, when it watches.
    pub idle_ms: Option<u64>,
    /// Image instances: the manifest digest the agent resolved.
    pub image_digest: String,
    /// Pulling its image: (bytes done, bytes in all).
    pub pull: Option<(u64, u64)>,
}

/// Bounds on what one job may cost the scheduler (`[limits]`).
#[derive(Debug, Clone)]
pub struct JobLimits {
    /// Most `max_retries` a job may ask.
    pub max_retries: u32,
    /// Wait before the first retry of a failed run; doubled per retry.
    pub retry_backoff_ms: u64,
    /// The longest wait between retries.
    pub retry_backoff_max_ms: u64,
    /// Finished jobs are forgotten this long after they ended (0: never).
    pub finished_job_retention_ms: i64,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_retries: 10,
            retry_backoff_ms: 1_000,
            retry_backoff_max_ms: 300_000,
            finished_job_retention_ms: 30 * 24 * 3_600_000,
        }
    }
}

impl JobLimits {
    /// The wait before retry number `retry` (1 = the first).
    pub fn backoff_ms(&self, retry: u32) -> i64 {
        let doublings = retry.saturating_sub(1).min(32);
        let wait = self
            .retry_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.retry_backoff_max_ms);
        wait.min(i64::MAX as u64) as i64
    }
}

/// The scheduler's secret key for notebook tokens (kept outside the store;
/// never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub Vec<u8>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A value that tells keys apart without revealing them (kept in the
    /// store, so a scheduler started with another key refuses to load).
    pub fn check(&self) -> String {
        self.mac(b"gpupool key check\0", b"")
    }

    fn mac(&self, domain: &[u8], message: &[u8]) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(domain);
        mac.update(message);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A notebook's access token: `nbt_` and the hex HMAC-SHA256 of its
    /// job id under this key. The store holds neither token nor key.
    pub fn notebook_token(&self, job_id: &str) -> String {
        format!(
            "nbt_{}",
            self.mac(b"gpupool notebook token\0", job_id.as_bytes())
        )
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Derives notebook tokens.
    pub token_key: SecretKey,
    /// Retries, their backoff, retention of finished jobs.
    pub limits: JobLimits,
    /// A node without a heartbeat for this long is NotReady.
    pub node_grace_ms: i64,
    /// SIGTERM -> SIGKILL grace when stopping instances.
    pub stop_grace_ms: u32,
    /// A job runs at least this long before it may be preempted.
    pub preemption_min_runtime_ms: i64,
    /// The half-life of the public pool's recent shares; 0: none kept.
    pub fair_share_half_life_ms: i64,
    /// A tenant under its share may preempt another's jobs of its class.
    pub fair_share_preemption: bool,
    /// Regions where deploy pools may be bought by subscription (R-CREATE-11).
    pub subscription_regions: Vec<String>,
    /// Currency of all amounts.
    pub currency: String,
    /// Price catalog by spec, and the price of unlisted specs.
    pub prices: BTreeMap<String, crate::domain::billing::SpecPrice>,
    pub default_price: crate::domain::billing::SpecPrice,
    /// How long a frozen pool is kept before it is released.
    pub frozen_retention_ms: i64,
    /// Per-kind defaults and limits.
    pub kinds: KindTable,
    /// Instance networks' address plan; None: instances keep the host's
    /// network (or loopback only), as before networks.
    pub networks: Option<crate::domain::network::Plan>,
    /// The operator's custom subnets and security groups (networks on).
    pub custom_networks: std::sync::Arc<crate::domain::network::Custom>,
}

/// Resources in use on one node, derived from its active instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub gpu_milli: Vec<u32>,
    pub cpu_milli: i64,
    pub memory_mib: i64,
    pub instance_ids: Vec<String>,
}

pub struct Cluster {
    settings: Settings,
    nodes: BTreeMap<String, Node>,
    jobs: BTreeMap<String, Job>,
    /// instance id -> job id
    instance_job: HashMap<String, String>,
    next_seq: u64,
    pools: BTreeMap<String, Pool>,
    next_pool_seq: u64,
    tenants: BTreeMap<String, Tenant>,
    /// token SHA-256 hex -> tenant
    tokens: HashMap<String, String>,
    /// node credential SHA-256 hex -> node id
    node_credentials: HashMap<String, String>,
    orders: Vec<crate::domain::billing::Order>,
    /// Hours before this are in the ledger table.
    ledger_closed_until_ms: i64,
    store: staged::StagedStore,
    /// Memory may differ from the store (a commit failed and the reload
    /// too): reloaded at the next [`Cluster::begin`].
    diverged: bool,
    /// The placement engine of the last scheduling pass, still current:
    /// it saw every allocation since (its own placements). Dropped by
    /// anything else that changes capacity (a node registers, changes
    /// status, inventory, cordon or pool; an instance ends); rebuilt by the
    /// next pass.
    placer: Option<placement::Placer>,
    /// The distinct waits of the last pass, each with its rendering: a job
    /// whose wait did not change costs a pointer comparison, and one whose
    /// wait did (its head started) a copy of the rendering.
    waits: HashMap<Arc<scheduling::Wait>, Arc<str>>,
    /// node id -> jobs that have (or had) instances there; pruned as their
    /// instances end. Spares heartbeats a walk over every job.
    jobs_on_node: HashMap<String, std::collections::BTreeSet<String>>,
    /// The job `submit` is placing, written by `submit` itself.
    unwritten: Option<String>,
    /// Network name -> (VNI, the nodes its agents were last told it
    /// spans); in memory only (after a restart, from the next start on).
    net_spans: HashMap<String, (u32, std::collections::BTreeSet<String>)>,
    /// Jobs that waited to be placed at the last pass (or were submitted
    /// since): with the jobs written since (the store's
    /// [`staged::StagedStore::touched_jobs`]), every job that may wait now,
    /// so a pass looks at those and not at every job kept.
    waiting: std::collections::BTreeSet<String>,
    /// What each pool's work asks for, learned from its submissions.
    learned: shapes::Learned,
    /// When the tenants' recent shares were last written (they are kept
    /// current in memory and written once a minute).
    recent_written_ms: i64,
    /// The next audit record's sequence number (never reused: a failed
    /// commit leaves a gap).
    next_audit_seq: u64,
}

impl Cluster {
    /// Loads everything from the store. Nodes get a fresh grace period from
    /// `now_ms` to reconnect before anything on them is declared lost.
    pub fn load(
        store: Box<dyn Store>,
        settings: Settings,
        now_ms: i64,
    ) -> Result<Self, StoreError> {
        let snapshot = store.load()?;
        // Notebook tokens are derived from the key: a database used with
        // another key would hand out URLs its notebooks do not accept.
        let check = settings.token_key.check();
        match &snapshot.secret_key_check {
            Some(stored) if *stored != check => return Err(StoreError::SecretKeyMismatch),
            Some(_) => {}
            None => store.write(&[Record::SecretKeyCheck(&check)], now_ms)?,
        }
        let next_audit_seq = store.audit_max_seq()? + 1;
        let mut cluster = Self::from_snapshot(store, settings, snapshot, now_ms);
        cluster.next_audit_seq = next_audit_seq;
        cluster.track_loaded_spans();
        Ok(cluster)
    }

    /// Appends an audit record, staged with the operation's other writes
    /// (so in the same transaction), with the next sequence number.
    pub fn record_audit(
        &mut self,
        mut entry: crate::domain::audit::AuditEntry,
        now_ms: i64,
    ) -> Result<crate::domain::audit::AuditEntry, StoreError> {
        entry.seq = self.next_audit_seq;
        self.next_audit_seq += 1;
        self.store.write(&[Record::Audit(&entry)], now_ms)?;
        Ok(entry)
    }

    /// Audit records before `before_ms` go (retention).
    pub fn prune_audit(&mut self, before_ms: i64, now_ms: i64) -> Result<(), StoreError> {
        self.store
            .write(&[Record::PruneAudit { before_ms }], now_ms)
    }

    /// One page of the audit trail, read through the cluster's store.
    pub fn audit_page(
        &self,
        q: &crate::domain::audit::AuditQuery,
    ) -> Result<Vec<crate::domain::audit::AuditEntry>, StoreError> {
        self.store.audit_page(q)
    }

    /// The tenant an audited call concerned: the owner of its pool or job
    /// target, or the tenant it names.
    pub fn audit_owner(&self, targets: &BTreeMap<String, String>) -> Option<String> {
        if let Some(p) = targets.get("pool").and_then(|id| self.pools.get(id)) {
            return Some(p.tenant.clone());
        }
        if let Some(j) = targets.get("job").and_then(|id| self.jobs.get(id)) {
            return Some(j.tenant.clone());
        }
        targets
            .get("tenant")
            .filter(|t| self.tenants.contains_key(*t))
            .cloned()
    }

    /// Ids of the jobs and pools the operation being staged wrote.
    pub fn staged_ids(&self) -> (Vec<String>, Vec<String>) {
        self.store.staged_ids()
    }

    fn from_snapshot(
        store: Box<dyn Store>,
        settings: Settings,
        snapshot: crate::store::Snapshot,
        now_ms: i64,
    ) -> Self {
        let mut cluster = Self {
            settings,
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            instance_job: HashMap::new(),
            next_seq: 1,
            pools: BTreeMap::new(),
            next_pool_seq: 1,
            tenants: BTreeMap::new(),
            tokens: snapshot.tokens.into_iter().collect(),
            node_credentials: HashMap::new(),
            orders: snapshot.orders,
            ledger_closed_until_ms: 0,
            store: staged::StagedStore::new(store),
            diverged: false,
            placer: None,
            waits: HashMap::new(),
            jobs_on_node: HashMap::new(),
            unwritten: None,
            net_spans: HashMap::new(),
            waiting: Default::default(),
            learned: shapes::Learned::load(snapshot.placement_shapes.as_deref()),
            recent_written_ms: now_ms,
            next_audit_seq: 1,
        };
        for pool in snapshot.pools {
            cluster.next_pool_seq = cluster.next_pool_seq.max(pool.seq + 1);
            cluster.pools.insert(pool.pool_id.clone(), pool);
        }
        for tenant in snapshot.tenants {
            cluster.tenants.insert(tenant.name.clone(), tenant);
        }
        for mut node in snapshot.nodes {
            if let Some(sha) = &node.credential_sha256 {
                cluster
                    .node_credentials
                    .insert(sha.clone(), node.node_id.clone());
            }
            if node.status == NodeStatus::Ready {
                node.last_heartbeat_ms = node.last_heartbeat_ms.max(now_ms);
            }
            cluster.nodes.insert(node.node_id.clone(), node);
        }
        cluster.next_seq = cluster.next_seq.max(snapshot.next_job_seq.unwrap_or(1));
        for mut job in snapshot.jobs {
            cluster.next_seq = cluster.next_seq.max(job.seq + 1);
            // A token stored by an older scheduler is kept (while its
            // notebook lives); else it is derived.
            if job.spec.kind == JobKind::Notebook && job.access_token.is_empty() {
                job.access_token = cluster.settings.token_key.notebook_token(&job.job_id);
            }
            for inst in &job.instances {
                cluster
                    .instance_job
                    .insert(inst.instance_id.clone(), job.job_id.clone());
                if !inst.state.is_terminal() {
                    cluster
                        .jobs_on_node
                        .entry(inst.node_id.clone())
                        .or_default()
                        .insert(job.job_id.clone());
                }
            }
            if scheduling::Request::of(&job).is_some() {
                cluster.waiting.insert(job.job_id.clone());
            }
            cluster.jobs.insert(job.job_id.clone(), job);
        }
        // Resume closing the ledger where it stopped; a database without a
        // ledger yet starts at the earliest metered moment.
        let earliest = cluster
            .pools
            .values()
            .map(|p| p.created_at_ms)
            .chain(
                cluster
                    .jobs
                    .values()
                    .flat_map(|j| j.instances.iter().filter_map(|i| i.started_at_ms)),
            )
            .min()
            .unwrap_or(now_ms)
            .min(now_ms);
        cluster.ledger_closed_until_ms = snapshot
            .ledger_closed_until_ms
            .unwrap_or_else(|| crate::domain::billing::hour_floor(earliest));
        cluster
    }

    // ---- queries -------------------------------------------------------

    /// Everything the cluster holds, as text, to compare two states in tests.
    #[cfg(test)]
    pub fn fingerprint(&self) -> String {
        let mut tokens: Vec<_> = self.tokens.iter().collect();
        tokens.sort();
        let mut creds: Vec<_> = self.node_credentials.iter().collect();
        creds.sort();
        let mut instance_job: Vec<_> = self.instance_job.iter().collect();
        instance_job.sort();
        // Index entries of jobs with nothing left on a node are pruned
        // lazily; compare what still counts.
        let mut on_node: Vec<(&String, Vec<&String>)> = self
            .jobs_on_node
            .iter()
            .map(|(n, jobs)| {
                let live = jobs
                    .iter()
                    .filter(|j| {
                        self.jobs.get(*j).is_some_and(|j| {
                            j.instances
                                .iter()
                                .any(|i| &i.node_id == n && !i.state.is_terminal())
                        })
                    })
                    .collect();
                (n, live)
            })
            .filter(|(_, live): &(_, Vec<_>)| !live.is_empty())
            .collect();
        on_node.sort();
        serde_json::json!({
            "instance_job": instance_job,
            "jobs_on_node": on_node,
            "nodes": self.nodes,
            "jobs": self.jobs,
            "pools": self.pools,
            "tenants": self.tenants,
            "tokens": tokens,
            "credentials": creds,
            "orders": self.orders,
            "seq": [self.next_seq, self.next_pool_seq],
            "ledger_closed_until_ms": self.ledger_closed_until_ms,
        })
        .to_string()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, node_id: &str) -> Result<&Node, ClusterError> {
        self.nodes
            .get(node_id)
            .ok_or_else(|| ClusterError::NodeNotFound {
                id: node_id.to_string(),
            })
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// The job, if it exists and the caller may see it; another tenant's
    /// job is "not found".
    pub fn job(&self, caller: &Caller, job_id: &str) -> Result<&Job, ClusterError> {
        self.jobs
            .get(job_id)
            .filter(|j| caller.may_access(&j.tenant))
            .ok_or_else(|| ClusterError::JobNotFound {
                id: job_id.to_string(),
            })
    }

    /// Jobs in id order after `after` (all for an empty one).
    pub fn jobs_after<'a>(&'a self, after: &str) -> impl Iterator<Item = &'a Job> + 'a {
        use std::ops::Bound;
        let start = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after.to_string())
        };
        self.jobs.range((start, Bound::Unbounded)).map(|(_, j)| j)
    }

    /// Jobs the caller may see.
    pub fn visible_jobs<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs
            .values()
            .filter(move |j| caller.may_access(&j.tenant))
    }

    /// The tenant whose job an instance belongs to.
    pub fn instance_tenant(&self, instance_id: &str) -> Option<&str> {
        let job = self.jobs.get(self.instance_job.get(instance_id)?)?;
        Some(&job.tenant)
    }

    /// What is allocated on every node, from the active instances.
    pub fn usage(&self) -> HashMap<String, NodeUsage> {
        let mut usage: HashMap<String, NodeUsage> = HashMap::new();
        for (id, node) in &self.nodes {
            usage.insert(
                id.clone(),
                NodeUsage {
                    gpu_milli: vec![0; node.inventory.gpus.len()],
                    ..Default::default()
                },
            );
        }
        for job in self.jobs.values() {
            let res = &job.spec.resources;
            let per_gpu = if res.gpus > 0 { 1000 } else { res.gpu_milli };
            for inst in job.active_instances() {
                let Some(u) = usage.get_mut(&inst.node_id) else {
                    continue;
                };
                u.cpu_milli += res.cpu_milli as i64;
                u.memory_mib += res.memory_mib as i64;
                u.instance_ids.push(inst.instance_id.clone());
                if let Some(node) = self.nodes.get(&inst.node_id) {
                    for idx in &inst.gpu_indexes {
                        if let Some(pos) = node.inventory.gpus.iter().position(|g| g.index == *idx)
                        {
                            u.gpu_milli[pos] += per_gpu;
                        }
                    }
                }
            }
        }
        usage
    }

    // ---- agents --------------------------------------------------------

    /// Registers a node as the node itself (in-process callers: tests and
    /// benchmarks); agents over gRPC go through [`Cluster::register_agent`].
    pub fn register_node(
        &mut self,
        node_id: &str,
        inventory: Inventory,
        now_ms: i64,
    ) -> Result<(), ClusterError> {
        // Not a SHA-256 digest, so no token over gRPC can ever match it.
        let sha = format!("in-process:{node_id}");
        let me = AgentIdentity::Node {
            node_id: node_id.to_string(),
            credential_sha256: sha.clone(),
        };
        self.register_agent(
            node_id,
            inventory,
            env!("CARGO_PKG_VERSION"),
            &me,
            &sha,
            now_ms,
        )?;
        self.confirm_credential(node_id, &me, now_ms)
    }

    /// An agent (re)registers with its inventory, as `identity`
    /// ([`crate::domain::node::admit_registration`]). A node that enrols now
    /// takes `fresh_credential_sha256` as its credential (the caller hands
    /// the token itself to the agent); returns whether it did.
    pub fn register_agent(
        &mut self,
        node_id: &str,
        inventory: Inventory,
        agent_version: &str,
        identity: &AgentIdentity,
        fresh_credential_sha256: &str,
        now_ms: i64,
    ) -> Result<bool, ClusterError> {
        let known = self.nodes.get(node_id);
        let admission = crate::domain::node::admit_registration(node_id, known, identity)?;
        let mut node = match known {
            Some(existing) => Node {
                inventory,
                status: NodeStatus::Ready,
                last_heartbeat_ms: now_ms,
                agent_version: agent_version.to_string(),
                ..existing.clone()
            },
            None => Node {
                node_id: node_id.to_string(),
                inventory,
                status: NodeStatus::Ready,
                registered_at_ms: now_ms,
                last_heartbeat_ms: now_ms,
                pool: PUBLIC_POOL.to_string(),
                cordoned: false,
                credential_sha256: None,
                credential_confirmed: false,
                revoked: false,
                drain: None,
                agent_version: agent_version.to_string(),
            },
        };
        let enrol = admission == crate::domain::node::Admission::Enrol;
        if enrol {
            node.credential_sha256 = Some(fresh_credential_sha256.to_string());
            node.credential_confirmed = false;
        }
        self.store.put_node(&node, now_ms)?;
        self.placer = None;
        if enrol {
            if let Some(old) = known.and_then(|n| n.credential_sha256.clone()) {
                self.node_credentials.remove(&old);
            }
            self.node_credentials
                .insert(fresh_credential_sha256.to_string(), node_id.to_string());
        }
        tracing::info!(node = %node_id, gpus = node.inventory.gpus.len(), enrolled = enrol, "node registered");
        self.nodes.insert(node_id.to_string(), node);
        Ok(enrol)
    }

    /// A session opens for `node_id` as `identity`: it must be the node's
    /// current credential and the node not revoked (checked now, when the
    /// hello arrives, not only when the stream opened). The first session
    /// confirms the credential: from then on the join token cannot enrol
    /// the node id again.
    pub fn confirm_credential(
        &mut self,
        node_id: &str,
        identity: &AgentIdentity,
        now_ms: i64,
    ) -> Result<(), ClusterError> {
        let node = self.node(node_id)?;
        crate::domain::node::admit_session(node, identity)?;
        if !node.credential_confirmed {
            let mut node = node.clone();
            node.credential_confirmed = true;
            self.store.put_node(&node, now_ms)?;
            self.nodes.insert(node_id.to_string(), node);
        }
        Ok(())
    }

    /// The node whose credential has this SHA-256, if any.
    pub fn node_of_credential(&self, sha256: &str) -> Option<&str> {
        self.node_credentials.get(sha256).map(String::as_str)
    }

    /// Revokes a node's credential (admin): it may not register again until
    /// readmitted; it is NotReady at once and its instances are Lost. The
    /// caller ends its session.
    pub fn revoke_node(
        &mut self,
        node_id: &str,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Node, ClusterError> {
        let mut node = self.node(node_id)?.clone();
        let old = node.credential_sha256.take();
        node.credential_confirmed = false;
        node.revoked = true;
        node.status = NodeStatus::NotReady;
        self.store.put_node(&node, now_ms)?;
        if let Some(old) = old {
            self.node_credentials.remove(&old);
        }
        tracing::warn!(node = %node_id, "node credential revoked");
        self.nodes.insert(node_id.to_string(), node.clone());
        self.lose_instances_on(node_id, &format!("node {node_id} revoked"), now_ms, out);
        self.schedule(now_ms, out);
        Ok(node)
    }

    /// Lets a revoked node enrol again with the join token (admin).
    pub fn readmit_node(&mut self, node_id: &str, now_ms: i64) -> Result<Node, ClusterError> {
        let mut node = self.node(node_id)?.clone();
        if !node.revoked {
            return Err(ClusterError::NodeNotRevoked {
                id: node_id.to_string(),
            });
        }
        node.revoked = false;
        self.store.put_node(&node, now_ms)?;
        self.nodes.insert(node_id.to_string(), node.clone());
        Ok(node)
    }

    /// A session opened: the agent lists what it runs. Known instances are
    /// reattached, unknown ones stopped, and instances the agent should run
    /// but does not are started again (if never started) or lost.
    pub fn hello(
        &mut self,
        node_id: &str,
        reported: Vec<ReportedInstance>,
        now_ms: i64,
        out: &mut Outbox,
    ) {
        self.touch(node_id, None, now_ms);
        self.placer = None;
        let reported_ids: std::collections::HashSet<String> =
            reported.iter().map(|r| r.instance_id.clone()).collect();
        for r in reported {
            self.apply_report(node_id, r, now_ms, out);
        }
        let (mut changed_jobs, mut released_jobs) = (Vec::new(), Vec::new());
        for job in self.jobs.values_mut() {
            let (mut changed, mut released) = (false, false);
            let mut restart = Vec::new();
            for inst in job
                .instances
                .iter_mut()
                .filter(|i| i.node_id == node_id && !reported_ids.contains(&i.instance_id))
            {
                // The agent does not run it: a Lost one's address is free.
                if let Some(net) = inst.net.as_mut().filter(|n| !n.released)
                    && (inst.state == InstanceState::Lost || !inst.state.is_terminal())
                    && inst.state != InstanceState::Scheduled
                {
                    net.released = true;
                    released = true;
                }
                if inst.state.is_terminal() {
                    continue;
                }
                if inst.state == InstanceState::Scheduled {
                    // Never reached the agent: send it again.
                    restart.push(inst.rank);
                } else {
                    inst.state = InstanceState::Lost;
                    inst.ready = false;
                    self.placer = None;
                    inst.reason = format!("node {node_id} no longer runs it (agent restarted?)");
                    inst.finished_at_ms = Some(now_ms);
                    changed = true;
                }
            }
            for inst in job
                .current()
                .filter(|i| i.state == InstanceState::Scheduled && restart.contains(&i.rank))
            {
                out.push((
                    node_id.to_string(),
                    AgentCommand::Start(Box::new(start_spec(job, inst, &self.pools, &self.nodes))),
                ));
            }
            if changed {
                job.refresh_state(now_ms);
                changed_jobs.push(job.job_id.clone());
            } else if released {
                released_jobs.push(job.job_id.clone());
            }
        }
        for id in changed_jobs {
            self.settle(&id, now_ms, out);
            self.persist_job(&id, now_ms);
        }
        for id in released_jobs {
            self.persist_job(&id, now_ms);
        }
        self.network_state_to(node_id, out);
        self.schedule(now_ms, out);
    }

    /// A heartbeat: readiness, maybe a new inventory, instance states.
    pub fn heartbeat(
        &mut self,
        node_id: &str,
        inventory: Option<Inventory>,
        reported: Vec<ReportedInstance>,
        now_ms: i64,
        out: &mut Outbox,
    ) {
        self.touch(node_id, inventory, now_ms);
        for r in reported {
            self.apply_report(node_id, r, now_ms, out);
        }
    }

    /// Utilization samples `(gpu index, percent)` from a node: each running
    /// instance with GPUs accrues used GPU-milliseconds for the time since
    /// its previous sample (at most the node grace), weighted by its share
    /// of each GPU. Kept in memory and persisted with the next job write or
    /// the periodic flush ([`Cluster::flush_samples`]).
    pub fn record_gpu_samples(&mut self, node_id: &str, samples: &[(u32, u32)], now_ms: i64) {
        let hour = crate::domain::billing::hour_floor(now_ms);
        let cap = self.settings.node_grace_ms;
        let Some(on_node) = self.jobs_on_node.get_mut(node_id) else {
            return;
        };
        // Jobs with nothing left on the node leave its index.
        on_node.retain(|id| {
            self.jobs.get(id).is_some_and(|j| {
                j.instances
                    .iter()
                    .any(|i| i.node_id == node_id && !i.state.is_terminal())
            })
        });
        let ids: Vec<String> = on_node.iter().cloned().collect();
        for id in &ids {
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            let share_milli = if job.spec.resources.gpus > 0 {
                1000
            } else {
                i64::from(job.spec.resources.gpu_milli)
            };
            let active_pct = self
                .settings
                .kinds
                .get(job.spec.kind)
                .idle_gpu_util_pct
                .max(1);
            for inst in job.instances.iter_mut().filter(|i| {
                i.node_id == node_id
                    && i.state == InstanceState::Running
                    && !i.gpu_indexes.is_empty()
            }) {
                if let Some(last) = inst.last_sample_ms {
                    let dt = (now_ms - last).clamp(0, cap);
                    let util: i64 = inst
                        .gpu_indexes
                        .iter()
                        .filter_map(|g| samples.iter().find(|(i, _)| i == g))
                        .map(|(_, u)| i64::from((*u).min(100)))
                        .sum();
                    // dt x (util / 100) x (share / 1000)
                    *inst.gpu_used_ms_by_hour.entry(hour).or_insert(0) +=
                        dt * util * share_milli / 100_000;
                }
                if inst
                    .gpu_indexes
                    .iter()
                    .any(|g| samples.iter().any(|(i, u)| i == g && *u >= active_pct))
                {
                    inst.gpu_active_ms = Some(now_ms);
                }
                inst.last_sample_ms = Some(now_ms);
            }
        }
    }

    /// Persists jobs whose instances took utilization samples since `since_ms`.
    pub fn flush_samples(&self, since_ms: i64, now_ms: i64) {
        let jobs: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| {
                j.instances
                    .iter()
                    .any(|i| i.last_sample_ms.is_some_and(|t| t >= since_ms))
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let records: Vec<Record<'_>> = jobs.into_iter().map(Record::Job).collect();
        if let Err(err) = self.store.write(&records, now_ms) {
            tracing::error!(error = %crate::ErrorChain(&err), "cannot persist utilization samples");
        }
    }

    fn touch(&mut self, node_id: &str, inventory: Option<Inventory>, now_ms: i64) {
        let Some(node) = self.nodes.get_mut(node_id).filter(|n| !n.revoked) else {
            return;
        };
        node.last_heartbeat_ms = now_ms;
        let mut persist = false;
        if node.status != NodeStatus::Ready {
            tracing::info!(node = %node_id, "node Ready again");
            node.status = NodeStatus::Ready;
            persist = true;
        }
        if let Some(inv) = inventory
            && inv != node.inventory
        {
            node.inventory = inv;
            persist = true;
        }
        if persist {
            let node = node.clone();
            self.placer = None;
            if let Err(err) = self.store.put_node(&node, now_ms) {
                tracing::error!(node = %node_id, error = %crate::ErrorChain(&err), "cannot persist node");
            }
        }
    }

    /// Applies one instance report from `node_id`.
    pub fn apply_report(
        &mut self,
        node_id: &str,
        r: ReportedInstance,
        now_ms: i64,
        out: &mut Outbox,
    ) {
        if self.nodes.get(node_id).is_none_or(|n| n.revoked) {
            // Nothing a revoked (or unknown) node says counts.
            return;
        }
        let grace_ms = self.settings.stop_grace_ms;
        let job_id = self.instance_job.get(&r.instance_id).cloned();
        let Some(job) = job_id.as_ref().and_then(|id| self.jobs.get_mut(id)) else {
            if !r.state.is_terminal() {
                tracing::warn!(node = %node_id, instance = %r.instance_id, "agent runs an unknown instance; stopping it");
            }
            out.push((node_id.to_string(), unknown_instance_command(r, grace_ms)));
            return;
        };
        let Some(inst) = job
            .instances
            .iter_mut()
            .find(|i| i.instance_id == r.instance_id && i.node_id == node_id)
        else {
            return;
        };
        if inst.state.is_terminal() {
            let cmd = if r.state.is_terminal() {
                // Its namespace is gone: a Lost one's address is free now.
                if let Some(net) = inst.net.as_mut().filter(|n| !n.released) {
                    net.released = true;
                    if let Some(id) = &job_id {
                        self.persist_job(id, now_ms);
                    }
                }
                AgentCommand::Forget {
                    instance_id: r.instance_id,
                }
            } else {
                AgentCommand::Stop {
                    instance_id: r.instance_id,
                    grace_ms,
                    reason: format!("instance already {:?}", inst.state),
                }
            };
            out.push((node_id.to_string(), cmd));
            return;
        }
        let health_checked = job.spec.health_check.is_some();
        let changed = merge_report(inst, &r, health_checked, node_id, grace_ms, now_ms, out);
        if r.state.is_terminal() {
            // Its resources are free again: the kept placer gets them back
            // (one node re-keyed), else the next pass builds one.
            let released = self
                .placer
                .as_mut()
                .is_some_and(|p| p.release(node_id, &job.spec.resources, &inst.gpu_indexes));
            if !released {
                self.placer = None;
            }
        }
        if !changed {
            return;
        }
        job.refresh_state(now_ms);
        let job_id = job.job_id.clone();
        tracing::info!(job = %job_id, instance = %r.instance_id, state = ?r.state, "instance update");
        self.settle(&job_id, now_ms, out);
        self.persist_job(&job_id, now_ms);
        if r.state.is_terminal() {
            self.schedule(now_ms, out);
        }
    }

    /// After a job's state changed: a failed or lost instance ends the run,
    /// so the rest of the gang is stopped; while retries are left
    /// (`max_retries`) the job is queued again once every instance of the
    /// run has ended (a lost node's instances end at once). Returns true
    /// when it requeued the job.
    fn settle(&mut self, job_id: &str, now_ms: i64, out: &mut Outbox) -> bool {
        let grace_ms = self.settings.stop_grace_ms;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return false;
        };
        if job.spec.kind.has_replicas() {
            self.settle_replicas(job_id, now_ms, out);
            self.prune_instances(job_id);
            return false;
        }
        if job.stop_cause.is_some() || !matches!(job.state, JobState::Failed | JobState::Lost) {
            return false;
        }
        let (attempt, state) = (job.retries, job.state);
        let reason = format!("job {state:?}");
        for other in job.instances.iter_mut().filter(|i| {
            i.attempt == attempt
                && matches!(i.state, InstanceState::Running | InstanceState::Scheduled)
        }) {
            stop_instance(other, grace_ms, &reason, out);
        }
        let allowed = job
            .spec
            .max_retries
            .saturating_add(job.drains)
            .saturating_add(job.preemptions);
        if job.retries >= allowed || job.current().any(|i| !i.state.is_terminal()) {
            return false;
        }
        let why = std::mem::take(&mut job.reason);
        job.retries += 1;
        job.state = JobState::Queued;
        job.finished_at_ms = None;
        // The maximum run time counts per run.
        job.started_at_ms = None;
        if let Some(by) = job.preempted_by.take() {
            // Not a failure either: no backoff, no retry spent.
            job.not_before_ms = now_ms;
            job.reason = format!("requeued: preempted by {by}");
            job.wait = None;
            tracing::info!(job = %job_id, by = %by, "preempted job requeued");
            self.prune_instances(job_id);
            return true;
        }
        if let Some(node) = job.drained_from.take() {
            // Not a failure: no backoff, no retry spent.
            job.not_before_ms = now_ms;
            job.reason = format!("requeued: node {node} was drained for maintenance");
            job.wait = None;
            tracing::info!(job = %job_id, %node, "job requeued off a drained node");
            self.prune_instances(job_id);
            return true;
        }
        let wait = self.settings.limits.backoff_ms(job.retries);
        job.not_before_ms = now_ms.saturating_add(wait);
        job.reason = format!(
            "requeued (retry {} of {}, not before {} ms from the failure) after: {why}",
            job.retries, job.spec.max_retries, wait
        );
        job.wait = None;
        tracing::info!(job = %job_id, retry = job.retries, wait_ms = wait, %why, "job requeued");
        self.prune_instances(job_id);
        true
    }

    /// Most finished jobs forgotten in one pass (one transaction).
    const FORGET_BATCH: usize = 1_000;

    /// Forgets finished jobs that ended more than the retention ago
    /// (`[limits] finished_job_retention_hours`) and whose hours are all in
    /// the ledger: their rows go, their ledger rows stay. Job ids are never
    /// given out again. Returns how many went.
    pub fn forget_finished_jobs(&mut self, now_ms: i64) -> usize {
        let retention = self.settings.limits.finished_job_retention_ms;
        if retention <= 0 {
            return 0;
        }
        let closed = self.ledger_closed_until_ms;
        let before = now_ms.saturating_sub(retention);
        let gone: Vec<String> = self
            .jobs
            .values()
            .filter(|j| {
                j.state.is_terminal()
                    && j.finished_at_ms.is_some_and(|f| f < before)
                    && j.instances.iter().all(|i| {
                        i.state.is_terminal() && i.finished_at_ms.is_none_or(|f| f < closed)
                    })
            })
            .take(Self::FORGET_BATCH)
            .map(|j| j.job_id.clone())
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let mut records: Vec<Record<'_>> = gone
            .iter()
            .map(|id| Record::ForgetJob { job_id: id })
            .collect();
        records.push(Record::NextJobSeq(self.next_seq));
        if let Err(err) = self.store.write(&records, now_ms) {
            tracing::error!(error = %crate::ErrorChain(&err), "cannot forget finished jobs; will retry");
            return 0;
        }
        for id in &gone {
            if let Some(job) = self.jobs.remove(id) {
                for inst in &job.instances {
                    self.instance_job.remove(&inst.instance_id);
                }
            }
        }
        for on_node in self.jobs_on_node.values_mut() {
            on_node.retain(|id| self.jobs.contains_key(id));
        }
        tracing::info!(
            jobs = gone.len(),
            "forgot finished jobs past their retention"
        );
        gone.len()
    }

    /// Most ended instances of earlier runs (or replaced replicas) a job
    /// keeps; older ones whose hours are all in the ledger are dropped and
    /// counted in `pruned_instances`.
    pub const KEPT_ENDED_INSTANCES: usize = 32;

    /// Drops the oldest ended instances of earlier runs past
    /// [`Cluster::KEPT_ENDED_INSTANCES`], if the ledger holds all their
    /// hours (so billing loses nothing).
    fn prune_instances(&mut self, job_id: &str) {
        let closed = self.ledger_closed_until_ms;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let current = job.retries;
        let old = |i: &Instance| {
            i.state.is_terminal()
                && (i.attempt < current || i.replaced)
                && i.finished_at_ms.is_some_and(|f| f < closed)
        };
        let mut excess = job
            .instances
            .iter()
            .filter(|i| old(i))
            .count()
            .saturating_sub(Self::KEPT_ENDED_INSTANCES);
        if excess == 0 {
            return;
        }
        let mut dropped = Vec::new();
        job.instances.retain(|i| {
            if excess > 0 && old(i) {
                excess -= 1;
                dropped.push(i.instance_id.clone());
                false
            } else {
                true
            }
        });
        job.pruned_instances += dropped.len() as u64;
        for id in dropped {
            self.instance_job.remove(&id);
        }
    }

    fn persist_job(&self, job_id: &str, now_ms: i64) {
        if self.unwritten.as_deref() == Some(job_id) {
            // Being submitted: `submit` writes it once placed.
            return;
        }
        if let Some(job) = self.jobs.get(job_id)
            && let Err(err) = self.store.put_job(job, now_ms)
        {
            tracing::error!(job = %job_id, error = %crate::ErrorChain(&err), "cannot persist job");
        }
    }

    // ---- time ----------------------------------------------------------

    /// Declares silent nodes NotReady (their instances Lost), then places
    /// queued jobs.
    pub fn tick(&mut self, now_ms: i64, out: &mut Outbox) {
        let grace = self.settings.node_grace_ms;
        let expired: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready && n.heartbeat_expired(now_ms, grace))
            .map(|n| n.node_id.clone())
            .collect();
        for node_id in expired {
            tracing::warn!(node = %node_id, grace_ms = grace, "node missed heartbeats; NotReady");
            if let Some(node) = self.nodes.get_mut(&node_id) {
                node.status = NodeStatus::NotReady;
                let node = node.clone();
                if let Err(err) = self.store.put_node(&node, now_ms) {
                    tracing::error!(node = %node_id, error = %crate::ErrorChain(&err), "cannot persist node");
                }
            }
            let why = format!("node {node_id} NotReady (no heartbeat for {grace} ms)");
            self.lose_instances_on(&node_id, &why, now_ms, out);
        }
        self.advance_subscriptions(now_ms, out);
        self.advance_pools(now_ms);
        self.enforce_time_limits(now_ms, out);
        self.advance_drains(now_ms, out);
        self.advance_rollouts(now_ms, out);
        self.advance_recent_shares(now_ms);
        self.schedule(now_ms, out);
        self.prune_network_peers(out);
    }

    /// Every live instance on the node is Lost, for `why`; their jobs
    /// settle (retries, the rest of a gang).
    fn lose_instances_on(&mut self, node_id: &str, why: &str, now_ms: i64, out: &mut Outbox) {
        self.placer = None;
        let mut changed = Vec::new();
        for job in self.jobs.values_mut() {
            let mut hit = false;
            for inst in job
                .instances
                .iter_mut()
                .filter(|i| i.node_id == node_id && !i.state.is_terminal())
            {
                inst.state = InstanceState::Lost;
                inst.ready = false;
                inst.reason = why.to_string();
                inst.finished_at_ms = Some(now_ms);
                hit = true;
            }
            if hit {
                job.refresh_state(now_ms);
                changed.push(job.job_id.clone());
            }
        }
        for id in changed {
            self.settle(&id, now_ms, out);
            self.persist_job(&id, now_ms);
        }
    }

    // ---- jobs ----------------------------------------------------------

    /// Validates and records a job, then tries to place it at once.
    /// A TensorBoard for a training job: its log directory and (if
    /// dedicated) its pool, unless given.
    fn tensorboard_of(
        &self,
        caller: &Caller,
        mut raw: RawJobSpec,
    ) -> Result<RawJobSpec, ClusterError> {
        if raw.kind == Some(JobKind::Tensorboard) && !raw.for_job.is_empty() {
            let training = self.job(caller, &raw.for_job)?;
            if training.spec.kind != JobKind::Training {
                return Err(ClusterError::TensorboardOfNonTraining {
                    job_id: training.job_id.clone(),
                    kind: training.spec.kind.name(),
                });
            }
            if raw.log_dir.is_empty() {
                raw.log_dir = training.spec.log_dir.clone();
            }
            if raw.pool.is_empty() && training.pool_id != PUBLIC_POOL {
                // In the training job's pool: deleting the pool stops it too.
                raw.pool = training.pool_id.clone();
            }
        }
        Ok(raw)
    }

    pub fn submit(
        &mut self,
        caller: &Caller,
        raw: RawJobSpec,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Job, ClusterError> {
        let raw = self.tensorboard_of(caller, raw)?;
        let spec = raw.validate_for(&self.settings.kinds)?;
        if spec.priority_class == PriorityClass::High
            && !caller.admin
            && !self
                .tenants
                .get(&caller.tenant)
                .is_some_and(|t| t.quota.allow_high_class)
        {
            return Err(ClusterError::HighClassNotAllowed {
                tenant: caller.tenant.clone(),
            });
        }
        let limit = self.settings.limits.max_retries;
        if spec.max_retries > limit {
            return Err(SpecError::RetriesOverLimit {
                asked: spec.max_retries,
                limit,
            }
            .into());
        }
        let (pool_id, pool_type) = match self.resolve_pool(caller, &spec.pool)? {
            PoolRef::Public => (PUBLIC_POOL.to_string(), None),
            PoolRef::Dedicated(pool) => {
                crate::domain::pool::admit_job(
                    &pool.pool_id,
                    pool.pool_type,
                    pool.status,
                    &pool.status_reason,
                    spec.kind,
                )?;
                (pool.pool_id.clone(), Some(pool.pool_type))
            }
        };
        crate::domain::network::admit_network(&pool_id, pool_type, spec.kind, &spec.network)?;
        let seq = self.next_seq;
        let access_token = if spec.kind == JobKind::Notebook {
            self.settings
                .token_key
                .notebook_token(&format!("j-{seq:06}"))
        } else {
            String::new()
        };
        let pending = if spec.kind.has_replicas() {
            let first = match spec.kind {
                JobKind::BatchService if spec.completions > 0 => {
                    spec.instances.min(spec.completions)
                }
                _ => spec.instances,
            };
            (0..first)
                .map(|rank| PendingRank {
                    rank,
                    not_before_ms: 0,
                })
                .collect()
        } else {
            Vec::new()
        };
        let job = Job {
            job_id: format!("j-{seq:06}"),
            seq,
            spec,
            pool_id,
            tenant: caller.tenant.clone(),
            state: JobState::Queued,
            reason: "waiting to be placed".into(),
            wait: None,
            submitted_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
            instances: Vec::new(),
            stop_cause: None,
            retries: 0,
            access_token,
            pending,
            restarts: 0,
            rollout: Vec::new(),
            gave_up: None,
            failures: 0,
            not_before_ms: 0,
            drains: 0,
            drained_from: None,
            preemptions: 0,
            preempted_by: None,
            last_preempted_by: String::new(),
            pruned_instances: 0,
        };
        // Place it first, then write it once, placed or queued: one
        // transaction per submission. If that write fails, the job and its
        // placement are undone and the caller is told (nothing was applied).
        let job_id = job.job_id.clone();
        self.jobs.insert(job_id.clone(), job);
        self.waiting.insert(job_id.clone());
        self.unwritten = Some(job_id.clone());
        self.schedule(now_ms, out);
        self.unwritten = None;
        if let Err(err) = self.store.put_job(&self.jobs[&job_id], now_ms) {
            self.undo_submit(&job_id, out);
            return Err(err.into());
        }
        self.next_seq += 1;
        let (pool, req, instances) = {
            let job = &self.jobs[&job_id];
            let s = &job.spec;
            (job.pool_id.clone(), s.resources.clone(), s.instances)
        };
        self.learn_shape(&pool, &req, instances, now_ms);
        let job = &self.jobs[&job_id];
        tracing::info!(job = %job_id, kind = ?job.spec.kind, pool = %job.pool_id, state = ?job.state, "job submitted");
        Ok(job.clone())
    }

    /// Forgets a submission whose write failed, placement included.
    fn undo_submit(&mut self, job_id: &str, out: &mut Outbox) {
        let Some(job) = self.jobs.remove(job_id) else {
            return;
        };
        for inst in &job.instances {
            self.instance_job.remove(&inst.instance_id);
            if let Some(on_node) = self.jobs_on_node.get_mut(&inst.node_id) {
                on_node.remove(job_id);
            }
        }
        if !job.instances.is_empty() {
            // The kept placer counted its placement.
            self.placer = None;
        }
        out.retain(|(_, cmd)| !matches!(cmd, AgentCommand::Start(s) if s.job_id == job_id));
    }

    /// Cancels a job: queued jobs end at once, running instances get
    /// SIGTERM to their process group and SIGKILL after the grace.
    pub fn cancel(
        &mut self,
        caller: &Caller,
        job_id: &str,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Job, ClusterError> {
        let state = self.job(caller, job_id)?.state;
        if state.is_terminal() {
            return Err(ClusterError::NothingToCancel {
                job_id: job_id.to_string(),
                state,
            });
        }
        let job = self.stop_job(job_id, StopCause::User, "killed by user", now_ms, out);
        self.store.put_job(&job, now_ms)?;
        tracing::info!(job = %job_id, "job cancelled");
        Ok(job)
    }

    /// Ends a job for `cause`: running instances get SIGTERM to their
    /// process group, SIGKILL after the grace; their resources stay
    /// allocated until the agent confirms. Returns the job, not persisted.
    fn stop_job(
        &mut self,
        job_id: &str,
        cause: StopCause,
        reason: &str,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Job {
        let grace_ms = self.settings.stop_grace_ms;
        let job = self
            .jobs
            .get_mut(job_id)
            .expect("the caller checked the job");
        job.stop_cause = Some(cause);
        for inst in job.instances.iter_mut().filter(|i| !i.state.is_terminal()) {
            inst.reason = reason.to_string();
            stop_instance(inst, grace_ms, reason, out);
        }
        job.refresh_state(now_ms);
        job.clone()
    }

    /// One scheduling pass: [`scheduling::plan_shared`] decides (queue
    /// order, the public pool's fair share, backfill, spreading,
    /// preemption: see its module docs); this names the instances it
    /// places, sends their start commands, preempts its victims and
    /// records why the others wait.
    pub fn schedule(&mut self, now_ms: i64, out: &mut Outbox) {
        // The jobs that may wait: those that did, and those written since
        // (a job only starts to wait through a change that is written).
        for id in self.store.touched_jobs() {
            self.waiting.insert(id);
        }
        let jobs = &self.jobs;
        self.waiting.retain(|id| {
            jobs.get(id)
                .is_some_and(|j| scheduling::Request::of(j).is_some())
        });
        #[cfg(debug_assertions)]
        {
            let all: std::collections::BTreeSet<&String> = self
                .jobs
                .values()
                .filter(|j| scheduling::Request::of(j).is_some())
                .map(|j| &j.job_id)
                .collect();
            let indexed: std::collections::BTreeSet<&String> = self.waiting.iter().collect();
            assert_eq!(indexed, all, "the index of waiting jobs missed a change");
        }
        let queue: Vec<scheduling::Request> = self
            .waiting
            .iter()
            .filter_map(|id| scheduling::Request::of(&self.jobs[id]))
            .collect();
        if queue.is_empty() {
            return;
        }
        #[cfg(debug_assertions)]
        if let Some(p) = &self.placer {
            assert_eq!(
                p.nodes(),
                &self.capacity()[..],
                "the kept placer's capacity drifted from the cluster's"
            );
        }
        let mut placer = match self.placer.take() {
            Some(p) => p,
            None => {
                let mut p = placement::Placer::new(
                    self.capacity(),
                    &placement::default_shapes(),
                    PLACEMENT_SEED,
                );
                self.apply_shapes(&mut p);
                p
            }
        };
        let mut share = queue
            .iter()
            .any(|r| r.pool == crate::domain::PUBLIC_POOL)
            .then(|| self.public_share());
        // Only when a request may preempt: one above the lowest class, or
        // any in the public pool with fair-share preemption on.
        let reclaim = self.settings.fair_share_preemption;
        let preempt = queue
            .iter()
            .any(|r| {
                r.class > PriorityClass::Preemptible
                    || (reclaim && r.pool == crate::domain::PUBLIC_POOL)
            })
            .then(|| self.preemption());
        let decisions = scheduling::plan_shared(
            &queue,
            &mut placer,
            now_ms,
            share.as_mut(),
            preempt.as_ref(),
        );
        drop(preempt);
        drop(queue);
        self.placer = Some(placer);
        // This pass's waits (by address; each entry keeps its own Arc, so no
        // address is reused while the map lives) to their canonical form.
        type Canonical = (Arc<scheduling::Wait>, Arc<scheduling::Wait>, Arc<str>);
        let mut waits: HashMap<*const scheduling::Wait, Canonical> = HashMap::new();
        for job in scheduling::by_job(decisions) {
            if let Some(by) = &job.preempted_by {
                self.preempt(&job.job_id, by, out);
                self.persist_job(&job.job_id, now_ms);
                continue;
            }
            if job.placed.is_empty() {
                if let Some(why) = job.wait {
                    let (_, why, text) = waits
                        .entry(Arc::as_ptr(&why))
                        .or_insert_with(|| {
                            let (canonical, text) = canonical_wait(&self.waits, why.clone());
                            (why, canonical, text)
                        })
                        .clone();
                    self.set_wait_reason(&job.job_id, why, &text);
                }
            } else {
                self.start_placed(&job.job_id, job.placed, now_ms, out);
            }
        }
        self.waits = waits
            .into_values()
            .map(|(_, canonical, text)| (canonical, text))
            .collect();
    }

    /// Why a job waits is derived by every pass and kept in memory only: it
    /// is written with the job's next real change. (Persisting it made a
    /// queue of any depth cost a write per queued job whenever the head
    /// changed, since the reason names the head.) A reload keeps it, see
    /// `staged.rs`.
    fn set_wait_reason(&mut self, job_id: &str, why: Arc<scheduling::Wait>, text: &str) {
        let job = self.jobs.get_mut(job_id).expect("planned job exists");
        match &job.wait {
            Some(old) if Arc::ptr_eq(old, &why) => {}
            Some(old) if **old == *why => job.wait = Some(why),
            _ => {
                job.reason = text.to_string();
                job.wait = Some(why);
            }
        }
    }

    /// Names the instances the plan placed for `job_id` (a retry's and a
    /// replacement's ids say so), sends their start commands and records
    /// them.
    fn start_placed(
        &mut self,
        job_id: &str,
        placed: Vec<(u32, placement::Assignment)>,
        now_ms: i64,
        out: &mut Outbox,
    ) {
        let mut nets = match self.allocate_nets(job_id, placed.len()) {
            None => Vec::new(),
            Some(Ok(nets)) => match self.old_agent_among(&placed) {
                None => nets,
                Some(node) => {
                    if let Some(job) = self.jobs.get_mut(job_id) {
                        job.reason = format!(
                            "waiting: node {node}'s agent is older than 0.2.0 and cannot give instances their network"
                        );
                    }
                    return;
                }
            },
            Some(Err(err)) => {
                // Started without its network it would reach what it must
                // not: it stays queued, saying why.
                tracing::warn!(job = %job_id, %err, "no network address");
                if let Some(job) = self.jobs.get_mut(job_id) {
                    job.reason = format!("waiting for a network address: {err}");
                }
                return;
            }
        }
        .into_iter();
        let job = self.jobs.get_mut(job_id).expect("planned job exists");
        let attempt = job.retries;
        let mut new_ids = Vec::new();
        for (rank, a) in placed {
            let replacement = job
                .instances
                .iter()
                .any(|i| i.rank == rank && i.attempt == attempt);
            let suffix = match (attempt, replacement) {
                (_, true) => {
                    job.restarts += 1;
                    format!("-n{}", job.restarts)
                }
                (0, false) => String::new(),
                (k, false) => format!("-r{k}"),
            };
            let mut inst =
                Instance::scheduled(format!("{}-{rank}{suffix}", job.job_id), rank, attempt);
            inst.node_id = a.node_id;
            inst.gpu_indexes = a.gpu_indexes;
            inst.gpu_uuids = a.gpu_uuids;
            inst.net = nets.next();
            inst.address = self
                .nodes
                .get(&inst.node_id)
                .map(|n| n.address().to_string())
                .unwrap_or_default();
            job.pending.retain(|p| p.rank != rank);
            new_ids.push(inst.instance_id.clone());
            // Earlier runs' instances stay (billing, history).
            job.instances.push(inst);
        }
        job.refresh_state(now_ms);
        for inst in job
            .instances
            .iter()
            .filter(|i| new_ids.contains(&i.instance_id))
        {
            self.instance_job
                .insert(inst.instance_id.clone(), job.job_id.clone());
            out.push((
                inst.node_id.clone(),
                AgentCommand::Start(Box::new(start_spec(job, inst, &self.pools, &self.nodes))),
            ));
            self.jobs_on_node
                .entry(inst.node_id.clone())
                .or_default()
                .insert(job_id.to_string());
        }
        tracing::info!(job = %job_id, attempt, instances = new_ids.len(), "job placed");
        self.persist_job(job_id, now_ms);
    }

    fn capacity(&self) -> Vec<NodeCapacity> {
        let usage = self.usage();
        self.nodes
            .values()
            .map(|n| {
                let u = &usage[&n.node_id];
                NodeCapacity {
                    node_id: n.node_id.clone(),
                    pool: n.pool.clone(),
                    schedulable: n.status == NodeStatus::Ready && !n.cordoned && !n.revoked,
                    cpu_free_milli: i64::from(n.inventory.cpu_cores) * 1000 - u.cpu_milli,
                    memory_free_mib: n.inventory.memory_mib as i64 - u.memory_mib,
                    cpu_total_milli: i64::from(n.inventory.cpu_cores) * 1000,
                    memory_total_mib: n.inventory.memory_mib as i64,
                    gpus: n
                        .inventory
                        .gpus
                        .iter()
                        .zip(&u.gpu_milli)
                        .map(|(g, used)| GpuSlot {
                            index: g.index,
                            uuid: g.uuid.clone(),
                            model: g.model.clone(),
                            healthy: g.healthy,
                            free_milli: 1000u32.saturating_sub(*used),
                        })
                        .collect(),
                    az: n.inventory.az.clone(),
                }
            })
            .collect()
    }

    /// Cordons or uncordons a node (no new work when cordoned).
    pub fn set_cordon(
        &mut self,
        node_id: &str,
        cordoned: bool,
        now_ms: i64,
        out: &mut Outbox,
    ) -> Result<Node, ClusterError> {
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| ClusterError::NodeNotFound {
                id: node_id.to_string(),
            })?;
        node.cordoned = cordoned;
        if !cordoned {
            // Uncordoning ends a drain.
            node.drain = None;
        }
        let node = node.clone();
        self.store.put_node(&node, now_ms)?;
        self.placer = None;
        if !cordoned {
            self.schedule(now_ms, out);
        }
        Ok(node)
    }

    /// The node and instance of a job's instance with the given rank.
    pub fn instance(
        &self,
        caller: &Caller,
        job_id: &str,
        rank: u32,
    ) -> Result<(&Job, &Instance), ClusterError> {
        let job = self.job(caller, job_id)?;
        if job.instances.is_empty() {
            return Err(ClusterError::NoInstancesYet {
                job_id: job_id.to_string(),
                state: job.state,
                reason: job.reason.clone(),
            });
        }
        // The current run's instance, else the latest earlier one.
        let inst = job
            .current()
            .find(|i| i.rank == rank)
            .or_else(|| job.instances.iter().rev().find(|i| i.rank == rank))
            .ok_or_else(|| ClusterError::InstanceNotFound {
                job_id: job_id.to_string(),
                rank,
            })?;
        Ok((job, inst))
    }
}

/// What to tell an agent that reports an instance the scheduler does not
/// know: stop it while it runs, forget it once it ended.
fn unknown_instance_command(r: ReportedInstance, grace_ms: u32) -> AgentCommand {
    if r.state.is_terminal() {
        AgentCommand::Forget {
            instance_id: r.instance_id,
        }
    } else {
        AgentCommand::Stop {
            instance_id: r.instance_id,
            grace_ms,
            reason: "unknown to the scheduler".into(),
        }
    }
}

/// Takes what an agent reports of a live instance into the scheduler's
/// record of it; returns whether anything worth writing changed.
fn merge_report(
    inst: &mut Instance,
    r: &ReportedInstance,
    health_checked: bool,
    node_id: &str,
    grace_ms: u32,
    now_ms: i64,
    out: &mut Outbox,
) -> bool {
    let mut changed = false;
    if r.port != 0 && inst.port != r.port {
        inst.port = r.port;
        changed = true;
    }
    if !r.image_digest.is_empty() && inst.image_digest != r.image_digest {
        inst.image_digest = r.image_digest.clone();
        changed = true;
    }
    if inst.pull != r.pull {
        // Progress is kept in memory; the end of the pull is written.
        if inst.pull.is_some() && r.pull.is_none() {
            changed = true;
        }
        inst.pull = r.pull;
    }
    if let Some(idle) = r.idle_ms {
        // Kept in memory; written with the next change of the job.
        let at = now_ms - idle.min(i64::MAX as u64) as i64;
        inst.last_activity_ms = Some(inst.last_activity_ms.map_or(at, |t| t.max(at)));
    }
    if inst.state != r.state {
        if r.state == InstanceState::Running && inst.state == InstanceState::Stopping {
            // The agent has not seen our stop (it was disconnected, or the
            // stop is in flight): ask again; the agent ignores repeats.
            out.push((
                node_id.to_string(),
                AgentCommand::Stop {
                    instance_id: inst.instance_id.clone(),
                    grace_ms,
                    reason: inst.reason.clone(),
                },
            ));
        } else {
            inst.state = r.state;
            changed = true;
        }
    }
    // Ready: it runs (not being stopped) and passes its health check.
    let ready = r.state == InstanceState::Running
        && inst.state == InstanceState::Running
        && (r.ready || !health_checked);
    if inst.ready != ready {
        inst.ready = ready;
        changed = true;
    }
    if r.state == InstanceState::Running && inst.started_at_ms.is_none() {
        inst.started_at_ms = Some(now_ms);
        changed = true;
    }
    if r.state.is_terminal() {
        inst.ready = false;
        inst.exit_code = r.exit_code;
        inst.signal = r.signal;
        if !r.reason.is_empty() {
            inst.reason = r.reason.clone();
        }
        inst.finished_at_ms = Some(now_ms);
        out.push((
            node_id.to_string(),
            AgentCommand::Forget {
                instance_id: inst.instance_id.clone(),
            },
        ));
    }
    changed
}

/// Marks `inst` Stopping and tells its agent to stop it: SIGTERM to its
/// process group, SIGKILL after `grace_ms`. Its resources stay allocated
/// until the agent reports it ended.
fn stop_instance(inst: &mut Instance, grace_ms: u32, reason: &str, out: &mut Outbox) {
    inst.state = InstanceState::Stopping;
    out.push((
        inst.node_id.clone(),
        AgentCommand::Stop {
            instance_id: inst.instance_id.clone(),
            grace_ms,
            reason: reason.to_string(),
        },
    ));
}

/// A pass's wait as the last pass made it, if it is the same (so jobs
/// keep comparing by pointer), else itself, rendered once.
fn canonical_wait(
    last: &HashMap<Arc<scheduling::Wait>, Arc<str>>,
    why: Arc<scheduling::Wait>,
) -> (Arc<scheduling::Wait>, Arc<str>) {
    match last.get_key_value(&why) {
        Some((same, text)) => (same.clone(), text.clone()),
        None => {
            let text: Arc<str> = why.to_string().into();
            (why, text)
        }
    }
}

/// First port of the range MASTER_PORT is taken from (rank 0 listens there).
const MASTER_PORT_BASE: u32 = 29_500;

/// Seed of the placement's tie-breaking node order (stable per node id).
const PLACEMENT_SEED: u64 = 0x6770_7570_6f6f_6c00;

fn start_spec(
    job: &Job,
    inst: &Instance,
    pools: &BTreeMap<String, Pool>,
    nodes: &BTreeMap<String, Node>,
) -> StartSpec {
    let spec = &job.spec;
    // Distributed training (torchrun-style): rank 0's node is the master;
    // LOCAL_RANK numbers the job's instances on one node. The port is
    // derived from the job's sequence number (29500..30499), so concurrent
    // jobs rarely share one; RANK and WORLD_SIZE are set by the agent.
    let mut env = spec.env.clone();
    let master = job
        .current()
        .find(|i| i.rank == 0)
        .and_then(|i| nodes.get(&i.node_id));
    let master_net = job
        .current()
        .find(|i| i.rank == 0)
        .and_then(|i| i.net.as_ref());
    if let Some(master) = master {
        // On the job's network, rank 0's own address.
        let addr = master_net.map_or(master.address(), |n| n.address.as_str());
        env.insert("MASTER_ADDR".into(), addr.to_string());
        env.insert(
            "MASTER_PORT".into(),
            (MASTER_PORT_BASE + (job.seq % 1000) as u32).to_string(),
        );
    }
    let same_node: Vec<u32> = job
        .current()
        .filter(|i| i.node_id == inst.node_id)
        .map(|i| i.rank)
        .collect();
    env.insert(
        "LOCAL_RANK".into(),
        same_node
            .iter()
            .filter(|r| **r < inst.rank)
            .count()
            .to_string(),
    );
    env.insert("LOCAL_WORLD_SIZE".into(), same_node.len().to_string());
    if !spec.log_dir.is_empty() {
        env.insert("GPUPOOL_LOG_DIR".into(), spec.log_dir.clone());
    }
    if spec.priority_class == PriorityClass::Preemptible {
        // It may get SIGTERM and the stop grace to checkpoint at any time.
        env.insert("GPUPOOL_PREEMPTIBLE".into(), "1".into());
    }
    if !job.access_token.is_empty() {
        // Jupyter reads its token from JUPYTER_TOKEN too. Not GPUPOOL_TOKEN:
        // that is the CLI's API token, which a notebook's user may set.
        env.insert("GPUPOOL_NOTEBOOK_TOKEN".into(), job.access_token.clone());
        env.insert("JUPYTER_TOKEN".into(), job.access_token.clone());
    }
    StartSpec {
        instance_id: inst.instance_id.clone(),
        job_id: job.job_id.clone(),
        kind: spec.kind,
        command: spec.command.clone(),
        env,
        working_dir: spec.working_dir.clone(),
        gpu_indexes: inst.gpu_indexes.clone(),
        gpu_uuids: inst.gpu_uuids.clone(),
        resources: spec.resources.clone(),
        rank: inst.rank,
        world_size: spec.instances,
        metadata: {
            let mut m = pools
                .get(&job.pool_id)
                .map(Pool::instance_metadata)
                .unwrap_or_default();
            // The agent labels the GPU metrics with the tenant.
            m.insert("tenant".into(), job.tenant.clone());
            m
        },
        needs_port: spec.kind.serves(),
        port: spec.port,
        health_check: spec.health_check.clone(),
        image: spec.image.clone(),
        network: spec.network.clone(),
        watch_activity: spec.kind.interactive(),
        attach: networks::attach_of(job, inst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Gpu;
    use crate::store::SqliteStore;
    use crate::store::mem::MemStore;

    mod billing;
    mod drain;
    mod kinds;
    mod limits;
    mod networks;
    mod shapes;
    mod share;
    mod store_contract;

    fn settings() -> Settings {
        Settings {
            node_grace_ms: 1_000,
            stop_grace_ms: 500,
            preemption_min_runtime_ms: 0,
            fair_share_half_life_ms: 0,
            fair_share_preemption: false,
            subscription_regions: vec!["region-1".into()],
            currency: "USD".into(),
            prices: BTreeMap::new(),
            default_price: crate::domain::billing::SpecPrice {
                on_demand_node_hour_micros: 3_600_000,
                subscription_node_month_micros: 1_000_000_000,
                public_instance_hour_micros: 360_000,
                preemptible_instance_hour_micros: Some(120_000),
            },
            frozen_retention_ms: 24 * 3_600_000,
            kinds: KindTable::default(),
            limits: JobLimits::default(),
            token_key: SecretKey(vec![7; 32]),
            networks: None,
            custom_networks: Default::default(),
        }
    }

    fn open(dir: &std::path::Path, now: i64) -> Cluster {
        let store = SqliteStore::open(&dir.join("t.db")).unwrap();
        Cluster::load(Box::new(store), settings(), now).unwrap()
    }

    /// A cluster on the in-memory store, for tests not about the database.
    fn open_mem(now: i64) -> Cluster {
        Cluster::load(Box::new(MemStore::new()), settings(), now).unwrap()
    }

    fn admin() -> Caller {
        Caller::admin()
    }

    fn inventory(gpus: u32) -> Inventory {
        Inventory {
            hostname: "h".into(),
            cpu_cores: 8,
            memory_mib: 32 * 1024,
            gpus: (0..gpus)
                .map(|i| Gpu {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    model: "H100".into(),
                    memory_total_mib: 80 * 1024,
                    healthy: true,
                    health_reason: String::new(),
                    mig_enabled: false,
                    pci_bus_id: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn raw(gpus: i64) -> RawJobSpec {
        RawJobSpec {
            kind: Some(JobKind::Training),
            command: vec!["true".into()],
            instances: 1,
            gpus,
            ..Default::default()
        }
    }

    fn report(id: &str, state: InstanceState, code: Option<i32>) -> ReportedInstance {
        ReportedInstance {
            instance_id: id.into(),
            state,
            exit_code: code,
            signal: None,
            reason: String::new(),
            port: 0,
            ready: false,
            idle_ms: None,
            image_digest: String::new(),
            pull: None,
        }
    }

    #[test]
    fn job_runs_through_its_lifecycle_and_frees_its_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("n1", inventory(2), 0).unwrap();
        let mut out = Outbox::new();
        let job = c.submit(&admin(), raw(2), 10, &mut out).unwrap();
        assert_eq!(job.state, JobState::Scheduled);
        assert!(
            matches!(&out[..], [(n, AgentCommand::Start(s))] if n == "n1" && s.gpu_uuids == ["GPU-0", "GPU-1"])
        );
        // A second job waits: both GPUs are taken.
        let waiting = c.submit(&admin(), raw(1), 11, &mut out).unwrap();
        assert_eq!(waiting.state, JobState::Queued);
        let id = format!("{}-0", job.job_id);
        out.clear();
        c.heartbeat(
            "n1",
            None,
            vec![report(&id, InstanceState::Running, None)],
            20,
            &mut out,
        );
        assert_eq!(
            c.job(&admin(), &job.job_id).unwrap().state,
            JobState::Running
        );
        c.heartbeat(
            "n1",
            None,
            vec![report(&id, InstanceState::Succeeded, Some(0))],
            30,
            &mut out,
        );
        let done = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.finished_at_ms, Some(30));
        // The agent is told to forget it, and the waiting job gets a GPU.
        assert!(out.iter().any(|(_, cmd)| *cmd
            == AgentCommand::Forget {
                instance_id: id.clone()
            }));
        assert_eq!(
            c.job(&admin(), &waiting.job_id).unwrap().state,
            JobState::Scheduled
        );
    }

    /// Backfill never uses a node the blocked head job could use; a head
    /// that cannot fit even on the idle pool blocks nothing.
    #[test]
    fn backfill_keeps_off_the_nodes_the_head_job_can_use() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("big", inventory(8), 0).unwrap();
        let mut small = inventory(2);
        for g in &mut small.gpus {
            g.model = "L4".into();
        }
        c.register_node("small", small, 0).unwrap();
        let mut out = Outbox::new();
        let node_of = |c: &Cluster, id: &str| {
            let j = c.job(&admin(), id).unwrap();
            (j.state, j.instances.first().map(|i| i.node_id.clone()))
        };
        let a = c.submit(&admin(), raw(4), 1, &mut out).unwrap();
        assert_eq!(node_of(&c, &a.job_id).1.as_deref(), Some("big"));
        let head = c.submit(&admin(), raw(8), 2, &mut out).unwrap();
        assert_eq!(head.state, JobState::Queued);
        // 1-GPU jobs would fit on "big" (4 free) but it is the head's.
        let b = c.submit(&admin(), raw(1), 3, &mut out).unwrap();
        assert_eq!(
            node_of(&c, &b.job_id),
            (JobState::Scheduled, Some("small".into()))
        );
        let d = c.submit(&admin(), raw(1), 4, &mut out).unwrap();
        assert_eq!(node_of(&c, &d.job_id).1.as_deref(), Some("small"));
        let e = c.submit(&admin(), raw(1), 5, &mut out).unwrap();
        let e = c.job(&admin(), &e.job_id).unwrap();
        assert_eq!(e.state, JobState::Queued);
        assert!(e.reason.contains(&head.job_id), "{}", e.reason);
        // A job nothing can ever host (16 GPUs) reserves nothing.
        let dir2 = tempfile::tempdir().unwrap();
        let mut c2 = open(dir2.path(), 0);
        c2.register_node("big", inventory(8), 0).unwrap();
        let never = c2.submit(&admin(), raw(16), 1, &mut out).unwrap();
        assert_eq!(never.state, JobState::Queued);
        let f = c2.submit(&admin(), raw(1), 2, &mut out).unwrap();
        assert_eq!(f.state, JobState::Scheduled);
    }

    /// A queue of any depth costs the jobs that changed, not the queue:
    /// when the head starts and the next job becomes the head, the others'
    /// reason ("behind" the new head) changes in memory only.
    #[test]
    fn a_new_head_does_not_rewrite_the_queue() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting {
            inner: MemStore,
            jobs: Arc<AtomicUsize>,
        }
        impl Store for Counting {
            fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
                self.inner.load()
            }
            fn ledger(
                &self,
                from_ms: i64,
                to_ms: i64,
            ) -> Result<Vec<crate::domain::billing::LedgerRow>, StoreError> {
                self.inner.ledger(from_ms, to_ms)
            }
            fn audit_page(
                &self,
                q: &crate::domain::audit::AuditQuery,
            ) -> Result<Vec<crate::domain::audit::AuditEntry>, StoreError> {
                self.inner.audit_page(q)
            }
            fn audit_max_seq(&self) -> Result<u64, StoreError> {
                self.inner.audit_max_seq()
            }
            fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError> {
                let jobs = records
                    .iter()
                    .filter(|r| matches!(r, Record::Job(_)))
                    .count();
                self.jobs.fetch_add(jobs, Ordering::Relaxed);
                self.inner.write(records, now_ms)
            }
        }
        let written = Arc::new(AtomicUsize::new(0));
        let store = Counting {
            inner: MemStore::new(),
            jobs: written.clone(),
        };
        let mut c = Cluster::load(Box::new(store), settings(), 0).unwrap();
        c.register_node("n1", inventory(1), 0).unwrap();
        let mut out = Outbox::new();
        let first = c.submit(&admin(), raw(1), 1, &mut out).unwrap();
        let queued: Vec<String> = (0..30)
            .map(|i| c.submit(&admin(), raw(1), 2 + i, &mut out).unwrap().job_id)
            .collect();
        let reason = |c: &Cluster, id: &str| c.job(&admin(), id).unwrap().reason.clone();
        assert!(
            reason(&c, &queued[5]).contains(&queued[0]),
            "{}",
            reason(&c, &queued[5])
        );
        let before = written.load(Ordering::Relaxed);
        let inst = first.instances[0].instance_id.clone();
        let done = vec![report(&inst, InstanceState::Succeeded, Some(0))];
        c.heartbeat("n1", None, done, 100, &mut out);
        assert_eq!(
            c.job(&admin(), &queued[0]).unwrap().state,
            JobState::Scheduled
        );
        assert!(
            reason(&c, &queued[5]).contains(&queued[1]),
            "{}",
            reason(&c, &queued[5])
        );
        let jobs_written = written.load(Ordering::Relaxed) - before;
        assert!(
            jobs_written <= 3,
            "{jobs_written} job records written for one job ending and one starting"
        );
    }

    /// max_retries: a job on a node that dies is queued again and placed
    /// elsewhere as a new run; when its retries are spent, a failure ends it.
    #[test]
    fn a_start_command_s_debug_shows_no_environment_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("n1", inventory(1), 0).unwrap();
        let mut out = Outbox::new();
        let mut spec = raw(1);
        spec.env.insert("HF_TOKEN".into(), "hf-very-secret".into());
        spec.command = vec!["train".into(), "--key=argv-secret".into()];
        c.submit(&admin(), spec, 0, &mut out).unwrap();
        let text = format!("{out:?}");
        assert!(
            text.contains("HF_TOKEN") && text.contains("StartSpec"),
            "{text}"
        );
        assert!(
            !text.contains("hf-very-secret") && !text.contains("argv-secret"),
            "{text}"
        );
    }

    #[test]
    fn lost_and_failed_runs_are_retried_up_to_max_retries() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("n1", inventory(1), 0).unwrap();
        let mut out = Outbox::new();
        let mut spec = raw(1);
        spec.max_retries = 1;
        let job = c.submit(&admin(), spec, 0, &mut out).unwrap();
        assert_eq!(job.instances[0].node_id, "n1");
        c.register_node("n2", inventory(1), 500).unwrap();
        // n1 falls silent; n2 keeps heartbeating.
        c.heartbeat("n2", None, vec![], 1_000, &mut out);
        out.clear();
        c.tick(1_001, &mut out);
        let j = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(j.retries, 1);
        // The retry waits out its backoff (1 s), then is placed.
        assert_eq!(j.state, JobState::Queued, "{}", j.reason);
        c.heartbeat("n2", None, vec![], 2_000, &mut out);
        c.tick(2_001, &mut out);
        let j = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(j.state, JobState::Scheduled, "{}", j.reason);
        let run: Vec<&Instance> = j.current().collect();
        assert_eq!(run.len(), 1);
        assert_eq!(run[0].node_id, "n2");
        assert_eq!(run[0].instance_id, format!("{}-0-r1", job.job_id));
        assert_eq!(j.instances.len(), 2, "the lost run stays for the record");
        assert!(
            out.iter()
                .any(|(n, cmd)| n == "n2" && matches!(cmd, AgentCommand::Start(_)))
        );
        // The retry fails: no retries left, the job ends Failed.
        let id = run[0].instance_id.clone();
        c.heartbeat(
            "n2",
            None,
            vec![report(&id, InstanceState::Failed, Some(3))],
            2_100,
            &mut out,
        );
        let j = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.retries, 1);
    }

    #[test]
    fn silent_node_goes_not_ready_and_its_instances_are_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("n1", inventory(1), 0).unwrap();
        let mut out = Outbox::new();
        let job = c.submit(&admin(), raw(1), 0, &mut out).unwrap();
        c.tick(1_000, &mut out);
        assert_eq!(c.node("n1").unwrap().status, NodeStatus::Ready);
        c.tick(1_001, &mut out);
        assert_eq!(c.node("n1").unwrap().status, NodeStatus::NotReady);
        let lost = c.job(&admin(), &job.job_id).unwrap();
        assert_eq!(lost.state, JobState::Lost);
        assert!(lost.reason.contains("NotReady"), "{}", lost.reason);
        // When it comes back running the lost instance, the agent is told to stop it.
        out.clear();
        let id = format!("{}-0", job.job_id);
        c.hello(
            "n1",
            vec![report(&id, InstanceState::Running, None)],
            2_000,
            &mut out,
        );
        assert_eq!(c.node("n1").unwrap().status, NodeStatus::Ready);
        assert!(out.iter().any(
            |(_, cmd)| matches!(cmd, AgentCommand::Stop { instance_id, .. } if *instance_id == id)
        ));
    }

    #[test]
    fn unknown_instances_are_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("n1", inventory(0), 0).unwrap();
        let mut out = Outbox::new();
        c.hello(
            "n1",
            vec![report("stray-0", InstanceState::Running, None)],
            1,
            &mut out,
        );
        assert!(
            matches!(&out[..], [(_, AgentCommand::Stop { instance_id, .. })] if instance_id == "stray-0")
        );
    }

    #[test]
    fn state_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (job_id, queued_id) = {
            let mut c = open(dir.path(), 0);
            c.register_node("n1", inventory(1), 0).unwrap();
            let mut out = Outbox::new();
            let a = c.submit(&admin(), raw(1), 1, &mut out).unwrap();
            let b = c.submit(&admin(), raw(4), 2, &mut out).unwrap();
            (a.job_id, b.job_id)
        };
        let mut c = open(dir.path(), 5_000);
        assert_eq!(c.nodes().count(), 1);
        assert_eq!(c.job(&admin(), &job_id).unwrap().state, JobState::Scheduled);
        assert_eq!(c.job(&admin(), &queued_id).unwrap().state, JobState::Queued);
        // Reloaded nodes get a fresh grace to reconnect; ids keep counting.
        let mut out = Outbox::new();
        c.tick(5_500, &mut out);
        assert_eq!(c.node("n1").unwrap().status, NodeStatus::Ready);
        let next = c.submit(&admin(), raw(0), 5_600, &mut out).unwrap();
        assert_eq!(next.seq, 3);
        // A reconnecting agent that never got the Start is sent it again.
        out.clear();
        c.hello("n1", vec![], 5_700, &mut out);
        assert!(
            out.iter()
                .any(|(_, cmd)| matches!(cmd, AgentCommand::Start(s) if s.job_id == job_id))
        );
    }

    #[test]
    fn cancel_stops_running_instances_and_refuses_ended_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), 0);
        c.register_node("n1", inventory(1), 0).unwrap();
        let mut out = Outbox::new();
        let job = c.submit(&admin(), raw(1), 0, &mut out).unwrap();
        out.clear();
        let cancelled = c.cancel(&admin(), &job.job_id, 5, &mut out).unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(matches!(
            &out[..],
            [(_, AgentCommand::Stop { grace_ms: 500, .. })]
        ));
        // GPUs stay allocated until the agent confirms the stop.
        assert_eq!(c.usage()["n1"].gpu_milli, vec![1000]);
        let id = format!("{}-0", job.job_id);
        c.heartbeat(
            "n1",
            None,
            vec![report(&id, InstanceState::Stopped, None)],
            9,
            &mut out,
        );
        assert_eq!(c.usage()["n1"].gpu_milli, vec![0]);
        assert!(matches!(
            c.cancel(&admin(), &job.job_id, 10, &mut out),
            Err(ClusterError::NothingToCancel { .. })
        ));
        assert!(matches!(
            c.cancel(&admin(), "nope", 10, &mut out),
            Err(ClusterError::JobNotFound { .. })
        ));
    }
}
