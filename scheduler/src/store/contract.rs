//! One contract, two stores: the same records written to [`SqliteStore`]
//! and [`MemStore`] give the same snapshot, ledger and ledger pages, and
//! the same writes are refused, all or none. (Jobs, pools and nodes as a
//! running cluster writes them: `cluster::tests::store_contract`.)

use super::mem::MemStore;
use super::*;
use crate::domain::billing::OrderKind;
use crate::domain::pool::BillingMode;
use crate::domain::tenant::Quota;

const HOUR: i64 = 3_600_000;

fn tenant(name: &str, max_gpus: u32) -> Tenant {
    Tenant {
        name: name.into(),
        quota: Quota {
            max_dedicated_nodes: 1,
            max_gpus,
            ..Default::default()
        },
        created_at_ms: 1,
        network_id: format!("net-{name}"),
        recent: Default::default(),
    }
}

fn row(subject: &str, tenant: &str, hour: i64, mode: BillingMode, amount: i64) -> LedgerRow {
    LedgerRow {
        subject: subject.into(),
        tenant: tenant.into(),
        pool_id: subject.strip_prefix("pool:").unwrap_or("").into(),
        job_id: subject.strip_prefix("instance:").unwrap_or("").into(),
        instance_id: String::new(),
        spec: "gpu.h100".into(),
        hour_start_ms: hour * HOUR,
        mode,
        unit_ms: HOUR,
        quantity: 1,
        unit_price_micros: amount,
        amount_micros: amount,
        gpu_allocated_ms: 0,
        gpu_used_ms: 0,
        preemptible: false,
    }
}

fn order(id: &str, seq: u64) -> Order {
    Order {
        order_id: id.into(),
        seq,
        kind: OrderKind::New,
        pool_id: "p1".into(),
        tenant: "t1".into(),
        nodes: 1,
        months: 1,
        billed_months: 1,
        amount_micros: 10,
        starts_at_ms: 0,
        ends_at_ms: 1,
        created_at_ms: 1,
    }
}

/// Every page of `q`, walked with the cursor.
fn pages(store: &dyn Store, mut q: LedgerQuery) -> Vec<Vec<LedgerRow>> {
    let mut out = Vec::new();
    loop {
        let page = store.ledger_page(&q).unwrap();
        if page.is_empty() {
            return out;
        }
        q.after = page.last().map(LedgerQuery::key);
        out.push(page);
    }
}

/// All a store shows: its snapshot, its ledger and pages of it.
fn shown(store: &dyn Store) -> String {
    let all = LedgerQuery {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        limit: 2,
        ..Default::default()
    };
    let queries = [
        all.clone(),
        LedgerQuery {
            tenant: Some("t2".into()),
            ..all.clone()
        },
        LedgerQuery {
            pool: Some("p1".into()),
            limit: 1,
            ..all.clone()
        },
        LedgerQuery {
            job: Some("j1".into()),
            ..all.clone()
        },
        LedgerQuery {
            from_ms: HOUR,
            to_ms: 2 * HOUR,
            limit: 100,
            ..all.clone()
        },
    ];
    let pages: Vec<_> = queries.into_iter().map(|q| pages(store, q)).collect();
    format!(
        "{:?}\n{:?}\n{:?}\n{pages:?}",
        store.load().unwrap(),
        store.ledger(i64::MIN, i64::MAX).unwrap(),
        store.ledger(HOUR, 2 * HOUR).unwrap(),
    )
}

/// The operation a store refused.
fn refused_op(err: &StoreError) -> Option<Op> {
    match err {
        StoreError::Sql { op, .. } | StoreError::Refused { op, .. } => Some(*op),
        _ => None,
    }
}

