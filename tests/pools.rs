//! Dedicated pools end to end: real scheduler, real agents (fake GPUs),
//! tenants with real tokens over real gRPC.

use std::collections::BTreeSet;
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;
use tonic::Code;

fn create(kind: pb::PoolType, name: &str, spec: &str, nodes: u32) -> pb::CreatePoolRequest {
    pb::CreatePoolRequest {
        r#type: kind as i32,
        name: name.into(),
        description: "e2e".into(),
        spec: spec.into(),
        node_count: nodes,
        billing_mode: pb::BillingMode::OnDemand as i32,
        ..Default::default()
    }
}

async fn pool_status(c: &mut Clients, pool: &str) -> pb::Pool {
    c.pools
        .get_pool(pb::GetPoolRequest { pool: pool.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn wait_pool(c: &mut Clients, pool: &str, status: pb::PoolStatus) -> pb::Pool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = pool_status(c, pool).await;
        if p.status == status as i32 {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pool {pool} never {status:?}: {p:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn job(kind: pb::JobKind, pool: &str, command: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        kind: kind as i32,
        pool: pool.into(),
        instances: 1,
        resources: Some(pb::Resources {
            gpus: 1,
            cpu_milli: 100,
            memory_mib: 64,
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn spec_info(c: &mut Clients) -> pb::Spec {
    let specs = c
        .pools
        .list_specs(pb::ListSpecsRequest {})
        .await
        .unwrap()
        .into_inner()
        .specs;
    assert_eq!(specs.len(), 1, "{specs:?}");
    specs.into_iter().next().unwrap()
}

/// `r` failed with NotFound: `what` is hidden from the caller.
fn not_found<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    let err = r.expect_err(what);
    assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
}

/// `r` failed with PermissionDenied: `what` is refused outright.
fn permission_denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    let err = r.expect_err(what);
    assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
}

/// What the scenarios of `dedicated_pools_end_to_end` share: one scheduler
/// with four agents (n1, n2 in AZ1; n3, n4 in AZ2; all of one 2xH100 spec),
/// two tenants with a token and clients each, and what earlier scenarios
/// leave for later ones. Fields drop in order: the agents first, the
/// directory last.
struct World {
    agents: Vec<Agent>,
    /// team-a's clients (quota: 3 dedicated nodes, 6 GPUs).
    a: Clients,
    /// team-b's clients (quota: 4 dedicated nodes, 8 GPUs).
    b: Clients,
    sched: Scheduler,
    token_a: String,
    token_b: String,
    /// The one spec in the inventory.
    spec_name: String,
    /// team-a's train pool `train_A`, once bought.
    train: pb::Pool,
    /// team-a's long training job in `train_A`, once running...
    long: pb::Job,
    /// ...the node it runs on...
    busy_node: String,
    /// ...and its process on the host.
    pid: i32,
    /// `train_A` bought again after the first one is deleted.
    again: pb::Pool,
    dir: tempfile::TempDir,
}

impl World {
    /// Starts the scheduler and the four agents and makes the two tenants.
    async fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let sched = Scheduler::start(dir.path()).await;
        let agents: Vec<Agent> = [("n1", "AZ1"), ("n2", "AZ1"), ("n3", "AZ2"), ("n4", "AZ2")]
            .iter()
            .map(|(id, az)| Agent::start_in(dir.path(), &sched, id, "2xH100-80GB", az))
            .collect();
        wait_ready(&sched, 4).await;

        let mut admin = sched.admin().await;
        let token_a = tenant_with_token(&mut admin, "team-a", 3, 6).await;
        let token_b = tenant_with_token(&mut admin, "team-b", 4, 8).await;
        let a = sched.clients(Some(&token_a)).await;
        let b = sched.clients(Some(&token_b)).await;
        World {
            agents,
            a,
            b,
            sched,
            token_a,
            token_b,
            spec_name: String::new(),
            train: pb::Pool::default(),
            long: pb::Job::default(),
            busy_node: String::new(),
            pid: 0,
            again: pb::Pool::default(),
            dir,
        }
    }
}

/// Runs one scenario, printing its name first so that a failure's output
/// names the scenario that broke.
macro_rules! scenario {
    ($world:expr, $f:ident) => {{
        println!("scenario: {}", stringify!($f));
        $f($world).await;
    }};
}

/// Dedicated pools through their life on one cluster. The scenarios run in
/// this order because each builds on what the ones before it left: pools,
/// a running job, killed agents, a deleted pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_pools_end_to_end() {
    let mut w = World::start().await;
    scenario!(&mut w, a_token_names_its_tenant);
    scenario!(&mut w, buying_pools_until_the_spec_is_sold_out);
    scenario!(&mut w, scale_out_beyond_the_quota_is_refused);
    scenario!(&mut w, pools_run_only_their_kinds);
    scenario!(&mut w, a_long_training_job_runs_in_the_train_pool);
    scenario!(&mut w, tenant_b_reaches_none_of_tenant_a_s_pools);
    scenario!(&mut w, tenant_b_reaches_none_of_tenant_a_s_bills);
    scenario!(&mut w, tenant_b_reaches_none_of_tenant_a_s_services);
    scenario!(
        &mut w,
        tenant_b_reaches_none_of_tenant_a_s_jobs_nodes_or_tenants
    );
    scenario!(&mut w, scale_in_picks_the_idle_node);
    scenario!(&mut w, lost_agents_make_the_pool_abnormal_then_unavailable);
    scenario!(&mut w, delete_returns_the_nodes_and_stops_the_jobs);
    scenario!(w, everything_survives_a_scheduler_restart);
}

/// A tenant's token names its tenant, and is no admin's.
async fn a_token_names_its_tenant(w: &mut World) {
    let me =
        w.a.tenants
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!((me.tenant.as_str(), me.admin), ("team-a", false));
}

/// Specs come from the inventory; each pool bought takes idle nodes of the
/// spec until it is sold out, and then buying is refused.
async fn buying_pools_until_the_spec_is_sold_out(w: &mut World) {
    // Specs come from the inventory.
    let spec = spec_info(&mut w.a).await;
    assert_eq!(
        (
            spec.nodes_total,
            spec.nodes_free,
            spec.sold_out,
            spec.gpu_count
        ),
        (4, 4, false, 2)
    );
    w.spec_name = spec.name.clone();

    // Create: Creating, then Running on two idle nodes.
    let train =
        w.a.pools
            .create_pool(create(pb::PoolType::Train, "train_A", &w.spec_name, 2))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(train.status, pb::PoolStatus::Creating as i32);
    assert_eq!(train.tenant, "team-a");
    w.train = wait_pool(&mut w.a, &train.pool_id, pb::PoolStatus::Running).await;
    assert_eq!(w.train.node_ids, ["n1", "n2"]);
    assert_eq!(spec_info(&mut w.a).await.nodes_free, 2);
    // Name rules are checked per type, with the rule named.
    let err =
        w.a.pools
            .create_pool(create(pb::PoolType::Deploy, "Bad_Name", &w.spec_name, 1))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("R-CREATE-12"), "{}", err.message());

    // A deploy pool with a random zone lands in the one zone that fits.
    let mut deploy_req = create(pb::PoolType::Deploy, "serve-b", &w.spec_name, 2);
    deploy_req.az = "random".into();
    deploy_req.network = Some(pb::Network {
        network: Some(pb::network::Network::Custom(pb::CustomNetwork {
            vpc_id: "vpc-9".into(),
            subnet_id: "subnet-9".into(),
            security_group_ids: vec!["sg-1".into()],
        })),
    });
    let serve =
        w.b.pools
            .create_pool(deploy_req)
            .await
            .unwrap()
            .into_inner();
    assert_eq!(serve.resolved_az, "AZ2");
    let serve = wait_pool(&mut w.b, &serve.pool_id, pb::PoolStatus::Running).await;
    assert_eq!(serve.node_ids, ["n3", "n4"]);

    // Sold out now.
    let spec = spec_info(&mut w.a).await;
    assert!(spec.sold_out && spec.nodes_free == 0);
    let out = w.sched.cli_as(&w.token_a, &["spec", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sold out"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err =
        w.a.pools
            .create_pool(create(pb::PoolType::Train, "more", &w.spec_name, 1))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("sold out"), "{}", err.message());
}

/// Scale out beyond the quota is refused with the limit and the use.
async fn scale_out_beyond_the_quota_is_refused(w: &mut World) {
    let err =
        w.a.pools
            .scale_pool(pb::ScalePoolRequest {
                pool: "train_A".into(),
                change: Some(pb::scale_pool_request::Change::AddNodes(2)),
                force: false,
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("R-SCALE-2")
            && err.message().contains("3 dedicated node(s)")
            && err.message().contains("in use 2 node(s)"),
        "{}",
        err.message()
    );
}

/// A train pool refuses services and a deploy pool refuses training; the
/// deploy pool runs services, with the pool's network handed over.
async fn pools_run_only_their_kinds(w: &mut World) {
    // Kind isolation, both ways.
    let err =
        w.a.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::OnlineService, "train_A", &["true"])),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("R-DED-2"), "{}", err.message());
    let err =
        w.b.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::Training, "serve-b", &["true"])),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The deploy pool runs services, with the pool's network handed over.
    let svc =
        w.b.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(
                    pb::JobKind::BatchService,
                    "serve-b",
                    &["sh", "-c", "echo vpc=$GPUPOOL_NETWORK_VPC_ID"],
                )),
            })
            .await
            .unwrap()
            .into_inner();
    let svc = wait_job_as(&mut w.b, &svc.job_id, pb::JobState::Succeeded).await;
    assert!(["n3", "n4"].contains(&svc.instances[0].node_id.as_str()));
    let out = w.sched.cli_as(&w.token_b, &["job", "logs", &svc.job_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vpc=vpc-9");
}

/// A long training job runs in team-a's train pool, on one of its nodes,
/// as a process on the host; later scenarios watch it.
async fn a_long_training_job_runs_in_the_train_pool(w: &mut World) {
    let script = "exec sleep 600.217";
    let long =
        w.a.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::Training, "train_A", &["sh", "-c", script])),
            })
            .await
            .unwrap()
            .into_inner();
    w.long = wait_job_as(&mut w.a, &long.job_id, pb::JobState::Running).await;
    w.busy_node = w.long.instances[0].node_id.clone();
    assert_eq!(w.long.pool_id, w.train.pool_id);
    w.pid = eventually(Duration::from_secs(10), "the job's pid", || async {
        host_pid_of(&["sleep", "600.217"])
    })
    .await;
}

