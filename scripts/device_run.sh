#!/usr/bin/env bash
# Everything seqpar measures and checks on a lent GPU, most important first, inside a time budget.
#
#   bash scripts/device_wheels.sh                   # on the CPU machine first: fills .whl/
#   bash scripts/device_run.sh [PHASE ...]          # on the GPU machine, repo root; logs under $OUT
#
# Phases (default: speed memory checks, in that order):
#   speed   issue 11 + 13: trainer vs plain eager loop on the Llama-3.2-1B shape at 32K (with the
#           deterministic and compiled variants) and 128K; the grouped MoE layer vs a dense GEMM;
#           attention kernels on the real shape (d 64, GQA 32/8, packed documents) and ring at degree 1
#   memory  issue 12: 1M tokens on the H200 and 512K under an 80 GiB cap (rows packed with 32K
#           documents: same memory, a fraction of the attention time), offload off/on at 128K, the planner's
#           predictions for those points, the CUDA paths of the memory features
#   checks  kernel self-test, SP smoke test, launcher runs (deepspeed, ZeRO-3), 8K throughput, a profile of
#           one 32K Trainer step (the operator table), the CUDA profiler path, ckpt costs
#
# BUDGET (seconds, default 570: a device call may run 600) bounds the whole run: a step that cannot
# finish in what is left is skipped and says so; each step's timeout is its own cap or what is left.
# DRY_RUN=1 prints each step's command instead of running it (tests/test_device_run.py checks them on
# CPU, so a typo cannot waste a device session). $OUT gets at most 8 files (the device returns no more).
# Device time is about 15 minutes per session, start-up included: one call of `speed memory`, then
# `checks` if time is left (docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-/tmp/seqpar-device}
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
  export PYTHONPATH=$PWD
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
  export PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
if [ "$DRY_RUN" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import deepspeed, pydantic, torch; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" \
    2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
fi

# step NAME MIN_S CAP_S LOG CMD...: runs CMD with timeout min(CAP_S, left) when at least MIN_S is left
step() {
  local name=$1 min=$2 cap=$3 log=$4
  shift 4
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt "$min" ]; then
    echo "device_run: skipped $name ($left s left of $BUDGET, needs $min)" | tee -a "$OUT/skipped.log"
    return 0
  fi
  local t=$((cap < left - 15 ? cap : left - 15))  # -k 15: SIGKILL 15 s after SIGTERM, inside the budget
  if [ "$DRY_RUN" = 1 ]; then
    printf 'DRY %s\t' "$name"; printf '%q ' "$@"; echo
    return 0
  fi
  echo "device_run: $name (timeout ${t}s, ${left}s left)" | tee -a "$OUT/$log"
  # only DeepSpeed's [WARNING] lines and Python warnings are filtered (errors and seqpar's own
  # "WARNING: ... does not fit" stay); line-buffered, so a kill loses no line
  timeout -k 15 "$t" "$@" 2>&1 | grep --line-buffered -v -E "\] \[WARNING\] \[|Warning: |^  warnings\.warn" \
    | tee -a "$OUT/$log"
  echo "device_run: $name exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$OUT/$log"
}

B1=(python3 scripts/bench_train.py --device cuda --model llama3.2-1b --train.precision bf16)

speed() {
  # 32K: trainer vs plain eager loop; deterministic / fast and compiled / eager trainer in the same run
  step "train 32K" 120 260 speed.log "${B1[@]}" --seq-lens 32768 --steps 3 --warmup 2 \
    --variant train.deterministic=true --variant train.compile=true --json "$OUT/speed_32k.json"
  # 128K: the fastest policy that fits (planner: selective, 63 GiB) vs the plain loop (eager runs out
  # of memory at 128K, then the checkpointed loop: torch.utils.checkpoint per layer + chunked CE)
  step "train 128K" 120 220 speed.log "${B1[@]}" --seq-lens 131072 --steps 2 --warmup 1 \
    --memory.activation_checkpointing selective --json "$OUT/speed_128k.json"
  # grouped expert GEMMs (torch._grouped_mm, sm90 bf16) vs a dense GEMM of the same FLOPs
  step "moe" 40 90 speed.log python3 scripts/bench_moe.py --device cuda --experts 8 64 128 --no-historical
  # the 1B attention shape (d 64, GQA 32/8) at 32K in 1, 8 and 32 documents: every kernel + ring 1
  for docs in 1 8 32; do
    step "attention docs=$docs" 30 60 speed.log python3 scripts/bench_attention.py --seqlens 32768 --heads 32 \
      --kv-heads 8 --dim 64 --docs "$docs" --budget 0.3
  done
}

