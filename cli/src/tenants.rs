//! `gpupool tenant ...` (TenantService, admin only) and `gpupool whoami`.

use clap::Subcommand;
use gpupool_proto::v1 as pb;

use crate::OutputFormat;
use crate::conn::{Conn, every_page};
use crate::error::CliError;
use crate::format::{Table, format_time, ts_ms};
use crate::json;
use crate::output::emit;

/// `gpupool tenant ...`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (and its isolated network).
    Create {
        /// Tenant name.
        name: String,
        /// Most nodes in the tenant's dedicated pools together (0: none).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_nodes: u32,
        /// Most GPUs on those nodes together (0: none).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_gpus: u32,
    },
    /// List tenants with their quotas and use.
    List,
    /// Show one tenant.
    Get {
        /// Tenant name.
        name: String,
    },
    /// Issue a new API token for a tenant (shown once, with its id), or
    /// with --revoke revoke one by its id, or all of them.
    Token {
        /// Tenant name.
        name: String,
        /// Revoke the token with this id (as issuing printed it), or `all`.
        #[arg(long, value_name = "TOKEN_ID|all")]
        revoke: Option<String>,
    },
    /// Set a tenant's quotas and its public-pool share; what is not given
    /// stays as it is.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
        .args(["max_nodes", "max_gpus", "public_max_gpus", "weight", "allow_high_class"])))]
    Quota {
        /// Tenant name.
        name: String,
        /// Most nodes in the tenant's dedicated pools together (0: none).
        #[arg(long, value_name = "N")]
        max_nodes: Option<u32>,
        /// Most GPUs on those nodes together (0: none).
        #[arg(long, value_name = "N")]
        max_gpus: Option<u32>,
        /// Most GPUs its jobs hold at once in the public pool (a fraction
        /// counts its share), or `none` for no limit.
        #[arg(long, value_name = "N|none", value_parser = parse_limit)]
        public_max_gpus: Option<Limit>,
        /// Its weight in the public pool's fair share (1 to 10000): the
        /// queue goes first to the tenant with the lowest dominant share of
        /// the pool over its weight.
        #[arg(long, value_name = "W", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        weight: Option<u32>,
        /// Whether it may submit `--priority-class high` jobs, which
        /// preempt lower classes (other tenants' included).
        #[arg(long, value_name = "BOOL")]
        allow_high_class: Option<bool>,
    },
}

pub(super) async fn tenant_command(
    conn: &Conn,
    out: OutputFormat,
    command: TenantCommand,
) -> Result<(), CliError> {
    let mut tenants = conn.tenants().await?;
    match command {
        TenantCommand::Create {
            name,
            max_nodes,
            max_gpus,
        } => {
            let t = tenants
                .create_tenant(pb::CreateTenantRequest {
                    name,
                    quota: Some(quota(max_nodes, max_gpus)),
                })
                .await?
                .into_inner();
            emit_tenant(out, &t)
        }
        TenantCommand::List => {
            let list = every_page(|page_token| {
                let mut tenants = tenants.clone();
                async move {
                    let page = tenants
                        .list_tenants(pb::ListTenantsRequest {
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.tenants, page.next_page_token))
                }
            })
            .await?;
            emit(out, || tenant_table(&list), || json::tenants(&list))
        }
        TenantCommand::Get { name } => {
            let t = tenants
                .get_tenant(pb::GetTenantRequest { name })
                .await?
                .into_inner();
            emit_tenant(out, &t)
        }
        TenantCommand::Token {
            name,
            revoke: Some(token_id),
        } => {
            let r = tenants
                .revoke_tokens(pb::RevokeTokensRequest {
                    tenant: name.clone(),
                    token_id,
                })
                .await?
                .into_inner();
            emit(
                out,
                || format!("revoked {} token(s) of tenant {name}\n", r.revoked),
                || serde_json::json!({ "tenant": name, "revoked": r.revoked }),
            )
        }
        TenantCommand::Token { name, revoke: None } => {
            let mut r = tenants
                .issue_token(pb::IssueTokenRequest {
                    tenant: name.clone(),
                })
                .await?
                .into_inner();
            if r.tenant.is_empty() {
                r.tenant = name;
            }
            emit(out, || token_text(&r), || json::token(&r))
        }
        TenantCommand::Quota {
            name,
            max_nodes,
            max_gpus,
            public_max_gpus,
            weight,
            allow_high_class,
        } => {
            // SetQuota replaces the whole quota: what is not given is kept.
            let mut q = tenants
                .get_tenant(pb::GetTenantRequest { name: name.clone() })
                .await?
                .into_inner()
                .quota
                .unwrap_or_default();
            q.max_dedicated_nodes = max_nodes.unwrap_or(q.max_dedicated_nodes);
            q.max_gpus = max_gpus.unwrap_or(q.max_gpus);
            if let Some(Limit(limit)) = public_max_gpus {
                q.public_max_gpus = limit;
            }
            q.public_weight = weight.unwrap_or(q.public_weight);
            q.allow_high_class = allow_high_class.unwrap_or(q.allow_high_class);
            let t = tenants
                .set_quota(pb::SetQuotaRequest {
                    tenant: name,
                    quota: Some(q),
                })
                .await?
                .into_inner();
            emit_tenant(out, &t)
        }
    }
}

