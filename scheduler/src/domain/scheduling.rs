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
//! 1. **Queue order**: higher priority class first (`high`, `normal`,
//!    `preemptible`), then higher `priority`, then lower `seq` (the older
//!    submission). No two jobs share a `seq`, so the order is total.
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
//!    (no replica running, several due, no fixed port) first tries all
//!    its replicas at once spread over nodes, then zones. Otherwise ranks are placed one by
//!    one in the order they are pending. An online service's next replica
//!    prefers, in order: a node without a replica of it in a zone holding
//!    the fewest of its replicas; a node without a replica of it; any node.
//!    With a fixed port the last step is not taken (the port can be held
//!    once per node): spreading is then a rule. The first rank that does
//!    not fit ends the job's turn; the ranks placed before it stand.
//! 7. **Fair share** ([`plan_shared`], the public pool): the shared pool's
//!    requests are taken one at a time from the tenant with the lowest
//!    weighted dominant share, its recent share added ([`Share::dominant`]), ties by priority then
//!    `seq`; inside a tenant, step 1's order. Each placement adds to its
//!    tenant's use. A request that would take its tenant over its GPU
//!    limit waits ([`Wait::Limit`]) without becoming the head; a replica
//!    job gets the due ranks the limit leaves room for. The other pools'
//!    requests go first, in step 1's order (pools hold disjoint nodes).
//!    The class still comes first: a tenant's high-class job goes before
//!    any tenant's normal one.
//! 8. **Preemption** ([`Preemption`], [`crate::domain::preemption`]): a
//!    gang of a class above `preemptible` that does not fit and would be
//!    its pool's head (none yet this pass) may preempt running training
//!    jobs of a lower class in its pool that have run the minimum run time
//!    (another tenant's only if preemptible and, in a shared pool below
//!    the high class, only while its tenant keeps at least the share the
//!    preemptor's tenant gets, [`Share::dominant_after`]; with
//!    [`Preemption::reclaim`], such a tenant's jobs of the request's own
//!    class too): the cheapest victim set that
//!    makes room (fewest instances, then least run time lost; a victim's
//!    whole run). The victims get [`Decision::Preempt`], the request waits
//!    ([`Wait::Preempting`]) as its pool's head, so what the victims free
//!    is kept for it. While its victims stop it preempts no more. Victims
//!    chosen in a pass are not chosen again, and a shape that found none
//!    does not look again in the pass.
//!
//! A wait is reported as a [`Wait`]; its `Display` is the reason the job
//! shows (`gpupool job get`).

use std::collections::HashMap;
use std::sync::Arc;

use super::job::{Job, JobKind, JobState, PendingRank, PriorityClass, Resources};
use super::placement::{Assignment, NoFit, NodeCapacity, Placer};
use super::preemption::{self, Candidate};

/// A job waiting to be placed, as the planner sees it (borrowed from the
/// job).
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub job_id: &'a str,
    /// The job's owner (fair sharing orders a shared pool by it).
    pub tenant: &'a str,
    /// Orders before `priority`; a higher class may preempt a lower one.
    pub class: PriorityClass,
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
            tenant: &job.tenant,
            class: job.spec.priority_class,
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
    /// The job (or its remaining ranks) waits, for this reason. Jobs of
    /// one shape behind one head share one `Wait` (step 4).
    Wait { job_id: String, why: Arc<Wait> },
    /// Stop running job `job_id` (its whole run) to make room for `by`
    /// (step 8).
    Preempt { job_id: String, by: String },
}

impl Decision {
    pub fn job_id(&self) -> &str {
        match self {
            Decision::Place { job_id, .. }
            | Decision::Wait { job_id, .. }
            | Decision::Preempt { job_id, .. } => job_id,
        }
    }
}

/// One job's decisions in a plan.
#[derive(Debug)]
pub struct JobPlan {
    pub job_id: String,
    /// (rank, where), in the order placed.
    pub placed: Vec<(u32, Assignment)>,
    /// Why it (or its remaining ranks) still waits.
    pub wait: Option<Arc<Wait>>,
    /// The job it is preempted for (a running job).
    pub preempted_by: Option<String>,
}

/// A plan's decisions job by job, in plan order (a job's are adjacent).
pub fn by_job(decisions: Vec<Decision>) -> Vec<JobPlan> {
    let mut out: Vec<JobPlan> = Vec::new();
    for d in decisions {
        if out.last().is_none_or(|j| j.job_id != d.job_id()) {
            out.push(JobPlan {
                job_id: d.job_id().to_string(),
                placed: Vec::new(),
                wait: None,
                preempted_by: None,
            });
        }
        let job = out.last_mut().expect("pushed above");
        match d {
            Decision::Place {
                rank, assignment, ..
            } => job.placed.push((rank, assignment)),
            Decision::Wait { why, .. } => job.wait = Some(why),
            Decision::Preempt { by, .. } => job.preempted_by = Some(by),
        }
    }
    out
}

/// Why a job waits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wait {
    /// Not enough room now.
    NoRoom(NoFit),
    /// A service with a fixed port: the nodes without one of its replicas
    /// have no room.
    PortTaken { no_fit: NoFit, port: u32 },
    /// Behind its pool's head, which keeps the nodes it can use.
    Behind { head: String, why: Box<Wait> },
    /// It preempted these jobs (a lower class) and starts once they have
    /// stopped.
    Preempting { victims: usize },
    /// Its tenant's limit in a fair-shared pool is reached (GPU milli).
    Limit {
        tenant: String,
        pool: String,
        max_milli: u64,
        used_milli: u64,
        ask_milli: u64,
    },
}

impl Wait {
    /// What is short, as the placer found it (none for a tenant's limit).
    pub fn no_fit(&self) -> Option<&NoFit> {
        match self {
            Wait::NoRoom(no_fit) | Wait::PortTaken { no_fit, .. } => Some(no_fit),
            Wait::Behind { why, .. } => why.no_fit(),
            Wait::Limit { .. } | Wait::Preempting { .. } => None,
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
            // Counted, not named: a victim may be another tenant's.
            Wait::Preempting { victims } => write!(
                f,
                "preempting {victims} job(s) of a lower priority class: starts once they have stopped"
            ),
            Wait::Limit {
                tenant,
                pool,
                max_milli,
                used_milli,
                ask_milli,
            } => write!(
                f,
                "tenant {tenant}'s limit in pool {pool} is {} GPU(s): {} in use, this asks for {} more",
                gpus(*max_milli),
                gpus(*used_milli),
                gpus(*ask_milli)
            ),
        }
    }
}

/// GPU milli as GPUs ("2", "0.5").
fn gpus(milli: u64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{}", milli as f64 / 1000.0)
    }
}

