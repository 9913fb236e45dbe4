//! The audit trail at the gRPC edge. The [`Guard`](super::access::Guard)
//! makes an [`AuditCall`] for every mutating RPC ([`audited`]): who (from
//! the access check), from where (the peer address), what (the RPC, and the
//! targets and arguments [`summarize`] takes from the request message by
//! name; never a token, an environment or a command line). The handler
//! runs inside [`CALL`]'s scope, so the first [`Shared::mutate`] that
//! succeeds stages the record with its own writes: one transaction. A call
//! that fails (or is refused by the guard) is recorded by the guard, with
//! the status it answered, in a transaction of its own (it changed
//! nothing). Unauthenticated refusals are counted in the metrics, not
//! recorded: an anonymous flood costs no writes.
//!
//! [`Shared::mutate`]: crate::state::Shared::mutate

use std::collections::BTreeMap;

use gpupool_proto::prost::Message;
use gpupool_proto::v1 as pb;

use crate::state::Shared;
pub use crate::state::audit::{AuditCall, CALL, current};

/// Every mutating RPC; read-only ones (and the agent session) are not
/// recorded.
pub const AUDITED: &[&str] = &[
    "/gpupool.v1.AgentService/Register",
    "/gpupool.v1.JobService/SubmitJob",
    "/gpupool.v1.JobService/CancelJob",
    "/gpupool.v1.JobService/ScaleService",
    "/gpupool.v1.JobService/RestartService",
    "/gpupool.v1.NodeService/CordonNode",
    "/gpupool.v1.NodeService/UncordonNode",
    "/gpupool.v1.NodeService/RevokeNode",
    "/gpupool.v1.NodeService/ReadmitNode",
    "/gpupool.v1.NodeService/DrainNode",
    "/gpupool.v1.PoolService/CreatePool",
    "/gpupool.v1.PoolService/DeletePool",
    "/gpupool.v1.PoolService/ScalePool",
    "/gpupool.v1.PoolService/ConvertToSubscription",
    "/gpupool.v1.PoolService/SetRenewal",
    "/gpupool.v1.PoolService/Unsubscribe",
    "/gpupool.v1.TenantService/CreateTenant",
    "/gpupool.v1.TenantService/IssueToken",
    "/gpupool.v1.TenantService/RevokeTokens",
    "/gpupool.v1.TenantService/SetQuota",
];

pub fn audited(path: &str) -> bool {
    AUDITED.contains(&path)
}

/// Fills `call`'s targets and arguments from the request message of
/// `path` (the gRPC frame's payload). Only fields named here are kept.
pub fn summarize(call: &mut AuditCall, path: &str, message: &[u8]) {
    let method = path.rsplit('/').next().unwrap_or(path);
    let (t, a) = (&mut call.targets, &mut call.args);
    if path.contains(".JobService/") {
        summarize_jobs(t, a, method, message);
    } else if path.contains(".PoolService/") {
        summarize_pools(t, a, method, message);
    } else {
        summarize_others(t, a, method, message);
    }
}

/// Keeps `v` under `k`, unless it is empty: at most [`MAX_VALUE`]
/// characters, control characters escaped (what a caller sent, refused
/// calls' included, must not bloat the trail or forge lines in it).
fn put(m: &mut BTreeMap<String, String>, k: &str, v: String) {
    if v.is_empty() {
        return;
    }
    let mut kept = String::new();
    for c in v.chars().take(MAX_VALUE) {
        if c.is_control() {
            kept.extend(c.escape_default());
        } else {
            kept.push(c);
        }
    }
    if v.chars().nth(MAX_VALUE).is_some() {
        kept.push_str("...");
    }
    m.insert(k.to_string(), kept);
}

/// The longest value an audit record keeps of one argument, in characters.
const MAX_VALUE: usize = 256;

/// A request that is not its method's message.
fn bad(a: &mut BTreeMap<String, String>) {
    a.insert("request".into(), "not decodable".into());
}

