//! Instance networks on the node (R-CREATE-14, R-POOL-1): the kernel's
//! building blocks, driven through iproute2 (`ip`, `bridge`) and nftables
//! (`nft`), as the CNI reference plugins do.
//!
//! For a network (the scheduler's address plan names its VNI, subnet and
//! gateway) the node has a bridge `gpbVNI` holding the gateway address
//! (the same address and MAC on every node, so an instance always finds
//! its own node's gateway) and a VXLAN device `gpxVNI` on the bridge that
//! floods to the network's peers (head-end replication, `bridge fdb`
//! entries; no multicast needed). Each instance gets a network namespace
//! with one end of a veth pair (`eth0`, its address, a default route via
//! the gateway); the other end is on the bridge. Instances of one network
//! talk on the bridge and across the VXLAN; nothing is routed between
//! networks.
//!
//! A routed network (`[networks] mode = "routed"`) has neither bridge nor
//! VXLAN, as Calico without encapsulation: each instance's veth ends on
//! the node as a routed link (`gpr...`) that holds the gateway as a /32
//! (the instance's next hop) and a /32 route to the instance; the node
//! routes the network's instances on other nodes through those nodes
//! (`proto 201`). Instances share no layer 2, not even on one node.
//!
//! One nftables table, `inet gpupool`, holds the rules, rendered whole
//! from the records on every change (with a `bridge gpupool` table that
//! keeps the gateways' frames off the VXLANs):
//! - nothing is routed into a network (from another network, the node or
//!   the world) except replies and published ports;
//! - a routed instance sends from its own address only, and takes from
//!   the underlay only what comes from its network's instances elsewhere;
//! - instances reach nothing of the node itself (its agent, its other
//!   ports) except replies, nor any node's VXLAN port;
//! - instances reach the rest of the world through masquerade;
//! - a published port (a serving instance's `host:port`) is DNAT to the
//!   instance's address, as the `portmap` plugin does.
//!
//! Every namespace is recorded in the agent's state (`networks/ID.json`)
//! before it is made, so a restarted agent removes what no live instance
//! owns ([`Networks::reconcile`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The VXLAN UDP port (IANA's).
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN's own headers over IPv4.
const VXLAN_OVERHEAD: u32 = 50;

/// What the scheduler says about one instance's network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attach {
    pub name: String,
    pub vni: u32,
    pub subnet: String,
    pub gateway: String,
    pub address: String,
    pub peers: Vec<String>,
    pub hosts: BTreeMap<String, String>,
    /// A custom network's VPC id: the instance goes on the bridge this
    /// node's config maps it to ("": the overlay above).
    pub vpc: String,
    /// A custom network's security group rules, enforced in the
    /// instance's namespace.
    pub rules: Vec<Rule>,
    /// Nothing leaves the network from it (but replies).
    pub no_egress: bool,
    /// Routed, no bridge and no VXLAN: the node routes to each of the
    /// network's instances here on its veth, and to each elsewhere
    /// through its node (`routes`: address -> node address; this node's
    /// own are skipped).
    pub routed: bool,
    pub routes: BTreeMap<String, String>,
}

/// The route protocol number that marks this agent's routes to routed
/// networks' instances on other nodes (`ip route ... proto 201`).
const ROUTE_PROTO: &str = "201";

/// One security group rule (the scheduler's, as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub ingress: bool,
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    /// Destination ports, inclusive; (0, 0): all.
    pub ports: (u16, u16),
    pub cidr: String,
}

/// An instance attached: where its namespace and hosts file are.
#[derive(Debug, Clone)]
pub struct Attached {
    pub netns: PathBuf,
    pub hosts_file: PathBuf,
    pub address: Ipv4Addr,
}

/// What the agent keeps about one attached instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    instance_id: String,
    netns: String,
    veth: String,
    vni: u32,
    subnet: String,
    gateway: String,
    address: String,
    /// The published port (0: none).
    #[serde(default)]
    port: u16,
    /// A custom network's VPC ("": the overlay).
    #[serde(default)]
    vpc: String,
    /// Nothing leaves the network from it.
    #[serde(default)]
    no_egress: bool,
    /// Its network is routed (no bridge, no VXLAN; `veth` is a `gpr...` link).
    #[serde(default)]
    routed: bool,
}

/// The name prefix of a routed instance's node-side veth.
const ROUTED_LINK: &str = "gpr";

impl Record {
    /// A routed instance on a routed link (not one an older agent put on
    /// a routed network's bridge, which keeps that bridge and its rules).
    fn on_routed_link(&self) -> bool {
        self.routed && self.veth.starts_with(ROUTED_LINK)
    }
}

