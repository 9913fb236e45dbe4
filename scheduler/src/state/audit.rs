//! The audited call being handled in this task: made by the gRPC guard
//! (the api's `audit` module), read by [`super::Shared::mutate`], which
//! stages its record with the call's own writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::domain::audit::AuditEntry;
use crate::domain::tenant::Caller;

tokio::task_local! {
    /// The audited call whose handler runs in this task.
    pub static CALL: Arc<AuditCall>;
}

/// One audited call, as the guard saw it.
#[derive(Debug)]
pub struct AuditCall {
    /// `Service/Method`.
    pub method: String,
    pub role: String,
    pub who: String,
    /// The caller's tenant (`admin` for the admin, empty for a node).
    pub caller_tenant: String,
    pub peer: String,
    pub targets: BTreeMap<String, String>,
    pub args: BTreeMap<String, String>,
    /// Set once the call's record is staged.
    pub recorded: AtomicBool,
}

impl AuditCall {
    pub fn new(path: &str, role: &str, who: &str, caller_tenant: &str, peer: String) -> Self {
        Self {
            method: path.trim_start_matches("/gpupool.v1.").to_string(),
            role: role.into(),
            who: who.into(),
            caller_tenant: caller_tenant.into(),
            peer,
            targets: BTreeMap::new(),
            args: BTreeMap::new(),
            recorded: AtomicBool::new(false),
        }
    }

    /// For a tenant's or the admin's call.
    pub fn of_caller(path: &str, caller: &Caller, peer: String) -> Self {
        if caller.admin {
            Self::new(path, "admin", &caller.tenant, &caller.tenant, peer)
        } else {
            Self::new(path, "tenant", &caller.tenant, &caller.tenant, peer)
        }
    }

    /// The record, not yet numbered. `owner` is the tenant the call
    /// concerned (see [`crate::cluster::Cluster::audit_owner`]).
    pub fn entry(
        &self,
        owner: Option<String>,
        code: &str,
        message: &str,
        now_ms: i64,
    ) -> AuditEntry {
        let tenant = self.trail_of(owner);
        AuditEntry {
            seq: 0,
            at_ms: now_ms,
            role: self.role.clone(),
            who: self.who.clone(),
            tenant,
            peer: self.peer.clone(),
            method: self.method.clone(),
            targets: self.targets.clone(),
            args: self.args.clone(),
            code: code.to_string(),
            message: message.chars().take(1000).collect(),
        }
    }

    /// Whose trail the record goes in. A tenant's call is in the tenant's
    /// own, whatever it names: another tenant's id (answered NOT_FOUND)
    /// must neither reach that tenant's trail nor, by being missing from
    /// the caller's, tell the caller the id exists. The admin's call is in
    /// the trail of `owner`, the tenant it concerned (none: the admin's).
    pub fn trail_of(&self, owner: Option<String>) -> String {
        match self.role.as_str() {
            "tenant" => self.caller_tenant.clone(),
            _ => owner.unwrap_or_default(),
        }
    }

    /// Claims the record: true for the first caller only.
    pub fn claim(&self) -> bool {
        !self.recorded.swap(true, Ordering::SeqCst)
    }

    /// The record claimed was not written (its transaction failed): the
    /// call is to be recorded again, as it ended.
    pub fn unclaim(&self) {
        self.recorded.store(false, Ordering::SeqCst);
    }
}

/// The call being handled in this task, if it is audited.
pub fn current() -> Option<Arc<AuditCall>> {
    CALL.try_with(Arc::clone).ok()
}
