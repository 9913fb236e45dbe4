//! Dedicated resource pools: the product rules R-POOL-*, R-DED-*,
//! R-CREATE-*, R-SCALE-*, R-DEL-* that are not about money, as pure
//! functions over plain data. Billing fields are validated for shape and
//! stored; prices and the ledger belong to billing.

use serde::{Deserialize, Serialize};

use super::job::JobKind;

/// R-DED-2: the two types of dedicated pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolType {
    /// Development/training: notebook, training, tensorboard.
    Train,
    /// Deployment: online and batch services.
    Deploy,
}

impl PoolType {
    /// R-DED-2 (and R-CREATE-2 / R-CREATE-10: the resource type is fixed by
    /// the pool type).
    pub fn accepts(self, kind: JobKind) -> bool {
        match self {
            PoolType::Train => matches!(
                kind,
                JobKind::Notebook | JobKind::Training | JobKind::Tensorboard
            ),
            PoolType::Deploy => matches!(kind, JobKind::OnlineService | JobKind::BatchService),
        }
    }

    pub fn kinds(self) -> &'static str {
        match self {
            PoolType::Train => "notebook, training and tensorboard jobs",
            PoolType::Deploy => "online and batch services",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PoolType::Train => "train",
            PoolType::Deploy => "deploy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolStatus {
    Creating,
    Running,
    Scaling,
    Abnormal,
    Unavailable,
    CreateFailed,
    Deleting,
    Deleted,
    /// A subscription lapsed without renewal or conversion: no jobs run;
    /// released after the retention.
    Frozen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BillingMode {
    OnDemand,
    Subscription,
}

impl PoolStatus {
    /// The `pools.status` column's text. Existing databases hold these
    /// strings: a rename of a variant must not change them.
    pub fn as_db_str(self) -> &'static str {
        match self {
            Self::Creating => "Creating",
            Self::Running => "Running",
            Self::Scaling => "Scaling",
            Self::Abnormal => "Abnormal",
            Self::Unavailable => "Unavailable",
            Self::CreateFailed => "CreateFailed",
            Self::Deleting => "Deleting",
            Self::Deleted => "Deleted",
            Self::Frozen => "Frozen",
        }
    }

    /// The status a `pools.status` column holds; None for an unknown string.
    pub fn from_db_str(s: &str) -> Option<Self> {
        Some(match s {
            "Creating" => Self::Creating,
            "Running" => Self::Running,
            "Scaling" => Self::Scaling,
            "Abnormal" => Self::Abnormal,
            "Unavailable" => Self::Unavailable,
            "CreateFailed" => Self::CreateFailed,
            "Deleting" => Self::Deleting,
            "Deleted" => Self::Deleted,
            "Frozen" => Self::Frozen,
            _ => return None,
        })
    }
}

impl BillingMode {
    /// The `ledger.mode` column's text: part of the ledger's primary key
    /// and of its page cursor (usage page tokens carry it), so a rename of
    /// a variant must not change it.
    pub fn as_db_str(self) -> &'static str {
        match self {
            Self::OnDemand => "OnDemand",
            Self::Subscription => "Subscription",
        }
    }

    /// The mode a `ledger.mode` column holds; None for an unknown string.
    pub fn from_db_str(s: &str) -> Option<Self> {
        Some(match s {
            "OnDemand" => Self::OnDemand,
            "Subscription" => Self::Subscription,
            _ => return None,
        })
    }
}

/// Subscription terms as chosen (R-CREATE-8, R-CREATE-9, R-CREATE-17, R-BILL-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionTerms {
    pub months: u32,
    pub auto_renew: bool,
    pub convert_to_on_demand_at_expiry: bool,
}

/// R-CREATE-14.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    Custom {
        vpc_id: String,
        subnet_id: String,
        security_group_ids: Vec<String>,
    },
    /// The tenant's own network, isolated from other tenants.
    Isolated { network_id: String },
}

/// The zones of R-CREATE-15.
pub const ZONES: [&str; 3] = ["AZ1", "AZ2", "AZ3"];

/// A create request before validation.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub pool_type: Option<PoolType>,
    pub name: String,
    pub description: String,
    pub spec: String,
    pub node_count: u32,
    /// "random", "AZ1".."AZ3"; empty = random.
    pub az: String,
    /// None = the tenant's isolated network.
    pub custom_network: Option<(String, String, Vec<String>)>,
    /// Instances reach nothing outside their network.
    pub no_egress: bool,
    pub billing_mode: Option<BillingMode>,
    pub subscription: Option<SubscriptionTerms>,
    pub region: String,
}

