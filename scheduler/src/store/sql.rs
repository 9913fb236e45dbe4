//! Every SQL statement the two stores share, written once. The text is
//! SQLite's, with numbered `?N` placeholders; [`to_postgres`] turns them
//! into PostgreSQL's `$N` and changes nothing else. Where the dialects
//! genuinely differ, the statement says so itself ([`Statement::dialects`]
//! gives PostgreSQL its own text, still with `?N`), never by rewriting
//! words. PostgreSQL-only statements (the leader lease, the migration
//! lock) stay in [`crate::pgstore`].

/// One statement and the number of parameters every call site passes.
#[derive(Debug)]
pub(crate) struct Statement {
    /// For tests and messages.
    pub name: &'static str,
    sqlite: &'static str,
    /// PostgreSQL's own text, where it differs from SQLite's.
    postgres: Option<&'static str>,
    /// Parameters `?1` to `?params`.
    pub params: usize,
}

impl Statement {
    /// The same text for both databases.
    const fn shared(name: &'static str, sql: &'static str, params: usize) -> Self {
        Self {
            name,
            sqlite: sql,
            postgres: None,
            params,
        }
    }

    /// A text for each database.
    const fn dialects(
        name: &'static str,
        sqlite: &'static str,
        postgres: &'static str,
        params: usize,
    ) -> Self {
        Self {
            name,
            sqlite,
            postgres: Some(postgres),
            params,
        }
    }

    /// The text SQLite runs.
    pub fn sqlite(&self) -> &'static str {
        self.sqlite
    }

    /// The text PostgreSQL runs.
    pub fn postgres(&self) -> String {
        to_postgres(self.postgres.unwrap_or(self.sqlite))
    }
}

/// `?N` placeholders become `$N`; nothing else changes. No statement here
/// holds a `?` inside a string literal.
pub(crate) fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) const CREATE_MIGRATIONS_TABLE: Statement = Statement::shared(
    "create_migrations_table",
    "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
    0,
);
pub(crate) const SCHEMA_VERSION: Statement = Statement::shared(
    "schema_version",
    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
    0,
);
pub(crate) const RECORD_MIGRATION: Statement = Statement::shared(
    "record_migration",
    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
    2,
);

pub(crate) const LOAD_NODES: Statement = Statement::shared(
    "load_nodes",
    "SELECT node_id, data FROM nodes ORDER BY node_id",
    0,
);
pub(crate) const LOAD_JOBS: Statement =
    Statement::shared("load_jobs", "SELECT job_id, data FROM jobs ORDER BY seq", 0);
pub(crate) const LOAD_POOLS: Statement = Statement::shared(
    "load_pools",
    "SELECT pool_id, data FROM pools ORDER BY seq",
    0,
);
pub(crate) const LOAD_TENANTS: Statement = Statement::shared(
    "load_tenants",
    "SELECT name, data FROM tenants ORDER BY name",
    0,
);
pub(crate) const LOAD_ORDERS: Statement = Statement::shared(
    "load_orders",
    "SELECT order_id, data FROM orders ORDER BY seq",
    0,
);
pub(crate) const LOAD_TOKENS: Statement =
    Statement::shared("load_tokens", "SELECT token_sha256, tenant FROM tokens", 0);
pub(crate) const GET_META: Statement =
    Statement::shared("get_meta", "SELECT value FROM meta WHERE key = ?1", 1);

