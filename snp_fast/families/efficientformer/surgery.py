"""EfficientFormer's slicing plans and its architecture change on a meta-device copy (still a timm
EfficientFormer: layers get their new sizes, attention modules their new head count and widths, and keep
their ORIGINAL scale)."""
from typing import List

import torch
import torch.nn as nn

from ...slicing import Plan, bn_plan, linear_plan, new_bn, new_conv, new_linear, new_param, norm_plan, resize_norm
from .structure import (EfficientFormerBlockSelection, EfficientFormerDims, EfficientFormerSelection,
                        is_attention_block, meta_blocks, model_dims)

__all__ = ['qkv_rows', 'stem_and_head_plan', 'block_plan', 'slice_plan', 'apply_dims']


def qkv_rows(sel: EfficientFormerBlockSelection, key_dim: int, val_dim: int) -> torch.Tensor:
    """Rows of the original qkv kept by `sel`, in the pruned per-head [q | k | v] layout."""
    base = sel.heads.unsqueeze(1) * (2 * key_dim + val_dim)
    return torch.cat([base + sel.qk, base + key_dim + sel.qk, base + 2 * key_dim + sel.v], dim=1).flatten()


def stem_and_head_plan(model: nn.Module, stages: List[torch.Tensor]) -> Plan:
    """Slices of every tensor outside the MetaBlocks: stem conv2/norm2, downsamples, final norm, heads."""
    plan: Plan = {}
    linear_plan(plan, 'stem.conv2', model.stem.conv2, stages[0], None)
    bn_plan(plan, 'stem.norm2', model.stem.norm2, stages[0])
    for s, st in enumerate(model.stages):
        if hasattr(st.downsample, 'conv'):
            linear_plan(plan, f'stages.{s}.downsample.conv', st.downsample.conv, stages[s], stages[s - 1])
            bn_plan(plan, f'stages.{s}.downsample.norm', st.downsample.norm, stages[s])
    norm_plan(plan, 'norm', model.norm, stages[-1])
    for name in ('head', 'head_dist'):
        if isinstance(getattr(model, name, None), nn.Linear):
            linear_plan(plan, name, getattr(model, name), None, stages[-1])
    return plan


def block_plan(block: nn.Module, prefix: str, sel: EfficientFormerBlockSelection, e: torch.Tensor) -> Plan:
    """Slices of one MetaBlock's tensors (its own groups and its share of the stage-width group `e`)."""
    plan: Plan = {}
    for ls in ('ls1', 'ls2'):
        plan[f'{prefix}.{ls}.gamma'] = [(0, e)]
    m = block.mlp
    linear_plan(plan, f'{prefix}.mlp.fc1', m.fc1, sel.mlp, e)
    linear_plan(plan, f'{prefix}.mlp.fc2', m.fc2, e, sel.mlp)
    if not is_attention_block(block):
        bn_plan(plan, f'{prefix}.mlp.norm1', m.norm1, sel.mlp)
        bn_plan(plan, f'{prefix}.mlp.norm2', m.norm2, e)
        return plan
    a = block.token_mixer
    norm_plan(plan, f'{prefix}.norm1', block.norm1, e)
    norm_plan(plan, f'{prefix}.norm2', block.norm2, e)
    linear_plan(plan, f'{prefix}.token_mixer.qkv', a.qkv, qkv_rows(sel, a.key_dim, a.val_dim), e)
    v_cols = (sel.heads.unsqueeze(1) * a.val_dim + sel.v).flatten()
    linear_plan(plan, f'{prefix}.token_mixer.proj', a.proj, e, v_cols)
    plan[f'{prefix}.token_mixer.attention_biases'] = [(0, sel.heads)]
    return plan


def slice_plan(model: nn.Module, sel: EfficientFormerSelection) -> Plan:
    plan = stem_and_head_plan(model, sel.stages)
    for (name, s, b), bs in zip(meta_blocks(model), sel.blocks):
        plan.update(block_plan(b, name, bs, sel.stages[s]))
    return plan


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
    stem.conv2, stem.norm2 = new_conv(stem.conv2, stem.conv2.in_channels, st[0]), new_bn(stem.norm2, st[0])
    for s, stage in enumerate(model.stages):
        if hasattr(stage.downsample, 'conv'):
            ds = stage.downsample
            ds.conv, ds.norm = new_conv(ds.conv, st[s - 1], st[s]), new_bn(ds.norm, st[s])
    for (name, s, b), bd, od in zip(meta_blocks(model), dims.blocks, orig.blocks):
        C = st[s]
        for what, val, lim in (('mlp', bd.mlp, od.mlp), ('heads', bd.heads, od.heads), ('qk', bd.qk, od.qk),
                               ('v', bd.v, od.v)):
            if not (1 if lim else 0) <= val <= lim:
                raise ValueError(f'{name}: {what} width {val} outside [1, {lim}]')
        for ls in (b.ls1, b.ls2):
            ls.gamma = new_param(ls.gamma, (C,))
        m = b.mlp
        if not is_attention_block(b):
            m.fc1, m.norm1 = new_conv(m.fc1, C, bd.mlp), new_bn(m.norm1, bd.mlp)
            m.fc2, m.norm2 = new_conv(m.fc2, bd.mlp, C), new_bn(m.norm2, C)
            continue
        resize_norm(b.norm1, C)
        resize_norm(b.norm2, C)
        m.fc1, m.fc2 = new_linear(m.fc1, C, bd.mlp), new_linear(m.fc2, bd.mlp, C)
        a = b.token_mixer
        a.qkv = new_linear(a.qkv, C, bd.heads * (2 * bd.qk + bd.v))
        a.proj = new_linear(a.proj, bd.heads * bd.v, C)
        a.attention_biases = new_param(a.attention_biases, (bd.heads, a.attention_biases.shape[1]))
        # a.scale is left alone: the ORIGINAL 1/sqrt(key_dim) (docs/METHOD.md)
        a.num_heads, a.key_dim, a.val_dim = bd.heads, bd.qk, bd.v
        a.key_attn_dim, a.val_attn_dim, a.attn_ratio = bd.heads * bd.qk, bd.heads * bd.v, bd.v / bd.qk
        a.attention_bias_cache = {}  # a cached bias of the original head count must not survive
    resize_norm(model.norm, st[-1])
    for name in ('head', 'head_dist'):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            setattr(model, name, new_linear(mod, st[-1], mod.out_features))
    model.num_features = model.head_hidden_size = st[-1]
    for fi, c in zip(getattr(model, 'feature_info', []) or [], st):
        if isinstance(fi, dict) and 'num_chs' in fi:
            fi['num_chs'] = c
    return model.train(model.training)  # the new layers (BatchNorm above all) take the model's mode