/// A request that passed every shape rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCreate {
    pub pool_type: PoolType,
    pub name: String,
    pub description: String,
    pub spec: String,
    pub node_count: u32,
    /// None = random (R-CREATE-15); train pools take nodes from any zone.
    pub zone: Option<String>,
    pub custom_network: Option<Network>,
    pub no_egress: bool,
    pub billing_mode: BillingMode,
    pub subscription: Option<SubscriptionTerms>,
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("R-CREATE-14: custom network: {0}")]
    UnknownNetwork(String),
    #[error(
        "no_egress needs instance networks (the scheduler's [networks] enabled = true); without them instances use the host's network"
    )]
    EgressWithoutNetworks,
    #[error(
        "R-CREATE-1: choose the pool type: train (development/training) or deploy (deployment)"
    )]
    MissingType,
    #[error(
        "R-CREATE-4: train pool name {0:?} is invalid: use 1 to 64 upper- and lower-case letters, digits, hyphens and underscores"
    )]
    BadTrainName(String),
    #[error("R-CREATE-12: deploy pool name {name:?} is invalid: {why}")]
    BadDeployName { name: String, why: &'static str },
    #[error("R-CREATE-5/13: description must be at most 1024 characters")]
    DescriptionTooLong,
    #[error("R-CREATE-6/16: node count must be at least 1")]
    ZeroNodes,
    #[error("R-CREATE-7: choose a node spec (see `gpupool spec list`)")]
    MissingSpec,
    #[error("R-CREATE-7: spec {0:?} does not exist (see `gpupool spec list`)")]
    UnknownSpec(String),
    #[error(
        "R-CREATE-7: spec {spec} is sold out: {wanted} node(s) asked, {free} free{zone}; it can be bought again after other pools are deleted"
    )]
    SoldOut {
        spec: String,
        wanted: u32,
        free: u32,
        zone: String,
    },
    #[error("R-CREATE-3: choose the billing mode: on-demand or subscription")]
    MissingBillingMode,
    #[error("R-CREATE-8: a train pool subscription lasts 1 to 12 months (got {0})")]
    TrainMonths(u32),
    #[error("R-CREATE-17: a deploy pool subscription lasts 1 to 11 months (got {0})")]
    DeployMonths(u32),
    #[error("R-CREATE-8: a subscription needs its duration in months")]
    MissingMonths,
    #[error("subscription terms are only for the subscription billing mode")]
    TermsWithoutSubscription,
    #[error(
        "R-CREATE-11: deploy pool subscriptions are sold only in region(s) {allowed}; got {region:?}"
    )]
    RegionNotSold { region: String, allowed: String },
    #[error("R-CREATE-15: availability zone must be random, AZ1, AZ2 or AZ3 (got {0:?})")]
    BadZone(String),
    #[error("R-CREATE-15: only deploy pools choose an availability zone")]
    ZoneOnTrainPool,
    #[error("R-CREATE-14: a custom network needs a VPC id and a subnet id")]
    IncompleteNetwork,
    #[error("R-CREATE-14: only deploy pools take a custom network")]
    NetworkOnTrainPool,
    #[error("a pool named {0:?} already exists")]
    NameTaken(String),
    #[error("R-DED-3: pool {pool} is {status:?}{reason}; only a Running pool accepts jobs")]
    NotRunning {
        pool: String,
        status: PoolStatus,
        reason: String,
    },
    #[error("R-DED-2: pool {pool} is a {pool_type} pool: it runs {kinds} only, not {}", kind.name())]
    WrongKind {
        pool: String,
        pool_type: &'static str,
        kinds: &'static str,
        kind: JobKind,
    },
    #[error(
        "R-DEL-5: deleting pool {0} cannot be undone; confirm it explicitly (confirm=true, or --yes)"
    )]
    NotConfirmed(String),
    #[error(
        "R-DEL-3: pool {0} is a subscription pool: release it by unsubscribing, which refunds the order"
    )]
    SubscriptionDelete(String),
    #[error("pool {pool} is {status:?}; {what} is not possible now")]
    Busy {
        pool: String,
        status: PoolStatus,
        what: &'static str,
    },
    #[error("R-SCALE-3: node {node} is not in pool {pool}")]
    NodeNotInPool { node: String, pool: String },
    #[error("R-SCALE-3: pool {0} must keep at least one node; delete the pool instead")]
    WouldBeEmpty(String),
    #[error(
        "R-SCALE-3: node {node} runs {count} instance(s) of job(s) {jobs}; scale in with force to stop them"
    )]
    NodeBusy {
        node: String,
        count: usize,
        jobs: String,
    },
    #[error("R-SCALE-1: scale out by at least one node")]
    ZeroScale,
}

/// R-CREATE-4.
pub fn validate_train_name(name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(PoolError::BadTrainName(name.to_string()))
    }
}

/// R-CREATE-12.
pub fn validate_deploy_name(name: &str) -> Result<(), PoolError> {
    let bad = |why| {
        Err(PoolError::BadDeployName {
            name: name.to_string(),
            why,
        })
    };
    let len = name.chars().count();
    if !(4..=24).contains(&len) {
        return bad("length must be 4 to 24");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("it must start with a lower-case letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return bad("only lower-case letters, digits and hyphens are allowed");
    }
    if name.ends_with('-') {
        return bad("it must not end with a hyphen");
    }
    Ok(())
}

/// Every shape rule of R-CREATE-1..17. `subscription_regions` is the
/// configured set of regions where deploy pools may be bought by
/// subscription (R-CREATE-11).
pub fn validate_create(
    req: CreateRequest,
    subscription_regions: &[String],
) -> Result<ValidCreate, PoolError> {
    let pool_type = req.pool_type.ok_or(PoolError::MissingType)?;
    match pool_type {
        PoolType::Train => validate_train_name(&req.name)?,
        PoolType::Deploy => validate_deploy_name(&req.name)?,
    }
    if req.description.chars().count() > 1024 {
        return Err(PoolError::DescriptionTooLong);
    }
    if req.node_count == 0 {
        return Err(PoolError::ZeroNodes);
    }
    if req.spec.trim().is_empty() {
        return Err(PoolError::MissingSpec);
    }
    let billing_mode = req.billing_mode.ok_or(PoolError::MissingBillingMode)?;
    let subscription = match (billing_mode, req.subscription) {
        (BillingMode::OnDemand, Some(_)) => return Err(PoolError::TermsWithoutSubscription),
        (BillingMode::OnDemand, None) => None,
        (BillingMode::Subscription, None) => return Err(PoolError::MissingMonths),
        (BillingMode::Subscription, Some(terms)) => {
            match pool_type {
                PoolType::Train if !(1..=12).contains(&terms.months) => {
                    return Err(PoolError::TrainMonths(terms.months));
                }
                PoolType::Deploy if !(1..=11).contains(&terms.months) => {
                    return Err(PoolError::DeployMonths(terms.months));
                }
                _ => {}
            }
            if pool_type == PoolType::Deploy && !subscription_regions.contains(&req.region) {
                return Err(PoolError::RegionNotSold {
                    region: req.region.clone(),
                    allowed: if subscription_regions.is_empty() {
                        "(none configured)".into()
                    } else {
                        subscription_regions.join(", ")
                    },
                });
            }
            Some(terms)
        }
    };
    let az = req.az.trim();
    let zone = match pool_type {
        PoolType::Train if !az.is_empty() && !az.eq_ignore_ascii_case("random") => {
            return Err(PoolError::ZoneOnTrainPool);
        }
        PoolType::Train => None,
        PoolType::Deploy if az.is_empty() || az.eq_ignore_ascii_case("random") => None,
        PoolType::Deploy => match ZONES.iter().find(|z| z.eq_ignore_ascii_case(az)) {
            Some(z) => Some(z.to_string()),
            None => return Err(PoolError::BadZone(az.to_string())),
        },
    };
    let custom_network = match (pool_type, req.custom_network) {
        (_, None) => None,
        (PoolType::Train, Some(_)) => return Err(PoolError::NetworkOnTrainPool),
        (PoolType::Deploy, Some((vpc, subnet, groups))) => {
            if vpc.trim().is_empty() || subnet.trim().is_empty() {
                return Err(PoolError::IncompleteNetwork);
            }
            Some(Network::Custom {
                vpc_id: vpc,
                subnet_id: subnet,
                security_group_ids: groups,
            })
        }
    };
    Ok(ValidCreate {
        pool_type,
        name: req.name,
        description: req.description,
        spec: req.spec,
        node_count: req.node_count,
        zone,
        custom_network,
        no_egress: req.no_egress,
        billing_mode,
        subscription,
        region: req.region,
    })
}

/// A node that could join a pool: Ready, in the public pool, not cordoned,
/// running nothing (creation never evicts public jobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeNode {
    pub node_id: String,
    pub spec: String,
    pub az: String,
    pub gpus: u32,
}

