#!/usr/bin/env bash
# Wheels for the lent GPU machine (no network there; torch, triton, transformers, peft and numpy are
# already installed): DeepSpeed (built here, pure Python), pydantic and its pieces, and the optional
# fused-kernel libraries seqpar uses on CUDA when installed (liger-kernel, cut-cross-entropy).
# Run on the CPU machine in the repo root; scripts/device_run.sh installs them from .whl/ there.
#
#   bash scripts/device_wheels.sh          # fills .whl/ (git-ignored through .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl

python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
# pydantic and pydantic-core must be a matching pair (pydantic's METADATA pins the core)
PY="$(python3 -c 'import pydantic; print(pydantic.VERSION)')"
CORE="$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl hjson "pydantic==$PY" "pydantic-core==$CORE" annotated-types typing-inspection "typing-extensions>=4.14"
# optional fused kernels (train.loss_impl auto picks them on CUDA when they import); a missing one
# is reported, not fatal: the torch paths run without them
for extra in liger-kernel cut-cross-entropy; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "$extra" || echo "device_wheels: $extra not available from the registry (optional, skipped)" >&2
done
ls -1 .whl
du -sh .whl | awk '{print "device_wheels: .whl holds " $1 " (a device call carries at most 64 MiB in all)"}'