pub(crate) const LEDGER_RANGE: Statement = Statement::shared(
    "ledger_range",
    "SELECT subject, data FROM ledger WHERE hour_start_ms >= ?1 AND hour_start_ms < ?2
     ORDER BY hour_start_ms, subject, mode",
    2,
);
/// PostgreSQL cannot infer the type of a parameter first met in `IS NULL`,
/// so it names them; SQLite has no `::` casts.
pub(crate) const LEDGER_PAGE: Statement = Statement::dialects(
    "ledger_page",
    "SELECT subject, data FROM ledger
     WHERE hour_start_ms >= ?1 AND hour_start_ms < ?2
       AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR pool_id = ?4)
       AND (?5 IS NULL OR job_id = ?5)
       AND (?6 IS NULL OR (hour_start_ms, subject, mode) > (?6, ?7, ?8))
     ORDER BY hour_start_ms, subject, mode LIMIT ?9",
    "SELECT subject, data FROM ledger
     WHERE hour_start_ms >= ?1 AND hour_start_ms < ?2
       AND (?3::TEXT IS NULL OR tenant = ?3) AND (?4::TEXT IS NULL OR pool_id = ?4)
       AND (?5::TEXT IS NULL OR job_id = ?5)
       AND (?6::BIGINT IS NULL OR (hour_start_ms, subject, mode) > (?6, ?7::TEXT, ?8::TEXT))
     ORDER BY hour_start_ms, subject, mode LIMIT ?9",
    9,
);

pub(crate) const ADD_AUDIT: Statement = Statement::shared(
    "add_audit",
    "INSERT INTO audit (seq, at_ms, tenant, pool_id, job_id, node_id, data)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    7,
);
pub(crate) const AUDIT_PAGE: Statement = Statement::dialects(
    "audit_page",
    "SELECT CAST(seq AS TEXT), data FROM audit
     WHERE seq > ?1 AND at_ms >= ?2 AND at_ms < ?3
       AND (?4 IS NULL OR tenant = ?4) AND (?5 IS NULL OR pool_id = ?5)
       AND (?6 IS NULL OR job_id = ?6) AND (?7 IS NULL OR node_id = ?7)
     ORDER BY seq LIMIT ?8",
    "SELECT CAST(seq AS TEXT), data FROM audit
     WHERE seq > ?1 AND at_ms >= ?2 AND at_ms < ?3
       AND (?4::TEXT IS NULL OR tenant = ?4) AND (?5::TEXT IS NULL OR pool_id = ?5)
       AND (?6::TEXT IS NULL OR job_id = ?6) AND (?7::TEXT IS NULL OR node_id = ?7)
     ORDER BY seq LIMIT ?8",
    8,
);
pub(crate) const AUDIT_MAX_SEQ: Statement = Statement::shared(
    "audit_max_seq",
    "SELECT COALESCE(MAX(seq), 0) FROM audit",
    0,
);
pub(crate) const PRUNE_AUDIT: Statement =
    Statement::shared("prune_audit", "DELETE FROM audit WHERE at_ms < ?1", 1);

pub(crate) const PUT_NODE: Statement = Statement::shared(
    "put_node",
    "INSERT INTO nodes (node_id, data, updated_at_ms) VALUES (?1, ?2, ?3)
     ON CONFLICT (node_id) DO UPDATE SET data = excluded.data, updated_at_ms = excluded.updated_at_ms",
    3,
);
pub(crate) const PUT_JOB: Statement = Statement::shared(
    "put_job",
    "INSERT INTO jobs (job_id, seq, state, data, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (job_id) DO UPDATE SET state = excluded.state, data = excluded.data,
         updated_at_ms = excluded.updated_at_ms",
    5,
);
pub(crate) const PUT_POOL: Statement = Statement::shared(
    "put_pool",
    "INSERT INTO pools (pool_id, seq, tenant, status, data, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (pool_id) DO UPDATE SET status = excluded.status, data = excluded.data,
         updated_at_ms = excluded.updated_at_ms",
    6,
);
pub(crate) const PUT_TENANT: Statement = Statement::shared(
    "put_tenant",
    "INSERT INTO tenants (name, data, updated_at_ms) VALUES (?1, ?2, ?3)
     ON CONFLICT (name) DO UPDATE SET data = excluded.data, updated_at_ms = excluded.updated_at_ms",
    3,
);
pub(crate) const ADD_ORDER: Statement = Statement::shared(
    "add_order",
    "INSERT INTO orders (order_id, seq, tenant, pool_id, data, created_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    6,
);
/// A repeat of (subject, hour, mode) is ignored: SQLite says so with
/// `OR IGNORE`, PostgreSQL with `ON CONFLICT DO NOTHING`.
pub(crate) const ADD_LEDGER: Statement = Statement::dialects(
    "add_ledger",
    "INSERT OR IGNORE INTO ledger (subject, hour_start_ms, mode, tenant, pool_id, job_id, data)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    "INSERT INTO ledger (subject, hour_start_ms, mode, tenant, pool_id, job_id, data)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
    7,
);
pub(crate) const PUT_META: Statement = Statement::shared(
    "put_meta",
    "INSERT INTO meta (key, value) VALUES (?1, ?2)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    2,
);
pub(crate) const ADD_TOKEN: Statement = Statement::shared(
    "add_token",
    "INSERT INTO tokens (token_sha256, tenant, created_at_ms) VALUES (?1, ?2, ?3)",
    3,
);
pub(crate) const REVOKE_TOKEN: Statement = Statement::shared(
    "revoke_token",
    "DELETE FROM tokens WHERE token_sha256 = ?1",
    1,
);
pub(crate) const FORGET_JOB: Statement =
    Statement::shared("forget_job", "DELETE FROM jobs WHERE job_id = ?1", 1);

