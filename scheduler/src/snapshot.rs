//! Snapshots: a whole cluster's stored state in one file
//! (`gpupool-scheduler snapshot save FILE` / `snapshot restore FILE`).
//!
//! The format is logical, the same for SQLite and PostgreSQL (a snapshot
//! moves between them): JSON lines. The first is a header (format version,
//! schema version, when, from what store); then one line per row (tenants,
//! tokens' hashes, pools, nodes, orders, jobs, ledger rows, audit records,
//! the meta values); the last is a trailer with the number of lines before
//! it and the SHA-256 of their bytes. A save reads the store in one
//! transaction ([`Store::dump`]), so it is consistent while the scheduler
//! writes; the file is written 0600 (it holds the jobs' environments and
//! the tokens' hashes) to a temporary name, synced and renamed. A restore
//! checks the whole file first, refuses a store that holds anything, and
//! writes everything in one transaction.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::audit::AuditEntry;
use crate::domain::billing::{LedgerRow, Order};
use crate::domain::pool::Pool;
use crate::domain::tenant::Tenant;
use crate::domain::{Job, Node};
use crate::store::{Dump, Record, Store, StoreError};

/// The format this build writes and the newest it reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    gpupool_snapshot: u32,
    /// The schema version of the store it was saved from.
    schema_version: i64,
    created_at_ms: i64,
    /// `sqlite` or `postgres`.
    source: String,
}

/// One row.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "snake_case")]
enum Line {
    Tenant(Tenant),
    Token { sha256: String, tenant: String },
    Pool(Pool),
    Node(Node),
    Order(Order),
    Job(Job),
    Ledger(LedgerRow),
    Audit(AuditEntry),
    LedgerClosedUntil(i64),
    NextJobSeq(u64),
    SecretKeyCheck(String),
    PlacementShapes(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Trailer {
    lines: u64,
    sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: not a gpupool snapshot: {why}")]
    Format { path: PathBuf, why: String },
    #[error(
        "{path}: the snapshot is damaged: its lines do not match its checksum (or it was cut short)"
    )]
    Checksum { path: PathBuf },
    #[error(
        "{path}: snapshot format {found} is newer than this binary reads ({FORMAT}); restore it with a newer gpupool-scheduler"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "the target store is not empty ({what}); restore only into an empty data dir or database (SQLite: --force moves the old database aside)"
    )]
    NotEmpty { what: String },
}

/// What a snapshot holds, counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub tenants: usize,
    pub tokens: usize,
    pub pools: usize,
    pub nodes: usize,
    pub orders: usize,
    pub jobs: usize,
    pub ledger: usize,
    pub audit: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tenants, {} tokens, {} pools, {} nodes, {} orders, {} jobs, {} ledger rows, {} audit records",
            self.tenants,
            self.tokens,
            self.pools,
            self.nodes,
            self.orders,
            self.jobs,
            self.ledger,
            self.audit
        )
    }
}

fn lines_of(dump: Dump) -> Vec<Line> {
    let s = dump.snapshot;
    let mut out: Vec<Line> = Vec::new();
    out.extend(s.tenants.into_iter().map(Line::Tenant));
    out.extend(
        s.tokens
            .into_iter()
            .map(|(sha256, tenant)| Line::Token { sha256, tenant }),
    );
    out.extend(s.pools.into_iter().map(Line::Pool));
    out.extend(s.nodes.into_iter().map(Line::Node));
    out.extend(s.orders.into_iter().map(Line::Order));
    out.extend(s.jobs.into_iter().map(Line::Job));
    out.extend(dump.ledger.into_iter().map(Line::Ledger));
    out.extend(dump.audit.into_iter().map(Line::Audit));
    out.extend(s.ledger_closed_until_ms.map(Line::LedgerClosedUntil));
    out.extend(s.next_job_seq.map(Line::NextJobSeq));
    out.extend(s.secret_key_check.map(Line::SecretKeyCheck));
    out.extend(s.placement_shapes.map(Line::PlacementShapes));
    out
}

