//! `gpupool node ...` (NodeService): list, show, cordon, drain, revoke,
//! readmit.

use clap::Subcommand;
use gpupool_proto::v1::{self as pb, node_service_client::NodeServiceClient};

use crate::OutputFormat;
use crate::args::{opt, parse_duration_secs};
use crate::conn::{Conn, Svc, every_page};
use crate::error::CliError;
use crate::format::{
    Details, Table, format_mib, format_milli, format_time_ago, node_status_name, now_ms, ts_ms,
};
use crate::json;
use crate::output::emit;

/// `gpupool node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    List {
        /// Only the nodes of this pool (id or name).
        #[arg(long)]
        pool: Option<String>,
    },
    /// Show one node and its GPUs.
    Get {
        /// Node id.
        node_id: String,
    },
    /// Stop placing new work on a node.
    Cordon {
        /// Node id.
        node_id: String,
    },
    /// Allow new work on a cordoned node again.
    Uncordon {
        /// Node id.
        node_id: String,
    },
    /// Revoke a node's credential: its session ends, its instances are
    /// Lost, and it cannot register again until readmitted (admin).
    Revoke {
        /// Node id.
        node_id: String,
    },
    /// Let a revoked node enrol again with the join token (admin).
    Readmit {
        /// Node id.
        node_id: String,
    },
    /// Empty a node for maintenance (admin): cordon it, replace its
    /// services' replicas elsewhere one at a time, requeue its training
    /// jobs that have retries, and stop its notebooks, TensorBoards and jobs
    /// without retries with --force or at the deadline. Shows the progress
    /// until the node is empty; `uncordon` ends the drain.
    Drain {
        /// Node id.
        node_id: String,
        /// From then on, whatever still runs there is stopped (`90s`,
        /// `30m`, `2h`, `1d`; default: none).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
        deadline: Option<u64>,
        /// Stop notebooks, TensorBoards and jobs without retries at once.
        #[arg(long)]
        force: bool,
        /// Start the drain and return, without waiting for the node to empty.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Every node (of `pool`, or all), page after page.
pub(crate) async fn all_nodes(
    nodes: &NodeServiceClient<Svc>,
    pool: String,
) -> Result<Vec<pb::Node>, CliError> {
    every_page(|page_token| {
        let (mut nodes, pool) = (nodes.clone(), pool.clone());
        async move {
            let page = nodes
                .list_nodes(pb::ListNodesRequest {
                    pool,
                    page_size: 0,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.nodes, page.next_page_token))
        }
    })
    .await
}

/// Runs one `gpupool node ...` command.
pub(crate) async fn node_command(
    conn: &Conn,
    out: OutputFormat,
    command: NodeCommand,
) -> Result<(), CliError> {
    let mut nodes = conn.nodes().await?;
    let now = now_ms();
    match command {
        NodeCommand::List { pool } => {
            let list = all_nodes(&nodes, opt(pool)).await?;
            emit(out, || node_table(&list), || json::nodes(&list))
        }
        NodeCommand::Get { node_id } => {
            let n = nodes
                .get_node(pb::GetNodeRequest { node_id })
                .await?
                .into_inner();
            emit(out, || node_detail(&n, now), || json::node(&n))
        }
        NodeCommand::Cordon { node_id } => {
            let n = nodes
                .cordon_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || format!("node {} cordoned\n", n.node_id),
                || json::node(&n),
            )
        }
        NodeCommand::Uncordon { node_id } => {
            let n = nodes
                .uncordon_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || format!("node {} uncordoned\n", n.node_id),
                || json::node(&n),
            )
        }
        NodeCommand::Revoke { node_id } => {
            let n = nodes
                .revoke_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "node {} revoked: its credential no longer works; `gpupool node readmit {}` lets it enrol again\n",
                        n.node_id, n.node_id
                    )
                },
                || json::node(&n),
            )
        }
        NodeCommand::Drain {
            node_id,
            deadline,
            force,
            no_wait,
        } => drain(&mut nodes, out, node_id, deadline, force, no_wait).await,
        NodeCommand::Readmit { node_id } => {
            let n = nodes
                .readmit_node(pb::CordonNodeRequest { node_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "node {} readmitted: it may enrol again with the join token\n",
                        n.node_id
                    )
                },
                || json::node(&n),
            )
        }
    }
}