pub(super) async fn whoami(conn: &Conn, out: OutputFormat) -> Result<(), CliError> {
    let r = conn
        .tenants()
        .await?
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    emit(out, || whoami_text(&r), || json::whoami(&r))
}

fn quota(max_nodes: u32, max_gpus: u32) -> pb::Quota {
    pb::Quota {
        max_dedicated_nodes: max_nodes,
        max_gpus,
        ..Default::default()
    }
}

/// `--public-max-gpus`: a number of GPUs, or none (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u32>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit(None));
    }
    s.parse()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("{s:?} is not a number of GPUs or `none`"))
}

/// One tenant: a one-row table, or its JSON object.
fn emit_tenant(out: OutputFormat, t: &pb::Tenant) -> Result<(), CliError> {
    emit(
        out,
        || tenant_table(std::slice::from_ref(t)),
        || json::tenant(t),
    )
}

fn tenant_table(tenants: &[pb::Tenant]) -> String {
    let mut table = Table::new(&[
        "tenant",
        "max nodes",
        "nodes used",
        "max gpus",
        "gpus used",
        "public max gpus",
        "public gpus used",
        "weight",
        "recent share",
        "public share",
        "tokens",
        "network",
        "created",
    ]);
    for t in tenants {
        let quota = t.quota.unwrap_or_default();
        table.row(vec![
            t.name.clone(),
            quota.max_dedicated_nodes.to_string(),
            t.dedicated_nodes_used.to_string(),
            quota.max_gpus.to_string(),
            t.gpus_used.to_string(),
            quota.public_max_gpus.map_or("-".into(), |g| g.to_string()),
            format!("{}", t.public_gpu_milli_used as f64 / 1000.0),
            quota.public_weight.max(1).to_string(),
            format!("{:.1}%", t.public_recent_share_ppm as f64 / 1e4),
            format!("{:.1}%", t.public_share_ppm as f64 / 1e4),
            t.tokens.to_string(),
            t.network_id.clone(),
            ts_ms(t.created_at.as_ref())
                .map(format_time)
                .unwrap_or_default(),
        ]);
    }
    table.render()
}

/// The token alone on its own line, so that it can be copied or cut out.
fn token_text(r: &pb::IssueTokenResponse) -> String {
    format!(
        "token for {} (shown once, store it now; its id for --revoke: {}):\n{}\n",
        r.tenant, r.token_id, r.token
    )
}

