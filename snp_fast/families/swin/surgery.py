"""Swin's slicing plans and its architecture change on a meta-device copy (still a timm SwinTransformer:
layers get their new sizes, every WindowAttention becomes a PrunedWindowAttention with the ORIGINAL scale)."""
from typing import List

import torch
import torch.nn as nn

from ...slicing import Plan, linear_plan, new_conv, new_linear, norm_plan, resize_norm
from .layers import PrunedWindowAttention
from .structure import SwinBlockSelection, SwinDims, SwinSelection, attn_dims, model_dims, swin_blocks

__all__ = ['head_rows', 'merged_cols', 'qkv_rows', 'outer_plan', 'block_plan', 'slice_plan', 'apply_dims']


def head_rows(sel: torch.Tensor, heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """(kept heads, kept) per-head indices of the original heads `heads` -> flat rows of a head-major axis."""
    return (heads.long().unsqueeze(1) * head_dim + sel + offset).flatten()


def merged_cols(kept: torch.Tensor, width: int) -> torch.Tensor:
    """PatchMerging's 4·C input columns kept: its input is the 2x2 neighbours' C channels concatenated
    (timm: [x0 | x1 | x2 | x3]), so the previous stage's kept channels four times, one per neighbour."""
    return torch.cat([j * width + kept for j in range(4)])


def qkv_rows(sel: SwinBlockSelection, heads: int, head_dim: int) -> torch.Tensor:
    """Rows of the original qkv kept by `sel`, in the pruned [q | k | v] layout (head-major in each)."""
    q = head_rows(sel.qk, sel.heads, head_dim)
    return torch.cat([q, q + heads * head_dim, head_rows(sel.v, sel.heads, head_dim, 2 * heads * head_dim)])


def outer_plan(model: nn.Module, stages: List[torch.Tensor]) -> Plan:
    """Slices of every tensor outside the blocks: patch embedding (stage 0), each PatchMerging (stage s-1 -> s),
    the final norm and the classifier (last stage)."""
    plan: Plan = {}
    pe = model.patch_embed
    linear_plan(plan, 'patch_embed.proj', pe.proj, stages[0], None)
    if isinstance(pe.norm, nn.LayerNorm):
        norm_plan(plan, 'patch_embed.norm', pe.norm, stages[0])
    widths = model_dims(model).stages
    for s in range(1, len(stages)):
        ds = model.layers[s].downsample
        cols = merged_cols(stages[s - 1], widths[s - 1])
        norm_plan(plan, f'layers.{s}.downsample.norm', ds.norm, cols)
        linear_plan(plan, f'layers.{s}.downsample.reduction', ds.reduction, stages[s], cols)
    norm_plan(plan, 'norm', model.norm, stages[-1])
    linear_plan(plan, 'head.fc', model.head.fc, None, stages[-1])
    return plan


def block_plan(block: nn.Module, prefix: str, sel: SwinBlockSelection, e: torch.Tensor) -> Plan:
    """Slices of one block's tensors (its q/k, v, heads and FFN groups, and its share of its stage's width e)."""
    H, d, _ = attn_dims(block.attn)
    plan: Plan = {}
    norm_plan(plan, f'{prefix}.norm1', block.norm1, e)
    norm_plan(plan, f'{prefix}.norm2', block.norm2, e)
    a = block.attn
    linear_plan(plan, f'{prefix}.attn.qkv', a.qkv, qkv_rows(sel, H, d), e)
    linear_plan(plan, f'{prefix}.attn.proj', a.proj, e, head_rows(sel.v, sel.heads, d))
    plan[f'{prefix}.attn.relative_position_bias_table'] = [(1, sel.heads)]
    linear_plan(plan, f'{prefix}.mlp.fc1', block.mlp.fc1, sel.mlp, e)
    linear_plan(plan, f'{prefix}.mlp.fc2', block.mlp.fc2, e, sel.mlp)
    return plan


def slice_plan(model: nn.Module, sel: SwinSelection) -> Plan:
    plan = outer_plan(model, sel.stages)
    for (name, s, b), bs in zip(swin_blocks(model), sel.blocks):
        plan.update(block_plan(b, name, bs, sel.stages[s]))
    return plan


def apply_dims(model: nn.Module, dims: SwinDims) -> nn.Module:
    """Turn a (meta-device) copy of the ORIGINAL model into the pruned architecture, in place.

    The result is still a timm SwinTransformer: layers get their new sizes, attention modules become
    PrunedWindowAttention with the ORIGINAL scale. Tensors are left on the meta device.
    """
    orig = model_dims(model)
    if len(dims.stages) != len(orig.stages) or [b.name for b in dims.blocks] != [b.name for b in orig.blocks]:
        raise ValueError(f'dims describe stages {dims.stages} and {len(dims.blocks)} blocks but the model has '
                         f'stages {orig.stages} and {len(orig.blocks)} blocks')
    for s, (c, oc) in enumerate(zip(dims.stages, orig.stages)):
        if not 1 <= c <= oc:
            raise ValueError(f'layers.{s}: stage width {c} outside [1, {oc}]')
    st = dims.stages
    pe = model.patch_embed
    pe.proj = new_conv(pe.proj, pe.proj.in_channels, st[0])
    if isinstance(pe.norm, nn.LayerNorm):
        resize_norm(pe.norm, st[0])
    for s, stage in enumerate(model.layers):
        stage.dim = st[max(s - 1, 0)]
        if s > 0:
            ds = stage.downsample
            resize_norm(ds.norm, 4 * st[s - 1])
            ds.reduction = new_linear(ds.reduction, 4 * st[s - 1], st[s])
            ds.dim, ds.out_dim = st[s - 1], st[s]
    for (name, s, b), bd, od in zip(swin_blocks(model), dims.blocks, orig.blocks):
        for what, val, lim in (('mlp', bd.mlp, od.mlp), ('heads', bd.heads, od.heads), ('qk', bd.qk, od.qk),
                               ('v', bd.v, od.v)):
            if not 1 <= val <= lim:
                raise ValueError(f'{name}: {what} width {val} outside [1, {lim}]')
        C = st[s]
        b.dim = C
        resize_norm(b.norm1, C)
        resize_norm(b.norm2, C)
        a = b.attn
        b.attn = PrunedWindowAttention(C, bd.heads, bd.qk, bd.v, a.scale, a.window_size, a.qkv.bias is not None,
                                       a.attn_drop.p, a.proj_drop.p, device='meta', dtype=a.qkv.weight.dtype)
        b.mlp.fc1, b.mlp.fc2 = new_linear(b.mlp.fc1, C, bd.mlp), new_linear(b.mlp.fc2, bd.mlp, C)
    resize_norm(model.norm, st[-1])
    model.head.fc = new_linear(model.head.fc, st[-1], model.head.fc.out_features)
    model.embed_dim = st[0]
    model.num_features = model.head_hidden_size = model.head.num_features = st[-1]
    for fi, c in zip(getattr(model, 'feature_info', []) or [], st):
        if isinstance(fi, dict) and 'num_chs' in fi:
            fi['num_chs'] = c
    return model.train(model.training)
