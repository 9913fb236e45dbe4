//! First placement: first fit of each instance on one node, all instances
//! or none (gang). The placement issue replaces the scoring; the interface
//! (capacities in, assignments or a reason out) stays.
//!
//! Tie-breaking: nodes are tried in the order given (the caller sorts them by
//! node id); inside a node, fractional requests go to the GPU with the least
//! free share that still fits (keeps whole GPUs free), whole-GPU requests
//! take the lowest free indexes.

use super::job::Resources;

/// One GPU's free share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub healthy: bool,
    /// Thousandths of the GPU not yet allocated (0..=1000).
    pub free_milli: u32,
}

/// What a node has left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub node_id: String,
    pub pool: String,
    /// Ready and not cordoned.
    pub schedulable: bool,
    pub cpu_free_milli: i64,
    pub memory_free_mib: i64,
    pub gpus: Vec<GpuSlot>,
}

/// Where one instance goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub node_id: String,
    pub gpu_indexes: Vec<u32>,
    pub gpu_uuids: Vec<String>,
}

fn model_allowed(allowed: &[String], model: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|m| m == model)
}

/// Tries to fit one instance on `node`; on success takes the resources.
fn fit_one(node: &mut NodeCapacity, req: &Resources) -> Option<Assignment> {
    if !node.schedulable
        || node.cpu_free_milli < req.cpu_milli as i64
        || node.memory_free_mib < req.memory_mib as i64
    {
        return None;
    }
    let usable = |g: &GpuSlot| g.healthy && model_allowed(&req.gpu_models, &g.model);
    let chosen: Vec<usize> = if req.gpus > 0 {
        let free: Vec<usize> = (0..node.gpus.len())
            .filter(|&i| usable(&node.gpus[i]) && node.gpus[i].free_milli == 1000)
            .take(req.gpus as usize)
            .collect();
        if free.len() < req.gpus as usize {
            return None;
        }
        free
    } else if req.gpu_milli > 0 {
        let best = (0..node.gpus.len())
            .filter(|&i| usable(&node.gpus[i]) && node.gpus[i].free_milli >= req.gpu_milli)
            .min_by_key(|&i| (node.gpus[i].free_milli, node.gpus[i].index))?;
        vec![best]
    } else {
        Vec::new()
    };
    let per_gpu = if req.gpus > 0 { 1000 } else { req.gpu_milli };
    for &i in &chosen {
        node.gpus[i].free_milli -= per_gpu;
    }
    node.cpu_free_milli -= req.cpu_milli as i64;
    node.memory_free_mib -= req.memory_mib as i64;
    Some(Assignment {
        node_id: node.node_id.clone(),
        gpu_indexes: chosen.iter().map(|&i| node.gpus[i].index).collect(),
        gpu_uuids: chosen.iter().map(|&i| node.gpus[i].uuid.clone()).collect(),
    })
}

/// Places `instances` copies of `req` in `pool`, all or none. On success the
/// capacities are reduced by what was taken; on failure they are unchanged
/// and the error says why the job must wait.
pub fn place(
    nodes: &mut [NodeCapacity],
    pool: &str,
    req: &Resources,
    instances: u32,
) -> Result<Vec<Assignment>, String> {
    let mut trial: Vec<NodeCapacity> = nodes.to_vec();
    let mut out = Vec::with_capacity(instances as usize);
    for _ in 0..instances {
        let fitted = trial
            .iter_mut()
            .filter(|n| n.pool == pool)
            .find_map(|n| fit_one(n, req));
        match fitted {
            Some(a) => out.push(a),
            None => return Err(no_fit_reason(nodes, pool, req, instances)),
        }
    }
    nodes.clone_from_slice(&trial);
    Ok(out)
}