fn whoami_text(r: &pb::WhoAmIResponse) -> String {
    if r.admin {
        format!("tenant: {} (admin)\n", r.tenant)
    } else {
        format!("tenant: {}\n", r.tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn tenant_command(line: &str) -> TenantCommand {
        let args = std::iter::once("gpupool").chain(line.split_whitespace());
        match Cli::try_parse_from(args).unwrap().command {
            Command::Tenant { command } => command,
            other => panic!("not a tenant command: {other:?}"),
        }
    }

    fn parses(line: &str) -> bool {
        Cli::try_parse_from(std::iter::once("gpupool").chain(line.split_whitespace())).is_ok()
    }

    #[test]
    fn create_defaults_quota_to_zero() {
        let TenantCommand::Create {
            name,
            max_nodes,
            max_gpus,
        } = tenant_command("tenant create acme")
        else {
            panic!("not a create");
        };
        assert_eq!((name.as_str(), max_nodes, max_gpus), ("acme", 0, 0));
        let TenantCommand::Create {
            max_nodes,
            max_gpus,
            ..
        } = tenant_command("tenant create acme --max-nodes 4 --max-gpus 32")
        else {
            panic!("not a create");
        };
        assert_eq!((max_nodes, max_gpus), (4, 32));
        assert!(!parses("tenant create"));
        assert!(!parses("tenant create acme --max-gpus -1"));
    }

    #[test]
    fn list_get_token_quota() {
        assert!(matches!(tenant_command("tenant list"), TenantCommand::List));
        assert!(matches!(
            tenant_command("tenant get acme"),
            TenantCommand::Get { name } if name == "acme"
        ));
        assert!(matches!(
            tenant_command("tenant token acme"),
            TenantCommand::Token { name, revoke: None } if name == "acme"
        ));
        assert!(matches!(
            tenant_command("tenant quota acme --max-nodes 2 --max-gpus 16"),
            TenantCommand::Quota { name, max_nodes: Some(2), max_gpus: Some(16), public_max_gpus: None, weight: None, allow_high_class: None } if name == "acme"
        ));
        assert!(matches!(
            tenant_command("tenant quota acme --public-max-gpus 4 --weight 3"),
            TenantCommand::Quota {
                max_nodes: None,
                public_max_gpus: Some(Limit(Some(4))),
                weight: Some(3),
                ..
            }
        ));
        assert!(matches!(
            tenant_command("tenant quota acme --public-max-gpus none"),
            TenantCommand::Quota {
                public_max_gpus: Some(Limit(None)),
                ..
            }
        ));
        assert!(matches!(
            tenant_command("tenant quota acme --allow-high-class true"),
            TenantCommand::Quota {
                allow_high_class: Some(true),
                weight: None,
                ..
            }
        ));
        // Something to set; a weight of 1..10000; a limit or none.
        assert!(!parses("tenant quota acme"));
        assert!(!parses("tenant quota acme --weight 0"));
        assert!(!parses("tenant quota acme --public-max-gpus lots"));
        assert!(!parses("tenant get"));
    }

    #[test]
    fn whoami_parses_and_prints() {
        let cli = Cli::try_parse_from(["gpupool", "whoami", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Whoami));
        let admin = pb::WhoAmIResponse {
            tenant: "root".into(),
            admin: true,
        };
        assert_eq!(whoami_text(&admin), "tenant: root (admin)\n");
        let user = pb::WhoAmIResponse {
            tenant: "acme".into(),
            admin: false,
        };
        assert_eq!(whoami_text(&user), "tenant: acme\n");
    }

    #[test]
    fn token_is_alone_on_its_line() {
        let r = pb::IssueTokenResponse {
            tenant: "acme".into(),
            token: "gp_abc123".into(),
            token_id: "0123456789ab".into(),
        };
        assert_eq!(
            token_text(&r),
            "token for acme (shown once, store it now; its id for --revoke: 0123456789ab):\ngp_abc123\n"
        );
    }

    #[test]
    fn tenant_table_columns() {
        let t = pb::Tenant {
            name: "acme".into(),
            quota: Some(quota(4, 32)),
            created_at: Some(gpupool_proto::timestamp_from_unix_ms(1_700_000_000_000)),
            dedicated_nodes_used: 1,
            gpus_used: 8,
            tokens: 2,
            network_id: "net-acme".into(),
            public_gpu_milli_used: 1500,
            public_share_ppm: 125_000,
            public_recent_share_ppm: 62_000,
        };
        let text = tenant_table(&[t]);
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "TENANT",
                "MAX NODES",
                "NODES USED",
                "MAX GPUS",
                "GPUS USED",
                "PUBLIC MAX GPUS",
                "PUBLIC GPUS USED",
                "WEIGHT",
                "RECENT SHARE",
                "PUBLIC SHARE",
                "TOKENS",
                "NETWORK",
                "CREATED"
            ]
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "acme",
                "4",
                "1",
                "32",
                "8",
                "-",
                "1.5",
                "1",
                "6.2%",
                "12.5%",
                "2",
                "net-acme",
                "2023-11-14T22:13:20Z"
            ]
        );
    }
}