/// The node's side of the instance networks.
pub struct Networks {
    dir: PathBuf,
    /// This node's address: the VXLAN's local end, and where published
    /// ports answer.
    local: Ipv4Addr,
    /// Names made here start with this (unique per agent: test hosts share
    /// one `/run/netns`).
    tag: String,
    /// VPC id -> the node's bridge on that VPC (custom networks).
    vpcs: BTreeMap<String, String>,
    /// Where instances may not send (besides the node itself): link-local
    /// (cloud metadata), the node's own subnet (the other nodes, the
    /// scheduler) and the operator's `egress_deny`.
    deny: Vec<String>,
    /// The node's own subnet: routed networks' next hops must be in it.
    underlay_net: Option<String>,
    lock: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Command(String),
    #[error("bad network settings from the scheduler: {0}")]
    Bad(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Networks {
    /// Networks kept under `state_dir/networks`, this node's address
    /// `local` (an IPv4 address: the VXLAN runs over it).
    pub fn new(state_dir: &Path, local: &str) -> Result<Self, NetError> {
        let local: Ipv4Addr = local.parse().map_err(|_| {
            NetError::Bad(format!(
                "instance networks need the node's IPv4 address (advertise_address), not {local:?}"
            ))
        })?;
        let dir = state_dir.join("networks");
        std::fs::create_dir_all(&dir)?;
        let tag = format!("{:06x}", fnv(dir.to_string_lossy().as_bytes()) & 0xff_ffff);
        let underlay_net = underlay_cidr(local);
        Ok(Self {
            dir,
            local,
            tag,
            vpcs: BTreeMap::new(),
            deny: [Some("169.254.0.0/16".to_string()), underlay_net.clone()]
                .into_iter()
                .flatten()
                .collect(),
            underlay_net,
            lock: Mutex::new(()),
        })
    }

    /// More ranges instances may not reach (agent config
    /// `[networks] egress_deny`); each must be an IPv4 CIDR.
    pub fn with_egress_deny(mut self, cidrs: &[String]) -> Result<Self, NetError> {
        for c in cidrs {
            let c = c.trim();
            if !is_cidr(c) {
                return Err(NetError::Bad(format!(
                    "egress_deny: {c:?} is not an IPv4 CIDR like 10.0.0.0/8"
                )));
            }
            self.deny.push(c.to_string());
        }
        Ok(self)
    }

    /// The node's bridges of custom networks, by VPC id (agent config
    /// `[networks.vpcs]`).
    pub fn with_vpcs(mut self, vpcs: BTreeMap<String, String>) -> Result<Self, NetError> {
        for br in vpcs.values() {
            if !is_ifname(br) {
                return Err(NetError::Bad(format!(
                    "vpcs: {br:?} is not an interface name"
                )));
            }
        }
        self.vpcs = vpcs;
        Ok(self)
    }

    /// The namespace, node-side veth and temporary peer names of an
    /// instance: a routed instance's veth is `gpr...` (the node routes on
    /// it), another's `gv...` (a bridge port).
    fn names(&self, instance_id: &str, routed: bool) -> (String, String, String) {
        let h = fnv(format!("{}/{instance_id}", self.tag).as_bytes());
        let short = format!("{:08x}", h as u32);
        let veth = if routed { ROUTED_LINK } else { "gv" };
        (
            format!("gpi-{}-{short}", self.tag),
            format!("{veth}{short}"),
            format!("gt{short}"),
        )
    }

    fn hosts_path(&self, instance_id: &str) -> PathBuf {
        self.dir.join(format!("{instance_id}.hosts"))
    }

    /// Rewrites the hosts file of `instance_id` (attached here) in place:
    /// the sandbox's `/etc/hosts` is a bind mount of that very file.
    pub fn set_hosts(
        &self,
        instance_id: &str,
        hosts: &BTreeMap<String, String>,
    ) -> Result<(), NetError> {
        let _g = self.lock.lock().unwrap();
        if !self.record_path(instance_id).exists() {
            return Ok(());
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.hosts_path(instance_id))?;
        f.write_all(hosts_text(hosts).as_bytes())?;
        Ok(())
    }

    fn record_path(&self, instance_id: &str) -> PathBuf {
        self.dir.join(format!("{instance_id}.json"))
    }

    fn records(&self) -> Vec<Record> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }

    /// Gives `instance_id` its namespace in the network `a` says, with
    /// `port` (when not 0) published on the node's address.
    pub fn attach(&self, instance_id: &str, a: &Attach, port: u16) -> Result<Attached, NetError> {
        let _g = self.lock.lock().unwrap();
        let address: Ipv4Addr = a
            .address
            .parse()
            .map_err(|_| NetError::Bad(format!("address {:?}", a.address)))?;
        let (_, len) = a
            .subnet
            .split_once('/')
            .ok_or_else(|| NetError::Bad(format!("subnet {:?}", a.subnet)))?;
        if !(a.gateway.is_empty() && !a.vpc.is_empty()) {
            let _: Ipv4Addr = a
                .gateway
                .parse()
                .map_err(|_| NetError::Bad(format!("gateway {:?}", a.gateway)))?;
        }
        if a.vpc.is_empty() {
            self.check_overlay_or_routed(a, address)?;
        }
        let custom_bridge = if a.vpc.is_empty() {
            None
        } else {
            let br = self.vpcs.get(&a.vpc).ok_or_else(|| {
                NetError::Bad(format!(
                    "this node has no bridge for VPC {:?} (agent config [networks.vpcs])",
                    a.vpc
                ))
            })?;
            if !link_exists(br) {
                return Err(NetError::Command(format!(
                    "bridge {br} of VPC {} does not exist on this node",
                    a.vpc
                )));
            }
            Some(br.clone())
        };
        let routed = a.routed && a.vpc.is_empty();
        let (netns, veth, temp) = self.names(instance_id, routed);
        let record = Record {
            instance_id: instance_id.to_string(),
            netns: netns.clone(),
            veth: veth.clone(),
            vni: a.vni,
            subnet: a.subnet.clone(),
            gateway: a.gateway.clone(),
            address: a.address.clone(),
            port,
            vpc: a.vpc.clone(),
            no_egress: a.no_egress,
            routed,
        };
        // Recorded first: whatever of it exists after a crash is found.
        write_atomic(
            &self.record_path(instance_id),
            &serde_json::to_vec(&record).unwrap(),
        )?;
        // Where the veth goes: a bridge, or (routed) none.
        let (mtu, master) = match &custom_bridge {
            Some(br) => (link_mtu(br).unwrap_or(1500).to_string(), Some(br.clone())),
            None if routed => {
                // A node forwards for its instances (their gateway, NAT).
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                self.set_routes_locked(&a.subnet, &a.routes);
                (underlay_mtu(self.local).to_string(), None)
            }
            None => {
                let mtu = self.ensure_network(a)?;
                self.set_peers_locked(a.vni, &a.peers)?;
                (mtu, Some(bridge(a.vni)))
            }
        };
        let _ = ip(&["netns", "del", &netns]);
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name", &temp, "mtu", &mtu,
        ])?;
        ip(&["link", "set", &temp, "netns", &netns])?;
        match &master {
            Some(br) => {
                ip(&["link", "set", &veth, "master", br, "up"])?;
            }
            None => route_to_veth(&veth, &a.gateway, &a.address)?,
        }
        ip(&["-n", &netns, "link", "set", &temp, "name", "eth0"])?;
        // IPv4 only: no link-local address, no router advertisement taken.
        // (Best effort: a kernel without IPv6 has nothing to turn off.)
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
            ],
        );
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        // A routed instance has its address alone on its link: all it
        // sends goes to the gateway (the node's end of the veth).
        let len = if routed { "32" } else { len };
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/{len}", a.address),
            "dev",
            "eth0",
        ])?;
        if routed {
            ip(&[
                "-n", &netns, "route", "add", "default", "via", &a.gateway, "dev", "eth0", "onlink",
            ])?;
        } else if !a.gateway.is_empty() {
            ip(&["-n", &netns, "route", "add", "default", "via", &a.gateway])?;
        }
        if custom_bridge.is_some() {
            nft(Some(&netns), &security_rules(&a.rules))?;
        }
        let hosts_file = self.hosts_path(instance_id);
        write_atomic(&hosts_file, hosts_text(&a.hosts).as_bytes())?;
        // Readable by the instance's user (its mount covers /etc/hosts).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hosts_file, std::fs::Permissions::from_mode(0o644))?;
        self.render_rules()?;
        Ok(Attached {
            netns: PathBuf::from("/run/netns").join(&netns),
            hosts_file,
            address,
        })
    }

    /// Refuses a network whose subnet is not a plain one holding `address`,
    /// or whose instances here were built in the other mode (the
    /// scheduler's `[networks] mode` changed while it lived).
    fn check_overlay_or_routed(&self, a: &Attach, address: Ipv4Addr) -> Result<(), NetError> {
        let plain = cidr_parts(&a.subnet).is_some_and(|(base, len)| {
            (8..=30).contains(&len) && base & !prefix_mask(len) == 0 && in_cidr(address, &a.subnet)
        });
        if !plain {
            return Err(NetError::Bad(format!(
                "subnet {:?} for address {address}",
                a.subnet
            )));
        }
        let other = |r: &Record| r.vni == a.vni && r.vpc.is_empty() && r.routed != a.routed;
        if self.records().iter().any(other) {
            let (was, now) = if a.routed {
                ("overlay", "routed")
            } else {
                ("routed", "overlay")
            };
            return Err(NetError::Bad(format!(
                "network {} runs {was} on this node and this instance asks for {now} \
                 (the scheduler's [networks] mode changed while the network lived)",
                a.name
            )));
        }
        Ok(())
    }

    /// The bridge and VXLAN of network `a`, made if missing; the MTU its
    /// instances get.
    fn ensure_network(&self, a: &Attach) -> Result<String, NetError> {
        let br = bridge(a.vni);
        let vx = vxlan(a.vni);
        if !link_exists(&br) {
            // A node forwards for its instances (their gateway, NAT).
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            ip(&["link", "add", &br, "type", "bridge"])?;
            ip(&["link", "set", &br, "address", &gateway_mac(a.vni)])?;
            // No IPv6 on the gateway (its multicast would flood the VXLAN).
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6"), "1");
            let (_, len) = a.subnet.split_once('/').unwrap_or(("", "32"));
            ip(&["addr", "add", &format!("{}/{len}", a.gateway), "dev", &br])?;
        }
        if !link_exists(&vx) {
            // The gateway's frames are kept off the VXLAN from its first.
            let mut vxlans = links_named("gpx");
            vxlans.push(vx.clone());
            nft(None, &gateway_rules(&vxlans))?;
            let mtu = underlay_mtu(self.local).saturating_sub(VXLAN_OVERHEAD);
            ip(&[
                "link",
                "add",
                &vx,
                "mtu",
                &mtu.to_string(),
                "type",
                "vxlan",
                "id",
                &a.vni.to_string(),
                "local",
                &self.local.to_string(),
                "dstport",
                &VXLAN_PORT.to_string(),
            ])?;
            ip(&["link", "set", &vx, "master", &br, "up"])?;
        }
        ip(&["link", "set", &br, "up"])?;
        Ok(link_mtu(&vx).unwrap_or(1450).to_string())
    }

    /// Floods network `vni`'s unknown and broadcast frames to `peers`
    /// (this node left out), no other.
    /// A routed network's instances changed: sets its `routes` instead.
    pub fn set_peers(
        &self,
        vni: u32,
        peers: &[String],
        routes: &BTreeMap<String, String>,
    ) -> Result<(), NetError> {
        let _g = self.lock.lock().unwrap();
        if let Some(r) = self
            .records()
            .into_iter()
            .find(|r| r.vni == vni && r.routed && r.vpc.is_empty())
        {
            self.set_routes_locked(&r.subnet, routes);
            return self.render_rules();
        }
        if !link_exists(&vxlan(vni)) {
            return Ok(());
        }
        self.set_peers_locked(vni, peers)?;
        self.render_rules()
    }

    /// Routes each address of `subnet` in `routes` whose node is not this
    /// one (and is on this node's own subnet) through that node, and
    /// removes this agent's other routes into `subnet`. Best effort: a
    /// route the kernel refuses is logged and the others still go in.
    fn set_routes_locked(&self, subnet: &str, routes: &BTreeMap<String, String>) {
        let want: BTreeMap<Ipv4Addr, Ipv4Addr> = routes
            .iter()
            .filter_map(|(a, n)| Some((a.parse().ok()?, n.parse().ok()?)))
            .filter(|(a, n)| *n != self.local && in_cidr(*a, subnet))
            .filter(|(_, n)| self.underlay_net.as_deref().is_none_or(|u| in_cidr(*n, u)))
            .collect();
        let have = our_routes(subnet);
        for addr in have.keys().filter(|a| !want.contains_key(a)) {
            let _ = ip(&["route", "del", &format!("{addr}/32"), "proto", ROUTE_PROTO]);
        }
        for (addr, node) in &want {
            if have.get(addr) != Some(node)
                && let Err(err) = ip(&[
                    "route",
                    "replace",
                    &format!("{addr}/32"),
                    "via",
                    &node.to_string(),
                    "proto",
                    ROUTE_PROTO,
                ])
            {
                tracing::warn!(%addr, %node, %err, "cannot route to an instance on another node");
            }
        }
    }

    fn set_peers_locked(&self, vni: u32, peers: &[String]) -> Result<(), NetError> {
        let vx = vxlan(vni);
        let want: BTreeSet<String> = peers
            .iter()
            .filter(|p| p.parse::<Ipv4Addr>().is_ok_and(|a| a != self.local))
            .cloned()
            .collect();
        let have = flood_entries(&vx);
        for p in want.difference(&have) {
            bridge_cmd(&["fdb", "append", "00:00:00:00:00:00", "dev", &vx, "dst", p])?;
        }
        for p in have.difference(&want) {
            let _ = bridge_cmd(&["fdb", "del", "00:00:00:00:00:00", "dev", &vx, "dst", p]);
        }
        Ok(())
    }

    /// Removes `instance_id`'s namespace (its veth goes with it), its
    /// published port, and the network's devices once no instance here
    /// uses them. Does nothing for an instance without one.
    pub fn detach(&self, instance_id: &str) {
        let _g = self.lock.lock().unwrap();
        let path = self.record_path(instance_id);
        let Some(record) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        else {
            return;
        };
        self.remove(&record);
        let _ = self.render_rules();
    }

    fn remove(&self, record: &Record) {
        // The veth first (its peer in the namespace goes with it): once the
        // namespace's name is gone, nothing of the instance is on a bridge.
        let _ = ip(&["link", "del", &record.veth]);
        let _ = ip(&["netns", "del", &record.netns]);
        let _ = std::fs::remove_file(self.record_path(&record.instance_id));
        let _ = std::fs::remove_file(self.hosts_path(&record.instance_id));
        if record.vpc.is_empty() && !self.records().iter().any(|r| r.vni == record.vni) {
            let _ = ip(&["link", "del", &vxlan(record.vni)]);
            let _ = ip(&["link", "del", &bridge(record.vni)]);
            self.set_routes_locked(&record.subnet, &BTreeMap::new());
        }
    }

    /// After a restart: removes the namespaces, devices and rules of every
    /// instance not in `live`, and the networks none of `live` uses.
    pub fn reconcile(&self, live: &HashSet<String>) {
        let _g = self.lock.lock().unwrap();
        for r in self.records() {
            if !live.contains(&r.instance_id) {
                tracing::info!(instance = %r.instance_id, netns = %r.netns, "removing a network namespace no instance owns");
                self.remove(&r);
            }
        }
        let used: HashSet<u32> = self
            .records()
            .iter()
            .filter(|r| r.vpc.is_empty() && !r.on_routed_link())
            .map(|r| r.vni)
            .collect();
        // Overlay networks' VXLANs and bridges (a routed network has
        // neither).
        let unused: BTreeSet<u32> = links_named("gp")
            .iter()
            .filter_map(|n| n.strip_prefix("gpx").or_else(|| n.strip_prefix("gpb")))
            .filter_map(|v| v.parse().ok())
            .filter(|vni| !used.contains(vni))
            .collect();
        for vni in unused {
            let _ = ip(&["link", "del", &vxlan(vni)]);
            let _ = ip(&["link", "del", &bridge(vni)]);
        }
        // (A routed instance's veth has no life of its own: its record is
        // written before it is made and removed after it is gone.)
        // Routes into routed networks none of `live` is on here.
        let subnets: Vec<String> = self
            .records()
            .iter()
            .filter(|r| r.routed)
            .map(|r| r.subnet.clone())
            .collect();
        for addr in our_routes("0.0.0.0/0").keys() {
            if !subnets.iter().any(|s| in_cidr(*addr, s)) {
                let _ = ip(&["route", "del", &format!("{addr}/32"), "proto", ROUTE_PROTO]);
            }
        }
        let _ = self.render_rules();
    }

    /// Writes the whole `inet gpupool` table from the records.
    fn render_rules(&self) -> Result<(), NetError> {
        let records = self.records();
        let vxlans = links_named("gpx");
        if records.is_empty() && vxlans.is_empty() {
            // No instance network here: no table either.
            return nft(
                None,
                &format!(
                    "table inet gpupool {{\n}}\ndelete table inet gpupool\n{}",
                    gateway_rules(&[])
                ),
            );
        }
        // Frames between a network's own instances stay on its bridge (also
        // where br_netfilter sends bridged frames through these hooks).
        let mut same = String::new();
        let overlay = records
            .iter()
            .filter(|r| r.vpc.is_empty() && !r.on_routed_link());
        for vni in overlay.map(|r| r.vni).collect::<BTreeSet<_>>() {
            same.push_str(&format!(
                "    iifname \"{b}\" oifname \"{b}\" accept\n",
                b = bridge(vni)
            ));
        }
        let mut dnat = String::new();
        for r in records.iter().filter(|r| r.port != 0) {
            dnat.push_str(&format!(
                "    ip daddr {local} tcp dport {port} dnat ip to {addr}:{port}\n",
                local = self.local,
                port = r.port,
                addr = r.address
            ));
        }
        let vxlan_from = vxlan_sources(&vxlans);
        let routed_nets = routed_nets(&records);
        let remote: BTreeMap<u32, BTreeSet<Ipv4Addr>> = routed_nets
            .iter()
            .map(|(vni, net)| (*vni, our_routes(net.subnet).into_keys().collect()))
            .collect();
        let published: BTreeSet<u16> = records.iter().map(|r| r.port).filter(|p| *p != 0).collect();
        let routed = routed_rules(
            &routed_nets,
            underlay(self.local).map(|(dev, _)| dev),
            &remote,
            &published,
        );
        // What instances may not reach through the node: the deny ranges,
        // and the custom networks' bridges (another tenant's VPC).
        let mut deny = per_link(|l| {
            format!(
                "    iifname \"{l}\" ip daddr {{ {} }} drop\n",
                self.deny.join(", ")
            )
        });
        deny.push_str(&routed.between);
        let closed: Vec<&str> = records
            .iter()
            .filter(|r| r.no_egress && r.vpc.is_empty())
            .map(|r| r.address.as_str())
            .collect();
        if !closed.is_empty() {
            deny.push_str(&per_link(|l| {
                format!(
                    "    iifname \"{l}\" ip saddr {{ {} }} drop\n",
                    closed.join(", ")
                )
            }));
        }
        let vpc_bridges: BTreeSet<&String> = self.vpcs.values().collect();
        if !vpc_bridges.is_empty() {
            let names: Vec<String> = vpc_bridges.iter().map(|b| format!("\"{b}\"")).collect();
            deny.push_str(&per_link(|l| {
                format!(
                    "    iifname \"{l}\" oifname {{ {} }} drop\n",
                    names.join(", ")
                )
            }));
        }
        let input = per_link(|l| {
            format!(
                "    iifname \"{l}\" ct state established,related accept\n\
                 \x20   iifname \"{l}\" drop\n"
            )
        });
        let into = per_link(|l| {
            format!(
                "    oifname \"{l}\" ct state established,related accept\n\
                 \x20   oifname \"{l}\" ct status dnat accept\n\
                 \x20   oifname \"{l}\" drop\n"
            )
        });
        let replies =
            per_link(|l| format!("    iifname \"{l}\" ct state established,related accept\n"));
        let no_vxlan = per_link(|l| format!("    iifname \"{l}\" udp dport {VXLAN_PORT} drop\n"));
        let masquerade =
            per_link(|l| format!("    iifname \"{l}\" oifname != \"{l}\" masquerade\n"));
        let RoutedRules {
            untracked,
            fast,
            nat: routed_nat,
            ..
        } = routed;
        // Nothing of IPv6 is forwarded for an instance (its namespace has
        // none; this holds even where the node forwards IPv6).
        let no_ipv6 = per_link(|l| format!("    iifname \"{l}\" meta nfproto ipv6 drop\n"));
        let rules = format!(
            "table inet gpupool {{\n}}\n\
             delete table inet gpupool\n\
             table inet gpupool {{\n\
             \x20 chain raw {{\n\
             \x20   type filter hook prerouting priority raw; policy accept;\n\
             {untracked}\
             \x20 }}\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority filter; policy accept;\n\
             {input}\
             {vxlan_from}\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             {fast}\
             {same}\
             {no_ipv6}\
             {into}\
             {replies}\
             {deny}\
             {no_vxlan}\
             \x20 }}\n\
             \x20 chain prerouting {{\n\
             \x20   type nat hook prerouting priority dstnat; policy accept;\n\
             {dnat}\
             \x20 }}\n\
             \x20 chain output {{\n\
             \x20   type nat hook output priority -100; policy accept;\n\
             {dnat}\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             {routed_nat}\
             {masquerade}\
             \x20 }}\n\
             }}\n"
        );
        nft(None, &format!("{rules}{}", gateway_rules(&vxlans)))
    }
}