fn summary(lines: &[Line]) -> Summary {
    let mut s = Summary::default();
    for l in lines {
        match l {
            Line::Tenant(_) => s.tenants += 1,
            Line::Token { .. } => s.tokens += 1,
            Line::Pool(_) => s.pools += 1,
            Line::Node(_) => s.nodes += 1,
            Line::Order(_) => s.orders += 1,
            Line::Job(_) => s.jobs += 1,
            Line::Ledger(_) => s.ledger += 1,
            Line::Audit(_) => s.audit += 1,
            _ => {}
        }
    }
    s
}

/// Saves everything `store` holds to `path` (see the module docs).
pub fn save(
    store: &dyn Store,
    source: &str,
    path: &Path,
    now_ms: i64,
) -> Result<Summary, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let lines = lines_of(store.dump()?);
    let header = Header {
        gpupool_snapshot: FORMAT,
        schema_version: crate::store::MIGRATIONS.last().map_or(0, |m| m.0),
        created_at_ms: now_ms,
        source: source.into(),
    };
    let mut body = String::new();
    let mut push = |value: serde_json::Value| {
        body.push_str(&value.to_string());
        body.push('\n');
    };
    push(serde_json::to_value(&header).expect("a header serializes"));
    for line in &lines {
        push(serde_json::to_value(line).expect("rows serialize"));
    }
    let trailer = Trailer {
        lines: lines.len() as u64 + 1,
        sha256: hex(&Sha256::digest(body.as_bytes())),
    };
    body.push_str(&serde_json::to_string(&trailer).expect("a trailer serializes"));
    body.push('\n');
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::api::auth::write_secret_file(&tmp, &body).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(summary(&lines))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot file, read and checked whole.
pub struct Checked {
    lines: Vec<Line>,
    pub created_at_ms: i64,
    pub source: String,
}

impl Checked {
    pub fn summary(&self) -> Summary {
        summary(&self.lines)
    }
}

/// Reads `path` and checks its header, checksum and every line.
pub fn check(path: &Path) -> Result<Checked, SnapshotError> {
    let format = |why: String| SnapshotError::Format {
        path: path.to_path_buf(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut raw: Vec<String> = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        raw.push(line.map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?);
    }
    let header: Header = raw
        .first()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format("no header line".into()))?;
    if header.gpupool_snapshot > FORMAT {
        return Err(SnapshotError::TooNew {
            path: path.to_path_buf(),
            found: header.gpupool_snapshot,
        });
    }
    let trailer: Trailer = raw
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| SnapshotError::Checksum {
            path: path.to_path_buf(),
        })?;
    let body = &raw[..raw.len() - 1];
    let mut hasher = Sha256::new();
    for l in body {
        hasher.update(l.as_bytes());
        hasher.update(b"\n");
    }
    if trailer.lines != body.len() as u64 || trailer.sha256 != hex(&hasher.finalize()) {
        return Err(SnapshotError::Checksum {
            path: path.to_path_buf(),
        });
    }
    let lines = body[1..]
        .iter()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format(format!("line {}: {e}", i + 2))))
        .collect::<Result<Vec<Line>, _>>()?;
    Ok(Checked {
        lines,
        created_at_ms: header.created_at_ms,
        source: header.source,
    })
}

