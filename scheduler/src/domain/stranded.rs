//! Free GPU capacity that the requests at hand cannot use, and why: the
//! operator's view of fragmentation (`gpupool capacity`, the metric
//! `gpupool_gpus_stranded_milli`) and the replay's analysis
//! (`gpupool-bench replay`) share this one rule.
//!
//! Each free GPU share (a GPU's unallocated thousandths) goes under the
//! first cause that holds, judged against the requests (per instance:
//! GPUs, share per GPU, CPU, memory, models):
//!
//! 1. [`Cause::Unschedulable`]: the node is not Ready, cordoned or revoked,
//!    or the GPU is unhealthy (the caller decides, before asking here);
//! 2. [`Cause::NoRequest`]: there is no GPU request to judge by;
//! 3. [`Cause::SmallShares`]: the share is smaller than every request's;
//! 4. [`Cause::Model`]: the requests whose share fits want other models;
//! 5. [`Cause::TooFewGpus`]: those that fit by share and model want more
//!    such GPUs than the node has free;
//! 6. [`Cause::Cpu`]: one that fits by GPU (share, model, count) is short of
//!    the node's free CPU;
//! 7. [`Cause::Memory`]: otherwise, one is short of its free memory;
//! 8. [`Cause::Usable`]: a request fits there (not stranded: it may start
//!    at the next pass).

/// Why a free GPU share is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    Unschedulable,
    NoRequest,
    SmallShares,
    Model,
    TooFewGpus,
    Cpu,
    Memory,
    Usable,
}

/// Every cause, in the order they are judged.
pub const CAUSES: [Cause; 8] = [
    Cause::Unschedulable,
    Cause::NoRequest,
    Cause::SmallShares,
    Cause::Model,
    Cause::TooFewGpus,
    Cause::Cpu,
    Cause::Memory,
    Cause::Usable,
];

impl Cause {
    /// Its name in the CLI, the API and the metric's `cause` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Unschedulable => "unschedulable",
            Cause::NoRequest => "no_request",
            Cause::SmallShares => "shares_below_smallest_request",
            Cause::Model => "model",
            Cause::TooFewGpus => "too_few_gpus_per_node",
            Cause::Cpu => "cpu",
            Cause::Memory => "memory",
            Cause::Usable => "usable",
        }
    }
}

/// Milli of free GPU capacity per cause, indexed by `Cause as usize`.
pub type ByCause = [i64; CAUSES.len()];

/// One request, per instance: `num_gpu` GPUs with `milli` free each
/// (1000: whole GPUs), CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ask {
    pub num_gpu: u32,
    pub milli: i64,
    pub cpu_milli: i64,
    pub memory_mib: i64,
}

/// Splits one schedulable node's free GPU shares (`gpus_free[i]`, milli)
/// by cause against `asks`; `model_ok(gpu, ask)` says whether GPU `gpu`'s
/// model is one ask `ask` accepts. Asks without GPUs are ignored.
pub fn split_node(
    gpus_free: &[i64],
    cpu_free: i64,
    memory_free: i64,
    asks: &[Ask],
    model_ok: impl Fn(usize, usize) -> bool,
) -> ByCause {
    let mut out = [0; CAUSES.len()];
    // Per ask: the node's GPUs with its share free, of its models.
    let fitting: Vec<usize> = asks
        .iter()
        .enumerate()
        .map(|(a, ask)| {
            gpus_free
                .iter()
                .enumerate()
                .filter(|&(g, &f)| f >= ask.milli && model_ok(g, a))
                .count()
        })
        .collect();
    let gpu_asks = asks.iter().filter(|a| a.num_gpu > 0).count();
    for (g, &free) in gpus_free.iter().enumerate().filter(|&(_, &f)| f > 0) {
        let cause = if gpu_asks == 0 {
            Cause::NoRequest
        } else {
            cause_of(g, free, cpu_free, memory_free, asks, &fitting, &model_ok)
        };
        out[cause as usize] += free;
    }
    out
}

