//! The address plan of instance networks (R-CREATE-14, R-POOL-1).
//!
//! A network is a layer-2 segment that spans the nodes its instances run
//! on: the kernel's VXLAN (one VNI per network) bridged on each node, with
//! the node as the instances' gateway. Which network an instance joins:
//!
//! - a dedicated pool (deploy or train) without a custom network: its
//!   tenant's own (`tenant/NAME`), shared by all the tenant's pools;
//! - the public pool: the job's own (`job/ID`), isolated per job;
//! - a custom network: the operator's subnet ([`Custom`]: an address of its
//!   range on the VPC's bridge, no VXLAN, its security groups);
//! - an image job asking for `host` or `none`: none (the instance keeps
//!   the host's or a loopback-only network).
//!
//! The plan is a function of the live instances, which are persisted with
//! their address: a network holds the `index`th subnet of the configured
//! range while one of its instances lives, and its VNI is `VNI_BASE +
//! index`. Addresses are handed out lowest first; `.1` is each node's
//! gateway. Nothing here knows about nodes' links or rules: the agent
//! builds them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// VNIs start here (clear of the small numbers other overlays take).
pub const VNI_BASE: u32 = 0x10_0000;

/// The instance networks' address range, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    base: u32,
    /// Prefix length of the whole range.
    range_len: u8,
    /// Prefix length of one network's subnet.
    subnet_len: u8,
    /// Networks are routed between nodes, not bridged over VXLAN.
    pub is_routed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("networks.cidr must be an IPv4 range like 10.144.0.0/12 (got {0:?})")]
    BadRange(String),
    #[error(
        "networks.subnet_prefix_len must be longer than the range's ({range}) and at most 29 (got {subnet})"
    )]
    BadSubnet { range: u8, subnet: u8 },
    #[error("every network of {0} is in use")]
    RangeFull(String),
    #[error("network {0} has no address left")]
    SubnetFull(String),
    #[error("custom subnet {0:?} is not in the scheduler's [networks.subnets]")]
    UnknownSubnet(String),
}

impl Plan {
    pub fn new(cidr: &str, subnet_len: u8) -> Result<Self, PlanError> {
        let bad = || PlanError::BadRange(cidr.to_string());
        let (ip, len) = cidr.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let range_len: u8 = len.parse().map_err(|_| bad())?;
        if !(1..=28).contains(&range_len) {
            return Err(bad());
        }
        if subnet_len <= range_len || subnet_len > 29 {
            return Err(PlanError::BadSubnet {
                range: range_len,
                subnet: subnet_len,
            });
        }
        let base = u32::from(ip);
        if base & !mask(range_len) != 0 {
            return Err(bad());
        }
        Ok(Self {
            base,
            range_len,
            subnet_len,
            is_routed: false,
        })
    }

    /// The same plan, its networks routed between nodes (`true`) or
    /// bridged over VXLAN.
    pub fn routed(self, routed: bool) -> Self {
        Self {
            is_routed: routed,
            ..self
        }
    }

    fn networks(&self) -> u32 {
        1u32 << (self.subnet_len - self.range_len)
    }

    fn subnet_size(&self) -> u32 {
        1u32 << (32 - self.subnet_len)
    }

    fn subnet_base(&self, index: u32) -> u32 {
        self.base + index * self.subnet_size()
    }

    /// The attachment of host number `host` (2..) in the `index`th network.
    fn attachment(&self, name: &str, index: u32, host: u32) -> InstanceNet {
        let base = self.subnet_base(index);
        InstanceNet {
            name: name.to_string(),
            vni: VNI_BASE + index,
            subnet: format!("{}/{}", Ipv4Addr::from(base), self.subnet_len),
            gateway: Ipv4Addr::from(base + 1).to_string(),
            address: Ipv4Addr::from(base + host).to_string(),
            vpc: String::new(),
            rules: Vec::new(),
            no_egress: false,
            released: false,
        }
    }

