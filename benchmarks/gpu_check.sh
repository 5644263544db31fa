#!/usr/bin/env bash
# GPU check (≤ 5 minutes on an H200): build with the CUDA sources, run the kernel tests (CUDA tests
# included), print the kernel table. Run from the repository root: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "== build (SNP_FAST_BUILD_CUDA=1, sm_90)"
time CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} SNP_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install --no-build-isolation -e . -q
"$PY" -c "import snp_fast.ops as o, torch; print('with_cuda', o.extension().with_cuda, 'device', torch.cuda.get_device_name()); print({op: o.available_backends(op, 'cuda') for op in ('qk_scores', 'redundancy_scores', 'gram', 'gather_slices')})"
echo "== kernel tests"
time timeout 180 "$PY" -m pytest tests/test_ops.py tests/test_qk_dxd.py -q -x -rs
echo "== kernel table"
time timeout 120 "$PY" benchmarks/ops_table.py --device cuda --repeats 5
echo "== ViT-L end to end (64 calibration images)"
time timeout 240 "$PY" benchmarks/prune_table.py --model vit_large_patch16_224 --images 64 --batch 64 --device cuda
