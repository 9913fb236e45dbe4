//! Authentication at the gRPC edge: bearer tokens to callers. The admin
//! token comes from the config; tenant tokens are random, shown once, and
//! only their SHA-256 is stored.

use std::io::Read;

use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::domain::AgentIdentity;
use crate::domain::tenant::Caller;
use crate::state::Shared;

/// The bearer token of a request, if any.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares secrets without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token: `gpt_` and 64 hex digits from the kernel's CSPRNG.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!(
        "gpt_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Writes a secret to a new file only its owner can read (0600), synced.
pub fn write_secret_file(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()
}

/// The metadata key of a node's own credential.
pub const NODE_TOKEN_HEADER: &str = "gpupool-node-token";

/// A new node credential: `gpn_` and 64 hex digits.
pub fn new_node_token() -> std::io::Result<String> {
    new_token().map(|t| format!("gpn_{}", &t[4..]))
}

/// Who an agent call comes from: a node's own credential
/// ([`NODE_TOKEN_HEADER`]) makes it that node; else the cluster join token
/// (when one is configured) makes it a bootstrap, which may only enrol a
/// node that has no credential yet. A tenant's or the admin's token is
/// neither.
pub fn agent(shared: &Shared, metadata: &MetadataMap) -> Result<AgentIdentity, Status> {
    if let Some(token) = metadata
        .get(NODE_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let hash = sha256_hex(token);
        if let Some(node_id) =
            shared.with(|core, _| core.cluster.node_of_credential(&hash).map(str::to_string))
        {
            return Ok(AgentIdentity::Node {
                node_id,
                credential_sha256: hash,
            });
        }
        // Unknown (revoked, or the scheduler's state was reset): the join
        // token may still enrol it again below.
    }
    let Some(expected) = &shared.config.join_token else {
        // No join token: the scheduler listens on loopback only
        // (`SchedulerConfig::check`), and new nodes enrol freely.
        return Ok(AgentIdentity::Bootstrap);
    };
    match bearer(metadata) {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            Ok(AgentIdentity::Bootstrap)
        }
        Some(_) => Err(Status::unauthenticated(
            "not a node credential and not the cluster join token",
        )),
        None => Err(Status::unauthenticated(
            "missing node credential (gpupool-node-token) and cluster join token (authorization: Bearer ...)",
        )),
    }
}

/// Who sends this request. Without a configured admin token nobody is
/// authenticated and every caller is the admin (development mode).
pub fn caller(shared: &Shared, metadata: &MetadataMap) -> Result<Caller, Status> {
    let Some(admin) = &shared.config.admin_token else {
        return Ok(Caller::admin());
    };
    let token = bearer(metadata).filter(|t| !t.is_empty()).ok_or_else(|| {
        match metadata.get("authorization").and_then(|v| v.to_str().ok()) {
            Some(other) if !other.trim().is_empty() => {
                // Name the scheme only if it looks like one: never echo a token.
                let scheme = other
                    .split_whitespace()
                    .next()
                    .filter(|w| {
                        other.contains(' ') && w.len() <= 16 && w.chars().all(|c| c.is_ascii_alphabetic())
                    })
                    .map_or("schemeless".to_string(), |w| format!("{w} one"));
                Status::unauthenticated(format!(
                    "the authorization header must be `Bearer <token>` (got a {scheme})"
                ))
            }
            _ => Status::unauthenticated(
                "missing API token (send authorization: Bearer <token>; the CLI reads GPUPOOL_TOKEN)",
            ),
        }
    })?;
    if constant_time_eq(token.as_bytes(), admin.as_bytes()) {
        return Ok(Caller::admin());
    }
    let hash = sha256_hex(token);
    shared
        .with(|core, _| core.cluster.tenant_of_token(&hash).map(Caller::tenant))
        .ok_or_else(|| {
            if token.starts_with("nbt_") {
                Status::unauthenticated(
                    "that is a notebook's access token (its URL's ?token=), not an API token",
                )
            } else {
                Status::unauthenticated("invalid API token")
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
