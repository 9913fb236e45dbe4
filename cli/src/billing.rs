//! `gpupool usage`, `gpupool order list` and `gpupool bill` (UsageService).

use clap::{Args, Subcommand, ValueEnum};
use gpupool_proto::v1 as pb;

use crate::OutputFormat;
use crate::args::{opt, parse_month, parse_time};
use crate::conn::{Conn, every_page};
use crate::error::CliError;
use crate::format::{
    Details, Table, billing_mode_name, csv_line, format_micros, format_time, ts_ms,
};
use crate::json;
use crate::output::{emit, emit_bytes};

/// Arguments of `gpupool usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this tenant's records.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this pool's records (id or name).
    #[arg(long)]
    pub pool: Option<String>,
    /// Only this job's records.
    #[arg(long)]
    pub job: Option<String>,
    /// Records from this time on: RFC 3339 (`2026-11-27T10:00:00Z`),
    /// `YYYY-MM-DDTHH:MM` (UTC) or `YYYY-MM-DD` (UTC midnight).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: Option<prost_types::Timestamp>,
    /// Records up to this time (same forms as --from).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to: Option<prost_types::Timestamp>,
    /// Roll the records up by hour, day or month.
    #[arg(long, value_enum, default_value_t = RollupArg::Hour)]
    pub by: RollupArg,
    /// Print RFC 4180 CSV with raw integers (whatever --output says).
    #[arg(long)]
    pub csv: bool,
}

/// `--by` of `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RollupArg {
    /// One record per metered hour.
    Hour,
    /// One record per UTC day.
    Day,
    /// One record per UTC calendar month.
    Month,
}

impl RollupArg {
    fn proto(self) -> pb::Rollup {
        match self {
            RollupArg::Hour => pb::Rollup::Hour,
            RollupArg::Day => pb::Rollup::Day,
            RollupArg::Month => pb::Rollup::Month,
        }
    }
}

/// `gpupool order ...`
#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// List subscription orders and refunds.
    List {
        /// Only this tenant's orders.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this pool's orders (id or name).
        #[arg(long)]
        pool: Option<String>,
    },
}

/// Arguments of `gpupool bill`.
#[derive(Debug, Args)]
pub struct BillArgs {
    /// The tenant billed (default: the token's tenant).
    #[arg(long)]
    pub tenant: Option<String>,
    /// The calendar month (UTC), `YYYY-MM` (default: the current month).
    #[arg(long, value_name = "YYYY-MM", value_parser = parse_month)]
    pub month: Option<String>,
}

/// The CSV header of `usage --csv`.
const USAGE_CSV_HEADER: [&str; 16] = [
    "period",
    "tenant",
    "pool_id",
    "job_id",
    "instance_id",
    "spec",
    "billing_mode",
    "entry_kind",
    "quantity",
    "seconds",
    "unit_ms",
    "unit_price_micros",
    "amount_micros",
    "gpu_allocated_ms",
    "gpu_used_ms",
    "preemptible",
];

