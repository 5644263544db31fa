"""The structure of timm's Swin Transformer (V1): what is supported, its widths and its selections.

Paper: Z. Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021
(arXiv 2103.14030). The layout and the groups are described in the package docstring (families/swin/__init__.py).
"""
from dataclasses import asdict, dataclass
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn

from ..base import UnsupportedModelError
from .layers import PrunedWindowAttention

__all__ = ['SUPPORTED', 'SwinBlockDims', 'SwinDims', 'SwinBlockSelection', 'SwinSelection', 'is_swin', 'claims_swin',
           'check_supported', 'model_dims', 'swin_blocks', 'attn_dims']

SUPPORTED = ('timm SwinTransformer (swin_*: PatchEmbed with a Conv2d proj, SwinTransformerStage with PatchMerging, '
             'SwinTransformerBlock with WindowAttention, Mlp and LayerNorm, a ClassifierHead)')


@dataclass
class SwinBlockDims:
    name: str   # module name, e.g. 'layers.1.blocks.0'
    stage: int
    heads: int
    qk: int     # query/key width per head
    v: int      # value width per head
    mlp: int    # fc1 hidden neurons


@dataclass
class SwinDims:
    stages: List[int]             # residual width of each stage
    blocks: List[SwinBlockDims]   # every SwinTransformerBlock, in order

    def to_dict(self) -> dict:
        return {'stages': list(self.stages), 'blocks': [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'SwinDims':
        return cls([int(s) for s in d['stages']],
                   [SwinBlockDims(**{k: (v if k == 'name' else int(v)) for k, v in b.items()}) for b in d['blocks']])


@dataclass
class SwinBlockSelection:
    mlp: torch.Tensor    # kept fc1 neurons
    heads: torch.Tensor  # kept ORIGINAL head indices, sorted
    qk: torch.Tensor     # (kept heads, kept q/k dims per head)
    v: torch.Tensor      # (kept heads, kept v dims per head)


@dataclass
class SwinSelection:
    stages: List[torch.Tensor]
    blocks: List[SwinBlockSelection]

    def to_dict(self) -> dict:
        return {'stages': [s.tolist() for s in self.stages],
                'blocks': [{k: v.tolist() for k, v in asdict(b).items()} for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'SwinSelection':
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls([t(s) for s in d['stages']], [SwinBlockSelection(**{k: t(v) for k, v in b.items()})
                                                 for b in d['blocks']])

    def dims(self, before: SwinDims) -> SwinDims:
        """The widths this selection keeps (block names and stages from the original's widths `before`)."""
        return SwinDims([s.numel() for s in self.stages],
                        [SwinBlockDims(b.name, b.stage, s.heads.numel(), s.qk.shape[1], s.v.shape[1], s.mlp.numel())
                         for b, s in zip(before.blocks, self.blocks)])


def _classes():
    from timm.layers import ClassifierHead, Mlp, PatchEmbed
    from timm.models import swin_transformer as sw
    return sw, PatchEmbed, Mlp, ClassifierHead


def is_swin(model: nn.Module) -> bool:
    return isinstance(model, _classes()[0].SwinTransformer)


def claims_swin(model: nn.Module) -> bool:
    """Swin V1, and the Swin V2 models, which check_supported refuses with the reason."""
    if is_swin(model):
        return True
    from timm.models import swin_transformer_v2 as v2, swin_transformer_v2_cr as v2cr
    return isinstance(model, (v2.SwinTransformerV2, v2cr.SwinTransformerV2Cr))


def swin_blocks(model: nn.Module) -> Iterator[Tuple[str, int, nn.Module]]:
    """(name, stage, block) of every SwinTransformerBlock, in order."""
    for s, st in enumerate(model.layers):
        for j, b in enumerate(st.blocks):
            yield f'layers.{s}.blocks.{j}', s, b


def check_supported(model: nn.Module) -> None:
    """UnsupportedModelError naming what is supported unless `model` is a plain timm SwinTransformer."""
    sw, PatchEmbed, Mlp, ClassifierHead = _classes()
    if not is_swin(model):
        if claims_swin(model):
            raise UnsupportedModelError(
                f'{type(model).__name__} (swinv2_*) is not supported: its attention is cosine attention with a '
                'learned logit scale and a log-spaced continuous position-bias MLP, its blocks are residual '
                'post-norm and its PatchMerging normalises after the reduction; none of that is implemented '
                f'(q/k could only be kept whole under cosine attention). snp_fast prunes {SUPPORTED}')
        raise UnsupportedModelError(f'{type(model).__name__} is not supported; snp_fast prunes {SUPPORTED}')
    if getattr(model, 'snp_recipe', None) is not None:
        raise UnsupportedModelError('this Swin Transformer is already pruned (re-pruning is not supported)')
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or pe.flatten \
            or not isinstance(pe.norm, (nn.LayerNorm, nn.Identity)):
        raise UnsupportedModelError('patch_embed is not timm PatchEmbed (Conv2d proj, NHWC output, LayerNorm or no '
                                    f'norm); snp_fast prunes {SUPPORTED}')
    if not isinstance(model.head, ClassifierHead) or not isinstance(model.head.fc, nn.Linear):
        raise UnsupportedModelError('the head is not a timm ClassifierHead with a Linear classifier (num_classes=0 '
                                    'models have nothing to prune towards)')
    if not isinstance(model.norm, nn.LayerNorm):
        raise UnsupportedModelError(f'the final norm is a {type(model.norm).__name__}; only LayerNorm is supported')
    for s, st in enumerate(model.layers):
        if type(st) is not sw.SwinTransformerStage:
            raise UnsupportedModelError(f'layers.{s} is a {type(st).__name__}; only SwinTransformerStage is supported')
        ds = st.downsample
        if s == 0 and not isinstance(ds, nn.Identity):
            raise UnsupportedModelError('layers.0 has a downsample; only timm\'s layout (patch merging at the start '
                                        'of stages 1..) is supported')
        if s > 0 and (type(ds) is not sw.PatchMerging or not isinstance(ds.norm, nn.LayerNorm)
                      or ds.reduction.bias is not None):
            raise UnsupportedModelError(f'layers.{s}.downsample is a {type(ds).__name__}; only timm PatchMerging '
                                        '(LayerNorm, then a Linear reduction without bias) is supported')
    for name, _, b in swin_blocks(model):
        if type(b) is not sw.SwinTransformerBlock:
            raise UnsupportedModelError(f'{name} is a {type(b).__name__}; only SwinTransformerBlock is supported')
        if isinstance(b.attn, PrunedWindowAttention):
            raise UnsupportedModelError(f'{name}.attn is already pruned (re-pruning is not supported)')
        if type(b.attn) is not sw.WindowAttention:
            raise UnsupportedModelError(f'{name}.attn is a {type(b.attn).__name__}; only timm WindowAttention is '
                                        'supported')
        if type(b.mlp) is not Mlp or not isinstance(b.mlp.fc1, nn.Linear) or not isinstance(b.mlp.norm, nn.Identity):
            raise UnsupportedModelError(f'{name}.mlp is not a plain timm Mlp (Linear fc1/fc2, no hidden norm)')
        if not isinstance(b.norm1, nn.LayerNorm) or not isinstance(b.norm2, nn.LayerNorm):
            raise UnsupportedModelError(f'{name}: only LayerNorm norms are supported')


def attn_dims(attn: nn.Module) -> Tuple[int, int, int]:
    """(heads, q/k width per head, v width per head) of a WindowAttention or PrunedWindowAttention."""
    if isinstance(attn, PrunedWindowAttention):
        return attn.num_heads, attn.qk_dim, attn.v_dim
    d = attn.qkv.out_features // (3 * attn.num_heads)
    return attn.num_heads, d, d


def model_dims(model: nn.Module) -> SwinDims:
    stages = [model.patch_embed.proj.out_channels] + [st.downsample.reduction.out_features
                                                      for st in list(model.layers)[1:]]
    return SwinDims(stages, [SwinBlockDims(name, s, *attn_dims(b.attn), b.mlp.fc1.out_features)
                             for name, s, b in swin_blocks(model)])
