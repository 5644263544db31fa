"""The Triton Q/K scores kernel (snp_fast/ops/triton/qk_scores.py) against ops/reference.py, under
TRITON_INTERPRET=1 on the CPU (tests/conftest.py) or on a GPU where there is one.

Tolerance: the rule of tests/test_ops.py (check_qk): the kernel's error against the float64 literal
oracle may be at most twice that of the plain-PyTorch literal route in float32, plus 8 float32 ulps of
the largest score. The kernel computes in float64, so it is also held to the d×d reference
(reference.qk_scores_dxd, float64 d×d work): at most twice ITS error, plus the same floor.

Shapes are small enough for the interpreter, yet run every loop more than once: the Gram loop (N >
block_n = 16), the pivoted Cholesky (d steps), the Jacobi rounds (D − 1 per sweep) and sweeps (> 1).
"""
import os
import subprocess
import sys

import pytest
import torch

import snp_fast.ops as ops
from snp_fast.ops import dispatch, reference

pytestmark = pytest.mark.skipif(not dispatch._triton_ok(torch.device('cuda' if torch.cuda.is_available() else 'cpu')),
                                reason='Triton not available (nor its interpreter)')

from test_ops import EPS32, assert_close_verbose, check_qk, literal_all_gammas  # noqa: E402

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_qk(q, k, gamma, **kw):
    from snp_fast.ops.triton.qk_scores import qk_scores_triton
    return qk_scores_triton(q.to(DEV), k.to(DEV), gamma, **{'block_n': 16, **kw}).cpu()


def check(q, k, gammas, *, dxd=True, **kw):
    """check_qk's rule against the literal oracle, plus the d×d reference's own error (see the docstring)."""
    oracle = literal_all_gammas(q, k, torch.float64)
    for gamma in gammas:
        got = triton_qk(q, k, gamma, **kw)
        want = oracle(gamma)
        assert got.shape == (q.shape[1], q.shape[3]) and got.dtype == torch.float32 and torch.isfinite(got).all()
        floor = 8 * EPS32 * max(1.0, want.abs().max().item())
        lit32 = (literal_all_gammas(q, k, torch.float32)(gamma) - want).abs().max().item()
        assert_close_verbose(got, want, 2 * lit32 + floor, f'triton {tuple(q.shape)} gamma={gamma} vs literal')
        if dxd:
            dxd_err = (reference.qk_scores_dxd(q, k, gamma).double() - want).abs().max().item()
            assert_close_verbose(got, want, 2 * dxd_err + floor, f'triton {tuple(q.shape)} gamma={gamma} vs d×d')


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (B, H, N, d), gammas: γ = 1 and γ = d, odd d (padded to D), N < d, N = 1, D = 16 / 32 / 64
RANDOM = [
    ((2, 2, 50, 16), (1, 5, 16)),
    ((1, 2, 37, 13), (1, 13)),
    ((2, 1, 9, 24), (3, 24)),        # N < d
    ((3, 1, 1, 16), (1, 16)),        # N = 1
    pytest.param((1, 1, 70, 40), (1, 20, 40), marks=pytest.mark.slow),   # D = 64 (~20 s interpreted)
]


@pytest.mark.parametrize('shape,gammas', RANDOM, ids=['x'.join(map(str, s.values[0] if hasattr(s, 'values') else s[0]))
                                                      for s in RANDOM])
def test_triton_qk_random(shape, gammas):
    q = _rand(*shape, seed=sum(shape))
    k = _rand(*shape, seed=sum(shape) + 1) * 3 + 0.5
    check(q, k, gammas)


@pytest.mark.slow
def test_triton_qk_widest_heads():
    """d = 100 (padded to D = 128, the widest the kernel takes; on a GPU such heads go to the hybrid for now:
    MAX_D_GPU). One (image, head): the interpreter needs ~20 s for it."""
    from snp_fast.ops.triton.qk_scores import MAX_D_GPU
    if DEV == 'cuda' and MAX_D_GPU < 100:
        pytest.skip('d > MAX_D_GPU goes to the hybrid on a GPU')
    check(_rand(1, 1, 130, 100, seed=14), _rand(1, 1, 130, 100, seed=15), (50,))


def _repeated_sigma(n=40, d=16, seed=4):
    """Q = A diag(s), K = B diag(s) (A, B orthonormal): S = A diag(s²) Bᵀ with σ = s², repeated in clusters
    {0..3}, {4..9}. Within a cluster the singular vectors are any rotation, but as long as γ takes the whole
    cluster each filter's score (Σ_j cos²) does not depend on that choice: γ at cluster boundaries."""
    a = torch.linalg.qr(_rand(n, d, seed=seed).double())[0]
    b = torch.linalg.qr(_rand(n, d, seed=seed + 1).double())[0]
    s = torch.tensor([3.0] * 4 + [2.0] * 6 + [1.5, 1.2, 1.0, 0.8, 0.6, 0.5], dtype=torch.float64)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))  # clusters spread over the filters
    q, k = (a * s)[:, perm], (b * s)[:, perm]
    return q.float().expand(2, 1, n, d).contiguous(), k.float().expand(2, 1, n, d).contiguous()


