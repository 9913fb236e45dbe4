//! `gpupool pool ...` (PoolService): list, show, create, delete, scale,
//! convert to a subscription, renewal settings, unsubscribe.

use std::io::{IsTerminal, Write};

use clap::{Args, Subcommand, ValueEnum};
use gpupool_proto::v1::{self as pb, pool_service_client::PoolServiceClient};

use crate::OutputFormat;
use crate::args::opt;
use crate::conn::{Conn, Svc, every_page};
use crate::error::CliError;
use crate::format::{
    Details, Table, billing_mode_name, dash, format_micros, format_milli, format_time,
    format_time_ago, now_ms, pool_status_name, pool_type_name, ts_ms,
};
use crate::json;
use crate::nodes::{all_nodes, node_table};
use crate::output::emit;

/// `gpupool pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List pools.
    List {
        /// Also list deleted pools.
        #[arg(long)]
        all: bool,
    },
    /// Show one pool.
    Get {
        /// Pool id or name.
        pool: String,
    },
    /// List the nodes of a pool.
    Nodes {
        /// Pool id or name.
        pool: String,
    },
    /// Create a dedicated pool.
    Create(PoolCreateArgs),
    /// Delete a pool (asks for confirmation unless --yes).
    Delete {
        /// Pool id or name.
        pool: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Add nodes to a pool.
    ScaleOut {
        /// Pool id or name.
        pool: String,
        /// Number of nodes to add.
        #[arg(long, value_name = "N")]
        count: u32,
    },
    /// Remove exactly these nodes from a pool (see `scale-in-plan` for which
    /// to pick).
    ScaleIn {
        /// Pool id or name.
        pool: String,
        /// Node ids to remove.
        #[arg(value_name = "NODE_ID", required = true, num_args = 1..)]
        node_ids: Vec<String>,
        /// Stop the instances running on the removed nodes instead of
        /// refusing.
        #[arg(long)]
        force: bool,
    },
    /// Show which nodes to remove to shrink a pool, least disruptive first
    /// (changes nothing).
    ScaleInPlan {
        /// Pool id or name.
        pool: String,
        /// Number of nodes to remove.
        #[arg(long, value_name = "N")]
        count: u32,
    },
    /// Convert an on-demand pool to a subscription.
    Convert {
        /// Pool id or name.
        pool: String,
        /// Subscription length in months.
        #[arg(long)]
        months: u32,
        /// Renew the subscription automatically.
        #[arg(long)]
        auto_renew: bool,
    },
    /// Change the renewal settings of a subscription pool; settings not given
    /// keep their current values.
    Renewal {
        /// Pool id or name.
        pool: String,
        /// Renew the subscription automatically.
        #[arg(long, value_name = "BOOL")]
        auto_renew: Option<bool>,
        /// Switch to on-demand billing when the subscription ends.
        #[arg(long, value_name = "BOOL")]
        convert_at_expiry: Option<bool>,
    },
    /// End a subscription early: refund and delete the pool (asks for
    /// confirmation unless --yes).
    Unsubscribe {
        /// Pool id or name.
        pool: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Arguments of `gpupool pool create`.
#[derive(Debug, Args)]
pub struct PoolCreateArgs {
    /// Pool type.
    #[arg(long = "type", value_enum)]
    pub pool_type: PoolTypeArg,
    /// Pool name.
    #[arg(long)]
    pub name: String,
    /// Node spec (see `gpupool spec list`).
    #[arg(long)]
    pub spec: String,
    /// Number of nodes.
    #[arg(long, value_name = "K")]
    pub nodes: u32,
    /// Free-form description.
    #[arg(long)]
    pub description: Option<String>,
    /// Availability zone of a deploy pool: random, AZ1, AZ2 or AZ3.
    #[arg(long)]
    pub az: Option<String>,
    /// Billing mode (default: subscription when --months is given, else
    /// on-demand).
    #[arg(long, value_enum)]
    pub billing: Option<BillingArg>,
    /// Subscription length in months.
    #[arg(long)]
    pub months: Option<u32>,
    /// Renew the subscription automatically.
    #[arg(long)]
    pub auto_renew: bool,
    /// Region (subscription availability).
    #[arg(long)]
    pub region: Option<String>,
    /// Custom network: VPC id.
    #[arg(long)]
    pub vpc: Option<String>,
    /// Custom network: subnet id.
    #[arg(long)]
    pub subnet: Option<String>,
    /// Custom network: security group id (repeatable).
    #[arg(long = "security-group", value_name = "ID")]
    pub security_groups: Vec<String>,
    /// Its instances reach nothing outside their network (no egress to
    /// the world; published ports still answer). Needs [networks] on.
    #[arg(long)]
    pub no_egress: bool,
}

/// `--type` of `pool create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolTypeArg {
    /// Development and training: notebooks, training, tensorboards.
    Train,
    /// Deployment: online and batch services.
    Deploy,
}

/// `--billing` of `pool create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BillingArg {
    /// Pay per hour.
    OnDemand,
    /// Pay for months in advance.
    Subscription,
}