/// The links instances' traffic comes to the node on: overlay networks'
/// bridges (`gpbVNI`) and routed instances' veths (`gpr...`).
const INSTANCE_LINKS: [&str; 2] = ["gpb*", "gpr*"];

/// `line` of each of [`INSTANCE_LINKS`], one after the other.
fn per_link(line: impl Fn(&str) -> String) -> String {
    INSTANCE_LINKS.iter().map(|l| line(l)).collect()
}

/// A routed network on this node: its subnet and its instances here
/// (their node-side veth and address).
struct RoutedNet<'a> {
    subnet: &'a str,
    links: Vec<(&'a str, Ipv4Addr)>,
}

/// The routed networks among `records`, by VNI (a malformed subnet, name
/// or address left out).
fn routed_nets(records: &[Record]) -> BTreeMap<u32, RoutedNet<'_>> {
    let mut nets: BTreeMap<u32, RoutedNet<'_>> = BTreeMap::new();
    let routed = records
        .iter()
        .filter(|r| r.routed && r.vpc.is_empty() && is_cidr(&r.subnet));
    for r in routed {
        let net = nets.entry(r.vni).or_insert_with(|| RoutedNet {
            subnet: &r.subnet,
            links: Vec::new(),
        });
        // (An instance an older agent put on a routed network's bridge is
        // left to the bridge's rules: none of these accepts its traffic.)
        if let Ok(addr) = r.address.parse::<Ipv4Addr>()
            && is_ifname(&r.veth)
            && r.on_routed_link()
            && net.subnet == r.subnet
            && in_cidr(addr, net.subnet)
        {
            net.links.push((&r.veth, addr));
        }
    }
    nets
}

