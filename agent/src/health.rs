//! GPU health from critical events (XID errors, uncorrectable ECC), and the
//! rule that returns a GPU to service.
//!
//! A critical event marks the GPU unhealthy with the XID, its meaning and
//! NVIDIA's recommended action (from NVIDIA's XID catalog); the scheduler then
//! places nothing on it. NVIDIA's device plugin keeps such a GPU unhealthy
//! until the plugin restarts; gpupool returns it automatically once the
//! recommended action has visibly happened, and remembers it across agent
//! restarts (`STATE_DIR/gpu-health.json`):
//!
//! | action      | back in service when                                        |
//! |-------------|-------------------------------------------------------------|
//! | reset GPU   | the GPU disappeared from a probe and came back (GPU reset or driver reload), or the host rebooted |
//! | reboot      | the host rebooted (`/proc/sys/kernel/random/boot_id` changed) |
//!
//! Application-caused XIDs (13, 31, 43, 45, 68) and informational ones are
//! not critical: the job fails, the GPU stays in service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What NVIDIA recommends after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    ResetGpu,
    Reboot,
}

impl Action {
    pub fn text(self) -> &'static str {
        match self {
            Action::ResetGpu => "reset the GPU (nvidia-smi -r) or reload the driver",
            Action::Reboot => "reboot the node",
        }
    }
}

/// A critical event on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuEvent {
    Xid { index: u32, xid: u64 },
    DoubleBitEcc { index: u32 },
}

/// The XIDs that take a GPU out of service, with their meaning and action.
pub fn classify_xid(xid: u64) -> Option<(&'static str, Action)> {
    Some(match xid {
        48 => ("double-bit ECC error", Action::ResetGpu),
        61 | 62 => ("internal micro-controller error", Action::ResetGpu),
        64 => (
            "ECC page retirement or row remapping failure",
            Action::ResetGpu,
        ),
        74 => ("NVLink error", Action::ResetGpu),
        79 => ("GPU has fallen off the bus", Action::Reboot),
        95 => ("uncontained ECC error", Action::ResetGpu),
        109 => ("context switch timeout", Action::ResetGpu),
        119 | 120 => ("GSP error", Action::ResetGpu),
        140 => ("unrecovered ECC error", Action::ResetGpu),
        _ => return None,
    })
}

/// One GPU out of service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unhealthy {
    pub xid: Option<u64>,
    pub reason: String,
    pub action: Action,
    /// Host boot id when it happened.
    pub boot_id: String,
    /// Set once the GPU was missing from a probe after the event.
    pub seen_missing: bool,
}

/// The health of this node's GPUs, by UUID (indexes can change).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tracker {
    unhealthy: BTreeMap<String, Unhealthy>,
    /// Last XID seen per UUID (for the DCGM_FI_DEV_XID_ERRORS gauge).
    #[serde(default)]
    last_xid: BTreeMap<String, u64>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

