//! Durable state behind the [`Store`] trait. The default is one SQLite file
//! (rusqlite, WAL, `synchronous=FULL`): every accepted mutation is committed
//! before the API call returns. Migrations live in `scheduler/migrations/`
//! and are applied in order at open. PostgreSQL ([`crate::pgstore`]) runs
//! the same migrations behind the same trait; both run the statements of
//! [`sql`], written once. [`mem::MemStore`] keeps the same tables in memory
//! for tests.
//!
//! What is on disk is explicit. Enum columns (`jobs.state`, `pools.status`,
//! `ledger.mode`) hold the text of the enums' `as_db_str`, fixed by tests.
//! The `data` columns hold the domain structs as JSON, each blob with a
//! schema version, `"v": 1` ([`DATA_VERSION`]), written first; blobs
//! written before versions have none and read as version 0, which is the
//! same format. A blob of a version this binary does not know is refused
//! with [`StoreError::UnknownDataVersion`] naming the table, the row and
//! the version, rather than read as something it is not. The domain
//! structs are still the JSON format (no separate record types): a change
//! to one that older binaries or databases cannot read must come with a
//! new version and its conversion in [`decode_data`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::domain::audit::{AuditEntry, AuditQuery};
use crate::domain::billing::{LedgerRow, Order};
use crate::domain::pool::Pool;
use crate::domain::tenant::Tenant;
use crate::domain::{Job, Node};

#[cfg(test)]
mod contract;
pub mod mem;
pub(crate) mod sql;

/// The version of the JSON blobs (`data` columns) this binary writes.
pub const DATA_VERSION: u64 = 1;

/// Ordered migrations: (version, SQL).
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_tenants_pools.sql")),
    (3, include_str!("../migrations/0003_billing.sql")),
    (4, include_str!("../migrations/0004_leader.sql")),
    (5, include_str!("../migrations/0005_ledger_pages.sql")),
    (6, include_str!("../migrations/0006_audit.sql")),
];

/// What a store was doing when the database refused: the table and the
/// operation (a [`StoreError`]'s context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read(&'static str),
    Write(&'static str),
    Delete(&'static str),
    /// Starting a write transaction.
    Begin,
    /// Committing a write transaction.
    Commit,
    /// Applying a schema migration.
    Migrate(i64),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Read(table) => write!(f, "reading {table}"),
            Op::Write(table) => write!(f, "writing {table}"),
            Op::Delete(table) => write!(f, "deleting from {table}"),
            Op::Begin => f.write_str("starting a transaction"),
            Op::Commit => f.write_str("committing a transaction"),
            Op::Migrate(version) => write!(f, "applying database migration {version}"),
        }
    }
}

/// Why the store failed. The message says what was being done; the
/// database's own error is the [`source`](std::error::Error::source),
/// never repeated in the message: log the chain ([`crate::ErrorChain`])
/// once, where the error is handled.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database is at schema version {found}, newer than this binary knows ({known})")]
    TooNew { found: i64, known: i64 },
    /// An SQLite statement failed.
    #[error("{op}")]
    Sql {
        op: Op,
        #[source]
        source: rusqlite::Error,
    },
    /// A PostgreSQL statement failed.
    #[error("PostgreSQL: {op}")]
    Postgres {
        op: Op,
        #[source]
        source: postgres::Error,
    },
    #[error("PostgreSQL is unreachable: {0}")]
    Unreachable(String),
    #[error(
        "the secret key (`secret_key_file`) is not the one this database's notebook tokens were \
         made with: use that key (replicas sharing PostgreSQL must share one)"
    )]
    SecretKeyMismatch,
    #[error("this scheduler no longer holds the leader lease (the leader is now {0})")]
    NotLeader(String),
    #[error(
        "row {id} in {table} is of data version {found}, newer than this binary knows ({known})"
    )]
    UnknownDataVersion {
        table: &'static str,
        id: String,
        found: u64,
        known: u64,
    },
    /// A write the schema refuses, found by a store that checks it itself
    /// ([`mem::MemStore`]; the SQL stores report [`StoreError::Sql`]).
    #[error("{op}: {what}")]
    Refused { op: Op, what: String },
    /// The group commit (`state/commit.rs`) this change was part of
    /// failed, or was built on one that did.
    #[error("the transaction this change was written in failed")]
    GroupCommit(#[source] std::sync::Arc<StoreError>),
    #[error("corrupt row {id} in {table}")]
    Corrupt {
        table: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Gives a database error its context: `.doing(Op::Write("jobs"))?`.
pub(crate) trait Doing<T> {
    fn doing(self, op: Op) -> Result<T, StoreError>;
}

impl<T> Doing<T> for rusqlite::Result<T> {
    fn doing(self, op: Op) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { op, source })
    }
}

