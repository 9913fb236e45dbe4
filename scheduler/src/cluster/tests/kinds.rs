//! The job kinds over the cluster state machine: service replicas,
//! batch completions, maximum run time, idle culling, TensorBoards.

use super::*;
use crate::cluster::kinds::BASE_BACKOFF_MS;

/// A cluster on the in-memory store with `nodes` nodes of `gpus` GPUs.
pub(super) fn cluster(nodes: usize, gpus: u32) -> Cluster {
    let mut c = open_mem(0);
    for i in 0..nodes {
        c.register_node(&format!("n{i}"), inventory(gpus), 0)
            .unwrap();
    }
    c
}

pub(super) fn spec(kind: JobKind, instances: i64, command: &[&str]) -> RawJobSpec {
    RawJobSpec {
        kind: Some(kind),
        instances,
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Reports every active instance of `job` Running (and ready) on its node.
pub(super) fn run_all(c: &mut Cluster, job_id: &str, now: i64, out: &mut Outbox) {
    let running: Vec<(String, String)> = c
        .job(&admin(), job_id)
        .unwrap()
        .current()
        .filter(|i| i.state == InstanceState::Scheduled || i.state == InstanceState::Running)
        .map(|i| (i.node_id.clone(), i.instance_id.clone()))
        .collect();
    for (node, id) in running {
        let mut r = report(&id, InstanceState::Running, None);
        r.ready = true;
        r.port = 31_000;
        c.heartbeat(&node, None, vec![r], now, out);
    }
}

/// Every node heartbeats, then the clock ticks.
pub(super) fn tick(c: &mut Cluster, now: i64, out: &mut Outbox) {
    let nodes: Vec<String> = c.nodes().map(|n| n.node_id.clone()).collect();
    for n in nodes {
        c.heartbeat(&n, None, vec![], now, out);
    }
    c.tick(now, out);
}

pub(super) fn current(c: &Cluster, job_id: &str) -> Vec<Instance> {
    c.job(&admin(), job_id)
        .unwrap()
        .current()
        .cloned()
        .collect()
}

pub(super) fn end(
    c: &mut Cluster,
    inst: &Instance,
    state: InstanceState,
    code: i32,
    now: i64,
    out: &mut Outbox,
) {
    c.heartbeat(
        &inst.node_id,
        None,
        vec![report(&inst.instance_id, state, Some(code))],
        now,
        out,
    );
}

#[test]
fn a_crashed_replica_is_restarted_after_its_backoff_on_another_node_when_it_can() {
    let mut c = cluster(3, 1);
    let mut out = Outbox::new();
    let job = c
        .submit(
            &admin(),
            spec(JobKind::OnlineService, 3, &["serve"]),
            0,
            &mut out,
        )
        .unwrap();
    let nodes: std::collections::BTreeSet<String> = current(&c, &job.job_id)
        .iter()
        .map(|i| i.node_id.clone())
        .collect();
    assert_eq!(nodes.len(), 3, "replicas spread over the nodes");
    run_all(&mut c, &job.job_id, 10, &mut out);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Running);
    let first = current(&c, &job.job_id)[1].clone();
    end(&mut c, &first, InstanceState::Failed, 1, 100, &mut out);
    // Still a running service; rank 1 waits for its backoff.
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.pending.len(), 1);
    assert_eq!(j.pending[0].not_before_ms, 100 + BASE_BACKOFF_MS);
    out.clear();
    tick(&mut c, 100 + BASE_BACKOFF_MS - 1, &mut out);
    assert!(
        !out.iter()
            .any(|(_, cmd)| matches!(cmd, AgentCommand::Start(_)))
    );
    tick(&mut c, 100 + BASE_BACKOFF_MS, &mut out);
    let started: Vec<&StartSpec> = out
        .iter()
        .filter_map(|(_, cmd)| match cmd {
            AgentCommand::Start(s) => Some(&**s),
            _ => None,
        })
        .collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].rank, 1);
    assert_eq!(started[0].instance_id, format!("{}-1-n1", job.job_id));
    assert!(started[0].needs_port);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.restarts, 1);
    assert_eq!(j.current().count(), 3);
    // A quick second crash doubles the wait.
    let again = current(&c, &job.job_id)
        .into_iter()
        .find(|i| i.rank == 1)
        .unwrap();
    run_all(&mut c, &job.job_id, 1_200, &mut out);
    end(&mut c, &again, InstanceState::Failed, 1, 1_300, &mut out);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.pending[0].not_before_ms, 1_300 + 2 * BASE_BACKOFF_MS);
}

