//! Control-plane trust, played as an attacker on one machine: a rogue agent
//! (this file's gRPC client, no real agent binary) holding first only a
//! tenant's API token, then the cluster join token, then another node's own
//! credential, tries to become an existing node, open its session, answer
//! its log requests and report its instances' states. Every attempt is
//! refused, the real node keeps its session and its jobs, and a tenant's
//! next job never reaches the rogue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpupool_e2e::*;
use gpupool_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Code;

const JOIN: &str = "test-join-token";

/// A rogue agent's client: sends these headers with every call.
fn rogue(
    channel: tonic::transport::Channel,
    bearer: Option<&str>,
    node_token: Option<&str>,
) -> pb::agent_service_client::AgentServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor + Clone + use<>,
    >,
> {
    let bearer = bearer.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    });
    let node = node_token.map(|t| t.parse::<tonic::metadata::MetadataValue<_>>().unwrap());
    pb::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            if let Some(b) = &bearer {
                req.metadata_mut().insert("authorization", b.clone());
            }
            if let Some(n) = &node {
                req.metadata_mut().insert("gpupool-node-token", n.clone());
            }
            Ok(req)
        },
    )
}

fn register(node_id: &str, cpu_cores: u32, memory_mib: u64) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node_id: node_id.into(),
        inventory: Some(pb::Inventory {
            hostname: format!("rogue-{node_id}"),
            cpu_cores,
            memory_mib,
            ..Default::default()
        }),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn hello(node_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::SessionHello {
            node_id: node_id.into(),
            instances: Vec::new(),
        })),
    }
}

/// Tries to open `node_id`'s session; returns the error code, or panics if
/// the scheduler let it in.
async fn session_refused<I>(
    client: &mut pb::agent_service_client::AgentServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, I>,
    >,
    node_id: &str,
) -> Code
where
    I: tonic::service::Interceptor + Clone,
{
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello(node_id)).await.unwrap();
    match client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(mut stream) => {
            // Refusal may come as the first message of the stream.
            match stream.get_mut().message().await {
                Err(status) => status.code(),
                Ok(m) => panic!("rogue opened the session of {node_id}: {m:?}"),
            }
        }
        Err(status) => status.code(),
    }
}

fn status_msg(instance_id: &str, state: pb::InstanceState) -> pb::InstanceStatus {
    pb::InstanceStatus {
        instance_id: instance_id.into(),
        state: state as i32,
        exit_code: Some(0),
        reason: "forged by the rogue".into(),
        ..Default::default()
    }
}