/// Writes a checked snapshot into `store`, which must hold nothing, in one
/// transaction.
pub fn restore(
    store: &dyn Store,
    snapshot: &Checked,
    now_ms: i64,
) -> Result<Summary, SnapshotError> {
    let held = store.dump()?;
    let s = &held.snapshot;
    let counts = [
        ("tenants", s.tenants.len()),
        ("tokens", s.tokens.len()),
        ("pools", s.pools.len()),
        ("nodes", s.nodes.len()),
        ("orders", s.orders.len()),
        ("jobs", s.jobs.len()),
        ("ledger rows", held.ledger.len()),
        ("audit records", held.audit.len()),
    ];
    let what: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    if !what.is_empty() {
        return Err(SnapshotError::NotEmpty {
            what: what.join(", "),
        });
    }
    let records: Vec<Record<'_>> = snapshot
        .lines
        .iter()
        .map(|l| match l {
            Line::Tenant(t) => Record::Tenant(t),
            Line::Token { sha256, tenant } => Record::Token { sha256, tenant },
            Line::Pool(p) => Record::Pool(p),
            Line::Node(n) => Record::Node(n),
            Line::Order(o) => Record::Order(o),
            Line::Job(j) => Record::Job(j),
            Line::Ledger(r) => Record::Ledger(r),
            Line::Audit(e) => Record::Audit(e),
            Line::LedgerClosedUntil(t) => Record::LedgerClosed(*t),
            Line::NextJobSeq(s) => Record::NextJobSeq(*s),
            Line::SecretKeyCheck(c) => Record::SecretKeyCheck(c),
            Line::PlacementShapes(j) => Record::PlacementShapes(j),
        })
        .collect();
    store.write(&records, now_ms)?;
    Ok(snapshot.summary())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use crate::store::mem::MemStore;

    fn tenant(name: &str) -> Tenant {
        Tenant {
            name: name.into(),
            quota: Default::default(),
            created_at_ms: 1,
            network_id: format!("net-{name}"),
            recent: Default::default(),
        }
    }

    #[test]
    fn a_snapshot_moves_a_store_whole_and_refuses_damage_and_a_full_target() {
        let dir = tempfile::tempdir().unwrap();
        let from = SqliteStore::open(&dir.path().join("a.db")).unwrap();
        let t = tenant("acme");
        let entry = AuditEntry {
            seq: 3,
            at_ms: 10,
            role: "admin".into(),
            who: "admin".into(),
            tenant: "acme".into(),
            peer: "127.0.0.1:1".into(),
            method: "TenantService/CreateTenant".into(),
            targets: Default::default(),
            args: Default::default(),
            code: "OK".into(),
            message: String::new(),
        };
        from.write(
            &[
                Record::Tenant(&t),
                Record::Token {
                    sha256: "ab",
                    tenant: "acme",
                },
                Record::Audit(&entry),
                Record::NextJobSeq(7),
                Record::SecretKeyCheck("check"),
            ],
            1,
        )
        .unwrap();
        let file = dir.path().join("snap.jsonl");
        let saved = save(&from, "sqlite", &file, 5).unwrap();
        assert_eq!((saved.tenants, saved.tokens, saved.audit), (1, 1, 1));
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Into another store, of the other kind.
        let to = MemStore::new();
        let checked = check(&file).unwrap();
        assert_eq!(checked.source, "sqlite");
        restore(&to, &checked, 6).unwrap();
        let (a, b) = (from.dump().unwrap(), to.dump().unwrap());
        assert_eq!(format!("{:?}", a.snapshot), format!("{:?}", b.snapshot));
        assert_eq!(a.audit, b.audit);
        // Not into a store that holds something.
        let err = restore(&to, &checked, 7).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        // A changed byte, a cut, a newer format: refused, naming why.
        let text = std::fs::read_to_string(&file).unwrap();
        let damaged = dir.path().join("damaged.jsonl");
        std::fs::write(&damaged, text.replacen("acme", "acmf", 1)).unwrap();
        assert!(matches!(
            check(&damaged),
            Err(SnapshotError::Checksum { .. })
        ));
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&damaged, lines[..lines.len() - 2].join("\n")).unwrap();
        assert!(matches!(
            check(&damaged),
            Err(SnapshotError::Checksum { .. })
        ));
        std::fs::write(
            &damaged,
            text.replacen("\"gpupool_snapshot\":1", "\"gpupool_snapshot\":9", 1),
        )
        .unwrap();
        assert!(matches!(check(&damaged), Err(SnapshotError::TooNew { .. })));
        std::fs::write(&damaged, "not json\n").unwrap();
        assert!(matches!(check(&damaged), Err(SnapshotError::Format { .. })));
    }
}
