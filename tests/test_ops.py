"""Kernel tests: every backend available here against a float64 oracle (snp_fast/ops/reference.py).

Tolerance rule (flash-attention's): a kernel's error against the float64 oracle may be at most twice
the error of the plain-PyTorch reference at the same input precision, plus a floor of a few float32
ulps of the output (the kernels return float32, so even an exact kernel is off by its rounding).
CUDA tests are skipped without a GPU; Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py)
on small shapes.
"""
import itertools

import pytest
import torch

import snp_fast.ops as ops
from snp_fast.ops import reference

CPU_BACKENDS = [b for b in ('compiled', 'triton') if b in ops.available_backends('redundancy_scores', 'cpu')]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
EPS32 = torch.finfo(torch.float32).eps


def assert_close_verbose(actual, expected, tol, what=''):
    """Max-abs check that prints the first mismatches (index, actual, expected) when it fails."""
    err = (actual.double() - expected.double()).abs()
    bad = err > tol
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [f'  {tuple(i)}: got {actual[tuple(i)].item():.8g}, want {expected[tuple(i)].item():.8g}' for i in idx]
        raise AssertionError(f'{what}: {int(bad.sum())} of {err.numel()} entries off by more than {tol:.3g} '
                             f'(max {err.max().item():.3g}); first:\n' + '\n'.join(rows))


def backends_for(op, device='cpu'):
    return [b for b in ops.available_backends(op, device) if b != 'reference']


def qk_routes():
    """The qk_scores backends here, plus 'hybrid': snp_fast::qk_scores_hybrid, the CUDA implementation's
    code path (Grams where q, k are, the d×d half by the CPU kernel), run here on CPU tensors. The Triton
    kernel is left to tests/test_ops_qk_triton.py (the same checks, on shapes the interpreter can run)."""
    routes = [b for b in backends_for('qk_scores') if b != 'triton']
    if ops.extension() is not None and hasattr(torch.ops.snp_fast, 'qk_scores_hybrid'):
        routes.append('hybrid')
    return routes


def run_qk(q, k, gamma, route):
    if route == 'hybrid':
        return torch.ops.snp_fast.qk_scores_hybrid(q, k, gamma)
    if route == 'dxd':  # the d×d route in ATen ops (an op of its own, not a backend)
        return torch.ops.snp_fast.qk_scores_dxd(q, k, gamma)
    if route == 'reference dxd':
        return reference.qk_scores_dxd(q, k, gamma)
    return ops.qk_scores(q, k, gamma, backend=route)


def qk_all_routes():
    """Every implementation of the scores here: the backends, the hybrid, both d×d routes."""
    extra = ['dxd'] if ops.extension() is not None and hasattr(torch.ops.snp_fast, 'qk_scores_dxd') else []
    return qk_routes() + extra + ['reference dxd']


# --- qk_scores ------------------------------------------------------------------------------------
def literal_all_gammas(q, k, dtype):
    """qk_scores_literal (the N×N formula of reference.py) for every gamma from one SVD: returns
    gamma -> (H, d) float64 scores. In float64 it is the oracle, but with the float32 threshold
    (σ_j > 1e-4 σ_1) that the kernels implement; in float32 it is the plain-PyTorch error baseline."""
    qc, kc = q.to(dtype), k.to(dtype)
    u, s, vh = torch.linalg.svd(qc @ kc.transpose(-1, -2), full_matrices=False)
    rel = s / s[..., :1].clamp_min(torch.finfo(dtype).tiny)
    if dtype == torch.float64:  # a σ_j within 1% of the threshold would make the case ambiguous
        assert not ((rel > 0.99e-4) & (rel < 1.01e-4)).any(), 'test case has a singular value at the threshold'
    valid = s > s[..., :1] * reference.singular_value_rtol(torch.float32)
    zero = torch.zeros((), dtype=dtype)
    qn, kn = qc.norm(dim=-2).unsqueeze(-2), kc.norm(dim=-2).unsqueeze(-2)
    cu = torch.where(qn > 0, (u.transpose(-1, -2) @ qc) / qn.clamp_min(torch.finfo(dtype).tiny), zero)
    cv = torch.where(kn > 0, (vh @ kc) / kn.clamp_min(torch.finfo(dtype).tiny), zero)
    terms = (cu * cv).abs() * valid.unsqueeze(-1)                    # (B, H, min(N, N), d)
    return lambda gamma: terms[..., :gamma, :].sum(-2).sum(0).double()


def qk_oracle(q, k, gamma):
    return literal_all_gammas(q, k, torch.float64)(gamma)