/// R-CREATE-7 / R-CREATE-15: picks `count` free nodes of `spec`, all in one
/// zone for deploy pools (`zone` None = random: a zone is drawn with `seed`
/// among the zones that can satisfy the request). Returns the nodes (lowest
/// ids first) and the zone.
pub fn choose_nodes(
    free: &[FreeNode],
    spec: &str,
    count: u32,
    pool_type: PoolType,
    zone: Option<&str>,
    seed: u64,
) -> Result<(Vec<String>, String), PoolError> {
    let mut of_spec: Vec<&FreeNode> = free.iter().filter(|n| n.spec == spec).collect();
    of_spec.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let sold_out = |free: usize, zone: String| PoolError::SoldOut {
        spec: spec.to_string(),
        wanted: count,
        free: free as u32,
        zone,
    };
    let take = |nodes: Vec<&FreeNode>| {
        nodes
            .into_iter()
            .take(count as usize)
            .map(|n| n.node_id.clone())
            .collect()
    };
    if pool_type == PoolType::Train {
        if of_spec.len() < count as usize {
            return Err(sold_out(of_spec.len(), String::new()));
        }
        return Ok((take(of_spec), String::new()));
    }
    let in_zone =
        |z: &str| -> Vec<&FreeNode> { of_spec.iter().copied().filter(|n| n.az == z).collect() };
    match zone {
        Some(z) => {
            let nodes = in_zone(z);
            if nodes.len() < count as usize {
                return Err(sold_out(nodes.len(), format!(" in {z}")));
            }
            Ok((take(nodes), z.to_string()))
        }
        None => {
            let fitting: Vec<&str> = ZONES
                .iter()
                .copied()
                .filter(|z| in_zone(z).len() >= count as usize)
                .collect();
            if fitting.is_empty() {
                let best = ZONES.iter().map(|z| in_zone(z).len()).max().unwrap_or(0);
                return Err(sold_out(best, " in any single zone".into()));
            }
            let z = fitting[(seed % fitting.len() as u64) as usize];
            Ok((take(in_zone(z)), z.to_string()))
        }
    }
}

/// One node's health as the pool status sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    pub node_id: String,
    pub ready: bool,
    /// (GPU index, reason) of unhealthy GPUs.
    pub unhealthy_gpus: Vec<(u32, String)>,
}

/// R-DED-3 (and R-CREATE-18): the status a pool should show now. Lifecycle
/// states (Deleting, Deleted, CreateFailed) are kept; Creating becomes
/// Running once every node is Ready, or CreateFailed if one is not;
/// Scaling stays while `draining` nodes are still being emptied or a new
/// node is not Ready yet; otherwise the status follows node health.
pub fn derive_status(
    current: PoolStatus,
    nodes: &[NodeHealth],
    draining: bool,
) -> (PoolStatus, String) {
    use PoolStatus::*;
    if matches!(current, Deleting | Deleted | CreateFailed | Frozen) {
        return (current, String::new());
    }
    let not_ready: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.ready)
        .map(|n| n.node_id.as_str())
        .collect();
    if current == Creating {
        return if not_ready.is_empty() {
            (Running, String::new())
        } else {
            (
                CreateFailed,
                format!("node(s) {} not Ready during creation", not_ready.join(", ")),
            )
        };
    }
    if current == Scaling && (draining || !not_ready.is_empty()) {
        let why = if draining {
            "removing nodes"
        } else {
            "waiting for new nodes to be Ready"
        };
        return (Scaling, why.into());
    }
    if !nodes.is_empty() && not_ready.len() == nodes.len() {
        return (
            Unavailable,
            format!("no node Ready ({} NotReady)", not_ready.join(", ")),
        );
    }
    let mut causes: Vec<String> = not_ready
        .iter()
        .map(|n| format!("node {n} NotReady"))
        .collect();
    for n in nodes {
        for (gpu, reason) in &n.unhealthy_gpus {
            causes.push(format!(
                "node {} GPU {gpu} unhealthy{}",
                n.node_id,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ));
        }
    }
    if causes.is_empty() {
        (Running, String::new())
    } else {
        (Abnormal, causes.join("; "))
    }
}

/// R-DED-3 and R-DED-2: may a job of `kind` be submitted to this pool now?
pub fn admit_job(
    pool_id: &str,
    pool_type: PoolType,
    status: PoolStatus,
    reason: &str,
    kind: JobKind,
) -> Result<(), PoolError> {
    if status != PoolStatus::Running {
        return Err(PoolError::NotRunning {
            pool: pool_id.to_string(),
            status,
            reason: if reason.is_empty() {
                String::new()
            } else {
                format!(" ({reason})")
            },
        });
    }
    if !pool_type.accepts(kind) {
        return Err(PoolError::WrongKind {
            pool: pool_id.to_string(),
            pool_type: pool_type.name(),
            kinds: pool_type.kinds(),
            kind,
        });
    }
    Ok(())
}

/// R-DEL-1..5: may the pool be deleted?
pub fn check_delete(
    pool_id: &str,
    status: PoolStatus,
    billing: BillingMode,
    confirm: bool,
) -> Result<(), PoolError> {
    if !confirm {
        return Err(PoolError::NotConfirmed(pool_id.to_string()));
    }
    if matches!(status, PoolStatus::Deleting | PoolStatus::Deleted) {
        return Err(PoolError::Busy {
            pool: pool_id.to_string(),
            status,
            what: "deleting it again",
        });
    }
    // A pool whose creation failed is removed with delete (R-DEL-4), even a
    // subscription one: nothing was delivered.
    if billing == BillingMode::Subscription && status != PoolStatus::CreateFailed {
        return Err(PoolError::SubscriptionDelete(pool_id.to_string()));
    }
    Ok(())
}

/// A node of a pool as the scale-in rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolNode {
    pub node_id: String,
    /// Active instances and their jobs.
    pub job_ids: Vec<String>,
    pub gpus: u32,
    pub free_whole_gpus: u32,
}

/// R-SCALE-3: the user names the nodes to remove. Nodes running instances
/// are refused unless `force`.
pub fn check_scale_in(
    pool_id: &str,
    nodes: &[PoolNode],
    remove: &[String],
    force: bool,
) -> Result<(), PoolError> {
    if remove.is_empty() {
        return Err(PoolError::ZeroScale);
    }
    for id in remove {
        let Some(node) = nodes.iter().find(|n| &n.node_id == id) else {
            return Err(PoolError::NodeNotInPool {
                node: id.clone(),
                pool: pool_id.to_string(),
            });
        };
        if !force && !node.job_ids.is_empty() {
            let mut jobs = node.job_ids.clone();
            jobs.dedup();
            return Err(PoolError::NodeBusy {
                node: id.clone(),
                count: node.job_ids.len(),
                jobs: jobs.join(", "),
            });
        }
    }
    let mut unique = remove.to_vec();
    unique.sort();
    unique.dedup();
    if unique.len() >= nodes.len() {
        return Err(PoolError::WouldBeEmpty(pool_id.to_string()));
    }
    Ok(())
}