    /// Addresses for `count` new instances of network `name`, given the
    /// attachments of every live instance (of all networks).
    pub fn allocate<'a>(
        &self,
        name: &str,
        count: usize,
        live: impl IntoIterator<Item = &'a InstanceNet>,
    ) -> Result<Vec<InstanceNet>, PlanError> {
        let mut taken_index = BTreeSet::new();
        let mut index = None;
        let mut hosts = BTreeSet::new();
        for n in live {
            let Some(i) = n.vni.checked_sub(VNI_BASE) else {
                continue;
            };
            taken_index.insert(i);
            if n.name == name {
                index = Some(i);
                if let Ok(a) = n.address.parse::<Ipv4Addr>() {
                    hosts.insert(u32::from(a).wrapping_sub(self.subnet_base(i)));
                }
            }
        }
        let index = match index {
            Some(i) if i < self.networks() => i,
            _ => (0..self.networks())
                .find(|i| !taken_index.contains(i))
                .ok_or_else(|| PlanError::RangeFull(self.to_string()))?,
        };
        // .0 the network, .1 the gateway, the last the broadcast.
        let mut out = Vec::with_capacity(count);
        let mut host = 2;
        while out.len() < count {
            if host >= self.subnet_size() - 1 {
                return Err(PlanError::SubnetFull(name.to_string()));
            }
            if !hosts.contains(&host) {
                out.push(self.attachment(name, index, host));
            }
            host += 1;
        }
        Ok(out)
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.range_len)
    }
}

pub(crate) fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

/// An instance's place in a network, persisted with the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNet {
    /// `tenant/NAME`, `job/ID` or, in a custom network, `subnet/ID`.
    pub name: String,
    /// 0 in a custom network (the operator's own segment, no VXLAN).
    pub vni: u32,
    /// The network's subnet (CIDR).
    pub subnet: String,
    /// The default route ("" in a custom subnet without one).
    pub gateway: String,
    pub address: String,
    /// A custom network's VPC id (the node's attachment for it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vpc: String,
    /// A custom network's security groups, resolved when it started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SgRule>,
    /// Nothing leaves the network from it (its pool's `no_egress`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_egress: bool,
    /// Its node's agent no longer runs it (it reported it ended, or does
    /// not know it): a Lost instance's address and network are held until
    /// then, since its namespace may still be on the network's bridge.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

/// One rule of a security group: traffic it lets in (ingress: from
/// `cidr` to the instance) or out (egress: from the instance to `cidr`).
/// Everything else is dropped, but replies to what was let through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgRule {
    pub ingress: bool,
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    /// Destination ports, inclusive (0, 0: all; tcp and udp only).
    pub ports: (u16, u16),
    pub cidr: String,
}

impl SgRule {
    /// A rule from the config's `{ protocol, ports, cidr }`: ports are
    /// `"80"`, `"8000-8100"` or empty (all).
    pub fn parse(ingress: bool, protocol: &str, ports: &str, cidr: &str) -> Result<Self, String> {
        let protocol = protocol.trim().to_ascii_lowercase();
        if !matches!(protocol.as_str(), "tcp" | "udp" | "icmp" | "all") {
            return Err(format!(
                "protocol must be tcp, udp, icmp or all (got {protocol:?})"
            ));
        }
        let ports = ports.trim();
        let ports = if ports.is_empty() {
            (0, 0)
        } else {
            if !matches!(protocol.as_str(), "tcp" | "udp") {
                return Err(format!(
                    "ports apply to tcp and udp only (got {ports:?} for {protocol})"
                ));
            }
            let bad = || format!("ports must be PORT or FIRST-LAST, 1 to 65535 (got {ports:?})");
            let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if a == 0 || b < a {
                return Err(bad());
            }
            (a, b)
        };
        parse_cidr(cidr)?;
        Ok(Self {
            ingress,
            protocol,
            ports,
            cidr: cidr.trim().to_string(),
        })
    }
}

