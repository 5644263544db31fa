#!/usr/bin/env bash
# GPU check (meant to fit in 5 minutes on an H200): build with the CUDA sources, run the GPU tests (every
# GPU kernel against its reference, and the whole prune on the GPU against the pure-Python version on
# the CPU), print the kernel table and the ViT-L prune with 64 calibration images.
# Run from the repository root: bash benchmarks/gpu_check.sh
# A failing step does not stop the later ones; the exit status says whether any failed. The tables are
# copied to $OUT when it is set (the device tool brings back what is written there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
failed=()
step() {  # step NAME COMMAND...: run, time, remember a failure
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  "$@" || failed+=("$name")
  echo "-- $name: $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import setuptools, torch, triton; print('setuptools', setuptools.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
step build env CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" SNP_FAST_BUILD_CUDA=1 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" -m pip install --no-build-isolation --no-deps -e . -q
"$PY" -c "import snp_fast.ops as o, torch; print('with_cuda', o.extension().with_cuda, 'device', torch.cuda.get_device_name()); print({op: o.available_backends(op, 'cuda') for op in ('qk_scores', 'redundancy_scores', 'gram', 'gather_slices')})"
step "GPU tests" timeout 150 "$PY" -m pytest tests/test_ops.py tests/test_qk_dxd.py tests/test_core.py -q -rs -k cuda
step "kernel table" timeout 90 "$PY" benchmarks/ops_table.py --device cuda --repeats 3
step "ViT-L, 64 images" timeout 150 "$PY" benchmarks/prune_table.py --model vit_large_patch16_224 --images 64 \
  --batch 64 --device cuda
[ -n "${OUT:-}" ] && cp -r benchmarks/results "$OUT/" 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