impl<T> Doing<T> for Result<T, postgres::Error> {
    fn doing(self, op: Op) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Postgres { op, source })
    }
}

/// Everything a store holds ([`Store::dump`]): what is loaded at start-up,
/// the ledger and the audit trail; what a snapshot file carries.
#[derive(Debug, Default)]
pub struct Dump {
    pub snapshot: Snapshot,
    pub ledger: Vec<LedgerRow>,
    pub audit: Vec<AuditEntry>,
}

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub jobs: Vec<Job>,
    pub pools: Vec<Pool>,
    pub tenants: Vec<Tenant>,
    /// (token SHA-256 hex, tenant)
    pub tokens: Vec<(String, String)>,
    pub orders: Vec<Order>,
    /// The ledger holds every hour before this (see `Record::LedgerClosed`).
    pub ledger_closed_until_ms: Option<i64>,
    /// Job sequence numbers below this were given out (jobs may since have
    /// been forgotten, `Record::ForgetJob`).
    pub next_job_seq: Option<u64>,
    /// Check value of the secret key notebook tokens are derived from.
    pub secret_key_check: Option<String>,
    /// What each pool's work asks for, learned for placement (JSON of
    /// pool id -> [`crate::domain::shapes::ShapeStats`]).
    pub placement_shapes: Option<String>,
}