/// `A.B.C.D/LEN` with no host bits set: (base, len).
pub fn parse_cidr(cidr: &str) -> Result<(u32, u8), String> {
    let bad = || format!("{cidr:?} is not an IPv4 CIDR like 192.168.0.0/24");
    let (ip, len) = cidr.trim().split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > 32 || u32::from(ip) & !mask(len) != 0 {
        return Err(bad());
    }
    Ok((u32::from(ip), len))
}

/// A custom subnet of the operator's (`[networks.subnets.ID]`): instances
/// get addresses `first..=last` in `cidr`, on the node-side attachment the
/// agents map its VPC to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomSubnet {
    pub vpc: String,
    pub cidr: String,
    pub gateway: String,
    pub first: u32,
    pub last: u32,
    /// Tenants whose pools may use it (`*`: all).
    pub tenants: Vec<String>,
}

/// The operator's custom subnets and security groups, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Custom {
    pub subnets: BTreeMap<String, CustomSubnet>,
    pub groups: BTreeMap<String, Vec<SgRule>>,
    /// Tenants whose pools may use each group (`*`: all).
    pub group_tenants: BTreeMap<String, Vec<String>>,
}

fn open_to(tenants: &[String], tenant: &str) -> bool {
    tenants.iter().any(|t| t == "*" || t == tenant)
}

impl Custom {
    /// Refuses `tenant`'s pool a custom network whose ids the config does
    /// not hold, or does not open to the tenant, naming them. (Not open
    /// and unknown read alike: a tenant learns no other tenant's ids.)
    pub fn check(
        &self,
        tenant: &str,
        vpc_id: &str,
        subnet_id: &str,
        groups: &[String],
    ) -> Result<(), String> {
        let mut unknown = Vec::new();
        match self.subnets.get(subnet_id) {
            Some(s) if !open_to(&s.tenants, tenant) => {
                unknown.push(format!("subnet {subnet_id:?}"));
            }
            None => unknown.push(format!("subnet {subnet_id:?}")),
            Some(s) if s.vpc != vpc_id => {
                return Err(format!(
                    "subnet {subnet_id:?} is in VPC {:?}, not {vpc_id:?}",
                    s.vpc
                ));
            }
            Some(_) => {}
        }
        for g in groups {
            let open = self
                .group_tenants
                .get(g)
                .is_some_and(|t| open_to(t, tenant));
            if !open {
                unknown.push(format!("security group {g:?}"));
            }
        }
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "unknown {} (the scheduler's [networks.subnets] and [networks.security_groups] hold the ids and the tenants each is open to)",
                unknown.join(", ")
            ))
        }
    }

    /// Addresses for `count` new instances in subnet `subnet_id` with
    /// `groups`' rules, given every live instance's attachment.
    pub fn allocate<'a>(
        &self,
        subnet_id: &str,
        groups: &[String],
        count: usize,
        live: impl IntoIterator<Item = &'a InstanceNet>,
    ) -> Result<Vec<InstanceNet>, PlanError> {
        let name = format!("subnet/{subnet_id}");
        let s = self
            .subnets
            .get(subnet_id)
            .ok_or_else(|| PlanError::UnknownSubnet(subnet_id.to_string()))?;
        let taken: BTreeSet<u32> = live
            .into_iter()
            .filter(|n| n.name == name)
            .filter_map(|n| n.address.parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .collect();
        let rules: Vec<SgRule> = groups
            .iter()
            .filter_map(|g| self.groups.get(g))
            .flatten()
            .cloned()
            .collect();
        let free = (s.first..=s.last).filter(|a| !taken.contains(a));
        let out: Vec<InstanceNet> = free
            .take(count)
            .map(|a| InstanceNet {
                name: name.clone(),
                vni: 0,
                subnet: s.cidr.clone(),
                gateway: s.gateway.clone(),
                address: Ipv4Addr::from(a).to_string(),
                vpc: s.vpc.clone(),
                rules: rules.clone(),
                no_egress: false,
                released: false,
            })
            .collect();
        if out.len() < count {
            return Err(PlanError::SubnetFull(name));
        }
        Ok(out)
    }
}

