"""EfficientFormer's ratio forms -> target widths, and its presets."""
from typing import List, Optional

from ...presets import INFO_KEYS, list_presets, load_preset, preset_model
from ...ratios import check_ratio, keep_count
from .structure import EfficientFormerBlockDims, EfficientFormerDims, model_dims

__all__ = ['RATIO_KEYS', 'preset_mismatch', 'resolve_ratios', 'target_dims']

RATIO_KEYS = ('qk', 'v', 'mlp', 'heads')


def preset_mismatch(name: str, dims: EfficientFormerDims) -> Optional[str]:
    """The EfficientFormer presets are uniform ratios: they apply to every variant, the MACs they quote only to
    their own model. A warning for another variant (None: the preset's own widths and depth)."""
    p = load_preset(name)
    made_for = preset_model(p)
    if made_for is None:
        return None
    want = model_dims(made_for)
    if want == dims:
        return None
    return (f"preset {name!r} was chosen for {p['model']} (stage widths {want.stages}, {len(want.blocks)} "
            f'MetaBlocks); this model has stage widths {dims.stages} and {len(dims.blocks)} MetaBlocks: the ratios '
            'apply, the MACs the preset quotes do not')


def resolve_ratios(spec, dims: EfficientFormerDims) -> dict:
    """Any accepted ratio form -> {'stages': [r per stage], 'blocks': [{'qk','v','mlp','heads'}] per MetaBlock}.

    Forms: a float (q/k, v, mlp and stage widths alike; heads are not removed), a dict with keys from
    'qk', 'v', 'mlp', 'heads', 'embed' ('embed' a float for every stage or a list, one per stage),
    the same dict with 'blocks': [one dict per MetaBlock, in order] instead of qk/v/mlp/heads, or an
    EfficientFormer preset name.
    """
    if isinstance(spec, str):
        if spec not in list_presets():
            raise ValueError(f'unknown preset {spec!r}; available: {list_presets()}')
        preset = load_preset(spec)
        if preset.get('family') != 'efficientformer':
            raise ValueError(f'preset {spec!r} is for {preset.get("model")}, not an EfficientFormer')
        spec = {k: v for k, v in preset.items() if k in RATIO_KEYS + ('embed', 'blocks')}
    n_st, n_bl = len(dims.stages), len(dims.blocks)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        r = check_ratio(spec, 'ratios')
        return {'stages': [r] * n_st, 'blocks': [dict(qk=r, v=r, mlp=r, heads=0.0) for _ in range(n_bl)]}
    if not isinstance(spec, dict):
        raise ValueError(f'ratios must be a float, a dict or a preset name, got {type(spec).__name__}')
    unknown = set(spec) - set(RATIO_KEYS) - {'embed', 'blocks'} - INFO_KEYS  # (a loaded preset's description)
    if unknown:
        raise ValueError(f'ratios has unknown keys {sorted(unknown)}; expected {list(RATIO_KEYS) + ["embed"]} or '
                         '"blocks"')
    embed = spec.get('embed', 0.0)
    if isinstance(embed, (list, tuple)):
        if len(embed) != n_st:
            raise ValueError(f'ratios embed gives {len(embed)} stage ratios but the model has {n_st} stages')
        stages = [check_ratio(e, f'embed[{i}]') for i, e in enumerate(embed)]
    else:
        stages = [check_ratio(embed, 'embed')] * n_st
    if 'blocks' in spec:
        stray = set(spec) & set(RATIO_KEYS)
        if stray:
            raise ValueError(f'ratios has both "blocks" and {sorted(stray)}; give per-block ratios inside "blocks"')
        if not isinstance(spec['blocks'], (list, tuple)) or len(spec['blocks']) != n_bl:
            raise ValueError(f'ratios "blocks" must list one dict per MetaBlock ({n_bl} in this model)')
        blocks = []
        for i, (b, bd) in enumerate(zip(spec['blocks'], dims.blocks)):
            if not isinstance(b, dict):
                raise ValueError(f'ratios blocks[{i}] must be a dict with keys {list(RATIO_KEYS)}, got {b!r}')
            bad = set(b) - set(RATIO_KEYS)
            if bad:
                raise ValueError(f'ratios blocks[{i}] has unknown keys {sorted(bad)}; expected {list(RATIO_KEYS)}')
            r = {k: check_ratio(b.get(k, 0.0), f'blocks[{i}].{k}') for k in RATIO_KEYS}
            if not bd.heads and any(r[k] for k in ('qk', 'v', 'heads')):
                raise ValueError(f'ratios blocks[{i}] ({bd.name}) is a pooling block: only "mlp" applies there')
            blocks.append(r)
        return {'stages': stages, 'blocks': blocks}
    per = {k: check_ratio(spec.get(k, 0.0), k) for k in RATIO_KEYS}
    return {'stages': stages, 'blocks': [dict(per) for _ in range(n_bl)]}


def target_dims(orig: EfficientFormerDims, ratios: dict, notes: List[str]) -> EfficientFormerDims:
    stages = [keep_count(c, r, f'stages.{s} width', notes)
              for s, (c, r) in enumerate(zip(orig.stages, ratios['stages']))]
    blocks = []
    for b, r in zip(orig.blocks, ratios['blocks']):
        mlp = keep_count(b.mlp, r['mlp'], f'{b.name} mlp', notes)
        if not b.heads:
            blocks.append(EfficientFormerBlockDims(b.name, b.stage, mlp))
            continue
        blocks.append(EfficientFormerBlockDims(
            b.name, b.stage, mlp, keep_count(b.heads, r['heads'], f'{b.name} heads', notes),
            keep_count(b.qk, r['qk'], f'{b.name} q/k per head', notes),
            keep_count(b.v, r['v'], f'{b.name} v per head', notes)))
    return EfficientFormerDims(stages, blocks)
