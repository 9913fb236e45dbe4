//! The session hub: one open session per connected agent, what goes down
//! it ([`ToAgent`]), and the log reads that wait for an agent's answer.
//! Plain types: the gRPC layer turns them into protobuf messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::{Core, StateError};
use crate::cluster::{AgentCommand, Outbox};

/// What the scheduler sends down an agent's session.
#[derive(Debug)]
pub enum ToAgent {
    Command(AgentCommand),
    ReadLogs(LogRead),
}

/// A request for a piece of an instance's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub request_id: u64,
    pub instance_id: String,
    pub offset: u64,
    pub max_bytes: u32,
}

/// An agent's answer to a [`LogRead`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogChunk {
    pub request_id: u64,
    pub data: Vec<u8>,
    /// Offset just after `data` in the log file.
    pub next_offset: u64,
    /// Set when the read failed (unknown instance, I/O error).
    pub error: String,
}

/// One agent's open session.
pub struct SessionHandle {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<ToAgent>,
}

/// The open sessions, by node. Behind a lock of their own (always taken
/// after the cluster lock, never before it), so that the commit pipeline
/// delivers what a commit made durable without the cluster lock.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, SessionHandle>>>);

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends commands to connected agents. Commands for a node without a
    /// session are dropped here and re-derived when it reconnects (hello).
    pub fn deliver(&self, out: Outbox) {
        let map = self.map();
        for (node_id, cmd) in out {
            match map.get(&node_id) {
                Some(session) => {
                    let _ = session.tx.send(ToAgent::Command(cmd));
                }
                None => {
                    tracing::debug!(node = %node_id, ?cmd, "node not connected; command waits for reconnect")
                }
            }
        }
    }

    /// The id of the node's open session.
    pub fn id(&self, node_id: &str) -> Option<u64> {
        self.map().get(node_id).map(|s| s.id)
    }

    pub fn contains_key(&self, node_id: &str) -> bool {
        self.map().contains_key(node_id)
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    pub fn remove(&self, node_id: &str) {
        self.map().remove(node_id);
    }

    /// Ends every session.
    pub fn clear(&self) {
        self.map().clear();
    }
}

impl Core {
    /// Sends commands to connected agents (see [`Sessions::deliver`]).
    pub fn deliver(&mut self, out: Outbox) {
        self.sessions.deliver(out);
    }

    pub fn open_session(&mut self, node_id: &str, tx: mpsc::UnboundedSender<ToAgent>) -> u64 {
        self.next_session += 1;
        let id = self.next_session;
        if self
            .sessions
            .map()
            .insert(node_id.to_string(), SessionHandle { id, tx })
            .is_some()
        {
            tracing::info!(node = %node_id, "replacing an older session of the node");
        }
        id
    }

    /// True while session `id` is the node's current one.
    pub fn session_is(&self, node_id: &str, id: u64) -> bool {
        self.sessions.id(node_id) == Some(id)
    }

    /// Forgets the node's session if nobody reads it any more.
    pub fn drop_closed_session(&mut self, node_id: &str) {
        let mut map = self.sessions.map();
        if map.get(node_id).is_some_and(|s| s.tx.is_closed()) {
            map.remove(node_id);
        }
    }

    pub fn close_session(&mut self, node_id: &str, id: u64) {
        let mut map = self.sessions.map();
        if map.get(node_id).is_some_and(|s| s.id == id) {
            map.remove(node_id);
        }
    }

    /// Sends a ReadLogs to a node; the answer arrives on the receiver
    /// (with the request id, for [`Core::cancel_log`]). At most
    /// `max_pending` reads wait for agents at once.
    pub fn request_log(
        &mut self,
        node_id: &str,
        instance_id: &str,
        offset: u64,
        max_bytes: u32,
        max_pending: usize,
    ) -> Result<(u64, oneshot::Receiver<LogChunk>), StateError> {
        if self.pending_logs.len() >= max_pending {
            return Err(StateError::TooManyLogReads { max_pending });
        }
        let map = self.sessions.map();
        let session = map
            .get(node_id)
            .ok_or_else(|| StateError::NodeNotConnected {
                node_id: node_id.to_string(),
            })?;
        self.next_request += 1;
        let request_id = self.next_request;
        let (tx, rx) = oneshot::channel();
        session
            .tx
            .send(ToAgent::ReadLogs(LogRead {
                request_id,
                instance_id: instance_id.to_string(),
                offset,
                max_bytes,
            }))
            .map_err(|_| StateError::NodeDisconnected {
                node_id: node_id.to_string(),
            })?;
        drop(map);
        self.pending_logs
            .insert(request_id, (node_id.to_string(), tx));
        Ok((request_id, rx))
    }

    /// Forgets a log read whose answer is no longer awaited (timed out).
    pub fn cancel_log(&mut self, request_id: u64) {
        self.pending_logs.remove(&request_id);
    }

    /// An answer to a log read, from `node_id`'s session: accepted only
    /// from the node that was asked.
    pub fn resolve_log(&mut self, node_id: &str, chunk: LogChunk) {
        match self.pending_logs.get(&chunk.request_id) {
            Some((asked, _)) if asked == node_id => {
                if let Some((_, tx)) = self.pending_logs.remove(&chunk.request_id) {
                    let _ = tx.send(chunk);
                }
            }
            Some((asked, _)) => tracing::warn!(
                node = %node_id, asked = %asked, request = chunk.request_id,
                "ignoring a log answer from a node that was not asked"
            ),
            None => {}
        }
    }
}
