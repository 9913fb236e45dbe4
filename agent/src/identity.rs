//! Who an instance runs as: one identity per tenant, which no other tenant
//! shares.
//!
//! Each tenant gets a slot: a block of [`BLOCK`] host ids starting at
//! `tenant_uid_base + slot * BLOCK`. A host-process job runs as the block's
//! first id (uid = gid); an image job runs in a user namespace that maps
//! container ids `0..BLOCK` onto the block, so root in the container is that
//! same unprivileged host id. Slots are given in order of first use and
//! remembered in `STATE_DIR/tenant-ids.json`, so a tenant keeps its ids
//! across agent restarts (Slurm and systemd's DynamicUser are the models).
//! An operator may pin a tenant's host-process uid (shared file systems)
//! with `[tenant_uids]`; its containers still use its block.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Host ids per tenant (a user namespace's range).
pub const BLOCK: u32 = 65_536;

/// Default first host id of the tenant blocks: just above systemd's range
/// for containers (524288..1879048191), below 2^31.
pub const DEFAULT_BASE: u32 = 1_879_048_192;

/// Default number of tenant blocks (up to 2^31 with the default base).
pub const DEFAULT_SLOTS: u32 = 4_096;

/// The ids one tenant's instances run as on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// uid (= gid) of host-process jobs.
    pub uid: u32,
    pub gid: u32,
    /// First host id of the tenant's user-namespace block (container 0).
    pub range_base: u32,
    pub range_size: u32,
}

/// Errors giving out an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no tenant id slot left ({slots} in use; raise `tenant_uid_slots`)")]
    Exhausted { slots: u32 },
    #[error("cannot record tenant ids in {path}")]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("an instance has no tenant")]
    NoTenant,
}

/// Hands out per-tenant identities.
#[derive(Clone)]
pub struct Identities {
    base: u32,
    slots: u32,
    pinned: BTreeMap<String, u32>,
    file: PathBuf,
    /// tenant -> slot
    table: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("base", &self.base)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// Loads the slot table from `state_dir` (a missing file is an empty
    /// table; an unreadable one is an error: ids must never be reused).
    pub fn load(
        state_dir: &Path,
        base: u32,
        slots: u32,
        pinned: BTreeMap<String, u32>,
    ) -> anyhow::Result<Self> {
        let last = u64::from(base) + u64::from(slots) * u64::from(BLOCK);
        anyhow::ensure!(
            slots > 0 && last <= u64::from(u32::MAX - 1),
            "tenant_uid_base {base} with {slots} slots of {BLOCK} ids runs past the largest uid"
        );
        let file = state_dir.join("tenant-ids.json");
        let table: BTreeMap<String, u32> = match std::fs::read_to_string(&file) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", file.display())),
        };
        Ok(Self {
            base,
            slots,
            pinned,
            file,
            table: Arc::new(Mutex::new(table)),
        })
    }

    /// The tenant's identity, giving it the next free slot on first use.
    pub fn for_tenant(&self, tenant: &str) -> Result<Identity, IdentityError> {
        if tenant.is_empty() {
            return Err(IdentityError::NoTenant);
        }
        let mut table = self.table.lock().unwrap();
        let slot = match table.get(tenant) {
            Some(s) => *s,
            None => {
                let used: std::collections::HashSet<u32> = table.values().copied().collect();
                let slot = (0..self.slots)
                    .find(|s| !used.contains(s))
                    .ok_or(IdentityError::Exhausted { slots: self.slots })?;
                table.insert(tenant.to_string(), slot);
                let text = serde_json::to_string_pretty(&*table).expect("table serializes");
                let tmp = self.file.with_extension("json.tmp");
                let write = || {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?
                        .write_all(text.as_bytes())
                };
                if let Err(source) = write()
                    .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &self.file))
                {
                    table.remove(tenant);
                    return Err(IdentityError::Save {
                        path: self.file.clone(),
                        source,
                    });
                }
                tracing::info!(tenant, slot, "tenant given an id block");
                slot
            }
        };
        let range_base = self.base + slot * BLOCK;
        let uid = self.pinned.get(tenant).copied().unwrap_or(range_base);
        Ok(Identity {
            uid,
            gid: uid,
            range_base,
            range_size: BLOCK,
        })
    }
}

/// A tenant name as one path component (names are checked by the
/// scheduler; this keeps a bad one from ever naming another path).
pub fn dir_name(tenant: &str) -> String {
    let name: String = tenant
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() { "_".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_get_distinct_blocks_that_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Identities::load(dir.path(), DEFAULT_BASE, 8, BTreeMap::new()).unwrap();
        let a = ids.for_tenant("acme").unwrap();
        let b = ids.for_tenant("beta").unwrap();
        assert_eq!(a.uid, DEFAULT_BASE);
        assert_eq!(b.uid, DEFAULT_BASE + BLOCK);
        assert_eq!(ids.for_tenant("acme").unwrap(), a);
        let again = Identities::load(dir.path(), DEFAULT_BASE, 8, BTreeMap::new()).unwrap();
        assert_eq!(again.for_tenant("beta").unwrap(), b);
        assert_eq!(
            again.for_tenant("gamma").unwrap().uid,
            DEFAULT_BASE + 2 * BLOCK
        );
    }

    #[test]
    fn pinned_uid_and_exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = BTreeMap::from([("acme".to_string(), 5000)]);
        let ids = Identities::load(dir.path(), 100_000, 1, pinned).unwrap();
        let a = ids.for_tenant("acme").unwrap();
        assert_eq!((a.uid, a.gid, a.range_base), (5000, 5000, 100_000));
        assert!(matches!(
            ids.for_tenant("beta"),
            Err(IdentityError::Exhausted { slots: 1 })
        ));
        assert!(matches!(ids.for_tenant(""), Err(IdentityError::NoTenant)));
        assert!(Identities::load(dir.path(), u32::MAX - 10, 1, BTreeMap::new()).is_err());
    }

    #[test]
    fn corrupt_table_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tenant-ids.json"), "{not json").unwrap();
        assert!(Identities::load(dir.path(), DEFAULT_BASE, 8, BTreeMap::new()).is_err());
    }

    #[test]
    fn dir_names_stay_one_component() {
        assert_eq!(dir_name("acme-1"), "acme-1");
        assert_eq!(dir_name("../x"), "___x");
        assert_eq!(dir_name(""), "_");
    }
}