def _ill_conditioned():
    g = lambda *s, seed: _rand(*s, seed=seed)  # noqa: E731
    q, k = g(2, 2, 40, 16, seed=1), g(2, 2, 40, 16, seed=2)
    dead = q.clone()
    dead[..., 3] = 0                           # a dead query filter
    dead[0, 1] = 0                             # a head whose queries are all zero
    dup = q.clone()
    dup[..., 8:] = dup[..., :8]                # Q of rank 8
    lowk = g(2, 2, 40, 3, seed=3) @ g(2, 2, 3, 16, seed=4)   # K of rank 3
    loud_q, loud_k = q.clone(), k.clone()
    loud_q[..., 0] *= 1e6                      # one loud query filter, loud keys in the others
    loud_k[..., 1:] *= 1e6
    rq, rk = _repeated_sigma()
    return {
        'rank_deficient_q': (dup, k, (1, 4, 8, 16)),
        'rank_deficient_k': (q, lowk, (1, 3, 16)),
        'dead_filters_and_head': (dead, k, (1, 8, 16)),
        'loud_filter_1e6': (loud_q, loud_k, (1, 8, 16)),
        'loud_filter_1e2': (q * torch.where(torch.arange(16) == 5, 100.0, 1.0), k, (2, 16)),
        'repeated_sigma': (rq, rk, (4, 10, 16)),
        'q_equals_k': (q, q, (1, 16)),
        'scaled_1e4': (q * 1e4, k * 1e-3, (4,)),
        'all_zero': (torch.zeros(1, 2, 20, 16), k[:1, :, :20], (1, 16)),
    }


@pytest.mark.parametrize('case', list(_ill_conditioned()))
def test_triton_qk_ill_conditioned(case):
    q, k, gammas = _ill_conditioned()[case]
    check(q, k, gammas)