/// One row to write.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Node(&'a Node),
    Job(&'a Job),
    Pool(&'a Pool),
    Tenant(&'a Tenant),
    Token {
        sha256: &'a str,
        tenant: &'a str,
    },
    /// The token with this hash no longer authenticates.
    RevokeToken {
        sha256: &'a str,
    },
    Order(&'a Order),
    /// Written once per (subject, hour, mode); a repeat is ignored.
    Ledger(&'a LedgerRow),
    /// Hours before this are in the ledger.
    LedgerClosed(i64),
    /// A finished job past its retention: its row goes (ledger rows stay).
    ForgetJob {
        job_id: &'a str,
    },
    /// Job sequence numbers below this were given out.
    NextJobSeq(u64),
    /// Check value of the secret key (not the key).
    SecretKeyCheck(&'a str),
    /// The learned placement shapes of every pool (JSON), replacing what
    /// was there.
    PlacementShapes(&'a str),
    /// One audited call.
    Audit(&'a AuditEntry),
    /// Audit records before this time go (retention).
    PruneAudit {
        before_ms: i64,
    },
}

impl Record<'_> {
    /// What writing this record does, to which table.
    pub fn op(&self) -> Op {
        match self {
            Record::Node(_) => Op::Write("nodes"),
            Record::Job(_) => Op::Write("jobs"),
            Record::Pool(_) => Op::Write("pools"),
            Record::Tenant(_) => Op::Write("tenants"),
            Record::Token { .. } => Op::Write("tokens"),
            Record::RevokeToken { .. } => Op::Delete("tokens"),
            Record::Order(_) => Op::Write("orders"),
            Record::Ledger(_) => Op::Write("ledger"),
            Record::Audit(_) => Op::Write("audit"),
            Record::PruneAudit { .. } => Op::Delete("audit"),
            Record::LedgerClosed(_)
            | Record::NextJobSeq(_)
            | Record::SecretKeyCheck(_)
            | Record::PlacementShapes(_) => Op::Write("meta"),
            Record::ForgetJob { .. } => Op::Delete("jobs"),
        }
    }
}

/// One page of closed ledger rows: `from_ms <= hour_start_ms < to_ms`,
/// matching the filters, after the cursor, in (hour, subject, mode) order.
#[derive(Debug, Clone, Default)]
pub struct LedgerQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant: Option<String>,
    pub pool: Option<String>,
    pub job: Option<String>,
    /// (hour_start_ms, subject, mode) of the last row of the previous page.
    pub after: Option<(i64, String, String)>,
    pub limit: usize,
}

impl LedgerQuery {
    /// True when `row` belongs to this query (cursor and limit aside).
    pub fn matches(&self, row: &LedgerRow) -> bool {
        row.hour_start_ms >= self.from_ms
            && row.hour_start_ms < self.to_ms
            && self.tenant.as_deref().is_none_or(|t| t == row.tenant)
            && self.pool.as_deref().is_none_or(|p| p == row.pool_id)
            && self.job.as_deref().is_none_or(|j| j == row.job_id)
    }

    /// The cursor key of a row.
    pub fn key(row: &LedgerRow) -> (i64, String, String) {
        (
            row.hour_start_ms,
            row.subject.clone(),
            row.mode.as_db_str().to_string(),
        )
    }
}

/// Durable storage for the scheduler's state.
pub trait Store: Send {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Closed ledger rows with `from_ms <= hour_start_ms < to_ms`.
    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError>;
    /// One page of closed ledger rows (see [`LedgerQuery`]).
    fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<LedgerRow>, StoreError> {
        Ok(self
            .ledger(q.from_ms, q.to_ms)?
            .into_iter()
            .filter(|r| q.matches(r))
            .filter(|r| q.after.as_ref().is_none_or(|a| LedgerQuery::key(r) > *a))
            .take(q.limit)
            .collect())
    }
    /// A second handle that reads the ledger without the writer's lock (and
    /// so without the cluster's), where the store can give one.
    fn reader(&self) -> Option<Box<dyn Store>> {
        None
    }
    /// Writes all records in one transaction: all or none.
    fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError>;
    /// One page of the audit trail (see [`AuditQuery`]), oldest first.
    /// (No default: a wrapper that forgot to pass these on would restart
    /// the numbering at 1 and fail every write on a duplicate.)
    fn audit_page(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
    /// The highest audit sequence number written (0: none).
    fn audit_max_seq(&self) -> Result<u64, StoreError>;
    /// Everything the store holds, as of one moment (the stores read it in
    /// one transaction; this default, for test doubles, does not).
    fn dump(&self) -> Result<Dump, StoreError> {
        let all = AuditQuery {
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            limit: usize::MAX,
            ..Default::default()
        };
        Ok(Dump {
            snapshot: self.load()?,
            ledger: self.ledger(i64::MIN, i64::MAX)?,
            audit: self.audit_page(&all)?,
        })
    }

    fn put_node(&self, node: &Node, now_ms: i64) -> Result<(), StoreError> {
        self.write(&[Record::Node(node)], now_ms)
    }
    fn put_job(&self, job: &Job, now_ms: i64) -> Result<(), StoreError> {
        self.write(&[Record::Job(job)], now_ms)
    }
}

/// The embedded store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// A read-only connection to the same file (WAL lets it read while the
    /// writer writes).
    pub fn open_reader(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }
}

/// Sets one value of the `meta` table.
fn put_meta(tx: &rusqlite::Transaction<'_>, key: &str, value: String) -> rusqlite::Result<usize> {
    tx.execute(sql::PUT_META.sqlite(), params![key, value])
}

/// One value of the `meta` table, parsed.
fn get_meta<T: std::str::FromStr>(conn: &Connection, key: &str) -> Result<Option<T>, StoreError> {
    Ok(conn
        .query_row(sql::GET_META.sqlite(), [key], |r| r.get::<_, String>(0))
        .optional()
        .doing(Op::Read("meta"))?
        .and_then(|v| v.parse().ok()))
}

/// Decodes `(id, json)` rows of `table` from a cursor.
fn decode<T: serde::de::DeserializeOwned>(
    cursor: &mut rusqlite::Rows<'_>,
    table: &'static str,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    let read = Op::Read(table);
    while let Some(row) = cursor.next().doing(read)? {
        let id: String = row.get(0).doing(read)?;
        let data: String = row.get(1).doing(read)?;
        out.push(decode_data(table, &id, &data)?);
    }
    Ok(out)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(sql::CREATE_MIGRATIONS_TABLE.sqlite())
        .doing(Op::Write("schema_migrations"))?;
    let current: i64 = conn
        .query_row(sql::SCHEMA_VERSION.sqlite(), [], |r| r.get(0))
        .doing(Op::Read("schema_migrations"))?;
    for &(version, sql) in pending_migrations(current)? {
        let apply = || -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                sql::RECORD_MIGRATION.sqlite(),
                params![version, crate::now_ms()],
            )?;
            tx.commit()
        };
        apply().doing(Op::Migrate(version))?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

/// The migrations a database at schema version `current` still needs;
/// an error when it is newer than this binary.
pub(crate) fn pending_migrations(
    current: i64,
) -> Result<&'static [(i64, &'static str)], StoreError> {
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    Ok(&MIGRATIONS[MIGRATIONS.partition_point(|m| m.0 <= current)..])
}

/// Decodes `(id, json)` rows of `table` into domain objects.
fn rows<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    table: &'static str,
    statement: &sql::Statement,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(statement.sqlite()).doing(Op::Read(table))?;
    let mut cursor = stmt.query([]).doing(Op::Read(table))?;
    decode(&mut cursor, table)
}

/// Everything but the ledger and the audit trail, read on `conn`.
fn load_conn(conn: &Connection) -> Result<Snapshot, StoreError> {
    let read = Op::Read("tokens");
    let mut stmt = conn.prepare(sql::LOAD_TOKENS.sqlite()).doing(read)?;
    let tokens = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .doing(read)?
        .collect::<Result<_, _>>()
        .doing(read)?;
    Ok(Snapshot {
        nodes: rows(&conn, "nodes", &sql::LOAD_NODES)?,
        jobs: rows(&conn, "jobs", &sql::LOAD_JOBS)?,
        pools: rows(&conn, "pools", &sql::LOAD_POOLS)?,
        tenants: rows(&conn, "tenants", &sql::LOAD_TENANTS)?,
        tokens,
        orders: rows(&conn, "orders", &sql::LOAD_ORDERS)?,
        ledger_closed_until_ms: get_meta(&conn, "ledger_closed_until_ms")?,
        next_job_seq: get_meta(&conn, "next_job_seq")?,
        secret_key_check: get_meta(&conn, "secret_key_check")?,
        placement_shapes: get_meta(&conn, "placement_shapes")?,
    })
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        load_conn(&self.conn.lock().unwrap())
    }

    fn dump(&self) -> Result<Dump, StoreError> {
        // One read transaction: a consistent view while the scheduler
        // writes (WAL).
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().doing(Op::Begin)?;
        let snapshot = load_conn(&tx)?;
        let read = Op::Read("ledger");
        let mut stmt = tx.prepare(sql::LEDGER_RANGE.sqlite()).doing(read)?;
        let mut cursor = stmt.query(params![i64::MIN, i64::MAX]).doing(read)?;
        let ledger = decode(&mut cursor, "ledger")?;
        drop(cursor);
        drop(stmt);
        let read = Op::Read("audit");
        let mut stmt = tx.prepare(sql::AUDIT_PAGE.sqlite()).doing(read)?;
        let none: Option<String> = None;
        let mut cursor = stmt
            .query(params![
                0i64,
                i64::MIN,
                i64::MAX,
                none,
                none,
                none,
                none,
                i64::MAX
            ])
            .doing(read)?;
        let audit = decode(&mut cursor, "audit")?;
        drop(cursor);
        drop(stmt);
        tx.commit().doing(Op::Commit)?;
        Ok(Dump {
            snapshot,
            ledger,
            audit,
        })
    }

    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        let conn = self.conn.lock().unwrap();
        let read = Op::Read("ledger");
        let mut stmt = conn.prepare(sql::LEDGER_RANGE.sqlite()).doing(read)?;
        let mut cursor = stmt.query(params![from_ms, to_ms]).doing(read)?;
        decode(&mut cursor, "ledger")
    }

    fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<LedgerRow>, StoreError> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn
            .prepare_cached(sql::LEDGER_PAGE.sqlite())
            .doing(Op::Read("ledger"))?;
        let (ah, asub, amode) = match &q.after {
            Some((h, s, m)) => (Some(*h), Some(s.as_str()), Some(m.as_str())),
            None => (None, None, None),
        };
        let mut cursor = stmt
            .query(params![
                q.from_ms,
                q.to_ms,
                q.tenant,
                q.pool,
                q.job,
                ah,
                asub,
                amode,
                q.limit.min(i64::MAX as usize) as i64
            ])
            .doing(Op::Read("ledger"))?;
        decode(&mut cursor, "ledger")
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        match Self::open_reader(&self.path) {
            Ok(r) => Some(Box::new(r)),
            Err(err) => {
                tracing::warn!(error = %crate::ErrorChain(&err), "no separate ledger reader; usage queries read under the cluster lock");
                None
            }
        }
    }

    fn audit_page(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn.lock().unwrap();
        let read = Op::Read("audit");
        let mut stmt = conn.prepare_cached(sql::AUDIT_PAGE.sqlite()).doing(read)?;
        let mut cursor = stmt
            .query(params![
                q.after_seq.min(i64::MAX as u64) as i64,
                q.from_ms,
                q.to_ms,
                q.tenant,
                q.pool,
                q.job,
                q.node,
                q.limit.min(i64::MAX as usize) as i64
            ])
            .doing(read)?;
        decode(&mut cursor, "audit")
    }

    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        let conn = self.conn.lock().unwrap();
        let max: i64 = conn
            .query_row(sql::AUDIT_MAX_SEQ.sqlite(), [], |r| r.get(0))
            .doing(Op::Read("audit"))?;
        Ok(max.max(0) as u64)
    }

    fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction().doing(Op::Begin)?;
        for record in records {
            write_one(&tx, record, now_ms).doing(record.op())?;
        }
        tx.commit().doing(Op::Commit)
    }
}

