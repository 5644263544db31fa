#!/usr/bin/env bash
# Build checks beyond the editable install:
#  1. CMakeLists.txt builds the same csrc/ sources into a loadable snp_fast._C (CPU sources here: the
#     CUDA sources are compiled by `make setup` already);
#  2. `pip wheel --no-build-isolation .` gives a wheel that carries the extension, and that wheel,
#     installed into a fresh venv, imports and runs an op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cmake -S . -B "$tmp/cmake" -DSNP_FAST_BUILD_CUDA=OFF -DPython3_EXECUTABLE="$PY" > "$tmp/cmake.log" 2>&1 \
  && cmake --build "$tmp/cmake" -j2 >> "$tmp/cmake.log" 2>&1 || { tail -40 "$tmp/cmake.log"; exit 1; }
"$PY" - "$tmp/cmake" <<'PYEOF'
import glob, importlib.util, sys, torch
path = glob.glob(sys.argv[1] + '/_C*.so')[0]
spec = importlib.util.spec_from_file_location('snp_fast._C', path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
x = torch.randn(40, 300)
assert torch.allclose(torch.ops.snp_fast.gram(x), x.t() @ x, atol=1e-3), 'cmake build: gram differs from xᵀx'
w = torch.randn(5, 4)
out = torch.ops.snp_fast.gather_slices([w], [0], [torch.tensor([4, 1])], [1], [None])
assert torch.equal(out[0], w[[4, 1]])
print('cmake build ok:', path, 'BLAS symbols found:', mod.blas())
PYEOF

SNP_FAST_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$tmp/wheels" > "$tmp/wheel.log" 2>&1 \
  || { tail -40 "$tmp/wheel.log"; exit 1; }
whl=$(ls "$tmp"/wheels/snp_fast-*.whl)
"$PY" -m zipfile -l "$whl" > "$tmp/wheel_files.txt"  # not piped into grep -q: an early exit breaks the pipe
grep -q 'snp_fast/_C' "$tmp/wheel_files.txt" || { echo "wheel has no compiled extension: $whl"; exit 1; }
# a fresh venv that borrows torch & co. from the dev venv (a .pth line) but gets snp_fast only from the wheel
python3 -m venv "$tmp/venv"
site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/dev_venv.pth"
"$tmp/venv/bin/python" -m pip install -q --no-deps "$whl"
(cd "$tmp" && "$tmp/venv/bin/python" - <<'PYEOF'
import os, sys, torch, snp_fast, snp_fast._C
assert snp_fast.__file__.startswith(sys.prefix), snp_fast.__file__
from snp_fast import ops
assert 'compiled' in ops.available_backends('gather_slices', 'cpu')
assert len(snp_fast.families.families()) == 4  # every family folder travels with the wheel
assert len(snp_fast.list_presets()) >= 7, snp_fast.list_presets()  # the package data travels with the wheel
from snp_fast.demo import load_digits_vit, load_faces_vit
load_digits_vit(), load_faces_vit()
print('wheel ok:', os.path.relpath(snp_fast._C.__file__, sys.prefix), 'presets:', len(snp_fast.list_presets()))
PYEOF
)
