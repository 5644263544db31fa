"""SNP for timm EfficientFormer (V1): efficientformer_l1 / l3 / l7.

Paper: Y. Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022
(arXiv 2206.01191). SNP prunes it in the SNP paper (EfficientFormer-L1 at 0.6 GMACs).

Structure (timm naming), and the groups this adapter builds from it (no tracing):
  stem           conv1+norm1 (C0/2, not pruned) -> conv2+norm2 (C0: the stage-0 width)
  stages.s       downsample (3x3 stride-2 conv + BatchNorm, stages 1..3) then blocks:
    MetaBlock2d  x + ls1*(avgpool(x) - x); x + ls2*norm2(fc2(act(norm1(fc1(x))))), fc1/fc2 1x1 convs
    Flat         (B, C, H, W) -> (B, HW, C), once, in the last stage
    MetaBlock1d  x + ls1*attn(norm1(x)); x + ls2*mlp(norm2(x)) (LayerNorm, timm Mlp), where attn's qkv
                 is laid out per head as [q (key_dim) | k (key_dim) | v (val_dim)], e.g. 32 | 32 | 128,
                 plus learned attention_biases (heads, 49) indexed by attention_bias_idxs (7x7 grid)
  norm, head, head_dist  (LayerNorm, two Linear classifiers averaged)

Groups (fraction removed set by the ratios):
  'qk'     q/k pairs of every head of every MetaBlock1d, by SNP's attention-score criterion on the
           captured q, k (ops.qk_scores); the ORIGINAL softmax scale is kept (timm's Attention reads
           self.scale, which is never recomputed).
  'v'      value filters per head (qkv rows, proj input columns), by redundancy.
  'heads'  whole heads of the attention (their q, k, v rows, proj columns and attention_biases row),
           by head_criterion as for ViTs (default "snp": each head's attention-score energy; "output":
           its output norm through proj on the calibration tokens); then SNP within the kept heads.
  'mlp'    hidden channels of every MLP: fc1 rows (+ its BatchNorm in Meta4D blocks) and fc2 columns.
  'embed'  the STAGE WIDTHS: one coupled group per stage, i.e. every tensor on that stage's residual
           path: the conv + BN producing it (stem conv2 / downsample), each block's fc2 (+BN) or proj
           output rows, fc1/qkv input columns, LayerScale gammas, LayerNorms, the next downsample's input
           channels, and for the last stage the final norm and both heads. A float removes that fraction
           of every stage's channels; a list gives one ratio per stage.

Re-fit (SNP.md, "Compensation"), sequentially through the network on the calibration images: every
layer whose inputs changed is re-fit by least squares (refit.LinearFit) to the original layer's
output at the kept channels: downsample convs, qkv, proj, fc1, fc2 (1x1 convs and Linears) and the
two heads. A 1x1 conv is a Linear over pixels and a 3x3 downsample conv a Linear over unfolded 3x3
patches; both are fitted as Linears sharing the conv's storage. A conv followed by BatchNorm is fitted
to the original conv's output BEFORE the norm, and the (sliced) norm is kept: eval-mode BatchNorm is a
per-channel affine map, and least squares fits each output channel independently, so this equals
fitting the norm's output channel by channel while keeping the model a plain timm EfficientFormer.

Masked twins (tests): removed q/k dims <-> zeroed q and k rows; removed v dims, hidden channels or
heads <-> zeroed proj / fc2 input columns; removed channels of a Meta4D stage <-> zeroed fc1 and next
downsample input columns (those stages have no LayerNorm). The last stage's width has no twin.
"""
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..macs import meta_copy
from ..presets import INFO_KEYS, list_presets, load_preset, preset_model
from ..prune import (PruneReport, _apply, _chunks, _finite, _fit, _refit_heads, _row_scores, _run_captured,
                     _slice_into, _Timer, _token_subset, copy_modes, eval_mode, record, resolve_timm_config,
                     run_settings)
from ..ratios import _check, keep_count
from ..refit import DEFAULT_DAMP, RefitStats
from ..scores import head_energy, head_output, select_per_head, select_top, tss_average
from .vit import UnsupportedModelError, _linear_plan, _new_linear, _new_param, _norm_plan, _resize_norm

__all__ = ['SUPPORTED', 'EfficientFormerDims', 'EfficientFormerBlockDims', 'EfficientFormerSelection',
           'is_efficientformer', 'check_supported', 'model_dims', 'apply_dims', 'slice_plan', 'resolve_ratios',
           'target_dims', 'prune']

SUPPORTED = 'timm EfficientFormer V1 (efficientformer_l1, efficientformer_l3, efficientformer_l7)'
RATIO_KEYS = ('qk', 'v', 'mlp', 'heads')
Plan = Dict[str, List[Tuple[int, torch.Tensor]]]