#[test]
fn sqlite_and_memory_stores_keep_and_refuse_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("t.db")).unwrap();
    let mem = MemStore::new();
    let (t1, t2, t3) = (tenant("t1", 8), tenant("t2", 4), tenant("t3", 1));
    let t1_again = tenant("t1", 16);
    let od = BillingMode::OnDemand;
    let sub = BillingMode::Subscription;
    let ledger = [
        row("pool:p1", "t1", 0, sub, 10),
        row("pool:p1", "t1", 0, od, 11),
        row("instance:j1", "t2", 0, od, 12),
        row("pool:p1", "t1", 1, sub, 13),
        row("instance:j1", "t2", 1, od, 14),
        row("pool:p2", "t2", 2, od, 15),
        row("instance:j2", "t1", 1, od, 16),
    ];
    let repeat = row("pool:p1", "t1", 0, sub, 99);
    let (o1, o2, o2_again, o3_same_seq) = (
        order("o1", 1),
        order("o2", 2),
        order("o2", 3),
        order("o3", 1),
    );
    let ledger_records: Vec<Record<'_>> = ledger.iter().map(Record::Ledger).collect();
    let steps: Vec<Vec<Record<'_>>> = vec![
        vec![
            Record::Tenant(&t1),
            Record::Tenant(&t2),
            Record::Token {
                sha256: "a",
                tenant: "t1",
            },
            Record::Token {
                sha256: "b",
                tenant: "t2",
            },
            Record::Token {
                sha256: "c",
                tenant: "t1",
            },
            Record::LedgerClosed(5),
            Record::NextJobSeq(9),
            Record::SecretKeyCheck("check"),
        ],
        ledger_records,
        // A repeated (subject, hour, mode) is ignored: the first stays.
        vec![Record::Ledger(&repeat), Record::LedgerClosed(6)],
        // Refused, and nothing of the write is kept.
        vec![
            Record::Tenant(&t3),
            Record::Token {
                sha256: "d",
                tenant: "nobody",
            },
        ],
        vec![
            Record::NextJobSeq(10),
            Record::Token {
                sha256: "a",
                tenant: "t1",
            },
        ],
        vec![
            Record::RevokeToken { sha256: "b" },
            Record::Tenant(&t1_again),
        ],
        vec![Record::Order(&o2), Record::Order(&o1)],
        vec![Record::Order(&o2_again)],
        vec![Record::Order(&o3_same_seq)],
        vec![
            Record::RevokeToken { sha256: "nothing" },
            Record::NextJobSeq(11),
        ],
    ];
    for (i, records) in steps.iter().enumerate() {
        let a = sqlite.write(records, 100 + i as i64);
        let b = mem.write(records, 100 + i as i64);
        assert_eq!(a.is_ok(), b.is_ok(), "step {i}: SQLite {a:?}, memory {b:?}");
        if let (Err(a), Err(b)) = (&a, &b) {
            assert_eq!(refused_op(a), refused_op(b), "step {i}: {a:?} / {b:?}");
        }
        assert_eq!(shown(&sqlite), shown(&mem), "step {i}");
    }
    // The steps did what they say.
    let snap = mem.load().unwrap();
    assert_eq!(
        snap.tokens,
        [("a".into(), "t1".into()), ("c".into(), "t1".into())]
    );
    assert_eq!(snap.tenants.len(), 2);
    assert_eq!(snap.tenants[0].quota.max_gpus, 16);
    assert_eq!(
        snap.orders.iter().map(|o| o.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(
        (snap.ledger_closed_until_ms, snap.next_job_seq),
        (Some(6), Some(11))
    );
    let first = mem.ledger(0, 1).unwrap();
    assert!(first.iter().all(|r| r.amount_micros != 99), "{first:?}");
    assert_eq!(mem.ledger(i64::MIN, i64::MAX).unwrap().len(), ledger.len());
}

fn audit(seq: u64, at_ms: i64, tenant: &str, pool: &str, job: &str) -> AuditEntry {
    let mut targets = std::collections::BTreeMap::new();
    for (k, v) in [("pool", pool), ("job", job)] {
        if !v.is_empty() {
            targets.insert(k.to_string(), v.to_string());
        }
    }
    AuditEntry {
        seq,
        at_ms,
        role: "tenant".into(),
        who: tenant.into(),
        tenant: tenant.into(),
        peer: "127.0.0.1:4000".into(),
        method: "PoolService/ScalePool".into(),
        targets,
        args: [("add_nodes".to_string(), "2".to_string())].into(),
        code: "OK".into(),
        message: String::new(),
    }
}

#[test]
fn sqlite_and_memory_stores_keep_the_same_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("t.db")).unwrap();
    let mem = MemStore::new();
    let entries: Vec<AuditEntry> = (1..=9)
        .map(|i| {
            let tenant = if i % 3 == 0 { "b" } else { "a" };
            let pool = if i % 2 == 0 { "p-1" } else { "" };
            let job = if i == 5 { "j-5" } else { "" };
            audit(i, i as i64 * 10, tenant, pool, job)
        })
        .collect();
    for store in [&sqlite as &dyn Store, &mem] {
        assert_eq!(store.audit_max_seq().unwrap(), 0);
        let records: Vec<Record<'_>> = entries.iter().map(Record::Audit).collect();
        store.write(&records, 1).unwrap();
        // A sequence number is written once, all or none.
        let again = [Record::Audit(&entries[8]), Record::Audit(&entries[0])];
        assert!(store.write(&again, 1).is_err());
        assert_eq!(store.audit_max_seq().unwrap(), 9);
    }
    let all = AuditQuery {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        limit: 100,
        ..Default::default()
    };
    let queries = [
        all.clone(),
        AuditQuery {
            tenant: Some("a".into()),
            ..all.clone()
        },
        AuditQuery {
            pool: Some("p-1".into()),
            ..all.clone()
        },
        AuditQuery {
            job: Some("j-5".into()),
            ..all.clone()
        },
        AuditQuery {
            from_ms: 30,
            to_ms: 70,
            ..all.clone()
        },
        AuditQuery {
            after_seq: 4,
            limit: 2,
            ..all.clone()
        },
        AuditQuery {
            tenant: Some("b".into()),
            pool: Some("p-1".into()),
            ..all.clone()
        },
    ];
    for q in &queries {
        let s = sqlite.audit_page(q).unwrap();
        assert_eq!(s, mem.audit_page(q).unwrap(), "{q:?}");
        assert!(
            s.iter().all(|e| q.matches(e) && e.seq > q.after_seq),
            "{q:?}"
        );
    }
    assert_eq!(sqlite.audit_page(&all).unwrap(), entries);
    let seqs = |q: &AuditQuery| -> Vec<u64> {
        sqlite
            .audit_page(q)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs(&queries[5]), [5, 6]);
    assert_eq!(seqs(&queries[6]), [6]);
    // Retention: what is older goes, in both.
    for store in [&sqlite as &dyn Store, &mem] {
        store
            .write(&[Record::PruneAudit { before_ms: 50 }], 1)
            .unwrap();
    }
    assert_eq!(
        sqlite.audit_page(&all).unwrap(),
        mem.audit_page(&all).unwrap()
    );
    assert_eq!(seqs(&all), [5, 6, 7, 8, 9]);
}