/// Every statement above, for the tests.
#[cfg(test)]
pub(crate) const ALL: &[&Statement] = &[
    &CREATE_MIGRATIONS_TABLE,
    &SCHEMA_VERSION,
    &RECORD_MIGRATION,
    &LOAD_NODES,
    &LOAD_JOBS,
    &LOAD_POOLS,
    &LOAD_TENANTS,
    &LOAD_ORDERS,
    &LOAD_TOKENS,
    &GET_META,
    &LEDGER_RANGE,
    &LEDGER_PAGE,
    &ADD_AUDIT,
    &AUDIT_PAGE,
    &AUDIT_MAX_SEQ,
    &PRUNE_AUDIT,
    &PUT_NODE,
    &PUT_JOB,
    &PUT_POOL,
    &PUT_TENANT,
    &ADD_ORDER,
    &ADD_LEDGER,
    &PUT_META,
    &ADD_TOKEN,
    &REVOKE_TOKEN,
    &FORGET_JOB,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The placeholder numbers of a text, in order of appearance.
    fn placeholders(sql: &str, mark: char) -> Vec<usize> {
        let mut out = Vec::new();
        let mut rest = sql;
        while let Some(at) = rest.find(mark) {
            rest = &rest[at + 1..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                out.push(n);
            }
        }
        out
    }

    #[test]
    fn placeholders_are_numbered_and_translated_one_for_one() {
        assert_eq!(
            to_postgres("a = ?1 AND b = ?12 OR c IS NULL"),
            "a = $1 AND b = $12 OR c IS NULL"
        );
        for s in ALL {
            for (dialect, text) in [
                ("SQLite", s.sqlite().to_string()),
                ("PostgreSQL", s.postgres()),
            ] {
                let mark = if dialect == "SQLite" { '?' } else { '$' };
                let mut used = placeholders(&text, mark);
                used.sort_unstable();
                used.dedup();
                let expected: Vec<usize> = (1..=s.params).collect();
                assert_eq!(used, expected, "{} ({dialect}): {text}", s.name);
            }
            let pg = s.postgres();
            assert!(!pg.contains('?'), "{}: a `?` is left in {pg}", s.name);
            assert!(
                !s.sqlite().contains('$'),
                "{}: a `$` in SQLite's text",
                s.name
            );
            assert!(
                !s.sqlite().contains("::"),
                "{}: a cast SQLite lacks",
                s.name
            );
        }
    }

    #[test]
    fn statement_names_are_unique() {
        let mut names: Vec<_> = ALL.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }

    /// Every statement SQLite runs parses against the migrated schema.
    #[test]
    fn sqlite_prepares_every_statement() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let conn = store.conn.lock().unwrap();
        for s in ALL {
            let stmt = conn
                .prepare(s.sqlite())
                .unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(stmt.parameter_count(), s.params, "{}", s.name);
        }
    }
}