def check_qk(q, k, gammas, backend):
    oracle, plain = literal_all_gammas(q, k, torch.float64), literal_all_gammas(q, k, torch.float32)
    for gamma in gammas:
        want = oracle(gamma)
        got = run_qk(q, k, gamma, backend)
        assert got.shape == (q.shape[1], q.shape[3]) and got.dtype == torch.float32
        assert torch.isfinite(got).all()
        torch_err = (plain(gamma) - want).abs().max().item()
        tol = 2 * torch_err + 8 * EPS32 * max(1.0, want.abs().max().item())
        assert_close_verbose(got, want, tol, f'qk_scores[{backend}] {tuple(q.shape)} gamma={gamma} {q.dtype}')


QK_SHAPES = [  # (B, H, N, d): every head dim, N = 1, 7, 50, 197 (577 for the widest heads)
    (b, h, n, d) for (d, n), (b, h) in zip(itertools.product((16, 32, 48, 64, 80, 96, 128), (1, 7, 50, 197)),
                                            itertools.cycle([(1, 2), (3, 1), (2, 2), (8, 1)]))
] + [(1, 1, 577, 64), (1, 1, 577, 128)]


@pytest.mark.parametrize('backend', qk_routes() or ['compiled'])
@pytest.mark.parametrize('shape', QK_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_qk_scores_random(backend, shape):
    if backend not in qk_routes():
        pytest.skip(f'{backend} not available')
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    q = torch.randn(shape, generator=gen)
    k = torch.randn(shape, generator=gen) * 3 + 0.5
    check_qk(q, k, sorted({1, d // 2, d, 10 * d}), backend)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_qk_scores_low_precision_inputs(dtype):
    for backend in qk_routes():
        for shape in [(2, 2, 50, 32), (1, 3, 197, 64)]:
            q = torch.randn(shape).to(dtype)
            k = torch.randn(shape).to(dtype)
            check_qk(q, k, [shape[-1] // 2], backend)


def _degenerate_cases():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = r(2, 2, 60, 32)
    k = r(2, 2, 60, 32)
    zq, zk = q.clone(), k.clone()
    zq[..., 3] = 0                      # dead query filter
    zk[..., 5] = 0                      # dead key filter
    zq[0, 1] = 0                        # a head whose queries are all zero
    dup = q.clone()
    dup[..., 16:] = dup[..., :16]       # exactly rank 16
    low = r(2, 2, 60, 4) @ r(2, 2, 4, 32)  # rank 4 (up to float32 rounding)
    return {
        'zero_filters': (zq, zk),
        'duplicate_columns': (dup, k),
        'low_rank_both': (low, r(2, 2, 60, 6) @ r(2, 2, 6, 32)),
        'q_equals_k': (q, q),
        'n_less_than_d': (r(2, 2, 5, 48), r(2, 2, 5, 48)),
        'n_equals_1': (r(3, 2, 1, 16), r(3, 2, 1, 16)),
        'all_zero': (torch.zeros(1, 2, 9, 16), r(1, 2, 9, 16)),
        'scaled_1e4': (q * 1e4, k * 1e-3),
    }


@pytest.mark.parametrize('case', list(_degenerate_cases()))
def test_qk_scores_degenerate(case):
    q, k = _degenerate_cases()[case]
    for backend in qk_routes():
        check_qk(q, k, (1, 4, q.shape[-1]), backend)


@pytest.mark.parametrize('scale', [1e2, 1e4, 1e6])
def test_qk_scores_unequal_filter_scales(scale):
    """One query filter far louder than the rest and the keys loud in the other filters: every rank-1 term
    of QKᵀ stays comparable, so no direction may be dropped as rounding. (Cutting the pivoted Cholesky or
    the Gram roots' eigenvalues relative to the loudest filter, not to each filter's own norm, lost most of
    the scores here: at 1e2 for the d×d routes, at 1e6 for the CPU kernel.)"""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 128, 64, generator=gen), torch.randn(2, 2, 128, 64, generator=gen)
    q[..., 0] *= scale
    k[..., 1:] *= scale
    for route in qk_all_routes():
        check_qk(q, k, (8, 32), route)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_qk_scores_non_finite_inputs(bad):
    """A NaN or Inf in q or k is an error that says so, never an (image, head) silently left out."""
    q, k = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    q[1, 0, 3, 2] = bad
    for route in qk_all_routes() + ['reference']:
        for a, b in ((q, k), (k, q)):
            with pytest.raises((RuntimeError, ValueError), match='NaN or Inf'):
                run_qk(a, b, 4, route)


@pytest.mark.skipif(ops.dispatch.extension() is None, reason='compiled extension not built')
def test_qk_scores_cpu_without_blas_and_strided_inputs():
    """The CPU kernel forms its Grams by torch's BLAS dsyrk and its d×d products by dgemm when found, else
    by batched GEMM and plain loops: both equal the oracle, also for float64 inputs that are strided views
    (as q, k sliced out of a qkv output are)."""
    from snp_fast import _C
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(3, 50, 3, 2, 32, generator=gen, dtype=torch.float64)   # (B, N, 3, H, d)
    q, k = qkv[:, :, 0].permute(0, 2, 1, 3), qkv[:, :, 1].permute(0, 2, 1, 3)
    cases = [(q, k), (q.float(), k.float()), *[(c[0], c[1]) for c in list(_degenerate_cases().values())[:4]]]
    try:
        for enabled in (True, False):
            _C.blas(enabled)
            for qc, kc in cases:
                check_qk(qc, kc, (1, qc.shape[-1] // 2), 'compiled')
    finally:
        _C.blas(True)


def test_qk_scores_helpers_match_reference():
    q, k = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    want = qk_oracle(q, k, 8)
    assert_close_verbose(reference.qk_scores_literal(q, k, 8), want, 1e-4, 'qk_scores_literal')
    assert_close_verbose(reference.qk_scores_dxd(q, k, 8), want, 1e-4, 'qk_scores_dxd')
    assert_close_verbose(literal_all_gammas(q, k, torch.float32)(8), reference.qk_scores_literal(q, k, 8), 1e-6, 'helper')


def test_qk_scores_errors():
    q = torch.randn(1, 2, 5, 8)
    for backend in qk_routes():
        with pytest.raises((RuntimeError, ValueError), match='gamma'):
            run_qk(q, q, 0, backend)
        with pytest.raises((RuntimeError, ValueError), match='equal shapes'):
            run_qk(q, q[..., :4], 2, backend)


# --- redundancy_scores ----------------------------------------------------------------------------
def redundancy_oracle(w):
    w = w.double()
    n = w.norm(dim=1)
    wn = torch.where(n[:, None] > 0, w / n.clamp_min(1e-300)[:, None], torch.zeros_like(w))
    om = w.shape[0] - (wn @ wn.t()).abs().sum(1)
    return torch.where(n > 0, om, torch.zeros_like(om))


def check_redundancy(w, backend, precision='fp32'):
    """precision="bf16": the scores of the rows rounded to bfloat16 (products exact in fp32, fp32 sums),
    against the oracle on those rounded rows."""
    src = w.to(torch.bfloat16) if precision == 'bf16' else w
    want = redundancy_oracle(src)
    got = ops.redundancy_scores(w, backend=backend, precision=precision)
    assert got.shape == (w.shape[0],) and got.dtype == torch.float32
    torch_err = (reference.redundancy_scores_full(src) - want).abs().max().item()
    tol = 2 * torch_err + 4 * EPS32 * w.shape[0]
    assert_close_verbose(got, want, tol, f'redundancy_scores[{backend}, {precision}] {tuple(w.shape)} {w.dtype}')


# (130, 300): within the Triton interpreter's budget, and more columns than its BLOCK_K (128): the K loop runs 3 times
RED_SHAPES = [(1, 1), (1, 5), (2, 3), (7, 3), (13, 1), (31, 64), (130, 300), (300, 64), (1023, 77), (1024, 256),
              (2053, 37)]


@pytest.mark.parametrize('precision', ops.PRECISIONS)
@pytest.mark.parametrize('backend', backends_for('redundancy_scores') or ['compiled'])
@pytest.mark.parametrize('shape', RED_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_redundancy_random(backend, shape, precision):
    if backend not in ops.available_backends('redundancy_scores', 'cpu'):
        pytest.skip(f'{backend} not available')
    if backend == 'triton' and shape[0] * shape[1] > 100_000:
        pytest.skip('the Triton interpreter is slow: small shapes only')
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    w = torch.randn(shape, generator=g)
    if shape[0] > 2:
        w[1] = 0                        # dead filter: score 0
        w[2] = -3 * w[0]                # exactly collinear pair: |cos| = 1
    check_redundancy(w, backend, precision)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_redundancy_low_precision(dtype):
    w = torch.randn(257, 96).to(dtype)
    for backend in backends_for('redundancy_scores'):
        check_redundancy(w, backend)


@pytest.mark.skipif(ops.dispatch.extension() is None, reason='compiled extension not built')
def test_redundancy_cpu_without_blas_syrk():
    """The CPU kernel's diagonal tiles go through torch's BLAS syrk when found (one triangle, both sums
    from it), through full GEMM tiles otherwise: both equal the oracle, one tile or several."""
    from snp_fast import _C
    try:
        for enabled in (True, False):
            _C.blas(enabled)  # (bf16: MKL's bf16 GEMM, or the fp32 route on the rounded rows)
            for shape in [(2, 3), (200, 33), (1023, 77), (2053, 37)]:
                w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
                w[1] = 0
                for precision in ops.PRECISIONS:
                    check_redundancy(w, 'compiled', precision)
    finally:
        _C.blas(True)


@pytest.mark.parametrize('n', [300, 1500])  # one tile / several
def test_redundancy_extreme_row_norms(n):
    """Rows of norm ~1e30 or ~1e-30 would overflow / go subnormal in fp32 products of the raw rows: the
    CPU kernel then multiplies normalised rows instead; both routes equal the oracle."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 40, generator=g)
    for scale in (1e30, 1e-30, 2.0 ** 39):
        v = w.clone()
        v[3::7] *= scale
        for backend in backends_for('redundancy_scores'):
            if backend == 'triton' and n > 300:
                continue
            for precision in ops.PRECISIONS:
                check_redundancy(v, backend, precision)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=requires_cuda)])
@pytest.mark.parametrize('n', [6, 1500])  # one tile / several
def test_redundancy_rows_whose_inverse_norm_is_not_a_normal_float(n, device):
    """‖w_i‖ < 2.9e-39 makes 1/‖w_i‖ overflow float32 (it once turned every score into NaN), ‖w_i‖ ~ 1e37
    makes it subnormal. A fixed tolerance, the reference included: check_redundancy's tolerance scales with
    the reference's own error, which is what let a reference with float32 norms pass such rows."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 5, generator=g)
    for scale in (3e-40, 1e37):
        v = w.clone()
        v[1::3] *= scale
        for precision in ops.PRECISIONS:
            want = redundancy_oracle(v.to(torch.bfloat16) if precision == 'bf16' else v)
            for backend in ['reference'] + backends_for('redundancy_scores', device):
                if backend == 'triton' and n > 300 and device == 'cpu':
                    continue
                got = ops.redundancy_scores(v.to(device), backend=backend, precision=precision).cpu()
                assert_close_verbose(got, want, 16 * EPS32 * n, f'redundancy_scores[{backend}, {precision}] x{scale}')


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
@pytest.mark.parametrize('n', [6, 1500])  # one tile / several
def test_redundancy_non_finite_rows(bad, n):
    w = torch.randn(n, 4)
    w[2, 1] = bad
    for backend in ['reference'] + backends_for('redundancy_scores'):
        with pytest.raises((RuntimeError, ValueError), match='NaN or Inf'):
            ops.redundancy_scores(w, backend=backend)


@pytest.mark.skipif(ops.dispatch.extension() is None, reason='compiled extension not built')
def test_cpu_kernels_keep_the_callers_grad_and_inference_mode():
    """at::parallel_for does not carry grad mode or inference mode to its worker threads: the kernels that
    call ATen ops there must still take a Parameter under no_grad and tensors made in inference_mode
    (2 threads; several redundancy tiles, several tensors to slice)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(5)
        w = torch.nn.Parameter(torch.randn(1100, 16, generator=gen))
        ts = [torch.nn.Parameter(torch.randn(8, 6, generator=gen)) for _ in range(4)]
        sl = [[(0, torch.tensor([1, 5]))], [(1, torch.tensor([0, 2, 3]))]] * 2
        want_w = reference.redundancy_scores_full(w.detach())
        want_g = reference.gather_slices_loop([t.detach() for t in ts], sl)
        with torch.no_grad():
            got_w, got_g = ops.redundancy_scores(w, backend='compiled'), ops.gather_slices(ts, sl, backend='compiled')
        with torch.inference_mode():
            inf_w = ops.redundancy_scores(w.detach().clone(), backend='compiled')
            inf_g = ops.gather_slices([t.detach().clone() for t in ts], sl, backend='compiled')
        for got in (got_w, inf_w):
            torch.testing.assert_close(got, want_w, rtol=1e-5, atol=1e-3)
        for got in (got_g, inf_g):
            assert all(torch.equal(a, b) for a, b in zip(got, want_g))
    finally:
        torch.set_num_threads(threads)


def test_redundancy_all_zero():
    for backend in backends_for('redundancy_scores'):
        assert ops.redundancy_scores(torch.zeros(5, 4), backend=backend).eq(0).all()


# --- gram -----------------------------------------------------------------------------------------
# (260, 150): within the Triton interpreter's budget, with more tokens than its BLOCK_T (128) and 2 × 2 tiles
GRAM_SHAPES = [(1, 1), (3, 2), (5, 300), (1, 513), (260, 150), (257, 700), (1000, 1023), (64, 1031), (37, 2309)]


def check_gram(x, backend, precision='fp32'):
    """precision="bf16": the Gram of x rounded to bfloat16, against the oracle on the rounded x."""
    src = x.to(torch.bfloat16) if precision == 'bf16' else x
    want = src.double().t() @ src.double()
    got = ops.gram(x, backend=backend, precision=precision)
    assert got.shape == (x.shape[1], x.shape[1]) and got.dtype == torch.float32
    torch_err = (reference.gram_full(src) - want).abs().max().item()
    tol = 2 * torch_err + 4 * EPS32 * want.abs().max().item()
    assert_close_verbose(got, want, tol, f'gram[{backend}, {precision}] {tuple(x.shape)} {x.dtype}')
    assert torch.equal(got, got.t()), f'gram[{backend}, {precision}] {tuple(x.shape)}: result is not exactly symmetric'


@pytest.mark.parametrize('precision', ops.PRECISIONS)
@pytest.mark.parametrize('backend', backends_for('gram') or ['compiled'])
@pytest.mark.parametrize('shape', GRAM_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_gram_random(backend, shape, precision):
    if backend not in ops.available_backends('gram', 'cpu'):
        pytest.skip(f'{backend} not available')
    if backend == 'triton' and shape[0] * shape[1] ** 2 > 2e7:
        pytest.skip('the Triton interpreter is slow: small shapes only')
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    x = torch.randn(shape, generator=g)
    x[:, shape[1] // 2] = 0
    check_gram(x, backend, precision)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_gram_low_precision_and_accumulate(dtype):
    x = torch.randn(100, 300).to(dtype)
    for backend in backends_for('gram'):
        check_gram(x, backend)
        acc = torch.ones(300, 300)
        ops.gram(x, out=acc, backend=backend)
        assert_close_verbose(acc, 1 + x.double().t() @ x.double(), 1e-3, f'gram out= [{backend}]')


@pytest.mark.skipif(ops.dispatch.extension() is None, reason='compiled extension not built')
def test_gram_cpu_blas_syrk_and_fallback():
    """The CPU kernel calls torch's BLAS syrk when the build exports one (MKL on x86_64) and falls back
    to GEMM panels otherwise: both paths equal the reference."""
    from snp_fast import _C
    names = _C.blas()
    if torch.backends.mkl.is_available():
        assert names == {'ssyrk': 'mkl_blas_ssyrk', 'dsyrk': 'mkl_blas_dsyrk', 'dgemm': 'mkl_blas_dgemm',
                         'dpotrf': 'dpotrf_', 'dpotrs': 'dpotrs_', 'gemm_bf16': 'cblas_gemm_bf16bf16f32'}
    try:
        assert _C.blas(False) == dict.fromkeys(names, '')
        for shape in GRAM_SHAPES:
            x = torch.randn(shape)
            for precision in ops.PRECISIONS:  # (bf16: MKL's bf16 GEMM, or the fp32 routes on the rounded x)
                check_gram(x, 'compiled', precision)
    finally:
        _C.blas(True)
    assert _C.blas() == names


def _spd(n, cond_exp, gen):
    """A random symmetric positive definite float64 matrix with eigenvalues from 1 down to 10^-cond_exp."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (q * torch.logspace(0, -cond_exp, n, dtype=torch.float64)) @ q.t()


CHOLESKY_ROUTES = ['reference'] + (['compiled-lapack', 'compiled-aten'] if ops.has_kernel('cholesky_solve_', 'CPU') else [])


@pytest.mark.parametrize('route', CHOLESKY_ROUTES)
def test_cholesky_solve_inplace(route):
    """The re-fit's in-place solve through ops.cholesky_solve_ (the compiled kernel: LAPACK without layout
    copies, or ATen without the symbols; the torch.linalg reference) against torch.linalg.solve on random
    SPD systems, odd sizes and no right-hand sides included; a matrix that is not positive definite gives
    the order of the failing minor, as LAPACK's info. refit.cholesky_solve_ is the same op."""
    from snp_fast import refit
    backend, lapack = route.split('-')[0], route.endswith('lapack')
    gen = torch.Generator().manual_seed(0)
    _C = ops.extension()
    try:
        if _C is not None:
            _C.blas(lapack or backend == 'reference')
        for n, m in [(1, 1), (2, 5), (7, 3), (33, 0), (129, 50), (513, 17)]:
            a = _spd(n, 6, gen)
            b = torch.randn(m, n, dtype=torch.float64, generator=gen)
            want = torch.linalg.solve(a, b.t()).t()
            chol = torch.linalg.cholesky(a)
            fa, fb = a.clone(), b.clone()
            assert ops.cholesky_solve_(fa, fb, backend=backend) == 0
            if m:  # backward-stable solve: residual at float64 rounding of ‖a‖‖x‖
                assert (fb @ a - b).abs().max() <= 1e3 * n * 2 ** -52 * max(1.0, float(fb.abs().max()))
                assert_close_verbose(fb, want, 1e-6 * float(want.abs().max().clamp_min(1)), f'solve n={n} m={m}')
            if lapack:  # (LAPACK leaves the factor in a's lower triangle; ATen's route uses a copy)
                assert_close_verbose(fa.tril(), chol, 1e-10, f'factor n={n}')
            if backend == 'reference':
                assert torch.equal(fa, a)
            if backend == ('compiled' if ops.has_kernel('cholesky_solve_', 'CPU') else 'reference'):
                ra, rb = a.clone(), b.clone()  # refit's function: the same op, bit for bit ("auto" on a CPU tensor)
                assert refit.cholesky_solve_(ra, rb) == 0 and torch.equal(rb, fb)
        for k in (1, 4):  # the k-th leading minor is the first that is not positive definite
            a = torch.eye(6, dtype=torch.float64)
            a[k - 1, k - 1] = -1
            assert ops.cholesky_solve_(a, torch.zeros(2, 6, dtype=torch.float64), backend=backend) == k
    finally:
        if _C is not None:
            _C.blas(True)


def test_cholesky_solve_auto_takes_the_compiled_kernel_on_cpu():
    want = 'compiled' if ops.has_kernel('cholesky_solve_', 'CPU') else 'reference'
    assert ops.dispatch.resolve('cholesky_solve_', 'auto', 'cpu') is ops.dispatch._TABLE['cholesky_solve_'][want]


@pytest.mark.skipif(ops.dispatch.extension() is None, reason='compiled extension not built')
def test_cholesky_solve_inplace_rejects_bad_input():
    f = torch.ops.snp_fast.cholesky_solve_
    a64, b64 = torch.eye(4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match='float64'):
        f(a64.float(), b64)
    with pytest.raises(RuntimeError, match='square'):
        f(torch.ones(4, 3, dtype=torch.float64), b64)
    with pytest.raises(RuntimeError, match=r'b must be \(m, 4\)'):
        f(a64, torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match='contiguous'):
        f(a64, torch.ones(4, 2, dtype=torch.float64).t())


def test_precision_is_checked_and_scoped():
    """An unknown precision is refused by name; ops.precision() sets the default of both ops for its block
    only (what prune(precision=...) uses)."""
    w = torch.randn(40, 9)
    g32 = ops.gram(w)
    for bad in ('fp16', 'BF16', None):
        with pytest.raises(ValueError, match='precision'):
            with ops.precision(bad):
                pass
    with pytest.raises(ValueError, match="precision='tf32'"):
        ops.redundancy_scores(w, precision='tf32')
    with pytest.raises(ValueError, match="precision='tf32'"):
        ops.gram(w, precision='tf32')
    with ops.precision('bf16'):
        assert torch.equal(ops.redundancy_scores(w), ops.redundancy_scores(w, precision='bf16'))
        assert torch.equal(ops.gram(w), ops.gram(w, precision='bf16'))
        assert torch.equal(ops.gram(w, precision='fp32'), g32)
    assert ops.dispatch.current_precision() == 'fp32'
    assert torch.equal(ops.gram(w), g32)
    assert not torch.equal(g32, ops.gram(w, precision='bf16'))  # (the rounding is visible)


def test_gram_noncontiguous_input():
    x = torch.randn(300, 200).t()        # (200, 300), column-major
    for backend in backends_for('gram'):
        check_gram(x, backend)


# --- gather_slices --------------------------------------------------------------------------------
def test_gather_slices_matches_loop():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g), torch.randn(4, 6, 3, generator=g),
               torch.randn(2, 9, generator=g).to(torch.bfloat16)]
    slices = [[(0, torch.tensor([0, 3, 6])), (1, torch.tensor([4, 1]))],
              [(0, torch.tensor([10, 0, 5]))],
              [(2, torch.tensor([2])), (0, torch.tensor([1, 3]))],
              [(-1, torch.tensor([], dtype=torch.long))]]
    want = reference.gather_slices_loop(tensors, slices)
    for backend in backends_for('gather_slices'):
        got = ops.gather_slices(tensors, slices, backend=backend)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and a.is_contiguous()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64, torch.int8, torch.bool])
def test_gather_slices_random(dtype):
    """Seeded sweep: 1-4 dims, odd sizes, slices along the innermost dim (the CPU kernel's own row gather)
    and any other, one or two per tensor, repeated / unsorted / empty indices, non-contiguous sources."""
    g = torch.Generator().manual_seed(11)
    tensors, slices = [], []
    for case in range(24):
        shape = torch.randint(1, 9, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        if case % 6 == 0:
            shape[-1] = 3001  # rows long enough for the parallel row split
        t = (torch.randn(shape, generator=g) * 50).to(dtype)
        if case % 4 == 1 and t.dim() >= 2:
            t = t.transpose(0, -1)  # a non-contiguous source
        dims = torch.randperm(t.dim(), generator=g).tolist()
        if case % 3 == 0:  # the innermost dim first
            dims.remove(t.dim() - 1)
            dims.insert(0, t.dim() - 1)
        dims = dims[:1 + case % 2]
        per = []
        for d in dims:
            k = int(torch.randint(0, 2 * t.shape[d] + 1, (1,), generator=g))
            per.append((d, torch.randint(0, t.shape[d], (k,), generator=g)))
        tensors.append(t)
        slices.append(per)
    want = reference.gather_slices_loop(tensors, slices)
    for backend in backends_for('gather_slices'):
        got = ops.gather_slices(tensors, slices, backend=backend)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), (backend, i)
            assert torch.equal(a, b), (backend, i, tensors[i].shape, [d for d, _ in slices[i]])


def test_gather_slices_rejects_bad_index():
    for backend in backends_for('gather_slices'):
        with pytest.raises(RuntimeError, match='out of range'):
            ops.gather_slices([torch.randn(3)], [[(0, torch.tensor([3]))]], backend=backend)


def test_gather_slices_rejects_bad_dims_and_index_types():
    t = torch.arange(12.).view(3, 4)
    for backend in ['reference'] + backends_for('gather_slices'):
        for dim in (2, 5, -3):  # (the compiled route once wrapped them into range: dim % ndim)
            with pytest.raises(IndexError, match=f'no dim {dim}'):
                ops.gather_slices([t], [[(dim, torch.tensor([0]))]], backend=backend)
        with pytest.raises(IndexError, match='no dim 0'):
            ops.gather_slices([torch.tensor(1.)], [[(0, torch.tensor([0]))]], backend=backend)
        with pytest.raises(TypeError, match='1-D int64 tensor, got list'):
            ops.gather_slices([t], [[(0, [0, 1])]], backend=backend)


def test_qk_scores_gamma_must_be_an_int():
    q = torch.randn(1, 2, 5, 8)
    for backend in ['reference'] + backends_for('qk_scores'):
        for gamma in (1.7, 2.0, True):  # (1.7 was truncated to 1)
            with pytest.raises(TypeError, match='gamma must be an int'):
                ops.qk_scores(q, q, gamma, backend=backend)


def test_ops_take_inputs_that_require_grad():
    """Scores and slices are not differentiable: every op runs without a graph, whatever the size or dim
    (the CPU kernels' out= ATen calls refused such inputs beyond one redundancy tile, or along dim 0)."""
    gen = torch.Generator().manual_seed(9)
    w = torch.nn.Parameter(torch.randn(1100, 8, generator=gen))
    x = torch.nn.Parameter(torch.randn(40, 300, generator=gen))
    q = torch.nn.Parameter(torch.randn(2, 2, 9, 8, generator=gen))
    p = torch.nn.Parameter(torch.randn(3, 4, generator=gen))
    i = torch.tensor([1, 0])
    for backend in backends_for('redundancy_scores'):
        if backend == 'triton':
            continue  # (1100 rows: too slow under the interpreter; the Triton routes start with .float())
        got = ops.redundancy_scores(w, backend=backend)
        assert not got.requires_grad
        torch.testing.assert_close(got, reference.redundancy_scores_full(w.detach()), rtol=1e-5, atol=1e-3)
        got = ops.gram(x, backend=backend)
        assert not got.requires_grad
        torch.testing.assert_close(got, reference.gram_full(x.detach()), rtol=1e-5, atol=1e-3)
    for backend in backends_for('qk_scores'):
        assert not ops.qk_scores(q, q, 2, backend=backend).requires_grad
    for backend in backends_for('gather_slices'):
        for dim in (0, 1):
            (got,) = ops.gather_slices([p], [[(dim, i)]], backend=backend)
            assert not got.requires_grad and torch.equal(got, p.detach().index_select(dim, i))


# --- torch.library.opcheck (schemas, fake kernels, dispatch) on the CPU kernels ---------------------
@pytest.mark.skipif(ops.extension() is None, reason='compiled extension not built')
@pytest.mark.parametrize('name,args', [
    ('qk_scores', lambda: (torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), 3)),
    ('redundancy_scores', lambda: (torch.randn(37, 11),)),
    ('redundancy_scores', lambda: (torch.randn(300, 11), True)),
    ('gram', lambda: (torch.randn(19, 300),)),
    ('gram', lambda: (torch.randn(19, 600), True)),
    ('gather_slices', lambda: ([torch.randn(4, 5), torch.randn(6)], [0, 0], [torch.tensor([1, 3]), torch.tensor([5])],
                               [1, 0], [torch.tensor([0, 4]), None])),
    ('cholesky_solve_', lambda: (_spd(9, 3, torch.Generator().manual_seed(1)), torch.randn(4, 9, dtype=torch.float64))),
    ('cholesky_solve_', lambda: (_spd(5, 3, torch.Generator().manual_seed(2)), torch.randn(0, 5, dtype=torch.float64))),
])
def test_opcheck(name, args):
    if not ops.has_kernel(name, 'CPU'):
        pytest.skip(f'no CPU kernel for {name}')
    torch.library.opcheck(getattr(torch.ops.snp_fast, name).default, args())


# --- CUDA (skipped without a GPU) -----------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize('shape', [(2, 2, 50, 32), (4, 3, 197, 64), (1, 2, 577, 128), (2, 1, 7, 80), (3, 2, 1, 16)])
def test_qk_scores_cuda(shape):
    assert backends_for('qk_scores', 'cuda'), 'no GPU backend for qk_scores: extension built without CUDA?'
    for backend in backends_for('qk_scores', 'cuda'):
        q = torch.randn(shape, device='cuda')
        k = torch.randn(shape, device='cuda')
        q[..., 1] = 0
        for gamma in (1, shape[-1] // 2, shape[-1]):
            want = qk_oracle(q.cpu(), k.cpu(), gamma)
            got = ops.qk_scores(q, k, gamma, backend=backend).cpu()
            torch_err = (reference.qk_scores_literal(q.cpu(), k.cpu(), gamma) - want).abs().max().item()
            tol = 2 * torch_err + 8 * EPS32 * max(1.0, want.abs().max().item())
            assert_close_verbose(got, want, tol, f'qk_scores[{backend}] {shape} gamma={gamma}')


@requires_cuda
@pytest.mark.parametrize('shape', [(1, 1), (7, 3), (1023, 77), (1024, 1024), (4096, 1024)])
def test_redundancy_cuda(shape):
    assert backends_for('redundancy_scores', 'cuda'), 'no GPU backend for redundancy_scores: extension built without CUDA?'
    for backend in backends_for('redundancy_scores', 'cuda'):
        w = torch.randn(shape)
        if shape[0] > 2:
            w[1] = 0
        want = redundancy_oracle(w)
        got = ops.redundancy_scores(w.cuda(), backend=backend).cpu()
        tol = 2 * (reference.redundancy_scores_full(w) - want).abs().max().item() + 4 * EPS32 * shape[0]
        assert_close_verbose(got, want, tol, f'redundancy_scores[{backend}] {shape}')


@requires_cuda
@pytest.mark.parametrize('shape', [(1, 1), (5, 300), (1000, 1023), (4096, 1031), (12608, 1024)])
def test_gram_cuda(shape):
    assert backends_for('gram', 'cuda'), 'no GPU backend for gram: extension built without CUDA?'
    for backend in backends_for('gram', 'cuda'):
        x = torch.randn(shape)
        want = x.double().t() @ x.double()
        got = ops.gram(x.cuda(), backend=backend).cpu()
        # a GPU kernel may sum the T products of an entry one after another (no blocking along T, as the CPU's
        # BLAS does): allow the usual √T growth of such a sum's rounding on top of the CPU reference's error
        tol = (2 * (reference.gram_full(x) - want).abs().max().item()
               + 4 * shape[0] ** 0.5 * EPS32 * want.abs().max().item())
        assert_close_verbose(got, want, tol, f'gram[{backend}] {shape}')


@requires_cuda
def test_gather_slices_cuda():
    tensors = [torch.randn(7, 5, device='cuda'), torch.randn(11, device='cuda'), torch.randn(4, 6, 3, device='cuda')]
    slices = [[(0, torch.tensor([0, 3, 6])), (1, torch.tensor([4, 1]))], [(0, torch.tensor([10, 0, 5]))],
              [(2, torch.tensor([2])), (0, torch.tensor([1, 3]))]]
    want = reference.gather_slices_loop(tensors, slices)
    assert backends_for('gather_slices', 'cuda'), 'no GPU backend for gather_slices: extension built without CUDA?'
    for backend in backends_for('gather_slices', 'cuda'):
        for a, b in zip(ops.gather_slices(tensors, slices, backend=backend), want):
            assert torch.equal(a, b) and a.is_contiguous()