/// Which overlay network an instance of a job joins (module docs); None:
/// none (a custom network's subnet is [`Custom::allocate`]'s).
pub fn network_of(
    pool_type: Option<super::pool::PoolType>,
    custom_network: bool,
    tenant: &str,
    job_id: &str,
    job_network: &str,
) -> Option<String> {
    use super::pool::PoolType;
    if !job_network.is_empty() {
        // "host" (train pools) or "none" (loopback only), as asked.
        return None;
    }
    match pool_type {
        None => Some(format!("job/{job_id}")),
        Some(_) if custom_network => None,
        Some(PoolType::Deploy | PoolType::Train) => Some(format!("tenant/{tenant}")),
    }
}

/// The host network (`--network host`, for NCCL over RDMA) only for a
/// training job in a train pool, whose nodes hold no other tenant's
/// instances; never in the public pool or a deploy pool.
pub fn admit_network(
    pool_id: &str,
    pool_type: Option<super::pool::PoolType>,
    kind: super::job::JobKind,
    job_network: &str,
) -> Result<(), super::job::SpecError> {
    use super::job::{JobKind, SpecError};
    use super::pool::PoolType;
    if job_network == "host" && !(pool_type == Some(PoolType::Train) && kind == JobKind::Training) {
        let place = match pool_type {
            None => "the public pool".to_string(),
            Some(_) if kind != JobKind::Training => format!("a {} job", kind.name()),
            Some(_) => format!("deploy pool {pool_id}"),
        };
        return Err(SpecError::HostNetworkNotHere(place));
    }
    Ok(())
}

/// Agents from 0.2.0 build networks; an older one would ignore the
/// attachment and run the instance on the host's network.
pub fn agent_builds_networks(agent_version: &str) -> bool {
    let mut parts = agent_version.split(['.', '-', '+']);
    let major: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (0, 2)
}