/// The `inet gpupool` rules of the routed networks, by where they go.
#[derive(Debug, Default)]
struct RoutedRules {
    /// Prerouting, before conntrack: a network's own traffic is let
    /// through statelessly (`fast`), so it is not tracked.
    untracked: String,
    /// Forward, first (what most packets take, in as few rules as can
    /// be): sources checked, then a network's own traffic accepted.
    fast: String,
    /// Forward, after the replies: no other routed network.
    between: String,
    /// Postrouting: no masquerade within a network.
    nat: String,
}

/// The rules of the routed networks `nets`. An instance sends only from
/// its own address, reaches its network's instances on this node and
/// (unmasqueraded, through the underlay `dev`) on other nodes, and no
/// other routed network's subnet; it is reached from the underlay only
/// from the addresses this node routes to other nodes (`remote`: the
/// network's instances there, by VNI). That traffic is not tracked, but
/// for replies from a `published` port (a connection DNAT made, to be
/// undone on the way back).
fn routed_rules(
    nets: &BTreeMap<u32, RoutedNet<'_>>,
    dev: Option<String>,
    remote: &BTreeMap<u32, BTreeSet<Ipv4Addr>>,
    published: &BTreeSet<u16>,
) -> RoutedRules {
    let mut r = RoutedRules::default();
    let dev = dev.filter(|d| is_ifname(d));
    let ports: Vec<String> = published.iter().map(u16::to_string).collect();
    let owners: Vec<String> = nets
        .values()
        .flat_map(|n| &n.links)
        .map(|(l, a)| format!("\"{l}\" . {a}"))
        .collect();
    if !owners.is_empty() {
        // One lookup: a routed link sends from its instance's address only.
        r.fast.push_str(&format!(
            "    iifname \"gpr*\" iifname . ip saddr != {{ {} }} drop\n",
            owners.join(", ")
        ));
    }
    for (vni, net) in nets.iter().filter(|(_, n)| !n.links.is_empty()) {
        let subnet = net.subnet;
        let links: Vec<String> = net.links.iter().map(|(l, _)| format!("\"{l}\"")).collect();
        let links = links.join(", ");
        if !ports.is_empty() {
            r.untracked.push_str(&format!(
                "    iifname {{ {links} }} ip daddr {subnet} tcp sport {{ {} }} return\n",
                ports.join(", ")
            ));
        }
        r.untracked.push_str(&format!(
            "    iifname {{ {links} }} ip daddr {subnet} notrack\n"
        ));
        let from = remote.get(vni).filter(|a| !a.is_empty());
        if let (Some(dev), Some(from)) = (&dev, from) {
            let from: Vec<String> = from.iter().map(Ipv4Addr::to_string).collect();
            let from = from.join(", ");
            r.fast.push_str(&format!(
                "    iifname {{ {links} }} oifname \"{dev}\" ip daddr {{ {from} }} accept\n"
            ));
            r.fast.push_str(&format!(
                "    iifname \"{dev}\" oifname {{ {links} }} ip saddr {{ {from} }} accept\n"
            ));
            r.untracked.push_str(&format!(
                "    iifname \"{dev}\" ip saddr {{ {from} }} ip daddr {subnet} notrack\n"
            ));
        }
        r.fast.push_str(&format!(
            "    iifname {{ {links} }} oifname {{ {links} }} accept\n"
        ));
        r.nat.push_str(&format!(
            "    iifname {{ {links} }} ip daddr {subnet} return\n"
        ));
    }
    if !nets.is_empty() {
        let all: BTreeSet<&str> = nets.values().map(|n| n.subnet).collect();
        let all: Vec<&str> = all.into_iter().collect();
        r.between = per_link(|l| {
            format!(
                "    iifname \"{l}\" ip daddr {{ {} }} drop\n",
                all.join(", ")
            )
        });
    }
    r
}

