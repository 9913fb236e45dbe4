//! `gpupool spec list` (PoolService.ListSpecs): node specs and their free
//! capacity.

use clap::Subcommand;
use gpupool_proto::v1 as pb;

use crate::OutputFormat;
use crate::conn::Conn;
use crate::error::CliError;
use crate::format::{Table, format_mib};
use crate::json;
use crate::output::emit;

/// `gpupool spec ...`
#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// List node specs with their free capacity.
    List,
}

/// `spec list`: every spec with its free nodes, and whether it is sold out.
pub(crate) async fn spec_list(conn: &Conn, out: OutputFormat) -> Result<(), CliError> {
    let specs = conn
        .pools()
        .await?
        .list_specs(pb::ListSpecsRequest {})
        .await?
        .into_inner()
        .specs;
    emit(
        out,
        || {
            let mut t = Table::new(&[
                "spec",
                "gpu model",
                "gpus",
                "cpu",
                "memory",
                "free nodes",
                "status",
            ]);
            for s in &specs {
                t.row(vec![
                    s.name.clone(),
                    s.gpu_model.clone(),
                    s.gpu_count.to_string(),
                    s.cpu_cores.to_string(),
                    format_mib(i64::try_from(s.memory_mib).unwrap_or(i64::MAX)),
                    format!("{}/{}", s.nodes_free, s.nodes_total),
                    if s.sold_out { "sold out" } else { "available" }.to_string(),
                ]);
            }
            t.render()
        },
        || json::specs(&specs),
    )
}