/// One step of a scale-in plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleInPick {
    pub node_id: String,
    pub instances_disrupted: u32,
    pub job_ids: Vec<String>,
    pub free_gpus: u32,
    pub pool_free_gpus_after: u32,
    pub pool_fragmented_gpus_after: u32,
    pub explanation: String,
}

/// The scale-in advisor: which `count` nodes to remove, least disruptive
/// first. Greedy, one node at a time, by (instances disrupted, free whole
/// GPUs left stranded on partly used nodes afterwards, GPUs lost from the
/// pool's free capacity beyond what the node itself held, node id). Empty
/// nodes go first; among them, removing a node never strands capacity, so
/// the tie goes to the node id. Busy nodes are picked last and only when
/// `count` demands it, and the explanation says what would stop.
pub fn plan_scale_in(nodes: &[PoolNode], count: u32) -> Vec<ScaleInPick> {
    let mut remaining: Vec<PoolNode> = nodes.to_vec();
    let mut picks = Vec::new();
    // A pool keeps at least one node.
    let count = (count as usize).min(nodes.len().saturating_sub(1));
    for _ in 0..count {
        let score = |i: usize| {
            let node = &remaining[i];
            let after: Vec<&PoolNode> = remaining
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, n)| n)
                .collect();
            let (free, fragmented) = free_and_fragmented(&after);
            (
                node.job_ids.len(),
                fragmented,
                u32::MAX - free,
                node.node_id.clone(),
            )
        };
        let best = (0..remaining.len())
            .min_by_key(|&i| score(i))
            .expect("nodes remain");
        let node = remaining.remove(best);
        let (free_after, fragmented_after) =
            free_and_fragmented(&remaining.iter().collect::<Vec<_>>());
        let disrupted = node.job_ids.len() as u32;
        let mut jobs = node.job_ids.clone();
        jobs.sort();
        jobs.dedup();
        let impact = if disrupted == 0 {
            "runs nothing, so no work is disrupted".to_string()
        } else {
            format!(
                "runs {disrupted} instance(s) of job(s) {}: they would be stopped (scale in with --force)",
                jobs.join(", ")
            )
        };
        let explanation = format!(
            "{}: {impact}; {} of its {} GPU(s) are free; afterwards the pool keeps {} free whole GPU(s), {} of them on partly used nodes",
            node.node_id, node.free_whole_gpus, node.gpus, free_after, fragmented_after
        );
        picks.push(ScaleInPick {
            node_id: node.node_id,
            instances_disrupted: disrupted,
            job_ids: jobs,
            free_gpus: node.free_whole_gpus,
            pool_free_gpus_after: free_after,
            pool_fragmented_gpus_after: fragmented_after,
            explanation,
        });
    }
    picks
}