impl Tracker {
    /// Loads the tracker kept in `state_dir` (empty if none).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("gpu-health.json");
        let mut t: Tracker = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        t.path = Some(path);
        t
    }

    fn save(&self) {
        if let Some(path) = &self.path
            && let Err(err) = std::fs::write(path, serde_json::to_string(self).expect("serializes"))
        {
            tracing::warn!(error = %err, "cannot persist GPU health");
        }
    }

    /// Applies events and the return-to-service rule to a fresh probe
    /// (`present`: index -> UUID of every GPU seen now). Returns true when
    /// anything changed.
    pub fn observe(
        &mut self,
        events: &[GpuEvent],
        present: &[(u32, String)],
        boot_id: &str,
    ) -> bool {
        let mut changed = false;
        for event in events {
            let (index, xid, reason, action) = match *event {
                GpuEvent::Xid { index, xid } => {
                    let Some(uuid) = present
                        .iter()
                        .find(|(i, _)| *i == index)
                        .map(|(_, u)| u.clone())
                    else {
                        continue;
                    };
                    self.last_xid.insert(uuid, xid);
                    changed = true;
                    match classify_xid(xid) {
                        Some((what, action)) => {
                            (index, Some(xid), format!("XID {xid}: {what}"), action)
                        }
                        None => {
                            tracing::info!(
                                gpu = index,
                                xid,
                                "non-critical XID; GPU stays in service"
                            );
                            continue;
                        }
                    }
                }
                GpuEvent::DoubleBitEcc { index } => (
                    index,
                    None,
                    "uncorrectable (double-bit) ECC error".to_string(),
                    Action::ResetGpu,
                ),
            };
            let Some(uuid) = present
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, u)| u.clone())
            else {
                continue;
            };
            tracing::warn!(gpu = index, %uuid, %reason, action = action.text(), "GPU out of service");
            self.unhealthy.insert(
                uuid,
                Unhealthy {
                    xid,
                    reason,
                    action,
                    boot_id: boot_id.to_string(),
                    seen_missing: false,
                },
            );
            changed = true;
        }
        let mut recovered = Vec::new();
        for (uuid, u) in self.unhealthy.iter_mut() {
            let here = present.iter().any(|(_, p)| p == uuid);
            if !here && !u.seen_missing {
                u.seen_missing = true;
                changed = true;
            }
            let rebooted = u.boot_id != boot_id;
            let reset = u.action == Action::ResetGpu && u.seen_missing && here;
            if rebooted || reset {
                recovered.push(uuid.clone());
            }
        }
        for uuid in recovered {
            tracing::info!(%uuid, "GPU back in service: the recommended action was observed");
            self.unhealthy.remove(&uuid);
            changed = true;
        }
        if changed {
            self.save();
        }
        changed
    }

    /// Why a GPU is out of service, if it is.
    pub fn reason(&self, uuid: &str) -> Option<String> {
        self.unhealthy
            .get(uuid)
            .map(|u| format!("{}; action: {}", u.reason, u.action.text()))
    }

    pub fn last_xid(&self, uuid: &str) -> u64 {
        self.last_xid.get(uuid).copied().unwrap_or(0)
    }
}

/// This boot's id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(uuids: &[&str]) -> Vec<(u32, String)> {
        uuids
            .iter()
            .enumerate()
            .map(|(i, u)| (i as u32, u.to_string()))
            .collect()
    }

    #[test]
    fn critical_xids_take_the_gpu_out_and_app_xids_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tracker::load(dir.path());
        t.observe(
            &[GpuEvent::Xid { index: 0, xid: 13 }],
            &gpus(&["A", "B"]),
            "boot1",
        );
        assert_eq!(t.reason("A"), None);
        assert_eq!(t.last_xid("A"), 13);
        assert!(t.observe(
            &[GpuEvent::Xid { index: 1, xid: 79 }],
            &gpus(&["A", "B"]),
            "boot1"
        ));
        let why = t.reason("B").unwrap();
        assert!(why.contains("XID 79") && why.contains("reboot"), "{why}");
        t.observe(
            &[GpuEvent::DoubleBitEcc { index: 0 }],
            &gpus(&["A", "B"]),
            "boot1",
        );
        assert!(t.reason("A").unwrap().contains("ECC"));
    }

    #[test]
    fn reboot_action_returns_only_after_a_reboot_and_survives_agent_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tracker::load(dir.path());
        t.observe(
            &[GpuEvent::Xid { index: 0, xid: 79 }],
            &gpus(&["A"]),
            "boot1",
        );
        // Missing and back is not enough for a reboot action.
        t.observe(&[], &gpus(&[]), "boot1");
        t.observe(&[], &gpus(&["A"]), "boot1");
        assert!(t.reason("A").is_some());
        // An agent restart remembers.
        let mut t = Tracker::load(dir.path());
        assert!(t.reason("A").is_some());
        t.observe(&[], &gpus(&["A"]), "boot2");
        assert!(t.reason("A").is_none());
        assert!(Tracker::load(dir.path()).reason("A").is_none());
    }

    #[test]
    fn reset_action_returns_after_the_gpu_was_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tracker::load(dir.path());
        t.observe(
            &[GpuEvent::Xid { index: 0, xid: 48 }],
            &gpus(&["A"]),
            "boot1",
        );
        t.observe(&[], &gpus(&["A"]), "boot1");
        assert!(t.reason("A").is_some(), "nothing happened yet");
        t.observe(&[], &gpus(&[]), "boot1");
        assert!(t.reason("A").is_some(), "gone, not back yet");
        t.observe(&[], &gpus(&["A"]), "boot1");
        assert!(t.reason("A").is_none(), "reset observed");
    }
}
