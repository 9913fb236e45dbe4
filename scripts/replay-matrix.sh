#!/bin/bash
# The replay matrix issue 16 compares before and after: workloads x
# policies default, fgd, bestfit x seeds 42..51, one JSON line each.
#   scripts/replay-matrix.sh target/release/gpupool-bench > after.jsonl
#   scripts/replay-matrix.sh OLD/gpupool-scheduler bench > before.jsonl
# (the older binaries had the bench inside gpupool-scheduler). Compare
# with `replay_ms` (a timing) removed.
set -euo pipefail
D="$(dirname "$0")/../../shared/data/openb"
for w in default gpushare40 multigpu20 gpuspec10; do
  for p in default fgd bestfit; do
    for s in $(seq 42 51); do
      "$@" replay --nodes $D/openb_node_list_gpu_node.csv --pods $D/openb_pod_list_$w.csv \
        --policy $p --seed $s --output json | sed "s/^{/{\"workload\":\"$w\",/"
    done
  done
done
