#!/bin/bash
# A quick churn measurement (not the churn benchmark issue 17 asks for):
# a dev cluster with 8 fake GPUs, N one-GPU `true` jobs submitted by C
# parallel CLI clients; prints jobs accepted/s and completed/s.
#   scripts/churn-quick.sh BIN_DIR [N] [C]
# BIN_DIR holds gpupool-scheduler and gpupool (e.g. target/release).
# DRAIN=1: the node is cordoned while the jobs are submitted and uncordoned
# after, so the whole queue is deep at once; "completed" is then the drain
# rate from the uncordon.
set -euo pipefail
bin=$1; n=${2:-400}; c=${3:-8}
dir=$(mktemp -d); port=$((20000 + RANDOM % 20000))
"$bin/gpupool-scheduler" dev --data-dir "$dir/dev" --fake-gpus 8xH100-80GB \
    --grpc-listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 \
    --agent-metrics-listen "127.0.0.1:$((port + 1))" >"$dir/dev.log" 2>&1 &
dev=$!
trap 'kill $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$dir"' EXIT
export GPUPOOL_ADDR="http://127.0.0.1:$port"
for _ in $(seq 100); do
    "$bin/gpupool" --addr "$GPUPOOL_ADDR" node list 2>/dev/null | grep -q Ready && break
    sleep 0.1
done
node=$("$bin/gpupool" --addr "$GPUPOOL_ADDR" -o json node list \
    | python3 -c 'import json,sys; n=json.load(sys.stdin); n=n.get("nodes",n) if isinstance(n,dict) else n; print(n[0]["node_id"])')
[ "${DRAIN:-0}" = 1 ] && "$bin/gpupool" --addr "$GPUPOOL_ADDR" node cordon "$node" >/dev/null
start=$(date +%s.%N)
for k in $(seq "$c"); do
    (for _ in $(seq $((n / c))); do
        "$bin/gpupool" --addr "$GPUPOOL_ADDR" job submit --kind training --gpus 1 \
            --cpu 100m --memory 100 -- true >/dev/null
    done) &
done
wait $(jobs -p | grep -v "^$dev$") 2>/dev/null || true
accepted=$(date +%s.%N)
if [ "${DRAIN:-0}" = 1 ]; then
    "$bin/gpupool" --addr "$GPUPOOL_ADDR" node uncordon "$node" >/dev/null
    drain_start=$(date +%s.%N)
fi
total=$(( (n / c) * c ))
while :; do
    left=$("$bin/gpupool" --addr "$GPUPOOL_ADDR" -o json job list --state queued,scheduled,running \
        | python3 -c 'import json,sys; j=json.load(sys.stdin); j=j.get("jobs",j) if isinstance(j,dict) else j; print(len(j))')
    [ "$left" -eq 0 ] && break
    sleep 0.2
done
finished=$(date +%s.%N)
python3 -c "
a=$accepted-$start; f=$finished-${drain_start:-$start}
print(f'{$total} jobs, {$c} clients: accepted {$total/a:.1f}/s ({a:.2f} s), completed {$total/f:.1f}/s ({f:.2f} s{\" after the uncordon\" if ${DRAIN:-0} else \"\"})')"
