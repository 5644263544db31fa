"""The structure of Hugging Face transformers vision encoders: which classes, where their parts live, their widths.

Supported (transformers 5): ViTModel / ViTForImageClassification, DeiTModel / DeiTForImageClassification /
DeiTForImageClassificationWithTeacher (the distilled DeiT: a distillation token and two classifiers),
Dinov2Model / Dinov2ForImageClassification (LayerScale; the classifier reads [CLS | mean of patches]). Every
layer is pre-norm: x + attention(norm(x)) [· layer scale], x + mlp(norm(x)) [· layer scale], with separate
q_proj / k_proj / v_proj / o_proj Linears and an fc1 / fc2 MLP.
"""
from typing import List, Tuple

import torch.nn as nn

from ..base import UnsupportedModelError
from ..uniform import BlockDims, ModelDims
from .layers import PrunedHFAttention

__all__ = ['SUPPORTED', 'CLASSES', 'is_hf_vit', 'backbone_name', 'layers_name', 'layers', 'norm_names',
           'scale_names', 'head_names', 'check_supported', 'model_dims']

CLASSES = ('ViTModel', 'ViTForImageClassification', 'DeiTModel', 'DeiTForImageClassification',
           'DeiTForImageClassificationWithTeacher', 'Dinov2Model', 'Dinov2ForImageClassification')
SUPPORTED = ('Hugging Face transformers ' + ', '.join(CLASSES) + ' (from a model object or a save_pretrained '
             'folder; Dinov2 with its MLP FFN)')


def is_hf_vit(model: nn.Module) -> bool:
    return type(model).__name__ in CLASSES and type(model).__module__.startswith('transformers.')


def backbone_name(model: nn.Module) -> str:
    """'' for a bare encoder (ViTModel, ...), else the attribute holding it ('vit', 'deit', 'dinov2')."""
    return next((a for a in ('vit', 'deit', 'dinov2') if isinstance(getattr(model, a, None), nn.Module)), '')


def _prefix(model: nn.Module) -> str:
    b = backbone_name(model)
    return f'{b}.' if b else ''


def layers_name(model: nn.Module) -> str:
    """The module name of the layer list ('vit.layers', 'dinov2.encoder.layer', ...)."""
    bb = model.get_submodule(backbone_name(model))
    return _prefix(model) + ('layers' if hasattr(bb, 'layers') else 'encoder.layer')


def layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layers_name(model))


def norm_names(layer: nn.Module) -> Tuple[str, str]:
    return ('layernorm_before', 'layernorm_after') if hasattr(layer, 'layernorm_before') else ('norm1', 'norm2')


def scale_names(layer: nn.Module) -> List[str]:
    """The layer's LayerScale parameters (Dinov2), as parameter names within the layer."""
    return [f'{n}.lambda1' for n in ('layer_scale1', 'layer_scale2') if hasattr(layer, n)]


def head_names(model: nn.Module) -> List[str]:
    """The Linear classifiers (and ViTModel's pooler) that read the final hidden states."""
    names = [n for n in ('classifier', 'cls_classifier', 'distillation_classifier')
             if isinstance(getattr(model, n, None), nn.Linear)]
    pooler = getattr(model.get_submodule(backbone_name(model)), 'pooler', None)
    if pooler is not None:
        names.append(_prefix(model) + 'pooler.dense')
    return names


def check_supported(model: nn.Module) -> None:
    if not is_hf_vit(model):
        raise UnsupportedModelError(f'{type(model).__name__} is not supported; this family prunes {SUPPORTED}')
    if getattr(model.config, 'use_swiglu_ffn', False):
        raise UnsupportedModelError('Dinov2 with use_swiglu_ffn=True (a SwiGLU FFN) is not supported; '
                                    f'snp_fast prunes {SUPPORTED}')
    for i, layer in enumerate(layers(model)):
        a = layer.attention
        if isinstance(a, PrunedHFAttention):
            raise UnsupportedModelError(f'{layers_name(model)}.{i}.attention is already pruned (re-pruning is not '
                                        'supported)')
        if not all(isinstance(getattr(a, n, None), nn.Linear) for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')):
            raise UnsupportedModelError(f'{layers_name(model)}.{i}.attention ({type(a).__name__}) has no q_proj / '
                                        f'k_proj / v_proj / o_proj Linears; snp_fast prunes {SUPPORTED}')
        if not all(isinstance(getattr(layer.mlp, n, None), nn.Linear) for n in ('fc1', 'fc2')):
            raise UnsupportedModelError(f'{layers_name(model)}.{i}.mlp is a {type(layer.mlp).__name__}, not an '
                                        'fc1 / fc2 MLP')


def _attn_dims(a: nn.Module) -> Tuple[int, int, int]:
    if isinstance(a, PrunedHFAttention):
        return a.num_heads, a.qk_dim, a.v_dim
    return a.num_attention_heads, a.head_dim, a.head_dim


def model_dims(model: nn.Module) -> ModelDims:
    blocks = []
    for layer in layers(model):
        h, qk, v = _attn_dims(layer.attention)
        blocks.append(BlockDims(h, qk, v, layer.mlp.fc1.out_features))
    embed = model.get_submodule(_prefix(model) + 'embeddings.patch_embeddings.projection').out_channels
    return ModelDims(embed, blocks)
