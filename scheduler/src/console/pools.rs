//! Pools: the list (refreshed live), create (type first, then its form),
//! the detail page with scale out and in, convert, renewal, delete and
//! unsubscribe behind a confirmation that names the pool.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use gpupool_common::display::{billing_mode_name, pool_status_name, pool_type_name};
use gpupool_proto::v1 as pb;
use maud::{Markup, html};

use super::view::{self, badge, csrf, error_line, frame, money, time};
use super::{App, Fields, Session, Signed, check_csrf, page};
use crate::domain::pool::{validate_deploy_name, validate_train_name};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/pools", get(list).post(create))
        .route("/pools/table", get(table))
        .route("/pools/new", get(choose_type))
        .route("/pools/new/{kind}", get(create_form))
        .route("/pools/check-name", get(check_name))
        .route("/pools/{id}", get(detail))
        .route("/pools/{id}/scale-out", post(scale_out))
        .route("/pools/{id}/scale-in", post(scale_in))
        .route("/pools/{id}/convert", post(convert))
        .route("/pools/{id}/renewal", post(renewal))
        .route("/pools/{id}/delete", get(delete_confirm).post(delete))
        .route(
            "/pools/{id}/unsubscribe",
            get(unsubscribe_confirm).post(unsubscribe),
        )
}

async fn pools_of(app: &App, s: &Session) -> Result<Vec<pb::Pool>, tonic::Status> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .pools
            .clone()
            .list_pools(app.request(
                s,
                pb::ListPoolsRequest {
                    include_deleted: false,
                    page_size: 0,
                    page_token: token,
                },
            ))
            .await?
            .into_inner();
        out.extend(page.pools);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

