"""Hugging Face transformers vision encoders (ViT, DeiT and distilled DeiT, DINOv2): the same groups as timm's
ViT family (q/k pairs, value filters, FFN neurons and whole heads per layer; one residual stream), the same
re-fit. The pruned model stays a transformers model (`model(pixel_values=x).logits`), its attention layers
PrunedHFAttention. Recipes record the transformers class and config, so loading needs snp_fast and
transformers, never the network.

    structure.py  supported classes, where their parts live, widths   layers.py   PrunedHFAttention
    surgery.py    slicing plans, the architecture change               steps.py    the pipeline hooks
"""
from typing import List

import torch
import torch.nn as nn

from ..base import Family, UnsupportedModelError
from ..registry import register_family
from ..uniform import BlockDims, BlockSelection, ModelDims, Selection, resolve_ratios, target_dims, width_lines
from .layers import PrunedHFAttention
from .steps import LayerStep, prefix, refit_heads, select_embed
from .structure import CLASSES, SUPPORTED, backbone_name, check_supported, is_hf_vit, layers_name, model_dims
from .surgery import apply_dims, slice_plan, stem_and_head_plan

__all__ = ['HFViTFamily', 'PrunedHFAttention', 'SUPPORTED', 'CLASSES', 'check_supported', 'model_dims', 'apply_dims',
           'slice_plan', 'UnsupportedModelError', 'BlockDims', 'ModelDims', 'BlockSelection', 'Selection']


def _transformers_class(name: str):
    if name not in CLASSES:
        raise ValueError(f'the recipe names transformers class {name!r}; snp_fast rebuilds only {list(CLASSES)}')
    import transformers
    return getattr(transformers, name)


class HFViTFamily(Family):
    name = 'hf_vit'
    supported = SUPPORTED
    dims_type = ModelDims
    selection_type = Selection
    # structure and widths: the folder's own functions
    check_supported = staticmethod(check_supported)
    model_dims = staticmethod(model_dims)
    apply_dims = staticmethod(apply_dims)
    target_dims = staticmethod(target_dims)
    slice_plan = staticmethod(slice_plan)

    def claims(self, model):
        return is_hf_vit(model)

    def resolve_ratios(self, spec, dims):
        if isinstance(spec, str):
            raise ValueError(f'preset {spec!r} is for timm models; give ratios for a transformers model')
        spec = resolve_ratios(spec, len(dims.blocks))
        if spec['drop_attn'] or spec['drop_mlp']:
            raise ValueError('dropping whole branches (drop_attn / drop_mlp) is not supported for transformers models')
        return spec

    def preset_mismatch(self, name, dims):
        raise ValueError(f'preset {name!r} is for timm models; give ratios= for a transformers model')

    def width_lines(self, before: ModelDims, after: ModelDims) -> List[str]:
        return width_lines(before, after, 'hidden', 'layer')

    # --- rebuilding ------------------------------------------------------------------------------
    def rebuild_info(self, model, timm_name, timm_kwargs):
        if timm_name is not None or timm_kwargs is not None:
            raise ValueError('timm_name= / timm_kwargs= describe timm models; a transformers model is rebuilt from '
                             'its own config')
        return {'timm_name': None, 'timm_kwargs': {}, 'timm_unavailable': 'a transformers model',
                'hf_class': type(model).__name__, 'hf_config': model.config.to_dict()}

    def data_config(self, model):
        return None  # (a transformers model's preprocessing lives in its image processor, not in the model)

    def rebuild_problem(self, recipe):
        return '' if recipe.get('hf_config') and recipe.get('hf_class') else 'the recipe has no transformers config'

    def build_unpruned(self, recipe) -> nn.Module:
        cls = _transformers_class(recipe.get('hf_class'))
        config = cls.config_class.from_dict(dict(recipe['hf_config']))
        with torch.device('meta'):
            return cls(config).eval()

    # --- pipeline hooks ----------------------------------------------------------------------------
    def check_calib(self, model, calib):
        size = model.get_submodule(backbone_name(model)).embeddings.patch_embeddings.image_size
        if tuple(calib.shape[2:]) != tuple(size):
            raise ValueError(f'calib images are {tuple(calib.shape[2:])} but the model takes {tuple(size)}')

    def check_settings(self, settings):
        if settings.embed_criterion == 'activation':
            raise ValueError('embed_criterion="activation" is not supported for transformers models; use '
                             '"redundancy" or "magnitude"')

    def check_request(self, ctx):
        if ctx.calib is None and not ctx.fixed and any(a.heads < b.heads for a, b in
                                                       zip(ctx.dims_after.blocks, ctx.dims_before.blocks)):
            raise ValueError('head pruning ("heads" ratios) scores the heads on calibration images; pass calib=')

    def select_stream(self, ctx):
        return select_embed(ctx)

    def outer_plan(self, model, stream):
        return stem_and_head_plan(model, stream)

    def outer_names(self, model):
        inside = layers_name(model) + '.'
        return ([n for n, _ in model.named_parameters() if not n.startswith(inside)],
                [n for n, _ in model.named_buffers()])

    def prefix(self, model, images, batch):
        return prefix(model, images, batch)

    def steps(self, ctx, pruned, stream):
        return [LayerStep(ctx, pruned, i, stream) for i in range(len(ctx.dims_before.blocks))]

    def refit_head(self, ctx, pruned, x, xp, stream):
        refit_heads(ctx, pruned, x, xp)

    def make_selection(self, stream, blocks):
        return Selection(stream, blocks)


register_family(HFViTFamily())