/// A routed instance's node-side veth `veth`: up, holding the network's
/// `gateway` (as a /32: the instance's next hop, answered here, routing
/// nothing) and the route to the instance's `address` through it.
fn route_to_veth(veth: &str, gateway: &str, address: &str) -> Result<(), NetError> {
    // No IPv6 on the node's end either (the rules drop it anyway), and ARP
    // answered for the gateway only, not for the node's other addresses.
    if let Err(err) = std::fs::write(format!("/proc/sys/net/ipv6/conf/{veth}/disable_ipv6"), "1") {
        tracing::debug!(%veth, %err, "cannot turn IPv6 off on a routed veth");
    }
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{veth}/arp_ignore"), "1")?;
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{veth}/arp_announce"), "2")?;
    ip(&["link", "set", veth, "up"])?;
    ip(&["addr", "add", &format!("{gateway}/32"), "dev", veth])?;
    ip(&[
        "route",
        "replace",
        &format!("{address}/32"),
        "dev",
        veth,
        "scope",
        "link",
    ])?;
    Ok(())
}

/// The `inet gpupool_sg` table of a custom network's instance, in its own
/// namespace: it receives what the ingress rules let in and sends what the
/// egress rules let out, and replies; nothing else (the instance's user
/// holds no capability over the namespace to change it).
fn security_rules(rules: &[Rule]) -> String {
    // Built from checked parts only (a malformed rule is left out: it
    // lets nothing through).
    let line = |r: &Rule| {
        if !is_cidr(&r.cidr) {
            return None;
        }
        let dir = if r.ingress { "saddr" } else { "daddr" };
        let addr = if r.cidr.ends_with("/0") {
            "meta nfproto ipv4".to_string()
        } else {
            format!("ip {dir} {}", r.cidr)
        };
        let what = match (r.protocol.as_str(), r.ports) {
            ("tcp" | "udp", (0, _)) => format!("meta l4proto {}", r.protocol),
            ("tcp" | "udp", (a, b)) if a == b => format!("{} dport {a}", r.protocol),
            ("tcp" | "udp", (a, b)) => format!("{} dport {a}-{b}", r.protocol),
            ("icmp", _) => "meta l4proto icmp".to_string(),
            ("all", _) => String::new(),
            _ => return None,
        };
        Some(format!("    {addr} {what} accept\n"))
    };
    let ingress: String = rules
        .iter()
        .filter(|r| r.ingress)
        .filter_map(line)
        .collect();
    let egress: String = rules
        .iter()
        .filter(|r| !r.ingress)
        .filter_map(line)
        .collect();
    format!(
        "table inet gpupool_sg {{\n}}\n\
         delete table inet gpupool_sg\n\
         table inet gpupool_sg {{\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy drop;\n\
         \x20   iifname \"lo\" accept\n\
         \x20   ct state established,related accept\n\
         {ingress}\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter; policy drop;\n\
         \x20   oifname \"lo\" accept\n\
         \x20   ct state established,related accept\n\
         {egress}\
         \x20 }}\n\
         }}\n"
    )
}