/// Runs one `gpupool pool ...` command.
pub(crate) async fn pool_command(
    conn: &Conn,
    out: OutputFormat,
    command: PoolCommand,
) -> Result<(), CliError> {
    let now = now_ms();
    match command {
        PoolCommand::List { all } => list_pools(conn, out, all).await,
        PoolCommand::Get { pool } => {
            let p = get_pool(conn, pool).await?;
            emit(out, || pool_detail(&p, now), || json::pool(&p))
        }
        PoolCommand::Nodes { pool } => {
            let p = get_pool(conn, pool).await?;
            let list = all_nodes(&conn.nodes().await?, p.pool_id).await?;
            emit(out, || node_table(&list), || json::nodes(&list))
        }
        PoolCommand::Create(a) => {
            let req = create_pool_request(a);
            let p = conn.pools().await?.create_pool(req).await?.into_inner();
            emit(out, || pool_summary(&p, "created"), || json::pool(&p))
        }
        PoolCommand::Delete { pool, yes } => delete_pool(conn, out, pool, yes).await,
        PoolCommand::ScaleOut { pool, count } => {
            scale_pool(conn, out, scale_out_request(pool, count), "scaling out").await
        }
        PoolCommand::ScaleIn {
            pool,
            node_ids,
            force,
        } => {
            let req = scale_in_request(pool, node_ids, force);
            scale_pool(conn, out, req, "scaling in").await
        }
        PoolCommand::ScaleInPlan { pool, count } => scale_in_plan(conn, out, pool, count).await,
        PoolCommand::Convert {
            pool,
            months,
            auto_renew,
        } => {
            let req = pb::ConvertToSubscriptionRequest {
                pool,
                months,
                auto_renew,
            };
            convert_pool(conn, out, req).await
        }
        PoolCommand::Renewal {
            pool,
            auto_renew,
            convert_at_expiry,
        } => set_renewal(conn, out, pool, auto_renew, convert_at_expiry).await,
        PoolCommand::Unsubscribe { pool, yes } => unsubscribe(conn, out, pool, yes).await,
    }
}

/// `pool list [--all]`: every pool, page after page.
async fn list_pools(conn: &Conn, out: OutputFormat, all: bool) -> Result<(), CliError> {
    let pools = conn.pools().await?;
    let list = every_page(|page_token| {
        let mut pools = pools.clone();
        async move {
            let page = pools
                .list_pools(pb::ListPoolsRequest {
                    include_deleted: all,
                    page_size: 0,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.pools, page.next_page_token))
        }
    })
    .await?;
    emit(out, || pool_table(&list), || json::pools(&list))
}

/// One pool, by id or name.
async fn get_pool(conn: &Conn, pool: String) -> Result<pb::Pool, CliError> {
    Ok(conn
        .pools()
        .await?
        .get_pool(pb::GetPoolRequest { pool })
        .await?
        .into_inner())
}

/// `pool delete POOL [--yes]`: confirmed on the terminal unless `--yes`.
async fn delete_pool(
    conn: &Conn,
    out: OutputFormat,
    pool: String,
    yes: bool,
) -> Result<(), CliError> {
    require_terminal(yes, &pool, "delete")?;
    let mut pools = conn.pools().await?;
    if !yes {
        confirm_pool(&mut pools, &pool, "Delete").await?;
    }
    let p = pools
        .delete_pool(pb::DeletePoolRequest {
            pool,
            confirm: true,
        })
        .await?
        .into_inner();
    emit(out, || pool_summary(&p, "deleted"), || json::pool(&p))
}

