//! What a pool's work asks for, learned from its submissions: the typical
//! request shapes placement scores against ([`super::placement`]'s FGD
//! fragmentation and its CPU-feed rule). Each pool keeps its own
//! [`ShapeStats`]; the scheduler persists them (the store's
//! `placement_shapes`) so a restart keeps what was learned, and
//! `gpupool-bench replay --policy default-online` drives the same code.
//!
//! The typical shapes are REPLAY.md §13's: the distinct shapes, most
//! frequent first (ties: first seen), the shortest prefix covering 95 % of
//! the requests seen, frequencies renormalised over it. Old history fades:
//! when the counts pass [`ShapeStats::FORGET_AT`] every count is halved (a
//! pool whose work changes follows it), and at most
//! [`ShapeStats::MAX_SHAPES`] distinct shapes are kept (a new shape takes
//! the place of the least frequent), so what is kept and persisted per
//! pool stays small.

use super::job::Resources;
use super::placement::TypicalShape;

/// One request shape: GPUs (0 = CPU-only; 1 with `milli < 1000` = a
/// fraction), per-GPU milli, CPU milli, accepted models (sorted).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub num_gpu: u32,
    pub milli: i64,
    pub cpu_milli: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl Shape {
    /// The shape of one instance of `req`.
    pub fn of(req: &Resources) -> Shape {
        let (num_gpu, milli) = super::placement::gpu_ask(req);
        let mut models = if num_gpu > 0 {
            req.gpu_models.clone()
        } else {
            Vec::new()
        };
        models.sort();
        models.dedup();
        Shape {
            num_gpu,
            milli,
            cpu_milli: req.cpu_milli.min(i64::MAX as u64) as i64,
            models,
        }
    }
}

/// The request shapes a pool has seen, with counts, in first-seen order.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShapeStats {
    shapes: Vec<(Shape, u64)>,
    /// Requests seen in all (not halved): drives the refresh schedule.
    seen: u64,
}

impl ShapeStats {
    /// Distinct shapes kept.
    pub const MAX_SHAPES: usize = 64;
    /// Counts are halved once their sum reaches this.
    pub const FORGET_AT: u64 = 100_000;
    /// Most requests one job counts for.
    pub const MAX_PER_JOB: u32 = 16;

    /// Counts `instances` requests of `req`'s shape (a job of N instances
    /// is N requests, as the replay counts pods, but at most
    /// [`ShapeStats::MAX_PER_JOB`]: one huge gang does not make a pool's
    /// typical shapes on its own). Answers whether the
    /// typical shapes are due to be recomputed: after 1, 2, 4, … 256
    /// requests, then every 512 (recomputing on every request would cost a
    /// placement index rebuild each time).
    pub fn observe(&mut self, req: &Resources, instances: u32) -> bool {
        let shape = Shape::of(req);
        let n = u64::from(instances.clamp(1, Self::MAX_PER_JOB));
        match self.shapes.iter().position(|(s, _)| *s == shape) {
            Some(i) => self.shapes[i].1 += n,
            None => {
                if self.shapes.len() >= Self::MAX_SHAPES {
                    // The least frequent goes (the newest among equals).
                    let least = (0..self.shapes.len())
                        .rev()
                        .min_by_key(|&i| self.shapes[i].1)
                        .expect("MAX_SHAPES > 0");
                    self.shapes.remove(least);
                }
                self.shapes.push((shape, n));
            }
        }
        if self.shapes.iter().map(|(_, c)| c).sum::<u64>() >= Self::FORGET_AT {
            for (_, c) in &mut self.shapes {
                *c /= 2;
            }
            self.shapes.retain(|(_, c)| *c > 0);
        }
        let before = self.seen;
        self.seen += n;
        let crossed = |p: u64| before < p && p <= self.seen;
        (0..=8).any(|b| crossed(1 << b)) || before / 512 != self.seen / 512
    }

    /// Requests seen in all.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The typical shapes (module docs); empty before any request.
    pub fn typical(&self) -> Vec<TypicalShape> {
        let counts: Vec<u64> = self.shapes.iter().map(|(_, c)| *c).collect();
        let (order, covered) = typical_prefix(&counts);
        order
            .iter()
            .map(|&i| {
                let (s, c) = &self.shapes[i];
                TypicalShape {
                    num_gpu: s.num_gpu,
                    milli: s.milli,
                    cpu_milli: s.cpu_milli,
                    models: s.models.clone(),
                    p: *c as f64 / covered as f64,
                }
            })
            .collect()
    }
}