#[test]
fn scaling_adds_and_stops_replicas_and_endpoints_are_the_ready_ones() {
    let mut c = cluster(2, 2);
    let mut out = Outbox::new();
    let job = c
        .submit(
            &admin(),
            spec(JobKind::OnlineService, 2, &["serve"]),
            0,
            &mut out,
        )
        .unwrap();
    run_all(&mut c, &job.job_id, 10, &mut out);
    c.scale_service(&admin(), &job.job_id, 4, 20, &mut out)
        .unwrap();
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.current().count(), 4, "{}", j.reason);
    run_all(&mut c, &job.job_id, 30, &mut out);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.current().filter(|i| i.ready).count(), 4);
    assert!(
        j.current()
            .all(|i| i.endpoint().is_some_and(|e| e.ends_with(":31000")))
    );
    out.clear();
    c.scale_service(&admin(), &job.job_id, 1, 40, &mut out)
        .unwrap();
    let stops = out
        .iter()
        .filter(|(_, cmd)| matches!(cmd, AgentCommand::Stop { .. }))
        .count();
    assert_eq!(stops, 3);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.current().map(|i| i.rank).collect::<Vec<_>>(), [0]);
    assert!(matches!(
        c.scale_service(&admin(), &job.job_id, 0, 50, &mut out),
        Err(ClusterError::ReplicasOutOfRange { replicas: 0, .. })
    ));
    let training = c.submit(&admin(), raw(0), 60, &mut out).unwrap();
    assert!(matches!(
        c.scale_service(&admin(), &training.job_id, 2, 60, &mut out),
        Err(ClusterError::NotAnOnlineService { .. })
    ));
}

#[test]
fn a_rolling_restart_replaces_one_replica_at_a_time() {
    let mut c = cluster(3, 1);
    let mut out = Outbox::new();
    let job = c
        .submit(
            &admin(),
            spec(JobKind::OnlineService, 3, &["serve"]),
            0,
            &mut out,
        )
        .unwrap();
    run_all(&mut c, &job.job_id, 10, &mut out);
    let before: Vec<String> = current(&c, &job.job_id)
        .iter()
        .map(|i| i.instance_id.clone())
        .collect();
    c.restart_service(&admin(), &job.job_id, 20, &mut out)
        .unwrap();
    let mut now = 20;
    for round in 0..3 {
        let j = c.job(&admin(), &job.job_id).unwrap();
        let ready = j.current().filter(|i| i.ready).count();
        assert_eq!(ready, 2, "round {round}: exactly one replica is down");
        // The old one confirms its stop; the new one comes up ready.
        let stopping: Vec<Instance> = j
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Stopping)
            .cloned()
            .collect();
        assert_eq!(stopping.len(), 1);
        now += 10;
        end(
            &mut c,
            &stopping[0],
            InstanceState::Stopped,
            0,
            now,
            &mut out,
        );
        tick(&mut c, now, &mut out);
        run_all(&mut c, &job.job_id, now, &mut out);
        tick(&mut c, now, &mut out);
    }
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert!(j.rollout.is_empty());
    let after: Vec<String> = j.current().map(|i| i.instance_id.clone()).collect();
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|id| !before.contains(id)), "{after:?}");
    assert_eq!(j.current().filter(|i| i.ready).count(), 3);
}

