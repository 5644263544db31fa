"""Automatic per-block allocation: pruning ratios that reach a MACs (--flops) or parameter (--params) target.

The rule (one global knob, like the authors' hand-made presets, which prune deeper blocks more):

    t_i      = i / (depth - 1)                  position of block i (0 = first block, 1 = last)
    qk_i(s)  = min(0.9, s * (0.6 + 0.2 * t_i))  fraction of query/key dims removed per head
    v_i(s)   = min(0.9, s * (0.2 + 0.6 * t_i))  fraction of value dims removed per head
    mlp_i(s) = min(0.9, s * (0.2 + 0.6 * t_i))  fraction of fc1 neurons removed
    embed(s) = min(0.5, s * 0.2)                fraction of residual-stream channels removed

Optionally (heads=h, "SNP + Head") every block first loses the fraction h of its whole heads
(per-block rounding as in prune()), and the rule above then thins the kept heads.

At s = 1 this is close to the authors' DeiT-S 2.0 GMACs setting (q/k 0.61 -> 0.8, v and fc1 0.2 ->
0.8, embedding 0.2). Every ratio grows with s, so the model's MACs (or parameters) fall monotonically
with s, and s is found by bisection on [0, S_MAX]. When the widths are too coarse for the closest s to
land within `tol` (default 2 %) of the target (tiny models, large round_to), single widths (the
embedding, or one block's fc1) are then moved one step at a time, greedily, towards the target; if that
still misses, an error says what is reachable. Widths are counted exactly as
prune() counts them (snp_fast.ratios.target_dims, per-head rounding), optionally rounded to multiples
of `round_to` (see round_dims), and the MACs are counted by snp_fast.count_macs on a meta-device copy
(no compute, no memory), so the achieved value equals what prune() reports.

"MACs" are multiply-accumulates of one image at the model's input size, the unit of the paper's
"GFLOPs" (DeiT-S: 4.6 G).
"""
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .macs import count_macs, count_params, meta_copy
from .families import vit
from .families.vit import BlockDims, ModelDims
from .families.vit import DROP_KEYS, resolve_ratios, target_dims

__all__ = ['Allocation', 'allocate', 'profile_ratios', 'round_dims', 'ratios_for_dims', 'dims_cost',
           'parse_quantity', 'format_quantity', 'MAX_RATIO', 'MAX_EMBED_RATIO', 'S_MAX']

MAX_RATIO = 0.9        # never remove more than 90 % of a block's q/k, v or fc1 dims
MAX_EMBED_RATIO = 0.5  # nor more than half of the residual stream
S_MAX = 5.0            # at s = 5 every ratio has reached its cap
PROFILE = {'qk': (0.6, 0.2), 'v': (0.2, 0.6), 'mlp': (0.2, 0.6), 'embed': 0.2}  # (at first block, added by last)

_SUFFIX = {'': 1.0, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12}


def parse_quantity(text: str, what: str = 'value') -> float:
    """'2.0G' -> 2e9, '600M' -> 6e8, '22k' -> 2.2e4, '1.5e9' -> 1.5e9 (case-insensitive)."""
    m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)\s*', str(text))
    if not m:
        raise ValueError(f'{what} {text!r} is not a number with an optional K/M/G/T suffix (e.g. 2.0G, 600M)')
    v = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not v > 0 or math.isinf(v):
        raise ValueError(f'{what} {text!r} must be positive')
    return v


def format_quantity(v: float) -> str:
    for s, f in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(v) >= f:
            return f'{v / f:.3f}{s}'
    return f'{v:.0f}'


