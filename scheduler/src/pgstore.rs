//! The PostgreSQL store: the same tables, migrations, JSON rows and
//! statements ([`crate::store::sql`]) as the SQLite store, for several
//! scheduler replicas sharing one database.
//!
//! One replica leads: it holds a lease row (`leader`, renewed every
//! [`LEASE_RENEW`] against the database clock, valid for [`LEASE_TTL_MS`])
//! and every write transaction first checks, under a row lock, that it
//! still holds it, so a replica that lost the lease can never write.
//!
//! The `postgres` client is synchronous and runs its own runtime, so it
//! lives on a worker thread: callers (inside tokio or not) send it work and
//! wait for the answer. A broken connection (PostgreSQL restarted) is
//! dropped and opened again for the next request; the request that met it
//! fails with [`StoreError::Unreachable`] and nothing of it is applied.

use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, NoTls};

use crate::domain::billing::LedgerRow;
use crate::store::sql::{self, Statement};
use crate::store::{
    Doing, Op, Record, Snapshot, Store, StoreError, decode_data, encode, pending_migrations,
};

/// A lease not renewed for this long may be taken by another replica.
pub const LEASE_TTL_MS: i64 = 5_000;
/// The leader renews its lease this often.
pub const LEASE_RENEW: Duration = Duration::from_millis(1_000);

/// The database clock, in milliseconds since the Unix epoch.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

type Work = Box<dyn FnOnce(Result<&mut Client, StoreError>) + Send>;

/// Who holds the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// This replica holds it.
    pub mine: bool,
    pub holder: String,
    /// The holder's client address (`http://host:port`).
    pub address: String,
}

pub struct PgStore {
    work: Mutex<mpsc::Sender<Work>>,
    /// Where it connects (for a second, read-only use: [`Store::reader`]).
    url: String,
    /// This replica's lease holder id; writes are fenced by it when set.
    holder: Option<String>,
    /// Set when a write found another holder: this replica must stop.
    fenced_out: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PgStore {
    /// Connects to `url` (e.g. `postgres://gpupool@db/gpupool`), migrates,
    /// and fences writes with lease holder `holder` (None: no fencing, for
    /// tools and tests that are not a scheduler replica).
    pub fn open(url: &str, holder: Option<String>) -> Result<Self, StoreError> {
        let url = url.to_string();
        let (tx, rx) = mpsc::channel::<Work>();
        let conn_url = url.clone();
        std::thread::Builder::new()
            .name("pgstore".into())
            .spawn(move || worker(&conn_url, &rx))
            .map_err(|e| StoreError::Unreachable(format!("cannot start the store thread: {e}")))?;
        let store = Self {
            work: Mutex::new(tx),
            url,
            holder,
            fenced_out: Default::default(),
        };
        store.call(|c| {
            migrate(c)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Raised when a write was refused because another replica holds the
    /// lease.
    pub fn fenced_out(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.fenced_out.clone()
    }

    /// Runs `f` on the worker's connection and waits for it.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::channel();
        let work: Work = Box::new(move |client| {
            let _ = tx.send(client.and_then(f));
        });
        self.work
            .lock()
            .unwrap()
            .send(work)
            .map_err(|_| StoreError::Unreachable("the store thread is gone".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Unreachable("the store thread is gone".into()))?
    }

    /// Takes or renews the lease for `holder` (reachable at `address`)
    /// when it is free, expired or already ours.
    pub fn acquire(&self, holder: &str, address: &str) -> Result<Lease, StoreError> {
        let (holder, address) = (holder.to_string(), address.to_string());
        self.call(move |c| {
            let sql = format!(
                "INSERT INTO leader (id, holder, address, expires_at_ms) VALUES (1, $1, $2, {DB_NOW_MS} + $3)
                 ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, address = excluded.address,
                     expires_at_ms = excluded.expires_at_ms
                 WHERE leader.holder = excluded.holder OR leader.expires_at_ms < {DB_NOW_MS}"
            );
            c.execute(&sql, &[&holder, &address, &LEASE_TTL_MS])
                .doing(Op::Write("leader"))?;
            let row = c
                .query_one("SELECT holder, address FROM leader WHERE id = 1", &[])
                .doing(Op::Read("leader"))?;
            let (h, a): (String, String) = (row.get(0), row.get(1));
            Ok(Lease {
                mine: h == holder,
                holder: h,
                address: a,
            })
        })
    }

    /// Gives the lease up at once (clean shutdown), so a standby need not
    /// wait for it to expire.
    pub fn release(&self, holder: &str) -> Result<(), StoreError> {
        let holder = holder.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE leader SET expires_at_ms = 0 WHERE id = 1 AND holder = $1",
                &[&holder],
            )
            .doing(Op::Write("leader"))?;
            Ok(())
        })
    }

    /// The current lease, if any replica ever held one.
    pub fn lease(&self) -> Result<Option<(String, String)>, StoreError> {
        self.call(|c| {
            Ok(
                c.query_opt("SELECT holder, address FROM leader WHERE id = 1", &[])
                    .doing(Op::Read("leader"))?
                    .map(|r| (r.get(0), r.get(1))),
            )
        })
    }
}

fn worker(url: &str, rx: &mpsc::Receiver<Work>) {
    let mut client: Option<Client> = None;
    while let Ok(work) = rx.recv() {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = connect(url);
        }
        match client.as_mut() {
            Some(c) => work(Ok(c)),
            None => work(Err(StoreError::Unreachable(format!(
                "cannot connect to {}",
                redact(url)
            )))),
        }
        if client.as_ref().is_some_and(Client::is_closed) {
            tracing::warn!("PostgreSQL connection lost; reconnecting on the next request");
            client = None;
        }
    }
}

