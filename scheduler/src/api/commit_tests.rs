//! Apply after commit, for every mutating RPC: with the store failing its
//! writes, the call answers UNAVAILABLE and leaves memory, the store and the
//! agents (no command sent) exactly as before; with the store back, the
//! same call succeeds, so it was the write that failed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gpupool_proto::v1 as pb;
use pb::job_service_server::JobService;
use pb::node_service_server::NodeService;
use pb::pool_service_server::PoolService;
use pb::tenant_service_server::TenantService;
use tokio::sync::mpsc;
use tonic::{Code, Request, Status};

use crate::api::agent::AgentApi;
use crate::api::client::Api;
use crate::config::SchedulerConfig;
use crate::domain::{AgentIdentity, Gpu, Inventory};
use crate::state::Shared;
use crate::store::{FailingStore, SqliteStore, Store};

const ADMIN: &str = "commit-test-admin-token";

struct Rig {
    shared: Arc<Shared>,
    api: Api,
    store: Arc<SqliteStore>,
    fail: Arc<AtomicBool>,
    /// Every store write first sleeps this long (ms).
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// What each node's session was sent.
    sessions: Vec<(String, mpsc::UnboundedReceiver<crate::state::ToAgent>)>,
    _dir: tempfile::TempDir,
}

fn inventory(az: &str) -> Inventory {
    Inventory {
        hostname: "h".into(),
        cpu_cores: 16,
        memory_mib: 64 * 1024,
        az: az.into(),
        gpus: (0..2)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                model: "H100".into(),
                memory_total_mib: 80 * 1024,
                healthy: true,
                health_reason: String::new(),
                mig_enabled: false,
                pci_bus_id: String::new(),
            })
            .collect(),
        ..Default::default()
    }
}

impl Rig {
    fn new(nodes: usize) -> Self {
        Self::with_config(nodes, |_, _| {})
    }

    /// [`Rig::new`] with `edit` applied to the scheduler's config (paths
    /// under the rig's own dir, the argument).
    fn with_config(
        nodes: usize,
        edit: impl FnOnce(&mut SchedulerConfig, &std::path::Path),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut config = SchedulerConfig {
            admin_token: Some(ADMIN.into()),
            subscription_regions: vec!["region-1".into()],
            data_dir: dir.path().join("data"),
            ..SchedulerConfig::default()
        };
        // A metered millisecond costs something: a pool has a consumption
        // record at once (R-BILL-1, for ConvertToSubscription).
        config.billing.default_price.on_demand_node_hour_micros = 3_600_000_000;
        config.billing.default_price.subscription_node_month_micros = 1_000_000;
        edit(&mut config, dir.path());
        let shared = crate::state::load(
            config,
            Box::new(Slow {
                inner: FailingStore {
                    inner: store.clone(),
                    fail: fail.clone(),
                },
                delay_ms: delay_ms.clone(),
            }),
            crate::cluster::SecretKey(vec![7; 32]),
            "test",
        )
        .unwrap();
        let mut sessions = Vec::new();
        for i in 1..=nodes {
            let id = format!("n{i}");
            let (tx, rx) = mpsc::unbounded_channel();
            shared.with(|core, _| {
                core.cluster
                    .register_node(&id, inventory("AZ1"), crate::now_ms())
                    .unwrap();
                core.open_session(&id, tx);
            });
            sessions.push((id, rx));
        }
        Self {
            api: Api {
                shared: shared.clone(),
            },
            shared,
            store,
            fail,
            delay_ms,
            sessions,
            _dir: dir,
        }
    }

    fn memory(&self) -> String {
        self.shared.with(|core, _| core.cluster.fingerprint())
    }

    fn stored(&self) -> String {
        format!("{:?}", self.store.load().unwrap())
    }

