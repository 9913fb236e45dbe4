//! `gpupool-common`: the few things the agent, the scheduler and the CLI
//! all need, so that none of them links another's dependencies.
//!
//! - [`sdnotify`]: systemd's notification protocol for both daemons;
//! - [`tls`]: client-side TLS for the agent's and the CLI's gRPC channels;
//! - [`config`]: the TOML loader both daemons read their config files with;
//! - [`calendar`] and [`arith`]: pure date and rounding arithmetic that the
//!   scheduler's billing and the CLI's usage output must agree on.
//!
//! What must not live here: anything that pulls in NVML, a store (SQLite,
//! PostgreSQL) or the scheduler's domain; this crate is linked by the CLI.

pub mod arith;
pub mod calendar;
pub mod config;
pub mod display;
pub mod sdnotify;
pub mod tls;
