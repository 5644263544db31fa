"""Pruning criteria: one score per filter, high = keep (docs/METHOD.md, "Criteria").

Q/K pairs:   "snp" (attention-score preservation on calibration q/k), "magnitude" (‖W_q,i‖·‖W_k,i‖).
V and FFN:   "redundancy" (Σ_l 1 − |cos|, the paper's), "magnitude" (row L2 norm),
             "activation" (L2 norm of the filter's output over the calibration tokens).
Heads:       "snp" (the head's attention-score energy kept by SNP: Σ over images of the top-γ σ² of
             Q_h K_hᵀ), "output" (‖head h's contribution to attn.proj's output‖² over the calibration
             tokens: trace(W_h X_hᵀX_h W_hᵀ), W_h = proj's columns of head h, X_h = its context vectors).
Embedding:   the same three, per producer of the residual stream (patch embedding, every attn.proj
             and mlp.fc2 for weight criteria; every block's output stream for "activation"), each
             producer's scores divided by their sum ("total sum scaling") and then averaged.
"""
from typing import List, Sequence

import torch

from . import ops

__all__ = ['QK_CRITERIA', 'ROW_CRITERIA', 'EMBED_CRITERIA', 'HEAD_CRITERIA', 'qk_magnitude', 'row_scores',
           'tss_average', 'select_per_head', 'select_top', 'head_energy', 'head_output']

QK_CRITERIA = ('snp', 'magnitude')
ROW_CRITERIA = ('redundancy', 'magnitude', 'activation')
EMBED_CRITERIA = ('redundancy', 'magnitude', 'activation')
HEAD_CRITERIA = ('snp', 'output')  # default first (QUALITY.md, head pruning)


def check_criterion(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not a known criterion; choose one of {list(allowed)}')


def qk_magnitude(qkv_weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(H, d) product of the L2 norms of the paired query and key rows."""
    n = heads * head_dim
    wq, wk = qkv_weight[:n].float(), qkv_weight[n:2 * n].float()
    return (wq.norm(dim=1) * wk.norm(dim=1)).view(heads, head_dim)


def head_energy(q: torch.Tensor, k: torch.Tensor, gamma: int) -> torch.Tensor:
    """(H,) Σ over images of the top-γ squared singular values of Q_h K_hᵀ; q, k: (B, H, N, d).

    Never forms the N×N scores: with Q = A R_q, K = B R_k (QR), Q Kᵀ has the singular values of R_q R_kᵀ."""
    rq = torch.linalg.qr(q.double(), mode='r').R
    rk = torch.linalg.qr(k.double(), mode='r').R
    sv = torch.linalg.svdvals(rq @ rk.transpose(-1, -2))     # (B, H, r), descending
    return sv[..., :gamma].pow(2).sum(dim=(0, 2)).float()


def head_output(ctx: torch.Tensor, proj_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(H,) ‖ctx_h W_hᵀ‖² summed over tokens: each head's share of attn.proj's output (bias excluded).

    ctx: (..., H*d) the input of attn.proj; through the d×d Gram of each head, not the (tokens, H, D) products."""
    x = ctx.reshape(-1, heads, ctx.shape[-1] // heads).double()
    gram = torch.einsum('nhd,nhe->hde', x, x)
    w = proj_weight.detach().double().view(proj_weight.shape[0], heads, -1)
    return torch.einsum('ohd,hde,ohe->h', w, gram, w).float()


def row_scores(weight: torch.Tensor, criterion: str, act_sq: torch.Tensor = None, backend: str = 'auto') -> torch.Tensor:
    """Scores of the rows (filters) of a 2-D weight. `act_sq`: per-row sum of squared outputs."""
    if criterion == 'redundancy':
        return ops.redundancy_scores(weight.detach().flatten(1), backend=backend)
    if criterion == 'magnitude':
        return weight.detach().flatten(1).float().norm(dim=1)
    if criterion == 'activation':
        if act_sq is None:
            raise ValueError('the "activation" criterion needs calibration activations')
        return act_sq.float().clamp_min(0).sqrt()
    raise ValueError(f'unknown criterion {criterion!r}; choose one of {list(ROW_CRITERIA)}')


def tss_average(per_producer: List[torch.Tensor]) -> torch.Tensor:
    """Average of score vectors after total sum scaling (each divided by its own sum)."""
    acc = torch.zeros_like(per_producer[0], dtype=torch.float64)
    for s in per_producer:
        s = s.double()
        total = s.sum()
        acc += s / total if total > 0 else s
    return (acc / len(per_producer)).float()


def select_per_head(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(H, d) scores -> (H, keep) indices of the highest scores of each head, sorted ascending."""
    idx = scores.float().topk(keep, dim=1, sorted=False).indices
    return idx.sort(dim=1).values.long().cpu()


def select_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(n,) scores -> the `keep` indices with the highest scores, sorted ascending."""
    return scores.float().topk(keep, sorted=False).indices.sort().values.long().cpu()