/// Tenant isolation: team-b gets NotFound for everything it asks of
/// team-a's pool, by id or by name.
async fn tenant_b_reaches_none_of_tenant_a_s_pools(w: &mut World) {
    for key in [w.train.pool_id.as_str(), "train_A"] {
        b_can_neither_use_nor_change(&mut w.b, key).await;
        b_can_neither_list_nor_bill(&mut w.b, key).await;
    }
}

/// team-b can't get, submit to, scale out, scale in, plan for or delete the
/// pool `key`: NotFound.
async fn b_can_neither_use_nor_change(b: &mut Clients, key: &str) {
    not_found(
        b.pools
            .get_pool(pb::GetPoolRequest { pool: key.into() })
            .await,
        "get pool",
    );
    not_found(
        b.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::Training, key, &["true"])),
            })
            .await,
        "submit",
    );
    not_found(
        b.pools
            .scale_pool(pb::ScalePoolRequest {
                pool: key.into(),
                change: Some(pb::scale_pool_request::Change::AddNodes(1)),
                force: false,
            })
            .await,
        "scale out",
    );
    not_found(
        b.pools
            .scale_pool(pb::ScalePoolRequest {
                pool: key.into(),
                change: Some(pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds {
                    node_ids: vec!["n2".into()],
                })),
                force: true,
            })
            .await,
        "scale in",
    );
    not_found(
        b.pools
            .scale_in_plan(pb::ScaleInPlanRequest {
                pool: key.into(),
                count: 1,
            })
            .await,
        "plan",
    );
    not_found(
        b.pools
            .delete_pool(pb::DeletePoolRequest {
                pool: key.into(),
                confirm: true,
            })
            .await,
        "delete",
    );
}