/// Writes one record inside the transaction.
fn write_one(
    tx: &rusqlite::Transaction<'_>,
    record: &Record<'_>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    match *record {
        Record::Node(node) => {
            tx.execute(
                sql::PUT_NODE.sqlite(),
                params![node.node_id, encode(node), now_ms],
            )?;
        }
        Record::Job(job) => {
            tx.execute(
                sql::PUT_JOB.sqlite(),
                params![
                    job.job_id,
                    job.seq as i64,
                    job.state.as_db_str(),
                    encode(job),
                    now_ms
                ],
            )?;
        }
        Record::Pool(pool) => {
            tx.execute(
                sql::PUT_POOL.sqlite(),
                params![
                    pool.pool_id,
                    pool.seq as i64,
                    pool.tenant,
                    pool.status.as_db_str(),
                    encode(pool),
                    now_ms
                ],
            )?;
        }
        Record::Tenant(tenant) => {
            tx.execute(
                sql::PUT_TENANT.sqlite(),
                params![tenant.name, encode(tenant), now_ms],
            )?;
        }
        Record::Order(order) => {
            tx.execute(
                sql::ADD_ORDER.sqlite(),
                params![
                    order.order_id,
                    order.seq as i64,
                    order.tenant,
                    order.pool_id,
                    encode(order),
                    order.created_at_ms
                ],
            )?;
        }
        Record::Ledger(row) => {
            tx.execute(
                sql::ADD_LEDGER.sqlite(),
                params![
                    row.subject,
                    row.hour_start_ms,
                    row.mode.as_db_str(),
                    row.tenant,
                    row.pool_id,
                    row.job_id,
                    encode(row)
                ],
            )?;
        }
        Record::LedgerClosed(until) => {
            put_meta(tx, "ledger_closed_until_ms", until.to_string())?;
        }
        Record::Token { sha256, tenant } => {
            tx.execute(sql::ADD_TOKEN.sqlite(), params![sha256, tenant, now_ms])?;
        }
        Record::ForgetJob { job_id } => {
            tx.execute(sql::FORGET_JOB.sqlite(), params![job_id])?;
        }
        Record::NextJobSeq(seq) => {
            put_meta(tx, "next_job_seq", seq.to_string())?;
        }
        Record::SecretKeyCheck(check) => {
            put_meta(tx, "secret_key_check", check.to_string())?;
        }
        Record::PlacementShapes(json) => {
            put_meta(tx, "placement_shapes", json.to_string())?;
        }
        Record::RevokeToken { sha256 } => {
            tx.execute(sql::REVOKE_TOKEN.sqlite(), params![sha256])?;
        }
        Record::Audit(entry) => {
            let t = |kind: &str| entry.targets.get(kind).cloned().unwrap_or_default();
            tx.execute(
                sql::ADD_AUDIT.sqlite(),
                params![
                    entry.seq.min(i64::MAX as u64) as i64,
                    entry.at_ms,
                    entry.tenant,
                    t("pool"),
                    t("job"),
                    t("node"),
                    encode(entry)
                ],
            )?;
        }
        Record::PruneAudit { before_ms } => {
            tx.execute(sql::PRUNE_AUDIT.sqlite(), params![before_ms])?;
        }
    }
    Ok(())
}

