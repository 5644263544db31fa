"""prune()'s settings, checked once, and the context a pruning run hands to its family's steps."""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import ops
from .refit import DEFAULT_DAMP, RefitStats
from .report import Timer
from .scores import EMBED_CRITERIA, HEAD_CRITERIA, QK_CRITERIA, ROW_CRITERIA, check_criterion, row_scores
from .selection import FixedSelection, Selector

__all__ = ['PruneSettings', 'PruneContext']


@dataclass(frozen=True)
class PruneSettings:
    """How to prune (every prune() argument but the model, the images and the targets); see prune()."""
    qk_criterion: str = 'snp'
    v_criterion: str = 'redundancy'
    mlp_criterion: str = 'redundancy'
    embed_criterion: str = 'redundancy'
    head_criterion: str = 'snp'
    gamma: Optional[int] = None
    refit: Union[bool, str] = True
    damp: float = DEFAULT_DAMP
    refit_tokens: Optional[int] = None
    batch_size: int = 32
    backend: str = 'auto'
    precision: str = 'fp32'

    def check(self, device: torch.device) -> None:
        """ValueError naming the first argument that is out of range."""
        check_criterion('qk_criterion', self.qk_criterion, QK_CRITERIA)
        check_criterion('v_criterion', self.v_criterion, ROW_CRITERIA)
        check_criterion('mlp_criterion', self.mlp_criterion, ROW_CRITERIA)
        check_criterion('embed_criterion', self.embed_criterion, EMBED_CRITERIA)
        check_criterion('head_criterion', self.head_criterion, HEAD_CRITERIA)
        if self.batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
        ops.check_backend(self.backend, device)
        ops.check_precision(self.precision)
        if self.gamma is not None and self.gamma < 1:
            raise ValueError(f'gamma must be >= 1, got {self.gamma}')
        if self.refit not in (True, False, 'sequential', 'oneshot'):
            raise ValueError(f'refit must be True/"sequential", "oneshot" or False, got {self.refit!r}')
        if self.refit_tokens is not None and (not isinstance(self.refit_tokens, int) or self.refit_tokens < 1):
            raise ValueError(f'refit_tokens must be None (all tokens) or a positive int, got {self.refit_tokens!r}')
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f'damp must be a finite number >= 0, got {self.damp!r}')

    def needs_data(self) -> bool:
        """Whether these criteria or the re-fit read calibration images."""
        return bool(self.refit) or self.qk_criterion == 'snp' or 'activation' in (
            self.v_criterion, self.mlp_criterion, self.embed_criterion)


@dataclass
class PruneContext:
    """One pruning run as its family's hooks see it: the original model, its calibration images (on the model's
    device and dtype, or None), the settings, the widths before and after, the selection hook, the timer, the
    re-fit's statistics and its seeded token sampler."""
    model: nn.Module
    calib: Optional[torch.Tensor]
    settings: PruneSettings
    dims_before: object
    dims_after: object
    timer: Timer
    selector: Optional[Selector] = None
    stats: Dict[str, RefitStats] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def batch(self) -> int:
        return self.settings.batch_size

    @property
    def fixed(self) -> bool:
        """Whether the kept indices are given (prune(selection=<a Selection>)): nothing is scored."""
        return isinstance(self.selector, FixedSelection)

    @property
    def refit(self):
        return self.settings.refit

    def row_scores(self, weight: torch.Tensor, criterion: str, act_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """scores.row_scores, its time on the "redundancy" phase for that criterion (the largest part of selection)."""
        with self.timer('redundancy') if criterion == 'redundancy' else nullcontext():
            return row_scores(weight, criterion, act_sq)

    def wants(self, capture: str) -> bool:
        """Whether the selection hook asked for this capture (Selector.captures)."""
        return self.selector is not None and capture in self.selector.captures