/// JobService's audited calls.
fn summarize_jobs(
    t: &mut BTreeMap<String, String>,
    a: &mut BTreeMap<String, String>,
    method: &str,
    message: &[u8],
) {
    match method {
        "SubmitJob" => match pb::SubmitJobRequest::decode(message) {
            Ok(r) => {
                let s = r.spec.unwrap_or_default();
                let res = s.resources.unwrap_or_default();
                put(a, "name", s.name);
                put(
                    a,
                    "kind",
                    pb::JobKind::try_from(s.kind)
                        .map(|k| {
                            k.as_str_name()
                                .trim_start_matches("JOB_KIND_")
                                .to_lowercase()
                        })
                        .unwrap_or_else(|_| s.kind.to_string()),
                );
                put(t, "pool", s.pool);
                put(a, "gpus", res.gpus.to_string());
                if res.gpu_milli != 0 {
                    put(a, "gpu_milli", res.gpu_milli.to_string());
                }
                put(a, "cpu_milli", res.cpu_milli.to_string());
                put(a, "memory_mib", res.memory_mib.to_string());
                put(a, "instances", s.instances.to_string());
                put(a, "image", s.image);
                put(a, "for_job", s.for_job);
                // Not the command, not the environment: either may hold a
                // secret. How many there were is enough.
                put(a, "env_vars", s.env.len().to_string());
            }
            Err(_) => bad(a),
        },
        "CancelJob" => match pb::CancelJobRequest::decode(message) {
            Ok(r) => put(t, "job", r.job_id),
            Err(_) => bad(a),
        },
        "ScaleService" => match pb::ScaleServiceRequest::decode(message) {
            Ok(r) => {
                put(t, "job", r.job_id);
                put(a, "replicas", r.replicas.to_string());
            }
            Err(_) => bad(a),
        },
        "RestartService" => match pb::RestartServiceRequest::decode(message) {
            Ok(r) => put(t, "job", r.job_id),
            Err(_) => bad(a),
        },
        _ => {}
    }
}

