"""Whole-branch dropping for the ViT family: how much each block's attention and MLP branch matters, and the
branches a drop count removes (ratios 'drop_attn' / 'drop_mlp' given as a number of blocks)."""
from typing import List, Tuple

import torch
import torch.nn as nn

from ...capture import apply, eval_mode
from ...scores import check_criterion, select_top
from . import roles
from .steps import block_kwargs, prefix
from .widths import DROP_KEYS

__all__ = ['BRANCH_CRITERIA', 'branch_scores', 'choose_dropped']


BRANCH_CRITERIA = ('ablation', 'norm')


@torch.no_grad()
def branch_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 32, criterion: str = 'ablation',
                  max_images: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """(attn, mlp): per block, how much each residual branch matters on the calibration images, measured
    on the ORIGINAL model; drop counts (drop_attn / drop_mlp) remove the branches with the lowest scores.

    "ablation" (what prune() uses): the relative change ‖f' − f‖_F / ‖f‖_F of the final normed features
    (all tokens) when that one branch is replaced by what dropping leaves of it, its mean output (the
    re-fit bias), and the rest of the network runs on. Cost: O(depth²) block runs, so only the first
    `max_images` calibration images are used (and the stream entering every branch is kept for them).
    "norm": the branch's local size ‖branch(x)‖_F / ‖x‖_F with x the stream entering it: one pass, but it
    cannot see what later blocks need (on the digits ViT it ranks block 0's attention, the most harmful
    to drop, as the least important)."""
    check_criterion('criterion', criterion, BRANCH_CRITERIA)
    if criterion == 'ablation':
        calib = calib[:max_images]
    with eval_mode(model):
        branches = []  # (attention, MLP) of each block as functions of the stream, with the block's kwargs
        for blk, kw in zip(model.blocks, block_kwargs(model, calib)):
            ls1, ls2 = roles.branch_scale(blk, 1), roles.branch_scale(blk, 2)
            branches += [lambda t, blk=blk, kw=kw, ls=ls1: ls(blk.attn(roles.branch_input(blk, 1)(t), **kw)),
                         lambda t, blk=blk, ls=ls2: ls(blk.mlp(roles.branch_input(blk, 2)(t)))]
        x = prefix(model, calib, batch_size)
        inputs, means, local = [], [], []
        for f in branches:
            out = apply(f, x, batch_size)
            inputs.append(x)
            means.append(out.mean(dim=(0, 1)))
            local.append(out.double().norm() / x.double().norm())
            x = x + out
        if criterion == 'norm':
            scores = torch.stack(local)
        else:
            final_norm = getattr(model, 'norm', nn.Identity())
            ref = apply(final_norm, x, batch_size).double()
            scores = []
            for j in range(len(branches)):
                y = inputs[j] + means[j]
                for f in branches[j + 1:]:
                    y = y + apply(f, y, batch_size)
                scores.append((apply(final_norm, y, batch_size).double() - ref).norm() / ref.norm())
            scores = torch.stack(scores)
    return scores[0::2].float(), scores[1::2].float()


def choose_dropped(model: nn.Module, calib: torch.Tensor, spec: dict, batch: int, notes: List[str]) -> dict:
    """Replace drop counts in `spec` by the block indices of the least contributing branches."""
    scores = dict(zip(DROP_KEYS, branch_scores(model, calib, batch)))
    spec = dict(spec)
    for key in DROP_KEYS:
        n = spec[key]
        if isinstance(n, int):
            spec[key] = select_top(-scores[key], n).tolist() if n else []
            if n:
                notes.append(f'{key}: blocks {spec[key]} (output change when dropped '
                             + ', '.join(f'{scores[key][j]:.3g}' for j in spec[key]) + ')')
    return spec
