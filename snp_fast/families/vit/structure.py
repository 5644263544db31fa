"""The structure of timm's VisionTransformer family: what is supported, and its widths and selections.

Covers timm `VisionTransformer` (ViT, DeiT, distilled DeiT, DeiT-3, register tokens),
`VisionTransformerRelPos` and timm `Eva` (EVA-02, DINOv3, RoPE-ViT, PE; the per-layout details live in
roles.py). Note: with timm's scale_attn_norm / scale_mlp_norm (a LayerNorm over the value or FFN hidden
width), removing v or fc1 filters changes that norm's statistics, so such models have no exact masked
twin (like embedding pruning); the re-fit compensates.
"""
from typing import Tuple

import torch.nn as nn

from ..base import UnsupportedModelError
from ..uniform import BlockDims, BlockSelection, ModelDims, Selection
from . import roles
from .layers import PrunedAttention, PrunedRelPosAttention

__all__ = ['SUPPORTED', 'BlockDims', 'ModelDims', 'BlockSelection', 'Selection', 'check_supported', 'model_dims',
           'attn_dims', 'is_vit', 'is_eva', 'has_qk_norm', 'fixed_qk_reason']

SUPPORTED = ('timm VisionTransformer / VisionTransformerDistilled built from the standard Block and Attention '
             'layers (vit_*, deit_*, deit3_*, *_distilled, register-token and class_token=False variants), '
             'VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*), pre-norm or residual post-norm (ResPost*) blocks, '
             'timm Eva (EvaBlock with EvaAttention / AttentionRope: EVA-02, DINOv3, RoPE-ViT, PE; q/k kept whole), '
             'with Mlp, GluMlp or SwiGLU FFNs and a token, average or attention-pooling ("map") head')


def _timm_classes():
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer
    return VisionTransformer, Block, Attention, Mlp


def _relpos_classes():
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, VisionTransformerRelPos
    return VisionTransformerRelPos, RelPosBlock, RelPosAttention


def _eva_classes():
    from timm.layers.attention import AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    return Eva, EvaBlock, (EvaAttention, AttentionRope)


def is_vit(model: nn.Module) -> bool:
    """Whether `model` is of the family's model types (check_supported then says which layers are not)."""
    VisionTransformer = _timm_classes()[0]
    return isinstance(model, (VisionTransformer, _eva_classes()[0], _relpos_classes()[0]))


def is_eva(model: nn.Module) -> bool:
    """timm's Eva family (EVA-02, DINOv3, RoPE-ViT, PE, ...: vit_* names built by timm/models/eva.py)."""
    return isinstance(model, _eva_classes()[0])


def check_supported(model: nn.Module, allow_pruned: bool = False) -> None:
    """Raise UnsupportedModelError naming what is supported unless `model` is a plain timm ViT or Eva."""
    VisionTransformer, Block, Attention, Mlp = _timm_classes()
    Eva, EvaBlock, rope_attns = _eva_classes()
    RelPos, RelPosBlock, RelPosAttention = _relpos_classes()
    eva, relpos = isinstance(model, Eva), isinstance(model, RelPos)
    if not (eva or relpos or isinstance(model, VisionTransformer)):
        raise UnsupportedModelError(f'{type(model).__name__} is not supported; snp_fast prunes {SUPPORTED}')
    pool = getattr(model, 'attn_pool', None)
    pools = ('AttentionPoolLatent', 'PrunedAttentionPoolLatent') if allow_pruned else ('AttentionPoolLatent',)
    if pool is not None and type(pool).__name__ not in pools:
        raise UnsupportedModelError(f'global_pool={model.global_pool!r} ({type(pool).__name__} head) is not supported; '
                                    f'snp_fast prunes {SUPPORTED} (global_pool="map": AttentionPoolLatent)')
    if not isinstance(getattr(model.patch_embed, 'proj', None), nn.Conv2d):
        raise UnsupportedModelError(f'patch embedding {type(model.patch_embed).__name__} without a Conv2d proj '
                                    'is not supported')
    from timm.models.vision_transformer import ResPostBlock
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock
    block_types, attn_types, pruned_type = (
        ((EvaBlock,), rope_attns, roles.PrunedRopeAttention) if eva else
        ((RelPosBlock, ResPostRelPosBlock), (RelPosAttention,), PrunedRelPosAttention) if relpos else
        ((Block, ResPostBlock), (Attention,), PrunedAttention))
    attn_types = attn_types + (pruned_type,) if allow_pruned else attn_types
    for i, blk in enumerate(model.blocks):
        if type(blk) not in block_types:
            raise UnsupportedModelError(f'blocks.{i} is a {type(blk).__name__}; only timm '
                                        f'{" / ".join(t.__name__ for t in block_types)} is supported in a '
                                        f'{type(model).__name__} ({SUPPORTED})')
        if type(blk.attn) not in attn_types:
            what = 'already pruned (re-pruning is not supported)' if isinstance(blk.attn, pruned_type) \
                else f'a {type(blk.attn).__name__}'
            raise UnsupportedModelError(f'blocks.{i}.attn is {what}; only timm '
                                        f'{" / ".join(t.__name__ for t in attn_types)} is supported')
        roles.check_mlp(blk.mlp, f'blocks.{i}.mlp', UnsupportedModelError)


def attn_dims(attn: nn.Module) -> Tuple[int, int, int]:
    if isinstance(attn, (PrunedAttention, roles.PrunedRopeAttention)):  # (PrunedRelPosAttention included)
        return attn.num_heads, attn.qk_dim, attn.v_dim
    return attn.num_heads, attn.head_dim, attn.head_dim


def model_dims(model: nn.Module) -> ModelDims:
    blocks = []
    for blk in model.blocks:
        h, qk, v = attn_dims(blk.attn)
        blocks.append(BlockDims(h, qk, v, roles.mlp_hidden(blk.mlp)))
    return ModelDims(model.embed_dim, blocks)


def has_qk_norm(model: nn.Module) -> bool:
    return any(not isinstance(b.attn.q_norm, nn.Identity) for b in model.blocks)


def fixed_qk_reason(model: nn.Module) -> str:
    """Why the q/k dims of `model` cannot be pruned ('' when they can).

    RoPE rotates each pair of q/k dims by the token's position, so a dim is not an independent rank-1
    term of QKᵀ; pruning whole rotation pairs (and slicing the rotation tables per block) is possible
    but not implemented: like qk_norm models, RoPE models keep q/k whole (v, fc1, embed are pruned).
    """
    if is_eva(model):
        return 'this model rotates q and k by position (RoPE, timm Eva family)'
    if has_qk_norm(model):
        return 'this model normalises q and k per head (qk_norm)'
    return ''