fn pool_table(pools: &[pb::Pool]) -> Markup {
    html! {
        div #pools hx-get="/pools/table" hx-trigger="every 5s" hx-swap="outerHTML" {
            @if pools.is_empty() {
                p.empty { "No pools yet." }
            } @else {
                table {
                    thead { tr {
                        th { "Name" } th { "ID" } th { "Type" } th { "Status" } th { "Spec" }
                        th { "Nodes" } th { "GPUs" } th { "Billing" } th { "Expires" } th { "Auto-renew" }
                    } }
                    tbody {
                        @for p in pools {
                            tr {
                                td { a href={"/pools/" (p.pool_id)} { (p.name) } }
                                td.mono { (p.pool_id) }
                                td { (pool_type_name(p.r#type)) }
                                td { (badge(pool_status_name(p.status))) }
                                td { (p.spec) }
                                td.num { (p.nodes_ready) " / " (p.node_count) }
                                td.num { (p.gpus_total) }
                                td { (billing_mode_name(p.billing_mode)) }
                                td { (time(p.subscription.as_ref().and_then(|s| s.ends_at.as_ref()))) }
                                td { @if p.subscription.as_ref().is_some_and(|s| s.auto_renew) { "yes" } @else { "no" } }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn list(Signed { app, s }: Signed) -> Response {
    match pools_of(&app, &s).await {
        Ok(pools) => page(frame(
            Some(&s),
            "Pools",
            html! {
                div.titlebar {
                    h1 { "Resource pools" }
                    a.button href="/pools/new" { "Create a pool" }
                }
                (pool_table(&pools))
            },
        )),
        Err(status) => view::failure(Some(&s), &status),
    }
}

async fn table(Signed { app, s }: Signed) -> Response {
    match pools_of(&app, &s).await {
        Ok(pools) => page(pool_table(&pools)),
        Err(status) => view::failure(Some(&s), &status),
    }
}

async fn choose_type(Signed { s, .. }: Signed) -> Response {
    page(frame(
        Some(&s),
        "Create a pool",
        html! {
            h1 { "Create a pool: choose its type" }
            div.choices {
                a.choice href="/pools/new/train" {
                    h2 { "Train pool" }
                    p { "Dedicated nodes for training jobs, notebooks and TensorBoard. On demand, or a subscription of 1 to 12 months (12 are billed as 10)." }
                }
                a.choice href="/pools/new/deploy" {
                    h2 { "Deploy pool" }
                    p { "Dedicated nodes for online and batch services, in a network of your own or a custom one. On demand, or 1 to 11 months where the region sells subscriptions." }
                }
            }
        },
    ))
}

/// What the create form was sent with (to show it again with its error).
#[derive(Default)]
struct Draft {
    name: String,
    description: String,
    spec: String,
    nodes: String,
    az: String,
    billing: String,
    months: String,
    region: String,
    vpc: String,
    subnet: String,
    groups: String,
}

impl Draft {
    fn of(f: &Fields) -> Self {
        Self {
            name: f.get("name").into(),
            description: f.get("description").into(),
            spec: f.get("spec").into(),
            nodes: f.get("nodes").into(),
            az: f.get("az").into(),
            billing: f.get("billing").into(),
            months: f.get("months").into(),
            region: f.get("region").into(),
            vpc: f.get("vpc_id").into(),
            subnet: f.get("subnet_id").into(),
            groups: f.get("security_groups").into(),
        }
    }
}

fn kind_of(kind: &str) -> Option<pb::PoolType> {
    match kind {
        "train" => Some(pb::PoolType::Train),
        "deploy" => Some(pb::PoolType::Deploy),
        _ => None,
    }
}

async fn create_form(Signed { app, s }: Signed, Path(kind): Path<String>) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return view::not_found(&s, "pools are of type train or deploy");
    };
    form_page(&app, &s, kind, &Draft::default(), None, StatusCode::OK).await
}

async fn form_page(
    app: &App,
    s: &Session,
    kind: pb::PoolType,
    draft: &Draft,
    error: Option<&str>,
    code: StatusCode,
) -> Response {
    let specs = match app
        .pools
        .clone()
        .list_specs(app.request(s, pb::ListSpecsRequest {}))
        .await
    {
        Ok(r) => r.into_inner().specs,
        Err(status) => return view::failure(Some(s), &status),
    };
    let markup = create_markup(app, s, kind, &specs, draft, error);
    (code, page(markup)).into_response()
}

fn create_markup(
    app: &App,
    s: &Session,
    kind: pb::PoolType,
    specs: &[pb::Spec],
    d: &Draft,
    error: Option<&str>,
) -> Markup {
    let train = kind == pb::PoolType::Train;
    let kind_name = if train { "train" } else { "deploy" };
    let billing = &app.shared.config.billing;
    let subscription_regions = &app.shared.config.subscription_regions;
    frame(
        Some(s),
        "Create a pool",
        html! {
            h1 { "Create a " (kind_name) " pool" }
            p { a href="/pools/new" { "Choose another type" } }
            (error_line(error))
            form.card.create method="post" action="/pools" {
                (csrf(s))
                input type="hidden" name="type" value=(kind_name);
                label for="name" { "Name" }
                input #name name="name" value=(d.name) required autocomplete="off"
                    hx-get="/pools/check-name" hx-trigger="input changed delay:250ms"
                    hx-target="#name-check" hx-include="[name=type]"
                    aria-describedby="name-check";
                p #name-check.hint aria-live="polite" {
                    @if train { "Letters, digits, - and _, at most 64 characters (R-CREATE-4)." }
                    @else { "4 to 24 lower-case letters, digits and hyphens, starting with a letter (R-CREATE-12)." }
                }
                label for="description" { "Description" }
                input #description name="description" value=(d.description);
                label for="spec" { "Spec" }
                select #spec name="spec" required {
                    @for sp in specs {
                        @let price = billing.price_of(&sp.name);
                        option value=(sp.name) disabled[sp.sold_out] selected[d.spec == sp.name]
                            data-month-price=(price.subscription_node_month_micros)
                            data-currency=(billing.currency) {
                            (sp.name) " — " (sp.gpu_count) "× " (sp.gpu_model) ", " (sp.cpu_cores) " cores, "
                            (sp.memory_mib / 1024) " GiB — "
                            @if sp.sold_out { "sold out" } @else { (sp.nodes_free) " of " (sp.nodes_total) " nodes free" }
                        }
                    }
                }
                label for="nodes" { "Nodes" }
                input #nodes name="nodes" type="number" min="1" value=(if d.nodes.is_empty() { "1" } else { &d.nodes }) required;
                label for="az" { "Availability zone" }
                input #az name="az" value=(d.az) placeholder="any";
                @if !train {
                    label for="region" { "Region" }
                    input #region name="region" value=(d.region) placeholder="the cluster's";
                    fieldset {
                        legend { "Network" }
                        p.hint { "Leave empty for a network of this tenant's own (R-CREATE-14)." }
                        label for="vpc_id" { "VPC" }
                        input #vpc_id name="vpc_id" value=(d.vpc);
                        label for="subnet_id" { "Subnet" }
                        input #subnet_id name="subnet_id" value=(d.subnet);
                        label for="security_groups" { "Security groups (comma-separated)" }
                        input #security_groups name="security_groups" value=(d.groups);
                        label.inline { input type="checkbox" name="no_egress"; " No egress: instances reach nothing outside their network" }
                    }
                }
                fieldset {
                    legend { "Billing" }
                    label.inline { input type="radio" name="billing" value="on-demand" checked[d.billing != "subscription"]; " On demand, by the hour" }
                    label.inline { input type="radio" name="billing" value="subscription" checked[d.billing == "subscription"]
                        disabled[!train && subscription_regions.is_empty()]; " Subscription" }
                    @if !train && subscription_regions.is_empty() {
                        p.hint { "This cluster sells no deploy subscriptions (no subscription regions)." }
                    }
                    label for="months" { "Duration" }
                    select #months name="months" { (duration_options(train, &d.months, None)) }
                    p.hint { "Price: " output #price { "node-month price × billed months × nodes" } }
                    label.inline { input type="checkbox" name="auto_renew"; " Renew automatically" }
                }
                button type="submit" { "Create" }
            }
        },
    )
}

#[derive(serde::Deserialize)]
struct NameQuery {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    kind: String,
}

/// The name rule of the pool type, checked as the user types (the same
/// functions `CreatePool` applies).
async fn check_name(_signed_in: Signed, Query(q): Query<NameQuery>) -> Response {
    let checked = match kind_of(&q.kind) {
        Some(pb::PoolType::Train) => validate_train_name(&q.name),
        _ => validate_deploy_name(&q.name),
    };
    page(match checked {
        Ok(()) => html! { span.ok { "✓ a valid name" } },
        Err(e) => html! { span.error role="alert" { (e.to_string()) } },
    })
}

fn create_request(kind: pb::PoolType, f: &Fields) -> Result<pb::CreatePoolRequest, String> {
    let nodes: u32 = f
        .get("nodes")
        .parse()
        .map_err(|_| format!("nodes must be a whole number, not {:?}", f.get("nodes")))?;
    let subscription = f.get("billing") == "subscription";
    let months: u32 = if subscription {
        f.get("months")
            .parse()
            .map_err(|_| "choose a duration".to_string())?
    } else {
        0
    };
    let custom = !f.get("vpc_id").is_empty() || !f.get("subnet_id").is_empty();
    Ok(pb::CreatePoolRequest {
        r#type: kind as i32,
        name: f.get("name").into(),
        description: f.get("description").into(),
        spec: f.get("spec").into(),
        node_count: nodes,
        az: f.get("az").into(),
        network: custom.then(|| pb::Network {
            network: Some(pb::network::Network::Custom(pb::CustomNetwork {
                vpc_id: f.get("vpc_id").into(),
                subnet_id: f.get("subnet_id").into(),
                security_group_ids: f
                    .get("security_groups")
                    .split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(String::from)
                    .collect(),
            })),
        }),
        billing_mode: if subscription {
            pb::BillingMode::Subscription
        } else {
            pb::BillingMode::OnDemand
        } as i32,
        subscription: subscription.then(|| pb::Subscription {
            months,
            auto_renew: f.checked("auto_renew"),
            ..Default::default()
        }),
        region: f.get("region").into(),
        no_egress: f.checked("no_egress"),
    })
}

async fn create(Signed { app, s }: Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    check_csrf!(app, s, f.get("csrf"));
    let Some(kind) = kind_of(f.get("type")) else {
        return view::not_found(&s, "pools are of type train or deploy");
    };
    let request = match create_request(kind, &f) {
        Ok(r) => r,
        Err(e) => {
            return form_page(
                &app,
                &s,
                kind,
                &Draft::of(&f),
                Some(&e),
                StatusCode::BAD_REQUEST,
            )
            .await;
        }
    };
    match app
        .pools
        .clone()
        .create_pool(app.request(&s, request))
        .await
    {
        Ok(pool) => Redirect::to(&format!("/pools/{}", pool.into_inner().pool_id)).into_response(),
        Err(status) => {
            form_page(
                &app,
                &s,
                kind,
                &Draft::of(&f),
                Some(status.message()),
                StatusCode::BAD_REQUEST,
            )
            .await
        }
    }
}

/// Everything the detail page shows about a pool.
struct Detail {
    pool: pb::Pool,
    nodes: Vec<pb::Node>,
    jobs: Vec<pb::Job>,
    suggested: Vec<String>,
    orders: Vec<pb::Order>,
}

async fn detail_of(app: &App, s: &Session, id: &str) -> Result<Detail, tonic::Status> {
    let pool = app
        .pools
        .clone()
        .get_pool(app.request(s, pb::GetPoolRequest { pool: id.into() }))
        .await?
        .into_inner();
    let nodes = app
        .nodes
        .clone()
        .list_nodes(app.request(
            s,
            pb::ListNodesRequest {
                pool: pool.pool_id.clone(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .nodes;
    let jobs = super::jobs::jobs_of(app, s, &pool.pool_id, &[]).await?;
    // The advisor's pick for one node (none when the pool has one node).
    let suggested = app
        .pools
        .clone()
        .scale_in_plan(app.request(
            s,
            pb::ScaleInPlanRequest {
                pool: pool.pool_id.clone(),
                count: 1,
            },
        ))
        .await
        .map(|r| {
            r.into_inner()
                .picks
                .into_iter()
                .map(|p| p.node_id)
                .collect()
        })
        .unwrap_or_default();
    let orders = app
        .usage
        .clone()
        .list_orders(app.request(
            s,
            pb::ListOrdersRequest {
                pool: pool.pool_id.clone(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .orders;
    Ok(Detail {
        pool,
        nodes,
        jobs,
        suggested,
        orders,
    })
}

async fn detail(Signed { app, s }: Signed, Path(id): Path<String>) -> Response {
    detail_page(&app, &s, &id, None).await
}

async fn detail_page(app: &App, s: &Session, id: &str, error: Option<&str>) -> Response {
    match detail_of(app, s, id).await {
        Ok(d) => {
            let code = if error.is_some() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            (code, page(detail_markup(app, s, &d, error))).into_response()
        }
        Err(status) => view::failure(Some(s), &status),
    }
}

fn detail_markup(app: &App, s: &Session, d: &Detail, error: Option<&str>) -> Markup {
    let p = &d.pool;
    let id = &p.pool_id;
    let currency = &app.shared.config.billing.currency;
    let sub = p.subscription.as_ref();
    let dedicated = p.r#type != pb::PoolType::Public as i32;
    let subscribed = p.billing_mode == pb::BillingMode::Subscription as i32;
    frame(
        Some(s),
        &p.name,
        html! {
            div.titlebar {
                h1 { "Pool " (p.name) }
                (badge(pool_status_name(p.status)))
            }
            (error_line(error))
            dl.facts {
                dt { "ID" } dd.mono { (id) }
                dt { "Type" } dd { (pool_type_name(p.r#type)) }
                dt { "Spec" } dd { (p.spec) }
                dt { "Nodes" } dd { (p.nodes_ready) " ready of " (p.node_count) }
                dt { "AZ" } dd { (if p.resolved_az.is_empty() { &p.az } else { &p.resolved_az }) }
                dt { "Billing" } dd { (billing_mode_name(p.billing_mode)) }
                @if let Some(sub) = sub {
                    dt { "Term" } dd #term { (sub.months) " months, billed " (sub.billed_months) ", " (time(sub.starts_at.as_ref())) " to " (time(sub.ends_at.as_ref())) }
                    dt { "Renewal" } dd { @if sub.auto_renew { "automatic" } @else if sub.convert_to_on_demand_at_expiry { "on demand at expiry" } @else { "none" } }
                }
                @if !p.status_reason.is_empty() { dt { "Reason" } dd { (p.status_reason) } }
            }
            h2 { "Nodes" }
            (nodes_table(&d.nodes, &d.jobs))
            h2 { "Jobs" }
            (super::jobs::job_table(&d.jobs))
            p { a.button href={"/jobs/new?pool=" (id)} { "Submit a job here" } }
            @if dedicated {
                (scale_forms(s, d))
                (billing_forms(app, s, p, subscribed, currency))
                h2 { "Orders" }
                (super::usage::orders_table(&d.orders, currency))
                h2 { "Delete" }
                p {
                    @if subscribed {
                        a.button.danger href={"/pools/" (id) "/unsubscribe"} { "Unsubscribe and delete" }
                        span.hint { " A subscription is released by unsubscribing: the unused term is refunded, then the pool is deleted (R-DEL-3)." }
                    } @else {
                        a.button.danger href={"/pools/" (id) "/delete"} { "Delete this pool" }
                    }
                }
            }
        },
    )
}

fn nodes_table(nodes: &[pb::Node], jobs: &[pb::Job]) -> Markup {
    html! {
        table {
            thead { tr { th { "Node" } th { "Status" } th { "GPUs" } th { "GPUs allocated" } th { "Runs" } } }
            tbody {
                @for n in nodes {
                    @let running: Vec<&str> = jobs.iter()
                        .filter(|j| j.instances.iter().any(|i| i.node_id == n.node_id && matches!(pb::InstanceState::try_from(i.state), Ok(pb::InstanceState::Running | pb::InstanceState::Scheduled | pb::InstanceState::Stopping))))
                        .map(|j| j.job_id.as_str()).collect();
                    tr {
                        td.mono { (n.node_id) }
                        td { (badge(gpupool_common::display::node_status_name(n.status))) @if n.cordoned { " cordoned" } }
                        td.num { (n.inventory.as_ref().map_or(0, |i| i.gpus.len())) }
                        td.num { (gpupool_common::display::format_milli(i64::from(n.gpus_allocated_milli))) }
                        td { @for j in running { a.mono href={"/jobs/" (j)} { (j) } " " } }
                    }
                }
            }
        }
    }
}

fn scale_forms(s: &Session, d: &Detail) -> Markup {
    let id = &d.pool.pool_id;
    html! {
        h2 { "Scale" }
        div.columns {
            form.card method="post" action={"/pools/" (id) "/scale-out"} {
                h3 { "Scale out" }
                (csrf(s))
                label for="add" { "Nodes to add" }
                input #add name="add" type="number" min="1" value="1" required;
                button type="submit" { "Scale out" }
            }
            form.card method="post" action={"/pools/" (id) "/scale-in"} {
                h3 { "Scale in" }
                (csrf(s))
                fieldset {
                    legend { "Nodes to remove (the advisor's pick is selected)" }
                    @for n in &d.nodes {
                        label.inline {
                            input type="checkbox" name="node" value=(n.node_id) checked[d.suggested.contains(&n.node_id)];
                            " " span.mono { (n.node_id) }
                        }
                    }
                }
                label.inline { input type="checkbox" name="force"; " Stop what runs on them" }
                button type="submit" { "Scale in" }
            }
        }
    }
}

/// The options of a subscription's duration: 1 to 12 months for a train
/// pool (12 billed as 10, R-CREATE-8), 1 to 11 for a deploy pool
/// (R-CREATE-17), each with its price when `price` gives one month's.
fn duration_options(train: bool, selected: &str, price: Option<(i64, &str)>) -> Markup {
    use crate::domain::pool::PoolType;
    let kind = if train {
        PoolType::Train
    } else {
        PoolType::Deploy
    };
    html! {
        @for m in 1..=(if train { 12 } else { 11 }) {
            @let billed = crate::domain::billing::billed_months(kind, m);
            option value=(m) data-billed=(billed) selected[selected == m.to_string()] {
                (m) (if m == 1 { " month" } else { " months" })
                @if billed != m { " (billed as " (billed) ")" }
                @if let Some((month, currency)) = price {
                    ": " (money(month.saturating_mul(i64::from(billed)), currency))
                }
            }
        }
    }
}

fn billing_forms(app: &App, s: &Session, p: &pb::Pool, subscribed: bool, currency: &str) -> Markup {
    let id = &p.pool_id;
    let train = p.r#type == pb::PoolType::Train as i32;
    let billing = &app.shared.config.billing;
    let node_month = billing.price_of(&p.spec).subscription_node_month_micros;
    let month_price = node_month.saturating_mul(i64::from(p.node_count));
    html! {
        h2 { "Billing" }
        div.columns {
            @if !subscribed {
                form.card method="post" action={"/pools/" (id) "/convert"} {
                    h3 { "Convert to a subscription" }
                    (csrf(s))
                    label for="months" { "Duration" }
                    select #months name="months" { (duration_options(train, "", Some((month_price, currency)))) }
                    label.inline { input type="checkbox" name="auto_renew"; " Renew automatically" }
                    p.hint { "For " (p.node_count) " node(s); the order is listed below once made." }
                    button type="submit" { "Convert" }
                }
            } @else {
                form.card method="post" action={"/pools/" (id) "/renewal"} {
                    h3 { "Renewal" }
                    (csrf(s))
                    @let sub = p.subscription.clone().unwrap_or_default();
                    label.inline { input type="checkbox" name="auto_renew" checked[sub.auto_renew]; " Renew automatically" }
                    label.inline { input type="checkbox" name="convert_at_expiry" checked[sub.convert_to_on_demand_at_expiry]; " Go on demand at expiry" }
                    button type="submit" { "Save" }
                }
            }
        }
    }
}

/// Runs a pool action; back to the detail page, with the API's error
/// above it when it failed.
async fn act<F, Fut>(app: &App, s: &Session, id: &str, call: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    match call().await {
        Ok(()) => Redirect::to(&format!("/pools/{id}")).into_response(),
        Err(status) if status.code() == tonic::Code::NotFound => view::failure(Some(s), &status),
        Err(status) => detail_page(app, s, id, Some(status.message())).await,
    }
}

/// The fields of a form, once its CSRF token is checked (else 403).
macro_rules! form_of {
    ($app:expr, $s:expr, $body:expr) => {{
        let f = Fields::parse(&$body);
        check_csrf!($app, $s, f.get("csrf"));
        f
    }};
}

async fn scale_out(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = form_of!(app, s, body);
    let Ok(add) = f.get("add").parse::<u32>() else {
        return detail_page(
            &app,
            &s,
            &id,
            Some("the nodes to add must be a whole number"),
        )
        .await;
    };
    scale(
        &app,
        &s,
        &id,
        pb::scale_pool_request::Change::AddNodes(add),
        false,
    )
    .await
}

async fn scale_in(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = form_of!(app, s, body);
    let nodes = f.all("node");
    if nodes.is_empty() {
        return detail_page(&app, &s, &id, Some("choose the nodes to remove")).await;
    }
    let change = pb::scale_pool_request::Change::RemoveNodes(pb::NodeIds { node_ids: nodes });
    scale(&app, &s, &id, change, f.checked("force")).await
}

/// Scales the pool out or in; back to its page.
async fn scale(
    app: &App,
    s: &Session,
    id: &str,
    change: pb::scale_pool_request::Change,
    force: bool,
) -> Response {
    let request = app.request(
        s,
        pb::ScalePoolRequest {
            pool: id.into(),
            change: Some(change),
            force,
        },
    );
    act(app, s, id, || async {
        app.pools.clone().scale_pool(request).await.map(drop)
    })
    .await
}

async fn convert(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = form_of!(app, s, body);
    let Ok(months) = f.get("months").parse::<u32>() else {
        return detail_page(&app, &s, &id, Some("choose a duration")).await;
    };
    let request = app.request(
        &s,
        pb::ConvertToSubscriptionRequest {
            pool: id.clone(),
            months,
            auto_renew: f.checked("auto_renew"),
        },
    );
    act(&app, &s, &id, || async {
        app.pools
            .clone()
            .convert_to_subscription(request)
            .await
            .map(drop)
    })
    .await
}

async fn renewal(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = form_of!(app, s, body);
    let request = app.request(
        &s,
        pb::SetRenewalRequest {
            pool: id.clone(),
            auto_renew: f.checked("auto_renew"),
            convert_to_on_demand_at_expiry: f.checked("convert_at_expiry"),
        },
    );
    act(&app, &s, &id, || async {
        app.pools.clone().set_renewal(request).await.map(drop)
    })
    .await
}

/// The confirmation page of a delete or an unsubscribe: the pool's name
/// must be typed.
fn confirm_markup(
    s: &Session,
    p: &pb::Pool,
    what: &str,
    note: Markup,
    error: Option<&str>,
) -> Markup {
    let action = if what == "Unsubscribe" {
        "unsubscribe"
    } else {
        "delete"
    };
    frame(
        Some(s),
        what,
        html! {
            h1 { (what) " pool " (p.name) "?" }
            (note)
            (error_line(error))
            form.card method="post" action={"/pools/" (p.pool_id) "/" (action)} {
                (csrf(s))
                label for="confirm" { "Type the pool's name, " b { (p.name) } ", to confirm" }
                input #confirm name="confirm" autocomplete="off" required autofocus;
                div.actions {
                    button.danger type="submit" { (what) " " (p.name) }
                    a.button href={"/pools/" (p.pool_id)} { "Cancel" }
                }
            }
        },
    )
}

async fn get_pool(app: &App, s: &Session, id: &str) -> Result<pb::Pool, Response> {
    app.pools
        .clone()
        .get_pool(app.request(s, pb::GetPoolRequest { pool: id.into() }))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| view::failure(Some(s), &status))
}

async fn delete_confirm(Signed { app, s }: Signed, Path(id): Path<String>) -> Response {
    match get_pool(&app, &s, &id).await {
        Ok(p) => page(confirm_markup(&s, &p, "Delete", delete_note(&p), None)),
        Err(r) => r,
    }
}

fn delete_note(p: &pb::Pool) -> Markup {
    html! {
        p { "Its " (p.node_count) " node(s) go back to the public pool once what runs on them has stopped (R-DEL-1)." }
        @if p.billing_mode == pb::BillingMode::Subscription as i32 {
            p.warn { "This pool is a subscription: it is released by "
                a href={"/pools/" (p.pool_id) "/unsubscribe"} { "unsubscribing" } ", which refunds the unused term (R-DEL-3)." }
        }
    }
}

async fn delete(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = form_of!(app, s, body);
    let p = match get_pool(&app, &s, &id).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if f.get("confirm") != p.name {
        let error = format!("type {} to confirm", p.name);
        return (
            StatusCode::BAD_REQUEST,
            page(confirm_markup(
                &s,
                &p,
                "Delete",
                delete_note(&p),
                Some(&error),
            )),
        )
            .into_response();
    }
    let request = app.request(
        &s,
        pb::DeletePoolRequest {
            pool: p.pool_id.clone(),
            confirm: true,
        },
    );
    match app.pools.clone().delete_pool(request).await {
        Ok(_) => Redirect::to("/pools").into_response(),
        Err(status) => (
            StatusCode::BAD_REQUEST,
            page(confirm_markup(
                &s,
                &p,
                "Delete",
                delete_note(&p),
                Some(status.message()),
            )),
        )
            .into_response(),
    }
}

/// What an unsubscribe would refund now: the unused part of each paid
/// order, pro rata (R-DEL-3, the rule `Unsubscribe` applies).
fn refund_now(orders: &[pb::Order]) -> i64 {
    let now = gpupool_common::display::now_ms();
    orders
        .iter()
        .filter(|o| o.kind != "refund")
        .filter_map(|o| {
            let start = gpupool_common::display::ts_ms(o.starts_at.as_ref())?;
            let end = gpupool_common::display::ts_ms(o.ends_at.as_ref())?;
            (end > now).then(|| crate::domain::billing::pro_rata(o.amount_micros, start, end, now))
        })
        .sum()
}

async fn unsubscribe_confirm(Signed { app, s }: Signed, Path(id): Path<String>) -> Response {
    match detail_of(&app, &s, &id).await {
        Ok(d) => page(confirm_markup(
            &s,
            &d.pool,
            "Unsubscribe",
            refund_note(&app, &d.orders),
            None,
        )),
        Err(status) => view::failure(Some(&s), &status),
    }
}

fn refund_note(app: &App, orders: &[pb::Order]) -> Markup {
    html! {
        p #refund { "Refund, if you unsubscribe now: about " b { (money(refund_now(orders), &app.shared.config.billing.currency)) }
            " (the unused part of the term, by the second; R-DEL-3). The pool is then deleted." }
    }
}

async fn unsubscribe(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = form_of!(app, s, body);
    let d = match detail_of(&app, &s, &id).await {
        Ok(d) => d,
        Err(status) => return view::failure(Some(&s), &status),
    };
    if f.get("confirm") != d.pool.name {
        let error = format!("type {} to confirm", d.pool.name);
        return (
            StatusCode::BAD_REQUEST,
            page(confirm_markup(
                &s,
                &d.pool,
                "Unsubscribe",
                refund_note(&app, &d.orders),
                Some(&error),
            )),
        )
            .into_response();
    }
    let request = app.request(
        &s,
        pb::UnsubscribeRequest {
            pool: d.pool.pool_id.clone(),
            confirm: true,
        },
    );
    match app.pools.clone().unsubscribe(request).await {
        Ok(_) => Redirect::to("/pools").into_response(),
        Err(status) => (
            StatusCode::BAD_REQUEST,
            page(confirm_markup(
                &s,
                &d.pool,
                "Unsubscribe",
                refund_note(&app, &d.orders),
                Some(status.message()),
            )),
        )
            .into_response(),
    }
}
