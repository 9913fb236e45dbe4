//! Nodes: inventory as reported by agents, readiness from heartbeats.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_total_mib: u64,
    pub healthy: bool,
    #[serde(default)]
    pub health_reason: String,
    #[serde(default)]
    pub mig_enabled: bool,
    #[serde(default)]
    pub pci_bus_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    pub cpu_cores: u32,
    #[serde(default)]
    pub cpu_model: String,
    pub memory_mib: u64,
    pub gpus: Vec<Gpu>,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub az: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub fake_gpus: bool,
    /// Address other nodes reach this one at.
    #[serde(default)]
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Ready,
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub node_id: String,
    pub inventory: Inventory,
    pub status: NodeStatus,
    pub registered_at_ms: i64,
    pub last_heartbeat_ms: i64,
    /// "public" or a dedicated pool id.
    pub pool: String,
    #[serde(default)]
    pub cordoned: bool,
    /// SHA-256 (hex) of the node's own credential, issued at its first
    /// registration; Register and Session for this node id need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_sha256: Option<String>,
    /// The agent opened a session with that credential (so it kept it):
    /// from then on only it registers the node.
    #[serde(default)]
    pub credential_confirmed: bool,
    /// Revoked by the admin: it may not register until readmitted.
    #[serde(default)]
    pub revoked: bool,
    /// Being emptied for maintenance (`gpupool node drain`): cordoned, its
    /// instances moved off or stopped; `uncordon` ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    /// The release its agent runs, from its last registration (empty for a
    /// node last registered by a release before 0.2.0, which kept none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
}

/// A node's drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub started_at_ms: i64,
    /// From then on, what still runs there is stopped, notebooks included.
    pub deadline_ms: Option<i64>,
    /// Stop notebooks, TensorBoards and jobs without retries at once
    /// instead of waiting for them (or for the deadline).
    pub force: bool,
}

impl Node {
    /// The address other nodes and clients reach it at (its hostname when
    /// the agent advertises none).
    pub fn address(&self) -> &str {
        if self.inventory.address.is_empty() {
            &self.inventory.hostname
        } else {
            &self.inventory.address
        }
    }

    /// True when the last heartbeat is older than `grace_ms` at `now_ms`.
    pub fn heartbeat_expired(&self, now_ms: i64, grace_ms: i64) -> bool {
        now_ms - self.last_heartbeat_ms > grace_ms
    }

    /// Spec (flavor) name derived from the inventory, e.g.
    /// `gpu-8xH100-80GB-192c-1024g` or `cpu-64c-256g`.
    pub fn spec_name(&self) -> String {
        let inv = &self.inventory;
        let mem_gib = inv.memory_mib.div_ceil(1024);
        match inv.gpus.first() {
            Some(first) => {
                let model: String = first
                    .model
                    .trim_start_matches("NVIDIA ")
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                format!(
                    "gpu-{}x{}-{}c-{}g",
                    inv.gpus.len(),
                    model,
                    inv.cpu_cores,
                    mem_gib
                )
            }
            None => format!("cpu-{}c-{}g", inv.cpu_cores, mem_gib),
        }
    }
}

/// Who an agent call comes from, as the access layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentIdentity {
    /// It presented the credential with this SHA-256, which was node
    /// `node_id`'s when the call came in (checked again when it acts).
    Node {
        node_id: String,
        credential_sha256: String,
    },
    /// It presented the cluster join token (or the cluster has none and
    /// listens on loopback only): it may enrol a node that has no
    /// confirmed credential yet, and nothing else.
    Bootstrap,
}

impl AgentIdentity {
    /// True when this is `node`'s current credential.
    fn is_credential_of(&self, node: &Node) -> bool {
        matches!(self, AgentIdentity::Node { node_id, credential_sha256 }
            if *node_id == node.node_id
                && node.credential_sha256.as_deref() == Some(credential_sha256.as_str()))
    }
}

/// Why a node may not register or open a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    #[error(
        "node {node_id} is enrolled with its own credential and this call did not present it \
         (a join token or another node's credential never stands in for it)"
    )]
    NotItsCredential { node_id: String },
    #[error("the credential presented belongs to node {owner}, not {node_id}")]
    OtherNode { node_id: String, owner: String },
    #[error(
        "node {node_id} was revoked by the admin; `gpupool node readmit {node_id}` lets it enrol again"
    )]
    Revoked { node_id: String },
    #[error("a session needs the node's own credential (register first)")]
    NoCredential,
}

/// What a registration of `node_id` from `identity` may do, given the node
/// as it is known (`None`: a new node id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The node proved it is itself: nothing to issue.
    Known,
    /// A node without a confirmed credential enrols: it gets a new one.
    Enrol,
}

