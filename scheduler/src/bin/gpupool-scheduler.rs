//! `gpupool-scheduler`: `serve --config FILE` runs the daemon, `dev` runs a
//! one-machine cluster (scheduler + local agent) for trying gpupool out,
//! `snapshot save|restore FILE` backs up and restores its store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpupool_scheduler::config::SchedulerConfig;

/// gpupool central scheduler.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scheduler daemon.
    Serve {
        /// TOML config file.
        #[arg(long, default_value = "/etc/gpupool/scheduler.toml")]
        config: PathBuf,
        /// Once listening, write the bound addresses here (TOML: `grpc =
        /// "IP:PORT"`, `metrics = "IP:PORT"`), whole or not at all: for
        /// listen addresses with port 0 (tests, several schedulers on one
        /// host).
        #[arg(long)]
        address_file: Option<PathBuf>,
    },
    /// Run a scheduler and a local agent on localhost (development).
    Dev(Box<gpupool_scheduler::dev::DevArgs>),
    /// Save or restore the whole store (SQLite or PostgreSQL) as one file.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Save everything the store holds to FILE (0600), consistently, while
    /// the scheduler runs.
    Save {
        file: PathBuf,
        /// The scheduler's TOML config (its database).
        #[arg(long, default_value = "/etc/gpupool/scheduler.toml")]
        config: PathBuf,
        /// The SQLite data dir, instead of the config's (`gpupool-scheduler
        /// dev`: `.gpupool-dev/scheduler`); no config is read then.
        #[arg(long, conflicts_with = "config")]
        data_dir: Option<PathBuf>,
    },
    /// Restore FILE into an empty store (stop the scheduler first; it needs
    /// the same `secret_key_file`, which is not in the snapshot).
    Restore {
        file: PathBuf,
        #[arg(long, default_value = "/etc/gpupool/scheduler.toml")]
        config: PathBuf,
        /// The SQLite data dir, instead of the config's; no config is read
        /// then.
        #[arg(long, conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// SQLite: move a database that holds anything aside
        /// (`gpupool.db.before-restore-MS`) and restore into a new one.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    // `shim EXIT_FILE -- CMD...`: the wrapper the agent starts instances with.
    gpupool_agent::shim::run_if_shim(&std::env::args().skip(1).collect::<Vec<_>>());
    gpupool_proto::install_tls_provider();
    let args = Args::parse();
    gpupool_scheduler::init_tracing(args.log_json);
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(args.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            config,
            address_file,
        } => {
            let path = config;
            let config = SchedulerConfig::load(&path)?;
            config
                .check_serving()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.grpc_listen))?;
            let metrics = match config.metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?,
                ),
                None => None,
            };
            if let Some(file) = &address_file {
                let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
                write_addresses(file, grpc.local_addr()?, metrics_addr)?;
            }
            if let Some(url) = config.database_url.clone() {
                return gpupool_scheduler::replica::run(
                    config,
                    url,
                    grpc,
                    metrics,
                    gpupool_scheduler::shutdown_signal(),
                )
                .await;
            }
            let shared = gpupool_scheduler::server::open(config)?;
            gpupool_scheduler::server::serve(
                shared,
                grpc,
                metrics,
                gpupool_scheduler::shutdown_signal(),
            )
            .await
        }
        Command::Dev(args) => gpupool_scheduler::dev::run(*args).await,
        Command::Snapshot { command } => snapshot(command),
    }
}

/// The store a snapshot command works on, and its kind.
fn snapshot_store(
    config: &SchedulerConfig,
    restoring: bool,
    force: bool,
) -> anyhow::Result<(Box<dyn gpupool_scheduler::store::Store>, &'static str)> {
    use gpupool_scheduler::store::SqliteStore;
    let now = gpupool_scheduler::now_ms();
    if let Some(url) = &config.database_url {
        if force {
            anyhow::bail!(
                "--force moves a SQLite database aside; restore into an empty PostgreSQL database instead"
            );
        }
        return Ok((
            Box::new(gpupool_scheduler::pgstore::PgStore::open(url, None)?),
            "postgres",
        ));
    }
    let db = config.database_path();
    if !restoring {
        return Ok((Box::new(SqliteStore::open_reader(&db)?), "sqlite"));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    if force && db.exists() {
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", db.display()));
            let to = PathBuf::from(format!("{}.before-restore-{now}{suffix}", db.display()));
            if from.exists() {
                std::fs::rename(&from, &to)
                    .with_context(|| format!("cannot move {} aside", from.display()))?;
            }
        }
        eprintln!(
            "moved the old database aside: {}.before-restore-{now}",
            db.display()
        );
    }
    Ok((Box::new(SqliteStore::open(&db)?), "sqlite"))
}

/// The config a snapshot command works with: `--data-dir` alone, or the
/// config file.
fn snapshot_config(
    path: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<SchedulerConfig> {
    Ok(match data_dir {
        Some(data_dir) => SchedulerConfig {
            data_dir,
            ..SchedulerConfig::default()
        },
        None => SchedulerConfig::load(path)?,
    })
}

/// `snapshot save` and `snapshot restore`.
fn snapshot(command: SnapshotCommand) -> anyhow::Result<()> {
    use gpupool_scheduler::snapshot;
    let now = gpupool_scheduler::now_ms();
    match command {
        SnapshotCommand::Save {
            file,
            config,
            data_dir,
        } => {
            let config = snapshot_config(&config, data_dir)?;
            let (store, source) = snapshot_store(&config, false, false)?;
            let saved = snapshot::save(&*store, source, &file, now)?;
            println!("saved {}: {saved}", file.display());
        }
        SnapshotCommand::Restore {
            file,
            config,
            data_dir,
            force,
        } => {
            let config = snapshot_config(&config, data_dir)?;
            // The whole file is checked before the target is touched.
            let checked = snapshot::check(&file)?;
            let (store, _) = snapshot_store(&config, true, force)?;
            let restored = snapshot::restore(&*store, &checked, now)?;
            println!(
                "restored {} (saved from {} at {} ms): {restored}",
                file.display(),
                checked.source,
                checked.created_at_ms
            );
        }
    }
    Ok(())
}

/// Writes the bound addresses to `path` through a temporary file and a
/// rename, so a reader sees all of it or nothing.
fn write_addresses(
    path: &std::path::Path,
    grpc: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let mut text = format!("grpc = \"{grpc}\"\n");
    if let Some(m) = metrics {
        text.push_str(&format!("metrics = \"{m}\"\n"));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the address file {}", path.display()))
}
