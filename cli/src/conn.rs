//! Reaching the scheduler: the address list (the leader among replicas),
//! TLS, the bearer token on every call, one client per service, and
//! walking paginated lists.

use std::time::Duration;

use gpupool_proto::v1::{
    audit_service_client::AuditServiceClient, job_service_client::JobServiceClient,
    node_service_client::NodeServiceClient, pool_service_client::PoolServiceClient,
    tenant_service_client::TenantServiceClient, usage_service_client::UsageServiceClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::args::normalize_addr;
use crate::error::{CliError, error_chain};

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Debug, Clone)]
pub(crate) struct BearerAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

pub(crate) type Svc = InterceptedService<Channel, BearerAuth>;

/// Largest response the CLI reads (lists of 10,000 nodes pass 4 MiB).
const MAX_RESPONSE: usize = 256 << 20;

/// Where and how to reach the scheduler.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) addr: String,
    pub(crate) token: Option<String>,
    pub(crate) tls: gpupool_common::tls::ClientTls,
}

impl Conn {
    async fn channel(&self) -> Result<(Channel, BearerAuth), CliError> {
        let auth = match &self.token {
            Some(token) => {
                let value = format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        CliError::Message(
                            "invalid token: it must be printable ASCII without newlines".into(),
                        )
                    })?;
                BearerAuth(Some(value))
            }
            None => BearerAuth(None),
        };
        // Several addresses (scheduler replicas): the first whose health
        // check says SERVING is the leader; standbys answer UNAVAILABLE.
        let addrs: Vec<String> = self
            .addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(normalize_addr)
            .collect();
        let mut failures = Vec::new();
        for addr in &addrs {
            let timeout = Duration::from_secs(if addrs.len() > 1 { 3 } else { 10 });
            let endpoint = self
                .tls
                .endpoint(addr, timeout)
                .map_err(|e| CliError::Message(format!("{e:#}")))?;
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    failures.push((addr.clone(), error_chain(&e)));
                    continue;
                }
            };
            if addrs.len() == 1 {
                return Ok((channel, auth));
            }
            let serving = tonic_health::pb::health_client::HealthClient::new(channel.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            match serving {
                Ok(r)
                    if r.get_ref().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving
                            as i32 =>
                {
                    return Ok((channel, auth));
                }
                Ok(_) => failures.push((addr.clone(), "not serving".into())),
                Err(s) => failures.push((addr.clone(), s.message().to_string())),
            }
        }
        let (addr, cause) = match &failures[..] {
            [(addr, cause)] => (addr.clone(), cause.clone()),
            _ => (
                self.addr.clone(),
                failures
                    .iter()
                    .map(|(a, c)| format!("{a}: {c}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        Err(CliError::Connect { addr, cause })
    }

    pub(crate) async fn jobs(&self) -> Result<JobServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(JobServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    pub(crate) async fn nodes(&self) -> Result<NodeServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(NodeServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    pub(crate) async fn pools(&self) -> Result<PoolServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(PoolServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    pub(crate) async fn usage(&self) -> Result<UsageServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(UsageServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    pub(crate) async fn audit(&self) -> Result<AuditServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(AuditServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }

    pub(crate) async fn tenants(&self) -> Result<TenantServiceClient<Svc>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(TenantServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_RESPONSE))
    }
}

/// Every item of a paginated list call: `fetch(page_token)` answers one
/// page and the next page's token (empty after the last).
pub(crate) async fn every_page<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = fetch(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Runs a unary call again while the scheduler's per-caller rate limit
/// refuses it (`RESOURCE_EXHAUSTED` "rate limit: ... retry in N ms"),
/// waiting as long as it says: a script that submits many jobs slows to the
/// limit instead of failing. At most 20 tries and 2 s per wait; any other
/// answer, and the last refusal, is the caller's.
pub(crate) async fn within_rate_limit<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut tries = 1;
    loop {
        match call().await {
            Err(status) if tries < 20 => match rate_limit_wait(&status) {
                Some(wait) => {
                    tokio::time::sleep(wait).await;
                    tries += 1;
                }
                None => return Err(status),
            },
            answer => return answer,
        }
    }
}

/// How long the rate limit asks to wait, if `status` is its refusal (the
/// scheduler's message: `scheduler/src/api/access.rs`).
fn rate_limit_wait(status: &tonic::Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let msg = status.message();
    if !msg.starts_with("rate limit:") {
        return None;
    }
    let ms: u64 = msg
        .rsplit_once("retry in ")?
        .1
        .strip_suffix(" ms")?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.clamp(1, 2_000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_interceptor_sets_authorization() {
        let mut auth = BearerAuth(Some("Bearer s3cret".parse().unwrap()));
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let mut none = BearerAuth(None);
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn only_the_rate_limit_is_waited_for() {
        let limited = tonic::Status::resource_exhausted(
            "rate limit: 200 requests/s (burst 400) for (admin); retry in 7 ms",
        );
        assert_eq!(rate_limit_wait(&limited), Some(Duration::from_millis(7)));
        let long = tonic::Status::resource_exhausted("rate limit: 1 requests/s; retry in 90000 ms");
        assert_eq!(rate_limit_wait(&long), Some(Duration::from_secs(2)));
        let streams = tonic::Status::resource_exhausted("32 log streams already open");
        assert_eq!(rate_limit_wait(&streams), None);
        let other = tonic::Status::unavailable("rate limit: retry in 5 ms");
        assert_eq!(rate_limit_wait(&other), None);
    }

    #[tokio::test]
    async fn a_limited_call_is_tried_again_then_answered() {
        let mut calls = 0;
        let answer = within_rate_limit(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(tonic::Status::resource_exhausted(
                        "rate limit: 2 requests/s (burst 5) for t; retry in 1 ms",
                    ))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), 3);
    }
}