/// How one pool (the public pool) is shared between tenants: the planner
/// orders its requests by each tenant's weighted dominant share (DRF over
/// GPU, CPU and memory), lowest first, then priority and age inside the
/// tenant; a tenant at its GPU limit waits.
#[derive(Debug, Clone, Default)]
pub struct Share<'a> {
    pub pool: &'a str,
    /// What the pool has in all: GPU milli, CPU milli, memory MiB.
    pub capacity: [u64; 3],
    /// Tenants with a use, a weight or a limit (others: nothing used,
    /// weight 1, no limit).
    pub tenants: HashMap<String, TenantShare>,
}

/// One tenant in a shared pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantShare {
    /// In use now: GPU milli, CPU milli, memory MiB.
    pub used: [u64; 3],
    /// At least 1: a tenant of weight 2 is entitled to twice the share.
    pub weight: u32,
    /// Most GPU milli in use at once; None: no limit.
    pub max_gpu_milli: Option<u64>,
    /// Its recent dominant share (decayed over the half-life; not over
    /// the weight), in parts per billion: 0 without a half-life.
    pub recent_ppb: u64,
}

impl Default for TenantShare {
    fn default() -> Self {
        TenantShare {
            used: [0; 3],
            weight: 1,
            max_gpu_milli: None,
            recent_ppb: 0,
        }
    }
}

impl Share<'_> {
    fn of(&self, tenant: &str) -> TenantShare {
        self.tenants.get(tenant).copied().unwrap_or_default()
    }

    /// What orders the tenants: the tenant's dominant share (its largest
    /// fraction of any resource the pool has) plus its recent share, over
    /// its weight.
    pub fn dominant(&self, tenant: &str) -> f64 {
        self.dominant_after(tenant, &Resources::default(), 0)
    }

    /// [`Share::dominant`] once `instances` more instances of `res` are
    /// held (fewer, for a negative count).
    pub fn dominant_after(&self, tenant: &str, res: &Resources, instances: i64) -> f64 {
        let mut t = self.of(tenant);
        for (u, d) in t.used.iter_mut().zip(res.held()) {
            let delta = i128::from(d) * i128::from(instances);
            *u = (i128::from(*u) + delta).clamp(0, i128::from(u64::MAX)) as u64;
        }
        let recent = t.recent_ppb as f64 / 1e9;
        (dominant_share(&t.used, &self.capacity, 1) + recent) / f64::from(t.weight.max(1))
    }

    /// The tenant's dominant share now, over its weight.
    pub fn held(&self, tenant: &str) -> f64 {
        let t = self.of(tenant);
        dominant_share(&t.used, &self.capacity, t.weight)
    }

    fn charge(&mut self, tenant: &str, res: &Resources, instances: u32) {
        let t = match self.tenants.get_mut(tenant) {
            Some(t) => t,
            None => self.tenants.entry(tenant.to_string()).or_default(),
        };
        t.hold(res, instances);
    }
}

impl TenantShare {
    /// Adds what `instances` instances of `res` hold.
    pub fn hold(&mut self, res: &Resources, instances: u32) {
        for (u, d) in self.used.iter_mut().zip(res.held()) {
            *u += d * u64::from(instances);
        }
    }
}

/// The largest fraction of any resource of `capacity` that `used` is,
/// over `weight` (0 counts as 1).
pub fn dominant_share(used: &[u64; 3], capacity: &[u64; 3], weight: u32) -> f64 {
    let most = (0..3)
        .filter(|&i| capacity[i] > 0)
        .map(|i| used[i] as f64 / capacity[i] as f64)
        .fold(0.0, f64::max);
    most / f64::from(weight.max(1))
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
    plan_shared(queue, placer, now_ms, None, None)
}

/// What step 8 may preempt.
#[derive(Debug, Clone, Default)]
pub struct Preemption<'a> {
    /// Running jobs of the classes below the highest (any pool).
    pub candidates: Vec<Candidate<'a>>,
    /// A job runs at least this long before it may be preempted.
    pub min_runtime_ms: i64,
    /// Requests whose victims are still stopping, with how many: they
    /// wait for those and preempt no more.
    pub stopping: HashMap<&'a str, usize>,
    /// Fair-share preemption (`fair_share_preemption`): in the shared
    /// pool, a request may also take another tenant's jobs of its own
    /// class or below while that tenant keeps at least its share.
    pub reclaim: bool,
}

