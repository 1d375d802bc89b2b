#!/usr/bin/env bash
# Everything seqpar checks on a lent GPU, in one call (see docs/benchmarks.md for the results):
# kernel self-test, attention benchmark, a GPU training run per launcher, a 1B-shape throughput run.
# Wheels for what the machine lacks (DeepSpeed, pydantic, ...) travel in .whl/ (docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-/tmp/seqpar-device}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
  export PATH=/tmp/site/bin:$PATH
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# Most important first (device time is short): speed of the trainer against a plain eager loop on
# the Llama-3.2-1B shape (bf16, fused AdamW by default on CUDA), then with per-layer torch.compile
# and the 32K point; every command has its own timeout so a hang cannot eat the rest.
timeout 240 python3 scripts/bench_train.py --device cuda --model llama3.2-1b --seq-lens 8192,32768 \
  --steps 4 --warmup 2 --train.precision bf16 --json "$OUT/bench_train.json" 2>&1 | grep -vi warn \
  | tail -12 | tee "$OUT/bench_train.log"
timeout 240 python3 scripts/bench_train.py --device cuda --model llama3.2-1b --seq-lens 32768 \
  --steps 4 --warmup 2 --train.precision bf16 --train.compile true --json "$OUT/bench_train_compile.json" \
  2>&1 | grep -vi warn | tail -8 | tee "$OUT/bench_train_compile.log"
# MoE grouped expert compute (torch._grouped_mm on sm90 bf16) vs a dense GEMM of the same FLOPs
timeout 120 python3 scripts/bench_moe.py --device cuda --experts 8 16 32 64 128 2>&1 | tail -14 | tee "$OUT/bench_moe.log"
timeout 240 python3 -m torch.distributed.run --nproc_per_node 1 scripts/gpu_smoke.py --device cuda 2>&1 \
  | grep -vi warn | tee "$OUT/gpu_smoke.log" || true

# CUDA paths of the memory features (pinned offload copies on a side stream, tiles, GaLore's SVD)
timeout 120 python3 scripts/gpu_memory_check.py --device cuda 2>&1 | grep -v -i warn | tee "$OUT/gpu_memory_check.log"
# Memory (issue 12): offload overhead at 128K (full checkpointing + tiled MLP, offload off/on, same
# run), the planner's prediction next to the measured peak, then the longest sequence by bisection
for off in false true; do
  timeout 200 python3 scripts/bench_train.py --device cuda --model llama3.2-1b --probe 131072 --steps 2 --warmup 1 \
    --train.precision bf16 --memory.activation_checkpointing full --memory.tiled_mlp true \
    --memory.offload_activations $off 2>&1 | grep "probe:" | tee -a "$OUT/bench_memory.log"
done
python3 -m seqpar.plan --config configs/llama3.2-1b-long.yaml --data.seq_len 131072 --gpu-memory 141 2>&1 \
  | tail -20 | tee -a "$OUT/bench_memory.log"
timeout 420 python3 scripts/bench_train.py --device cuda --config configs/llama3.2-1b-long.yaml --longest \
  --seq-lens 262144 --granularity 131072 --max-len 1048576 --steps 1 --warmup 0 --json "$OUT/longest.json" 2>&1 \
  | tail -12 | tee -a "$OUT/bench_memory.log"

timeout 120 python3 scripts/gpu_selftest.py 2>&1 | tee "$OUT/selftest.log"
timeout 120 python3 scripts/bench_attention.py --seqlens 8192 32768 131072 --budget 0.5 2>&1 | tee "$OUT/bench_attention.log"
# the 1B shape's attention (d 64, GQA 32/8) packed into documents of 32K, 4K and 1K
for docs in 1 8 32; do
  timeout 60 python3 scripts/bench_attention.py --seqlens 32768 --heads 32 --kv-heads 8 --dim 64 --docs $docs \
    --budget 0.3 2>&1 | tee -a "$OUT/bench_attention.log"
done

# the default config on one GPU through the deepspeed launcher (nccl, bf16)
timeout 120 deepspeed --num_gpus 1 seqpar/train.py --config configs/tiny-cpu.yaml --train.precision bf16 \
  --train.max_steps 60 --logging.run_dir "$OUT/tiny" --logging.progress_bar false 2>&1 \
  | grep -vi warn | tail -15 | tee "$OUT/train_tiny.log"

# Llama-3.2-1B shape (tied 128K vocab), 8K tokens per step, random init: throughput and MFU
timeout 150 python3 seqpar/train.py --config configs/tiny-cpu.yaml --model.vocab_size 128256 \
  --model.hidden_size 2048 --model.intermediate_size 8192 --model.num_hidden_layers 16 \
  --model.num_attention_heads 32 --model.num_key_value_heads 8 --model.tie_word_embeddings true \
  --model.rope_theta 500000 --data.seq_len 8192 --data.passkey.eval_samples 0 --data.passkey.curriculum_samples 0 \
  --train.micro_batch_size 1 --train.global_batch_size 1 --train.precision bf16 \
  --train.max_steps 12 --train.warmup_steps 1 --logging.log_every 1 --logging.progress_bar false \
  --logging.run_dir "$OUT/b1" 2>&1 | grep -vi warn | tail -12 | tee "$OUT/train_1b.log"

# ZeRO-3 built partitioned (deepspeed.zero.Init) on CUDA, bf16: must train like ZeRO-2 does above
timeout 120 python3 seqpar/train.py --config configs/tiny-cpu.yaml --parallel.zero_stage 3 --train.precision bf16 \
  --train.max_steps 60 --logging.run_dir "$OUT/tiny_z3" --logging.progress_bar false 2>&1 \
  | grep -vi warn | tail -6 | tee "$OUT/train_tiny_z3.log"

# checkpoint costs with pinned-memory snapshots (the CPU numbers are in docs/benchmarks.md)
timeout 120 python3 scripts/bench_checkpoint.py --hidden 2048 --layers 8 --out /tmp/ckbench 2>&1 | tail -12 \
  | tee "$OUT/bench_checkpoint.log"