/// `pool scale-in-plan POOL --count N`: which nodes to remove (changes
/// nothing).
async fn scale_in_plan(
    conn: &Conn,
    out: OutputFormat,
    pool: String,
    count: u32,
) -> Result<(), CliError> {
    let picks = conn
        .pools()
        .await?
        .scale_in_plan(pb::ScaleInPlanRequest { pool, count })
        .await?
        .into_inner()
        .picks;
    emit(
        out,
        || scale_in_plan_text(&picks),
        || json::scale_in_picks(&picks),
    )
}

/// `pool convert POOL --months N [--auto-renew]`.
async fn convert_pool(
    conn: &Conn,
    out: OutputFormat,
    req: pb::ConvertToSubscriptionRequest,
) -> Result<(), CliError> {
    let p = conn
        .pools()
        .await?
        .convert_to_subscription(req)
        .await?
        .into_inner();
    emit(
        out,
        || pool_summary(&p, "converted to a subscription"),
        || json::pool(&p),
    )
}

/// `pool renewal POOL [--auto-renew B] [--convert-at-expiry B]`: a setting
/// not given keeps the subscription's current value.
async fn set_renewal(
    conn: &Conn,
    out: OutputFormat,
    pool: String,
    auto_renew: Option<bool>,
    convert_at_expiry: Option<bool>,
) -> Result<(), CliError> {
    let mut pools = conn.pools().await?;
    let (auto_renew, convert) = match (auto_renew, convert_at_expiry) {
        (Some(a), Some(c)) => (a, c),
        (a, c) => {
            let current = pools
                .get_pool(pb::GetPoolRequest { pool: pool.clone() })
                .await?
                .into_inner()
                .subscription
                .unwrap_or_default();
            (
                a.unwrap_or(current.auto_renew),
                c.unwrap_or(current.convert_to_on_demand_at_expiry),
            )
        }
    };
    let p = pools
        .set_renewal(pb::SetRenewalRequest {
            pool,
            auto_renew,
            convert_to_on_demand_at_expiry: convert,
        })
        .await?
        .into_inner();
    emit(
        out,
        || {
            let s = p.subscription.unwrap_or_default();
            format!(
                "pool {} ({}): auto-renew {}, convert to on-demand at expiry {}\n",
                p.name, p.pool_id, s.auto_renew, s.convert_to_on_demand_at_expiry
            )
        },
        || json::pool(&p),
    )
}

/// `pool unsubscribe POOL [--yes]`: refund and delete, confirmed on the
/// terminal unless `--yes`.
async fn unsubscribe(
    conn: &Conn,
    out: OutputFormat,
    pool: String,
    yes: bool,
) -> Result<(), CliError> {
    require_terminal(yes, &pool, "unsubscribe")?;
    let mut pools = conn.pools().await?;
    if !yes {
        confirm_pool(&mut pools, &pool, "Unsubscribe (refund and delete)").await?;
    }
    let r = pools
        .unsubscribe(pb::UnsubscribeRequest {
            pool: pool.clone(),
            confirm: true,
        })
        .await?
        .into_inner();
    emit(
        out,
        || {
            let name = r.pool.as_ref().map_or(pool.clone(), |p| {
                format!(
                    "{} ({}) is {}",
                    p.name,
                    p.pool_id,
                    pool_status_name(p.status)
                )
            });
            format!(
                "pool {name}: unsubscribed, refund {}\n",
                format_micros(r.refund_micros)
            )
        },
        || json::unsubscribe(&r),
    )
}

/// Sends a `ScalePool` request and prints the pool.
async fn scale_pool(
    conn: &Conn,
    out: OutputFormat,
    req: pb::ScalePoolRequest,
    verb: &str,
) -> Result<(), CliError> {
    let p = conn.pools().await?.scale_pool(req).await?.into_inner();
    emit(
        out,
        || pool_summary(&p, &format!("{verb}, nodes {}", pool_nodes(&p))),
        || json::pool(&p),
    )
}

/// `pool scale-out POOL --count N`.
fn scale_out_request(pool: String, count: u32) -> pb::ScalePoolRequest {
    pb::ScalePoolRequest {
        pool,
        change: Some(pb::scale_pool_request::Change::AddNodes(count)),
        force: false,
    }
}

