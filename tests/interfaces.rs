//! The interfaces other tools rely on: clear gRPC statuses on bad input,
//! the standard health and reflection services, Prometheus text that
//! promtool accepts, systemd units that systemd-analyze accepts, and config
//! errors that name the file and the field.

use std::process::Command;
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let ok = training(0, &["true"]);
    let with_res = |f: &dyn Fn(&mut pb::Resources)| {
        let mut spec = ok.clone();
        f(spec.resources.as_mut().unwrap());
        spec
    };
    let cases: Vec<(pb::JobSpec, Code, &str)> = vec![
        (
            pb::JobSpec {
                command: vec![],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "command must not be empty",
        ),
        (
            with_res(&|r| r.gpus = -1),
            Code::InvalidArgument,
            "gpus must not be negative",
        ),
        (
            with_res(&|r| r.cpu_milli = -100),
            Code::InvalidArgument,
            "cpu_milli must not be negative",
        ),
        (
            with_res(&|r| r.memory_mib = -1),
            Code::InvalidArgument,
            "memory_mib must not be negative",
        ),
        (
            with_res(&|r| r.gpu_milli = 1500),
            Code::InvalidArgument,
            "gpu_milli must be 1..999",
        ),
        (
            pb::JobSpec {
                instances: 0,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "instances must be at least 1",
        ),
        (
            pb::JobSpec {
                kind: 0,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "kind is required",
        ),
        (
            pb::JobSpec {
                pool: "no-such-pool".into(),
                ..ok.clone()
            },
            Code::NotFound,
            "pool \"no-such-pool\" not found",
        ),
    ];
    for (spec, code, text) in cases {
        let err = submit(&sched, spec.clone()).await.expect_err(text);
        assert_eq!(err.code(), code, "{text}: {err:?}");
        assert!(
            err.message().contains(text),
            "{text}: got {:?}",
            err.message()
        );
    }
    let mut jobs = sched.jobs().await;
    let err = jobs
        .get_job(pb::GetJobRequest {
            job_id: "j-999999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("j-999999"));
    let err = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = jobs
        .submit_job(pb::SubmitJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Usage with a bad range is refused; a bad month too.
    let mut admin = sched.admin().await;
    let err = admin
        .usage
        .list_usage(pb::ListUsageRequest {
            from: Some(gpupool_proto::timestamp_from_unix_ms(4_000_000_000_000)),
            to: Some(gpupool_proto::timestamp_from_unix_ms(1_000)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = admin
        .usage
        .get_bill(pb::GetBillRequest {
            tenant: String::new(),
            month: "2026-13".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("YYYY-MM"));

    // Every client call needs a token; a wrong one is refused too.
    for token in [None, Some("not-a-token")] {
        let mut c = sched.clients(token).await;
        let jobs = c.jobs.list_jobs(pb::ListJobsRequest::default()).await;
        assert_eq!(jobs.unwrap_err().code(), Code::Unauthenticated);
        let nodes = c.nodes.list_nodes(pb::ListNodesRequest::default()).await;
        assert_eq!(nodes.unwrap_err().code(), Code::Unauthenticated);
        let pools = c.pools.list_pools(pb::ListPoolsRequest::default()).await;
        assert_eq!(pools.unwrap_err().code(), Code::Unauthenticated);
        let me = c.tenants.who_am_i(pb::WhoAmIRequest::default()).await;
        assert_eq!(me.unwrap_err().code(), Code::Unauthenticated);
        let usage = c.usage.list_usage(pb::ListUsageRequest::default()).await;
        assert_eq!(usage.unwrap_err().code(), Code::Unauthenticated);
    }
    let out = sched.cli_as("wrong-token", &["node", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid API token"));

    // Agents need the join token.
    let mut agent = pb::agent_service_client::AgentServiceClient::new(sched.channel().await);
    let err = agent
        .register(pb::RegisterRequest {
            node_id: "x".into(),
            inventory: Some(Default::default()),
            agent_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The CLI passes statuses on with a non-zero exit.
    let out = sched.cli(&["job", "get", "j-424242"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
    let out = sched.cli(&["job", "submit", "--gpu-milli", "1500", "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpu-milli"));

    // The scheduler survived all of it.
    assert!(submit(&sched, ok).await.is_ok());
}

#[test]
fn malformed_config_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for (text, field) in [
        ("grpc_listen = \"127.0.0.1:notaport\"\n", "grpc_listen"),
        ("node_grace_ms = \"soon\"\n", "node_grace_ms"),
        ("unknown_knob = true\n", "unknown_knob"),
    ] {
        let path = dir.path().join("broken-scheduler.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin("gpupool-scheduler"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("broken-scheduler.toml") && stderr.contains(field),
            "{text}: {stderr}"
        );
    }
    let path = dir.path().join("broken-agent.toml");
    std::fs::write(&path, "scheduler_addr = \"http://x\"\nmetrics_listen = 9\n").unwrap();
    let out = Command::new(bin("gpupool-agent"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken-agent.toml") && stderr.contains("metrics_listen"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let agent = Agent::start_with_metrics(dir.path(), &sched, "metrics-node", "2xH100-80GB");

    let mut health = tonic_health::pb::health_client::HealthClient::new(sched.channel().await);
    for service in ["", "gpupool.v1.JobService", "gpupool.v1.AgentService"] {
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    // Reflection, both protocol versions, lists the gpupool.v1 services.
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(sched.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("{resp:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "gpupool.v1.AgentService",
            "gpupool.v1.JobService",
            "gpupool.v1.NodeService",
            "gpupool.v1.PoolService",
            "gpupool.v1.UsageService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(sched.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("{resp:?}")
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "gpupool.v1.JobService")
        );
    }

    // Metrics from both daemons, once the node is up and a job has run.
    wait_ready(&sched, 1).await;
    let job = submit(&sched, training(1, &["true"])).await.unwrap();
    wait_job(
        &sched,
        &job.job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    let sched_metrics = http_get(sched.metrics_port, "/metrics").await;
    assert!(
        sched_metrics.contains("gpupool_nodes{status=\"Ready\"} 1"),
        "{sched_metrics}"
    );
    assert!(
        sched_metrics.contains("gpupool_jobs{state=\"Succeeded\"} 1"),
        "{sched_metrics}"
    );
    assert!(sched_metrics.contains("gpupool_gpus 2"), "{sched_metrics}");
    // A running job labels its GPU, as dcgm-exporter's pod labels do.
    let running = submit(&sched, training(1, &["sleep", "5"])).await.unwrap();
    wait_job(
        &sched,
        &running.job_id,
        pb::JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    let agent_metrics = eventually(Duration::from_secs(10), "agent metrics", || async {
        let body = http_get(agent.metrics_port, "/metrics").await;
        body.contains("DCGM_FI_DEV_GPU_UTIL").then_some(body)
    })
    .await;
    let job_label = format!("gpupool_job=\"{}\"", running.job_id);
    assert_eq!(
        agent_metrics
            .lines()
            .filter(|l| l.starts_with("DCGM_FI_DEV_FB_USED{")
                && l.contains(&job_label)
                && l.contains("pool=\"public\""))
            .count(),
        1,
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("DCGM_FI_DEV_XID_ERRORS{"),
        "{agent_metrics}"
    );
    assert_eq!(
        agent_metrics.matches("DCGM_FI_DEV_FB_FREE{").count(),
        2,
        "{agent_metrics}"
    );
    assert!(agent_metrics.contains("gpupool_agent_scheduler_connected 1"));
    assert!(
        agent_metrics
            .lines()
            .any(|l| l.starts_with("DCGM_FI_DEV_SM_CLOCK{")
                && l.contains(&job_label)
                && l.contains("tenant=\"admin\"")
                && l.contains("device=\"nvidia")),
        "{agent_metrics}"
    );
    dashboard_uses_only_exported_metrics(&sched_metrics, &agent_metrics);
    if let Some(promtool) = require_tool("promtool", "prometheus") {
        for (name, body) in [("scheduler", &sched_metrics), ("agent", &agent_metrics)] {
            let path = dir.path().join(format!("{name}.prom"));
            std::fs::write(&path, body).unwrap();
            let out = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(std::fs::File::open(&path).unwrap())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics rejects the {name} metrics:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `systemd-analyze verify` checks that ExecStart exists, so the units are
/// verified as copies whose `/usr/bin/` points at the built binaries;
/// everything else in them is verified as shipped.
#[test]
fn systemd_units_verify() {
    let Some(analyze) = require_tool("systemd-analyze", "systemd") else {
        return;
    };
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let dir = tempfile::tempdir().unwrap();
    let bins = format!("{}/", bin_dir().canonicalize().unwrap().display());
    let mut copies = Vec::new();
    for name in ["gpupool-scheduler.service", "gpupool-agent.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/"), "{name}");
        let copy = dir.path().join(name);
        std::fs::write(
            &copy,
            text.replace("ExecStart=/usr/bin/", &format!("ExecStart={bins}")),
        )
        .unwrap();
        copies.push(copy);
    }
    let out = Command::new(analyze)
        .arg("verify")
        .args(&copies)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sysusers.d and tmpfiles.d snippets, applied by the real tools to an
/// empty root: the user exists and the directories get their owners.
#[test]
fn sysusers_and_tmpfiles_snippets_apply() {
    let (Some(sysusers), Some(tmpfiles)) = (
        require_tool("systemd-sysusers", "systemd"),
        require_tool("systemd-tmpfiles", "systemd"),
    ) else {
        return;
    };
    let snippets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    for (tool, args, files) in [
        (&sysusers, &[][..], &["gpupool.sysusers.conf"][..]),
        (
            &tmpfiles,
            &["--create"][..],
            // Together, as at boot: both name /etc/gpupool and
            // /var/lib/gpupool, with the same lines, so no "Duplicate
            // line" warning.
            &[
                "gpupool-scheduler.tmpfiles.conf",
                "gpupool-agent.tmpfiles.conf",
            ][..],
        ),
    ] {
        let out = Command::new(tool)
            .args(args)
            .arg(format!("--root={}", root.path().display()))
            .args(files.iter().map(|f| snippets.join(f)))
            .output()
            .unwrap();
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("uplicate"),
            "{} {files:?}: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let uid: u32 = passwd
        .lines()
        .find(|l| l.starts_with("gpupool:"))
        .and_then(|l| l.split(':').nth(2)?.parse().ok())
        .expect("gpupool user created");
    use std::os::unix::fs::MetadataExt;
    let meta = |p: &str| std::fs::metadata(root.path().join(p)).unwrap();
    assert_eq!(meta("var/lib/gpupool/scheduler").uid(), uid);
    assert_eq!(meta("var/lib/gpupool/scheduler").mode() & 0o777, 0o750);
    assert_eq!(meta("var/lib/gpupool/agent").mode() & 0o777, 0o700);
    assert_eq!(meta("etc/gpupool").mode() & 0o777, 0o755);
}

/// The shipped Grafana dashboard: four views, and every metric its queries
/// use is one the daemons export (checked against the live outputs above).
fn dashboard_uses_only_exported_metrics(sched: &str, agent: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/gpupool.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows, ["Cluster", "Pool", "Node", "Job"]);
    let mut ids: Vec<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids repeat");
    // The instance cgroup metrics exist only where instances run in cgroups.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let exported = |name: &str| {
        [sched, agent].iter().any(|body| {
            body.lines().any(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(['{', ' ']))
            })
        })
    };
    let mut used = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !(token.starts_with("DCGM_") || token.starts_with("gpupool_")) {
                    continue;
                }
                // Label names, not metrics.
                if ["gpupool_job", "gpupool_instance"].contains(&token) {
                    continue;
                }
                used += 1;
                if token.starts_with("gpupool_agent_instance_") && !root {
                    eprintln!("not checked without root (no cgroups): {token}");
                    continue;
                }
                assert!(
                    exported(token),
                    "panel {:?} uses {token}, which nothing exports",
                    p["title"]
                );
            }
        }
    }
    assert!(used > 30, "{used} metric uses");
}

/// Both daemons speak systemd's notify protocol (their units are
/// `Type=notify` with `WatchdogSec=`): READY once serving, WATCHDOG while
/// their main loop turns, STOPPING on SIGTERM.
#[test]
fn daemons_notify_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let grpc = free_port();
    let config = dir.path().join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen = \"127.0.0.1:{grpc}\"\ndata_dir = \"{}\"\nheartbeat_interval_ms = 200\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "scheduler_addr = \"http://127.0.0.1:{grpc}\"\nnode_id = \"notify-node\"\nstate_dir = \"{}\"\nconfinement = \"off\"\n",
            dir.path().join("agent").display()
        ),
    )
    .unwrap();
    let daemons: [(&str, Vec<&str>); 2] = [
        (
            "gpupool-scheduler",
            vec!["serve", "--config", config.to_str().unwrap()],
        ),
        (
            "gpupool-agent",
            vec![
                "--config",
                agent_config.to_str().unwrap(),
                "--fake-gpus",
                "1xH100-80GB",
            ],
        ),
    ];
    /// SIGKILLs what is left if the test fails half-way.
    struct Reap(Vec<i32>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for pid in &self.0 {
                // SAFETY: kill(2) on a pid this test spawned.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
    }
    let mut reap = Reap(Vec::new());
    let mut children = Vec::new();
    for (name, args) in daemons {
        let socket = dir.path().join(format!("{name}.notify"));
        let rx = UnixDatagram::bind(&socket).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let child = Command::new(bin(name))
            .args(&args)
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "400000")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        reap.0.push(child.id() as i32);
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while !seen.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
            let n = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{name}: no notification ({e}); got {seen:?}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(seen[0].starts_with("READY=1"), "{name}: {seen:?}");
        children.push((name, child, rx));
    }
    // Stop the agent first, then the scheduler.
    for (name, mut child, rx) in children.into_iter().rev() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut buf = [0u8; 512];
        loop {
            let n = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{name}: no STOPPING ({e})"));
            if &buf[..n] == b"STOPPING=1" {
                break;
            }
        }
        assert!(child.wait().unwrap().success(), "{name} exit");
    }
}

/// The permission table, as the product states it (independent of the
/// scheduler's own table, which a unit test holds to the proto files):
/// every RPC called with every role over real gRPC.
#[tokio::test]
async fn every_rpc_enforces_its_role() {
    use gpupool_proto::tonic_prost::ProstCodec;
    use tonic::codegen::http::uri::PathAndQuery;

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Role {
        Agent,
        Tenant,
        Admin,
    }
    const TABLE: &[(&str, Role)] = &[
        ("AgentService/Register", Role::Agent),
        ("AgentService/Session", Role::Agent),
        ("JobService/SubmitJob", Role::Tenant),
        ("JobService/GetJob", Role::Tenant),
        ("JobService/ListJobs", Role::Tenant),
        ("JobService/CancelJob", Role::Tenant),
        ("JobService/GetJobLogs", Role::Tenant),
        ("JobService/ScaleService", Role::Tenant),
        ("JobService/RestartService", Role::Tenant),
        ("JobService/ListJobKinds", Role::Tenant),
        ("NodeService/ListNodes", Role::Tenant),
        ("NodeService/GetNode", Role::Tenant),
        ("NodeService/CordonNode", Role::Admin),
        ("NodeService/UncordonNode", Role::Admin),
        ("NodeService/RevokeNode", Role::Admin),
        ("NodeService/ReadmitNode", Role::Admin),
        ("NodeService/DrainNode", Role::Admin),
        ("PoolService/ListPools", Role::Tenant),
        ("PoolService/GetPool", Role::Tenant),
        ("PoolService/CreatePool", Role::Tenant),
        ("PoolService/DeletePool", Role::Tenant),
        ("PoolService/ScalePool", Role::Tenant),
        ("PoolService/ListSpecs", Role::Tenant),
        ("PoolService/ConvertToSubscription", Role::Tenant),
        ("PoolService/SetRenewal", Role::Tenant),
        ("PoolService/Unsubscribe", Role::Tenant),
        ("PoolService/ScaleInPlan", Role::Tenant),
        ("PoolService/GetCapacity", Role::Tenant),
        ("TenantService/CreateTenant", Role::Admin),
        ("TenantService/ListTenants", Role::Admin),
        ("TenantService/GetTenant", Role::Tenant),
        ("TenantService/IssueToken", Role::Admin),
        ("TenantService/RevokeTokens", Role::Admin),
        ("TenantService/SetQuota", Role::Admin),
        ("TenantService/WhoAmI", Role::Tenant),
        ("UsageService/ListUsage", Role::Tenant),
        ("UsageService/ListOrders", Role::Tenant),
        ("UsageService/GetBill", Role::Tenant),
        ("AuditService/ListAudit", Role::Tenant),
    ];

    // This table and the scheduler's own name the same RPCs with the same
    // roles, so a new RPC cannot go untested here.
    {
        use gpupool_scheduler::api::access::{ACCESS, Access};
        let mut ours: Vec<(String, Role)> = TABLE
            .iter()
            .map(|(m, r)| (format!("/gpupool.v1.{m}"), *r))
            .collect();
        let mut theirs: Vec<(String, Role)> = ACCESS
            .iter()
            .map(|(p, a)| {
                let role = match a {
                    Access::Agent => Role::Agent,
                    Access::Tenant => Role::Tenant,
                    Access::Admin => Role::Admin,
                };
                (p.to_string(), role)
            })
            .collect();
        ours.sort_by(|a, b| a.0.cmp(&b.0));
        theirs.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            ours, theirs,
            "the product's table and the scheduler's differ"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let mut admin = sched.admin().await;
    let tenant_token = tenant_with_token(&mut admin, "acme", 0, 0).await;
    let channel = sched.channel().await;
    // An empty protobuf message is a valid encoding of every request type.
    let call = |path: String, token: Option<String>| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let mut req = tonic::Request::new(());
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            let path = PathAndQuery::try_from(path).unwrap();
            let codec = ProstCodec::<(), ()>::default();
            match tokio::time::timeout(Duration::from_secs(2), grpc.unary(req, path, codec)).await {
                Ok(Ok(_)) => None,
                Ok(Err(status)) => Some(status),
                // A session stream waiting for its hello: let in.
                Err(_) => None,
            }
        }
    };
    let tokens = [
        ("anonymous", None),
        ("bad token", Some("not-a-token".to_string())),
        ("tenant", Some(tenant_token)),
        ("admin", Some(ADMIN_TOKEN.to_string())),
        ("agent", Some("test-join-token".to_string())),
    ];
    let mut checked = 0;
    for (method, role) in TABLE {
        for (who, token) in &tokens {
            let status = call(format!("/gpupool.v1.{method}"), token.clone()).await;
            let code = status.as_ref().map(|s| s.code());
            let msg = status
                .as_ref()
                .map(|s| s.message().to_string())
                .unwrap_or_default();
            let allowed = match (role, *who) {
                (Role::Agent, "agent") => true,
                (Role::Agent, _) => false,
                (_, "anonymous" | "bad token" | "agent") => false,
                (Role::Admin, "tenant") => false,
                _ => true,
            };
            if allowed {
                let rejected = matches!(code, Some(Code::Unauthenticated))
                    || (matches!(code, Some(Code::PermissionDenied)) && msg.contains("admin only"));
                assert!(!rejected, "{method} as {who} must be let in: {status:?}");
            } else {
                let expected = if *who == "tenant" && *role == Role::Admin {
                    Code::PermissionDenied
                } else {
                    Code::Unauthenticated
                };
                assert_eq!(code, Some(expected), "{method} as {who}: {status:?}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, TABLE.len() * 5);
    assert_eq!(TABLE.len(), 39);
}

/// Bad input names the cause: an unknown kind number, a Basic
/// authorization header, a notebook's token used as an API token.
#[tokio::test]
async fn bad_input_names_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let mut spec = training(0, &["true"]);
    spec.kind = 99;
    let err = submit(&sched, spec).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unknown kind 99"), "{err:?}");
    for (header, want) in [
        (
            "Basic dXNlcjpwYXNz",
            "must be `Bearer <token>` (got a Basic one)",
        ),
        ("Bearer nbt_0123", "notebook's access token"),
    ] {
        let mut jobs = pb::job_service_client::JobServiceClient::new(sched.channel().await);
        let mut req = tonic::Request::new(pb::ListJobsRequest::default());
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let err = jobs.list_jobs(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains(want), "{header}: {err:?}");
    }
}