/// team-b can't list the nodes or jobs of the pool `key`, convert it, set
/// its renewal, unsubscribe it, or see its usage or orders: NotFound.
async fn b_can_neither_list_nor_bill(b: &mut Clients, key: &str) {
    not_found(
        b.nodes
            .list_nodes(pb::ListNodesRequest {
                pool: key.into(),
                ..Default::default()
            })
            .await,
        "list nodes",
    );
    not_found(
        b.jobs
            .list_jobs(pb::ListJobsRequest {
                pool: key.into(),
                ..Default::default()
            })
            .await,
        "list jobs",
    );
    not_found(
        b.pools
            .convert_to_subscription(pb::ConvertToSubscriptionRequest {
                pool: key.into(),
                months: 1,
                auto_renew: false,
            })
            .await,
        "convert",
    );
    not_found(
        b.pools
            .set_renewal(pb::SetRenewalRequest {
                pool: key.into(),
                auto_renew: true,
                convert_to_on_demand_at_expiry: false,
            })
            .await,
        "renewal",
    );
    not_found(
        b.pools
            .unsubscribe(pb::UnsubscribeRequest {
                pool: key.into(),
                confirm: true,
            })
            .await,
        "unsubscribe",
    );
    not_found(
        b.usage
            .list_usage(pb::ListUsageRequest {
                pool: key.into(),
                ..Default::default()
            })
            .await,
        "usage of the pool",
    );
    not_found(
        b.usage
            .list_orders(pb::ListOrdersRequest {
                pool: key.into(),
                ..Default::default()
            })
            .await,
        "orders of the pool",
    );
}