fn cause_of(
    g: usize,
    free: i64,
    cpu_free: i64,
    memory_free: i64,
    asks: &[Ask],
    fitting: &[usize],
    model_ok: &impl Fn(usize, usize) -> bool,
) -> Cause {
    let (mut share, mut model, mut gpus, mut cpu) = (false, false, false, false);
    for (a, ask) in asks.iter().enumerate() {
        if ask.num_gpu == 0 || ask.milli > free {
            continue;
        }
        share = true;
        if !model_ok(g, a) {
            continue;
        }
        model = true;
        if fitting[a] < ask.num_gpu as usize {
            continue;
        }
        gpus = true;
        if cpu_free < ask.cpu_milli {
            cpu = true;
        } else if memory_free >= ask.memory_mib {
            return Cause::Usable;
        }
    }
    match (share, model, gpus, cpu) {
        (false, ..) => Cause::SmallShares,
        (true, false, ..) => Cause::Model,
        (true, true, false, _) => Cause::TooFewGpus,
        (true, true, true, true) => Cause::Cpu,
        (true, true, true, false) => Cause::Memory,
    }
}

/// The per-instance ask of a job's resources (`None`: no GPU).
pub fn ask_of(r: &super::Resources) -> Option<Ask> {
    let (num_gpu, milli) = match (r.gpus, r.gpu_milli) {
        (0, 0) => return None,
        (0, m) => (1, i64::from(m)),
        (n, _) => (n, 1000),
    };
    Some(Ask {
        num_gpu,
        milli,
        cpu_milli: i64::try_from(r.cpu_milli).unwrap_or(i64::MAX),
        memory_mib: i64::try_from(r.memory_mib).unwrap_or(i64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(num_gpu: u32, milli: i64, cpu_milli: i64, memory_mib: i64) -> Ask {
        Ask {
            num_gpu,
            milli,
            cpu_milli,
            memory_mib,
        }
    }

    #[test]
    fn each_free_share_goes_under_the_first_cause_that_holds() {
        let any = |_: usize, _: usize| true;
        let one = [ask(1, 500, 1000, 1024)];
        // CPU short: both free GPUs are stranded by CPU.
        let s = split_node(&[1000, 600], 500, 4096, &one, any);
        assert_eq!(s[Cause::Cpu as usize], 1600);
        // CPU there, memory short.
        let s = split_node(&[1000], 4000, 512, &one, any);
        assert_eq!(s[Cause::Memory as usize], 1000);
        // Both there: usable, and a 100-milli share is below the ask.
        let s = split_node(&[1000, 100], 4000, 4096, &one, any);
        assert_eq!(
            (s[Cause::Usable as usize], s[Cause::SmallShares as usize]),
            (1000, 100)
        );
        // Two whole GPUs wanted, one free.
        let s = split_node(&[1000, 0], 4000, 4096, &[ask(2, 1000, 0, 0)], any);
        assert_eq!(s[Cause::TooFewGpus as usize], 1000);
        // Another model only.
        let s = split_node(&[1000], 4000, 4096, &one, |_, _| false);
        assert_eq!(s[Cause::Model as usize], 1000);
        // Nothing asked (CPU-only asks do not count).
        let s = split_node(&[1000], 4000, 4096, &[ask(0, 0, 1, 1)], any);
        assert_eq!(s[Cause::NoRequest as usize], 1000);
        // A request that fits anywhere wins over one that is short of CPU.
        let s = split_node(&[1000], 1000, 4096, &[ask(1, 1000, 8000, 0), one[0]], any);
        assert_eq!(s[Cause::Usable as usize], 1000);
    }

    #[test]
    fn a_job_s_resources_ask_per_instance() {
        let r = |gpus, gpu_milli| super::super::Resources {
            gpus,
            gpu_milli,
            gpu_models: vec![],
            cpu_milli: 500,
            memory_mib: 64,
        };
        assert_eq!(ask_of(&r(2, 0)), Some(ask(2, 1000, 500, 64)));
        assert_eq!(ask_of(&r(0, 250)), Some(ask(1, 250, 500, 64)));
        assert_eq!(ask_of(&r(0, 0)), None);
    }
}