/// What an agent needs to attach one instance: its address, the nodes
/// its network spans (VXLAN peers) and the names of its job's instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attach {
    /// The network's name (`tenant/NAME`, `job/ID`).
    pub name: String,
    pub vni: u32,
    pub subnet: String,
    pub gateway: String,
    pub address: String,
    /// Addresses of the nodes with a live instance of the network.
    pub peers: Vec<String>,
    /// `RANK.JOB` (and `JOB-RANK`) → address, for the sandbox's hosts file.
    pub hosts: BTreeMap<String, String>,
    /// A custom network's VPC id ("" for the overlay).
    pub vpc: String,
    /// A custom network's security group rules.
    pub rules: Vec<SgRule>,
    /// Nothing leaves the network from this instance.
    pub no_egress: bool,
    /// The network is routed between nodes ([`Plan::routed`]).
    pub routed: bool,
    /// A routed network's live instances: address → their node's address.
    pub routes: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan::new("10.144.0.0/12", 22).unwrap()
    }

    #[test]
    fn ranges_are_checked() {
        assert!(matches!(
            Plan::new("10.144.0.1/12", 22),
            Err(PlanError::BadRange(_))
        ));
        assert!(matches!(
            Plan::new("10.144.0.0", 22),
            Err(PlanError::BadRange(_))
        ));
        assert!(matches!(
            Plan::new("10.144.0.0/24", 24),
            Err(PlanError::BadSubnet { .. })
        ));
        assert!(Plan::new("192.168.0.0/16", 24).is_ok());
    }

    #[test]
    fn the_host_network_only_for_training_in_a_train_pool() {
        use crate::domain::job::JobKind;
        use crate::domain::pool::PoolType;
        let admit = |t, k| admit_network("p-1", t, k, "host").map_err(|e| e.to_string());
        assert!(admit(Some(PoolType::Train), JobKind::Training).is_ok());
        let public = admit(None, JobKind::Training).unwrap_err();
        assert!(public.ends_with("not for the public pool"), "{public}");
        let deploy = admit(Some(PoolType::Deploy), JobKind::Training).unwrap_err();
        assert!(deploy.ends_with("not for deploy pool p-1"), "{deploy}");
        let notebook = admit(Some(PoolType::Train), JobKind::Notebook).unwrap_err();
        assert!(notebook.ends_with("not for a notebook job"), "{notebook}");
        for net in ["", "none"] {
            assert!(admit_network("p-1", None, JobKind::Notebook, net).is_ok());
        }
    }

    #[test]
    fn r_create_14_each_network_its_own_subnet_and_vni() {
        let p = plan();
        let a = p.allocate("tenant/a", 2, []).unwrap();
        assert_eq!(a[0].subnet, "10.144.0.0/22");
        assert_eq!(a[0].gateway, "10.144.0.1");
        assert_eq!(
            a.iter().map(|n| n.address.as_str()).collect::<Vec<_>>(),
            ["10.144.0.2", "10.144.0.3"]
        );
        let b = p.allocate("tenant/b", 1, &a).unwrap();
        assert_eq!(b[0].subnet, "10.144.4.0/22");
        assert_ne!(a[0].vni, b[0].vni);
        // More of A's instances join A's network, after its addresses.
        let live: Vec<_> = a.iter().chain(&b).cloned().collect();
        let more = p.allocate("tenant/a", 1, &live).unwrap();
        assert_eq!(
            (more[0].vni, more[0].address.as_str()),
            (a[0].vni, "10.144.0.4")
        );
    }

    #[test]
    fn freed_addresses_and_networks_are_reused() {
        let p = plan();
        let a = p.allocate("job/j-1", 3, []).unwrap();
        // Rank 1 ended: its address is free again.
        let live = [a[0].clone(), a[2].clone()];
        let again = p.allocate("job/j-1", 1, &live).unwrap();
        assert_eq!(again[0].address, a[1].address);
        // Every instance of j-1 ended: j-2 takes its subnet.
        let next = p.allocate("job/j-2", 1, []).unwrap();
        assert_eq!(next[0].subnet, a[0].subnet);
    }

    #[test]
    fn full_ranges_and_subnets_are_errors() {
        let p = Plan::new("10.0.0.0/28", 29).unwrap();
        // Two /29 networks of 5 addresses each (.2 .. .6).
        let a = p.allocate("job/a", 5, []).unwrap();
        assert!(matches!(
            p.allocate("job/a", 1, &a),
            Err(PlanError::SubnetFull(_))
        ));
        let b = p.allocate("job/b", 1, &a).unwrap();
        let live: Vec<_> = a.iter().chain(&b).cloned().collect();
        assert!(matches!(
            p.allocate("job/c", 1, &live),
            Err(PlanError::RangeFull(_))
        ));
    }

    #[test]
    fn only_agents_that_build_networks_get_instances_in_one() {
        for v in ["0.2.0", "0.2.1-dev", "0.10.0", "1.0.0"] {
            assert!(agent_builds_networks(v), "{v}");
        }
        for v in ["0.1.0", "0.1.9", "", "x"] {
            assert!(!agent_builds_networks(v), "{v}");
        }
    }

    #[test]
    fn which_network_an_instance_joins() {
        use crate::domain::pool::PoolType;
        assert_eq!(
            network_of(None, false, "a", "j-1", "").as_deref(),
            Some("job/j-1")
        );
        assert_eq!(
            network_of(Some(PoolType::Deploy), false, "a", "j-1", "").as_deref(),
            Some("tenant/a")
        );
        assert_eq!(
            network_of(Some(PoolType::Deploy), true, "a", "j-1", ""),
            None
        );
        assert_eq!(
            network_of(Some(PoolType::Train), false, "a", "j-1", "host"),
            None
        );
    }
}