pub(super) async fn usage_command(
    conn: &Conn,
    out: OutputFormat,
    args: UsageArgs,
) -> Result<(), CliError> {
    let csv = args.csv;
    let mut usage = conn.usage().await?;
    let mut req = usage_request(args);
    let mut r = pb::ListUsageResponse::default();
    loop {
        let page = usage.list_usage(req.clone()).await?.into_inner();
        merge_usage_page(&mut r, page.records);
        r.total_micros += page.total_micros;
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    for (i, rec) in r.records.iter_mut().enumerate() {
        rec.record_id = i as u64 + 1;
    }
    if csv {
        return emit_bytes(usage_csv(&r.records).as_bytes());
    }
    emit(out, || usage_table(&r), || json::usage(&r))
}

pub(super) async fn order_command(
    conn: &Conn,
    out: OutputFormat,
    command: OrderCommand,
) -> Result<(), CliError> {
    let OrderCommand::List { tenant, pool } = command;
    let usage = conn.usage().await?;
    let orders = every_page(|page_token| {
        let (mut usage, tenant, pool) = (usage.clone(), opt(tenant.clone()), opt(pool.clone()));
        async move {
            let page = usage
                .list_orders(pb::ListOrdersRequest {
                    tenant,
                    pool,
                    page_size: 0,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.orders, page.next_page_token))
        }
    })
    .await?;
    emit(out, || order_table(&orders), || json::orders(&orders))
}

pub(super) async fn bill_command(
    conn: &Conn,
    out: OutputFormat,
    args: BillArgs,
) -> Result<(), CliError> {
    let b = conn
        .usage()
        .await?
        .get_bill(bill_request(args))
        .await?
        .into_inner();
    emit(out, || bill_text(&b), || json::bill(&b))
}

fn usage_request(a: UsageArgs) -> pb::ListUsageRequest {
    pb::ListUsageRequest {
        tenant: opt(a.tenant),
        pool: opt(a.pool),
        from: a.from,
        to: a.to,
        job: opt(a.job),
        by: a.by.proto() as i32,
        page_size: 0,
        page_token: String::new(),
    }
}

/// Adds one page's records: a rolled-up usage record that continues one of
/// the previous page (same period, subject and mode) is added to it.
fn merge_usage_page(into: &mut pb::ListUsageResponse, records: Vec<pb::UsageRecord>) {
    type Key = (String, String, String, String, String, i32, String);
    let key = |r: &pb::UsageRecord| -> Key {
        (
            r.period.clone(),
            r.tenant.clone(),
            r.pool_id.clone(),
            r.job_id.clone(),
            r.instance_id.clone(),
            r.billing_mode,
            r.entry_kind.clone(),
        )
    };
    let mut at: std::collections::HashMap<Key, usize> = into
        .records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.entry_kind == "usage")
        .map(|(i, r)| (key(r), i))
        .collect();
    for r in records {
        if r.entry_kind == "usage"
            && let Some(&i) = at.get(&key(&r))
        {
            let acc = &mut into.records[i];
            acc.unit_ms += r.unit_ms;
            acc.seconds = gpupool_common::arith::round_div(i128::from(acc.unit_ms), 1000)
                .clamp(0, i64::from(u32::MAX)) as u32;
            acc.amount_micros += r.amount_micros;
            acc.gpu_allocated_ms += r.gpu_allocated_ms;
            acc.gpu_used_ms += r.gpu_used_ms;
            acc.quantity = acc.quantity.max(r.quantity);
            continue;
        }
        if r.entry_kind == "usage" {
            at.insert(key(&r), into.records.len());
        }
        into.records.push(r);
    }
}

fn bill_request(a: BillArgs) -> pb::GetBillRequest {
    pb::GetBillRequest {
        tenant: opt(a.tenant),
        month: opt(a.month),
    }
}

/// An optional time in RFC 3339, or empty.
fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    ts_ms(t).map(format_time).unwrap_or_default()
}

/// The period a record covers: the server's `period`, or the start of its
/// hour.
fn record_period(u: &pb::UsageRecord) -> String {
    if u.period.is_empty() {
        time_text(u.hour_start.as_ref())
    } else {
        u.period.clone()
    }
}

fn usage_table(r: &pb::ListUsageResponse) -> String {
    let mut t = Table::new(&[
        "period",
        "tenant",
        "pool",
        "job",
        "instance",
        "spec",
        "mode",
        "kind",
        "qty",
        "seconds",
        "gpu s",
        "gpu used s",
        "used",
        "unit price",
        "amount",
    ]);
    for u in &r.records {
        t.row(vec![
            record_period(u),
            u.tenant.clone(),
            u.pool_id.clone(),
            u.job_id.clone(),
            u.instance_id.clone(),
            u.spec.clone(),
            mode_label(u.billing_mode, u.preemptible),
            u.entry_kind.clone(),
            u.quantity.to_string(),
            u.seconds.to_string(),
            (u.gpu_allocated_ms / 1000).to_string(),
            (u.gpu_used_ms / 1000).to_string(),
            used_ratio(u),
            format_micros(u.unit_price_micros),
            format_micros(u.amount_micros),
        ]);
    }
    format!("{}total: {}\n", t.render(), format_micros(r.total_micros))
}

/// The mode column: a preemptible job's rows say so (their price is the
/// preemptible one).
fn mode_label(mode: i32, preemptible: bool) -> String {
    let name = billing_mode_name(mode);
    if preemptible {
        format!("{name} (preemptible)")
    } else {
        name.to_string()
    }
}

/// Used GPU time as a share of allocated GPU time, or `-` without GPUs.
fn used_ratio(u: &pb::UsageRecord) -> String {
    if u.gpu_allocated_ms > 0 {
        format!("{}%", u.gpu_used_ms * 100 / u.gpu_allocated_ms)
    } else {
        "-".into()
    }
}

