//! What each pool's work asks for, learned from its submissions
//! ([`crate::domain::shapes`]): every accepted job counts in its pool's
//! statistics; when they are due a refresh, the pool's typical shapes are
//! recomputed, handed to the kept placer and written to the store (the
//! `meta` row `placement_shapes`, in the submission's transaction), so a
//! restart, a standby taking over or a snapshot restore keeps them. A pool
//! with nothing learned yet is scored against the built-in
//! [`placement::default_shapes`].

use std::collections::BTreeMap;

use crate::domain::job::Resources;
use crate::domain::placement::{self, TypicalShape};
use crate::domain::shapes::ShapeStats;
use crate::store::{Record, Store};

use super::Cluster;

/// Pool id -> what its work asks for, with its typical shapes.
#[derive(Debug, Default)]
pub(super) struct Learned {
    stats: BTreeMap<String, ShapeStats>,
    typical: BTreeMap<String, Vec<TypicalShape>>,
}

impl Learned {
    /// From the store's `placement_shapes` (None: nothing learned yet). A
    /// value this binary cannot read is logged and learning starts over:
    /// it is a placement hint, not state anything else depends on.
    pub(super) fn load(json: Option<&str>) -> Learned {
        let Some(json) = json else {
            return Learned::default();
        };
        match serde_json::from_str::<BTreeMap<String, ShapeStats>>(json) {
            Ok(stats) => Learned {
                typical: stats
                    .iter()
                    .map(|(p, s)| (p.clone(), s.typical()))
                    .collect(),
                stats,
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the learned placement shapes; learning them again");
                Learned::default()
            }
        }
    }
}

impl Cluster {
    /// Counts an accepted job's request in its pool; on a refresh, hands
    /// the new typical shapes to the kept placer and writes them.
    pub(super) fn learn_shape(&mut self, pool: &str, req: &Resources, instances: u32, now_ms: i64) {
        let due = self
            .learned
            .stats
            .entry(pool.to_string())
            .or_default()
            .observe(req, instances);
        if !due {
            return;
        }
        let typical = self.learned.stats[pool].typical();
        if let Some(p) = &mut self.placer {
            p.set_shapes(pool, &typical);
        }
        self.learned.typical.insert(pool.to_string(), typical);
        // Pools that are gone take their statistics with them.
        let pools = &self.pools;
        let keep = |p: &String| {
            p == crate::domain::PUBLIC_POOL
                || pools
                    .get(p)
                    .is_some_and(|p| p.status != crate::domain::pool::PoolStatus::Deleted)
        };
        self.learned.stats.retain(|p, _| keep(p));
        self.learned.typical.retain(|p, _| keep(p));
        let json = serde_json::to_string(&self.learned.stats).expect("shape statistics serialize");
        if let Err(err) = self.store.write(&[Record::PlacementShapes(&json)], now_ms) {
            tracing::error!(error = %crate::ErrorChain(&err), "cannot persist the learned placement shapes");
        }
    }

    /// Gives a fresh placer every pool's learned typical shapes.
    pub(super) fn apply_shapes(&self, placer: &mut placement::Placer) {
        for (pool, typical) in &self.learned.typical {
            placer.set_shapes(pool, typical);
        }
    }

    /// The typical shapes `pool`'s nodes are scored against: learned, or
    /// the built-in ones.
    pub(crate) fn typical_shapes(&self, pool: &str) -> Vec<TypicalShape> {
        match self.learned.typical.get(pool) {
            Some(t) if !t.is_empty() => t.clone(),
            _ => placement::default_shapes(),
        }
    }
}
