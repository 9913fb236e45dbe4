//! The scheduling pass as a pure planner: which waiting job starts where,
//! and why the others wait. [`plan`] takes the queue (every job waiting to
//! be placed, as [`Request`]s), the capacity (a [`Placer`] over the nodes)
//! and the time, and returns [`Decision`]s; it starts nothing, names no
//! instance and writes nothing (the cluster does, from the decisions). The
//! steps follow Nomad's scheduler (reconcile → feasible → rank → plan):
//! the queue is ordered, each request is checked against what is left,
//! the [`Placer`] ranks the nodes, and the plan is the list of decisions.
//!
//! # Order and tie-breaking (all of it; placement's own is in
//! [`crate::domain::placement`])
//!
//! 1. **Queue order**: higher `priority` first, then lower `seq` (the
//!    older submission). No two jobs share a `seq`, so the order is total.
//! 2. **Due**: a job whose retry backoff has not passed (`not_before_ms`
//!    after `now_ms`) is skipped this pass; for replica kinds, each rank
//!    has its own backoff and only due ranks are placed.
//! 3. **Backfill**: the first request of a pool that does not fit becomes
//!    that pool's *head*. It reserves every node it could use if the node
//!    were idle (its GPU models, enough GPUs, CPU and memory in total) —
//!    there are no run-time estimates, so anything started on such a node
//!    might hold what the head waits for. Later requests of the pool may
//!    start only on the other nodes. A head that would not fit even on the
//!    idle pool (it waits for nodes to be added) reserves nothing, and the
//!    next failing request may become the head. Each pool has at most one
//!    head per pass.
//! 4. **Failed shapes**: capacity only shrinks within a pass, so a request
//!    shape (pool, resources, gang size, the head it is behind) that failed
//!    once fails again without asking the placer: a long queue of alike
//!    jobs costs one attempt per shape. A failure that depends on the job's
//!    own replicas (a fixed port taken on the other nodes) is not cached.
//! 5. **Gangs** (training, notebooks, TensorBoard, batch jobs without
//!    replicas): all instances at once or none, placed by the placer's gang
//!    rules (as few nodes as possible).
//! 6. **Replicas** (online and batch services): a fresh online service
//!    (no replica running, several due) first tries all its replicas at
//!    once spread over nodes, then zones. Otherwise ranks are placed one by
//!    one in the order they are pending. An online service's next replica
//!    prefers, in order: a node without a replica of it in a zone holding
//!    the fewest of its replicas; a node without a replica of it; any node.
//!    With a fixed port the last step is not taken (the port can be held
//!    once per node): spreading is then a rule. The first rank that does
//!    not fit ends the job's turn; the ranks placed before it stand.
//!
//! A wait is reported as a [`Wait`]; its `Display` is the reason the job
//! shows (`gpupool job get`).

use std::collections::HashMap;

use super::job::{Job, JobKind, JobState, PendingRank, Resources};
use super::placement::{Assignment, NoFit, NodeCapacity, Placer};

/// A job waiting to be placed, as the planner sees it (borrowed from the
/// job).
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub job_id: &'a str,
    pub priority: i32,
    /// Submission order (the tie-break after priority).
    pub seq: u64,
    pub pool: &'a str,
    /// Per instance.
    pub resources: &'a Resources,
    pub shape: Shape<'a>,
}

/// How a request's instances are placed.
#[derive(Debug, Clone)]
pub enum Shape<'a> {
    /// Ranks `0..instances`, all at once or none, once `not_before_ms` has
    /// passed.
    Gang { instances: u32, not_before_ms: i64 },
    /// Replica kinds: the pending ranks, each with its own backoff, placed
    /// one by one.
    Replicas {
        pending: &'a [PendingRank],
        /// Nodes of the job's replicas that hold resources now.
        siblings: Vec<&'a str>,
        /// Online services spread their replicas over nodes and zones.
        spread: bool,
        /// A fixed port (0: none): one replica per node at most.
        port: u32,
    },
}

