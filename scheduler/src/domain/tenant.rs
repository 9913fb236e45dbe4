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
    /// Its recent use of the public pool, for the fair share.
    #[serde(default, skip_serializing_if = "RecentShare::is_empty")]
    pub recent: RecentShare,
}

/// A tenant's recent share of the public pool: its dominant share (not
/// over its weight) averaged over time with weights halving every
/// `fair_share_half_life_secs` (an exponential moving average; a tenant
/// that has held a share `s` for long has `s`). In parts per billion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecentShare {
    /// The average up to `as_of_ms`.
    pub avg_ppb: u64,
    /// The share held at `as_of_ms` (counted as held until the next
    /// sample).
    pub held_ppb: u64,
    pub as_of_ms: i64,
}

impl RecentShare {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The average at `now_ms`, `held_ppb` counted as held since
    /// `as_of_ms`, and `held_now_ppb` from now on.
    pub fn advance(self, now_ms: i64, held_now_ppb: u64, half_life_ms: i64) -> Self {
        // Nothing held, then or now, and (next to) nothing before: no
        // history (an idle tenant is not kept or written for ever).
        let idle = held_now_ppb == 0 && self.held_ppb == 0;
        if half_life_ms <= 0 || idle && (self.avg_ppb as f64) < Self::FLOOR_PPB {
            return Self::default();
        }
        if self.as_of_ms <= 0 || now_ms < self.as_of_ms {
            return Self {
                avg_ppb: self.avg_ppb,
                held_ppb: held_now_ppb,
                as_of_ms: now_ms,
            };
        }
        let keep = 0.5f64.powf(now_ms.saturating_sub(self.as_of_ms) as f64 / half_life_ms as f64);
        let avg = self.avg_ppb as f64 * keep + self.held_ppb as f64 * (1.0 - keep);
        if idle && avg < Self::FLOOR_PPB {
            return Self::default();
        }
        Self {
            avg_ppb: avg.round() as u64,
            held_ppb: held_now_ppb,
            as_of_ms: now_ms,
        }
    }

    /// A millionth of the pool.
    const FLOOR_PPB: f64 = 1000.0;
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

    const HOUR: i64 = 3_600_000;

    #[test]
    fn recent_share_averages_with_weights_halving_every_half_life() {
        // Sampled every second, a half held for ten half-lives is a half.
        let mut r = RecentShare::default().advance(1, 500_000_000, HOUR);
        assert_eq!((r.avg_ppb, r.held_ppb), (0, 500_000_000));
        for t in 1..=36_000 {
            r = r.advance(1 + t * 1000, 500_000_000, HOUR);
        }
        let half = r.avg_ppb as f64 / 1e9;
        assert!(
            (half - 0.5 * (1.0 - 0.5f64.powi(10))).abs() < 1e-4,
            "{half}"
        );
        // Then nothing held: one half-life later the average has halved
        // (in one step or in many).
        let z = r.advance(r.as_of_ms + 1, 0, HOUR);
        let once = z.advance(z.as_of_ms + HOUR, 0, HOUR);
        let mut many = z;
        for t in 1..=3600 {
            many = many.advance(z.as_of_ms + t * 1000, 0, HOUR);
        }
        let want = z.avg_ppb as f64 / 2.0;
        for got in [once.avg_ppb, many.avg_ppb] {
            assert!((got as f64 - want).abs() / want < 1e-6, "{got} vs {want}");
        }
        // No half-life: no history.
        assert!(r.advance(r.as_of_ms + 1, 7, 0).is_empty());
        // A tenant that never held anything has none either; one whose
        // average fell below a millionth of the pool, none any more.
        assert!(RecentShare::default().advance(5, 0, HOUR).is_empty());
        let tiny = RecentShare {
            avg_ppb: 999,
            held_ppb: 0,
            as_of_ms: 5,
        };
        assert!(tiny.advance(6, 0, HOUR).is_empty());
        assert!(!tiny.advance(6, 1, HOUR).is_empty(), "it holds some now");
        // A clock that went back starts the sample again, keeping the average.
        let back = r.advance(r.as_of_ms - 10, 9, HOUR);
        assert_eq!((back.avg_ppb, back.held_ppb), (r.avg_ppb, 9));
    }

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