#[test]
fn a_batch_service_runs_its_parallelism_until_its_completions_succeed() {
    let mut c = cluster(1, 0);
    let mut out = Outbox::new();
    let mut raw = spec(JobKind::BatchService, 2, &["work"]);
    raw.completions = 5;
    raw.max_retries = 1;
    let job = c.submit(&admin(), raw, 0, &mut out).unwrap();
    let mut now = 0;
    let mut failed_once = false;
    for _ in 0..20 {
        let running = current(&c, &job.job_id)
            .into_iter()
            .filter(|i| !i.state.is_terminal())
            .collect::<Vec<_>>();
        if running.is_empty() {
            break;
        }
        assert!(running.len() <= 2, "parallelism 2: {running:?}");
        now += 10;
        for inst in running {
            if inst.rank == 3 && !failed_once {
                failed_once = true;
                end(&mut c, &inst, InstanceState::Failed, 1, now, &mut out);
            } else {
                end(&mut c, &inst, InstanceState::Succeeded, 0, now, &mut out);
            }
        }
        tick(&mut c, now + 10_000, &mut out);
    }
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{}", j.reason);
    let mut ranks: Vec<u32> = j
        .current()
        .filter(|i| i.state == InstanceState::Succeeded)
        .map(|i| i.rank)
        .collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2, 3, 4]);
    assert_eq!(j.restarts, 1, "completion 3 was retried once");

    // With no retries left, a failure fails the job and stops the rest.
    let mut raw = spec(JobKind::BatchService, 2, &["work"]);
    raw.completions = 4;
    let job = c.submit(&admin(), raw, now, &mut out).unwrap();
    let insts = current(&c, &job.job_id);
    out.clear();
    end(
        &mut c,
        &insts[0],
        InstanceState::Failed,
        3,
        now + 1,
        &mut out,
    );
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.reason.contains("instance 0 failed"), "{}", j.reason);
    assert!(out.iter().any(|(_, cmd)| matches!(
        cmd,
        AgentCommand::Stop { instance_id, .. } if *instance_id == insts[1].instance_id
    )));
}

/// Retries are counted when decided: eight completions failing at once
/// with one retry allowed retry once, then the job fails.
#[test]
fn batch_retries_are_counted_when_decided() {
    let mut c = cluster(1, 0);
    let mut out = Outbox::new();
    let mut raw = spec(JobKind::BatchService, 8, &["work"]);
    raw.max_retries = 1;
    let job = c.submit(&admin(), raw, 0, &mut out).unwrap();
    for inst in current(&c, &job.job_id) {
        end(&mut c, &inst, InstanceState::Failed, 1, 10, &mut out);
    }
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Failed, "{}", j.reason);
    assert_eq!(j.failures, 1);
    assert!(j.reason.contains("all 1 retries used"), "{}", j.reason);
    tick(&mut c, 60_000, &mut out);
    assert!(c.job(&admin(), &job.job_id).unwrap().restarts <= 1);
}

#[test]
fn a_job_past_its_maximum_run_time_is_stopped_as_timed_out() {
    let mut c = cluster(1, 1);
    let mut out = Outbox::new();
    let mut raw = raw(1);
    raw.max_runtime_secs = 5;
    let job = c.submit(&admin(), raw, 0, &mut out).unwrap();
    run_all(&mut c, &job.job_id, 1_000, &mut out);
    tick(&mut c, 5_999, &mut out);
    assert_eq!(
        c.job(&admin(), &job.job_id).unwrap().state,
        JobState::Running
    );
    out.clear();
    tick(&mut c, 6_000, &mut out);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.reason.contains("timeout"), "{}", j.reason);
    assert!(
        out.iter()
            .any(|(_, cmd)| matches!(cmd, AgentCommand::Stop { .. }))
    );
}