impl<'a> Request<'a> {
    /// The request of `job` if it waits to be placed (whatever its
    /// backoff): a queued job, or a replica job not being stopped that has
    /// ranks pending.
    pub fn of(job: &'a Job) -> Option<Request<'a>> {
        let shape = if job.spec.kind.has_replicas() {
            if job.stop_cause.is_some() || job.pending.is_empty() {
                return None;
            }
            Shape::Replicas {
                pending: &job.pending,
                siblings: job.active_instances().map(|i| i.node_id.as_str()).collect(),
                spread: job.spec.kind == JobKind::OnlineService,
                port: job.spec.port,
            }
        } else {
            if job.state != JobState::Queued {
                return None;
            }
            Shape::Gang {
                instances: job.spec.instances,
                not_before_ms: job.not_before_ms,
            }
        };
        Some(Request {
            job_id: &job.job_id,
            priority: job.spec.priority,
            seq: job.seq,
            pool: &job.pool_id,
            resources: &job.spec.resources,
            shape,
        })
    }

    fn due(&self, now_ms: i64) -> bool {
        match &self.shape {
            Shape::Gang { not_before_ms, .. } => *not_before_ms <= now_ms,
            Shape::Replicas { pending, .. } => pending.iter().any(|p| p.not_before_ms <= now_ms),
        }
    }

    /// Instances a head reserves nodes for: the gang, or every pending
    /// replica (at least one).
    fn wanted(&self) -> u32 {
        match &self.shape {
            Shape::Gang { instances, .. } => *instances,
            Shape::Replicas { pending, .. } => pending.len().max(1) as u32,
        }
    }
}

/// What the plan says of one job. A job's decisions are adjacent in the
/// plan: its placements, then (if it still waits) one `Wait`.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start rank `rank` of job `job_id` on `assignment`'s node and GPUs.
    Place {
        job_id: String,
        rank: u32,
        assignment: Assignment,
    },
    /// The job (or its remaining ranks) waits, for this reason.
    Wait { job_id: String, why: Wait },
}

/// Why a job waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Not enough room now.
    NoRoom(NoFit),
    /// A service with a fixed port: the nodes without one of its replicas
    /// have no room.
    PortTaken { no_fit: NoFit, port: u32 },
    /// Behind its pool's head, which keeps the nodes it can use.
    Behind { head: String, why: Box<Wait> },
}

impl Wait {
    /// What is short, as the placer found it.
    pub fn no_fit(&self) -> &NoFit {
        match self {
            Wait::NoRoom(no_fit) | Wait::PortTaken { no_fit, .. } => no_fit,
            Wait::Behind { why, .. } => why.no_fit(),
        }
    }
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::NoRoom(no_fit) => write!(f, "{no_fit}"),
            Wait::PortTaken { no_fit, port } => {
                write!(f, "{no_fit} (port {port} is taken on the other nodes)")
            }
            Wait::Behind { head, why } => write!(
                f,
                "{why} (behind {head}, which keeps the nodes it can use; others may be backfilled)"
            ),
        }
    }
}

/// A pool's head: the job and the nodes (by position) it reserves.
struct Head<'a> {
    job_id: &'a str,
    reserved: Vec<bool>,
}

/// A request shape whose failure this pass is remembered (step 4).
#[derive(PartialEq, Eq, Hash)]
struct FailedShape<'a> {
    pool: &'a str,
    resources: &'a Resources,
    /// Gang size; 0 for replica kinds (any number of ranks).
    gang: u32,
    head: Option<&'a str>,
}

