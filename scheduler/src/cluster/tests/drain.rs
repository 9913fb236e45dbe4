//! Draining a node: what runs there moves off it, each kind by its rule
//! (see `cluster/drain.rs`).

use super::kinds::{cluster, current, end, run_all, spec, tick};
use super::*;

/// The node `job_id`'s first current instance runs on.
fn node_of(c: &Cluster, job_id: &str) -> String {
    current(c, job_id)[0].node_id.clone()
}

/// Instances still on a node (not ended).
fn instances_on(c: &Cluster, node_id: &str) -> usize {
    c.jobs
        .values()
        .flat_map(|j| j.instances.iter())
        .filter(|i| i.node_id == node_id && !i.state.is_terminal())
        .count()
}

/// Reports every instance Stopping Stopped.
fn confirm_stops(c: &mut Cluster, now: i64, out: &mut Outbox) {
    let stopping: Vec<Instance> = c
        .jobs
        .values()
        .flat_map(|j| j.instances.iter())
        .filter(|i| i.state == InstanceState::Stopping)
        .cloned()
        .collect();
    for inst in stopping {
        end(c, &inst, InstanceState::Stopped, 0, now, out);
    }
}

#[test]
fn a_drain_requeues_training_replaces_replicas_and_waits_for_notebooks() {
    let mut c = cluster(3, 2);
    let mut out = Outbox::new();
    let service = c
        .submit(
            &admin(),
            spec(JobKind::OnlineService, 2, &["serve"]),
            0,
            &mut out,
        )
        .unwrap();
    run_all(&mut c, &service.job_id, 5, &mut out);
    // The node to drain: one of the service's.
    let node = node_of(&c, &service.job_id);
    // A training job with a retry and a notebook, both on that node: the
    // other nodes are cordoned while they are placed.
    let others: Vec<String> = c
        .nodes()
        .map(|n| n.node_id.clone())
        .filter(|n| *n != node)
        .collect();
    for n in &others {
        c.set_cordon(n, true, 6, &mut out).unwrap();
    }
    let mut train = spec(JobKind::Training, 1, &["train"]);
    train.gpus = 1;
    train.max_retries = 1;
    let train = c.submit(&admin(), train, 7, &mut out).unwrap();
    let notebook = c
        .submit(
            &admin(),
            spec(JobKind::Notebook, 1, &["jupyter"]),
            8,
            &mut out,
        )
        .unwrap();
    run_all(&mut c, &train.job_id, 9, &mut out);
    run_all(&mut c, &notebook.job_id, 9, &mut out);
    assert_eq!(node_of(&c, &train.job_id), node);
    assert_eq!(node_of(&c, &notebook.job_id), node);
    for n in &others {
        c.set_cordon(n, false, 10, &mut out).unwrap();
    }

    let drained = c.drain_node(&node, None, false, 20, &mut out).unwrap();
    assert!(drained.cordoned && drained.drain.is_some());
    // The training run is stopped at once, then queued again without a
    // retry spent, and starts on another node.
    let t = c.job(&admin(), &train.job_id).unwrap();
    assert!(
        t.current().all(|i| i.state == InstanceState::Stopping),
        "{t:?}"
    );
    // The service keeps N-1 ready: one replica at a time.
    let s = c.job(&admin(), &service.job_id).unwrap();
    assert_eq!(s.current().filter(|i| i.ready).count(), 1, "{s:?}");
    confirm_stops(&mut c, 30, &mut out);
    let t = c.job(&admin(), &train.job_id).unwrap().clone();
    assert_eq!(t.state, JobState::Scheduled, "{}", t.reason);
    assert_eq!((t.retries, t.drains, t.spec.max_retries), (1, 1, 1));
    assert_ne!(
        node_of(&c, &train.job_id),
        node,
        "placed off the drained node"
    );
    tick(&mut c, 40, &mut out);
    run_all(&mut c, &service.job_id, 40, &mut out);
    run_all(&mut c, &train.job_id, 40, &mut out);
    tick(&mut c, 50, &mut out);
    let s = c.job(&admin(), &service.job_id).unwrap();
    assert!(
        s.current()
            .filter(|i| !i.replaced)
            .all(|i| i.node_id != node),
        "{s:?}"
    );
    assert_eq!(s.ready_replicas(), 2);
    // The notebook is still there: it waits for --force or the deadline.
    let nb = c.job(&admin(), &notebook.job_id).unwrap();
    assert_eq!(nb.state, JobState::Running);
    assert_eq!(instances_on(&c, &node), 1);
    c.drain_node(&node, None, true, 60, &mut out).unwrap();
    confirm_stops(&mut c, 70, &mut out);
    let nb = c.job(&admin(), &notebook.job_id).unwrap();
    assert_eq!(nb.state, JobState::Cancelled);
    assert!(nb.reason.contains("drained"), "{}", nb.reason);
    assert_eq!(instances_on(&c, &node), 0, "the node is empty");
    // It stays cordoned until uncordon, which ends the drain.
    tick(&mut c, 80, &mut out);
    assert!(c.node(&node).unwrap().cordoned);
    let n = c.set_cordon(&node, false, 90, &mut out).unwrap();
    assert!(!n.cordoned && n.drain.is_none());
}