fn connect(url: &str) -> Option<Client> {
    let mut config: postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(error = %err, url = %redact(url), "invalid database_url");
            return None;
        }
    };
    config.connect_timeout(Duration::from_secs(3));
    match config.connect(NoTls) {
        Ok(c) => {
            tracing::info!(url = %redact(url), "connected to PostgreSQL");
            Some(c)
        }
        Err(err) => {
            tracing::warn!(error = %crate::ErrorChain(&err), url = %redact(url), "cannot connect to PostgreSQL");
            None
        }
    }
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn migrate(c: &mut Client) -> Result<(), StoreError> {
    // One replica migrates at a time.
    let mut tx = c.transaction().doing(Op::Begin)?;
    tx.execute("SELECT pg_advisory_xact_lock(7107)", &[])
        .doing(Op::Write("schema_migrations"))?;
    tx.batch_execute(&sql::CREATE_MIGRATIONS_TABLE.postgres())
        .doing(Op::Write("schema_migrations"))?;
    let current: i64 = tx
        .query_one(&sql::SCHEMA_VERSION.postgres(), &[])
        .doing(Op::Read("schema_migrations"))?
        .get(0);
    for &(version, sql) in pending_migrations(current)? {
        tx.batch_execute(sql).doing(Op::Migrate(version))?;
        tx.execute(
            &sql::RECORD_MIGRATION.postgres(),
            &[&version, &crate::now_ms()],
        )
        .doing(Op::Migrate(version))?;
        tracing::info!(version, "applied database migration (PostgreSQL)");
    }
    tx.commit().doing(Op::Commit)
}

/// Decodes `(id, json)` rows of `table` into domain objects.
fn rows<T: serde::de::DeserializeOwned>(
    c: &mut Client,
    table: &'static str,
    statement: &Statement,
) -> Result<Vec<T>, StoreError> {
    rows_with(c, table, statement, &[])
}

/// [`rows`] of a query with parameters.
fn rows_with<T: serde::de::DeserializeOwned>(
    c: &mut Client,
    table: &'static str,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<T>, StoreError> {
    c.query(&statement.postgres(), params)
        .doing(Op::Read(table))?
        .into_iter()
        .map(|row| {
            let (id, data): (String, String) = (row.get(0), row.get(1));
            decode_data(table, &id, &data)
        })
        .collect()
}

