//! `gpupool audit list` (AuditService).

use clap::Subcommand;
use gpupool_proto::v1 as pb;
use serde_json::{Value, json};

use crate::OutputFormat;
use crate::args::{opt, parse_time};
use crate::conn::{Conn, every_page};
use crate::error::CliError;
use crate::format::{Table, format_time, ts_ms};
use crate::output::emit;

/// `gpupool audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records, oldest first: every mutating call (refused and failed
    /// ones too), who made it, from where, and how it ended. A tenant sees
    /// the records of its own resources only.
    List {
        /// Only this tenant's records (admin only; a tenant gets its own).
        #[arg(long)]
        tenant: Option<String>,
        /// Only calls on this pool (id or name).
        #[arg(long)]
        pool: Option<String>,
        /// Only calls on this job.
        #[arg(long)]
        job: Option<String>,
        /// Only calls on this node.
        #[arg(long)]
        node: Option<String>,
        /// Records from this time on: RFC 3339 (`2026-11-27T10:00:00Z`),
        /// `YYYY-MM-DDTHH:MM` (UTC) or `YYYY-MM-DD` (UTC midnight).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        from: Option<prost_types::Timestamp>,
        /// Records before this time (same forms as --from).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        to: Option<prost_types::Timestamp>,
        /// At most this many records (the oldest); 0: all.
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
}

pub(super) async fn audit_command(
    conn: &Conn,
    out: OutputFormat,
    command: AuditCommand,
) -> Result<(), CliError> {
    let AuditCommand::List {
        tenant,
        pool,
        job,
        node,
        from,
        to,
        limit,
    } = command;
    let client = conn.audit().await?;
    let request = pb::ListAuditRequest {
        tenant: opt(tenant),
        pool_id: opt(pool),
        job_id: opt(job),
        node_id: opt(node),
        from,
        to,
        page_size: 0,
        page_token: String::new(),
    };
    let mut records = every_page(|page_token| {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            let page = client
                .list_audit(pb::ListAuditRequest {
                    page_token,
                    ..request
                })
                .await?
                .into_inner();
            Ok((page.records, page.next_page_token))
        }
    })
    .await?;
    if limit > 0 {
        records.truncate(limit);
    }
    emit(out, || audit_table(&records), || audit_json(&records))
}

fn pairs(m: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(" ")
}

fn audit_table(records: &[pb::AuditRecord]) -> String {
    let mut t = Table::new(&[
        "seq", "time", "who", "peer", "method", "targets", "result", "args",
    ]);
    for r in records {
        let result = if r.message.is_empty() {
            r.code.clone()
        } else {
            format!("{}: {}", r.code, r.message)
        };
        t.row(vec![
            r.seq.to_string(),
            ts_ms(r.at.as_ref()).map(format_time).unwrap_or_default(),
            format!("{} {}", r.role, r.who),
            r.peer.clone(),
            r.method.clone(),
            pairs(&r.targets),
            result,
            pairs(&r.args),
        ]);
    }
    t.render()
}

fn audit_json(records: &[pb::AuditRecord]) -> Value {
    Value::Array(
        records
            .iter()
            .map(|r| {
                let sorted = |m: &std::collections::HashMap<String, String>| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect::<serde_json::Map<_, _>>()
                };
                json!({
                    "seq": r.seq,
                    "at_ms": ts_ms(r.at.as_ref()),
                    "role": r.role,
                    "who": r.who,
                    "tenant": r.tenant,
                    "peer": r.peer,
                    "method": r.method,
                    "targets": sorted(&r.targets),
                    "args": sorted(&r.args),
                    "code": r.code,
                    "message": r.message,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_as_a_row_and_as_json() {
        let r = pb::AuditRecord {
            seq: 7,
            at: Some(gpupool_proto::timestamp_from_unix_ms(1_795_773_600_000)),
            role: "tenant".into(),
            who: "acme".into(),
            tenant: "acme".into(),
            peer: "10.0.0.9:51234".into(),
            method: "PoolService/DeletePool".into(),
            targets: [("pool".to_string(), "p-1".to_string())].into(),
            args: Default::default(),
            code: "FAILED_PRECONDITION".into(),
            message: "confirm the deletion".into(),
        };
        let text = audit_table(std::slice::from_ref(&r));
        assert!(text.contains("tenant acme"), "{text}");
        assert!(text.contains("pool=p-1"), "{text}");
        assert!(
            text.contains("FAILED_PRECONDITION: confirm the deletion"),
            "{text}"
        );
        let v = audit_json(&[r]);
        assert_eq!(v[0]["targets"]["pool"], "p-1");
        assert_eq!(v[0]["seq"], 7);
    }
}
