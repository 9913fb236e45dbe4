//! Compiles `gpupool/v1/*.proto` with protox (a pure-Rust protobuf compiler,
//! so no system `protoc` is needed) and generates tonic clients and servers.
//! The encoded descriptor set is written next to the code for gRPC reflection.

use prost::Message;

const PROTOS: &[&str] = &[
    "gpupool/v1/common.proto",
    "gpupool/v1/agent.proto",
    "gpupool/v1/node.proto",
    "gpupool/v1/pool.proto",
    "gpupool/v1/job.proto",
    "gpupool/v1/usage.proto",
    "gpupool/v1/tenant.proto",
    "gpupool/v1/audit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(PROTOS, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("gpupool_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=gpupool");
    Ok(())
}
