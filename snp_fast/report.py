"""What prune() did, as a report and as the recipe a pruned model carries (how to rebuild it, what was kept).

The report's width table comes from the model's family (Family.width_lines), so the report, `snp-fast inspect`
and any future family print the same table."""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch.nn as nn

from .version import __version__
from .macs import count_macs, count_params
from .refit import RefitStats

__all__ = ['PruneReport', 'Timer', 'PHASES', 'RECIPE_FORMAT', 'SETTING_KEYS', 'make_recipe', 'totals_line']

RECIPE_FORMAT = 'snp_fast.recipe/1'
PHASES = ('calibration', 'qk_scoring', 'redundancy', 'selection', 'slicing', 'refit', 'rebuild')
# prune() arguments recorded in the recipe's settings (with the resolved ratios and the calibration count)
SETTING_KEYS = ('preset', 'qk_criterion', 'v_criterion', 'mlp_criterion', 'embed_criterion', 'head_criterion',
                'gamma', 'refit', 'damp', 'refit_tokens')


def totals_line(params_before: int, params_after: int, macs_before: int, macs_after: int) -> str:
    return (f'params {params_before / 1e6:.2f}M -> {params_after / 1e6:.2f}M ({params_after / params_before:.1%}),  '
            f'MACs {macs_before / 1e9:.3f}G -> {macs_after / 1e9:.3f}G ({macs_after / macs_before:.1%})')


@dataclass
class PruneReport:
    """What prune() did: sizes before/after, per-block widths, time per phase, re-fit errors."""
    dims_before: object  # the family's dims (families/*: ModelDims, EfficientFormerDims, ...)
    dims_after: object
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    times: Dict[str, float]
    settings: dict
    refit: Dict[str, RefitStats] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # the family's table of widths: (dims before, dims after) -> lines, the first one continuing the totals line
    width_lines: Optional[Callable] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {'dims_before': self.dims_before.to_dict(), 'dims_after': self.dims_after.to_dict(),
                'params_before': self.params_before, 'params_after': self.params_after,
                'macs_before': self.macs_before, 'macs_after': self.macs_after, 'times': dict(self.times),
                'settings': dict(self.settings), 'refit': {k: v.to_dict() for k, v in self.refit.items()},
                'notes': list(self.notes)}

    def size_lines(self) -> List[str]:
        """Totals and the family's width table."""
        totals = totals_line(self.params_before, self.params_after, self.macs_before, self.macs_after)
        if self.width_lines is None:
            return [totals]
        first, *rest = self.width_lines(self.dims_before, self.dims_after)
        return [f'{totals},  {first}', *rest]

    def summary(self) -> str:
        lines = self.size_lines()
        total = sum(self.times.values())
        lines.append('time: ' + ', '.join(f'{k} {v:.2f}s' for k, v in self.times.items() if v > 0)
                     + f'; total {total:.2f}s')
        if self.refit:
            worst = max(self.refit.items(), key=lambda kv: kv[1].err_refit)
            lines.append(f're-fit: {len(self.refit)} layers, worst relative error {worst[1].err_refit:.3g} '
                         f'({worst[0]}, {worst[1].err_sliced:.3g} before)')
        lines += [f'note: {n}' for n in self.notes]
        return '\n'.join(lines)

    def __str__(self) -> str:
        return self.summary()


class Timer:
    """Seconds per phase. Phases nest: time inside an inner phase counts for it alone (the outer one
    pauses), so the phases add up to the whole."""

    def __init__(self):
        self.times = {p: 0.0 for p in PHASES}
        self._open: List[list] = []  # [phase, start of its current stretch], innermost last

    @contextmanager
    def __call__(self, phase: str):
        now = time.perf_counter()
        if self._open:
            outer = self._open[-1]
            self.times[outer[0]] += now - outer[1]
        self._open.append([phase, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            name, t0 = self._open.pop()
            self.times[name] = self.times.get(name, 0.0) + now - t0
            if self._open:
                self._open[-1][1] = now


def make_recipe(family: str, rebuild: dict, dims_before, dims_after, selection, settings: dict) -> dict:
    """The recipe a pruned model carries (model.snp_recipe) and save_pruned writes as recipe.json; `rebuild`: how
    the family rebuilds the unpruned architecture (timm_name / timm_kwargs, or a transformers config)."""
    return {'format': RECIPE_FORMAT, 'snp_fast_version': __version__, 'family': family, **rebuild,
            'dims_before': dims_before.to_dict(), 'dims_after': dims_after.to_dict(),
            'selection': selection.to_dict(), 'settings': settings}


def measure(model: nn.Module, pruned: nn.Module) -> tuple:
    """(params before, after, MACs before, after)."""
    return count_params(model), count_params(pruned), count_macs(model), count_macs(pruned)