#[test]
fn a_job_without_retries_is_stopped_only_at_the_deadline() {
    let mut c = cluster(2, 1);
    let mut out = Outbox::new();
    let mut train = spec(JobKind::Training, 1, &["train"]);
    train.gpus = 1;
    let train = c.submit(&admin(), train, 0, &mut out).unwrap();
    run_all(&mut c, &train.job_id, 5, &mut out);
    let node = node_of(&c, &train.job_id);
    c.drain_node(&node, Some(1_000), false, 10, &mut out)
        .unwrap();
    tick(&mut c, 500, &mut out);
    let t = c.job(&admin(), &train.job_id).unwrap();
    assert_eq!(t.state, JobState::Running, "left alone before the deadline");
    tick(&mut c, 1_000, &mut out);
    confirm_stops(&mut c, 1_010, &mut out);
    let t = c.job(&admin(), &train.job_id).unwrap();
    assert_eq!(t.state, JobState::Cancelled);
    assert_eq!(t.retries, 0);
    assert!(t.reason.contains("drained"), "{}", t.reason);
}

/// A node of a dedicated pool drains like any other, and what it moves off
/// stays in its pool: the requeued training run goes to the pool's other
/// node, never to the public one that is free.
#[test]
fn a_dedicated_pool_s_node_drains_into_its_own_pool() {
    use crate::domain::pool::{BillingMode, CreateRequest, PoolType};
    use crate::domain::tenant::Quota;
    let mut c = cluster(3, 2);
    let mut out = Outbox::new();
    let quota = Quota {
        max_dedicated_nodes: 2,
        max_gpus: 8,
        ..Default::default()
    };
    c.create_tenant(&admin(), "t", quota, 0).unwrap();
    let spec_name = c.nodes().next().unwrap().spec_name();
    let pool = c
        .create_pool(
            &Caller::tenant("t"),
            CreateRequest {
                pool_type: Some(PoolType::Train),
                name: "mine".into(),
                spec: spec_name,
                node_count: 2,
                billing_mode: Some(BillingMode::OnDemand),
                ..Default::default()
            },
            0,
            1,
        )
        .unwrap();
    let members: Vec<String> = c
        .nodes()
        .filter(|n| n.pool == pool.pool_id)
        .map(|n| n.node_id.clone())
        .collect();
    assert_eq!(members.len(), 2);
    tick(&mut c, 2, &mut out);
    let mut train = spec(JobKind::Training, 1, &["train"]);
    train.gpus = 2;
    train.max_retries = 1;
    train.pool = pool.pool_id.clone();
    let train = c.submit(&Caller::tenant("t"), train, 2, &mut out).unwrap();
    run_all(&mut c, &train.job_id, 3, &mut out);
    let node = node_of(&c, &train.job_id);
    assert!(members.contains(&node));

    c.drain_node(&node, None, false, 10, &mut out).unwrap();
    confirm_stops(&mut c, 20, &mut out);
    let t = c.job(&admin(), &train.job_id).unwrap();
    assert_eq!(t.state, JobState::Scheduled, "{}", t.reason);
    let moved = node_of(&c, &train.job_id);
    assert_ne!(moved, node, "placed off the drained node");
    assert!(
        members.contains(&moved),
        "left its pool for {moved} (pool nodes: {members:?})"
    );
    assert_eq!(t.pool_id, pool.pool_id);
}