/// One statement with owned parameters.
type Bound = (&'static Statement, Vec<Box<dyn ToSql + Sync + Send>>);

fn statement(record: &Record<'_>, now_ms: i64) -> Bound {
    fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
        Box::new(v)
    }
    let meta = |key: &'static str, value: String| (&sql::PUT_META, vec![p(key), p(value)]);
    match *record {
        Record::Node(node) => (
            &sql::PUT_NODE,
            vec![p(node.node_id.clone()), p(encode(node)), p(now_ms)],
        ),
        Record::Job(job) => (
            &sql::PUT_JOB,
            vec![
                p(job.job_id.clone()),
                p(job.seq as i64),
                p(job.state.as_db_str()),
                p(encode(job)),
                p(now_ms),
            ],
        ),
        Record::Pool(pool) => (
            &sql::PUT_POOL,
            vec![
                p(pool.pool_id.clone()),
                p(pool.seq as i64),
                p(pool.tenant.clone()),
                p(pool.status.as_db_str()),
                p(encode(pool)),
                p(now_ms),
            ],
        ),
        Record::Tenant(tenant) => (
            &sql::PUT_TENANT,
            vec![p(tenant.name.clone()), p(encode(tenant)), p(now_ms)],
        ),
        Record::Order(order) => (
            &sql::ADD_ORDER,
            vec![
                p(order.order_id.clone()),
                p(order.seq as i64),
                p(order.tenant.clone()),
                p(order.pool_id.clone()),
                p(encode(order)),
                p(order.created_at_ms),
            ],
        ),
        Record::Ledger(row) => (
            &sql::ADD_LEDGER,
            vec![
                p(row.subject.clone()),
                p(row.hour_start_ms),
                p(row.mode.as_db_str()),
                p(row.tenant.clone()),
                p(row.pool_id.clone()),
                p(row.job_id.clone()),
                p(encode(row)),
            ],
        ),
        Record::LedgerClosed(until) => meta("ledger_closed_until_ms", until.to_string()),
        Record::Token { sha256, tenant } => (
            &sql::ADD_TOKEN,
            vec![p(sha256.to_string()), p(tenant.to_string()), p(now_ms)],
        ),
        Record::ForgetJob { job_id } => (&sql::FORGET_JOB, vec![p(job_id.to_string())]),
        Record::NextJobSeq(seq) => meta("next_job_seq", seq.to_string()),
        Record::SecretKeyCheck(check) => meta("secret_key_check", check.to_string()),
        Record::PlacementShapes(json) => meta("placement_shapes", json.to_string()),
        Record::RevokeToken { sha256 } => (&sql::REVOKE_TOKEN, vec![p(sha256.to_string())]),
        Record::Audit(entry) => {
            let t = |kind: &str| entry.targets.get(kind).cloned().unwrap_or_default();
            (
                &sql::ADD_AUDIT,
                vec![
                    p(entry.seq.min(i64::MAX as u64) as i64),
                    p(entry.at_ms),
                    p(entry.tenant.clone()),
                    p(t("pool")),
                    p(t("job")),
                    p(t("node")),
                    p(encode(entry)),
                ],
            )
        }
        Record::PruneAudit { before_ms } => (&sql::PRUNE_AUDIT, vec![p(before_ms)]),
    }
}

/// The parameters `record`'s statement takes and those it is given (the
/// same, or PostgreSQL refuses it), for the store contract tests.
#[cfg(test)]
pub(crate) fn parameter_counts(record: &Record<'_>) -> (&'static str, usize, usize) {
    let (statement, params) = statement(record, 0);
    (statement.name, statement.params, params.len())
}

/// One value of the `meta` table, parsed.
fn get_meta<T: std::str::FromStr>(c: &mut Client, key: &str) -> Result<Option<T>, StoreError> {
    Ok(c.query_opt(&sql::GET_META.postgres(), &[&key])
        .doing(Op::Read("meta"))?
        .and_then(|r| r.get::<_, String>(0).parse().ok()))
}