async fn job_logs(s: &Scheduler, token: &str, job_id: &str) -> String {
    let mut c = s.clients(Some(token)).await;
    let mut stream = c
        .jobs
        .get_job_logs(pb::GetJobLogsRequest {
            job_id: job_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.extend(chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn job_as(s: &Scheduler, token: &str, id: &str) -> pb::Job {
    s.clients(Some(token))
        .await
        .jobs
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_agent_cannot_become_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let real = Agent::start(dir.path(), &sched, "node-a", "2xH100-80GB");
    wait_ready(&sched, 1).await;
    let mut admin = sched.admin().await;
    let token_a = tenant_with_token(&mut admin, "team-a", 0, 0).await;
    let token_b = tenant_with_token(&mut admin, "team-b", 0, 0).await;

    // Tenant A's job runs on node-a, printing a line and holding its GPU.
    let mut spec = training(1, &["sh", "-c", "echo real-output; exec sleep 600"]);
    spec.env
        .insert("HF_TOKEN".into(), "hf-secret-of-team-a".into());
    let mut jobs_a = sched.clients(Some(&token_a)).await.jobs;
    let job1 = jobs_a
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner();
    let job1 = eventually(Duration::from_secs(20), "job 1 running", || async {
        let j = job_as(&sched, &token_a, &job1.job_id).await;
        (j.state == pb::JobState::Running as i32).then_some(j)
    })
    .await;
    let inst1 = job1.instances[0].instance_id.clone();
    assert_eq!(job1.instances[0].node_id, "node-a");

    // 1. With only tenant B's API token: no registration, no session.
    let mut r = rogue(sched.channel().await, Some(&token_b), None);
    let err = r
        .register(register("node-a", 64, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = r
        .register(register("node-new", 64, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        session_refused(&mut r, "node-a").await,
        Code::Unauthenticated
    );
    // The admin's token is no agent credential either.
    let mut r = rogue(sched.channel().await, Some(ADMIN_TOKEN), None);
    let err = r
        .register(register("node-a", 64, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // 2. With the cluster join token: node-a already has its own credential.
    let mut r = rogue(sched.channel().await, Some(JOIN), None);
    let err = r
        .register(register("node-a", 64, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("own credential"), "{err:?}");
    assert_eq!(
        session_refused(&mut r, "node-a").await,
        Code::Unauthenticated
    );

    // 3. With another node's own credential: the rogue enrols a node of its
    // own (no CPU, no memory: nothing can be placed there), then uses that
    // credential against node-a.
    let enrolled = r
        .register(register("rogue-b", 0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(enrolled.node_token.starts_with("gpn_"), "{enrolled:?}");
    let b_token = enrolled.node_token.clone();
    let mut r = rogue(sched.channel().await, Some(JOIN), Some(&b_token));
    let err = r
        .register(register("node-a", 64, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("rogue-b"), "{err:?}");
    assert_eq!(
        session_refused(&mut r, "node-a").await,
        Code::Unauthenticated
    );
    // A credential that is no credential, with no join token, is refused.
    let mut bad = rogue(sched.channel().await, None, Some("gpn_forged"));
    let err = bad
        .register(register("node-a", 64, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // On its own (legitimate) session as rogue-b it forges log answers for
    // every request id and reports node-a's instance as finished.
    let (tx, rx) = mpsc::channel(64);
    tx.send(hello("rogue-b")).await.unwrap();
    let mut inbound = r
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let seen: Arc<Mutex<Vec<String>>> = Default::default();
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                seen.lock().unwrap().push(format!("{m:?}"));
            }
        })
    };
    let forger = {
        let tx = tx.clone();
        let inst1 = inst1.clone();
        tokio::spawn(async move {
            for round in 0u64.. {
                for id in 1..=64u64 {
                    let chunk = pb::LogChunk {
                        request_id: round * 64 + id,
                        data: b"FORGED".to_vec(),
                        next_offset: 6,
                        error: String::new(),
                    };
                    let _ = tx
                        .send(pb::AgentMessage {
                            msg: Some(pb::agent_message::Msg::LogChunk(chunk)),
                        })
                        .await;
                }
                let _ = tx
                    .send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::InstanceUpdate(pb::InstanceUpdate {
                            status: Some(status_msg(&inst1, pb::InstanceState::Succeeded)),
                        })),
                    })
                    .await;
                let _ = tx
                    .send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                            instances: vec![status_msg(&inst1, pb::InstanceState::Failed)],
                            ..Default::default()
                        })),
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                if round > 200 {
                    break;
                }
            }
        })
    };
    // While it forges, tenant A reads its logs: the real node's answer only.
    for _ in 0..5 {
        let logs = job_logs(&sched, &token_a, &job1.job_id).await;
        assert!(logs.contains("real-output"), "{logs:?}");
        assert!(!logs.contains("FORGED"), "{logs:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let j = job_as(&sched, &token_a, &job1.job_id).await;
    assert_eq!(j.state, pb::JobState::Running as i32, "{j:#?}");

    // Tenant A's next job, with a secret, runs on the real node-a; nothing
    // of it reaches the rogue's session.
    let mut spec = training(
        1,
        &["sh", "-c", "echo second-$SECOND_SECRET; exec sleep 600"],
    );
    spec.env
        .insert("SECOND_SECRET".into(), "second-secret-of-team-a".into());
    let job2 = jobs_a
        .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner();
    eventually(Duration::from_secs(20), "job 2 output", || async {
        job_logs(&sched, &token_a, &job2.job_id)
            .await
            .contains("second-second-secret-of-team-a")
            .then_some(())
    })
    .await;
    let j2 = job_as(&sched, &token_a, &job2.job_id).await;
    assert_eq!(j2.instances[0].node_id, "node-a");
    forger.await.unwrap();
    for m in seen.lock().unwrap().iter() {
        assert!(
            !m.contains("secret-of-team-a") && !m.contains(&inst1),
            "the rogue received: {m}"
        );
    }

    // The real node kept its session throughout: Ready, job 1 still running.
    let nodes = list_nodes(&sched).await;
    let a = nodes.iter().find(|n| n.node_id == "node-a").unwrap();
    assert_eq!(a.status, pb::NodeStatus::Ready as i32);
    let j = job_as(&sched, &token_a, &job1.job_id).await;
    assert_eq!(j.state, pb::JobState::Running as i32, "{j:#?}");
    let log = sched.proc.log_text();
    assert!(
        !log.contains("replacing an older session of the node"),
        "a session was displaced:\n{log}"
    );
    let metrics = http_get(sched.metrics_port, "/metrics").await;
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gpupool_agent_auth_refused_total "))
        .expect("refusal counter")
        .parse()
        .unwrap();
    assert!(refused >= 5.0, "{refused}");

    // A tenant sees none of another tenant's instances on a shared node.
    let node_as = |token: String| {
        let sched = &sched;
        async move {
            sched
                .clients(Some(&token))
                .await
                .nodes
                .get_node(pb::GetNodeRequest {
                    node_id: "node-a".into(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let b_view = node_as(token_b.clone()).await;
    assert!(b_view.instance_ids.is_empty(), "{b_view:?}");
    let a_view = node_as(token_a.clone()).await;
    assert!(a_view.instance_ids.contains(&inst1), "{a_view:?}");

    // Revocation: a tenant may not; the admin's ends the rogue's session and
    // its credential; it cannot enrol again until readmitted.
    let out = sched.cli_as(&token_b, &["node", "revoke", "rogue-b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin"));
    let out = sched.cli(&["node", "revoke", "rogue-b"]);
    assert!(out.status.success(), "{out:?}");
    // Whatever it still sends on the old stream does not count, and the
    // scheduler closes the stream: the node stays NotReady, gets no work.
    for _ in 0..5 {
        let _ = tx
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
            })
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the revoked node's session ends")
        .unwrap();
    let b = list_nodes(&sched)
        .await
        .into_iter()
        .find(|n| n.node_id == "rogue-b")
        .unwrap();
    assert_eq!(b.status, pb::NodeStatus::NotReady as i32, "{b:?}");
    assert!(b.revoked);
    let err = r.register(register("rogue-b", 0, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");
    assert_eq!(
        session_refused(&mut r, "rogue-b").await,
        Code::PermissionDenied
    );
    let out = sched.cli(&["node", "get", "rogue-b"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Revoked"),
        "{out:?}"
    );
    let out = sched.cli(&["node", "readmit", "rogue-b"]);
    assert!(out.status.success(), "{out:?}");
    let again = r
        .register(register("rogue-b", 0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(again.node_token.starts_with("gpn_") && again.node_token != b_token);

    // A session opened before a revocation, whose hello comes after it,
    // is refused then: the credential is checked when the hello arrives.
    let mut r = rogue(sched.channel().await, Some(JOIN), Some(&again.node_token));
    let (tx, rx) = mpsc::channel(4);
    let pending = tokio::spawn(async move {
        r.session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|s| s.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = sched.cli(&["node", "revoke", "rogue-b"]);
    assert!(out.status.success(), "{out:?}");
    tx.send(hello("rogue-b")).await.unwrap();
    let code = match pending.await.unwrap() {
        Err(status) => status.code(),
        Ok(mut stream) => match stream.message().await {
            Err(status) => status.code(),
            Ok(m) => panic!("a session opened before its revocation got in: {m:?}"),
        },
    };
    assert_eq!(code, Code::PermissionDenied);

    // Through all of it the real node kept its one session and its job.
    let j = job_as(&sched, &token_a, &job1.job_id).await;
    assert_eq!(j.state, pb::JobState::Running as i32, "{j:#?}");
    let opened = real.proc.log_text().matches("session established").count();
    assert_eq!(opened, 1, "the real agent had to reconnect");
}

/// A node's credential survives an agent restart (kept 0600 in its state
/// dir); with it gone, the node cannot come back with the join token alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_its_credential_and_cannot_be_re_enrolled() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let agent = Agent::start(dir.path(), &sched, "node-k", "1xH100-80GB");
    wait_ready(&sched, 1).await;
    let cred = dir.path().join("agent-node-k/state/node-credential");
    let meta = std::fs::metadata(&cred).expect("credential kept");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&cred).unwrap();
    assert!(token.starts_with("gpn_"));
    let db = std::fs::read(dir.path().join("data/gpupool.db")).unwrap();
    assert!(
        !db.windows(token.len()).any(|w| w == token.as_bytes()),
        "the credential itself is stored"
    );

    // Restarted, it registers with the same credential.
    drop(agent);
    let agent = Agent::start(dir.path(), &sched, "node-k", "1xH100-80GB");
    eventually(Duration::from_secs(20), "session again", || async {
        agent
            .proc
            .log_text()
            .contains("session established")
            .then_some(())
    })
    .await;
    assert_eq!(std::fs::read_to_string(&cred).unwrap(), token);

    // Without it (a wiped disk, or a copy of the config on another
    // machine), the join token does not bring the node id back.
    drop(agent);
    std::fs::remove_file(&cred).unwrap();
    let agent = Agent::start(dir.path(), &sched, "node-k", "1xH100-80GB");
    eventually(Duration::from_secs(20), "refusal", || async {
        agent
            .proc
            .log_text()
            .contains("own credential")
            .then_some(())
    })
    .await;
    assert!(!agent.proc.log_text().contains("session established"));
}

/// The version-skew policy at registration: an agent newer than the
/// scheduler, or with no usable version, is refused with the policy's
/// words and enrols nothing; the scheduler's own release is let in.
#[tokio::test]
async fn registration_checks_the_version_skew_policy() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(dir.path()).await;
    let mut agent = rogue(sched.channel().await, Some(JOIN), None);
    let ours = env!("CARGO_PKG_VERSION");
    let (major, minor) = {
        let mut p = ours.split('.').map(|x| x.parse::<u64>().unwrap());
        (p.next().unwrap(), p.next().unwrap())
    };
    let newer = format!("{major}.{}.0", minor + 1);
    for (version, says) in [
        (newer.as_str(), "upgrade the scheduler first"),
        ("not-a-version", "MAJOR.MINOR.PATCH"),
    ] {
        let mut req = register("skewed", 8, 1024);
        req.agent_version = version.into();
        let err = agent.register(req).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{version}: {err:?}");
        assert!(err.message().contains(says), "{version}: {}", err.message());
    }
    assert!(
        list_nodes(&sched).await.is_empty(),
        "a refused agent enrolled"
    );
    let mut req = register("skewed", 8, 1024);
    req.agent_version = ours.into();
    agent.register(req).await.unwrap();
    assert_eq!(list_nodes(&sched).await.len(), 1);
}

/// Agents are rate-limited like other callers: every holder of the join
/// token shares one bucket (a leaked token enrols nodes at the limit's
/// pace), and each enrolled node's credential has its own, so a flood of
/// enrolments does not keep a real node from registering.
#[tokio::test]
async fn the_join_token_is_rate_limited_and_node_credentials_are_not_held_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let sched =
        Scheduler::start_with_config(dir.path(), "[limits]\nrequests_per_second = 1\nburst = 3\n")
            .await;
    let mut flood = rogue(sched.channel().await, Some(JOIN), None);
    let first = flood
        .register(register("real", 8, 1024))
        .await
        .unwrap()
        .into_inner();
    let mut refused = 0;
    for i in 0..20 {
        if let Err(e) = flood
            .register(register(&format!("flood-{i}"), 8, 1024))
            .await
        {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("(join token)"), "{}", e.message());
            refused += 1;
        }
    }
    assert!(refused >= 15, "only {refused} of 20 enrolments refused");
    assert!(list_nodes(&sched).await.len() <= 6);
    // The real node, with its own credential, still gets in.
    let mut real = rogue(sched.channel().await, Some(JOIN), Some(&first.node_token));
    real.register(register("real", 8, 1024)).await.unwrap();
}
