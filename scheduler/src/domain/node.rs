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

#[cfg(test)]
mod tests {
    use super::*;

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
