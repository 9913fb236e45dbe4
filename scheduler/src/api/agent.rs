//! `AgentService`: registration and the per-node session stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gpupool_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{inventory_from_pb, log_chunk_from_pb, reported_from_pb, status, to_agent_pb};
use crate::domain::AgentIdentity;
use crate::now_ms;
use crate::state::Shared;

/// How long a new session may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The join token is checked in front of it ([`super::access::Guard`]).
pub struct AgentApi {
    pub shared: Arc<Shared>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let identity = identity_of(&req)?;
        let req = req.into_inner();
        let node_id = req.node_id.trim().to_string();
        crate::domain::node::check_node_id(&node_id).map_err(Status::invalid_argument)?;
        // The version-skew policy (README, *Upgrades*).
        crate::domain::node::check_agent_version(&req.agent_version, env!("CARGO_PKG_VERSION"))
            .map_err(|why| {
                tracing::warn!(node = ?node_id, agent_version = ?req.agent_version.chars().take(64).collect::<String>(), %why, "registration refused");
                Status::failed_precondition(why)
            })?;
        let inventory = req
            .inventory
            .map(inventory_from_pb)
            .ok_or_else(|| Status::invalid_argument("inventory is required"))?;
        crate::domain::node::check_node_address(&inventory.address)
            .map_err(Status::invalid_argument)?;
        // Made before the check so the lock is not held over the read; used
        // only if this registration enrols the node.
        let fresh = super::auth::new_node_token()
            .map_err(|e| Status::internal(format!("cannot read /dev/urandom: {e}")))?;
        let fresh_sha = super::auth::sha256_hex(&fresh);
        let enrolled = self
            .shared
            .mutate(|core, _| {
                core.cluster.register_agent(
                    &node_id,
                    inventory,
                    req.agent_version.trim(),
                    &identity,
                    &fresh_sha,
                    now_ms(),
                )
            })
            .await
            .map_err(|e| {
                if matches!(e, crate::cluster::ClusterError::NodeAuth(_)) {
                    self.shared.metrics.agent_auth_refused.inc();
                    tracing::warn!(node = %node_id, ?identity, error = %e, "registration refused");
                }
                status(e)
            })?;
        Ok(Response::new(pb::RegisterResponse {
            node_id,
            heartbeat_interval_ms: self.shared.config.heartbeat_interval_ms,
            grace_ms: self.shared.config.node_grace_ms,
            node_token: if enrolled { fresh } else { String::new() },
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let identity = identity_of(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first session message must be a hello",
            ));
        };
        let node_id = hello.node_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let session_id = self
            .shared
            .mutate(|core, out| {
                // Only the node's current credential opens (or replaces) its
                // session, checked now that the hello is here: a stream opened
                // before a revocation does not get in after it.
                core.cluster
                .confirm_credential(&node_id, &identity, now_ms())
                .map_err(|e| {
                    if matches!(e, crate::cluster::ClusterError::NodeAuth(_)) {
                        self.shared.metrics.agent_auth_refused.inc();
                        tracing::warn!(node = %node_id, ?identity, error = %e, "session refused");
                    }
                    status(e)
                })?;
                let id = core.open_session(&node_id, tx);
                let reported = hello
                    .instances
                    .into_iter()
                    .filter_map(reported_from_pb)
                    .collect();
                core.cluster.hello(&node_id, reported, now_ms(), out);
                Ok::<_, Status>(id)
            })
            .await;
        let session_id = match session_id {
            Ok(id) => id,
            Err(err) => {
                // Not opened after all (the hello's writes failed).
                drop(rx);
                self.shared
                    .with(|core, _| core.drop_closed_session(&node_id));
                return Err(err);
            }
        };
        self.shared.metrics.sessions_opened.inc();
        tracing::info!(node = %node_id, session = session_id, "agent session opened");

        tokio::spawn(pump(self.shared.clone(), node_id, session_id, inbound));
        let outbound = UnboundedReceiverStream::new(rx).map(|m| Ok(to_agent_pb(m)));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// The identity the access layer established for an agent call.
fn identity_of<T>(req: &Request<T>) -> Result<AgentIdentity, Status> {
    req.extensions()
        .get::<AgentIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no agent identity (not behind the access layer)"))
}

/// Reads session `session_id` of `node_id` until it ends, then forgets the
/// session, which ends the stream down to the agent too.
///
/// A message whose changes the store refused is undone (memory is
/// reloaded from the unchanged store) and ends the session: the agent then
/// registers again, with its whole inventory, and says hello with every
/// instance it runs, so what the undone message told (an inventory change
/// is sent only once) reaches the scheduler again instead of being lost.
/// While the store keeps refusing, that registration is answered
/// UNAVAILABLE and the agent backs off and retries.
pub(super) async fn pump(
    shared: Arc<Shared>,
    node_id: String,
    session_id: u64,
    mut inbound: impl Stream<Item = Result<pb::AgentMessage, Status>> + Unpin,
) {
    loop {
        match inbound.next().await {
            Some(Ok(msg)) => match handle(&shared, &node_id, session_id, msg).await {
                Handled::Applied => {}
                Handled::NotCurrent => {
                    tracing::info!(node = %node_id, session = session_id, "session replaced or revoked; closing it");
                    break;
                }
                Handled::Undone => {
                    tracing::warn!(
                        node = %node_id, session = session_id,
                        "what the agent reported could not be stored and was undone; \
                         ending its session so that it registers and reports again"
                    );
                    break;
                }
            },
            None => {
                tracing::info!(node = %node_id, "agent closed its session");
                break;
            }
            Some(Err(err)) => {
                tracing::warn!(node = %node_id, error = %err, "agent session broke");
                break;
            }
        }
    }
    shared.with(|core, _| core.close_session(&node_id, session_id));
}

/// What became of one message of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handled {
    /// Applied and committed.
    Applied,
    /// The session is no longer the node's (replaced by a newer one, or the
    /// node revoked): nothing it sends counts.
    NotCurrent,
    /// Its changes could not be committed and were undone.
    Undone,
}

/// Handles one message of session `session_id`.
pub(super) async fn handle(
    shared: &Shared,
    node_id: &str,
    session_id: u64,
    msg: pb::AgentMessage,
) -> Handled {
    use pb::agent_message::Msg;
    let _timer = matches!(msg.msg, Some(Msg::Heartbeat(_)))
        .then(|| shared.metrics.heartbeat_seconds.start_timer());
    let handled = shared
        .with_committed(|core, out| {
            if !core.session_is(node_id, session_id) {
                return Handled::NotCurrent;
            }
            match msg.msg {
                Some(Msg::Heartbeat(hb)) => {
                    let reported = hb
                        .instances
                        .into_iter()
                        .filter_map(reported_from_pb)
                        .collect();
                    let now = now_ms();
                    let samples: Vec<(u32, u32)> = hb
                        .gpu_samples
                        .iter()
                        .map(|g| (g.index, g.utilization_pct))
                        .collect();
                    // An inventory with an address that is not one is
                    // dropped (the node keeps the one it registered with).
                    let inventory = hb.inventory.map(inventory_from_pb).filter(|i| {
                        crate::domain::node::check_node_address(&i.address)
                            .inspect_err(|why| tracing::warn!(node = %node_id, %why, "heartbeat inventory ignored"))
                            .is_ok()
                    });
                    core.cluster.heartbeat(
                        node_id,
                        inventory,
                        reported,
                        now,
                        out,
                    );
                    core.cluster.record_gpu_samples(node_id, &samples, now);
                }
                Some(Msg::InstanceUpdate(update)) => {
                    if let Some(r) = update.status.and_then(reported_from_pb) {
                        core.cluster.apply_report(node_id, r, now_ms(), out);
                    }
                }
                Some(Msg::LogChunk(chunk)) => core.resolve_log(node_id, log_chunk_from_pb(chunk)),
                Some(Msg::Hello(_)) => {
                    tracing::warn!(node = %node_id, "ignoring a second hello in one session")
                }
                None => {}
            }
            Handled::Applied
        })
        .await;
    handled.unwrap_or(Handled::Undone)
}
