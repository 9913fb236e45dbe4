//! Instance networks on a cluster (R-POOL-1): a public job's instances get
//! addresses in the job's own network, rank 0's is MASTER_ADDR, the start
//! commands name the network's nodes, a node the network newly reaches is
//! announced to the others, and the addresses survive a reload.

use super::*;

fn cluster(dir: &std::path::Path, now: i64) -> Cluster {
    cluster_routed(dir, now, false)
}

fn cluster_routed(dir: &std::path::Path, now: i64, routed: bool) -> Cluster {
    let store = SqliteStore::open(&dir.join("t.db")).unwrap();
    let plan = crate::domain::network::Plan::new("10.144.0.0/12", 22).unwrap();
    let settings = Settings {
        networks: Some(plan.routed(routed)),
        ..settings()
    };
    Cluster::load(Box::new(store), settings, now).unwrap()
}

fn node(address: &str) -> Inventory {
    Inventory {
        address: address.into(),
        ..inventory(1)
    }
}

fn starts(out: &Outbox) -> Vec<(&str, &StartSpec)> {
    out.iter()
        .filter_map(|(n, cmd)| match cmd {
            AgentCommand::Start(s) => Some((n.as_str(), &**s)),
            _ => None,
        })
        .collect()
}

/// Nodes n1 and n2, and a 2-rank public job started on them: the start
/// commands.
fn gang_on_two_nodes(c: &mut Cluster) -> Outbox {
    c.register_node("n1", node("192.0.2.1"), 0).unwrap();
    c.register_node("n2", node("192.0.2.2"), 0).unwrap();
    let mut out = Outbox::new();
    submit_gang(c, &mut out);
    c.network_peers(&mut out);
    out
}

/// The peer lists `out` sends for network `vni`, by node.
fn peers_told(out: &Outbox, vni: u32) -> Vec<(&str, &Vec<String>)> {
    out.iter()
        .filter_map(|(n, c)| match c {
            AgentCommand::NetworkPeers { vni: v, peers, .. } if *v == vni => {
                Some((n.as_str(), peers))
            }
            _ => None,
        })
        .collect()
}

/// A 2-rank public job, submitted at 10.
fn submit_gang(c: &mut Cluster, out: &mut Outbox) -> Job {
    c.submit(
        &admin(),
        RawJobSpec {
            instances: 2,
            ..raw(1)
        },
        10,
        out,
    )
    .unwrap()
}

#[test]
fn r_pool_1_a_public_job_gets_a_network_of_its_own_across_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 0);
    for (n, a) in [
        ("n1", "192.0.2.1"),
        ("n2", "192.0.2.2"),
        ("n3", "192.0.2.3"),
    ] {
        c.register_node(n, node(a), 0).unwrap();
    }
    let mut out = Outbox::new();
    let gang = submit_gang(&mut c, &mut out);
    c.network_peers(&mut out);
    let s = starts(&out);
    assert_eq!(s.len(), 2);
    let a0 = s.iter().find(|(_, s)| s.rank == 0).unwrap().1;
    let a1 = s.iter().find(|(_, s)| s.rank == 1).unwrap().1;
    let (n0, n1) = (a0.attach.clone().unwrap(), a1.attach.clone().unwrap());
    assert_eq!(n0.name, format!("job/{}", gang.job_id));
    assert_eq!((n0.vni, n0.subnet.as_str()), (n1.vni, "10.144.0.0/22"));
    assert_ne!(n0.address, n1.address);
    assert_eq!(a1.env["MASTER_ADDR"], n0.address);
    let mut peers = n0.peers.clone();
    peers.sort();
    assert_eq!(peers.len(), 2);
    assert_eq!(n1.peers, n0.peers);
    // An overlay: no routes.
    assert!(!n0.routed && n0.routes.is_empty());
    assert_eq!(
        n0.hosts.get(&format!("1.{}", gang.job_id)),
        Some(&n1.address)
    );

    // Another job: another network, another subnet.
    out.clear();
    let other = c.submit(&admin(), raw(1), 20, &mut out).unwrap();
    c.network_peers(&mut out);
    let s = starts(&out);
    let n2 = s[0].1.attach.clone().unwrap();
    assert_eq!(n2.name, format!("job/{}", other.job_id));
    assert_eq!(n2.subnet, "10.144.4.0/22");
    assert_ne!(n2.vni, n0.vni);
    // A network reaching no new node sends no peer update.
    assert!(
        !out.iter()
            .any(|(_, c)| matches!(c, AgentCommand::NetworkPeers { .. }))
    );

    // The plan is persisted with the instances.
    drop(c);
    let c = cluster(dir.path(), 30);
    let job = c.job(&admin(), &gang.job_id).unwrap();
    let addrs: Vec<&str> = job
        .instances
        .iter()
        .filter_map(|i| i.net.as_ref().map(|n| n.address.as_str()))
        .collect();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.contains(&n0.address.as_str()) && addrs.contains(&n1.address.as_str()));
}