#[test]
fn an_idle_notebook_is_culled_but_not_while_its_kernel_or_gpu_is_busy() {
    let mut c = cluster(1, 1);
    let mut out = Outbox::new();
    let mut raw = spec(JobKind::Notebook, 1, &[]);
    raw.idle_timeout_secs = 10;
    let job = c.submit(&admin(), raw, 0, &mut out).unwrap();
    // The kind's defaults: JupyterLab, a quarter GPU, a token.
    assert_eq!(job.spec.command[0], "jupyter");
    assert_eq!(job.spec.resources.gpu_milli, 250);
    assert!(job.access_token.len() >= 32);
    let inst = current(&c, &job.job_id)[0].clone();
    let seen = |idle: u64, now: i64, c: &mut Cluster, out: &mut Outbox| {
        let mut r = report(&inst.instance_id, InstanceState::Running, None);
        r.port = 31_000;
        r.idle_ms = Some(idle);
        c.heartbeat(&inst.node_id, None, vec![r], now, out);
    };
    seen(0, 1_000, &mut c, &mut out);
    let url = c.job(&admin(), &job.job_id).unwrap().url().unwrap();
    assert_eq!(url, format!("http://h:31000/?token={}", job.access_token));
    // Kernel activity at 8 s keeps it alive past 11 s.
    seen(0, 8_000, &mut c, &mut out);
    tick(&mut c, 12_000, &mut out);
    assert_eq!(
        c.job(&admin(), &job.job_id).unwrap().state,
        JobState::Running
    );
    // GPU use at 15 s (40% >= the 5% threshold) keeps it alive past 18 s.
    c.record_gpu_samples(&inst.node_id, &[(0, 40)], 15_000);
    seen(7_000, 15_000, &mut c, &mut out);
    tick(&mut c, 20_000, &mut out);
    assert_eq!(
        c.job(&admin(), &job.job_id).unwrap().state,
        JobState::Running
    );
    // A GPU under the threshold is idle: culled 10 s after the last use.
    c.record_gpu_samples(&inst.node_id, &[(0, 2)], 21_000);
    seen(13_000, 21_000, &mut c, &mut out);
    tick(&mut c, 24_999, &mut out);
    assert_eq!(
        c.job(&admin(), &job.job_id).unwrap().state,
        JobState::Running
    );
    tick(&mut c, 25_000, &mut out);
    let j = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert!(
        j.reason.starts_with("culled: idle for 10 s"),
        "{}",
        j.reason
    );
    assert!(
        j.reason.contains("GPU utilization under 5%"),
        "{}",
        j.reason
    );
    assert!(j.url().is_none());
}