/// Free whole GPUs, and how many of them sit on partly used nodes (which
/// cannot host a whole-node job).
fn free_and_fragmented(nodes: &[&PoolNode]) -> (u32, u32) {
    let free = nodes.iter().map(|n| n.free_whole_gpus).sum();
    let fragmented = nodes
        .iter()
        .filter(|n| n.free_whole_gpus < n.gpus)
        .map(|n| n.free_whole_gpus)
        .sum();
    (free, fragmented)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `pools.status` holds for each status, fixed (existing
    /// databases hold these strings), and the status after it: an
    /// exhaustive match, so a new status does not compile until listed.
    fn status_on_disk(s: PoolStatus) -> (&'static str, Option<PoolStatus>) {
        use PoolStatus::*;
        match s {
            Creating => ("Creating", Some(Running)),
            Running => ("Running", Some(Scaling)),
            Scaling => ("Scaling", Some(Abnormal)),
            Abnormal => ("Abnormal", Some(Unavailable)),
            Unavailable => ("Unavailable", Some(CreateFailed)),
            CreateFailed => ("CreateFailed", Some(Deleting)),
            Deleting => ("Deleting", Some(Deleted)),
            Deleted => ("Deleted", Some(Frozen)),
            Frozen => ("Frozen", None),
        }
    }

    /// What `ledger.mode` holds (part of the ledger's key and of usage
    /// page tokens), fixed, and the mode after it.
    fn mode_on_disk(m: BillingMode) -> (&'static str, Option<BillingMode>) {
        match m {
            BillingMode::OnDemand => ("OnDemand", Some(BillingMode::Subscription)),
            BillingMode::Subscription => ("Subscription", None),
        }
    }

    #[test]
    fn every_pool_status_round_trips_through_its_fixed_column_text() {
        let mut seen = 0;
        let mut next = Some(PoolStatus::Creating);
        while let Some(status) = next {
            let (text, after) = status_on_disk(status);
            assert_eq!(status.as_db_str(), text);
            assert_eq!(PoolStatus::from_db_str(text), Some(status));
            seen += 1;
            next = after;
        }
        assert_eq!(seen, 9);
        assert_eq!(PoolStatus::from_db_str("running"), None);
    }

    #[test]
    fn every_billing_mode_round_trips_through_its_fixed_column_text() {
        let mut seen = 0;
        let mut next = Some(BillingMode::OnDemand);
        while let Some(mode) = next {
            let (text, after) = mode_on_disk(mode);
            assert_eq!(mode.as_db_str(), text);
            assert_eq!(BillingMode::from_db_str(text), Some(mode));
            seen += 1;
            next = after;
        }
        assert_eq!(seen, 2);
        assert_eq!(BillingMode::from_db_str("on_demand"), None);
    }

    fn train() -> CreateRequest {
        CreateRequest {
            pool_type: Some(PoolType::Train),
            name: "My_pool-1".into(),
            description: "free text: any words, 中文 too".into(),
            spec: "gpu-8xH100".into(),
            node_count: 2,
            billing_mode: Some(BillingMode::OnDemand),
            ..Default::default()
        }
    }

    fn deploy() -> CreateRequest {
        CreateRequest {
            pool_type: Some(PoolType::Deploy),
            name: "serve-1".into(),
            ..train()
        }
    }

    fn sub(months: u32) -> Option<SubscriptionTerms> {
        Some(SubscriptionTerms {
            months,
            auto_renew: false,
            convert_to_on_demand_at_expiry: false,
        })
    }

    fn regions() -> Vec<String> {
        vec!["region-1".into()]
    }

    // ---- R-POOL / R-DED --------------------------------------------------

    #[test]
    fn r_pool_2_dedicated_pool_runs_only_its_own_kinds_after_creation() {
        // A dedicated pool is chosen at submission; it admits work only once created and Running.
        assert!(
            admit_job(
                "p1",
                PoolType::Train,
                PoolStatus::Running,
                "",
                JobKind::Training
            )
            .is_ok()
        );
        assert!(
            admit_job(
                "p1",
                PoolType::Train,
                PoolStatus::Creating,
                "",
                JobKind::Training
            )
            .is_err()
        );
    }

    #[test]
    fn r_ded_1_dedicated_pools_serve_notebook_training_tensorboard_and_deployment() {
        for kind in [
            JobKind::Notebook,
            JobKind::Training,
            JobKind::Tensorboard,
            JobKind::OnlineService,
            JobKind::BatchService,
        ] {
            assert!(
                PoolType::Train.accepts(kind) || PoolType::Deploy.accepts(kind),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn r_ded_2_train_pool_runs_notebook_training_tensorboard_only() {
        assert!(PoolType::Train.accepts(JobKind::Notebook));
        assert!(PoolType::Train.accepts(JobKind::Training));
        assert!(PoolType::Train.accepts(JobKind::Tensorboard));
        assert!(!PoolType::Train.accepts(JobKind::OnlineService));
        let err = admit_job(
            "p1",
            PoolType::Train,
            PoolStatus::Running,
            "",
            JobKind::BatchService,
        )
        .unwrap_err();
        assert!(err.to_string().contains("R-DED-2"), "{err}");
    }

    #[test]
    fn r_ded_2_deploy_pool_runs_services_only() {
        assert!(PoolType::Deploy.accepts(JobKind::OnlineService));
        assert!(PoolType::Deploy.accepts(JobKind::BatchService));
        for kind in [JobKind::Notebook, JobKind::Training, JobKind::Tensorboard] {
            assert!(matches!(
                admit_job("p", PoolType::Deploy, PoolStatus::Running, "", kind),
                Err(PoolError::WrongKind { .. })
            ));
        }
    }

    #[test]
    fn r_ded_3_only_running_pools_accept_jobs_and_the_error_names_the_status() {
        for status in [
            PoolStatus::Abnormal,
            PoolStatus::Unavailable,
            PoolStatus::Scaling,
            PoolStatus::Deleting,
            PoolStatus::CreateFailed,
        ] {
            let err = admit_job(
                "p1",
                PoolType::Train,
                status,
                "node n1 NotReady",
                JobKind::Training,
            )
            .unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{status:?}")) && msg.contains("node n1 NotReady"),
                "{msg}"
            );
        }
    }

    #[test]
    fn r_ded_3_status_follows_node_health() {
        let ready = |id: &str| NodeHealth {
            node_id: id.into(),
            ready: true,
            unhealthy_gpus: vec![],
        };
        let down = |id: &str| NodeHealth {
            node_id: id.into(),
            ready: false,
            unhealthy_gpus: vec![],
        };
        assert_eq!(
            derive_status(PoolStatus::Running, &[ready("a"), ready("b")], false).0,
            PoolStatus::Running
        );
        let (s, why) = derive_status(PoolStatus::Running, &[ready("a"), down("b")], false);
        assert_eq!((s, why.as_str()), (PoolStatus::Abnormal, "node b NotReady"));
        let sick = NodeHealth {
            node_id: "a".into(),
            ready: true,
            unhealthy_gpus: vec![(3, "XID 79".into())],
        };
        let (s, why) = derive_status(PoolStatus::Running, &[sick, ready("b")], false);
        assert_eq!(s, PoolStatus::Abnormal);
        assert!(why.contains("GPU 3 unhealthy: XID 79"), "{why}");
        let (s, why) = derive_status(PoolStatus::Abnormal, &[down("a"), down("b")], false);
        assert_eq!(s, PoolStatus::Unavailable);
        assert!(why.contains("no node Ready"));
        // Recovery.
        assert_eq!(
            derive_status(PoolStatus::Unavailable, &[ready("a"), ready("b")], false).0,
            PoolStatus::Running
        );
    }

    // ---- R-CREATE ----------------------------------------------------------

    #[test]
    fn r_create_1_pool_type_must_be_chosen() {
        let err = validate_create(
            CreateRequest {
                pool_type: None,
                ..train()
            },
            &[],
        )
        .unwrap_err();
        assert_eq!(err, PoolError::MissingType);
        assert!(err.to_string().starts_with("R-CREATE-1"));
    }

    #[test]
    fn r_create_2_train_pool_resource_type_is_fixed_to_training() {
        let v = validate_create(train(), &[]).unwrap();
        assert_eq!(v.pool_type, PoolType::Train);
        assert!(
            v.pool_type.accepts(JobKind::Training) && !v.pool_type.accepts(JobKind::OnlineService)
        );
    }

    #[test]
    fn r_create_3_billing_mode_is_on_demand_or_subscription() {
        assert_eq!(
            validate_create(
                CreateRequest {
                    billing_mode: None,
                    ..train()
                },
                &[]
            ),
            Err(PoolError::MissingBillingMode)
        );
        assert_eq!(
            validate_create(train(), &[]).unwrap().billing_mode,
            BillingMode::OnDemand
        );
        let v = validate_create(
            CreateRequest {
                billing_mode: Some(BillingMode::Subscription),
                subscription: sub(3),
                ..train()
            },
            &[],
        )
        .unwrap();
        assert_eq!(v.subscription.unwrap().months, 3);
        assert_eq!(
            validate_create(
                CreateRequest {
                    billing_mode: Some(BillingMode::Subscription),
                    ..train()
                },
                &[]
            ),
            Err(PoolError::MissingMonths)
        );
        assert_eq!(
            validate_create(
                CreateRequest {
                    subscription: sub(3),
                    ..train()
                },
                &[]
            ),
            Err(PoolError::TermsWithoutSubscription)
        );
    }

    #[test]
    fn r_create_4_train_name_allows_letters_digits_hyphen_underscore() {
        for ok in ["a", "My_pool-1", "ABC", "x_y-z_9"] {
            assert!(validate_train_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "has space",
            "dot.name",
            "slash/",
            "ümlaut",
            &"a".repeat(65),
        ] {
            let err = validate_train_name(bad).unwrap_err();
            assert!(err.to_string().contains("R-CREATE-4"), "{bad}");
        }
    }

    #[test]
    fn r_create_5_description_is_free_text() {
        let v = validate_create(train(), &[]).unwrap();
        assert_eq!(v.description, "free text: any words, 中文 too");
        assert_eq!(
            validate_create(
                CreateRequest {
                    description: "x".repeat(1025),
                    ..train()
                },
                &[]
            ),
            Err(PoolError::DescriptionTooLong)
        );
    }

    #[test]
    fn r_create_6_node_count_is_at_least_one() {
        assert_eq!(
            validate_create(
                CreateRequest {
                    node_count: 0,
                    ..train()
                },
                &[]
            ),
            Err(PoolError::ZeroNodes)
        );
        assert_eq!(
            validate_create(
                CreateRequest {
                    node_count: 5,
                    ..train()
                },
                &[]
            )
            .unwrap()
            .node_count,
            5
        );
    }

    fn free(id: &str, spec: &str, az: &str) -> FreeNode {
        FreeNode {
            node_id: id.into(),
            spec: spec.into(),
            az: az.into(),
            gpus: 8,
        }
    }

    #[test]
    fn r_create_7_spec_is_sold_out_when_not_enough_free_nodes() {
        let nodes = [
            free("n1", "gpu-8xH100", "AZ1"),
            free("n2", "gpu-8xH100", "AZ1"),
            free("c1", "cpu-64c", "AZ1"),
        ];
        let (picked, _) = choose_nodes(&nodes, "gpu-8xH100", 2, PoolType::Train, None, 0).unwrap();
        assert_eq!(picked, ["n1", "n2"]);
        let err = choose_nodes(&nodes, "gpu-8xH100", 3, PoolType::Train, None, 0).unwrap_err();
        assert!(matches!(
            err,
            PoolError::SoldOut {
                wanted: 3,
                free: 2,
                ..
            }
        ));
        assert!(err.to_string().contains("sold out"));
        assert_eq!(
            validate_create(
                CreateRequest {
                    spec: " ".into(),
                    ..train()
                },
                &[]
            ),
            Err(PoolError::MissingSpec)
        );
    }

    #[test]
    fn r_create_8_train_subscription_lasts_1_to_12_months() {
        for m in [1, 6, 12] {
            assert!(
                validate_create(
                    CreateRequest {
                        billing_mode: Some(BillingMode::Subscription),
                        subscription: sub(m),
                        ..train()
                    },
                    &[]
                )
                .is_ok()
            );
        }
        for m in [0, 13] {
            assert_eq!(
                validate_create(
                    CreateRequest {
                        billing_mode: Some(BillingMode::Subscription),
                        subscription: sub(m),
                        ..train()
                    },
                    &[]
                ),
                Err(PoolError::TrainMonths(m))
            );
        }
    }

    #[test]
    fn r_create_9_auto_renew_is_kept() {
        let terms = Some(SubscriptionTerms {
            months: 1,
            auto_renew: true,
            convert_to_on_demand_at_expiry: false,
        });
        let v = validate_create(
            CreateRequest {
                billing_mode: Some(BillingMode::Subscription),
                subscription: terms,
                ..train()
            },
            &[],
        )
        .unwrap();
        assert!(v.subscription.unwrap().auto_renew);
    }

    #[test]
    fn r_create_10_deploy_pool_resource_type_is_fixed_to_deployment() {
        let v = validate_create(deploy(), &[]).unwrap();
        assert_eq!(v.pool_type, PoolType::Deploy);
        assert!(
            v.pool_type.accepts(JobKind::OnlineService) && !v.pool_type.accepts(JobKind::Training)
        );
    }

    #[test]
    fn r_create_11_deploy_subscription_only_in_configured_regions() {
        let req = |region: &str| CreateRequest {
            billing_mode: Some(BillingMode::Subscription),
            subscription: sub(3),
            region: region.into(),
            ..deploy()
        };
        assert!(validate_create(req("region-1"), &regions()).is_ok());
        let err = validate_create(req("region-2"), &regions()).unwrap_err();
        assert!(
            err.to_string().contains("R-CREATE-11") && err.to_string().contains("region-1"),
            "{err}"
        );
        // On-demand deploy pools are sold everywhere; train subscriptions too.
        assert!(
            validate_create(
                CreateRequest {
                    region: "region-2".into(),
                    ..deploy()
                },
                &regions()
            )
            .is_ok()
        );
        assert!(
            validate_create(
                CreateRequest {
                    billing_mode: Some(BillingMode::Subscription),
                    subscription: sub(3),
                    region: "x".into(),
                    ..train()
                },
                &regions()
            )
            .is_ok()
        );
    }

    #[test]
    fn r_create_12_deploy_name_must_start_with_a_lower_case_letter() {
        for bad in ["1abc", "Abcd", "-abc"] {
            assert!(
                validate_deploy_name(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("start with a lower-case letter"),
                "{bad}"
            );
        }
    }

    #[test]
    fn r_create_12_deploy_name_only_lower_case_digits_hyphens() {
        for bad in ["ab_cd", "abCd", "ab cd", "ab.cd"] {
            assert!(
                validate_deploy_name(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("only lower-case"),
                "{bad}"
            );
        }
        assert!(validate_deploy_name("a-b-1-c").is_ok());
    }

    #[test]
    fn r_create_12_deploy_name_must_not_end_with_hyphen() {
        assert!(
            validate_deploy_name("abcd-")
                .unwrap_err()
                .to_string()
                .contains("must not end with a hyphen")
        );
    }

    #[test]
    fn r_create_12_deploy_name_length_is_4_to_24() {
        assert!(
            validate_deploy_name("abc")
                .unwrap_err()
                .to_string()
                .contains("4 to 24")
        );
        assert!(validate_deploy_name("abcd").is_ok());
        assert!(validate_deploy_name(&format!("a{}", "b".repeat(23))).is_ok());
        assert!(validate_deploy_name(&format!("a{}", "b".repeat(24))).is_err());
        // The train rule is different: a train name may be short and have capitals.
        assert!(
            validate_create(
                CreateRequest {
                    name: "AB".into(),
                    ..train()
                },
                &[]
            )
            .is_ok()
        );
        assert!(
            validate_create(
                CreateRequest {
                    name: "AB".into(),
                    ..deploy()
                },
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn r_create_13_deploy_description_is_free_text() {
        let v = validate_create(
            CreateRequest {
                description: "serves model v3 — canary".into(),
                ..deploy()
            },
            &[],
        )
        .unwrap();
        assert_eq!(v.description, "serves model v3 — canary");
    }

    #[test]
    fn r_create_14_custom_network_or_isolated_tenant_network() {
        let custom = Some((
            "vpc-1".to_string(),
            "subnet-1".to_string(),
            vec!["sg-1".to_string()],
        ));
        let v = validate_create(
            CreateRequest {
                custom_network: custom,
                ..deploy()
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            v.custom_network,
            Some(Network::Custom {
                vpc_id: "vpc-1".into(),
                subnet_id: "subnet-1".into(),
                security_group_ids: vec!["sg-1".into()]
            })
        );
        // Not enabled: the caller gives the tenant's isolated network.
        assert_eq!(validate_create(deploy(), &[]).unwrap().custom_network, None);
        let partial = Some(("vpc-1".to_string(), String::new(), vec![]));
        assert_eq!(
            validate_create(
                CreateRequest {
                    custom_network: partial,
                    ..deploy()
                },
                &[]
            ),
            Err(PoolError::IncompleteNetwork)
        );
    }

    #[test]
    fn r_create_15_zone_is_random_or_az1_to_az3() {
        for (az, want) in [
            ("", None),
            ("random", None),
            ("AZ2", Some("AZ2")),
            ("az3", Some("AZ3")),
        ] {
            assert_eq!(
                validate_create(
                    CreateRequest {
                        az: az.into(),
                        ..deploy()
                    },
                    &[]
                )
                .unwrap()
                .zone
                .as_deref(),
                want,
                "{az}"
            );
        }
        assert_eq!(
            validate_create(
                CreateRequest {
                    az: "AZ4".into(),
                    ..deploy()
                },
                &[]
            ),
            Err(PoolError::BadZone("AZ4".into()))
        );
        let nodes = [
            free("a1", "s", "AZ1"),
            free("b1", "s", "AZ2"),
            free("b2", "s", "AZ2"),
        ];
        // A named zone uses only its nodes.
        assert_eq!(
            choose_nodes(&nodes, "s", 1, PoolType::Deploy, Some("AZ1"), 0).unwrap(),
            (vec!["a1".to_string()], "AZ1".to_string())
        );
        assert!(choose_nodes(&nodes, "s", 2, PoolType::Deploy, Some("AZ1"), 0).is_err());
        // Random picks a zone that can satisfy the request, whatever the seed.
        for seed in 0..10 {
            assert_eq!(
                choose_nodes(&nodes, "s", 2, PoolType::Deploy, None, seed)
                    .unwrap()
                    .1,
                "AZ2"
            );
        }
        let zones: std::collections::BTreeSet<String> = (0..10)
            .map(|seed| {
                choose_nodes(&nodes, "s", 1, PoolType::Deploy, None, seed)
                    .unwrap()
                    .1
            })
            .collect();
        assert_eq!(
            zones.len(),
            2,
            "random should spread over fitting zones: {zones:?}"
        );
        assert!(
            choose_nodes(&nodes, "s", 3, PoolType::Deploy, None, 0)
                .unwrap_err()
                .to_string()
                .contains("any single zone")
        );
    }

    #[test]
    fn r_create_16_deploy_node_count_and_spec_follow_r_create_6_and_7() {
        assert_eq!(
            validate_create(
                CreateRequest {
                    node_count: 0,
                    ..deploy()
                },
                &[]
            ),
            Err(PoolError::ZeroNodes)
        );
        let nodes = [free("a1", "s", "AZ1")];
        assert!(matches!(
            choose_nodes(&nodes, "s", 2, PoolType::Deploy, Some("AZ1"), 0),
            Err(PoolError::SoldOut { .. })
        ));
    }

    #[test]
    fn r_create_17_deploy_subscription_lasts_1_to_11_months() {
        let req = |m| CreateRequest {
            billing_mode: Some(BillingMode::Subscription),
            subscription: sub(m),
            region: "region-1".into(),
            ..deploy()
        };
        assert!(validate_create(req(11), &regions()).is_ok());
        assert_eq!(
            validate_create(req(12), &regions()),
            Err(PoolError::DeployMonths(12))
        );
        assert_eq!(
            validate_create(req(0), &regions()),
            Err(PoolError::DeployMonths(0))
        );
    }

    #[test]
    fn r_create_18_creating_becomes_running_when_nodes_are_ready() {
        let ready = NodeHealth {
            node_id: "a".into(),
            ready: true,
            unhealthy_gpus: vec![],
        };
        assert_eq!(
            derive_status(PoolStatus::Creating, std::slice::from_ref(&ready), false).0,
            PoolStatus::Running
        );
        let down = NodeHealth {
            ready: false,
            ..ready
        };
        let (s, why) = derive_status(PoolStatus::Creating, std::slice::from_ref(&down), false);
        assert_eq!(s, PoolStatus::CreateFailed);
        assert!(why.contains("not Ready during creation"));
        // A failed creation stays failed until deleted (R-DEL-4).
        assert_eq!(
            derive_status(PoolStatus::CreateFailed, &[down], false).0,
            PoolStatus::CreateFailed
        );
    }

    // ---- R-SCALE -------------------------------------------------------------

    fn pnode(id: &str, jobs: &[&str], free: u32) -> PoolNode {
        PoolNode {
            node_id: id.into(),
            job_ids: jobs.iter().map(|s| s.to_string()).collect(),
            gpus: 8,
            free_whole_gpus: free,
        }
    }

    #[test]
    fn r_scale_1_pools_scale_out_and_in() {
        let ready = NodeHealth {
            node_id: "a".into(),
            ready: true,
            unhealthy_gpus: vec![],
        };
        // While nodes are being removed the pool shows Scaling, then Running.
        assert_eq!(
            derive_status(PoolStatus::Scaling, std::slice::from_ref(&ready), true).0,
            PoolStatus::Scaling
        );
        assert_eq!(
            derive_status(PoolStatus::Scaling, &[ready], false).0,
            PoolStatus::Running
        );
        assert!(
            check_scale_in(
                "p",
                &[pnode("a", &[], 8), pnode("b", &[], 8)],
                &["b".into()],
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn r_scale_3_scale_in_removes_exactly_the_named_nodes() {
        let nodes = [
            pnode("a", &[], 8),
            pnode("b", &["j1"], 4),
            pnode("c", &[], 8),
        ];
        assert!(check_scale_in("p", &nodes, &["c".into()], false).is_ok());
        assert!(matches!(
            check_scale_in("p", &nodes, &["zz".into()], false),
            Err(PoolError::NodeNotInPool { .. })
        ));
        let busy = check_scale_in("p", &nodes, &["b".into()], false).unwrap_err();
        assert!(
            busy.to_string().contains("j1") && busy.to_string().contains("force"),
            "{busy}"
        );
        assert!(check_scale_in("p", &nodes, &["b".into()], true).is_ok());
        assert!(matches!(
            check_scale_in("p", &nodes, &["a".into(), "b".into(), "c".into()], true),
            Err(PoolError::WouldBeEmpty(_))
        ));
    }

    #[test]
    fn r_scale_4_scale_is_applied_asynchronously_with_status_scaling() {
        let new_node = NodeHealth {
            node_id: "n".into(),
            ready: false,
            unhealthy_gpus: vec![],
        };
        let old = NodeHealth {
            node_id: "o".into(),
            ready: true,
            unhealthy_gpus: vec![],
        };
        let (s, why) = derive_status(PoolStatus::Scaling, &[old.clone(), new_node.clone()], false);
        assert_eq!(s, PoolStatus::Scaling);
        assert!(why.contains("waiting"));
        let ready = NodeHealth {
            ready: true,
            ..new_node
        };
        assert_eq!(
            derive_status(PoolStatus::Scaling, &[old, ready], false).0,
            PoolStatus::Running
        );
    }

    #[test]
    fn scale_in_plan_prefers_idle_nodes_and_explains() {
        let nodes = [
            pnode("a", &["j1", "j2"], 0),
            pnode("b", &[], 8),
            pnode("c", &["j3"], 6),
            pnode("d", &[], 8),
        ];
        let plan = plan_scale_in(&nodes, 3);
        let order: Vec<&str> = plan.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(order, ["b", "d", "c"]);
        assert_eq!(plan[0].instances_disrupted, 0);
        assert!(
            plan[0].explanation.contains("no work is disrupted"),
            "{}",
            plan[0].explanation
        );
        assert_eq!(plan[2].instances_disrupted, 1);
        assert!(plan[2].explanation.contains("j3") && plan[2].explanation.contains("--force"));
        // After removing b and d, the free GPUs left sit on partly used nodes.
        assert_eq!(plan[1].pool_free_gpus_after, 6);
        assert_eq!(plan[1].pool_fragmented_gpus_after, 6);
        // Never plans the last node away.
        assert_eq!(plan_scale_in(&nodes, 10).len(), 3);
    }

    #[test]
    fn scale_in_plan_avoids_stranding_free_gpus() {
        // Both candidates are idle and whole; c is partly used. Removing the
        // partly used c (disrupts 1) is last; between idle a and b the tie goes by id.
        let nodes = [
            pnode("a", &[], 8),
            pnode("b", &[], 8),
            pnode("c", &["j"], 2),
        ];
        assert_eq!(plan_scale_in(&nodes, 1)[0].node_id, "a");
    }

    // ---- R-DEL ---------------------------------------------------------------

    #[test]
    fn r_del_1_deletion_is_refused_twice() {
        assert!(matches!(
            check_delete("p", PoolStatus::Deleting, BillingMode::OnDemand, true),
            Err(PoolError::Busy { .. })
        ));
        assert!(matches!(
            check_delete("p", PoolStatus::Deleted, BillingMode::OnDemand, true),
            Err(PoolError::Busy { .. })
        ));
    }

    #[test]
    fn r_del_2_running_on_demand_pool_can_be_deleted() {
        assert!(check_delete("p", PoolStatus::Running, BillingMode::OnDemand, true).is_ok());
        assert!(check_delete("p", PoolStatus::Unavailable, BillingMode::OnDemand, true).is_ok());
    }

    #[test]
    fn r_del_3_subscription_pool_is_released_by_unsubscribing() {
        let err =
            check_delete("p", PoolStatus::Running, BillingMode::Subscription, true).unwrap_err();
        assert!(err.to_string().contains("unsubscrib"), "{err}");
    }

    #[test]
    fn r_del_4_create_failed_pool_is_removed_with_delete() {
        assert!(check_delete("p", PoolStatus::CreateFailed, BillingMode::OnDemand, true).is_ok());
        assert!(
            check_delete(
                "p",
                PoolStatus::CreateFailed,
                BillingMode::Subscription,
                true
            )
            .is_ok()
        );
    }

    #[test]
    fn r_del_5_deletion_needs_explicit_confirmation() {
        let err = check_delete("p", PoolStatus::Running, BillingMode::OnDemand, false).unwrap_err();
        assert!(
            err.to_string().contains("R-DEL-5") && err.to_string().contains("cannot be undone")
        );
    }
}

/// A dedicated pool as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub pool_id: String,
    pub seq: u64,
    pub name: String,
    pub pool_type: PoolType,
    pub description: String,
    pub tenant: String,
    pub spec: String,
    /// Nodes in the pool, including those being removed.
    pub node_ids: Vec<String>,
    /// Nodes being removed (scale-in, delete): released to the public pool
    /// once nothing runs on them.
    pub draining: Vec<String>,
    /// As asked: "random", "AZ1".. (deploy pools).
    pub az_requested: String,
    /// The zone the nodes are in (deploy pools).
    pub az: String,
    pub network: Option<Network>,
    /// Its instances reach nothing outside their network (networks on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_egress: bool,
    pub billing_mode: BillingMode,
    pub subscription: Option<SubscriptionTerms>,
    pub region: String,
    pub status: PoolStatus,
    pub status_reason: String,
    pub created_at_ms: i64,
    pub deleted_at_ms: Option<i64>,
    /// Billing meter: one span per node while it belongs to the pool
    /// (R-DED-4), closed at scale-in, deletion or freeze.
    #[serde(default)]
    pub meter: Vec<super::billing::Span>,
    /// Billing mode over time (conversions, R-BILL-1/2).
    #[serde(default)]
    pub modes: Vec<super::billing::ModeSpan>,
    /// The paid subscription term, while subscribed.
    #[serde(default)]
    pub term: Option<super::billing::Term>,
    /// When the pool was frozen (subscription lapsed).
    #[serde(default)]
    pub frozen_at_ms: Option<i64>,
}

impl Pool {
    /// Nodes that stay in the pool once removals finish.
    pub fn target_node_count(&self) -> usize {
        self.node_ids.len() - self.draining.len()
    }

    /// Metadata handed to the agent with each instance (R-CREATE-14).
    pub fn instance_metadata(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::new();
        // GPUPOOL_POOL and the metrics' `pool` label: the id (names are
        // unique per tenant only); GPUPOOL_POOL_NAME and `pool_name`: the
        // name people gave it.
        m.insert("pool".into(), self.pool_id.clone());
        m.insert("pool.name".into(), self.name.clone());
        match &self.network {
            Some(Network::Custom {
                vpc_id,
                subnet_id,
                security_group_ids,
            }) => {
                m.insert("network.vpc_id".into(), vpc_id.clone());
                m.insert("network.subnet_id".into(), subnet_id.clone());
                m.insert(
                    "network.security_group_ids".into(),
                    security_group_ids.join(","),
                );
            }
            Some(Network::Isolated { network_id }) => {
                m.insert("network.id".into(), network_id.clone());
            }
            None => {}
        }
        m
    }
}
