"""Plain-PyTorch reference implementations of the snp_fast kernels.

These are the "pure-Python version": the fallback when no compiled backend is available, the oracle
every kernel is tested against, and the baseline every benchmark compares with. They favour being
obviously correct over being fast.
"""
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ['check_qk',
    'qk_scores_literal', 'qk_scores_dxd', 'redundancy_scores_full', 'gram_full', 'gather_slices_loop',
    'singular_value_rtol', 'cholesky_solve_linalg',
]


def singular_value_rtol(dtype: torch.dtype) -> float:
    """Relative threshold below which a singular value of QKᵀ counts as zero.

    A zero singular value has arbitrary singular vectors and a zero matrix σ_j u_j v_jᵀ, whose cosine
    with anything is undefined; such terms contribute 0. The threshold sits well above the rounding
    noise of either route (literal N×N SVD or the d×d route) so both make the same decision.
    """
    return 1e-4 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # cos with a zero vector is defined as 0 (a dead filter preserves nothing)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def check_qk(q: torch.Tensor, k: torch.Tensor, gamma: int) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f'q and k must both be (B, H, N, d) with equal shapes, got {tuple(q.shape)} and {tuple(k.shape)}')
    if gamma < 1:
        raise ValueError(f'gamma must be >= 1, got {gamma}')
    if not bool(torch.isfinite(q).all() & torch.isfinite(k).all()):
        raise ValueError('qk_scores: q or k holds NaN or Inf values')