/// Another tenant's usage, orders and bill are refused outright.
async fn tenant_b_reaches_none_of_tenant_a_s_bills(w: &mut World) {
    permission_denied(
        w.b.usage
            .list_usage(pb::ListUsageRequest {
                tenant: "team-a".into(),
                ..Default::default()
            })
            .await,
        "usage of team-a",
    );
    permission_denied(
        w.b.usage
            .list_orders(pb::ListOrdersRequest {
                tenant: "team-a".into(),
                ..Default::default()
            })
            .await,
        "orders of team-a",
    );
    permission_denied(
        w.b.usage
            .get_bill(pb::GetBillRequest {
                tenant: "team-a".into(),
                month: String::new(),
            })
            .await,
        "bill of team-a",
    );
}

/// Team-a's online service on the public pool: team-b can neither scale
/// nor restart it.
async fn tenant_b_reaches_none_of_tenant_a_s_services(w: &mut World) {
    let svc =
        w.a.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(pb::JobSpec {
                    kind: pb::JobKind::OnlineService as i32,
                    resources: Some(pb::Resources {
                        cpu_milli: 100,
                        memory_mib: 64,
                        ..Default::default()
                    }),
                    instances: 1,
                    command: vec!["sleep".into(), "600".into()],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
    not_found(
        w.b.jobs
            .scale_service(pb::ScaleServiceRequest {
                job_id: svc.job_id.clone(),
                replicas: 3,
            })
            .await,
        "scale service",
    );
    not_found(
        w.b.jobs
            .restart_service(pb::RestartServiceRequest {
                job_id: svc.job_id.clone(),
            })
            .await,
        "restart service",
    );
    let svc_now = get_job(&w.sched, &svc.job_id).await;
    assert_eq!(svc_now.spec.unwrap().instances, 1, "team-b scaled it");
    w.a.jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: svc.job_id.clone(),
        })
        .await
        .unwrap();
}