/// The records as CSV: a header, then one line per record, raw integers.
fn usage_csv(records: &[pb::UsageRecord]) -> String {
    let mut text = csv_line(&USAGE_CSV_HEADER);
    for u in records {
        text.push_str(&csv_line(&[
            record_period(u),
            u.tenant.clone(),
            u.pool_id.clone(),
            u.job_id.clone(),
            u.instance_id.clone(),
            u.spec.clone(),
            billing_mode_name(u.billing_mode).to_string(),
            u.entry_kind.clone(),
            u.quantity.to_string(),
            u.seconds.to_string(),
            u.unit_ms.to_string(),
            u.unit_price_micros.to_string(),
            u.amount_micros.to_string(),
            u.gpu_allocated_ms.to_string(),
            u.gpu_used_ms.to_string(),
            u.preemptible.to_string(),
        ]));
    }
    text
}

fn order_table(orders: &[pb::Order]) -> String {
    let mut t = Table::new(&[
        "order", "kind", "pool", "tenant", "months", "billed", "amount", "starts", "ends",
    ]);
    for o in orders {
        t.row(vec![
            o.order_id.clone(),
            o.kind.clone(),
            o.pool_id.clone(),
            o.tenant.clone(),
            o.months.to_string(),
            o.billed_months.to_string(),
            format_micros(o.amount_micros),
            time_text(o.starts_at.as_ref()),
            time_text(o.ends_at.as_ref()),
        ]);
    }
    t.render()
}