fn no_fit_reason(nodes: &[NodeCapacity], pool: &str, req: &Resources, instances: u32) -> String {
    let in_pool: Vec<&NodeCapacity> = nodes.iter().filter(|n| n.pool == pool).collect();
    let want = format!("{} instance(s) of {}", instances, req.describe());
    if in_pool.is_empty() {
        return format!("waiting for capacity: pool {pool:?} has no nodes; needs {want}");
    }
    let schedulable: Vec<&&NodeCapacity> = in_pool.iter().filter(|n| n.schedulable).collect();
    if schedulable.is_empty() {
        return format!("waiting for capacity: no Ready node in pool {pool:?}; needs {want}");
    }
    if req.gpus > 0 {
        let largest = in_pool
            .iter()
            .map(|n| {
                n.gpus
                    .iter()
                    .filter(|g| model_allowed(&req.gpu_models, &g.model))
                    .count()
            })
            .max()
            .unwrap_or(0);
        if largest < req.gpus as usize {
            return format!(
                "waiting for capacity: no node in pool {pool:?} has {} GPUs{} (largest has {largest}); needs {want}",
                req.gpus,
                if req.gpu_models.is_empty() {
                    String::new()
                } else {
                    format!(" of model {}", req.gpu_models.join("|"))
                },
            );
        }
        let most_free = schedulable
            .iter()
            .map(|n| {
                n.gpus
                    .iter()
                    .filter(|g| g.healthy && g.free_milli == 1000)
                    .count()
            })
            .max()
            .unwrap_or(0);
        return format!(
            "waiting for capacity: needs {want}; most free whole GPUs on a Ready node in pool {pool:?}: {most_free}"
        );
    }
    format!("waiting for capacity: no Ready node in pool {pool:?} has room for {want}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, gpus: u32) -> NodeCapacity {
        NodeCapacity {
            node_id: id.into(),
            pool: "public".into(),
            schedulable: true,
            cpu_free_milli: 64_000,
            memory_free_mib: 512 * 1024,
            gpus: (0..gpus)
                .map(|i| GpuSlot {
                    index: i,
                    uuid: format!("{id}-gpu{i}"),
                    model: "H100".into(),
                    healthy: true,
                    free_milli: 1000,
                })
                .collect(),
        }
    }

    fn gpus(n: u32) -> Resources {
        Resources {
            gpus: n,
            cpu_milli: 1000,
            memory_mib: 1024,
            ..Default::default()
        }
    }

    #[test]
    fn four_gpus_go_to_the_node_that_has_them() {
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let placed = place(&mut nodes, "public", &gpus(4), 1).unwrap();
        assert_eq!(placed[0].node_id, "b");
        assert_eq!(placed[0].gpu_indexes, vec![0, 1, 2, 3]);
        assert_eq!(
            nodes[1]
                .gpus
                .iter()
                .filter(|g| g.free_milli == 1000)
                .count(),
            4
        );
    }

    #[test]
    fn too_big_waits_with_reason_and_takes_nothing() {
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let before = nodes.clone();
        let err = place(&mut nodes, "public", &gpus(16), 1).unwrap_err();
        assert!(err.contains("has 16 GPUs (largest has 8)"), "{err}");
        assert_eq!(nodes, before);
    }

    #[test]
    fn gang_is_all_or_nothing() {
        let mut nodes = vec![node("a", 2), node("b", 8)];
        let before = nodes.clone();
        assert!(place(&mut nodes, "public", &gpus(4), 3).is_err());
        assert_eq!(nodes, before);
        assert_eq!(place(&mut nodes, "public", &gpus(4), 2).unwrap().len(), 2);
    }

    #[test]
    fn unhealthy_unready_and_other_pools_are_skipped() {
        let mut sick = node("a", 1);
        sick.gpus[0].healthy = false;
        let mut down = node("b", 1);
        down.schedulable = false;
        let mut other = node("c", 1);
        other.pool = "p1".into();
        let mut nodes = vec![sick, down, other, node("d", 1)];
        let placed = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        assert_eq!(placed[0].node_id, "d");
        assert!(place(&mut nodes, "public", &gpus(1), 1).is_err());
    }

    #[test]
    fn r_pool_1_public_pool_never_gives_a_gpu_to_two_jobs() {
        // Per-job isolation: whole-GPU jobs never share a GPU; only requests
        // that explicitly ask for a fraction share one.
        let mut nodes = vec![node("a", 2)];
        let first = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        let second = place(&mut nodes, "public", &gpus(1), 1).unwrap();
        assert_ne!(first[0].gpu_indexes, second[0].gpu_indexes);
        assert!(place(&mut nodes, "public", &gpus(1), 1).is_err());
        let mut nodes = vec![node("a", 1)];
        let half = Resources {
            gpu_milli: 500,
            cpu_milli: 1,
            memory_mib: 1,
            ..Default::default()
        };
        place(&mut nodes, "public", &half, 1).unwrap();
        assert!(
            place(&mut nodes, "public", &gpus(1), 1).is_err(),
            "a whole GPU was given on top of a fraction"
        );
    }

    #[test]
    fn fractions_pack_onto_a_shared_gpu() {
        let mut nodes = vec![node("a", 2)];
        let half = Resources {
            gpu_milli: 500,
            cpu_milli: 100,
            memory_mib: 100,
            ..Default::default()
        };
        let a = place(&mut nodes, "public", &half, 1).unwrap();
        let b = place(&mut nodes, "public", &half, 1).unwrap();
        assert_eq!(a[0].gpu_indexes, b[0].gpu_indexes);
        // The other GPU is still whole.
        assert!(place(&mut nodes, "public", &gpus(1), 1).is_ok());
        assert!(place(&mut nodes, "public", &half, 1).is_err());
    }

    #[test]
    fn cpu_and_memory_are_never_exceeded() {
        let mut small = node("a", 0);
        small.cpu_free_milli = 1500;
        let mut nodes = vec![small];
        let req = Resources {
            cpu_milli: 1000,
            memory_mib: 10,
            ..Default::default()
        };
        assert!(place(&mut nodes, "public", &req, 1).is_ok());
        assert!(place(&mut nodes, "public", &req, 1).is_err());
        assert_eq!(nodes[0].cpu_free_milli, 500);
    }

    #[test]
    fn gpu_models_are_respected() {
        let mut nodes = vec![node("a", 2)];
        let req = Resources {
            gpus: 1,
            gpu_models: vec!["A100".into()],
            ..gpus(1)
        };
        let err = place(&mut nodes, "public", &req, 1).unwrap_err();
        assert!(err.contains("of model A100"), "{err}");
    }
}
