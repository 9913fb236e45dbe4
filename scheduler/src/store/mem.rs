//! A [`Store`] in memory, for tests and benchmarks that are not about the
//! database: the same semantics as [`SqliteStore`](super::SqliteStore) for
//! `load`, `write`, `ledger`, `ledger_page` and the audit trail (checked by the contract
//! test in `store::contract`). Rows are kept as the JSON the real stores
//! write and decoded on load, so what a real store would lose or refuse
//! on a round trip, this one does too. A write is all or none, and the
//! constraints the schema enforces on these writes are enforced here:
//! orders and tokens are written once, sequence numbers are unique, a
//! token names an existing tenant.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{LedgerRow, Op, Record, Snapshot, Store, StoreError, decode_data, encode};
use crate::domain::audit::{AuditEntry, AuditQuery};

/// The tables, as the SQL schema holds them.
#[derive(Debug, Clone, Default)]
struct Tables {
    nodes: BTreeMap<String, String>,
    /// job_id -> (seq, data)
    jobs: BTreeMap<String, (u64, String)>,
    /// pool_id -> (seq, data)
    pools: BTreeMap<String, (u64, String)>,
    tenants: BTreeMap<String, String>,
    /// (sha256, tenant) in the order written.
    tokens: Vec<(String, String)>,
    /// order_id -> (seq, data)
    orders: BTreeMap<String, (u64, String)>,
    /// (hour_start_ms, subject, mode) -> data
    ledger: BTreeMap<(i64, String, String), String>,
    meta: BTreeMap<String, String>,
    /// seq -> the record (decoded: queries filter on it)
    audit: BTreeMap<u64, AuditEntry>,
}

/// The in-memory store. Clones share the same tables (as two handles on
/// one database file would).
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    tables: Arc<Mutex<Tables>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

/// A write the schema would refuse.
fn refused(op: Op, what: String) -> StoreError {
    StoreError::Refused { op, what }
}

/// Rows of `table` in key order, decoded.
fn decoded<'a, T: serde::de::DeserializeOwned>(
    table: &'static str,
    rows: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<Vec<T>, StoreError> {
    rows.map(|(id, data)| decode_data(table, id, data))
        .collect()
}

/// Rows kept with a sequence number, decoded in `seq` order.
fn by_seq<T: serde::de::DeserializeOwned>(
    table: &'static str,
    rows: &BTreeMap<String, (u64, String)>,
) -> Result<Vec<T>, StoreError> {
    let mut rows: Vec<_> = rows.iter().map(|(id, (seq, d))| (*seq, id, d)).collect();
    rows.sort_by_key(|r| r.0);
    decoded(table, rows.into_iter().map(|(_, id, d)| (id, d)))
}

/// Inserts or updates a row kept with a unique `seq`; an update keeps the
/// row's first `seq`, as the SQL upserts do.
fn upsert_seq(
    rows: &mut BTreeMap<String, (u64, String)>,
    op: Op,
    id: &str,
    seq: u64,
    data: String,
) -> Result<(), StoreError> {
    if let Some(row) = rows.get_mut(id) {
        row.1 = data;
        return Ok(());
    }
    insert_seq(rows, op, id, seq, data)
}

/// Inserts a new row kept with a unique `seq`.
fn insert_seq(
    rows: &mut BTreeMap<String, (u64, String)>,
    op: Op,
    id: &str,
    seq: u64,
    data: String,
) -> Result<(), StoreError> {
    if rows.contains_key(id) {
        return Err(refused(op, format!("{id} is already there")));
    }
    if rows.values().any(|r| r.0 == seq) {
        return Err(refused(op, format!("sequence number {seq} is taken")));
    }
    rows.insert(id.to_string(), (seq, data));
    Ok(())
}

