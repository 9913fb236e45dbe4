//! Instance networks: addresses for new instances from the plan
//! ([`crate::domain::network`]), and the VXLAN peers of each network sent
//! to the agents that build it.

use std::collections::{BTreeMap, BTreeSet};

use super::{AgentCommand, Cluster, Outbox};
use crate::domain::network::{self, InstanceNet, PlanError};
use crate::domain::pool::Network;

impl Cluster {
    /// Attachments for `count` new instances of `job_id`: None when the
    /// job joins no network (networks off, a custom network, `--network
    /// host|none`).
    pub(super) fn allocate_nets(
        &self,
        job_id: &str,
        count: usize,
    ) -> Option<Result<Vec<InstanceNet>, PlanError>> {
        let plan = self.settings.networks?;
        let job = self.jobs.get(job_id)?;
        let pool = self.pools.get(&job.pool_id);
        // Held: the addresses of live instances, and of those lost on a
        // node whose agent has not said it no longer runs them (their
        // namespace may still be on the network's bridge there, also
        // while a node that came back stops them).
        let live = || {
            self.jobs
                .values()
                .flat_map(|j| j.instances.iter())
                .filter(|i| {
                    !i.state.is_terminal()
                        || (i.state == crate::domain::InstanceState::Lost
                            && i.net.as_ref().is_some_and(|n| !n.released)
                            && self.nodes.contains_key(&i.node_id))
                })
                .filter_map(|i| i.net.as_ref())
        };
        if let Some(Network::Custom {
            subnet_id,
            security_group_ids,
            ..
        }) = pool.and_then(|p| p.network.as_ref())
            && job.spec.network.is_empty()
        {
            return Some(self.settings.custom_networks.allocate(
                subnet_id,
                security_group_ids,
                count,
                live(),
            ));
        }
        let name = network::network_of(
            pool.map(|p| p.pool_type),
            pool.is_some_and(|p| matches!(p.network, Some(Network::Custom { .. }))),
            &job.tenant,
            &job.job_id,
            &job.spec.network,
        )?;
        let no_egress = pool.is_some_and(|p| p.no_egress);
        Some(plan.allocate(&name, count, live()).map(|nets| {
            nets.into_iter()
                .map(|n| InstanceNet { no_egress, ..n })
                .collect()
        }))
    }

    /// Sends the running instances of every job with an instance being
    /// started their job's new names: a replacement's address is not the
    /// one of the instance it replaces (which may still be stopping).
    fn network_hosts(&self, out: &mut Outbox) {
        let mut starting: BTreeMap<&str, (BTreeSet<&str>, &BTreeMap<String, String>)> =
            BTreeMap::new();
        for (_, cmd) in out.iter() {
            if let AgentCommand::Start(s) = cmd
                && let Some(a) = &s.attach
            {
                starting
                    .entry(s.job_id.as_str())
                    .or_insert_with(|| (BTreeSet::new(), &a.hosts))
                    .0
                    .insert(s.instance_id.as_str());
            }
        }
        let mut updates = Vec::new();
        for (job_id, (ids, hosts)) in &starting {
            let Some(job) = self.jobs.get(*job_id) else {
                continue;
            };
            for inst in job.current().filter(|i| {
                i.net.is_some() && !i.state.is_terminal() && !ids.contains(i.instance_id.as_str())
            }) {
                updates.push((
                    inst.node_id.clone(),
                    AgentCommand::NetworkHosts {
                        instance_id: inst.instance_id.clone(),
                        hosts: (*hosts).clone(),
                    },
                ));
            }
        }
        out.extend(updates);
    }

    /// A node among `placed` whose agent cannot build networks.
    pub(super) fn old_agent_among(
        &self,
        placed: &[(u32, crate::domain::placement::Assignment)],
    ) -> Option<String> {
        placed
            .iter()
            .map(|(_, a)| &a.node_id)
            .find(|n| {
                self.nodes
                    .get(*n)
                    .is_none_or(|n| !network::agent_builds_networks(&n.agent_version))
            })
            .cloned()
    }