/// Starts a drain, then (unless `no_wait`) polls the node once a second,
/// printing what is left there, until it is empty.
async fn drain(
    nodes: &mut NodeServiceClient<Svc>,
    out: OutputFormat,
    node_id: String,
    deadline: Option<u64>,
    force: bool,
    no_wait: bool,
) -> Result<(), CliError> {
    let mut n = nodes
        .drain_node(pb::DrainNodeRequest {
            node_id: node_id.clone(),
            deadline_secs: deadline.unwrap_or(0),
            force,
        })
        .await?
        .into_inner();
    let mut left = usize::MAX;
    while !no_wait && !n.instance_ids.is_empty() {
        if n.instance_ids.len() != left && out == OutputFormat::Table {
            left = n.instance_ids.len();
            eprintln!(
                "node {node_id}: {left} instance(s) left: {}",
                n.instance_ids.join(", ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        n = nodes
            .get_node(pb::GetNodeRequest {
                node_id: node_id.clone(),
            })
            .await?
            .into_inner();
    }
    emit(
        out,
        || {
            if n.instance_ids.is_empty() {
                format!(
                    "node {} drained (cordoned until `gpupool node uncordon`)\n",
                    n.node_id
                )
            } else {
                format!(
                    "node {} draining: {} instance(s) left\n",
                    n.node_id,
                    n.instance_ids.len()
                )
            }
        },
        || json::node(&n),
    )
}

fn node_status_text(n: &pb::Node) -> String {
    let mut status = node_status_name(n.status).to_string();
    if n.cordoned {
        status.push_str(",Cordoned");
    }
    if n.revoked {
        status.push_str(",Revoked");
    }
    if n.draining {
        status.push_str(",Draining");
    }
    status
}

pub(crate) fn node_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&[
        "node", "hostname", "status", "pool", "spec", "gpus", "cpu", "memory", "az", "version",
    ]);
    for n in nodes {
        let inv = n.inventory.clone().unwrap_or_default();
        t.row(vec![
            n.node_id.clone(),
            inv.hostname.clone(),
            node_status_text(n),
            n.pool.clone(),
            n.spec.clone(),
            format!(
                "{}/{}",
                format_milli(i64::from(n.gpus_allocated_milli)),
                inv.gpus.len()
            ),
            format!("{}/{}", format_milli(n.cpu_allocated_milli), inv.cpu_cores),
            format!(
                "{}/{}",
                format_mib(n.memory_allocated_mib),
                format_mib(i64::try_from(inv.memory_mib).unwrap_or(i64::MAX))
            ),
            inv.az.clone(),
            n.agent_version.clone(),
        ]);
    }
    t.render()
}

fn node_detail(n: &pb::Node, now: i64) -> String {
    let inv = n.inventory.clone().unwrap_or_default();
    let mut d = Details::default();
    d.add("Node", &n.node_id);
    d.add("Hostname", &inv.hostname);
    d.add("Status", node_status_name(n.status));
    d.add("Cordoned", n.cordoned.to_string());
    if n.revoked {
        d.add(
            "Revoked",
            "true (gpupool node readmit to let it enrol again)".to_string(),
        );
    }
    d.add("Pool", &n.pool);
    d.add("Spec", &n.spec);
    d.add("AZ", &inv.az);
    d.add("Agent version", &n.agent_version);
    d.add(
        "GPUs",
        format!(
            "{}/{} allocated{}",
            format_milli(i64::from(n.gpus_allocated_milli)),
            inv.gpus.len(),
            if inv.fake_gpus { " (fake)" } else { "" }
        ),
    );
    d.add(
        "CPU",
        format!(
            "{}/{} cores allocated",
            format_milli(n.cpu_allocated_milli),
            inv.cpu_cores
        ),
    );
    d.add("CPU model", &inv.cpu_model);
    d.add(
        "Memory",
        format!(
            "{}/{} allocated",
            format_mib(n.memory_allocated_mib),
            format_mib(i64::try_from(inv.memory_mib).unwrap_or(i64::MAX))
        ),
    );
    d.add(
        "OS",
        format!("{} {}", inv.os, inv.kernel).trim().to_string(),
    );
    let mut labels: Vec<String> = inv.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    d.add("Labels", labels.join(","));
    d.add(
        "Last heartbeat",
        format_time_ago(ts_ms(n.last_heartbeat.as_ref()), now),
    );
    d.add(
        "Registered",
        format_time_ago(ts_ms(n.registered_at.as_ref()), now),
    );
    d.add("Instances", n.instance_ids.join(","));
    let mut text = d.render();
    if !inv.gpus.is_empty() {
        let mut t = Table::new(&[
            "index",
            "model",
            "memory",
            "healthy",
            "allocated",
            "util",
            "uuid",
            "reason",
        ]);
        for g in &inv.gpus {
            t.row(vec![
                g.index.to_string(),
                g.model.clone(),
                format_mib(i64::try_from(g.memory_total_mib).unwrap_or(i64::MAX)),
                if g.healthy { "yes" } else { "no" }.to_string(),
                format_milli(i64::from(json::allocated_milli(n, g))),
                format!("{}%", g.utilization_pct),
                g.uuid.clone(),
                g.health_reason.clone(),
            ]);
        }
        text.push('\n');
        text.push_str(&t.render());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_nodes() {
        let node = pb::Node {
            node_id: "n1".into(),
            inventory: Some(pb::Inventory {
                hostname: "gpu-01".into(),
                cpu_cores: 64,
                memory_mib: 512 * 1024,
                az: "AZ1".into(),
                gpus: (0..8)
                    .map(|i| pb::Gpu {
                        index: i,
                        model: "H100".into(),
                        memory_total_mib: 81_559,
                        healthy: i != 3,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: pb::NodeStatus::Ready as i32,
            pool: "public".into(),
            spec: "8xH100".into(),
            cordoned: true,
            gpus_allocated_milli: 4500,
            cpu_allocated_milli: 2500,
            memory_allocated_mib: 8192,
            gpu_allocated_milli: vec![1000, 1000, 1000, 1000, 500],
            ..Default::default()
        };
        let table = node_table(std::slice::from_ref(&node));
        assert!(table.starts_with("NODE "), "{table}");
        assert!(table.contains("Ready,Cordoned"), "{table}");
        assert!(table.contains("4.5/8"), "{table}");
        assert!(table.contains("8GiB/512GiB"), "{table}");
        let detail = node_detail(&node, 0);
        assert!(detail.contains("INDEX"), "{detail}");
        assert_eq!(json::node(&node)["gpus"][4]["allocated_milli"], 500);
    }
}