/// [`plan`], with `share`'s pool shared fairly between tenants (step 7):
/// the other pools' requests go first in the usual order (pools hold
/// disjoint nodes, so their order does not matter), then the shared pool's
/// are taken one at a time from the tenant with the lowest weighted
/// dominant share, each placement adding to its tenant's use.
pub fn plan_shared(
    queue: &[Request<'_>],
    placer: &mut Placer,
    now_ms: i64,
    share: Option<&mut Share<'_>>,
    preempt: Option<&Preemption<'_>>,
) -> Vec<Decision> {
    let mut order: Vec<&Request> = queue.iter().filter(|r| r.due(now_ms)).collect();
    order.sort_by(|a, b| {
        b.class
            .cmp(&a.class)
            .then(b.priority.cmp(&a.priority))
            .then(a.seq.cmp(&b.seq))
    });
    let mut pass = Pass {
        heads: HashMap::new(),
        failed: HashMap::new(),
        out: Vec::new(),
        preempt,
        taken: vec![false; preempt.map_or(0, |p| p.candidates.len())],
        no_victims: Default::default(),
    };
    let Some(share) = share else {
        for req in order {
            pass.consider(req, placer, now_ms, None);
        }
        return pass.out;
    };
    let (shared, rest): (Vec<&Request>, Vec<&Request>) =
        order.into_iter().partition(|r| r.pool == share.pool);
    for req in rest {
        pass.consider(req, placer, now_ms, None);
    }
    // Each tenant's requests, in class, priority and age order.
    let mut tenants: Vec<std::collections::VecDeque<&Request>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for req in shared {
        let i = *index.entry(req.tenant).or_insert_with(|| {
            tenants.push(Default::default());
            tenants.len() - 1
        });
        tenants[i].push_back(req);
    }
    // The tenants by their next request's (class, share, priority, age):
    // serving one changes only its own key. A share is non-negative, so
    // its bits order as the number does.
    use std::cmp::Reverse;
    let key = |share: &Share, r: &Request, i: usize| {
        (
            Reverse(r.class),
            share.dominant(r.tenant).to_bits(),
            Reverse(r.priority),
            r.seq,
            i,
        )
    };
    let mut ready: std::collections::BTreeSet<_> = tenants
        .iter()
        .enumerate()
        .map(|(i, q)| key(share, q[0], i))
        .collect();
    let mut limits = LimitWaits::default();
    while let Some((.., i)) = ready.pop_first() {
        let req = tenants[i]
            .pop_front()
            .expect("a ready tenant has a request");
        match within_limit(req, share, now_ms) {
            Room::All => {
                let placed = pass.consider(req, placer, now_ms, Some(share));
                share.charge(req.tenant, req.resources, placed);
            }
            Room::Some(cut) => {
                let placed = pass.consider(&cut, placer, now_ms, Some(share));
                share.charge(req.tenant, req.resources, placed);
                let waits = matches!(pass.out.last(), Some(Decision::Wait { job_id, .. }) if job_id == req.job_id);
                if !waits {
                    // The ranks held back wait on the limit.
                    let why = limits.wait(req, share, 1);
                    pass.out.push(Decision::Wait {
                        job_id: req.job_id.to_string(),
                        why,
                    });
                }
            }
            Room::None(ask) => {
                let why = limits.wait(req, share, ask);
                pass.out.push(Decision::Wait {
                    job_id: req.job_id.to_string(),
                    why,
                });
            }
        }
        if let Some(next) = tenants[i].front() {
            ready.insert(key(share, next, i));
        }
    }
    pass.out
}

/// What a tenant's limit leaves of a request.
enum Room<'a> {
    /// All of it (no limit, no GPU, or room enough).
    All,
    /// A replica job's first due ranks.
    Some(Request<'a>),
    /// Nothing: this many instances would go over.
    None(u64),
}

/// `req` as far as its tenant's limit allows: a gang is all or nothing, a
/// replica job gets the due ranks there is room for.
fn within_limit<'a>(req: &Request<'a>, share: &Share<'_>, now_ms: i64) -> Room<'a> {
    let t = share.of(req.tenant);
    let each = u64::from(req.resources.gpu_demand_milli());
    let Some(max) = t.max_gpu_milli.filter(|_| each > 0) else {
        return Room::All;
    };
    let room = max.saturating_sub(t.used[0]) / each;
    match &req.shape {
        Shape::Gang { instances, .. } if u64::from(*instances) > room => {
            Room::None(u64::from(*instances))
        }
        Shape::Gang { .. } => Room::All,
        Shape::Replicas { .. } if room == 0 => Room::None(1),
        Shape::Replicas { pending, .. } => {
            // The due ranks beyond the room wait for the next pass.
            let mut due = 0;
            let Some(keep) = pending.iter().position(|p| {
                due += u64::from(p.not_before_ms <= now_ms);
                due > room
            }) else {
                return Room::All;
            };
            let mut cut = req.clone();
            if let Shape::Replicas { pending, .. } = &mut cut.shape {
                *pending = &pending[..keep];
            }
            Room::Some(cut)
        }
    }
}

/// The pass's limit waits, one per (tenant, use, ask): a capped tenant's
/// queue shares them.
#[derive(Default)]
struct LimitWaits<'a>(HashMap<(&'a str, u64, u64), Arc<Wait>>);

impl<'a> LimitWaits<'a> {
    fn wait(&mut self, req: &Request<'a>, share: &Share<'_>, instances: u64) -> Arc<Wait> {
        let t = share.of(req.tenant);
        let ask = instances * u64::from(req.resources.gpu_demand_milli());
        let key = (req.tenant, t.used[0], ask);
        self.0
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Wait::Limit {
                    tenant: req.tenant.to_string(),
                    pool: req.pool.to_string(),
                    max_milli: t.max_gpu_milli.unwrap_or(0),
                    used_milli: t.used[0],
                    ask_milli: ask,
                })
            })
            .clone()
    }
}

/// One pass's state: the pools' heads, the failed shapes and the plan.
struct Pass<'a, 'p> {
    heads: HashMap<&'a str, Head<'a>>,
    // A failed shape's wait, and (with a head) the same behind the head:
    // every request of the shape shares them.
    failed: HashMap<FailedShape<'a>, (Arc<Wait>, Option<Arc<Wait>>)>,
    out: Vec<Decision>,
    preempt: Option<&'p Preemption<'p>>,
    /// Candidates already preempted this pass.
    taken: Vec<bool>,
    /// Request shapes (pool, resources, instances, class, tenant) that
    /// found no victims this pass.
    no_victims: std::collections::HashSet<(&'a str, &'a Resources, u32, PriorityClass, &'a str)>,
}

impl<'a> Pass<'a, '_> {
    /// Step 8 for a gang that does not fit: the wait it gets if it
    /// preempts (the victims' decisions are pushed) or if the victims it
    /// preempted earlier are still stopping.
    fn preempting(
        &mut self,
        req: &Request<'a>,
        placer: &Placer,
        now_ms: i64,
        share: Option<&Share<'_>>,
    ) -> Option<Wait> {
        let p = self.preempt?;
        if let Some(&victims) = p.stopping.get(req.job_id) {
            return Some(Wait::Preempting { victims });
        }
        let Shape::Gang { instances, .. } = req.shape else {
            return None;
        };
        // Fair-share preemption: in a shared pool, below the high class,
        // another tenant's jobs of the request's class or below whose
        // tenant keeps at least this one's share (the mask below).
        let reclaim = p.reclaim && share.is_some() && req.class < PriorityClass::High;
        if req.class == PriorityClass::Preemptible && !reclaim {
            return None;
        }
        // A shape that found no victims this pass finds none again (the
        // victims chosen since only shrink the candidates).
        let shape = (req.pool, req.resources, instances, req.class, req.tenant);
        if self.no_victims.contains(&shape) {
            return None;
        }
        // In a shared pool, below the high class, another tenant's job is
        // a victim only if its tenant keeps at least the share the
        // preemptor's tenant gets (no preemption pushes a tenant below
        // the one it yields to).
        let fair: Option<Vec<bool>> = share.filter(|_| req.class < PriorityClass::High).map(|s| {
            let mine = s.dominant_after(req.tenant, req.resources, i64::from(instances));
            p.candidates
                .iter()
                .zip(&self.taken)
                .map(|(c, &taken)| {
                    taken
                        || (c.tenant != req.tenant
                            && s.dominant_after(c.tenant, c.resources, -(c.instances.len() as i64))
                                < mine)
                })
                .collect()
        });
        let chosen = preemption::choose(
            placer.nodes(),
            req.pool,
            req.tenant,
            req.resources,
            instances,
            req.class,
            &p.candidates,
            fair.as_deref().unwrap_or(&self.taken),
            reclaim,
            p.min_runtime_ms,
            now_ms,
        );
        let Some(chosen) = chosen.filter(|c| !c.is_empty()) else {
            self.no_victims.insert(shape);
            return None;
        };
        let victims = chosen.len();
        for i in chosen {
            self.taken[i] = true;
            self.out.push(Decision::Preempt {
                job_id: p.candidates[i].job_id.to_string(),
                by: req.job_id.to_string(),
            });
        }
        Some(Wait::Preempting { victims })
    }

