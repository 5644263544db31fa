"""Swin's ratio forms -> target widths (EfficientFormer's form; there are no Swin presets)."""
from typing import List, Optional

from ...presets import list_presets
from ...ratios import check_ratio, keep_count
from .structure import SwinBlockDims, SwinDims

__all__ = ['RATIO_KEYS', 'preset_mismatch', 'resolve_ratios', 'target_dims']

RATIO_KEYS = ('qk', 'v', 'mlp', 'heads')


def _no_preset(name: str) -> ValueError:
    known = f'{name!r} is a preset of another model family' if name in list_presets() else f'unknown preset {name!r}'
    return ValueError(f'{known}; there are no Swin presets: give ratios= (a float, or a dict with keys '
                      f'{list(RATIO_KEYS) + ["embed"]})')


def preset_mismatch(name: str, dims: SwinDims) -> Optional[str]:
    raise _no_preset(name)


def resolve_ratios(spec, dims: SwinDims) -> dict:
    """Any accepted ratio form -> {'stages': [r per stage], 'blocks': [{'qk','v','mlp','heads'}] per block}.

    Forms: a float (q/k, v, mlp and stage widths alike; heads are not removed), a dict with keys from
    'qk', 'v', 'mlp', 'heads', 'embed' ('embed' a float for every stage or a list, one per stage), or the same
    dict with 'blocks': [one dict per SwinTransformerBlock, in order] instead of qk/v/mlp/heads.
    """
    if isinstance(spec, str):
        raise _no_preset(spec)
    n_st, n_bl = len(dims.stages), len(dims.blocks)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        r = check_ratio(spec, 'ratios')
        return {'stages': [r] * n_st, 'blocks': [dict(qk=r, v=r, mlp=r, heads=0.0) for _ in range(n_bl)]}
    if not isinstance(spec, dict):
        raise ValueError(f'ratios must be a float or a dict, got {type(spec).__name__}')
    unknown = set(spec) - set(RATIO_KEYS) - {'embed', 'blocks'}
    if unknown:
        raise ValueError(f'ratios has unknown keys {sorted(unknown)}; expected {list(RATIO_KEYS) + ["embed"]} or '
                         '"blocks" (drop_attn / drop_mlp are ViT-only)')
    embed = spec.get('embed', 0.0)
    if isinstance(embed, (list, tuple)):
        if len(embed) != n_st:
            raise ValueError(f'ratios embed gives {len(embed)} stage ratios but the model has {n_st} stages')
        stages = [check_ratio(e, f'embed[{i}]') for i, e in enumerate(embed)]
    else:
        stages = [check_ratio(embed, 'embed')] * n_st
    if 'blocks' not in spec:
        per = {k: check_ratio(spec.get(k, 0.0), k) for k in RATIO_KEYS}
        return {'stages': stages, 'blocks': [dict(per) for _ in range(n_bl)]}
    stray = set(spec) & set(RATIO_KEYS)
    if stray:
        raise ValueError(f'ratios has both "blocks" and {sorted(stray)}; give per-block ratios inside "blocks"')
    if not isinstance(spec['blocks'], (list, tuple)) or len(spec['blocks']) != n_bl:
        raise ValueError(f'ratios "blocks" must list one dict per SwinTransformerBlock ({n_bl} in this model)')
    blocks = []
    for i, b in enumerate(spec['blocks']):
        if not isinstance(b, dict) or set(b) - set(RATIO_KEYS):
            raise ValueError(f'ratios blocks[{i}] must be a dict with keys from {list(RATIO_KEYS)}, got {b!r}')
        blocks.append({k: check_ratio(b.get(k, 0.0), f'blocks[{i}].{k}') for k in RATIO_KEYS})
    return {'stages': stages, 'blocks': blocks}


def target_dims(orig: SwinDims, ratios: dict, notes: List[str]) -> SwinDims:
    stages = [keep_count(c, r, f'layers.{s} width', notes) for s, (c, r) in enumerate(zip(orig.stages,
                                                                                           ratios['stages']))]
    blocks = [SwinBlockDims(b.name, b.stage, keep_count(b.heads, r['heads'], f'{b.name} heads', notes),
                            keep_count(b.qk, r['qk'], f'{b.name} q/k per head', notes),
                            keep_count(b.v, r['v'], f'{b.name} v per head', notes),
                            keep_count(b.mlp, r['mlp'], f'{b.name} mlp', notes))
              for b, r in zip(orig.blocks, ratios['blocks'])]
    return SwinDims(stages, blocks)