#[test]
fn networks_off_give_no_attachment() {
    let mut c = open_mem(0);
    c.register_node("n1", node("192.0.2.1"), 0).unwrap();
    let mut out = Outbox::new();
    c.submit(&admin(), raw(1), 10, &mut out).unwrap();
    c.network_peers(&mut out);
    assert!(starts(&out)[0].1.attach.is_none());
}

#[test]
fn an_agent_older_than_networks_gets_no_networked_instance() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 0);
    let me = AgentIdentity::Node {
        node_id: "old".into(),
        credential_sha256: "in-process:old".into(),
    };
    c.register_agent("old", node("192.0.2.9"), "0.1.0", &me, "in-process:old", 0)
        .unwrap();
    c.confirm_credential("old", &me, 0).unwrap();
    let mut out = Outbox::new();
    let job = c.submit(&admin(), raw(1), 10, &mut out).unwrap();
    assert!(starts(&out).is_empty(), "{out:?}");
    let job = c.job(&admin(), &job.job_id).unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert!(job.reason.contains("older than 0.2.0"), "{}", job.reason);
}

#[test]
fn a_replacement_s_siblings_are_told_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 0);
    for (n, a) in [("n1", "192.0.2.1"), ("n2", "192.0.2.2")] {
        c.register_node(n, node(a), 0).unwrap();
    }
    let mut out = Outbox::new();
    let gang = submit_gang(&mut c, &mut out);
    c.network_peers(&mut out);
    // Both start together: no sibling runs yet, none is told anything.
    assert!(
        !out.iter()
            .any(|(_, c)| matches!(c, AgentCommand::NetworkHosts { .. }))
    );
    let (node0, rank0) = starts(&out)
        .into_iter()
        .find(|(_, s)| s.rank == 0)
        .map(|(n, s)| (n.to_string(), s.instance_id.clone()))
        .unwrap();
    // Rank 1 started again (a replacement, with a new address).
    let mut again = starts(&out)
        .into_iter()
        .find(|(_, s)| s.rank == 1)
        .map(|(n, s)| (n.to_string(), s.clone()))
        .unwrap();
    again.1.instance_id = format!("{}-1-n1", gang.job_id);
    let name = format!("1.{}", gang.job_id);
    let attach = again.1.attach.as_mut().unwrap();
    attach.hosts.insert(name.clone(), "10.144.0.9".into());
    let mut out = vec![(again.0, AgentCommand::Start(Box::new(again.1)))];
    c.network_peers(&mut out);
    let told: Vec<_> = out
        .iter()
        .filter_map(|(n, c)| match c {
            AgentCommand::NetworkHosts { instance_id, hosts } => Some((n, instance_id, hosts)),
            _ => None,
        })
        .collect();
    assert_eq!(told.len(), 2, "{told:?}");
    let to_rank0 = told.iter().find(|t| *t.1 == rank0).expect("rank 0 told");
    assert_eq!(*to_rank0.0, node0);
    assert_eq!(to_rank0.2[&name], "10.144.0.9");
}

#[test]
fn a_lost_instance_s_address_is_held_while_its_node_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 0);
    let grace = settings().node_grace_ms;
    c.register_node("n1", node("192.0.2.1"), 0).unwrap();
    let mut out = Outbox::new();
    let job = c
        .submit(
            &admin(),
            RawJobSpec {
                max_retries: 1,
                ..raw(1)
            },
            10,
            &mut out,
        )
        .unwrap();
    let first = starts(&out)[0].1.attach.clone().unwrap().address;
    // n1 goes silent (it may still run the instance); n2 is there.
    c.register_node("n2", node("192.0.2.2"), grace).unwrap();
    out.clear();
    c.tick(grace + 10, &mut out);
    // The retry waits its backoff; n2 keeps beating.
    let mut now = grace + 10;
    while now < grace + 10 + 60_000 {
        now += grace / 2;
        c.heartbeat("n2", None, vec![], now, &mut out);
        c.tick(now, &mut out);
    }
    let job = c.job(&admin(), &job.job_id).unwrap();
    let retry = job
        .instances
        .iter()
        .find(|i| i.node_id == "n2")
        .expect("retried on n2");
    let again = &retry.net.as_ref().unwrap().address;
    assert_ne!(*again, first, "the lost instance's address was reused");

    // n1 comes back still running it: it is stopped, and its address stays
    // held until n1 says it ended.
    let lost = job
        .instances
        .iter()
        .find(|i| i.node_id == "n1")
        .unwrap()
        .instance_id
        .clone();
    let job_id = job.job_id.clone();
    let next = |c: &Cluster| {
        c.allocate_nets(&job_id, 1).unwrap().unwrap()[0]
            .address
            .clone()
    };
    out.clear();
    c.hello(
        "n1",
        vec![report(&lost, InstanceState::Running, None)],
        now + 10,
        &mut out,
    );
    assert!(out.iter().any(|(n, c)| n == "n1"
        && matches!(c, AgentCommand::Stop { instance_id, .. } if *instance_id == lost)));
    assert_ne!(next(&c), first, "held while n1 stops it");
    c.apply_report(
        "n1",
        report(&lost, InstanceState::Stopped, None),
        now + 20,
        &mut out,
    );
    assert_eq!(next(&c), first, "free once n1 said it ended");
    // And after a reload.
    drop(c);
    let c = cluster(dir.path(), now + 30);
    assert_eq!(next(&c), first);
}