/// team-b can't see or cancel team-a's job or see its nodes, lists only its
/// own pools, jobs and nodes, and can't list or make tenants; the job runs on.
async fn tenant_b_reaches_none_of_tenant_a_s_jobs_nodes_or_tenants(w: &mut World) {
    let b = &mut w.b;
    let long = &w.long;
    not_found(
        b.jobs
            .get_job(pb::GetJobRequest {
                job_id: long.job_id.clone(),
            })
            .await,
        "get job",
    );
    not_found(
        b.jobs
            .cancel_job(pb::CancelJobRequest {
                job_id: long.job_id.clone(),
            })
            .await,
        "cancel job",
    );
    not_found(
        b.jobs
            .get_job_logs(pb::GetJobLogsRequest {
                job_id: long.job_id.clone(),
                ..Default::default()
            })
            .await,
        "logs",
    );
    not_found(
        b.nodes
            .get_node(pb::GetNodeRequest {
                node_id: "n1".into(),
            })
            .await,
        "get node",
    );
    let listed = b
        .pools
        .list_pools(pb::ListPoolsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert!(listed.iter().all(|p| p.tenant != "team-a"), "{listed:?}");
    let jobs = b
        .jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.iter().all(|j| j.tenant == "team-b"));
    let nodes = b
        .nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(
        nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["n3", "n4"]
    );
    let err = b
        .tenants
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = b
        .tenants
        .create_tenant(pb::CreateTenantRequest {
            name: "evil".into(),
            quota: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The job is untouched.
    assert_eq!(
        get_job(&w.sched, &long.job_id).await.state,
        pb::JobState::Running as i32
    );
}

/// The scale-in advisor picks the idle node and explains; scale in refuses
/// the busy node without force and hands the idle one back to the public pool.
async fn scale_in_picks_the_idle_node(w: &mut World) {
    let plan =
        w.a.pools
            .scale_in_plan(pb::ScaleInPlanRequest {
                pool: "train_A".into(),
                count: 1,
            })
            .await
            .unwrap()
            .into_inner()
            .picks;
    let idle_node = if w.busy_node == "n1" { "n2" } else { "n1" };
    assert_eq!(plan[0].node_id, idle_node);
    assert_eq!(plan[0].instances_disrupted, 0);
    assert!(
        plan[0].explanation.contains("no work is disrupted"),
        "{}",
        plan[0].explanation
    );
    // Asking to remove every node says why it cannot, instead of a shorter plan.
    let err =
        w.a.pools
            .scale_in_plan(pb::ScaleInPlanRequest {
                pool: "train_A".into(),
                count: 2,
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("at most 1"), "{err:?}");

    // Scale in: the busy node is refused without force; the named idle node leaves.
    let remove = |node: &str, force: bool| pb::ScalePoolRequest {
        pool: "train_A".into(),
        change: Some(pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds {
            node_ids: vec![node.into()],
        })),
        force,
    };
    let err =
        w.a.pools
            .scale_pool(remove(&w.busy_node, false))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&w.long.job_id), "{}", err.message());
    w.a.pools
        .scale_pool(remove(idle_node, false))
        .await
        .unwrap();
    w.train = wait_pool(&mut w.a, "train_A", pb::PoolStatus::Running).await;
    assert_eq!(w.train.node_ids, vec![w.busy_node.clone()]);
    let freed = w
        .sched
        .nodes()
        .await
        .get_node(pb::GetNodeRequest {
            node_id: idle_node.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(freed.pool, "public");
    assert_eq!(spec_info(&mut w.a).await.nodes_free, 1);
}

/// Killing agents: the deploy pool turns Abnormal, then Unavailable, and
/// submissions to it name the status.
async fn lost_agents_make_the_pool_abnormal_then_unavailable(w: &mut World) {
    w.agents[2].proc.kill();
    let abnormal = wait_pool(&mut w.b, "serve-b", pb::PoolStatus::Abnormal).await;
    assert!(
        abnormal.status_reason.contains("node n3 NotReady"),
        "{}",
        abnormal.status_reason
    );
    let err =
        w.b.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::OnlineService, "serve-b", &["true"])),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("Abnormal") && err.message().contains("R-DED-3"),
        "{}",
        err.message()
    );
    w.agents[3].proc.kill();
    wait_pool(&mut w.b, "serve-b", pb::PoolStatus::Unavailable).await;
    let err =
        w.b.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::OnlineService, "serve-b", &["true"])),
            })
            .await
            .unwrap_err();
    assert!(err.message().contains("Unavailable"), "{}", err.message());
}

