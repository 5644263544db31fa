"""Slicing plans and the architecture change of the ViT family.

A plan is {parameter name: [(dim, kept index)]} (snp_fast/slicing.py); the stem and head plan holds the
residual-stream group's share outside the blocks, a block plan the block's q/k, v and FFN groups and its
share of the stream. apply_dims turns a meta-device copy of the model into the smaller architecture.
"""

import torch
import torch.nn as nn

from ...slicing import Plan, head_rows, linear_plan, new_linear, new_param, norm_plan, resize_norm
from . import roles
from .layers import PrunedAttention, PrunedRelPosAttention
from ..base import UnsupportedModelError
from .structure import BlockDims, BlockSelection, ModelDims, Selection, attn_dims, model_dims

__all__ = ['head_rows', 'value_out_cols', 'stem_and_head_plan', 'block_plan', 'slice_plan', 'apply_dims']


def value_out_cols(attn: nn.Module, sel: BlockSelection, head_dim: int) -> torch.Tensor:
    """The kept columns of the attention's output (H·d_v wide: proj's input, the output gate's rows and its
    norm). With grouped-query attention each value head's kept filters repeat for its query heads."""
    g = roles.kv_groups(attn)
    if g == 1:
        return head_rows(sel.v, head_dim, heads=sel.heads)
    return head_rows(sel.v.repeat_interleave(g, 0), head_dim)


