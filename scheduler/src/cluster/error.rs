//! What the state machine refuses, one variant per thing that happened,
//! with what it happened to. The gRPC layer maps each to its status in one
//! exhaustive match (`api::error`), so a new variant does not compile until
//! it has a code. The messages are what callers read (the CLI prints them):
//! they stay stable.

use crate::domain::JobState;
use crate::domain::SpecError;
use crate::domain::node::NodeAuthError;
use crate::domain::pool::PoolError;
use crate::domain::tenant::TenantError;
use crate::store::StoreError;

use super::TOKEN_ID_LEN;
use super::kinds::MAX_REPLICAS;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    // ---- the request itself -------------------------------------------
    #[error("{0}")]
    InvalidSpec(#[from] SpecError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Tenant(#[from] TenantError),
    #[error(transparent)]
    NodeAuth(#[from] NodeAuthError),

    // ---- what it names does not exist (or is another tenant's) ---------
    #[error("node {id:?} not found")]
    NodeNotFound { id: String },
    #[error("job {id:?} not found")]
    JobNotFound { id: String },
    #[error("instance {:?} not found", format!("{} rank {}", .job_id, .rank))]
    InstanceNotFound { job_id: String, rank: u32 },
    #[error("pool {key:?} not found")]
    PoolNotFound { key: String },
    #[error("tenant {name:?} not found")]
    TenantNotFound { name: String },
    #[error("token {token_id:?} not found")]
    TokenNotFound { tenant: String, token_id: String },

    // ---- not the caller's ------------------------------------------------
    #[error("{what} is for the admin only")]
    AdminOnly { what: &'static str },
    #[error("tenant {name} is not yours")]
    NotYourTenant { name: String },
    #[error(
        "tenant {tenant} may not submit high-class jobs (they preempt other tenants' work): the admin grants it with `gpupool tenant quota {tenant} --allow-high-class true`"
    )]
    HighClassNotAllowed { tenant: String },

    // ---- already there ---------------------------------------------------
    #[error("tenant {name} already exists")]
    TenantExists { name: String },

    // ---- not in a state that allows it -----------------------------------
    #[error("{} pools are named {name:?} ({}); use the pool id", .pool_ids.len(), .pool_ids.join(", "))]
    AmbiguousPoolName { name: String, pool_ids: Vec<String> },
    #[error("the public pool is built in: it cannot be scaled or deleted")]
    PublicPoolIsBuiltIn,
    #[error(
        "pool {pool} has {nodes} node(s): scale-in can remove at most {} (a pool keeps one; \
         `gpupool pool delete` removes it all)",
        .nodes.saturating_sub(1)
    )]
    ScaleInTooMany {
        pool: String,
        nodes: usize,
        asked: u32,
    },
    #[error(
        "--revoke takes a token id ({} hex digits, as `tenant token` printed it) or `all`",
        TOKEN_ID_LEN
    )]
    BadTokenId { token_id: String },
    #[error("node {id} is not revoked")]
    NodeNotRevoked { id: String },
    #[error("job {job_id} is a {kind}: a tensorboard serves a training job's logs")]
    TensorboardOfNonTraining { job_id: String, kind: &'static str },
    #[error("job {job_id} already ended ({state:?}); nothing to cancel")]
    NothingToCancel { job_id: String, state: JobState },
    #[error("job {job_id} is {state:?} and has no instances yet: {reason}")]
    NoInstancesYet {
        job_id: String,
        state: JobState,
        reason: String,
    },
    #[error(
        "replicas must be 1..{} (got {replicas}); cancel the job to stop it",
        MAX_REPLICAS
    )]
    ReplicasOutOfRange { job_id: String, replicas: u32 },
    #[error("job {job_id} is a {kind}, not an online_service")]
    NotAnOnlineService { job_id: String, kind: &'static str },
    #[error("job {job_id} already ended ({state:?})")]
    ServiceEnded { job_id: String, state: JobState },
    #[error("R-BILL-1: only train pools convert to a subscription; {pool} is a deploy pool")]
    DeployPoolConversion { pool: String },
    #[error("pool {pool} is already a subscription pool")]
    AlreadySubscription { pool: String },
    #[error(
        "R-BILL-1: pool {pool} has no consumption record yet (no billed on-demand usage); \
         convert it after it has been billed"
    )]
    NoConsumptionRecord { pool: String },
    #[error("pool {pool} is not a subscription pool")]
    NotSubscription { pool: String },
    #[error("R-BILL-2: only train pools convert to on-demand at expiry")]
    DeployPoolConversionAtExpiry { pool: String },
    #[error("pool {pool} is on-demand: delete it instead of unsubscribing")]
    UnsubscribeOnDemand { pool: String },

    // ---- the store -------------------------------------------------------
    /// Nothing of the request was applied (memory was reloaded from the
    /// unchanged store). The cause is logged where this is answered, not
    /// shown to the caller.
    #[error("storage failure")]
    Store(#[from] StoreError),
}