/// Plans one scheduling pass: see the module docs for the rules. The
/// placer's capacities are reduced by what is placed (so a kept placer is
/// current for the next pass).
pub fn plan(queue: &[Request<'_>], placer: &mut Placer, now_ms: i64) -> Vec<Decision> {
    let mut order: Vec<&Request> = queue.iter().filter(|r| r.due(now_ms)).collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
    let mut heads: HashMap<&str, Head> = HashMap::new();
    let mut failed: HashMap<FailedShape, Wait> = HashMap::new();
    let mut out = Vec::new();
    for req in order {
        let head = heads.get(req.pool);
        let avoid = head.map_or(&[][..], |h| &h.reserved[..]);
        let shape = FailedShape {
            pool: req.pool,
            resources: req.resources,
            gang: match req.shape {
                Shape::Gang { instances, .. } => instances,
                Shape::Replicas { .. } => 0,
            },
            head: head.map(|h| h.job_id),
        };
        let (placed, failure) = match failed.get(&shape) {
            Some(why) => (Vec::new(), Some(why.clone())),
            None => match &req.shape {
                Shape::Gang { instances, .. } => {
                    match placer.place_avoiding(req.pool, req.resources, *instances, false, avoid) {
                        Ok(a) => ((0..*instances).zip(a).collect(), None),
                        Err(no_fit) => (Vec::new(), Some(Wait::NoRoom(no_fit))),
                    }
                }
                Shape::Replicas { .. } => place_replicas(req, placer, avoid, now_ms),
            },
        };
        out.extend(
            placed
                .into_iter()
                .map(|(rank, assignment)| Decision::Place {
                    job_id: req.job_id.to_string(),
                    rank,
                    assignment,
                }),
        );
        let Some(why) = failure else {
            continue;
        };
        if !matches!(why, Wait::PortTaken { .. }) {
            failed.entry(shape).or_insert_with(|| why.clone());
        }
        let why = match heads.get(req.pool) {
            Some(head) => Wait::Behind {
                head: head.job_id.to_string(),
                why: Box::new(why),
            },
            None => {
                if let Some(reserved) = placer.reservable(req.pool, req.resources, req.wanted()) {
                    heads.insert(
                        req.pool,
                        Head {
                            job_id: req.job_id,
                            reserved,
                        },
                    );
                }
                why
            }
        };
        out.push(Decision::Wait {
            job_id: req.job_id.to_string(),
            why,
        });
    }
    out
}

/// Places a replica request's due ranks (step 6). Returns what was placed
/// and, if a rank could not be, why.
fn place_replicas(
    req: &Request<'_>,
    placer: &mut Placer,
    avoid: &[bool],
    now_ms: i64,
) -> (Vec<(u32, Assignment)>, Option<Wait>) {
    let Shape::Replicas {
        pending,
        siblings,
        spread,
        port,
    } = &req.shape
    else {
        unreachable!("place_replicas is given replica requests");
    };
    let (pool, res) = (req.pool, req.resources);
    let mut taken: Vec<String> = siblings.iter().map(|s| s.to_string()).collect();
    let due: Vec<u32> = pending
        .iter()
        .filter(|p| p.not_before_ms <= now_ms)
        .map(|p| p.rank)
        .collect();
    if *spread && taken.is_empty() && due.len() > 1 {
        // A fresh service: all its replicas at once, spread over nodes,
        // then zones.
        if let Ok(a) = placer.place_avoiding(pool, res, due.len() as u32, true, avoid) {
            return (due.into_iter().zip(a).collect(), None);
        }
    }
    let mut placed = Vec::new();
    for rank in due {
        let attempt = if *spread && !taken.is_empty() {
            let mask: Vec<bool> = placer
                .nodes()
                .iter()
                .enumerate()
                .map(|(pos, n)| {
                    avoid.get(pos).copied().unwrap_or(false) || taken.contains(&n.node_id)
                })
                .collect();
            let zone_mask = fewest_siblings_zones(placer.nodes(), pool, &taken, &mask);
            let spread_first = match &zone_mask {
                Some(zm) => placer
                    .place_avoiding(pool, res, 1, false, zm)
                    .or_else(|_| placer.place_avoiding(pool, res, 1, false, &mask)),
                None => placer.place_avoiding(pool, res, 1, false, &mask),
            };
            if *port != 0 {
                spread_first.map_err(|no_fit| Wait::PortTaken {
                    no_fit,
                    port: *port,
                })
            } else {
                spread_first
                    .or_else(|_| placer.place_avoiding(pool, res, 1, false, avoid))
                    .map_err(Wait::NoRoom)
            }
        } else {
            placer
                .place_avoiding(pool, res, 1, false, avoid)
                .map_err(Wait::NoRoom)
        };
        match attempt {
            Ok(mut a) => {
                let a = a.pop().expect("one instance placed");
                taken.push(a.node_id.clone());
                placed.push((rank, a));
            }
            Err(why) => return (placed, Some(why)),
        }
    }
    (placed, None)
}

/// `mask` (nodes to avoid, by position) extended with every node outside
/// the zones of `pool` holding the fewest of `siblings`' nodes; None when
/// all its zones hold as many (no zone to prefer).
pub(crate) fn fewest_siblings_zones(
    nodes: &[NodeCapacity],
    pool: &str,
    siblings: &[String],
    mask: &[bool],
) -> Option<Vec<bool>> {
    let zone = |id: &str| {
        nodes
            .iter()
            .find(|n| n.node_id == id)
            .map_or("", |n| n.az.as_str())
    };
    let mut per_zone: HashMap<&str, usize> = HashMap::new();
    for n in nodes.iter().filter(|n| n.pool == pool) {
        per_zone.entry(n.az.as_str()).or_insert(0);
    }
    for id in siblings {
        *per_zone.entry(zone(id)).or_insert(0) += 1;
    }
    let fewest = *per_zone.values().min()?;
    let zones: Vec<&str> = per_zone
        .iter()
        .filter(|(_, c)| **c == fewest)
        .map(|(z, _)| *z)
        .collect();
    (zones.len() < per_zone.len()).then(|| {
        nodes
            .iter()
            .zip(mask)
            .map(|(n, m)| *m || !zones.contains(&n.az.as_str()))
            .collect()
    })
}
