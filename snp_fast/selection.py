"""The selection hook: what decides which members of each group are kept.

prune() chooses, group by group, the members with the highest scores (per head for q/k and v). By default
the scores are the paper's criteria (`*_criterion=` arguments, snp_fast/scores.py). `prune(...,
selection=...)` replaces them, through the same slicing and re-fit:

- a family's Selection (e.g. a recipe's `Selection.from_dict(...)`, or one built by a baseline): exactly
  those indices are kept, and the target widths are the selection's own (no ratios needed);
- a Selector: its `scores(group)` is asked for every group before the built-in criterion; returning None
  falls back to it. This is where new criteria plug in (Torch-Pruning calls it an importance).

    class L1(snp_fast.Selector):
        def scores(self, group):
            if group.kind == 'mlp':
                return group.module.mlp.fc1.weight.abs().sum(1)   # keep the fc1 rows of largest L1 norm
            return None                                           # every other group: the default criterion

    pruned, report = snp_fast.prune(model, calib, 0.5, selection=L1())
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .scores import select_per_head, select_top

__all__ = ['Group', 'Selector', 'FixedSelection', 'GROUP_KINDS', 'choose']

GROUP_KINDS = ('embed', 'heads', 'qk', 'v', 'mlp')


@dataclass
class Group:
    """One coupled group about to be chosen, as a Selector sees it.

    kind: 'embed' (residual-stream channels; for a staged model the width of stage `stage`), 'heads' (whole
        heads of a block), 'qk' (query/key pairs, per kept head), 'v' (value filters, per kept head), 'mlp'
        (FFN hidden neurons).
    where: the block's module name ('blocks.3', 'stages.3.blocks.4'); '' for the model-wide stream.
    block: the block's index among the family's prunable blocks (None for 'embed').
    stage: the stage whose width an 'embed' group is (None: the single residual stream).
    keep: how many members to keep (per head for 'qk' and 'v').
    shape: the shape the scores must have: (members,) or (kept heads, members per head).
    module: the ORIGINAL block (the model for 'embed').
    captured: the block's calibration captures so far (see the families' taps; empty without images):
        'qkv' the fused q/k/v outputs, plus what the Selector's `captures` asked for.
    heads: for 'qk' and 'v', the kept original head indices the rows of the scores stand for.
    """
    kind: str
    where: str
    keep: int
    shape: Tuple[int, ...]
    module: nn.Module
    block: Optional[int] = None
    stage: Optional[int] = None
    captured: dict = field(default_factory=dict, repr=False)
    heads: Optional[torch.Tensor] = None


class Selector:
    """Scores for the groups prune() chooses; subclass and override `scores`.

    captures: extra calibration activations a block run should capture for `scores` (group.captured):
        'fc2_in' (the FFN hidden activations, fc2's input; the FFN is then chosen after the block's run),
        'proj_in' (the attention context, attn.proj's input).
    """
    captures: Tuple[str, ...] = ()

    def scores(self, group: Group) -> Optional[torch.Tensor]:
        """Scores of the group's members, higher = keep, in `group.shape`; None = the built-in criterion."""
        return None


class FixedSelection(Selector):
    """Keeps exactly the indices of a family's Selection (prune(selection=<Selection>) wraps it in this)."""

    def __init__(self, selection):
        self.selection = selection

    def scores(self, group: Group) -> torch.Tensor:
        sel = self.selection
        if group.kind == 'embed':
            idx = sel.stages[group.stage] if group.stage is not None else sel.embed
        else:
            b = sel.blocks[group.block]
            idx = b.head_index() if group.kind == 'heads' and hasattr(b, 'head_index') else getattr(b, group.kind)
        s = torch.zeros(group.shape)
        if len(group.shape) == 1:
            s[idx.long()] = 1.0
        else:
            s.scatter_(1, idx.long().reshape(group.shape[0], -1), 1.0)
        return s


def choose(selector: Optional[Selector], group: Group, default) -> torch.Tensor:
    """The kept members of `group`: the top `group.keep` by the selector's scores, else by `default()`'s (sorted;
    per head for 2-D scores)."""
    s = selector.scores(group) if selector is not None else None
    if s is None:
        s = default()
    elif tuple(s.shape) != tuple(group.shape):
        raise ValueError(f'{type(selector).__name__}.scores gave shape {tuple(s.shape)} for the {group.kind} group of '
                         f'{group.where or "the model"}; expected {tuple(group.shape)}')
    return select_per_head(s, group.keep) if s.dim() == 2 else select_top(s, group.keep)