    /// Steps 3 to 6 for one request (`share`: its pool's, if shared);
    /// returns how many instances it placed.
    fn consider(
        &mut self,
        req: &Request<'a>,
        placer: &mut Placer,
        now_ms: i64,
        share: Option<&Share<'_>>,
    ) -> u32 {
        let (heads, failed, out) = (&mut self.heads, &mut self.failed, &mut self.out);
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
        if let Some((base, behind)) = failed.get(&shape) {
            // Step 4: no placer call, and the wait the shape's first
            // failure made (shared, not copied).
            let why = match behind {
                Some(behind) => behind.clone(),
                None => {
                    become_head(heads, placer, req);
                    base.clone()
                }
            };
            out.push(Decision::Wait {
                job_id: req.job_id.to_string(),
                why,
            });
            return 0;
        }
        let (placed, failure) = match &req.shape {
            Shape::Gang { instances, .. } => {
                match placer.place_avoiding(req.pool, req.resources, *instances, false, avoid) {
                    Ok(a) => ((0..*instances).zip(a).collect(), None),
                    Err(no_fit) => (Vec::new(), Some(Wait::NoRoom(no_fit))),
                }
            }
            Shape::Replicas { .. } => place_replicas(req, placer, avoid, now_ms),
        };
        let count = placed.len() as u32;
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
            return count;
        };
        // Only a request that would be its pool's head preempts: behind
        // another head, what it freed would be the head's to keep.
        if matches!(why, Wait::NoRoom(_))
            && !self.heads.contains_key(req.pool)
            && let Some(why) = self.preempting(req, placer, now_ms, share)
        {
            // It keeps the nodes it could use while its victims stop.
            become_head(&mut self.heads, placer, req);
            self.out.push(Decision::Wait {
                job_id: req.job_id.to_string(),
                why: Arc::new(why),
            });
            return count;
        }
        let (heads, failed, out) = (&mut self.heads, &mut self.failed, &mut self.out);
        let cached = !matches!(why, Wait::PortTaken { .. });
        let base = Arc::new(why);
        let why = match heads.get(req.pool) {
            Some(head) => Arc::new(Wait::Behind {
                head: head.job_id.to_string(),
                why: Box::new((*base).clone()),
            }),
            None => {
                become_head(heads, placer, req);
                base.clone()
            }
        };
        if cached {
            let behind = shape.head.is_some().then(|| why.clone());
            failed.entry(shape).or_insert((base, behind));
        }
        out.push(Decision::Wait {
            job_id: req.job_id.to_string(),
            why,
        });
        count
    }
}

