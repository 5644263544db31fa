"""Widths, selections and ratio forms of a uniform stack of transformer blocks (one residual width; per
block heads, q/k and v widths per head, FFN neurons): shared by the families built that way.

Accepted forms: a float (the same ratio for q/k, v, fc1 and the embedding), a dict
{'qk', 'v', 'mlp', 'heads', 'embed'} applied to every block, a dict {'blocks': [{'qk', 'v', 'mlp',
'heads'}, ...], 'embed'} with one entry per block (the presets' form), or a preset name.
'heads' is the fraction of whole heads removed from a block (default 0); q/k and v ratios then apply
inside the kept heads.

Block (branch) dropping, in either dict form: 'drop_attn' / 'drop_mlp' = a list of block indices
whose attention / MLP branch is removed, or a count n, for which prune() drops the n branches whose
removal changes the final features least (branches.branch_scores). A dropped branch is the zero-width limit (0 heads,
0 fc1 neurons): its output is the constant bias of attn.proj / mlp.fc2.

Counts: removed = floor(ratio · width + 0.5) per head (q/k, v) or per block (fc1) or per model
(embedding); this per-head rounding reproduces the MACs quoted for the authors' presets. A ratio that
would remove every dim of a head keeps one (never zero): the count is clamped and a warning says so.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Union

import torch

from ..presets import INFO_KEYS, list_presets, load_preset
from ..ratios import check_ratio, keep_count

__all__ = ['BlockDims', 'ModelDims', 'BlockSelection', 'Selection', 'resolve_ratios', 'target_dims', 'width_lines',
           'DROP_KEYS', 'RATIO_KEYS']


@dataclass
class BlockDims:
    heads: int
    qk: int     # query/key width per head
    v: int      # value width per head
    mlp: int    # fc1 hidden neurons


@dataclass
class ModelDims:
    embed: int
    blocks: List[BlockDims]

    def to_dict(self) -> dict:
        return {'embed': self.embed, 'blocks': [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'ModelDims':
        return cls(embed=int(d['embed']), blocks=[BlockDims(**{k: int(v) for k, v in b.items()}) for b in d['blocks']])


@dataclass
class BlockSelection:
    qk: torch.Tensor   # (kept heads, kept q/k dims per head), int64, sorted per head; dims index within a head
    v: torch.Tensor    # (kept heads, kept v dims per head)
    mlp: torch.Tensor  # (kept fc1 neurons,); empty = the MLP branch is dropped
    heads: Optional[torch.Tensor] = None  # kept ORIGINAL head indices, sorted; None = all heads; empty = attn dropped

    def head_index(self) -> torch.Tensor:
        return torch.arange(self.qk.shape[0]) if self.heads is None else self.heads


@dataclass
class Selection:
    embed: torch.Tensor             # kept residual-stream channels
    blocks: List[BlockSelection]

    def dims(self) -> ModelDims:
        return ModelDims(self.embed.numel(), [BlockDims(b.qk.shape[0], b.qk.shape[1], b.v.shape[1], b.mlp.numel())
                                              for b in self.blocks])

    def to_dict(self) -> dict:
        return {'embed': self.embed.tolist(),
                'blocks': [{'heads': b.head_index().tolist(), 'qk': b.qk.tolist(), 'v': b.v.tolist(),
                            'mlp': b.mlp.tolist()} for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'Selection':
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        blocks = []
        for b in d['blocks']:
            heads = t(b['heads']) if 'heads' in b else None  # recipes before head pruning: all heads
            n = len(b['qk'])
            # a dropped attention has (0, 0) selections, which JSON stores as []
            per_head = lambda x: t(x).reshape(len(x), -1) if n else torch.zeros(0, 0, dtype=torch.long)  # noqa: E731
            blocks.append(BlockSelection(per_head(b['qk']), per_head(b['v']), t(b['mlp']), heads))
        return cls(t(d['embed']), blocks)


RatioSpec = Union[float, str, Dict]
RATIO_KEYS = _KEYS = ('qk', 'v', 'mlp', 'heads')
DROP_KEYS = ('drop_attn', 'drop_mlp')



def _check_drop(value, key: str, depth: int):
    """A count (int, resolved by prune() from scores) or a sorted list of distinct block indices."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= depth:
            raise ValueError(f'ratios {key}={value}: a number of blocks must be in [0, {depth}]')
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        bad = [i for i in value if not 0 <= i < depth]
        if bad:
            raise ValueError(f'ratios {key}: block indices {bad} outside [0, {depth - 1}]')
        if len(set(value)) != len(value):
            raise ValueError(f'ratios {key}: repeated block indices in {list(value)}')
        return sorted(value)
    raise ValueError(f'ratios {key} must be a number of blocks (int) or a list of block indices, got {value!r}')


