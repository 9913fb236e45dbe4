//! `gpupool.v1`: the protocol between the CLI, the scheduler and the agents.
//!
//! The proto files live in `proto/gpupool/v1/`; this crate holds only the
//! generated code. Protobuf types stop at the gRPC layer: the scheduler and
//! agent convert them into domain types at their boundaries.

/// Generated messages, clients and servers of package `gpupool.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("gpupool.v1");
}

/// Encoded `FileDescriptorSet` of every gpupool.v1 file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gpupool_descriptor.bin"));

/// Timestamp helpers used at the gRPC boundary.
pub fn timestamp_from_unix_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the Unix epoch of a protobuf timestamp.
pub fn unix_ms_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

pub use prost;
pub use prost_types;
pub use tonic_prost;

/// Makes ring rustls's process-wide crypto provider (what tonic's
/// `tls-ring` uses). The container-device-interface crate brings rustls's
/// aws-lc-rs provider into the build too (through jsonschema's default
/// features), and with two providers compiled in rustls picks none by
/// itself: every binary calls this first. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