/// `pool scale-in POOL NODE_ID... [--force]`.
fn scale_in_request(pool: String, node_ids: Vec<String>, force: bool) -> pb::ScalePoolRequest {
    pb::ScalePoolRequest {
        pool,
        change: Some(pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds {
            node_ids,
        })),
        force,
    }
}

/// The scale-in plan: one row per pick, then each pick's explanation.
fn scale_in_plan_text(picks: &[pb::ScaleInPick]) -> String {
    let mut t = Table::new(&[
        "rank",
        "node",
        "disrupted",
        "jobs",
        "free gpus",
        "pool free after",
        "fragmented after",
    ]);
    for (i, p) in picks.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            p.node_id.clone(),
            p.instances_disrupted.to_string(),
            p.job_ids.join(","),
            p.free_gpus.to_string(),
            p.pool_free_gpus_after.to_string(),
            p.pool_fragmented_gpus_after.to_string(),
        ]);
    }
    let mut text = t.render();
    for (i, p) in picks.iter().enumerate() {
        text.push_str(&format!("  {}. {}\n", i + 1, dash(&p.explanation)));
    }
    text
}

fn create_pool_request(a: PoolCreateArgs) -> pb::CreatePoolRequest {
    let billing = a.billing.unwrap_or(if a.months.is_some() {
        BillingArg::Subscription
    } else {
        BillingArg::OnDemand
    });
    let subscription = (billing == BillingArg::Subscription || a.months.is_some() || a.auto_renew)
        .then(|| pb::Subscription {
            months: a.months.unwrap_or(0),
            auto_renew: a.auto_renew,
            ..Default::default()
        });
    let network =
        (a.vpc.is_some() || a.subnet.is_some() || !a.security_groups.is_empty()).then(|| {
            pb::Network {
                network: Some(pb::network::Network::Custom(pb::CustomNetwork {
                    vpc_id: a.vpc.unwrap_or_default(),
                    subnet_id: a.subnet.unwrap_or_default(),
                    security_group_ids: a.security_groups,
                })),
            }
        });
    pb::CreatePoolRequest {
        r#type: match a.pool_type {
            PoolTypeArg::Train => pb::PoolType::Train,
            PoolTypeArg::Deploy => pb::PoolType::Deploy,
        } as i32,
        name: a.name,
        description: opt(a.description),
        spec: a.spec,
        node_count: a.nodes,
        az: opt(a.az),
        network,
        billing_mode: match billing {
            BillingArg::OnDemand => pb::BillingMode::OnDemand,
            BillingArg::Subscription => pb::BillingMode::Subscription,
        } as i32,
        subscription,
        region: opt(a.region),
        no_egress: a.no_egress,
    }
}

/// `pool <name> (<id>) <verb> (<Status>)` plus the status reason.
fn pool_summary(p: &pb::Pool, verb: &str) -> String {
    let mut text = format!(
        "pool {} ({}) {verb} ({})",
        p.name,
        p.pool_id,
        pool_status_name(p.status)
    );
    if !p.status_reason.is_empty() {
        text.push_str(": ");
        text.push_str(&p.status_reason);
    }
    text.push('\n');
    text
}

fn pool_gpus(p: &pb::Pool) -> String {
    format!(
        "{}/{}",
        format_milli(i64::from(p.gpus_allocated_milli)),
        p.gpus_total
    )
}

/// The node count the pool is scaling to, when it differs from its current
/// one. A target of 0 counts only while the pool is Scaling: a scheduler
/// that does not fill the field in sends 0 too.
fn pool_target(p: &pb::Pool) -> Option<u32> {
    let target = p.target_node_count;
    let scaling = p.status == pb::PoolStatus::Scaling as i32;
    (target != p.node_count && (target != 0 || scaling)).then_some(target)
}

/// `ready/node_count`, with `→target` while the pool scales to another size.
fn pool_nodes(p: &pb::Pool) -> String {
    let mut text = format!("{}/{}", p.nodes_ready, p.node_count);
    if let Some(target) = pool_target(p) {
        text.push_str(&format!("→{target}"));
    }
    text
}

fn pool_az(p: &pb::Pool) -> String {
    match (p.az.as_str(), p.resolved_az.as_str()) {
        (asked, resolved) if asked == resolved || resolved.is_empty() => asked.to_string(),
        ("", resolved) => resolved.to_string(),
        (asked, resolved) => format!("{resolved} ({asked})"),
    }
}