def profile_ratios(s: float, depth: int, heads: float = 0.0, fixed_qk: bool = False) -> Dict:
    """The allocation rule above, as a ratios dict {'blocks': [...], 'embed'} (fractions removed).
    fixed_qk: the model's q/k dims cannot be pruned (RoPE, qk_norm): their ratio is 0."""
    blocks = []
    for i in range(depth):
        t = i / (depth - 1) if depth > 1 else 1.0
        blocks.append({k: min(MAX_RATIO, max(0.0, s * (a + b * t))) for k, (a, b) in
                       ((k, PROFILE[k]) for k in ('qk', 'v', 'mlp'))})
        blocks[-1]['heads'] = heads
        if fixed_qk:
            blocks[-1]['qk'] = 0.0
    return {'blocks': blocks, 'embed': min(MAX_EMBED_RATIO, max(0.0, s * PROFILE['embed']))}


def _round_width(keep: int, width: int, n: int) -> int:
    if n <= 1 or width < n or keep == width or keep == 0:  # 0 = a dropped branch stays dropped
        return keep
    k = max(n, int(math.floor(keep / n + 0.5)) * n)
    return k if k <= width else keep


def round_dims(orig: ModelDims, dims: ModelDims, n: int) -> ModelDims:
    """Kept widths rounded to the nearest multiple of n (at least n) where the original width allows it.

    A width is left as is when the original is narrower than n, when nothing is pruned, or when the
    rounded value would exceed the original width.
    """
    if n <= 1:
        return dims
    return ModelDims(
        _round_width(dims.embed, orig.embed, n),
        [BlockDims(b.heads, _round_width(b.qk, o.qk, n), _round_width(b.v, o.v, n), _round_width(b.mlp, o.mlp, n))
         for b, o in zip(dims.blocks, orig.blocks)])


def ratios_for_dims(orig: ModelDims, dims: ModelDims) -> Dict:
    """The ratios dict that makes prune() produce exactly `dims` from a model of widths `orig`."""
    kept = lambda b, o: b if b.heads else o  # noqa: E731 -- a dropped attention is listed in drop_attn
    spec = {'blocks': [{'qk': (o.qk - kept(b, o).qk) / o.qk, 'v': (o.v - kept(b, o).v) / o.v,
                        'mlp': (o.mlp - b.mlp) / o.mlp if b.mlp else 0.0,
                        'heads': (o.heads - kept(b, o).heads) / o.heads}
                       for b, o in zip(dims.blocks, orig.blocks)],
            'embed': (orig.embed - dims.embed) / orig.embed,
            'drop_attn': [i for i, b in enumerate(dims.blocks) if b.heads == 0],
            'drop_mlp': [i for i, b in enumerate(dims.blocks) if b.mlp == 0]}
    check = target_dims(orig, resolve_ratios(spec, len(orig.blocks)), [])
    if check != dims:  # pragma: no cover - guards the rounding arithmetic of target_dims
        raise RuntimeError(f'internal error: ratios {spec} give {check} instead of {dims}')
    return spec


def dims_cost(model: nn.Module, dims: ModelDims, metric: str = 'macs', input_size=None) -> int:
    """MACs or parameters of `model` pruned to `dims`, computed on the meta device."""
    m = vit.apply_dims(meta_copy(model), dims)
    if metric == 'macs':
        return count_macs(m, input_size)
    if metric == 'params':
        return count_params(m)
    raise ValueError(f'metric must be "macs" or "params", got {metric!r}')


@dataclass
class Allocation:
    """Per-block ratios reaching a target; `ratios` goes straight to snp_fast.prune(ratios=...)."""
    metric: str
    target: float
    achieved: int
    original: int
    scale: float
    dims: ModelDims
    ratios: Dict
    round_to: int = 1
    evaluations: int = 0
    history: List[Tuple[float, int]] = field(default_factory=list)

    @property
    def rel_error(self) -> float:
        return self.achieved / self.target - 1.0

    def describe(self) -> str:
        unit = 'MACs' if self.metric == 'macs' else 'params'
        return (f'allocation: {unit} target {format_quantity(self.target)} -> {format_quantity(self.achieved)} '
                f'({self.rel_error:+.2%}; unpruned {format_quantity(self.original)}), global scale s = {self.scale:.4f}'
                + (f', widths rounded to multiples of {self.round_to}' if self.round_to > 1 else ''))

    def to_dict(self) -> dict:
        return {'metric': self.metric, 'target': self.target, 'achieved': self.achieved, 'original': self.original,
                'rel_error': self.rel_error, 'scale': self.scale, 'round_to': self.round_to,
                'rule': 'snp_fast.allocate.profile_ratios', 'dims': self.dims.to_dict(), 'ratios': self.ratios}