#[test]
fn a_tensorboard_for_a_job_uses_its_log_dir_and_pool_rules() {
    let mut c = cluster(1, 1);
    let mut out = Outbox::new();
    let mut train = raw(0);
    train.log_dir = "/shared/run1".into();
    let train = c.submit(&admin(), train, 0, &mut out).unwrap();
    let tb = RawJobSpec {
        kind: Some(JobKind::Tensorboard),
        instances: 1,
        for_job: train.job_id.clone(),
        ..Default::default()
    };
    let tb = c.submit(&admin(), tb, 1, &mut out).unwrap();
    assert_eq!(tb.spec.log_dir, "/shared/run1");
    assert_eq!(tb.spec.command[0], "tensorboard");
    assert_eq!(tb.spec.resources.gpus + tb.spec.resources.gpu_milli, 0);
    let start = out
        .iter()
        .find_map(|(_, cmd)| match cmd {
            AgentCommand::Start(s) if s.job_id == tb.job_id => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(start.env["GPUPOOL_LOG_DIR"], "/shared/run1");
    assert!(start.watch_activity && start.needs_port);
    // No log dir anywhere: refused with a clear error.
    let bare = c.submit(&admin(), raw(0), 2, &mut out).unwrap();
    let err = c
        .submit(
            &admin(),
            RawJobSpec {
                kind: Some(JobKind::Tensorboard),
                instances: 1,
                for_job: bare.job_id,
                ..Default::default()
            },
            3,
            &mut out,
        )
        .unwrap_err();
    assert!(err.to_string().contains("log directory"), "{err}");
}

#[test]
fn kind_settings_give_defaults_and_limits() {
    let mut c = cluster(1, 1);
    c.settings.kinds.training.max_runtime_limit_secs = 3_600;
    c.settings.kinds.training.memory_mib = 2_048;
    let mut out = Outbox::new();
    let job = c.submit(&admin(), raw(0), 0, &mut out).unwrap();
    assert_eq!(job.spec.max_runtime_secs, 3_600, "the limit is the default");
    assert_eq!(job.spec.resources.memory_mib, 2_048);
    let mut long = raw(0);
    long.max_runtime_secs = 7_200;
    let err = c.submit(&admin(), long, 0, &mut out).unwrap_err();
    assert!(
        err.to_string().contains("exceeds the training limit"),
        "{err}"
    );
    let mut two = spec(JobKind::Notebook, 2, &[]);
    two.cpu_only = true;
    let err = c.submit(&admin(), two, 0, &mut out).unwrap_err();
    assert!(err.to_string().contains("exactly one instance"), "{err}");
    let mut cpu = spec(JobKind::Notebook, 1, &[]);
    cpu.cpu_only = true;
    let nb = c.submit(&admin(), cpu, 0, &mut out).unwrap();
    assert_eq!(nb.spec.resources.gpu_demand_milli(), 0);
}

/// The placer kept between scheduling passes always holds exactly what a
/// fresh one built from the cluster would: random submissions, instance
/// ends, cordons, ticks, and nodes falling silent and coming back.
#[test]
fn the_cached_placer_matches_a_fresh_one_after_every_operation() {
    let mut c = cluster(4, 4);
    let mut out = Outbox::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut now = 10;
    for step in 0..400 {
        now += 10;
        match rnd(8) {
            0..=2 => {
                let mut raw = raw(rnd(3) as i64);
                if raw.gpus == 0 && rnd(2) == 0 {
                    raw.gpu_milli = 250;
                }
                raw.instances = 1 + rnd(2) as i64;
                let _ = c.submit(&admin(), raw, now, &mut out);
            }
            3 => {
                let live: Vec<Instance> = c
                    .jobs()
                    .flat_map(|j| j.instances.iter())
                    .filter(|i| !i.state.is_terminal())
                    .cloned()
                    .collect();
                if !live.is_empty() {
                    let inst = &live[rnd(live.len() as u64) as usize];
                    let state = if rnd(2) == 0 {
                        InstanceState::Succeeded
                    } else {
                        InstanceState::Running
                    };
                    c.heartbeat(
                        &inst.node_id,
                        None,
                        vec![report(&inst.instance_id, state, Some(0))],
                        now,
                        &mut out,
                    );
                }
            }
            4 => {
                let node = format!("n{}", rnd(4));
                let cordon = rnd(3) == 0;
                c.set_cordon(&node, cordon, now, &mut out).unwrap();
            }
            5 => tick(&mut c, now, &mut out),
            6 => {
                // An agent reconnects reporting only some of what it runs:
                // the rest is lost (and its resources freed).
                let node = format!("n{}", rnd(4));
                let live: Vec<String> = c
                    .jobs()
                    .flat_map(|j| j.instances.iter())
                    .filter(|i| i.node_id == node && !i.state.is_terminal())
                    .map(|i| i.instance_id.clone())
                    .collect();
                // The first reported one has ended (a scheduling pass runs
                // mid-hello), the others run.
                let reported = live
                    .iter()
                    .take(live.len().div_ceil(2))
                    .enumerate()
                    .map(|(k, id)| {
                        if k == 0 {
                            report(id, InstanceState::Succeeded, Some(0))
                        } else {
                            report(id, InstanceState::Running, None)
                        }
                    })
                    .collect();
                c.hello(&node, reported, now, &mut out);
            }
            _ => {
                // One node falls silent past the grace (NotReady, its
                // instances lost), the others keep heartbeating; later it
                // comes back.
                let silent = format!("n{}", rnd(4));
                now += 1_500;
                let others: Vec<String> = c
                    .nodes()
                    .map(|n| n.node_id.clone())
                    .filter(|n| *n != silent)
                    .collect();
                for n in others {
                    c.heartbeat(&n, None, vec![], now, &mut out);
                }
                c.tick(now, &mut out);
                if let Some(placer) = &c.placer {
                    assert_eq!(placer.nodes(), &c.capacity()[..], "step {step} (silent)");
                }
                c.hello(&silent, vec![], now + 1, &mut out);
            }
        }
        if let Some(placer) = &c.placer {
            assert_eq!(placer.nodes(), &c.capacity()[..], "step {step}");
        }
    }
}

/// A submission whose single write fails leaves nothing behind: no job, no
/// Start sent, its GPU free again; the next one takes its id and the GPU.
#[test]
fn a_submission_whose_write_fails_is_undone_placement_included() {
    let dir = tempfile::tempdir().unwrap();
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = crate::store::FailingStore {
        inner: std::sync::Arc::new(
            crate::store::SqliteStore::open(&dir.path().join("t.db")).unwrap(),
        ),
        fail: fail.clone(),
    };
    let mut c = Cluster::load(Box::new(store), settings(), 0).unwrap();
    c.register_node("n1", inventory(1), 0).unwrap();
    let mut out = Outbox::new();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = c.submit(&admin(), raw(1), 1, &mut out).unwrap_err();
    assert!(matches!(err, ClusterError::Store(_)), "{err}");
    assert_eq!(c.jobs().count(), 0);
    assert!(out.is_empty(), "{out:?}");
    if let Some(placer) = &c.placer {
        assert_eq!(placer.nodes(), &c.capacity()[..]);
    }
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let job = c.submit(&admin(), raw(1), 2, &mut out).unwrap();
    assert_eq!(job.job_id, "j-000001");
    assert_eq!(job.state, JobState::Scheduled);
    assert!(matches!(&out[..], [(_, AgentCommand::Start(s))] if s.job_id == "j-000001"));
    // Written once, placed: a reload has it with its instance.
    drop(c);
    let c = open(dir.path(), 3);
    let j = c.job(&admin(), "j-000001").unwrap();
    assert_eq!(j.instances.len(), 1);
}

/// The zones a replacement may prefer: those holding the fewest siblings.
#[test]
fn replacements_prefer_the_zones_with_the_fewest_siblings() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), 0);
    for (i, az) in ["AZ1", "AZ1", "AZ2", "AZ2", "AZ3"].iter().enumerate() {
        let inv = Inventory {
            az: az.to_string(),
            ..inventory(0)
        };
        c.register_node(&format!("n{i}"), inv, 0).unwrap();
    }
    let none = vec![false; 5];
    let taken = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Siblings in AZ1 and AZ2: AZ3 is preferred.
    assert_eq!(
        crate::domain::scheduling::fewest_siblings_zones(
            &c.capacity(),
            "public",
            &taken(&["n0", "n2"]),
            &none
        ),
        Some(vec![true, true, true, true, false])
    );
    // One in AZ1: AZ2 and AZ3 are, and the given mask is kept.
    let mut mask = none.clone();
    mask[3] = true;
    assert_eq!(
        crate::domain::scheduling::fewest_siblings_zones(
            &c.capacity(),
            "public",
            &taken(&["n0"]),
            &mask
        ),
        Some(vec![true, true, false, true, false])
    );
    // One in each zone: nothing to prefer.
    assert_eq!(
        crate::domain::scheduling::fewest_siblings_zones(
            &c.capacity(),
            "public",
            &taken(&["n0", "n2", "n4"]),
            &none
        ),
        None
    );
}