def resolve_ratios(spec: RatioSpec, depth: int) -> Dict:
    """Normalise any accepted form to {'blocks': [{'qk','v','mlp','heads'}] * depth, 'embed',
    'drop_attn', 'drop_mlp'}."""
    if isinstance(spec, str):
        if spec not in list_presets():
            raise ValueError(f'unknown preset {spec!r}; available: {list_presets()}')
        spec = load_preset(spec)
    if isinstance(spec, (int, float)):
        r = check_ratio(spec, 'ratios')
        return {'blocks': [dict(qk=r, v=r, mlp=r, heads=0.0) for _ in range(depth)], 'embed': r,
                'drop_attn': [], 'drop_mlp': []}
    if not isinstance(spec, dict):
        raise ValueError(f'ratios must be a float, a dict or a preset name, got {type(spec).__name__}')
    embed = check_ratio(spec.get('embed', 0.0), 'embed')
    drops = {k: _check_drop(spec.get(k, []), k, depth) for k in DROP_KEYS}
    if 'blocks' in spec:
        stray = set(spec) & set(_KEYS)  # they would be ignored
        if stray:
            raise ValueError(f'ratios has both "blocks" and {sorted(stray)}; give per-block ratios inside "blocks"')
        unknown = set(spec) - {'blocks', 'embed', *DROP_KEYS} - INFO_KEYS
        if unknown:
            raise ValueError(f'ratios has unknown keys {sorted(unknown)}; expected "blocks", "embed", '
                             f'{", ".join(repr(k) for k in DROP_KEYS)} (and a preset\'s descriptive keys)')
        blocks = spec['blocks']
        if not isinstance(blocks, (list, tuple)):
            raise ValueError(f'ratios "blocks" must be a list of one dict per block, got {type(blocks).__name__}')
        if len(blocks) != depth:
            raise ValueError(f'ratios give {len(blocks)} blocks but the model has {depth}')
        out = []
        for i, b in enumerate(blocks):
            if not isinstance(b, dict):
                raise ValueError(f'ratios blocks[{i}] must be a dict with keys {list(_KEYS)}, got {b!r}')
            unknown = set(b) - set(_KEYS)
            if unknown:
                raise ValueError(f'ratios blocks[{i}] has unknown keys {sorted(unknown)}; expected {list(_KEYS)}')
            out.append({k: check_ratio(b.get(k, 0.0), f'blocks[{i}].{k}') for k in _KEYS})
        return {'blocks': out, 'embed': embed, **drops}
    unknown = set(spec) - set(_KEYS) - {'embed', *DROP_KEYS} - INFO_KEYS
    if unknown:
        raise ValueError(f'ratios has unknown keys {sorted(unknown)}; expected {list(_KEYS) + ["embed", *DROP_KEYS]} '
                         'or "blocks"')
    per = {k: check_ratio(spec.get(k, 0.0), k) for k in _KEYS}
    return {'blocks': [dict(per) for _ in range(depth)], 'embed': embed, **drops}


def _dropped(ratios: Dict, key: str) -> List[int]:
    value = ratios.get(key, [])
    if isinstance(value, int):
        if value:
            raise ValueError(f'ratios {key}={value} is a number of blocks: prune() picks them from calibration '
                             'scores; give a list of block indices to size a model without data')
        return []
    return list(value)



def target_dims(orig: ModelDims, ratios: Dict, notes: List[str]) -> ModelDims:
    drop_attn, drop_mlp = _dropped(ratios, 'drop_attn'), _dropped(ratios, 'drop_mlp')
    blocks = []
    for i, (b, r) in enumerate(zip(orig.blocks, ratios['blocks'])):
        mlp = 0 if i in drop_mlp else keep_count(b.mlp, r['mlp'], f'blocks.{i} fc1', notes)
        if i in drop_attn:  # zero-width limit of the attention branch
            blocks.append(BlockDims(heads=0, qk=0, v=0, mlp=mlp))
            continue
        blocks.append(BlockDims(
            heads=keep_count(b.heads, r.get('heads', 0.0), f'blocks.{i} heads', notes),
            qk=keep_count(b.qk, r['qk'], f'blocks.{i} q/k per head', notes),
            v=keep_count(b.v, r['v'], f'blocks.{i} v per head', notes),
            mlp=mlp))
    return ModelDims(keep_count(orig.embed, ratios['embed'], 'embedding', notes), blocks)


def width_lines(before: ModelDims, after: ModelDims, stream: str = 'embed', unit: str = 'block') -> List[str]:
    """The report's width table: the stream's width, then per block heads, q/k and v per head, FFN neurons
    (0 heads / 0 fc1: the branch is dropped)."""
    lines = [f'{stream} {before.embed} -> {after.embed}',
             f'{unit:>5} {"heads":>8} {"q/k per head":>13} {"v per head":>11} {"fc1":>11}']
    for i, (x, y) in enumerate(zip(before.blocks, after.blocks)):
        lines.append(f'{i:>5} {x.heads:>2} -> {y.heads:<2} {x.qk:>5} -> {y.qk:<4} {x.v:>4} -> {y.v:<4} '
                     f'{x.mlp:>4} -> {y.mlp:<5}')
    return lines