def allocate(model: nn.Module, target: float, metric: str = 'macs', round_to: int = 1, tol: float = 0.02,
             input_size=None, iters: int = 30, heads: float = 0.0) -> Allocation:
    """Find s so that the model pruned with profile_ratios(s, heads=heads) has `target` MACs/params (within tol).

    heads: fraction of whole heads removed from every block before the rule thins the kept heads."""
    if not 0.0 <= heads < 1.0:
        raise ValueError(f'heads must be a fraction of heads removed in [0, 1), got {heads}')
    if metric not in ('macs', 'params'):
        raise ValueError(f'metric must be "macs" or "params", got {metric!r}')
    if round_to < 1:
        raise ValueError(f'round_to must be >= 1, got {round_to}')
    vit.check_supported(model)
    meta = model if all(p.is_meta for p in model.parameters()) else meta_copy(model)
    orig = vit.model_dims(meta)
    depth = len(orig.blocks)
    fixed_qk = bool(vit.fixed_qk_reason(meta))  # RoPE / qk_norm: q/k stay whole, the rest makes up the target
    unit = 'MACs' if metric == 'macs' else 'parameters'
    flag = '--flops' if metric == 'macs' else '--params'
    cache: Dict[str, int] = {}
    history: List[Tuple[float, int]] = []

    def dims_at(s: float) -> ModelDims:
        d = target_dims(orig, resolve_ratios(profile_ratios(s, depth, heads, fixed_qk), depth), [])
        return round_dims(orig, d, round_to)

    def cost(s: float) -> int:
        c = _cached_cost(cache, meta, dims_at(s), metric, input_size)
        history.append((s, c))
        return c

    original = dims_cost(meta, orig, metric, input_size)
    if target > original * (1 + tol):
        raise ValueError(f'{flag} target {format_quantity(target)} {unit} is above the unpruned model '
                         f'({format_quantity(original)}): nothing to prune')
    smallest = cost(S_MAX)
    if target < smallest * (1 - tol):
        capped = 'v and fc1 dims (q/k stay whole on this model: RoPE / qk_norm)' if fixed_qk else 'q/k, v and fc1 dims'
        caps = (f'{MAX_RATIO:.0%} of {capped} and {MAX_EMBED_RATIO:.0%} of the embedding removed'
                + (f', widths rounded to multiples of {round_to}' if round_to > 1 else ''))
        raise ValueError(f'{flag} target {format_quantity(target)} {unit} is unreachable: the smallest model the '
                         f'allocation rule makes ({caps}) has {format_quantity(smallest)} (unpruned '
                         f'{format_quantity(original)})' + ('; try a smaller --round-to' if round_to > 1 else ''))
    lo, hi = 0.0, S_MAX          # cost(lo) >= target >= cost(hi)
    best = min(((0.0, original), (S_MAX, smallest)), key=lambda sc: abs(sc[1] - target))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        c = cost(mid)
        if abs(c - target) < abs(best[1] - target):
            best = (mid, c)
        if c > target:
            lo = mid
        else:
            hi = mid
        if abs(best[1] - target) <= 0.001 * target or hi - lo < 1e-6:
            break
    s, achieved = best
    dims = dims_at(s)
    if abs(achieved / target - 1) > tol:   # coarse steps (small model, large round_to): nudge single widths
        dims, achieved = _refine(dims, orig, achieved, target, tol, max(1, round_to),
                                 lambda d: _cached_cost(cache, meta, d, metric, input_size))
    if abs(achieved / target - 1) > tol:
        raise ValueError(f'{flag} target {format_quantity(target)} {unit} cannot be met within {tol:.0%}: the closest '
                         f'setting has {format_quantity(achieved)}'
                         + (f' (widths rounded to multiples of {round_to}; try a smaller --round-to)' if round_to > 1
                            else ' (the model is too small for this granularity)'))
    return Allocation(metric, float(target), int(achieved), int(original), s, dims, ratios_for_dims(orig, dims),
                      round_to, len(cache), history)