def stem_and_head_plan(model: nn.Module, embed: torch.Tensor) -> Plan:
    """Slices of every tensor outside the blocks that touches the residual stream."""
    plan: Plan = {}
    plan['patch_embed.proj.weight'] = [(0, embed)]
    if model.patch_embed.proj.bias is not None:
        plan['patch_embed.proj.bias'] = [(0, embed)]
    if not isinstance(getattr(model.patch_embed, 'norm', nn.Identity()), nn.Identity):
        norm_plan(plan, 'patch_embed.norm', model.patch_embed.norm, embed)
    for tok in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
        if getattr(model, tok, None) is not None:
            plan[tok] = [(2, embed)]
    # an attention-pooling head reads the stream through its kv; fc_norm and the classifier read its output
    pool = getattr(model, 'attn_pool', None)
    if pool is not None:
        roles.pool_plan(plan, 'attn_pool', pool, embed)
    for name in ('norm_pre', 'norm') + (('fc_norm',) if pool is None else ()):
        mod = getattr(model, name, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            norm_plan(plan, name, mod, embed)
    for name in ('head', 'head_dist') if pool is None else ():
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            linear_plan(plan, name, mod, None, embed)
    return plan


def block_plan(model: nn.Module, i: int, sel: BlockSelection, embed: torch.Tensor) -> Plan:
    """Slices of every tensor of block i (q/k, v, fc1 groups and its share of the stream group)."""
    blk = model.blocks[i]
    attn = blk.attn
    h, d_qk, d_v = attn_dims(attn)
    if d_qk != d_v:
        raise UnsupportedModelError(f'blocks.{i}.attn is already pruned; re-pruning is not supported')
    d = d_qk
    p = f'blocks.{i}'
    q_rows = head_rows(sel.qk, d, heads=sel.heads)
    v_rows, v_cols = head_rows(sel.v, d, heads=sel.heads), value_out_cols(attn, sel, d)
    plan: Plan = {}
    norm_plan(plan, f'{p}.norm1', blk.norm1, embed)
    norm_plan(plan, f'{p}.norm2', blk.norm2, embed)
    roles.qkv_plan(plan, f'{p}.attn', attn, q_rows, v_rows, embed)
    if not isinstance(getattr(attn, 'norm', nn.Identity()), nn.Identity):
        norm_plan(plan, f'{p}.attn.norm', attn.norm, v_cols)
    if getattr(attn, 'gate', None) is not None:
        linear_plan(plan, f'{p}.attn.gate', attn.gate, v_cols, embed)
    linear_plan(plan, f'{p}.attn.proj', attn.proj, embed, v_cols)
    for name in roles.scale_names(blk):
        plan[f'{p}.{name}'] = [(0, embed)]
    roles.mlp_plan(plan, f'{p}.mlp', blk.mlp, sel.mlp, embed, norm_plan)
    return plan


def slice_plan(model: nn.Module, sel: Selection) -> Plan:
    plan = stem_and_head_plan(model, sel.embed)
    for i, bs in enumerate(sel.blocks):
        plan.update(block_plan(model, i, bs, sel.embed))
    return plan


def _unsupported(bd: 'BlockDims', od: 'BlockDims') -> str:
    """What a target asks of an attention that only some attentions support, in the user's terms."""
    if bd.heads == 0:
        return 'dropping the attention branch (drop_attn)'
    if bd.heads != od.heads:
        return "head pruning (ratio 'heads')"
    return "q/k pruning (ratio 'qk')"


def apply_dims(model: nn.Module, dims: ModelDims) -> nn.Module:
    """Turn a (meta-device) copy of the ORIGINAL model into the pruned architecture, in place.

    Attention layers become PrunedAttention (original scale kept); Linear, Conv2d, norms, tokens and
    LayerScale get their new sizes. Parameters are left on the meta device for the caller to assign.
    """
    D = dims.embed
    orig = model_dims(model)
    if len(dims.blocks) != len(orig.blocks):
        raise ValueError(f'dims describe {len(dims.blocks)} blocks but the model has {len(orig.blocks)}')
    pe = model.patch_embed
    old = pe.proj
    pe.proj = nn.Conv2d(old.in_channels, D, old.kernel_size, old.stride, old.padding, bias=old.bias is not None,
                        device='meta', dtype=old.weight.dtype)
    if not isinstance(getattr(pe, 'norm', nn.Identity()), nn.Identity):
        resize_norm(pe.norm, D)
    for tok in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
        t = getattr(model, tok, None)
        if t is not None:
            setattr(model, tok, new_param(t, (*t.shape[:2], D)))
    pool = getattr(model, 'attn_pool', None)
    if pool is not None:
        roles.pruned_attention_pool(pool, D, new_linear)
    for name in ('norm_pre', 'norm') + (('fc_norm',) if pool is None else ()):
        mod = getattr(model, name, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            resize_norm(mod, D)
    for name in ('head', 'head_dist') if pool is None else ():
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            setattr(model, name, new_linear(mod, D, mod.out_features))
    for i, (blk, bd, od) in enumerate(zip(model.blocks, dims.blocks, orig.blocks)):
        # heads = 0 (then qk = v = 0) drops the attention branch, mlp = 0 the MLP branch: the zero-width limit
        if not 0 <= bd.heads <= od.heads:
            raise ValueError(f'blocks.{i}: {bd.heads} heads outside [0, {od.heads}]')
        lo = 1 if bd.heads else 0
        for lim, val, what in ((od.qk, bd.qk, 'qk'), (od.v, bd.v, 'v')):
            if not lo <= val <= (lim if bd.heads else 0):
                raise ValueError(f'blocks.{i}: {what} width {val} outside [{lo}, {lim if bd.heads else 0}] '
                                 f'with {bd.heads} heads')
        if not 0 <= bd.mlp <= od.mlp:
            raise ValueError(f'blocks.{i}: mlp width {bd.mlp} outside [0, {od.mlp}]')
        if bd.mlp == 0 and not isinstance(blk.mlp.norm, nn.Identity):
            raise ValueError(f'blocks.{i}: the MLP branch of a model with scale_mlp_norm cannot be dropped')
        resize_norm(blk.norm1, D)
        resize_norm(blk.norm2, D)
        a = blk.attn
        q_norm = a.q_norm if not isinstance(a.q_norm, nn.Identity) else None
        k_norm = a.k_norm if not isinstance(a.k_norm, nn.Identity) else None
        if (q_norm is not None or k_norm is not None) and bd.heads and bd.qk != od.qk:
            raise ValueError(f'blocks.{i}: q/k pruning of a model with qk_norm is not supported')
        norm = None
        if not isinstance(getattr(a, 'norm', nn.Identity()), nn.Identity):
            norm = a.norm
            resize_norm(norm, bd.heads * bd.v)
        gate = getattr(a, 'gate', None)
        gate_bias = None if gate is None else gate.bias is not None
        if hasattr(a, 'num_prefix_tokens'):  # timm's rotary attentions (Eva family)
            if bd.heads != od.heads or bd.qk != od.qk:
                raise ValueError(f'blocks.{i}: {_unsupported(bd, od)} of a RoPE attention is not supported')
            blk.attn = roles.PrunedRopeAttention(
                D, bd.heads, bd.qk, bd.v, scale=float(a.scale), layout=roles.qkv_layout(a),
                qkv_bias=roles.qkv_biases(a),
                proj_bias=a.proj.bias is not None, num_prefix_tokens=a.num_prefix_tokens,
                rotate_half=bool(getattr(a, 'rotate_half', False)), q_norm=q_norm, k_norm=k_norm, norm=norm,
                gate_bias=gate_bias, attn_drop=a.attn_drop.p, proj_drop=a.proj_drop.p,
                num_kv_heads=getattr(a, 'num_kv_heads', None), device='meta', dtype=a.proj.weight.dtype)
        else:
            relpos = {'rel_pos': a.rel_pos} if hasattr(a, 'rel_pos') else {}
            if relpos and bd.heads != od.heads:
                raise ValueError(f'blocks.{i}: {_unsupported(bd, od)} of a relative-position attention is not supported')
            blk.attn = (PrunedRelPosAttention if relpos else PrunedAttention)(
                D, bd.heads, bd.qk, bd.v, scale=float(a.scale), qkv_bias=a.qkv.bias is not None,
                proj_bias=a.proj.bias is not None, q_norm=q_norm, k_norm=k_norm, norm=norm, gate_bias=gate_bias,
                attn_drop=a.attn_drop.p, proj_drop=a.proj_drop.p, device='meta', dtype=a.qkv.weight.dtype, **relpos)
        for ls in ('ls1', 'ls2'):
            mod = getattr(blk, ls, None)
            if hasattr(mod, 'gamma'):
                mod.gamma = new_param(mod.gamma, (D,))
        for g in ('gamma_1', 'gamma_2'):
            if getattr(blk, g, None) is not None:
                setattr(blk, g, new_param(getattr(blk, g), (D,)))
        roles.resize_mlp(blk.mlp, D, bd.mlp, new_linear, resize_norm)
    model.embed_dim = model.num_features = D
    if hasattr(model, 'head_hidden_size') and pool is None:  # an attention pool keeps its output width
        model.head_hidden_size = D
    for fi in getattr(model, 'feature_info', []) or []:
        if isinstance(fi, dict) and 'num_chs' in fi:
            fi['num_chs'] = D
    return model
