//! The scheduler's pure core: [`node`]s, [`job`]s (validation and
//! lifecycle), [`pool`]s, [`tenant`]s, [`billing`], [`placement`] (where
//! one request goes), [`shapes`] (what a pool's work asks for) and [`scheduling`] (the planner of a whole pass). Plain data in, decisions out: nothing here imports tonic,
//! the store, a clock or tokio. Time is passed in as `now_ms` (milliseconds
//! since the Unix epoch).

pub mod audit;
pub mod billing;
pub mod job;
pub mod network;
pub mod node;
pub mod placement;
pub mod pool;
pub mod preemption;
pub mod scheduling;
pub mod shapes;
pub mod stranded;
pub mod tenant;
#[cfg(test)]
pub(crate) mod testkit;

pub use gpupool_common::calendar;

pub use job::{
    Instance, InstanceState, Job, JobKind, JobSpec, JobState, Resources, SpecError, StopCause,
};
pub use node::{AgentIdentity, Gpu, Inventory, Node, NodeStatus};

/// The built-in shared pool (R-POOL-1).
pub const PUBLIC_POOL: &str = "public";