/// The rule for Register: a node whose credential is confirmed (it opened
/// a session with it) must present it; one without (new, older than
/// credentials, or whose agent never used the one it was issued: an agent
/// that crashed before keeping it, or one too old to keep it) enrols
/// through the bootstrap; a revoked node does neither.
pub fn admit_registration(
    node_id: &str,
    known: Option<&Node>,
    identity: &AgentIdentity,
) -> Result<Admission, NodeAuthError> {
    if known.is_some_and(|n| n.revoked) {
        return Err(NodeAuthError::Revoked {
            node_id: node_id.to_string(),
        });
    }
    if let AgentIdentity::Node { node_id: owner, .. } = identity
        && owner != node_id
    {
        return Err(NodeAuthError::OtherNode {
            node_id: node_id.to_string(),
            owner: owner.clone(),
        });
    }
    match known {
        Some(n) if identity.is_credential_of(n) => Ok(Admission::Known),
        Some(n) if n.credential_confirmed && n.credential_sha256.is_some() => {
            Err(NodeAuthError::NotItsCredential {
                node_id: node_id.to_string(),
            })
        }
        _ => Ok(Admission::Enrol),
    }
}

/// The rule for Session, checked when the hello arrives: only the node's
/// current credential opens (or replaces) its session, never a revoked
/// node's.
pub fn admit_session(node: &Node, identity: &AgentIdentity) -> Result<(), NodeAuthError> {
    if node.revoked {
        return Err(NodeAuthError::Revoked {
            node_id: node.node_id.clone(),
        });
    }
    match identity {
        _ if identity.is_credential_of(node) => Ok(()),
        AgentIdentity::Node { node_id: owner, .. } if *owner != node.node_id => {
            Err(NodeAuthError::OtherNode {
                node_id: node.node_id.clone(),
                owner: owner.clone(),
            })
        }
        AgentIdentity::Node { .. } => Err(NodeAuthError::NotItsCredential {
            node_id: node.node_id.clone(),
        }),
        AgentIdentity::Bootstrap => Err(NodeAuthError::NoCredential),
    }
}

/// The version-skew policy between agents and the scheduler: an agent may
/// run the scheduler's own release or be at most one minor version behind
/// it, with the same major version (upgrade the scheduler first, then the
/// agents, one node at a time). Refused, with the reason: an older agent, a
/// newer one, or a version that is not `MAJOR.MINOR.PATCH`.
pub fn check_agent_version(agent: &str, scheduler: &str) -> Result<(), String> {
    fn parse(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.trim().split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let v = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(v)
    }
    // Kept on the node and shown by `node list`: a short version string.
    let usable = agent.len() <= 64 && agent.chars().all(|c| c.is_ascii_graphic());
    let (Some(a), Some(s)) = (parse(agent).filter(|_| usable), parse(scheduler)) else {
        let shown: String = agent.chars().take(64).collect();
        return Err(format!(
            "agent version {shown:?} is not MAJOR.MINOR.PATCH (this scheduler is {scheduler})"
        ));
    };
    let allowed = format!(
        "agents may run {}.{}.x or {}.{}.x (at most one minor version behind the scheduler)",
        s.0,
        s.1.saturating_sub(1),
        s.0,
        s.1
    );
    if a.0 != s.0 || a.1 > s.1 || a.1 + 1 < s.1 {
        let which = if (a.0, a.1) > (s.0, s.1) {
            "newer than this scheduler: upgrade the scheduler first"
        } else {
            "too old for this scheduler: upgrade the agent"
        };
        return Err(format!("agent {agent} is {which} ({scheduler}); {allowed}"));
    }
    Ok(())
}

/// A node id an agent may register: 1 to 253 letters, digits, `.`, `_`,
/// `-` and `:` (host names and the ids `gpupool-agent` makes), not `.` or
/// `..`. It names the node in URLs, paths and logs, where a `/`, `?` or
/// space of a rogue agent's would become something else.
pub fn check_node_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node id {:?} must be 1 to 253 letters, digits, '.', '_', '-' or ':'",
            id.chars().take(64).collect::<String>()
        ))
    }
}