memory() {
  # the long config at 1M (H200) and 512K under an 80 GiB cap (H100), rows of 32K documents
  step "1M fit" 90 200 memory.log python3 scripts/bench_train.py --device cuda --config configs/llama3.2-1b-long.yaml \
    --probe 1048576 --doc-len 32768 --steps 1 --warmup 1
  step "512K under 80 GiB" 60 150 memory.log python3 scripts/bench_train.py --device cuda \
    --config configs/llama3.2-1b-long.yaml --probe 524288 --doc-len 32768 --steps 1 --warmup 1 --memory-limit-gib 80
  # offload overhead at 128K (full checkpointing + tiled MLP, off then on; one process each)
  for off in false true; do
    step "128K offload=$off" 70 150 memory.log "${B1[@]}" --probe 131072 --steps 2 --warmup 1 \
      --memory.activation_checkpointing full --memory.tiled_mlp true --memory.offload_activations $off
  done
  # the planner's predictions for the points above (its last line: fits / does not fit, with the peak)
  step "plan 128K offload off" 10 60 memory.log python3 -m seqpar.plan --config configs/llama3.2-1b-long.yaml \
    --data.seq_len 131072 --memory.offload_activations false --gpu-memory 141
  for s in 131072 524288 1048576; do
    step "plan $s" 10 60 memory.log python3 -m seqpar.plan --config configs/llama3.2-1b-long.yaml --data.seq_len $s \
      --gpu-memory $([ $s = 524288 ] && echo 80 || echo 141)
  done
  # CUDA paths of the memory features (pinned offload copies on a side stream, tiles, GaLore's SVD)
  step "memory features" 40 120 memory.log python3 scripts/gpu_memory_check.py --device cuda
}

checks() {
  step "selftest" 30 120 checks.log python3 scripts/gpu_selftest.py
  step "smoke" 60 240 checks.log python3 -m torch.distributed.run --nproc_per_node 1 scripts/gpu_smoke.py --device cuda
  step "8K throughput" 60 150 checks.log "${B1[@]}" --seq-lens 8192 --steps 4 --warmup 2
  # where a 32K Trainer step's time goes (issue 11): the benchmark's own Trainer config, step 4 traced
  step "profile 32K config" 5 60 checks.log "${B1[@]}" --seq-lens 32768 --write-config /tmp/seqpar-bench-32k.yaml
  step "profile 32K" 90 200 checks.log python3 seqpar/train.py --config /tmp/seqpar-bench-32k.yaml \
    --train.max_steps 4 --logging.run_dir /tmp/seqpar-prof-32k --logging.profile '{steps: [4, 4]}'
  step "profile 32K table" 5 20 checks.log head -45 /tmp/seqpar-prof-32k/profile/steps4-4/rank0.txt
  step "deepspeed launcher" 45 120 checks.log deepspeed --num_gpus 1 seqpar/train.py --config configs/tiny-cpu.yaml \
    --train.precision bf16 --train.max_steps 60 --logging.run_dir /tmp/seqpar-tiny --logging.progress_bar false
  # also the CUDA profiler path: device-time table and memory history of two steps
  step "zero3 + profile" 45 120 checks.log python3 seqpar/train.py --config configs/tiny-cpu.yaml --parallel.zero_stage 3 \
    --train.precision bf16 --train.max_steps 60 --logging.run_dir /tmp/seqpar-tiny-z3 --logging.progress_bar false \
    --logging.profile '{steps: [50, 51], memory: true}'
  step "profile table" 5 20 checks.log head -25 /tmp/seqpar-tiny-z3/profile/steps50-51/rank0.txt
  step "checkpoint costs" 45 120 checks.log python3 scripts/bench_checkpoint.py --hidden 2048 --layers 8 --out /tmp/ckbench
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(speed memory checks)
for ph in "${phases[@]}"; do
  case "$ph" in
    speed|memory|checks) "$ph" ;;
    *) echo "device_run: unknown phase '$ph' (speed, memory, checks)" >&2; exit 2 ;;
  esac
done
# the tables, last: what the call's output shows first
[ "$DRY_RUN" = 1 ] && exit 0
grep -h -E "^\| |^longest|^bench_train probe|^fits|^does not fit|^device_run: .* exit|skipped" "$OUT"/speed.log \
  "$OUT"/memory.log "$OUT"/skipped.log 2>/dev/null | tail -60
