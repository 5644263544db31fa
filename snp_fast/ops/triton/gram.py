"""Gram matrix G = xᵀx (float32) of a (T, m) input as one Triton kernel (symmetric rank-k update).

Reference: snp_fast.ops.reference.gram_full (x.t() @ x in plain torch).
Kernel: one program per BLOCK×BLOCK tile of the upper triangle (I ≤ J, half the products), reducing
over the T tokens with tl.dot in fp32 ("ieee" precision, never TF32); each tile is stored at (I, J)
and, transposed, at (J, I); a diagonal tile only by its upper triangle (and its mirror), so that G is
exactly symmetric (the two triangles of one dot may differ in rounding).
"""
import torch
import triton
import triton.language as tl

from ..dispatch import register

__all__ = ['gram_triton']


@triton.jit
def _gram_tile_kernel(x_ptr, g_ptr, T, m, stride_xt, stride_xm,
                      BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j < pid_i:
        return
    ci = pid_i * BLOCK + tl.arange(0, BLOCK)
    cj = pid_j * BLOCK + tl.arange(0, BLOCK)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tt).to(tl.int64)  # token offsets pass 2³¹ elements at T·m ≥ 2³¹ (ViT-L fc2: ~2700 images)
        a = tl.load(x_ptr + t[:, None] * stride_xt + ci[None, :] * stride_xm,
                    mask=(t[:, None] < T) & (ci[None, :] < m), other=0.0)          # (BLOCK_T, BLOCK)
        b = tl.load(x_ptr + t[:, None] * stride_xt + cj[None, :] * stride_xm,
                    mask=(t[:, None] < T) & (cj[None, :] < m), other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision='ieee')
    mask = (ci[:, None] < m) & (cj[None, :] < m)
    if pid_j != pid_i:
        tl.store(g_ptr + ci[:, None] * m + cj[None, :], acc, mask=mask)
        tl.store(g_ptr + cj[None, :] * m + ci[:, None], acc, mask=mask)
    else:  # diagonal tile: its upper triangle, mirrored (the dot's two triangles may differ in rounding)
        upper = mask & (ci[:, None] <= cj[None, :])
        tl.store(g_ptr + ci[:, None] * m + cj[None, :], acc, mask=upper)
        tl.store(g_ptr + cj[None, :] * m + ci[:, None], acc, mask=upper)


@register('gram', 'triton')
def gram_triton(x: torch.Tensor) -> torch.Tensor:
    """xᵀx (float32, (m, m)) of a (T, m) input."""
    if x.dim() != 2:
        raise ValueError(f'gram needs a 2-D input (tokens, features), got shape {tuple(x.shape)}')
    x = x.float()
    T, m = x.shape
    g = torch.empty(m, m, device=x.device, dtype=torch.float32)
    if m == 0:
        return g
    if T == 0:
        return g.zero_()
    block = 64 if x.is_cuda else 128
    block_t = 32 if x.is_cuda else 128
    nb = triton.cdiv(m, block)
    _gram_tile_kernel[(nb, nb)](x, g, T, m, x.stride(0), x.stride(1), BLOCK=block, BLOCK_T=block_t)
    return g
