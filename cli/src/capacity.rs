//! `gpupool capacity [--pool P]` (PoolService/GetCapacity): each pool's
//! free GPUs by why its queued jobs cannot use them.

use gpupool_proto::v1 as pb;
use serde_json::{Value, json};

use crate::OutputFormat;
use crate::conn::Conn;
use crate::error::CliError;
use crate::format::{Table, format_milli};
use crate::output::emit;

/// `gpupool capacity`.
pub(super) async fn capacity_command(
    conn: &Conn,
    out: OutputFormat,
    pool: Option<String>,
) -> Result<(), CliError> {
    let pools = conn
        .pools()
        .await?
        .get_capacity(pb::GetCapacityRequest {
            pool: pool.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .pools;
    emit(out, || capacity_text(&pools), || capacity_json(&pools))
}

fn milli_of(causes: &[pb::StrandedMilli], cause: &str) -> i64 {
    causes
        .iter()
        .find(|c| c.cause == cause)
        .map_or(0, |c| c.milli)
}

/// Free GPU milli that is not `usable`.
fn stranded(causes: &[pb::StrandedMilli]) -> i64 {
    causes
        .iter()
        .filter(|c| c.cause != "usable")
        .map(|c| c.milli)
        .sum()
}

/// The causes shown as columns (GPUs), in the order they are judged.
const COLUMNS: [(&str, &str); 8] = [
    ("unschedulable", "unschedulable"),
    ("no_request", "no request"),
    ("shares_below_smallest_request", "small shares"),
    ("model", "model"),
    ("too_few_gpus_per_node", "too few gpus"),
    ("cpu", "cpu"),
    ("memory", "memory"),
    ("usable", "usable"),
];

fn capacity_text(pools: &[pb::PoolCapacity]) -> String {
    let mut headers = vec!["pool", "basis", "queued", "free/gpus", "stranded"];
    headers.extend(COLUMNS.iter().map(|c| c.1));
    let mut t = Table::new(&headers);
    for p in pools {
        let mut row = vec![
            p.pool_id.clone(),
            p.basis.clone(),
            p.queued_jobs.to_string(),
            format!(
                "{}/{}",
                format_milli(p.free_milli),
                format_milli(p.gpus_milli)
            ),
            format_milli(stranded(&p.causes)),
        ];
        row.extend(
            COLUMNS
                .iter()
                .map(|c| format_milli(milli_of(&p.causes, c.0))),
        );
        t.row(row);
    }
    let mut text = t.render();
    let mut nodes = Table::new(&["node", "pool", "stranded", "most by"]);
    for p in pools {
        for n in &p.nodes {
            let most = n
                .causes
                .iter()
                .filter(|c| c.cause != "usable" && c.milli > 0)
                .max_by_key(|c| c.milli)
                .map(|c| c.cause.clone())
                .unwrap_or_default();
            nodes.row(vec![
                n.node_id.clone(),
                p.pool_id.clone(),
                format_milli(stranded(&n.causes)),
                most,
            ]);
        }
    }
    if pools.iter().any(|p| !p.nodes.is_empty()) {
        text.push('\n');
        text.push_str(&nodes.render());
    }
    text
}

fn capacity_json(pools: &[pb::PoolCapacity]) -> Value {
    let causes = |c: &[pb::StrandedMilli]| -> Value {
        c.iter()
            .map(|c| (c.cause.clone(), json!(c.milli)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    pools
        .iter()
        .map(|p| {
            json!({
                "pool_id": p.pool_id,
                "basis": p.basis,
                "queued_jobs": p.queued_jobs,
                "gpus_milli": p.gpus_milli,
                "free_milli": p.free_milli,
                "stranded_milli": stranded(&p.causes),
                "causes_milli": causes(&p.causes),
                "nodes": p.nodes.iter().map(|n| json!({
                    "node_id": n.node_id,
                    "stranded_milli": stranded(&n.causes),
                    "causes_milli": causes(&n.causes),
                })).collect::<Vec<_>>(),
            })
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_pools_and_the_nodes_that_strand_the_most() {
        let c = |cause: &str, milli| pb::StrandedMilli {
            cause: cause.into(),
            milli,
        };
        let pools = [pb::PoolCapacity {
            pool_id: "public".into(),
            basis: "queued".into(),
            queued_jobs: 1,
            gpus_milli: 2000,
            free_milli: 1000,
            causes: vec![c("cpu", 1000), c("usable", 0)],
            nodes: vec![pb::NodeStranded {
                node_id: "n1".into(),
                causes: vec![c("cpu", 1000)],
            }],
        }];
        let text = capacity_text(&pools);
        assert!(
            text.contains("public   queued   1        1/2         1 "),
            "{text}"
        );
        assert!(text.contains("n1     public   1          cpu"), "{text}");
        let v = capacity_json(&pools);
        assert_eq!(v[0]["stranded_milli"], 1000);
        assert_eq!(v[0]["nodes"][0]["causes_milli"]["cpu"], 1000);
    }
}
