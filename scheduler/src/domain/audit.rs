//! The audit trail: one [`AuditEntry`] per mutating call, kept in the store
//! beside what it changed. Who (a tenant, the admin or a node), from where
//! (the peer address), what (the RPC, its target ids and the arguments that
//! matter; never a token, an environment or a command line), and how it
//! ended. Plain data: the gRPC edge fills it in (`crate::api::audit`) and
//! the store keeps it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One audited call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing in the order the records were written (gaps allowed).
    pub seq: u64,
    pub at_ms: i64,
    /// `tenant`, `admin`, `node` or `anonymous`.
    pub role: String,
    /// The tenant's name, `admin`, or the node id.
    pub who: String,
    /// The tenant whose resources the call concerned (its pool, its jobs,
    /// itself), or the caller's own; empty for the cluster's (nodes). A
    /// tenant lists the records of this tenant.
    pub tenant: String,
    /// The peer's socket address.
    pub peer: String,
    /// The RPC, e.g. `PoolService/CreatePool`.
    pub method: String,
    /// Target ids by kind: `pool`, `job`, `node`, `tenant`.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    /// The arguments that matter, rendered.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// `OK` or the gRPC status code's name (`INVALID_ARGUMENT`, ...).
    pub code: String,
    /// The error message; empty when it succeeded.
    #[serde(default)]
    pub message: String,
}

/// One page of audit records, oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only records of this tenant (see [`AuditEntry::tenant`]).
    pub tenant: Option<String>,
    pub pool: Option<String>,
    pub job: Option<String>,
    pub node: Option<String>,
    /// `from_ms <= at_ms < to_ms`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Records after this sequence number.
    pub after_seq: u64,
    pub limit: usize,
}

impl AuditQuery {
    /// True when `e` belongs to this query (cursor and limit aside).
    pub fn matches(&self, e: &AuditEntry) -> bool {
        let target = |kind: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| e.targets.get(kind).is_some_and(|t| t == w))
        };
        e.at_ms >= self.from_ms
            && e.at_ms < self.to_ms
            && self.tenant.as_deref().is_none_or(|t| t == e.tenant)
            && target("pool", &self.pool)
            && target("job", &self.job)
            && target("node", &self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_filter_on_time_tenant_and_targets() {
        let e = AuditEntry {
            seq: 1,
            at_ms: 100,
            role: "tenant".into(),
            who: "acme".into(),
            tenant: "acme".into(),
            peer: "127.0.0.1:5000".into(),
            method: "PoolService/DeletePool".into(),
            targets: [("pool".to_string(), "p-1".to_string())].into(),
            args: BTreeMap::new(),
            code: "OK".into(),
            message: String::new(),
        };
        let all = AuditQuery {
            to_ms: i64::MAX,
            ..Default::default()
        };
        assert!(all.matches(&e));
        for (q, want) in [
            (
                AuditQuery {
                    tenant: Some("acme".into()),
                    ..all.clone()
                },
                true,
            ),
            (
                AuditQuery {
                    tenant: Some("other".into()),
                    ..all.clone()
                },
                false,
            ),
            (
                AuditQuery {
                    pool: Some("p-1".into()),
                    ..all.clone()
                },
                true,
            ),
            (
                AuditQuery {
                    pool: Some("p-2".into()),
                    ..all.clone()
                },
                false,
            ),
            (
                AuditQuery {
                    job: Some("j-1".into()),
                    ..all.clone()
                },
                false,
            ),
            (
                AuditQuery {
                    from_ms: 101,
                    ..all.clone()
                },
                false,
            ),
            (
                AuditQuery {
                    to_ms: 100,
                    ..all.clone()
                },
                false,
            ),
            (
                AuditQuery {
                    from_ms: 100,
                    to_ms: 101,
                    ..all.clone()
                },
                true,
            ),
        ] {
            assert_eq!(q.matches(&e), want, "{q:?}");
        }
    }
}
