//! Who may call what: the one table of every RPC and the role it needs
//! ([`ACCESS`]), enforced in front of every service by [`Guard`] before a
//! handler runs. Handlers still check *ownership* (a tenant's own jobs,
//! pools, usage) in the domain; the role is decided here.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use super::limits::RateLimiter;
use crate::domain::AgentIdentity;
use crate::state::Shared;

/// The role an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Node agents: a node's own credential, or the join token to enrol
    /// (the handlers check the node id against it).
    Agent,
    /// Any authenticated caller: a tenant token or the admin token.
    Tenant,
    /// The admin token only.
    Admin,
}

/// Every RPC of the gRPC API and its role (a test checks that the table
/// lists exactly the methods of the proto files).
pub const ACCESS: &[(&str, Access)] = &[
    ("/gpupool.v1.AgentService/Register", Access::Agent),
    ("/gpupool.v1.AgentService/Session", Access::Agent),
    ("/gpupool.v1.JobService/SubmitJob", Access::Tenant),
    ("/gpupool.v1.JobService/GetJob", Access::Tenant),
    ("/gpupool.v1.JobService/ListJobs", Access::Tenant),
    ("/gpupool.v1.JobService/CancelJob", Access::Tenant),
    ("/gpupool.v1.JobService/GetJobLogs", Access::Tenant),
    ("/gpupool.v1.JobService/ScaleService", Access::Tenant),
    ("/gpupool.v1.JobService/RestartService", Access::Tenant),
    ("/gpupool.v1.JobService/ListJobKinds", Access::Tenant),
    ("/gpupool.v1.NodeService/ListNodes", Access::Tenant),
    ("/gpupool.v1.NodeService/GetNode", Access::Tenant),
    ("/gpupool.v1.NodeService/CordonNode", Access::Admin),
    ("/gpupool.v1.NodeService/UncordonNode", Access::Admin),
    ("/gpupool.v1.NodeService/RevokeNode", Access::Admin),
    ("/gpupool.v1.NodeService/ReadmitNode", Access::Admin),
    ("/gpupool.v1.NodeService/DrainNode", Access::Admin),
    ("/gpupool.v1.PoolService/ListPools", Access::Tenant),
    ("/gpupool.v1.PoolService/GetPool", Access::Tenant),
    ("/gpupool.v1.PoolService/CreatePool", Access::Tenant),
    ("/gpupool.v1.PoolService/DeletePool", Access::Tenant),
    ("/gpupool.v1.PoolService/ScalePool", Access::Tenant),
    ("/gpupool.v1.PoolService/ListSpecs", Access::Tenant),
    (
        "/gpupool.v1.PoolService/ConvertToSubscription",
        Access::Tenant,
    ),
    ("/gpupool.v1.PoolService/SetRenewal", Access::Tenant),
    ("/gpupool.v1.PoolService/Unsubscribe", Access::Tenant),
    ("/gpupool.v1.PoolService/ScaleInPlan", Access::Tenant),
    ("/gpupool.v1.PoolService/GetCapacity", Access::Tenant),
    ("/gpupool.v1.TenantService/CreateTenant", Access::Admin),
    ("/gpupool.v1.TenantService/ListTenants", Access::Admin),
    ("/gpupool.v1.TenantService/GetTenant", Access::Tenant),
    ("/gpupool.v1.TenantService/IssueToken", Access::Admin),
    ("/gpupool.v1.TenantService/RevokeTokens", Access::Admin),
    ("/gpupool.v1.TenantService/SetQuota", Access::Admin),
    ("/gpupool.v1.TenantService/WhoAmI", Access::Tenant),
    ("/gpupool.v1.UsageService/ListUsage", Access::Tenant),
    ("/gpupool.v1.UsageService/ListOrders", Access::Tenant),
    ("/gpupool.v1.UsageService/GetBill", Access::Tenant),
    ("/gpupool.v1.AuditService/ListAudit", Access::Tenant),
];

