//! Usage and bills: allocated against used GPU-hours per day as a chart,
//! usage per pool and job, the month's bill, orders, and a CSV export.

use std::collections::BTreeMap;

use axum::Router;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gpupool_common::display::{billing_mode_name, csv_line, format_milli, format_time, ts_ms};
use gpupool_proto::v1 as pb;
use maud::{Markup, PreEscaped, html};

use super::view::{self, frame, money, time};
use super::{App, Session, Signed, page};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/usage", get(usage))
        .route("/usage.csv", get(usage_csv))
}

/// The caller's usage of the last 31 days, by day (a tenant its own, the
/// admin everyone's).
async fn records(app: &App, s: &Session) -> Result<(Vec<pb::UsageRecord>, i64), tonic::Status> {
    let now = gpupool_common::display::now_ms();
    let from = now - 31 * 86_400_000;
    let mut out = Vec::new();
    let mut total = 0;
    let mut token = String::new();
    loop {
        let page = app
            .usage
            .clone()
            .list_usage(app.request(
                s,
                pb::ListUsageRequest {
                    from: Some(gpupool_proto::timestamp_from_unix_ms(from)),
                    by: pb::Rollup::Day as i32,
                    page_token: token,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        out.extend(page.records);
        total += page.total_micros;
        if page.next_page_token.is_empty() || out.len() >= 50_000 {
            return Ok((out, total));
        }
        token = page.next_page_token;
    }
}

/// GPU-hours in thousandths of an hour.
fn gpu_hours_milli(ms: i64) -> i64 {
    ms / 3600
}

/// Per day: (allocated, used) GPU milli-hours.
fn per_day(records: &[pb::UsageRecord]) -> BTreeMap<String, (i64, i64)> {
    let mut days: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in records {
        let Some(start) = ts_ms(r.hour_start.as_ref()) else {
            continue;
        };
        let day = format_time(start)[..10].to_string();
        let e = days.entry(day).or_default();
        e.0 += gpu_hours_milli(r.gpu_allocated_ms);
        e.1 += gpu_hours_milli(r.gpu_used_ms);
    }
    days
}

/// The chart's data, as JSON the page's script reads (not executed).
fn chart_json(days: &BTreeMap<String, (i64, i64)>) -> String {
    let labels: Vec<&String> = days.keys().collect();
    let allocated: Vec<f64> = days.values().map(|v| v.0 as f64 / 1000.0).collect();
    let used: Vec<f64> = days.values().map(|v| v.1 as f64 / 1000.0).collect();
    // `<` escaped so the JSON cannot close its script element.
    serde_json::json!({ "labels": labels, "allocated": allocated, "used": used })
        .to_string()
        .replace('<', "\\u003c")
}

async fn usage(Signed { app, s }: Signed) -> Response {
    let (records, total) = match records(&app, &s).await {
        Ok(r) => r,
        Err(status) => return view::failure(Some(&s), &status),
    };
    let bill = app
        .usage
        .clone()
        .get_bill(app.request(
            &s,
            pb::GetBillRequest {
                tenant: String::new(),
                month: String::new(),
            },
        ))
        .await;
    let orders = app
        .usage
        .clone()
        .list_orders(app.request(&s, pb::ListOrdersRequest::default()))
        .await
        .map(|r| r.into_inner().orders);
    let currency = &app.shared.config.billing.currency;
    let days = per_day(&records);
    page(frame(
        Some(&s),
        "Usage and bills",
        html! {
            div.titlebar {
                h1 { "Usage and bills" }
                a.button href="/usage.csv" download="gpupool-usage.csv" { "Export CSV" }
            }
            h2 { "GPU-hours per day, last 31 days" }
            @if days.is_empty() {
                p.empty { "No usage yet." }
            } @else {
                div.chart { canvas #usage-chart aria-label="allocated and used GPU-hours per day" role="img" {} }
                script #usage-data type="application/json" { (PreEscaped(chart_json(&days))) }
            }
            h2 { "By pool and job" }
            (by_job(&records, currency))
            p { "Total of these 31 days: " b { (money(total, currency)) } }
            h2 { "This month's bill" }
            @match &bill {
                Ok(b) => (bill_markup(b.get_ref(), currency)),
                Err(status) => p.error { (status.message()) },
            }
            h2 { "Orders" }
            @match &orders {
                Ok(o) => (orders_table(o, currency)),
                Err(status) => p.error { (status.message()) },
            }
        },
    ))
}

fn by_job(records: &[pb::UsageRecord], currency: &str) -> Markup {
    // (pool, job) -> (allocated, used GPU milli-hours, amount)
    let mut rows: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
    for r in records {
        let e = rows
            .entry((r.pool_id.clone(), r.job_id.clone()))
            .or_default();
        e.0 += gpu_hours_milli(r.gpu_allocated_ms);
        e.1 += gpu_hours_milli(r.gpu_used_ms);
        e.2 += r.amount_micros;
    }
    html! {
        @if rows.is_empty() { p.empty { "No usage yet." } } @else {
            table #usage-by-job {
                thead { tr { th { "Pool" } th { "Job" } th { "GPU-hours allocated" } th { "GPU-hours used" } th { "Amount" } } }
                tbody {
                    @for ((pool, job), (a, u, amount)) in &rows {
                        tr {
                            td.mono { (pool) }
                            td.mono { @if job.is_empty() { "(nodes)" } @else { a href={"/jobs/" (job)} { (job) } } }
                            td.num { (format_milli(*a)) }
                            td.num { (format_milli(*u)) }
                            td.num { (money(*amount, currency)) }
                        }
                    }
                }
            }
        }
    }
}

fn bill_markup(b: &pb::Bill, currency: &str) -> Markup {
    html! {
        p { "Tenant " b { (b.tenant) } ", " (b.month) ": usage " (money(b.usage_micros, currency))
            ", orders " (money(b.orders_micros, currency)) ", refunds " (money(b.refunds_micros, currency))
            ", total " b #bill-total { (money(b.total_micros, currency)) } }
        @if !b.usage.is_empty() {
            table {
                thead { tr { th { "Pool" } th { "Job" } th { "Spec" } th { "Mode" } th { "Seconds" } th { "Amount" } } }
                tbody {
                    @for l in &b.usage {
                        tr {
                            td.mono { (l.pool_id) }
                            td.mono { (l.job_id) }
                            td { (l.spec) }
                            td { (billing_mode_name(l.billing_mode)) @if l.preemptible { " (preemptible)" } }
                            td.num { (l.seconds) }
                            td.num { (money(l.amount_micros, currency)) }
                        }
                    }
                }
            }
        }
    }
}

pub(super) fn orders_table(orders: &[pb::Order], currency: &str) -> Markup {
    html! {
        @if orders.is_empty() { p.empty { "No orders." } } @else {
            table.orders {
                thead { tr { th { "Order" } th { "Kind" } th { "Pool" } th { "Months" } th { "Billed months" } th { "Amount" } th { "From" } th { "To" } } }
                tbody {
                    @for o in orders {
                        tr {
                            td.mono { (o.order_id) }
                            td { (o.kind) }
                            td.mono { (o.pool_id) }
                            td.num { (o.months) }
                            td.num.billed-months { (o.billed_months) }
                            td.num { (money(o.amount_micros, currency)) }
                            td { (time(o.starts_at.as_ref())) }
                            td { (time(o.ends_at.as_ref())) }
                        }
                    }
                }
            }
        }
    }
}

async fn usage_csv(Signed { app, s }: Signed) -> Response {
    let (records, _) = match records(&app, &s).await {
        Ok(r) => r,
        Err(status) => return view::failure(Some(&s), &status),
    };
    let mut out = csv_line(&[
        "day",
        "tenant",
        "pool_id",
        "job_id",
        "spec",
        "billing_mode",
        "preemptible",
        "seconds",
        "gpu_allocated_ms",
        "gpu_used_ms",
        "amount_micros",
    ]);
    for r in &records {
        let day = ts_ms(r.hour_start.as_ref())
            .map(|ms| format_time(ms)[..10].to_string())
            .unwrap_or_default();
        out.push_str(&csv_line(&[
            day,
            r.tenant.clone(),
            r.pool_id.clone(),
            r.job_id.clone(),
            r.spec.clone(),
            billing_mode_name(r.billing_mode).to_string(),
            r.preemptible.to_string(),
            r.seconds.to_string(),
            r.gpu_allocated_ms.to_string(),
            r.gpu_used_ms.to_string(),
            r.amount_micros.to_string(),
        ]));
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"gpupool-usage.csv\""),
            ),
        ],
        out,
    )
        .into_response()
}