    /// Fills in the VXLAN peers (the addresses of the nodes with a live
    /// instance of the network) of every start command in `out`, and sends
    /// the new peer list to the network's other nodes when a start brings
    /// it to a node it did not span. Stale peers (nodes whose instances
    /// ended) go with the next change: flooding to them is harmless. A
    /// routed network's starts carry its routes (every live instance's
    /// address and node), and its other nodes get them at every start.
    pub fn network_peers(&mut self, out: &mut Outbox) {
        let Some(plan) = self.settings.networks else {
            return;
        };
        self.network_hosts(out);
        // network name -> (vni, instance ids being started)
        let mut starting: BTreeMap<String, (u32, BTreeSet<String>)> = BTreeMap::new();
        for (_, cmd) in out.iter() {
            if let AgentCommand::Start(s) = cmd
                && let Some(a) = &s.attach
                && a.vpc.is_empty()
            {
                starting
                    .entry(a.name.clone())
                    .or_insert_with(|| (a.vni, BTreeSet::new()))
                    .1
                    .insert(s.instance_id.clone());
            }
        }
        if starting.is_empty() {
            return;
        }
        let spans = self.spans_of(|name| starting.contains_key(name));
        let mut updates = Vec::new();
        let mut told = Vec::new();
        for (name, span) in &spans {
            let (vni, ids) = &starting[name.as_str()];
            let vni = *vni;
            // Those it spanned before: the nodes of its other instances.
            let before: BTreeSet<&String> = span
                .members
                .iter()
                .filter(|(id, _)| !ids.contains(id))
                .map(|(_, node)| node)
                .collect();
            told.push((name.to_string(), (vni, span.nodes.clone())));
            let peers = self.addresses(&span.nodes);
            let routes = span.routes_if(plan.is_routed);
            for (_, cmd) in out.iter_mut() {
                if let AgentCommand::Start(s) = cmd
                    && let Some(a) = &mut s.attach
                    && a.name == *name
                {
                    a.peers = peers.clone();
                    a.routed = plan.is_routed;
                    a.routes = routes.clone();
                }
            }
            if span.nodes.len() > before.len() || plan.is_routed {
                for node in before {
                    updates.push((
                        node.clone(),
                        AgentCommand::NetworkPeers {
                            vni,
                            peers: peers.clone(),
                            routes: routes.clone(),
                        },
                    ));
                }
            }
        }
        // The nodes already in the network learn of the new ones first.
        out.splice(0..0, updates);
        self.net_spans.extend(told);
    }

    /// The live instances of the networks `wanted` names: their nodes,
    /// and (address → node address) of each.
    fn spans_of(&self, wanted: impl Fn(&str) -> bool) -> BTreeMap<String, Span> {
        let mut spans: BTreeMap<String, Span> = BTreeMap::new();
        for job in self.jobs.values() {
            for inst in job.instances.iter().filter(|i| !i.state.is_terminal()) {
                let Some(net) = &inst.net else { continue };
                if !net.vpc.is_empty() || !wanted(&net.name) {
                    continue;
                }
                let span = spans.entry(net.name.clone()).or_default();
                span.vni = net.vni;
                span.nodes.insert(inst.node_id.clone());
                span.members
                    .push((inst.instance_id.clone(), inst.node_id.clone()));
                if let Some(n) = self.nodes.get(&inst.node_id) {
                    span.routes
                        .insert(net.address.clone(), n.address().to_string());
                }
            }
        }
        spans
    }

    /// A node's session opened: the peers (and a routed network's routes)
    /// of every network it spans, which it may have missed while away
    /// (commands to a node without a session are dropped).
    pub(super) fn network_state_to(&self, node_id: &str, out: &mut Outbox) {
        let Some(plan) = self.settings.networks else {
            return;
        };
        for span in self.spans_of(|_| true).into_values() {
            if span.nodes.contains(node_id) {
                out.push((
                    node_id.to_string(),
                    AgentCommand::NetworkPeers {
                        vni: span.vni,
                        peers: self.addresses(&span.nodes),
                        routes: span.routes_if(plan.is_routed),
                    },
                ));
            }
        }
    }

