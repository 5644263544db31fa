"""The structure of timm EfficientFormer (V1): what is supported, its widths and its selections.

Paper: Y. Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022 (arXiv 2206.01191).
The layout and the groups are described in the package docstring (families/efficientformer/__init__.py).
"""
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..base import UnsupportedModelError

__all__ = ['SUPPORTED', 'EfficientFormerBlockDims', 'EfficientFormerDims', 'EfficientFormerBlockSelection',
           'EfficientFormerSelection', 'timm_module', 'is_efficientformer', 'meta_blocks', 'is_attention_block',
           'check_supported', 'model_dims']

SUPPORTED = 'timm EfficientFormer V1 (efficientformer_l1, efficientformer_l3, efficientformer_l7)'


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

    @classmethod
    def from_dict(cls, d: dict) -> 'EfficientFormerSelection':
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls([t(s) for s in d['stages']],
                   [EfficientFormerBlockSelection(**{k: t(v) for k, v in b.items()}) for b in d['blocks']])

    def dims(self, before: 'EfficientFormerDims') -> 'EfficientFormerDims':
        """The widths this selection keeps (block names and stages from the original's widths `before`)."""
        blocks = []
        for b, s in zip(before.blocks, self.blocks):
            att = (s.heads.numel(), s.qk.shape[1], s.v.shape[1]) if s.heads is not None else ()
            blocks.append(EfficientFormerBlockDims(b.name, b.stage, s.mlp.numel(), *att))
        return EfficientFormerDims([s.numel() for s in self.stages], blocks)


def timm_module():
    from timm.models import efficientformer as ef
    return ef


def is_efficientformer(model: nn.Module) -> bool:
    """True for timm EfficientFormer V1 and V2 (V2 is then refused by check_supported with a reason)."""
    return type(model).__name__ in ('EfficientFormer', 'EfficientFormerV2') and \
        type(model).__module__.startswith('timm.models.efficientformer')


def meta_blocks(model: nn.Module) -> List[Tuple[str, int, nn.Module]]:
    ef = timm_module()
    return [(f'stages.{s}.blocks.{j}', s, b) for s, st in enumerate(model.stages) for j, b in enumerate(st.blocks)
            if isinstance(b, (ef.MetaBlock2d, ef.MetaBlock1d))]


def is_attention_block(block: nn.Module) -> bool:
    return isinstance(block, timm_module().MetaBlock1d)


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError saying why unless `model` is a timm EfficientFormer (V1) as timm builds it."""
    if type(model).__name__ == 'EfficientFormerV2':
        raise UnsupportedModelError(
            'EfficientFormerV2 (efficientformerv2_*) is not supported: it is a different architecture (depthwise-conv '
            'MLPs, attention with talking heads and strided/local attention, downsampling attention); snp_fast prunes '
            f'{SUPPORTED}')
    ef = timm_module()
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
    for name, s, b in meta_blocks(model):
        if is_attention_block(b):
            a = b.token_mixer
            blocks.append(EfficientFormerBlockDims(name, s, b.mlp.fc1.out_features, a.num_heads, a.key_dim, a.val_dim))
        else:
            blocks.append(EfficientFormerBlockDims(name, s, b.mlp.fc1.out_channels))
    return EfficientFormerDims(stages, blocks)