def qk_scores_literal(q: torch.Tensor, k: torch.Tensor, gamma: int, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q/K attention-score preservation scores, computed literally (docs/METHOD.md, "Criteria").

    For every image b and head h: S = Q Kᵀ (N×N), S = Σ_j σ_j u_j v_jᵀ, and filter pair i scores
    Σ_{j≤γ} |cos(u_j, q_i) · cos(v_j, k_i)| (= |cos(σ_j u_j v_jᵀ, q_i k_iᵀ)|). Summed over images.

    Args:
        q: queries (B, H, N, d), as they enter the score product (after q_norm).
        k: keys (B, H, N, d).
        gamma: number of leading singular components to preserve.
        compute_dtype: float32 (default) or float64.

    Returns:
        (H, d) float32 scores; high = important.
    """
    check_qk(q, k, gamma)
    q = q.to(compute_dtype)
    k = k.to(compute_dtype)
    s_mat = q @ k.transpose(-1, -2)                                   # (B, H, N, N)
    u, s, vh = torch.linalg.svd(s_mat, full_matrices=False)
    g = min(gamma, s.shape[-1])
    u, s, v = u[..., :g], s[..., :g], vh[..., :g, :].transpose(-1, -2)
    valid = s > s[..., :1] * singular_value_rtol(compute_dtype)        # (B, H, g)
    cos_u = _safe_div(u.transpose(-1, -2) @ q, q.norm(dim=-2).unsqueeze(-2))   # (B, H, g, d)
    cos_v = _safe_div(v.transpose(-1, -2) @ k, k.norm(dim=-2).unsqueeze(-2))
    omega = ((cos_u * cos_v).abs() * valid.unsqueeze(-1)).sum(dim=-2)   # (B, H, d)
    return omega.sum(dim=0).float()


def qk_scores_dxd(q: torch.Tensor, k: torch.Tensor, gamma: int) -> torch.Tensor:
    """The same scores by the d×d route, in plain PyTorch (never forms the N×N matrix).

    Q = A R_q and K = B R_k with A, B orthonormal, so S = A (R_q R_kᵀ) Bᵀ and the SVD of the d×d
    matrix M = R_q R_kᵀ = X Σ Yᵀ gives cos(u_j, q_i) = x_jᵀ r_{q,i} / ‖q_i‖. R comes from the
    eigendecomposition of the Gram matrix QᵀQ = V Λ Vᵀ as R = Λ^½ Vᵀ. Gram matrices accumulate in
    fp32; the small decompositions run in fp64, where they cost little.
    """
    check_qk(q, k, gamma)
    q = q.float()
    k = k.float()
    gq = (q.transpose(-1, -2) @ q).double()                            # (B, H, d, d)
    gk = (k.transpose(-1, -2) @ k).double()
    rq, rk = _gram_root(gq), _gram_root(gk)
    x, s, yh = torch.linalg.svd(rq @ rk.transpose(-1, -2))
    g = min(gamma, s.shape[-1])
    x, s, y = x[..., :g], s[..., :g], yh[..., :g, :].transpose(-1, -2)
    valid = s > s[..., :1] * singular_value_rtol(torch.float32)
    qn = gq.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().unsqueeze(-2)
    kn = gk.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().unsqueeze(-2)
    cos_u = _safe_div(x.transpose(-1, -2) @ rq, qn)
    cos_v = _safe_div(y.transpose(-1, -2) @ rk, kn)
    omega = ((cos_u * cos_v).abs() * valid.unsqueeze(-1)).sum(dim=-2)
    return omega.sum(dim=0).float()


def _gram_root(g: torch.Tensor) -> torch.Tensor:
    """R with RᵀR = G for a PSD Gram matrix G; eigenvalues within rounding of zero are clamped to 0
    so that dead directions give exactly zero rows instead of sqrt-amplified noise. The root is that of
    the unit-diagonal D⁻¹GD⁻¹ (D² = diag G), times D: "within rounding" is then relative to each filter's
    own norm, and a filter far louder than the others does not push their directions under the clamp."""
    dn = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    dn = torch.where(dn > 0, dn, torch.ones_like(dn))
    lam, vec = torch.linalg.eigh(g / (dn.unsqueeze(-1) * dn.unsqueeze(-2)))
    lam_max = lam[..., -1:].clamp_min(0)
    lam = torch.where(lam > lam_max * (g.shape[-1] * 4 * torch.finfo(torch.float32).eps), lam, torch.zeros_like(lam))
    return lam.sqrt().unsqueeze(-1) * vec.transpose(-1, -2) * dn.unsqueeze(-2)


def _check_finite_rows(w: torch.Tensor) -> None:
    bad = (~torch.isfinite(w).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        rows = ', '.join(map(str, bad[:5])) + (', ...' if len(bad) > 5 else '')
        raise ValueError(f'redundancy scores: w holds NaN or Inf values (rows {rows})')


def redundancy_scores_full(w: torch.Tensor) -> torch.Tensor:
    """ω_i = Σ_l (1 − |cos(W_i, W_l)|) over the rows of w, with the full n×n cosine matrix.

    A zero row has no direction: its cosine with anything is 0, and its own score is set to 0 so that
    dead filters are pruned first.
    """
    if w.dim() != 2:
        raise ValueError(f'redundancy scores need a 2-D weight (rows = filters), got shape {tuple(w.shape)}')
    w = w.float()
    _check_finite_rows(w)
    norms = w.double().norm(dim=1)  # float64: a float32 sum of squares over- or underflows beyond ~1e±19
    wn = _safe_div(w.double(), norms.unsqueeze(1)).float()
    cos = (wn @ wn.t()).abs()
    omega = w.shape[0] - cos.sum(dim=1)
    return torch.where(norms > 0, omega, torch.zeros_like(omega))


def gram_full(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G (+)= xᵀx for x of shape (T, m), accumulated in fp32."""
    if x.dim() != 2:
        raise ValueError(f'gram needs a 2-D input (tokens, features), got shape {tuple(x.shape)}')
    g = x.float().t() @ x.float()
    if out is None:
        return g
    out.add_(g)
    return out


Slice = Tuple[int, torch.Tensor]


def gather_slices_loop(tensors: Sequence[torch.Tensor], slices: Sequence[Sequence[Slice]]) -> List[torch.Tensor]:
    """Apply every (dim, kept-index) slice to its tensor: one index_select per slice, in a Python loop."""
    out = []
    for t, per_tensor in zip(tensors, slices):
        for dim, idx in per_tensor:
            t = t.index_select(dim, idx.to(t.device))
        out.append(t.contiguous())
    return out


def cholesky_solve_linalg(a: torch.Tensor, b: torch.Tensor) -> int:
    """In place: b (m, n) float64 ← b a⁻¹ for a (n, n) symmetric positive definite, by torch.linalg
    (Cholesky factor, then the two triangular solves). Returns 0, or k > 0 when the leading k × k minor
    of a is not positive definite (b is then left unchanged). a is not written here (the compiled kernel
    overwrites it with its factor: callers treat it as workspace)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return int(info)
    if b.numel():
        b.copy_(torch.cholesky_solve(b.t(), chol).t())
    return 0
