"""The ATen routes of the Q/K scores against the literal formula, on random shapes including rank-deficient
and N < d cases: snp_fast::qk_scores_dxd (the d×d route in ATen ops) and snp_fast::qk_scores_grams (the CPU
kernel's d×d half from given Grams, which snp_fast::qk_scores_hybrid, the CUDA implementation of qk_scores,
feeds with Grams formed on the GPU; tests/test_ops.py runs the hybrid here on CPU tensors)."""
import pytest
import torch

from snp_fast import ops
from snp_fast.ops import reference

pytestmark = pytest.mark.skipif(ops.extension() is None or not hasattr(torch.ops.snp_fast, 'qk_scores_dxd'),
                                reason='compiled extension not built')


def _cases():
    g = torch.Generator().manual_seed(7)
    for B, H, N, d in [(1, 1, 1, 16), (2, 3, 7, 32), (3, 2, 50, 48), (2, 2, 197, 64), (1, 2, 23, 80), (4, 1, 13, 128)]:
        q = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
        k = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
        yield f'{B}x{H}x{N}x{d}', q, k
    q = torch.randn(2, 2, 40, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 40, 32, generator=g, dtype=torch.float64)
    q[:, :, :, :5] = 0                         # dead query filters
    k[:, 1] = k[:, 1, :, :4].repeat(1, 1, 8)   # rank-4 keys in head 1
    yield 'rank-deficient', q, k


@pytest.mark.parametrize('name,q,k', list(_cases()), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize('gamma_frac', [0.25, 1.0])
def test_dxd_op_matches_literal(name, q, k, gamma_frac):
    gamma = max(1, int(q.shape[-1] * gamma_frac))
    q, k = q.float(), k.float()  # both sides see the same fp32 inputs
    if gamma_frac < 1:  # the leading components are well separated: the literal formula is the oracle
        expected = reference.qk_scores_literal(q.double(), k.double(), gamma, compute_dtype=torch.float64)
    else:  # all components: the smallest σ sit near the 1e-4·σ₁ cut, so compare with the same route in torch
        expected = reference.qk_scores_dxd(q, k, gamma)
    got = torch.ops.snp_fast.qk_scores_dxd(q, k, gamma)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, expected.abs().max().item()))


def test_dxd_op_passes_opcheck():
    q, k = torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    torch.library.opcheck(torch.ops.snp_fast.qk_scores_dxd.default, (q, k, 8),
                          test_utils=('test_schema', 'test_faketensor', 'test_aot_dispatch_static'))
    torch.library.opcheck(torch.ops.snp_fast.qk_scores_hybrid.default, (q, k, 8),
                          test_utils=('test_schema', 'test_faketensor', 'test_aot_dispatch_static'))
    gq = (q.double().transpose(-1, -2) @ q.double())
    gk = (k.double().transpose(-1, -2) @ k.double())
    torch.library.opcheck(torch.ops.snp_fast.qk_scores_grams.default, (gq, gk, 8),
                          test_utils=('test_schema', 'test_faketensor', 'test_aot_dispatch_static'))


@pytest.mark.parametrize('name,q,k', list(_cases()), ids=[c[0] for c in _cases()])
def test_grams_op_matches_literal(name, q, k):
    """The d×d half alone, from float64 Grams (γ capped by d, not N: the rank caps it)."""
    gamma = max(1, q.shape[-1] // 4)
    expected = reference.qk_scores_literal(q, k, gamma, compute_dtype=torch.float64)
    got = torch.ops.snp_fast.qk_scores_grams(q.transpose(-1, -2) @ q, k.transpose(-1, -2) @ k, gamma)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4 * max(1.0, expected.abs().max().item()))


def test_grams_op_rejects_bad_input():
    g = torch.eye(8, dtype=torch.float64).expand(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match='equal shapes'):
        torch.ops.snp_fast.qk_scores_grams(g, g[..., :4], 2)
    with pytest.raises(RuntimeError, match='equal shapes'):
        torch.ops.snp_fast.qk_scores_grams(g[..., :4], g[..., :4], 2)  # not square
    with pytest.raises(RuntimeError, match='gamma'):
        torch.ops.snp_fast.qk_scores_grams(g, g, 0)
    bad = g.clone()
    bad[0, 1, 2, 5] = bad[0, 1, 5, 2] = float('nan')  # off the diagonal: the factorisation would not see it
    with pytest.raises(RuntimeError, match='NaN or Inf'):
        torch.ops.snp_fast.qk_scores_grams(g, bad, 2)


def test_dxd_op_zero_head_dim():
    q = torch.randn(1, 2, 5, 0)
    assert torch.ops.snp_fast.qk_scores_dxd(q, q, 1).shape == (2, 0)


def test_dxd_op_rejects_bad_input():
    with pytest.raises(RuntimeError, match='equal shapes'):
        torch.ops.snp_fast.qk_scores_dxd(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 9), 2)
    with pytest.raises(RuntimeError, match='gamma'):
        torch.ops.snp_fast.qk_scores_dxd(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_qk_scores_matches_literal():
    q, k = torch.randn(4, 3, 197, 64, dtype=torch.float64), torch.randn(4, 3, 197, 64, dtype=torch.float64)
    expected = reference.qk_scores_literal(q, k, 32, compute_dtype=torch.float64)
    got = ops.qk_scores(q.cuda().float(), k.cuda().float(), 32, backend='compiled').cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_dxd_op_keeps_every_component_like_the_literal_formula():
    """γ = d against the literal formula (test_dxd_op_matches_literal compares γ = d with the same route in
    torch): N ≫ d Gaussian q and k, whose smallest singular values sit far above the 1e-4·σ₁ cut."""
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(2, 2, 400, 16, generator=g, dtype=torch.float64) for _ in range(2))
    s = torch.linalg.svdvals(q @ k.transpose(-1, -2))[..., :16]
    assert (s[..., -1] > 1e-2 * s[..., 0]).all()  # (the premise: no component near the cut)
    expected = reference.qk_scores_literal(q, k, 16, compute_dtype=torch.float64)
    got = torch.ops.snp_fast.qk_scores_dxd(q.float(), k.float(), 16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
