#!/usr/bin/env bash
# GPU check, meant to take ~5 minutes on an H200 (each step has a time limit; 10.3 minutes at worst):
# build with the CUDA sources, run the GPU tests (every GPU kernel against its reference, the Triton Q/K
# kernel's tests on the GPU, and the whole prune on the GPU against the pure-Python version on the CPU),
# print the kernel table (one shape per op), the Q/K scores of one ViT-L block (64 images: Triton kernel
# against the hybrid) and the ViT-L prune with 64 calibration images.
# Run from the repository root: bash benchmarks/gpu_check.sh
# A failing step does not stop the later ones; the exit status says whether any failed. When $OUT is set
# (the device tool brings back what is written there) the whole log goes to $OUT/gpu_check.log and the
# result tables are copied there after every step, so a run stopped from outside still returns them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -n "${OUT:-}" ]; then
  exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
failed=()
save() { [ -n "${OUT:-}" ] && [ -d benchmarks/results ] && cp benchmarks/results/*_cuda.md "$OUT/" 2>/dev/null; true; }
step() {  # step NAME SECONDS COMMAND...: run under a time limit, time it, remember a failure, save tables
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s, ${SECONDS} s so far)"
  local t0=$SECONDS
  timeout "$limit" "$@" || failed+=("$name")
  echo "-- $name: $((SECONDS - t0)) s"
  save
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
# in place (no install into the interpreter's site-packages, which may not be writable); the CUDA
# toolkit from CUDA_HOME, else /usr/local/cuda, else the nvcc on the PATH
cuda_home=${CUDA_HOME:-/usr/local/cuda}
[ -x "$cuda_home/bin/nvcc" ] || cuda_home=$(dirname "$(dirname "$(command -v nvcc || echo "$cuda_home/bin/nvcc")")")
step build 200 env CUDA_HOME="$cuda_home" SNP_FAST_BUILD_CUDA=1 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" setup.py -q build_ext --inplace
"$PY" -c "import snp_fast.ops as o, torch; print('with_cuda', o.extension().with_cuda, 'device', torch.cuda.get_device_name()); print({op: o.available_backends(op, 'cuda') for op in ('qk_scores', 'redundancy_scores', 'gram', 'gather_slices')})"
step "GPU tests" 120 "$PY" -m pytest tests/test_ops.py tests/test_qk_dxd.py tests/test_core.py -q -rs -k cuda
step "Triton Q/K tests" 60 "$PY" -m pytest tests/test_ops_qk_triton.py -q -rs
step "kernel table" 60 "$PY" benchmarks/ops_table.py --device cuda --repeats 3 --quick
step "Q/K scores, ViT-L block, 64 images" 60 "$PY" benchmarks/qk_scores_gpu.py --images 64 --repeats 5
step "ViT-L, 64 images" 120 "$PY" benchmarks/prune_table.py --model vit_large_patch16_224 --images 64 \
  --batch 64 --device cuda
echo "total: ${SECONDS} s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
