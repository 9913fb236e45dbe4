//! The one place errors become gRPC statuses: every variant of the
//! cluster's, the domain's and the shared state's errors is matched by
//! name (no catch-all arm), so a new variant does not compile until it is
//! given a code here.
//!
//! Another tenant's pool, job or node is reported as `NOT_FOUND` (never
//! `PERMISSION_DENIED`), so existence does not leak; `PERMISSION_DENIED` is
//! for admin-only calls made by a tenant, and for a revoked node.

use tonic::{Code, Status};

use crate::cluster::ClusterError;
use crate::domain::SpecError;
use crate::domain::node::NodeAuthError;
use crate::domain::pool::PoolError;
use crate::domain::tenant::TenantError;
use crate::state::StateError;

impl From<ClusterError> for Status {
    fn from(err: ClusterError) -> Self {
        status(err)
    }
}

/// The status a refusal of the cluster is answered with. A store failure
/// is logged here, with its whole chain, and answered without it.
pub fn status(err: ClusterError) -> Status {
    if let ClusterError::Store(source) = &err {
        tracing::error!(error = %crate::ErrorChain(source), "storage failure; the request was not applied");
        return Status::unavailable("storage failure; the request was not applied");
    }
    Status::new(code(&err), err.to_string())
}

impl From<StateError> for Status {
    fn from(err: StateError) -> Self {
        let code = match &err {
            StateError::TooManyLogReads { .. } | StateError::TooManyLogStreams { .. } => {
                Code::ResourceExhausted
            }
            StateError::NodeNotConnected { .. } | StateError::NodeDisconnected { .. } => {
                Code::Unavailable
            }
        };
        Status::new(code, err.to_string())
    }
}

fn code(err: &ClusterError) -> Code {
    use ClusterError as E;
    match err {
        E::InvalidSpec(e) => spec_code(e),
        E::Pool(e) => pool_code(e),
        E::Tenant(e) => tenant_code(e),
        E::NodeAuth(e) => node_auth_code(e),
        E::NodeNotFound { .. }
        | E::JobNotFound { .. }
        | E::InstanceNotFound { .. }
        | E::PoolNotFound { .. }
        | E::TenantNotFound { .. }
        | E::TokenNotFound { .. } => Code::NotFound,
        E::AdminOnly { .. } | E::NotYourTenant { .. } | E::HighClassNotAllowed { .. } => {
            Code::PermissionDenied
        }
        E::TenantExists { .. } => Code::AlreadyExists,
        E::AmbiguousPoolName { .. }
        | E::PublicPoolIsBuiltIn
        | E::ScaleInTooMany { .. }
        | E::BadTokenId { .. }
        | E::NodeNotRevoked { .. }
        | E::TensorboardOfNonTraining { .. }
        | E::NothingToCancel { .. }
        | E::NoInstancesYet { .. }
        | E::ReplicasOutOfRange { .. }
        | E::NotAnOnlineService { .. }
        | E::ServiceEnded { .. }
        | E::DeployPoolConversion { .. }
        | E::AlreadySubscription { .. }
        | E::NoConsumptionRecord { .. }
        | E::NotSubscription { .. }
        | E::DeployPoolConversionAtExpiry { .. }
        | E::UnsubscribeOnDemand { .. } => Code::FailedPrecondition,
        E::Store(_) => Code::Unavailable,
    }
}

fn pool_code(err: &PoolError) -> Code {
    use PoolError as P;
    match err {
        P::SoldOut { .. } => Code::ResourceExhausted,
        P::NameTaken(_) => Code::AlreadyExists,
        P::UnknownSpec(_) => Code::NotFound,
        P::UnknownNetwork(_) => Code::InvalidArgument,
        P::EgressWithoutNetworks => Code::FailedPrecondition,
        P::NotRunning { .. }
        | P::WrongKind { .. }
        | P::SubscriptionDelete(_)
        | P::Busy { .. }
        | P::NodeBusy { .. }
        | P::WouldBeEmpty(_) => Code::FailedPrecondition,
        P::MissingType
        | P::BadTrainName(_)
        | P::BadDeployName { .. }
        | P::DescriptionTooLong
        | P::ZeroNodes
        | P::MissingSpec
        | P::MissingBillingMode
        | P::TrainMonths(_)
        | P::DeployMonths(_)
        | P::MissingMonths
        | P::TermsWithoutSubscription
        | P::RegionNotSold { .. }
        | P::BadZone(_)
        | P::ZoneOnTrainPool
        | P::IncompleteNetwork
        | P::NetworkOnTrainPool
        | P::NotConfirmed(_)
        | P::NodeNotInPool { .. }
        | P::ZeroScale => Code::InvalidArgument,
    }
}