/// The role `path` needs; None for paths outside the gpupool API (health,
/// reflection: open to all).
pub fn access_of(path: &str) -> Option<Access> {
    ACCESS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// Who a request the guard let through comes from.
#[derive(Debug, Default)]
pub struct Checked {
    /// Agent RPCs: the node (or a bootstrap with the join token).
    pub identity: Option<AgentIdentity>,
    /// Client RPCs: the tenant or the admin.
    pub caller: Option<crate::domain::tenant::Caller>,
}

/// A request the guard refuses: the status to answer with, and the caller
/// when it was authenticated (a tenant asking for an admin RPC).
pub struct Refused {
    pub status: tonic::Status,
    pub caller: Option<crate::domain::tenant::Caller>,
}

impl From<tonic::Status> for Refused {
    fn from(status: tonic::Status) -> Self {
        Self {
            status,
            caller: None,
        }
    }
}

/// Decides a request for `path` with these headers: Ok to go on (with the
/// agent's identity for agent RPCs), else why not.
pub fn check(
    shared: &Shared,
    limiter: &Mutex<RateLimiter>,
    path: &str,
    headers: &http::HeaderMap,
    client_cert: bool,
) -> Result<Checked, Refused> {
    let Some(access) = access_of(path) else {
        if path.starts_with("/gpupool.") {
            return Err(tonic::Status::unimplemented(format!("unknown method {path}")).into());
        }
        return Ok(Checked::default());
    };
    let metadata = MetadataMap::from_headers(headers.clone());
    let caller = match access {
        Access::Agent => {
            if shared
                .config
                .tls
                .as_ref()
                .is_some_and(|t| t.require_agent_client_cert)
                && !client_cert
            {
                return Err(tonic::Status::unauthenticated(
                    "agents must present a client certificate signed by the cluster CA (mutual TLS)",
                )
                .into());
            }
            let identity = super::auth::agent(shared, &metadata).map_err(|status| {
                shared.metrics.agent_auth_refused.inc();
                Refused::from(status)
            })?;
            // Each node's credential is a caller of its own; every holder
            // of the join token is one (a leaked token enrols at the
            // limit's pace, not as fast as it can write).
            let key = match &identity {
                AgentIdentity::Node { node_id, .. } => format!("node {node_id}"),
                AgentIdentity::Bootstrap => "(join token)".to_string(),
            };
            return limited(shared, limiter, &key).map(|()| Checked {
                identity: Some(identity),
                caller: None,
            });
        }
        Access::Tenant | Access::Admin => super::auth::caller(shared, &metadata)?,
    };
    // The rate limit first: a refusal costs the caller a request too (it
    // is recorded in the audit trail, a write).
    let key = caller.rate_key();
    let allowed = limiter
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(&key, std::time::Instant::now());
    if allowed.is_ok() && access == Access::Admin && !caller.admin {
        let method = path.rsplit('/').next().unwrap_or(path);
        return Err(Refused {
            status: tonic::Status::permission_denied(format!(
                "{method} is for the admin only (tenant {} asked)",
                caller.tenant
            )),
            caller: Some(caller),
        });
    }
    allowed
        .map(|()| Checked {
            identity: None,
            caller: Some(caller),
        })
        .map_err(|wait| over_the_limit(shared, &key, wait))
}

/// One request of `key` against the per-caller rate limit.
fn limited(shared: &Shared, limiter: &Mutex<RateLimiter>, key: &str) -> Result<(), Refused> {
    limiter
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(key, std::time::Instant::now())
        .map_err(|wait| over_the_limit(shared, key, wait))
}

fn over_the_limit(shared: &Shared, key: &str, wait: std::time::Duration) -> Refused {
    shared.metrics.requests_limited.inc();
    tonic::Status::resource_exhausted(format!(
        "rate limit: {} requests/s (burst {}) for {key}; retry in {} ms",
        shared.config.limits.requests_per_second,
        shared.config.limits.burst,
        wait.as_millis().max(1)
    ))
    .into()
}

/// tonic answers a request body that is not the request message with
/// INTERNAL "failed to decode Protobuf message"; it is the caller's bad
/// input: INVALID_ARGUMENT, message kept.
fn decode_error_is_bad_input(resp: http::Response<Body>) -> http::Response<Body> {
    fn fix(headers: &mut http::HeaderMap) {
        let internal = headers
            .get("grpc-status")
            .is_some_and(|s| s.as_bytes() == b"13");
        let decode = headers.get("grpc-message").is_some_and(|m| {
            // tonic percent-encodes the message (spaces as %20).
            let m = m.as_bytes();
            m.starts_with(b"failed to decode") || m.starts_with(b"failed%20to%20decode")
        });
        if internal && decode {
            headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        }
    }
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    // A trailers-only answer carries the status in its headers, others in
    // the trailers.
    fix(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            fix(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, Body::new(body))
}

/// A service behind the [`ACCESS`] table and the per-caller rate limit
/// (one [`RateLimiter`] shared by every service's guard).
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    shared: Arc<Shared>,
    limiter: Arc<Mutex<RateLimiter>>,
}

impl<S> Guard<S> {
    pub fn new(inner: S, shared: Arc<Shared>, limiter: Arc<Mutex<RateLimiter>>) -> Self {
        Self {
            inner,
            shared,
            limiter,
        }
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        // With TLS, did the peer present a certificate (verified by the
        // handshake against `client_ca_file`)?
        let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let client_cert = tls
            .and_then(|info| info.peer_certs())
            .is_some_and(|certs| !certs.is_empty());
        let peer = tls
            .map(|info| info.get_ref())
            .or_else(|| req.extensions().get::<TcpConnectInfo>())
            .and_then(|info| info.remote_addr())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let path = req.uri().path().to_string();
        let checked = check(
            &self.shared,
            &self.limiter,
            &path,
            req.headers(),
            client_cert,
        );
        let audited = super::audit::audited(&path);
        let shared = self.shared.clone();
        match checked {
            Ok(checked) => {
                let mut req = req;
                if let Some(identity) = &checked.identity {
                    req.extensions_mut().insert(identity.clone());
                }
                if !audited {
                    let call = self.inner.call(req);
                    return Box::pin(async move { call.await.map(decode_error_is_bad_input) });
                }
                // The handler is called once the body is read: on a clone,
                // the ready one taken (tower's rule for a service called
                // later).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(audited_call(shared, inner, req, path, peer, checked))
            }
            Err(Refused { status, caller }) => {
                // Refusals of an authenticated caller are recorded; an
                // unauthenticated or rate-limited one costs no write.
                let caller = caller.filter(|_| audited);
                Box::pin(async move {
                    if let Some(caller) = caller {
                        use http_body_util::BodyExt;
                        let mut call = super::audit::AuditCall::of_caller(&path, &caller, peer);
                        // What it asked for (a refused request's first
                        // 64 KiB at most: no more is held for it).
                        let body = http_body_util::Limited::new(req.into_body(), 64 << 10);
                        if let Ok(bytes) = body.collect().await.map(|c| c.to_bytes())
                            && let Some(message) = super::audit::frame_payload(&bytes)
                        {
                            super::audit::summarize(&mut call, &path, message);
                        }
                        let code = super::audit::code_name(status.code() as i32);
                        super::audit::record_unchanged(&shared, &call, &code, status.message())
                            .await;
                    }
                    Ok(status.into_http())
                })
            }
        }
    }
}

/// Most bytes of an audited request the guard reads: what the service
/// itself may decode (agents' messages may be 4 times the client limit),
/// and the frame's header.
fn max_audited_request(shared: &Shared, path: &str) -> usize {
    let limit = shared.config.limits.max_request_bytes;
    let limit = if path.starts_with("/gpupool.v1.AgentService/") {
        limit.saturating_mul(4)
    } else {
        limit
    };
    limit.saturating_add(5)
}

/// An audited call: the request's message is read (to summarize it), the
/// handler runs in the call's scope (its mutation stages the record), and
/// a call it did not record (it failed) is recorded with its status.
async fn audited_call<S>(
    shared: Arc<Shared>,
    mut inner: S,
    req: http::Request<Body>,
    path: String,
    peer: String,
    checked: Checked,
) -> Result<http::Response<Body>, Infallible>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    use super::audit::{
        AuditCall, CALL, frame_payload, header_status, record_unchanged, summarize,
    };
    use http_body_util::BodyExt;
    let mut call = match (&checked.caller, &checked.identity) {
        (Some(caller), _) => AuditCall::of_caller(&path, caller, peer),
        (None, Some(AgentIdentity::Node { node_id, .. })) => {
            AuditCall::new(&path, "node", node_id, "", peer)
        }
        (None, Some(_)) => AuditCall::new(&path, "node", "(join token)", "", peer),
        (None, None) => AuditCall::new(&path, "anonymous", "", "", peer),
    };
    let (parts, body) = req.into_parts();
    let limit = max_audited_request(&shared, &path);
    let bytes = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            // Too large (what tonic answers for a message over its limit),
            // or the body broke off.
            let status = if err.is::<http_body_util::LengthLimitError>() {
                tonic::Status::out_of_range(format!(
                    "request larger than the {limit}-byte limit ([limits] max_request_bytes)"
                ))
            } else {
                tonic::Status::invalid_argument(format!("cannot read the request: {err}"))
            };
            let code = super::audit::code_name(status.code() as i32);
            record_unchanged(&shared, &call, &code, status.message()).await;
            return Ok(status.into_http());
        }
    };
    match frame_payload(&bytes) {
        Some(message) => summarize(&mut call, &path, message),
        None => {
            call.args.insert("request".into(), "not decodable".into());
        }
    }
    let req = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
    let call = Arc::new(call);
    let resp = CALL
        .scope(call.clone(), inner.call(req))
        .await
        .map(decode_error_is_bad_input)?;
    if !call.recorded.load(std::sync::atomic::Ordering::SeqCst) {
        // Failed (its status in the headers), or succeeded without a
        // mutation of its own (nothing to share a transaction with).
        let (code, message) =
            header_status(resp.headers()).unwrap_or_else(|| ("OK".into(), String::new()));
        record_unchanged(&shared, &call, &code, &message).await;
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table names every RPC of the proto files exactly once.
    #[test]
    fn access_table_covers_every_rpc() {
        use gpupool_proto::prost::Message;
        let set = gpupool_proto::prost_types::FileDescriptorSet::decode(
            gpupool_proto::FILE_DESCRIPTOR_SET,
        )
        .expect("descriptor set");
        let mut methods: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                let package = f.package().to_string();
                f.service.iter().flat_map(move |s| {
                    let service = format!("{package}.{}", s.name());
                    s.method
                        .iter()
                        .map(move |m| format!("/{service}/{}", m.name()))
                })
            })
            .collect();
        methods.sort();
        let mut table: Vec<String> = ACCESS.iter().map(|(p, _)| p.to_string()).collect();
        table.sort();
        assert_eq!(methods, table);
    }
}
