"""Pruning criteria: one score per filter, high = keep (SNP.md, "Scores").

Q/K pairs:   "snp" (attention-score preservation on calibration q/k), "magnitude" (‖W_q,i‖·‖W_k,i‖).
V and FFN:   "redundancy" (Σ_l 1 − |cos|, the paper's), "magnitude" (row L2 norm),
             "activation" (L2 norm of the filter's output over the calibration tokens).
Embedding:   the same three, per producer of the residual stream (patch embedding, every attn.proj
             and mlp.fc2 for weight criteria; every block's output stream for "activation"), each
             producer's scores divided by their sum ("total sum scaling") and then averaged.
"""
from typing import List, Sequence

import torch

from . import ops

__all__ = ['QK_CRITERIA', 'ROW_CRITERIA', 'EMBED_CRITERIA', 'qk_magnitude', 'row_scores', 'tss_average',
           'select_per_head', 'select_top']

QK_CRITERIA = ('snp', 'magnitude')
ROW_CRITERIA = ('redundancy', 'magnitude', 'activation')
EMBED_CRITERIA = ('redundancy', 'magnitude', 'activation')


def check_criterion(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f'{name}={value!r} is not a known criterion; choose one of {list(allowed)}')


def qk_magnitude(qkv_weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(H, d) product of the L2 norms of the paired query and key rows."""
    n = heads * head_dim
    wq, wk = qkv_weight[:n].float(), qkv_weight[n:2 * n].float()
    return (wq.norm(dim=1) * wk.norm(dim=1)).view(heads, head_dim)


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