/// The bill: its header, the USAGE and ORDERS tables, then the sums.
fn bill_text(b: &pb::Bill) -> String {
    let mut d = Details::default();
    d.add("Tenant", &b.tenant);
    d.add("Month", &b.month);
    d.add("Currency", &b.currency);
    let mut text = d.render();

    let mut usage = Table::new(&["pool", "job", "spec", "mode", "seconds", "amount"]);
    for l in &b.usage {
        usage.row(vec![
            l.pool_id.clone(),
            l.job_id.clone(),
            l.spec.clone(),
            mode_label(l.billing_mode, l.preemptible),
            l.seconds.to_string(),
            format_micros(l.amount_micros),
        ]);
    }
    text.push_str("\nUSAGE\n");
    text.push_str(&usage.render());

    let mut orders = Table::new(&[
        "order",
        "kind",
        "pool",
        "months",
        "billed months",
        "amount",
        "starts",
        "ends",
    ]);
    for o in &b.orders {
        orders.row(vec![
            o.order_id.clone(),
            o.kind.clone(),
            o.pool_id.clone(),
            o.months.to_string(),
            o.billed_months.to_string(),
            format_micros(o.amount_micros),
            time_text(o.starts_at.as_ref()),
            time_text(o.ends_at.as_ref()),
        ]);
    }
    text.push_str("\nORDERS\n");
    text.push_str(&orders.render());

    text.push_str(&format!(
        "\nusage: {}  orders: {}  refunds: {}  total: {}\n",
        format_micros(b.usage_micros),
        format_micros(b.orders_micros),
        format_micros(b.refunds_micros),
        format_micros(b.total_micros),
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gpupool").chain(line.split_whitespace()))
    }

    fn usage_req(line: &str) -> pb::ListUsageRequest {
        match parse(line).unwrap().command {
            Command::Usage(a) => usage_request(a),
            other => panic!("not a usage command: {other:?}"),
        }
    }

    fn usage_args(line: &str) -> UsageArgs {
        match parse(line).unwrap().command {
            Command::Usage(a) => a,
            other => panic!("not a usage command: {other:?}"),
        }
    }

    fn bill_req(line: &str) -> pb::GetBillRequest {
        match parse(line).unwrap().command {
            Command::Bill(a) => bill_request(a),
            other => panic!("not a bill command: {other:?}"),
        }
    }

    /// The cells of a rendered table line.
    fn cells(line: &str) -> Vec<&str> {
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn usage_flags() {
        let req = usage_req(
            "usage --tenant acme --pool p1 --job j-1 --from 2026-11-01 \
             --to 2026-11-27T10:00 --by day",
        );
        assert_eq!(req.tenant, "acme");
        assert_eq!(req.pool, "p1");
        assert_eq!(req.job, "j-1");
        assert_eq!(req.from.unwrap().seconds, 1_793_491_200);
        assert_eq!(req.to.unwrap().seconds, 1_795_773_600);
        assert_eq!(req.by, pb::Rollup::Day as i32);
        assert!(!usage_args("usage --by month").csv);

        // Defaults: everything the token may see, by hour.
        let req = usage_req("usage");
        assert_eq!(req.by, pb::Rollup::Hour as i32);
        assert!(req.from.is_none() && req.to.is_none());
        assert!(req.tenant.is_empty() && req.pool.is_empty() && req.job.is_empty());
        assert_eq!(usage_req("usage --by month").by, pb::Rollup::Month as i32);
        assert_eq!(
            usage_req("usage --from 2026-11-27T10:00:00+01:00")
                .from
                .unwrap()
                .seconds,
            1_795_770_000
        );
        let a = usage_args("usage --csv -o json");
        assert!(a.csv);

        assert!(parse("usage --by week").is_err());
        assert!(parse("usage --from yesterday").is_err());
        assert!(parse("usage --to 2026-02-30").is_err());
        // The old subcommand is gone.
        assert!(parse("usage list").is_err());
    }

    #[test]
    fn order_and_bill_flags() {
        let cli = parse("order list --tenant acme --pool p1").unwrap();
        assert!(matches!(
            cli.command,
            Command::Order { command: OrderCommand::List { tenant: Some(t), pool: Some(p) } }
                if t == "acme" && p == "p1"
        ));
        let req = bill_req("bill --tenant acme --month 2026-11");
        assert_eq!(req.tenant, "acme");
        assert_eq!(req.month, "2026-11");
        let req = bill_req("bill");
        assert!(req.tenant.is_empty() && req.month.is_empty());
        assert!(parse("bill --month 2026-13").is_err());
        assert!(parse("bill --month 2026-11-01").is_err());
    }

    fn record(period: &str, entry_kind: &str, amount: i64) -> pb::UsageRecord {
        pb::UsageRecord {
            record_id: 1,
            tenant: "acme".into(),
            pool_id: "public".into(),
            job_id: "j-1".into(),
            instance_id: "j-1-0".into(),
            spec: "1xH100".into(),
            hour_start: Some(gpupool_proto::timestamp_from_unix_ms(1_795_773_600_000)),
            seconds: 1800,
            quantity: 2,
            unit_price_micros: 2_500_000,
            amount_micros: amount,
            billing_mode: pb::BillingMode::OnDemand as i32,
            entry_kind: entry_kind.into(),
            unit_ms: 3_600_000,
            period: period.into(),
            gpu_allocated_ms: 3_600_000,
            gpu_used_ms: 900_000,
            preemptible: false,
        }
    }

    #[test]
    fn usage_table_columns_and_total() {
        let r = pb::ListUsageResponse {
            records: vec![
                record("", "usage", 2_500_000),
                pb::UsageRecord {
                    billing_mode: pb::BillingMode::Subscription as i32,
                    job_id: String::new(),
                    instance_id: String::new(),
                    ..record("2026-11-27", "refund", -12_500_000)
                },
            ],
            total_micros: -10_000_000,
            next_page_token: String::new(),
        };
        let text = usage_table(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            cells(lines[0]),
            [
                "PERIOD",
                "TENANT",
                "POOL",
                "JOB",
                "INSTANCE",
                "SPEC",
                "MODE",
                "KIND",
                "QTY",
                "SECONDS",
                "GPU S",
                "GPU USED S",
                "USED",
                "UNIT PRICE",
                "AMOUNT"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "2026-11-27T10:00:00Z",
                "acme",
                "public",
                "j-1",
                "j-1-0",
                "1xH100",
                "on-demand",
                "usage",
                "2",
                "1800",
                "3600",
                "900",
                "25%",
                "2.500000",
                "2.500000"
            ]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "2026-11-27",
                "acme",
                "public",
                "-",
                "-",
                "1xH100",
                "subscription",
                "refund",
                "2",
                "1800",
                "3600",
                "900",
                "25%",
                "2.500000",
                "-12.500000"
            ]
        );
        assert_eq!(lines[3], "total: -10.000000");
    }

    #[test]
    fn usage_csv_has_raw_integers_and_quotes() {
        let records = [
            record("", "usage", 2_500_000),
            pb::UsageRecord {
                pool_id: "team, \"a\"".into(),
                preemptible: true,
                ..record("2026-11", "refund", -12_500_000)
            },
        ];
        let text = usage_csv(&records);
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        assert_eq!(
            lines[0],
            "period,tenant,pool_id,job_id,instance_id,spec,billing_mode,entry_kind,\
             quantity,seconds,unit_ms,unit_price_micros,amount_micros,gpu_allocated_ms,gpu_used_ms,\
             preemptible"
        );
        assert_eq!(
            lines[1],
            "2026-11-27T10:00:00Z,acme,public,j-1,j-1-0,1xH100,on-demand,usage,\
             2,1800,3600000,2500000,2500000,3600000,900000,false"
        );
        assert_eq!(
            lines[2],
            "2026-11,acme,\"team, \"\"a\"\"\",j-1,j-1-0,1xH100,on-demand,refund,\
             2,1800,3600000,2500000,-12500000,3600000,900000,true"
        );
        assert!(text.ends_with("\r\n"));
        // No records: the header alone.
        assert_eq!(usage_csv(&[]).lines().count(), 1);
    }

    fn order(kind: &str, amount: i64) -> pb::Order {
        pb::Order {
            order_id: format!("o-{kind}"),
            kind: kind.into(),
            created_at: Some(gpupool_proto::timestamp_from_unix_ms(0)),
            pool_id: "pool-1".into(),
            tenant: "acme".into(),
            months: 3,
            billed_months: 2,
            amount_micros: amount,
            starts_at: Some(gpupool_proto::timestamp_from_unix_ms(1_700_000_000_000)),
            ends_at: None,
        }
    }

    #[test]
    fn order_table_has_kind() {
        let text = order_table(&[order("new", 30_000_000)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            cells(lines[0]),
            [
                "ORDER", "KIND", "POOL", "TENANT", "MONTHS", "BILLED", "AMOUNT", "STARTS", "ENDS"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "o-new",
                "new",
                "pool-1",
                "acme",
                "3",
                "2",
                "30.000000",
                "2023-11-14T22:13:20Z",
                "-"
            ]
        );
    }

    #[test]
    fn bill_layout() {
        let b = pb::Bill {
            tenant: "acme".into(),
            month: "2026-11".into(),
            currency: "USD".into(),
            usage: vec![pb::BillLine {
                pool_id: "public".into(),
                job_id: "j-1".into(),
                spec: "1xH100".into(),
                billing_mode: pb::BillingMode::OnDemand as i32,
                seconds: 7200,
                amount_micros: 5_000_000,
                preemptible: false,
            }],
            orders: vec![order("new", 30_000_000), order("refund", -10_000_000)],
            usage_micros: 5_000_000,
            orders_micros: 30_000_000,
            refunds_micros: -10_000_000,
            total_micros: 25_000_000,
        };
        let text = bill_text(&b);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Tenant:   acme");
        assert_eq!(lines[1], "Month:    2026-11");
        assert_eq!(lines[2], "Currency: USD");
        assert_eq!(lines[3], "");
        assert_eq!(lines[4], "USAGE");
        assert_eq!(
            cells(lines[5]),
            ["POOL", "JOB", "SPEC", "MODE", "SECONDS", "AMOUNT"]
        );
        assert_eq!(
            lines[6].split_whitespace().collect::<Vec<_>>(),
            ["public", "j-1", "1xH100", "on-demand", "7200", "5.000000"]
        );
        assert_eq!(lines[7], "");
        assert_eq!(lines[8], "ORDERS");
        assert_eq!(
            cells(lines[9]),
            [
                "ORDER",
                "KIND",
                "POOL",
                "MONTHS",
                "BILLED MONTHS",
                "AMOUNT",
                "STARTS",
                "ENDS"
            ]
        );
        assert_eq!(
            lines[11].split_whitespace().collect::<Vec<_>>(),
            [
                "o-refund",
                "refund",
                "pool-1",
                "3",
                "2",
                "-10.000000",
                "2023-11-14T22:13:20Z",
                "-"
            ]
        );
        assert_eq!(lines[12], "");
        assert_eq!(
            lines[13],
            "usage: 5.000000  orders: 30.000000  refunds: -10.000000  total: 25.000000"
        );
        assert_eq!(lines.len(), 14, "{text}");
    }
}