impl Tables {
    fn apply(&mut self, record: &Record<'_>) -> Result<(), StoreError> {
        let op = record.op();
        let meta = |t: &mut Self, key: &str, value: String| {
            t.meta.insert(key.to_string(), value);
        };
        match *record {
            Record::Node(n) => {
                self.nodes.insert(n.node_id.clone(), encode(n));
            }
            Record::Job(j) => upsert_seq(&mut self.jobs, op, &j.job_id, j.seq, encode(j))?,
            Record::Pool(p) => upsert_seq(&mut self.pools, op, &p.pool_id, p.seq, encode(p))?,
            Record::Tenant(t) => {
                self.tenants.insert(t.name.clone(), encode(t));
            }
            Record::Token { sha256, tenant } => {
                if !self.tenants.contains_key(tenant) {
                    return Err(refused(op, format!("no tenant {tenant}")));
                }
                if self.tokens.iter().any(|t| t.0 == sha256) {
                    return Err(refused(op, "the token is already there".into()));
                }
                self.tokens.push((sha256.to_string(), tenant.to_string()));
            }
            Record::RevokeToken { sha256 } => self.tokens.retain(|t| t.0 != sha256),
            Record::Order(o) => insert_seq(&mut self.orders, op, &o.order_id, o.seq, encode(o))?,
            Record::Ledger(row) => {
                let key = (
                    row.hour_start_ms,
                    row.subject.clone(),
                    row.mode.as_db_str().to_string(),
                );
                self.ledger.entry(key).or_insert_with(|| encode(row));
            }
            Record::LedgerClosed(until) => meta(self, "ledger_closed_until_ms", until.to_string()),
            Record::ForgetJob { job_id } => {
                self.jobs.remove(job_id);
            }
            Record::NextJobSeq(seq) => meta(self, "next_job_seq", seq.to_string()),
            Record::SecretKeyCheck(check) => meta(self, "secret_key_check", check.to_string()),
            Record::PlacementShapes(json) => meta(self, "placement_shapes", json.to_string()),
            Record::Audit(e) => {
                if self.audit.contains_key(&e.seq) {
                    return Err(refused(
                        op,
                        format!("audit record {} is already there", e.seq),
                    ));
                }
                self.audit.insert(e.seq, e.clone());
            }
            Record::PruneAudit { before_ms } => self.audit.retain(|_, e| e.at_ms >= before_ms),
        }
        Ok(())
    }

    fn meta<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.meta.get(key).and_then(|v| v.parse().ok())
    }
}

impl Store for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let t = self.tables.lock().unwrap();
        Ok(Snapshot {
            nodes: decoded("nodes", t.nodes.iter())?,
            jobs: by_seq("jobs", &t.jobs)?,
            pools: by_seq("pools", &t.pools)?,
            tenants: decoded("tenants", t.tenants.iter())?,
            tokens: t.tokens.clone(),
            orders: by_seq("orders", &t.orders)?,
            ledger_closed_until_ms: t.meta("ledger_closed_until_ms"),
            next_job_seq: t.meta("next_job_seq"),
            secret_key_check: t.meta("secret_key_check"),
            placement_shapes: t.meta("placement_shapes"),
        })
    }

    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        let t = self.tables.lock().unwrap();
        t.ledger
            .iter()
            .filter(|((hour, _, _), _)| (from_ms..to_ms).contains(hour))
            .map(|((_, subject, _), data)| decode_data("ledger", subject, data))
            .collect()
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        Some(Box::new(self.clone()))
    }

    fn audit_page(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let t = self.tables.lock().unwrap();
        Ok(t.audit
            .range(q.after_seq.saturating_add(1)..)
            .map(|(_, e)| e)
            .filter(|e| q.matches(e))
            .take(q.limit)
            .cloned()
            .collect())
    }

    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .tables
            .lock()
            .unwrap()
            .audit
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0))
    }

    fn write(&self, records: &[Record<'_>], _now_ms: i64) -> Result<(), StoreError> {
        let mut t = self.tables.lock().unwrap();
        let mut next = t.clone();
        for record in records {
            next.apply(record)?;
        }
        *t = next;
        Ok(())
    }
}
