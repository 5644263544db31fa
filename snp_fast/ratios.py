"""Pruning ratios (the fraction REMOVED) as every family reads them: one ratio checked, and a width's kept
count. Each family's own ratio forms live in its folder (families/*/widths.py).

Counts: removed = floor(ratio · width + 0.5) per head (q/k, v) or per block (fc1) or per model
(embedding); this per-head rounding reproduces the MACs quoted for the authors' presets. A ratio that
would remove every dim of a head keeps one (never zero): the count is clamped and a warning says so.
"""
import math
import warnings
from typing import List

__all__ = ['check_ratio', 'keep_count']


def check_ratio(value, where: str) -> float:
    """`value` as a float in [0, 1), or ValueError naming `where`."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'ratio {where} must be a number in [0, 1), got {value!r}') from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise ValueError(f'ratio {where} = {r} is outside [0, 1) (it is the fraction of dims REMOVED)')
    return r


def keep_count(width: int, ratio: float, where: str, notes: List[str]) -> int:
    """How many of `width` dims a ratio keeps (at least one; a clamp is warned about and noted)."""
    keep = width - int(math.floor(ratio * width + 0.5))
    if keep < 1:
        msg = f'{where}: ratio {ratio} would remove all {width} dims; keeping 1'
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        keep = 1
    return keep
