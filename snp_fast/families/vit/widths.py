"""The ViT family's pruning ratios (fraction REMOVED) -> target widths.

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
from typing import Dict, List, Optional, Union

from ...presets import INFO_KEYS, list_presets, load_preset, preset_model
from ...ratios import check_ratio
from ...ratios import keep_count
from .structure import BlockDims, ModelDims, model_dims

__all__ = ['resolve_ratios', 'target_dims', 'preset_mismatch', 'DROP_KEYS', 'RATIO_KEYS']

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


def preset_mismatch(name: str, dims: ModelDims) -> Optional[str]:
    """A preset's ratios were chosen for one architecture (its 'model'). Another family's preset, or one for
    another depth, is refused (ValueError); on other widths its ratios still apply but the MACs it quotes do
    not: that is returned, to be warned about (None: the preset's own widths, or an unknown name)."""
    if name not in list_presets():
        return None  # (resolve_ratios names the available ones)
    p = load_preset(name)
    if p.get('family', 'vit') != 'vit':
        raise ValueError(f"preset {name!r} is for {p.get('model')}, not a ViT (the {p['family']} family)")
    made_for = preset_model(p)
    if made_for is None:
        return None
    want = model_dims(made_for)
    if len(want.blocks) != len(dims.blocks):
        raise ValueError(f"preset {name!r} is for {p['model']} ({len(want.blocks)} blocks); this model has "
                         f'{len(dims.blocks)}')
    if want == dims:
        return None
    return (f"preset {name!r} was chosen for {p['model']} (embedding {want.embed}, fc1 {want.blocks[0].mlp}); "
            f"this model's widths differ (embedding {dims.embed}, fc1 {dims.blocks[0].mlp}): the ratios apply, "
            'the MACs the preset quotes do not')


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