# ------------------------------------------------------------------------------------------------
# widths and selections

@dataclass
class EfficientFormerBlockDims:
    name: str       # module name, e.g. 'stages.3.blocks.4'
    stage: int
    mlp: int        # MLP hidden channels
    heads: int = 0  # 0 for Meta4D (pooling) blocks
    qk: int = 0     # query/key width per head
    v: int = 0      # value width per head


@dataclass
class EfficientFormerDims:
    stages: List[int]                       # residual width of each stage
    blocks: List[EfficientFormerBlockDims]  # every MetaBlock2d / MetaBlock1d, in order

    def to_dict(self) -> dict:
        return {'stages': list(self.stages), 'blocks': [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'EfficientFormerDims':
        return cls([int(s) for s in d['stages']],
                   [EfficientFormerBlockDims(**{k: (v if k == 'name' else int(v)) for k, v in b.items()})
                    for b in d['blocks']])


ModelDims = EfficientFormerDims  # the name io.py's per-family dispatch looks up


@dataclass
class EfficientFormerBlockSelection:
    mlp: torch.Tensor                    # kept hidden channels
    heads: Optional[torch.Tensor] = None  # kept heads (MetaBlock1d)
    qk: Optional[torch.Tensor] = None     # (kept heads, kept q/k dims per head)
    v: Optional[torch.Tensor] = None      # (kept heads, kept v dims per head)


@dataclass
class EfficientFormerSelection:
    stages: List[torch.Tensor]
    blocks: List[EfficientFormerBlockSelection]

    def to_dict(self) -> dict:
        return {'stages': [s.tolist() for s in self.stages],
                'blocks': [{k: v.tolist() for k, v in asdict(b).items() if v is not None} for b in self.blocks]}


# ------------------------------------------------------------------------------------------------
# structure

def _timm():
    from timm.models import efficientformer as ef
    return ef


def is_efficientformer(model: nn.Module) -> bool:
    """True for timm EfficientFormer V1 and V2 (V2 is then refused by check_supported with a reason)."""
    return type(model).__name__ in ('EfficientFormer', 'EfficientFormerV2') and \
        type(model).__module__.startswith('timm.models.efficientformer')


def _blocks(model: nn.Module) -> List[Tuple[str, int, nn.Module]]:
    ef = _timm()
    return [(f'stages.{s}.blocks.{j}', s, b) for s, st in enumerate(model.stages) for j, b in enumerate(st.blocks)
            if isinstance(b, (ef.MetaBlock2d, ef.MetaBlock1d))]


def _is_1d(block: nn.Module) -> bool:
    return isinstance(block, _timm().MetaBlock1d)


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError saying why unless `model` is a timm EfficientFormer (V1) as timm builds it."""
    if type(model).__name__ == 'EfficientFormerV2':
        raise UnsupportedModelError(
            'EfficientFormerV2 (efficientformerv2_*) is not supported: it is a different architecture (depthwise-conv '
            'MLPs, attention with talking heads and strided/local attention, downsampling attention); snp_fast prunes '
            f'{SUPPORTED}')
    ef = _timm()
    if type(model) is not ef.EfficientFormer:
        raise UnsupportedModelError(f'{type(model).__name__} is not an EfficientFormer; this adapter prunes '
                                    f'{SUPPORTED}')
    if getattr(model, 'snp_recipe', None) is not None:
        raise UnsupportedModelError('this EfficientFormer is already pruned (re-pruning is not supported)')
    if type(model.stem) is not ef.Stem4 or not isinstance(model.stem.norm2, nn.BatchNorm2d):
        raise UnsupportedModelError('EfficientFormer stem is not timm Stem4 with BatchNorm2d; not supported')
    if model.global_pool not in ('avg', ''):
        raise UnsupportedModelError(f'global_pool={model.global_pool!r} is not supported')
    for s, st in enumerate(model.stages):
        if not isinstance(st.downsample, (ef.Downsample, nn.Identity)) or (
                isinstance(st.downsample, ef.Downsample) and not isinstance(st.downsample.norm, nn.BatchNorm2d)):
            raise UnsupportedModelError(f'stages.{s}.downsample is a {type(st.downsample).__name__}; only timm '
                                        'Downsample (conv + BatchNorm2d) is supported')
        if (s == 0) != isinstance(st.downsample, nn.Identity):  # timm's default `downsamples`
            raise UnsupportedModelError(f'stages.{s} {"with" if s == 0 else "without"} a downsample is not supported '
                                        '(the stem feeds stage 0, a downsample every later stage)')
        for j, b in enumerate(st.blocks):
            where = f'stages.{s}.blocks.{j}'
            if isinstance(b, ef.MetaBlock2d):
                if type(b.token_mixer) is not ef.Pooling or not isinstance(b.mlp.norm1, nn.BatchNorm2d) \
                        or not isinstance(b.mlp.norm2, nn.BatchNorm2d):
                    raise UnsupportedModelError(f'{where}: only Pooling token mixers and ConvMlpWithNorm with '
                                                'BatchNorm2d are supported')
            elif isinstance(b, ef.MetaBlock1d):
                if type(b.token_mixer) is not ef.Attention or not isinstance(b.mlp.norm, nn.Identity) \
                        or not isinstance(b.norm1, nn.LayerNorm):
                    raise UnsupportedModelError(f'{where}: only timm EfficientFormer Attention with LayerNorm and a '
                                                'plain Mlp is supported')
            elif not isinstance(b, ef.Flat):
                raise UnsupportedModelError(f'{where} is a {type(b).__name__}; not supported')
    if not any(isinstance(b, ef.Flat) for b in model.stages[-1].blocks):
        raise UnsupportedModelError('EfficientFormer without attention blocks (num_vit=0) is not supported: its '
                                    'last stage has no Flat, so timm\'s head pools over the wrong axis')


def model_dims(model: nn.Module) -> EfficientFormerDims:
    stages = [model.stem.conv2.out_channels] + [st.downsample.conv.out_channels for st in list(model.stages)[1:]]
    blocks = []
    for name, s, b in _blocks(model):
        if _is_1d(b):
            a = b.token_mixer
            blocks.append(EfficientFormerBlockDims(name, s, b.mlp.fc1.out_features, a.num_heads, a.key_dim, a.val_dim))
        else:
            blocks.append(EfficientFormerBlockDims(name, s, b.mlp.fc1.out_channels))
    return EfficientFormerDims(stages, blocks)


# ------------------------------------------------------------------------------------------------
# ratios -> widths

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
        r = _check(spec, 'ratios')
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
        stages = [_check(e, f'embed[{i}]') for i, e in enumerate(embed)]
    else:
        stages = [_check(embed, 'embed')] * n_st
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
            r = {k: _check(b.get(k, 0.0), f'blocks[{i}].{k}') for k in RATIO_KEYS}
            if not bd.heads and any(r[k] for k in ('qk', 'v', 'heads')):
                raise ValueError(f'ratios blocks[{i}] ({bd.name}) is a pooling block: only "mlp" applies there')
            blocks.append(r)
        return {'stages': stages, 'blocks': blocks}
    per = {k: _check(spec.get(k, 0.0), k) for k in RATIO_KEYS}
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


# ------------------------------------------------------------------------------------------------
# slicing plan: {parameter or buffer name: [(dim, kept index)]}

def _bn_plan(plan: Plan, prefix: str, bn: nn.Module, idx: torch.Tensor) -> None:
    _norm_plan(plan, prefix, bn, idx)
    for b in ('running_mean', 'running_var'):
        if getattr(bn, b, None) is not None:
            plan[f'{prefix}.{b}'] = [(0, idx)]


def qkv_rows(sel: EfficientFormerBlockSelection, key_dim: int, val_dim: int) -> torch.Tensor:
    """Rows of the original qkv kept by `sel`, in the pruned per-head [q | k | v] layout."""
    base = sel.heads.unsqueeze(1) * (2 * key_dim + val_dim)
    return torch.cat([base + sel.qk, base + key_dim + sel.qk, base + 2 * key_dim + sel.v], dim=1).flatten()


def stem_and_head_plan(model: nn.Module, stages: List[torch.Tensor]) -> Plan:
    """Slices of every tensor outside the MetaBlocks: stem conv2/norm2, downsamples, final norm, heads."""
    plan: Plan = {}
    _linear_plan(plan, 'stem.conv2', model.stem.conv2, stages[0], None)
    _bn_plan(plan, 'stem.norm2', model.stem.norm2, stages[0])
    for s, st in enumerate(model.stages):
        if hasattr(st.downsample, 'conv'):
            _linear_plan(plan, f'stages.{s}.downsample.conv', st.downsample.conv, stages[s], stages[s - 1])
            _bn_plan(plan, f'stages.{s}.downsample.norm', st.downsample.norm, stages[s])
    _norm_plan(plan, 'norm', model.norm, stages[-1])
    for name in ('head', 'head_dist'):
        if isinstance(getattr(model, name, None), nn.Linear):
            _linear_plan(plan, name, getattr(model, name), None, stages[-1])
    return plan


def block_plan(block: nn.Module, prefix: str, sel: EfficientFormerBlockSelection, e: torch.Tensor) -> Plan:
    """Slices of one MetaBlock's tensors (its own groups and its share of the stage-width group `e`)."""
    plan: Plan = {}
    for ls in ('ls1', 'ls2'):
        plan[f'{prefix}.{ls}.gamma'] = [(0, e)]
    m = block.mlp
    _linear_plan(plan, f'{prefix}.mlp.fc1', m.fc1, sel.mlp, e)
    _linear_plan(plan, f'{prefix}.mlp.fc2', m.fc2, e, sel.mlp)
    if not _is_1d(block):
        _bn_plan(plan, f'{prefix}.mlp.norm1', m.norm1, sel.mlp)
        _bn_plan(plan, f'{prefix}.mlp.norm2', m.norm2, e)
        return plan
    a = block.token_mixer
    _norm_plan(plan, f'{prefix}.norm1', block.norm1, e)
    _norm_plan(plan, f'{prefix}.norm2', block.norm2, e)
    _linear_plan(plan, f'{prefix}.token_mixer.qkv', a.qkv, qkv_rows(sel, a.key_dim, a.val_dim), e)
    v_cols = (sel.heads.unsqueeze(1) * a.val_dim + sel.v).flatten()
    _linear_plan(plan, f'{prefix}.token_mixer.proj', a.proj, e, v_cols)
    plan[f'{prefix}.token_mixer.attention_biases'] = [(0, sel.heads)]
    return plan


def slice_plan(model: nn.Module, sel: EfficientFormerSelection) -> Plan:
    plan = stem_and_head_plan(model, sel.stages)
    for (name, s, b), bs in zip(_blocks(model), sel.blocks):
        plan.update(block_plan(b, name, bs, sel.stages[s]))
    return plan


# ------------------------------------------------------------------------------------------------
# architecture change (on a meta-device copy)

def _new_conv(old: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, old.kernel_size, old.stride, old.padding, bias=old.bias is not None,
                     device='meta', dtype=old.weight.dtype)


def _new_bn(old: nn.BatchNorm2d, n: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(n, eps=old.eps, momentum=old.momentum, affine=old.affine,
                          track_running_stats=old.track_running_stats, device='meta', dtype=old.weight.dtype)


def apply_dims(model: nn.Module, dims: EfficientFormerDims) -> nn.Module:
    """Turn a (meta-device) copy of the ORIGINAL model into the pruned architecture, in place.

    The result is still a timm EfficientFormer: layers get their new sizes, attention modules their
    new head count and widths, and keep their ORIGINAL scale. Tensors are left on the meta device.
    """
    orig = model_dims(model)
    if len(dims.stages) != len(orig.stages) or [b.name for b in dims.blocks] != [b.name for b in orig.blocks]:
        raise ValueError(f'dims describe stages {dims.stages} and {len(dims.blocks)} blocks but the model has '
                         f'stages {orig.stages} and {len(orig.blocks)} blocks')
    for s, (c, oc) in enumerate(zip(dims.stages, orig.stages)):
        if not 1 <= c <= oc:
            raise ValueError(f'stages.{s}: width {c} outside [1, {oc}]')
    st = dims.stages
    stem = model.stem
    stem.conv2, stem.norm2 = _new_conv(stem.conv2, stem.conv2.in_channels, st[0]), _new_bn(stem.norm2, st[0])
    for s, stage in enumerate(model.stages):
        if hasattr(stage.downsample, 'conv'):
            ds = stage.downsample
            ds.conv, ds.norm = _new_conv(ds.conv, st[s - 1], st[s]), _new_bn(ds.norm, st[s])
    for (name, s, b), bd, od in zip(_blocks(model), dims.blocks, orig.blocks):
        C = st[s]
        for what, val, lim in (('mlp', bd.mlp, od.mlp), ('heads', bd.heads, od.heads), ('qk', bd.qk, od.qk),
                               ('v', bd.v, od.v)):
            if not (1 if lim else 0) <= val <= lim:
                raise ValueError(f'{name}: {what} width {val} outside [1, {lim}]')
        for ls in (b.ls1, b.ls2):
            ls.gamma = _new_param(ls.gamma, (C,))
        m = b.mlp
        if not _is_1d(b):
            m.fc1, m.norm1 = _new_conv(m.fc1, C, bd.mlp), _new_bn(m.norm1, bd.mlp)
            m.fc2, m.norm2 = _new_conv(m.fc2, bd.mlp, C), _new_bn(m.norm2, C)
            continue
        _resize_norm(b.norm1, C)
        _resize_norm(b.norm2, C)
        m.fc1, m.fc2 = _new_linear(m.fc1, C, bd.mlp), _new_linear(m.fc2, bd.mlp, C)
        a = b.token_mixer
        a.qkv = _new_linear(a.qkv, C, bd.heads * (2 * bd.qk + bd.v))
        a.proj = _new_linear(a.proj, bd.heads * bd.v, C)
        a.attention_biases = _new_param(a.attention_biases, (bd.heads, a.attention_biases.shape[1]))
        # a.scale is left alone: the ORIGINAL 1/sqrt(key_dim) (SNP.md)
        a.num_heads, a.key_dim, a.val_dim = bd.heads, bd.qk, bd.v
        a.key_attn_dim, a.val_attn_dim, a.attn_ratio = bd.heads * bd.qk, bd.heads * bd.v, bd.v / bd.qk
        a.attention_bias_cache = {}  # a cached bias of the original head count must not survive
    _resize_norm(model.norm, st[-1])
    for name in ('head', 'head_dist'):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            setattr(model, name, _new_linear(mod, st[-1], mod.out_features))
    model.num_features = model.head_hidden_size = st[-1]
    for fi, c in zip(getattr(model, 'feature_info', []) or [], st):
        if isinstance(fi, dict) and 'num_chs' in fi:
            fi['num_chs'] = c
    return model.train(model.training)  # the new layers (BatchNorm above all) take the model's mode


# ------------------------------------------------------------------------------------------------
# pipeline: scores, slicing and the sequential re-fit (prune.py's pieces, EfficientFormer's structure)

def _scaled_rows(layer: nn.Module, *scales: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's weight rows (flattened) times per-output-channel scales that follow it (BN, LayerScale)."""
    w = layer.weight.detach().flatten(1).float()
    for s in scales:
        if s is not None:
            w = w * s.detach().float().unsqueeze(1)
    return w


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight / (bn.running_var + bn.eps).sqrt()


def _stage_scores(model: nn.Module, s: int, criterion: str, timer: _Timer) -> torch.Tensor:
    """Scores of stage s's channels: each producer of the stage's residual stream scored by `criterion` on
    its effective output rows (BN and LayerScale folded in), total-sum scaled, averaged (SNP.md)."""
    stage = model.stages[s]
    first = (model.stem.conv2, model.stem.norm2) if s == 0 else (stage.downsample.conv, stage.downsample.norm)
    producers = [_scaled_rows(first[0], _bn_scale(first[1]))]
    for b in stage.blocks:
        if _is_1d(b):
            producers += [_scaled_rows(b.token_mixer.proj, b.ls1.gamma), _scaled_rows(b.mlp.fc2, b.ls2.gamma)]
        elif hasattr(b, 'mlp'):
            producers.append(_scaled_rows(b.mlp.fc2, _bn_scale(b.mlp.norm2), b.ls2.gamma))
    return tss_average([_row_scores(timer, w, criterion) for w in producers])


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1) if t.dim() == 4 else t


def _as_linear(conv: nn.Conv2d) -> nn.Linear:
    """A Linear over (unfolded) pixels sharing the conv's weight and bias storage: re-fitting it re-fits the conv."""
    lin = nn.Linear(1, 1, bias=conv.bias is not None, device='meta')
    lin.in_features, lin.out_features = conv.weight[0].numel(), conv.out_channels
    lin.weight = nn.Parameter(conv.weight.detach().view(conv.out_channels, -1), requires_grad=False)
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return lin


def _unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, pixels, C·kh·kw): the conv's input patches, in the order of weight.view(out, -1)."""
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)


def _slice_buffers(pruned: nn.Module, model: nn.Module, plan: Plan, names: List[str]) -> None:
    """Buffers (BatchNorm running statistics, attention_bias_idxs): sliced by the plan or copied."""
    src = dict(model.named_buffers())
    persistent = set(model.state_dict())
    sliced = [n for n in names if n in plan]
    out = dict(zip(sliced, ops.gather_slices([src[n] for n in sliced], [plan[n] for n in sliced]))
               if sliced else [])
    for n in names:
        mod_name, _, leaf = n.rpartition('.')
        mod = pruned.get_submodule(mod_name) if mod_name else pruned
        mod.register_buffer(leaf, out[n] if n in out else src[n].clone(), persistent=n in persistent)


def _slice(pruned: nn.Module, model: nn.Module, plan: Plan, keep) -> None:
    """Slice (or copy) every parameter and buffer whose name satisfies `keep` into the skeleton."""
    _slice_into(pruned, model, plan, [n for n, _ in model.named_parameters() if keep(n)])
    _slice_buffers(pruned, model, plan, [n for n, _ in model.named_buffers() if keep(n)])


def _check_calib(model: nn.Module, calib) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 4 or not calib.is_floating_point() or calib.shape[0] < 1:
        raise ValueError('calib must be a float tensor of images (B, C, H, W), got '
                         f'{getattr(calib, "dtype", type(calib).__name__)} {tuple(getattr(calib, "shape", ()))}')
    if calib.shape[1] != model.in_chans:
        raise ValueError(f'calib has {calib.shape[1]} channels but the model takes {model.in_chans}')
    # the attention's biases are built for a fixed token grid (7x7 at 224x224): the input must map onto it
    n_convs = 2 + sum(hasattr(st.downsample, 'conv') for st in model.stages)
    grid = []
    for n in calib.shape[2:]:
        for _ in range(n_convs):
            n = (n - 1) // 2 + 1
        grid.append(n)
    tokens = next(b.token_mixer.attention_bias_idxs.shape[0] for _, _, b in _blocks(model) if _is_1d(b))
    if grid[0] * grid[1] != tokens:
        raise ValueError(f'calib images are {tuple(calib.shape[2:])}, which gives a {grid[0]}x{grid[1]} token grid, '
                         f'but this EfficientFormer\'s attention is built for {tokens} tokens (224x224 input)')
    if not torch.isfinite(calib).all():
        raise ValueError('calib contains NaN or Inf values')
    return calib


class EfficientFormerReport(PruneReport):
    """PruneReport whose summary shows stage widths and the widths of every MetaBlock."""

    def _size_lines(self) -> List[str]:
        b, a = self.dims_before, self.dims_after
        lines = [f'{self._totals()},  stage widths {b.stages} -> {a.stages}',
                 f'{"block":>20} {"heads":>8} {"q/k per head":>13} {"v per head":>11} {"mlp":>11}']
        for x, y in zip(b.blocks, a.blocks):
            att = f'{x.heads:>3} -> {y.heads:<2} {x.qk:>5} -> {y.qk:<4} {x.v:>4} -> {y.v:<4}' if x.heads else ' ' * 35
            lines.append(f'{x.name:>20} {att} {x.mlp:>4} -> {y.mlp:<5}')
        return lines


def prune(model: nn.Module, calib: Optional[torch.Tensor] = None, ratios: Union[float, dict, str, None] = None, *,
          preset: Optional[str] = None, qk_criterion: str = 'snp', v_criterion: str = 'redundancy',
          mlp_criterion: str = 'redundancy', embed_criterion: str = 'redundancy', head_criterion: str = 'snp',
          gamma: Optional[int] = None,
          refit: bool = True, damp: float = DEFAULT_DAMP, refit_tokens: Optional[int] = None, batch_size: int = 32,
          backend: str = 'auto', precision: str = 'fp32', timm_name: Optional[str] = None,
          timm_kwargs: Optional[dict] = None):
    """snp_fast.prune for a timm EfficientFormer (same arguments; snp_fast.prune checks them and dispatches here).

    Ratios (fraction removed): see resolve_ratios; 'embed' means the stage widths. Criteria: q/k "snp"
    or "magnitude"; v and mlp "redundancy", "magnitude" or "activation"; stage widths "redundancy" or
    "magnitude" (on each producer's effective rows, BatchNorm and LayerScale folded in). Whole heads
    (the 'heads' ratio): "output" (each head's share of proj's output on the calibration tokens) or
    "snp" (the head's attention-score energy), as for ViTs (scores.head_output / head_energy).
    Returns (the pruned model, still a timm EfficientFormer, and an EfficientFormerReport).
    """
    args = dict(locals())  # first statement: exactly this function's arguments (recorded in the settings)
    if (ratios is None) == (preset is None):
        raise ValueError('give exactly one of ratios= or preset=')
    if embed_criterion == 'activation':
        raise ValueError('embed_criterion="activation" is not supported for EfficientFormer stage widths; use '
                         '"redundancy" or "magnitude"')
    if refit_tokens is not None and (not isinstance(refit_tokens, int) or refit_tokens < 1):
        raise ValueError(f'refit_tokens must be None (all tokens) or a positive int, got {refit_tokens!r}')
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f'damp must be a finite number >= 0, got {damp!r}')
    check_supported(model)
    notes: List[str] = []
    dims_before = model_dims(model)
    spec = resolve_ratios(preset if preset is not None else ratios, dims_before)
    mismatch = preset_mismatch(preset, dims_before) if preset is not None else None
    if mismatch:
        warnings.warn(mismatch, stacklevel=3)  # (called through snp_fast.prune)
        notes.append(mismatch)
    dims_after = target_dims(dims_before, spec, notes)
    heads_pruned = any(a.heads != b.heads for a, b in zip(dims_after.blocks, dims_before.blocks))
    needs_data = refit or qk_criterion == 'snp' or heads_pruned or 'activation' in (v_criterion, mlp_criterion)
    if needs_data and calib is None:
        raise ValueError('calibration images are needed (calib=...) for the re-fit, the "snp" Q/K criterion, head '
                         'pruning and "activation" criteria; pass refit=False and weight-only criteria to prune '
                         'without data')
    p0 = next(model.parameters())
    if calib is not None:
        calib = _check_calib(model, calib).to(device=p0.device, dtype=p0.dtype)
    timm_config = resolve_timm_config(model, timm_name, timm_kwargs)

    timer = _Timer()
    with eval_mode(model) as modes, ops.prefer(backend), ops.precision(precision):  # every op: `backend` where it has it
        pruned, selection, stats = _prune(model, calib, dims_after, timer, qk_criterion, v_criterion, mlp_criterion,
                                          embed_criterion, head_criterion, gamma, refit, damp, refit_tokens,
                                          batch_size)
    copy_modes(pruned, modes)
    report = record(model, pruned, 'efficientformer', EfficientFormerReport, timm_config, dims_before, dims_after,
                    selection, run_settings(args, spec, calib), timer, stats, notes)
    return pruned, report