/// The address an agent says it is reached at: empty (its host name is
/// used), an IP address, or a host name — nothing that would add a path,
/// a user or a port to the URLs made of it (a notebook's "open" link).
pub fn check_node_address(address: &str) -> Result<(), String> {
    let host_name = !address.is_empty()
        && address.len() <= 253
        && address.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if address.is_empty() || address.parse::<std::net::IpAddr>().is_ok() || host_name {
        Ok(())
    } else {
        Err(format!(
            "node address {:?} is neither an IP address nor a host name",
            address.chars().take(64).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_ids_and_addresses_stay_plain() {
        for ok in ["vm-1", "gpu-node.dc1.example.org", "extra_a100", "host:2"] {
            assert!(super::check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../../jobs/j-1/cancel?",
            "a b",
            "a/b",
            "a?b",
            "x\u{1b}[2J",
        ] {
            assert!(super::check_node_id(bad).is_err(), "{bad:?}");
        }
        for ok in ["", "10.0.0.5", "::1", "gpu-1.example.org", "vm-1"] {
            assert!(super::check_node_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example/x",
            "user@host",
            "host:8080",
            "a..b",
            "javascript:alert(1)",
            "h#x",
        ] {
            assert!(super::check_node_address(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn agents_may_be_one_minor_version_behind_and_never_ahead() {
        for ok in ["1.4.0", "1.4.9", "1.3.2", "1.4.0-rc.1"] {
            assert_eq!(check_agent_version(ok, "1.4.2"), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("1.2.9", "too old"),
            ("1.5.0", "newer than this scheduler"),
            ("2.4.0", "newer than this scheduler"),
            ("0.9.0", "too old"),
            ("rogue", "not MAJOR.MINOR.PATCH"),
            ("", "not MAJOR.MINOR.PATCH"),
            ("1.4", "not MAJOR.MINOR.PATCH"),
            ("1.4.0-\u{1b}[2J", "not MAJOR.MINOR.PATCH"),
        ] {
            let err = check_agent_version(bad, "1.4.2").unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(
                err.contains("1.3.x or 1.4.x") || says.starts_with("not"),
                "{err}"
            );
        }
        // A first minor release: only its own minor's agents and the
        // previous one's.
        assert!(check_agent_version("0.0.5", "0.1.0").is_ok());
    }

    fn cred(node: &str, sha: &str) -> AgentIdentity {
        AgentIdentity::Node {
            node_id: node.into(),
            credential_sha256: sha.into(),
        }
    }

    #[test]
    fn only_a_node_s_own_credential_acts_for_it() {
        let mut n = node(0);
        let own = cred("n1", "abc");
        let stale = cred("n1", "old");
        let other = cred("n2", "xyz");
        let boot = AgentIdentity::Bootstrap;
        // New node id: the bootstrap enrols it; another node's credential does not.
        assert_eq!(admit_registration("n1", None, &boot), Ok(Admission::Enrol));
        assert!(matches!(
            admit_registration("n1", None, &other),
            Err(NodeAuthError::OtherNode { .. })
        ));
        // A node from before credentials enrols once.
        assert_eq!(
            admit_registration("n1", Some(&n), &boot),
            Ok(Admission::Enrol)
        );
        // Issued but never used in a session: it may enrol again.
        n.credential_sha256 = Some("abc".into());
        assert_eq!(
            admit_registration("n1", Some(&n), &boot),
            Ok(Admission::Enrol)
        );
        assert_eq!(
            admit_registration("n1", Some(&n), &own),
            Ok(Admission::Known)
        );
        // Confirmed: only that credential.
        n.credential_confirmed = true;
        assert_eq!(
            admit_registration("n1", Some(&n), &own),
            Ok(Admission::Known)
        );
        for id in [&boot, &stale] {
            assert!(matches!(
                admit_registration("n1", Some(&n), id),
                Err(NodeAuthError::NotItsCredential { .. })
            ));
        }
        assert!(matches!(
            admit_registration("n1", Some(&n), &other),
            Err(NodeAuthError::OtherNode { .. })
        ));
        assert_eq!(admit_session(&n, &own), Ok(()));
        assert!(admit_session(&n, &other).is_err());
        assert!(admit_session(&n, &stale).is_err());
        assert_eq!(admit_session(&n, &boot), Err(NodeAuthError::NoCredential));
        // Revoked: nothing, not even a session opened before the revocation
        // with the credential it had.
        n.revoked = true;
        n.credential_sha256 = None;
        for id in [&own, &other, &boot] {
            assert!(matches!(
                admit_registration("n1", Some(&n), id),
                Err(NodeAuthError::Revoked { .. })
            ));
            assert!(matches!(
                admit_session(&n, id),
                Err(NodeAuthError::Revoked { .. })
            ));
        }
    }

    fn node(gpus: usize) -> Node {
        Node {
            node_id: "n1".into(),
            inventory: Inventory {
                hostname: "h".into(),
                cpu_cores: 192,
                memory_mib: 1024 * 1024,
                gpus: (0..gpus)
                    .map(|i| Gpu {
                        index: i as u32,
                        uuid: format!("GPU-{i}"),
                        model: "NVIDIA H100 80GB HBM3".into(),
                        memory_total_mib: 81559,
                        healthy: true,
                        health_reason: String::new(),
                        mig_enabled: false,
                        pci_bus_id: String::new(),
                    })
                    .collect(),
                ..Default::default()
            },
            status: NodeStatus::Ready,
            registered_at_ms: 0,
            last_heartbeat_ms: 1_000,
            pool: "public".into(),
            cordoned: false,
            credential_sha256: None,
            credential_confirmed: false,
            revoked: false,
            drain: None,
            agent_version: String::new(),
        }
    }

    #[test]
    fn spec_names_are_readable() {
        assert_eq!(node(8).spec_name(), "gpu-8xH100-80GB-HBM3-192c-1024g");
        assert_eq!(node(0).spec_name(), "cpu-192c-1024g");
    }

    #[test]
    fn heartbeat_expiry_is_strictly_after_grace() {
        let n = node(0);
        assert!(!n.heartbeat_expired(6_000, 5_000));
        assert!(n.heartbeat_expired(6_001, 5_000));
    }
}
