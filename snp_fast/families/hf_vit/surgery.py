"""Slicing plans and the architecture change of the Hugging Face family (the model stays a transformers model:
its attention layers become PrunedHFAttention, every other layer keeps its class with new sizes)."""
import torch
import torch.nn as nn

from ...slicing import Plan, head_rows, linear_plan, new_linear, new_param, norm_plan, resize_norm
from ..uniform import BlockSelection, ModelDims, Selection
from .layers import PrunedHFAttention
from .structure import backbone_name, head_names, layers, layers_name, model_dims, norm_names, scale_names

__all__ = ['stem_and_head_plan', 'block_plan', 'slice_plan', 'apply_dims', 'TOKENS']

TOKENS = ('cls_token', 'distillation_token', 'mask_token', 'position_embeddings')


def _embeddings(model: nn.Module) -> nn.Module:
    return model.get_submodule(backbone_name(model)).embeddings


def _prefix(model: nn.Module) -> str:
    b = backbone_name(model)
    return f'{b}.' if b else ''


def _classifier_cols(model: nn.Module, name: str, embed: torch.Tensor) -> torch.Tensor:
    """A classifier's input columns at the kept channels: Dinov2's reads [CLS | mean of patches] (two copies)."""
    lin = model.get_submodule(name)
    D = model_dims(model).embed
    return embed if lin.in_features == D else torch.cat([embed, embed + D])


def stem_and_head_plan(model: nn.Module, embed: torch.Tensor) -> Plan:
    """Slices of every tensor outside the layers that reads or writes the residual stream."""
    plan: Plan = {}
    p = _prefix(model) + 'embeddings.'
    linear_plan(plan, p + 'patch_embeddings.projection', _embeddings(model).patch_embeddings.projection, embed, None)
    for tok in TOKENS:
        t = getattr(_embeddings(model), tok, None)
        if isinstance(t, torch.Tensor):
            plan[p + tok] = [(t.dim() - 1, embed)]
    norm_plan(plan, _prefix(model) + 'layernorm', model.get_submodule(_prefix(model) + 'layernorm'), embed)
    for name in head_names(model):
        linear_plan(plan, name, model.get_submodule(name), None, _classifier_cols(model, name, embed))
    return plan


def block_plan(model: nn.Module, i: int, sel: BlockSelection, embed: torch.Tensor) -> Plan:
    """Slices of layer i: its q/k, v and FFN groups and its share of the stream."""
    layer = layers(model)[i]
    a = layer.attention
    d = a.head_dim
    p = f'{layers_name(model)}.{i}'
    q_rows, v_rows = head_rows(sel.qk, d, heads=sel.heads), head_rows(sel.v, d, heads=sel.heads)
    plan: Plan = {}
    for n in norm_names(layer):
        norm_plan(plan, f'{p}.{n}', getattr(layer, n), embed)
    for n, rows in (('q_proj', q_rows), ('k_proj', q_rows), ('v_proj', v_rows)):
        linear_plan(plan, f'{p}.attention.{n}', getattr(a, n), rows, embed)
    linear_plan(plan, f'{p}.attention.o_proj', a.o_proj, embed, v_rows)
    linear_plan(plan, f'{p}.mlp.fc1', layer.mlp.fc1, sel.mlp, embed)
    linear_plan(plan, f'{p}.mlp.fc2', layer.mlp.fc2, embed, sel.mlp)
    for n in scale_names(layer):
        plan[f'{p}.{n}'] = [(0, embed)]
    return plan


def slice_plan(model: nn.Module, sel: Selection) -> Plan:
    plan = stem_and_head_plan(model, sel.embed)
    for i, bs in enumerate(sel.blocks):
        plan.update(block_plan(model, i, bs, sel.embed))
    return plan


def apply_dims(model: nn.Module, dims: ModelDims) -> nn.Module:
    """Turn a meta-device copy of the ORIGINAL model into the architecture of `dims`, in place."""
    orig = model_dims(model)
    if len(dims.blocks) != len(orig.blocks):
        raise ValueError(f'dims describe {len(dims.blocks)} layers but the model has {len(orig.blocks)}')
    D = dims.embed
    emb = _embeddings(model)
    old = emb.patch_embeddings.projection
    emb.patch_embeddings.projection = nn.Conv2d(old.in_channels, D, old.kernel_size, old.stride, old.padding,
                                                bias=old.bias is not None, device='meta', dtype=old.weight.dtype)
    for tok in TOKENS:
        t = getattr(emb, tok, None)
        if isinstance(t, torch.Tensor):
            setattr(emb, tok, new_param(t, (*t.shape[:-1], D)))
    resize_norm(model.get_submodule(_prefix(model) + 'layernorm'), D)
    for name in head_names(model):
        lin = model.get_submodule(name)
        parent, _, leaf = name.rpartition('.')
        width = D if lin.in_features == orig.embed else 2 * D
        setattr(model.get_submodule(parent) if parent else model, leaf, new_linear(lin, width, lin.out_features))
    for i, (layer, bd, od) in enumerate(zip(layers(model), dims.blocks, orig.blocks)):
        for what, val, lim in (('heads', bd.heads, od.heads), ('qk', bd.qk, od.qk), ('v', bd.v, od.v),
                               ('mlp', bd.mlp, od.mlp)):
            if not 1 <= val <= lim:
                raise ValueError(f'{layers_name(model)}.{i}: {what} width {val} outside [1, {lim}] (dropping a whole '
                                 'branch is not supported for this family)')
        for n in norm_names(layer):
            resize_norm(getattr(layer, n), D)
        a = layer.attention
        layer.attention = PrunedHFAttention(D, bd.heads, bd.qk, bd.v, scaling=float(a.scaling),
                                            qkv_bias=a.q_proj.bias is not None, o_bias=a.o_proj.bias is not None,
                                            device='meta', dtype=a.q_proj.weight.dtype)
        layer.mlp.fc1 = new_linear(layer.mlp.fc1, D, bd.mlp)
        layer.mlp.fc2 = new_linear(layer.mlp.fc2, bd.mlp, D)
        for n in scale_names(layer):
            ls = getattr(layer, n.split('.')[0])
            ls.lambda1 = new_param(ls.lambda1, (D,))
    return model