/// PoolService's audited calls.
fn summarize_pools(
    t: &mut BTreeMap<String, String>,
    a: &mut BTreeMap<String, String>,
    method: &str,
    message: &[u8],
) {
    match method {
        "CreatePool" => match pb::CreatePoolRequest::decode(message) {
            Ok(r) => {
                put(a, "name", r.name);
                put(
                    a,
                    "type",
                    pb::PoolType::try_from(r.r#type)
                        .map(|k| k.as_str_name().to_lowercase())
                        .unwrap_or_default(),
                );
                put(a, "spec", r.spec);
                put(a, "node_count", r.node_count.to_string());
                put(a, "az", r.az);
                put(a, "region", r.region);
                put(
                    a,
                    "billing_mode",
                    pb::BillingMode::try_from(r.billing_mode)
                        .map(|k| k.as_str_name().to_lowercase())
                        .unwrap_or_default(),
                );
                if let Some(s) = r.subscription {
                    put(a, "months", s.months.to_string());
                    put(a, "auto_renew", s.auto_renew.to_string());
                }
            }
            Err(_) => bad(a),
        },
        "DeletePool" => match pb::DeletePoolRequest::decode(message) {
            Ok(r) => put(t, "pool", r.pool),
            Err(_) => bad(a),
        },
        "ScalePool" => match pb::ScalePoolRequest::decode(message) {
            Ok(r) => {
                put(t, "pool", r.pool);
                match r.change {
                    Some(pb::scale_pool_request::Change::AddNodes(n)) => {
                        put(a, "add_nodes", n.to_string())
                    }
                    Some(pb::scale_pool_request::Change::RemoveNodes(ids)) => {
                        put(a, "remove_nodes", ids.node_ids.join(","))
                    }
                    None => {}
                }
                if r.force {
                    put(a, "force", "true".into());
                }
            }
            Err(_) => bad(a),
        },
        "ConvertToSubscription" => match pb::ConvertToSubscriptionRequest::decode(message) {
            Ok(r) => {
                put(t, "pool", r.pool);
                put(a, "months", r.months.to_string());
                put(a, "auto_renew", r.auto_renew.to_string());
            }
            Err(_) => bad(a),
        },
        "SetRenewal" => match pb::SetRenewalRequest::decode(message) {
            Ok(r) => {
                put(t, "pool", r.pool);
                put(a, "auto_renew", r.auto_renew.to_string());
                put(
                    a,
                    "convert_to_on_demand_at_expiry",
                    r.convert_to_on_demand_at_expiry.to_string(),
                );
            }
            Err(_) => bad(a),
        },
        "Unsubscribe" => match pb::UnsubscribeRequest::decode(message) {
            Ok(r) => put(t, "pool", r.pool),
            Err(_) => bad(a),
        },
        _ => {}
    }
}

/// The agents', nodes' and tenants' audited calls.
fn summarize_others(
    t: &mut BTreeMap<String, String>,
    a: &mut BTreeMap<String, String>,
    method: &str,
    message: &[u8],
) {
    match method {
        "DrainNode" => match pb::DrainNodeRequest::decode(message) {
            Ok(r) => {
                put(t, "node", r.node_id);
                if r.deadline_secs > 0 {
                    put(a, "deadline_secs", r.deadline_secs.to_string());
                }
                if r.force {
                    put(a, "force", "true".into());
                }
            }
            Err(_) => bad(a),
        },
        "Register" => match pb::RegisterRequest::decode(message) {
            Ok(r) => {
                put(t, "node", r.node_id.trim().to_string());
                put(a, "agent_version", r.agent_version);
            }
            Err(_) => bad(a),
        },
        "CordonNode" | "UncordonNode" | "RevokeNode" | "ReadmitNode" => {
            match pb::CordonNodeRequest::decode(message) {
                Ok(r) => put(t, "node", r.node_id),
                Err(_) => bad(a),
            }
        }
        "CreateTenant" => match pb::CreateTenantRequest::decode(message) {
            Ok(r) => {
                put(t, "tenant", r.name);
                if let Some(q) = r.quota {
                    put(a, "quota", format!("{q:?}"));
                }
            }
            Err(_) => bad(a),
        },
        // The token itself is in the answer, never in the request.
        "IssueToken" => match pb::IssueTokenRequest::decode(message) {
            Ok(r) => put(t, "tenant", r.tenant),
            Err(_) => bad(a),
        },
        "RevokeTokens" => match pb::RevokeTokensRequest::decode(message) {
            Ok(r) => {
                put(t, "tenant", r.tenant);
                put(a, "token_id", r.token_id);
            }
            Err(_) => bad(a),
        },
        "SetQuota" => match pb::SetQuotaRequest::decode(message) {
            Ok(r) => {
                put(t, "tenant", r.tenant);
                if let Some(q) = r.quota {
                    put(a, "quota", format!("{q:?}"));
                }
            }
            Err(_) => bad(a),
        },
        _ => {}
    }
}

/// The payload of a unary request body (one gRPC frame); None when it is
/// compressed or not one whole frame.
pub fn frame_payload(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    (flag == 0).then(|| rest.get(4..4 + len)).flatten()
}

/// The status a response carries in its headers (a trailers-only answer:
/// every error of a unary call): its code's name and its message. None
/// for an answer whose status is in its trailers (a success).
pub fn header_status(headers: &tonic::codegen::http::HeaderMap) -> Option<(String, String)> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| percent_decode(m))
        .unwrap_or_default();
    Some((code_name(code), message))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `tonic::Code`'s name in gRPC's spelling (`INVALID_ARGUMENT`).
pub fn code_name(code: i32) -> String {
    let name = format!("{:?}", tonic::Code::from_i32(code));
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    if code == 0 { "OK".into() } else { out }
}