/// A replacement replica goes to the zone with the fewest siblings.
#[test]
fn a_replacement_replica_prefers_the_zone_its_service_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), 0);
    for (i, az) in ["AZ1", "AZ1", "AZ1", "AZ1", "AZ2", "AZ2"]
        .iter()
        .enumerate()
    {
        let inv = Inventory {
            az: az.to_string(),
            ..inventory(0)
        };
        c.register_node(&format!("n{i}"), inv, 0).unwrap();
    }
    let zone = |c: &Cluster, node: &str| c.node(node).unwrap().inventory.az.clone();
    let mut out = Outbox::new();
    for s in 0..4 {
        let job = c
            .submit(
                &admin(),
                spec(JobKind::OnlineService, 2, &["serve"]),
                s,
                &mut out,
            )
            .unwrap();
        run_all(&mut c, &job.job_id, s + 1, &mut out);
        let replicas = current(&c, &job.job_id);
        let zones: std::collections::BTreeSet<String> =
            replicas.iter().map(|i| zone(&c, &i.node_id)).collect();
        assert_eq!(zones.len(), 2, "first placement spreads over zones");
        let in_az2 = replicas
            .iter()
            .find(|i| zone(&c, &i.node_id) == "AZ2")
            .unwrap()
            .clone();
        // Its node is cordoned: the other AZ2 node is the zone's only room.
        c.set_cordon(&in_az2.node_id, true, s + 2, &mut out)
            .unwrap();
        end(&mut c, &in_az2, InstanceState::Failed, 1, s + 2, &mut out);
        tick(&mut c, s + 2 + BASE_BACKOFF_MS, &mut out);
        c.set_cordon(&in_az2.node_id, false, s + 3 + BASE_BACKOFF_MS, &mut out)
            .unwrap();
        let again = current(&c, &job.job_id)
            .into_iter()
            .find(|i| i.rank == in_az2.rank)
            .unwrap();
        assert_ne!(again.instance_id, in_az2.instance_id);
        assert_eq!(zone(&c, &again.node_id), "AZ2", "service {s}");
    }
}

