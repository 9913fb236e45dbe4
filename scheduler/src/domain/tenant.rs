//! Tenants, callers and quotas (R-SCALE-2).

use serde::{Deserialize, Serialize};

/// The operator's tenant: sees and manages everything, has no quota.
pub const ADMIN_TENANT: &str = "admin";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_dedicated_nodes: u32,
    pub max_gpus: u32,
    /// Most GPUs the tenant's jobs hold at once in the public pool (a
    /// fraction counts its share); None: no limit.
    #[serde(default)]
    pub public_max_gpus: Option<u32>,
    /// The tenant's weight in the public pool's fair share; 0 counts as 1.
    #[serde(default)]
    pub public_weight: u32,
    /// May submit high-class jobs (which preempt lower classes, other
    /// tenants' included). The admin always may.
    #[serde(default)]
    pub allow_high_class: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub quota: Quota,
    pub created_at_ms: i64,
    /// The tenant's own isolated network (R-CREATE-14).
    pub network_id: String,
}

/// Who is calling, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
}

impl Caller {
    pub fn admin() -> Self {
        Self {
            tenant: ADMIN_TENANT.to_string(),
            admin: true,
        }
    }

    pub fn tenant(name: &str) -> Self {
        Self {
            tenant: name.to_string(),
            admin: false,
        }
    }

    /// The key of the caller's request budgets (rate limit, open streams).
    pub fn rate_key(&self) -> String {
        if self.admin {
            "(admin)".to_string()
        } else {
            self.tenant.clone()
        }
    }

    /// True when the caller may see and use an object owned by `owner`.
    /// Another tenant's objects are reported as not found, so their
    /// existence does not leak.
    pub fn may_access(&self, owner: &str) -> bool {
        self.admin || self.tenant == owner
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error(
        "tenant name {0:?} is invalid: 1 to 63 lower-case letters, digits and hyphens, starting with a letter or digit"
    )]
    BadName(String),
    #[error("tenant name {0:?} is reserved")]
    Reserved(String),
    #[error(
        "quota exceeded (R-SCALE-2): tenant {tenant} may hold {max_nodes} dedicated node(s) and {max_gpus} GPU(s); \
         in use {used_nodes} node(s) and {used_gpus} GPU(s); this asks for {add_nodes} more node(s) with {add_gpus} GPU(s)"
    )]
    QuotaExceeded {
        tenant: String,
        max_nodes: u32,
        max_gpus: u32,
        used_nodes: u32,
        used_gpus: u32,
        add_nodes: u32,
        add_gpus: u32,
    },
}

pub fn validate_tenant_name(name: &str) -> Result<(), TenantError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(TenantError::BadName(name.to_string()));
    }
    if name == ADMIN_TENANT {
        return Err(TenantError::Reserved(name.to_string()));
    }
    Ok(())
}

/// Current use of a tenant's quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUse {
    pub nodes: u32,
    pub gpus: u32,
}

/// R-SCALE-2: adding `add` to `used` must stay within `quota`. The admin
/// tenant has no quota.
pub fn check_quota(
    tenant: &str,
    quota: Quota,
    used: QuotaUse,
    add: QuotaUse,
) -> Result<(), TenantError> {
    if tenant == ADMIN_TENANT {
        return Ok(());
    }
    if used.nodes + add.nodes > quota.max_dedicated_nodes || used.gpus + add.gpus > quota.max_gpus {
        return Err(TenantError::QuotaExceeded {
            tenant: tenant.to_string(),
            max_nodes: quota.max_dedicated_nodes,
            max_gpus: quota.max_gpus,
            used_nodes: used.nodes,
            used_gpus: used.gpus,
            add_nodes: add.nodes,
            add_gpus: add.gpus,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        max_dedicated_nodes: 4,
        max_gpus: 16,
        public_max_gpus: None,
        public_weight: 0,
        allow_high_class: false,
    };

    #[test]
    fn r_scale_2_scale_out_within_quota_is_allowed() {
        assert!(
            check_quota(
                "a",
                Q,
                QuotaUse { nodes: 2, gpus: 8 },
                QuotaUse { nodes: 2, gpus: 8 }
            )
            .is_ok()
        );
    }

    #[test]
    fn r_scale_2_scale_out_beyond_quota_fails_naming_limit_and_use() {
        let err = check_quota(
            "a",
            Q,
            QuotaUse { nodes: 3, gpus: 8 },
            QuotaUse { nodes: 2, gpus: 0 },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("R-SCALE-2")
                && msg.contains("4 dedicated node(s)")
                && msg.contains("in use 3 node(s)"),
            "{msg}"
        );
        assert!(
            check_quota(
                "a",
                Q,
                QuotaUse { nodes: 0, gpus: 16 },
                QuotaUse { nodes: 1, gpus: 1 }
            )
            .is_err()
        );
        assert!(
            check_quota(
                ADMIN_TENANT,
                Q,
                QuotaUse {
                    nodes: 99,
                    gpus: 99
                },
                QuotaUse { nodes: 9, gpus: 9 }
            )
            .is_ok()
        );
    }

    #[test]
    fn tenant_names_are_checked() {
        assert!(validate_tenant_name("team-a1").is_ok());
        for bad in ["", "Team", "-a", "a_b", &"x".repeat(64)] {
            assert!(validate_tenant_name(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            validate_tenant_name("admin"),
            Err(TenantError::Reserved(_))
        ));
    }

    #[test]
    fn callers_reach_only_their_own_objects() {
        assert!(Caller::tenant("a").may_access("a"));
        assert!(!Caller::tenant("b").may_access("a"));
        assert!(Caller::admin().may_access("a"));
    }
}
