//! Admin pages: nodes with their GPUs and health, cordon; tenants and
//! their quotas; the cluster's utilisation. A tenant who opens them gets
//! what the API answers its token (the nodes it may see; permission
//! denied for the tenant list and for cordoning).

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;

use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use gpupool_common::display::{format_milli, node_status_name};
use gpupool_proto::v1 as pb;
use maud::html;

use super::view::{self, badge, csrf, frame, time};
use super::{App, Fields, Signed, check_csrf, page};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/nodes", get(nodes))
        .route("/admin/nodes/{id}/{action}", post(cordon))
        .route("/admin/tenants", get(tenants))
}

async fn nodes(Signed { app, s }: Signed) -> Response {
    // What ListNodes shows this caller (the nav offers the page to the
    // admin; cordoning is the API's to refuse).
    let nodes = match app
        .nodes
        .clone()
        .list_nodes(app.request(&s, pb::ListNodesRequest::default()))
        .await
    {
        Ok(r) => r.into_inner().nodes,
        Err(status) => return view::failure(Some(&s), &status),
    };
    let gpus: usize = nodes
        .iter()
        .map(|n| n.inventory.as_ref().map_or(0, |i| i.gpus.len()))
        .sum();
    let allocated: u64 = nodes
        .iter()
        .map(|n| u64::from(n.gpus_allocated_milli))
        .sum();
    let pct = if gpus == 0 {
        0
    } else {
        allocated * 100 / (gpus as u64 * 1000)
    };
    page(frame(
        Some(&s),
        "Nodes",
        html! {
            h1 { "Nodes" }
            p #utilisation { "Cluster: " (nodes.len()) " nodes, " (gpus) " GPUs, "
                (format_milli(allocated as i64)) " allocated (" (pct) " %)." }
            table {
                thead { tr { th { "Node" } th { "Status" } th { "Pool" } th { "Spec" } th { "GPUs" } th { "Allocated" } th { "Health" } th { "Heartbeat" } th { "" } } }
                tbody {
                    @for n in &nodes {
                        @let inv = n.inventory.clone().unwrap_or_default();
                        tr {
                            td.mono { (n.node_id) br; small { (inv.hostname) } }
                            td { (badge(node_status_name(n.status)))
                                @if n.cordoned { " cordoned" } @if n.draining { " draining" } @if n.revoked { " revoked" } }
                            td.mono { (n.pool) }
                            td { (n.spec) }
                            td.num { (inv.gpus.len()) @if inv.fake_gpus { " (fake)" } }
                            td.num { (format_milli(i64::from(n.gpus_allocated_milli))) }
                            td {
                                @for g in inv.gpus.iter().filter(|g| !g.healthy) {
                                    span.badge.bad { "GPU " (g.index) ": " (g.health_reason) } " "
                                }
                                @if inv.gpus.iter().all(|g| g.healthy) { span.badge.ok { "healthy" } }
                            }
                            td { (time(n.last_heartbeat.as_ref())) }
                            td {
                                form method="post" action={"/admin/nodes/" (view::seg(&n.node_id)) (if n.cordoned { "/uncordon" } else { "/cordon" })} {
                                    (csrf(&s))
                                    button type="submit" { @if n.cordoned { "Uncordon" } @else { "Cordon" } }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// Cordons or uncordons a node (`action`: `cordon` | `uncordon`).
async fn cordon(
    Signed { app, s }: Signed,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    check_csrf!(app, s, Fields::parse(&body).get("csrf"));
    let request = app.request(&s, pb::CordonNodeRequest { node_id: id });
    let done = match action.as_str() {
        "cordon" => app.nodes.clone().cordon_node(request).await,
        "uncordon" => app.nodes.clone().uncordon_node(request).await,
        _ => return view::not_found(&s, "a node is cordoned or uncordoned"),
    };
    match done {
        Ok(_) => Redirect::to("/admin/nodes").into_response(),
        Err(status) => view::failure(Some(&s), &status),
    }
}

async fn tenants(Signed { app, s }: Signed) -> Response {
    let tenants = match app
        .tenants
        .clone()
        .list_tenants(app.request(&s, pb::ListTenantsRequest::default()))
        .await
    {
        Ok(r) => r.into_inner().tenants,
        Err(status) => return view::failure(Some(&s), &status),
    };
    page(frame(
        Some(&s),
        "Tenants",
        html! {
            h1 { "Tenants" }
            table {
                thead { tr { th { "Tenant" } th { "Dedicated nodes (used / max)" } th { "GPUs (used / max)" } th { "Public GPUs in use" } th { "Public limit" } th { "Weight" } th { "Share" } th { "Recent share" } } }
                tbody {
                    @for t in &tenants {
                        @let q = t.quota.clone().unwrap_or_default();
                        tr {
                            td { b { (t.name) } }
                            td.num { (t.dedicated_nodes_used) " / " (q.max_dedicated_nodes) }
                            td.num { (t.gpus_used) " / " (q.max_gpus) }
                            td.num { (format_milli(t.public_gpu_milli_used as i64)) }
                            td.num { (q.public_max_gpus.map_or("none".to_string(), |g| g.to_string())) }
                            td.num { (q.public_weight) }
                            td.num { (format_milli((t.public_share_ppm / 10) as i64)) " %" }
                            td.num { (format_milli((t.public_recent_share_ppm / 10) as i64)) " %" }
                        }
                    }
                }
            }
            p.hint { "Quotas are set with " code { "gpupool tenant quota NAME" } "." }
        },
    ))
}