/// A notebook's token is in no row of the store; after a restart the same
/// token comes back (derived from the key and the job id); another key is
/// refused.
#[test]
fn notebook_tokens_are_not_stored_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), 0);
    c.register_node("n0", inventory(1), 0).unwrap();
    let mut out = Outbox::new();
    let job = c
        .submit(&admin(), spec(JobKind::Notebook, 1, &[]), 0, &mut out)
        .unwrap();
    assert!(job.access_token.starts_with("nbt_") && job.access_token.len() == 68);
    // The Start carries it to the agent.
    assert!(out.iter().any(|(_, cmd)| matches!(cmd,
        AgentCommand::Start(s) if s.env.get("JUPYTER_TOKEN") == Some(&job.access_token))));
    drop(c);
    let db = std::fs::read(dir.path().join("t.db")).unwrap();
    let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes
                .windows(job.access_token.len())
                .any(|w| w == job.access_token.as_bytes()),
            "the token is stored"
        );
    }
    let again = open(dir.path(), 10);
    assert_eq!(
        again.job(&admin(), &job.job_id).unwrap().access_token,
        job.access_token
    );
    drop(again);
    let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
    let other = Settings {
        token_key: SecretKey(vec![9; 32]),
        ..settings()
    };
    // Another key would derive other tokens, which the running notebook
    // does not accept: the scheduler refuses to load with it.
    let Err(err) = Cluster::load(Box::new(store), other.clone(), 10) else {
        panic!("loaded with another key");
    };
    assert!(matches!(err, StoreError::SecretKeyMismatch), "{err}");
    assert!(err.to_string().contains("secret_key_file"), "{err}");
    assert_ne!(
        other.token_key.notebook_token(&job.job_id),
        job.access_token
    );
}
