//! Apply after commit: the cluster's store behind a staging buffer. Between
//! [`Cluster::begin`] and [`Cluster::take_staged`] every write the state
//! machine makes is kept, not written; the caller (the state layer's commit
//! pipeline) writes what was taken in one transaction, with other
//! operations' ([`Staged`]). If that fails, the store is unchanged (the
//! transaction rolled back) and the cluster's memory is reloaded from it
//! ([`Cluster::reload_from_store`]), so memory, store and (since the
//! caller drops the outbox) agents are exactly as before the operation.
//! Outside a begin/take pair (unit tests, the benchmarks) writes go
//! straight through.

use std::cell::RefCell;

use crate::domain::audit::{AuditEntry, AuditQuery};
use crate::domain::billing::{LedgerRow, Order};
use crate::domain::pool::Pool;
use crate::domain::tenant::Tenant;
use crate::domain::{Job, JobState, Node};
use crate::store::{Record, Snapshot, Store, StoreError};

use super::Cluster;

/// An owned copy of a [`Record`], kept until the commit.
#[derive(Debug, Clone)]
enum Kept {
    Node(Node),
    Job(Job),
    Pool(Pool),
    Tenant(Tenant),
    Token { sha256: String, tenant: String },
    RevokeToken { sha256: String },
    Order(Order),
    Ledger(LedgerRow),
    LedgerClosed(i64),
    ForgetJob(String),
    NextJobSeq(u64),
    SecretKeyCheck(String),
    PlacementShapes(String),
    Audit(AuditEntry),
    PruneAudit(i64),
}

impl Kept {
    fn of(r: &Record<'_>) -> Self {
        match *r {
            Record::Node(n) => Self::Node(n.clone()),
            Record::Job(j) => Self::Job(j.clone()),
            Record::Pool(p) => Self::Pool(p.clone()),
            Record::Tenant(t) => Self::Tenant(t.clone()),
            Record::Token { sha256, tenant } => Self::Token {
                sha256: sha256.into(),
                tenant: tenant.into(),
            },
            Record::RevokeToken { sha256 } => Self::RevokeToken {
                sha256: sha256.into(),
            },
            Record::Order(o) => Self::Order(o.clone()),
            Record::Ledger(l) => Self::Ledger(l.clone()),
            Record::LedgerClosed(t) => Self::LedgerClosed(t),
            Record::ForgetJob { job_id } => Self::ForgetJob(job_id.into()),
            Record::NextJobSeq(s) => Self::NextJobSeq(s),
            Record::SecretKeyCheck(c) => Self::SecretKeyCheck(c.into()),
            Record::PlacementShapes(j) => Self::PlacementShapes(j.into()),
            Record::Audit(e) => Self::Audit(e.clone()),
            Record::PruneAudit { before_ms } => Self::PruneAudit(before_ms),
        }
    }

    fn record(&self) -> Record<'_> {
        match self {
            Self::Node(n) => Record::Node(n),
            Self::Job(j) => Record::Job(j),
            Self::Pool(p) => Record::Pool(p),
            Self::Tenant(t) => Record::Tenant(t),
            Self::Token { sha256, tenant } => Record::Token { sha256, tenant },
            Self::RevokeToken { sha256 } => Record::RevokeToken { sha256 },
            Self::Order(o) => Record::Order(o),
            Self::Ledger(l) => Record::Ledger(l),
            Self::LedgerClosed(t) => Record::LedgerClosed(*t),
            Self::ForgetJob(job_id) => Record::ForgetJob { job_id },
            Self::NextJobSeq(s) => Record::NextJobSeq(*s),
            Self::SecretKeyCheck(c) => Record::SecretKeyCheck(c),
            Self::PlacementShapes(j) => Record::PlacementShapes(j),
            Self::Audit(e) => Record::Audit(e),
            Self::PruneAudit(before_ms) => Record::PruneAudit {
                before_ms: *before_ms,
            },
        }
    }

    /// Rows written whole (upserts): only the last write of one counts.
    fn upsert_key(&self) -> Option<(u8, &str)> {
        match self {
            Self::Node(n) => Some((0, &n.node_id)),
            Self::Job(j) => Some((1, &j.job_id)),
            Self::Pool(p) => Some((2, &p.pool_id)),
            Self::Tenant(t) => Some((3, &t.name)),
            _ => None,
        }
    }
}

