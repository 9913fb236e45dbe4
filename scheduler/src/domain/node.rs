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
    /// Revoked by the admin: it may not register until readmitted.
    #[serde(default)]
    pub revoked: bool,
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
    /// It presented this node's own credential.
    Node(String),
    /// It presented the cluster join token (or the cluster has none and
    /// listens on loopback only): it may enrol a node that has no
    /// credential yet, and nothing else.
    Bootstrap,
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
    /// A node without a credential enrols: it gets one now.
    Enrol,
}

/// The rule for Register: a node that has a credential must present it; one
/// without (new, or older than credentials) enrols through the bootstrap; a
/// revoked node does neither.
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
    let enrolled = known.is_some_and(|n| n.credential_sha256.is_some());
    match identity {
        AgentIdentity::Node(owner) if owner == node_id && enrolled => Ok(Admission::Known),
        AgentIdentity::Node(owner) if owner != node_id => Err(NodeAuthError::OtherNode {
            node_id: node_id.to_string(),
            owner: owner.clone(),
        }),
        // Its own (stale) credential but no record of it: enrol again.
        AgentIdentity::Node(_) | AgentIdentity::Bootstrap if !enrolled => Ok(Admission::Enrol),
        _ => Err(NodeAuthError::NotItsCredential {
            node_id: node_id.to_string(),
        }),
    }
}

/// The rule for Session: only the node's own credential opens its session.
pub fn admit_session(node_id: &str, identity: &AgentIdentity) -> Result<(), NodeAuthError> {
    match identity {
        AgentIdentity::Node(owner) if owner == node_id => Ok(()),
        AgentIdentity::Node(owner) => Err(NodeAuthError::OtherNode {
            node_id: node_id.to_string(),
            owner: owner.clone(),
        }),
        AgentIdentity::Bootstrap => Err(NodeAuthError::NoCredential),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_node_s_own_credential_acts_for_it() {
        let mut n = node(0);
        let own = AgentIdentity::Node("n1".into());
        let other = AgentIdentity::Node("n2".into());
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
        n.credential_sha256 = Some("abc".into());
        assert_eq!(
            admit_registration("n1", Some(&n), &own),
            Ok(Admission::Known)
        );
        assert!(matches!(
            admit_registration("n1", Some(&n), &boot),
            Err(NodeAuthError::NotItsCredential { .. })
        ));
        assert!(matches!(
            admit_registration("n1", Some(&n), &other),
            Err(NodeAuthError::OtherNode { .. })
        ));
        n.revoked = true;
        n.credential_sha256 = None;
        for id in [&own, &other, &boot] {
            assert!(matches!(
                admit_registration("n1", Some(&n), id),
                Err(NodeAuthError::Revoked { .. })
            ));
        }
        assert_eq!(admit_session("n1", &own), Ok(()));
        assert!(admit_session("n1", &other).is_err());
        assert_eq!(admit_session("n1", &boot), Err(NodeAuthError::NoCredential));
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
            revoked: false,
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