/// Records a call that changed nothing (it failed, or the guard refused
/// it), with the status it was answered with, in a transaction of its own.
pub async fn record_unchanged(shared: &Shared, call: &AuditCall, code: &str, message: &str) {
    if !call.claim() {
        return;
    }
    let now = crate::now_ms();
    let written = shared
        .record_audit_alone(|core| {
            let owner = core.cluster.audit_owner(&call.targets);
            core.cluster
                .record_audit(call.entry(owner, code, message, now), now)
        })
        .await;
    match written {
        // The sink has it (the writer gave it on commit).
        Some(Ok(_)) => {}
        Some(Err(err)) => {
            tracing::error!(method = %call.method, error = %crate::ErrorChain(&err), "cannot write an audit record")
        }
        None => tracing::error!(method = %call.method, "the audit record's commit failed"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_value_is_kept_short_and_without_control_characters() {
        let mut m = BTreeMap::new();
        put(
            &mut m,
            "agent_version",
            format!("1.0.0\u{1b}[2J{}", "x".repeat(10_000)),
        );
        let v = &m["agent_version"];
        assert!(v.starts_with("1.0.0\\u{1b}[2J"), "{v}");
        assert!(
            v.ends_with("...") && v.chars().count() < MAX_VALUE + 16,
            "{}",
            v.len()
        );
        put(&mut m, "empty", String::new());
        assert!(!m.contains_key("empty"));
    }

    use super::*;

    fn call_of(path: &str, msg: impl Message) -> AuditCall {
        let mut call = AuditCall::new(path, "tenant", "acme", "acme", "127.0.0.1:1".into());
        summarize(&mut call, path, &msg.encode_to_vec());
        call
    }

    #[test]
    fn a_submission_keeps_its_shape_and_never_its_command_or_environment() {
        let call = call_of(
            "/gpupool.v1.JobService/SubmitJob",
            pb::SubmitJobRequest {
                spec: Some(pb::JobSpec {
                    name: "train".into(),
                    kind: pb::JobKind::Training as i32,
                    pool: "p-1".into(),
                    command: vec!["run".into(), "--password=hunter2".into()],
                    env: [("API_KEY".to_string(), "s3cr3t".to_string())].into(),
                    resources: Some(pb::Resources {
                        gpus: 2,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
        );
        assert_eq!(call.targets["pool"], "p-1");
        assert_eq!(call.args["kind"], "training");
        assert_eq!(call.args["gpus"], "2");
        assert_eq!(call.args["env_vars"], "1");
        let text = format!("{:?}{:?}", call.targets, call.args);
        for secret in ["hunter2", "s3cr3t", "API_KEY", "password"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    #[test]
    fn targets_come_from_the_request() {
        let c = call_of(
            "/gpupool.v1.PoolService/ScalePool",
            pb::ScalePoolRequest {
                pool: "p-9".into(),
                change: Some(pb::scale_pool_request::Change::AddNodes(2)),
                force: false,
            },
        );
        assert_eq!(
            (c.targets["pool"].as_str(), c.args["add_nodes"].as_str()),
            ("p-9", "2")
        );
        let c = call_of(
            "/gpupool.v1.NodeService/RevokeNode",
            pb::CordonNodeRequest {
                node_id: "n-1".into(),
            },
        );
        assert_eq!(c.targets["node"], "n-1");
        let mut c = AuditCall::new(
            "/gpupool.v1.JobService/CancelJob",
            "tenant",
            "a",
            "a",
            String::new(),
        );
        summarize(&mut c, "/gpupool.v1.JobService/CancelJob", b"\xff\xff\xff");
        assert_eq!(c.args["request"], "not decodable");
    }

    #[test]
    fn frames_statuses_and_codes_read() {
        let msg = pb::CancelJobRequest {
            job_id: "j-1".into(),
        }
        .encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        assert_eq!(frame_payload(&body), Some(&msg[..]));
        body[0] = 1;
        assert_eq!(frame_payload(&body), None, "compressed");
        assert_eq!(frame_payload(&[0, 0, 0]), None);
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(3), "INVALID_ARGUMENT");
        assert_eq!(code_name(7), "PERMISSION_DENIED");
        let mut h = tonic::codegen::http::HeaderMap::new();
        assert_eq!(header_status(&h), None);
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert("grpc-message", "no%20pool%20p-1".parse().unwrap());
        assert_eq!(
            header_status(&h),
            Some(("NOT_FOUND".to_string(), "no pool p-1".to_string()))
        );
    }

    #[test]
    fn every_audited_method_is_in_the_access_table() {
        for path in AUDITED {
            assert!(super::super::access::access_of(path).is_some(), "{path}");
        }
    }
}