#[test]
fn a_network_s_nodes_are_told_when_it_leaves_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 0);
    let grace = settings().node_grace_ms;
    let mut out = gang_on_two_nodes(&mut c);
    let vni = starts(&out)[0].1.attach.as_ref().unwrap().vni;
    // n2 goes away: its rank is lost, the network spans n1 only.
    out.clear();
    c.heartbeat("n1", None, vec![], grace, &mut out);
    c.tick(grace + 10, &mut out);
    assert_eq!(
        peers_told(&out, vni),
        [("n1", &vec!["192.0.2.1".to_string()])]
    );
    // Said once.
    out.clear();
    c.heartbeat("n1", None, vec![], grace + 20, &mut out);
    c.tick(grace + 30, &mut out);
    assert!(
        !out.iter()
            .any(|(_, c)| matches!(c, AgentCommand::NetworkPeers { .. }))
    );
}

#[test]
fn a_routed_network_s_starts_carry_each_instance_s_node_and_its_leaving_node_s_routes_go() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_routed(dir.path(), 0, true);
    let grace = settings().node_grace_ms;
    let mut out = gang_on_two_nodes(&mut c);
    let s = starts(&out);
    let on = |node: &str| {
        s.iter()
            .find(|(n, _)| *n == node)
            .unwrap()
            .1
            .attach
            .clone()
            .unwrap()
    };
    let (a1, a2) = (on("n1"), on("n2"));
    assert!(a1.routed && a2.routed);
    let want: BTreeMap<String, String> = [
        (a1.address.clone(), "192.0.2.1".to_string()),
        (a2.address.clone(), "192.0.2.2".to_string()),
    ]
    .into();
    assert_eq!((&a1.routes, &a2.routes), (&want, &want));
    // n2 goes away: n1 is told the routes of what is left, its own.
    out.clear();
    c.heartbeat("n1", None, vec![], grace, &mut out);
    c.tick(grace + 10, &mut out);
    let told: Vec<_> = out
        .iter()
        .filter_map(|(n, c)| match c {
            AgentCommand::NetworkPeers { routes, .. } => Some((n.as_str(), routes)),
            _ => None,
        })
        .collect();
    let left: BTreeMap<String, String> = [(a1.address.clone(), "192.0.2.1".to_string())].into();
    assert_eq!(told, [("n1", &left)]);
}

#[test]
fn a_network_leaving_a_node_is_pruned_after_a_scheduler_restart_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 0);
    let grace = settings().node_grace_ms;
    let mut out = gang_on_two_nodes(&mut c);
    let vni = starts(&out)[0].1.attach.as_ref().unwrap().vni;
    // The scheduler restarts; the agents come back, then n2 goes away.
    drop(c);
    let mut c = cluster(dir.path(), 10);
    c.register_node("n1", node("192.0.2.1"), 10).unwrap();
    c.register_node("n2", node("192.0.2.2"), 10).unwrap();
    out.clear();
    c.heartbeat("n1", None, vec![], grace, &mut out);
    c.tick(grace + 20, &mut out);
    assert_eq!(
        peers_told(&out, vni),
        [("n1", &vec!["192.0.2.1".to_string()])]
    );
}

#[test]
fn a_node_whose_session_opens_again_is_told_its_networks_peers_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster_routed(dir.path(), 0, true);
    let mut out = gang_on_two_nodes(&mut c);
    let s = starts(&out);
    let on_n1 = s.iter().find(|(n, _)| *n == "n1").unwrap().1;
    let attach = on_n1.attach.clone().unwrap();
    let reported = vec![report(&on_n1.instance_id, InstanceState::Running, None)];
    out.clear();
    c.hello("n1", reported, 100, &mut out);
    let told: Vec<_> = out
        .iter()
        .filter_map(|(n, c)| match c {
            AgentCommand::NetworkPeers { vni, peers, routes } => {
                Some((n.as_str(), *vni, peers, routes))
            }
            _ => None,
        })
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!((told[0].0, told[0].1), ("n1", attach.vni));
    assert_eq!(told[0].2.len(), 2);
    assert_eq!(told[0].3, &attach.routes);
}