/// What one or more operations staged, in order: written in one
/// transaction by [`Staged::write`] (the state layer's commit pipeline
/// appends the operations of a whole group).
#[derive(Debug, Default)]
pub struct Staged(Vec<Kept>);

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Rows (or row writes) staged.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds what a later operation staged.
    pub fn append(&mut self, mut later: Staged) {
        self.0.append(&mut later.0);
    }

    /// Writes everything in one transaction: a row written more than once
    /// is written once, with its last value, where it was first written
    /// (so that what refers to it, written after its first write, such as
    /// a tenant's token after the tenant, still comes after it).
    pub fn write(&self, store: &dyn Store, now_ms: i64) -> Result<(), StoreError> {
        let mut last = std::collections::HashMap::new();
        for (i, k) in self.0.iter().enumerate() {
            if let Some(key) = k.upsert_key() {
                last.insert(key, i);
            }
        }
        let mut written = std::collections::HashSet::new();
        let records: Vec<Record<'_>> = self
            .0
            .iter()
            .filter_map(|k| match k.upsert_key() {
                None => Some(k.record()),
                Some(key) => written.insert(key).then(|| self.0[last[&key]].record()),
            })
            .collect();
        store.write(&records, now_ms)
    }
}

/// The store with its staging buffer.
pub(super) struct StagedStore {
    inner: Box<dyn Store>,
    /// Some while an operation is staged.
    kept: RefCell<Option<Vec<Kept>>>,
    /// Jobs written (staged or not) since the last [`Self::touched_jobs`].
    touched: RefCell<Vec<String>>,
}

impl StagedStore {
    pub(super) fn new(inner: Box<dyn Store>) -> Self {
        Self {
            inner,
            kept: RefCell::new(None),
            touched: RefCell::new(Vec::new()),
        }
    }

    /// The jobs written since the last call (the scheduling pass's index
    /// of waiting jobs takes them in).
    pub(super) fn touched_jobs(&self) -> Vec<String> {
        std::mem::take(&mut *self.touched.borrow_mut())
    }

    fn begin(&self) {
        *self.kept.borrow_mut() = Some(Vec::new());
    }

    /// Ends staging; what was kept.
    fn take(&self) -> Staged {
        Staged(self.kept.borrow_mut().take().unwrap_or_default())
    }

    fn staging(&self) -> bool {
        self.kept.borrow().is_some()
    }
}

impl StagedStore {
    /// Ids of the jobs and pools staged so far (in order, each once).
    pub(super) fn staged_ids(&self) -> (Vec<String>, Vec<String>) {
        let (mut jobs, mut pools) = (Vec::<String>::new(), Vec::<String>::new());
        for k in self.kept.borrow().iter().flatten() {
            match k {
                Kept::Job(j) if !jobs.contains(&j.job_id) => jobs.push(j.job_id.clone()),
                Kept::Pool(p) if !pools.contains(&p.pool_id) => pools.push(p.pool_id.clone()),
                _ => {}
            }
        }
        (jobs, pools)
    }
}

impl Store for StagedStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        self.inner.ledger(from_ms, to_ms)
    }

    fn ledger_page(&self, q: &crate::store::LedgerQuery) -> Result<Vec<LedgerRow>, StoreError> {
        self.inner.ledger_page(q)
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        self.inner.reader()
    }

    fn audit_page(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit_page(q)
    }

    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        self.inner.audit_max_seq()
    }

    fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError> {
        self.touched
            .borrow_mut()
            .extend(records.iter().filter_map(|r| match r {
                Record::Job(j) => Some(j.job_id.clone()),
                _ => None,
            }));
        if let Some(kept) = self.kept.borrow_mut().as_mut() {
            kept.extend(records.iter().map(Kept::of));
            return Ok(());
        }
        self.inner.write(records, now_ms)
    }
}

/// A store that is never used: stands in while the real one is moved.
struct Detached;

impl Store for Detached {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Err(StoreError::Unreachable("store detached".into()))
    }
    fn ledger(&self, _: i64, _: i64) -> Result<Vec<LedgerRow>, StoreError> {
        Err(StoreError::Unreachable("store detached".into()))
    }
    fn audit_page(&self, _: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        Err(StoreError::Unreachable("store detached".into()))
    }
    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        Err(StoreError::Unreachable("store detached".into()))
    }
    fn write(&self, _: &[Record<'_>], _: i64) -> Result<(), StoreError> {
        Err(StoreError::Unreachable("store detached".into()))
    }
}

impl Cluster {
    /// Starts staging an operation's writes. A cluster whose memory may
    /// differ from the store (a failed commit that could not reload) is
    /// reloaded first.
    pub fn begin(&mut self, now_ms: i64) {
        if self.staging() {
            // The last operation never ended (it panicked): what it changed
            // in memory was not written.
            self.store.take();
            self.diverged = true;
        }
        if self.diverged {
            self.reload(now_ms);
        }
        self.store.begin();
    }