fn tenant_code(err: &TenantError) -> Code {
    match err {
        TenantError::QuotaExceeded { .. } => Code::ResourceExhausted,
        TenantError::BadName(_) | TenantError::Reserved(_) => Code::InvalidArgument,
    }
}

fn node_auth_code(err: &NodeAuthError) -> Code {
    match err {
        NodeAuthError::Revoked { .. } => Code::PermissionDenied,
        NodeAuthError::NotItsCredential { .. }
        | NodeAuthError::OtherNode { .. }
        | NodeAuthError::NoCredential => Code::Unauthenticated,
    }
}

fn spec_code(err: &SpecError) -> Code {
    use SpecError as S;
    match err {
        S::MissingKind
        | S::NotPreemptible(_)
        | S::EmptyCommand
        | S::SingleInstance(_)
        | S::NotForKind { .. }
        | S::RuntimeOverLimit { .. }
        | S::NoLogDir
        | S::TooLong { .. }
        | S::BadPort(_)
        | S::RetriesOverLimit { .. }
        | S::BadHealthCheck(_)
        | S::Negative { .. }
        | S::GpuFractionTooLarge(_)
        | S::GpusAndFraction
        | S::TooManyGpus(_)
        | S::ZeroInstances(_)
        | S::TooManyInstances(_)
        | S::BadEnvName(_)
        | S::BadImage(..)
        | S::BadNetwork(_)
        | S::NetworkWithoutImage
        | S::HostNetworkNotHere(_)
        | S::DotDotPath { .. }
        | S::NameTooLong
        | S::BadGpuModels(_) => Code::InvalidArgument,
    }
}

#[cfg(test)]
mod tests {
    //! Each refusal keeps the code and the message it had when the
    //! variants were strings (what the CLI prints and clients match on).

    use super::*;
    use crate::domain::JobState;
    use ClusterError as E;

    fn assert_status(err: ClusterError, code: Code, message: &str) {
        let what = format!("{err:?}");
        let got = status(err);
        assert_eq!((got.code(), got.message()), (code, message), "{what}");
    }

    fn s(text: &str) -> String {
        text.to_string()
    }

