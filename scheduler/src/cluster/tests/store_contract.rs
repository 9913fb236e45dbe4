//! The store contract over the records a running cluster writes (nodes,
//! jobs, pools, tenants, tokens, orders, the ledger, meta): every write
//! goes to SQLite and to memory alike, and both then show the same
//! snapshot, ledger and ledger pages. (Hand-made records, refusals
//! included: `store::contract`.)

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::*;
use crate::domain::billing::{HOUR_MS, LedgerRow};
use crate::domain::pool::{BillingMode, CreateRequest, PoolType, SubscriptionTerms};
use crate::domain::tenant::Quota;
use crate::store::{LedgerQuery, Record, Snapshot, Store, StoreError};

/// 2026-11-27T10:00:00Z
const T0: i64 = 1_795_773_600_000;

/// Writes go to both stores and must succeed or fail together; reads come
/// from SQLite.
struct Both {
    sqlite: Arc<SqliteStore>,
    mem: MemStore,
    /// The kinds of record written (their variant names).
    kinds: Arc<Mutex<HashSet<String>>>,
}

impl Store for Both {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.sqlite.load()
    }
    fn ledger(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        self.sqlite.ledger(from_ms, to_ms)
    }
    fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<LedgerRow>, StoreError> {
        self.sqlite.ledger_page(q)
    }
    fn audit_page(
        &self,
        q: &crate::domain::audit::AuditQuery,
    ) -> Result<Vec<crate::domain::audit::AuditEntry>, StoreError> {
        self.sqlite.audit_page(q)
    }
    fn audit_max_seq(&self) -> Result<u64, StoreError> {
        self.sqlite.audit_max_seq()
    }
    fn write(&self, records: &[Record<'_>], now_ms: i64) -> Result<(), StoreError> {
        let mut seen = self.kinds.lock().unwrap();
        for r in records {
            let (name, takes, given) = crate::pgstore::parameter_counts(r);
            assert_eq!(
                takes, given,
                "PostgreSQL's {name} is given {given} parameters"
            );
            let debug = format!("{r:?}");
            seen.insert(debug.split(['(', ' ']).next().unwrap().to_string());
        }
        let a = self.sqlite.write(records, now_ms);
        let b = self.mem.write(records, now_ms);
        assert_eq!(a.is_ok(), b.is_ok(), "SQLite {a:?}, memory {b:?}");
        a
    }
}

/// All a store shows: its snapshot, its ledger, and the ledger a row a page.
fn shown(store: &dyn Store) -> String {
    let mut q = LedgerQuery {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        limit: 1,
        ..Default::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = store.ledger_page(&q).unwrap();
        if page.is_empty() {
            break;
        }
        q.after = page.last().map(LedgerQuery::key);
        pages.push(page);
    }
    let ledger = store.ledger(i64::MIN, i64::MAX).unwrap();
    format!("{:?}\n{ledger:?}\n{pages:?}", store.load().unwrap())
}

fn pool_request(c: &Cluster, name: &str, sub: Option<SubscriptionTerms>) -> CreateRequest {
    CreateRequest {
        pool_type: Some(PoolType::Train),
        name: name.into(),
        spec: c.nodes().next().unwrap().spec_name(),
        node_count: 1,
        billing_mode: Some(if sub.is_some() {
            BillingMode::Subscription
        } else {
            BillingMode::OnDemand
        }),
        subscription: sub,
        ..Default::default()
    }
}

/// Tenants and tokens, a subscription and an on-demand pool, a job run to
/// its end, hours billed, the finished job forgotten.
fn run_a_day(c: &mut Cluster) {
    let mut out = Outbox::new();
    for i in 0..3 {
        let inv = Inventory {
            az: "AZ1".into(),
            ..inventory(2)
        };
        c.register_node(&format!("n{i}"), inv, T0).unwrap();
    }
    let quota = Quota {
        max_dedicated_nodes: 10,
        max_gpus: 100,
        ..Default::default()
    };
    c.create_tenant(&admin(), "t", quota, T0).unwrap();
    c.add_token(&admin(), "t", "sha-1", T0).unwrap();
    c.revoke_tokens(&admin(), "t", "all", T0).unwrap();
    c.add_token(&admin(), "t", "sha-2", T0).unwrap();
    let t = Caller::tenant("t");
    let terms = SubscriptionTerms {
        months: 1,
        auto_renew: false,
        convert_to_on_demand_at_expiry: false,
    };
    let req = pool_request(c, "sub", Some(terms));
    c.create_pool(&t, req, 0, T0).unwrap();
    let req = pool_request(c, "od", None);
    c.create_pool(&t, req, 0, T0).unwrap();
    let job = c.submit(&admin(), raw(1), T0, &mut out).unwrap();
    let id = format!("{}-0", job.job_id);
    let node = c
        .job(&admin(), &job.job_id)
        .unwrap()
        .current()
        .next()
        .unwrap()
        .node_id
        .clone();
    c.heartbeat(
        &node,
        None,
        vec![report(&id, InstanceState::Running, None)],
        T0 + 10,
        &mut out,
    );
    let done = report(&id, InstanceState::Succeeded, Some(0));
    c.heartbeat(&node, None, vec![done], T0 + HOUR_MS, &mut out);
    let day = T0 + 24 * HOUR_MS;
    for n in ["n0", "n1", "n2"] {
        c.heartbeat(n, None, vec![], day, &mut out);
    }
    c.tick(day, &mut out);
    c.close_hours(day);
    assert_eq!(c.forget_finished_jobs(day), 1);
}

#[test]
fn a_cluster_day_written_to_sqlite_and_memory_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    let mem = MemStore::new();
    let kinds = Arc::new(Mutex::new(HashSet::new()));
    let both = Both {
        sqlite: sqlite.clone(),
        mem: mem.clone(),
        kinds: kinds.clone(),
    };
    let settings = Settings {
        limits: JobLimits {
            finished_job_retention_ms: HOUR_MS,
            ..JobLimits::default()
        },
        ..settings()
    };
    let mut c = Cluster::load(Box::new(both), settings, T0).unwrap();
    run_a_day(&mut c);
    drop(c);
    let snap = mem.load().unwrap();
    assert_eq!(snap.nodes.len(), 3);
    assert_eq!(snap.pools.len(), 2);
    assert!(snap.jobs.is_empty(), "the finished job is forgotten");
    assert_eq!(snap.tokens, [("sha-2".to_string(), "t".to_string())]);
    assert!(!snap.orders.is_empty());
    assert!(snap.next_job_seq.is_some() && snap.ledger_closed_until_ms.is_some());
    assert!(mem.ledger(i64::MIN, i64::MAX).unwrap().len() > 24);
    assert_eq!(shown(&*sqlite), shown(&mem));
    // Every kind of record was written (so each statement's parameters
    // were counted).
    // (One lock: a failing assertion that locked again for its message
    // would deadlock instead of failing.)
    let kinds = kinds.lock().unwrap();
    assert_eq!(kinds.len(), 13, "{kinds:?}");
}