def _cached_cost(cache: Dict[str, int], meta: nn.Module, dims: ModelDims, metric: str, input_size) -> int:
    key = repr(dims.to_dict())
    if key not in cache:
        cache[key] = dims_cost(meta, dims, metric, input_size)
    return cache[key]


def _refine(dims: ModelDims, orig: ModelDims, achieved: int, target: float, tol: float, step: int, cost,
            rounds: int = 32) -> Tuple[ModelDims, int]:
    """Greedy: move the embedding or one block's fc1 width by one step (round_to) while that brings the
    cost closer to the target; stops within tol/4 of the target or when no single move helps. Widths stay
    within the rule's caps (MAX_RATIO, MAX_EMBED_RATIO). Every block's fc1 step costs the same (same tokens,
    same embedding), so fc1 moves go round-robin, deepest block first when removing (the rule prunes deeper
    blocks more) and shallowest first when adding back, instead of piling onto one block."""
    import copy
    floor_embed = _min_width(orig.embed, MAX_EMBED_RATIO, step)
    moves: Dict[object, int] = {}
    for _ in range(rounds):
        if abs(achieved / target - 1) <= tol / 4:
            break
        cands = []  # (which width, dims after the move)
        for delta in (-step, step):
            e = dims.embed + delta
            if floor_embed <= e <= orig.embed:
                d = copy.deepcopy(dims)
                d.embed = e
                cands.append(('embed', d))
            fits = [i for i, (b, o) in enumerate(zip(dims.blocks, orig.blocks))  # (a dropped MLP stays dropped)
                    if b.mlp and _min_width(o.mlp, MAX_RATIO, step) <= b.mlp + delta <= o.mlp]
            if fits:
                i = min(fits, key=lambda i: (moves.get(i, 0), -i if delta < 0 else i))
                d = copy.deepcopy(dims)
                d.blocks[i].mlp += delta
                cands.append((i, d))
        if not cands:
            break
        c, key, d = min(((cost(d), key, d) for key, d in cands), key=lambda x: abs(x[0] - target))
        if abs(c - target) >= abs(achieved - target):
            break
        dims, achieved = d, c
        moves[key] = moves.get(key, 0) + 1
    return dims, achieved


def _min_width(width: int, max_ratio: float, step: int) -> int:
    """The narrowest width a cap of max_ratio removed allows, in whole steps where the width has them."""
    keep = width - int(math.floor(max_ratio * width + 0.5))  # as ratios.keep_count rounds
    return keep if step > width else min(width, math.ceil(keep / step) * step)


def rounded_ratios(model: nn.Module, spec, round_to: int) -> Tuple[Dict, ModelDims]:
    """Any ratios spec (float, dict, preset name) with its widths rounded to multiples of round_to."""
    orig = vit.model_dims(model)
    resolved = resolve_ratios(spec, len(orig.blocks))
    # branches to drop given as a count: prune() picks them from calibration scores; round the other widths
    counts = {k: resolved[k] for k in DROP_KEYS if isinstance(resolved[k], int)}
    dims = round_dims(orig, target_dims(orig, {**resolved, **{k: [] for k in counts}}, []), round_to)
    return {**ratios_for_dims(orig, dims), **counts}, dims


def check_round_to(n: Optional[int]) -> int:
    if n is None:
        return 1
    if n < 1:
        raise ValueError(f'--round-to must be >= 1, got {n}')
    return n