/// The real SQLite store, whose writes fail while `fail` is set: for tests
/// of what a failed write leaves behind.
#[cfg(test)]
pub(crate) struct FailingStore {
    pub inner: std::sync::Arc<SqliteStore>,
    pub fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(test)]
impl Store for FailingStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        self.inner.ledger(from_ms, to_ms)
    }
    fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<LedgerRow>, StoreError> {
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
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unreachable("test: writes fail".into()));
        }
        self.inner.write(records, now_ms)
    }
}

/// A `data` blob: the version first, then the domain struct's fields.
#[derive(serde::Serialize)]
struct Versioned<'a, T> {
    v: u64,
    #[serde(flatten)]
    data: &'a T,
}

/// The `data` blob of a domain struct, with [`DATA_VERSION`].
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(&Versioned {
        v: DATA_VERSION,
        data: value,
    })
    .expect("domain types serialize")
}

/// A domain struct from row `id`'s `data` blob in `table`: versions up to
/// [`DATA_VERSION`] (0: written before versions, the same format) read;
/// a newer one is refused.
pub(crate) fn decode_data<T: serde::de::DeserializeOwned>(
    table: &'static str,
    id: &str,
    data: &str,
) -> Result<T, StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        table,
        id: id.to_string(),
        source,
    };
    let mut value: serde_json::Value = serde_json::from_str(data).map_err(corrupt)?;
    let version = match value.as_object_mut().and_then(|o| o.remove("v")) {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            corrupt(serde::de::Error::custom(format!(
                "the data version {v} is not a number"
            )))
        })?,
    };
    if version > DATA_VERSION {
        return Err(StoreError::UnknownDataVersion {
            table,
            id: id.to_string(),
            found: version,
            known: DATA_VERSION,
        });
    }
    serde_json::from_value(value).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rolling upgrade (README, *Upgrades*) keeps the previous release's
    /// leader working on a schema the new release migrated: migrations only
    /// add tables, columns the previous release may leave out of its
    /// inserts (nullable or with a default) and plain indexes; they never
    /// drop, rename or change what is there, nor add a constraint the
    /// previous release's writes could break.
    #[test]
    fn migrations_only_add() {
        for (version, sql) in MIGRATIONS {
            let upper = sql.to_uppercase();
            for word in ["DROP ", "RENAME ", "ALTER COLUMN", "DELETE FROM", "UPDATE "] {
                assert!(
                    !upper.contains(word),
                    "migration {version} contains {word:?}: it would break the previous release"
                );
            }
            for statement in upper.split(';') {
                let statement = statement.split_whitespace().collect::<Vec<_>>().join(" ");
                assert!(
                    !(statement.contains("ADD COLUMN")
                        && statement.contains("NOT NULL")
                        && !statement.contains("DEFAULT")),
                    "migration {version}: a NOT NULL column without a default breaks the previous release's inserts: {statement}"
                );
                assert!(
                    !statement.starts_with("CREATE UNIQUE INDEX") || *version <= 6,
                    "migration {version}: a unique index on existing rows may break the previous release's writes: {statement}"
                );
            }
        }
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    fn ledger_row(subject: &str, hour: i64) -> LedgerRow {
        LedgerRow {
            subject: subject.into(),
            tenant: "t1".into(),
            pool_id: "p1".into(),
            job_id: String::new(),
            instance_id: String::new(),
            spec: "gpu.h100".into(),
            hour_start_ms: hour,
            mode: crate::domain::pool::BillingMode::OnDemand,
            unit_ms: 3_600_000,
            quantity: 1,
            unit_price_micros: 5,
            amount_micros: 5,
            gpu_allocated_ms: 7,
            gpu_used_ms: 3,
            preemptible: false,
        }
    }

    /// Puts a ledger row with this `data` blob straight into the table.
    fn raw_ledger_row(path: &Path, subject: &str, data: &str) {
        Connection::open(path)
            .unwrap()
            .execute(
                "INSERT INTO ledger (subject, hour_start_ms, mode, tenant, pool_id, job_id, data)
                 VALUES (?1, 0, 'OnDemand', 't1', 'p1', '', ?2)",
                params![subject, data],
            )
            .unwrap();
    }

    #[test]
    fn blobs_carry_their_version_first() {
        let row = ledger_row("pool:p1", 0);
        let blob = encode(&row);
        assert!(blob.starts_with(r#"{"v":1,"subject":"pool:p1","#), "{blob}");
        let back: LedgerRow = decode_data("ledger", "pool:p1", &blob).unwrap();
        assert_eq!(back, row);
    }

    /// Rows written before blobs had versions read as they always did.
    #[test]
    fn a_blob_without_a_version_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        let row = ledger_row("pool:p1", 0);
        raw_ledger_row(&path, "pool:p1", &serde_json::to_string(&row).unwrap());
        assert_eq!(store.ledger(0, 1).unwrap(), vec![row]);
    }

    #[test]
    fn a_blob_of_a_future_version_is_refused_naming_table_row_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        let mut blob: serde_json::Value =
            serde_json::from_str(&encode(&ledger_row("pool:p1", 0))).unwrap();
        blob["v"] = 2.into();
        raw_ledger_row(&path, "pool:p1", &blob.to_string());
        let err = store.ledger(0, 1).unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::UnknownDataVersion { table: "ledger", id, found: 2, known: 1 } if id == "pool:p1"
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "row pool:p1 in ledger is of data version 2, newer than this binary knows (1)"
        );
        let err = decode_data::<LedgerRow>("jobs", "j1", r#"{"v":"one"}"#).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { table: "jobs", .. }),
            "{err:?}"
        );
    }

    /// A failed statement names its operation and table; the database's
    /// own error is the source, not part of the message.
    #[test]
    fn a_store_error_names_the_table_and_the_operation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch("DROP TABLE meta; DROP TABLE tokens;")
            .unwrap();

        let err = store.write(&[Record::NextJobSeq(7)], 1).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Sql {
                    op: Op::Write("meta"),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "writing meta");
        let chain = crate::ErrorChain(&err).to_string();
        assert!(
            chain.starts_with("writing meta: ") && chain.contains("no such table: meta"),
            "{chain}"
        );

        let err = store.load().unwrap_err();
        assert_eq!(err.to_string(), "reading tokens");
        assert!(std::error::Error::source(&err).is_some());

        let err = store
            .write(&[Record::RevokeToken { sha256: "x" }], 1)
            .unwrap_err();
        assert_eq!(err.to_string(), "deleting from tokens");
    }
}