    /// Ends staging: what the operation staged, for the caller to write
    /// ([`Staged::write`]). If that write fails the store is unchanged and
    /// memory must be reloaded from it ([`Cluster::reload_from_store`]).
    pub fn take_staged(&mut self) -> Staged {
        self.store.take()
    }

    /// Replaces memory with what the store holds (after a failed write, or
    /// an operation that failed after changing memory).
    pub fn reload_from_store(&mut self, now_ms: i64) {
        self.reload(now_ms);
    }

    /// True between begin and take_staged.
    fn staging(&self) -> bool {
        self.store.staging()
    }

    /// Whether the next [`Cluster::begin`] reloads memory from the store
    /// (an operation panicked, or a reload failed): the caller first lets
    /// every queued write reach the store, or the reload would miss them.
    pub fn needs_reload(&self) -> bool {
        self.staging() || self.diverged
    }

    /// Memory may differ from the store and could not be reloaded: what an
    /// operation stages now must not be written.
    pub fn is_diverged(&self) -> bool {
        self.diverged
    }

    /// Replaces memory with what the store holds. If the store cannot be
    /// read, memory is marked diverged and reloaded at the next begin.
    fn reload(&mut self, now_ms: i64) {
        let snapshot = match self.store.inner.load() {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(error = %crate::ErrorChain(&err), "cannot reload state after a failed write; retrying with the next operation");
                self.diverged = true;
                return;
            }
        };
        let inner = std::mem::replace(&mut self.store.inner, Box::new(Detached));
        let settings = self.settings.clone();
        // Liveness is not stored state: heartbeats seen stay seen. Nor is
        // why a job waits (written only with a real change): it stays for
        // the jobs that wait before and after, in the same state.
        let seen: Vec<(String, i64)> = self
            .nodes
            .values()
            .map(|n| (n.node_id.clone(), n.last_heartbeat_ms))
            .collect();
        let waiting: Vec<(String, JobState, String)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued || !j.pending.is_empty())
            .map(|j| (j.job_id.clone(), j.state, j.reason.clone()))
            .collect();
        // Nor the tenants' recent shares (written once a minute): the
        // newer stay.
        let recent: Vec<(String, crate::domain::tenant::RecentShare)> = self
            .tenants
            .values()
            .map(|t| (t.name.clone(), t.recent))
            .collect();
        let recent_written_ms = self.recent_written_ms;
        // Audit numbers are never given out twice: past both what memory
        // gave out and what the store holds.
        let stored = inner.audit_max_seq().unwrap_or(0);
        let next_audit_seq = self.next_audit_seq.max(stored + 1);
        *self = Cluster::from_snapshot(inner, settings, snapshot, now_ms);
        self.next_audit_seq = next_audit_seq;
        self.recent_written_ms = recent_written_ms;
        for (name, r) in recent {
            if let Some(t) = self.tenants.get_mut(&name) {
                t.recent = r;
            }
        }
        for (id, at) in seen {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.last_heartbeat_ms = at;
            }
        }
        for (id, state, reason) in waiting {
            if let Some(j) = self.jobs.get_mut(&id)
                && j.state == state
                && (j.state == JobState::Queued || !j.pending.is_empty())
            {
                j.reason = reason;
            }
        }
        tracing::warn!("state reloaded from the store after a failed write");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tenant::Quota;

    fn tenant(max_gpus: u32) -> Tenant {
        Tenant {
            name: "acme".into(),
            quota: Quota {
                max_dedicated_nodes: 1,
                max_gpus,
                ..Default::default()
            },
            created_at_ms: 0,
            network_id: "net-acme".into(),
            recent: Default::default(),
        }
    }

    /// A group of operations (the commit pipeline's) that creates a tenant,
    /// gives it a token, then changes it: the token's row refers to the
    /// tenant's, so the tenant is written first, with its last value.
    #[test]
    fn a_row_written_twice_is_written_once_where_it_was_first_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let group = Staged(vec![
            Kept::Tenant(tenant(1)),
            Kept::Token {
                sha256: "ab".repeat(32),
                tenant: "acme".into(),
            },
            Kept::Tenant(tenant(8)),
        ]);
        group
            .write(&store, 0)
            .expect("the token follows its tenant");
        let stored = store.load().unwrap();
        assert_eq!(stored.tenants, vec![tenant(8)]);
        assert_eq!(stored.tokens, vec![("ab".repeat(32), "acme".to_string())]);
    }
}