/// Everything but the ledger and the audit trail, read on `c`.
fn load_client(c: &mut Client) -> Result<Snapshot, StoreError> {
    let tokens = c
        .query(&sql::LOAD_TOKENS.postgres(), &[])
        .doing(Op::Read("tokens"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Snapshot {
        nodes: rows(c, "nodes", &sql::LOAD_NODES)?,
        jobs: rows(c, "jobs", &sql::LOAD_JOBS)?,
        pools: rows(c, "pools", &sql::LOAD_POOLS)?,
        tenants: rows(c, "tenants", &sql::LOAD_TENANTS)?,
        tokens,
        orders: rows(c, "orders", &sql::LOAD_ORDERS)?,
        ledger_closed_until_ms: get_meta(c, "ledger_closed_until_ms")?,
        next_job_seq: get_meta(c, "next_job_seq")?,
        secret_key_check: get_meta(c, "secret_key_check")?,
        placement_shapes: get_meta(c, "placement_shapes")?,
    })
}

/// [`Store::dump`] on `c`, inside the caller's transaction.
fn dump_client(c: &mut Client) -> Result<crate::store::Dump, StoreError> {
    let snapshot = load_client(c)?;
    let ledger = rows_with(c, "ledger", &sql::LEDGER_RANGE, &[&i64::MIN, &i64::MAX])?;
    let none: Option<String> = None;
    let audit = rows_with(
        c,
        "audit",
        &sql::AUDIT_PAGE,
        &[
            &0i64,
            &i64::MIN,
            &i64::MAX,
            &none,
            &none,
            &none,
            &none,
            &i64::MAX,
        ],
    )?;
    Ok(crate::store::Dump {
        snapshot,
        ledger,
        audit,
    })
}

impl Store for PgStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.call(load_client)
    }

    fn dump(&self) -> Result<crate::store::Dump, StoreError> {
        // One repeatable-read transaction: a consistent view while the
        // leader writes.
        self.call(|c| {
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .doing(Op::Begin)?;
            let dumped = dump_client(c);
            let end = if dumped.is_ok() { "COMMIT" } else { "ROLLBACK" };
            c.batch_execute(end).doing(Op::Commit)?;
            dumped
        })
    }

    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        self.call(move |c| rows_with(c, "ledger", &sql::LEDGER_RANGE, &[&from_ms, &to_ms]))
    }

    fn ledger_page(&self, q: &crate::store::LedgerQuery) -> Result<Vec<LedgerRow>, StoreError> {
        let q = q.clone();
        self.call(move |c| {
            let (ah, asub, amode) = match &q.after {
                Some((h, s, m)) => (Some(*h), Some(s.clone()), Some(m.clone())),
                None => (None, None, None),
            };
            let limit = q.limit.min(i64::MAX as usize) as i64;
            rows_with(
                c,
                "ledger",
                &sql::LEDGER_PAGE,
                &[
                    &q.from_ms, &q.to_ms, &q.tenant, &q.pool, &q.job, &ah, &asub, &amode, &limit,
                ],
            )
        })
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        // A connection of its own (unfenced: it is only read through).
        match PgStore::open(&self.url, None) {
            Ok(r) => Some(Box::new(r)),
            Err(err) => {
                tracing::warn!(error = %crate::ErrorChain(&err), "no separate ledger reader; usage queries read under the cluster lock");
                None
            }
        }
    }

    fn audit_page(
        &self,
        q: &crate::domain::audit::AuditQuery,
    ) -> Result<Vec<crate::domain::audit::AuditEntry>, StoreError> {
        let q = q.clone();
        self.call(move |c| {
            let after = q.after_seq.min(i64::MAX as u64) as i64;
            let limit = q.limit.min(i64::MAX as usize) as i64;
            rows_with(
                c,
                "audit",
                &sql::AUDIT_PAGE,
                &[
                    &after, &q.from_ms, &q.to_ms, &q.tenant, &q.pool, &q.job, &q.node, &limit,
                ],
            )
        })
    }

    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        self.call(|c| {
            let max: i64 = c
                .query_one(&sql::AUDIT_MAX_SEQ.postgres(), &[])
                .doing(Op::Read("audit"))?
                .get(0);
            Ok(max.max(0) as u64)
        })
    }

    fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError> {
        let statements: Vec<(Op, Bound)> = records
            .iter()
            .map(|r| (r.op(), statement(r, now_ms)))
            .collect();
        let holder = self.holder.clone();
        let fenced_out = self.fenced_out.clone();
        self.call(move |c| {
            let mut tx = c.transaction().doing(Op::Begin)?;
            if let Some(me) = &holder {
                // Fencing: only the lease holder writes.
                let row = tx
                    .query_opt("SELECT holder FROM leader WHERE id = 1 FOR UPDATE", &[])
                    .doing(Op::Read("leader"))?;
                let current: Option<String> = row.map(|r| r.get(0));
                if current.as_deref() != Some(me.as_str()) {
                    fenced_out.store(true, std::sync::atomic::Ordering::SeqCst);
                    return Err(StoreError::NotLeader(
                        current.unwrap_or_else(|| "nobody".into()),
                    ));
                }
            }
            for (op, (statement, params)) in &statements {
                debug_assert_eq!(params.len(), statement.params, "{}", statement.name);
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
                tx.execute(&statement.postgres(), &refs).doing(*op)?;
            }
            tx.commit().doing(Op::Commit)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://gp:secret@db:5432/gpupool"),
            "postgres://gp:***@db:5432/gpupool"
        );
        assert_eq!(redact("postgres://db/gpupool"), "postgres://db/gpupool");
    }
}