/// Loads `rules` into namespace `netns` (the node's own when None).
fn nft(netns: Option<&str>, rules: &str) -> Result<(), NetError> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Command(format!("nft: {e} (install nftables)")))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(NetError::Command(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A hosts file: localhost, then each name with its address; an entry
/// that is not an IPv4 address and one plain name is left out.
fn hosts_text(hosts: &BTreeMap<String, String>) -> String {
    let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
    for (name, addr) in hosts {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if plain && addr.parse::<Ipv4Addr>().is_ok() {
            text.push_str(&format!("{addr}\t{name}\n"));
        }
    }
    text
}

/// Writes `path` whole or not at all (a crash leaves the old file).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// This agent's routes into `subnet`: address -> the node it goes via.
fn our_routes(subnet: &str) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
    let Ok(out) = ip(&[
        "-4",
        "-o",
        "route",
        "show",
        "proto",
        ROUTE_PROTO,
        "root",
        subnet,
    ]) else {
        return BTreeMap::new();
    };
    out.lines().filter_map(parse_route_line).collect()
}

/// `10.144.0.5 via 10.0.0.12 dev eth0 ...` -> (10.144.0.5, 10.0.0.12).
fn parse_route_line(line: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let mut words = line.split_whitespace();
    let dst = words.next()?;
    let dst = dst.strip_suffix("/32").unwrap_or(dst).parse().ok()?;
    let via = words.skip_while(|w| *w != "via").nth(1)?.parse().ok()?;
    Some((dst, via))
}

/// `10.144.0.0/22` -> (its base address, 22); None when malformed.
fn cidr_parts(cidr: &str) -> Option<(u32, u32)> {
    let (base, len) = cidr.split_once('/')?;
    let (base, len) = (base.parse::<Ipv4Addr>().ok()?, len.parse::<u32>().ok()?);
    (len <= 32).then_some((u32::from(base), len))
}

/// The netmask of a prefix length (0..=32).
fn prefix_mask(len: u32) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

/// Whether `addr` is in `cidr` (`10.144.0.0/22`); false when malformed.
fn in_cidr(addr: Ipv4Addr, cidr: &str) -> bool {
    cidr_parts(cidr)
        .is_some_and(|(base, len)| u32::from(addr) & prefix_mask(len) == base & prefix_mask(len))
}

fn bridge(vni: u32) -> String {
    format!("gpb{vni}")
}

fn vxlan(vni: u32) -> String {
    format!("gpx{vni}")
}

/// The gateway's MAC: locally administered, the same on every node.
fn gateway_mac(vni: u32) -> String {
    format!(
        "02:67:70:{:02x}:{:02x}:{:02x}",
        (vni >> 16) & 0xff,
        (vni >> 8) & 0xff,
        vni & 0xff
    )
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetError::Command(format!("{program}: {e} (install iproute2)")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args)
}

fn bridge_cmd(args: &[&str]) -> Result<String, NetError> {
    run("bridge", args)
}

// Links are asked of `ip`, not read under /sys/class/net: sysfs shows the
// namespace it was mounted in, which is not this process's own when it
// entered a network namespace without remounting it (nsenter --net).

/// `ip -o link show` lines: `IDX: NAME[@PEER]: <FLAGS> mtu N ...`.
fn link_lines(name: Option<&str>) -> Vec<String> {
    let mut args = vec!["-o", "link", "show"];
    if let Some(n) = name {
        args.extend(["dev", n]);
    }
    ip(&args)
        .map(|out| out.lines().map(String::from).collect())
        .unwrap_or_default()
}

/// The name and MTU of one `ip -o link show` line.
fn parse_link_line(line: &str) -> Option<(String, Option<u32>)> {
    let mut fields = line.split_whitespace();
    let name = fields.nth(1)?.trim_end_matches(':');
    let name = name.split('@').next()?.to_string();
    let mut mtu = None;
    while let Some(f) = fields.next() {
        if f == "mtu" {
            mtu = fields.next().and_then(|m| m.parse().ok());
            break;
        }
    }
    Some((name, mtu))
}

fn link_exists(name: &str) -> bool {
    link_lines(Some(name))
        .iter()
        .filter_map(|l| parse_link_line(l))
        .any(|(n, _)| n == name)
}

fn link_mtu(name: &str) -> Option<u32> {
    link_lines(Some(name))
        .iter()
        .filter_map(|l| parse_link_line(l))
        .find(|(n, _)| n == name)
        .and_then(|(_, mtu)| mtu)
}

fn links_named(prefix: &str) -> Vec<String> {
    link_lines(None)
        .iter()
        .filter_map(|l| parse_link_line(l))
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The link that holds `local` and its prefix length, from `ip -o -4
/// addr show` (`IDX: DEV    inet A.B.C.D/LEN ...`).
fn underlay(local: Ipv4Addr) -> Option<(String, u8)> {
    let out = ip(&["-o", "-4", "addr", "show"]).ok()?;
    let needle = format!("inet {local}/");
    let line = out.lines().find(|l| l.contains(&needle))?;
    let dev = line.split_whitespace().nth(1)?;
    let dev = dev.split('@').next().unwrap_or(dev).to_string();
    let len: u8 = line
        .split(&needle)
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    (len <= 32).then_some((dev, len))
}

/// The MTU of the link that holds `local` (1500 if not found).
fn underlay_mtu(local: Ipv4Addr) -> u32 {
    underlay(local)
        .and_then(|(dev, _)| link_mtu(&dev))
        .unwrap_or(1500)
}

/// The subnet of the link that holds `local` (`10.0.0.0/24`).
fn underlay_cidr(local: Ipv4Addr) -> Option<String> {
    let (_, len) = underlay(local)?;
    let mask = prefix_mask(u32::from(len));
    Some(format!("{}/{len}", Ipv4Addr::from(u32::from(local) & mask)))
}

/// A plain interface name (what `ip` and `nft` take as one word).
pub(crate) fn is_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `A.B.C.D/LEN`, LEN 0..=32 in digits.
pub(crate) fn is_cidr(text: &str) -> bool {
    text.split_once('/').is_some_and(|(ip, len)| {
        ip.parse::<Ipv4Addr>().is_ok()
            && !len.is_empty()
            && len.bytes().all(|b| b.is_ascii_digit())
            && len.parse::<u8>().is_ok_and(|l| l <= 32)
    })
}

/// The input rules that take each network's VXLAN only from the nodes it
/// floods to (its peers), matched on the VNI in the VXLAN header, and no
/// VXLAN for a network this node does not hold: a frame from anywhere else
/// would land on a tenant's bridge. None while this node has no VXLAN
/// device.
fn vxlan_sources(vxlans: &[String]) -> String {
    let nets: BTreeMap<u32, BTreeSet<Ipv4Addr>> = vxlans
        .iter()
        .filter_map(|vx| Some((vx.strip_prefix("gpx")?.parse().ok()?, vx)))
        .map(|(vni, vx)| {
            let peers = flood_entries(vx)
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect();
            (vni, peers)
        })
        .collect();
    vxlan_rules(&nets)
}

/// The VNI: bits 96..120 of the UDP datagram (8 bytes of UDP header, then
/// flags and 3 reserved bytes of VXLAN's).
fn vxlan_rules(nets: &BTreeMap<u32, BTreeSet<Ipv4Addr>>) -> String {
    if nets.is_empty() {
        return String::new();
    }
    let vni = "@th,96,24";
    let mut out = String::new();
    for (id, peers) in nets {
        if peers.is_empty() {
            out.push_str(&format!("    udp dport {VXLAN_PORT} {vni} {id} drop\n"));
        } else {
            let set: Vec<String> = peers.iter().map(Ipv4Addr::to_string).collect();
            out.push_str(&format!(
                "    udp dport {VXLAN_PORT} {vni} {id} ip saddr != {{ {} }} drop\n",
                set.join(", ")
            ));
        }
    }
    let ids: Vec<String> = nets.keys().map(u32::to_string).collect();
    out.push_str(&format!(
        "    udp dport {VXLAN_PORT} {vni} != {{ {} }} drop\n    udp dport {VXLAN_PORT} meta nfproto ipv6 drop\n",
        ids.join(", ")
    ));
    out
}

/// The `bridge gpupool` table: each node's gateway is its own (the same
/// address and MAC on every node), so no frame from a gateway's MAC
/// crosses a VXLAN, either way (a node's ARP for an address in the
/// network stays on its bridge, another node's gateway's answer to an
/// instance here does not come in, and no bridge sees its own MAC arrive
/// from another node). None while this node has no VXLAN device.
fn gateway_rules(vxlans: &[String]) -> String {
    let head = "table bridge gpupool {\n}\ndelete table bridge gpupool\n";
    let macs: BTreeSet<String> = vxlans
        .iter()
        .filter_map(|vx| vx.strip_prefix("gpx")?.parse::<u32>().ok())
        .map(gateway_mac)
        .collect();
    if macs.is_empty() {
        return head.to_string();
    }
    let macs: Vec<String> = macs.into_iter().collect();
    let macs = macs.join(", ");
    format!(
        "{head}table bridge gpupool {{\n\
         \x20 chain prerouting {{\n\
         \x20   type filter hook prerouting priority filter; policy accept;\n\
         \x20   iifname \"gpx*\" ether saddr {{ {macs} }} drop\n\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter; policy accept;\n\
         \x20   oifname \"gpx*\" ether saddr {{ {macs} }} drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   oifname \"gpx*\" ether saddr {{ {macs} }} drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// The all-zero (flood) destinations of a VXLAN device.
fn flood_entries(vx: &str) -> BTreeSet<String> {
    bridge_cmd(&["fdb", "show", "dev", vx])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("00:00:00:00:00:00"))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "dst")?;
            w.next().map(String::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_differ_per_agent() {
        let a = Networks::new(tempfile::tempdir().unwrap().path(), "10.0.0.1").unwrap();
        let b = Networks::new(tempfile::tempdir().unwrap().path(), "10.0.0.1").unwrap();
        let (ns, veth, temp) = a.names("j-000001-0", false);
        assert!(veth.len() <= 15 && temp.len() <= 15, "{veth} {temp}");
        let (_, routed, _) = a.names("j-000001-0", true);
        assert!(routed.len() <= 15 && routed.starts_with("gpr"), "{routed}");
        assert!(veth.starts_with("gv"), "{veth}");
        assert_ne!(
            a.names("j-000001-0", false).0,
            b.names("j-000001-0", false).0
        );
        assert_ne!(ns, a.names("j-000001-1", false).0);
        assert!(bridge(0x10_0000 + 1023).len() <= 15);
        assert_eq!(gateway_mac(0x10_0003), "02:67:70:10:00:03");
    }

    #[test]
    fn a_link_line_gives_its_name_and_mtu() {
        let veth = "7: gv2d36ec01@if4: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc noqueue \\    link/ether de:4f";
        assert_eq!(
            parse_link_line(veth),
            Some(("gv2d36ec01".to_string(), Some(1450)))
        );
        let br = "5: gpb1052671: <BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue state UP";
        assert_eq!(
            parse_link_line(br),
            Some(("gpb1052671".to_string(), Some(1500)))
        );
        assert_eq!(parse_link_line(""), None);
    }

    #[test]
    fn security_rules_let_through_what_they_name_and_malformed_ones_nothing() {
        let rule = |ingress, protocol: &str, ports, cidr: &str| Rule {
            ingress,
            protocol: protocol.into(),
            ports,
            cidr: cidr.into(),
        };
        let text = security_rules(&[
            rule(true, "tcp", (9000, 9000), "192.168.1.0/24"),
            rule(false, "udp", (53, 54), "0.0.0.0/0"),
            rule(false, "icmp", (0, 0), "10.0.0.1/32"),
            // Left out: not a CIDR, an injection, an unknown protocol.
            rule(true, "tcp", (22, 22), "any"),
            rule(true, "tcp", (22, 22), "1.2.3.4/32 accept; policy accept"),
            rule(true, "gre", (0, 0), "10.0.0.0/8"),
        ]);
        assert!(
            text.contains("ip saddr 192.168.1.0/24 tcp dport 9000 accept"),
            "{text}"
        );
        assert!(
            text.contains("meta nfproto ipv4 udp dport 53-54 accept"),
            "{text}"
        );
        assert!(
            text.contains("ip daddr 10.0.0.1/32 meta l4proto icmp accept"),
            "{text}"
        );
        assert_eq!(text.matches(" accept\n").count(), 4 + 3, "{text}");
        assert_eq!(text.matches("policy drop").count(), 2);
        assert!(!text.contains("dport 22"), "{text}");
    }

    #[test]
    fn routed_instances_send_from_their_address_only_and_are_reached_from_the_underlay() {
        let rec = |id: &str, vni: u32, subnet: &str, address: &str, routed: bool| Record {
            instance_id: id.into(),
            netns: String::new(),
            veth: format!("gpr{id}"),
            vni,
            subnet: subnet.into(),
            gateway: String::new(),
            address: address.into(),
            port: 0,
            vpc: String::new(),
            no_egress: false,
            routed,
        };
        let records = [
            rec("a", 0x10_0001, "10.144.0.0/22", "10.144.0.2", true),
            rec("b", 0x10_0001, "10.144.0.0/22", "10.144.0.3", true),
            rec("c", 0x10_0002, "10.144.4.0/22", "10.144.4.2", false),
            rec("d", 0x10_0003, "10.144.8.0/22; drop", "10.144.8.2", true),
            // An address outside its subnet, a name nft would misread.
            rec("e", 0x10_0004, "10.144.12.0/22", "10.144.0.2", true),
            rec("f\"", 0x10_0004, "10.144.12.0/22", "10.144.12.3", true),
        ];
        let h = |a: &str| a.parse::<Ipv4Addr>().unwrap();
        let remote = BTreeMap::from([
            (
                0x10_0001,
                BTreeSet::from([h("10.144.0.7"), h("10.144.0.9")]),
            ),
            (0x10_0002, BTreeSet::from([h("10.144.4.2")])),
        ]);
        let nets = routed_nets(&records);
        assert!(nets[&0x10_0004].links.is_empty());
        let published = BTreeSet::from([8000, 8080]);
        let RoutedRules {
            untracked,
            fast,
            between,
            nat,
        } = routed_rules(&nets, Some("eth0".into()), &remote, &published);
        // Replies from a published port are tracked (DNAT is undone on
        // them); the rest of the network's own traffic is not.
        assert_eq!(
            untracked,
            "    iifname { \"gpra\", \"gprb\" } ip daddr 10.144.0.0/22 tcp sport { 8000, 8080 } return\n\
             \x20   iifname { \"gpra\", \"gprb\" } ip daddr 10.144.0.0/22 notrack\n\
             \x20   iifname \"eth0\" ip saddr { 10.144.0.7, 10.144.0.9 } ip daddr 10.144.0.0/22 notrack\n"
        );
        assert_eq!(
            routed_rules(&nets, Some("eth0".into()), &remote, &BTreeSet::new())
                .untracked
                .lines()
                .count(),
            2
        );
        // Sources in one lookup (e's address is not in its subnet, f's
        // name not plain: neither is an owner, so both links send nothing),
        // then out to the network's instances elsewhere, in from them, and
        // between its instances here.
        assert_eq!(
            fast,
            "    iifname \"gpr*\" iifname . ip saddr != { \"gpra\" . 10.144.0.2, \"gprb\" . 10.144.0.3 } drop\n\
             \x20   iifname { \"gpra\", \"gprb\" } oifname \"eth0\" ip daddr { 10.144.0.7, 10.144.0.9 } accept\n\
             \x20   iifname \"eth0\" oifname { \"gpra\", \"gprb\" } ip saddr { 10.144.0.7, 10.144.0.9 } accept\n\
             \x20   iifname { \"gpra\", \"gprb\" } oifname { \"gpra\", \"gprb\" } accept\n"
        );
        assert_eq!(
            between,
            "    iifname \"gpb*\" ip daddr { 10.144.0.0/22, 10.144.12.0/22 } drop\n\
             \x20   iifname \"gpr*\" ip daddr { 10.144.0.0/22, 10.144.12.0/22 } drop\n"
        );
        assert_eq!(
            nat,
            "    iifname { \"gpra\", \"gprb\" } ip daddr 10.144.0.0/22 return\n"
        );
        // No underlay found, a name nft would misread, or no instance on
        // another node: nothing crosses the underlay, in or out.
        let none = BTreeSet::new();
        for rules in [
            routed_rules(&nets, None, &remote, &none),
            routed_rules(&nets, Some("e\"th0".into()), &remote, &none),
            routed_rules(&nets, Some("eth0".into()), &BTreeMap::new(), &none),
        ] {
            assert!(!rules.fast.contains("eth0"), "{}", rules.fast);
            assert!(!rules.untracked.contains("saddr"), "{}", rules.untracked);
        }
        // An instance an older agent put on the network's bridge (a `gv`
        // veth) gets none of these rules: the bridge's hold it.
        let old = [Record {
            veth: "gv0a0b0c0d".into(),
            ..rec("g", 0x10_0005, "10.144.16.0/22", "10.144.16.2", true)
        }];
        assert!(routed_nets(&old)[&0x10_0005].links.is_empty());
        let empty = routed_rules(&routed_nets(&[]), Some("eth0".into()), &remote, &published);
        assert!(
            [empty.untracked, empty.fast, empty.between, empty.nat]
                .iter()
                .all(String::is_empty)
        );
    }

    #[test]
    fn a_network_is_refused_in_the_other_mode_or_with_a_subnet_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let n = Networks::new(dir.path(), "192.0.2.1").unwrap();
        let a = Attach {
            name: "tenant/acme".into(),
            vni: 0x10_0001,
            subnet: "10.144.0.0/22".into(),
            gateway: "10.144.0.1".into(),
            address: "10.144.0.2".into(),
            routed: true,
            ..Default::default()
        };
        let addr: Ipv4Addr = "10.144.0.2".parse().unwrap();
        assert!(n.check_overlay_or_routed(&a, addr).is_ok());
        for subnet in [
            "10.144.0.1/22",
            "0.0.0.0/0",
            "10.144.4.0/22",
            "10.144.0.0/31",
            "x",
        ] {
            let bad = Attach {
                subnet: subnet.into(),
                ..a.clone()
            };
            let err = n
                .check_overlay_or_routed(&bad, addr)
                .unwrap_err()
                .to_string();
            assert!(err.contains("subnet"), "{subnet}: {err}");
        }
        // An overlay instance of the network lives here.
        let record = Record {
            instance_id: "i-1".into(),
            netns: String::new(),
            veth: String::new(),
            vni: a.vni,
            subnet: a.subnet.clone(),
            gateway: a.gateway.clone(),
            address: "10.144.0.3".into(),
            port: 0,
            vpc: String::new(),
            no_egress: false,
            routed: false,
        };
        std::fs::write(n.record_path("i-1"), serde_json::to_vec(&record).unwrap()).unwrap();
        let err = n.check_overlay_or_routed(&a, addr).unwrap_err().to_string();
        assert!(
            err.contains("runs overlay") && err.contains("mode changed"),
            "{err}"
        );
        let overlay = Attach {
            routed: false,
            ..a.clone()
        };
        assert!(n.check_overlay_or_routed(&overlay, addr).is_ok());
    }

    #[test]
    fn routes_are_read_back_and_addresses_placed_in_subnets() {
        assert_eq!(
            parse_route_line("10.144.0.5 via 10.0.0.12 dev eth0 proto 201 "),
            Some(("10.144.0.5".parse().unwrap(), "10.0.0.12".parse().unwrap()))
        );
        assert_eq!(
            parse_route_line("10.144.0.0/22 dev gpb1 proto kernel"),
            None
        );
        let a: Ipv4Addr = "10.144.3.7".parse().unwrap();
        assert!(in_cidr(a, "10.144.0.0/22") && in_cidr(a, "0.0.0.0/0"));
        assert!(!in_cidr(a, "10.144.4.0/22") && !in_cidr(a, "10.144.0.0/33"));
        assert!(!in_cidr(a, "10.144.0.0") && !in_cidr(a, "x/22"));
    }

    #[test]
    fn no_gateway_frame_crosses_a_vxlan() {
        let rules = gateway_rules(&["gpx1048577".into(), "gpx1048578".into(), "gpxbad".into()]);
        assert!(rules.starts_with("table bridge gpupool {\n}\ndelete table bridge gpupool\n"));
        for hook in ["iifname", "oifname"] {
            assert!(
                rules.contains(&format!(
                    "{hook} \"gpx*\" ether saddr {{ 02:67:70:10:00:01, 02:67:70:10:00:02 }} drop"
                )),
                "{rules}"
            );
        }
        assert_eq!(
            gateway_rules(&[]),
            "table bridge gpupool {\n}\ndelete table bridge gpupool\n"
        );
    }

    #[test]
    fn vxlan_is_taken_from_each_network_s_peers_only() {
        let peers: BTreeSet<Ipv4Addr> = ["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()]
            .into_iter()
            .collect();
        let nets = BTreeMap::from([(0x10_0001, peers), (0x10_0002, BTreeSet::new())]);
        assert_eq!(
            vxlan_rules(&nets),
            "    udp dport 4789 @th,96,24 1048577 ip saddr != { 10.0.0.2, 10.0.0.3 } drop\n\
             \x20   udp dport 4789 @th,96,24 1048578 drop\n\
             \x20   udp dport 4789 @th,96,24 != { 1048577, 1048578 } drop\n\
             \x20   udp dport 4789 meta nfproto ipv6 drop\n"
        );
        assert_eq!(vxlan_rules(&BTreeMap::new()), "");
        assert_eq!(vxlan_sources(&[]), "");
    }

    #[test]
    fn an_address_that_is_not_ipv4_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Networks::new(dir.path(), "node-1.example").is_err());
    }
}