def test_triton_qk_repeated_sigma_premise():
    """The repeated-σ case really has repeated singular values (and a loop over γ at the cluster
    boundaries gives the closed form: score 1 for each filter of a fully kept cluster)."""
    q, k = _repeated_sigma()
    s = torch.linalg.svdvals(q[0, 0].double() @ k[0, 0].double().t())[:16]
    assert torch.allclose(s[:4], torch.full((4,), 9.0, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(s[4:10], torch.full((6,), 4.0, dtype=torch.float64), rtol=1e-5)
    got = triton_qk(q, k, 10)
    want = torch.zeros(16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    want[torch.argsort(perm)[:10]] = 2.0        # 2 images, score 1 each
    assert_close_verbose(got, want, 1e-5, 'repeated sigma, closed form')


def test_triton_qk_low_precision_and_strided_inputs():
    """fp16 / bf16 inputs are read as they are; q, k sliced out of a qkv output (strided views)."""
    qkv = _rand(2, 33, 3, 2, 16, seed=9)                       # (B, N, 3, H, d)
    q, k = qkv[:, :, 0].permute(0, 2, 1, 3), qkv[:, :, 1].permute(0, 2, 1, 3)
    assert not q.is_contiguous()
    check(q, k, (1, 8))
    for dtype in (torch.float16, torch.bfloat16):
        check(q.to(dtype), k.to(dtype), (8,), dxd=False)


def test_triton_qk_gram_loop_blocking_does_not_matter():
    q, k = _rand(1, 2, 50, 16, seed=5), _rand(1, 2, 50, 16, seed=6)
    one, four = triton_qk(q, k, 8, block_n=64), triton_qk(q, k, 8, block_n=16)
    assert_close_verbose(one, four, 4 * EPS32 * one.abs().max().item(), 'block_n 64 vs 16')


def test_triton_qk_converges_in_a_few_sweeps():
    from snp_fast.ops.triton.qk_scores import MAX_SWEEPS, _launch
    q, k = _rand(2, 2, 50, 32, seed=7), _rand(2, 2, 50, 32, seed=8)
    _, sweeps = _launch(q.to(DEV), k.to(DEV), 16, block_n=16, max_sweeps=MAX_SWEEPS)
    assert sweeps.min() >= 2 and sweeps.max() < MAX_SWEEPS, sweeps   # converged, not capped


@pytest.mark.parametrize('max_sweeps', [1, 2])
def test_triton_qk_unconverged_kernel_is_caught(max_sweeps):
    """Mutation check: the kernel stopped after too few Jacobi sweeps must fail the tolerance."""
    q, k = _rand(1, 2, 40, 32, seed=10), _rand(1, 2, 40, 32, seed=11)
    with pytest.raises(AssertionError, match='entries off by more than'):
        check(q, k, (16,), max_sweeps=max_sweeps, dxd=False)


def test_triton_qk_wide_heads_fall_back():
    """d > MAX_D is not taken by the kernel: the compiled op (or the d×d reference) answers instead."""
    from snp_fast.ops.triton.qk_scores import MAX_D, qk_scores_triton
    q, k = _rand(1, 1, 6, MAX_D + 3, seed=12), _rand(1, 1, 6, MAX_D + 3, seed=13)
    check_qk(q, k, (2,), 'reference')  # (the oracle itself is sane here)
    got = qk_scores_triton(q, k, 2)
    want = literal_all_gammas(q, k, torch.float64)(2)
    assert_close_verbose(got, want, 1e-4, 'wide heads')


def test_triton_qk_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match='gamma'):
        triton_qk(q, q, 0)
    with pytest.raises(ValueError, match='equal shapes'):
        triton_qk(q, q[..., :4], 2)
    bad = q.clone()
    bad[0, 1, 2, 3] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'):
        triton_qk(q, bad, 2)
    assert triton_qk(torch.randn(1, 2, 5, 0), torch.randn(1, 2, 5, 0), 1).shape == (2, 0)
    assert torch.equal(triton_qk(torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8), 1), torch.zeros(2, 8))


def test_auto_takes_triton_for_qk_scores_on_cuda():
    """backend="auto" on a CUDA tensor: the Triton kernel first, the compiled hybrid next (a fallback);
    every other op and every CPU choice as before."""
    if not dispatch._triton_ok(torch.device('cuda')):
        pytest.skip('triton not importable')
    assert dispatch.resolve('qk_scores', 'auto', 'cuda') is dispatch._TABLE['qk_scores']['triton']
    assert dispatch.resolve('qk_scores', 'auto', 'cpu') is not dispatch._TABLE['qk_scores']['triton']
    assert 'triton' not in ops.available_backends('qk_scores', 'cpu')   # (the interpreter: far too slow)
    assert 'triton' in ops.available_backends('qk_scores', 'cuda')
    with ops.prefer('compiled'):
        want = 'compiled' if ops.has_kernel('qk_scores', 'CUDA') else 'triton'
        assert dispatch.resolve('qk_scores', 'auto', 'cuda') is dispatch._TABLE['qk_scores'][want]


_AOT = r'''
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from snp_fast.ops.triton import qk_scores as m
D, warps = int(sys.argv[1]), int(sys.argv[2])
sig = dict.fromkeys(['H', 'N', 'd', 'gamma', 'sq_b', 'sq_h', 'sq_n', 'sq_d', 'sk_b', 'sk_h', 'sk_n', 'sk_d'], 'i32')
sig = {'q_ptr': '*fp32', 'k_ptr': '*fp32', 'out_ptr': '*fp64', 'sweeps_ptr': '*i32', **sig}
const = dict(D=D, BLOCK_N=32, MAX_SWEEPS=m.MAX_SWEEPS, JACOBI_TOL=m.JACOBI_TOL, PIVOT_RTOL=m.PIVOT_RTOL,
             SIGMA2_RTOL=m.SIGMA2_RTOL, LR_STEPS=m.LR_STEPS, LR_RTOL=m.LR_RTOL)
sig.update(dict.fromkeys(const, 'constexpr'))
k = triton.compile(ASTSource(fn=m._qk_scores_kernel, signature=sig, constexprs=const),
                   target=GPUTarget('cuda', 90, 32), options={'num_warps': warps})
print('shared', k.metadata.shared)
'''


@pytest.mark.parametrize('D', [16, pytest.param(64, marks=pytest.mark.slow)])
def test_triton_qk_compiles_for_sm90(D):
    """What the interpreter cannot show: the kernel compiles for an H100/H200 (sm_90, no GPU needed) and fits
    its 227 KiB of shared memory."""
    from snp_fast.ops.triton.qk_scores import num_warps
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = ROOT
    r = subprocess.run([sys.executable, '-c', _AOT, str(D), str(num_warps(D))], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0 and ('ptxas' in r.stderr and 'not found' in r.stderr):
        pytest.skip('no ptxas')
    assert r.returncode == 0, r.stderr[-3000:]
    shared = int(r.stdout.split()[-1])
    assert shared <= 227 * 1024, shared


def test_triton_qk_falls_back_where_the_kernel_does_not_fit(monkeypatch):
    """A GPU with less shared memory per block than the kernel needs: the compiled op (or the d×d
    reference) answers, with a warning once."""
    from triton.runtime.errors import OutOfResources
    from snp_fast.ops.triton import qk_scores as mod

    def no_room(*a, **kw):
        raise OutOfResources(131072, 101376, 'shared memory')
    monkeypatch.setattr(mod, '_launch', no_room)
    monkeypatch.setattr(mod, '_warned', set())
    q, k = _rand(2, 2, 9, 16, seed=16), _rand(2, 2, 9, 16, seed=17)
    with pytest.warns(UserWarning, match='does not fit this GPU'):
        got = mod.qk_scores_triton(q.to(DEV), k.to(DEV), 4).cpu()
    assert_close_verbose(got, literal_all_gammas(q, k, torch.float64)(4), 1e-5, 'fallback')