def _prune(model, calib, dims_after, timer, qk_criterion, v_criterion, mlp_criterion, embed_criterion, head_criterion,
           gamma, refit, damp, refit_tokens, batch):
    with timer('selection'):  # stage widths come from the weights, up front: every block of a stage shares them
        widths = model_dims(model).stages
        stages = [torch.arange(c) if c == widths[s] else
                  select_top(_stage_scores(model, s, embed_criterion, timer), c)
                  for s, c in enumerate(dims_after.stages)]
    with timer('rebuild'):
        pruned = apply_dims(meta_copy(model), dims_after)
    plan = stem_and_head_plan(model, stages)
    in_blocks = lambda n: '.blocks.' in n  # noqa: E731
    with timer('slicing'):
        _slice(pruned, model, plan, lambda n: not in_blocks(n))

    x = xp = None
    if calib is not None:
        with timer('calibration'):
            x = _apply(model.stem, calib, batch)
        xp = _apply(pruned.stem, calib, batch) if refit else None
    gen = torch.Generator().manual_seed(0)
    stats: Dict[str, RefitStats] = {}
    selections: List[EfficientFormerBlockSelection] = []
    block_dims = {b.name: b for b in dims_after.blocks}
    for s, (ost, pst) in enumerate(zip(model.stages, pruned.stages)):
        if hasattr(ost.downsample, 'conv') and x is not None:
            with timer('calibration'):
                y, cap = _run_captured(ost.downsample, x, {'conv': (ost.downsample.conv, 'out')}, batch)
            if refit:
                with timer('refit'):
                    conv = pst.downsample.conv
                    patches = _apply(lambda t: _unfold(conv, t), xp, batch)
                    target = cap['conv'].flatten(2).transpose(1, 2)[..., stages[s].to(x.device)]
                    rows = _token_subset(patches.shape[0] * patches.shape[1], refit_tokens, gen)
                    stats[f'stages.{s}.downsample.conv'] = _fit(_as_linear(conv), patches, target, rows, damp)
                    del patches, target
                    xp = _apply(pst.downsample, xp, batch)
            x = _finite(y, f'the output of stages.{s}.downsample of the original model')
        for j, (ob, pb) in enumerate(zip(ost.blocks, pst.blocks)):
            name = f'stages.{s}.blocks.{j}'
            if name not in block_dims:  # Flat
                x = ob(x) if x is not None else None
                xp = pb(xp) if xp is not None else None
                continue
            bd, e = block_dims[name], stages[s]
            cap = {}
            if x is not None:
                with timer('calibration'):
                    x_next, cap = _run_captured(ob, x, _taps(ob), batch)
                    _finite(x_next, f'the output of {name} of the original model')
            with timer('selection'):
                sel = _select_block(ob, bd, cap, qk_criterion, v_criterion, mlp_criterion, head_criterion, gamma,
                                    batch, timer)
            selections.append(sel)
            with timer('slicing'):
                _slice(pruned, model, block_plan(ob, name, sel, e), lambda n, p=name + '.': n.startswith(p))
            if refit:
                with timer('refit'):
                    xp = _refit_block(ob, pb, name, xp, cap, sel, e, damp, refit_tokens, gen, batch, stats)
            x = x_next if x is not None else None
            cap.clear()
    if refit:
        with timer('refit'):
            _refit_heads(model, pruned, x, xp, None, damp, refit_tokens, gen, batch, stats)
    leftover = [n for n, t in list(pruned.named_parameters()) + list(pruned.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f'internal error: tensors left unassigned after pruning: {leftover[:5]}')
    return pruned, EfficientFormerSelection(stages, selections), stats


def _taps(block: nn.Module) -> dict:
    m = block.mlp
    taps = {'fc1': (m.fc1, 'out'), 'fc2_in': (m.fc2, 'in'), 'fc2_out': (m.fc2, 'out')}
    if _is_1d(block):
        a = block.token_mixer
        taps.update(qkv=(a.qkv, 'out'), ctx=(a.proj, 'in'), proj_out=(a.proj, 'out'))
    return taps


def _select_block(ob, bd, cap, qk_criterion, v_criterion, mlp_criterion, head_criterion, gamma, batch, timer):
    """Kept MLP channels, and for attention blocks kept heads, q/k pairs (per kept head) and v dims."""
    m = ob.mlp
    n_hidden = m.fc1.weight.shape[0]
    if bd.mlp == n_hidden:
        mlp = torch.arange(n_hidden)
    else:
        w = _scaled_rows(m.fc1, None if _is_1d(ob) else _bn_scale(m.norm1))
        act = _nhwc(cap['fc2_in']).float().pow(2).flatten(0, -2).sum(0) if mlp_criterion == 'activation' else None
        mlp = select_top(_row_scores(timer, w, mlp_criterion, act), bd.mlp)
    if not _is_1d(ob):
        return EfficientFormerBlockSelection(mlp)
    a = ob.token_mixer
    H, kd, vd = a.num_heads, a.key_dim, a.val_dim
    qkv = cap['qkv'].view(*cap['qkv'].shape[:2], H, 2 * kd + vd).transpose(1, 2) if cap else None  # (B, H, N, .)
    if bd.heads == H:
        heads = torch.arange(H)
    elif head_criterion == 'output':
        heads = select_top(head_output(cap['ctx'], a.proj.weight, H), bd.heads)
    else:
        heads = select_top(sum(head_energy(qc[..., :kd], qc[..., kd:2 * kd], gamma or bd.qk)
                               for qc in _chunks(qkv, batch)), bd.heads)
    w = a.qkv.weight.detach().view(H, 2 * kd + vd, -1)[heads]
    if qkv is not None:
        qkv = qkv[:, heads.to(qkv.device)]
    if bd.qk == kd:
        qk = torch.arange(kd).expand(len(heads), kd).clone()
    else:
        with timer('qk_scoring'):
            if qk_criterion == 'snp':
                q, k = qkv[..., :kd], qkv[..., kd:2 * kd]
                score = sum(ops.qk_scores(qc, kc, gamma or bd.qk)
                            for qc, kc in zip(_chunks(q, batch), _chunks(k, batch)))
            else:
                score = w[:, :kd].float().norm(dim=2) * w[:, kd:2 * kd].float().norm(dim=2)
            qk = select_per_head(score, bd.qk)
    if bd.v == vd:
        v = torch.arange(vd).expand(len(heads), vd).clone()
    else:
        act = None
        if v_criterion == 'activation':
            act = qkv[..., 2 * kd:].float().pow(2).sum(dim=(0, 2)).flatten()
        v = select_per_head(_row_scores(timer, w[:, 2 * kd:].flatten(0, 1), v_criterion, act)
                            .view(len(heads), vd), bd.v)
    return EfficientFormerBlockSelection(mlp, heads, qk, v)


@torch.no_grad()
def _refit_block(ob, pb, name, xp, cap, sel, e, damp, refit_tokens, gen, batch, stats):
    """Sequential re-fit of one pruned MetaBlock: (qkv, proj,) fc1, fc2, each from the pruned model's own
    inputs to the original layer's outputs at the kept channels (conv outputs before their BatchNorm)."""
    dev = xp.device
    e = e.to(dev)
    pixels = xp.shape[0] * math.prod(xp.shape[2:]) if xp.dim() == 4 else xp.shape[0] * xp.shape[1]
    rows = _token_subset(pixels, refit_tokens, gen)
    m = pb.mlp
    lin = (lambda c: c) if _is_1d(pb) else _as_linear
    if _is_1d(pb):
        a, oa = pb.token_mixer, ob.token_mixer
        n1 = _apply(pb.norm1, xp, batch)
        target = cap['qkv'][..., qkv_rows(sel, oa.key_dim, oa.val_dim).to(dev)]
        stats[f'{name}.token_mixer.qkv'] = _fit(a.qkv, n1, target, rows, damp)
        _, c = _run_captured(a, n1, {'ctx': (a.proj, 'in'), 'pred': (a.proj, 'out')}, batch)
        stats[f'{name}.token_mixer.proj'] = _fit(a.proj, c['ctx'], cap['proj_out'][..., e], rows, damp,
                                                 c['pred'])
        del n1, c
        mid = _apply(lambda t: t + pb.ls1(pb.token_mixer(pb.norm1(t))), xp, batch)
        mlp_in = _apply(pb.norm2, mid, batch)
    else:
        mlp_in = _apply(lambda t: t + pb.ls1(pb.token_mixer(t)), xp, batch)
    stats[f'{name}.mlp.fc1'] = _fit(lin(m.fc1), _nhwc(mlp_in), _nhwc(cap['fc1'])[..., sel.mlp.to(dev)], rows, damp)
    _, c = _run_captured(m, mlp_in, {'hidden': (m.fc2, 'in'), 'pred': (m.fc2, 'out')}, batch)
    stats[f'{name}.mlp.fc2'] = _fit(lin(m.fc2), _nhwc(c['hidden']), _nhwc(cap['fc2_out'])[..., e], rows, damp,
                                    _nhwc(c['pred']))
    del mlp_in, c
    return _finite(_apply(pb, xp, batch), f'the output of {name} of the pruned model')