    /// After a load: the nodes each network spans, as if its agents had
    /// just been told (so a network leaving a node is pruned after a
    /// scheduler restart as before it).
    pub(super) fn track_loaded_spans(&mut self) {
        if self.settings.networks.is_none() {
            return;
        }
        self.net_spans = self
            .spans_of(|_| true)
            .into_iter()
            .map(|(name, span)| (name, (span.vni, span.nodes)))
            .collect();
    }

    fn addresses(&self, nodes: &BTreeSet<String>) -> Vec<String> {
        nodes
            .iter()
            .filter_map(|n| self.nodes.get(n))
            .map(|n| n.address().to_string())
            .collect()
    }

    /// Tells the nodes of every network that no longer spans a node it
    /// spanned (its instances there ended) the shorter peer list: they
    /// stop flooding to it and taking VXLAN from it (a routed network's
    /// routes to it go too).
    pub(super) fn prune_network_peers(&mut self, out: &mut Outbox) {
        if self.net_spans.is_empty() {
            return;
        }
        let routed = self.settings.networks.is_some_and(|p| p.is_routed);
        let spans = self.spans_of(|name| self.net_spans.contains_key(name));
        let mut shrunk = Vec::new();
        for (name, (vni, before)) in &self.net_spans {
            let span = spans.get(name).cloned().unwrap_or_default();
            if span.nodes.len() < before.len() {
                shrunk.push((name.clone(), *vni, span));
            }
        }
        for (name, vni, span) in shrunk {
            let peers = self.addresses(&span.nodes);
            for node in &span.nodes {
                out.push((
                    node.clone(),
                    AgentCommand::NetworkPeers {
                        vni,
                        peers: peers.clone(),
                        routes: span.routes_if(routed),
                    },
                ));
            }
            if span.nodes.is_empty() {
                self.net_spans.remove(&name);
            } else {
                self.net_spans.insert(name, (vni, span.nodes));
            }
        }
    }
}

/// One network's live instances ([`Cluster::spans_of`]).
#[derive(Debug, Clone, Default)]
struct Span {
    vni: u32,
    /// The nodes they run on.
    nodes: BTreeSet<String>,
    /// (instance id, node id) of each.
    members: Vec<(String, String)>,
    /// Address → its node's address.
    routes: BTreeMap<String, String>,
}

impl Span {
    /// What an agent is told of the routes: none for an overlay.
    fn routes_if(&self, routed: bool) -> BTreeMap<String, String> {
        if routed {
            self.routes.clone()
        } else {
            BTreeMap::new()
        }
    }
}

/// The attachment of `inst` of `job` for its start command, without its
/// peers ([`Cluster::network_peers`] adds them).
pub(super) fn attach_of(
    job: &crate::domain::Job,
    inst: &crate::domain::Instance,
) -> Option<network::Attach> {
    let net = inst.net.as_ref()?;
    let mut hosts = BTreeMap::new();
    for i in job.current() {
        if let Some(n) = &i.net {
            hosts.insert(format!("{}.{}", i.rank, job.job_id), n.address.clone());
            hosts.insert(format!("{}-{}", job.job_id, i.rank), n.address.clone());
        }
    }
    Some(network::Attach {
        name: net.name.clone(),
        vni: net.vni,
        subnet: net.subnet.clone(),
        gateway: net.gateway.clone(),
        address: net.address.clone(),
        peers: Vec::new(),
        hosts,
        vpc: net.vpc.clone(),
        rules: net.rules.clone(),
        no_egress: net.no_egress,
        routed: false,
        routes: BTreeMap::new(),
    })
}