/// REPLAY §13's typical set over `counts` (shape i seen `counts[i]`
/// times): the indices of the shapes seen, most frequent first (ties: the
/// lower index, i.e. first seen), cut at the shortest prefix covering 95 %
/// of all counts, and the count that prefix covers (what its frequencies
/// are renormalised by). Empty with nothing counted.
pub fn typical_prefix(counts: &[u64]) -> (Vec<usize>, u64) {
    let total: u64 = counts.iter().sum();
    let mut order: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let (mut covered, mut len) = (0u64, 0);
    for &i in &order {
        if covered * 100 >= total * 95 {
            break;
        }
        covered += counts[i];
        len += 1;
    }
    order.truncate(len);
    (order, covered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(gpus: u32, gpu_milli: u32, cpu_milli: u64) -> Resources {
        Resources {
            gpus,
            gpu_milli,
            cpu_milli,
            memory_mib: 1024,
            ..Default::default()
        }
    }

    #[test]
    fn typical_shapes_are_the_most_frequent_covering_95_percent() {
        let mut s = ShapeStats::default();
        for _ in 0..60 {
            s.observe(&req(1, 0, 8000), 1);
        }
        s.observe(&req(0, 500, 4000), 15);
        s.observe(&req(0, 500, 4000), 15);
        for _ in 0..5 {
            s.observe(&req(0, 0, 2000), 1);
        }
        s.observe(&req(8, 0, 64_000), 5); // ties with the CPU-only shape
        let t = s.typical();
        // 60 + 30 + 5 = 95 of 100: the tie goes to the first seen.
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].num_gpu, t[0].milli, t[0].cpu_milli), (1, 1000, 8000));
        assert_eq!((t[1].num_gpu, t[1].milli), (1, 500));
        assert_eq!((t[2].num_gpu, t[2].cpu_milli), (0, 2000));
        let p: f64 = t.iter().map(|t| t.p).sum();
        assert!((p - 1.0).abs() < 1e-9);
        assert!((t[0].p - 60.0 / 95.0).abs() < 1e-9);
        assert_eq!(s.seen(), 100);
        assert!(ShapeStats::default().typical().is_empty());
    }

    #[test]
    fn refreshes_are_due_at_powers_of_two_then_every_512() {
        let mut s = ShapeStats::default();
        let due: Vec<u64> = (1..=2048u64)
            .filter(|_| s.observe(&req(1, 0, 1000), 1))
            .collect();
        assert_eq!(
            due,
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
        );
        // A gang of 300 counts 16 (crossing 1 .. 16 at once: one refresh).
        let mut s = ShapeStats::default();
        assert!(s.observe(&req(1, 0, 1000), 300));
        assert_eq!(s.seen(), 16);
        assert!(!s.observe(&req(1, 0, 1000), 15));
        assert!(s.observe(&req(1, 0, 1000), 2)); // 33: crosses 32
    }

    #[test]
    fn history_fades_and_stays_bounded() {
        let mut s = ShapeStats::default();
        for _ in 0..3750 {
            s.observe(&req(1, 0, 1000), 16); // 60,000
        }
        for _ in 0..2500 {
            s.observe(&req(2, 0, 2000), 16); // 40,000: sum 100,000, halved
        }
        let t = s.typical();
        assert!((t[0].p - 0.6).abs() < 1e-9, "{t:?}");
        for cpu in 0..(ShapeStats::MAX_SHAPES as u64 + 10) {
            s.observe(&req(0, 0, 10_000 + cpu), 1);
        }
        assert_eq!(s.shapes.len(), ShapeStats::MAX_SHAPES);
        // The frequent shapes survived the newcomers.
        assert_eq!(s.typical()[0].num_gpu, 1);
        assert_eq!(s.typical()[1].num_gpu, 2);
    }

    #[test]
    fn models_are_part_of_a_gpu_shape_only() {
        let mut a = req(1, 0, 1000);
        a.gpu_models = vec!["H100".into(), "A100".into(), "H100".into()];
        assert_eq!(Shape::of(&a).models, vec!["A100", "H100"]);
        let mut cpu = req(0, 0, 1000);
        cpu.gpu_models = vec!["H100".into()];
        assert!(Shape::of(&cpu).models.is_empty());
    }
}