fn pool_table(pools: &[pb::Pool]) -> String {
    let mut t = Table::new(&[
        "pool", "name", "type", "tenant", "spec", "nodes", "status", "billing", "az", "reason",
    ]);
    for p in pools {
        let az = if p.resolved_az.is_empty() {
            &p.az
        } else {
            &p.resolved_az
        };
        t.row(vec![
            p.pool_id.clone(),
            p.name.clone(),
            pool_type_name(p.r#type).to_string(),
            p.tenant.clone(),
            p.spec.clone(),
            pool_nodes(p),
            pool_status_name(p.status).to_string(),
            billing_mode_name(p.billing_mode).to_string(),
            az.clone(),
            p.status_reason.clone(),
        ]);
    }
    t.render()
}

fn pool_detail(p: &pb::Pool, now: i64) -> String {
    let mut d = Details::default();
    d.add("Pool", &p.pool_id);
    d.add("Name", &p.name);
    d.add("Type", pool_type_name(p.r#type));
    d.add("Status", pool_status_name(p.status));
    d.add("Status reason", &p.status_reason);
    d.add("Tenant", &p.tenant);
    d.add("Description", &p.description);
    d.add("Spec", &p.spec);
    let mut nodes = format!("{} ready / {}", p.nodes_ready, p.node_count);
    if let Some(target) = pool_target(p) {
        nodes.push_str(&format!(" (scaling to {target})"));
    }
    d.add("Nodes", nodes);
    d.add("GPUs", format!("{} allocated", pool_gpus(p)));
    d.add("AZ", pool_az(p));
    d.add("Region", &p.region);
    let network = match p.network.as_ref().and_then(|n| n.network.as_ref()) {
        Some(pb::network::Network::Custom(c)) => format!(
            "custom: vpc {}, subnet {}, security groups {}",
            dash(&c.vpc_id),
            dash(&c.subnet_id),
            dash(&c.security_group_ids.join(","))
        ),
        Some(pb::network::Network::Isolated(i)) => format!("isolated: {}", dash(&i.network_id)),
        None => String::new(),
    };
    d.add("Network", network);
    if p.no_egress {
        d.add("Egress", "none (no_egress)");
    }
    d.add("Billing", billing_mode_name(p.billing_mode));
    if let Some(s) = &p.subscription {
        d.add(
            "Months",
            format!("{} (billed {})", s.months, s.billed_months),
        );
        d.add("Auto-renew", s.auto_renew.to_string());
        d.add(
            "Convert at expiry",
            s.convert_to_on_demand_at_expiry.to_string(),
        );
        d.add(
            "Starts",
            ts_ms(s.starts_at.as_ref())
                .map(format_time)
                .unwrap_or_default(),
        );
        d.add(
            "Ends",
            ts_ms(s.ends_at.as_ref())
                .map(format_time)
                .unwrap_or_default(),
        );
    }
    d.add(
        "Created",
        format_time_ago(ts_ms(p.created_at.as_ref()), now),
    );
    if p.deleted_at.is_some() {
        d.add(
            "Deleted",
            format_time_ago(ts_ms(p.deleted_at.as_ref()), now),
        );
    }
    d.add("Node ids", p.node_ids.join(","));
    d.render()
}

/// Asks the user to type the pool's name (or the id given) on the terminal.
async fn confirm_pool(
    pools: &mut PoolServiceClient<Svc>,
    pool: &str,
    action: &str,
) -> Result<(), CliError> {
    let p = pools
        .get_pool(pb::GetPoolRequest {
            pool: pool.to_string(),
        })
        .await?
        .into_inner();
    let prompt = format!(
        "{action} pool {} ({}). This cannot be undone.\nType the pool name to confirm: ",
        p.name, p.pool_id
    );
    let mut stderr = std::io::stderr();
    let _ = stderr
        .write_all(prompt.as_bytes())
        .and_then(|()| stderr.flush());
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Message(format!("cannot read the confirmation: {e}")))?;
    let typed = line.trim();
    if !typed.is_empty() && (typed == p.name || typed == pool || typed == p.pool_id) {
        Ok(())
    } else {
        Err(CliError::Message(format!(
            "confirmation did not match the pool name `{}`; nothing done",
            p.name
        )))
    }
}

/// Refuses to prompt when stdin is not a terminal and `--yes` was not given.
fn require_terminal(yes: bool, pool: &str, action: &str) -> Result<(), CliError> {
    if yes || std::io::stdin().is_terminal() {
        Ok(())
    } else {
        Err(CliError::Message(format!(
            "refusing to {action} pool `{pool}` without confirmation: stdin is not a terminal; pass --yes to confirm"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    /// Parses a command line given as one string split on whitespace.
    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gpupool").chain(line.split_whitespace()))
    }

    fn create_request(line: &str) -> pb::CreatePoolRequest {
        match parse(line).unwrap().command {
            Command::Pool {
                command: PoolCommand::Create(a),
            } => create_pool_request(a),
            other => panic!("not a create: {other:?}"),
        }
    }

    fn pool_command(line: &str) -> PoolCommand {
        match parse(line).unwrap().command {
            Command::Pool { command } => command,
            other => panic!("not a pool command: {other:?}"),
        }
    }

    #[test]
    fn pool_list_all() {
        assert!(matches!(
            pool_command("pool list"),
            PoolCommand::List { all: false }
        ));
        assert!(matches!(
            pool_command("pool list --all"),
            PoolCommand::List { all: true }
        ));
    }

    #[test]
    fn pool_nodes_takes_a_pool() {
        assert!(matches!(
            pool_command("pool nodes team-a"),
            PoolCommand::Nodes { pool } if pool == "team-a"
        ));
        assert!(parse("pool nodes").is_err());
    }

    #[test]
    fn pool_scale_out_and_in() {
        use pb::scale_pool_request::Change;
        let PoolCommand::ScaleOut { pool, count } = pool_command("pool scale-out p --count 3")
        else {
            panic!("not a scale-out");
        };
        let req = scale_out_request(pool, count);
        assert_eq!(req.pool, "p");
        assert_eq!(req.change, Some(Change::AddNodes(3)));
        assert!(!req.force);
        assert!(parse("pool scale-out p").is_err());

        let PoolCommand::ScaleIn {
            pool,
            node_ids,
            force,
        } = pool_command("pool scale-in p n1 n2 --force")
        else {
            panic!("not a scale-in");
        };
        let req = scale_in_request(pool, node_ids, force);
        assert_eq!(req.pool, "p");
        assert_eq!(
            req.change,
            Some(Change::RemoveNodes(pb::NodeIds {
                node_ids: vec!["n1".into(), "n2".into()]
            }))
        );
        assert!(req.force);
        assert!(matches!(
            pool_command("pool scale-in p n1"),
            PoolCommand::ScaleIn { force: false, .. }
        ));
        assert!(parse("pool scale-in p").is_err());
        assert!(parse("pool scale-in p --force").is_err());
        // The old command is gone.
        assert!(parse("pool scale p --add 1").is_err());
    }

    #[test]
    fn pool_scale_in_plan() {
        assert!(matches!(
            pool_command("pool scale-in-plan p --count 2"),
            PoolCommand::ScaleInPlan { pool, count: 2 } if pool == "p"
        ));
        assert!(parse("pool scale-in-plan p").is_err());

        let picks = [
            pb::ScaleInPick {
                node_id: "n3".into(),
                free_gpus: 8,
                pool_free_gpus_after: 8,
                explanation: "n3 is idle".into(),
                ..Default::default()
            },
            pb::ScaleInPick {
                node_id: "n1".into(),
                instances_disrupted: 2,
                job_ids: vec!["j-1".into(), "j-2".into()],
                free_gpus: 4,
                pool_free_gpus_after: 4,
                pool_fragmented_gpus_after: 4,
                explanation: "n1 runs 2 instances".into(),
            },
        ];
        let text = scale_in_plan_text(&picks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "RANK",
                "NODE",
                "DISRUPTED",
                "JOBS",
                "FREE",
                "GPUS",
                "POOL",
                "FREE",
                "AFTER",
                "FRAGMENTED",
                "AFTER"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["1", "n3", "0", "-", "8", "8", "0"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["2", "n1", "2", "j-1,j-2", "4", "4", "4"]
        );
        assert_eq!(lines[3], "  1. n3 is idle");
        assert_eq!(lines[4], "  2. n1 runs 2 instances");
    }

    #[test]
    fn pool_delete_confirmation_flag() {
        assert!(matches!(
            pool_command("pool delete p --yes"),
            PoolCommand::Delete { yes: true, .. }
        ));
        assert!(matches!(
            pool_command("pool delete p"),
            PoolCommand::Delete { yes: false, .. }
        ));
    }

    #[test]
    fn pool_create_request() {
        let req = create_request(
            "pool create --type deploy --name p --spec s --nodes 2 --months 3 --vpc v \
             --subnet sn --security-group g1 --security-group g2 --az AZ2 --description d \
             --region r1 --auto-renew",
        );
        assert_eq!(req.r#type, pb::PoolType::Deploy as i32);
        assert_eq!(req.name, "p");
        assert_eq!(req.spec, "s");
        assert_eq!(req.node_count, 2);
        assert_eq!(req.description, "d");
        assert_eq!(req.region, "r1");
        assert_eq!(req.billing_mode, pb::BillingMode::Subscription as i32);
        let sub = req.subscription.unwrap();
        assert_eq!(sub.months, 3);
        assert!(sub.auto_renew);
        assert_eq!(req.az, "AZ2");
        let Some(pb::network::Network::Custom(c)) = req.network.unwrap().network else {
            panic!("no custom network");
        };
        assert_eq!(c.vpc_id, "v");
        assert_eq!(c.subnet_id, "sn");
        assert_eq!(c.security_group_ids, ["g1", "g2"]);

        let req = create_request(
            "pool create --type train --name p --spec s --nodes 1 --billing subscription --months 12",
        );
        assert_eq!(req.billing_mode, pb::BillingMode::Subscription as i32);
        let req = create_request(
            "pool create --type train --name p --spec s --nodes 1 --billing on-demand",
        );
        assert_eq!(req.billing_mode, pb::BillingMode::OnDemand as i32);
        assert!(parse("pool create --type public --name p --spec s --nodes 1").is_err());

        let req = create_request("pool create --type train --name p --spec s --nodes 1");
        assert_eq!(req.r#type, pb::PoolType::Train as i32);
        assert_eq!(req.billing_mode, pb::BillingMode::OnDemand as i32);
        assert!(req.subscription.is_none());
        assert!(req.network.is_none());
    }

    #[test]
    fn renewal_flags_take_booleans() {
        assert!(parse("pool renewal p --auto-renew true --convert-at-expiry false").is_ok());
        assert!(parse("pool renewal p --auto-renew maybe").is_err());
    }

    #[test]
    fn tables_render_pools() {
        let mut pool = pb::Pool {
            pool_id: "pool-1".into(),
            name: "team-a".into(),
            r#type: pb::PoolType::Deploy as i32,
            tenant: "acme".into(),
            spec: "8xH100".into(),
            az: "random".into(),
            resolved_az: "AZ2".into(),
            status: pb::PoolStatus::Running as i32,
            billing_mode: pb::BillingMode::Subscription as i32,
            node_count: 2,
            target_node_count: 2,
            nodes_ready: 1,
            gpus_total: 16,
            subscription: Some(pb::Subscription {
                months: 12,
                billed_months: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = pool_table(std::slice::from_ref(&pool));
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "POOL", "NAME", "TYPE", "TENANT", "SPEC", "NODES", "STATUS", "BILLING", "AZ",
                "REASON"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "pool-1",
                "team-a",
                "deploy",
                "acme",
                "8xH100",
                "1/2",
                "Running",
                "subscription",
                "AZ2",
                "-"
            ]
        );
        assert!(pool_detail(&pool, 0).contains("12 (billed 10)"));
        assert_eq!(
            pool_summary(&pool, "created"),
            "pool team-a (pool-1) created (Running)\n"
        );

        // A scheduler that leaves the target at 0 shows no target.
        pool.target_node_count = 0;
        assert!(pool_table(std::slice::from_ref(&pool)).contains(" 1/2 "));
        pool.status = pb::PoolStatus::Scaling as i32;
        assert!(pool_table(std::slice::from_ref(&pool)).contains("1/2→0"));

        pool.target_node_count = 4;
        pool.status_reason = "adding 2 nodes".into();
        pool.resolved_az = String::new();
        let table = pool_table(std::slice::from_ref(&pool));
        assert!(table.contains("1/2→4"), "{table}");
        assert!(table.contains("random"), "{table}");
        assert!(table.contains("adding 2 nodes"), "{table}");
        assert!(pool_detail(&pool, 0).contains("(scaling to 4)"));
    }
}