/// Step 3: a request that failed in a pool without a head becomes the
/// pool's head if the idle pool could host it.
fn become_head<'a>(heads: &mut HashMap<&'a str, Head<'a>>, placer: &mut Placer, req: &Request<'a>) {
    if let Some(reserved) = placer.reservable(req.pool, req.resources, req.wanted()) {
        heads.insert(
            req.pool,
            Head {
                job_id: req.job_id,
                reserved,
            },
        );
    }
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
    if *spread && *port == 0 && taken.is_empty() && due.len() > 1 {
        // A fresh service: all its replicas at once, spread over nodes,
        // then zones (softly: more replicas than nodes still place, so not
        // with a fixed port, which goes rank by rank below).
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

#[cfg(test)]
mod tests {
    //! The planner against an independent validator: feasibility, gangs,
    //! due times, the backfill rule (nothing started after a pool's head
    //! holds a node the head could use) and spreading.

    use super::*;
    use crate::domain::placement::{GpuSlot, default_shapes};
    use crate::domain::testkit::{self, oracle_idle_room, oracle_room};
    use proptest::prelude::*;

    const NOW: i64 = 1_000;

    /// A job of the generated queue, owning what its [`Request`] borrows.
    #[derive(Debug, Clone)]
    struct TestJob {
        id: String,
        priority: i32,
        pool: String,
        resources: Resources,
        kind: TestKind,
    }

    #[derive(Debug, Clone)]
    enum TestKind {
        Gang {
            instances: u32,
            not_before_ms: i64,
        },
        Replicas {
            pending: Vec<PendingRank>,
            siblings: Vec<String>,
            spread: bool,
            port: u32,
        },
    }

    fn job(i: usize) -> impl Strategy<Value = TestJob> {
        let due = prop_oneof![4 => Just(0i64), 1 => Just(NOW + 1)];
        let gang = (1u32..=4, due.clone()).prop_map(|(instances, not_before_ms)| TestKind::Gang {
            instances,
            not_before_ms,
        });
        let replicas = (
            prop::collection::vec(due, 1..=4),
            prop::collection::vec(0usize..7, 0..=2),
            prop::bool::weighted(0.7),
            prop_oneof![3 => Just(0u32), 1 => Just(8080u32)],
        )
            .prop_map(|(due, siblings, spread, port)| TestKind::Replicas {
                pending: due
                    .into_iter()
                    .enumerate()
                    .map(|(rank, not_before_ms)| PendingRank {
                        rank: rank as u32 + 3,
                        not_before_ms,
                    })
                    .collect(),
                siblings: siblings.into_iter().map(|n| format!("node{n}")).collect(),
                spread,
                port,
            });
        (
            0i32..3,
            prop_oneof![5 => Just("public"), 1 => Just("p1")],
            testkit::resources(),
            prop_oneof![3 => gang, 2 => replicas],
        )
            .prop_map(move |(priority, pool, resources, kind)| TestJob {
                id: format!("j{i:02}"),
                priority,
                pool: pool.into(),
                resources,
                kind,
            })
    }

    fn queue() -> impl Strategy<Value = Vec<TestJob>> {
        (1usize..=12).prop_flat_map(|n| (0..n).map(job).collect::<Vec<_>>())
    }

    fn requests(jobs: &[TestJob]) -> Vec<Request<'_>> {
        jobs.iter()
            .enumerate()
            .map(|(seq, j)| Request {
                job_id: &j.id,
                tenant: "t",
                class: PriorityClass::Normal,
                priority: j.priority,
                seq: seq as u64,
                pool: &j.pool,
                resources: &j.resources,
                shape: match &j.kind {
                    TestKind::Gang {
                        instances,
                        not_before_ms,
                    } => Shape::Gang {
                        instances: *instances,
                        not_before_ms: *not_before_ms,
                    },
                    TestKind::Replicas {
                        pending,
                        siblings,
                        spread,
                        port,
                    } => Shape::Replicas {
                        pending,
                        siblings: siblings.iter().map(String::as_str).collect(),
                        spread: *spread,
                        port: *port,
                    },
                },
            })
            .collect()
    }

    fn due_ranks(j: &TestJob) -> Vec<u32> {
        match &j.kind {
            TestKind::Gang {
                instances,
                not_before_ms,
            } => {
                if *not_before_ms <= NOW {
                    (0..*instances).collect()
                } else {
                    Vec::new()
                }
            }
            TestKind::Replicas { pending, .. } => pending
                .iter()
                .filter(|p| p.not_before_ms <= NOW)
                .map(|p| p.rank)
                .collect(),
        }
    }

    /// Takes one instance of `req` at `a` from `nodes`, checking it may.
    fn take(nodes: &mut [NodeCapacity], pool: &str, req: &Resources, a: &Assignment) {
        let n = nodes
            .iter_mut()
            .find(|n| n.node_id == a.node_id)
            .expect("a known node");
        assert_eq!(n.pool, pool, "a node of another pool");
        assert!(n.schedulable, "an unschedulable node");
        let want = if req.gpus > 0 {
            req.gpus as usize
        } else {
            usize::from(req.gpu_milli > 0)
        };
        assert_eq!(a.gpu_indexes.len(), want, "{a:?}");
        let mut seen = Vec::new();
        for idx in &a.gpu_indexes {
            assert!(!seen.contains(idx), "a GPU twice in one instance");
            seen.push(*idx);
            let g: &mut GpuSlot = n
                .gpus
                .iter_mut()
                .find(|g| g.index == *idx)
                .expect("known GPU");
            assert!(g.healthy, "an unhealthy GPU");
            assert!(
                req.gpu_models.is_empty() || req.gpu_models.contains(&g.model),
                "model {} not asked for",
                g.model
            );
            let milli = if req.gpus > 0 { 1000 } else { req.gpu_milli };
            assert!(g.free_milli >= milli, "GPU {idx} over 1000 milli");
            assert!(
                req.gpus == 0 || g.free_milli == 1000,
                "a whole GPU not free"
            );
            g.free_milli -= milli;
        }
        n.cpu_free_milli -= req.cpu_milli as i64;
        n.memory_free_mib -= req.memory_mib as i64;
        assert!(
            n.cpu_free_milli >= 0 && n.memory_free_mib >= 0,
            "CPU or memory exceeded"
        );
    }

    /// A job's decisions: its id, the ranks placed, why it still waits.
    type JobPlan<'a> = (&'a str, Vec<(u32, &'a Assignment)>, Option<&'a Wait>);

    /// Checks a plan from its inputs and outputs only.
    fn validate(
        nodes: &[NodeCapacity],
        jobs: &[TestJob],
        decisions: &[Decision],
        after: &[NodeCapacity],
    ) {
        // Decisions per job, each job's adjacent.
        let mut per_job: Vec<JobPlan> = Vec::new();
        for d in decisions {
            let id = d.job_id();
            if per_job.last().is_none_or(|l| l.0 != id) {
                assert!(
                    per_job.iter().all(|l| l.0 != id),
                    "{id}'s decisions are apart"
                );
                per_job.push((id, Vec::new(), None));
            }
            let entry = per_job.last_mut().expect("pushed");
            match d {
                Decision::Place {
                    rank, assignment, ..
                } => {
                    assert!(entry.2.is_none(), "{id}: a placement after its wait");
                    entry.1.push((*rank, assignment));
                }
                Decision::Wait { why, .. } => {
                    assert!(entry.2.is_none(), "{id}: two waits");
                    entry.2 = Some(why);
                }
                Decision::Preempt { .. } => panic!("{id}: preempted without candidates"),
            }
        }
        let of = |id: &str| jobs.iter().find(|j| j.id == id).expect("a queued job");
        // Queue order, independently: priority, then submission.
        let mut order: Vec<(usize, &TestJob)> = jobs.iter().enumerate().collect();
        order.sort_by_key(|(seq, j)| (-j.priority, *seq));
        let mut capacity = nodes.to_vec();
        for (id, placed, wait) in &per_job {
            let j = of(id);
            let due = due_ranks(j);
            assert!(!due.is_empty(), "{id} is not due but was planned");
            let mut ranks: Vec<u32> = placed.iter().map(|(r, _)| *r).collect();
            ranks.sort_unstable();
            ranks.dedup();
            assert_eq!(ranks.len(), placed.len(), "{id}: a rank twice");
            assert!(
                ranks.iter().all(|r| due.contains(r)),
                "{id}: a rank not due"
            );
            if let TestKind::Gang { .. } = j.kind {
                assert!(placed.is_empty() || ranks == due, "{id}: a gang in part");
            }
            assert_eq!(
                wait.is_some(),
                ranks.len() < due.len(),
                "{id}: waits iff not all placed"
            );
            for (_, a) in placed {
                take(&mut capacity, &j.pool, &j.resources, a);
            }
        }
        for (_, j) in &order {
            if !due_ranks(j).is_empty() {
                assert!(
                    per_job.iter().any(|l| l.0 == j.id),
                    "{} is due but not planned",
                    j.id
                );
            }
        }
        assert_eq!(
            after,
            &capacity[..],
            "the placer's capacities and the placements disagree"
        );
        // Backfill: a pool's head is its first job (in queue order) left
        // waiting that the idle pool could host; later jobs of the pool
        // start only on nodes the head could not use, and say they wait
        // behind it.
        let mut heads: HashMap<&str, (&str, Vec<bool>)> = HashMap::new();
        for (_, j) in &order {
            let Some((_, placed, wait)) = per_job.iter().find(|l| l.0 == j.id) else {
                continue;
            };
            if let Some((head, reserved)) = heads.get(j.pool.as_str()) {
                for (_, a) in placed {
                    let pos = nodes
                        .iter()
                        .position(|n| n.node_id == a.node_id)
                        .expect("known");
                    assert!(
                        !reserved[pos],
                        "{} started on {}, which head {head} can use",
                        j.id, a.node_id
                    );
                }
                if let Some(w) = wait {
                    assert!(
                        matches!(w, Wait::Behind { head: h, .. } if h == head),
                        "{} waits behind {head}: {w}",
                        j.id
                    );
                }
                continue;
            }
            if wait.is_some() {
                let wanted = match &j.kind {
                    TestKind::Gang { instances, .. } => *instances,
                    TestKind::Replicas { pending, .. } => pending.len() as u32,
                };
                let room: u64 = nodes
                    .iter()
                    .map(|n| oracle_idle_room(n, &j.pool, &j.resources).min(u64::from(wanted)))
                    .sum();
                if room >= u64::from(wanted) {
                    let reserved = nodes
                        .iter()
                        .map(|n| oracle_idle_room(n, &j.pool, &j.resources) > 0)
                        .collect();
                    heads.insert(&j.pool, (&j.id, reserved));
                }
            }
        }
        // Spreading: an online service's new replica shares a node with
        // another of its replicas only if, even at the end of the pass, no
        // node free of them (outside its pool's head's nodes) has room;
        // with a fixed port, never.
        for (id, placed, _) in &per_job {
            let j = of(id);
            let TestKind::Replicas {
                siblings,
                spread: true,
                port,
                ..
            } = &j.kind
            else {
                continue;
            };
            let mut on: Vec<&str> = siblings.iter().map(String::as_str).collect();
            let new: Vec<&str> = placed.iter().map(|(_, a)| a.node_id.as_str()).collect();
            let shared = new
                .iter()
                .enumerate()
                .any(|(k, n)| on.contains(n) || new[..k].contains(n));
            on.extend(&new);
            if !shared {
                continue;
            }
            assert_eq!(
                *port, 0,
                "{id}: two replicas with port {port} on one node: {new:?} (siblings {siblings:?})"
            );
            let seq = jobs.iter().position(|x| x.id == *id).expect("known");
            let head_before = order.iter().take_while(|(s, _)| *s != seq).find(|(_, h)| {
                heads
                    .get(h.pool.as_str())
                    .is_some_and(|(hid, _)| *hid == h.id)
                    && h.pool == j.pool
            });
            let reserved = head_before
                .and_then(|(_, h)| heads.get(h.pool.as_str()))
                .map(|(_, r)| r.clone());
            for (pos, n) in capacity.iter().enumerate() {
                if on.contains(&n.node_id.as_str()) || reserved.as_ref().is_some_and(|r| r[pos]) {
                    continue;
                }
                assert_eq!(
                    oracle_room(n, &j.pool, &j.resources),
                    0,
                    "{id}: replicas share a node ({new:?}, siblings {siblings:?}) while {} has room",
                    n.node_id
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn property_plans_are_feasible_keep_backfill_and_spread(
            nodes in testkit::cluster(),
            jobs in queue(),
        ) {
            let order: Vec<usize> = (0..nodes.len()).collect();
            let mut placer = Placer::with_order(nodes.clone(), &default_shapes(), &order);
            let queue = requests(&jobs);
            let decisions = plan(&queue, &mut placer, NOW);
            validate(&nodes, &jobs, &decisions, placer.nodes());
            // Deterministic: the same input plans the same.
            let mut again = Placer::with_order(nodes.clone(), &default_shapes(), &order);
            prop_assert_eq!(plan(&queue, &mut again, NOW), decisions);
        }

        /// The fair-share path (what `schedule` runs for the public pool):
        /// every placement fits what is left, no tenant goes over its
        /// limit, a job's decisions are adjacent and at most one wait, and
        /// the same input plans the same.
        #[test]
        fn property_fair_share_plans_are_feasible_and_keep_limits(
            nodes in testkit::cluster(),
            jobs in queue(),
            tenant_of in prop::collection::vec(0usize..3, 12),
            used in prop::collection::vec(0u64..4000, 3),
            weights in prop::collection::vec(1u32..4, 3),
            limits in prop::collection::vec(prop::option::of(0u64..6000), 3),
            recents in prop::collection::vec(0u64..1_000_000_000, 3),
        ) {
            const NAMES: [&str; 3] = ["ta", "tb", "tc"];
            let order: Vec<usize> = (0..nodes.len()).collect();
            let mut queue = requests(&jobs);
            for (i, r) in queue.iter_mut().enumerate() {
                r.tenant = NAMES[tenant_of[i % tenant_of.len()]];
            }
            let share = Share {
                pool: "public",
                capacity: [16_000, 256_000, 1 << 20],
                tenants: (0..3)
                    .map(|t| {
                        let ts = TenantShare {
                            used: [used[t], 0, 0],
                            weight: weights[t],
                            max_gpu_milli: limits[t],
                            recent_ppb: recents[t],
                        };
                        (NAMES[t].to_string(), ts)
                    })
                    .collect(),
            };
            let run = || {
                let mut placer = Placer::with_order(nodes.clone(), &default_shapes(), &order);
                let mut s = share.clone();
                let d = plan_shared(&queue, &mut placer, NOW, Some(&mut s), None);
                (d, s)
            };
            let (decisions, after) = run();
            let mut left = nodes.clone();
            let mut added = [0u64; 3];
            let mut seen: Vec<&str> = Vec::new();
            let mut waited: Vec<&str> = Vec::new();
            for d in &decisions {
                let id = d.job_id();
                if seen.last() != Some(&id) {
                    prop_assert!(!seen.contains(&id), "{id}'s decisions are not adjacent");
                    seen.push(id);
                }
                let (i, r) = queue.iter().enumerate().find(|(_, r)| r.job_id == id).expect("queued");
                match d {
                    Decision::Place { assignment, .. } => {
                        prop_assert!(!waited.contains(&id), "{id}: placed after its wait");
                        take(&mut left, r.pool, r.resources, assignment);
                        if r.pool == "public" {
                            added[tenant_of[i % tenant_of.len()]] +=
                                u64::from(r.resources.gpu_demand_milli());
                        }
                    }
                    Decision::Wait { .. } => {
                        prop_assert!(!waited.contains(&id), "{id}: two waits");
                        waited.push(id);
                    }
                    Decision::Preempt { .. } => prop_assert!(false, "no candidates were given"),
                }
            }
            for t in 0..3 {
                prop_assert_eq!(after.tenants[NAMES[t]].used[0], used[t] + added[t]);
                if let Some(max) = limits[t] && added[t] > 0 {
                    prop_assert!(used[t] + added[t] <= max, "{} over its limit", NAMES[t]);
                }
            }
            prop_assert_eq!(run().0, decisions);
        }
    }
}

/// Step 7, the public pool shared fairly, on hand-built clusters.
#[cfg(test)]
mod fair_tests {
    use super::*;
    use crate::domain::placement::{GpuSlot, default_shapes};

    const NOW: i64 = 1_000;

    /// One public node with `gpus` free GPUs, 64 cores and 256 GiB.
    fn public_node(gpus: u32) -> NodeCapacity {
        NodeCapacity {
            node_id: "n1".into(),
            pool: "public".into(),
            schedulable: true,
            cpu_free_milli: 64_000,
            memory_free_mib: 256 * 1024,
            cpu_total_milli: 64_000,
            memory_total_mib: 256 * 1024,
            gpus: (0..gpus)
                .map(|i| GpuSlot {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    model: "A100-40GB".into(),
                    healthy: true,
                    free_milli: 1000,
                })
                .collect(),
            az: "AZ1".into(),
        }
    }

    fn one_gpu() -> Resources {
        Resources {
            gpus: 1,
            cpu_milli: 1000,
            memory_mib: 1024,
            ..Default::default()
        }
    }

    struct Job {
        id: String,
        tenant: &'static str,
        priority: i32,
        instances: u32,
    }

    fn jobs(list: &[(&'static str, i32, u32)]) -> Vec<Job> {
        list.iter()
            .enumerate()
            .map(|(i, (tenant, priority, instances))| Job {
                id: format!("j{i}"),
                tenant,
                priority: *priority,
                instances: *instances,
            })
            .collect()
    }

    fn queue<'a>(jobs: &'a [Job], res: &'a Resources) -> Vec<Request<'a>> {
        jobs.iter()
            .enumerate()
            .map(|(seq, j)| Request {
                job_id: &j.id,
                tenant: j.tenant,
                class: PriorityClass::Normal,
                priority: j.priority,
                seq: seq as u64,
                pool: "public",
                resources: res,
                shape: Shape::Gang {
                    instances: j.instances,
                    not_before_ms: 0,
                },
            })
            .collect()
    }

    fn share(used: &[(&str, u64, u32, Option<u64>)]) -> Share<'static> {
        Share {
            pool: "public",
            capacity: [8_000, 64_000, 256 * 1024],
            tenants: used
                .iter()
                .map(|(t, gpu_milli, weight, max)| {
                    let share = TenantShare {
                        used: [*gpu_milli, 0, 0],
                        weight: *weight,
                        max_gpu_milli: *max,
                        recent_ppb: 0,
                    };
                    (t.to_string(), share)
                })
                .collect(),
        }
    }

    /// The jobs placed, in plan order, and the waits by job.
    fn run(
        free: u32,
        jobs: &[Job],
        share: Option<&mut Share<'_>>,
    ) -> (Vec<String>, HashMap<String, Arc<Wait>>) {
        let res = one_gpu();
        let q = queue(jobs, &res);
        let mut placer = Placer::new(vec![public_node(free)], &default_shapes(), 7);
        let mut placed = Vec::new();
        let mut waits = HashMap::new();
        for d in plan_shared(&q, &mut placer, NOW, share, None) {
            match d {
                Decision::Place { job_id, .. } => {
                    if placed.last() != Some(&job_id) {
                        placed.push(job_id);
                    }
                }
                Decision::Wait { job_id, why } => {
                    waits.insert(job_id, why);
                }
                Decision::Preempt { .. } => panic!("no candidates were given"),
            }
        }
        (placed, waits)
    }

    #[test]
    fn a_flooding_tenant_does_not_hold_every_free_gpu() {
        // A submitted four jobs before B's one; two GPUs are free.
        let q = jobs(&[
            ("a", 0, 1),
            ("a", 0, 1),
            ("a", 0, 1),
            ("a", 0, 1),
            ("b", 0, 1),
        ]);
        let (fifo, _) = run(2, &q, None);
        assert_eq!(fifo, ["j0", "j1"], "without fair share: submission order");
        let (fair, waits) = run(2, &q, Some(&mut share(&[])));
        assert_eq!(
            fair,
            ["j0", "j4"],
            "A's first, then B's (A's share is higher)"
        );
        assert!(waits.contains_key("j1"));
    }

    #[test]
    fn what_a_tenant_holds_already_counts_and_weights_divide_it() {
        let q = jobs(&[("a", 0, 1), ("b", 0, 1)]);
        // A holds 2 of 8 GPUs, B 1: B first.
        let (fair, _) = run(
            1,
            &q,
            Some(&mut share(&[("a", 2000, 1, None), ("b", 1000, 1, None)])),
        );
        assert_eq!(fair, ["j1"]);
        // With weight 3, A's 2/8 counts as 1/12, below B's 1/8: A first.
        let (fair, _) = run(
            1,
            &q,
            Some(&mut share(&[("a", 2000, 3, None), ("b", 1000, 1, None)])),
        );
        assert_eq!(fair, ["j0"]);
    }

    #[test]
    fn inside_a_tenant_priority_then_age() {
        let q = jobs(&[("a", 0, 1), ("a", 5, 1), ("b", 0, 1)]);
        let (fair, _) = run(2, &q, Some(&mut share(&[])));
        // A's priority-5 job is A's first; then B (A's share is higher).
        assert_eq!(fair, ["j1", "j2"]);
    }

    #[test]
    fn dominant_share_is_the_largest_fraction_of_any_resource() {
        let mut s = share(&[("a", 1000, 1, None)]);
        s.tenants.get_mut("a").unwrap().used[1] = 32_000;
        assert_eq!(
            s.dominant("a"),
            0.5,
            "half the CPU beats an eighth of the GPUs"
        );
        assert_eq!(s.dominant("nobody"), 0.0);
        let q = jobs(&[("a", 0, 1), ("b", 0, 1)]);
        let mut s2 = s.clone();
        s2.tenants.insert(
            "b".into(),
            TenantShare {
                used: [3000, 0, 0],
                ..Default::default()
            },
        );
        // B's 3/8 GPUs is below A's half of the CPU.
        let (fair, _) = run(1, &q, Some(&mut s2));
        assert_eq!(fair, ["j1"]);
    }

    /// Preemption in the shared pool: B's normal job preempts A's
    /// preemptible one while A keeps at least B's share after it; not
    /// when that would push A below B; a high-class job regardless.
    #[test]
    fn preemption_in_a_shared_pool_never_pushes_the_victims_tenant_below_the_preemptors() {
        let res = one_gpu();
        // n1's two GPUs: GPU 0 held by A's preemptible a0, GPU 1 by `other`.
        let decide_with =
            |other: &'static str, class: PriorityClass, a0: PriorityClass, reclaim: bool| {
                let mut node = public_node(2);
                for g in &mut node.gpus {
                    g.free_milli = 0;
                }
                node.cpu_free_milli -= 2000;
                node.memory_free_mib -= 2048;
                let mut placer = Placer::new(vec![node], &default_shapes(), 7);
                let gpu0 = [0u32];
                let gpu1 = [1u32];
                let candidates = vec![
                    Candidate {
                        job_id: "a0",
                        tenant: "a",
                        pool: "public",
                        class: a0,
                        started_ms: 0,
                        resources: &res,
                        instances: vec![("n1", &gpu0[..])],
                    },
                    Candidate {
                        job_id: "x1",
                        tenant: other,
                        pool: "public",
                        class: PriorityClass::Normal,
                        started_ms: 0,
                        resources: &res,
                        instances: vec![("n1", &gpu1[..])],
                    },
                ];
                let preempt = Preemption {
                    candidates,
                    min_runtime_ms: 0,
                    stopping: HashMap::new(),
                    reclaim,
                };
                let mut share = Share {
                    pool: "public",
                    capacity: [2000, 64_000, 256 * 1024],
                    tenants: HashMap::new(),
                };
                share.charge("a", &res, 1);
                share.charge(other, &res, 1);
                let q = [Request {
                    job_id: "b9",
                    tenant: "b",
                    class,
                    priority: 0,
                    seq: 9,
                    pool: "public",
                    resources: &res,
                    shape: Shape::Gang {
                        instances: 1,
                        not_before_ms: 0,
                    },
                }];
                plan_shared(&q, &mut placer, NOW, Some(&mut share), Some(&preempt))
                    .into_iter()
                    .filter_map(|d| match d {
                        Decision::Preempt { job_id, .. } => Some(job_id),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            };
        let decide = |other: &'static str, class: PriorityClass| {
            decide_with(other, class, PriorityClass::Preemptible, false)
        };
        // The other GPU is A's too: A keeps half, B gets half.
        assert_eq!(decide("a", PriorityClass::Normal), ["a0"]);
        // The other GPU is B's own: B would hold all, A nothing.
        assert!(decide("b", PriorityClass::Normal).is_empty());
        // High is the admin's grant: it preempts regardless.
        assert_eq!(decide("b", PriorityClass::High), ["a0"]);
        // A's job is normal: only fair-share preemption takes it, and
        // only while A keeps B's share.
        let normal = PriorityClass::Normal;
        assert!(decide_with("a", normal, normal, false).is_empty());
        assert_eq!(decide_with("a", normal, normal, true), ["a0"]);
        assert!(decide_with("b", normal, normal, true).is_empty());
        // A preemptible request reclaims from another preemptible one.
        let pre = PriorityClass::Preemptible;
        assert!(decide_with("a", pre, pre, false).is_empty());
        assert_eq!(decide_with("a", pre, pre, true), ["a0"]);
    }

    #[test]
    fn a_tenant_that_used_the_pool_recently_goes_after_one_that_did_not() {
        // Neither holds anything now; A held half the pool lately. One GPU
        // free: B's younger job starts, not A's older one.
        let q = jobs(&[("a", 0, 1), ("b", 0, 1)]);
        let mut s = share(&[]);
        s.tenants.insert(
            "a".into(),
            TenantShare {
                recent_ppb: 500_000_000,
                ..Default::default()
            },
        );
        assert_eq!(s.dominant("a"), 0.5);
        assert_eq!(s.held("a"), 0.0, "what it holds now is shown apart");
        let (fair, _) = run(1, &q, Some(&mut s.clone()));
        assert_eq!(fair, ["j1"]);
        // The weight divides the sum: A of weight 4 (0.5 / 4) goes before
        // B holding a quarter now.
        s.tenants.get_mut("a").unwrap().weight = 4;
        s.tenants.insert(
            "b".into(),
            TenantShare {
                used: [2000, 0, 0],
                ..Default::default()
            },
        );
        let (fair, _) = run(1, &q, Some(&mut s));
        assert_eq!(fair, ["j0"]);
    }

    #[test]
    fn a_tenant_at_its_limit_waits_saying_so_and_reserves_nothing() {
        // A may hold 2 GPUs and holds 1: its 2-GPU gang waits on the limit,
        // its 1-GPU job starts; B's job starts too, not behind A's gang.
        let q = jobs(&[("a", 0, 2), ("a", 0, 1), ("b", 0, 1)]);
        let (fair, waits) = run(4, &q, Some(&mut share(&[("a", 1000, 1, Some(2000))])));
        assert_eq!(fair, ["j2", "j1"]);
        let why = waits["j0"].to_string();
        assert_eq!(
            why,
            "tenant a's limit in pool public is 2 GPU(s): 1 in use, this asks for 2 more"
        );
        assert!(waits["j0"].no_fit().is_none());
        // Once A holds 2, its next job waits too.
        let q = jobs(&[("a", 0, 1), ("a", 0, 1)]);
        let (fair, waits) = run(4, &q, Some(&mut share(&[("a", 1000, 1, Some(2000))])));
        assert_eq!(fair, ["j0"]);
        assert!(matches!(
            *waits["j1"],
            Wait::Limit {
                used_milli: 2000,
                ..
            }
        ));
    }

    #[test]
    fn a_limited_service_places_only_the_replicas_its_room_allows() {
        let res = one_gpu();
        let pending: Vec<PendingRank> = (0..4)
            .map(|rank| PendingRank {
                rank,
                not_before_ms: 0,
            })
            .collect();
        let q = vec![Request {
            job_id: "svc",
            tenant: "a",
            class: PriorityClass::Normal,
            priority: 0,
            seq: 0,
            pool: "public",
            resources: &res,
            shape: Shape::Replicas {
                pending: &pending,
                siblings: Vec::new(),
                spread: true,
                port: 0,
            },
        }];
        let mut placer = Placer::new(vec![public_node(8)], &default_shapes(), 7);
        let mut s = share(&[("a", 0, 1, Some(3000))]);
        let plan = plan_shared(&q, &mut placer, NOW, Some(&mut s), None);
        let placed = plan
            .iter()
            .filter(|d| matches!(d, Decision::Place { .. }))
            .count();
        assert_eq!(placed, 3, "{plan:?}");
        assert_eq!(
            s.tenants["a"].used[0], 3000,
            "the pass charges what it placed"
        );
        assert!(
            matches!(plan.last(), Some(Decision::Wait { why, .. }) if matches!(**why, Wait::Limit { .. })),
            "the rank held back waits on the limit: {plan:?}"
        );
    }

    #[test]
    fn other_pools_are_not_reordered() {
        let res = one_gpu();
        let mut node = public_node(1);
        node.pool = "p1".into();
        let q = jobs(&[("a", 0, 1), ("a", 0, 1), ("b", 0, 1)]);
        let mut reqs = queue(&q, &res);
        for r in &mut reqs {
            r.pool = "p1";
        }
        let mut placer = Placer::new(vec![node], &default_shapes(), 7);
        let plan = plan_shared(&reqs, &mut placer, NOW, Some(&mut share(&[])), None);
        assert!(matches!(&plan[0], Decision::Place { job_id, .. } if job_id == "j0"));
    }
}
