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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_pools_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Scheduler::start(dir.path()).await;
    let mut agents: Vec<Agent> = [("n1", "AZ1"), ("n2", "AZ1"), ("n3", "AZ2"), ("n4", "AZ2")]
        .iter()
        .map(|(id, az)| Agent::start_in(dir.path(), &sched, id, "2xH100-80GB", az))
        .collect();
    wait_ready(&sched, 4).await;

    let mut admin = sched.admin().await;
    let token_a = tenant_with_token(&mut admin, "team-a", 3, 6).await;
    let token_b = tenant_with_token(&mut admin, "team-b", 4, 8).await;
    let mut a = sched.clients(Some(&token_a)).await;
    let mut b = sched.clients(Some(&token_b)).await;
    let me = a
        .tenants
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((me.tenant.as_str(), me.admin), ("team-a", false));

    // Specs come from the inventory.
    let spec = spec_info(&mut a).await;
    assert_eq!(
        (
            spec.nodes_total,
            spec.nodes_free,
            spec.sold_out,
            spec.gpu_count
        ),
        (4, 4, false, 2)
    );
    let spec_name = spec.name.clone();

    // Create: Creating, then Running on two idle nodes.
    let train = a
        .pools
        .create_pool(create(pb::PoolType::Train, "train_A", &spec_name, 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(train.status, pb::PoolStatus::Creating as i32);
    assert_eq!(train.tenant, "team-a");
    let train = wait_pool(&mut a, &train.pool_id, pb::PoolStatus::Running).await;
    assert_eq!(train.node_ids, ["n1", "n2"]);
    assert_eq!(spec_info(&mut a).await.nodes_free, 2);
    // Name rules are checked per type, with the rule named.
    let err = a
        .pools
        .create_pool(create(pb::PoolType::Deploy, "Bad_Name", &spec_name, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("R-CREATE-12"), "{}", err.message());

    // A deploy pool with a random zone lands in the one zone that fits.
    let mut deploy_req = create(pb::PoolType::Deploy, "serve-b", &spec_name, 2);
    deploy_req.az = "random".into();
    deploy_req.network = Some(pb::Network {
        network: Some(pb::network::Network::Custom(pb::CustomNetwork {
            vpc_id: "vpc-9".into(),
            subnet_id: "subnet-9".into(),
            security_group_ids: vec!["sg-1".into()],
        })),
    });
    let serve = b.pools.create_pool(deploy_req).await.unwrap().into_inner();
    assert_eq!(serve.resolved_az, "AZ2");
    let serve = wait_pool(&mut b, &serve.pool_id, pb::PoolStatus::Running).await;
    assert_eq!(serve.node_ids, ["n3", "n4"]);

    // Sold out now.
    let spec = spec_info(&mut a).await;
    assert!(spec.sold_out && spec.nodes_free == 0);
    let out = sched.cli_as(&token_a, &["spec", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sold out"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = a
        .pools
        .create_pool(create(pb::PoolType::Train, "more", &spec_name, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("sold out"), "{}", err.message());

    // Scale out beyond the quota is refused with the limit and the use.
    let err = a
        .pools
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

    // Kind isolation, both ways.
    let err = a
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(job(pb::JobKind::OnlineService, "train_A", &["true"])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("R-DED-2"), "{}", err.message());
    let err = b
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(job(pb::JobKind::Training, "serve-b", &["true"])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The deploy pool runs services, with the pool's network handed over.
    let svc = b
        .jobs
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
    let svc = wait_job_as(&mut b, &svc.job_id, pb::JobState::Succeeded).await;
    assert!(["n3", "n4"].contains(&svc.instances[0].node_id.as_str()));
    let out = sched.cli_as(&token_b, &["job", "logs", &svc.job_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "vpc=vpc-9");

    // A long training job in team-a's pool.
    let script = "exec sleep 600.217";
    let long = a
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(job(pb::JobKind::Training, "train_A", &["sh", "-c", script])),
        })
        .await
        .unwrap()
        .into_inner();
    let long = wait_job_as(&mut a, &long.job_id, pb::JobState::Running).await;
    let busy_node = long.instances[0].node_id.clone();
    assert_eq!(long.pool_id, train.pool_id);
    let pid: i32 = eventually(Duration::from_secs(10), "the job's pid", || async {
        host_pid_of(&["sleep", "600.217"])
    })
    .await;

    // Tenant isolation: team-b reaches none of team-a's pool and jobs.
    let nf = |r: Result<(), tonic::Status>, what: &str| {
        let err = r.expect_err(what);
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
    };
    for key in [train.pool_id.as_str(), "train_A"] {
        nf(
            b.pools
                .get_pool(pb::GetPoolRequest { pool: key.into() })
                .await
                .map(|_| ()),
            "get pool",
        );
        nf(
            b.jobs
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(job(pb::JobKind::Training, key, &["true"])),
                })
                .await
                .map(|_| ()),
            "submit",
        );
        nf(
            b.pools
                .scale_pool(pb::ScalePoolRequest {
                    pool: key.into(),
                    change: Some(pb::scale_pool_request::Change::AddNodes(1)),
                    force: false,
                })
                .await
                .map(|_| ()),
            "scale out",
        );
        nf(
            b.pools
                .scale_pool(pb::ScalePoolRequest {
                    pool: key.into(),
                    change: Some(pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds {
                        node_ids: vec!["n2".into()],
                    })),
                    force: true,
                })
                .await
                .map(|_| ()),
            "scale in",
        );
        nf(
            b.pools
                .scale_in_plan(pb::ScaleInPlanRequest {
                    pool: key.into(),
                    count: 1,
                })
                .await
                .map(|_| ()),
            "plan",
        );
        nf(
            b.pools
                .delete_pool(pb::DeletePoolRequest {
                    pool: key.into(),
                    confirm: true,
                })
                .await
                .map(|_| ()),
            "delete",
        );
        nf(
            b.nodes
                .list_nodes(pb::ListNodesRequest {
                    pool: key.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "list nodes",
        );
        nf(
            b.jobs
                .list_jobs(pb::ListJobsRequest {
                    pool: key.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "list jobs",
        );
        nf(
            b.pools
                .convert_to_subscription(pb::ConvertToSubscriptionRequest {
                    pool: key.into(),
                    months: 1,
                    auto_renew: false,
                })
                .await
                .map(|_| ()),
            "convert",
        );
        nf(
            b.pools
                .set_renewal(pb::SetRenewalRequest {
                    pool: key.into(),
                    auto_renew: true,
                    convert_to_on_demand_at_expiry: false,
                })
                .await
                .map(|_| ()),
            "renewal",
        );
        nf(
            b.pools
                .unsubscribe(pb::UnsubscribeRequest {
                    pool: key.into(),
                    confirm: true,
                })
                .await
                .map(|_| ()),
            "unsubscribe",
        );
        nf(
            b.usage
                .list_usage(pb::ListUsageRequest {
                    pool: key.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "usage of the pool",
        );
        nf(
            b.usage
                .list_orders(pb::ListOrdersRequest {
                    pool: key.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "orders of the pool",
        );
    }
    // Another tenant's usage, orders and bill are refused outright.
    let pd = |r: Result<(), tonic::Status>, what: &str| {
        let err = r.expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
    };
    pd(
        b.usage
            .list_usage(pb::ListUsageRequest {
                tenant: "team-a".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "usage of team-a",
    );
    pd(
        b.usage
            .list_orders(pb::ListOrdersRequest {
                tenant: "team-a".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "orders of team-a",
    );
    pd(
        b.usage
            .get_bill(pb::GetBillRequest {
                tenant: "team-a".into(),
                month: String::new(),
            })
            .await
            .map(|_| ()),
        "bill of team-a",
    );
    // Team-a's online service on the public pool: team-b can neither scale
    // nor restart it.
    let svc = a
        .jobs
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
    nf(
        b.jobs
            .scale_service(pb::ScaleServiceRequest {
                job_id: svc.job_id.clone(),
                replicas: 3,
            })
            .await
            .map(|_| ()),
        "scale service",
    );
    nf(
        b.jobs
            .restart_service(pb::RestartServiceRequest {
                job_id: svc.job_id.clone(),
            })
            .await
            .map(|_| ()),
        "restart service",
    );
    let svc_now = get_job(&sched, &svc.job_id).await;
    assert_eq!(svc_now.spec.unwrap().instances, 1, "team-b scaled it");
    a.jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: svc.job_id.clone(),
        })
        .await
        .unwrap();
    nf(
        b.jobs
            .get_job(pb::GetJobRequest {
                job_id: long.job_id.clone(),
            })
            .await
            .map(|_| ()),
        "get job",
    );
    nf(
        b.jobs
            .cancel_job(pb::CancelJobRequest {
                job_id: long.job_id.clone(),
            })
            .await
            .map(|_| ()),
        "cancel job",
    );
    nf(
        b.jobs
            .get_job_logs(pb::GetJobLogsRequest {
                job_id: long.job_id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "logs",
    );
    nf(
        b.nodes
            .get_node(pb::GetNodeRequest {
                node_id: "n1".into(),
            })
            .await
            .map(|_| ()),
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
        get_job(&sched, &long.job_id).await.state,
        pb::JobState::Running as i32
    );

    // The scale-in advisor picks the idle node and explains.
    let plan = a
        .pools
        .scale_in_plan(pb::ScaleInPlanRequest {
            pool: "train_A".into(),
            count: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .picks;
    let idle_node = if busy_node == "n1" { "n2" } else { "n1" };
    assert_eq!(plan[0].node_id, idle_node);
    assert_eq!(plan[0].instances_disrupted, 0);
    assert!(
        plan[0].explanation.contains("no work is disrupted"),
        "{}",
        plan[0].explanation
    );
    // Asking to remove every node says why it cannot, instead of a shorter plan.
    let err = a
        .pools
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
    let err = a
        .pools
        .scale_pool(remove(&busy_node, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&long.job_id), "{}", err.message());
    a.pools.scale_pool(remove(idle_node, false)).await.unwrap();
    let train = wait_pool(&mut a, "train_A", pb::PoolStatus::Running).await;
    assert_eq!(train.node_ids, vec![busy_node.clone()]);
    let freed = sched
        .nodes()
        .await
        .get_node(pb::GetNodeRequest {
            node_id: idle_node.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(freed.pool, "public");
    assert_eq!(spec_info(&mut a).await.nodes_free, 1);

    // Killing agents: Abnormal, then Unavailable; submissions name the status.
    agents[2].proc.kill();
    let abnormal = wait_pool(&mut b, "serve-b", pb::PoolStatus::Abnormal).await;
    assert!(
        abnormal.status_reason.contains("node n3 NotReady"),
        "{}",
        abnormal.status_reason
    );
    let err = b
        .jobs
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
    agents[3].proc.kill();
    wait_pool(&mut b, "serve-b", pb::PoolStatus::Unavailable).await;
    let err = b
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(job(pb::JobKind::OnlineService, "serve-b", &["true"])),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("Unavailable"), "{}", err.message());

    // Delete: confirmation required; jobs become Unavailable, processes stop, nodes return.
    let err = a
        .pools
        .delete_pool(pb::DeletePoolRequest {
            pool: "train_A".into(),
            confirm: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("R-DEL-5"));
    let out = sched.cli_as(&token_a, &["pool", "delete", "train_A", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = wait_job_as(&mut a, &long.job_id, pb::JobState::Unavailable).await;
    assert!(gone.reason.contains("deleted"), "{}", gone.reason);
    eventually(
        Duration::from_secs(10),
        "training process stopped",
        || async { process_dead(pid).then_some(()) },
    )
    .await;
    wait_pool(&mut a, &train.pool_id, pb::PoolStatus::Deleted).await;
    assert_eq!(spec_info(&mut a).await.nodes_free, 2);
    // ...and the spec can be bought again.
    let again = a
        .pools
        .create_pool(create(pb::PoolType::Train, "train_A", &spec_name, 2))
        .await
        .unwrap()
        .into_inner();
    wait_pool(&mut a, &again.pool_id, pb::PoolStatus::Running).await;

    // Everything survives a scheduler restart.
    sched = sched.restart(dir.path()).await;
    let mut a = sched.clients(Some(&token_a)).await;
    let mut b = sched.clients(Some(&token_b)).await;
    assert_eq!(
        b.tenants
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner()
            .tenant,
        "team-b"
    );
    let again_after = wait_pool(&mut a, &again.pool_id, pb::PoolStatus::Running).await;
    assert_eq!(again_after.node_ids, again.node_ids);
    let old = a
        .pools
        .get_pool(pb::GetPoolRequest {
            pool: train.pool_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.status, pb::PoolStatus::Deleted as i32);
    wait_pool(&mut b, "serve-b", pb::PoolStatus::Unavailable).await;
    assert_eq!(
        get_job(&sched, &long.job_id).await.state,
        pb::JobState::Unavailable as i32
    );
    let tenants = sched
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
    let after = a
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(job(pb::JobKind::Training, &again.pool_id, &["true"])),
        })
        .await
        .unwrap()
        .into_inner();
    let after = wait_job_as(&mut a, &after.job_id, pb::JobState::Succeeded).await;
    assert!(again.node_ids.contains(&after.instances[0].node_id));
    drop(agents);
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
