#!/usr/bin/env bash
# GPU node check: the real NVML probe, the agent's /metrics and jobs on a real
# GPU, through a dev cluster (scheduler + agent, real NVML, real cgroups).
#
#   scripts/gpu-node-check.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds release builds of gpupool-scheduler, gpupool, gpupool-agent
# and (optional) nvml-test, the `--test nvml` binary of gpupool-agent; for the
# container checks also gpuimage (`cargo build --release -p gpupool-e2e --bin
# gpuimage`) and, where the node has no docker-registry, a copy of
# /usr/bin/docker-registry (it needs only the C library). Run as
# root on a node with the NVIDIA driver. Every step's output lands in
# OUT_DIR; summary.txt says what passed. Exit status: the number of failed
# checks.
set -u
BIN=$(cd "$1" && pwd)
OUT=$2
mkdir -p "$OUT"
export PATH="$BIN:$PATH"
export GPUPOOL_ADDR=http://127.0.0.1:17070
FAILED=0
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
check() { # NAME CONDITION-COMMAND...
    local name=$1
    shift
    if "$@"; then echo "PASS $name" | tee -a "$SUMMARY"; else
        echo "FAIL $name" | tee -a "$SUMMARY"
        FAILED=$((FAILED + 1))
    fi
}
fetch() { python3 -c 'import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"; }

{
    nvidia-smi -L
    nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw,mig.mode.current --format=csv
    uname -a
    echo "cgroup fs: $(stat -fc %T /sys/fs/cgroup)"
    cat /proc/self/cgroup
    ls -l /dev/nvidia*
} >"$OUT/host.txt" 2>&1

# 1. The probe, with the conformance checks the fakes pass.
gpupool-agent probe --check >"$OUT/probe.json" 2>"$OUT/probe.err"
check "probe --check (NVML conforms)" test $? -eq 0
SMI_UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
[ -n "$SMI_UUID" ] || SMI_UUID=no-gpu-seen-by-nvidia-smi
check "probe sees nvidia-smi's GPU $SMI_UUID" grep -q "\"$SMI_UUID\"" "$OUT/probe.json"
if [ -x "$BIN/nvml-test" ]; then
    "$BIN/nvml-test" --ignored --nocapture >"$OUT/nvml-test.txt" 2>&1
    check "cargo test --test nvml -- --ignored" test $? -eq 0
fi

# 1b. An image made of what is on this node (it reaches no registry): a
# shell, a few tools and the C library nvidia-smi needs, pushed to a local
# registry. nvidia-smi and the driver's libraries come from the agent (the
# CDI spec, or bind-mounted as nvidia-container-cli does), not the image.
IMAGE=
REGISTRY_ARGS=()
if [ -x "$BIN/gpuimage" ] && { [ -x "$BIN/docker-registry" ] || command -v docker-registry >/dev/null; }; then
    R=$(mktemp -d)
    mkdir -p "$R/bin" "$R/etc" "$R/tmp" "$R/proc" "$R/sys" "$R/dev" "$R/work" "$R/root"
    chmod 1777 "$R/tmp"
    TOOLS="sh ls cat grep"
    for t in $TOOLS; do cp -L "$(command -v "$t")" "$R/bin/$t"; done
    for lib in $({ ldd "$(command -v nvidia-smi)" 2>/dev/null; for t in $TOOLS; do ldd "$(command -v "$t")"; done; } | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$R$(dirname "$lib")" && cp -L "$lib" "$R$lib"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
    [ -x "$BIN/docker-registry" ] && export GPUPOOL_DOCKER_REGISTRY="$BIN/docker-registry"
    (sleep 100000 | "$BIN/gpuimage" "$R" gpu/check:1 "$OUT/image-ref.txt" >"$OUT/gpuimage.log" 2>&1) &
    IMAGE_PID=$!
    for _ in $(seq 100); do [ -s "$OUT/image-ref.txt" ] && break; sleep 0.2; done
    IMAGE=$(cat "$OUT/image-ref.txt" 2>/dev/null)
    [ -n "$IMAGE" ] && REGISTRY_ARGS=(--insecure-registry "${IMAGE%%/*}")
fi

# 2. A dev cluster on the real GPU.
D=$(mktemp -d)
# FAKE_GPUS=8xH100-80GB exercises the script's plumbing where there is no GPU.
gpupool-scheduler dev ${FAKE_GPUS:+--fake-gpus "$FAKE_GPUS"} --data-dir "$D" --grpc-listen 127.0.0.1:17070 \
    --metrics-listen 127.0.0.1:19400 --agent-metrics-listen 127.0.0.1:19401 "${REGISTRY_ARGS[@]}" >"$OUT/dev.log" 2>&1 &
DEV=$!
for _ in $(seq 100); do
    gpupool node list 2>/dev/null | grep -q Ready && break
    sleep 0.2
done
gpupool node list >"$OUT/nodes.txt" 2>&1
NODE=$(gpupool -o json node list | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d.get("nodes",d) if isinstance(d,dict) else d; print(d[0]["node_id"])')
gpupool node get "$NODE" >>"$OUT/nodes.txt" 2>&1
check "node Ready with the GPU" grep -q "$SMI_UUID" "$OUT/nodes.txt"

started() { # JOB: wait until it left Queued
    for _ in $(seq 100); do
        gpupool job get "$1" | grep -q '^State: *Queued' || return 0
        sleep 0.2
    done
    return 1
}
submit() { gpupool -o json job submit "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])'; }

# 3. A 1-GPU job: what it sees, and metrics while it computes.
J1=$(submit --name gpu-job --gpus 1 --cpu 2 --memory 12GiB --env "PATH=$PATH" -- sh -c '
  echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; echo "NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"
  echo "--- nvidia-smi -L"; nvidia-smi -L; echo "--- cgroup"; cat /proc/self/cgroup
  python3 -c "
import time, torch
print(\"torch sees\", torch.cuda.device_count(), torch.cuda.get_device_name(0), flush=True)
a = torch.randn(8192, 8192, device=\"cuda\", dtype=torch.bfloat16); b = torch.randn_like(a)
t = time.time(); n = 0
while time.time() - t < 15:
    a @ b; n += 1
    if n % 50 == 0: torch.cuda.synchronize()
torch.cuda.synchronize(); print(\"matmuls\", n, flush=True)"')
echo "job $J1" >>"$SUMMARY"
started "$J1"
sleep 12
fetch http://127.0.0.1:19401/metrics >"$OUT/agent-metrics-during-job.txt" 2>&1
gpupool-agent probe >"$OUT/probe-during-job.json" 2>&1
gpupool job get "$J1" >"$OUT/job1.txt" 2>&1
gpupool job logs --follow "$J1" >"$OUT/job1.log" 2>&1
gpupool job get "$J1" >>"$OUT/job1.txt" 2>&1
check "1-GPU job succeeded" grep -q Succeeded "$OUT/job1.txt"
check "nvidia-smi -L inside lists exactly its GPU" \
    sh -c "test \$(grep -c '^GPU ' '$OUT/job1.log') -eq 1 && grep -q '$SMI_UUID' '$OUT/job1.log'"
check "CUDA_VISIBLE_DEVICES is its UUID" grep -q "CUDA_VISIBLE_DEVICES=$SMI_UUID" "$OUT/job1.log"
check "torch computed on it" grep -q "^matmuls" "$OUT/job1.log"
check "DCGM_FI_DEV_GPU_UTIL > 0 labelled with the job" \
    sh -c "grep '^DCGM_FI_DEV_GPU_UTIL' '$OUT/agent-metrics-during-job.txt' | grep 'gpupool_job=\"$J1\"' | awk '\$NF > 0 {ok=1} END {exit !ok}'"
check "instance cgroup memory in the metrics" \
    sh -c "grep '^gpupool_agent_instance_memory_bytes' '$OUT/agent-metrics-during-job.txt' | grep -q '$J1'"
check "FB_USED and SM_CLOCK reported" \
    sh -c "grep -q '^DCGM_FI_DEV_FB_USED' '$OUT/agent-metrics-during-job.txt' && grep '^DCGM_FI_DEV_SM_CLOCK' '$OUT/agent-metrics-during-job.txt' | awk '\$NF > 0 {ok=1} END {exit !ok}'"

# 4. A job with no GPU must not reach the GPU (device cgroup / eBPF).
J2=$(submit --name no-gpu --gpus 0 --env "PATH=$PATH" -- sh -c '
  nvidia-smi -L; echo "nvidia-smi rc=$?"
  python3 -c "import torch; print(\"torch sees\", torch.cuda.device_count())" 2>&1 | tail -2')
started "$J2"
gpupool job logs --follow "$J2" >"$OUT/job2.log" 2>&1
check "0-GPU job sees no GPU" sh -c "grep -q 'torch sees 0' '$OUT/job2.log' && ! grep -q '$SMI_UUID' '$OUT/job2.log'"

# 5. Over its memory limit: OOM-killed, reported as OOM.
J3=$(submit --name oom --memory 64MiB --env "PATH=$PATH" -- python3 -c 'x = bytearray(1 << 30); print("allocated")')
started "$J3"
gpupool job logs --follow "$J3" >"$OUT/job3.log" 2>&1
sleep 1
gpupool job get "$J3" >"$OUT/job3.txt" 2>&1
check "OOM job reported as OOM" grep -q OOM "$OUT/job3.txt"

# 6. A CPU quota: a busy loop under 200m gets about 0.2 s of CPU a second.
J4=$(submit --name quota --cpu 200m -- sh -c 'sh -c "while :; do :; done" & p=$!; sleep 2; echo "ticks $(cut -d" " -f14,15 /proc/$p/stat)"; kill $p')
started "$J4"
gpupool job logs --follow "$J4" >"$OUT/job4.log" 2>&1
check "CPU quota caps a busy loop (<= 0.6 s of CPU in 2 s)" \
    sh -c "awk '/^ticks/ {t = \$2 + \$3} END {exit !(t > 0 && t <= 60)}' '$OUT/job4.log'"

# 7. Containers: an image job on 1 GPU sees exactly that GPU (nvidia-smi -L),
# an image job without a GPU sees none.
if [ -n "$IMAGE" ]; then
    J5=$(submit --name image-gpu --gpus 1 --image "$IMAGE" -- sh -c 'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; ls /dev; nvidia-smi -L')
    started "$J5"
    gpupool job logs --follow "$J5" >"$OUT/job5.log" 2>&1
    gpupool job get "$J5" >"$OUT/job5.txt" 2>&1
    check "container job on 1 GPU: nvidia-smi -L lists exactly its GPU" \
        sh -c "test \$(grep -c '^GPU ' '$OUT/job5.log') -eq 1 && grep -q '$SMI_UUID' '$OUT/job5.log'"
    J6=$(submit --name image-no-gpu --gpus 0 --image "$IMAGE" -- sh -c 'ls /dev; nvidia-smi -L; echo "nvidia-smi rc=$?"')
    started "$J6"
    gpupool job logs --follow "$J6" >"$OUT/job6.log" 2>&1
    check "GPU-less container job sees no GPU" \
        sh -c "grep -q 'nvidia-smi rc=' '$OUT/job6.log' && ! grep -q '^GPU ' '$OUT/job6.log' && ! grep -q nvidia0 '$OUT/job6.log'"
else
    echo "FAIL container checks: no gpuimage and docker-registry in BIN_DIR or PATH" | tee -a "$SUMMARY"
    FAILED=$((FAILED + 1))
fi

fetch http://127.0.0.1:19401/metrics >"$OUT/agent-metrics-after.txt" 2>&1
fetch http://127.0.0.1:19400/metrics >"$OUT/scheduler-metrics.txt" 2>&1
gpupool usage >"$OUT/usage.txt" 2>&1 || true
kill -TERM "$DEV"
wait "$DEV"
check "dev cluster stopped cleanly" test $? -eq 0
[ -n "${IMAGE_PID:-}" ] && pkill -P "$IMAGE_PID" 2>/dev/null
echo "failed checks: $FAILED" | tee -a "$SUMMARY"
exit "$FAILED"