    fn drain(&mut self) -> usize {
        let mut n = 0;
        for (_, rx) in &mut self.sessions {
            while rx.try_recv().is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Runs `call` with the store failing, then working; returns what the
    /// working call answered.
    async fn check<T, F, Fut>(&mut self, what: &str, call: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
        T: std::fmt::Debug,
    {
        self.drain();
        let (memory, stored) = (self.memory(), self.stored());
        self.fail.store(true, Ordering::SeqCst);
        let err = call().await.expect_err(what);
        self.fail.store(false, Ordering::SeqCst);
        assert_eq!(err.code(), Code::Unavailable, "{what}: {err:?}");
        assert!(err.message().contains("not applied"), "{what}: {err:?}");
        assert_eq!(self.memory(), memory, "{what}: memory changed");
        assert_eq!(self.stored(), stored, "{what}: store changed");
        assert_eq!(self.drain(), 0, "{what}: agents were sent commands");
        match call().await {
            Ok(v) => v,
            Err(e) => panic!("{what} with a working store: {e:?}"),
        }
    }
}

/// A store whose writes take `delay_ms` first (a slow disk's fsync).
struct Slow {
    inner: FailingStore,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Store for Slow {
    fn load(&self) -> Result<crate::store::Snapshot, crate::store::StoreError> {
        self.inner.load()
    }
    fn ledger(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<crate::domain::billing::LedgerRow>, crate::store::StoreError> {
        self.inner.ledger(from_ms, to_ms)
    }
    fn audit_page(
        &self,
        q: &crate::domain::audit::AuditQuery,
    ) -> Result<Vec<crate::domain::audit::AuditEntry>, crate::store::StoreError> {
        self.inner.audit_page(q)
    }
    fn audit_max_seq(&self) -> Result<u64, crate::store::StoreError> {
        self.inner.audit_max_seq()
    }
    fn write(
        &self,
        records: &[crate::store::Record<'_>],
        now_ms: i64,
    ) -> Result<(), crate::store::StoreError> {
        let ms = self.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        self.inner.write(records, now_ms)
    }
}

fn req<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn job(kind: pb::JobKind, instances: i32) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            kind: kind as i32,
            resources: Some(pb::Resources {
                gpus: 1,
                cpu_milli: 100,
                memory_mib: 64,
                ..Default::default()
            }),
            instances,
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        }),
    }
}

fn pool(name: &str, subscription: bool) -> pb::CreatePoolRequest {
    pb::CreatePoolRequest {
        r#type: pb::PoolType::Train as i32,
        name: name.into(),
        spec: crate::domain::Node {
            node_id: String::new(),
            inventory: inventory("AZ1"),
            status: crate::domain::NodeStatus::Ready,
            registered_at_ms: 0,
            last_heartbeat_ms: 0,
            pool: String::new(),
            cordoned: false,
            credential_sha256: None,
            credential_confirmed: false,
            revoked: false,
            drain: None,
            agent_version: String::new(),
        }
        .spec_name(),
        node_count: 1,
        billing_mode: if subscription {
            pb::BillingMode::Subscription
        } else {
            pb::BillingMode::OnDemand
        } as i32,
        subscription: subscription.then(|| pb::Subscription {
            months: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Every node heartbeats and the clock ticks: pools being created or
/// scaled settle.
fn settle(rig: &Rig) {
    rig.shared.with(|core, out| {
        let ids: Vec<String> = core.cluster.nodes().map(|n| n.node_id.clone()).collect();
        for id in &ids {
            core.cluster
                .heartbeat(id, None, Vec::new(), crate::now_ms(), out);
        }
        core.cluster.tick(crate::now_ms(), out);
    });
}

#[tokio::test]
async fn every_mutating_rpc_applies_only_after_its_commit() {
    let mut rig = Rig::new(5);
    let api = rig.api.clone();
    let token = tenants_and_tokens(&mut rig, &api).await;
    jobs(&mut rig, &api, &token).await;
    nodes(&mut rig, &api).await;
    on_demand_pools(&mut rig, &api, &token).await;
    subscription_pools(&mut rig, &api, &token).await;
}

/// Tenants and tokens; returns a token of the tenant made.
async fn tenants_and_tokens(rig: &mut Rig, api: &Api) -> String {
    rig.check("CreateTenant", || {
        api.create_tenant(req(
            ADMIN,
            pb::CreateTenantRequest {
                name: "acme".into(),
                quota: Some(pb::Quota {
                    max_dedicated_nodes: 4,
                    max_gpus: 8,
                    ..Default::default()
                }),
            },
        ))
    })
    .await;
    rig.check("IssueToken", || {
        api.issue_token(req(
            ADMIN,
            pb::IssueTokenRequest {
                tenant: "acme".into(),
            },
        ))
    })
    .await;
    rig.check("RevokeTokens", || {
        api.revoke_tokens(req(
            ADMIN,
            pb::RevokeTokensRequest {
                tenant: "acme".into(),
                token_id: "all".into(),
            },
        ))
    })
    .await;
    rig.check("SetQuota", || {
        api.set_quota(req(
            ADMIN,
            pb::SetQuotaRequest {
                tenant: "acme".into(),
                quota: Some(pb::Quota {
                    max_dedicated_nodes: 3,
                    max_gpus: 6,
                    ..Default::default()
                }),
            },
        ))
    })
    .await;
    api.issue_token(req(
        ADMIN,
        pb::IssueTokenRequest {
            tenant: "acme".into(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .token
}

/// Jobs: a submission is placed at once (a Start would be sent), then
/// cancelled; a service is scaled and restarted.
async fn jobs(rig: &mut Rig, api: &Api, token: &str) {
    let training = rig
        .check("SubmitJob", || {
            api.submit_job(req(token, job(pb::JobKind::Training, 1)))
        })
        .await
        .into_inner();
    assert!(rig.drain() > 0, "the placed job's Start reached its node");
    rig.check("CancelJob", || {
        api.cancel_job(req(
            token,
            pb::CancelJobRequest {
                job_id: training.job_id.clone(),
            },
        ))
    })
    .await;
    let svc = api
        .submit_job(req(token, job(pb::JobKind::OnlineService, 1)))
        .await
        .unwrap()
        .into_inner();
    rig.check("ScaleService", || {
        api.scale_service(req(
            token,
            pb::ScaleServiceRequest {
                job_id: svc.job_id.clone(),
                replicas: 2,
            },
        ))
    })
    .await;
    rig.check("RestartService", || {
        api.restart_service(req(
            token,
            pb::RestartServiceRequest {
                job_id: svc.job_id.clone(),
            },
        ))
    })
    .await;
    api.cancel_job(req(
        token,
        pb::CancelJobRequest {
            job_id: svc.job_id.clone(),
        },
    ))
    .await
    .unwrap();
}

/// Nodes: cordon, uncordon, revoke, readmit, register.
async fn nodes(rig: &mut Rig, api: &Api) {
    let node = |id: &str| pb::CordonNodeRequest { node_id: id.into() };
    rig.check("CordonNode", || api.cordon_node(req(ADMIN, node("n5"))))
        .await;
    rig.check("UncordonNode", || api.uncordon_node(req(ADMIN, node("n5"))))
        .await;
    rig.check("RevokeNode", || api.revoke_node(req(ADMIN, node("n5"))))
        .await;
    rig.check("ReadmitNode", || api.readmit_node(req(ADMIN, node("n5"))))
        .await;
    let agents = AgentApi {
        shared: rig.shared.clone(),
    };
    let agents = &agents;
    let register = || {
        let mut r = Request::new(pb::RegisterRequest {
            node_id: "n9".into(),
            inventory: Some(super::inventory_to_pb(&inventory("AZ2"))),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        });
        r.extensions_mut().insert(AgentIdentity::Bootstrap);
        pb::agent_service_server::AgentService::register(agents, r)
    };
    rig.check("Register", register).await;
}

/// Dedicated pools on demand: create, scale out and in, convert one to a
/// subscription (R-BILL-1), delete.
async fn on_demand_pools(rig: &mut Rig, api: &Api, token: &str) {
    let od = rig
        .check("CreatePool", || {
            api.create_pool(req(token, pool("od_pool", false)))
        })
        .await
        .into_inner();
    settle(rig);
    rig.check("ScalePool out", || {
        api.scale_pool(req(
            token,
            pb::ScalePoolRequest {
                pool: od.pool_id.clone(),
                change: Some(pb::scale_pool_request::Change::AddNodes(1)),
                force: false,
            },
        ))
    })
    .await;
    let pool_nodes: Vec<String> = rig.shared.with(|core, _| {
        core.cluster
            .nodes()
            .filter(|n| n.pool == od.pool_id)
            .map(|n| n.node_id.clone())
            .collect()
    });
    assert_eq!(pool_nodes.len(), 2, "{pool_nodes:?}");
    settle(rig);
    rig.check("ScalePool in", || {
        api.scale_pool(req(
            token,
            pb::ScalePoolRequest {
                pool: od.pool_id.clone(),
                change: Some(pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds {
                    node_ids: vec![pool_nodes[1].clone()],
                })),
                force: true,
            },
        ))
    })
    .await;
    // A second on-demand pool converts to a subscription (R-BILL-1).
    let conv = api
        .create_pool(req(token, pool("conv_pool", false)))
        .await
        .unwrap()
        .into_inner();
    settle(rig);
    std::thread::sleep(std::time::Duration::from_millis(5));
    rig.check("ConvertToSubscription", || {
        api.convert_to_subscription(req(
            token,
            pb::ConvertToSubscriptionRequest {
                pool: conv.pool_id.clone(),
                months: 1,
                auto_renew: false,
            },
        ))
    })
    .await;
    rig.check("DeletePool", || {
        api.delete_pool(req(
            token,
            pb::DeletePoolRequest {
                pool: od.pool_id.clone(),
                confirm: true,
            },
        ))
    })
    .await;
}

/// A subscription pool: renewal set, then unsubscribed.
async fn subscription_pools(rig: &mut Rig, api: &Api, token: &str) {
    let sub = api
        .create_pool(req(token, pool("sub_pool", true)))
        .await
        .unwrap()
        .into_inner();
    settle(rig);
    rig.check("SetRenewal", || {
        api.set_renewal(req(
            token,
            pb::SetRenewalRequest {
                pool: sub.pool_id.clone(),
                auto_renew: true,
                convert_to_on_demand_at_expiry: false,
            },
        ))
    })
    .await;
    rig.check("Unsubscribe", || {
        api.unsubscribe(req(
            token,
            pb::UnsubscribeRequest {
                pool: sub.pool_id.clone(),
                confirm: true,
            },
        ))
    })
    .await;
}

/// A failed operation that had staged writes is undone too: memory is
/// reloaded, nothing is written, no command goes out.
#[tokio::test]
async fn an_operation_that_fails_after_writing_is_rolled_back() {
    let mut rig = Rig::new(1);
    rig.drain();
    let before = (rig.memory(), rig.stored());
    let err: Result<(), crate::cluster::ClusterError> = rig
        .shared
        .mutate(|core, out| {
            core.cluster.set_cordon("n1", true, crate::now_ms(), out)?;
            // A later step fails (n1 is not revoked).
            core.cluster.readmit_node("n1", crate::now_ms()).map(|_| ())
        })
        .await;
    assert!(err.is_err());
    assert_eq!((rig.memory(), rig.stored()), before);
    assert_eq!(rig.drain(), 0);
}

/// A heartbeat the store refuses is not dropped silently: it is undone
/// (memory and store keep what they had) and the node's session ends, so
/// the agent registers again with its whole inventory, and what the
/// heartbeat told (an inventory change, which heartbeats send only once)
/// arrives that way once the store works.
#[tokio::test]
async fn a_heartbeat_the_store_refuses_ends_the_session_and_is_told_again() {
    use super::agent::{Handled, handle, pump};
    let mut rig = Rig::new(1);
    rig.drain();
    let session = rig.shared.with(|core, _| core.sessions.id("n1").unwrap());
    let mut sick = inventory("AZ1");
    sick.gpus[1].healthy = false;
    sick.gpus[1].health_reason = "XID 79".into();
    let heartbeat = || pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            inventory: Some(super::inventory_to_pb(&sick)),
            ..Default::default()
        })),
    };
    let gpu1_healthy = |rig: &Rig| {
        let memory = rig
            .shared
            .with(|core, _| core.cluster.node("n1").unwrap().inventory.gpus[1].healthy);
        let stored = rig.store.load().unwrap().nodes[0].inventory.gpus[1].healthy;
        (memory, stored)
    };
    assert_eq!(gpu1_healthy(&rig), (true, true));

    // The store refuses: the session ends (the stream stays open, so only
    // the refusal can end it) and nothing of the heartbeat is kept.
    rig.fail.store(true, Ordering::SeqCst);
    let inbound = tokio_stream::StreamExt::chain(
        tokio_stream::iter([Ok(heartbeat())]),
        tokio_stream::pending(),
    );
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        pump(rig.shared.clone(), "n1".into(), session, Box::pin(inbound)),
    )
    .await;
    assert!(
        ended.is_ok(),
        "the session outlived a heartbeat the store refused"
    );
    rig.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        gpu1_healthy(&rig),
        (true, true),
        "memory and store diverged"
    );
    assert!(rig.shared.with(|core, _| !core.sessions.contains_key("n1")));
    let (_, down) = &mut rig.sessions[0];
    while down.try_recv().is_ok() {}
    assert!(
        down.recv().await.is_none(),
        "the stream to the agent is closed"
    );

    // The agent registers again, with the inventory it has now.
    let agents = AgentApi {
        shared: rig.shared.clone(),
    };
    let mut again = Request::new(pb::RegisterRequest {
        node_id: "n1".into(),
        inventory: Some(super::inventory_to_pb(&sick)),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    });
    again.extensions_mut().insert(AgentIdentity::Node {
        node_id: "n1".into(),
        credential_sha256: "in-process:n1".into(),
    });
    pb::agent_service_server::AgentService::register(&agents, again)
        .await
        .unwrap();
    assert_eq!(gpu1_healthy(&rig), (false, false));

    // With the store working, a session's heartbeat is applied and the
    // session goes on.
    let (tx, _down) = mpsc::unbounded_channel();
    let session = rig.shared.with(|core, _| core.open_session("n1", tx));
    assert_eq!(
        handle(&rig.shared, "n1", session, heartbeat()).await,
        Handled::Applied
    );
}

/// A tenant with a token that may use every GPU of the rig.
async fn tenant(api: &Api) -> String {
    api.create_tenant(req(
        ADMIN,
        pb::CreateTenantRequest {
            name: "acme".into(),
            quota: Some(pb::Quota {
                max_dedicated_nodes: 4,
                max_gpus: 64,
                ..Default::default()
            }),
        },
    ))
    .await
    .unwrap();
    api.issue_token(req(
        ADMIN,
        pb::IssueTokenRequest {
            tenant: "acme".into(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .token
}

/// Group commit: submissions that arrive while a transaction is written
/// share the next one (fewer transactions than submissions), and each is
/// in the store, with its Start sent, when its caller hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_share_commits_and_each_is_durable_when_answered() {
    let mut rig = Rig::new(4);
    let token = tenant(&rig.api).await;
    rig.drain();
    rig.delay_ms.store(20, Ordering::SeqCst);
    let before = rig.shared.metrics.store_transactions.get();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (api, store, token) = (rig.api.clone(), rig.store.clone(), token.clone());
        calls.spawn(async move {
            let job = api
                .submit_job(req(&token, job(pb::JobKind::Training, 1)))
                .await
                .unwrap()
                .into_inner();
            // Answered: so it is on disk.
            let stored = store.load().unwrap();
            assert!(
                stored.jobs.iter().any(|j| j.job_id == job.job_id),
                "{} was answered before it was stored",
                job.job_id
            );
            job.job_id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = calls.join_next().await {
        ids.push(id.unwrap());
    }
    let transactions = rig.shared.metrics.store_transactions.get() - before;
    assert!(
        transactions < 24,
        "24 concurrent submissions took {transactions} transactions"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 24);
    // 8 GPUs: 8 were placed, and their Starts went out.
    assert_eq!(rig.drain(), 8);
}

/// A failed group commit fails every change in it and every change queued
/// behind it; memory is the store's again and no command goes out; with
/// the store back, submissions succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_group_commit_fails_every_change_in_and_behind_it() {
    let mut rig = Rig::new(2);
    let token = tenant(&rig.api).await;
    rig.drain();
    let (memory, stored) = (rig.memory(), rig.stored());
    rig.delay_ms.store(20, Ordering::SeqCst);
    rig.fail.store(true, Ordering::SeqCst);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let (api, token) = (rig.api.clone(), token.clone());
        calls.spawn(async move {
            api.submit_job(req(&token, job(pb::JobKind::Training, 1)))
                .await
        });
    }
    while let Some(answer) = calls.join_next().await {
        let err = answer
            .unwrap()
            .expect_err("a submission succeeded with the store failing");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    rig.fail.store(false, Ordering::SeqCst);
    assert_eq!(rig.memory(), memory, "memory kept a failed change");
    assert_eq!(rig.stored(), stored);
    assert_eq!(rig.drain(), 0, "a failed change's command went out");
    let job = rig
        .api
        .submit_job(req(&token, job(pb::JobKind::Training, 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        job.job_id, "j-000001",
        "the failed submissions' ids are free again"
    );
    assert_eq!(rig.drain(), 1);
}

/// Waits until the commit thread is writing a transaction begun after
/// `before` transactions (the store's delay keeps it there).
async fn until_writing(rig: &Rig, before: u64) {
    for _ in 0..1000 {
        if rig.shared.metrics.store_transactions.get() > before {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("the commit thread never started writing");
}

/// An answer that rests on another caller's change still being committed
/// waits for that commit: here a second CreateTenant of the same name is
/// refused "exists" only if the first one's tenant is stored; the first
/// one's write fails, so the second is told UNAVAILABLE (retry), not that
/// a tenant which never existed exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_decided_on_a_change_being_committed_waits_for_its_commit() {
    let rig = Rig::new(1);
    let create = || {
        let api = rig.api.clone();
        async move {
            api.create_tenant(req(
                ADMIN,
                pb::CreateTenantRequest {
                    name: "beta".into(),
                    quota: None,
                },
            ))
            .await
        }
    };
    rig.delay_ms.store(300, Ordering::SeqCst);
    rig.fail.store(true, Ordering::SeqCst);
    let before = rig.shared.metrics.store_transactions.get();
    let first = tokio::spawn(create());
    until_writing(&rig, before).await;
    let second = create().await.expect_err("the tenant was never stored");
    assert_eq!(second.code(), Code::Unavailable, "{second:?}");
    let first = first.await.unwrap().expect_err("its write failed");
    assert_eq!(first.code(), Code::Unavailable, "{first:?}");
    rig.fail.store(false, Ordering::SeqCst);
    rig.delay_ms.store(0, Ordering::SeqCst);
    create().await.expect("the name is free");
}

/// An operation that panics leaves memory to be reloaded, but not before
/// the changes queued ahead of it are written: acknowledged submissions
/// being committed at that moment stay in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_after_a_panic_waits_for_the_queued_commits() {
    let rig = Rig::new(1);
    let token = tenant(&rig.api).await;
    rig.delay_ms.store(300, Ordering::SeqCst);
    let before = rig.shared.metrics.store_transactions.get();
    let submit = |token: String| {
        let api = rig.api.clone();
        tokio::spawn(async move {
            api.submit_job(req(&token, job(pb::JobKind::Training, 1)))
                .await
                .map(|r| r.into_inner().job_id)
        })
    };
    // One being written (the store's mutex would hold a reload back until
    // it is), one queued behind it (nothing but the pipeline would).
    let writing = submit(token.clone());
    until_writing(&rig, before).await;
    let queued = submit(token);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let shared = rig.shared.clone();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shared.with(|core, _| {
            core.cluster
                .set_cordon("n1", true, crate::now_ms(), &mut Vec::new())
                .unwrap();
            panic!("an operation fails midway");
        })
    }));
    assert!(panicked.is_err());
    // This reloads memory (the panicked operation's cordon is undone).
    let cordoned = rig
        .shared
        .with(|core, _| core.cluster.node("n1").unwrap().cordoned);
    assert!(
        !cordoned,
        "the panicked operation's change stayed in memory"
    );
    for submitted in [writing, queued] {
        let id = submitted
            .await
            .unwrap()
            .expect("the submission was committed");
        let known = rig
            .shared
            .with(|core, _| core.cluster.jobs().any(|j| j.job_id == id));
        assert!(known, "{id} was acknowledged but is gone from memory");
    }
}

/// acme's audited SubmitJob from `peer`, as the audit layer runs a call.
fn audited_submit(
    api: &Api,
    token: &str,
    peer: String,
) -> impl std::future::Future<Output = Result<tonic::Response<pb::Job>, tonic::Status>> + use<> {
    let call = Arc::new(crate::state::audit::AuditCall::new(
        "/gpupool.v1.JobService/SubmitJob",
        "tenant",
        "acme",
        "acme",
        peer,
    ));
    let (api, token) = (api.clone(), token.to_string());
    crate::state::audit::CALL.scope(call, async move {
        api.submit_job(req(&token, job(pb::JobKind::Training, 1)))
            .await
    })
}

/// An audited call whose caller hangs up while its commit is being written
/// (the handler's future is dropped) still has its record in `[audit]
/// jsonl_file`: the commit writer appends it, not the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audited_call_dropped_while_committing_still_reaches_the_json_lines() {
    let rig = Rig::with_config(1, |config, dir| {
        config.audit.jsonl_file = Some(dir.join("audit.jsonl"));
    });
    let lines = rig._dir.path().join("audit.jsonl");
    let token = tenant(&rig.api).await;
    rig.delay_ms.store(300, Ordering::SeqCst);
    let before = rig.shared.metrics.store_transactions.get();
    let submit = tokio::spawn(audited_submit(&rig.api, &token, "127.0.0.1:1".into()));
    until_writing(&rig, before).await;
    // The caller hangs up: its handler is dropped mid-commit.
    submit.abort();
    assert!(submit.await.unwrap_err().is_cancelled());
    let mut text = String::new();
    for _ in 0..300 {
        text = std::fs::read_to_string(&lines).unwrap_or_default();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let stored = rig.store.audit_max_seq().unwrap();
    assert_eq!(stored, 1, "the record was committed");
    let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(line["seq"], 1);
    assert_eq!(line["method"], "JobService/SubmitJob");
}

/// A rig whose `[audit] jsonl_file` is a FIFO (`audit.fifo` in its dir)
/// nobody reads yet.
fn fifo_rig() -> Rig {
    Rig::with_config(1, |config, dir| {
        let fifo = dir.join("audit.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        config.audit.jsonl_file = Some(fifo);
    })
}

/// A JSON lines file that blocks (here a FIFO nobody reads yet: opening
/// it for writing waits) holds up no commit: audited calls are answered,
/// and their lines arrive, in order, once the file can be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_json_lines_file_does_not_hold_up_commits() {
    let rig = fifo_rig();
    let fifo = rig._dir.path().join("audit.fifo");
    let token = tenant(&rig.api).await;
    for i in 0..5 {
        let submit = audited_submit(&rig.api, &token, format!("127.0.0.1:{i}"));
        tokio::time::timeout(std::time::Duration::from_secs(10), submit)
            .await
            .expect("answered while the JSON lines file is stuck")
            .expect("submitted");
    }
    assert_eq!(rig.store.audit_max_seq().unwrap(), 5);
    // Now a reader: the five lines arrive, in commit order.
    let read = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let f = std::fs::File::open(&fifo).unwrap();
        std::io::BufReader::new(f)
            .lines()
            .take(5)
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap()["seq"].as_u64()
            })
            .collect::<Vec<_>>()
    });
    let seqs = tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the lines arrive")
        .unwrap();
    assert_eq!(seqs, [1, 2, 3, 4, 5].map(Some));
}

/// Nor does it hold up exit: the scheduler waits a few seconds for the
/// queued lines, then goes (they are in the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_json_lines_file_does_not_hold_up_exit() {
    let rig = fifo_rig();
    let token = tenant(&rig.api).await;
    audited_submit(&rig.api, &token, "127.0.0.1:1".into())
        .await
        .expect("submitted");
    let dropped = tokio::task::spawn_blocking(move || {
        let at = std::time::Instant::now();
        drop(rig);
        at.elapsed()
    });
    let took = tokio::time::timeout(std::time::Duration::from_secs(30), dropped)
        .await
        .expect("the scheduler went")
        .unwrap();
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
}

/// A stranded-capacity report is made once per view per second however
/// often it is asked (GetCapacity in a loop costs the cluster lock one
/// report a second), each view apart, and failures are not kept.
#[test]
fn capacity_reports_are_made_once_per_view_per_second() {
    use crate::domain::tenant::Caller;
    let rig = Rig::new(1);
    let made = std::cell::Cell::new(0);
    let make = || {
        made.set(made.get() + 1);
        Ok::<_, ()>(Vec::new())
    };
    for _ in 0..100 {
        rig.shared
            .capacity_view(&Caller::admin(), "", make)
            .unwrap();
    }
    assert_eq!(made.get(), 1);
    rig.shared
        .capacity_view(&Caller::admin(), "public", make)
        .unwrap();
    rig.shared
        .capacity_view(&Caller::tenant("acme"), "", make)
        .unwrap();
    rig.shared
        .capacity_view(&Caller::tenant("beta"), "", make)
        .unwrap();
    assert_eq!(made.get(), 4, "each view is its own");
    assert!(
        rig.shared
            .capacity_view(&Caller::tenant("gamma"), "", || Err::<Vec<_>, _>(()))
            .is_err()
    );
    rig.shared
        .capacity_view(&Caller::tenant("gamma"), "", make)
        .unwrap();
    assert_eq!(made.get(), 5, "a failure was not kept");
    std::thread::sleep(crate::state::CAPACITY_FRESH);
    rig.shared
        .capacity_view(&Caller::admin(), "", make)
        .unwrap();
    assert_eq!(made.get(), 6, "made again once a second old");
}

/// The stranded gauge: a deleted pool's series go at the next sample (once
/// the report is a second old), the public pool's stay.
#[test]
fn a_deleted_pool_s_stranded_series_go_and_the_others_stay() {
    use crate::domain::pool::{BillingMode, CreateRequest, PoolType};
    use crate::domain::tenant::{Caller, Quota};
    let rig = Rig::new(3);
    let now = crate::now_ms();
    let pool = rig.shared.with(|core, _| {
        let c = &mut core.cluster;
        let quota = Quota {
            max_dedicated_nodes: 2,
            max_gpus: 8,
            ..Default::default()
        };
        c.create_tenant(&Caller::admin(), "t", quota, now).unwrap();
        let spec = c.nodes().next().unwrap().spec_name();
        let req = CreateRequest {
            pool_type: Some(PoolType::Train),
            name: "mine".into(),
            spec,
            node_count: 1,
            billing_mode: Some(BillingMode::OnDemand),
            ..Default::default()
        };
        c.create_pool(&Caller::tenant("t"), req, 1, now).unwrap()
    });
    let series = |pool: &str| {
        rig.shared
            .render_metrics()
            .lines()
            .filter(|l| {
                l.starts_with("gpupool_gpus_stranded_milli{")
                    && l.contains(&format!("pool=\"{pool}\""))
            })
            .count()
    };
    let causes = crate::domain::stranded::CAUSES.len();
    assert_eq!(series("public"), causes);
    assert_eq!(series(&pool.pool_id), causes);
    rig.shared.with(|core, out| {
        core.cluster
            .delete_pool(&Caller::tenant("t"), &pool.pool_id, true, now + 10, out)
            .unwrap()
    });
    std::thread::sleep(crate::state::CAPACITY_FRESH);
    assert_eq!(series(&pool.pool_id), 0, "the deleted pool's series went");
    assert_eq!(series("public"), causes);
}