/// Delete: confirmation required; jobs become Unavailable, processes stop,
/// nodes return, and the spec can be bought again.
async fn delete_returns_the_nodes_and_stops_the_jobs(w: &mut World) {
    let err =
        w.a.pools
            .delete_pool(pb::DeletePoolRequest {
                pool: "train_A".into(),
                confirm: false,
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("R-DEL-5"));
    let out = w
        .sched
        .cli_as(&w.token_a, &["pool", "delete", "train_A", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = wait_job_as(&mut w.a, &w.long.job_id, pb::JobState::Unavailable).await;
    assert!(gone.reason.contains("deleted"), "{}", gone.reason);
    let pid = w.pid;
    eventually(
        Duration::from_secs(10),
        "training process stopped",
        || async { process_dead(pid).then_some(()) },
    )
    .await;
    wait_pool(&mut w.a, &w.train.pool_id, pb::PoolStatus::Deleted).await;
    assert_eq!(spec_info(&mut w.a).await.nodes_free, 2);
    // ...and the spec can be bought again.
    let again =
        w.a.pools
            .create_pool(create(pb::PoolType::Train, "train_A", &w.spec_name, 2))
            .await
            .unwrap()
            .into_inner();
    wait_pool(&mut w.a, &again.pool_id, pb::PoolStatus::Running).await;
    w.again = again;
}

/// Everything survives a scheduler restart: tokens, pools live and deleted,
/// the deploy pool's status, the job's state, tenants' use; the new pool
/// runs jobs. Takes the world, since the restart replaces the scheduler.
async fn everything_survives_a_scheduler_restart(mut w: World) {
    w.sched = w.sched.restart(w.dir.path()).await;
    w.a = w.sched.clients(Some(&w.token_a)).await;
    w.b = w.sched.clients(Some(&w.token_b)).await;
    assert_eq!(
        w.b.tenants
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner()
            .tenant,
        "team-b"
    );
    let again_after = wait_pool(&mut w.a, &w.again.pool_id, pb::PoolStatus::Running).await;
    assert_eq!(again_after.node_ids, w.again.node_ids);
    let old =
        w.a.pools
            .get_pool(pb::GetPoolRequest {
                pool: w.train.pool_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(old.status, pb::PoolStatus::Deleted as i32);
    wait_pool(&mut w.b, "serve-b", pb::PoolStatus::Unavailable).await;
    assert_eq!(
        get_job(&w.sched, &w.long.job_id).await.state,
        pb::JobState::Unavailable as i32
    );
    let tenants = w
        .sched
        .admin()
        .await
        .tenants
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    let a_info = tenants.iter().find(|t| t.name == "team-a").unwrap();
    assert_eq!(
        (a_info.dedicated_nodes_used, a_info.gpus_used, a_info.tokens),
        (2, 4, 1)
    );
    // And the pool works after the restart.
    let after =
        w.a.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: Some(job(pb::JobKind::Training, &w.again.pool_id, &["true"])),
            })
            .await
            .unwrap()
            .into_inner();
    let after = wait_job_as(&mut w.a, &after.job_id, pb::JobState::Succeeded).await;
    assert!(w.again.node_ids.contains(&after.instances[0].node_id));
}

async fn wait_job_as(c: &mut Clients, id: &str, state: pb::JobState) -> pb::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let j = c
            .jobs
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if j.state == state as i32 {
            return j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never {state:?}: {j:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_allocate_a_node_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Scheduler::start(dir.path()).await;
    let _agents: Vec<Agent> = (1..=4)
        .map(|i| Agent::start(dir.path(), &sched, &format!("c{i}"), "1xA100-40GB"))
        .collect();
    wait_ready(&sched, 4).await;
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "many", 100, 100).await;
    let spec = spec_info(&mut admin).await.name;

    let mut tasks = Vec::new();
    for i in 0..32 {
        let c = sched.clients(Some(&token)).await;
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut pools = c.pools;
            pools
                .create_pool(create(pb::PoolType::Train, &format!("race-{i}"), &spec, 1))
                .await
        }));
    }
    let mut won = Vec::new();
    let mut sold_out = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(p) => won.push(p.into_inner()),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                sold_out += 1;
            }
        }
    }
    assert_eq!((won.len(), sold_out), (4, 28));
    let nodes: BTreeSet<String> = won.iter().flat_map(|p| p.node_ids.clone()).collect();
    assert_eq!(nodes.len(), 4, "a node was given to two pools: {won:#?}");

    // The same holds after a restart, from the database.
    sched = sched.restart(dir.path()).await;
    let pools = sched
        .admin()
        .await
        .pools
        .list_pools(pb::ListPoolsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pools;
    let dedicated: Vec<_> = pools.iter().filter(|p| p.pool_id != "public").collect();
    assert_eq!(dedicated.len(), 4);
    let nodes_after: BTreeSet<String> = dedicated.iter().flat_map(|p| p.node_ids.clone()).collect();
    assert_eq!(nodes_after, nodes);
    for n in list_nodes(&sched).await {
        let owner: Vec<_> = dedicated
            .iter()
            .filter(|p| p.node_ids.contains(&n.node_id))
            .collect();
        assert_eq!(owner.len(), 1);
        assert_eq!(n.pool, owner[0].pool_id);
    }
}