    #[test]
    fn lookups_permissions_and_the_store() {
        use Code::NotFound;
        assert_status(
            E::NodeNotFound { id: s("n9") },
            NotFound,
            r#"node "n9" not found"#,
        );
        assert_status(
            E::JobNotFound { id: s("j-9") },
            NotFound,
            r#"job "j-9" not found"#,
        );
        let rank2 = E::InstanceNotFound {
            job_id: s("j-1"),
            rank: 2,
        };
        assert_status(rank2, NotFound, r#"instance "j-1 rank 2" not found"#);
        assert_status(
            E::PoolNotFound { key: s("p-x") },
            NotFound,
            r#"pool "p-x" not found"#,
        );
        let acme = E::TenantNotFound { name: s("acme") };
        assert_status(acme, NotFound, r#"tenant "acme" not found"#);
        let token = E::TokenNotFound {
            tenant: s("acme"),
            token_id: s("abc"),
        };
        assert_status(token, NotFound, r#"token "abc" not found"#);
        assert_status(
            E::AdminOnly {
                what: "listing tenants",
            },
            Code::PermissionDenied,
            "listing tenants is for the admin only",
        );
        assert_status(
            E::NotYourTenant { name: s("acme") },
            Code::PermissionDenied,
            "tenant acme is not yours",
        );
        assert_status(
            E::TenantExists { name: s("acme") },
            Code::AlreadyExists,
            "tenant acme already exists",
        );
        assert_status(
            E::Pool(PoolError::NodeNotInPool {
                node: s("n1"),
                pool: s("p-1"),
            }),
            Code::InvalidArgument,
            "R-SCALE-3: node n1 is not in pool p-1",
        );
        assert_status(
            E::Store(crate::store::StoreError::Unreachable(s("down"))),
            Code::Unavailable,
            "storage failure; the request was not applied",
        );
        let got = Status::from(StateError::TooManyLogStreams {
            caller: s("acme"),
            cap: 4,
        });
        assert_eq!(got.code(), Code::ResourceExhausted);
        assert_eq!(
            got.message(),
            "acme already has 4 log streams open (`[limits] log_streams_per_caller`); close one first"
        );
        let got = Status::from(StateError::NodeNotConnected { node_id: s("n1") });
        assert_eq!(got.code(), Code::Unavailable);
        assert_eq!(
            got.message(),
            "node n1 is not connected; its logs cannot be read now"
        );
    }

    #[test]
    fn preconditions_of_jobs_nodes_and_pools() {
        use Code::FailedPrecondition as Fp;
        let ambiguous = E::AmbiguousPoolName {
            name: s("web"),
            pool_ids: vec![s("p-1"), s("p-2")],
        };
        assert_status(
            ambiguous,
            Fp,
            r#"2 pools are named "web" (p-1, p-2); use the pool id"#,
        );
        assert_status(
            E::PublicPoolIsBuiltIn,
            Fp,
            "the public pool is built in: it cannot be scaled or deleted",
        );
        assert_status(
            E::ScaleInTooMany {
                pool: s("p-1"),
                nodes: 2,
                asked: 2,
            },
            Fp,
            "pool p-1 has 2 node(s): scale-in can remove at most 1 (a pool keeps one; \
             `gpupool pool delete` removes it all)",
        );
        assert_status(
            E::BadTokenId { token_id: s("x") },
            Fp,
            "--revoke takes a token id (12 hex digits, as `tenant token` printed it) or `all`",
        );
        assert_status(
            E::NodeNotRevoked { id: s("n1") },
            Fp,
            "node n1 is not revoked",
        );
        assert_status(
            E::TensorboardOfNonTraining {
                job_id: s("j-1"),
                kind: "notebook",
            },
            Fp,
            "job j-1 is a notebook: a tensorboard serves a training job's logs",
        );
        assert_status(
            E::NothingToCancel {
                job_id: s("j-1"),
                state: JobState::Succeeded,
            },
            Fp,
            "job j-1 already ended (Succeeded); nothing to cancel",
        );
        assert_status(
            E::NoInstancesYet {
                job_id: s("j-1"),
                state: JobState::Queued,
                reason: s("waiting"),
            },
            Fp,
            "job j-1 is Queued and has no instances yet: waiting",
        );
        assert_status(
            E::ReplicasOutOfRange {
                job_id: s("j-1"),
                replicas: 0,
            },
            Fp,
            "replicas must be 1..10000 (got 0); cancel the job to stop it",
        );
        assert_status(
            E::NotAnOnlineService {
                job_id: s("j-1"),
                kind: "training",
            },
            Fp,
            "job j-1 is a training, not an online_service",
        );
        assert_status(
            E::ServiceEnded {
                job_id: s("j-1"),
                state: JobState::Failed,
            },
            Fp,
            "job j-1 already ended (Failed)",
        );
    }

    #[test]
    fn billing_preconditions() {
        use Code::FailedPrecondition as Fp;
        let p1 = || s("p-1");
        assert_status(
            E::DeployPoolConversion { pool: p1() },
            Fp,
            "R-BILL-1: only train pools convert to a subscription; p-1 is a deploy pool",
        );
        assert_status(
            E::AlreadySubscription { pool: p1() },
            Fp,
            "pool p-1 is already a subscription pool",
        );
        assert_status(
            E::NoConsumptionRecord { pool: p1() },
            Fp,
            "R-BILL-1: pool p-1 has no consumption record yet (no billed on-demand usage); \
             convert it after it has been billed",
        );
        assert_status(
            E::NotSubscription { pool: p1() },
            Fp,
            "pool p-1 is not a subscription pool",
        );
        assert_status(
            E::DeployPoolConversionAtExpiry { pool: p1() },
            Fp,
            "R-BILL-2: only train pools convert to on-demand at expiry",
        );
        assert_status(
            E::UnsubscribeOnDemand { pool: p1() },
            Fp,
            "pool p-1 is on-demand: delete it instead of unsubscribing",
        );
    }
}
