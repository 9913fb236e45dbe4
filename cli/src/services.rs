//! `gpupool service ...` (JobService): an online service's endpoints,
//! scaling and rolling restarts.

use clap::Subcommand;
use gpupool_proto::v1 as pb;

use crate::OutputFormat;
use crate::conn::Conn;
use crate::error::CliError;
use crate::format::Table;
use crate::json;
use crate::output::emit;

/// `gpupool service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// List the ready replicas' addresses (host:port).
    Endpoints {
        /// Job id of the online service.
        job_id: String,
    },
    /// Set the number of replicas.
    Scale {
        /// Job id of the online service.
        job_id: String,
        /// Replicas wanted.
        #[arg(long)]
        replicas: u32,
    },
    /// Restart every replica in turn, keeping all but one ready.
    Restart {
        /// Job id of the online service.
        job_id: String,
    },
}

/// Runs one `gpupool service ...` command.
pub(crate) async fn service_command(
    conn: &Conn,
    out: OutputFormat,
    command: ServiceCommand,
) -> Result<(), CliError> {
    let mut jobs = conn.jobs().await?;
    match command {
        ServiceCommand::Endpoints { job_id } => {
            let j = jobs
                .get_job(pb::GetJobRequest { job_id })
                .await?
                .into_inner();
            let ready: Vec<&pb::Instance> = j
                .instances
                .iter()
                .filter(|i| i.ready && !i.replaced && !i.endpoint.is_empty())
                .collect();
            emit(
                out,
                || {
                    let mut t = Table::new(&["rank", "instance", "node", "endpoint"]);
                    for i in &ready {
                        t.row(vec![
                            i.rank.to_string(),
                            i.instance_id.clone(),
                            i.node_id.clone(),
                            i.endpoint.clone(),
                        ]);
                    }
                    t.render()
                },
                || {
                    serde_json::Value::Array(
                        ready
                            .iter()
                            .map(|i| {
                                serde_json::json!({
                                    "rank": i.rank,
                                    "instance_id": i.instance_id,
                                    "node_id": i.node_id,
                                    "endpoint": i.endpoint,
                                })
                            })
                            .collect(),
                    )
                },
            )
        }
        ServiceCommand::Scale { job_id, replicas } => {
            let j = jobs
                .scale_service(pb::ScaleServiceRequest { job_id, replicas })
                .await?
                .into_inner();
            emit(
                out,
                || format!("service {} scaled to {replicas} replicas\n", j.job_id),
                || json::job(&j),
            )
        }
        ServiceCommand::Restart { job_id } => {
            let j = jobs
                .restart_service(pb::RestartServiceRequest { job_id })
                .await?
                .into_inner();
            emit(
                out,
                || {
                    format!(
                        "service {}: rolling restart of {} replicas started\n",
                        j.job_id,
                        j.spec.as_ref().map_or(0, |s| s.instances)
                    )
                },
                || json::job(&j),
            )
        }
    }
}
