"""Redundancy scores ω_i = Σ_l (1 − |cos(W_i, W_l)|) as one Triton kernel (docs/METHOD.md, "Criteria").

Reference: snp_fast.ops.reference.redundancy_scores_full (the full n×n cosine matrix in plain torch).
Kernel: the rows are normalised once (torch); each program computes one BLOCK×BLOCK tile of the cosine
matrix for a tile pair (I ≤ J: upper triangle only, half the products) with tl.dot in fp32 ("ieee"
precision, never TF32), and its abs + row-sum epilogue credits both row blocks by atomic adds (row
sums to I, column sums to J). No n×n buffer.
"""
import torch
import triton
import triton.language as tl

from ..dispatch import register

__all__ = ['redundancy_scores_triton']


@triton.jit
def _redundancy_tile_kernel(wn_ptr, sums_ptr, n, m, stride_w,
                            BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j < pid_i:          # lower triangle: covered by the mirrored tile
        return
    rows_i = (pid_i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # row offsets in 64 bits: n·m may pass 2³¹
    rows_j = (pid_j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        kk = k0 + cols
        a = tl.load(wn_ptr + rows_i[:, None] * stride_w + kk[None, :],
                    mask=(rows_i[:, None] < n) & (kk[None, :] < m), other=0.0)
        b = tl.load(wn_ptr + rows_j[:, None] * stride_w + kk[None, :],
                    mask=(rows_j[:, None] < n) & (kk[None, :] < m), other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision='ieee')
    acc = tl.abs(acc)          # out-of-range rows/cols were loaded as zeros: they add nothing
    tl.atomic_add(sums_ptr + rows_i, tl.sum(acc, axis=1), mask=rows_i < n)
    if pid_j != pid_i:
        tl.atomic_add(sums_ptr + rows_j, tl.sum(acc, axis=0), mask=rows_j < n)


def _launch(wn: torch.Tensor, block: int, block_k: int) -> torch.Tensor:
    n, m = wn.shape
    sums = torch.zeros(n, device=wn.device, dtype=torch.float32)
    nb = triton.cdiv(n, block)
    _redundancy_tile_kernel[(nb, nb)](wn, sums, n, m, wn.stride(0), BLOCK=block, BLOCK_K=block_k)
    return sums


@register('redundancy_scores', 'triton')
def redundancy_scores_triton(w: torch.Tensor) -> torch.Tensor:
    """ω_i for the rows of a 2-D weight; (n,) float32 (zero rows score 0, as the reference)."""
    if w.dim() != 2:
        raise ValueError(f'redundancy scores need a 2-D weight (rows = filters), got shape {tuple(w.shape)}')
    w = w.float()
    n = w.shape[0]
    norms = w.double().norm(dim=1)  # finite exactly when the row is (fp32 squares cannot overflow float64)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError('redundancy scores: w holds NaN or Inf values')
    # divided in float64: 1/‖w_i‖ overflows float32 below 2.9e-39 (a zero row stays zero)
    wn = (w.double() / torch.where(norms > 0, norms, 1.0).unsqueeze(1)).float().contiguous()
    if n == 0:
        return torch.zeros(0, device=w.device)
    if w.shape[1] == 0:
        return torch.zeros(n, device=w.device)
    # GPU: 64×64 tiles; the CPU interpreter runs one program at a time, so fewer, larger ones
    block = 64 if w.is_cuda else 128
    sums = _launch(wn, block, 32 if w.is_cuda else 128)
    omega = n - sums.double()
    return torch.where(norms > 0, omega, torch.zeros_like(omega)).float()
