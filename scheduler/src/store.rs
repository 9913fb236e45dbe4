//! Durable state behind the [`Store`] trait. The default is one SQLite file
//! (rusqlite, WAL, `synchronous=FULL`): every accepted mutation is committed
//! before the API call returns. Migrations live in `scheduler/migrations/`
//! and are applied in order at open; PostgreSQL comes behind the same trait.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::domain::{Job, Node};

/// Ordered migrations: (version, SQL).
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/0001_init.sql"))];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database migration {version} failed")]
    Migrate {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database is at schema version {found}, newer than this binary knows ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("database error")]
    Sql(#[from] rusqlite::Error),
    #[error("corrupt row {id} in {table}")]
    Corrupt {
        table: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub jobs: Vec<Job>,
}

/// Durable storage for the scheduler's state.
pub trait Store: Send {
    fn load(&self) -> Result<Snapshot, StoreError>;
    fn put_node(&self, node: &Node, now_ms: i64) -> Result<(), StoreError>;
    fn put_job(&self, job: &Job, now_ms: i64) -> Result<(), StoreError>;
}

/// The embedded store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
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
        })
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)",
    )?;
    let current: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?
        .unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let apply = || -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
                params![version, crate::now_ms()],
            )?;
            tx.commit()
        };
        apply().map_err(|source| StoreError::Migrate { version, source })?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    id: String,
    data: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(data).map_err(|source| StoreError::Corrupt { table, id, source })
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let conn = self.conn.lock().unwrap();
        let mut snapshot = Snapshot::default();
        let mut stmt = conn.prepare("SELECT node_id, data FROM nodes ORDER BY node_id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, data) = row?;
            snapshot.nodes.push(decode("nodes", id, &data)?);
        }
        let mut stmt = conn.prepare("SELECT job_id, data FROM jobs ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, data) = row?;
            snapshot.jobs.push(decode("jobs", id, &data)?);
        }
        Ok(snapshot)
    }

    fn put_node(&self, node: &Node, now_ms: i64) -> Result<(), StoreError> {
        let data = serde_json::to_string(node).expect("node serializes");
        self.conn.lock().unwrap().execute(
            "INSERT INTO nodes (node_id, data, updated_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (node_id) DO UPDATE SET data = excluded.data, updated_at_ms = excluded.updated_at_ms",
            params![node.node_id, data, now_ms],
        )?;
        Ok(())
    }

    fn put_job(&self, job: &Job, now_ms: i64) -> Result<(), StoreError> {
        let data = serde_json::to_string(job).expect("job serializes");
        let state = format!("{:?}", job.state);
        self.conn.lock().unwrap().execute(
            "INSERT INTO jobs (job_id, seq, state, data, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, data = excluded.data,
                 updated_at_ms = excluded.updated_at_ms",
            params![job.job_id, job.seq as i64, state, data, now_ms],
        )?;
        Ok(())
    }
}

impl SqliteStore {
    /// The schema version (for diagnostics and tests).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()?
            .flatten()
            .unwrap_or(0))
    }
}
